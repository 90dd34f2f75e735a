--- XML namespaces used across the library, in one place.
-- @module xmppsm.ns
return {
  client = "jabber:client",
  stream = "http://etherx.jabber.org/streams",
  streams = "urn:ietf:params:xml:ns:xmpp-streams",
  stanzas = "urn:ietf:params:xml:ns:xmpp-stanzas",
  tls = "urn:ietf:params:xml:ns:xmpp-tls",
  sasl = "urn:ietf:params:xml:ns:xmpp-sasl",
  bind = "urn:ietf:params:xml:ns:xmpp-bind",
  session = "urn:ietf:params:xml:ns:xmpp-session",
  sm = "urn:xmpp:sm:3",
  delay = "urn:xmpp:delay",
  ping = "urn:xmpp:ping",
  sid = "urn:xmpp:sid:0",
  channel_binding = "urn:xmpp:sasl-cb:0",
}
