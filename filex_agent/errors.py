"""One error taxonomy for every transport and client.

The daemon decides what to do from the class alone: a ``PermanentError`` moves the file to
``failed`` with its message as the reason; a ``TransientError`` leaves it queued for a later
attempt. Messages must never contain a secret (token, password, signed URL query).
"""

from __future__ import annotations


class FilexError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(FilexError):
    """The configuration is invalid. ``key`` names the offending key (dotted path)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")


class PermanentError(FilexError):
    """Retrying will not help: bad credentials, not entitled, rejected name, bad input."""


class TransientError(FilexError):
    """Retrying later may help: timeouts, 5xx, 429, dropped connections."""


class AuthError(PermanentError):
    """Credentials refused by FIP / fileX / SFTP."""


class CredentialsRefused(AuthError):
    """The login itself was refused (FIP token endpoint, SFTP authentication): the configured
    credentials are wrong. Unlike a fresh token refused by fileX, retrying cannot help."""


class NotEntitledError(PermanentError):
    """The login may not act for this org / application (403, missing OBO folder...)."""


class RemoteChangedError(TransientError):
    """The local file changed while it was being uploaded; the upload was discarded."""


class CorruptFiling(FilexError):
    """fileX stored bytes that are not the file's (an integrity check failed after the object
    existed) and the object could not be removed: fileX will take it as a filing. The submission
    follows it to FINRA's verdict and says plainly that a corrected file must be sent."""


class UploadUnconfirmed(TransientError):
    """Bytes may have reached fileX and the answer was lost (timeout or dropped connection after
    the body went out, a 5xx after S3 may have stored it, a stop past its grace). A transport
    raises this instead of sending again: only the reconciler, from fileX's evidence, decides."""

    def __init__(self, message: str, tracking_id: str | None = None):
        super().__init__(message)
        self.tracking_id = tracking_id
