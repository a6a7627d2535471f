"""Start a real OpenSSH sshd on 127.0.0.1 for interop tests (and bench/bench_sftp.py).

Everything lives in a private temp directory: host key, sshd_config, authorized_keys and the
remote file tree. Ciphers, key exchanges and MACs are restricted to fileX's published lists
(intersected with what this sshd knows), unless a test asks for others.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"

FILEX_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr"]
FILEX_KEX = [
    "mlkem768x25519-sha256", "mlkem768nistp256-sha256", "mlkem1024nistp384-sha384",
    "curve25519-sha256", "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256", "ecdh-sha2-nistp384", "ecdh-sha2-nistp521",
    "diffie-hellman-group14-sha256", "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512",
    "diffie-hellman-group-exchange-sha256",
]
SHA2_MACS = ["hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com", "hmac-sha2-256", "hmac-sha2-512"]
PASSWORD_USER = "filexsftp"


def skip_reason() -> str | None:
    if not SSHD.exists():
        return f"{SSHD} is absent (install the Debian package openssh-server)"
    if not Path(SSH_KEYGEN).exists():
        return "ssh-keygen is absent (install openssh-client)"
    return None


def _query(kind: str) -> set[str] | None:
    ssh = shutil.which("ssh")
    if not ssh:
        return None
    r = subprocess.run([ssh, "-Q", kind], capture_output=True, text=True, timeout=10)
    return set(r.stdout.split()) if r.returncode == 0 else None


def supported(kind: str, wanted: list[str]) -> list[str]:
    """``wanted`` minus what this OpenSSH does not know (an unknown name makes sshd refuse to start)."""
    have = _query(kind)
    return [a for a in wanted if have is None or a in have]


def keygen(path: Path, kind: str = "ed25519", passphrase: str = "") -> Path:
    args = [SSH_KEYGEN, "-q", "-t", kind, "-N", passphrase, "-C", "filex-test", "-f", str(path)]
    if kind == "rsa":
        args[4:4] = ["-b", "2048"]
    subprocess.run(args, check=True, capture_output=True, timeout=60)
    return path


def key_fingerprint(pub: Path) -> str:
    out = subprocess.run([SSH_KEYGEN, "-lf", str(pub)], check=True, capture_output=True, text=True, timeout=10).stdout
    return out.split()[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Descendants of ``pid`` (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(d))
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for c in parents.get(p, []):
            out.append(c)
            todo.append(c)
    return out


class Sshd:
    """One sshd process with its own config; ``start()`` / ``stop()``."""

    def __init__(self, *, ciphers: list[str] | None = None, kex: list[str] | None = None,
                 macs: list[str] | None = None, password_auth: bool = False, base_dir: str | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="filex-sshd-", dir=base_dir))
        # Traversable by the password test user (pytest's tmp dirs are 0700).
        os.chmod(self.dir, 0o755)
        self.host = "127.0.0.1"
        self.port = _free_port()
        self.ciphers = ciphers if ciphers is not None else supported("cipher", FILEX_CIPHERS)
        self.kex = kex if kex is not None else supported("kex", FILEX_KEX)
        self.macs = macs if macs is not None else supported("mac", SHA2_MACS)
        self.password_auth = password_auth
        self.host_key = keygen(self.dir / "ssh_host_ed25519_key")
        self.host_key_fingerprint = key_fingerprint(self.dir / "ssh_host_ed25519_key.pub")
        self.authorized_keys = self.dir / "authorized_keys"
        self.authorized_keys.touch()
        self.root = self.dir / "remote"
        self.known_hosts = self.dir / "known_hosts"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "sshd.log"

    @property
    def login_user(self) -> str:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name

    def authorize(self, pub: Path) -> None:
        with self.authorized_keys.open("a") as f:
            f.write(pub.read_text().strip() + "\n")

    def make_layout(self, orgs: dict[str, list[str]]) -> Path:
        for org, apps in orgs.items():
            for app in apps:
                for sub in ("in", "out", "in_arcv"):
                    (self.root / org / app / sub).mkdir(parents=True, exist_ok=True)
        return self.root

    def start(self) -> "Sshd":
        cfg = self.dir / "sshd_config"
        lines = [
            f"ListenAddress {self.host}",
            f"Port {self.port}",
            f"HostKey {self.host_key}",
            "PidFile none",
            "UsePAM no",
            "StrictModes no",
            "PermitRootLogin yes",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "PubkeyAuthentication yes",
            f"PasswordAuthentication {'yes' if self.password_auth else 'no'}",
            "KbdInteractiveAuthentication no",
            "Subsystem sftp internal-sftp",
            f"Ciphers {','.join(self.ciphers)}",
            f"KexAlgorithms {','.join(self.kex)}",
            f"MACs {','.join(self.macs)}",
            "LogLevel VERBOSE",
            "MaxStartups 50",
        ]
        cfg.write_text("\n".join(lines) + "\n")
        self.known_hosts.write_text(
            f"[{self.host}]:{self.port} " + (self.dir / "ssh_host_ed25519_key.pub").read_text().rsplit(" ", 1)[0] + "\n"
        )
        if os.geteuid() == 0:
            # Privilege separation directory sshd insists on when started as root.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        logf = self.log.open("wb")
        self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(cfg)], stdout=logf, stderr=logf,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=1) as s:
                if s.recv(8).startswith(b"SSH-"):
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("sshd did not answer within 10 s")

    def kill_sessions(self) -> int:
        """SIGKILL every per-connection sshd process (simulates a dropped connection)."""
        assert self.proc is not None
        pids = _children(self.proc.pid)
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and _zombie(p) is False for p in pids):
            time.sleep(0.02)
        return len(pids)

    def kill(self) -> None:
        """SIGKILL the listener and its sessions, keeping the files: ``start()`` brings it back."""
        if self.proc is not None:
            self.kill_sessions()
            self.proc.kill()
            self.proc.wait(5)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for p in _children(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _zombie(pid: int) -> bool | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return None


class PasswordUser:
    """A throw-away local account with a random password (root only)."""

    def __init__(self, name: str = PASSWORD_USER):
        self.name = name
        self.password = secrets.token_urlsafe(18)
        self.created = False

    @staticmethod
    def unavailable() -> str | None:
        if os.geteuid() != 0:
            return "creating a local user for password login needs root"
        if not (shutil.which("useradd") and shutil.which("chpasswd") and shutil.which("userdel")):
            return "useradd/chpasswd/userdel are absent"
        return None

    def __enter__(self) -> "PasswordUser":
        r = subprocess.run(["id", "-u", self.name], capture_output=True, timeout=10)
        if r.returncode != 0:
            subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/bin/sh", self.name],
                           check=True, capture_output=True, timeout=30)
            self.created = True
        subprocess.run(["chpasswd"], input=f"{self.name}:{self.password}".encode(), check=True,
                       capture_output=True, timeout=30)
        return self

    def chown(self, path: Path) -> None:
        import pwd

        pw = pwd.getpwnam(self.name)
        for dirpath, _dirs, _files in os.walk(path):
            os.chown(dirpath, pw.pw_uid, pw.pw_gid)

    def __exit__(self, *exc: object) -> None:
        if self.created:
            subprocess.run(["userdel", self.name], capture_output=True, timeout=30)
