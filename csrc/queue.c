/* queue: placeholder until implemented (see docs/core.md). */
#include "xmppsm.h"

void xmppsm_open_queue(lua_State *L) {
    (void)L;
}
