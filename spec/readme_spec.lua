-- README.md documents every option and every event; this keeps it so.
describe("README.md", function()
  local f = assert(io.open("README.md"))
  local readme = f:read("a")
  f:close()

  local function documented(name)
    return readme:find("| `" .. name .. "` |", 1, true) ~= nil
  end

  it("has a row for every client option", function()
    for name in pairs(require("xmppsm.options").spec) do
      assert.is_true(documented(name), "option " .. name)
    end
  end)

  it("has a row for every Stream Management option", function()
    for name in pairs(require("xmppsm.sm").defaults) do
      assert.is_true(documented(name), "sm option " .. name)
    end
    assert.is_true(documented("store"))
  end)

  it("documents every event the library fires", function()
    local events = {}
    local p = assert(io.popen("cat lua/xmppsm/*.lua"))
    for name in p:read("a"):gmatch('events:fire%("(%w+)"') do events[name] = true end
    p:close()
    assert.is_true(next(events) ~= nil)
    for name in pairs(events) do
      assert.truthy(readme:find("`" .. name .. "`", 1, true), "event " .. name)
    end
  end)
end)
