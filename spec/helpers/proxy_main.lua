-- The fault-injecting TCP proxy, run as its own process by spec/helpers/proxy.lua so that it
-- keeps forwarding (or misbehaving) while the client under test blocks in the spec process.
--
--   lua5.4 proxy_main.lua TARGET_HOST TARGET_PORT PARENT_PID [LISTEN_PORT]
--
-- It listens on 127.0.0.1 (LISTEN_PORT, or a free one) and on a control port, prints
-- "READY <listen port> <control port>" on stdout, and serves one line-based command per line
-- on the control connection, answering "OK ..." or "ERR ...". It exits when its last
-- controller disconnects, when none connects within 10 s, when PARENT_PID ends (checked five
-- times a second), or on "quit". Everything is non-blocking around one socket.select(), which
-- sleeps until a socket, a timer or the next parent check needs it.
--
-- Commands (DIR is c2s, client to server, or s2c; MODE is rst, or fin):
--   cut [MODE]                close every current connection now (default rst)
--   cut_after N DIR [MODE]    forward exactly N more bytes in DIR on every current connection,
--                             and N bytes from the start on every new one, then close it
--                             (default rst); stays armed until "resume"
--   silence                   stop forwarding both ways, closing nothing; new connections are
--                             accepted and held silent too
--   refuse [SECONDS] [HOW]    refuse new connections for SECONDS (0 or none: until "resume");
--                             HOW = unbind (stop listening: ECONNREFUSED, the default; the
--                             same port is bound again afterwards), rst (accept and reset)
--                             or fin (accept and close)
--   resume                    undo silence, cut_after, refuse and pending "after" commands
--   after SECONDS COMMAND...  run COMMAND later (e.g. "after 0.5 cut"), answer OK now
--   stats                     OK accepted=N active=N refused=N cuts=N c2s=BYTES s2c=BYTES
--   quit                      exit
-- Bytes counted in stats are bytes written to the other side.
--
-- With MODE rst the socket is closed with SO_LINGER 0. Like any reset, that drops what the
-- kernel has not yet delivered; on loopback data moves into the peer's receive buffer at
-- once, so the receiver still gets exactly N bytes unless its buffer is full.

local socket = require "socket"
local system = require "system"
-- A network does not delay acknowledgements, but a relay's own socket would (about 40 ms,
-- whenever the relay has nothing to send back), and a server using Nagle's algorithm would
-- wait for them: ACK at once, as the client does (xmppsm.core, when it is built).
local has_core, core = pcall(require, "xmppsm.core")
local quickack = has_core and core.tcp_quickack or function() end

local target_host, target_port = arg[1], tonumber(arg[2])
local parent_pid = tonumber(arg[3])
local listen_port = tonumber(arg[4] or 0)
assert(target_host and target_port and parent_pid,
  "usage: proxy_main.lua TARGET_HOST TARGET_PORT PARENT_PID [LISTEN_PORT]")

local BUFFER_LIMIT = 64 * 1024 -- per direction; a full buffer stops reading from its source
local READ_SIZE = 16 * 1024
local CONTROLLER_GRACE = 10
local FIN_DRAIN_TIMEOUT = 5

local now = system.monotime

local function log(fmt, ...)
  io.stderr:write(string.format("%.3f ", now()), string.format(fmt, ...), "\n")
  io.stderr:flush()
end

local function bind(port)
  local server, err = socket.bind("127.0.0.1", port, 64)
  if not server then return nil, err end
  server:settimeout(0)
  return server
end

local listener = assert(bind(listen_port))
listen_port = select(2, listener:getsockname())
local control = assert(bind(0))
io.stdout:write("READY ", listen_port, " ", select(2, control:getsockname()), "\n")
io.stdout:flush()

local started = now()
local controllers = {}   -- control connections: { sock, inbuf }
local had_controller = false
local conns = {}         -- forwarded connection pairs, in accept order
local draining = {}      -- sockets closed with FIN, read and discarded until the peer closes
local timers = {}        -- { at, line }
local next_id = 0
local running = true

local silent = false
local rules = {}         -- rules[dir] = { n = bytes, mode = "rst"|"fin" } (cut_after)
local refuse_until, refuse_how = nil, nil -- refuse_until: monotime, or math.huge
local stats = { accepted = 0, refused = 0, cuts = 0, c2s = 0, s2c = 0 }

