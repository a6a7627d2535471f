"""Configuration: TOML file validated by pydantic; errors name the dotted key.

Secrets are never inlined: a secret field holds a *reference* — ``env:VAR``, ``file:/path`` or
``systemd:NAME`` (read from ``$CREDENTIALS_DIRECTORY/NAME``, systemd's ``LoadCredential=``).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import socket
import tomllib
import zoneinfo
from datetime import datetime, time
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

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


class FilePerms(BaseModel):
    """Mode and group (None: leave it) applied to filed files."""

    model_config = ConfigDict(frozen=True)
    mode: int = 0o640
    gid: int | None = None


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
    # Kept for old configs; where the journal lives is [journal] (url: SQLite or PostgreSQL).
    store: Literal["sqlite"] = "sqlite"
    # Feedback files, reason files and archived originals: this mode and group, so that e.g. a
    # compliance group can read FINRA's feedback. Group default: data_dir's group.
    file_mode: str = "0640"
    file_group: str | None = None

    @field_validator("file_mode")
    @classmethod
    def _file_mode(cls, v: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3}", v) or int(v, 8) & 0o133:
            raise ValueError('an octal mode as a string, e.g. "0640"; no execute bits, no group/other write')
        if not int(v, 8) & 0o600 == 0o600:
            raise ValueError("the owner (the agent) needs read and write")
        return v

    @field_validator("file_group")
    @classmethod
    def _file_group(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            import grp

            grp.getgrnam(v)
        except KeyError:
            raise ValueError(f"no group named {v!r} on this machine") from None
        return v


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
    # Plain http:// endpoints and pre-signed URLs, or verify_tls = false: the client secret and
    # the filings would travel in clear. Only for a test server (name = "custom"), on purpose.
    allow_insecure: bool = False

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
        self._refuse_insecure()
        return self

    def _refuse_insecure(self) -> None:
        if self.allow_insecure and self.name != "custom":
            raise ConfigError("environment.allow_insecure",
                              f"only for a test server (name = 'custom'), never for {self.name!r}")
        if self.allow_insecure:
            return
        for key in ("fip_token_url", "api_base_url", "s3_endpoint_url"):
            url = getattr(self, key)
            if url and not str(url).lower().startswith("https://"):
                raise ConfigError(f"environment.{key}",
                                  "must be https:// (the client secret and the filings would go in clear); "
                                  "plain http only for a test server: name = 'custom' and allow_insecure = true")
        if not self.verify_tls:
            raise ConfigError("environment.verify_tls",
                              "false is refused: TLS is what proves the server is FINRA; only for a test "
                              "server: name = 'custom' and allow_insecure = true")


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
    # Trust on first use: the first key the server offers is recorded in data_dir/known_hosts and
    # any other key is refused afterwards. Never the default; pinning a fingerprint is better.
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


HHMM_RE = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


def parse_hhmm(value: str, allow_24: bool = False) -> time | None:
    """"18:00" -> time(18, 0); "24:00" (end of day, only where allowed) -> None."""
    if allow_24 and value == "24:00":
        return None
    if not isinstance(value, str) or not HHMM_RE.match(value):
        raise ValueError("must be a local time HH:MM (24-hour clock)" + (', or "24:00"' if allow_24 else ""))
    h, m = value.split(":")
    return time(int(h), int(m))


@lru_cache(maxsize=None)
def financial_calendars() -> tuple[str, ...]:
    """Exchange calendar codes the ``holidays`` package maintains (NYSE, XNYS, ECB, ...)."""
    import holidays

    return tuple(sorted(holidays.list_supported_financial()))


def _calendar_name(v: str) -> str:
    if v not in financial_calendars():
        raise ValueError(f"unknown exchange calendar {v!r}; one of {', '.join(financial_calendars())}")
    return v


def _timezone_name(v: str) -> str:
    try:
        zoneinfo.ZoneInfo(v)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {v!r} (an IANA name such as America/New_York)") from None
    return v


class _Localised(_Strict):
    # Business days come from this exchange calendar (the `holidays` package's financial
    # calendars: NYSE holidays and its 1 pm early closes); times are local to `timezone`.
    calendar: str = "NYSE"
    timezone: str = "America/New_York"

    @field_validator("calendar")
    @classmethod
    def _cal(cls, v: str) -> str:
        return _calendar_name(v)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        return _timezone_name(v)


class BlackoutSettings(_Strict):
    # Local date-times (in the window's time zone) unless an offset is given.
    start: datetime
    end: datetime
    reason: str = "declared maintenance window"

    @model_validator(mode="after")
    def _order(self) -> "BlackoutSettings":
        if (self.start.tzinfo is None) != (self.end.tzinfo is None):
            raise ValueError("start and end must both have an offset or both be local times")
        if self.end <= self.start:
            raise ValueError("end must be after start")
        return self


class SubmissionWindowSettings(_Localised):
    """When a route may send: days and hours, minus declared blackouts (FINRA maintenance)."""

    days: Literal["every_day", "weekdays", "business_days"] = "weekdays"
    start: str = "00:00"
    end: str = "24:00"
    blackouts: list[BlackoutSettings] = []

    @field_validator("start")
    @classmethod
    def _start(cls, v: str) -> str:
        parse_hhmm(v)
        return v

    @field_validator("end")
    @classmethod
    def _end(cls, v: str) -> str:
        parse_hhmm(v, allow_24=True)
        return v

    @model_validator(mode="after")
    def _span(self) -> "SubmissionWindowSettings":
        end = parse_hhmm(self.end, allow_24=True)
        if end is not None and end <= parse_hhmm(self.start):
            raise ValueError("end must be after start (a window does not span midnight; use 24:00)")
        return self


RECURRENCES = ("business_day", "calendar_day", "month_end", "quarter_end", "days_of_month", "cron")


class ExpectationSettings(_Localised):
    """A filing that must reach FINRA on a calendar: see README, "Filing calendar"."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    route: str
    # Glob on the file name (case-sensitive, like routes' include/ignore).
    pattern: str = Field(min_length=1)
    recurrence: Literal["business_day", "calendar_day", "month_end", "quarter_end", "days_of_month", "cron"]
    # Local due time (not with cron: each cron fire time is a deadline).
    due: str | None = None
    # On an exchange early-close day, this due time instead of `due` (e.g. "13:00").
    early_close_due: str | None = None
    # month_end / quarter_end: the deadline is this many business days after the period's last day.
    business_days_after: int | None = Field(None, ge=1, le=250)
    # days_of_month: days 1..31, -1 = the last day (a day past the month's end means its last day).
    days: list[int] = []
    # days_of_month: a day that is not a business day moves to the previous or next business day.
    roll: Literal["previous", "next"] = "previous"
    # cron: "minute hour day month day-of-week", in `timezone`; every fire time is a deadline.
    cron: str | None = None
    # NOT_DROPPED / AT_RISK alerts this long before the deadline.
    warn_before_minutes: float = Field(60.0, ge=0)

    @field_validator("due", "early_close_due")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None:
            parse_hhmm(v)
        return v

    @field_validator("days")
    @classmethod
    def _days(cls, v: list[int]) -> list[int]:
        for d in v:
            if not (1 <= d <= 31 or d == -1):
                raise ValueError(f"{d} is not a day of the month (1..31, or -1 for the last day)")
        return v


