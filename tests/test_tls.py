"""mpxd.tls: real TLS sessions against the real daemon, with certificates made by openssl.

Every test starts its own ``mpxd`` on a free port on 127.0.0.1.  The
certificates (a CA, the server, a client "alice", and a client signed by
another CA) are generated once per module with the ``openssl`` command.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import time
import warnings

import pexpect
import pytest

from conftest import wait_until
from mpxd.tls import (TLSSetupError, certificate_expiry, expiry_problem, make_context,
                      subject_string)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="the openssl command is needed to make test certificates")

HANDLER = textwrap.dedent('''
    opens = 0

    def handle_open(s):
        global opens
        opens += 1
        s.response = f"hello {s.tls_peer}"

    def handle_request(s):
        if s.request.startswith("big "):
            s.response = "x" * int(s.request[4:])
        elif s.request == "opens":
            s.response = str(opens)
        else:
            s.response = s.request
''')


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _key_and_csr(cwd, name: str, subject: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=cwd)


def _sign(cwd, name: str, ca: str, extensions: str = "") -> None:
    args = ["x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
            f"{ca}.key", "-CAcreateserial", "-out", f"{name}.pem", "-days", "30"]
    if extensions:
        (cwd / f"{name}.ext").write_text(extensions)
        args += ["-extfile", f"{name}.ext"]
    _openssl(*args, cwd=cwd)


def _ca(cwd, name: str, subject: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30",
             "-subj", subject, cwd=cwd)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Paths of a CA, server certificates (two generations), good and bad clients."""
    d = tmp_path_factory.mktemp("certs")
    _ca(d, "ca", "/CN=mpxd test CA")
    _ca(d, "rogue", "/CN=rogue CA")
    san = "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    for name, subject in (("server", "/O=first/CN=localhost"),
                          ("server2", "/O=second/CN=localhost")):
        _key_and_csr(d, name, subject)
        _sign(d, name, "ca", san)
    _key_and_csr(d, "alice", "/C=US/O=Example, Inc./CN=alice")
    _sign(d, "alice", "ca")
    _key_and_csr(d, "mallory", "/CN=mallory")
    _sign(d, "mallory", "rogue")
    return d


