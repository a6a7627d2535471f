"""The agent under test: its config, the daemon in a child process, and its journal read from outside."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import PY, ROOT, cpu_seconds, proc_status_kib

ROUTES = {  # transport -> (route name, org, application); REST and S3 to the sandbox, SFTP to the real sshd
    "rest": ("bench-rest", "0001", "app1"),
    "s3": ("bench-s3", "0001", "app2"),
    "sftp": ("bench-sftp", "0001", "app1"),
}


def _q(value: object) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_config(path: Path, data_dir: Path, outboxes: Path, *, sandbox=None, sshd=None,  # noqa: ANN001
                 transports: tuple[str, ...] = ("rest", "s3", "sftp"), stable_seconds: float = 0.5,
                 poll_seconds: float = 3600.0, api_override: str | None = None, workers: int | None = None,
                 max_attempts: int = 3, read_timeout: float = 120.0, journal: str = "") -> Path:
    """A filex-agent.toml for the bench servers. ``api_override`` points the fileX API at an address
    where nothing listens (part 4: uploads blocked); ``journal`` is a ``[journal]`` table (TOML
    text, from ``JournalKind.setup``), empty for the SQLite file in ``data_dir``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    api = api_override or (sandbox.api if sandbox else "http://127.0.0.1:9")
    token = api_override + "/token" if api_override else (sandbox.token_url if sandbox else api + "/token")
    lines = ["[agent]", f"data_dir = {_q(data_dir)}", "shutdown_grace_seconds = 5"]
    if workers:
        lines.append(f"workers = {workers}")
    lines += ["", "[environment]", 'name = "custom"', "allow_insecure = true", f"fip_token_url = {_q(token)}", f"api_base_url = {_q(api)}"]
    if sandbox:
        lines.append(f"s3_endpoint_url = {_q(sandbox.s3_url)}")
    if sshd:
        lines += [f"sftp_host = {_q(sshd.host)}", f"sftp_port = {sshd.port}"]
    lines += ["", "[network]", f"max_attempts = {max_attempts}", "backoff_initial = 0.2", "backoff_max = 2",
              "connect_timeout = 5", f"read_timeout = {read_timeout:g}", "",
              "[tracking]", f"poll_interval_seconds = {poll_seconds}", ""]
    if sshd:
        lines += ["[sftp]", f"host_key_fingerprints = [{_q(sshd.fingerprint)}]",
                  f"in_path = {_q(str(sshd.root) + '/{org}/{app}/in')}",
                  f"out_path = {_q(str(sshd.root) + '/{org}/{app}/out')}", ""]
    if journal:
        lines += [journal.rstrip("\n"), ""]
    lines += ["[credentials.fip]", 'client_id = "sandbox-client"']
    secret = sandbox.secret_file if sandbox else data_dir.parent / "no-secret"
    if not sandbox:
        secret.write_text("unused\n")
    lines.append(f"client_secret = {_q('file:' + str(secret))}")
    if sshd:
        lines += ["", "[credentials.sshd]", f"sftp_username = {_q(sshd.user)}", f"sftp_private_key = {_q(sshd.key)}"]
    for kind in transports:
        name, org, app = ROUTES[kind]
        lines += ["", "[[routes]]", f"name = {_q(name)}", f"outbox = {_q(outboxes / name)}", f"org = {_q(org)}",
                  f"application = {_q(app)}", f"transport = {_q(kind)}",
                  f"credential = {_q('sshd' if kind == 'sftp' else 'fip')}", f"stable_seconds = {stable_seconds}"]
        (outboxes / name).mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Row:
    file_name: str
    state: str
    created_at: datetime
    upload_started_at: datetime | None
    uploaded_at: datetime | None


