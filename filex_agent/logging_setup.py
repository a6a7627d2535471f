"""Logging: text for people, JSON lines for machines, secrets redacted on the way out.

``configure_logging()`` installs one handler on the root logger with a ``RedactingFilter``.
The filter rewrites the record itself (message, args, exception text, stack, extra fields),
so whatever formats it afterwards sees only redacted text. ``register_secret()`` adds exact
values (every resolved secret) to what is redacted; ``redact()`` is usable on any string.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import traceback
from datetime import datetime, timezone
from typing import IO, Any, Literal
from urllib.parse import quote

MASK = "***"

# Names whose values are secrets, in JSON-ish ("name": value) or k=v text.
_SECRET_KEYS = (
    r"access_token|refresh_token|id_token|client_secret|password|passwd|passphrase"
    r"|session_?token|secret_?access_?key"
)
# A key is allowed a prefix ending in "_" or "-" (sftp_password, aws_secret_access_key).
_KEY = rf"(?<![A-Za-z0-9])(?:[A-Za-z0-9]+[_-])*(?:{_SECRET_KEYS})"
_QUOTED_VALUE = r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'"

# Credential-looking token after Bearer/Basic: long enough and not a plain lowercase word,
# so prose like "Basic authentication" is left alone while base64/JWT/opaque tokens are not;
# anything of 16+ token characters counts whatever its case.
_TOKEN = (r"(?:(?=[A-Za-z0-9\-._~+/]*(?:[0-9\-._~+/=]|(?<=[A-Za-z0-9\-._~+/])[A-Z]))[A-Za-z0-9\-._~+/]{8,}=*"
          r"|[A-Za-z0-9\-._~+/]{16,}=*)")

_PATTERNS: list[tuple[re.Pattern[str], Any]] = [
    # Authorization header: the whole value, whatever the scheme.
    (re.compile(r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?)(?:(bearer|basic|aws4-hmac-sha256|digest)\s+)?"
                r"([^\s\"',}]+)"),
     lambda m: m.group(1) + (m.group(2) + " " if m.group(2) else "") + MASK),
    (re.compile(rf"\b((?i:bearer|basic))(\s+){_TOKEN}"), lambda m: m.group(1) + m.group(2) + MASK),
    # "password": "x", 'client_secret': 'y'  (JSON, Python reprs)
    (re.compile(rf"(?i)([\"']{_KEY}[\"']\s*:\s*)({_QUOTED_VALUE}|[^\s,}}\]]+)"),
     lambda m: m.group(1) + _mask_like(m.group(2))),
    # password=x, client_secret = "y", ?access_token=z&...
    (re.compile(rf"(?i)({_KEY}\s*=\s*)({_QUOTED_VALUE}|[^\s&,;}}\])\"']+)"),
     lambda m: m.group(1) + _mask_like(m.group(2))),
    # S3 pre-signed URL query (SigV4 and legacy SigV2) and STS headers.
    (re.compile(r"(?i)(\bX-Amz-(?:Signature|Security-Token|Credential)=)[^&\s\"'<>]+"),
     lambda m: m.group(1) + MASK),
    (re.compile(r"(?i)([?&](?:Signature|AWSAccessKeyId)=)[^&\s\"'<>]+"), lambda m: m.group(1) + MASK),
    (re.compile(r"(?i)(\bx-amz-security-token[\"']?\s*:\s*[\"']?)[^\s\"',}]+"), lambda m: m.group(1) + MASK),
]

# Exact secret values registered at run time; shorter ones would shred ordinary text.
MIN_SECRET_LENGTH = 4
_secrets: set[str] = set()
_secrets_re: re.Pattern[str] | None = None
_secrets_lock = threading.Lock()


def _mask_like(value: str) -> str:
    if value[:1] in ("'", '"'):
        return value[0] + MASK + value[0]
    return MASK


def register_secret(value: str | None) -> None:
    """Redact this exact value (and its URL- and JSON-escaped forms) from every log record."""
    global _secrets_re
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    forms = {value, quote(value, safe=""), json.dumps(value)[1:-1]}
    with _secrets_lock:
        if forms <= _secrets:
            return
        _secrets.update(forms)
        # Longest first so a secret containing another is masked whole.
        alternatives = sorted(_secrets, key=len, reverse=True)
        _secrets_re = re.compile("|".join(re.escape(s) for s in alternatives))


def clear_secrets() -> None:
    """Forget registered secrets (tests)."""
    global _secrets_re
    with _secrets_lock:
        _secrets.clear()
        _secrets_re = None


# Every pattern above needs one of these words: a string with none of them (most file names,
# paths, states) is skipped with one search instead of seven (the audit redacts every field).
_PATTERN_WORDS = re.compile(r"(?i)authorization|bearer|basic|token|secret|passw|passphrase|x-amz-|signature"
                            r"|awsaccesskeyid")


def redact(text: str) -> str:
    """Mask secrets in any string."""
    secrets_re = _secrets_re
    if secrets_re is not None:
        text = secrets_re.sub(MASK, text)
    if _PATTERN_WORDS.search(text) is None:
        return text
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_value(value: Any) -> Any:
    """Redact inside any value (log fields, audit records); keys that name secrets lose their value."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: (MASK if isinstance(k, str) and re.fullmatch(_KEY, k, re.I) else redact_value(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [redact_value(v) for v in value]
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return redact(str(value))


