-- Specs for xmppsm.scram. The RFC 5802 and RFC 7677 exchanges are the published examples; the
-- SHA-512, -PLUS and 'y' exchanges were computed with an independent implementation (Python's
-- hashlib and hmac) from the same inputs.
local scram = require "xmppsm.scram"
local core = require "xmppsm.core"

local function unhex(h)
  return (h:gsub("..", function(x) return string.char(tonumber(x, 16)) end))
end

-- RFC 5802 §5.
local SHA1 = {
  mechanism = "SCRAM-SHA-1", nonce = "fyko+d2lbbFgONRv9qkxdawL",
  c1 = "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
  s1 = "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
  c2 = "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
  s2 = "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
}

-- RFC 7677 §3.
local SNONCE = "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
local SHA256 = {
  mechanism = "SCRAM-SHA-256", nonce = "rOprNGfwEbeRWgbNEkqO",
  c1 = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
  s1 = "r=" .. SNONCE .. ",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
  c2 = "c=biws,r=" .. SNONCE .. ",p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
  s2 = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
}

local SHA512 = {
  mechanism = "SCRAM-SHA-512", nonce = "rOprNGfwEbeRWgbNEkqO",
  c1 = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
  s1 = SHA256.s1,
  c2 = "c=biws,r=" .. SNONCE .. ",p=gMGXRcevScNtxZ6/8lQYpGtnsNAc3mGcmNomv+xnoOMw+3R2xNJdMNnzMlTN8P"
    .. "PC6wdp6dybEmDYXYTxwnYPJQ==",
  s2 = "v=ZQnYEgWQMFmmsM8aQMF0nDDCy/AgCzkwk8CmMZYcMg0vSVlKDanekLtifDSeVGT4+5ZxXnJq199RVG2rR7N7Zw==",
}

