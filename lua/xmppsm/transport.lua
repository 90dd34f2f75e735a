--- A non-blocking TCP or TLS byte stream driven by the loop. It knows nothing of XMPP.
-- Received bytes go to `on_data(bytes)`; the end of the connection (by either side, or an
-- error) goes to `on_close(reason)` exactly once.
-- @module xmppsm.transport
local socket = require "socket"
local ssl = require "ssl"
local core = require "xmppsm.core"
local loop = require "xmppsm.loop"
local concat = table.concat

local transport = {}

local Transport = {}
Transport.__index = Transport

local READ_SIZE = 65536
-- Bytes queued within one loop step past which they are written at once rather than at the
-- end of the step.
local FLUSH_AT = 65536
local TLS_OPTIONS = { "no_sslv2", "no_sslv3", "no_tlsv1", "no_tlsv1_1", "no_compression" }

-- Errors that only mean "not now" on a non-blocking socket.
local function transient(err)
  return err == "timeout" or err == "wantread" or err == "wantwrite"
end

--- Creates a transport. `opts.on_data(bytes)` and `opts.on_close(reason)` are required;
-- `opts.on_drain()` (optional) is called when everything queued was written.
function transport.new(opts)
  local t = setmetatable({
    on_data = assert(opts.on_data, "on_data required"),
    on_close = assert(opts.on_close, "on_close required"),
    on_drain = opts.on_drain,
    out = {},          -- strings waiting to be written, in order
    out_pos = 1,       -- bytes of out[1] already written, plus one
    out_bytes = 0,     -- bytes queued since the last write attempt
    closed = false,
    want_write = false,
    flush_pending = false,
    broken = false,    -- or why a read or write failed (false, not nil: read per stanza sent)
  }, Transport)
  -- Writes what a loop step queued, once the step is done (see Transport:send).
  t.flush_deferred = function()
    t.flush_pending = false
    if not t.closed and not t.want_write then t:_flush() end
  end
  return t
end

