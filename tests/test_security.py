"""Security hardening (issue 16): one test (or a few) per item, against real parts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_notify import receiver, smtp_server  # noqa: F401 - real webhook and SMTP servers
from tests.test_submitter import Scripted

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


# -- item 6: no plain http in production; pre-signed URLs https only; no cross-host redirect --

def _config(env: dict) -> dict:
    return {"agent": {"data_dir": "/tmp/x"}, "environment": env,
            "credentials": {"c": {"client_id": "x", "client_secret": "env:X"}}}


@pytest.mark.parametrize("env,key", [
    ({"name": "production", "verify_tls": False}, "environment.verify_tls"),
    ({"name": "qa", "api_base_url": "http://filex-int.qa.finra.org"}, "environment.api_base_url"),
    ({"name": "production", "fip_token_url": "http://ews.fip.finra.org/token"}, "environment.fip_token_url"),
    ({"name": "production", "allow_insecure": True}, "environment.allow_insecure"),
    ({"name": "custom", "fip_token_url": "http://127.0.0.1:1/t", "api_base_url": "http://127.0.0.1:1"},
     "environment.fip_token_url"),
    ({"name": "custom", "fip_token_url": "https://a/t", "api_base_url": "https://a",
      "s3_endpoint_url": "http://127.0.0.1:9"}, "environment.s3_endpoint_url"),
    ({"name": "custom", "fip_token_url": "https://a/t", "api_base_url": "https://a", "verify_tls": False},
     "environment.verify_tls"),
])
def test_insecure_settings_refused_exit_2_naming_the_key(tmp_path, env, key):
    from filex_agent.cli import main
    from filex_agent.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as e:
        parse_config(_config(env))
    assert e.value.key == key
    # Through the CLI: exit 2, the key named.
    import json as _json

    cfg_file = tmp_path / "c.toml"
    lines = ['[agent]', f'data_dir = {_json.dumps(str(tmp_path))}', '[environment]']
    lines += [f"{k} = {_json.dumps(v)}" for k, v in env.items()]
    lines += ['[credentials.c]', 'client_id = "x"', 'client_secret = "env:X"']
    cfg_file.write_text("\n".join(lines) + "\n")
    assert main(["routes", "--config", str(cfg_file)]) == 2


def test_insecure_allowed_only_for_custom_with_allow_insecure():
    from filex_agent.config import parse_config

    cfg = parse_config(_config({"name": "custom", "allow_insecure": True, "verify_tls": False,
                                "fip_token_url": "http://127.0.0.1:1/t", "api_base_url": "http://127.0.0.1:1"}))
    assert cfg.environment.allow_insecure and not cfg.environment.verify_tls


def test_http_presigned_url_refused_nothing_sent(sandbox, sandbox_config, tmp_path):
    """The (real, plain-http) sandbox hands out http:// pre-signed URLs: without allow_insecure the
    upload fails with a clear reason, the URL's signature is not in it, and nothing reached S3."""
    import hashlib

    import httpx

    from filex_agent.connections import Connections
    from filex_agent.hooks import Hooks
    from filex_agent.store import State
    from filex_agent.store.sqlite import SQLiteStore
    from filex_agent.submitter import Submitter

    cfg = sandbox_config(transports=("rest",))
    cfg = cfg.model_copy(update={"environment": cfg.environment.model_copy(update={"allow_insecure": False})})
    route = cfg.routes[0]
    Path(route.outbox).mkdir(parents=True, exist_ok=True)
    data = b"insecure presigned url test " + os.urandom(8).hex().encode()
    f = Path(route.outbox) / "HTTPURL.csv"
    f.write_bytes(data)
    conns = Connections(cfg)
    store = SQLiteStore(tmp_path / "j.sqlite3")
    try:
        submitter = Submitter(cfg, store, conns, Hooks())
        s = submitter.claim(route, f)
        s = submitter.upload(s.id)
    finally:
        conns.close()
        store.close()
    assert s.state is State.FAILED
    assert "pre-signed URL is not https" in s.reason and "http://" in s.reason
    assert "X-Amz-Signature=" not in s.reason or "X-Amz-Signature=<" in s.reason
    assert "?<redacted>" in s.reason
    uploads = httpx.get(sandbox.api_base_url + "/_sandbox/uploads", timeout=10).json()
    assert hashlib.sha256(data).hexdigest() not in {u.get("sha256") for u in uploads}
    listed = sandbox.admin_s3.list_objects_v2(Bucket=sandbox.bucket, Prefix="0001/app1/in/HTTPURL")
    assert "Contents" not in listed


