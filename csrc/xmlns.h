/* xmlns: the namespace declarations in scope while the parser reads a stream (Namespaces in
 * XML 1.0). expat runs without namespace processing; the parser resolves names with this. */
#ifndef XMPPSM_XMLNS_H
#define XMPPSM_XMLNS_H

#include <stddef.h>

#include "xmppsm.h"

/* What can be wrong with a name or a declaration; NS_OK (0) when nothing is. */
enum {
    NS_OK,
    NS_NO_MEMORY,
    NS_BAD_QNAME,       /* ':' first or last, twice, or not followed by a name's first character */
    NS_UNBOUND,         /* a prefix nothing declared */
    NS_RESERVED_PREFIX, /* `xml` bound to another namespace, or `xmlns` declared */
    NS_RESERVED_URI,    /* the XML or xmlns namespace bound to another prefix, or as the default */
    NS_UNDECLARE,       /* xmlns:p='' (allowed in XML 1.1 only) */
    NS_XML_ELEMENT      /* an element named xml:something (see ns_problem) */
};

typedef struct {
    size_t prefix, prefixlen; /* offsets into the arena; prefixlen 0: the default namespace */
    size_t uri, urilen;       /* urilen 0: no namespace (xmlns='') */
    int depth;                /* of the element that declared it */
    size_t outer_default;     /* a default binding: the scope's `dflt` before it */
} ns_binding_t;

typedef struct {
    ns_binding_t *bindings; /* innermost last */
    size_t n, cap;
    size_t dflt; /* 1 + the index of the innermost default binding, 0 for none */
    char *arena; /* the bindings' prefixes and namespaces, in the bindings' order */
    size_t len, room;
} ns_scope_t;

/* A resolved name: `uri` is NULL for a name in no namespace. */
typedef struct {
    const char *uri, *local;
    size_t urilen, locallen;
} ns_name_t;

/* Whether attribute name `name` declares a namespace (`xmlns` or `xmlns:prefix`). */
static inline int ns_is_declaration(const char *name) {
    return name[0] == 'x' && name[1] == 'm' && name[2] == 'l' && name[3] == 'n' && name[4] == 's' &&
           (name[5] == '\0' || name[5] == ':');
}

/* Takes one declaration (attribute `name`, value `uri`) into scope for the element opened at
 * `depth` and everything inside it. Returns an NS_ code. */
int ns_declare_one(ns_scope_t *s, const char *name, const char *uri, int depth);

/* The innermost binding of a prefix, or NULL. */
const ns_binding_t *ns_lookup(const ns_scope_t *s, const char *prefix, size_t prefixlen);

/* Takes the declarations among an element's attributes (expat's name/value list) into scope and
 * counts the other attributes in *nattr. On error returns its NS_ code and in *bad the index in
 * atts of the name at fault. Inline, like ns_resolve: both run for every element received. */
static inline int ns_declare(ns_scope_t *s, const char **atts, int depth, int *nattr, int *bad) {
    int i, rc, n = 0;
    for (i = 0; atts[i] != NULL; i += 2) {
        if (!ns_is_declaration(atts[i])) {
            n++;
        } else if ((rc = ns_declare_one(s, atts[i], atts[i + 1], depth)) != NS_OK) {
            *bad = i;
            return rc;
        }
    }
    *nattr = n;
    return NS_OK;
}

/* A qualified name has at most one ':', neither first nor last, and a name's first character
 * after it (what expat's namespace-aware tokenizer required). One pass finds its length and its
 * colon (*colon NULL when it has none): names are short, a loop beats strlen plus memchr. */
static inline int ns_scan_qname(const char *qname, size_t *len, const char **colon) {
    const char *c = qname, *found = NULL;
    for (; *c != '\0'; c++) {
        if (*c == ':') {
            if (found != NULL) return NS_BAD_QNAME;
            found = c;
        }
    }
    *len = (size_t)(c - qname);
    *colon = found;
    if (found != NULL && (found == qname || !xmppsm_starts_name(found + 1, (size_t)(c - found - 1))))
        return NS_BAD_QNAME;
    return NS_OK;
}

/* The default namespace in scope ("" for none), its length in *len. */
static inline const char *ns_default(const ns_scope_t *s, size_t *len) {
    const ns_binding_t *b = s->dflt ? &s->bindings[s->dflt - 1] : NULL;
    *len = b ? b->urilen : 0;
    return *len ? s->arena + b->uri : ""; /* xmlns='' may have left the arena unallocated */
}

/* Resolves a qualified name (an element's, or an attribute's: those ignore the default
 * namespace). The results point into `qname` and the scope, valid until the scope changes. */
static inline int ns_resolve(const ns_scope_t *s, const char *qname, int is_attr, ns_name_t *out) {
    const char *colon;
    const ns_binding_t *b;
    size_t len, prefixlen;
    int rc = ns_scan_qname(qname, &len, &colon);
    if (rc != NS_OK) return rc;
    out->uri = NULL;
    out->urilen = 0;
    if (colon == NULL) {
        out->local = qname;
        out->locallen = len;
        if (!is_attr) out->uri = ns_default(s, &out->urilen);
        if (out->urilen == 0) out->uri = NULL; /* no default, or xmlns='' */
        return NS_OK;
    }
    prefixlen = (size_t)(colon - qname);
    out->local = colon + 1;
    out->locallen = len - prefixlen - 1;
    if (XMPPSM_IS_LITERAL(qname, prefixlen, "xml")) { /* bound by definition, to itself */
        if (!is_attr) return NS_XML_ELEMENT;
        out->uri = XMPPSM_XML_NS;
        out->urilen = sizeof XMPPSM_XML_NS - 1;
        return NS_OK;
    }
    if ((b = ns_lookup(s, qname, prefixlen)) == NULL) return NS_UNBOUND;
    out->uri = s->arena + b->uri;
    out->urilen = b->urilen;
    return NS_OK;
}

/* Ends the scope of the declarations made at `depth` and deeper. */
void ns_leave(ns_scope_t *s, int depth);

/* Forgets every declaration (a new stream); ns_free also returns the memory. */
void ns_clear(ns_scope_t *s);
void ns_free(ns_scope_t *s);

/* A readable text for an NS_ code. */
const char *ns_problem(int code);

#endif
