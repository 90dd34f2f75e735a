--- The event loop: sockets to watch, timers on the monotonic clock, and coroutines.
-- One loop per process drives every client; `xmppsm.run()` and `client:step()` call into it.
-- @module xmppsm.loop
local core = require "xmppsm.core"
local socket = require "socket"

local monotime = core.monotime
local select = socket.select

local loop = {}

local watchers = {}        -- socket -> watcher
local watcher_list = {}    -- the same watchers, in an array for select()
local timers = {}          -- binary heap ordered by deadline, then creation order
local timer_seq = 0
local active = 0           -- open clients: run() returns when none are left
local spawned = setmetatable({}, { __mode = "k" })  -- coroutines started by loop.spawn

--- Called with an error message when a timer or spawned function raises.
-- Replace it to route such errors elsewhere; the default writes to stderr.
function loop.on_error(err)
  io.stderr:write("xmppsm: ", tostring(err), "\n")
end

-- Timers -------------------------------------------------------------------------------------

local function before(a, b)
  if a.deadline ~= b.deadline then return a.deadline < b.deadline end
  return a.seq < b.seq
end

local function heap_push(t)
  local i = #timers + 1
  timers[i] = t
  while i > 1 do
    local parent = i // 2
    if not before(timers[i], timers[parent]) then break end
    timers[i], timers[parent] = timers[parent], timers[i]
    i = parent
  end
end

local function heap_pop()
  local n = #timers
  local top = timers[1]
  timers[1] = timers[n]
  timers[n] = nil
  n = n - 1
  local i = 1
  while true do
    local l, r, smallest = 2 * i, 2 * i + 1, i
    if l <= n and before(timers[l], timers[smallest]) then smallest = l end
    if r <= n and before(timers[r], timers[smallest]) then smallest = r end
    if smallest == i then break end
    timers[i], timers[smallest] = timers[smallest], timers[i]
    i = smallest
  end
  return top
end

local Timer = {}
Timer.__index = Timer

--- Stops a timer; it will not fire again. Safe to call more than once.
function Timer:cancel()
  self.cancelled = true
end

local function add_timer(seconds, fn, interval)
  assert(type(seconds) == "number" and seconds >= 0, "timer delay must be a number >= 0")
  assert(type(fn) == "function", "timer callback must be a function")
  timer_seq = timer_seq + 1
  local t = setmetatable({ deadline = monotime() + seconds, seq = timer_seq, fn = fn,
                           interval = interval }, Timer)
  heap_push(t)
  return t
end

--- Calls `fn()` once after `seconds`. Returns a timer with `:cancel()`.
function loop.after(seconds, fn)
  return add_timer(seconds, fn, nil)
end

--- Calls `fn()` every `seconds` until cancelled. Returns a timer with `:cancel()`.
function loop.every(seconds, fn)
  assert(type(seconds) == "number" and seconds > 0, "interval must be a number > 0")
  return add_timer(seconds, fn, seconds)
end

local function run_due_timers(now)
  while timers[1] and (timers[1].cancelled or timers[1].deadline <= now) do
    local t = heap_pop()
    if not t.cancelled then
      if t.interval then
        -- Re-armed before the call so the callback may cancel it.
        t.deadline = math.max(t.deadline + t.interval, now)
        timer_seq = timer_seq + 1
        t.seq = timer_seq
        heap_push(t)
      else
        t.cancelled = true
      end
      local ok, err = pcall(t.fn)
      if not ok then loop.on_error(err) end
    end
  end
end

local function next_deadline()
  while timers[1] and timers[1].cancelled do heap_pop() end
  return timers[1] and timers[1].deadline
end

-- Sockets ------------------------------------------------------------------------------------