def client_context(certs, client: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if client:
        context.load_cert_chain(str(certs / f"{client}.pem"), str(certs / f"{client}.key"))
    return context


class TLSClient:
    """A blocking TLS line client."""

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float = 5.0):
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = context.wrap_socket(raw, server_hostname="localhost")
        self.buf = b""

    def send_lines(self, *lines: str) -> None:
        self.sock.sendall("".join(line + "\n" for line in lines).encode())

    def readline(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed; unterminated {self.buf[:80]!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def ask(self, line: str) -> str:
        self.send_lines(line)
        return self.readline()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def handler(tmp_path):
    path = tmp_path / "tls_handler.py"
    path.write_text(HANDLER)
    return str(path)


def start(mpxd, certs, handler, *extra: str, cert: str = "server"):  # noqa: F811
    d = mpxd(["--port", "0", "--host", "127.0.0.1", "--tls-cert", str(certs / f"{cert}.pem"),
              "--tls-key", str(certs / f"{cert}.key"), *extra, handler])
    d.wait_listening()
    return d


def test_tls_session_serves_the_unchanged_handler(mpxd, certs, handler):  # noqa: F811
    d = start(mpxd, certs, handler)
    c = TLSClient(d.port, client_context(certs))
    assert c.readline() == "hello None"
    assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
    c.send_lines("one", "two", "", "three")           # pipelined
    assert [c.readline() for _ in range(3)] == ["one", "two", "three"]
    c.close()
    assert d.stop() == 0


def test_tls_large_responses_arrive_whole(mpxd, certs, handler):  # noqa: F811
    d = start(mpxd, certs, handler)
    c = TLSClient(d.port, client_context(certs), timeout=20)
    c.readline()
    sizes = [1, 70_000, 1_500_000, 3]
    c.send_lines(*[f"big {n}" for n in sizes])
    time.sleep(0.2)            # let the server fill the socket: partial writes
    for n in sizes:
        assert c.readline() == "x" * n
    assert c.ask("still here") == "still here"
    c.close()
    assert d.stop() == 0


@pytest.mark.parametrize("how", ["idle timeout", "client eof"])
def test_tls_sessions_closed_with_nothing_to_write_end_with_close_notify(
        mpxd, certs, handler, how):  # noqa: F811
    # Only a close that wrote something sent close_notify; an idle timeout
    # or an EOF ended in a bare TCP close, which strict clients report as
    # a truncation (UNEXPECTED_EOF_WHILE_READING).
    d = start(mpxd, certs, handler, "--idle-timeout", "0.5")
    raw = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    sock = client_context(certs).wrap_socket(raw, server_hostname="localhost",
                                             suppress_ragged_eofs=False)
    assert sock.recv(100) == b"hello None\n"
    if how == "client eof":
        socket.socket.shutdown(sock, socket.SHUT_WR)
    assert sock.recv(100) == b""                # not ssl.SSLEOFError
    sock.close()
    d.wait_for(r"session 1 127\.0\.0\.1:\d+ closed: " + ("timeout" if how == "idle timeout"
                                                        else "eof"))
    assert d.stop() == 0


def test_tls_client_eof_gets_remaining_answers_then_close_notify(mpxd, certs, handler):  # noqa: F811
    d = start(mpxd, certs, handler)
    c = TLSClient(d.port, client_context(certs))
    c.readline()
    c.sock.sendall(b"a\nb\nlast without newline")
    # A TCP half-close under the TLS layer, as nc -N does (SSLSocket.shutdown
    # would also drop the client's TLS state).
    socket.socket.shutdown(c.sock, socket.SHUT_WR)
    assert [c.readline() for _ in range(3)] == ["a", "b", "last without newline"]
    assert c.sock.recv(100) == b""           # a clean TLS close (close_notify), no error
    c.close()
    d.wait_for(r"session 1 127\.0\.0\.1:\d+ closed: eof")
    assert d.stop() == 0


def test_client_certificate_subject_is_tls_peer(mpxd, certs, handler):  # noqa: F811
    d = start(mpxd, certs, handler, "--tls-ca", str(certs / "ca.pem"))
    expected = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253",
         "-in", str(certs / "alice.pem")], capture_output=True, text=True,
        check=True).stdout.strip().removeprefix("subject=")
    assert expected == r"CN=alice,O=Example\, Inc.,C=US"
    c = TLSClient(d.port, client_context(certs, "alice"))
    assert c.readline() == f"hello {expected}"
    c.close()
    assert d.stop() == 0


@pytest.mark.parametrize("client", [None, "mallory"], ids=["no-cert", "other-ca"])
def test_bad_client_certificate_fails_alone(mpxd, certs, handler, client):  # noqa: F811
    d = start(mpxd, certs, handler, "--tls-ca", str(certs / "ca.pem"))
    good = TLSClient(d.port, client_context(certs, "alice"))
    good.readline()
    with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
        # TLS 1.3: the client learns of the rejection at its first read.
        bad = TLSClient(d.port, client_context(certs, client))
        bad.readline()
    d.wait_for(r"INFO TLS handshake with 127\.0\.0\.1:\d+ failed: ")
    assert good.ask("opens") == "1"          # no handler ran for the rejected client
    good.close()
    assert d.stop() == 0


def test_stalled_handshake_times_out_without_blocking_others(mpxd, certs, handler):  # noqa: F811
    d = start(mpxd, certs, handler, "--tls-handshake-timeout", "0.5")
    stalled = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    stalled.sendall(b"\x16\x03\x01\x02\x00\x01")   # the start of a ClientHello, then nothing
    silent = socket.create_connection(("127.0.0.1", d.port), timeout=10)
    good = TLSClient(d.port, client_context(certs))  # served while the others stall
    assert good.readline() == "hello None"
    assert good.ask("ping") == "ping"
    assert stalled.recv(100) == b""                 # closed by the timeout
    assert silent.recv(100) == b""
    d.wait_for(r"TLS handshake with 127\.0\.0\.1:\d+ failed: timed out after 0\.5s")
    assert good.ask("opens") == "1"
    for sock in (stalled, silent, good):
        sock.close()
    assert d.stop() == 0


