--- Named events with prioritised handlers.
-- Handlers run in priority order (higher first, then in the order added); the first handler that
-- returns a non-nil value stops the chain and that value is returned by `fire`. A handler that
-- raises does not break the caller: the error goes to the `on_error` function given to `new`.
-- @module xmppsm.events
local events = {}

local Events = {}
Events.__index = Events

--- Creates an event emitter.
-- @tparam[opt] function on_error called as `on_error(event_name, err)` when a handler raises.
function events.new(on_error)
  return setmetatable({ handlers = {}, on_error = on_error }, Events)
end

--- Adds a handler; adding the same function twice to one event has no effect.
-- @tparam string name event name
-- @tparam function fn handler
-- @tparam[opt=0] number priority higher runs first
function Events:add(name, fn, priority)
  assert(type(name) == "string", "event name must be a string")
  assert(type(fn) == "function", "event handler must be a function")
  local list = self.handlers[name] or {}
  for _, h in ipairs(list) do
    if h.fn == fn then return end
  end
  local entry = { fn = fn, priority = priority or 0 }
  local pos = #list + 1
  while pos > 1 and list[pos - 1].priority < entry.priority do pos = pos - 1 end
  -- A new list, so a fire() in progress keeps iterating the one it started with.
  local copy = table.move(list, 1, #list, 1, {})
  table.insert(copy, pos, entry)
  self.handlers[name] = copy
end

--- Removes a handler. Returns true when it was there.
function Events:remove(name, fn)
  local list = self.handlers[name]
  if not list then return false end
  for i, h in ipairs(list) do
    if h.fn == fn then
      local copy = table.move(list, 1, #list, 1, {})
      table.remove(copy, i)
      self.handlers[name] = #copy > 0 and copy or nil
      return true
    end
  end
  return false
end

--- Whether any handler listens to `name`.
function Events:has(name)
  return self.handlers[name] ~= nil
end

--- Calls the handlers of `name` with the extra arguments.
-- @return the first non-nil value a handler returned
function Events:fire(name, ...)
  local list = self.handlers[name]
  if not list then return nil end
  for i = 1, #list do
    local ok, result = pcall(list[i].fn, ...)
    if not ok then
      if self.on_error then self.on_error(name, result) end
    elseif result ~= nil then
      return result
    end
  end
  return nil
end

return events
