--- More than 1024 descriptors through the poller and through the loop (select() stops at 1024).
-- Used by spec/core/poll_spec.lua, in its own process when the soft descriptor limit is too low
-- there (run as `lua5.4 spec/helpers/poll_many.lua N`, under `ulimit -n` raised): it prints one
-- line `key=value ...` with what it saw.
-- @module helpers.poll_many
local core = require "xmppsm.core"
local socket = require "socket"

local poll_many = {}

-- Opens `n` UDP sockets on 127.0.0.1 (one descriptor each, writable at once).
local function udp_sockets(n)
  local list = {}
  for i = 1, n do
    local s = assert(socket.udp())
    assert(s:setsockname("127.0.0.1", 0))
    s:settimeout(0)
    list[i] = s
  end
  return list
end

--- Runs the checks with `n` sockets; returns a table of facts.
function poll_many.run(n)
  local facts = {}
  local socks = udp_sockets(n)
  local top = socks[n]
  facts.max_fd = top:getfd()
  for _, backend in ipairs({ "epoll", "poll" }) do
    local ok, p = pcall(core.poller, { backend = backend })
    if ok and p then
      for _, s in ipairs(socks) do assert(p:set(s:getfd(), true, false)) end
      facts[backend .. "_count"] = p:count()
      -- Nothing to read yet.
      local _, quiet = p:wait(0)
      facts[backend .. "_quiet"] = quiet
      -- A datagram to the last socket (descriptor above 1024): exactly that one is reported.
      local sender = assert(socket.udp())
      local host, port = top:getsockname()
      assert(sender:sendto("x", host, tonumber(port)))
      local ready, k = p:wait(1)
      facts[backend .. "_ready"] = k
      facts[backend .. "_ready_fd"] = ready[1]
      facts[backend .. "_ready_flags"] = ready[2]
      top:receivefrom()
      sender:close()
      -- Write interest everywhere: every socket is writable at once.
      for _, s in ipairs(socks) do assert(p:set(s:getfd(), false, true)) end
      local _, all = p:wait(0)
      facts[backend .. "_writable"] = all
      p:close()
    end
  end

  -- The loop: watch every socket, then one datagram arrives on the highest descriptor.
  local loop = require "xmppsm.loop"
  local seen = {}
  local watchers = {}
  for i, s in ipairs(socks) do
    local w = { sock = s, want_write = false }
    function w.on_readable() seen[#seen + 1] = i; s:receivefrom() end
    function w.on_writable() end
    watchers[i] = w
    loop.watch(w)
  end
  loop.step(0)
  facts.loop_quiet = #seen
  local sender = assert(socket.udp())
  local host, port = top:getsockname()
  assert(sender:sendto("y", host, tonumber(port)))
  local deadline = core.monotime() + 2
  while #seen == 0 and core.monotime() < deadline do loop.step(0.1) end
  facts.loop_seen = #seen
  facts.loop_seen_index = seen[1]
  sender:close()
  for _, w in ipairs(watchers) do loop.unwatch(w) end
  for _, s in ipairs(socks) do s:close() end
  return facts
end

--- The soft and hard limits on open descriptors of this process (from /proc), or nil.
function poll_many.limits()
  local f = io.open("/proc/self/limits", "r")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  local soft, hard = text:match("Max open files%s+(%S+)%s+(%S+)")
  return tonumber(soft) or math.huge, tonumber(hard) or math.huge
end

if arg and arg[0] and arg[0]:match("poll_many%.lua$") then
  local facts = poll_many.run(tonumber(arg[1]) or 1100)
  local parts = {}
  for k, v in pairs(facts) do parts[#parts + 1] = k .. "=" .. tostring(v) end
  table.sort(parts)
  print(table.concat(parts, " "))
end

return poll_many
