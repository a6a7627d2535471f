"""Local file safety: moves that never overwrite, atomic writes, remote-name sanitising.

Every place that puts a file on the local disk goes through here, so the rules live once:
never overwrite (add a suffix), never leave a partial file under a final name, fsync before
the name appears.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
import threading
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

if TYPE_CHECKING:
    from filex_agent.config import FilePerms

from filex_agent.localfile import LocalFile

CHUNK = 1 << 20


def sha256_file(path: "Path | LocalFile") -> str:
    if isinstance(path, LocalFile):
        return path.sha256()  # the claimed descriptor, not whatever the path names now
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class GroupSync:
    """Group commit: the writes of several threads made durable by one fsync.

    A writer calls ``written()`` once its bytes are in the OS (after the write or COMMIT, in the
    order they were made) and then ``wait(ticket)``, which returns once an fsync that began after
    that write has completed: either its own, or one another thread started meanwhile. Each fsync
    covers every write ticketed before it began, so N concurrent writers pay one fsync, not N, and
    none returns before its own write is on disk.
    """

    def __init__(self, sync) -> None:  # noqa: ANN001 - a callable that fsyncs everything written so far
        self._sync = sync
        self._cv = threading.Condition()
        self._written = 0
        self._synced = 0
        self._busy = False
        self.syncs = 0  # fsyncs made (for tests and benchmarks)

    def written(self) -> int:
        with self._cv:
            self._written += 1
            return self._written

    def wait(self, ticket: int) -> None:
        with self._cv:
            while self._synced < ticket:
                if not self._busy:
                    self._busy = True
                    target = self._written  # everything written so far is in the OS: this fsync covers it
                    break
                self._cv.wait()
            else:
                return
        ok = False
        try:
            self._sync()
            ok = True
        finally:
            with self._cv:
                self._busy = False
                self.syncs += 1
                if ok:
                    self._synced = max(self._synced, target)
                self._cv.notify_all()

    def sync(self) -> None:
        """Make everything written so far durable."""
        self.wait(self.written())


def fsync_path(path: Path | str) -> bool:
    """fsync a file by name (any descriptor of an inode flushes it); False if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def apply_perms(target: int | Path, perms: "FilePerms | None") -> None:
    """Give a filed file the configured mode and group (fd or path, never following a link).
    A file the agent does not own (and cannot chown, not being root) keeps what it has."""
    if perms is None:
        return
    if isinstance(target, int):
        fd = target
    else:
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return  # a link moved aside (never followed), or gone
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return
        try:
            if perms.gid is not None and st.st_gid != perms.gid:
                os.fchown(fd, -1, perms.gid)
            if stat.S_IMODE(st.st_mode) != perms.mode:
                os.fchmod(fd, perms.mode)
        except PermissionError:
            pass  # another user's file, or a group the agent is not in: left as it is
    finally:
        if not isinstance(target, int):
            os.close(fd)


def _candidates(dest_dir: Path, name: str) -> Iterator[Path]:
    yield dest_dir / name
    stem, dot, ext = name.rpartition(".")
    if not stem:  # no dot, or a leading dot only
        stem, dot, ext = name, "", ""
    for i in range(1, 100000):
        yield dest_dir / f"{stem}~{i}{dot}{ext}"
    raise FileExistsError(f"no free name for {name} in {dest_dir}")