-- Resolves `host` to addresses, IPv6 and IPv4 in the resolver's order.
local function addresses_of(host)
  local infos, err = socket.dns.getaddrinfo(host)
  if not infos then return nil, "cannot resolve " .. host .. ": " .. tostring(err) end
  local list, seen = {}, {}
  for _, info in ipairs(infos) do
    local key = info.family .. info.addr
    if not seen[key] and (info.family == "inet" or info.family == "inet6") then
      seen[key] = true
      list[#list + 1] = info
    end
  end
  if #list == 0 then return nil, "no address for " .. host end
  return list
end

--- Connects to `host`:`port`, trying each address within `timeout` seconds in all.
-- Calls `cb(true)` when connected or `cb(nil, err)`.
function Transport:connect(host, port, timeout, cb)
  local addrs, err = addresses_of(host)
  if not addrs then return cb(nil, err) end
  local deadline = core.monotime() + timeout
  local i = 0
  local last_err
  local function try_next()
    i = i + 1
    local a = addrs[i]
    if not a or core.monotime() >= deadline then
      return cb(nil, string.format("cannot connect to %s port %d: %s", host, port,
                                   last_err or "timed out"))
    end
    local sock = a.family == "inet6" and socket.tcp6() or socket.tcp4()
    sock:settimeout(0)
    sock:setoption("tcp-nodelay", true)
    local ok, cerr = sock:connect(a.addr, port)
    if ok or cerr == "already connected" then
      self.sock = sock
      return self:_connected(cb)
    end
    if cerr ~= "timeout" and cerr ~= "Operation already in progress" then
      last_err = cerr
      sock:close()
      return try_next()
    end
    -- In progress: wait until writable, or the deadline.
    local w = { sock = sock, want_write = true, want_read = false }
    local timer
    local function finish(success, why)
      loop.unwatch(w)
      timer:cancel()
      if success then
        self.sock = sock
        return self:_connected(cb)
      end
      last_err = why
      sock:close()
      return try_next()
    end
    function w.on_writable()
      local ok2, err2 = sock:connect(a.addr, port)
      if ok2 or err2 == "already connected" then return finish(true) end
      return finish(false, err2)
    end
    w.on_readable = w.on_writable
    timer = loop.after(math.max(0, deadline - core.monotime()), function()
      finish(false, "timed out")
    end)
    loop.watch(w)
  end
  try_next()
end

function Transport:_connected(cb)
  self.want_read = true
  loop.watch(self)
  cb(true)
end

--- Starts TLS on the connected socket. `opts`: `servername` (SNI), `verify_name` (the name the
-- certificate must be valid for: the JID's domain), `cafile`, `capath`, `alpn`, `timeout`,
-- `verify` (false only for tests that want to see what happens without it).
-- Calls `cb(true)` when the handshake succeeded and the certificate was checked, else
-- `cb(nil, err)`.
function Transport:start_tls(opts, cb)
  local params = {
    mode = "client",
    protocol = "any",
    options = TLS_OPTIONS,
    verify = opts.verify == false and { "none" } or { "peer" },
    cafile = opts.cafile,
    capath = opts.capath,
    alpn = opts.alpn,
  }
  if not params.cafile and not params.capath then params.capath = "/etc/ssl/certs" end
  loop.unwatch(self)
  local conn, err = ssl.wrap(self.sock, params)
  if not conn then return cb(nil, "TLS setup failed: " .. tostring(err)) end
  conn:settimeout(0)
  if opts.servername then conn:sni(opts.servername) end
  self.sock = conn
  self.tls = true

  local w = { sock = conn, want_write = false, want_read = true }
  local timer
  local done = false
  local function finish(ok, why)
    if done then return end
    done = true
    loop.unwatch(w)
    timer:cancel()
    if not ok then return cb(nil, why) end
    if opts.verify ~= false then
      local verified, errors = conn:getpeerverification()
      if not verified then
        local reasons = {}
        for _, list in pairs(errors or {}) do
          for _, e in ipairs(list) do reasons[#reasons + 1] = tostring(e) end
        end
        return cb(nil, "certificate not trusted: " .. table.concat(reasons, "; "))
      end
      local cert = conn:getpeercertificate()
      local valid, why2 = core.check_host(cert and cert:pem() or "", opts.verify_name)
      if not valid then
        return cb(nil, "certificate is not valid for " .. tostring(opts.verify_name) ..
                       (why2 and (": " .. why2) or ""))
      end
    end
    self:_connected(cb)
  end
  local function step()
    local ok, herr = conn:dohandshake()
    if ok then return finish(true) end
    if herr == "wantread" then w.want_read, w.want_write = true, false
    elseif herr == "wantwrite" then w.want_read, w.want_write = false, true
    elseif tostring(herr):find("certificate verify failed", 1, true) then
      return finish(false, "certificate not trusted (" .. tostring(herr) .. ")")
    else return finish(false, "TLS handshake failed: " .. tostring(herr)) end
  end
  w.on_readable, w.on_writable = step, step
  timer = loop.after(opts.timeout or 30, function() finish(false, "TLS handshake timed out") end)
  loop.watch(w)
  step()
end

--- TLS facts once the handshake is done: protocol version, cipher, ALPN.
function Transport:tls_info()
  if not self.tls then return nil end
  local info = self.sock:info() or {}
  return { protocol = info.protocol, cipher = info.cipher, alpn = self.sock:getalpn() }
end

--- tls-exporter channel binding data (RFC 9266), or nil when not available: it is defined for
-- TLS 1.3 (and TLS 1.2 with extended master secret, which is not detectable here).
function Transport:channel_binding()
  local info = self:tls_info()
  if not info or info.protocol ~= "TLSv1.3" then return nil end
  return self.sock:exportkeyingmaterial("EXPORTER-Channel-Binding", 32)
end

--- Queues bytes for writing. Outside a loop step they are written at once (what the socket
-- takes); inside one (a handler, a timer) at the end of the step, so everything the step sent
-- leaves in one write, one TLS record and one TCP segment where it fits, instead of one per
-- stanza. Past 64 KiB queued they are written at once anyway. Nagle's algorithm is off
-- (`tcp-nodelay`): a write is never held back waiting for an acknowledgement.
function Transport:send(data)
  if self.closed then return nil, "closed" end
  if self.broken then return nil, self.broken end
  local out = self.out
  out[#out + 1] = data
  if self.want_write then return true end
  local bytes = self.out_bytes + #data
  self.out_bytes = bytes
  if self.flush_pending and bytes < FLUSH_AT then return true end
  if bytes < FLUSH_AT and loop.defer(self.flush_deferred) then
    self.flush_pending = true
    return true
  end
  self:_flush()
  return true
end

function Transport:_flush()
  if self.broken then return end
  local out = self.out
  self.out_bytes = 0
  while out[1] do
    if #out > 1 then
      -- Many small stanzas: one write instead of one per stanza (copied once: the first one is
      -- cut only when a partial write left its start behind).
      if self.out_pos > 1 then out[1] = out[1]:sub(self.out_pos) end
      out[1] = concat(out)
      for i = #out, 2, -1 do out[i] = nil end
      self.out_pos = 1
    end
    local data = out[1]
    local last, err, partial = self.sock:send(data, self.out_pos)
    local sent = last or partial
    if sent and sent >= #data then
      table.remove(out, 1)
      self.out_pos = 1
    else
      if sent and sent >= self.out_pos then self.out_pos = sent + 1 end
      if transient(err) then
        if not self.want_write then
          self.want_write = true
          loop.update(self)
        end
        return
      end
      self.broken = err or "write failed"
      return self:close(self.broken)
    end
  end
  if self.want_write then
    self.want_write = false
    loop.update(self)
  end
  if self.on_drain then self.on_drain() end
end

function Transport:on_writable()
  self:_flush()
end

function Transport:on_readable()
  local sock = self.sock
  -- Acknowledge what arrives at once: a server that holds its small writes back with Nagle's
  -- algorithm would otherwise wait for our delayed ACK (about 40 ms) whenever we have nothing
  -- to send, in every log-in and resumption (measured in bench/client_run.lua).
  local fd = sock:getfd()
  if fd >= 0 then core.tcp_quickack(fd) end
  while not self.closed do
    local data, err, partial = sock:receive(READ_SIZE)
    if not data and not transient(err) then
      -- After a failed TLS read, LuaSec can spin forever inside a write (SSL_write failing
      -- with errno 0 reads as "sent nothing, no error"): the handlers of the last bytes must
      -- not write any more.
      self.broken = err
    end
    local got = data or partial
    if got and #got > 0 then self.on_data(got) end
    if self.closed then return end
    if not data then
      if not self.broken then return end
      return self:close(err == "closed" and "connection closed by peer" or tostring(err))
    end
  end
end

-- One last write attempt of what is queued, ignoring the outcome: bytes deferred to the end of
-- the step would have been written before a close made in the same step.
local function write_once(self)
  local out = self.out
  if not out[1] or self.want_write or not self.sock then return end
  local data = out[1]:sub(self.out_pos) .. table.concat(out, "", 2)
  pcall(self.sock.send, self.sock, data)
end

--- Closes the connection (idempotent) and reports `reason` through `on_close`.
function Transport:close(reason)
  if self.closed then return end
  self.closed = true
  -- Never after a failed read: LuaSec can spin forever inside the write (see on_readable).
  if self.flush_pending and not self.broken then write_once(self) end
  loop.unwatch(self)
  if self.sock then self.sock:close() end
  self.on_close(reason or "closed")
end

--- Closes after writing what is queued, giving up after `timeout` seconds.
function Transport:close_after_flush(timeout, reason)
  if self.closed then return end
  if self.flush_pending and not self.broken then
    self.flush_pending = false
    self:_flush()
    if self.closed then return end
  end
  if not self.want_write or self.broken then return self:close(reason) end
  self.on_drain = function() self:close(reason) end
  loop.after(timeout, function() self:close(reason) end)
end

return transport
