--- Micro-benchmarks of the outcome path, in one process, no network (BENCHMARKS.md, "Outcomes
-- without pinned stanzas"):
--
--    lua5.4 bench/outcome_micro.lua parse [N]       stanza.parse of a small message, then its body
--    lua5.4 bench/outcome_micro.lua ack [N] [read]  N forgotten stanzas acknowledged by one h, an
--                                                   `ack` handler counting (and reading the body)
--
-- Prints CPU microseconds per stanza. The ack case drives xmppsm.sm on a stand-in client, as
-- spec/sm_callbacks_spec.lua does.
package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
package.cpath = "./?.so;" .. package.cpath
local stanza = require "xmppsm.stanza"

local mode, N, read = arg[1], tonumber(arg[2] or 100000), arg[3] == "read"
local function message(i)
  return stanza.message({ to = "bob@example.com/res", type = "chat" }, "message number " .. i)
end

if mode == "parse" then
  local raw = tostring(message(1))
  local t0 = os.clock()
  for _ = 1, N do stanza.parse(raw):get_child_text("body") end
  print(string.format("stanza.parse + get_child_text, %d bytes: %.2f us", #raw, (os.clock() - t0) / N * 1e6))
elseif mode == "ack" then
  local sm = require "xmppsm.sm"
  local events = require("xmppsm.events").new()
  local client = { state = "online", bare_jid = "a@b", events = events, _log = function() end,
                   conn = { send_raw = function() end }, iq = { fail_all = function() end } }
  local s = sm.new(client, { store = false, max_queue = N + 1, max_queue_bytes = 1e9 }, nil)
  s.enabled, s.live, s.r_outstanding = true, true, true -- online, no <r/> timers
  s.queue:set_counter(0)
  local acked, bodies = 0, 0
  events:add("ack", function(st)
    acked = acked + 1
    if read and st:get_child_text("body") then bodies = bodies + 1 end
  end)
  for i = 1, N do assert(s:send(message(i))) end
  collectgarbage()
  collectgarbage() -- the program keeps none of them
  local t0 = os.clock()
  assert(s:_handle_h(tostring(N), "<a/>"))
  local t = os.clock() - t0
  assert(acked == N and bodies == (read and N or 0))
  print(string.format("ack event, %d forgotten stanzas%s: %.2f us each", N,
                      read and ", the handler reads the body" or "", t / N * 1e6))
else
  error("usage: lua5.4 bench/outcome_micro.lua parse|ack [N] [read]")
end
