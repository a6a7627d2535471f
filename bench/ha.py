"""``python -m bench.ha``: the high-availability figures of issue 12, written into bench/RESULTS.md.

Several agent processes (separate node names) share one PostgreSQL journal (``tests/pg_fixture.py``:
a private cluster on loopback), one set of outboxes and one sandbox fileX in its own process
(``bench.servers.SandboxServer``; faults armed through its ``POST /_sandbox/faults``).

1. **Failover.** A file is dropped while the sandbox holds its upload in flight (a ``slow`` fault on
   that one file); the node that owns the upload (the journal's ``submissions.owner``) is SIGKILLed
   and the clock runs from the kill. Two cases:

   - *before the commit point*: REST route, the URL request (``PUT /files/...``) is held. Nothing
     can have reached fileX, so the rescuer re-queues it and any node sends it: measured up to the
     next attempt (``attempts.n`` higher) starting, and up to ``SUBMITTED``.
   - *after the commit point*: S3 route, the PutObject is held (it lands at fileX shortly after
     the kill). The rescuer records the attempt ``UNCONFIRMED``; the tracking leader's reconciler
     decides from fileX's evidence: measured up to ``SUBMITTED``.

   The killed node is restarted after each repetition, so every repetition starts with all nodes up.
2. **Scale-out.** N small files dropped at once (renamed into the outbox together) on an S3 route;
   files/s from the drop to the last ``uploaded_at``, with 1, 2, 3 nodes on one PostgreSQL and with
   one node on the default SQLite journal.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from bench.agent import ROUTES, Daemon, write_config
from bench.common import ROOT, percentile

log = logging.getLogger("bench")

START, END = "<!-- bench.ha:start -->", "<!-- bench.ha:end -->"
PW_ENV = "FILEX_BENCH_HA_PG_PASSWORD"


@dataclass
class Failover:
    case: str  # "before commit" | "after commit"
    takeover: list[float] = field(default_factory=list)  # kill -> the rescuer's first event
    next_attempt: list[float] = field(default_factory=list)  # kill -> attempt n+1 started (before commit)
    submitted: list[float] = field(default_factory=list)  # kill -> SUBMITTED
    resent: int = 0  # repetitions that sent the file again (attempt n+1)
    notes: list[str] = field(default_factory=list)


@dataclass
class Scale:
    journal: str
    nodes: int
    files: int
    seconds: float
    per_node: dict[str, int]

    @property
    def rate(self) -> float:
        return self.files / self.seconds


class Cluster:
    """``nodes`` agents with one configuration but their ``[journal] node_name``."""

    def __init__(self, work: Path, sandbox, url: str | None, nodes: int, lease: float,  # noqa: ANN001
                 settle: float, stable: float) -> None:
        self.work = work
        base = write_config(work / "base.toml", work / "data", work / "outbox", sandbox=sandbox,
                            transports=("rest", "s3"), stable_seconds=stable, poll_seconds=1.0)
        text = base.read_text().replace("[tracking]\n", f"[tracking]\nunconfirmed_settle_seconds = {settle:g}\n", 1)
        self.daemons: dict[str, Daemon] = {}
        for i in range(1, nodes + 1):
            name = f"n{i}"
            journal = ""
            if url is not None:
                journal = (f'\n[journal]\nurl = "{url}"\npassword = "env:{PW_ENV}"\nnode_name = "{name}"\n'
                           f"lease_seconds = {lease:g}\n")
            cfg = work / f"{name}.toml"
            cfg.write_text(text + journal)
            self.daemons[name] = Daemon(cfg, work / f"{name}.log")
        self.outbox = work / "outbox"

    def start(self) -> None:
        for d in self.daemons.values():
            d.start()

    def kill(self, name: str) -> None:
        proc = self.daemons[name].proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for d in self.daemons.values():
            d.stop(wait=20)


class Sandbox:
    """The admin side of the sandbox process: faults."""

    def __init__(self, server) -> None:  # noqa: ANN001
        import httpx

        u = urlsplit(server.api)
        self.http = httpx.Client(base_url=f"{u.scheme}://{u.netloc}", timeout=10)
        self.bucket = server.bucket

    def fault(self, kind: str, **kw: object) -> None:
        self.http.post("/_sandbox/faults", json={"kind": kind, **kw}).raise_for_status()


def _connect(url: str, password: str):  # noqa: ANN202
    import psycopg
    from psycopg.rows import dict_row

    return psycopg.connect(url, password=password, autocommit=True, row_factory=dict_row)


def _wait(what: str, timeout: float, fn):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout:.0f} s")
        time.sleep(0.02)


def _drop(outbox: Path, stage: Path, files: dict[str, int]) -> datetime:
    """Write the files beside the outbox, then rename them in together; the drop time."""
    stage.mkdir(parents=True, exist_ok=True)
    for name, size in files.items():
        (stage / name).write_bytes(secrets.token_bytes(16) + b"x" * max(0, size - 16))  # unique: never HELD
    t = datetime.now(timezone.utc)
    for name in files:
        os.rename(stage / name, outbox / name)
    return t


def failover(cluster: Cluster, db, sb: Sandbox, case: str, repeats: int, lease: float) -> Failover:  # noqa: ANN001
    res = Failover(case)
    before = case == "before commit"
    route, org, app = ROUTES["rest" if before else "s3"]
    for i in range(repeats):
        name = f"fo-{'b' if before else 'a'}{i}-{secrets.token_hex(3)}.txt"
        if before:  # the URL request is held: the upload cannot have reached fileX
            sb.fault("slow", target="api", method="PUT", seconds=60, path_prefix=f"/files/{org}/{app}/in/{name}")
        else:  # the PutObject is held, then stored after the kill: it reached fileX, the answer was lost
            sb.fault("slow", target="s3", method="PUT", seconds=1.5, path_prefix=f"/{sb.bucket}/{org}/{app}/in/{name}")
        _drop(cluster.outbox / route, cluster.work / "stage", {name: 10240})

        def holding():  # noqa: ANN202
            row = db.execute("SELECT s.id, s.owner, a.n, a.committed_at FROM submissions s JOIN attempts a "
                             "ON a.submission_id = s.id AND a.outcome = 'PENDING' WHERE s.file_name = %s "
                             "AND s.state = 'UPLOADING'", (name,)).fetchone()
            return row if row and (row["committed_at"] is None) == before else None

        row = _wait(f"{name} in flight", 60, holding)
        if before:
            time.sleep(0.3)  # the URL request is at the sandbox, asleep
        node = row["owner"].split(":")[0]
        killed = datetime.now(timezone.utc)
        cluster.kill(node)

        def settled():  # noqa: ANN202
            s = db.execute("SELECT state, uploaded_at FROM submissions WHERE id = %s", (row["id"],)).fetchone()
            return s if s["state"] in ("SUBMITTED", "ACCEPTED", "FAILED") and s["uploaded_at"] else None

        s = _wait(f"{name} sent after the kill of {node}", 120, settled)
        if s["state"] == "FAILED":
            raise RuntimeError(f"{name} FAILED after the failover: see the journal")
        first = db.execute("SELECT min(at) AS at FROM events WHERE submission_id = %s AND at > %s",
                           (row["id"], killed)).fetchone()["at"]
        nxt = db.execute("SELECT started_at, owner FROM attempts WHERE submission_id = %s AND n > %s ORDER BY n "
                         "LIMIT 1", (row["id"], row["n"])).fetchone()
        res.takeover.append((first - killed).total_seconds())
        res.submitted.append((s["uploaded_at"] - killed).total_seconds())
        if nxt is not None:
            res.resent += 1
            if before:
                res.next_attempt.append((nxt["started_at"] - killed).total_seconds())
            if nxt["owner"].split(":")[0] == node:
                res.notes.append(f"repetition {i}: sent again by the restarted {node}")
        log.info("%s %d: %s killed; taken over after %.2f s, SUBMITTED after %.2f s%s", case, i, node,
                 res.takeover[-1], res.submitted[-1], " (sent again)" if nxt is not None else "")
        cluster.daemons[node].start()
    return res


def scale(cluster: Cluster, journal: str, files: int, kib: int, uploaded) -> Scale:  # noqa: ANN001
    route = ROUTES["s3"][0]
    names = {f"so-{i:05d}.dat": kib * 1024 for i in range(files)}
    t0 = _drop(cluster.outbox / route, cluster.work / "stage", names)
    rows = _wait(f"{files} files uploaded", 600, lambda: (lambda r: r if len(r) >= files else None)(uploaded()))
    if any(r[2] == "FAILED" for r in rows):
        raise RuntimeError("a scale-out file FAILED: see the journal")
    last = max(r[0] for r in rows)
    per: dict[str, int] = {}
    for r in rows:
        per[r[1]] = per.get(r[1], 0) + 1
    return Scale(journal, len(cluster.daemons), files, (last - t0).total_seconds(), per)


def _uploaded_pg(db):  # noqa: ANN001, ANN202
    def rows():  # noqa: ANN202
        # The node that sent each file: the owner of its SENT attempt.
        return [(r["uploaded_at"], r["owner"].split(":")[0], r["state"]) for r in db.execute(
            "SELECT s.uploaded_at, a.owner, s.state FROM submissions s JOIN attempts a ON a.submission_id = s.id "
            "AND a.outcome = 'SENT' WHERE s.uploaded_at IS NOT NULL OR s.state = 'FAILED'").fetchall()]
    return rows


def _uploaded_sqlite(path: Path):  # noqa: ANN202
    from bench.agent import Journal

    j = Journal(path)
    return lambda: [(r.uploaded_at if r.uploaded_at.tzinfo else r.uploaded_at.replace(tzinfo=timezone.utc), "n1",
                     r.state) for r in j.rows(ROUTES["s3"][0]) if r.uploaded_at is not None]


def _fmt(values: list[float]) -> tuple[str, str, str]:
    if not values:
        return "–", "–", "–"
    return f"{statistics.median(values):.1f}", f"{percentile(values, 90):.1f}", f"{max(values):.1f}"


def render(cmd: str, when: str, load: str, lease: float, settle: float, nodes_fo: int,
           fos: list[Failover], scales: list[Scale], files: int, kib: int, notes: list[str]) -> str:
    out = [START, "## High availability (issue 12)", "",
           f"Generated by `{cmd}` on {when}: agents as separate processes on this one machine (2 CPUs, "
           f"shared with other work; load average (1 min) at start → end: **{load}**), one PostgreSQL 15 "
           "(`tests/pg_fixture.py`, loopback, fsync off) as the shared journal, one sandbox fileX in its own process. "
           "Seconds are measured on the journal's timestamps against the moment of the SIGKILL.", "",
           f"### Failover: SIGKILL of the node holding an upload ({nodes_fo} nodes, `lease_seconds = {lease:g}`)", "",
           "| case | repetitions | kill → rescued (p50 / p90 / max) | kill → next attempt starts "
           "(p50 / p90 / max) | kill → SUBMITTED (p50 / p90 / max) | sent again |",
           "|---|---|---|---|---|---|"]
    for f in fos:
        n = len(f.submitted)
        out.append(f"| {f.case} | {n} | {' / '.join(_fmt(f.takeover))} | {' / '.join(_fmt(f.next_attempt))} | "
                   f"{' / '.join(_fmt(f.submitted))} | {f.resent} of {n} |")
    out += ["",
            "- **kill → rescued**: the SIGKILL to the first journal event of that submission after it: another "
            "node's rescuer took the expired lease over (epoch raised) and recorded the open attempt.",
            "- **before commit** (REST route): the sandbox holds the `PUT /files/...` URL request of that one "
            "file (a `slow` fault), so nothing can have reached fileX; the rescuer re-queues it. "
            "**kill → next attempt starts** is the SIGKILL to `attempts.started_at` of the attempt with the next "
            "`n`, made by a surviving node: **this is the failover time.**",
            "- **after commit** (S3 route): the sandbox holds the PutObject 1.5 s and then stores it, so the "
            "bytes reached fileX and the answer was lost. The rescuer records the attempt `UNCONFIRMED`; the "
            "tracking leader's reconciler (every `poll_interval_seconds = 1` here) decides it from fileX's "
            "evidence and marks it `SUBMITTED` without sending it again. **kill → SUBMITTED** (`uploaded_at`) "
            f"is the failover time there; `tracking.unconfirmed_settle_seconds = {settle:g}` only matters "
            "when fileX shows no trace (then it is sent again after it: the *sent again* column).",
            "- The lease runs out `lease_seconds` after its last renewal (renewed every `lease_seconds / 3`), "
            "and every node's rescuer looks every `lease_seconds / 3`: the expected failover is between "
            f"{lease * 2 / 3:.1f} and {lease * 4 / 3:.1f} s, plus the time to start the next upload.",
            "",
            f"### Scale-out: {files} × {kib} KiB files dropped at once on an S3 route", "",
            "| journal | agent processes | files | drop → last uploaded, s | files/s | files sent per node |",
            "|---|---|---|---|---|---|"]
    for s in scales:
        per = ", ".join(f"{k}: {v}" for k, v in sorted(s.per_node.items()))
        out.append(f"| {s.journal} | {s.nodes} | {s.files} | {s.seconds:.1f} | **{s.rate:.0f}** | {per} |")
    out += ["",
            "Each agent runs the daemon defaults (4 upload workers); the sandbox's S3 (moto, one Python process) "
            "and PostgreSQL run on the same 2 CPUs, so added nodes compete for the CPUs they would bring on "
            "separate machines: this shows the cost of coordination through PostgreSQL and that the work spreads "
            "over the nodes, not the speed-up of separate machines."]
    out += [f"- {n}" for n in notes]
    out.append(END)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ha", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10, help="failover repetitions per case")
    ap.add_argument("--failover-nodes", type=int, default=3)
    ap.add_argument("--lease", type=float, default=3.0, help="journal.lease_seconds")
    ap.add_argument("--settle", type=float, default=5.0, help="tracking.unconfirmed_settle_seconds")
    ap.add_argument("--files", type=int, default=300, help="scale-out: files dropped at once")
    ap.add_argument("--kib", type=int, default=10)
    ap.add_argument("--nodes", default="1,2,3", help="scale-out: node counts on PostgreSQL")
    ap.add_argument("--no-sqlite", action="store_true", help="skip the 1-node SQLite comparison")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s bench.ha: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from bench.servers import SandboxServer
    from bench.web import write_section
    from tests.pg_fixture import PgServer, skip_reason

    why = skip_reason()
    if why:
        print(f"bench.ha: cannot run: {why}", file=sys.stderr)
        return 2
    cmd = "python -m bench.ha" + (" " + shlex.join(sys.argv[1:] if argv is None else argv)
                                  if (argv if argv is not None else sys.argv[1:]) else "")
    load0 = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="filex-bench-ha-"))
    pg = PgServer()
    sandbox = SandboxServer(work, processing_delay=0.2)
    fos: list[Failover] = []
    scales: list[Scale] = []
    notes: list[str] = []
    try:
        pg.start()
        os.environ[PW_ENV] = pg.password
        sandbox.start()
        sb = Sandbox(sandbox)
        if args.repeats > 0:
            url = pg.database("failover")
            cl = Cluster(work / "failover", sandbox, url, args.failover_nodes, args.lease, args.settle, 0.2)
            cl.start()
            try:
                with _connect(url, pg.password) as db:
                    for case in ("before commit", "after commit"):
                        fos.append(failover(cl, db, sb, case, args.repeats, args.lease))
                        notes += [f"{case}: {n}" for n in fos[-1].notes]
            finally:
                cl.stop()
        runs: list[tuple[str, int]] = [] if args.no_sqlite else [("SQLite (default)", 1)]
        runs += [("PostgreSQL", int(n)) for n in args.nodes.split(",") if n.strip()]
        for journal, n in runs:
            tag = f"scale-{'pg' if journal == 'PostgreSQL' else 'sqlite'}-{n}"
            url = pg.database(tag.replace("-", "_")) if journal == "PostgreSQL" else None
            cl = Cluster(work / tag, sandbox, url, n, args.lease, args.settle, 0.2)
            cl.start()
            try:
                log.info("scale-out: %s, %d node(s)", journal, n)
                if url is None:
                    scales.append(scale(cl, journal, args.files, args.kib,
                                        _uploaded_sqlite(work / tag / "data" / "journal.sqlite3")))
                else:
                    with _connect(url, pg.password) as db:
                        scales.append(scale(cl, journal, args.files, args.kib, _uploaded_pg(db)))
                log.info("scale-out: %s, %d node(s): %.0f files/s", journal, n, scales[-1].rate)
            finally:
                cl.stop()
    finally:
        sandbox.stop()
        pg.close()
        if args.keep:
            log.info("work folder kept: %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = f"{load0:.1f} → {os.getloadavg()[0]:.1f}"
    section = render(cmd, when, load, args.lease, args.settle, args.failover_nodes, fos, scales, args.files,
                     args.kib, notes)
    print(section)
    write_section(args.out, section, START, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
