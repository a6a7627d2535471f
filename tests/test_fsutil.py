"""Never overwrite, never a partial file under a final name, safe local names."""

import os

import pytest

from filex_agent.fsutil import atomic_writer, cleanup_partials, move_no_clobber, sanitize_remote_name


def test_move_never_overwrites(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "a.csv").write_text("old")
    (dest / "a~1.csv").write_text("older")
    src = tmp_path / "a.csv"
    src.write_text("new")
    out = move_no_clobber(src, dest)
    assert out.name == "a~2.csv" and out.read_text() == "new"
    assert (dest / "a.csv").read_text() == "old" and not src.exists()


def test_move_symlink_moves_the_link_not_the_target(tmp_path):
    target = tmp_path / "secret"
    target.write_text("s")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    out = move_no_clobber(link, tmp_path / "failed")
    assert out.is_symlink() and target.read_text() == "s"


def test_atomic_writer_leaves_nothing_on_error(tmp_path):
    with pytest.raises(OSError):
        with atomic_writer(tmp_path, "f.txt") as (f, _):
            f.write(b"partial")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writer_adds_suffix(tmp_path):
    (tmp_path / "f.txt").write_text("first")
    with atomic_writer(tmp_path, "f.txt") as (f, result):
        f.write(b"second")
    assert result[0].name == "f~1.txt" and result[0].read_text() == "second"
    assert (tmp_path / "f.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "f~1.txt"]


def test_cleanup_partials(tmp_path):
    (tmp_path / ".filex-partial-x").write_text("x")
    (tmp_path / "keep.txt").write_text("x")
    assert cleanup_partials(tmp_path) == 1
    assert os.listdir(tmp_path) == ["keep.txt"]


@pytest.mark.parametrize("remote,expected", [
    ("../../etc/passwd", "_._etc_passwd"),
    ("a/b.txt", "a_b.txt"),
    ("..", "feedback"),
    ("ok_file-1.txt", "ok_file-1.txt"),
    ("evil\x00\x1b[31m.txt", "evil_31m.txt"),
    ("rtl\u202etxt.exe", "rtltxt.exe"),
    ("zero\u200bwidth.txt", "zerowidth.txt"),
    ("ｆｕｌｌ.txt", "full.txt"),
    (".hidden", "hidden"),
])
def test_sanitize_remote_name(remote, expected):
    out = sanitize_remote_name(remote)
    assert "/" not in out and out not in (".", "..") and not out.startswith(".")
    assert out == expected


# -- moves across filesystems: the copy path, and a crash between any two of its steps -----------

class _Crash(BaseException):
    """Stands for the process dying at that instant (nothing after it runs)."""


def _visible(d):
    return sorted(p.name for p in d.iterdir() if not p.name.startswith("."))


def _force_copy(monkeypatch, src, crash_at=None):
    """Make link(src, ...) fail with EXDEV (as across two mounts), and die at ``crash_at``:
    "copied" (before the copy is linked under its final name), "linked" (before the source is
    unlinked) or "unlinked" (before the marker is removed)."""
    import errno as errno_mod

    from filex_agent import fsutil

    real_link, real_unlink = os.link, os.unlink

    def link(a, b, *args, **kw):
        if os.fspath(a) == os.fspath(src):
            raise OSError(errno_mod.EXDEV, "Invalid cross-device link")
        if crash_at == "copied" and os.path.basename(a).startswith(fsutil.MOVE_MARK):
            raise _Crash()
        return real_link(a, b, *args, **kw)

    def unlink(p, *args, **kw):
        if crash_at == "linked" and os.fspath(p) == os.fspath(src):
            raise _Crash()
        if crash_at == "unlinked" and os.path.basename(p).startswith(fsutil.MOVE_MARK):
            raise _Crash()
        return real_unlink(p, *args, **kw)

    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "unlink", unlink)


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_move_by_copy_keeps_bytes_or_link_and_never_overwrites(tmp_path, monkeypatch, kind):
    target = tmp_path / "target"
    target.write_text("secret")
    src = tmp_path / "a.csv"
    if kind == "file":
        src.write_bytes(b"payload\n")
    else:
        src.symlink_to(target)
    dest = tmp_path / "failed"
    dest.mkdir()
    (dest / "a.csv").write_text("older")
    _force_copy(monkeypatch, src)
    out = move_no_clobber(src, dest)
    assert out == dest / "a~1.csv" and not os.path.lexists(src)
    assert (dest / "a.csv").read_text() == "older"
    if kind == "file":
        assert out.read_bytes() == b"payload\n" and not out.is_symlink()
    else:
        assert out.is_symlink() and os.readlink(out) == str(target) and target.read_text() == "secret"
    assert sorted(os.listdir(dest)) == ["a.csv", "a~1.csv"]  # no marker or temporary left


