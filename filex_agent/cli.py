"""Command line: `filex-agent run|routes|status|submit|ls|track|release|profiles|audit|calendar|doctor|nodes|journal`.

Exit codes: 0 ok, 1 operation failed, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from filex_agent.config import Config, ConfigError, load_config
from filex_agent.errors import FilexError
from filex_agent.store import JournalLocked
from filex_agent.hooks import Hooks

log = logging.getLogger("filex_agent")


def _setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    try:
        from filex_agent.logging_setup import configure_logging
    except ImportError:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    configure_logging(level, fmt)


def _load(args) -> Config:
    return load_config(args.config)


def _emit(args, rows: list[dict[str, Any]], columns: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(rows, indent=2, default=str))
        return
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        for r in rows:
            print("  ".join(str(r.get(c, "")) for c in columns))
        return
    table = Table(*columns)
    for r in rows:
        table.add_row(*("" if r.get(c) is None else str(r.get(c)) for c in columns))
    Console(width=200 if not sys.stdout.isatty() else None).print(table)


# -- commands ----------------------------------------------------------------------------
def cmd_run(args) -> int:
    from filex_agent.service import run_service

    if args.sandbox:
        return _run_sandbox(args)
    if not args.config:
        raise ConfigError("--config", "required (or use --sandbox --data-dir DIR)")
    cfg = _load(args)
    return run_service(cfg, Path(args.config))


SANDBOX_EXTRA_MODULES = frozenset({"moto", "werkzeug", "flask", "flask_cors"})


def _run_sandbox(args) -> int:
    from filex_agent.service import prepare_service

    try:
        from filex_agent.sandbox import Sandbox
        from filex_agent.sandbox.agent_config import write_sandbox_config
    except ModuleNotFoundError as exc:
        # The sandbox's dependencies are an extra: a production install does not carry them.
        if (exc.name or "").split(".")[0] not in SANDBOX_EXTRA_MODULES:
            raise
        raise ConfigError("--sandbox", f"the sandbox needs its optional dependencies ({exc.name} is not "
                                       "installed): pip install 'filex-agent[sandbox]'") from None

    _setup_logging("INFO")
    data_dir = Path(args.data_dir or "./demo-data").resolve()
    sb = Sandbox(data_dir / "sandbox", sftp=_sftp_available())
    sb.start()
    try:
        path = write_sandbox_config(sb, data_dir)
        cfg = load_config(path)
        print(f"sandbox fileX at {sb.api_base_url}; config written to {path}")
        print("drop files into these outbox folders (names containing REJECT or PARTIAL get those outcomes):")
        for r in cfg.routes:
            Path(r.outbox).mkdir(parents=True, exist_ok=True)
            print(f"  {r.outbox}    ({r.transport}, org {r.org}, application {r.application})")
        print(f"status: filex-agent status --config {path}")
        if cfg.expectations:
            e = cfg.expectations[0]
            print(f"filing calendar: a file named {e.pattern} on {e.route} is expected every day by {e.due} "
                  f"{e.timezone}; see filex-agent calendar --config {path}")
        service = prepare_service(cfg, path)
        url = service.start_web()
        if url:
            print(f"status web page: {url}")
        sys.stdout.flush()
        return service.run()
    finally:
        sb.stop()


def _sftp_available() -> bool:
    try:
        import filex_agent.sandbox.sftp_server  # noqa: F401
        import filex_agent.transports.sftp  # noqa: F401
    except ImportError:
        return False
    return True


def cmd_routes(args) -> int:
    cfg = _load(args)
    rows = [{"name": r.name, "outbox": str(r.outbox), "org": r.org, "application": r.application,
             "transport": ",".join(r.transports), "credential": r.credential} for r in cfg.routes]
    _emit(args, rows, ["name", "outbox", "org", "application", "transport", "credential"])
    return 0


def status_rows(cfg: Config) -> list[dict[str, Any]]:
    from filex_agent.store import open_store

    store = open_store(cfg.journal_path, journal=cfg.journal)
    try:
        rows = []
        for s in store.list():
            rows.append({
                "id": s.id, "file": s.file_name, "local_path": s.local_path, "route": s.route, "org": s.org,
                "application": s.application, "transport": s.transport, "size": s.size, "sha256": s.sha256,
                "tracking_id": s.tracking_id, "state": s.state.value, "downstream_status": s.downstream_status,
                "reason": s.reason, "flag": s.flag, "attempts": s.attempts,
                "created_at": s.created_at.isoformat(), "updated_at": s.updated_at.isoformat(),
                "feedback": [f.local_path for f in store.feedback_for(s.id) if f.local_path],
            })
        return rows
    finally:
        store.close()


_STATE_STYLE = {"ACCEPTED": "green", "REJECTED": "bold red", "PARTIALLY_REJECTED": "bold yellow",
                "FAILED": "bold red", "HELD": "magenta", "SUBMITTED": "cyan", "UPLOADING": "blue", "QUEUED": "blue",
                "UNCONFIRMED": "bold yellow"}


def _human_size(n: int | None) -> str:
    if n is None:
        return ""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)  # pragma: no cover


def cmd_status(args) -> int:
    cfg = _load(args)
    rows = status_rows(cfg)
    if args.json:
        _emit(args, rows, [])
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(width=200 if not sys.stdout.isatty() else None)
    table = Table("id", "file", "route", "transport", "size", "tracking id", "state", "updated (UTC)",
                  "reason / flag", "feedback", title=f"filex-agent journal: {cfg.journal_path}",
                  show_lines=False, expand=False)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
        note = r["reason"] or ""
        if r["flag"]:
            note = (note + "\n" if note else "") + "⚑ " + r["flag"]
        table.add_row(str(r["id"]), r["file"], r["route"], r["transport"], _human_size(r["size"]),
                      r["tracking_id"] or "", Text(r["state"], style=_STATE_STYLE.get(r["state"], "")),
                      r["updated_at"][:19].replace("T", " "), note, "\n".join(r["feedback"]))
    console.print(table)
    summary = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items())) or "no submissions yet"
    console.print(f"{len(rows)} submission(s): {summary}")
    return 0


def cmd_submit(args) -> int:
    import shutil
    import tempfile

    from filex_agent.daemon import Daemon
    from filex_agent.hooks import MultiHooks
    from filex_agent.spool import check_spool, spool_dir

    cfg = _load(args)
    _setup_logging(cfg.agent.log_level, cfg.agent.log_format)
    route = cfg.route(args.route)
    src = Path(args.file)
    if not src.is_file():
        raise ConfigError("FILE", f"{src} is not a readable file")
    # Copy (not move) the file into the route's spool folder: the user's file stays where it is.
    Path(route.outbox).mkdir(parents=True, exist_ok=True)
    check_spool(route)  # the agent's own folder, not a link a producer planted
    staging = spool_dir(route) / "incoming"
    staging.mkdir(mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=staging, prefix=".copy-")
    with open(fd, "wb") as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out, 1 << 20)
    staged = staging / src.name
    Path(tmp).rename(staged)
    audit = _cli_audit_hooks(cfg)
    progress = _SubmitProgress(src.name, staged.stat().st_size) if _wants_progress(staged) else None
    hooks = [h for h in (audit, progress) if h is not None]
    d = Daemon(cfg, hooks=MultiHooks(*hooks) if hooks else None, role="submit")
    try:
        if progress is not None:
            with progress:
                sub = d.submit_once(route, staged)
        else:
            sub = d.submit_once(route, staged)
    finally:
        _close_oneshot(d, audit)
    print(json.dumps({"id": sub.id, "state": sub.state.value, "tracking_id": sub.tracking_id,
                      "reason": sub.reason, "flag": sub.flag}))
    return 0 if sub.state.value in ("SUBMITTED", "ACCEPTED") else 1


def _api(cfg: Config, credential: str | None):
    from filex_agent.connections import Connections

    name = credential or next(iter(cfg.credentials), None)
    if name is None:
        raise ConfigError("credentials", "no credential configured")
    return Connections(cfg).api(name)


def cmd_ls(args) -> int:
    cfg = _load(args)
    parts = [p for p in args.path.split("/") if p]
    api = _api(cfg, args.credential)
    if len(parts) == 1:
        listing = api.applications(parts[0])
    elif len(parts) == 2:
        listing = api.subspaces(parts[0], parts[1])
    elif len(parts) == 3:
        listing = api.list_files(*parts)
    else:
        raise ConfigError("PATH", "expected ORG[/APP[/SUB]]")
    rows = [{"name": e.name, "type": e.type, "writable": e.metadata.writable, "size": e.metadata.contentLength,
             "modified": e.metadata.lastModified} for e in listing.children]
    _emit(args, rows, ["name", "type", "writable", "size", "modified"])
    return 0


def cmd_track(args) -> int:
    cfg = _load(args)
    recs = _api(cfg, args.credential).tracking(args.tracking_id)
    rows = [r.model_dump(mode="json", exclude={"links"}) for r in recs]
    _emit(args, rows, ["trackingId", "fileName", "status", "downstreamStatus", "fileSize", "uploadLocation",
                       "statusUpdatedTime"])
    return 0


def _close_oneshot(d, audit) -> None:
    """Close what a one-shot command (submit, release) opened: connections, journal, audit."""
    d.connections.close()
    d.store.close()
    if audit is not None:
        audit.audit.close()
        audit.store.close()


def cmd_release(args) -> int:
    from filex_agent.daemon import Daemon

    cfg = _load(args)
    audit = _cli_audit_hooks(cfg)
    d = Daemon(cfg, hooks=audit)
    try:
        sub = d.submitter.release(args.id)
    finally:
        _close_oneshot(d, audit)
    print(f"submission {sub.id} released: it will be uploaded by the running agent")
    return 0


def cmd_profiles(args) -> int:
    from filex_agent.connections import Connections
    from filex_agent.transports.sftp import list_profiles

    cfg = _load(args)
    conns = Connections(cfg)
    rows = []
    try:
        names = [args.credential] if args.credential else [n for n, c in cfg.credentials.items() if c.sftp_username]
        for name in names:
            for org, apps in list_profiles(conns.sftp_session(name)).items():
                rows.append({"credential": name, "org": org, "applications": ",".join(apps)})
    finally:
        conns.close()
    _emit(args, rows, ["credential", "org", "applications"])
    return 0


# -- submit helpers ----------------------------------------------------------------------------
PROGRESS_MIN_BYTES = 8 << 20  # below this an upload is over before a bar is worth drawing


def _wants_progress(path: Path) -> bool:
    return sys.stdout.isatty() and path.stat().st_size >= PROGRESS_MIN_BYTES


def _cli_audit_hooks(cfg: Config):
    """Audit lines for what a CLI command changes in the journal; None if the log is not writable
    by this user (the running agent then writes them when it next touches the submission)."""
    from filex_agent.audit import AuditLog
    from filex_agent.observers import AuditHooks
    from filex_agent.store import open_store

    try:
        audit = AuditLog(cfg.audit_path)
    except OSError as exc:
        log.warning("audit log %s not writable by this user (%s); the agent records these changes later",
                    cfg.audit_path, exc.strerror)
        return None
    store = open_store(cfg.journal_path, journal=cfg.journal)  # the hooks' own handle: read-only use (events, feedback)
    return AuditHooks(audit, store)


class _SubmitProgress(Hooks):
    """A rich progress bar fed by the upload's ``bytes_sent`` hook; restarts on a retry."""

    def __init__(self, name: str, total: int):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                  TransferSpeedColumn(), TimeRemainingColumn(), transient=False)
        self._task = self._progress.add_task(f"uploading {name}", total=total)

    def __enter__(self) -> "_SubmitProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def submission_changed(self, sub, event: str) -> None:  # noqa: ANN001
        if event == "retry":
            self._progress.update(self._task, completed=0, description=f"retrying {sub.file_name}")

    def bytes_sent(self, route: str, transport: str, n: int) -> None:
        self._progress.advance(self._task, n)



