-- Proves the spec helpers against real processes: a real Prosody, the proxy process, and
-- the process bookkeeping that must leave nothing running, even when a test fails.
local socket = require "socket"
local ssl = require "ssl"
local mime = require "mime"
local lfs = require "lfs"
local process = require "helpers.process"
local tls = require "helpers.tls"
local prosody = require "helpers.prosody"
local proxy = require "helpers.proxy"

local DOMAIN = "xmppsm.test"

local function stream_header(domain)
  return "<?xml version='1.0'?><stream:stream to='" .. (domain or DOMAIN) .. "' version='1.0' "
    .. "xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
end

-- Reads until `pattern` shows up in what was received, or fails with what did arrive.
-- receive(n) waits for all n bytes, so wait in select() and then take what is there.
local function read_until(conn, pattern, timeout)
  local deadline = process.now() + (timeout or 5)
  local got = ""
  conn:settimeout(0)
  while not got:find(pattern) do
    local left = deadline - process.now()
    if left <= 0 then error(("timeout waiting for %q; got: %s"):format(pattern, got), 2) end
    socket.select({ conn }, nil, left)
    local data, err, partial = conn:receive(4096)
    got = got .. (data or partial or "")
    if err and err ~= "timeout" and err ~= "wantread" and not got:find(pattern) then
      error(("connection %s before %q; got: %s"):format(err, pattern, got), 2)
    end
  end
  return got
end

-- Reads until the peer closes or resets; returns the bytes and "fin" or "rst".
-- LuaSocket reports both EOF and ECONNRESET as "closed"; receive("*a") returns the data on
-- EOF but nil plus the partial data on a reset. With no data at all the two look alike,
-- so then a send tells: after a FIN the socket still takes data, after a RST it fails.
local function read_to_end(conn, timeout)
  conn:settimeout(timeout or 5)
  local data, err, partial = conn:receive("*a")
  if data then return data, "fin" end
  if err ~= "closed" then return partial, err end
  if #partial > 0 then return partial, "rst" end
  return partial, conn:send("x") and "fin" or "rst"
end

local function tcp_connect(port)
  local c = socket.tcp()
  c:settimeout(5)
  assert(c:connect("127.0.0.1", port))
  return c
end

local function tls_wrap(sock, cafile, servername)
  local conn = assert(ssl.wrap(sock, {
    mode = "client", protocol = "any", verify = { "peer" }, cafile = cafile,
    options = { "all", "no_sslv2", "no_sslv3", "no_tlsv1", "no_tlsv1_1" },
  }))
  conn:sni(servername or DOMAIN)
  conn:settimeout(5)
  local ok, err = conn:dohandshake()
  if not ok then
    conn:close()
    return nil, err
  end
  return conn
end