class _Server:
    """A real HTTP server on loopback answering every GET with ``handler(path) -> (status, headers, body)``."""

    def __init__(self, handler):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[tuple[float, str]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self):
                import time as _t

                outer.requests.append((_t.monotonic(), self.path))
                status, headers, body = handler(self.path)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = _answer

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_download_does_not_follow_a_redirect_to_another_host():
    import io

    import httpx

    from filex_agent.config import NetworkSettings
    from filex_agent.errors import FilexError
    from filex_agent.http import RetryPolicy, make_http_client
    from filex_agent.models import PresignedUrl
    from filex_agent.transports.rest import RestTransport

    thief = _Server(lambda path: (200, {}, b"attacker content"))
    # The pre-signed URL's server redirects to another host (localhost != 127.0.0.1), keeping the query.
    origin = _Server(lambda path: (302, {"Location": f"http://localhost:{thief.port}/steal{path[path.find('?'):]}"}, b""))

    class Api:  # what fileX answered: a pre-signed URL on `origin` (the API itself is not under test)
        def download_url(self, org, app, sub, name):
            return PresignedUrl(url=f"http://127.0.0.1:{origin.port}/out/{name}?X-Amz-Signature=abc123")

    http = make_http_client(NetworkSettings(connect_timeout=2, read_timeout=5))
    t = RestTransport("0001", "app1", api=Api(), http=http, retry=RetryPolicy(2, 0.01, 0.02))
    out = io.BytesIO()
    try:
        with pytest.raises(FilexError) as e:
            t.download_feedback("fb.txt", out)
    finally:
        http.close()
        origin.close()
        thief.close()
    assert origin.requests and not thief.requests  # the other host was never asked
    assert out.getvalue() == b""
    assert "302" in str(e.value) and "abc123" not in str(e.value)


# -- item 10: one Retry-After holds every request to the host ------------------------------

def test_retry_after_seen_by_one_request_pauses_every_worker(tmp_path, monkeypatch):
    import json as _json
    import threading
    import time

    from filex_agent.config import parse_config
    from filex_agent.connections import Connections

    listing = _json.dumps({"name": "0001", "type": "DIR", "children": []}).encode()
    lock = threading.Lock()
    state = {"gets": 0, "t429": None}

    def handler(path):
        if path.startswith("/token"):
            return 200, {"Content-Type": "application/json"}, b'{"access_token": "tok", "expires_in": "3600"}'
        with lock:
            state["gets"] += 1
            if state["gets"] == 8:  # the other workers are busy calling when this one is refused
                state["t429"] = time.monotonic()
                return 429, {"Retry-After": "2"}, b""
        return 200, {"Content-Type": "application/json"}, listing

    server = _Server(handler)
    base = f"http://127.0.0.1:{server.port}"
    monkeypatch.setenv("FILEX_TEST_SECRET", "cs-rate-limit-test")
    cfg = parse_config({"agent": {"data_dir": str(tmp_path)},
                        "environment": {"name": "custom", "allow_insecure": True, "fip_token_url": base + "/token",
                                        "api_base_url": base},
                        "network": {"backoff_initial": 0.05, "backoff_max": 5, "max_attempts": 3},
                        "credentials": {"c": {"client_id": "x", "client_secret": "env:FILEX_TEST_SECRET"}}})
    conns = Connections(cfg)
    api = conns.api("c")
    stop = threading.Event()
    errors: list[BaseException] = []

    def worker():
        while not stop.is_set():
            try:
                api.applications("0001")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while (state["t429"] is None or time.monotonic() < state["t429"] + 2.8) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        conns.close()
        server.close()
    assert not errors, errors
    t429 = state["t429"]
    assert t429 is not None
    gets = [t for t, p in server.requests if p.startswith("/files")]
    before = [t for t in gets if t < t429]
    inside = [t for t in gets if t429 < t < t429 + 1.95]
    after = [t for t in gets if t >= t429 + 1.95]
    assert len(before) >= 7  # the others were busy
    # A request already on the wire when the 429 went out may land just after it; nothing later.
    late = [round(t - t429, 3) for t in inside if t > t429 + 0.05]
    assert not late, f"requests reached the server {late} s after a Retry-After: 2"
    assert len(inside) <= 3
    assert after, "requests resumed after the pause"


