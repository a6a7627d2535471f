"""Command line: `filex-agent run|routes|status|submit|ls|track|release|profiles`.

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
    from filex_agent.daemon import Daemon

    if args.sandbox:
        return _run_sandbox(args)
    if not args.config:
        raise ConfigError("--config", "required (or use --sandbox --data-dir DIR)")
    cfg = _load(args)
    _setup_logging(cfg.agent.log_level, cfg.agent.log_format)
    return Daemon(cfg).run_forever()


def _run_sandbox(args) -> int:
    from filex_agent.daemon import Daemon
    from filex_agent.sandbox import Sandbox
    from filex_agent.sandbox.agent_config import write_sandbox_config

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
        sys.stdout.flush()
        return Daemon(cfg).run_forever()
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

    store = open_store(cfg.journal_path)
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


def cmd_status(args) -> int:
    cfg = _load(args)
    rows = status_rows(cfg)
    if not args.json:
        for r in rows:
            r["size"] = r["size"] if r["size"] is not None else ""
            r["note"] = r["reason"] or r["flag"] or ""
            r["feedback"] = "\n".join(r["feedback"])
    _emit(args, rows, ["id", "file", "route", "transport", "size", "tracking_id", "state", "note", "feedback"])
    return 0


def cmd_submit(args) -> int:
    import shutil
    import tempfile

    from filex_agent.daemon import Daemon
    from filex_agent.submitter import spool_dir

    cfg = _load(args)
    _setup_logging(cfg.agent.log_level, cfg.agent.log_format)
    route = cfg.route(args.route)
    src = Path(args.file)
    if not src.is_file():
        raise ConfigError("FILE", f"{src} is not a readable file")
    # Copy (not move) the file into the route's spool folder: the user's file stays where it is.
    staging = spool_dir(route) / "incoming"
    staging.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=staging, prefix=".copy-")
    with open(fd, "wb") as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out, 1 << 20)
    staged = staging / src.name
    Path(tmp).rename(staged)
    d = Daemon(cfg)
    try:
        sub = d.submit_once(route, staged)
    finally:
        d.connections.close()
        d.store.close()
    print(json.dumps({"id": sub.id, "state": sub.state.value, "tracking_id": sub.tracking_id,
                      "reason": sub.reason}))
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


def cmd_release(args) -> int:
    from filex_agent.daemon import Daemon

    cfg = _load(args)
    d = Daemon(cfg)
    try:
        sub = d.submitter.release(args.id)
    finally:
        d.connections.close()
        d.store.close()
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"filex-agent: configuration error: {exc}", file=sys.stderr)
        return 2
    except FilexError as exc:
        print(f"filex-agent: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
