/* Socket options LuaSocket does not offer. */
#define _DEFAULT_SOURCE
#include <errno.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "xmppsm.h"

/* core.tcp_quickack(fd) -> true | nil, err
 * Acknowledges received data at once instead of after the delayed-ACK timer (about 40 ms on
 * Linux). During log-in the client often has nothing to send back, and a server that batches
 * its small writes with Nagle's algorithm then waits for that late ACK before its next write.
 * The kernel leaves quick-ACK mode on its own, so callers set it again after each read.
 * Where TCP_QUICKACK does not exist this does nothing and returns true. */
static int sockopt_tcp_quickack(lua_State *L) {
    int fd = xmppsm_check_fd(L, 1);
#ifdef TCP_QUICKACK
    int on = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &on, sizeof on) != 0) {
        int e = errno;
        lua_pushnil(L);
        lua_pushstring(L, strerror(e));
        return 2;
    }
#endif
    lua_pushboolean(L, 1);
    return 1;
}

void xmppsm_open_sockopt(lua_State *L) {
    lua_pushcfunction(L, sockopt_tcp_quickack);
    lua_setfield(L, -2, "tcp_quickack");
}
