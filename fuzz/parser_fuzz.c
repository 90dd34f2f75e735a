/* libFuzzer target for the stream parser.
 * The input's first byte picks a chunk size; the rest is fed as a stream. Invariants checked:
 * feeding never raises a Lua error (bad input must become an "error" event), and the events are
 * the same whether the input arrives in one piece or in chunks. */
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <lua.h>
#include <lualib.h>
#include <lauxlib.h>

int luaopen_xmppsm_core(lua_State *L);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *driver =
    "local core = ...\n"
    "local function run(data, step)\n"
    "  local p = core.parser{ max_stanza_size = 2048, max_depth = 12, max_attributes = 8 }\n"
    "  local out = {}\n"
    "  local i = 1\n"
    "  while i <= #data do\n"
    "    local chunk = data:sub(i, i + step - 1)\n"
    "    i = i + step\n"
    "    local ev, n = p:feed(chunk)\n"
    "    for k = 1, n do\n"
    "      local kind, a, b = ev[3*k-2], ev[3*k-1], ev[3*k]\n"
    "      out[#out+1] = kind .. ':' .. tostring(kind == 'error' and a or b)\n"
    "    end\n"
    "    local st = p:state()\n"
    "    if st == 'failed' then break end\n"
    "    if st == 'paused' then\n"
    "      out[#out+1] = 'reset'\n"
    "      local rest = p:reset()\n"
    "      data = rest .. data:sub(i)\n"
    "      i = 1\n"
    "    end\n"
    "  end\n"
    "  p:close()\n"
    "  return table.concat(out, '\\n')\n"
    "end\n"
    "return function(data, step)\n"
    "  local whole = run(data, #data + 1)\n"
    "  local split = run(data, step)\n"
    "  if whole ~= split then error('chunking changed the events:\\n' .. whole .. '\\n--\\n' .. split) end\n"
    "end\n";

static lua_State *L;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    if (L == NULL) {
        L = luaL_newstate();
        luaL_openlibs(L);
        if (luaL_loadstring(L, driver) != LUA_OK) abort();
        luaopen_xmppsm_core(L);
        lua_call(L, 1, 1);
        lua_setglobal(L, "fuzz_run");
    }
    lua_getglobal(L, "fuzz_run");
    lua_pushlstring(L, (const char *)data + 1, size - 1);
    lua_pushinteger(L, 1 + data[0] % 17);
    if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
        fprintf(stderr, "fuzz driver: %s\n", lua_tostring(L, -1));
        abort();
    }
    lua_gc(L, LUA_GCCOLLECT);
    return 0;
}
