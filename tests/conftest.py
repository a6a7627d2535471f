"""Shared fixtures: a running sandbox fileX and configs pointing at it."""

from __future__ import annotations

import time
from typing import Callable

import pytest


def wait_for(pred: Callable[[], object], timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    """Poll until pred() is truthy; fail with `what` after timeout (no fixed sleeps in tests)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_until(daemon, sub_id: int, state, timeout: float = 20.0) -> None:
    """Start the daemon, wait until submission ``sub_id`` reaches ``state``, stop it."""
    daemon.start()
    try:
        wait_for(lambda: daemon.store.get(sub_id).state is state, timeout=timeout, what=str(state))
    finally:
        daemon.stop(grace=5)


def dead_owner() -> str:
    """The lease owner string of a process of this node that has exited (its pid is gone)."""
    import socket
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return f"{socket.gethostname()}:{p.pid}:dead:run"


def sftp_supported() -> bool:
    try:
        import filex_agent.sandbox.sftp_server  # noqa: F401
        import filex_agent.transports.sftp  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    from filex_agent.sandbox import Sandbox

    sb = Sandbox(tmp_path_factory.mktemp("sandbox"), processing_delay=0.2, sftp=sftp_supported())
    sb.start()
    try:
        yield sb
    finally:
        sb.stop()


@pytest.fixture
def sandbox_config(sandbox, tmp_path):
    """A Config for the running sandbox with fast polling; routes for every transport available."""
    from filex_agent.config import load_config
    from filex_agent.sandbox.agent_config import write_sandbox_config

    def make(**kw):
        kw.setdefault("poll_seconds", 0.5)
        kw.setdefault("stable_seconds", 0.5)
        return load_config(write_sandbox_config(sandbox, tmp_path / "agent", **kw))

    return make


@pytest.fixture
def rest_daemon(sandbox_config):
    """A started Daemon on the sandbox's REST route; stopped at the end."""
    from filex_agent.daemon import Daemon

    d = Daemon(sandbox_config(transports=("rest",)), dispatch_interval=0.2)
    d.start()
    try:
        yield d
    finally:
        d.stop(grace=5)


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server for the session (skipped, with the reason, where there is none)."""
    from tests.pg_fixture import PgServer, skip_reason

    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    server = PgServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_url(pg_server, request):
    """A fresh database on the session's server, for one test; its URL (no password in it)."""
    import re

    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    return pg_server.database(name)


def open_test_store(request, kind: str, sqlite_path):
    """A Store of ``kind``: the SQLite file ``sqlite_path``, or the test's PostgreSQL database."""
    if kind == "sqlite":
        from filex_agent.store.sqlite import SQLiteStore

        return SQLiteStore(sqlite_path)
    from filex_agent.store.postgres import PostgresStore

    server = request.getfixturevalue("pg_server")
    return PostgresStore(request.getfixturevalue("pg_url"), password=server.password)


@pytest.fixture
def store_of_kind(request):
    """``open_test_store`` for fixtures of other modules (a test module cannot import conftest)."""
    return lambda kind, sqlite_path: open_test_store(request, kind, sqlite_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def journal(request, tmp_path):
    """Opens the test's journal, SQLite or PostgreSQL (the Store conformance suite runs on both);
    each call is a new handle on the same journal (a reopen, or another node)."""
    opened = []

    def open_journal():
        store = open_test_store(request, request.param, tmp_path / "j.sqlite3")
        opened.append(store)
        return store

    open_journal.kind = request.param
    yield open_journal
    for store in opened:
        try:
            store.close()
        except Exception:
            pass
