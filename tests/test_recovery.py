"""Recovery reconciles every interrupted step with the disk and fileX before sending anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from filex_agent.daemon import Daemon
from filex_agent.store import State
from filex_agent.submitter import spool_dir
from tests.conftest import run_until, wait_for


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


def test_upload_that_reached_filex_is_not_sent_again(cfg, sandbox):
    d = Daemon(cfg)
    route = cfg.routes[0]
    target = spool_dir(route) / "1000" / "REC_up1.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"uploaded before the crash\n")
    # The bytes reach fileX, then the agent "dies" before recording SUBMITTED.
    with d.connections.transport(route) as t:
        t.upload(target, "REC_up1.csv")
    wait_for(lambda: _uploads(sandbox, "REC_up1.csv"), what="upload at sandbox")
    st = target.stat()
    sub = _row(d, Path(route.outbox) / "REC_up1.csv", State.UPLOADING, local=target, size=st.st_size,
               mtime_ns=st.st_mtime_ns)
    from filex_agent.store import utcnow
    from datetime import timedelta
    d.store.update(sub.id, upload_started_at=utcnow() - timedelta(seconds=5))
    wait_for(lambda: any(r["fileName"] == "REC_up1.csv" and r["status"] == "Received by FINRA"
                         for r in sandbox.tracking_records()), what="tracking record")
    d.recover()
    sub = d.store.get(sub.id)
    assert sub.state is State.SUBMITTED
    run_until(d, sub.id, State.ACCEPTED)
    assert len(_uploads(sandbox, "REC_up1.csv")) == 1


def test_upload_that_never_arrived_is_sent_once(cfg, sandbox):
    d = Daemon(cfg, dispatch_interval=0.2)
    route = cfg.routes[0]
    target = spool_dir(route) / "1001" / "REC_up2.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"never arrived\n")
    st = target.stat()
    from filex_agent.fsutil import sha256_file

    sub = _row(d, Path(route.outbox) / "REC_up2.csv", State.UPLOADING, local=target, size=st.st_size,
               mtime_ns=st.st_mtime_ns, sha256=sha256_file(target))
    d.recover()
    assert d.store.get(sub.id).state is State.QUEUED
    run_until(d, sub.id, State.ACCEPTED)
    assert len(_uploads(sandbox, "REC_up2.csv")) == 1


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
