/* crypto: hashes, HMAC, PBKDF2, random bytes, strict base64 and certificate host names, all on
 * OpenSSL libcrypto (LuaSec offers none of them). The contract is docs/core.md, "Crypto". */

/* Hide every API that OpenSSL 3.0 deprecated: using one becomes a build error here, not a
 * warning on the next OpenSSL release. */
#define OPENSSL_API_COMPAT 30000
#define OPENSSL_NO_DEPRECATED

#include <limits.h>
#include <stddef.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "xmppsm.h"

/* A server picks the SCRAM iteration count: without a cap a hostile one could make the client
 * spin for hours. Ten million PBKDF2-HMAC-SHA-1 rounds take a few seconds on current hardware,
 * far above what servers use (4096 to a few hundred thousand). */
#define CRYPTO_MAX_ITERATIONS 10000000
/* Nothing here needs more derived key than a SHA-512 digest; the cap only refuses nonsense. */
#define CRYPTO_MAX_DKLEN 1024
/* Nonces and keys are a few dozen bytes; a bigger request is a bug in the caller. */
#define CRYPTO_MAX_RANDOM (1024 * 1024)

/* The longest error text we build from OpenSSL's queue. */
#define CRYPTO_ERRBUF 256

static const char *const alg_names[] = { "sha1", "sha256", "sha512", NULL };

static const EVP_MD *check_md(lua_State *L, int arg) {
    switch (luaL_checkoption(L, arg, NULL, alg_names)) {
    case 0: return EVP_sha1();
    case 1: return EVP_sha256();
    default: return EVP_sha512();
    }
}

/* OpenSSL takes int lengths in several places: refuse longer strings instead of truncating. */
static const char *check_intlen(lua_State *L, int arg, int *len) {
    size_t n;
    const char *s = luaL_checklstring(L, arg, &n);
    if (n > (size_t)INT_MAX)
        luaL_argerror(L, arg, "string too long");
    *len = (int)n;
    return s;
}

/* Pushes OpenSSL's oldest queued error (or `fallback`) and empties the queue. The queue is per
 * thread and shared with LuaSec: an entry left behind makes SSL_get_error() report a TLS failure
 * on the next, unrelated, read. */
static void push_ssl_error(lua_State *L, const char *what, const char *fallback) {
    char buf[CRYPTO_ERRBUF];
    unsigned long e = ERR_get_error();
    if (e != 0)
        ERR_error_string_n(e, buf, sizeof buf);
    ERR_clear_error();
    lua_pushfstring(L, "%s: %s", what, e != 0 ? buf : fallback);
}

/* Library failures in hash/hmac/pbkdf2 (out of memory, a provider refusing the digest) are not
 * bad input: they raise, after clearing the error queue (see push_ssl_error). */
static int raise_ssl_error(lua_State *L, const char *what) {
    push_ssl_error(L, what, "OpenSSL failure");
    return lua_error(L);
}

static int crypto_hash(lua_State *L) {
    size_t len;
    const EVP_MD *md = check_md(L, 1);
    const char *data = luaL_checklstring(L, 2, &len);
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int outlen = 0;
    if (!EVP_Digest(data, len, out, &outlen, md, NULL))
        return raise_ssl_error(L, "hash");
    lua_pushlstring(L, (const char *)out, outlen);
    OPENSSL_cleanse(out, sizeof out);
    return 1;
}

static int crypto_hmac(lua_State *L) {
    int keylen;
    size_t len;
    const EVP_MD *md = check_md(L, 1);
    const char *key = check_intlen(L, 2, &keylen);
    const char *data = luaL_checklstring(L, 3, &len);
    unsigned char out[EVP_MAX_MD_SIZE];
    unsigned int outlen = 0;
    /* The one-shot HMAC() is the non-deprecated survivor of the HMAC_CTX API in OpenSSL 3. */
    if (HMAC(md, key, keylen, (const unsigned char *)data, len, out, &outlen) == NULL)
        return raise_ssl_error(L, "hmac");
    lua_pushlstring(L, (const char *)out, outlen);
    OPENSSL_cleanse(out, sizeof out);
    return 1;
}

