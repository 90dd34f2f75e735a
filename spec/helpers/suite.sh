#!/bin/sh
# Runs one part of `make test` and records its counts in $XMPPSM_SUMMARY ("passed failed
# skipped" lines, which spec/helpers/total.lua adds up).
#   suite.sh busted NAME CMD...  busted writes its own counts (spec/helpers/summary_output.lua);
#                                a non-zero exit they do not explain (a sanitizer or valgrind
#                                report, a crash) counts as one more failure.
#   suite.sh check NAME CMD...   a check that is not a busted run counts as one test.
kind=$1 name=$2
shift 2
echo "== $name"
before=$(cat "$XMPPSM_SUMMARY" 2>/dev/null | wc -l)
"$@"
rc=$?
if [ "$kind" = check ]; then
  if [ $rc -eq 0 ]; then echo "1 0 0" >>"$XMPPSM_SUMMARY"; else echo "0 1 0" >>"$XMPPSM_SUMMARY"; fi
  exit 0
fi
after=$(cat "$XMPPSM_SUMMARY" 2>/dev/null | wc -l)
failed=0
[ "$after" -gt "$before" ] && failed=$(tail -n 1 "$XMPPSM_SUMMARY" | cut -d' ' -f2)
if [ $rc -ne 0 ] && [ "$failed" -eq 0 ]; then
  echo "$name exited with status $rc although no spec failed: counted as a failure"
  echo "0 1 0" >>"$XMPPSM_SUMMARY"
fi
exit 0
