/* parser: XMPP stream framing on libexpat (contract: docs/core.md, "Parser").
 *
 * How the pieces fit:
 * - expat's callbacks never call Lua, so a Lua error can never unwind through expat's frames.
 *   They append records to a C "tape"; once XML_Parse has returned, the tape is walked and
 *   turned into element tables and events.
 * - Positions are stream byte offsets (0 = the first byte of the current stream). Every byte
 *   goes into `raw` before expat sees it; `raw` keeps what is still needed (the header or the
 *   stanza being received), so raw bytes are cut out exactly however the input was split.
 * - max_stanza_size is enforced before bytes reach expat: each chunk is fed in pieces no larger
 *   than what the current unit (header, stanza, whitespace between them) may still take.
 * - expat interns every distinct element and attribute name for the life of an XML_Parser, so a
 *   long stream of ever-new names would grow without bound. After 2 * max_stanza_size bytes the
 *   next stanza end "rebases": expat is reset and the stream header replayed into it.
 * - With `lazy`, a stanza with children is handed out as its table with its name only, plus a
 *   block: a copy of the tape records of its attributes and children, shared with the stanzas
 *   next to it that the same feed completed. These become tables on first use, from a
 *   metamethod (outside expat, like the walk), with the same code the eager walk uses.
 */
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <expat.h>

#include "xmlns.h"
#include "xmppsm.h"

/* Debian back-ported XML_SetReparseDeferralEnabled to 2.5.0 without changing the version
 * macros, so the only reliable test is whether the symbol exists at run time. */
XMLPARSEAPI(XML_Bool) XML_SetReparseDeferralEnabled(XML_Parser parser, XML_Bool enabled);
#pragma weak XML_SetReparseDeferralEnabled

#define PARSER_MT "xmppsm.parser"
#define UV_MT 1 /* user value: stanza_mt or nil */
#define UV_NS 2 /* user value: content_ns, keeps p->content_ns alive */
#define UV_LAZY 3 /* user value: the lazy metatable, or nil when the parser is eager */

#define STREAM_NS "http://etherx.jabber.org/streams"
#define XML_NS_SEP XMPPSM_XML_NS "\1"
#define TLS_PROCEED "urn:ietf:params:xml:ns:xmpp-tls\1proceed"
#define SASL_SUCCESS "urn:ietf:params:xml:ns:xmpp-sasl\1success"

#define MAX_STANZA_LIMIT (1 << 29) /* keeps every piece given to XML_Parse within an int */
#define MAX_DEPTH_LIMIT 10000
#define MAX_ATTRS_LIMIT 100000
#define NO_TEXT ((size_t)-1)

enum { ST_HEADER, ST_OPEN, ST_PAUSED, ST_CLOSED, ST_FAILED };
static const char *const state_names[] = {"header", "open", "paused", "closed", "failed"};

/* Why expat was stopped; callbacks that still fire after a stop are ignored. */
enum { STOP_NONE, STOP_ERROR, STOP_PAUSE, STOP_REBASE };

/* Tape records. Strings are u32 length, bytes, NUL. Positions are u64. */
enum {
    REC_HEADER = 1, /* nattr, attrs..., end */
    REC_BEGIN,      /* start: a stanza's first byte; u64 offset of its REC_END from this record;
                       u32 how deep its elements nest (1: no child elements); both set at its end */
    REC_OPEN,       /* children, element children (u32 each, filled in at its end), name, nattr, attrs */
    REC_TEXT,       /* text (grows while more text for the same element arrives) */
    REC_CLOSE,      /* end of the innermost open element */
    REC_END,        /* end: one past the stanza's last byte */
    REC_STREAM_END  /* start, end of the stream's end tag */
};

/* What the size limit applies to right now, for the error text. */
enum { UNIT_HEADER, UNIT_STANZA, UNIT_GAP };

static const char COND_OOM[] = "out of memory"; /* raised, never reported as an event */

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

/* Per-depth state while building one stanza's tables. */
typedef struct {
    const char *ns;
    size_t nslen;
    lua_Integer nchild, ntag;
} level_t;

/* Per-depth state of the elements expat has open: where their REC_OPEN is on the tape and how
 * many children they have so far, so the walk can create tables of the right size. */
typedef struct {
    size_t rec;
    uint32_t nchild, ntag;
} frame_t;

typedef struct {
    XML_Parser xp; /* NULL once closed */
    int state;
    int busy; /* still set when feed starts: a Lua error interrupted an earlier feed */

    size_t max_size;
    int max_depth, max_attrs;
    const char *content_ns;
    size_t content_ns_len;
    int has_mt;
    int lazy;         /* stanzas keep their children on a tape copy until first used */
    int no_raw;       /* set_raw(false): stanza events carry false instead of their bytes */
    uint32_t unit_depth; /* deepest element of the stanza being received (1 = the stanza) */

    uint64_t fed;        /* next stream byte to hand to expat */
    uint64_t consumed;   /* expat has reported everything before this byte */
    int64_t delta;       /* stream position = expat byte index + delta (changes on rebase) */
    uint64_t unit_start; /* first byte of the stanza being parsed */
    uint64_t gap_start;  /* one past the last complete unit */
    XML_Index rebase_at; /* expat byte index after which the next stanza end rebases */

    buf_t raw; /* stream bytes from raw_base; bytes past `fed` are not parsed yet */
    uint64_t raw_base;
    buf_t header; /* the header's raw bytes, replayed into expat on rebase */
    buf_t tape;
    size_t tape_done; /* tape bytes that form complete units */
    size_t units;     /* complete units on the tape */
    size_t open_text; /* offset of the text record that still grows, or NO_TEXT */
    buf_t rest;       /* bytes kept unparsed while paused or failed, returned by reset */

    int depth; /* elements open in expat, stream root included */
    ns_scope_t ns; /* the namespace declarations in scope (expat does not resolve names) */
    int stop;
    int replaying;
    int header_ns_ok; /* the header declared content_ns as its default namespace */
    uint64_t stop_pos;
    const char *err_cond;
    char err_text[200];

    level_t *levels; /* max_depth + 1 entries, by depth in the stanza from 0 */
    frame_t *frames; /* max_depth + 1 entries, by depth in the stanza from 1 */
} parser_t;

/* ---- byte buffers ---------------------------------------------------------------------- */

static int buf_reserve(buf_t *b, size_t extra) {
    size_t need = b->len + extra, cap;
    char *np;
    if (need <= b->cap) return 1;
    cap = b->cap ? b->cap : 256;
    while (cap < need) cap *= 2;
    np = realloc(b->p, cap);
    if (np == NULL) return 0;
    b->p = np;
    b->cap = cap;
    return 1;
}

static int buf_append(buf_t *b, const char *s, size_t n) {
    if (n == 0) return 1;
    if (!buf_reserve(b, n)) return 0;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 1;
}

static void buf_drop_front(buf_t *b, size_t n) {
    if (n == 0) return;
    memmove(b->p, b->p + n, b->len - n);
    b->len -= n;
}

