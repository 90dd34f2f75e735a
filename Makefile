# xmppsm: build, test, benchmark. Variable names follow LuaRocks' so both builds agree.
# On another distribution: make LUA_INCDIR=... EXPAT_INCDIR=... OPENSSL_INCDIR=... (and *_LIBDIR).

LUA            ?= lua5.4
LUA_VERSION    ?= 5.4
PREFIX         ?= /usr/local
LUA_INCDIR     ?= /usr/include/lua$(LUA_VERSION)
EXPAT_INCDIR   ?= /usr/include
EXPAT_LIBDIR   ?= /usr/lib
OPENSSL_INCDIR ?= /usr/include
OPENSSL_LIBDIR ?= /usr/lib
LUADIR         ?= $(PREFIX)/share/lua/$(LUA_VERSION)
LIBDIR         ?= $(PREFIX)/lib/lua/$(LUA_VERSION)
CC             ?= cc
CFLAGS         ?= -O2 -g
LIBFLAG        ?= -shared
DESTDIR        ?=

WARNFLAGS = -std=c99 -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Werror \
            -Werror=implicit-function-declaration
CORE_CFLAGS = $(CFLAGS) $(WARNFLAGS) -fPIC -fvisibility=hidden \
              -I$(LUA_INCDIR) -I$(EXPAT_INCDIR) -I$(OPENSSL_INCDIR)
