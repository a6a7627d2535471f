"""Every use of paramiko's private API, in one place.

paramiko has no public way to: list the algorithms it implements, see the peer's KEXINIT when a
negotiation fails, send an SFTP write without waiting for its status (pipelining with every
status checked), or send an extended request (limits@openssh.com), or send channel data without paramiko's
per-packet copies (``send_channel_data``: the upload's bytes, see its docstring). A paramiko
upgrade may move any of these; ``check()`` (run by tests/test_paramiko_compat.py and by ``SftpSession`` before it
connects) names the one that went missing instead of failing mid-upload with an AttributeError.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
import struct
import threading
import time
from typing import Sequence

import paramiko
import paramiko.sftp
from paramiko.packet import Packetizer

from filex_agent.errors import PermanentError

# (object, attribute, what we use it for)
_PRIVATE = (
    (paramiko.Transport, "_cipher_info", "the ciphers paramiko implements"),
    (paramiko.Transport, "_kex_info", "the key exchanges paramiko implements"),
    (paramiko.Transport, "_mac_info", "the MACs paramiko implements"),
    (paramiko.Transport, "_really_parse_kex_init", "the server's KEXINIT lists, for negotiation errors"),
    (paramiko.SFTPClient, "_async_request", "pipelined SFTP writes"),
    (paramiko.SFTPClient, "_read_response", "reading each pipelined write's status"),
    (paramiko.SFTPClient, "_request", "the limits@openssh.com extended request"),
    (paramiko.sftp, "CMD_WRITE", "the SFTP write message type"),
    (paramiko.sftp, "CMD_STATUS", "the SFTP status message type"),
    (paramiko.sftp, "CMD_EXTENDED", "the SFTP extended request type"),
    (paramiko.sftp, "CMD_EXTENDED_REPLY", "the SFTP extended reply type"),
    (paramiko.sftp, "int64", "64-bit SFTP offsets"),
    (paramiko.SFTPClient, "_lock", "numbering pipelined writes"),
    (paramiko.SFTPClient, "_expecting", "numbering pipelined writes"),
    (paramiko.SFTPClient, "request_number", "numbering pipelined writes"),
    (paramiko.Channel, "_wait_for_send_window", "the channel window, for lean channel data"),
    (paramiko.Channel, "remote_chanid", "lean channel data"),
    (paramiko.Channel, "lock", "lean channel data"),
    (paramiko.Transport, "clear_to_send", "waiting out a key re-exchange before lean channel data"),
    (paramiko.Transport, "clear_to_send_lock", "waiting out a key re-exchange before lean channel data"),
    (paramiko.Transport, "clear_to_send_timeout", "waiting out a key re-exchange before lean channel data"),
    (Packetizer, "_Packetizer__write_lock", "lean AES-GCM channel data (the packetizer's send state)"),
    (Packetizer, "_Packetizer__block_engine_out", "lean AES-GCM channel data (the packetizer's send state)"),
    (Packetizer, "_Packetizer__block_size_out", "lean AES-GCM channel data (the packetizer's send state)"),
    (Packetizer, "_Packetizer__aead_out", "lean AES-GCM channel data (the packetizer's send state)"),
    (Packetizer, "_Packetizer__iv_out", "lean AES-GCM channel data (the packetizer's send state)"),
    (Packetizer, "_Packetizer__compress_engine_out", "lean AES-GCM channel data (the packetizer's send state)"),
    (Packetizer, "_Packetizer__dump_packets", "lean AES-GCM channel data (the packetizer's send state)"),
    (Packetizer, "_Packetizer__sequence_number_out", "lean AES-GCM channel data (the packetizer's send state)"),
    (Packetizer, "_Packetizer__sent_bytes", "lean AES-GCM channel data (the packetizer's rekey counters)"),
    (Packetizer, "_Packetizer__sent_packets", "lean AES-GCM channel data (the packetizer's rekey counters)"),
    (Packetizer, "_Packetizer__need_rekey", "lean AES-GCM channel data (the packetizer's rekey counters)"),
    (Packetizer, "_Packetizer__received_bytes_overflow", "lean AES-GCM channel data (the packetizer's rekey counters)"),
    (Packetizer, "_Packetizer__received_packets_overflow", "lean AES-GCM channel data (the packetizer's rekey counters)"),
    (Packetizer, "_trigger_rekey", "lean AES-GCM channel data (starting a key re-exchange)"),
    (Packetizer, "_inc_iv_counter", "lean AES-GCM channel data (the GCM nonce)"),
    (Packetizer, "_initial_kex_done", "lean AES-GCM channel data (sequence number check)"),
    (Packetizer, "write_all", "lean AES-GCM channel data"),
)


class ParamikoIncompatible(PermanentError):
    """The installed paramiko lacks a private API this module relies on."""


def _instances() -> dict[object, object]:
    """Objects that carry their private state as instance attributes (set in ``__init__``):
    checked on a fresh instance, since the class has no such attribute. None of these
    constructors touches the network."""
    out: dict[object, object] = {}
    with contextlib.suppress(Exception):
        out[Packetizer] = Packetizer(None)
    with contextlib.suppress(Exception):
        t = paramiko.Transport(socket.socket())  # never started: no connection is made
        out[paramiko.Transport] = t
        with contextlib.suppress(Exception):
            t.sock.close()
    with contextlib.suppress(Exception):
        out[paramiko.Channel] = paramiko.Channel(0)
    return out


_INIT_SET = {(paramiko.SFTPClient, "_lock"), (paramiko.SFTPClient, "_expecting"),
             (paramiko.SFTPClient, "request_number")}


def missing() -> list[str]:
    """``module.Class.attr (use)`` for each private API the installed paramiko lacks."""
    out = []
    inst = _instances()
    for owner, attr, use in _PRIVATE:
        if (owner, attr) in _INIT_SET:
            # Set only by SFTPClient.__init__, which needs a live channel: look in its source.
            if f"self.{attr} =" not in inspect.getsource(paramiko.SFTPClient.__init__):
                out.append(f"paramiko SFTPClient.{attr} ({use})")
            continue
        if not hasattr(owner, attr) and not hasattr(inst.get(owner), attr):
            name = getattr(owner, "__qualname__", None) or getattr(owner, "__name__", repr(owner))
            out.append(f"paramiko {name}.{attr} ({use})")
    return out


def check() -> None:
    gone = missing()
    if gone:
        raise ParamikoIncompatible(
            f"paramiko {paramiko.__version__} lacks private API the SFTP transport uses: {'; '.join(gone)}. "
            "Pin the paramiko version in pyproject.toml or update filex_agent/transports/_paramiko_compat.py")


def implemented(kind: str) -> tuple[str, ...]:
    """Algorithm names paramiko implements: kind is "cipher", "kex" or "mac"."""
    table = {"cipher": "_cipher_info", "kex": "_kex_info", "mac": "_mac_info"}[kind]
    return tuple(getattr(paramiko.Transport, table, {}))


class RecordingTransport(paramiko.Transport):
    """Keeps the peer's KEXINIT lists so a negotiation failure can say what the server offered."""

    peer_kexinit: dict[str, list[str]] | None = None

    def _really_parse_kex_init(self, m, ignore_first_byte=False):  # type: ignore[no-untyped-def]
        parsed = super()._really_parse_kex_init(m, ignore_first_byte=ignore_first_byte)
        with contextlib.suppress(Exception):
            self.peer_kexinit = {k: list(v) for k, v in parsed.items() if isinstance(v, list)}
        return parsed


