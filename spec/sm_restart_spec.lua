-- A bot killed with SIGKILL in the middle of sending, then started again: it resumes the old
-- session from its store and the receiver ends with every message exactly once.
local xmppsm = require "xmppsm"
local prosody = require "helpers.prosody"
local process = require "helpers.process"
local wait = require "helpers.wait"
local random_seed = require "helpers.seed"

local DOMAIN = "xmppsm.test"

describe("a bot killed with SIGKILL and restarted", function()
  local server, dir
  local seed = random_seed()   -- when to kill

  setup(function()
    server = prosody.start{ domain = DOMAIN, hibernation = 30,
                            users = { { "alice", "pw-alice" }, { "bob", "pw-bob" } } }
    dir = process.tmpdir("xmppsm-restart")
  end)
  teardown(function()
    if server then server:stop() end
    process.stop_all()
    if dir then os.execute("rm -rf " .. process.quote(dir)) end
  end)

  local function child(mode, store, count)
    return process.spawn({ "lua5.4", "spec/helpers/sm_sender_child.lua", mode, store,
                           tostring(server.port), server.cafile, "bob@" .. DOMAIN, tostring(count or 0) },
                         { stdout = store .. "." .. mode .. ".out", stderr = store .. "." .. mode .. ".err",
                           name = "sender-" .. mode })
  end

  local function last_sent(p)
    local n = 0
    for i in p:stdout_text():gmatch("SENT (%d+)") do n = tonumber(i) end
    return n
  end

  for round = 1, 3 do
    it("resumes and re-sends what was not acknowledged (round " .. round .. ", seed " .. seed .. ")",
       function()
      local COUNT = 400
      local store = dir .. "/alice-" .. round .. ".sm"
      local bob = xmppsm.client{ jid = "bob@" .. DOMAIN, password = "pw-bob", host = "127.0.0.1",
                                 port = server.port, cafile = server.cafile, logger = function() end,
                                 sm = { store = false } }
      local seen = { total = 0 }
      bob:on("message", function(m)
        local body = m:get_child_text("body")
        if body then seen[body] = (seen[body] or 0) + 1 seen.total = seen.total + 1 end
      end)
      bob:connect()
      wait.until_true(function() return bob:status() == "online" end, 10, "bob online")

      local first = child("send", store, COUNT)
      finally(function() first:stop(1) bob:close(1) end)
      local kill_after = math.random(50, 300)
      wait.until_true(function()
        return first:stdout_text():find("ONLINE", 1, true) and last_sent(first) >= kill_after
      end, 20,
                      "the sender to get going:\n" .. first:stderr_text())
      first:kill("KILL")
      first:wait(5)
      local accepted = last_sent(first)
      assert.is_true(accepted < COUNT, "killed too late to prove anything")

      local second = child("flush", store)
      finally(function() second:stop(1) end)
      wait.until_true(function() return second:stdout_text():find("DONE", 1, true) end, 20,
                      "the restarted bot to finish:\n" .. second:stderr_text())
      assert.truthy(second:stdout_text():find("RESUMED", 1, true), "the session was not resumed:\n" ..
                    second:stdout_text():sub(1, 300) .. "\n" .. second:stderr_text())
      assert.falsy(second:stdout_text():find("ONLINE", 1, true), "a new session was set up")
      wait.for_seconds(0.5)
      for i = 1, accepted do
        assert.equal(1, seen["k" .. i], "message k" .. i .. " of " .. accepted)
      end
      -- At most the one whose send() returned just before the kill, before it was printed.
      local one_more = seen.total == accepted + 1 and seen["k" .. accepted + 1] == 1
      assert.is_true(seen.total == accepted or one_more,
                     "received " .. seen.total .. " for " .. accepted .. " accepted")
    end)
  end
end)

describe("a client whose store file is damaged", function()
  local server
  setup(function()
    server = prosody.start{ domain = DOMAIN, users = { { "alice", "pw-alice" } } }
  end)
  teardown(function()
    if server then server:stop() end
    process.stop_all()
  end)

  it("reports it as an error event when it connects and starts a fresh session", function()
    local dir = process.tmpdir("xmppsm-corrupt")
    finally(function() os.execute("rm -rf " .. process.quote(dir)) end)
    local path = dir .. "/alice.sm"
    local f = assert(io.open(path, "wb"))
    f:write("\137XSM\r\n\26\n" .. string.rep("garbage", 20))
    f:close()
    local c = xmppsm.client{ jid = "alice@" .. DOMAIN, password = "pw-alice", host = "127.0.0.1",
                             port = server.port, cafile = server.cafile, reconnect = false,
                             presence = false, logger = function() end, sm = { store = path } }
    finally(function() c:close() end)
    local errors, enabled, resumed, out = {}, 0, 0, {}
    c:on("error", function(e) errors[#errors + 1] = e end)
    c:on("smEnabled", function() enabled = enabled + 1 end)
    c:on("resumed", function() resumed = resumed + 1 end)
    c:on("rawOut", function(s) out[#out + 1] = s end)
    c:connect()
    wait.until_true(function() return enabled == 1 end, 10, "a new Stream Management session")
    assert.equal("online", c:status())
    assert.equal(1, #errors)
    assert.equal("store-corrupt", errors[1].condition)
    assert.equal(0, resumed)
    assert.is_nil(table.concat(out):find("<resume", 1, true))   -- nothing to resume from
    assert.is_true(c:sm_state().resumable)                      -- the fresh session is
    assert.equal(0, c:sm_state().unacked)
    assert.truthy(io.open(path .. ".corrupt"), "the damaged file kept aside")
  end)
end)
