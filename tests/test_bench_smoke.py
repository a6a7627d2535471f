"""The benchmark (``make bench``) on tiny sizes: every part runs against real local servers and a
RESULTS-like report is written (to tmp, never over bench/RESULTS.md). Plus the report's verdicts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import Stat, percentile, stat
from bench.parts import BigRow, IdleResult, LatencyRow, QueueResult, SmallRow
from bench.report import README_END, README_START, Results, targets, targets15, update_readme

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


def test_issue15_targets_per_journal():
    big = [BigRow("sftp", "agent SftpTransport", True, _s(450), None, _s(60), "negotiated aes128-gcm@openssh.com"),
           BigRow("sftp", "OpenSSH sftp -b (aes128-gcm@openssh.com)", False, _s(500), None, _s(3)),
           BigRow("sftp", "OpenSSH sftp -b (aes256-gcm@openssh.com)", False, _s(700), None, _s(3)),
           BigRow("rest", "agent RestTransport", True, _s(80), None, _s(40)),
           BigRow("rest", "curl -T on a pre-signed URL", False, _s(100), None, _s(10))]
    small = [SmallRow("sftp", "agent daemon", True, _s(500), journal="SQLite", minus_window=_s(1100)),
             SmallRow("sftp", "agent daemon", True, _s(300), journal="PostgreSQL", minus_window=_s(400)),
             SmallRow("sftp", "rclone copy over sftp", False, _s(1000)),
             SmallRow("s3", "agent daemon", True, _s(90), journal="SQLite", minus_window=_s(100)),
             SmallRow("s3", "aws s3 cp --recursive", False, _s(280))]
    queue = [QueueResult(100_000, 100_000, 50, 120, 200, 5, 10), QueueResult(100_000, 40_000, 600, 90, 320, 5, 10,
                                                                             journal="PostgreSQL")]
    idle = [IdleResult(60, 0.3, 90), IdleResult(60, 0.5, 90, journal="PostgreSQL", server_cpu_seconds=0.1)]
    latency = [LatencyRow("sftp", 200, 0.5, 0.8, 0.8, 0.9, 0.9, 1.0), LatencyRow("s3", 200, 0.5, 0.8, 0.8, 0.9, 0.9, 1.2)]
    scale = {"SQLite": {10_000: {"a": 10.0, "b": 0.1}, 1_000_000: {"a": 19.0, "b": 1.9}},
             "PostgreSQL": {10_000: {"a": 10.0, "b": 0.1}, 1_000_000: {"a": 25.0, "b": 0.2}}}
    res = _results(big=big, small=small, queue=queue, idle=idle, latency=latency, journals=["SQLite", "PostgreSQL"],
                   scale=scale, scale_sizes=[10_000, 1_000_000])
    got = targets15(res)

    def verdict(prefix: str, journal: str) -> str:
        return next(r for t, j, _, r in got if t.startswith(prefix) and j == journal)

    assert verdict("SFTP: 1,000 small", "SQLite") == "**MET**"  # 1100 / 1000, the window subtracted
    assert verdict("SFTP: 1,000 small", "PostgreSQL") == "**NOT MET**"
    assert verdict("S3 direct: 1,000 small", "SQLite") == "**NOT MET**"
    assert verdict("S3 direct: 1,000 small", "PostgreSQL") == "not run"  # no PostgreSQL row for S3
    assert verdict("SFTP: 1 GiB", "–") == "**MET**"  # 0.9× aes128-gcm, not the faster aes256-gcm row
    assert verdict("REST: 1 GiB", "–") == "**NOT MET**"  # 0.8×
    assert verdict("100,000 files queued: daemon RSS", "SQLite") == "**MET**"
    assert verdict("100,000 files queued: daemon RSS", "PostgreSQL") == "**NOT MET**"  # 320 MiB > 300 MB
    assert verdict("100,000 files queued: all queued", "SQLite") == "**MET**"
    assert verdict("100,000 files queued: all queued", "PostgreSQL") == "**NOT MET**"
    assert verdict("Journal at scale", "SQLite") == "**MET**"  # 1.9×; 1.9 ms against 1 ms
    assert verdict("Journal at scale", "PostgreSQL") == "**NOT MET**"  # 2.5×
    assert verdict("Idle daemon", "SQLite") == "**MET**" and verdict("Idle daemon", "PostgreSQL") == "**MET**"
    assert verdict("Drop → uploaded p99", "SQLite") == "**NOT MET**"  # S3 1.2 s > 1.0 s
    nothing = targets15(_results(parts=set()))  # no part run: one "not run" row per target
    assert len(nothing) == 9 and {r for _, _, _, r in nothing} == {"not run"}


def test_readme_quotes_the_targets_table_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n\nintro\n\n{README_START}\nold table\n{README_END}\n\nafter\n")
    res = _results(small=[SmallRow("sftp", "agent daemon", True, _s(500), minus_window=_s(1100)),
                          SmallRow("sftp", "rclone copy over sftp", False, _s(1000))])
    assert update_readme(readme, res)
    text = readme.read_text()
    assert "old table" not in text and text.count(README_START) == 1 and text.endswith("\n\nafter\n")
    assert "| target | journal | measured | result |" in text and "1100 vs 1000 files/s" in text
    assert "bench/RESULTS.md" in text
    bare = tmp_path / "other.md"
    bare.write_text("no markers\n")
    assert not update_readme(bare, res) and bare.read_text() == "no markers\n"


@pytest.mark.timeout(240)
def test_whole_bench_on_tiny_sizes(tmp_path):
    out = tmp_path / "RESULTS.md"
    official = ROOT / "bench" / "RESULTS.md"
    before = official.read_bytes() if official.exists() else None
    readme = (ROOT / "README.md").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--no-install", "--runs", "1", "--big-mib", "2", "--small-files", "10",
         "--latency-files", "5", "--latency-interval", "0.1", "--queued-files", "300", "--queue-timeout", "60",
         "--idle-seconds", "1", "--backlog-seconds", "0.5", "--stop-wait", "3", "--scale-sizes", "100,200",
         "--scale-runs", "1", "--scale-work", str(tmp_path / "scale"), "--journal", "sqlite", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    for heading in ("## Targets (issue 15)", "## Targets (issues 3 and 4)", "## Agent / best peer", "## Machine and versions", "## 1. One 2 MiB file",
                    "## 2. 10 small files", "## 3. Latency", "## 4. Memory with a backlog", "## 5. Ceilings",
                    "## Journal at scale (issue 15)"):
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
    assert (ROOT / "README.md").read_bytes() == readme  # quoted only from the official RESULTS.md


@pytest.mark.timeout(240)
def test_bench_with_the_postgresql_journal(tmp_path):
    """Parts 2, 4 and 6 with a PostgreSQL journal (its own cluster, fsync on) beside SQLite's."""
    from tests.pg_fixture import skip_reason

    if skip_reason():
        pytest.skip(skip_reason())
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--no-install", "--parts", "2,4,6", "--transports", "s3", "--runs", "1",
         "--small-files", "5", "--queued-files", "40", "--queue-timeout", "60", "--idle-seconds", "1",
         "--backlog-seconds", "0.5", "--stop-wait", "3", "--scale-sizes", "100,200", "--scale-runs", "1",
         "--scale-work", str(tmp_path / "scale"), "--journal", "sqlite,postgres", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert "failed" not in text.lower()
    assert "| S3 direct | **agent daemon: drop → last uploaded** | PostgreSQL |" in text
    assert "| PostgreSQL | 40 | 40 |" in text  # part 4: the whole backlog queued
    assert "- PostgreSQL journal: **" in text  # idle CPU
    assert "### PostgreSQL" in text  # journal at scale
    assert "| Idle daemon: CPU < 1% of one core | PostgreSQL |" in text
    assert "| SFTP: 1 GiB upload ≥ 0.8× OpenSSH `sftp` with the same cipher | – | – | not run |" in text