def send_write(sftp: paramiko.SFTPClient, handle: bytes, offset: int, data: bytes, *, lean: bool = True) -> int:
    """Send one SSH_FXP_WRITE without waiting; the request number to pass to ``read_status``.

    With ``lean`` the request goes out by ``send_channel_data`` (header and data as they are,
    no joined copy); else by paramiko's own ``_async_request`` (the reference path)."""
    if not lean:
        return sftp._async_request(type(None), paramiko.sftp.CMD_WRITE, handle, paramiko.sftp.int64(offset), bytes(data))
    with sftp._lock:  # as _async_request numbers a request: a status for it is expected
        num = sftp.request_number
        sftp._expecting[num] = type(None)
        sftp.request_number += 1
    n = len(data)
    # uint32 length, byte SSH_FXP_WRITE, uint32 id, string handle, uint64 offset, uint32 data length
    head = (_SFTP_WRITE_HEAD.pack(1 + 4 + 4 + len(handle) + 8 + 4 + n, paramiko.sftp.CMD_WRITE, num, len(handle))
            + handle + _SFTP_WRITE_TAIL.pack(offset, n))
    send_channel_data(sftp.sock, (head, data))
    return num


_SFTP_WRITE_HEAD = struct.Struct(">IBII")
_SFTP_WRITE_TAIL = struct.Struct(">QI")
_CHANNEL_DATA_HEAD = struct.Struct(">IBBII")  # packet length, padding length, msg 94, channel, data length
_MSG_CHANNEL_DATA = 94
_GCM_TAG = 16


