/* prof_host: a bare Lua 5.4 interpreter linked with the static liblua5.4.a, for profiling only.
 *
 *    prof_host SCRIPT [ARGS...]
 *
 * Debian's lua5.4 binary is stripped, so a profile of it shows the Lua VM as bare addresses;
 * liblua5.4.a keeps its symbols (luaH_resize, internshrstr, sweepstep...). Linked with -Wl,-E so
 * that C modules (xmppsm/core.so, lxp.so) find the Lua API in it. Not used for the timings.
 */
#include <stdio.h>

#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

int main(int argc, char **argv) {
    lua_State *L;
    int i, status;
    if (argc < 2) {
        fprintf(stderr, "usage: %s SCRIPT [ARGS...]\n", argv[0]);
        return 2;
    }
    L = luaL_newstate();
    if (L == NULL) return 1;
    luaL_openlibs(L);
    lua_createtable(L, argc, 0); /* arg[0] is the script, as with the lua5.4 command */
    for (i = 1; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - 1);
    }
    lua_setglobal(L, "arg");
    status = luaL_loadfile(L, argv[1]);
    if (status == LUA_OK) {
        for (i = 2; i < argc; i++) lua_pushstring(L, argv[i]);
        status = lua_pcall(L, argc - 2, 0, 0);
    }
    if (status != LUA_OK) fprintf(stderr, "%s: %s\n", argv[0], lua_tostring(L, -1));
    lua_close(L);
    return status == LUA_OK ? 0 : 1;
}
