/* Files: what Lua's io library cannot do and the persistence store needs (xmppsm.store):
 * durable writes (fsync), an exclusive lock, private permissions, close-on-exec descriptors,
 * and a fast checksum for journal records. */
#define _DEFAULT_SOURCE /* flock, O_CLOEXEC, O_DIRECTORY, fdopen, fileno */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "xmppsm.h"

/* The luaL_Stream behind a Lua file handle; misuse (not a file, a closed file) raises. */
static FILE *check_stream(lua_State *L, int idx) {
    luaL_Stream *p = (luaL_Stream *)luaL_checkudata(L, idx, LUA_FILEHANDLE);
    if (p->closef == NULL || p->f == NULL)
        luaL_argerror(L, idx, "attempt to use a closed file");
    return p->f;
}

/* check_stream, for a function that keeps the file handles' metatable at upvalue `mt` (nil when
 * `io` was not loaded before us): a full userdata with that metatable is taken without
 * luaL_checkudata's registry lookup by name; anything else goes through check_stream. */
static FILE *check_stream_fast(lua_State *L, int idx, int mt) {
    if (lua_type(L, idx) == LUA_TUSERDATA && lua_getmetatable(L, idx)) {
        int same = lua_rawequal(L, -1, mt);
        lua_pop(L, 1);
        if (same) {
            luaL_Stream *p = (luaL_Stream *)lua_touserdata(L, idx);
            if (p->closef != NULL && p->f != NULL)
                return p->f;
        }
    }
    return check_stream(L, idx);
}

static int push_errno(lua_State *L, const char *what, const char *name, int err) {
    lua_pushnil(L);
    if (name != NULL)
        lua_pushfstring(L, "%s %s: %s", what, name, strerror(err));
    else
        lua_pushfstring(L, "%s: %s", what, strerror(err));
    lua_pushinteger(L, err);
    return 3;
}

/* core.fsync(file): the bytes written through this handle reach the disk before it returns. */
static int file_fsync(lua_State *L) {
    FILE *f = check_stream(L, 1);
    if (fflush(f) != 0)
        return push_errno(L, "fflush", NULL, errno);
    if (fsync(fileno(f)) != 0)
        return push_errno(L, "fsync", NULL, errno);
    lua_pushboolean(L, 1);
    return 1;
}

/* core.lock(file): flock, not fcntl, because fcntl locks belong to the process: a second
 * open of the same file in the same process would "succeed", and closing any descriptor of
 * the file would silently drop the lock. flock locks belong to the open file description, so
 * two store objects in one process exclude each other as two processes do. */
static int file_lock(lua_State *L) {
    FILE *f = check_stream(L, 1);
    int rc;
    do {
        rc = flock(fileno(f), LOCK_EX | LOCK_NB);
    } while (rc != 0 && errno == EINTR);
    if (rc != 0) {
        if (errno == EWOULDBLOCK) {
            lua_pushnil(L);
            lua_pushliteral(L, "locked");
            return 2;
        }
        return push_errno(L, "flock", NULL, errno);
    }
    lua_pushboolean(L, 1);
    return 1;
}

/* core.fsync_dir(path): makes a rename or a file creation in the directory durable. */
static int file_fsync_dir(lua_State *L) {
    const char *path = luaL_checkstring(L, 1);
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return push_errno(L, "open", path, errno);
    if (fsync(fd) != 0) {
        int err = errno;
        close(fd);
        return push_errno(L, "fsync", path, err);
    }
    close(fd);
    lua_pushboolean(L, 1);
    return 1;
}

/* closef of the handles made by core.open_file; io.close and __gc call it once. */
static int stream_close(lua_State *L) {
    luaL_Stream *p = (luaL_Stream *)luaL_checkudata(L, 1, LUA_FILEHANDLE);
    int ok = fclose(p->f) == 0;
    return luaL_fileresult(L, ok, NULL);
}

