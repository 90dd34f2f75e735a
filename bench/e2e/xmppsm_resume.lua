-- Resumption speed of xmppsm: the link is cut `cuts` times by the fault proxy (a reset), each
-- time with one message sent and not yet acknowledged (the proxy holds it, silent, then cuts).
-- Measured per cut: from the cut being noticed (`disconnected`) to `resumed`, and from the cut
-- to the held message, re-sent after the resumption, being acknowledged. Prints RESULT lines.
--
--   lua5.4 bench/e2e/xmppsm_resume.lua host=127.0.0.1 port=5222 domain=d cafile=ca.pem cuts=20 dir=D
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;bench/?.lua;" .. package.path
package.cpath = "./?.so;" .. package.cpath

local xmppsm = require "xmppsm"
local core = require "xmppsm.core"
local loop = require "xmppsm.loop"
local proxy_helper = require "helpers.proxy"
local common = require "e2e.common"

local a = common.args(arg)
local now = core.monotime
local CUTS = a.cuts or 20

local proxy = proxy_helper.start{ target_port = a.port }

local client = xmppsm.client{
  jid = "alice@" .. a.domain .. "/resume", password = "pw-alice",
  host = "127.0.0.1", port = proxy.port, cafile = a.cafile, presence = false,
  sm = { store = a.dir .. "/alice.sm" },
  logger = function(level, msg) if level == "error" then io.stderr:write(msg, "\n") end end,
}

local noticed, resumed_at
client:on("disconnected", function() noticed = noticed or now() end)
client:on("resumed", function() resumed_at = resumed_at or now() end)
local resumes, new_sessions = 0, 0
client:on("resumed", function() resumes = resumes + 1 end)
client:on("online", function() new_sessions = new_sessions + 1 end)

local wait_for = common.wait_for

client:connect()
wait_for(function() return client:status() == "online" end, 30, "online")
local mechanism = "?"
do
  local st = client:sm_state()
  assert(st.enabled and st.resumable, "stream management is not resumable")
end

local to_resumed, to_acked = {}, {}
for i = 1, CUTS do
  wait_for(function() return client:sm_state().unacked == 0 end, 10, "the queue to drain")
  noticed, resumed_at = nil, nil
  proxy:silence()
  local acked_at
  client:send(xmppsm.stanza.message({ to = "alice@" .. a.domain .. "/resume", type = "chat" }, "r" .. i),
              function(ok) if ok then acked_at = now() end end)
  -- Let the loop write it (and the <r/>) into the silent proxy.
  local t = now() + 0.02
  while now() < t do loop.step(0.005) end
  local cut_at = now()
  proxy:cut("rst")
  proxy:resume()
  wait_for(function() return acked_at ~= nil and resumed_at ~= nil end, 30, "resumption " .. i)
  to_resumed[#to_resumed + 1] = resumed_at - noticed
  to_acked[#to_acked + 1] = acked_at - cut_at
  io.stderr:write(string.format("cut %d: noticed->resumed %.2f ms, cut->acked %.2f ms\n", i,
                                (resumed_at - noticed) * 1000, (acked_at - cut_at) * 1000))
end

local r = { impl = "xmppsm", cuts = CUTS, resumes = resumes, new_sessions = new_sessions - 1,
            mechanism = mechanism }
common.latencies(r, "resumed", to_resumed)
common.latencies(r, "acked", to_acked)
common.result(r)

client:close(2)
wait_for(function() return client:status() == "closed" end, 10, "close")
proxy:stop()
