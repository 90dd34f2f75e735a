--- Error values handed to `error` events, failure callbacks and `nil, err` returns.
-- Each has `type` (where it came from: "stream", "auth", "tls", "connection", "iq", "handler",
-- "send", "sm"), `condition` (an RFC 6120 condition or a library one such as "timeout") and a
-- readable `text`; `tostring(err)` gives "type/condition: text".
-- @module xmppsm.error
local xmperror = {}

local Error = {}
Error.__index = Error
Error.__tostring = function(e)
  return string.format("%s/%s: %s", e.type, e.condition, e.text or e.condition)
end

--- Creates an error value; `extra` fields (such as `stanza`) are copied in.
function xmperror.new(type_, condition, text, extra)
  local e = setmetatable({ type = type_, condition = condition, text = text }, Error)
  if extra then for k, v in pairs(extra) do e[k] = v end end
  return e
end

--- Whether `x` is an error value made here.
function xmperror.is(x)
  return getmetatable(x) == Error
end

return xmperror