/* core.open_file(path, mode [, perm]): a standard Lua file handle, opened close-on-exec (a
 * child started with os.execute or io.popen must not inherit it: an inherited lock file
 * would keep the lock alive after we exit) and created with `perm` (default 0600). */
static int file_open(lua_State *L) {
    static const struct { const char *mode; int flags; } modes[] = {
        { "r", O_RDONLY },
        { "r+", O_RDWR },
        { "w", O_WRONLY | O_CREAT | O_TRUNC },
        { "w+", O_RDWR | O_CREAT | O_TRUNC },
        { "a", O_WRONLY | O_CREAT | O_APPEND },
        { "a+", O_RDWR | O_CREAT | O_APPEND },
    };
    const char *path = luaL_checkstring(L, 1);
    const char *mode = luaL_checkstring(L, 2);
    lua_Integer perm = luaL_optinteger(L, 3, 0600);
    int flags = -1;
    size_t i;
    for (i = 0; i < sizeof modes / sizeof modes[0]; i++) {
        if (strcmp(mode, modes[i].mode) == 0) {
            flags = modes[i].flags;
            break;
        }
    }
    luaL_argcheck(L, flags >= 0, 2, "mode must be one of r, r+, w, w+, a, a+");
    luaL_argcheck(L, perm >= 0 && perm <= 07777, 3, "permission bits out of range");

    /* The userdata first: were it to fail for lack of memory, no descriptor would leak. With
     * closef NULL the io library treats it as closed until fdopen succeeds. */
    luaL_Stream *p = (luaL_Stream *)lua_newuserdatauv(L, sizeof(luaL_Stream), 0);
    p->f = NULL;
    p->closef = NULL;
    luaL_setmetatable(L, LUA_FILEHANDLE);

    int fd;
    do {
        fd = open(path, flags | O_CLOEXEC, (mode_t)perm);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return push_errno(L, "open", path, errno);
    p->f = fdopen(fd, mode);
    if (p->f == NULL) {
        int err = errno;
        close(fd);
        return push_errno(L, "fdopen", path, err);
    }
    p->closef = stream_close;
    return 1;
}

/* core.mkdirs(path [, perm]): creates `path` and its missing parents with `perm` (default
 * 0700), like mkdir -p; existing directories keep their permissions. */
static int file_mkdirs(lua_State *L) {
    size_t len;
    const char *path = luaL_checklstring(L, 1, &len);
    lua_Integer perm = luaL_optinteger(L, 2, 0700);
    luaL_argcheck(L, len > 0, 1, "empty path");
    luaL_argcheck(L, strlen(path) == len, 1, "path contains a zero byte");
    luaL_argcheck(L, perm >= 0 && perm <= 07777, 2, "permission bits out of range");

    /* Scratch copy owned by the GC, cut at each '/' in turn. */
    char *buf = (char *)lua_newuserdatauv(L, len + 1, 0);
    memcpy(buf, path, len + 1);
    size_t i;
    for (i = 1; i <= len; i++) {
        if (i < len && buf[i] != '/')
            continue;
        if (buf[i - 1] == '/') /* "//" or a trailing '/' */
            continue;
        char saved = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, (mode_t)perm) != 0 && errno != EEXIST)
            return push_errno(L, "mkdir", buf, errno);
        buf[i] = saved;
    }
    struct stat st;
    if (stat(path, &st) != 0)
        return push_errno(L, "stat", path, errno);
    if (!S_ISDIR(st.st_mode))
        return push_errno(L, "mkdir", path, ENOTDIR);
    lua_pushboolean(L, 1);
    return 1;
}

/* Continues a CRC-32 (ISO-HDLC, as zlib) over n more bytes; start with 0xFFFFFFFF, end with ^. */
/* CRC-32 (ISO-HDLC, as zlib), "slicing by 8": eight tables, eight bytes per step. A record is
 * checksummed for every stanza sent, so this is on the send path. `t` holds 8 x 256 entries:
 * t[0] is the classic byte table, t[k][n] is t[k-1][n] advanced by one more zero byte. */
