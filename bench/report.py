"""RESULTS.md from the measurements: machine, versions, settings, tables, ratios, targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from bench.parts import BigRow, Ceilings, IdleResult, LatencyRow, QueueResult, SmallRow

NAMES = {"sftp": "SFTP", "s3": "S3 direct", "rest": "REST (pre-signed PUT)"}


@dataclass
class Results:
    command: str
    machine: dict[str, str]
    versions: dict[str, str]
    settings: dict[str, str]
    servers: dict[str, str]
    big_mib: int
    small_files: int
    big: list[BigRow] = field(default_factory=list)
    small: list[SmallRow] = field(default_factory=list)
    latency: list[LatencyRow] = field(default_factory=list)
    queue: list[QueueResult] = field(default_factory=list)  # one per journal
    idle: list[IdleResult] = field(default_factory=list)  # one per journal
    ceilings: Ceilings | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # What the issue 15 targets need to tell "not run" from "measured".
    parts: set[int] = field(default_factory=lambda: {1, 2, 3, 4, 5, 6})
    journals: list[str] = field(default_factory=lambda: ["SQLite"])
    stable_seconds: float = 0.5
    queued_files: int = 100_000
    # Part 6 (bench.journal_scale): {journal: {rows: {step: ms}}} over scale_sizes.
    scale: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    scale_sizes: list[int] = field(default_factory=list)


def _ok(flag: bool) -> str:
    return "**MET**" if flag else "**NOT MET**"


def _best(rows: list, transport: str, key) -> tuple[object | None, object | None]:  # noqa: ANN001
    agent = next((r for r in rows if r.transport == transport and r.agent and key(r).n), None)
    peers = [r for r in rows if r.transport == transport and not r.agent and key(r).n]
    best = max(peers, key=lambda r: key(r).median) if peers else None
    return agent, best


def targets(res: Results) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    scale = "" if res.big_mib == 1024 else f" (this run: {res.big_mib} MiB, not the target's 1 GiB)"
    agent, best = _best([r for r in res.big if not r.method.startswith("rclone")], "s3", lambda r: r.mbps)
    if agent and best:
        ratio = agent.mbps.median / best.mbps.median
        out.append((f"S3: 1 GiB upload ≥ 90% of the best of `aws s3 cp` and tuned boto3{scale}",
                    f"{agent.mbps.median:.0f} vs {best.mbps.median:.0f} MB/s ({best.method}) = {ratio:.2f}×",
                    _ok(ratio >= 0.90)))
        out.append(("S3: agent peak RSS < 200 MB during that upload", f"{agent.peak_mib.hi:.0f} MiB (highest run)",
                    _ok(agent.peak_mib.hi * 1.048576 < 200)))
    agent, _ = _best(res.big, "sftp", lambda r: r.mbps)
    openssh = [r for r in res.big if r.transport == "sftp" and r.method.startswith("OpenSSH") and r.mbps.n]
    if agent and openssh:
        best = max(openssh, key=lambda r: r.mbps.median)
        ratio = agent.mbps.median / best.mbps.median
        out.append((f"SFTP: 1 GiB upload ≥ 0.40× OpenSSH `sftp` with its fastest allowed cipher{scale}",
                    f"{agent.mbps.median:.0f} vs {best.mbps.median:.0f} MB/s ({best.method}) = {ratio:.2f}×",
                    _ok(ratio >= 0.40)))
    agent = next((r for r in res.big if r.transport == "rest" and r.agent and r.mbps.n), None)
    curl = next((r for r in res.big if r.transport == "rest" and r.method.startswith("curl") and r.mbps.n), None)
    if agent and curl:
        ratio = agent.mbps.median / curl.mbps.median
        out.append((f"REST: 1 GiB pre-signed PUT ≥ 0.9× `curl -T`, both to `rclone serve s3`{scale}",
                    f"{agent.mbps.median:.0f} vs {curl.mbps.median:.0f} MB/s = {ratio:.2f}×", _ok(ratio >= 0.90)))
    agent = next((r for r in res.small if r.transport == "sftp" and r.agent and r.files_per_s.n), None)
    rclone = next((r for r in res.small if r.transport == "sftp" and r.method.startswith("rclone")
                   and r.files_per_s.n), None)
    if agent and rclone:
        scale_n = "" if res.small_files == 1000 else f" (this run: {res.small_files} files)"
        ratio = agent.files_per_s.median / rclone.files_per_s.median
        out.append((f"SFTP: 1,000 small files at least as fast as `rclone copy`{scale_n}",
                    f"{agent.files_per_s.median:.0f} vs {rclone.files_per_s.median:.0f} files/s = {ratio:.2f}× "
                    "(agent: drop → last uploaded, stability window included)", _ok(ratio >= 1.0)))
    return out


NOT_RUN = "not run"


def _row(target: str, journal: str, measured: str, result: str) -> tuple[str, str, str, str]:
    return target, journal, measured, result


def _small_target(res: Results, transport: str, peer_prefix: str, peer_name: str) -> list[tuple[str, ...]]:
    scale = "" if res.small_files == 1000 else f" (this run: {res.small_files} files)"
    target = (f"{NAMES[transport]}: 1,000 small files through the daemon ≥ 1.0× {peer_name}, drop → last uploaded "
              f"with the stability window ({res.stable_seconds:g} s) subtracted{scale}")
    if 2 not in res.parts:
        return [_row(target, "–", "–", NOT_RUN)]
    peer = next((r for r in res.small if r.transport == transport and not r.agent and r.method.startswith(peer_prefix)
                 and r.files_per_s.n), None)
    out = []
    for journal in res.journals:
        agent = next((r for r in res.small if r.transport == transport and r.agent and r.journal == journal
                      and r.minus_window is not None and r.minus_window.n), None)
        if agent is None or peer is None:
            why = "no agent result" if agent is None else f"no {peer_name} result"
            out.append(_row(target, journal, f"{why} (see *Skipped and notes*)", NOT_RUN))
            continue
        ratio = agent.minus_window.median / peer.files_per_s.median
        out.append(_row(target, journal, f"{agent.minus_window.median:.0f} vs {peer.files_per_s.median:.0f} files/s = "
                        f"**{ratio:.2f}×** (with the window: {agent.files_per_s.median:.0f} files/s)", _ok(ratio >= 1.0)))
    return out


def targets15(res: Results) -> list[tuple[str, str, str, str]]:
    """Issue 15's targets: (target, journal, measured, result) with result MET, NOT MET or not run."""
    out: list[tuple[str, str, str, str]] = []
    out += _small_target(res, "sftp", "rclone", "`rclone copy`")
    out += _small_target(res, "s3", "aws s3 cp", "`aws s3 cp --recursive`")

    scale = "" if res.big_mib == 1024 else f" (this run: {res.big_mib} MiB)"
    # SFTP 1 GiB against OpenSSH with the cipher the agent negotiated (its note says which).
    target = f"SFTP: 1 GiB upload ≥ 0.8× OpenSSH `sftp` with the same cipher{scale}"
    agent = next((r for r in res.big if r.transport == "sftp" and r.agent and r.mbps.n), None)
    openssh = [r for r in res.big if r.transport == "sftp" and r.method.startswith("OpenSSH") and r.mbps.n]
    if 1 not in res.parts:
        out.append(_row(target, "–", "–", NOT_RUN))
    elif agent is None or not openssh:
        out.append(_row(target, "–", "no result (see *Skipped and notes*)", NOT_RUN))
    else:
        cipher = agent.note.split("negotiated ", 1)[1].split()[0] if "negotiated " in agent.note else ""
        same = [r for r in openssh if cipher and cipher in r.method]
        peer = same[0] if same else max(openssh, key=lambda r: r.mbps.median)
        ratio = agent.mbps.median / peer.mbps.median
        what = cipher or "cipher not reported: against the fastest OpenSSH row"
        out.append(_row(target, "–", f"{agent.mbps.median:.0f} vs {peer.mbps.median:.0f} MB/s ({what}) = "
                        f"**{ratio:.2f}×**", _ok(ratio >= 0.8)))

    target = f"REST: 1 GiB upload ≥ 0.9× `curl -T` on a pre-signed URL{scale}"
    agent = next((r for r in res.big if r.transport == "rest" and r.agent and r.mbps.n), None)
    curl = next((r for r in res.big if r.transport == "rest" and not r.agent and "curl" in r.method and r.mbps.n), None)
    if 1 not in res.parts:
        out.append(_row(target, "–", "–", NOT_RUN))
    elif agent is None or curl is None:
        out.append(_row(target, "–", "no result (see *Skipped and notes*)", NOT_RUN))
    else:
        ratio = agent.mbps.median / curl.mbps.median
        out.append(_row(target, "–", f"{agent.mbps.median:.0f} vs {curl.mbps.median:.0f} MB/s = **{ratio:.2f}×**",
                        _ok(ratio >= 0.9)))

    n = "" if res.queued_files == 100_000 else f" (this run: {res.queued_files:,} files)"
    for target, judge in (
            (f"100,000 files queued: daemon RSS ≤ 300 MB{n}",
             lambda q: (f"peak {q.hwm_mib:.0f} MiB ({q.rss_mib:.0f} MiB once "
                        + ("all were queued)" if q.queued >= q.files else f"{q.queued:,} were queued)"),
                        q.hwm_mib * 1.048576 <= 300)),
            (f"100,000 files queued: all queued within 60 s{n}",
             lambda q: ((f"{q.seconds_to_queue:.0f} s" if q.queued >= q.files else
                         f"only {q.queued:,} after {q.seconds_to_queue:.0f} s"),
                        q.queued >= q.files and q.seconds_to_queue <= 60))):
        if 4 not in res.parts:
            out.append(_row(target, "–", "–", NOT_RUN))
            continue
        for journal in res.journals:
            q = next((x for x in res.queue if x.journal == journal), None)
            if q is None:
                out.append(_row(target, journal, "no result (see *Skipped and notes*)", NOT_RUN))
            else:
                measured, ok = judge(q)
                out.append(_row(target, journal, measured, _ok(ok)))

    sizes = res.scale_sizes
    span = (f"{sizes[-1]:,} rows within 2× of {sizes[0]:,}" if len(sizes) > 1 else "1,000,000 rows within 2× of 10,000")
    odd = "" if sizes in ([], [10_000, 100_000, 1_000_000]) else " (this run's sizes)"
    target = (f"Journal at scale: tracking cycle, dispatch tick, status line, `status --json` and start-up at "
              f"{span}{odd}")
    if 6 not in res.parts:
        out.append(_row(target, "–", "–", NOT_RUN))
    else:
        from bench.journal_scale import judge

        for journal in res.journals:
            got = res.scale.get(journal)
            if not got or len(sizes) < 2:
                out.append(_row(target, journal, "no result (see *Skipped and notes*)", NOT_RUN))
                continue
            verdicts = judge(sizes, got)
            missed = [f"{label} {ratio:.2f}×" for label, ratio, ok in verdicts if not ok]
            worst = max(verdicts, key=lambda v: v[1])
            measured = ("missed: " + "; ".join(missed)) if missed else f"worst: {worst[0]} {worst[1]:.2f}×"
            out.append(_row(target, journal, measured + " (table: *Journal at scale*)", _ok(not missed)))

    target = "Idle daemon: CPU < 1% of one core"
    if 4 not in res.parts:
        out.append(_row(target, "–", "–", NOT_RUN))
    else:
        for journal in res.journals:
            i = next((x for x in res.idle if x.journal == journal), None)
            if i is None:
                out.append(_row(target, journal, "no result (see *Skipped and notes*)", NOT_RUN))
                continue
            server = ("" if i.server_cpu_seconds is None else
                      f"; the PostgreSQL server meanwhile {100 * i.server_cpu_seconds / i.seconds:.2f}%")
            out.append(_row(target, journal, f"{i.cpu_pct:.2f}% over {i.seconds:.0f} s{server}", _ok(i.cpu_pct < 1.0)))

    limit = res.stable_seconds + 0.5
    # A "tracking busy" variant of part 3 (rows with a backlog) is judged on its own row.
    plain = [r for r in res.latency if not getattr(r, "backlog", 0)]
    busy = [r for r in res.latency if getattr(r, "backlog", 0)]
    variants = [("", plain)] + ([(", while a tracking cycle works through a backlog", busy)] if busy else [])
    for what, rows in variants:
        target = f"Drop → uploaded p99 ≤ stable_seconds + 0.5 s{what}"
        if 3 not in res.parts:
            out.append(_row(target, "SQLite", "–", NOT_RUN))
        elif not rows:
            out.append(_row(target, "SQLite", "no result (see *Skipped and notes*)", NOT_RUN))
        else:
            worst = max(r.done_p99 for r in rows)
            each = ", ".join(f"{NAMES[r.transport].split(' ')[0]} {r.done_p99:.2f}" for r in rows)
            out.append(_row(target, "SQLite", f"p99 {each} s (limit {limit:g} s)", _ok(worst <= limit)))
    return out


