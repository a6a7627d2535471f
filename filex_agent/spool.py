"""The spool: where a claimed file waits until it is filed, out of the producers' reach.

It is ``OUTBOX/.filex-agent``: on the outbox's filesystem, so the claim stays one atomic
rename, and at the path earlier versions used, so an old journal's ``local_path``s
(``OUTBOX/.filex-agent/ID/NAME``) still recover. The outbox is writable by producers, so the
spool is never trusted by name: it is opened without following links, must belong to the
agent and is kept at mode 0700, and the claim renames into that opened directory (``renameat``
on its descriptor), so a spool swapped for a link after the check still receives nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from filex_agent.errors import ConfigError

if TYPE_CHECKING:
    from filex_agent.config import Config, RouteSettings

log = logging.getLogger(__name__)

SPOOL = ".filex-agent"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def spool_dir(route: "RouteSettings") -> Path:
    return Path(route.outbox) / SPOOL


class SpoolError(ConfigError):
    """The route's spool is not the agent's own private folder (a link, someone else's)."""

    def __init__(self, route: "RouteSettings", problem: str):
        path = spool_dir(route)
        super().__init__(f"routes.{route.name}.outbox",
                         f"route {route.name!r}, outbox {route.outbox}: the spool {path} {problem}; refused — "
                         f"claimed files must stay where producers cannot reach them. Remove {path} (after "
                         f"checking what it holds); the agent recreates it, owned by {_user(os.geteuid())}, mode 0700")


def _user(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def open_spool(route: "RouteSettings") -> int:
    """A descriptor of the route's spool, created if missing, verified (a real directory of the
    agent's, not a link) and set to mode 0700. The caller closes it. SpoolError otherwise."""
    path = spool_dir(route)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            if path.is_symlink():
                raise SpoolError(route, f"is a symbolic link (to {os.readlink(path)})") from None
            raise SpoolError(route, "is not a folder") from None
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise SpoolError(route, f"belongs to {_user(st.st_uid)}, not to the agent")
        if stat.S_IMODE(st.st_mode) != 0o700:
            # Earlier versions created it with the umask's mode: close it to everyone else.
            log.info("route %s: spool %s was mode %o; set to 0700", route.name, path, stat.S_IMODE(st.st_mode))
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_spool(route: "RouteSettings") -> None:
    os.close(open_spool(route))


def check_spools(config: "Config") -> None:
    """At start-up: every route's spool is the agent's own (SpoolError naming the route otherwise)."""
    for route in config.routes:
        if Path(route.outbox).is_dir():
            check_spool(route)


@contextmanager
def opened_spool(route: "RouteSettings") -> Iterator[int]:
    """``open_spool`` for the length of a batch of claims (one open and check, not one per file)."""
    fd = open_spool(route)
    try:
        yield fd
    finally:
        os.close(fd)


def claim_into_spool(route: "RouteSettings", sub_id: int, src: Path, spool_fd: int | None = None) -> str | None:
    """Rename ``src`` to ``SPOOL/sub_id/NAME`` through verified descriptors and take ownership of
    it. None when done; a reason when what arrived is not a regular file (it was swapped for a
    link or a device between the check and the rename: it is then in the spool, to be failed).
    ``spool_fd``: the spool already opened by ``opened_spool``."""
    if spool_fd is not None:
        return _claim_into(spool_fd, sub_id, src)
    spool = open_spool(route)
    try:
        return _claim_into(spool, sub_id, src)
    finally:
        os.close(spool)


def _claim_into(spool: int, sub_id: int, src: Path) -> str | None:
    name = str(sub_id)
    try:
        os.mkdir(name, 0o700, dir_fd=spool)
    except FileExistsError:
        pass
    sub_dir = os.open(name, _DIR_FLAGS, dir_fd=spool)
    try:
        os.rename(src, src.name, dst_dir_fd=sub_dir)
        return _take_ownership(sub_dir, src.name)
    finally:
        os.close(sub_dir)


def _take_ownership(dir_fd: int, name: str) -> str | None:
    """Make the claimed file the agent's: owned by it when running as root (else it keeps its
    owner, but sits in a folder only the agent can enter), with no group/other write and no
    set-id bits. If other hard links remain, the submitter makes a private copy anyway."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"refused: {name} turned into a symbolic link while it was claimed; links are never filed"
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return f"refused: {name} is not a regular file"
        if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
            os.fchown(fd, os.geteuid(), os.getegid())
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o7022:
            try:
                os.fchmod(fd, mode & ~0o7022)
            except PermissionError:
                # Another user's file and the agent is not root: unreachable by path anyway.
                log.debug("cannot change the mode of %s (owner uid %d)", name, st.st_uid)
        return None
    finally:
        os.close(fd)
