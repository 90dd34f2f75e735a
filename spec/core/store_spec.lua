-- xmppsm.store and the file functions of xmppsm.core it stands on.
-- Part of spec/core: also run under ASan+UBSan and valgrind, so nothing here is timing-bound.
local store = require "xmppsm.store"
local core = require "xmppsm.core"
local random_seed = require "helpers.seed"
local child = dofile("spec/helpers/store_child.lua")


local q = child.quote

local child_cmd = child.command

local read_file = child.read_file

local function write_file(path, data)
  local f = assert(io.open(path, "wb"))
  assert(f:write(data))
  assert(f:close())
end

local function size(path)
  return #assert(read_file(path), "no file " .. path)
end

local function perm(path)
  local p = assert(io.popen("stat -c %a " .. q(path)))
  local s = p:read("l")
  p:close()
  return s
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

local function session(n)
  return { id = "sm-" .. n, jid = "bot@example.com/r" .. n, enabled_at = 1700000000 + n,
           location = n % 2 == 0 and ("[2001:db8::" .. n .. "]:5222") or nil,
           max = n % 3 ~= 0 and 300 + n or nil }
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

-- Opens (and loads) a store, failing the test on any error or warning.
local function open(path, opts)
  local s = assert(store.file(path, opts))
  local state, warning = s:load()
  assert(state, warning)
  assert.is_nil(warning)
  return s, state
end

-- The state a fresh process would load from `path`.
local function reload(path)
  local s, state = open(path)
  s:close()
  return state
end

-- Starts a child that holds a lock until its stdin closes; returns the pipe to close.
local function hold(mode, path)
  local out = dir .. "/child-" .. mode .. ".out"
  local pipe = assert(io.popen(child_cmd(mode, path) .. " >" .. q(out) .. " 2>&1", "w"))
  local deadline = core.monotime() + 20
  while true do
    local got = read_file(out) or ""
    if got == "locked\n" then return pipe end
    if (got ~= "" and not ("locked\n"):find(got, 1, true)) or core.monotime() > deadline then
      pipe:close()
      error("the child did not take the lock: " .. got)
    end
  end
end

local function release(pipe)
  if io.type(pipe) == "file" then pipe:close() end
end

