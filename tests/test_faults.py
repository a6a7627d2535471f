"""Each fault the sandbox can inject, against the client or the whole daemon, and what must follow.

5xx bursts and S3 errors are retried and the file still arrives once; 429 waits at least its
Retry-After; a revoked token costs exactly one refresh; an expired pre-signed URL or S3
credential is replaced; an outage longer than the retries leaves the file QUEUED (reason shown
in `status`) and it is sent once fileX is back; bad credentials fail fast with the reason; the
client-side rate limiter keeps to 20 requests per second.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from filex_agent.connections import Connections
from filex_agent.daemon import Daemon
from filex_agent.http import RateLimiter
from filex_agent.store import State
from tests.conftest import wait_for


@pytest.fixture(autouse=True)
def _no_leftover_faults(sandbox):
    sandbox.clear_faults()
    yield
    sandbox.clear_faults()


def _uploads(sandbox, name: str) -> int:
    return sum(1 for u in sandbox.uploads() if u.name == name)


def _daemon(cfg) -> Daemon:
    d = Daemon(cfg, dispatch_interval=0.2)
    d.start()
    return d


def _final(d: Daemon, name: str, state: State, timeout: float = 40):
    def find():
        subs = [s for s in d.store.list() if s.file_name == name]
        # move_to None: the journal has also confirmed where the original went
        return subs and subs[-1].state is state and subs[-1].move_to is None and subs[-1]

    return wait_for(find, timeout=timeout, what=f"{name} {state}")


@pytest.mark.parametrize("status", [500, 503])
def test_5xx_burst_is_retried_and_the_file_sent_once(status, sandbox, sandbox_config):
    cfg = sandbox_config(transports=("rest",))
    d = _daemon(cfg)
    try:
        # Two failures: inside one attempt's retry budget (max_attempts = 3).
        sandbox.inject_fault("status", status=status, count=2, path_prefix="/files/0001/app1/in/")
        name = f"FAULT_{status}.csv"
        (Path(cfg.routes[0].outbox) / name).write_bytes(f"burst {status}\n".encode())
        sub = _final(d, name, State.ACCEPTED)
    finally:
        d.stop(grace=5)
    assert _uploads(sandbox, name) == 1 and sub.attempts == 1


def test_s3_5xx_burst_is_retried_and_the_file_sent_once(sandbox, sandbox_config):
    cfg = sandbox_config(transports=("s3",))
    d = _daemon(cfg)
    try:
        sandbox.inject_fault("status", target="s3", status=503, count=2, path_prefix=f"/{sandbox.bucket}/0001/app2/in/")
        name = "FAULT_s3_503.csv"
        (Path(cfg.routes[0].outbox) / name).write_bytes(b"s3 burst\n")
        _final(d, name, State.ACCEPTED)
    finally:
        d.stop(grace=5)
    assert _uploads(sandbox, name) == 1
    assert sum(1 for a in sandbox.arrivals() if a.key.endswith("/in/" + name)) == 1


def _s3_multipart_through_fault(sandbox, sandbox_config, name: str, kind: str, **fault):
    """An 11 MiB file over the S3 route in 5 MiB parts while ``fault`` is armed on in/: (its
    submission once ACCEPTED, the one upload the sandbox logged for it). Asserts it went once, whole."""
    cfg = sandbox_config(transports=("s3",), s3={"multipart_threshold_mb": 5, "part_size_mb": 5})
    d = _daemon(cfg)
    try:
        sandbox.inject_fault(kind, target="s3", path_prefix=f"/{sandbox.bucket}/0001/app2/in/", **fault)
        data = os.urandom(11 * 1024 * 1024)
        (Path(cfg.routes[0].outbox) / name).write_bytes(data)
        sub = _final(d, name, State.ACCEPTED, timeout=90)
    finally:
        d.stop(grace=5)
    ups = [u for u in sandbox.uploads() if u.name == name]
    assert len(ups) == 1 and ups[0].sha256 == hashlib.sha256(data).hexdigest()
    assert sum(1 for a in sandbox.arrivals() if a.key.endswith("/in/" + name)) == 1
    return sub


def test_s3_part_corrupted_in_transit_is_refused_and_the_file_sent_once_whole(sandbox, sandbox_config):
    # One flipped byte in one part: its ETag is not the MD5 of what was sent, the multipart upload
    # is aborted before completion, the file stays queued and goes again whole.
    sub = _s3_multipart_through_fault(sandbox, sandbox_config, "FAULT_s3_corrupt.dat", "corrupt", count=1)
    assert sub.attempts == 2


def test_s3_multipart_5xx_bursts_are_retried_and_the_file_sent_once_whole(sandbox, sandbox_config):
    # 503s on the multipart calls (the first two on CreateMultipartUpload, one more on a part):
    # botocore resends the part, rewinding its body, which must not be hashed twice.
    sub = _s3_multipart_through_fault(sandbox, sandbox_config, "FAULT_s3_parts_503.dat", "status", status=503,
                                      count=3)
    assert sub.attempts == 1  # inside one attempt's retry budget


def test_429_waits_at_least_retry_after(sandbox, sandbox_config):
    cfg = sandbox_config(transports=("rest",))
    conns = Connections(cfg)
    try:
        api = conns.api("sandbox")
        api.tracking()  # token fetched outside the measurement
        sandbox.inject_fault("status", status=429, retry_after=1.5, count=1, path_prefix="/tracking")
        t0 = time.monotonic()
        api.tracking()
        waited = time.monotonic() - t0
    finally:
        conns.close()
    assert waited >= 1.5, f"retried after {waited:.2f}s, before Retry-After"


def test_retry_after_longer_than_backoff_max_gives_up_at_once_and_requeues(sandbox, sandbox_config):
    """A Retry-After beyond backoff_max must not block a worker: the file is requeued with the reason."""
    cfg = sandbox_config(transports=("rest",))
    d = Daemon(cfg)
    try:
        sandbox.inject_fault("status", status=429, retry_after=30, count=1, path_prefix="/files/0001/app1/in/")
        outbox = Path(cfg.routes[0].outbox)
        outbox.mkdir(parents=True, exist_ok=True)
        (outbox / "FAULT_429_long.csv").write_bytes(b"long retry-after\n")
        sub = d.submitter.claim(cfg.routes[0], outbox / "FAULT_429_long.csv")
        t0 = time.monotonic()
        sub = d.submitter.upload(sub.id)
        assert time.monotonic() - t0 < 5
        assert sub.state is State.QUEUED and "429" in sub.reason and sub.next_attempt_at is not None
    finally:
        d.stop(grace=0)


def test_revoked_tokens_cost_exactly_one_refresh(sandbox, sandbox_config):
    cfg = sandbox_config(transports=("rest",))
    conns = Connections(cfg)
    try:
        api = conns.api("sandbox")
        api.tracking()
        before = sandbox.token_requests
        sandbox.inject_fault("revoke_tokens")
        api.tracking()  # 401 -> one new token -> success
        api.tracking()
    finally:
        conns.close()
    assert sandbox.token_requests == before + 1


def test_expired_presigned_url_is_requested_again(sandbox, sandbox_config, tmp_path):
    cfg = sandbox_config(transports=("rest",))
    conns = Connections(cfg)
    f = tmp_path / "FAULT_presign.csv"
    f.write_bytes(b"presigned URL expired at once\n")
    tickets: list[str] = []
    try:
        sandbox.inject_fault("presign_expire_now", count=2)
        with conns.transport(cfg.routes[0]) as t:
            t.on_ticket = tickets.append
            result = t.upload(f, f.name)
    finally:
        conns.close()
    assert len(tickets) == 3 and result.tracking_id == tickets[-1]  # two expired URLs, then a good one
    wait_for(lambda: _uploads(sandbox, f.name) == 1, what="upload at sandbox")
    assert next(u for u in sandbox.uploads() if u.name == f.name).tracking_id == tickets[-1]


def test_s3_credentials_expired_at_once_are_refreshed(sandbox, sandbox_config, tmp_path):
    cfg = sandbox_config(transports=("s3",))
    conns = Connections(cfg)  # a fresh token cache: the next S3 credentials it gets are expired
    f = tmp_path / "FAULT_s3creds.csv"
    f.write_bytes(b"S3 credentials expired at once\n")
    try:
        before = sandbox.s3_token_requests
        sandbox.inject_fault("s3_creds_expire_now", count=1)
        with conns.transport(cfg.routes[0]) as t:
            t.upload(f, f.name)
    finally:
        conns.close()
    assert sandbox.s3_token_requests == before + 2  # the expired set, then a good one
    wait_for(lambda: _uploads(sandbox, f.name) == 1, what="upload at sandbox")


def test_slow_answer_beyond_the_read_timeout_is_retried(sandbox, sandbox_config):
    cfg = sandbox_config(transports=("rest",))
    cfg = cfg.model_copy(update={"network": cfg.network.model_copy(update={"read_timeout": 0.5})})
    conns = Connections(cfg)
    try:
        api = conns.api("sandbox")
        api.tracking()
        sandbox.inject_fault("slow", seconds=1.5, count=1, path_prefix="/tracking")
        t0 = time.monotonic()
        api.tracking()
        assert time.monotonic() - t0 >= 0.5
    finally:
        conns.close()


def test_outage_longer_than_retries_leaves_the_file_queued_then_sends_it(sandbox, sandbox_config):
    from filex_agent.cli import status_rows

    cfg = sandbox_config(transports=("rest",))
    d = _daemon(cfg)
    name = "FAULT_outage.csv"
    try:
        sandbox.inject_fault("status", status=503, count=10_000, path_prefix="/files/0001/app1/in/")
        (Path(cfg.routes[0].outbox) / name).write_bytes(b"sent after the outage\n")
        sub = wait_for(lambda: next((s for s in d.store.list() if s.file_name == name and s.attempts >= 2
                                     and s.state is State.QUEUED), None), timeout=40, what="two failed attempts")
        assert "503" in sub.reason and "will retry" in sub.reason
        row = next(r for r in status_rows(cfg) if r["id"] == sub.id)
        assert row["state"] == "QUEUED" and "503" in row["reason"]  # the outage, visible in `status`
        assert _uploads(sandbox, name) == 0
        sandbox.clear_faults()
        d.store.update(sub.id, next_attempt_at=None)  # skip the remaining backoff
        sub = _final(d, name, State.ACCEPTED)
    finally:
        d.stop(grace=5)
    assert _uploads(sandbox, name) == 1 and sub.reason is None


def test_bad_credentials_fail_fast_with_the_reason(sandbox, sandbox_config):
    cfg = sandbox_config(transports=("rest",))
    secret = Path(cfg.agent.data_dir).parent / "secrets" / "fip-client-secret"
    secret.write_text("wrong-secret")
    d = _daemon(cfg)
    name = "FAULT_badcreds.csv"
    try:
        t0 = time.monotonic()
        (Path(cfg.routes[0].outbox) / name).write_bytes(b"bad credentials\n")
        sub = _final(d, name, State.FAILED, timeout=20)
        assert time.monotonic() - t0 < 15
    finally:
        d.stop(grace=5)
    assert "refused" in sub.reason and "401" in sub.reason
    assert Path(sub.local_path).with_name(Path(sub.local_path).name + ".reason.txt").is_file()
    assert _uploads(sandbox, name) == 0


def test_rate_limiter_keeps_to_20_requests_per_second():
    limiter = RateLimiter(20)
    stamps: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(12):
            limiter.acquire()
            with lock:
                stamps.append(time.monotonic())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stamps.sort()
    # Real threads on a loaded machine: only the lower bound is robust (stamps taken after
    # acquire() can bunch up when a thread is descheduled). Exact spacing: tests/test_api.py.
    assert stamps[-1] - stamps[0] >= (len(stamps) - 2) / 20, "48 requests faster than 20/s"
