-- The client against a scripted server, for what a real server will not do: forged IQ replies,
-- a SCRAM server signature that does not verify, stream errors in the middle of a session.
local xmppsm = require "xmppsm"
local core = require "xmppsm.core"
local fakeserver = require "helpers.fakeserver"
local wait = require "helpers.wait"
local stanza = xmppsm.stanza

local function new_client(server, extra)
  local opts = {
    jid = "user@example.test", password = "pencil", host = "127.0.0.1", port = server.port,
    tls = "none", allow_plain = true, reconnect_delay = 0.05, connect_timeout = 3,
    sm = false, logger = function() end,
  }
  for k, v in pairs(extra or {}) do opts[k] = v end
  return xmppsm.client(opts)
end

describe("client against a scripted server", function()
  local server, client
  after_each(function()
    if client and client:status() ~= "closed" then
      client:close(0.2)
      wait.until_true(function() return client:status() == "closed" end, 3, "close")
    end
    if server then server.stop() end
    server, client = nil, nil
  end)

  it("ignores an IQ reply forged by someone other than the addressed entity", function()
    local forged_sent = false
    server = fakeserver.start(function(peer)
      fakeserver.login(peer)
      peer:read()                          -- initial presence
      local req = peer:read()
      assert(req.name == "iq")
      -- Someone else answers first, with the right id: must be ignored.
      peer:send(string.format("<iq type='result' id='%s' from='mallory@example.test/x'>" ..
                              "<query xmlns='urn:example'>forged</query></iq>", req.attr.id))
      forged_sent = true
      peer:send(string.format("<iq type='result' id='%s' from='%s'>" ..
                              "<query xmlns='urn:example'>real</query></iq>", req.attr.id, req.attr.to))
      peer:wait_closed(5)
    end)
    client = new_client(server)
    client:connect()
    wait.until_true(function() return client:status() == "online" end, 5, "online")
    local reply
    local iq = stanza.iq({ type = "get", to = "service.example.test" })
      :tag("query", { xmlns = "urn:example" })
    client:request(iq, 5, function(r, err) reply = { r, err } end)
    wait.until_true(function() return reply end, 5, "the reply")
    assert.is_true(forged_sent)
    assert.equal("real", reply[1]:get_child_text("query", "urn:example"))
    assert.same({}, server.errors)
  end)

  it("refuses a SCRAM server signature that does not verify, and does not retry", function()
    server = fakeserver.start(function(peer)
      peer:read_header()
      peer:open_stream()
      peer:send("<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>" ..
                "<mechanism>SCRAM-SHA-1</mechanism></mechanisms></stream:features>")
      local auth = peer:read()
      local first = core.base64_decode(auth:get_text())
      local cnonce = first:match("r=([^,]+)")
      local server_first = "r=" .. cnonce .. "srv,s=" .. core.base64_encode("salt") .. ",i=4096"
      peer:send("<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>" ..
                core.base64_encode(server_first) .. "</challenge>")
      peer:read()   -- the client's proof; we do not know the password and pretend anyway
      peer:send("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>" ..
                core.base64_encode("v=" .. core.base64_encode(string.rep("x", 20))) .. "</success>")
      peer:wait_closed(5)
    end)
    client = new_client(server)
    local rec = wait.recorder(client, { "online", "offline", "reconnecting" })
    client:connect()
    wait.until_true(function() return client:status() == "closed" end, 5, "the client to give up")
    local err = rec.last("offline")
    assert.equal("auth", err.type)
    assert.equal("server-signature-invalid", err.condition)
    assert.equal(0, rec.count("online"))
    assert.equal(0, rec.count("reconnecting"))
    assert.equal(1, server.connections)
  end)

  it("reports a stream error mid-session with its condition and reconnects", function()
    server = fakeserver.start(function(peer, srv)
      fakeserver.login(peer)
      if srv.connections == 1 then
        peer:read()   -- initial presence
        peer:send("<stream:error><system-shutdown xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>" ..
                  "<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>going down</text></stream:error>" ..
                  "</stream:stream>")
        peer:wait_closed(2)
        peer:close()
      else
        peer:wait_closed(5)
      end
    end)
    client = new_client(server)
    local rec = wait.recorder(client, { "online", "error", "disconnected", "reconnecting" })
    client:connect()
    wait.until_true(function() return rec.count("online") == 2 end, 5, "the second session")
    local err = rec.last("error")
    assert.equal("stream", err.type)
    assert.equal("system-shutdown", err.condition)
    assert.equal("going down", err.text)
    assert.equal(1, rec.count("reconnecting"))
  end)

  it("gives a rawIn handler added in the middle of a chunk only bytes, never a placeholder", function()
    -- Before the first rawIn handler the parser keeps no raw bytes (stanza events carry false):
    -- the handler added by the first message must not see that false for the second message
    -- nor for the stream error, which arrive in the same chunk.
    server = fakeserver.start(function(peer)
      fakeserver.login(peer)
      peer:read()
      peer:send("<message from='a@example.test/x'><body>1</body></message>" ..
                "<message from='a@example.test/x'><body>2</body></message>" ..
                "<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>")
      peer:wait_closed(2)
    end)
    client = new_client(server)
    local seen, bodies = {}, {}
    client:on("message", function(m)
      bodies[#bodies + 1] = m:get_child_text("body")
      if #bodies == 1 then client:on("rawIn", function(s) seen[#seen + 1] = s end) end
    end)
    local rec = wait.recorder(client, { "offline" })
    client:connect()
    wait.until_true(function() return client:status() == "closed" end, 5, "the client to stop")
    assert.same({ "1", "2" }, bodies)
    for _, s in ipairs(seen) do assert.is_string(s) end
    assert.equal("conflict", rec.last("offline").condition)
  end)

  it("stops for good on a conflict stream error", function()
    server = fakeserver.start(function(peer)
      fakeserver.login(peer)
      peer:read()
      peer:send("<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>")
      peer:wait_closed(2)
    end)
    client = new_client(server)
    local rec = wait.recorder(client, { "online", "offline", "reconnecting" })
    client:connect()
    wait.until_true(function() return client:status() == "closed" end, 5, "the client to stop")
    assert.equal("conflict", rec.last("offline").condition)
    assert.equal(0, rec.count("reconnecting"))
  end)

  it("answers malformed XML from the server with a stream error and reconnects", function()
    server = fakeserver.start(function(peer, srv)
      fakeserver.login(peer)
      if srv.connections == 1 then
        peer:read()
        peer:send("<message><body>unclosed</message>")
        peer:wait_closed(2)
      else
        peer:wait_closed(5)
      end
    end)
    client = new_client(server)
    local rec = wait.recorder(client, { "online", "error" })
    client:connect()
    wait.until_true(function() return rec.count("online") == 2 end, 5, "the second session")
    assert.equal("not-well-formed", rec.last("error").condition)
  end)

  it("gives up on a server that never answers within connect_timeout, then retries", function()
    server = fakeserver.start(function(peer) peer:wait_closed(10) end)
    client = new_client(server, { connect_timeout = 0.3 })
    local rec = wait.recorder(client, { "error", "reconnecting" })
    client:connect()
    wait.until_true(function() return rec.count("reconnecting") >= 1 end, 3, "a retry")
    assert.equal("connection-timeout", rec.last("error").condition)
    assert.matches("stream header", rec.last("error").text)
  end)

  it("stops without an error when closed in the middle of connecting", function()
    server = fakeserver.start(function(peer) peer:wait_closed(10) end)
    client = new_client(server)
    local rec = wait.recorder(client, { "offline", "reconnecting" })
    client:connect()
    wait.until_true(function() return server.connections == 1 end, 3, "the connection")
    client:close()
    wait.until_true(function() return client:status() == "closed" end, 3, "the client to stop")
    assert.equal(1, rec.count("offline"))
    assert.is_nil(rec.last("offline"))
    assert.equal(0, rec.count("reconnecting"))
  end)

  it("never logs the password, even at debug level", function()
    server = fakeserver.start(function(peer)
      fakeserver.login(peer)
      peer:wait_closed(5)
    end)
    local lines = {}
    client = new_client(server, { password = "s3cr3t-pw", logger = function(level, text)
      lines[#lines + 1] = level .. " " .. text
    end, log_level = "debug" })
    client:on("rawOut", function(s) lines[#lines + 1] = s end)
    client:connect()
    wait.until_true(function() return client:status() == "online" end, 5, "online")
    local all = table.concat(lines, "\n")
    assert.is_true(#lines > 3)
    assert.is_nil(all:find("s3cr3t", 1, true))
    assert.is_nil(all:find(core.base64_encode("\0user\0s3cr3t-pw"), 1, true))
  end)

  it("refuses bytes injected after <proceed/> before TLS starts", function()
    server = fakeserver.start(function(peer)
      peer:read_header()
      peer:open_stream()
      peer:send("<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/></starttls>" ..
                "</stream:features>")
      peer:read()
      peer:send("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><stream:features/>")
      peer:wait_closed(5)
    end)
    client = new_client(server, { tls = "starttls" })
    local rec = wait.recorder(client, { "online", "offline" })
    client:connect()
    wait.until_true(function() return client:status() == "closed" end, 5, "the client to stop")
    local err = rec.last("offline")
    assert.equal("tls", err.type)
    assert.matches("after <proceed/>", err.text, 1, true)
  end)
end)