describe("core file functions", function()
  it("write_record writes length, type, header CRC, payload a .. b and payload CRC", function()
    local path = os.tmpname()
    local f = assert(io.open(path, "wb"))
    assert.is_true(core.write_record(f, 5, "12345678", "<message/>"))
    assert.is_true(core.write_record(f, 7, "\0\0\0\42"))
    assert.is_true(core.write_record(f, 255, ""))
    f:close()
    local function record(rtype, payload)
      local head = string.pack("<I4B", #payload, rtype)
      return head .. string.pack("<I4", core.crc32(head)) .. payload
        .. string.pack("<I4", core.crc32(payload))
    end
    local g = assert(io.open(path, "rb"))
    local got = g:read("a")
    g:close()
    assert.equal(record(5, "12345678<message/>") .. record(7, "\0\0\0\42") .. record(255, ""), got)
    -- a handle opened for reading cannot take it: nil, err (or the bytes wait in stdio's buffer
    -- and the error comes with the flush, as with file:write)
    local r = assert(io.open(path, "rb"))
    local ok, err = core.write_record(r, 5, string.rep("x", 1 << 16))
    if ok then ok, err = r:flush() end
    assert.is_nil(ok)
    assert.is_string(err)
    r:close()
    assert.has_error(function() core.write_record(r, 5, "x") end)          -- closed
    assert.has_error(function() core.write_record(io.stdout, 256, "x") end) -- type out of range
    assert.has_error(function() core.write_record(io.stdout, -1, "x") end)
    assert.has_error(function() core.write_record("file", 1, "x") end)
    assert.has_error(function() core.write_record(core.parser(), 1, "x") end) -- another userdata
    -- a table given the file handles' metatable: refused, not taken for a file
    assert.has_error(function() core.write_record(setmetatable({}, getmetatable(io.stdout)), 1, "x") end)
    assert.has_error(function() core.write_record(io.stdout, 1, nil) end)
    os.remove(path)
  end)

  it("write_record writes records on both sides of its 2048-byte stack buffer alike", function()
    -- 9 bytes of head and 4 of payload CRC: payloads up to 2035 bytes take the buffer
    local path = os.tmpname()
    local f = assert(io.open(path, "wb"))
    local payloads = {}
    for _, n in ipairs { 2034, 2035, 2036, 5000 } do
      local a, b = string.rep("a", n // 3), string.rep("b", n - n // 3)
      assert.is_true(core.write_record(f, 5, a, b))
      payloads[#payloads + 1] = a .. b
    end
    f:close()
    local got = assert(io.open(path, "rb")):read("a")
    os.remove(path)
    local pos = 1
    for _, payload in ipairs(payloads) do
      local len, rtype, hcrc = string.unpack("<I4BI4", got, pos)
      assert.equal(#payload, len)
      assert.equal(5, rtype)
      assert.equal(core.crc32(got, pos, pos + 4), hcrc)
      assert.equal(payload, got:sub(pos + 9, pos + 8 + len))
      assert.equal(core.crc32(payload), (string.unpack("<I4", got, pos + 9 + len)))
      pos = pos + 13 + len
    end
    assert.equal(#got + 1, pos)
  end)

  it("write_record packs a number part as \"<d\" and flushes when asked", function()
    local path = os.tmpname()
    local f = assert(io.open(path, "wb"))
    assert.is_true(core.write_record(f, 5, 1234.5, "<message/>", true))
    -- flushed: another handle sees the whole record without f:flush()
    local function read_all()
      local g = assert(io.open(path, "rb"))
      local got = g:read("a")
      g:close()
      return got
    end
    local payload = string.pack("<d", 1234.5) .. "<message/>"
    local head = string.pack("<I4B", #payload, 5)
    local expected = head .. string.pack("<I4", core.crc32(head)) .. payload
      .. string.pack("<I4", core.crc32(payload))
    assert.equal(expected, read_all())
    -- not asked: the record waits in stdio's buffer
    assert.is_true(core.write_record(f, 7, -0.25))
    assert.equal(expected, read_all())
    f:flush()
    local p2 = string.pack("<d", -0.25)
    local h2 = string.pack("<I4B", 8, 7)
    assert.equal(expected .. h2 .. string.pack("<I4", core.crc32(h2)) .. p2
                 .. string.pack("<I4", core.crc32(p2)), read_all())
    assert.has_error(function() core.write_record(f, 5, 1.0, 2.0) end)  -- one number at most
    f:close()
    os.remove(path)
  end)

  it("crc32 agrees with the bytewise definition at every length and offset", function()
    local function reference(s)
      local crc = 0xFFFFFFFF
      for i = 1, #s do
        crc = crc ~ s:byte(i)
        for _ = 1, 8 do
          crc = (crc & 1) == 1 and (0xEDB88320 ~ (crc >> 1)) or (crc >> 1)
        end
      end
      return crc ~ 0xFFFFFFFF
    end
    local bytes = {}
    for i = 1, 70 do bytes[i] = string.char((i * 37 + 11) % 256) end
    local s = table.concat(bytes)
    for i = 1, 9 do
      for j = i - 1, #s do
        assert.equal(reference(s:sub(i, j)), core.crc32(s, i, j))
      end
    end
  end)

  it("crc32 is the zlib CRC-32, over string.sub ranges", function()
    assert.equal(0xCBF43926, core.crc32("123456789"))
    assert.equal(0x414FA339, core.crc32("The quick brown fox jumps over the lazy dog"))
    assert.equal(0, core.crc32(""))
    assert.equal(core.crc32("123456789"), core.crc32("ab123456789cd", 3, -3))
    assert.equal(core.crc32("9cd"), core.crc32("ab123456789cd", -3))
    assert.equal(core.crc32("ab1"), core.crc32("ab123456789cd", -100, 3))
    assert.equal(0, core.crc32("abc", 3, 2))
    assert.equal(0, core.crc32("abc", 10))
    assert.equal(core.crc32("abc"), core.crc32("abc", 0, 100))
    assert.equal(core.crc32("abc"), core.crc32("abc", math.mininteger, math.maxinteger))
    assert.equal(0, core.crc32("abc", math.maxinteger, math.mininteger))
    assert.not_equal(core.crc32("123456789"), core.crc32("123456788"))
  end)

  it("fsync flushes and syncs a Lua file handle; misuse raises", function()
    local path = dir .. "/f"
    local f = assert(io.open(path, "w"))
    f:write("hello")
    assert.is_true(core.fsync(f))
    assert.equal("hello", read_file(path)) -- fsync flushed the stdio buffer
    f:close()
    assert.has_error(function() core.fsync(f) end,
      "bad argument #1 to 'fsync' (attempt to use a closed file)")
    assert.has_error(function() core.fsync("not a file") end)
    local p = assert(io.popen("true", "r"))
    local ok, err = core.fsync(p) -- a pipe cannot be synced: a runtime failure, not a raise
    p:close()
    assert.is_nil(ok)
    assert.matches("fsync", err)
  end)

  it("fsync_dir syncs a directory and reports a missing one", function()
    assert.is_true(core.fsync_dir(dir))
    local ok, err = core.fsync_dir(dir .. "/missing")
    assert.is_nil(ok)
    assert.matches("missing", err, 1, true)
    ok = core.fsync_dir(dir .. "/")
    assert.is_true(ok)
  end)

  it("open_file creates private files, close-on-exec, as ordinary Lua handles", function()
    local path = dir .. "/private"
    local f = assert(core.open_file(path, "w"))
    assert.equal("file", io.type(f))
    assert.equal("600", perm(path))
    f:write("abc")
    assert(f:close())
    assert.equal("abc", read_file(path))
    f = assert(core.open_file(path, "a"))
    f:write("def")
    f:close()
    assert.equal("abcdef", read_file(path))
    f = assert(core.open_file(path, "r"))
    assert.equal("abcdef", f:read("a"))
    f:close()
    f = assert(core.open_file(dir .. "/shared", "w", tonumber("644", 8)))
    f:close()
    assert.equal("644", perm(dir .. "/shared"))
    local ok, err = core.open_file(dir .. "/nope/x", "r")
    assert.is_nil(ok)
    assert.matches("nope/x", err, 1, true)
    assert.has_error(function() core.open_file(path, "rw") end)
    assert.has_error(function() core.open_file(path, "r", -1) end)

    -- A child process sees the descriptor io.open made, not the one open_file made.
    local function child_sees(handle)
      local p = assert(io.popen("ls -l /proc/self/fd/"))
      local listing = p:read("a")
      p:close()
      handle:close()
      return listing:find(path, 1, true) ~= nil
    end
    assert.is_true(child_sees(assert(io.open(path, "r"))))
    assert.is_false(child_sees(assert(core.open_file(path, "r"))))
  end)

  it("mkdirs makes missing parents 0700, keeps existing ones, fails through a file", function()
    assert.is_true(core.mkdirs(dir .. "/a/b//c/"))
    assert.equal("700", perm(dir .. "/a"))
    assert.equal("700", perm(dir .. "/a/b/c"))
    assert.is_true(core.mkdirs(dir .. "/a/b"))
    assert.is_true(core.mkdirs(dir .. "/m", tonumber("755", 8)))
    assert.equal("755", perm(dir .. "/m"))
    write_file(dir .. "/file", "x")
    local ok, err = core.mkdirs(dir .. "/file/sub")
    assert.is_nil(ok)
    assert.matches("file/sub", err, 1, true)
    ok, err = core.mkdirs(dir .. "/file")
    assert.is_nil(ok)
    assert.matches("Not a directory", err, 1, true)
  end)

  it("lock excludes other handles of this process until closed", function()
    local path = dir .. "/lock"
    local a = assert(core.open_file(path, "a"))
    local b = assert(core.open_file(path, "a"))
    assert.is_true(core.lock(a))
    local ok, err = core.lock(b)
    assert.is_nil(ok)
    assert.equal("locked", err)
    a:close()
    assert.is_true(core.lock(b))
    b:close()
  end)

  it("lock is refused while another process holds it, granted after", function()
    local path = dir .. "/lock"
    local pipe = hold("lock", path)
    finally(function() release(pipe) end)
    local f = assert(core.open_file(path, "a"))
    local ok, err = core.lock(f)
    assert.is_nil(ok)
    assert.equal("locked", err)
    release(pipe) -- waits for the child to exit
    assert.is_true(core.lock(f))
    f:close()
  end)
end)

describe("xmppsm.store", function()
  local path
  before_each(function() path = dir .. "/state/acct.sm" end)

  it("starts empty, creating a private directory and file", function()
    local s, state = open(path)
    assert.same({ inbound = 0, acked = 0, items = {} }, state)
    assert.is_nil(state.session)
    assert.equal("700", perm(dir .. "/state"))
    assert.equal("600", perm(path))
    assert.equal("600", perm(path .. ".lock"))
    assert.is_true(s:close())
    assert.is_true(s:close()) -- idempotent
    assert.same(state, reload(path))
  end)

  it("round-trips every mutation, each one durable on return", function()
    local s = open(path)
    local expect = child.empty()
    local function check()
      assert.same(expect, s:state())
      -- "write" durability: another reader sees the change at once, before close()
      local copy = dir .. "/copy.sm"
      write_file(copy, read_file(path))
      assert.same(expect, reload(copy))
    end
    check()
    assert.is_true(s:queued("<message id='0'/>", 10))
    expect.items[1] = { raw = "<message id='0'/>", stamp = 10.0 }
    check()
    assert.is_true(s:enabled(session(2)))
    expect.session = session(2)
    check()
    for i = 1, 5 do
      assert.is_true(s:queued("<message id='" .. i .. "'>\0binary\255</message>", 100 + i / 4))
      expect.items[#expect.items + 1] = { raw = "<message id='" .. i .. "'>\0binary\255</message>",
                                          stamp = 100 + i / 4 }
      check()
    end
    assert.is_true(s:inbound(7))
    expect.inbound = 7
    check()
    assert.is_true(s:acked(3, 2))
    expect.acked = 3
    table.remove(expect.items, 1)
    table.remove(expect.items, 1)
    check()
    assert.is_true(s:acked(3, 0))
    check()
    assert.is_true(s:inbound(4294967295))
    expect.inbound = 4294967295
    check()
    assert.is_true(s:resumed { location = "xmpp.example.com:5222" })
    expect.session.location = "xmpp.example.com:5222"
    check()
    assert.is_true(s:resumed { location = false, max = 60 })
    expect.session.location, expect.session.max = nil, 60
    check()
    assert.is_true(s:resumed())
    check()
    assert.is_true(s:ended())
    expect.session, expect.inbound, expect.acked = nil, 0, 0
    check()
    assert.equal(4, #expect.items) -- kept
    assert.is_true(s:enabled(session(3)))
    assert.is_true(s:inbound(9))
    assert.is_true(s:acked(2, 1))
    assert.is_true(s:enabled(session(4))) -- a new session: counters restart, items stay
    expect.session = session(4)
    table.remove(expect.items, 1)
    check()
    local replacement = {
      session = session(5), inbound = 12, acked = 4294967295,
      items = { { raw = "<iq/>", stamp = 1.5 }, { raw = "", stamp = 2 } },
    }
    assert.is_true(s:replace(replacement))
    expect = { session = session(5), inbound = 12, acked = 4294967295,
               items = { { raw = "<iq/>", stamp = 1.5 }, { raw = "", stamp = 2.0 } } }
    check()
    assert.is_true(s:replace { inbound = 0, acked = 0, items = {} })
    expect = child.empty()
    check()
    s:close()
  end)

  it("keeps number subtypes, stamps as floats", function()
    local s = open(path)
    assert(s:enabled { id = "x", jid = "a@b/c", enabled_at = 1700000000.25, max = 300 })
    assert(s:queued("<m/>", 5))
    s:close()
    local state = reload(path)
    assert.equal("float", math.type(state.session.enabled_at))
    assert.equal(1700000000.25, state.session.enabled_at)
    assert.equal("integer", math.type(state.session.max))
    assert.equal("float", math.type(state.items[1].stamp))
  end)

  it("keeps its item indices bounded however many stanzas pass through", function()
    -- Items are rebased to start at 1 once more of their index range is freed than held, so
    -- the arrays stay dense (their array part, no hash churn). The state stays the model's.
    local s = open(path, { durability = "none" })
    assert.is_true(s:enabled(session(1)))
    local model = child.empty()
    model.session = session(1)
    local n, h = 0, 0
    for round = 1, 60 do
      for _ = 1, 100 do
        n = n + 1
        local raw, stamp = "m" .. n, n + 0.5
        assert.is_true(s:queued(raw, stamp))
        model.items[#model.items + 1] = { raw = raw, stamp = stamp }
      end
      local released = round % 7 == 0 and #model.items or 90
      h = h + released
      assert.is_true(s:acked(h, released))
      child.apply(model, "acked", { h, released })
      local held = #model.items
      assert.is_true(s.tail - s.head + 1 == held and s.tail <= 2 * held + 256 + 100,
                     "round " .. round .. ": items at " .. s.head .. ".." .. s.tail)
      assert.same(model, s:state(), "round " .. round)
    end
    assert.is_true(n > 5000)
    s:close()
    assert.same(model, reload(path))
  end)

  it("matches a model through a long random sequence of mutations and reopenings", function()
    local seed = random_seed()
    local s = open(path)
    local model = child.empty()
    for step = 1, 600 do
      local r = math.random(100)
      local what
      if r <= 45 then
        local raw = string.rep(string.char(math.random(0, 255)), math.random(0, 300))
        local stamp = math.random() * 2e9
        assert.is_true(s:queued(raw, stamp))
        model.items[#model.items + 1] = { raw = raw, stamp = stamp }
        what = "queued"
      elseif r <= 65 then
        local released = math.random(0, #model.items)
        local h = math.random(0, 4294967295)
        assert.is_true(s:acked(h, released))
        child.apply(model, "acked", { h, released })
        what = "acked"
      elseif r <= 80 then
        local h = math.random(0, 4294967295)
        assert.is_true(s:inbound(h))
        model.inbound = h
        what = "inbound"
      elseif r <= 86 then
        local sess = session(step)
        assert.is_true(s:enabled(sess))
        model.session, model.inbound, model.acked = sess, 0, 0
        what = "enabled"
      elseif r <= 90 and model.session then
        assert.is_true(s:resumed { location = "host" .. step })
        model.session.location = "host" .. step
        what = "resumed"
      elseif r <= 93 then
        assert.is_true(s:ended())
        model.session, model.inbound, model.acked = nil, 0, 0
        what = "ended"
      elseif r <= 95 then
        assert.is_true(s:compact())
        what = "compact"
      else
        s:close()
        s = open(path)
        what = "reopen"
      end
      assert.same(model, s:state(), "step " .. step .. " (" .. what .. "), seed " .. seed)
    end
    s:close()
    assert.same(model, reload(path), "seed " .. seed)
  end)

  describe("damage", function()
    -- Builds a journal, then returns its bytes before and after one last mutation.
    local function journal_with_last(last)
      local s = open(path)
      assert(s:enabled(session(1)))
      for i = 1, 6 do assert(s:queued(child.raw(i), i)) end
      assert(s:inbound(3))
      assert(s:acked(2, 2))
      local before, state_before = read_file(path), s:state()
      last(s)
      local after, state_after = read_file(path), s:state()
      s:close()
      assert.equal(before, after:sub(1, #before))
      assert.is_true(#after > #before)
      return before, state_before, after, state_after
    end

    local lasts = {
      queued = function(s) assert(s:queued(child.raw(99), 99)) end,
      acked = function(s) assert(s:acked(5, 3)) end,
      inbound = function(s) assert(s:inbound(4)) end,
      enabled = function(s) assert(s:enabled(session(2))) end,
      ended = function(s) assert(s:ended()) end,
    }
    for name, last in pairs(lasts) do
      it("drops a " .. name .. " record cut at any byte, without a warning", function()
        local before, state_before, after, state_after = journal_with_last(last)
        local copy = dir .. "/copy.sm"
        for cut = #before, #after do
          write_file(copy, after:sub(1, cut))
          local s = assert(store.file(copy))
          local state, warning = s:load()
          assert.is_nil(warning, "cut at " .. cut)
          assert.same(cut == #after and state_after or state_before, state, "cut at " .. cut)
          -- The cut-off bytes are gone from the file: the next record does not land after them.
          assert(s:queued("<next/>", 1))
          s:close()
          local again = reload(copy)
          assert.equal("<next/>", again.items[#again.items].raw, "cut at " .. cut)
          assert.equal(#state.items + 1, #again.items)
          assert.is_false(exists(copy .. ".corrupt"))
        end
      end)
    end

    it("treats a tail of zero bytes or a garbled complete last record as a cut-short append", function()
      local before, state_before, after, state_after = journal_with_last(lasts.queued)
      write_file(path, after .. string.rep("\0", 5000))
      local s, state = open(path)
      s:close()
      assert.same(state_after, state)
      -- the last record complete, but its payload garbled, as a power loss can leave it
      local garbled = after:sub(1, -6) .. string.char(after:byte(-5) ~ 0xFF) .. after:sub(-4)
      write_file(path, garbled)
      s, state = open(path)
      s:close()
      assert.same(state_before, state)
      assert.is_true(#before < #garbled)
    end)

    it("starts fresh with a warning and keeps the file aside when a byte changes before the end", function()
      local before, _, after = journal_with_last(lasts.queued)
      local copy = dir .. "/copy.sm"
      for pos = 1, #before do
        -- every byte, flipped whole or by one bit in turn
        for _, mask in ipairs { pos % 2 == 0 and 0xFF or 0x01 } do
          local bad = after:sub(1, pos - 1) .. string.char(after:byte(pos) ~ mask) .. after:sub(pos + 1)
          write_file(copy, bad)
          os.remove(copy .. ".corrupt")
          local s = assert(store.file(copy))
          local state, warning = s:load()
          local where = "byte " .. pos .. " mask " .. mask
          assert.same(child.empty(), state, where)
          assert.is_string(warning, where)
          assert.matches(copy .. " is damaged", warning, 1, true)
          assert.matches(copy .. ".corrupt", warning, 1, true)
          assert.equal(bad, read_file(copy .. ".corrupt"), where)
          -- usable at once, and the new file is sound
          assert(s:queued("<after/>", 1))
          s:close()
          assert.equal("<after/>", reload(copy).items[1].raw, where)
        end
      end
    end)

    it("keeps earlier damaged copies", function()
      open(path):close()
      write_file(path, "garbage one")
      local s = assert(store.file(path))
      local _, w1 = s:load()
      s:close()
      write_file(path, "garbage two")
      s = assert(store.file(path))
      local _, w2 = s:load()
      s:close()
      assert.matches("bad magic", w1)
      assert.matches(path .. ".corrupt.2", w2, 1, true)
      assert.equal("garbage one", read_file(path .. ".corrupt"))
      assert.equal("garbage two", read_file(path .. ".corrupt.2"))
    end)

    it("refuses a bad magic, an unknown version, a cut header, with a warning", function()
      open(path):close()
      local good = read_file(path)
      local cases = {
        ["bad magic"] = "X" .. good:sub(2),
        ["unsupported version 2"] = good:sub(1, 8) .. string.pack("<I4", 2) .. good:sub(13),
        ["truncated header"] = good:sub(1, 5),
        ["not an xmppsm store"] = "hello",
      }
      for reason, bytes in pairs(cases) do
        write_file(path, bytes)
        os.remove(path .. ".corrupt")
        local s = assert(store.file(path))
        local state, warning = s:load()
        s:close()
        assert.same(child.empty(), state)
        assert.matches(reason, warning, 1, true)
        assert.equal(bytes, read_file(path .. ".corrupt"))
      end
    end)

    it("loads an empty file as an empty state, without a warning", function()
      assert(core.mkdirs(dir .. "/state"))
      write_file(path, "")
      local s, state = open(path)
      s:close()
      assert.same(child.empty(), state)
    end)
  end)

  describe("locking", function()
    it("refuses a second open of the same path until close()", function()
      local a = assert(store.file(path))
      local b, err = store.file(path)
      assert.is_nil(b)
      assert.equal("xmppsm.store: " .. path .. " is in use by another process (or another open store)", err)
      a:close()
      b = assert(store.file(path))
      b:close()
    end)

    it("holds across compactions, which replace the journal file", function()
      local a = open(path, { compact_slack = 65536 })
      for i = 1, 400 do assert(a:queued(string.rep("c", 300), i)) end
      local big = size(path)
      assert(a:acked(400, 400))
      assert.is_true(size(path) < big / 10) -- compacted: a new file renamed over the old
      assert.is_nil((store.file(path)))
      a:close()
      local b = assert(store.file(path))
      b:close()
    end)

    it("refuses a path that another process holds", function()
      local pipe = hold("hold", path)
      finally(function() release(pipe) end)
      local s, err = store.file(path)
      assert.is_nil(s)
      assert.matches("in use by another process", err, 1, true)
      release(pipe)
      s = assert(store.file(path))
      s:close()
    end)

    it("is released by __close and by garbage collection", function()
      do
        local s <close> = assert(store.file(path))
        assert.equal("xmppsm.store", getmetatable(s).__name)
        assert.is_nil((store.file(path)))
      end
      assert(store.file(path)) -- dropped without close()
      assert.is_nil((store.file(path)))
      collectgarbage()
      collectgarbage()
      local s = assert(store.file(path))
      s:close()
    end)
  end)

  describe("compaction", function()
    it("shrinks the journal when acknowledgements release most of it, keeping the state", function()
      local s = open(path, { compact_slack = 65536 })
      assert(s:enabled(session(1)))
      for i = 1, 1000 do assert(s:queued(string.rep("p", 200) .. i, i)) end
      local big = size(path)
      assert.is_true(big > 200000)
      assert(s:acked(990, 990))
      local small = size(path)
      assert.is_true(small < 5000, "journal of " .. small .. " bytes")
      assert.is_false(exists(path .. ".tmp"))
      local expect = s:state()
      assert.equal(10, #expect.items)
      assert.equal(string.rep("p", 200) .. 991, expect.items[1].raw)
      assert(s:queued("<later/>", 2000)) -- appending goes on in the new file
      expect.items[11] = { raw = "<later/>", stamp = 2000.0 }
      s:close()
      assert.same(expect, reload(path))
    end)

    it("bounds a journal of counter updates", function()
      local s = open(path, { compact_slack = 65536 })
      for h = 1, 20000 do assert(s:inbound(h)) end
      -- without compaction: 17 bytes per update, 340000 bytes
      assert.is_true(size(path) < 2 * 65536 + 1000, "journal of " .. size(path) .. " bytes")
      s:close()
      assert.equal(20000, reload(path).inbound)
    end)

    -- The rule: compacted by the append that takes the journal past twice a snapshot of the
    -- state plus compact_slack. With no items the snapshot is the journal just loaded; a
    -- counter record is 17 bytes.
    local function compaction_edge(opts, slack)
      local s = open(path, opts)
      local start = size(path)
      local limit = 2 * start + slack
      local last = (limit - start) // 17   -- the last update that keeps the journal <= limit
      for h = 1, last do assert(s:inbound(h)) end
      assert.equal(start + 17 * last, size(path))   -- at the limit or just below: not compacted
      assert.is_true(size(path) <= limit)
      assert(s:inbound(last + 1))                    -- one more passes it: compacted
      assert.is_true(size(path) < start + 17, "journal of " .. size(path) .. " bytes")
      s:close()
      assert.equal(last + 1, reload(path).inbound)
    end

    it("compacts at the edge of the default slack, 1 MiB", function()
      compaction_edge(nil, 1048576)
    end)

    it("compacts at the edge of a given compact_slack, including 0", function()
      compaction_edge({ compact_slack = 5000 }, 5000)
      os.remove(path)
      compaction_edge({ compact_slack = 0 }, 0)
    end)

    it("counts a large session in the snapshot: no compaction per change, even with no slack", function()
      local s = open(path, { compact_slack = 0 })
      local big = session(1)
      big.location = string.rep("l", 2000) .. ".example.net:5222"
      assert(s:enabled(big))
      local before = s.compactions
      for h = 1, 1000 do assert(s:inbound(h)) end
      -- a snapshot is ~2.1 KB, so one compaction per ~2.1 KB of 17-byte records: ~8, not 1000
      local made = s.compactions - before
      assert.is_true(made >= 4 and made <= 12, made .. " compactions")
      s:close()
      assert.same(big, reload(path).session)
    end)

    it("never compacts for a slack as large as an integer goes", function()
      local s = open(path, { compact_slack = math.maxinteger })
      local before = s.compactions
      for h = 1, 300 do assert(s:inbound(h)) end
      assert.equal(before, s.compactions)
      s:close()
      assert.equal(300, reload(path).inbound)
    end)

    it("does not compact while the journal is mostly live state", function()
      -- No slack at all: what keeps it from compacting is the factor 2 alone.
      local s = open(path, { compact_slack = 0 })
      local sizes = {}
      for i = 1, 2000 do
        assert(s:queued(string.rep("q", 100), i))
        sizes[i] = size(path)
      end
      for i = 2, 2000 do assert.is_true(sizes[i] > sizes[i - 1], "shrank at " .. i) end
      s:close()
    end)
  end)

  describe("durability modes", function()
    it("'none' buffers until close, 'write' and 'fsync' write before returning", function()
      for _, mode in ipairs { "none", "write", "fsync" } do
        local p = dir .. "/" .. mode .. ".sm"
        local s = open(p, { durability = mode })
        local empty = size(p)
        for i = 1, 20 do assert(s:queued("<message id='" .. i .. "'/>", i)) end
        if mode == "none" then
          assert.equal(empty, size(p))
        else
          local copy = dir .. "/copy-" .. mode
          write_file(copy, read_file(p))
          assert.equal(20, #reload(copy).items, mode)
        end
        assert.is_true(s:close())
        assert.equal(20, #reload(p).items, mode)
      end
    end)

    it("rejects an unknown mode or option", function()
      assert.has_error(function() store.file(path, { durability = "sometimes" }) end)
      assert.has_error(function() store.file(path, { durabilty = "none" }) end)
      for _, bad in ipairs { -1, 1.5, "1", true } do
        assert.has_error(function() store.file(path, { compact_slack = bad }) end,
                         "xmppsm.store.file: compact_slack must be an integer >= 0 (bytes)")
      end
    end)
  end)

  it("fails a write cleanly when the disk refuses it, and recovers", function()
    -- RLIMIT_FSIZE stands in for a full disk: write() fails with EFBIG part-way.
    local out = dir .. "/fill.out"
    local cmd = "trap '' XFSZ; ulimit -f 200; " .. child_cmd("fill", path) .. " >" .. q(out) .. " 2>&1"
    os.execute("sh -c " .. q(cmd))
    local got = read_file(out) or ""
    local n = tonumber(got:match("queued (%d+)\n"))
    assert.is_number(n, got)
    assert.is_true(n > 10, got)
    assert.matches("failed xmppsm.store: writing " .. path .. ": write record: File too large", got, 1, true)
    -- the failed calls left no item behind
    assert.equal(2, select(2, got:gsub("count " .. n .. "\n", "")), got)
    assert.matches("again nil\n", got, 1, true) -- too big to fit even after a rewrite
    assert.matches("acked true nil\n", got, 1, true)
    assert.matches("recovered true nil\n", got, 1, true)
    assert.matches("closed true\n", got, 1, true)
    local state = reload(path) -- no warning: the partial record was not left in the middle
    assert.equal(n, state.acked)
    assert.same({ { raw = "<message id='recovered'/>", stamp = 2.0 } }, state.items)
    assert.same(child.session, state.session)
  end)

  describe("misuse raises", function()
    it("before load, after close, with bad arguments", function()
      local s = assert(store.file(path))
      assert.has_error(function() s:queued("<m/>", 1) end, "xmppsm.store: queued: call load() first")
      assert(s:load())
      assert.has_error(function() s:queued(1, 1) end, "xmppsm.store: queued: raw must be a string")
      assert.has_error(function() s:queued("<m/>") end, "xmppsm.store: queued: stamp must be a number")
      assert.has_error(function() s:acked(1, 1) end)
      assert.has_error(function() s:acked(-1, 0) end)
      assert.has_error(function() s:acked(2 ^ 32, 0) end)
      assert.has_error(function() s:acked(1.5, 0) end)
      assert.has_error(function() s:inbound("x") end)
      assert.has_error(function() s:inbound("5") end)
      assert.has_error(function() s:acked(0, "0") end)
      assert.has_error(function() s:enabled { id = "x", jid = "a@b/c" } end)
      assert.has_error(function() s:enabled { id = "", jid = "a@b/c", enabled_at = 1 } end)
      assert.has_error(function() s:enabled { id = "x", jid = "a@b/c", enabled_at = 1, max = 0 / 0 } end)
      assert.has_error(function() s:enabled { id = "x", jid = "a@b/c", enabled_at = 1, extra = 1 } end,
        'xmppsm.store: enabled: unknown session field "extra"')
      assert.has_error(function() s:resumed {} end, "xmppsm.store: resumed: no session is stored")
      assert.has_error(function() s:replace { items = { { raw = 1 } } } end)
      assert(s:queued("<m/>", 1))
      assert.has_error(function() s:acked(1, 2) end)
      assert.same(1, #s:state().items) -- nothing applied by the refused calls
      s:close()
      assert.has_error(function() s:queued("<m/>", 1) end, "xmppsm.store: queued: the store is closed")
      assert.has_error(function() s:load() end)
      assert.has_error(function() store.file("") end)
      assert.has_error(function() store.file(dir .. "/") end)
    end)

    it("reports the caller's line", function()
      local s = open(path)
      local ok, err = pcall(function() s:acked(-1, 0) end)
      assert.is_false(ok)
      assert.matches("store_spec.lua:%d+: xmppsm.store: acked: h must be", err)
      ok, err = pcall(function() s:enabled { id = 1 } end)
      assert.is_false(ok)
      assert.matches("store_spec.lua:%d+: xmppsm.store: enabled: session.id must be a string", err)
      s:close()
    end)

    it("returns nil, err when the directory cannot be made", function()
      write_file(dir .. "/plain", "x")
      local s, err = store.file(dir .. "/plain/acct.sm")
      assert.is_nil(s)
      assert.matches("cannot create the directory of", err, 1, true)
    end)
  end)

  describe("custom", function()
    local function memory()
      local m = { saves = 0 }
      m.load = function() return m.blob end
      m.save = function(blob)
        if m.fail == "return" then return nil, "disk on fire" end
        if m.fail == "false" then return false end
        if m.fail == "raise" then error("thrown") end
        m.saves = m.saves + 1
        m.blob = blob
      end
      return m
    end

    it("saves a snapshot on each change and loads it back", function()
      local m = memory()
      local s = store.custom(m)
      local state, warning = s:load()
      assert.same(child.empty(), state)
      assert.is_nil(warning)
      assert.equal(0, m.saves)
      assert(s:enabled(session(1)))
      assert(s:queued("<a/>", 1))
      assert(s:queued("<b/>", 2))
      assert(s:inbound(5))
      assert(s:acked(1, 1))
      assert.equal(5, m.saves)
      local expect = s:state()
      s:close()
      local s2 = store.custom { load = function() return m.blob end, save = function() end }
      assert.same(expect, (s2:load()))
      assert.same({ { raw = "<b/>", stamp = 2.0 } }, expect.items)
    end)

    it("leaves the state as it was when save fails", function()
      local m = memory()
      local s = store.custom(m)
      s:load()
      assert(s:queued("<a/>", 1))
      local before = s:state()
      m.fail = "return"
      local ok, err = s:queued("<b/>", 2)
      assert.is_nil(ok)
      assert.equal("xmppsm.store: save failed: disk on fire", err)
      assert.same(before, s:state())
      assert.is_nil((s:acked(1, 1)))
      assert.is_nil((s:replace { items = {} }))
      assert.is_nil((s:ended()))
      assert.same(before, s:state())
      m.fail = "raise"
      ok, err = s:inbound(3)
      assert.is_nil(ok)
      assert.matches("save failed: .*thrown", err)
      m.fail = "false"
      assert.is_nil((s:enabled(session(1))))
      assert.same(before, s:state())
      m.fail = nil
      assert(s:queued("<c/>", 3))
      local again = store.custom { load = function() return m.blob end, save = m.save }
      assert.same({ "<a/>", "<c/>" }, { again:load().items[1].raw, again:load().items[2].raw })
    end)

    it("warns about a damaged blob and hands it to corrupt()", function()
      local m = memory()
      local s = store.custom(m)
      s:load()
      assert(s:queued("<a/>", 1))
      local good = m.blob
      for _, bad in ipairs { good:sub(1, -2), good:sub(1, 20) .. "X" .. good:sub(22), "junk" } do
        local seen
        local s2 = store.custom { load = function() return bad end, save = function() end,
                                  corrupt = function(blob, reason) seen = { blob, reason } end }
        local state, warning = s2:load()
        assert.same(child.empty(), state)
        assert.matches("the saved state is damaged", warning, 1, true)
        assert.equal(bad, seen[1])
        assert.is_string(seen[2])
      end
    end)

    it("reports a failing load", function()
      local cases = {
        function() error("no database") end,
        function() return nil, "timeout" end,
        function() return 42 end,
      }
      for _, load in ipairs(cases) do
        local s = store.custom { load = load, save = function() end }
        local state, err = s:load()
        assert.is_nil(state)
        assert.matches("xmppsm.store: load", err, 1, true)
        assert.has_error(function() s:queued("<a/>", 1) end) -- still not loaded
      end
      assert.has_error(function() store.custom { load = function() end } end)
    end)
  end)

  describe("default_path", function()
    local function path_in(env, jid)
      local p = assert(io.popen("env -u XDG_STATE_HOME -u HOME " .. env .. " " .. child_cmd("path", jid)))
      local got = p:read("l")
      p:close()
      return got
    end

    it("honours XDG_STATE_HOME, else ~/.local/state", function()
      assert.equal("/xdg/state/xmppsm/bot@example.com.sm", path_in("XDG_STATE_HOME=/xdg/state HOME=/h",
        "bot@example.com"))
      assert.equal("/h/.local/state/xmppsm/bot@example.com.sm", path_in("HOME=/h", "bot@example.com"))
      -- the XDG specification: a relative path is to be ignored
      assert.equal("/h/.local/state/xmppsm/bot@example.com.sm",
        path_in("XDG_STATE_HOME=rel HOME=/h", "bot@example.com"))
      assert.equal("nil", path_in("", "bot@example.com"))
    end)

    it("escapes the JID into one safe, case-folded file name", function()
      local function name(jid) return store.default_path(jid):match("/xmppsm/([^/]*)$") end
      assert.equal("bot@example.com.sm", name("Bot@Example.COM"))
      assert.equal("a%20b%25c%3A@x.sm", name("a b%c:@x"))
      assert.equal("%2E..sm", name("..")) -- neither hidden nor "..": the leading dot is escaped
      assert.equal("%C3%A9t%C3%A9@example.org.sm", name("\195\169t\195\169@example.org"))
      assert.not_equal(name("a%20b@x"), name("a b@x"))
      local long = name(string.rep("x", 1023) .. "@example.com")
      assert.is_true(#long <= 200)
      assert.not_equal(long, name(string.rep("x", 1022) .. "@example.com"))
      assert.has_error(function() store.default_path("bot@example.com/res") end)
      assert.has_error(function() store.default_path("") end)
    end)
  end)
end)
