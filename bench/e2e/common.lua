--- Shared pieces of the client benchmarks: CPU and memory read from /proc, percentiles, and
-- the one-line results every workload prints (`RESULT key=value ...`).
-- @module e2e.common
local common = {}

local CLK_TCK = 100 -- USER_HZ: what /proc/PID/stat counts in on Linux, whatever the kernel HZ

--- CPU seconds (user + system) used so far by process `pid` (default: this one), from
-- /proc/PID/schedstat (nanoseconds; the main thread, which is the whole of a single-threaded
-- Lua process or Prosody), else /proc/PID/stat (clock ticks: 10 ms steps).
function common.cpu_seconds(pid)
  local s = io.open("/proc/" .. (pid or "self") .. "/schedstat", "r")
  if s then
    local ns = s:read("n")
    s:close()
    if ns then return ns / 1e9 end
  end
  local f = io.open("/proc/" .. (pid or "self") .. "/stat", "r")
  if not f then return nil end
  local line = f:read("l")
  f:close()
  local rest = line:match(".*%)%s+(.*)$")
  local fields = {}
  for word in rest:gmatch("%S+") do fields[#fields + 1] = word end
  -- rest starts at field 3 (state): utime is field 14, stime field 15
  return (tonumber(fields[12]) + tonumber(fields[13])) / CLK_TCK
end

--- Runs xmppsm's loop in steps of `step` seconds (default 0.05) until `cond()` is true; raises
-- "timed out waiting for <what>" after `seconds`. The loop is required here, not at the top,
-- so that the floor client, which shares this module, never loads xmppsm.
function common.wait_for(cond, seconds, what, step)
  local loop = require "xmppsm.loop"
  local now = require("xmppsm.core").monotime
  local deadline = now() + seconds
  while not cond() do
    if now() > deadline then error("timed out waiting for " .. what) end
    loop.step(step or 0.05)
  end
end

--- A field of /proc/PID/status in KiB (`VmHWM` is the peak resident set, `VmRSS` the current).
function common.status_kib(field, pid)
  local f = io.open("/proc/" .. (pid or "self") .. "/status", "r")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  return tonumber(text:match(field .. ":%s+(%d+)"))
end

--- The `p`-th percentile (0..100) of a list of numbers, nearest rank; nil for an empty list.
function common.percentile(list, p)
  local n = #list
  if n == 0 then return nil end
  local sorted = table.move(list, 1, n, 1, {})
  table.sort(sorted)
  local rank = math.max(1, math.min(n, math.ceil(p / 100 * n)))
  return sorted[rank]
end

--- Prints `RESULT k=v ...` (sorted keys; numbers with up to 6 significant digits).
function common.result(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = { "RESULT" }
  for _, k in ipairs(keys) do
    local v = t[k]
    if type(v) == "number" and math.type(v) == "float" then v = string.format("%.6g", v) end
    parts[#parts + 1] = k .. "=" .. tostring(v)
  end
  io.stdout:write(table.concat(parts, " "), "\n")
  io.stdout:flush()
end

--- Parses the `RESULT` lines of a child's output into a list of tables.
function common.parse_results(text)
  local out = {}
  for line in text:gmatch("[^\n]+") do
    if line:match("^RESULT ") then
      local t = {}
      for k, v in line:gmatch("(%S+)=(%S+)") do t[k] = tonumber(v) or v end
      out[#out + 1] = t
    end
  end
  return out
end

--- Command-line arguments `key=value` into a table (numbers converted).
function common.args(argv)
  local t = {}
  for _, a in ipairs(argv) do
    local k, v = a:match("^([%w_]+)=(.*)$")
    if k then t[k] = tonumber(v) or v end
  end
  -- latencies=0: the run only counts instructions, whose per-message figure would otherwise
  -- include sorting the latency lists after the measured interval (n log n, not per message).
  common.skip_latencies = t.latencies == 0
  return t
end

--- Latency summary of two lists of seconds: median and p99 in milliseconds, under `prefix`.
function common.latencies(into, prefix, list)
  if common.skip_latencies then return end
  into[prefix .. "_p50_ms"] = (common.percentile(list, 50) or 0) * 1000
  into[prefix .. "_p99_ms"] = (common.percentile(list, 99) or 0) * 1000
end

return common
