--- The XMPP client: options, events, sending, IQ, and reconnection.
--
-- Events (`client:addEventHandler(name, fn)`, short form `client:on(name, fn)`):
--
-- * `online(jid)`: a new session is established (not fired when a session is resumed).
-- * `offline(err)`: the client stopped for good: `close()`, or a failure that reconnecting
--   cannot fix (wrong password, `conflict`, a bad certificate); `err` is nil after `close()`.
-- * `status(new, old)`: every status change (see `client:status()`).
-- * `disconnected(err)`: the connection ended; `err` is nil for a clean close.
-- * `reconnecting(info)`: a reconnection is scheduled: `{attempt = n, delay = seconds}`.
-- * `stanza(st)`: every incoming message, presence and iq, before the three below; a handler
--   returning a non-nil value consumes it.
-- * `message(st)`, `presence(st)`, `iq(st)`: incoming stanzas by kind; an iq get/set that no
--   handler consumes (returns non-nil) is answered with `service-unavailable`.
-- * `error(err)`: an `xmppsm.error`: stream errors from the server, failed connection attempts,
--   and handlers that raised.
-- * `rawIn(bytes)`, `rawOut(bytes)`: the XML traffic, with SASL payloads hidden.
-- @module xmppsm.client
local connection = require "xmppsm.connection"
local core = require "xmppsm.core"
local element_ns = core.element_ns
local events = require "xmppsm.events"
local iq = require "xmppsm.iq"
local jid = require "xmppsm.jid"
local loop = require "xmppsm.loop"
local ns = require "xmppsm.ns"
local options = require "xmppsm.options"
local session = require "xmppsm.session"
local sm = require "xmppsm.sm"
local store = require "xmppsm.store"
local stanza = require "xmppsm.stanza"
local is_stanza = stanza.is_stanza
local xmperror = require "xmppsm.error"

local client = {}

local Client = {}
Client.__index = Client

local LEVELS = { debug = 1, info = 2, warn = 3, error = 4 }

-- Failures that reconnecting would only repeat: wrong credentials, someone else's session
-- taking over ours (reconnecting would take it back, forever), a server we must not trust.
local FINAL = {
  ["not-authorized"] = true, ["conflict"] = true, ["host-unknown"] = true,
  ["invalid-namespace"] = true, ["unsupported-version"] = true, ["improper-addressing"] = true,
  ["invalid-from"] = true, ["account-disabled"] = true, ["credentials-expired"] = true,
  ["server-signature-invalid"] = true, ["invalid-mechanism"] = true,
}

local function is_final(err)
  return err ~= nil and (err.type == "auth" or err.type == "tls" or FINAL[err.condition] == true)
end

--- Creates a client. See `xmppsm.options` (and README) for every option and its default;
-- an unknown option or a wrong type raises here.
function client.new(opts)
  local o = options.check(opts)
  local node, domain, resource = jid.split(o.jid)
  if not node or not domain then error("option jid must be an account JID like user@example.org", 2) end
  if resource and not o.resource then o.resource = resource end
  local self = setmetatable({
    opts = o,
    node = node,
    domain = domain,
    bare_jid = node .. "@" .. domain,
    full_jid = nil,
    state = "disconnected",
    outbox = {},           -- stanzas sent while offline, without Stream Management
    attempt = 0,           -- failed connection attempts since the last session
    stats = { connects = 0, reconnects = 0 },
    neg = false,           -- the session being negotiated (read for every stanza received)
  }, Client)
  self.events = events.new(function(name, err) self:_handler_error(name, err) end)
  self.raw_out = function(bytes) self:_raw("rawOut", bytes) end
  self.iq = iq.new(self)
  self.iq:add_handler(ns.ping, function(ping) return stanza.reply(ping) end)
  if o.sm ~= false then
    local sm_opts = o.sm or {}
    local st = sm_opts.store
    local rest = {}
    for k, v in pairs(sm_opts) do if k ~= "store" then rest[k] = v end end
    sm.check_options(rest)   -- before the store is opened: a typo must not leave files behind
    local the_store
    if st == nil or type(st) == "string" then
      local path = st or store.default_path(self.bare_jid)
      local s, err = store.file(path, { durability = rest.durability or sm.defaults.durability })
      if not s then error(err, 2) end
      the_store = s
    elseif type(st) == "table" then
      the_store = st.load and st.save and store.custom(st) or st
    end
    self.sm = sm.new(self, rest, the_store or nil)
  end
  return self
