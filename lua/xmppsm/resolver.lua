--- Where to connect: explicit host and port, else DNS SRV records (RFC 6120 §3.2, XEP-0368),
-- else the domain itself. SRV needs lua-unbound; without it, or without answers, the domain is
-- used on the default port.
-- @module xmppsm.resolver
local resolver = {}

local SRV = 33

-- Reads a DNS name in wire format (labels, no compression in rdata per RFC 2782).
local function read_name(rdata, pos)
  local labels = {}
  while pos <= #rdata do
    local len = rdata:byte(pos)
    if len == 0 then break end
    labels[#labels + 1] = rdata:sub(pos + 1, pos + len)
    pos = pos + 1 + len
  end
  return table.concat(labels, ".")
end

--- Parses SRV rdata into `{priority, weight, port, target}`, or nil when malformed.
function resolver.parse_srv(rdata)
  if type(rdata) ~= "string" or #rdata < 7 then return nil end
  local priority, weight, port = string.unpack(">I2I2I2", rdata)
  return { priority = priority, weight = weight, port = port, target = read_name(rdata, 7) }
end

local function lookup_srv(name)
  local ok, unbound = pcall(require, "lunbound")
  if not ok then return {} end
  local ctx_ok, ctx = pcall(unbound.new)
  if not ctx_ok or not ctx then return {} end
  local res_ok, result = pcall(ctx.resolve, ctx, name, SRV, 1)
  if not res_ok or type(result) ~= "table" or not result.havedata then return {} end
  local records = {}
  for i = 1, result.n or #result do
    local rec = resolver.parse_srv(result[i])
    -- A lone "." target means the service is decidedly not available (RFC 2782).
    if rec and rec.target ~= "" then records[#records + 1] = rec end
  end
  table.sort(records, function(a, b)
    if a.priority ~= b.priority then return a.priority < b.priority end
    return a.weight > b.weight
  end)
  return records
end

--- Parses a stream management `location` ("host", "host:port" or "[ipv6]:port") into a target
-- like `fallback` (whose port and TLS mode are kept when the location names no port).
function resolver.parse_location(location, fallback)
  local host, port = location:match("^%[([^%]]+)%]:?(%d*)$")
  if not host then host, port = location:match("^([^:]+):?(%d*)$") end
  if not host then return nil end
  return { host = host, port = tonumber(port) or fallback.port, direct_tls = fallback.direct_tls }
end

--- The places to try, in order: a list of `{host, port, direct_tls}`.
-- @tparam string domain the JID's domain
-- @tparam table opts the client's options (`host`, `port`, `tls`)
function resolver.targets(domain, opts)
  local direct = opts.tls == "direct"
  if opts.host then
    return { { host = opts.host, port = opts.port or (direct and 5223 or 5222), direct_tls = direct } }
  end
  local targets = {}
  if opts.tls ~= "none" then
    for _, rec in ipairs(lookup_srv("_xmpps-client._tcp." .. domain)) do
      targets[#targets + 1] = { host = rec.target, port = opts.port or rec.port, direct_tls = true }
    end
  end
  if not direct then
    for _, rec in ipairs(lookup_srv("_xmpp-client._tcp." .. domain)) do
      targets[#targets + 1] = { host = rec.target, port = opts.port or rec.port, direct_tls = false }
    end
  end
  if #targets == 0 then
    targets[1] = { host = domain, port = opts.port or (direct and 5223 or 5222), direct_tls = direct }
  end
  return targets
end

return resolver