local function mechanisms(features)
  local list = {}
  for m in features:gmatch("<mechanism>([^<]+)</mechanism>") do list[#list + 1] = m end
  table.sort(list)
  return list
end

-- Plain connection, stream header, STARTTLS, verified handshake, fresh stream: returns the
-- TLS connection and the features offered after TLS.
local function starttls(server, port)
  local c = tcp_connect(port or server.port)
  c:send(stream_header())
  local features = read_until(c, "</stream:features>")
  assert.matches("<starttls xmlns=.urn:ietf:params:xml:ns:xmpp%-tls.", features)
  c:send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
  read_until(c, "<proceed")
  local conn = assert(tls_wrap(c, server.cafile))
  conn:send(stream_header())
  return conn, read_until(conn, "</stream:features>")
end

-- SASL PLAIN on a stream whose features were just read; true on <success/>.
local function auth_plain(conn, user, password)
  conn:send("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
    .. mime.b64("\0" .. user .. "\0" .. password) .. "</auth>")
  local reply = read_until(conn, "</?%w+ xmlns=.urn:ietf:params:xml:ns:xmpp%-sasl.")
  return reply:find("<success", 1, true) ~= nil
end

local function login_works(server, user, password)
  local conn = starttls(server)
  local ok = auth_plain(conn, user, password)
  conn:close()
  return ok
end

-- A plain TCP server inside the spec, used as the proxy's target when exact bytes matter.
local function local_target()
  local server = assert(socket.bind("127.0.0.1", 0))
  server:settimeout(5)
  return server, select(2, server:getsockname())
end

-- Client through the proxy and the matching accepted socket at the target.
local function through(p, target)
  local c = tcp_connect(p.port)
  local s = assert(target:accept())
  s:settimeout(5)
  return c, s
end

describe("spec helpers", function()
  after_each(function()
    -- every test stops its own processes; anything still running here is a leak
    local leaked = {}
    for _, p in ipairs(process.spawned()) do
      if process.pid_running(p.pid) then leaked[#leaked + 1] = p.name .. " " .. p.pid end
    end
    process.stop_all()
    assert.same({}, leaked)
  end)

  describe("process", function()
    it("starts a command in the background and stops it by pid", function()
      local p = process.spawn({ "sleep", "30" })
      finally(function() p:stop() end)
      assert.is_true(p:alive())
      assert.is_true(process.pid_running(p.pid))
      assert.is_true(p:stop())
      assert.is_false(p:alive())
      assert.is_false(process.pid_running(p.pid))
      assert.is_false(p:kill("TERM")) -- a gone process is never signalled
    end)

    it("escalates to SIGKILL when SIGTERM is ignored", function()
      -- an ignored signal stays ignored across exec, so this sleep shrugs off SIGTERM
      local p = process.spawn({ "bash", "-c", "trap '' TERM; exec sleep 30" })
      finally(function() p:stop(0.1) end)
      process.sleep(0.05)
      local ok, how = p:stop(0.2)
      assert.is_false(ok)
      assert.equal("killed", how)
      assert.is_false(process.pid_running(p.pid))
    end)

    it("captures stdout and stderr in files", function()
      local p = process.spawn({ "sh", "-c", "echo out; echo err >&2" })
      finally(function() p:stop() end)
      assert.truthy(p:wait(5))
      assert.equal("out\n", p:stdout_text())
      assert.equal("err\n", p:stderr_text())
    end)

    it("does not hand its sockets to children", function()
      local listener, port = local_target()
      local p = process.spawn({ "sleep", "30" })
      finally(function()
        p:stop()
        listener:close()
      end)
      -- (sleep opens its own libc and locale files while starting: only sockets are ours)
      local sockets = {}
      for name in lfs.dir("/proc/" .. p.pid .. "/fd") do
        local target = lfs.symlinkattributes("/proc/" .. p.pid .. "/fd/" .. name, "target")
        if target and target:match("^socket:") then sockets[#sockets + 1] = name end
      end
      assert.same({}, sockets)
      -- once we close the listener, nobody listens: an inherited copy would still accept
      listener:close()
      local c = socket.tcp()
      c:settimeout(1)
      local ok, err = c:connect("127.0.0.1", port)
      c:close()
      assert.is_nil(ok)
      assert.equal("connection refused", err)
    end)

    it("finds free ports and waits for them to accept", function()
      local port = process.free_port()
      assert.is_true(port > 1024 and port < 65536)
      local t0 = process.now()
      local ok, err = process.wait_port(port, 0.2)
      assert.is_nil(ok)
      assert.matches("not accepting", err)
      assert.is_true(process.now() - t0 >= 0.2)
      local server = assert(socket.bind("127.0.0.1", port))
      finally(function() server:close() end)
      assert.is_true(process.wait_port(port, 1))
    end)

    it("makes temporary directories and removes trees without following links", function()
      local keep = process.tmpdir("xmppsm-keep")
      local dir = process.tmpdir("xmppsm-gone")
      process.write_file(keep .. "/precious", "x")
      assert(lfs.mkdir(dir .. "/a"))
      process.write_file(dir .. "/a/file", "y")
      assert(os.execute("ln -s " .. process.quote(keep) .. " " .. process.quote(dir .. "/a/link")))
      process.rmtree(dir)
      assert.is_nil(lfs.attributes(dir))
      assert.equal("x", process.read_file(keep .. "/precious"))
      assert.has_error(function() process.rmtree("/tmp/../etc") end)
    end)
  end)

  describe("tls", function()
    it("makes a trusted, an untrusted and a wrong-name certificate", function()
      local certs = tls.generate(DOMAIN)
      local function verify(cert, extra)
        return (process.run("openssl verify -CAfile " .. process.quote(certs.cafile) .. " "
          .. (extra or "") .. " " .. process.quote(cert)))
      end
      assert.is_true(verify(certs.good.cert, "-verify_hostname " .. DOMAIN))
      assert.is_true(verify(certs.good.cert, "-verify_hostname localhost"))
      assert.is_false(verify(certs.untrusted.cert))
      assert.is_true(verify(certs.wrongname.cert))
      assert.is_false(verify(certs.wrongname.cert, "-verify_hostname " .. DOMAIN))
      assert.is_true(verify(certs.wrongname.cert, "-verify_hostname " .. tls.OTHER_NAME))
      for _, name in ipairs({ "good", "untrusted", "wrongname" }) do
        assert.truthy(lfs.attributes(certs[name].key), name .. " key")
      end
    end)
  end)

  describe("prosody", function()
    it("offers STARTTLS, SCRAM after a verified TLS handshake, and stream management", function()
      local server = prosody.start({ users = { { "alice", "pw" } }, hibernation = 17,
        smacks = { max_unacked_stanzas = 1 } })
      finally(function() server:stop() end)
      assert.equal("127.0.0.1", server.host)
      assert.equal(DOMAIN, server.domain)
      assert.is_nil(server.direct_tls_port)
      local conn, features = starttls(server)
      assert.is_true(conn:getpeerverification())
      local mechs = mechanisms(features)
      assert.truthy(table.concat(mechs, " "):find("SCRAM-SHA-1", 1, true), server:log())
      assert.is_nil(features:find("<starttls", 1, true))
      assert.is_true(auth_plain(conn, "alice", "pw"))
      conn:send(stream_header())
      features = read_until(conn, "</stream:features>")
      assert.matches("<sm xmlns=.urn:xmpp:sm:3.", features)
      conn:send("<iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>")
      read_until(conn, "</iq>")
      conn:send("<enable xmlns='urn:xmpp:sm:3' resume='true'/>")
      local enabled = read_until(conn, "<enabled[^>]*>")
      assert.matches("resume=.true.", enabled)
      assert.matches("max=.17.", enabled) -- smacks_hibernation_time
      -- Prosody asks for an ack once more than smacks_max_unacked_stanzas (default 0) are
      -- unacked: with 1, not after the first reply but after the second
      conn:send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>")
      local got = read_until(conn, "id=.p1.")
      conn:send("<iq type='get' id='p2'><ping xmlns='urn:xmpp:ping'/></iq>")
      got = got .. read_until(conn, "<r xmlns=.urn:xmpp:sm:3./>")
      conn:close()
      assert.is_true(got:find("<r ", 1, true) > got:find("id='p2'", 1, true), got)
      assert.is_false(login_works(server, "alice", "wrong"))
    end)

    it("serves a certificate from an untrusted CA, or for another name, when asked", function()
      local untrusted = prosody.start({ cert = "untrusted" })
      local wrongname = prosody.start({ cert = "wrongname" })
      finally(function()
        untrusted:stop()
        wrongname:stop()
      end)
      local function handshake(server)
        local c = tcp_connect(server.port)
        c:send(stream_header())
        read_until(c, "</stream:features>")
        c:send("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        read_until(c, "<proceed")
        return tls_wrap(c, server.cafile)
      end
      local conn, err = handshake(untrusted)
      assert.is_nil(conn)
      assert.matches("certificate verify failed", err)
      -- the CA is trusted, so the handshake passes; the name is what is wrong
      conn = assert(handshake(wrongname))
      local san = conn:getpeercertificate():extensions()["2.5.29.17"]
      conn:close()
      assert.same({ tls.OTHER_NAME }, san.dNSName)
    end)

    it("serves direct TLS on its own port (XEP-0368)", function()
      local server = prosody.start({ tls = "direct" })
      finally(function() server:stop() end)
      assert.is_nil(server.port)
      assert.is_number(server.direct_tls_port)
      local conn = assert(tls_wrap(tcp_connect(server.direct_tls_port), server.cafile))
      conn:send(stream_header())
      local features = read_until(conn, "</stream:features>")
      conn:close()
      assert.truthy(mechanisms(features)[1])
      assert.is_nil(features:find("<starttls", 1, true))
    end)

    it("serves both STARTTLS and direct TLS with tls = both", function()
      local server = prosody.start({ tls = "both", users = { { "alice", "pw" } } })
      finally(function() server:stop() end)
      assert.is_true(login_works(server, "alice", "pw"))
      local conn = assert(tls_wrap(tcp_connect(server.direct_tls_port), server.cafile))
      conn:send(stream_header())
      read_until(conn, "</stream:features>")
      assert.is_true(auth_plain(conn, "alice", "pw"))
      conn:close()
    end)

    it("offers SCRAM-SHA-256 instead of SCRAM-SHA-1 with password_hash SHA-256", function()
      local server = prosody.start({ options = { 'password_hash = "SHA-256"' } })
      finally(function() server:stop() end)
      local conn, features = starttls(server)
      conn:close()
      local mechs = table.concat(mechanisms(features), " ")
      assert.truthy(mechs:find("SCRAM-SHA-256", 1, true), mechs)
      assert.falsy(mechs:find("SCRAM-SHA-1", 1, true), mechs)
    end)

    it("runs without TLS when tls = none", function()
      local server = prosody.start({ tls = "none" })
      finally(function() server:stop() end)
      local c = tcp_connect(server.port)
      c:send(stream_header())
      local features = read_until(c, "</stream:features>")
      c:close()
      assert.is_nil(features:find("<starttls", 1, true))
      assert.same({ "SCRAM-SHA-1" }, mechanisms(features))
    end)

    it("restarts on the same port with the same accounts", function()
      local server = prosody.start({ users = { { "alice", "pw" } } })
      finally(function() server:stop() end)
      server:register("bob", "secret")
      assert.is_true(login_works(server, "bob", "secret"))
      local port, old_pid = server.port, server.process.pid
      local open = tcp_connect(port)
      open:send(stream_header())
      read_until(open, "</stream:features>")
      server:restart()
      -- and it is closed. Prosody 0.12.3 usually sends <system-shutdown/> first, but not
      -- always: now and then its epoll loop drops the buffered stream error on shutdown.
      local got, ending = read_to_end(open, 2)
      open:close()
      assert.is_true(ending == "fin" or ending == "rst", tostring(ending))
      assert.is_true(got == "" or got:find("<system-shutdown", 1, true) ~= nil, got)
      assert.equal(port, server.port)
      assert.are_not.equal(old_pid, server.process.pid)
      assert.is_false(process.pid_running(old_pid))
      assert.is_true(login_works(server, "alice", "pw"))
      assert.is_true(login_works(server, "bob", "secret"))
      assert.is_false(login_works(server, "bob", "pw"))
    end)

    it("freezes with kill('STOP'), thaws with kill('CONT'), and crashes with kill()", function()
      local server = prosody.start({ tls = "none" })
      finally(function() server:stop() end)
      local c = tcp_connect(server.port)
      c:send(stream_header())
      read_until(c, "</stream:features>")
      server:kill("STOP")
      c:send("<iq type='get' id='x'/>") -- Prosody answers with an error
      c:settimeout(0.2)
      local data, err = c:receive(1)
      assert.is_nil(data)
      assert.equal("timeout", err)
      server:kill("CONT")
      assert.matches("type='error'", read_until(c, "</iq>"))
      c:close()
      c = tcp_connect(server.port)
      c:send(stream_header())
      read_until(c, "</stream:features>")
      server:kill()
      assert.is_false(server:alive())
      local got = read_to_end(c, 2)
      c:close()
      assert.equal("", got) -- no stream error, no </stream:stream>: a crash
    end)

    it("fails with Prosody's own words when it cannot start", function()
      local ok, err = pcall(prosody.start, { options = { "this is not lua" } })
      assert.is_false(ok)
      assert.matches("Prosody did not start", err)
      assert.matches("prosody.cfg.lua", err) -- the config error names the file
    end)
  end)

  describe("proxy", function()
    it("forwards a real XMPP stream both ways and counts the bytes", function()
      local server = prosody.start()
      local p = proxy.start({ target_port = server.port })
      finally(function()
        p:stop()
        server:stop()
      end)
      local c = tcp_connect(p.port)
      local header = stream_header()
      c:send(header)
      local got = read_until(c, "</stream:features>")
      c:close()
      assert.matches("<starttls", got)
      local stats = p:stats()
      assert.equal(1, stats.accepted)
      assert.equal(#header, stats.c2s)
      assert.equal(#got, stats.s2c)
    end)

    it("forwards a megabyte each way without loss through bounded buffers", function()
      local target, tport = local_target()
      local p = proxy.start({ target_port = tport })
      finally(function()
        p:stop()
        target:close()
      end)
      local c, s = through(p, target)
      local size = 1024 * 1024
      local chunk = {}
      for i = 1, 1024 do chunk[i] = string.char(i % 251) end
      chunk = table.concat(chunk)
      local up, down = { sent = 0, got = {} }, { sent = 0, got = {} }
      c:settimeout(0)
      s:settimeout(0)
      local deadline = process.now() + 10
      local function step(from, to, st)
        if st.sent < size then
          local i = st.sent % #chunk + 1
          local last, _, plast = from:send(chunk, i)
          st.sent = st.sent + ((last or plast or i - 1) - i + 1)
        end
        local data, _, partial = to:receive(65536)
        st.got[#st.got + 1] = data or partial
      end
      repeat
        socket.select({ c, s }, { c, s }, 0.1)
        step(c, s, up)
        step(s, c, down)
        local done = #table.concat(up.got) >= size and #table.concat(down.got) >= size
      until done or process.now() > deadline
      local expect = chunk:rep(size // #chunk)
      assert.is_true(table.concat(up.got) == expect, "client to server bytes differ")
      assert.is_true(table.concat(down.got) == expect, "server to client bytes differ")
      local stats = p:stats()
      assert.equal(size, stats.c2s)
      assert.equal(size, stats.s2c)
    end)

    it("cut_after cuts at exactly the given byte count, each way, with RST or FIN", function()
      local target, tport = local_target()
      local p = proxy.start({ target_port = tport })
      finally(function()
        p:stop()
        target:close()
      end)
      local payload = ("0123456789"):rep(10000)
      for _, case in ipairs({
        { dir = "s2c", mode = "rst", n = 7 }, { dir = "s2c", mode = "fin", n = 7 },
        { dir = "c2s", mode = "rst", n = 13 }, { dir = "c2s", mode = "fin", n = 13 },
        { dir = "s2c", mode = "fin", n = 70001 }, { dir = "c2s", mode = "rst", n = 70001 },
      }) do
        local c, s = through(p, target)
        -- bytes before the rule do not count
        c:send("early")
        assert.equal("early", s:receive(5))
        p:cut_after(case.n, case.dir, case.mode)
        local from, to = c, s
        if case.dir == "s2c" then from, to = s, c end
        from:settimeout(0.5)
        from:send(payload)
        local got, ending = read_to_end(to)
        local label = case.dir .. " " .. case.mode .. " " .. case.n
        assert.equal(case.n, #got, label)
        assert.equal(payload:sub(1, case.n), got, label)
        assert.equal(case.mode, ending, label)
        c:close()
        s:close()
        p:resume()
      end
      assert.equal(6, p:stats().cuts)
    end)

    it("cut_after cuts a real server's stream mid-element", function()
      local server = prosody.start()
      local p = proxy.start({ target_port = server.port })
      finally(function()
        p:stop()
        server:stop()
      end)
      p:cut_after(50, "s2c")
      local c = tcp_connect(p.port)
      c:send(stream_header())
      local got = read_to_end(c)
      c:close()
      assert.equal(50, #got)
      assert.equal("<?xml version='1.0'?><stream:stream", got:sub(1, 35))
    end)

    it("silence stops forwarding without closing, and resume delivers what was held", function()
      local target, tport = local_target()
      local p = proxy.start({ target_port = tport })
      finally(function()
        p:stop()
        target:close()
      end)
      local c, s = through(p, target)
      p:silence()
      c:send("to server")
      s:send("to client")
      s:settimeout(0.25)
      c:settimeout(0.05) -- the first wait already gave the proxy its chance
      local a, aerr = s:receive(1)
      local b, berr = c:receive(1)
      assert.is_nil(a)
      assert.equal("timeout", aerr)
      assert.is_nil(b)
      assert.equal("timeout", berr)
      assert.equal(1, p:stats().active)
      p:resume()
      s:settimeout(5)
      c:settimeout(5)
      assert.equal("to server", s:receive(9))
      assert.equal("to client", c:receive(9))
      c:close()
      s:close()
    end)

    it("refuse refuses new connections for the given time, or until resume", function()
      local target, tport = local_target()
      local p = proxy.start({ target_port = tport })
      finally(function()
        p:stop()
        target:close()
      end)
      local function try()
        local c = socket.tcp()
        c:settimeout(1)
        local ok, err = c:connect("127.0.0.1", p.port)
        if ok then
          -- accepted by the kernel; the proxy decides what happens next
          local data, rerr = c:receive(1)
          ok, err = data, rerr
        end
        c:close()
        return ok, err
      end
      p:refuse(0.3)
      local t0 = process.now()
      local ok, err = try()
      assert.is_nil(ok)
      assert.equal("connection refused", err)
      assert.equal(0, p:stats().listening)
      assert.is_true(process.wait_until(function() return p:stats().listening == 1 end, 2))
      assert.is_true(process.now() - t0 >= 0.3)
      local c, s = through(p, target)
      c:send("x")
      assert.equal("x", s:receive(1))
      c:close()
      s:close()
      p:refuse(0, "rst")
      ok, err = try()
      assert.is_nil(ok)
      assert.equal("closed", err)
      assert.equal(1, p:stats().refused)
      p:resume()
      c, s = through(p, target)
      c:close()
      s:close()
    end)

    it("cut closes every current connection at once", function()
      local target, tport = local_target()
      local p = proxy.start({ target_port = tport })
      finally(function()
        p:stop()
        target:close()
      end)
      local c1, s1 = through(p, target)
      local c2, s2 = through(p, target)
      assert.equal(2, p:cut("fin"))
      assert.same({ "", "fin" }, { read_to_end(c1) })
      assert.same({ "", "fin" }, { read_to_end(c2) })
      assert.same({ "", "fin" }, { read_to_end(s1) })
      for _, sock in ipairs({ c1, c2, s1, s2 }) do sock:close() end
      assert.equal(0, p:stats().active)
      -- and new connections still work
      local c3, s3 = through(p, target)
      assert.equal(1, p:stats().active)
      assert.equal(1, p:cut())
      assert.same({ "", "rst" }, { read_to_end(c3) })
      c3:close()
      s3:close()
    end)

    it("runs a command later while the spec blocks", function()
      local target, tport = local_target()
      local p = proxy.start({ target_port = tport })
      finally(function()
        p:stop()
        target:close()
      end)
      local c, s = through(p, target)
      p:after(0.2, "cut rst")
      local t0 = process.now()
      local _, ending = read_to_end(c, 5) -- blocks until the proxy acts on its own
      local waited = process.now() - t0
      assert.equal("rst", ending)
      assert.is_true(waited >= 0.15 and waited < 2, "waited " .. waited)
      c:close()
      s:close()
    end)

    it("rejects malformed commands and keeps serving", function()
      local p = proxy.start({ target_port = process.free_port() })
      finally(function() p:stop() end)
      assert.has_error(function() p:command("bogus") end, "proxy: bogus: ERR unknown command bogus")
      assert.has_error(function() p:cut_after(10, "sideways") end)
      assert.has_error(function() p:cut("gently") end)
      assert.has_error(function() p:refuse(-1) end)
      assert.has_error(function() p:after(1, "after 1 cut") end)
      assert.equal(0, p:stats().accepted)
    end)

    it("ends when its control connection closes", function()
      local p = proxy.start({ target_port = process.free_port() })
      finally(function() p:stop() end)
      p.ctl:close()
      p.ctl = nil
      assert.is_true(p.process:wait(2))
    end)

    it("ends when the process that started it is gone", function()
      local parent = process.spawn({ "sleep", "30" })
      local main = debug.getinfo(proxy.start, "S").source:match("^@(.*)proxy%.lua$")
        .. "proxy_main.lua"
      local child = process.spawn({ "lua5.4", main, "127.0.0.1", tostring(process.free_port()),
        tostring(parent.pid) })
      finally(function()
        child:stop()
        parent:stop()
      end)
      assert.truthy(process.wait_until(function()
        return child:stdout_text():match("READY")
      end, 5))
      assert.is_false(child:wait(0.2))
      parent:stop()
      -- it looks five times a second
      assert.is_true(child:wait(1), child:stderr_text())
      assert.matches("parent %d+ is gone", child:stderr_text())
    end)
  end)

  describe("cleanup", function()
    it("has a watchdog that stops everything when the spec process is killed outright", function()
      -- a Lua process using the helpers, killed with SIGKILL: no finally, no finalizer runs
      local victim = process.spawn({ "lua5.4", "-e", [[
        package.path = "spec/?.lua;" .. package.path
        local process = require "helpers.process"
        local child = process.spawn({ "sleep", "60" })
        local dir = process.tmpdir("xmppsm-victim")
        print(child.pid, process.watchdog_pid(), dir)
        io.stdout:flush()
        require("system").sleep(60)
      ]] })
      finally(function() victim:stop() end)
      local child, watchdog, dir
      process.wait_until(function()
        child, watchdog, dir = victim:stdout_text():match("^(%d+)\t(%d+)\t(%S+)\n")
        return child or not victim:alive()
      end, 5)
      assert.truthy(child, victim:stderr_text())
      assert.is_true(process.pid_running(tonumber(child)))
      assert.is_true(process.pid_running(tonumber(watchdog)))
      assert.truthy(lfs.attributes(dir))
      victim:kill("KILL")
      -- it looks twice a second, then gives SIGTERM
      assert.truthy(process.wait_until(function()
        return not process.pid_running(tonumber(child))
      end, 3), "child survived")
      assert.truthy(process.wait_until(function()
        return not process.pid_running(tonumber(watchdog)) and not lfs.attributes(dir)
      end, 3), "watchdog or directory survived")
    end)

    it("stops every process of a spec that fails or errors", function()
      local dir = process.tmpdir("xmppsm-fixture")
      local pids_file = dir .. "/pids"
      local ok, out = process.run("env -u XMPPSM_SUMMARY XMPPSM_FIXTURE_PIDS="
        .. process.quote(pids_file) .. " lua5.4 /usr/bin/busted spec/helpers/harness_fixture.lua")
      assert.is_false(ok)
      assert.matches("0 passed, 2 failed", out)
      local pids = {}
      for pid in (process.read_file(pids_file) or ""):gmatch("%d+") do
        pids[#pids + 1] = tonumber(pid)
      end
      assert.equal(4, #pids, out)
      for _, pid in ipairs(pids) do
        assert.is_false(process.pid_running(pid), "pid " .. pid .. " still running")
      end
    end)
  end)
end)
