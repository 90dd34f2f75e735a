/* libFuzzer target for the stream parser (csrc/parser.c).
 * The input's first byte picks how the rest is chunked: below 128 a fixed step of 1..17 bytes,
 * otherwise pseudo-random pieces of 1..64 bytes. The rest is fed as a stream (resetting after a
 * pause, as a client does) with small limits, so limits, pauses and the periodic expat reset are
 * all reached. Checked on every input:
 * - feeding never raises a Lua error: bad input becomes an "error" event;
 * - the events (kinds, element tables, raw bytes, error conditions) do not depend on chunking,
 *   nor on the parser's mode: the reference run is eager, the chunked one lazy (its elements are
 *   materialized by the checks' first read of `tags`, half of them after the parser is closed);
 * - before that, core.element_ns and core.lazy_child_text (get_child_text's lazy path) answer on
 *   the lazy elements what the eager ones' tables say;
 * - element tables have the documented shape;
 * - raw bytes appear in the input in order with only whitespace between them, the header's at
 *   the start of its stream; what reset() returns is input, after a pause exactly what follows;
 * - every stanza of the reference run serializes (core.serialize), and its output parses back to
 *   the same element;
 * - core.escape of the whole input refuses it exactly at its first byte that is not valid UTF-8
 *   or not an XML 1.0 character, and otherwise its entities give the input back. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

int luaopen_xmppsm_core(lua_State *L);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *driver =
    "local core = ...\n"
    "local OPTS = { max_stanza_size = 512, max_depth = 12, max_attributes = 8 }\n"
    "\n"
    "-- element tables: only name, attr, tags, 1..n; tags = the element children in order\n"
    "local function check_element(e)\n"
    "  assert(type(e.name) == \"string\" and type(e.attr) == \"table\" and type(e.tags) == \"table\", \"shape\")\n"
    "  local n, tags = 0, 0\n"
    "  for k in pairs(e) do\n"
    "    if type(k) == \"number\" then n = n + 1\n"
    "    else assert(k == \"name\" or k == \"attr\" or k == \"tags\", \"key\") end\n"
    "  end\n"
    "  assert(n == #e, \"sequence\")\n"
    "  for k, v in pairs(e.attr) do assert(type(k) == \"string\" and type(v) == \"string\", \"attr\") end\n"
    "  for i = 1, #e do\n"
    "    if type(e[i]) == \"table\" then\n"
    "      tags = tags + 1\n"
    "      assert(e.tags[tags] == e[i], \"tags\")\n"
    "      check_element(e[i])\n"
    "    else\n"
    "      assert(type(e[i]) == \"string\" and type(e[i - 1]) ~= \"string\", \"text\")\n"
    "    end\n"
    "  end\n"
    "  assert(tags == #e.tags, \"tags count\")\n"
    "end\n"
    "\n"
    "local function dump(buf, v)\n"
    "  if type(v) ~= \"table\" then\n"
    "    buf[#buf + 1] = type(v) == \"string\" and #v .. \":\" .. v or tostring(v)\n"
    "    return\n"
    "  end\n"
    "  local attr = v.name and v.attr or v\n"
    "  local keys = {}\n"
    "  for k in pairs(attr) do keys[#keys + 1] = k end\n"
    "  table.sort(keys)\n"
    "  buf[#buf + 1] = \"<\" .. tostring(v.name)\n"
    "  for _, k in ipairs(keys) do buf[#buf + 1] = #k .. \":\" .. k .. \"=\" .. #attr[k] .. \":\" .. attr[k] end\n"
    "  buf[#buf + 1] = \">\"\n"
    "  if v.name then for i = 1, #v do dump(buf, v[i]) end end\n"
    "  buf[#buf + 1] = \"</>\"\n"
    "end\n"
    "\n"
    "-- The serializer on what the parser accepted: every stanza serializes, and parsing its\n"
    "-- output in a stream of the same namespace gives the same element back.\n"
    "local STREAM_OPEN = \"<stream:stream xmlns='jabber:client' \" ..\n"
    "  \"xmlns:stream='http://etherx.jabber.org/streams'>\"\n"
    "local function round_trip(e)\n"
    "  local s, err = core.serialize(e)\n"
    "  assert(s, \"serialize refused a parsed stanza: \" .. tostring(err))\n"
    "  local p = core.parser({ lazy = false })\n"
    "  local ev, n = p:feed(STREAM_OPEN .. s)\n"
    "  p:close()\n"
    "  assert(n == 2 and ev[4] == \"stanza\" and ev[6] == s, \"serialized stanza did not parse back\")\n"
    "  local a, b = {}, {}\n"
    "  dump(a, e)\n"
    "  dump(b, ev[5])\n"
    "  assert(table.concat(a) == table.concat(b), \"serialize then parse changed the stanza\")\n"
    "end\n"
    "\n"
    "-- core.escape on the input bytes: refused exactly when they are not UTF-8 made of XML 1.0\n"
    "-- characters, at the first bad one (a bad sequence counts from its first byte); else the\n"
    "-- entities give the bytes back and nothing that must be escaped is left raw.\n"
    "local ENTITIES = { amp = \"&\", lt = \"<\", gt = \">\", quot = '\"', apos = \"'\" }\n"
    "local function first_bad(s)\n"
    "  local ok, pos = utf8.len(s)\n"
    "  for at, c in utf8.codes(ok and s or s:sub(1, pos - 1)) do\n"
    "    if (c < 32 and c ~= 9 and c ~= 10 and c ~= 13) or c == 0xFFFE or c == 0xFFFF then return at end\n"
    "  end\n"
    "  if not ok then return pos end\n"
    "end\n"
    "local function check_escape(s)\n"
    "  local e, err = core.escape(s)\n"
    "  local bad = first_bad(s)\n"
    "  if bad then\n"
    "    assert(e == nil and tonumber(err:match(\"%(byte (%d+)%)$\")) == bad, \"escape: error position\")\n"
    "    return\n"
    "  end\n"
    "  assert(not e:gsub(\"&#?%w+;\", \"\"):find(\"[&<>\\r\\n\\t\\\"']\"), \"escape: left raw\")\n"
    "  local back = e:gsub(\"&(#?)(%w+);\", function(hash, name)\n"
    "    if hash == \"#\" then return utf8.char(tonumber(name)) end\n"
    "    return ENTITIES[name]\n"
    "  end)\n"
    "  assert(back == s, \"escape: entities do not give the bytes back\")\n"
    "end\n"
    "\n"
    "-- What element_ns and get_child_text's lazy path answer, before anything is built; an eager\n"
    "-- element (or one without children) is answered from its tables, so both runs must agree.\n"
    "local PROBE_NAMES = { false, \"a\", \"b\", \"body\", \"x\" }\n"
    "local function from_tables(e, name, want, pns)\n"
    "  for _, c in ipairs(e.tags) do\n"
    "    if (not name or c.name == name) and (c.attr.xmlns or pns) == want then\n"
    "      if #c.tags == 0 then return true, table.concat(c) end\n"
    "      return true, nil\n"
    "    end\n"
    "  end\n"
    "  return false\n"
    "end\n"
    "local function probe(e)\n"
    "  local pns = core.element_ns(e)\n"
    "  local buf = { \"ns=\" .. tostring(pns) }\n"
    "  for _, name in ipairs(PROBE_NAMES) do\n"
    "    for _, want in ipairs({ pns or false, \"urn:x\", false }) do\n"
    "      local found, text = core.lazy_child_text(e, name or nil, want or nil, pns)\n"
    "      if found == nil then found, text = from_tables(e, name, want or nil, pns) end\n"
    "      buf[#buf + 1] = tostring(found) .. \":\" .. tostring(text)\n"
    "      -- without pns: the element's own namespace, and a nil want means it\n"
    "      found, text = core.lazy_child_text(e, name or nil, want or nil)\n"
    "      if found == nil then found, text = from_tables(e, name, want or pns, pns) end\n"
    "      buf[#buf + 1] = tostring(found) .. \":\" .. tostring(text)\n"
    "    end\n"
    "  end\n"
    "  return table.concat(buf, \" \")\n"
    "end\n"
    "\n"
    "local states = { header = true, open = true, paused = true, closed = true, failed = true }\n"
    "\n"
    "-- Feeds data in pieces from next_size(), resetting after a pause as a client does.\n"
    "local function run(data, next_size, lazy)\n"
    "  local p = core.parser({ max_stanza_size = OPTS.max_stanza_size, max_depth = OPTS.max_depth,\n"
    "                          max_attributes = OPTS.max_attributes, lazy = lazy })\n"
    "  local later = {}\n"
    "  local out = {}\n"
    "  local cursor = 1 -- raw bytes must appear in the input in order, only whitespace between\n"
    "  local i = 1\n"
    "  local input = data\n"
    "  while i <= #input do\n"
    "    local n = next_size()\n"
    "    local ev, cnt = p:feed(input:sub(i, i + n - 1))\n"
    "    i = i + n\n"
    "    assert(#ev == 3 * cnt, \"event count\")\n"
    "    for k = 1, cnt do\n"
    "      local kind, a, b = ev[3 * k - 2], ev[3 * k - 1], ev[3 * k]\n"
    "      if kind == \"error\" then\n"
    "        assert(type(a) == \"string\" and type(b) == \"string\", \"error values\")\n"
    "        out[#out + 1] = \"error \" .. a\n"
    "      else\n"
    "        assert(type(b) == \"string\", \"raw\")\n"
    "        local defer = false\n"
    "        if kind == \"stanza\" and lazy and rawget(a, \"tags\") == nil then\n"
    "          later.n = (later.n or 0) + 1\n"
    "          defer = later.n % 2 == 0\n"
    "        end\n"
    "        if #b > 0 then\n"
    "          local at = data:find(b, cursor, true)\n"
    "          assert(at and not data:sub(cursor, at - 1):find(\"[^ \\t\\r\\n]\"), \"raw bytes out of place\")\n"
    "          assert(kind ~= \"header\" or at == cursor, \"header raw bytes\")\n"
    "          cursor = at + #b\n"
    "        end\n"
    "        local function show()\n"
    "          if kind == \"stanza\" then check_element(a) end\n"
    "          local buf = { kind }\n"
    "          dump(buf, a)\n"
    "          dump(buf, b)\n"
    "          return table.concat(buf, \" \")\n"
    "        end\n"
    "        if kind == \"stanza\" then out[#out + 1] = probe(a) end\n"
    "        if kind == \"stanza\" and not lazy then round_trip(a) end\n"
    "        if defer then later[#out + 1] = show; out[#out + 1] = false else out[#out + 1] = show() end\n"
    "      end\n"
    "    end\n"
    "    local st = p:state()\n"
    "    assert(states[st], \"state\")\n"
    "    if st == \"failed\" then\n"
    "      local rest = p:reset()\n"
    "      assert(data:find(rest, 1, true), \"leftover after an error is not input\")\n"
    "      break\n"
    "    end\n"
    "    if st == \"paused\" then\n"
    "      out[#out + 1] = \"reset\"\n"
    "      local rest = p:reset()\n"
    "      assert(rest == data:sub(cursor, cursor + #rest - 1), \"leftover after a pause\")\n"
    "      input = rest .. input:sub(i)\n"
    "      i = 1\n"
    "    end\n"
    "  end\n"
    "  p:close()\n"
    "  collectgarbage()\n"
    "  for k, show in pairs(later) do if k ~= \"n\" then out[k] = show() end end\n"
    "  return table.concat(out, \"\\n\")\n"
    "end\n"
    "\n"
    "return function(data, mode)\n"
    "  -- reference: pieces as large as a paused parser may hold\n"
    "  local ref = run(data, function() return OPTS.max_stanza_size end, false)\n"
    "  local next_size\n"
    "  if mode < 128 then\n"
    "    local step = 1 + mode % 17\n"
    "    next_size = function() return step end\n"
    "  else\n"
    "    local seed = mode\n"
    "    next_size = function()\n"
    "      seed = (seed * 1103515245 + 12345) % 2147483648\n"
    "      return 1 + (seed >> 16) % 64\n"
    "    end\n"
    "  end\n"
    "  check_escape(data)\n"
    "  local got = run(data, next_size, true)\n"
    "  if got ~= ref then error(\"chunking changed the events:\\n\" .. ref .. \"\\n--\\n\" .. got) end\n"
    "end\n";

static lua_State *L;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    if (L == NULL) {
        L = luaL_newstate();
        luaL_openlibs(L);
        if (luaL_loadstring(L, driver) != LUA_OK) {
            fprintf(stderr, "fuzz driver: %s\n", lua_tostring(L, -1));
            abort();
        }
        luaopen_xmppsm_core(L);
        lua_call(L, 1, 1);
        lua_setglobal(L, "fuzz_run");
    }
    lua_getglobal(L, "fuzz_run");
    lua_pushlstring(L, (const char *)data + 1, size - 1);
    lua_pushinteger(L, data[0]);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
        fprintf(stderr, "fuzz driver: %s\n", lua_tostring(L, -1));
        abort();
    }
    lua_gc(L, LUA_GCCOLLECT);
    return 0;
}
