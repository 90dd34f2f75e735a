local xmppsm = require "xmppsm"

describe("client options", function()
  local base = { jid = "a@example.org", password = "x", sm = false }
  local function with(extra)
    local o = {}
    for k, v in pairs(base) do o[k] = v end
    for k, v in pairs(extra) do o[k] = v end
    return o
  end

  it("fill in documented defaults", function()
    local c = xmppsm.client(base)
    assert.equal("starttls", c.opts.tls)
    assert.equal(10, c.opts.connect_timeout)
    assert.equal(262144, c.opts.max_stanza_size)
    assert.is_true(c.opts.reconnect)
    assert.equal("disconnected", c:status())
  end)

  it("refuse an unknown option, a wrong type, a bad choice and a missing jid", function()
    assert.has_error(function() xmppsm.client(with({ hots = "x" })) end, "unknown option hots")
    assert.has_error(function() xmppsm.client(with({ port = "5222" })) end,
                     "option port must be a number, not a string")
    assert.has_error(function() xmppsm.client(with({ tls = "yes" })) end,
                     "option tls must be one of starttls, direct, none, not yes")
    assert.has_error(function() xmppsm.client({ password = "x" }) end, "option jid is required")
    assert.has_error(function() xmppsm.client(with({ jid = "example.org" })) end)
    assert.has_error(function() xmppsm.client(with({ sm = { ack_afterr = 3 } })) end,
                     "unknown sm option ack_afterr")
  end)

  it("take the resource from a full JID", function()
    local c = xmppsm.client(with({ jid = "a@example.org/laptop" }))
    assert.equal("laptop", c.opts.resource)
    assert.equal("a@example.org", c.bare_jid)
  end)
end)
