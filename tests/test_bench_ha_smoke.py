"""``python -m bench.ha`` (issue 12's figures) on minimal sizes so that it does not rot: one failover
of each kind on 2 agents sharing a real PostgreSQL, 20 files on SQLite and on 1 and 2 agents. The
report goes to tmp, never over bench/RESULTS.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pg_fixture import skip_reason

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_bench_ha_on_minimal_sizes(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\nkept\n")
    official = ROOT / "bench" / "RESULTS.md"
    before = official.read_bytes() if official.exists() else None
    proc = subprocess.run([sys.executable, "-m", "bench.ha", "--repeats", "1", "--failover-nodes", "2",
                           "--files", "20", "--nodes", "1,2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert text.startswith("# Benchmark results\n\nkept\n")  # its own section, the rest kept
    assert text.count("<!-- bench.ha:start -->") == 1 and "<!-- bench.ha:end -->" in text
    assert "`python -m bench.ha --repeats 1 --failover-nodes 2 --files 20 --nodes 1,2 --out " in text
    assert re.search(r"load average \(1 min\) at start → end: \*\*[\d.]+ → [\d.]+\*\*", text)
    # One measured failover per case: the rescue and the SUBMITTED time are figures, not dashes.
    before_row = re.search(r"^\| before commit \| 1 \| ([\d.]+) / .* \| ([\d.]+) / .* \| ([\d.]+) / .* \| 1 of 1 \|$",
                           text, re.M)
    assert before_row, text  # before the commit point it is always sent again, by the other node
    took = [float(g) for g in before_row.groups()]
    assert 0 < took[0] <= took[1] <= took[2] < 60
    assert re.search(r"^\| after commit \| 1 \| [\d.]+ / .* \| – / – / – \| [\d.]+ / .* \| [01] of 1 \|$", text, re.M)
    for journal, nodes in (("SQLite \\(default\\)", 1), ("PostgreSQL", 1), ("PostgreSQL", 2)):
        assert re.search(rf"^\| {journal} \| {nodes} \| 20 \| [\d.]+ \| \*\*\d+\*\* \| n1: \d+", text, re.M), journal
    assert (official.read_bytes() if official.exists() else None) == before
