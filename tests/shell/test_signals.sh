#!/usr/bin/env bash
# Signals as an operator sends them: HUP reloads (a broken script is refused
# and the old one keeps serving), TERM drains an open session (handle_close
# runs, the pidfile goes, exit 0), and a --daemon is stopped through its pidfile.
. "$(dirname "$0")/lib.sh"

cat >"$TMP/greet.py" <<EOF
GREETING = "hello"

def handle_request(s):
    s.response = GREETING + " " + s.request

def handle_close(s):
    with open("$TMP/closed", "a") as f:
        f.write(f"{s.id}\n")
EOF

wait_for_log() {  # wait_for_log PATTERN [FILE]: up to 5 s
  for _ in $(seq 1 100); do
    grep -q "$1" "${2:-$TMP/mpxd.log}" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "not logged: $1" >&2; cat "${2:-$TMP/mpxd.log}" >&2; exit 1
}

start_mpxd "$(realpath --relative-to="$ROOT" "$TMP/greet.py")" \
  --pidfile "$TMP/mpxd.pid" || exit 1
expect_eq "pidfile holds the pid" "$MPXD_PID" "$(cat "$TMP/mpxd.pid")"
expect_eq "before reload" "hello a" "$(printf 'a\n' | nc -N 127.0.0.1 "$PORT")"

sed -i 's/"hello"/"howdy"/' "$TMP/greet.py"
kill -HUP "$MPXD_PID"
wait_for_log "reloaded"
expect_eq "after reload" "howdy b" "$(printf 'b\n' | nc -N 127.0.0.1 "$PORT")"

printf 'def handle_request(s)\n' >"$TMP/greet.py"
kill -HUP "$MPXD_PID"
wait_for_log "reload failed, still serving the previous version: .*syntax error"
expect_eq "broken reload refused" "howdy c" "$(printf 'c\n' | nc -N 127.0.0.1 "$PORT")"

# A client that keeps its connection open while mpxd is told to stop.
(printf 'd\n'; sleep 3) | nc 127.0.0.1 "$PORT" >"$TMP/held" &
NC_PID=$!
for _ in $(seq 1 100); do grep -q "howdy d" "$TMP/held" && break; sleep 0.05; done
expect_eq "held session answered" "howdy d" "$(cat "$TMP/held")"
stop_mpxd || { echo "mpxd exited non-zero on TERM" >&2; exit 1; }
kill "$NC_PID" 2>/dev/null
expect_eq "handle_close for every session" "1 2 3 4" "$(sort -n "$TMP/closed" | tr '\n' ' ' | sed 's/ $//')"
grep -q "session 4 .* closed: shutdown" "$TMP/mpxd.log" || { echo "no shutdown close line" >&2; exit 1; }
[ ! -e "$TMP/mpxd.pid" ] || { echo "pidfile left behind" >&2; exit 1; }

# --daemon: the command returns once the daemon listens; stop it by its pidfile.
cp "$ROOT/handlers/counter.py" "$TMP/counter.py"
(cd "$TMP" && mpxd --daemon --port 0 --host 127.0.0.1 --pidfile daemon.pid \
   --log-file daemon.log counter.py) || { echo "mpxd --daemon failed" >&2; exit 1; }
DAEMON_PID=$(cat "$TMP/daemon.pid")
PORT=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$TMP/daemon.log")
expect_eq "daemon answers" "7" "$(printf '7\n' | nc -N 127.0.0.1 "$PORT")"
kill -TERM "$DAEMON_PID"
for _ in $(seq 1 100); do [ -e "$TMP/daemon.pid" ] || break; sleep 0.05; done
[ ! -e "$TMP/daemon.pid" ] || { kill -KILL "$DAEMON_PID"; echo "daemon did not stop" >&2; exit 1; }
wait_for_log "INFO stopped" "$TMP/daemon.log"
