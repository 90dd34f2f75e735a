-- The newcomer's commands, run as a newcomer runs them: `make demo`'s script and each example
-- through examples/with_server.lua (a real Prosody started by the spec helpers, behind the
-- fault proxy). Each run is bounded by timeout(1); what they start is checked to be gone
-- afterwards, also after a Ctrl-C.
local process = require "helpers.process"

-- Runs a command line to its end (at most `seconds`, then SIGINT, then SIGKILL): output and
-- exit status. SIGINT first, so a script that overstays still stops what it started.
local function run(cmd, seconds)
  local words = {}
  for i, w in ipairs(cmd) do words[i] = process.quote(w) end
  local p = assert(io.popen(("timeout -s INT -k 10 %d %s 2>&1 </dev/null"):format(seconds,
                                                                                  table.concat(words, " "))))
  local out = p:read("a")
  local _, _, code = p:close()
  return out, code
end

-- Whether `pid` is a running process whose command line mentions `what`.
local function running(pid, what)
  local f = io.open("/proc/" .. pid .. "/cmdline", "rb")
  if not f then return false end
  local cmdline = f:read("a")
  f:close()
  return cmdline:find(what, 1, true) ~= nil
end

-- The pids a script printed for Prosody and the proxy, and checks they are gone.
local function assert_stopped(out)
  local prosody_pid = out:match("Prosody on 127%.0%.0%.1:%d+ %(pid (%d+)%)")
  local proxy_pid = out:match("fault proxy on 127%.0%.0%.1:%d+ %(pid (%d+)%)")
  assert.is_not_nil(prosody_pid, "no Prosody pid in:\n" .. out)
  assert.is_not_nil(proxy_pid, "no proxy pid in:\n" .. out)
  assert.is_false(running(prosody_pid, "prosody"), "Prosody " .. prosody_pid .. " still runs")
  assert.is_false(running(proxy_pid, "proxy_main"), "the proxy " .. proxy_pid .. " still runs")
  local said = ("stopped fault proxy (pid %s) and Prosody (pid %s)"):format(proxy_pid, prosody_pid)
  assert.truthy(out:find(said, 1, true), out)
end

local function count(text, pattern)
  local n = 0
  for _ in text:gmatch(pattern) do n = n + 1 end
  return n
end