static void buf_free(buf_t *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

static int is_ws(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

static uint64_t raw_end(const parser_t *p) {
    return p->raw_base + p->raw.len;
}

static const char *raw_at(const parser_t *p, uint64_t pos) {
    return p->raw.p + (pos - p->raw_base);
}

/* ---- errors ------------------------------------------------------------------------------ */

static void set_error(parser_t *p, const char *cond, uint64_t pos, const char *fmt, ...) {
    va_list ap;
    if (p->stop != STOP_NONE) return; /* the first reason to stop wins */
    p->stop = STOP_ERROR;
    p->stop_pos = pos;
    p->err_cond = cond;
    va_start(ap, fmt);
    vsnprintf(p->err_text, sizeof p->err_text, fmt, ap);
    va_end(ap);
}

/* From a callback: record the error and make expat return as soon as it can. */
#define FAIL(p, cond, ...)                                                                       \
    do {                                                                                         \
        set_error((p), (cond), here(p), __VA_ARGS__);                                            \
        XML_StopParser((p)->xp, XML_FALSE);                                                      \
    } while (0)

/* ---- tape -------------------------------------------------------------------------------- */

static uint64_t here(const parser_t *p) {
    return (uint64_t)(XML_GetCurrentByteIndex(p->xp) + p->delta);
}

static uint64_t here_end(const parser_t *p) {
    return here(p) + (uint64_t)XML_GetCurrentByteCount(p->xp);
}

static char *put_u32(char *w, uint32_t v) {
    memcpy(w, &v, sizeof v);
    return w + sizeof v;
}

static char *put_u64(char *w, uint64_t v) {
    memcpy(w, &v, sizeof v);
    return w + sizeof v;
}

static char *put_str(char *w, const char *s, size_t n) {
    w = put_u32(w, (uint32_t)n);
    memcpy(w, s, n);
    w[n] = '\0';
    return w + n + 1;
}

static const char *get_u32(const char *r, uint32_t *v) {
    memcpy(v, r, sizeof *v);
    return r + sizeof *v;
}

static const char *get_u64(const char *r, uint64_t *v) {
    memcpy(v, r, sizeof *v);
    return r + sizeof *v;
}

static const char *get_str(const char *r, const char **s, size_t *n) {
    uint32_t len;
    r = get_u32(r, &len);
    *s = r;
    *n = len;
    return r + len + 1;
}

/* tape_room when the tape must grow first. */
static int tape_grow(parser_t *p, size_t n) {
    if (buf_reserve(&p->tape, n)) return 1;
    FAIL(p, COND_OOM, "out of memory");
    return 0;
}

/* Room for `n` more tape bytes; on failure the parser is stopped with the OOM marker. Every
 * record is written through here, so the common case (the tape has room) is kept inline. */
static inline char *tape_room(parser_t *p, size_t n) {
    char *w;
    if (n > p->tape.cap - p->tape.len && !tape_grow(p, n)) return NULL;
    w = p->tape.p + p->tape.len;
    p->tape.len += n;
    p->open_text = NO_TEXT;
    return w;
}

static int rec_pos(parser_t *p, int kind, uint64_t pos) {
    char *w = tape_room(p, 1 + 8);
    if (w == NULL) return 0;
    *w++ = (char)kind;
    put_u64(w, pos);
    return 1;
}

/* Names on the tape are resolved: "uri\1local", or "local" in no namespace. */
static size_t name_size(const ns_name_t *nm) {
    return nm->uri ? nm->urilen + 1 + nm->locallen : nm->locallen;
}

static char *put_name(char *w, const ns_name_t *nm) {
    w = put_u32(w, (uint32_t)name_size(nm));
    if (nm->uri) {
        memcpy(w, nm->uri, nm->urilen);
        w += nm->urilen;
        *w++ = '\1';
    }
    memcpy(w, nm->local, nm->locallen);
    w[nm->locallen] = '\0';
    return w + nm->locallen + 1;
}

static void fail_name(parser_t *p, int code, const char *name) {
    if (code == NS_NO_MEMORY)
        FAIL(p, COND_OOM, "out of memory");
    else
        FAIL(p, "not-well-formed", "%s: '%.60s' at byte %llu", ns_problem(code), name,
             (unsigned long long)here(p));
}

static int attr_order(const void *a, const void *b) {
    const ns_name_t *x = a, *y = b;
    int c;
    if (x->urilen != y->urilen) return x->urilen < y->urilen ? -1 : 1;
    if (x->locallen != y->locallen) return x->locallen < y->locallen ? -1 : 1;
    if ((c = memcmp(x->uri, y->uri, x->urilen)) != 0) return c;
    return memcmp(x->local, y->local, x->locallen);
}

/* Two prefixed attributes may be the same name once expanded (p:a and q:a with p and q bound
 * to one namespace), which expat cannot see without its namespace mode: sorted, neighbours
 * compared. Only runs for elements with two prefixed attributes or more. */
static int distinct_attrs(parser_t *p, const XML_Char **atts, size_t prefixed) {
    ns_name_t *names = malloc(prefixed * sizeof *names);
    size_t i, k = 0;
    int ok = 1;
    if (names == NULL) {
        FAIL(p, COND_OOM, "out of memory");
        return 0;
    }
    for (i = 0; atts[i] != NULL; i += 2) {
        ns_name_t nm;
        if (ns_is_declaration(atts[i])) continue;
        ns_resolve(&p->ns, atts[i], 1, &nm); /* resolved once already */
        if (nm.uri) names[k++] = nm;
    }
    qsort(names, k, sizeof *names, attr_order);
    for (i = 1; i < k && ok; i++) {
        if (attr_order(&names[i - 1], &names[i]) == 0) {
            FAIL(p, "not-well-formed", "the attribute {%.*s}%.*s twice (once expanded) at byte %llu",
                 (int)(names[i].urilen > 60 ? 60 : names[i].urilen), names[i].uri,
                 (int)(names[i].locallen > 40 ? 40 : names[i].locallen), names[i].local,
                 (unsigned long long)here(p));
            ok = 0;
        }
    }
    free(names);
    return ok;
}

/* Appends an element's attributes to the tape: their count, then each name (resolved) and value;
 * namespace declarations are left out (they are not attributes). One pass over expat's list,
 * since this runs for every element received. Returns 0 after a FAIL. */
static int rec_attrs(parser_t *p, const XML_Char **atts, int nattr) {
    size_t i, prefixed = 0;
    char *w = tape_room(p, 4);
    if (w == NULL) return 0;
    put_u32(w, (uint32_t)nattr);
    for (i = 0; atts[i] != NULL; i += 2) {
        ns_name_t nm;
        size_t vlen;
        int rc;
        if (ns_is_declaration(atts[i])) continue;
        if ((rc = ns_resolve(&p->ns, atts[i], 1, &nm)) != NS_OK) {
            fail_name(p, rc, atts[i]);
            return 0;
        }
        if (nm.uri) prefixed++;
        vlen = strlen(atts[i + 1]);
        w = tape_room(p, 4 + name_size(&nm) + 1 + 4 + vlen + 1);
        if (w == NULL) return 0;
        w = put_name(w, &nm);
        put_str(w, atts[i + 1], vlen);
    }
    return prefixed < 2 || distinct_attrs(p, atts, prefixed);
}

/* An element at depth `d` in the stanza (1 for the stanza itself) opens. */
static int rec_open(parser_t *p, int d, const ns_name_t *name, const XML_Char **atts, int nattr) {
    size_t at = p->tape.len;
    char *w = tape_room(p, 1 + 8 + 4 + name_size(name) + 1);
    if (w == NULL) return 0;
    *w++ = REC_OPEN;
    w += 8; /* the child counts, written by rec_close */
    put_name(w, name);
    if (!rec_attrs(p, atts, nattr)) return 0;
    if (d > 1) {
        p->frames[d - 1].nchild++;
        p->frames[d - 1].ntag++;
    }
    p->frames[d].rec = at;
    p->frames[d].nchild = p->frames[d].ntag = 0;
    if ((uint32_t)d > p->unit_depth) p->unit_depth = (uint32_t)d;
    return 1;
}

/* The element at depth `d` in the stanza ends. */
static int rec_close(parser_t *p, int d) {
    char *w = tape_room(p, 1);
    if (w == NULL) return 0;
    *w = REC_CLOSE;
    w = p->tape.p + p->frames[d].rec + 1;
    w = put_u32(w, p->frames[d].nchild);
    put_u32(w, p->frames[d].ntag);
    return 1;
}

#define BEGIN_SIZE (1 + 8 + 8 + 4)

static int rec_begin(parser_t *p, uint64_t start) {
    char *w = tape_room(p, BEGIN_SIZE);
    if (w == NULL) return 0;
    *w++ = REC_BEGIN;
    w = put_u64(w, start);
    memset(w, 0, 8 + 4);
    p->unit_depth = 0;
    return 1;
}

/* The stanza is complete and its REC_END is next on the tape: fill in its REC_BEGIN. */
static void finish_begin(parser_t *p) {
    size_t begin = p->frames[1].rec - BEGIN_SIZE;
    char *w = p->tape.p + begin + 1 + 8;
    w = put_u64(w, (uint64_t)(p->tape.len - begin));
    put_u32(w, p->unit_depth);
}

static int rec_header(parser_t *p, const XML_Char **atts, int nattr, uint64_t end) {
    char *w = tape_room(p, 1);
    if (w == NULL) return 0;
    *w = REC_HEADER;
    if (!rec_attrs(p, atts, nattr) || (w = tape_room(p, 8)) == NULL) return 0;
    put_u64(w, end);
    return 1;
}

/* expat hands text over in pieces (and splits it at every newline); consecutive pieces for the
 * same element grow one record, so each element sees its adjacent text as one string. */
static void rec_text(parser_t *p, const XML_Char *s, int len) {
    size_t at = p->open_text;
    uint32_t total;
    char *w;
    if (at != NO_TEXT) {
        if (!buf_reserve(&p->tape, (size_t)len)) {
            FAIL(p, COND_OOM, "out of memory");
            return;
        }
        get_u32(p->tape.p + at + 1, &total);
        /* the record ends with a NUL: overwrite it and write a new one after the text */
        w = p->tape.p + p->tape.len - 1;
        memcpy(w, s, (size_t)len);
        w[len] = '\0';
        p->tape.len += (size_t)len;
        put_u32(p->tape.p + at + 1, total + (uint32_t)len);
        return;
    }
    at = p->tape.len;
    w = tape_room(p, 1 + 4 + (size_t)len + 1);
    if (w == NULL) return;
    *w++ = REC_TEXT;
    put_str(w, s, (size_t)len);
    p->open_text = at;
    p->frames[p->depth - 1].nchild++;
}

static void unit_done(parser_t *p) {
    p->tape_done = p->tape.len;
    p->units++;
}

/* ---- expat callbacks: C only, no Lua ------------------------------------------------------ */

static void start_header(parser_t *p, const ns_name_t *name, const XML_Char **atts, int nattr) {
    uint64_t end;
    const char *dflt;
    size_t dflt_len;
    int in_streams = name->uri && XMPPSM_IS_LITERAL(name->uri, name->urilen, STREAM_NS);
    if (!in_streams || !XMPPSM_IS_LITERAL(name->local, name->locallen, "stream")) {
        if (in_streams)
            FAIL(p, "bad-format", "the stream's root element is <%.*s>, not <stream>",
                 (int)(name->locallen > 60 ? 60 : name->locallen), name->local);
        else
            FAIL(p, "invalid-namespace", "the stream's root element is not <stream> in " STREAM_NS);
        return;
    }
    /* only the header's own declarations are in scope: is its default namespace content_ns? */
    dflt = ns_default(&p->ns, &dflt_len);
    p->header_ns_ok = dflt_len == p->content_ns_len && memcmp(dflt, p->content_ns, dflt_len) == 0;
    if (!p->header_ns_ok) {
        FAIL(p, "invalid-namespace", "the stream header does not declare xmlns='%.100s'", p->content_ns);
        return;
    }
    end = here_end(p);
    if (!rec_header(p, atts, nattr, end)) return;
    unit_done(p);
    p->depth = 1;
    p->state = ST_OPEN;
    p->gap_start = end;
}

static void on_start(void *ud, const XML_Char *qname, const XML_Char **atts) {
    parser_t *p = ud;
    int nattr, bad, rc;
    ns_name_t name;
    if (p->stop) return;
    if ((rc = ns_declare(&p->ns, atts, p->depth, &nattr, &bad)) != NS_OK) {
        fail_name(p, rc, atts[bad]);
        return;
    }
    if ((rc = ns_resolve(&p->ns, qname, 0, &name)) != NS_OK) {
        fail_name(p, rc, qname);
        return;
    }
    if (p->replaying) {
        p->depth++;
        return;
    }
    if (nattr > p->max_attrs) {
        FAIL(p, "policy-violation", "an element has %d attributes, more than max_attributes (%d)", nattr,
             p->max_attrs);
        return;
    }
    if (p->depth == 0) {
        start_header(p, &name, atts, nattr);
        return;
    }
    if (p->depth > p->max_depth) { /* the stanza is at depth 1, its children at 2, ... */
        FAIL(p, "policy-violation", "elements nested more than max_depth (%d) deep", p->max_depth);
        return;
    }
    if (p->depth == 1) {
        p->unit_start = here(p);
        if (!rec_begin(p, p->unit_start)) return;
    }
    if (!rec_open(p, p->depth, &name, atts, nattr)) return;
    p->depth++;
}

static void stream_end(parser_t *p) {
    uint64_t start = here(p), end = here_end(p);
    char *w = tape_room(p, 1 + 8 + 8);
    if (w == NULL) return;
    *w++ = REC_STREAM_END;
    w = put_u64(w, start);
    put_u64(w, end);
    unit_done(p);
    p->state = ST_CLOSED;
    p->gap_start = end;
}

/* The resolved name ("uri\1local") of the stanza just completed, from its REC_OPEN. */
static size_t stanza_name(const parser_t *p, const char **name) {
    size_t n;
    get_str(p->tape.p + p->frames[1].rec + 1 + 8, name, &n);
    return n;
}

static void on_end(void *ud, const XML_Char *name) {
    parser_t *p = ud;
    uint64_t end;
    const char *sname;
    size_t slen;
    (void)name;
    if (p->stop) return;
    p->depth--;
    ns_leave(&p->ns, p->depth);
    if (p->depth == 0) {
        stream_end(p);
        return;
    }
    if (!rec_close(p, p->depth) || p->depth > 1) return;
    /* a stanza is complete; for <a/> the count is 0 and the index already points past it */
    end = here_end(p);
    finish_begin(p);
    if (!rec_pos(p, REC_END, end)) return;
    unit_done(p);
    p->gap_start = end;
    slen = stanza_name(p, &sname);
    if (XMPPSM_IS_LITERAL(sname, slen, TLS_PROCEED) || XMPPSM_IS_LITERAL(sname, slen, SASL_SUCCESS)) {
        p->stop = STOP_PAUSE;
        p->stop_pos = end;
        XML_StopParser(p->xp, XML_FALSE);
    } else if (XML_GetCurrentByteIndex(p->xp) >= p->rebase_at) {
        p->stop = STOP_REBASE;
        p->stop_pos = end;
        XML_StopParser(p->xp, XML_FALSE);
    }
}

static void on_text(void *ud, const XML_Char *s, int len) {
    parser_t *p = ud;
    uint64_t pos, end;
    if (p->stop || p->replaying) return;
    if (p->depth >= 2) {
        rec_text(p, s, len);
        return;
    }
    /* Between stanzas only literal whitespace may appear (no references, no CDATA): check the
     * bytes as received, which are still in `raw` (it keeps everything expat has not reported). */
    pos = here(p);
    end = here_end(p);
    if (pos < p->raw_base || end > raw_end(p)) end = pos; /* cannot happen; never read outside */
    for (; pos < end; pos++) {
        if (!is_ws((unsigned char)*raw_at(p, pos))) {
            FAIL(p, "bad-format", "text between stanzas at byte %llu", (unsigned long long)pos);
            return;
        }
    }
}

static void on_cdata(void *ud) {
    parser_t *p = ud;
    if (p->stop || p->depth >= 2) return;
    FAIL(p, "bad-format", "CDATA section between stanzas");
}

static int same_ascii_nocase(const char *a, const char *b) {
    for (; *a && *b; a++, b++) {
        char x = *a >= 'A' && *a <= 'Z' ? (char)(*a + 32) : *a;
        char y = *b >= 'A' && *b <= 'Z' ? (char)(*b + 32) : *b;
        if (x != y) return 0;
    }
    return *a == *b;
}

static void on_xml_decl(void *ud, const XML_Char *version, const XML_Char *encoding, int standalone) {
    parser_t *p = ud;
    (void)version;
    (void)standalone;
    if (p->stop || p->replaying || encoding == NULL || same_ascii_nocase(encoding, "UTF-8")) return;
    FAIL(p, "unsupported-encoding", "the XML declaration says encoding='%.40s'; only UTF-8 is supported",
         encoding);
}

static void on_comment(void *ud, const XML_Char *data) {
    parser_t *p = ud;
    (void)data;
    if (p->stop) return;
    FAIL(p, "restricted-xml", "comment at byte %llu", (unsigned long long)here(p));
}

static void on_pi(void *ud, const XML_Char *target, const XML_Char *data) {
    parser_t *p = ud;
    (void)data;
    if (p->stop) return;
    FAIL(p, "restricted-xml", "processing instruction <?%.40s?> at byte %llu", target,
         (unsigned long long)here(p));
}

static void on_doctype(void *ud, const XML_Char *name, const XML_Char *sysid, const XML_Char *pubid,
                       int has_internal_subset) {
    parser_t *p = ud;
    (void)name;
    (void)sysid;
    (void)pubid;
    (void)has_internal_subset;
    if (p->stop) return;
    FAIL(p, "restricted-xml", "DOCTYPE declaration");
}

static void on_entity_decl(void *ud, const XML_Char *name, int is_pe, const XML_Char *value, int vlen,
                           const XML_Char *base, const XML_Char *sysid, const XML_Char *pubid,
                           const XML_Char *notation) {
    parser_t *p = ud;
    (void)name, (void)is_pe, (void)value, (void)vlen, (void)base, (void)sysid, (void)pubid,
        (void)notation;
    if (p->stop) return;
    FAIL(p, "restricted-xml", "entity declaration");
}

static void install_handlers(parser_t *p) {
    XML_Parser xp = p->xp;
    XML_SetUserData(xp, p);
    XML_SetElementHandler(xp, on_start, on_end);
    XML_SetCharacterDataHandler(xp, on_text);
    XML_SetStartCdataSectionHandler(xp, on_cdata);
    XML_SetXmlDeclHandler(xp, on_xml_decl);
    XML_SetCommentHandler(xp, on_comment);
    XML_SetProcessingInstructionHandler(xp, on_pi);
    XML_SetStartDoctypeDeclHandler(xp, on_doctype);
    XML_SetEntityDeclHandler(xp, on_entity_decl);
    if (XML_SetReparseDeferralEnabled != NULL) XML_SetReparseDeferralEnabled(xp, XML_FALSE);
}

/* ---- building Lua values from the tape ---------------------------------------------------- */

#define EV_INDEX 3 /* stack slot of the events table during feed (nil until needed) */
#define MT_INDEX 4 /* stack slot of stanza_mt (or nil) during feed */
#define LAZY_INDEX 5 /* stack slot of the lazy metatable (or nil) during feed */
#define BLOCK_INDEX 6 /* stack slot of the latest block of lazy stanzas (or nil) during feed */

/* Strings feed and the lazy elements' functions use all the time, kept as their upvalues so
 * they are pushed, not interned (lua_pushstring hashes or looks up a C string each time). */
enum {
    K_NAME = 1, K_ATTR, K_TAGS, K_XMLNS, K_XMLLANG, K_HEADER, K_STANZA, K_CLOSE, K_ERROR, K_LAZY_METHODS,
    K_COUNT = K_LAZY_METHODS
};
static const char *const feed_strings[] = {"name", "attr", "tags", "xmlns", "xml:lang", "header", "stanza",
                                           "close", "error", "__xmppsm_lazy_methods"};
#define PUSH_K(L, k) lua_pushvalue((L), lua_upvalueindex(k))

typedef struct {
    lua_State *L;
    parser_t *p;
    lua_Integer n; /* events so far */
    int have_table;
    const char *done_end; /* the end of the complete units being walked */
    struct block_s *block; /* the block of the latest lazy stanza, or NULL */
    const char *block_begin, *block_end; /* the tape records it holds a copy of */
} out_t;

/* Creates the events table, sized for what is known to come. */
static void events_table(out_t *o, size_t events) {
    if (o->have_table) return;
    lua_createtable(o->L, (int)(3 * events), 0);
    lua_replace(o->L, EV_INDEX);
    o->have_table = 1;
}

/* Pushes an event's kind and its two values (already on the stack) into the events table. */
static void emit(out_t *o, int kind) {
    lua_State *L = o->L;
    lua_Integer base = 3 * o->n;
    events_table(o, 1);
    lua_rawseti(L, EV_INDEX, base + 3);
    lua_rawseti(L, EV_INDEX, base + 2);
    PUSH_K(L, kind);
    lua_rawseti(L, EV_INDEX, base + 1);
    o->n++;
}

static void push_raw(lua_State *L, const parser_t *p, uint64_t start, uint64_t end) {
    if (start < p->raw_base || end > raw_end(p) || start > end) { /* cannot happen; stay in bounds */
        lua_pushliteral(L, "");
        return;
    }
    lua_pushlstring(L, raw_at(p, start), (size_t)(end - start));
}

/* Attribute keys: "name", "xml:name" for the XML namespace, "uri\1name" for any other. */
static void push_attr_key(lua_State *L, const char *k, size_t klen) {
    size_t xlen = sizeof XML_NS_SEP - 1;
    if (klen > xlen && memcmp(k, XML_NS_SEP, xlen) == 0) {
        if (strcmp(k + xlen, "lang") == 0)
            PUSH_K(L, K_XMLLANG);
        else
            lua_pushfstring(L, "xml:%s", k + xlen);
    } else {
        lua_pushlstring(L, k, klen);
    }
}

/* Pushes the attr table of the records at r (nattr, then name/value pairs), with `xmlns` = ns
 * when the element's namespace differs from its parent's. */
static const char *read_attrs(lua_State *L, const char *r, int differs, const char *ns, size_t nslen) {
    uint32_t nattr, i;
    const char *k, *v;
    size_t klen, vlen;
    r = get_u32(r, &nattr);
    lua_createtable(L, 0, (int)nattr + differs);
    for (i = 0; i < nattr; i++) {
        r = get_str(r, &k, &klen);
        r = get_str(r, &v, &vlen);
        push_attr_key(L, k, klen);
        lua_pushlstring(L, v, vlen);
        lua_rawset(L, -3);
    }
    if (differs) {
        PUSH_K(L, K_XMLNS);
        lua_pushlstring(L, ns, nslen);
        lua_rawset(L, -3);
    }
    return r;
}

static const char *skip_attrs(const char *r) {
    uint32_t nattr, i;
    const char *s;
    size_t n;
    r = get_u32(r, &nattr);
    for (i = 0; i < 2 * nattr; i++) r = get_str(r, &s, &n);
    return r;
}

static const char *emit_header(out_t *o, const char *r) {
    lua_State *L = o->L;
    parser_t *p = o->p;
    uint64_t end;
    r = read_attrs(L, r, 1, p->content_ns, p->content_ns_len);
    r = get_u64(r, &end);
    if (p->raw_base != 0 || end > raw_end(p)) luaL_error(L, "xmppsm.parser: the header's bytes were dropped");
    push_raw(L, p, 0, end);
    p->header.len = 0;
    if (!buf_append(&p->header, raw_at(p, 0), (size_t)end)) luaL_error(L, "not enough memory");
    emit(o, K_HEADER);
    return r;
}

/* What the builder needs, from feed or from a lazy element's materialization. */
typedef struct {
    lua_State *L;
    int mt;       /* stack index of the elements' metatable, 0 for none */
    level_t *lv;  /* nlv entries, by depth in the stanza from 0 */
    int nlv;
    const char *root_ns; /* the namespace around the stanza (content_ns) */
    size_t root_ns_len;
} build_t;

/* An element's name on the tape ("uri\1local" or "local"), split, and whether its namespace
 * differs from its parent's (then attr.xmlns says it). */
typedef struct {
    const char *ns, *local;
    size_t nslen, locallen;
    int differs;
} name_t;

/* Splits a recorded name into namespace and local name (`differs` is left to the caller). */
static void split_name(const char *name, size_t nlen, name_t *e) {
    const char *sep = memchr(name, '\1', nlen);
    e->ns = name;
    e->local = sep ? sep + 1 : name;
    e->nslen = sep ? (size_t)(sep - name) : 0;
    e->locallen = nlen - (size_t)(e->local - name);
}

/* REC_OPEN after the child counts: reads the name of the element at `depth` and notes its
 * namespace for its children. Returns the record's attributes. */
static const char *read_name(build_t *b, const char *r, int depth, name_t *e) {
    level_t *lv = b->lv;
    const char *name, *pns;
    size_t nlen, pnslen;
    r = get_str(r, &name, &nlen);
    split_name(name, nlen, e);
    pns = depth == 0 ? b->root_ns : lv[depth - 1].ns;
    pnslen = depth == 0 ? b->root_ns_len : lv[depth - 1].nslen;
    e->differs = e->nslen != pnslen || memcmp(name, pns, e->nslen) != 0;
    lv[depth].ns = name;
    lv[depth].nslen = e->nslen;
    lv[depth].nchild = lv[depth].ntag = 0;
    return r;
}

/* Pushes a new element table with `name` and metatable `mt` (a stack index, 0 for none). */
static void new_element(lua_State *L, const name_t *e, int narr, int mt) {
    lua_createtable(L, narr, 3);
    if (mt != 0) {
        lua_pushvalue(L, mt);
        lua_setmetatable(L, -2);
    }
    PUSH_K(L, K_NAME);
    lua_pushlstring(L, e->local, e->locallen);
    lua_rawset(L, -3);
}

/* REC_OPEN: pushes the new element table and its tags table. */
static const char *open_element(build_t *b, const char *r, int depth) {
    lua_State *L = b->L;
    uint32_t nchild, ntag;
    name_t e;
    r = get_u32(r, &nchild);
    r = get_u32(r, &ntag);
    r = read_name(b, r, depth, &e);
    new_element(L, &e, (int)nchild, b->mt);
    PUSH_K(L, K_ATTR);
    r = read_attrs(L, r, e.differs, e.ns, e.nslen);
    lua_rawset(L, -3);
    lua_createtable(L, (int)ntag, 0);
    PUSH_K(L, K_TAGS);
    lua_pushvalue(L, -2);
    lua_rawset(L, -4);
    return r;
}

/* Builds elements from REC_OPEN / REC_TEXT / REC_CLOSE records until the element open at
 * `depth` - 1 closes (depth 0: until the first element opened here closes, leaving it on the
 * stack). On entry the stack holds element, tags for each of the `depth` open elements; they are
 * popped down to that element. Returns the record after the last REC_CLOSE. */
static const char *build(build_t *b, const char *r, int depth) {
    lua_State *L = b->L;
    level_t *lv = b->lv;
    const char *s;
    size_t n;
    for (;;) {
        switch (*r++) {
        case REC_OPEN:
            if (depth >= b->nlv) luaL_error(L, "xmppsm.parser: corrupt tape");
            r = open_element(b, r, depth);
            depth++;
            break;
        case REC_TEXT:
            if (depth == 0) luaL_error(L, "xmppsm.parser: corrupt tape");
            r = get_str(r, &s, &n);
            lua_pushlstring(L, s, n);
            lua_rawseti(L, -3, ++lv[depth - 1].nchild);
            break;
        case REC_CLOSE:
            if (depth == 0) luaL_error(L, "xmppsm.parser: corrupt tape");
            lua_pop(L, 1); /* its tags table */
            depth--;
            if (depth == 0) return r;
            lua_pushvalue(L, -1);
            lua_rawseti(L, -3, ++lv[depth - 1].ntag);
            lua_rawseti(L, -3, ++lv[depth - 1].nchild);
            break;
        default:
            return luaL_error(L, "xmppsm.parser: corrupt tape"), r;
        }
    }
}

/* ---- lazy elements ------------------------------------------------------------------------- *
 * The lazy stanzas a walk hands out share blocks: one userdata holds a copy of the records of
 * consecutive stanzas (at most BLOCK_MAX bytes of them, or one stanza), so a stanza costs the
 * collector no object of its own besides its table and its raw string. A lazy stanza is its
 * table with name, the lazy metatable and under LAZY_KEY its block, whose list of stanzas finds
 * its records by the table's address (a second key would make the table's hash part grow when
 * it is materialized). Reading `attr` builds only the attr table (most consumers read name and
 * attr of every stanza, and many nothing else); any other use builds attr if needed, then the
 * children into the same table with build(), drops the key and switches the metatable to
 * stanza_mt. */

#define BLOCK_MAGIC 0x626c6b31u
/* A block keeps at most this many bytes of records, or one stanza's. It bounds what one kept lazy
 * stanza holds of other stanzas' records; 16 KiB still puts the stanzas of a typical read (a few
 * KiB) in one block. */
#define BLOCK_MAX 16384
static const char LAZY_KEY = 0; /* its address is the private key */
static lua_Integer materialized; /* debug counter, core._materialized() */

/* A block: this header, `max` slots, then `len` bytes of records. The content namespace the
 * stanzas' namespaces are compared with is the block's user value. */
typedef struct block_s {
    uint32_t magic;
    size_t len;
    size_t n, max;       /* the lazy stanzas made from it so far, and room for them */
    size_t last;         /* the slot found last: consumers mostly read stanzas in order */
    const char *root_ns; /* bytes of the user value */
    size_t root_ns_len;
} block_t;

/* A lazy stanza of the block: its table's address and where its REC_BEGIN is in the records.
 * An element finds its slot by its own address, so no value an element holds can point inside
 * the records. */
typedef struct {
    const void *el;
    size_t off;
} slot_t;

static slot_t *block_slots(block_t *k) {
    return (slot_t *)(void *)(k + 1);
}

static char *block_records(block_t *k) {
    return (char *)(block_slots(k) + k->max);
}

/* Copies the records of the stanza at `begin` and of those after it, as long as they are
 * stanzas and fit in BLOCK_MAX, into a new block at BLOCK_INDEX. */
static void new_block(out_t *o, const char *begin) {
    lua_State *L = o->L;
    const char *r = begin, *end = begin;
    size_t n = 0, len;
    uint64_t rel;
    block_t *k;
    while (r < o->done_end && *r == REC_BEGIN && (size_t)(o->done_end - r) > BEGIN_SIZE) {
        get_u64(r + 1 + 8, &rel);
        if (rel < BEGIN_SIZE || rel + 1 + 8 > (uint64_t)(o->done_end - r) || r[rel] != REC_END) break;
        r += rel + 1 + 8; /* past its REC_END */
        if (n > 0 && (size_t)(r - begin) > BLOCK_MAX) break;
        end = r;
        n++;
    }
    if (n == 0) luaL_error(L, "xmppsm.parser: corrupt tape");
    len = (size_t)(end - begin);
    k = lua_newuserdatauv(L, sizeof *k + n * sizeof(slot_t) + len, 1);
    k->magic = BLOCK_MAGIC;
    k->len = len;
    k->n = 0;
    k->last = 0;
    k->max = n;
    memcpy(block_records(k), begin, len);
    lua_getiuservalue(L, 1, UV_NS);
    k->root_ns = lua_tolstring(L, -1, &k->root_ns_len);
    lua_setiuservalue(L, -2, 1);
    lua_replace(L, BLOCK_INDEX);
    o->block = k;
    o->block_begin = begin;
    o->block_end = end;
}

/* Makes the stanza on top of the stack, whose records start at `begin` (its REC_BEGIN) on the
 * tape, lazy. */
static void make_lazy(out_t *o, const char *begin) {
    lua_State *L = o->L;
    block_t *k;
    if (o->block == NULL || begin >= o->block_end) new_block(o, begin);
    k = o->block;
    if (k->n >= k->max) luaL_error(L, "xmppsm.parser: corrupt tape");
    block_slots(k)[k->n].el = lua_topointer(L, -1);
    block_slots(k)[k->n++].off = (size_t)(begin - o->block_begin);
    lua_pushvalue(L, BLOCK_INDEX);
    lua_rawsetp(L, -2, &LAZY_KEY);
}

/* Where the lazy element at `idx` keeps its records, checked. */
typedef struct {
    const char *attrs; /* its attribute records */
    const char *end;   /* its REC_END */
    uint32_t depth;    /* levels the build needs: how deep the stanza's elements nest */
    uint32_t ntag;
    name_t e;
} lazy_t;

#define LAZY_UPVALUES (K_COUNT + 1) /* the feed strings, then stanza_mt or false */
#define LAZY_TARGET lua_upvalueindex(K_COUNT + 1)

/* The slot of element `el` in block `k` (k->n when none). The search starts at the slot found
 * last and its successor, so reading a feed's stanzas in order costs one or two looks each. */
static size_t find_slot(block_t *k, const void *el) {
    size_t i, start = k->last < k->n ? k->last : 0;
    for (i = start; i < k->n; i++)
        if (block_slots(k)[i].el == el) return k->last = i;
    for (i = 0; i < start; i++)
        if (block_slots(k)[i].el == el) return k->last = i;
    return k->n;
}

/* The block at `idx` (what a lazy element holds under LAZY_KEY), checked. */
static block_t *check_block(lua_State *L, int idx) {
    block_t *k = lua_touserdata(L, idx);
    size_t size = lua_rawlen(L, idx);
    if (k == NULL || size < sizeof *k || k->magic != BLOCK_MAGIC ||
        k->max > (size - sizeof *k) / sizeof(slot_t) ||
        size != sizeof *k + k->max * sizeof(slot_t) + k->len || k->n > k->max)
        luaL_error(L, "xmppsm.parser: corrupt lazy element");
    return k;
}

/* Pushes the block of the lazy element at `idx` and fills `z`; or pushes nothing and returns 0
 * when the element holds none (it was materialized). The block must stay on the stack while it
 * is read: the element may drop it. */
static int lazy_data(lua_State *L, int idx, lazy_t *z) {
    block_t *k;
    const char *recs, *r;
    const void *el = lua_topointer(L, idx);
    uint64_t rel;
    size_t i, off;
    uint32_t nchild;
    build_t b;
    level_t lv[1];
    if (lua_rawgetp(L, idx, &LAZY_KEY) != LUA_TUSERDATA) {
        lua_pop(L, 1);
        return 0;
    }
    k = check_block(L, -1);
    i = find_slot(k, el);
    if (i == k->n) luaL_error(L, "xmppsm.parser: corrupt lazy element"); /* not one of its stanzas */
    recs = block_records(k);
    off = block_slots(k)[i].off;
    if (off >= k->len || k->len - off <= BEGIN_SIZE + 1 + 8 || recs[off] != REC_BEGIN)
        luaL_error(L, "xmppsm.parser: corrupt lazy element");
    r = get_u64(recs + off + 1 + 8, &rel);
    r = get_u32(r, &z->depth);
    if (rel >= k->len - off || recs[off + rel] != REC_END || *r != REC_OPEN || z->depth < 1 ||
        z->depth > MAX_DEPTH_LIMIT)
        luaL_error(L, "xmppsm.parser: corrupt lazy element");
    z->end = recs + off + rel;
    r = get_u32(r + 1, &nchild);
    r = get_u32(r, &z->ntag);
    b.lv = lv;
    b.root_ns = k->root_ns;
    b.root_ns_len = k->root_ns_len;
    z->attrs = read_name(&b, r, 0, &z->e);
    return 1;
}

/* Builds the attr table of the lazy element at `idx` from `z`, sets it, pushes it. Runs in a
 * closure with LAZY_UPVALUES. Returns the records after the attributes. */
static const char *lazy_attr(lua_State *L, int idx, const lazy_t *z) {
    const char *r = read_attrs(L, z->attrs, z->e.differs, z->e.ns, z->e.nslen);
    if (r >= z->end) luaL_error(L, "xmppsm.parser: corrupt lazy element");
    PUSH_K(L, K_ATTR);
    lua_pushvalue(L, -2);
    lua_rawset(L, idx);
    return r;
}

/* Materializes the lazy element at `idx` (absolute); runs in a closure with LAZY_UPVALUES.
 * Idempotent: without its records it only switches the metatable. */
static void materialize_at(lua_State *L, int idx) {
    level_t small[16], *lv = small;
    lazy_t z;
    build_t b;
    const char *r;
    int top = lua_gettop(L);
    if (lazy_data(L, idx, &z)) {
        PUSH_K(L, K_ATTR);
        if (lua_rawget(L, idx) == LUA_TNIL) /* not read yet */
            r = lazy_attr(L, idx, &z);
        else
            r = skip_attrs(z.attrs);
        luaL_checkstack(L, 2 * (int)z.depth + 16, "xmppsm.parser: deep stanza");
        if (z.depth > sizeof small / sizeof small[0])
            lv = lua_newuserdatauv(L, sizeof *lv * z.depth, 0);
        b.L = L;
        b.mt = 0;
        if (lua_istable(L, LAZY_TARGET)) {
            lua_pushvalue(L, LAZY_TARGET);
            b.mt = lua_gettop(L);
        }
        b.lv = lv;
        b.nlv = (int)z.depth;
        b.root_ns = NULL;
        b.root_ns_len = 0;
        lv[0].ns = z.e.ns;
        lv[0].nslen = z.e.nslen;
        lv[0].nchild = lv[0].ntag = 0;
        /* the key goes first: a build cut short by an error is not repeated into the same table */
        lua_pushnil(L);
        lua_rawsetp(L, idx, &LAZY_KEY);
        lua_pushvalue(L, idx);
        lua_createtable(L, (int)z.ntag, 0);
        PUSH_K(L, K_TAGS);
        lua_pushvalue(L, -2);
        lua_rawset(L, -4);
        if (build(&b, r, 1) != z.end) luaL_error(L, "xmppsm.parser: corrupt lazy element");
        materialized++;
    }
    lua_settop(L, top);
    if (lua_istable(L, LAZY_TARGET))
        lua_pushvalue(L, LAZY_TARGET);
    else
        lua_pushnil(L);
    lua_setmetatable(L, idx);
}

/* `attr` is built alone. A method the target metatable lists in __xmppsm_lazy_methods is
 * returned as it is: such a method handles a lazy element itself (xmppsm.stanza's
 * get_child_text reads the recorded children with core.lazy_child_text), so looking it up
 * builds nothing. */
static int lazy_index(lua_State *L) {
    lazy_t z;
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 2);
    if (lua_rawequal(L, 2, lua_upvalueindex(K_ATTR)) && lazy_data(L, 1, &z)) {
        lazy_attr(L, 1, &z); /* attr alone: the children stay unbuilt */
        return 1;
    }
    if (lua_type(L, 2) == LUA_TSTRING && lua_istable(L, LAZY_TARGET)) {
        PUSH_K(L, K_LAZY_METHODS);
        if (lua_rawget(L, LAZY_TARGET) == LUA_TTABLE) {
            lua_pushvalue(L, 2);
            if (lua_rawget(L, -2) != LUA_TNIL) return 1;
        }
        lua_settop(L, 2);
    }
    materialize_at(L, 1);
    lua_gettable(L, 1);
    return 1;
}

/* xmlns = core.element_ns(el)
 * What el.attr.xmlns is (the element's namespace when it differs from its parent's, else nil),
 * without building the attr table of a lazy element that has none yet: code that routes stanzas
 * by namespace then costs no attribute strings. A closure over the feed strings. */
static int l_element_ns(lua_State *L) {
    lazy_t z;
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    PUSH_K(L, K_ATTR);
    if (lua_rawget(L, 1) == LUA_TTABLE) { /* built, or already read: it may have been changed */
        PUSH_K(L, K_XMLNS);
        lua_gettable(L, 2);
        return 1;
    }
    if (!lazy_data(L, 1, &z)) return 0; /* no attr at all: nothing to say */
    if (z.e.differs)
        lua_pushlstring(L, z.e.ns, z.e.nslen);
    else
        lua_pushnil(L);
    return 1;
}

/* Pushes the text of an element whose records continue at r: its one REC_TEXT record, or ""
 * when there is none. Adjacent text always grows one record (rec_text: any other record ends
 * it), so a second one in a row means the tape is damaged. */
static void push_text(lua_State *L, const char *r, const char *end) {
    const char *t = "";
    size_t tlen = 0;
    if (r < end && *r == REC_TEXT) r = get_str(r + 1, &t, &tlen);
    if (r < end && *r == REC_TEXT) luaL_error(L, "xmppsm.parser: corrupt lazy element");
    lua_pushlstring(L, t, tlen);
}

/* found, text = core.lazy_child_text(el, name, want [, pns])
 * For a lazy element, without building anything: the first child element named `name` (any
 * name when nil) whose `attr.xmlns or pns` equals `want` (both may be nil), as get_child
 * matches; found is false when there is none, else text is what get_text would return (the
 * text, "" for none, nil when the child has element children). Returns nothing when `el` is
 * not a lazy element, so the caller takes the general path.
 * Without a fourth argument, pns is el's own attr.xmlns (what core.element_ns says) and a nil
 * `want` means pns: get_child_text(name, xmlns) in one call. A closure over the feed strings. */
static int l_lazy_child_text(lua_State *L) {
    const char *r, *end, *want_name, *want, *pns, *sns;
    size_t want_name_len = 0, want_len = 0, pns_len = 0, snslen;
    lazy_t z;
    int depth = 0, own_ns = lua_isnone(L, 4);
    luaL_checktype(L, 1, LUA_TTABLE);
    want_name = luaL_optlstring(L, 2, NULL, &want_name_len);
    want = luaL_optlstring(L, 3, NULL, &want_len);
    pns = luaL_optlstring(L, 4, NULL, &pns_len);
    lua_settop(L, 4);
    if (!lazy_data(L, 1, &z)) return 0; /* its block stays on the stack while it is read */
    if (own_ns) {
        PUSH_K(L, K_ATTR);
        if (lua_rawget(L, 1) == LUA_TTABLE) { /* built, maybe changed: it says (element_ns) */
            PUSH_K(L, K_XMLNS);
            if (lua_gettable(L, -2) == LUA_TSTRING)
                pns = lua_tolstring(L, -1, &pns_len); /* stays on the stack until we return */
        } else if (z.e.differs) {
            pns = z.e.ns;
            pns_len = z.e.nslen;
        }
        if (want == NULL) {
            want = pns;
            want_len = pns_len;
        }
    }
    r = skip_attrs(z.attrs);             /* its children, through its own REC_CLOSE */
    end = z.end;
    sns = z.e.ns;
    snslen = z.e.nslen;
    while (r < end) {
        uint32_t nchild, ntag;
        const char *name, *eff;
        size_t nlen, eff_len;
        name_t child;
        switch (*r++) {
        case REC_TEXT:
            r = get_str(r, &name, &nlen);
            break;
        case REC_CLOSE:
            if (--depth < 0) r = end; /* the stanza's own end: no such child */
            break;
        case REC_OPEN:
            r = get_u32(r, &nchild);
            r = get_u32(r, &ntag);
            r = get_str(r, &name, &nlen);
            r = skip_attrs(r);
            if (depth++ != 0) break;
            split_name(name, nlen, &child);
            if (want_name != NULL && (child.locallen != want_name_len ||
                                      memcmp(child.local, want_name, want_name_len) != 0))
                break;
            /* attr.xmlns is set when the child's namespace differs from the stanza's */
            if (child.nslen != snslen || memcmp(name, sns, child.nslen) != 0) {
                eff = name;
                eff_len = child.nslen;
            } else {
                eff = pns;
                eff_len = pns_len;
            }
            if ((eff == NULL) != (want == NULL) ||
                (eff != NULL && (eff_len != want_len || memcmp(eff, want, want_len) != 0)))
                break;
            lua_pushboolean(L, 1);
            if (ntag > 0) {
                lua_pushnil(L);
            } else {
                push_text(L, r, end);
            }
            return 2;
        default:
            return luaL_error(L, "xmppsm.parser: corrupt lazy element");
        }
    }
    lua_pushboolean(L, 0);
    return 1;
}

static int lazy_newindex(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 3);
    materialize_at(L, 1);
    lua_settable(L, 1);
    return 0;
}

