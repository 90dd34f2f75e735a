/* Readiness of many descriptors for the event loop (docs/core.md, "Poller").
 *
 * LuaSocket's select() stops at FD_SETSIZE (1024) descriptors and costs O(watched) per call;
 * this poller has no such limit. Two backends behind one API:
 *   - "epoll" (Linux, the default there): registrations live in the kernel, a wait costs
 *     O(ready), so a thousand idle sessions cost nothing per loop step;
 *   - "poll" (everywhere else, or on request): a pollfd array kept here, O(registered) per wait.
 * Both are level-triggered, like select(): a descriptor is reported on every wait while it is
 * ready, so a handler that reads only part of what is there is called again.
 *
 * Layout of a xmppsm.poller userdata:
 *   - the C struct `poller`;
 *   - user value 1: a plain userdata, the array wait() fills (epoll) or the pollfd set (poll);
 *   - user value 2 (poll only): a plain userdata, int slot[fd] = index into the set or -1.
 * Arrays are GC-owned and replaced (never realloc'd) when they grow, so an allocation failure
 * raises with the poller unchanged and nothing leaks. The epoll descriptor is the one resource
 * outside the GC: close(), __close and __gc release it, once. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#ifdef __linux__
#include <sys/epoll.h>
#define HAVE_EPOLL 1
#endif

#include "xmppsm.h"

#define POLLER_MT "xmppsm.poller"
#define UV_ARRAY 1
#define UV_SLOTS 2

#define WANT_READ 1
#define WANT_WRITE 2

/* Most events one epoll_wait() returns; more ready descriptors are reported by the next wait
 * (level-triggered, nothing is lost). */
#define MAX_BATCH 4096
#define MIN_CAP 16

enum backend { BACKEND_EPOLL, BACKEND_POLL };

typedef struct {
    int closed;
    enum backend backend;
    int epfd;      /* epoll: its descriptor; -1 otherwise or once closed */
    size_t count;  /* registered descriptors */
    size_t cap;    /* elements in the user-value-1 array */
    size_t nslots; /* poll: ints in the user-value-2 array */
} poller;

static poller *check_poller(lua_State *L) {
    poller *p = (poller *)luaL_checkudata(L, 1, POLLER_MT);
    if (p->closed) luaL_error(L, "attempt to use a closed xmppsm.poller");
    return p;
}

static int fail_errno(lua_State *L, const char *what, int err) {
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s", what, strerror(err));
    lua_pushinteger(L, err);
    return 3;
}

int xmppsm_check_fd(lua_State *L, int arg) {
    int isint;
    lua_Integer fd;
    if (lua_type(L, arg) != LUA_TNUMBER) luaL_typeerror(L, arg, "integer");
    fd = lua_tointegerx(L, arg, &isint);
    if (!isint) luaL_argerror(L, arg, "number has no integer representation");
    if (fd < 0 || fd > INT_MAX) luaL_argerror(L, arg, "descriptor out of range 0..INT_MAX");
    return (int)fd;
}

/* The array in user value `uv`, after making room for `need` elements of `size` bytes (it
 * doubles; a new userdata replaces the old one, whose first `*cap` elements are copied). */
static void *array_reserve(lua_State *L, int ud, int uv, size_t *cap, size_t need, size_t size) {
    void *old, *fresh;
    size_t ncap;
    lua_getiuservalue(L, ud, uv);
    old = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (need <= *cap) return old;
    ncap = *cap < MIN_CAP ? MIN_CAP : *cap;
    while (ncap < need) ncap *= 2;
    fresh = lua_newuserdatauv(L, ncap * size, 0);
    if (*cap > 0) memcpy(fresh, old, *cap * size);
    lua_setiuservalue(L, ud, uv);
    *cap = ncap;
    return fresh;
}

/* ---- poll backend ------------------------------------------------------------------------ */

static int *poll_slots(lua_State *L, poller *p, int fd) {
    size_t old = p->nslots, i;
    int *slots = (int *)array_reserve(L, 1, UV_SLOTS, &p->nslots, (size_t)fd + 1, sizeof(int));
    for (i = old; i < p->nslots; i++) slots[i] = -1;
    return slots;
}

static int poll_set(lua_State *L, poller *p, int fd, int want) {
    int *slots = poll_slots(L, p, fd);
    struct pollfd *set;
    int slot = slots[fd];
    short events = (short)(((want & WANT_READ) ? POLLIN : 0) | ((want & WANT_WRITE) ? POLLOUT : 0));
    if (slot < 0) {
        if (want == 0) return 0;
        /* epoll_ctl refuses a closed descriptor; do the same here rather than report POLLNVAL. */
        if (fcntl(fd, F_GETFD) == -1) return errno;
        set = (struct pollfd *)array_reserve(L, 1, UV_ARRAY, &p->cap, p->count + 1,
                                             sizeof(struct pollfd));
        set[p->count].fd = fd;
        set[p->count].events = events;
        set[p->count].revents = 0;
        slots[fd] = (int)p->count;
        p->count++;
        return 0;
    }
    lua_getiuservalue(L, 1, UV_ARRAY);
    set = (struct pollfd *)lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (want != 0) {
        set[slot].events = events;
        return 0;
    }
    /* Removal: the last entry fills the hole. */
    p->count--;
    if ((size_t)slot != p->count) {
        set[slot] = set[p->count];
        slots[set[slot].fd] = slot;
    }
    slots[fd] = -1;
    return 0;
}

