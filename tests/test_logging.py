from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from filex_agent.logging_setup import clear_secrets, configure_logging, redact, register_secret

log = logging.getLogger("filex_agent.test")

# (text containing a secret, the secret that must vanish, what must remain)
CASES = [
    ("Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln", "eyJhbGciOiJSUzI1NiJ9", "Bearer ***"),
    ("sending Bearer 9f8e7d6c5b4a39281706 to fileX", "9f8e7d6c5b4a39281706", "to fileX"),
    ("headers={'Authorization': 'Basic Y2xpZW50OnMzY3JldA=='}", "Y2xpZW50OnMzY3JldA==", "Basic ***"),
    ("token endpoint used Basic Y2xpZW50OnMzY3JldA==", "Y2xpZW50OnMzY3JldA==", "Basic ***"),
    ('{"access_token": "eyJraWQiOiJ0b2tlbiJ9", "token_type": "Bearer", "expires_in": "43170"}',
     "eyJraWQiOiJ0b2tlbiJ9", '"expires_in": "43170"'),
    ("{'client_secret': 'cs-Very-Secret-1'}", "cs-Very-Secret-1", "'client_secret': '***'"),
    ("login user=prime password=hunter2!x host=sftp", "hunter2!x", "host=sftp"),
    ("sftp_password = 'p a s s'", "p a s s", "sftp_password = '***'"),
    ('"sessionToken":"FwoGZXIvYXdzEJr//////////wEaDA"', "FwoGZXIvYXdzEJr", '"sessionToken":"***"'),
    ('{"secretAccessKey": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"}', "wJalrXUtnFEMI", '"secretAccessKey": "***"'),
    ("PUT https://bkt.s3.amazonaws.com/0001/app1/in/f.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
     "&X-Amz-Credential=ASIAEXAMPLE%2F20250101%2Fus-east-1&X-Amz-Signature=0badc0ffee1234"
     "&X-Amz-Security-Token=IQoJb3JpZ2luX2VjEBAaCXVz",
     "ASIAEXAMPLE", "X-Amz-Algorithm=AWS4-HMAC-SHA256"),
    ("X-Amz-Signature=0badc0ffee1234&X-Amz-Date=20250101T000000Z", "0badc0ffee1234", "X-Amz-Date=20250101T000000Z"),
    ("X-Amz-Security-Token=IQoJb3JpZ2luX2VjEBAaCXVz", "IQoJb3JpZ2luX2VjEBAaCXVz", "X-Amz-Security-Token=***"),
]

NORMAL = [
    "uploaded 0001/app1/in/report.txt (1234 bytes) tracking id 6f1c2e",
    "Basic authentication failed for user prime",
    "the password is wrong; check credentials.fip.client_secret: must be a reference",
    "GET https://filex.finra.org/files/0001/app1/out?page=2&size=100",
    "expires_in=43170 token_type=Bearer",
]


@pytest.fixture
def capture() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    text, js = io.StringIO(), io.StringIO()
    yield text, js
    clear_secrets()
    logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers
                                       if not getattr(h, "_filex_handler", False)]


def _emit_both(capture: tuple[io.StringIO, io.StringIO], emit) -> tuple[str, list[dict]]:
    text, js = capture
    configure_logging("DEBUG", "text", stream=text)
    emit()
    configure_logging("DEBUG", "json", stream=js)
    emit()
    return text.getvalue(), [json.loads(line) for line in js.getvalue().splitlines()]


@pytest.mark.parametrize("message,secret,kept", CASES)
def test_patterns_redacted_text_and_json(capture, message: str, secret: str, kept: str) -> None:
    text, records = _emit_both(capture, lambda: log.info(message))
    assert secret not in text and kept in text
    assert len(records) == 1
    assert secret not in records[0]["message"] and kept in records[0]["message"]
    assert records[0]["level"] == "INFO" and records[0]["logger"] == "filex_agent.test"


@pytest.mark.parametrize("message,secret,kept", CASES[:6])
def test_patterns_redacted_in_args(capture, message: str, secret: str, kept: str) -> None:
    text, records = _emit_both(capture, lambda: log.warning("request failed: %s (%d)", message, 401))
    assert secret not in text and "(401)" in text
    assert secret not in json.dumps(records)


@pytest.mark.parametrize("message", NORMAL)
def test_normal_text_untouched(capture, message: str) -> None:
    text, records = _emit_both(capture, lambda: log.info(message))
    assert text.rstrip("\n").endswith(": " + message)
    assert records[0]["message"] == message


def test_registered_secret_in_message_args_exception_and_extra(capture) -> None:
    register_secret("Tr0ub4dor&3")
    register_secret("ab")  # too short to register: would shred ordinary text

    def emit() -> None:
        log.info("resolved secret Tr0ub4dor&3 for %s", "fip")
        log.info("arg: %s", "x=Tr0ub4dor%263")  # URL-encoded form
        log.info("with extra", extra={"detail": "pw Tr0ub4dor&3", "headers": {"password": "zz", "n": 1}})
        try:
            raise RuntimeError("login failed with Tr0ub4dor&3")
        except RuntimeError:
            log.exception("boom %s", "Tr0ub4dor&3")

    text, records = _emit_both(capture, emit)
    assert "Tr0ub4dor" not in text and "Tr0ub4dor" not in json.dumps(records)
    assert "resolved secret *** for fip" in text
    assert "RuntimeError: login failed with ***" in text
    assert "Traceback (most recent call last)" in text
    assert records[2]["detail"] == "pw ***" and records[2]["headers"] == {"password": "***", "n": 1}
    assert records[3]["exception"].endswith("RuntimeError: login failed with ***")
    assert records[3]["message"] == "boom ***"


def test_pattern_secret_in_exception_traceback(capture) -> None:
    def emit() -> None:
        try:
            raise ValueError("bad response {'access_token': 'eyJzZWNyZXQi'}")
        except ValueError:
            log.error("token call failed", exc_info=True)

    text, records = _emit_both(capture, emit)
    assert "eyJzZWNyZXQi" not in text and "eyJzZWNyZXQi" not in json.dumps(records)
    assert "'access_token': '***'" in records[0]["exception"]


def test_short_registered_value_ignored() -> None:
    register_secret("ab")
    register_secret("")
    register_secret(None)
    try:
        assert redact("about a cab") == "about a cab"
    finally:
        clear_secrets()


def test_json_extra_fields_and_text_extras(capture) -> None:
    text, records = _emit_both(capture, lambda: log.info("submitted", extra={"submission_id": 7, "file": "a b.txt"}))
    assert records[0]["submission_id"] == 7 and records[0]["file"] == "a b.txt"
    assert set(records[0]) >= {"time", "level", "logger", "message"}
    assert 'submission_id=7 file="a b.txt"' in text


def test_reconfigure_replaces_handler_and_level(capture) -> None:
    text, js = capture
    configure_logging("WARNING", "text", stream=text)
    configure_logging("WARNING", "text", stream=text)
    log.info("hidden")
    log.warning("shown")
    assert text.getvalue().count("shown") == 1 and "hidden" not in text.getvalue()
    with pytest.raises(ValueError):
        configure_logging("LOUD")
