-- Installing as Lua users do: `luarocks make` into a throwaway tree, then an example run from
-- outside the checkout with only that tree on its paths, against a real Prosody.
local prosody = require "helpers.prosody"
local process = require "helpers.process"

describe("the rock", function()
  local tree, server
  local checkout = os.getenv("PWD")

  setup(function()
    tree = process.tmpdir("xmppsm-rock")
    server = prosody.start{ users = { { "alice", "pw-alice" }, { "bob", "pw-bob" } } }
  end)
  teardown(function()
    if server then server:stop() end
    process.stop_all()
    if tree then os.execute("rm -rf " .. process.quote(tree)) end
  end)

  it("passes luarocks lint", function()
    assert.is_true(os.execute("luarocks --lua-version 5.4 lint xmppsm-scm-1.rockspec >/dev/null 2>&1"))
  end)

  it("installs with luarocks make and runs an example from that tree alone", function()
    local log = tree .. "/build.log"
    local built = os.execute("luarocks --lua-version 5.4 make --deps-mode=none --tree " ..
                             process.quote(tree) .. " xmppsm-scm-1.rockspec >" ..
                             process.quote(log) .. " 2>&1")
    assert.is_true(built, process.read_file(log))

    local share, lib = tree .. "/share/lua/5.4/", tree .. "/lib/lua/5.4/"
    -- Only the tree and the system's own Lua directories: nothing from the checkout.
    local env = table.concat({
      "LUA_PATH_5_4=" .. process.quote(share .. "?.lua;" .. share .. "?/init.lua;" ..
                                       "/usr/share/lua/5.4/?.lua;/usr/share/lua/5.4/?/init.lua"),
      "LUA_CPATH_5_4=" .. process.quote(lib .. "?.so;/usr/lib/x86_64-linux-gnu/lua/5.4/?.so"),
      "XMPP_JID=alice@xmppsm.test", "XMPP_PASSWORD=pw-alice", "XMPP_TO=bob@xmppsm.test",
      "XMPP_HOST=127.0.0.1", "XMPP_PORT=" .. server.port,
      "XMPP_CAFILE=" .. process.quote(server.cafile),
    }, " ")
    -- The -e check fails the run unless xmppsm.core comes from the tree.
    local check = "assert(package.searchpath('xmppsm.core', package.cpath):find('" .. tree .. "', 1, true))"
    local cmd = "cd " .. process.quote(tree) .. " && env " .. env .. " timeout 60 lua5.4 -e " ..
                process.quote(check) .. " " .. process.quote(checkout .. "/examples/reliable_sender.lua") ..
                " 3 2>&1"
    local p = assert(io.popen(cmd))
    local out = p:read("a")
    local ok = p:close()
    assert.is_true(ok, out)
    local acked = 0
    for _ in out:gmatch("acked:%s+message") do acked = acked + 1 end
    assert.equal(3, acked, out)
  end)
end)
