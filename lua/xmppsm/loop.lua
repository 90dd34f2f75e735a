--- The event loop: sockets to watch, timers on the monotonic clock, and coroutines.
-- One loop per process drives every client; `xmppsm.run()` and `client:step()` call into it.
-- @module xmppsm.loop
local core = require "xmppsm.core"
local socket = require "socket"

local monotime = core.monotime

local loop = {}

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
-- Readiness comes from the core's poller (epoll on Linux, poll() elsewhere), keyed by each
-- socket's descriptor: no 1024-descriptor limit as with select(), and on Linux a step costs
-- O(sockets ready + watchers touched), not O(sockets watched). A watcher's interest
-- (`want_read`, `want_write`) is registered with the kernel and re-read only when it may have
-- changed: when it is watched, after each of its handlers ran, and on `loop.update(w)`.

local poller = assert(core.poller())
local by_sock = {}         -- socket -> watcher
local by_fd = {}           -- descriptor -> watcher
local sock_of = {}         -- watcher -> the socket it was watched with
local fd_of = {}           -- watcher -> its descriptor (false when it had none)
local mask_of = {}         -- watcher -> interest registered with the poller: 1 read, 2 write
local registered = 0       -- watchers with a non-zero interest registered
local touched, touched_n, is_touched = {}, 0, {}   -- watchers to re-read before the next wait
local ready_buf, batch_buf = {}, {}                -- reused by steps that are not nested
local depth = 0            -- nested loop.step() calls (a handler may step the loop itself)

local function touch(w)
  if not is_touched[w] then
    is_touched[w] = true
    touched_n = touched_n + 1
    touched[touched_n] = w
  end
end

-- Work deferred to the end of the current step (loop.defer), in order.
local deferred, deferred_n = {}, 0

--- Inside a loop step (a handler, a timer, a coroutine the loop resumed): queues `fn()` to run
-- once the step's handlers and timers are done, before the loop waits again, and returns true.
-- Outside a step returns false and queues nothing: the caller does the work at once. The
-- transport uses it to write what a whole step produced in one write.
function loop.defer(fn)
  if depth == 0 then return false end
  deferred_n = deferred_n + 1
  deferred[deferred_n] = fn
  return true
end

local function run_deferred()
  while deferred_n > 0 do
    local list, n = deferred, deferred_n
    deferred, deferred_n = {}, 0
    for i = 1, n do
      local ok, err = pcall(list[i])
      if not ok then loop.on_error(err) end
    end
  end
end

local function set_mask(w, fd, want)
  local old = mask_of[w]
  if want == old then return end
  local ok = poller:set(fd, want & 1 ~= 0, want & 2 ~= 0)
  -- A socket closed behind the loop's back cannot be registered: select() skipped those too.
  if not ok then want = 0 end
  if old ~= 0 and want == 0 then registered = registered - 1
  elseif old == 0 and want ~= 0 then registered = registered + 1 end
  mask_of[w] = want
end

