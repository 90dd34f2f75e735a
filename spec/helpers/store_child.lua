-- A second process for the store specs: `lua5.4 spec/helpers/store_child.lua MODE ARG...`,
-- started with LUA_PATH / LUA_CPATH (or -e) so that it loads the same modules as the spec.
-- Also loaded as a module by the specs (`dofile`), for the kill test's sequence of operations.
--
-- Modes:
--   hold PATH      open store.file(PATH), print "locked", wait for EOF on stdin, close
--   lock PATH      core.open_file + core.lock on PATH, print "locked", wait for EOF on stdin
--   append PATH    the endless sequence below, durability "write", printing each step's number
--                  after the store call returned; stops by itself after 60 s
--   fill PATH      queued() until a write fails (run it under `ulimit -f`), then recovery
--   path JID       print store.default_path(JID)
local M = {}

local MAX_H = 4294967296

-- The raw stanza of step n: its length varies so that records do not all look alike.
function M.raw(n)
  return string.format("<message id='k%d' to='peer@example.com'><body>%s</body></message>", n,
    string.rep(string.char(97 + n % 26), n % 97))
end

M.session = { id = "sm-1", jid = "bot@example.com/kill", enabled_at = 1700000000, max = 300 }

-- Step n of the kill test, given the state after step n-1: the method and its arguments.
-- Every 7th step acknowledges all but the 2 newest items, so the journal keeps compacting.
function M.call(model, n)
  if n == 1 then return "enabled", { M.session } end
  if n % 7 == 0 then
    local released = math.max(0, #model.items - 2)
    return "acked", { (model.acked + released) % MAX_H, released }
  end
  if n % 11 == 0 then return "inbound", { n } end
  return "queued", { M.raw(n), n + 0.5 }
end

-- The same change on a plain state table.
function M.apply(model, method, args)
  if method == "enabled" then
    model.session, model.inbound, model.acked = args[1], 0, 0
  elseif method == "acked" then
    model.acked = args[1]
    local items = {}
    for i = args[2] + 1, #model.items do items[#items + 1] = model.items[i] end
    model.items = items
  elseif method == "inbound" then
    model.inbound = args[1]
  elseif method == "queued" then
    model.items[#model.items + 1] = { raw = args[1], stamp = args[2] }
  else
    error("unknown method " .. method)
  end
end

function M.empty()
  return { session = nil, inbound = 0, acked = 0, items = {} }
end

local function main(mode, target)
  local store = require "xmppsm.store"
  local core = require "xmppsm.core"
  local out = io.stdout
  if mode == "hold" then
    local s = assert(store.file(target))
    out:write("locked\n")
    out:flush()
    io.read("a")
    s:close()
  elseif mode == "lock" then
    local f = assert(core.open_file(target, "a"))
    assert(core.lock(f))
    out:write("locked\n")
    out:flush()
    io.read("a")
    f:close()
  elseif mode == "append" then
    -- A small slack: the journal compacts every few dozen steps, so kills land in compactions too.
    local s = assert(store.file(target, { durability = "write", compact_slack = 4096 }))
    assert(s:load())
    local model = M.empty()
    local deadline = core.monotime() + 60
    local n = 0
    while core.monotime() < deadline do
      n = n + 1
      local method, args = M.call(model, n)
      assert(s[method](s, table.unpack(args)))
      M.apply(model, method, args)
      out:write(n, "\n")
      out:flush()
    end
    s:close()
  elseif mode == "fill" then
    local s = assert(store.file(target, { durability = "write" }))
    assert(s:load())
    assert(s:enabled(M.session))
    local n, err = 0, nil
    while n < 100000 do
      local ok
      ok, err = s:queued(string.rep("z", 1000), n + 1)
      if not ok then break end
      n = n + 1
    end
    out:write("queued ", n, "\n")
    out:write("failed ", tostring(err), "\n")
    out:write("count ", #s:state().items, "\n")
    -- Bigger than the room a rewrite (which drops the journal's per-record overhead) makes.
    out:write("again ", tostring((s:queued(string.rep("y", n * 30), 1))), "\n")
    out:write("count ", #s:state().items, "\n")
    -- Releasing every item makes the state small enough to fit under the limit again.
    local ok
    ok, err = s:acked(n, n)
    out:write("acked ", tostring(ok), " ", tostring(err), "\n")
    ok, err = s:queued("<message id='recovered'/>", 2)
    out:write("recovered ", tostring(ok), " ", tostring(err), "\n")
    out:write("closed ", tostring(s:close()), "\n")
  elseif mode == "path" then
    out:write(tostring(store.default_path(target)), "\n")
  else
    error("unknown mode " .. tostring(mode))
  end
end

-- Helpers for the specs that start this file as a child --------------------------------------

--- Quotes one word for /bin/sh.
function M.quote(s)
  return "'" .. s:gsub("'", "'\\''") .. "'"
end

-- The interpreter running the specs (lua5.4, or `make test`'s sanitizer build), so that a
-- child can load the same core.so; under valgrind the process is valgrind's tool, so lua5.4.
M.LUA = (function()
  local p = io.popen("readlink /proc/$PPID/exe")
  local exe = p and p:read("l")
  if p then p:close() end
  if not exe or not exe:match("/lua[^/]*$") then exe = "lua5.4" end
  return exe
end)()

--- The shell command running this file in mode `...`, loading the same modules as the caller.
function M.command(...)
  local args = {}
  for i, a in ipairs { ... } do args[i] = M.quote(a) end
  return string.format("env LUA_PATH_5_4=%s LUA_CPATH_5_4=%s %s %s %s", M.quote(package.path),
    M.quote(package.cpath), M.LUA, "spec/helpers/store_child.lua", table.concat(args, " "))
end

--- A whole file, or nil when it cannot be read.
function M.read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

if arg and arg[0] and arg[0]:match("store_child%.lua$") then
  main(arg[1], arg[2])
end

return M
