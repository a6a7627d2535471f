from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from filex_agent.audit import GENESIS, AuditLog


def _fill(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.append("submitted", submission_id=i, file=f"f{i}.txt", size=10 * i, route="r1",
                   org="0001", application="app1", transport="rest", tracking_id=f"T{i}")


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_append_and_verify_ok(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "audit.jsonl"  # parent created
    with AuditLog(path) as log:
        rec = log.append("detected", file="a.txt", size=3, sha256="ab" * 32, route="r1")
        assert rec["prev"] == GENESIS
        assert rec["event"] == "detected" and rec["file"] == "a.txt"
        assert datetime.fromisoformat(rec["time"]).tzinfo is not None
        _fill(log, 4)
        res = log.verify()
    assert res.ok and res.lines == 5 and res.first_bad_line is None and res.problem is None
    first = json.loads(_lines(path)[0])
    assert first == rec
    assert path.stat().st_mode & 0o007 == 0  # never world-readable


def test_reserved_fields_refused(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "a.jsonl") as log:
        with pytest.raises(ValueError, match="prev"):
            log.append("x", prev="forged")


@pytest.mark.parametrize("line_no", [1, 3, 5])
def test_edited_field_names_the_line(tmp_path: Path, line_no: int) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        _fill(log, 5)
    lines = _lines(path)
    lines[line_no - 1] = lines[line_no - 1].replace(b'"size":', b'"size":9', 1)
    path.write_bytes(b"".join(lines))
    res = AuditLog(path).verify()
    assert not res.ok
    assert res.first_bad_line == line_no
    assert "edited" in res.problem


def test_edit_with_recomputed_own_hash_breaks_next_line(tmp_path: Path) -> None:
    # A careful forger recomputes the edited line's own hash: the next line's prev catches it.
    import hashlib

    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        _fill(log, 3)
    lines = _lines(path)
    obj = json.loads(lines[0])
    obj["outcome"] = "accepted"
    obj.pop("hash")
    body = json.dumps(obj, separators=(",", ":")).encode()[:-1]
    lines[0] = body + b',"hash":"' + hashlib.sha256(body).hexdigest().encode() + b'"}\n'
    path.write_bytes(b"".join(lines))
    res = AuditLog(path).verify()
    assert (res.ok, res.first_bad_line) == (False, 2)
    assert "deleted, inserted or reordered" in res.problem


def test_deleted_line_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        _fill(log, 5)
    lines = _lines(path)
    del lines[2]
    path.write_bytes(b"".join(lines))
    res = AuditLog(path).verify()
    assert (res.ok, res.first_bad_line, res.lines) == (False, 3, 3)


def test_deleted_first_line_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        _fill(log, 3)
    path.write_bytes(b"".join(_lines(path)[1:]))
    res = AuditLog(path).verify()
    assert (res.ok, res.first_bad_line) == (False, 1)


def test_reorder_detected(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        _fill(log, 5)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))
    res = AuditLog(path).verify()
    assert (res.ok, res.first_bad_line) == (False, 2)


def test_restart_continues_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        _fill(log, 3)
        head = log.head
    with AuditLog(path) as log2:
        rec = log2.append("accepted", submission_id=2, outcome="accepted")
        assert rec["prev"] == head
        assert log2.verify().ok and log2.verify().lines == 4


def test_truncated_last_line_reported_not_repaired(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        _fill(log, 3)
    data = path.read_bytes()
    path.write_bytes(data[:-20])  # crash mid-write of line 3
    with AuditLog(path) as log:
        res = log.verify()
        assert (res.ok, res.first_bad_line, res.lines) == (False, 3, 3)
        assert "truncated" in res.problem
        # Appending after the crash keeps the partial line and still reports it.
        log.append("started")
        res = log.verify()
        assert (res.ok, res.first_bad_line) == (False, 3)
    lines = _lines(path)
    assert len(lines) == 4 and lines[2] == data[:-20].splitlines(keepends=True)[2] + b"\n"
    assert json.loads(lines[3])["event"] == "started"


def test_long_lines_tail_read(tmp_path: Path) -> None:
    # Lines longer than the tail-read chunk must still chain correctly.
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        log.append("feedback", feedback_files=[f"/srv/filex/fb/{i:05d}.txt" for i in range(1000)])
        log.append("feedback", feedback_files=["x" * 20000])
    with AuditLog(path) as log:
        log.append("done")
        assert log.verify().ok


def test_read_since(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        log.append("old")
        time.sleep(0.01)
        cut = datetime.now(timezone.utc)
        time.sleep(0.01)
        log.append("new1")
        log.append("new2")
        assert [r["event"] for r in log.read()] == ["old", "new1", "new2"]
        assert [r["event"] for r in log.read(since=cut)] == ["new1", "new2"]
        naive_utc = cut.replace(tzinfo=None)
        assert [r["event"] for r in log.read(since=naive_utc)] == ["new1", "new2"]
        assert list(log.read(since=cut + timedelta(hours=1))) == []


def test_concurrent_appends_keep_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    other = AuditLog(path)  # a second handle on the same file (like the CLI beside the daemon)

    def work(target: AuditLog, t: int) -> None:
        for i in range(50):
            target.append("submitted", thread=t, i=i)

    threads = [threading.Thread(target=work, args=(log if t % 2 else other, t)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res = log.verify()
    assert res.ok and res.lines == 300
    seen = {(r["thread"], r["i"]) for r in log.read()}
    assert len(seen) == 300
    log.close()
    other.close()