end

-- Logging --------------------------------------------------------------------------------------

function Client:_log(level, message)
  if self.opts.logger then
    local ok = pcall(self.opts.logger, level, message)
    if ok then return end
  end
  if LEVELS[level] >= LEVELS[self.opts.log_level] then
    io.stderr:write(string.format("xmppsm %s [%s] %s\n", self.bare_jid, level, message))
  end
end

function Client:_handler_error(where, err)
  local e = xmperror.new("handler", "handler-error", "a handler for " .. tostring(where) ..
                         " raised: " .. tostring(err))
  self:_log("error", e.text)
  if where ~= "error" then self.events:fire("error", e) end
end

-- Events -----------------------------------------------------------------------------------------

--- Adds `fn` as a handler of event `name` (higher `priority` runs first).
function Client:addEventHandler(name, fn, priority)
  self.events:add(name, fn, priority)
  if name == "rawOut" then self:_sync_raw_out() end
  return self
end

--- Removes a handler added with `addEventHandler`.
function Client:removeEventHandler(name, fn)
  local removed = self.events:remove(name, fn)
  if name == "rawOut" then self:_sync_raw_out() end
  return removed
end

-- The connection's raw_out hook runs for every stanza sent: it is there only while a rawOut
-- handler is, so traffic nobody logs costs no call.
function Client:_raw_out_hook()
  return self.events.handlers.rawOut and self.raw_out or nil
end

function Client:_sync_raw_out()
  if self.conn then self.conn.hooks.raw_out = self:_raw_out_hook() end
end

--- Short for `Client:addEventHandler`.
-- @function Client:on
Client.on = Client.addEventHandler
--- Short for `Client:removeEventHandler`.
-- @function Client:off
Client.off = Client.removeEventHandler

--- Registers `fn(iq)` for incoming get/set IQs whose payload is in namespace `xmlns`; `fn`
-- returns the reply stanza, or true when it replies itself.
function Client:addIqHandler(xmlns, fn)
  self.iq:add_handler(xmlns, fn)
  return self
end

--- Removes the handler registered with `addIqHandler` for namespace `xmlns`.
function Client:removeIqHandler(xmlns)
  self.iq:remove_handler(xmlns)
end

-- Status -----------------------------------------------------------------------------------------

--- The client's status: "disconnected", "connecting", "authenticating", "binding", "online",
-- "reconnecting", "closing" or "closed".
function Client:status()
  return self.state
end

function Client:_set_status(new)
  local old = self.state
  if new == old then return end
  self.state = new
  self:_log("debug", "status " .. old .. " -> " .. new)
  self.events:fire("status", new, old)
end

function Client:_new_id() -- luacheck: no unused args
  return stanza.new_id()
end

-- TLS parameters for this account: the certificate must be valid for the JID's domain, never
-- for an SRV target or a redirect host.
function Client:_tls_options(alpn)
  return { servername = self.domain, verify_name = self.domain, cafile = self.opts.cafile,
           capath = self.opts.capath, alpn = alpn, timeout = self.opts.connect_timeout }
end

-- Connecting -------------------------------------------------------------------------------------

--- Starts connecting (returns at once; the loop does the work). Events tell what happens.
function Client:connect()
  if self.state ~= "disconnected" and self.state ~= "closed" then return self end
  if not self.retained then
    self.retained = true
    loop.retain()
  end
  self.closing = false
  if self.sm and self.sm.store_warning then
    self.events:fire("error", self.sm.store_warning)
    self.sm.store_warning = nil
  end
  self:_attempt()
  return self
end

