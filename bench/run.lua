--- `make bench`: framing, serialization and memory of xmppsm's core against libexpat and Prosody.
--
-- Run from the top of the checkout after `make -C bench` (`make bench` does both). Every
-- measurement runs in a child process (bench/worker.lua, build/bench/expat_floor) so that no
-- contender inherits another's heap; the contenders take turns, round after round, and each
-- figure is the median of all timed passes. Knobs (environment): BENCH_REPS (rounds, i.e. child
-- processes per figure; default 3), BENCH_PASSES (timed passes per child, after one warm-up pass;
-- default 2), BENCH_CALLGRIND=0 to skip the instruction counts. The report also goes to
-- build/bench/report.txt, and every timed pass to build/bench/passes.tsv (for a second look at
-- a noisy run). BENCHMARKS.md says how to read it.

package.path = "lua/?.lua;lua/?/init.lua;bench/?.lua;" .. package.path
package.cpath = "./?.so;" .. package.cpath

local concat, fmt = table.concat, string.format

local REPS = tonumber(os.getenv("BENCH_REPS") or "") or 3
local PASSES = tonumber(os.getenv("BENCH_PASSES") or "") or 2
local CALLGRIND = os.getenv("BENCH_CALLGRIND") ~= "0"
  and os.execute("command -v valgrind >/dev/null 2>&1") == true
local LUA = os.getenv("LUA") or "lua5.4"
local OUT = "build/bench"
local FLOOR = OUT .. "/expat_floor"
local KINDS = { "ibb", "vcard", "text", "roster" }
local MEM_CHUNK = 16384
local MEM_SMALL, MEM_BIG = 10, 100

