-- xmppsm.stanza: the builder and accessors.
local stanza = require "xmppsm.stanza"
local core = require "xmppsm.core"
local stanza_equal = require "helpers.stanza_equal"

local xmlns_stanzas = "urn:ietf:params:xml:ns:xmpp-stanzas"

-- The keys an element table may hold (docs/core.md): name, attr, tags and its children.
local function keys_ok(el)
  for k in pairs(el) do
    if not (k == "name" or k == "attr" or k == "tags" or (math.type(k) == "integer" and k >= 1)) then
      return false, k
    end
  end
  for _, c in ipairs(el) do
    if type(c) == "table" then
      local ok, k = keys_ok(c)
      if not ok then return false, k end
    end
  end
  return true
end

describe("xmppsm.stanza", function()
  describe("building", function()
    it("creates elements in the documented shape", function()
      local st = stanza.stanza("iq", { type = "get", id = "1" })
      assert.equal("iq", st.name)
      assert.same({ type = "get", id = "1" }, st.attr)
      assert.same({}, st.tags)
      assert.equal(0, #st)
      assert.equal(stanza.metatable, getmetatable(st))
      assert.same({}, stanza.stanza("a").attr)
    end)

    it("builds nested children with tag, text and up", function()
      local st = stanza.message({ to = "a@b" })
        :tag("body"):text("hi"):up()
        :tag("x", { xmlns = "urn:x" }):tag("y"):text("1"):up():tag("z"):up():up()
        :text("tail")
      assert.equal("<message to='a@b'><body>hi</body><x xmlns='urn:x'><y>1</y><z/></x>tail</message>",
        tostring(st))
      assert.is_nil(stanza_equal.check_tags(st))
    end)

    it("keeps the builder position out of the element tables", function()
      local st = stanza.message():tag("a"):tag("b")
      local ok, k = keys_ok(st)
      assert(ok, "unexpected key " .. tostring(k))
      st:up():up()
      ok, k = keys_ok(st)
      assert(ok, "unexpected key " .. tostring(k))
    end)

    it("up at the top does nothing; reset goes back to the top; at_top tells", function()
      local st = stanza.stanza("a")
      assert.is_true(st:at_top())
      st:up():up():tag("b")
      assert.is_false(st:at_top())
      st:tag("c"):reset():tag("d")
      assert.is_false(st:at_top())
      assert.equal("<a><b><c/></b><d/></a>", tostring(st))
    end)

    it("keeps positions apart when one stanza's emptied stack is reused by another", function()
      local a, b = stanza.stanza("a"), stanza.stanza("b")
      a:tag("a1"):up()           -- a's stack is empty again
      b:tag("b1")                -- and may now be b's
      a:tag("a2"):tag("a3")
      b:tag("b2"):up():up():tag("b3")
      a:reset()                  -- a stack dropped while not empty is not reused
      b:up():tag("b4"):text("t"):up()
      a:tag("a4"):text("u")
      assert.equal("<a><a1/><a2><a3/></a2><a4>u</a4></a>", tostring(a))
      assert.equal("<b><b1><b2/></b1><b3/><b4>t</b4></b>", tostring(b))
      assert.is_false(a:at_top())
      assert.is_true(b:at_top())
    end)

    it("keeps separate positions for separate stanzas", function()
      local a, b = stanza.stanza("a"), stanza.stanza("b")
      a:tag("a1")
      b:tag("b1")
      a:tag("a2")
      b:up():tag("b2")
      assert.equal("<a><a1><a2/></a1></a>", tostring(a))
      assert.equal("<b><b1/><b2/></b>", tostring(b))
    end)

    it("merges adjacent text and ignores nil and empty text", function()
      local st = stanza.stanza("a"):text("x"):text(nil):text(""):text("y"):tag("b"):up():text("z")
      assert.equal(3, #st)
      assert.equal("xy", st[1])
      assert.equal("z", st[3])
    end)

    it("refuses bad arguments where the mistake is made", function()
      assert.has_error(function() stanza.stanza(5) end, "element name must be a string, got number")
      assert.has_error(function() stanza.stanza("a", "b") end, "attributes must be a table, got string")
      assert.has_error(function() stanza.stanza("a"):text(5) end, "text must be a string, got number")
      assert.has_error(function() stanza.stanza("a"):tag({}) end, "element name must be a string, got table")
      assert.has_error(function() stanza.stanza("a"):add_child(5) end)
    end)

    it("add_child adds at the position, add_direct_child at the element itself", function()
      local st = stanza.stanza("a"):tag("b")
      st:add_child(stanza.stanza("c")):add_direct_child(stanza.stanza("d")):add_child("t")
      assert.equal("<a><b><c/>t</b><d/></a>", tostring(st))
      assert.is_nil(stanza_equal.check_tags(st))
    end)

    it("has text_tag, body and query shortcuts", function()
      local st = stanza.stanza("a"):text_tag("t", "v", { k = "1" }):body("b")
      assert.equal("<a><t k='1'>v</t><body>b</body></a>", tostring(st))
      local q = stanza.iq({ type = "get", id = "1" }):query("jabber:iq:roster")
      assert.equal("<iq id='1' type='get'><query xmlns='jabber:iq:roster'/></iq>",
        "<iq id='1' type='get'>" .. tostring(q):match("<query.*"))
      assert.is_false(q:at_top())
    end)
  end)

  describe("constructors", function()
    it("message with and without body", function()
      assert.equal("<message/>", tostring(stanza.message()))
      local m = stanza.message({ type = "chat" }, "hello")
      assert.equal("hello", m:get_child_text("body"))
      assert.is_true(m:at_top())
    end)

    it("message with a body is one compact table until a key that is not there is used", function()
      local m = stanza.message({ to = "a@b" }, "hi")
      assert.is_nil(rawget(m, 1))
      assert.is_nil(rawget(m, "tags"))
      assert.equal("hi", rawget(m, "__xmppsm_body"))
      assert.is_true(stanza.is_stanza(m))
      assert.equal("<message to='a@b'><body>hi</body></message>", tostring(m))
      assert.equal("<message to='a@b'><body>hi</body></message>", (core.serialize(m)))
      assert.is_nil(rawget(m, 1))        -- serializing reads raw: still compact
      assert.equal("a@b", m.attr.to)     -- there: nothing filled in
      assert.equal("message", m.name)
      assert.is_nil(rawget(m, 1))
      local body = m.tags[1]             -- not there: filled in
      assert.equal(stanza.metatable, getmetatable(m))
      assert.is_nil(rawget(m, "__xmppsm_body"))
      assert.equal(body, rawget(m, 1))
      assert.same({ name = "body", attr = {}, tags = {}, "hi" }, body)
      assert.equal(stanza.metatable, getmetatable(body))
      assert.is_true(keys_ok(m))
      assert.is_nil(stanza_equal.check_tags(m))
      local m2 = stanza.message(nil, "x")
      assert.equal("x", m2:get_child_text("body"))   -- a method fills in too
      assert.equal(stanza.metatable, getmetatable(m2))
      assert.same({}, m2.attr)
    end)

    it("compact message: every other use fills it in first", function()
      local function compact() return stanza.message({ type = "chat" }, "hi") end
      local uses = {
        ["[1]"] = function(m) return m[1].name end,
        ["#"] = function(m) return #m end,
        ["pairs"] = function(m)
          local keys = {}
          for k in pairs(m) do keys[#keys + 1] = tostring(k) end
          table.sort(keys)
          return table.concat(keys, ",")
        end,
        ["ipairs"] = function(m)
          local n = 0
          for _ in ipairs(m) do n = n + 1 end
          return n
        end,
        ["new key"] = function(m) m.extra = 1; return rawget(m, "extra") end,
        ["core.materialize"] = function(m) return core.materialize(m) == m end,
        ["method"] = function(m) return m:get_child("body").name end,
      }
      local expect = { ["[1]"] = "body", ["#"] = 1, pairs = "1,attr,name,tags", ipairs = 1,
                       ["new key"] = 1, ["core.materialize"] = true, method = "body" }
      for what, use in pairs(uses) do
        local m = compact()
        assert.equal(expect[what], use(m), what)
        assert.equal(stanza.metatable, getmetatable(m), what)
        assert.is_nil(rawget(m, "__xmppsm_body"), what)
        assert.equal("<message type='chat'><body>hi</body></message>", tostring(m), what)
      end
    end)

    it("compact message serializes as the generic builder's, escaping and refusing alike", function()
      local bodies = { "hi", "", "a < b & c > d 'q' \"qq\"", "h\195\169llo \226\130\172", ("x"):rep(5000),
                       "line\nnext\r\ttab", "bad \255 byte", "ctl \1 char" }
      for _, text in ipairs(bodies) do
        local compact = stanza.message({ to = "a@b", id = "x<1" }, text)
        local generic = stanza.stanza("message", { to = "a@b", id = "x<1" }):text_tag("body", text)
        local s1, e1 = core.serialize(compact)
        local s2, e2 = core.serialize(generic)
        assert.equal(s2, s1, text)
        assert.equal(e2, e1, text)
        assert.equal(getmetatable(stanza.message(nil, "x")), getmetatable(compact), "still compact")
        if s1 then assert.same(generic, stanza.parse(s1)) end
      end
    end)

    it("compact message: only its own metatable makes the body field a body", function()
      local m = stanza.message({ to = "a@b" }, "hi")
      rawset(m, "__xmppsm_body", 5)
      assert.same({ nil, "the body of compact <message> is a number, not a string" }, { core.serialize(m) })
      local plain = { name = "message", attr = {}, __xmppsm_body = "hi" }
      assert.equal("<message/>", (core.serialize(plain)))
    end)

    it("message with a body builds what the generic builder builds, and goes on building", function()
      local m = stanza.message({ type = "chat" }, "hi")
      local g = stanza.stanza("message", { type = "chat" }):text_tag("body", "hi")
      assert.same(g, m)
      assert.equal(m[1], m.tags[1])
      m:tag("thread"):text("t1"):up():text("tail")
      assert.equal("<message type='chat'><body>hi</body><thread>t1</thread>tail</message>", tostring(m))
      assert.same({ "body", "thread" }, { m.tags[1].name, m.tags[2].name })
      local empty = stanza.message(nil, "")
      assert.same(stanza.message():text_tag("body", ""), empty)
      assert.equal("<message><body/></message>", tostring(empty))
      assert.has_error(function() stanza.message("x", "hi") end, "attributes must be a table, got string")
      assert.has_error(function() stanza.message(nil, 5) end, "text must be a string, got number")
      assert.has_error(function() stanza.message(nil, {}) end, "text must be a string, got table")
      -- the error names the line that called message(), as error(msg, 2) does
      local line = debug.getinfo(1, "l").currentline + 1
      local ok, err = pcall(function() local bad = stanza.message(false, "hi"); return bad end)
      assert.is_false(ok)
      assert.equal("spec/core/stanza_spec.lua:" .. line .. ": attributes must be a table, got boolean", err)
      local m2 = stanza.message(nil, "x")
      assert.same({}, m2.attr)
      assert.is_true(stanza.is_stanza(m2))
    end)

    it("presence", function()
      assert.equal("<presence type='unavailable'/>", tostring(stanza.presence({ type = "unavailable" })))
    end)

    it("iq requires a type, and generates distinct ids when none is given", function()
      assert.has_error(function() stanza.iq() end)
      assert.has_error(function() stanza.iq({ type = "get", id = 5 }) end,
        "iq: the id attribute must be a string")
      local a, b = stanza.iq({ type = "get" }), stanza.iq({ type = "get" })
      assert.is_string(a.attr.id)
      assert.not_equal(a.attr.id, b.attr.id)
      assert.has_error(function() stanza.iq({ id = "1" }) end, "iq: a type attribute (a string) is required")
      assert.equal("iq", stanza.iq({ id = "1", type = "set" }).name)
    end)

    it("reply swaps to and from, keeps id, makes an iq a result", function()
      local iq = stanza.iq({ id = "7", type = "get", from = "a@b/c", to = "d" }):query("urn:q")
      local r = stanza.reply(iq)
      assert.same({ to = "a@b/c", from = "d", id = "7", type = "result" }, r.attr)
      assert.equal(0, #r)
      local m = stanza.reply(stanza.message({ id = "m", type = "chat", from = "x", to = "y" }))
      assert.same({ to = "x", from = "y", id = "m", type = "chat" }, m.attr)
      local c = stanza.reply(stanza.stanza("message", { xmlns = "jabber:component:accept", from = "x" }))
      assert.equal("jabber:component:accept", c.attr.xmlns)
      assert.has_error(function() stanza.reply("x") end)
    end)

    it("error_reply builds an RFC 6120 stanza error that get_error reads back", function()
      local iq = stanza.iq({ id = "7", type = "get", from = "a@b/c", to = "d" })
      local e = stanza.error_reply(iq, "cancel", "item-not-found", "no such thing")
      assert.equal("error", e.attr.type)
      assert.equal("7", e.attr.id)
      assert.equal("a@b/c", e.attr.to)
      local err = e:get_child("error")
      assert.equal("cancel", err.attr.type)
      assert.equal(xmlns_stanzas, err:get_child("item-not-found", xmlns_stanzas).attr.xmlns)
      assert.equal("no such thing", err:get_child_text("text", xmlns_stanzas))
      local t, cond, text, extra = e:get_error()
      assert.equal("cancel", t)
      assert.equal("item-not-found", cond)
      assert.equal("no such thing", text)
      assert.is_nil(extra)
      -- positioned inside <error> for an application-specific condition
      e:tag("too-many", { xmlns = "urn:app" })
      local _, cond2, _, extra2 = e:get_error()
      assert.equal("item-not-found", cond2)
      assert.equal("too-many", extra2.name)
      assert.equal("<iq to='a@b/c' from='d' type='error' id='7'><error type='cancel'>"
        .. "<item-not-found xmlns='" .. xmlns_stanzas .. "'/><text xmlns='" .. xmlns_stanzas
        .. "'>no such thing</text><too-many xmlns='urn:app'/></error></iq>",
        "<iq to='a@b/c' from='d' type='error' id='7'>" .. tostring(e):match("<error.*"))
    end)

    it("error_reply without text", function()
      local e = stanza.error_reply(stanza.message({ from = "a" }), "wait", "resource-constraint")
      local t, cond, text = e:get_error()
      assert.equal("wait", t)
      assert.equal("resource-constraint", cond)
      assert.is_nil(text)
    end)

    it("error_reply refuses an error stanza, unknown types and conditions", function()
      local m = stanza.message({ type = "error" })
      assert.has_error(function() stanza.error_reply(m, "cancel", "gone") end,
        "error_reply: a stanza of type error must not be answered with an error")
      local ok = stanza.message()
      assert.has_error(function() stanza.error_reply(ok, "fatal", "gone") end,
        "error_reply: unknown error type fatal")
      assert.has_error(function() stanza.error_reply(ok, "cancel", "not-found") end,
        "error_reply: unknown error condition not-found")
      assert.has_error(function() stanza.error_reply(ok, "cancel", "gone", 5) end)
    end)

    it("get_error without an error child, and with an unknown condition", function()
      assert.is_nil(stanza.message():get_error())
      local m = stanza.message({ type = "error" }):tag("error", { type = "modify" }):up()
      local t, cond = m:get_error()
      assert.equal("modify", t)
      assert.equal("undefined-condition", cond)
    end)
  end)

  describe("reading children", function()
    -- <iq xmlns? nil>
    --   <query xmlns='urn:q'><item/><item xmlns='urn:q'/><item xmlns='urn:other'/></query>
    --   <query/>              (inherits the iq's namespace)
    --   <query xmlns='jabber:client'/>
    -- </iq>
    local function sample()
      return stanza.iq({ id = "1", type = "result" })
        :tag("query", { xmlns = "urn:q" })
          :tag("item", { n = "1" }):up()
          :tag("item", { n = "2", xmlns = "urn:q" }):up()
          :tag("item", { n = "3", xmlns = "urn:other" }):up()
        :up()
        :tag("query", { n = "plain" }):up()
        :tag("query", { n = "explicit", xmlns = "jabber:client" }):up()
    end

    it("get_child with xmlns nil means the parent's namespace", function()
      local iq = sample()
      assert.equal("plain", iq:get_child("query").attr.n)
      local q = iq:get_child("query", "urn:q")
      assert.equal("1", q:get_child("item").attr.n)
      -- an item repeating the parent's xmlns is in the parent's namespace too
      local ns = {}
      for item in q:childtags("item") do ns[#ns + 1] = item.attr.n end
      assert.same({ "1", "2" }, ns)
    end)

    it("get_child with an explicit xmlns matches children that state it or inherit it", function()
      local q = sample():get_child("query", "urn:q")
      local ns = {}
      for item in q:childtags("item", "urn:q") do ns[#ns + 1] = item.attr.n end
      assert.same({ "1", "2" }, ns)
      assert.equal("3", q:get_child("item", "urn:other").attr.n)
      assert.is_nil(q:get_child("item", "urn:none"))
    end)

    it("at the top, an explicit jabber:client matches only children that spell it out", function()
      local iq = sample()
      assert.equal("explicit", iq:get_child("query", "jabber:client").attr.n)
    end)

    it("get_child with name nil matches any name", function()
      local iq = sample()
      assert.equal("urn:q", iq:get_child(nil, "urn:q").attr.xmlns)
      assert.equal("plain", iq:get_child().attr.n)
    end)

    it("get_child_text and get_text", function()
      local m = stanza.message():tag("body"):text("a"):text("b"):up()
        :tag("html"):tag("p"):text("x"):up():up()
        :tag("empty"):up()
      assert.equal("ab", m:get_child_text("body"))
      assert.is_nil(m:get_child_text("html"))
      assert.equal("", m:get_child_text("empty"))
      assert.is_nil(m:get_child_text("missing"))
    end)

    it("childtags iterates matching children in order, and only them", function()
      local names = {}
      for c in sample():childtags() do names[#names + 1] = c.attr.n end
      assert.same({ "plain" }, names)
      names = {}
      for c in sample():childtags("query", "jabber:client") do names[#names + 1] = c.attr.n end
      assert.same({ "explicit" }, names)
    end)

    it("children iterates text and elements", function()
      local st = stanza.stanza("a"):text("x"):tag("b"):up():text("y")
      local seen = {}
      for c in st:children() do seen[#seen + 1] = type(c) == "table" and c.name or c end
      assert.same({ "x", "b", "y" }, seen)
    end)

    it("maptags replaces and removes child elements, keeping text and merging it", function()
      local st = stanza.stanza("a"):text("x"):tag("b"):up():text("y"):tag("c"):up():tag("d"):up()
      st:maptags(function(tag)
        if tag.name == "b" then return nil end
        if tag.name == "c" then return stanza.stanza("c2") end
        return tag
      end)
      assert.equal("<a>xy<c2/><d/></a>", tostring(st))
      assert.equal(3, #st)
      assert.is_nil(stanza_equal.check_tags(st))
      assert.has_error(function() st:maptags(function() return "text" end) end)
    end)
  end)

  describe("other helpers", function()
    it("clone copies deeply and does not share attr, tags or the builder position", function()
      local st = stanza.message({ to = "a" }):tag("body"):text("hi")
      local c = stanza.clone(st)
      assert.is_true(stanza_equal.equal(st, c))
      assert.is_true(c:at_top())
      c.attr.to = "b"
      c:get_child("body").attr.x = "1"
      c:tag("extra"):up()
      assert.equal("a", st.attr.to)
      assert.is_nil(st:get_child("body").attr.x)
      assert.is_nil(st:get_child("extra"))
      assert.is_nil(stanza_equal.check_tags(c))
      assert.has_error(function() stanza.clone("x") end)
    end)

    it("parse: one serialized stanza back into a stanza; anything else is nil, err", function()
      local built = {
        stanza.message({ to = "a@b", type = "chat" }, "x < y & \"z\""):tag("c", { xmlns = "urn:x" }):up(),
        stanza.iq({ type = "set", id = "1" }):tag("query", { xmlns = "jabber:iq:roster" })
          :tag("item", { jid = "c@d", name = "ünï" }):up():up(),
        stanza.presence(),
      }
      local bad = {
        { "<message><body>", "incomplete stanza" },   -- a stanza cut short
        { "", "incomplete stanza" },
        { "<message></iq>", "mismatched tag" },
        { "<!-- c --><message/>", "comment" },
        { "text", "" },
        { "<message/></stream:stream>", nil },        -- a stanza, then the stream's end
        { "<message/><iq", nil },                     -- a stanza, then the start of another
        { "<message/><presence/>", nil },             -- two: the first
      }
      -- every bad input between two good ones: none changes what the next parse gives
      for round = 1, 2 do
        for _, b in ipairs(bad) do
          for _, st in ipairs(built) do
            local el, err = stanza.parse(tostring(st))
            assert.is_nil(err)
            assert.is_true(stanza_equal.equal(st, el), tostring(st))
          end
          local el, err = stanza.parse(b[1])
          if b[2] then
            assert.is_nil(el, b[1])
            assert.is_string(err)
            assert.truthy(err:find(b[2], 1, true), b[1] .. ": " .. err .. " (round " .. round .. ")")
          else
            assert.equal("message", el.name, b[1])
          end
        end
      end
      assert.has_error(function() stanza.parse(nil) end, "parse: expected a string, got nil")
    end)

    it("parse: thousands of stanzas in a row, past the parser's periodic reset", function()
      local pad = ("p"):rep(200)
      for i = 1, 4000 do -- ~1 MB through one stream: more than twice max_stanza_size
        local st = stanza.message({ id = tostring(i) }, pad)
        local el = assert(stanza.parse(tostring(st)))
        assert.equal(tostring(i), el.attr.id)
        assert.equal(pad, el:get_child_text("body"))
      end
    end)

    it("read_back: the stanza of its bytes, parsed on first use", function()
      local sent = stanza.message({ to = "a@b", type = "chat" }, "x < y"):tag("c", { xmlns = "urn:x" }):up()
      local raw = tostring(sent)
      -- the bytes are not parsed until used: broken ones fail only then
      local broken = stanza.read_back("<message><body>")
      assert.is_true(stanza.is_stanza(broken))
      assert.equal("<message><body>", tostring(broken))
      assert.has_error(function() return broken.name end,
                       "xmppsm: cannot read back a sent stanza: incomplete stanza")
      -- tostring (the bytes themselves) and is_stanza read nothing
      local el = stanza.read_back(raw)
      assert.is_true(stanza.is_stanza(el))
      assert.equal(raw, tostring(el))
      assert.is_nil(next(el, next(el))) -- one private key
      assert.is_nil(rawget(el, "name"))
      assert.is_nil(rawget(el, "attr"))
      -- every other use reads it back; it then equals the stanza sent, and is a stanza like any
      local function uses(e)
        return e.name, e.attr.to, e:get_child_text("body"), #e, e:get_child("c", "urn:x")
      end
      local name, to, body, n, c = uses(stanza.read_back(raw))
      assert.same({ "message", "a@b", "x < y", 2 }, { name, to, body, n })
      assert.is_table(c)
      assert.is_true(stanza_equal.equal(sent, el))
      local function reads(f) local e = stanza.read_back(raw) f(e) return e end
      for _, f in ipairs {
        function(e) assert.equal(2, #e) end,
        function(e) local k = 0 for _ in pairs(e) do k = k + 1 end assert.is_true(k >= 4) end,
        function(e) e.extra = 1 assert.equal(1, rawget(e, "extra")) e.extra = nil end,
        function(e) assert.is_true(stanza_equal.equal(sent, stanza.parse(core.serialize(e)))) end,
        function(e) core.materialize(e) assert.equal("body", rawget(e, 1).name) end,
        function(e) assert.is_true(stanza_equal.equal(sent, stanza.clone(e))) end,
        function(e) assert.equal("a@b", stanza.reply(e).attr.from) end,
        function(e)
          local outer = stanza.parse(tostring(stanza.message():add_child(e)))
          assert.is_true(stanza_equal.equal(sent, outer.tags[1]))
        end,
      } do
        local e = reads(f)
        assert.is_true(stanza_equal.equal(sent, e))
        assert.is_true(keys_ok(e))
        assert.is_nil(stanza_equal.check_tags(e))
      end
      assert.equal("iq", stanza.read_back("<iq type='get' id='1'/>").name)
    end)

    it("is_stanza and the metatable", function()
      assert.is_true(stanza.is_stanza(stanza.message()))
      assert.is_false(stanza.is_stanza({ name = "message", attr = {} }))
      assert.is_false(stanza.is_stanza("message"))
      assert.is_false(stanza.is_stanza(nil))
      assert.is_false(stanza.is_stanza(42))
      assert.is_true(stanza.is_stanza(stanza.message(nil, "compact")))
      assert.is_true(stanza.is_stanza(stanza.read_back("<message><body>b</body></message>")))
      -- the real metatable counts: __metatable does not make a table a stanza
      assert.is_false(stanza.is_stanza(setmetatable({}, { __metatable = stanza.metatable })))
      local hidden = setmetatable(stanza.message(), nil)
      setmetatable(hidden, { __index = stanza.metatable.__index, __metatable = false })
      assert.is_false(stanza.is_stanza(hidden))
      assert.equal("xmppsm.stanza", stanza.metatable.__name)
    end)

    it("tostring raises a clear error; serialize returns nil, err", function()
      local st = stanza.message():tag("body"):text("bad\1")
      local ok, err = pcall(tostring, st)
      assert.is_false(ok)
      assert.matches("cannot serialize stanza: invalid XML character U%+0001 in text of <body>", err)
      local s, e = st:serialize()
      assert.is_nil(s)
      assert.matches("^invalid XML character U%+0001", e)
      assert.equal("<a xmlns='jabber:client'/>",
        stanza.stanza("a", { xmlns = "jabber:client" }):serialize("urn:x"))
    end)

    it("top_tag shows the start tag only", function()
      assert.equal("<message to='a'>", stanza.message({ to = "a" }, "hi"):top_tag())
    end)

    it("works on plain element tables given the metatable, as the parser makes them", function()
      local body = { name = "body", attr = {}, tags = {}, "hi" }
      local m = setmetatable({ name = "message", attr = { to = "a" }, tags = { body }, body },
        stanza.metatable)
      setmetatable(body, stanza.metatable)
      assert.equal("hi", m:get_child_text("body"))
      m:tag("x", { xmlns = "urn:x" }):text("t"):up()
      assert.equal("<message to='a'><body>hi</body><x xmlns='urn:x'>t</x></message>", tostring(m))
      assert.is_nil(stanza_equal.check_tags(m))
      -- and on one without a tags list: it is built on first use
      local bare = setmetatable({ name = "a", attr = {}, "t", { name = "b", attr = {}, tags = {} } },
        stanza.metatable)
      assert.equal("b", bare:get_child("b").name)
      bare:tag("c")
      assert.is_nil(stanza_equal.check_tags(bare))
    end)
  end)
end)
