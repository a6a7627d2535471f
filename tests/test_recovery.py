"""Recovery reconciles every interrupted step with the disk and fileX before sending anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from filex_agent.daemon import Daemon
from filex_agent.store import State, open_store
from filex_agent.submitter import spool_dir
from tests.conftest import dead_owner, run_until, wait_for


@pytest.fixture
def cfg(sandbox_config):
    return sandbox_config(transports=("rest",))


def _row(d: Daemon, path: Path, state: State, **kw):
    route = d.config.routes[0]
    return d.store.create(route=route.name, org=route.org, application=route.application, transport="rest",
                          file_name=path.name, source_path=str(path), local_path=str(kw.pop("local", path)),
                          state=state, **kw)


def _uploads(sandbox, name):
    return [u for u in sandbox.uploads() if u.name == name]


def test_claim_interrupted_before_rename_is_completed(cfg, sandbox):
    d = Daemon(cfg)
    outbox = Path(cfg.routes[0].outbox)
    outbox.mkdir(parents=True, exist_ok=True)
    f = outbox / "REC_claim1.csv"
    f.write_bytes(b"x,y\n")
    sub = _row(d, f, State.CLAIMING)
    d.recover()
    sub = d.store.get(sub.id)
    assert sub.state is State.QUEUED and Path(sub.local_path).parent.parent == spool_dir(cfg.routes[0])
    assert not f.exists() and Path(sub.local_path).read_bytes() == b"x,y\n"
    d.stop(grace=0)


def test_claim_interrupted_after_rename_is_confirmed(cfg):
    d = Daemon(cfg)
    route = cfg.routes[0]
    target = spool_dir(route) / "999" / "REC_claim2.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"a\n")
    sub = _row(d, Path(route.outbox) / "REC_claim2.csv", State.CLAIMING, local=target)
    d.recover()
    assert d.store.get(sub.id).state is State.QUEUED
    d.stop(grace=0)


def _interrupted(d: Daemon, route, target: Path, *, committed: bool, started_ago: float = 5.0):
    """A row as a process killed during its upload attempt leaves it: UPLOADING, owned by a dead
    process, its attempt PENDING (committed: the request that can make it a filing went out)."""
    from datetime import timedelta

    from filex_agent.fsutil import sha256_file

    st = target.stat()
    sub = _row(d, Path(route.outbox) / target.name, State.QUEUED, local=target, size=st.st_size,
               mtime_ns=st.st_mtime_ns, sha256=sha256_file(target))
    sub, att = d.store.begin_upload(sub.id, dead_owner(), 600, transport="rest", remote_name=target.name,
                                    upload_location=f"{route.org}/{route.application}/in")
    with d.store._tx() as db:  # the attempt began a few seconds ago
        db.execute("UPDATE attempts SET started_at = ? WHERE id = ?",
                   ((att.started_at - timedelta(seconds=started_ago)).isoformat(), att.id))
    if committed:
        d.store.commit_attempt(att.id, sub.epoch)
    return sub


def test_upload_that_reached_filex_is_not_sent_again(cfg, sandbox):
    d = Daemon(cfg)
    route = cfg.routes[0]
    target = spool_dir(route) / "1000" / "REC_up1.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"uploaded before the crash\n")
    sub = _interrupted(d, route, target, committed=True)
    # The bytes reach fileX, then the agent "dies" before recording the answer.
    with d.connections.transport(route) as t:
        t.upload(target, "REC_up1.csv")
    wait_for(lambda: any(r["fileName"] == "REC_up1.csv" and r["status"] == "Received by FINRA"
                         for r in sandbox.tracking_records()), what="tracking record")
    d.recover()
    sub = d.store.get(sub.id)
    assert sub.state is State.UNCONFIRMED and "not sent again" in sub.flag
    assert d.reconciler.run() == 1
    sub = d.store.get(sub.id)
    assert sub.state is State.SUBMITTED and sub.tracking_id
    assert [a.outcome.value for a in d.store.attempts(sub.id)] == ["SENT"]
    run_until(d, sub.id, State.ACCEPTED)
    assert len(_uploads(sandbox, "REC_up1.csv")) == 1


def test_upload_cut_off_before_it_could_land_is_sent_once(cfg, sandbox):
    d = Daemon(cfg, dispatch_interval=0.2)
    route = cfg.routes[0]
    target = spool_dir(route) / "1001" / "REC_up2.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"never arrived\n")
    sub = _interrupted(d, route, target, committed=False)
    d.recover()
    assert d.store.get(sub.id).state is State.QUEUED
    run_until(d, sub.id, State.ACCEPTED)
    assert len(_uploads(sandbox, "REC_up2.csv")) == 1
    assert [a.outcome.value for a in open_store(cfg.journal_path).attempts(sub.id)] == ["NOT_SENT", "SENT"]


def test_unconfirmed_upload_with_no_trace_is_sent_again_only_after_the_settle_period(sandbox_config, sandbox):
    cfg = sandbox_config(transports=("rest",), tracking={"unconfirmed_settle_seconds": 3})
    d = Daemon(cfg, dispatch_interval=0.2)
    route = cfg.routes[0]
    target = spool_dir(route) / "1003" / "REC_up3.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"lost on the way\n")
    sub = _interrupted(d, route, target, committed=True, started_ago=0)
    d.recover()
    assert d.store.get(sub.id).state is State.UNCONFIRMED
    d.reconciler.run()
    assert d.store.get(sub.id).state is State.UNCONFIRMED  # "not yet" is not "no"
    wait_for(lambda: d.reconciler.run() and d.store.get(sub.id).state is State.QUEUED, timeout=15,
             what="decided after the settle period")
    (att,) = d.store.attempts(sub.id)
    assert att.outcome.value == "NOT_SENT" and "no trace" in att.detail
    assert any("no trace" in (e.detail or "") for e in d.store.events(sub.id))
    run_until(d, sub.id, State.ACCEPTED)
    assert len(_uploads(sandbox, "REC_up3.csv")) == 1


def test_move_interrupted_is_finished(cfg):
    d = Daemon(cfg)
    route = cfg.routes[0]
    sent = route.folder("sent", cfg.agent.data_dir)
    src = spool_dir(route) / "1002" / "REC_mv.csv"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(b"m\n")
    sub = _row(d, Path(route.outbox) / "REC_mv.csv", State.SUBMITTED, local=src, move_to=str(sent))
    d.recover()
    sub = d.store.get(sub.id)
    assert sub.move_to is None and Path(sub.local_path).parent == sent and Path(sub.local_path).exists()
    assert not src.exists()
    d.stop(grace=0)


@pytest.mark.parametrize("outcome", ["UNCONFIRMED", "SENT"])
def test_crash_between_the_attempt_outcome_and_the_row_state_never_frees_a_resend(cfg, sandbox, outcome):
    """The attempt's outcome and the row's state are two writes: a SIGKILL between them leaves
    the row UPLOADING beside an attempt that may have landed. It becomes UNCONFIRMED (decided on
    evidence), never QUEUED (which would send it again, or wedge it beside its open attempt)."""
    from filex_agent.store import Outcome

    d = Daemon(cfg)
    route = cfg.routes[0]
    target = spool_dir(route) / "1004" / f"REC_two_writes_{outcome}.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"two writes\n")
    sub = _interrupted(d, route, target, committed=True)
    (att,) = d.store.attempts(sub.id)
    d.store.end_attempt(att.id, Outcome(outcome), "the last write before the SIGKILL", epoch=sub.epoch)
    d.recover()
    sub = d.store.get(sub.id)
    assert sub.state is State.UNCONFIRMED
    assert [a.outcome for a in d.store.attempts(sub.id)] == [Outcome.UNCONFIRMED]
    d.stop(grace=0)
