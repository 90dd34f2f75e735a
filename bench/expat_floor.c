/* expat_floor: the least a stream framer on libexpat can do, as the floor of the benchmark.
 *
 *    expat_floor FILE CHUNK [PASSES]
 *    expat_floor --version
 *
 * Reads FILE into memory, then PASSES times (default 1): creates a parser without namespace
 * processing (XML_ParserCreate, as xmppsm does: it resolves names itself, and expat's namespace
 * mode does more than a framer needs), turns reparse deferral off when the library has the
 * switch, and feeds the bytes in CHUNK-byte XML_Parse calls. The handlers only
 * count: elements, depth, stanzas (elements closed at depth 1), text bytes. Prints one line per
 * pass: "stanzas bytes cpu_seconds deferral" with the process CPU time of the feeding alone.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <expat.h>

/* Debian back-ported the switch to 2.5.0 without changing the version macros: test the symbol. */
XMLPARSEAPI(XML_Bool) XML_SetReparseDeferralEnabled(XML_Parser parser, XML_Bool enabled);
#pragma weak XML_SetReparseDeferralEnabled

typedef struct {
    long depth, elements, stanzas, text;
} counts_t;

static void on_start(void *ud, const XML_Char *name, const XML_Char **atts) {
    counts_t *c = ud;
    (void)name;
    (void)atts;
    c->depth++;
    c->elements++;
}

static void on_end(void *ud, const XML_Char *name) {
    counts_t *c = ud;
    (void)name;
    if (--c->depth == 1) c->stanzas++;
}

static void on_text(void *ud, const XML_Char *s, int len) {
    counts_t *c = ud;
    (void)s;
    c->text += len;
}

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    char *data = NULL;
    long size;
    if (f == NULL) return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (size = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
        data = malloc((size_t)size + 1);
        if (data != NULL && fread(data, 1, (size_t)size, f) != (size_t)size) {
            free(data);
            data = NULL;
        }
        *len = (size_t)size;
    }
    fclose(f);
    return data;
}

int main(int argc, char **argv) {
    size_t len = 0, chunk, off;
    long passes = 1, i;
    char *data;
    if (argc == 2 && strcmp(argv[1], "--version") == 0) {
        printf("%s, reparse deferral switch %s\n", XML_ExpatVersion(),
               XML_SetReparseDeferralEnabled != NULL ? "present" : "absent");
        return 0;
    }
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: %s FILE CHUNK [PASSES]\n", argv[0]);
        return 2;
    }
    chunk = (size_t)strtoul(argv[2], NULL, 10);
    if (argc == 4) passes = strtol(argv[3], NULL, 10);
    if (chunk == 0 || chunk > (1u << 30) || passes < 1) {
        fprintf(stderr, "%s: bad CHUNK or PASSES\n", argv[0]);
        return 2;
    }
    data = read_file(argv[1], &len);
    if (data == NULL) {
        fprintf(stderr, "%s: cannot read %s\n", argv[0], argv[1]);
        return 1;
    }
    for (i = 0; i < passes; i++) {
        counts_t c = {0, 0, 0, 0};
        XML_Parser xp = XML_ParserCreate("UTF-8");
        int deferral = 1;
        double t0, t1;
        if (xp == NULL) return 1;
        if (XML_SetReparseDeferralEnabled != NULL) deferral = !XML_SetReparseDeferralEnabled(xp, XML_FALSE);
        XML_SetUserData(xp, &c);
        XML_SetElementHandler(xp, on_start, on_end);
        XML_SetCharacterDataHandler(xp, on_text);
        t0 = cpu_now();
        for (off = 0; off < len; off += chunk) {
            size_t n = len - off < chunk ? len - off : chunk;
            if (XML_Parse(xp, data + off, (int)n, XML_FALSE) != XML_STATUS_OK) {
                fprintf(stderr, "%s: %s at byte %lu\n", argv[0], XML_ErrorString(XML_GetErrorCode(xp)),
                        (unsigned long)XML_GetCurrentByteIndex(xp));
                return 1;
            }
        }
        t1 = cpu_now();
        XML_ParserFree(xp);
        printf("%ld %lu %.6f %s\n", c.stanzas, (unsigned long)len, t1 - t0, deferral ? "on" : "off");
        fflush(stdout);
    }
    free(data);
    return 0;
}
