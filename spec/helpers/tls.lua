--- Throwaway certificates for specs, made with the `openssl` command line tool.
--
-- One call makes, in a new temporary directory:
--
-- * `ca`: the test CA that clients are told to trust (`cafile`);
-- * `good`: a leaf for the test domain, signed by `ca`;
-- * `untrusted`: a leaf for the same names, signed by another CA nobody trusts;
-- * `wrongname`: a leaf signed by `ca`, valid, but for another name only.
--
-- Keys are EC P-256: generating them takes milliseconds, RSA keys take far longer.
-- @module helpers.tls

local lfs = require "lfs"
local process = require "helpers.process"

local tls = {}

--- The name the `wrongname` certificate is issued for.
tls.OTHER_NAME = "other.invalid"

-- Our own minimal OpenSSL configuration, so the extensions do not depend on the system's
-- openssl.cnf. Leaves carry their names in subjectAltName only (RFC 6125 clients ignore
-- the CN when SANs exist; the CN is there for humans reading logs).
local function openssl_config(good_sans, other_sans)
  return table.concat({
    "[req]",
    "distinguished_name = dn",
    "prompt = no",
    "[dn]",
    "CN = unused",
    "[v3_ca]",
    "basicConstraints = critical, CA:TRUE",
    "keyUsage = critical, keyCertSign, cRLSign",
    "subjectKeyIdentifier = hash",
    "[leaf_good]",
    "basicConstraints = critical, CA:FALSE",
    "keyUsage = critical, digitalSignature",
    "extendedKeyUsage = serverAuth, clientAuth",
    "subjectAltName = " .. good_sans,
    "[leaf_other]",
    "basicConstraints = critical, CA:FALSE",
    "keyUsage = critical, digitalSignature",
    "extendedKeyUsage = serverAuth, clientAuth",
    "subjectAltName = " .. other_sans,
    "",
  }, "\n")
end

local function openssl(args)
  local ok, out = process.run("openssl " .. args)
  if not ok then error("openssl " .. args .. " failed:\n" .. out, 2) end
end

local function q(s) return process.quote(s) end

local function make_ca(dir, name, cn)
  openssl(("req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3 "
    .. "-config %s -extensions v3_ca -subj %s -keyout %s -out %s"):format(
    q(dir .. "/openssl.cnf"), q("/CN=" .. cn), q(dir .. "/" .. name .. ".key"),
    q(dir .. "/" .. name .. ".pem")))
  return { cert = dir .. "/" .. name .. ".pem", key = dir .. "/" .. name .. ".key" }
end

local function make_leaf(dir, name, cn, ca, extensions)
  local key, csr, cert = dir .. "/" .. name .. ".key", dir .. "/" .. name .. ".csr",
    dir .. "/" .. name .. ".pem"
  openssl(("req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes "
    .. "-config %s -subj %s -keyout %s -out %s"):format(
    q(dir .. "/openssl.cnf"), q("/CN=" .. cn), q(key), q(csr)))
  openssl(("x509 -req -in %s -CA %s -CAkey %s -set_serial %d -days 3 -extfile %s "
    .. "-extensions %s -out %s"):format(
    q(csr), q(ca.cert), q(ca.key), math.random(1, 2^31), q(dir .. "/openssl.cnf"),
    extensions, q(cert)))
  return { cert = cert, key = key }
end

local cache = {}

--- Makes (once per domain and Lua state) the CA and the three leaf certificates.
-- @tparam[opt="xmppsm.test"] string domain the XMPP domain; the good leaf also names
--   `localhost` and IP 127.0.0.1
-- @treturn table `dir`, `domain`, `cafile` (the trusted CA), `ca`, `other_ca`, and
--   `good`, `untrusted`, `wrongname`, each `{ cert = path, key = path }`
function tls.generate(domain)
  domain = domain or "xmppsm.test"
  assert(domain:match("^[%w.-]+$"), "bad domain")
  -- a spec may have called process.cleanup(), which removes the directory
  if cache[domain] and lfs.attributes(cache[domain].good.key) then return cache[domain] end
  local dir = process.tmpdir("xmppsm-tls")
  process.write_file(dir .. "/openssl.cnf", openssl_config(
    "DNS:" .. domain .. ", DNS:localhost, IP:127.0.0.1", "DNS:" .. tls.OTHER_NAME))
  local ca = make_ca(dir, "ca", "xmppsm test CA")
  local other_ca = make_ca(dir, "other-ca", "xmppsm untrusted CA")
  local certs = {
    dir = dir,
    domain = domain,
    cafile = ca.cert,
    ca = ca,
    other_ca = other_ca,
    good = make_leaf(dir, "good", domain, ca, "leaf_good"),
    untrusted = make_leaf(dir, "untrusted", domain, other_ca, "leaf_good"),
    wrongname = make_leaf(dir, "wrongname", tls.OTHER_NAME, ca, "leaf_other"),
  }
  cache[domain] = certs
  return certs
end

return tls
