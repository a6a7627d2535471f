"""Small shared helpers: child processes with peak RSS, statistics, ports, files."""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0, proc: "subprocess.Popen[bytes] | None" = None,
              log: Path | None = None) -> None:
    """Wait until something listens; fail at once (with its log) if the server process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"server on 127.0.0.1:{port} exited with {proc.returncode}: {tail}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def proc_status_kib(pid: int, field: str) -> int | None:
    """A /proc/PID/status field in KiB (VmHWM, VmRSS), or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (not its children), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class ChildResult:
    wall: float  # seconds, process start to exit
    peak_mib: float  # VmHWM of the process, polled until it exits
    stdout: str


class ChildFailed(RuntimeError):
    pass


def run_child(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 1800.0,
              cwd: Path | None = None) -> ChildResult:
    """Run one uploading process; wall time and its own peak RSS.

    VmHWM is read while the child runs: rusage's ru_maxrss would carry the parent's RSS over
    fork+exec on Linux. The last reading before exit is the peak (VmHWM only grows).
    """
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cwd)
    peak = 0
    while p.poll() is None:
        peak = max(peak, proc_status_kib(p.pid, "VmHWM") or 0)
        if time.perf_counter() - start > timeout:
            p.kill()
            p.wait()
            raise ChildFailed(f"{Path(cmd[0]).name} timed out after {timeout:.0f} s")
        time.sleep(0.01)
    wall = time.perf_counter() - start
    out.seek(0)
    err.seek(0)
    text = out.read().decode(errors="replace")
    if p.returncode != 0:
        tail = err.read().decode(errors="replace")[-1500:]
        raise ChildFailed(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} exited {p.returncode}: {tail}")
    return ChildResult(wall, peak / 1024, text)


@dataclass
class Stat:
    median: float
    lo: float
    hi: float
    n: int

    def fmt(self, digits: int = 0) -> str:
        if self.n == 1:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.lo:.{digits}f}–{self.hi:.{digits}f})"


def stat(values: list[float]) -> Stat:
    if not values:
        raise ValueError("no values")
    return Stat(statistics.median(values), min(values), max(values), len(values))


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def random_file(path: Path, size: int) -> Path:
    block = os.urandom(min(size, MIB))
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            # A fresh prefix per block: no two files (or blocks) share content, so duplicates are never held.
            f.write(os.urandom(16) + block[16:n] if n > 16 else os.urandom(n))
            left -= n
    return path


def clear_dir(d: Path) -> None:
    if d.is_dir():
        for p in d.iterdir():
            if p.is_file() or p.is_symlink():
                p.unlink()


def fast_tmp() -> str | None:
    """/dev/shm when present: the big files and the servers' storage live in RAM, so the disk is
    not what part 1 measures (part 5 measures the disk on its own)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def loadavg() -> str:
    """The 1-minute load average, as /proc says it ("?" where there is none)."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "?"
