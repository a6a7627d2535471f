"""Chaos: the daemon, a separate process, SIGKILLed at random moments while fileX misbehaves.

The proof of issue 5: a few hundred files dropped across every transport's route, the daemon
killed with SIGKILL at least 20 times (some kills land during start-up and recovery, two in a
row), sandbox faults armed all along (5xx bursts, 429 + Retry-After, slow answers, revoked
tokens, pre-signed URLs and S3 credentials that expire at once, S3 5xx). Then it is let finish
and the test counts what fileX really received:

- every file submitted exactly once (the sandbox's upload log, and for REST/S3 every object the
  S3 endpoint confirmed in ``in/``), whole (sha256);
- none lost: each file has exactly one journal row, in its expected final state, and its
  original sits in the matching folder; nothing is left in the outbox or the spool;
- every feedback file in ``out`` is filed exactly once, linked to its submission.

Seeded: ``FILEX_CHAOS_SEED=<n>`` replays a run (the seed is printed, and shown on failure).
``FILEX_CHAOS_FILES`` / ``FILEX_CHAOS_KILLS`` change the size of the run.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from filex_agent.config import load_config
from filex_agent.sandbox import Sandbox
from filex_agent.sandbox.agent_config import write_sandbox_config
from filex_agent.sandbox.processor import outcome_for
from tests.conftest import sftp_supported

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = {"ACCEPTED": "accepted", "REJECTED": "rejected", "PARTIALLY_REJECTED": "rejected"}


def _config(sb: Sandbox, data_dir: Path, journal: dict | None = None) -> Path:
    path = write_sandbox_config(sb, data_dir, poll_seconds=0.5, stable_seconds=0.3, journal=journal)
    text = path.read_text()
    # Tighter than the generated defaults: a short settle period after a crash, small grace.
    for old, new in [
        ("shutdown_grace_seconds = 10", "shutdown_grace_seconds = 5\nworkers = 4"),
        ("poll_interval_seconds = 0.5", "poll_interval_seconds = 0.5\nmatch_timeout_seconds = 4\nbatch_threshold = 1"),
    ]:
        assert old in text, f"generated config changed: {old!r} not found"
        text = text.replace(old, new)
    path.write_text(text)
    return path


def _faults(rng: random.Random) -> list[tuple[str, dict]]:
    prefix = rng.choice(["/files", "/tracking", "/S3TransferTokens", "/fip", None])
    return [
        ("status", {"status": 503, "count": rng.randint(2, 6), "path_prefix": prefix}),
        ("status", {"status": 500, "count": rng.randint(2, 5), "path_prefix": prefix}),
        ("status", {"status": 429, "retry_after": 1, "count": rng.randint(1, 3)}),
        ("slow", {"seconds": rng.uniform(0.3, 1.5), "count": rng.randint(1, 3)}),
        ("revoke_tokens", {}),
        ("presign_expire_now", {"count": rng.randint(1, 3)}),
        ("s3_creds_expire_now", {"count": 1}),
        ("status", {"target": "s3", "status": 503, "count": rng.randint(2, 5)}),
        ("status", {"target": "s3", "status": 500, "count": rng.randint(1, 3)}),
        ("slow", {"target": "s3", "seconds": rng.uniform(0.3, 1.0), "count": rng.randint(1, 3)}),
        # The worst ones: it happened, then the answer was lost.
        ("status", {"target": "s3", "status": 503, "after": True, "count": rng.randint(1, 2),
                    "operation": rng.choice(["PutObject", "CompleteMultipartUpload", "UploadPart"])}),
        ("drop", {"target": "s3", "after": True, "count": 1}),
        ("drop", {"target": "s3", "count": 1}),
        ("drop", {"target": "api", "after": True, "method": "PUT", "path_prefix": "/files", "count": 1}),
        ("drop", {"target": "sftp", "after": rng.random() < 0.7, "count": 1,
                  "operation": rng.choice(["rename", "write", "open"])}),
    ]


def make_plan(rng: random.Random, routes, n_files: int, seed: int) -> tuple[dict[str, tuple], list[str]]:
    """Unique names and contents (same bytes twice would be HELD by design) spread over the
    routes, some to be rejected; and the order to drop them in."""
    plan: dict[str, tuple] = {}
    for i in range(n_files):
        tag = rng.choice(["", "", "", "", "_REJECT", "_PARTIAL"])
        route = routes[i % len(routes)]
        name = f"CHAOS_{i:04d}{tag}.csv"
        data = f"chaos file {i} seed {seed}\n".encode() + rng.randbytes(rng.randint(50, 4000))
        plan[name] = (route, data)
    names = list(plan)
    rng.shuffle(names)
    return plan, names


def chaos_threads(sb: Sandbox, plan: dict[str, tuple], names: list[str], dropped: list[str],
                  stop: threading.Event, seed: int) -> list[threading.Thread]:
    """A dropper (files arrive while agents run, die and recover) and a fault injector."""

    def dropper() -> None:
        drop_rng = random.Random(seed + 1)
        pending = list(names)
        while pending and not stop.is_set():
            for _ in range(min(len(pending), drop_rng.randint(3, 12))):
                name = pending.pop()
                route, data = plan[name]
                tmp = Path(route.outbox) / f".{name}.tmp"  # dot-files are ignored by the watcher
                tmp.write_bytes(data)
                os.rename(tmp, Path(route.outbox) / name)
                dropped.append(name)
            stop.wait(drop_rng.uniform(0.1, 0.5))

    def fault_injector() -> None:
        f_rng = random.Random(seed + 2)
        while not stop.wait(f_rng.uniform(0.4, 1.2)):
            kind, kw = f_rng.choice(_faults(f_rng))
            sb.inject_fault(kind, **kw)

    return [threading.Thread(target=dropper, daemon=True), threading.Thread(target=fault_injector, daemon=True)]


def end_chaos(sb: Sandbox, plan: dict[str, tuple], names: list[str], dropped: list[str], stop: threading.Event,
              threads: list[threading.Thread]) -> None:
    """Stop the threads; drop the files the dropper had not reached; clear the faults."""
    stop.set()
    for t in threads:
        t.join(timeout=30)
    for name in names:
        if name not in dropped:
            route, data = plan[name]
            (Path(route.outbox) / name).write_bytes(data)
            dropped.append(name)
    sb.clear_faults()


class _Daemon:
    def __init__(self, cfg_path: Path, log_path: Path):
        self.cfg_path = cfg_path
        self.log = open(log_path, "ab")
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.log.write(f"\n===== start {self.starts} at {time.strftime('%H:%M:%S')} =====\n".encode())
        self.log.flush()
        self.offset = self.log.tell()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, "-m", "filex_agent", "run", "--config", str(self.cfg_path)],
                                     cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_started(self, timeout: float) -> bool:
        """Until this run logged that it is up (recovery done, watcher and scheduler running)."""
        deadline = time.monotonic() + timeout
        with open(self.log.name, "rb") as f:
            while time.monotonic() < deadline:
                f.seek(self.offset)
                if b"filex-agent started" in f.read():
                    return True
                time.sleep(0.05)
        return False

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()


def _journal(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    db.row_factory = sqlite3.Row
    return db


def _out_objects(sb: Sandbox, org: str, app: str) -> dict[str, bytes]:
    prefix = f"{org}/{app}/out/"
    out = {}
    for page in sb.admin_s3.get_paginator("list_objects_v2").paginate(Bucket=sb.bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix):]
            if name:
                out[name] = sb.admin_s3.get_object(Bucket=sb.bucket, Key=obj["Key"])["Body"].read()
    return out


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_chaos_sigkill_and_faults(tmp_path):
    seed = int(os.environ.get("FILEX_CHAOS_SEED") or random.randrange(1, 2**31))
    n_files = int(os.environ.get("FILEX_CHAOS_FILES", "200"))
    n_kills = int(os.environ.get("FILEX_CHAOS_KILLS", "22"))
    print(f"\nchaos: FILEX_CHAOS_SEED={seed} files={n_files} kills={n_kills}")
    rng = random.Random(seed)
    t0 = time.monotonic()

    # fileX takes uploads a while after its bucket stored them: "not yet" must never read as "no".
    lag = rng.choice([0.0, 1.0, 3.0])
    print(f"chaos: receive lag {lag} s")
    sb = Sandbox(tmp_path / "sandbox", processing_delay=0.3, sftp=sftp_supported(), receive_lag=lag)
    sb.start()
    daemon: _Daemon | None = None
    try:
        cfg_path = _config(sb, tmp_path / "agent")
        cfg = load_config(cfg_path)
        routes = cfg.routes
        kinds = sorted({r.transport for r in routes})
        assert {"rest", "s3"} <= set(kinds)
        for r in routes:
            Path(r.outbox).mkdir(parents=True, exist_ok=True)

        plan, names = make_plan(rng, routes, n_files, seed)
        dropped: list[str] = []
        stop_threads = threading.Event()
        threads = chaos_threads(sb, plan, names, dropped, stop_threads, seed)
        daemon = _Daemon(cfg_path, tmp_path / "daemon.log")
        for t in threads:
            t.start()

        # ---- chaos phase: start, let it live a random while, SIGKILL; again and again.
        for k in range(n_kills):
            daemon.start()
            if k % 5 in (3, 4):
                time.sleep(rng.uniform(0.1, 1.0))  # dies during start-up or recovery (two in a row)
            else:
                daemon.wait_started(timeout=8)
                time.sleep(rng.uniform(0.2, 2.5))  # dies while working
            daemon.kill()
        end_chaos(sb, plan, names, dropped, stop_threads, threads)
        chaos_end = time.monotonic()

        # ---- calm phase: let it finish.
        daemon.start()
        journal = cfg.journal_path

        def finished() -> bool:
            out_total = sum(len(_out_objects(sb, r.org, r.application)) for r in routes)
            with _journal(journal) as db:
                states = dict(Counter(r[0] for r in db.execute("SELECT state FROM submissions")))
                final = db.execute("SELECT COUNT(*) FROM submissions WHERE state IN "
                                   "('ACCEPTED','REJECTED','PARTIALLY_REJECTED','FAILED') AND move_to IS NULL"
                                   ).fetchone()[0]
                filed = db.execute("SELECT COUNT(*) FROM feedback WHERE downloaded_at IS NOT NULL").fetchone()[0]
            finished.last = f"states={states} feedback filed={filed}/{out_total}"  # type: ignore[attr-defined]
            # Every file final and its original filed; one feedback per file fileX took; all filed.
            return final >= n_files and out_total >= final - states.get("FAILED", 0) and filed >= out_total

        deadline = time.monotonic() + 150
        while not finished():
            assert daemon.proc.poll() is None, "daemon died in the calm phase; see daemon.log"
            if time.monotonic() > deadline:
                raise AssertionError(f"seed {seed}: not finished in time: {finished.last}")  # type: ignore[attr-defined]
            time.sleep(0.5)
        # Let one more tracking/feedback cycle pass: nothing may be filed twice afterwards.
        time.sleep(1.5)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=20) == 0, "SIGTERM must end the daemon cleanly (exit 0)"
        calm_end = time.monotonic()

        _check(seed, sb, cfg, plan)
        print(f"chaos: seed {seed}: {n_files} files, {daemon.starts} daemon starts ({n_kills} SIGKILLs), "
              f"chaos phase {chaos_end - t0:.1f} s, calm phase {calm_end - chaos_end:.1f} s, "
              f"total {time.monotonic() - t0:.1f} s")
        _next_day(seed, rng, sb, cfg, plan, daemon)
        print(f"chaos: seed {seed}: next day done, total {time.monotonic() - t0:.1f} s")
    except BaseException:
        print(f"chaos: FAILED with FILEX_CHAOS_SEED={seed}; daemon log: {tmp_path / 'daemon.log'}")
        raise
    finally:
        if daemon is not None:
            daemon.close()
        sb.stop()


def _next_day(seed: int, rng: random.Random, sb: Sandbox, cfg, plan: dict[str, tuple], daemon: "_Daemon") -> None:
    """A later "day": some of the same names dropped again with new bytes, while yesterday's
    filings of those names sit in in_arcv and in tracking. SIGKILLs and lost answers again.
    Each day's bytes must be filed exactly once; yesterday's evidence never counts for today."""
    names = rng.sample(sorted(plan), k=max(4, len(plan) // 5))
    today = {n: (plan[n][0], f"next day {n} seed {seed}\n".encode() + rng.randbytes(rng.randint(50, 3000)))
             for n in names}
    f_rng = random.Random(seed + 3)
    for i, name in enumerate(names):
        route, data = today[name]
        tmp = Path(route.outbox) / f".{name}.tmp"
        tmp.write_bytes(data)
        os.rename(tmp, Path(route.outbox) / name)
        if i % 7 == 0:
            kind, kw = f_rng.choice(_faults(f_rng)[-5:])  # the after-the-side-effect ones
            sb.inject_fault(kind, **kw)
    for _ in range(4):
        daemon.start()
        daemon.wait_started(timeout=8)
        time.sleep(rng.uniform(0.3, 2.0))
        daemon.kill()
    sb.clear_faults()
    daemon.start()
    want = {n: hashlib.sha256(d).hexdigest() for n, (_, d) in today.items()}

    def done() -> bool:
        with _journal(cfg.journal_path) as db:
            rows = db.execute("SELECT file_name, sha256, state FROM submissions").fetchall()
        finals = {(r[0], r[1]) for r in rows if r[2] in ("ACCEPTED", "REJECTED", "PARTIALLY_REJECTED")}
        return all((n, sha) in finals for n, sha in want.items())

    deadline = time.monotonic() + 150
    while not done():
        assert daemon.proc.poll() is None, "daemon died on the next day; see daemon.log"
        if time.monotonic() > deadline:
            raise AssertionError(f"seed {seed}: next day not finished in time")
        time.sleep(0.5)
    time.sleep(1.5)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=20) == 0
    problems = []
    filed = Counter((u.name, u.sha256) for u in sb.uploads())
    for name, (route, data) in today.items():
        old_sha = hashlib.sha256(plan[name][1]).hexdigest()
        for label, sha in (("yesterday's", old_sha), ("today's", want[name])):
            if filed[(name, sha)] != 1:
                problems.append(f"{name}: {label} bytes filed {filed[(name, sha)]} times")
        if sum(c for (n, _), c in filed.items() if n == name) != 2:
            problems.append(f"{name}: {sum(c for (n, _), c in filed.items() if n == name)} filings over two days")
    if problems:
        raise AssertionError(f"seed {seed}: next day: {len(problems)} problem(s):\n  " + "\n  ".join(problems[:40]))


def _check(seed: int, sb: Sandbox, cfg, plan: dict[str, tuple]) -> None:
    with _journal(cfg.journal_path) as db:
        rows = [dict(r) for r in db.execute("SELECT * FROM submissions ORDER BY id")]
        feedback = [dict(r) for r in db.execute("SELECT * FROM feedback ORDER BY id")]
    check_outcome(seed, sb, cfg, plan, rows, feedback)


def check_outcome(seed: int, sb: Sandbox, cfg, plan: dict[str, tuple], rows: list[dict], feedback: list[dict]) -> None:
    """Every planned file filed exactly once, whole, final, archived; every feedback file filed
    once and linked; from the journal's ``rows``/``feedback`` and what the sandbox received."""
    problems: list[str] = []
    uploads = Counter(u.name for u in sb.uploads())
    upload_by_name = {u.name: u for u in sb.uploads()}
    arrivals = Counter(a.key for a in sb.arrivals())
    by_name: dict[str, list[dict]] = {}
    for r in rows:
        by_name.setdefault(r["file_name"], []).append(r)
    unexpected = set(by_name) - set(plan)
    if unexpected:
        problems.append(f"journal rows for files never dropped: {sorted(unexpected)[:5]}")

    for name, (route, data) in sorted(plan.items()):
        sha = hashlib.sha256(data).hexdigest()
        want = outcome_for(name)
        subs = by_name.get(name, [])
        if len(subs) != 1:
            problems.append(f"{name}: {len(subs)} journal rows ({[(s['id'], s['state'], s['reason']) for s in subs]})")
            continue
        sub = subs[0]
        if sub["state"] != want:
            problems.append(f"{name}: state {sub['state']} (want {want}); reason {sub['reason']!r} flag {sub['flag']!r}")
        # Exactly once, whole, over the route's transport.
        if uploads[name] != 1:
            problems.append(f"{name}: uploaded {uploads[name]} times")
        elif upload_by_name[name].sha256 != sha or upload_by_name[name].transport != route.transport:
            problems.append(f"{name}: fileX got {upload_by_name[name].sha256[:12]} over "
                            f"{upload_by_name[name].transport}, want {sha[:12]} over {route.transport}")
        elif upload_by_name[name].tracking_id != sub["tracking_id"]:
            problems.append(f"{name}: journal tracking id {sub['tracking_id']} is not fileX's "
                            f"{upload_by_name[name].tracking_id}")
        if route.transport in ("rest", "s3"):
            key = f"{route.org}/{route.application}/in/{name}"
            if arrivals[key] != 1:
                problems.append(f"{name}: the S3 endpoint stored it {arrivals[key]} times")
        # The original, once, in the folder of its outcome.
        local = Path(sub["local_path"])
        folder = route.folder(ARCHIVE.get(want, "failed"), cfg.agent.data_dir)
        if local.parent != folder or not local.is_file():
            problems.append(f"{name}: original at {local}, want it in {folder}")
        elif hashlib.sha256(local.read_bytes()).hexdigest() != sha:
            problems.append(f"{name}: original at {local} has other bytes")
        if sub["move_to"]:
            problems.append(f"{name}: a move is still pending ({sub['move_to']})")
    for route in cfg.routes:
        base = cfg.agent.data_dir / "routes" / route.name
        copies = Counter(p.name for kind in ("sent", "accepted", "rejected", "failed")
                         for p in (base / kind).glob("*") if p.is_file())
        extra = [n for n in copies if n not in plan or copies[n] > 1]
        if extra:
            problems.append(f"route {route.name}: unexpected files in the archive folders: {extra[:5]}")
        left = [p for p in Path(route.outbox).rglob("*") if p.is_file()]
        if left:
            problems.append(f"route {route.name}: files left in the outbox/spool: {left[:5]}")

    # Feedback: every file in out/ filed exactly once, linked to its submission.
    subs_by_id = {r["id"]: r for r in rows}
    for route in cfg.routes:
        remote = _out_objects(sb, route.org, route.application)
        rows_fb = [f for f in feedback if f["route"] == route.name]
        counts = Counter(f["remote_name"] for f in rows_fb)
        folder = route.folder("feedback", cfg.agent.data_dir)
        local_files = [p for p in folder.glob("*") if p.is_file()]
        if len(local_files) != len(remote):
            problems.append(f"route {route.name}: {len(local_files)} local feedback files for {len(remote)} in out/")
        for name, body in remote.items():
            if counts[name] != 1:
                problems.append(f"feedback {name}: {counts[name]} journal rows")
                continue
            fb = next(f for f in rows_fb if f["remote_name"] == name)
            if not fb["downloaded_at"] or not fb["local_path"] or Path(fb["local_path"]).read_bytes() != body:
                problems.append(f"feedback {name}: not filed whole ({fb})")
            sub = subs_by_id.get(fb["submission_id"])
            if sub is None or not sub["tracking_id"] or sub["tracking_id"] not in name:
                problems.append(f"feedback {name}: linked to {sub and sub['file_name']}")
    if problems:
        shown = "\n  ".join(problems[:40])
        raise AssertionError(f"seed {seed}: {len(problems)} problem(s):\n  {shown}")


