#!/usr/bin/env bash
# Two people chat through handlers/chat.py with nc, as the docstring says.
. "$(dirname "$0")/lib.sh"
start_mpxd handlers/chat.py || exit 1

# The fifos are opened read-write here, so nc never waits for a writer; only
# this shell holds them (nc gets 3>&- 4>&-), so closing them ends nc's input.

# wait_for FILE TEXT: up to 5 s for TEXT to appear as a line in FILE
wait_for() {
  for _ in $(seq 1 100); do grep -qxF -- "$2" "$1" && return 0; sleep 0.05; done
  printf 'never saw %s in %s; it holds:\n' "$2" "$1" >&2; cat "$1" >&2
  echo "--- mpxd log:" >&2; cat "$TMP/mpxd.log" >&2
  exit 1
}

mkfifo "$TMP/a.in" "$TMP/b.in"
exec 3<>"$TMP/a.in" 4<>"$TMP/b.in"
nc -N 127.0.0.1 "$PORT" <"$TMP/a.in" >"$TMP/a.out" 3>&- 4>&- & A_PID=$!
wait_for "$TMP/a.out" "* welcome, you are guest1; 0 other(s) here; /nick NAME to rename, /who, /quit"
nc -N 127.0.0.1 "$PORT" <"$TMP/b.in" >"$TMP/b.out" 3>&- 4>&- & B_PID=$!
wait_for "$TMP/b.out" "* welcome, you are guest2; 1 other(s) here; /nick NAME to rename, /who, /quit"
wait_for "$TMP/a.out" "* guest2 joined"

echo "/nick alice" >&3
wait_for "$TMP/a.out" "* you are now alice"
wait_for "$TMP/b.out" "* guest1 is now alice"
echo "/nick bob" >&4
wait_for "$TMP/a.out" "* guest2 is now bob"
echo "hello bob" >&3
wait_for "$TMP/b.out" "<alice> hello bob"
printf 'hi alice\r\n' >&4
wait_for "$TMP/a.out" "<bob> hi alice"
echo "/who" >&4
wait_for "$TMP/b.out" "* here: alice bob"
grep -qF "<alice>" "$TMP/a.out" && { echo "alice got her own line back" >&2; exit 1; }

echo "/quit" >&4
wait_for "$TMP/b.out" "* bye"
wait_for "$TMP/a.out" "* bob left"
exec 3>&- 4>&-
# both nc exit once their input ends and mpxd closes; never wait for ever
for _ in $(seq 1 100); do
  kill -0 "$A_PID" 2>/dev/null || kill -0 "$B_PID" 2>/dev/null || break
  sleep 0.05
done
if kill -0 "$A_PID" 2>/dev/null || kill -0 "$B_PID" 2>/dev/null; then
  kill "$A_PID" "$B_PID" 2>/dev/null
  echo "nc did not exit after its input ended" >&2; exit 1
fi
stop_mpxd || { echo "mpxd exited non-zero on TERM" >&2; exit 1; }