static int lazy_len(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    materialize_at(L, 1);
    lua_len(L, 1);
    return 1;
}

static int lazy_next(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 2);
    if (lua_next(L, 1)) return 2;
    lua_pushnil(L);
    return 1;
}

static int lazy_pairs(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    materialize_at(L, 1);
    if (luaL_getmetafield(L, 1, "__pairs") != LUA_TNIL) {
        lua_pushvalue(L, 1);
        lua_call(L, 1, 3);
        return 3;
    }
    lua_pushcfunction(L, lazy_next);
    lua_pushvalue(L, 1);
    lua_pushnil(L);
    return 3;
}

static int lazy_tostring(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    materialize_at(L, 1);
    luaL_tolstring(L, 1, NULL);
    return 1;
}

/* The metatable's __xmppsm_materialize: el = f(el). */
static int lazy_materialize(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    materialize_at(L, 1);
    return 1;
}

/* Pushes a new lazy metatable switching to the value at `target` (a table or nil). Runs in a
 * function whose upvalues 1..K_COUNT are the feed strings. */
static void new_lazy_mt(lua_State *L, int target) {
    static const luaL_Reg fns[] = {{"__index", lazy_index},     {"__newindex", lazy_newindex},
                                   {"__len", lazy_len},         {"__pairs", lazy_pairs},
                                   {"__tostring", lazy_tostring}, {"__xmppsm_materialize", lazy_materialize},
                                   {NULL, NULL}};
    int i;
    lua_createtable(L, 0, 8);
    for (i = 1; i <= K_COUNT; i++) lua_pushvalue(L, lua_upvalueindex(i));
    if (lua_istable(L, target))
        lua_pushvalue(L, target);
    else
        lua_pushboolean(L, 0);
    luaL_setfuncs(L, fns, LAZY_UPVALUES);
    if (lua_istable(L, target)) {
        lua_pushvalue(L, target);
        lua_setfield(L, -2, "__xmppsm_stanza_mt");
    }
    lua_pushliteral(L, "xmppsm.lazy_stanza");
    lua_setfield(L, -2, "__name");
}

