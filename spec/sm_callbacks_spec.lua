-- Outcome callbacks are kept per send by the queue, as its item's note: these drive the SM
-- object directly (a stand-in client, no server) through queue states a server cannot produce.
local sm = require "xmppsm.sm"
local stanza = require "xmppsm.stanza"

describe("stream management callbacks, kept by the queue", function()
  -- Whether the callbacks `weak` refers to weakly were all let go.
  local function released(weak)
    collectgarbage()
    collectgarbage()
    return next(weak) == nil
  end

  local function new_sm()
    local client = {
      state = "online", bare_jid = "a@b",
      events = { handlers = {}, fire = function() end },
      conn = { send_raw = function() end, abort = function() end },
      iq = { fail_all = function() end },
      _handler_error = function(_, _, err) error(err) end, _log = function() end,
    }
    local s = sm.new(client, { store = false }, nil)
    -- Online, and no <r/> timers: acks come when the spec says.
    s.enabled, s.live, s.r_outstanding = true, true, true
    return s
  end

  it("match the items an ack releases after clear() dropped older ones", function()
    local s = new_sm()
    s.queue:set_counter(0)
    s:send(stanza.message({}, "a")) -- seq 1, 2: no callbacks, then dropped by clear()
    s:send(stanza.message({}, "b"))
    s.queue:clear()
    local got, weak = {}, setmetatable({}, { __mode = "k" })
    for _, body in ipairs { "c", "d" } do -- seq 3, 4
      local cb = function(ok, _, st)
        got[#got + 1] = { ok, st:get_child_text("body") }
      end
      weak[cb] = true
      s:send(stanza.message({}, body), cb)
    end
    assert.is_false(released(weak)) -- held while unacknowledged
    assert.is_true(s:_handle_h("4", "<a/>"))
    assert.same({ { true, "c" }, { true, "d" } }, got)
    assert.is_true(released(weak))
  end)

  it("do not keep a stanza the program forgot: its outcome reads it back from the bytes", function()
    local s = new_sm()
    s.queue:set_counter(0)
    local kept = stanza.message({ to = "a@b" }, "kept")
    local probe = setmetatable({}, { __mode = "k" })
    local got = {}
    local function cb(ok, _, st) got[#got + 1] = { ok, st } end
    s:send(kept, cb)
    do
      local forgotten = stanza.message({ to = "a@b" }, "forgotten")
      probe[forgotten] = true
      s:send(forgotten, cb)
    end
    collectgarbage()
    collectgarbage()
    assert.is_nil(next(probe)) -- unacknowledged, with a callback, and collected
    assert.is_true(s:_handle_h("2", "<a/>"))
    assert.equal(2, #got)
    assert.equal(kept, got[1][2]) -- still referred to: the very object
    assert.is_true(got[2][1])
    assert.equal("forgotten", got[2][2]:get_child_text("body"))
    assert.equal("a@b", got[2][2].attr.to)
  end)

  it("read a forgotten stanza back only for a callback that can see it", function()
    local s = new_sm()
    s.queue:set_counter(0)
    local read_backs, real = 0, stanza.read_back
    stanza.read_back = function(raw) read_backs = read_backs + 1; return real(raw) end
    local seen = {}
    local callbacks = {
      function(ok) seen[#seen + 1] = ok end,                         -- cannot see it: none
      function(_, _, st) seen[#seen + 1] = st:get_child_text("body") end,
      function(...) seen[#seen + 1] = select(3, ...):get_child_text("body") end,
      setmetatable({}, { __call = function(_, _, _, st) seen[#seen + 1] = st:get_child_text("body") end }),
    }
    for i, cb in ipairs(callbacks) do s:send(stanza.message({}, "m" .. i), cb) end
    collectgarbage()
    collectgarbage()
    local ok, err = pcall(s._handle_h, s, "4", "<a/>")
    stanza.read_back = real
    assert(ok, err)
    assert.same({ true, "m2", "m3", "m4" }, seen)
    assert.equal(3, read_backs)
  end)

  it("wrap around 2^32 with the counters", function()
    local s = new_sm()
    s.queue:set_counter(4294967294)
    local got, weak = {}, setmetatable({}, { __mode = "k" })
    for i = 1, 4 do -- seq 4294967295, 0, 1, 2
      local cb = function(ok) got[#got + 1] = ok and i end
      weak[cb] = true
      s:send(stanza.message({}, "m" .. i), cb)
    end
    assert.is_true(s:_handle_h("0", "<a/>"))
    assert.same({ 1, 2 }, got)
    assert.is_true(s:_handle_h("2", "<a/>"))
    assert.same({ 1, 2, 3, 4 }, got)
    assert.is_true(released(weak))
  end)
end)