describe("the demo's accounting", function()
  local tally = require("examples.demo").tally

  -- A run of `n` messages, all sent, acknowledged, received once; `change` edits it.
  local function run_of(n, change)
    local r = { count = n, sent = {}, acked = {}, failed = {}, received = {}, writes = {} }
    for i = 1, n do r.sent[i], r.acked[i], r.received[i], r.writes[i] = true, 1, 1, 1 end
    if change then change(r) end
    return tally(r)
  end

  it("passes a run where everything arrived once", function()
    local t = run_of(5, function(r) r.writes[2] = 3 end)
    assert.same({}, t.problems)
    assert.equal(5, t.sent)
    assert.equal(5, t.acked)
    assert.equal(5, t.received)
    assert.equal(2, t.resent)
    assert.equal(0, t.lost)
  end)

  it("counts a message neither received nor failed as lost, acknowledged or not", function()
    local t = run_of(5, function(r) r.received[3] = nil end)
    assert.equal(1, t.lost)
    assert.same({ 3 }, t.lost_ids)
    assert.equal(1, #t.problems)
    t = run_of(5, function(r) r.received[4], r.acked[4] = nil, nil end)
    assert.equal(1, t.lost)
    assert.equal(2, #t.problems)   -- lost, and no outcome
  end)

  it("accepts a failed message that never arrived, and a failed one that did", function()
    local t = run_of(4, function(r)
      r.acked[1], r.failed[1], r.received[1] = nil, 1, nil
      r.acked[2], r.failed[2] = nil, 1
    end)
    assert.same({}, t.problems)
    assert.equal(2, t.failed)
    assert.equal(0, t.lost)
  end)

  it("flags two outcomes for one message, and a message received but never sent", function()
    local t = run_of(3, function(r) r.failed[1] = 1 end)
    assert.equal(1, #t.problems)
    assert.truthy(t.problems[1]:find("more than one outcome", 1, true))
    t = run_of(3, function(r) r.sent[3], r.acked[3] = nil, nil end)
    assert.equal(1, #t.problems)
    assert.truthy(t.problems[1]:find("never sent", 1, true))
  end)

  it("allows duplicates only after a lost session", function()
    local t = run_of(3, function(r) r.received[2] = 2 end)
    assert.equal(1, t.duplicates)
    assert.equal(1, #t.problems)
    t = run_of(3, function(r) r.received[2], r.duplicates_allowed = 2, true end)
    assert.equal(1, t.duplicates)
    assert.same({}, t.problems)
  end)
end)

describe("make demo", function()
  it("delivers every message through four faults, loses none, exits 0 and stops everything", function()
    local out, code = run({ "lua5.4", "examples/demo.lua" }, 90)
    assert.equal(0, code, out)
    local summary = {}
    for name, n in out:gmatch("\n  (%a[%a-]*) +(%d+)") do summary[name] = tonumber(n) end
    assert.equal(300, summary.sent, out)
    assert.equal(0, summary.lost, out)
    -- Prosody's <failed h/> says what the lost session handled, so nothing has to fail and
    -- nothing arrives twice, even after the failed resumption.
    assert.equal(300, summary.acknowledged, out)
    assert.equal(0, summary.failed, out)
    assert.equal(300, summary.received, out)
    assert.equal(0, summary.duplicates, out)
    assert.is_true(summary["re-sent"] > 0, "the faults should have forced re-sends:\n" .. out)
    assert.equal(4, count(out, "FAULT %d/4"), out)
    assert.equal(3, count(out, "alice RESUMED the session"), out)
    assert.equal(1, count(out, "alice could not resume: item%-not%-found"), out)
    assert.equal(1, count(out, "alice online in a NEW session"), out)
    assert.truthy(out:find("\nOK: nothing lost.", 1, true), out)
    assert_stopped(out)
  end)

  it("stops Prosody and the proxy on Ctrl-C and removes its temporary directory", function()
    local dir = process.tmpdir("xmppsm-spec-demo")
    local demo = process.spawn({ "lua5.4", "examples/demo.lua" },
                               { stdout = dir .. "/out", stderr = dir .. "/err", name = "demo" })
    finally(function() demo:stop(5) end)
    local function faulted() return demo:stdout_text():find("FAULT 1/4", 1, true) end
    assert.truthy(process.wait_until(faulted, 20), demo:stdout_text() .. demo:stderr_text())
    demo:kill("INT")
    assert.is_true(demo:wait(10), "the demo did not end after SIGINT")
    local out = demo:stdout_text()
    assert.truthy(out:find("\ninterrupted: stopping what was started", 1, true), out .. demo:stderr_text())
    assert_stopped(out)
    local tmp = out:match("throwaway CA in (%S+)")
    assert.is_not_nil(tmp, out)
    assert.is_nil(io.open(tmp .. "/prosody.cfg.lua"), tmp .. " was not removed")
  end)
end)

describe("examples/with_server.lua", function()
  local function with_server(args, seconds)
    local cmd = { "lua5.4", "examples/with_server.lua" }
    table.move(args, 1, #args, #cmd + 1, cmd)
    local out, code = run(cmd, seconds or 60)
    assert_stopped(out)
    return out, code
  end

  -- README's one-line command for an example, as words (they hold no quotes or spaces).
  local function readme_command(example)
    local readme = assert(process.read_file("README.md"))
    local section = assert(readme:match("\n## Examples\n(.-)\n## "), "README has no Examples section")
    local block = assert(section:match("```sh\n(.-)```"), "no command block in README's Examples")
    for line in block:gmatch("[^\n]+") do
      if line:find("examples/" .. example .. ".lua", 1, true) then
        local words = {}
        for w in line:gmatch("%S+") do words[#words + 1] = w end
        assert.same({ "lua5.4", "examples/with_server.lua" }, { words[1], words[2] }, line)
        return table.move(words, 3, #words, 1, {})
      end
    end
    error("README gives no command for " .. example)
  end

  it("runs the echo bot, which answers what bob says and quits on 'quit' (README's command)", function()
    local args = readme_command("echo_bot")
    assert.same({ "--say", "hello", "--say", "quit", "examples/echo_bot.lua" }, args)
    local out, code = with_server(args)
    assert.equal(0, code, out)
    assert.truthy(out:find("\n%[alice%] online as alice@xmppsm%.test/"), out)
    assert.truthy(out:find("\n%[alice%] bob@xmppsm%.test/[^:]+: hello\n"), out)
    assert.truthy(out:find("\n%[bob%] <%- alice@xmppsm%.test/[^:]+: hello\n"), out)
    assert.truthy(out:find("\n%[bob%] <%- alice@xmppsm%.test/[^:]+: quit\n"), out)
    assert.truthy(out:find("bob received 2 messages: 2 distinct, 0 duplicates", 1, true), out)
  end)

  it("runs the reliable sender through cuts: one outcome per message, re-sent after resuming", function()
    local args = readme_command("reliable_sender")
    assert.same({ "--cut-every", "2", "examples/reliable_sender.lua" }, args)
    local out, code = with_server(args)
    assert.equal(0, code, out)
    for i = 1, 20 do
      local body = ("message %d of 20"):format(i)
      assert.equal(1, count(out, "\n%[alice%] acked:  " .. body .. "\n"), body .. ":\n" .. out)
      assert.equal(1, count(out, "\n%[bob%] <%- [^\n]*: " .. body .. "\n"), body .. ":\n" .. out)
    end
    assert.equal(0, count(out, "FAILED"), out)
    local resent = tonumber(out:match("sm_state after resuming: [^\n]* resent=(%d+)"))
    assert.is_not_nil(resent, "no resumption:\n" .. out)
    assert.is_true(resent > 0, "nothing was re-sent after the silent link:\n" .. out)
    assert.truthy(out:find("sm_state at the end: unacked=0 ", 1, true), out)
    assert.truthy(out:find("bob received 20 messages: 20 distinct, 0 duplicates", 1, true), out)
  end)

  it("runs the restart example: killed with SIGKILL, it resumes and nothing is lost or doubled", function()
    local args = readme_command("resume_after_restart")
    assert.same({ "--kill-after", "2", "examples/resume_after_restart.lua" }, args)
    local out, code = with_server(args)
    assert.equal(0, code, out)
    local first, second = out:match("\n%[alice%] run (%x+): no session in the store"),
                          out:match("\n%[alice%] run (%x+): the store holds session")
    assert.is_not_nil(first, out)
    assert.is_not_nil(second, out)
    local resent = tonumber(out:match("run " .. second .. ": RESUMED the earlier session; re%-sent (%d+)"))
    assert.is_not_nil(resent, out)
    assert.is_true(resent > 0, "the kill should have caught unacknowledged messages:\n" .. out)
    assert.equal(0, count(out, "run " .. second .. ": online in a new session"), out)
    -- Every message the first run accepted reaches bob exactly once, and all of the second's.
    local accepted = 0
    for i in out:gmatch("\n%[alice%] sent:   run " .. first .. ": message (%d+) of 20\n") do
      accepted = math.max(accepted, tonumber(i))
    end
    assert.is_true(accepted > 0 and accepted < 20, "the kill came at message " .. accepted)
    local function received(run_id, i)   -- every copy: with_server marks a second "(DUPLICATE)"
      local body = ("run %s: message %d of 20"):format(run_id, i):gsub("%p", "%%%0")
      local line = "\n%[bob%] <%- [^\n]*: " .. body
      return count(out, line .. "\n") + count(out, line .. "   %(DUPLICATE%)\n")
    end
    for i = 1, accepted do assert.equal(1, received(first, i), "first run, message " .. i .. ":\n" .. out) end
    for i = 1, 20 do assert.equal(1, received(second, i), "second run, message " .. i .. ":\n" .. out) end
    local total, distinct, dups =
      out:match("\n%[with_server%] bob received (%d+) messages: (%d+) distinct, (%d+) duplicates?\n")
    assert.is_not_nil(total, out)
    assert.equal(total, distinct, out)
    assert.equal("0", dups, out)
    assert.equal(0, count(out, "%(DUPLICATE%)"), out)
  end)

  it("runs the IQ example: by callback, inside spawn, a handler, an error reply", function()
    local args = readme_command("iq_request")
    assert.same({ "examples/iq_request.lua" }, args)
    local out, code = with_server(args)
    assert.equal(0, code, out)
    assert.truthy(out:find("\n%[alice%] disco#info: the server is server/im \"Prosody\"\n"), out)
    assert.truthy(out:find("\n%[alice%] ping: the server answered in [%d.]+ ms\n"), out)
    assert.truthy(out:find("\n%[alice%] handler: version query from alice@xmppsm%.test/"), out)
    assert.truthy(out:find("\n%[alice%] version: xmppsm iq_request example [%d.]+ %(answered by our own " ..
                           "handler%)"), out)
    assert.truthy(out:find("error reply, as expected: iq/service-unavailable", 1, true), out)
  end)

  it("passes the example's exit status through", function()
    -- a stand-in example that fails at once
    local dir = process.tmpdir("xmppsm-spec-ws")
    local script = dir .. "/fails.lua"
    process.write_file(script, 'io.stderr:write("giving up\\n") os.exit(3)\n')
    local out, code = with_server({ script })
    assert.equal(3, code, out)
    assert.truthy(out:find("[alice] giving up", 1, true), out)
    assert.truthy(out:find("the example exited with status 3", 1, true), out)
  end)

  it("stops the example, Prosody and the proxy on Ctrl-C", function()
    local dir = process.tmpdir("xmppsm-spec-ws")
    local ws = process.spawn({ "lua5.4", "examples/with_server.lua", "examples/echo_bot.lua" },
                             { stdout = dir .. "/out", stderr = dir .. "/err", name = "with_server" })
    finally(function() ws:stop(5) end)
    local function online() return ws:stdout_text():find("[alice] online as", 1, true) end
    assert.truthy(process.wait_until(online, 20), ws:stdout_text() .. ws:stderr_text())
    local bot_pid = ws:stdout_text():match("running examples/echo_bot%.lua %(pid (%d+)%)")
    assert.is_not_nil(bot_pid, ws:stdout_text())
    assert.is_true(running(bot_pid, "examples/echo_bot.lua"), "the echo bot should run")
    ws:kill("INT")
    assert.is_true(ws:wait(10), "with_server did not end after SIGINT")
    local out = ws:stdout_text()
    assert.truthy(out:find("\ninterrupted: stopping what was started", 1, true), out .. ws:stderr_text())
    assert_stopped(out)
    assert.is_false(running(bot_pid, "examples/echo_bot.lua"), "the echo bot still runs")
  end)
end)

describe("make doc", function()
  it("builds the API reference from the source comments without an LDoc warning", function()
    local dir = process.tmpdir("xmppsm-spec-doc")
    -- ldoc prints progress on stdout and warnings (file:line: ...) on stderr
    local ok, out = process.run(("ldoc -c config.ld -d %s . 2>%s/warnings >/dev/null")
                                :format(process.quote(dir .. "/html"), process.quote(dir)))
    assert.is_true(ok, out)
    assert.equal("", process.read_file(dir .. "/warnings"))
    assert.truthy(process.read_file(dir .. "/html/index.html"))
    assert.truthy((process.read_file(dir .. "/html/topics/README.md.html") or ""):find("<table>", 1, true),
                  "README's tables should be rendered (lua-discount)")
    for path in io.popen("ls lua/xmppsm"):lines() do
      local name = path:match("^(.-)%.lua$")
      local page = name == "init" and "xmppsm" or "xmppsm." .. name
      assert.truthy(process.read_file(dir .. "/html/modules/" .. page .. ".html"), "no page for " .. page)
    end
  end)
end)