/* el = core.materialize(el): builds a lazy element's children; anything else is returned as is. */
static int l_materialize(lua_State *L) {
    lua_settop(L, 1);
    if (lua_type(L, 1) == LUA_TTABLE && luaL_getmetafield(L, 1, "__xmppsm_materialize") != LUA_TNIL) {
        lua_pushvalue(L, 1);
        lua_call(L, 1, 0);
    }
    lua_settop(L, 1);
    return 1;
}

/* core.adopt(to, from): the table `to` takes over all that `from` holds (its fields, its
 * metatable and, when `from` is a lazy element, its place among its block's stanzas), so that
 * `to` is that element from then on; `from` is left an empty plain table. A field both have
 * takes `from`'s value. xmppsm.stanza's read-back stanzas become the element parsed from
 * their bytes this way, lazy as it is: nothing is built. */
static int l_adopt(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    if (lua_rawequal(L, 1, 2)) return 0;
    if (lua_rawgetp(L, 2, &LAZY_KEY) == LUA_TUSERDATA) {
        block_t *k = check_block(L, 3);
        size_t i = find_slot(k, lua_topointer(L, 2));
        if (i == k->n) luaL_error(L, "xmppsm.parser: corrupt lazy element");
        block_slots(k)[i].el = lua_topointer(L, 1);
    }
    lua_settop(L, 2);
    lua_pushnil(L);
    while (lua_next(L, 2)) { /* key value: to[key] = value, from[key] = nil */
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, 1);
        lua_pushvalue(L, -1);
        lua_pushnil(L);
        lua_rawset(L, 2); /* clearing the current key is allowed while traversing */
    }
    if (!lua_getmetatable(L, 2)) lua_pushnil(L);
    lua_setmetatable(L, 1);
    lua_pushnil(L);
    lua_setmetatable(L, 2);
    return 0;
}

