"""Transports: one small interface, one module per way of reaching fileX.

A transport is bound to one route's (org, application). It moves bytes and lists the
feedback sub-space; it knows nothing of the journal, the outbox or the local feedback folder.
Atomic writes of downloads (temp file, fsync, rename, never overwrite) are done by the caller
(``filex_agent.feedback``), which hands the transport an open binary file to write into.

Registry: ``create_transport(kind, ctx)`` looks the kind up in ``TRANSPORTS``; a new transport
registers itself with ``@register("name")`` and must pass ``tests/conformance``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Callable

from filex_agent.localfile import LocalFile

ProgressFn = Callable[[int], None]
"""Called with the number of bytes just transferred (for progress bars and metrics)."""


@dataclass(frozen=True)
class UploadResult:
    remote_name: str
    # "org/app/in" like fileX's tracking ``uploadLocation``.
    upload_location: str
    size: int
    started_at: datetime
    finished_at: datetime
    # REST returns one with the pre-signed URL; S3 and SFTP uploads are matched later.
    tracking_id: str | None = None
    # Free-form proof of integrity from the far side (ETag, remote size...).
    detail: dict[str, str] = field(default_factory=dict)
    # SHA-256 of the bytes actually sent (hashed as they went, or proven equal to them: see each
    # transport). The caller compares it with the digest taken at claim: size + mtime alone can be
    # faked with utime. None when the transport could not establish it.
    sent_sha256: str | None = None


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int | None = None
    modified: datetime | None = None


class Transport(abc.ABC):
    """Moves files for one (org, application)."""

    kind: str = ""
    # Called with an id fileX assigns BEFORE any byte is sent (REST: the tracking id of the
    # pre-signed URL), so the journal can record it write-ahead; crash recovery then asks
    # tracking about exactly that id.
    on_ticket: Callable[[str], None] | None = None
    # Called (synchronously; it may raise to abort) just before the first request whose success
    # can make the file a filing at fileX: the pre-signed PUT of the body, PutObject or
    # CompleteMultipartUpload, the SFTP rename into ``in/``. The caller journals "bytes may have
    # landed" there. After it, a failure whose outcome is unknown raises ``UploadUnconfirmed``
    # and is never retried by the transport; before it, retries are safe.
    on_commit: Callable[[], None] | None = None
    # True when this transport calls ``on_commit`` at its point of no return. False: the caller
    # must assume anything may land from the first byte (it journals the commit before upload).
    reports_commit: bool = False

    def __init__(self, org: str, application: str):
        self.org = org
        self.application = application

    @property
    def upload_location(self) -> str:
        return f"{self.org}/{self.application}/in"

    @abc.abstractmethod
    def upload(self, local: LocalFile | Path, remote_name: str, progress: ProgressFn | None = None, *,
               on_commit: Callable[[], None] | None = None,
               on_ticket: Callable[[str], None] | None = None) -> UploadResult:
        """Send ``local`` whole as ``in/remote_name``; raise Transient/PermanentError.

        ``local`` is read through its one descriptor only (a ``Path`` is opened with O_NOFOLLOW
        for the call: tests and tools). Must never leave a partial object that fileX could take as
        a submission. ``on_commit`` is called before each committing request; after it, an
        unknown outcome raises ``UploadUnconfirmed`` and nothing is sent again. The hooks given
        here win over the attributes: a transport shared by several workers (S3, SFTP) must be
        handed them per call, never have them set on it.
        """

    @abc.abstractmethod
    def list_feedback(self) -> list[RemoteFile]:
        """Files in the ``out`` sub-space."""

    @abc.abstractmethod
    def download_feedback(self, name: str, dest: BinaryIO, progress: ProgressFn | None = None) -> int:
        """Stream ``out/name`` into ``dest``; return the number of bytes written."""

    def find_uploaded(self, remote_name: str) -> RemoteFile | None:
        """Evidence for the reconciler: ``in/remote_name`` with its size and remote modification
        time, or None when it is absent OR cannot be known (the credentials may not read ``in/``).
        Never raises for a refusal, never looks at ``in_arcv``."""
        return None

    def _hooks(self, on_commit: Callable[[], None] | None, on_ticket: Callable[[str], None] | None,
               ) -> tuple[Callable[[], None], Callable[[str], None]]:
        """The hooks of one upload: those passed to ``upload``, else the attributes, else no-ops."""
        commit = on_commit if on_commit is not None else self.on_commit
        ticket = on_ticket if on_ticket is not None else self.on_ticket
        return commit or _no_commit, ticket or _no_ticket

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _no_commit() -> None:
    pass


def _no_ticket(ticket: str) -> None:
    pass


TRANSPORTS: dict[str, type] = {}


def register(kind: str):
    def deco(cls):
        cls.kind = kind
        TRANSPORTS[kind] = cls
        return cls

    return deco
