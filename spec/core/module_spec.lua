describe("xmppsm.core", function()
  it("loads and reports the same version as the Lua module", function()
    local core = require "xmppsm.core"
    local xmppsm = require "xmppsm"
    assert.is_string(core._VERSION)
    assert.matches("^%d+%.%d+%.%d+$", core._VERSION)
    assert.equal(core._VERSION, xmppsm._VERSION)
  end)

  it("has a monotonic clock that never goes back", function()
    local core = require "xmppsm.core"
    local a = core.monotime()
    local b = core.monotime()
    assert.is_number(a)
    assert.is_true(b >= a)
  end)
end)
