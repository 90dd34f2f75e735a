--- SCRAM client (RFC 5802, RFC 7677, with tls-exporter channel binding from RFC 9266).
--
-- Pure message logic: it builds the client's SASL messages and checks the server's, and never
-- touches the network. The caller base64-wraps the messages into `<auth/>` / `<response/>` and
-- unwraps `<challenge/>` / `<success/>`.
--
--     local s = assert(scram.new{ mechanism = "SCRAM-SHA-256", username = "juliet",
--                                 password = "pencil" })
--     send_auth(s:initial())
--     local final, err = s:step(server_first)   -- nil, err: abort the exchange
--     send_response(final)
--     local ok, err = s:finish(server_final)    -- nil, err: do not trust the session
--
-- **Errors.** Programming mistakes (an unknown mechanism, a -PLUS mechanism without channel
-- binding data, a call out of order) raise. Credentials that cannot work and anything wrong in the
-- server's messages return `nil, err`, and the exchange is then over: later calls raise.
--
-- **Passwords and SASLprep.** Full SASLprep (RFC 4013: NFKC normalization, mapping tables) is not
-- implemented. The username and password are used as the UTF-8 bytes given, which is exactly what
-- SASLprep yields for printable ASCII and for text already in NFKC without the characters it maps
-- away (non-ASCII spaces, soft hyphens, zero-width characters). RFC 5802 asks implementations
-- without SASLprep to refuse non-ASCII altogether; we accept it instead, because refusing would
-- lock out every user whose server accepted a non-ASCII password, while a password the server
-- normalizes differently fails exactly as a wrong password would, no worse. What SASLprep would
-- always refuse is refused here too, before anything is sent: invalid UTF-8, and control
-- characters (U+0000..U+001F, U+007F..U+009F). Give a non-ASCII password in NFKC form.
--
-- **Iteration counts** are capped at 10,000,000 (the cap of `core.pbkdf2`), so a hostile server
-- cannot make the client compute for hours; typical servers use 4096 to a few hundred thousand.
--
-- **Caching.** After `step`, `s:salted()` returns the salted password with the salt and iteration
-- count it belongs to. Passing that table back as `salted` to a later `new` skips PBKDF2 when the
-- server sends the same salt and count, and lets a client keep that table instead of the password
-- (it is as secret as the password for this server: it lets anyone log in).
-- @module xmppsm.scram
local core = require "xmppsm.core"

local base64_encode, base64_decode = core.base64_encode, core.base64_decode
local hmac, hash, xor, equal, pbkdf2 = core.hmac, core.hash, core.xor, core.equal, core.pbkdf2
local error, type, tonumber, setmetatable = error, type, tonumber, setmetatable
local utf8_len = utf8.len

local scram = {}

--- The most PBKDF2 rounds a server may ask for (the cap of `core.pbkdf2`).
scram.MAX_ITERATIONS = 10000000

-- Only tls-exporter: tls-unique is undefined under TLS 1.3 (RFC 9266), and LuaSec gives the
-- exporter through `conn:exportkeyingmaterial("EXPORTER-Channel-Binding", 32, "")`.
local CB_TYPES = { ["tls-exporter"] = true }

local MECHANISMS = {
  ["SCRAM-SHA-1"] = { alg = "sha1", plus = false },
  ["SCRAM-SHA-1-PLUS"] = { alg = "sha1", plus = true },
  ["SCRAM-SHA-256"] = { alg = "sha256", plus = false },
  ["SCRAM-SHA-256-PLUS"] = { alg = "sha256", plus = true },
  ["SCRAM-SHA-512"] = { alg = "sha512", plus = false },
  ["SCRAM-SHA-512-PLUS"] = { alg = "sha512", plus = true },
}

--- The mechanism names this module implements, strongest first: a client picks the first that
-- the server also offers (and a -PLUS one only when it has channel binding data).
scram.mechanisms = {
  "SCRAM-SHA-512-PLUS", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS",
  "SCRAM-SHA-512", "SCRAM-SHA-256", "SCRAM-SHA-1",
}

-- Client nonce bytes: 18 random bytes give 24 base64 characters, and base64 never has a ','.
local NONCE_BYTES = 18

local methods = {}
local mt = { __index = methods, __name = "xmppsm.scram" }

-- nil, or why `s` cannot be a SCRAM username or password (see the module comment).
local function text_problem(s, what)
  if not utf8_len(s) then
    return what .. " is not valid UTF-8"
  end
  if s:find("[\0-\31\127]") or s:find("\194[\128-\159]") then
    return what .. " contains a control character"
  end
  return nil
end

-- A nonce is printable ASCII other than ',' (RFC 5802 §7, "printable").
local function valid_nonce(s)
  return #s > 0 and not s:find("[^\33-\43\45-\126]")
end

-- RFC 5802 §5.1: ',' and '=' in a saslname are written =2C and =3D.
local function escape_username(u)
  return (u:gsub("=", "=3D"):gsub(",", "=2C"))
