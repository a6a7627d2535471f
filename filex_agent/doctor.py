"""`filex-agent doctor`: check a configuration end to end, one line per check, with a fix.

Checks, in order: the config file; folders; every secret reference; a FIP token per API
credential; per route the entitlements it needs (org visible, application present, ``in``
writable), S3 transfer tokens (S3 routes) and the SFTP login, host key, algorithms and org
folder (SFTP routes). Network calls use at most two attempts so a dead endpoint fails in
seconds, and each check prints as soon as it is done, so a slow one never sits silent.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO
from zoneinfo import ZoneInfo

from filex_agent.config import Config, SecretRef, load_config
from filex_agent.errors import AuthError, ConfigError, FilexError, NotEntitledError, TransientError


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    name: str
    detail: str
    fix: str | None = None

    def line(self) -> str:
        if self.ok:
            return f"OK    {self.name}: {self.detail}"
        return f"FAIL  {self.name}: {self.detail}" + (f" -- fix: {self.fix}" if self.fix else "")


def _secret_fix(ref: str) -> str:
    if ref.startswith("env:"):
        return f"set the environment variable {ref[4:]} for the agent (e.g. Environment= in a systemd drop-in)"
    if ref.startswith("file:"):
        return f"create {ref[5:]} holding only the secret, readable by the agent's user (mode 0600)"
    if ref.startswith("systemd:"):
        return (f"add LoadCredential={ref[8:]}:/etc/filex-agent/credentials/{ref[8:]} to the unit "
                "(outside systemd, $CREDENTIALS_DIRECTORY must point at a folder holding it)")
    return "use env:VAR, file:/path or systemd:NAME"


def _describe_error(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class Doctor:
    def __init__(self, out: TextIO | None = None):
        self.out = out if out is not None else sys.stdout
        self.results: list[CheckResult] = []

    def report(self, ok: bool, name: str, detail: str, fix: str | None = None) -> CheckResult:
        r = CheckResult(ok, name, detail, fix)
        self.results.append(r)
        print(r.line(), file=self.out, flush=True)
        return r

    @property
    def failed(self) -> bool:
        return any(not r.ok for r in self.results)

    # ------------------------------------------------------------------------------------------
    def run(self, config_path: Path) -> int:
        try:
            cfg = load_config(config_path)
        except ConfigError as exc:
            self.report(False, "config", f"{config_path}: {exc}",
                        "correct the key named above (config/filex-agent.example.toml documents every key)")
            return 1
        self.report(True, "config", f"{config_path} is valid ({len(cfg.routes)} route(s), "
                                    f"{len(cfg.credentials)} credential(s))")
        if not cfg.routes:
            self.report(False, "routes", "no [[routes]] configured: the agent would watch nothing",
                        "add a [[routes]] table per outbox")
        self.check_folders(cfg)
        self.check_secrets(cfg)
        self.check_journal(cfg)
        self.check_metrics(cfg)
        self.check_calendar(cfg)
        # Fail fast on network calls: two attempts, short backoff.
        net = cfg.network.model_copy(update={"max_attempts": min(2, cfg.network.max_attempts),
                                             "backoff_initial": 0.2, "backoff_max": 1.0})
        fast = cfg.model_copy(update={"network": net})
        from filex_agent.connections import Connections

        conns = Connections(fast)
        try:
            good_tokens = self.check_tokens(fast, conns)
            for route in fast.routes:
                self.check_route(fast, conns, route, good_tokens)
        finally:
            conns.close()
        n_fail = sum(not r.ok for r in self.results)
        print(f"{len(self.results)} check(s), {n_fail} failed", file=self.out, flush=True)
        return 1 if n_fail else 0

    # -- local ---------------------------------------------------------------------------------
    def check_folders(self, cfg: Config) -> None:
        self._writable_dir("agent.data_dir", cfg.agent.data_dir)
        for r in cfg.routes:
            self._writable_dir(f"route {r.name} outbox", Path(r.outbox))
            self._spool(r)

    def _spool(self, route) -> None:  # noqa: ANN001
        from filex_agent.spool import SpoolError, check_spool, spool_dir

        if not Path(route.outbox).is_dir():
            return  # created with the outbox
        try:
            check_spool(route)
        except SpoolError as exc:
            self.report(False, f"route {route.name} spool", str(exc).split(": ", 1)[1],
                        f"inspect and remove {spool_dir(route)}; the agent recreates it")
        except OSError as exc:
            self.report(False, f"route {route.name} spool", f"{spool_dir(route)}: {exc.strerror}",
                        "give the agent write access to the outbox")
        else:
            self.report(True, f"route {route.name} spool", f"{spool_dir(route)} is the agent's own, mode 0700")

    def _writable_dir(self, name: str, path: Path) -> None:
        """The agent creates missing folders, so a missing one is fine if it can be created."""
        p = Path(path)
        probe = p
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if p.exists() and not p.is_dir():
            self.report(False, name, f"{p} exists and is not a folder", f"remove it or point {name} elsewhere")
        elif not os.access(probe, os.W_OK | os.X_OK):
            what = "is not writable" if probe == p else f"does not exist and {probe} is not writable"
            self.report(False, name, f"{p} {what} by {_user()}",
                        f"mkdir -p {p} && chown {_user()} {p} (an outbox also needs the producers' group: "
                        "chgrp GROUP and chmod 3770); the agent moves files out of outboxes and writes "
                        "its journal and archives")
        else:
            self.report(True, name, f"{p} {'is writable' if p.exists() else 'will be created'}")

    def check_secrets(self, cfg: Config) -> None:
        refs: list[tuple[str, SecretRef]] = []
        for name, c in cfg.credentials.items():
            for field in ("client_secret", "sftp_password", "sftp_key_passphrase"):
                ref = getattr(c, field)
                if ref is not None:
                    refs.append((f"credentials.{name}.{field}", ref))
            if c.sftp_private_key is not None:
                key = Path(c.sftp_private_key)
                if os.access(key, os.R_OK):
                    self.report(True, f"credentials.{name}.sftp_private_key", f"{key} is readable")
                else:
                    self.report(False, f"credentials.{name}.sftp_private_key", f"{key} cannot be read by {_user()}",
                                f"install the key at {key}, owned by the agent's user, mode 0600")
        if cfg.notify.webhook_url is not None:
            refs.append(("notify.webhook_url", cfg.notify.webhook_url))
        if cfg.notify.smtp_password is not None:
            refs.append(("notify.smtp_password", cfg.notify.smtp_password))
        if cfg.journal.password is not None:
            refs.append(("journal.password", cfg.journal.password))
        from filex_agent.logging_setup import register_secret

        for key, ref in refs:
            try:
                value = ref.resolve()
            except ConfigError as exc:
                self.report(False, key, str(exc).removeprefix(f"{ref}: "), _secret_fix(str(ref)))
                continue
            register_secret(value)
            if not value:
                self.report(False, key, f"{ref} is empty", _secret_fix(str(ref)))
            else:
                self.report(True, key, f"{ref} resolves ({len(value)} characters)")

    # Clock skew past this between a node and the journal's server is a failure: leases are
    # reckoned by the server, but retry times (next_attempt_at) and logs by the node.
    MAX_SKEW_SECONDS = 2.0

    def check_journal(self, cfg: Config) -> None:
        """Reachable, schema version, and (PostgreSQL) this node's clock against the server's."""
        import time

        from filex_agent.store import SCHEMA_VERSION, SchemaTooNew, open_store
        from filex_agent.store import utcnow

        if not cfg.journal.is_postgres and not cfg.journal_path.exists():
            self.report(True, "journal", f"SQLite {cfg.journal_path} will be created at the first start")
            return
        where = cfg.journal.url if cfg.journal.is_postgres else f"SQLite {cfg.journal_path}"
        try:
            store = open_store(cfg.journal_path, journal=cfg.journal)
        except SchemaTooNew as exc:
            self.report(False, "journal", str(exc), "install the filex-agent version the other nodes run")
            return
        except (FilexError, OSError) as exc:
            self.report(False, "journal", f"{where}: {_describe_error(exc)}",
                        "check the server is up and reachable from this host (host, port, pg_hba.conf), the "
                        "database and user exist, journal.password, and sslmode/sslrootcert" if cfg.journal.is_postgres
                        else "check data_dir is writable and the file is an SQLite journal")
            return
        try:
            self.report(True, "journal", f"{where} reachable, schema version {store.schema_version()} "
                                         f"(this agent: {SCHEMA_VERSION})")
            if not store.shared:
                return
            before = time.monotonic()
            server = store.now()
            rtt = time.monotonic() - before
            skew = (utcnow() - server).total_seconds() - rtt / 2
            detail = f"this node's clock is {abs(skew):.2f}s {'ahead of' if skew > 0 else 'behind'} the journal server's"
            if abs(skew) > self.MAX_SKEW_SECONDS:
                self.report(False, "journal clock", detail,
                            "run NTP (chrony or systemd-timesyncd) on every node and on the database server")
            else:
                self.report(True, "journal clock", detail)
            others = [n for n in store.nodes() if n.node == cfg.journal.node_name and n.info.get("pid") and
                      (server - n.heartbeat_at).total_seconds() < cfg.journal.lease_seconds]
            self.report(True, "journal.node_name", f"{cfg.journal.node_name}" +
                        (" (an agent of this name is running now)" if others else ""))
        finally:
            store.close()

    def check_metrics(self, cfg: Config) -> None:
        if not cfg.metrics.enabled:
            return
        from filex_agent.metrics import parse_listen

        try:
            host, port = parse_listen(cfg.metrics.listen)
        except ValueError as exc:
            self.report(False, "metrics.listen", str(exc), 'use "127.0.0.1:9464" (host:port)')
            return
        loopback = host in ("127.0.0.1", "::1", "localhost")
        self.report(True, "metrics.listen", f"{host}:{port}" + ("" if loopback else
                                                               " (not loopback: protect it with a firewall)"))

    def check_calendar(self, cfg: Config) -> None:
        """Each expectation's next deadline, and that its route would take such files at all."""
        from filex_agent.filing_calendar import Schedule, window_allows
        from filex_agent.store import utcnow

        now = utcnow()
        for e in cfg.expectations:
            name = f"expectation {e.name}"
            route = cfg.route(e.route)
            sample = e.pattern.replace("*", "x").replace("?", "x")
            if "[" not in e.pattern and not route.wants(sample):
                self.report(False, name, f"route {route.name} does not take files like {sample!r} "
                                         "(its include/ignore patterns): this expectation could never be met",
                            "fix the pattern, or the route's include/ignore")
                continue
            nxt = Schedule(e).next_deadline(now)
            when = nxt.astimezone(ZoneInfo(e.timezone)).strftime("%Y-%m-%d %H:%M %Z") if nxt else "never"
            self.report(True, name, f"{e.pattern!r} on {e.route}, next due {when} ({e.calendar} business days)")
        for r in cfg.routes:
            if r.submission_window is not None:
                ok, opens, why = window_allows(r, now)
                self.report(True, f"route {r.name} submission window",
                            "open now" if ok else f"closed ({why}); opens {opens.isoformat() if opens else '?'}")

    # -- remote --------------------------------------------------------------------------------
    def check_tokens(self, cfg: Config, conns) -> set[str]:  # noqa: ANN001
        good: set[str] = set()
        for name, c in cfg.credentials.items():
            if not (c.client_id and c.client_secret):
                continue
            check = f"credentials.{name} FIP token"
            try:
                conns.tokens(name).token()
            except ConfigError as exc:
                self.report(False, check, str(exc), "fix the secret reference (see above)")
            except AuthError as exc:
                self.report(False, check, f"FIP refused client_id {c.client_id!r}: {exc}",
                            f"check the client secret in {c.client_secret} and that {c.client_id!r} is an active "
                            "FINRA API account (the Super Account Administrator manages it)")
            except TransientError as exc:
                self.report(False, check, f"cannot reach {cfg.environment.fip_token_url}: {exc}",
                            "check DNS, proxy and firewall rules for outbound HTTPS to the FIP token URL")
            except FilexError as exc:
                self.report(False, check, _describe_error(exc), "check environment.fip_token_url")
            else:
                good.add(name)
                self.report(True, check, f"token obtained for client_id {c.client_id!r}")
        return good

    def check_route(self, cfg: Config, conns, route, good_tokens: set[str]) -> None:  # noqa: ANN001
        api_kinds = [t for t in route.transports if t in ("rest", "s3")]
        if api_kinds:
            if route.credential not in good_tokens:
                self.report(False, f"route {route.name} entitlements",
                            f"not checked: credential {route.credential!r} has no token", "fix the token check above")
            elif self._entitlements(conns, route) and "s3" in api_kinds:
                self._s3_tokens(conns, route)
        if "sftp" in route.transports:
            self._sftp(conns, route)

    def _guarded(self, name: str, fn: Callable[[], None], entitlement_fix: str) -> bool:
        try:
            fn()
            return True
        except NotEntitledError as exc:
            self.report(False, name, _describe_error(exc), entitlement_fix)
        except AuthError as exc:
            self.report(False, name, _describe_error(exc), "check the credential (see the token check)")
        except TransientError as exc:
            self.report(False, name, _describe_error(exc),
                        "fileX did not answer: check network, proxy and FINRA's service status, then run doctor again")
        except FilexError as exc:
            self.report(False, name, _describe_error(exc), "see the message; check the route's org and application")
        return False

    def _entitlements(self, conns, route) -> bool:  # noqa: ANN001
        api = conns.api(route.credential)
        org, app = route.org, route.application
        who = conns.credential(route.credential).client_id
        fix = (f"ask your firm's Super Account Administrator to entitle API account {who!r} to fileX org {org}, "
               f"application {app} with write access to 'in'; or correct routes.org/application")
        ok = True

        def org_check() -> None:
            nonlocal ok
            listing = api.applications(org)
            names = [e.name for e in listing.children]
            if app not in names:
                ok = False
                self.report(False, f"route {route.name} application",
                            f"org {org} has no application {app!r} for this account (it has: "
                            f"{', '.join(names) or 'none'})", fix + " (names are case sensitive)")
            else:
                self.report(True, f"route {route.name} org", f"GET /files/{org}: application {app} present")

        if not self._guarded(f"route {route.name} org", org_check, fix) or not ok:
            return False

        def app_check() -> None:
            nonlocal ok
            listing = api.subspaces(org, app)
            inbox = next((e for e in listing.children if e.name == "in"), None)
            if inbox is None or not inbox.metadata.writable:
                ok = False
                self.report(False, f"route {route.name} in", f"{org}/{app}/in is "
                            + ("missing" if inbox is None else "not writable") + " for this account", fix)
            else:
                self.report(True, f"route {route.name} in", f"GET /files/{org}/{app}: 'in' is writable")

        return self._guarded(f"route {route.name} in", app_check, fix) and ok

    def _s3_tokens(self, conns, route) -> None:  # noqa: ANN001
        name = f"route {route.name} S3 transfer tokens"
        api = conns.api(route.credential)
        org, app = route.org, route.application

        def check() -> None:
            tokens = api.s3_transfer_tokens(org, app)
            shaped = [p for p in tokens.writePaths if _s3_path_ok(p, org, app, "in")]
            if not shaped:
                self.report(False, name, f"writePaths {tokens.writePaths!r} has no 'bucket/{org}/{app}/in/'",
                            "fileX returned an unexpected layout: use transport = \"rest\" for this route and "
                            "report it to FINRA")
                return
            bucket = shaped[0].strip("/").split("/")[0]
            self.report(True, name, f"STS credentials for bucket {bucket}, region {tokens.region}, "
                                    f"expire {tokens.credentials.expiration.isoformat()}")

        self._guarded(name, check, f"ask the Super Account Administrator for S3-direct access to {org}/{app}, "
                                   "or use transport = \"rest\"")

    def _sftp(self, conns, route) -> None:  # noqa: ANN001
        name = f"route {route.name} SFTP"
        try:
            from filex_agent.transports.sftp import list_profiles
        except ImportError:
            self.report(False, name, "SFTP transport not installed in this build",
                        "install a filex-agent release with SFTP support or use transport = \"rest\"")
            return
        try:
            session = conns.sftp_session(route.credential)
            profiles = list_profiles(session)
        except AuthError as exc:
            self.report(False, name, _describe_error(exc),
                        "check sftp_username and the password/private key of the credential")
            return
        except TransientError as exc:
            self.report(False, name, _describe_error(exc),
                        "check environment.sftp_host/sftp_port and that outbound port 22 is open")
            return
        except FilexError as exc:
            msg = _describe_error(exc)
            fix = ("verify the server's key with FINRA, then pin it in [sftp] host_key_fingerprints"
                   if "host key" in msg else "see the message (algorithms fileX offers are fixed; "
                                             "an old OpenSSH/paramiko may lack them)")
            self.report(False, name, msg, fix)
            return
        negotiated = getattr(session, "negotiated", {}) or {}
        detail = ", ".join(f"{k} {v}" for k, v in negotiated.items() if v)
        self.report(True, f"{name} login", "connected, host key verified" + (f" ({detail})" if detail else ""))
        apps = profiles.get(route.org)
        if apps is None:
            self.report(False, f"{name} org", f"org folder /{route.org} is not visible to "
                                              f"{conns.credential(route.credential).sftp_username!r}",
                        f"ask the Super Account Administrator to add org {route.org} to this SFTP account's "
                        "on-behalf-of profiles (`filex-agent profiles` lists what it can see)")
        elif route.application not in apps:
            self.report(False, f"{name} org", f"/{route.org} has no application {route.application!r} "
                                              f"(it has: {', '.join(apps) or 'none'})",
                        "correct routes.application or ask for the entitlement")
        else:
            self.report(True, f"{name} org", f"/{route.org}/{route.application} visible")


def _s3_path_ok(path: str, org: str, app: str, sub: str) -> bool:
    parts = path.strip().strip("/").split("/")
    return len(parts) == 4 and all(parts) and parts[1:] == [org, app, sub]


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


def run_doctor(config_path: Path, out: TextIO | None = None) -> int:
    """Exit code: 0 all OK, 1 if any check failed."""
    return Doctor(out).run(Path(config_path))
