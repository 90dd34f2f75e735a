-- Shared by examples/demo.lua and examples/with_server.lua: a throwaway Prosody on 127.0.0.1
-- (free port, generated config, a local CA, all in a temporary directory) with the accounts
-- alice and bob, optionally the fault-injecting proxy in front of it, and one exit path that
-- stops all of it: normal end, an error, or Ctrl-C.
--
-- It reuses the spec helpers (spec/helpers/prosody.lua, proxy.lua, process.lua) rather than a
-- second copy, so the demo runs exactly what the tests run. Scripts load it with:
--
--     package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
--     local harness = require "demo_server"

local harness = {}

-- The checkout this file lives in, so the scripts work from any current directory.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
if here:sub(1, 1) ~= "/" then
  -- Absolute, because child processes (examples, the proxy) may resolve paths elsewhere.
  local p = io.popen("pwd")
  local cwd = p and p:read("l")
  if p then p:close() end
  if cwd then here = cwd .. "/" .. here:gsub("^%./", "") end
end
harness.root = (here .. ".."):gsub("/examples/%.%.$", "")

-- The library from this checkout (lua/ and the built xmppsm/core.so) comes first, so the demo
-- never picks up an older installed copy; spec/ holds the helpers.
harness.path = table.concat({ harness.root .. "/lua/?.lua", harness.root .. "/lua/?/init.lua" }, ";")
harness.cpath = harness.root .. "/?.so"
package.path = harness.path .. ";" .. harness.root .. "/spec/?.lua;" .. package.path
package.cpath = harness.cpath .. ";" .. package.cpath

harness.DOMAIN = "xmppsm.test"
harness.USERS = { alice = "alice-secret", bob = "bob-secret" }

-- Lua raises "interrupted!" on SIGINT at whatever Lua code runs next. When that is a handler
-- the library runs under pcall (a timer, an event handler), the library reports it instead of
-- letting it through; these hooks turn such reports back into an interruption.
harness.interrupted = false

local function note_interrupt(err)
  if tostring(err):find("interrupted!", 1, true) then harness.interrupted = true return true end
  return false
end

--- Raises "interrupted!" if a Ctrl-C was swallowed by a pcall somewhere; call it in loops.
function harness.check_interrupt()
  if harness.interrupted then error("interrupted!", 0) end
end

--- Watches `client`'s error events for a swallowed Ctrl-C.
function harness.watch_client(client)
  client:on("error", function(err) note_interrupt(err) end)
end

--- Raises an error meant for the person at the terminal: printed without a traceback.
function harness.fail(text)
  error(setmetatable({ text = text }, { __tostring = function(e) return e.text end }), 0)
end

local function command_exists(name)
  return os.execute("command -v " .. name .. " >/dev/null 2>&1") == true
end

-- Clear messages for what a newcomer may not have yet, instead of a stack trace.
local function preflight()
  for _, tool in ipairs({ "prosody", "prosodyctl", "openssl" }) do
    if not command_exists(tool) then
      harness.fail(tool .. " is not installed: run `make deps` (it installs what is missing)")
    end
  end
  for _, mod in ipairs({ "socket", "ssl", "lfs", "system" }) do
    if not pcall(require, mod) then
      harness.fail("the Lua module " .. mod .. " is missing: run `make deps`")
    end
  end
  if not package.searchpath("xmppsm.core", harness.cpath) then
    harness.fail("xmppsm/core.so is not built: run `make` in " .. harness.root)
  end
end

local started = {}   -- what start() made, for stop()

--- Starts Prosody (and the proxy when `opts.proxy`).
-- @tparam table opts `hibernation` (seconds Prosody keeps a cut session, default 60),
--   `proxy` (boolean)
-- @treturn table `server` (with `host`, `port`, `cafile`, `dir`, `process`), `proxy` or nil,
--   `domain`, `users`, and `jid(name)`
function harness.start(opts)
  opts = opts or {}
  local loop = require "xmppsm.loop"
  local default_on_error = loop.on_error
  loop.on_error = function(err)
    if not note_interrupt(err) then default_on_error(err) end
  end
  local prosody = require "helpers.prosody"
  local users = {}
  for name, password in pairs(harness.USERS) do users[#users + 1] = { name, password } end
  table.sort(users, function(a, b) return a[1] < b[1] end)
  started.server = prosody.start{ domain = harness.DOMAIN, users = users,
                                  hibernation = opts.hibernation or 60, log_level = "info" }
  if opts.proxy then
    started.proxy = require("helpers.proxy").start{ target_port = started.server.port }
  end
  return {
    server = started.server,
    proxy = started.proxy,
    domain = harness.DOMAIN,
    users = harness.USERS,
    jid = function(name) return name .. "@" .. harness.DOMAIN end,
  }
end

--- Stops everything start() and the helpers started, by pid, and removes the temporary
-- directories. Safe to call more than once, and after a partial start.
-- @treturn table lines saying what was stopped
function harness.stop()
  local said = {}
  local process = package.loaded["helpers.process"]
  if started.proxy then
    local pid = started.proxy.pid
    pcall(started.proxy.stop, started.proxy)
    said[#said + 1] = "fault proxy (pid " .. pid .. ")"
    started.proxy = nil
  end
  if started.server then
    local pid = started.server.process and started.server.process.pid
    pcall(started.server.stop, started.server)
    said[#said + 1] = "Prosody (pid " .. tostring(pid) .. ")"
    started.server = nil
  end
  if process then
    -- Anything else a helper started (a half-started server, the helpers' watchdog).
    process.cleanup()
  end
  return said
end

--- Checks what is needed (tools, Lua modules, the built core), then runs `main()` and exits:
-- status 0, or what `main` returns; 130 after Ctrl-C; 1 after an error (with its traceback,
-- unless it came from `harness.fail`). Whatever happens, everything started is stopped first.
function harness.main(main)
  local code
  local ok, err = xpcall(function()
    preflight()
    return main()
  end, function(e)
    if note_interrupt(e) or (type(e) == "table" and e.text) then return e end
    if tostring(e):find("\nstack traceback:", 1, true) then return e end  -- re-raised, traced
    return debug.traceback(tostring(e), 2)
  end)
  if ok then
    code = tonumber(err) or 0
  elseif harness.interrupted then
    io.stdout:write("\ninterrupted: stopping what was started\n")
    code = 130
  else
    io.stderr:write("\nerror: ", tostring(err), "\n")
    code = 1
  end
  local stopped = harness.stop()
  if #stopped > 0 then
    io.stdout:write("stopped ", table.concat(stopped, " and "), "; temporary files removed\n")
  end
  io.stdout:flush()
  os.exit(code, true)
end

--- Whether stdout is a terminal (for `\r` progress lines).
function harness.stdout_is_tty()
  return os.execute("test -t 1") == true
end

return harness
