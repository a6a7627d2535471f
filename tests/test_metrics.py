from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from filex_agent.metrics import Metrics, parse_listen


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    yield m
    m.stop()


def _samples(body: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_own_registry_and_two_instances() -> None:
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" on a shared registry
    assert a.registry is not REGISTRY and a.registry is not b.registry
    reg = CollectorRegistry()
    assert Metrics(reg).registry is reg
    assert REGISTRY.get_sample_value("filex_queue_depth", {"route": "r"}) is None


def test_serve_metrics_health_ready(metrics: Metrics) -> None:
    state = {"health": True, "ready": False}
    metrics.submissions_total.labels("r1", "rest", "submitted").inc()
    metrics.submissions_total.labels("r1", "rest", "accepted").inc(2)
    metrics.bytes_sent_total.labels("r1", "s3").inc(1234)
    metrics.upload_seconds.labels("r1", "rest").observe(0.7)
    metrics.drop_to_submitted_seconds.labels("r1").observe(12)
    metrics.queue_depth.labels("r1").set(3)
    metrics.retries_total.labels("upload").inc()
    metrics.token_refreshes_total.labels("fip").inc()
    metrics.last_tracking_poll_success.set(1700000000)
    metrics.serve("127.0.0.1", 0, health=lambda: state["health"], ready=lambda: state["ready"])
    assert metrics.port and metrics.port > 0
    base = f"http://127.0.0.1:{metrics.port}"
    with httpx.Client(base_url=base, timeout=5) as c:
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        s = _samples(r.text)
        assert s[("filex_submissions_total", (("outcome", "accepted"), ("route", "r1"), ("transport", "rest")))] == 2
        assert s[("filex_bytes_sent_total", (("route", "r1"), ("transport", "s3")))] == 1234
        assert s[("filex_upload_seconds_count", (("route", "r1"), ("transport", "rest")))] == 1
        assert s[("filex_drop_to_submitted_seconds_sum", (("route", "r1"),))] == 12
        assert s[("filex_queue_depth", (("route", "r1"),))] == 3
        assert s[("filex_retries_total", (("operation", "upload"),))] == 1
        assert s[("filex_token_refreshes_total", (("kind", "fip"),))] == 1
        assert s[("filex_last_tracking_poll_success_timestamp_seconds", ())] == 1700000000

        assert (c.get("/healthz").status_code, c.get("/healthz").text) == (200, "ok\n")
        assert c.get("/readyz").status_code == 503
        state["ready"], state["health"] = True, False
        assert c.get("/readyz").status_code == 200
        assert c.get("/healthz").status_code == 503
        assert c.get("/nope").status_code == 404


def test_raising_check_is_unhealthy(metrics: Metrics) -> None:
    def broken() -> bool:
        raise RuntimeError("db gone")

    metrics.serve("127.0.0.1", 0, health=broken, ready=lambda: True)
    r = httpx.get(f"http://127.0.0.1:{metrics.port}/healthz", timeout=5)
    assert r.status_code == 503


def test_stop_releases_port(metrics: Metrics) -> None:
    metrics.serve("127.0.0.1", 0, health=lambda: True, ready=lambda: True)
    port = metrics.port
    with pytest.raises(RuntimeError):
        metrics.serve("127.0.0.1", 0, health=lambda: True, ready=lambda: True)
    metrics.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    with socket.socket() as s:  # the port is free again (REUSEADDR: as a restarted server would)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9000") == ("::1", 9000)
    with pytest.raises(ValueError):
        parse_listen("9464")
