#!/usr/bin/env bash
# handlers/echo.py through nc: lines come back, CRLF and empty lines as SPEC 3 says.
. "$(dirname "$0")/lib.sh"
start_mpxd handlers/echo.py || exit 1
out=$(printf 'hello\nworld\n' | nc -N 127.0.0.1 "$PORT")
expect_eq "echo" $'hello\nworld' "$out"
# CR before LF removed, empty lines answered with nothing, final line without LF answered
out=$(printf 'a\r\n\n\nb\rc\nlast' | nc -N 127.0.0.1 "$PORT" | od -An -c | tr -s ' ')
expect_eq "framing" " a \n b \r c \n l a s t \n" "$out"
stop_mpxd || { echo "mpxd exited non-zero on TERM" >&2; exit 1; }
