"""LocalFile: opened once without following links, read by position on the one descriptor."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from filex_agent.errors import PermanentError
from filex_agent.fsutil import sha256_file
from filex_agent.localfile import LocalFile, open_for_upload


def test_symlink_is_refused_and_a_swap_after_open_is_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "claimed.csv"
    real.write_bytes(b"the claimed bytes\n")
    secret = tmp_path / "secret"
    secret.write_bytes(b"never to be filed\n")
    link = tmp_path / "link.csv"
    link.symlink_to(secret)
    with pytest.raises(OSError):
        LocalFile.open(link)
    with pytest.raises(PermanentError, match="symbolic link"), open_for_upload(link):
        pass
    with LocalFile.open(real) as lf:
        real.unlink()
        real.symlink_to(secret)  # the race the claim must survive
        assert b"".join(lf.blocks()) == b"the claimed bytes\n"
        assert lf.sha256() == hashlib.sha256(b"the claimed bytes\n").hexdigest() == sha256_file(lf)


def test_fifo_and_directory_are_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with pytest.raises(PermanentError, match="not a regular file"):
        LocalFile.open(fifo)  # O_NONBLOCK: no writer, no hang
    with pytest.raises((PermanentError, OSError)):
        LocalFile.open(tmp_path)


def test_readers_have_independent_positions(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    p = tmp_path / "parts.bin"
    p.write_bytes(data)
    with LocalFile.open(p) as lf:
        parts = [lf.reader(i * 1024 * 1024, 1024 * 1024) for i in range(4)]
        got: dict[int, bytes] = {}

        def read(i: int) -> None:
            r = parts[i]
            got[i] = r.read(1000) + r.read()
            r.seek(0)
            assert r.read(10) == data[i * 1024 * 1024:i * 1024 * 1024 + 10]

        threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert b"".join(got[i] for i in range(4)) == data
        assert len(parts[3]) == 5 and parts[3].tell() == 5  # a range is cut at the size at open


def test_changed_sees_size_and_mtime(tmp_path: Path) -> None:
    p = tmp_path / "f.csv"
    p.write_bytes(b"abc")
    with LocalFile.open(p) as lf:
        assert not lf.changed() and lf.size == 3
        os.utime(p, ns=(lf.mtime_ns + 10**9, lf.mtime_ns + 10**9))
        assert lf.changed()
    assert lf.closed
