-- Stream Management against a scripted server, for what Prosody will not do: counters that
-- wrap at 2^32, an h too high or malformed, <failed h/>, a location, <enabled/> without
-- resumption, a flood of <r/>.
local xmppsm = require "xmppsm"
local core = require "xmppsm.core"
local fakeserver = require "helpers.fakeserver"
local wait = require "helpers.wait"
local stanza = xmppsm.stanza

local SM = "urn:xmpp:sm:3"
local SM_FEATURE = "<sm xmlns='urn:xmpp:sm:3'/>"

local function new_client(port, sm_opts, extra)
  local opts = {
    jid = "user@example.test", password = "pencil", host = "127.0.0.1", port = port,
    tls = "none", allow_plain = true, reconnect_delay = 0.05, connect_timeout = 3,
    presence = false, logger = function() end, sm = sm_opts or { store = false },
  }
  for k, v in pairs(extra or {}) do opts[k] = v end
  return xmppsm.client(opts)
end

-- Logs in, then answers <enable/> with `enabled` (an XML string). Returns the <enable/>.
local function login_and_enable(peer, enabled)
  fakeserver.login(peer, { features = SM_FEATURE })
  local enable = peer:read()
  assert(enable.name == "enable" and enable.attr.xmlns == SM, "expected <enable/>, got " .. enable.name)
  peer:send(enabled or "<enabled xmlns='urn:xmpp:sm:3' id='sm-1' resume='true' max='60'/>")
  return enable
end

