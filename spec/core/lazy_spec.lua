-- Specs for the parser's lazy elements (csrc/parser.c; docs/core.md, "Lazy elements"): a stanza
-- parsed with `lazy = true` holds its name, and builds attr and its children on first use.
local core = require "xmppsm.core"
local stanza = require "xmppsm.stanza"
local random_seed = require "helpers.seed"

local STREAMS = "http://etherx.jabber.org/streams"
local HDR = "<stream:stream xmlns='jabber:client' xmlns:stream='" .. STREAMS
  .. "' to='example.com' version='1.0'>"

local function fixture(name)
  local f = assert(io.open("spec/fixtures/" .. name, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

-- All events of `data` fed at once (following a pause with reset, as a client does).
local function events(opts, data)
  local p = core.parser(opts)
  local out = {}
  while #data > 0 do
    local ev, n = p:feed(data)
    data = ""
    for k = 1, n do out[#out + 1] = { kind = ev[3 * k - 2], a = ev[3 * k - 1], b = ev[3 * k] } end
    if p:state() == "paused" then data = p:reset() end
  end
  p:close()
  return out
end

-- nil when a and b are the same element tables in every raw detail: keys (only name, attr, tags,
-- 1..n), metatables, attributes, children in order, and `tags` listing the element children.
local function differ(a, b, path)
  if type(a) ~= type(b) then return path .. ": " .. type(a) .. " vs " .. type(b) end
  if type(a) ~= "table" then
    return a ~= b and (path .. ": " .. tostring(a) .. " vs " .. tostring(b)) or nil
  end
  path = path .. "/" .. tostring(rawget(a, "name"))
  if getmetatable(a) ~= getmetatable(b) then return path .. ": metatables differ" end
  if rawget(a, "name") ~= rawget(b, "name") then return path .. ": names differ" end
  for _, t in ipairs { a, b } do
    for k in next, t do
      if not (k == "name" or k == "attr" or k == "tags" or math.type(k) == "integer") then
        return path .. ": key " .. tostring(k)
      end
    end
  end
  local aa, ba = rawget(a, "attr"), rawget(b, "attr")
  for k, v in next, aa do if ba[k] ~= v then return path .. ": attribute " .. k end end
  for k in next, ba do if aa[k] == nil then return path .. ": extra attribute " .. k end end
  if rawlen(a) ~= rawlen(b) then return path .. ": " .. rawlen(a) .. " vs " .. rawlen(b) .. " children" end
  local at, bt, ntag = rawget(a, "tags"), rawget(b, "tags"), 0
  if type(at) ~= "table" or type(bt) ~= "table" then return path .. ": no tags" end
  for i = 1, rawlen(a) do
    local d = differ(rawget(a, i), rawget(b, i), path .. "[" .. i .. "]")
    if d then return d end
    if type(rawget(a, i)) == "table" then
      ntag = ntag + 1
      if rawget(at, ntag) ~= rawget(a, i) or rawget(bt, ntag) ~= rawget(b, i) then return path .. ": tags" end
    end
  end
  if rawlen(at) ~= ntag or rawlen(bt) ~= ntag then return path .. ": tags count" end
  return nil
end

-- Parses `data` eagerly and lazily and checks that the events match once materialized.
-- `where` (optional) names the case in every failure, such as a random test's seed.
local function compare(data, opts, where)
  opts = opts or {}
  where = where and where .. ", " or ""
  local o1, o2 = { lazy = false }, { lazy = true }
  for k, v in pairs(opts) do o1[k], o2[k] = v, v end
  local eager, lazy = events(o1, data), events(o2, data)
  assert.equal(#eager, #lazy, where .. "event count")
  local lazies = 0
  for i, e in ipairs(eager) do
    local l, at = lazy[i], where .. "event " .. i
    assert.equal(e.kind, l.kind, at)
    assert.equal(e.b, l.b, at) -- raw bytes, error texts
    if e.kind == "stanza" then
      if rawget(l.a, "tags") == nil then lazies = lazies + 1 end
      core.materialize(l.a)
      assert.is_nil(differ(e.a, l.a, ""), at)
    elseif e.kind == "header" then
      assert.same(e.a, l.a, at)
    else
      assert.equal(e.a, l.a, at)
    end
  end
  return lazies, #eager
end

describe("xmppsm.core parser, lazy elements", function()
  it("is on by default, off with lazy = false; the option must be a boolean", function()
    local ev = core.parser():feed(HDR .. "<message><body>x</body></message>")
    assert.is_nil(rawget(ev[5], "tags"))
    assert.is_table(ev[5].tags)   -- materialized by the read
    ev = core.parser{ lazy = false }:feed(HDR .. "<message><body>x</body></message>")
    assert.is_table(rawget(ev[5], "tags"))
    assert.has_error(function() core.parser { lazy = 1 } end)
    assert.has_error(function() core.parser { lazy = "yes" } end)
  end)

  it("materialized, equal the eager elements for every recorded transcript, raw bytes identical", function()
    for _, name in ipairs { "prosody-session.xml", "prosody-badauth.xml", "prosody-badxml.xml" } do
      local lazies, n = compare(fixture(name), { stanza_mt = stanza.metatable })
      assert.is_true(lazies > 0 and n > lazies, name)
      compare(fixture(name))
    end
  end)

  -- `count` random stanzas after the header: names, namespaces, xml:lang, prefixed attributes,
  -- awkward text (entities, CDATA, non-ASCII), nesting up to 6 levels.
  local function random_stream(count)
    local names = { "a", "b", "message", "body", "x", "query", "item" }
    local nss = { "urn:a", "urn:b", "jabber:client", "jabber:iq:roster" }
    local texts = { "t", " ", "&amp;", "&lt;x&gt;", "\195\169", "<![CDATA[c]]>", "&#10;", "\n" }
    local function element(depth, out)
      local name = names[math.random(#names)]
      out[#out + 1] = "<" .. name
      if math.random() < 0.3 then out[#out + 1] = " xmlns='" .. nss[math.random(#nss)] .. "'" end
      if math.random() < 0.3 then out[#out + 1] = " xml:lang='en'" end
      if math.random() < 0.3 then out[#out + 1] = " xmlns:p='urn:p' p:q='1'" end
      for i = 1, math.random(0, 3) do
        out[#out + 1] = (" a%d='%s'"):format(i, texts[math.random(#texts - 3)])
      end
      local n = depth < 6 and math.random(0, 5) or 0
      if n == 0 then out[#out + 1] = "/>" return end
      out[#out + 1] = ">"
      for _ = 1, n do
        if math.random() < 0.4 then
          out[#out + 1] = texts[math.random(#texts)]
        else
          element(depth + 1, out)
        end
      end
      out[#out + 1] = "</" .. name .. ">"
    end
    local parts = { HDR }
    for _ = 1, count do element(1, parts) end
    return table.concat(parts), names, nss
  end

  it("materialized, equal the eager elements for random stanzas", function()
    local seed = random_seed()
    local lazies, n = compare(random_stream(2000), { stanza_mt = stanza.metatable }, "seed " .. seed)
    assert.equal(2000, n - 1, "seed " .. seed)
    assert.is_true(lazies > 1000, "seed " .. seed)
  end)

  it("answers get_child_text from the recorded children, as a built stanza does, building none", function()
    local seed = random_seed()
    local data, names, nss = random_stream(1000)
    local lazy = events({ stanza_mt = stanza.metatable }, data)
    local eager = events({ stanza_mt = stanza.metatable, lazy = false }, data)
    local queries = { { nil, nil } }
    for _, name in ipairs(names) do
      queries[#queries + 1] = { name, nil }
      for _, ns in ipairs(nss) do queries[#queries + 1] = { name, ns } end
    end
    for _, ns in ipairs(nss) do queries[#queries + 1] = { nil, ns } end
    local before, lazies, answers = core._materialized(), 0, 0
    for i, ev in ipairs(lazy) do
      if ev.kind == "stanza" then
        local el, ref = ev.a, eager[i].a
        if rawget(el, "tags") == nil then lazies = lazies + 1 end
        for _, q in ipairs(queries) do
          local got, want = el:get_child_text(q[1], q[2]), ref:get_child_text(q[1], q[2])
          assert.equal(want, got,
                       ("seed %d, stanza %d, %s %s"):format(seed, i, tostring(q[1]), tostring(q[2])))
          if want then answers = answers + 1 end
        end
      end
    end
    assert.equal(before, core._materialized(), "seed " .. seed)
    assert.is_true(lazies > 500 and answers > 500,
                   ("seed %d: %d lazy, %d answers"):format(seed, lazies, answers))
  end)

  it("get_child_text on a lazy stanza: the namespace rules of get_child, text decoded", function()
    local p = core.parser { stanza_mt = stanza.metatable }
    p:feed(HDR)
    local before = core._materialized()
    local function one(src) return p:feed(src)[2] end
    local m = one("<message><body>a &amp; b</body><body xml:lang='de'>c</body><x xmlns='urn:x'>"
      .. "<body>in x</body></x><subject/><thread><b/></thread><e></e></message>")
    assert.equal("a & b", m:get_child_text("body"))
    assert.equal("a & b", m:get_child_text(nil))              -- the first child in the stanza's ns
    assert.is_nil(m:get_child_text("body", "jabber:client"))  -- attr.xmlns is nil: as get_child
    assert.is_nil(m:get_child_text("x", "urn:x"))              -- <x> has an element child
    assert.equal("", m:get_child_text("subject"))
    assert.equal("", m:get_child_text("e"))
    assert.is_nil(m:get_child_text("thread"))                  -- element children: nil
    assert.is_nil(m:get_child_text("x"))                       -- another namespace
    assert.is_nil(m:get_child_text("missing"))
    local o = one("<message xmlns='urn:other'><body>o</body><x xmlns='jabber:client'>j</x></message>")
    assert.equal("o", o:get_child_text("body"))                -- pns: the stanza's attr.xmlns
    assert.equal("o", o:get_child_text("body", "urn:other"))
    assert.equal("j", o:get_child_text("x", "jabber:client"))
    o.attr.xmlns = "urn:changed"                               -- attr is read live
    assert.equal("o", o:get_child_text("body", "urn:changed"))
    assert.is_nil(o:get_child_text("body", "urn:other"))
    assert.equal(before, core._materialized())
    -- built (or materialized) stanzas take the general path, with the same answers
    assert.equal(m, core.materialize(m))
    assert.equal("a & b", m:get_child_text("body"))
    assert.is_nil(m:get_child_text("x", "urn:x"))
    assert.equal("", m:get_child_text("e"))
    assert.is_nil(m:get_child_text("thread"))
    -- without pns, the element's own attr.xmlns is used, and a nil want means it
    local d = one("<message xmlns='urn:o'><body xmlns='jabber:client'>in client</body>"
      .. "<body>in o</body></message>")
    assert.is_nil(rawget(d, "attr"))
    assert.same({ true, "in o" }, { core.lazy_child_text(d, "body") })
    assert.same({ true, "in o" }, { core.lazy_child_text(d, "body", "urn:o") })
    assert.same({ true, "in client" }, { core.lazy_child_text(d, "body", "jabber:client") })
    assert.same({ true, "in client" }, { core.lazy_child_text(d, "body", "jabber:client", nil) })
    assert.same({ true, "in o" }, { core.lazy_child_text(d, "body", nil, nil) }) -- given: nil
    assert.same({ false }, { core.lazy_child_text(d, "body", "urn:o", nil) })
    assert.is_nil(rawget(d, "attr"))
    d.attr.xmlns = "jabber:client"               -- a built attr is read live, as element_ns does
    assert.same({ true, "in client" }, { core.lazy_child_text(d, "body") })
    -- text that reached the parser in pieces (entities, CDATA, one byte per feed) is one text
    local src = "<message><body>a &lt;<![CDATA[b<c]]>&#x41;\nz</body></message>"
    local pieces
    for i = 1, #src do
      local ev, n = p:feed(src:sub(i, i))
      if n > 0 then pieces = ev[2] end
    end
    assert.equal("a <b<cA\nz", pieces:get_child_text("body"))
    assert.same({ true, "a <b<cA\nz" }, { core.lazy_child_text(pieces, "body") })
    -- a lazy element is a table: anything else is refused by the scanner
    assert.has_error(function() core.lazy_child_text("x") end)
    assert.is_nil((core.lazy_child_text({})))
  end)

  it("never builds children for name and attr, and builds them once", function()
    local p = core.parser { lazy = true, stanza_mt = stanza.metatable }
    local before = core._materialized()
    local ev = p:feed(HDR .. "<message to='a@b' xmlns='urn:other'><body>hi</body></message><presence/>")
    local m = ev[5]
    assert.equal("message", m.name)
    assert.equal("a@b", m.attr.to)
    assert.equal("urn:other", m.attr.xmlns)
    assert.is_true(stanza.is_stanza(m))
    assert.is_false(stanza.is_stanza(setmetatable({}, { __xmppsm_stanza_mt = {} })))
    assert.equal(before, core._materialized())
    assert.is_nil(rawget(m, "tags"))
    assert.equal(stanza.metatable, getmetatable(ev[8])) -- no children: built as usual
    assert.equal("hi", m:get_child_text("body")) -- reads the recorded children (below)
    assert.equal(before, core._materialized())
    assert.equal("hi", m:get_child("body")[1])
    assert.equal(before + 1, core._materialized())
    assert.equal(stanza.metatable, getmetatable(m))
    assert.equal(m, core.materialize(m))
    assert.equal(before + 1, core._materialized())
    assert.equal(7, core.materialize(7))
    assert.equal("hi", m.tags[1][1])
  end)

  it("builds attr on its first read, once, and keeps it (and changes to it) when materialized", function()
    local p = core.parser { lazy = true, stanza_mt = stanza.metatable }
    p:feed(HDR)
    local src = "<message to='a@b' xml:lang='en' xmlns:p='urn:p' p:q='1'><body>hi</body></message>"
    local before = core._materialized()
    local m = p:feed(src)[2]
    assert.is_nil(rawget(m, "attr"))
    local attr = m.attr
    assert.same({ to = "a@b", ["xml:lang"] = "en", ["urn:p\1q"] = "1" }, attr)
    assert.equal(attr, rawget(m, "attr"))
    assert.equal(attr, m.attr)
    attr.to = "c@d"
    assert.equal(before, core._materialized())
    assert.equal("hi", m:get_child_text("body")) -- answered from the records
    assert.equal(before, core._materialized())
    assert.equal("hi", m:get_child("body")[1])
    assert.equal(before + 1, core._materialized())
    assert.equal(attr, m.attr)
    assert.equal("c@d", m.attr.to)
    -- materialized before attr was read: attr is built then
    local o = p:feed("<x:iq xmlns:x='jabber:client' xmlns='urn:other' id='1'><q/></x:iq>")[2]
    core.materialize(o)
    assert.same({ id = "1" }, rawget(o, "attr"))
    assert.equal("urn:other", o[1].attr.xmlns)
    o = p:feed("<iq xmlns='urn:other' id='2'><q/></iq>")[2]
    assert.same({ id = "2", xmlns = "urn:other" }, o.attr)
    assert.is_nil(o[1].attr.xmlns)
  end)

  it("at every split of the input: raw is the bytes received, attr on first read equals eager", function()
    local body = "<message to='a@b' id='m1' xml:lang='en'><body>x &amp; y</body></message>"
      .. "<iq type='result' id='i&apos;1' xmlns:p='urn:p' p:q='v'>"
      .. "<query xmlns='urn:q'><item jid='c'/></query></iq>"
      .. "<presence/> <message xmlns='urn:other' id='m2'><x/>t</message>"
    local eager = events({ lazy = false, stanza_mt = stanza.metatable }, HDR .. body)
    local expect = {}
    for _, e in ipairs(eager) do if e.kind == "stanza" then expect[#expect + 1] = e end end
    assert.equal(4, #expect)
    assert.equal("<presence/>", expect[3].b)
    for cut = 1, #body - 1 do
      local p = core.parser { lazy = true, stanza_mt = stanza.metatable }
      local got = {}
      for _, piece in ipairs { HDR, body:sub(1, cut), body:sub(cut + 1) } do
        local ev, n = p:feed(piece)
        for k = 1, n do
          if ev[3 * k - 2] == "stanza" then got[#got + 1] = { a = ev[3 * k - 1], b = ev[3 * k] } end
        end
      end
      assert.equal(#expect, #got, "cut " .. cut)
      for i, e in ipairs(expect) do
        local l = got[i]
        assert.equal(e.b, l.b, "cut " .. cut)
        assert.equal(e.a.name, l.a.name)
        if i ~= 3 then assert.is_nil(rawget(l.a, "attr"), "cut " .. cut) end
        assert.same(rawget(e.a, "attr"), l.a.attr, "cut " .. cut)
        core.materialize(l.a)
        assert.is_nil(differ(e.a, l.a, ""), "cut " .. cut)
      end
      p:close()
    end
  end)

  it("costs no materialization when dropped unread, and keeps only its own bytes", function()
    local p = core.parser { lazy = true, stanza_mt = stanza.metatable }
    p:feed(HDR)
    local before = core._materialized()
    local body = ("<body>" .. ("x"):rep(100) .. "</body>"):rep(10)
    for _ = 1, 2000 do
      local ev = p:feed("<message to='a'>" .. body .. "</message>")
      assert.equal("message", ev[2].name)
    end
    assert.equal(before, core._materialized())
    collectgarbage()
    local kb = collectgarbage("count")
    local keep = {}
    for i = 1, 200 do keep[i] = p:feed("<message to='a'>" .. body .. "</message>")[2] end
    collectgarbage()
    -- one stanza per feed: each holds its table, attr and a block with a copy of its own
    -- records only: ~1.2 KiB, not the stream
    local per = (collectgarbage("count") - kb) * 1024 / 200
    assert.is_true(per < 4096, ("%.0f bytes per lazy stanza"):format(per))
    assert.equal(before, core._materialized())
    assert.equal(10, #keep[200])
    assert.equal(before + 1, core._materialized())
  end)

  it("shares blocks of at most 16 KiB of records among one feed's stanzas; materializing lets go", function()
    local p = core.parser { lazy = true, stanza_mt = stanza.metatable }
    p:feed(HDR)
    local body = ("<body>" .. ("x"):rep(100) .. "</body>"):rep(10)
    local parts = {}
    for i = 1, 1000 do parts[i] = ("<message id='%d'>"):format(i) .. body .. "</message>" end
    collectgarbage()
    collectgarbage()
    local kb = collectgarbage("count")
    local ev, n = p:feed(table.concat(parts)) -- about 1.3 MB of records
    assert.equal(1000, n)
    local kept = { ev[2], ev[3 * 500 - 1], ev[3 * 1000 - 1] }
    ev = nil -- luacheck: ignore 311
    collectgarbage()
    collectgarbage()
    -- three stanzas keep at most three blocks (16 KiB of records each), not the feed's records
    local held = (collectgarbage("count") - kb) * 1024
    assert.is_true(held > 3 * 1000 and held < 3 * 20 * 1024, ("%.0f bytes held"):format(held))
    for i, el in ipairs(kept) do
      assert.equal(tostring(({ 1, 500, 1000 })[i]), el.attr.id)
      assert.equal(10, #el) -- materializes
      assert.equal(("x"):rep(100), el.tags[10][1])
    end
    collectgarbage()
    collectgarbage()
    local after = (collectgarbage("count") - kb) * 1024
    -- the blocks are gone; what stays is the three stanzas' own tables and strings
    assert.is_true(after < held / 2, ("%.0f bytes held, then %.0f"):format(held, after))
  end)

  it("finds each stanza's records in its block whatever the order its stanzas are read in", function()
    local p = core.parser { lazy = true, stanza_mt = stanza.metatable }
    p:feed(HDR)
    local parts = {}
    for i = 1, 60 do parts[i] = ("<message id='%d'><body>b%d</body></message>"):format(i, i) end
    local ev, n = p:feed(table.concat(parts)) -- one feed, one block
    assert.equal(60, n)
    local function el(i) return ev[3 * i - 1] end
    local order = {}
    for i = 60, 1, -2 do order[#order + 1] = i end -- backwards, skipping
    for i = 1, 59, 2 do order[#order + 1] = i end -- then forwards, the others
    for _, i in ipairs(order) do
      assert.equal(tostring(i), el(i).attr.id)
      assert.equal("b" .. i, el(i):get_child_text("body"))
    end
    for _, i in ipairs { 7, 7, 60, 1, 33 } do -- again, and the same one twice
      assert.equal("b" .. i, el(i):get_child_text("body"))
      assert.equal("b" .. i, el(i).tags[1][1]) -- materializes
    end
  end)

  it("element_ns tells attr.xmlns without building a lazy element's attr", function()
    local p = core.parser { lazy = true, stanza_mt = stanza.metatable }
    p:feed(HDR)
    local ev = p:feed("<message to='a'><body>x</body></message>" ..
      "<a xmlns='urn:xmpp:sm:3' h='1'><x/></a><enabled xmlns='urn:xmpp:sm:3'/>")
    local msg, a, enabled = ev[2], ev[5], ev[8]
    local before = core._materialized()
    assert.is_nil(core.element_ns(msg)) -- in the stream's content namespace
    assert.equal("urn:xmpp:sm:3", core.element_ns(a))
    assert.is_nil(rawget(msg, "attr"))
    assert.is_nil(rawget(a, "attr"))
    assert.equal("urn:xmpp:sm:3", core.element_ns(enabled)) -- no children: built eagerly
    assert.is_table(rawget(enabled, "attr"))
    assert.equal(before, core._materialized())
    -- once attr exists, it is what counts, changes included
    assert.equal("a", msg.attr.to)
    msg.attr.xmlns = "urn:example"
    assert.equal("urn:example", core.element_ns(msg))
    -- materialized and built elements: attr.xmlns
    core.materialize(a)
    assert.equal("urn:xmpp:sm:3", core.element_ns(a))
    local iq = stanza.iq({ type = "get" }):tag("query", { xmlns = "jabber:iq:roster" }):up()
    assert.is_nil(core.element_ns(iq))
    assert.equal("jabber:iq:roster", core.element_ns(iq.tags[1]))
    assert.is_nil(core.element_ns(stanza.message()))
    assert.is_nil(core.element_ns({ name = "x" }))
    assert.has_error(function() core.element_ns("x") end)
  end)

  it("materializes on every stanza method and metamethod but get_child_text", function()
    local p = core.parser { lazy = true, stanza_mt = stanza.metatable }
    p:feed(HDR)
    local src = "<iq type='error' id='1'><query xmlns='jabber:iq:roster'><item jid='a@b'/></query>"
      .. "<error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
      .. "<text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>gone</text></error>x</iq>"
    local ep = core.parser { lazy = false, stanza_mt = stanza.metatable }
    ep:feed(HDR)
    local ref = core.serialize(ep:feed(src)[2]) -- attribute order is the hash table's
    local function fresh()
      local el = p:feed(src)[2]
      assert.is_nil(rawget(el, "tags"))
      return el
    end
    local uses = {
      function(el) return el:get_child("query", "jabber:iq:roster").name == "query" end,
      function(el) return el:get_child("error"):get_child_text("text") == nil end,
      function(el) return el.tags[1].name == "query" end,
      function(el) return el[3] == "x" end,
      function(el) return #el == 3 end,
      function(el) local n = 0 for _ in ipairs(el) do n = n + 1 end return n == 3 end,
      function(el)
        local n = 0
        for k in pairs(el) do if math.type(k) == "integer" then n = n + 1 end end
        return n == 3
      end,
      function(el) local n = 0 for _ in el:childtags() do n = n + 1 end return n == 1 end,
      function(el) local n = 0 for _ in el:children() do n = n + 1 end return n == 3 end,
      function(el)
        local t, c, x = el:get_error()
        return t == "cancel" and c == "item-not-found" and x == "gone"
      end,
      function(el) el:tag("new"):up() return el[4].name == "new" and el.tags[3].name == "new" end,
      function(el) el:text("y") return el[3] == "xy" end,
      function(el) el[4] = "z" return rawget(el, 4) == "z" and el[1].name == "query" end,
      function(el) el:maptags(function(c) return c.name ~= "error" and c or nil end) return #el.tags == 1 end,
      function(el) return el:get_text() == nil and #el.tags == 2 end,
      function(el) return stanza.clone(el)[1].name == "query" end,
      function(el) return tostring(el) == ref end,
      function(el) return el:serialize() == ref end,
      function(el) return core.serialize(el) == ref end,
      function(el)
        local before = core._materialized()
        local ok = stanza.reply(el).attr.id == "1" and core._materialized() == before -- attr only
        local e = el:get_child("error")
        return ok and e:get_child_text("text", "urn:ietf:params:xml:ns:xmpp-stanzas") == "gone"
      end,
      function(el) return el:top_tag():find("^<iq") ~= nil end,
    }
    for i, use in ipairs(uses) do
      -- the same use on a lazy element and on an eager one leaves them equal
      local el, eager = fresh(), ep:feed(src)[2]
      assert.is_true(use(el), "use " .. i)
      assert.is_true(use(eager), "use " .. i .. ", eager")
      assert.equal(stanza.metatable, getmetatable(el), "use " .. i)
      assert.is_nil(differ(eager, el, ""), "use " .. i)
    end
  end)

  it("serializes a never-touched lazy element to its raw bytes' content, also as a child", function()
    local p = core.parser { lazy = true, stanza_mt = stanza.metatable }
    p:feed(HDR)
    local src = "<message xmlns='jabber:client' to='a'><body>a &amp; b</body><x xmlns='urn:x'><y/>t</x>"
      .. "</message>"
    local ev = p:feed(src)
    assert.equal(src, ev[3])
    local before = core._materialized()
    assert.equal("<message to='a'><body>a &amp; b</body><x xmlns='urn:x'><y/>t</x></message>",
      core.serialize(ev[2]))
    assert.equal(before + 1, core._materialized())
    local inner = p:feed(src)[2]
    local outer = stanza.message({ to = "b" }):add_child(inner)
    assert.equal("<message to='b'><message to='a'><body>a &amp; b</body><x xmlns='urn:x'><y/>t</x>"
      .. "</message></message>", core.serialize(outer))
  end)

  it("materializes every lazy element among plain ones, in any order", function()
    -- The serializer remembers a metatable it found plain; lazy ones must still be seen.
    local p = core.parser { lazy = true, stanza_mt = stanza.metatable }
    p:feed(HDR)
    local src = "<message xmlns='jabber:client'><body>x</body></message>"
    local lazy1, lazy2 = p:feed(src)[2], p:feed(src)[2]
    local outer = stanza.message({ to = "b" }, "1"):add_child(lazy1)
      :tag("p"):add_child(lazy2):up():text_tag("q", "2")
    local before = core._materialized()
    assert.equal("<message to='b'><body>1</body><message><body>x</body></message>"
      .. "<p><message><body>x</body></message></p><q>2</q></message>", core.serialize(outer))
    assert.equal(before + 2, core._materialized())
  end)

  it("works without stanza_mt and after the parser is closed or collected", function()
    local p = core.parser { lazy = true }
    local ev = p:feed(HDR .. "<message><body>x</body></message>")
    p:close()
    p = nil -- luacheck: ignore
    collectgarbage()
    local m = ev[5]
    assert.is_not_nil(getmetatable(m))
    assert.equal("x", m[1][1])
    assert.is_nil(getmetatable(m))
    assert.is_nil(getmetatable(m[1]))
  end)

  it("adopt: a table takes over a lazy element, its place in the block and its metatable", function()
    local p = core.parser { lazy = true, stanza_mt = stanza.metatable }
    p:feed(HDR)
    local parts = {}
    for i = 1, 5 do parts[i] = ("<message id='%d'><body>b%d</body></message>"):format(i, i) end
    local ev = p:feed(table.concat(parts)) -- one block for the five
    local eager = events({ lazy = false, stanza_mt = stanza.metatable }, HDR .. table.concat(parts))
    local before = core._materialized()
    local from, lazy_mt = ev[3 * 3 - 1], getmetatable(ev[3 * 3 - 1])
    local to = { name = "message" }
    core.adopt(to, from)
    -- `from` is an empty plain table; `to` is the third stanza, still lazy
    assert.is_nil(next(from))
    assert.is_nil(getmetatable(from))
    assert.equal(lazy_mt, getmetatable(to))
    assert.is_nil(rawget(to, "attr"))
    assert.equal("3", to.attr.id)
    assert.equal("b3", to:get_child_text("body"))
    assert.equal(before, core._materialized())
    -- its neighbours in the block are found as before
    assert.equal("b2", ev[3 * 2 - 1]:get_child_text("body"))
    assert.equal("b4", ev[3 * 4 - 1]:get_child_text("body"))
    core.materialize(to)
    assert.is_nil(differ(eager[1 + 3].a, to, "")) -- eager[1] is the header
    -- an element whose attr was built, or a materialized one, moves with what it has
    local read = ev[3 * 5 - 1]
    assert.equal("5", read.attr.id)
    local to5 = {}
    core.adopt(to5, read)
    assert.equal("5", rawget(to5, "attr").id)
    core.materialize(to5)
    assert.is_nil(differ(eager[1 + 5].a, to5, ""))
    local again = {}
    core.adopt(again, to5)
    assert.is_nil(differ(eager[1 + 5].a, again, ""))
    assert.is_nil(next(to5))
    -- adopting itself changes nothing; non-tables are refused
    core.adopt(again, again)
    assert.is_nil(differ(eager[1 + 5].a, again, ""))
    assert.has_error(function() core.adopt(again, "x") end)
    assert.has_error(function() core.adopt(nil, {}) end)
  end)

  it("materializes deep stanzas (more levels than fit on the C stack array)", function()
    local depth = 40
    local s = ("<a>"):rep(depth) .. "t" .. ("</a>"):rep(depth)
    local lazy = events({ lazy = true, max_depth = 64 }, HDR .. s)[2].a
    local eager = events({ lazy = false, max_depth = 64 }, HDR .. s)[2].a
    core.materialize(lazy)
    assert.is_nil(differ(eager, lazy, ""))
    local el = lazy
    for _ = 2, depth do el = el[1] end
    assert.equal("t", el[1])
  end)
end)
