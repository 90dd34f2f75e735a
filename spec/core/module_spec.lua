describe("xmppsm.core", function()
  it("loads and reports the same version as the Lua module", function()
    local core = require "xmppsm.core"
    local xmppsm = require "xmppsm"
    assert.is_string(core._VERSION)
    assert.matches("^%d+%.%d+%.%d+$", core._VERSION)
    assert.equal(core._VERSION, xmppsm._VERSION)
  end)

  it("has a monotonic clock in seconds that moves on and never goes back", function()
    local core = require "xmppsm.core"
    local a = core.monotime()
    local b = core.monotime()
    assert.is_number(a)
    assert.is_true(b >= a)
    require("socket").sleep(0.05)
    local c = core.monotime()
    assert.is_true(c - b >= 0.045, "50 ms measured as " .. (c - b))
    assert.is_true(c - b < 60, "50 ms measured as " .. (c - b))   -- seconds, not milliseconds
  end)

  it("tells whether a function can see its n-th argument (sees_arg)", function()
    local core = require "xmppsm.core"
    local cases = {
      { function() end, 1, false },
      { function(_) end, 1, true },
      { function(_, _) end, 3, false },
      { function(_, _, _) end, 3, true },
      { function(_, _, _, _) end, 3, true },
      { function(...) return ... end, 3, true },
      { function(_, ...) return ... end, 3, true },
      { print, 3, true },                                      -- C: cannot tell, so yes
      { setmetatable({}, { __call = function() end }), 3, true }, -- not a function: yes
    }
    for i, c in ipairs(cases) do assert.equal(c[3], core.sees_arg(c[1], c[2]), "case " .. i) end
    assert.has_error(function() core.sees_arg(print, "x") end)
  end)
end)
