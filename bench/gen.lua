--- Generates the benchmark inputs, deterministically (fixed seed, Lua 5.4's generator).
--
-- As a library (`require "gen"` with bench/ on package.path) it gives `gen.specs(n, seed)`:
-- stanza descriptions `{ name, attr, children... }` that the serialization benchmark turns into
-- stanzas with either builder. As a script it writes the stream files:
--
--    lua5.4 bench/gen.lua mixed <out> <megabytes> [<loop-out> <loop-megabytes>]
--    lua5.4 bench/gen.lua large <out> <megabytes>
--    lua5.4 bench/gen.lua kind <out> <megabytes> ibb|vcard|text|roster
--
-- The mixed stream: chat messages (bodies of varied length, some with escaped characters and
-- non-ASCII text, some with extensions), presences (caps, vcard-update, MUC items), IQ results
-- (disco#info, disco#items, roster). The large stream: stanzas of about 64 KiB each (IBB data,
-- a vCard with a photo, a long message body, a roster of a few hundred items, in turn); `kind`
-- writes a stream of one of those kinds only.
-- `loop-out` gets the first `loop-megabytes` of the mixed stream's stanzas, without the stream
-- header: the memory benchmark feeds it over and over.

local gen = {}

local concat, char, floor = table.concat, string.char, math.floor
local random = math.random

local WORDS = {
  "the", "meeting", "is", "moved", "to", "tomorrow", "at", "ten", "could", "you", "send", "me",
  "that", "file", "again", "thanks", "lunch", "build", "failed", "on", "main", "deploy", "later",
  "what", "about", "server", "logs", "ok", "sure", "great", "café", "naïve", "zürich", "Ελλάδα",
  "日本語", "😀", "déjà", "vu", "ping", "pong", "stream", "resumed", "ack", "queue", "presence",
}
-- Text that must be escaped; in the serialization benchmark some bodies are mostly this.
local ESCAPES = { "a < b", "b > c", "Tom & Jerry", "\"quoted\"", "it's", "<tag/>", "x && y", "1<2>0" }

local DOMAINS = { "example.com", "example.org", "chat.example.net", "conference.example.com" }
local SHOWS = { "away", "chat", "dnd", "xa" }
local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function pick(t) return t[random(#t)] end

local function word_id(n)
  local t = {}
  for i = 1, n do
    local k = random(36)
    t[i] = k <= 26 and char(96 + k) or char(21 + k) -- a-z, 0-9
  end
  return concat(t)
end

local function jid(full)
  local j = "user" .. random(5000) .. "@" .. pick(DOMAINS)
  if full then j = j .. "/" .. word_id(8) end
  return j
end

local function base64(n)
  local t = {}
  for i = 1, n do
    local k = random(64)
    t[i] = B64:sub(k, k)
  end
  return concat(t)
end

local function hex(n)
  local t = {}
  for i = 1, n do t[i] = ("%x"):format(random(0, 15)) end
  return concat(t)
end

-- Body text: mostly short, sometimes long (a log excerpt, a pasted paragraph); raw (unescaped).
local function body_text(escapes)
  local r = random()
  local n
  if r < 0.6 then n = random(1, 12)
  elseif r < 0.9 then n = random(12, 60)
  elseif r < 0.98 then n = random(60, 300)
  else n = random(300, 2000) end
  local t = {}
  for i = 1, n do
    if escapes and random() < escapes then t[i] = pick(ESCAPES) else t[i] = pick(WORDS) end
    if random() < 0.01 then t[i] = t[i] .. "\n" end
  end
  return concat(t, " ")
end

local function attrs(a)
  a.id = a.id or word_id(12)
  return a
end

-- Stanza descriptions: { name, attr, child... }, a child being a description or a string.
local function message(escapes)
  local m = { "message", attrs { from = jid(true), to = jid(true), type = "chat", ["xml:lang"] = "en" } }
  m[#m + 1] = { "body", {}, body_text(escapes) }
  local r = random()
  if r < 0.3 then
    m[#m + 1] = { "active", { xmlns = "http://jabber.org/protocol/chatstates" } }
  end
  if r < 0.15 then
    m[#m + 1] = { "request", { xmlns = "urn:xmpp:receipts" } }
    m[#m + 1] = { "markable", { xmlns = "urn:xmpp:chat-markers:0" } }
    m[#m + 1] = { "origin-id", { xmlns = "urn:xmpp:sid:0", id = word_id(24) } }
  end
  if r > 0.9 then
    m[#m + 1] = { "stanza-id", { xmlns = "urn:xmpp:sid:0", id = word_id(24), by = jid(false) } }
    m[#m + 1] = { "delay", { xmlns = "urn:xmpp:delay", from = pick(DOMAINS),
                             stamp = ("2024-%02d-%02dT%02d:%02d:%02dZ"):format(random(12), random(28),
                               random(0, 23), random(0, 59), random(0, 59)) } }
  end
  return m
end

local function presence()
  local p = { "presence", attrs { from = jid(true), to = jid(false) } }
  if random() < 0.5 then p[#p + 1] = { "show", {}, pick(SHOWS) } end
  if random() < 0.4 then p[#p + 1] = { "status", {}, body_text(0.02) } end
  p[#p + 1] = { "priority", {}, tostring(random(-1, 50)) }
  p[#p + 1] = { "c", { xmlns = "http://jabber.org/protocol/caps", hash = "sha-1",
                       node = "https://" .. word_id(10) .. ".example/caps", ver = base64(27) .. "=" } }
  p[#p + 1] = { "x", { xmlns = "vcard-temp:x:update" }, { "photo", {}, hex(40) } }
  if random() < 0.3 then
    p[#p + 1] = { "x", { xmlns = "http://jabber.org/protocol/muc#user" },
                  { "item", { affiliation = "member", role = "participant", jid = jid(true) } },
                  { "status", { code = "110" } } }
  end
  return p
end

local FEATURES = {
  "http://jabber.org/protocol/disco#info", "http://jabber.org/protocol/disco#items",
  "urn:xmpp:ping", "urn:xmpp:time", "jabber:iq:version", "urn:xmpp:receipts",
  "http://jabber.org/protocol/chatstates", "urn:xmpp:chat-markers:0", "urn:xmpp:message-correct:0",
  "urn:xmpp:jingle:1", "urn:xmpp:jingle:apps:rtp:1", "urn:xmpp:jingle:transports:ice-udp:1",
  "http://jabber.org/protocol/caps", "urn:xmpp:carbons:2", "urn:xmpp:mam:2", "urn:xmpp:sid:0",
  "http://jabber.org/protocol/muc", "urn:xmpp:avatar:metadata+notify", "urn:xmpp:bookmarks:1+notify",
  "http://jabber.org/protocol/nick+notify", "urn:xmpp:hashes:2", "urn:xmpp:http:upload:0",
  "urn:xmpp:reply:0", "urn:xmpp:reactions:0", "urn:xmpp:spoiler:0", "urn:xmpp:eme:0",
  "jabber:x:conference", "urn:xmpp:message-retract:0", "urn:xmpp:omemo:2:devices+notify",
  "urn:xmpp:bob", "urn:xmpp:jingle-message:0", "http://jabber.org/protocol/xhtml-im",
}

local function iq_result()
  local iq = { "iq", attrs { from = jid(true), to = jid(true), type = "result" } }
  local r = random()
  if r < 0.5 then
    local q = { "query", { xmlns = "http://jabber.org/protocol/disco#info", node = "https://x.example#v1" },
                { "identity", { category = "client", type = "pc", name = "Client " .. word_id(5) } } }
    for i = 1, random(15, #FEATURES) do q[#q + 1] = { "feature", { var = FEATURES[i] } } end
    iq[#iq + 1] = q
  elseif r < 0.8 then
    local q = { "query", { xmlns = "http://jabber.org/protocol/disco#items" } }
    for _ = 1, random(5, 40) do
      q[#q + 1] = { "item", { jid = word_id(10) .. "@" .. pick(DOMAINS),
                              name = pick(WORDS) .. " " .. pick(ESCAPES) } }
    end
    iq[#iq + 1] = q
  else
    local q = { "query", { xmlns = "jabber:iq:roster", ver = word_id(10) } }
    for _ = 1, random(5, 30) do
      local it = { "item", { jid = jid(false), name = pick(WORDS), subscription = "both" } }
      if random() < 0.5 then it[#it + 1] = { "group", {}, pick(WORDS) } end
      q[#q + 1] = it
    end
    iq[#iq + 1] = q
  end
  return iq
end

--- The kinds of large stanza, in the order `gen.large` numbers them.
gen.LARGE_KINDS = { "ibb", "vcard", "text", "roster" }

--- A large stanza description of about `size` bytes once serialized: kind 1 in-band bytestream
-- data, 2 a vCard with a photo, 3 a long message body, 4 a roster of a few hundred items.
function gen.large(kind, size)
  if kind == 1 then -- in-band bytestream data: one long base64 text, no line breaks
    return { "iq", attrs { from = jid(true), to = jid(true), type = "set" },
             { "data", { xmlns = "http://jabber.org/protocol/ibb", seq = tostring(random(0, 65535)),
                         sid = word_id(16) }, base64(size - 200) } }
  elseif kind == 2 then -- vCard with a photo: base64 in lines of 76, as vCards carry it
    local lines, n = {}, floor((size - 400) / 77)
    for i = 1, n do lines[i] = base64(76) end
    return { "iq", attrs { from = jid(false), to = jid(true), type = "result" },
             { "vCard", { xmlns = "vcard-temp" }, { "FN", {}, "Some Body" }, { "NICKNAME", {}, "some" },
               { "PHOTO", {}, { "TYPE", {}, "image/png" }, { "BINVAL", {}, concat(lines, "\n") } } } }
  elseif kind == 3 then -- a long pasted text, with escapes and line breaks
    local t, len = {}, 0
    while len < size - 300 do
      local w = random() < 0.05 and pick(ESCAPES) or pick(WORDS)
      if random() < 0.08 then w = w .. "\n" end
      t[#t + 1] = w
      len = len + #w + 1
    end
    return { "message", attrs { from = jid(true), to = jid(true), type = "chat" },
             { "body", {}, concat(t, " ") } }
  else -- a roster push of a few hundred items: many small elements
    local q, len = { "query", { xmlns = "jabber:iq:roster", ver = word_id(10) } }, 0
    while len < size - 300 do
      local it = { "item", { jid = jid(false), name = pick(WORDS), subscription = "both" },
                   { "group", {}, pick(WORDS) } }
      q[#q + 1] = it
      len = len + 110
    end
    return { "iq", attrs { from = jid(false), to = jid(true), type = "set" }, q }
  end
end

-- Serialization in the style of a server: apostrophes around attribute values, escapes in
-- text and values, `xmlns` first.
local TEXT_ESC = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;" }
local ATTR_ESC = { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ["'"] = "&apos;", ['"'] = "&quot;",
                   ["\n"] = "&#10;", ["\r"] = "&#13;", ["\t"] = "&#9;" }

local function write(out, s)
  local name, attr = s[1], s[2]
  out[#out + 1] = "<" .. name
  if attr.xmlns then out[#out + 1] = " xmlns='" .. attr.xmlns .. "'" end
  local keys = {}
  for k in pairs(attr) do if k ~= "xmlns" then keys[#keys + 1] = k end end
  table.sort(keys) -- deterministic output
  for _, k in ipairs(keys) do
    out[#out + 1] = " " .. k .. "='" .. attr[k]:gsub("[&<>'\"\n\r\t]", ATTR_ESC) .. "'"
  end
  if #s == 2 then
    out[#out + 1] = "/>"
    return
  end
  out[#out + 1] = ">"
  for i = 3, #s do
    local c = s[i]
    if type(c) == "string" then
      out[#out + 1] = (c:gsub("[&<>]", TEXT_ESC))
    else
      write(out, c)
    end
  end
  out[#out + 1] = "</" .. name .. ">"
end

function gen.serialize(s)
  local out = {}
  write(out, s)
  return concat(out)
end

gen.HEADER = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
  .. "xmlns:stream='http://etherx.jabber.org/streams' from='example.com' id='c2s-bench-1' "
  .. "version='1.0' xml:lang='en'>"
gen.FOOTER = "</stream:stream>"

--- A mixed stanza description: 60% messages, 25% presences, 15% IQ results.
-- @tparam[opt] number escapes share of body words replaced by text that needs escaping
function gen.mixed_one(escapes)
  local r = random()
  if r < 0.60 then return message(escapes or 0.03)
  elseif r < 0.85 then return presence()
  else return iq_result() end
end

--- `n` stanza descriptions for the serialization benchmark: the mixed kinds, a third of the
-- messages with escaping-heavy bodies.
function gen.specs(n, seed)
  math.randomseed(seed or 7)
  local t = {}
  for i = 1, n do
    t[i] = gen.mixed_one(i % 3 == 0 and 0.5 or 0.03)
  end
  return t
end

-- Writes the stream: header, stanzas separated now and then by a newline (a keepalive), close.
local function write_stream(path, bytes, next_stanza, loop_path, loop_bytes)
  local f = assert(io.open(path, "wb"))
  local loop = loop_path and assert(io.open(loop_path, "wb"))
  f:write(gen.HEADER, "\n")
  local total, n = 0, 0
  while total < bytes do
    local s = gen.serialize(next_stanza(n))
    if random() < 0.05 then s = s .. "\n" end
    f:write(s)
    if loop and total < loop_bytes then loop:write(s) end
    total = total + #s
    n = n + 1
  end
  f:write(gen.FOOTER)
  f:close()
  if loop then loop:close() end
  return n, total
end

if arg and arg[0] and arg[0]:match("gen%.lua$") then
  local kind, out, mb = arg[1], arg[2], tonumber(arg[3])
  local n, total
  if kind == "mixed" then
    math.randomseed(42)
    n, total = write_stream(out, mb * 2 ^ 20, function() return gen.mixed_one() end,
                            arg[4], tonumber(arg[5] or 0) * 2 ^ 20)
  elseif kind == "large" then
    math.randomseed(43)
    n, total = write_stream(out, mb * 2 ^ 20, function(i) return gen.large(i % 4 + 1, 65536) end)
  elseif kind == "kind" then -- one kind of large stanza only: gen.lua kind OUT MEGABYTES NAME
    local k
    for i, name in ipairs(gen.LARGE_KINDS) do if name == arg[4] then k = i end end
    assert(k, "unknown kind of large stanza: " .. tostring(arg[4]))
    math.randomseed(44 + k)
    n, total = write_stream(out, mb * 2 ^ 20, function() return gen.large(k, 65536) end)
  else
    error("usage: gen.lua mixed|large|kind OUT MEGABYTES [LOOP-OUT LOOP-MEGABYTES | KIND]")
  end
  io.stderr:write(("gen.lua: %s: %d stanzas, %.1f MB\n"):format(out, n, total / 2 ^ 20))
end

return gen