def test_handshakes_in_progress_count_toward_max_connections(mpxd, certs, handler):  # noqa: F811
    # Each holds a descriptor: uncounted, clients that never handshake could
    # take every descriptor whatever --max-connections says.
    d = start(mpxd, certs, handler, "--max-connections", "2")
    silent = [socket.create_connection(("127.0.0.1", d.port), timeout=10) for _ in range(2)]
    time.sleep(0.3)                         # both accepted: the limit is reached
    waiting = socket.create_connection(("127.0.0.1", d.port), timeout=10)  # the backlog
    tls = client_context(certs).wrap_socket(waiting, server_hostname="localhost",
                                            do_handshake_on_connect=False)
    tls.settimeout(0.5)
    with pytest.raises(socket.timeout):     # not accepted, so nobody answers
        tls.do_handshake()
    silent[0].close()                       # a place frees: it is accepted now
    tls.settimeout(10)
    tls.do_handshake()
    tls.sendall(b"in\n")
    answers = b""
    while answers.count(b"\n") < 2:
        answers += tls.recv(100)
    assert answers == b"hello None\nin\n"
    tls.close()
    silent[1].close()
    assert d.stop() == 0


def test_plain_text_client_is_refused_and_logged(mpxd, certs, handler):  # noqa: F811
    d = start(mpxd, certs, handler)
    plain = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    plain.sendall(b"hello there, no TLS here\n")
    plain.recv(4096)                         # a TLS alert, or nothing
    d.wait_for(r"INFO TLS handshake with 127\.0\.0\.1:\d+ failed: ")
    plain.close()
    good = TLSClient(d.port, client_context(certs))
    assert good.readline() == "hello None"
    good.close()
    assert d.stop() == 0


def test_failed_handshakes_are_summarised_not_logged_one_by_one(mpxd, certs, handler):  # noqa: F811
    # 300 plain-text clients wrote 300 INFO lines: a scanner could fill the log.
    d = start(mpxd, certs, handler)
    for _ in range(30):
        plain = socket.create_connection(("127.0.0.1", d.port), timeout=5)
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
        plain.recv(4096)                     # a TLS alert, or nothing
        plain.close()
    # One summary a second: on a slow machine the 29 may span two of them.
    summaries = re.compile(r"INFO (\d+) more TLS handshakes? failed in the last 1s: "
                           r"\d+ http request; from 127\.0\.0\.1 \(\d+\)\n")
    assert wait_until(lambda: sum(int(n) for n in summaries.findall(d.log())) == 29,
                      timeout=5), d.log()
    log = d.log()
    assert log.count("failed: http request") == 1
    assert "(more failures are summarised every 1s)" in log
    good = TLSClient(d.port, client_context(certs))
    assert good.readline() == "hello None"
    good.close()
    assert d.stop() == 0


def test_tls_below_1_2_is_refused(mpxd, certs, handler):  # noqa: F811
    d = start(mpxd, certs, handler)
    old = client_context(certs)
    try:
        with warnings.catch_warnings():     # TLS 1.1 is deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            old.set_ciphers("DEFAULT:@SECLEVEL=0")
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with pytest.raises((ssl.SSLError, ConnectionError)) as failure:
        TLSClient(d.port, old)
    if "NO_PROTOCOLS_AVAILABLE" in str(failure.value):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    d.wait_for(r"TLS handshake with 127\.0\.0\.1:\d+ failed: ")
    assert d.stop() == 0


