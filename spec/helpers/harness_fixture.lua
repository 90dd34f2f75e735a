-- Not a spec of its own (the name does not end in _spec): harness_spec.lua runs it in a
-- nested busted to prove that a failing or erroring test leaves no process behind.
-- It appends the pids it starts to the file named by $XMPPSM_FIXTURE_PIDS.
local process = require "helpers.process"
local prosody = require "helpers.prosody"
local proxy = require "helpers.proxy"

local function record(...)
  local f = assert(io.open(assert(os.getenv("XMPPSM_FIXTURE_PIDS")), "a"))
  for _, pid in ipairs({ ... }) do f:write(pid, "\n") end
  f:close()
end

describe("harness fixture, failing on purpose", function()
  it("fails with a server and a proxy running, stopping them in finally", function()
    local server = prosody.start({ users = { { "alice", "pw" } } })
    local p = proxy.start({ target_port = server.port })
    finally(function()
      p:stop()
      server:stop()
    end)
    record(server.process.pid, p.pid)
    assert.is_true(false, "deliberate failure")
  end)

  it("errors without stopping anything itself", function()
    -- the sleep has no lifeline of its own: only helpers.process can stop it
    local sleeper = process.spawn({ "sleep", "60" })
    local p = proxy.start({ target_port = process.free_port() })
    record(sleeper.pid, p.pid)
    error("deliberate error, nothing stopped here")
  end)
end)
