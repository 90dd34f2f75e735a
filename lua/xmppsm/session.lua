--- Session negotiation, written as straight-line code in a coroutine: connect, secure the
-- stream, authenticate, then resume a Stream Management session or bind a resource.
-- Every wait has the connect timeout as its deadline; any failure raises an `xmppsm.error`.
-- @module xmppsm.session
local core = require "xmppsm.core"
local loop = require "xmppsm.loop"
local ns = require "xmppsm.ns"
local stanza = require "xmppsm.stanza"
local sasl = require "xmppsm.sasl"
local xmperror = require "xmppsm.error"
local resolver = require "xmppsm.resolver"

local session = {}

local Negotiation = {}
Negotiation.__index = Negotiation

local function fail(type_, condition, text, extra)
  error(xmperror.new(type_, condition, text, extra), 0)
end

--- Creates the negotiation state for one connection attempt of `client` (see xmppsm.client).
function session.new(client, conn)
  return setmetatable({ client = client, conn = conn, inbox = {}, waiter = nil,
                        deadline = nil }, Negotiation)
end

-- Called by the client for each element that arrives while negotiating.
function Negotiation:deliver(el)
  self.inbox[#self.inbox + 1] = el
  if self.waiter then self.waiter() end
end

-- Called by the client when the connection ends while negotiating.
function Negotiation:abort(err)
  self.ended = err or xmperror.new("connection", "connection-lost", "the server closed the stream")
  if self.waiter then self.waiter() end
end

-- Waits for `arm(resume)` to call back, up to the negotiation deadline.
function Negotiation:_wait(arm, what)
  if self.ended then error(self.ended, 0) end
  local timed_out = false
  local results = table.pack(loop.wait(function(resume)
    self.waiter = resume
    self.timer = loop.after(math.max(0, self.deadline - core.monotime()), function()
      timed_out = true
      resume()
    end)
    arm(resume)
  end))
  self.waiter = nil
  self.timer:cancel()
  if self.ended then error(self.ended, 0) end
  if timed_out then fail("connection", "connection-timeout", "timed out waiting for " .. what) end
  return table.unpack(results, 1, results.n)
end

--- Waits for the next top-level element from the server.
function Negotiation:next(what)
  while #self.inbox == 0 do
    self:_wait(function() end, what)
  end
  return table.remove(self.inbox, 1)
end

function Negotiation:send(el, shown)
  local ok, err = self.conn:send(el, shown)
  if not ok then fail("connection", "internal-server-error", "cannot send: " .. tostring(err)) end
end

-- Opens a new stream and waits for the server's header and features.
function Negotiation:open_stream()
  local conn, client = self.conn, self.client
  local header_seen = false
  conn.on_header = function() header_seen = true if self.waiter then self.waiter() end end
  local from = conn.secure and client.bare_jid or nil
  local extra = conn:open_stream(client.domain, from)
  if #extra > 0 then conn:feed(extra) end
  while not header_seen do self:_wait(function() end, "the stream header") end
  local header = conn.header
  if header.version ~= "1.0" then
    fail("stream", "unsupported-version", "server stream version " .. tostring(header.version))
  end
  local features = self:next("stream features")
  if features.name ~= "features" or features.attr.xmlns ~= ns.stream then
    fail("stream", "bad-format", "expected <stream:features/>, got <" .. features.name .. "/>")
  end
  return features
end

local function connect_any(self)
  local client = self.client
  local targets = resolver.targets(client.domain, client.opts)
  -- XEP-0198: resume at the server's preferred location first (the certificate is still
  -- checked against the JID's domain).
  local location = client.sm and client.sm.session and client.sm.session.location
  local preferred = location and resolver.parse_location(location, targets[1])
  if preferred then table.insert(targets, 1, preferred) end
  local last_err
  for _, target in ipairs(targets) do
    local tls_opts = target.direct_tls and client:_tls_options("xmpp-client") or nil
    local ok, err = self:_wait(function(resume)
      self.conn:connect(target.host, target.port, math.max(0.1, self.deadline - core.monotime()),
                        tls_opts, resume)
    end, "the connection")
    if ok then return end
    last_err = err
    -- A certificate problem is not a reason to try elsewhere quietly: report it.
    if err.type == "tls" then error(err, 0) end
  end
  error(last_err, 0)
end

local function starttls(self, features)
  local client = self.client
  if self.conn.secure then return features end
  if client.opts.tls == "none" then return features end
  if not features:get_child("starttls", ns.tls) then
    fail("tls", "policy-violation", "the server does not offer STARTTLS and TLS is required")
  end
  self:send(stanza.stanza("starttls", { xmlns = ns.tls }))
  local reply = self:next("the STARTTLS reply")
  if reply.name ~= "proceed" or reply.attr.xmlns ~= ns.tls then
    fail("tls", "tls-failed", "the server refused STARTTLS")
  end
  -- Anything after <proceed/> in the clear would be taken as coming from inside TLS
  -- (the STARTTLS command injection attack): refuse it.
  if #self.conn:take_leftover() > 0 then
    fail("tls", "policy-violation", "the server sent data right after <proceed/>, before TLS")
  end
  local ok, err = self:_wait(function(resume)
    self.conn:start_tls(client:_tls_options(nil), resume)
  end, "the TLS handshake")
  if not ok then error(err, 0) end
  return self:open_stream()
end

local function bind(self, features)
  local client = self.client
  if not features:get_child("bind", ns.bind) then
    fail("stream", "unsupported-feature", "the server does not offer resource binding")
  end
  local iq = stanza.iq({ type = "set", id = client:_new_id() })
    :tag("bind", { xmlns = ns.bind })
  if client.opts.resource then iq:tag("resource"):text(client.opts.resource):up() end
  self:send(iq)
  local reply = self:next("the bind reply")
  if reply.name ~= "iq" or reply.attr.id ~= iq.attr.id then
    fail("stream", "bad-format", "expected the bind reply, got <" .. reply.name .. "/>")
  end
  if reply.attr.type ~= "result" then
    local _, condition, text = reply:get_error()
    fail("bind", condition or "undefined-condition", text or "resource binding failed")
  end
  local bound = reply:get_child("bind", ns.bind)
  local jid = bound and bound:get_child_text("jid")
  if not jid then fail("bind", "bad-format", "the bind reply has no JID") end
  -- RFC 3921 sessions: only when the server says they are not optional.
  local sess = features:get_child("session", ns.session)
  if sess and not sess:get_child("optional") then
    local s_iq = stanza.iq({ type = "set", id = client:_new_id() }):tag("session", { xmlns = ns.session })
    self:send(s_iq)
    local s_reply = self:next("the session reply")
    if s_reply.attr.type ~= "result" then
      fail("bind", "undefined-condition", "session establishment failed")
    end
  end
  return jid
end

--- Runs the whole negotiation. Returns `features` of the final stream and the bound JID (or
-- the result of the `resume` hook when Stream Management resumed the old session).
function Negotiation:run()
  local client = self.client
  self.deadline = core.monotime() + client.opts.connect_timeout
  connect_any(self)
  local features = self:open_stream()
  features = starttls(self, features)

  client:_set_status("authenticating")
  sasl.authenticate(self, features)
  features = self:open_stream()

  local sm = client.sm
  if sm then
    local resumed = sm:try_resume(self, features)
    if resumed then return features, nil, resumed end
  end
  client:_set_status("binding")
  local jid = bind(self, features)
  if sm then sm:enable(self, features, jid) end
  return features, jid
end

return session
