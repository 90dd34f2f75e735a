--- SASL authentication (RFC 6120 §6): picks the strongest mechanism both sides support and
-- runs it. SCRAM (RFC 5802/7677) with the server's signature verified, -PLUS variants with
-- tls-exporter channel binding (RFC 9266) when TLS 1.3 makes it available, PLAIN only over TLS
-- unless `allow_plain` says otherwise. Payloads never reach logs or raw-traffic events.
-- @module xmppsm.sasl
local core = require "xmppsm.core"
local ns = require "xmppsm.ns"
local stanza = require "xmppsm.stanza"
local scram = require "xmppsm.scram"
local xmperror = require "xmppsm.error"

local sasl = {}

--- Mechanisms this library implements, strongest first.
sasl.supported = {
  "SCRAM-SHA-512-PLUS", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS",
  "SCRAM-SHA-512", "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN",
}

local function fail(condition, text)
  error(xmperror.new("auth", condition, text), 0)
end

--- Chooses a mechanism: the first of `wanted` (default `sasl.supported`) that the server offers
-- and that is allowed on this connection. Returns the name, or nil and why not.
function sasl.choose(offered, wanted, opts)
  local set = {}
  for _, m in ipairs(offered) do set[m] = true end
  for _, m in ipairs(wanted or sasl.supported) do
    if set[m] then
      if m:match("%-PLUS$") then
        if opts.channel_binding then return m end
      elseif m == "PLAIN" then
        if opts.secure or opts.allow_plain then return m end
      else
        return m
      end
    end
  end
  return nil, "no acceptable SASL mechanism offered (server offers: " .. table.concat(offered, ", ") .. ")"
end

local function b64(s)
  if s == "" then return "=" end
  return core.base64_encode(s)
end

local function unb64(text)
  if text == nil or text == "" or text == "=" then return "" end
  local decoded = core.base64_decode(text)
  if not decoded then fail("malformed-request", "the server sent invalid base64 in SASL") end
  return decoded
end

local REDACTED = "<!-- SASL payload hidden -->"

--- Runs SASL on negotiation `neg` (see xmppsm.session) given the stream `features`.
-- Returns when authenticated; raises an `xmppsm.error` of type "auth" otherwise.
function sasl.authenticate(neg, features)
  local client = neg.client
  local mechs_el = features:get_child("mechanisms", ns.sasl)
  if not mechs_el then fail("unsupported-feature", "the server offers no SASL authentication") end
  local offered = {}
  for m in mechs_el:childtags("mechanism") do offered[#offered + 1] = m:get_text() end

  local cb_data = neg.conn:channel_binding()
  local name, why = sasl.choose(offered, client.opts.mechanisms, {
    secure = neg.conn.secure, allow_plain = client.opts.allow_plain, channel_binding = cb_data ~= nil,
  })
  if not name then fail("invalid-mechanism", why) end
  client:_log("info", "authenticating with " .. name)

  local mech, initial
  if name == "PLAIN" then
    initial = "\0" .. client.node .. "\0" .. client.opts.password
  else
    local plus = name:match("%-PLUS$") ~= nil
    -- With cb_type but no -PLUS, the GS2 header says "y": we could bind, the server did not
    -- offer it; a server that did offer -PLUS (stripped by an attacker) then refuses us.
    mech = scram.new{
      mechanism = name, username = client.node, password = client.opts.password,
      cb_type = cb_data and "tls-exporter" or nil, cb_data = plus and cb_data or nil,
    }
    initial = mech:initial()
  end

  neg.client.redact_in = true
  neg:send(stanza.stanza("auth", { xmlns = ns.sasl, mechanism = name }):text(b64(initial)),
           "<auth xmlns='" .. ns.sasl .. "' mechanism='" .. name .. "'>" .. REDACTED .. "</auth>")
  while true do
    local el = neg:next("the SASL exchange")
    if el.attr.xmlns ~= ns.sasl then
      fail("malformed-request", "unexpected <" .. el.name .. "/> during SASL")
    end
    if el.name == "challenge" then
      if not mech then fail("malformed-request", "unexpected SASL challenge for " .. name) end
      local response, err = mech:step(unb64(el:get_text()))
      if not response then fail("not-authorized", err) end
      neg:send(stanza.stanza("response", { xmlns = ns.sasl }):text(b64(response)),
               "<response xmlns='" .. ns.sasl .. "'>" .. REDACTED .. "</response>")
    elseif el.name == "success" then
      if mech then
        local ok, err = mech:finish(unb64(el:get_text()))
        -- A server that cannot prove it knows the password is not the server: stop here.
        if not ok then fail("server-signature-invalid", err) end
      end
      neg.client.redact_in = false
      return name
    elseif el.name == "failure" then
      local condition, text = "not-authorized", nil
      for _, child in ipairs(el.tags) do
        if child.name == "text" then text = child:get_text() else condition = child.name end
      end
      fail(condition, text or ("authentication failed: " .. condition))
    else
      fail("malformed-request", "unexpected <" .. el.name .. "/> during SASL")
    end
  end
end

return sasl
