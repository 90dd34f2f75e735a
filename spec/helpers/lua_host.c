/* A minimal Lua 5.4 interpreter for running the specs under AddressSanitizer: built with the
 * sanitizer, it carries its runtime itself, so no LD_PRELOAD leaks into the programs the specs
 * start (openssl, sh, a second lua5.4), which are not instrumented.
 * Usage: lua_host SCRIPT [ARGS...] -- like `lua5.4 SCRIPT ARGS...` (no options, no REPL). */
#include <stdio.h>
#include <stdlib.h>
#include <lua.h>
#include <lualib.h>
#include <lauxlib.h>

static int traceback(lua_State *L) {
    luaL_traceback(L, L, lua_tostring(L, 1), 1);
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s SCRIPT [ARGS...]\n", argv[0]);
        return 2;
    }
    lua_State *L = luaL_newstate();
    if (L == NULL) return 1;
    luaL_openlibs(L);
    lua_createtable(L, argc - 2, 2);   /* arg, as lua.c builds it: arg[0] is the script */
    for (int i = 0; i < argc; i++) {
        lua_pushstring(L, argv[i]);
        lua_rawseti(L, -2, i - 1);
    }
    lua_setglobal(L, "arg");
    lua_pushcfunction(L, traceback);
    int status = luaL_loadfile(L, argv[1]);
    if (status == LUA_OK) {
        for (int i = 2; i < argc; i++) lua_pushstring(L, argv[i]);
        status = lua_pcall(L, argc - 2, 0, 1);
    }
    if (status != LUA_OK) fprintf(stderr, "%s\n", lua_tostring(L, -1));
    lua_close(L);   /* everything freed, so LeakSanitizer sees only real leaks */
    return status == LUA_OK ? 0 : 1;
}
