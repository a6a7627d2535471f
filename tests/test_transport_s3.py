"""S3-direct transport against a real S3/STS/IAM endpoint: moto's threaded server on loopback.

``fetch`` stands in for fileX's ``GET /S3TransferTokens``: it assumes a role through moto STS and
returns REAL temporary credentials with fileX's path shapes, and an expiration the test chooses.
Tests that need S3 to check credentials and policies switch moto's IAM enforcement on.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

import boto3
import pytest
from botocore.exceptions import ClientError
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer
from moto.utilities.utils import get_partition

from filex_agent.config import S3Settings
from filex_agent.errors import (
    AuthError,
    NotEntitledError,
    PermanentError,
    RemoteChangedError,
    TransientError,
    UploadUnconfirmed,
)
from filex_agent.models import S3Credentials, S3TransferTokens
from filex_agent.transports import TRANSPORTS
from filex_agent.transports import s3 as s3mod
from filex_agent.transports.s3 import S3TokenCache, S3Transport
from tests.fault_proxy import FaultProxy, complete_multipart, put_object, upload_part

BUCKET = "sandbox-filex"
MIB = 1024 * 1024
SMALL_PARTS = S3Settings(multipart_threshold_mb=5, part_size_mb=5, max_concurrency=2)


@dataclass
class Moto:
    url: str
    admin: "boto3.client"  # S3 with the root test key
    role_arn: str
    fetcher_key: dict[str, str]

    def set_auth(self, enforce: bool) -> None:
        # moto's own switch: 0 = check every request's credentials and IAM policies.
        req = urllib.request.Request(self.url + "/moto-api/reset-auth", data=b"0" if enforce else b"inf",
                                     method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}"
        kw = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                  aws_secret_access_key="testing")
        iam = boto3.client("iam", **kw)
        # An IAM admin key, so that the test's own S3 calls still pass when IAM is enforced.
        iam.create_user(UserName="admin")
        iam.put_user_policy(UserName="admin", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        ak = iam.create_access_key(UserName="admin")["AccessKey"]
        admin = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id=ak["AccessKeyId"],
                             aws_secret_access_key=ak["SecretAccessKey"])
        admin.create_bucket(Bucket=BUCKET)
        trust = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}
        iam.create_role(RoleName="filex-transfer", AssumeRolePolicyDocument=json.dumps(trust))
        # Like fileX's policy: this role may use org 0001's applications only.
        policy = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": [f"arn:aws:s3:::{BUCKET}/0001/*"]},
            {"Effect": "Allow", "Action": "s3:ListBucket*", "Resource": f"arn:aws:s3:::{BUCKET}"}]}
        iam.put_role_policy(RoleName="filex-transfer", PolicyName="p", PolicyDocument=json.dumps(policy))
        iam.create_user(UserName="filex-service")
        key = iam.create_access_key(UserName="filex-service")["AccessKey"]
        iam.put_user_policy(UserName="filex-service", PolicyName="p", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                      "Resource": "*"}]}))
        role_arn = iam.get_role(RoleName="filex-transfer")["Role"]["Arn"]
        yield Moto(url=url, admin=admin, role_arn=role_arn,
                   fetcher_key={"aws_access_key_id": key["AccessKeyId"],
                                "aws_secret_access_key": key["SecretAccessKey"]})
    finally:
        server.stop()


@pytest.fixture
def enforce_auth(moto: Moto) -> Iterator[None]:
    moto.set_auth(True)
    try:
        yield
    finally:
        moto.set_auth(False)


@dataclass
class FakeFileX:
    """``GET /S3TransferTokens/{org}/{app}`` backed by moto STS."""

    moto: Moto
    ttl_seconds: float = 3600
    write_paths: Callable[[str, str], list[str]] | None = None
    read_paths: Callable[[str, str], list[str]] | None = None
    bogus_first: int = 0  # the first N answers carry credentials S3 does not know
    calls: list[tuple[str, str]] = field(default_factory=list)
    issued: list[S3Credentials] = field(default_factory=list)
    delay: float = 0.0

    def __post_init__(self) -> None:
        self._sts = boto3.client("sts", endpoint_url=self.moto.url, region_name="us-east-1", **self.moto.fetcher_key)
        self._lock = threading.Lock()

    def __call__(self, org: str, app: str) -> S3TransferTokens:
        with self._lock:
            self.calls.append((org, app))
            n = len(self.calls)
        if self.delay:
            time.sleep(self.delay)
        if n <= self.bogus_first:
            creds = S3Credentials(accessKeyId=f"ASIABOGUS{n:011d}", secretAccessKey="b" * 40,
                                  sessionToken="bogus-session-token-" + "c" * 40,
                                  expiration=datetime.now(timezone.utc) + timedelta(seconds=self.ttl_seconds))
        else:
            c = self._sts.assume_role(RoleArn=self.moto.role_arn, RoleSessionName=f"filexuser{org}",
                                      DurationSeconds=900)["Credentials"]
            creds = S3Credentials(accessKeyId=c["AccessKeyId"], secretAccessKey=c["SecretAccessKey"],
                                  sessionToken=c["SessionToken"],
                                  expiration=datetime.now(timezone.utc) + timedelta(seconds=self.ttl_seconds))
        self.issued.append(creds)
        return S3TransferTokens(
            region="us-east-1",
            sessionName=f"filexuser{org}@test",
            readPaths=self.read_paths(org, app) if self.read_paths else
            [f"{BUCKET}/{org}/{app}/in_arcv/", f"{BUCKET}/{org}/{app}/out/"],
            writePaths=self.write_paths(org, app) if self.write_paths else [f"{BUCKET}/{org}/{app}/in/"],
            credentials=creds,
        )


def make(moto: Moto, fetch: Callable[[str, str], S3TransferTokens], org: str = "0001", app: str = "app1",
         margin: float = 300, settings: S3Settings = SMALL_PARTS,
         cache: S3TokenCache | None = None) -> tuple[S3Transport, S3TokenCache]:
    cache = cache or S3TokenCache(fetch, credential="main", refresh_margin_seconds=margin)
    return S3Transport(org, app, tokens=cache, settings=settings, endpoint_url=moto.url,
                       connect_timeout=5, read_timeout=30, max_attempts=3), cache


def write_random(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def remote_sha256(moto: Moto, key: str) -> str:
    return hashlib.sha256(moto.admin.get_object(Bucket=BUCKET, Key=key)["Body"].read()).hexdigest()


def no_multipart_left(moto: Moto, prefix: str) -> bool:
    return not moto.admin.list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads")


def exists(moto: Moto, key: str) -> bool:
    try:
        moto.admin.head_object(Bucket=BUCKET, Key=key)
        return True
    except ClientError:
        return False


# -- uploads ------------------------------------------------------------------------------------

def test_registered() -> None:
    assert TRANSPORTS["s3"] is S3Transport and S3Transport.kind == "s3"


def test_multipart_upload_is_complete_and_verified(moto: Moto, tmp_path: Path) -> None:
    fetch = FakeFileX(moto)
    t, cache = make(moto, fetch)
    local = tmp_path / "big.dat"
    digest = write_random(local, 12 * MIB + 123)
    seen: list[int] = []
    with t:
        res = t.upload(local, "FOCUS_2025-Q3.dat", progress=seen.append)
    key = "0001/app1/in/FOCUS_2025-Q3.dat"
    assert remote_sha256(moto, key) == digest
    assert sum(seen) == local.stat().st_size
    assert res.detail["etag"].endswith("-3") and res.detail["parts"] == "3"  # 5 + 5 + 2 MiB
    assert res.detail["integrity"] == "part-etag+etag"
    data = local.read_bytes()
    parts = [hashlib.md5(data[i:i + 5 * MIB]).digest() for i in range(0, len(data), 5 * MIB)]
    assert res.detail["etag"] == hashlib.md5(b"".join(parts)).hexdigest() + "-3"  # computed here, independently
    assert res.upload_location == "0001/app1/in" and res.tracking_id is None
    assert res.size == local.stat().st_size and res.started_at <= res.finished_at
    assert no_multipart_left(moto, "0001/app1/in/")
    assert len(fetch.calls) == 1


def test_small_upload_single_part_and_find_uploaded(moto: Moto, tmp_path: Path) -> None:
    t, _ = make(moto, FakeFileX(moto))
    local = tmp_path / "small.csv"
    digest = write_random(local, 1500)
    res = t.upload(local, "small.csv")
    assert remote_sha256(moto, "0001/app1/in/small.csv") == digest
    assert res.detail["etag"] == hashlib.md5(local.read_bytes()).hexdigest() and res.detail["parts"] == "1"
    assert res.detail["md5"] == res.detail["etag"]
    assert res.detail["integrity"] == "content-md5+etag"
    found = t.find_uploaded("small.csv")
    assert found is not None and found.size == 1500 and found.modified is not None
    assert t.find_uploaded("never-sent.csv") is None
    t.close()


def test_credentials_refresh_during_and_between_uploads(moto: Moto, tmp_path: Path) -> None:
    # Tokens live 3 s and are refreshed 2 s before expiry: usable for ~1 s each.
    fetch = FakeFileX(moto, ttl_seconds=3)
    t, cache = make(moto, fetch, margin=2,
                    settings=S3Settings(multipart_threshold_mb=5, part_size_mb=5, max_concurrency=1))
    local = tmp_path / "slow.dat"
    digest = write_random(local, 12 * MIB)
    state = {"slept": False, "sent": 0}
    calls_at_start = {}

    def slow(n: int) -> None:
        state["sent"] += n
        if not state["slept"] and state["sent"] >= 5 * MIB:
            # After the first part: outlive the credentials the upload started with.
            calls_at_start["n"] = len(fetch.calls)
            state["slept"] = True
            time.sleep(1.5)

    t.upload(local, "slow.dat", progress=slow)
    assert remote_sha256(moto, "0001/app1/in/slow.dat") == digest
    during = len(fetch.calls)
    assert during > calls_at_start["n"], "credentials were not refreshed during the multipart upload"
    time.sleep(1.2)
    local2 = tmp_path / "second.dat"
    digest2 = write_random(local2, 2000)
    t.upload(local2, "second.dat")
    assert remote_sha256(moto, "0001/app1/in/second.dat") == digest2
    assert len(fetch.calls) > during, "stale credentials were reused between uploads"
    assert no_multipart_left(moto, "0001/app1/in/")


def test_failed_multipart_upload_is_aborted(moto: Moto, tmp_path: Path) -> None:
    t, _ = make(moto, FakeFileX(moto))
    local = tmp_path / "doomed.dat"
    write_random(local, 12 * MIB)

    class Boom(Exception):
        pass

    sent = {"n": 0}

    def explode(n: int) -> None:
        sent["n"] += n
        if sent["n"] > 6 * MIB:  # the first part is already stored by then
            raise Boom("disk pulled")

    with pytest.raises(Boom):
        t.upload(local, "doomed.dat", progress=explode)
    assert no_multipart_left(moto, "0001/app1/in/")
    assert not exists(moto, "0001/app1/in/doomed.dat")
    assert t.find_uploaded("doomed.dat") is None


def _count_sends(t: S3Transport, op: str) -> list[dict[str, str]]:
    """Requests of ``op`` that the transport's client put on the wire (their headers, as text)."""
    seen: list[dict[str, str]] = []

    def note(request: object, **kw: object) -> None:
        seen.append({k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()})  # type: ignore[attr-defined]

    t._s3().meta.events.register(f"before-send.s3.{op}", note)
    return seen