# -- audit and doctor --------------------------------------------------------------------------
def _audit_reader(path: Path):
    """An AuditLog for reading only: verify() and read() need just the path, and opening the
    real appender would need write access (auditors may only have read access)."""
    from filex_agent.audit import AuditLog

    return AuditLog.open_readonly(path)


def _parse_since(value: str | None):
    from datetime import datetime, timezone

    if not value:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError("--since", f"{value!r} is not a date (YYYY-MM-DD) or ISO date-time") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def cmd_audit(args) -> int:
    cfg = _load(args)
    path = cfg.audit_path
    if not path.is_file():
        print(f"filex-agent: no audit log at {path} (the agent writes it once it runs)", file=sys.stderr)
        return 1
    reader = _audit_reader(path)
    if args.verify:
        res = reader.verify()
        if res.ok:
            print(f"{path}: OK, {res.lines} line(s), hash chain intact")
            return 0
        print(f"{path}: line {res.first_bad_line}: {res.problem}")
        return 1
    since = _parse_since(args.since)
    if args.json:
        for rec in reader.read(since):
            print(json.dumps(rec, ensure_ascii=False))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("time (UTC)", "event", "id", "file", "route", "state", "detail", "tracking id")
    n = 0
    for rec in reader.read(since):
        n += 1
        state = rec.get("state") or ""
        if rec.get("event") == "submission.feedback":
            detail = f"feedback {rec.get('feedback_file')}"
        elif rec.get("event") == "submission.flagged":
            detail = rec.get("flag") or ""
        elif rec.get("event", "").startswith("agent."):
            detail = ", ".join(f"{k}={v}" for k, v in rec.items() if k in ("routes", "added", "removed"))
        else:
            detail = rec.get("detail") or ""
        table.add_row(str(rec.get("time", ""))[:19].replace("T", " "), str(rec.get("event", "")),
                      str(rec.get("submission_id") or ""), rec.get("file") or "", rec.get("route") or "",
                      state, detail, rec.get("tracking_id") or "")
    Console(width=200 if not sys.stdout.isatty() else None).print(table)
    print(f"{n} record(s){' since ' + since.isoformat() if since else ''}; verify with --verify")
    return 0