end

-- Splits a server message into its attributes, in order: { {"r", value}, ... }. Every attribute
-- is one letter, '=', and a non-empty value; '=' may occur in values (base64 padding).
local function parse_attributes(msg)
  if msg:find("%z") then
    return nil
  end
  local list = {}
  for field in (msg .. ","):gmatch("([^,]*),") do
    local k, v = field:match("^(%a)=(.+)$")
    if not k then
      return nil
    end
    list[#list + 1] = { k, v }
  end
  return list
end

--- Starts a SCRAM exchange.
-- @tparam table opts
--   `mechanism`: one of `scram.mechanisms`;
--   `username`: string (the JID's localpart; escaped here);
--   `password`: string; may be nil when `salted` is given;
--   `cb_type`: `"tls-exporter"` or nil: with a -PLUS mechanism it is required, and the exchange is
--   bound to the TLS session; with a plain mechanism it says the client supports channel binding
--   though the server offered no -PLUS mechanism (GS2 flag `y`, which lets a server that does
--   support it detect a downgrade);
--   `cb_data`: the channel binding bytes (required with -PLUS; RFC 9266: 32 bytes of keying
--   material exported with label "EXPORTER-Channel-Binding" and an empty context);
--   `salted`: a table from an earlier `s:salted()`, optional;
--   `nonce`: the client nonce, for tests only (default: 18 random bytes in base64).
-- @return the exchange object, or `nil, err` when the credentials cannot work or the random
--   generator fails
function scram.new(opts)
  if type(opts) ~= "table" then
    error("scram.new: options table expected", 2)
  end
  local mech = MECHANISMS[opts.mechanism]
  if not mech then
    error("scram.new: unsupported mechanism " .. tostring(opts.mechanism), 2)
  end
  local username, password, salted = opts.username, opts.password, opts.salted
  if type(username) ~= "string" then
    error("scram.new: username must be a string", 2)
  end
  if password ~= nil and type(password) ~= "string" then
    error("scram.new: password must be a string", 2)
  end
  if salted ~= nil and (type(salted) ~= "table" or type(salted.hash) ~= "string"
      or type(salted.salted_password) ~= "string"
      or type(salted.salt) ~= "string" or math.type(salted.iterations) ~= "integer") then
    error("scram.new: salted must be a table returned by salted()", 2)
  end
  if password == nil and salted == nil then
    error("scram.new: a password (or a salted table) is required", 2)
  end
  local cb_type, cb_data = opts.cb_type, opts.cb_data
  if cb_type ~= nil and not CB_TYPES[cb_type] then
    error("scram.new: unsupported channel binding type " .. tostring(cb_type), 2)
  end
  if cb_data ~= nil and (type(cb_data) ~= "string" or cb_type == nil) then
    error("scram.new: cb_data must be a string, given with cb_type", 2)
  end
  if mech.plus and (cb_type == nil or cb_data == nil or cb_data == "") then
    error("scram.new: " .. opts.mechanism .. " needs cb_type and cb_data", 2)
  end
  local nonce = opts.nonce
  if nonce ~= nil and (type(nonce) ~= "string" or not valid_nonce(nonce)) then
    error("scram.new: nonce must be printable ASCII without ','", 2)
  end

  if username == "" then
    return nil, "username is empty"
  end
  local problem = text_problem(username, "username")
    or (password and text_problem(password, "password"))
  if problem then
    return nil, problem
  end
  if not nonce then
    local bytes, err = core.random(NONCE_BYTES)
    if not bytes then
      return nil, err
    end
    nonce = base64_encode(bytes)
  end

  local gs2
  if mech.plus then
    gs2 = "p=" .. cb_type .. ",,"
  elseif cb_type then
    gs2 = "y,,"
  else
    gs2 = "n,,"
  end
  local self = {
    _alg = mech.alg,
    _password = password,
    _cached = salted,
    _gs2 = gs2,
    -- Only a -PLUS exchange puts the binding data into c=; with 'y' and 'n' it is the header alone.
    _cbind = mech.plus and gs2 .. cb_data or gs2,
    _nonce = nonce,
    _first_bare = "n=" .. escape_username(username) .. ",r=" .. nonce,
    _state = "new",
  }
  return setmetatable(self, mt)
end

local function check_state(self, want, name)
  if getmetatable(self) ~= mt then
    error("scram: " .. name .. " called on a " .. type(self), 3)
  end
  if self._state ~= want then
    error("scram: " .. name .. " called in state '" .. self._state .. "'", 3)
  end
end

local function fail(self, err)
  self._state = "failed"
  self._password = nil
  return nil, err
end

--- The client-first-message: the GS2 header, then `n=<username>,r=<client nonce>`.
-- Call once, first.
-- @treturn string
function methods:initial()
  check_state(self, "new", "initial")
  self._state = "first-sent"
  return self._gs2 .. self._first_bare
end

--- Reads the server-first-message and returns the client-final-message (with the proof).
-- Refused: a mandatory extension (`m=`), a nonce that does not extend ours with at least one
-- character, a salt that is empty or not strict base64, an iteration count that is not a
-- decimal integer in 1..`MAX_ITERATIONS`, anything malformed.
-- @tparam string server_first
-- @treturn string|nil the client-final-message, or nil
-- @treturn ?string why the server's message was refused
function methods:step(server_first)
  check_state(self, "first-sent", "step")
  if type(server_first) ~= "string" then
    error("scram: step expects a string", 2)
  end
  local attrs = parse_attributes(server_first)
  if not attrs then
    return fail(self, "malformed server-first-message")
  end
  local first = attrs[1][1]
  if first == "m" then
    return fail(self, "server requires an unsupported SCRAM extension (m=)")
  elseif first == "e" then
    return fail(self, "server error: " .. attrs[1][2])
  end
  if #attrs < 3 or first ~= "r" or attrs[2][1] ~= "s" or attrs[3][1] ~= "i" then
    return fail(self, "malformed server-first-message: expected r=, s=, i=")
  end
  -- Later attributes are optional extensions (RFC 5802 §5.1): ignored.
  local nonce, salt_b64, iter_s = attrs[1][2], attrs[2][2], attrs[3][2]

  local cnonce = self._nonce
  if not valid_nonce(nonce) then
    return fail(self, "server nonce has characters outside printable ASCII")
  end
  -- Our nonce proves the server's messages are fresh; the server's part (never empty) proves
  -- ours are to the server.
  if #nonce <= #cnonce or nonce:sub(1, #cnonce) ~= cnonce then
    return fail(self, "server nonce does not extend the client nonce")
  end
  local salt = base64_decode(salt_b64)
  if not salt then
    return fail(self, "salt is not valid base64")
  end
  if not iter_s:match("^[1-9]%d*$") then
    return fail(self, "iteration count is not a positive integer: " .. iter_s)
  end
  local iterations = #iter_s <= 9 and tonumber(iter_s)
  if not iterations or iterations > scram.MAX_ITERATIONS then
    return fail(self, "iteration count " .. iter_s .. " is above the limit "
      .. scram.MAX_ITERATIONS)
  end

  local alg = self._alg
  local salted_password
  local cached = self._cached
  if cached and cached.hash == alg and cached.salt == salt and cached.iterations == iterations then
    salted_password = cached.salted_password
  elseif self._password then
    salted_password = pbkdf2(alg, self._password, salt, iterations)
  else
    return fail(self, "the cached salted password is for another hash, salt or iteration count,"
      .. " and no password was given")
  end

  local without_proof = "c=" .. base64_encode(self._cbind) .. ",r=" .. nonce
  local auth_message = self._first_bare .. "," .. server_first .. "," .. without_proof
  local client_key = hmac(alg, salted_password, "Client Key")
  local client_signature = hmac(alg, hash(alg, client_key), auth_message)
  local proof = xor(client_key, client_signature)
  self._server_signature = hmac(alg, hmac(alg, salted_password, "Server Key"), auth_message)
  self._salted = { hash = alg, salted_password = salted_password, salt = salt,
    iterations = iterations }
  -- The salted password is all later steps (and a cache) need: drop the plain one.
  self._password = nil
  self._state = "final-sent"
  return without_proof .. ",p=" .. base64_encode(proof)
end

--- Checks the server-final-message: `true` only when the server proved it knows the password
-- (its signature is compared in constant time). An `e=` error from the server is reported.
-- @tparam string server_final
-- @treturn boolean|nil true, or nil
-- @treturn ?string why the server is not trusted
function methods:finish(server_final)
  check_state(self, "final-sent", "finish")
  if type(server_final) ~= "string" then
    error("scram: finish expects a string", 2)
  end
  local attrs = parse_attributes(server_final)
  if not attrs then
    return fail(self, "malformed server-final-message")
  end
  local k, v = attrs[1][1], attrs[1][2]
  if k == "e" then
    return fail(self, "server error: " .. v)
  elseif k ~= "v" then
    return fail(self, "malformed server-final-message: expected v= or e=")
  end
  local signature = base64_decode(v)
  if not signature or not equal(signature, self._server_signature) then
    return fail(self, "server signature does not match: the server does not know the password"
      .. " (or is not the server we talk to)")
  end
  self._state = "done"
  return true
end

--- The derived credentials, once `step` has succeeded: a table with `hash` (`"sha256"`...),
-- `salted_password`, `salt` (raw bytes) and `iterations`, to pass as `salted` to a later
-- `scram.new`. Nil before.
-- @treturn ?table
function methods:salted()
  local s = self._salted
  if not s then
    return nil
  end
  return { hash = s.hash, salted_password = s.salted_password, salt = s.salt,
    iterations = s.iterations }
end

--- The exchange's state: `"new"`, `"first-sent"`, `"final-sent"`, `"done"` or `"failed"`.
-- @treturn string
function methods:state()
  return self._state
end

return scram
