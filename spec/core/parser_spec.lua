-- Specs for the stream parser in csrc/parser.c (contract: docs/core.md, "Parser").
local core = require "xmppsm.core"

local STREAMS = "http://etherx.jabber.org/streams"
local HDR = "<stream:stream xmlns='jabber:client' xmlns:stream='" .. STREAMS
  .. "' to='example.com' version='1.0'>"
local CLOSE = "</stream:stream>"

-- Every spec here runs twice: with the parser's `lazy` option off (eager) and on. `new_parser`
-- is core.parser with that option added; LAZY is set per mode before each test.
local LAZY = false
local function new_parser(opts)
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then return core.parser(opts) end
  local o = { lazy = LAZY }
  for k, v in pairs(opts) do o[k] = v end
  return core.parser(o)
end

local function fixture(name)
  local f = assert(io.open("spec/fixtures/" .. name, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

-- Feeds `data` to `p` in pieces of `step` bytes (all at once when nil); returns the events as
-- a list of {kind, a, b}.
local function feed(p, data, step)
  local out = {}
  step = step or math.max(#data, 1)
  for i = 1, math.max(#data, 1), step do
    local ev, n = p:feed(data:sub(i, i + step - 1))
    assert.equal(3 * n, #ev)
    for k = 1, n do
      out[#out + 1] = { kind = ev[3 * k - 2], a = ev[3 * k - 1], b = ev[3 * k] }
    end
  end
  return out
end

local function kinds(events)
  local t = {}
  for i, e in ipairs(events) do t[i] = e.kind end
  return table.concat(t, " ")
end

-- Checks the element-table shape of docs/core.md: only name, attr, tags and 1..n; `tags` holds
-- exactly the element children, in order. Plain asserts: it runs for every element of every
-- split, and luassert's are far slower.
local function check_element(e)
  assert(type(e.name) == "string" and type(e.attr) == "table" and type(e.tags) == "table", "element shape")
  local n, tags = 0, 0
  for k, v in pairs(e) do
    if type(k) == "number" then
      n = n + 1
    else
      assert(k == "name" or k == "attr" or k == "tags", "unexpected key " .. tostring(k))
    end
    if k == "attr" then
      for ak, av in pairs(v) do assert(type(ak) == "string" and type(av) == "string", "attribute types") end
    end
  end
  assert(n == #e, "children are not a sequence")
  for i = 1, #e do
    if type(e[i]) == "table" then
      tags = tags + 1
      assert(e[i] == e.tags[tags], "tags out of step with children")
      check_element(e[i])
    else
      assert(type(e[i]) == "string", "child is neither element nor text")
      assert(type(e[i - 1]) ~= "string", "adjacent text must be one string")
    end
  end
  assert(tags == #e.tags, "tags holds more than the element children")
end

-- A canonical string for an event value, to compare runs: strings length-prefixed, attributes
-- sorted, children in order.
local dump_into
local function dump_attrs(buf, attr)
  local keys = {}
  for k in pairs(attr) do keys[#keys + 1] = k end
  table.sort(keys)
  for _, k in ipairs(keys) do
    local v = attr[k]
    buf[#buf + 1] = #k .. ":" .. k .. "=" .. #v .. ":" .. v
  end
end

function dump_into(buf, v)
  if type(v) ~= "table" then
    buf[#buf + 1] = type(v) == "string" and #v .. ":" .. v or tostring(v)
  elseif v.name == nil then
    buf[#buf + 1] = "{"
    dump_attrs(buf, v)
    buf[#buf + 1] = "}"
  else
    buf[#buf + 1] = "<" .. v.name
    dump_attrs(buf, v.attr)
    buf[#buf + 1] = ">"
    for i = 1, #v do dump_into(buf, v[i]) end
    buf[#buf + 1] = "</>"
  end
end

local function dump(v)
  local buf = {}
  dump_into(buf, v)
  return table.concat(buf, " ")
end

-- Runs a whole transcript, pieces sized by `next_size()`, following stream restarts the way a
-- client does (reset, then feed the leftover). Returns the events as comparable strings.
local function run(data, opts, next_size)
  local p = new_parser(opts)
  local out = {}
  local pos = 1
  while pos <= #data do
    local n = next_size()
    local ev, cnt = p:feed(data:sub(pos, pos + n - 1))
    pos = pos + n
    for k = 1, cnt do
      local kind, a, b = ev[3 * k - 2], ev[3 * k - 1], ev[3 * k]
      if kind == "stanza" then check_element(a) end
      out[#out + 1] = kind .. " " .. dump(a) .. " " .. dump(b)
    end
    if p:state() == "paused" then
      out[#out + 1] = "reset"
      data = p:reset() .. data:sub(pos)
      pos = 1
    end
  end
  out[#out + 1] = "state " .. p:state()
  p:close()
  return out
end

-- Under valgrind or ASan everything runs 20-50 times slower; some loops then sample.
local under_tool = (function()
  local maps = io.open("/proc/self/maps")
  if not maps then return false end
  local m = maps:read("a")
  maps:close()
  return m:find("libasan", 1, true) ~= nil or m:find("vgpreload", 1, true) ~= nil
end)()

local function whole(data) return function() return #data end end

-- Offsets (0-based) where each reported unit of a transcript starts and ends.
local function unit_bounds(data)
  local p = new_parser()
  local bounds, rest, from = {}, data, 1
  while #rest > 0 do
    local ev, n = p:feed(rest)
    rest = ""
    for k = 1, n do
      local raw = ev[3 * k]
      local at = data:find(raw, from, true)
      if #raw > 0 and at then
        bounds[#bounds + 1], bounds[#bounds + 2] = at - 1, at - 1 + #raw
        from = at + #raw
      end
    end
    if p:state() == "paused" then rest = p:reset() end
  end
  return bounds
end
local function steps(n) return function() return n end end

for _, lazy in ipairs { false, true } do
describe("xmppsm.core parser (lazy = " .. tostring(lazy) .. ")", function()
  before_each(function() LAZY = lazy end)

  describe("a normal stream", function()
    local input = "<?xml version='1.0'?>" .. HDR:gsub("version", "xml:lang='en' version") .. "\n  "
      .. "<message to='a@b/c' type='chat' xml:lang='de' xmlns:e='urn:e' e:foo='bar'>"
      .. "<body>Hi &amp; &lt;there&gt; &#x263A; <![CDATA[<raw> & ]]>end</body>"
      .. "<x xmlns='urn:x'><y/><z xmlns='jabber:client'/>  text\n</x>"
      .. "<p:q xmlns:p='urn:p' p:a='1' b='2'/>"
      .. "</message>\r\n\t"
      .. "<enabled xmlns='urn:xmpp:sm:3' id='some-id' resume='true'/>"
      .. "<iq xmlns='' type='get'/>"
      .. CLOSE

    it("reports the header, each stanza and the close, with exact raw bytes", function()
      local p = new_parser()
      assert.equal("header", p:state())
      local ev = feed(p, input)
      assert.equal("header stanza stanza stanza close", kinds(ev))
      assert.equal("closed", p:state())

      local h = ev[1]
      assert.same({ to = "example.com", version = "1.0", ["xml:lang"] = "en", xmlns = "jabber:client" }, h.a)
      assert.equal("<?xml version='1.0'?>" .. HDR:gsub("version", "xml:lang='en' version"), h.b)

      local m = ev[2].a
      check_element(m)
      assert.equal("message", m.name)
      assert.same({ to = "a@b/c", type = "chat", ["xml:lang"] = "de", ["urn:e\1foo"] = "bar" }, m.attr)
      assert.equal(3, #m)
      local body, x, q = m[1], m[2], m[3]
      assert.same({ name = "body", attr = {}, tags = {}, "Hi & <there> \226\152\186 <raw> & end" }, body)
      assert.equal("x", x.name)
      assert.same({ xmlns = "urn:x" }, x.attr)
      assert.same({ name = "y", attr = {}, tags = {} }, x[1])
      assert.same({ name = "z", attr = { xmlns = "jabber:client" }, tags = {} }, x[2])
      assert.equal("  text\n", x[3])
      assert.same({ name = "q", attr = { xmlns = "urn:p", ["urn:p\1a"] = "1", b = "2" }, tags = {} }, q)
      assert.equal(input:match("<message.-</message>"), ev[2].b)

      assert.same({ name = "enabled", attr = { xmlns = "urn:xmpp:sm:3", id = "some-id", resume = "true" },
        tags = {} }, ev[3].a)
      assert.equal("<enabled xmlns='urn:xmpp:sm:3' id='some-id' resume='true'/>", ev[3].b)
      assert.same({ name = "iq", attr = { xmlns = "", type = "get" }, tags = {} }, ev[4].a)
      assert.equal("<iq xmlns='' type='get'/>", ev[4].b)

      assert.is_false(ev[5].a)
      assert.equal(CLOSE, ev[5].b)
    end)

    it("leaves out stanzas' raw bytes after set_raw(false), and only those", function()
      local p = new_parser()
      local want = feed(new_parser(), input)
      assert.has_error(function() p:set_raw(nil) end)
      assert.has_error(function() p:set_raw("no") end)
      p:set_raw(false)
      local head = input:match("^.-<message")
      head = head:sub(1, -9)
      local rest = input:sub(#head + 1)
      local ev = feed(p, head)                      -- the header: its raw bytes all the same
      assert.equal("header", kinds(ev))
      assert.equal(want[1].b, ev[1].b)
      local split = rest:find("<iq", 1, true)
      ev = feed(p, rest:sub(1, split - 1))          -- two stanzas without raw bytes
      assert.equal("stanza stanza", kinds(ev))
      assert.is_false(ev[1].b)
      assert.is_false(ev[2].b)
      for i = 1, 2 do
        assert.same(core.materialize(want[i + 1].a), core.materialize(ev[i].a))
      end
      p:set_raw(true)                               -- and with them again
      ev = feed(p, rest:sub(split))
      assert.equal("stanza close", kinds(ev))
      assert.equal(want[4].b, ev[1].b)
      assert.equal(want[5].b, ev[2].b)
    end)

    it("gives the same events fed one byte at a time", function()
      assert.same(run(input, nil, whole(input)), run(input, nil, steps(1)))
    end)

    it("reports each event from the feed call that receives its last byte", function()
      local p = new_parser()
      local stanza = "<message><body>x</body></message>"
      local _, n = p:feed(HDR:sub(1, -2))
      assert.equal(0, n)
      _, n = p:feed(">")
      assert.equal(1, n)
      _, n = p:feed(stanza:sub(1, -2))
      assert.equal(0, n)
      local ev
      ev, n = p:feed(">")
      assert.equal(1, n)
      assert.equal(stanza, ev[3])
      _, n = p:feed("<a/")
      assert.equal(0, n)
      ev, n = p:feed(">")
      assert.equal(1, n)
      assert.equal("<a/>", ev[3])
      _, n = p:feed("")
      assert.equal(0, n)
    end)

    it("keeps text inside a stanza exactly, whitespace too, as one string", function()
      local p = new_parser()
      local ev = feed(p, HDR .. "<message>\n  <body>  a\n\n b  </body>\n  \t</message>", 3)
      local m = ev[2].a
      check_element(m)
      assert.equal(3, #m)
      assert.equal("\n  ", m[1])
      assert.equal("  a\n\n b  ", m[2][1])
      assert.equal("\n  \t", m[3])
    end)

    it("normalizes line ends in text as XML requires, and keeps them in the raw bytes", function()
      local p = new_parser()
      local ev = feed(p, HDR .. "<m>a\r\nb\rc</m>")
      assert.equal("a\nb\nc", ev[2].a[1])
      assert.equal("<m>a\r\nb\rc</m>", ev[2].b)
    end)

    it("drops whitespace between stanzas and accepts whitespace keepalives", function()
      local p = new_parser()
      local ev = feed(p, HDR .. " \n\t\r\n" .. "<a/>" .. "   " .. "<b/>" .. " ")
      assert.equal("header stanza stanza", kinds(ev))
      for _ = 1, 100 do
        local _, n = p:feed(" ")
        assert.equal(0, n)
      end
      assert.equal("stanza", feed(p, "<c/>")[1].kind)
      assert.equal("open", p:state())
    end)

    it("is idle when open with every byte fed part of a stanza reported", function()
      local p = new_parser()
      assert.is_false(p:idle())               -- no header yet
      feed(p, "<?xml version='1.0'?>")
      assert.is_false(p:idle())
      feed(p, HDR)
      assert.is_true(p:idle())
      for _, step in ipairs {
        { "<message to='a'>", false }, { "<body>hi</body>", false }, { "</message>", true },
        { " \n ", true },                      -- whitespace between stanzas
        { "<iq", false }, { " type='get'/", false }, { ">", true },
        { "<a/><b", false }, { "/>", true },
      } do
        feed(p, step[1])
        assert.equal(step[2], p:idle(), step[1])
      end
      local paused = new_parser()
      feed(paused, HDR .. "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
      assert.equal("paused", paused:state())
      assert.is_false(paused:idle())
      feed(p, CLOSE)
      assert.is_false(p:idle())               -- closed
      local failed = new_parser()
      feed(failed, HDR .. "<a></b>")
      assert.is_false(failed:idle())
      failed:reset()
      feed(failed, HDR)
      assert.is_true(failed:idle())
    end)

    it("accepts a UTF-8 byte-order mark and encoding='utf-8', kept in the header's raw bytes", function()
      local head = "\239\187\191<?xml version='1.0' encoding='utf-8'?>\n" .. HDR
      local p = new_parser()
      local ev = feed(p, head .. "<a/>", 1)
      assert.equal("header stanza", kinds(ev))
      assert.equal(head, ev[1].b)
    end)

    it("reports an empty root element as a header and a close", function()
      local p = new_parser()
      local ev = feed(p, HDR:sub(1, -2) .. "/>")
      assert.equal("header close", kinds(ev))
      assert.equal("", ev[2].b)
      assert.equal("closed", p:state())
    end)

    it("accepts whitespace after the close", function()
      local p = new_parser()
      assert.equal("header close", kinds(feed(p, HDR .. CLOSE .. " \n ")))
      assert.equal("closed", p:state())
    end)

    it("accepts the stream prefix bound to any name, or a stanza prefix declared on the header", function()
      local p = new_parser()
      local ev = feed(p, "<s:stream xmlns:s='" .. STREAMS .. "' xmlns='jabber:client'"
        .. " xmlns:db='jabber:server:dialback'>"
        .. "<db:result from='a' to='b'>key</db:result><message/></s:stream>")
      assert.equal("header stanza stanza close", kinds(ev))
      assert.same({ name = "result", attr = { xmlns = "jabber:server:dialback", from = "a", to = "b" },
        tags = {},
        "key" }, ev[2].a)
      assert.same({ name = "message", attr = {}, tags = {} }, ev[3].a)
    end)

    it("checks the default namespace against content_ns", function()
      local server = HDR:gsub("jabber:client", "jabber:server")
      local p = new_parser { content_ns = "jabber:server" }
      local ev = feed(p, server .. "<message/><x xmlns='jabber:client'/>")
      assert.equal("header stanza stanza", kinds(ev))
      assert.equal("jabber:server", ev[1].a.xmlns)
      assert.same({}, ev[2].a.attr)
      assert.same({ xmlns = "jabber:client" }, ev[3].a.attr)
      p = new_parser { content_ns = "jabber:server" }
      ev = feed(p, HDR)
      assert.equal("error", ev[1].kind)
      assert.equal("invalid-namespace", ev[1].a)
    end)

    it("gives every element table the stanza_mt metatable, and nothing else", function()
      local mt = { __index = { is_stanza = true } }
      local p = new_parser { stanza_mt = mt }
      local ev = feed(p, HDR .. "<message><body>x</body><x xmlns='urn:x'><y/></x></message>")
      assert.is_nil(getmetatable(ev[1].a))
      local m = ev[2].a
      if LAZY then -- the lazy metatable switches to stanza_mt on first use
        assert.not_equal(mt, getmetatable(m))
        assert.equal(mt, rawget(getmetatable(m), "__xmppsm_stanza_mt"))
        assert.equal(m, core.materialize(m))
      end
      assert.equal(mt, getmetatable(m))
      assert.equal(mt, getmetatable(m[1]))
      assert.equal(mt, getmetatable(m[2][1]))
      assert.is_nil(getmetatable(m.attr))
      assert.is_nil(getmetatable(m.tags))
      assert.is_true(m[2][1].is_stanza)
      assert.is_nil(getmetatable(new_parser():feed(HDR .. "<a/>")[5]))
    end)

    it("fills tables with raw sets, so a __newindex in stanza_mt never runs", function()
      local called = false
      local p = new_parser { stanza_mt = { __newindex = function() called = true end } }
      local ev = feed(p, HDR .. "<message><body>x</body></message>")
      assert.equal("x", ev[2].a[1][1])
      assert.is_false(called)
    end)
  end)

  describe("recorded Prosody transcripts", function()
    local names = { "prosody-session.xml", "prosody-badauth.xml", "prosody-badxml.xml" }

    it("parse as expected", function()
      local session = run(fixture("prosody-session.xml"), nil, whole(fixture("prosody-session.xml")))
      local ks = {}
      for i, e in ipairs(session) do ks[i] = e:match("^%S+") end
      assert.equal("header stanza stanza reset header stanza stanza stanza stanza stanza stanza stanza "
        .. "stanza "
        .. "stanza stanza stanza stanza stanza stanza stanza stanza close state",
        table.concat(ks, " "))
      assert.matches("^stanza <success ", session[3])
      local bad = run(fixture("prosody-badxml.xml"), nil, whole(fixture("prosody-badxml.xml")))
      assert.matches("^stanza <error .*<not%-well%-formed ", bad[#bad - 2])
      assert.equal("state closed", bad[#bad])
      local auth = run(fixture("prosody-badauth.xml"), nil, whole(fixture("prosody-badauth.xml")))
      assert.matches("^stanza <failure .*you've sent", auth[3])
    end)

    it("have raw bytes that rebuild the transcript exactly, with only whitespace left out", function()
      for _, name in ipairs(names) do
        local data = fixture(name)
        local p = new_parser()
        local rebuilt, rest = {}, data
        while #rest > 0 do
          local ev, n = p:feed(rest)
          rest = ""
          for k = 1, n do rebuilt[#rebuilt + 1] = ev[3 * k] end
          if p:state() == "paused" then rest = p:reset() end
        end
        assert.equal(data, table.concat(rebuilt), name)
      end
    end)

    for _, name in ipairs(names) do
      it("give identical events for every split in two pieces and one byte at a time: " .. name, function()
        local data = fixture(name)
        local ref = run(data, nil, whole(data))
        assert.same(ref, run(data, nil, steps(1)))
        -- under a memory checker: every 13th split, and all splits near the start or end of a unit
        local near = {}
        if under_tool then
          for _, at in ipairs(unit_bounds(data)) do
            for d = -2, 2 do near[at + d] = true end
          end
        end
        for k = 0, #data do
          if under_tool and k % 13 ~= 0 and not near[k] then goto next_split end
          local first = true
          local got = run(data, nil, function()
            if first then
              first = false
              return k
            end
            return #data
          end)
          if not (#got == #ref and table.concat(got, "\0") == table.concat(ref, "\0")) then
            assert.same(ref, got, "split at " .. k)
          end
          ::next_split::
        end
      end)

      it("give identical events with random chunking and a limit just large enough: " .. name, function()
        local data = fixture(name)
        local ref = run(data, nil, whole(data))
        -- the tightest max_stanza_size that still accepts every unit, so the parser also resets
        -- expat and replays the header ("rebase") every few stanzas
        local biggest = 0
        local p = new_parser()
        local rest = data
        while #rest > 0 do
          local ev, n = p:feed(rest)
          rest = ""
          for i = 1, n do biggest = math.max(biggest, #ev[3 * i]) end
          if p:state() == "paused" then rest = p:reset() end
        end
        local opts = { max_stanza_size = biggest }
        -- in pieces of at most the limit: while paused it keeps no more than that
        assert.same(ref, run(data, opts, steps(biggest)))
        assert.same(ref, run(data, opts, steps(1)))
        local rng = 12345
        for _ = 1, 40 do
          assert.same(ref, run(data, opts, function()
            rng = (rng * 1103515245 + 12345) % 2147483648
            return 1 + rng % 97
          end))
        end
        local tight = run(data, { max_stanza_size = biggest - 1 }, steps(biggest))
        assert.matches("^error 16:policy%-violation ", tight[#tight - 1])
      end)
    end
  end)

  describe("hostile input", function()
    -- Feeds `input` whole and one byte at a time; each must end in exactly one error event with
    -- `cond`, after any events listed in `before`.
    local function expect_error(input, cond, before, opts)
      for _, step in ipairs { false, 1 } do
        local p = new_parser(opts)
        local ev = feed(p, input, step or nil)
        local last = ev[#ev]
        assert.equal(((before and before .. " ") or "") .. "error", kinds(ev), "step " .. tostring(step))
        assert.equal(cond, last.a, last.b)
        assert.is_string(last.b)
        assert.equal("failed", p:state())
        local _, n = p:feed(HDR .. "<message/>" .. CLOSE)
        assert.equal(0, n)
        assert.equal("failed", p:state())
      end
    end

    it("refuses a DOCTYPE, with or without entity declarations", function()
      expect_error("<!DOCTYPE stream>" .. HDR, "restricted-xml")
      expect_error("<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;'>]>"
        .. HDR .. "<message><body>&lol2;</body></message>", "restricted-xml")
    end)

    it("refuses comments anywhere", function()
      expect_error("<!-- hi -->" .. HDR, "restricted-xml")
      expect_error(HDR .. "<!-- hi -->", "restricted-xml", "header")
      expect_error(HDR .. "<message><!-- hi --></message>", "restricted-xml", "header")
      expect_error(HDR .. CLOSE .. "<!-- bye -->", "restricted-xml", "header close")
    end)

    it("refuses processing instructions but allows the XML declaration", function()
      expect_error("<?xml version='1.0'?><?style x?>" .. HDR, "restricted-xml")
      expect_error(HDR .. "<message><?pi data?></message>", "restricted-xml", "header")
      expect_error(HDR .. "<?pi data?>", "restricted-xml", "header")
    end)

    it("refuses entity references other than the predefined ones", function()
      expect_error(HDR .. "<message>&nbsp;</message>", "restricted-xml", "header")
      expect_error(HDR .. "<message a='&foo;'/>", "restricted-xml", "header")
    end)

    it("refuses encodings other than UTF-8", function()
      expect_error("<?xml version='1.0' encoding='ISO-8859-1'?>" .. HDR, "unsupported-encoding")
      expect_error("<?xml version='1.0' encoding='UTF-16'?>" .. HDR, "unsupported-encoding")
      local function utf16(s, le)
        return (s:gsub(".", function(c) return le and c .. "\0" or "\0" .. c end))
      end
      expect_error("\255\254" .. utf16(HDR, true), "unsupported-encoding")
      expect_error("\254\255" .. utf16(HDR, false), "unsupported-encoding")
      expect_error("\255\254", "unsupported-encoding")
      -- a lone FE or FF that is not a byte-order mark is simply bad UTF-8
      expect_error("\255<", "not-well-formed")
      -- expat would switch to UTF-16 on "<\0" or "\0<" too; NUL is never allowed in XML
      expect_error(utf16(HDR, true), "unsupported-encoding")
      expect_error(utf16(HDR, false), "unsupported-encoding")
      expect_error("\0\0\0<", "unsupported-encoding")
      expect_error("<\0\0\0", "unsupported-encoding")
      -- found by the fuzzer: expat takes any NUL in the first two bytes for UTF-16
      expect_error("r\0\0", "unsupported-encoding")
      expect_error(" \0", "unsupported-encoding")
    end)

    it("waits for the second byte before judging the encoding", function()
      local p = new_parser()
      local _, n = p:feed("\255")
      assert.equal(0, n)
      assert.equal("header", p:state())
      local ev = feed(p, "\254")
      assert.equal("unsupported-encoding", ev[1].a)
      -- reset hands back a first byte still held for that check
      p = new_parser()
      p:feed("\254")
      assert.equal("\254", p:reset())
      assert.equal(0, select(2, p:feed("<")))
      assert.equal("<", p:reset())
      p:close()
    end)

    it("refuses invalid UTF-8 and characters XML does not allow", function()
      local bad = {
        "\255", "\192\175", "\237\160\128", "\244\144\128\128", "\226\130", "\1", "\27", "\0",
        "\239\191\190", "\239\191\191", "&#1;", "&#0;", "&#xFFFE;", "&#xD800;", "&#x110000;",
      }
      for _, b in ipairs(bad) do
        expect_error(HDR .. "<message><body>ok" .. b .. "</body></message>", "not-well-formed", "header")
      end
      expect_error(HDR .. "<message to='\255'/>", "not-well-formed", "header")
      expect_error((HDR:gsub("example", "ex\255ample")), "not-well-formed")
    end)

    it("checks the stream's root element and namespaces", function()
      expect_error("<stream:stream xmlns='jabber:client' xmlns:stream='urn:wrong'>", "invalid-namespace")
      expect_error("<stream xmlns='jabber:client'>", "invalid-namespace")
      expect_error("<message xmlns='jabber:client'>", "invalid-namespace")
      expect_error("<stream:stream xmlns:stream='" .. STREAMS .. "'>", "invalid-namespace")
      expect_error("<stream:stream xmlns='jabber:server' xmlns:stream='" .. STREAMS .. "'>",
        "invalid-namespace")
      expect_error("<stream xmlns='" .. STREAMS .. "'>", "invalid-namespace")
      expect_error("<stream:features xmlns='jabber:client' xmlns:stream='" .. STREAMS .. "'>", "bad-format")
      expect_error("<stream:stream xmlns='jabber:client'>", "not-well-formed") -- unbound prefix
    end)

    it("refuses anything but whitespace between stanzas", function()
      expect_error(HDR .. "hello", "bad-format", "header")
      expect_error(HDR .. "<a/> x <b/>", "bad-format", "header stanza")
      expect_error(HDR .. "&#32;", "bad-format", "header")
      expect_error(HDR .. "&amp;", "bad-format", "header")
      expect_error(HDR .. "<![CDATA[ ]]>", "bad-format", "header")
      expect_error(HDR .. "\194\160", "bad-format", "header") -- no-break space is not XML whitespace
      -- whatever expat thinks of it, text there is bad-format (found by the fuzzer: expat rejects
      -- " x ]]>" as one token without reporting the text when it arrives in one piece)
      expect_error(HDR .. "<a/> x ]]><b/>", "bad-format", "header stanza")
      expect_error(HDR .. "x\255", "bad-format", "header")
      expect_error(HDR .. " &bogus;", "bad-format", "header")
      expect_error(HDR .. "&#1;", "bad-format", "header")
      -- but a broken tag there is not text
      expect_error(HDR .. " <a b=1/>", "not-well-formed", "header")
      expect_error(HDR .. "\255", "bad-format", "header")
    end)

    it("maps other expat errors to not-well-formed, with expat's message and the byte position", function()
      expect_error(HDR .. "<message></iq>", "not-well-formed", "header")
      expect_error(HDR .. "<p:message/>", "not-well-formed", "header")
      expect_error(HDR .. "<message a='1' a='2'/>", "not-well-formed", "header")
      expect_error(HDR .. "<message a=1/>", "not-well-formed", "header")
      expect_error(HDR .. CLOSE .. "<message/>", "not-well-formed", "header close")
      expect_error("<?xml version='1.0'?> <?xml version='1.0'?>" .. HDR, "not-well-formed")
      local p = new_parser()
      local ev = feed(p, HDR .. "<message></iq>")
      assert.equal("mismatched tag at byte " .. (#HDR + 11), ev[2].b)
    end)

    it("refuses what Namespaces in XML forbids, naming the problem and the name", function()
      local cases = {
        -- unbound prefixes: an element's, an attribute's, one declared only on a sibling
        { "<p:message/>", "an undeclared namespace prefix: 'p:message'" },
        { "<message p:a='1'/>", "an undeclared namespace prefix: 'p:a'" },
        { "<message xmlns:xmlns='urn:x'/>", "a reserved prefix (xml, xmlns) declared: 'xmlns:xmlns'" },
        { "<message><a xmlns:p='urn:p'/><p:b/></message>", "an undeclared namespace prefix: 'p:b'", "<p:b" },
        { "<xmlns:message/>", "an undeclared namespace prefix: 'xmlns:message'" },
        { "<message><xml:q/></message>", "an element in the XML namespace", "<xml:q" },
        -- the reserved prefixes and namespaces
        { "<message xmlns:xml='urn:x'/>", "a reserved prefix (xml, xmlns) declared: 'xmlns:xml'" },
        { "<message xmlns:x='http://www.w3.org/XML/1998/namespace'/>", "a reserved namespace" },
        { "<message xmlns='http://www.w3.org/XML/1998/namespace'/>", "a reserved namespace" },
        { "<message xmlns:x='http://www.w3.org/2000/xmlns/'/>", "a reserved namespace" },
        { "<message xmlns='http://www.w3.org/2000/xmlns/'/>", "a reserved namespace" },
        -- a prefix cannot be undeclared in XML 1.0
        { "<message xmlns:p='urn:p'><a xmlns:p=''/></message>", "a prefix undeclared (xmlns:p='')", "<a " },
        -- names that are not qualified names
        { "<a:b:c xmlns:a='urn:a'/>", "a name that is not a qualified name: 'a:b:c'" },
        { "<message x:y:z='1' xmlns:x='urn:x'/>", "a name that is not a qualified name: 'x:y:z'" },
        { "<message :a='1'/>", "a name that is not a qualified name: ':a'" },
        { "<message a:='1' xmlns:a='urn:a'/>", "a name that is not a qualified name: 'a:'" },
        { "<message a:1='1' xmlns:a='urn:a'/>", "a name that is not a qualified name: 'a:1'" },
        { "<message a:-b='1' xmlns:a='urn:a'/>", "a name that is not a qualified name: 'a:-b'" },
        { "<message a:\204\128='1' xmlns:a='urn:a'/>", "a name that is not a qualified name" }, -- U+0300
        { "<message xmlns:='urn:a'/>", "a name that is not a qualified name: 'xmlns:'" },
        -- one attribute twice once expanded (two prefixes, one namespace)
        { "<message xmlns:a='urn:n' xmlns:b='urn:n' a:x='1' b:x='2'/>", "{urn:n}x twice" },
        { "<message xmlns:e='" .. "http://www.w3.org/XML/1998/namespace" .. "'/>", "a reserved namespace" },
      }
      for _, case in ipairs(cases) do
        expect_error(HDR .. case[1], "not-well-formed", "header")
        local ev = feed(new_parser(), HDR .. case[1])
        assert.truthy(ev[2].b:find(case[2], 1, true), ev[2].b)
        -- at the start tag at fault
        local at = #HDR + case[1]:find(case[3] or "<", 1, true) - 1
        assert.truthy(ev[2].b:find(" at byte " .. at, 1, true), ev[2].b)
      end
      -- the same checks hold in the stream header
      expect_error("<stream:stream xmlns='jabber:client' xmlns:stream='" .. STREAMS .. "' p:x='1'>",
        "not-well-formed")
      expect_error("<stream:stream xmlns='jabber:client' xmlns:stream='" .. STREAMS .. "' xmlns:xml='u'>",
        "not-well-formed")
    end)

    it("accepts what Namespaces in XML allows, and scopes each declaration to its element", function()
      local XMLNS = "http://www.w3.org/XML/1998/namespace"
      local ev = feed(new_parser(), HDR
        -- a prefix redeclared inside, the outer binding back after it; the default undeclared
        .. "<message xmlns:p='urn:1' p:a='1'><p:x xmlns:p='urn:2' p:a='2'/><p:y p:a='3'/>"
        .. "<z xmlns=''><w/></z><v/></message>"
        -- xml: is bound without a declaration, and may be declared (to itself)
        .. "<iq xmlns:xml='" .. XMLNS .. "' xml:lang='en'><q/></iq>"
        -- one local name in two namespaces, and a prefixed and a plain attribute of one name
        .. "<presence xmlns:a='urn:a' xmlns:b='urn:b' a:x='1' b:x='2' x='3'/>"
        -- declarations after the names that use them still apply (attribute order is free)
        .. "<r:m r:k='v' xmlns:r='urn:r'/>"
        .. "<f xmlns:h='urn:h' h:\195\169='1'/>") -- a non-ASCII local name
      assert.equal("header stanza stanza stanza stanza stanza", kinds(ev))
      local m = core.materialize(ev[2].a)
      assert.same({ ["urn:1\1a"] = "1" }, m.attr)
      assert.same({ xmlns = "urn:2", ["urn:2\1a"] = "2" }, m[1].attr)
      assert.equal("x", m[1].name)
      assert.same({ xmlns = "urn:1", ["urn:1\1a"] = "3" }, m[2].attr)
      assert.same({ xmlns = "" }, m[3].attr)
      assert.same({}, m[3][1].attr) -- <w/> in no namespace, like its parent
      assert.same({}, m[4].attr)   -- <v/> back in jabber:client
      local iq = core.materialize(ev[3].a)
      assert.same({ ["xml:lang"] = "en" }, iq.attr)
      assert.same({ name = "q", attr = {}, tags = {} }, core.materialize(iq[1]))
      assert.same({ ["urn:a\1x"] = "1", ["urn:b\1x"] = "2", x = "3" }, core.materialize(ev[4].a).attr)
      local r = core.materialize(ev[5].a)
      assert.same({ xmlns = "urn:r", ["urn:r\1k"] = "v" }, r.attr)
      assert.equal("m", r.name)
      assert.same({ ["urn:h\1\195\169"] = "1" }, core.materialize(ev[6].a).attr)
    end)

    it("forgets a stream's declarations when the stream restarts", function()
      local p = new_parser()
      local head = "<stream:stream xmlns='jabber:client' xmlns:stream='" .. STREAMS .. "' xmlns:db='urn:db'>"
      local ev = feed(p, head .. "<db:x/><proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
      assert.equal("header stanza stanza", kinds(ev))
      assert.equal("paused", p:state())
      p:reset()
      ev = feed(p, HDR .. "<db:x/>")
      assert.equal("header error", kinds(ev))
      assert.truthy(ev[2].b:find("undeclared namespace prefix: 'db:x'", 1, true), ev[2].b)
    end)

    it("still reports what was complete before an error in the same chunk", function()
      expect_error(HDR .. "<a/><b/><c>\255</c>", "not-well-formed", "header stanza stanza")
      local p = new_parser()
      local ev = feed(p, HDR .. "<a/><!--x--><b/>")
      assert.equal("header stanza error", kinds(ev))
      assert.equal("<a/>", ev[2].b)
    end)

    it("reports nothing after an error until reset, then parses a new stream", function()
      local p = new_parser()
      local ev = feed(p, HDR .. "<x>&bad;</x><message/>")
      assert.equal("header error", kinds(ev))
      for _ = 1, 3 do
        local _, n = p:feed("<message/>")
        assert.equal(0, n)
      end
      assert.equal("failed", p:state())
      assert.equal("&bad;</x><message/><message/><message/><message/>", p:reset())
      assert.equal("header", p:state())
      assert.equal("header stanza", kinds(feed(p, HDR .. "<ok/>")))
    end)
  end)

  describe("limits", function()
    -- a stanza of exactly n bytes
    local function stanza(n)
      local s = "<m></m>"
      assert(n >= #s)
      return "<m>" .. string.rep("x", n - #s) .. "</m>"
    end

    -- whole, then in small pieces; big inputs in socket-sized pieces
    local function steps_for(input)
      if #input < 100000 then return { false, 1, 7 } end
      return { false, 1460, 65536 }
    end

    local function expect_limit(input, opts, before, what)
      for _, step in ipairs(steps_for(input)) do
        local p = new_parser(opts)
        local ev = feed(p, input, step or nil)
        assert.equal((before ~= "" and before .. " " or "") .. "error", kinds(ev), "step " .. tostring(step))
        assert.equal("policy-violation", ev[#ev].a)
        assert.matches(what, ev[#ev].b)
      end
    end

    local function expect_ok(input, opts, expected)
      for _, step in ipairs(steps_for(input)) do
        local p = new_parser(opts)
        assert.equal(expected, kinds(feed(p, input, step or nil)), "step " .. tostring(step))
      end
    end

    it("lets a stanza of exactly max_stanza_size through, and not one byte more", function()
      local opts = { max_stanza_size = 200 }
      expect_ok(HDR .. stanza(200) .. stanza(200), opts, "header stanza stanza")
      expect_limit(HDR .. stanza(200) .. stanza(201), opts, "header stanza",
        "a stanza exceeds max_stanza_size %(200 bytes%)")
      local empty = "<m a='" .. string.rep("x", 191) .. "'/>"
      assert.equal(200, #empty)
      expect_ok(HDR .. empty, opts, "header stanza")
      expect_limit(HDR .. empty, { max_stanza_size = 199 }, "header", "a stanza exceeds")
    end)

    it("counts each unit on its own when one chunk holds the end of one and all of the next", function()
      local p = new_parser { max_stanza_size = 200 }
      local a, b = stanza(200), stanza(200)
      assert.equal("header", kinds(feed(p, HDR .. a:sub(1, 150))))
      assert.equal("stanza stanza", kinds(feed(p, a:sub(151) .. b)))
      assert.equal("stanza", kinds(feed(p, a .. " " .. b:sub(1, 100))))
      assert.equal("stanza", kinds(feed(p, b:sub(101))))
      assert.equal("open", p:state())
    end)

    it("never hands bytes past the limit to expat", function()
      -- the byte after the limit is not UTF-8: a parser that looked at it would say not-well-formed
      local p = new_parser { max_stanza_size = 200 }
      local ev = feed(p, HDR .. "<m>" .. string.rep("x", 197) .. "\255</m>")
      assert.equal("header error", kinds(ev))
      assert.equal("policy-violation", ev[#ev].a)
      p = new_parser { max_stanza_size = 200 }
      ev = feed(p, HDR .. "<m>" .. string.rep("x", 196) .. "\255</m>")
      assert.equal("not-well-formed", ev[#ev].a)
      -- a byte after a complete stanza of exactly the limit starts a new unit and is looked at
      p = new_parser { max_stanza_size = 200 }
      ev = feed(p, HDR .. "<m>" .. string.rep("x", 193) .. "</m>\255")
      assert.equal("header stanza error", kinds(ev))
      assert.equal("bad-format", ev[#ev].a)
    end)

    it("applies max_stanza_size to the stream header, XML declaration included", function()
      local head = "<?xml version='1.0'?>" .. HDR
      expect_ok(head, { max_stanza_size = #head }, "header")
      expect_limit(head, { max_stanza_size = #head - 1 }, "", "the stream header exceeds max_stanza_size")
    end)

    it("applies max_stanza_size to whitespace between stanzas; keepalives are fine", function()
      local opts = { max_stanza_size = 200 }
      expect_ok(HDR .. string.rep(" ", 200) .. "<a/>" .. string.rep("\n", 200) .. CLOSE, opts,
        "header stanza close")
      expect_limit(HDR .. string.rep(" ", 201) .. "<a/>", opts, "header",
        "whitespace between stanzas exceeds max_stanza_size")
      expect_limit(HDR .. "<a/>" .. string.rep("\r\n", 101), opts, "header stanza",
        "whitespace between stanzas")
      -- after the end tag too, and the end tag is a unit of its own
      expect_ok(HDR .. CLOSE .. string.rep(" ", 200), opts, "header close")
      expect_limit(HDR .. CLOSE .. string.rep(" ", 201), opts, "header close", "whitespace")
      local long_end = "</stream:stream" .. string.rep(" ", 200 - #CLOSE) .. ">"
      assert.equal(200, #long_end)
      expect_ok(HDR .. "<a/>" .. long_end, opts, "header stanza close")
      expect_limit(HDR .. "<a/>" .. long_end:sub(1, -2) .. " >", opts, "header stanza", "exceeds")
      -- a long stream of keepalives and stanzas: every gap is a unit of its own
      local p = new_parser(opts)
      feed(p, HDR)
      for _ = 1, 2000 do
        for _ = 1, 150 do p:feed(" ") end
        local _, n = p:feed("<r xmlns='urn:xmpp:sm:3'/>")
        assert.equal(1, n)
      end
      assert.equal("open", p:state())
    end)

    it("applies the default 256 KiB max_stanza_size", function()
      local limit = 262144
      local big = stanza(limit)
      expect_ok(HDR .. big .. big, nil, "header stanza stanza")
      expect_limit(HDR .. big .. stanza(limit + 1), nil, "header stanza",
        "a stanza exceeds max_stanza_size %(262144 bytes%)")
      expect_ok(HDR .. string.rep(" ", limit) .. "<a/>", nil, "header stanza")
      expect_limit(HDR .. string.rep(" ", limit + 1) .. "<a/>", nil, "header", "whitespace")
      -- one byte at a time around the edge
      local p = new_parser()
      feed(p, HDR .. big:sub(1, -100))
      assert.equal("stanza", kinds(feed(p, big:sub(-99), 1)))
      assert.equal("", kinds(feed(p, big:sub(1, -2), 1000)))
      local ev = feed(p, "x>", 1)
      assert.equal("error", kinds(ev))
      assert.equal("policy-violation", ev[1].a)
    end)

    it("applies max_depth, the stanza counting 1", function()
      local function nest(n)
        return string.rep("<e>", n) .. string.rep("</e>", n)
      end
      expect_ok(HDR .. nest(3), { max_depth = 3 }, "header stanza")
      expect_limit(HDR .. nest(4), { max_depth = 3 }, "header", "max_depth %(3%)")
      expect_ok(HDR .. nest(64), nil, "header stanza")
      expect_limit(HDR .. nest(65), nil, "header", "max_depth %(64%)")
      expect_ok(HDR .. nest(1), { max_depth = 1 }, "header stanza")
      expect_limit(HDR .. "<a/><b><c/></b>", { max_depth = 1 }, "header stanza", "max_depth")
    end)

    it("applies max_attributes to every element, namespace declarations not counted", function()
      local function attrs(n)
        local t = {}
        for i = 1, n do t[i] = "a" .. i .. "='v'" end
        return table.concat(t, " ")
      end
      local decls = " xmlns='urn:x' xmlns:p='urn:p' xmlns:q='urn:q'"
      expect_ok(HDR .. "<m " .. attrs(5) .. decls .. "/>", { max_attributes = 5 }, "header stanza")
      expect_limit(HDR .. "<m><c " .. attrs(6) .. "/></m>", { max_attributes = 5 }, "header",
        "6 attributes, more than max_attributes %(5%)")
      expect_ok(HDR .. "<m " .. attrs(64) .. "/>", nil, "header stanza")
      expect_limit(HDR .. "<m " .. attrs(65) .. "/>", nil, "header", "max_attributes %(64%)")
      -- the header has 2 attributes (to, version)
      expect_ok(HDR, { max_attributes = 2 }, "header")
      expect_limit(HDR, { max_attributes = 1 }, "", "max_attributes")
      expect_ok(HDR .. "<m/>", { max_attributes = 2 }, "header stanza")
      expect_limit(HDR .. "<m p:x='1' xmlns:p='urn:p' q='2' r='3'/>", { max_attributes = 2 }, "header",
        "max_attributes")
    end)

    it("records every attribute of an element with hundreds, under a raised max_attributes", function()
      -- plain and prefixed attributes, the prefix declared among them, values with references
      local parts, want = {}, {}
      for i = 1, 300 do
        if i == 150 then parts[#parts + 1] = "xmlns:p='urn:p'" end
        if i % 3 == 0 then
          parts[#parts + 1] = "p:a" .. i .. "='v" .. i .. " &amp; &#x263A;'"
          want["urn:p\1a" .. i] = "v" .. i .. " & \u{263A}"
        else
          parts[#parts + 1] = "a" .. i .. "='v" .. i .. "'"
          want["a" .. i] = "v" .. i
        end
      end
      local attrs = table.concat(parts, " ")
      local doc = HDR .. "<m " .. attrs .. "><c " .. attrs .. "/></m>"
      local ev = feed(new_parser{ max_attributes = 300 }, doc)
      assert.equal("header stanza", kinds(ev))
      for _, el in ipairs{ ev[2].a, ev[2].a.tags[1] } do
        local n = 0
        for k, v in pairs(el.attr) do
          n = n + 1
          assert.equal(want[k], v, k)
        end
        assert.equal(300, n)
      end
      expect_limit(HDR .. "<m " .. attrs .. "/>", { max_attributes = 299 }, "header",
        "300 attributes, more than max_attributes %(299%)")
    end)

    it("checks its options", function()
      assert.has_error(function() new_parser { max_stanza_size = 0 } end)
      assert.has_error(function() new_parser { max_stanza_size = "big" } end)
      assert.has_error(function() new_parser { max_depth = 1.5 } end)
      assert.has_error(function() new_parser { max_attributes = -1 } end)
      assert.has_error(function() new_parser { content_ns = 42 } end)
      assert.has_error(function() new_parser { stanza_mt = "mt" } end)
      assert.has_error(function() new_parser { max_stanza_sise = 10 } end)
      assert.has_error(function() new_parser("opts") end)
      assert.has_error(function() new_parser():feed({}) end)
    end)
  end)

  describe("stream restarts", function()
    local SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
    local TLS = "urn:ietf:params:xml:ns:xmpp-tls"

    it("pauses after <success/>, keeps pipelined bytes and hands them back from reset()", function()
      local p = new_parser()
      local second = "<?xml version='1.0'?>" .. HDR .. "<stream:features/>"
      local ev = feed(p, HDR .. "<success xmlns='" .. SASL .. "'>dGVzdA==</success>" .. second)
      assert.equal("header stanza", kinds(ev))
      assert.equal("success", ev[2].a.name)
      assert.equal("paused", p:state())
      local _, n = p:feed("<message/>")
      assert.equal(0, n)
      assert.equal("paused", p:state())
      assert.equal(second .. "<message/>", p:reset())
      assert.equal("header", p:state())
      ev = feed(p, second .. "<message/>")
      assert.equal("header stanza stanza", kinds(ev))
      assert.equal("<?xml version='1.0'?>" .. HDR, ev[1].b)
      assert.equal("open", p:state())
    end)

    it("pauses the same way fed one byte at a time", function()
      local input = HDR .. "<success xmlns='" .. SASL .. "'/>" .. HDR .. "<a/>"
      local p = new_parser()
      local ev = feed(p, input, 1)
      assert.equal("header stanza", kinds(ev))
      assert.equal(HDR .. "<a/>", p:reset())
    end)

    it("pauses after a TLS <proceed/>; reset() returns whatever followed", function()
      local p = new_parser()
      local ev = feed(p, HDR .. "<proceed xmlns='" .. TLS .. "'/>")
      assert.equal("header stanza", kinds(ev))
      assert.equal("paused", p:state())
      assert.equal("", p:reset())
      p = new_parser()
      feed(p, HDR .. "<proceed xmlns='" .. TLS .. "'/>\22\3\1")
      assert.equal("\22\3\1", p:reset())
    end)

    it("pauses only for a top-level element in the right namespace", function()
      local p = new_parser()
      local ev = feed(p, HDR .. "<success/><proceed xmlns='" .. SASL .. "'/><message><success xmlns='" .. SASL
        .. "'/></message><a/>")
      assert.equal("header stanza stanza stanza stanza", kinds(ev))
      assert.equal("open", p:state())
    end)

    it("refuses to keep more than max_stanza_size bytes while paused", function()
      local p = new_parser { max_stanza_size = 100 }
      feed(p, HDR:gsub(" to='example.com'", "") .. "<success xmlns='" .. SASL .. "'/>" .. string.rep(" ", 60))
      assert.equal("paused", p:state())
      local _, n = p:feed(string.rep(" ", 40))
      assert.equal(0, n)
      local ev = feed(p, " ")
      assert.equal("error", kinds(ev))
      assert.equal("policy-violation", ev[1].a)
      assert.equal("failed", p:state())
      assert.equal(string.rep(" ", 100), p:reset())
    end)

    it("starts a new stream on reset() in any state", function()
      local p = new_parser()
      assert.equal("", p:reset())
      feed(p, HDR .. "<message><body>half")
      assert.equal("open", p:state())
      assert.equal("", p:reset())
      assert.equal("header", p:state())
      assert.equal("header stanza close", kinds(feed(p, HDR .. "<a/>" .. CLOSE)))
      assert.equal("closed", p:state())
      p:reset()
      assert.equal("header stanza", kinds(feed(p, HDR .. "<a/>")))
    end)

    it("stays usable after a misuse error", function()
      local p = new_parser()
      assert.has_error(function() p:feed() end)
      assert.equal("header stanza", kinds(feed(p, HDR .. "<a/>")))
    end)
  end)

  describe("lifetime", function()
    it("closes idempotently; a closed parser raises", function()
      local p = new_parser()
      p:close()
      p:close()
      assert.has_error(function() p:feed("x") end, "attempt to use a closed xmppsm.parser")
      assert.has_error(function() p:reset() end)
      assert.has_error(function() p:state() end)
      assert.matches("closed", tostring(p))
    end)

    it("closes on scope exit and when collected", function()
      local saved
      do
        local p <close> = new_parser()
        p:feed(HDR)
        saved = p
      end
      assert.has_error(function() saved:state() end)
      for _ = 1, 200 do new_parser():feed(HDR .. "<message>") end
      collectgarbage()
      collectgarbage()
    end)

    it("checks that methods get a parser", function()
      local p = new_parser()
      assert.has_error(function() p.feed({}, "x") end)
      assert.has_error(function() p.state(io.stdout) end)
    end)
  end)

  describe("memory", function()
    -- Resident set size in KiB, or nil where /proc is missing or a tool replaces malloc.
    local function rss_kib()
      local f = not under_tool and io.open("/proc/self/statm")
      if not f then return nil end
      local s = f:read("l")
      f:close()
      return tonumber(s:match("^%d+ (%d+)")) * 4
    end

    it("stays bounded over 100k stanzas with ever-new names", function()
      local p = new_parser()
      feed(p, HDR)
      local total = 100000
      local per_chunk = 50
      local lua_mid, rss_mid
      local seen = 0
      for c = 0, total / per_chunk - 1 do
        local parts = {}
        for i = 1, per_chunk do
          local k = c * per_chunk + i
          parts[i] = string.format("<m%d xmlns:p%d='urn:%d' p%d:a%d='v' b%d='w'><body>%d</body></m%d> ",
            k, k, k, k, k, k, k, k)
        end
        local ev, n = p:feed(table.concat(parts))
        seen = seen + n
        assert.equal("m" .. (c * per_chunk + 1), ev[2].name)
        if c == 300 then
          collectgarbage()
          lua_mid, rss_mid = collectgarbage("count"), rss_kib()
        end
      end
      assert.equal(total, seen)
      collectgarbage()
      assert.is_true(collectgarbage("count") - lua_mid < 256, "Lua memory grew")
      local rss = rss_kib()
      if rss then
        -- without the periodic expat reset, expat's name tables alone grow by tens of MiB here
        assert.is_true(rss - rss_mid < 8192, ("resident memory grew by %d KiB"):format(rss - rss_mid))
      end
    end)

    it("resets expat transparently: namespaces from the header, raw bytes, error positions", function()
      local head = "<stream:stream xmlns='jabber:client' xmlns:stream='" .. STREAMS .. "' xmlns:db='urn:db'>"
      local p = new_parser { max_stanza_size = #head }
      feed(p, head)
      local offset = #head
      for i = 1, 500 do
        local s = ("<db:r%d n='%d'>t</db:r%d>"):format(i, i, i)
        local ev = feed(p, s .. "\n", i % 5 + 1)
        assert.equal("stanza", kinds(ev))
        assert.equal("urn:db", ev[1].a.attr.xmlns)
        assert.equal("r" .. i, ev[1].a.name)
        assert.equal(s, ev[1].b)
        offset = offset + #s + 1
      end
      local ev = feed(p, "<x></y>")
      assert.equal("mismatched tag at byte " .. (offset + 5), ev[1].b) -- expat points at the name
    end)
  end)
end)
end