def send_channel_data(chan: paramiko.Channel, parts: Sequence[bytes | memoryview]) -> None:
    """Send ``parts`` (in order, as one stream) on ``chan`` as SSH_MSG_CHANNEL_DATA packets.

    What ``Channel.sendall`` does, without its per-packet cost: paramiko builds a Message per
    packet, copies the payload about eight times (Message, padding, slicing, the length
    prefix) around the encryption and makes one send() per packet (each one a GIL hand-over
    to the transport's reader thread). Under AES-GCM (what fileX prefers and the agent offers
    first) the packets that the window allows, up to ``_BATCH``, are laid out in a reused
    buffer, encrypted into another and written with one send(). Measured on 1 GiB against
    OpenSSH: 3.9 s of CPU per GiB in paramiko's packet layer, 1.3 s here. Any other cipher,
    compression or packet dumping goes through paramiko's own ``Packetizer.send_message``.

    Kept as paramiko does it: the channel window (``Channel._wait_for_send_window``, so the
    channel's timeout applies), waiting out a key re-exchange (the transport's clear-to-send,
    with its timeout), the packetizer's write lock, sequence number, GCM nonce, rekey
    counters, and its ``write_all`` (socket timeouts retried until the transport closes). A
    connection found dead raises EOFError (paramiko would drop the packet silently).
    """
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    total = sum(len(v) for v in views)
    t = chan.transport
    pk = t.packetizer
    cursor = [0, 0]  # view index, position in it
    while total > 0:
        sizes = _take_window(chan, total)
        total -= sum(sizes)
        _wait_clear_to_send(t)
        try:
            with pk._Packetizer__write_lock:
                engine = pk._Packetizer__block_engine_out
                if (not pk._Packetizer__aead_out or engine is None or pk._Packetizer__compress_engine_out
                        is not None or pk._Packetizer__dump_packets):
                    for size in sizes:
                        m = paramiko.Message()
                        m.add_byte(bytes((_MSG_CHANNEL_DATA,)))
                        m.add_int(chan.remote_chanid)
                        m.add_string(b"".join(_gather(views, cursor, size)))
                        pk.send_message(m)
                    continue
                _send_gcm(pk, engine, chan.remote_chanid, sizes, views, cursor)
        finally:
            t.clear_to_send_lock.release()


# Packets encrypted into one buffer and written with one send(): 8 × 32 KiB (OpenSSH's packet
# size) is one 255 KiB SFTP write.
_BATCH = 8
_buffers = threading.local()


def _take_window(chan: paramiko.Channel, total: int) -> list[int]:
    """Sizes of the next packets: the first waits for window (the channel's timeout), the
    others only take what the window already allows."""
    sizes: list[int] = []
    with chan.lock:
        while total > 0 and len(sizes) < _BATCH:
            if chan.closed:
                raise OSError("channel closed")
            if sizes and chan.out_window_size <= 0:
                break
            size = chan._wait_for_send_window(total)
            if size == 0:
                raise EOFError("channel closed")  # EOF sent or closed while waiting
            sizes.append(size)
            total -= size
    return sizes


def _gather(views: list[memoryview], cursor: list[int], size: int) -> list[memoryview]:
    """The next ``size`` bytes of the stream, as slices (no copy)."""
    out = []
    vi, pos = cursor
    while size:
        v = views[vi]
        take = min(size, len(v) - pos)
        out.append(v[pos:pos + take])
        pos += take
        size -= take
        if pos == len(v):
            vi, pos = vi + 1, 0
    cursor[:] = [vi, pos]
    return out