def test_hup_reloads_certificates_and_keeps_old_on_error(mpxd, certs, handler, tmp_path):  # noqa: F811
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(certs / "server.pem", cert)
    shutil.copy(certs / "server.key", key)
    control = str(tmp_path / "ctl")
    d = mpxd(["--port", "0", "--host", "127.0.0.1", "--tls-cert", str(cert),
              "--tls-key", str(key), "--control", control, handler])
    d.wait_listening()

    def organisation() -> str:
        c = TLSClient(d.port, client_context(certs))
        c.readline()
        subject = dict(item for rdn in c.sock.getpeercert()["subject"] for item in rdn)
        c.close()
        return subject["organizationName"]

    before = TLSClient(d.port, client_context(certs))
    before.readline()
    assert organisation() == "first"
    shutil.copy(certs / "server2.pem", cert)
    shutil.copy(certs / "server2.key", key)
    d.signal(signal.SIGHUP)
    d.wait_for(r"reloaded TLS certificate")
    assert organisation() == "second"
    assert before.ask("old session") == "old session"   # sessions keep their keys

    shutil.copy(certs / "server.key", key)        # key no longer matches the certificate
    offset = len(d.log())
    d.signal(signal.SIGHUP)
    d.wait_for(r"ERROR TLS reload failed, still using the previous certificate: ",
               since=offset)
    assert organisation() == "second"
    # mpxctl reload (and systemd's status) say so, though the script reloaded:
    # a certificate renewal hook must see that the new one was refused.
    reload = subprocess.run([sys.executable, "-m", "mpxd.mpxctl", "reload", "-c", control],
                            capture_output=True, text=True, timeout=30)
    assert reload.returncode == 1, reload.stderr
    assert "TLS certificate refused, the previous one still serves" in reload.stderr
    before.close()
    assert d.stop() == 0


def test_unusable_certificate_stops_startup(certs, tmp_path, handler):
    command = [sys.executable, "-m", "mpxd", "--port", "0", "--host", "127.0.0.1"]
    mismatched = subprocess.run(
        command + ["--tls-cert", str(certs / "server.pem"), "--tls-key",
                   str(certs / "alice.key"), handler],
        capture_output=True, text=True, timeout=30, env=dict(os.environ, PYTHONPATH="."))
    assert mismatched.returncode == 1
    assert "cannot use TLS certificate" in mismatched.stderr
    assert "key values mismatch" in mismatched.stderr
    keyless = subprocess.run(command + ["--tls-key", str(certs / "server.key"), handler],
                             capture_output=True, text=True, timeout=30)
    assert keyless.returncode == 2
    assert "--tls-key needs --tls-cert" in keyless.stderr


