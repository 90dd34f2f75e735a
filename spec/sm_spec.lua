-- Stream Management against a real Prosody, through a fault-injecting proxy: every stanza is
-- delivered exactly once and acknowledged exactly once, whatever happens to the link.
local xmppsm = require "xmppsm"
local prosody = require "helpers.prosody"
local process = require "helpers.process"
local proxy_helper = require "helpers.proxy"
local wait = require "helpers.wait"
local stanza = xmppsm.stanza
local store = require "xmppsm.store"

local DOMAIN = "xmppsm.test"

describe("stream management against Prosody", function()
  local server, clients

  setup(function()
    server = prosody.start{ domain = DOMAIN, hibernation = 3,
                            users = { { "alice", "pw-alice" }, { "bob", "pw-bob" } } }
  end)
  teardown(function()
    if server then server:stop() end
    process.stop_all()
  end)
  before_each(function() clients = {} end)
  after_each(function()
    for _, c in ipairs(clients) do if c:status() ~= "closed" then c:close(1) end end
    wait.until_true(function()
      for _, c in ipairs(clients) do if c:status() ~= "closed" then return false end end
      return true
    end, 5, "clients to close")
  end)

  local function new_client(user, port, sm_opts, extra)
    local opts = {
      jid = user .. "@" .. DOMAIN, password = "pw-" .. user, host = "127.0.0.1",
      port = port or server.port, cafile = server.cafile, reconnect_delay = 0.05,
      reconnect_max_delay = 0.5, connect_timeout = 5, logger = function() end,
      sm = sm_opts or { store = false },
    }
    for k, v in pairs(extra or {}) do opts[k] = v end
    local c = xmppsm.client(opts)
    clients[#clients + 1] = c
    return c
  end

  local function online(c)
    c:connect()
    wait.until_true(function() return c:status() == "online" end, 10, c.bare_jid .. " online")
  end

  -- Receives messages on `c`, counting each body; returns the table of counts (and the bodies
  -- in arrival order, as `order`).
  local function receiver(c)
    local seen = { total = 0, dups = 0, order = {} }
    c:on("message", function(m)
      local body = m:get_child_text("body")
      if body then
        seen.total = seen.total + 1
        seen.order[#seen.order + 1] = body
        if seen[body] then seen.dups = seen.dups + 1 end
        seen[body] = (seen[body] or 0) + 1
      end
    end)
    return seen
  end

  -- Counts the outcomes on `c`: acked bodies and failed bodies.
  local function outcomes(c)
    local o = { acked = {}, failed = {}, nacked = 0, nfailed = 0, dup_acks = 0 }
    c:on("ackedStanza", function(st)
      local body = st:get_child_text("body")
      if body then
        if o.acked[body] or o.failed[body] then o.dup_acks = o.dup_acks + 1 end
        o.acked[body] = true
        o.nacked = o.nacked + 1
      end
    end)
    c:on("fail", function(st)
      local body = st:get_child_text("body")
      if body then
        if o.acked[body] or o.failed[body] then o.dup_acks = o.dup_acks + 1 end
        o.failed[body] = true
        o.nfailed = o.nfailed + 1
      end
    end)
    return o
  end

  local function msg(to, body)
    return stanza.message({ to = to, type = "chat" }, body)
  end

  it("acknowledges every stanza once, with ackedStanza, ackedRaw, ack and the callback", function()
    local a, b = new_client("alice"), new_client("bob")
    local seen = receiver(b)
    local out = outcomes(a)
    local raws, acks, callbacks = 0, 0, {}
    a:on("ackedRaw", function(raw) assert.is_string(raw) raws = raws + 1 end)
    a:on("ack", function() acks = acks + 1 end)
    local enabled
    a:on("smEnabled", function(info) enabled = info end)
    online(a) online(b)
    assert.is_true(enabled.resume)
    for i = 1, 50 do
      assert.is_true(a:send(msg("bob@" .. DOMAIN, "m" .. i), function(ok, err)
        callbacks[#callbacks + 1] = { i, ok, err }
      end))
    end
    wait.until_true(function() return out.nacked == 50 and seen.total == 50 end, 10, "50 acks")
    assert.equal(0, out.dup_acks)
    assert.equal(0, out.nfailed)
    assert.equal(0, seen.dups)
    assert.equal(50, #callbacks)
    for i, cb in ipairs(callbacks) do
      assert.same({ i, true, nil }, { cb[1], cb[2], cb[3] })
    end
    -- The initial presence is acknowledged too, like every stanza.
    wait.until_true(function() return raws == 51 and acks == 51 end, 5, "raw acks")
    local state = a:sm_state()
    assert.is_true(state.enabled)
    assert.is_true(state.resumable)
    assert.equal(0, state.unacked)
    assert.equal(51, state.acked)
    assert.is_number(state.rtt_avg)
  end)

  it("gives each send its own callback, once, with the object sent, when one stanza is sent again", function()
    local st = msg("bob@" .. DOMAIN, "same")
    local size = #tostring(st)
    -- Room for two copies in flight, not three.
    local a = new_client("alice", nil, { store = false, max_queue_bytes = 2 * size + size // 2 },
                         { presence = false })
    local b = new_client("bob")
    local seen = receiver(b)
    online(b)
    local calls = {}
    local function cb(tag)
      return function(ok, err, got) calls[#calls + 1] = { tag, ok, err and err.condition, got == st } end
    end
    assert.is_true(a:send(st, cb("while offline")))
    online(a)
    wait.until_true(function() return #calls == 1 end, 10, "the first outcome")
    -- Two copies in flight fill the queue's bytes: the third send is refused, and so has no
    -- outcome, while the first two keep theirs.
    assert.is_true(a:send(st, cb("first")))
    assert.is_true(a:send(st, cb("second")))
    local ok, err = a:send(st, cb("third"))
    assert.is_nil(ok)
    assert.equal("queue-full", err.condition)
    wait.until_true(function() return #calls == 3 and seen.total == 3 end, 10, "every outcome")
    table.sort(calls, function(x, y) return x[1] < y[1] end)
    assert.same({
      { "first", true, nil, true },
      { "second", true, nil, true },
      { "while offline", true, nil, true },
    }, calls)
    assert.equal(3, seen.same)
    assert.equal(0, a:sm_state().unacked)
  end)

  it("refuses a stanza its store cannot write, sending nothing, and goes on with the next", function()
    local saved   -- the last blob the store took
    local user_store = store.custom{
      load = function() return nil end,
      save = function(blob)
        if blob:find("refuse-me", 1, true) then return nil, "disk full" end
        saved = blob
      end,
    }
    local a = new_client("alice", nil, { store = user_store }, { presence = false })
    local b = new_client("bob")
    local seen = receiver(b)
    online(b)
    online(a)
    local calls = {}
    local function cb(tag) return function(ok) calls[#calls + 1] = { tag, ok } end end
    assert.is_true(a:send(msg("bob@" .. DOMAIN, "one"), cb("one")))
    local ok, err = a:send(msg("bob@" .. DOMAIN, "refuse-me"), cb("refused"))
    assert.is_nil(ok)
    assert.equal("store-failed", err.condition)
    assert.is_true(a:send(msg("bob@" .. DOMAIN, "two"), cb("two")))
    -- The server counts two stanzas: each ack must settle exactly "one" and "two".
    wait.until_true(function() return #calls == 2 and seen.total == 2 end, 10, "two outcomes")
    assert.same({ { "one", true }, { "two", true } }, calls)
    assert.same({ total = 2, dups = 0, one = 1, two = 1, order = { "one", "two" } }, seen)
    assert.equal(0, a:sm_state().unacked)
    local restored = store.custom{ load = function() return saved end, save = function() end }
    assert.same({}, assert(restored:load()).items)
  end)

  it("delivers 1,000 messages exactly once through several cuts, each acknowledged once", function()
    local proxy = proxy_helper.start{ target_port = server.port }
    local a, b = new_client("alice", proxy.port), new_client("bob")
    local seen = receiver(b)
    local out = outcomes(a)
    local rec = wait.recorder(a, { "resumed", "online", "resumeFailed" })
    online(a) online(b)
    local faults = {
      function() proxy:cut("rst") end,
      function() proxy:cut_after(37, "c2s") end,     -- mid-stanza towards the server
      function() proxy:cut_after(23, "s2c") end,     -- mid-ack towards the client
      function() proxy:cut("fin") end,
    }
    -- A fault is armed every 200 messages; once it has cut the link, the proxy goes back to
    -- normal (cut_after rules also apply to new connections until then).
    local N, sent, fault, armed_at = 1000, 0, 0, nil
    local drops = wait.recorder(a, { "disconnected" })
    local deadline = require("xmppsm.core").monotime() + 60
    while sent < N or armed_at do
      assert(require("xmppsm.core").monotime() < deadline, "stuck at " .. sent .. ", fault " .. fault)
      if sent < N then
        for _ = 1, 25 do
          sent = sent + 1
          assert.is_true(a:send(msg("bob@" .. DOMAIN, "m" .. sent)))
        end
      end
      if armed_at and drops.count("disconnected") > armed_at then
        proxy:resume()
        armed_at = nil
      elseif not armed_at and sent % 200 == 0 and fault < #faults then
        fault = fault + 1
        armed_at = drops.count("disconnected")
        faults[fault]()
      end
      wait.for_seconds(0.01)
    end
    wait.until_true(function() return seen.total >= N and out.nacked == N end, 30,
                    "every message and ack (seen " .. seen.total .. ", acked " .. out.nacked .. ")")
    wait.for_seconds(0.3)   -- anything duplicated would show up now
    for i = 1, N do
      assert.equal(1, seen["m" .. i], "message m" .. i)
      assert.is_true(out.acked["m" .. i], "ack of m" .. i)
    end
    assert.equal(N, seen.total)
    assert.equal(0, out.dup_acks)
    assert.equal(0, out.nfailed)
    assert.equal(1, rec.count("online"))
    assert.equal(0, rec.count("resumeFailed"))
    assert.is_true(a:sm_state().resumes >= #faults)
    assert.equal(a:sm_state().resumes, rec.count("resumed"))
    proxy:stop()
  end)

  it("notices a silent link within the ack timeout and resumes", function()
    local proxy = proxy_helper.start{ target_port = server.port }
    local a = new_client("alice", proxy.port, { store = false, ack_interval = 0.5, ack_timeout = 1 })
    local b = new_client("bob")
    local seen = receiver(b)
    local rec = wait.recorder(a, { "disconnected", "resumed" })
    online(a) online(b)
    proxy:silence()
    local t0 = require("xmppsm.core").monotime()
    a:send(msg("bob@" .. DOMAIN, "during-silence"))
    wait.until_true(function() return rec.count("disconnected") == 1 end, 5, "the dead link to be noticed")
    local noticed = require("xmppsm.core").monotime() - t0
    -- Within one idle interval plus the ack timeout (and slack for a loaded machine).
    assert.is_true(noticed <= 0.5 + 1 + 1.5, "noticed after " .. noticed .. " s")
    proxy:resume()
    wait.until_true(function() return rec.count("resumed") == 1 end, 10, "resumption")
    wait.until_true(function() return seen["during-silence"] == 1 end, 5, "the message")
    proxy:stop()
  end)

  it("sends what a status handler sends on going online after what was accepted before", function()
    local a, b = new_client("alice"), new_client("bob")
    local seen = receiver(b)
    local out = outcomes(a)
    online(b)
    a:on("status", function(new)
      if new == "online" then assert.is_true(a:send(msg("bob@" .. DOMAIN, "from-status"))) end
    end)
    for i = 1, 3 do assert.is_true(a:send(msg("bob@" .. DOMAIN, "early" .. i))) end
    online(a)
    wait.until_true(function() return out.nacked == 4 and seen.total == 4 end, 10, "4 messages")
    assert.same({ "early1", "early2", "early3", "from-status" }, seen.order)
  end)

  it("sends a stanza sent while resuming once, after the re-sent ones", function()
    local proxy = proxy_helper.start{ target_port = server.port }
    local a = new_client("alice", proxy.port, { store = false, ack_timeout = 30 })
    local b = new_client("bob")
    local seen = receiver(b)
    local out = outcomes(a)
    local rec = wait.recorder(a, { "resumed" })
    online(a) online(b)
    proxy:silence()
    a:send(msg("bob@" .. DOMAIN, "in-flight"))          -- written, never reaches the server
    wait.for_seconds(0.2)
    -- Sent by a status handler as the session is resumed, before the server's <resumed h/> is
    -- settled and the queue re-sent.
    a:on("status", function(new)
      if new == "online" then assert.is_true(a:send(msg("bob@" .. DOMAIN, "from-status"))) end
    end)
    proxy:cut("rst")
    proxy:resume()
    wait.until_true(function() return rec.count("resumed") == 1 end, 10, "resumption")
    wait.until_true(function() return out.nacked == 2 and seen.total >= 2 end, 10, "2 messages")
    wait.for_seconds(0.3)   -- a duplicate would show up now
    assert.same({ "in-flight", "from-status" }, seen.order)
    assert.equal(0, out.dup_acks)
    assert.equal(0, a:sm_state().unacked)
    proxy:stop()
  end)

  it("keeps the order of stanzas an outcome callback sends while the queue drains", function()
    -- The byte limit fails a stanza accepted offline as it goes out; its callback sends another
    -- stanza, which must still follow the stanzas accepted before it.
    local a = new_client("alice", nil, { store = false, max_queue_bytes = 400 })
    local b = new_client("bob")
    local seen = receiver(b)
    online(b)
    local big = msg("bob@" .. DOMAIN, "big"):tag("pad"):text(string.rep("x", 500)):up()
    local failed
    assert.is_true(a:send(big, function(_, err)
      failed = err
      assert.is_true(a:send(msg("bob@" .. DOMAIN, "from-callback")))
    end))
    assert.is_true(a:send(msg("bob@" .. DOMAIN, "after-big")))
    online(a)
    wait.until_true(function() return seen.total == 2 end, 10, "2 messages")
    assert.equal("queue-full", failed.condition)
    assert.same({ "after-big", "from-callback" }, seen.order)
  end)

  local function expired_session_case(policy)
    local proxy = proxy_helper.start{ target_port = server.port }
    local a = new_client("alice", proxy.port, { store = false, leftovers = policy, ack_timeout = 30 })
    local b = new_client("bob")
    local seen = receiver(b)
    local out = outcomes(a)
    local rec = wait.recorder(a, { "online", "resumed", "resumeFailed" })
    online(a) online(b)
    proxy:silence()
    a:send(msg("bob@" .. DOMAIN, "in-flight"))          -- written, never reaches the server
    wait.for_seconds(0.2)
    proxy:refuse(0)
    proxy:cut("rst")
    wait.until_true(function() return a:status() ~= "online" end, 5, "the cut to be noticed")
    a:send(msg("bob@" .. DOMAIN, "while-down"))         -- accepted while disconnected
    wait.for_seconds(3 + 1.5)                           -- longer than the hibernation time
    proxy:resume()
    wait.until_true(function() return rec.count("online") == 2 end, 15, "a new session")
    assert.equal(1, rec.count("resumeFailed"))
    assert.equal(0, rec.count("resumed"))
    return proxy, seen, out, rec
  end

  it("sets up a new session when resumption comes too late, and re-sends the leftovers", function()
    local proxy, seen, out = expired_session_case("resend")
    wait.until_true(function() return seen["in-flight"] and seen["while-down"] end, 5, "both messages")
    wait.until_true(function() return out.acked["in-flight"] and out.acked["while-down"] end, 5, "acks")
    assert.equal(1, seen["in-flight"])
    assert.equal(1, seen["while-down"])
    assert.equal(0, out.nfailed)
    proxy:stop()
  end)

  it("fails the leftovers of an expired session when the policy says so", function()
    local proxy, seen, out = expired_session_case("fail")
    wait.until_true(function() return out.failed["in-flight"] end, 5, "the failure")
    -- Sent after the cut, never written to any stream: not a leftover, it goes out.
    wait.until_true(function() return seen["while-down"] == 1 end, 5, "the later message")
    assert.is_nil(seen["in-flight"])
    assert.is_nil(out.acked["in-flight"])
    proxy:stop()
  end)
end)
