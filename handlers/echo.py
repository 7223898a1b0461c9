"""Echo: every line comes back as it was sent.

Try it:
    mpxd --port 47110 handlers/echo.py
    printf 'hello\nworld\n' | nc -N localhost 47110      # prints hello, world

Any bytes survive the round trip (mpxd decodes and encodes with
surrogateescape), so this is also a quick way to see the framing rules: a CR
before the LF is removed, an empty line is echoed as nothing (an empty
response sends no line).
"""


def handle_request(s):
    s.response = s.request