# ---------------------------------------------------------------------------------------------
# Focused regressions: each crash window the chaos test stands for, hit deterministically.
# ---------------------------------------------------------------------------------------------

from datetime import timedelta  # noqa: E402

import httpx  # noqa: E402

from filex_agent.daemon import Daemon  # noqa: E402
from filex_agent.fsutil import sha256_file  # noqa: E402
from filex_agent.store import State, utcnow  # noqa: E402
from filex_agent.submitter import spool_dir  # noqa: E402
from tests.conftest import dead_owner, run_until, wait_for  # noqa: E402


def _spooled(d: Daemon, route, name: str, data: bytes, *, committed: bool = True, ticket: str | None = None):
    """A journal row + spool file as a SIGKILL during an upload attempt leaves them: UPLOADING,
    owned by a dead process, the attempt PENDING (``committed``: the request that can make it a
    filing had gone out; ``ticket``: REST's tracking id, journaled before that)."""
    sub = d.store.create(route=route.name, org=route.org, application=route.application,
                         transport=route.transports[0], file_name=name,
                         source_path=str(Path(route.outbox) / name), local_path="-", state=State.CLAIMING)
    target = spool_dir(route) / str(sub.id) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    st = target.stat()
    sub = d.store.transition(sub.id, State.QUEUED, "test", local_path=str(target), size=st.st_size,
                             mtime_ns=st.st_mtime_ns, sha256=sha256_file(target))
    sub, att = d.store.begin_upload(sub.id, dead_owner(), 600, transport=sub.transport, remote_name=name,
                                    upload_location=f"{route.org}/{route.application}/in")
    if ticket:
        d.store.set_ticket(att.id, sub.epoch, ticket)
    if committed:
        d.store.commit_attempt(att.id, sub.epoch)
    return d.store.get(sub.id)


