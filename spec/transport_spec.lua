-- The transport on its own: non-blocking connect over IPv4 and IPv6, bytes both ways, errors.
local socket = require "socket"
local transport = require "xmppsm.transport"
local wait = require "helpers.wait"

local function echo_server(host)
  local server = socket.bind(host, 0)
  if not server then return nil end
  server:settimeout(0)
  local _, port = server:getsockname()
  return server, tonumber(port)
end

local function roundtrip(host)
  local server, port = echo_server(host)
  if not server then return nil end
  local got, closed = {}, nil
  local t = transport.new{
    on_data = function(bytes) got[#got + 1] = bytes end,
    on_close = function(reason) closed = reason end,
  }
  local connected
  t:connect(host, port, 5, function(ok, err) connected = { ok, err } end)
  local peer
  wait.until_true(function()
    peer = peer or server:accept()
    return connected and peer
  end, 5, "the connection to " .. host)
  assert.is_true(connected[1], connected[2])
  t:send("hello ")
  t:send("world")
  peer:settimeout(2)
  assert.equal("hello world", peer:receive(11))
  peer:send("reply")
  wait.until_true(function() return table.concat(got) == "reply" end, 5, "the reply")
  peer:close()
  wait.until_true(function() return closed end, 5, "the close")
  assert.equal("connection closed by peer", closed)
  server:close()
  return true
end

describe("transport", function()
  it("connects over IPv4 without blocking, carries bytes both ways, reports the peer's close", function()
    assert.is_true(roundtrip("127.0.0.1"))
  end)

  it("connects over IPv6 when the machine has it", function()
    local probe = socket.bind("::1", 0)
    if not probe then
      pending("no IPv6 loopback on this machine")
      return
    end
    probe:close()
    assert.is_true(roundtrip("::1"))
  end)

  it("reports a refused connection with the address", function()
    local server, port = echo_server("127.0.0.1")
    server:close()   -- nothing listens there now
    local result
    local t = transport.new{ on_data = function() end, on_close = function() end }
    t:connect("127.0.0.1", port, 2, function(ok, err) result = { ok, err } end)
    wait.until_true(function() return result end, 5, "the failure")
    assert.is_nil(result[1])
    assert.matches("cannot connect to 127.0.0.1 port " .. port, result[2], 1, true)
  end)

  it("writes queued pieces once and in order after partial writes", function()
    local written = {}
    local t = transport.new{ on_data = function() end, on_close = function() end }
    -- A socket that takes at most 7 bytes a call, as LuaSocket reports a partial send.
    t.sock = { send = function(_, data, i)
      local last = math.min(#data, i + 6)
      written[#written + 1] = data:sub(i, last)
      if last < #data then return nil, "timeout", last end
      return last
    end }
    t:send("hello world, ")   -- outside a loop step: written at once, 7 bytes of it
    assert.is_true(t.want_write)
    t:send("second ")         -- queued behind the rest of the first
    t:send("third")
    for _ = 1, 10 do
      if not t.want_write then break end
      t:on_writable()
    end
    assert.is_false(t.want_write)
    assert.equal("hello world, second third", table.concat(written))
  end)
end)
