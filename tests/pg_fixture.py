"""A real PostgreSQL server on 127.0.0.1 for the journal tests (and the HA chaos test).

``initdb`` into a private temporary folder, ``pg_ctl start`` on a free port, one database per
test, stopped at the end. initdb refuses to run as root: as root, every server command runs as
the ``postgres`` system user the Debian package creates (``runuser -u postgres --``). Host
connections need a password (scram-sha-256), so the tests also prove the password reaches libpq.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SUPERUSER = "filex"


def _bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def skip_reason() -> str | None:
    if _bindir() is None:
        return "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): apt-get install postgresql"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run initdb as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    """One PostgreSQL cluster; ``start()``, ``stop()``, ``kill()`` (crash), ``database(name)``."""

    def __init__(self, base_dir: str | None = None):
        bindir = _bindir()
        assert bindir is not None, skip_reason()
        self.bin = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="filex-pg-", dir=base_dir))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.port = _free_port()
        self.password = secrets.token_urlsafe(18)
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            pg = pwd.getpwnam("postgres")
            os.chown(self.dir, pg.pw_uid, pg.pw_gid)
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password)
        if self._as:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        pwfile.chmod(0o600)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, f"--pwfile={pwfile}", "-E", "UTF8",
                  "--auth-host=scram-sha-256", "--auth-local=trust", "--no-sync")
        pwfile.unlink()
        # Test speed on 2 cores: nothing here must survive a machine crash, only a server crash.
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.dir}'\nfsync = off\nfull_page_writes = off\n"
                       "max_connections = 200\nshared_buffers = 32MB\nlog_min_messages = warning\n")
        self._started = False

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self._as, str(self.bin / tool), *args], capture_output=True, text=True,
                              check=check, timeout=120)

    def start(self) -> None:
        res = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start", check=False)
        if res.returncode != 0:
            raise RuntimeError(f"postgres did not start: {res.stderr}\n{self._log_tail()}")
        self._started = True

    def stop(self, mode: str = "fast") -> None:
        if self._started:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)
            self._started = False

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """The server dies at once (``immediate``: no checkpoint, clients cut): crash recovery on start."""
        self.stop("immediate")

    def _log_tail(self) -> str:
        try:
            return self.log.read_text()[-2000:]
        except OSError:
            return ""

    def url(self, dbname: str = "postgres") -> str:
        """The URL without its password (as the config holds it); the password is ``self.password``."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres"):
        import psycopg

        return psycopg.connect(self.url(dbname), password=self.password, autocommit=True, connect_timeout=10)

    def database(self, name: str, icu_locale: str | None = None) -> str:
        """A new empty database (sorting text by the ICU collation ``icu_locale`` when given, as a
        production database usually does, rather than this cluster's byte order); its URL."""
        options = f" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE '{icu_locale}'" if icu_locale else ""
        with self.connect() as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            db.execute(f'CREATE DATABASE "{name}"{options}')
        return self.url(name)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
