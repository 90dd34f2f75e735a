/* XEP-0198 counters and the outbound queue of unacknowledged stanzas (docs/core.md).
 *
 * Layout of a xmppsm.queue userdata:
 *   - the C struct `queue` (counters, limits, ring geometry);
 *   - user value 1: a Lua table with two array slots per ring slot i (0-based):
 *     [2i+1] the raw string, [2i+2] the caller's obj (nil when none);
 *   - user value 2: a plain userdata holding the ring of C records {stamp};
 *   - user value 3: nil until the first push with a note, then a table with one array slot per
 *     ring slot, [i+1] the item's note: held strongly even when objs are weak (Stream
 *     Management keeps each send's outcome callback there).
 * An item's byte size is its raw string's length, read back when the item goes.
 * Both live in GC-owned memory, so a Lua error anywhere (out of memory included) leaks nothing
 * and collectgarbage("count") sees the queue's whole footprint. The value table is created at
 * the ring's capacity and only integer keys inside it are ever set, so it never rehashes and a
 * push creates no Lua table.
 *
 * Counters: `acked` is the last h the peer acknowledged, `pushed` the seq of the last stanza
 * queued. Everything in between was sent and is unacknowledged; `count` of those are still held
 * (the oldest ones may have been dropped by clear()). All counter arithmetic is uint32_t, so it
 * wraps at 2^32 exactly as XEP-0198 §4 says. */
#include <limits.h>
#include <stdint.h>
#include <string.h>

#include "xmppsm.h"

#define QUEUE_MT "xmppsm.queue"
/* Registry key of the metatable {__mode = "v"} given to the value table of a weak queue. */
#define WEAK_VALUES_MT "xmppsm.queue.weak_values"

#define UV_VALUES 1
#define UV_RING 2
#define UV_NOTES 3

#define H_MAX 0xFFFFFFFFu
/* Smallest ring once anything was pushed: shrinking below it would only churn allocations. */
#define MIN_CAP ((size_t)16)
/* A ring never shrinks below this (40 KiB with its value table): a client that sends bursts of
 * up to a thousand stanzas, each acknowledged as a whole, would otherwise shrink to MIN_CAP and
 * grow back, copying every item, once per burst. Larger rings still shrink. */
#define KEEP_CAP ((size_t)1024)
/* Capacities are at most max_items, at most 2^29, so the value table (2 slots per item) and an
 * ack's result table (3 slots per item) stay inside an int and Lua's array size limit. */
#define MAX_ITEMS_LIMIT ((lua_Integer)1 << 29)
#define DEFAULT_MAX_ITEMS 10000
#define DEFAULT_MAX_BYTES ((lua_Integer)16 * 1024 * 1024)

typedef struct {
    double stamp;
} qrec;

typedef struct {
    qrec *ring;  /* points into user value 2; NULL when cap == 0 or closed */
    size_t cap;  /* slots in the ring; 0 before the first push and once closed */
    size_t head; /* ring index of the oldest item */
    size_t count;
    uint64_t bytes;
    uint64_t max_bytes;
    size_t max_items;
    uint64_t mods; /* bumped by every change, so each() can detect changes under it */
    uint32_t acked;
    uint32_t pushed;
    int closed;
    int weak;        /* objs are held weakly (option weak_objects) */
    int has_notes;   /* user value 3 is the notes table */
    size_t notes;    /* items holding a note: results carry a notes table only when > 0 */
} queue;

/* ---- counters ---------------------------------------------------------------------------- */

/* A counter argument: misuse (wrong type, out of range) raises, as these come from our own code
 * after parse_h, never straight from the network. */
static uint32_t check_counter(lua_State *L, int arg) {
    int isint;
    lua_Integer v;
    if (lua_type(L, arg) != LUA_TNUMBER)
        luaL_typeerror(L, arg, "integer");
    v = lua_tointegerx(L, arg, &isint);
    if (!isint)
        luaL_argerror(L, arg, "number has no integer representation");
    if (v < 0 || v > (lua_Integer)H_MAX)
        luaL_argerror(L, arg, "counter out of range 0..4294967295");
    return (uint32_t)v;
}

static int fail(lua_State *L, const char *msg) {
    lua_pushnil(L);
    lua_pushstring(L, msg);
    return 2;
}

