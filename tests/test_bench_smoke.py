"""The benchmark (``make bench``) on tiny sizes: every part runs against real local servers and a
RESULTS-like report is written (to tmp, never over bench/RESULTS.md). Plus the report's verdicts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import Stat, percentile, stat
from bench.parts import BigRow, LatencyRow, SmallRow
from bench.report import Results, targets

ROOT = Path(__file__).resolve().parents[1]


def _s(v: float) -> Stat:
    return Stat(v, v, v, 1)


def _results(**kw) -> Results:
    return Results(command="x", machine={}, versions={}, settings={}, servers={}, big_mib=1024, small_files=1000, **kw)


def test_percentile_and_stat():
    vals = [float(i) for i in range(1, 201)]
    assert percentile(vals, 50) == 100.0
    assert percentile(vals, 99) == 198.0
    assert percentile([3.0], 99) == 3.0
    s = stat([5.0, 1.0, 3.0])
    assert (s.median, s.lo, s.hi, s.n) == (3.0, 1.0, 5.0, 3)
    assert s.fmt() == "3 (1–5)"


def test_targets_are_judged_from_the_numbers():
    big = [
        BigRow("s3", "agent S3Transport", True, _s(89), None, _s(150)),
        BigRow("s3", "aws s3 cp", False, _s(80), None, _s(60)),
        BigRow("s3", "boto3 upload_file tuned", False, _s(100), None, _s(60)),
        BigRow("sftp", "agent SftpTransport", True, _s(150), None, _s(60)),
        BigRow("sftp", "OpenSSH sftp -b (aes128-gcm@openssh.com)", False, _s(400), None, _s(3)),
        BigRow("sftp", "OpenSSH sftp -b (aes256-gcm@openssh.com)", False, _s(360), None, _s(3)),
        BigRow("sftp", "rclone copyto over sftp", False, _s(900), None, _s(80)),
    ]
    small = [SmallRow("sftp", "agent daemon", True, _s(700)), SmallRow("sftp", "rclone copy over sftp", False, _s(700))]
    rows = targets(_results(big=big, small=small))
    assert len(rows) == 4
    s3_speed, s3_rss, sftp_big, sftp_small = rows
    assert "0.89×" in s3_speed[1] and "NOT MET" in s3_speed[2]  # 89 < 0.9 × max(80, 100)
    assert "MET" in s3_rss[2] and "NOT" not in s3_rss[2]  # 150 MiB < 200 MB
    assert "0.38×" in sftp_big[1] and "NOT MET" in sftp_big[2]  # vs the best OpenSSH cipher, not rclone
    assert "1.00×" in sftp_small[1] and "NOT" not in sftp_small[2]


def test_rss_over_the_limit_is_not_met():
    big = [BigRow("s3", "agent S3Transport", True, _s(100), None, Stat(150, 150, 195, 3)),
           BigRow("s3", "boto3 upload_file", False, _s(100), None, _s(60))]
    rss = targets(_results(big=big))[1]
    assert "NOT MET" in rss[2]  # 195 MiB = 204 MB


def test_latency_p99_is_judged_against_the_stability_window():
    idle = LatencyRow("rest", 200, 0.5, 0.6, 0.7, 0.8, 0.8, 0.99)
    busy = LatencyRow("rest", 200, 0.5, 0.6, 0.7, 0.8, 0.9, 16.0, backlog=3000, poll_seconds=1.0)
    a, b = targets(_results(latency=[idle, busy]))
    assert "MET" in a[2] and "NOT" not in a[2]  # 0.99 s <= 0.5 + 0.5
    assert "NOT MET" in b[2] and "3,000 awaiting" in b[0]


@pytest.mark.timeout(240)
def test_whole_bench_on_tiny_sizes(tmp_path):
    out = tmp_path / "RESULTS.md"
    official = ROOT / "bench" / "RESULTS.md"
    before = official.read_bytes() if official.exists() else None
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--no-install", "--runs", "1", "--big-mib", "2", "--small-files", "10",
         "--latency-files", "5", "--latency-interval", "0.1", "--tracking-backlog", "30", "--queued-files", "300", "--queue-timeout", "60",
         "--idle-seconds", "1", "--backlog-seconds", "0.5", "--stop-wait", "3", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    for heading in ("## Targets", "## Agent / best peer", "## Machine and versions", "## 1. One 2 MiB file",
                    "## 2. 10 small files", "## 3. Latency", "## 4. Memory with a backlog", "## 5. Ceilings"):
        assert heading in text, heading
    assert "failed" not in text.lower()
    assert "| REST (pre-signed PUT) | **agent RestTransport" in text
    assert "| 300 | 300 |" in text  # the whole backlog was queued
    assert "% of one core" in text
    if shutil.which("curl"):
        assert "curl -T on a pre-signed URL" in text
    from tests.sshd_fixture import skip_reason

    if skip_reason() is None:
        assert "| SFTP | **agent SftpTransport" in text and "OpenSSH sftp -b" in text
        assert "SFTP: 1 GiB upload ≥ 0.40×" in text
    else:
        assert "skipped SFTP" in text
    assert "S3: agent peak RSS < 200 MB" in text
    assert (official.read_bytes() if official.exists() else None) == before