class Journal:
    """Read-only view of the daemon's SQLite journal (WAL: reading never blocks the daemon)."""

    def __init__(self, path: Path):
        self.path = path

    def _rows(self, sql: str, args: tuple[object, ...]) -> list[sqlite3.Row]:
        if not self.path.exists():
            return []
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        try:
            db.row_factory = sqlite3.Row
            return db.execute(sql, args).fetchall()
        except sqlite3.OperationalError:  # schema not created yet
            return []
        finally:
            db.close()

    def rows(self, route: str, prefix: str = "") -> list[Row]:
        out = []
        for r in self._rows("SELECT file_name, state, created_at, upload_started_at, uploaded_at FROM submissions "
                            "WHERE route = ? AND file_name LIKE ?", (route, prefix + "%")):
            out.append(Row(r["file_name"], r["state"], datetime.fromisoformat(r["created_at"]),
                           datetime.fromisoformat(r["upload_started_at"]) if r["upload_started_at"] else None,
                           datetime.fromisoformat(r["uploaded_at"]) if r["uploaded_at"] else None))
        return out

    def count(self, states: tuple[str, ...] | None = None) -> int:
        if states:
            rows = self._rows(f"SELECT COUNT(*) FROM submissions WHERE state IN ({','.join('?' * len(states))})",
                              states)
        else:
            rows = self._rows("SELECT COUNT(*) FROM submissions", ())
        return int(rows[0][0]) if rows else 0

    def close(self) -> None:  # a connection per query: nothing held
        pass

    def wait_uploaded(self, route: str, prefix: str, n: int, timeout: float) -> list[Row]:
        """Every one of the ``n`` files uploaded (uploaded_at set); raise on a FAILED or HELD one."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.rows(route, prefix)
            bad = [r for r in rows if r.state in ("FAILED", "HELD")]
            if bad:
                raise RuntimeError(f"{len(bad)} bench file(s) {bad[0].state} on {route}: see the journal")
            done = [r for r in rows if r.uploaded_at is not None]
            if len(done) >= n:
                return done
            if time.monotonic() > deadline:
                raise RuntimeError(f"{route}: only {len(done)}/{n} uploaded after {timeout:.0f} s")
            time.sleep(0.1)


PG_PASSWORD_ENV = "FILEX_BENCH_PG_PASSWORD"  # the daemons' journal.password reference (env:...)


def pg_skip_reason() -> str | None:
    """Why the bench cannot run a PostgreSQL journal here (None: it can)."""
    from tests.pg_fixture import skip_reason

    return skip_reason()


def start_postgres(base_dir: str | None = None):  # noqa: ANN201 - tests.pg_fixture.PgServer
    """The bench's PostgreSQL: tests/pg_fixture.py's private cluster on loopback (initdb into a
    temporary folder on disk, beside the SQLite journals), but durable as a production journal is:
    the tests turn fsync and full-page writes off for speed, which would flatter PostgreSQL against
    SQLite's synchronous=FULL. shared_buffers back to PostgreSQL's default (the tests use 32 MB)."""
    from tests.pg_fixture import PgServer

    pg = PgServer(base_dir)
    with open(pg.data / "postgresql.conf", "a") as conf:  # later lines win over the fixture's
        conf.write("fsync = on\nfull_page_writes = on\nsynchronous_commit = on\nshared_buffers = 128MB\n")
    pg.start()
    os.environ[PG_PASSWORD_ENV] = pg.password  # inherited by the daemons, never written to a file
    return pg


class PgJournal(Journal):
    """Read-only view of a daemon's PostgreSQL journal (same answers as ``Journal``)."""

    def __init__(self, url: str, password: str):
        self.url, self.password = url, password
        self._db: Any = None

    def _query(self, sql: str, args: tuple[object, ...]) -> list[tuple]:
        import psycopg

        for attempt in (1, 2):
            try:
                if self._db is None or self._db.closed:
                    self._db = psycopg.connect(self.url, password=self.password, autocommit=True, connect_timeout=10)
                return self._db.execute(sql, args).fetchall()
            except psycopg.errors.UndefinedTable:  # the daemon has not made its schema yet
                return []
            except psycopg.OperationalError:
                self.close()
                if attempt == 2:
                    raise
        return []

    def rows(self, route: str, prefix: str = "") -> list[Row]:
        return [Row(*r) for r in self._query(
            "SELECT file_name, state, created_at, upload_started_at, uploaded_at FROM submissions "
            "WHERE route = %s AND file_name LIKE %s", (route, prefix + "%"))]

    def count(self, states: tuple[str, ...] | None = None) -> int:
        if states:
            rows = self._query("SELECT COUNT(*) FROM submissions WHERE state = ANY(%s)", (list(states),))
        else:
            rows = self._query("SELECT COUNT(*) FROM submissions", ())
        return int(rows[0][0]) if rows else 0

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


class JournalKind:
    """Where a bench daemon keeps its journal: the SQLite file in its data_dir (``pg`` None, the
    default) or a fresh database of its own on the bench's PostgreSQL."""

    def __init__(self, pg=None):  # noqa: ANN001 - tests.pg_fixture.PgServer
        self.pg = pg

    @property
    def label(self) -> str:
        return "PostgreSQL" if self.pg is not None else "SQLite"

    def setup(self, tag: str, data_dir: Path) -> tuple[str, Journal]:
        """The ``[journal]`` table for ``write_config`` and a reader of that journal."""
        if self.pg is None:
            return "", Journal(data_dir / "journal.sqlite3")
        url = self.pg.database(f"bench_{tag}")
        table = (f'[journal]\nurl = {_q(url)}\npassword = "env:{PG_PASSWORD_ENV}"\nnode_name = "bench"\n')
        return table, PgJournal(url, self.pg.password)

    def server_cpu(self) -> float | None:
        """CPU seconds used so far by the PostgreSQL server's processes (None for SQLite): the
        postmaster and its children (backends, checkpointer, WAL writer, autovacuum)."""
        if self.pg is None:
            return None
        try:
            master = int((self.pg.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        total = 0.0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # exited meanwhile
            # utime, stime; the postmaster's cutime and cstime too: backends that exited meanwhile.
            if pid == master:
                total += sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
            elif int(fields[1]) == master:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total


SQLITE = JournalKind()


class Daemon:
    """``python -m filex_agent run --config FILE`` in a child process."""

    def __init__(self, config: Path, log: Path):
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_started: float = 120.0) -> "Daemon":
        f = open(self.log, "wb")
        self.proc = subprocess.Popen([PY, "-m", "filex_agent", "run", "--config", str(self.config)], stdout=f,
                                     stderr=f, stdin=subprocess.DEVNULL, cwd=ROOT,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
        f.close()
        deadline = time.monotonic() + wait_started
        while b"filex-agent started" not in self.log.read_bytes():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited {self.proc.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-1500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not start within {wait_started:.0f} s")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mib(self) -> float:
        return (proc_status_kib(self.pid, "VmRSS") or 0) / 1024

    def hwm_mib(self) -> float:
        return (proc_status_kib(self.pid, "VmHWM") or 0) / 1024

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self, wait: float = 60.0) -> tuple[float, bool]:
        """SIGTERM; (seconds until the process exited, whether it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0, False
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(wait)
            return time.monotonic() - t0, False
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return time.monotonic() - t0, True