def _count(sandbox, name: str) -> int:
    return sum(1 for u in sandbox.uploads() if u.name == name)


def test_rest_ticket_without_put_is_not_taken_for_a_submission(sandbox, sandbox_config):
    """Crash after the tracking id was journaled and the PUT begun, before the body arrived: the
    "Request Received" record is no proof of arrival; the file is sent again once fileX has shown
    no trace of it for the settle period, and only then."""
    cfg = sandbox_config(transports=("rest",), tracking={"unconfirmed_settle_seconds": 2})
    d = Daemon(cfg, dispatch_interval=0.2)
    route = cfg.routes[0]
    name = "CRASH_ticket_noput.csv"
    ticket = d.connections.api(route.credential).upload_url(route.org, route.application, name).trackingId
    sub = _spooled(d, route, name, b"never PUT\n", ticket=ticket)
    d.recover()
    sub = d.store.get(sub.id)
    assert sub.state is State.UNCONFIRMED and "not sent again" in sub.flag
    d.reconciler.run()
    assert d.store.get(sub.id).state is State.UNCONFIRMED
    wait_for(lambda: d.reconciler.run() and d.store.get(sub.id).state is State.QUEUED, timeout=15,
             what="decided: never arrived")
    run_until(d, sub.id, State.ACCEPTED)
    assert _count(sandbox, name) == 1