CORE_LIBS = -L$(EXPAT_LIBDIR) -L$(OPENSSL_LIBDIR) -lexpat -lcrypto
CORE_SRC = $(sort $(wildcard csrc/*.c))
CORE_HDR = $(wildcard csrc/*.h)

SAN_FLAGS = -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
# The core's specs run in an interpreter built with the sanitizers (spec/helpers/lua_host.c), so
# the programs the specs start are not run with the sanitizer runtime.
ASAN_LUA = build/asan/lua_host
ASAN_RUN = ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
           $(ASAN_LUA) /usr/bin/busted --run=core --cpath='build/asan/?.so'

BUSTED  = $(LUA) /usr/bin/busted
SUMMARY = build/summary.txt
FUZZ_SECONDS ?= 600

DEB_PACKAGES = lua5.4 liblua5.4-dev lua-socket lua-sec lua-expat libexpat1-dev libssl-dev \
               lua-busted luarocks lua-check lua-ldoc lua-discount prosody openssl gcc make clang \
               libclang-rt-dev valgrind

.PHONY: all deps demo test test-unit test-asan valgrind lint fuzz bench doc install clean

all: deps xmppsm/core.so

# Installs the Debian packages that are missing (idempotent; sudo when not root).
deps:
	@if ! command -v dpkg-query >/dev/null 2>&1; then \
	  echo "make deps: not a Debian system; install the equivalents of: $(DEB_PACKAGES)"; exit 0; fi; \
	missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
	  echo "make deps: installing$$missing"; \
	  $$sudo apt-get update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# A bot sends 300 messages through a fault proxy that cuts the link 4 times, against a
# throwaway Prosody on 127.0.0.1; exits non-zero if a message was lost. Stops all it started.
demo: all
	@$(LUA) examples/demo.lua

xmppsm/core.so: $(CORE_SRC) $(CORE_HDR)
	@mkdir -p xmppsm
	$(CC) $(CORE_CFLAGS) $(CORE_SRC) -o $@ $(LIBFLAG) $(CORE_LIBS)

$(ASAN_LUA): spec/helpers/lua_host.c
	@mkdir -p build/asan
	$(CC) $(SAN_FLAGS) $(WARNFLAGS) -I$(LUA_INCDIR) $< -o $@ -llua$(LUA_VERSION) -lm

# XMPPSM_NO_SIMD: the sanitizer build takes the portable code where the core has a SIMD path
# (csrc/serialize.c's scan), so the specs check both.
build/asan/xmppsm/core.so: $(CORE_SRC) $(CORE_HDR)
	@mkdir -p build/asan/xmppsm
	$(CC) $(SAN_FLAGS) -DXMPPSM_NO_SIMD $(WARNFLAGS) -fPIC -fvisibility=hidden -I$(LUA_INCDIR) -I$(EXPAT_INCDIR) \
	  -I$(OPENSSL_INCDIR) $(CORE_SRC) -o $@ $(LIBFLAG) $(CORE_LIBS)

# Every test: lint, all specs (spec/rock_spec.lua builds the rock too), the core's specs under
# ASan+UBSan and under valgrind, a short fuzz run. It keeps going after a failure so the closing line counts
# everything, then fails if anything did.
SUITE = XMPPSM_SUMMARY=$(SUMMARY) spec/helpers/suite.sh
test: all build/asan/xmppsm/core.so $(ASAN_LUA)
	@mkdir -p build; rm -f $(SUMMARY)
	@$(SUITE) check "luacheck" $(MAKE) --no-print-directory lint
	@$(SUITE) busted "all specs" timeout 1200 $(BUSTED)
	@$(SUITE) busted "core specs under AddressSanitizer + UndefinedBehaviorSanitizer" \
	  timeout 1200 env $(ASAN_RUN)
	@$(SUITE) busted "core specs under valgrind" timeout 2400 $(MAKE) --no-print-directory valgrind
	@$(SUITE) check "parser fuzzing, 30 s" $(MAKE) --no-print-directory fuzz FUZZ_SECONDS=30
	@$(LUA) spec/helpers/total.lua $(SUMMARY)

test-unit: all
	$(BUSTED) --run=core

test-asan: build/asan/xmppsm/core.so $(ASAN_LUA)
	$(ASAN_RUN)

valgrind: all
	valgrind --quiet --leak-check=full --errors-for-leak-kinds=definite --error-exitcode=1 \
	  $(BUSTED) --run=core

lint: deps
	luacheck -q lua spec examples bench

build/fuzz/parser_fuzz: fuzz/parser_fuzz.c $(CORE_SRC) $(CORE_HDR)
	@mkdir -p build/fuzz
	clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
	  -I$(LUA_INCDIR) -Icsrc fuzz/parser_fuzz.c $(CORE_SRC) -o $@ -llua$(LUA_VERSION) $(CORE_LIBS)

# libFuzzer on the stream parser; FUZZ_SECONDS=600 by default, 30 inside `make test`.
fuzz: deps build/fuzz/parser_fuzz
	@mkdir -p build/fuzz/corpus
	build/fuzz/parser_fuzz -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -print_final_stats=1 \
	  build/fuzz/corpus fuzz/seeds 2>build/fuzz/log.txt || { tail -n 60 build/fuzz/log.txt; exit 1; }
	@grep -E "^(stat::number_of_executed_units|Done)" build/fuzz/log.txt || true

# Framing and serialization (bench/run.lua), then the client end to end, resumption, queue and
# scale (bench/client_run.lua; BENCH_QUICK=1 for a short run, BENCH_ONLY=e2e,resume,queue,scale).
bench: all
	$(MAKE) --no-print-directory -C bench
	$(LUA) bench/run.lua
	$(LUA) bench/client_run.lua

# The API reference from the source comments, into doc/ (lua-discount renders the Markdown;
# without it LDoc falls back to plain text).
doc: deps
	ldoc -c config.ld .
	@echo "API reference: doc/index.html"

install: xmppsm/core.so
	install -d $(DESTDIR)$(LUADIR)/xmppsm $(DESTDIR)$(LIBDIR)/xmppsm
	install -m 644 lua/xmppsm/*.lua $(DESTDIR)$(LUADIR)/xmppsm/
	install -m 755 xmppsm/core.so $(DESTDIR)$(LIBDIR)/xmppsm/

clean:
	rm -rf xmppsm build doc
