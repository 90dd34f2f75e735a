--- A fault-injecting TCP proxy between the client under test and a server, for specs.
--
-- The proxy runs as its own Lua process (`proxy_main.lua`), so it keeps forwarding, cutting
-- or stalling while the spec process blocks inside the client. Each method here sends one
-- line on the control connection and waits for the answer, so when a method returns the
-- proxy already behaves the new way. See proxy_main.lua for the protocol.
--
--     local p = proxy.start{ target_port = server.port }
--     -- connect the client to p.host, p.port
--     p:cut_after(100, "s2c")      -- the client gets 100 more bytes, then a reset
--     p:resume()
--
-- The proxy ends when `stop` is called, when its control connection closes, or when the spec
-- process is gone, so it cannot outlive a crashed run.
-- @module helpers.proxy

local socket = require "socket"
local lfs = require "lfs"
local process = require "helpers.process"

local proxy = {}

local Proxy = {}
Proxy.__index = Proxy

-- proxy_main.lua sits next to this file, wherever busted was started from; made absolute
-- now, so a later chdir cannot lose it.
local main_path = (debug.getinfo(1, "S").source:match("^@(.*)proxy%.lua$") or "./")
  .. "proxy_main.lua"
if not main_path:match("^/") then main_path = lfs.currentdir() .. "/" .. main_path end

--- Starts a proxy on 127.0.0.1 that forwards to `target_host`:`target_port`.
-- @tparam table opts `target_port` (required), `target_host` ("127.0.0.1"),
--   `listen_port` (default: a free port chosen by the proxy itself), `lua` ("lua5.4")
-- @treturn table a proxy with `host`, `port`, `pid`, `process` and the control methods
function proxy.start(opts)
  assert(opts and opts.target_port, "target_port is required")
  local dir = process.tmpdir("xmppsm-proxy")
  local proc = process.spawn({ opts.lua or "lua5.4", main_path, opts.target_host or "127.0.0.1",
    tostring(opts.target_port), tostring(process.own_pid()), tostring(opts.listen_port or 0) }, {
    stdout = dir .. "/stdout.txt", stderr = dir .. "/stderr.txt", name = "proxy",
  })
  local port, control_port
  process.wait_until(function()
    port, control_port = proc:stdout_text():match("READY (%d+) (%d+)")
    return port or not proc:alive()
  end, 5)
  if not port then
    proc:stop(1)
    error("proxy did not start:\n" .. proc:stderr_text(), 2)
  end
  local ctl = socket.tcp()
  ctl:settimeout(5)
  local ok, err = ctl:connect("127.0.0.1", tonumber(control_port))
  if not ok then
    proc:stop(1)
    error("cannot reach the proxy's control port: " .. tostring(err), 2)
  end
  return setmetatable({
    host = "127.0.0.1",
    port = tonumber(port),
    control_port = tonumber(control_port),
    pid = proc.pid,
    process = proc,
    ctl = ctl,
  }, Proxy)
end

--- Sends one control command and returns the text after "OK"; raises on "ERR" or no answer.
-- @tparam string line e.g. "cut_after 10 s2c rst"
-- @treturn string
function Proxy:command(line)
  assert(self.ctl, "proxy control connection is closed")
  assert(not line:find("\n"), "one line only")
  local ok, err = self.ctl:send(line .. "\n")
  if not ok then error("proxy control send failed: " .. tostring(err) .. self:_tail(), 2) end
  local reply, rerr = self.ctl:receive("*l")
  if not reply then error("proxy control receive failed: " .. tostring(rerr) .. self:_tail(), 2) end
  local rest = reply:match("^OK ?(.*)$")
  if not rest then error("proxy: " .. line .. ": " .. reply, 2) end
  return rest
end

function Proxy:_tail()
  return "\n--- proxy stderr:\n" .. process.tail(self.process:stderr_text(), 20)
end

--- Closes every current connection now.
-- @tparam[opt="rst"] string mode "rst" (reset) or "fin" (orderly close)
-- @treturn number how many connections were cut
function Proxy:cut(mode)
  return tonumber(self:command("cut " .. (mode or "rst")):match("cut=(%d+)"))
end

--- Forwards exactly `n` more bytes in one direction, then closes the connection.
-- Applies to current connections (counting from now) and to new ones (counting from their
-- start) until `resume`.
-- @tparam number n bytes
-- @tparam string dir "c2s" (client to server) or "s2c"
-- @tparam[opt="rst"] string mode "rst" or "fin"
function Proxy:cut_after(n, dir, mode)
  self:command(("cut_after %d %s %s"):format(n, dir, mode or "rst"))
end

--- Stops forwarding in both directions without closing anything (a link gone dead with no
-- FIN or RST). New connections are accepted and held silent as well.
function Proxy:silence()
  self:command("silence")
end

--- Refuses new connections.
-- @tparam[opt=0] number seconds how long; 0 means until `resume`
-- @tparam[opt="unbind"] string how "unbind" (stop listening, so connect fails with
--   "connection refused"), "rst" (accept, then reset) or "fin" (accept, then close)
function Proxy:refuse(seconds, how)
  self:command(("refuse %s %s"):format(seconds or 0, how or "unbind"))
end

--- Back to normal forwarding: ends silence, refusal, cut_after rules and pending `after`s.
function Proxy:resume()
  self:command("resume")
end

--- Runs a command later, inside the proxy, while the spec is blocked elsewhere.
-- @tparam number seconds
-- @tparam string cmd a command line such as "cut rst" or "silence"
function Proxy:after(seconds, cmd)
  self:command(("after %s %s"):format(seconds, cmd))
end

--- Counters since start.
-- @treturn table `accepted`, `active`, `refused`, `cuts`, `c2s` and `s2c` (bytes forwarded),
--   `listening` (0 or 1)
function Proxy:stats()
  local t = {}
  for k, v in self:command("stats"):gmatch("(%w+)=(%d+)") do t[k] = tonumber(v) end
  return t
end

--- Text the proxy logged (connections, commands, cuts), for failure messages.
function Proxy:log()
  return self.process:stderr_text()
end

--- Whether the proxy process is running.
function Proxy:alive()
  return self.process:alive()
end

--- Stops the proxy: asks it to quit, then makes sure by pid.
function Proxy:stop()
  if self.ctl then
    self.ctl:settimeout(1)
    self.ctl:send("quit\n")
    self.ctl:close()
    self.ctl = nil
  end
  return self.process:stop(2)
end

return proxy