/* Strict xs:unsignedInt: digits only (leading zeros are allowed by the XML Schema lexical
 * space), no sign, no blanks, at most 2^32-1. Anything else is the peer's fault: nil, err. */
static int l_parse_h(lua_State *L) {
    size_t len, i;
    const char *s;
    uint64_t v = 0;
    luaL_checktype(L, 1, LUA_TSTRING);
    s = lua_tolstring(L, 1, &len);
    if (len == 0)
        return fail(L, "invalid h: empty");
    for (i = 0; i < len; i++)
        if (s[i] < '0' || s[i] > '9')
            return fail(L, "invalid h: not a string of decimal digits");
    for (i = 0; i < len; i++) {
        v = v * 10 + (uint64_t)(s[i] - '0');
        if (v > H_MAX) /* checked per digit, so v never overflows however long s is */
            return fail(L, "invalid h: greater than 4294967295");
    }
    lua_pushinteger(L, (lua_Integer)v);
    return 1;
}

static int l_h_add(lua_State *L) {
    uint32_t h = check_counter(L, 1);
    lua_Integer n = luaL_checkinteger(L, 2);
    /* Reduce n mod 2^32 in unsigned arithmetic: also right for negative n. */
    lua_pushinteger(L, (lua_Integer)(uint32_t)(h + (uint32_t)(lua_Unsigned)n));
    return 1;
}

static int l_h_diff(lua_State *L) {
    uint32_t a = check_counter(L, 1);
    uint32_t b = check_counter(L, 2);
    lua_pushinteger(L, (lua_Integer)(uint32_t)(a - b));
    return 1;
}

/* ---- construction and storage ------------------------------------------------------------ */

static lua_Integer opt_limit(lua_State *L, int arg, const char *name, lua_Integer def,
                             lua_Integer max) {
    int isint;
    lua_Integer v;
    lua_getfield(L, arg, name);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return def;
    }
    if (lua_type(L, -1) != LUA_TNUMBER)
        luaL_argerror(L, arg, lua_pushfstring(L, "option %s: integer expected, got %s", name,
                                              luaL_typename(L, -1)));
    v = lua_tointegerx(L, -1, &isint);
    if (!isint || v < 1 || v > max)
        luaL_argerror(L, arg, lua_pushfstring(L, "option %s: integer 1..%I expected", name, max));
    lua_pop(L, 1);
    return v;
}

static queue *new_queue(lua_State *L, int opts) {
    lua_Integer max_items = DEFAULT_MAX_ITEMS, max_bytes = DEFAULT_MAX_BYTES;
    int weak = 0;
    queue *q;
    if (!lua_isnoneornil(L, opts)) {
        luaL_checktype(L, opts, LUA_TTABLE);
        max_items = opt_limit(L, opts, "max_items", DEFAULT_MAX_ITEMS, MAX_ITEMS_LIMIT);
        max_bytes = opt_limit(L, opts, "max_bytes", DEFAULT_MAX_BYTES, LUA_MAXINTEGER);
        lua_getfield(L, opts, "weak_objects");
        weak = lua_toboolean(L, -1);
        lua_pop(L, 1);
    }
    q = (queue *)lua_newuserdatauv(L, sizeof *q, 3);
    memset(q, 0, sizeof *q);
    q->ring = NULL;
    q->max_items = (size_t)max_items;
    q->max_bytes = (uint64_t)max_bytes;
    q->weak = weak;
    luaL_setmetatable(L, QUEUE_MT);
    return q;
}

/* The queue at argument 1, open. The methods hold the queue metatable as their upvalue:
 * comparing with it is luaL_checkudata's test without its registry lookup by name (a string
 * interned and compared on every call, more than the rest of push, which runs per stanza). */
static queue *check_queue(lua_State *L) {
    queue *q = lua_touserdata(L, 1);
    if (q == NULL || !lua_getmetatable(L, 1) || !lua_rawequal(L, -1, lua_upvalueindex(1)))
        luaL_typeerror(L, 1, QUEUE_MT);
    lua_pop(L, 1);
    if (q->closed)
        luaL_error(L, "attempt to use a closed " QUEUE_MT);
    return q;
}

