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
