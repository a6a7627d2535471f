"""Benchmark: one big upload to a local moto S3 server by S3Transport, `aws s3 cp` and a tuned
boto3 ``upload_file``. Prints a Markdown table of MB/s and peak RSS of the uploading process.

    /work/main/.venv/bin/python bench/bench_s3.py [--size-mb 1024] [--runs 1]

Each method runs in its own child process so that its peak RSS (``os.wait4`` rusage) is its own;
moto runs in yet another process (it keeps objects in memory). Loopback numbers: compare the
ratios, not the absolutes. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

BUCKET = "sandbox-filex"
ORG, APP = "0001", "bench"
MIB = 1024 * 1024
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _admin(url: str):  # type: ignore[no-untyped-def]
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                        aws_secret_access_key="testing")


# -- children -----------------------------------------------------------------------------------

def child_transport(url: str, path: Path, key_name: str) -> None:
    sys.path.insert(0, str(ROOT))
    import boto3

    from filex_agent.config import S3Settings
    from filex_agent.models import S3Credentials, S3TransferTokens
    from filex_agent.transports.s3 import S3TokenCache, S3Transport

    sts = boto3.client("sts", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                       aws_secret_access_key="testing")

    def fetch(org: str, app: str) -> S3TransferTokens:
        c = sts.get_session_token(DurationSeconds=3600)["Credentials"]
        return S3TransferTokens(
            region="us-east-1", readPaths=[f"{BUCKET}/{org}/{app}/out/"], writePaths=[f"{BUCKET}/{org}/{app}/in/"],
            credentials=S3Credentials(accessKeyId=c["AccessKeyId"], secretAccessKey=c["SecretAccessKey"],
                                      sessionToken=c["SessionToken"],
                                      expiration=datetime.now(timezone.utc) + timedelta(hours=1)))

    t = S3Transport(ORG, APP, tokens=S3TokenCache(fetch, credential="bench"), settings=S3Settings(),
                    endpoint_url=url)
    start = time.perf_counter()
    res = t.upload(path, key_name)
    took = time.perf_counter() - start
    t.close()
    print(json.dumps({"seconds": took, "etag": res.detail["etag"]}))


def child_boto3(url: str, path: Path, key_name: str) -> None:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                          aws_secret_access_key="testing",
                          config=Config(request_checksum_calculation="when_required",
                                        s3={"addressing_style": "path"}))
    cfg = TransferConfig(multipart_threshold=64 * MIB, multipart_chunksize=64 * MIB, max_concurrency=10,
                         preferred_transfer_client="classic")
    start = time.perf_counter()
    client.upload_file(str(path), BUCKET, f"{ORG}/{APP}/in/{key_name}", Config=cfg)
    print(json.dumps({"seconds": time.perf_counter() - start}))


# -- parent -------------------------------------------------------------------------------------

def _hwm_mib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


def _run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in MiB, stdout) of a child process.

    Peak RSS is the child's VmHWM, polled until it exits: rusage's ru_maxrss would carry over the
    parent's RSS through fork+exec on Linux.
    """
    out = tempfile.TemporaryFile()
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, env=env)
    peak = 0
    while p.poll() is None:
        peak = max(peak, _hwm_mib(p.pid) or 0)
        time.sleep(0.02)
    wall = time.perf_counter() - start
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    out.seek(0)
    text = out.read().decode()
    if p.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({p.returncode}):\n{err[-2000:]}")
    return wall, peak, text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--child", choices=["transport", "boto3"])
    ap.add_argument("--url")
    ap.add_argument("--file", type=Path)
    ap.add_argument("--key")
    args = ap.parse_args()
    if args.child == "transport":
        return child_transport(args.url, args.file, args.key)
    if args.child == "boto3":
        return child_boto3(args.url, args.file, args.key)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        admin = _admin(url)
        admin.create_bucket(Bucket=BUCKET)
        data = work / "big.dat"
        with open(data, "wb") as f:
            for _ in range(args.size_mb):
                f.write(os.urandom(MIB))
        size = data.stat().st_size
        aws_env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                       AWS_DEFAULT_REGION="us-east-1", AWS_REQUEST_CHECKSUM_CALCULATION="when_required")
        methods: dict[str, list[str]] = {
            "S3Transport (64 MiB parts, 4 threads, parts hashed as sent, ETags verified)":
                [sys.executable, __file__, "--child", "transport", "--url", url, "--file", str(data), "--key", "t.dat"],
            "aws s3 cp (defaults: 8 MiB parts, 10 threads)":
                [str(BIN / "aws"), "--endpoint-url", url, "s3", "cp", "--only-show-errors", str(data),
                 f"s3://{BUCKET}/{ORG}/{APP}/in/aws.dat"],
            "boto3 upload_file (64 MiB parts, 10 threads)":
                [sys.executable, __file__, "--child", "boto3", "--url", url, "--file", str(data), "--key", "b.dat"],
        }
        rows = []
        for name, cmd in methods.items():
            for run in range(args.runs):
                wall, rss, out = _run(cmd, env=aws_env)
                # Children report the upload time alone; `aws` only has wall time (includes start-up).
                secs = json.loads(out)["seconds"] if out.strip().startswith("{") else wall
                rows.append((name, run + 1, size / MIB / secs, wall, rss))
                for obj in admin.list_objects_v2(Bucket=BUCKET).get("Contents", []):
                    admin.delete_object(Bucket=BUCKET, Key=obj["Key"])  # moto keeps objects in memory
                print(f"{name} run {run + 1}: {size / MIB / secs:.0f} MB/s, peak RSS {rss} MiB", file=sys.stderr)
        print(f"\n{size / MIB:.0f} MiB to moto on loopback, {os.cpu_count()} CPUs\n")
        print("| method | run | MB/s (upload) | wall s (process) | peak RSS MiB |")
        print("|---|---|---|---|---|")
        for name, run, mbs, wall, rss in rows:
            print(f"| {name} | {run} | {mbs:.0f} | {wall:.1f} | {rss} |")
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
