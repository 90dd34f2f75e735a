-- Specs of the socket options LuaSocket lacks (csrc/sockopt.c, docs/core.md "Socket options").
local core = require "xmppsm.core"
local socket = require "socket"

describe("core.tcp_quickack", function()
  it("sets the option on a connected TCP socket, on both ends", function()
    local srv = assert(socket.bind("127.0.0.1", 0))
    local a = assert(socket.tcp())
    assert(a:connect(srv:getsockname()))
    local b = assert(srv:accept())
    srv:close()
    assert.is_true(core.tcp_quickack(a:getfd()))
    assert.is_true(core.tcp_quickack(b:getfd()))
    -- and the connection still carries bytes both ways
    assert(a:send("ping\n"))
    assert.equal("ping", b:receive("*l"))
    assert(b:send("pong\n"))
    assert.equal("pong", a:receive("*l"))
    a:close()
    b:close()
  end)

  it("returns nil and the system's reason for a descriptor that is not a TCP socket", function()
    -- 0 is this process's standard input: a file or a pipe under busted, never a TCP socket
    local ok, err = core.tcp_quickack(0)
    assert.is_nil(ok)
    assert.is_string(err)
    local udp = assert(socket.udp4())
    ok, err = core.tcp_quickack(udp:getfd())
    udp:close()
    assert.is_nil(ok)
    assert.is_string(err)
  end)

  it("raises for an argument that is not a descriptor", function()
    assert.has_error(function() core.tcp_quickack("3") end)
    assert.has_error(function() core.tcp_quickack(-1) end)
    assert.has_error(function() core.tcp_quickack(2 ^ 40) end)
    assert.has_error(function() core.tcp_quickack() end)
  end)
end)
