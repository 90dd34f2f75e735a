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

  it("has a row in the events table for every event the library fires", function()
    local p = assert(io.popen("cat lua/xmppsm/*.lua"))
    local src = p:read("a")
    p:close()
    local fired = {}
    for name in src:gmatch(':fire%(%s*"(%w+)"') do fired[name] = true end
    -- rawIn and rawOut are fired by Client:_raw(name, bytes)
    for name in src:gmatch('_raw%(%s*"(%w+)"') do fired[name] = true end
    for _, name in ipairs { "message", "stanza", "rawIn", "rawOut", "ackedStanza", "fail" } do
      assert.is_true(fired[name], "the scan of the sources misses " .. name)
    end
    -- the names in the first column of the table under "| event | payload | when |"
    local tbl = readme:match("\n| event | payload | when |\n| %-%-%- | %-%-%- | %-%-%- |\n(.-)\n\n")
    assert.is_string(tbl)
    local rows = {}
    for first in ("\n" .. tbl):gmatch("\n| ([^|\n]+) |") do
      for name in first:gmatch("`(%w+)`") do rows[name] = true end
    end
    for name in pairs(fired) do assert.is_true(rows[name], "event " .. name .. " has no row") end
  end)
end)
