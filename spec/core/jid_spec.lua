-- xmppsm.jid: RFC 7622 basics.
local jid = require "xmppsm.jid"

local function parts(s)
  return { jid.split(s) }
end

describe("xmppsm.jid", function()
  describe("split", function()
    it("splits the forms RFC 7622 shows", function()
      assert.same({ "juliet", "example.com", nil }, parts("juliet@example.com"))
      assert.same({ "juliet", "example.com", "foo" }, parts("juliet@example.com/foo"))
      assert.same({ nil, "example.com", nil }, parts("example.com"))
      assert.same({ nil, "example.com", "foo" }, parts("example.com/foo"))
      assert.same({ "juliet", "example.com", "foo bar" }, parts("juliet@example.com/foo bar"))
    end)

    it("takes the resource from the first slash, so it may hold @ and /", function()
      assert.same({ "juliet", "example.com", "foo@bar/baz" }, parts("juliet@example.com/foo@bar/baz"))
      assert.same({ nil, "example.com", "a@b" }, parts("example.com/a@b"))
    end)

    it("returns nil for empty parts, a missing domain or an @ in the domain", function()
      for _, s in ipairs({ "", "@example.com", "juliet@", "example.com/", "juliet@/r", "/r", "@", "a@b@c",
        "juliet@example.com/" }) do
        assert.same({}, parts(s), s)
      end
      assert.same({}, parts(nil))
      assert.same({}, parts(5))
    end)

    it("allows 1023 bytes per part and no more", function()
      local ok = ("x"):rep(1023)
      local long = ("x"):rep(1024)
      assert.same({ ok, ok, ok }, parts(ok .. "@" .. ok .. "/" .. ok))
      assert.same({}, parts(long .. "@d"))
      assert.same({}, parts(long))
      assert.same({}, parts("n@d/" .. long))
    end)
  end)

  describe("bare and join", function()
    it("bare drops the resource", function()
      assert.equal("juliet@example.com", jid.bare("juliet@example.com/balcony"))
      assert.equal("example.com", jid.bare("example.com/x"))
      assert.equal("juliet@example.com", jid.bare("juliet@example.com"))
      assert.is_nil(jid.bare("@x"))
    end)

    it("join builds what split takes apart", function()
      assert.equal("a@b/c", jid.join("a", "b", "c"))
      assert.equal("b", jid.join(nil, "b"))
      assert.equal("b/c/d", jid.join(nil, "b", "c/d"))
    end)

    it("join refuses parts that would not split back", function()
      assert.is_nil(jid.join("a@x", "b"))
      assert.is_nil(jid.join("a/x", "b"))
      assert.is_nil(jid.join(nil, "b/c"))
      assert.is_nil(jid.join("", "b"))
      assert.is_nil(jid.join("a", ""))
      assert.is_nil(jid.join("a", "b", ""))
      assert.is_nil(jid.join("a", nil))
      assert.is_nil(jid.join(1, "b"))
    end)
  end)

  describe("prep", function()
    it("lowercases ASCII in node and domain, keeps the resource", function()
      assert.equal("juliet@example.com/Balcony", jid.prep("Juliet@EXAMPLE.com/Balcony"))
    end)

    it("leaves non-ASCII letters alone (no full case folding)", function()
      assert.equal("Ж@example.com", jid.prep("Ж@Example.com"))
    end)

    it("drops one trailing dot of the domain", function()
      assert.equal("a@example.com", jid.prep("a@example.com."))
      assert.is_nil(jid.prep("a@example.com.."))
      assert.is_nil(jid.prep("."))
    end)

    it("refuses characters RFC 7622 forbids in the node", function()
      for _, c in ipairs({ '"', "&", "'", ":", "<", ">", " " }) do
        local s, err = jid.prep("a" .. c .. "b@example.com")
        assert.is_nil(s, c)
        assert.matches("node", err)
      end
    end)

    it("refuses control characters and invalid UTF-8 in every part", function()
      for _, s in ipairs({ "a\1@b", "a@b\1", "a@b/\1", "a@b/x\127", "a\xC0\x80@b", "a@b/\xED\xA0\x80",
        "a@b\xFF" }) do
        local r, err = jid.prep(s)
        assert.is_nil(r, s)
        assert.is_string(err)
      end
    end)

    it("checks the domain is a host name or an IP literal", function()
      assert.equal("example.com", jid.prep("example.com"))
      assert.equal("a@[::1]", jid.prep("a@[::1]"))
      assert.equal("a@192.0.2.1", jid.prep("a@192.0.2.1"))
      assert.equal("a@münchen.example", jid.prep("a@münchen.example"))
      assert.equal("a@my_host.example", jid.prep("a@my_host.example"))
      for _, s in ipairs({ "a@ex ample.com", "a@example.com:5222", "a@[::1", "a@[zz]", "a@.example",
        "a@ex..ample", "a@ex<ample" }) do
        local r, err = jid.prep(s)
        assert.is_nil(r, s)
        assert.matches("domain", err)
      end
    end)

    it("accepts spaces and symbols in the resource", function()
      assert.equal("a@b/my phone & <tablet>", jid.prep("a@b/my phone & <tablet>"))
    end)

    it("refuses what split refuses", function()
      local r, err = jid.prep("@b")
      assert.is_nil(r)
      assert.matches("not a JID", err)
      r, err = jid.prep(5)
      assert.is_nil(r)
      assert.equal("not a string", err)
    end)
  end)

  describe("compare", function()
    it("compares after prep", function()
      assert.is_true(jid.compare("Juliet@Example.com/r", "juliet@example.com./r"))
      assert.is_false(jid.compare("juliet@example.com/R", "juliet@example.com/r"))
      assert.is_false(jid.compare("juliet@example.com", "juliet@example.com/r"))
    end)

    it("is false when either side is invalid", function()
      assert.is_false(jid.compare("@x", "@x"))
      assert.is_false(jid.compare(nil, nil))
    end)
  end)
end)