@pytest.mark.parametrize("kind", ["file", "symlink"])
@pytest.mark.parametrize("crash_at", ["copied", "linked"])
def test_move_by_copy_interrupted_is_finished_once(tmp_path, monkeypatch, kind, crash_at):
    src = tmp_path / "a.csv"
    if kind == "file":
        src.write_bytes(os.urandom(3 * 1024 * 1024 + 5))  # more than one copy chunk
        expected = src.read_bytes()
    else:
        src.symlink_to("/etc/hostname")
    dest = tmp_path / "failed"
    with monkeypatch.context() as m:
        _force_copy(m, src, crash_at)
        with pytest.raises(_Crash):
            move_no_clobber(src, dest)
    assert os.path.lexists(src)  # the source is never gone before its copy is in place
    # The next run (still across filesystems) finishes the same move: one copy, nothing lost.
    _force_copy(monkeypatch, src)
    out = move_no_clobber(src, dest)
    assert _visible(dest) == ["a.csv"] and out == dest / "a.csv" and not os.path.lexists(src)
    assert os.listdir(dest) == ["a.csv"]
    if kind == "file":
        assert out.read_bytes() == expected
    else:
        assert os.readlink(out) == "/etc/hostname"


def test_stale_marker_of_another_file_is_not_taken_for_a_finished_copy(tmp_path, monkeypatch):
    """A marker whose bytes differ from the source (an inode number reused) is redone, never
    trusted: trusting it would delete the source without its copy."""
    from filex_agent import fsutil

    src = tmp_path / "a.csv"
    src.write_bytes(b"new bytes\n")
    dest = tmp_path / "failed"
    dest.mkdir()
    marker = fsutil._move_marker(dest, os.lstat(src))
    marker.write_bytes(b"old bytes\n")
    os.link(marker, dest / "a.csv")  # a finished copy of some earlier file
    _force_copy(monkeypatch, src)
    out = move_no_clobber(src, dest)
    assert out == dest / "a~1.csv" and out.read_bytes() == b"new bytes\n"
    assert (dest / "a.csv").read_bytes() == b"old bytes\n"


def test_copy_move_cut_off_after_the_source_went_is_found_by_sha256(tmp_path, monkeypatch):
    """The journal's move_to: a crash after the source was removed (marker left, journal not yet
    updated) is finished by ``finish_move``, which finds the copy by its sha256."""
    from filex_agent.config import parse_config
    from filex_agent.hooks import Hooks
    from filex_agent.store import State
    from filex_agent.store.sqlite import SQLiteStore
    from filex_agent.submitter import Submitter

    cfg = parse_config({"agent": {"data_dir": str(tmp_path / "d")},
                        "credentials": {"c": {"client_id": "x", "client_secret": "env:X"}},
                        "routes": [{"name": "r", "outbox": str(tmp_path / "out"), "org": "0001",
                                    "application": "app1", "credential": "c"}]})
    store = SQLiteStore(tmp_path / "j.sqlite3")
    submitter = Submitter(cfg, store, None, Hooks())
    spool = tmp_path / "out" / ".filex-agent" / "1"
    spool.mkdir(parents=True)
    src = spool / "a.csv"
    src.write_bytes(b"filed bytes\n")
    dest = tmp_path / "accepted"
    from filex_agent.fsutil import sha256_file

    sub = store.create(route="r", org="0001", application="app1", transport="rest", file_name="a.csv",
                       source_path=str(tmp_path / "out" / "a.csv"), local_path=str(src), state=State.ACCEPTED,
                       size=12, sha256=sha256_file(src), move_to=str(dest))
    with monkeypatch.context() as m:
        _force_copy(m, src, "unlinked")
        with pytest.raises(_Crash):
            submitter.finish_move(sub)
    assert not src.exists()
    sub = submitter.finish_move(store.get(sub.id))
    assert sub.move_to is None and sub.flag is None and sub.local_path == str(dest / "a.csv")
    assert os.listdir(dest) == ["a.csv"]  # the marker was dropped as well
    store.close()