def test_rest_ticket_before_commit_is_sent_at_once(sandbox, sandbox_config):
    """Crash after the ticket, before the PUT was journaled as begun: nothing can have landed."""
    cfg = sandbox_config(transports=("rest",))
    d = Daemon(cfg, dispatch_interval=0.2)
    route = cfg.routes[0]
    name = "CRASH_ticket_nocommit.csv"
    ticket = d.connections.api(route.credential).upload_url(route.org, route.application, name).trackingId
    sub = _spooled(d, route, name, b"not committed\n", ticket=ticket, committed=False)
    d.recover()
    assert d.store.get(sub.id).state is State.QUEUED
    run_until(d, sub.id, State.ACCEPTED)
    assert _count(sandbox, name) == 1


def _recovered_as_submitted(d: Daemon, sub_id: int):
    """recover(), then the reconciler until the interrupted upload is SUBMITTED.

    The reconciler may look in the instant between the sandbox processor taking the object out of
    in/ and its tracking update: no evidence then, so it rightly waits (never re-sends) and the
    next check finds it. It must never be QUEUED again.
    """
    d.recover()

    def decided():
        sub = d.store.get(sub_id)
        assert sub.state in (State.UNCONFIRMED, State.SUBMITTED), f"interrupted upload became {sub.state}"
        if sub.state is State.UNCONFIRMED:
            d.reconciler.run()
            sub = d.store.get(sub_id)
        return sub.state is State.SUBMITTED and sub

    return wait_for(decided, timeout=20, interval=0.2, what="recovered as SUBMITTED")


