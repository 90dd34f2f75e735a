-- Runs an example against a throwaway Prosody, with nothing to set up:
--
--   lua5.4 examples/with_server.lua [options] examples/NAME.lua [arguments...]
--
-- It starts Prosody on 127.0.0.1 (accounts alice and bob, a local CA, all in a temporary
-- directory) and the fault proxy in front of it, runs the example as alice with
--   XMPP_JID, XMPP_PASSWORD, XMPP_HOST, XMPP_PORT (the proxy), XMPP_CAFILE,
--   XMPP_TO (bob's JID) and XMPP_STORE (a file in the temporary directory)
-- and the library from this checkout on its Lua path, shows its output, and stops everything
-- when the example ends (or on Ctrl-C). Meanwhile bob, run from here, prints every message he
-- gets, and a count at the end.
--
-- Options:
--   --say TEXT       bob sends TEXT to alice (repeatable; one a second, starting after 1 s)
--   --cut-every S    every S seconds (at least 2) alice's link goes silent for 1 s, then the
--                    proxy resets it: what was sent into the silence must be re-sent
--   --kill-after S   SIGKILL the example after S seconds, then start it again with the same
--                    arguments; for the last second before the kill the link is silent, so
--                    the kill catches messages the server has not acknowledged
--   --timeout S      stop the example (SIGTERM) if it still runs after S seconds
-- The exit status is the example's (of its last run).

package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local harness = require "demo_server"

local USAGE = "usage: lua5.4 examples/with_server.lua [--say TEXT]... [--cut-every S] [--kill-after S] " ..
              "[--timeout S] examples/NAME.lua [ARGS...]"

local function parse(args)
  local o = { say = {} }
  local i = 1
  while args[i] and args[i]:match("^%-%-") do
    local name, value = args[i], args[i + 1]
    if value == nil then harness.fail(USAGE) end
    if name == "--say" then
      o.say[#o.say + 1] = value
    elseif name == "--cut-every" or name == "--kill-after" or name == "--timeout" then
      local n = tonumber(value)
      if not n or n <= 0 then harness.fail(name .. " takes a number of seconds\n" .. USAGE) end
      if name == "--cut-every" and n < 2 then harness.fail("--cut-every takes 2 seconds or more") end
      o[name:sub(3):gsub("%-", "_")] = n
    else
      harness.fail("unknown option " .. name .. "\n" .. USAGE)
    end
    i = i + 2
  end
  o.script = args[i]
  if not o.script then harness.fail(USAGE) end
  if not io.open(o.script, "r") then harness.fail("no such file: " .. o.script) end
  o.args = table.move(args, i + 1, #args, 1, {})
  return o
end

local function note(fmt, ...)
  io.stdout:write("[with_server] ", fmt:format(...), "\n")
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  return text
end

harness.main(function()
  io.stdout:setvbuf("line")
  local o = parse(arg)
  local xmppsm = require "xmppsm"
  local core = require "xmppsm.core"
  local process = require "helpers.process"

  local env = harness.start{ proxy = true }
  local server, proxy = env.server, env.proxy
  note("Prosody on 127.0.0.1:%d (pid %d), accounts alice and bob; fault proxy on 127.0.0.1:%d (pid %d)",
       server.port, server.process.pid, proxy.port, proxy.pid)

  local current, pump   -- the example's current run, and what copies its output (below)

  -- bob, directly connected: prints what he gets and counts copies.
  local bob = xmppsm.client{ jid = env.jid("bob"), password = env.users.bob, host = "127.0.0.1",
                             port = server.port, cafile = server.cafile, sm = { store = false },
                             logger = function() end }
  harness.watch_client(bob)
  local copies, total, distinct, duplicates = {}, 0, 0, 0
  bob:on("message", function(m)
    local body = m:get_child_text("body")
    if not body or m.attr.type == "error" then return end
    if current then pump(current) end   -- the example's earlier lines first
    total = total + 1
    copies[body] = (copies[body] or 0) + 1
    if copies[body] == 1 then distinct = distinct + 1 else duplicates = duplicates + 1 end
    io.stdout:write(("[bob] <- %s: %s%s\n"):format(m.attr.from, body,
                                                   copies[body] > 1 and "   (DUPLICATE)" or ""))
  end)
  bob:connect()
  local deadline = core.monotime() + 10
  while bob:status() ~= "online" do
    if core.monotime() > deadline then harness.fail("bob could not log in") end
    xmppsm.step(0.05)
    harness.check_interrupt()
  end

  local dir = process.tmpdir("xmppsm-example")
  local child_env = {
    XMPP_JID = env.jid("alice"), XMPP_PASSWORD = env.users.alice, XMPP_HOST = "127.0.0.1",
    XMPP_PORT = tostring(proxy.port), XMPP_CAFILE = server.cafile, XMPP_TO = env.jid("bob"),
    XMPP_STORE = dir .. "/alice.sm",
    -- the library from this checkout, as if it were installed (5.4's own variables win over
    -- LUA_PATH; ";;" keeps the default path after ours)
    LUA_PATH_5_4 = harness.path .. ";;", LUA_CPATH_5_4 = harness.cpath .. ";;",
  }

  -- One run of the example. A small bash wrapper keeps what Lua cannot get otherwise: the
  -- example's own pid (to kill exactly it) and its exit status. stdbuf makes its output
  -- line-buffered, so it shows up here as it happens; stderr goes into the same file.
  local runs = 0
  local function start_example()
    runs = runs + 1
    local run = { out = ("%s/run%d.out"):format(dir, runs), pidfile = ("%s/run%d.pid"):format(dir, runs),
                  statusfile = ("%s/run%d.status"):format(dir, runs), offset = 0 }
    local argv = { "bash", "-c", 'status=$1 pidfile=$2; shift 2; "$@" 2>&1 & echo $! >"$pidfile"; ' ..
                   'wait $!; echo $? >"$status"', "with_server", run.statusfile, run.pidfile,
                   "stdbuf", "-oL", "-eL", "lua5.4", o.script }
    table.move(o.args, 1, #o.args, #argv + 1, argv)
    run.wrapper = process.spawn(argv, { env = child_env, stdout = run.out, stderr = run.out .. ".wrapper",
                                        name = "example" })
    run.started = core.monotime()
    process.wait_until(function() return read_file(run.pidfile) end, 5)
    note("running %s (pid %s) as %s; XMPP_PORT is the proxy's, XMPP_TO=%s", o.script,
         (read_file(run.pidfile) or "?"):match("%d+") or "?", child_env.XMPP_JID, child_env.XMPP_TO)
    return run
  end

  -- The example's pid, once the wrapper wrote it, if that process is still the example.
  local function example_pid(run)
    local pid = tonumber((read_file(run.pidfile) or ""):match("^(%d+)"))
    if not pid then return nil end
    local cmdline = read_file("/proc/" .. pid .. "/cmdline") or ""
    if not cmdline:find(o.script, 1, true) then return nil end
    return pid
  end

  local function signal_example(run, sig)
    local pid = example_pid(run)
    if pid then os.execute(("kill -%s %d 2>/dev/null"):format(sig, pid)) end
    return pid
  end

  -- Copies the example's new complete lines here, marked as alice's.
  function pump(run, all)
    local text = read_file(run.out) or ""
    local stop = all and #text or (text:find("\n[^\n]*$") or 0)
    if stop > run.offset then
      for line in text:sub(run.offset + 1, stop):gmatch("[^\n]*\n?") do
        if line ~= "" then io.stdout:write("[alice] ", line:gsub("\n$", ""), "\n") end
      end
      run.offset = stop
    end
  end

  local function finished(run)
    local status = (read_file(run.statusfile) or ""):match("^(%d+)")
    return status and tonumber(status)
  end

  -- Ctrl-C or an error: the example is stopped by its pid, then the rest by harness.main.
  local ok, result = xpcall(function()
    current = start_example()
    local say_at = core.monotime() + 1
    local said = 0
    local next_cut = o.cut_every and core.monotime() + o.cut_every
    local silenced, killed = false, false
    while true do
      xmppsm.step(0.05)
      harness.check_interrupt()
      pump(current)
      local now = core.monotime()
      local status = finished(current)
      if status then
        pump(current, true)
        return status
      end
      if said < #o.say and now >= say_at then
        said = said + 1
        io.stdout:write(("[bob] -> %s: %s\n"):format(child_env.XMPP_JID, o.say[said]))
        bob:send(xmppsm.stanza.message({ to = child_env.XMPP_JID, type = "chat" }, o.say[said]))
        say_at = now + 1
      end
      if next_cut and now >= next_cut then
        proxy:silence()
        note("the link goes silent for 1 s, then the proxy resets it")
        xmppsm.after(1, function()
          -- the bytes stuck in the silent link are dropped with it, as on a real dead link
          proxy:cut("rst")
          proxy:resume()
        end)
        next_cut = now + o.cut_every
      end
      if o.kill_after and not killed then
        local age = now - current.started
        if not silenced and age >= o.kill_after - 1 then
          proxy:silence()
          silenced = true
          note("the link goes silent: what the example sends now is not acknowledged")
        elseif age >= o.kill_after then
          local pid = signal_example(current, "KILL")
          -- the dead process's connection, and the bytes stuck in it, are gone for good
          proxy:cut("rst")
          proxy:resume()
          killed = true
          process.wait_until(function() return finished(current) end, 5)
          pump(current, true)
          note("killed the example (pid %s) with SIGKILL; starting it again", tostring(pid))
          current = start_example()
        end
      end
      if o.timeout and now - current.started > o.timeout then
        note("the example still runs after %g s: stopping it", o.timeout)
        signal_example(current, "TERM")
        process.wait_until(function() return finished(current) end, 5)
        pump(current, true)
        return finished(current) or 124
      end
    end
  end, function(e)
    if tostring(e):find("interrupted!", 1, true) then return e end
    return debug.traceback(tostring(e), 2)
  end)

  -- Whatever happened, the example goes first: it must not outlive the server it uses.
  if current and not finished(current) then
    signal_example(current, "TERM")
    if not process.wait_until(function() return finished(current) end, 3) then
      signal_example(current, "KILL")
    end
  end
  if not ok then error(result, 0) end

  bob:close(1)
  local close_deadline = core.monotime() + 3
  while bob:status() ~= "closed" and core.monotime() < close_deadline do xmppsm.step(0.05) end
  note("the example exited with status %d", result)
  if total > 0 then
    note("bob received %d message%s: %d distinct, %d duplicate%s", total, total == 1 and "" or "s",
         distinct, duplicates, duplicates == 1 and "" or "s")
  end
  return result
end)
