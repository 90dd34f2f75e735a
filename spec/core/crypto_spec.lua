-- Specs for the crypto part of xmppsm.core (docs/core.md, "Crypto"). Known answers come from the
-- RFCs and FIPS documents named next to them.
local core = require "xmppsm.core"

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

describe("core.hash", function()
  -- FIPS 180-2 appendix examples ("abc", the 448-bit message) and the empty string.
  local msg448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
  local vectors = {
    { "sha1", "abc", "a9993e364706816aba3e25717850c26c9cd0d89d" },
    { "sha1", "", "da39a3ee5e6b4b0d3255bfef95601890afd80709" },
    { "sha1", msg448, "84983e441c3bd26ebaae4aa1f95129e5e54670f1" },
    { "sha256", "abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad" },
    { "sha256", "", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855" },
    { "sha256", msg448, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1" },
    { "sha512", "abc", "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
                    .. "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f" },
    { "sha512", "", "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
                 .. "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e" },
  }
  for _, v in ipairs(vectors) do
    it(string.format("%s(%q) matches FIPS 180", v[1], v[2]:sub(1, 8)), function()
      local d = core.hash(v[1], v[2])
      assert.equal(v[3], hex(d))
    end)
  end

  it("hashes bytes, NULs included", function()
    assert.not_equal(hex(core.hash("sha256", "a\0b")), hex(core.hash("sha256", "a\0c")))
    assert.equal(32, #core.hash("sha256", string.rep("\0", 1000)))
  end)

  it("raises on an unknown algorithm or a wrong argument", function()
    assert.has_error(function() core.hash("md5", "abc") end)
    assert.has_error(function() core.hash("SHA256", "abc") end)
    assert.has_error(function() core.hash(nil, "abc") end)
    assert.has_error(function() core.hash("sha256") end)
    assert.has_error(function() core.hash("sha256", {}) end)
  end)
end)

describe("core.hmac", function()
  local long_key_text = "Test Using Larger Than Block-Size Key - Hash Key First"
  local long_both_text = "This is a test using a larger than block-size key and a larger than "
    .. "block-size data. The key needs to be hashed before being used by the HMAC algorithm."
  -- RFC 2202 (HMAC-SHA-1) test cases 1, 2, 3, 6.
  local rfc2202 = {
    { string.rep("\11", 20), "Hi There", "b617318655057264e28bc0b6fb378c8ef146be00" },
    { "Jefe", "what do ya want for nothing?", "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79" },
    { string.rep("\170", 20), string.rep("\221", 50), "125d7342b9ac11cd91a39af48aa17b4f63f175d3" },
    { string.rep("\170", 80), long_key_text, "aa4ae5e15272d00e95705637ce8a3b55ed402112" },
  }
  for i, v in ipairs(rfc2202) do
    it("HMAC-SHA-1 matches RFC 2202 vector " .. i, function()
      assert.equal(v[3], hex(core.hmac("sha1", v[1], v[2])))
    end)
  end

  -- RFC 4231 test cases 1, 2, 3, 6, 7.
  local rfc4231 = {
    { string.rep("\11", 20), "Hi There",
      "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
      "87aa7cdea5ef619d4ff0b4241a1d6cb02379f4e2ce4ec2787ad0b30545e17cde"
      .. "daa833b7d6b8a702038b274eaea3f4e4be9d914eeb61f1702e696c203a126854" },
    { "Jefe", "what do ya want for nothing?",
      "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
      "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
      .. "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737" },
    { string.rep("\170", 20), string.rep("\221", 50),
      "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
      "fa73b0089d56a284efb0f0756c890be9b1b5dbdd8ee81a3655f83e33b2279d39"
      .. "bf3e848279a722c806b485a47e67c807b946a337bee8942674278859e13292fb" },
    { string.rep("\170", 131), long_key_text,
      "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
      "80b24263c7c1a3ebb71493c1dd7be8b49b46d1f41b4aeec1121b013783f8f352"
      .. "6b56d037e05f2598bd0fd2215d6a1e5295e64f73f63f0aec8b915a985d786598" },
    { string.rep("\170", 131), long_both_text,
      "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
      "e37b6a775dc87dbaa4dfa9f96e5e3ffddebd71f8867289865df5a32d20cdc944"
      .. "b6022cac3c4982b10d5eeb55c3e4de15134676fb6de0446065c97440fa8c6a58" },
  }
  for i, v in ipairs(rfc4231) do
    it("HMAC-SHA-256 and HMAC-SHA-512 match RFC 4231 vector " .. i, function()
      assert.equal(v[3], hex(core.hmac("sha256", v[1], v[2])))
      assert.equal(v[4], hex(core.hmac("sha512", v[1], v[2])))
    end)
  end

  it("accepts an empty key and empty data", function()
    -- HMAC-SHA-256("", ""), a widely published value.
    assert.equal("b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad",
      hex(core.hmac("sha256", "", "")))
  end)

  it("raises on an unknown algorithm or a missing argument", function()
    assert.has_error(function() core.hmac("md5", "k", "d") end)
    assert.has_error(function() core.hmac("sha1", "k") end)
  end)
end)

describe("core.pbkdf2", function()
  -- RFC 6070 (PBKDF2-HMAC-SHA-1); the 16777216-iteration case is over the cap, tested below.
  local rfc6070 = {
    { "password", "salt", 1, 20, "0c60c80f961f0e71f3a9b524af6012062fe037a6" },
    { "password", "salt", 2, 20, "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957" },
    { "password", "salt", 4096, 20, "4b007901b765489abead49d926f721d065a429c1" },
    { "passwordPASSWORDpassword", "saltSALTsaltSALTsaltSALTsaltSALTsalt", 4096, 25,
      "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038" },
    { "pass\0word", "sa\0lt", 4096, 16, "56fa6aa75548099dcc37d7f03425e0c3" },
  }
  for i, v in ipairs(rfc6070) do
    it("PBKDF2-HMAC-SHA-1 matches RFC 6070 vector " .. i, function()
      assert.equal(v[5], hex(core.pbkdf2("sha1", v[1], v[2], v[3], v[4])))
    end)
  end

  it("PBKDF2-HMAC-SHA-256 matches RFC 7914 §11", function()
    assert.equal("55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
      .. "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783",
      hex(core.pbkdf2("sha256", "passwd", "salt", 1, 64)))
    assert.equal("4ddcd8f60b98be21830cee5ef22701f9641a4418d04c0414aeff08876b34ab56"
      .. "a1d425a1225833549adb841b51c9b3176a272bdebba1d078478f62b397f33c8d",
      hex(core.pbkdf2("sha256", "Password", "NaCl", 80000, 64)))
  end)

  it("defaults the length to the digest size", function()
    assert.equal(20, #core.pbkdf2("sha1", "p", "s", 1))
    assert.equal(32, #core.pbkdf2("sha256", "p", "s", 1))
    assert.equal(64, #core.pbkdf2("sha512", "p", "s", 1))
    assert.equal("c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a",
      hex(core.pbkdf2("sha256", "password", "salt", 4096)))
  end)

  it("refuses iteration counts outside 1..10000000", function()
    assert.has_error(function() core.pbkdf2("sha1", "password", "salt", 0) end)
    assert.has_error(function() core.pbkdf2("sha1", "password", "salt", -1) end)
    assert.has_error(function() core.pbkdf2("sha1", "password", "salt", 1.5) end)
    assert.has_error(function() core.pbkdf2("sha1", "password", "salt", 10000001) end)
    -- RFC 6070's last vector would take 16777216 rounds: refused at once, not computed.
    assert.has_error(function() core.pbkdf2("sha1", "password", "salt", 16777216, 20) end)
    assert.has_error(function() core.pbkdf2("sha1", "password", "salt", math.maxinteger) end)
  end)

  it("refuses lengths outside 1..1024 and unknown algorithms", function()
    assert.has_error(function() core.pbkdf2("sha1", "p", "s", 1, 0) end)
    assert.has_error(function() core.pbkdf2("sha1", "p", "s", 1, 1025) end)
    assert.equal(1024, #core.pbkdf2("sha1", "p", "s", 1, 1024))
    assert.has_error(function() core.pbkdf2("md5", "p", "s", 1) end)
  end)
end)

describe("core.random", function()
  it("returns the requested number of bytes", function()
    assert.equal(0, #core.random(0))
    assert.equal(1, #core.random(1))
    assert.equal(32, #core.random(32))
    assert.equal(100000, #core.random(100000))
  end)

  it("does not repeat itself", function()
    local seen = {}
    for _ = 1, 200 do
      local r = core.random(16)
      assert.is_nil(seen[r])
      seen[r] = true
    end
    -- 4096 uniform bytes miss fewer than 56 of the 256 values with overwhelming probability.
    local values, n = {}, 0
    for c in core.random(4096):gmatch(".") do
      if not values[c] then values[c], n = true, n + 1 end
    end
    assert.is_true(n > 200, "only " .. n .. " distinct byte values")
  end)

  it("refuses negative, fractional and huge lengths", function()
    assert.has_error(function() core.random(-1) end)
    assert.has_error(function() core.random(1.5) end)
    assert.has_error(function() core.random(1048577) end)
    assert.has_error(function() core.random("x") end)
  end)
end)

describe("core.equal", function()
  it("compares contents and lengths", function()
    assert.is_true(core.equal("abc", "abc"))
    assert.is_true(core.equal("", ""))
    assert.is_false(core.equal("abc", "abd"))
    assert.is_false(core.equal("abc", "bbc"))
    assert.is_false(core.equal("abc", "abcd"))
    assert.is_false(core.equal("abcd", "abc"))
    assert.is_false(core.equal("", "a"))
  end)

  it("does not stop at a NUL byte", function()
    assert.is_false(core.equal("a\0b", "a\0c"))
    assert.is_true(core.equal("a\0b", "a\0b"))
  end)

  it("raises on non-strings", function()
    assert.has_error(function() core.equal("a", nil) end)
    assert.has_error(function() core.equal({}, "a") end)
  end)
end)

describe("core.xor", function()
  it("xors byte by byte", function()
    assert.equal("\240\15", core.xor("\15\240", "\255\255"))
    assert.equal("\0\0\0", core.xor("abc", "abc"))
    assert.equal("", core.xor("", ""))
    assert.equal("a\0b", core.xor("a\0b", "\0\0\0"))
    local a, b = core.random(64), core.random(64)
    assert.equal(a, core.xor(core.xor(a, b), b))
  end)

  it("raises on strings of different lengths", function()
    assert.has_error(function() core.xor("abc", "ab") end)
    assert.has_error(function() core.xor("", "a") end)
    assert.has_error(function() core.xor("a", nil) end)
  end)
end)

describe("core.base64", function()
  -- RFC 4648 §10.
  local rfc4648 = {
    { "", "" }, { "f", "Zg==" }, { "fo", "Zm8=" }, { "foo", "Zm9v" },
    { "foob", "Zm9vYg==" }, { "fooba", "Zm9vYmE=" }, { "foobar", "Zm9vYmFy" },
  }
  for _, v in ipairs(rfc4648) do
    it(string.format("encodes and decodes %q as RFC 4648 says", v[1]), function()
      assert.equal(v[2], core.base64_encode(v[1]))
      assert.equal(v[1], core.base64_decode(v[2]))
    end)
  end

  it("uses the standard alphabet, '+' and '/' included", function()
    assert.equal("+/+/", core.base64_encode("\251\255\191"))
    assert.equal("\251\255\191", core.base64_decode("+/+/"))
    assert.equal("AAEC", core.base64_encode("\0\1\2"))
  end)

  it("round-trips every byte value and every length up to 70", function()
    local all = {}
    for i = 0, 255 do all[#all + 1] = string.char(i) end
    all = table.concat(all)
    assert.equal(all, core.base64_decode(core.base64_encode(all)))
    for n = 0, 70 do
      local s = core.random(n)
      local e = core.base64_encode(s)
      assert.equal(math.ceil(n / 3) * 4, #e)
      assert.equal(s, core.base64_decode(e))
    end
  end)

  local bad = {
    { "Zg", "missing padding" },
    { "Zg=", "wrong length" },
    { "Zm9vY", "wrong length" },
    { "Zm9v\n", "trailing newline" },
    { "Zm9v\r\n", "trailing CRLF" },
    { " Zm9v", "leading space" },
    { "Zm9v YmFy", "inner space" },
    { "Zm9\tv", "tab" },
    { "Zm9-", "URL-safe alphabet '-'" },
    { "Zm9_", "URL-safe alphabet '_'" },
    { "Zm9v\0\0\0\0", "NUL bytes" },
    { "Zm9v\255AAA", "a non-ASCII byte" },
    { "====", "padding only" },
    { "Z===", "three padding characters" },
    { "=Zm8", "leading padding" },
    { "Zm=8", "padding inside a group" },
    { "Zg==Zg==", "padding before the end" },
    { "Zh==", "non-zero bits under '=='" },
    { "Zm9=", "non-zero bits under '='" },
  }
  for _, v in ipairs(bad) do
    it("refuses " .. v[2], function()
      local ok, err = core.base64_decode(v[1])
      assert.is_nil(ok)
      assert.is_string(err)
      assert.matches("invalid base64", err)
    end)
  end

  it("raises on non-strings", function()
    assert.has_error(function() core.base64_encode(nil) end)
    assert.has_error(function() core.base64_decode({}) end)
  end)
end)

describe("core.check_host", function()
  local dir, san_pem, cn_pem, key_pem

  local function sh(cmd)
    local log = dir .. "/log"
    -- Without LD_PRELOAD: under `make test`'s ASan run, the uninstrumented openssl command
    -- would otherwise carry the sanitizer runtime and abort on its own leaks at exit.
    local ok = os.execute("cd '" .. dir .. "' && env -u LD_PRELOAD " .. cmd .. " >'" .. log .. "' 2>&1")
    if not ok then
      local f = io.open(log)
      local out = f and f:read("a") or ""
      if f then f:close() end
      error("command failed: " .. cmd .. "\n" .. out)
    end
  end

  local function slurp(name)
    local f = assert(io.open(dir .. "/" .. name, "rb"))
    local s = f:read("a")
    f:close()
    return s
  end

  lazy_setup(function()
    local p = assert(io.popen("mktemp -d"))
    dir = p:read("l")
    p:close()
    assert(dir and dir:match("^/"), "mktemp -d failed")
    local newkey = "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    -- A throwaway CA, so the leaves look like real server certificates.
    sh(newkey .. " -x509 -days 2 -subj '/CN=xmppsm test CA' -keyout ca.key -out ca.pem")
    -- A leaf with SANs; its CN must be ignored, because it has DNS SANs (RFC 6125 §6.4.4).
    local f = assert(io.open(dir .. "/san.ext", "w"))
    f:write("subjectAltName = DNS:example.org, DNS:*.wild.example, DNS:f*.partial.example\n")
    f:close()
    sh(newkey .. " -subj '/CN=cn-ignored.example' -keyout san.key -out san.csr")
    sh("openssl x509 -req -in san.csr -CA ca.pem -CAkey ca.key -set_serial 2 -days 2"
      .. " -extfile san.ext -out san.pem")
    -- A leaf with a CN and no SAN at all.
    sh(newkey .. " -subj '/CN=cn-only.example' -keyout cn.key -out cn.csr")
    sh("openssl x509 -req -in cn.csr -CA ca.pem -CAkey ca.key -set_serial 3 -days 2 -out cn.pem")
    san_pem, cn_pem, key_pem = slurp("san.pem"), slurp("cn.pem"), slurp("san.key")
  end)

  lazy_teardown(function()
    if dir and dir:match("^/tmp/") then
      os.execute("rm -rf '" .. dir .. "'")
    end
  end)

  it("accepts an exact DNS name from the SAN", function()
    assert.is_true(core.check_host(san_pem, "example.org"))
  end)

  it("compares names case-insensitively", function()
    assert.is_true(core.check_host(san_pem, "EXAMPLE.org"))
    assert.is_true(core.check_host(san_pem, "Host.WILD.Example"))
  end)

  it("lets a wildcard cover exactly one label", function()
    assert.is_true(core.check_host(san_pem, "a.wild.example"))
    assert.is_true(core.check_host(san_pem, "xmpp.wild.example"))
    local ok, err = core.check_host(san_pem, "a.b.wild.example")
    assert.is_false(ok)
    assert.equal("certificate is not valid for a.b.wild.example", err)
    assert.is_false(core.check_host(san_pem, "wild.example"))
  end)

  it("refuses partial wildcards", function()
    assert.is_false(core.check_host(san_pem, "foo.partial.example"))
    assert.is_false(core.check_host(san_pem, "f.partial.example"))
  end)

  it("refuses other names, the ignored CN among them", function()
    local ok, err = core.check_host(san_pem, "example.com")
    assert.is_false(ok)
    assert.equal("certificate is not valid for example.com", err)
    assert.is_false(core.check_host(san_pem, "cn-ignored.example"))
    assert.is_false(core.check_host(san_pem, "www.example.org"))
    assert.is_false(core.check_host(san_pem, "example.org.evil"))
    assert.is_false(core.check_host(san_pem, "xample.org"))
  end)

  it("falls back to the CN of a certificate without DNS SANs", function()
    assert.is_true(core.check_host(cn_pem, "cn-only.example"))
    assert.is_true(core.check_host(cn_pem, "CN-ONLY.example"))
    local ok, err = core.check_host(cn_pem, "example.org")
    assert.is_false(ok)
    assert.equal("certificate is not valid for example.org", err)
  end)

  it("returns nil and an error for what is not a PEM certificate", function()
    for _, pem in ipairs({ "", "garbage", key_pem, san_pem:sub(1, #san_pem // 2),
                           "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n" }) do
      local ok, err = core.check_host(pem, "example.org")
      assert.is_nil(ok)
      assert.matches("^cannot parse certificate: ", err)
    end
  end)

  it("leaves OpenSSL's error queue empty after a failure", function()
    -- A stale error would make LuaSec's next SSL_get_error() report a TLS failure. A second
    -- failure must report its own cause, not the first one's.
    local _, err1 = core.check_host("garbage", "example.org")
    local _, err2 = core.check_host(san_pem:sub(1, 100), "example.org")
    assert.matches("no start line", err1)
    assert.is_true(core.check_host(san_pem, "example.org"))
    assert.not_equal(err1, err2)
  end)

  it("raises on an empty domain, a NUL byte or a non-string", function()
    assert.has_error(function() core.check_host(san_pem, "") end)
    assert.has_error(function() core.check_host(san_pem, "example.org\0.evil") end)
    assert.has_error(function() core.check_host(san_pem, nil) end)
    assert.has_error(function() core.check_host(nil, "example.org") end)
  end)
end)
