-- The client against a real Prosody: TLS, SASL, binding, messages, IQ, ping, reconnection.
local xmppsm = require "xmppsm"
local prosody = require "helpers.prosody"
local process = require "helpers.process"
local wait = require "helpers.wait"
local stanza = xmppsm.stanza

local DOMAIN = "xmppsm.test"

-- A client for `user` on `server`, with Stream Management state kept in memory only.
local function new_client(server, user, extra)
  local opts = {
    jid = user .. "@" .. server.domain, password = "pw-" .. user,
    host = server.host, port = server.port, cafile = server.cafile,
    reconnect_delay = 0.1, connect_timeout = 5, sm = { store = false },
    logger = function() end,
  }
  for k, v in pairs(extra or {}) do opts[k] = v end
  return xmppsm.client(opts)
end

local clients = {}
local function start(c)
  clients[#clients + 1] = c
  c:connect()
  return c
end

local function online(c, what)
  return wait.until_true(function() return c:status() == "online" end, 10, what or "online")
end

local function close_all()
  for _, c in ipairs(clients) do
    if c:status() ~= "closed" then c:close(1) end
  end
  wait.until_true(function()
    for _, c in ipairs(clients) do if c:status() ~= "closed" then return false end end
    return true
  end, 5, "clients to close")
  clients = {}
end

describe("client against Prosody", function()
  local server

  setup(function()
    server = prosody.start{ domain = DOMAIN, users = { { "alice", "pw-alice" }, { "bob", "pw-bob" } } }
  end)
  teardown(function()
    if server then server:stop() end
    process.stop_all()
  end)
  after_each(close_all)

  -- (A forged server signature is refused: client_hostile_spec; a real server always signs right.)
  it("logs in with SCRAM-SHA-1 (Prosody's default hash)", function()
    local c = start(new_client(server, "alice", { mechanisms = { "SCRAM-SHA-1" }, resource = "sha1" }))
    local rec = wait.recorder(c, { "online" })
    online(c, "SCRAM-SHA-1 login")
    assert.equal(1, rec.count("online"))
    assert.equal("alice@" .. DOMAIN .. "/sha1", c:jid())
  end)

  it("logs in with SCRAM-SHA-256 against a server storing SHA-256 keys", function()
    local s256 = prosody.start{ domain = DOMAIN, users = { { "alice", "pw-alice" } },
                                options = { 'password_hash = "SHA-256"' } }
    local ok, err = pcall(function()
      local c = start(new_client(s256, "alice", { mechanisms = { "SCRAM-SHA-256" } }))
      online(c, "SCRAM-SHA-256 login")
      close_all()
    end)
    s256:stop()
    assert(ok, err)
  end)

  it("refuses a wrong password with not-authorized and does not retry", function()
    local c = start(new_client(server, "alice", { password = "wrong" }))
    local rec = wait.recorder(c, { "error", "offline", "reconnecting", "online" })
    wait.until_true(function() return c:status() == "closed" end, 10, "the client to give up")
    local err = rec.last("offline")
    assert.equal("auth", err.type)
    assert.equal("not-authorized", err.condition)
    assert.equal(0, rec.count("reconnecting"))
    assert.equal(0, rec.count("online"))
    assert.equal(1, c.stats.connects)
  end)

  it("never shows the password or SASL payloads in raw traffic", function()
    local c = new_client(server, "alice", { mechanisms = { "SCRAM-SHA-1" } })
    local sent, received = {}, {}
    c:on("rawOut", function(s) sent[#sent + 1] = s end)
    c:on("rawIn", function(s) received[#received + 1] = s end)
    start(c)
    online(c)
    local out, inn = table.concat(sent, "\n"), table.concat(received, "\n")
    local all = out .. "\n" .. inn
    local b64 = require("xmppsm.core").base64_encode
    assert.not_matches("pw%-alice", all)
    assert.is_nil(all:find("n,,n=alice", 1, true))
    -- The base64 of the SCRAM client-first message ("n,,n=alice,r=...") must not appear either.
    assert.is_nil(all:find(b64("n,,n=alic"), 1, true))
    -- Both ways: our <auth/> and <response/>, the server's <challenge/> and <success/>.
    assert.matches("SASL payload hidden", out, 1, true)
    assert.matches("SASL payload hidden", inn, 1, true)
    assert.matches("mechanism='SCRAM-SHA-1'><!-- SASL payload hidden --></auth>", out, 1, true)
    assert.matches("<!-- SASL payload hidden --></response>", out, 1, true)
    -- the client-final message, "c=biws,r=...", in base64
    assert.is_nil(out:find(b64("c=biws"), 1, true))
    assert.is_nil(inn:find("<challenge", 1, true))
    assert.is_nil(inn:find("<success", 1, true))
  end)

  -- Sends "before", "during" and "after" from `a` to `to`, each waited for at `rx`, with a
  -- handler of `event` on `watcher` only around "during". Returns what the handler saw, and
  -- how much of it it had seen when it was removed.
  local function traffic_seen(a, rx, to, watcher, event)
    local got = {}
    rx:on("message", function(m) got[#got + 1] = m:get_child_text("body") end)
    local function send(body)
      a:send(stanza.message({ to = to, type = "chat" }, body))
      wait.until_true(function() return got[#got] == body end, 5, "message " .. body)
    end
    send("before")
    local seen = {}
    local function log(s) seen[#seen + 1] = s end
    watcher:on(event, log)
    send("during")
    watcher:off(event, log)
    local when_removed = #seen
    send("after")
    return seen, when_removed
  end

  it("shows received stanzas to a rawIn handler added while online, and none once removed", function()
    local a = start(new_client(server, "alice"))
    local b = start(new_client(server, "bob"))
    online(a) online(b)
    -- "before": nobody logs, so the parser keeps no raw bytes
    local seen, when_removed = traffic_seen(a, b, "bob@" .. DOMAIN, b, "rawIn")
    local all = table.concat(seen)
    assert.matches("<body>during</body>", all, 1, true)
    assert.is_nil(all:find("before", 1, true))
    for _, s in ipairs(seen) do assert.is_string(s) end
    assert.equal(when_removed, #seen)
  end)

  it("shows sent stanzas to a rawOut handler added while online, and none once removed", function()
    local a = start(new_client(server, "alice"))
    online(a)
    local seen, when_removed = traffic_seen(a, a, a:jid(), a, "rawOut")
    local all = table.concat(seen)
    assert.matches("<body>during</body>", all, 1, true)
    assert.is_nil(all:find("before", 1, true))
    assert.equal(when_removed, #seen)
  end)

  it("refuses to send what is not a stanza", function()
    local c = new_client(server, "alice")
    for _, v in ipairs { "<message/>", { name = "message", attr = {} }, 42 } do
      local ok, err = pcall(c.send, c, v)
      assert.is_false(ok)
      assert.matches("send%(%) takes a stanza", err)
    end
  end)

  it("exchanges messages between two clients", function()
    local a = start(new_client(server, "alice"))
    local b = start(new_client(server, "bob"))
    local got = {}
    b:on("message", function(m) got[#got + 1] = m end)
    online(a) online(b)
    a:send(stanza.message({ to = "bob@" .. DOMAIN, type = "chat" }, "hello <bob> & ünïcode"))
    wait.until_true(function() return #got == 1 end, 5, "the message")
    assert.equal("hello <bob> & ünïcode", got[1]:get_child_text("body"))
    assert.equal(a:jid(), got[1].attr.from)
  end)

  it("without stream management, sends what was sent offline, then what a status handler sends", function()
    local a = new_client(server, "alice", { sm = false })
    local b = start(new_client(server, "bob"))
    local bodies = {}
    b:on("message", function(m) bodies[#bodies + 1] = m:get_child_text("body") end)
    online(b)
    local function to_bob(body) return stanza.message({ to = "bob@" .. DOMAIN, type = "chat" }, body) end
    a:on("status", function(new)
      if new == "online" then assert.is_true(a:send(to_bob("from-status"))) end
    end)
    assert.is_true(a:send(to_bob("early1")))
    assert.is_true(a:send(to_bob("early2")))
    start(a)
    wait.until_true(function() return #bodies == 3 end, 10, "3 messages")
    assert.same({ "early1", "early2", "from-status" }, bodies)
  end)

  it("makes IQ requests by callback and in a coroutine, and times out", function()
    local a = start(new_client(server, "alice"))
    local b = start(new_client(server, "bob"))
    b:addIqHandler("urn:example:echo", function(iq)
      local reply = stanza.reply(iq)
      reply:tag("echo", { xmlns = "urn:example:echo" }):text(iq:get_child_text("echo", "urn:example:echo"))
      return reply
    end)
    b:addIqHandler("urn:example:silent", function() return true end)  -- never replies
    online(a) online(b)

    local result
    local echo = stanza.iq({ to = b:jid(), type = "get" }):tag("echo", { xmlns = "urn:example:echo" })
    a:request(echo:text("x1"), 5, function(reply, err) result = { reply, err } end)
    wait.until_true(function() return result end, 5, "the callback")
    assert.equal("x1", result[1]:get_child_text("echo", "urn:example:echo"))

    local co_result
    xmppsm.spawn(function()
      local reply, err = a:request(stanza.iq({ to = b:jid(), type = "get" })
        :tag("echo", { xmlns = "urn:example:echo" }):text("x2"))
      co_result = { reply = reply, err = err }
    end)
    wait.until_true(function() return co_result end, 5, "the coroutine")
    assert.equal("x2", co_result.reply:get_child_text("echo", "urn:example:echo"))

    local timed_out
    a:request(stanza.iq({ to = b:jid(), type = "get" }):tag("q", { xmlns = "urn:example:silent" }), 0.3,
              function(reply, err) timed_out = { reply, err } end)
    wait.until_true(function() return timed_out end, 5, "the timeout")
    assert.is_nil(timed_out[1])
    assert.equal("timeout", timed_out[2].condition)

    local unhandled
    a:request(stanza.iq({ to = b:jid(), type = "get" }):tag("q", { xmlns = "urn:example:nobody" }), 5,
              function(reply, err) unhandled = { reply, err } end)
    wait.until_true(function() return unhandled end, 5, "the error reply")
    assert.equal("service-unavailable", unhandled[2].condition)
  end)

  it("answers pings (XEP-0199)", function()
    local a = start(new_client(server, "alice"))
    local b = start(new_client(server, "bob"))
    online(a) online(b)
    local res
    a:request(stanza.iq({ to = b:jid(), type = "get" }):tag("ping", { xmlns = "urn:xmpp:ping" }), 5,
              function(reply, err) res = { reply, err } end)
    wait.until_true(function() return res end, 5, "the pong")
    assert.is_nil(res[2])
    assert.equal("result", res[1].attr.type)
  end)

  it("reports a handler that raises through the error event and keeps working", function()
    local a = start(new_client(server, "alice"))
    local b = start(new_client(server, "bob"))
    local errors, got = {}, 0
    b:on("message", function() error("boom in handler") end)
    b:on("message", function() got = got + 1 end)
    b:on("error", function(e) errors[#errors + 1] = e end)
    online(a) online(b)
    a:send(stanza.message({ to = "bob@" .. DOMAIN }, "1"))
    a:send(stanza.message({ to = "bob@" .. DOMAIN }, "2"))
    wait.until_true(function() return got == 2 end, 5, "both messages")
    assert.equal(2, #errors)
    assert.equal("handler", errors[1].type)
    assert.matches("boom in handler", errors[1].text)
    assert.equal("online", b:status())
  end)

  it("refuses to send invalid XML and sends nothing", function()
    local a = start(new_client(server, "alice"))
    online(a)
    local ok, err = a:send(stanza.message({ to = "bob@" .. DOMAIN }, "bad \1 char"))
    assert.is_nil(ok)
    assert.equal("invalid-xml", err.condition)
    assert.equal("online", a:status())
  end)

  it("reconnects after the server is stopped and started again", function()
    local a = start(new_client(server, "alice"))
    local rec = wait.recorder(a, { "online", "disconnected", "reconnecting", "resumed" })
    online(a)
    server:stop()
    wait.until_true(function() return rec.count("disconnected") >= 1 end, 10, "the disconnect")
    server:restart()
    wait.until_true(function() return rec.count("online") == 2 end, 20, "the second session")
    assert.is_true(rec.count("reconnecting") >= 1)
    assert.equal(0, rec.count("resumed"))   -- a restarted server has no session to resume
  end)
end)

describe("client TLS checks against Prosody", function()
  local function expect_tls_failure(server_opts, client_opts, pattern)
    local server = prosody.start(server_opts)
    local ok, err = pcall(function()
      local c = start(new_client(server, "alice", client_opts))
      local rec = wait.recorder(c, { "offline", "online" })
      wait.until_true(function() return c:status() == "closed" end, 10, "the client to give up")
      local e = rec.last("offline")
      assert.equal(0, rec.count("online"))
      assert.equal("tls", e.type)
      assert.matches(pattern, e.text)
    end)
    clients = {}
    server:stop()
    assert(ok, err)
  end

  it("refuses a certificate from an untrusted CA", function()
    expect_tls_failure({ domain = DOMAIN, users = { { "alice", "pw-alice" } }, cert = "untrusted" }, nil,
                       "not trusted")
  end)

  it("refuses a certificate for another name", function()
    expect_tls_failure({ domain = DOMAIN, users = { { "alice", "pw-alice" } }, cert = "wrongname" }, nil,
                       "not valid for " .. DOMAIN:gsub("%.", "%%."))
  end)

  it("refuses a server that does not offer STARTTLS", function()
    expect_tls_failure({ domain = DOMAIN, users = { { "alice", "pw-alice" } }, tls = "none" }, nil,
                       "does not offer STARTTLS")
  end)

  it("connects with direct TLS (XEP-0368)", function()
    local server = prosody.start{ domain = DOMAIN, users = { { "alice", "pw-alice" } }, tls = "both" }
    local ok, err = pcall(function()
      local c = start(new_client(server, "alice", { tls = "direct", port = server.direct_tls_port }))
      online(c, "a direct TLS session")
      local info = c.conn.transport:tls_info()
      assert.matches("^TLSv1%.[23]$", info.protocol)
      close_all()
    end)
    server:stop()
    assert(ok, err)
  end)
end)
