-- A bot that survives its own death: its Stream Management state (session id, counters and
-- every unacknowledged stanza) lives in a file, so when the process is killed, even with
-- kill -9, and started again, it resumes the old session and re-sends what the server had not
-- acknowledged. Each run sends COUNT messages (default 20, ten a second) and exits once the
-- server has acknowledged all of them.
--
--   XMPP_STORE=/path/to/bot.sm XMPP_JID=bot@example.org XMPP_PASSWORD=secret \
--     XMPP_TO=ops@example.org lua5.4 examples/resume_after_restart.lua [COUNT]
-- Optional: XMPP_HOST, XMPP_PORT, XMPP_CAFILE. Kill it while it sends, run it again, watch.
-- With a throwaway server, killed after 2 s and started again by the runner:
--   lua5.4 examples/with_server.lua --kill-after 2 examples/resume_after_restart.lua
local xmppsm = require "xmppsm"

local store = os.getenv("XMPP_STORE")
  or error("set XMPP_STORE to the file that keeps the session (e.g. /tmp/bot.sm)", 0)
local count = math.tointeger(tonumber(arg[1] or 20)) or error("COUNT must be a whole number")
local to = os.getenv("XMPP_TO") or assert(os.getenv("XMPP_JID"), "set XMPP_JID")
-- Tells this run's messages from those an earlier run left behind.
local run = ("%04x"):format(math.random(0, 0xffff))

local client = xmppsm.client{
  jid = assert(os.getenv("XMPP_JID"), "set XMPP_JID"),
  password = assert(os.getenv("XMPP_PASSWORD"), "set XMPP_PASSWORD"),
  host = os.getenv("XMPP_HOST"),
  port = tonumber(os.getenv("XMPP_PORT") or ""),
  cafile = os.getenv("XMPP_CAFILE"),
  presence = false,                 -- a sending bot: no presence, so every stanza is a message
  sm = { store = store },           -- "write" durability: survives the process being killed
}

-- The store was read when the client was made: what did an earlier run leave?
local state = client:sm_state()
if state.resumable then
  print(("run %s: the store holds session %s with %d unacknowledged message(s); resuming it")
        :format(run, state.id, state.unacked))
else
  print(("run %s: no session in the store (%s); starting a new one"):format(run, store))
end

local sent = 0
local function maybe_done()
  if sent == count and client:sm_state().unacked == 0 and client:status() == "online" then
    local s = client:sm_state()
    print(("run %s: all acknowledged (acked_total=%d, resent=%d, resumes=%d); closing")
          :format(run, s.acked_total, s.resent, s.resumes))
    client:close()                  -- ends the session: the store no longer holds one
  end
end

-- Messages restored from the store have their outcome here too (their callbacks died with the
-- old process; the events are the way to hear about them).
client:on("ackedStanza", function(st)
  print("acked:  " .. tostring(st:get_child_text("body")))
  maybe_done()
end)
client:on("fail", function(st, err)
  print("FAILED: " .. tostring(st:get_child_text("body")) .. ": " .. tostring(err))
  maybe_done()
end)

local function start_sending()
  if sent > 0 then return end
  local timer
  timer = xmppsm.every(0.1, function()
    sent = sent + 1
    local body = ("run %s: message %d of %d"):format(run, sent, count)
    -- In the store before the bytes reach the socket: from here on, a kill cannot lose it.
    assert(client:send(xmppsm.stanza.message({ to = to, type = "chat" }, body)))
    print("sent:   " .. body)
    if sent == count then timer:cancel() maybe_done() end
  end)
end

client:on("resumed", function()
  print(("run %s: RESUMED the earlier session; re-sent %d message(s) the server had not acknowledged")
        :format(run, client:sm_state().resent))
  start_sending()
end)
client:on("resumeFailed", function(err)
  print(("run %s: the server could not resume the session (%s); its leftovers go out in a new one")
        :format(run, err.condition))
end)
client:on("online", function(jid)
  print(("run %s: online in a new session as %s"):format(run, jid))
  start_sending()
end)

client:connect()
xmppsm.run()