def test_rest_put_done_before_crash_is_not_sent_again(sandbox, sandbox_config):
    cfg = sandbox_config(transports=("rest",))
    d = Daemon(cfg, dispatch_interval=0.2)
    route = cfg.routes[0]
    name = "CRASH_put_done.csv"
    data = b"PUT done, SUBMITTED not journaled\n"
    presigned = d.connections.api(route.credential).upload_url(route.org, route.application, name)
    sub = _spooled(d, route, name, data, ticket=presigned.trackingId)
    httpx.put(presigned.url, content=data, timeout=10).raise_for_status()
    # in/ (not processed yet) or tracking (processed): either proves arrival
    sub = _recovered_as_submitted(d, sub.id)
    assert sub.move_to is None
    assert Path(sub.local_path).parent == route.folder("sent", cfg.agent.data_dir)
    run_until(d, sub.id, State.ACCEPTED)
    assert _count(sandbox, name) == 1


def test_s3_upload_completed_before_crash_is_not_sent_again(sandbox, sandbox_config):
    cfg = sandbox_config(transports=("s3",))
    d = Daemon(cfg, dispatch_interval=0.2)
    route = cfg.routes[0]
    name = "CRASH_s3_done.csv"
    sub = _spooled(d, route, name, b"S3 upload completed, then SIGKILL\n")
    with d.connections.transport(route) as t:
        t.upload(Path(sub.local_path), name)
    _recovered_as_submitted(d, sub.id)
    d.start()
    try:
        sub = wait_for(lambda: (s := d.store.get(sub.id)).state is State.ACCEPTED and s, what="accepted")
    finally:
        d.stop(grace=5)
    assert _count(sandbox, name) == 1
    assert next(u for u in sandbox.uploads() if u.name == name).tracking_id == sub.tracking_id


