-- An echo bot: answers every chat message with the same text; "quit" makes it close.
--   XMPP_JID=bot@example.org XMPP_PASSWORD=secret lua5.4 examples/echo_bot.lua
-- Optional: XMPP_HOST, XMPP_PORT, XMPP_CAFILE. With a throwaway server, where bob talks to it:
--   lua5.4 examples/with_server.lua --say hello --say quit examples/echo_bot.lua
local xmppsm = require "xmppsm"

local client = xmppsm.client{
  jid = assert(os.getenv("XMPP_JID"), "set XMPP_JID"),
  password = assert(os.getenv("XMPP_PASSWORD"), "set XMPP_PASSWORD"),
  host = os.getenv("XMPP_HOST"),
  port = tonumber(os.getenv("XMPP_PORT") or ""),
  cafile = os.getenv("XMPP_CAFILE"),
  sm = { store = false },
}

client:on("online", function(jid) print("online as " .. jid) end)
client:on("error", function(err) print("error: " .. tostring(err)) end)

client:on("message", function(msg)
  local body = msg:get_child_text("body")
  if body and msg.attr.type ~= "error" then
    print(msg.attr.from .. ": " .. body)
    client:send(xmppsm.stanza.message({ to = msg.attr.from, type = msg.attr.type or "chat" }, body))
    if body == "quit" then client:close() end
  end
end)

client:connect()
xmppsm.run()
