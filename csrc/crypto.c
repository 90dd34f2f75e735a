/* crypto: placeholder until implemented (see docs/core.md). */
#include "xmppsm.h"

void xmppsm_open_crypto(lua_State *L) {
    (void)L;
}