/* The ring index of the item `k` places after the oldest (k <= cap, head < cap). Any capacity
 * works: no power of two, whose mask would cost up to half the ring in unused slots. */
static size_t slot(const queue *q, size_t k) {
    size_t i = q->head + k;
    return i >= q->cap ? i - q->cap : i;
}

/* Pushes a new ring userdata, value table and notes table (nil when the queue has none) for
 * `cap` slots. Every resize allocates here first, before the queue changes, so an out-of-memory
 * error leaves the queue as it was. */
static qrec *alloc_storage(lua_State *L, const queue *q, size_t cap) {
    qrec *r;
    if (cap > SIZE_MAX / sizeof(qrec) || cap > (size_t)INT_MAX / 2)
        luaL_error(L, "queue capacity too large");
    r = (qrec *)lua_newuserdatauv(L, cap * sizeof(qrec), 0);
    lua_createtable(L, (int)(2 * cap), 0);
    /* Weak values: a collector clears only objects (tables), never the raw strings. */
    if (q->weak)
        luaL_setmetatable(L, WEAK_VALUES_MT);
    if (q->has_notes)
        lua_createtable(L, (int)cap, 0);
    else
        lua_pushnil(L);
    return r;
}

/* Moves slot `from` of the table at index `ot` to slot `to` of the table at `nt`. */
static void move_slot(lua_State *L, int ot, lua_Integer from, int nt, lua_Integer to) {
    lua_rawgeti(L, ot, from);
    lua_rawseti(L, nt, to);
}

/* Moves items [from, count) into the storage alloc_storage pushed (ring, value table, notes on the
 * top of the stack), pops it into the user values, and drops items [0, from), which the caller
 * has already taken. Raises nothing: only rawget/rawset inside preallocated arrays. */
static void install_storage(lua_State *L, queue *q, qrec *nr, size_t cap, size_t from) {
    int nn = lua_gettop(L), nt = nn - 1, ot, on;
    size_t k;
    if (q->count > from) {
        lua_getiuservalue(L, 1, UV_VALUES);
        ot = lua_gettop(L);
        lua_getiuservalue(L, 1, UV_NOTES);
        on = lua_gettop(L);
        for (k = from; k < q->count; k++) {
            size_t oi = slot(q, k);
            lua_Integer ni = (lua_Integer)(k - from);
            nr[ni] = q->ring[oi];
            move_slot(L, ot, (lua_Integer)(2 * oi + 1), nt, 2 * ni + 1);
            move_slot(L, ot, (lua_Integer)(2 * oi + 2), nt, 2 * ni + 2);
            if (q->has_notes)
                move_slot(L, on, (lua_Integer)(oi + 1), nn, ni + 1);
        }
        lua_pop(L, 2);
    }
    lua_setiuservalue(L, 1, UV_NOTES);
    lua_setiuservalue(L, 1, UV_VALUES);
    lua_setiuservalue(L, 1, UV_RING);
    q->ring = nr;
    q->cap = cap;
    q->head = 0;
    q->count -= from;
}

/* A full ring grows by half, never past max_items: at most a third of it stands empty after
 * growth (a doubling ring: half), and a queue never holds room for more than it may take. */
static size_t grow_target(const queue *q) {
    size_t cap = q->cap ? q->cap + q->cap / 2 : MIN_CAP;
    return cap < q->max_items ? cap : q->max_items;
}

/* Halves while at most a quarter full, not below KEEP_CAP: with growth by half on full, push and
 * ack stay O(1) amortized, and a burst (say 10000 stanzas queued during an outage) does not pin
 * its memory forever. */
static size_t shrink_target(size_t cap, size_t remaining) {
    while (cap > KEEP_CAP && remaining <= cap / 4)
        cap = cap / 2 > KEEP_CAP ? cap / 2 : KEEP_CAP;
    return cap;
}

/* Removes the n oldest items and pushes them as a flat table {raw, obj or false, stamp, ...},
 * then their notes as a table {[i] = note of item i} when any item holds a note, else nil.
 * All allocation happens before the first change, so a memory error leaves the queue intact. */