function Client:_attempt()
  self.reconnect_timer = nil
  self.stats.connects = self.stats.connects + 1
  local conn
  conn = connection.new(self.opts, {
    -- Runs for every element received, so it routes the element itself (no method call).
    on_element = function(el, raw)
      if conn ~= self.conn then return end
      if raw and self.events.handlers.rawIn then self:_raw("rawIn", raw) end
      if self.neg then return self.neg:deliver(el) end
      return self:_incoming(el)
    end,
    on_end = function(err) self:_on_end(conn, err) end,
    -- bytes is false for a stanza parsed before the first rawIn listener came (see wants_raw)
    raw_in = function(bytes) if bytes and self.events.handlers.rawIn then self:_raw("rawIn", bytes) end end,
    raw_out = self:_raw_out_hook(),
    wants_raw = function() return self.events.handlers.rawIn ~= nil end,
  })
  local neg = session.new(self, conn)
  self.conn, self.neg = conn, neg
  self:_set_status("connecting")
  loop.spawn(function()
    local ok, features, bound, resumed = pcall(neg.run, neg)
    if self.conn ~= conn then return end   -- superseded (close() or a newer attempt)
    self.neg = false
    if not ok then
      local err = xmperror.is(features) and features
        or xmperror.new("connection", "internal-server-error", tostring(features))
      self.redact_in = false
      self.conn = nil   -- so the end of this connection is not taken for a lost session
      conn:abort(err.text)
      return self:_attempt_failed(err)
    end
    self:_session_ready(features, bound, resumed)
  end)
end

-- Fires rawIn/rawOut. Its callers test for a listener first, so traffic nobody logs costs no call.
function Client:_raw(event, bytes)
  if event == "rawIn" and self.redact_in then bytes = "<!-- SASL payload hidden -->" end
  self.events:fire(event, bytes)
end

function Client:_on_end(conn, err)
  if conn ~= self.conn then return end
  if self.neg then return self.neg:abort(err) end
  self:_connection_lost(err)
end

function Client:_session_ready(_, bound, resumed)
  self.attempt = 0
  if resumed then
    self:_set_status("online")
    self.sm:online()
    return
  end
  self.full_jid = bound
  self:_set_status("online")
  if self.sm then self.sm:online() end
  if self.opts.presence then
    local pres = stanza.presence()
    if self.opts.priority ~= 0 then pres:tag("priority"):text(tostring(self.opts.priority)):up() end
    self:send(pres)
  end
  local waiting = self.outbox
  self.outbox = {}
  for _, st in ipairs(waiting) do self:send(st) end
  self.events:fire("online", bound)
end

function Client:_attempt_failed(err)
  self:_log("warn", "connection attempt failed: " .. tostring(err))
  if self.sm then self.sm:disconnected() end
  self.events:fire("error", err)
  self.conn = nil
  self:_set_status("disconnected")
  self.events:fire("disconnected", err)
  self:_after_disconnect(err)
end

function Client:_connection_lost(err)
  self.conn = nil
  if self.sm then self.sm:disconnected() end
  if err then self:_log("warn", "connection lost: " .. tostring(err)) end
  if err and err.type == "stream" then self.events:fire("error", err) end
  self:_set_status("disconnected")
  self.events:fire("disconnected", err)
  if not (self.sm and self.sm:keeps_requests()) then
    self.iq:fail_all(xmperror.new("iq", "connection-lost", "the connection was lost before the reply"))
  end
  self:_after_disconnect(err, true)
end

-- Decides between reconnecting and stopping.
function Client:_after_disconnect(err, was_online)
  if self.closing then return self:_stop(nil) end   -- the user asked: not a failure
  if not self.opts.reconnect or is_final(err) then return self:_stop(err) end
  -- The first retry after losing a working session goes at once: resumption is fastest then.
  local delay = 0
  if not was_online then
    self.attempt = self.attempt + 1
    local base = math.min(self.opts.reconnect_max_delay,
                          self.opts.reconnect_delay * 2 ^ (self.attempt - 1))
    delay = base * (0.5 + math.random() * 0.5)   -- jitter: spread clients that dropped together
  end
  self.stats.reconnects = self.stats.reconnects + 1
  self:_set_status("reconnecting")
  self.events:fire("reconnecting", { attempt = self.attempt, delay = delay })
  self.reconnect_timer = loop.after(delay, function()
    if self.state == "reconnecting" then self:_attempt() end
  end)
end

function Client:_stop(err)
  if self.reconnect_timer then self.reconnect_timer:cancel() self.reconnect_timer = nil end
  self.iq:fail_all(xmperror.new("iq", "connection-lost", "the client stopped before the reply"))
  if self.sm then self.sm:client_stopped(err) end
  self:_set_status("closed")
  if self.retained then
    self.retained = false
    loop.release()
  end
  self.events:fire("offline", err)
