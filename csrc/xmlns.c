/* xmlns: namespace scopes for the parser (see xmlns.h).
 *
 * Why not expat's namespace mode: it hashes every prefixed attribute's expanded name (xml:lang
 * on each received message) and copies every name into its pools; here a stanza's names are
 * resolved by a short scan of the few declarations in scope, and written once, onto the tape.
 * The checks are the ones expat's namespace mode made (Namespaces in XML 1.0, sections 3-5). */
#include <stdlib.h>
#include <string.h>

#include "xmlns.h"
#include "xmppsm.h"

static int arena_add(ns_scope_t *s, const char *str, size_t n, size_t *at) {
    *at = s->len;
    if (n == 0) return 1;
    if (n > s->room - s->len) {
        size_t room = s->room ? s->room : 256;
        char *na;
        while (room - s->len < n) room *= 2;
        na = realloc(s->arena, room);
        if (na == NULL) return 0;
        s->arena = na;
        s->room = room;
    }
    memcpy(s->arena + s->len, str, n);
    s->len += n;
    return 1;
}

static int bind(ns_scope_t *s, const char *prefix, size_t prefixlen, const char *uri, size_t urilen, int depth) {
    ns_binding_t *b;
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 16;
        ns_binding_t *nb = realloc(s->bindings, cap * sizeof *nb);
        if (nb == NULL) return 0;
        s->bindings = nb;
        s->cap = cap;
    }
    b = &s->bindings[s->n];
    if (!arena_add(s, prefix, prefixlen, &b->prefix) || !arena_add(s, uri, urilen, &b->uri)) return 0;
    b->prefixlen = prefixlen;
    b->urilen = urilen;
    b->depth = depth;
    s->n++;
    if (prefixlen == 0) {
        b->outer_default = s->dflt;
        s->dflt = s->n;
    }
    return 1;
}

/* One declaration: `prefix` is NULL for the default namespace. */
static int declare(ns_scope_t *s, const char *prefix, size_t prefixlen, const char *uri, int depth) {
    size_t urilen = strlen(uri);
    int is_xml_uri = XMPPSM_IS_LITERAL(uri, urilen, XMPPSM_XML_NS);
    if (prefix != NULL && XMPPSM_IS_LITERAL(prefix, prefixlen, "xmlns")) return NS_RESERVED_PREFIX;
    if (prefix != NULL && XMPPSM_IS_LITERAL(prefix, prefixlen, "xml")) {
        if (!is_xml_uri) return NS_RESERVED_PREFIX;
    } else if (is_xml_uri) {
        return NS_RESERVED_URI;
    }
    if (XMPPSM_IS_LITERAL(uri, urilen, XMPPSM_XMLNS_NS)) return NS_RESERVED_URI;
    if (prefix != NULL && urilen == 0) return NS_UNDECLARE;
    if (!bind(s, prefix ? prefix : "", prefix ? prefixlen : 0, uri, urilen, depth)) return NS_NO_MEMORY;
    return NS_OK;
}

int ns_declare_one(ns_scope_t *s, const char *name, const char *uri, int depth) {
    const char *colon;
    size_t len;
    int rc = ns_scan_qname(name, &len, &colon);
    if (rc != NS_OK) return rc;
    return colon ? declare(s, colon + 1, len - (size_t)(colon + 1 - name), uri, depth)
                 : declare(s, NULL, 0, uri, depth);
}

const ns_binding_t *ns_lookup(const ns_scope_t *s, const char *prefix, size_t prefixlen) {
    size_t i = s->n;
    while (i-- > 0) {
        const ns_binding_t *b = &s->bindings[i];
        if (b->prefixlen == prefixlen && memcmp(s->arena + b->prefix, prefix, prefixlen) == 0) return b;
    }
    return NULL;
}

void ns_leave(ns_scope_t *s, int depth) {
    while (s->n > 0 && s->bindings[s->n - 1].depth >= depth) {
        const ns_binding_t *b = &s->bindings[--s->n];
        s->len = b->prefix; /* the arena is a stack in the bindings' order */
        if (b->prefixlen == 0) s->dflt = b->outer_default;
    }
}

void ns_clear(ns_scope_t *s) {
    s->n = s->len = s->dflt = 0;
}

void ns_free(ns_scope_t *s) {
    free(s->bindings);
    free(s->arena);
    s->bindings = NULL;
    s->arena = NULL;
    s->n = s->cap = s->len = s->room = s->dflt = 0;
}

const char *ns_problem(int code) {
    switch (code) {
    case NS_NO_MEMORY: return "out of memory";
    case NS_BAD_QNAME: return "a name that is not a qualified name";
    case NS_UNBOUND: return "an undeclared namespace prefix";
    case NS_RESERVED_PREFIX: return "a reserved prefix (xml, xmlns) declared";
    case NS_RESERVED_URI: return "a reserved namespace (XML's, xmlns') bound";
    case NS_UNDECLARE: return "a prefix undeclared (xmlns:p='')";
    /* Allowed by Namespaces in XML, but no XMPP element is one, and an element in the XML
     * namespace has no unprefixed form the serializer could write back. */
    case NS_XML_ELEMENT: return "an element in the XML namespace (refused: it cannot be written back)";
    default: return "no problem";
    }
}