static uint32_t crc32_update(const uint32_t *t, uint32_t crc, const unsigned char *s, size_t n) {
    while (n >= 8) {
        uint32_t lo = crc ^ ((uint32_t)s[0] | (uint32_t)s[1] << 8 | (uint32_t)s[2] << 16 | (uint32_t)s[3] << 24);
        uint32_t hi = (uint32_t)s[4] | (uint32_t)s[5] << 8 | (uint32_t)s[6] << 16 | (uint32_t)s[7] << 24;
        crc = t[7 * 256 + (lo & 0xFFu)] ^ t[6 * 256 + ((lo >> 8) & 0xFFu)] ^
              t[5 * 256 + ((lo >> 16) & 0xFFu)] ^ t[4 * 256 + (lo >> 24)] ^
              t[3 * 256 + (hi & 0xFFu)] ^ t[2 * 256 + ((hi >> 8) & 0xFFu)] ^
              t[1 * 256 + ((hi >> 16) & 0xFFu)] ^ t[hi >> 24];
        s += 8;
        n -= 8;
    }
    for (size_t k = 0; k < n; k++)
        crc = t[(crc ^ s[k]) & 0xFFu] ^ (crc >> 8);
    return crc;
}

static void put_le32(unsigned char *w, uint32_t v) {
    w[0] = (unsigned char)v;
    w[1] = (unsigned char)(v >> 8);
    w[2] = (unsigned char)(v >> 16);
    w[3] = (unsigned char)(v >> 24);
}

/* The bytes of argument `idx` of write_record: a string as it is, or a number (a queued
 * stanza's stamp) as the 8-byte little-endian double string.pack("<d", x) makes. */
static const unsigned char *record_part(lua_State *L, int idx, unsigned char *num, size_t *len) {
    if (lua_type(L, idx) == LUA_TNUMBER) {
        union { double d; uint64_t u; } v;
        v.d = (double)lua_tonumber(L, idx);
        for (int k = 0; k < 8; k++)
            num[k] = (unsigned char)(v.u >> (8 * k));
        *len = 8;
        return num;
    }
    return (const unsigned char *)luaL_checklstring(L, idx, len);
}

/* Records up to this size are assembled on the stack and handed to stdio in one piece. */
#define RECORD_BUFFER 2048

/* core.write_record(file, rtype, a [, b [, flush]]) -> true | nil, err, errno
 * Writes one record of xmppsm.store's journal (format in lua/xmppsm/store.lua): the payload
 * length (u32 LE), rtype (u8) and their CRC-32, the payload a .. b, and its CRC-32; through the
 * handle's stdio buffer, as file:write would, then flushes it when `flush` is true. `a` may be
 * a number, written as an 8-byte little-endian double. In C because a record is written for
 * every stanza sent: this spares the payload's concatenation, the strings of the parts and a
 * separate flush call. */