def test_one_md5_per_byte_and_no_sha256_payload_hash(moto: Moto, tmp_path: Path) -> None:
    t, _ = make(moto, FakeFileX(moto))
    big, small = tmp_path / "parts.dat", tmp_path / "one.dat"
    write_random(big, 11 * MIB)
    write_random(small, 5000)
    parts, puts = _count_sends(t, "UploadPart"), _count_sends(t, "PutObject")
    t.upload(big, "parts.dat")
    t.upload(small, "one.dat")
    # Parts: hashed while sent and checked against their ETag; no Content-MD5 for S3 to hash again.
    assert len(parts) == 3 and not any("Content-MD5" in h for h in parts)
    # A single PUT: Content-MD5, a signed header, so a bad body never becomes an object.
    assert [h["Content-MD5"] for h in puts] == [base64.b64encode(hashlib.md5(small.read_bytes()).digest()).decode()]
    assert "content-md5" in puts[0]["Authorization"].lower()
    # No SHA-256 of the payload on top of the MD5.
    assert {h["X-Amz-Content-SHA256"] for h in parts + puts} == {"UNSIGNED-PAYLOAD"}


def test_part_stored_differently_aborts_before_any_object(moto: Moto, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Stands for a part corrupted on the way: S3's ETag for it is not the MD5 of the bytes sent.
    t, _ = make(moto, FakeFileX(moto))
    local = tmp_path / "bad-part.dat"
    write_random(local, 12 * MIB)
    completes = _count_sends(t, "CompleteMultipartUpload")
    real = s3mod._HashingReader.digest

    def wrong(self):  # type: ignore[no-untyped-def]
        got = real(self)
        return None if got is None else (hashlib.md5(b"other bytes").digest(), got[1])

    monkeypatch.setattr(s3mod._HashingReader, "digest", wrong)
    with pytest.raises(TransientError, match="ETag"):
        t.upload(local, "bad-part.dat")
    assert completes == [] and no_multipart_left(moto, "0001/app1/in/")
    assert not exists(moto, "0001/app1/in/bad-part.dat")


def test_sse_kms_parts_carry_content_md5(moto: Moto, tmp_path: Path) -> None:
    # With SSE-KMS a part's ETag is no MD5 (real S3 says SSE-KMS in CreateMultipartUpload; moto
    # does not, so the answer is amended here): parts then go with Content-MD5 for S3 to check.
    t, _ = make(moto, FakeFileX(moto))
    local = tmp_path / "kms.dat"
    write_random(local, 11 * MIB)

    def kms(parsed: dict, **kw: object) -> None:
        parsed["ServerSideEncryption"] = "aws:kms"

    t._s3().meta.events.register_first("after-call.s3.CreateMultipartUpload", kms)
    parts = _count_sends(t, "UploadPart")
    res = t.upload(local, "kms.dat")
    data = local.read_bytes()
    assert sorted(h["Content-MD5"] for h in parts) == sorted(
        base64.b64encode(hashlib.md5(data[i:i + 5 * MIB]).digest()).decode() for i in range(0, len(data), 5 * MIB))
    assert res.detail["parts"] == "3" and res.detail["integrity"] == "content-md5+etag"


def test_hashing_reader_hashes_each_byte_once_across_rewinds() -> None:
    data = os.urandom(300_000)

    class Chunk(io.BytesIO):  # what s3transfer's ReadFileChunk offers botocore
        def __len__(self) -> int:
            return len(data)

    r = s3mod._HashingReader(Chunk(data))
    assert r.read(70_000) and r.digest() is None  # not all read yet
    r.seek(0)  # botocore resends after a dropped connection
    while r.read(16_384):
        pass
    assert r.digest() == (hashlib.md5(data).digest(), len(data)) and len(r) == len(data)
    skip = s3mod._HashingReader(Chunk(data))
    skip.seek(1000)
    skip.read()
    assert skip.digest() is None  # a read that skipped bytes proves nothing


def _no_object_may_be_deleted(t: S3Transport, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(t, "_delete_bad_object", lambda *a: pytest.fail("an object was created and had to be deleted"))


def test_file_changed_during_multipart_upload_never_becomes_an_object(moto: Moto, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    t, _ = make(moto, FakeFileX(moto), settings=S3Settings(multipart_threshold_mb=5, part_size_mb=5,
                                                           max_concurrency=1))
    local = tmp_path / "growing.dat"
    write_random(local, 12 * MIB)
    completes = _count_sends(t, "CompleteMultipartUpload")
    _no_object_may_be_deleted(t, monkeypatch)
    done = {"x": False}

    def modify(n: int) -> None:
        if not done["x"]:
            done["x"] = True
            with open(local, "ab") as f:  # a writer still appending, while part 1 is sent
                f.write(b"late data")

    with pytest.raises(RemoteChangedError, match="changed"):
        t.upload(local, "growing.dat", progress=modify)
    assert completes == [] and no_multipart_left(moto, "0001/app1/in/")
    assert not exists(moto, "0001/app1/in/growing.dat")


def test_file_changed_before_single_put_never_becomes_an_object(moto: Moto, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    t, _ = make(moto, FakeFileX(moto))
    local = tmp_path / "growing.csv"
    write_random(local, 3000)
    puts = _count_sends(t, "PutObject")
    _no_object_may_be_deleted(t, monkeypatch)
    real = s3mod._body_md5

    def then_append(body: object, sha: object = None) -> tuple[bytes, int]:
        out = real(body, sha)  # type: ignore[arg-type]
        with open(local, "ab") as f:  # the writer appends while the Content-MD5 is computed
            f.write(b"late data")
        return out

    monkeypatch.setattr(s3mod, "_body_md5", then_append)
    with pytest.raises(RemoteChangedError, match="changed"):
        t.upload(local, "growing.csv")
    assert puts == [] and not exists(moto, "0001/app1/in/growing.csv")


def test_file_changed_while_sent_is_discarded(moto: Moto, tmp_path: Path) -> None:
    # A change during the last bytes of the body: plain moto stores it (it does not check Content-MD5),
    # the transport sees the change afterwards and deletes the object.
    t, _ = make(moto, FakeFileX(moto))
    local = tmp_path / "late.dat"
    write_random(local, 3000)
    done = {"x": False}

    def modify(n: int) -> None:
        if not done["x"]:
            done["x"] = True
            with open(local, "ab") as f:
                f.write(b"late data")

    with pytest.raises(RemoteChangedError, match="changed"):
        t.upload(local, "late.dat", progress=modify)
    assert not exists(moto, "0001/app1/in/late.dat")


def test_etag_mismatch_deletes_object(moto: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Stands for bytes corrupted in transit: the local expectation differs from what S3 stored.
    monkeypatch.setattr(s3mod, "_expected_etag", lambda *a: "0" * 32)
    t, _ = make(moto, FakeFileX(moto))
    local = tmp_path / "corrupt.dat"
    write_random(local, 4000)
    with pytest.raises(TransientError, match="integrity"):
        t.upload(local, "corrupt.dat")
    assert not exists(moto, "0001/app1/in/corrupt.dat")


# -- feedback -----------------------------------------------------------------------------------

def test_feedback_listed_and_downloaded(moto: Moto) -> None:
    t, _ = make(moto, FakeFileX(moto), app="fb1")
    big = os.urandom(3 * MIB + 7)
    moto.admin.put_object(Bucket=BUCKET, Key="0001/fb1/out/result_1.xml", Body=b"<ok/>")
    moto.admin.put_object(Bucket=BUCKET, Key="0001/fb1/out/big.zip", Body=big)
    moto.admin.put_object(Bucket=BUCKET, Key="0001/fb1/out/nested/x.txt", Body=b"x")  # not a feedback file
    moto.admin.put_object(Bucket=BUCKET, Key="0001/fb1/in/mine.txt", Body=b"x")  # not feedback either
    files = {f.name: f for f in t.list_feedback()}
    assert set(files) == {"result_1.xml", "big.zip"}
    assert files["big.zip"].size == len(big) and files["big.zip"].modified is not None
    dest = io.BytesIO()
    seen: list[int] = []
    assert t.download_feedback("big.zip", dest, progress=seen.append) == len(big)
    assert dest.getvalue() == big and sum(seen) == len(big) and len(seen) >= 4  # streamed in chunks
    with pytest.raises(PermanentError, match="gone.xml"):
        t.download_feedback("gone.xml", io.BytesIO())


def test_feedback_pagination(moto: Moto) -> None:
    t, _ = make(moto, FakeFileX(moto), app="many")
    names = [f"fb_{i:05d}.txt" for i in range(1200)]
    # Seeded straight into the in-process server's store: 1,200 PUTs over HTTP would take ~9 s.
    backend = s3_backends[DEFAULT_ACCOUNT_ID][get_partition("us-east-1")]
    for n in names:
        backend.put_object(BUCKET, f"0001/many/out/{n}", b"1")
    listed = t.list_feedback()
    assert sorted(f.name for f in listed) == names and all(f.size == 1 for f in listed)


# -- errors -------------------------------------------------------------------------------------

def test_fetch_not_entitled_propagates(moto: Moto, tmp_path: Path) -> None:
    calls: list[tuple[str, str]] = []

    def fetch(org: str, app: str) -> S3TransferTokens:
        calls.append((org, app))
        raise NotEntitledError(f"fileX refused S3 transfer tokens for org {org} application {app} (403)")

    t, cache = make(moto, fetch, org="0042", app="crd")
    (tmp_path / "f.txt").write_bytes(b"x")
    with pytest.raises(NotEntitledError, match="org 0042 application crd"):
        t.upload(tmp_path / "f.txt", "f.txt")
    with pytest.raises(NotEntitledError):
        t.list_feedback()
    assert len(calls) == 2  # a refusal is not cached


def test_missing_write_paths(moto: Moto, tmp_path: Path) -> None:
    t, _ = make(moto, FakeFileX(moto, write_paths=lambda o, a: []))
    (tmp_path / "f.txt").write_bytes(b"x")
    with pytest.raises(PermanentError, match="org 0001 application app1.*writePaths"):
        t.upload(tmp_path / "f.txt", "f.txt")


@pytest.mark.parametrize("path", [
    f"{BUCKET}/0002/app1/in/",      # another org
    f"{BUCKET}/1/app1/in/",         # leading zeros matter
    f"{BUCKET}/0001/APP1/in/",      # applications are case sensitive
    f"{BUCKET}/0001/app1/",         # no sub-space
    "0001/app1/in/",                # no bucket
    f"{BUCKET}/0001/app1/in/deeper/",
])
def test_wrong_write_path_shape(moto: Moto, tmp_path: Path, path: str) -> None:
    t, _ = make(moto, FakeFileX(moto, write_paths=lambda o, a: [path]))
    (tmp_path / "f.txt").write_bytes(b"x")
    with pytest.raises(PermanentError, match="org 0001 application app1") as info:
        t.upload(tmp_path / "f.txt", "f.txt")
    assert path in str(info.value)


def test_missing_out_read_path(moto: Moto) -> None:
    t, _ = make(moto, FakeFileX(moto, read_paths=lambda o, a: [f"{BUCKET}/{o}/{a}/in_arcv/"]))
    with pytest.raises(PermanentError, match="org 0001 application app1.*out/"):
        t.list_feedback()


def test_s3_access_denied_is_not_entitled(moto: Moto, tmp_path: Path, enforce_auth: None) -> None:
    # Real STS credentials, real IAM policy: the role covers org 0001 only.
    t, _ = make(moto, FakeFileX(moto), org="0002", app="app1")
    (tmp_path / "f.txt").write_bytes(b"x")
    with pytest.raises(NotEntitledError, match="org 0002 application app1"):
        t.upload(tmp_path / "f.txt", "f.txt")
    moto.admin.put_object(Bucket=BUCKET, Key="0002/app1/out/theirs.xml", Body=b"x")
    with pytest.raises(NotEntitledError, match="org 0002 application app1"):
        t.download_feedback("theirs.xml", io.BytesIO())
    assert not exists(moto, "0002/app1/in/f.txt")


def test_refused_credentials_refetched_once(moto: Moto, tmp_path: Path, enforce_auth: None) -> None:
    fetch = FakeFileX(moto, bogus_first=1)  # fileX's first answer is unknown to S3 (revoked, expired)
    t, _ = make(moto, fetch)
    local = tmp_path / "retry.dat"
    digest = write_random(local, 3000)
    t.upload(local, "retry.dat")
    assert len(fetch.calls) == 2
    assert remote_sha256(moto, "0001/app1/in/retry.dat") == digest
    assert t.find_uploaded("retry.dat") is not None and len(fetch.calls) == 2


def test_refused_credentials_twice_is_auth_error(moto: Moto, tmp_path: Path, enforce_auth: None) -> None:
    fetch = FakeFileX(moto, bogus_first=99)
    t, _ = make(moto, fetch)
    (tmp_path / "f.txt").write_bytes(b"x")
    with pytest.raises(AuthError, match="InvalidAccessKeyId"):
        t.upload(tmp_path / "f.txt", "f.txt")
    assert len(fetch.calls) == 2
    t2, _ = make(moto, fetch)
    # HEAD has no error body: a bare 403 is "cannot know" (as for transfer tokens that may not
    # read in/), evidence the reconciler must not take as "absent" nor as an error to retry.
    assert t2.find_uploaded("f.txt") is None
    assert len(fetch.calls) == 3  # no refetch for a HEAD refusal


def test_unreachable_endpoint_is_transient(moto: Moto, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    cache = S3TokenCache(FakeFileX(moto), credential="main")
    t = S3Transport("0001", "app1", tokens=cache, settings=SMALL_PARTS, endpoint_url=f"http://127.0.0.1:{dead}",
                    connect_timeout=1, read_timeout=2, max_attempts=1)
    (tmp_path / "f.txt").write_bytes(b"x")
    with pytest.raises(TransientError):
        t.upload(tmp_path / "f.txt", "f.txt")
    with pytest.raises(TransientError):
        t.list_feedback()


def test_no_secrets_in_logs_errors_or_reprs(moto: Moto, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                           enforce_auth: None) -> None:
    caplog.set_level(logging.DEBUG, logger="filex_agent")
    fetch = FakeFileX(moto, bogus_first=1)
    t, cache = make(moto, fetch)
    (tmp_path / "ok.txt").write_bytes(b"x")
    t.upload(tmp_path / "ok.txt", "ok.txt")
    t_denied, _ = make(moto, fetch, org="0002", cache=cache)
    with pytest.raises(NotEntitledError) as denied:
        t_denied.upload(tmp_path / "ok.txt", "ok.txt")
    texts = [caplog.text, str(denied.value), repr(cache), repr(t), repr(cache.get("0001", "app1"))]
    for creds in fetch.issued:
        for secret in (creds.secretAccessKey, creds.sessionToken):
            assert all(secret not in text for text in texts)


# -- token cache --------------------------------------------------------------------------------

def test_token_cache_shared_between_transports(moto: Moto, tmp_path: Path) -> None:
    fetch = FakeFileX(moto)
    a, cache = make(moto, fetch)
    b, _ = make(moto, fetch, cache=cache)
    other, _ = make(moto, fetch, app="fb1", cache=cache)
    (tmp_path / "a.txt").write_bytes(b"a")
    a.upload(tmp_path / "a.txt", "shared-a.txt")
    b.upload(tmp_path / "a.txt", "shared-b.txt")
    assert b.find_uploaded("shared-a.txt") is not None
    assert fetch.calls == [("0001", "app1")]
    other.list_feedback()
    assert fetch.calls == [("0001", "app1"), ("0001", "fb1")]
    assert cache.credentials("0001", "app1") is cache.credentials("0001", "app1")


def test_token_cache_concurrent_get_fetches_once(moto: Moto) -> None:
    fetch = FakeFileX(moto, delay=0.3)  # a slow fileX: every waiting thread must reuse the one answer
    cache = S3TokenCache(fetch, credential="main")
    barrier = threading.Barrier(12)

    def get(i: int) -> S3TransferTokens:
        barrier.wait()
        return cache.get("0001", "app1" if i % 2 else "app2")

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(get, range(12)))
    assert sorted(fetch.calls) == [("0001", "app1"), ("0001", "app2")]
    assert len({id(r) for r in results}) == 2


def test_token_cache_refetches_within_margin(moto: Moto) -> None:
    fetch = FakeFileX(moto, ttl_seconds=200)
    cache = S3TokenCache(fetch, credential="main", refresh_margin_seconds=300)  # always within margin
    cache.get("0001", "app1")
    cache.get("0001", "app1")
    assert len(fetch.calls) == 2
    fetch.ttl_seconds = 3600
    cache.get("0001", "app1")
    cache.get("0001", "app1")
    assert len(fetch.calls) == 3


def test_already_expired_credentials_are_transient(moto: Moto, tmp_path: Path) -> None:
    # fileX (or a wrong local clock) hands out credentials that are already expired.
    t, _ = make(moto, FakeFileX(moto, ttl_seconds=-30), margin=5)
    (tmp_path / "f.txt").write_bytes(b"x")
    with pytest.raises(TransientError, match="clock"):
        t.upload(tmp_path / "f.txt", "f.txt")
    assert not exists(moto, "0001/app1/in/f.txt")


# -- exactly once: faults after the request happened ---------------------------------------------

@pytest.fixture
def proxy(moto: Moto) -> Iterator[FaultProxy]:
    with FaultProxy(moto.url) as p:
        yield p


def via(proxy: FaultProxy, moto: Moto, settings: S3Settings = SMALL_PARTS) -> tuple[S3Transport, list[str]]:
    """A transport whose S3 is behind the fault proxy, and a recorder of on_commit and requests."""
    cache = S3TokenCache(FakeFileX(moto), credential="main")
    t = S3Transport("0001", "app1", tokens=cache, settings=settings, endpoint_url=proxy.url,
                    connect_timeout=5, read_timeout=30, max_attempts=3)
    events: list[str] = []
    t.on_commit = lambda: events.append("commit")
    return t, events


def _record_sends(t: S3Transport, events: list[str]) -> None:
    client = t._s3()
    for op in ("PutObject", "CompleteMultipartUpload"):
        client.meta.events.register(f"before-send.s3.{op}", lambda request, _op=op, **kw: events.append(f"send {_op}"))


@pytest.mark.parametrize("fault", ["store_then_503", "store_then_drop"])
@pytest.mark.parametrize("size,match,op", [(300_000, put_object, "PutObject"),
                                           (11 * MIB, complete_multipart, "CompleteMultipartUpload")])
def test_committing_request_stored_then_answer_lost_is_unconfirmed_and_sent_once(
        moto: Moto, proxy: FaultProxy, tmp_path: Path, fault: str, size: int, match, op: str) -> None:  # type: ignore[no-untyped-def]
    t, events = via(proxy, moto)
    _record_sends(t, events)
    local = tmp_path / f"lost-{op}-{fault}.dat"
    digest = write_random(local, size)
    proxy.faults = [(match, fault)]
    with pytest.raises(UploadUnconfirmed):
        t.upload(local, local.name)
    # botocore's retries (max_attempts=3) never re-sent it: one request, the object is there once.
    assert proxy.count(match) == 1
    assert events == ["commit", f"send {op}"]
    assert remote_sha256(moto, f"0001/app1/in/{local.name}") == digest


def test_refused_put_is_retried_with_a_commit_before_each_send(moto: Moto, proxy: FaultProxy, tmp_path: Path) -> None:
    # 400 RequestTimeout: S3 did not take the body, nothing stored; botocore may send it again.
    t, events = via(proxy, moto)
    _record_sends(t, events)
    local = tmp_path / "refused.csv"
    digest = write_random(local, 200_000)
    proxy.faults = [(put_object, "refuse_400_timeout")]
    result = t.upload(local, local.name)
    assert events == ["commit", "send PutObject", "commit", "send PutObject"]
    assert proxy.count(put_object) == 1  # only the second one reached S3
    assert remote_sha256(moto, f"0001/app1/in/{local.name}") == digest
    assert result.sent_sha256 == digest


def test_connection_refused_before_the_put_is_retried(moto: Moto, proxy: FaultProxy, tmp_path: Path) -> None:
    from botocore.exceptions import EndpointConnectionError

    t, events = via(proxy, moto)
    _record_sends(t, events)
    refusals = [1]

    def refuse(request, **kw):  # type: ignore[no-untyped-def]
        if refusals[0]:
            refusals[0] -= 1
            raise EndpointConnectionError(endpoint_url=proxy.url)

    t._s3().meta.events.register("before-send.s3.PutObject", refuse)
    local = tmp_path / "conn.csv"
    digest = write_random(local, 2000)
    t.upload(local, local.name)
    assert events == ["commit", "send PutObject", "commit", "send PutObject"]
    assert proxy.count(put_object) == 1
    assert remote_sha256(moto, f"0001/app1/in/{local.name}") == digest


@pytest.mark.parametrize("faults,forwarded", [
    (["store_then_503", "store_then_drop"], 3 + 2),  # stored, then the answer lost: sent again
    (["reset_mid_body", "reset_mid_body"], 3),  # cut off half-way: botocore rewinds, hashes stay right
])
def test_part_failures_are_retried_and_the_object_is_made_once(moto: Moto, proxy: FaultProxy, tmp_path: Path,
                                                               faults: list[str], forwarded: int) -> None:
    # Parts are no filing: a part may be sent again before Complete.
    t, events = via(proxy, moto)
    local = tmp_path / f"parts-{faults[0]}.dat"
    digest = write_random(local, 11 * MIB)
    proxy.faults = [(upload_part, f) for f in faults]
    result = t.upload(local, local.name)
    assert len(proxy.injected) == 2
    assert proxy.count(upload_part) == forwarded and proxy.count(complete_multipart) == 1
    assert events == ["commit"]
    assert remote_sha256(moto, f"0001/app1/in/{local.name}") == digest
    assert result.sent_sha256 == digest  # the part digests survived the resends


def test_on_commit_refusal_sends_nothing(moto: Moto, proxy: FaultProxy, tmp_path: Path) -> None:
    class Fenced(Exception):
        pass

    t, _ = via(proxy, moto)
    t.on_commit = lambda: (_ for _ in ()).throw(Fenced("stale writer"))
    small, big = tmp_path / "fenced.csv", tmp_path / "fenced.dat"
    write_random(small, 1000)
    write_random(big, 11 * MIB)
    for local in (small, big):
        with pytest.raises(Fenced):
            t.upload(local, local.name)
        assert not exists(moto, f"0001/app1/in/{local.name}")
    assert proxy.count(put_object) == 0 and proxy.count(complete_multipart) == 0
    assert no_multipart_left(moto, "0001/app1/in/fenced")


def test_find_uploaded_gives_modified_time_and_none_when_in_is_not_readable(moto: Moto, tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    t, _ = make(moto, FakeFileX(moto))
    local = tmp_path / "seen.csv"
    write_random(local, 1234)
    before = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=1)
    t.upload(local, "seen.csv")
    found = t.find_uploaded("seen.csv")
    assert found is not None and found.size == 1234 and found.modified is not None
    assert found.modified >= before
    assert t.find_uploaded("absent.csv") is None
    # fileX's transfer tokens: write in/, read only in_arcv/ and out/. HEAD of in/NAME is a 403.
    iam = boto3.client("iam", endpoint_url=moto.url, region_name="us-east-1", aws_access_key_id="testing",
                       aws_secret_access_key="testing")
    iam.create_role(RoleName="filex-write-only", AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}))
    iam.put_role_policy(RoleName="filex-write-only", PolicyName="p", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{BUCKET}/0001/*"}]}))
    write_only = Moto(url=moto.url, admin=moto.admin, fetcher_key=moto.fetcher_key,
                      role_arn=iam.get_role(RoleName="filex-write-only")["Role"]["Arn"])
    t2, cache = make(moto, FakeFileX(write_only))
    moto.set_auth(True)
    caplog.set_level(logging.DEBUG, logger="filex_agent.transports.s3")
    try:
        assert t2.find_uploaded("seen.csv") is None  # cannot know: not an error, not a loop
        assert cache.fetch_count == 1
        assert any("cannot read in/" in r.getMessage() for r in caplog.records)  # it was a 403, not a 404
    finally:
        moto.set_auth(False)


def test_symlink_swapped_in_after_open_is_not_followed(moto: Moto, tmp_path: Path) -> None:
    from filex_agent.localfile import LocalFile

    t, _ = make(moto, FakeFileX(moto))
    secret = tmp_path / "secret.key"
    secret.write_bytes(b"not for fileX" * 1000)
    for size in (3000, 11 * MIB):  # single PUT and multipart
        local = tmp_path / f"claimed-{size}.dat"
        digest = write_random(local, size)
        with LocalFile.open(local) as lf:
            local.unlink()
            local.symlink_to(secret)  # swapped in between claim and upload
            result = t.upload(lf, local.name)
        assert remote_sha256(moto, f"0001/app1/in/{local.name}") == digest
        assert result.sent_sha256 == digest


BIG_SINGLE = S3Settings(multipart_threshold_mb=64, part_size_mb=8, max_concurrency=2)


def test_body_reset_mid_way_is_rewound_and_stored_exactly(moto: Moto, proxy: FaultProxy, tmp_path: Path) -> None:
    # Issue 11's 48 MiB single PUT, with botocore made to rewind and resend the body half-way:
    # what S3 stores is the file, byte for byte, and the digest reported is of those bytes.
    t, events = via(proxy, moto, settings=BIG_SINGLE)
    local = tmp_path / "rewound.bin"
    digest = write_random(local, 48 * MIB)
    proxy.faults = [(put_object, "reset_mid_body")]
    result = t.upload(local, local.name)
    assert proxy.injected == [("PUT", "reset_mid_body")] and proxy.count(put_object) == 1
    assert events == ["commit", "commit"]  # one per request sent
    assert remote_sha256(moto, f"0001/app1/in/{local.name}") == digest
    assert result.sent_sha256 == digest
    assert result.detail["md5"] == hashlib.md5(local.read_bytes()).hexdigest() == result.detail["etag"]


def test_big_single_put_etag_is_right_while_in_is_listed(moto: Moto, tmp_path: Path) -> None:
    """Issue 11's integrity failure: moto computed a new key's ETag without its lock, so a
    concurrent listing of in/ (the sandbox processor) corrupted it. With moto_fixes applied (the
    sandbox applies it), a 48 MiB single PUT listed all the while gets the right ETag."""
    from filex_agent.sandbox import moto_fixes

    moto_fixes.apply()
    t, _ = make(moto, FakeFileX(moto), settings=BIG_SINGLE)
    local = tmp_path / "listed.bin"
    digest = write_random(local, 48 * MIB)
    stop = threading.Event()
    listings = [0]

    def lister() -> None:
        while not stop.is_set():
            moto.admin.list_objects_v2(Bucket=BUCKET, Prefix="0001/app1/in/")
            listings[0] += 1

    threads = [threading.Thread(target=lister) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        result = t.upload(local, local.name)
    finally:
        stop.set()
        for th in threads:
            th.join(10)
    assert listings[0] > 0
    assert result.detail["etag"] == hashlib.md5(local.read_bytes()).hexdigest()
    assert remote_sha256(moto, f"0001/app1/in/{local.name}") == digest


def test_multipart_change_hidden_by_utime_is_caught_before_complete(moto: Moto, tmp_path: Path) -> None:
    """Size + mtime can be faked (utime): the sequential SHA-256 pass before Complete compares
    every part with the bytes sent, so a part rewritten mid-upload never becomes an object."""
    t, _ = make(moto, FakeFileX(moto))
    local = tmp_path / "faked.dat"
    write_random(local, 11 * MIB)
    st = local.stat()
    sent = [0]
    done = [False]

    def rewrite_first_part(n: int) -> None:
        sent[0] += n
        if sent[0] >= 6 * MIB and not done[0]:  # part 1 (5 MiB) is gone: rewrite it, hide the change
            done[0] = True
            with open(local, "r+b") as f:
                f.write(os.urandom(4096))
            os.utime(local, ns=(st.st_atime_ns, st.st_mtime_ns))

    with pytest.raises(RemoteChangedError, match="part 1 read again differs"):
        t.upload(local, local.name, progress=rewrite_first_part)
    assert done[0] and not exists(moto, f"0001/app1/in/{local.name}")
    assert no_multipart_left(moto, "0001/app1/in/faked")
