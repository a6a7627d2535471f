"""The sandbox's SFTP endpoint against a real paramiko client: filings, temporary names, renames,
and sessions killed before or after an operation took effect."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from typing import Any

import paramiko
import pytest

from filex_agent.sandbox import Sandbox, UploadLogEntry
from tests.test_sandbox import running_sandbox, wait_for


@pytest.fixture(scope="module")
def sb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from running_sandbox(tmp_path_factory.mktemp("sandbox-sftp"), processing_delay=0.2, sftp=True)


@pytest.fixture(autouse=True)
def _reset(sb: Sandbox) -> Iterator[None]:
    yield
    sb.clear_faults()
    sb.receive_lag = 0


class Client:
    """One SSH connection with one SFTP channel, host key pinned."""

    def __init__(self, sb: Sandbox):
        sock = (sb.sftp.host, sb.sftp.port)
        self.transport = paramiko.Transport(sock)
        self.transport.connect(hostkey=sb.sftp.host_key, username=sb.sftp_username, password=sb.sftp_password)
        self.sftp = paramiko.SFTPClient.from_transport(self.transport)
        assert self.sftp is not None
        self.sftp.get_channel().settimeout(10)

    def close(self) -> None:
        self.transport.close()


@pytest.fixture()
def client(sb: Sandbox) -> Iterator[Client]:
    c = Client(sb)
    try:
        yield c
    finally:
        c.close()


@contextlib.contextmanager
def killed_session(sb: Sandbox) -> Iterator[Client]:
    """A fresh session whose requests inside the block must end in a killed session."""
    c = Client(sb)
    try:
        with pytest.raises((OSError, EOFError, paramiko.SSHException)):
            yield c
    finally:
        c.close()


def filings(sb: Sandbox, name: str) -> list[UploadLogEntry]:
    return [u for u in sb.uploads() if u.key == f"0001/app1/in/{name}"]


def in_keys(sb: Sandbox, prefix: str) -> list[str]:
    resp = sb.admin_s3.list_objects_v2(Bucket=sb.bucket, Prefix=f"0001/app1/in/{prefix}")
    return sorted(o["Key"] for o in resp.get("Contents", []))


def settle() -> None:
    time.sleep(0.8)  # several processor cycles (0.2 s each)


def put(c: Client, path: str, data: bytes) -> None:
    with c.sftp.open(path, "wb") as fh:
        fh.write(data)


def test_temporary_name_then_rename_is_one_filing(sb: Sandbox, client: Client) -> None:
    data = os.urandom(70_000)
    put(client, "/0001/app1/in/.report.csv.filepart", data)
    settle()
    # Never taken under its temporary name; the name is still there for the client to verify.
    assert filings(sb, ".report.csv.filepart") == [] and filings(sb, "report.csv") == []
    assert client.sftp.stat("/0001/app1/in/.report.csv.filepart").st_size == len(data)
    client.sftp.rename("/0001/app1/in/.report.csv.filepart", "/0001/app1/in/report.csv")
    entry = wait_for(lambda: filings(sb, "report.csv"))[0]
    assert entry.sha256 == hashlib.sha256(data).hexdigest() and entry.size == len(data)
    assert entry.transport == "sftp"
    settle()
    assert len(filings(sb, "report.csv")) == 1 and in_keys(sb, ".report") == []
    assert [a.operation for a in sb.arrivals() if a.key.endswith("report.csv")] == ["SftpRename"]
    rec = sb.tracking(entry.tracking_id)
    assert rec is not None and rec["fileSize"] == len(data) and rec["submissionTime"] is not None


@pytest.mark.parametrize("temp", [".hidden.txt", "plain.txt.filepart"])
def test_any_temporary_looking_name_is_never_filed(sb: Sandbox, client: Client, temp: str) -> None:
    put(client, f"/0001/app1/in/{temp}", b"not a filing")
    settle()
    assert filings(sb, temp) == [] and in_keys(sb, temp) == [f"0001/app1/in/{temp}"]
    client.sftp.remove(f"/0001/app1/in/{temp}")


def test_plain_close_is_a_filing_even_empty(sb: Sandbox, client: Client) -> None:
    put(client, "/0001/app1/in/empty.txt", b"")
    entry = wait_for(lambda: filings(sb, "empty.txt"))[0]
    assert entry.size == 0
    assert [a.operation for a in sb.arrivals() if a.key.endswith("/empty.txt")] == ["SftpClose"]


def test_session_dying_with_the_file_open_files_what_arrived(sb: Sandbox) -> None:
    """Like an S3-backed gateway: a file created under in/NAME by a client that then dies is filed
    with the bytes that arrived (here: none), which is why the agent writes to a temporary name."""
    c = Client(sb)
    fh = c.sftp.open("/0001/app1/in/died.txt", "wb")
    fh.write(b"half")
    fh.flush()
    c.transport.close()  # never closes the file
    entry = wait_for(lambda: filings(sb, "died.txt"))[0]
    assert entry.size == 4


def test_rename_onto_an_existing_file_is_refused(sb: Sandbox, client: Client) -> None:
    sb.receive_lag = 30  # keep target.txt in in/ for the duration
    put(client, "/0001/app1/in/target.txt", b"first")
    put(client, "/0001/app1/in/.target.txt.filepart", b"second")
    with pytest.raises(OSError):
        client.sftp.rename("/0001/app1/in/.target.txt.filepart", "/0001/app1/in/target.txt")
    assert sb.admin_s3.get_object(Bucket=sb.bucket, Key="0001/app1/in/target.txt")["Body"].read() == b"first"
    # No overwriting rename extension either.
    with pytest.raises(OSError):
        client.sftp.posix_rename("/0001/app1/in/.target.txt.filepart", "/0001/app1/in/target.txt")
    # Out of in/ or across applications: refused; a missing source: no such file.
    with pytest.raises(PermissionError):
        client.sftp.rename("/0001/app1/in/.target.txt.filepart", "/0001/app2/in/target.txt")
    with pytest.raises(FileNotFoundError):
        client.sftp.rename("/0001/app1/in/.nothing.filepart", "/0001/app1/in/nothing.txt")
    sb.receive_lag = 0
    assert wait_for(lambda: filings(sb, "target.txt"))[0].size == 5
    client.sftp.remove("/0001/app1/in/.target.txt.filepart")


@pytest.mark.parametrize("operation", ["close", "rename"])
def test_drop_after_the_operation_took_effect(sb: Sandbox, operation: str) -> None:
    name = f"after-{operation}.txt"
    temp = f"/0001/app1/in/.{name}.filepart"
    data = os.urandom(10_000)
    sb.inject_fault("drop", target="sftp", after=True, operation=operation)
    with killed_session(sb) as c:
        put(c, temp, data)
        c.sftp.rename(temp, f"/0001/app1/in/{name}")
    # The server did it; the client never heard back and its session is gone.
    assert wait_for(lambda: not c.transport.is_active(), timeout=5)
    if operation == "close":
        wait_for(lambda: in_keys(sb, f".{name}") == [f"0001/app1/in/.{name}.filepart"])
        settle()
        assert filings(sb, name) == []
        sb.admin_s3.delete_object(Bucket=sb.bucket, Key=f"0001/app1/in/.{name}.filepart")
    else:
        entry = wait_for(lambda: filings(sb, name))[0]
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
        settle()
        assert len(filings(sb, name)) == 1 and in_keys(sb, f".{name}") == []


def test_drop_after_close_of_a_plain_name_is_a_filing(sb: Sandbox) -> None:
    sb.inject_fault("drop", target="sftp", after=True, operation="close", path_prefix="/0001/app1/in/plain-")
    with killed_session(sb) as c:
        put(c, "/0001/app1/in/plain-after.txt", b"whole")
    assert wait_for(lambda: filings(sb, "plain-after.txt"))[0].size == 5


def test_drop_before_the_rename_leaves_only_the_temporary_file(sb: Sandbox) -> None:
    with killed_session(sb) as c:
        put(c, "/0001/app1/in/.before.txt.filepart", b"bytes")
        sb.inject_fault("drop", target="sftp", operation="rename")
        c.sftp.rename("/0001/app1/in/.before.txt.filepart", "/0001/app1/in/before.txt")
    settle()
    assert filings(sb, "before.txt") == []
    assert in_keys(sb, ".before") == ["0001/app1/in/.before.txt.filepart"]
    # A new session can finish the job.
    with_new = Client(sb)
    try:
        with_new.sftp.rename("/0001/app1/in/.before.txt.filepart", "/0001/app1/in/before.txt")
    finally:
        with_new.close()
    assert wait_for(lambda: filings(sb, "before.txt"))[0].size == 5


def test_drop_before_open_creates_nothing(sb: Sandbox) -> None:
    sb.inject_fault("drop", target="sftp", operation="open")
    with killed_session(sb) as c:
        put(c, "/0001/app1/in/never-opened.txt", b"x")
    settle()
    assert filings(sb, "never-opened.txt") == [] and in_keys(sb, "never-opened") == []


def test_receive_lag_applies_to_sftp(sb: Sandbox, client: Client) -> None:
    sb.inject_fault("receive_lag", seconds=1.2)
    t0 = time.monotonic()
    put(client, "/0001/app1/in/lagged.txt", b"lag")
    time.sleep(0.8)
    assert filings(sb, "lagged.txt") == [] and in_keys(sb, "lagged") == ["0001/app1/in/lagged.txt"]
    assert not any(r["fileName"] == "lagged.txt" for r in sb.tracking_records())
    wait_for(lambda: filings(sb, "lagged.txt"))
    assert time.monotonic() - t0 >= 1.2
