--- IQ requests and handlers (RFC 6120 §8.2.3): replies are matched by id *and* by the entity
-- that was addressed, so nobody else can answer for it; get/set requests go to per-namespace
-- handlers, and one nobody handles is answered with `service-unavailable`.
-- @module xmppsm.iq
local jid = require "xmppsm.jid"
local loop = require "xmppsm.loop"
local stanza = require "xmppsm.stanza"
local xmperror = require "xmppsm.error"

local iq = {}

local Tracker = {}
Tracker.__index = Tracker

--- Creates the IQ tracker of a client.
function iq.new(client)
  return setmetatable({ client = client, pending = {}, handlers = {} }, Tracker)
end

-- Who may answer a request sent to `to`: the addressed entity; for a request to our own
-- account (no `to`, our bare JID) the server answers on its behalf, with or without `from`.
local function reply_allowed(client, to, from)
  local own_bare = client.bare_jid
  if to == nil or jid.compare(to, own_bare) then
    return from == nil or jid.compare(from, own_bare) or jid.compare(from, client.domain)
      or (client.full_jid ~= nil and jid.compare(from, client.full_jid))
  end
  return from ~= nil and jid.compare(from, to)
end

--- Sends `request` (an iq get/set stanza) and calls `callback(reply)` with the result, or
-- `callback(nil, err)` with an `xmppsm.error` (type "iq": the error reply's condition, or
-- "timeout"). Without a callback, inside `xmppsm.spawn`, it waits and returns the same values.
function Tracker:request(request, timeout, callback)
  if type(timeout) == "function" then timeout, callback = nil, timeout end
  assert(stanza.is_stanza(request) and request.name == "iq", "request must be an iq stanza")
  local kind = request.attr.type
  assert(kind == "get" or kind == "set", "request must be an iq of type get or set")
  if not callback then
    if not loop.can_wait() then
      error("client:request() without a callback must run inside xmppsm.spawn()", 2)
    end
    return loop.wait(function(resume) self:request(request, timeout, resume) end)
  end
  local client = self.client
  if not request.attr.id then request.attr.id = client:_new_id() end
  local id = request.attr.id
  if self.pending[id] then error("an IQ with id " .. id .. " is already waiting for its reply", 2) end
  local entry = { to = request.attr.to, callback = callback }
  entry.timer = loop.after(timeout or client.opts.request_timeout, function()
    self:_settle(id, nil, xmperror.new("iq", "timeout", "no reply to iq " .. id .. " in time",
                                       { stanza = request }))
  end)
  self.pending[id] = entry
  local ok, err = client:send(request)
  if not ok then
    self:_settle(id, nil, xmperror.new("iq", "not-sent", tostring(err), { stanza = request }))
  end
end

function Tracker:_settle(id, reply, err)
  local entry = self.pending[id]
  if not entry then return end
  self.pending[id] = nil
  entry.timer:cancel()
  local ok, cb_err = pcall(entry.callback, reply, err)
  if not ok then self.client:_handler_error("request callback", cb_err) end
end

--- Fails every pending request with `err` (the session they were sent in is gone).
function Tracker:fail_all(err)
  local ids = {}
  for id in pairs(self.pending) do ids[#ids + 1] = id end
  for _, id in ipairs(ids) do self:_settle(id, nil, err) end
end

--- Registers `fn(iq_stanza)` for get/set requests whose payload is in namespace `xmlns`.
-- `fn` returns a reply stanza to send, or true when it replied (or will reply) itself.
function Tracker:add_handler(xmlns, fn)
  assert(type(xmlns) == "string" and type(fn) == "function", "add_handler(xmlns, fn)")
  self.handlers[xmlns] = fn
end

function Tracker:remove_handler(xmlns)
  self.handlers[xmlns] = nil
end

--- Handles an incoming iq. Returns true when it was consumed here.
function Tracker:incoming(st)
  local kind, id = st.attr.type, st.attr.id
  if kind == "result" or kind == "error" then
    local entry = id and self.pending[id]
    if not entry then return false end
    if not reply_allowed(self.client, entry.to, st.attr.from) then
      self.client:_log("warn", "ignored an iq reply for " .. id .. " from " .. tostring(st.attr.from)
                       .. ": the request went to " .. tostring(entry.to or "our account"))
      return true
    end
    if kind == "result" then
      self:_settle(id, st)
    else
      local err_type, condition, text = st:get_error()
      self:_settle(id, nil, xmperror.new("iq", condition or "undefined-condition",
                                         text or condition, { stanza = st, error_type = err_type }))
    end
    return true
  end
  if kind ~= "get" and kind ~= "set" then return false end
  local payload = st.tags[1]
  local handler = payload and self.handlers[payload.attr.xmlns or ""]
  if not handler then return false end
  local ok, result = pcall(handler, st)
  if not ok then
    self.client:_handler_error("iq handler " .. tostring(payload.attr.xmlns), result)
    self.client:send(stanza.error_reply(st, "wait", "internal-server-error"))
  elseif stanza.is_stanza(result) then
    self.client:send(result)
  elseif not result then
    return false
  end
  return true
end

return iq
