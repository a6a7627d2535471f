"""Configuration: TOML file validated by pydantic; errors name the dotted key.

Secrets are never inlined: a secret field holds a *reference* — ``env:VAR``, ``file:/path`` or
``systemd:NAME`` (read from ``$CREDENTIALS_DIRECTORY/NAME``, systemd's ``LoadCredential=``).
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from filex_agent.errors import ConfigError

ENVIRONMENTS: dict[str, dict[str, Any]] = {
    "production": {
        "fip_token_url": "https://ews.fip.finra.org/fip/rest/ews/oauth2/access_token",
        "api_base_url": "https://filex.finra.org",
        "sftp_host": "filex.finra.org",
        "sftp_port": 22,
    },
    "qa": {
        "fip_token_url": "https://ews.fip.finra.org/fip/rest/ews/oauth2/access_token",
        "api_base_url": "https://filex-int.qa.finra.org",
        "sftp_host": "filex.ct.finra.org",
        "sftp_port": 22,
    },
}

# fileX: letters, digits and : ! @ , & - = ' _ .  (never '#': the rest of the name is dropped)
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9:!@,&\-=' _.]+$".replace(" ", ""))
ORG_RE = re.compile(r"^[0-9]+$")
APP_RE = re.compile(r"^[A-Za-z0-9]+$")
DEFAULT_IGNORE = ["*.tmp", "*.part", "*.partial", "*.swp", "*~", ".*", "~$*", "*.crdownload", "*.filepart"]

Transports = Literal["rest", "s3", "sftp"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(str):
    """A reference to a secret; ``resolve()`` reads it. ``str()`` never shows the value."""

    SCHEMES = ("env:", "file:", "systemd:")

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            _secret_ref, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )

    def resolve(self) -> str:
        ref = str(self)
        if ref.startswith("env:"):
            name = ref[4:]
            value = os.environ.get(name)
            if value is None:
                raise ConfigError(ref, f"environment variable {name} is not set")
            return value
        if ref.startswith("file:"):
            return _read_secret_file(Path(ref[5:]), ref)
        if ref.startswith("systemd:"):
            base = os.environ.get("CREDENTIALS_DIRECTORY")
            if not base:
                raise ConfigError(ref, "$CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)")
            return _read_secret_file(Path(base) / ref[8:], ref)
        raise ConfigError(ref, "not a secret reference")


def _read_secret_file(path: Path, ref: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(ref, f"cannot read secret file: {exc.strerror}") from None


def _secret_ref(v: Any) -> SecretRef:
    if isinstance(v, SecretRef):
        return v
    if not isinstance(v, str) or not v.startswith(SecretRef.SCHEMES):
        # Never echo the value: it may be a pasted secret.
        raise ValueError("must be a reference: env:VAR, file:/path or systemd:NAME (secrets are never inlined)")
    return SecretRef(v)


class AgentSettings(_Strict):
    data_dir: Path
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    # Graceful shutdown: uploads in flight may finish within this many seconds.
    shutdown_grace_seconds: float = Field(30.0, ge=0)
    workers: int = Field(4, ge=1, le=64)
    # Journal: "sqlite" (default, file in data_dir) — the store interface admits others.
    store: Literal["sqlite"] = "sqlite"


class EnvironmentSettings(_Strict):
    name: Literal["production", "qa", "custom"] = "production"
    fip_token_url: str | None = None
    api_base_url: str | None = None
    sftp_host: str | None = None
    sftp_port: int | None = Field(None, ge=1, le=65535)
    # Only for the sandbox and tests; unset in production (real AWS S3).
    s3_endpoint_url: str | None = None
    verify_tls: bool = True
    ca_bundle: Path | None = None

    @model_validator(mode="after")
    def _defaults(self) -> "EnvironmentSettings":
        base = ENVIRONMENTS.get(self.name, {})
        values = {k: getattr(self, k) if getattr(self, k) is not None else base.get(k) for k in
                  ("fip_token_url", "api_base_url", "sftp_host", "sftp_port")}
        for key in ("fip_token_url", "api_base_url"):
            if not values[key]:
                raise ConfigError(f"environment.{key}", "required when name = 'custom'")
            if not str(values[key]).startswith(("https://", "http://")):
                raise ConfigError(f"environment.{key}", "must be an http(s) URL")
        for k, v in values.items():
            object.__setattr__(self, k, v)
        return self


class NetworkSettings(_Strict):
    connect_timeout: float = Field(10.0, gt=0)
    read_timeout: float = Field(60.0, gt=0)
    max_attempts: int = Field(5, ge=1, le=50)
    backoff_initial: float = Field(1.0, ge=0)
    backoff_max: float = Field(60.0, ge=0)
    # FINRA API platform: 20 synchronous requests per second per IP.
    rate_limit_per_second: float = Field(20.0, gt=0)


class TrackingSettings(_Strict):
    poll_interval_seconds: float = Field(60.0, gt=0)
    # With at least this many pending submissions on one credential, one GET /tracking
    # (all of the last 90 days) replaces per-id calls.
    batch_threshold: int = Field(5, ge=1)
    # S3/SFTP uploads carry no tracking id: flag them if no record matches within this time.
    match_timeout_seconds: float = Field(3600.0, gt=0)
    # Flag a submission with no final status after this long.
    final_timeout_hours: float = Field(48.0, gt=0)
    # An upload whose answer was lost (bytes may be at fileX) is sent again only when fileX has
    # shown no trace of it for this long. fileX promises no delay between its bucket storing a
    # file and tracking showing it; minutes, not seconds, so a slow fileX never gets a double.
    unconfirmed_settle_seconds: float = Field(900.0, gt=0)


class JournalSettings(_Strict):
    # This agent's name among the agents sharing a journal (defaults to the host name).
    node_name: str | None = None
    # An upload's owner renews its lease every lease_seconds / 3; a lease not renewed for this
    # long is taken over (the owner died or stalled) and its upload decided from fileX's evidence.
    lease_seconds: float = Field(30.0, ge=1)


class WatcherSettings(_Strict):
    rescan_interval_seconds: float = Field(60.0, gt=0)


class S3Settings(_Strict):
    multipart_threshold_mb: int = Field(64, ge=5)
    part_size_mb: int = Field(64, ge=5, le=5120)
    max_concurrency: int = Field(4, ge=1, le=64)


class SftpSettings(_Strict):
    known_hosts: Path | None = None
    # "SHA256:..." fingerprints accepted for the server (pinned).
    host_key_fingerprints: list[str] = []
    # Only for a first connection to a test server; never the default.
    auto_accept_host_key: bool = False
    # Remote layout below the login root; {org} and {app} are substituted.
    in_path: str = "/{org}/{app}/in"
    out_path: str = "/{org}/{app}/out"
    keepalive_seconds: int = Field(30, ge=0)
    connections: int = Field(2, ge=1, le=16)


class CredentialSettings(_Strict):
    # FIP API credential (REST and S3 direct). client_id is an account name, not a secret.
    client_id: str | None = None
    client_secret: SecretRef | None = None
    # SFTP prime account.
    sftp_username: str | None = None
    sftp_password: SecretRef | None = None
    sftp_private_key: Path | None = None
    sftp_key_passphrase: SecretRef | None = None


class RouteSettings(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    outbox: Path
    org: str
    application: str
    transport: Transports | list[Transports] = "rest"
    credential: str
    include: list[str] = ["*"]
    ignore: list[str] = DEFAULT_IGNORE
    # "stable": taken after close-after-write and stable_seconds without size/mtime change;
    # "trigger": taken when NAME<trigger_suffix> appears beside NAME.
    readiness: Literal["stable", "trigger"] = "stable"
    stable_seconds: float = Field(5.0, ge=0)
    trigger_suffix: str = ".done"
    # Polling observer, for network shares where inotify sees nothing.
    poll: bool = False
    max_size_mb: int = Field(5120, ge=1, le=5120)
    sent_dir: Path | None = None
    accepted_dir: Path | None = None
    rejected_dir: Path | None = None
    failed_dir: Path | None = None
    feedback_dir: Path | None = None
    # Files already in `out` when the agent first sees the route are downloaded too (True)
    # or only recorded (False).
    download_existing_feedback: bool = True

    @field_validator("org", mode="before")
    @classmethod
    def _org(cls, v: Any) -> Any:
        if not isinstance(v, str):
            raise ValueError('must be a quoted string (leading zeros matter: "0001" is not 1)')
        if not ORG_RE.match(v):
            raise ValueError("must be digits only")
        return v

    @field_validator("application")
    @classmethod
    def _app(cls, v: str) -> str:
        if not APP_RE.match(v):
            raise ValueError("must be letters and digits only (case sensitive)")
        return v

    @property
    def transports(self) -> list[str]:
        return [self.transport] if isinstance(self.transport, str) else list(self.transport)

    def folder(self, kind: str, data_dir: Path) -> Path:
        """sent/accepted/rejected/failed/feedback folder, defaulting under data_dir."""
        explicit = getattr(self, f"{kind}_dir")
        return Path(explicit) if explicit else data_dir / "routes" / self.name / kind

    def wants(self, name: str) -> bool:
        if any(fnmatch.fnmatchcase(name, p) for p in self.ignore):
            return False
        if self.readiness == "trigger" and name.endswith(self.trigger_suffix):
            return False
        return any(fnmatch.fnmatchcase(name, p) for p in self.include)


class MetricsSettings(_Strict):
    enabled: bool = False
    # Loopback by default: metrics and health are not for the internet.
    listen: str = "127.0.0.1:9464"


class AuditSettings(_Strict):
    # Append-only, hash-chained JSON lines; default data_dir/audit.jsonl.
    path: Path | None = None


class NotifySettings(_Strict):
    # A webhook URL often embeds a token (chat webhooks): it is a secret reference.
    webhook_url: SecretRef | None = None
    smtp_host: str | None = None
    smtp_port: int = Field(587, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretRef | None = None
    smtp_from: str | None = None
    smtp_to: list[str] = []
    smtp_starttls: bool = True
    smtp_ca_file: Path | None = None
    # The same ongoing problem is re-sent at most this often.
    realert_seconds: float = Field(3600.0, gt=0)
    # A route that could not submit for this long raises ROUTE_DOWN.
    route_down_minutes: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _smtp_complete(self) -> "NotifySettings":
        if self.smtp_host and not (self.smtp_from and self.smtp_to):
            raise ConfigError("notify.smtp_from", "smtp_from and smtp_to are required with smtp_host")
        return self


class Config(_Strict):
    agent: AgentSettings
    environment: EnvironmentSettings = EnvironmentSettings()
    network: NetworkSettings = NetworkSettings()
    tracking: TrackingSettings = TrackingSettings()
    journal: JournalSettings = JournalSettings()
    watcher: WatcherSettings = WatcherSettings()
    s3: S3Settings = S3Settings()
    sftp: SftpSettings = SftpSettings()
    metrics: MetricsSettings = MetricsSettings()
    audit: AuditSettings = AuditSettings()
    notify: NotifySettings = NotifySettings()
    credentials: dict[str, CredentialSettings] = {}
    routes: list[RouteSettings] = []

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        names: set[str] = set()
        outboxes: dict[Path, str] = {}
        for i, r in enumerate(self.routes):
            where = f"routes[{i}]"
            if r.name in names:
                raise ConfigError(f"{where}.name", f"duplicate route name {r.name!r}")
            names.add(r.name)
            out = Path(os.path.abspath(r.outbox))
            if out in outboxes:
                raise ConfigError(f"{where}.outbox", f"same outbox as route {outboxes[out]!r}")
            outboxes[out] = r.name
            cred = self.credentials.get(r.credential)
            if cred is None:
                raise ConfigError(f"{where}.credential", f"no [credentials.{r.credential}] section")
            for t in r.transports:
                if t in ("rest", "s3") and not (cred.client_id and cred.client_secret):
                    raise ConfigError(f"credentials.{r.credential}",
                                      f"route {r.name!r} uses {t}: client_id and client_secret are required")
                if t == "sftp" and not (cred.sftp_username and (cred.sftp_password or cred.sftp_private_key)):
                    raise ConfigError(f"credentials.{r.credential}",
                                      f"route {r.name!r} uses sftp: sftp_username and sftp_password or sftp_private_key are required")
        return self

    def route(self, name: str) -> RouteSettings:
        for r in self.routes:
            if r.name == name:
                return r
        raise ConfigError("routes", f"no route named {name!r}")

    @property
    def journal_path(self) -> Path:
        return self.agent.data_dir / "journal.sqlite3"

    @property
    def audit_path(self) -> Path:
        return self.audit.path or self.agent.data_dir / "audit.jsonl"


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and ("[" in part or "(" in part):
            continue  # pydantic's union-member tags (literal[...], list[...]) are not keys
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def parse_config(data: dict[str, Any], base_dir: Path | None = None) -> Config:
    """Validate a config mapping; raise ConfigError naming the first bad key."""
    try:
        cfg = Config.model_validate(data)
    except ConfigError:
        raise
    except ValidationError as exc:
        err = exc.errors()[0]
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, ConfigError):
            raise ctx_err from None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        raise ConfigError(_loc(err["loc"]) or "config", msg) from None
    if base_dir is not None:
        cfg = _absolutise(cfg, base_dir)
    return cfg


def _absolutise(cfg: Config, base: Path) -> Config:
    """Relative paths in the file are relative to the file's folder."""

    def fix(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base / p).resolve())

    agent = cfg.agent.model_copy(update={"data_dir": fix(cfg.agent.data_dir)})
    routes = [
        r.model_copy(update={k: fix(getattr(r, k)) for k in
                             ("outbox", "sent_dir", "accepted_dir", "rejected_dir", "failed_dir", "feedback_dir")})
        for r in cfg.routes
    ]
    creds = {n: c.model_copy(update={"sftp_private_key": fix(c.sftp_private_key)}) for n, c in cfg.credentials.items()}
    sftp = cfg.sftp.model_copy(update={"known_hosts": fix(cfg.sftp.known_hosts)})
    audit = cfg.audit.model_copy(update={"path": fix(cfg.audit.path)})
    notify = cfg.notify.model_copy(update={"smtp_ca_file": fix(cfg.notify.smtp_ca_file)})
    return cfg.model_copy(update={"agent": agent, "routes": routes, "credentials": creds, "sftp": sftp,
                                  "audit": audit, "notify": notify})


def load_config(path: Path | str) -> Config:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    return parse_config(data, base_dir=path.parent.resolve())


def valid_remote_name(name: str) -> str | None:
    """None if fileX accepts the name, else the reason it does not."""
    if not name:
        return "empty file name"
    if "#" in name:
        return "file name contains '#': fileX drops everything after it"
    if not FILE_NAME_RE.match(name):
        bad = sorted({c for c in name if not FILE_NAME_RE.match(c)})
        return "file name has characters fileX does not accept: " + " ".join(repr(c) for c in bad)
    return None