--- Watches a socket. `w` is a table with `sock`, and `on_readable()`, `on_writable()` methods
-- and a boolean field `want_write` (checked each step); `want_read` defaults to true.
function loop.watch(w)
  assert(w.sock, "watcher needs a socket")
  if not watchers[w.sock] then
    watchers[w.sock] = w
    watcher_list[#watcher_list + 1] = w
  end
end

--- Stops watching a socket.
function loop.unwatch(w)
  if watchers[w.sock] == w then
    watchers[w.sock] = nil
    for i, other in ipairs(watcher_list) do
      if other == w then table.remove(watcher_list, i) break end
    end
  end
end

--- Counts an open client, so `run()` keeps going; `loop.release()` undoes it.
function loop.retain() active = active + 1 end
function loop.release() active = active - 1 end

--- Waits for socket activity or a timer for at most `timeout` seconds (nil: until the next
-- timer), and handles what happened. Returns the number of sockets handled.
function loop.step(timeout)
  local readers, writers = {}, {}
  local pending_tls = false
  for i = 1, #watcher_list do
    local w = watcher_list[i]
    if w.want_read ~= false then
      readers[#readers + 1] = w.sock
      -- TLS may hold decrypted bytes that select() cannot see.
      if w.sock.dirty and w.sock:dirty() then pending_tls = true end
    end
    if w.want_write then writers[#writers + 1] = w.sock end
  end

  local now = monotime()
  local deadline = next_deadline()
  local wait = timeout
  if deadline then
    local until_timer = math.max(0, deadline - now)
    wait = wait and math.min(wait, until_timer) or until_timer
  end
  if pending_tls then wait = 0 end
  if #readers == 0 and #writers == 0 then
    if wait and wait > 0 then socket.sleep(wait) end
    run_due_timers(monotime())
    return 0
  end

  local readable, writable = select(readers, writers, wait)
  local handled = 0
  for _, sock in ipairs(writable) do
    local w = watchers[sock]
    if w then handled = handled + 1; w:on_writable() end
  end
  for _, sock in ipairs(readable) do
    local w = watchers[sock]
    if w then handled = handled + 1; w:on_readable() end
  end
  if pending_tls then
    for i = #watcher_list, 1, -1 do
      local w = watcher_list[i]
      if w and w.sock.dirty and w.sock:dirty() and not readable[w.sock] then w:on_readable() end
    end
  end
  run_due_timers(monotime())
  return handled
end

--- Runs until every client is closed.
function loop.run()
  while active > 0 do
    loop.step(nil)
  end
end

-- Coroutines ---------------------------------------------------------------------------------

--- Runs `fn(...)` in a coroutine driven by the loop, where `client:request()` and `loop.sleep()`
-- can wait without blocking other clients. Returns the coroutine.
function loop.spawn(fn, ...)
  local co = coroutine.create(fn)
  spawned[co] = true
  local ok, err = coroutine.resume(co, ...)
  if not ok then loop.on_error(debug.traceback(co, err)) end
  return co
end

--- Whether the running code may wait (it runs in a coroutine from `loop.spawn`).
function loop.can_wait()
  local co = coroutine.running()
  return spawned[co] == true
end

--- Inside a spawned coroutine: suspends it until `resume(...)` is called by whoever `arm`
-- hands it to, and returns the values given to `resume`.
function loop.wait(arm)
  local co = coroutine.running()
  assert(spawned[co], "waiting needs a coroutine started by xmppsm.spawn")
  local done, waiting, early = false, false, nil
  arm(function(...)
    if done then return end
    done = true
    if not waiting then
      -- Called back before we yielded: hand the values over without a resume.
      early = table.pack(...)
      return
    end
    local ok, err = coroutine.resume(co, ...)
    if not ok then loop.on_error(debug.traceback(co, err)) end
  end)
  if early then return table.unpack(early, 1, early.n) end
  waiting = true
  return coroutine.yield()
end

--- Inside a spawned coroutine: waits `seconds` without blocking the loop.
function loop.sleep(seconds)
  return loop.wait(function(resume) loop.after(seconds, resume) end)
end

return loop
