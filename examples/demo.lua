-- `make demo`: alice sends a stream of messages to bob through a link that breaks several
-- times, and every message still arrives exactly once, or is reported failed.
--
--   lua5.4 examples/demo.lua            (what `make demo` runs, after building)
--
-- It starts a throwaway Prosody on 127.0.0.1 and a fault-injecting TCP proxy between alice and
-- the server (bob is connected directly), then, while alice sends, the proxy: resets the
-- connection; cuts it in the middle of a stanza; goes silent (a dead link that only the ack
-- timeout can notice); and finally refuses connections for longer than the server keeps a
-- broken session, so resumption fails and a new session takes over. At the end it counts:
-- a message neither received by bob nor reported failed is lost, and any loss (or a duplicate
-- the policy does not allow, or a message without exactly one outcome) makes the exit status 1.
--
-- Required as a module (by spec/examples_spec.lua) it returns the accounting function.

local demo = {}

--- Counts the outcome of a run. `r` holds, per message number: `sent[i]` (send() accepted it),
-- `acked[i]`, `failed[i]` (outcome events seen), `received[i]` (copies bob got) and `writes[i]`
-- (times its bytes were written); plus `count` (messages planned) and `duplicates_allowed`
-- (true only when a session was lost and the leftovers policy is "resend": then a message the
-- old session handled without acknowledging may arrive twice, as documented).
-- Returns the totals and `problems`, a list of sentences; empty means the run kept its promise.
function demo.tally(r)
  local t = { sent = 0, acked = 0, failed = 0, resent = 0, received = 0, duplicates = 0, lost = 0,
              lost_ids = {}, problems = {} }
  local no_outcome, two_outcomes, unexpected = {}, {}, {}
  for i = 1, r.count do
    local got = r.received[i] or 0
    if r.sent[i] then
      t.sent = t.sent + 1
      local a, f = r.acked[i] or 0, r.failed[i] or 0
      if a > 0 then t.acked = t.acked + 1 end
      if f > 0 then t.failed = t.failed + 1 end
      if a + f == 0 then no_outcome[#no_outcome + 1] = i end
      if a + f > 1 then two_outcomes[#two_outcomes + 1] = i end
      t.resent = t.resent + math.max(0, (r.writes[i] or 0) - 1)
      if got > 0 then t.received = t.received + 1 end
      if got > 1 then t.duplicates = t.duplicates + got - 1 end
      if got == 0 and f == 0 then
        t.lost = t.lost + 1
        t.lost_ids[#t.lost_ids + 1] = i
      end
    elseif got > 0 then
      unexpected[#unexpected + 1] = i
    end
  end
  local function ids(list)
    local shown = {}
    for k = 1, math.min(#list, 10) do shown[k] = tostring(list[k]) end
    return table.concat(shown, ", ") .. (#list > 10 and ", ..." or "")
  end
  local p = t.problems
  if t.lost > 0 then p[#p + 1] = t.lost .. " lost (neither received nor failed): " .. ids(t.lost_ids) end
  if #no_outcome > 0 then p[#p + 1] = #no_outcome .. " without an outcome: " .. ids(no_outcome) end
  if #two_outcomes > 0 then
    p[#p + 1] = #two_outcomes .. " with more than one outcome: " .. ids(two_outcomes)
  end
  if #unexpected > 0 then p[#p + 1] = #unexpected .. " received but never sent: " .. ids(unexpected) end
  if t.duplicates > 0 and not r.duplicates_allowed then
    p[#p + 1] = t.duplicates .. " duplicates, though no session was lost"
  end
  return t
end

-- As a module (`require "examples.demo"`), only the accounting; as a script, the demo. When
-- run as a script the chunk's arguments are the command line's, never a module name.
if (...) == "examples.demo" or (...) == "demo" then return demo end

package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local harness = require "demo_server"

local COUNT = 300            -- messages alice sends
local RATE = 20              -- per second: 15 s of sending
local HIBERNATION = 3        -- seconds Prosody keeps a broken session for resumption
local OUTAGE = 5             -- the last fault refuses connections this long: > HIBERNATION
local SETTLE_TIMEOUT = 15    -- after the last send and the outage, the longest wait for every outcome
local BOB_GRACE = 3          -- after the last outcome, the longest wait for bob's copies

harness.main(function()
  local xmppsm = require "xmppsm"
  local core = require "xmppsm.core"
  local tty = harness.stdout_is_tty()
  io.stdout:setvbuf("line")

  print(("xmppsm demo: alice sends %d messages to bob over a link that breaks 4 times."):format(COUNT))
  local env = harness.start{ hibernation = HIBERNATION, proxy = true }
  local server, proxy = env.server, env.proxy
  print(("Prosody on 127.0.0.1:%d (pid %d), config, data and a throwaway CA in %s")
        :format(server.port, server.process.pid, server.dir))
  print(("fault proxy on 127.0.0.1:%d (pid %d) between alice and the server; bob is connected directly")
        :format(proxy.port, proxy.pid))
  print(("Prosody keeps a broken session %d s for resumption; alice's ack timeout is 2 s.\n")
        :format(HIBERNATION))

  local t0 = core.monotime()
  local progress_shown = false
  local function clear_progress()
    if progress_shown then io.stdout:write("\r\27[K") progress_shown = false end
  end
  local function say(fmt, ...)
    clear_progress()
    print(("%6.2f s  " .. fmt):format(core.monotime() - t0, ...))
  end

  local r = { count = COUNT, sent = {}, acked = {}, failed = {}, received = {}, writes = {},
              duplicates_allowed = false }
  local function plural(n, word)
    return n .. " " .. word .. (n == 1 and "" or "s")
  end
  local function index_of(st)
    return tonumber((st:get_child_text("body") or ""):match("^demo message (%d+)$"))
  end

  local function new_client(name, port, sm)
    local c = xmppsm.client{
      jid = env.jid(name), password = env.users[name], host = "127.0.0.1", port = port,
      cafile = server.cafile, connect_timeout = 3, reconnect_delay = 0.3, reconnect_max_delay = 1,
      logger = function() end,   -- the demo prints what happens itself
      sm = sm,
    }
    harness.watch_client(c)
    return c
  end

  -- bob: directly connected, counts every copy of every message.
  local bob = new_client("bob", server.port, { store = false })
  local bob_got = 0
  bob:on("message", function(m)
    local i = index_of(m)
    if i then
      r.received[i] = (r.received[i] or 0) + 1
      bob_got = bob_got + 1
      if r.received[i] > 1 then say("bob got message %d a second time", i) end
    end
  end)

  -- alice: through the proxy; a short ack timeout so the silent link is noticed within 2 s.
  local alice = new_client("alice", proxy.port, { store = false, ack_timeout = 2, ack_interval = 1,
                                                  leftovers = "resend" })
  local sessions, last_error, fault = 0, nil, nil
  local writes_at_cut = 0
  local total_writes, first_writes = 0, 0
  alice:on("rawOut", function(raw)
    local i = tonumber(raw:match("^<message.-<body>demo message (%d+)</body>"))
    if i then
      r.writes[i] = (r.writes[i] or 0) + 1
      total_writes = total_writes + 1
      if r.writes[i] == 1 then first_writes = first_writes + 1 end
    end
  end)
  local function resent_since_cut()
    return (total_writes - first_writes) - writes_at_cut
  end
  alice:on("ackedStanza", function(st)
    local i = index_of(st)
    if i then r.acked[i] = (r.acked[i] or 0) + 1 end
  end)
  alice:on("fail", function(st, err)
    local i = index_of(st)
    if i then
      r.failed[i] = (r.failed[i] or 0) + 1
      say("message %d failed: %s", i, tostring(err))
    end
  end)
  alice:on("error", function(err) last_error = err end)
  alice:on("smEnabled", function(info)
    if sessions == 0 then
      say("alice: Stream Management enabled, %s", info.resume and "resumable" or "NOT resumable")
    end
  end)
  -- `up`: alice had a working session, so a `disconnected` is a cut, not a failed attempt.
  local up, closing = false, false
  alice:on("online", function(jid)
    up = true
    sessions = sessions + 1
    if sessions == 1 then
      say("alice online as %s, through the fault proxy", jid)
    else
      say("alice online in a NEW session as %s; re-sent the %s the old session left " ..
          "unacknowledged (leftovers = \"resend\")", jid, plural(resent_since_cut(), "message"))
    end
  end)
  alice:on("disconnected", function(err)
    if closing then return end
    if up then
      up = false
      writes_at_cut = total_writes - first_writes
      local state = alice:sm_state()
      say("alice lost the connection (%s); %d unacknowledged, kept for resumption",
          err and err.text or "closed", state and state.unacked or 0)
    end
    if fault and fault.on_disconnect then
      -- Runs before alice's immediate retry (a timer, so a later loop step), and each proxy
      -- command returns only once the proxy has obeyed.
      fault.on_disconnect()
      fault.on_disconnect = nil
    end
  end)
  alice:on("reconnecting", function(info)
    if info.delay > 0 then
      say("alice cannot connect (%s); retry %d in %.1f s",
          last_error and last_error.text or "?", info.attempt, info.delay)
    end
  end)
  alice:on("resumed", function()
    up = true
    say("alice RESUMED the session: re-sent %s; the server's count (h) says it has the rest",
        plural(resent_since_cut(), "unacknowledged message"))
  end)
  alice:on("resumeFailed", function(err)
    r.duplicates_allowed = true   -- leftovers = "resend" after a lost session (README)
    say("alice could not resume: %s (the server dropped the session after %d s)", err.condition, HIBERNATION)
  end)

  bob:connect()
  alice:connect()
  local deadline = core.monotime() + 15
  while not (alice:status() == "online" and bob:status() == "online") do
    if core.monotime() > deadline then
      harness.fail("alice or bob did not get online: " .. tostring(last_error))
    end
    xmppsm.step(0.05)
    harness.check_interrupt()
  end

  -- The faults, each just before message number `at` is sent (so the bytes that follow the
  -- fault are a message), and only while alice is online; otherwise the next send tries again.
  local faults = {
    { at = 50, title = "the proxy resets the connection (TCP RST)",
      run = function() proxy:cut("rst") end },
    { at = 110, title = "the proxy passes 40 bytes of the next message, then resets: a stanza cut " ..
                        "in half",
      run = function() proxy:cut_after(40, "c2s") end,
      -- cut_after stays armed for new connections: back to normal before alice reconnects
      on_disconnect = function() proxy:resume() end },
    { at = 170, title = "the link goes silent: no data, no FIN, no RST; only the ack timeout can tell",
      run = function() proxy:silence() end,
      -- what was written into the dead link is gone, as on a real one
      on_disconnect = function() proxy:cut("rst") proxy:resume() end },
    { at = 230, title = ("the link goes silent; 1 s later it is reset and connections are refused for " ..
                         "%d s, longer than the server keeps the session (%d s)"):format(OUTAGE, HIBERNATION),
      run = function()
        proxy:silence()
        xmppsm.after(1, function()
          proxy:refuse(0)       -- until resume(), which also ends the silence
          proxy:cut("rst")
          xmppsm.after(OUTAGE, function() proxy:resume() end)
        end)
      end },
  }
  local sent, next_fault = 0, 1
  local send_start = core.monotime()
  local sender = xmppsm.every(1 / RATE, function()
    if sent >= COUNT then return end
    local f = faults[next_fault]
    if f and sent + 1 >= f.at and up then
      fault = f
      say("FAULT %d/%d: %s", next_fault, #faults, f.title)
      f.run()
      next_fault = next_fault + 1
    end
    sent = sent + 1
    local ok, err = alice:send(xmppsm.stanza.message({ to = env.jid("bob"), type = "chat" },
                                                     "demo message " .. sent))
    if ok then r.sent[sent] = true else say("send(%d) refused: %s", sent, tostring(err)) end
  end)

  local function progress_line()
    local acked = 0
    for _ in pairs(r.acked) do acked = acked + 1 end
    local state = alice:sm_state()
    return ("%6.2f s  sent %d/%d  acknowledged %d  unacknowledged %d  bob has %d")
      :format(core.monotime() - t0, sent, COUNT, acked, state and state.unacked or 0, bob_got), acked
  end

  local settled_since, last_progress = nil, 0
  while true do
    xmppsm.step(0.05)
    harness.check_interrupt()
    local now = core.monotime()
    local line, acked = progress_line()
    if tty and now - last_progress >= 0.1 then
      clear_progress()
      io.stdout:write(line)
      io.stdout:flush()
      progress_shown, last_progress = true, now
    elseif not tty and now - last_progress >= 2 then
      print(line)
      last_progress = now
    end
    -- Done once everything sent has its outcome and bob has every acknowledged message, plus
    -- half a second in which a late duplicate would still be counted. An acknowledged message
    -- bob still lacks BOB_GRACE seconds after the last outcome is not coming.
    local failed = 0
    for _ in pairs(r.failed) do failed = failed + 1 end
    local received = 0
    for _ in pairs(r.received) do received = received + 1 end
    if sent == COUNT and next_fault > #faults and acked + failed >= COUNT then
      settled_since = settled_since or now
      if received >= acked and now - settled_since >= 0.5 then break end
      if now - settled_since >= BOB_GRACE then
        say("bob still lacks acknowledged messages %.0f s after the last outcome", BOB_GRACE)
        break
      end
    else
      settled_since = nil
    end
    if sent == COUNT and now - send_start > COUNT / RATE + OUTAGE + SETTLE_TIMEOUT then
      say("gave up waiting for every outcome")
      break
    end
  end
  sender:cancel()
  clear_progress()
  print((progress_line()))

  closing = true
  alice:close(2)
  bob:close(2)
  local close_deadline = core.monotime() + 5
  while (alice:status() ~= "closed" or bob:status() ~= "closed") and core.monotime() < close_deadline do
    xmppsm.step(0.05)
    harness.check_interrupt()
  end

  local state = alice:sm_state() or {}
  local t = demo.tally(r)
  local elapsed = core.monotime() - t0
  print("")
  print("Summary")
  print(("  sent          %4d  (accepted by client:send)"):format(t.sent))
  print(("  acknowledged  %4d  (the server confirmed it has them)"):format(t.acked))
  print(("  re-sent       %4d  (written again after a cut: the server had not acknowledged them)")
        :format(t.resent))
  print(("  failed        %4d  (reported through the fail event)"):format(t.failed))
  print(("  received      %4d  (unique, by bob)"):format(t.received))
  print(("  duplicates    %4d"):format(t.duplicates))
  print(("  lost          %4d  (neither received nor reported failed)"):format(t.lost))
  print(("  time        %6.1f s  (%d faults: %d resumed, %d resumption failed, %d sessions in all)")
        :format(elapsed, #faults, state.resumes or 0, state.resume_failures or 0, sessions))
  if #t.problems == 0 then
    print(("OK: nothing lost. %d acknowledged, %d reported failed; bob got %d, %s.")
          :format(t.acked, t.failed, t.received,
                  t.duplicates == 0 and "each exactly once" or t.duplicates .. " of them twice (allowed " ..
                  "after a lost session with leftovers = \"resend\")"))
    return 0
  end
  for _, p in ipairs(t.problems) do print("PROBLEM: " .. p) end
  return 1
end)
