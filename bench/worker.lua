--- One measurement per process, spawned by bench/run.lua (run from the top of the checkout).
--
--    lua5.4 bench/worker.lua frame ours|prosody FILE CHUNK [PASSES]
--        prints per pass: "stanzas bytes cpu_seconds"
--    lua5.4 bench/worker.lua serialize ours|prosody COUNT ROUNDS [PASSES]
--        prints per pass: "stanzas bytes cpu_seconds"
--    lua5.4 bench/worker.lua memory LOOP-FILE MEGABYTES CHUNK
--        prints: "stanzas bytes vmhwm_kib_before vmhwm_kib_after"
--    lua5.4 bench/worker.lua check
--        checks that both builders' output parses back to the same elements
--
-- Times are process CPU time (os.clock) around the work alone: reading the file, cutting it into
-- chunks and building the stanzas to serialize are done before the clock starts.

package.path = "lua/?.lua;lua/?/init.lua;bench/?.lua;" .. package.path
package.cpath = "./?.so;" .. package.cpath

local clock = os.clock
local PROSODY_PATH = "/usr/lib/prosody/?.lua;"
local PROSODY_CPATH = "/usr/lib/prosody/?.so;"

local function use_prosody()
  package.path = PROSODY_PATH .. package.path
  package.cpath = PROSODY_CPATH .. package.cpath
end

local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local function chunks_of(data, size)
  local t = {}
  for i = 1, #data, size do t[#t + 1] = data:sub(i, i + size - 1) end
  return t
end

-- Framing with xmppsm: count "stanza" events, and read each event's values so that nothing
-- could be skipped by being lazy.
-- XMPPSM_BENCH_PARSER picks the parser mode: "eager" (lazy = false), "lazy" (children left
-- unbuilt), "materialize" (lazy, then every stanza materialized); unset: the parser's default.
local function frame_ours(chunks)
  local core = require "xmppsm.core"
  local stanza_mt = require("xmppsm.stanza").metatable
  local mode = os.getenv("XMPPSM_BENCH_PARSER")
  local lazy
  if mode == "eager" then lazy = false elseif mode == "lazy" or mode == "materialize" then lazy = true end
  local materialize = mode == "materialize" and core.materialize or function() end
  local p = core.parser { stanza_mt = stanza_mt, lazy = lazy }
  local stanzas, touched = 0, 0
  for c = 1, #chunks do
    local ev, n = p:feed(chunks[c])
    for i = 1, 3 * n, 3 do
      local kind, a, b = ev[i], ev[i + 1], ev[i + 2]
      if kind == "stanza" then
        stanzas = stanzas + 1
        materialize(a)
        touched = touched + #a.name + #b
      elseif kind == "error" then
        error("xmppsm parser: " .. a .. ": " .. b)
      end
    end
  end
  p:close()
  return stanzas, touched
end

-- Framing with Prosody's util.xmppstream on lua-expat, driven as Prosody's c2s does.
local function frame_prosody(chunks)
  local xmppstream = require "util.xmppstream"
  local session = { notopen = true }
  local stanzas, touched = 0, 0
  local callbacks = {
    default_ns = "jabber:client",
    streamopened = function(s) s.notopen = nil end,
    streamclosed = function() end,
    handlestanza = function(_, st)
      stanzas = stanzas + 1
      touched = touched + #st.name
    end,
    error = function(_, e, d) error("util.xmppstream: " .. tostring(e) .. " " .. tostring(d)) end,
  }
  local stream = xmppstream.new(session, callbacks, 4 * 2 ^ 20)
  for c = 1, #chunks do
    local ok, err = stream:feed(chunks[c])
    if not ok then error("util.xmppstream: " .. tostring(err)) end
  end
  return stanzas, touched
end

local function vmhwm()
  for line in io.lines("/proc/self/status") do
    local kib = line:match("^VmHWM:%s*(%d+)")
    if kib then return tonumber(kib) end
  end
  return -1
end

local function build(lib, spec)
  local function copy(a)
    local t = {}
    for k, v in pairs(a) do t[k] = v end
    return t
  end
  local function add(st, s)
    for i = 3, #s do
      local c = s[i]
      if type(c) == "string" then
        st:text(c)
      else
        st:tag(c[1], copy(c[2]))
        add(st, c)
        st:up()
      end
    end
  end
  local st = lib.stanza(spec[1], copy(spec[2]))
  add(st, spec)
  return st
