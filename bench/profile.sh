#!/bin/sh
# Where xmppsm's parser and serializer spend their time: `make -C bench profile`.
#
# Runs bench/worker.lua under build/bench/prof_host (a Lua with symbols), with
#  - perf (software clock sampling: works in VMs without hardware counters) when available:
#    time per shared object, then per function;
#  - callgrind: instructions per function, inclusive (who calls the cost), on the small streams.
# Output files stay in build/bench (perf-*.data, callgrind-*.out) for perf report/callgrind_annotate.
set -eu
cd "$(dirname "$0")/.."
OUT=build/bench
HOST=$OUT/prof_host
TOP=${TOP:-30}

cases() {
  echo "frame-mixed frame ours $OUT/mixed.xml 4096 6"
  echo "frame-roster frame ours $OUT/large-roster.xml 4096 10"
  echo "frame-large frame ours $OUT/large.xml 4096 6"
  echo "serialize serialize ours 500 40 10"
}

if perf stat -e cpu-clock true >/dev/null 2>&1; then
  cases | while read -r name args; do
    echo "== perf: $name (whole process: the passes dominate)"
    # shellcheck disable=SC2086
    perf record -q -e cpu-clock -F 10000 -o "$OUT/perf-$name.data" $HOST bench/worker.lua $args >/dev/null 2>&1
    perf report -i "$OUT/perf-$name.data" --stdio --sort dso 2>/dev/null | grep -E '^ +[0-9]' | head -8
    perf report -i "$OUT/perf-$name.data" --stdio --sort dso,symbol 2>/dev/null | grep -E '^ +[0-9]' | head -"$TOP"
  done
else
  echo "perf is not usable here; callgrind only"
fi

for name in mixed large; do
  echo "== callgrind: frame $name-small, inclusive instructions (2 passes)"
  valgrind --tool=callgrind --dump-instr=no --callgrind-out-file="$OUT/callgrind-$name.out" \
    $HOST bench/worker.lua frame ours "$OUT/$name-small.xml" 4096 2 >/dev/null 2>&1
  callgrind_annotate --inclusive=yes "$OUT/callgrind-$name.out" 2>/dev/null | grep -E '^ *[0-9,]+ \(' |
    grep -vE 'below main|libc-start|libc_start|ld-linux|luaD_|lua_pcallk|f_call|luaV_execute|prof_host\.c:main' |
    head -"$TOP"
done