_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName", "_filex_redacted"}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class RedactingFilter(logging.Filter):
    """Rewrites a record so no handler after it can see a secret. Never drops records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_filex_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # bad format args: keep what we can, never crash logging
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = redact(message)
        record.args = None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
            # Formatters re-render exc_info only when exc_text is empty; drop the live exception
            # so no later handler formats the unredacted original.
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in extra_fields(record).items():
            setattr(record, key, redact_value(value))
        record._filex_redacted = True
        return True


def _iso(created: float) -> str:
    return datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Control characters (newlines, CR, ANSI escapes, NEL) and the Unicode line/paragraph separators:
# in a name taken from an outbox or from fileX's `out` they would forge or hide log lines.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(m: re.Match[str]) -> str:
    c = m.group(0)
    return _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape_controls(text: str) -> str:
    """``text`` on one line: every control character is shown as an escape (``\\n``, ``\\x1b``)."""
    return _CONTROL_RE.sub(_escape_char, text)


class TextFormatter(logging.Formatter):
    """``2025-01-01T12:00:00.000Z INFO filex_agent.x: message key=value``

    One record is one line: control characters in the message and fields are escaped. A
    traceback keeps its line breaks but every line of it is indented, so no part of it can
    pass for a record of its own."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_iso(record.created)} {record.levelname} {record.name}: {escape_controls(record.getMessage())}"
        extras = extra_fields(record)
        if extras:
            line += " " + " ".join(f"{escape_controls(k)}={_compact(v)}" for k, v in extras.items())
        for block in (record.exc_text, record.stack_info):
            if block:
                line += "\n" + "\n".join("  " + escape_controls(part) if part.strip() else part
                                          for part in block.split("\n"))
        return line


def _compact(value: Any) -> str:
    if isinstance(value, str):
        return value if value and not any(c.isspace() for c in value) and not _CONTROL_RE.search(value) \
            else json.dumps(value)
    return json.dumps(value, default=str, separators=(",", ":"))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": _iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            obj.setdefault(key, value)
        if record.exc_text:
            obj["exception"] = record.exc_text
        if record.stack_info:
            obj["stack"] = record.stack_info
        return json.dumps(obj, default=str, ensure_ascii=False)


_HANDLER_MARK = "_filex_handler"


def configure_logging(level: str = "INFO", fmt: Literal["text", "json"] = "text",
                      stream: IO[str] | None = None) -> logging.Handler:
    """(Re)configure the root logger; idempotent. Returns the installed handler."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_MARK, False):
            root.removeHandler(h)
            h.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)
    # Libraries that log every request (httpx at INFO) or headers (botocore at DEBUG): the
    # agent logs what matters itself. Redaction would still apply; this is about noise.
    # apscheduler logs every job run at INFO (several lines a second).
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "s3transfer", "urllib3", "paramiko", "apscheduler"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler
