"""The systemd unit (static checks, systemd-analyze verify/security) and sd_notify support.

systemd-analyze verify insists that ExecStart's binary exists. The unit points at
/opt/filex-agent/.venv/bin/filex-agent, which is not installed here, so the test verifies a
temporary copy whose ExecStart is a stub executable with the same arguments; everything else
is the unit as shipped. User=filex-agent need not exist: verify does not resolve users (it
would only matter at start), so no warning has to be tolerated: any output fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from filex_agent import sdnotify
from filex_agent.config import AgentSettings
from filex_agent.sdnotify import Watchdog, notify

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "filex-agent.service"
SHIPPED_EXEC = "/opt/filex-agent/.venv/bin/filex-agent"
MAX_EXPOSURE = 2.0
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze not installed (Debian: apt-get install -y systemd)")


def _directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value)
    assert m, f"unparsed time span {value!r}"
    return float(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


def test_unit_essentials() -> None:
    d = _directives()
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert _seconds(one["WatchdogSec"]) == 60
    assert one["ExecStart"] == f"{SHIPPED_EXEC} run --config /etc/filex-agent/filex-agent.toml"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure"
    assert one["User"] == one["Group"] == "filex-agent"
    assert one["StateDirectory"] == one["LogsDirectory"] == "filex-agent"
    assert "fip-client-secret:/etc/filex-agent/credentials/fip-client-secret" in d["LoadCredential"]
    assert "-/srv/filex" in d["ReadWritePaths"]
    assert one["UMask"] == "0027" and one["KillMode"] == "mixed"
    assert one["CapabilityBoundingSet"] == "" and one["AmbientCapabilities"] == ""
    assert one["MemoryDenyWriteExecute"] == "yes" and one["ProtectSystem"] == "strict"
    # systemd must not SIGKILL the agent while it still finishes uploads (shutdown grace).
    grace = AgentSettings.model_fields["shutdown_grace_seconds"].default
    assert _seconds(one["TimeoutStopSec"]) >= grace + 30


@pytest.fixture
def verifiable_unit(tmp_path: Path) -> Path:
    stub = tmp_path / "filex-agent"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert text.count(f"ExecStart={SHIPPED_EXEC} ") == 1
    unit = tmp_path / "filex-agent.service"
    unit.write_text(text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={stub} "))
    return unit


@needs_analyze
def test_systemd_analyze_verify(verifiable_unit: Path) -> None:
    r = subprocess.run([ANALYZE, "verify", str(verifiable_unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys; any message at all is a defect.
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


@needs_analyze
def test_systemd_analyze_security_exposure() -> None:
    # --threshold takes tenths (0..100): 20 means an exposure of 2.0.
    r = subprocess.run([ANALYZE, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}",
                        "--no-pager", str(UNIT)], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for filex-agent\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    exposure = float(m.group(1))
    print(f"systemd-analyze security exposure: {exposure}")
    assert exposure <= MAX_EXPOSURE, r.stdout
    assert r.returncode == 0, r.stdout + r.stderr


def test_python_stack_needs_no_writable_executable_memory() -> None:
    # MemoryDenyWriteExecute=yes kills a process that maps W+X memory. Load and exercise the
    # agent's native dependencies and check that no such mapping exists.
    code = textwrap.dedent("""
        import boto3, httpx, paramiko, pydantic, prometheus_client, sqlite3, ssl, watchdog.observers
        import apscheduler.schedulers.background, tenacity, rich.console
        from cryptography.hazmat.primitives.asymmetric import ed25519
        ed25519.Ed25519PrivateKey.generate().sign(b"x")
        boto3.client("s3", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
        sqlite3.connect(":memory:").execute("select 1")
        ssl.create_default_context()
        wx = [l for l in open("/proc/self/maps") if "w" in l.split()[1] and "x" in l.split()[1]]
        print(len(wx)); print("".join(wx))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n", 1)[0] == "0", r.stdout


# -- sd_notify ------------------------------------------------------------------------------

@pytest.fixture
def dgram(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(2)
    yield s, str(path)
    s.close()


def test_unset_is_noop(monkeypatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False
    assert sdnotify.ready() is False


def test_path_socket(dgram, monkeypatch) -> None:
    sock, path = dgram
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert sdnotify.ready("watching 3 routes") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=watching 3 routes"
    assert sdnotify.stopping() and sock.recv(4096) == b"STOPPING=1"


def test_abstract_socket(monkeypatch) -> None:
    name = f"filex-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("STATUS=hello") is True
        assert s.recv(4096) == b"STATUS=hello"


def test_missing_socket_returns_false(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert notify("READY=1") is False


def test_watchdog_interval_and_ping(dgram) -> None:
    sock, path = dgram
    wd = Watchdog({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "60000000"})
    assert wd.interval() == 30.0 and wd.enabled
    assert wd.ping() is True
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_watchdog_disabled_cases() -> None:
    assert Watchdog({}).interval() is None
    assert Watchdog({"WATCHDOG_USEC": "0"}).interval() is None
    assert Watchdog({"WATCHDOG_USEC": "junk"}).interval() is None
    assert Watchdog({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid() + 1)}).interval() is None
    assert Watchdog({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}).interval() == 0.5
    assert Watchdog({}).start(lambda: True) is False


def test_watchdog_thread_pings_only_while_alive(dgram) -> None:
    sock, path = dgram
    alive = {"ok": True}
    wd = Watchdog({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})  # ping every 50 ms
    assert wd.start(lambda: alive["ok"])
    try:
        assert sock.recv(4096) == b"WATCHDOG=1"
        alive["ok"] = False
        time.sleep(0.1)  # let a ping already in flight land
        sock.setblocking(False)
        while True:  # drain
            try:
                sock.recv(4096)
            except BlockingIOError:
                break
        time.sleep(0.3)
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
    finally:
        wd.stop()
