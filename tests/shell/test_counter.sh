#!/usr/bin/env bash
# The README's first example, as an operator types it.
. "$(dirname "$0")/lib.sh"
start_mpxd handlers/counter.py || exit 1
out=$(printf '1\n1\n5 global\n' | nc -N 127.0.0.1 "$PORT" | tr '\n' ' ')
expect_eq "counter" "1 2 5 " "$out"
out=$(printf 'x\n2 global\r\n3\n' | nc -N 127.0.0.1 "$PORT" | tr '\n' ' ')
expect_eq "second client: own counter, shared global" "0 7 3 " "$out"
stop_mpxd || { echo "mpxd exited non-zero on TERM" >&2; exit 1; }
grep -q "closed: eof" "$TMP/mpxd.log" || { echo "no session log line" >&2; exit 1; }
