"""Issue 2's acceptance test: the daemon against the sandbox, end to end, over REST.

A valid file is ACCEPTED with its feedback filed and linked; a REJECT file is REJECTED with
feedback; `bad#name.txt` FAILS and is never uploaded; a file written slowly in chunks is
uploaded once, whole (sha256 compared with what the sandbox stored).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from filex_agent.daemon import Daemon
from filex_agent.store import State
from tests.conftest import wait_for


def _by_name(daemon: Daemon, name: str):
    subs = [s for s in daemon.store.list() if s.file_name == name]
    return subs[-1] if subs else None


def _final(daemon: Daemon, name: str, state: State, timeout: float = 30):
    return wait_for(lambda: (s := _by_name(daemon, name)) is not None and s.state is state and s,
                    timeout=timeout, what=f"{name} to be {state}")


@pytest.fixture
def daemon(rest_daemon):
    return rest_daemon


def test_pipeline_end_to_end(daemon, sandbox):
    cfg = daemon.config
    route = cfg.routes[0]
    outbox = Path(route.outbox)

    # A file written slowly in chunks (pauses shorter than stable_seconds): taken once, whole.
    slow = outbox / "SLOW_report.csv"
    chunks = [os.urandom(64 * 1024) for _ in range(5)]
    with open(slow, "wb") as f:
        for c in chunks:
            f.write(c)
            f.flush()
            time.sleep(0.2)
    slow_sha = hashlib.sha256(b"".join(chunks)).hexdigest()

    (outbox / "GOOD_report.csv").write_bytes(b"id,value\n1,2\n")
    (outbox / "REJECT_me.csv").write_bytes(b"id,value\nbroken\n")
    (outbox / "bad#name.txt").write_bytes(b"never sent\n")

    good = _final(daemon, "GOOD_report.csv", State.ACCEPTED)
    rejected = _final(daemon, "REJECT_me.csv", State.REJECTED)
    bad = _final(daemon, "bad#name.txt", State.FAILED)
    slow_sub = _final(daemon, "SLOW_report.csv", State.ACCEPTED)

    # Feedback filed locally and linked to its submission (the tracker fetches it after final).
    for sub in (good, rejected):
        fb = wait_for(lambda: daemon.store.feedback_for(sub.id), what=f"feedback of {sub.file_name}")
        path = Path(fb[0].local_path)
        assert path.is_file() and path.parent == route.folder("feedback", cfg.agent.data_dir)
        assert sub.tracking_id in path.name
    assert "REJECT" in Path(daemon.store.feedback_for(rejected.id)[0].local_path).read_text().upper()

    # Originals filed by outcome.
    assert Path(daemon.store.get(good.id).local_path).parent == route.folder("accepted", cfg.agent.data_dir)
    assert Path(daemon.store.get(rejected.id).local_path).parent == route.folder("rejected", cfg.agent.data_dir)
    failed_path = Path(bad.local_path)
    assert failed_path.parent == route.folder("failed", cfg.agent.data_dir)
    reason_file = failed_path.with_name(failed_path.name + ".reason.txt")
    assert "#" in reason_file.read_text() and "#" in bad.reason

    # What the sandbox really received: each good file once, whole; the bad name never.
    uploads = sandbox.uploads()
    names = [u.name for u in uploads]
    assert names.count("GOOD_report.csv") == 1
    assert names.count("SLOW_report.csv") == 1
    assert "bad#name.txt" not in names and not any("bad" in n for n in names)
    slow_up = next(u for u in uploads if u.name == "SLOW_report.csv")
    assert slow_up.sha256 == slow_sha == slow_sub.sha256
    assert slow_up.transport == "rest" and slow_up.tracking_id == slow_sub.tracking_id

    # Nothing left in the outbox but the agent's own spool folder.
    assert [p.name for p in outbox.iterdir() if p.name != ".filex-agent"] == []


def test_status_cli_shows_everything(daemon):
    outbox = Path(daemon.config.routes[0].outbox)
    (outbox / "STATUS_check.csv").write_bytes(b"a,b\n")
    sub = _final(daemon, "STATUS_check.csv", State.ACCEPTED)
    wait_for(lambda: daemon.store.feedback_for(sub.id), what="feedback")
    cfg_path = Path(daemon.config.agent.data_dir).parent / "filex-agent.toml"
    proc = subprocess.run([sys.executable, "-m", "filex_agent", "status", "--config", str(cfg_path), "--json"],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=60)
    assert proc.returncode == 0, proc.stderr
    row = next(r for r in json.loads(proc.stdout) if r["id"] == sub.id)
    assert row["state"] == "ACCEPTED" and row["tracking_id"] == sub.tracking_id
    assert row["sha256"] == sub.sha256 and row["size"] == 4
    assert row["org"] == "0001" and row["application"] == "app1" and row["transport"] == "rest"
    assert row["feedback"] and Path(row["feedback"][0]).is_file()


def test_duplicate_content_is_held_until_released(daemon, sandbox):
    outbox = Path(daemon.config.routes[0].outbox)
    (outbox / "DUP_a.csv").write_bytes(b"same bytes\n")
    _final(daemon, "DUP_a.csv", State.ACCEPTED)
    (outbox / "DUP_b.csv").write_bytes(b"same bytes\n")
    held = _final(daemon, "DUP_b.csv", State.HELD)
    assert "DUP_a.csv" in held.reason and f"release {held.id}" in held.reason
    assert "DUP_b.csv" not in [u.name for u in sandbox.uploads()]
    daemon.submitter.release(held.id)
    _final(daemon, "DUP_b.csv", State.ACCEPTED)


def test_empty_file_fails_with_reason(daemon, sandbox):
    outbox = Path(daemon.config.routes[0].outbox)
    (outbox / "EMPTY.csv").write_bytes(b"")
    sub = _final(daemon, "EMPTY.csv", State.FAILED)
    assert "empty" in sub.reason
    assert "EMPTY.csv" not in [u.name for u in sandbox.uploads()]


def test_symlink_is_refused(daemon, sandbox, tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:x:0:0\n")
    outbox = Path(daemon.config.routes[0].outbox)
    (outbox / "LINK.csv").symlink_to(secret)
    sub = _final(daemon, "LINK.csv", State.FAILED)
    assert "symbolic link" in sub.reason
    assert "LINK.csv" not in [u.name for u in sandbox.uploads()]
    assert secret.read_text() == "root:x:0:0\n"


@pytest.mark.parametrize("kind", ["rest", "s3", "sftp"])
def test_every_transport_through_the_daemon(kind, sandbox, sandbox_config):
    """Same outcome whatever the transport; S3/SFTP uploads are matched to tracking by name/size/time."""
    from tests.conftest import sftp_supported

    if kind == "sftp" and not sftp_supported():
        pytest.skip("SFTP transport not available")
    cfg = sandbox_config(transports=(kind,))
    d = Daemon(cfg, dispatch_interval=0.2)
    d.start()
    try:
        outbox = Path(cfg.routes[0].outbox)
        (outbox / f"E2E_{kind}_ok.csv").write_bytes(b"ok\n" * 100)
        (outbox / f"E2E_{kind}_PARTIAL.csv").write_bytes(b"partial\n")
        ok = _final(d, f"E2E_{kind}_ok.csv", State.ACCEPTED)
        part = _final(d, f"E2E_{kind}_PARTIAL.csv", State.PARTIALLY_REJECTED)
        for sub in (ok, part):
            assert sub.tracking_id
            fb = wait_for(lambda: d.store.feedback_for(sub.id), what=f"feedback for {sub.file_name}")
            assert Path(fb[0].local_path).is_file()
        up = [u for u in sandbox.uploads() if u.name == f"E2E_{kind}_ok.csv"]
        assert len(up) == 1 and up[0].transport == kind and up[0].tracking_id == ok.tracking_id
        assert up[0].sha256 == ok.sha256
        assert "corrected data" in part.reason
    finally:
        d.stop(grace=5)


def test_trigger_route_consumes_its_trigger_and_never_takes_a_file_half_written(sandbox, sandbox_config):
    """readiness = "trigger": the trigger is removed whenever the file is taken (filed or
    refused), and a trigger alone (stale, or written first) never releases a file still being
    written: it must be stable as well."""
    cfg = sandbox_config(transports=("rest",))
    # stable_seconds well above the writer's pauses: a loaded machine must not stretch one past it.
    route = cfg.routes[0].model_copy(update={"readiness": "trigger", "stable_seconds": 1.5})
    cfg = cfg.model_copy(update={"routes": [route]})
    d = Daemon(cfg, dispatch_interval=0.2)
    d.start()
    try:
        outbox = Path(route.outbox)
        (outbox / "TRIG_a.csv").write_bytes(b"first version\n")
        (outbox / "TRIG_a.csv.done").touch()
        (outbox / "TRIG_link.csv").symlink_to(outbox / "TRIG_a.csv")
        (outbox / "TRIG_link.csv.done").touch()
        first = _final(d, "TRIG_a.csv", State.ACCEPTED)
        _final(d, "TRIG_link.csv", State.FAILED)
        assert sorted(p.name for p in outbox.iterdir()) == [".filex-agent"]  # both triggers consumed

        # The same name again, appended to in slow steps (each much shorter than stable_seconds)
        # with a trigger already present, as a stale one would be.
        (outbox / "TRIG_a.csv.done").touch()
        chunks = [os.urandom(32 * 1024) for _ in range(8)]
        for c in chunks:
            with open(outbox / "TRIG_a.csv", "ab") as f:
                f.write(c)
            time.sleep(0.2)
        whole = hashlib.sha256(b"".join(chunks)).hexdigest()
        second = wait_for(lambda: next((s for s in d.store.list() if s.file_name == "TRIG_a.csv"
                                        and s.id != first.id and s.state is State.ACCEPTED), None),
                          timeout=30, what="the second TRIG_a.csv accepted")
        assert second.sha256 == whole
        sent = [u for u in sandbox.uploads() if u.name == "TRIG_a.csv"]
        assert [u.sha256 for u in sent] == [first.sha256, whole]  # each version once, whole
        assert [s.file_name for s in d.store.list()].count("TRIG_a.csv") == 2  # no part taken apart
        assert not (outbox / "TRIG_a.csv.done").exists()
    finally:
        d.stop(grace=5)


def test_feedback_is_not_filed_again_when_the_route_changes_transport(sandbox, sandbox_config):
    """The once-only key of a feedback file holds its modified time as a UTC instant to the
    second: REST (fileX's local time with milliseconds), S3 and SFTP listings of the same ``out``
    file give the same key. Rows of an older journal (REST's text kept as it was) match too."""
    import sqlite3
    from datetime import datetime, timedelta, timezone

    from tests.conftest import sftp_supported

    cfg = sandbox_config(transports=("rest",))
    route = cfg.routes[0]
    names = [f"XPORT_{os.getpid()}_{i}_fb.txt" for i in range(3)]
    for n in names:
        sandbox.admin_s3.put_object(Bucket=sandbox.bucket, Key=f"{route.org}/{route.application}/out/{n}",
                                    Body=n.encode())
    folder = route.folder("feedback", cfg.agent.data_dir)

    def mine() -> list[str]:
        return sorted(p.name for p in folder.iterdir() if p.name.startswith("XPORT_")) if folder.is_dir() else []

    d = Daemon(cfg)
    try:
        assert d.feedback.collect(route) >= 3
    finally:
        d.stop(grace=0)
    assert mine() == names
    # As the agent before this change wrote them: REST's own text for the time.
    with sqlite3.connect(cfg.journal_path) as db:
        for fid, modified in db.execute("SELECT id, remote_modified FROM feedback").fetchall():
            when = datetime.fromisoformat(modified.replace("Z", "+00:00"))
            db.execute("UPDATE feedback SET remote_modified = ? WHERE id = ?",
                       (when.astimezone(timezone(timedelta(hours=-5))).isoformat(), fid))
    db.close()

    for kind in ("s3", "sftp"):
        if kind == "sftp" and not sftp_supported():
            continue
        moved = route.model_copy(update={"transport": kind})
        d = Daemon(cfg.model_copy(update={"routes": [moved]}))
        try:
            assert d.feedback.collect(moved) == 0, f"feedback filed again over {kind}"
        finally:
            d.stop(grace=0)
        assert mine() == names  # no ~1 copies
