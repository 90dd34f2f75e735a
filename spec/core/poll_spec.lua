-- Specs of the poller (csrc/poll.c, docs/core.md "Poller") and of the loop built on it.
local core = require "xmppsm.core"
local socket = require "socket"
local poll_many = require "helpers.poll_many"
local process = require "helpers.process"

local BACKENDS = { "poll" }
if pcall(core.poller, { backend = "epoll" }) then table.insert(BACKENDS, 1, "epoll") end

-- A connected TCP pair on 127.0.0.1: `a` (client side) and `b` (accepted side), non-blocking.
local function tcp_pair()
  local srv = assert(socket.bind("127.0.0.1", 0))
  local host, port = srv:getsockname()
  local a = assert(socket.tcp())
  assert(a:connect(host, port))
  local b = assert(srv:accept())
  srv:close()
  a:settimeout(0)
  b:settimeout(0)
  return a, b
end

-- The ready list as { [fd] = flags }.
local function as_map(ready, n)
  local m = {}
  for i = 1, n do m[ready[2 * i - 1]] = ready[2 * i] end
  return m
end

for _, backend in ipairs(BACKENDS) do
  describe("core.poller (" .. backend .. ")", function()
    local p, a, b
    before_each(function()
      p = core.poller{ backend = backend }
      a, b = tcp_pair()
    end)
    after_each(function()
      p:close()
      a:close()
      b:close()
    end)

    it("names its backend and counts what it watches", function()
      assert.equal(backend, p:backend())
      assert.equal(0, p:count())
      assert.is_true(p:set(a:getfd(), true, false))
      assert.equal(1, p:count())
      assert.is_true(p:set(a:getfd(), true, true))   -- a change, not a second entry
      assert.equal(1, p:count())
      assert.is_true(p:set(b:getfd(), true, false))
      assert.equal(2, p:count())
      assert.is_true(p:remove(a:getfd()))
      assert.equal(1, p:count())
      assert.is_true(p:remove(a:getfd()))              -- not watched: nothing to do
      assert.is_true(p:set(b:getfd(), false, false))   -- the same as remove
      assert.equal(0, p:count())
      assert.matches("xmppsm.poller %(" .. backend .. ", 0 watched%)", tostring(p))
    end)

    it("reports readable and writable descriptors, level-triggered", function()
      local fa = a:getfd()
      assert.is_true(p:set(fa, true, false))
      local ready, n = p:wait(0)
      assert.equal(0, n)
      assert.same({}, ready)
      assert(b:send("hello"))
      ready, n = p:wait(1)
      assert.equal(1, n)
      assert.same({ fa, 1 }, ready)
      -- Still there until read: reported again.
      ready, n = p:wait(0)
      assert.equal(1, n)
      assert.same({ fa, 1 }, ready)
      assert.equal("hello", a:receive(5))
      ready, n = p:wait(0)
      assert.equal(0, n)
      assert.same({}, ready)
      -- Write interest: a connected socket with room in its buffer is writable.
      assert.is_true(p:set(fa, true, true))
      ready, n = p:wait(0)
      assert.equal(1, n)
      assert.same({ fa, 2 }, ready)
      assert(b:send("x"))
      ready, n = p:wait(1)
      assert.equal(1, n)
      assert.same({ fa, 3 }, ready)
    end)

    it("reports only the sides asked for", function()
      local fa = a:getfd()
      assert(b:send("data"))
      assert.is_true(p:set(fa, false, true))
      local ready = p:wait(0.5)
      assert.same({ fa, 2 }, ready)
      assert.is_true(p:set(fa, true, false))
      ready = p:wait(0.5)
      assert.same({ fa, 1 }, ready)
    end)

    it("reports a closed peer as readable, and an error on the side asked for", function()
      local fa = a:getfd()
      assert.is_true(p:set(fa, true, false))
      b:close()
      local ready, n = p:wait(1)
      assert.equal(1, n)
      assert.same({ fa, 1 }, ready)
      local _, err = a:receive(1)
      assert.equal("closed", err)
      -- A hang-up with nothing to read (a socket never connected): reported as readable too,
      -- the side watched, so that the read finds out.
      assert.is_true(p:remove(fa))
      local u = assert(socket.tcp4())
      finally(function() u:close() end)
      assert.is_true(p:set(u:getfd(), true, false))
      ready, n = p:wait(1)
      assert.equal(1, n)
      assert.same({ u:getfd(), 1 }, ready)
    end)

    it("refills a table it is given and cuts off what an earlier result left", function()
      local fa, fb = a:getfd(), b:getfd()
      local out = { "old", "old", "old", "old", "old", "old" }
      assert.is_true(p:set(fa, false, true))
      assert.is_true(p:set(fb, false, true))
      local ready, n = p:wait(0, out)
      assert.equal(out, ready)
      assert.equal(2, n)
      assert.equal(4, #out)
      assert.same({ [fa] = 2, [fb] = 2 }, as_map(out, n))
      assert.is_true(p:remove(fb))
      ready, n = p:wait(0, out)
      assert.equal(1, n)
      assert.same({ fa, 2 }, ready)
    end)

    it("waits up to the timeout, rounded up", function()
      assert.is_true(p:set(a:getfd(), true, false))
      local t0 = core.monotime()
      local _, n = p:wait(0.05)
      local dt = core.monotime() - t0
      assert.equal(0, n)
      assert.is_true(dt >= 0.049, "waited " .. dt)
      t0 = core.monotime()
      p:wait(0.0001)   -- a tenth of a millisecond: waits one millisecond, not zero
      assert.is_true(core.monotime() - t0 >= 0.0009)
    end)

    it("waits for ever with nil: until something happens, however late", function()
      local srv = assert(socket.bind("127.0.0.1", 0))
      finally(function() srv:close() end)
      local _, port = srv:getsockname()
      assert.is_true(p:set(srv:getfd(), true, false))
      -- A connection 0.3 s after the child starts (so after t0, however slow the start) makes
      -- the listening socket readable.
      local t0 = core.monotime()
      local child = process.spawn({ "lua5.4", "-e", ("local s = require 'socket'; s.sleep(0.3); "
        .. "assert(s.connect('127.0.0.1', %d)):close()"):format(port) }, { name = "late connect" })
      finally(function() child:stop(1) end)
      local ready, n = p:wait(nil)
      assert.is_true(core.monotime() - t0 >= 0.25, "returned before the connection")
      assert.equal(1, n)
      assert.same({ srv:getfd(), 1 }, ready)
    end)

    it("sleeps for the timeout when it watches nothing", function()
      local t0 = core.monotime()
      local ready, n = p:wait(0.02)
      assert.equal(0, n)
      assert.same({}, ready)
      assert.is_true(core.monotime() - t0 >= 0.019)
    end)

    it("refuses a closed descriptor with nil, err, errno", function()
      local fa = a:getfd()
      a:close()
      local ok, err, code = p:set(fa, true, false)
      assert.is_nil(ok)
      assert.matches("Bad file descriptor", err)
      assert.equal(9, code)
      assert.equal(0, p:count())
      -- Removing it is not an error (closing a descriptor already unregisters it from epoll).
      assert.is_true(p:remove(fa))
    end)

    it("raises on misuse", function()
      assert.has_error(function() p:set("3", true) end)
      assert.has_error(function() p:set(1.5, true) end)
      assert.has_error(function() p:set(-1, true) end)
      assert.has_error(function() p:wait("soon") end)
      assert.has_error(function() p:wait(0 / 0) end)
      assert.has_error(function() p:wait(0, "not a table") end)
      assert.has_error(function() p.count({}) end)
    end)

    it("closes idempotently, by close, __close and __gc, and raises when used closed", function()
      p:close()
      p:close()
      assert.matches("closed", tostring(p))
      assert.has_error(function() p:set(a:getfd(), true) end, "attempt to use a closed xmppsm.poller")
      assert.has_error(function() p:wait(0) end, "attempt to use a closed xmppsm.poller")
      assert.has_error(function() p:count() end, "attempt to use a closed xmppsm.poller")
      local scoped
      do
        local q <close> = core.poller{ backend = backend }
        assert.is_true(q:set(b:getfd(), true, false))
        scoped = q
      end
      assert.matches("closed", tostring(scoped))
      assert.has_error(function() scoped:count() end, "attempt to use a closed xmppsm.poller")
      -- Collected unclosed: what they hold is freed (the sanitizer and valgrind runs see leaks).
      for _ = 1, 50 do core.poller{ backend = backend } end
      collectgarbage()
      collectgarbage()
    end)

    it("keeps many descriptors straight through additions and removals", function()
      local socks, expect = {}, {}
      for i = 1, 40 do
        local s = assert(socket.udp())
        assert(s:setsockname("127.0.0.1", 0))
        socks[i] = s
        assert.is_true(p:set(s:getfd(), false, true))
      end
      -- Remove every third, from the middle of the set.
      for i = 1, 40 do
        if i % 3 == 0 then assert.is_true(p:remove(socks[i]:getfd()))
        else expect[socks[i]:getfd()] = 2 end
      end
      local ready, n = p:wait(0)
      assert.equal(p:count(), n)
      assert.same(expect, as_map(ready, n))
      for _, s in ipairs(socks) do s:close() end
    end)
  end)
end

describe("core.poller", function()
  it("refuses an unknown backend", function()
    assert.has_error(function() core.poller{ backend = "kqueue-on-linux" } end)
    assert.has_error(function() core.poller{ backend = 1 } end)
    assert.has_error(function() core.poller("epoll") end)
  end)

  it("defaults to epoll on Linux", function()
    local p = core.poller()
    if io.open("/proc/self/stat") then assert.equal("epoll", p:backend()) end
    p:close()
  end)
end)

describe("more than 1024 descriptors (select()'s limit)", function()
  it("are watched by the poller and by the loop", function()
    local N = 1100
    local facts
    local soft, hard = poll_many.limits()
    if not soft or soft >= N + 100 then
      facts = poll_many.run(N)
    else
      -- Raise the soft limit in a child (up to the hard limit, no privilege needed); with a
      -- hard limit too low for that, check as many descriptors as it allows.
      local limit = math.min(N + 200, hard)
      if limit < N + 100 then N = limit - 100 end
      local cmd = string.format(
        "ulimit -Sn %d && exec lua5.4 -e 'package.path=%q; package.cpath=%q' spec/helpers/poll_many.lua %d",
        limit, package.path, package.cpath, N)
      local p = assert(io.popen("bash -c " .. string.format("%q", cmd) .. " 2>&1"))
      local out = p:read("a")
      p:close()
      facts = {}
      for k, v in out:gmatch("(%S+)=(%S+)") do facts[k] = tonumber(v) or v end
      assert.is_not_nil(facts.max_fd, "the child failed:\n" .. out)
    end
    for _, backend in ipairs(BACKENDS) do
      assert.equal(N, facts[backend .. "_count"])
      assert.equal(0, facts[backend .. "_quiet"])
      assert.equal(1, facts[backend .. "_ready"])
      assert.equal(facts.max_fd, facts[backend .. "_ready_fd"])
      assert.equal(1, facts[backend .. "_ready_flags"])
      assert.equal(N, facts[backend .. "_writable"])
    end
    assert.equal(0, facts.loop_quiet)
    assert.equal(1, facts.loop_seen)
    assert.equal(N, facts.loop_seen_index)
    if facts.max_fd <= 1024 then
      pending("the hard descriptor limit (" .. tostring(hard) .. ") allows only " .. N ..
              " sockets: checked those, not past 1024")
    end
  end)
end)

describe("xmppsm.loop on the poller", function()
  local loop = require "xmppsm.loop"

  it("calls a handler again while its socket holds buffered bytes (LuaSocket or TLS)", function()
    local a, b = tcp_pair()
    local lines = {}
    local w = { sock = a, want_write = false }
    function w.on_readable()
      -- One line per call: the rest stays in LuaSocket's buffer, invisible to the kernel.
      local line = a:receive("*l")
      if line then lines[#lines + 1] = line end
    end
    function w.on_writable() end
    loop.watch(w)
    assert(b:send("one\ntwo\nthree\n"))
    local deadline = core.monotime() + 2
    while #lines < 3 and core.monotime() < deadline do loop.step(0.05) end
    loop.unwatch(w)
    a:close() b:close()
    assert.same({ "one", "two", "three" }, lines)
  end)

  it("follows want_write changes made by a handler and by loop.update", function()
    local a, b = tcp_pair()
    local writes = 0
    local w = { sock = a, want_write = true, want_read = false }
    function w.on_readable() end
    function w.on_writable()
      writes = writes + 1
      w.want_write = false          -- read back after the handler
    end
    loop.watch(w)
    for _ = 1, 5 do loop.step(0) end
    assert.equal(1, writes)
    w.want_write = true
    for _ = 1, 3 do loop.step(0) end
    assert.equal(1, writes)        -- not told: not re-read
    loop.update(w)
    for _ = 1, 3 do loop.step(0) end
    assert.equal(2, writes)
    loop.unwatch(w)
    loop.update(w)                  -- unwatched: nothing happens
    a:close() b:close()
  end)

  it("does not hand an old socket's readiness to a new one on the same descriptor", function()
    local a, b = tcp_pair()
    local c, d = tcp_pair()
    local srv = assert(socket.bind("127.0.0.1", 0))
    local calls, old_fd, e, e_fd, f, we = {}, c:getfd(), nil, nil, nil, nil
    local wa = { sock = a, want_write = false }
    local wc = { sock = c, want_write = false }
    function wa.on_readable()
      calls[#calls + 1] = "a"
      -- In the same step: unwatches and closes c, and watches a new socket, e, on c's
      -- descriptor. e has nothing to read: c's readiness must not reach it.
      loop.unwatch(wc)
      c:close()
      local spare = {}
      repeat   -- the lowest free descriptor is c's, unless an earlier one is free too
        e = assert(socket.tcp4())
        if e:getfd() ~= old_fd then spare[#spare + 1] = e end
      until e:getfd() == old_fd or #spare > 50
      for _, s in ipairs(spare) do if s ~= e then s:close() end end
      e_fd = e:getfd()
      assert(e:connect(srv:getsockname()))
      f = assert(srv:accept())
      we = { sock = e, want_write = false, on_writable = function() end }
      function we.on_readable() calls[#calls + 1] = "e" end
      loop.watch(we)
    end
    function wc.on_readable() calls[#calls + 1] = "c" end
    wa.on_writable, wc.on_writable = function() end, function() end
    loop.watch(wa)
    loop.watch(wc)
    loop.step(0)
    assert(b:send("x"))
    assert(d:send("y"))
    socket.sleep(0.05)
    loop.step(0.5)
    loop.unwatch(wa)
    if we then loop.unwatch(we) end
    for _, s in ipairs({ a, b, d, e, f, srv }) do s:close() end
    assert.equal(old_fd, e_fd)
    assert.same({ "a" }, calls)
  end)

  it("still sleeps on timers alone", function()
    local fired = false
    loop.after(0.02, function() fired = true end)
    local t0 = core.monotime()
    while not fired and core.monotime() - t0 < 1 do loop.step(nil) end
    assert.is_true(fired)
    assert.is_true(core.monotime() - t0 >= 0.019)
  end)
end)