def test_certificate_or_key_missing_from_a_file_is_named(certs, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    server, key = str(certs / "server.pem"), str(certs / "server.key")
    cases = [((str(garbage), key), f"{garbage} holds no PEM certificate"),
             ((key, key), f"{key} holds no PEM certificate"),
             ((server, server), f"no PEM private key in {server}"),
             ((server, None), f"no PEM private key in {server} (give the key file with --tls-key)")]
    for (cert_file, key_file), reason in cases:
        with pytest.raises(TLSSetupError) as caught:
            make_context(cert_file, key_file, None)
        assert str(caught.value).endswith(reason) or reason + " (" in str(caught.value), caught.value


def test_encrypted_key_fails_at_once_instead_of_asking_on_the_terminal(certs, tmp_path, handler):
    encrypted = tmp_path / "encrypted.key"
    _openssl("pkey", "-in", str(certs / "server.key"), "-aes256", "-passout", "pass:secret",
             "-out", str(encrypted), cwd=tmp_path)
    # On a terminal, OpenSSL's default is to prompt there and wait for an answer.
    child = pexpect.spawn(sys.executable, ["-m", "mpxd", "--port", "0", "--host", "127.0.0.1",
                                           "--tls-cert", str(certs / "server.pem"),
                                           "--tls-key", str(encrypted), handler],
                          timeout=20, encoding="utf-8")
    index = child.expect([r"the key is encrypted and a daemon cannot ask for its pass phrase",
                          r"pass phrase:", pexpect.EOF, pexpect.TIMEOUT])
    assert index == 0, child.before
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1


def test_the_test_kits_client_speaks_tls_to_a_tls_server(mpxd_server, certs, handler):
    # mpxd_server is where the README sends TLS tests, yet its client()
    # spoke plain text to a server that expected a handshake.
    server = mpxd_server(handler, tls_cert=str(certs / "server.pem"),
                         tls_key=str(certs / "server.key"), tls_ca=str(certs / "ca.pem"))
    with server.client() as anonymous:
        with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
            anonymous.readline()        # --tls-ca: no client certificate, no session
    with server.client(cert=str(certs / "alice.pem"), key=str(certs / "alice.key")) as c:
        assert c.readline() == "hello CN=alice,O=Example\\, Inc.,C=US"
        assert c.ask("over TLS") == "over TLS"
        assert isinstance(c.sock, ssl.SSLSocket)
        with pytest.raises(ValueError, match="cannot be half-closed"):
            c.shutdown_write()


def test_the_test_kits_client_trusts_only_the_servers_own_certificate(mpxd_server, certs,
                                                                      handler):
    from mpxd.testing import Server
    server = mpxd_server(handler, "--tls-cert", str(certs / "server.pem"),
                         "--tls-key", str(certs / "server.key"))
    assert server.tls_cert == str(certs / "server.pem")
    with server.client() as c:
        assert c.readline() == "hello None"
    server.tls_cert = str(certs / "server2.pem")    # another certificate of the same CA
    with pytest.raises(ssl.SSLCertVerificationError):
        server.client()
    assert isinstance(server, Server)


# ------------------------------------------------------------ expiry

def _self_signed(cwd, name: str, days: int) -> str:
    """A certificate (v3, self-signed) valid for ``days``; its path."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", str(days),
             "-subj", "/CN=localhost", cwd=cwd)
    return str(cwd / f"{name}.pem")


def _openssl_end_date(path: str) -> datetime.datetime:
    out = subprocess.run(["openssl", "x509", "-in", path, "-noout", "-enddate"],
                         check=True, capture_output=True, text=True).stdout
    text = out.strip().split("=", 1)[1]                 # Dec  2 03:44:54 2026 GMT
    return datetime.datetime.strptime(" ".join(text.split()), "%b %d %H:%M:%S %Y GMT") \
        .replace(tzinfo=datetime.timezone.utc)


def test_certificate_expiry_reads_what_openssl_reads(certs, tmp_path):
    # v3 self-signed (CA), v1 signed by a CA without extensions (alice),
    # v3 with extensions (server), a year past 2049 (GeneralizedTime).
    paths = [str(certs / f"{name}.pem") for name in ("ca", "alice", "server")]
    paths.append(_self_signed(tmp_path, "far", 365 * 40))
    for path in paths:
        assert certificate_expiry(path) == _openssl_end_date(path), path
    assert certificate_expiry(paths[-1]).year >= 2050
    chain = tmp_path / "chain.pem"                      # leaf first, then its CA
    chain.write_text((certs / "server.pem").read_text() + (certs / "ca.pem").read_text())
    assert certificate_expiry(str(chain)) == _openssl_end_date(paths[2])
    assert certificate_expiry(str(certs / "server.key")) is None
    assert certificate_expiry(str(tmp_path / "missing.pem")) is None
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n"
                                          "-----END CERTIFICATE-----\n")
    assert certificate_expiry(str(tmp_path / "garbage.pem")) is None


def test_expiry_problem_warns_within_14_days_and_after(certs):
    path = str(certs / "server.pem")
    expires = certificate_expiry(path)
    day = datetime.timedelta(days=1)
    assert expiry_problem(path, now=expires - 15 * day) is None
    assert expiry_problem(path, now=expires - 2 * day) == (
        f"TLS certificate {path} expires on {expires:%Y-%m-%d %H:%M} UTC, in 2.0 days: "
        f"renew it and send HUP")
    assert expiry_problem(path, now=expires + day) == (
        f"TLS certificate {path} expired on {expires:%Y-%m-%d %H:%M} UTC: clients that "
        f"check it refuse to connect; renew it and send HUP")


def test_a_certificate_about_to_expire_is_warned_about_at_start_and_on_hup(
        mpxd, tmp_path, handler):  # noqa: F811
    cert = _self_signed(tmp_path, "soon", 3)
    d = mpxd(["--port", "0", "--host", "127.0.0.1", "--tls-cert", cert,
              "--tls-key", str(tmp_path / "soon.key"), handler])
    d.wait_listening()
    warning = rf"WARNING TLS certificate {re.escape(cert)} expires on .* in [23]\.\d days: "
    d.wait_for(warning)
    since = len(d.log())
    d.signal(signal.SIGHUP)
    d.wait_for(warning, since=since)
    assert d.stop() == 0


def test_workers_warn_of_an_expiring_certificate_once_not_each(mpxd, tmp_path,
                                                              handler):  # noqa: F811
    cert = _self_signed(tmp_path, "soon", 3)
    d = mpxd(["--workers", "2", "--port", "0", "--host", "127.0.0.1", "--tls-cert", cert,
              "--tls-key", str(tmp_path / "soon.key"), handler])
    d.wait_listening()
    d.signal(signal.SIGHUP)
    assert wait_until(lambda: d.log().count("reloaded TLS certificate") == 2, timeout=10)
    time.sleep(0.2)
    assert d.log().count(f"WARNING TLS certificate {cert} expires on") == 2   # start, HUP
    assert d.stop() == 0


def test_a_certificate_far_from_expiry_is_not_warned_about(mpxd, certs, handler):  # noqa: F811
    d = start(mpxd, certs, handler)
    assert d.stop() == 0
    assert "WARNING" not in d.log()


def test_subject_string_escapes_as_rfc4514():
    cert = {"subject": ((("countryName", "US"),), (("organizationName", "A, B+C"),),
                        (("commonName", " lead"),))}
    assert subject_string(cert) == r"CN=\ lead,O=A\, B\+C,C=US"
    # A newline in a CN would be a line of its own in logs and in the control
    # protocol ("mallory\nOK 0 sessions" cut mpxctl's session list short).
    cert = {"subject": ((("commonName", "mallory\nOK 0 sessions\x00"),),)}
    assert subject_string(cert) == r"CN=mallory\0AOK 0 sessions\00"
    assert subject_string({}) is None
    assert subject_string(None) is None


class BundlingClient:
    """A TLS client on memory BIOs: what it sends goes out when it says so, in one piece."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.raw.sendall(self.outgoing.read())
                self.incoming.write(self.raw.recv(65536))
        # The client's Finished is still in self.outgoing: sent with what follows.

    def send(self, data: bytes, close_notify: bool = False) -> None:
        self.tls.write(data)
        if close_notify:
            try:
                self.tls.unwrap()
            except ssl.SSLWantReadError:
                pass
        self.raw.sendall(self.outgoing.read())

    def lines_with_times(self, count: int) -> list[float]:
        """When each of the next ``count`` lines arrived, after this call."""
        began, seen, text = time.monotonic(), [], b""
        while len(seen) < count:
            data = self.raw.recv(65536)
            assert data, f"closed after {len(seen)} lines"
            self.incoming.write(data)
            while True:
                try:
                    chunk = self.tls.read(65536)
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    break
                if not chunk:
                    break
                text += chunk
                while b"\n" in text:
                    _, _, text = text.partition(b"\n")
                    seen.append(time.monotonic() - began)
        return seen


@pytest.mark.parametrize("how", ["with the handshake's Finished", "before a close_notify"])
def test_max_rate_holds_tls_lines_back_too(mpxd, certs, handler, how):  # noqa: F811
    # Lines sent along with the client's Finished went past --max-rate (they
    # were framed before the rate was in place), and a close_notify after a
    # burst handed out every held line at once.
    d = start(mpxd, certs, handler, "--max-rate", "20")
    c = BundlingClient(d.port, client_context(certs))
    lines = b"".join(b"%d\n" % i for i in range(40))    # 20 at once, 20 over a second
    if how == "with the handshake's Finished":
        c.send(lines)
    else:
        c.send(b"")                                     # the Finished alone
        c.send(lines, close_notify=True)
    times = c.lines_with_times(41)                      # the greeting, then 40
    assert times[-1] >= 0.7, times                      # not all at once
    c.raw.close()
    d.wait_for(r"closed: \w+, [\d.]+s, 40 requests")
    assert d.stop() == 0
