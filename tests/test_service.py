"""`python -m filex_agent run --config X` as systemd would run it, against the sandbox.

One agent process per module (start-up costs a couple of seconds); the last test stops it.
Real parts throughout: the sandbox fileX, an HTTP webhook receiver and a unix datagram
NOTIFY_SOCKET on this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from filex_agent.audit import AuditLog
from filex_agent.sandbox.agent_config import write_sandbox_config
from tests.conftest import wait_for

REPO = Path(__file__).parents[1]
HOOK_TOKEN = "hook-s3cr3t-token-0123456789"


class Webhook:
    def __init__(self) -> None:
        self.received: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == f"/{HOOK_TOKEN}":
                    outer.received.append(json.loads(body))
                    self.send_response(204)
                else:
                    self.send_response(404)
                self.end_headers()

            def log_message(self, *a) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{HOOK_TOKEN}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class NotifySocket:
    """What systemd's manager listens on: a unix datagram socket."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sd-", dir="/tmp")  # short: AF_UNIX paths max ~107 bytes
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def has(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for m in list(self.messages) for line in m.split("\n"))

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Agent:
    proc: subprocess.Popen
    config: Path
    base_config: str
    data: Path
    log: Path
    metrics_url: str
    notify: NotifySocket
    webhook: Webhook
    secrets: list[str] = field(default_factory=list)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def outbox(self, route: str) -> Path:
        p = self.data / "outbox" / route
        p.mkdir(parents=True, exist_ok=True)
        return p

    def metric(self, name: str, **labels: str) -> float:
        body = httpx.get(self.metrics_url + "/metrics", timeout=5).text
        for fam in text_string_to_metric_families(body):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0


@pytest.fixture(scope="module")
def agent(sandbox, tmp_path_factory):
    data = tmp_path_factory.mktemp("svc")
    config = write_sandbox_config(sandbox, data, poll_seconds=0.5, stable_seconds=0.3, transports=("rest",))
    port = free_port()
    base = config.read_text() + (f'\n[metrics]\nenabled = true\nlisten = "127.0.0.1:{port}"\n\n'
                                 '[notify]\nwebhook_url = "env:FILEX_TEST_WEBHOOK"\n')
    config.write_text(base)
    notify, webhook = NotifySocket(), Webhook()
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "1000000",
           "FILEX_TEST_WEBHOOK": webhook.url, "PYTHONUNBUFFERED": "1"}
    env.pop("WATCHDOG_PID", None)
    log = data / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "filex_agent", "run", "--config", str(config)], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    a = Agent(proc, config, base, data, log, f"http://127.0.0.1:{port}", notify, webhook,
              secrets=[sandbox.client_secret, HOOK_TOKEN])
    try:
        wait_for(lambda: notify.has("READY=1") or proc.poll() is not None, timeout=30, what="READY=1")
        assert proc.poll() is None, a.output()
        yield a
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.stop()
        webhook.stop()


def test_metrics_health_and_sd_notify(agent):
    (agent.outbox("rest-0001-app1") / "GOOD_report.csv").write_bytes(b"id,value\n1,2\n")
    wait_for(lambda: agent.metric("filex_submissions_total", outcome="accepted", route="rest-0001-app1") >= 1,
             timeout=30, what="an accepted submission in /metrics")
    assert agent.metric("filex_submissions_total", outcome="submitted", route="rest-0001-app1") >= 1
    assert agent.metric("filex_bytes_sent_total", route="rest-0001-app1") >= len(b"id,value\n1,2\n")
    assert agent.metric("filex_last_tracking_poll_success_timestamp_seconds") > 0
    assert httpx.get(agent.metrics_url + "/healthz").status_code == 200
    assert httpx.get(agent.metrics_url + "/readyz").status_code == 200
    wait_for(lambda: agent.notify.has("WATCHDOG=1"), timeout=10, what="a watchdog ping")
    wait_for(lambda: agent.notify.has("STATUS="), timeout=15, what="a STATUS line")
    status = [line for m in agent.notify.messages for line in m.split("\n") if line.startswith("STATUS=")]
    assert "queued" in status[-1] and "last poll" in status[-1]


def test_filing_calendar_runs_in_the_service(agent):
    """The sandbox config's example expectation (daily-*, every day, 23:59 New York) is evaluated
    at start: its occurrence is in the journal and its next deadline in /metrics."""
    from datetime import timedelta

    from filex_agent.config import load_config
    from filex_agent.filing_calendar import Schedule
    from filex_agent.store import open_store, utcnow

    cfg = load_config(agent.config)
    exp = cfg.expectations[0]
    deadline = agent.metric("filex_calendar_next_deadline_timestamp_seconds", expectation="daily-demo")
    # The deadline ahead when the agent last evaluated (within the last two minutes).
    assert deadline in {Schedule(exp).next_deadline(utcnow() - timedelta(minutes=m)).timestamp() for m in (0, 2)}
    store = open_store(cfg.journal_path)
    try:
        occs = store.occurrences(expectation="daily-demo")
    finally:
        store.close()
    if deadline > utcnow().timestamp() + 120:  # not in the last minutes before 23:59 New York
        assert [o.state for o in occs][-1:] in (["EXPECTED"], ["ACCEPTED"])
        assert sum(agent.metric("filex_calendar_occurrences", expectation="daily-demo", state=st)
                   for st in ("EXPECTED", "ACCEPTED")) == 1
        lines = [json.loads(x) for x in cfg.audit_path.read_text().splitlines()]
        assert any(x["event"] == "calendar.occurrence" and x["expectation"] == "daily-demo" for x in lines)