_DOW_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _cron_weekdays(field: str) -> str:
    """A crontab day-of-week field as APScheduler 3 day names.

    APScheduler 3 numbers weekdays from Monday = 0 where crontab has Sunday = 0 (its issue 286,
    kept for compatibility), so "1-5" would silently mean Tuesday to Saturday: numbers, ranges
    and steps are expanded here with crontab's meaning and handed over as names.
    """
    if field == "*":
        return field
    days: set[int] = set()

    def num(tok: str) -> int:
        tok = tok.lower()
        if tok[:3] in _DOW_NAMES and tok.isalpha():
            return _DOW_NAMES.index(tok[:3])
        if tok.isdigit() and 0 <= int(tok) <= 7:
            return int(tok)  # 7 is Sunday too: taken modulo 7 below
        raise ValueError(f"day of week {tok!r} is not 0-7 or a day name")

    for part in field.split(","):
        base, _, step_s = part.partition("/")
        step = int(step_s) if step_s.isdigit() and int(step_s) > 0 else None
        if step_s and step is None:
            raise ValueError(f"bad step in day of week {part!r}")
        if base == "*":
            lo, hi = 0, 6
        elif "-" in base:
            lo_s, hi_s = base.split("-", 1)
            lo, hi = num(lo_s), num(hi_s)
            if hi < lo:
                raise ValueError(f"day-of-week range {base!r} runs backwards")
        else:
            lo = hi = num(base)
            if step is not None:
                hi = 6
        days.update(d % 7 for d in range(lo, hi + 1, step or 1))
    return ",".join(_DOW_NAMES[d] for d in sorted(days))