/* n = core._materialized(): how many lazy elements have been materialized (a test hook). */
static int l_materialized(lua_State *L) {
    lua_pushinteger(L, materialized);
    return 1;
}

/* From REC_BEGIN to REC_END: one stanza. */
static const char *emit_stanza(out_t *o, const char *r) {
    lua_State *L = o->L;
    parser_t *p = o->p;
    const char *rec_end, *begin = r - 1;
    uint64_t start, end, rel;
    uint32_t depth, nchild, ntag;
    build_t b;
    r = get_u64(r, &start);
    r = get_u64(r, &rel);
    r = get_u32(r, &depth);
    rec_end = begin + rel;
    if (rel < BEGIN_SIZE || rec_end >= o->done_end || *rec_end != REC_END || *r != REC_OPEN)
        luaL_error(L, "xmppsm.parser: corrupt tape");
    b.L = L;
    b.mt = p->has_mt ? MT_INDEX : 0;
    b.lv = p->levels;
    b.nlv = p->max_depth;
    b.root_ns = p->content_ns;
    b.root_ns_len = p->content_ns_len;
    get_u32(r + 1, &nchild);
    get_u32(r + 5, &ntag);
    if (p->lazy && nchild > 0) {
        name_t e;
        read_name(&b, r + 1 + 8, 0, &e);
        new_element(L, &e, 0, LAZY_INDEX); /* its array is sized when (if) it is materialized */
        make_lazy(o, begin);
    } else if (build(&b, r, 0) != rec_end) {
        luaL_error(L, "xmppsm.parser: corrupt tape");
    }
    r = get_u64(rec_end + 1, &end);
    if (p->no_raw)
        lua_pushboolean(L, 0);
    else
        push_raw(L, p, start, end);
    emit(o, K_STANZA);
    return r;
}

