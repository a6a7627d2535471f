"""The sandbox fileX: real HTTP server, real moto S3/STS, real processor thread."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import boto3
import httpx
import pytest
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError

from filex_agent.models import Listing, PresignedUrl, S3TransferTokens, TokenResponse, TrackingRecord
from filex_agent.sandbox import Sandbox, UploadLogEntry

TIMEOUT = httpx.Timeout(10.0)


def running_sandbox(data_dir: Path, **kw: Any) -> Iterator[Sandbox]:
    box = Sandbox(data_dir, **kw)
    box.start()
    try:
        yield box
    finally:
        box.stop()


@pytest.fixture(scope="module")
def sb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from running_sandbox(tmp_path_factory.mktemp("sandbox"), processing_delay=0.3)


@pytest.fixture(autouse=True)
def _no_faults(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "sb" in request.fixturenames:
        request.getfixturevalue("sb").clear_faults()


def get_token(sb: Sandbox) -> str:
    r = httpx.post(sb.fip_token_url, params={"grant_type": "client_credentials"},
                   auth=(sb.client_id, sb.client_secret), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return TokenResponse.model_validate(r.json()).access_token


@pytest.fixture()
def api(sb: Sandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sb.api_base_url, timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {get_token(sb)}", "Accept": "application/json"}) as c:
        yield c


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def track(api: httpx.Client, tid: str) -> TrackingRecord:
    r = api.get("/tracking", params={"id": tid})
    assert r.status_code == 200
    recs = r.json()
    assert isinstance(recs, list) and len(recs) == 1
    return TrackingRecord.model_validate(recs[0])


def rest_upload(api: httpx.Client, org: str, app: str, name: str, data: bytes) -> str:
    r = api.put(f"/files/{org}/{app}/in/{name}")
    assert r.status_code == 200, r.text
    p = PresignedUrl.model_validate(r.json())
    assert p.trackingId
    put = httpx.put(p.url, content=data, timeout=TIMEOUT)
    assert put.status_code == 200, put.text
    return p.trackingId


def wait_final(api: httpx.Client, tid: str) -> TrackingRecord:
    return wait_for(lambda: (rec if (rec := track(api, tid)).is_final else None))


def upload_entry(sb: Sandbox, tid: str) -> UploadLogEntry:
    entries = [u for u in sb.uploads() if u.tracking_id == tid]
    assert len(entries) == 1
    return entries[0]


def temp_s3(sb: Sandbox, tok: S3TransferTokens) -> Any:
    c = tok.credentials
    return boto3.client("s3", endpoint_url=sb.s3_endpoint_url, region_name=tok.region,
                        aws_access_key_id=c.accessKeyId, aws_secret_access_key=c.secretAccessKey,
                        aws_session_token=c.sessionToken,
                        config=BotoConfig(signature_version="s3v4", request_checksum_calculation="when_required",
                                          # one attempt: a retry would hide the fault under test
                                          retries={"total_max_attempts": 1}))


# ---------------------------------------------------------------------- FIP tokens
def test_token_grant_and_bad_credentials(sb: Sandbox) -> None:
    before = sb.token_requests
    r = httpx.post(sb.fip_token_url, params={"grant_type": "client_credentials"},
                   auth=(sb.client_id, sb.client_secret), timeout=TIMEOUT)
    assert r.status_code == 200
    body = r.json()
    assert body["token_type"] == "Bearer" and body["scope"] == "any"
    assert body["expires_in"] == "3600"  # a string, like FIP
    assert sb.token_requests == before + 1

    bad = httpx.post(sb.fip_token_url, params={"grant_type": "client_credentials"},
                     auth=(sb.client_id, "wrong"), timeout=TIMEOUT)
    assert bad.status_code == 401 and "access_token" not in bad.json()
    no_grant = httpx.post(sb.fip_token_url, auth=(sb.client_id, sb.client_secret), timeout=TIMEOUT)
    assert no_grant.status_code == 400
    assert sb.token_requests == before + 1
    assert sb.client_secret not in repr(sb)


def test_bad_or_missing_bearer_is_401_everywhere(sb: Sandbox) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": "Basic abc"}):
        for path in ("/files/0001", "/fileX/0001/app1", "/tracking", "/S3TransferTokens/0001/app1"):
            r = httpx.get(sb.api_base_url + path, headers=headers, timeout=TIMEOUT)
            assert r.status_code == 401, (path, headers)
        r = httpx.put(sb.api_base_url + "/files/0001/app1/in/x.txt", headers=headers, timeout=TIMEOUT)
        assert r.status_code == 401


def test_token_expires(tmp_path: Path) -> None:
    with Sandbox(tmp_path, token_seconds=1) as box:
        token = get_token(box)
        h = {"Authorization": f"Bearer {token}"}
        assert httpx.get(box.api_base_url + "/files/0001", headers=h, timeout=TIMEOUT).status_code == 200
        time.sleep(1.1)
        assert httpx.get(box.api_base_url + "/files/0001", headers=h, timeout=TIMEOUT).status_code == 401


# ---------------------------------------------------------------------- listings and entitlements
def test_listings(api: httpx.Client, sb: Sandbox) -> None:
    orgs = Listing.model_validate(api.get("/files/0001").json())
    assert orgs.name == "0001" and [c.name for c in orgs.children] == ["app1", "app2"]
    assert api.get("/fileX/0001").json() == api.get("/files/0001").json() | {}
    app = api.get("/fileX/0001/app1").json()
    assert isinstance(app["_links"], dict) and isinstance(app["_links"]["children"], list)
    spaces = {c.name: c.metadata.writable for c in Listing.model_validate(app).children}
    assert spaces == {"in": True, "out": False, "in_arcv": False}

    sb.admin_s3.put_object(Bucket=sb.bucket, Key="0001/app2/out/report.txt", Body=b"x" * 123)
    out = Listing.model_validate(api.get("/files/0001/app2/out").json())
    files = {c.name: c for c in out.children}
    assert files["report.txt"].is_file and files["report.txt"].metadata.contentLength == 123
    modified = files["report.txt"].metadata.lastModified
    assert modified is not None and modified.utcoffset() is not None
    assert abs((datetime.now(timezone.utc) - modified).total_seconds()) < 60
    assert [link.href for link in out.links if link.rel == "children"] == [
        f"{sb.api_base_url}/files/0001/app2/out/report.txt"]

    got = PresignedUrl.model_validate(api.get("/files/0001/app2/out/report.txt").json())
    assert got.expirationTime is not None and got.expirationTime > datetime.now(timezone.utc)
    assert httpx.get(got.url, timeout=TIMEOUT).content == b"x" * 123
    assert api.get("/files/0001/app2/out/missing.txt").status_code == 404


@pytest.mark.parametrize("path,status", [
    ("/files/0003", 403), ("/files/0003/app1", 403), ("/files/0003/app1/in", 403),
    ("/S3TransferTokens/0003/app1", 403), ("/files/0009", 404), ("/files/0002/app2", 404),
    ("/files/0001/app1/nope", 404), ("/nothing", 404),
])
def test_not_entitled_or_unknown(api: httpx.Client, path: str, status: int) -> None:
    r = api.get(path)
    assert r.status_code == status
    assert r.json()["statusCode"] == status


def test_put_rules(api: httpx.Client) -> None:
    assert api.put("/files/0001/app1/out/x.txt").status_code == 403
    assert api.put("/files/0001/app1/in_arcv/x.txt").status_code == 403
    assert api.put("/files/0003/app1/in/x.txt").status_code == 403
    assert api.put("/files/0001/app1/in/bad%23name.txt").status_code == 400
    assert api.put("/files/0001/app1/in/with space.txt").status_code == 400
    assert api.put("/files/0001/app1/in/ok:!@,&-='_.txt").status_code == 200
    # Temporary names are never taken from in/, so fileX-as-documented-here refuses them up front.
    assert api.put("/files/0001/app1/in/.hidden.txt").status_code == 400
    assert api.put("/files/0001/app1/in/report.csv.filepart").status_code == 400


# ---------------------------------------------------------------------- REST lifecycle
def test_rest_upload_lifecycle(api: httpx.Client, sb: Sandbox) -> None:
    data = os.urandom(300_000)
    r = api.put("/files/0001/app1/in/report.csv")
    p = PresignedUrl.model_validate(r.json())
    first = track(api, p.trackingId or "")
    assert (first.status, first.fileSize, first.downstreamStatus, first.submissionTime) == (
        "Request Received", 0, None, None)
    assert (first.applicationName, first.applicationSpaceName, first.uploadLocation) == ("app1", "in", "0001/app1/in")
    raw = api.get("/tracking", params={"id": p.trackingId}).json()[0]
    assert isinstance(raw["_links"], list) and raw["_links"][0]["rel"] == "self"

    assert httpx.put(p.url, content=data, timeout=TIMEOUT).status_code == 200
    received = wait_for(lambda: (rec if (rec := track(api, p.trackingId or "")).status == "Received by FINRA" else None))
    assert received.downstreamStatus == "RECEIVED"
    assert received.fileSize == len(data) and received.submissionTime is not None

    final = wait_final(api, p.trackingId or "")
    assert final.downstreamStatus == "ACCEPTED" and final.statusUpdatedTime is not None
    assert final.arcvFileName

    entry = upload_entry(sb, p.trackingId or "")
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert (entry.key, entry.transport, entry.size) == ("0001/app1/in/report.csv", "rest", len(data))
    lines = [json.loads(x) for x in (sb.data_dir / "uploads.jsonl").read_text().splitlines()]
    assert any(x["tracking_id"] == p.trackingId and x["sha256"] == entry.sha256 for x in lines)

    s3 = sb.admin_s3
    assert "Contents" not in s3.list_objects_v2(Bucket=sb.bucket, Prefix="0001/app1/in/report")
    arcv = s3.get_object(Bucket=sb.bucket, Key=f"0001/app1/in_arcv/{final.arcvFileName}")["Body"].read()
    assert arcv == data
    fb_name = f"report_{p.trackingId}_feedback.txt"
    names = [c.name for c in Listing.model_validate(api.get("/files/0001/app1/out").json()).children]
    assert fb_name in names
    url = PresignedUrl.model_validate(api.get(f"/files/0001/app1/out/{fb_name}").json()).url
    assert "ACCEPTED" in httpx.get(url, timeout=TIMEOUT).text

    admin = httpx.get(sb.api_base_url + "/_sandbox/uploads", timeout=TIMEOUT).json()
    assert any(u["tracking_id"] == p.trackingId and u["sha256"] == entry.sha256 for u in admin)
    # Every record is visible in the all-records call too.
    assert p.trackingId in [x["trackingId"] for x in api.get("/tracking").json()]


@pytest.mark.parametrize("name,outcome", [("FILE_REJECT.txt", "REJECTED"),
                                          ("FILE_PARTIAL.txt", "PARTIALLY_REJECTED")])
def test_outcome_from_name(api: httpx.Client, sb: Sandbox, name: str, outcome: str) -> None:
    tid = rest_upload(api, "0002", "app1", name, b"data")
    assert wait_final(api, tid).downstreamStatus == outcome
    stem = name.rsplit(".", 1)[0]
    body = sb.admin_s3.get_object(Bucket=sb.bucket, Key=f"0002/app1/out/{stem}_{tid}_feedback.txt")["Body"].read()
    assert outcome.encode() in body


def test_bytes_go_to_the_tracking_id_of_the_url_used(api: httpx.Client, sb: Sandbox) -> None:
    a = PresignedUrl.model_validate(api.put("/files/0001/app2/in/twice.txt").json())
    b = PresignedUrl.model_validate(api.put("/files/0001/app2/in/twice.txt").json())
    assert httpx.put(a.url, content=b"first", timeout=TIMEOUT).status_code == 200
    assert wait_final(api, a.trackingId or "").fileSize == 5
    assert track(api, b.trackingId or "").status == "Request Received"


def test_tracking_unknown_id_is_empty_list(api: httpx.Client) -> None:
    r = api.get("/tracking", params={"id": "00000000-0000-0000-0000-000000000000"})
    assert r.status_code == 200 and r.json() == []


# ---------------------------------------------------------------------- S3 direct and SFTP marker
def test_s3_transfer_tokens_work_with_boto3(api: httpx.Client, sb: Sandbox) -> None:
    before = sb.s3_token_requests
    tok = S3TransferTokens.model_validate(api.get("/S3TransferTokens/0001/app1").json())
    assert sb.s3_token_requests == before + 1
    assert tok.writePaths == [f"{sb.bucket}/0001/app1/in/"]
    assert tok.readPaths == [f"{sb.bucket}/0001/app1/in_arcv/", f"{sb.bucket}/0001/app1/out/"]
    left = (tok.credentials.expiration - datetime.now(timezone.utc)).total_seconds()
    assert 3500 < left <= 3600 and tok.credentials.expiration.utcoffset() is not None

    s3 = temp_s3(sb, tok)
    data = os.urandom(50_000)
    s3.put_object(Bucket=sb.bucket, Key="0001/app1/in/direct.bin", Body=data)
    entry = wait_for(lambda: next((u for u in sb.uploads() if u.key == "0001/app1/in/direct.bin"), None))
    assert entry.transport == "s3" and entry.sha256 == hashlib.sha256(data).hexdigest()
    rec = wait_final(api, entry.tracking_id)
    assert rec.fileName == "direct.bin" and rec.fileSize == len(data) and rec.downstreamStatus == "ACCEPTED"
    # Read paths are readable with the same credentials; the archive holds the bytes.
    assert s3.get_object(Bucket=sb.bucket, Key=f"0001/app1/in_arcv/{rec.arcvFileName}")["Body"].read() == data
    # Outside the grant: refused like AWS would.
    for call in (lambda: s3.put_object(Bucket=sb.bucket, Key="0001/app1/out/x.txt", Body=b"x"),
                 lambda: s3.put_object(Bucket=sb.bucket, Key="0001/app2/in/x.txt", Body=b"x"),
                 lambda: s3.list_objects_v2(Bucket=sb.bucket, Prefix="0002/")):
        with pytest.raises(ClientError) as exc:
            call()
        assert exc.value.response["Error"]["Code"] == "AccessDenied"


def test_sftp_metadata_marks_transport(api: httpx.Client, sb: Sandbox) -> None:
    sb.admin_s3.put_object(Bucket=sb.bucket, Key="0001/app1/in/via_sftp.txt", Body=b"sftp bytes",
                           Metadata={"filex-transport": "sftp"})
    entry = wait_for(lambda: next((u for u in sb.uploads() if u.key == "0001/app1/in/via_sftp.txt"), None))
    assert entry.transport == "sftp"
    assert track(api, entry.tracking_id).userName == sb.sftp_username


# ---------------------------------------------------------------------- faults
def test_fault_status_with_retry_after(api: httpx.Client, sb: Sandbox) -> None:
    r = httpx.post(sb.api_base_url + "/_sandbox/faults", timeout=TIMEOUT,
                   json={"kind": "status", "status": 503, "count": 2, "retry_after": 1, "path_prefix": "/files"})
    assert r.status_code == 200
    assert api.get("/tracking").status_code == 200  # other paths untouched
    for _ in range(2):
        r = api.get("/files/0001")
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert api.get("/files/0001").status_code == 200


def test_fault_clear_over_http(api: httpx.Client, sb: Sandbox) -> None:
    sb.inject_fault(kind="status", status=500, count=5)
    assert api.get("/files/0001").status_code == 500
    assert httpx.delete(sb.api_base_url + "/_sandbox/faults", timeout=TIMEOUT).status_code == 200
    assert api.get("/files/0001").status_code == 200


def test_fault_slow(api: httpx.Client, sb: Sandbox) -> None:
    sb.inject_fault(kind="slow", seconds=0.5, count=1)
    t0 = time.monotonic()
    assert api.get("/files/0001").status_code == 200
    assert time.monotonic() - t0 >= 0.5
    t0 = time.monotonic()
    api.get("/files/0001")
    assert time.monotonic() - t0 < 0.5


def test_fault_revoke_tokens(api: httpx.Client, sb: Sandbox) -> None:
    assert api.get("/files/0001").status_code == 200
    httpx.post(sb.api_base_url + "/_sandbox/faults", json={"kind": "revoke_tokens"}, timeout=TIMEOUT)
    assert api.get("/files/0001").status_code == 401
    fresh = get_token(sb)
    assert api.get("/files/0001", headers={"Authorization": f"Bearer {fresh}"}).status_code == 200


def test_fault_presign_expire_now(api: httpx.Client, sb: Sandbox) -> None:
    sb.inject_fault(kind="presign_expire_now", count=1)
    p = PresignedUrl.model_validate(api.put("/files/0001/app1/in/expired.txt").json())
    assert p.expirationTime is not None and p.expirationTime < datetime.now(timezone.utc)
    r = httpx.put(p.url, content=b"late", timeout=TIMEOUT)
    assert r.status_code == 403 and "Request has expired" in r.text
    assert "Contents" not in sb.admin_s3.list_objects_v2(Bucket=sb.bucket, Prefix="0001/app1/in/expired")
    # Only the next one: a fresh URL works again.
    p2 = PresignedUrl.model_validate(api.put("/files/0001/app1/in/expired.txt").json())
    assert httpx.put(p2.url, content=b"late", timeout=TIMEOUT).status_code == 200
    assert wait_final(api, p2.trackingId or "").fileSize == 4


def test_presigned_url_refused_after_its_expiry(api: httpx.Client, sb: Sandbox) -> None:
    p = PresignedUrl.model_validate(api.put("/files/0001/app1/in/old.txt").json())
    # Moto ignores signatures; the guard judges X-Amz-Date + X-Amz-Expires, as AWS does.
    parts = urlsplit(p.url)
    q = dict(parse_qsl(parts.query))
    q["X-Amz-Date"] = (datetime.now(timezone.utc) - timedelta(hours=1)).strftime("%Y%m%dT%H%M%SZ")
    old = urlunsplit(parts._replace(query=urlencode(q)))
    r = httpx.put(old, content=b"x", timeout=TIMEOUT)
    assert r.status_code == 403 and "<Code>AccessDenied</Code>" in r.text


def test_fault_s3_creds_expire_now(api: httpx.Client, sb: Sandbox) -> None:
    httpx.post(sb.api_base_url + "/_sandbox/faults", json={"kind": "s3_creds_expire_now"}, timeout=TIMEOUT)
    tok = S3TransferTokens.model_validate(api.get("/S3TransferTokens/0001/app1").json())
    assert tok.credentials.expiration <= datetime.now(timezone.utc)
    with pytest.raises(ClientError) as exc:
        temp_s3(sb, tok).put_object(Bucket=sb.bucket, Key="0001/app1/in/never.txt", Body=b"x")
    assert exc.value.response["Error"]["Code"] == "ExpiredToken"
    good = S3TransferTokens.model_validate(api.get("/S3TransferTokens/0001/app1").json())
    assert good.credentials.expiration > datetime.now(timezone.utc)
    temp_s3(sb, good).head_bucket(Bucket=sb.bucket)


def test_s3_checks_content_md5_and_corrupt_fault(api: httpx.Client, sb: Sandbox) -> None:
    tok = S3TransferTokens.model_validate(api.get("/S3TransferTokens/0001/app1").json())
    s3 = temp_s3(sb, tok)
    data = b"filing bytes " * 100
    good = base64.b64encode(hashlib.md5(data).digest()).decode()
    wrong = base64.b64encode(hashlib.md5(data + b"!").digest()).decode()
    for md5, code in ((wrong, "BadDigest"), ("not base64!", "InvalidDigest")):
        with pytest.raises(ClientError) as exc:
            s3.put_object(Bucket=sb.bucket, Key="0001/app1/in/md5-refused.txt", Body=data, ContentMD5=md5)
        assert exc.value.response["Error"]["Code"] == code
    # A byte flipped on the way (fault "corrupt"): refused, and only PUTs take the fault.
    sb.inject_fault("corrupt", target="s3", count=1, path_prefix=f"/{sb.bucket}/0001/app1/in/md5-")
    s3.head_bucket(Bucket=sb.bucket)
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=sb.bucket, Key="0001/app1/in/md5-corrupt.txt", Body=data, ContentMD5=good)
    assert exc.value.response["Error"]["Code"] == "BadDigest"
    assert not any(a.key.endswith("/md5-refused.txt") or a.key.endswith("/md5-corrupt.txt") for a in sb.arrivals())
    s3.put_object(Bucket=sb.bucket, Key="0001/app1/in/md5-ok.txt", Body=data, ContentMD5=good)
    entry = wait_for(lambda: next((u for u in sb.uploads() if u.key == "0001/app1/in/md5-ok.txt"), None))
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError, match="s3"):
        sb.inject_fault("corrupt", target="api")


def test_unknown_fault_kind_is_400(sb: Sandbox) -> None:
    r = httpx.post(sb.api_base_url + "/_sandbox/faults", json={"kind": "nope"}, timeout=TIMEOUT)
    assert r.status_code == 400


# ---------------------------------------------------------------------- lifecycle
def _port_open(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 0), timeout=1):
            return True
    except OSError:
        return False


def test_sftp_false_never_imports_the_sftp_server(tmp_path: Path) -> None:
    # In a fresh interpreter: other tests of this run import the SFTP server on purpose.
    import subprocess

    code = ("import sys; from pathlib import Path; from filex_agent.sandbox import Sandbox\n"
            f"b = Sandbox(Path({str(tmp_path)!r})); b.start(); b.stop()\n"
            "assert 'filex_agent.sandbox.sftp_server' not in sys.modules, 'imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_stop_releases_ports_and_threads(tmp_path: Path) -> None:
    import threading

    before = {t.ident for t in threading.enumerate()}
    box = Sandbox(tmp_path)
    box.start()
    api_url, s3_url = box.api_base_url, box.s3_endpoint_url
    assert _port_open(api_url) and _port_open(s3_url)
    assert box.sftp is None
    box.stop()
    assert not _port_open(api_url) and not _port_open(s3_url)
    # A handler thread of a connection just closed (the probes above) may take a moment to see EOF.
    wait_for(lambda: not [t for t in threading.enumerate() if t.ident not in before and t.is_alive()],
             timeout=5)


def test_main_prints_urls_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "filex_agent.sandbox", "--data-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        r = httpx.post(info["fip_token_url"], params={"grant_type": "client_credentials"},
                       auth=(info["client_id"], info["client_secret"]), timeout=TIMEOUT)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert not _port_open(info["api_base_url"])
        _, err = proc.communicate(timeout=5)
        assert info["client_secret"] not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sftp_hook_starts_and_stops_the_sftp_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The real SFTP server is another module; this checks only the sandbox's side of the contract.
    import types

    events: list[str] = []

    class FakeSftp:
        def __init__(self, sandbox: Sandbox) -> None:
            assert sandbox.s3_endpoint_url and sandbox.sftp_username == "sandbox-prime"
            assert sandbox.sftp_password and sandbox.entitlements["0001"] == ["app1", "app2"]

        def start(self) -> None:
            events.append("start")

        def stop(self) -> None:
            events.append("stop")

    mod = types.ModuleType("filex_agent.sandbox.sftp_server")
    mod.SandboxSftpServer = FakeSftp  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "filex_agent.sandbox.sftp_server", mod)
    with Sandbox(tmp_path, sftp=True) as box:
        assert isinstance(box.sftp, FakeSftp) and events == ["start"]
    assert events == ["start", "stop"] and box.sftp is None


def test_processor_retries_an_object_it_could_not_read(api: httpx.Client, sb: Sandbox,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    proc = sb._processor
    assert proc is not None
    real = proc._process
    failed: list[str] = []

    def flaky(obj: dict[str, Any]) -> None:
        if obj["Key"].endswith("flaky.txt") and len(failed) < 2:
            failed.append(obj["Key"])
            raise ClientError({"Error": {"Code": "InternalError", "Message": "boom"}}, "GetObject")
        real(obj)

    monkeypatch.setattr(proc, "_process", flaky)
    tid = rest_upload(api, "0001", "app1", "flaky.txt", b"flaky")
    rec = wait_final(api, tid)
    assert len(failed) == 2 and rec.fileSize == 5
    assert len([u for u in sb.uploads() if u.tracking_id == tid]) == 1


# ---------------------------------------------------------------------- strict like fileX's documents
def s3_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def test_transfer_token_cannot_read_in(api: httpx.Client, sb: Sandbox) -> None:
    tok = S3TransferTokens.model_validate(api.get("/S3TransferTokens/0001/app1").json())
    s3 = temp_s3(sb, tok)
    # A lagging fileX keeps the object in in/, so refusal is not "it is gone already".
    sb.receive_lag = 30
    try:
        s3.put_object(Bucket=sb.bucket, Key="0001/app1/in/secret.txt", Body=b"filed")
        assert sb.admin_s3.head_object(Bucket=sb.bucket, Key="0001/app1/in/secret.txt")["ContentLength"] == 5
        with pytest.raises(ClientError) as exc:
            s3.head_object(Bucket=sb.bucket, Key="0001/app1/in/secret.txt")
        assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
        with pytest.raises(ClientError) as exc:
            s3.get_object(Bucket=sb.bucket, Key="0001/app1/in/secret.txt")
        assert s3_code(exc) == "AccessDenied"
        for prefix in ("0001/app1/in/", "0001/app1/in/secret", "0001/app1/", "0001/app1/in"):
            with pytest.raises(ClientError) as exc:
                s3.list_objects_v2(Bucket=sb.bucket, Prefix=prefix)
            assert s3_code(exc) == "AccessDenied", prefix
        # Only writing: no delete, no copy, no multipart listing, no reading parts.
        with pytest.raises(ClientError) as exc:
            s3.delete_object(Bucket=sb.bucket, Key="0001/app1/in/secret.txt")
        assert s3_code(exc) == "AccessDenied"
        with pytest.raises(ClientError) as exc:
            s3.copy_object(Bucket=sb.bucket, Key="0001/app1/in/copy.txt",
                           CopySource={"Bucket": sb.bucket, "Key": "0001/app1/in/secret.txt"})
        assert s3_code(exc) == "AccessDenied"
        with pytest.raises(ClientError) as exc:
            s3.list_multipart_uploads(Bucket=sb.bucket, Prefix="0001/app1/in/")
        assert s3_code(exc) == "AccessDenied"
        up = s3.create_multipart_upload(Bucket=sb.bucket, Key="0001/app1/in/mp.bin")["UploadId"]
        s3.upload_part(Bucket=sb.bucket, Key="0001/app1/in/mp.bin", UploadId=up, PartNumber=1, Body=b"p")
        with pytest.raises(ClientError) as exc:
            s3.list_parts(Bucket=sb.bucket, Key="0001/app1/in/mp.bin", UploadId=up)
        assert s3_code(exc) == "AccessDenied"
        s3.abort_multipart_upload(Bucket=sb.bucket, Key="0001/app1/in/mp.bin", UploadId=up)
    finally:
        sb.receive_lag = 0
    entry = wait_for(lambda: next((u for u in sb.uploads() if u.key == "0001/app1/in/secret.txt"), None))
    rec = wait_final(api, entry.tracking_id)
    # out/ and in_arcv/ are readable and listable with the same token.
    sb.admin_s3.put_object(Bucket=sb.bucket, Key="0001/app1/out/readable.txt", Body=b"out")
    assert s3.get_object(Bucket=sb.bucket, Key="0001/app1/out/readable.txt")["Body"].read() == b"out"
    assert s3.head_object(Bucket=sb.bucket, Key=f"0001/app1/in_arcv/{rec.arcvFileName}")["ContentLength"] == 5
    for prefix in ("0001/app1/out/", "0001/app1/in_arcv/"):
        assert s3.list_objects_v2(Bucket=sb.bucket, Prefix=prefix)["KeyCount"] >= 1
    # The sandbox's own admin calls are not bound by any grant.
    assert "Contents" in sb.admin_s3.list_objects_v2(Bucket=sb.bucket, Prefix="0001/app1/")


def test_presigned_put_url_cannot_read_or_write_elsewhere(api: httpx.Client, sb: Sandbox) -> None:
    sb.receive_lag = 30
    try:
        p = PresignedUrl.model_validate(api.put("/files/0001/app2/in/only-put.txt").json())
        assert httpx.put(p.url, content=b"bytes", timeout=TIMEOUT).status_code == 200
        for method in ("GET", "HEAD", "DELETE"):
            r = httpx.request(method, p.url, timeout=TIMEOUT)
            assert r.status_code == 403, method
        other = p.url.replace("/only-put.txt", "/elsewhere.txt")
        assert httpx.put(other, content=b"x", timeout=TIMEOUT).status_code == 403
        # A GET URL for out/ cannot write there either.
        sb.admin_s3.put_object(Bucket=sb.bucket, Key="0001/app2/out/fb.txt", Body=b"fb")
        g = PresignedUrl.model_validate(api.get("/files/0001/app2/out/fb.txt").json())
        assert httpx.get(g.url, timeout=TIMEOUT).content == b"fb"
        assert httpx.put(g.url, content=b"overwrite", timeout=TIMEOUT).status_code == 403
    finally:
        sb.receive_lag = 0
    assert wait_final(api, p.trackingId or "").fileSize == 5
    assert not any(u.key.endswith("/elsewhere.txt") for u in sb.uploads())


# ---------------------------------------------------------------------- faults after the side effect
def test_s3_status_after_stores_the_object_and_answers_5xx(api: httpx.Client, sb: Sandbox) -> None:
    tok = S3TransferTokens.model_validate(api.get("/S3TransferTokens/0001/app1").json())
    s3 = temp_s3(sb, tok)
    data = os.urandom(20_000)
    sb.inject_fault("status", target="s3", after=True, status=500, operation="PutObject",
                    path_prefix=f"/{sb.bucket}/0001/app1/in/after-")
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=sb.bucket, Key="0001/app1/in/after-status.bin", Body=data)
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 500
    entry = wait_for(lambda: next((u for u in sb.uploads() if u.key == "0001/app1/in/after-status.bin"), None))
    assert entry.sha256 == hashlib.sha256(data).hexdigest() and entry.size == len(data)
    assert [a.operation for a in sb.arrivals() if a.key == "0001/app1/in/after-status.bin"] == ["PutObject"]


def test_s3_drop_after_stores_the_object_and_closes_the_connection(api: httpx.Client, sb: Sandbox) -> None:
    data = b"dropped answer"
    r = httpx.post(sb.api_base_url + "/_sandbox/faults", timeout=TIMEOUT,
                   json={"kind": "drop", "target": "s3", "after": True, "method": "PUT",
                         "path_prefix": f"/{sb.bucket}/0001/app1/in/drop-after"})
    assert r.status_code == 200
    p = PresignedUrl.model_validate(api.put("/files/0001/app1/in/drop-after.txt").json())
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        httpx.put(p.url, content=data, timeout=TIMEOUT)
    rec = wait_final(api, p.trackingId or "")
    assert rec.fileSize == len(data)
    assert upload_entry(sb, p.trackingId or "").sha256 == hashlib.sha256(data).hexdigest()


def test_s3_drop_before_stores_nothing(api: httpx.Client, sb: Sandbox) -> None:
    sb.inject_fault("drop", target="s3", path_prefix=f"/{sb.bucket}/0001/app1/in/drop-before")
    p = PresignedUrl.model_validate(api.put("/files/0001/app1/in/drop-before.txt").json())
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        httpx.put(p.url, content=b"never", timeout=TIMEOUT)
    time.sleep(0.6)  # a few processor cycles
    assert track(api, p.trackingId or "").status == "Request Received"
    assert not any(a.key.endswith("/drop-before.txt") for a in sb.arrivals())


def test_s3_fault_on_complete_multipart_only(api: httpx.Client, sb: Sandbox) -> None:
    """The operation filter picks CompleteMultipartUpload (POST ?uploadId=) and not the parts;
    the upload completes and is filed whole, and the client sees a 503."""
    tok = S3TransferTokens.model_validate(api.get("/S3TransferTokens/0001/app1").json())
    s3 = temp_s3(sb, tok)
    key = "0001/app1/in/mp-after.bin"
    parts = [os.urandom(5 * 1024 * 1024), b"tail"]
    sb.inject_fault("status", target="s3", after=True, operation="CompleteMultipartUpload")
    up = s3.create_multipart_upload(Bucket=sb.bucket, Key=key)["UploadId"]
    etags = [s3.upload_part(Bucket=sb.bucket, Key=key, UploadId=up, PartNumber=i + 1, Body=b)["ETag"]
             for i, b in enumerate(parts)]
    done = {"Parts": [{"ETag": e, "PartNumber": i + 1} for i, e in enumerate(etags)]}
    with pytest.raises(ClientError) as exc:
        s3.complete_multipart_upload(Bucket=sb.bucket, Key=key, UploadId=up, MultipartUpload=done)
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    entry = wait_for(lambda: next((u for u in sb.uploads() if u.key == key), None))
    assert entry.sha256 == hashlib.sha256(b"".join(parts)).hexdigest()
    assert [a.operation for a in sb.arrivals() if a.key == key] == ["CompleteMultipartUpload"]


def test_s3_fault_after_upload_part_keeps_the_part(api: httpx.Client, sb: Sandbox) -> None:
    """UploadPart answered 503 after moto stored the part: completing with that part's ETag works."""
    tok = S3TransferTokens.model_validate(api.get("/S3TransferTokens/0001/app1").json())
    s3 = temp_s3(sb, tok)
    key = "0001/app1/in/part-after.bin"
    body = b"one small last part"
    md5 = hashlib.md5(body, usedforsecurity=False).hexdigest()
    up = s3.create_multipart_upload(Bucket=sb.bucket, Key=key)["UploadId"]
    sb.inject_fault("status", target="s3", after=True, operation="UploadPart", method="PUT")
    with pytest.raises(ClientError) as exc:
        s3.upload_part(Bucket=sb.bucket, Key=key, UploadId=up, PartNumber=1, Body=body)
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    s3.complete_multipart_upload(Bucket=sb.bucket, Key=key, UploadId=up,
                                 MultipartUpload={"Parts": [{"ETag": f'"{md5}"', "PartNumber": 1}]})
    assert wait_for(lambda: next((u for u in sb.uploads() if u.key == key), None)).sha256 == (
        hashlib.sha256(body).hexdigest())


