-- Specs of the XEP-0198 counters and the outbound queue (csrc/queue.c, docs/core.md).
local core = require "xmppsm.core"

local MAX = 4294967295 -- 2^32 - 1, the largest h

-- Everything observable about a queue, for "untouched" and model comparisons.
local function listing(q)
  local out = {}
  for seq, raw, obj, stamp in q:each() do
    out[#out + 1] = { seq = seq, raw = raw, obj = obj, stamp = stamp }
  end
  return out
end

local function state(q)
  return {
    acked = q:acked(), pushed = q:pushed(), count = q:count(), bytes = q:bytes(),
    oldest = q:oldest_stamp(), items = listing(q),
  }
end

-- Released items come back as a flat table: raw, obj or false, stamp per item.
local function unflatten(items, n)
  local out = {}
  for i = 1, n do
    out[i] = { raw = items[3 * i - 2], obj = items[3 * i - 1], stamp = items[3 * i] }
  end
  assert.is_nil(items[3 * n + 1])
  return out
end

-- The snapshot format (docs/core.md), so specs can craft inputs with a valid checksum.
local function fnv1a64(s)
  local h = 0xcbf29ce484222325
  for i = 1, #s do
    h = (h ~ s:byte(i)) * 0x100000001b3
  end
  return h
end

local function sign(body)
  return body .. string.pack(">j", fnv1a64(body))
end

local function craft(acked, pushed, count, items, version)
  local parts = { "XSMQ", string.char(version or 1), string.pack(">I4I4I4", acked, pushed, count) }
  for _, it in ipairs(items or {}) do
    parts[#parts + 1] = string.pack(">d>I8", it.stamp, it.size or #it.raw) .. it.raw
  end
  return sign(table.concat(parts))
end

describe("core.parse_h", function()
  it("accepts decimal values from 0 to 4294967295, leading zeros included", function()
    assert.equal(0, core.parse_h("0"))
    assert.equal(1, core.parse_h("1"))
    assert.equal(MAX, core.parse_h("4294967295"))
    assert.equal(7, core.parse_h("007"))
    assert.equal(MAX, core.parse_h(string.rep("0", 100) .. "4294967295"))
    assert.is_true(math.type(core.parse_h("42")) == "integer")
  end)

  it("refuses anything else with nil, err", function()
    local bad = { "", "-1", "+1", " 1", "1 ", "\t1", "1\n", "4294967296", "4294967300",
      "99999999999999999999", "18446744073709551616", "0x10", "1e3", "1.0", ".5", "1,000",
      "1\0", "\0" .. "1", "\0", "one", "١" }
    for _, s in ipairs(bad) do
      local h, err = core.parse_h(s)
      assert.is_nil(h, ("%q"):format(s))
      assert.is_string(err, ("%q"):format(s))
      assert.matches("^invalid h", err)
    end
  end)

  it("raises when not given a string", function()
    assert.has_error(function() core.parse_h(5) end)
    assert.has_error(function() core.parse_h(nil) end)
  end)
end)

describe("core.h_add and core.h_diff", function()
  it("wrap at 2^32", function()
    assert.equal(5, core.h_add(2, 3))
    assert.equal(0, core.h_add(MAX, 1))
    assert.equal(1, core.h_add(MAX, 2))
    assert.equal(MAX, core.h_add(0, -1))
    assert.equal(3, core.h_add(3, 2 ^ 32 // 1))
    assert.equal(2, core.h_diff(5, 3))
    assert.equal(1, core.h_diff(0, MAX))
    assert.equal(MAX, core.h_diff(0, 1))
    assert.equal(0, core.h_diff(MAX, MAX))
  end)

  it("raise on counters out of range or not integers", function()
    assert.has_error(function() core.h_add(-1, 1) end)
    assert.has_error(function() core.h_add(MAX + 1, 1) end)
    assert.has_error(function() core.h_add(1.5, 1) end)
    assert.has_error(function() core.h_add("1", 1) end)
    assert.has_error(function() core.h_diff(0, MAX + 1) end)
    assert.has_error(function() core.h_diff(nil, 0) end)
  end)
end)

describe("core.queue", function()
  it("starts empty with counters at 0", function()
    local q = core.queue()
    assert.same({ acked = 0, pushed = 0, count = 0, bytes = 0, items = {} }, state(q))
    assert.is_nil(q:oldest_stamp())
    local items, n = q:ack(0)
    assert.same({}, items)
    assert.equal(0, n)
  end)

  it("validates options", function()
    for _, opts in ipairs {
      { max_items = 0 }, { max_items = -1 }, { max_items = 1.5 }, { max_items = "10" },
      { max_items = true }, { max_items = 2 ^ 29 + 1 }, { max_bytes = 0 }, { max_bytes = "1" },
      { max_bytes = 0.5 }, { max_bytes = {} },
    } do
      local k, v = next(opts)
      assert.has_error(function() core.queue(opts) end, nil, k .. "=" .. tostring(v))
      assert.has_error(function() core.queue_restore(craft(0, 0, 0), opts) end)
    end
    assert.has_error(function() core.queue(5) end)
    assert.has_error(function() core.queue("x") end)
    assert.is_userdata(core.queue({ max_items = 2 ^ 29, max_bytes = math.maxinteger }))
    assert.is_userdata(core.queue({ max_items = 3.0 }))
  end)

  it("pushes, numbering from the counter and keeping raw, obj and stamp", function()
    local q = core.queue()
    local obj = { name = "message" }
    assert.equal(1, q:push("<a/>", obj, 10.5))
    assert.equal(2, q:push("<bb/>", nil, 11))
    assert.same({ acked = 0, pushed = 2, count = 2, bytes = 9, oldest = 10.5, items = {
      { seq = 1, raw = "<a/>", obj = obj, stamp = 10.5 },
      { seq = 2, raw = "<bb/>", obj = false, stamp = 11 },
    } }, state(q))
    assert.equal(obj, listing(q)[1].obj) -- the very table, not a copy
  end)

  it("holds objs weakly with weak_objects: a forgotten one reads false, bytes stay", function()
    local q = core.queue({ weak_objects = true, max_items = 100 })
    local kept = { name = "kept" }
    q:push("<a/>", kept, 1)
    -- enough pushes to grow the ring twice: the weak mode must survive every resize
    for i = 2, 40 do q:push("<m" .. i .. "/>", { name = "forgotten" .. i }, i) end
    collectgarbage()
    collectgarbage()
    local items = listing(q)
    assert.equal(40, #items)
    assert.equal(kept, items[1].obj)
    for i = 2, 40 do
      assert.equal("<m" .. i .. "/>", items[i].raw)
      assert.is_false(items[i].obj)
    end
    local released, n = q:ack(40)
    assert.equal(40, n)
    assert.equal(kept, released[2])
    assert.is_false(released[5])
    -- a strong queue keeps them all
    local strong = core.queue()
    strong:push("<x/>", { name = "x" }, 1)
    collectgarbage()
    assert.is_table(listing(strong)[1].obj)
  end)

  it("checks its arguments", function()
    local q = core.queue()
    assert.has_error(function() q:push(1, nil, 0) end)
    assert.has_error(function() q:push(nil, nil, 0) end)
    assert.has_error(function() q:push("x", nil) end)
    assert.has_error(function() q:push("x", nil, "1") end)
    assert.has_error(function() q:ack(-1) end)
    assert.has_error(function() q:ack(MAX + 1) end)
    assert.has_error(function() q:ack("1") end)
    assert.has_error(function() q:ack(0.5) end)
    assert.has_error(function() q:set_counter(MAX + 1) end)
    assert.has_error(function() q.count({}) end)
    assert.has_error(function() q.push(io.stdout, "x", nil, 0) end)
    assert.has_error(function() q.ack(core.queue, 0) end)
    assert.equal(0, q:count())
  end)

  describe("ack", function()
    local q, objs
    before_each(function()
      q = core.queue()
      objs = {}
      for i = 1, 5 do
        objs[i] = { i = i }
        q:push("s" .. i, objs[i], i)
      end
    end)

    it("releases in order, partially, and releases nothing for a repeated h", function()
      local items, n = q:ack(2)
      assert.equal(2, n)
      assert.same({ { raw = "s1", obj = objs[1], stamp = 1 }, { raw = "s2", obj = objs[2], stamp = 2 } },
        unflatten(items, n))
      assert.equal(objs[1], items[2])
      items, n = q:ack(2)
      assert.equal(0, n)
      assert.same({}, items)
      assert.same({ acked = 2, pushed = 5, count = 3, bytes = 6, oldest = 3, items = {
        { seq = 3, raw = "s3", obj = objs[3], stamp = 3 },
        { seq = 4, raw = "s4", obj = objs[4], stamp = 4 },
        { seq = 5, raw = "s5", obj = objs[5], stamp = 5 },
      } }, state(q))
      items, n = q:ack(3)
      assert.equal(1, n)
      assert.equal("s3", items[1])
      items, n = q:ack(5)
      assert.equal(2, n)
      assert.same({ "s4", objs[4], 4, "s5", objs[5], 5 }, items)
      assert.same({ acked = 5, pushed = 5, count = 0, bytes = 0, items = {} }, state(q))
    end)

    it("refuses an h one too high, far too high, or stale, leaving the queue untouched", function()
      q:ack(1)
      local before = state(q)
      for _, h in ipairs { 6, 7, 1000, MAX, 0 } do
        local items, cond, text = q:ack(h)
        assert.is_nil(items, h)
        assert.equal("handled-count-too-high", cond)
        assert.matches("h=" .. h .. " ", text)
        assert.matches("last acknowledged h=1", text, 1, true)
        assert.matches("last sent 5", text, 1, true)
        assert.same(before, state(q))
      end
      local _, n = q:ack(5)
      assert.equal(4, n)
    end)
  end)

  describe("counters across 2^32", function()
    it("number stanzas 4294967295, 0, 1 and ack across the wrap", function()
      local q = core.queue()
      q:set_counter(MAX - 2)
      assert.equal(MAX - 2, q:acked())
      assert.equal(MAX - 2, q:pushed())
      local seqs = {}
      for i = 1, 6 do
        seqs[i] = q:push("w" .. i, nil, i)
      end
      assert.same({ MAX - 1, MAX, 0, 1, 2, 3 }, seqs)
      local l = listing(q)
      for i = 1, 6 do
        assert.equal(seqs[i], l[i].seq)
      end
      assert.equal(3, q:pushed())

      -- an h beyond what was pushed, seen across the wrap: one too high and far too high
      local before = state(q)
      for _, h in ipairs { 4, 5, 1000, MAX - 3, MAX - 100 } do
        local items, cond = q:ack(h)
        assert.is_nil(items)
        assert.equal("handled-count-too-high", cond)
        assert.same(before, state(q))
      end

      local items, n = q:ack(MAX)
      assert.equal(2, n)
      assert.same({ "w1", false, 1, "w2", false, 2 }, items)
      items, n = q:ack(1)
      assert.equal(2, n)
      assert.same({ "w3", false, 3, "w4", false, 4 }, items)
      assert.equal(1, q:acked())
      items, n = q:ack(3)
      assert.equal(2, n)
      assert.same({ "w5", false, 5, "w6", false, 6 }, items)
      assert.same({ acked = 3, pushed = 3, count = 0, bytes = 0, items = {} }, state(q))
    end)

    it("acks everything across the wrap in one go", function()
      local q = core.queue()
      q:set_counter(MAX - 9)
      for i = 1, 20 do
        q:push(tostring(i), nil, i)
      end
      assert.equal(10, q:pushed())
      local items, n = q:ack(10)
      assert.equal(20, n)
      for i = 1, 20 do
        assert.equal(tostring(i), items[3 * i - 2])
        assert.equal(i, items[3 * i])
      end
      assert.same({ acked = 10, pushed = 10, count = 0, bytes = 0, items = {} }, state(q))
    end)
  end)

  it("set_counter refuses a non-empty queue", function()
    local q = core.queue()
    q:push("a", nil, 0)
    assert.has_error(function() q:set_counter(0) end)
    assert.equal(1, q:pushed())
    q:ack(1)
    q:set_counter(MAX)
    assert.equal(MAX, q:acked())
    assert.equal(0, q:push("b", nil, 0))
  end)
end)

describe("queue limits", function()
  it("default to 10000 stanzas", function()
    local q = core.queue()
    for i = 1, 10000 do
      assert.equal(i, q:push("x", nil, 0))
    end
    local seq, cond, text = q:push("x", nil, 0)
    assert.is_nil(seq)
    assert.equal("queue-full", cond)
    assert.matches("max_items is 10000", text, 1, true)
    assert.equal(10000, q:count())
  end)

  it("default to 16 MiB", function()
    local q = core.queue()
    assert.equal(1, q:push(string.rep("a", 16 * 1024 * 1024 - 1), nil, 0))
    assert.equal(2, q:push("b", nil, 0))
    local seq, cond, text = q:push("c", nil, 0)
    assert.is_nil(seq)
    assert.equal("queue-full", cond)
    assert.matches("max_bytes 16777216", text, 1, true)
  end)

  it("let exactly max_items in, refuse one more storing nothing, and make room on ack", function()
    local q = core.queue({ max_items = 3 })
    for i = 1, 3 do
      assert.equal(i, q:push("s" .. i, nil, i))
    end
    local before = state(q)
    local seq, cond = q:push("s4", {}, 4)
    assert.is_nil(seq)
    assert.equal("queue-full", cond)
    assert.same(before, state(q))
    q:ack(1)
    assert.equal(4, q:push("s4", nil, 4))
    assert.is_nil((q:push("s5", nil, 5)))
    assert.equal(4, q:pushed())
  end)

  it("let exactly max_bytes in, refuse one byte more storing nothing, and make room on ack", function()
    local q = core.queue({ max_bytes = 10 })
    assert.equal(1, q:push("1234", nil, 1))
    assert.equal(2, q:push("123456", nil, 2))
    assert.equal(10, q:bytes())
    assert.equal(3, q:push("", nil, 3)) -- an empty string takes no bytes
    local before = state(q)
    local seq, cond, text = q:push("x", nil, 4)
    assert.is_nil(seq)
    assert.equal("queue-full", cond)
    assert.matches("10 bytes queued, 1 more would exceed max_bytes 10", text, 1, true)
    assert.same(before, state(q))
    q:ack(1)
    assert.equal(4, q:push("abcd", nil, 4))
    assert.equal(10, q:bytes())
    assert.is_nil((q:push("x", nil, 5)))
  end)

  it("refuse a single stanza larger than max_bytes even when empty", function()
    local q = core.queue({ max_bytes = 4 })
    local seq, cond = q:push("12345", nil, 0)
    assert.is_nil(seq)
    assert.equal("queue-full", cond)
    assert.same({ acked = 0, pushed = 0, count = 0, bytes = 0, items = {} }, state(q))
    assert.equal(1, q:push("1234", nil, 0))
  end)
end)

describe("queue:each", function()
  it("iterates oldest first, also when the ring has wrapped inside", function()
    local q = core.queue()
    local seq = 0
    -- push 40 / ack 30 a few times so the ring's head moves and the items wrap in the buffer
    for round = 1, 5 do
      for i = 1, 40 do
        seq = q:push(("r%d-%d"):format(round, i), nil, seq)
      end
      q:ack(core.h_add(q:acked(), 30))
    end
    local l = listing(q)
    assert.equal(50, #l)
    for i, it in ipairs(l) do
      assert.equal(150 + i, it.seq)
      assert.equal(150 + i - 1, it.stamp)
    end
    assert.equal("r4-31", l[1].raw)
    assert.equal("r5-40", l[50].raw)
  end)

  it("raises on the next step when the queue changes during the loop", function()
    local changes = {
      push = function(q) q:push("n", nil, 0) end,
      ack = function(q) q:ack(1) end,
      clear = function(q) q:clear() end,
      close = function(q) q:close() end,
    }
    for name, change in pairs(changes) do
      local q = core.queue()
      for i = 1, 3 do
        q:push("s" .. i, nil, i)
      end
      local steps = 0
      local ok, err = pcall(function()
        for _ in q:each() do
          steps = steps + 1
          if steps == 1 then change(q) end
        end
      end)
      assert.is_false(ok, name)
      assert.matches("during each", err, 1, true)
      assert.equal(1, steps, name)
    end
  end)

  it("does not raise for calls that change nothing", function()
    local q = core.queue({ max_items = 2 })
    q:push("a", nil, 1)
    q:push("b", nil, 2)
    local seen = {}
    for seq, raw in q:each() do
      seen[#seen + 1] = raw
      q:ack(0)                         -- repeated h: nothing released
      assert.is_nil((q:ack(7)))        -- too high: refused
      assert.is_nil((q:push("c", nil, 3))) -- full: refused
      q:snapshot()
      assert.is_number(seq)
    end
    assert.same({ "a", "b" }, seen)
  end)

  it("keeps returning nothing once done", function()
    local q = core.queue()
    q:push("a", nil, 1)
    local it = q:each()
    assert.equal(1, (it()))
    assert.is_nil(it())
    assert.is_nil(it())
  end)
end)

describe("queue:unpush", function()
  it("takes back the newest item as if it had never been pushed", function()
    local q = core.queue({ max_items = 3 })
    local o = {}
    q:push("a", nil, 1)
    q:push("bb", o, 2)
    q:unpush()
    assert.same({ acked = 0, pushed = 1, count = 1, bytes = 1, oldest = 1,
                  items = { { seq = 1, raw = "a", obj = false, stamp = 1 } } }, state(q))
    -- the seq is handed out again, and an ack of it releases the new item only
    assert.equal(2, q:push("c", nil, 3))
    assert.equal("handled-count-too-high", select(2, q:ack(3)))
    assert.same({ "a", false, 1, "c", false, 3 }, (q:ack(2)))
    -- the room it took is free again
    for i = 1, 3 do q:push("x", nil, i) end
    assert.equal("queue-full", select(2, q:push("y", nil, 4)))
    q:unpush()
    assert.equal(5, q:push("y", nil, 4))
  end)

  it("works when the ring has wrapped, and across 2^32", function()
    local q = core.queue()
    q:set_counter(MAX - 1)
    for i = 1, 16 do q:push("s" .. i, nil, i) end   -- a full ring of 16
    q:ack(core.h_add(MAX - 1, 10))                   -- its head moves to slot 10
    for i = 17, 26 do q:push("s" .. i, nil, i) end  -- the newest ones in slots 0..9
    q:unpush()
    q:unpush()
    assert.equal(core.h_add(MAX - 1, 24), q:pushed())
    local raws = {}
    for _, raw in q:each() do raws[#raws + 1] = raw end
    assert.same({ "s11", "s12", "s13", "s14", "s15", "s16", "s17", "s18", "s19", "s20", "s21",
                  "s22", "s23", "s24" }, raws)
    assert.equal(#table.concat(raws), q:bytes())
  end)

  it("raises on an empty queue, also after clear(), changing nothing", function()
    local q = core.queue()
    assert.has_error(function() q:unpush() end, "unpush: the queue holds no stanza")
    q:push("a", nil, 1)
    q:clear()
    assert.has_error(function() q:unpush() end, "unpush: the queue holds no stanza")
    assert.same({ acked = 0, pushed = 1, count = 0, bytes = 0, items = {} }, state(q))
  end)
end)

describe("queue:clear", function()
  it("returns every item, keeps the counters, and still accepts acks for what was sent", function()
    local q = core.queue()
    local o = {}
    for i = 1, 4 do
      q:push("s" .. i, i == 2 and o or nil, i)
    end
    q:ack(1)
    local items, n = q:clear()
    assert.equal(3, n)
    assert.same({ "s2", o, 2, "s3", false, 3, "s4", false, 4 }, items)
    assert.same({ acked = 1, pushed = 4, count = 0, bytes = 0, items = {} }, state(q))
    items, n = q:clear()
    assert.equal(0, n)
    assert.same({}, items)

    -- the next stanza continues the numbering; acks of cleared stanzas release nothing,
    assert.equal(5, q:push("s5", nil, 5))
    assert.same({ { seq = 5, raw = "s5", obj = false, stamp = 5 } }, listing(q))
    items, n = q:ack(3)
    assert.equal(0, n)
    assert.same({}, items)
    assert.equal(3, q:acked())
    -- and an h past what was pushed is still too high
    assert.equal("handled-count-too-high", select(2, q:ack(6)))
    items, n = q:ack(5)
    assert.equal(1, n)
    assert.same({ "s5", false, 5 }, items)
  end)

  it("lets set_counter start a new session afterwards", function()
    local q = core.queue()
    q:push("a", nil, 1)
    q:clear()
    q:set_counter(0)
    assert.equal(1, q:push("a", nil, 1))
  end)
end)

-- Whether what `make_and_drop` stored in `weak[1]` was collected once it returned.
local function collectable(make_and_drop)
  local weak = setmetatable({}, { __mode = "v" })
  make_and_drop(weak)
  collectgarbage()
  collectgarbage()
  return weak[1] == nil
end

describe("queue references", function()
  it("are dropped on ack, clear and close, and held until then", function()
    local q = core.queue()
    assert.is_false(collectable(function(weak)
      local o = {}
      weak[1] = o
      q:push("held", o, 0)
    end))
    assert.is_true(collectable(function(weak)
      local o = {}
      weak[1] = o
      q:push("acked", o, 0)
      q:ack(q:pushed()) -- releases both; the result table is dropped at once
    end))
    assert.is_true(collectable(function(weak)
      local o = {}
      weak[1] = o
      q:push("cleared", o, 0)
      q:clear()
    end))
    assert.is_true(collectable(function(weak)
      local o = {}
      weak[1] = o
      q:push("closed", o, 0)
      q:close()
    end))
  end)

  it("go with the queue when the queue is collected", function()
    assert.is_true(collectable(function(weak)
      local q = core.queue()
      local o = {}
      weak[1] = o
      q:push("x", o, 0)
    end))
  end)

  it("give back the memory of a burst once acknowledged", function()
    collectgarbage()
    local base = collectgarbage("count")
    local q = core.queue({ max_items = 100000 })
    for i = 1, 100000 do
      q:push(("%099d"):format(i), nil, i)
    end
    collectgarbage()
    local full = collectgarbage("count")
    assert.is_true(full - base > 100000 * 100 / 1024)
    q:ack(100000)
    collectgarbage()
    collectgarbage()
    -- what is left is the ring the queue keeps (1024 slots, ~48 KiB), far below the burst's 10 MB
    assert.is_true(collectgarbage("count") - base < 64, collectgarbage("count") - base)
    assert.equal(100001, q:push("again", nil, 0))
  end)
end)

describe("queue notes", function()
  it("come back with their items from ack and clear; nil when no item holds one", function()
    local q = core.queue()
    q:push("a", nil, 1)
    local items, n, notes = q:ack(1)
    assert.equal(1, n)
    assert.equal("a", items[1])
    assert.is_nil(notes) -- no note pushed yet
    q:push("b", nil, 2, "note b")
    q:push("c", nil, 3)
    q:push("d", nil, 4, "note d")
    items, n, notes = q:ack(3)
    assert.same({ "b", false, 2, "c", false, 3 }, items)
    assert.equal(2, n)
    assert.same({ "note b" }, notes) -- [2] is nil: c has none
    assert.is_nil(notes[2])
    items, n, notes = q:clear()
    assert.same({ "d", false, 4 }, items)
    assert.equal(1, n)
    assert.same({ "note d" }, notes)
    q:push("e", nil, 5)
    items, n, notes = q:ack(q:pushed())
    assert.same({ "e", false, 5 }, items)
    assert.equal(1, n)
    assert.is_nil(notes) -- the queue holds no note any more
    items, n, notes = q:ack(q:pushed())
    assert.same({}, items)
    assert.equal(0, n)
    assert.is_nil(notes)
  end)

  it("are held strongly by a weak queue, and dropped on ack, clear, unpush and close", function()
    local q = core.queue({ weak_objects = true })
    assert.is_false(collectable(function(weak)
      local f = function() end
      weak[1] = f
      q:push("held", {}, 0, f)
    end))
    for _, release in ipairs {
      function() q:ack(q:pushed()) end,
      function() q:clear() end,
      function() q:unpush() end,
      function() q:close() end,
    } do
      assert.is_true(collectable(function(weak)
        local f = function() end
        weak[1] = f
        q:push("x", {}, 0, f)
        release()
      end))
    end
  end)

  it("unpush takes the newest item's note with it", function()
    local q = core.queue()
    q:push("a", nil, 1, "A")
    q:push("b", nil, 2, "B")
    q:unpush()
    q:push("c", nil, 3)
    local _, n, notes = q:ack(q:pushed())
    assert.equal(2, n)
    assert.same({ "A" }, notes)
    assert.is_nil(notes[2])
  end)

  it("stay with their items when the ring grows, wraps and shrinks", function()
    local q = core.queue({ max_items = 100000 })
    local seq = 0
    local function push(n)
      for _ = 1, n do
        seq = seq + 1
        q:push("r" .. seq, nil, seq, seq % 3 ~= 0 and ("n" .. seq) or nil)
      end
    end
    local function ack(upto)
      local from = q:acked() + 1
      local items, n, notes = q:ack(upto)
      assert.equal(upto - from + 1, n)
      for i = 1, n do
        local s = from + i - 1
        assert.equal("r" .. s, items[3 * i - 2])
        assert.equal(s % 3 ~= 0 and ("n" .. s) or nil, notes and notes[i])
      end
    end
    push(10); ack(6); push(12)    -- wraps inside 16 slots, then grows to 32
    ack(20); push(5000)           -- grows to 8192
    ack(4000)                     -- shrinks: about 1000 left
    push(3); ack(seq - 1); ack(seq)
    assert.equal(0, q:count())
  end)

  it("are not part of a snapshot", function()
    local q = core.queue()
    q:push("a", nil, 1, "A")
    local r = core.queue_restore(q:snapshot())
    local items, n, notes = r:ack(1)
    assert.equal(1, n)
    assert.equal("a", items[1])
    assert.is_nil(notes)
  end)
end)

describe("queue methods", function()
  it("refuse anything but a queue as self, other userdata included", function()
    local q = core.queue()
    local methods = { "push", "unpush", "ack", "each", "clear", "set_counter", "acked", "pushed",
      "count", "bytes", "oldest_stamp", "snapshot" }
    for _, m in ipairs(methods) do
      for _, bad in ipairs { {}, "q", io.stdout, core.parser(), false } do
        local ok, err = pcall(q[m], bad, "x", nil, 0)
        assert.is_false(ok)
        assert.matches("bad argument #1 to '.-' %(xmppsm.queue expected, got ", err)
      end
      assert.has_error(function() q[m]() end)
    end
    assert.equal(0, q:count())
  end)
end)

describe("queue close", function()
  it("is idempotent, shared by __close, and makes later use raise", function()
    local q = core.queue()
    q:push("a", nil, 0)
    q:close()
    q:close()
    for _, m in ipairs { "push", "ack", "each", "clear", "set_counter", "acked", "pushed", "count",
      "bytes", "oldest_stamp", "snapshot" } do
      assert.has_error(function() q[m](q, "x", nil, 0) end, "attempt to use a closed xmppsm.queue")
    end
    assert.matches("closed", tostring(q))
    local outer
    do
      local q2 <close> = core.queue()
      outer = q2
      q2:push("b", nil, 0)
    end
    assert.has_error(function() outer:count() end)
  end)
end)

describe("queue snapshot", function()
  local function round_trip(q, opts)
    local s = q:snapshot()
    assert.is_string(s)
    local r, err = core.queue_restore(s, opts)
    assert.is_userdata(r, err)
    local want = state(q)
    for _, it in ipairs(want.items) do
      it.obj = false
    end
    assert.same(want, state(r))
    assert.equal(s, r:snapshot())
    return r, s
  end

  it("round-trips an empty queue, fresh and after acks", function()
    local q = core.queue()
    local _, s = round_trip(q)
    assert.equal(string.pack(">c4BI4I4I4", "XSMQ", 1, 0, 0, 0), s:sub(1, 17))
    assert.equal(25, #s)
    q:set_counter(MAX - 1)
    q:push("a", nil, 0)
    q:push("b", nil, 0)
    q:ack(0)
    local r = round_trip(q)
    assert.equal(0, r:acked())
    assert.equal(1, r:push("c", nil, 0))
  end)

  it("round-trips wrapped counters, binary raw bytes and any stamp", function()
    local q = core.queue()
    q:set_counter(MAX - 2)
    local all = {}
    for b = 0, 255 do
      all[#all + 1] = string.char(b)
    end
    local raws = { "\0", "a\0b\0", table.concat(all), "", string.rep("\0\255", 1000), "<m/>" }
    local stamps = { 0, -1.5, 1e300, 123456.789, math.huge, 2 ^ -1074 }
    for i, raw in ipairs(raws) do
      q:push(raw, { i }, stamps[i])
    end
    local r = round_trip(q)
    assert.equal(3, r:pushed())
    -- the restored queue goes on working across the wrap
    local items, n = r:ack(0)
    assert.equal(3, n)
    assert.same({ raws[1], false, stamps[1], raws[2], false, stamps[2], raws[3], false, stamps[3] },
      items)
    assert.equal(4, r:push("next", {}, 7))
    items, n = r:ack(4)
    assert.equal(4, n)
    assert.equal("next", items[10])
  end)

  it("keeps a NaN stamp", function()
    local q = core.queue()
    q:push("n", nil, 0 / 0)
    local r = core.queue_restore(q:snapshot())
    local stamp = r:oldest_stamp()
    assert.is_true(stamp ~= stamp)
  end)

  it("refuses every truncation and every single-byte corruption, cleanly", function()
    local q = core.queue()
    q:set_counter(MAX - 1)
    q:push("<message>\0</message>", nil, 1.25)
    q:push("", nil, 2)
    q:push("xyz", {}, 3)
    local s = q:snapshot()
    assert.is_userdata(core.queue_restore(s))
    local tried = 0
    for len = 0, #s - 1 do
      local r, err = core.queue_restore(s:sub(1, len))
      assert.is_nil(r, len)
      assert.is_string(err, len)
      tried = tried + 1
    end
    for pos = 1, #s do
      for _, x in ipairs { 0x01, 0x80, 0xff } do
        local bad = s:sub(1, pos - 1) .. string.char(s:byte(pos) ~ x) .. s:sub(pos + 1)
        local r, err = core.queue_restore(bad)
        assert.is_nil(r, pos)
        assert.is_string(err, pos)
        tried = tried + 1
      end
    end
    assert.equal(#s * 4, tried)
  end)

  it("names what is wrong", function()
    local good = craft(0, 2, 2, { { stamp = 1, raw = "ab" }, { stamp = 2, raw = "c" } })
    assert.is_userdata(core.queue_restore(good))
    local cases = {
      { "", "truncated" },
      { "XSM", "truncated" },
      { "XSMQ", "truncated" },
      { "XSMQ\1", "truncated" },
      { "JUNK" .. good:sub(5), "bad magic" },
      { good .. "x", "checksum" },
      { good:sub(1, -2), "checksum" },
      { good:sub(1, -9) .. string.pack(">j", fnv1a64(good:sub(1, -9)) ~ 1), "checksum" },
      { craft(0, 0, 0, nil, 2), "version 2" },
      { craft(0, 0, 0, nil, 0), "version 0" },
      -- checksum valid, content inconsistent:
      { craft(0, 1, 2, { { stamp = 1, raw = "a" }, { stamp = 2, raw = "b" } }), "more items than" },
      { craft(5, 4, 0), nil }, -- 4294967295 unacknowledged: valid, see the counter-space spec
      { craft(0, 3, 3, { { stamp = 1, raw = "a" } }), "item list truncated" },
      { craft(0, 1, 1, { { stamp = 1, raw = "a", size = 2 } }), "past the end" },
      { craft(0, 1, 1, { { stamp = 1, raw = "a", size = 2 ^ 62 } }), "past the end" },
      { craft(0, 1, 1, { { stamp = 1, raw = "a", size = -1 } }), "past the end" },
      { craft(0, 1, 1, { { stamp = 1, raw = "ab", size = 1 } }), "trailing bytes" },
      { craft(0, 1, 0, { { stamp = 1, raw = "a" } }), "trailing bytes" },
      { sign(good:sub(1, -9) .. "zz"), "trailing bytes" },
      { craft(0, MAX, 2 ^ 29 + 1), "too many items" },
      { craft(0, MAX, 2 ^ 29), "item list truncated" }, -- no allocation for a count it lacks
    }
    for i, c in ipairs(cases) do
      local r, err = core.queue_restore(c[1])
      if c[2] then
        assert.is_nil(r, i)
        assert.matches(c[2], err, 1, true)
      else
        assert.is_userdata(r, i)
      end
    end
  end)

  it("never accepts a checksummed but malformed snapshot it cannot reproduce", function()
    -- random headers and item fields under a valid checksum reach the structural checks;
    -- whatever is accepted must be exactly what the queue would write back
    math.randomseed(7)
    local accepted, refused = 0, 0
    for _ = 1, 3000 do
      local acked = math.random(0, 3) == 0 and math.random(0, MAX) or math.random(0, 4)
      local pushed = math.random(0, 3) == 0 and math.random(0, MAX) or math.random(0, 8)
      local count = math.random(0, 4)
      local parts = { "XSMQ\1", string.pack(">I4I4I4", acked, pushed, count) }
      for _ = 1, math.random(0, 5) do
        local size = math.random(0, 6)
        local declared = math.random(0, 4) == 0 and math.random(0, 10) or size
        parts[#parts + 1] = string.pack(">d>I8", math.random(), declared)
        parts[#parts + 1] = string.rep("r", size)
      end
      local s = sign(table.concat(parts))
      local r, err = core.queue_restore(s)
      if r then
        accepted = accepted + 1
        assert.equal(s, r:snapshot())
        assert.is_true(r:count() <= core.h_diff(r:pushed(), r:acked()))
      else
        refused = refused + 1
        assert.matches("inconsistent", err)
      end
    end
    assert.is_true(accepted > 100 and refused > 100, accepted .. "/" .. refused)
  end)

  it("raises on misuse", function()
    assert.has_error(function() core.queue_restore(nil) end)
    assert.has_error(function() core.queue_restore(25) end)
    assert.has_error(function() core.queue_restore("", 3) end)
  end)

  it("restores over smaller limits without dropping a stanza, and says so", function()
    local q = core.queue()
    for i = 1, 5 do
      q:push("12345", nil, i)
    end
    local s = q:snapshot()
    for _, opts in ipairs { { max_items = 2 }, { max_bytes = 12 } } do
      local r, cond, text = core.queue_restore(s, opts)
      assert.is_userdata(r)
      assert.equal("over-limit", cond)
      assert.matches("restored 5 stanzas (25 bytes)", text, 1, true)
      assert.equal(5, r:count())
      local seq, full = r:push("x", nil, 6)
      assert.is_nil(seq)
      assert.equal("queue-full", full)
      r:ack(4)
      assert.equal(6, r:push("x", nil, 6))
    end
    local r, cond = core.queue_restore(s, { max_items = 5, max_bytes = 25 })
    assert.is_userdata(r)
    assert.is_nil(cond)
  end)

  it("refuses a push that would leave 2^32 stanzas unacknowledged", function()
    -- reachable only through clear(); a snapshot reaches it without 4 billion pushes
    local q = assert(core.queue_restore(craft(1, 0, 0)))
    local seq, cond = q:push("x", nil, 0)
    assert.is_nil(seq)
    assert.equal("queue-full", cond)
    local _, n = q:ack(0) -- everything was cleared: nothing to release
    assert.equal(0, n)
    assert.equal(1, q:push("x", nil, 0))
  end)
end)

describe("queue against a model", function()
  -- The model: a Lua list of {seq, raw, obj, stamp, note}, the counters, and the count of sent
  -- stanzas dropped by clear() (they stay acknowledgeable).
  local function model_new(start)
    return { items = {}, acked = start, pushed = start, bytes = 0 }
  end

  local function check(q, m, ctx)
    local items = {}
    for i, it in ipairs(m.items) do
      items[i] = { seq = it.seq, raw = it.raw, obj = it.obj, stamp = it.stamp }
    end
    assert.same({ acked = m.acked, pushed = m.pushed, count = #m.items, bytes = m.bytes,
      oldest = m.items[1] and m.items[1].stamp, items = items }, state(q), ctx)
    for i, it in ipairs(listing(q)) do
      assert.is_true(rawequal(it.obj, m.items[i].obj), ctx)
    end
  end

  -- What ack and clear return as notes when `released` items go: nil unless some held item
  -- has a note, else {[i] = note of released item i}.
  local function expected_notes(m, released)
    local any = false
    for _, it in ipairs(m.items) do any = any or it.note ~= nil end
    for _, it in ipairs(released) do any = any or it.note ~= nil end
    if not any or #released == 0 then return nil end
    local notes = {}
    for i, it in ipairs(released) do notes[i] = it.note end
    return notes
  end

  local function run(seed, steps)
    math.randomseed(seed)
    local max_items, max_bytes = math.random(1, 40), math.random(1, 400)
    local start = ({ 0, MAX - math.random(0, 50), math.random(0, MAX) })[math.random(3)]
    local q = core.queue({ max_items = max_items, max_bytes = max_bytes })
    q:set_counter(start)
    local m = model_new(start)
    local counts = { push = 0, full = 0, ack = 0, high = 0, clear = 0, restore = 0, unpush = 0 }
    for step = 1, steps do
      local ctx = ("seed %d step %d"):format(seed, step)
      local r = math.random(100)
      local outstanding = core.h_diff(m.pushed, m.acked)
      if r <= 5 then
        if #m.items > 0 then
          q:unpush()
          local it = table.remove(m.items)
          m.bytes = m.bytes - #it.raw
          m.pushed = core.h_add(m.pushed, -1)
          counts.unpush = counts.unpush + 1
        else
          assert.has_error(function() q:unpush() end, "unpush: the queue holds no stanza")
        end
      elseif r <= 55 then
        local raw = string.rep(string.char(math.random(0, 255)), math.random(0, 30))
        local obj = math.random(2) == 1 and {} or nil
        local note = ({ nil, function() end, "n" .. step })[math.random(3)]
        local stamp = step + math.random()
        local seq, cond = q:push(raw, obj, stamp, note)
        if #m.items < max_items and m.bytes + #raw <= max_bytes then
          m.pushed = core.h_add(m.pushed, 1)
          assert.equal(m.pushed, seq, ctx)
          m.items[#m.items + 1] = { seq = seq, raw = raw, obj = obj or false, stamp = stamp, note = note }
          m.bytes = m.bytes + #raw
          counts.push = counts.push + 1
        else
          assert.is_nil(seq, ctx)
          assert.equal("queue-full", cond, ctx)
          counts.full = counts.full + 1
        end
      elseif r <= 85 then
        local h = core.h_add(m.acked, math.random(0, outstanding))
        local items, n, notes = q:ack(h)
        local released, gone = {}, {}
        while m.items[1] and core.h_diff(h, m.items[1].seq) < 2 ^ 31 do
          local it = table.remove(m.items, 1)
          released[#released + 1] = it.raw
          released[#released + 1] = it.obj
          released[#released + 1] = it.stamp
          gone[#gone + 1] = it
          m.bytes = m.bytes - #it.raw
        end
        m.acked = h
        assert.equal(#released // 3, n, ctx)
        assert.same(released, items, ctx)
        assert.same(expected_notes(m, gone), notes, ctx)
        counts.ack = counts.ack + 1
      elseif r <= 92 then
        -- too high: one more than sent, or anything up to a stale h
        local h = core.h_add(m.pushed, math.random(2) == 1 and 1 or math.random(1, MAX - outstanding))
        local items, cond = q:ack(h)
        assert.is_nil(items, ctx)
        assert.equal("handled-count-too-high", cond, ctx)
        counts.high = counts.high + 1
      elseif r <= 95 then
        local items, n, notes = q:clear()
        assert.equal(#m.items, n, ctx)
        for i, it in ipairs(m.items) do
          assert.equal(it.raw, items[3 * i - 2], ctx)
          assert.is_true(rawequal(it.obj, items[3 * i - 1]), ctx)
        end
        local gone = m.items
        m.items, m.bytes = {}, 0
        assert.same(expected_notes(m, gone), notes, ctx)
        if math.random(2) == 1 then
          local h = math.random(0, MAX)
          q:set_counter(h)
          m.acked, m.pushed = h, h
        end
        counts.clear = counts.clear + 1
      else
        local nq = core.queue_restore(q:snapshot(), { max_items = max_items, max_bytes = max_bytes })
        assert.is_userdata(nq, ctx)
        q = nq
        for _, it in ipairs(m.items) do
          it.obj, it.note = false, nil -- a snapshot keeps bytes and stamps only
        end
        counts.restore = counts.restore + 1
      end
      check(q, m, ctx)
    end
    return counts
  end

  it("agrees over random push, unpush, ack, too-high, clear and restore sequences", function()
    local total = { push = 0, full = 0, ack = 0, high = 0, clear = 0, restore = 0, unpush = 0 }
    for seed = 1, 40 do
      for k, v in pairs(run(seed, 600)) do
        total[k] = total[k] + v
      end
    end
    -- every kind of step really happened, full queues included
    for k, v in pairs(total) do
      assert.is_true(v > 100, k .. " " .. v)
    end
  end)
end)

describe("queue memory", function()
  -- Lua heap per item of a queue holding `n` distinct 100-byte strings (which existed before:
  -- this is the queue's own cost).
  local function per_item(n, opts, note)
    local raws = {}
    for i = 1, n do
      raws[i] = ("%099d"):format(i) .. "x"
    end
    collectgarbage()
    collectgarbage()
    local before = collectgarbage("count")
    local q = core.queue(opts)
    for i = 1, n do
      q:push(raws[i], nil, i, note)
    end
    collectgarbage()
    collectgarbage()
    assert.equal(n, q:count())
    return (collectgarbage("count") - before) * 1024 / n
  end

  it("costs the raw string plus a small constant per item", function()
    -- an 8-byte stamp and two 16-byte table slots per ring slot; the ring grows by half, so it
    -- has at most 1.5 slots per item (100000 items: 118,342 slots)
    local cost = per_item(100000, { max_items = 1000000 })
    assert.is_true(cost <= 1.5 * 40 + 1, cost)
    if os.getenv("XMPPSM_QUEUE_MEM") then
      io.stderr:write(("queue overhead: %.1f bytes per item at %d items\n"):format(cost, 100000))
    end
  end)

  it("never holds room for more than max_items", function()
    -- growth stops at max_items: 10000 items in 10000 slots (growing by half from 16 would
    -- have given 10,390, doubling 16,384)
    local cost = per_item(10000, { max_items = 10000 })
    assert.is_true(cost <= 40 + 1, cost)
  end)

  it("costs one more 16-byte slot per ring slot with notes", function()
    local cost = per_item(10000, { max_items = 10000 }, "note")
    assert.is_true(cost <= 56 + 1, cost)
  end)
end)