static const char *emit_stream_end(out_t *o, const char *r) {
    uint64_t start, end;
    r = get_u64(r, &start);
    r = get_u64(r, &end);
    lua_pushboolean(o->L, 0);
    push_raw(o->L, o->p, start, end);
    emit(o, K_CLOSE);
    return r;
}

/* Turns the complete units on the tape into events, then keeps only the unfinished stanza. */
static void walk(out_t *o) {
    parser_t *p = o->p;
    const char *r = p->tape.p, *end = p->tape.p + p->tape_done;
    int d;
    if (p->units == 0) return;
    events_table(o, p->units + 1);
    o->done_end = end;
    o->block = NULL;
    while (r < end) {
        switch (*r++) {
        case REC_HEADER:
            r = emit_header(o, r);
            break;
        case REC_BEGIN:
            r = emit_stanza(o, r);
            break;
        case REC_STREAM_END:
            r = emit_stream_end(o, r);
            break;
        default:
            luaL_error(o->L, "xmppsm.parser: corrupt tape");
        }
    }
    buf_drop_front(&p->tape, p->tape_done);
    if (p->open_text != NO_TEXT) p->open_text -= p->tape_done;
    for (d = 1; d < p->depth && d <= p->max_depth; d++) p->frames[d].rec -= p->tape_done;
    p->tape_done = 0;
    p->units = 0;
}

/* ---- feeding ----------------------------------------------------------------------------- */

/* The input still to parse: bytes of `raw` past `fed` (put back by a rebase or waiting for a
 * look at the encoding), then the rest of the caller's chunk. */
typedef struct {
    const char *data;
    size_t off, len;
} input_t;

static uint64_t avail_end(const parser_t *p, const input_t *in) {
    return raw_end(p) + (in->len - in->off);
}

static unsigned char peek(const parser_t *p, const input_t *in, uint64_t pos) {
    if (pos < raw_end(p)) return (unsigned char)*raw_at(p, pos);
    return (unsigned char)in->data[in->off + (size_t)(pos - raw_end(p))];
}

/* Where the current unit must end at the latest: no unit may exceed max_stanza_size. */
static uint64_t unit_limit(const parser_t *p, const input_t *in, int *unit) {
    uint64_t max = p->max_size, pos, gap_end, last = avail_end(p, in);
    if (p->state == ST_HEADER) {
        *unit = UNIT_HEADER;
        return max;
    }
    *unit = UNIT_STANZA;
    if (p->depth >= 2) return p->unit_start + max;
    /* Between units. Bytes expat holds unreported (a partial tag, a trailing CR) either start the
     * next unit or are whitespace still running. */
    for (pos = p->consumed; pos < p->fed && is_ws((unsigned char)*raw_at(p, pos)); pos++) {}
    if (pos < p->fed) return pos + max;
    /* Only whitespace so far: look ahead for where it ends, at most where the gap would be
     * too long. Only the whitespace itself is scanned here. */
    gap_end = p->gap_start + max;
    for (pos = p->fed; pos < last && pos < gap_end && is_ws(peek(p, in, pos)); pos++) {}
    if (pos < last && !is_ws(peek(p, in, pos))) return pos + max;
    if (pos == last) return last;
    *unit = UNIT_GAP;
    return gap_end;
}