static int crypto_pbkdf2(lua_State *L) {
    int passlen, saltlen;
    const EVP_MD *md = check_md(L, 1);
    const char *pass = check_intlen(L, 2, &passlen);
    const char *salt = check_intlen(L, 3, &saltlen);
    lua_Integer iter = luaL_checkinteger(L, 4);
    lua_Integer dklen = luaL_optinteger(L, 5, (lua_Integer)EVP_MD_get_size(md));
    luaL_Buffer b;
    unsigned char *out;
    luaL_argcheck(L, iter >= 1 && iter <= CRYPTO_MAX_ITERATIONS, 4,
                  "iterations must be 1..10000000");
    luaL_argcheck(L, dklen >= 1 && dklen <= CRYPTO_MAX_DKLEN, 5, "length must be 1..1024");
    /* The buffer belongs to the GC, so nothing leaks if pushing the result fails. */
    out = (unsigned char *)luaL_buffinitsize(L, &b, (size_t)dklen);
    if (!PKCS5_PBKDF2_HMAC(pass, passlen, (const unsigned char *)salt, saltlen, (int)iter, md,
                           (int)dklen, out))
        return raise_ssl_error(L, "pbkdf2");
    luaL_pushresultsize(&b, (size_t)dklen);
    return 1;
}

static int crypto_random(lua_State *L) {
    lua_Integer n = luaL_checkinteger(L, 1);
    luaL_Buffer b;
    unsigned char *out;
    luaL_argcheck(L, n >= 0 && n <= CRYPTO_MAX_RANDOM, 1, "length must be 0..1048576");
    out = (unsigned char *)luaL_buffinitsize(L, &b, (size_t)n);
    if (n > 0 && RAND_bytes(out, (int)n) != 1) {
        lua_pushnil(L);
        push_ssl_error(L, "random", "the random generator is not seeded");
        return 2;
    }
    luaL_pushresultsize(&b, (size_t)n);
    return 1;
}

static int crypto_equal(lua_State *L) {
    size_t la, lb;
    const char *a = luaL_checklstring(L, 1, &la);
    const char *b = luaL_checklstring(L, 2, &lb);
    /* Lengths are public (a MAC or signature has a fixed size); only the contents must not
     * leak through timing. */
    lua_pushboolean(L, la == lb && CRYPTO_memcmp(a, b, la) == 0);
    return 1;
}

static int crypto_xor(lua_State *L) {
    size_t la, lb, i;
    const char *a = luaL_checklstring(L, 1, &la);
    const char *b = luaL_checklstring(L, 2, &lb);
    luaL_Buffer buf;
    char *out;
    luaL_argcheck(L, la == lb, 2, "strings of different lengths");
    out = luaL_buffinitsize(L, &buf, la);
    for (i = 0; i < la; i++)
        out[i] = (char)(a[i] ^ b[i]);
    luaL_pushresultsize(&buf, la);
    return 1;
}

static const char b64_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int crypto_base64_encode(lua_State *L) {
    size_t len, i, o = 0, outlen;
    const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
    luaL_Buffer b;
    char *out;
    luaL_argcheck(L, len / 3 < ((size_t)-1) / 4 - 1, 1, "string too long");
    outlen = (len + 2) / 3 * 4;
    out = luaL_buffinitsize(L, &b, outlen);
    for (i = 0; i + 2 < len; i += 3) {
        unsigned long v = ((unsigned long)s[i] << 16) | ((unsigned long)s[i + 1] << 8) | s[i + 2];
        out[o++] = b64_alphabet[(v >> 18) & 63];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = b64_alphabet[(v >> 6) & 63];
        out[o++] = b64_alphabet[v & 63];
    }
    if (len - i == 1) {
        unsigned long v = (unsigned long)s[i] << 16;
        out[o++] = b64_alphabet[(v >> 18) & 63];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = '=';
        out[o++] = '=';
    } else if (len - i == 2) {
        unsigned long v = ((unsigned long)s[i] << 16) | ((unsigned long)s[i + 1] << 8);
        out[o++] = b64_alphabet[(v >> 18) & 63];
        out[o++] = b64_alphabet[(v >> 12) & 63];
        out[o++] = b64_alphabet[(v >> 6) & 63];
        out[o++] = '=';
    }
    luaL_pushresultsize(&b, o);
    return 1;
}

/* The 6-bit value of a base64 character, or -1 for anything outside the RFC 4648 §4 alphabet
 * (so '=', whitespace, '-' and '_' are all refused here). */
