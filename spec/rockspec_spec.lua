-- The rockspec must install every module and compile every C file, or the rock that
-- `luarocks make` builds differs from the checkout the specs test.
describe("xmppsm-scm-1.rockspec", function()
  local spec = {}
  assert(loadfile("xmppsm-scm-1.rockspec", "t", spec))()

  local function files(dir, pattern)
    local list = {}
    local p = assert(io.popen("ls " .. dir))
    for name in p:lines() do
      if name:match(pattern) then list[#list + 1] = dir .. "/" .. name end
    end
    p:close()
    return list
  end

  it("lists every Lua module", function()
    local listed = {}
    for _, path in pairs(spec.build.modules) do
      if type(path) == "string" then listed[path] = true end
    end
    for _, path in ipairs(files("lua/xmppsm", "%.lua$")) do
      assert.is_true(listed[path] == true, path .. " is not in the rockspec")
    end
  end)

  it("compiles every C file into xmppsm.core", function()
    local listed = {}
    for _, path in ipairs(spec.build.modules["xmppsm.core"].sources) do listed[path] = true end
    for _, path in ipairs(files("csrc", "%.c$")) do
      assert.is_true(listed[path] == true, path .. " is not in the rockspec")
    end
  end)

  it("declares expat and OpenSSL as external dependencies", function()
    assert.is_table(spec.external_dependencies.EXPAT)
    assert.is_table(spec.external_dependencies.OPENSSL)
    assert.equal("3.0", spec.rockspec_format)
  end)
end)
