--- Renders the client benchmark's results as one table (plain text, Markdown-compatible).
-- Each row: the figure, xmppsm's value, the peer it is compared with and the peer's value, the
-- ratio xmppsm / peer, the target, and PASS or MISS (a dash where there is no target).
-- Figures of repeated rounds are medians.
-- @module e2e.report
local report = {}

local function median(list)
  if not list or #list == 0 then return nil end
  local s = table.move(list, 1, #list, 1, {})
  table.sort(s)
  local n = #s
  if n % 2 == 1 then return s[(n + 1) // 2] end
  return (s[n // 2] + s[n // 2 + 1]) / 2
end
report.median = median

-- Median of field `key` over the runs of one implementation and workload.
local function field(runs, key)
  if not runs then return nil end
  local list = {}
  for _, r in ipairs(runs) do
    if type(r[key]) == "number" then list[#list + 1] = r[key] end
  end
  return median(list)
end
report.field = field

local function fmt(v, unit)
  if v == nil then return "n/a" end
  if type(v) == "string" then return v end
  local s
  local a = math.abs(v)
  if a >= 1000 then s = string.format("%.0f", v)
  elseif a >= 100 then s = string.format("%.0f", v)
  elseif a >= 10 then s = string.format("%.1f", v)
  elseif a >= 1 then s = string.format("%.2f", v)
  else s = string.format("%.3f", v) end
  return unit and (s .. " " .. unit) or s
end
report.fmt = fmt

local Table = {}
Table.__index = Table

local function new_table()
  return setmetatable({ rows = {} }, Table)
end

function Table:section(title)
  self.rows[#self.rows + 1] = { section = title }
end

-- ok: true (PASS), false (MISS), nil (no target)
function Table:row(figure, ours, unit, peer, peer_value, ratio, target, ok)
  self.rows[#self.rows + 1] = {
    figure, fmt(ours, unit), peer or "", peer_value ~= nil and fmt(peer_value, unit) or "",
    ratio ~= nil and string.format("%.2f", ratio) or "", target or "",
    ok == nil and "-" or (ok and "PASS" or "MISS"),
  }
end

function Table:note(text)
  self.rows[#self.rows + 1] = { note = text }
end

function Table:render()
  local header = { "figure", "xmppsm", "peer", "peer value", "ratio", "target", "result" }
  local widths = {}
  for i, h in ipairs(header) do widths[i] = #h end
  for _, r in ipairs(self.rows) do
    if r.section then widths[1] = math.max(widths[1], #r.section + 4)
    elseif r.note then widths[1] = math.max(widths[1], #r.note + 2)
    else
      for i = 1, #header do widths[i] = math.max(widths[i], #r[i]) end
    end
  end
  local function line(cells)
    local parts = {}
    for i = 1, #header do
      local c = cells[i]
      parts[i] = c .. string.rep(" ", widths[i] - #c)
    end
    return "| " .. table.concat(parts, " | ") .. " |"
  end
  local out = { line(header) }
  local sep = {}
  for i = 1, #header do sep[i] = string.rep("-", widths[i]) end
  out[#out + 1] = line(sep)
  for _, r in ipairs(self.rows) do
    if r.section then
      local cells = { "**" .. r.section .. "**" }
      for i = 2, #header do cells[i] = "" end
      out[#out + 1] = line(cells)
    elseif r.note then
      local cells = { "_" .. r.note .. "_" }
      for i = 2, #header do cells[i] = "" end
      out[#out + 1] = line(cells)
    else
      out[#out + 1] = line(r)
    end
  end
  return table.concat(out, "\n") .. "\n"
end

local function ratio(a, b)
  if a == nil or b == nil or b == 0 then return nil end
  return a / b
end

local function e2e_rows(t, e)
  local quarter_ok = true
  for _, to in ipairs({ "self", "other" }) do
    local ours, js, floor = e.runs["xmppsm/" .. to], e.runs["xmppjs/" .. to], e.runs["floor/" .. to]
    local label = to == "self" and "to itself" or "to a second account"
    t:section(string.format("End to end, %s messages %s", fmt(field(ours, "n") or 0), label))
    local f = field
    local o_rate, j_rate = f(ours, "msgs_per_s"), f(js, "msgs_per_s")
    t:row("messages per second", o_rate, "msg/s", "xmpp.js", j_rate, ratio(o_rate, j_rate))
    t:row("messages per second", o_rate, "msg/s", "floor", f(floor, "msgs_per_s"),
          ratio(o_rate, f(floor, "msgs_per_s")))
    local o_cpu, j_cpu = f(ours, "cpu_us_per_msg"), f(js, "cpu_us_per_msg")
    local fl_cpu = f(floor, "cpu_us_per_msg")
    local r = ratio(o_cpu, j_cpu)
    t:row("client CPU per message", o_cpu, "us", "xmpp.js", j_cpu, r, "<= 0.20", r and r <= 0.2)
    r = ratio(o_cpu, fl_cpu)
    t:row("client CPU per message", o_cpu, "us", "floor", fl_cpu, r, "<= 2.5", r and r <= 2.5)
    local mem = e.runs["xmppsm_mem/" .. to]
    if mem then
      local label_mem = "client CPU per message, no store (as the peers)"
      local m_cpu = f(mem, "cpu_us_per_msg")
      r = ratio(m_cpu, j_cpu)
      t:row(label_mem, m_cpu, "us", "xmpp.js", j_cpu, r, "<= 0.20", r and r <= 0.2)
      r = ratio(m_cpu, fl_cpu)
      t:row(label_mem, m_cpu, "us", "floor", fl_cpu, r, "<= 2.5", r and r <= 2.5)
    end
    local o_mem, j_mem = f(ours, "peak_rss_kib"), f(js, "peak_rss_kib")
    r = ratio(o_mem, j_mem)
    t:row("client peak memory (VmHWM)", o_mem and o_mem / 1024, "MiB", "xmpp.js", j_mem and j_mem / 1024,
          r, "<= 0.20", r and r <= 0.2)
    local fl_mem = f(floor, "peak_rss_kib")
    t:row("client peak memory (VmHWM)", o_mem and o_mem / 1024, "MiB", "floor",
          fl_mem and fl_mem / 1024, ratio(o_mem, fl_mem))
    local p_cpu = f(ours, "prosody_cpu_us_per_msg")
    r = ratio(o_cpu, p_cpu)
    t:row("client CPU / Prosody CPU, same run", o_cpu, "us", "Prosody", p_cpu, r, "< 0.25", r and r < 0.25)
    if r and r >= 0.25 then quarter_ok = false end
    t:row("Prosody CPU per message", p_cpu, "us", "Prosody (xmpp.js run)", f(js, "prosody_cpu_us_per_msg"),
          ratio(p_cpu, f(js, "prosody_cpu_us_per_msg")))
    for _, k in ipairs({ { "ack_p50_ms", "send -> ack, median" }, { "ack_p99_ms", "send -> ack, 99th pct" },
                         { "arrival_p50_ms", "send -> arrival, median" },
                         { "arrival_p99_ms", "send -> arrival, 99th pct" } }) do
      local ov, jv = f(ours, k[1]), f(js, k[1])
      r = ratio(ov, jv)
      t:row(k[2], ov, "ms", "xmpp.js", jv, r, "<= 1", r and r <= 1)
      t:row(k[2], ov, "ms", "floor", f(floor, k[1]), ratio(ov, f(floor, k[1])))
    end
  end
  if e.instructions then
    t:section("Instructions per message (callgrind, to itself, client only)")
    local o, fl = e.instructions.xmppsm, e.instructions.floor
    local r = ratio(o, fl)
    t:row("instructions per message", o, "", "floor", fl, r, "<= 2.5", r and r <= 2.5)
    local m = e.instructions.xmppsm_mem
    r = ratio(m, fl)
    if m then t:row("instructions per message, no store", m, "", "floor", fl, r, "<= 2.5", r and r <= 2.5) end
  end
  return quarter_ok
end

local function resume_rows(t, res)
  local ours, js0, jsd = res.runs.xmppsm, res.runs.xmppjs_0, res.runs.xmppjs_default
  if not (ours or js0) then return end
  t:section("Resumption after a cut (fault proxy, TLS + SCRAM + <resume/>)")
  local f = field
  local measures = { { "resumed", "cut noticed -> resumed" }, { "acked", "cut -> re-sent stanza acked" } }
  for _, m in ipairs(measures) do
    local p50, p99, label = m[1] .. "_p50_ms", m[1] .. "_p99_ms", m[2]
    local o = f(ours, p50)
    if m[1] == "resumed" then t:row(label .. ", median", o, "ms", nil, nil, nil, "< 15 ms", o and o < 15) end
    local r = ratio(o, f(js0, p50))
    t:row(label .. ", median", o, "ms", "xmpp.js delay 0", f(js0, p50), r, "<= 1", r and r <= 1)
    t:row(label .. ", 99th pct", f(ours, p99), "ms", "xmpp.js delay 0", f(js0, p99),
          ratio(f(ours, p99), f(js0, p99)))
    r = ratio(o, f(jsd, p50))
    t:row(label .. ", median", o, "ms", "xmpp.js default", f(jsd, p50), r, "far below (<= 0.1)",
          r and r <= 0.1)
  end
  local function counts(runs)
    local n = f(runs, "resumes")
    if not n then return nil end
    local s = string.format("%d/%d", n, f(runs, "cuts") or 0)
    if f(runs, "new_sessions") then s = s .. string.format(" (%d new)", f(runs, "new_sessions")) end
    return s
  end
  t:row("resumed / cuts", counts(ours), nil, "xmpp.js delay 0", counts(js0))
end

local function queue_rows(t, q)
  local any = false
  for _, r in ipairs(q.rows) do
    if r.kind == "queue" then
      if not any then
        t:section("Unacknowledged stanzas: Lua heap per stanza (the program keeps no reference)")
        any = true
      end
      local label = string.format("%d x %d B queued%s", r.count, math.floor(r.size + 0.5),
                                  r.callbacks == "true" and ", each with a callback" or "")
      t:row(label, r.heap_per_stanza, "B", "serialized size", r.size, ratio(r.heap_per_stanza, r.size),
            "<= size + 256 B", r.overhead_per_stanza <= 256)
    end
  end
  local first = true
  for _, r in ipairs(q.rows) do
    if r.kind == "queue" and r.count >= 100000 and r.callbacks ~= "true" then
      if first then t:section("Acknowledging and re-sending, per stanza (CPU, client)") first = false end
      local sz = math.floor(r.size + 0.5)
      t:row(string.format("one <a/> for %d x %d B", r.count, sz), r.ack_us, "us")
      t:row(string.format("re-send %d x %d B after a resume", r.count, sz), r.resend_us, "us")
    end
  end
  first = true
  for _, r in ipairs(q.rows) do
    if r.kind == "persist" then
      if first then t:section("Persisting, per stanza (store durability modes)") first = false end
      t:row(string.format("client:send(), durability %s (CPU / wall)", r.durability),
            string.format("%s / %s us", fmt(r.send_us), fmt(r.send_wall_us)))
      t:row(string.format("Store:queued(), durability %s (CPU / wall)", r.durability),
            string.format("%s / %s us", fmt(r.queued_us), fmt(r.queued_wall_us)))
    end
  end
end

local function scale_rows(t, sc)
  local levels = {}
  for n in pairs(sc.runs) do levels[#levels + 1] = n end
  table.sort(levels)
  if #levels == 0 then return end
  t:section("Scale in one process: a message a second per session")
  local base = sc.runs[levels[1]]
  for _, n in ipairs(levels) do
    local r = sc.runs[n]
    local label = string.format("%d sessions", n)
    t:row(label .. ": sent / acked / arrived / lost",
          string.format("%d / %d / %d / %d", r.sent, r.acked, r.arrived, r.lost), nil, nil, nil, nil,
          "none lost", r.lost == 0 and r.unacked == 0)
    local rc = ratio(r.cpu_us_per_msg, base.cpu_us_per_msg)
    t:row(label .. ": client CPU per message", r.cpu_us_per_msg, "us",
          string.format("%d sessions", levels[1]), base.cpu_us_per_msg, rc, "flat (<= 1.25)",
          rc and rc <= 1.25)
    t:row(label .. ": Prosody CPU per message", r.prosody_cpu_us_per_msg, "us")
    local rm = ratio(r.heap_kib_per_session, base.heap_kib_per_session)
    t:row(label .. ": Lua heap per session", r.heap_kib_per_session, "KiB",
          string.format("%d sessions", levels[1]), base.heap_kib_per_session, rm, "flat (<= 1.25)",
          rm and rm <= 1.25)
    t:row(label .. ": resident memory per session", r.rss_kib_per_session, "KiB",
          string.format("%d sessions", levels[1]), base.rss_kib_per_session,
          ratio(r.rss_kib_per_session, base.rss_kib_per_session))
    t:row(label .. ": time to log every session in", r.connect_seconds, "s", "Prosody CPU for it",
          r.connect_prosody_cpu)
  end
end

--- The whole report: a header (machine, versions, settings) and the table.
function report.render(results)
  local m, c = results.machine, results.cfg
  local head = {
    "xmppsm client benchmarks (bench/client_run.lua)",
    string.format("machine: %s, %s cores, %s GiB, Linux %s; load before %s, after %s",
                  m.cpu, m.cores, m.mem_gib, m.kernel, m.load_before or "?", m.load_after or "?"),
    string.format("versions: %s; %s; %s; node %s; %s", m.lua, m.prosody, m.openssl, m.node, m.xmppjs),
    string.format("settings: %d messages, window %d, %d round(s) (medians), %d cuts, "
                  .. "scale %s sessions x %d s%s; took %d s",
                  c.messages, c.window, c.rounds, c.cuts, c.scale_sessions, c.scale_seconds,
                  c.quick and " (BENCH_QUICK)" or "", results.seconds or 0),
    "",
  }
  local t = new_table()
  if results.e2e then e2e_rows(t, results.e2e) end
  if results.resume then resume_rows(t, results.resume) end
  if results.queue then queue_rows(t, results.queue) end
  if results.scale then scale_rows(t, results.scale) end
  if report.extra then
    for _, fn in ipairs(report.extra) do fn(t, results) end
  end
  return table.concat(head, "\n") .. "\n" .. t:render()
end

report.new_table = new_table
report.ratio = ratio
report.extra = {}

return report
