-- core.serialize and core.escape (docs/core.md, "Serializer").
local core = require "xmppsm.core"
local stanza_equal = require "helpers.stanza_equal"
local random_seed = require "helpers.seed"

local serialize, escape = core.serialize, core.escape

local function el(name, attr, ...)
  local t = { name = name, attr = attr or {}, tags = {}, ... }
  for _, c in ipairs(t) do
    if type(c) == "table" then t.tags[#t.tags + 1] = c end
  end
  return t
end

local entities = { amp = "&", lt = "<", gt = ">", quot = '"', apos = "'" }
local function unescape(s)
  return (s:gsub("&(#?)(%w+);", function(hash, name)
    if hash == "#" then return utf8.char(tonumber(name)) end
    return assert(entities[name], name)
  end))
end

-- The text between <x> and </x> of a one-text element.
local function text_of(s)
  return assert(s:match("^<x>(.*)</x>$"), s)
end

-- Whether escaped text holds nothing raw that must be escaped: & only as an entity, no < > CR
-- (and for attribute values, no quote, tab or LF either).
local function raw_free(s, in_attr)
  local rest = s:gsub("&#?%w+;", "")
  return not rest:find(in_attr and "[&<>\r\n\t\"']" or "[&<>\r]")
end

-- The value of attribute `a` (single-quoted, as the serializer writes).
local function attr_of(s, a)
  return s:match(" " .. a:gsub("%p", "%%%0") .. "='([^']*)'")
end

describe("core.serialize", function()
  describe("output", function()
    it("writes an empty element as a self-closing tag", function()
      assert.equal("<presence/>", serialize(el("presence")))
    end)

    it("writes text and nested children in order", function()
      local s = serialize(el("message", {}, "a", el("b", {}, "c"), "d", el("e")))
      assert.equal("<message>a<b>c</b>d<e/></message>", s)
    end)

    it("quotes attribute values with single quotes", function()
      assert.equal("<iq id='x1'/>", serialize(el("iq", { id = "x1" })))
    end)

    it("writes every attribute once", function()
      local s = serialize(el("message", { to = "a@b", from = "c@d/e", type = "chat", id = "1" }))
      assert.equal(#"<message to='a@b' from='c@d/e' type='chat' id='1'/>", #s)
      assert.equal("a@b", attr_of(s, "to"))
      assert.equal("c@d/e", attr_of(s, "from"))
      assert.equal("chat", attr_of(s, "type"))
      assert.equal("1", attr_of(s, "id"))
    end)

    it("accepts an element without attr", function()
      assert.equal("<a>t</a>", serialize({ name = "a", "t" }))
    end)

    it("stops at the first nil child, as ipairs does", function()
      local t = el("a", {}, "x")
      t[3] = "never"
      assert.equal("<a>x</a>", serialize(t))
    end)

    it("ignores the tags field and reads children from the array part", function()
      local t = el("a", {}, el("b"))
      t.tags = { el("c") }
      assert.equal("<a><b/></a>", serialize(t))
    end)

    it("grows past its initial buffer for large stanzas", function()
      local big = string.rep("0123456789&", 100000)
      local s = assert(serialize(el("x", {}, big)))
      assert.equal(big, unescape(text_of(s)))
      local many = el("many")
      for i = 1, 5000 do many[i] = el("item", { n = tostring(i) }) end
      s = assert(serialize(many))
      local count = 0
      for _ in s:gmatch("<item n='%d+'/>") do count = count + 1 end
      assert.equal(5000, count)
    end)

    it("uses raw access, so no metamethod runs", function()
      local boom = { __index = function() error("metamethod ran") end }
      local t = setmetatable({ attr = setmetatable({}, boom) }, boom)
      local s, err = serialize(t)
      assert.is_nil(s)
      assert.matches("element name is a nil", err)
      t = setmetatable({ name = "a", attr = setmetatable({}, boom) }, boom)
      assert.equal("<a/>", serialize(t))
    end)

    it("raises on misuse: the element is not a table", function()
      assert.has_error(function() serialize("message") end)
      assert.has_error(function() serialize(nil) end)
    end)
  end)

  describe("escaping", function()
    it("escapes & < > in text and leaves quotes, tab and LF alone", function()
      assert.equal("<x>&amp;&lt;&gt;\"'\t\n</x>", serialize(el("x", {}, "&<>\"'\t\n")))
    end)

    it("writes CR in text as a character reference, so parsing does not turn it into LF", function()
      assert.equal("<x>a&#13;b&#13;\nc</x>", serialize(el("x", {}, "a\rb\r\nc")))
    end)

    it("escapes & < > \" ' and tab, LF, CR in attribute values", function()
      local s = serialize(el("x", { a = "&<>\"'\t\n\r" }))
      assert.equal("<x a='&amp;&lt;&gt;&quot;&apos;&#9;&#10;&#13;'/>", s)
    end)

    it("escapes ]]> in text", function()
      assert.equal("<x>]]&gt;</x>", serialize(el("x", {}, "]]>")))
    end)

    it("keeps every printable ASCII character, in text and attributes", function()
      local all = {}
      for c = 0x20, 0x7E do all[#all + 1] = string.char(c) end
      all = table.concat(all)
      assert.equal(all, unescape(text_of(serialize(el("x", {}, all)))))
      local s = serialize(el("x", { a = all }))
      assert.equal(all, unescape(attr_of(s, "a")))
      -- Only the escaped characters changed.
      assert.equal(all:gsub("[&<>]", ""), text_of(serialize(el("x", {}, all))):gsub("&%a+;", ""))
    end)

    it("keeps multi-byte UTF-8 as is, including 4-byte characters and the edges", function()
      local text = "é€𝄞\u{7F}\u{80}\u{85}\u{7FF}\u{800}\u{D7FF}\u{E000}\u{FFFD}\u{10000}\u{10FFFF}"
      assert.equal("<x>" .. text .. "</x>", serialize(el("x", {}, text)))
      assert.equal("<x a='" .. text .. "'/>", serialize(el("x", { a = text })))
    end)

    it("escapes correctly at every offset around the 8-byte fast path", function()
      for len = 0, 24 do
        for pos = 1, len do
          for _, special in ipairs({ "&", "<", ">", "\r", "é", "\u{10000}" }) do
            local text = ("a"):rep(pos - 1) .. special .. ("b"):rep(len - pos)
            local out = text_of(serialize(el("x", {}, text)))
            assert.equal(text, unescape(out))
            assert.is_true(raw_free(out), out)
          end
          local text = ("a"):rep(pos - 1) .. "\1" .. ("b"):rep(len - pos)
          local s, err = serialize(el("x", {}, text))
          assert.is_nil(s)
          assert.equal("invalid XML character U+0001 in text of <x> (byte " .. pos .. ")", err)
        end
      end
    end)

    it("escapes attribute quotes at every offset around the fast path", function()
      for pos = 1, 20 do
        for _, special in ipairs({ "'", '"', "&", "<", ">", "\t", "\n", "\r" }) do
          local v = ("a"):rep(pos - 1) .. special .. ("b"):rep(20 - pos)
          local out = attr_of(serialize(el("x", { v = v })), "v")
          assert.equal(v, unescape(out))
          assert.is_true(raw_free(out, true), out)
        end
      end
    end)

    it("escapes text at every offset around the fast path, also several special bytes in a row", function()
      -- The scan jumps to the first special byte of an 8-byte word; TAB and LF stop it too.
      local specials = { "&", "<", ">", "\r", "\t", "\n", "é", "€", "😀", "\t&", "\né<", "&&", "a\tb>c" }
      for pos = 1, 20 do
        for _, special in ipairs(specials) do
          local v = ("a"):rep(pos - 1) .. special .. ("b"):rep(20 - pos)
          local out = text_of(serialize(el("x", {}, v)))
          assert.equal(v, unescape(out))
          assert.is_true(raw_free(out), out)
        end
      end
    end)

    it("finds a bad character right after a TAB at every offset", function()
      for pos = 1, 12 do
        local s, err = serialize(el("x", {}, ("a"):rep(pos - 1) .. "\t\1" .. ("b"):rep(10)))
        assert.is_nil(s)
        assert.equal(("invalid XML character U+0001 in text of <x> (byte %d)"):format(pos + 1), err)
      end
    end)
  end)

  describe("invalid UTF-8", function()
    local cases = {
      { "\x80", "unexpected continuation byte 0x80" },
      { "\xBF", "unexpected continuation byte 0xBF" },
      { "\xC0\x80", "overlong encoding" },
      { "\xC1\xBF", "overlong encoding" },
      { "\xE0\x80\x80", "overlong encoding" },
      { "\xE0\x9F\xBF", "overlong encoding" },
      { "\xF0\x80\x80\x80", "overlong encoding" },
      { "\xF0\x8F\xBF\xBF", "overlong encoding" },
      { "\xED\xA0\x80", "encoded surrogate U+D800" },
      { "\xED\xBF\xBF", "encoded surrogate U+DFFF" },
      { "\xF4\x90\x80\x80", "code point above U+10FFFF" },
      { "\xF5\x80\x80\x80", "code point above U+10FFFF" },
      { "\xF8\x88\x80\x80\x80", "invalid byte 0xF8" },
      { "\xFE", "invalid byte 0xFE" },
      { "\xFF", "invalid byte 0xFF" },
      { "\xC3", "truncated sequence" },
      { "\xE2\x82", "truncated sequence" },
      { "\xF0\x9F\x98", "truncated sequence" },
      { "\xC3A", "truncated sequence" },
      { "\xE2\x82A", "truncated sequence" },
      { "\xDF", "truncated sequence" },
      { "\xC2\xC3\xA9", "truncated sequence" },
    }
    for _, case in ipairs(cases) do
      local bytes, why = case[1], case[2]
      local shown = bytes:gsub(".", function(c) return ("\\x%02X"):format(c:byte()) end)
      it("refuses " .. shown .. " (" .. why .. ") in text, attribute values and xmlns", function()
        local s, err = serialize(el("body", {}, "ok " .. bytes .. " ok"))
        assert.is_nil(s)
        assert.equal("invalid UTF-8 (" .. why .. ") in text of <body> (byte 4)", err)
        s, err = serialize(el("message", { to = bytes }))
        assert.is_nil(s)
        assert.equal("invalid UTF-8 (" .. why .. ") in value of attribute 'to' of <message> (byte 1)", err)
        s, err = serialize(el("q", { xmlns = "urn:" .. bytes }))
        assert.is_nil(s)
        assert.equal("invalid UTF-8 (" .. why .. ") in xmlns of <q> (byte 5)", err)
      end)
    end

    it("accepts every two-byte sequence, U+0080 to U+07FF", function()
      for cp = 0x80, 0x7FF do
        local v = "a" .. utf8.char(cp) .. "bcdefghij"
        assert.equal("<x>" .. v .. "</x>", serialize(el("x", {}, v)))
      end
    end)

    it("refuses invalid UTF-8 in names", function()
      local s, err = serialize(el("a\xC0\x80"))
      assert.is_nil(s)
      assert.equal('invalid element name "a\\xC0\\x80": invalid UTF-8', err)
      s, err = serialize(el("a", { ["b\xFF"] = "1" }))
      assert.is_nil(s)
      assert.equal('invalid attribute name "b\\xFF" of <a>: invalid UTF-8', err)
    end)
  end)

  describe("characters XML 1.0 does not allow", function()
    local refused = {}
    for c = 0, 8 do refused[#refused + 1] = c end
    refused[#refused + 1] = 0x0B
    refused[#refused + 1] = 0x0C
    for c = 0x0E, 0x1F do refused[#refused + 1] = c end
    refused[#refused + 1] = 0xFFFE
    refused[#refused + 1] = 0xFFFF

    it("refuses each of them in text, attribute values and core.escape, naming it", function()
      for _, c in ipairs(refused) do
        local u = ("U+%04X"):format(c)
        local ch = utf8.char(c)
        local s, err = serialize(el("body", {}, "hi" .. ch))
        assert.is_nil(s)
        assert.equal("invalid XML character " .. u .. " in text of <body> (byte 3)", err)
        s, err = serialize(el("message", {}, el("x", { id = ch })))
        assert.is_nil(s)
        assert.equal("invalid XML character " .. u .. " in value of attribute 'id' of <x> (byte 1)", err)
        s, err = escape("a" .. ch)
        assert.is_nil(s)
        assert.equal("invalid XML character " .. u .. " (byte 2)", err)
      end
    end)

    it("accepts the allowed neighbours", function()
      for _, c in ipairs({ 0x09, 0x0A, 0x0D, 0x20, 0x7F, 0xD7FF, 0xE000, 0xFFFD, 0x10000, 0x10FFFF }) do
        local ch = utf8.char(c)
        assert.is_string(serialize(el("x", {}, ch)), ("U+%04X"):format(c))
        assert.is_string(serialize(el("x", { a = ch })), ("U+%04X"):format(c))
      end
    end)
  end)

  describe("names and types", function()
    local bad_names = {
      { "", "empty" },
      { "1a", "U+0031 cannot start a name" },
      { "-a", "U+002D cannot start a name" },
      { ".a", "U+002E cannot start a name" },
      { "a b", "U+0020 is not allowed in a name" },
      { "a>", "U+003E is not allowed in a name" },
      { "a&", "U+0026 is not allowed in a name" },
      { "a\0b", "U+0000 is not allowed in a name" },
      { "a\u{D7}", "U+00D7 is not allowed in a name" },
    }
    for _, case in ipairs(bad_names) do
      it("refuses the element name " .. ("%q"):format(case[1]), function()
        local s, err = serialize(el(case[1]))
        assert.is_nil(s)
        assert.matches(": " .. case[2]:gsub("%p", "%%%0") .. "$", err)
        assert.matches("^invalid element name ", err)
        s, err = serialize(el("a", { [case[1]] = "v" }))
        assert.is_nil(s)
        assert.matches("^invalid attribute name .* of <a>: " .. case[2]:gsub("%p", "%%%0") .. "$", err)
      end)
    end

    it("names the parent of a bad child element", function()
      local s, err = serialize(el("message", {}, "t", el("2x")))
      assert.is_nil(s)
      assert.equal('invalid element name "2x": U+0032 cannot start a name (child 2 of <message>)', err)
    end)

    it("shows unprintable bytes of a bad name escaped, and cuts long ones", function()
      local _, err = serialize(el("a\n\"b"))
      assert.equal('invalid element name "a\\x0A\\x22b": U+000A is not allowed in a name', err)
      _, err = serialize(el(("x"):rep(100) .. " "))
      assert.matches('^invalid element name "' .. ("x"):rep(60) .. '%.%.%."', err)
    end)

    it("refuses ':' in element names and attribute names other than xml:", function()
      local s, err = serialize(el("stream:features"))
      assert.is_nil(s)
      assert.matches("':' is not allowed", err)
      for _, key in ipairs({ "xmlns:foo", "a:b", "xml:", "xml:a:b", ":a" }) do
        s, err = serialize(el("a", { [key] = "v" }))
        assert.is_nil(s, key)
        assert.matches("^invalid attribute name", err)
      end
    end)

    it("accepts unusual but valid names", function()
      for _, name in ipairs({ "_", "a-b.c_d9", "é", "xmlfoo", "A", "a\u{B7}", "\u{10000}" }) do
        assert.equal("<" .. name .. "/>", serialize(el(name)))
      end
      local s = serialize(el("a", { ["xml:lang"] = "en", ["xml:space"] = "preserve" }))
      assert.equal("en", attr_of(s, "xml:lang"))
      assert.equal("preserve", attr_of(s, "xml:space"))
    end)

    it("refuses a name that is not a string", function()
      local s, err = serialize({ attr = {} })
      assert.is_nil(s)
      assert.equal("element name is a nil, not a string", err)
      s, err = serialize(el("a", {}, { name = 5, attr = {} }))
      assert.is_nil(s)
      assert.equal("element name is a number, not a string (child 1 of <a>)", err)
    end)

    it("refuses attribute keys and values that are not strings", function()
      local s, err = serialize(el("a", { [1] = "x" }))
      assert.is_nil(s)
      assert.equal("attribute key of <a> is a number, not a string", err)
      for _, v in ipairs({ 5, true, {}, print }) do
        s, err = serialize(el("a", { id = v }))
        assert.is_nil(s)
        assert.equal("attribute 'id' of <a> is a " .. type(v) .. ", not a string", err)
        s, err = serialize(el("a", { ["urn:x\1id"] = v }))
        assert.is_nil(s)
        assert.equal("attribute 'id' of <a> is a " .. type(v) .. ", not a string", err)
      end
      s, err = serialize(el("a", { xmlns = 7 }))
      assert.is_nil(s)
      assert.equal("xmlns of <a> is a number, not a string", err)
    end)

    it("refuses attr that is not a table", function()
      local s, err = serialize({ name = "a", attr = "to='x'" })
      assert.is_nil(s)
      assert.equal("attr of <a> is a string, not a table", err)
    end)

    it("refuses children that are neither strings nor element tables", function()
      for _, v in ipairs({ 5, true, print }) do
        local s, err = serialize(el("a", {}, "ok", v))
        assert.is_nil(s)
        assert.equal("child 2 of <a> is a " .. type(v) .. ", not a string or an element table", err)
      end
    end)

    it("returns nothing partial: an error deep inside gives nil, err", function()
      local t = el("message", { to = "a@b" }, el("body", {}, ("ok"):rep(5000)),
        el("x", {}, el("y", {}, "\0")))
      local s, err = serialize(t)
      assert.is_nil(s)
      assert.equal("invalid XML character U+0000 in text of <y> (byte 1)", err)
      -- and the next call is unaffected
      assert.equal("<a/>", serialize(el("a")))
    end)
  end)

  describe("nesting", function()
    local function chain(n)
      local top = el("e")
      local cur = top
      for _ = 2, n do
        local c = el("e")
        cur[1] = c
        cur = c
      end
      return top
    end

    it("accepts 256 nested elements and refuses 257", function()
      local s = assert(serialize(chain(256)))
      assert.equal(256, select(2, s:gsub("<e>", "")) + 1)
      local r, err = serialize(chain(257))
      assert.is_nil(r)
      assert.equal("elements nested deeper than 256 (a cycle?) at <e>", err)
    end)

    it("refuses a cycle instead of crashing", function()
      local a = el("a")
      a[1] = a
      local s, err = serialize(a)
      assert.is_nil(s)
      assert.matches("nested deeper than 256 %(a cycle%?%)", err)
      local b, c = el("b"), el("c")
      b[1], c[1] = c, b
      s, err = serialize(b)
      assert.is_nil(s)
      assert.matches("a cycle", err)
    end)
  end)

  describe("namespaces", function()
    it("omits xmlns equal to the default namespace in scope, jabber:client", function()
      assert.equal("<message/>", serialize(el("message", { xmlns = "jabber:client" })))
      assert.equal("<message xmlns='jabber:server'/>", serialize(el("message", { xmlns = "jabber:server" })))
    end)

    it("takes the namespace in scope as an argument", function()
      assert.equal("<a/>", serialize(el("a", { xmlns = "urn:x" }), "urn:x"))
      assert.equal("<a xmlns='jabber:client'/>", serialize(el("a", { xmlns = "jabber:client" }), "urn:x"))
      assert.equal("<a/>", serialize(el("a"), "urn:x"))
    end)

    it("lets a child without xmlns inherit, and omits a child's xmlns equal to its parent's", function()
      local t = el("iq", {}, el("query", { xmlns = "jabber:iq:roster" },
        el("item", {}), el("item", { xmlns = "jabber:iq:roster" })))
      assert.equal("<iq><query xmlns='jabber:iq:roster'><item/><item/></query></iq>", serialize(t))
    end)

    it("writes xmlns where a child differs, including back to an outer namespace", function()
      local t = el("message", {}, el("x", { xmlns = "urn:x" },
        el("body", { xmlns = "jabber:client" }, el("inner", {})), el("y", {})))
      assert.equal("<message><x xmlns='urn:x'><body xmlns='jabber:client'><inner/></body><y/></x></message>",
        serialize(t))
    end)

    it("escapes xmlns values", function()
      assert.equal("<a xmlns='urn:&amp;&apos;'/>", serialize(el("a", { xmlns = "urn:&'" })))
    end)

    it("declares a prefix for namespaced attributes and reuses it on the same element", function()
      local s = serialize(el("a", { ["urn:x\1one"] = "1", ["urn:x\1two"] = "2" }))
      local prefix = s:match("xmlns:(ns%d+)='urn:x'")
      assert.is_string(prefix)
      assert.equal(1, select(2, s:gsub("xmlns:", "")))
      assert.equal("1", attr_of(s, prefix .. ":one"))
      assert.equal("2", attr_of(s, prefix .. ":two"))
    end)

    it("gives different namespaces different prefixes, and declares them on each element", function()
      local s = serialize(el("a", { ["urn:x\1v"] = "1", ["urn:y\1v"] = "2" },
        el("b", { ["urn:x\1w"] = "3" })))
      local px = s:match("<a[^>]*xmlns:(ns%d+)='urn:x'")
      local py = s:match("<a[^>]*xmlns:(ns%d+)='urn:y'")
      assert.is_string(px)
      assert.is_string(py)
      assert.not_equal(px, py)
      assert.equal("1", attr_of(s, px .. ":v"))
      assert.equal("2", attr_of(s, py .. ":v"))
      local b = s:match("<b[^>]*>")
      local pb = b:match("xmlns:(ns%d+)='urn:x'")
      assert.is_string(pb)
      assert.equal("3", attr_of(b, pb .. ":w"))
    end)

    it("escapes attribute namespaces and checks them", function()
      local s = serialize(el("a", { ["urn:&\1v"] = "1" }))
      assert.matches("xmlns:ns1='urn:&amp;'", s, 1, true)
      local r, err = serialize(el("a", { ["urn:\1\1v"] = "1" }))
      assert.is_nil(r)
      assert.matches("invalid attribute name", err)
      r, err = serialize(el("a", { ["urn:\2\1v"] = "1" }))
      assert.is_nil(r)
      assert.equal("invalid XML character U+0002 in namespace of attribute 'v' of <a> (byte 5)", err)
    end)

    it("names a namespaced attribute as {ns}name when its value is bad", function()
      local s, err = serialize(el("a", { ["urn:x\1v"] = "\1" }))
      assert.is_nil(s)
      assert.equal("invalid XML character U+0001 in value of attribute '{urn:x}v' of <a> (byte 1)", err)
    end)

    it("writes the XML namespace as xml:, and refuses it given twice", function()
      local xml_lang = "http://www.w3.org/XML/1998/namespace\1lang"
      assert.equal("<a xml:lang='en'/>", serialize(el("a", { [xml_lang] = "en" })))
      local s, err = serialize(el("a", { [xml_lang] = "en", ["xml:lang"] = "de" }))
      assert.is_nil(s)
      assert.matches("given twice", err)
    end)

    it("refuses the xmlns namespace and an empty namespace for attributes", function()
      local s, err = serialize(el("a", { ["http://www.w3.org/2000/xmlns/\1x"] = "urn:x" }))
      assert.is_nil(s)
      assert.matches("reserved xmlns namespace", err)
      s, err = serialize(el("a", { ["\1x"] = "1" }))
      assert.is_nil(s)
      assert.matches("empty namespace", err)
    end)

    it("refuses an element in the XML or the xmlns namespace (no declaration can say so)", function()
      for _, ns in ipairs { "http://www.w3.org/XML/1998/namespace", "http://www.w3.org/2000/xmlns/" } do
        local s, err = serialize(el("message", {}, el("q", { xmlns = ns })))
        assert.is_nil(s)
        assert.equal("<q> cannot be in the reserved namespace " .. ns, err)
      end
    end)

    it("does not write the xmlns key as an attribute a second time", function()
      assert.equal("<a xmlns='urn:x'/>", serialize(el("a", { xmlns = "urn:x" })))
    end)
  end)
end)

describe("core.tostring", function()
  it("returns what core.serialize returns, in jabber:client", function()
    local e = el("message", { to = "a@b", xmlns = "jabber:client" }, el("body", {}, "1 < 2"))
    assert.equal(serialize(e), core.tostring(e))
    assert.equal("<message to='a@b'><body>1 &lt; 2</body></message>", core.tostring(e))
  end)

  it("raises serialize's error, prefixed, instead of returning nil, err", function()
    local e = el("message", {}, el("body", {}, "bad\1"))
    local _, why = serialize(e)
    local ok, err = pcall(core.tostring, e)
    assert.is_false(ok)
    assert.equal("cannot serialize stanza: " .. why, err)
    assert.has_error(function() core.tostring("message") end)
  end)
end)

describe("core.escape", function()
  it("returns a string without special characters unchanged", function()
    assert.equal("hello world é 𝄞", escape("hello world é 𝄞"))
    assert.equal("", escape(""))
  end)

  it("escapes & < > \" ' and tab, LF, CR, so the result fits text and attribute values", function()
    assert.equal("a&amp;b&lt;c&gt;d&quot;e&apos;f&#9;g&#10;h&#13;", escape("a&b<c>d\"e'f\tg\nh\r"))
  end)

  it("checks UTF-8 and XML characters", function()
    local s, err = escape("ab\xC3")
    assert.is_nil(s)
    assert.equal("invalid UTF-8 (truncated sequence) (byte 3)", err)
    s, err = escape("\u{FFFF}")
    assert.is_nil(s)
    assert.equal("invalid XML character U+FFFF (byte 1)", err)
  end)

  it("raises on a non-string argument", function()
    assert.has_error(function() escape(5) end)
    assert.has_error(function() escape() end)
  end)
end)

-- The reference rules, written independently in Lua: strict UTF-8 (utf8.len's default) and
-- XML 1.0's Char production.
local function xml_valid(s)
  if not utf8.len(s) then return false end
  for _, c in utf8.codes(s) do
    if c < 0x20 and c ~= 0x09 and c ~= 0x0A and c ~= 0x0D then return false end
    if c == 0xFFFE or c == 0xFFFF then return false end
  end
  return true
end

-- The byte position of the first character xml_valid refuses (a bad UTF-8 sequence counts from
-- its first byte), or nil.
local function first_bad(s)
  local ok, pos = utf8.len(s)
  for p, c in utf8.codes(ok and s or s:sub(1, pos - 1)) do
    if (c < 0x20 and c ~= 0x09 and c ~= 0x0A and c ~= 0x0D) or c == 0xFFFE or c == 0xFFFF then return p end
  end
  if not ok then return pos end
end

describe("property: random byte strings", function()
  it("are accepted exactly when valid, and escaping round-trips them", function()
    local seed = random_seed()
    -- Bytes biased towards the interesting ones: UTF-8 leads, continuations, controls, specials.
    local pool = { 0x00, 0x01, 0x09, 0x0A, 0x0D, 0x1F, 0x20, 0x26, 0x3C, 0x3E, 0x22, 0x27, 0x41, 0x7F,
      0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xFF,
      0xBE }
    local accepted, refused = 0, 0
    for _ = 1, 20000 do
      local n = math.random(0, 12)
      local b = {}
      for i = 1, n do
        b[i] = math.random() < 0.6 and pool[math.random(#pool)] or math.random(0, 255)
      end
      local s = string.char(table.unpack(b))
      local valid = xml_valid(s)
      local t = serialize(el("x", {}, s))
      local a = serialize(el("x", { v = s }))
      local e = escape(s)
      local where = ("seed %d, bytes %q"):format(seed, s)
      assert(valid == (t ~= nil) and valid == (a ~= nil) and valid == (e ~= nil), where)
      if valid then
        accepted = accepted + 1
        assert(unescape(n == 0 and "" or text_of(t)) == s, where)
        assert(unescape(attr_of(a, "v")) == s, where)
        assert(unescape(e) == s, where)
        -- nothing that parsing, attribute-value normalization or the quoting would change is left raw
        assert(raw_free(n == 0 and "" or text_of(t)), where)
        assert(raw_free(attr_of(a, "v"), true), where)
        assert(raw_free(e, true), where)
      else
        refused = refused + 1
      end
    end
    -- Both sides were exercised.
    assert.is_true(accepted > 1000, "seed " .. seed)
    assert.is_true(refused > 1000, "seed " .. seed)
  end)

  it("longer than a scan block: accepted exactly when valid, refused at the first bad byte", function()
    -- Valid pieces (runs of ASCII, specials, characters of 2 to 4 bytes) with now and then one
    -- random byte, so sequences and bad bytes fall at every offset of the serializer's 16-byte
    -- blocks, across block ends and in the tail after the last block.
    local seed = random_seed()
    local pieces = { "&", "<", ">", '"', "'", "\t", "\n", "\r", "é", "ж", "\u{7FF}", "€", "日", "\u{800}",
      "\u{D7FF}", "\u{E000}", "\u{FFFD}", "😀", "\u{10FFFF}", "\u{FFFE}", "\u{FFFF}", "\u{D800}", "\u{DFFF}",
      -- overlong forms and code points past U+10FFFF, refused
      "\xE0\x80\x80", "\xE0\x9F\xBF", "\xC0\x80", "\xC1\xBF", "\xF0\x8F\xBF\xBF", "\xF4\x90\x80\x80" }
    local accepted, refused = 0, 0
    for _ = 1, 20000 do
      local t = {}
      for i = 1, math.random(0, 12) do
        local r = math.random()
        if r < 0.4 then
          t[i] = ("abcdefghij"):rep(3):sub(1, math.random(1, 30))
        elseif r < 0.93 then
          t[i] = pieces[math.random(#pieces)]
        else
          t[i] = string.char(math.random(0, 255))
        end
      end
      local s = table.concat(t)
      local bad = first_bad(s)
      local where = ("seed %d, bytes %q"):format(seed, s)
      local results = { { serialize(el("x", {}, s)) }, { serialize(el("x", { v = s })) }, { escape(s) } }
      for _, r in ipairs(results) do
        if bad then
          assert(r[1] == nil, where)
          assert(tonumber(r[2]:match("%(byte (%d+)%)$")) == bad, where .. ": " .. r[2])
        else
          assert(r[1] ~= nil, where)
        end
      end
      if bad then
        refused = refused + 1
      else
        accepted = accepted + 1
        local text = s == "" and "" or text_of(results[1][1])
        assert(unescape(text) == s and raw_free(text), where)
        local value = attr_of(results[2][1], "v")
        assert(unescape(value) == s and raw_free(value, true), where)
        assert(unescape(results[3][1]) == s and raw_free(results[3][1], true), where)
      end
    end
    assert.is_true(accepted > 5000, "seed " .. seed)
    assert.is_true(refused > 2000, "seed " .. seed)
  end)
end)

-- Random stanzas for the round trip through the parser.
local gen = {}
do
  local start = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
  local rest = start .. "0123456789-."
  -- Non-ASCII name characters that every edition of XML 1.0 (and so libexpat) accepts.
  local wide = { "é", "ñ", "ж", "ü", "λ" }
  local namespaces = { "urn:a", "urn:b", "jabber:client", "http://example.com/ns?x=1&y='2'", "urn:é" }
  local pieces = { "&", "<", ">", '"', "'", "]]>", "\r", "\n", "\t", "\r\n", " ", "  ", "hello",
    "&amp;", "é", "€", "𝄞", "\u{FFFD}", "\u{E000}", "\u{10FFFF}", "\u{D7FF}", "\u{7F}", "\u{85}",
    "\u{2028}", "<![CDATA[x]]>", "<!-- c -->", "&#1;" }

  function gen.name()
    local t = {}
    local n = math.random(1, 8)
    for i = 1, n do
      if i > 1 and math.random() < 0.08 then
        t[i] = wide[math.random(#wide)]
      else
        local set = i == 1 and start or rest
        local k = math.random(#set)
        t[i] = set:sub(k, k)
      end
    end
    local s = table.concat(t)
    if s:lower():sub(1, 3) == "xml" then s = "a" .. s end
    return s
  end

  function gen.text()
    local t = {}
    for i = 1, math.random(1, 6) do
      if math.random() < 0.5 then
        t[i] = pieces[math.random(#pieces)]
      else
        t[i] = string.char(math.random(0x20, 0x7E))
      end
    end
    return table.concat(t)
  end

  function gen.attrs(parent_ns)
    local attr = {}
    for _ = 1, math.random(0, 4) do
      local r = math.random()
      local key
      if r < 0.1 then
        key = "xml:lang"
      elseif r < 0.3 then
        key = namespaces[math.random(#namespaces)] .. "\1" .. gen.name()
      else
        key = gen.name()
      end
      attr[key] = gen.text()
    end
    local r = math.random()
    if r < 0.3 then
      attr.xmlns = namespaces[math.random(#namespaces)]
    elseif r < 0.4 then
      attr.xmlns = parent_ns
    end
    return attr
  end

  function gen.element(depth, parent_ns)
    local attr = gen.attrs(parent_ns)
    local t = { name = gen.name(), attr = attr, tags = {} }
    local ns = attr.xmlns or parent_ns
    if depth < 6 then
      for i = 1, math.random(0, 5) do
        if math.random() < 0.5 then
          t[i] = gen.text()
        else
          t[i] = gen.element(depth + 1, ns)
          t.tags[#t.tags + 1] = t[i]
        end
      end
    end
    return t
  end
end

describe("property: serialize then parse with core.parser", function()
  local header = "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'"
    .. " to='example.com' version='1.0'>"

  local function parse_one(p, s)
    local ev, n = p:feed(s)
    local out = {}
    for i = 1, n do
      out[#out + 1] = { kind = ev[3 * i - 2], a = ev[3 * i - 1], b = ev[3 * i] }
    end
    return out
  end

  it("gives back an equal element, with the same bytes, for random stanzas", function()
    assert.is_function(core.parser, "core.parser is nil")
    local seed = random_seed()
    local p = core.parser()
    local ev = parse_one(p, header)
    assert.equal(1, #ev)
    assert.equal("header", ev[1].kind)
    for i = 1, 2000 do
      local t = gen.element(1, "jabber:client")
      local s = assert(serialize(t))
      local got = parse_one(p, s)
      local where = ("seed %d, stanza %d: %s"):format(seed, i, s)
      assert(#got == 1, where .. "\nevents: " .. #got .. " " .. tostring(got[1] and got[1].a))
      assert(got[1].kind == "stanza", where .. "\n" .. got[1].kind .. ": " .. tostring(got[1].a) .. " "
        .. tostring(got[1].b))
      assert(got[1].b == s, where .. "\nraw bytes differ: " .. tostring(got[1].b))
      local d = stanza_equal.diff(t, got[1].a)
      assert(d == nil, where .. "\n" .. tostring(d))
      d = stanza_equal.check_tags(got[1].a)
      assert(d == nil, where .. "\n" .. tostring(d))
      -- and what the parser built serializes to the same element again
      local again = assert(serialize(got[1].a))
      d = stanza_equal.diff(t, assert(parse_one(p, again)[1]).a)
      assert(d == nil, where .. "\nsecond round: " .. tostring(d))
    end
    p:close()
  end)

  it("parsed elements given stanza.metatable work with every stanza method", function()
    assert.is_function(core.parser, "core.parser is nil")
    local stanza = require "xmppsm.stanza"
    local p = core.parser({ stanza_mt = stanza.metatable })
    parse_one(p, header)
    local ev = parse_one(p, "<message type='error' id='1'><body>hi</body>"
      .. "<error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>"
      .. "<x xmlns='urn:x'><y/></x></message>")
    local m = ev[1].a
    assert.is_true(stanza.is_stanza(m))
    assert.equal("hi", m:get_child_text("body"))
    assert.is_table(m:get_child("x", "urn:x"):get_child("y"))
    assert.is_nil(m:get_child("y"))
    local t, cond = m:get_error()
    assert.equal("cancel", t)
    assert.equal("item-not-found", cond)
    m:tag("new", { xmlns = "urn:n" }):text("t"):up()
    assert.equal("t", m:get_child_text("new", "urn:n"))
    assert.is_nil(stanza_equal.check_tags(m))
    local s = tostring(m)
    assert.matches("<new xmlns='urn:n'>t</new></message>$", s)
    assert.is_true(stanza_equal.equal(m, parse_one(p, s)[1].a))
    p:close()
  end)
end)
