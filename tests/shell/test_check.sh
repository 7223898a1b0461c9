#!/usr/bin/env bash
# mpxd --check: 0 for a usable script, 1 with the file and the cause otherwise.
. "$(dirname "$0")/lib.sh"
# expect_status WHAT EXPECTED: compare with $status, show the output on failure
expect_status() { [ "$status" = "$2" ] || { printf '%s: status %s, not %s; output:\n%s\n' "$1" "$status" "$2" "$out" >&2; exit 1; }; }
out=$(mpxd --check "$ROOT/handlers/chat.py" 2>&1); status=$?
expect_status "--check good status" 0
expect_eq "--check good message" "$ROOT/handlers/chat.py: ok" "$out"

printf 'def handle_request(s):\n    s.response = (\n' > "$TMP/syntax.py"
out=$(mpxd --check "$TMP/syntax.py" 2>&1); status=$?
expect_status "--check syntax error status" 1
case $out in *"$TMP/syntax.py"*"line"*) ;; *) expect_eq "--check names file and line" "..." "$out" ;; esac

printf 'def handle_close(s):\n    pass\n' > "$TMP/nohandler.py"
out=$(mpxd --check "$TMP/nohandler.py" 2>&1); status=$?
expect_status "--check missing handler status" 1
case $out in *"$TMP/nohandler.py"*handle_request*) ;; *) expect_eq "--check names handle_request" "..." "$out" ;; esac
case $out in *Traceback*) expect_eq "--check prints no traceback" "" "$out" ;; esac

out=$(mpxd --check "$TMP/missing.py" 2>&1); status=$?
expect_status "--check missing file status" 1

# the same broken script stops a real start-up with status 1
out=$(mpxd --port 0 --host 127.0.0.1 "$TMP/nohandler.py" 2>&1); status=$?
expect_status "start-up with a broken script" 1
case $out in *"listening on"*) expect_eq "no listening with a broken script" "" "$out" ;; esac
exit 0
