/* Whether a function can see its n-th argument: lets the library skip building a value that a
 * callback declared without that parameter could never read. */
#include "xmppsm.h"

/* core.sees_arg(f, n): false only for a Lua function with fewer than n parameters and no `...`
 * (the VM drops extra arguments to it); true for anything else that may be called (C functions,
 * vararg functions, callable tables). */
static int arity_sees_arg(lua_State *L) {
    lua_Integer n = luaL_checkinteger(L, 2);
    lua_Debug ar;
    if (lua_type(L, 1) != LUA_TFUNCTION) {
        lua_pushboolean(L, 1);
        return 1;
    }
    lua_pushvalue(L, 1);
    lua_getinfo(L, ">u", &ar);
    lua_pushboolean(L, ar.isvararg || (lua_Integer)ar.nparams >= n);
    return 1;
}

void xmppsm_open_arity(lua_State *L) {
    lua_pushcfunction(L, arity_sees_arg);
    lua_setfield(L, -2, "sees_arg");
}
