"""Entry points of the child processes that do the uploads (``python -m bench.children KIND ...``).

Each upload runs in its own process so that its peak RSS is its own. Every child prints one JSON
line: ``seconds`` is the time of the upload call(s) alone (no interpreter start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

# Not bench.common's ROOT: its imports (statistics, subprocess, tempfile) would count in every
# child's start-up, and curl's start-up has nothing of the kind.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def agent(config: Path, route_name: str, file: Path, name: str) -> dict[str, object]:
    """The agent's own transport for a route, built exactly as the daemon builds it."""
    from filex_agent.config import load_config
    from filex_agent.connections import Connections

    cfg = load_config(config)
    route = cfg.route(route_name)
    conns = Connections(cfg)
    try:
        transport = conns.transport(route)
        start = time.perf_counter()
        res = transport.upload(file, name)
        took = time.perf_counter() - start
        transport.close()
    finally:
        conns.close()
    extra = {}
    session = getattr(transport, "session", None)
    if session is not None and getattr(session, "negotiated", None):
        extra["cipher"] = session.negotiated.get("cipher")
    return {"seconds": took, "size": res.size, **extra}


def agent_s3(endpoint: str, file: Path, name: str, bucket: str) -> dict[str, object]:
    """S3Transport with its default settings; static credentials stand in for /S3TransferTokens."""
    from filex_agent.config import S3Settings
    from filex_agent.models import S3Credentials, S3TransferTokens
    from filex_agent.transports.s3 import S3TokenCache, S3Transport

    key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]

    def fetch(org: str, app: str) -> S3TransferTokens:
        return S3TransferTokens(
            region="us-east-1", readPaths=[f"{bucket}/{org}/{app}/out/"], writePaths=[f"{bucket}/{org}/{app}/in/"],
            credentials=S3Credentials(accessKeyId=key, secretAccessKey=secret, sessionToken="bench-session",
                                      expiration=datetime.now(timezone.utc) + timedelta(hours=1)))

    t = S3Transport("0001", "app2", tokens=S3TokenCache(fetch, credential="bench"), settings=S3Settings(),
                    endpoint_url=endpoint)
    start = time.perf_counter()
    res = t.upload(file, name)
    took = time.perf_counter() - start
    t.close()
    return {"seconds": took, "size": res.size, "integrity": res.detail.get("integrity")}


def agent_rest(url_file: Path, file: Path, name: str) -> dict[str, object]:
    """RestTransport.upload with the daemon's default network settings, its PUT going to a
    pre-signed URL of the S3 server under test. Only fileX's "give me an upload URL" call is
    stubbed (in process, answering with that URL): the streaming, hashing-as-sent, on_commit,
    retry and answer checks are the transport's own code."""
    from filex_agent.config import NetworkSettings
    from filex_agent.http import RetryPolicy, make_http_client
    from filex_agent.models import PresignedUrl
    from filex_agent.transports.rest import RestTransport

    url = url_file.read_text().strip()

    class UrlStub:
        def upload_url(self, org: str, app: str, remote: str, metadata: object = None) -> PresignedUrl:
            return PresignedUrl(url=url, trackingId=f"bench-{remote}")

    net = NetworkSettings()
    http = make_http_client(net)
    t = RestTransport("0001", "app1", api=UrlStub(), http=http, retry=RetryPolicy.from_settings(net))  # type: ignore[arg-type]
    try:
        start = time.perf_counter()
        res = t.upload(file, name)
        took = time.perf_counter() - start
    finally:
        http.close()
    return {"seconds": took, "size": res.size, "sent_sha256": res.sent_sha256}


def rest_loop(token_url: str, api: str, client_id: str, secret_file: Path, org: str, app: str,
              folder: Path) -> dict[str, object]:
    """What a firm would script by hand: one token, then per file ask for a URL and PUT the bytes."""
    import httpx

    files = sorted(p for p in folder.iterdir() if p.is_file())
    with httpx.Client(timeout=60) as http:
        start = time.perf_counter()
        tok = http.post(token_url, params={"grant_type": "client_credentials"},
                        auth=(client_id, secret_file.read_text().strip()))
        tok.raise_for_status()
        headers = {"Authorization": f"Bearer {tok.json()['access_token']}"}
        for p in files:
            r = http.put(f"{api}/files/{org}/{app}/in/{p.name}", headers=headers)
            r.raise_for_status()
            with open(p, "rb") as f:
                put = http.put(r.json()["url"], content=f.read())
            if put.status_code != 200:
                raise SystemExit(f"PUT {p.name}: HTTP {put.status_code}")
        took = time.perf_counter() - start
    return {"seconds": took, "files": len(files)}


def boto3_loop(endpoint: str, bucket: str, prefix: str, folder: Path) -> dict[str, object]:
    """A plain boto3 loop over one client: put_object per file."""
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      config=Config(request_checksum_calculation="when_required", s3={"addressing_style": "path"}))
    files = sorted(p for p in folder.iterdir() if p.is_file())
    start = time.perf_counter()
    for p in files:
        with open(p, "rb") as f:
            s3.put_object(Bucket=bucket, Key=prefix + p.name, Body=f)
    return {"seconds": time.perf_counter() - start, "files": len(files)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.children")
    sub = ap.add_subparsers(dest="kind", required=True)
    a = sub.add_parser("agent")
    a.add_argument("--config", type=Path, required=True)
    a.add_argument("--route", required=True)
    a.add_argument("--file", type=Path, required=True)
    a.add_argument("--name", required=True)
    s = sub.add_parser("agent-s3")
    s.add_argument("--endpoint", required=True)
    s.add_argument("--bucket", required=True)
    s.add_argument("--file", type=Path, required=True)
    s.add_argument("--name", required=True)
    b = sub.add_parser("boto3")
    b.add_argument("--endpoint", required=True)
    b.add_argument("--file", type=Path, required=True)
    b.add_argument("--name", required=True)
    ar = sub.add_parser("agent-rest")
    ar.add_argument("--url-file", type=Path, required=True, help="a 0600 file holding the pre-signed PUT URL")
    ar.add_argument("--file", type=Path, required=True)
    ar.add_argument("--name", required=True)
    r = sub.add_parser("rest-loop")
    r.add_argument("--token-url", required=True)
    r.add_argument("--api", required=True)
    r.add_argument("--client-id", required=True)
    r.add_argument("--secret-file", type=Path, required=True)
    r.add_argument("--org", required=True)
    r.add_argument("--app", required=True)
    r.add_argument("--dir", type=Path, required=True)
    bl = sub.add_parser("boto3-loop")
    bl.add_argument("--endpoint", required=True)
    bl.add_argument("--bucket", required=True)
    bl.add_argument("--prefix", required=True)
    bl.add_argument("--dir", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.kind == "agent":
        out = agent(args.config, args.route, args.file, args.name)
    elif args.kind == "agent-rest":
        out = agent_rest(args.url_file, args.file, args.name)
    elif args.kind == "agent-s3":
        out = agent_s3(args.endpoint, args.file, args.name, args.bucket)
    elif args.kind == "boto3":
        # bench_s3's tuned upload_file: 64 MiB parts, 10 threads, classic transfer client.
        from bench import bench_s3

        bench_s3.child_boto3(args.endpoint, args.file, args.name)
        return 0
    elif args.kind == "rest-loop":
        out = rest_loop(args.token_url, args.api, args.client_id, args.secret_file, args.org, args.app, args.dir)
    else:
        out = boto3_loop(args.endpoint, args.bucket, args.prefix, args.dir)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
