"""A local file opened once, without following links, and read by position.

Why: after a file is claimed, every later step (hash, size check, upload) must see the same
bytes. Opening by path each time follows whatever the path names *now*: a symlink swapped in
between would upload any file the agent can read. ``LocalFile`` opens the path once with
``O_NOFOLLOW`` (a final symlink is refused), requires a regular file (``fstat`` on the
descriptor), and every read is an ``os.pread`` on that one descriptor, so readers have
independent positions (parallel multipart parts) and nothing re-resolves the path.

Imports nothing of the project but its errors: transports and the pipeline both use it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Iterator

from filex_agent.errors import PermanentError

BLOCK = 1 << 20


class LocalFile:
    """One open regular file. ``size``/``mtime_ns`` are from the ``fstat`` at open."""

    def __init__(self, fd: int, path: Path, st: os.stat_result):
        self._fd = fd
        self.path = path  # for names and log lines only: never re-opened
        self.size = st.st_size
        self.mtime_ns = st.st_mtime_ns
        self.ino = st.st_ino
        self.nlink = st.st_nlink

    @classmethod
    def open(cls, path: Path | str) -> "LocalFile":
        """Open ``path`` for reading; OSError (ELOOP for a symlink) or PermanentError (not a regular file)."""
        path = Path(path)
        # O_NONBLOCK: opening a FIFO someone put in the outbox must not hang the agent.
        flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PermanentError(f"{path} is not a regular file")
            return cls(fd, path, st)
        except BaseException:
            os.close(fd)
            raise

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        return self._fd

    def stat(self) -> os.stat_result:
        return os.fstat(self._fd)

    def changed(self) -> bool:
        """Size or mtime differ from what they were at open (the bytes may differ)."""
        try:
            st = os.fstat(self._fd)
        except OSError:
            return True
        return (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns)

    def pread(self, n: int, offset: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer only at end of file)."""
        chunks: list[bytes] = []
        while n > 0:
            data = os.pread(self._fd, n, offset)
            if not data:
                break
            chunks.append(data)
            n -= len(data)
            offset += len(data)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def blocks(self, block: int = BLOCK, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes [start, end) (end: the size at open) in blocks; stops early if the file shrank."""
        end = self.size if end is None else end
        pos = start
        while pos < end:
            data = self.pread(min(block, end - pos), pos)
            if not data:
                return
            pos += len(data)
            yield data

    def sha256(self) -> str:
        h = hashlib.sha256()
        for data in self.blocks():
            h.update(data)
        return h.hexdigest()

    def reader(self, start: int = 0, length: int | None = None) -> "RangeReader":
        """A file object over [start, start+length) (within the size at open) with its own position."""
        left = max(0, self.size - start)
        return RangeReader(self, start, left if length is None else min(length, left))

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "LocalFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalFile({str(self.path)!r}, size={self.size})"


class RangeReader:
    """Read-only, seekable file object over a byte range of a ``LocalFile`` (pread based)."""

    def __init__(self, lf: LocalFile, start: int, length: int):
        self._lf = lf
        self._start = start
        self._length = max(0, length)
        self._pos = 0
        self.closed = False

    def read(self, amount: int | None = -1) -> bytes:
        left = self._length - self._pos
        n = left if amount is None or amount < 0 else min(amount, left)
        if n <= 0:
            return b""
        data = self._lf.pread(n, self._start + self._pos)
        self._pos += len(data)
        return data

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def seek(self, where: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, base + where)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def __len__(self) -> int:
        return self._length

    def close(self) -> None:
        self.closed = True  # the descriptor belongs to the LocalFile

    def __enter__(self) -> "RangeReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_for_upload(local: "LocalFile | Path | str") -> contextlib.AbstractContextManager[LocalFile]:
    """The ``LocalFile`` to upload: the caller's (left open), or ``local`` opened now and closed after.

    Errors are the transports' taxonomy: an unreadable path or a symlink is a PermanentError.
    """
    if isinstance(local, LocalFile):
        return contextlib.nullcontext(local)
    try:
        return LocalFile.open(local)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermanentError(f"{local} is a symbolic link; only regular files are uploaded") from None
        raise PermanentError(f"cannot read {local}: {exc.strerror}") from None
