#!/usr/bin/env bash
# mpxd --check: 0 for a usable script, 1 with the file and the cause otherwise.
. "$(dirname "$0")/lib.sh"
out=$(mpxd --check "$ROOT/handlers/chat.py" 2>&1); status=$?
expect_eq "--check good status" "0" "$status"
expect_eq "--check good message" "$ROOT/handlers/chat.py: ok" "$out"

printf 'def handle_request(s):\n    s.response = (\n' > "$TMP/syntax.py"
out=$(mpxd --check "$TMP/syntax.py" 2>&1); status=$?
expect_eq "--check syntax error status" "1" "$status"
case $out in *"$TMP/syntax.py"*"line"*) ;; *) expect_eq "--check names file and line" "..." "$out" ;; esac

printf 'def handle_close(s):\n    pass\n' > "$TMP/nohandler.py"
out=$(mpxd --check "$TMP/nohandler.py" 2>&1); status=$?
expect_eq "--check missing handler status" "1" "$status"
case $out in *"$TMP/nohandler.py"*handle_request*) ;; *) expect_eq "--check names handle_request" "..." "$out" ;; esac
case $out in *Traceback*) expect_eq "--check prints no traceback" "" "$out" ;; esac

out=$(mpxd --check "$TMP/missing.py" 2>&1); status=$?
expect_eq "--check missing file status" "1" "$status"

# the same broken script stops a real start-up with status 1
mpxd --port 0 --host 127.0.0.1 "$TMP/nohandler.py" 2>"$TMP/start.log"; status=$?
expect_eq "start-up with a broken script" "1" "$status"
grep -q "listening on" "$TMP/start.log" && { echo "listened despite a broken script" >&2; exit 1; }
exit 0
