-- Memory and the queue: what unacknowledged stanzas cost xmppsm, against a scripted server in
-- this process that takes everything and acknowledges nothing until told (a real server acks
-- on request). Plain TCP on 127.0.0.1 (TLS would only add the same cost to every figure).
--
-- For each stanza size and count: the client's Lua heap and resident memory with that many
-- stanzas sent and unacknowledged (per stanza, beyond what was there before); the cost of
-- re-sending them all after a cut and a resumption (h=0); the cost of releasing them with one
-- <a/>; for the smallest size, the same again with an outcome callback per send. Then the
-- store: each durability mode, the cost of persisting a stanza (client:send()
-- end to end, and Store:queued() alone). Prints RESULT lines.
--
--   lua5.4 bench/e2e/queue_bench.lua dir=/tmp/x [sizes=100,1000,10000] [counts=1000,10000,100000]
--     [max_bytes=900000000]
package.path = "lua/?.lua;lua/?/init.lua;bench/?.lua;" .. package.path
package.cpath = "./?.so;" .. package.cpath

local socket = require "socket"
local xmppsm = require "xmppsm"
local core = require "xmppsm.core"
local loop = require "xmppsm.loop"
local store = require "xmppsm.store"
local common = require "e2e.common"

local a = common.args(arg)
local now = core.monotime
local function list(s, default)
  local t = {}
  for n in tostring(s or default):gmatch("%d+") do t[#t + 1] = tonumber(n) end
  return t
end
local SIZES = list(a.sizes, "100,1000,10000")
local COUNTS = list(a.counts, "1000,10000,100000")
local MAX_BYTES = a.max_bytes or 900000000  -- skip combinations holding more than this
local DOMAIN = "queue.test"

local function lua_kib()
  collectgarbage()
  collectgarbage()
  return collectgarbage("count")
end

---------------------------------------------------------------------------------------------
-- The scripted server: negotiation with the parser, then a sink that counts bytes.

local server = { conns = {}, sessions = 0 }
local listener = assert(socket.bind("127.0.0.1", 0))
listener:settimeout(0)
server.port = tonumber((select(2, listener:getsockname())))

local HEADER = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' " ..
  "xmlns:stream='http://etherx.jabber.org/streams' id='s%d' from='" .. DOMAIN .. "' version='1.0'>"

local function new_conn(sock)
  local c = { sock = sock, want_write = false, phase = "header", sunk = 0,
              parser = core.parser{}, out = {} }
  function c.send(data)
    c.sock:settimeout(5)
    assert(c.sock:send(data))
    c.sock:settimeout(0)
  end
  function c.close()
    if c.closed then return end
    c.closed = true
    loop.unwatch(c)
    c.sock:close()
  end
  local function on_element(el)
    local name = el.name
    if name == "auth" then
      c.send("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
      c.parser:reset()
      c.phase = "header2"
    elseif name == "iq" then
      c.send("<iq type='result' id='" .. el.attr.id .. "'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>" ..
             "<jid>bench@" .. DOMAIN .. "/q</jid></bind></iq>")
    elseif name == "enable" then
      server.sessions = server.sessions + 1
      c.send("<enabled xmlns='urn:xmpp:sm:3' id='q" .. server.sessions .. "' resume='true'/>")
      c.phase = "sink"
    elseif name == "resume" then
      c.send("<resumed xmlns='urn:xmpp:sm:3' previd='" .. el.attr.previd .. "' h='0'/>")
      c.phase = "sink"
    end
  end
  function c.on_readable()
    while true do
      local data, err, partial = c.sock:receive(1048576)
      data = data or partial
      if data and #data > 0 then
        if c.phase == "sink" then
          c.sunk = c.sunk + #data
        else
          local events, n = c.parser:feed(data)
          for i = 1, n do
            local kind, value = events[3 * i - 2], events[3 * i - 1]
            if kind == "header" then
              c.send(HEADER:format(#server.conns))
              if c.phase == "header" then
                c.send("<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>" ..
                       "<mechanism>PLAIN</mechanism></mechanisms></stream:features>")
              else
                c.send("<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>" ..
                       "<sm xmlns='urn:xmpp:sm:3'/></stream:features>")
              end
            elseif kind == "stanza" then
              on_element(value)
            end
            if c.phase == "sink" then break end  -- what follows is counted, not parsed
          end
        end
      end
      if err then
        if err ~= "timeout" then c.close() end
        return
      end
    end
  end
  c.on_writable = function() end
  return c
end

local accept_watcher = { sock = listener, want_write = false }
function accept_watcher.on_readable()
  local sock = listener:accept()
  if sock then
    sock:settimeout(0)
    local c = new_conn(sock)
    server.conns[#server.conns + 1] = c
    server.current = c
    loop.watch(c)
  end
end
function accept_watcher.on_writable() end
loop.watch(accept_watcher)

---------------------------------------------------------------------------------------------

local wait_for = common.wait_for

local run_id = 0
local function new_client(durability, max_items)
  run_id = run_id + 1
  return xmppsm.client{
    jid = "bench@" .. DOMAIN .. "/q", password = "x", host = "127.0.0.1", port = server.port,
    tls = "none", allow_plain = true, presence = false, reconnect_delay = 0.01,
    sm = { store = a.dir .. "/q" .. run_id .. ".sm", durability = durability or "write",
           max_queue = max_items or 10000, max_queue_bytes = 1 << 40, ack_timeout = 3600,
           ack_interval = 3600 },
    logger = function(level, msg) if level == "error" then io.stderr:write(msg, "\n") end end,
  }
end

-- A message whose serialized form is about `size` bytes (ids and bodies grow with i by a few
-- bytes); each has its own body string, as real messages do.
local TO = "peer@" .. DOMAIN
local FIXED = #core.serialize(xmppsm.stanza.message({ to = TO, type = "chat", id = "m1" }, "x")) - 1
local fillers = {}
local function make(size, i)
  local filler = fillers[size]
  if not filler then
    filler = string.rep("x", math.max(1, size - FIXED - 6))
    fillers[size] = filler
  end
  return xmppsm.stanza.message({ to = TO, type = "chat", id = "m" .. i }, filler .. i)
end

local function close_client(c)
  c:close(1)
  wait_for(function() return c:status() == "closed" end, 30, "close")
end

-- `count` stanzas of about `size` bytes sent and left unacknowledged; with `callbacks`, each
-- send has an outcome callback of its own (a closure, as an application capturing its context
-- makes one).
local function measure(size, count, callbacks)
  io.stderr:write(string.format("queue: %d stanzas of %d bytes%s\n", count, size,
                                callbacks and ", callbacks" or ""))
  local c = new_client("write", count + 10)
  local acked = 0
  -- ackedRaw: the outcome as bytes, without a stanza object.
  c:on("ackedRaw", function() acked = acked + 1 end)
  local called = 0
  c:connect()
  wait_for(function()
    return c:status() == "online" and server.current and server.current.phase == "sink"
  end, 10, "online")
  local sink = server.current
  local heap0, rss0 = lua_kib(), common.status_kib("VmRSS")
  local cpu0, t0 = os.clock(), now()
  local i = 0
  while i < count do
    for _ = 1, math.min(1000, count - i) do
      i = i + 1
      if callbacks then
        local n = i
        assert(c:send(make(size, i), function(ok) if ok and n > 0 then called = called + 1 end end))
      else
        assert(c:send(make(size, i)))
      end
    end
    loop.step(0)
  end
  local send_cpu, send_wall = os.clock() - cpu0, now() - t0
  local bytes = c:sm_state().unacked_bytes
  wait_for(function() return sink.sunk >= bytes end, 120, "the sink to take every stanza")
  local heap1, rss1 = lua_kib(), common.status_kib("VmRSS")
  local st = c:sm_state()
  assert(st.unacked == count, "unacked " .. st.unacked)
  local raw_size = bytes / count

  -- Re-sending after a resumption: the server drops the link, the client resumes (h=0)
  -- and sends everything again, each message with a <delay/>.
  local resumed = false
  c:on("resumed", function() resumed = true end)
  local sessions = #server.conns
  cpu0, t0 = os.clock(), now()
  sink.close()
  wait_for(function() return #server.conns > sessions and server.current.phase == "sink" end, 30,
           "resume")
  local again = server.current
  wait_for(function() return resumed and again.sunk >= bytes end, 300, "the re-sent stanzas")
  local resend_cpu, resend_wall = os.clock() - cpu0, now() - t0

  -- One <a/> for all of them.
  cpu0, t0 = os.clock(), now()
  again.send("<a xmlns='urn:xmpp:sm:3' h='" .. count .. "'/>")
  wait_for(function() return acked == count end, 300, "the acknowledgements")
  assert(called == (callbacks and count or 0), "callbacks called " .. called)
  local ack_cpu, ack_wall = os.clock() - cpu0, now() - t0

  common.result{
    kind = "queue", nominal = size, size = raw_size, count = count, callbacks = callbacks,
    heap_per_stanza = (heap1 - heap0) * 1024 / count,
    rss_per_stanza = (rss1 - rss0) * 1024 / count,
    overhead_per_stanza = (heap1 - heap0) * 1024 / count - raw_size,
    send_us = send_cpu / count * 1e6, send_wall_us = send_wall / count * 1e6,
    resend_us = resend_cpu / count * 1e6, resend_wall_us = resend_wall / count * 1e6,
    ack_us = ack_cpu / count * 1e6, ack_wall_us = ack_wall / count * 1e6,
  }
  close_client(c)
  collectgarbage()
end

for _, size in ipairs(SIZES) do
  for _, count in ipairs(COUNTS) do
    if size * count <= MAX_BYTES then measure(size, count, false) end
  end
end
-- The same with a callback per send, for the smallest stanzas (where the callback's share is
-- the largest).
for _, count in ipairs(COUNTS) do
  if SIZES[1] * count <= MAX_BYTES then measure(SIZES[1], count, true) end
end

-- Persisting: client:send() with each durability mode (the store's record is written before
-- the bytes go to the socket), and Store:queued() alone.
for _, mode in ipairs({ "none", "write", "fsync" }) do
  local n = mode == "fsync" and 500 or 20000
  local c = new_client(mode, n + 10)
  c:connect()
  wait_for(function() return c:status() == "online" and server.current.phase == "sink" end, 10, "online")
  local msgs = {}
  for i = 1, n do msgs[i] = make(200, i) end
  local cpu0, t0 = os.clock(), now()
  for i = 1, n do
    c:send(msgs[i])
    if i % 100 == 0 then loop.step(0) end
  end
  local send_cpu, send_wall = os.clock() - cpu0, now() - t0
  close_client(c)

  local s = assert(store.file(a.dir .. "/persist-" .. mode .. ".sm", { durability = mode }))
  assert(s:load())
  s:enabled({ id = "x", jid = "bench@" .. DOMAIN .. "/q", enabled_at = os.time() })
  local raw = core.serialize(msgs[1])
  cpu0, t0 = os.clock(), now()
  for i = 1, n do s:queued(raw, i + 0.5) end
  local q_cpu, q_wall = os.clock() - cpu0, now() - t0
  cpu0, t0 = os.clock(), now()
  s:acked(n, n)
  local a_cpu, a_wall = os.clock() - cpu0, now() - t0
  s:close()
  common.result{
    kind = "persist", durability = mode, n = n, size = #raw,
    send_us = send_cpu / n * 1e6, send_wall_us = send_wall / n * 1e6,
    queued_us = q_cpu / n * 1e6, queued_wall_us = q_wall / n * 1e6,
    acked_all_us = a_cpu / n * 1e6, acked_all_wall_us = a_wall / n * 1e6,
  }
end

loop.unwatch(accept_watcher)
listener:close()
