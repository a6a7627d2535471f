"""Exactly once while running: one owner per upload, a lost answer decided on evidence only.

Counted from the sandbox's upload log (every object fileX takes from in/), never from the agent.
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
from filex_agent.store import Outcome, State, open_store
from tests.conftest import wait_for
from tests.test_chaos import REPO, _count, _Daemon, _spooled

pytestmark = pytest.mark.timeout(240)


def _slow_put(sandbox, route, name: str, seconds: float) -> None:
    sandbox.inject_fault("slow", target="s3", seconds=seconds, count=1,
                         path_prefix=f"/{sandbox.bucket}/{route.org}/{route.application}/in/{name}")


def test_stop_past_its_grace_records_the_cut_off_upload_unconfirmed_and_sends_it_once(sandbox, sandbox_config):
    """The PUT is still at the S3 endpoint when the grace ends: the upload may land, so it is
    UNCONFIRMED (never FAILED, never QUEUED), the worker's late answer is refused, and the next
    run decides it from fileX's evidence: filed once."""
    cfg = sandbox_config(transports=("rest",))
    route = cfg.routes[0]
    name = "GRACE_cut_off.csv"
    d = Daemon(cfg, dispatch_interval=0.2)
    d.start()
    try:
        _slow_put(sandbox, route, name, 3.0)
        (Path(route.outbox) / name).write_bytes(b"cut off by the end of the grace\n")
        wait_for(lambda: any(s.file_name == name and s.state is State.UPLOADING and
                             any(a.may_have_landed for a in d.store.attempts(s.id)) for s in d.store.list()),
                 what="the PUT under way")
    finally:
        assert d.stop(grace=0.5) is False
    store = open_store(cfg.journal_path)
    (sub,) = [s for s in store.list() if s.file_name == name]
    assert sub.state is State.UNCONFIRMED and "not sent again" in sub.flag
    assert [a.outcome for a in store.attempts(sub.id)] == [Outcome.UNCONFIRMED]
    time.sleep(3.5)  # the worker's PUT ends; its SUBMITTED must be refused (stale epoch)
    assert store.get(sub.id).state is State.UNCONFIRMED
    store.close()
    d2 = Daemon(cfg, dispatch_interval=0.2)
    d2.start()
    try:
        wait_for(lambda: d2.store.get(sub.id).state is State.ACCEPTED, timeout=30, what="accepted")
    finally:
        d2.stop(grace=5)
    assert _count(sandbox, name) == 1