def _same_inode(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _already_linked(src: Path, dest_dir: Path, name: str) -> Path | None:
    """A name in dest_dir that already is ``src`` (a crash between link and unlink of a move)."""
    try:
        if os.lstat(src).st_nlink < 2:
            return None
    except OSError:
        return None
    for cand in _candidates(dest_dir, name):
        if not os.path.lexists(cand):
            return None
        if _same_inode(src, cand):
            return cand
    return None


def find_identical(dest_dir: Path, name: str, size: int, sha256: str) -> Path | None:
    """A file already filed under ``name`` or one of its ``~N`` names with exactly these bytes."""
    for cand in _candidates(dest_dir, name):
        try:
            st = os.lstat(cand)
        except FileNotFoundError:
            return None
        if stat.S_ISREG(st.st_mode) and st.st_size == size and sha256_file(cand) == sha256:
            return cand
    return None


def _link_free(src: Path, dest_dir: Path, name: str) -> Path:
    """Hard-link src under the first free name: link() fails rather than overwrite."""
    for cand in _candidates(dest_dir, name):
        try:
            os.link(src, cand, follow_symlinks=False)
            return cand
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


MOVE_MARK = ".filex-move-"  # a cross-filesystem move's copy, named after its source (see _copy_free)


def move_no_clobber(src: Path, dest_dir: Path, name: str | None = None) -> Path:
    """Move src into dest_dir (as ``name``), never overwriting: ``a.txt`` → ``a~1.txt``.

    Same filesystem: link + unlink (the link fails rather than overwrite). Across filesystems
    (or where the link is refused): copy + fsync + link + unlink, see ``_copy_free``. Symbolic
    links are moved as links, never followed. Crash-safe: calling it again after a crash at any
    step finishes the same move, with neither a second copy nor a lost one.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    name = name or src.name
    marker: Path | None = None
    final = _already_linked(src, dest_dir, name)  # interrupted earlier after the link
    if final is None:
        try:
            final = _link_free(src, dest_dir, name)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                raise
            final, marker = _copy_free(src, dest_dir, name)
    fsync_dir(dest_dir)  # the new name is on disk before the old one goes
    os.unlink(src)
    fsync_dir(src.parent)
    if marker is not None:
        os.unlink(marker)
        fsync_dir(dest_dir)
    return final


def _move_marker(dest_dir: Path, st: os.stat_result) -> Path:
    return dest_dir / f"{MOVE_MARK}{st.st_dev:x}-{st.st_ino:x}"


def _copy_free(src: Path, dest_dir: Path, name: str) -> tuple[Path, Path]:
    """Copy src into dest_dir under a free name; returns (final name, marker).

    The copy is made under a marker name derived from the source's identity (device, inode),
    fsynced, then hard-linked under the final name; the caller unlinks the source, then the
    marker. So after a crash the marker tells the next attempt what it had done: absent or not
    linked yet, the copy is redone; linked, the final name is found by its inode and only the
    source (and the marker) remain to be removed. Never a second copy, never a lost one.
    """
    st = os.lstat(src)
    marker = _move_marker(dest_dir, st)
    final = _resumable(src, marker, dest_dir, name)
    if final is not None:
        return final, marker
    if os.path.lexists(marker):
        os.unlink(marker)  # a copy cut short (or a stale one): start again
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), marker)  # the link itself, never its target
    else:
        with open(marker, "xb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
    try:
        shutil.copystat(src, marker, follow_symlinks=False)
    except (NotImplementedError, OSError):  # lutimes/lchmod missing: times are not essential
        pass
    return _link_free(marker, dest_dir, name), marker


def _same_content(src: Path, copy: Path) -> bool:
    a, b = os.lstat(src), os.lstat(copy)
    if stat.S_IFMT(a.st_mode) != stat.S_IFMT(b.st_mode):
        return False
    if stat.S_ISLNK(a.st_mode):
        return os.readlink(src) == os.readlink(copy)
    return a.st_size == b.st_size and sha256_file(src) == sha256_file(copy)


def _resumable(src: Path, marker: Path, dest_dir: Path, name: str) -> Path | None:
    """The final name an interrupted copy of src was already linked under, if any."""
    try:
        if not _same_content(src, marker):
            return None
    except OSError:  # no marker: nothing was begun
        return None
    return _already_linked(marker, dest_dir, name)


def forget_move_marker(final: Path) -> None:
    """Drop the marker a crash left after the source of a copy-move was already gone (the
    move is complete: the marker is only a second name of ``final``)."""
    try:
        st = os.lstat(final)
    except OSError:
        return
    if st.st_nlink < 2:
        return
    for m in final.parent.glob(MOVE_MARK + "*"):
        if _same_inode(m, final):
            os.unlink(m)


@contextmanager
def atomic_writer(dest_dir: Path, name: str, *, reuse_identical: bool = False,
                  perms: "FilePerms | None" = None) -> Iterator[tuple[BinaryIO, list[Path]]]:
    """Write into a temporary file in dest_dir; on success fsync and link it under a free
    name (never overwriting). Yields (file, result) — result[0] is the final path afterwards.
    On any error the temporary file is removed and nothing appears under the final name.

    ``reuse_identical``: if ``name`` (or a ``~N`` variant) already holds exactly these bytes,
    that file is the result and no second copy is linked (redoing a write a crash may have
    completed). ``perms``: mode and group of the file (else mkstemp's 0600)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".filex-partial-", dir=dest_dir)
    result: list[Path] = []
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, result
            f.flush()
            apply_perms(f.fileno(), perms)
            os.fsync(f.fileno())
        same = None
        if reuse_identical:
            same = find_identical(dest_dir, name, os.stat(tmp).st_size, sha256_file(Path(tmp)))
        result.append(same if same is not None else _link_free(Path(tmp), dest_dir, name))
        fsync_dir(dest_dir)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def cleanup_partials(dest_dir: Path) -> int:
    """Remove temporary files left by a crash mid-write (not a move's marker: the move that
    made it finishes or redoes it, see ``_copy_free``)."""
    n = 0
    if dest_dir.is_dir():
        for p in dest_dir.glob(".filex-*"):
            if p.is_file() and not p.name.startswith(MOVE_MARK):
                p.unlink(missing_ok=True)
                n += 1
    return n


_UNSAFE = re.compile(r"[^A-Za-z0-9._@,&=!:'+~-]")


def sanitize_remote_name(name: str) -> str:
    """A remote (untrusted) name → a safe single local file name.

    No path separators, no ``..``, no control or invisible characters, no Unicode look-alike
    tricks (NFKC then ASCII only), no leading dot, bounded length.
    """
    name = unicodedata.normalize("NFKC", name)
    name = name.replace("/", "_").replace("\\", "_")
    name = "".join(c for c in name if unicodedata.category(c)[0] != "C")  # controls, bidi, zero-width
    name = name.encode("ascii", "replace").decode("ascii").replace("?", "_")
    name = _UNSAFE.sub("_", name)
    name = re.sub(r"\.{2,}", ".", name).lstrip(".-~ ")
    name = name[:200]
    return name or "feedback"


def write_reason(dest: Path, reason: str, perms: "FilePerms | None" = None) -> Path:
    """``NAME.reason.txt`` beside a file moved aside (never overwriting), secrets redacted."""
    from filex_agent.logging_setup import redact

    with atomic_writer(dest.parent, dest.name + ".reason.txt", perms=perms) as (f, result):
        f.write((redact(reason).rstrip() + "\n").encode("utf-8"))
    return result[0]
