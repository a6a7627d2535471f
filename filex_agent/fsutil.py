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
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

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


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
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


def move_no_clobber(src: Path, dest_dir: Path, name: str | None = None) -> Path:
    """Move src into dest_dir (as ``name``), never overwriting: ``a.txt`` → ``a~1.txt``.

    Same filesystem: link + unlink (atomic, no overwrite). Across filesystems: copy to a
    temporary name, fsync, link under the final name, then remove the source.
    Symlinks are moved as links (never followed).
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    name = name or src.name
    done = _already_linked(src, dest_dir, name)
    if done is not None:
        # Interrupted earlier after the link: finishing means dropping the source name only.
        os.unlink(src)
        fsync_dir(dest_dir)
        return done
    if src.is_symlink():
        for cand in _candidates(dest_dir, name):
            if not os.path.lexists(cand):
                os.rename(src, cand)  # renames the link itself
                return cand
    try:
        final = _link_free(src, dest_dir, name)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
            raise
        fd, tmp = tempfile.mkstemp(prefix=".filex-move-", dir=dest_dir)
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())
            shutil.copystat(src, tmp)
            final = _link_free(Path(tmp), dest_dir, name)
        finally:
            os.unlink(tmp)
    os.unlink(src)
    fsync_dir(dest_dir)
    return final


@contextmanager
def atomic_writer(dest_dir: Path, name: str, *, reuse_identical: bool = False) -> Iterator[tuple[BinaryIO, list[Path]]]:
    """Write into a temporary file in dest_dir; on success fsync and link it under a free
    name (never overwriting). Yields (file, result) — result[0] is the final path afterwards.
    On any error the temporary file is removed and nothing appears under the final name.

    ``reuse_identical``: if ``name`` (or a ``~N`` variant) already holds exactly these bytes,
    that file is the result and no second copy is linked (redoing a write a crash may have
    completed)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".filex-partial-", dir=dest_dir)
    result: list[Path] = []
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, result
            f.flush()
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
    """Remove temporary files left by a crash mid-write."""
    n = 0
    if dest_dir.is_dir():
        for p in dest_dir.glob(".filex-*"):
            if p.is_file():
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


def write_reason(dest: Path, reason: str) -> Path:
    """``NAME.reason.txt`` beside a file moved aside (never overwriting)."""
    with atomic_writer(dest.parent, dest.name + ".reason.txt") as (f, result):
        f.write((reason.rstrip() + "\n").encode("utf-8"))
    return result[0]