def test_long_retry_after_reschedules_instead_of_blocking_workers():
    from filex_agent.http import HttpTransientError, RateLimiter

    t = [100.0]
    slept: list[float] = []
    limiter = RateLimiter(20, clock=lambda: t[0], sleep=lambda s: (slept.append(s), t.__setitem__(0, t[0] + s)),
                          max_wait=5)
    limiter.pause(2)
    limiter.acquire()  # a short pause is waited out
    assert slept and abs(sum(slept) - 2) < 1e-6
    limiter.pause(600)
    with pytest.raises(HttpTransientError) as e:
        limiter.acquire()
    assert e.value.retry_after == pytest.approx(600, abs=0.1)


# -- item 3: the spool is the agent's own folder ------------------------------------------

def _route_config(tmp_path, **route):
    from filex_agent.config import parse_config

    return parse_config({"agent": {"data_dir": str(tmp_path / "d")},
                         "credentials": {"c": {"client_id": "x", "client_secret": "env:X"}},
                         "routes": [{"name": "trades", "outbox": str(tmp_path / "out"), "org": "0001",
                                     "application": "app1", "credential": "c", **route}]})


def _submitter(tmp_path, cfg, errors=()):
    from filex_agent.hooks import Hooks
    from filex_agent.store.sqlite import SQLiteStore
    from filex_agent.submitter import Submitter
    return Submitter(cfg, SQLiteStore(tmp_path / "j.sqlite3"), Scripted(list(errors)), Hooks())


def test_symlinked_spool_is_refused_everywhere(tmp_path, caplog):
    import io

    from filex_agent.cli import main
    from filex_agent.daemon import Daemon
    from filex_agent.doctor import run_doctor
    from filex_agent.errors import ConfigError

    cfg = _route_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    stolen = tmp_path / "producer-owned"
    stolen.mkdir()
    (out / ".filex-agent").symlink_to(stolen)  # a producer pre-creates the spool as a link
    f = out / "trades.csv"
    f.write_bytes(b"confidential\n")

    # A claim takes nothing: the file stays in the outbox, nothing lands in the producer's folder.
    submitter = _submitter(tmp_path, cfg)
    assert submitter.claim(cfg.routes[0], f) is None
    assert f.read_bytes() == b"confidential\n" and list(stolen.iterdir()) == []
    assert submitter.store.list() == []
    assert any("route 'trades'" in r.getMessage() and "symbolic link" in r.getMessage() for r in caplog.records)

    # Start-up refuses, naming the route and the outbox.
    d = Daemon(cfg)
    with pytest.raises(ConfigError) as e:
        d.start()
    d.store.close()
    assert "route 'trades'" in str(e.value) and str(out) in str(e.value) and "symbolic link" in str(e.value)

    # `run --config` exits 2; `doctor` reports it.
    toml = tmp_path / "agent.toml"
    toml.write_text(f"""
[agent]
data_dir = "{tmp_path / 'd2'}"
[credentials.c]
client_id = "x"
client_secret = "env:X"
[[routes]]
name = "trades"
outbox = "{out}"
org = "0001"
application = "app1"
credential = "c"
""")
    r = _python("""
import sys
from filex_agent.cli import main
sys.exit(main(["run", "--config", sys.argv[1]]))
""", str(toml))
    assert r.returncode == 2, r.stderr
    assert "symbolic link" in r.stderr and "trades" in r.stderr
    report = io.StringIO()
    run_doctor(toml, out=report)
    line = next(x for x in report.getvalue().splitlines() if "route trades spool" in x)
    assert "symbolic link" in line
    assert list(stolen.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a file owned by another user")
def test_foreign_owned_spool_refused_and_claimed_files_taken_over(tmp_path):
    import stat

    from filex_agent.errors import ConfigError
    from filex_agent.spool import check_spool
    from filex_agent.store import State

    cfg = _route_config(tmp_path)
    route = cfg.routes[0]
    out = tmp_path / "out"
    out.mkdir()
    spool = out / ".filex-agent"
    spool.mkdir()
    os.chown(spool, 65534, 65534)  # nobody's
    with pytest.raises(ConfigError) as e:
        check_spool(route)
    assert "belongs to" in str(e.value) and "65534" in str(e.value)
    os.chown(spool, 0, 0)
    os.chmod(spool, 0o777)  # an old layout: created with the umask's mode

    # A producer's file, world-writable and setgid: claimed, it becomes the agent's, 0644 at most.
    f = out / "trades.csv"
    f.write_bytes(b"data\n")
    os.chown(f, 65534, 65534)
    os.chmod(f, 0o2666)
    submitter = _submitter(tmp_path, cfg)
    s = submitter.claim(route, f)
    assert s.state is State.QUEUED
    st = os.stat(s.local_path)
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert stat.S_IMODE(st.st_mode) == 0o644
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(Path(s.local_path).parent).st_mode) == 0o700