-- Brings the poller up to date with a touched watcher; returns true when its socket holds
-- bytes already read from the kernel (TLS records decrypted, LuaSocket's buffer) that no
-- poller can see.
local function sync(w)
  if by_sock[sock_of[w]] ~= w then return false end
  local reads = w.want_read ~= false
  local fd = fd_of[w]
  if fd and by_fd[fd] == w then
    set_mask(w, fd, (reads and 1 or 0) | (w.want_write and 2 or 0))
  end
  local sock = w.sock
  return reads and sock.dirty ~= nil and sock:dirty() and true or false
end

--- Watches a socket. `w` is a table with `sock`, and `on_readable()`, `on_writable()` methods
-- and a boolean field `want_write`; `want_read` defaults to true. Both are read when `w` is
-- watched, after each of its handlers ran, and when `loop.update(w)` is called: code that
-- changes them anywhere else calls `loop.update(w)`. Watching a watched watcher again is the
-- same as `loop.update(w)`; a socket already watched by another watcher is left to that one.
function loop.watch(w)
  local sock = assert(w.sock, "watcher needs a socket")
  local current = by_sock[sock]
  if current then
    if current == w then touch(w) end
    return
  end
  by_sock[sock] = w
  sock_of[w] = sock
  local fd = sock.getfd and math.tointeger(sock:getfd())
  if fd and fd >= 0 then
    local stale = by_fd[fd]
    -- A watcher whose socket was closed without unwatch(): its descriptor number is reused.
    if stale then
      if mask_of[stale] ~= 0 then registered = registered - 1 end
      mask_of[stale] = 0
      fd_of[stale] = false
    end
    by_fd[fd] = w
    fd_of[w] = fd
  else
    fd_of[w] = false
  end
  mask_of[w] = 0
  touch(w)
end

--- Tells the loop that `w.want_read` or `w.want_write` may have changed (see `loop.watch`).
function loop.update(w)
  if by_sock[sock_of[w]] == w then touch(w) end
end

--- Stops watching a socket.
function loop.unwatch(w)
  local sock = sock_of[w]
  if sock == nil or by_sock[sock] ~= w then return end
  by_sock[sock] = nil
  sock_of[w] = nil
  local fd = fd_of[w]
  if fd and by_fd[fd] == w then
    by_fd[fd] = nil
    set_mask(w, fd, 0)
  elseif mask_of[w] ~= 0 then
    registered = registered - 1
  end
  fd_of[w], mask_of[w] = nil, nil
end

--- Counts an open client, so `run()` keeps going; `loop.release()` undoes it.
function loop.retain() active = active + 1 end
function loop.release() active = active - 1 end

-- Whether `w` is still the watcher of the socket it was watched with.
local function watching(w)
  local sock = sock_of[w]
  return sock ~= nil and by_sock[sock] == w
end

--- Waits for socket activity or a timer for at most `timeout` seconds (nil: until the next
-- timer), and handles what happened. Returns the number of sockets handled.
function loop.step(timeout)
  depth = depth + 1
  local nested = depth > 1
  -- Left over if an error escaped the previous step.
  if deferred_n > 0 then run_deferred() end
  -- Re-read what may have changed since the last step.
  local pending, npending = nil, 0
  local list, n_list = touched, touched_n
  touched, touched_n, is_touched = {}, 0, {}
  for i = 1, n_list do
    local w = list[i]
    if sync(w) then
      pending = pending or {}
      npending = npending + 1
      pending[npending] = w
    end
  end

  local now = monotime()
  local deadline = next_deadline()
  local wait = timeout
  if deadline then
    local until_timer = math.max(0, deadline - now)
    wait = wait and math.min(wait, until_timer) or until_timer
  end
  -- TLS may hold decrypted bytes that the poller cannot see.
  if pending then wait = 0 end
  if registered == 0 then
    if wait and wait > 0 then socket.sleep(wait) end
    for i = 1, npending do touch(pending[i]) end
    run_due_timers(monotime())
    run_deferred()
    depth = depth - 1
    return 0
  end

  local ready = nested and {} or ready_buf
  local batch = nested and {} or batch_buf
  local _, n = poller:wait(wait, ready)
  n = n or 0
  -- Watchers are looked up before any handler runs, and each is checked again before its
  -- turn: a handler may unwatch another socket, or close it and watch a new one that reuses
  -- the descriptor (which must not receive the old one's readiness).
  for i = 1, n do
    batch[2 * i - 1] = by_fd[ready[2 * i - 1]] or false
    batch[2 * i] = ready[2 * i]
  end
  local handled = 0
  local read_done = pending and {}
  for i = 1, n do
    local w = batch[2 * i - 1]
    if w and batch[2 * i] & 2 ~= 0 and watching(w) then
      handled = handled + 1
      touch(w)
      w:on_writable()
    end
  end
  for i = 1, n do
    local w = batch[2 * i - 1]
    if w and batch[2 * i] & 1 ~= 0 and watching(w) then
      handled = handled + 1
      touch(w)
      if read_done then read_done[w] = true end
      w:on_readable()
    end
  end
  if not nested then
    for i = 1, 2 * n do batch[i] = nil end
  end
  if pending then
    for i = npending, 1, -1 do
      local w = pending[i]
      if watching(w) and not read_done[w] and w.sock:dirty() then
        touch(w)
        w:on_readable()
      end
    end
  end
  run_due_timers(monotime())
  run_deferred()
  depth = depth - 1
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
