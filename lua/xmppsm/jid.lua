--- JIDs (RFC 7622): splitting, joining, a light normalization and comparison.
--
-- `split`, `bare` and `join` check the structure only: `node@domain/resource`, where the node is
-- whatever comes before the first `@` that precedes the first `/`, the resource whatever follows
-- that first `/`, no part empty when present, the domain required, each part at most 1023 bytes.
--
-- `prep` adds a light normalization instead of the full PRECIS profiles (no Unicode case
-- folding or width mapping): ASCII letters of the node and domain are lowercased, one trailing
-- dot of the domain is dropped (§3.2), and parts must be valid UTF-8 without control characters;
-- the node must not contain `" & ' / : < > @` or spaces (§3.3.1), and the domain must be a host
-- name (ASCII letters, digits, `-`, `_`, `.` between non-empty labels, or non-ASCII labels) or an
-- IP literal in brackets. The resource is kept as is (spaces allowed).
-- @module xmppsm.jid
local type, find, sub, gsub, lower = type, string.find, string.sub, string.gsub, string.lower
local utf8len = utf8.len

local jid = {}

local MAX_PART = 1023

--- Splits a JID into its parts.
-- @tparam string s
-- @treturn[1] string|nil node (nil when there is none)
-- @treturn[1] string domain
-- @treturn[1] string|nil resource (nil when there is none)
-- @return[2] nil, nil, nil when `s` is not a JID (the domain is always set for a JID)
function jid.split(s)
  if type(s) ~= "string" then return nil, nil, nil end
  local node, domain, resource
  local slash = find(s, "/", 1, true)
  local bare = s
  if slash then
    bare, resource = sub(s, 1, slash - 1), sub(s, slash + 1)
    if resource == "" or #resource > MAX_PART then return nil, nil, nil end
  end
  local at = find(bare, "@", 1, true)
  if at then
    node, domain = sub(bare, 1, at - 1), sub(bare, at + 1)
    if node == "" or #node > MAX_PART then return nil, nil, nil end
  else
    domain = bare
  end
  if domain == "" or #domain > MAX_PART or find(domain, "@", 1, true) then return nil, nil, nil end
  return node, domain, resource
end

--- Builds a JID from parts; nil if the parts would not split back to themselves.
-- @tparam[opt] string node
-- @tparam string domain
-- @tparam[opt] string resource
-- @treturn string|nil
function jid.join(node, domain, resource)
  if type(domain) ~= "string" then return nil end
  if node ~= nil and type(node) ~= "string" then return nil end
  if resource ~= nil and type(resource) ~= "string" then return nil end
  local s = domain
  if node then s = node .. "@" .. s end
  if resource then s = s .. "/" .. resource end
  local n, d, r = jid.split(s)
  if d ~= domain or n ~= node or r ~= resource then return nil end
  return s
end

--- The bare JID (`node@domain` or `domain`), or nil if `s` is not a JID.
-- @tparam string s
-- @treturn string|nil
function jid.bare(s)
  local node, domain = jid.split(s)
  if not domain then return nil end
  if node then return node .. "@" .. domain end
  return domain
end

local function ascii_lower(s)
  -- string.lower follows the C locale; only ASCII is meant here.
  return (gsub(s, "[A-Z]", lower))
end

local function check_text(part, what)
  if not utf8len(part) then return what .. " is not valid UTF-8" end
  if find(part, "[\0-\31\127]") then return what .. " contains a control character" end
  return nil
end

local function check_domain(d)
  local err = check_text(d, "domain")
  if err then return err end
  if sub(d, 1, 1) == "[" then
    if not find(d, "^%[[%x:%.]+%]$") then return "domain is not a valid IP literal" end
    return nil
  end
  -- ASCII outside host-name characters is refused; bytes >= 0x80 are IDN labels, kept as is.
  if find(d, "[\0-\44\47\58-\64\91-\94\96\123-\127]") then
    return "domain contains a character not allowed in a host name"
  end
  if find(d, "^%.") or find(d, "%.%.") or find(d, "%.$") then return "domain has an empty label" end
  return nil
end

--- Normalizes a JID lightly (see the module doc) and checks it.
-- @tparam string s
-- @treturn[1] string the normalized JID
-- @return[2] nil
-- @treturn[2] string why `s` is not acceptable
function jid.prep(s)
  if type(s) ~= "string" then return nil, "not a string" end
  local node, domain, resource = jid.split(s)
  if not domain then return nil, "not a JID (empty part, missing domain, or a part over 1023 bytes)" end
  if sub(domain, -1) == "." then
    domain = sub(domain, 1, -2)
    if domain == "" then return nil, "empty domain" end
  end
  domain = ascii_lower(domain)
  local err = check_domain(domain)
  if err then return nil, err end
  if node then
    node = ascii_lower(node)
    err = check_text(node, "node")
    if err then return nil, err end
    if find(node, "[ \"&'/:<>@]") then return nil, "node contains a character RFC 7622 forbids" end
  end
  if resource then
    err = check_text(resource, "resource")
    if err then return nil, err end
  end
  local out = domain
  if node then out = node .. "@" .. out end
  if resource then out = out .. "/" .. resource end
  return out
end

--- Whether two JIDs are the same after `prep`; false if either is not a valid JID.
-- @tparam string a
-- @tparam string b
-- @treturn boolean
function jid.compare(a, b)
  local pa = jid.prep(a)
  return pa ~= nil and pa == jid.prep(b)
end

return jid
