"""`filex-agent run --sandbox`: prints the outboxes and the status page URL, files a dropped file, stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import wait_for


def test_run_sandbox_then_sigterm(tmp_path):
    repo = Path(__file__).parents[1]
    data = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "filex_agent", "run", "--sandbox", "--data-dir", str(data)],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("status web page:"):
                break
        out = "".join(lines)
        # The status page is on (loopback, a free port) and its URL printed beside the outboxes.
        url = next(l.split(": ", 1)[1].strip() for l in lines if l.startswith("status web page:"))
        assert url.startswith("http://127.0.0.1:"), out
        assert "<h1>Did today's files go in?</h1>" in httpx.get(url, timeout=10).text
        assert (data / "filex-agent.toml").is_file(), out
        outboxes = [l.split()[0] for l in lines if l.startswith("  /")]
        assert outboxes, out
        rest_outbox = next(Path(o) for o in outboxes if "rest" in o)
        (rest_outbox / "DEMO_file.csv").write_bytes(b"a,b\n1,2\n")

        def accepted():
            p = subprocess.run([sys.executable, "-m", "filex_agent", "status", "--config",
                                str(data / "filex-agent.toml"), "--json"], cwd=repo, capture_output=True,
                               text=True)
            rows = json.loads(p.stdout or "[]")
            return any(r["file"] == "DEMO_file.csv" and r["state"] == "ACCEPTED" and r["feedback"] for r in rows)

        wait_for(accepted, timeout=60, interval=0.5, what="DEMO_file.csv accepted with feedback")
        secret = (data / "secrets" / "fip-client-secret").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rest, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, "".join(lines) + rest
    assert secret not in "".join(lines) + rest, "a secret reached the log"
