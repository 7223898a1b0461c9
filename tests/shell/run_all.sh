#!/usr/bin/env bash
# Run every tests/shell/test_*.sh; each starts its own mpxd on a free port.
set -u
cd "$(dirname "$0")"
passed=0 failed=0
for t in test_*.sh; do
  if bash "$t"; then passed=$((passed+1)); echo "ok   $t"
  else failed=$((failed+1)); echo "FAIL $t"; fi
done
echo "shell: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