@pytest.mark.parametrize("kind", ["status", "drop"])
def test_api_after_fault_creates_the_tracking_record(api: httpx.Client, sb: Sandbox, kind: str) -> None:
    name = f"api-after-{kind}.txt"
    sb.inject_fault(kind, target="api", after=True, status=502, method="PUT", path_prefix="/files/0001/app1/in/")
    before = {r["trackingId"] for r in sb.tracking_records()}
    if kind == "status":
        r = api.put(f"/files/0001/app1/in/{name}")
        assert r.status_code == 502 and "trackingId" not in r.json()
    else:
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            api.put(f"/files/0001/app1/in/{name}")
    new = [r for r in sb.tracking_records() if r["trackingId"] not in before]
    assert [(r["fileName"], r["status"]) for r in new] == [(name, "Request Received")]
    # The record is visible to the client, who never learnt its id.
    assert any(r["trackingId"] == new[0]["trackingId"] for r in api.get("/tracking").json())
    # One fault, one request: the next works.
    assert api.put(f"/files/0001/app1/in/{name}").status_code == 200


def test_api_drop_before_does_nothing(api: httpx.Client, sb: Sandbox) -> None:
    sb.inject_fault("drop", target="api", method="PUT")
    before = len(sb.tracking_records())
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        api.put("/files/0001/app1/in/api-drop-before.txt")
    assert len(sb.tracking_records()) == before


