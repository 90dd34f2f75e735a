/* Entry point of xmppsm.core: each concern lives in its own file and registers itself here. */
#include "xmppsm.h"

__attribute__((visibility("default"))) int luaopen_xmppsm_core(lua_State *L);

int luaopen_xmppsm_core(lua_State *L) {
    lua_newtable(L);
    lua_pushliteral(L, XMPPSM_VERSION);
    lua_setfield(L, -2, "_VERSION");
    xmppsm_open_parser(L);
    xmppsm_open_serialize(L);
    xmppsm_open_queue(L);
    xmppsm_open_crypto(L);
    xmppsm_open_clock(L);
    xmppsm_open_file(L);
    xmppsm_open_poll(L);
    xmppsm_open_sockopt(L);
    xmppsm_open_arity(L);
    xmppsm_open_stanza_kinds(L);
    return 1;
}
