/* Shared declarations of the xmppsm.core C module. */
#ifndef XMPPSM_H
#define XMPPSM_H

#include <string.h>

#include <lua.h>
#include <lauxlib.h>

#define XMPPSM_VERSION "0.1.0"

/* Each concern registers its functions into the module table at the top of the stack. */
void xmppsm_open_parser(lua_State *L);
void xmppsm_open_serialize(lua_State *L);
void xmppsm_open_queue(lua_State *L);
void xmppsm_open_crypto(lua_State *L);
void xmppsm_open_clock(lua_State *L);
void xmppsm_open_file(lua_State *L);
void xmppsm_open_poll(lua_State *L);
void xmppsm_open_sockopt(lua_State *L);
void xmppsm_open_arity(lua_State *L);
void xmppsm_open_stanza_kinds(lua_State *L);

/* The file descriptor at `arg`: an integer (a string is refused, not converted) in 0..INT_MAX,
 * else a Lua error. */
int xmppsm_check_fd(lua_State *L, int arg);

/* The two namespaces Namespaces in XML reserves (for the parser's checks and the serializer's). */
#define XMPPSM_XML_NS "http://www.w3.org/XML/1998/namespace"
#define XMPPSM_XMLNS_NS "http://www.w3.org/2000/xmlns/"

/* Whether the n bytes at s are exactly the string literal `lit` (its length is a constant). */
#define XMPPSM_IS_LITERAL(s, n, lit) ((n) == sizeof(lit) - 1 && memcmp((s), (lit), (n)) == 0)

/* Whether the n bytes at s begin with an XML NameStartChar (serialize.c's name rules). */
int xmppsm_starts_name(const char *s, size_t n);

#endif