README_START, README_END = "<!-- bench.targets:start -->", "<!-- bench.targets:end -->"


def readme_quote(res: Results) -> str:
    """The issue 15 targets table as README.md quotes it (between its markers), with where it comes from."""
    load = res.settings.get("load average (1 min) at start → end", "?").split(" (")[0]
    lines = [README_START,
             f"Issue 15's targets as judged by the last `{res.command}` ({datetime.now(timezone.utc):%Y-%m-%d} UTC, "
             f"load average {load} on {res.machine.get('CPUs (nproc)', '?')} shared cores), copied here by the bench "
             "itself from [bench/RESULTS.md](bench/RESULTS.md#targets-issue-15), which holds every figure, the peers' "
             "and the settings:", "",
             "| target | journal | measured | result |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in targets15(res)]
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(readme: Path, res: Results) -> bool:
    """Replace the quoted targets table in ``readme`` (only where its markers are); whether it did."""
    text = readme.read_text() if readme.exists() else ""
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    readme.write_text(head + readme_quote(res) + rest.split(README_END, 1)[1])
    return True


def render(res: Results) -> str:
    L: list[str] = []
    add = L.append
    add("# Benchmark results")
    add("")
    add(f"Generated by `{res.command}` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Everything runs on one "
        "machine over loopback: **compare the ratios, not the absolutes**. MB/s is 10^6 bytes per second; RSS in "
        "MiB. Each figure is the median of the runs with (min–max) when there was more than one run.")
    add("")
    add("## Targets (issue 15)")
    add("")
    add("Judged by this run, side by side with the peers (one row per journal where the journal matters; *not run*: "
        "that part was left out of this run or produced no result). Sections 1–4 and *Journal at scale* below hold "
        "every figure; the stability window is part of what the daemon does, so the small-file rows subtract it "
        "(drop → last uploaded − `stable_seconds`) and show the rate with it too.")
    add("")
    add("| target | journal | measured | result |")
    add("|---|---|---|---|")
    for a, b, c, d in targets15(res):
        add(f"| {a} | {b} | {c} | {d} |")
    add("")
    tg = targets(res)
    add("## Targets (issues 3 and 4)")
    add("")
    if tg:
        add("| target | measured | result |")
        add("|---|---|---|")
        for a, b, c in tg:
            add(f"| {a} | {b} | {c} |")
    else:
        add("No target could be judged in this run (see *Skipped*).")
    add("")
    add("## Agent / best peer")
    add("")
    add("| measurement | transport | agent | best peer | ratio |")
    add("|---|---|---|---|---|")
    for t in ("sftp", "s3", "rest"):
        agent, best = _best(res.big, t, lambda r: r.mbps)
        if agent and best:
            add(f"| {res.big_mib} MiB upload, MB/s | {NAMES[t]} | {agent.mbps.median:.0f} | "
                f"{best.mbps.median:.0f} ({best.method}) | {agent.mbps.median / best.mbps.median:.2f} |")
    for t in ("sftp", "s3", "rest"):
        agent, best = _best(res.small, t, lambda r: r.files_per_s)
        if agent and best:
            add(f"| {res.small_files} small files, files/s | {NAMES[t]} | {agent.files_per_s.median:.0f} | "
                f"{best.files_per_s.median:.0f} ({best.method}) | "
                f"{agent.files_per_s.median / best.files_per_s.median:.2f} |")
    add("")
    add("## Machine and versions")
    add("")
    add("| | |")
    add("|---|---|")
    for k, v in {**res.machine, **res.versions}.items():
        add(f"| {k} | {v} |")
    add("")
    add("## Servers and settings")
    add("")
    for k, v in res.servers.items():
        add(f"- **{k}**: {v}")
    for k, v in res.settings.items():
        add(f"- {k}: {v}")
    add("")
    if res.big:
        add(f"## 1. One {res.big_mib} MiB file per transport")
        add("")
        add("MB/s = size / wall time of the process doing the upload, start-up included, for every tool alike "
            "(a running daemon pays no start-up: the *upload call* column shows the agent's and boto3's time "
            "inside the process). CPU s is the user+sys time of that process, start-up included: on a "
            "shared machine whose cores are all busy, wall times follow it. Peak RSS is the VmHWM of that process. Before the measured runs, one "
            "uncounted upload per transport by a peer warms each freshly started server (its first upload is "
            "slower whoever makes it).")
        add("")
        add("| transport | method | MB/s (process) | MB/s (upload call) | CPU s (user+sys) | peak RSS MiB | note |")
        add("|---|---|---|---|---|---|---|")
        for r in res.big:
            mb = r.mbps.fmt() if r.mbps.n else "–"
            up = r.upload_mbps.fmt() if r.upload_mbps else "–"
            pk = r.peak_mib.fmt() if r.peak_mib.n else "–"
            name = f"**{r.method}**" if r.agent else r.method
            cpu = r.cpu_s.fmt(1) if r.cpu_s and r.cpu_s.n else "–"
            add(f"| {NAMES[r.transport]} | {name} | {mb} | {up} | {cpu} | {pk} | {r.note} |")
        add("")
        if any(r.transport == "rest" for r in res.big):
            add("REST rows: the agent and curl both PUT the file to a pre-signed URL (boto3 "
                "`generate_presigned_url`) of the S3 server of the S3 rows, not to the sandbox fileX (its Python "
                "moto and processor were the bottleneck of both). The agent's child runs `RestTransport.upload` "
                "itself (streamed body hashed as sent, on_commit, retry policy, answer checks, daemon's default "
                "timeouts); only fileX's \"give me an upload URL\" call is answered by an in-process stub with "
                "that URL. The full path through fileX's API is what parts 2–3 measure.")
            add("")
    if res.small:
        add(f"## 2. {res.small_files} small files per transport")
        add("")
        add("Agent: the files are renamed into the outbox of a running daemon at once; files/s = count / (last "
            "`uploaded_at` in the journal − drop time), so the stability window and the claim (journal rows "
            "fsynced, atomic rename, sha256) are included; *window subtracted* = count / (last `uploaded_at` − drop "
            "time − `stable_seconds`), issue 15's measure. Peers: count / wall time of the tool's process"
            + (", measured once (in the SQLite journal's pass) and compared with both journals' agent rows."
               if len(res.journals) > 1 else "."))
        add("")
        add("| transport | method | journal | files/s | files/s, window subtracted | note |")
        add("|---|---|---|---|---|---|")
        for r in sorted(res.small, key=lambda r: list(NAMES).index(r.transport)):
            name = f"**{r.method}**" if r.agent else r.method
            window = r.minus_window.fmt() if r.agent and r.minus_window and r.minus_window.n else "–"
            add(f"| {NAMES[r.transport]} | {name} | {r.journal if r.agent else '–'} | "
                f"{r.files_per_s.fmt() if r.files_per_s.n else '–'} | {window} | {r.note} |")
        add("")
    if res.latency:
        add("## 3. Latency from close to upload")
        add("")
        add("Files written straight into the outbox one at a time (a new one every "
            f"{res.settings.get('latency interval', '?')}); seconds from the writer's `close()` to the journal's "
            "`created_at` (claimed), `upload_started_at` and `uploaded_at`. The route's `stable_seconds` window is "
            "the floor: a file is taken only after that long without change.")
        add("")
        add("| transport | files | stable_seconds | claimed p50 | start p50 | start p99 | uploaded p50 | uploaded p99 |")
        add("|---|---|---|---|---|---|---|---|")
        for r in res.latency:
            add(f"| {NAMES[r.transport]} | {r.n} | {r.stable_seconds:g} | {r.claim_p50:.2f} | {r.start_p50:.2f} | "
                f"{r.start_p99:.2f} | {r.done_p50:.2f} | {r.done_p99:.2f} |")
        add("")
    if res.queue or res.idle:
        add("## 4. Memory with a backlog, CPU while idle")
        add("")
        if res.queue:
            add(f"{res.queue[0].files:,} files were in a REST route's outbox before the daemon started; fileX's address "
                "accepted connections and never answered (a black hole), so the upload workers waited on their read "
                "timeout and every other file stayed queued.")
            add("")
            add("| journal | files | queued | seconds to queue them all | RSS MiB then | peak RSS MiB | "
                "CPU with the backlog |")
            add("|---|---|---|---|---|---|---|")
            for q in res.queue:
                add(f"| {q.journal} | {q.files:,} | {q.queued:,} | {q.seconds_to_queue:.0f} | {q.rss_mib:.0f} | "
                    f"{q.hwm_mib:.0f} | {q.cpu_pct_backlog:.0f}% of one core over {q.backlog_seconds:g} s |")
            for q in res.queue:
                if q.note:
                    add("")
                    add(f"Note ({q.journal}): {q.note}.")
            add("")
        if res.idle:
            add("Idle daemon (the bench's routes, empty outboxes, tracking poll every 60 s), utime+stime from "
                "/proc/PID/stat:")
            add("")
            for i in res.idle:
                server = ("" if i.server_cpu_seconds is None else
                          f"; the PostgreSQL server's processes meanwhile {100 * i.server_cpu_seconds / i.seconds:.2f}%")
                add(f"- {i.journal} journal: **{i.cpu_pct:.2f}% of one core** ({i.cpu_seconds:.2f} s CPU in "
                    f"{i.seconds:.0f} s), RSS {i.rss_mib:.0f} MiB{server}.")
            add("")
    if res.ceilings:
        c = res.ceilings
        add("## 5. Ceilings of this machine")
        add("")
        add("| what | MB/s |")
        add("|---|---|")
        add(f"| disk read, {c.size_mib} MiB, cold ({c.disk_note or 'cache not dropped'}) | "
            f"{f'{c.disk_cold_mbps:.0f}' if c.disk_cold_mbps else '–'} |")
        add(f"| disk read, same file, page cache warm | {c.disk_warm_mbps:.0f} |")
        add(f"| loopback TCP, one Python stream, receiver in another process | {c.loopback_mbps:.0f} |")
        add("")
    if res.skipped or res.notes:
        add("## Skipped and notes")
        add("")
        for part, why in res.skipped:
            add(f"- skipped {part}: {why}")
        for n in res.notes:
            add(f"- {n}")
        add("")
    return "\n".join(L)