/* ---- epoll backend ----------------------------------------------------------------------- */

#ifdef HAVE_EPOLL
static int epoll_set(poller *p, int fd, int want) {
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = ((want & WANT_READ) ? EPOLLIN : 0) | ((want & WANT_WRITE) ? EPOLLOUT : 0);
    /* The interest rides along, so wait() can tell which side an error or hang-up wakes. */
    ev.data.u64 = (uint64_t)(unsigned)fd | ((uint64_t)want << 32);
    if (want == 0) {
        if (epoll_ctl(p->epfd, EPOLL_CTL_DEL, fd, &ev) == 0) {
            p->count--;
            return 0;
        }
        /* Not registered, or already closed (which unregistered it): nothing to remove. */
        return (errno == ENOENT || errno == EBADF) ? 0 : errno;
    }
    if (epoll_ctl(p->epfd, EPOLL_CTL_MOD, fd, &ev) == 0) return 0;
    if (errno != ENOENT) return errno;
    if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, fd, &ev) != 0) return errno;
    p->count++;
    return 0;
}
#endif

/* ---- Lua API ----------------------------------------------------------------------------- */

/* p:set(fd, read, write): registers, changes or (both false) removes the interest in fd. */
static int l_set(lua_State *L) {
    poller *p = check_poller(L);
    int fd = xmppsm_check_fd(L, 2);
    int want = (lua_toboolean(L, 3) ? WANT_READ : 0) | (lua_toboolean(L, 4) ? WANT_WRITE : 0);
    int err;
#ifdef HAVE_EPOLL
    if (p->backend == BACKEND_EPOLL)
        err = epoll_set(p, fd, want);
    else
#endif
        err = poll_set(L, p, fd, want);
    if (err != 0) return fail_errno(L, want ? "cannot watch descriptor" : "cannot unwatch descriptor", err);
    lua_pushboolean(L, 1);
    return 1;
}

/* p:remove(fd): the same as p:set(fd, false, false). */
static int l_remove(lua_State *L) {
    lua_settop(L, 2);
    lua_pushboolean(L, 0);
    lua_pushboolean(L, 0);
    return l_set(L);
}

/* Milliseconds for a timeout in seconds, rounded up so a timer is never woken for too early
 * (and spun on); nil or negative: wait for ever. */
static int timeout_ms(lua_State *L, int arg) {
    lua_Number t;
    if (lua_isnoneornil(L, arg)) return -1;
    t = luaL_checknumber(L, arg);
    if (t != t) luaL_argerror(L, arg, "timeout is NaN");
    if (t < 0) return -1;
    t = ceil(t * 1000.0);
    return t >= (lua_Number)INT_MAX ? INT_MAX : (int)t;
}

static int flags_for(int want, int readable, int writable, int failed) {
    int f = (readable ? WANT_READ : 0) | (writable ? WANT_WRITE : 0);
    /* An error or a hang-up makes the next read or write return at once, as select() says. */
    if (failed) f |= want;
    return f & want;
}

/* ready, n = p:wait(timeout [, out]) */
static int l_wait(lua_State *L) {
    poller *p = check_poller(L);
    int ms = timeout_ms(L, 2);
    int n = 0, i, k = 0;
    if (lua_isnoneornil(L, 3)) {
        lua_settop(L, 2);
        lua_newtable(L);
    } else {
        luaL_checktype(L, 3, LUA_TTABLE);
        lua_settop(L, 3);
    }
#ifdef HAVE_EPOLL
    if (p->backend == BACKEND_EPOLL) {
        size_t want_cap = p->count < MIN_CAP ? MIN_CAP : (p->count > MAX_BATCH ? MAX_BATCH : p->count);
        struct epoll_event *evs = (struct epoll_event *)array_reserve(
            L, 1, UV_ARRAY, &p->cap, want_cap, sizeof(struct epoll_event));
        n = epoll_wait(p->epfd, evs, (int)(p->cap > MAX_BATCH ? MAX_BATCH : p->cap), ms);
        if (n < 0) {
            if (errno != EINTR) return fail_errno(L, "epoll_wait", errno);
            n = 0;
        }
        for (i = 0; i < n; i++) {
            uint32_t e = evs[i].events;
            int fd = (int)(evs[i].data.u64 & 0xFFFFFFFFu);
            int want = (int)(evs[i].data.u64 >> 32);
            int f = flags_for(want, (e & EPOLLIN) != 0, (e & EPOLLOUT) != 0,
                              (e & (EPOLLERR | EPOLLHUP)) != 0);
            if (f == 0) continue;
            lua_pushinteger(L, fd);
            lua_rawseti(L, 3, ++k);
            lua_pushinteger(L, f);
            lua_rawseti(L, 3, ++k);
        }
    } else
#endif
    {
        struct pollfd *set;
        lua_getiuservalue(L, 1, UV_ARRAY);
        set = (struct pollfd *)lua_touserdata(L, -1);
        lua_pop(L, 1);
        n = poll(set, (nfds_t)p->count, ms);
        if (n < 0) {
            if (errno != EINTR) return fail_errno(L, "poll", errno);
            n = 0;
        }
        for (i = 0; n > 0 && (size_t)i < p->count; i++) {
            short r = set[i].revents;
            int want, f;
            if (r == 0) continue;
            n--;
            want = ((set[i].events & POLLIN) ? WANT_READ : 0) | ((set[i].events & POLLOUT) ? WANT_WRITE : 0);
            f = flags_for(want, (r & POLLIN) != 0, (r & POLLOUT) != 0,
                          (r & (POLLERR | POLLHUP | POLLNVAL)) != 0);
            if (f == 0) continue;
            lua_pushinteger(L, set[i].fd);
            lua_rawseti(L, 3, ++k);
            lua_pushinteger(L, f);
            lua_rawseti(L, 3, ++k);
        }
    }
    /* A reused table may hold entries of an earlier, longer result: cut them off. */
    for (i = k + 1; lua_rawgeti(L, 3, i) != LUA_TNIL; i++) {
        lua_pop(L, 1);
        lua_pushnil(L);
        lua_rawseti(L, 3, i);
    }
    lua_pop(L, 1);
    lua_pushinteger(L, k / 2);
    return 2;
}

