"""Outbox and archive folders on different filesystems (the README's layout: outboxes under
/srv, sent/ accepted/ failed/ under /var/lib): every move falls back to copy + fsync + unlink
instead of failing with EXDEV, and a symbolic link is moved aside as a link.

Two real tmpfs mounts; the test needs root (or CAP_SYS_ADMIN) and is skipped, saying so,
where mounting is not permitted.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from filex_agent.daemon import Daemon
from filex_agent.store import State
from tests.conftest import wait_for


@contextlib.contextmanager
def _tmpfs(*dirs: Path):
    mounted: list[Path] = []
    try:
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(d)],
                               capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): "
                            f"{(r.stderr or r.stdout).strip()}")
            mounted.append(d)
        yield
    finally:
        for d in reversed(mounted):
            subprocess.run(["umount", "-l", str(d)], check=False)


def _sub(d: Daemon, name: str, state: State):
    def find():
        subs = [s for s in d.store.list() if s.file_name == name]
        return subs and subs[-1].state is state and subs[-1]
    return wait_for(find, timeout=30, what=f"{name} to be {state}")


def test_moves_across_filesystems(sandbox, sandbox_config, tmp_path):
    root = tmp_path / "agent"
    outboxes, data = root / "outbox", root / "agent"  # where write_sandbox_config puts them
    with _tmpfs(outboxes, data):
        assert os.stat(outboxes).st_dev != os.stat(data).st_dev
        cfg = sandbox_config(transports=("rest",))
        route = cfg.routes[0]
        d = Daemon(cfg, dispatch_interval=0.2)
        d.start()
        try:
            outbox = Path(route.outbox)
            target = tmp_path / "shadow"
            target.write_text("not for the regulator\n")
            (outbox / "XFS_link.csv").symlink_to(target)
            (outbox / "XFS_bad#name.csv").write_bytes(b"never sent\n")
            (outbox / "XFS_good.csv").write_bytes(b"id,value\n1,2\n")
            link = _sub(d, "XFS_link.csv", State.FAILED)
            bad = _sub(d, "XFS_bad#name.csv", State.FAILED)
            good = _sub(d, "XFS_good.csv", State.ACCEPTED)
            wait_for(lambda: d.store.get(good.id).move_to is None and
                     Path(d.store.get(good.id).local_path).parent == route.folder("accepted", cfg.agent.data_dir),
                     what="the accepted original filed")
        finally:
            d.stop(grace=5)
        failed = route.folder("failed", cfg.agent.data_dir)
        assert os.stat(failed).st_dev != os.stat(outbox).st_dev
        # The link was moved aside as a link (never followed); its target is untouched.
        moved_link = Path(link.local_path)
        assert moved_link.parent == failed and moved_link.is_symlink()
        assert os.readlink(moved_link) == str(target) and target.read_text() == "not for the regulator\n"
        assert "symbolic link" in Path(f"{moved_link}.reason.txt").read_text()
        moved_bad = Path(bad.local_path)
        assert moved_bad.parent == failed and moved_bad.read_bytes() == b"never sent\n"
        assert Path(f"{moved_bad}.reason.txt").is_file()
        accepted_dir = route.folder("accepted", cfg.agent.data_dir)
        assert [p.read_bytes() for p in accepted_dir.iterdir()] == [b"id,value\n1,2\n"]
        # Nothing left behind: not in the outbox, no marker or temporary in the folders.
        assert [p.name for p in outbox.iterdir() if p.name != ".filex-agent"] == []
        assert sorted(p.name for p in failed.iterdir()) == sorted(
            [moved_link.name, moved_bad.name, f"{moved_link.name}.reason.txt", f"{moved_bad.name}.reason.txt"])
        names = [u.name for u in sandbox.uploads()]
        assert names.count("XFS_good.csv") == 1 and "XFS_link.csv" not in names
