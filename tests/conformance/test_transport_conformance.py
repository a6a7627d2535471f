"""One conformance suite, run against every transport (rclone's fstests idea).

A new transport is proven by adding its kind to KINDS: the same tests, against the sandbox.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from filex_agent.connections import Connections
from filex_agent.errors import NotEntitledError, PermanentError
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
