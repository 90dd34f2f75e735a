-- The client benchmarks: what a user feels, side by side with a peer in the same run.
--
--   lua5.4 bench/client_run.lua            (from the repository root; `make bench` calls it)
--
-- Sections (BENCH_ONLY=e2e,resume,queue,scale picks some; all by default):
--   e2e     20,000 messages through Prosody with stream management: xmppsm (its defaults, and
--           without a store, in memory as the peers), xmpp.js 0.14, and a bare Lua floor
--           without an XML parser, to itself and to a second account;
--   resume  20 cuts by the fault proxy: cut noticed -> resumed, cut -> first re-sent stanza
--           acknowledged; xmppsm and xmpp.js (reconnect delay 0, and its default 1 s);
--   queue   memory per unacknowledged stanza, one <a/> for 100,000, re-sending 100,000 after a
--           resume, and persisting them in each durability mode;
--   scale   10, 100 and 1,000 sessions in one process, a message a second each.
-- Environment: BENCH_QUICK=1 (a short run: fewer messages, rounds, cuts, seconds),
-- BENCH_MESSAGES, BENCH_ROUNDS, BENCH_WINDOW, BENCH_CUTS, BENCH_SCALE_SECONDS,
-- BENCH_SCALE_SESSIONS (e.g. "10,100,1000"), BENCH_CALLGRIND=0 (skip instruction counts),
-- BENCH_IMPLS (e.g. "xmppsm,xmppsm_mem,floor": which clients the e2e section runs), BENCH_OUT (also
-- write the table to this file).
-- Timings are printed, never asserted: a noisy machine makes figures move, ratios less so.
package.path = "lua/?.lua;lua/?/init.lua;spec/?.lua;bench/?.lua;" .. package.path
package.cpath = "./?.so;" .. package.cpath

local prosody = require "helpers.prosody"
local process = require "helpers.process"
local common = require "e2e.common"
local report = require "e2e.report"

local function env_number(name, default)
  return tonumber(os.getenv(name) or "") or default
end

local QUICK = os.getenv("BENCH_QUICK") == "1"
local cfg = {
  quick = QUICK,
  messages = env_number("BENCH_MESSAGES", QUICK and 5000 or 20000),
  rounds = env_number("BENCH_ROUNDS", QUICK and 1 or 3),
  window = env_number("BENCH_WINDOW", 1000),
  cuts = env_number("BENCH_CUTS", QUICK and 5 or 20),
  scale_seconds = env_number("BENCH_SCALE_SECONDS", QUICK and 10 or 60),
  scale_sessions = os.getenv("BENCH_SCALE_SESSIONS") or "10,100,1000",
  callgrind = os.getenv("BENCH_CALLGRIND") ~= "0",
}
local only = {}
for name in (os.getenv("BENCH_ONLY") or "e2e,resume,queue,scale"):gmatch("[%w_]+") do only[name] = true end

local NODE_DIR = "bench/e2e/node"

-- xmpp.js is installed by npm into bench/e2e/node on the first run (not committed).
local function ensure_xmppjs()
  if not process.run("command -v node >/dev/null && command -v npm >/dev/null") then
    return nil, "node or npm not found"
  end
  local f = io.open(NODE_DIR .. "/node_modules/@xmpp/client/package.json", "r")
  if f then
    local version = f:read("a"):match('"version"%s*:%s*"([^"]+)"')
    f:close()
    if version and version:match("^0%.14%.") then return version end
  end
  io.stderr:write("bench: installing @xmpp/client@0.14 with npm into " .. NODE_DIR .. "\n")
  local ok, out = process.run({ "npm", "install", "--no-audit", "--no-fund", "--prefix", NODE_DIR,
                                "@xmpp/client@0.14" })
  if not ok then return nil, "npm install failed: " .. process.tail(out, 5) end
  return ensure_xmppjs()
end

