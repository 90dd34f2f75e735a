-- Drives xmppsm's loop from a spec until something happens, or fails the spec after a timeout.
local core = require "xmppsm.core"
local loop = require "xmppsm.loop"

local wait = {}

--- Steps the loop until `cond()` returns a true value (returned), or raises after `timeout`
-- seconds naming `what`.
function wait.until_true(cond, timeout, what)
  local deadline = core.monotime() + (timeout or 10)
  while true do
    local v = cond()
    if v then return v end
    if core.monotime() > deadline then
      error("timed out after " .. (timeout or 10) .. " s waiting for " .. (what or "a condition"), 2)
    end
    loop.step(0.02)
  end
end

--- Steps the loop for `seconds`.
function wait.for_seconds(seconds)
  local deadline = core.monotime() + seconds
  while core.monotime() < deadline do loop.step(0.02) end
end

--- Records every event of `client` named in `names` into a list of {name, ...}.
function wait.recorder(client, names)
  local log = {}
  for _, name in ipairs(names) do
    client:on(name, function(...) log[#log + 1] = table.pack(name, ...) end)
  end
  function log.count(name)
    local n = 0
    for _, e in ipairs(log) do if e[1] == name then n = n + 1 end end
    return n
  end
  function log.last(name)
    for i = #log, 1, -1 do if log[i][1] == name then return table.unpack(log[i], 2, log[i].n) end end
  end
  return log
end

return wait
