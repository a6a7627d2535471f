from __future__ import annotations

import datetime as dt
import email
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from filex_agent.logging_setup import clear_secrets
from filex_agent.notify import Notification, Notifier, SmtpSettings, parse_retry_after

aiosmtpd = pytest.importorskip("aiosmtpd", reason="aiosmtpd (dev dependency) is not installed")
from aiosmtpd.controller import Controller  # noqa: E402
from aiosmtpd.smtp import AuthResult, LoginPassword  # noqa: E402


def _rejected(file: str = "trades_20250101.txt") -> Notification:
    return Notification(kind="REJECTED", subject=f"{file} was rejected by FINRA",
                        text=f"FINRA rejected {file}; resubmit the whole file.", submission_id=42,
                        file=file, route="focus-0001",
                        feedback=[f"/srv/filex/focus/feedback/{file}.rejected.txt"])


# -- webhook receiver -----------------------------------------------------------------------

class Receiver:
    """A real HTTP server on loopback that answers with scripted statuses."""

    def __init__(self) -> None:
        self.requests: list[tuple[float, dict[str, Any]]] = []
        self.script: list[tuple[int, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((time.monotonic(), json.loads(body)))
                status, headers = outer.script.pop(0) if outer.script else (200, {})
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T0KEN-in-path"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()
    clear_secrets()


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_webhook_receives_json(receiver: Receiver) -> None:
    n = Notifier(webhook_url=receiver.url)
    try:
        assert n.notify(_rejected(), key="sub-42") is True
        assert n.flush(10)
    finally:
        n.stop()
    assert len(receiver.requests) == 1
    body = receiver.requests[0][1]
    assert body["kind"] == "REJECTED" and body["submission_id"] == 42
    assert body["file"] == "trades_20250101.txt" and body["route"] == "focus-0001"
    assert body["feedback"] == ["/srv/filex/focus/feedback/trades_20250101.txt.rejected.txt"]
    assert body["key"] == "sub-42"
    assert "Feedback:\n  /srv/filex/focus/feedback/trades_20250101.txt.rejected.txt" in body["message"]
    assert "resubmit the whole file" in body["text"]


@pytest.mark.parametrize("status", [503, 429])
def test_webhook_retried_honouring_retry_after(receiver: Receiver, status: int) -> None:
    receiver.script = [(status, {"Retry-After": "1"})]
    # Backoff alone would wait 30 s: finishing in about 1 s proves Retry-After was used.
    n = Notifier(webhook_url=receiver.url, backoff_initial=30, backoff_max=30)
    try:
        t0 = time.monotonic()
        assert n.notify(_rejected(), key="k")
        assert n.flush(10)
        assert time.monotonic() - t0 < 10
    finally:
        n.stop()
    assert len(receiver.requests) == 2
    gap = receiver.requests[1][0] - receiver.requests[0][0]
    assert 0.9 <= gap < 5


def test_webhook_permanent_error_not_retried_and_key_rearmed(receiver: Receiver, caplog) -> None:
    receiver.script = [(400, {})]
    clock = Clock()
    n = Notifier(webhook_url=receiver.url, clock=clock, backoff_initial=0.01)
    try:
        with caplog.at_level(logging.ERROR, logger="filex_agent.notify"):
            assert n.notify(_rejected(), key="k")
            assert n.flush(10)
        assert len(receiver.requests) == 1
        assert "HTTP 400" in caplog.text
        assert "T0KEN" not in caplog.text  # the URL's token path is never logged
        # Not delivered anywhere: the next occurrence alerts again at once.
        assert n.notify(_rejected(), key="k")
        assert n.flush(10)
        assert len(receiver.requests) == 2
    finally:
        n.stop()


def test_webhook_gives_up_after_max_attempts(receiver: Receiver) -> None:
    receiver.script = [(500, {})] * 10
    n = Notifier(webhook_url=receiver.url, max_attempts=3, backoff_initial=0.01, backoff_max=0.02)
    try:
        assert n.notify(_rejected(), key="k")
        assert n.flush(10)
    finally:
        n.stop()
    assert len(receiver.requests) == 3


def test_dedup_realert_and_resolve(receiver: Receiver) -> None:
    clock = Clock()
    n = Notifier(webhook_url=receiver.url, realert_seconds=3600, clock=clock)
    try:
        assert n.notify(_rejected(), key="route-down:r1")
        clock.now += 1800
        assert n.notify(_rejected(), key="route-down:r1") is False  # same problem, within window
        assert n.notify(_rejected("other.txt"), key="sub-43") is True  # another problem
        clock.now += 1801
        assert n.notify(_rejected(), key="route-down:r1") is True  # re-alert after the window
        n.resolve("route-down:r1")
        assert n.notify(_rejected(), key="route-down:r1") is True  # problem came back: at once
        assert n.flush(10)
    finally:
        n.stop()
    assert [r[1]["key"] for r in receiver.requests].count("route-down:r1") == 3
    assert len(receiver.requests) == 4


def test_no_channel_still_logs(caplog) -> None:
    n = Notifier()
    with caplog.at_level(logging.WARNING, logger="filex_agent.notify"):
        assert n.notify(_rejected(), key="k") is False
    assert "ALERT REJECTED: trades_20250101.txt was rejected by FINRA" in caplog.text
    n.stop()


def test_notification_kind_validated() -> None:
    with pytest.raises(ValueError):
        Notification(kind="OOPS", subject="s", text="t", submission_id=None, file=None, route=None, feedback=[])


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = dt.datetime.fromtimestamp(1000 + 30, dt.timezone.utc)
    assert parse_retry_after(format_datetime(later, usegmt=True), now=1000) == pytest.approx(30)


# -- SMTP with STARTTLS -----------------------------------------------------------------------

def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[email.message.Message, list[str], bool]] = []
        self.logins: list[tuple[str, str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        msg = email.message_from_bytes(envelope.original_content)
        self.messages.append((msg, list(envelope.rcpt_tos), session.ssl is not None))
        return "250 OK"

    def authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        if isinstance(data, LoginPassword):
            self.logins.append((data.login.decode(), data.password.decode()))
            ok = data.login == b"alerts" and data.password == b"smtp-Pa55word"
            return AuthResult(success=ok)
        return AuthResult(success=False)


def _free_port() -> int:
    # aiosmtpd's Controller cannot bind port 0 (it probes the port it was given).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def smtp_server(tmp_path: Path) -> Iterator[tuple[Mailbox, int, Path]]:
    cert, key = _self_signed(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    box = Mailbox()
    ctl = Controller(box, hostname="127.0.0.1", port=_free_port(), tls_context=tls, require_starttls=True,
                     authenticator=box.authenticate, auth_require_tls=True)
    ctl.start()
    yield box, ctl.port, cert
    ctl.stop()
    clear_secrets()


def test_smtp_starttls_delivers(smtp_server: tuple[Mailbox, int, Path]) -> None:
    box, port, cert = smtp_server
    settings = SmtpSettings(host="127.0.0.1", port=port, username="alerts", password="smtp-Pa55word",
                            from_addr="filex-agent@example.com", to_addrs=["ops@example.com", "cc@example.com"],
                            ca_file=cert)
    assert "smtp-Pa55word" not in repr(settings)
    n = Notifier(smtp=settings, timeout=5)
    try:
        assert n.notify(_rejected(), key="sub-42")
        assert n.flush(15)
    finally:
        n.stop()
    assert box.logins == [("alerts", "smtp-Pa55word")]
    assert len(box.messages) == 1
    msg, rcpts, over_tls = box.messages[0]
    assert over_tls
    assert rcpts == ["ops@example.com", "cc@example.com"]
    assert msg["Subject"] == "[filex-agent] REJECTED: trades_20250101.txt was rejected by FINRA"
    assert msg["From"] == "filex-agent@example.com"
    body = msg.get_payload(decode=True).decode()
    assert "File:       trades_20250101.txt" in body
    assert "/srv/filex/focus/feedback/trades_20250101.txt.rejected.txt" in body
    assert "Submission: 42" in body


def test_smtp_untrusted_certificate_refused(smtp_server: tuple[Mailbox, int, Path], caplog) -> None:
    box, port, _ = smtp_server
    settings = SmtpSettings(host="127.0.0.1", port=port, username="alerts", password="smtp-Pa55word",
                            from_addr="a@example.com", to_addrs=["ops@example.com"])  # no ca_file
    n = Notifier(smtp=settings, timeout=5, backoff_initial=5)
    try:
        with caplog.at_level(logging.ERROR, logger="filex_agent.notify"):
            assert n.notify(_rejected(), key="k")
            t0 = time.monotonic()
            assert n.flush(15)
            assert time.monotonic() - t0 < 4  # certificate errors are not retried
    finally:
        n.stop()
    assert box.messages == [] and box.logins == []
    assert "SSLCertVerificationError" in caplog.text
    assert "smtp-Pa55word" not in caplog.text


def test_smtp_no_login_without_tls(smtp_server: tuple[Mailbox, int, Path]) -> None:
    box, port, cert = smtp_server
    settings = SmtpSettings(host="127.0.0.1", port=port, username="alerts", password="smtp-Pa55word",
                            from_addr="a@example.com", to_addrs=["ops@example.com"], starttls=False)
    n = Notifier(smtp=settings, timeout=5)
    try:
        assert n.notify(_rejected(), key="k")
        assert n.flush(15)
    finally:
        n.stop()
    assert box.messages == [] and box.logins == []
