"""The look-around commands against the sandbox: routes, ls, track, profiles, submit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import sftp_supported, wait_for

REPO = Path(__file__).parents[1]


@pytest.fixture
def cfg_path(sandbox, tmp_path):
    from filex_agent.sandbox.agent_config import write_sandbox_config

    return write_sandbox_config(sandbox, tmp_path / "agent", poll_seconds=0.5, stable_seconds=0.5)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "filex_agent", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_routes_json(cfg_path):
    p = cli("routes", "--config", str(cfg_path), "--json")
    assert p.returncode == 0, p.stderr
    routes = {r["name"]: r for r in json.loads(p.stdout)}
    assert routes["rest-0001-app1"]["org"] == "0001" and routes["rest-0001-app1"]["transport"] == "rest"
    assert routes["s3-0001-app2"]["transport"] == "s3"


def test_ls_walks_orgs_apps_and_subspaces(cfg_path):
    apps = json.loads(cli("ls", "0001", "--config", str(cfg_path), "--json").stdout)
    assert {"app1", "app2"} <= {a["name"] for a in apps}
    subs = {s["name"]: s for s in json.loads(cli("ls", "0001/app1", "--config", str(cfg_path), "--json").stdout)}
    assert set(subs) == {"in", "out", "in_arcv"} and subs["in"]["writable"] is True
    denied = cli("ls", "0003", "--config", str(cfg_path))
    assert denied.returncode == 1 and "0003" in denied.stderr


def test_submit_one_shot_then_track(cfg_path, sandbox, tmp_path):
    f = tmp_path / "ONESHOT_file.csv"
    f.write_bytes(b"one,shot\n")
    p = cli("submit", str(f), "--route", "rest-0001-app1", "--config", str(cfg_path))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["state"] == "SUBMITTED" and out["tracking_id"]
    assert f.read_bytes() == b"one,shot\n", "submit copies; the user's file stays"
    wait_for(lambda: [u for u in sandbox.uploads() if u.name == "ONESHOT_file.csv"], what="upload")

    def received():
        t = cli("track", out["tracking_id"], "--config", str(cfg_path), "--json")
        recs = json.loads(t.stdout or "[]")
        return recs and recs[0]["status"] == "Received by FINRA" and recs[0]
    rec = wait_for(received, what="tracking record")
    assert rec["fileName"] == "ONESHOT_file.csv" and rec["uploadLocation"] == "0001/app1/in"
    allrecs = json.loads(cli("track", "--config", str(cfg_path), "--json").stdout)
    assert out["tracking_id"] in {r["trackingId"] for r in allrecs}
    status = json.loads(cli("status", "--config", str(cfg_path), "--json").stdout)
    assert any(r["tracking_id"] == out["tracking_id"] for r in status)


@pytest.mark.skipif(not sftp_supported(), reason="SFTP transport not available")
def test_profiles_lists_obo_orgs(cfg_path):
    p = cli("profiles", "--config", str(cfg_path), "--json")
    assert p.returncode == 0, p.stderr
    orgs = {r["org"]: r["applications"] for r in json.loads(p.stdout)}
    assert "0001" in orgs and "0002" in orgs and "0003" not in orgs
    assert "app1" in orgs["0002"]
