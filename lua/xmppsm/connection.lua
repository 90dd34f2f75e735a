--- One XMPP stream over one transport: opens and restarts the stream, frames what arrives,
-- serializes what leaves, and turns stream errors and parse errors into one `on_end(err)` call.
-- It knows the stream, not the session: negotiation lives in `xmppsm.session`.
-- @module xmppsm.connection
local core = require "xmppsm.core"
local ns = require "xmppsm.ns"
local stanza = require "xmppsm.stanza"
local transport = require "xmppsm.transport"
local xmperror = require "xmppsm.error"

local connection = {}

local Connection = {}
Connection.__index = Connection

--- Creates a connection. `hooks`: `on_element(el, raw)` for every top-level element,
-- `on_end(err)` once when the stream ends (err is an `xmppsm.error` or nil for a clean close),
-- `raw_in(bytes)` and `raw_out(bytes)` for traffic logging (may be nil), `wants_raw()` (may be
-- nil): asked before each chunk is parsed, false when nobody needs the raw bytes of the stanzas
-- in it (they are then `false`, and the parser makes no string for them).
function connection.new(opts, hooks)
  local self = setmetatable({
    hooks = hooks,
    ended = false,
    parser = core.parser{ stanza_mt = stanza.metatable, max_stanza_size = opts.max_stanza_size },
    header = nil,          -- the server's stream header attributes
    sent_close = false,
  }, Connection)
  self.transport = transport.new{
    on_data = function(bytes) self:_on_data(bytes) end,
    on_close = function(reason) self:_on_transport_close(reason) end,
  }
  return self
end

function Connection:_end(err)
  if self.ended then return end
  self.ended = true
  self.parser:close()
  self.hooks.on_end(err)
end

function Connection:_on_transport_close(reason)
  if self.ended then return end
  if self.closing_cleanly then return self:_end(nil) end
  self:_end(xmperror.new("connection", "connection-lost", reason))
end

local function stream_error_of(el)
  local condition, text = "undefined-condition", nil
  for _, child in ipairs(el.tags) do
    local child_ns = child.attr.xmlns
    if child_ns == ns.streams then
      if child.name == "text" then text = child[1] else condition = child.name end
    end
  end
  return xmperror.new("stream", condition, text or ("stream error from server: " .. condition))
end

function Connection:_on_data(bytes)
  local wants_raw = self.hooks.wants_raw
  if wants_raw then self.parser:set_raw(not not wants_raw()) end
  local events, n = self.parser:feed(bytes)
  for i = 1, n do
    if self.ended then return end
    local kind, value, extra = events[3 * i - 2], events[3 * i - 1], events[3 * i]
    if kind == "stanza" then
      if value.name == "error" and value.attr.xmlns == ns.stream then
        if self.hooks.raw_in then self.hooks.raw_in(extra) end
        self:_fail(stream_error_of(value), false)
      else
        self.hooks.on_element(value, extra)
      end
    elseif kind == "header" then
      if self.hooks.raw_in then self.hooks.raw_in(extra) end
      self.header = value
      if self.on_header then self.on_header(value) end
    elseif kind == "close" then
      if self.hooks.raw_in then self.hooks.raw_in(extra) end
      self.closing_cleanly = true
      if not self.sent_close then self:_write("</stream:stream>") end
      self.sent_close = true
      self.transport:close_after_flush(1, "stream closed")
    elseif kind == "error" then
      self:_fail(xmperror.new("stream", value, "received XML refused: " .. extra), true)
    end
  end
end

-- Ends the stream because of `err`; `tell_peer` sends the stream error to the server first.
function Connection:_fail(err, tell_peer)
  if self.ended then return end
  if tell_peer and not self.sent_close then
    self:_write(string.format(
      "<stream:error><%s xmlns='%s'/></stream:error></stream:stream>", err.condition, ns.streams))
    self.sent_close = true
  end
  -- Report this error before the transport's own end could report a plain lost connection.
  self:_end(err)
  self.transport:close_after_flush(1, err.text)
end

function Connection:_write(data, shown)
  if self.hooks.raw_out then self.hooks.raw_out(shown or data) end
  return self.transport:send(data)
end

--- Connects the transport (and TLS for direct TLS); `cb(true)` or `cb(nil, err)`.
function Connection:connect(host, port, timeout, tls_opts, cb)
  self.transport:connect(host, port, timeout, function(ok, err)
    if not ok then return cb(nil, xmperror.new("connection", "remote-connection-failed", err)) end
    if not tls_opts then return cb(true) end
    self:start_tls(tls_opts, cb)
  end)
end

--- Starts TLS on the connected transport; `cb(true)` or `cb(nil, err)`.
function Connection:start_tls(tls_opts, cb)
  self.transport:start_tls(tls_opts, function(ok, err)
    if not ok then return cb(nil, xmperror.new("tls", "tls-failed", err)) end
    self.secure = true
    cb(true)
  end)
end

--- Sends a new stream header and makes the parser expect the server's.
-- Returns the bytes that arrived after the element that asked for the restart.
function Connection:open_stream(domain, from)
  local leftover = self.parser:reset()
  local header = string.format(
    "<?xml version='1.0'?><stream:stream xmlns='%s' xmlns:stream='%s' to='%s'%s version='1.0' xml:lang='en'>",
    ns.client, ns.stream, assert(core.escape(domain)),
    from and (" from='" .. assert(core.escape(from)) .. "'") or "")
  self.header = nil
  self:_write(header)
  return leftover
end

--- Ends the current stream in the parser (after `<proceed/>`) and returns the bytes that
-- followed the element that paused it.
function Connection:take_leftover()
  return self.parser:reset()
end

--- Feeds bytes back into the parser (those that followed a SASL `<success/>`).
function Connection:feed(bytes)
  if bytes and #bytes > 0 then self:_on_data(bytes) end
end

--- Serializes and sends an element. Returns the raw bytes, or `nil, err` when it cannot be
-- serialized (nothing is sent then).
function Connection:send(el, shown)
  local raw, err = core.serialize(el)
  if not raw then return nil, err end
  if self.ended then return nil, "not connected" end
  self:_write(raw, shown)
  return raw
end

--- Sends bytes as they are (already serialized).
function Connection:send_raw(raw)
  if self.ended then return nil, "not connected" end
  -- Connection:_write inlined: this runs once per stanza sent.
  local raw_out = self.hooks.raw_out
  if raw_out then raw_out(raw) end
  return self.transport:send(raw)
end

--- tls-exporter channel binding data when available.
function Connection:channel_binding()
  return self.transport:channel_binding()
end

--- Ends the stream gracefully: sends the end tag and waits up to `timeout` for the server's.
function Connection:close(timeout)
  if self.ended then return end
  if not self.sent_close then
    self.sent_close = true
    self.closing_cleanly = true
    self:_write("</stream:stream>")
  end
  require("xmppsm.loop").after(timeout or 5, function() self.transport:close("close timed out") end)
end

--- Drops the connection at once, without a goodbye (for a dead link).
function Connection:abort(reason)
  self.transport:close(reason)
end

return connection