-- Channel binding data: the bytes 0..31 (the size of an RFC 9266 tls-exporter value).
local CB = {}
for i = 0, 31 do CB[#CB + 1] = string.char(i) end
CB = table.concat(CB)
-- base64("p=tls-exporter,," .. CB)
local CBIND_PLUS = "cD10bHMtZXhwb3J0ZXIsLAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f"

local SHA256_PLUS = {
  mechanism = "SCRAM-SHA-256-PLUS", nonce = "rOprNGfwEbeRWgbNEkqO",
  cb_type = "tls-exporter", cb_data = CB,
  c1 = "p=tls-exporter,,n=user,r=rOprNGfwEbeRWgbNEkqO",
  s1 = SHA256.s1,
  c2 = "c=" .. CBIND_PLUS .. ",r=" .. SNONCE .. ",p=QC6CS20quADQRb3mT99YUH+n3VJxUvzuK0K0E1Vrs2M=",
  s2 = "v=2GiAgapEppLVlUXbxUDksL3VgYHzuqiK5tR4mhJGgvs=",
}

local SHA1_PLUS = {
  mechanism = "SCRAM-SHA-1-PLUS", nonce = "fyko+d2lbbFgONRv9qkxdawL",
  cb_type = "tls-exporter", cb_data = CB,
  c1 = "p=tls-exporter,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
  s1 = SHA1.s1,
  c2 = "c=" .. CBIND_PLUS .. ",r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j"
    .. ",p=i0z2xFi+ITaJvbLXpcWyruGx26U=",
  s2 = "v=YgmPUhdXTCPY9I7+PKzEdnp1cdo=",
}

-- The client supports channel binding, the server offered no -PLUS mechanism.
local SHA256_Y = {
  mechanism = "SCRAM-SHA-256", nonce = "rOprNGfwEbeRWgbNEkqO", cb_type = "tls-exporter",
  c1 = "y,,n=user,r=rOprNGfwEbeRWgbNEkqO",
  s1 = SHA256.s1,
  c2 = "c=eSws,r=" .. SNONCE .. ",p=FoqiHTtQEDE8lz1CdaEe3tK4mS+iMDTl77SPyDS53DY=",
  s2 = "v=dI4KpiQJwBr1+V+K6U1dA6l6I4I9DUNXWND4pcpRU3U=",
}

local function start(v, extra)
  local opts = {
    mechanism = v.mechanism, username = "user", password = "pencil", nonce = v.nonce,
    cb_type = v.cb_type, cb_data = v.cb_data,
  }
  -- `password = false` in `extra` stands for "no password" (pairs cannot carry a nil).
  for k, x in pairs(extra or {}) do opts[k] = x or nil end
  local s = assert(scram.new(opts))
  assert.equal(v.c1, s:initial())
  return s
end

local function refused_first(server_first, pattern)
  local s = start(SHA256)
  local final, err = s:step(server_first)
  assert.is_nil(final)
  assert.is_string(err)
  assert.matches(pattern, err)
  assert.equal("failed", s:state())
  return s
end

describe("xmppsm.scram exchanges", function()
  for name, v in pairs({
    ["RFC 5802 SCRAM-SHA-1"] = SHA1, ["RFC 7677 SCRAM-SHA-256"] = SHA256,
    ["SCRAM-SHA-512"] = SHA512, ["SCRAM-SHA-256-PLUS"] = SHA256_PLUS,
    ["SCRAM-SHA-1-PLUS"] = SHA1_PLUS, ["SCRAM-SHA-256 with the 'y' flag"] = SHA256_Y,
  }) do
    it(name .. " gives the exact messages and accepts the server's signature", function()
      local s = start(v)
      assert.equal("first-sent", s:state())
      assert.equal(v.c2, s:step(v.s1))
      assert.equal("final-sent", s:state())
      assert.is_true(s:finish(v.s2))
      assert.equal("done", s:state())
    end)
  end

  it("-PLUS puts the GS2 header and the channel binding data into c=", function()
    local s = start(SHA256_PLUS)
    local final = s:step(SHA256_PLUS.s1)
    local c = final:match("^c=([^,]*),")
    assert.equal("p=tls-exporter,," .. CB, core.base64_decode(c))
  end)

  it("a plain mechanism sends only the GS2 header in c=, whatever cb_data says", function()
    local s = start(SHA256_Y, { cb_data = CB })
    assert.equal(SHA256_Y.c2, s:step(SHA256_Y.s1))
    s = start(SHA256)
    assert.equal("n,,", core.base64_decode(s:step(SHA256.s1):match("^c=([^,]*),")))
  end)

  it("binding data from another TLS session gives another proof", function()
    local other = CB:sub(1, 31) .. "\255"
    local s = start(SHA256_PLUS, { cb_data = other })
    assert.not_equal(SHA256_PLUS.c2, s:step(SHA256_PLUS.s1))
    assert.is_nil(s:finish(SHA256_PLUS.s2))
  end)

  it("ignores optional extensions after i=", function()
    local s = start(SHA256)
    local final = s:step(SHA256.s1 .. ",x=future")
    assert.matches("^c=biws,r=" .. SNONCE:gsub("%p", "%%%0") .. ",p=", final)
    -- The extension is part of AuthMessage, so the proof differs from the RFC's.
    assert.not_equal(SHA256.c2, final)
  end)

  it("makes a fresh random nonce of printable characters", function()
    local a = assert(scram.new{ mechanism = "SCRAM-SHA-256", username = "u", password = "p" })
    local b = assert(scram.new{ mechanism = "SCRAM-SHA-256", username = "u", password = "p" })
    local na = a:initial():match("^n,,n=u,r=([^,]+)$")
    local nb = b:initial():match("^n,,n=u,r=([^,]+)$")
    assert.equal(24, #na)
    assert.not_equal(na, nb)
    assert.is_nil(na:find("[^\33-\43\45-\126]"))
  end)

  it("escapes '=' and ',' in the username", function()
    local s = assert(scram.new{ mechanism = "SCRAM-SHA-1", username = "a=b,c=", password = "p",
                                nonce = "abc" })
    assert.equal("n,,n=a=3Db=2Cc=3D,r=abc", s:initial())
  end)
end)

describe("xmppsm.scram refuses a bad server-first-message", function()
  it("when the nonce does not extend ours", function()
    refused_first("r=XXXXNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
      "does not extend the client nonce")
    refused_first("r=rOprNGfwEbeRWgbNEkq,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
      "does not extend the client nonce")
  end)

  it("when the server added nothing to our nonce", function()
    refused_first("r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
      "does not extend the client nonce")
  end)

  it("when the nonce is not printable ASCII", function()
    refused_first("r=rOprNGfwEbeRWgbNEkqO\127x,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "printable")
    refused_first("r=rOprNGfwEbeRWgbNEkqO x,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "printable")
  end)

  it("when the salt is not strict base64, or empty", function()
    refused_first("r=" .. SNONCE .. ",s=W22ZaJ0SNY7soEsUEjb6gQ=,i=4096", "salt is not valid base64")
    refused_first("r=" .. SNONCE .. ",s=W22ZaJ0SNY7so EsUEjb6gQ==,i=4096", "salt is not valid base64")
    refused_first("r=" .. SNONCE .. ",s=W22ZaJ0SNY7soEsUEjb6g-==,i=4096", "salt is not valid base64")
    refused_first("r=" .. SNONCE .. ",s=,i=4096", "malformed")
  end)

  for _, i in ipairs({ "0", "-1", "01", "4096.0", " 4096", "4096 ", "0x10", "abc", "1e3" }) do
    it("when the iteration count is " .. string.format("%q", i), function()
      refused_first("r=" .. SNONCE .. ",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=" .. i,
        "iteration count is not a positive integer")
    end)
  end

  it("when the iteration count is above the cap", function()
    for _, i in ipairs({ "10000001", "16777216", "999999999", "99999999999999999999999" }) do
      local s = refused_first("r=" .. SNONCE .. ",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=" .. i,
        "above the limit 10000000")
      assert.is_nil(s:salted())
    end
  end)

  it("when the server requires an extension (m=)", function()
    refused_first("m=ext,r=" .. SNONCE .. ",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
      "unsupported SCRAM extension")
  end)

  it("when it is malformed", function()
    for _, msg in ipairs({
      "", "garbage", "r=" .. SNONCE, "r=" .. SNONCE .. ",s=W22ZaJ0SNY7soEsUEjb6gQ==",
      "s=W22ZaJ0SNY7soEsUEjb6gQ==,r=" .. SNONCE .. ",i=4096",
      "r=" .. SNONCE .. ",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,",
      "r=" .. SNONCE .. ",,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
      "r=" .. SNONCE .. ",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096\0",
      "rr=" .. SNONCE .. ",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
    }) do
      refused_first(msg, "malformed")
    end
  end)

  it("and reports a server error sent in its place", function()
    refused_first("e=other-error", "server error: other%-error")
  end)
end)

describe("xmppsm.scram refuses a bad server-final-message", function()
  local function final_refused(server_final, pattern)
    local s = start(SHA256)
    assert.equal(SHA256.c2, s:step(SHA256.s1))
    local ok, err = s:finish(server_final)
    assert.is_nil(ok)
    assert.matches(pattern, err)
    assert.equal("failed", s:state())
  end

  it("when the server signature is wrong", function()
    -- One flipped bit in the RFC's signature.
    final_refused("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G5=", "signature does not match")
    -- A valid signature for another exchange (RFC 5802's, of another length).
    final_refused(SHA1.s2, "signature does not match")
    final_refused(SHA256_PLUS.s2, "signature does not match")
    final_refused("v=not base64!", "signature does not match")
  end)

  it("when the server reports an error", function()
    final_refused("e=invalid-proof", "server error: invalid%-proof")
    final_refused("e=channel-bindings-dont-match,x=y", "server error: channel%-bindings%-dont%-match$")
  end)

  it("when it is malformed", function()
    final_refused("", "malformed")
    final_refused("x=abc", "malformed")
    final_refused(SHA256.s2 .. "\0", "malformed")
  end)

  it("accepts extensions after v=", function()
    local s = start(SHA256)
    s:step(SHA256.s1)
    assert.is_true(s:finish(SHA256.s2 .. ",x=future"))
  end)
end)

describe("xmppsm.scram credentials", function()
  local function new(username, password)
    return scram.new{ mechanism = "SCRAM-SHA-256", username = username, password = password,
                      nonce = "n" }
  end

  it("refuses control characters and invalid UTF-8", function()
    for _, bad in ipairs({ "a\nb", "a\0b", "tab\t", "del\127", "c1\194\133", "bad\255utf8",
                           "\237\160\128" --[[ a UTF-16 surrogate ]] }) do
      local s, err = new("user", bad)
      assert.is_nil(s)
      assert.matches("^password ", err)
      s, err = new(bad, "pencil")
      assert.is_nil(s)
      assert.matches("^username ", err)
    end
  end)

  it("refuses an empty username", function()
    local s, err = new("", "pencil")
    assert.is_nil(s)
    assert.equal("username is empty", err)
  end)

  it("uses a non-ASCII password as its UTF-8 bytes, unnormalized", function()
    -- Expected values from Python's hashlib.pbkdf2_hmac("sha256", pw.encode("utf-8"), salt, 1).
    local cases = {
      { "p\195\164ssw\195\182rd", "c318f1ea88b272d51cd22a4589348fe012365e97562ca27bbc42ae041f319013" },
      -- U+FB01 (the "fi" ligature) kept: NFKC would make it "fi" (9113f68a...)
      { "\239\172\129le p\195\164ss", "4c4c707047a167e61315bdd4aa1d3da94ecbac09e370d8189a9050d7f4becae1" },
    }
    for _, case in ipairs(cases) do
      local s = assert(new("user", case[1]))
      s:initial()
      assert.is_string(s:step("r=nX,s=QSXCR+Q6sek8bf92,i=1"))
      assert.equal(unhex(case[2]), s:salted().salted_password, case[2])
    end
  end)

  it("exposes the salted password, and a cached one replaces the password", function()
    local s = start(SHA256)
    assert.is_nil(s:salted())
    s:step(SHA256.s1)
    local salted = s:salted()
    assert.same({
      hash = "sha256", iterations = 4096, salt = core.base64_decode("W22ZaJ0SNY7soEsUEjb6gQ=="),
      salted_password = unhex("c4a49510323ab4f952cac1fa99441939e78ea74d6be81ddf7096e87513dc615d"),
    }, salted)

    local again = start(SHA256, { password = false, salted = salted })
    assert.equal(SHA256.c2, again:step(SHA256.s1))
    assert.is_true(again:finish(SHA256.s2))
  end)

  it("needs the password when the cache does not fit the server's parameters", function()
    local s = start(SHA256)
    s:step(SHA256.s1)
    local salted = s:salted()
    local other = start(SHA256, { password = false, salted = salted })
    local final, err = other:step("r=" .. SNONCE .. ",s=QSXCR+Q6sek8bf92,i=4096")
    assert.is_nil(final)
    assert.matches("no password", err)
    other = start(SHA256, { password = false, salted = salted })
    assert.is_nil(other:step("r=" .. SNONCE .. ",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4097"))
    -- The same salt and count for another hash is a miss too.
    other = start(SHA512, { password = false, salted = salted })
    assert.is_nil(other:step(SHA512.s1))
    -- With the password as well, a miss falls back to PBKDF2.
    other = start(SHA256, { salted = salted })
    assert.is_string(other:step("r=" .. SNONCE .. ",s=QSXCR+Q6sek8bf92,i=4096"))
  end)

  it("accepts the iteration cap itself (with a cached salted password, so nothing is computed)",
    function()
      local salted = { hash = "sha256", salt = "salt", iterations = 10000000,
                       salted_password = string.rep("k", 32) }
      local s = start(SHA256, { password = false, salted = salted })
      assert.is_string(s:step("r=" .. SNONCE .. ",s=c2FsdA==,i=10000000"))
    end)
end)

describe("xmppsm.scram misuse", function()
  local base = { mechanism = "SCRAM-SHA-256", username = "u", password = "p" }
  local function with(changes)
    local t = {}
    for k, v in pairs(base) do t[k] = v end
    for k, v in pairs(changes) do t[k] = v end
    return t
  end

  it("raises on bad options", function()
    assert.has_error(function() scram.new() end)
    assert.has_error(function() scram.new(with{ mechanism = "PLAIN" }) end)
    assert.has_error(function() scram.new(with{ mechanism = "scram-sha-256" }) end)
    assert.has_error(function() scram.new(with{ username = 42 }) end)
    assert.has_error(function() scram.new(with{ password = false }) end)
    assert.has_error(function() scram.new(with{ password = 42 }) end)
    assert.has_error(function() scram.new(with{ mechanism = "SCRAM-SHA-256-PLUS" }) end)
    assert.has_error(function()
      scram.new(with{ mechanism = "SCRAM-SHA-256-PLUS", cb_type = "tls-exporter" })
    end)
    assert.has_error(function()
      scram.new(with{ mechanism = "SCRAM-SHA-256-PLUS", cb_type = "tls-exporter", cb_data = "" })
    end)
    assert.has_error(function()
      scram.new(with{ mechanism = "SCRAM-SHA-256-PLUS", cb_type = "tls-unique", cb_data = CB })
    end)
    assert.has_error(function() scram.new(with{ cb_data = CB }) end)
    assert.has_error(function() scram.new(with{ nonce = "a,b" }) end)
    assert.has_error(function() scram.new(with{ nonce = "" }) end)
    assert.has_error(function() scram.new(with{ salted = { salt = "x" } }) end)
  end)

  it("raises on calls out of order", function()
    local s = assert(scram.new(base))
    assert.has_error(function() s:step(SHA256.s1) end)
    assert.has_error(function() s:finish(SHA256.s2) end)
    s:initial()
    assert.has_error(function() s:initial() end)
    assert.has_error(function() s:finish(SHA256.s2) end)
    assert.has_error(function() s:step(42) end)
    assert.is_nil(s:step("garbage"))
    assert.has_error(function() s:step(SHA256.s1) end)
    assert.has_error(function() s:finish(SHA256.s2) end)
    assert.has_error(function() scram.new(base).initial({}) end)
  end)

  it("raises on a second finish", function()
    local s = start(SHA256)
    s:step(SHA256.s1)
    assert.is_true(s:finish(SHA256.s2))
    assert.has_error(function() s:finish(SHA256.s2) end)
  end)
end)