static void release_oldest(lua_State *L, queue *q, size_t n) {
    size_t newcap = n ? shrink_target(q->cap, q->count - n) : q->cap, i;
    int with_notes = q->notes > 0 && n > 0;
    qrec *nr = NULL;
    int res, notes, tab, ntab;
    luaL_checkstack(L, 10, "queue release");
    lua_createtable(L, (int)(3 * n), 0); /* n <= count <= 2^29: fits an int */
    res = lua_gettop(L);
    if (with_notes)
        lua_createtable(L, (int)n, 0);
    else
        lua_pushnil(L);
    notes = res + 1;
    if (newcap != q->cap)
        nr = alloc_storage(L, q, newcap);
    if (n == 0)
        return;
    lua_getiuservalue(L, 1, UV_VALUES);
    tab = lua_gettop(L);
    lua_getiuservalue(L, 1, UV_NOTES);
    ntab = tab + 1;
    for (i = 0; i < n; i++) {
        size_t oi = slot(q, i);
        lua_Integer r = (lua_Integer)(3 * i);
        lua_rawgeti(L, tab, (lua_Integer)(2 * oi + 1));
        q->bytes -= lua_rawlen(L, -1);
        lua_rawseti(L, res, r + 1);
        if (lua_rawgeti(L, tab, (lua_Integer)(2 * oi + 2)) == LUA_TNIL) {
            lua_pop(L, 1);
            lua_pushboolean(L, 0);
        }
        lua_rawseti(L, res, r + 2);
        lua_pushnumber(L, q->ring[oi].stamp);
        lua_rawseti(L, res, r + 3);
        if (with_notes) {
            if (lua_rawgeti(L, ntab, (lua_Integer)(oi + 1)) != LUA_TNIL)
                q->notes--;
            lua_rawseti(L, notes, (lua_Integer)(i + 1));
        }
        if (nr == NULL) { /* storage kept: drop our references so the GC can take them */
            lua_pushnil(L);
            lua_rawseti(L, tab, (lua_Integer)(2 * oi + 1));
            lua_pushnil(L);
            lua_rawseti(L, tab, (lua_Integer)(2 * oi + 2));
            if (with_notes) {
                lua_pushnil(L);
                lua_rawseti(L, ntab, (lua_Integer)(oi + 1));
            }
        }
    }
    lua_pop(L, 2);
    if (nr != NULL) { /* the old tables and ring become garbage as a whole */
        install_storage(L, q, nr, newcap, n);
    } else {
        q->head = slot(q, n);
        q->count -= n;
    }
    q->mods++;
    lua_settop(L, notes);
}

/* ---- methods ----------------------------------------------------------------------------- */

static int queue_full(lua_State *L, const char *text) {
    lua_pushnil(L);
    lua_pushliteral(L, "queue-full");
    lua_pushstring(L, text);
    return 3;
}

static int q_push(lua_State *L) {
    queue *q = check_queue(L);
    size_t len, idx;
    uint32_t outstanding = q->pushed - q->acked;
    luaL_checktype(L, 2, LUA_TSTRING);
    lua_tolstring(L, 2, &len);
    if (lua_type(L, 4) != LUA_TNUMBER)
        luaL_typeerror(L, 4, "number");
    lua_settop(L, 5);
    if (q->count >= q->max_items)
        return queue_full(L, lua_pushfstring(L, "queue full: %I stanzas queued, max_items is %I",
                                             (lua_Integer)q->count, (lua_Integer)q->max_items));
    if (len > q->max_bytes || q->bytes > q->max_bytes - len)
        return queue_full(L, lua_pushfstring(L,
            "queue full: %I bytes queued, %I more would exceed max_bytes %I",
            (lua_Integer)q->bytes, (lua_Integer)len, (lua_Integer)q->max_bytes));
    /* A 2^32nd unacknowledged stanza would make its seq equal to acked: ambiguous. Reachable only
     * after clear() without acks, since max_items is far below 2^32. */
    if (outstanding == H_MAX)
        return queue_full(L, "queue full: 4294967295 stanzas sent and unacknowledged");
    if (q->count == q->cap) {
        size_t newcap = grow_target(q);
        qrec *nr = alloc_storage(L, q, newcap);
        install_storage(L, q, nr, newcap, 0);
    }
    if (!lua_isnil(L, 5) && !q->has_notes) { /* the first note: the column comes into being */
        lua_createtable(L, (int)q->cap, 0);
        lua_setiuservalue(L, 1, UV_NOTES);
        q->has_notes = 1;
    }
    idx = slot(q, q->count);
    q->ring[idx].stamp = lua_tonumber(L, 4);
    lua_getiuservalue(L, 1, UV_VALUES);
    lua_pushvalue(L, 2);
    lua_rawseti(L, -2, (lua_Integer)(2 * idx + 1));
    lua_pushvalue(L, 3);
    lua_rawseti(L, -2, (lua_Integer)(2 * idx + 2));
    if (!lua_isnil(L, 5)) {
        lua_getiuservalue(L, 1, UV_NOTES);
        lua_pushvalue(L, 5);
        lua_rawseti(L, -2, (lua_Integer)(idx + 1));
        q->notes++;
    }
    q->count++;
    q->bytes += len;
    q->pushed++;
    q->mods++;
    lua_pushinteger(L, (lua_Integer)q->pushed);
    return 1;
}

