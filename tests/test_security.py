"""Security hardening (issue 16): one test (or a few) per item, against real parts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_notify import receiver, smtp_server  # noqa: F401 - real webhook and SMTP servers

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=120)


# -- item 9: the sandbox's dependencies are an extra -------------------------------------

_BLOCK_SANDBOX_DEPS = """
import sys
for name in ("moto", "werkzeug", "flask"):
    sys.modules[name] = None  # `import moto` now raises ModuleNotFoundError, as without the extra
"""


def test_run_sandbox_without_extra_exits_2_naming_the_extra(tmp_path):
    r = _python(_BLOCK_SANDBOX_DEPS + """
from filex_agent.cli import main
sys.exit(main(["run", "--sandbox", "--data-dir", sys.argv[1]]))
""", str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert "filex-agent[sandbox]" in r.stderr
    assert "Traceback" not in r.stderr


def test_production_modules_import_without_sandbox_deps():
    # Every module but the sandbox (and the CLI's lazy sandbox import) works without moto.
    r = _python(_BLOCK_SANDBOX_DEPS + """
import importlib, pkgutil, filex_agent
for m in pkgutil.walk_packages(filex_agent.__path__, "filex_agent."):
    if not m.name.startswith(("filex_agent.sandbox", "filex_agent.__main__")):
        importlib.import_module(m.name)
print("ok")
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_moto_is_not_a_runtime_dependency():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any(d.startswith("moto") for d in meta["project"]["dependencies"])
    assert any(d.startswith("moto") for d in meta["project"]["optional-dependencies"]["sandbox"])
    assert meta["project"]["license"] == "Apache-2.0"  # item 13: SPDX string, no deprecation banner


# -- item 5: a hostile name cannot forge a log line --------------------------------------

FORGED = "report\n2026-01-01T00:00:00.000Z INFO filex_agent.submitter: forged\r\x1b[2K.csv"


@pytest.fixture
def text_log():
    import io
    import logging

    from filex_agent.logging_setup import configure_logging

    stream = io.StringIO()
    configure_logging("INFO", "text", stream=stream)
    yield stream
    logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers
                                       if not getattr(h, "_filex_handler", False)]


def test_text_log_escapes_control_characters_in_names(tmp_path, text_log):
    import logging

    path = tmp_path / FORGED
    path.write_bytes(b"x")  # a real file with that name exists in the outbox
    log = logging.getLogger("filex_agent.submitter")
    log.info("claimed %s", path, extra={"file": path.name})
    lines = text_log.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert "\x1b" not in lines[0] and "\r" not in lines[0]
    assert "report\\n2026-01-01T00:00:00.000Z INFO filex_agent.submitter: forged\\r\\x1b[2K.csv" in lines[0]


def test_traceback_lines_cannot_pass_for_records(text_log):
    import logging

    try:
        raise OSError(f"cannot read {FORGED}")
    except OSError:
        logging.getLogger("filex_agent.x").exception("upload of %s failed", FORGED)
    lines = text_log.getvalue().splitlines()
    assert lines[0].startswith(tuple("0123456789")) and "forged" in lines[0]
    # Every further line is the traceback, indented: none starts like a record.
    assert len(lines) > 1 and all(line.startswith(" ") for line in lines[1:])
    assert not any("\x1b" in line or "\r" in line for line in lines)


# -- item 4: secrets in failure reasons are redacted in every sink -------------------------

SECRET = "cs-Sup3r-Secret-Value-42"  # a resolved client secret (registered, as the agent does)
BEARER = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJwcmltZSJ9.c2lnbmF0dXJl"


def test_secret_in_an_exception_reaches_no_sink(tmp_path, receiver, smtp_server):
    import json as _json

    from filex_agent.audit import AuditLog
    from filex_agent.config import parse_config
    from filex_agent.errors import PermanentError, TransientError
    from filex_agent.hooks import MultiHooks
    from filex_agent.logging_setup import register_secret
    from filex_agent.notify import Notifier, SmtpSettings
    from filex_agent.observers import AuditHooks, NotifyHooks
    from filex_agent.store import State
    from filex_agent.store.sqlite import SQLiteStore
    from filex_agent.submitter import Submitter
    from tests.test_submitter import Scripted

    register_secret(SECRET)
    box, port, cert = smtp_server
    cfg = parse_config({"agent": {"data_dir": str(tmp_path / "d")},
                        "credentials": {"c": {"client_id": "x", "client_secret": "env:X"}},
                        "routes": [{"name": "r", "outbox": str(tmp_path / "out"), "org": "0001",
                                    "application": "app1", "credential": "c"}]})
    store = SQLiteStore(tmp_path / "j.sqlite3")
    audit = AuditLog(tmp_path / "audit.jsonl")
    notifier = Notifier(webhook_url=receiver.url, timeout=5, smtp=SmtpSettings(
        host="127.0.0.1", port=port, username="alerts", password="smtp-Pa55word",
        from_addr="a@example.com", to_addrs=["ops@example.com"], ca_file=cert))
    hooks = MultiHooks(AuditHooks(audit, store), NotifyHooks(notifier, store, cfg))
    errors = [TransientError(f"connection reset; Authorization: Bearer {BEARER}"),
              PermanentError(f"server said: invalid client_secret={SECRET} for prime")]
    submitter = Submitter(cfg, store, Scripted(errors), hooks)
    (tmp_path / "out").mkdir()
    f = tmp_path / "out" / "F.csv"
    f.write_bytes(b"data\n")
    s = submitter.claim(cfg.routes[0], f)
    s = submitter.upload(s.id)
    assert s.state is State.QUEUED and BEARER not in s.reason  # journal: the retry reason
    store.update(s.id, next_attempt_at=None)
    s = submitter.upload(s.id)
    assert s.state is State.FAILED
    assert notifier.flush(20)
    notifier.stop()

    def clean(text: str, where: str) -> None:
        assert SECRET not in text and BEARER not in text, f"secret in {where}: {text}"

    # The journal: reason, flag, every event detail.
    clean(s.reason, "journal reason")
    assert "client_secret=***" in s.reason
    for ev in store.events(s.id):
        clean(ev.detail or "", "journal event")
    row = store._db.execute("SELECT group_concat(detail, '|') FROM events").fetchone()[0]
    clean(row, "journal events table")
    store.update(s.id, flag=f"note: Bearer {BEARER}")
    clean(store.get(s.id).flag, "journal flag")
    # NAME.reason.txt
    reason_file = Path(s.local_path + ".reason.txt")
    clean(reason_file.read_text(), "reason file")
    assert "client_secret=***" in reason_file.read_text()
    # audit.jsonl
    raw = (tmp_path / "audit.jsonl").read_text()
    clean(raw, "audit.jsonl")
    assert any(_json.loads(line).get("state") == "FAILED" for line in raw.splitlines())
    assert audit.verify().ok
    # webhook and e-mail
    assert receiver.requests, "no webhook alert"
    clean(_json.dumps([body for _, body in receiver.requests]), "webhook")
    assert box.messages, "no e-mail alert"
    clean(box.messages[0][0].as_string(), "e-mail")
    # Direct writers too: write_reason and the audit log scrub whatever they are handed.
    from filex_agent.fsutil import write_reason

    clean(write_reason(tmp_path / "x.csv", f"password={SECRET}").read_text(), "write_reason")
    audit.append("test", detail=f"Bearer {BEARER}", nested={"client_secret": SECRET})
    clean((tmp_path / "audit.jsonl").read_text(), "audit append")
    audit.close()
    store.close()
