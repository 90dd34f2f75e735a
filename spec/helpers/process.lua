--- Background processes, free ports and temporary directories for specs.
--
-- There is no lua-posix for Lua 5.4 on Debian, so processes are started and signalled
-- through the shell. Every process started here is registered, in three layers:
--
-- * specs stop what they start in `finally` (or `teardown`), and `process.stop_all()` stops
--   whatever is left, by pid;
-- * a finalizer does the same when busted drops this module after an insulated file, or the
--   Lua state closes (busted ends with `os.exit(code, true)`), so a test that errors before
--   its `finally` was registered leaks nothing either;
-- * a watchdog process stops them when the spec process is killed outright.
--
-- Usage from a spec (`.busted` puts spec/ on the path):
--
--     local process = require "helpers.process"
--     local p = process.spawn({ "sleep", "30" })
--     finally(function() p:stop() end)
--
-- Linux only: liveness is read from `/proc/PID/stat`.
-- @module helpers.process

local socket = require "socket"
local system = require "system"
local lfs = require "lfs"

local process = {}

--- Seconds from a monotonic clock (wall-clock jumps must not stretch or cut timeouts).
process.now = system.monotime

--- Sleeps for `seconds` (fractions allowed).
function process.sleep(seconds)
  system.sleep(seconds)
end

--- Quotes one word for `/bin/sh`.
-- @tparam string s any string
-- @treturn string the word in single quotes, safe to paste into a command line
function process.quote(s)
  return "'" .. tostring(s):gsub("'", [['\'']]) .. "'"
end
local quote = process.quote

-- Reads /proc/PID/stat: the state letter and the start time in clock ticks. The command
-- name is in parentheses and may hold spaces or parentheses, so split after the last ")".
local function proc_stat(pid)
  local f = io.open("/proc/" .. pid .. "/stat", "r")
  if not f then return nil end
  local line = f:read("l")
  f:close()
  if not line then return nil end
  local rest = line:match(".*%)%s+(.*)$")
  if not rest then return nil end
  local fields = {}
  for word in rest:gmatch("%S+") do fields[#fields + 1] = word end
  -- rest starts at field 3 (state); field 22 (starttime) is fields[20]
  return fields[1], fields[20]
end

--- Whether a pid belongs to a running process, as `kill -0` says, but zombies count as gone.
-- A process whose parent shell already exited is reaped by init, which here may take a second
-- or more; until then `kill -0` still succeeds although the process has finished.
-- @tparam number pid
-- @treturn boolean
function process.pid_running(pid)
  pid = math.tointeger(pid)
  if not pid or pid <= 1 then return false end
  local ok = os.execute("kill -0 " .. pid .. " 2>/dev/null")
  if not ok then return false end
  local state = proc_stat(pid)
  return state ~= nil and state ~= "Z" and state ~= "X"
end

local Process = {}
Process.__index = Process

-- bash, not sh: dash cannot close descriptors above 9. Closes everything above stderr.
local CLOSE_FDS = 'for fd in $(ls /proc/$$/fd); do [ "$fd" -gt 2 ] && eval "exec $fd>&-"; done; '

-- Every process this module instance started, in order, and those not yet stopped.
local spawned, live = {}, {}
-- Temporary directories to remove in process.cleanup().
local tmpdirs = {}

--- Whether the process is still running (and its pid was not reused by another process).
-- @treturn boolean
function Process:alive()
  local state, start = proc_stat(self.pid)
  if not state or state == "Z" or state == "X" then return false end
  -- a different start time means the pid now belongs to someone else: never signal that one
  return start == self.starttime
end

--- Sends a signal to the process if it is still ours.
-- @tparam[opt="TERM"] string signal a name such as "TERM", "KILL", "STOP", "CONT"
-- @treturn boolean whether the signal was sent
function Process:kill(signal)
  signal = signal or "TERM"
  assert(tostring(signal):match("^%w+$"), "bad signal name")
  if not self:alive() then return false end
  return os.execute("kill -" .. signal .. " " .. self.pid .. " 2>/dev/null") == true
end

--- Waits until the process has ended.
-- @tparam number timeout seconds
-- @treturn boolean true if it ended in time
function Process:wait(timeout)
  local deadline = process.now() + timeout
  while self:alive() do
    if process.now() >= deadline then return false end
    process.sleep(0.005)
  end
  return true
end

--- Stops the process: SIGTERM, wait up to `timeout` seconds, then SIGKILL.
-- @tparam[opt=5] number timeout seconds to wait after SIGTERM
-- @treturn boolean true if it ended on SIGTERM (or was already gone)
-- @treturn string|nil "killed" when SIGKILL was needed
function Process:stop(timeout)
  live[self] = nil
  if not self:alive() then return true end
  self:kill("TERM")
  self:kill("CONT") -- a process frozen with SIGSTOP would not see the TERM until then
  if self:wait(timeout or 5) then return true end
  self:kill("KILL")
  self:wait(5)
  return false, "killed"
end

--- Text the process wrote to stdout so far.
function Process:stdout_text()
  return process.read_file(self.stdout) or ""
end

--- Text the process wrote to stderr so far.
function Process:stderr_text()
  return process.read_file(self.stderr) or ""
end

--- Reads a whole file.
-- @tparam string path
-- @treturn string|nil the contents, nil if it cannot be read
function process.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  return text
end

--- Writes a whole file.
-- @tparam string path
-- @tparam string text
function process.write_file(path, text)
  local f = assert(io.open(path, "wb"))
  assert(f:write(text))
  assert(f:close())
end

--- Last `n` lines of a text, for failure messages.
function process.tail(text, n)
  n = n or 40
  local lines = {}
  for line in (text or ""):gmatch("[^\n]*") do lines[#lines + 1] = line end
  local first = math.max(1, #lines - n + 1)
  return table.concat(lines, "\n", first)
end

--- Runs a command to completion, capturing its output.
-- @tparam table|string cmd argv list (quoted here) or a shell command line
-- @treturn boolean whether it exited with status 0
-- @treturn string its stdout and stderr together
function process.run(cmd)
  if type(cmd) == "table" then
    local words = {}
    for i, w in ipairs(cmd) do words[i] = quote(w) end
    cmd = table.concat(words, " ")
  end
  -- like spawn, keep our sockets out of the child (fd 1 is popen's pipe)
  local p = assert(io.popen("bash -c " .. quote(CLOSE_FDS .. "exec 2>&1 </dev/null; " .. cmd), "r"))
  local out = p:read("a")
  local ok = p:close()
  return ok == true, out
end

local function make_tmpdir(prefix)
  assert(prefix:match("^[%w_.-]+$"), "bad tmpdir prefix")
  local p = assert(io.popen("mktemp -d -t " .. prefix .. ".XXXXXXXX", "r"))
  local path = p:read("l")
  p:close()
  assert(path and path:match("^/") and not path:find("\n"), "mktemp -d failed")
  return path
end

local watch -- defined with the watchdog below

--- Creates a temporary directory, removed again by `process.cleanup()` (or the watchdog).
-- Set XMPPSM_KEEP_TMP=1 to keep them for a post-mortem.
-- @tparam[opt="xmppsm"] string prefix
-- @treturn string its absolute path
function process.tmpdir(prefix)
  local path = make_tmpdir(prefix or "xmppsm")
  tmpdirs[#tmpdirs + 1] = path
  if os.getenv("XMPPSM_KEEP_TMP") ~= "1" then watch("d " .. path) end
  return path
end

--- Removes a directory tree. Symbolic links are removed, never followed.
-- @tparam string path absolute path
function process.rmtree(path)
  assert(type(path) == "string" and path:match("^/.+") and not path:match("/%.%.?/")
    and not path:match("/%.%.?$"), "refusing to remove " .. tostring(path))
  local attr = lfs.symlinkattributes(path)
  if not attr then return end
  if attr.mode == "directory" then
    for name in lfs.dir(path) do
      if name ~= "." and name ~= ".." then process.rmtree(path .. "/" .. name) end
    end
    assert(lfs.rmdir(path))
  else
    assert(os.remove(path))
  end
end

-- Starts argv in the background with stdout and stderr in files; returns pid, start time.
local function launch(argv, out, err, opts)
  local words = {}
  if opts.env then
    words[#words + 1] = "env"
    for k, v in pairs(opts.env) do
      assert(tostring(k):match("^[%a_][%w_]*$"), "bad environment variable name")
      words[#words + 1] = quote(k .. "=" .. v)
    end
  end
  for _, w in ipairs(argv) do words[#words + 1] = quote(w) end
  -- $$ is the bash that execs the command, so the pid echoed by the outer shell is the
  -- command's pid.
  local script = "exec </dev/null >" .. quote(out) .. " 2>" .. quote(err) .. "; "
    .. (opts.cwd and ("cd " .. quote(opts.cwd) .. " || exit 127; ") or "")
    .. CLOSE_FDS
    .. "exec " .. table.concat(words, " ")
  local outer = "bash -c " .. quote(script) .. " & echo $!"
  local p = assert(io.popen(outer, "r"))
  local pid = math.tointeger(tonumber(p:read("l")))
  p:close()
  assert(pid, "could not start " .. argv[1])
  -- Return only once the wrapper has closed the inherited descriptors and exec'd the command,
  -- or a socket the caller closes right after spawn would live on a while in the child. Until
  -- then the command line is popen's shell (not yet exec'd), our bash wrapper, or empty while
  -- an exec is under way (empty is also what a zombie shows, hence the state check).
  local ours = { [""] = true, ["sh\0-c\0" .. outer .. "\0"] = true,
    ["bash\0-c\0" .. script .. "\0"] = true }
  process.wait_until(function()
    local f = io.open("/proc/" .. pid .. "/cmdline", "rb")
    if not f then return true end
    local cmdline = f:read("a")
    f:close()
    if not ours[cmdline] then return true end
    local state = proc_stat(pid)
    return state == nil or state == "Z" or state == "X"
  end, 5, 0.001)
  local _, start = proc_stat(pid)
  return pid, start
end

--- Starts a command in the background.
-- The child gets stdin from /dev/null, stdout and stderr in files, and none of this
-- process's other descriptors: LuaSocket does not set close-on-exec, and an inherited socket
-- would keep a connection or listening port alive after the spec closed it.
-- @tparam table argv the program and its arguments (no shell expansion)
-- @tparam[opt] table opts `stdout`, `stderr` (file paths; default: files in a new tmpdir),
--   `cwd`, `env` (table of extra variables), `name` (for messages)
-- @treturn table a process object with `pid`, `alive`, `kill`, `stop`, `wait`
function process.spawn(argv, opts)
  opts = opts or {}
  assert(type(argv) == "table" and #argv > 0, "argv must be a non-empty list")
  local out, err = opts.stdout, opts.stderr
  if not out or not err then
    local dir = process.tmpdir("xmppsm-proc")
    out = out or dir .. "/stdout"
    err = err or dir .. "/stderr"
  end
  local pid, start = launch(argv, out, err, opts)
  local self = setmetatable({
    pid = pid,
    -- nil if it already ended: then alive() is false, and it was never anyone else's
    starttime = start or false,
    argv = argv,
    name = opts.name or argv[1],
    stdout = out,
    stderr = err,
  }, Process)
  spawned[#spawned + 1] = self
  live[self] = true
  if start then watch("p " .. pid .. " " .. start) end
  return self
end

--- Every process started by this module instance, stopped or not, in start order.
-- @treturn table list of process objects
function process.spawned()
  local list = {}
  for i, p in ipairs(spawned) do list[i] = p end
  return list
end

--- Stops every process started here that was not stopped yet, newest first.
-- @tparam[opt=5] number timeout seconds each gets after SIGTERM
-- @treturn table the pids that were still running
function process.stop_all(timeout)
  local stopped = {}
  for i = #spawned, 1, -1 do
    local p = spawned[i]
    if live[p] then
      if p:alive() then stopped[#stopped + 1] = p.pid end
      p:stop(timeout)
    end
  end
  return stopped
end

--- The pid of this Lua process (/proc/self is whoever opens it, and that is us).
-- @treturn number
function process.own_pid()
  local f = assert(io.open("/proc/self/stat", "r"))
  local pid = f:read("n")
  f:close()
  return math.tointeger(pid)
end

-- The watchdog covers what no finalizer can: the spec process killed outright (SIGKILL, or
-- a SIGTERM from `timeout`, which Lua does not catch). It is one bash loop per instance of
-- this module, started with the first process or tmpdir. It reads no commands; it waits for
-- our pid to go, then signals every listed process whose start time still matches (so never
-- a stranger that got a recycled pid), TERM then KILL, and removes the listed directories.
-- Lines: "p PID STARTTIME" and "d PATH".
local WATCHDOG = [=[
parent=$1 list=$2
running() { local s; read -r s 2>/dev/null < "/proc/$1/stat" || return 1; s=${s##*) }; [ "${s%% *}" != Z ]; }
# wait with read -t on a FIFO nobody writes to: no sleep child to fork, or to orphan when
# this loop is stopped (a FIFO opened read-write does not block on Linux)
mkfifo "${list%/*}/tick" && exec 3<>"${list%/*}/tick"
nap() { read -r -t "$1" -u 3 _ || true; }
while running "$parent"; do nap 0.5; done
# signals every listed process still running as itself; fails if there was none
sweep() {
  local kind rest pid start s f found=1
  while read -r kind rest; do
    [ "$kind" = p ] || continue
    read -r pid start <<< "$rest"
    read -r s 2>/dev/null < "/proc/$pid/stat" || continue
    read -r -a f <<< "${s##*) }"
    [ "${f[0]}" != Z ] && [ "${f[19]}" = "$start" ] && kill "-$1" "$pid" 2>/dev/null && found=0
  done < "$list"
  return $found
}
if sweep TERM; then
  for _ in 1 2 3 4 5 6 7 8 9 10; do nap 0.1; sweep 0 || break; done
  sweep KILL
fi
while read -r kind rest; do [ "$kind" = d ] && rm -rf -- "$rest"; done < "$list"
rm -rf -- "${list%/*}"
]=]

local watchdog -- { pid, start, dir, list }

function watch(line)
  if not watchdog then
    local dir = make_tmpdir("xmppsm-watchdog")
    local list = dir .. "/list"
    process.write_file(list, "")
    local pid, start = launch({ "bash", "-c", WATCHDOG, "xmppsm-watchdog",
      tostring(process.own_pid()), list }, dir .. "/stdout", dir .. "/stderr", {})
    watchdog = { pid = pid, starttime = start, dir = dir, list = list }
  end
  local f = assert(io.open(watchdog.list, "a"))
  f:write(line, "\n")
  f:close()
end

--- The watchdog's pid, if one runs (for specs of this module).
function process.watchdog_pid()
  return watchdog and watchdog.pid
end

--- Stops every process and removes every temporary directory made here.
function process.cleanup()
  process.stop_all()
  if os.getenv("XMPPSM_KEEP_TMP") ~= "1" then
    for i = #tmpdirs, 1, -1 do
      pcall(process.rmtree, tmpdirs[i])
      tmpdirs[i] = nil
    end
  end
  if watchdog then
    -- nothing left for it to do; a Process object does the pid-reuse check for us
    local w = setmetatable({ pid = watchdog.pid, starttime = watchdog.starttime }, Process)
    w:kill("TERM")
    pcall(process.rmtree, watchdog.dir)
    watchdog = nil
  end
end

-- Last resort when a spec forgot to stop something or died half-way: the finalizer runs when
-- busted drops this module after an insulated file, and when the Lua state closes at exit.
process._sentinel = setmetatable({}, { __gc = function()
  pcall(process.cleanup)
end })

--- A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read it, close).
-- @treturn number
function process.free_port()
  local server = assert(socket.bind("127.0.0.1", 0))
  local _, port = server:getsockname()
  server:close()
  return assert(math.tointeger(tonumber(port)))
end

--- Waits until something accepts TCP connections on a port.
-- @tparam number port
-- @tparam[opt=5] number timeout seconds
-- @tparam[opt] table opts `host` (default 127.0.0.1), `process` (give up early if it ends)
-- @treturn boolean|nil true once a connection succeeded
-- @treturn string|nil the reason it did not
function process.wait_port(port, timeout, opts)
  opts = opts or {}
  local deadline = process.now() + (timeout or 5)
  local last
  repeat
    local c = socket.tcp()
    c:settimeout(0.5)
    local ok, err = c:connect(opts.host or "127.0.0.1", port)
    c:close()
    if ok then return true end
    last = err
    if opts.process and not opts.process:alive() then
      return nil, "process " .. opts.process.pid .. " ended"
    end
    process.sleep(0.01)
  until process.now() >= deadline
  return nil, "port " .. port .. " not accepting: " .. tostring(last)
end

--- Polls `fn` until it returns a true value.
-- @tparam function fn
-- @tparam[opt=5] number timeout seconds
-- @tparam[opt=0.01] number interval seconds between calls
-- @return what `fn` returned, or nil after the timeout
function process.wait_until(fn, timeout, interval)
  local deadline = process.now() + (timeout or 5)
  while true do
    local v = fn()
    if v then return v end
    if process.now() >= deadline then return nil end
    process.sleep(interval or 0.01)
  end
end

return process
