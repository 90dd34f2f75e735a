--- XEP-0198 Stream Management: the delivery contract.
--
-- Every stanza given to `client:send()` gets exactly one outcome, exactly once: acknowledged by
-- the server (events `ackedStanza`, `ackedRaw`, `ack`, and the stanza's own callback with
-- `true`) or failed with a reason (event `fail`, and the callback with `false, err`).
-- Stanzas live in two places until then: `unsent` (accepted, not yet written on a stream with
-- Stream Management enabled) and the C queue (written, waiting for the server's `<a h/>`).
-- Both are mirrored in the store, so a restarted process resumes the session and re-sends.
-- @module xmppsm.sm
local core = require "xmppsm.core"
local element_ns = core.element_ns -- el.attr.xmlns, without building a lazy stanza's attr
local loop = require "xmppsm.loop"
local ns = require "xmppsm.ns"
local stanza = require "xmppsm.stanza"
local socket = require "socket"
local xmperror = require "xmppsm.error"

local serialize, gettime = core.serialize, socket.gettime
local sees_arg = core.sees_arg

local sm = {}

local SM = {}
SM.__index = SM

--- Options of the client's `sm` table, with their defaults.
sm.defaults = {
  resume = true,          -- ask for a resumable session
  ack_after = 10,         -- request an ack once this many stanzas are unacknowledged
  ack_interval = 30,      -- with no traffic, request an ack this often (finds dead links)
  ack_timeout = 15,       -- no <a/> this long after <r/>: the connection is dead
  max_queue = 10000,      -- most unacknowledged stanzas (send() fails beyond)
  max_queue_bytes = 16 * 1024 * 1024,
  leftovers = "resend",   -- after a failed resumption: "resend", "fail", or function(st) -> "resend"|"fail"
  store = nil,            -- path, false (keep nothing), or a store object; nil: the default path
  durability = "write",   -- "fsync", "write" or "none" (see xmppsm.store)
}

--- Checks the client's `sm` table (unknown names raise) and returns it with defaults filled in.
function sm.check_options(given)
  local o = {}
  for k, v in pairs(sm.defaults) do o[k] = v end
  for k, v in pairs(given or {}) do
    if sm.defaults[k] == nil and k ~= "store" then error("unknown sm option " .. tostring(k), 4) end
    o[k] = v
  end
  local lo = o.leftovers
  if lo ~= "resend" and lo ~= "fail" and type(lo) ~= "function" then
    error("sm option leftovers must be \"resend\", \"fail\" or a function", 4)
  end
  return o
end

-- XEP-0082 timestamp for <delay/>.
local function stamp_string(t)
  local whole = math.floor(t)
  return os.date("!%Y-%m-%dT%H:%M:%S", whole) .. string.format(".%03dZ", math.floor((t - whole) * 1000))
end

--- Creates the Stream Management layer of `client` with the client's `sm` option table.
function sm.new(client, given, store)
  local o = sm.check_options(given)
  local self = setmetatable({
    client = client,
    opts = o,
    -- Weak objects: an unacknowledged stanza costs its bytes, not also a table the program
    -- has forgotten (its outcome then gets it read back from the bytes). Each item's note is
    -- its send's outcome callback, held strongly: one per send, even when one stanza object
    -- is sent twice.
    queue = core.queue{ max_items = o.max_queue, max_bytes = o.max_queue_bytes, weak_objects = true },
    unsent = {},           -- { raw=, st=, stamp=, cb= } in send order
    enabled = false,       -- SM is on for the current stream
    -- From the end of online() until the connection ends: send() writes at once only then, so
    -- nothing a handler sends while the client comes online overtakes what was accepted before.
    live = false,
    session = nil,         -- { id, location, max, jid } of a resumable session
    inbound = 0,
    r_outstanding = false,
    store = store,
    stats = { resumes = 0, resume_failures = 0, resent = 0, acked = 0, failed = 0,
              rtt_last = nil, rtt_sum = 0, rtt_count = 0 },
  }, SM)
  self.persist_inbound_deferred = function() self:persist_inbound() end
  if store then self:_restore(store) end
  return self
end

-- Loads what a previous process left: the resumable session, counters and the stanzas it had
-- not seen acknowledged, which go back into the queue in their old order.
function SM:_restore(store)
  local state, warning = store:load()
  if not state then
    error("stream management store: " .. tostring(warning), 0)
  end
  if warning then
    self.client:_log("warn", "stream management store: " .. warning)
    -- Handlers are added after construction: the client reports it when it connects.
    self.store_warning = xmperror.new("sm", "store-corrupt", warning)
  end
  if not state then return end
  self.session = state.session
  self.inbound = state.inbound or 0
  if state.session then
    self.queue:set_counter(state.acked or 0)
    for _, item in ipairs(state.items or {}) do
      local seq, err = self.queue:push(item.raw, false, item.stamp)
      if not seq then
        self.client:_log("error", "cannot restore a queued stanza: " .. tostring(err))
      end
    end
  else
    for _, item in ipairs(state.items or {}) do
      self.unsent[#self.unsent + 1] = { raw = item.raw, stamp = item.stamp }
    end
  end
end

-- Outcomes -------------------------------------------------------------------------------------

-- The stanza object of a queue item; items restored from the store carry only bytes.
local function object_of(raw, obj)
  return obj or stanza.read_back(raw)
end

-- Settles the first `n` items of an ack's result (raw, obj, stamp each) as acknowledged;
-- `callbacks` is the ack's notes (nil when no item has a callback).
-- Runs for every acknowledged stanza: the lookups are made once per batch, and events nobody
-- listens to cost a table lookup, not a call (nor a read-back stanza for a forgotten one).
function SM:_acked(items, n, callbacks)
  local stats = self.stats
  local events = self.client.events
  local listeners = events.handlers   -- the same table for the emitter's life
  for i = 1, n do
    local raw, obj = items[3 * i - 2], items[3 * i - 1]
    local cb = callbacks and callbacks[i]
    stats.acked = stats.acked + 1   -- per item: a callback below may read sm_state()
    local st = obj
    -- A callback declared as `function(ok)` could never see a read-back stanza: none is made.
    if not st and (listeners.ackedStanza or listeners.ack or (cb and sees_arg(cb, 3))) then
      st = stanza.read_back(raw)
    end
    if listeners.ackedStanza then events:fire("ackedStanza", st) end
    if listeners.ackedRaw then events:fire("ackedRaw", raw) end
    if listeners.ack then events:fire("ack", st) end
    if cb then
      local ok, err = pcall(cb, true, nil, st)
      if not ok then self.client:_handler_error("send callback", err) end
    end
  end
end

-- Settles a stanza as failed; `cb` is its outcome callback (or nil).
function SM:_failed(raw, obj, err, cb)
  local st = object_of(raw, obj)
  self.stats.failed = self.stats.failed + 1
  self.client.events:fire("fail", st, err)
  if cb then
    local ok, cerr = pcall(cb, false, err, st)
    if not ok then self.client:_handler_error("send callback", cerr) end
  end
end

-- Releases what `h` acknowledges. Returns true, or false after a protocol error was handled.
function SM:_handle_h(h_text, where)
  local h, perr = core.parse_h(h_text or "")
  if not h then
    -- A broken h says nothing reliable: keep every stanza, let the ack timeout decide.
    self.client:_log("warn", "ignored " .. where .. " with a malformed h: " .. tostring(perr))
    self.client.events:fire("error", xmperror.new("sm", "bad-ack", "malformed h in " .. where))
    return true
  end
  local items, n, callbacks = self.queue:ack(h)
  if not items then
    local text = string.format("the server acknowledged %d stanzas but only %d were sent",
                               core.h_diff(h, self.queue:acked()), self.queue:count())
    self.client:_log("error", text)
    self.client.events:fire("error", xmperror.new("sm", "handled-count-too-high", text))
    -- XEP-0198 §6: tell the server, end the stream; its counters can't be trusted to resume.
    self.session = nil
    if self.store then self.store:ended() end
    local conn = self.client.conn
    if conn then
      conn:send_raw("<stream:error><undefined-condition xmlns='" .. ns.streams .. "'/>" ..
                    "<handled-count-too-high xmlns='" .. ns.sm .. "' h='" .. h .. "' send-count='" ..
                    self.queue:pushed() .. "'/></stream:error></stream:stream>")
      conn:abort("handled-count-too-high")
    end
    return false
  end
  if n > 0 and self.store then self.store:acked(h, n) end
  self:_acked(items, n, callbacks)
  return true
end

-- Sending --------------------------------------------------------------------------------------

local function store_failed(why)
  return xmperror.new("send", "store-failed", "not stored, not sent: " .. tostring(why))
end

--- Accepts a stanza for delivery. `cb(ok, err, st)` is its outcome callback (optional).
-- Returns true, or `nil, err` when it was refused (invalid XML, queue full, store failed):
-- then no outcome follows, because nothing was accepted.
function SM:send(st, cb)
  local raw, err = serialize(st)
  if not raw then return nil, xmperror.new("send", "invalid-xml", err) end
  local stamp = gettime()
  local unsent = self.unsent
  local live = self.live and self.client.state == "online"
  if live and self.enabled then
    -- Nearly every call (nothing waits in `unsent` once live): the queue checks its own
    -- limits, and the store gets the stanza after the queue took it, before the socket can.
    return self:_write(raw, st, stamp, cb, self.store)
  end
  if self.queue:count() + #unsent >= self.opts.max_queue then
    return nil, xmperror.new("send", "queue-full",
                             "too many unacknowledged stanzas (" .. self.opts.max_queue .. ")")
  end
  -- Durable before the bytes can reach the socket: a crash after this line loses nothing.
  local store = self.store
  if store then
    local ok, serr = store:queued(raw, stamp)
    if not ok then return nil, store_failed(serr) end
  end
  if live then
    self:_send_unmanaged(raw, st, cb)
  else
    unsent[#unsent + 1] = { raw = raw, st = st, stamp = stamp, cb = cb }
  end
  return true
end

-- Without Stream Management nothing can be acknowledged: say so rather than pretend.
function SM:_send_unmanaged(raw, st, cb)
  self.client.conn:send_raw(raw)
  self:_failed(raw, st, xmperror.new("sm", "unacknowledged",
    "sent, but the server does not acknowledge stanzas (no stream management)"), cb)
  self.dirty = true
end

-- Queues a stanza and writes it on the stream. With `store`, stores it once queued, and takes it
-- back out of the queue if the store refuses it. Returns true, or `nil, err` (queue full, store
-- failed) having sent nothing.
function SM:_write(raw, st, stamp, cb, store)
  local queue = self.queue
  local seq, _, qerr = queue:push(raw, st, stamp, cb)
  if not seq then return nil, xmperror.new("send", "queue-full", qerr) end
  if store then
    local ok, serr = store:queued(raw, stamp)
    if not ok then
      queue:unpush()
      return nil, store_failed(serr)
    end
  end
  self.client.conn:send_raw(raw)
  -- _ack_policy's own first test, here: while an <r/> is out (most sends) it has nothing to do.
  if not self.r_outstanding then self:_ack_policy() end
  return true
end

-- _write for a stanza accepted earlier (and stored then): a refusal now is its outcome, since
-- send() already returned true (the byte limit: settled now rather than held forever).
function SM:_write_accepted(raw, st, stamp, cb)
  local ok, err = self:_write(raw, st, stamp, cb)
  if not ok then self:_failed(raw, st, err, cb) end
end

-- Ack requests: at most one outstanding; one after a burst of sends (coalesced at the end of
-- the loop step) or at once after `ack_after` unacknowledged stanzas.
function SM:_ack_policy()
  if self.r_outstanding or not self.enabled then return end
  if self.queue:count() >= self.opts.ack_after then return self:request_ack() end
  if not self.burst_timer then
    self.burst_timer = loop.after(0, function()
      self.burst_timer = nil
      if self.queue:count() > 0 then self:request_ack() end
    end)
  end
end

--- Sends `<r/>` unless one is outstanding, and arms the ack timeout.
function SM:request_ack()
  if self.r_outstanding or not self.enabled then return end
  local conn = self.client.conn
  if not conn then return end
  self.r_outstanding = true
  self.r_sent_at = core.monotime()
  conn:send_raw("<r xmlns='" .. ns.sm .. "'/>")
  self.ack_timer = loop.after(self.opts.ack_timeout, function()
    self.client:_log("warn", "no ack within " .. self.opts.ack_timeout .. " s: the connection is dead")
    conn:abort("no acknowledgement within " .. self.opts.ack_timeout .. " s")
  end)
end

-- Incoming -------------------------------------------------------------------------------------

--- Handles SM elements on an established stream. Returns true when `el` was one.
function SM:incoming(el)
  if element_ns(el) ~= ns.sm then return false end
  local name = el.name
  if name == "r" then
    self:persist_inbound()
    self.client.conn:send_raw(string.format("<a xmlns='%s' h='%d'/>", ns.sm, self.inbound))
  elseif name == "a" then
    if self.r_outstanding then
      self.r_outstanding = false
      if self.ack_timer then self.ack_timer:cancel() self.ack_timer = nil end
      local rtt = core.monotime() - self.r_sent_at
      self.stats.rtt_last, self.stats.rtt_sum = rtt, self.stats.rtt_sum + rtt
      self.stats.rtt_count = self.stats.rtt_count + 1
    end
    if self:_handle_h(el.attr.h, "<a/>") then
      if self.drained and self.queue:count() == 0 then
        self.drained()
      elseif self.queue:count() >= self.opts.ack_after then
        self:request_ack()
      end
    end
  else
    self.client:_log("debug", "ignored <" .. name .. "/> from the server")
  end
  return true
end

--- Counts a handled inbound stanza (message, presence, iq).
-- The store gets the count once per loop step, not once per stanza: a crash before that only
-- means the server sends these stanzas again after the resumption (at-least-once, as
-- documented), and every <a h/> we send is preceded by the count's write (see persist_inbound).
function SM:count_inbound()
  if not self.enabled then return end
  self.inbound = (self.inbound + 1) & 0xFFFFFFFF   -- core.h_add(inbound, 1), without a C call
  if self.store and not self.inbound_dirty then
    self.inbound_dirty = true
    if not loop.defer(self.persist_inbound_deferred) then self:persist_inbound() end
  end
end

--- Writes the inbound count to the store if it changed since the last write. Called before
-- the count is told to the server: the server forgets what we acknowledged, so the store must
-- never hold less than that.
function SM:persist_inbound()
  if not self.inbound_dirty then return end
  self.inbound_dirty = false
  if self.store then self.store:inbound(self.inbound) end
end

-- Negotiation ----------------------------------------------------------------------------------

--- During negotiation, after authentication: resumes the previous session when there is one.
-- Returns true when resumed; false when a new session must be bound (after settling what the
-- failed resumption's `h` says).
function SM:try_resume(neg, features)
  self.enabled = false
  self.r_outstanding = false
  if not self.session or not features:get_child("sm", ns.sm) then
    -- Stanzas written on a stream that cannot be resumed: settle them by the policy.
    if self.queue:count() > 0 or self.session then
      self:_session_lost(xmperror.new("sm", "not-resumable", "the previous session cannot be resumed"))
    end
    return false
  end
  self:persist_inbound()
  neg:send(stanza.stanza("resume", { xmlns = ns.sm, previd = self.session.id,
                                     h = tostring(self.inbound) }))
  local reply = neg:next("the resumption reply")
  if reply.attr.xmlns == ns.sm and reply.name == "resumed" then
    self.stats.resumes = self.stats.resumes + 1
    self.enabled = true
    self.resumed_pending = reply
    return true
  end
  self.stats.resume_failures = self.stats.resume_failures + 1
  local condition = reply.tags[1] and reply.tags[1].name or "item-not-found"
  local err = xmperror.new("sm", condition, "the server could not resume the session (" .. condition .. ")")
  if reply.attr.h then self:_handle_h(reply.attr.h, "<failed/>") end
  self:_session_lost(err)
  self.client.events:fire("resumeFailed", err)
  return false
end

-- The old session is gone: settle what it left by the leftovers policy; pending IQ requests
-- can no longer get their replies.
function SM:_session_lost(err)
  self.session = nil
  self.inbound, self.inbound_dirty = 0, false
  self.client.iq:fail_all(xmperror.new("iq", "session-lost", "the session was lost before the reply"))
  local items, n, callbacks = self.queue:clear()
  self.queue:set_counter(0)
  local resend = {}
  for i = 1, n do
    local raw, obj, stamp = items[3 * i - 2], items[3 * i - 1], items[3 * i]
    local cb = callbacks and callbacks[i]
    local st = object_of(raw, obj)
    local policy = self.opts.leftovers
    if type(policy) == "function" then
      local ok, choice = pcall(policy, st)
      policy = ok and choice or "resend"
    end
    -- An IQ request re-sent in a new session would get an orphan reply: settle it instead.
    if policy == "resend" and st.name ~= "iq" then
      resend[#resend + 1] = { raw = raw, st = st, stamp = stamp, cb = cb }
    else
      self:_failed(raw, obj, err, cb)
    end
  end
  -- Leftovers go out before anything sent since, keeping the order send() saw.
  table.move(self.unsent, 1, #self.unsent, #resend + 1, resend)
  self.unsent = resend
  self:_persist_all()
end

-- Rewrites the store from memory: after settling stanzas out of order (rare), which the
-- store's append-only records cannot express.
function SM:_persist_all()
  self.dirty = false
  if not self.store then return end
  local items = {}
  for _, raw, _, stamp in self.queue:each() do items[#items + 1] = { raw = raw, stamp = stamp } end
  for _, item in ipairs(self.unsent) do items[#items + 1] = { raw = item.raw, stamp = item.stamp } end
  self.store:replace({ session = self.session, inbound = self.inbound, acked = self.queue:acked(),
                       items = items })
end

--- After a new session is bound: enables Stream Management (resumable unless turned off).
function SM:enable(neg, features, bound_jid)
  if not features:get_child("sm", ns.sm) then
    self.client.events:fire("error", xmperror.new("sm", "feature-not-implemented",
      "the server does not offer stream management: stanzas cannot be acknowledged"))
    return false
  end
  self.queue:set_counter(0)
  neg:send(stanza.stanza("enable", { xmlns = ns.sm, resume = self.opts.resume and "true" or nil }))
  local reply = neg:next("the reply to <enable/>")
  if reply.attr.xmlns ~= ns.sm or reply.name ~= "enabled" then
    self.client.events:fire("error", xmperror.new("sm", "enable-failed", "the server refused <enable/>"))
    return false
  end
  self.enabled = true
  self.inbound, self.inbound_dirty = 0, false
  local resumable = reply.attr.resume == "true" or reply.attr.resume == "1"
  if resumable and reply.attr.id then
    self.session = { id = reply.attr.id, location = reply.attr.location,
                     max = tonumber(reply.attr.max), jid = bound_jid, enabled_at = os.time() }
  else
    self.session = nil
  end
  if self.store then self.store:enabled(self.session) end
  self.client.events:fire("smEnabled", { id = reply.attr.id, resume = resumable,
                                         max = tonumber(reply.attr.max), location = reply.attr.location })
  return true
end

--- Once online (new or resumed session): settles what `<resumed h>` acknowledged, re-sends the
-- rest with `<delay/>` on messages, then what waited while offline.
function SM:online()
  local resumed = self.resumed_pending
  self.resumed_pending = nil
  if resumed then
    self:_handle_h(resumed.attr.h, "<resumed/>")
    local pending = {}
    for _, raw, obj, stamp in self.queue:each() do pending[#pending + 1] = { raw, obj, stamp } end
    local conn = self.client.conn
    for _, item in ipairs(pending) do
      conn:send_raw(sm.with_delay(item[1], self.client.bare_jid, item[3]))
    end
    self.stats.resent = self.stats.resent + #pending
    if #pending > 0 then self:_ack_policy() end
  end
  -- What a handler sends meanwhile (an outcome callback here, a status handler before) joins
  -- the end of `unsent` and goes out in turn.
  while self.unsent[1] ~= nil do
    local unsent = self.unsent
    self.unsent = {}
    if self.enabled then
      for _, item in ipairs(unsent) do self:_write_accepted(item.raw, item.st, item.stamp, item.cb) end
    else
      for _, item in ipairs(unsent) do self:_send_unmanaged(item.raw, item.st, item.cb) end
    end
  end
  self.live = true
  if self.dirty then self:_persist_all() end
  if self.enabled then self:_start_idle_timer() end
  if resumed then self.client.events:fire("resumed") end
end

--- A message re-sent after a cut says when it was first sent (XEP-0203): `raw` (our own
-- serialization of a stanza) with a `<delay from stamp/>` child added when it is a message
-- without one; other stanzas come back unchanged. Works on the bytes: our serializer writes the
-- element name without a prefix and the namespace literally, so a message with no
-- "urn:xmpp:delay" in its bytes has no delay child; only one that has the string is parsed.
function sm.with_delay(raw, from, stamp)
  if not raw:find("^<message[%s/>]") then return raw end
  local delay = "<delay xmlns='" .. ns.delay .. "' from='" .. from .. "' stamp='" ..
                stamp_string(stamp) .. "'/>"
  if raw:find(ns.delay, 1, true) then
    local st = stanza.parse(raw)
    if not st or st:get_child("delay", ns.delay) then return raw end
  end
  if raw:sub(-10) == "</message>" then return raw:sub(1, -11) .. delay .. "</message>" end
  return raw:sub(1, -3) .. ">" .. delay .. "</message>"   -- <message .../>
end

function SM:_start_idle_timer()
  if self.idle_timer then self.idle_timer:cancel() end
  self.idle_timer = loop.every(self.opts.ack_interval, function()
    if self.enabled and self.client.state == "online" then self:request_ack() end
  end)
end

--- The connection ended: stop timers; keep everything for resumption.
function SM:disconnected()
  self.enabled = false
  self.live = false
  self.r_outstanding = false
  if self.ack_timer then self.ack_timer:cancel() self.ack_timer = nil end
  if self.idle_timer then self.idle_timer:cancel() self.idle_timer = nil end
  if self.burst_timer then self.burst_timer:cancel() self.burst_timer = nil end
end

--- Whether pending IQ requests survive a lost connection (they do while the session can be
-- resumed: their replies will come after resumption).
function SM:keeps_requests()
  return self.session ~= nil
end

--- Before a graceful close: asks for a last ack and waits for it (up to `timeout`), so what
-- the server has gets its outcome; then tells the server what we handled (XEP-0198 §4) and
-- calls `done()`.
function SM:before_close(conn, timeout, done)
  local finished = false
  local timer
  local function finish()
    if finished then return end
    finished = true
    self.drained = nil
    if timer then timer:cancel() end
    if self.enabled and not conn.ended then
      self:persist_inbound()
      conn:send_raw(string.format("<a xmlns='%s' h='%d'/>", ns.sm, self.inbound))
    end
    done()
  end
  if not self.enabled or self.queue:count() == 0 then return finish() end
  self.drained = finish
  timer = loop.after(timeout, finish)
  if not self.r_outstanding then self:request_ack() end
end

--- The client stopped for good: whatever is still waiting fails, the session is over.
function SM:client_stopped(err)
  self:disconnected()
  local reason = err or xmperror.new("sm", "closed",
                                     "the client was closed before the server acknowledged it")
  local items, n, callbacks = self.queue:clear()
  for i = 1, n do
    self:_failed(items[3 * i - 2], items[3 * i - 1], reason, callbacks and callbacks[i])
  end
  local unsent = self.unsent
  self.unsent = {}
  for _, item in ipairs(unsent) do self:_failed(item.raw, item.st, reason, item.cb) end
  self.session = nil
  self:_persist_all()
end

--- A snapshot for `client:sm_state()`.
function SM:state()
  local oldest = self.queue:oldest_stamp()
  local first_unsent = self.unsent[1]
  if first_unsent and (not oldest or first_unsent.stamp < oldest) then oldest = first_unsent.stamp end
  local unsent_bytes = 0
  for _, item in ipairs(self.unsent) do unsent_bytes = unsent_bytes + #item.raw end
  return {
    enabled = self.enabled,
    resumable = self.session ~= nil,
    id = self.session and self.session.id,
    inbound = self.inbound,
    outbound = self.queue:pushed(),
    acked = self.queue:acked(),
    unacked = self.queue:count() + #self.unsent,
    unacked_bytes = self.queue:bytes() + unsent_bytes,
    oldest_age = oldest and (socket.gettime() - oldest) or nil,
    resumes = self.stats.resumes,
    resume_failures = self.stats.resume_failures,
    resent = self.stats.resent,
    acked_total = self.stats.acked,
    failed_total = self.stats.failed,
    rtt_last = self.stats.rtt_last,
    rtt_avg = self.stats.rtt_count > 0 and self.stats.rtt_sum / self.stats.rtt_count or nil,
  }
end

return sm
