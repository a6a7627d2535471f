"""Every use of paramiko's private API, in one place.

paramiko has no public way to: list the algorithms it implements, see the peer's KEXINIT when a
negotiation fails, send an SFTP write without waiting for its status (pipelining with every
status checked), or send an extended request (limits@openssh.com). A paramiko upgrade may move
any of these; ``check()`` (run by tests/test_paramiko_compat.py and by ``SftpSession`` before it
connects) names the one that went missing instead of failing mid-upload with an AttributeError.
"""

from __future__ import annotations

import contextlib

import paramiko
import paramiko.sftp

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
)


class ParamikoIncompatible(PermanentError):
    """The installed paramiko lacks a private API this module relies on."""


def missing() -> list[str]:
    """``module.Class.attr (use)`` for each private API the installed paramiko lacks."""
    out = []
    for owner, attr, use in _PRIVATE:
        if not hasattr(owner, attr):
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


def send_write(sftp: paramiko.SFTPClient, handle: bytes, offset: int, data: bytes) -> int:
    """Send one SSH_FXP_WRITE without waiting; the request number to pass to ``read_status``."""
    return sftp._async_request(type(None), paramiko.sftp.CMD_WRITE, handle, paramiko.sftp.int64(offset), data)


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
