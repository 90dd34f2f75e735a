-- The floor: a bare XMPP client with no XML parser (LuaSocket, LuaSec and string matching),
-- doing exactly the workload of xmppsm_client.lua: the same messages, stream management on,
-- at most `window` unacknowledged, done when every message arrived and is acknowledged.
-- What it skips is what a library is for: no parsing beyond the few patterns below, no stanza
-- objects, no events, no persistence, no certificate name check, PLAIN instead of SCRAM, no
-- resumption. Each pump sends its batch of messages and one <r/> in a single write.
--
--   lua5.4 bench/e2e/floor_client.lua (same arguments as xmppsm_client.lua)
package.path = "lua/?.lua;lua/?/init.lua;bench/?.lua;" .. package.path
package.cpath = "./?.so;" .. package.cpath

local socket = require "socket"
local ssl = require "ssl"
local mime = require "mime"
local common = require "e2e.common"

local a = common.args(arg)
local N, WINDOW = a.n or 20000, a.window or 1000
local now = socket.gettime -- wall clock is fine for this short run; xmppsm uses monotonic

local SM = "urn:xmpp:sm:3"

-- Blocking reads until `pattern` matches the bytes received on this stream so far.
local function read_until(c, pattern)
  while true do
    local s, e = c.buf:find(pattern)
    if s then
      local before = c.buf:sub(1, e)
      c.buf = c.buf:sub(e + 1)
      return before
    end
    local data, err, partial = c.sock:receive(4096)
    data = data or partial
    if data and #data > 0 then c.buf = c.buf .. data end
    if err == "timeout" or err == "wantread" then
      if not (data and #data > 0) then socket.select({ c.sock }, nil, 1) end
    elseif err then
      error("read failed: " .. tostring(err))
    end
  end
end

local function open_stream(c)
  c.sock:send(string.format("<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    .. "xmlns:stream='http://etherx.jabber.org/streams' to='%s' version='1.0'>", a.domain))
  read_until(c, "</stream:features>")
end

local function login(user)
  local tcp = assert(socket.tcp())
  tcp:setoption("tcp-nodelay", true)
  assert(tcp:connect(a.host, a.port))
  tcp:settimeout(0)
  local c = { sock = tcp, buf = "", user = user }
  open_stream(c)
  tcp:send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
  read_until(c, "<proceed[^>]*>")
  local conn = assert(ssl.wrap(tcp, { mode = "client", protocol = "any", verify = { "peer" },
                                      cafile = a.cafile, options = { "no_sslv2", "no_sslv3" } }))
  conn:sni(a.domain)
  conn:settimeout(5)
  assert(conn:dohandshake())
  conn:settimeout(0)
  c.sock = conn
  open_stream(c)
  conn:send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
    .. mime.b64("\0" .. user .. "\0pw-" .. user) .. "</auth>")
  read_until(c, "<success[^>]*>")
  open_stream(c)
  conn:send("<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
    .. "<resource>bench</resource></bind></iq>")
  read_until(c, "</iq>")
  conn:send("<enable xmlns='" .. SM .. "' resume='true'/>")
  read_until(c, "<enabled[^>]*>")
  c.jid = user .. "@" .. a.domain .. "/bench"
  c.inbound = 0
  return c
end

local sender = login("alice")
local receiver = sender
if a.to == "other" then receiver = login("bob") end
local conns = { sender }
if receiver ~= sender then conns[2] = receiver end

local sent, acked, arrived = 0, 0, 0
local t_sent, lat_ack, lat_arr = {}, {}, {}
local r_out = false

-- Consumes the complete top-level elements at the start of c.buf.
local function process(c)
  local buf, pos = c.buf, 1
  local out = nil
  while true do
    local s, e, name = buf:find("^%s*<([%w:]+)", pos)
    if not s then break end
    if name == "message" then
      local ms, me = buf:find("</message>", e, true)
      if not ms then break end
      local i = tonumber(buf:sub(e, me):match("<body>b(%d+)</body>"))
      c.inbound = c.inbound + 1
      if i and t_sent[i] then
        arrived = arrived + 1
        lat_arr[#lat_arr + 1] = now() - t_sent[i]
      end
      pos = me + 1
    else
      local ts, te = buf:find("/>", e, true)
      if not ts then break end
      if name == "a" then
        local h = tonumber(buf:sub(e, te):match("h='(%d+)'"))
        local t = now()
        for k = acked + 1, h do lat_ack[#lat_ack + 1] = t - t_sent[k] end
        acked = h
        r_out = false
      elseif name == "r" then
        out = (out or "") .. "<a xmlns='" .. SM .. "' h='" .. c.inbound .. "'/>"
      end
      pos = te + 1
    end
  end
  c.buf = buf:sub(pos)
  if out then c.sock:send(out) end
end

local function pump()
  if sent >= N or sent - acked >= WINDOW then return end
  local parts = {}
  while sent < N and sent - acked < WINDOW do
    sent = sent + 1
    t_sent[sent] = now()
    parts[#parts + 1] = "<message to='" .. receiver.jid .. "' type='chat'><body>b" .. sent
      .. "</body></message>"
  end
  if not r_out then
    parts[#parts + 1] = "<r xmlns='" .. SM .. "'/>"
    r_out = true
  end
  local data, i = table.concat(parts), 1
  while i <= #data do
    local last, err, partial = sender.sock:send(data, i)
    local done = last or partial
    if done then i = done + 1 end
    if err and err ~= "timeout" and err ~= "wantwrite" then error("write failed: " .. err) end
    if i <= #data then socket.select(nil, { sender.sock }, 1) end
  end
end

local cpu0, pcpu0, t0 = common.cpu_seconds(), common.cpu_seconds(a.prosody_pid), now()
local socks = {}
for i, c in ipairs(conns) do socks[i] = c.sock end
while acked < N or arrived < N do
  pump()
  local readable = socket.select(socks, nil, 1)
  for _, c in ipairs(conns) do
    if readable[c.sock] or c.sock:dirty() then
      while true do
        local data, err, partial = c.sock:receive(65536)
        data = data or partial
        if data and #data > 0 then c.buf = c.buf .. data end
        if err then break end
      end
      process(c)
    end
  end
  -- Stream management: once the window is drained by acks, ask again.
  if sent > acked and not r_out then
    sender.sock:send("<r xmlns='" .. SM .. "'/>")
    r_out = true
  end
  if now() - t0 > (a.timeout or 300) then error("timed out") end
end
local t1, cpu1, pcpu1 = now(), common.cpu_seconds(), common.cpu_seconds(a.prosody_pid)

local r = {
  impl = "floor", to = a.to, n = N, window = WINDOW, failed = 0,
  seconds = t1 - t0,
  msgs_per_s = N / (t1 - t0),
  cpu_us_per_msg = (cpu1 - cpu0) / N * 1e6,
  prosody_cpu_us_per_msg = pcpu0 and (pcpu1 - pcpu0) / N * 1e6 or -1,
  peak_rss_kib = common.status_kib("VmHWM"),
}
common.latencies(r, "ack", lat_ack)
common.latencies(r, "arrival", lat_arr)
common.result(r)
for _, c in ipairs(conns) do
  c.sock:settimeout(1)
  c.sock:send("<a xmlns='" .. SM .. "' h='" .. c.inbound .. "'/></stream:stream>")
  c.sock:close()
end