end

--- Ends the session gracefully: with Stream Management, asks for a last ack first; sends the
-- stream end and waits for the server's (each wait up to `timeout` seconds, default 5), then
-- stops without reconnecting. The `offline` event follows.
function Client:close(timeout)
  timeout = timeout or 5
  self.closing = true
  if self.reconnect_timer then
    self.reconnect_timer:cancel()
    self.reconnect_timer = nil
  end
  local conn = self.conn
  if conn and not self.neg then
    self:_set_status("closing")
    if self.sm then
      self.sm:before_close(conn, timeout, function() conn:close(timeout) end)
    else
      conn:close(timeout)
    end
  elseif conn then
    conn:abort("closed by the user")
  elseif self.state ~= "closed" then
    self:_stop(nil)
  end
end

-- Incoming ----------------------------------------------------------------------------------------

function Client:_incoming(el)
  local name = el.name
  local xmlns = element_ns(el) -- el.attr.xmlns, without building a lazy stanza's attr
  -- Stanzas carry no xmlns of their own (the stream's); only other elements can be SM's.
  if xmlns ~= nil or (name ~= "message" and name ~= "presence" and name ~= "iq") then
    if self.sm and self.sm:incoming(el) then return end
    self:_log("debug", "ignored top-level <" .. name .. "/> in " .. tostring(xmlns))
    return
  end
  -- Dispatched here rather than in a function of its own: this runs for every stanza received.
  local ev = self.events
  if not (ev.handlers.stanza and ev:fire("stanza", el) ~= nil) then
    if name == "message" then
      ev:fire("message", el)
    elseif name == "presence" then
      ev:fire("presence", el)
    elseif not self.iq:incoming(el) and ev:fire("iq", el) == nil then
      local kind = el.attr.type
      if kind == "get" or kind == "set" then
        self:send(stanza.error_reply(el, "cancel", "service-unavailable"))
      end
    end
  end
  -- Counted once handled, so a crash mid-handler gets the stanza again after resumption.
  if self.sm then self.sm:count_inbound() end
end

-- Sending -----------------------------------------------------------------------------------------

--- Sends a stanza. Returns true, or `nil, err` when it cannot be serialized (invalid XML
-- characters, bad names) or the queue is full: nothing is sent then. Stanzas sent while
-- offline wait and go out, in order, when the session is online again. With Stream Management
-- (the default), `callback(ok, err, st)` is called exactly once: `true` when the server
-- acknowledged the stanza, `false, err` when it failed.
function Client:send(st, callback)
  if not is_stanza(st) then error("send() takes a stanza", 2) end
  if self.sm then return self.sm:send(st, callback) end
  local raw, err = core.serialize(st)
  if not raw then return nil, xmperror.new("send", "invalid-xml", err) end
  -- Behind stanzas still waiting (a status handler sends before the outbox is flushed).
  if self.state ~= "online" or self.outbox[1] ~= nil then
    self.outbox[#self.outbox + 1] = st
    return true
  end
  self.conn:send_raw(raw)
  return true
end

--- Sends an IQ get/set and delivers the reply: `callback(reply)` or `callback(nil, err)`.
-- Without a callback, inside `xmppsm.spawn`, it waits and returns `reply` or `nil, err`.
function Client:request(request, timeout, callback)
  return self.iq:request(request, timeout, callback)
end

--- Runs the loop once: waits up to `timeout` seconds for activity (nil: until the next timer).
function Client:step(timeout) -- luacheck: no unused args
  return loop.step(timeout)
end

--- The socket of the current connection (LuaSocket or LuaSec object, with `getfd()`), for
-- embedding in another event loop; nil when not connected.
function Client:socket()
  return self.conn and self.conn.transport.sock or nil
end

--- Stream Management state: enabled, resumable, id, counters, unacknowledged count and bytes,
-- age of the oldest, resumes, failures, re-sent stanzas, ack round-trip times. Nil when off.
function Client:sm_state()
  return self.sm and self.sm:state()
end

--- The bound full JID, or nil before the first session.
function Client:jid()
  return self.full_jid
end

return client
