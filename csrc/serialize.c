/* serialize: element tables to XML text (docs/core.md, "Element tables" and "Serializer").
 *
 * The output must be well-formed XML that parses back to the same element, or nothing at all:
 * a server answers bad XML by closing the stream, which would take every unacknowledged stanza
 * with it. So names, UTF-8 and XML 1.0 characters are checked here, in one pass with the
 * escaping, and any failure returns nil, err without a partial string.
 *
 * Tables are read with raw access only (lua_rawget, lua_rawgeti, lua_next): no metamethod can
 * run, so no Lua code can change the tables while C holds pointers into their strings. The one
 * exception runs before an element is read: a lazy element from the parser is materialized by the
 * C function its metatable names, which only fills in that element's own children. A compact
 * message of stanza.message() (its metatable has __xmppsm_body) is written as it is: its one
 * child, <body>, is the string in its field __xmppsm_body. */
#include <stdio.h>
#include <string.h>
#include <stdint.h>
#include "xmppsm.h"

/* A cycle (an element that contains itself) would recurse forever; 256 is four times the parser's
 * default max_depth, so anything the parser accepts serializes. */
#define MAX_DEPTH 256
#define DEFAULT_NS "jabber:client"

/* The stack slot core.serialize sets up before walking (see ser_serialize). */
#define SLOT_OUT 3
#define SLOT_PLAINMT 4 /* the last metatable found to have neither __xmppsm_materialize nor
                        * __xmppsm_body, or nil */

/* The keys the walk reads, kept as upvalues of core.serialize so a call does not create them. */
#define UV_KNAME lua_upvalueindex(1)
#define UV_KATTR lua_upvalueindex(2)
#define UV_KXMLNS lua_upvalueindex(3)
#define UV_KMAT lua_upvalueindex(4) /* "__xmppsm_materialize": a parser's lazy elements (csrc/parser.c) */
#define UV_KBODY lua_upvalueindex(5) /* "__xmppsm_body": stanza.message()'s compact messages */

/* ------------------------------------------------------------------------------------------ */
/* Output buffer. A stanza is usually small, so it starts in a C array; when it outgrows it, it
 * moves into a userdata kept in a fixed stack slot, so the GC owns it and an error raised midway
 * (out of memory) leaks nothing. luaL_Buffer cannot be used here: the walk keeps element tables
 * on the stack between appends, which luaL_Buffer's stack discipline forbids. */

#define OUT_INIT 2048

typedef struct {
    lua_State *L;
    char *p;
    size_t len, cap;
    char init[OUT_INIT];
} Out;

/* Out of line: rare, and keeping it out lets out_add inline into the hot loops. */
static void __attribute__((noinline)) out_grow(Out *o, size_t need) {
    size_t cap = o->cap;
    char *np;
    while (cap - o->len < need) {
        if (cap > SIZE_MAX / 2) luaL_error(o->L, "serialized element too large");
        cap *= 2;
    }
    np = (char *)lua_newuserdatauv(o->L, cap, 0);
    memcpy(np, o->p, o->len);
    lua_replace(o->L, SLOT_OUT); /* the previous userdata, if any, becomes garbage */
    o->p = np;
    o->cap = cap;
}

static inline void out_add(Out *o, const char *s, size_t n) {
    if (o->cap - o->len < n) out_grow(o, n);
    memcpy(o->p + o->len, s, n);
    o->len += n;
}

#define out_lit(o, s) out_add((o), "" s, sizeof(s) - 1)

/* ------------------------------------------------------------------------------------------ */
/* Byte classes for the escaping scan: runs of COPY bytes (and valid multi-byte sequences) are
 * appended whole; only ESC and BAD bytes stop a run. */

enum { COPY = 0, ESC = 1, BAD = 2, MB = 3 };

#define ROW_MB MB, MB, MB, MB, MB, MB, MB, MB, MB, MB, MB, MB, MB, MB, MB, MB
#define ROW_COPY 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0
#define ROW_BAD BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD

/* Text: & < > must be escaped; CR too, or the parser's end-of-line handling turns it into LF. */
static const unsigned char text_class[256] = {
    BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, COPY, COPY, BAD, BAD, ESC, BAD, BAD,
    ROW_BAD,
    /*   !  "  #  $  %  &    '  (  )  *  +  ,  -  .  / */
    0, 0, 0, 0, 0, 0, ESC, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    /* 0 1  2  3  4  5  6  7  8  9  :  ;  <    =  >    ? */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, ESC, 0, ESC, 0,
    ROW_COPY, ROW_COPY, ROW_COPY, ROW_COPY,
    ROW_MB, ROW_MB, ROW_MB, ROW_MB, ROW_MB, ROW_MB, ROW_MB, ROW_MB,
};

/* Attribute values: also both quotes, and TAB, LF, CR, which attribute-value normalization
 * would otherwise turn into spaces. core.escape uses this table too, so its result is safe in
 * either place. */
