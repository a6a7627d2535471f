"""`filex-agent doctor` against the sandbox: every check passes, or fails with a fix."""

from __future__ import annotations

from pathlib import Path

from filex_agent.cli import main
from filex_agent.sandbox.agent_config import write_sandbox_config


def _config(sandbox, tmp_path: Path, extra: str = "") -> Path:
    path = write_sandbox_config(sandbox, tmp_path / "agent", transports=("rest", "s3"))
    if extra:
        path.write_text(path.read_text() + extra)
    return path


def _run(capsys, path: Path) -> tuple[int, list[str]]:
    rc = main(["doctor", "--config", str(path)])
    return rc, capsys.readouterr().out.splitlines()


def test_all_ok(sandbox, tmp_path, capsys):
    rc, lines = _run(capsys, _config(sandbox, tmp_path))
    checks = [line for line in lines if line.startswith(("OK", "FAIL"))]
    assert rc == 0, "\n".join(lines)
    assert checks and all(line.startswith("OK ") for line in checks)
    text = "\n".join(lines)
    assert "FIP token" in text and "application app1 present" in text and "'in' is writable" in text
    assert "route s3-0001-app2 S3 transfer tokens: STS credentials for bucket" in text
    assert "OK    expectation daily-demo: 'daily-*' on rest-0001-app1, next due " in text
    assert sandbox.client_secret not in text


def test_expectation_the_route_would_never_take(sandbox, tmp_path, capsys):
    path = _config(sandbox, tmp_path)
    path.write_text(path.read_text().replace('pattern = "daily-*"', 'pattern = "daily-*.tmp"'))
    rc, lines = _run(capsys, path)
    assert rc == 1
    bad = [line for line in lines if line.startswith("FAIL  expectation daily-demo")]
    assert bad and "could never be met" in bad[0] and "include/ignore" in bad[0]


def test_wrong_client_secret_fails_with_a_fix(sandbox, tmp_path, capsys):
    path = _config(sandbox, tmp_path)
    (tmp_path / "agent" / "secrets" / "fip-client-secret").write_text("not-the-secret")
    rc, lines = _run(capsys, path)
    assert rc == 1
    token = next(line for line in lines if "FIP token" in line)
    assert token.startswith("FAIL") and "refused" in token
    assert "fix: check the client secret in file:" in token
    # Routes are not probed with a credential that has no token, and say why.
    assert any(line.startswith("FAIL  route rest-0001-app1") and "no token" in line for line in lines)


def test_org_not_entitled_is_named(sandbox, tmp_path, capsys):
    extra = (f'\n[[routes]]\nname = "org3"\noutbox = "{tmp_path / "out3"}"\norg = "0003"\n'
             'application = "app1"\ncredential = "sandbox"\n')
    rc, lines = _run(capsys, _config(sandbox, tmp_path, extra))
    assert rc == 1
    fails = [line for line in lines if line.startswith("FAIL")]
    assert len(fails) == 1, "\n".join(lines)
    assert "route org3" in fails[0] and "0003" in fails[0] and "not entitled" in fails[0]
    assert "fix: ask your firm's Super Account Administrator" in fails[0]
    # The entitled routes still pass.
    assert any(line.startswith("OK    route rest-0001-app1 in") for line in lines)


def test_unknown_application_and_bad_config(sandbox, tmp_path, capsys):
    extra = (f'\n[[routes]]\nname = "typo"\noutbox = "{tmp_path / "out4"}"\norg = "0001"\n'
             'application = "App1"\ncredential = "sandbox"\n')
    rc, lines = _run(capsys, _config(sandbox, tmp_path, extra))
    assert rc == 1
    fail = next(line for line in lines if line.startswith("FAIL"))
    assert "no application 'App1'" in fail and "app1" in fail and "case sensitive" in fail

    bad = tmp_path / "bad.toml"
    bad.write_text('[agent]\ndata_dir = "x"\n[[routes]]\nname = "r"\noutbox = "o"\norg = 1\n'
                   'application = "a"\ncredential = "c"\n')
    rc, lines = _run(capsys, bad)
    assert rc == 1 and lines[0].startswith("FAIL  config") and "routes[0].org" in lines[0] and "fix:" in lines[0]


def test_missing_secret_file(sandbox, tmp_path, capsys):
    path = _config(sandbox, tmp_path)
    (tmp_path / "agent" / "secrets" / "fip-client-secret").unlink()
    rc, lines = _run(capsys, path)
    assert rc == 1
    line = next(line for line in lines if line.startswith("FAIL  credentials.sandbox.client_secret"))
    assert "cannot read secret file" in line and "fix: create" in line


def test_sftp_route_login_host_key_and_org(sandbox, tmp_path, capsys):
    import re

    import pytest

    from tests.conftest import sftp_supported

    if not sftp_supported() or sandbox.sftp is None:
        pytest.skip("SFTP transport not in this build")
    path = write_sandbox_config(sandbox, tmp_path / "agent")
    rc, lines = _run(capsys, path)
    assert rc == 0, "\n".join(lines)
    login = next(line for line in lines if "SFTP login" in line)
    assert login.startswith("OK") and "host key verified" in login and "cipher" in login
    assert any(line.startswith("OK") and "/0002/app1 visible" in line for line in lines)

    # A server key that does not match the pinned fingerprint: FAIL, with how to pin the right one.
    path.write_text(re.sub(r"host_key_fingerprints = \[.*\]",
                           'host_key_fingerprints = ["SHA256:' + "A" * 43 + '"]', path.read_text()))
    rc, lines = _run(capsys, path)
    assert rc == 1
    fail = next(line for line in lines if line.startswith("FAIL"))
    assert "host key" in fail and "fix: verify the server's key with FINRA" in fail
    assert sandbox.sftp_password not in "\n".join(lines)
