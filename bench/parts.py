"""The five measurements. Each returns plain rows; ``report.py`` turns them into Markdown."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from bench.agent import ROUTES, SQLITE, Daemon, Journal, JournalKind, write_config
from bench.common import MIB, PY, ROOT, ChildFailed, Stat, clear_dir, loadavg, percentile, random_file, run_child, stat

log = logging.getLogger("bench")

GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
CHILD = [PY, "-m", "bench.children"]


@dataclass
class Method:
    transport: str
    name: str
    agent: bool
    prepare: Callable[[int], tuple[list[str], dict[str, str] | None]]  # run number -> (argv, extra env)
    after: Callable[[], None] = lambda: None


@dataclass
class BigRow:
    transport: str
    method: str
    agent: bool
    mbps: Stat  # size / process wall time (start-up included, for every tool alike)
    upload_mbps: Stat | None  # size / time of the upload call alone (in-process children only)
    peak_mib: Stat
    note: str = ""
    # user+sys CPU seconds of the uploading process: on a shared, saturated machine the wall
    # times follow the CPU each tool burns, so this is the figure that survives the noise.
    cpu_s: Stat | None = None


@dataclass
class SmallRow:
    transport: str
    method: str
    agent: bool
    files_per_s: Stat
    note: str = ""
    journal: str = "SQLite"  # the agent's journal (peers: unused)
    # Agent: count / (drop → last uploaded − stable_seconds), issue 15's measure.
    minus_window: Stat | None = None


@dataclass
class LatencyRow:
    transport: str
    n: int
    stable_seconds: float
    claim_p50: float
    start_p50: float
    start_p99: float
    done_p50: float
    done_p99: float
    backlog: int = 0  # SUBMITTED submissions the tracking cycle worked through meanwhile (0: none)
    poll_seconds: float | None = None  # the daemon's tracking poll interval (None: 3600 s, no tracking)
    note: str = ""


@dataclass
class QueueResult:
    files: int
    queued: int
    seconds_to_queue: float
    rss_mib: float
    hwm_mib: float
    cpu_pct_backlog: float
    backlog_seconds: float
    note: str = ""
    journal: str = "SQLite"


@dataclass
class IdleResult:
    seconds: float
    cpu_seconds: float
    rss_mib: float
    journal: str = "SQLite"
    server_cpu_seconds: float | None = None  # the PostgreSQL server's processes, same interval

    @property
    def cpu_pct(self) -> float:
        return 100 * self.cpu_seconds / self.seconds


@dataclass
class Ceilings:
    disk_cold_mbps: float | None
    disk_warm_mbps: float
    loopback_mbps: float
    size_mib: int
    disk_note: str = ""


@dataclass
class Ctx:
    """What the parts share: sizes, folders and the running servers (None when unavailable)."""

    work: Path  # on disk: journals, outboxes
    shm: Path  # RAM when possible: big files
    tools: object
    sshd: object | None
    s3: object | None
    sandbox: object | None
    runs: int
    big_mib: int
    small_files: int
    small_kib: int
    latency_files: int
    latency_interval: float
    queued_files: int
    idle_seconds: float
    tracking_backlog: int
    backlog_seconds: float
    stable_seconds: float
    stop_wait: float = 20.0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    agent_cfg: Path | None = None
    transports: tuple[str, ...] = ("sftp", "s3", "rest")  # the ones asked for and available

    def env(self, extra: dict[str, str] | None) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=str(ROOT), **(extra or {}))


def _mb(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


# ---------------------------------------------------------------------------------------------
# 1. one big file per transport

def big_methods(ctx: Ctx, big: Path) -> list[Method]:
    t = ctx.tools
    out: list[Method] = []
    if ctx.sshd is not None:
        sshd = ctx.sshd
        in_dir = sshd.in_dir()
        out.append(Method("sftp", "agent SftpTransport (paramiko, daemon defaults)", True,
                          lambda r: ([*CHILD, "agent", "--config", str(ctx.agent_cfg), "--route", ROUTES["sftp"][0],
                                      "--file", str(big), "--name", f"agent{r}.dat"], None),
                          lambda: clear_dir(in_dir)))
        for cipher in GCM:
            if t.sftp and cipher in sshd.ciphers:
                batch = ctx.work / f"batch-{cipher.split('@')[0]}"
                batch.write_text(f"put {big} {in_dir}/sftp.dat\n")
                out.append(Method("sftp", f"OpenSSH sftp -b ({cipher})", False,
                                  lambda r, b=batch, c=cipher: ([t.sftp, "-q", *sshd.ssh_opts(c), "-b", str(b),
                                                                 f"{sshd.user}@{sshd.host}"], None),
                                  lambda: clear_dir(in_dir)))
        if t.rclone:
            out.append(Method("sftp", "rclone copyto over sftp (aes128-gcm)", False,
                              lambda r: ([t.rclone, "copyto", str(big), f"bsftp:{in_dir}/rclone.dat"],
                                         {**sshd.rclone_env(GCM[0]), "RCLONE_CONFIG": "/dev/null"}),
                              lambda: clear_dir(in_dir)))
    if ctx.s3 is not None and "s3" in ctx.transports:
        s3 = ctx.s3
        out.append(Method("s3", "agent S3Transport (64 MiB parts, 4 threads, parts hashed as sent, ETags checked)", True,
                          lambda r: ([*CHILD, "agent-s3", "--endpoint", s3.url, "--bucket", "sandbox-filex",
                                      "--file", str(big), "--name", f"agent{r}.dat"], s3.env()), s3.clear))
        if t.aws:
            out.append(Method("s3", "aws s3 cp (defaults: 8 MiB parts, 10 threads)", False,
                              lambda r: ([t.aws, "--endpoint-url", s3.url, "s3", "cp", "--only-show-errors", str(big),
                                          "s3://sandbox-filex/0001/app2/in/aws.dat"], s3.env()), s3.clear))
        out.append(Method("s3", "boto3 upload_file tuned (64 MiB parts, 10 threads)", False,
                          lambda r: ([*CHILD, "boto3", "--endpoint", s3.url, "--file", str(big), "--name",
                                      f"boto3-{r}.dat"], s3.env()), s3.clear))
    if ctx.s3 is not None and "rest" in ctx.transports:
        # Both PUT to pre-signed URLs of the S3 server above (rclone serve s3), not to the sandbox's
        # moto, whose Python server and processor capped both at ~130-230 MB/s. The agent runs
        # RestTransport.upload itself; only fileX's "upload URL" call is an in-process stub.
        s3 = ctx.s3
        out.append(Method("rest", "agent RestTransport (httpx, streamed pre-signed PUT, sha256 as sent)", True,
                          lambda r: ([*CHILD, "agent-rest", "--url-file",
                                      str(s3.presign_put(f"0001/app1/in/agent{r}.dat", ctx.work / "rest.url")),
                                      "--file", str(big), "--name", f"agent{r}.dat"], None), s3.clear))
        if t.curl:
            out.append(Method("rest", "curl -T on a pre-signed URL", False,
                              lambda r: (_curl_cmd(ctx, big, f"0001/app1/in/curl{r}.dat"), None), s3.clear))
    return out


def _curl_cmd(ctx: Ctx, big: Path, key: str) -> list[str]:
    """A fresh pre-signed PUT URL, kept out of argv (it is a bearer secret) in a 0600 curl config."""
    url = ctx.s3.presign_put(key, ctx.work / "rest.url").read_text()
    conf = ctx.work / "curl.conf"
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f'url = "{url}"\n')
    return [ctx.tools.curl, "-sS", "-f", "-o", "/dev/null", "-H", "Expect:", "-T", str(big), "-K", str(conf)]


def _children_cpu() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run_method(ctx: Ctx, m: Method, run: int):  # noqa: ANN202 - run_child's result
    """One upload by ``m``, then its clean-up (and the curl config's, which holds a signed URL).

    ``res.cpu`` is the child's user+sys: the rusage of reaped children grows by exactly that one
    (the bench reaps no other process while it runs)."""
    try:
        cmd, env = m.prepare(run)
        cpu0 = _children_cpu()
        res = run_child(cmd, env=ctx.env(env), cwd=ROOT)
        res.cpu = _children_cpu() - cpu0  # type: ignore[attr-defined]
        return res
    finally:
        (ctx.work / "curl.conf").unlink(missing_ok=True)
        (ctx.work / "rest.url").unlink(missing_ok=True)
        m.after()


def _warm_up(ctx: Ctx, methods: list[Method]) -> None:
    """One uncounted upload per transport, by a peer, before the measured runs.

    The first upload to a freshly started server is slower whoever makes it (measured on rclone
    serve s3: boto3 first 173 MB/s, then 208-216; the agent first 137-162, then 194-217), which
    would otherwise count against whichever method comes first in the list: the agent.
    """
    for transport in dict.fromkeys(m.transport for m in methods):
        m = next((x for x in methods if x.transport == transport and not x.agent), None)
        if m is None:
            continue
        try:
            _run_method(ctx, m, -1)
            log.info("warm-up (not counted): %s", m.name)
        except ChildFailed as exc:
            log.warning("warm-up %s: %s", m.name, exc)


def part_big(ctx: Ctx) -> list[BigRow]:
    size = ctx.big_mib * MIB
    big = random_file(ctx.shm / "big.dat", size)
    methods = big_methods(ctx, big)
    walls: dict[int, list[float]] = {i: [] for i in range(len(methods))}
    ups: dict[int, list[float]] = {i: [] for i in range(len(methods))}
    peaks: dict[int, list[float]] = {i: [] for i in range(len(methods))}
    cpus: dict[int, list[float]] = {i: [] for i in range(len(methods))}
    notes: dict[int, str] = {}
    try:
        _warm_up(ctx, methods)
        for run in range(ctx.runs):
            for i, m in enumerate(methods):  # interleaved: drift over time hits every method alike
                try:
                    res = _run_method(ctx, m, run)
                except ChildFailed as exc:
                    notes[i] = f"failed: {exc}"[:300]
                    log.warning("%s: %s", m.name, exc)
                    continue
                walls[i].append(_mb(size, res.wall))
                peaks[i].append(res.peak_mib)
                cpus[i].append(res.cpu)
                line = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
                if line.startswith("{"):
                    data = json.loads(line)
                    ups[i].append(_mb(size, float(data["seconds"])))
                    if data.get("cipher"):
                        notes[i] = f"negotiated {data['cipher']}"
                log.info("1 GiB-class %s run %d: %.0f MB/s, peak RSS %.0f MiB", m.name, run + 1, walls[i][-1],
                         res.peak_mib)
    finally:
        big.unlink(missing_ok=True)
    rows = []
    for i, m in enumerate(methods):
        if not walls[i]:
            rows.append(BigRow(m.transport, m.name, m.agent, Stat(0, 0, 0, 0), None, Stat(0, 0, 0, 0),
                               notes.get(i, "no result")))
            continue
        rows.append(BigRow(m.transport, m.name, m.agent, stat(walls[i]), stat(ups[i]) if ups[i] else None,
                           stat(peaks[i]), notes.get(i, ""), stat(cpus[i])))
    return rows


# ---------------------------------------------------------------------------------------------
# 2. many small files, 3. latency: the agent's daemon

def _make_files(folder: Path, prefix: str, n: int, kib: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"{prefix}{i:05d}.csv"
        p.write_bytes(os.urandom(kib * 1024))
        out.append(p)
    return out


def _settle(ctx: Ctx, transport: str) -> None:
    if transport == "sftp":
        clear_dir(ctx.sshd.in_dir())
    else:
        _, org, app = ROUTES[transport]
        ctx.sandbox.settle(org, app)


def small_peers(ctx: Ctx, transport: str, folder: Path) -> list[tuple[str, list[str], dict[str, str] | None]]:
    t = ctx.tools
    peers: list[tuple[str, list[str], dict[str, str] | None]] = []
    if transport == "sftp":
        sshd = ctx.sshd
        in_dir = sshd.in_dir()
        if t.rclone:
            peers.append(("rclone copy over sftp (4 transfers, aes128-gcm)",
                          [t.rclone, "copy", str(folder), f"bsftp:{in_dir}"],
                          {**sshd.rclone_env(GCM[0]), "RCLONE_CONFIG": "/dev/null"}))
        if t.sftp:
            batch = folder.parent / (folder.name + ".batch")
            batch.write_text("".join(f"put {p} {in_dir}/{p.name}\n" for p in sorted(folder.iterdir())))
            peers.append(("OpenSSH sftp -b, one put per file (aes128-gcm)",
                          [t.sftp, "-q", *sshd.ssh_opts(GCM[0]), "-b", str(batch), f"{sshd.user}@{sshd.host}"], None))
    elif transport == "s3":
        sb = ctx.sandbox
        prefix = "0001/app2/in/"
        if t.rclone:
            env = {"RCLONE_CONFIG": "/dev/null", "RCLONE_CONFIG_BS3_TYPE": "s3", "RCLONE_CONFIG_BS3_PROVIDER": "Other",
                   "RCLONE_CONFIG_BS3_ACCESS_KEY_ID": "sandbox-admin",
                   "RCLONE_CONFIG_BS3_SECRET_ACCESS_KEY": "sandbox-admin-secret",
                   "RCLONE_CONFIG_BS3_ENDPOINT": sb.s3_url, "RCLONE_CONFIG_BS3_REGION": "us-east-1",
                   "RCLONE_CONFIG_BS3_FORCE_PATH_STYLE": "true"}
            peers.append(("rclone copy to S3 (4 transfers)", [t.rclone, "copy", str(folder), f"bs3:{sb.bucket}/{prefix}"],
                          env))
        if t.aws:
            peers.append(("aws s3 cp --recursive", [t.aws, "--endpoint-url", sb.s3_url, "s3", "cp", "--recursive",
                                                     "--only-show-errors", str(folder), f"s3://{sb.bucket}/{prefix}"],
                          sb.admin_env()))
        peers.append(("boto3 put_object loop (one client)",
                      [*CHILD, "boto3-loop", "--endpoint", sb.s3_url, "--bucket", sb.bucket, "--prefix", prefix,
                       "--dir", str(folder)], sb.admin_env()))
    else:
        sb = ctx.sandbox
        peers.append(("plain httpx loop: URL request + PUT per file",
                      [*CHILD, "rest-loop", "--token-url", sb.token_url, "--api", sb.api, "--client-id",
                       "sandbox-client", "--secret-file", str(sb.secret_file), "--org", "0001", "--app", "app1",
                       "--dir", str(folder)], None))
    return peers


def part_small(ctx: Ctx, daemon: Daemon, journal: Journal, transports: list[str], *, peers: bool = True,
               label: str = "SQLite", tag: str = "") -> list[SmallRow]:
    """``peers`` False: the agent alone (a second journal; the peers were measured with the first).
    ``tag`` keeps the file names apart from an earlier pass's."""
    rows: list[SmallRow] = []
    n, kib = ctx.small_files, ctx.small_kib
    for transport in transports:
        route = ROUTES[transport][0]
        outbox = ctx.work / "outbox" / route
        agent_rates: list[float] = []
        pipe_rates: list[float] = []
        window_rates: list[float] = []
        peer_rates: dict[str, list[float]] = {}
        peer_notes: dict[str, str] = {}
        for run in range(ctx.runs):
            prefix = f"many{tag}{run}{transport}_"
            stage = ctx.work / "stage" / f"{transport}{run}"
            files = _make_files(stage, prefix, n, kib)
            t0 = datetime.now(timezone.utc)
            for p in files:  # "dropped at once": renames into the outbox, same filesystem
                os.rename(p, outbox / p.name)
            done = journal.wait_uploaded(route, prefix, n, timeout=max(120.0, n * 0.5))
            last = max(r.uploaded_at for r in done)
            first = min(r.upload_started_at or r.uploaded_at for r in done)
            agent_rates.append(n / (last - t0).total_seconds())
            pipe_rates.append(n / max((last - first).total_seconds(), 1e-3))
            window_rates.append(n / max((last - t0).total_seconds() - ctx.stable_seconds, 1e-3))
            log.info("%d small files by the agent (%s journal) over %s: %.0f files/s", n, label, transport,
                     agent_rates[-1])
            _settle(ctx, transport)
            if not peers:
                continue
            folder = ctx.work / "stage" / f"peer-{transport}{run}"
            _make_files(folder, f"peer{run}{transport}_", n, kib)
            for name, cmd, env in small_peers(ctx, transport, folder):
                try:
                    res = run_child(cmd, env=ctx.env(env), cwd=ROOT, timeout=max(300.0, n * 2.0))
                    peer_rates.setdefault(name, []).append(n / res.wall)
                    log.info("%d small files by %s: %.0f files/s", n, name, peer_rates[name][-1])
                except ChildFailed as exc:
                    peer_rates.setdefault(name, [])
                    peer_notes[name] = f"failed: {exc}"[:300]
                    log.warning("%s: %s", name, exc)
                _settle(ctx, transport)
            for p in folder.iterdir():
                p.unlink()
        rows.append(SmallRow(transport, "agent daemon: drop → last uploaded", True, stat(agent_rates),
                             f"stable_seconds = {ctx.stable_seconds}; upload phase alone "
                             f"(first upload start → last uploaded): {stat(pipe_rates).fmt()} files/s",
                             journal=label, minus_window=stat(window_rates)))
        for name, rates in peer_rates.items():
            rows.append(SmallRow(transport, name, False, stat(rates) if rates else Stat(0, 0, 0, 0),
                                 peer_notes.get(name, "")))
    return rows


def _drip(ctx: Ctx, journal: Journal, transport: str, outbox: Path, prefix: str) -> LatencyRow:
    """``ctx.latency_files`` files written straight into ``outbox``, one every ``latency_interval``.

    One uncounted file first: a daemon's first upload over a transport builds its client and
    fetches its tokens (2-3 s for S3: boto3, FIP token, S3 transfer tokens), and the files behind
    it wait; that is start-up, not the steady latency measured here."""
    route = ROUTES[transport][0]
    (outbox / f"{prefix}warmup.csv").write_bytes(os.urandom(ctx.small_kib * 1024))
    journal.wait_uploaded(route, f"{prefix}warmup", 1, timeout=120)
    prefix += "f"
    closed: dict[str, datetime] = {}
    for i in range(ctx.latency_files):
        name = f"{prefix}{i:05d}.csv"
        with open(outbox / name, "wb") as f:
            f.write(os.urandom(ctx.small_kib * 1024))
        closed[name] = datetime.now(timezone.utc)
        time.sleep(ctx.latency_interval)
    done = journal.wait_uploaded(route, prefix, ctx.latency_files, timeout=300)
    claim = [(r.created_at - closed[r.file_name]).total_seconds() for r in done]
    start = [((r.upload_started_at or r.uploaded_at) - closed[r.file_name]).total_seconds() for r in done]
    fin = [(r.uploaded_at - closed[r.file_name]).total_seconds() for r in done]
    return LatencyRow(transport, len(done), ctx.stable_seconds, percentile(claim, 50), percentile(start, 50),
                      percentile(start, 99), percentile(fin, 50), percentile(fin, 99))


def part_latency(ctx: Ctx, journal: Journal, transports: list[str]) -> list[LatencyRow]:
    rows = []
    for transport in transports:
        outbox = ctx.work / "outbox" / ROUTES[transport][0]
        rows.append(_drip(ctx, journal, transport, outbox, f"lat{transport}_"))
        log.info("latency over %s: finish p50 %.2f s, p99 %.2f s", transport, rows[-1].done_p50, rows[-1].done_p99)
        _settle(ctx, transport)
    return rows


BUSY_POLL_SECONDS = 1.0
OVERRUN = "is taking longer than its interval"


def part_latency_busy(ctx: Ctx, transports: list[str]) -> list[LatencyRow]:
    """Part 3 again while the tracking cycle works through a backlog: a fresh daemon polling
    tracking every second over a journal pre-loaded with ``ctx.tracking_backlog`` SUBMITTED
    submissions that await their outcome (REST ones whose fileX record says "Request Received",
    S3 and SFTP ones that no record matches yet), spread over the bench's routes."""
    base = ctx.work / "busy"
    outboxes = base / "outbox"
    cfg = write_config(base / "filex-agent.toml", base / "agent", outboxes, sandbox=ctx.sandbox, sshd=ctx.sshd,
                       transports=tuple(transports), stable_seconds=ctx.stable_seconds,
                       poll_seconds=BUSY_POLL_SECONDS)
    journal = Journal(base / "agent" / "journal.sqlite3")
    t0 = time.monotonic()
    _preload_backlog(ctx, cfg, journal.path, transports, ctx.tracking_backlog)
    log.info("tracking backlog of %d submissions pre-loaded in %.0f s", ctx.tracking_backlog, time.monotonic() - t0)
    daemon = Daemon(cfg, base / "daemon.log").start()
    rows = []
    try:
        for transport in transports:
            before = _log_count(daemon.log, OVERRUN)
            c0, w0 = daemon.cpu(), time.monotonic()
            row = _drip(ctx, journal, transport, outboxes / ROUTES[transport][0], f"busy{transport}_")
            cpu = 100 * (daemon.cpu() - c0) / (time.monotonic() - w0)
            row.backlog = journal.count(("SUBMITTED",))
            row.poll_seconds = BUSY_POLL_SECONDS
            overran = _log_count(daemon.log, OVERRUN) > before
            row.note = (f"daemon CPU {cpu:.0f}% of a core; load average {loadavg()}"
                        + ("; the tracking cycle overran its interval" if overran else ""))
            rows.append(row)
            log.info("latency over %s, tracking busy: finish p50 %.2f s, p99 %.2f s (%s)", transport, row.done_p50,
                     row.done_p99, row.note)
            _settle(ctx, transport)
    finally:
        daemon.stop()
    return rows


def _log_count(path: Path, text: str) -> int:
    try:
        return path.read_text(errors="replace").count(text)
    except OSError:
        return 0


def _preload_backlog(ctx: Ctx, cfg: Path, path: Path, transports: list[str], n: int) -> None:
    """``n`` SUBMITTED rows, uploaded a moment ago, spread over ``transports``' routes. The REST
    ones get a real fileX record (an upload URL asked for and never used: "Request Received",
    pending for ever); S3 and SFTP ones have no tracking id yet, so every cycle looks for theirs
    among all of fileX's records (fileX answers the whole 90 days in one list)."""
    import hashlib
    import sqlite3

    from filex_agent.store.sqlite import SQLiteStore

    SQLiteStore(path).close()  # the schema, as the daemon makes it
    rest_ids = _sandbox_records(ctx, cfg, sum(1 for i in range(n) if transports[i % len(transports)] == "rest"))
    now = datetime.now(timezone.utc).isoformat()
    rows = []
    for i in range(n):
        transport = transports[i % len(transports)]
        route, org, app = ROUTES[transport]
        name = f"backlog{i:06d}.csv"
        spool = str(ctx.work / "busy" / "spool" / name)
        tid = rest_ids.pop() if transport == "rest" else None
        rows.append((route, org, app, transport, name, spool, spool, "SUBMITTED", 1024,
                     hashlib.sha256(name.encode()).hexdigest(), tid, f"{org}/{app}/in", 1, now, now, now, now))
    db = sqlite3.connect(path)
    try:
        with db:
            db.executemany("INSERT INTO submissions (route, org, application, transport, file_name, source_path, "
                           "local_path, state, size, sha256, tracking_id, upload_location, attempts, created_at, "
                           "updated_at, upload_started_at, uploaded_at) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    finally:
        db.close()


def _sandbox_records(ctx: Ctx, cfg: Path, n: int) -> list[str]:
    """``n`` tracking ids of fresh fileX records: upload URLs asked for (and never used)."""
    from filex_agent.api import FilexClient
    from filex_agent.config import load_config
    from filex_agent.connections import Connections
    from filex_agent.http import RateLimiter

    conns = Connections(load_config(cfg))
    try:
        # The agent's own client, without its 20 requests/s limit (the sandbox has none).
        api = FilexClient(ctx.sandbox.api, conns.tokens("fip"), http=conns.http, retry=conns.retry,
                          limiter=RateLimiter(1e9), allow_insecure=True)
        _, org, app = ROUTES["rest"]
        with ThreadPoolExecutor(8) as pool:  # the sandbox answers each in a few ms; in parallel on a busy host
            return list(pool.map(lambda i: api.upload_url(org, app, f"backlog-url{i:06d}.csv").trackingId, range(n)))
    finally:
        conns.close()


# ---------------------------------------------------------------------------------------------
# 4. memory with many files queued, CPU while idle

def part_queue(ctx: Ctx, timeout: float, kind: JournalKind = SQLITE) -> QueueResult:
    """A REST route whose fileX address accepts connections and never answers (a black hole): the
    upload workers wait on their read timeout and every other file stays QUEUED. The files exist
    before the daemon starts: its start-up scan queues them."""
    base = ctx.work / ("queue" if kind.pg is None else "queue-pg")
    outboxes = base / "outbox"
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(1024)  # never accept(): the kernel completes handshakes, nobody ever answers
    table, journal = kind.setup("queue", base / "agent")
    try:
        cfg = write_config(base / "filex-agent.toml", base / "agent", outboxes, transports=("rest",),
                           stable_seconds=ctx.stable_seconds, api_override=f"http://127.0.0.1:{hole.getsockname()[1]}",
                           max_attempts=1, read_timeout=3600, journal=table)
        outbox = outboxes / ROUTES["rest"][0]
        for i in range(ctx.queued_files):  # unique content: duplicates would be HELD, not QUEUED
            (outbox / f"q{i:06d}.csv").write_bytes(b"%d," % i + os.urandom(32))
        result = _measure_backlog(ctx, cfg, base, timeout, journal)
        result.journal = kind.label
        return result
    finally:
        hole.close()
        journal.close()


def _measure_backlog(ctx: Ctx, cfg: Path, base: Path, timeout: float, journal: Journal) -> QueueResult:
    daemon = Daemon(cfg, base / "daemon.log")
    t0 = time.monotonic()
    daemon.start()
    note = ""
    try:
        hwm = 0.0
        last_log = t0
        while True:
            hwm = max(hwm, daemon.hwm_mib())
            queued = journal.count(("QUEUED", "UPLOADING"))
            if queued >= ctx.queued_files:
                break
            now = time.monotonic()
            if now - t0 > timeout:
                note = f"only {queued:,} of {ctx.queued_files:,} queued after {timeout:.0f} s"
                break
            if now - last_log > 30:
                last_log = now
                log.info("backlog: %d of %d queued, RSS %.0f MiB", queued, ctx.queued_files, daemon.rss_mib())
            time.sleep(0.5)
        took = time.monotonic() - t0
        c0, w0 = daemon.cpu(), time.monotonic()
        time.sleep(ctx.backlog_seconds)
        cpu_pct = 100 * (daemon.cpu() - c0) / (time.monotonic() - w0)
        queued = journal.count(("QUEUED", "UPLOADING"))
        result = QueueResult(ctx.queued_files, queued, took, daemon.rss_mib(), max(hwm, daemon.hwm_mib()), cpu_pct,
                             ctx.backlog_seconds, note)
    finally:
        secs, killed = daemon.stop(wait=ctx.stop_wait)
    if killed:
        result.note = "; ".join(filter(None, [result.note, (
            "after SIGTERM the daemon logged 'filex-agent stopped' once its 5 s grace was over, but the process "
            "did not exit (upload threads blocked on the black hole's read timeout keep it alive); the bench "
            f"killed it after {secs:.0f} s")]))
    return result


def part_idle(ctx: Ctx, transports: list[str], kind: JournalKind = SQLITE) -> IdleResult:
    """A fresh daemon with the bench's routes, default tracking poll (60 s), nothing to do."""
    base = ctx.work / ("idle" if kind.pg is None else "idle-pg")
    table, journal = kind.setup("idle", base / "agent")
    journal.close()
    cfg = write_config(base / "filex-agent.toml", base / "agent", base / "outbox", sandbox=ctx.sandbox,
                       sshd=ctx.sshd, transports=tuple(transports), stable_seconds=ctx.stable_seconds,
                       poll_seconds=60.0, journal=table)
    daemon = Daemon(cfg, base / "daemon.log").start()
    try:
        time.sleep(min(3.0, ctx.idle_seconds))  # start-up work (first scan, first poll) is not idle
        s0 = kind.server_cpu()
        c0, w0 = daemon.cpu(), time.monotonic()
        time.sleep(ctx.idle_seconds)
        secs = time.monotonic() - w0
        s1 = kind.server_cpu()
        return IdleResult(secs, daemon.cpu() - c0, daemon.rss_mib(), kind.label,
                          None if s0 is None or s1 is None else s1 - s0)
    finally:
        daemon.stop()


# ---------------------------------------------------------------------------------------------
# 5. ceilings

def part_ceilings(ctx: Ctx) -> Ceilings:
    size = ctx.big_mib * MIB
    path = random_file(ctx.work / "disk.dat", size)
    note = ""
    try:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        dropped = False
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            dropped = True
            note = "page cache dropped (/proc/sys/vm/drop_caches)"
        except OSError:
            fd = os.open(path, os.O_RDONLY)
            try:  # clean pages of this file only; works without root
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                dropped = True
                note = "file's pages evicted with posix_fadvise(DONTNEED)"
            finally:
                os.close(fd)
        cold = _read_rate(path) if dropped else None
        warm = _read_rate(path)
    finally:
        path.unlink(missing_ok=True)
    return Ceilings(cold, warm, _loopback_rate(size), ctx.big_mib, note)


def _read_rate(path: Path) -> float:
    buf = bytearray(MIB)
    n = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while (k := f.readinto(buf)) > 0:
            n += k
    return _mb(n, time.perf_counter() - t0)


_RECEIVER = """
import socket, sys
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept(); buf = bytearray(1 << 20); n = 0
while (k := c.recv_into(buf)):
    n += k
c.sendall(str(n).encode()); c.close()
"""


def _loopback_rate(size: int) -> float:
    """One TCP stream over 127.0.0.1, the receiver in another process (the other core)."""
    p = subprocess.Popen([PY, "-c", _RECEIVER], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        port = int(p.stdout.readline())
        block = os.urandom(MIB)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            t0 = time.perf_counter()
            sent = 0
            while sent < size:
                s.sendall(block)
                sent += len(block)
            s.shutdown(socket.SHUT_WR)
            got = int(s.recv(64))
            took = time.perf_counter() - t0
        assert got == sent, (got, sent)
        return _mb(sent, took)
    finally:
        p.wait(30)