-- Reads stanzas until `n` messages arrived; returns them (other SM elements are kept aside).
local function read_messages(peer, n, others)
  local got = {}
  while #got < n do
    local el = peer:read()
    if el.name == "message" then got[#got + 1] = el
    elseif others then others[#others + 1] = el end
  end
  return got
end

local function acked_bodies(client)
  local acked = {}
  client:on("ackedStanza", function(st) acked[#acked + 1] = st:get_child_text("body") end)
  return acked
end

local function send_messages(client, from, to)
  for i = from, to do
    assert.is_true(client:send(stanza.message({ to = "peer@example.test" }, "m" .. i)))
  end
end

describe("stream management against a scripted server", function()
  local servers, client
  before_each(function() servers = {} end)
  after_each(function()
    if client and client:status() ~= "closed" then
      client:close(0.2)
      wait.until_true(function() return client:status() == "closed" end, 3, "close")
    end
    for _, s in ipairs(servers) do s.stop() end
    client = nil
  end)
  local function serve(script)
    local s = fakeserver.start(script)
    servers[#servers + 1] = s
    return s
  end

  it("wraps both counters from 4294967295 to 0 (counters preset by the test hook)", function()
    local START = 4294967290
    local answer
    local server = serve(function(peer)
      login_and_enable(peer)
      local got = read_messages(peer, 10)
      assert(#got == 10)
      -- The server handled 10 stanzas counting from the preset value: h wrapped to 4.
      peer:send(string.format("<a xmlns='%s' h='%d'/>", SM, core.h_add(START, 10)))
      -- Ten messages to the client, then ask what it handled.
      for i = 1, 10 do peer:send("<message from='peer@example.test'><body>in" .. i .. "</body></message>") end
      peer:send("<r xmlns='urn:xmpp:sm:3'/>")
      local a
      repeat a = peer:read() until a.name == "a"
      answer = a.attr.h
      peer:wait_closed(5)
    end)
    client = new_client(server.port, { store = false, ack_after = 1000 })
    local acked = acked_bodies(client)
    client:on("online", function()
      -- The documented test hook: preset both counters of the fresh session near 2^32.
      client.sm.queue:set_counter(START)
      client.sm.inbound = START
    end)
    client:connect()
    wait.until_true(function() return client:status() == "online" end, 5, "online")
    send_messages(client, 1, 10)
    wait.until_true(function() return #acked == 10 end, 5, "10 acks")
    for i = 1, 10 do assert.equal("m" .. i, acked[i]) end
    assert.equal(core.h_add(START, 10), client.sm.queue:acked())
    wait.until_true(function() return answer end, 5, "the client's <a/>")
    assert.equal(tostring(core.h_add(START, 10)), answer)
    assert.same({}, server.errors)
  end)

  it("hands outcomes the stanza parsed back from its bytes once the program forgot it", function()
    local go_ack
    local server = serve(function(peer)
      login_and_enable(peer)
      read_messages(peer, 3)
      peer:_wait_until(function() return go_ack end, 5, "the collection")
      peer:send("<a xmlns='urn:xmpp:sm:3' h='3'/>")
      peer:wait_closed(5)
    end)
    client = new_client(server.port, { store = false, ack_after = 1000 })
    local acked = acked_bodies(client)
    local kept = stanza.message({ to = "peer@example.test" }, "kept")
    local got_kept
    client:on("ackedStanza", function(st) if st == kept then got_kept = true end end)
    client:connect()
    wait.until_true(function() return client:status() == "online" end, 5, "online")
    local forgotten = setmetatable({}, { __mode = "v" })   -- sees m1 and m3 go
    forgotten[1] = stanza.message({ to = "peer@example.test" }, "m1")
    forgotten[3] = stanza.message({ to = "peer@example.test" }, "m3")
    assert.is_true(client:send(forgotten[1]))
    assert.is_true(client:send(kept))
    assert.is_true(client:send(forgotten[3]))
    wait.until_true(function() return client:sm_state().unacked == 3 end, 5, "3 sent")
    collectgarbage()
    collectgarbage()
    assert.is_nil(next(forgotten))   -- nothing holds them: their outcomes need a read-back
    go_ack = true
    wait.until_true(function() return #acked == 3 end, 5, "3 acks")
    assert.same({ "m1", "kept", "m3" }, acked)
    assert.is_true(got_kept)   -- the object still referred to is the one handed back
    assert.same({}, server.errors)
  end)

  it("stores the inbound count once per read, and before telling it to the server", function()
    local store = require "xmppsm.store"
    local saved = {}   -- the inbound count of each snapshot saved, in order
    local function inbound_of(blob)
      local probe = store.custom{ load = function() return blob end, save = function() end }
      return assert(probe:load()).inbound
    end
    local user_store = { load = function() return nil end,
                         save = function(blob) saved[#saved + 1] = inbound_of(blob) end }
    local stored_when_acked
    local server = serve(function(peer)
      login_and_enable(peer)
      -- Five messages and a request, in one write: one read for the client.
      local burst = {}
      for i = 1, 5 do burst[i] = "<message from='peer@example.test'><body>in" .. i .. "</body></message>" end
      peer:send(table.concat(burst) .. "<r xmlns='urn:xmpp:sm:3'/>")
      local a
      repeat a = peer:read() until a.name == "a"
      assert(a.attr.h == "5", "h=" .. tostring(a.attr.h))
      stored_when_acked = saved[#saved]
      peer:wait_closed(5)
    end)
    client = new_client(server.port, { store = user_store })
    local received = 0
    client:on("message", function() received = received + 1 end)
    -- What the store held when the client wrote its <a/> (rawOut runs as it is written),
    -- before the end of the loop step that would persist the count anyway.
    local stored_as_sent
    client:on("rawOut", function(s)
      if s:find("<a xmlns='urn:xmpp:sm:3' h='5'/>", 1, true) then stored_as_sent = saved[#saved] or -1 end
    end)
    client:connect()
    wait.until_true(function() return stored_when_acked ~= nil end, 5, "the client's <a/>")
    assert.equal(5, received)
    assert.equal(5, stored_as_sent)
    assert.equal(5, stored_when_acked)
    -- Counts 1 to 4 were never written on their own: the five stanzas cost one write.
    for _, h in ipairs(saved) do assert.is_false(h >= 1 and h <= 4, "a write per stanza") end
    assert.same({}, server.errors)
  end)

  it("answers an h that acknowledges more than was sent with handled-count-too-high", function()
    local stream_error, second_start
    local server = serve(function(peer, srv)
      if srv.connections == 1 then
        login_and_enable(peer)
        read_messages(peer, 2)
        peer:send("<a xmlns='urn:xmpp:sm:3' h='5'/>")
        -- The client must end the stream with the §6 error.
        local ok, err = pcall(function()
          peer:_wait_until(function() return peer.client_closed or peer.closed end, 5, "the stream end")
        end)
        stream_error = ok and peer.raw_received or err
      else
        local enable = login_and_enable(peer)
        second_start = enable.name
        peer:wait_closed(5)
      end
    end)
    server.record_raw = true
    client = new_client(server.port)
    local errors = wait.recorder(client, { "error", "online" })
    client:connect()
    wait.until_true(function() return client:status() == "online" end, 5, "online")
    send_messages(client, 1, 2)
    wait.until_true(function() return errors.count("online") == 2 end, 5, "a new session")
    local err = errors.last("error")
    assert.equal("handled-count-too-high", err.condition)
    assert.matches("<handled%-count%-too%-high", stream_error)
    assert.matches("undefined%-condition", stream_error)
    assert.equal("enable", second_start)   -- a new session, no attempt to resume the broken one
  end)

  it("keeps the queue when h is malformed, and releases it on the next valid ack", function()
    local server = serve(function(peer)
      login_and_enable(peer)
      read_messages(peer, 2)
      peer:send("<a xmlns='urn:xmpp:sm:3' h='two'/>")
      peer:send("<a xmlns='urn:xmpp:sm:3' h='-1'/>")
      peer:send("<a xmlns='urn:xmpp:sm:3' h='99999999999'/>")
      peer:send("<a xmlns='urn:xmpp:sm:3' h='2'/>")
      peer:wait_closed(5)
    end)
    client = new_client(server.port, { store = false, ack_after = 1000 })
    local acked = acked_bodies(client)
    local errors = wait.recorder(client, { "error" })
    client:connect()
    wait.until_true(function() return client:status() == "online" end, 5, "online")
    send_messages(client, 1, 2)
    wait.until_true(function() return #acked == 2 end, 5, "the acks")
    assert.same({ "m1", "m2" }, acked)
    assert.equal(3, errors.count("error"))
    assert.equal("bad-ack", errors.last("error").condition)
    assert.equal("online", client:status())
  end)

  it("settles by <failed h/> what the old session delivered and re-sends the rest", function()
    local resent
    local server = serve(function(peer, srv)
      if srv.connections == 1 then
        login_and_enable(peer)
        read_messages(peer, 3)
        peer:close()   -- the link dies before any ack
      else
        fakeserver.login(peer, { features = SM_FEATURE, skip_bind = true })
        local resume = peer:read()
        assert(resume.name == "resume" and resume.attr.previd == "sm-1", "expected <resume/>")
        peer:send("<failed xmlns='urn:xmpp:sm:3' h='2'><item-not-found " ..
                  "xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></failed>")
        fakeserver.bind(peer)
        peer:read()    -- <enable/>
        peer:send("<enabled xmlns='urn:xmpp:sm:3' id='sm-2' resume='true'/>")
        resent = read_messages(peer, 1)[1]
        peer:send("<a xmlns='urn:xmpp:sm:3' h='1'/>")
        peer:wait_closed(5)
      end
    end)
    client = new_client(server.port, { store = false, ack_after = 1000 })
    local acked = acked_bodies(client)
    local rec = wait.recorder(client, { "online", "resumeFailed", "resumed", "fail" })
    client:connect()
    wait.until_true(function() return client:status() == "online" end, 5, "online")
    send_messages(client, 1, 3)
    wait.until_true(function() return #acked == 3 end, 5, "all three settled")
    assert.same({ "m1", "m2", "m3" }, acked)
    assert.equal("m3", resent:get_child_text("body"))
    assert.equal(1, rec.count("resumeFailed"))
    assert.equal(0, rec.count("resumed"))
    assert.equal(0, rec.count("fail"))
    assert.equal(2, rec.count("online"))
  end)

  it("resumes at the location the server gave, and sends <delay/> on re-sent messages", function()
    local resent
    local elsewhere = serve(function(peer)
      fakeserver.login(peer, { features = SM_FEATURE, skip_bind = true })
      local resume = peer:read()
      assert(resume.name == "resume", "expected <resume/>")
      peer:send("<resumed xmlns='urn:xmpp:sm:3' previd='sm-1' h='1'/>")
      resent = read_messages(peer, 1)[1]
      peer:send("<a xmlns='urn:xmpp:sm:3' h='2'/>")
      peer:wait_closed(5)
    end)
    local main = serve(function(peer)
      login_and_enable(peer, "<enabled xmlns='urn:xmpp:sm:3' id='sm-1' resume='1' location='127.0.0.1:" ..
                             elsewhere.port .. "'/>")
      read_messages(peer, 2)
      peer:close()
    end)
    client = new_client(main.port, { store = false, ack_after = 1000 })
    local acked = acked_bodies(client)
    local rec = wait.recorder(client, { "online", "resumed" })
    client:connect()
    wait.until_true(function() return client:status() == "online" end, 5, "online")
    send_messages(client, 1, 2)
    wait.until_true(function() return rec.count("resumed") == 1 end, 5, "resumption elsewhere")
    wait.until_true(function() return #acked == 2 end, 5, "the acks")
    assert.equal(1, main.connections)
    assert.equal(1, elsewhere.connections)
    assert.equal("m2", resent:get_child_text("body"))
    local delay = resent:get_child("delay", "urn:xmpp:delay")
    assert.is_table(delay)
    assert.equal("user@example.test", delay.attr.from)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%d%.%d%d%dZ$", delay.attr.stamp)
    assert.equal(1, rec.count("online"))
  end)

  it("does not try to resume a session enabled without resumption", function()
    local second
    local server = serve(function(peer, srv)
      if srv.connections == 1 then
        login_and_enable(peer, "<enabled xmlns='urn:xmpp:sm:3'/>")
        read_messages(peer, 1)
        peer:close()
      else
        fakeserver.login(peer, { features = SM_FEATURE, skip_bind = true })
        second = peer:read()
        fakeserver.bind(peer, second)
        peer:read()
        peer:send("<enabled xmlns='urn:xmpp:sm:3'/>")
        read_messages(peer, 1)
        peer:send("<a xmlns='urn:xmpp:sm:3' h='1'/>")
        peer:wait_closed(5)
      end
    end)
    client = new_client(server.port, { store = false, ack_after = 1000 })
    local acked = acked_bodies(client)
    client:connect()
    wait.until_true(function() return client:status() == "online" end, 5, "online")
    assert.is_false(client:sm_state().resumable)
    send_messages(client, 1, 1)
    wait.until_true(function() return #acked == 1 end, 5, "the ack in the new session")
    assert.equal("iq", second.name)   -- binding, not <resume/>
  end)

  it("answers a flood of <r/> one by one and stays connected", function()
    local answers = {}
    local server = serve(function(peer)
      login_and_enable(peer)
      peer:send("<message from='peer@example.test'><body>x</body></message>")
      peer:send(string.rep("<r xmlns='urn:xmpp:sm:3'/>", 1000))
      while #answers < 1000 do
        local el = peer:read()
        if el.name == "a" then answers[#answers + 1] = el.attr.h end
      end
      peer:wait_closed(5)
    end)
    client = new_client(server.port)
    client:connect()
    wait.until_true(function() return #answers == 1000 end, 10, "1000 answers")
    for i = 1, 1000 do assert.equal("1", answers[i]) end
    assert.equal("online", client:status())
    assert.same({}, server.errors)
  end)
end)
