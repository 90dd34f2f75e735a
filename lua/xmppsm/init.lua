--- xmppsm: an XMPP client library for Lua 5.4 that never silently loses a message.
-- @module xmppsm
local core = require "xmppsm.core"

local xmppsm = {
  _VERSION = core._VERSION,
  stanza = require "xmppsm.stanza",
}

return xmppsm
