-- IQ requests and an IQ handler: asks the server for its service discovery info with a
-- callback, then pings it and queries itself inside xmppsm.spawn (straight-line code that
-- waits for replies without blocking the loop), answers version queries with a handler, and
-- shows what an error reply looks like.
--
--   XMPP_JID=bot@example.org XMPP_PASSWORD=secret lua5.4 examples/iq_request.lua
-- Optional: XMPP_HOST, XMPP_PORT, XMPP_CAFILE. With a throwaway server:
--   lua5.4 examples/with_server.lua examples/iq_request.lua
local xmppsm = require "xmppsm"
local socket = require "socket"
local stanza = xmppsm.stanza

local DISCO_INFO = "http://jabber.org/protocol/disco#info"
local VERSION = "jabber:iq:version"

local client = xmppsm.client{
  jid = assert(os.getenv("XMPP_JID"), "set XMPP_JID"),
  password = assert(os.getenv("XMPP_PASSWORD"), "set XMPP_PASSWORD"),
  host = os.getenv("XMPP_HOST"),
  port = tonumber(os.getenv("XMPP_PORT") or ""),
  cafile = os.getenv("XMPP_CAFILE"),
  sm = { store = false },
}

-- The handler: XEP-0092 software version. Returning a stanza sends it as the reply; a get/set
-- in a namespace nobody handles is answered with service-unavailable by the library.
client:addIqHandler(VERSION, function(iq)
  print("handler: version query from " .. tostring(iq.attr.from))
  return stanza.reply(iq):query(VERSION)
    :text_tag("name", "xmppsm iq_request example"):text_tag("version", xmppsm._VERSION)
end)

local failures, pending = 0, 2
local function done()
  pending = pending - 1
  if pending == 0 then client:close() end
end

client:on("online", function(jid)
  print("online as " .. jid)
  local domain = jid:match("@([^/]+)")

  -- 1. With a callback: called once, with the reply or with an error (an error reply, a
  -- timeout, the session lost).
  client:request(stanza.iq{ type = "get", to = domain }:query(DISCO_INFO), 10, function(reply, err)
    if not reply then
      print("disco#info failed: " .. tostring(err))
      failures = failures + 1
    else
      local query = reply:get_child("query", DISCO_INFO)
      for identity in query:childtags("identity") do
        print(("disco#info: the server is %s/%s %q"):format(identity.attr.category, identity.attr.type,
                                                            identity.attr.name or ""))
      end
      local features = {}
      for feature in query:childtags("feature") do features[#features + 1] = feature.attr.var end
      print(("disco#info: %d features, e.g. %s"):format(#features, table.concat(features, ", ", 1,
                                                                                 math.min(3, #features))))
    end
    done()
  end)

  -- 2. Inside xmppsm.spawn: request() waits and returns reply or nil, err.
  xmppsm.spawn(function()
    local t0 = socket.gettime()
    local ping = stanza.iq{ type = "get", to = domain }:tag("ping", { xmlns = "urn:xmpp:ping" })
    local pong, err = client:request(ping)
    if pong then
      print(("ping: the server answered in %.1f ms"):format((socket.gettime() - t0) * 1000))
    else
      print("ping failed: " .. tostring(err))
      failures = failures + 1
    end

    -- Our own full JID: the server routes it back to us, and the handler above answers.
    local reply, verr = client:request(stanza.iq{ type = "get", to = jid }:query(VERSION), 10)
    if reply then
      local q = reply:get_child("query", VERSION)
      print(("version: %s %s (answered by our own handler)"):format(q:get_child_text("name"),
                                                                   q:get_child_text("version")))
    else
      print("version query failed: " .. tostring(verr))
      failures = failures + 1
    end

    -- A namespace the server does not know: the error comes back as err.
    local none, nerr = client:request(stanza.iq{ type = "get", to = domain }:query("urn:example:nothing"))
    if none == nil and nerr and nerr.condition then
      print(("an unknown query gets an error reply, as expected: %s"):format(tostring(nerr)))
    else
      print("an unknown query got no error")
      failures = failures + 1
    end
    done()
  end)
end)

client:connect()
xmppsm.run()
os.exit(failures == 0 and 0 or 1)
