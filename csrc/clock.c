/* The monotonic clock that timers and timeouts use: wall-clock jumps must not fire them. */
#define _POSIX_C_SOURCE 200809L
#include <time.h>

#include "xmppsm.h"

static int clock_monotime(lua_State *L) {
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return luaL_error(L, "clock_gettime(CLOCK_MONOTONIC) failed");
    lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
    return 1;
}

void xmppsm_open_clock(lua_State *L) {
    lua_pushcfunction(L, clock_monotime);
    lua_setfield(L, -2, "monotime");
}
