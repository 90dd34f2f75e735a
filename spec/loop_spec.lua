-- The loop's timers (monotonic clock) and coroutines.
local loop = require "xmppsm.loop"
local core = require "xmppsm.core"
local wait = require "helpers.wait"

describe("loop timers", function()
  it("fires one-shot timers in deadline order, once", function()
    local fired = {}
    loop.after(0.06, function() fired[#fired + 1] = "c" end)
    loop.after(0.02, function() fired[#fired + 1] = "a" end)
    loop.after(0.04, function() fired[#fired + 1] = "b" end)
    wait.for_seconds(0.15)
    assert.same({ "a", "b", "c" }, fired)
  end)

  it("does not fire a cancelled timer", function()
    local fired = false
    local t = loop.after(0.02, function() fired = true end)
    t:cancel()
    t:cancel()   -- twice is fine
    wait.for_seconds(0.06)
    assert.is_false(fired)
  end)

  it("repeats every interval until cancelled, even from its own callback", function()
    local n = 0
    local t
    t = loop.every(0.01, function()
      n = n + 1
      if n == 3 then t:cancel() end
    end)
    wait.for_seconds(0.1)
    assert.equal(3, n)
  end)

  it("waits no longer than the next timer, and measures on the monotonic clock", function()
    local t0 = core.monotime()
    local fired_at
    loop.after(0.05, function() fired_at = core.monotime() end)
    loop.step(5)   -- returns when the timer is due, not after 5 s
    if not fired_at then loop.step(5) end
    assert.is_number(fired_at)
    assert.is_true(fired_at - t0 >= 0.05 - 1e-3)
    assert.is_true(fired_at - t0 < 4.5)   -- not the whole 5 s step
  end)

  it("reports a timer that raises through on_error and keeps running the others", function()
    local errors, ran = {}, false
    local saved = loop.on_error
    loop.on_error = function(e) errors[#errors + 1] = e end
    loop.after(0, function() error("timer boom") end)
    loop.after(0, function() ran = true end)
    wait.for_seconds(0.02)
    loop.on_error = saved
    assert.is_true(ran)
    assert.equal(1, #errors)
    assert.matches("timer boom", errors[1])
  end)

  it("refuses nonsense delays", function()
    assert.has_error(function() loop.after(-1, function() end) end)
    assert.has_error(function() loop.every(0, function() end) end)
    assert.has_error(function() loop.after(1, "not a function") end)
  end)
end)

describe("loop coroutines", function()
  it("sleeps inside spawn without blocking other work", function()
    local order = {}
    loop.spawn(function()
      order[#order + 1] = "start"
      loop.sleep(0.03)
      order[#order + 1] = "woke"
    end)
    order[#order + 1] = "after spawn"
    wait.until_true(function() return #order == 3 end, 2, "the sleeper")
    assert.same({ "start", "after spawn", "woke" }, order)
  end)

  it("returns what resume was given, also when it is called before the wait yields", function()
    local got
    loop.spawn(function()
      local a, b = loop.wait(function(resume) resume(1, 2) end)   -- at once
      local c = loop.wait(function(resume) loop.after(0.01, function() resume(3) end) end)
      got = { a, b, c }
    end)
    wait.until_true(function() return got end, 2, "the waits")
    assert.same({ 1, 2, 3 }, got)
  end)

  it("knows where waiting is possible", function()
    assert.is_false(loop.can_wait())
    local inside
    loop.spawn(function() inside = loop.can_wait() end)
    assert.is_true(inside)
    assert.has_error(function() loop.sleep(0.01) end)
  end)
end)