def test_fault_validation(sb: Sandbox) -> None:
    for kind, kw in (("slow", {"after": True}), ("garbage", {"target": "s3"}), ("status", {"target": "sftp"}),
                     ("drop", {"target": "sftp", "operation": "chmod"}), ("drop", {"target": "ftp"}),
                     ("receive_lag", {"seconds": -1})):
        with pytest.raises(ValueError):
            sb.inject_fault(kind, **kw)


# ---------------------------------------------------------------------- receive lag
def test_receive_lag_delays_every_arrival(api: httpx.Client, sb: Sandbox) -> None:
    r = httpx.post(sb.api_base_url + "/_sandbox/faults", json={"kind": "receive_lag", "seconds": 1.5},
                   timeout=TIMEOUT)
    assert r.status_code == 200 and sb.receive_lag == 1.5
    try:
        p = PresignedUrl.model_validate(api.put("/files/0001/app2/in/lagged-rest.txt").json())
        tok = S3TransferTokens.model_validate(api.get("/S3TransferTokens/0001/app2").json())
        t0 = time.monotonic()
        assert httpx.put(p.url, content=b"rest", timeout=TIMEOUT).status_code == 200
        temp_s3(sb, tok).put_object(Bucket=sb.bucket, Key="0001/app2/in/lagged-s3.txt", Body=b"s3")
        time.sleep(1.0)
        # Not yet taken: REST still "Request Received", S3 has no record, both still in in/.
        assert track(api, p.trackingId or "").status == "Request Received"
        assert not any(r["fileName"] == "lagged-s3.txt" for r in sb.tracking_records())
        keys = [o["Key"] for o in sb.admin_s3.list_objects_v2(Bucket=sb.bucket, Prefix="0001/app2/in/lagged")
                .get("Contents", [])]
        assert sorted(keys) == ["0001/app2/in/lagged-rest.txt", "0001/app2/in/lagged-s3.txt"]
        rec = wait_for(lambda: (x if (x := track(api, p.trackingId or "")).status == "Received by FINRA" else None))
        assert time.monotonic() - t0 >= 1.5
        s3_entry = wait_for(lambda: next((u for u in sb.uploads() if u.key == "0001/app2/in/lagged-s3.txt"), None))
        raw = [x for x in sb.tracking_records() if x["trackingId"] == s3_entry.tracking_id][0]
        # submissionTime is when fileX took it; size and location as in the docs' sample.
        assert raw["submissionTime"] is not None and raw["fileSize"] == 2 and raw["uploadLocation"] == "0001/app2/in"
        assert rec.fileSize == 4 and rec.submissionTime is not None
    finally:
        sb.clear_faults()
    assert sb.receive_lag == 0  # clearing the faults ends the lag too
