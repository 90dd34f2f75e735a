local resolver = require "xmppsm.resolver"

describe("resolver", function()
  it("uses host and port when given", function()
    assert.same({ { host = "h", port = 5222, direct_tls = false } },
                resolver.targets("example.org", { host = "h", tls = "starttls" }))
    assert.same({ { host = "h", port = 5223, direct_tls = true } },
                resolver.targets("example.org", { host = "h", tls = "direct" }))
    assert.same({ { host = "h", port = 7, direct_tls = false } },
                resolver.targets("example.org", { host = "h", port = 7, tls = "starttls" }))
  end)

  it("parses SRV rdata", function()
    local rdata = string.pack(">I2I2I2", 10, 5, 5222) .. "\4xmpp\7example\3org\0"
    assert.same({ priority = 10, weight = 5, port = 5222, target = "xmpp.example.org" },
                resolver.parse_srv(rdata))
    assert.is_nil(resolver.parse_srv("\0\1"))
  end)

  it("parses a stream management location", function()
    local fallback = { host = "x", port = 5222, direct_tls = false }
    assert.same({ host = "10.0.0.1", port = 9222, direct_tls = false },
                resolver.parse_location("10.0.0.1:9222", fallback))
    assert.same({ host = "2001:db8::1", port = 9222, direct_tls = false },
                resolver.parse_location("[2001:db8::1]:9222", fallback))
    assert.same({ host = "cm.example.org", port = 5222, direct_tls = false },
                resolver.parse_location("cm.example.org", fallback))
  end)
end)
