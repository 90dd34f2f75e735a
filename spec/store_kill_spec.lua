-- xmppsm.store against a real crash: a child process appends with durability "write" and
-- is SIGKILLed at a random moment; everything it was told was stored must load back.
-- Outside spec/core: it kills processes at random moments, which valgrind would slow to a crawl.
local store = require "xmppsm.store"
local core = require "xmppsm.core"
local random_seed = require "helpers.seed"
local util = require "luassert.util"
local child = dofile("spec/helpers/store_child.lua")


local q = child.quote

local child_cmd = child.command

local read_file = child.read_file

-- Running and not a zombie (a killed orphan may wait a while for its reaper).
local function alive(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  local state = stat and stat:match("^%d+ %b() (%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

-- Guards the kill in the cleanup against a recycled pid.
local function is_helper(pid)
  local cmdline = read_file("/proc/" .. pid .. "/cmdline")
  return cmdline ~= nil and cmdline:find("store_child.lua", 1, true) ~= nil
end

local function sleep(seconds)
  os.execute(string.format("sleep %.3f", seconds))
end

local dir
before_each(function()
  dir = os.tmpname()
  os.remove(dir)
  assert(core.mkdirs(dir))
end)
after_each(function()
  if dir then os.execute("rm -rf " .. q(dir)) end
end)

describe("xmppsm.store killed mid-append", function()
  local seed = random_seed()

  for round = 1, 6 do
    it(("keeps every step the child reported, in order and intact (round %d, seed %d)"):format(round, seed),
       function()
      local path, out, errf = dir .. "/kill.sm", dir .. "/out", dir .. "/err"
      local p = assert(io.popen(child_cmd("append", path) .. " >" .. q(out) .. " 2>" .. q(errf)
        .. " & echo $!"))
      local pid = tonumber(p:read("l"))
      p:close()
      assert.is_number(pid)
      finally(function()
        if alive(pid) and is_helper(pid) then os.execute("kill -9 " .. pid) end
      end)

      -- Wait for the first reported step, then a random moment: right away, or up to 0.4 s in.
      local deadline = core.monotime() + 20
      while (read_file(out) or "") == "" do
        assert.is_true(alive(pid), "the child died: " .. tostring(read_file(errf)))
        assert.is_true(core.monotime() < deadline, "the child reported nothing")
        sleep(0.01)
      end
      -- (Checked only now: right after the fork the pid runs the shell, not yet lua5.4.)
      assert.is_true(is_helper(pid), "pid " .. pid .. " is not the child")
      if round > 1 then sleep(math.random() * 0.4) end
      assert.is_true(alive(pid), "the child stopped before the kill: " .. tostring(read_file(errf)))
      assert.is_true(os.execute("kill -9 " .. pid))

      -- The lock goes with the process.
      local s, err
      deadline = core.monotime() + 20
      repeat
        s, err = store.file(path)
        if not s then sleep(0.01) end
      until s or core.monotime() > deadline
      assert(s, err)
      local state, warning = s:load()
      assert.is_table(state)
      assert.is_nil(warning)

      -- Lines are written whole (one write each), so the output holds steps 1..P.
      local text = read_file(out)
      local steps = 0
      for line in text:gmatch("([^\n]*)\n") do
        steps = steps + 1
        assert.equal(tostring(steps), line)
      end
      assert.is_true(steps > 0)

      -- The store holds exactly steps 1..P, or 1..P+1 when the kill fell between the store call
      -- returning and the child printing its number.
      local model = child.empty()
      for n = 1, steps do child.apply(model, child.call(model, n)) end
      if not util.deepcompare(model, state, true) then
        child.apply(model, child.call(model, steps + 1))
        assert.same(model, state, "after " .. steps .. " reported steps (seed " .. seed .. ")")
      end

      -- The recovered store goes on: whatever the kill cut off is gone from the file.
      assert(s:queued("<after-kill/>", 1))
      s:close()
      s = assert(store.file(path))
      local again, warning2 = s:load()
      s:close()
      assert.is_nil(warning2)
      assert.equal(#state.items + 1, #again.items)
      assert.equal("<after-kill/>", again.items[#again.items].raw)
    end)
  end
end)

describe("xmppsm.store with many items", function()
  -- Its cost per item is measured by `make bench` (BENCHMARKS.md); here only the behaviour.
  it("appends 100,000 items and loads every one back (durability 'write')", function()
    local path = dir .. "/many.sm"
    local raw = "<message to='peer@example.com' id='%d' type='chat'><body>hello</body></message>"
    local s = assert(store.file(path, { durability = "write" }))
    assert(s:load())
    for i = 1, 100000 do assert(s:queued(raw, i)) end
    assert(s:close())
    s = assert(store.file(path))
    local state = assert(s:load())
    s:close()
    assert.equal(100000, #state.items)
    assert.equal(raw, state.items[100000].raw)
    assert.equal(100000, state.items[100000].stamp)
  end)
end)