static int b64_value(unsigned char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

static int b64_fail(lua_State *L, const char *why, size_t pos) {
    lua_pushnil(L);
    lua_pushfstring(L, "invalid base64: %s at byte %I", why, (lua_Integer)pos + 1);
    return 2;
}

/* Strict decoding: SCRAM compares signatures and nonces byte for byte, so two encodings of one
 * value, or text a lenient decoder would skip, must not be accepted. Refused: a length that is
 * not a multiple of 4, any character outside the alphabet (whitespace included), padding other
 * than one or two '=' at the very end, and non-zero bits under the padding (RFC 4648 §3.5). */
static int crypto_base64_decode(lua_State *L) {
    size_t len, i, o = 0, pad = 0;
    const unsigned char *s = (const unsigned char *)luaL_checklstring(L, 1, &len);
    luaL_Buffer b;
    char *out;
    if (len % 4 != 0) {
        lua_pushnil(L);
        lua_pushliteral(L, "invalid base64: length is not a multiple of 4");
        return 2;
    }
    if (len > 0 && s[len - 1] == '=')
        pad = (s[len - 2] == '=') ? 2 : 1;
    out = luaL_buffinitsize(L, &b, len / 4 * 3);
    for (i = 0; i < len; i += 4) {
        int v[4], k;
        int last = (i + 4 == len);
        int nchars = last ? 4 - (int)pad : 4;
        for (k = 0; k < 4; k++) {
            if (k >= nchars) {
                v[k] = 0; /* a '=' already known to be in the padding */
                continue;
            }
            v[k] = b64_value(s[i + (size_t)k]);
            if (v[k] < 0)
                return b64_fail(L, s[i + (size_t)k] == '=' ? "misplaced padding"
                                                           : "character outside the alphabet",
                                i + (size_t)k);
        }
        out[o++] = (char)((v[0] << 2) | (v[1] >> 4));
        if (nchars > 2)
            out[o++] = (char)(((v[1] & 15) << 4) | (v[2] >> 2));
        if (nchars > 3)
            out[o++] = (char)(((v[2] & 3) << 6) | v[3]);
        if ((nchars == 2 && (v[1] & 15) != 0) || (nchars == 3 && (v[2] & 3) != 0))
            return b64_fail(L, "non-zero bits before the padding", i + (size_t)nchars - 1);
    }
    luaL_pushresultsize(&b, o);
    return 1;
}

/* A certificate is never encrypted: refuse any passphrase prompt, which OpenSSL's default
 * callback would otherwise show on the terminal for a PEM claiming to be encrypted. */
static int no_passphrase(char *buf, int size, int rwflag, void *u) {
    (void)buf; (void)size; (void)rwflag; (void)u;
    return -1;
}

static int crypto_check_host(lua_State *L) {
    int pemlen, rc;
    size_t dlen;
    const char *pem = check_intlen(L, 1, &pemlen);
    const char *domain = luaL_checklstring(L, 2, &dlen);
    BIO *bio;
    X509 *cert;
    luaL_argcheck(L, dlen > 0, 2, "empty domain");
    luaL_argcheck(L, memchr(domain, '\0', dlen) == NULL, 2, "domain contains a NUL byte");
    /* Nothing below may raise a Lua error until both objects are freed. */
    bio = BIO_new_mem_buf(pem, pemlen);
    if (bio == NULL) {
        lua_pushnil(L);
        push_ssl_error(L, "cannot read certificate", "out of memory");
        return 2;
    }
    cert = PEM_read_bio_X509(bio, NULL, no_passphrase, NULL);
    BIO_free(bio);
    if (cert == NULL) {
        lua_pushnil(L);
        push_ssl_error(L, "cannot parse certificate", "no PEM certificate found");
        return 2;
    }
    /* RFC 6125 §6.4.3: a wildcard stands for one whole left-most label, never part of one. */
    rc = X509_check_host(cert, domain, dlen, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS, NULL);
    X509_free(cert);
    if (rc == 1) {
        lua_pushboolean(L, 1);
        return 1;
    }
    if (rc == 0) {
        ERR_clear_error();
        lua_pushboolean(L, 0);
        lua_pushfstring(L, "certificate is not valid for %s", domain);
        return 2;
    }
    lua_pushnil(L);
    push_ssl_error(L, "cannot check the certificate's names",
                   rc == -2 ? "malformed domain" : "OpenSSL failure");
    return 2;
}

static const luaL_Reg crypto_funcs[] = {
    { "hash", crypto_hash },
    { "hmac", crypto_hmac },
    { "pbkdf2", crypto_pbkdf2 },
    { "random", crypto_random },
    { "equal", crypto_equal },
    { "xor", crypto_xor },
    { "base64_encode", crypto_base64_encode },
    { "base64_decode", crypto_base64_decode },
    { "check_host", crypto_check_host },
    { NULL, NULL },
};

void xmppsm_open_crypto(lua_State *L) {
    luaL_setfuncs(L, crypto_funcs, 0);
}
