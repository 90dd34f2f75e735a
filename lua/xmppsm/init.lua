--- xmppsm: an XMPP client library for Lua 5.4 that never silently loses a message.
--
--     local xmppsm = require "xmppsm"
--     local c = xmppsm.client{ jid = "bot@example.org", password = os.getenv("XMPP_PASSWORD") }
--     c:on("message", function(msg) print(msg:get_child_text("body")) end)
--     c:connect()
--     xmppsm.run()
-- @module xmppsm
local core = require "xmppsm.core"
local loop = require "xmppsm.loop"

local xmppsm = {
  _VERSION = core._VERSION,
  stanza = require "xmppsm.stanza",
  jid = require "xmppsm.jid",
}

--- Creates a client (see `xmppsm.client`).
function xmppsm.client(opts)
  return require("xmppsm.client").new(opts)
end

--- Drives every client in the process; returns once every client is closed.
xmppsm.run = loop.run
--- Runs the loop once, waiting up to `timeout` seconds.
xmppsm.step = loop.step
--- `xmppsm.after(seconds, fn)`: a one-shot timer; returns a timer with `:cancel()`.
xmppsm.after = loop.after
--- `xmppsm.every(seconds, fn)`: a repeating timer; returns a timer with `:cancel()`.
xmppsm.every = loop.every
--- `xmppsm.spawn(fn, ...)`: runs `fn` in a coroutine where `client:request()` can wait.
xmppsm.spawn = loop.spawn
--- `xmppsm.sleep(seconds)`: inside `spawn`, waits without blocking other clients.
xmppsm.sleep = loop.sleep

return xmppsm