/* Moves the unparsed bytes kept for reset() into `rest`, within max_stanza_size. */
static void keep_rest(out_t *o, const char *s, size_t n) {
    parser_t *p = o->p;
    size_t room = p->max_size > p->rest.len ? p->max_size - p->rest.len : 0;
    if (n > room) {
        if (p->state == ST_PAUSED) {
            p->state = ST_FAILED;
            lua_pushliteral(o->L, "policy-violation");
            lua_pushfstring(o->L, "more than max_stanza_size (%I bytes) arrived while paused",
                            (lua_Integer)p->max_size);
            emit(o, K_ERROR);
        }
        n = room;
    }
    if (!buf_append(&p->rest, s, n)) luaL_error(o->L, "not enough memory");
}

/* After a stop for an error or a pause: what expat was given past the stop point is kept. */
static void stop_stream(out_t *o, int state) {
    parser_t *p = o->p;
    uint64_t from = p->stop_pos;
    if (from < p->raw_base) from = p->raw_base;
    if (from > raw_end(p)) from = raw_end(p);
    if (state == ST_FAILED) {
        lua_pushstring(o->L, p->err_cond);
        lua_pushstring(o->L, p->err_text);
        emit(o, K_ERROR);
    }
    p->state = state;
    p->rest.len = 0;
    keep_rest(o, raw_at(p, from), (size_t)(raw_end(p) - from));
    p->raw.len = 0;
    p->raw_base = p->fed = p->consumed = from;
}

/* Between stanzas, the first byte that is not whitespace must start a tag. expat does not always
 * report text before failing (it rejects " x ]]>" as one token), so whether an error there was
 * "text between stanzas" is decided from the bytes, the same way however the input was split.
 * Returns the position of the offending byte, or 0 when the text began with '<'. */
static uint64_t text_between_stanzas(const parser_t *p) {
    uint64_t pos = p->gap_start > p->raw_base ? p->gap_start : p->raw_base;
    if (p->state != ST_OPEN || p->depth != 1) return 0;
    for (; pos < p->fed; pos++) {
        unsigned char c = (unsigned char)*raw_at(p, pos);
        if (!is_ws(c)) return c == '<' ? 0 : pos + 1;
    }
    return 0;
}

static void expat_error(parser_t *p) {
    enum XML_Error code = XML_GetErrorCode(p->xp);
    uint64_t pos = here(p), text = text_between_stanzas(p);
    const char *cond = "not-well-formed";
    if (text != 0 && code != XML_ERROR_NO_MEMORY) {
        set_error(p, "bad-format", text - 1, "text between stanzas at byte %llu", (unsigned long long)(text - 1));
        return;
    }
    switch (code) {
    case XML_ERROR_NO_MEMORY:
        cond = COND_OOM;
        break;
    case XML_ERROR_UNDEFINED_ENTITY:
    case XML_ERROR_PARAM_ENTITY_REF:
    case XML_ERROR_RECURSIVE_ENTITY_REF:
    case XML_ERROR_BINARY_ENTITY_REF:
    case XML_ERROR_ATTRIBUTE_EXTERNAL_ENTITY_REF:
    case XML_ERROR_EXTERNAL_ENTITY_HANDLING:
        cond = "restricted-xml";
        break;
    case XML_ERROR_INCORRECT_ENCODING:
    case XML_ERROR_UNKNOWN_ENCODING:
        cond = "unsupported-encoding";
        break;
    default:
        break;
    }
    set_error(p, cond, pos, "%s at byte %llu", XML_ErrorString(code), (unsigned long long)pos);
}

/* Starts expat on a new stream. */
static int restart_expat(parser_t *p) {
    if (!XML_ParserReset(p->xp, "UTF-8")) return 0;
    install_handlers(p);
    p->depth = 0;
    p->stop = STOP_NONE;
    p->header_ns_ok = 0;
    ns_clear(&p->ns);
    return 1;
}

/* Resets expat at a stanza boundary and replays the stream header, so names interned by expat
 * do not pile up over a long stream. Parsing goes on from `fed` as if nothing happened. */
static void rebase(out_t *o) {
    parser_t *p = o->p;
    enum XML_Status st;
    if (!restart_expat(p)) luaL_error(o->L, "not enough memory");
    p->replaying = 1;
    st = XML_Parse(p->xp, p->header.p, (int)p->header.len, XML_FALSE);
    p->replaying = 0;
    if (st != XML_STATUS_OK || p->depth != 1) {
        p->state = ST_FAILED;
        luaL_error(o->L, "xmppsm.parser: replaying the stream header failed");
    }
    p->delta = (int64_t)p->fed - (int64_t)p->header.len;
    p->consumed = p->fed;
    p->rebase_at = (XML_Index)(p->header.len + 2 * p->max_size);
}

/* Drops the raw bytes nothing needs any more. */
static void compact_raw(parser_t *p) {
    uint64_t keep;
    if (p->state == ST_HEADER)
        keep = 0; /* the header's raw bytes run from the start of the stream */
    else if (p->depth >= 2)
        keep = p->unit_start;
    else
        keep = p->consumed < p->fed ? p->consumed : p->fed;
    if (keep > p->raw_base) {
        buf_drop_front(&p->raw, (size_t)(keep - p->raw_base));
        p->raw_base = keep;
    }
}

/* Gives expat the next `n` bytes (already in raw at `fed`) and reports what they completed. */
static void parse_piece(out_t *o, size_t n) {
    parser_t *p = o->p;
    enum XML_Status st = XML_Parse(p->xp, raw_at(p, p->fed), (int)n, XML_FALSE);
    p->fed += n;
    if (p->stop == STOP_NONE) {
        if (st != XML_STATUS_OK)
            expat_error(p);
        else
            p->consumed = here(p);
    }
    if (p->stop == STOP_ERROR && p->err_cond == COND_OOM) {
        p->state = ST_FAILED;
        luaL_error(o->L, "not enough memory");
    }
    walk(o);
    switch (p->stop) {
    case STOP_ERROR:
        stop_stream(o, ST_FAILED);
        return;
    case STOP_PAUSE:
        stop_stream(o, ST_PAUSED);
        return;
    case STOP_REBASE:
        p->fed = p->consumed = p->stop_pos;
        rebase(o);
        break;
    default:
        break;
    }
    compact_raw(p);
}

/* An error found before the bytes reach expat (size limit, byte-order mark). */
static void fail_before(out_t *o, const char *cond, const char *fmt, ...) {
    parser_t *p = o->p;
    va_list ap;
    p->stop = STOP_ERROR;
    p->stop_pos = p->fed;
    p->err_cond = cond;
    va_start(ap, fmt);
    vsnprintf(p->err_text, sizeof p->err_text, fmt, ap);
    va_end(ap);
    stop_stream(o, ST_FAILED);
}

/* expat looks at the first two bytes of a document and switches to UTF-16 on a byte-order mark
 * or on a NUL in either of them, whatever encoding it was told (and decides on one byte alone
 * when it gets only one). NUL is never allowed in XML, so a NUL there, or FE FF / FF FE, means
 * the stream is not UTF-8. expat is given nothing before the first two bytes are here, so its
 * choice never depends on how the input was split. Returns 0 to wait for more input. */
static int check_encoding(out_t *o, input_t *in) {
    parser_t *p = o->p;
    unsigned char a, b;
    if (p->fed != 0 || p->state != ST_HEADER || avail_end(p, in) == 0) return 1;
    if (avail_end(p, in) < 2) {
        if (!buf_append(&p->raw, in->data + in->off, in->len - in->off)) luaL_error(o->L, "not enough memory");
        in->off = in->len;
        return 0;
    }
    a = peek(p, in, 0);
    b = peek(p, in, 1);
    if ((a == 0xFE && b == 0xFF) || (a == 0xFF && b == 0xFE))
        fail_before(o, "unsupported-encoding", "the stream starts with a UTF-16 byte-order mark");
    else if (a == 0x00 || b == 0x00)
        fail_before(o, "unsupported-encoding", "the stream is not UTF-8 (a NUL in its first two bytes)");
    return 1;
}

static void run(out_t *o, input_t *in) {
    parser_t *p = o->p;
    static const char *const unit_names[] = {"the stream header", "a stanza", "whitespace between stanzas"};
    for (;;) {
        uint64_t limit, last;
        size_t n, need;
        int unit;
        if (p->state == ST_PAUSED || p->state == ST_FAILED) {
            keep_rest(o, in->data + in->off, in->len - in->off);
            return;
        }
        if (!check_encoding(o, in)) return;
        if (p->state == ST_FAILED) continue;
        last = avail_end(p, in);
        if (last == p->fed) return;
        limit = unit_limit(p, in, &unit);
        if (limit <= p->fed) {
            fail_before(o, "policy-violation", "%s exceeds max_stanza_size (%llu bytes)", unit_names[unit],
                        (unsigned long long)p->max_size);
            continue;
        }
        n = (size_t)((limit < last ? limit : last) - p->fed);
        if (p->fed + n > raw_end(p)) {
            need = (size_t)(p->fed + n - raw_end(p));
            if (!buf_append(&p->raw, in->data + in->off, need)) luaL_error(o->L, "not enough memory");
            in->off += need;
        }
        parse_piece(o, n);
    }
}

/* ---- Lua API ----------------------------------------------------------------------------- */

static parser_t *check_parser(lua_State *L) {
    parser_t *p = luaL_checkudata(L, 1, PARSER_MT);
    if (p->xp == NULL) luaL_error(L, "attempt to use a closed xmppsm.parser");
    return p;
}

