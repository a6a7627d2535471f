"""A REJECTED alert waiting for its feedback file is in the journal, not only in memory: the
agent killed while it waits sends it after the restart, once, naming the feedback.

The agent runs as `python -m filex_agent run` against the sandbox, with a real webhook receiver.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

from filex_agent.config import load_config
from filex_agent.sandbox.agent_config import write_sandbox_config
from tests.conftest import wait_for
from tests.test_service import REPO, Webhook

ROUTE = "rest-0001-app1"


def test_rejected_alert_survives_a_kill_while_it_waits_for_feedback(sandbox, tmp_path):
    config = write_sandbox_config(sandbox, tmp_path, poll_seconds=0.5, stable_seconds=0.3, transports=("rest",))
    config.write_text(config.read_text() + '\n[notify]\nwebhook_url = "env:FILEX_TEST_WEBHOOK"\n')
    cfg = load_config(config)
    webhook = Webhook()
    log = tmp_path / "agent.log"
    name = f"REJECT_killed_{os.getpid()}.csv"

    def start() -> subprocess.Popen:
        env = {**os.environ, "FILEX_TEST_WEBHOOK": webhook.url, "PYTHONUNBUFFERED": "1"}
        for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(k, None)
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "filex_agent", "run", "--config", str(config)],
                                    cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def state() -> str | None:
        if not cfg.journal_path.exists():
            return None
        with sqlite3.connect(cfg.journal_path) as db:
            row = db.execute("SELECT state FROM submissions WHERE file_name = ?", (name,)).fetchone()
        db.close()
        return row[0] if row else None

    def alerts() -> list[dict]:
        return [p for p in webhook.received if p["kind"] == "REJECTED" and p["file"] == name]

    def started(n: int) -> bool:
        return log.read_text(errors="replace").count("filex-agent started") >= n

    procs: list[subprocess.Popen] = []
    try:
        # fileX's out listing fails: the REJECTED alert waits for its feedback (up to a minute).
        sandbox.inject_fault("status", status=503, count=1_000_000, path_prefix="/files/0001/app1/out")
        try:
            procs.append(start())
            outbox = cfg.route(ROUTE).outbox
            outbox.mkdir(parents=True, exist_ok=True)
            (outbox / name).write_bytes(b"id,value\nbroken\n")
            wait_for(lambda: state() == "REJECTED", timeout=90, what=f"{name} REJECTED")
            procs[-1].kill()  # SIGKILL while the alert waits: nothing flushed
            procs[-1].wait(10)
            assert alerts() == []
        finally:
            sandbox.clear_faults()

        procs.append(start())
        got = wait_for(alerts, timeout=90, what="the REJECTED alert after the restart")
        assert got[0]["feedback"], "sent once the feedback is filed, and names it"
        procs[-1].send_signal(signal.SIGTERM)
        assert procs[-1].wait(60) == 0

        procs.append(start())  # and a later start does not send it again
        wait_for(lambda: started(3), timeout=90, what="the third start")
        # resume() runs right after the start; give the loop a few feedback cycles anyway.
        wait_for(lambda: log.read_text(errors="replace").count("REJECTED alert(s) taken up") >= 1, timeout=1,
                 what="the first restart's take-up in the log")
        time.sleep(2.0)  # 4 tracking polls: time for a wrongly re-sent alert to show
        procs[-1].send_signal(signal.SIGTERM)
        assert procs[-1].wait(60) == 0
        assert len(alerts()) == 1, log.read_text(errors="replace")[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        webhook.stop()