/* Takes back the item pushed last, as if it had never been pushed: the undo of a push whose
 * caller could not complete the step it belonged to (xmppsm.sm, when the store refuses the
 * stanza). The newest item is the only one no ack can have reached, so only it can go. */
static int q_unpush(lua_State *L) {
    queue *q = check_queue(L);
    size_t idx;
    if (q->count == 0)
        return luaL_error(L, "unpush: the queue holds no stanza");
    idx = slot(q, q->count - 1);
    lua_getiuservalue(L, 1, UV_VALUES);
    lua_rawgeti(L, -1, (lua_Integer)(2 * idx + 1));
    q->bytes -= lua_rawlen(L, -1);
    lua_pop(L, 1);
    lua_pushnil(L);
    lua_rawseti(L, -2, (lua_Integer)(2 * idx + 1));
    lua_pushnil(L);
    lua_rawseti(L, -2, (lua_Integer)(2 * idx + 2));
    if (q->has_notes) {
        lua_getiuservalue(L, 1, UV_NOTES);
        if (lua_rawgeti(L, -1, (lua_Integer)(idx + 1)) != LUA_TNIL)
            q->notes--;
        lua_pushnil(L);
        lua_rawseti(L, -3, (lua_Integer)(idx + 1));
    }
    q->count--;
    q->pushed--;
    q->mods++;
    return 0;
}

static int q_ack(lua_State *L) {
    queue *q = check_queue(L);
    uint32_t h = check_counter(L, 2);
    uint32_t newly = h - q->acked;               /* stanzas this h acknowledges */
    uint32_t outstanding = q->pushed - q->acked; /* sent and not yet acknowledged */
    uint32_t dropped = outstanding - (uint32_t)q->count; /* of those, removed by clear() */
    size_t n;
    if (newly > outstanding) {
        /* Also what a stale h (lower than acked) looks like mod 2^32: neither can be trusted. */
        lua_pushnil(L);
        lua_pushliteral(L, "handled-count-too-high");
        lua_pushfstring(L, "h=%I acknowledges %I stanzas, but only %I were sent since the last "
                           "acknowledged h=%I (last sent %I)",
                        (lua_Integer)h, (lua_Integer)newly, (lua_Integer)outstanding,
                        (lua_Integer)q->acked, (lua_Integer)q->pushed);
        return 3;
    }
    n = newly > dropped ? (size_t)(newly - dropped) : 0;
    lua_settop(L, 2);
    release_oldest(L, q, n);
    if (newly != 0) {
        q->acked = h;
        q->mods++;
    }
    lua_pushinteger(L, (lua_Integer)n);
    lua_insert(L, -2); /* items, n, notes */
    return 3;
}

static int q_clear(lua_State *L) {
    queue *q = check_queue(L);
    size_t n = q->count;
    lua_settop(L, 1);
    release_oldest(L, q, n);
    lua_pushinteger(L, (lua_Integer)n);
    lua_insert(L, -2); /* items, n, notes */
    return 3;
}

static int q_set_counter(lua_State *L) {
    queue *q = check_queue(L);
    uint32_t h = check_counter(L, 2);
    if (q->count != 0)
        return luaL_error(L, "set_counter: the queue holds %I stanzas; it must be empty",
                          (lua_Integer)q->count);
    q->acked = q->pushed = h;
    q->mods++;
    return 0;
}

