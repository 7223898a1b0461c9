#!/usr/bin/env python3
"""Soak test for mpxd (``make soak``): many abusive clients, every answer checked.

Starts the real ``mpxd`` with ``handlers/counter.py`` on a free loopback port
and drives it from one process with a selector: 200 concurrent clients send
randomly chunked, pipelined counter requests (LF and CRLF, empty and
unparsable lines, ``N global``).  Some clients stop reading for seconds after
a large burst (the daemon must pause them, not buffer for them), some reset
the connection in the middle of a line and come back as a new session.

Every answer is compared with what the counter must say; each normal client
half-closes at the end and must get all its answers before EOF.  The daemon's
resident memory is sampled every second and printed as a curve.  Exit status
1 on any wrong or missing answer, a daemon error, or memory that keeps
growing after warm-up.

    .venv/bin/python tests/soak.py [--duration 120] [--clients 200] [--seed N]
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTER = os.path.join(ROOT, "handlers", "counter.py")
MiB = 1024 * 1024
GLOBAL = object()          # marker: an "N global" answer, checked for growth


class Failure(Exception):
    """A wrong answer or a broken promise of the daemon."""


class Daemon:
    """The mpxd under test, logging to a file."""

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mpxd", "--port", "0", "--host", "127.0.0.1",
                 COUNTER], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log())
            if match:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise Failure(f"mpxd did not start:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class Client:
    """One connection and the counter it must see."""

    def __init__(self, soak: Soak, kind: str) -> None:
        self.soak = soak
        self.kind = kind                   # "normal", "stalling" or "resetting"
        self.rng = soak.rng
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if kind == "stalling":             # a small window, so the daemon must hold back
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        self.sock.connect(("127.0.0.1", soak.port))
        self.sock.setblocking(False)
        self.count = 0
        self.last_global = 0
        self.out = bytearray()
        self.inbuf = bytearray()
        self.expected: collections.deque = collections.deque()
        self.stalled_until = 0.0
        self.reset_after_send = False
        self.finishing = False
        self.events = 0
        soak.selector.register(self.sock, selectors.EVENT_READ, self)

    # -------------------------------------------------------- requests

    def next_batch(self) -> None:
        rng = self.rng
        if self.kind == "stalling" and rng.random() < 0.3:
            lines = rng.randint(50_000, 150_000)          # a burst, then no reading
            self.out += b"1\n" * lines
            self.expected.extend(str(n).encode() for n in
                                 range(self.count + 1, self.count + lines + 1))
            self.count += lines
            self.stalled_until = time.monotonic() + rng.uniform(2.0, 5.0)
            self.watch()
            return
        parts = []
        for _ in range(rng.randint(1, 300)):
            roll = rng.random()
            if roll < 0.70:
                k = rng.randint(-5, 20)
                self.count += k
                line, answer = str(k), self.count
            elif roll < 0.80:
                k = rng.randint(1, 3)
                line, answer = f"{k} global", GLOBAL
            elif roll < 0.85:
                line, answer = rng.choice(["x", "", "abc def", "\t"]), 0
            elif roll < 0.87:                # sscanf("%d") reads "7x" as 7
                k = rng.randint(0, 9)
                self.count += k
                line, answer = f"{k}x", self.count
            elif roll < 0.90:
                k = rng.randint(0, 9)
                self.count += k
                line, answer = f"  {k}  trailing words", self.count
            else:
                line, answer = "", 0
            parts.append(line + rng.choice(["\n", "\n", "\n", "\r\n"]))
            self.expected.append(answer if answer is GLOBAL else str(answer).encode())
        data = "".join(parts).encode()
        if self.kind == "resetting" and rng.random() < 0.2:
            data += b"123"               # the middle of a line, never finished
            self.reset_after_send = True
        self.out += data
        self.watch()

    # -------------------------------------------------------------- I/O

    def watch(self) -> None:
        mask = 0
        if time.monotonic() >= self.stalled_until:
            mask |= selectors.EVENT_READ
        if self.out:
            mask |= selectors.EVENT_WRITE
        if mask != self.events:
            self.events = mask
            if mask:
                self.soak.selector.modify(self.sock, mask, self)
            else:
                self.soak.selector.modify(self.sock, selectors.EVENT_READ, self)
                self.events = selectors.EVENT_READ

    def on_writable(self) -> None:
        size = self.rng.choice([1, 2, 7, 64, 512, 4096, 65536])
        try:
            sent = self.sock.send(self.out[:size])
        except BlockingIOError:
            return
        del self.out[:sent]
        if not self.out:
            if self.reset_after_send:
                self.reset()
                return
            if self.finishing:
                self.sock.shutdown(socket.SHUT_WR)
        self.watch()

    def on_readable(self) -> None:
        if time.monotonic() < self.stalled_until:
            self.watch()
            return
        try:
            data = self.sock.recv(256 * 1024)
        except BlockingIOError:
            return
        if not data:
            self.closed_by_server()
            return
        self.inbuf += data
        end = self.inbuf.rfind(b"\n")
        if end < 0:
            return
        lines = bytes(self.inbuf[:end]).split(b"\n")
        del self.inbuf[:end + 1]
        self.check(lines)

    def check(self, lines: list[bytes]) -> None:
        expected = self.expected
        for line in lines:
            if not expected:
                raise Failure(f"{self.kind} client: unexpected extra answer {line!r}")
            want = expected.popleft()
            if want is GLOBAL:
                try:
                    value = int(line)
                except ValueError:
                    raise Failure(f"global answer {line!r} is no number") from None
                if value <= self.last_global:
                    raise Failure(f"global counter went from {self.last_global} "
                                  f"to {value}")
                self.last_global = value
            elif line != want:
                raise Failure(f"{self.kind} client: expected {want!r}, got {line!r}")
        self.soak.checked += len(lines)
        if not self.finishing and len(expected) < 50 and not self.out:
            self.next_batch()
        self.watch()

    def closed_by_server(self) -> None:
        if not self.finishing or self.out:
            raise Failure(f"{self.kind} client: the daemon closed the connection "
                          f"with {len(self.expected)} answers outstanding")
        if self.expected or self.inbuf:
            raise Failure(f"{self.kind} client: EOF with {len(self.expected)} "
                          f"answers missing, {bytes(self.inbuf[:50])!r} unterminated")
        self.soak.finished += 1
        self.close()

    def reset(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.soak.resets += 1
        self.close()
        if not self.soak.finishing:
            self.soak.spawn(self.kind)

    def finish(self) -> None:
        """Stop sending new requests; half-close once everything is sent."""
        self.finishing = True
        self.stalled_until = 0.0
        if self.reset_after_send:
            self.watch()                 # it resets once its partial line is out
            return
        if not self.out:
            self.sock.shutdown(socket.SHUT_WR)
        self.watch()

    def close(self) -> None:
        self.soak.selector.unregister(self.sock)
        self.sock.close()
        self.soak.clients.discard(self)


class Soak:
    def __init__(self, port: int, clients: int, seed: int) -> None:
        self.port = port
        self.rng = random.Random(seed)
        self.selector = selectors.DefaultSelector()
        self.clients: set[Client] = set()
        self.checked = 0
        self.finishing = False
        self.resets = 0
        self.finished = 0
        kinds = (["stalling"] * (clients // 10) + ["resetting"] * (clients // 10))
        kinds += ["normal"] * (clients - len(kinds))
        for kind in kinds:
            self.spawn(kind)

    def spawn(self, kind: str) -> None:
        client = Client(self, kind)
        self.clients.add(client)
        client.next_batch()

    def run_until(self, deadline: float, on_second) -> None:
        next_second = time.monotonic() + 1.0
        while self.clients and time.monotonic() < deadline:
            for key, mask in self.selector.select(0.05):
                client = key.data
                if client not in self.clients:
                    continue
                if mask & selectors.EVENT_WRITE:
                    client.on_writable()
                if mask & selectors.EVENT_READ and client in self.clients:
                    client.on_readable()
            now = time.monotonic()
            for client in list(self.clients):
                if client.stalled_until and now >= client.stalled_until:
                    client.stalled_until = 0.0
                    client.watch()
            if now >= next_second:
                next_second += 1.0
                on_second()


def print_curve(samples: list[int]) -> None:
    top = max(samples)
    print("daemon RSS, one sample per second:")
    for second, rss in enumerate(samples, 1):
        bar = "#" * max(1, round(50 * rss / top))
        print(f"  {second:4d}s {rss / MiB:7.1f} MiB {bar}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120.0,
                        help="seconds of load before the clients finish (default 120)")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-growth", type=float, default=12.0, metavar="MIB",
                        help="allowed RSS growth after warm-up (default 12 MiB)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    print(f"soak: {args.clients} clients for {args.duration:.0f}s, seed {seed}")

    with tempfile.TemporaryDirectory(prefix="mpxd-soak-") as tmp:
        daemon = Daemon(os.path.join(tmp, "mpxd.log"))
        samples: list[int] = []
        failure = None
        soak = None
        try:
            soak = Soak(daemon.port, args.clients, seed)
            samples.append(daemon.rss())
            soak.run_until(time.monotonic() + args.duration,
                           lambda: samples.append(daemon.rss()))
            soak.finishing = True
            for client in list(soak.clients):
                client.finish()
            soak.run_until(time.monotonic() + 60, lambda: samples.append(daemon.rss()))
            if soak.clients:
                raise Failure(f"{len(soak.clients)} clients still waiting for answers "
                              f"60 s after the end")
        except Failure as e:
            failure = str(e)
        status = daemon.stop()
        log = daemon.log()

    print_curve(samples)
    problems = []
    if failure:
        problems.append(failure)
    if status != 0:
        problems.append(f"mpxd exited with status {status} on TERM")
    for marker in ("Traceback", " ERROR "):
        if marker in log:
            problems.append(f"daemon log contains {marker.strip()!r}:\n{log[-3000:]}")
    warm = samples[len(samples) // 5: len(samples) // 5 + 10] or samples
    later = samples[-20:]
    growth = (max(later) - max(warm)) / MiB
    print(f"checked answers: {soak.checked if soak else 0}; resets: "
          f"{soak.resets if soak else 0}; clients finished cleanly: "
          f"{soak.finished if soak else 0}")
    print(f"RSS after warm-up {max(warm) / MiB:.1f} MiB, at the end {max(later) / MiB:.1f} "
          f"MiB, peak {max(samples) / MiB:.1f} MiB, growth {growth:+.1f} MiB "
          f"(allowed {args.max_growth:g})")
    if growth > args.max_growth:
        problems.append(f"RSS grew {growth:.1f} MiB after warm-up")
    if soak is not None and soak.checked == 0:
        problems.append("no answer was checked")
    for problem in problems:
        print("FAIL:", problem)
    print("soak:", "FAILED" if problems else "passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
