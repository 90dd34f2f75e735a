/* parser: placeholder until implemented (see docs/core.md). */
#include "xmppsm.h"

void xmppsm_open_parser(lua_State *L) {
    (void)L;
}