def test_spool_swapped_for_a_link_during_a_claim_receives_nothing(tmp_path, monkeypatch):
    """The check and the rename go through one descriptor: swapping the spool between them
    (rename it away, plant a link) does not redirect the file."""
    import filex_agent.spool as spool_mod

    cfg = _route_config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    stolen = tmp_path / "producer-owned"
    stolen.mkdir()
    f = out / "trades.csv"
    f.write_bytes(b"data\n")
    real_open = spool_mod.open_spool

    def open_then_swap(route):
        fd = real_open(route)
        os.rename(out / ".filex-agent", out / ".renamed-by-producer")
        (out / ".filex-agent").symlink_to(stolen)
        return fd

    monkeypatch.setattr(spool_mod, "open_spool", open_then_swap)
    submitter = _submitter(tmp_path, cfg)
    s = submitter.complete_claim(submitter.store.create(
        route="trades", org="0001", application="app1", transport="rest", file_name="trades.csv",
        source_path=str(f), local_path=str(f), state="CLAIMING"))
    assert list(stolen.rglob("*")) == []
    assert (out / ".renamed-by-producer" / str(s.id) / "trades.csv").read_bytes() == b"data\n"


def test_old_layout_journal_still_recovers(sandbox_config):
    """A journal written by an earlier version: a claim into OUTBOX/.filex-agent/ID/NAME (mode
    0755, as the umask made it) is recovered and filed."""
    import stat

    from filex_agent.daemon import Daemon
    from filex_agent.store import State, open_store
    from tests.conftest import run_until

    cfg = sandbox_config(transports=("rest",))
    route = cfg.routes[0]
    out = Path(route.outbox)
    spool = out / ".filex-agent"
    store = open_store(cfg.journal_path)
    sub = store.create(route=route.name, org=route.org, application=route.application, transport="rest",
                       file_name="OLD.csv", source_path=str(out / "OLD.csv"), local_path=str(out / "OLD.csv"),
                       state=State.CLAIMING)
    (spool / str(sub.id)).mkdir(parents=True, mode=0o755)
    os.chmod(spool, 0o755)
    (spool / str(sub.id) / "OLD.csv").write_bytes(b"claimed by the old version " + os.urandom(4).hex().encode())
    store.update(sub.id, local_path=str(spool / str(sub.id) / "OLD.csv"))
    store.close()
    d = Daemon(cfg, dispatch_interval=0.2)
    run_until(d, sub.id, State.ACCEPTED, timeout=30)
    assert stat.S_IMODE(os.stat(spool).st_mode) == 0o700


# -- item 8: filed files readable by the configured group; no root-owned journal files ----