static int q_acked(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)check_queue(L)->acked);
    return 1;
}

static int q_pushed(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)check_queue(L)->pushed);
    return 1;
}

static int q_count(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)check_queue(L)->count);
    return 1;
}

static int q_bytes(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)check_queue(L)->bytes);
    return 1;
}

static int q_oldest_stamp(lua_State *L) {
    queue *q = check_queue(L);
    if (q->count == 0)
        lua_pushnil(L);
    else
        lua_pushnumber(L, q->ring[q->head].stamp);
    return 1;
}

/* Upvalues: 1 the queue, 2 its mods when the loop started, 3 the offset of the next item. */
static int q_each_step(lua_State *L) {
    queue *q = (queue *)lua_touserdata(L, lua_upvalueindex(1));
    size_t k = (size_t)lua_tointeger(L, lua_upvalueindex(3)), i;
    if (q->closed)
        return luaL_error(L, QUEUE_MT " closed during each()");
    if (q->mods != (uint64_t)lua_tointeger(L, lua_upvalueindex(2)))
        return luaL_error(L, QUEUE_MT " changed during each()");
    if (k >= q->count)
        return 0;
    i = slot(q, k);
    lua_pushinteger(L, (lua_Integer)(k + 1));
    lua_replace(L, lua_upvalueindex(3));
    lua_pushinteger(L, (lua_Integer)(uint32_t)(q->pushed - (uint32_t)q->count + (uint32_t)k + 1u));
    lua_getiuservalue(L, lua_upvalueindex(1), UV_VALUES);
    lua_rawgeti(L, -1, (lua_Integer)(2 * i + 1));
    if (lua_rawgeti(L, -2, (lua_Integer)(2 * i + 2)) == LUA_TNIL) {
        lua_pop(L, 1);
        lua_pushboolean(L, 0);
    }
    lua_remove(L, -3);
    lua_pushnumber(L, q->ring[i].stamp);
    return 4;
}

static int q_each(lua_State *L) {
    queue *q = check_queue(L);
    lua_settop(L, 1);
    lua_pushinteger(L, (lua_Integer)q->mods);
    lua_pushinteger(L, 0);
    lua_pushcclosure(L, q_each_step, 3);
    return 1;
}

/* One close for close(), __close and __gc: everything is GC-owned, so closing only drops the
 * references; later calls find `closed` set and do nothing. */
static int q_close(lua_State *L) {
    queue *q = (queue *)luaL_checkudata(L, 1, QUEUE_MT);
    if (!q->closed) {
        q->closed = 1;
        q->ring = NULL;
        q->cap = q->head = q->count = 0;
        q->bytes = 0;
        q->notes = 0;
        q->has_notes = 0;
        q->mods++;
        lua_pushnil(L);
        lua_setiuservalue(L, 1, UV_NOTES);
        lua_pushnil(L);
        lua_setiuservalue(L, 1, UV_VALUES);
        lua_pushnil(L);
        lua_setiuservalue(L, 1, UV_RING);
    }
    return 0;
}

static int q_tostring(lua_State *L) {
    queue *q = (queue *)luaL_checkudata(L, 1, QUEUE_MT);
    if (q->closed)
        lua_pushfstring(L, QUEUE_MT " (closed): %p", (void *)q);
    else
        lua_pushfstring(L, QUEUE_MT " (%I stanzas): %p", (lua_Integer)q->count, (void *)q);
    return 1;
}

/* ---- snapshot ----------------------------------------------------------------------------
 * Version 1, all integers big-endian:
 *   "XSMQ"  u8 version  u32 acked  u32 pushed  u32 count
 *   count x { f64 stamp (IEEE 754 binary64 bits)  u64 size  size raw bytes }
 *   u64 FNV-1a-64 of every byte before it.
 * FNV-1a maps the state through a bijection for each byte, so any single changed byte changes
 * the checksum; the format keeps no limits, so a snapshot restores under any options. */

#define SNAP_MAGIC "XSMQ"
#define SNAP_VERSION 1
#define SNAP_HEADER 17
#define SNAP_ITEM 16
#define SNAP_SUM 8