static void clear_stream(parser_t *p) {
    p->state = ST_HEADER;
    p->busy = 0;
    p->fed = p->consumed = p->unit_start = p->gap_start = 0;
    p->delta = 0;
    p->rebase_at = (XML_Index)(2 * p->max_size);
    p->raw.len = 0;
    p->raw_base = 0;
    p->header.len = 0;
    p->tape.len = 0;
    p->tape_done = 0;
    p->units = 0;
    p->open_text = NO_TEXT;
    p->rest.len = 0;
    p->replaying = 0;
}

/* events, n = p:feed(data) */
static int l_feed(lua_State *L) {
    parser_t *p = check_parser(L);
    out_t o;
    input_t in;
    in.data = luaL_checklstring(L, 2, &in.len);
    in.off = 0;
    if (p->busy) luaL_error(L, "xmppsm.parser: unusable after an error raised by feed; call reset()");
    lua_settop(L, 2);
    lua_pushnil(L);                 /* EV_INDEX: created when the first event comes */
    lua_getiuservalue(L, 1, UV_MT); /* MT_INDEX */
    lua_getiuservalue(L, 1, UV_LAZY); /* LAZY_INDEX */
    lua_pushnil(L);                   /* BLOCK_INDEX */
    luaL_checkstack(L, 2 * p->max_depth + 16, "xmppsm.parser: deep stanza");
    o.L = L;
    o.p = p;
    o.n = 0;
    o.have_table = 0;
    p->busy = 1;
    run(&o, &in);
    p->busy = 0;
    events_table(&o, 0);
    lua_pushvalue(L, EV_INDEX);
    lua_pushinteger(L, o.n);
    return 2;
}

/* leftover = p:reset() */
static int l_reset(lua_State *L) {
    parser_t *p = check_parser(L);
    if (p->state == ST_PAUSED || p->state == ST_FAILED)
        lua_pushlstring(L, p->rest.p ? p->rest.p : "", p->rest.len);
    else if (raw_end(p) > p->fed) /* a first byte held back by check_encoding */
        lua_pushlstring(L, raw_at(p, p->fed), (size_t)(raw_end(p) - p->fed));
    else
        lua_pushliteral(L, "");
    clear_stream(p);
    if (!restart_expat(p)) {
        p->state = ST_FAILED;
        return luaL_error(L, "not enough memory");
    }
    return 1;
}

static int l_state(lua_State *L) {
    parser_t *p = check_parser(L);
    lua_pushstring(L, state_names[p->state]);
    return 1;
}

/* p:idle(): the stream is open and every byte fed so far is part of a stanza already reported
 * (nothing half-parsed is pending), so the next bytes fed start a new top-level element.
 * stanza.parse keeps one parser open across its calls while this holds. */
static int l_idle(lua_State *L) {
    parser_t *p = check_parser(L);
    lua_pushboolean(L, p->state == ST_OPEN && p->depth == 1 && p->consumed == p->fed &&
                           p->fed == raw_end(p));
    return 1;
}

/* p:set_raw(keep): whether stanza events carry their raw bytes (the default) or false. A client
 * nobody logs the traffic of makes no string per stanza received. */
static int l_set_raw(lua_State *L) {
    parser_t *p = luaL_checkudata(L, 1, PARSER_MT);
    luaL_checktype(L, 2, LUA_TBOOLEAN);
    p->no_raw = !lua_toboolean(L, 2);
    return 0;
}

static void free_parser(parser_t *p) {
    if (p->xp != NULL) {
        XML_ParserFree(p->xp);
        p->xp = NULL;
    }
    buf_free(&p->raw);
    buf_free(&p->header);
    buf_free(&p->tape);
    buf_free(&p->rest);
    ns_free(&p->ns);
    free(p->levels);
    p->levels = NULL;
    free(p->frames);
    p->frames = NULL;
}

/* close, __gc and __close: idempotent. */
static int l_close(lua_State *L) {
    free_parser(luaL_checkudata(L, 1, PARSER_MT));
    return 0;
}

static int l_tostring(lua_State *L) {
    parser_t *p = luaL_checkudata(L, 1, PARSER_MT);
    lua_pushfstring(L, "xmppsm.parser (%s): %p", p->xp ? state_names[p->state] : "closed", (void *)p);
    return 1;
}

static lua_Integer opt_integer(lua_State *L, const char *key, lua_Integer def, lua_Integer lo, lua_Integer hi) {
    lua_Integer v;
    int isnum;
    if (lua_getfield(L, 1, key) == LUA_TNIL) {
        lua_pop(L, 1);
        return def;
    }
    v = lua_tointegerx(L, -1, &isnum);
    if (!isnum || v < lo || v > hi)
        luaL_error(L, "bad option '%s' to 'parser' (an integer from %I to %I expected)", key, lo, hi);
    lua_pop(L, 1);
    return v;
}

static void check_option_names(lua_State *L) {
    static const char *const known[] = {"max_stanza_size", "max_depth", "max_attributes", "content_ns",
                                        "stanza_mt", "lazy", NULL};
    int i;
    lua_pushnil(L);
    while (lua_next(L, 1) != 0) {
        lua_pop(L, 1);
        for (i = 0; known[i] != NULL; i++)
            if (lua_type(L, -1) == LUA_TSTRING && strcmp(lua_tostring(L, -1), known[i]) == 0) break;
        if (known[i] == NULL) luaL_error(L, "unknown option to 'parser': %s", luaL_tolstring(L, -1, NULL));
    }
}

/* p = core.parser([opts]) */
static int l_parser(lua_State *L) {
    parser_t *p;
    lua_Integer max_size, max_depth, max_attrs;
    int lazy = 1;   /* children built on first use: framing pays only for what is read */
    if (lua_isnoneornil(L, 1)) {
        lua_settop(L, 0);
        lua_newtable(L);
    }
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    check_option_names(L);
    max_size = opt_integer(L, "max_stanza_size", 262144, 1, MAX_STANZA_LIMIT);
    max_depth = opt_integer(L, "max_depth", 64, 1, MAX_DEPTH_LIMIT);
    max_attrs = opt_integer(L, "max_attributes", 64, 0, MAX_ATTRS_LIMIT);
    if (lua_getfield(L, 1, "content_ns") == LUA_TNIL) {
        lua_pop(L, 1);
        lua_pushliteral(L, "jabber:client");
    } else if (!lua_isstring(L, -1) || lua_type(L, -1) != LUA_TSTRING) {
        luaL_error(L, "bad option 'content_ns' to 'parser' (string expected)");
    } /* slot 2: content_ns */
    if (lua_getfield(L, 1, "stanza_mt") != LUA_TNIL && !lua_istable(L, -1))
        luaL_error(L, "bad option 'stanza_mt' to 'parser' (table expected)"); /* slot 3 */
    if (lua_getfield(L, 1, "lazy") != LUA_TNIL) {
        if (!lua_isboolean(L, -1)) luaL_error(L, "bad option 'lazy' to 'parser' (boolean expected)");
        lazy = lua_toboolean(L, -1);
    }
    lua_pop(L, 1);

    p = lua_newuserdatauv(L, sizeof *p, 3); /* slot 4 */
    memset(p, 0, sizeof *p);
    luaL_setmetatable(L, PARSER_MT);
    p->max_size = (size_t)max_size;
    p->max_depth = (int)max_depth;
    p->max_attrs = (int)max_attrs;
    p->content_ns = lua_tolstring(L, 2, &p->content_ns_len);
    p->has_mt = !lua_isnil(L, 3);
    lua_pushvalue(L, 3);
    lua_setiuservalue(L, 4, UV_MT);
    lua_pushvalue(L, 2);
    lua_setiuservalue(L, 4, UV_NS);
    p->lazy = lazy;
    if (lazy) {
        new_lazy_mt(L, 3);
        lua_setiuservalue(L, 4, UV_LAZY);
    }
    p->levels = malloc(sizeof *p->levels * (size_t)(max_depth + 1));
    p->frames = malloc(sizeof *p->frames * (size_t)(max_depth + 1));
    p->xp = XML_ParserCreate("UTF-8"); /* names are resolved here (xmlns.c), not by expat */
    /* raw and tape are never NULL while open: pointer arithmetic on them needs no special case */
    if (p->levels == NULL || p->frames == NULL || p->xp == NULL || !buf_reserve(&p->raw, 1) ||
        !buf_reserve(&p->tape, 1)) {
        free_parser(p);
        return luaL_error(L, "not enough memory");
    }
    install_handlers(p);
    clear_stream(p);
    return 1;
}

static const luaL_Reg parser_methods[] = {
    {"reset", l_reset}, {"state", l_state},     {"idle", l_idle},
    {"set_raw", l_set_raw}, {"close", l_close}, {NULL, NULL}};

static const luaL_Reg parser_meta[] = {
    {"__gc", l_close}, {"__close", l_close}, {"__tostring", l_tostring}, {NULL, NULL}};

/* Sets field `name` of the table on top to `fn` as a closure over the feed strings. */
static void set_keyed(lua_State *L, const char *name, lua_CFunction fn) {
    int i;
    for (i = 0; i < K_COUNT; i++) lua_pushstring(L, feed_strings[i]);
    lua_pushcclosure(L, fn, K_COUNT);
    lua_setfield(L, -2, name);
}

void xmppsm_open_parser(lua_State *L) {
    if (luaL_newmetatable(L, PARSER_MT)) {
        luaL_setfuncs(L, parser_meta, 0);
        luaL_newlib(L, parser_methods);
        set_keyed(L, "feed", l_feed);
        lua_setfield(L, -2, "__index");
        lua_pushliteral(L, PARSER_MT);
        lua_setfield(L, -2, "__name");
    }
    lua_pop(L, 1);
    set_keyed(L, "parser", l_parser);
    set_keyed(L, "lazy_child_text", l_lazy_child_text);
    set_keyed(L, "element_ns", l_element_ns);
    lua_pushcfunction(L, l_materialize);
    lua_setfield(L, -2, "materialize");
    lua_pushcfunction(L, l_adopt);
    lua_setfield(L, -2, "adopt");
    lua_pushcfunction(L, l_materialized);
    lua_setfield(L, -2, "_materialized");
}
