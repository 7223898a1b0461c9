#!/usr/bin/env bash
# 20,000 pipelined lines through one nc connection, answered in order.
. "$(dirname "$0")/lib.sh"
start_mpxd handlers/counter.py || exit 1
yes 1 | head -n 20000 | nc -N 127.0.0.1 "$PORT" > "$TMP/answers"
expect_eq "number of answers" "20000" "$(wc -l < "$TMP/answers" | tr -d ' ')"
expect_eq "answers in order" "" "$(seq 1 20000 | cmp - "$TMP/answers" 2>&1)"
# two clients at once, each with its own counter
yes 2 | head -n 5000 | nc -N 127.0.0.1 "$PORT" > "$TMP/a" & A_PID=$!
yes 3 | head -n 5000 | nc -N 127.0.0.1 "$PORT" > "$TMP/b" & B_PID=$!
wait "$A_PID" "$B_PID"
expect_eq "client a" "10000" "$(tail -n 1 "$TMP/a")"
expect_eq "client b" "15000" "$(tail -n 1 "$TMP/b")"
stop_mpxd || { echo "mpxd exited non-zero on TERM" >&2; exit 1; }