@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files another group")
def test_feedback_reason_and_archived_files_get_the_configured_mode_and_group(sandbox_config, tmp_path):
    import stat

    from filex_agent.daemon import Daemon
    from filex_agent.store import State
    from tests.conftest import wait_for

    cfg = sandbox_config(transports=("rest",))
    cfg = cfg.model_copy(update={"agent": cfg.agent.model_copy(update={"file_mode": "0640",
                                                                      "file_group": "nogroup"})})
    route = cfg.routes[0]
    Path(route.outbox).mkdir(parents=True, exist_ok=True)
    good = Path(route.outbox) / f"PERMS_{os.urandom(3).hex()}.csv"
    good.write_bytes(b"id\n1\n")
    bad = Path(route.outbox) / "perms#bad.csv"
    bad.write_bytes(b"x\n")
    d = Daemon(cfg, dispatch_interval=0.2)
    d.start()
    try:
        # ACCEPTED is journaled with its move (move_to); the original is in accepted/ once it is done.
        s = wait_for(lambda: next((x for x in d.store.list() if x.file_name == good.name
                                   and x.state is State.ACCEPTED and not x.move_to), None), timeout=30,
                     what="accepted and filed")
        fb = wait_for(lambda: d.store.feedback_for(s.id), timeout=30, what="feedback")
        failed = wait_for(lambda: next((x for x in d.store.list() if x.file_name == bad.name
                                        and x.state is State.FAILED), None), what="failed")
    finally:
        d.stop(grace=5)

    def perms(p):
        st = os.stat(p)
        return stat.S_IMODE(st.st_mode), st.st_gid

    for p in (fb[0].local_path, s.local_path, failed.local_path, failed.local_path + ".reason.txt"):
        assert perms(p) == (0o640, 65534), p


def test_file_mode_config_is_validated():
    from filex_agent.config import ConfigError, parse_config

    for bad in ("0777", "640x", "0660", "0440", "0642"):
        with pytest.raises(ConfigError) as e:
            parse_config({"agent": {"data_dir": "/tmp/x", "file_mode": bad}})
        assert e.value.key == "agent.file_mode"
    with pytest.raises(ConfigError) as e:
        parse_config({"agent": {"data_dir": "/tmp/x", "file_group": "no-such-group-here"}})
    assert e.value.key == "agent.file_group"


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal is for root")
def test_root_refuses_another_users_journal(tmp_path):
    from filex_agent.store import open_store
    from filex_agent.store.sqlite import JournalOwnerError

    data = tmp_path / "data"
    data.mkdir()
    s = open_store(data / "journal.sqlite3")  # the daemon's user made the journal...
    s.close()
    for p in data.iterdir():
        os.chown(p, 65534, 65534)
    os.chown(data, 65534, 65534)
    with pytest.raises(JournalOwnerError) as e:  # ...and root opens it: refused, nothing created
        open_store(data / "journal.sqlite3")
    assert "nobody" in str(e.value) and "sudo -u nobody" in str(e.value)
    assert all(os.stat(p).st_uid == 65534 for p in data.iterdir())
    # A fresh journal in the daemon user's data_dir: refused too (root would own it).
    (data / "journal.sqlite3").unlink()
    for extra in data.iterdir():
        extra.unlink()
    with pytest.raises(JournalOwnerError):
        open_store(data / "journal.sqlite3")
    assert list(data.iterdir()) == []


# -- item 7: auto_accept_host_key is trust-on-first-use (real OpenSSH sshd) ---------------