local report = {}
local function say(...)
  local line = fmt(...)
  io.write(line, "\n")
  io.flush()
  report[#report + 1] = line
end

local t_start = os.time()
local function progress(...)
  io.stderr:write(fmt("  [%3d s] ", os.time() - t_start), fmt(...), "\n")
end

local function sh(cmd)
  local f = assert(io.popen(cmd))
  local out = f:read("a")
  local ok, _, code = f:close()
  if not ok then error(fmt("command failed (%s): %s\n%s", tostring(code), cmd, out), 0) end
  return out
end

local function first_line(path, pattern)
  local f = io.open(path)
  if not f then return nil end
  for line in f:lines() do
    local m = line:match(pattern)
    if m then
      f:close()
      return m
    end
  end
  f:close()
  return nil
end

local function file_size(path)
  local f = assert(io.open(path, "rb"), "missing " .. path .. ": run `make -C bench` first")
  local n = f:seek("end")
  f:close()
  return n
end

local function median(t)
  local s = { table.unpack(t) }
  table.sort(s)
  local n = #s
  if n == 0 then return nil end
  if n % 2 == 1 then return s[(n + 1) // 2] end
  return (s[n // 2] + s[n // 2 + 1]) / 2
end

-- (max - min) / median, in percent: how noisy a figure was.
local function spread(t)
  local lo, hi = math.huge, -math.huge
  for _, v in ipairs(t) do
    lo, hi = math.min(lo, v), math.max(hi, v)
  end
  return 100 * (hi - lo) / median(t)
end

local function group(n)
  local s = fmt("%d", math.floor(n + 0.5))
  local out = s:reverse():gsub("(%d%d%d)", "%1,"):reverse()
  return (out:gsub("^,", ""):gsub("^%-,", "-"))
end

local function ratio(x) return x and fmt("%.2fx", x) or "n/a" end
local function pct(x) return x and fmt("%.0f%%", 100 * x) or "n/a" end
local function kib(c) return (c // 1024) .. " KiB" end

-- ---- what is there ---------------------------------------------------------------------------

local have_parser, have_serialize = false, false
do
  local ok, core = pcall(require, "xmppsm.core")
  if ok then
    have_parser = type(core.parser) == "function"
    have_serialize = type(core.serialize) == "function"
  end
end

local function facts()
  local cpu = first_line("/proc/cpuinfo", "^model name%s*:%s*(.-)%s*$") or "unknown CPU"
  local cores = tonumber((sh("nproc 2>/dev/null"):match("%d+"))) or 0
  local kernel = (sh("uname -sr 2>/dev/null"):gsub("%s+$", ""))
  local expat = (sh(FLOOR .. " --version"):gsub("%s+$", ""))
  local lua_v = (sh(LUA .. " -v 2>&1"):match("^(Lua %S+)")) or _VERSION
  local lxp_v = (sh(LUA .. [[ -e 'package.cpath="/usr/lib/prosody/?.so;"..package.cpath;
    local l = require "lxp"; io.write(l._VERSION, " on ", l._EXPAT_VERSION)' 2>&1]]))
  local prosody_v = first_line("/usr/lib/prosody/prosody.version", "^(%S+)") or "unknown"
  local commit = (sh("git rev-parse --short HEAD 2>/dev/null || echo unknown"):gsub("%s+$", ""))
  local changed = sh("git status --porcelain -- csrc lua bench 2>/dev/null") ~= ""
  local load = (first_line("/proc/loadavg", "^(%S+ %S+ %S+)") or "?")
  say("machine   %s, %d cores, %s; load average at start %s", cpu, cores, kernel, load)
  say("versions  %s; %s; %s; Prosody %s; xmppsm %s%s", lua_v, expat, lxp_v, prosody_v, commit,
      changed and " + uncommitted changes" or "")
  say("timing    process CPU time of the feeding/serializing alone; median of %d rounds x %d passes"
    .. " (each round a new child, after 1 warm-up pass)", REPS, PASSES)
end

-- ---- contenders and cases --------------------------------------------------------------------

local function worker(which)
  return function(file, chunk)
    return fmt("%s bench/worker.lua frame %s %s %d %d", LUA, which, file, chunk, PASSES + 1)
  end
end

local FRAMERS = {
  { key = "floor", label = "libexpat floor (C)",
    cmd = function(file, chunk) return fmt("%s %s %d %d", FLOOR, file, chunk, PASSES + 1) end },
  { key = "prosody", label = "Prosody util.xmppstream", cmd = worker("prosody") },
  { key = "ours", label = "xmppsm core.parser", needs_parser = true, cmd = worker("ours") },
}

local function serializer(which, count, rounds)
  return function() return fmt("%s bench/worker.lua serialize %s %d %d %d", LUA, which, count, rounds,
                               PASSES + 1) end
end

local SER_HOT = { count = 500, rounds = 40 }
local SER_COLD = { count = 10000, rounds = 1 }

local function ser_contenders(c)
  return {
    { key = "prosody", label = "Prosody util.stanza", cmd = serializer("prosody", c.count, c.rounds) },
    { key = "ours", label = "xmppsm core.serialize", cmd = serializer("ours", c.count, c.rounds) },
  }
end

local function framing_case(key, file, chunk, label)
  return { key = key, file = file, chunk = chunk, label = label, bytes = file_size(file), who = FRAMERS }
end

-- ---- measurements ----------------------------------------------------------------------------

-- Runs a child that prints one line per pass ("stanzas bytes seconds"); drops the warm-up pass.
local function passes_of(cmd)
  local rows = {}
  for line in sh(cmd):gmatch("[^\n]+") do
    local n, b, t = line:match("^(%d+) (%d+) ([%d.]+)")
    if n then rows[#rows + 1] = { tonumber(n), tonumber(b), tonumber(t) } end
  end
  if #rows ~= PASSES + 1 then error("unexpected output from: " .. cmd, 0) end
  table.remove(rows, 1)
  return rows
end

-- Every timed pass, as lines "measurement, case, chunk, contender, round, pass, seconds".
local passes_log = {}

-- Fills case.res[contender] = { times = {...}, stanzas, bytes }, taking turns.
local function measure(name, cases)
  for _, c in ipairs(cases) do
    c.res = {}
    for _, k in ipairs(c.who) do c.res[k.key] = { times = {}, by_round = {} } end
  end
  for rep = 1, REPS do
    progress("%s: round %d of %d", name, rep, REPS)
    for _, c in ipairs(cases) do
      for _, k in ipairs(c.who) do
        if have_parser or not k.needs_parser then
          local r = c.res[k.key]
          for pass, row in ipairs(passes_of(k.cmd(c.file, c.chunk))) do
            r.stanzas, r.bytes = row[1], row[2]
            r.times[#r.times + 1] = row[3]
            r.by_round[rep] = r.by_round[rep] or {}
            table.insert(r.by_round[rep], row[3])
            passes_log[#passes_log + 1] = fmt("%s\t%s\t%s\t%s\t%d\t%d\t%.6f", name, c.label,
                                              c.chunk or "-", k.key, rep, pass, row[3])
          end
        end
      end
    end
  end
end

local function memory()
  local res = {}
  for _, mb in ipairs { MEM_SMALL, MEM_BIG } do
    progress("memory: %d MiB", mb)
    local out = sh(fmt("%s bench/worker.lua memory %s/loop.xml %d %d", LUA, OUT, mb, MEM_CHUNK))
    local n, b, before, after = out:match("^(%d+) (%d+) (%d+) (%d+)")
    if not n then error("unexpected output from the memory worker: " .. out, 0) end
    res[#res + 1] = { mb = mb, stanzas = tonumber(n), bytes = tonumber(b), before = tonumber(before),
                      after = tonumber(after) }
  end
  return res
end

-- Instructions (callgrind) of one pass: a child with 2 passes minus a child with 1.
local function instructions(cmd_for)
  local function ir(passes)
    local out = sh(fmt("valgrind --tool=callgrind --dump-instr=no --callgrind-out-file=/dev/null %s 2>&1",
                       cmd_for(passes)))
    local n = out:match("Collected : (%d+)")
    if not n then error("no instruction count from callgrind:\n" .. out, 0) end
    return tonumber(n)
  end
  return ir(2) - ir(1)
end

local function callgrind()
  local res = {}
  for _, s in ipairs { "mixed", "large" } do
    local file = fmt("%s/%s-small.xml", OUT, s)
    res[s] = { bytes = file_size(file) }
    progress("callgrind: %s", s)
    res[s].floor = instructions(function(n) return fmt("%s %s 4096 %d", FLOOR, file, n) end)
    if have_parser then
      res[s].ours = instructions(function(n)
        return fmt("%s bench/worker.lua frame ours %s 4096 %d", LUA, file, n)
      end)
    end
    if s == "mixed" then -- the slowest under callgrind; once is enough for a cross-check
      res[s].prosody = instructions(function(n)
        return fmt("%s bench/worker.lua frame prosody %s 4096 %d", LUA, file, n)
      end)
    end
  end
  progress("callgrind: serialization")
  res.ser = {}
  for _, which in ipairs { "ours", "prosody" } do
    res.ser[which] = instructions(function(n)
      return fmt("%s bench/worker.lua serialize %s %d %d %d", LUA, which, SER_HOT.count, 2, n)
    end)
  end
  return res
end

-- ---- report ----------------------------------------------------------------------------------

local verdicts = {}
local function target(what, value, goal, shown)
  local v
  if value == nil then v = "n/a" elseif value >= goal then v = "PASS" else v = "MISS" end
  verdicts[#verdicts + 1] = { what = what, shown = shown, v = v }
end

-- Rates (bytes per second) of each contender of a case, from the median times.
local function rates(c)
  local r = {}
  for _, k in ipairs(c.who) do
    local t = median(c.res[k.key].times)
    if t then r[k.key] = c.res[k.key].bytes / t end
  end
  return r
end

-- How `ours` compares with contender `ref` round by round (each round's median times, the two
-- children run one after the other): " (by round lo-hi)". On a machine whose speed drifts
-- between children, this shows how far a verdict on the medians can be trusted.
local function by_round(c, ref, as_ratio)
  local mine, theirs, vals = c.res.ours.by_round, c.res[ref].by_round, {}
  for rep = 1, REPS do
    if mine[rep] and theirs[rep] then vals[#vals + 1] = median(theirs[rep]) / median(mine[rep]) end
  end
  if #vals < 2 then return "" end
  table.sort(vals)
  local show = as_ratio and ratio or pct
  return fmt(" (by round %s-%s)", show(vals[1]), show(vals[#vals]))
end

local FRAME_HEAD = { "%-21s %-6s %-24s %9s %11s %8s %8s %10s %7s",
                     "stream", "chunk", "contender", "stanzas", "stanzas/s", "MB/s", "vs floor", "vs Prosody",
                     "spread" }

local function frame_rows(c, first_label)
  local rate = rates(c)
  local counts = {}
  for i, k in ipairs(c.who) do
    local r = c.res[k.key]
    local t = median(r.times)
    local name = i == 1 and first_label or ""
    if t then
      say("%-21s %-6s %-24s %9s %11s %8.1f %8s %10s %6.0f%%", name, kib(c.chunk), k.label, group(r.stanzas),
          group(r.stanzas / t), r.bytes / t / 1e6, pct(rate[k.key] / rate.floor),
          ratio(rate.prosody and rate[k.key] / rate.prosody), spread(r.times))
      counts[#counts + 1] = r.stanzas
    else
      say("%-21s %-6s %-24s %9s", name, kib(c.chunk), k.label, "n/a")
    end
  end
  for _, n in ipairs(counts) do
    if n ~= counts[1] then say("%21s WARNING: the contenders counted different numbers of stanzas", "") end
  end
  return rate
end

local function main()
  if not have_serialize then error("xmppsm/core.so is missing: run `make` first", 0) end
  say("xmppsm core benchmark, %s", os.date("!%Y-%m-%d %H:%M UTC"))
  facts()

  local frame_cases = {
    framing_case("mixed", OUT .. "/mixed.xml", 4096, "mixed"),
    framing_case("mixed", OUT .. "/mixed.xml", 16384, "mixed"),
    framing_case("large", OUT .. "/large.xml", 4096, "64 KiB stanzas"),
    framing_case("large", OUT .. "/large.xml", 16384, "64 KiB stanzas"),
  }
  local kind_cases = {}
  for _, k in ipairs(KINDS) do
    kind_cases[#kind_cases + 1] = framing_case(k, fmt("%s/large-%s.xml", OUT, k), 4096, "64 KiB " .. k)
  end
  local ser_cases = {
    { key = "hot", label = fmt("%d stanzas x %d", SER_HOT.count, SER_HOT.rounds),
      who = ser_contenders(SER_HOT) },
    { key = "cold", label = fmt("%d stanzas x %d", SER_COLD.count, SER_COLD.rounds),
      who = ser_contenders(SER_COLD) },
  }

  say("")
  say("commands  (one child per line and round; CHUNK 4096 or 16384; STREAM one of %s/*.xml)", OUT)
  for _, k in ipairs(FRAMERS) do say("  %s", (k.cmd("STREAM", 0):gsub(" 0 ", " CHUNK "))) end
  say("  %s bench/worker.lua serialize prosody|ours COUNT ROUNDS %d", LUA, PASSES + 1)
  say("  %s bench/worker.lua memory %s/loop.xml %d|%d %d", LUA, OUT, MEM_SMALL, MEM_BIG, MEM_CHUNK)
  if CALLGRIND then say("  valgrind --tool=callgrind --dump-instr=no <the same, with 1 and 2 passes>") end
  if not have_parser then
    say("")
    say("NOTE: xmppsm.core has no parser yet (csrc/parser.c is a placeholder): its rows are n/a.")
  end

  progress("measuring; this takes about two minutes on an idle machine")
  measure("framing", frame_cases)
  measure("framing by kind", kind_cases)
  local check = have_parser and sh(fmt("%s bench/worker.lua check 2000 2>&1", LUA)):gsub("%s+$", "")
  measure("serialization", ser_cases)
  local mem = have_parser and memory() or nil
  local cg = CALLGRIND and callgrind() or nil

  say("")
  say("1. Framing throughput: the same bytes in the same chunks for everyone")
  say(table.unpack(FRAME_HEAD))
  local prev
  for _, c in ipairs(frame_cases) do
    local label = c.key ~= prev and fmt("%s %.1fMB", c.label, c.bytes / 1e6) or ""
    prev = c.key
    local rate = frame_rows(c, label)
    local of, op = rate.ours and rate.ours / rate.floor, rate.ours and rate.ours / rate.prosody
    if c.key == "mixed" then
      target(fmt("mixed, %s: xmppsm >= 5x util.xmppstream", kib(c.chunk)), op, 5,
             ratio(op) .. by_round(c, "prosody", true))
      target(fmt("mixed, %s: xmppsm >= 60%% of libexpat", kib(c.chunk)), of, 0.60,
             pct(of) .. by_round(c, "floor"))
    else
      target(fmt("64 KiB stanzas, %s: xmppsm >= 80%% of libexpat", kib(c.chunk)), of, 0.80,
             pct(of) .. by_round(c, "floor"))
    end
  end

  say("")
  say("1b. The 64 KiB stream's four kinds of stanza, each alone (no target; shows where time goes)")
  say(table.unpack(FRAME_HEAD))
  for _, c in ipairs(kind_cases) do frame_rows(c, fmt("%s %.1fMB", c.label, c.bytes / 1e6)) end

  say("")
  say("2. Serialization: tostring() of the same stanzas built with each builder (mixed kinds, a third")
  say("   of the messages escaping-heavy). 'x 40': a few hundred stanzas serialized round after round,")
  say("   warm in the CPU caches as a stanza just built to be sent is; 'x 1': each stanza once, long after")
  say("   it was built, read from memory (the working set is far beyond the core's caches).")
  say("   Same input? Both builders' output parsed back by xmppsm: %s.", check or "not checked (no parser)")
  say("%-21s %-24s %11s %12s %8s %10s %7s", "stanzas", "serializer", "stanzas/s", "bytes out", "MB/s",
      "vs Prosody", "spread")
  for _, c in ipairs(ser_cases) do
    local sp
    for i, k in ipairs(c.who) do
      local r = c.res[k.key]
      local t = median(r.times)
      local rate = r.stanzas / t
      sp = sp or rate
      say("%-21s %-24s %11s %12s %8.1f %10s %6.0f%%", i == 1 and c.label or "", k.label, group(rate),
          group(r.bytes), r.bytes / t / 1e6, ratio(rate / sp), spread(r.times))
      if k.key == "ours" then
        target(fmt("serialization, %s: xmppsm >= 5x util.stanza", c.label), rate / sp, 5,
               ratio(rate / sp) .. by_round(c, "prosody", true))
      end
    end
  end

  say("")
  say("3. Peak memory of one xmppsm parser fed a long mixed stream (%d KiB chunks, one child each)",
      MEM_CHUNK // 1024)
  if mem then
    say("%-10s %10s %16s %16s %10s", "fed", "stanzas", "VmHWM before", "VmHWM after", "growth")
    for _, m in ipairs(mem) do
      say("%-10s %10s %12s KiB %12s KiB %6s KiB", fmt("%.0f MiB", m.bytes / 2 ^ 20), group(m.stanzas),
          group(m.before), group(m.after), group(m.after - m.before))
    end
    local small, big = mem[1].after, mem[2].after
    -- "about equal": within 10%, or within 1 MiB (allocator noise) for a small process
    local ok = big <= small * 1.10 or big - small <= 1024
    target(fmt("peak RSS after %d MiB ~ after %d MiB", MEM_BIG, MEM_SMALL), ok and 1 or 0, 1,
           fmt("%+.1f%%", 100 * (big - small) / small))
  else
    say("n/a (no parser)")
    target("peak RSS independent of stream length", nil, 1, "n/a")
  end

  if cg then
    say("")
    say("4. Instructions (callgrind): deterministic, blind to cache misses; a cross-check, not the verdict")
    say("%-21s %-24s %15s %10s %8s %10s", "input", "contender", "instructions", "per byte", "vs floor",
        "vs Prosody")
    for _, s in ipairs { "mixed", "large" } do
      local r = cg[s]
      for i, k in ipairs(FRAMERS) do
        local n = r[k.key]
        local label = i == 1 and fmt("%s %.1fMB", s == "mixed" and "mixed" or "64 KiB stanzas", r.bytes / 1e6)
        if n then
          say("%-21s %-24s %15s %10.1f %8s %10s", label or "", k.label, group(n), n / r.bytes,
              pct(r.floor / n), ratio(r.prosody and r.prosody / n))
        else
          say("%-21s %-24s %15s", label or "", k.label, "n/a")
        end
      end
    end
    local label = fmt("serialize %d x 2", SER_HOT.count)
    say("%-21s %-24s %15s %10s %8s %10s", label, "Prosody util.stanza", group(cg.ser.prosody), "", "",
        "1.00x")
    say("%-21s %-24s %15s %10s %8s %10s", "", "xmppsm core.serialize", group(cg.ser.ours), "", "",
        ratio(cg.ser.prosody / cg.ser.ours))
  end

  say("")
  say("Targets (on the median times above; in brackets the lowest and highest of the single rounds)")
  for _, v in ipairs(verdicts) do say("  %-4s  %-60s %s", v.v, v.what, v.shown) end
  say("")
  say("load average at end %s; took %d s", first_line("/proc/loadavg", "^(%S+ %S+ %S+)") or "?",
      os.time() - t_start)

  local f = io.open(OUT .. "/report.txt", "w")
  if f then
    f:write(concat(report, "\n"), "\n")
    f:close()
  end
  f = io.open(OUT .. "/passes.tsv", "w")
  if f then
    f:write(concat(passes_log, "\n"), "\n")
    f:close()
  end
end

main()
