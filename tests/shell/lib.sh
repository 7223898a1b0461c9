# Helpers for the shell tests: start mpxd on a free port, talk with nc, stop it.
# Usage: . ./lib.sh; start_mpxd SCRIPT [OPTIONS...]; ...; stop_mpxd
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TMP=$(mktemp -d)
MPXD_PID=""
PORT=""

start_mpxd() {
  local script=$1; shift
  mpxd --port 0 --host 127.0.0.1 "$@" "$ROOT/$script" 2>"$TMP/mpxd.log" &
  MPXD_PID=$!
  for _ in $(seq 1 100); do
    PORT=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$TMP/mpxd.log")
    [ -n "$PORT" ] && return 0
    kill -0 "$MPXD_PID" 2>/dev/null || break
    sleep 0.05
  done
  echo "mpxd did not start:" >&2; cat "$TMP/mpxd.log" >&2
  return 1
}

stop_mpxd() {
  [ -n "$MPXD_PID" ] || return 0
  kill -TERM "$MPXD_PID" 2>/dev/null
  wait "$MPXD_PID"; local status=$?
  MPXD_PID=""
  return $status
}

cleanup() { [ -n "$MPXD_PID" ] && kill -KILL "$MPXD_PID" 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

# expect_eq WHAT EXPECTED ACTUAL
expect_eq() {
  if [ "$2" != "$3" ]; then
    printf '%s: expected\n%s\ngot\n%s\n--- mpxd log:\n' "$1" "$2" "$3" >&2
    cat "$TMP/mpxd.log" >&2
    exit 1
  fi
}
