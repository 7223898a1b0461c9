#!/usr/bin/env bash
# TERM: connected clients see EOF, handle_close runs, mpxd exits 0.
. "$(dirname "$0")/lib.sh"
start_mpxd handlers/chat.py || exit 1
mkfifo "$TMP/in"
exec 3<>"$TMP/in"
nc 127.0.0.1 "$PORT" <"$TMP/in" >"$TMP/out" 3>&- &
NC_PID=$!
for _ in $(seq 1 100); do grep -q welcome "$TMP/out" && break; sleep 0.05; done
grep -q welcome "$TMP/out" || { echo "no greeting from chat" >&2; exit 1; }
kill -TERM "$MPXD_PID"
wait "$MPXD_PID"; status=$?
MPXD_PID=""
expect_eq "exit status on TERM" "0" "$status"
# nc (without -N) waits for its own input to end too; then it exits.
exec 3>&-
for _ in $(seq 1 100); do kill -0 "$NC_PID" 2>/dev/null || break; sleep 0.05; done
kill "$NC_PID" 2>/dev/null && { echo "nc still connected after TERM" >&2; exit 1; }
grep -q "closed: shutdown" "$TMP/mpxd.log" || { echo "no shutdown close line" >&2; cat "$TMP/mpxd.log" >&2; exit 1; }
grep -q "stopped" "$TMP/mpxd.log" || { echo "no 'stopped' line" >&2; exit 1; }
exit 0
