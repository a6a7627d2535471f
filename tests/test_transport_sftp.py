"""SftpTransport against the sandbox SFTP server (paramiko) backed by a real moto S3 endpoint."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path
from typing import Any, Iterator

import boto3
import paramiko
import pytest
from moto.server import ThreadedMotoServer

from filex_agent.errors import AuthError, NotEntitledError, PermanentError, TransientError
from filex_agent.sandbox.sftp_server import SandboxSftpServer
from filex_agent.transports import TRANSPORTS
from filex_agent.transports.sftp import SftpSession, SftpTransport, fingerprint, list_profiles


class StandInSandbox:
    """The attributes of filex_agent.sandbox.Sandbox that the SFTP server uses."""

    bucket = "filex-sandbox"
    entitlements = {"0001": ["app1", "app2"], "0002": ["app1"]}
    sftp_username = "sandbox-prime"
    sftp_password = "s3cret-Passw0rd"

    def __init__(self, endpoint: str, data_dir: Path):
        self.endpoint = endpoint
        self.data_dir = data_dir

    def s3_client(self) -> Any:
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )

    def take_faults(self, path: str, target: str = "api", method: str = "GET",
                    operation: str | None = None) -> list[Any]:
        return []  # no faults armed here; the real Sandbox's faults are tested in test_sandbox_sftp.py

    def record_arrival(self, key: str, operation: str) -> None:
        pass


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandInSandbox]:
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    sb = StandInSandbox(f"http://{host}:{port}", tmp_path_factory.mktemp("sandbox"))
    s3 = sb.s3_client()
    s3.create_bucket(Bucket=sb.bucket)
    s3.put_object(Bucket=sb.bucket, Key="0001/app1/out/feedback_1.csv", Body=b"id,status\n1,ACCEPTED\n")
    s3.put_object(Bucket=sb.bucket, Key="0001/app1/out/big.bin", Body=os.urandom(3 * 1024 * 1024 + 17))
    s3.put_object(Bucket=sb.bucket, Key="0002/app1/out/obo.txt", Body=b"obo feedback")
    server = SandboxSftpServer(sb)
    server.start()
    sb.sftp = server  # type: ignore[attr-defined]
    yield sb
    server.stop()
    moto.stop()


@pytest.fixture()
def session(sandbox: Any) -> Iterator[SftpSession]:
    s = SftpSession(
        sandbox.sftp.host, sandbox.sftp.port, sandbox.sftp_username, password=sandbox.sftp_password,
        host_key_fingerprints=[sandbox.sftp.host_key_fingerprint], backoff_seconds=0.05,
    )
    yield s
    s.close()


def _file(tmp_path: Path, name: str, size: int) -> Path:
    p = tmp_path / name
    p.write_bytes(os.urandom(size))
    return p


def test_registered() -> None:
    assert TRANSPORTS["sftp"] is SftpTransport


def test_upload_lands_in_bucket_with_remote_size(sandbox: Any, session: SftpSession, tmp_path: Path) -> None:
    local = _file(tmp_path, "report_1.csv", 1024 * 1024 + 3)
    t = SftpTransport("0001", "app1", session=session)
    seen: list[int] = []
    r = t.upload(local, "report_1.csv", progress=seen.append)
    assert r.size == local.stat().st_size and r.detail["remote_size"] == str(r.size)
    assert r.upload_location == "0001/app1/in" and r.tracking_id is None
    assert sum(seen) == r.size
    obj = sandbox.s3_client().get_object(Bucket=sandbox.bucket, Key="0001/app1/in/report_1.csv")
    assert hashlib.sha256(obj["Body"].read()).digest() == hashlib.sha256(local.read_bytes()).digest()
    assert obj["Metadata"] == {"filex-transport": "sftp"}
    found = t.find_uploaded("report_1.csv")
    assert found is not None and found.size == r.size
    assert t.find_uploaded("never_sent.csv") is None
    assert session.negotiated["cipher"] == "aes128-gcm@openssh.com"


def test_feedback_list_and_download(session: SftpSession) -> None:
    t = SftpTransport("0001", "app1", session=session)
    files = {f.name: f for f in t.list_feedback()}
    assert set(files) >= {"feedback_1.csv", "big.bin"}
    assert files["big.bin"].size == 3 * 1024 * 1024 + 17 and files["big.bin"].modified is not None
    buf = io.BytesIO()
    assert t.download_feedback("feedback_1.csv", buf) == len(b"id,status\n1,ACCEPTED\n")
    assert buf.getvalue() == b"id,status\n1,ACCEPTED\n"
    big = io.BytesIO()
    assert t.download_feedback("big.bin", big) == 3 * 1024 * 1024 + 17
    with pytest.raises(PermanentError, match="no such file"):
        t.download_feedback("missing.csv", io.BytesIO())


def test_obo_org_shares_the_connection(sandbox: Any, session: SftpSession, tmp_path: Path) -> None:
    prime = SftpTransport("0001", "app2", session=session)
    obo = SftpTransport("0002", "app1", session=session)
    assert prime.list_feedback() == []
    assert [f.name for f in obo.list_feedback()] == ["obo.txt"]
    obo.upload(_file(tmp_path, "obo_1.txt", 10), "obo_1.txt")
    keys = [o["Key"] for o in sandbox.s3_client().list_objects_v2(Bucket=sandbox.bucket, Prefix="0002/")["Contents"]]
    assert "0002/app1/in/obo_1.txt" in keys
    assert session.connects == 1


def test_not_entitled_org_lists_visible_orgs(session: SftpSession, tmp_path: Path) -> None:
    t = SftpTransport("0003", "app1", session=session)
    with pytest.raises(NotEntitledError) as ei:
        t.upload(_file(tmp_path, "x.csv", 5), "x.csv")
    assert "0003" in str(ei.value) and "0001, 0002" in str(ei.value)
    with pytest.raises(NotEntitledError, match="applications: app1$"):
        SftpTransport("0002", "app2", session=session).list_feedback()


def test_list_profiles(session: SftpSession) -> None:
    assert list_profiles(session) == {"0001": ["app1", "app2"], "0002": ["app1"]}


def test_writes_outside_in_are_denied(session: SftpSession, tmp_path: Path) -> None:
    t = SftpTransport("0001", "app1", session=session, in_path="/{org}/{app}/out")
    with pytest.raises(NotEntitledError, match="permission denied"):
        t.upload(_file(tmp_path, "y.csv", 5), "y.csv")


def test_bad_names_refused_before_network(session: SftpSession, tmp_path: Path) -> None:
    t = SftpTransport("0001", "app1", session=session)
    with pytest.raises(PermanentError, match="'#'"):
        t.upload(_file(tmp_path, "a.csv", 1), "a#b.csv")


def test_wrong_password_and_unknown_host_key(sandbox: Any) -> None:
    bad = SftpSession(sandbox.sftp.host, sandbox.sftp.port, sandbox.sftp_username, password="nope",
                      host_key_fingerprints=[sandbox.sftp.host_key_fingerprint], max_attempts=1)
    with pytest.raises(AuthError) as ei:
        list_profiles(bad)
    assert "nope" not in str(ei.value) and "nope" not in repr(bad)
    unknown = SftpSession(sandbox.sftp.host, sandbox.sftp.port, sandbox.sftp_username, password=sandbox.sftp_password)
    with pytest.raises(PermanentError) as ei2:
        list_profiles(unknown)
    assert sandbox.sftp.host_key_fingerprint in str(ei2.value) and "host_key_fingerprints" in str(ei2.value)
    # The known_hosts file written by the server is accepted as is.
    kh = SftpSession(sandbox.sftp.host, sandbox.sftp.port, sandbox.sftp_username, password=sandbox.sftp_password,
                     known_hosts=sandbox.sftp.host_key_path)
    assert "0001" in list_profiles(kh)
    kh.close()


def test_public_key_login(sandbox: Any, tmp_path: Path) -> None:
    key = paramiko.ECDSAKey.generate()
    key.write_private_key_file(str(tmp_path / "id_ecdsa"), password="pp")
    sandbox.sftp.authorized_keys.append(f"{key.get_name()} {key.get_base64()}")
    s = SftpSession(sandbox.sftp.host, sandbox.sftp.port, sandbox.sftp_username, private_key=tmp_path / "id_ecdsa",
                    key_passphrase="pp", host_key_fingerprints=[sandbox.sftp.host_key_fingerprint])
    assert list_profiles(s)["0002"] == ["app1"]
    s.close()
    assert fingerprint(key).startswith("SHA256:")


def test_drop_mid_upload_is_retried_without_half_file(sandbox: Any, session: SftpSession, tmp_path: Path) -> None:
    local = _file(tmp_path, "drop_1.bin", 8 * 1024 * 1024)
    t = SftpTransport("0001", "app1", session=session)
    sent = [0]
    dropped = threading.Event()

    def progress(n: int) -> None:
        sent[0] += n
        if sent[0] > 2 * 1024 * 1024 and not dropped.is_set():
            dropped.set()
            assert sandbox.sftp.drop_connections() >= 1

    r = t.upload(local, "drop_1.bin", progress=progress)
    assert dropped.is_set() and session.connects == 2 and r.detail.get("reconnected") == "yes"
    obj = sandbox.s3_client().get_object(Bucket=sandbox.bucket, Key="0001/app1/in/drop_1.bin")
    assert obj["Body"].read() == local.read_bytes()


def test_concurrent_uploads_share_one_connection(sandbox: Any, session: SftpSession, tmp_path: Path) -> None:
    files = [_file(tmp_path, f"c_{i}.bin", 200_000 + i) for i in range(6)]
    errors: list[BaseException] = []

    def up(p: Path) -> None:
        try:
            SftpTransport("0001", "app2", session=session).upload(p, p.name)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=up, args=(p,)) for p in files]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors
    assert session.connects == 1
    s3 = sandbox.s3_client()
    for p in files:
        assert s3.head_object(Bucket=sandbox.bucket, Key=f"0001/app2/in/{p.name}")["ContentLength"] == p.stat().st_size


def test_falls_back_to_small_writes_when_server_refuses_big_ones(sandbox: Any, session: SftpSession, tmp_path: Path) -> None:
    local = _file(tmp_path, "limits_1.bin", 1024 * 1024 + 1)
    sandbox.sftp.max_write = 40 * 1024
    try:
        assert session.write_size() > 40 * 1024
        SftpTransport("0001", "app1", session=session).upload(local, "limits_1.bin")
    finally:
        sandbox.sftp.max_write = None
    assert session.write_size() == 32 * 1024
    obj = sandbox.s3_client().get_object(Bucket=sandbox.bucket, Key="0001/app1/in/limits_1.bin")
    assert obj["Body"].read() == local.read_bytes()


def test_refused_writes_fail_loudly_and_leave_nothing(sandbox: Any, session: SftpSession, tmp_path: Path) -> None:
    # A server that refuses even 32 KiB writes: the upload must fail, never "succeed" with holes.
    local = _file(tmp_path, "refused_1.bin", 300_000)
    sandbox.sftp.max_write = 16 * 1024
    try:
        with pytest.raises(TransientError, match="server error"):
            SftpTransport("0001", "app1", session=session).upload(local, "refused_1.bin")
    finally:
        sandbox.sftp.max_write = None
    for prefix in ("0001/app1/in/refused_1", "0001/app1/in/.refused_1"):  # nor its temporary name
        listed = sandbox.s3_client().list_objects_v2(Bucket=sandbox.bucket, Prefix=prefix)
        assert listed.get("KeyCount", 0) == 0, prefix


def test_stale_temporary_files_are_swept_without_listing_in_before_every_upload(
        sandbox: Any, session: SftpSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import filex_agent.transports.sftp as sftp_mod

    def plant(sftp: paramiko.SFTPClient) -> None:
        with sftp.open("/0001/app2/in/.crashed.csv.0badc0de.filepart", "wb") as f:
            f.write(b"half a file")

    session.run(plant, "plant a crash's leftover")
    monkeypatch.setattr(sftp_mod, "TEMP_STALE_SECONDS", -1)  # anything not being written counts as stale
    listings: list[str] = []
    real = paramiko.SFTPClient.listdir_attr
    monkeypatch.setattr(paramiko.SFTPClient, "listdir_attr",
                        lambda self, path=".": (listings.append(path), real(self, path))[1])
    t = SftpTransport("0001", "app2", session=session)
    for i in range(3):
        p = _file(tmp_path, f"sweep_{i}.csv", 100 + i)
        t.upload(p, p.name)
    # in/ listed once for the three uploads (not once each: it may hold thousands of files).
    assert listings == ["/0001/app2/in"]
    names = session.run(lambda sftp: sftp.listdir("/0001/app2/in"), "list")
    assert ".crashed.csv.0badc0de.filepart" not in names
    assert {f"sweep_{i}.csv" for i in range(3)} <= set(names)
