--- Stanza builder (placeholder until implemented; see docs/core.md).
-- @module xmppsm.stanza
local stanza = {}
return stanza