def test_interrupted_upload_checked_again_while_running_when_filex_was_down(sandbox, sandbox_config):
    """fileX cannot be asked: the upload stays UNCONFIRMED, past its settle period too (not
    checked is not "absent"), and is decided once fileX answers again."""
    cfg = sandbox_config(transports=("s3",), tracking={"unconfirmed_settle_seconds": 1})
    d = Daemon(cfg, dispatch_interval=0.2)
    route = cfg.routes[0]
    name = "CRASH_s3_down.csv"
    sub = _spooled(d, route, name, b"fileX down during recovery\n")
    sandbox.inject_fault("status", status=503, count=1000, path_prefix="/tracking")
    try:
        d.recover()
        time.sleep(1.5)
        d.reconciler.run()
        sub = d.store.get(sub.id)
        assert sub.state is State.UNCONFIRMED and "could not be checked" in sub.flag
    finally:
        sandbox.clear_faults()
    run_until(d, sub.id, State.ACCEPTED)
    assert _count(sandbox, name) == 1


def test_crash_between_final_status_and_archive_move(sandbox, sandbox_config, monkeypatch):
    """The archive move is journaled with the final state; a crash before the move is finished
    by recovery (it used to leave the original in the spool of an ACCEPTED submission)."""
    cfg = sandbox_config(transports=("rest",))
    d = Daemon(cfg, dispatch_interval=0.2)
    route = cfg.routes[0]
    outbox = Path(route.outbox)
    real = d.store.transition
    crashed = []

    def crash_after_final(sub_id, state, *a, **kw):
        sub = real(sub_id, state, *a, **kw)
        if sub.is_final and not crashed:
            crashed.append(sub.id)  # the final state is on disk; the process dies right here
            raise RuntimeError("simulated SIGKILL after the final state was journaled")
        return sub

    monkeypatch.setattr(d.store, "transition", crash_after_final)
    d.start()
    try:
        (outbox / "CRASH_final_move.csv").write_bytes(b"final then crash\n")
        wait_for(lambda: crashed, what="the final transition")
    finally:
        d.stop(grace=5)
    d2 = Daemon(cfg)
    sub = d2.store.get(crashed[0])
    assert sub.state is State.ACCEPTED and sub.move_to
    d2.recover()
    sub = d2.store.get(sub.id)
    assert sub.move_to is None and Path(sub.local_path).parent == route.folder("accepted", cfg.agent.data_dir)
    d2.stop(grace=0)