def cron_trigger(expr: str, tz: str):
    """APScheduler's CronTrigger for a 5-field crontab line with crontab's meaning (ValueError
    if it is not one). Day of month and day of week together are refused: crontab fires when
    *either* matches, APScheduler only when both do."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) != 5:
        raise ValueError("must have 5 fields: minute hour day month day-of-week")
    minute, hour, day, month, dow = fields
    if day not in ("*", "?") and dow not in ("*", "?"):
        raise ValueError("give a day of month or a day of week, not both (use two expectations)")
    return CronTrigger(minute=minute, hour=hour, day=day, month=month, day_of_week=_cron_weekdays(dow),
                       timezone=zoneinfo.ZoneInfo(tz))


def _check_expectation(e: ExpectationSettings, where: str) -> None:
    """Which keys each recurrence needs (and refuses), naming the key."""
    if e.recurrence == "cron":
        if not e.cron:
            raise ConfigError(f"{where}.cron", "required with recurrence = 'cron'")
        if e.due is not None:
            raise ConfigError(f"{where}.due", "not used with recurrence = 'cron' (each fire time is the deadline)")
        try:
            cron_trigger(e.cron, e.timezone)
        except ValueError as exc:
            raise ConfigError(f"{where}.cron", f"not a valid cron expression: {exc}") from None
    else:
        if e.due is None:
            raise ConfigError(f"{where}.due", "required: the local due time, HH:MM")
        if e.cron is not None:
            raise ConfigError(f"{where}.cron", "only with recurrence = 'cron'")
    needs_n = e.recurrence in ("month_end", "quarter_end")
    if needs_n and e.business_days_after is None:
        raise ConfigError(f"{where}.business_days_after", f"required with recurrence = {e.recurrence!r}")
    if not needs_n and e.business_days_after is not None:
        raise ConfigError(f"{where}.business_days_after", "only with recurrence = 'month_end' or 'quarter_end'")
    if e.recurrence == "days_of_month" and not e.days:
        raise ConfigError(f"{where}.days", "required with recurrence = 'days_of_month' (e.g. [15, -1])")
    if e.recurrence != "days_of_month" and e.days:
        raise ConfigError(f"{where}.days", "only with recurrence = 'days_of_month'")


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
    # "trigger": taken when NAME<trigger_suffix> appears beside NAME and NAME is stable as well.
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
    # Optional: when files may be sent; a file claimed outside waits QUEUED until it opens.
    submission_window: SubmissionWindowSettings | None = None

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


class WebSettings(_Strict):
    """The read-only status web page (filex_agent/web)."""

    enabled: bool = False
    # Loopback by default. Any other address needs authentication and TLS (checked below).
    listen: str = "127.0.0.1:8470"
    # Authentication, either or both: a bearer token (also accepted as the password of HTTP Basic,
    # with any user name, so a browser can sign in), or a password hash for HTTP Basic with
    # `username` (make one with `python -m filex_agent.web.password`). Secret references.
    token: SecretRef | None = None
    password_hash: SecretRef | None = None
    username: str = Field("compliance", min_length=1, pattern=r"^[^:]+$")
    # TLS: PEM certificate (chain) and key files.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # How often an open page fetches fresh figures.
    refresh_seconds: float = Field(5.0, ge=1, le=300)

    @model_validator(mode="after")
    def _safe(self) -> "WebSettings":
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError("web.listen", f"expected host:port (e.g. 127.0.0.1:8470), got {self.listen!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("web.tls_key" if self.tls_key is None else "web.tls_cert",
                              "tls_cert and tls_key go together")
        if self.enabled and not is_loopback(host):
            if self.token is None and self.password_hash is None:
                raise ConfigError("web.token", f"web.listen {self.listen} is not a loopback address: "
                                  "set web.token or web.password_hash (authentication is required)")
            if self.tls_cert is None:
                raise ConfigError("web.tls_cert", f"web.listen {self.listen} is not a loopback address: "
                                  "set web.tls_cert and web.tls_key (TLS is required)")
        return self


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1); "0.0.0.0" is not."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


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


NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class JournalSettings(_Strict):
    """Where the journal lives. Unset (or ``sqlite:///PATH``): the embedded SQLite file, default
    ``data_dir/journal.sqlite3``. ``postgresql://user@host[:port]/db``: one journal shared by
    several agents (high availability); its password is a secret reference, never in the URL."""

    url: str | None = None
    password: SecretRef | None = None
    # libpq's: verify-full checks the server's certificate and name against sslrootcert.
    sslmode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] | None = None
    sslrootcert: Path | None = None
    # This agent's name in the cluster (owner of its leases, row in `filex-agent nodes`).
    node_name: str = Field(default_factory=lambda: socket.gethostname().split(".")[0] or "localhost")
    # A node that stops renewing (dead, paused, cut off) loses its uploads and singletons after this.
    lease_seconds: float = Field(30.0, ge=1, le=3600)
    statement_timeout_seconds: float = Field(10.0, gt=0, le=600)
    pool_size: int = Field(8, ge=2, le=100)

    @model_validator(mode="after")
    def _check(self) -> "JournalSettings":
        if not NODE_NAME_RE.match(self.node_name):
            raise ConfigError("journal.node_name", "letters, digits, '.', '_' and '-' only (at most 63)")
        if self.url is None or self.url.startswith("sqlite:"):
            if self.url is not None and not self.url.startswith("sqlite:///"):
                raise ConfigError("journal.url", "an SQLite journal is written sqlite:///PATH")
            for key in ("password", "sslmode", "sslrootcert"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"journal.{key}", "only for a postgresql:// journal")
            return self
        # Never echo the URL in an error: it may hold the very password being refused.
        try:
            parts = urlsplit(self.url)
            has_password = parts.password is not None
        except ValueError:
            raise ConfigError("journal.url", "not a valid URL") from None
        if parts.scheme not in ("postgresql", "postgres"):
            raise ConfigError("journal.url", "must be postgresql://user@host/dbname or sqlite:///PATH")
        query = {k.lower() for k, _ in parse_qsl(parts.query)}
        if has_password or "password" in query:
            raise ConfigError("journal.url", "contains a password: put a reference in journal.password "
                                             "(env:VAR, file:/path or systemd:NAME) instead")
        if not parts.hostname or not parts.path.strip("/"):
            raise ConfigError("journal.url", "needs a host and a database name: postgresql://user@host/dbname")
        if self.sslrootcert is not None and self.sslmode not in ("verify-ca", "verify-full"):
            raise ConfigError("journal.sslmode", "set verify-ca or verify-full for sslrootcert to be checked")
        return self

    @property
    def is_postgres(self) -> bool:
        return self.url is not None and not self.url.startswith("sqlite:")

    @property
    def sqlite_path(self) -> Path | None:
        return Path(self.url[len("sqlite:///"):]) if self.url and self.url.startswith("sqlite:///") else None


class Config(_Strict):
    agent: AgentSettings
    environment: EnvironmentSettings = EnvironmentSettings()
    network: NetworkSettings = NetworkSettings()
    tracking: TrackingSettings = TrackingSettings()
    watcher: WatcherSettings = WatcherSettings()
    s3: S3Settings = S3Settings()
    sftp: SftpSettings = SftpSettings()
    metrics: MetricsSettings = MetricsSettings()
    web: WebSettings = WebSettings()
    audit: AuditSettings = AuditSettings()
    notify: NotifySettings = NotifySettings()
    journal: JournalSettings = JournalSettings()
    credentials: dict[str, CredentialSettings] = {}
    routes: list[RouteSettings] = []
    expectations: list[ExpectationSettings] = []

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.journal.is_postgres and self.journal.pool_size < self.agent.workers + 2:
            # Each upload worker holds a connection at times; the heartbeat and tracker need theirs.
            raise ConfigError("journal.pool_size", f"at least agent.workers + 2 ({self.agent.workers + 2})")
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
        expectation_names: set[str] = set()
        for i, e in enumerate(self.expectations):
            where = f"expectations[{i}]"
            if e.name in expectation_names:
                raise ConfigError(f"{where}.name", f"duplicate expectation name {e.name!r}")
            expectation_names.add(e.name)
            if e.route not in names:
                raise ConfigError(f"{where}.route", f"no route named {e.route!r}")
            _check_expectation(e, where)
        return self

    def route(self, name: str) -> RouteSettings:
        for r in self.routes:
            if r.name == name:
                return r
        raise ConfigError("routes", f"no route named {name!r}")

    @property
    def file_perms(self) -> "FilePerms":
        """Mode and group of the files the agent files (feedback, reasons, archived originals)."""
        gid: int | None = None
        if self.agent.file_group:
            import grp

            gid = grp.getgrnam(self.agent.file_group).gr_gid
        else:
            try:
                gid = self.agent.data_dir.stat().st_gid
            except OSError:
                gid = None
        return FilePerms(mode=int(self.agent.file_mode, 8), gid=gid)

    @property
    def journal_path(self) -> Path:
        """The SQLite journal's file (unused when the journal is PostgreSQL)."""
        return self.journal.sqlite_path or self.agent.data_dir / "journal.sqlite3"

    @property
    def audit_path(self) -> Path:
        if self.audit.path:
            return self.audit.path
        # A shared journal: one hash chain per node (data_dir may be shared too), named by node.
        return self.agent.data_dir / (f"audit-{self.journal.node_name}.jsonl" if self.journal.is_postgres
                                      else "audit.jsonl")


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


def _validate(model: type[_Strict], data: dict[str, Any], prefix: str = "") -> Any:
    """``model`` from ``data``, or the ConfigError naming the first bad key."""
    try:
        return model.model_validate(data)
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
        raise ConfigError(prefix + _loc(err["loc"]) or "config", msg) from None


def parse_journal(data: dict[str, Any]) -> "JournalSettings":
    """A ``[journal]`` table on its own (``journal migrate --to``), with the same checks."""
    return _validate(JournalSettings, data, "journal.")


def parse_config(data: dict[str, Any], base_dir: Path | None = None) -> Config:
    """Validate a config mapping; raise ConfigError naming the first bad key."""
    cfg = _validate(Config, data)
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
    web = cfg.web.model_copy(update={"tls_cert": fix(cfg.web.tls_cert), "tls_key": fix(cfg.web.tls_key)})
    notify = cfg.notify.model_copy(update={"smtp_ca_file": fix(cfg.notify.smtp_ca_file)})
    journal = cfg.journal.model_copy(update={"sslrootcert": fix(cfg.journal.sslrootcert)})
    if cfg.journal.sqlite_path is not None:
        journal = journal.model_copy(update={"url": f"sqlite:///{fix(cfg.journal.sqlite_path)}"})
    return cfg.model_copy(update={"agent": agent, "routes": routes, "credentials": creds, "sftp": sftp,
                                  "audit": audit, "notify": notify, "web": web, "journal": journal})


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
