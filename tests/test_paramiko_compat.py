"""paramiko's private API used by the SFTP transport: a paramiko upgrade that moves one fails
here, naming it, instead of mid-upload."""

from __future__ import annotations

import paramiko
import pytest

from filex_agent.transports import _paramiko_compat as compat


def test_every_private_api_is_present() -> None:
    assert compat.missing() == [], "\n".join(compat.missing())
    compat.check()
    assert "aes128-gcm@openssh.com" in compat.implemented("cipher")
    assert "ecdh-sha2-nistp256" in compat.implemented("kex")
    assert "hmac-sha2-256" in compat.implemented("mac")


def test_a_moved_api_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(paramiko.SFTPClient, "_read_response")
    with pytest.raises(compat.ParamikoIncompatible) as ei:
        compat.check()
    assert "SFTPClient._read_response" in str(ei.value) and "pipelined write" in str(ei.value)


def test_sftp_module_uses_no_private_paramiko_api_directly() -> None:
    import inspect
    import re

    from filex_agent.transports import sftp

    source = inspect.getsource(sftp)
    # Attribute access to a paramiko-private name (._x) on something that is not our own object.
    private = {m for m in re.findall(r"\b(?:sftp|client|c|t|paramiko\.\w+)\._[a-z]\w*", source)}
    assert private == set(), private


def test_a_moved_packetizer_attribute_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from paramiko.packet import Packetizer

    monkeypatch.delattr(Packetizer, "_inc_iv_counter")
    assert any("Packetizer._inc_iv_counter" in m and "GCM nonce" in m for m in compat.missing())


# --- send_channel_data: the lean channel-data path, against a paramiko server -----------------
import os  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
from typing import Iterator  # noqa: E402

_HOST_KEY = paramiko.ECDSAKey.generate()


class _Server(paramiko.ServerInterface):
    def get_allowed_auths(self, username: str) -> str:
        return "password"

    def check_auth_password(self, username: str, password: str) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED


class _Pair:
    """A client channel to an in-process paramiko server that collects everything received."""

    def __init__(self, cipher: str, window: int | None, max_packet: int | None):
        self.received = bytearray()
        self.done = threading.Event()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self._listener = listener
        self._server_t: paramiko.Transport | None = None
        threading.Thread(target=self._serve, args=(window, max_packet), daemon=True).start()
        self.client = paramiko.Transport(socket.create_connection(listener.getsockname()))
        self.client.get_security_options().ciphers = (cipher,)
        self.client.connect(username="u", password="p", hostkey=_HOST_KEY)
        assert self.client.local_cipher == cipher
        self.chan = self.client.open_session()
        self.chan.settimeout(20)

    def _serve(self, window: int | None, max_packet: int | None) -> None:
        sock, _ = self._listener.accept()
        kw = {}
        if window:
            kw["default_window_size"] = window
        if max_packet:
            kw["default_max_packet_size"] = max_packet
        t = self._server_t = paramiko.Transport(sock, **kw)
        t.add_server_key(_HOST_KEY)
        t.start_server(server=_Server())
        chan = t.accept(20)
        assert chan is not None
        while True:
            data = chan.recv(1 << 16)
            if not data:
                break
            self.received += data
        self.done.set()

    def finish(self) -> bytes:
        self.chan.shutdown_write()
        assert self.done.wait(20)
        return bytes(self.received)

    def close(self) -> None:
        self.client.close()
        if self._server_t is not None:
            self._server_t.close()
        self._listener.close()


@pytest.fixture()
def pair(request: pytest.FixtureRequest) -> Iterator[_Pair]:
    cipher, window, max_packet = request.param
    p = _Pair(cipher, window, max_packet)
    yield p
    p.close()




@pytest.mark.parametrize("pair", [("aes128-gcm@openssh.com", None, None), ("aes256-gcm@openssh.com", 48 * 1024, 4096),
                                  ("aes128-ctr", None, None), ("aes128-ctr", 48 * 1024, 4096)],
                         indirect=True, ids=["gcm", "gcm-small-window", "ctr-fallback", "ctr-small-window"])
def test_channel_data_arrives_intact(pair: _Pair) -> None:
    """Every byte, in order, whatever the part and packet boundaries; a GCM nonce or sequence
    number out of step would make the server drop the connection."""
    sent = []
    for parts in ([b"x"], [b"head", os.urandom(100_000)], [os.urandom(7), b"", memoryview(os.urandom(300_001))],
                  [os.urandom(32704)], [os.urandom(32705), os.urandom(1)]):
        compat.send_channel_data(pair.chan, parts)
        sent.extend(bytes(p) for p in parts)
    pair.chan.sendall(b"tail by paramiko")  # the two paths interleave on one channel
    assert pair.finish() == b"".join(sent) + b"tail by paramiko"


@pytest.mark.parametrize("pair", [("aes128-gcm@openssh.com", 64 * 1024, None)], indirect=True, ids=["gcm"])
def test_channel_data_survives_key_re_exchanges(pair: _Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The packetizer's rekey counters are kept: a low limit re-keys several times mid-stream,
    and the packets after each NEWKEYS use the new key and nonce."""
    kexinits = []
    real = paramiko.Transport._send_kex_init

    def counting(self: paramiko.Transport) -> None:
        if self is pair.client:
            kexinits.append(1)
        real(self)

    monkeypatch.setattr(paramiko.Transport, "_send_kex_init", counting)
    pair.client.packetizer.REKEY_BYTES = 256 * 1024
    blob = os.urandom(3 * 1024 * 1024)
    for i in range(0, len(blob), 200_000):
        compat.send_channel_data(pair.chan, [blob[i:i + 200_000]])
    assert pair.finish() == blob
    assert len(kexinits) >= 3


@pytest.mark.parametrize("pair", [("aes128-gcm@openssh.com", None, None)], indirect=True, ids=["gcm"])
def test_channel_data_on_a_dead_connection_raises(pair: _Pair) -> None:
    pair.client.close()
    with pytest.raises((EOFError, OSError)):
        compat.send_channel_data(pair.chan, [b"never sent"])