def cmd_nodes(args) -> int:
    """The agents sharing this journal: last heartbeat, uploads held, singletons led."""
    from filex_agent.store import open_store

    cfg = _load(args)
    store = open_store(cfg.journal_path, journal=cfg.journal)
    try:
        now = store.now()
        nodes, leaders = store.nodes(), store.leaders()
    finally:
        store.close()
    live = cfg.journal.lease_seconds
    rows = [{"node": n.node, "alive": (now - n.heartbeat_at).total_seconds() <= live,
             "last_heartbeat": n.heartbeat_at.isoformat(), "seconds_ago": round((now - n.heartbeat_at).total_seconds(), 1),
             "started_at": n.started_at.isoformat(), "pid": n.info.get("pid"), "version": n.info.get("version"),
             "uploading": n.holds, "leads": n.leads} for n in nodes]
    leads = [{"singleton": name, "owner": lead.owner, "lease_until": lead.lease_until.isoformat(),
              "live": lead.lease_until > now, "epoch": lead.epoch} for name, lead in leaders.items()]
    if args.json:
        print(json.dumps({"journal": _journal_name(cfg), "now": now.isoformat(), "nodes": rows, "leaders": leads},
                         indent=2))
        return 0
    print(f"journal: {_journal_name(cfg)}")
    _emit(args, [{**r, "alive": "yes" if r["alive"] else f"NO (silent {r['seconds_ago']:.0f}s)",
                  "leads": ", ".join(r["leads"])} for r in rows],
          ["node", "alive", "last_heartbeat", "pid", "version", "uploading", "leads"])
    for lead in leads:
        print(f"  {lead['singleton']}: led by {lead['owner']}" + ("" if lead["live"] else " (lease expired: none leads)"))
    return 0


