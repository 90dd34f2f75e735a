-- A reliable sender: sends COUNT messages (default 20, four a second) and prints the outcome
-- of each one, acknowledged by the server or failed with a reason, exactly once. It keeps
-- going through cuts: what the server has not acknowledged is re-sent after resumption.
--
--   XMPP_JID=bot@example.org XMPP_PASSWORD=secret XMPP_TO=ops@example.org \
--     lua5.4 examples/reliable_sender.lua [COUNT]
-- Optional: XMPP_HOST, XMPP_PORT, XMPP_CAFILE. With a throwaway server and a link cut every 2 s:
--   lua5.4 examples/with_server.lua --cut-every 2 examples/reliable_sender.lua
local xmppsm = require "xmppsm"

local count = math.tointeger(tonumber(arg[1] or 20)) or error("COUNT must be a whole number")
local to = os.getenv("XMPP_TO") or assert(os.getenv("XMPP_JID"), "set XMPP_JID")

local client = xmppsm.client{
  jid = assert(os.getenv("XMPP_JID"), "set XMPP_JID"),
  password = assert(os.getenv("XMPP_PASSWORD"), "set XMPP_PASSWORD"),
  host = os.getenv("XMPP_HOST"),
  port = tonumber(os.getenv("XMPP_PORT") or ""),
  cafile = os.getenv("XMPP_CAFILE"),
  reconnect_delay = 0.5,
  sm = { store = false, ack_timeout = 5 },  -- a dead link is noticed within 5 s
}

local function show_state(when)
  local s = client:sm_state()
  print(("sm_state %s: unacked=%d acked_total=%d failed_total=%d resumes=%d resent=%d rtt_avg=%s")
        :format(when, s.unacked, s.acked_total, s.failed_total, s.resumes, s.resent,
                s.rtt_avg and ("%.1f ms"):format(s.rtt_avg * 1000) or "-"))
end

-- The outcome events: exactly one of them for every stanza send() accepted.
client:on("ackedStanza", function(st)
  local body = st:get_child_text("body")
  if body then print("acked:  " .. body) end      -- the initial presence has no body
end)
client:on("fail", function(st, err)
  print("FAILED: " .. tostring(st:get_child_text("body")) .. ": " .. tostring(err))
end)

client:on("disconnected", function(err)
  if err then   -- nil after our own close()
    print("disconnected (" .. tostring(err.text) .. "); unacknowledged messages are kept")
  end
end)
client:on("resumed", function() show_state("after resuming") end)

local settled, sent = 0, 0
local function outcome()           -- the per-stanza callback: counts outcomes to know when to stop
  settled = settled + 1
  if settled == count then
    show_state("at the end")
    client:close()                 -- asks for a last ack, then ends the stream; run() returns
  end
end

client:on("online", function(jid)
  print("online as " .. jid)
  if sent > 0 then return end      -- a new session after a lost one: the timer is running already
  local timer
  timer = xmppsm.every(0.25, function()
    sent = sent + 1
    local body = ("message %d of %d"):format(sent, count)
    -- send() accepting it means the outcome will come; nil, err means it was refused outright
    local ok, err = client:send(xmppsm.stanza.message({ to = to, type = "chat" }, body), outcome)
    if ok then
      print("sent:   " .. body)
    else
      print("refused: " .. body .. ": " .. tostring(err))
      outcome()
    end
    if sent == count then timer:cancel() end
  end)
end)

client:connect()
xmppsm.run()