static int l_count(lua_State *L) {
    poller *p = check_poller(L);
    lua_pushinteger(L, (lua_Integer)p->count);
    return 1;
}

static int l_backend(lua_State *L) {
    poller *p = check_poller(L);
    lua_pushstring(L, p->backend == BACKEND_EPOLL ? "epoll" : "poll");
    return 1;
}

/* close, __gc and __close: idempotent. */
static int l_close(lua_State *L) {
    poller *p = (poller *)luaL_checkudata(L, 1, POLLER_MT);
    if (p->closed) return 0;
    p->closed = 1;
    if (p->epfd >= 0) close(p->epfd);
    p->epfd = -1;
    p->count = 0;
    return 0;
}

static int l_tostring(lua_State *L) {
    poller *p = (poller *)luaL_checkudata(L, 1, POLLER_MT);
    if (p->closed)
        lua_pushfstring(L, "xmppsm.poller (closed): %p", (void *)p);
    else
        lua_pushfstring(L, "xmppsm.poller (%s, %d watched): %p",
                        p->backend == BACKEND_EPOLL ? "epoll" : "poll", (int)p->count, (void *)p);
    return 1;
}

/* core.poller([opts]): opts.backend "epoll" (Linux only) or "poll"; the default is the best
 * one available. */
static int l_poller(lua_State *L) {
    poller *p;
    enum backend b;
#ifdef HAVE_EPOLL
    b = BACKEND_EPOLL;
#else
    b = BACKEND_POLL;
#endif
    if (!lua_isnoneornil(L, 1)) {
        luaL_checktype(L, 1, LUA_TTABLE);
        if (lua_getfield(L, 1, "backend") != LUA_TNIL) {
            const char *name = lua_tostring(L, -1);
            if (lua_type(L, -1) != LUA_TSTRING) luaL_argerror(L, 1, "backend must be a string");
            if (strcmp(name, "poll") == 0)
                b = BACKEND_POLL;
#ifdef HAVE_EPOLL
            else if (strcmp(name, "epoll") == 0)
                b = BACKEND_EPOLL;
#endif
            else
                luaL_argerror(L, 1, lua_pushfstring(L, "backend %s is not available", name));
        }
        lua_pop(L, 1);
    }
    p = (poller *)lua_newuserdatauv(L, sizeof *p, 2);
    memset(p, 0, sizeof *p);
    p->backend = b;
    p->epfd = -1;
    p->closed = 1; /* until the descriptor exists, so __gc has nothing to release */
    luaL_setmetatable(L, POLLER_MT);
    lua_newuserdatauv(L, 0, 0);
    lua_setiuservalue(L, -2, UV_ARRAY);
    lua_newuserdatauv(L, 0, 0);
    lua_setiuservalue(L, -2, UV_SLOTS);
#ifdef HAVE_EPOLL
    if (b == BACKEND_EPOLL) {
        p->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (p->epfd < 0) return fail_errno(L, "epoll_create1", errno);
    }
#endif
    p->closed = 0;
    return 1;
}

static const luaL_Reg poller_methods[] = {
    {"set", l_set},     {"remove", l_remove},   {"wait", l_wait},   {"count", l_count},
    {"backend", l_backend}, {"close", l_close}, {NULL, NULL}};

static const luaL_Reg poller_meta[] = {
    {"__gc", l_close}, {"__close", l_close}, {"__tostring", l_tostring}, {NULL, NULL}};

void xmppsm_open_poll(lua_State *L) {
    if (luaL_newmetatable(L, POLLER_MT)) {
        luaL_setfuncs(L, poller_meta, 0);
        luaL_newlib(L, poller_methods);
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    lua_pushcfunction(L, l_poller);
    lua_setfield(L, -2, "poller");
}