def _journal_name(cfg: Config) -> str:
    return cfg.journal.url if cfg.journal.is_postgres else str(cfg.journal_path)


def cmd_journal(args) -> int:
    """`journal migrate`: copy the SQLite journal into an empty PostgreSQL one, once."""
    from filex_agent.config import parse_journal
    from filex_agent.store.migrate import sqlite_to_postgres
    from filex_agent.store.postgres import open_postgres

    cfg = _load(args)
    source = Path(args.source) if args.source else cfg.journal_path
    url = args.to or (cfg.journal.url if cfg.journal.is_postgres else None)
    if not url:
        raise ConfigError("--to", "the PostgreSQL journal to copy into: --to postgresql://user@host/dbname")
    settings = {**cfg.journal.model_dump(exclude_none=True), "url": url}
    if args.password:
        settings["password"] = args.password
    # The same checks as [journal]: no password inside the URL, the password a reference.
    target_cfg = parse_journal(settings)
    if not target_cfg.is_postgres:
        raise ConfigError("--to", "must be a postgresql:// URL")
    target = open_postgres(target_cfg)
    try:
        copied = sqlite_to_postgres(source, target)
    finally:
        target.close()
    print(f"copied {source} into {target_cfg.url}: " + ", ".join(f"{t} {n}" for t, n in copied.items()))
    print("now set [journal] url (and password) in every agent's config to this database and start them")
    return 0