end

local function stanzas_for(which, count)
  if which == "prosody" then use_prosody() end
  local lib = require(which == "prosody" and "util.stanza" or "xmppsm.stanza")
  local specs = require("gen").specs(count)
  local list = {}
  for i = 1, #specs do list[i] = build(lib, specs[i]) end
  return list
end

local mode = arg[1]

if mode == "frame" then
  local which, file, chunk, passes = arg[2], arg[3], tonumber(arg[4]), tonumber(arg[5] or 1)
  local data = read_file(file)
  local chunks = chunks_of(data, chunk)
  local frame = frame_ours
  if which == "prosody" then
    use_prosody()
    frame = frame_prosody
  end
  for _ = 1, passes do
    collectgarbage()
    local t0 = clock()
    local n = frame(chunks)
    local t1 = clock()
    io.write(("%d %d %.6f\n"):format(n, #data, t1 - t0))
    io.flush()
  end
elseif mode == "serialize" then
  -- COUNT distinct stanzas, each serialized ROUNDS times per pass (round after round). With a
  -- few hundred stanzas they stay in the CPU caches, as a stanza just built to be sent does;
  -- with thousands and one round, every stanza is read from memory.
  local which, count, rounds, passes = arg[2], tonumber(arg[3]), tonumber(arg[4]), tonumber(arg[5] or 1)
  local list = stanzas_for(which, count)
  for _ = 1, passes do
    collectgarbage()
    local bytes = 0
    local t0 = clock()
    for _ = 1, rounds do
      for i = 1, #list do bytes = bytes + #tostring(list[i]) end
    end
    local t1 = clock()
    io.write(("%d %d %.6f\n"):format(#list * rounds, bytes, t1 - t0))
    io.flush()
  end
elseif mode == "memory" then
  local file, mb, chunk = arg[2], tonumber(arg[3]), tonumber(arg[4])
  local chunks = chunks_of(read_file(file), chunk)
  local gen = require "gen"
  local core = require "xmppsm.core"
  local p = core.parser { stanza_mt = require("xmppsm.stanza").metatable }
  local before = vmhwm()
  local goal, fed, stanzas = mb * 2 ^ 20, 0, 0
  local function feed(s)
    local ev, n = p:feed(s)
    for i = 1, 3 * n, 3 do
      if ev[i] == "stanza" then
        stanzas = stanzas + 1
      elseif ev[i] == "error" then
        error("xmppsm parser: " .. ev[i + 1] .. ": " .. ev[i + 2])
      end
    end
    fed = fed + #s
  end
  feed(gen.HEADER)
  while fed < goal do
    for c = 1, #chunks do
      feed(chunks[c])
      if fed >= goal then break end
    end
  end
  io.write(("%d %d %d %d\n"):format(stanzas, fed, before, vmhwm()))
elseif mode == "check" then
  -- Both builders' output, parsed back by our parser, must give equal elements.
  local count = tonumber(arg[2] or 2000)
  local ours, theirs = stanzas_for("ours", count), stanzas_for("prosody", count)
  local core = require "xmppsm.core"
  local function parse_all(list)
    local out, p = {}, core.parser()
    local gen = require "gen"
    local ev, n = p:feed(gen.HEADER)
    assert(n == 1 and ev[1] == "header")
    for i = 1, #list do
      ev, n = p:feed(tostring(list[i]))
      assert(n == 1 and ev[1] == "stanza", ev[2] and tostring(ev[2]) .. ": " .. tostring(ev[3]))
      out[i] = ev[2]
    end
    return out
  end
  local function same(a, b)
    if type(a) ~= type(b) then return false end
    if type(a) ~= "table" then return a == b end
    for k, v in pairs(a) do if not same(v, b[k]) then return false end end
    for k in pairs(b) do if a[k] == nil then return false end end
    return true
  end
  local a, b = parse_all(ours), parse_all(theirs)
  for i = 1, count do
    if not same(a[i], b[i]) then
      error(("stanza %d differs:\n  ours:    %s\n  prosody: %s"):format(i, tostring(ours[i]),
        tostring(theirs[i])))
    end
  end
  io.write(("%d stanzas equal\n"):format(count))
else
  io.stderr:write("usage: see the head of bench/worker.lua\n")
  os.exit(2)
end
