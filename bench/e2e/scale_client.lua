-- Scale in one process: `sessions` xmppsm clients with stream management (each its own account
-- and store file) against Prosody, each sending a message to itself every second for `seconds`
-- seconds; every message must be acknowledged and arrive, none lost. Reports CPU per message
-- (this process, and Prosody), memory per session (Lua heap and resident set, beyond the
-- process before the clients existed), and the counts. One RESULT line.
--
--   lua5.4 bench/e2e/scale_client.lua host=127.0.0.1 port=5222 domain=d cafile=ca.pem \
--     prosody_pid=123 sessions=1000 seconds=60 dir=/tmp/x [prefix=user]
package.path = "lua/?.lua;lua/?/init.lua;bench/?.lua;" .. package.path
package.cpath = "./?.so;" .. package.cpath

local xmppsm = require "xmppsm"
local core = require "xmppsm.core"
local loop = require "xmppsm.loop"
local common = require "e2e.common"

local a = common.args(arg)
local now = core.monotime
local S, SECONDS = a.sessions or 10, a.seconds or 60
local PREFIX = a.prefix or "user"

local function wait_for(cond, seconds, what) return common.wait_for(cond, seconds, what, 0.1) end

local function heap_kib()
  collectgarbage()
  collectgarbage()
  return collectgarbage("count")
end

local heap0, rss0 = heap_kib(), common.status_kib("VmRSS")

local clients, stats = {}, {}
local errors = 0
for i = 1, S do
  local user = PREFIX .. i
  local c = xmppsm.client{
    jid = user .. "@" .. a.domain .. "/scale", password = "pw-alice",
    host = a.host, port = a.port, cafile = a.cafile, presence = false,
    connect_timeout = 60, sm = { store = a.dir .. "/" .. user .. ".sm" },
    logger = function(level, msg)
      if level == "error" then errors = errors + 1 io.stderr:write(user, ": ", msg, "\n") end
    end,
  }
  local st = { sent = 0, acked = 0, arrived = 0, failed = 0 }
  c:on("message", function(m)
    if m:get_child_text("body") then st.arrived = st.arrived + 1 end
  end)
  clients[i], stats[i] = c, st
end

-- Log in gradually: a thousand SCRAM exchanges and TLS handshakes at once would only queue.
local t_connect, ccpu0, cpcpu0 = now(), common.cpu_seconds(), common.cpu_seconds(a.prosody_pid)
local online = 0
for i = 1, S do
  clients[i]:on("online", function() online = online + 1 end)
end
local next_i = 1
while online < S do
  while next_i <= S and next_i - online <= 50 do
    clients[next_i]:connect()
    next_i = next_i + 1
  end
  loop.step(0.05)
  if now() - t_connect > 600 then error("only " .. online .. " of " .. S .. " sessions online") end
end
local connect_seconds = now() - t_connect
local connect_cpu, connect_prosody_cpu = common.cpu_seconds() - ccpu0,
  cpcpu0 and common.cpu_seconds(a.prosody_pid) - cpcpu0 or -1
-- Settle: the last <enabled/>, acks of nothing.
local settle = now() + 1
while now() < settle do loop.step(0.1) end
local heap1, rss1 = heap_kib(), common.status_kib("VmRSS")

-- Steady state: one message a second per session, phases spread over the second.
local timers = {}
local message = xmppsm.stanza.message
local cpu0, pcpu0, t0 = common.cpu_seconds(), common.cpu_seconds(a.prosody_pid), now()
for i = 1, S do
  local c, st = clients[i], stats[i]
  local to = c.opts.jid
  loop.after((i - 1) / S, function()
    timers[i] = loop.every(1, function()
      st.sent = st.sent + 1
      c:send(message({ to = to, type = "chat" }, "s" .. st.sent), function(ok)
        if ok then st.acked = st.acked + 1 else st.failed = st.failed + 1 end
      end)
    end)
  end)
end
local stop_at = t0 + SECONDS
while now() < stop_at do loop.step(1) end
for i = 1, S do if timers[i] then timers[i]:cancel() end end
local t1, cpu1, pcpu1 = now(), common.cpu_seconds(), common.cpu_seconds(a.prosody_pid)
local function totals()
  local t = { sent = 0, acked = 0, arrived = 0, failed = 0 }
  for i = 1, S do
    for k in pairs(t) do t[k] = t[k] + stats[i][k] end
  end
  return t
end
-- Drain: what was sent in the last second is acknowledged and arrives.
local drain_deadline = now() + 30
while true do
  local t = totals()
  if (t.acked + t.failed >= t.sent and t.arrived >= t.sent) or now() > drain_deadline then break end
  loop.step(0.1)
end
local t = totals()
local resumes = 0
for i = 1, S do resumes = resumes + (clients[i]:sm_state().resumes or 0) end

common.result{
  sessions = S, seconds = t1 - t0, connect_seconds = connect_seconds,
  connect_cpu = connect_cpu, connect_prosody_cpu = connect_prosody_cpu,
  sent = t.sent, acked = t.acked, arrived = t.arrived, failed = t.failed,
  lost = t.sent - t.arrived, unacked = t.sent - t.acked - t.failed, resumes = resumes,
  errors = errors,
  msgs_per_s = t.sent / (t1 - t0),
  cpu_us_per_msg = (cpu1 - cpu0) / t.sent * 1e6,
  cpu_share = (cpu1 - cpu0) / (t1 - t0),
  prosody_cpu_us_per_msg = pcpu0 and (pcpu1 - pcpu0) / t.sent * 1e6 or -1,
  heap_kib_per_session = (heap1 - heap0) / S,
  rss_kib_per_session = (rss1 - rss0) / S,
  peak_rss_kib = common.status_kib("VmHWM"),
  backend = "poller",
}

for i = 1, S do clients[i]:close(5) end
wait_for(function()
  for i = 1, S do if clients[i]:status() ~= "closed" then return false end end
  return true
end, 60, "every session to close")