def _parse_day(value: str | None, key: str, default):
    """--from/--to: a date (local midnight in UTC terms) or an ISO date-time."""
    from datetime import datetime, timezone

    if not value:
        return default
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ConfigError(key, f"{value!r} is not a date (YYYY-MM-DD) or ISO date-time") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def cmd_calendar(args) -> int:
    from datetime import timedelta

    from filex_agent.filing_calendar import calendar_rows
    from filex_agent.store import open_store, utcnow

    cfg = _load(args)
    now = utcnow()
    since = _parse_day(args.since, "--from", now - timedelta(days=7))
    until = _parse_day(args.until, "--to", now + timedelta(days=14))
    if until <= since:
        raise ConfigError("--to", "must be after --from")
    store = open_store(cfg.journal_path, journal=cfg.journal)
    try:
        rows = calendar_rows(cfg, store, since, until, now)
    finally:
        store.close()
    if not args.json:
        for r in rows:
            r["submission"] = (f"{r['submission_id']} {r['file']} ({r['verdict']})" if r["submission_id"] else "")
    _emit(args, rows, ["expectation", "period", "deadline_local", "status", "route", "submission"])
    if not cfg.expectations and not args.json:
        print("no [[expectations]] in the configuration", file=sys.stderr)
    return 0


def cmd_doctor(args) -> int:
    from filex_agent.doctor import run_doctor

    return run_doctor(Path(args.config))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="filex-agent", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn, help: str, config: bool = True, json_flag: bool = False):
        sp = sub.add_parser(name, help=help)
        if config:
            sp.add_argument("--config", "-c", required=name != "run", help="path to filex-agent.toml")
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        sp.set_defaults(func=fn)
        return sp

    r = add("run", cmd_run, "run the daemon")
    r.add_argument("--sandbox", action="store_true", help="start the built-in sandbox fileX and run against it")
    r.add_argument("--data-dir", help="with --sandbox: folder for the generated config, outboxes and journal")
    add("routes", cmd_routes, "list the routes", json_flag=True)
    add("status", cmd_status, "every submission from the journal", json_flag=True)
    s = add("submit", cmd_submit, "submit one file now")
    s.add_argument("file")
    s.add_argument("--route", required=True)
    ls = add("ls", cmd_ls, "list ORG[/APP[/SUB]] on fileX", json_flag=True)
    ls.add_argument("path")
    ls.add_argument("--credential")
    t = add("track", cmd_track, "tracking records (all of the last 90 days, or one id)", json_flag=True)
    t.add_argument("tracking_id", nargs="?")
    t.add_argument("--credential")
    rel = add("release", cmd_release, "send a HELD duplicate on purpose")
    rel.add_argument("id", type=int)
    pr = add("profiles", cmd_profiles, "orgs and applications an SFTP login can act for (OBO)", json_flag=True)
    pr.add_argument("--credential")
    au = add("audit", cmd_audit, "print the audit trail, or --verify its hash chain", json_flag=True)
    au.add_argument("--verify", action="store_true", help="check every line; exit 1 naming the first bad one")
    au.add_argument("--since", metavar="DATE", help="only records at or after DATE (YYYY-MM-DD or ISO time, UTC)")
    ca = add("calendar", cmd_calendar, "expected filings: past and coming occurrences, state, deadline, "
             "the submission that satisfied each", json_flag=True)
    ca.add_argument("--from", dest="since", metavar="DATE", help="from DATE (YYYY-MM-DD or ISO time, UTC; default 7 days ago)")
    ca.add_argument("--to", dest="until", metavar="DATE", help="until DATE (default 14 days ahead)")
    add("doctor", cmd_doctor, "check config, credentials, entitlements and connectivity, one line per check")
    add("nodes", cmd_nodes, "the agents sharing the journal: heartbeat, uploads held, singletons led", json_flag=True)
    jr = add("journal", cmd_journal, "journal maintenance: `migrate` copies the SQLite journal into PostgreSQL")
    jr.add_argument("action", choices=["migrate"])
    jr.add_argument("--to", metavar="URL", help="postgresql://user@host/dbname (default: [journal] url)")
    jr.add_argument("--password", metavar="REF", help="env:VAR, file:/path or systemd:NAME (default: [journal] password)")
    jr.add_argument("--from", dest="source", metavar="PATH", help="the SQLite journal (default: the config's)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"filex-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    except JournalLocked as exc:
        print(f"filex-agent: {exc}", file=sys.stderr)
        return 2
    except FilexError as exc:
        print(f"filex-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
