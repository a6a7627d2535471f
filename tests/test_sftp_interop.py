"""SftpTransport against a real OpenSSH sshd (internal-sftp) restricted to fileX's algorithms."""

from __future__ import annotations

import hashlib
import io
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import paramiko
import pytest

from filex_agent.errors import AuthError, PermanentError, TransientError, UploadUnconfirmed
from filex_agent.transports.sftp import SftpSession, SftpTransport, list_profiles
from tests.sshd_fixture import PasswordUser, Sshd, keygen, skip_reason

pytestmark = [pytest.mark.sshd, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


@pytest.fixture(scope="module")
def sshd() -> Iterator[Sshd]:
    s = Sshd()
    s.make_layout({"0001": ["app1"]})
    (s.root / "0001/app1/out/ack_1.csv").write_bytes(b"ok\n")
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keys(sshd: Sshd, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    out = {
        "ed25519": keygen(d / "id_ed25519"),
        "ecdsa": keygen(d / "id_ecdsa", "ecdsa", passphrase="ecdsa pass"),
        "rsa": keygen(d / "id_rsa", "rsa", passphrase="rsa pass"),
    }
    for k in out.values():
        sshd.authorize(k.with_suffix(".pub"))
    return out


PASSPHRASES = {"ed25519": None, "ecdsa": "ecdsa pass", "rsa": "rsa pass"}


def _session(sshd: Sshd, key: Path, passphrase: str | None = None, **kw: object) -> SftpSession:
    kw.setdefault("host_key_fingerprints", [sshd.host_key_fingerprint])
    kw.setdefault("backoff_seconds", 0.05)
    return SftpSession(sshd.host, sshd.port, sshd.login_user, private_key=key, key_passphrase=passphrase, **kw)  # type: ignore[arg-type]


def _transport(sshd: Sshd, session: SftpSession) -> SftpTransport:
    return SftpTransport("0001", "app1", session=session, in_path=f"{sshd.root}/{{org}}/{{app}}/in",
                         out_path=f"{sshd.root}/{{org}}/{{app}}/out", arcv_path=f"{sshd.root}/{{org}}/{{app}}/in_arcv")


@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa"])
def test_key_login_upload_and_feedback(sshd: Sshd, keys: dict[str, Path], kind: str, tmp_path: Path) -> None:
    with _session(sshd, keys[kind], PASSPHRASES[kind]) as s:
        t = _transport(sshd, s)
        local = tmp_path / f"k_{kind}.csv"
        local.write_bytes(os.urandom(300_001))
        r = t.upload(local, local.name)
        assert (sshd.root / "0001/app1/in" / local.name).read_bytes() == local.read_bytes()
        assert r.detail["remote_size"] == "300001"
        assert [f.name for f in t.list_feedback()] == ["ack_1.csv"]
        buf = io.BytesIO()
        assert t.download_feedback("ack_1.csv", buf) == 3 and buf.getvalue() == b"ok\n"
        assert list_profiles(s, root=str(sshd.root)) == {"0001": ["app1"]}
        assert s.negotiated["cipher"] == "aes128-gcm@openssh.com"
        # OpenSSH answers limits@openssh.com; big write requests stay within it.
        assert s._server_max_write is not None and 32 * 1024 < s.write_size() <= s._server_max_write


def test_known_hosts_file_accepted(sshd: Sshd, keys: dict[str, Path]) -> None:
    with _session(sshd, keys["ed25519"], host_key_fingerprints=[], known_hosts=sshd.known_hosts) as s:
        assert _transport(sshd, s).find_uploaded("nothing.csv") is None


def test_wrong_passphrase_is_an_auth_error(sshd: Sshd, keys: dict[str, Path]) -> None:
    with _session(sshd, keys["rsa"], "Zq9-not-it") as s, pytest.raises(AuthError) as ei:
        list_profiles(s, root=str(sshd.root))
    assert "Zq9-not-it" not in str(ei.value) and "passphrase" in str(ei.value)


def test_password_login(sshd: Sshd, tmp_path: Path) -> None:
    reason = PasswordUser.unavailable()
    if reason:
        pytest.skip(reason)
    pw_sshd = Sshd(password_auth=True)
    try:
        pw_sshd.make_layout({"0001": ["app1"]})
        with PasswordUser() as user:
            user.chown(pw_sshd.root)
            pw_sshd.start()
            with SftpSession(pw_sshd.host, pw_sshd.port, user.name, password=user.password,
                             known_hosts=pw_sshd.known_hosts) as s:
                local = tmp_path / "pw.csv"
                local.write_bytes(b"a,b\n1,2\n")
                _transport(pw_sshd, s).upload(local, "pw.csv")
                assert (pw_sshd.root / "0001/app1/in/pw.csv").read_bytes() == b"a,b\n1,2\n"
            with SftpSession(pw_sshd.host, pw_sshd.port, user.name, password="not-" + user.password,
                             known_hosts=pw_sshd.known_hosts, max_attempts=1) as bad, pytest.raises(AuthError) as ei:
                list_profiles(bad, root=str(pw_sshd.root))
            assert user.password not in str(ei.value)
            pw_sshd.stop()
    finally:
        pw_sshd.stop()


def test_wrong_host_key_refused_with_fingerprint(sshd: Sshd, keys: dict[str, Path], tmp_path: Path) -> None:
    other = keygen(tmp_path / "other_host")
    from tests.sshd_fixture import key_fingerprint

    with _session(sshd, keys["ed25519"], host_key_fingerprints=[key_fingerprint(other.with_suffix(".pub"))]) as s:
        with pytest.raises(PermanentError) as ei:
            list_profiles(s, root=str(sshd.root))
    msg = str(ei.value)
    assert sshd.host_key_fingerprint in msg and "host_key_fingerprints" in msg and "mismatch" in msg
    # A changed key in known_hosts is refused even with auto-accept on.
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[{sshd.host}]:{sshd.port} " + other.with_suffix(".pub").read_text().rsplit(" ", 1)[0] + "\n")
    with _session(sshd, keys["ed25519"], host_key_fingerprints=[], known_hosts=kh, auto_accept_host_key=True) as s:
        with pytest.raises(PermanentError, match="CHANGED") as ei2:
            list_profiles(s, root=str(sshd.root))
    assert sshd.host_key_fingerprint in str(ei2.value)
    # Nothing pinned, nothing known: refused, and told what to pin.
    with _session(sshd, keys["ed25519"], host_key_fingerprints=[]) as s:
        with pytest.raises(PermanentError, match="unknown host key") as ei3:
            list_profiles(s, root=str(sshd.root))
    assert f'host_key_fingerprints = ["{sshd.host_key_fingerprint}"]' in str(ei3.value)


@pytest.mark.parametrize("cipher", ["aes128-cbc", "chacha20-poly1305@openssh.com"])
def test_cipher_outside_filex_list_refused(keys: dict[str, Path], cipher: str) -> None:
    odd = Sshd(ciphers=[cipher])
    try:
        odd.authorize(keys["ed25519"].with_suffix(".pub"))
        odd.start()
        with _session(odd, keys["ed25519"], host_key_fingerprints=[odd.host_key_fingerprint]) as s:
            with pytest.raises(PermanentError) as ei:
                list_profiles(s, root="/")
        msg = str(ei.value)
        assert f"server offered {cipher}" in msg and "we allow aes128-gcm@openssh.com" in msg and "ciphers" in msg
    finally:
        odd.stop()


def test_drop_mid_upload_recovers_without_partial_or_duplicate(
    sshd: Sshd, keys: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    local = tmp_path / "big_1.bin"
    local.write_bytes(os.urandom(48 * 1024 * 1024))
    in_dir = sshd.root / "0001/app1/in"
    before = set(os.listdir(in_dir))
    killed: list[int] = []
    partial_seen: list[int] = []
    named_seen: list[bool] = []
    sent = [0]
    commits: list[int] = []

    def progress(n: int) -> None:
        sent[0] += n
        if sent[0] >= 8 * 1024 * 1024 and not killed:
            killed.append(sshd.kill_sessions())
            # The server wrote part of the temp file before it died: that is the half file to clean up.
            (temp,) = in_dir.glob(f".{local.name}.*.filepart")  # this upload's own temporary name
            partial_seen.append(temp.stat().st_size)
            named_seen.append((in_dir / local.name).exists())

    with _session(sshd, keys["ed25519"]) as s:
        t = _transport(sshd, s)
        t.on_commit = lambda: commits.append(sent[0])
        r = t.upload(local, local.name, progress=progress)
        assert s.connects == 2
    assert killed and killed[0] >= 1
    assert 0 < partial_seen[0] < local.stat().st_size
    assert named_seen == [False]  # the half file never had the name fileX files
    # Once, after every byte of the retry was acknowledged (the cut-off attempt committed nothing).
    assert len(commits) == 1 and commits[0] >= local.stat().st_size + 8 * 1024 * 1024
    assert r.detail.get("reconnected") == "yes"
    assert set(os.listdir(in_dir)) - before == {local.name}
    assert (in_dir / local.name).read_bytes() == local.read_bytes()
    # The half file was removed before the retry, not merely overwritten by it.
    assert any("left by an earlier failed upload" in r.getMessage() for r in caplog.records)


def test_gave_up_mid_upload_leaves_no_filing_and_the_temp_goes_at_the_next_upload(
    sshd: Sshd, keys: dict[str, Path], tmp_path: Path
) -> None:
    local = tmp_path / "half_1.bin"
    local.write_bytes(os.urandom(24 * 1024 * 1024))
    in_dir = sshd.root / "0001/app1/in"
    def half():  # the killed upload's own temporary file
        return next(in_dir.glob(f".{local.name}.*.filepart"), None)

    sent = [0]
    commits: list[str] = []

    def progress(n: int) -> None:
        sent[0] += n
        if sent[0] >= 4 * 1024 * 1024 and sent[0] - n < 4 * 1024 * 1024:
            sshd.kill()  # the server is gone: no reconnect, no cleanup possible now

    try:
        with _session(sshd, keys["ed25519"], max_attempts=2, connect_timeout=2) as s:
            t = _transport(sshd, s)
            t.on_commit = lambda: commits.append("commit")
            with pytest.raises(TransientError) as ei:
                t.upload(local, local.name, progress=progress)
            assert not isinstance(ei.value, UploadUnconfirmed) and commits == []  # nothing was committed
            assert half() is not None and half().stat().st_size < local.stat().st_size
            assert not (in_dir / local.name).exists()  # a killed upload is never a (truncated) filing
            sshd.start()
            t.upload(local, local.name)  # the next upload of that name removes the temp first
            assert half() is None and commits == ["commit"]
            assert (in_dir / local.name).read_bytes() == local.read_bytes()
    finally:
        if sshd.proc is None:
            sshd.start()


def test_commit_comes_after_the_whole_temp_file_and_before_the_rename(
        sshd: Sshd, keys: dict[str, Path], tmp_path: Path) -> None:
    local = tmp_path / "order_1.csv"
    local.write_bytes(os.urandom(700_001))
    in_dir = sshd.root / "0001/app1/in"
    seen: list[tuple[int, bool]] = []
    with _session(sshd, keys["ed25519"]) as s:
        t = _transport(sshd, s)
        t.on_commit = lambda: seen.append((next(in_dir.glob(f".{local.name}.*.filepart")).stat().st_size,
                                           (in_dir / local.name).exists()))
        r = t.upload(local, local.name)
    assert seen == [(700_001, False)]
    assert (in_dir / local.name).read_bytes() == local.read_bytes()
    assert not list(in_dir.glob(f".{local.name}.*.filepart"))
    assert r.sent_sha256 == hashlib.sha256(local.read_bytes()).hexdigest()


def test_rename_never_replaces_an_earlier_filing(sshd: Sshd, keys: dict[str, Path], tmp_path: Path) -> None:
    in_dir = sshd.root / "0001/app1/in"
    (in_dir / "dup_1.csv").write_bytes(b"the earlier filing\n")
    local = tmp_path / "dup_1.csv"
    local.write_bytes(b"a later file of the same name\n")
    with _session(sshd, keys["ed25519"]) as s:
        t = _transport(sshd, s)
        with pytest.raises(TransientError, match="earlier .* still waiting") as ei:
            t.upload(local, "dup_1.csv")
        assert not isinstance(ei.value, UploadUnconfirmed)
        # OpenSSH's own answer to a plain SSH_FXP_RENAME onto an existing file (link() + unlink()):
        # refused, even when the client skips the check the transport makes first.
        with s.channel() as sftp:
            with sftp.open(f"{in_dir}/.probe", "wb") as f:
                f.write(b"x")
            with pytest.raises(OSError):
                sftp.rename(f"{in_dir}/.probe", f"{in_dir}/dup_1.csv")
            sftp.remove(f"{in_dir}/.probe")
        # And through the transport's own rename path (the earlier file appears after the check).
        real_stat = sftp.__class__.stat
        armed = [True]

        def appears_late(self, path):  # type: ignore[no-untyped-def]
            if armed[0] and path.endswith("/in/late_1.csv"):
                armed[0] = False
                (in_dir / "late_1.csv").write_bytes(b"filed meanwhile\n")
                raise FileNotFoundError(2, "No such file")
            return real_stat(self, path)

        late = tmp_path / "late_1.csv"
        late.write_bytes(b"mine\n")
        sftp.__class__.stat = appears_late
        try:
            with pytest.raises(TransientError, match="rename was refused"):
                t.upload(late, "late_1.csv")
        finally:
            sftp.__class__.stat = real_stat
    assert (in_dir / "dup_1.csv").read_bytes() == b"the earlier filing\n"
    assert (in_dir / "late_1.csv").read_bytes() == b"filed meanwhile\n"
    assert not list(in_dir.glob(".dup_1.csv.*.filepart")) and not list(in_dir.glob(".late_1.csv.*.filepart"))


def test_session_killed_after_the_rename_is_unconfirmed_and_not_resent(
        sshd: Sshd, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    in_dir = sshd.root / "0001/app1/in"
    local = tmp_path / "renamed_1.csv"
    local.write_bytes(os.urandom(300_000))
    real_rename = paramiko.SFTPClient.rename
    renames: list[str] = []

    def rename_then_killed(self, oldpath, newpath):  # type: ignore[no-untyped-def]
        renames.append(newpath)
        real_rename(self, oldpath, newpath)  # the server did it...
        sshd.kill_sessions()  # ...and the session died before its answer was used
        raise EOFError("Server connection dropped")

    monkeypatch.setattr(paramiko.SFTPClient, "rename", rename_then_killed)
    commits: list[str] = []
    with _session(sshd, keys["ed25519"]) as s:
        t = _transport(sshd, s)
        t.on_commit = lambda: commits.append("commit")
        with pytest.raises(UploadUnconfirmed):
            t.upload(local, local.name)
        assert s.connects == 1  # not reconnected to send it again
    assert renames == [f"{in_dir}/{local.name}"] and commits == ["commit"]
    assert (in_dir / local.name).read_bytes() == local.read_bytes()


def test_find_uploaded_gives_the_remote_modification_time(sshd: Sshd, keys: dict[str, Path], tmp_path: Path) -> None:
    local = tmp_path / "when_1.csv"
    local.write_bytes(b"x" * 1000)
    with _session(sshd, keys["ed25519"]) as s:
        t = _transport(sshd, s)
        t.upload(local, local.name)
        os.utime(sshd.root / "0001/app1/in" / local.name, (1_700_000_000, 1_700_000_000))
        found = t.find_uploaded(local.name)
        assert found is not None and found.size == 1000
        assert found.modified == datetime.fromtimestamp(1_700_000_000, timezone.utc)
        assert t.find_uploaded("absent_1.csv") is None
        # Never looks in in_arcv: a file archived there is not "in in/".
        (sshd.root / "0001/app1/in_arcv").mkdir(exist_ok=True)
        (sshd.root / "0001/app1/in_arcv/archived_1.csv").write_bytes(b"y")
        assert t.find_uploaded("archived_1.csv") is None


def test_two_writers_of_one_name_never_share_a_temporary_file(
        sshd: Sshd, keys: dict[str, Path], tmp_path: Path) -> None:
    """A worker paused past its lease and its successor (or two files of one name) upload the same
    name at once: each has its own temporary file, so neither removes nor renames the other's
    (with one shared name, the HA chaos test saw a rename fail on a vanished temp: FAILED)."""
    first, second = tmp_path / "twice_1.csv", tmp_path / "twice_1.csv.2"
    first.write_bytes(os.urandom(3 * 1024 * 1024))
    second.write_bytes(b"the second writer\n" * 1000)
    in_dir = sshd.root / "0001/app1/in"
    done: list[str] = []
    with _session(sshd, keys["ed25519"]) as s:
        a, b = _transport(sshd, s), _transport(sshd, s)

        def progress(n: int) -> None:
            if not done:  # the second writer runs to the end while the first is mid-file
                done.append("second")
                b.upload(second, "twice_1.csv")

        with pytest.raises(TransientError) as ei:
            a.upload(first, "twice_1.csv", progress=progress)
    assert done == ["second"]
    assert not isinstance(ei.value, UploadUnconfirmed) and "still waiting at fileX" in str(ei.value)
    assert (in_dir / "twice_1.csv").read_bytes() == second.read_bytes()  # the second's, whole
    assert not list(in_dir.glob(".twice_1.csv.*.filepart"))  # each removed its own
