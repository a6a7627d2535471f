"""SFTP upload throughput: SftpTransport (paramiko) vs OpenSSH ``sftp -b``, same local sshd.

    python bench/bench_sftp.py [--size-mib 1024] [--small 1000] [--repeat 2]

Starts a throw-away sshd on 127.0.0.1 (tests/sshd_fixture.py, fileX's algorithms) with its files
in /dev/shm when present, so the disk is not what is measured. Prints a Markdown table.
Loopback on a 2-core machine: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from filex_agent.transports.sftp import SftpSession, SftpTransport  # noqa: E402
from tests.sshd_fixture import Sshd, keygen, skip_reason  # noqa: E402

CIPHER = "aes128-gcm@openssh.com"


def _mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def _clear(d: Path) -> None:
    for p in d.iterdir():
        p.unlink()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--small", type=int, default=1000, help="number of 10 KiB files")
    ap.add_argument("--repeat", type=int, default=2, help="best of N")
    ap.add_argument("--request-sizes", default="32,64,128,255", help="KiB, paramiko write request sizes to try")
    args = ap.parse_args()
    if skip_reason():
        print(skip_reason())
        return 1
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    work = Path(tempfile.mkdtemp(prefix="filex-bench-", dir=base))
    sshd = Sshd(base_dir=base)
    rows: list[tuple[str, str, float]] = []
    try:
        key = keygen(work / "id_ed25519")
        sshd.authorize(key.with_suffix(".pub"))
        sshd.make_layout({"0001": ["app1"]})
        sshd.start()
        in_dir = sshd.root / "0001/app1/in"
        big = work / "big.bin"
        with big.open("wb") as f:
            block = os.urandom(1024 * 1024)
            for _ in range(args.size_mib):
                f.write(block)
        size = big.stat().st_size
        small_dir = work / "small"
        small_dir.mkdir()
        for i in range(args.small):
            (small_dir / f"s_{i:04d}.csv").write_bytes(os.urandom(10 * 1024))

        def session(req: int) -> SftpSession:
            return SftpSession(sshd.host, sshd.port, sshd.login_user, private_key=key,
                               host_key_fingerprints=[sshd.host_key_fingerprint], write_request_size=req)

        for kib in (int(x) for x in args.request_sizes.split(",")):
            best = 0.0
            with session(kib * 1024) as s:
                t = SftpTransport("0001", "app1", session=s, in_path=f"{sshd.root}/{{org}}/{{app}}/in",
                                  out_path=f"{sshd.root}/{{org}}/{{app}}/out")
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    t.upload(big, "big.bin")
                    best = max(best, _mbps(size, time.perf_counter() - t0))
                    _clear(in_dir)
                cipher = s.negotiated["cipher"]
            rows.append((f"SftpTransport, {kib} KiB writes ({cipher})", f"{args.size_mib} MiB", best))

        sftp_bin = shutil.which("sftp")
        ssh_opts = ["-i", str(key), "-P", str(sshd.port), "-c", CIPHER, "-o", f"UserKnownHostsFile={sshd.known_hosts}",
                    "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]
        target = f"{sshd.login_user}@{sshd.host}"
        if sftp_bin:
            batch = work / "batch"
            batch.write_text(f"put {big} {in_dir}/big.bin\n")
            best = 0.0
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                subprocess.run([sftp_bin, "-q", *ssh_opts, "-b", str(batch), target], check=True, capture_output=True)
                best = max(best, _mbps(size, time.perf_counter() - t0))
                _clear(in_dir)
            rows.append((f"OpenSSH sftp -b ({CIPHER})", f"{args.size_mib} MiB", best))

        with session(32 * 1024) as s:
            t = SftpTransport("0001", "app1", session=s, in_path=f"{sshd.root}/{{org}}/{{app}}/in",
                              out_path=f"{sshd.root}/{{org}}/{{app}}/out")
            files = sorted(small_dir.iterdir())
            t0 = time.perf_counter()
            for p in files:
                t.upload(p, p.name)
            dt = time.perf_counter() - t0
            rows.append((f"SftpTransport, {len(files)} x 10 KiB (one connection)", "files/s", len(files) / dt))
        _clear(in_dir)
        if sftp_bin:
            batch = work / "batch_small"
            batch.write_text("".join(f"put {p} {in_dir}/{p.name}\n" for p in files))
            t0 = time.perf_counter()
            subprocess.run([sftp_bin, "-q", *ssh_opts, "-b", str(batch), target], check=True, capture_output=True)
            rows.append((f"OpenSSH sftp -b, {len(files)} x 10 KiB", "files/s", len(files) / (time.perf_counter() - t0)))
    finally:
        sshd.stop()
        shutil.rmtree(work, ignore_errors=True)

    print("| client | size | result |")
    print("|---|---|---|")
    for name, what, value in rows:
        unit = "files/s" if what == "files/s" else "MB/s"
        print(f"| {name} | {what if unit == 'MB/s' else ''} | {value:.0f} {unit} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