static int file_write_record(lua_State *L) {
    const uint32_t *table = (const uint32_t *)lua_touserdata(L, lua_upvalueindex(1));
    FILE *f = check_stream_fast(L, 1, lua_upvalueindex(2)); /* once per stanza sent */
    lua_Integer rtype = luaL_checkinteger(L, 2);
    size_t alen, blen = 0;
    unsigned char num[8];
    luaL_argcheck(L, !(lua_type(L, 3) == LUA_TNUMBER && lua_type(L, 4) == LUA_TNUMBER), 4,
                  "only one part may be a number");
    const unsigned char *a = record_part(L, 3, num, &alen);
    const unsigned char *b = lua_isnoneornil(L, 4) ? (const unsigned char *)"" : record_part(L, 4, num, &blen);
    int flush = lua_toboolean(L, 5);
    unsigned char head[9], tail[4];
    luaL_argcheck(L, rtype >= 0 && rtype <= 255, 2, "record type out of range 0..255");
    luaL_argcheck(L, alen <= 0xFFFFFFFFu && blen <= 0xFFFFFFFFu - alen, 3, "record too large");
    put_le32(head, (uint32_t)(alen + blen));
    head[4] = (unsigned char)rtype;
    put_le32(head + 5, crc32_update(table, 0xFFFFFFFFu, head, 5) ^ 0xFFFFFFFFu);
    put_le32(tail, crc32_update(table, crc32_update(table, 0xFFFFFFFFu, a, alen), b, blen) ^ 0xFFFFFFFFu);
    errno = 0;
    size_t total = sizeof head + alen + blen + sizeof tail;
    int ok;
    if (total <= RECORD_BUFFER) {
        /* Most records (a stanza sent): one fwrite instead of four, each taking stdio's lock. */
        unsigned char buf[RECORD_BUFFER];
        memcpy(buf, head, sizeof head);
        memcpy(buf + sizeof head, a, alen);
        memcpy(buf + sizeof head + alen, b, blen);
        memcpy(buf + sizeof head + alen + blen, tail, sizeof tail);
        ok = fwrite(buf, 1, total, f) == total;
    } else {
        ok = fwrite(head, 1, sizeof head, f) == sizeof head && fwrite(a, 1, alen, f) == alen &&
             fwrite(b, 1, blen, f) == blen && fwrite(tail, 1, sizeof tail, f) == sizeof tail;
    }
    if (!ok || (flush && fflush(f) != 0))
        return push_errno(L, "write", "record", errno ? errno : EIO);
    lua_pushboolean(L, 1);
    return 1;
}

/* core.crc32(s [, i [, j]]): CRC-32 (ISO-HDLC, as zlib) of s:sub(i, j), an integer. The range
 * lets a reader check a record in place without copying it out of the file's contents. */
static int file_crc32(lua_State *L) {
    const uint32_t *table = (const uint32_t *)lua_touserdata(L, lua_upvalueindex(1));
    size_t len;
    const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
    lua_Integer i = luaL_optinteger(L, 2, 1);
    lua_Integer j = luaL_optinteger(L, 3, -1);
    lua_Integer n = (lua_Integer)len;
    /* string.sub's rules: negative counts from the end, out-of-range is clamped. */
    if (i < 0)
        i = (i < -n) ? 1 : n + i + 1;
    else if (i == 0)
        i = 1;
    if (j < 0)
        j = (j < -n) ? 0 : n + j + 1;
    else if (j > n)
        j = n;
    uint32_t crc = 0xFFFFFFFFu;
    if (j >= i)
        crc = crc32_update(table, crc, s + i - 1, (size_t)(j - i + 1));
    lua_pushinteger(L, (lua_Integer)(crc ^ 0xFFFFFFFFu));
    return 1;
}

void xmppsm_open_file(lua_State *L) {
    static const luaL_Reg funcs[] = {
        { "fsync", file_fsync },
        { "lock", file_lock },
        { "fsync_dir", file_fsync_dir },
        { "open_file", file_open },
        { "mkdirs", file_mkdirs },
        { NULL, NULL },
    };
    luaL_setfuncs(L, funcs, 0);

    /* The CRC tables live in a userdata upvalue: no global state shared between Lua states. */
    uint32_t *table = (uint32_t *)lua_newuserdatauv(L, 8 * 256 * sizeof(uint32_t), 0);
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        table[n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            table[k * 256 + n] = (table[(k - 1) * 256 + n] >> 8) ^ table[table[(k - 1) * 256 + n] & 0xFFu];
    lua_pushvalue(L, -1);
    lua_pushcclosure(L, file_crc32, 1);
    lua_setfield(L, -3, "crc32");
    luaL_getmetatable(L, LUA_FILEHANDLE); /* nil when io is not loaded: then never equal */
    lua_pushcclosure(L, file_write_record, 2);
    lua_setfield(L, -2, "write_record");
}