def test_rejected_file_notifies_the_webhook_with_its_feedback(agent):
    (agent.outbox("rest-0001-app1") / "REJECT_batch.csv").write_bytes(b"id,value\nbroken\n")
    got = wait_for(lambda: [p for p in agent.webhook.received
                            if p["kind"] == "REJECTED" and p["file"] == "REJECT_batch.csv"],
                   timeout=30, what="the REJECTED webhook")
    payload = got[0]
    assert payload["feedback"], "the alert waits for the feedback file and names it"
    assert Path(payload["feedback"][0]).is_file()
    assert "REJECT_batch.csv" in payload["message"] and payload["feedback"][0] in payload["message"]


def test_sighup_with_a_bad_config_keeps_running(agent):
    agent.config.write_text(agent.base_config + "\n[agent.bogus]\n")
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in agent.output(), timeout=10, what="the refused reload in the log")
    agent.config.write_text(agent.base_config)
    assert agent.proc.poll() is None
    assert httpx.get(agent.metrics_url + "/healthz").status_code == 200


def test_sighup_adds_a_route(agent):
    from filex_agent.daemon import Daemon

    if not hasattr(Daemon, "reload"):
        pytest.skip("Daemon.reload is not in this build yet")
    new_outbox = agent.data / "outbox" / "rest-0001-app2"
    agent.config.write_text(agent.base_config + "\n[[routes]]\nname = \"rest-0001-app2\"\n"
                            f"outbox = {json.dumps(str(new_outbox))}\norg = \"0001\"\napplication = \"app2\"\n"
                            "transport = \"rest\"\ncredential = \"sandbox\"\nstable_seconds = 0.3\n")
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in agent.output(), timeout=15, what="the reload")
    new_outbox.mkdir(parents=True, exist_ok=True)
    (new_outbox / "NEW_route.csv").write_bytes(b"id\n7\n")
    wait_for(lambda: agent.metric("filex_submissions_total", route="rest-0001-app2", outcome="submitted") >= 1,
             timeout=30, what="the file in the new route's outbox submitted")


def test_sigterm_stops_cleanly_and_the_audit_log_verifies(agent):
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(30) == 0, agent.output()
    wait_for(lambda: agent.notify.has("STOPPING=1"), timeout=5, what="STOPPING=1")
    out = agent.output()
    for secret in agent.secrets:
        assert secret not in out, "a secret reached the log"

    audit = AuditLog(agent.data / "agent" / "audit.jsonl")
    try:
        assert audit.verify().ok
        records = list(audit.read())
    finally:
        audit.close()
    events = [r["event"] for r in records]
    assert events[0] == "agent.started" and events[-1] == "agent.stopped"
    good = [r for r in records if r.get("file") == "GOOD_report.csv"]
    assert [r["state"] for r in good if r["event"] == "submission.state"][-1] == "ACCEPTED"
    assert good[-1]["sha256"] and good[-1]["tracking_id"] and good[-1]["size"] == len(b"id,value\n1,2\n")
    assert any(r["event"] == "submission.feedback" for r in good)
    assert any(r.get("outcome") == "REJECTED" and r["file"] == "REJECT_batch.csv" for r in records)

    # The CLI reads and verifies the same file.
    cli = subprocess.run([sys.executable, "-m", "filex_agent", "audit", "--config", str(agent.config), "--verify"],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert cli.returncode == 0 and "hash chain intact" in cli.stdout
    lines = (agent.data / "agent" / "audit.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace("GOOD_report", "GOOD_r3port")
    (agent.data / "agent" / "audit.jsonl").write_text("\n".join(lines) + "\n")
    cli = subprocess.run([sys.executable, "-m", "filex_agent", "audit", "--config", str(agent.config), "--verify"],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert cli.returncode == 1 and "line 3" in cli.stdout


# -- CLI pieces the service relies on (in-process, fast) -----------------------------------------

def _minimal_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[agent]\ndata_dir = {json.dumps(str(tmp_path / "data"))}\n')
    return cfg


def test_audit_cli_since_and_json(tmp_path, capsys):
    from datetime import datetime, timedelta, timezone

    from filex_agent.cli import main

    cfg = _minimal_config(tmp_path)
    assert main(["audit", "--config", str(cfg)]) == 1  # no log yet: said, not a crash
    path = tmp_path / "data" / "audit.jsonl"
    with AuditLog(path) as audit:
        audit.append("agent.started", routes=["r1"])
        audit.append("submission.state", submission_id=1, seq=1, state="QUEUED", file="a.csv")
    capsys.readouterr()
    assert main(["audit", "--config", str(cfg), "--json"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["event"] for r in recs] == ["agent.started", "submission.state"]
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).date().isoformat()
    assert main(["audit", "--config", str(cfg), "--json", "--since", tomorrow]) == 0
    assert capsys.readouterr().out == ""
    assert main(["audit", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "a.csv" in out and "2 record(s)" in out
    assert main(["audit", "--config", str(cfg), "--since", "last tuesday"]) == 2


def test_submit_progress_bar_follows_bytes_and_restarts_on_retry():
    from types import SimpleNamespace

    from filex_agent.cli import _SubmitProgress

    bar = _SubmitProgress("big.bin", 1000)
    task = bar._progress.tasks[0]
    bar.bytes_sent("r", "rest", 600)
    assert task.completed == 600
    bar.submission_changed(SimpleNamespace(file_name="big.bin"), "retry")
    assert task.completed == 0 and "retrying" in task.description
    bar.bytes_sent("r", "rest", 1000)
    assert task.completed == task.total == 1000