local function run_child(argv, env, timeout)
  local words = { "timeout", tostring(timeout or 600) }
  for k, v in pairs(env or {}) do words[#words + 1] = k .. "=" .. process.quote(v) end
  if #words > 2 then table.insert(words, 3, "env") end
  for _, w in ipairs(argv) do words[#words + 1] = process.quote(w) end
  local ok, out = process.run(table.concat(words, " "))
  local results = common.parse_results(out)
  if not ok or #results == 0 then
    io.stderr:write("bench: " .. argv[#argv > 1 and 2 or 1] .. " failed:\n" .. process.tail(out, 15) .. "\n")
    return nil, out
  end
  return results, out
end

local machine
do
  local _, cpu = process.run("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2")
  local _, cores = process.run("nproc")
  local _, mem = process.run("grep MemTotal /proc/meminfo")
  local _, kernel = process.run("uname -r")
  local _, pv = process.run("dpkg-query -W -f='Prosody ${Version}' prosody 2>/dev/null")
  local _, node = process.run("node --version")
  local _, lua = process.run("lua5.4 -v")
  local _, ssl = process.run("openssl version")
  local _, load = process.run("cat /proc/loadavg")
  machine = {
    cpu = (cpu or ""):gsub("^%s+", ""):gsub("%s+$", ""),
    cores = (cores or ""):gsub("%s+", ""),
    mem_gib = math.floor((tonumber((mem or ""):match("(%d+)")) or 0) / 1048576 + 0.5),
    kernel = (kernel or ""):gsub("%s+$", ""),
    prosody = (pv or ""):gsub("%s+$", ""),
    node = (node or ""):gsub("%s+$", ""),
    lua = (lua or ""):gsub("%s+$", ""),
    openssl = (ssl or ""):gsub("%s+$", ""),
    load_before = (load or ""):match("^(%S+ %S+ %S+)"),
  }
end

local started = os.time()
local results = { cfg = cfg, machine = machine }

local xmppjs_version, xmppjs_err = ensure_xmppjs()
results.xmppjs_version = xmppjs_version
if not xmppjs_version then io.stderr:write("bench: xmpp.js columns skipped: " .. xmppjs_err .. "\n") end
machine.xmppjs = xmppjs_version and ("@xmpp/client " .. xmppjs_version) or ("n/a (" .. xmppjs_err .. ")")

-- Prosody for the bench: quiet log, limits raised (mod_smacks would otherwise end a session
-- whose server-to-client queue passes 500 unacknowledged stanzas).
local function start_prosody(users, extra)
  local options = {
    "smacks_max_queue_size = 1000000",
    "smacks_max_unacked_stanzas = 0",
    "c2s_stanza_size_limit = 1024 * 1024 * 4",
    "limits = {}",
  }
  for _, line in ipairs(extra or {}) do options[#options + 1] = line end
  return prosody.start{ users = users, log_level = "warn", hibernation = 300, options = options }
end

---------------------------------------------------------------------------------------------
-- e2e

local function e2e()
  local server = start_prosody({ { "alice", "pw-alice" }, { "bob", "pw-bob" } })
  local dir = process.tmpdir("xmppsm-bench")
  local pid = server.process.pid
  local base = { "host=127.0.0.1", "port=" .. server.port, "domain=" .. server.domain,
                 "cafile=" .. server.cafile, "prosody_pid=" .. pid, "n=" .. cfg.messages,
                 "window=" .. cfg.window }
  local function args(to, extra)
    local t = table.move(base, 1, #base, 1, {})
    t[#t + 1] = "to=" .. to
    for _, e in ipairs(extra or {}) do t[#t + 1] = e end
    return t
  end
  local out = { runs = {} }
  local impls = {
    { "xmppsm", function(to, round)
        local d = dir .. "/r" .. round .. to
        os.execute("mkdir -p " .. process.quote(d))
        local argv = { "lua5.4", "bench/e2e/xmppsm_client.lua" }
        for _, w in ipairs(args(to, { "dir=" .. d })) do argv[#argv + 1] = w end
        return run_child(argv)
      end },
    -- Like for like: the peers keep their queue in memory only, so this run has no store
    -- (our default journals every stanza to disk before sending it).
    { "xmppsm_mem", function(to, round)
        local d = dir .. "/m" .. round .. to
        os.execute("mkdir -p " .. process.quote(d))
        local argv = { "lua5.4", "bench/e2e/xmppsm_client.lua" }
        for _, w in ipairs(args(to, { "dir=" .. d, "store=none" })) do argv[#argv + 1] = w end
        return run_child(argv)
      end },
    { "floor", function(to)
        local argv = { "lua5.4", "bench/e2e/floor_client.lua" }
        for _, w in ipairs(args(to)) do argv[#argv + 1] = w end
        return run_child(argv)
      end },
  }
  if xmppjs_version then
    impls[#impls + 1] = { "xmppjs", function(to)
      local argv = { "node", NODE_DIR .. "/xmppjs_client.mjs" }
      for _, w in ipairs(args(to)) do argv[#argv + 1] = w end
      return run_child(argv, { NODE_EXTRA_CA_CERTS = server.cafile })
    end }
  end
  local wanted = os.getenv("BENCH_IMPLS")
  if wanted then
    local keep = {}
    for _, impl in ipairs(impls) do
      if ("," .. wanted .. ","):find("," .. impl[1] .. ",", 1, true) then keep[#keep + 1] = impl end
    end
    impls = keep
  end
  for round = 1, cfg.rounds do
    for _, to in ipairs({ "self", "other" }) do
      for _, impl in ipairs(impls) do
        io.stderr:write(string.format("bench: e2e round %d/%d %s to %s\n", round, cfg.rounds, impl[1], to))
        local r = impl[2](to, round)
        if r then
          local key = impl[1] .. "/" .. to
          out.runs[key] = out.runs[key] or {}
          table.insert(out.runs[key], r[1])
        end
      end
    end
  end
  -- Instruction counts, immune to a noisy machine: two sizes, the difference per message, so
  -- start-up and log-in cancel out.
  if cfg.callgrind and process.run("command -v valgrind >/dev/null") then
    out.instructions = {}
    local programs = { { "xmppsm", "bench/e2e/xmppsm_client.lua" },
                       { "xmppsm_mem", "bench/e2e/xmppsm_client.lua", "store=none" },
                       { "floor", "bench/e2e/floor_client.lua" } }
    for _, impl in ipairs(programs) do
      local counts = {}
      for _, n in ipairs({ 1000, 3000 }) do
        local file = dir .. "/callgrind." .. impl[1] .. "." .. n
        local d = dir .. "/cg" .. impl[1] .. n
        os.execute("mkdir -p " .. process.quote(d))
        local argv = { "valgrind", "--tool=callgrind", "--callgrind-out-file=" .. file, "lua5.4", impl[2] }
        for _, w in ipairs(base) do
          if not w:match("^n=") then argv[#argv + 1] = w end
        end
        argv[#argv + 1] = "n=" .. n
        argv[#argv + 1] = "to=self"
        argv[#argv + 1] = "latencies=0"
        argv[#argv + 1] = "dir=" .. d
        if impl[3] then argv[#argv + 1] = impl[3] end
        io.stderr:write("bench: callgrind " .. impl[1] .. " n=" .. n .. "\n")
        if run_child(argv) then
          local text = process.read_file(file) or ""
          counts[n] = tonumber(text:match("\ntotals:%s*(%d+)") or text:match("\nsummary:%s*(%d+)"))
        end
      end
      if counts[1000] and counts[3000] then
        out.instructions[impl[1]] = (counts[3000] - counts[1000]) / 2000
      end
    end
  end
  server:stop()
  return out
end

---------------------------------------------------------------------------------------------
-- resume

local function resume()
  local out = { runs = {} }
  local server = start_prosody({ { "alice", "pw-alice" } })
  local dir = process.tmpdir("xmppsm-bench")
  local base = { "host=127.0.0.1", "port=" .. server.port, "domain=" .. server.domain,
                 "cafile=" .. server.cafile, "cuts=" .. cfg.cuts }
  io.stderr:write("bench: resume xmppsm\n")
  local argv = { "lua5.4", "bench/e2e/xmppsm_resume.lua", "dir=" .. dir }
  for _, w in ipairs(base) do argv[#argv + 1] = w end
  out.runs.xmppsm = run_child(argv)
  if xmppjs_version then
    for _, delay in ipairs({ "0", "default" }) do
      io.stderr:write("bench: resume xmpp.js, reconnect delay " .. delay .. "\n")
      argv = { "node", NODE_DIR .. "/xmppjs_resume.mjs" }
      for _, w in ipairs(base) do argv[#argv + 1] = w end
      if delay ~= "default" then argv[#argv + 1] = "delay=" .. delay end
      out.runs["xmppjs_" .. delay] = run_child(argv, { NODE_EXTRA_CA_CERTS = server.cafile })
    end
  end
  server:stop()
  return out
end

---------------------------------------------------------------------------------------------
-- queue

local function queue()
  local dir = process.tmpdir("xmppsm-bench")
  local argv = { "lua5.4", "bench/e2e/queue_bench.lua", "dir=" .. dir }
  if os.getenv("BENCH_QUEUE_SIZES") then argv[#argv + 1] = "sizes=" .. os.getenv("BENCH_QUEUE_SIZES") end
  if cfg.quick then argv[#argv + 1] = "counts=1000,10000,100000"; argv[#argv + 1] = "max_bytes=100000000" end
  io.stderr:write("bench: queue\n")
  local r = run_child(argv, nil, 1200)
  return { rows = r or {} }
end

---------------------------------------------------------------------------------------------
-- scale

local function scale()
  local levels = {}
  for n in cfg.scale_sessions:gmatch("%d+") do levels[#levels + 1] = tonumber(n) end
  local most = math.max(table.unpack(levels))
  -- Prosody 0.12 uses epoll: no descriptor limit of its own but the process's, which it
  -- inherits (raised here for it and for us).
  local server = start_prosody({ { "alice", "pw-alice" } }, { "c2s_timeout = 600" })
  -- Accounts: copies of alice's (same password, so the same stored SCRAM keys): registering
  -- a thousand through prosodyctl would take a minute.
  local accounts = server.dir .. "/data/" .. server.domain:gsub("%.", "%%2e") .. "/accounts/"
  local text = assert(process.read_file(accounts .. "alice.dat"), "no account file for alice")
  for i = 1, most do process.write_file(accounts .. "user" .. i .. ".dat", text) end
  local out = { runs = {} }
  for _, n in ipairs(levels) do
    local dir = process.tmpdir("xmppsm-bench")
    io.stderr:write(string.format("bench: scale %d sessions x %d s\n", n, cfg.scale_seconds))
    local argv = { "bash", "-c", "ulimit -n 20000 2>/dev/null || ulimit -n $(ulimit -Hn); exec \"$0\" \"$@\"",
                   "lua5.4", "bench/e2e/scale_client.lua", "host=127.0.0.1", "port=" .. server.port,
                   "domain=" .. server.domain, "cafile=" .. server.cafile,
                   "prosody_pid=" .. server.process.pid, "sessions=" .. n,
                   "seconds=" .. cfg.scale_seconds, "dir=" .. dir }
    local r = run_child(argv, nil, 1800)
    if r then out.runs[n] = r[1] end
  end
  server:stop()
  return out
end

---------------------------------------------------------------------------------------------

if only.e2e then results.e2e = e2e() end
if only.resume then results.resume = resume() end
if only.queue then results.queue = queue() end
if only.scale then results.scale = scale() end

results.seconds = os.time() - started
local _, load = process.run("cat /proc/loadavg")
machine.load_after = (load or ""):match("^(%S+ %S+ %S+)")
local text = report.render(results)
io.stdout:write(text)
local out_path = os.getenv("BENCH_OUT")
if out_path then process.write_file(out_path, text) end
process.cleanup()