def test_second_run_on_one_data_dir_exits_2_naming_the_first(sandbox, sandbox_config, tmp_path):
    cfg = sandbox_config(transports=("rest",))
    cfg_path = Path(cfg.agent.data_dir).parent / "filex-agent.toml"
    first = _Daemon(cfg_path, tmp_path / "first.log")
    try:
        first.start()
        assert first.wait_started(timeout=30)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        second = subprocess.run([sys.executable, "-m", "filex_agent", "run", "--config", str(cfg_path)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert f"pid {first.proc.pid}" in second.stderr and "in use by a running agent" in second.stderr
        assert first.proc.poll() is None  # the first one is untouched
    finally:
        first.close()


def test_submit_beside_a_running_daemon_doubles_nothing(sandbox, sandbox_config, tmp_path):
    """One-shot submits on the daemon's journal while it uploads: neither touches the other's rows."""
    cfg = sandbox_config(transports=("rest", "s3"))
    cfg_path = Path(cfg.agent.data_dir).parent / "filex-agent.toml"
    daemon = _Daemon(cfg_path, tmp_path / "daemon.log")
    names = []
    try:
        daemon.start()
        assert daemon.wait_started(timeout=30)
        for i in range(12):
            route = cfg.routes[i % 2]
            name = f"BESIDE_d{i}.csv"
            names.append(name)
            (Path(route.outbox) / name).write_bytes(f"daemon file {i}\n".encode() * 50)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs = []
        for i in range(4):
            src = tmp_path / f"BESIDE_s{i}.csv"
            src.write_bytes(f"submitted file {i}\n".encode() * 50)
            names.append(src.name)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "filex_agent", "submit", str(src), "--route", cfg.routes[i % 2].name,
                 "--config", str(cfg_path)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()
            assert json.loads(out.decode().strip().splitlines()[-1])["state"] in ("SUBMITTED", "ACCEPTED")
        wait_for(lambda: all(_count(sandbox, n) >= 1 for n in names), timeout=90, what="every file filed")
        time.sleep(2)  # anything doubled would show up by now
    finally:
        daemon.close()
    assert {n: _count(sandbox, n) for n in names} == {n: 1 for n in names}


def test_yesterdays_filing_of_the_same_name_and_size_is_no_evidence(sandbox, sandbox_config):
    """An earlier filing with today's name and size (in in_arcv, with its tracking record) must not
    make today's interrupted upload look arrived: its time is before the attempt began."""
    cfg = sandbox_config(transports=("s3",), tracking={"unconfirmed_settle_seconds": 3})
    d = Daemon(cfg, dispatch_interval=0.2)
    route = cfg.routes[0]
    name = "DAILY_same_name.csv"
    data_old, data_new = b"yesterday,1\n", b"today,22222\n"[:len(b"yesterday,1\n")]
    assert len(data_old) == len(data_new)
    sandbox.admin_s3.put_object(Bucket=sandbox.bucket, Key=f"{route.org}/{route.application}/in/{name}",
                                Body=data_old)
    wait_for(lambda: any(r["fileName"] == name and r["status"] == "Received by FINRA"
                         for r in sandbox.tracking_records()), what="yesterday's filing processed")
    sub = _spooled(d, route, name, data_new)
    # The attempt began well after yesterday's filing (more than the clock-skew allowance).
    with d.store._tx() as db:
        db.execute("UPDATE attempts SET started_at = ? WHERE submission_id = ?",
                   ((d.store.now().replace(microsecond=0) + __import__("datetime").timedelta(minutes=3)).isoformat(),
                    sub.id))
    d.recover()
    d.reconciler.run()
    assert d.store.get(sub.id).state is State.UNCONFIRMED  # not SUBMITTED on yesterday's evidence
    d.stop(grace=0)


def test_wrong_size_record_of_the_attempt_is_a_wrong_copy_and_the_right_file_is_sent(sandbox, sandbox_config):
    """A truncated copy reached fileX under this attempt's name after it began: never evidence of
    the file; said loudly (flag, event) and the right file is sent once."""
    cfg = sandbox_config(transports=("s3",))
    d = Daemon(cfg, dispatch_interval=0.2)
    route = cfg.routes[0]
    name = "TRUNC_wrong_copy.csv"
    data = b"the whole file, not a part of it\n" * 10
    sub = _spooled(d, route, name, data)
    sandbox.admin_s3.put_object(Bucket=sandbox.bucket, Key=f"{route.org}/{route.application}/in/{name}",
                                Body=b"")  # what a half-written upload would leave
    wait_for(lambda: any(r["fileName"] == name and r["status"] == "Received by FINRA"
                         for r in sandbox.tracking_records()), what="the wrong copy processed")
    d.recover()
    d.reconciler.run()
    sub = d.store.get(sub.id)
    assert sub.state is State.QUEUED and sub.reason.startswith("a wrong copy reached fileX") and "0 bytes" in sub.reason
    (att,) = d.store.attempts(sub.id)
    assert att.outcome is Outcome.NOT_SENT
    d.start()
    try:
        wait_for(lambda: d.store.get(sub.id).state is State.ACCEPTED, timeout=30, what="the right file accepted")
    finally:
        d.stop(grace=5)
    right = [u for u in sandbox.uploads() if u.name == name and u.size == len(data)]
    assert len(right) == 1 and right[0].sha256 == hashlib.sha256(data).hexdigest()


def test_a_stale_owner_cannot_finish_what_was_taken_over(sandbox, sandbox_config):
    """A worker paused past its lease (SIGSTOP, a long GC) wakes up: its writes are refused."""
    cfg = sandbox_config(transports=("rest",), journal={"lease_seconds": 1})
    d = Daemon(cfg, dispatch_interval=0.2)
    route = cfg.routes[0]
    name = "STALE_owner.csv"
    sub = _spooled(d, route, name, b"paused worker\n", committed=False)
    # A live owner that stopped renewing: its lease runs out and the rescuer takes the row.
    d.store.take_over(sub.id, "elsewhere:1:paused:run", force=True)
    with d.store._tx() as db:
        db.execute("UPDATE submissions SET lease_until = ? WHERE id = ?", (d.store.now().isoformat(), sub.id))
    stale_epoch = d.store.get(sub.id).epoch
    d.rescue_expired()
    sub = d.store.get(sub.id)
    assert sub.state is State.QUEUED and sub.epoch > stale_epoch
    from filex_agent.store import StaleEpoch

    with pytest.raises(StaleEpoch):
        d.store.transition(sub.id, State.SUBMITTED, "late answer of the paused worker", epoch=stale_epoch)
    d.stop(grace=0)


def _lose_the_answer(sandbox, route, name: str) -> None:
    """The upload takes effect at fileX, then its answer is lost (5xx or a dropped connection)."""
    key = f"/{sandbox.bucket}/{route.org}/{route.application}/in/{name}"
    kind = route.transports[0]
    if kind == "rest":
        sandbox.inject_fault("status", target="s3", status=503, after=True, operation="PutObject", path_prefix=key)
    elif kind == "s3":
        sandbox.inject_fault("drop", target="s3", after=True, operation="PutObject", path_prefix=key)
    else:
        sandbox.inject_fault("drop", target="sftp", after=True, operation="rename")


@pytest.mark.parametrize("lag", [0, 5, 30])
def test_lost_answer_is_filed_exactly_once_whatever_fileX_s_lag(sandbox, sandbox_config, lag):
    """Every transport: stored, then the answer lost, with fileX taking the upload 0, 5 or 30 s
    after it was stored. The reconciler waits for the evidence (settle > lag): filed once, whole."""
    cfg = sandbox_config(tracking={"unconfirmed_settle_seconds": lag + 30})
    sandbox.inject_fault("receive_lag", seconds=lag)
    d = Daemon(cfg, dispatch_interval=0.2)
    files = {}
    try:
        d.start()
        for route in cfg.routes:
            name = f"LOST_{route.transports[0]}_{lag}.csv"
            data = f"{route.name} lag {lag}\n".encode() * 100
            _lose_the_answer(sandbox, route, name)
            (Path(route.outbox) / name).write_bytes(data)
            files[name] = data
        wait_for(lambda: all(any(s.file_name == n and s.state is State.ACCEPTED for s in d.store.list())
                             for n in files), timeout=lag + 60, what="every file accepted")
        subs = [s for s in d.store.list() if s.file_name in files]
        assert all([a.outcome for a in d.store.attempts(s.id)] == [Outcome.SENT] for s in subs)
    finally:
        d.stop(grace=5)
        sandbox.clear_faults()
        sandbox.inject_fault("receive_lag", seconds=0)
    for name, data in files.items():
        ups = [u for u in sandbox.uploads() if u.name == name]
        assert len(ups) == 1, f"{name} filed {len(ups)} times"
        assert ups[0].sha256 == hashlib.sha256(data).hexdigest()


def test_rest_to_sftp_fallback_follows_the_sftp_filing_not_the_stale_rest_records(sandbox, sandbox_config):
    """REST handed out tracking ids ("Request Received") but S3 refused every PUT (URLs expired):
    nothing landed, so SFTP takes the file. Tracking then follows the SFTP filing, never the
    stale REST records of the same name."""
    from filex_agent.config import load_config

    if sandbox.sftp is None:
        pytest.skip("no SFTP in this sandbox")
    cfg = sandbox_config(transports=("sftp",))
    path = Path(cfg.agent.data_dir).parent / "filex-agent.toml"
    path.write_text(path.read_text().replace('transport = "sftp"', 'transport = ["rest", "sftp"]'))
    cfg = load_config(path)
    route = cfg.routes[0]
    assert route.transports == ["rest", "sftp"]
    name = "FALLBACK_rest_sftp.csv"
    sandbox.inject_fault("presign_expire_now", count=50)
    d = Daemon(cfg, dispatch_interval=0.2)
    try:
        d.start()
        (Path(route.outbox) / name).write_bytes(b"rest refused, sftp took it\n")
        sub = wait_for(lambda: next((s for s in d.store.list() if s.file_name == name
                                     and s.state is State.ACCEPTED), None), timeout=60, what="accepted")
    finally:
        d.stop(grace=5)
        sandbox.clear_faults()
    (up,) = [u for u in sandbox.uploads() if u.name == name]
    assert up.transport == "sftp" and sub.tracking_id == up.tracking_id
    stale = [r for r in sandbox.tracking_records() if r["fileName"] == name and r["trackingId"] != up.tracking_id]
    assert stale and all(r["status"] == "Request Received" for r in stale)
