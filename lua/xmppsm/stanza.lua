--- Building and reading stanzas, in the shape of Prosody's `util.stanza`.
--
-- An element is a plain table (docs/core.md, "Element tables"):
--
--    { name = "message", attr = { to = "a@b", type = "chat" },
--      tags = { <child elements, in order> },
--      [1] = <child element or text string>, [2] = ..., }
--
-- Built and parsed elements have the same shape and, once used, `stanza.metatable` (the
-- parser's `stanza_mt` option), so every method here works on them, `:tag()` too. Until then
-- lazy and compact elements (below) have metatables of their own: test with `is_stanza`, not by
-- comparing metatables.
-- A parsed stanza may come *lazy* (docs/core.md, "Lazy elements"): `name` is there, `attr` is
-- built on first read, its children on first other use by its metatable, which then becomes
-- `stanza.metatable`.
-- Code here that reads an element raw (`rawlen`, `rawget`) outside a method call first calls
-- `core.materialize`. `message(attr, body)` builds a *compact* message, filled in on first use
-- the same way (see compact_message_mt below).
--
-- **Builder position.** `:tag()` moves into the new child, `:up()` back out, `:reset()` to the
-- top. That position is kept outside the element (in a table with weak keys, keyed by the
-- element it was built from), so an element never holds anything but `name`, `attr`, `tags` and
-- its children: the serializer and the parser see nothing else, and `clone` does not copy it.
--
-- **Namespaces.** `attr.xmlns` is set only where an element's namespace differs from its
-- parent's; `nil` means "the same as the parent". Methods that select children by namespace
-- (`get_child`, `get_child_text`, `childtags`) compare the child's namespace *relative to its
-- parent*: a child with `attr.xmlns == nil` is taken to be in `self.attr.xmlns`. So with
-- `xmlns == nil` they select children in the parent's own namespace (those with no `xmlns`, or
-- one equal to the parent's `attr.xmlns`); with a string they select children whose `xmlns` is
-- that string, or who inherit it because the parent's `attr.xmlns` is that string. A top-level
-- stanza usually has no `attr.xmlns` (its namespace is the stream's, e.g. `jabber:client`), so
-- `msg:get_child("body")` finds the body, and `msg:get_child("body", "jabber:client")` finds
-- only a body that spells `xmlns` out.
-- @module xmppsm.stanza
local core = require "xmppsm.core"

local type, error, setmetatable, tostring, pairs, ipairs =
  type, error, setmetatable, tostring, pairs, ipairs
local rawget, rawset, rawlen, next = rawget, rawset, rawlen, next
local concat = table.concat
local serialize, materialize, lazy_child_text = core.serialize, core.materialize, core.lazy_child_text

local xmlns_stanzas = "urn:ietf:params:xml:ns:xmpp-stanzas"

local stanza = {}

--- Methods of every stanza (the metatable's `__index`).
local methods = {}
local stanza_mt = { __name = "xmppsm.stanza", __index = methods }
-- The metatable of message()'s compact messages (filled in below, see stanza.message).
-- `__xmppsm_body` tells the serializer (csrc/serialize.c) to write the element as it is.
local compact_message_mt = { __name = "xmppsm.stanza", __xmppsm_stanza_mt = stanza_mt, __xmppsm_body = true }
-- In C (csrc/stanza_kinds.c): every send() asks the first, every message() with a body calls
-- the second.
local is_stanza, compact_message = core.stanza_kinds(stanza_mt, compact_message_mt)

-- Builder positions: element -> stack of open descendants, innermost last. Weak keys so a
-- stanza that is dropped mid-build does not leak; an entry goes away when `up()` reaches the top.
local cursors = setmetatable({}, { __mode = "k" })
-- The last stack emptied by `up()`, reused by the next `tag()` at a top. A new stack for every
-- `tag()` at the top left garbage in between the elements being built; without it, serializing
-- stanzas that are no longer in the CPU caches is ~5% faster (bench "10000 x 1"), likely
-- because elements built in a row then lie closer together in memory.
local spare_cursor

-- Read-back stanzas (see stanza.read_back): their bytes, under a private key, until first use.
local RAW = {}
local read_back_mt = { __name = "xmppsm.stanza", __xmppsm_stanza_mt = stanza_mt }
local read_back -- (below) parses a read-back stanza's bytes into it

local function is_element(x)
  if type(x) ~= "table" then return false end
  if rawget(x, RAW) ~= nil then read_back(x) end
  return type(rawget(x, "name")) == "string"
end

local function new_element(name, attr, level)
  if type(name) ~= "string" then
    error("element name must be a string, got " .. type(name), level + 1)
  end
  if attr ~= nil and type(attr) ~= "table" then
    error("attributes must be a table, got " .. type(attr), level + 1)
  end
  return setmetatable({ name = name, attr = attr or {}, tags = {} }, stanza_mt)
end

-- The element's list of element children. Elements that follow docs/core.md have it; a bare
-- { name, attr, [i] } table given the metatable by hand gets it built on first use.
local function tags_of(el)
  local tags = rawget(el, "tags")
  if tags == nil then
    materialize(el) -- a lazy element from the parser gets its tags here
    tags = rawget(el, "tags")
    if tags ~= nil then return tags end
    tags = {}
    for i = 1, rawlen(el) do
      local c = el[i]
      if type(c) == "table" then tags[#tags + 1] = c end
    end
    el.tags = tags
  end
  return tags
end

local function current(self)
  local c = cursors[self]
  return c and c[#c] or self
end

-- Appends a child to el itself (not at the builder position). Adjacent text is merged so built
-- elements keep the parser's invariant "adjacent text is one string".
local function append(el, child, level)
  local n = rawlen(el)
  if type(child) == "string" then
    if child == "" then return end
    local last = el[n]
    if type(last) == "string" then
      el[n] = last .. child
    else
      el[n + 1] = child
    end
  elseif is_element(child) then
    local tags = tags_of(el)
    tags[#tags + 1] = child
    el[n + 1] = child
  else
    error("a child must be a string or an element table, got " .. type(child), level + 1)
  end
end

-- Namespace of child relative to parent: nil stands for "the parent's", see the module doc.
local function matches(parent, child, name, xmlns)
  if name ~= nil and child.name ~= name then return false end
  local pns = parent.attr.xmlns
  return (child.attr.xmlns or pns) == (xmlns or pns)
end

--- Creates an element.
-- @tparam string name the element name
-- @tparam[opt] table attr its attributes (used as is, not copied)
-- @return the new stanza
function stanza.stanza(name, attr)
  return new_element(name, attr, 2)
end

--- Whether `x` is a stanza: has `stanza.metatable`, or is a parser's lazy stanza or a compact
-- element of `message()` (both switch to `stanza.metatable` on first use).
-- Its real metatable counts: a `__metatable` field does not make a table a stanza.
-- @function is_stanza
-- @param x any value
-- @treturn boolean
stanza.is_stanza = is_stanza

--- The metatable of stanzas, for the parser's `stanza_mt` option.
stanza.metatable = stanza_mt

--- Adds a child element at the builder position and moves into it.
-- @tparam string name
-- @tparam[opt] table attr
-- @return self, for chaining
function methods:tag(name, attr)
  local child = new_element(name, attr, 2)
  append(current(self), child, 2)
  local c = cursors[self]
  if not c then
    c = spare_cursor or {}
    spare_cursor = nil
    cursors[self] = c
  end
  c[#c + 1] = child
  return self
end

--- Adds text at the builder position. `nil` and `""` add nothing.
-- @tparam string s
-- @return self
function methods:text(s)
  if s ~= nil then
    if type(s) ~= "string" then error("text must be a string, got " .. type(s), 2) end
    append(current(self), s, 2)
  end
  return self
end

--- Moves the builder position to the parent (no effect at the top).
-- @return self
function methods:up()
  local c = cursors[self]
  if c then
    c[#c] = nil
    if #c == 0 then
      cursors[self] = nil
      spare_cursor = c
    end
  end
  return self
end

--- Moves the builder position back to the top element.
-- @return self
function methods:reset()
  cursors[self] = nil
  return self
end

--- Whether the builder position is the top element.
-- @treturn boolean
function methods:at_top()
  return cursors[self] == nil
end

--- `self:tag(name, attr):text(text):up()`.
-- @tparam string name
-- @tparam string text
-- @tparam[opt] table attr
-- @return self
function methods:text_tag(name, text, attr)
  -- Built directly rather than through tag/text/up: the builder position is never touched.
  local child = new_element(name, attr, 2)
  if text ~= nil then
    if type(text) ~= "string" then error("text must be a string, got " .. type(text), 2) end
    if text ~= "" then child[1] = text end
  end
  append(current(self), child, 2)
  return self
end

--- `self:tag("query", { xmlns = xmlns })`.
-- @tparam string xmlns
-- @return self (positioned inside the query)
function methods:query(xmlns)
  return self:tag("query", { xmlns = xmlns })
end

--- `self:text_tag("body", text, attr)`.
-- @tparam string text
-- @tparam[opt] table attr
-- @return self
function methods:body(text, attr)
  return self:text_tag("body", text, attr)
end

--- Adds a child (element or string) at the builder position, without moving into it.
-- @param child an element table or a string
-- @return self
function methods:add_child(child)
  append(current(self), child, 2)
  return self
end

--- Adds a child (element or string) to this element itself, ignoring the builder position.
-- @param child an element table or a string
-- @return self
function methods:add_direct_child(child)
  append(self, child, 2)
  return self
end

--- The first child element with this name and namespace.
-- @tparam[opt] string name nil for any name
-- @tparam[opt] string xmlns nil for this element's own namespace (see the module doc)
-- @return the child, or nil
function methods:get_child(name, xmlns)
  local tags = rawget(self, "tags") or tags_of(self)
  -- matches(), inlined: this runs for every stanza a handler looks into.
  local pns = self.attr.xmlns
  local want = xmlns or pns
  for i = 1, #tags do
    local child = tags[i]
    if (name == nil or child.name == name) and (child.attr.xmlns or pns) == want then return child end
  end
  return nil
end

--- The text of an element: its text children joined, or nil if it has element children.
-- @treturn string|nil
function methods:get_text()
  local tags = rawget(self, "tags") or tags_of(self)
  if #tags > 0 then return nil end
  if rawlen(self) == 1 then
    local only = rawget(self, 1)
    if type(only) == "string" then return only end
  end
  return concat(self)
end

--- `get_child(name, xmlns)`'s text (see `get_text`), or nil if there is no such child.
-- @tparam[opt] string name
-- @tparam[opt] string xmlns
-- @treturn string|nil
function methods:get_child_text(name, xmlns)
  if rawget(self, "tags") == nil then
    -- A lazy stanza from the parser: read its recorded children, build none (a handler
    -- reading a message's body is the common case). Anything else takes the general path.
    local found, text = lazy_child_text(self, name, xmlns) -- with self.attr.xmlns, unbuilt
    if found ~= nil then return text end
  end
  local child = self:get_child(name, xmlns)
  if child then return child:get_text() end
  return nil
end

-- Looked up on a lazy element without materializing it (docs/core.md, "Lazy elements").
stanza_mt.__xmppsm_lazy_methods = { get_child_text = methods.get_child_text }

--- Iterates the child elements with this name and namespace (same matching as `get_child`).
-- @tparam[opt] string name
-- @tparam[opt] string xmlns
-- @return an iterator
function methods:childtags(name, xmlns)
  local tags, i = tags_of(self), 0
  return function()
    while true do
      i = i + 1
      local child = tags[i]
      if child == nil then return nil end
      if matches(self, child, name, xmlns) then return child end
    end
  end
end

--- Iterates all children, text strings and elements, in order.
-- @return an iterator
function methods:children()
  local i = 0
  return function()
    i = i + 1
    return self[i]
  end
end

--- Replaces each child element by `callback(child)`; a nil result removes the child.
-- Text children stay; text that becomes adjacent is merged.
-- @tparam function callback receives an element, returns an element or nil
-- @return self
function methods:maptags(callback)
  local n = rawlen(self)
  local out, tags, j = {}, {}, 0
  for i = 1, n do
    local c = self[i]
    if type(c) == "table" then
      c = callback(c)
      if c ~= nil and not is_element(c) then
        error("maptags: the callback must return an element table or nil, got " .. type(c), 2)
      end
      if c ~= nil then tags[#tags + 1] = c end
    end
    if c ~= nil then
      if type(c) == "string" and type(out[j]) == "string" then
        out[j] = out[j] .. c
      else
        j = j + 1
        out[j] = c
      end
    end
  end
  for i = 1, j do self[i] = out[i] end
  for i = j + 1, n do self[i] = nil end
  self.tags = tags
  return self
end

--- Reads an RFC 6120 stanza error (`<error>` in the stanza's namespace).
-- @return type (e.g. "cancel"), condition (e.g. "item-not-found"; "undefined-condition" when
-- missing), text (or nil), and the first application-specific child element (or nil); all nil
-- when there is no `<error>` child.
function methods:get_error()
  local err = self:get_child("error")
  if not err then return nil end
  local condition, text, extra
  for _, child in ipairs(tags_of(err)) do
    if (child.attr.xmlns or err.attr.xmlns) == xmlns_stanzas then
      if child.name == "text" then
        text = text or child:get_text()
      else
        condition = condition or child.name
      end
    else
      extra = extra or child
    end
  end
  return err.attr.type, condition or "undefined-condition", text, extra
end

--- Serializes to XML (`core.serialize`).
-- @tparam[opt="jabber:client"] string ns_in_scope the namespace around the element
-- @treturn string|nil the XML, or nil
-- @treturn string why not, when nil
function methods:serialize(ns_in_scope)
  return serialize(self, ns_in_scope)
end

--- The start tag alone (for logs), e.g. `<message to='a@b' type='chat'>`.
-- @treturn string|nil
-- @treturn string why not, when nil
function methods:top_tag()
  local s, err = serialize({ name = self.name, attr = self.attr })
  if not s then return nil, err end
  return s:sub(1, -3) .. ">"
end

--- `tostring(st)`: the XML. An element that cannot be serialized raises an error, since
-- `tostring` cannot return `nil, err`; use `st:serialize()` to get the error instead.
-- (core.tostring: serialize's error is raised as "cannot serialize stanza: <why>".)
stanza_mt.__tostring = core.tostring

local function clone(el, depth)
  if depth > 256 then error("clone: elements nested deeper than 256 (a cycle?)", depth + 2) end
  materialize(el) -- rawlen below must see a lazy element's children
  local attr = {}
  for k, v in pairs(el.attr or {}) do attr[k] = v end
  local tags = {}
  local new = { name = el.name, attr = attr, tags = tags }
  for i = 1, rawlen(el) do
    local c = el[i]
    if type(c) == "table" then
      c = clone(c, depth + 1)
      tags[#tags + 1] = c
    end
    new[i] = c
  end
  return setmetatable(new, stanza_mt)
end

--- A deep copy, with fresh `attr` and `tags` tables, at the top builder position.
-- @param el a stanza or element table
-- @return the copy (a stanza)
function stanza.clone(el)
  if not is_element(el) then error("clone: expected an element table, got " .. type(el), 2) end
  return clone(el, 1)
end

local STREAM_OPEN = "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"

--- Parses one serialized stanza (in the `jabber:client` namespace, as `tostring` gives it)
-- back into a stanza. Returns it, or `nil, err`.
-- @tparam string xml
-- One parser for every call, and one stream: the header is parsed once (creating a parser
-- costs ~10 us, and parsing the header and resetting cost more than a small stanza does). The
-- stream is reset only after a call that leaves anything but exactly one complete stanza.
local reparser
function stanza.parse(xml)
  if type(xml) ~= "string" then error("parse: expected a string, got " .. type(xml), 2) end
  if not reparser then
    reparser = core.parser{ stanza_mt = stanza_mt }
    reparser:set_raw(false)   -- only the element is returned
  end
  if reparser:state() ~= "open" then reparser:feed(STREAM_OPEN) end
  local events, n = reparser:feed(xml)
  local el, err = nil, "incomplete stanza"
  for i = 1, n do
    local kind = events[3 * i - 2]
    if kind == "stanza" then
      el, err = events[3 * i - 1], nil
      break
    end
    if kind == "error" then
      err = events[3 * i]
      break
    end
  end
  if n ~= 1 or not reparser:idle() then reparser:reset() end
  return el, err
end

-- Read-back stanzas: what outcome events and callbacks get for a sent stanza the program no
-- longer refers to. Most outcome handlers only count, so the bytes are parsed on first use
-- (of anything, `name` included), not before: until then the element is `{ [RAW] = bytes }`.
-- Parsed, it becomes the parser's lazy element itself (core.adopt), so reading one child then
-- builds nothing.
function read_back(el)
  local raw = rawget(el, RAW)
  if raw == nil then return end
  local parsed, err = stanza.parse(raw)
  if not parsed then error("xmppsm: cannot read back a sent stanza: " .. tostring(err), 3) end
  core.adopt(el, parsed)   -- the bytes go only once it succeeded
  rawset(el, RAW, nil)
end

function read_back_mt.__index(el, k)
  read_back(el)
  return el[k]
end
function read_back_mt.__newindex(el, k, v)
  read_back(el)
  el[k] = v
end
function read_back_mt.__len(el)
  read_back(el)
  return #el
end
function read_back_mt.__pairs(el)
  read_back(el)
  return pairs(el)
end
function read_back_mt.__tostring(el)
  return rawget(el, RAW)   -- until read back: then the element has another metatable
end
function read_back_mt.__xmppsm_materialize(el)
  read_back(el)
  materialize(el)
end

--- A stanza equal to `stanza.parse(raw)`, parsed on first use: for bytes this library
-- serialized (a queued stanza's), which parse back. `tostring` gives the bytes unparsed.
-- @tparam string raw a serialized stanza
function stanza.read_back(raw)
  return setmetatable({ [RAW] = raw }, read_back_mt)
end

-- `message(attr, body)` builds one table, a *compact* message: `{ name = "message", attr = attr,
-- __xmppsm_body = body }`. A message and its `<body>` built as two elements (with `tags` lists and
-- the body's `attr`) cost more to make, and to collect, than the rest of a send; most are never
-- read again. The first use of anything else (an absent key such as `tags`, `[1]` or a method
-- name, a new key, `#`, `pairs`, or `core.materialize`) turns it into the ordinary element the
-- generic builder makes, with `stanza.metatable`. Raw reads (`rawget`, `next`) see only what is
-- there, as with the parser's lazy elements (docs/core.md); the serializer writes the compact
-- form directly.
local BODY = "__xmppsm_body"

local function expand_message(el)
  local text = rawget(el, BODY)
  local body = setmetatable({ name = "body", attr = {}, tags = {} }, stanza_mt)
  if text ~= "" then body[1] = text end
  rawset(el, BODY, nil)
  rawset(el, 1, body)
  rawset(el, "tags", { body })
  if rawget(el, "attr") == nil then rawset(el, "attr", {}) end
  return setmetatable(el, stanza_mt)
end

compact_message_mt.__xmppsm_materialize = expand_message
compact_message_mt.__tostring = stanza_mt.__tostring
function compact_message_mt.__index(el, k) return expand_message(el)[k] end
function compact_message_mt.__newindex(el, k, v) expand_message(el)[k] = v end
function compact_message_mt.__len(el) return rawlen(expand_message(el)) end
function compact_message_mt.__pairs(el) return next, expand_message(el), nil end

--- A `<message>`, optionally with a `<body>`.
-- @tparam[opt] table attr
-- @tparam[opt] string body
-- @return the stanza, at the top builder position
function stanza.message(attr, body)
  if body == nil then return new_element("message", attr, 2) end
  -- Checks both (an error names the line that called message()), builds the compact message.
  return compact_message(attr, body)
end

--- A `<presence>`.
-- @tparam[opt] table attr
-- @return the stanza
function stanza.presence(attr)
  return new_element("presence", attr, 2)
end

local id_prefix, id_counter = nil, 0

--- A fresh stanza id, unique in this process and hard to guess across processes.
function stanza.new_id()
  if not id_prefix then
    id_prefix = core.base64_encode(core.random(9)):gsub("[+/]", { ["+"] = "-", ["/"] = "_" })
  end
  id_counter = id_counter + 1
  return id_prefix .. id_counter
end

--- An `<iq>`; `attr.type` is required (RFC 6120 §8.2.3) and `attr.id` is generated when absent.
-- @tparam table attr
-- @return the stanza
function stanza.iq(attr)
  if type(attr) ~= "table" then error("iq: attributes with a type are required", 2) end
  if attr.id == nil then attr.id = stanza.new_id() end
  if type(attr.id) ~= "string" then error("iq: the id attribute must be a string", 2) end
  if type(attr.type) ~= "string" then error("iq: a type attribute (a string) is required", 2) end
  return new_element("iq", attr, 2)
end

local function reply(orig, level)
  if not is_element(orig) then
    error("reply: expected a stanza, got " .. type(orig), level + 1)
  end
  local a = orig.attr
  local type_ = a.type
  if orig.name == "iq" then type_ = "result" end
  return new_element(orig.name, { to = a.from, from = a.to, id = a.id, type = type_, xmlns = a.xmlns },
    level + 1)
end

--- A reply: same name and id, `to` and `from` swapped, type `result` for an iq (the original
-- type otherwise). Namespace (`xmlns`) is kept; children are not copied.
-- @param orig the stanza replied to
-- @return the reply
function stanza.reply(orig)
  return reply(orig, 2)
end

local error_types = { auth = true, cancel = true, continue = true, modify = true, wait = true }
local error_conditions = {}
for c in ([[bad-request conflict feature-not-implemented forbidden gone internal-server-error
  item-not-found jid-malformed not-acceptable not-allowed not-authorized policy-violation
  recipient-unavailable redirect registration-required remote-server-not-found
  remote-server-timeout resource-constraint service-unavailable subscription-required
  undefined-condition unexpected-request]]):gmatch("%S+") do
  error_conditions[c] = true
end

--- An RFC 6120 stanza error reply (§8.3):
-- `<error type=...><condition xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/><text ...>`.
-- The result is positioned inside `<error>`, so an application-specific condition can follow
-- with `:tag(...)`; call `:reset()` before adding anything at the top.
-- @param orig the stanza replied to; must not itself be of type "error" (§8.3.1)
-- @tparam string type_ `auth`, `cancel`, `continue`, `modify` or `wait`
-- @tparam string condition a defined condition, e.g. `item-not-found`
-- @tparam[opt] string text a human-readable description
-- @return the error reply
function stanza.error_reply(orig, type_, condition, text)
  local r = reply(orig, 2)
  if orig.attr.type == "error" then
    error("error_reply: a stanza of type error must not be answered with an error", 2)
  end
  if not error_types[type_] then error("error_reply: unknown error type " .. tostring(type_), 2) end
  if not error_conditions[condition] then
    error("error_reply: unknown error condition " .. tostring(condition), 2)
  end
  if text ~= nil and type(text) ~= "string" then
    error("error_reply: text must be a string, got " .. type(text), 2)
  end
  r.attr.type = "error"
  r:tag("error", { type = type_ }):tag(condition, { xmlns = xmlns_stanzas }):up()
  if text then r:tag("text", { xmlns = xmlns_stanzas }):text(text):up() end
  return r
end

return stanza
