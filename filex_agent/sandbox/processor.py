"""The sandbox's "FINRA side": takes what arrives in ``{org}/{app}/in/`` and answers with feedback.

Per object, all bucket work (hash, copy to ``in_arcv/``, delete from ``in/``) happens before any
state changes in memory, so a stop or an error part-way leaves the object in ``in/`` to be taken
whole on the next cycle; nothing is ever recorded half-processed.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

if TYPE_CHECKING:
    from filex_agent.sandbox import Sandbox

log = logging.getLogger("filex_agent.sandbox.processor")

CYCLE_SECONDS = 0.2
_CHUNK = 1 << 20
# Above this, a single CopyObject is refused by S3: use the managed (multipart) copy.
_SINGLE_COPY_MAX = 4 << 30


class _Stopped(Exception):
    pass


@dataclass
class _Pending:
    due: float
    tracking_id: str
    org: str
    app: str
    name: str


def is_temporary(name: str) -> bool:
    """A name fileX never takes as a filing: ``.NAME.TOKEN.filepart`` is where the agent's SFTP transport
    writes before it renames the finished, verified file into place. The reference is silent on
    temporary names; this (a leading dot, or a ``.filepart`` suffix) is the assumption the agent
    relies on, and the sandbox holds fileX to it."""
    return name.startswith(".") or name.endswith(".filepart")


def outcome_for(name: str) -> str:
    """The sandbox's verdict, from the file name (tests choose the outcome by naming files)."""
    if "PARTIAL" in name:
        return "PARTIALLY_REJECTED"
    if "REJECT" in name:
        return "REJECTED"
    return "ACCEPTED"


def split_name(name: str) -> tuple[str, str]:
    p = PurePosixPath(name)
    return (p.stem, p.suffix) if p.suffix else (name, "")