def _send_gcm(pk: Packetizer, engine, chanid: int, sizes: list[int], views: list[memoryview],  # type: ignore[no-untyped-def]
              cursor: list[int]) -> None:
    """Caller holds the packetizer's write lock: as ``Packetizer.send_message`` under AEAD."""
    bsize = pk._Packetizer__block_size_out
    lengths = []
    for size in sizes:
        payload = 9 + size  # msg byte, channel, data length, data
        padding = 3 + bsize - ((payload + 4) % bsize)  # as Packetizer._build_packet (AEAD)
        lengths.append((1 + payload + padding, padding))
    need = sum(4 + length + _GCM_TAG for length, _ in lengths)
    longest = 4 + max(length for length, _ in lengths)
    plain = getattr(_buffers, "plain", None)
    if plain is None or len(plain) < longest:
        plain = _buffers.plain = bytearray(longest)
    sealed = getattr(_buffers, "sealed", None)
    if sealed is None or len(sealed) < need:
        sealed = _buffers.sealed = bytearray(need)
    pmv, smv = memoryview(plain), memoryview(sealed)
    pad_pool = os.urandom(sum(p for _, p in lengths))  # random padding, as paramiko: one call per batch
    pp = 0
    at = 0
    seq = pk._Packetizer__sequence_number_out
    iv = pk._Packetizer__iv_out
    for size, (length, padding) in zip(sizes, lengths):
        _CHANNEL_DATA_HEAD.pack_into(plain, 0, length, padding, _MSG_CHANNEL_DATA, chanid, size)
        w = 14
        for c in _gather(views, cursor, size):
            plain[w:w + len(c)] = c
            w += len(c)
        plain[w:w + padding] = pad_pool[pp:pp + padding]
        pp += padding
        head = bytes(plain[0:4])
        smv[at:at + 4] = head
        # The packet length is the associated data, not encrypted (RFC 5647 7.3).
        _encrypt_into(engine, iv, pmv[4:4 + length], head, smv[at + 4:at + 4 + length + _GCM_TAG])
        at += 4 + length + _GCM_TAG
        iv = pk._inc_iv_counter(iv)
        seq = (seq + 1) & 0xFFFFFFFF
        if seq == 0 and not pk._initial_kex_done:
            raise paramiko.SSHException("Sequence number rolled over during initial kex!")
    pk._Packetizer__iv_out = iv
    pk._Packetizer__sequence_number_out = seq
    pk.write_all(smv[:at])
    pk._Packetizer__sent_bytes += at
    pk._Packetizer__sent_packets += len(sizes)
    if ((pk._Packetizer__sent_packets >= pk.REKEY_PACKETS or pk._Packetizer__sent_bytes >= pk.REKEY_BYTES)
            and not pk._Packetizer__need_rekey):
        pk._Packetizer__received_bytes_overflow = 0
        pk._Packetizer__received_packets_overflow = 0
        pk._trigger_rekey()


def _wait_clear_to_send(t: paramiko.Transport) -> None:
    """As ``Transport._send_user_message``: wait out a key re-exchange; returns holding
    ``clear_to_send_lock``."""
    start = time.time()
    while True:
        t.clear_to_send.wait(0.1)
        if not t.active:
            raise EOFError("connection lost")
        t.clear_to_send_lock.acquire()
        if t.clear_to_send.is_set():
            return
        t.clear_to_send_lock.release()
        if time.time() > start + t.clear_to_send_timeout:
            raise paramiko.SSHException("Key-exchange timed out waiting for key negotiation")


def _encrypt_into(engine, iv: bytes, plain: memoryview, aad: bytes, out: memoryview) -> None:  # type: ignore[no-untyped-def]
    into = getattr(engine, "encrypt_into", None)
    if into is not None:  # newer cryptography: no new bytes object per packet
        into(iv, plain, aad, out)
    else:
        out[:] = engine.encrypt(iv, bytes(plain), aad)


def read_status(sftp: paramiko.SFTPClient, num: int) -> None:
    """Wait for request ``num``'s status; raises IOError (with errno) on an error status."""
    t, _msg = sftp._read_response(num)
    if t != paramiko.sftp.CMD_STATUS:
        raise paramiko.SFTPError(f"expected a status for request #{num}, got message type {t}")


def openssh_max_write(sftp: paramiko.SFTPClient) -> int | None:
    """The server's write length limit from limits@openssh.com, None if it does not answer it."""
    try:
        t, msg = sftp._request(paramiko.sftp.CMD_EXTENDED, "limits@openssh.com")
    except OSError:
        return None  # SSH_FX_OP_UNSUPPORTED: not an OpenSSH server
    if t != paramiko.sftp.CMD_EXTENDED_REPLY:
        return None
    msg.get_int64()  # max packet length
    msg.get_int64()  # max read length
    return msg.get_int64() or None
