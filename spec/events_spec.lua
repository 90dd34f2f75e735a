local events = require "xmppsm.events"

describe("events", function()
  it("runs handlers by priority, then in the order added", function()
    local e, order = events.new(), {}
    e:add("x", function() order[#order + 1] = "low" end, -1)
    e:add("x", function() order[#order + 1] = "first" end)
    e:add("x", function() order[#order + 1] = "second" end)
    e:add("x", function() order[#order + 1] = "high" end, 10)
    e:fire("x")
    assert.same({ "high", "first", "second", "low" }, order)
  end)

  it("stops at the first handler returning a value, and returns it", function()
    local e, later = events.new(), false
    e:add("x", function(v) return v * 2 end)
    e:add("x", function() later = true end)
    assert.equal(42, e:fire("x", 21))
    assert.is_false(later)
  end)

  it("adds a function once, removes it, and lets a fire in progress finish", function()
    local e, calls = events.new(), 0
    local function h() calls = calls + 1 end
    e:add("x", h)
    e:add("x", h)
    e:add("x", function() e:remove("x", h) end, 5)
    e:fire("x")            -- h removed by the first handler, but this fire had started
    e:fire("x")
    assert.equal(1, calls)
    assert.is_false(e:remove("x", h))
    assert.is_true(e:has("x"))
    assert.is_false(e:has("y"))
  end)

  it("reports a handler that raises and runs the next one", function()
    local reported
    local e = events.new(function(name, err) reported = { name, err } end)
    local ran = false
    e:add("x", function() error("handler boom") end)
    e:add("x", function() ran = true end)
    e:fire("x")
    assert.is_true(ran)
    assert.equal("x", reported[1])
    assert.matches("handler boom", reported[2])
  end)
end)