local OTHER = { c2s = "s2c", s2c = "c2s" }

local function hard_close(sock)
  -- SO_LINGER 0: close() sends RST at once and drops anything unsent
  sock:setoption("linger", { on = true, timeout = 0 })
  sock:close()
end

local function soft_close(sock)
  -- FIN after whatever is queued. A plain close() with unread input would send RST instead,
  -- so shut the sending side and keep reading until the peer closes too.
  sock:shutdown("send")
  draining[#draining + 1] = { sock = sock, deadline = now() + FIN_DRAIN_TIMEOUT }
end

local function close_conn(c, mode, why)
  if c.closed then return end
  c.closed = true
  for _, s in ipairs({ c.client, c.server }) do
    if mode == "fin" then soft_close(s) else hard_close(s) end
  end
  log("conn %d closed (%s, %s) c2s=%d s2c=%d", c.id, mode, why, c.sent.c2s, c.sent.s2c)
end

local function cut_conn(c, mode, why)
  if c.closed then return end
  stats.cuts = stats.cuts + 1
  close_conn(c, mode, why)
end

local function arm(c, dir, rule)
  c.budget[dir] = rule and { n = rule.n, mode = rule.mode } or nil
end

local function accept_client()
  local client = listener:accept()
  if not client then return end
  if refuse_until then
    stats.refused = stats.refused + 1
    if refuse_how == "fin" then client:close() else hard_close(client) end
    return
  end
  stats.accepted = stats.accepted + 1
  local server = socket.tcp()
  server:settimeout(2)
  local ok, err = server:connect(target_host, target_port)
  if not ok then
    -- as if the server were down: the client sees a reset
    log("upstream connect failed: %s", tostring(err))
    server:close()
    hard_close(client)
    return
  end
  client:settimeout(0)
  server:settimeout(0)
  client:setoption("tcp-nodelay", true)
  server:setoption("tcp-nodelay", true)
  next_id = next_id + 1
  local c = {
    id = next_id, client = client, server = server,
    buf = { c2s = "", s2c = "" }, eof = { c2s = false, s2c = false },
    shut = { c2s = false, s2c = false }, sent = { c2s = 0, s2c = 0 }, budget = {},
  }
  c.src = { c2s = client, s2c = server }
  c.dst = { c2s = server, s2c = client }
  arm(c, "c2s", rules.c2s)
  arm(c, "s2c", rules.s2c)
  conns[#conns + 1] = c
  log("conn %d accepted", c.id)
end

local function set_refuse(seconds, how)
  refuse_how = how
  refuse_until = seconds > 0 and now() + seconds or math.huge
  if how == "unbind" and listener then
    listener:close()
    listener = nil
  end
end

local function end_refuse()
  refuse_until, refuse_how = nil, nil
end

local function keep_listening()
  if listener or refuse_how == "unbind" then return end
  -- SO_REUSEADDR (set by socket.bind) lets us take the same port back at once
  listener = bind(listen_port)
  if not listener then log("rebind of %d failed, retrying", listen_port) end
end

local commands = {}
local dispatch

function commands.cut(args)
  local mode = args[1] or "rst"
  if mode ~= "rst" and mode ~= "fin" then return "ERR mode must be rst or fin" end
  local n = 0
  for _, c in ipairs(conns) do
    if not c.closed then
      cut_conn(c, mode, "cut")
      n = n + 1
    end
  end
  return "OK cut=" .. n
end

function commands.cut_after(args)
  local n, dir, mode = tonumber(args[1]), args[2], args[3] or "rst"
  if not n or n < 0 or n ~= math.floor(n) then return "ERR byte count must be >= 0" end
  if not OTHER[dir] then return "ERR direction must be c2s or s2c" end
  if mode ~= "rst" and mode ~= "fin" then return "ERR mode must be rst or fin" end
  rules[dir] = { n = math.tointeger(n), mode = mode }
  for _, c in ipairs(conns) do arm(c, dir, rules[dir]) end
  return "OK"
end

function commands.silence()
  silent = true
  return "OK"
end

function commands.refuse(args)
  local seconds = tonumber(args[1] or 0)
  local how = args[2] or "unbind"
  if not seconds or seconds < 0 then return "ERR seconds must be >= 0" end
  if how ~= "unbind" and how ~= "rst" and how ~= "fin" then
    return "ERR how must be unbind, rst or fin"
  end
  set_refuse(seconds, how)
  return "OK"
end

function commands.resume()
  silent = false
  rules = {}
  for _, c in ipairs(conns) do c.budget = {} end
  timers = {}
  end_refuse()
  keep_listening()
  return "OK"
end

function commands.after(args)
  local seconds = tonumber(args[1])
  if not seconds or seconds < 0 or not args[2] then return "ERR usage: after SECONDS COMMAND" end
  if not commands[args[2]] or args[2] == "after" then return "ERR unknown command " .. args[2] end
  timers[#timers + 1] = { at = now() + seconds, line = table.concat(args, " ", 2) }
  return "OK"
end

function commands.stats()
  local active = 0
  for _, c in ipairs(conns) do if not c.closed then active = active + 1 end end
  return string.format("OK accepted=%d active=%d refused=%d cuts=%d c2s=%d s2c=%d listening=%d",
    stats.accepted, active, stats.refused, stats.cuts, stats.c2s, stats.s2c, listener and 1 or 0)
end

function commands.quit()
  running = false
  return "OK"
end

function dispatch(line)
  local words = {}
  for w in line:gmatch("%S+") do words[#words + 1] = w end
  local name = table.remove(words, 1)
  if not name then return "ERR empty command" end
  local fn = commands[name]
  if not fn then return "ERR unknown command " .. name end
  log("command: %s", line)
  return fn(words)
end

local function serve_controller(ctl)
  local data, err, partial = ctl.sock:receive(4096)
  data = data or partial
  if data and #data > 0 then ctl.inbuf = ctl.inbuf .. data end
  while true do
    local line, rest = ctl.inbuf:match("^([^\n]*)\n(.*)$")
    if not line then break end
    ctl.inbuf = rest
    local reply = dispatch((line:gsub("\r$", "")))
    -- replies are short: a blocking send cannot stall on a control socket's empty buffer
    ctl.sock:settimeout(1)
    ctl.sock:send(reply .. "\n")
    ctl.sock:settimeout(0)
  end
  if err == "closed" then return false end
  return true
end

-- Moves bytes from buf[dir] to the destination, honouring a cut_after budget.
local function flush(c, dir)
  local budget = c.budget[dir]
  local buf = c.buf[dir]
  if budget and budget.n == 0 and #buf > 0 then
    return cut_conn(c, budget.mode, "cut_after " .. dir)
  end
  if #buf == 0 then return end
  local limit = #buf
  if budget and budget.n < limit then limit = budget.n end
  local last, err, partial_last = c.dst[dir]:send(buf, 1, limit)
  last = last or partial_last or 0
  if last > 0 then
    c.buf[dir] = buf:sub(last + 1)
    c.sent[dir] = c.sent[dir] + last
    stats[dir] = stats[dir] + last
    if budget then
      budget.n = budget.n - last
      if budget.n == 0 then return cut_conn(c, budget.mode, "cut_after " .. dir) end
    end
  end
  if err and err ~= "timeout" then
    close_conn(c, "rst", "send " .. dir .. ": " .. err)
  end
end

local function fill(c, dir)
  local data, err, partial = c.src[dir]:receive(READ_SIZE)
  quickack(c.src[dir]:getfd())
  data = data or partial
  if data and #data > 0 then c.buf[dir] = c.buf[dir] .. data end
  if err == "closed" then
    c.eof[dir] = true
  elseif err and err ~= "timeout" then
    close_conn(c, "rst", "receive " .. dir .. ": " .. err)
  end
end

-- After EOF from one side and an empty buffer, pass the half-close on with a FIN.
local function propagate_eof(c)
  for dir in pairs(OTHER) do
    if c.eof[dir] and not c.shut[dir] and #c.buf[dir] == 0 then
      c.shut[dir] = true
      c.dst[dir]:shutdown("send")
    end
  end
  if c.shut.c2s and c.shut.s2c then close_conn(c, "fin", "both sides closed") end
end

local function parent_alive()
  local f = io.open("/proc/" .. math.tointeger(parent_pid) .. "/stat", "r")
  if not f then return false end
  local line = f:read("l") or ""
  f:close()
  local state = line:match(".*%)%s+(%S)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

local PARENT_CHECK_INTERVAL = 0.2
local next_parent_check = now() + PARENT_CHECK_INTERVAL

while running do
  -- housekeeping: timers, refuse deadline, rebinding, finished pairs
  local t = now()
  local due = {}
  for i = #timers, 1, -1 do
    if timers[i].at <= t then due[#due + 1] = table.remove(timers, i) end
  end
  for i = #due, 1, -1 do dispatch(due[i].line) end
  if refuse_until and t >= refuse_until then end_refuse() end
  keep_listening()
  for i = #conns, 1, -1 do
    if conns[i].closed then table.remove(conns, i) end
  end
  for i = #draining, 1, -1 do
    if t >= draining[i].deadline then
      draining[i].sock:close()
      table.remove(draining, i)
    end
  end
  if t >= next_parent_check then
    next_parent_check = t + PARENT_CHECK_INTERVAL
    if not parent_alive() then
      log("parent %d is gone, exiting", parent_pid)
      break
    end
  end
  if not had_controller and t - started > CONTROLLER_GRACE then
    log("no controller connected, exiting")
    break
  end

  local recvt, sendt = { control }, {}
  local owner = {}
  if listener then recvt[#recvt + 1] = listener end
  for _, ctl in ipairs(controllers) do
    recvt[#recvt + 1] = ctl.sock
    owner[ctl.sock] = ctl
  end
  for _, d in ipairs(draining) do
    recvt[#recvt + 1] = d.sock
    owner[d.sock] = d
  end
  for _, c in ipairs(conns) do
    if not silent then
      for dir in pairs(OTHER) do
        local src, dst = c.src[dir], c.dst[dir]
        if not c.eof[dir] and #c.buf[dir] < BUFFER_LIMIT then
          recvt[#recvt + 1] = src
          owner[src] = owner[src] or { conn = c }
        end
        if #c.buf[dir] > 0 then
          sendt[#sendt + 1] = dst
          owner[dst] = owner[dst] or { conn = c }
        end
      end
    end
  end

  -- wake for the next timer, the refuse deadline and the parent check; never spin
  local wait = math.max(0, next_parent_check - t)
  for _, tm in ipairs(timers) do wait = math.min(wait, math.max(0, tm.at - t)) end
  if refuse_until then wait = math.min(wait, math.max(0, refuse_until - t)) end
  if not listener and refuse_how ~= "unbind" then wait = math.min(wait, 0.05) end

  local readable = socket.select(recvt, sendt, wait)

  for _, s in ipairs(readable) do
    if s == control then
      local sock = control:accept()
      if sock then
        sock:settimeout(0)
        controllers[#controllers + 1] = { sock = sock, inbuf = "" }
        had_controller = true
      end
    elseif s == listener then
      accept_client()
    elseif owner[s] and owner[s].inbuf then
      local ctl = owner[s]
      if not serve_controller(ctl) then
        ctl.sock:close()
        for i, other in ipairs(controllers) do
          if other == ctl then table.remove(controllers, i) break end
        end
        if #controllers == 0 then
          log("controller disconnected, exiting")
          running = false
        end
      end
    elseif owner[s] and owner[s].deadline then
      local _, err = s:receive(READ_SIZE)
      if err and err ~= "timeout" then owner[s].deadline = 0 end
    elseif owner[s] and owner[s].conn then
      local c = owner[s].conn
      if not c.closed and not silent then
        fill(c, s == c.client and "c2s" or "s2c")
      end
    end
  end
  -- try every pending buffer, not only those select() reported: fresh input then goes out
  -- in the same round, and a send that would block just returns "timeout"
  for _, c in ipairs(conns) do
    if not c.closed and not silent then
      for dir in pairs(OTHER) do
        flush(c, dir)
        if c.closed then break end
      end
      if not c.closed then propagate_eof(c) end
    end
  end
end

for _, c in ipairs(conns) do close_conn(c, "rst", "proxy exiting") end
for _, d in ipairs(draining) do d.sock:close() end
if listener then listener:close() end
control:close()
log("exit")