typedef char double_is_64_bits[sizeof(double) == 8 ? 1 : -1];

static uint64_t fnv1a64(const unsigned char *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325u;
    while (n--) {
        h ^= *p++;
        h *= 0x100000001b3u;
    }
    return h;
}

static void put_be(unsigned char *p, uint64_t v, int n) {
    while (n--) {
        p[n] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

static uint64_t get_be(const unsigned char *p, int n) {
    uint64_t v = 0;
    int i;
    for (i = 0; i < n; i++)
        v = (v << 8) | p[i];
    return v;
}

static int q_snapshot(lua_State *L) {
    queue *q = check_queue(L);
    luaL_Buffer b;
    unsigned char *p, *start;
    size_t total, k;
    int tab;
    if (q->bytes > SIZE_MAX - SNAP_HEADER - SNAP_SUM ||
        q->count > (SIZE_MAX - SNAP_HEADER - SNAP_SUM - (size_t)q->bytes) / SNAP_ITEM)
        return luaL_error(L, "queue too large for a snapshot");
    total = SNAP_HEADER + q->count * SNAP_ITEM + (size_t)q->bytes + SNAP_SUM;
    lua_settop(L, 1);
    lua_getiuservalue(L, 1, UV_VALUES); /* below the buffer, so our stack use stays balanced */
    tab = lua_gettop(L);
    start = p = (unsigned char *)luaL_buffinitsize(L, &b, total);
    memcpy(p, SNAP_MAGIC, 4);
    p[4] = SNAP_VERSION;
    put_be(p + 5, q->acked, 4);
    put_be(p + 9, q->pushed, 4);
    put_be(p + 13, q->count, 4);
    p += SNAP_HEADER;
    for (k = 0; k < q->count; k++) {
        size_t i = slot(q, k), len;
        const char *raw;
        uint64_t bits;
        memcpy(&bits, &q->ring[i].stamp, sizeof bits);
        put_be(p, bits, 8);
        lua_rawgeti(L, tab, (lua_Integer)(2 * i + 1));
        raw = lua_tolstring(L, -1, &len);
        put_be(p + 8, len, 8);
        memcpy(p + SNAP_ITEM, raw, len);
        lua_pop(L, 1);
        p += SNAP_ITEM + len;
    }
    put_be(p, fnv1a64(start, total - SNAP_SUM), 8);
    luaL_pushresultsize(&b, total);
    return 1;
}

/* Validates the whole snapshot before anything is built; returns an error text or NULL. */
static const char *snap_check(lua_State *L, const unsigned char *s, size_t len, uint64_t *bytes) {
    size_t pos, end, k, count;
    uint32_t acked, pushed;
    if (len < 4)
        return "queue snapshot truncated";
    if (memcmp(s, SNAP_MAGIC, 4) != 0)
        return "not a queue snapshot (bad magic)";
    if (len < 5)
        return "queue snapshot truncated";
    if (s[4] != SNAP_VERSION)
        return lua_pushfstring(L, "unknown queue snapshot version %d", (int)s[4]);
    if (len < SNAP_HEADER + SNAP_SUM)
        return "queue snapshot truncated";
    end = len - SNAP_SUM;
    if (fnv1a64(s, end) != get_be(s + end, 8))
        return "queue snapshot checksum mismatch (corrupt or truncated)";
    acked = (uint32_t)get_be(s + 5, 4);
    pushed = (uint32_t)get_be(s + 9, 4);
    count = (size_t)get_be(s + 13, 4);
    if (count > (size_t)MAX_ITEMS_LIMIT)
        return "queue snapshot inconsistent: too many items";
    if ((uint32_t)(pushed - acked) < count)
        return "queue snapshot inconsistent: more items than unacknowledged stanzas";
    *bytes = 0;
    for (pos = SNAP_HEADER, k = 0; k < count; k++) {
        uint64_t size;
        if (end - pos < SNAP_ITEM)
            return "queue snapshot inconsistent: item list truncated";
        size = get_be(s + pos + 8, 8);
        pos += SNAP_ITEM;
        if (size > end - pos)
            return "queue snapshot inconsistent: item extends past the end";
        pos += (size_t)size;
        *bytes += size;
    }
    if (pos != end)
        return "queue snapshot inconsistent: trailing bytes after the items";
    return NULL;
}

static int l_queue_restore(lua_State *L) {
    size_t len, k, count, pos, cap;
    const unsigned char *s;
    const char *err;
    uint64_t bytes = 0;
    queue *q;
    luaL_checktype(L, 1, LUA_TSTRING);
    s = (const unsigned char *)lua_tolstring(L, 1, &len);
    lua_settop(L, 2);
    q = new_queue(L, 2); /* options first: misuse raises whatever the snapshot holds */
    /* The storage helpers want the queue at index 1; the snapshot string moves to 2 and stays on
     * the stack, which keeps `s` valid. */
    lua_insert(L, 1);
    err = snap_check(L, s, len, &bytes);
    if (err)
        return fail(L, err);
    lua_settop(L, 2);
    count = (size_t)get_be(s + 13, 4);
    if (count > 0) {
        qrec *nr;
        cap = count > MIN_CAP ? count : MIN_CAP;
        nr = alloc_storage(L, q, cap);
        install_storage(L, q, nr, cap, 0);
        lua_getiuservalue(L, 1, UV_VALUES);
        for (pos = SNAP_HEADER, k = 0; k < count; k++) {
            uint64_t bits = get_be(s + pos, 8);
            size_t size = (size_t)get_be(s + pos + 8, 8);
            memcpy(&q->ring[k].stamp, &bits, sizeof bits);
            lua_pushlstring(L, (const char *)s + pos + SNAP_ITEM, size);
            lua_rawseti(L, -2, (lua_Integer)(2 * k + 1));
            pos += SNAP_ITEM + size;
        }
    }
    q->acked = (uint32_t)get_be(s + 5, 4);
    q->pushed = (uint32_t)get_be(s + 9, 4);
    q->count = count;
    q->bytes = bytes;
    lua_settop(L, 1);
    /* No stanza is dropped to fit smaller limits: the queue comes back over them and refuses
     * pushes until acks make room. The caller learns it from the extra results. */
    if (q->count > q->max_items || q->bytes > q->max_bytes) {
        lua_pushliteral(L, "over-limit");
        lua_pushfstring(L, "restored %I stanzas (%I bytes) over the limits max_items %I, "
                           "max_bytes %I",
                        (lua_Integer)q->count, (lua_Integer)q->bytes, (lua_Integer)q->max_items,
                        (lua_Integer)q->max_bytes);
        return 3;
    }
    return 1;
}

/* ---- registration ------------------------------------------------------------------------ */

static int l_queue(lua_State *L) {
    lua_settop(L, 1);
    new_queue(L, 1);
    return 1;
}

static const luaL_Reg queue_methods[] = {
    {"push", q_push},
    {"unpush", q_unpush},
    {"ack", q_ack},
    {"each", q_each},
    {"clear", q_clear},
    {"set_counter", q_set_counter},
    {"acked", q_acked},
    {"pushed", q_pushed},
    {"count", q_count},
    {"bytes", q_bytes},
    {"oldest_stamp", q_oldest_stamp},
    {"snapshot", q_snapshot},
    {"close", q_close},
    {NULL, NULL},
};

static const luaL_Reg queue_meta[] = {
    {"__gc", q_close},
    {"__close", q_close},
    {"__tostring", q_tostring},
    {NULL, NULL},
};

static const luaL_Reg queue_funcs[] = {
    {"parse_h", l_parse_h},
    {"h_add", l_h_add},
    {"h_diff", l_h_diff},
    {"queue", l_queue},
    {"queue_restore", l_queue_restore},
    {NULL, NULL},
};

void xmppsm_open_queue(lua_State *L) {
    if (luaL_newmetatable(L, WEAK_VALUES_MT)) {
        lua_pushliteral(L, "v");
        lua_setfield(L, -2, "__mode");
    }
    lua_pop(L, 1);
    luaL_newmetatable(L, QUEUE_MT);
    luaL_setfuncs(L, queue_meta, 0);
    luaL_newlibtable(L, queue_methods);
    lua_pushvalue(L, -2);
    luaL_setfuncs(L, queue_methods, 1); /* check_queue's upvalue */
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_setfuncs(L, queue_funcs, 0);
}
