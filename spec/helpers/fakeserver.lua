-- A scripted XMPP server for what a real server will not do (forged replies, bad SCRAM
-- signatures, stream errors at chosen moments, odd Stream Management answers). It runs in the
-- test's own process on xmppsm's loop, listening on 127.0.0.1 on a free port; each accepted
-- connection runs the test's script in a coroutine with a `peer` object.
local socket = require "socket"
local core = require "xmppsm.core"
local loop = require "xmppsm.loop"
local stanza = require "xmppsm.stanza"

local fakeserver = {}

local STREAM_HEADER = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' " ..
  "xmlns:stream='http://etherx.jabber.org/streams' id='%s' from='%s' version='1.0'>"

local Peer = {}
Peer.__index = Peer

function Peer:send(data)
  if self.closed then return end
  self.sock:settimeout(1)
  self.sock:send(data)
  self.sock:settimeout(0)
end

-- Waits (in the script's coroutine) until `ready()` is true or `timeout` passes.
function Peer:_wait_until(ready, timeout, what)
  local deadline = core.monotime() + (timeout or 5)
  while not ready() do
    if self.closed then error("client closed the connection while waiting for " .. what, 0) end
    if core.monotime() > deadline then error("timed out waiting for " .. what, 0) end
    loop.wait(function(resume)
      self.wake = resume
      loop.after(0.05, resume)
    end)
    self.wake = nil
  end
end

--- Waits for the client's stream header; returns its attributes.
function Peer:read_header(timeout)
  self:_wait_until(function() return self.header ~= nil end, timeout, "the stream header")
  local h = self.header
  self.header = nil
  return h
end

--- Waits for the next top-level element from the client.
function Peer:read(timeout)
  self:_wait_until(function() return #self.inbox > 0 end, timeout, "an element")
  return table.remove(self.inbox, 1)
end

--- Sends a stream header, as a server does after each client header.
function Peer:open_stream(domain)
  self:send(string.format(STREAM_HEADER, "fake" .. math.random(1e9), domain or "example.test"))
end

--- Starts a new stream on both sides (after SASL success).
function Peer:restart()
  local leftover = self.parser:reset()
  if #leftover > 0 then self:_feed(leftover) end
end

--- Waits until the client ends the connection (or `timeout`); returns true when it did.
function Peer:wait_closed(timeout)
  return pcall(self._wait_until, self, function() return self.closed end, timeout, "the close")
end

function Peer:close()
  if self.closed then return end
  self.closed = true
  loop.unwatch(self)
  self.sock:close()
end

function Peer:_feed(data)
  local events, n = self.parser:feed(data)
  for i = 1, n do
    local kind, value = events[3 * i - 2], events[3 * i - 1]
    if kind == "header" then self.header = value
    elseif kind == "stanza" then self.inbox[#self.inbox + 1] = value
    elseif kind == "close" then self.client_closed = true
    elseif kind == "error" then self.parse_error = value end
  end
end

function Peer:on_readable()
  while true do
    local data, err, partial = self.sock:receive(65536)
    local got = data or partial
    if got and #got > 0 then
      self.raw_received = self.raw_received .. got
      self:_feed(got)
    end
    if not data then
      if err ~= "timeout" then self:close() end
      break
    end
  end
  if self.wake then self.wake() end
end

function Peer.on_writable() end

--- Starts a server; `script(peer, server)` runs for each connection. Returns the server with
-- `port`, `connections` (a count), `errors` (script errors) and `:stop()`.
function fakeserver.start(script)
  local listener = assert(socket.bind("127.0.0.1", 0))
  listener:settimeout(0)
  local _, port = listener:getsockname()
  local server = { port = tonumber(port), connections = 0, errors = {}, peers = {} }
  local watcher = { sock = listener }
  function watcher.on_readable()
    local sock = listener:accept()
    if not sock then return end
    sock:settimeout(0)
    server.connections = server.connections + 1
    local peer = setmetatable({
      sock = sock, inbox = {}, raw_received = "",
      parser = core.parser{ stanza_mt = stanza.metatable },
    }, Peer)
    server.peers[#server.peers + 1] = peer
    loop.watch(peer)
    loop.spawn(function()
      local ok, err = pcall(script, peer, server)
      if not ok then server.errors[#server.errors + 1] = tostring(err) end
    end)
  end
  function watcher.on_writable() end
  loop.watch(watcher)
  function server.stop()
    loop.unwatch(watcher)
    listener:close()
    for _, p in ipairs(server.peers) do p:close() end
  end
  return server
end

--- The usual start of a script: stream header, SASL PLAIN accepted (without TLS), restart,
-- features with bind (plus `opts.features`), then resource binding unless `opts.skip_bind`.
-- Returns the bound full JID.
function fakeserver.login(peer, opts)
  opts = opts or {}
  local domain = opts.domain or "example.test"
  peer:read_header()
  peer:open_stream(domain)
  peer:send("<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>" ..
            "<mechanism>PLAIN</mechanism></mechanisms></stream:features>")
  local auth = peer:read()
  assert(auth.name == "auth", "expected <auth/>")
  peer:send("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
  peer:restart()
  peer:read_header()
  peer:open_stream(domain)
  peer:send("<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>" ..
            (opts.features or "") .. "</stream:features>")
  if opts.skip_bind then return nil end
  return fakeserver.bind(peer, nil, opts)
end

--- Answers the client's bind request (`iq`, or the next element read). Returns the full JID.
function fakeserver.bind(peer, iq, opts)
  opts = opts or {}
  iq = iq or peer:read()
  assert(iq.name == "iq", "expected the bind iq, got <" .. iq.name .. "/>")
  local full = (opts.user or "user") .. "@" .. (opts.domain or "example.test") .. "/" ..
               (opts.resource or "fake")
  peer:send(string.format("<iq type='result' id='%s'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>" ..
                          "<jid>%s</jid></bind></iq>", iq.attr.id, full))
  return full
end

return fakeserver
