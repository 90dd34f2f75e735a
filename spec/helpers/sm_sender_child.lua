-- A bot process for the kill-and-restart spec:
--   lua5.4 spec/helpers/sm_sender_child.lua MODE STORE PORT CAFILE TO [COUNT]
-- MODE "send": sends COUNT messages "k1".."kCOUNT" to TO, a few every 10 ms, printing
-- "SENT i" once send() returned; MODE "flush": sends nothing new. Both print "ONLINE" or
-- "RESUMED" when the session is up and "DONE" once nothing is left unacknowledged.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "./?.so;" .. package.cpath
local xmppsm = require "xmppsm"

local mode, store, port, cafile, to, count = table.unpack(arg)
count = tonumber(count or 0)
io.stdout:setvbuf("line")

local client = xmppsm.client{
  jid = "alice@xmppsm.test", password = "pw-alice", host = "127.0.0.1", port = tonumber(port),
  cafile = cafile, presence = false, reconnect_delay = 0.05, logger = function() end,
  sm = { store = store, durability = "write" },
}
local sent, up = 0, false
local function check_done()
  if up and sent >= count and client:sm_state().unacked == 0 then
    print("DONE")
    os.exit(0)
  end
end
client:on("online", function() print("ONLINE") up = true check_done() end)
client:on("resumed", function() print("RESUMED") up = true check_done() end)
client:on("ackedStanza", check_done)

if mode == "send" then
  local timer
  timer = xmppsm.every(0.01, function()
    for _ = 1, 5 do
      if sent >= count then timer:cancel() return end
      sent = sent + 1
      assert(client:send(xmppsm.stanza.message({ to = to, type = "chat" }, "k" .. sent)))
      print("SENT " .. sent)
    end
  end)
end
client:connect()
xmppsm.run()
