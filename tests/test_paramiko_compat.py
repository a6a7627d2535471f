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