class Processor:
    def __init__(self, sandbox: "Sandbox"):
        self.sb = sandbox
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: list[_Pending] = []
        self._failures: dict[str, int] = {}
        # (key, ETag) -> when this version was first seen in in/; the receive lag counts from then.
        self._first_seen: dict[tuple[str, str], float] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sandbox-processor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._cycle()
            except _Stopped:
                return
            except Exception:  # never let the "FINRA side" die; the next cycle retries
                log.exception("processor cycle failed")
            try:
                self._decide_due()
            except Exception:
                log.exception("processor decisions failed")
            self._stop.wait(CYCLE_SECONDS)

    def _in_prefixes(self) -> list[str]:
        s3 = self.sb.admin_s3
        out: list[str] = []
        for org in self._common_prefixes(s3, ""):
            for app in self._common_prefixes(s3, org):
                out.append(f"{app}in/")
        return out

    def _common_prefixes(self, s3: Any, prefix: str) -> list[str]:
        out: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.sb.bucket, Prefix=prefix,
                                                                 Delimiter="/"):
            out.extend(cp["Prefix"] for cp in page.get("CommonPrefixes", []))
        return out

    def _cycle(self) -> None:
        s3 = self.sb.admin_s3
        listed: set[tuple[str, str]] = set()
        for prefix in self._in_prefixes():
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=self.sb.bucket, Prefix=prefix,
                                                                     Delimiter="/"):
                for obj in page.get("Contents", []):
                    if obj["Key"] == prefix or is_temporary(obj["Key"][len(prefix):]):
                        continue  # the folder marker, or an upload still under its temporary name
                    listed.add((obj["Key"], obj["ETag"]))
                    seen = self._first_seen.setdefault((obj["Key"], obj["ETag"]), time.monotonic())
                    if time.monotonic() - seen < self.sb.receive_lag:
                        continue  # fileX has not noticed it yet
                    if self._stop.is_set():
                        raise _Stopped()
                    try:
                        self._process(obj)
                        self._failures.pop(obj["Key"], None)
                        self._first_seen.pop((obj["Key"], obj["ETag"]), None)
                    except _Stopped:
                        raise
                    except (ClientError, BotoCoreError, OSError) as exc:
                        # E.g. an object that vanished or cannot be read yet: retry next cycle.
                        n = self._failures[obj["Key"]] = self._failures.get(obj["Key"], 0) + 1
                        level = logging.WARNING if n in (1, 10, 100) else logging.DEBUG
                        log.log(level, "cannot process %s yet (attempt %d): %s", obj["Key"], n, exc)
        # Versions no longer in in/ (taken, overwritten, removed) need no first sighting.
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in listed}

    # ------------------------------------------------------------------ one object
    def _process(self, obj: dict[str, Any]) -> None:
        from filex_agent.sandbox import UploadLogEntry, iso, now

        sb, s3, bucket = self.sb, self.sb.admin_s3, self.sb.bucket
        key: str = obj["Key"]
        org, app, _, name = key.split("/", 3)
        head = s3.head_object(Bucket=bucket, Key=key)
        etag = head["ETag"]
        meta = {k.lower(): v for k, v in (head.get("Metadata") or {}).items()}

        digest = hashlib.sha256()
        size = 0
        body = s3.get_object(Bucket=bucket, Key=key, IfMatch=etag)["Body"]
        try:
            for chunk in body.iter_chunks(_CHUNK):
                if self._stop.is_set():
                    raise _Stopped()
                digest.update(chunk)
                size += len(chunk)
        finally:
            body.close()

        # Which submission is this? A pre-signed PUT names its tracking id (seen by the S3 guard);
        # anything else is S3 direct or SFTP and gets a record now, as fileX does.
        tid = sb.peek_put_tracking(key)
        if tid is not None and sb.tracking(tid) is not None:
            transport = "rest"
        else:
            tid = None
            transport = "sftp" if meta.get("filex-transport") == "sftp" else "s3"
        if tid is None:
            tid = str(uuid.uuid4())
        stem, suffix = split_name(name)
        arcv_name = f"{stem}_{tid}{suffix}"
        arcv_key = f"{org}/{app}/in_arcv/{arcv_name}"
        source = {"Bucket": bucket, "Key": key}
        if size > _SINGLE_COPY_MAX:
            s3.copy(source, bucket, arcv_key)
        else:
            s3.copy_object(Bucket=bucket, Key=arcv_key, CopySource=source, CopySourceIfMatch=etag,
                           MetadataDirective="COPY")
        # A new version written meanwhile must not be deleted unseen: leave it for the next cycle.
        if s3.head_object(Bucket=bucket, Key=key)["ETag"] != etag:
            log.warning("%s changed while being processed; the new version is taken next cycle", key)
            s3.delete_object(Bucket=bucket, Key=arcv_key)
            return
        s3.delete_object(Bucket=bucket, Key=key)

        # Bucket work done: commit to memory in one go. submissionTime is when fileX took the file.
        taken = now()
        if transport == "rest":
            sb.pop_put_tracking(key)
        else:
            user = sb.sftp_username if transport == "sftp" else sb.client_id
            sb.new_tracking(org, app, name, transport=transport, user=user, tracking_id=tid)
        sb.update_tracking(tid, status="Received by FINRA", downstreamStatus="RECEIVED",
                           submissionTime=iso(taken), fileSize=size, uploadLocation=f"{org}/{app}/in",
                           arcvFileName=arcv_name, downloadable=True)
        sb.record_upload(UploadLogEntry(key=key, org=org, application=app, name=name, size=size,
                                        sha256=digest.hexdigest(), transport=transport, time=taken,
                                        tracking_id=tid))
        self._pending.append(_Pending(time.monotonic() + sb.processing_delay, tid, org, app, name))
        log.info("received %s (%d bytes, %s, tracking %s)", key, size, transport, tid)

    # ------------------------------------------------------------------ verdicts
    def _decide_due(self) -> None:
        now = time.monotonic()
        for p in [p for p in self._pending if p.due <= now]:
            outcome = outcome_for(p.name)
            stem, _ = split_name(p.name)
            text = (f"fileX sandbox feedback\ntrackingId: {p.tracking_id}\nfile: {p.name}\n"
                    f"outcome: {outcome}\n")
            if outcome != "ACCEPTED":
                text += "error: record 1: sandbox rejection requested by the file name\n"
            try:
                # Feedback first, so that a client seeing the final status finds it in out/.
                self.sb.admin_s3.put_object(Bucket=self.sb.bucket,
                                            Key=f"{p.org}/{p.app}/out/{stem}_{p.tracking_id}_feedback.txt",
                                            Body=text.encode(), ContentType="text/plain")
            except (ClientError, BotoCoreError) as exc:
                log.warning("cannot write feedback for %s yet: %s", p.tracking_id, exc)
                continue
            self.sb.update_tracking(p.tracking_id, downstreamStatus=outcome)
            self._pending.remove(p)
            log.info("decided %s: %s", p.tracking_id, outcome)
