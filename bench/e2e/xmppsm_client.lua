-- End-to-end workload for xmppsm: one account sends N chat messages (to itself, or to a second
-- account connected from this same process), at most `window` unacknowledged at a time; done
-- when every message has arrived and every one is acknowledged. Prints one RESULT line.
--
--   lua5.4 bench/e2e/xmppsm_client.lua host=127.0.0.1 port=5222 domain=d cafile=ca.pem \
--     prosody_pid=123 to=self|other n=20000 window=1000 dir=/tmp/x [store=default|none]
--     [durability=write|fsync|none]   (the store's, see xmppsm.store; default "write")
package.path = "lua/?.lua;lua/?/init.lua;bench/?.lua;" .. package.path
package.cpath = "./?.so;" .. package.cpath

local xmppsm = require "xmppsm"
local core = require "xmppsm.core"
local loop = require "xmppsm.loop"
local common = require "e2e.common"

local a = common.args(arg)
local now = core.monotime
local N, WINDOW = a.n or 20000, a.window or 1000

local function new_client(user)
  local store = false
  if a.store ~= "none" then store = a.dir .. "/" .. user .. ".sm" end
  return xmppsm.client{
    jid = user .. "@" .. a.domain .. "/bench", password = "pw-" .. user,
    host = a.host, port = a.port, cafile = a.cafile, presence = false,
    sm = { store = store, durability = a.durability },
    logger = function(level, msg) if level == "error" then io.stderr:write(msg, "\n") end end,
  }
end

local sender = new_client("alice")
local receiver = sender
if a.to == "other" then receiver = new_client("bob") end
local target = receiver.opts.jid

local sent, acked, arrived, failed = 0, 0, 0, 0
local t_sent, lat_ack, lat_arr = {}, {}, {}

receiver:on("message", function(m)
  local body = m:get_child_text("body")
  local i = body and tonumber(body:sub(2))
  if i and t_sent[i] then
    arrived = arrived + 1
    lat_arr[#lat_arr + 1] = now() - t_sent[i]
  end
end)

local function wait_for(cond, seconds, what) return common.wait_for(cond, seconds, what, 0.1) end

sender:connect()
if receiver ~= sender then receiver:connect() end
wait_for(function() return sender:status() == "online" and receiver:status() == "online" end,
         30, "the clients to be online")

local message = xmppsm.stanza.message
local pump_timer
local send_one
-- Sends until the window is full. Like an application, it runs inside the loop (a timer set
-- by the acknowledgements), so whatever one loop step sends leaves in one write.
local function pump()
  pump_timer = nil
  while sent < N and sent - acked - failed < WINDOW do send_one() end
end
local function schedule_pump()
  if not pump_timer and sent < N then pump_timer = loop.after(0, pump) end
end

function send_one()
  sent = sent + 1
  local i = sent
  t_sent[i] = now()
  local ok, err = sender:send(message({ to = target, type = "chat" }, "b" .. i), function(done)
    if done then
      acked = acked + 1
      lat_ack[#lat_ack + 1] = now() - t_sent[i]
    else
      failed = failed + 1
    end
    schedule_pump()
  end)
  if not ok then error("send refused: " .. tostring(err)) end
end

local cpu0, pcpu0, t0 = common.cpu_seconds(), common.cpu_seconds(a.prosody_pid), now()
local deadline = t0 + (a.timeout or 300)
schedule_pump()
while acked + failed < N or arrived < N do
  loop.step(1)
  if now() > deadline then
    error(string.format("timed out: sent %d acked %d arrived %d failed %d", sent, acked, arrived, failed))
  end
end
local t1, cpu1, pcpu1 = now(), common.cpu_seconds(), common.cpu_seconds(a.prosody_pid)

local r = {
  impl = "xmppsm", to = a.to, n = N, window = WINDOW, failed = failed,
  seconds = t1 - t0,
  msgs_per_s = N / (t1 - t0),
  cpu_us_per_msg = (cpu1 - cpu0) / N * 1e6,
  prosody_cpu_us_per_msg = pcpu0 and (pcpu1 - pcpu0) / N * 1e6 or -1,
  peak_rss_kib = common.status_kib("VmHWM"),
}
common.latencies(r, "ack", lat_ack)
common.latencies(r, "arrival", lat_arr)
common.result(r)

sender:close(2)
if receiver ~= sender then receiver:close(2) end
wait_for(function() return sender:status() == "closed" and receiver:status() == "closed" end, 10,
         "the clients to close")