def test_auto_accept_records_first_key_and_refuses_a_changed_one(tmp_path, caplog):
    from tests.sshd_fixture import Sshd, key_fingerprint, keygen, skip_reason

    if skip_reason():
        pytest.skip(skip_reason())
    from filex_agent.config import parse_config
    from filex_agent.connections import Connections
    from filex_agent.errors import PermanentError
    from filex_agent.transports.sftp import list_profiles

    sshd = Sshd()
    try:
        sshd.make_layout({"0001": ["app1"]})
        client_key = keygen(tmp_path / "id_ed25519")
        sshd.authorize(client_key.with_suffix(".pub"))
        sshd.start()
        cfg = parse_config({
            "agent": {"data_dir": str(tmp_path / "data")},
            "environment": {"name": "custom", "fip_token_url": "https://fip.invalid/t",
                            "api_base_url": "https://filex.invalid", "sftp_host": sshd.host, "sftp_port": sshd.port},
            "network": {"connect_timeout": 5},
            "sftp": {"auto_accept_host_key": True},
            "credentials": {"c": {"sftp_username": sshd.login_user, "sftp_private_key": str(client_key)}}})
        own_known_hosts = tmp_path / "data" / "known_hosts"

        def connect() -> dict:
            conns = Connections(cfg)
            try:
                return list_profiles(conns.sftp_session("c"), root=str(sshd.root))
            finally:
                conns.close()

        first_fp = sshd.host_key_fingerprint
        assert "0001" in connect()  # first use: accepted and recorded
        recorded = own_known_hosts.read_text()
        assert recorded.startswith(f"[{sshd.host}]:{sshd.port} ssh-ed25519 ")
        assert oct(own_known_hosts.stat().st_mode & 0o777) == "0o600"
        assert "0001" in connect()  # the same key again: fine, nothing added
        assert own_known_hosts.read_text() == recorded

        # The server's key changes (same host and port): refused, loudly, naming both keys.
        sshd.kill()
        for p in (sshd.host_key, sshd.host_key.with_suffix(".pub")):
            p.unlink()
        keygen(sshd.host_key)
        new_fp = key_fingerprint(sshd.host_key.with_suffix(".pub"))
        assert new_fp != first_fp
        sshd.start()
        with pytest.raises(PermanentError) as e:
            connect()
        msg = str(e.value)
        assert "CHANGED" in msg and f"[{sshd.host}]:{sshd.port}" in msg
        assert first_fp in msg and new_fp in msg and str(own_known_hosts) in msg
        assert any(r.levelname == "ERROR" and "CHANGED" in r.getMessage() for r in caplog.records)
        assert own_known_hosts.read_text() == recorded  # the new key was not recorded
    finally:
        sshd.stop()


# -- item 12: a reload closes the old connections once nothing in flight uses them ----------

def test_reload_closes_old_connections_when_their_uploads_finish(sandbox_config):
    import threading

    from filex_agent.daemon import Daemon
    from filex_agent.hooks import Hooks
    from filex_agent.store import State
    from tests.conftest import wait_for

    started, release = threading.Event(), threading.Event()

    class HoldFirstUpload(Hooks):
        def bytes_sent(self, route, transport, n):
            if not started.is_set():
                started.set()
                release.wait(10)  # the upload stays in flight, mid-body, on the first Connections

    cfg = sandbox_config(transports=("rest",))
    route = cfg.routes[0]
    Path(route.outbox).mkdir(parents=True, exist_ok=True)
    d = Daemon(cfg, hooks=HoldFirstUpload(), dispatch_interval=0.2)
    d.start()
    try:
        (Path(route.outbox) / "INFLIGHT.csv").write_bytes(os.urandom(256 * 1024))
        assert started.wait(20), "upload did not start"
        first = d.connections
        d.reload(cfg)  # SIGHUP while the upload is in flight
        second = d.connections
        assert second is not first
        assert not first.http.is_closed, "closed under an upload in flight"
        release.set()
        sub = wait_for(lambda: next((s for s in d.store.list() if s.file_name == "INFLIGHT.csv"
                                     and s.state in (State.SUBMITTED, State.ACCEPTED)), None), what="uploaded")
        wait_for(lambda: first.http.is_closed, timeout=10, what="old connections closed after the upload")
        assert sub.tracking_id
        # Nothing in flight: the next reload closes the replaced set at once.
        wait_for(lambda: not d._inflight, what="no upload in flight")
        d.reload(cfg)
        wait_for(lambda: second.http.is_closed, timeout=10, what="idle old connections closed at once")
        assert not d.connections.http.is_closed
    finally:
        release.set()
        d.stop(grace=5)
