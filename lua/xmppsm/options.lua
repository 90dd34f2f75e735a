--- The client's options: names, types and defaults in one table, checked at construction.
-- @module xmppsm.options
local options = {}

--- Every option: `type` (a Lua type, or a list of allowed string values), `default`, and `doc`.
-- README's option table is this table.
options.spec = {
  jid = { type = "string", required = true, doc = "the account's JID (bare or full)" },
  password = { type = "string", required = true, doc = "the account's password" },
  host = { type = "string", doc = "server host to connect to (default: DNS SRV, then the JID's domain)" },
  port = { type = "number", doc = "server port (default: from SRV, else 5222, or 5223 for direct TLS)" },
  tls = { type = { "starttls", "direct", "none" }, default = "starttls",
          doc = "how to secure the stream; \"none\" only when asked for" },
  cafile = { type = "string", doc = "CA certificates file (default: the system store)" },
  capath = { type = "string", doc = "CA certificates directory (default: /etc/ssl/certs)" },
  resource = { type = "string", doc = "resource to bind (default: assigned by the server)" },
  presence = { type = "boolean", default = true, doc = "send initial presence when online" },
  priority = { type = "number", default = 0, doc = "priority of the initial presence" },
  allow_plain = { type = "boolean", default = false,
                  doc = "allow SASL PLAIN without TLS (PLAIN over TLS is always allowed)" },
  mechanisms = { type = "table", doc = "SASL mechanisms allowed, strongest first (default: all supported)" },
  connect_timeout = { type = "number", default = 10, doc = "seconds to connect, secure and log in" },
  request_timeout = { type = "number", default = 30, doc = "default seconds to wait for an IQ reply" },
  reconnect = { type = "boolean", default = true, doc = "reconnect after a lost connection" },
  reconnect_delay = { type = "number", default = 1, doc = "first reconnection delay, seconds" },
  reconnect_max_delay = { type = "number", default = 60, doc = "cap of the reconnection delay, seconds" },
  max_stanza_size = { type = "number", default = 262144, doc = "largest stanza accepted, bytes" },
  sm = { type = "table", allow_false = true,
         doc = "Stream Management options (see below), or false to turn it off" },
  logger = { type = "function", doc = "function(level, message); default: warnings and errors to stderr" },
  log_level = { type = { "debug", "info", "warn", "error" }, default = "warn",
                doc = "lowest level the default logger prints" },
}

local function check_type(name, spec, value)
  if type(spec.type) == "table" then
    for _, allowed in ipairs(spec.type) do
      if value == allowed then return end
    end
    error(string.format("option %s must be one of %s, not %s", name,
                        table.concat(spec.type, ", "), tostring(value)), 4)
  elseif value == false and spec.allow_false then
    return
  elseif type(value) ~= spec.type then
    error(string.format("option %s must be a %s, not a %s", name, spec.type, type(value)), 4)
  end
end

--- Checks `given` against `spec` (default `options.spec`) and returns a new table with every
-- default filled in. Unknown names, wrong types and missing required options raise.
function options.check(given, spec)
  spec = spec or options.spec
  if type(given) ~= "table" then error("options must be a table", 3) end
  for name in pairs(given) do
    if not spec[name] then error("unknown option " .. tostring(name), 3) end
  end
  local result = {}
  for name, s in pairs(spec) do
    local value = given[name]
    if value == nil then
      if s.required then error("option " .. name .. " is required", 3) end
      value = s.default
    else
      check_type(name, s, value)
    end
    result[name] = value
  end
  return result
end

return options
