-- The <delay/> added to messages re-sent after a cut (lua/xmppsm/sm.lua, sm.with_delay).
local sm = require "xmppsm.sm"
local stanza = require "xmppsm.stanza"
local core = require "xmppsm.core"
local stanza_equal = require "helpers.stanza_equal"

local DELAY = "urn:xmpp:delay"
local STAMP = 1700000000.25   -- 2023-11-14T22:13:20.250Z

local function resent(st)
  local raw = assert(core.serialize(st))
  local out = sm.with_delay(raw, "alice@example.test", STAMP)
  return out, assert(stanza.parse(out))
end

describe("sm.with_delay", function()
  it("adds <delay from stamp/> to a message, keeping everything else", function()
    local st = stanza.message({ to = "bob@example.test", type = "chat", id = "m1" }, "a < b & 'c'")
    st:tag("thread"):text("t1"):up()
    local out, back = resent(st)
    local delay = back:get_child("delay", DELAY)
    assert.equal("alice@example.test", delay.attr.from)
    assert.equal("2023-11-14T22:13:20.250Z", delay.attr.stamp)
    -- the same stanza with the delay as its last child
    local expected = stanza.clone(st)
    expected:tag("delay", { xmlns = DELAY, from = "alice@example.test",
                            stamp = "2023-11-14T22:13:20.250Z" }):up()
    assert.is_nil(stanza_equal.diff(expected, back, "jabber:client", "jabber:client"))
    assert.matches("<delay [^>]*/></message>$", out)   -- the last child
  end)

  it("adds it to an empty message written as <message/>", function()
    local out, back = resent(stanza.message({ to = "bob@example.test" }))
    assert.matches("^<message [^>]*><delay [^>]*/></message>$", out)
    assert.is_table(back:get_child("delay", DELAY))
  end)

  it("leaves a message that already has a delay unchanged", function()
    local st = stanza.message({ to = "bob@example.test" }, "old")
    st:tag("delay", { xmlns = DELAY, from = "x@example.test", stamp = "2001-01-01T00:00:00Z" }):up()
    local raw = core.serialize(st)
    assert.equal(raw, sm.with_delay(raw, "alice@example.test", STAMP))
  end)

  it("adds one when the namespace appears only in the text", function()
    local out, back = resent(stanza.message({ to = "bob@example.test" }, "see urn:xmpp:delay"))
    assert.equal("see urn:xmpp:delay", back:get_child_text("body"))
    assert.is_table(back:get_child("delay", DELAY))
    assert.is_string(out)
  end)

  it("leaves presence and iq unchanged", function()
    for _, st in ipairs({ stanza.presence({ to = "bob@example.test" }),
                          stanza.iq({ type = "get", to = "example.test", id = "q1" })
                            :tag("ping", { xmlns = "urn:xmpp:ping" }):up(),
                          stanza.stanza("messages", { to = "x@y" }) }) do
      local raw = core.serialize(st)
      assert.equal(raw, sm.with_delay(raw, "alice@example.test", STAMP))
    end
  end)
end)