def test_move_interrupted_between_link_and_unlink_leaves_one_copy(tmp_path):
    from filex_agent.fsutil import move_no_clobber

    src = tmp_path / "spool" / "a.csv"
    src.parent.mkdir()
    src.write_bytes(b"a")
    dest = tmp_path / "sent"
    dest.mkdir()
    (dest / "a.csv").write_bytes(b"someone else's a.csv")
    os.link(src, dest / "a~1.csv")  # the crash happened right after this link
    out = move_no_clobber(src, dest)
    assert out == dest / "a~1.csv" and not src.exists()
    assert sorted(p.name for p in dest.iterdir()) == ["a.csv", "a~1.csv"]


def test_feedback_filed_but_not_recorded_is_not_filed_twice(sandbox, sandbox_config, monkeypatch):
    """Crash after the feedback file got its final name, before the journal recorded it."""
    from filex_agent.feedback import FeedbackCollector

    cfg = sandbox_config(transports=("s3",))
    d = Daemon(cfg)
    route = cfg.routes[0]
    key = f"{route.org}/{route.application}/out/CRASH_fb_{os.getpid()}.txt"
    sandbox.admin_s3.put_object(Bucket=sandbox.bucket, Key=key, Body=b"feedback body\n")
    fc = FeedbackCollector(cfg, d.store, d.connections, d.hooks)
    real = d.store.record_feedback
    monkeypatch.setattr(d.store, "record_feedback", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        fc.collect(route)
    monkeypatch.setattr(d.store, "record_feedback", real)
    folder = route.folder("feedback", cfg.agent.data_dir)
    assert [p.name for p in folder.iterdir() if p.name.startswith("CRASH_fb")] == [Path(key).name]
    fc.collect(route)  # the next cycle (or the next start)
    assert [p.name for p in folder.iterdir() if p.name.startswith("CRASH_fb")] == [Path(key).name]
    filed, doubt = d.store.feedback_keys(route.name)
    assert any(k[0] == Path(key).name for k in filed) and not doubt
    d.stop(grace=0)


# ---------------------------------------------------------------------------------------------
# SIGTERM: stop taking files, let uploads in flight finish within the grace, exit 0; a second
# SIGTERM exits at once and the journal still recovers everything.
# ---------------------------------------------------------------------------------------------

def _state_of(journal: Path, name: str) -> str | None:
    if not journal.exists():
        return None
    with _journal(journal) as db:
        row = db.execute("SELECT state FROM submissions WHERE file_name = ? ORDER BY id DESC", (name,)).fetchone()
    return row[0] if row else None


def _slow_put(sandbox, route, name: str, seconds: float) -> None:
    sandbox.inject_fault("slow", target="s3", seconds=seconds, count=1,
                         path_prefix=f"/{sandbox.bucket}/{route.org}/{route.application}/in/{name}")


def test_sigterm_lets_the_upload_in_flight_finish_and_exits_0(sandbox, sandbox_config, tmp_path):
    cfg = sandbox_config(transports=("rest",))
    route = cfg.routes[0]
    cfg_path = Path(cfg.agent.data_dir).parent / "filex-agent.toml"
    daemon = _Daemon(cfg_path, tmp_path / "daemon.log")
    name, late = "TERM_inflight.csv", "TERM_after_signal.csv"
    try:
        daemon.start()
        assert daemon.wait_started(timeout=20)
        _slow_put(sandbox, route, name, 3.0)
        (Path(route.outbox) / name).write_bytes(b"in flight at SIGTERM\n")
        wait_for(lambda: _state_of(cfg.journal_path, name) == "UPLOADING", what="upload in flight")
        t0 = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        (Path(route.outbox) / late).write_bytes(b"dropped after the signal\n")
        assert daemon.proc.wait(timeout=15) == 0
        assert time.monotonic() - t0 < cfg.agent.shutdown_grace_seconds + 3
    finally:
        sandbox.clear_faults()
        daemon.close()
    assert _state_of(cfg.journal_path, name) == "SUBMITTED"  # finished within the grace
    assert _state_of(cfg.journal_path, late) is None and (Path(route.outbox) / late).exists()  # not taken
    wait_for(lambda: _count(sandbox, name) == 1, what="the upload at the sandbox")


def test_second_sigterm_exits_at_once_and_is_recoverable(sandbox, sandbox_config, tmp_path):
    cfg = sandbox_config(transports=("rest",))
    route = cfg.routes[0]
    cfg_path = Path(cfg.agent.data_dir).parent / "filex-agent.toml"
    daemon = _Daemon(cfg_path, tmp_path / "daemon.log")
    name = "TERM_twice.csv"
    try:
        daemon.start()
        assert daemon.wait_started(timeout=20)
        _slow_put(sandbox, route, name, 4.0)
        (Path(route.outbox) / name).write_bytes(b"cut off by a second SIGTERM\n")
        wait_for(lambda: _state_of(cfg.journal_path, name) == "UPLOADING", what="upload in flight")
        t0 = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.proc.wait(timeout=5)
        assert time.monotonic() - t0 < 2.5, "the second SIGTERM must not wait for the grace"
    finally:
        sandbox.clear_faults()
        daemon.close()
    assert _state_of(cfg.journal_path, name) == "UPLOADING"
    # Next start: whatever happened to the PUT the sandbox was still holding, sent exactly once.
    d = Daemon(cfg, dispatch_interval=0.2)
    d.start()
    try:
        wait_for(lambda: any(s.file_name == name and s.state is State.ACCEPTED for s in d.store.list()),
                 timeout=60, what="accepted after recovery")
    finally:
        d.stop(grace=5)
    assert _count(sandbox, name) == 1
