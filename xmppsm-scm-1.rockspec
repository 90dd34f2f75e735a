rockspec_format = "3.0"
package = "xmppsm"
version = "scm-1"
source = {
   url = "git+https://example.invalid/xmppsm.git",
}
description = {
   summary = "XMPP client library for Lua 5.4 that never silently loses a message",
   detailed = [[
xmppsm is an XMPP client library built around XEP-0198 Stream Management: every stanza sent
gets exactly one outcome (acknowledged or failed), sessions resume after the network drops and
after the process restarts. A C core (libexpat, OpenSSL) does the framing, serialization,
counters and crypto; LuaSocket and LuaSec do the network.
]],
   license = "MIT",
   labels = { "xmpp", "jabber", "stream-management" },
}
dependencies = {
   "lua >= 5.4",
   "luasocket",
   "luasec",
}
external_dependencies = {
   EXPAT = { header = "expat.h" },
   OPENSSL = { header = "openssl/evp.h" },
}
build = {
   type = "builtin",
   modules = {
      ["xmppsm.core"] = {
         sources = {
            "csrc/core.c", "csrc/parser.c", "csrc/serialize.c", "csrc/queue.c",
            "csrc/crypto.c", "csrc/clock.c", "csrc/file.c", "csrc/poll.c", "csrc/sockopt.c",
            "csrc/arity.c", "csrc/xmlns.c", "csrc/stanza_kinds.c",
         },
         libraries = { "expat", "crypto" },
         incdirs = { "csrc", "$(EXPAT_INCDIR)", "$(OPENSSL_INCDIR)" },
         libdirs = { "$(EXPAT_LIBDIR)", "$(OPENSSL_LIBDIR)" },
      },
      ["xmppsm"] = "lua/xmppsm/init.lua",
      ["xmppsm.client"] = "lua/xmppsm/client.lua",
      ["xmppsm.connection"] = "lua/xmppsm/connection.lua",
      ["xmppsm.error"] = "lua/xmppsm/error.lua",
      ["xmppsm.events"] = "lua/xmppsm/events.lua",
      ["xmppsm.iq"] = "lua/xmppsm/iq.lua",
      ["xmppsm.jid"] = "lua/xmppsm/jid.lua",
      ["xmppsm.loop"] = "lua/xmppsm/loop.lua",
      ["xmppsm.ns"] = "lua/xmppsm/ns.lua",
      ["xmppsm.options"] = "lua/xmppsm/options.lua",
      ["xmppsm.resolver"] = "lua/xmppsm/resolver.lua",
      ["xmppsm.sasl"] = "lua/xmppsm/sasl.lua",
      ["xmppsm.scram"] = "lua/xmppsm/scram.lua",
      ["xmppsm.session"] = "lua/xmppsm/session.lua",
      ["xmppsm.sm"] = "lua/xmppsm/sm.lua",
      ["xmppsm.stanza"] = "lua/xmppsm/stanza.lua",
      ["xmppsm.store"] = "lua/xmppsm/store.lua",
      ["xmppsm.transport"] = "lua/xmppsm/transport.lua",
   },
}
test = {
   type = "busted",
}
