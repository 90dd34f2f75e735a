/* Which values are stanzas, and the compact message that stanza.message(attr, body) builds.
 * Both run for every message a program sends. In Lua they took three C calls between them
 * (getmetatable, with its __metatable lookup; type() twice; setmetatable), here one each. */
#include "xmppsm.h"

/* Upvalues of both closures. */
#define UV_STANZA_MT lua_upvalueindex(1)  /* stanza.metatable */
#define UV_COMPACT_MT lua_upvalueindex(2) /* the metatable of compact messages */
#define UV_KMARK lua_upvalueindex(3)      /* "__xmppsm_stanza_mt": a lazy stanza's metatable */
#define UV_KNAME lua_upvalueindex(4)      /* "name" */
#define UV_KMESSAGE lua_upvalueindex(5)   /* "message" */
#define UV_KATTR lua_upvalueindex(6)      /* "attr" */
#define UV_KBODY lua_upvalueindex(7)      /* "__xmppsm_body" */
#define N_UPVALUES 7

/* is_stanza(x): x's metatable (the real one, whatever a __metatable field says) is the stanza
 * metatable, the compact message one, or names the stanza metatable as a lazy stanza's does. */
static int kinds_is_stanza(lua_State *L) {
    int yes = 0;
    if (lua_getmetatable(L, 1)) {
        if (lua_rawequal(L, -1, UV_STANZA_MT) || lua_rawequal(L, -1, UV_COMPACT_MT)) {
            yes = 1;
        } else { /* a metatable is always a table */
            lua_pushvalue(L, UV_KMARK);
            lua_rawget(L, -2);
            yes = lua_rawequal(L, -1, UV_STANZA_MT);
        }
    }
    lua_pushboolean(L, yes);
    return 1;
}

/* Raises `what` followed by the type name of argument `arg`, at the line that called
 * stanza.message (level 2: level 1 is stanza.message itself), as error(msg, 2) does there. */
static int caller_error(lua_State *L, const char *what, int arg) {
    luaL_where(L, 2);
    lua_pushstring(L, what);
    lua_pushstring(L, luaL_typename(L, arg));
    lua_concat(L, 3);
    return lua_error(L);
}

/* compact_message(attr, body), called by stanza.message: { name = "message", attr = attr or {},
 * __xmppsm_body = body } with the compact metatable. */
static int kinds_compact_message(lua_State *L) {
    int attr_type = lua_type(L, 1);
    if (attr_type != LUA_TNIL && attr_type != LUA_TNONE && attr_type != LUA_TTABLE)
        return caller_error(L, "attributes must be a table, got ", 1);
    if (lua_type(L, 2) != LUA_TSTRING)
        return caller_error(L, "text must be a string, got ", 2);
    lua_createtable(L, 0, 3);
    lua_pushvalue(L, UV_KNAME);
    lua_pushvalue(L, UV_KMESSAGE);
    lua_rawset(L, -3);
    lua_pushvalue(L, UV_KATTR);
    if (attr_type == LUA_TTABLE)
        lua_pushvalue(L, 1);
    else
        lua_createtable(L, 0, 0);
    lua_rawset(L, -3);
    lua_pushvalue(L, UV_KBODY);
    lua_pushvalue(L, 2);
    lua_rawset(L, -3);
    lua_pushvalue(L, UV_COMPACT_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/* is_stanza, compact_message = core.stanza_kinds(stanza_mt, compact_mt): called once by
 * xmppsm.stanza, which owns both metatables. */
static int kinds_new(lua_State *L) {
    int i;
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    lua_pushliteral(L, "__xmppsm_stanza_mt");
    lua_pushliteral(L, "name");
    lua_pushliteral(L, "message");
    lua_pushliteral(L, "attr");
    lua_pushliteral(L, "__xmppsm_body");
    for (i = 1; i <= N_UPVALUES; i++)
        lua_pushvalue(L, i);
    lua_pushcclosure(L, kinds_is_stanza, N_UPVALUES);
    for (i = 1; i <= N_UPVALUES; i++)
        lua_pushvalue(L, i);
    lua_pushcclosure(L, kinds_compact_message, N_UPVALUES);
    return 2;
}

void xmppsm_open_stanza_kinds(lua_State *L) {
    lua_pushcfunction(L, kinds_new);
    lua_setfield(L, -2, "stanza_kinds");
}
