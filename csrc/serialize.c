/* serialize: placeholder until implemented (see docs/core.md). */
#include "xmppsm.h"

void xmppsm_open_serialize(lua_State *L) {
    (void)L;
}
