"""One conformance suite, run against every transport (rclone's fstests idea).

A new transport is proven by adding its kind to KINDS: the same tests, against the sandbox.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from filex_agent.connections import Connections
from filex_agent.errors import NotEntitledError, PermanentError, UploadUnconfirmed
from filex_agent.transports import Transport, UploadResult
from tests.conftest import sftp_supported, wait_for

KINDS = ["rest", "s3", "sftp"]


@pytest.fixture(scope="module")
def connections(sandbox, tmp_path_factory):
    from filex_agent.config import load_config
    from filex_agent.sandbox.agent_config import write_sandbox_config

    cfg = load_config(write_sandbox_config(sandbox, tmp_path_factory.mktemp("conf")))
    conns = Connections(cfg)
    yield conns
    conns.close()


def _transport(connections, kind: str, org: str = "0001", app: str = "app1") -> Transport:
    if kind == "sftp" and not sftp_supported():
        pytest.skip("SFTP transport not available")
    route = next(r for r in connections.config.routes if r.transports[0] == kind)
    route = route.model_copy(update={"org": org, "application": app})
    return connections.transport(route, kind)


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


def _file(tmp_path: Path, name: str, size: int) -> tuple[Path, str]:
    p = tmp_path / name
    data = os.urandom(size)
    p.write_bytes(data)
    return p, hashlib.sha256(data).hexdigest()


def test_upload_arrives_whole_once(connections, sandbox, kind, tmp_path):
    name = f"CONF_{kind}_small.csv"
    path, sha = _file(tmp_path, name, 10_000)
    seen = []
    with _transport(connections, kind) as t:
        result = t.upload(path, name, progress=seen.append)
    assert isinstance(result, UploadResult)
    assert result.size == 10_000 and result.remote_name == name
    assert result.upload_location == "0001/app1/in"
    assert sum(seen) == 10_000
    if kind == "rest":
        assert result.tracking_id
    up = wait_for(lambda: [u for u in sandbox.uploads() if u.name == name], what=f"{name} at the sandbox")
    assert len(up) == 1 and up[0].sha256 == sha and up[0].size == 10_000 and up[0].transport == kind


def test_large_upload_is_intact(connections, sandbox, kind, tmp_path):
    name = f"CONF_{kind}_large.bin"
    path, sha = _file(tmp_path, name, 12 * 1024 * 1024 + 123)
    with _transport(connections, kind) as t:
        t.upload(path, name)
    up = wait_for(lambda: [u for u in sandbox.uploads() if u.name == name], timeout=60, what=name)
    assert up[0].sha256 == sha


def test_feedback_listed_and_downloaded(connections, sandbox, kind, tmp_path):
    name = f"CONF_{kind}_fb.csv"
    path, _ = _file(tmp_path, name, 100)
    with _transport(connections, kind) as t:
        t.upload(path, name)
        stem = Path(name).stem
        fb = wait_for(lambda: [f for f in t.list_feedback() if stem in f.name], timeout=30, what="feedback file")
        buf = io.BytesIO()
        n = t.download_feedback(fb[0].name, buf)
    expected = sandbox.s3_client().get_object(Bucket=sandbox.bucket, Key=f"0001/app1/out/{fb[0].name}")["Body"].read()
    assert n == len(expected) and buf.getvalue() == expected
    assert fb[0].size in (None, len(expected))


def test_not_entitled_org_is_a_clear_permanent_error(connections, kind, tmp_path):
    path, _ = _file(tmp_path, "CONF_denied.csv", 10)
    with pytest.raises(NotEntitledError) as e:
        with _transport(connections, kind, org="0003") as t:
            t.upload(path, "CONF_denied.csv")
    assert "0003" in str(e.value)


def test_missing_local_file_sends_nothing(connections, sandbox, kind, tmp_path):
    with pytest.raises((OSError, PermanentError)):
        with _transport(connections, kind) as t:
            t.upload(tmp_path / "nope.csv", "CONF_nope.csv")
    assert "CONF_nope.csv" not in [u.name for u in sandbox.uploads()]


# -- exactly once: what every transport must do at its point of no return ----------------------
#
# Each transport has one committing request (REST: the pre-signed PUT; S3: PutObject for a small
# file; SFTP: the rename into in/). The sandbox's "after" faults let that request take effect
# and then lose its answer; the transport cannot tell that from a failure, so it must raise
# UploadUnconfirmed and never send the file again: the reconciler decides from fileX's evidence.

COMMIT_POINT = {
    "rest": {"target": "s3", "operation": "PutObject"},
    "s3": {"target": "s3", "operation": "PutObject"},
    "sftp": {"target": "sftp", "operation": "rename"},
}
# A refusal before anything was stored, which each transport retries inside the attempt.
REFUSAL = {
    "rest": ("presign_expire_now", {}),
    "s3": ("s3_creds_expire_now", {}),
    "sftp": ("drop", {"target": "sftp", "operation": "write"}),
}


def _arrived(sandbox, name: str) -> list:
    return [u for u in sandbox.uploads() if u.name == name]


def _in_keys(sandbox, name: str) -> list[str]:
    """Objects named ``name`` in 0001/app1/in/ or already taken into in_arcv/ (the sandbox's S3)."""
    s3 = sandbox.s3_client()
    stem = Path(name).stem
    keys = []
    for prefix in ("0001/app1/in/", "0001/app1/in_arcv/"):
        for obj in s3.list_objects_v2(Bucket=sandbox.bucket, Prefix=prefix).get("Contents", []):
            base = obj["Key"][len(prefix):]
            if base == name or base.startswith(stem + "_"):
                keys.append(obj["Key"])
    return keys


@pytest.fixture
def clean_faults(sandbox):
    sandbox.clear_faults()
    yield
    sandbox.clear_faults()


def test_on_commit_once_before_the_file_can_arrive(connections, sandbox, kind, tmp_path, clean_faults):
    name = f"CONF_{kind}_commit.csv"
    path, sha = _file(tmp_path, name, 50_000)
    seen: list[tuple[str, int]] = []
    with _transport(connections, kind) as t:
        t.on_commit = lambda: seen.append(("commit", len(_in_keys(sandbox, name))))
        result = t.upload(path, name)
    assert t.reports_commit
    assert seen == [("commit", 0)]  # exactly once, and nothing named `name` existed yet
    assert result.sent_sha256 == sha
    up = wait_for(lambda: _arrived(sandbox, name), what=f"{name} at the sandbox")
    assert len(up) == 1 and up[0].sha256 == sha


def test_on_commit_refusal_sends_nothing(connections, sandbox, kind, tmp_path, clean_faults):
    class Fenced(Exception):
        pass

    name = f"CONF_{kind}_fenced.csv"
    path, _ = _file(tmp_path, name, 5_000)

    def refuse() -> None:
        raise Fenced("the journal refused a stale writer")

    with _transport(connections, kind) as t:
        t.on_commit = refuse
        with pytest.raises(Fenced):
            t.upload(path, name)
    time.sleep(1.0)  # the sandbox's processor would have taken it by now
    assert _arrived(sandbox, name) == [] and _in_keys(sandbox, name) == []


def test_refused_before_anything_is_retried_and_arrives_once(connections, sandbox, kind, tmp_path, clean_faults):
    name = f"CONF_{kind}_refused.csv"
    path, sha = _file(tmp_path, name, 40_000)
    fault, kw = REFUSAL[kind]
    commits: list[int] = []
    with _transport(connections, kind) as t:
        if kind == "s3":
            t.find_uploaded("warm-up.csv")  # credentials in hand, so the next request is the one refused
        sandbox.inject_fault(fault, **kw)
        t.on_commit = lambda: commits.append(1)
        t.upload(path, name)
    assert commits  # every committing request had its on_commit
    up = wait_for(lambda: _arrived(sandbox, name), what=f"{name} at the sandbox")
    time.sleep(1.0)
    assert len(_arrived(sandbox, name)) == 1 and up[0].sha256 == sha


@pytest.mark.parametrize("lost", ["status", "drop"])
def test_answer_lost_after_the_commit_is_unconfirmed_and_never_resent(connections, sandbox, kind, tmp_path,
                                                                       clean_faults, lost):
    if kind == "sftp" and lost == "status":
        pytest.skip("SFTP has no status to lose after a rename, only the session")
    name = f"CONF_{kind}_lost_{lost}.csv"
    path, sha = _file(tmp_path, name, 60_000)
    commits: list[int] = []
    with _transport(connections, kind) as t:
        t.on_commit = lambda: commits.append(1)
        sandbox.inject_fault(lost, after=True, **COMMIT_POINT[kind])
        with pytest.raises(UploadUnconfirmed) as ei:
            t.upload(path, name)
    if kind == "rest":
        assert ei.value.tracking_id  # the ticket the reconciler asks tracking about
    assert commits == [1]
    up = wait_for(lambda: _arrived(sandbox, name), what=f"{name} at the sandbox")
    time.sleep(1.5)  # a second send would have arrived by now
    assert len(_arrived(sandbox, name)) == 1 and up[0].sha256 == sha


def test_find_uploaded_is_evidence_or_none(connections, sandbox, kind, tmp_path, clean_faults):
    """A file still in in/ (fileX has not taken it yet): its size and a modification time after
    the upload began, or None where the credentials cannot read in/ (S3 transfer tokens).
    Never an error, never a look into in_arcv."""
    name = f"CONF_{kind}_evidence.csv"
    path, _ = _file(tmp_path, name, 7_000)
    sandbox.inject_fault("receive_lag", seconds=30)
    try:
        with _transport(connections, kind) as t:
            started = datetime.now(timezone.utc) - timedelta(seconds=2)
            t.upload(path, name)
            found = t.find_uploaded(name)
            missing = t.find_uploaded(f"CONF_{kind}_never_sent.csv")
    finally:
        sandbox.clear_faults()
    assert missing is None
    if kind == "s3":
        assert found is None  # fileX's transfer tokens may write in/ but not read it: cannot know
    elif kind == "rest":
        assert found is None  # REST uploads are found through their tracking id
    else:
        assert found is not None and found.size == 7_000 and found.modified is not None
        assert found.modified >= started.replace(microsecond=0)