static const unsigned char attr_class[256] = {
    BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, BAD, ESC, ESC, BAD, BAD, ESC, BAD, BAD,
    ROW_BAD,
    0, 0, ESC, 0, 0, 0, ESC, ESC, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, ESC, 0, ESC, 0,
    ROW_COPY, ROW_COPY, ROW_COPY, ROW_COPY,
    ROW_MB, ROW_MB, ROW_MB, ROW_MB, ROW_MB, ROW_MB, ROW_MB, ROW_MB,
};

static void add_entity(Out *o, unsigned char c) {
    switch (c) {
    case '&': out_lit(o, "&amp;"); break;
    case '<': out_lit(o, "&lt;"); break;
    case '>': out_lit(o, "&gt;"); break;
    case '"': out_lit(o, "&quot;"); break;
    case '\'': out_lit(o, "&apos;"); break;
    case '\t': out_lit(o, "&#9;"); break;
    case '\n': out_lit(o, "&#10;"); break;
    default: out_lit(o, "&#13;"); break; /* '\r', the only other ESC byte */
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above U+10FFFF. */

enum { U_OK = 0, U_CONT, U_OVERLONG, U_SURROGATE, U_TOOBIG, U_BADBYTE, U_TRUNC };

/* Decodes the sequence starting at s[i] (a byte >= 0x80). Returns its length and sets *cp, or
 * returns 0 and sets *err (and *cp to the surrogate's value for U_SURROGATE). */
static size_t utf8_decode(const unsigned char *s, size_t n, size_t i, unsigned long *cp, int *err) {
    unsigned c = s[i], lo = 0x80, hi = 0xBF;
    size_t len, k;
    unsigned long v;
    if (c < 0x80) { *cp = c; return 1; }
    if (c < 0xC0) { *err = U_CONT; return 0; }
    if (c < 0xC2) { *err = U_OVERLONG; return 0; }
    if (c < 0xE0) { len = 2; v = c & 0x1F; }
    else if (c < 0xF0) {
        len = 3; v = c & 0x0F;
        if (c == 0xE0) lo = 0xA0; else if (c == 0xED) hi = 0x9F;
    } else if (c < 0xF5) {
        len = 4; v = c & 0x07;
        if (c == 0xF0) lo = 0x90; else if (c == 0xF4) hi = 0x8F;
    } else if (c < 0xF8) { *err = U_TOOBIG; return 0; }
    else { *err = U_BADBYTE; return 0; }
    if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80) { *err = U_TRUNC; return 0; }
    if (s[i + 1] < lo || s[i + 1] > hi) {
        if (c == 0xED) { *err = U_SURROGATE; *cp = 0xD000UL | ((unsigned long)(s[i + 1] & 0x3F) << 6)
                                                         | (i + 2 < n ? (s[i + 2] & 0x3FUL) : 0); }
        else *err = (c == 0xF4) ? U_TOOBIG : U_OVERLONG;
        return 0;
    }
    for (k = 1; k < len; k++) {
        if (i + k >= n || (s[i + k] & 0xC0) != 0x80) { *err = U_TRUNC; return 0; }
        v = (v << 6) | (s[i + k] & 0x3F);
    }
    *cp = v;
    return len;
}

/* ------------------------------------------------------------------------------------------ */
/* Error messages say what is wrong and where, e.g. "invalid XML character U+0001 in text of
 * <body> (byte 3)". "Where" is built only when an error happens. */

enum { W_TEXT, W_ATTR, W_XMLNS, W_ATTRNS, W_ESCAPE };

typedef struct {
    int kind;
    const char *el;    /* element name (already validated, so printable) */
    const char *attr;  /* attribute local name */
    const char *ns;    /* attribute namespace (not NUL-terminated), NULL when none */
    size_t nslen;
} Where;

static void push_where(lua_State *L, const Where *w) {
    switch (w->kind) {
    case W_TEXT: lua_pushfstring(L, " in text of <%s>", w->el); break;
    case W_ATTR:
        if (w->ns) {
            lua_pushliteral(L, " in value of attribute '{");
            lua_pushlstring(L, w->ns, w->nslen);
            lua_pushfstring(L, "}%s' of <%s>", w->attr, w->el);
            lua_concat(L, 3);
        } else lua_pushfstring(L, " in value of attribute '%s' of <%s>", w->attr, w->el);
        break;
    case W_XMLNS: lua_pushfstring(L, " in xmlns of <%s>", w->el); break;
    case W_ATTRNS: lua_pushfstring(L, " in namespace of attribute '%s' of <%s>", w->attr, w->el); break;
    default: lua_pushliteral(L, ""); break;
    }
}

static void push_utf8_error(lua_State *L, const unsigned char *s, size_t i, int err, unsigned long cp) {
    char why[64];
    switch (err) {
    case U_CONT: snprintf(why, sizeof why, "unexpected continuation byte 0x%02X", s[i]); break;
    case U_OVERLONG: snprintf(why, sizeof why, "overlong encoding"); break;
    case U_SURROGATE: snprintf(why, sizeof why, "encoded surrogate U+%04lX", cp); break;
    case U_TOOBIG: snprintf(why, sizeof why, "code point above U+10FFFF"); break;
    case U_BADBYTE: snprintf(why, sizeof why, "invalid byte 0x%02X", s[i]); break;
    default: snprintf(why, sizeof why, "truncated sequence"); break;
    }
    lua_pushfstring(L, "invalid UTF-8 (%s)", why);
}

/* Pushes "<what><where> (byte N)" as the error message; always returns 1 (failure). */
static int fail_at(lua_State *L, const Where *w, size_t i) {
    push_where(L, w);
    lua_pushfstring(L, " (byte %I)", (lua_Integer)(i + 1));
    lua_concat(L, 3);
    return 1;
}

static int fail_char(lua_State *L, const Where *w, size_t i, unsigned long cp) {
    char hex[16];
    snprintf(hex, sizeof hex, "%04lX", cp);
    lua_pushfstring(L, "invalid XML character U+%s", hex);
    return fail_at(L, w, i);
}

/* The escaping scan looks at 16 bytes at a time and gets a bitmask of those it must stop at:
 * bytes >= 0x80 (UTF-8 sequences, checked), below 0x20 (refused, or TAB/LF/CR), & < > and, in
 * attribute values, both quotes. Marks may include bytes the class table says to copy (TAB, LF
 * in text; any byte, in the portable version): the caller copies those. With SSE2 (every x86-64)
 * the mask takes a handful of instructions; elsewhere two word-at-a-time tests give it.
 * XMPPSM_NO_SIMD forces the portable version (the sanitizer build uses it, so both are tested). */
#define SCAN_BLOCK 16

#if defined(__SSE2__) && !defined(XMPPSM_NO_SIMD)
#include <emmintrin.h>

static inline unsigned scan_marks(const unsigned char *s, int attr) {
    __m128i v = _mm_loadu_si128((const __m128i *)(const void *)s);
    /* A signed compare: bytes >= 0x80 are negative, so they are below 0x20 too. */
    __m128i m = _mm_cmplt_epi8(v, _mm_set1_epi8(0x20));
    m = _mm_or_si128(m, _mm_cmpeq_epi8(v, _mm_set1_epi8('&')));
    m = _mm_or_si128(m, _mm_cmpeq_epi8(v, _mm_set1_epi8('<')));
    m = _mm_or_si128(m, _mm_cmpeq_epi8(v, _mm_set1_epi8('>')));
    if (attr) {
        m = _mm_or_si128(m, _mm_cmpeq_epi8(v, _mm_set1_epi8('"')));
        m = _mm_or_si128(m, _mm_cmpeq_epi8(v, _mm_set1_epi8('\'')));
    }
    return (unsigned)_mm_movemask_epi8(m);
}
#else
/* The "haszero" tests: nonzero in a byte's high bit when that byte matches. A borrow can mark a
 * byte above one that really matched; such a byte is then looked up and copied. */
#define ONES ((uint64_t)0x0101010101010101ULL)
#define HIGHS (ONES * 0x80)

static inline uint64_t has_less_0x20(uint64_t v) {
    return (v - ONES * 0x20) & ~v & HIGHS;
}

static inline uint64_t has_byte(uint64_t v, unsigned char c) {
    uint64_t x = v ^ (ONES * c);
    return (x - ONES) & ~x & HIGHS;
}

/* One bit per byte of s[0..7], the first byte in bit 0, whatever the byte order. */
static inline unsigned word_marks(const unsigned char *s, int attr) {
    uint64_t v = 0, m;
    unsigned out = 0;
    int k;
    for (k = 7; k >= 0; k--) v = (v << 8) | s[k]; /* little-endian order, on any machine */
    m = (v & HIGHS) | has_less_0x20(v) | has_byte(v, '&') | has_byte(v, '<') | has_byte(v, '>');
    if (attr) m |= has_byte(v, '"') | has_byte(v, '\'');
    for (k = 0; k < 8; k++) out |= (unsigned)((m >> (8 * k + 7)) & 1) << k;
    return out;
}

static inline unsigned scan_marks(const unsigned char *s, int attr) {
    return word_marks(s, attr) | (word_marks(s + 8, attr) << 8);
}
#endif

/* Position of the lowest set bit of m (m != 0). */
static inline unsigned lowest_bit(unsigned m) {
#if defined(__GNUC__)
    return (unsigned)__builtin_ctz(m);
#else
    unsigned k = 0;
    while (!(m & 1u)) { m >>= 1; k++; }
    return k;
#endif
}

/* Length of the valid UTF-8 sequence XML 1.0 allows at s[i] (a byte >= 0x80), or 0 with an error
 * message pushed. Two- and three-byte sequences are checked here; the rest by utf8_decode. */
static size_t xml_utf8_at(lua_State *L, const unsigned char *s, size_t n, size_t i, const Where *w) {
    unsigned c = s[i];
    unsigned long cp = 0;
    int err = U_OK;
    size_t len;
    /* U+0080..U+07FF (Latin, Greek, Cyrillic, ...): always allowed. */
    if (c >= 0xC2 && c <= 0xDF && i + 1 < n && (s[i + 1] & 0xC0) == 0x80) return 2;
    /* Lead bytes E1..EC: U+1000..U+CFFF, all allowed (E0's overlong forms, ED's surrogates and
     * EF's U+FFFE/U+FFFF go through utf8_decode below). */
    if (c >= 0xE1 && c <= 0xEC && i + 2 < n && (s[i + 1] & 0xC0) == 0x80 && (s[i + 2] & 0xC0) == 0x80)
        return 3;
    len = utf8_decode(s, n, i, &cp, &err);
    if (len == 0) {
        push_utf8_error(L, s, i, err, cp);
        fail_at(L, w, i);
        return 0;
    }
    /* The only code points of three bytes XML 1.0 refuses; surrogates were refused above. */
    if (cp == 0xFFFE || cp == 0xFFFF) {
        fail_char(L, w, i, cp);
        return 0;
    }
    return len;
}

/* Handles the marked byte s[i]: copies it, escapes it, or checks its UTF-8 sequence. Returns the
 * position after it, or 0 with an error message pushed (the buffer then holds garbage, which the
 * caller discards). *run is where the bytes not yet appended start. */
static inline size_t put_marked(lua_State *L, Out *o, const unsigned char *cls, const unsigned char *s,
                                size_t n, size_t i, size_t *run, const Where *w) {
    unsigned char c = s[i];
    size_t len;
    switch (cls[c]) {
    case COPY: return i + 1;
    case MB:
        len = xml_utf8_at(L, s, n, i, w);
        return len ? i + len : 0;
    case ESC:
        out_add(o, (const char *)s + *run, i - *run);
        add_entity(o, c);
        *run = i + 1;
        return i + 1;
    default:
        fail_char(L, w, i, c);
        return 0;
    }
}

/* Appends s escaped by cls after checking UTF-8 and XML 1.0 characters. Returns 0, or 1 with an
 * error message pushed (the buffer then holds garbage, which the caller discards). Plain bytes are
 * appended in runs; blocks of SCAN_BLOCK bytes are scanned at once, and each marked byte in a
 * block is handled in turn (a UTF-8 sequence clears the marks of its continuation bytes). The
 * last, shorter block is scanned from a zero-padded copy, its marks past the end dropped. */
static int put_escaped(lua_State *L, Out *o, const unsigned char *cls, const char *str, size_t n,
                       const Where *w) {
    const unsigned char *s = (const unsigned char *)str;
    const int attr = cls == attr_class;
    size_t i = 0, run = 0;
    while (i < n) {
        unsigned m;
        size_t next;
        if (n - i >= SCAN_BLOCK) {
            m = scan_marks(s + i, attr);
            next = i + SCAN_BLOCK;
        } else {
            unsigned char tail[SCAN_BLOCK] = {0};
            memcpy(tail, s + i, n - i);
            m = scan_marks(tail, attr) & ((1u << (n - i)) - 1);
            next = n;
        }
        while (m) {
            size_t at = i + lowest_bit(m), after = put_marked(L, o, cls, s, n, at, &run, w);
            if (after == 0) return 1;
            if (after >= next) { next = after; break; }
            m &= ~0u << (after - i); /* drop the marks up to and including this sequence */
        }
        i = next;
    }
    out_add(o, str + run, n - run);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* XML names (XML 1.0 fifth edition, NameStartChar / NameChar), without ':' (Namespaces in XML's
 * NCName). Fifth-edition names are a superset of what older parsers (libexpat uses the tables of
 * XML 1.0 second edition) accept outside ASCII; XMPP's names are ASCII in practice. */

/* 2: may start a name, 1: may continue one, 0: neither. */
static const unsigned char ascii_name[128] = {
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    /*   !  "  #  $  %  &  '  (  )  *  +  ,  -  .  / */
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0,
    0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 2,
    0, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0,
};

static int is_name_start(unsigned long c) {
    if (c < 0x80) return ascii_name[c] == 2;
    return (c >= 0xC0 && c <= 0xD6) || (c >= 0xD8 && c <= 0xF6) || (c >= 0xF8 && c <= 0x2FF)
        || (c >= 0x370 && c <= 0x37D) || (c >= 0x37F && c <= 0x1FFF) || (c >= 0x200C && c <= 0x200D)
        || (c >= 0x2070 && c <= 0x218F) || (c >= 0x2C00 && c <= 0x2FEF) || (c >= 0x3001 && c <= 0xD7FF)
        || (c >= 0xF900 && c <= 0xFDCF) || (c >= 0xFDF0 && c <= 0xFFFD) || (c >= 0x10000 && c <= 0xEFFFF);
}

static int is_name_char(unsigned long c) {
    if (c < 0x80) return ascii_name[c] != 0;
    return is_name_start(c) || c == 0xB7 || (c >= 0x300 && c <= 0x36F) || (c >= 0x203F && c <= 0x2040);
}

int xmppsm_starts_name(const char *s, size_t n) {
    unsigned long cp;
    int err = U_OK;
    if (n == 0) return 0;
    if ((unsigned char)s[0] < 0x80) return ascii_name[(unsigned char)s[0]] == 2;
    return utf8_decode((const unsigned char *)s, n, 0, &cp, &err) != 0 && is_name_start(cp);
}

/* Returns NULL when s is an NCName, else pushes nothing and returns why (a static string, or
 * one built in buf). */
static const char *ncname_error(const char *str, size_t n, char *buf, size_t bufsize) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    if (n == 0) return "empty";
    /* ASCII fast path; anything else (or an error) goes through the general loop from i. */
    if (s[0] < 0x80 && ascii_name[s[0]] == 2) {
        i = 1;
        while (i < n && s[i] < 0x80 && ascii_name[s[i]]) i++;
        if (i == n) return NULL;
    }
    while (i < n) {
        unsigned long cp = s[i];
        size_t len = 1;
        if (cp >= 0x80) {
            int err = U_OK;
            len = utf8_decode(s, n, i, &cp, &err);
            if (len == 0) return "invalid UTF-8";
        }
        if (i == 0 ? !is_name_start(cp) : !is_name_char(cp)) {
            if (cp == ':') return "':' is not allowed; for a namespaced attribute use the key ns..'\\1'..name";
            snprintf(buf, bufsize, i == 0 ? "U+%04lX cannot start a name" : "U+%04lX is not allowed in a name", cp);
            return buf;
        }
        i += len;
    }
    return NULL;
}

/* Pushes s quoted for an error message: printable ASCII as is, anything else as \xHH, long
 * strings cut, so a bad name cannot garble the message. */
static void push_quoted(lua_State *L, const char *str, size_t n) {
    const unsigned char *s = (const unsigned char *)str;
    luaL_Buffer b;
    size_t i, lim = n > 60 ? 60 : n;
    luaL_buffinit(L, &b);
    luaL_addchar(&b, '"');
    for (i = 0; i < lim; i++) {
        if (s[i] >= 0x20 && s[i] < 0x7F && s[i] != '"' && s[i] != '\\') luaL_addchar(&b, (char)s[i]);
        else {
            char hex[8];
            snprintf(hex, sizeof hex, "\\x%02X", s[i]);
            luaL_addstring(&b, hex);
        }
    }
    if (lim < n) luaL_addstring(&b, "...");
    luaL_addchar(&b, '"');
    luaL_pushresult(&b);
}

/* ------------------------------------------------------------------------------------------ */
/* The walk. Each element table is at the top of the stack on entry to ser_element; it leaves
 * the stack as it found it on success, and pushes one error message on failure (anything below
 * it is dropped by core.serialize). */

typedef struct {
    lua_State *L;
    Out out;
} Ser;

static const char *type_name(lua_State *L, int idx) {
    return lua_typename(L, lua_type(L, idx));
}

/* A namespace and the generated prefix number it got on the current element. */
typedef struct { const char *ns; size_t len; int id; } Prefix;
#define MAX_PREFIXES 16

/* Writes " name='value'" for every attribute but xmlns. attr table at index ai. */
static int put_attrs(Ser *S, int ai, const char *el) {
    lua_State *L = S->L;
    Prefix pre[MAX_PREFIXES];
    int npre = 0, nextid = 1;
    char why_buf[64];
    lua_pushnil(L);
    while (lua_next(L, ai)) {
        size_t klen, vlen;
        const char *k, *v, *sep = NULL, *local = NULL, *why, *prefix = NULL;
        int plain;
        Where w;
        char pbuf[24];
        if (lua_type(L, -2) != LUA_TSTRING) {
            lua_pushfstring(L, "attribute key of <%s> is a %s, not a string", el, type_name(L, -2));
            return 1;
        }
        k = lua_tolstring(L, -2, &klen);
        if (klen == 5 && memcmp(k, "xmlns", 5) == 0) { lua_pop(L, 1); continue; }
        w.kind = W_ATTR; w.el = el; w.attr = k; w.ns = NULL; w.nslen = 0;
        /* Nearly every key is a plain NCName, which has neither '\1' nor ':': test that first. */
        plain = ncname_error(k, klen, why_buf, sizeof why_buf) == NULL;
        if (!plain) sep = memchr(k, '\1', klen);
        if (sep) {
            /* ns .. "\1" .. local: a prefix is declared on this element for ns. */
            size_t nslen = (size_t)(sep - k);
            local = sep + 1;
            why = ncname_error(local, klen - nslen - 1, why_buf, sizeof why_buf);
            if (why) {
                push_quoted(L, k, klen);
                lua_pushfstring(L, "invalid attribute name %s of <%s>: local name %s",
                                lua_tostring(L, -1), el, why);
                return 1;
            }
            w.attr = local;
            if (nslen == 0) {
                lua_pushfstring(L, "empty namespace in attribute key '\\1%s' of <%s>", local, el);
                return 1;
            }
            if (XMPPSM_IS_LITERAL(k, nslen, XMPPSM_XMLNS_NS)) {
                lua_pushfstring(L, "attribute '%s' of <%s> is in the reserved xmlns namespace", local, el);
                return 1;
            }
            if (lua_type(L, -1) != LUA_TSTRING) {
                lua_pushfstring(L, "attribute '%s' of <%s> is a %s, not a string", local, el,
                                type_name(L, -1));
                return 1;
            }
            if (XMPPSM_IS_LITERAL(k, nslen, XMPPSM_XML_NS)) {
                /* The xml prefix is predeclared and no other prefix may be bound to it. Refuse
                 * the same attribute given both ways, which would be written twice. */
                lua_pushfstring(L, "xml:%s", local);
                lua_rawget(L, ai);
                if (!lua_isnil(L, -1)) {
                    lua_pushfstring(L, "attribute 'xml:%s' of <%s> is given twice (also as '{%s}%s')",
                                    local, el, XMPPSM_XML_NS, local);
                    return 1;
                }
                lua_pop(L, 1);
                prefix = "xml";
            } else {
                int j;
                w.kind = W_ATTRNS;
                for (j = 0; j < npre; j++)
                    if (pre[j].len == nslen && memcmp(pre[j].ns, k, nslen) == 0) break;
                if (j < npre) snprintf(pbuf, sizeof pbuf, "ns%d", pre[j].id);
                else {
                    int id = nextid++;
                    if (npre < MAX_PREFIXES) { pre[npre].ns = k; pre[npre].len = nslen; pre[npre].id = id; npre++; }
                    snprintf(pbuf, sizeof pbuf, "ns%d", id);
                    out_lit(&S->out, " xmlns:");
                    out_add(&S->out, pbuf, strlen(pbuf));
                    out_lit(&S->out, "='");
                    if (put_escaped(L, &S->out, attr_class, k, nslen, &w)) return 1;
                    out_lit(&S->out, "'");
                }
                prefix = pbuf;
                w.kind = W_ATTR;
            }
            w.ns = k; /* checked by now, so printable in a message about the value */
            w.nslen = nslen;
        } else {
            if (plain) why = NULL;
            else if (klen > 4 && memcmp(k, "xml:", 4) == 0) why = ncname_error(k + 4, klen - 4, why_buf, sizeof why_buf);
            else why = ncname_error(k, klen, why_buf, sizeof why_buf);
            if (why) {
                push_quoted(L, k, klen);
                lua_pushfstring(L, "invalid attribute name %s of <%s>: %s", lua_tostring(L, -1), el, why);
                return 1;
            }
            if (lua_type(L, -1) != LUA_TSTRING) {
                lua_pushfstring(L, "attribute '%s' of <%s> is a %s, not a string", k, el, type_name(L, -1));
                return 1;
            }
        }
        v = lua_tolstring(L, -1, &vlen);
        out_lit(&S->out, " ");
        if (prefix) {
            out_add(&S->out, prefix, strlen(prefix));
            out_lit(&S->out, ":");
            out_add(&S->out, local, klen - (size_t)(local - k));
        } else out_add(&S->out, k, klen);
        out_lit(&S->out, "='");
        if (put_escaped(L, &S->out, attr_class, v, vlen, &w)) return 1;
        out_lit(&S->out, "'");
        lua_pop(L, 1);
    }
    return 0;
}

/* A lazy element (its metatable has __xmppsm_materialize) gets its children built first; a
 * compact message (its metatable has __xmppsm_body) is left as it is: returns 1 for it, else 0.
 * Elements share one or two metatables (stanza.metatable), so the last one found plain is kept in
 * SLOT_PLAINMT and is not searched again for every element. */
static int materialize(lua_State *L, int ei) {
    if (!lua_getmetatable(L, ei)) return 0;
    if (lua_rawequal(L, -1, SLOT_PLAINMT)) { lua_pop(L, 1); return 0; }
    lua_pushvalue(L, UV_KBODY);
    if (lua_rawget(L, -2) != LUA_TNIL) {
        lua_pop(L, 2);
        return 1;
    }
    lua_pop(L, 1);
    lua_pushvalue(L, UV_KMAT);
    if (lua_rawget(L, -2) == LUA_TFUNCTION) {
        lua_pushvalue(L, ei);
        lua_call(L, 1, 0);
        lua_pop(L, 1);
    } else {
        lua_pop(L, 1);
        lua_replace(L, SLOT_PLAINMT);
    }
    return 0;
}

/* Text content of element `el` (the string at the top of the stack, kept there while written). */
static int put_text(Ser *S, const char *el) {
    size_t tlen;
    const char *text = lua_tolstring(S->L, -1, &tlen);
    Where w;
    w.kind = W_TEXT; w.el = el; w.attr = NULL; w.ns = NULL; w.nslen = 0;
    return put_escaped(S->L, &S->out, text_class, text, tlen, &w);
}

/* The <body> child of a compact message at ei: ">" and the element, from its __xmppsm_body. */
static int put_compact_body(Ser *S, int ei, const char *name) {
    lua_State *L = S->L;
    lua_pushvalue(L, UV_KBODY);
    if (lua_rawget(L, ei) != LUA_TSTRING) {
        lua_pushfstring(L, "the body of compact <%s> is a %s, not a string", name, type_name(L, -1));
        return 1;
    }
    if (lua_rawlen(L, -1) == 0) {
        out_lit(&S->out, "><body/>");
    } else {
        out_lit(&S->out, "><body>");
        if (put_text(S, "body")) return 1;
        out_lit(&S->out, "</body>");
    }
    lua_pop(L, 1);
    return 0;
}

static int ser_element(Ser *S, int depth, const char *ns, size_t nslen, const char *parent, lua_Integer pos) {
    lua_State *L = S->L;
    int ei = lua_gettop(L), ai, t;
    size_t namelen, i;
    const char *name, *why;
    int open, compact;
    char why_buf[64];

    luaL_checkstack(L, 12, "element nesting");
    compact = materialize(L, ei);
    /* name */
    lua_pushvalue(L, UV_KNAME);
    if (lua_rawget(L, ei) != LUA_TSTRING) {
        if (parent) lua_pushfstring(L, "element name is a %s, not a string (child %I of <%s>)",
                                    type_name(L, -1), pos, parent);
        else lua_pushfstring(L, "element name is a %s, not a string", type_name(L, -1));
        return 1;
    }
    name = lua_tolstring(L, -1, &namelen);
    why = ncname_error(name, namelen, why_buf, sizeof why_buf);
    if (why) {
        push_quoted(L, name, namelen);
        if (parent) lua_pushfstring(L, "invalid element name %s: %s (child %I of <%s>)",
                                    lua_tostring(L, -1), why, pos, parent);
        else lua_pushfstring(L, "invalid element name %s: %s", lua_tostring(L, -1), why);
        return 1;
    }
    if (depth > MAX_DEPTH) {
        lua_pushfstring(L, "elements nested deeper than %d (a cycle?) at <%s>", MAX_DEPTH, name);
        return 1;
    }
    out_lit(&S->out, "<");
    out_add(&S->out, name, namelen);

    /* attributes; xmlns first, and only where it changes the namespace in scope */
    lua_pushvalue(L, UV_KATTR);
    t = lua_rawget(L, ei);
    ai = ei + 2; /* above the name */
    if (t == LUA_TTABLE) {
        lua_pushvalue(L, UV_KXMLNS);
        t = lua_rawget(L, ai);
        if (t == LUA_TSTRING) {
            size_t xlen;
            const char *x = lua_tolstring(L, -1, &xlen);
            if (xlen != nslen || memcmp(x, ns, xlen) != 0) {
                Where w;
                if (XMPPSM_IS_LITERAL(x, xlen, XMPPSM_XML_NS) || XMPPSM_IS_LITERAL(x, xlen, XMPPSM_XMLNS_NS)) {
                    lua_pushfstring(L, "<%s> cannot be in the reserved namespace %s", name, x);
                    return 1;
                }
                w.kind = W_XMLNS; w.el = name; w.attr = NULL; w.ns = NULL; w.nslen = 0;
                out_lit(&S->out, " xmlns='");
                if (put_escaped(L, &S->out, attr_class, x, xlen, &w)) return 1;
                out_lit(&S->out, "'");
                ns = x; /* stays alive: it is on the stack until this element is done */
                nslen = xlen;
            }
        } else if (t != LUA_TNIL) {
            lua_pushfstring(L, "xmlns of <%s> is a %s, not a string", name, type_name(L, -1));
            return 1;
        }
        if (put_attrs(S, ai, name)) return 1;
    } else if (t != LUA_TNIL) {
        lua_pushfstring(L, "attr of <%s> is a %s, not a table", name, type_name(L, ai));
        return 1;
    }

    /* children, in array order up to the first nil (as ipairs), after a compact message's body */
    open = compact;
    if (compact && put_compact_body(S, ei, name)) return 1;
    for (i = 1;; i++) {
        t = lua_rawgeti(L, ei, (lua_Integer)i);
        if (t == LUA_TNIL) { lua_pop(L, 1); break; }
        if (!open) { out_lit(&S->out, ">"); open = 1; }
        if (t == LUA_TSTRING) {
            if (put_text(S, name)) return 1;
        } else if (t == LUA_TTABLE) {
            if (ser_element(S, depth + 1, ns, nslen, name, (lua_Integer)i)) return 1;
        } else {
            lua_pushfstring(L, "child %I of <%s> is a %s, not a string or an element table",
                            (lua_Integer)i, name, type_name(L, -1));
            return 1;
        }
        lua_pop(L, 1);
    }
    if (open) {
        out_lit(&S->out, "</");
        out_add(&S->out, name, namelen);
        out_lit(&S->out, ">");
    } else out_lit(&S->out, "/>");
    lua_settop(L, ei);
    return 0;
}

static void ser_init(Ser *S, lua_State *L) {
    S->L = L;
    S->out.L = L;
    S->out.p = S->out.init;
    S->out.len = 0;
    S->out.cap = sizeof S->out.init;
}

/* Serializes the element at index 1 with the namespace at index 2 (or jabber:client) in scope.
 * Returns 0 with the string on top, or 1 with the error message on top. */
static int serialize_arg(lua_State *L) {
    Ser S;
    size_t nslen;
    const char *ns;
    luaL_checktype(L, 1, LUA_TTABLE);
    ns = luaL_optlstring(L, 2, DEFAULT_NS, &nslen);
    lua_settop(L, 2);
    lua_pushnil(L); /* SLOT_OUT: the buffer's userdata once it leaves the C stack */
    lua_pushnil(L); /* SLOT_PLAINMT */
    ser_init(&S, L);
    lua_pushvalue(L, 1);
    if (ser_element(&S, 1, ns, nslen, NULL, 0)) return 1;
    lua_pushlstring(L, S.out.p, S.out.len);
    return 0;
}

/* s, err = core.serialize(element [, ns_in_scope]) */
static int ser_serialize(lua_State *L) {
    if (serialize_arg(L)) {
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    return 1;
}

/* s = core.tostring(element): stanza.metatable's __tostring, in C so tostring(st) runs no Lua
 * function. tostring cannot return nil, err, so an element that cannot be serialized raises
 * "cannot serialize stanza: <why>". */
static int ser_tostring(lua_State *L) {
    lua_settop(L, 1);
    if (serialize_arg(L)) {
        lua_pushliteral(L, "cannot serialize stanza: ");
        lua_insert(L, -2);
        lua_concat(L, 2);
        return lua_error(L);
    }
    return 1;
}

/* s, err = core.escape(text) */
static int ser_escape(lua_State *L) {
    Ser S;
    size_t n, i;
    const char *s;
    Where w;
    luaL_checktype(L, 1, LUA_TSTRING);
    s = lua_tolstring(L, 1, &n);
    lua_settop(L, 1);
    lua_pushnil(L); /* SLOT_OUT is 3: keep slot 2 filled so the index holds */
    lua_pushnil(L);
    /* Nothing to escape is the common case: return the argument itself, no copy. */
    for (i = 0; i < n && attr_class[(unsigned char)s[i]] == COPY; i++) {}
    if (i == n) { lua_settop(L, 1); return 1; }
    ser_init(&S, L);
    w.kind = W_ESCAPE; w.el = NULL; w.attr = NULL; w.ns = NULL; w.nslen = 0;
    if (put_escaped(L, &S.out, attr_class, s, n, &w)) {
        lua_pushnil(L);
        lua_insert(L, -2);
        return 2;
    }
    lua_pushlstring(L, S.out.p, S.out.len);
    return 1;
}

/* Sets field `name` of the table on top to `fn` with the walk's keys as upvalues (UV_KNAME...). */
static void set_walker(lua_State *L, lua_CFunction fn, const char *name) {
    lua_pushliteral(L, "name");
    lua_pushliteral(L, "attr");
    lua_pushliteral(L, "xmlns");
    lua_pushliteral(L, "__xmppsm_materialize");
    lua_pushliteral(L, "__xmppsm_body");
    lua_pushcclosure(L, fn, 5);
    lua_setfield(L, -2, name);
}

void xmppsm_open_serialize(lua_State *L) {
    set_walker(L, ser_serialize, "serialize");
    set_walker(L, ser_tostring, "tostring");
    lua_pushcfunction(L, ser_escape);
    lua_setfield(L, -2, "escape");
}
