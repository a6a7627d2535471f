"""The status page over plain HTTP against the real server (uvicorn on loopback): security
headers, read-only, authentication and TLS, feedback by ids only, escaping, search and paging,
and the journal's read-only views it is built on."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from filex_agent.errors import ConfigError
from filex_agent.store import PageKey, State, SubmissionQuery
from filex_agent.web.auth import Authenticator, hash_password
from tests.test_notify import _self_signed  # one self-signed certificate maker for the tests
from tests.web_helpers import ROUTES, add, finish, serve, web_config

NOW = datetime.now(timezone.utc)


@pytest.fixture
def store(tmp_path, request, store_of_kind):
    """SQLite; PostgreSQL too for the tests marked ``BOTH`` (those of the read-only views)."""
    s = store_of_kind(getattr(request, "param", "sqlite"), tmp_path / "journal.sqlite3")
    yield s
    s.close()


BOTH = pytest.mark.parametrize("store", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def site(tmp_path, store):
    cfg = web_config(tmp_path)
    with serve(cfg, store, last_poll=lambda: NOW.timestamp(), active=lambda: {"ROUTE_DOWN:s3-b"}) as web:
        with httpx.Client(base_url=web.url.rstrip("/"), timeout=10) as client:
            yield client


# -- headers and read-only ---------------------------------------------------------------------

def test_every_answer_carries_the_security_headers(site, store):
    add(store)
    for path in ("/", "/fragment/overview", "/submissions", "/submissions/1", "/static/app.js", "/submissions/999",
                 "/no/such/page", "/calendar", "/calendar?month=2025-13"):
        r = site.get(path)
        csp = r.headers.get("content-security-policy", "")
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff", path
    assert site.get("/").status_code == 200


def test_pages_have_no_inline_script_or_style(site, store):
    add(store, "x.csv")
    for path in ("/", "/submissions", "/submissions/1", "/calendar"):
        html = site.get(path).text
        assert re.findall(r"<script(?![^>]*\bsrc=)", html) == [], path
        assert " style=" not in html and "<style" not in html, path
        assert re.search(r"\son[a-z]+=", html) is None, path  # no event handler attributes


def test_nothing_changes_state(site, store):
    sub = add(store)
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        r = site.request(method, f"/submissions/{sub.id}")
        assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    assert store.get(sub.id).state is State.QUEUED
    assert [e.state for e in store.events(sub.id)] == ["QUEUED"]


def test_loopback_page_refuses_foreign_host_names(site):
    # DNS rebinding: a hostile site's name resolving to 127.0.0.1 must not read the page.
    assert site.get("/", headers={"host": "evil.example"}).status_code == 421
    assert site.get("/", headers={"host": "localhost:1234"}).status_code == 200


# -- configuration: non-loopback needs authentication and TLS ----------------------------------

@pytest.mark.parametrize("web, key", [
    ({"listen": "0.0.0.0:8470"}, "web.token"),
    ({"listen": "192.0.2.10:8470", "token": "env:T"}, "web.tls_cert"),
    ({"listen": "status.example.com:443", "password_hash": "file:/x"}, "web.tls_cert"),
    ({"listen": "0.0.0.0:8470", "token": "env:T", "tls_cert": "/c.pem"}, "web.tls_key"),
    ({"listen": "8470"}, "web.listen"),
    ({"listen": "127.0.0.1:8470", "token": "plain-secret"}, "web.token"),
])
def test_unsafe_web_settings_are_config_errors(tmp_path, web, key):
    with pytest.raises(ConfigError) as exc:
        web_config(tmp_path, **web)
    assert str(exc.value).startswith(key + ":"), str(exc.value)
    assert "plain-secret" not in str(exc.value)


def test_non_loopback_without_auth_exits_2_naming_the_key(tmp_path):
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[agent]\ndata_dir = "{tmp_path / "data"}"\n[web]\nenabled = true\nlisten = "0.0.0.0:8470"\n')
    p = subprocess.run([sys.executable, "-m", "filex_agent", "run", "--config", str(conf)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "web.token" in p.stderr and "not a loopback address" in p.stderr
    assert not (tmp_path / "data" / "journal.sqlite3").exists()  # refused before anything started


def test_non_loopback_with_auth_and_tls_is_accepted(tmp_path):
    cfg = web_config(tmp_path, listen="0.0.0.0:8470", token="env:T", tls_cert="c.pem", tls_key="k.pem")
    assert cfg.web.listen == "0.0.0.0:8470"


# -- authentication ----------------------------------------------------------------------------

def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_authentication_when_configured(tmp_path, store):
    add(store)
    auth = Authenticator(token="tok-123456789", username="officer",
                         password_hash=hash_password("correct horse battery", iterations=1000))
    with serve(web_config(tmp_path), store, auth=auth) as web, httpx.Client(base_url=web.url, timeout=10) as c:
        for path in ("/", "/fragment/overview", "/submissions/1", "/static/app.css", "/nothing"):
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.headers["www-authenticate"].startswith("Basic ")
            assert "content-security-policy" in r.headers
        for bad in ("Bearer tok-12345678", "Bearer tok-123456789x", _basic("officer", "wrong"), _basic("someone", "correct horse battery"),
                    "Basic !!!", "Digest x"):
            assert c.get("/", headers={"authorization": bad}).status_code == 401, bad
        for good in ("Bearer tok-123456789", _basic("anyone", "tok-123456789"),
                     _basic("officer", "correct horse battery")):
            r = c.get("/submissions/1", headers={"authorization": good})
            assert r.status_code == 200 and "a.csv" in r.text, good


def test_tls_serves_https_with_the_configured_certificate(tmp_path, store):
    cert, key = _self_signed(tmp_path)
    cfg = web_config(tmp_path, tls_cert=str(cert), tls_key=str(key), token="env:FILEX_TEST_WEB_TOKEN")
    add(store)
    auth = Authenticator(token="t0ken-for-tls")
    with serve(cfg, store, auth=auth) as web:
        assert web.url.startswith("https://127.0.0.1:")
        with httpx.Client(base_url=web.url, verify=str(cert), timeout=10) as c:
            r = c.get("/", headers={"authorization": "Bearer t0ken-for-tls"})
            assert r.status_code == 200 and r.headers["strict-transport-security"].startswith("max-age=")
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(web.url.replace("https", "http"), timeout=5)  # no plain HTTP on that port


def test_password_hash_reference_must_be_a_hash(tmp_path, store, monkeypatch):
    from filex_agent.web.server import authenticator

    monkeypatch.setenv("FILEX_TEST_PW_HASH", "not-a-hash")
    cfg = web_config(tmp_path, password_hash="env:FILEX_TEST_PW_HASH")
    with pytest.raises(ConfigError) as exc:
        authenticator(cfg.web)
    assert str(exc.value).startswith("web.password_hash:") and "not-a-hash" not in str(exc.value)
    monkeypatch.delenv("FILEX_TEST_PW_HASH")
    with pytest.raises(ConfigError):
        authenticator(cfg.web)  # the secret is missing: a config error naming the reference


# -- one submission, feedback ------------------------------------------------------------------

HOSTILE = "<script>alert(1)</script>\x1b[31m../../etc/passwd\u202e<img src=x onerror=alert(2)>.csv"


def _with_feedback(store, tmp_path, name="REJECT_me.csv", text="error: record 7 <b>bad</b>\x07\n"):
    sub = add(store, name, tracking_id="trk-1", size=12, sha256="ab" * 32)
    sub = finish(store, sub.id, State.REJECTED, NOW, reason="FINRA rejected the file")
    fb_path = tmp_path / "feedback" / "fb.txt"
    fb_path.parent.mkdir(exist_ok=True)
    fb_path.write_text(text)
    fb = store.record_feedback(sub.route, f"{name}_feedback.txt", len(text), "2026-01-01", str(fb_path), sub.id)
    return sub, fb, fb_path


def test_submission_page_shows_fields_timeline_and_feedback(site, store, tmp_path):
    sub, fb, _ = _with_feedback(store, tmp_path)
    html = site.get(f"/submissions/{sub.id}").text
    for text in ("REJECT_me.csv", "trk-1", "ab" * 32, "12 bytes", "FINRA rejected the file", "final",
                 "error: record 7 &lt;b&gt;bad&lt;/b&gt;\\x07", f"/submissions/{sub.id}/feedback/{fb.id}"):
        assert text in html, text
    assert [m for m in re.findall(r'data-state="([A-Z_]+)"', html)] == ["REJECTED"]


@BOTH
def test_feedback_is_downloaded_by_ids_only(site, store, tmp_path):
    sub, fb, fb_path = _with_feedback(store, tmp_path)
    other = add(store, "other.csv")
    r = site.get(f"/submissions/{sub.id}/feedback/{fb.id}")
    assert r.status_code == 200 and r.content == fb_path.read_bytes()
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"].startswith('attachment; filename="REJECT_me.csv_feedback.txt"')
    # Another submission's id, unknown ids, and anything that looks like a path: 404.
    for path in (f"/submissions/{other.id}/feedback/{fb.id}", f"/submissions/{sub.id}/feedback/999",
                 "/submissions/999/feedback/1", f"/submissions/{sub.id}/feedback/..%2F..%2Fetc%2Fpasswd",
                 f"/submissions/{sub.id}/feedback/{fb_path}", "/static/..%2F..%2Fstore%2Fsqlite.py",
                 "/static/../app.py"):
        assert site.get(path).status_code == 404, path


def test_a_feedback_file_gone_from_disk_is_a_404_and_a_note(site, store, tmp_path):
    sub, fb, fb_path = _with_feedback(store, tmp_path)
    fb_path.unlink()
    assert site.get(f"/submissions/{sub.id}/feedback/{fb.id}").status_code == 404
    assert "cannot read it" in site.get(f"/submissions/{sub.id}").text


def test_unknown_submission_ids_are_404(site):
    for path in ("/submissions/999", "/fragment/submissions/999", "/submissions/abc", "/submissions/-1",
                 "/submissions/99999999999999999999999", "/submissions/1/feedback/99999999999999999999999"):
        assert site.get(path).status_code == 404, path


def test_hostile_names_and_feedback_render_as_text(site, store, tmp_path):
    sub, fb, _ = _with_feedback(store, tmp_path, name=HOSTILE, text="<script>alert(3)</script>\x1b[0m ../x\n")
    store.update(sub.id, flag="<b>flag</b>", reason="<i>why</i>")
    for path in ("/", "/fragment/overview", "/submissions", f"/submissions/{sub.id}", "/submissions?q=%3Cscript"):
        html = site.get(path).text
        assert "<script>alert" not in html and "<img src=x" not in html and "<b>flag" not in html, path
        assert "\x1b" not in html and "\u202e" not in html, path
    html = site.get(f"/submissions/{sub.id}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\\x1b[31m../../etc/passwd\\u202e&lt;img src=x onerror=alert(2)&gt;.csv" in html
    assert "&lt;script&gt;alert(3)&lt;/script&gt;\\x1b[0m ../x" in html
    r = site.get(f"/submissions/{sub.id}/feedback/{fb.id}")
    name = r.headers["content-disposition"]
    assert "/" not in name.split("filename*=")[0] and "<" not in name and "\x1b" not in name


def test_visible_shows_control_characters_as_text():
    from filex_agent.web.app import visible

    assert visible("a\x1b[31m\u202eb\nc") == "a\\x1b[31m\\u202eb\\x0ac"
    assert visible("l1\r\nl2\tx\x07", keep_lines=True) == "l1\r\nl2\tx\\x07"
    assert visible(None) == ""


def test_bad_query_parameters_are_400(site):
    for q in ("after=garbage", "before=2026-01-01~x", "from=yesterday", "state=<x>"):
        r = site.get(f"/submissions?{q}")
        assert r.status_code == 400 and "<x>" not in r.text, q


# -- overview ----------------------------------------------------------------------------------

@BOTH
def test_overview_counts_per_route_and_problems(site, store):
    add(store, "wait1.csv")
    add(store, "wait2.csv", state=State.CLAIMING)
    add(store, "up.csv", state=State.UPLOADING)
    add(store, "sub.csv", route="s3-b", state=State.SUBMITTED, uploaded_at=NOW)
    ok = add(store, "ok.csv")
    finish(store, ok.id, State.ACCEPTED, NOW)
    bad = add(store, "rej.csv", route="s3-b")
    finish(store, bad.id, State.REJECTED, NOW)
    old = add(store, "yesterday.csv")
    finish(store, old.id, State.ACCEPTED, NOW - timedelta(days=2))
    stuck = add(store, "stuck.csv", state=State.SUBMITTED, uploaded_at=NOW - timedelta(hours=50),
                created_at=NOW - timedelta(hours=50))
    add(store, "lost-answer.csv", route="s3-b", state=State.UNCONFIRMED, uploaded_at=NOW)
    flagged = add(store, "flagged.csv", flag="feedback 'x' not downloaded yet: timeout")
    finish(store, flagged.id, State.ACCEPTED, NOW)

    html = site.get("/fragment/overview").text

    def cell(route, col):
        row = re.search(rf'<tr data-route="{route}">(.*?)</tr>', html, re.S).group(1)
        return int(re.search(rf'data-col="{col}">(\d+)<', row).group(1))

    assert (cell("rest-a", "waiting"), cell("rest-a", "uploading"), cell("rest-a", "awaiting FINRA")) == (2, 1, 1)
    assert (cell("rest-a", "ACCEPTED"), cell("rest-a", "REJECTED")) == (2, 0)  # not the one two days ago
    assert (cell("s3-b", "awaiting FINRA"), cell("s3-b", "REJECTED")) == (1, 1)
    kinds = re.findall(r'<tr class="problem" data-kind="([A-Z_]+)">', html)
    assert sorted(kinds) == ["FLAG", "ROUTE_DOWN", "STUCK", "UNCONFIRMED"]
    assert cell("s3-b", "UNCONFIRMED") == 1 and cell("rest-a", "UNCONFIRMED") == 0  # a column of its own
    assert "stuck.csv" in html and "flagged.csv" in html and "not downloaded yet" in html
    assert re.search(r'id="last-poll">\d{4}-\d\d-\d\d', html)
    assert stuck.id and html.index("wait1.csv")  # latest submissions listed


@BOTH
def test_overview_shows_the_charts_as_inline_svg(site, store):
    for i, state in enumerate([State.ACCEPTED, State.ACCEPTED, State.REJECTED]):
        sub = add(store, f"c{i}.csv", created_at=NOW - timedelta(seconds=30), uploaded_at=NOW)
        finish(store, sub.id, state, NOW)
    html = site.get("/").text
    assert html.count("<svg") == 2
    assert f"{datetime.now().date().isoformat()} ACCEPTED: 2" in html
    assert f"{datetime.now().date().isoformat()} REJECTED: 1" in html
    assert re.search(r"median \d+ s, p95 \d+ s, 3 upload\(s\)", html)


# -- search and paging -------------------------------------------------------------------------

@BOTH
def test_search_filters_and_keyset_paging(site, store):
    t0 = NOW - timedelta(days=3)
    for i in range(130):
        sub = add(store, f"F{i:03d}.csv", route=ROUTES[i % 2], created_at=t0 + timedelta(minutes=i),
                  tracking_id=f"trk-{i}")
        if i % 10 == 0:
            finish(store, sub.id, State.REJECTED, NOW)

    def ids(html):
        return [int(x) for x in re.findall(r'<tr data-id="(\d+)">', html)]

    seen, url, pages = [], "/submissions", 0
    while url:
        html = site.get(url).text
        seen += ids(html)
        pages += 1
        m = re.search(r'href="([^"]+)" rel="next"', html)
        url = "/submissions" + m.group(1).replace("&amp;", "&") if m else None
    assert pages == 3 and seen == list(range(130, 0, -1))
    # Back from the last page: "newer" gives the page before it.
    m = re.search(r'href="([^"]+)" rel="prev"', html)
    assert ids(site.get("/submissions" + m.group(1).replace("&amp;", "&")).text) == list(range(80, 30, -1))

    assert ids(site.get("/submissions?q=trk-42").text) == [43]
    assert ids(site.get("/submissions?q=F12").text) == list(range(130, 120, -1))
    assert ids(site.get("/submissions?state=REJECTED&route=rest-a").text) == list(range(121, 0, -10))
    assert ids(site.get("/submissions?state=REJECTED&route=s3-b").text) == []
    day = (t0 + timedelta(minutes=10)).astimezone().date().isoformat()
    assert set(ids(site.get(f"/submissions?from={day}&to={day}").text)) <= set(range(1, 131))
    assert ids(site.get("/submissions?q=nothing-like-it").text) == []


@BOTH
def test_store_search_pages_both_ways_and_prefixes(store):
    for i in range(30):
        add(store, f"N{i:02d}.csv", created_at=NOW - timedelta(minutes=60 - i), tracking_id=f"t{i}")
    p1 = store.search(SubmissionQuery(), 10)
    assert [s.id for s in p1.rows] == list(range(30, 20, -1)) and p1.newer is None and p1.older is not None
    p2 = store.search(SubmissionQuery(), 10, after=p1.older)
    assert [s.id for s in p2.rows] == list(range(20, 10, -1)) and p2.newer is not None
    back = store.search(SubmissionQuery(), 10, before=p2.newer)
    assert [s.id for s in back.rows] == [s.id for s in p1.rows] and back.newer is None
    assert [s.id for s in store.search(SubmissionQuery(text="t7"), 10).rows] == [8]
    assert [s.id for s in store.search(SubmissionQuery(text="N1"), 50).rows] == list(range(20, 10, -1))
    # A dense prefix takes the other plan (SQLite; PostgreSQL's planner chooses by itself): same answer.
    import filex_agent.store.sqlite as sq
    dense = sq.DENSE_PREFIX
    sq.DENSE_PREFIX = 5
    try:
        assert [s.id for s in store.search(SubmissionQuery(text="N1"), 50).rows] == list(range(20, 10, -1))
        assert [s.id for s in store.search(SubmissionQuery(text="N"), 4, after=PageKey(
            store.get(10).created_at, 10)).rows] == [9, 8, 7, 6]
    finally:
        sq.DENSE_PREFIX = dense


@BOTH
def test_store_histograms(store):
    day = datetime(2026, 3, 1, tzinfo=timezone.utc)
    edges = [day + timedelta(days=i) for i in range(4)]
    for offset_h, state, latency in ((1, State.ACCEPTED, 0.5), (2, State.ACCEPTED, 45), (25, State.REJECTED, 4000),
                                     (26, State.FAILED, None), (80, State.ACCEPTED, 3)):
        at = day + timedelta(hours=offset_h)
        sub = add(store, created_at=at - timedelta(seconds=latency or 0),
                  uploaded_at=at if latency is not None else None)
        finish(store, sub.id, state, at)
    assert store.final_histogram(edges) == {(0, "ACCEPTED"): 2, (1, "REJECTED"): 1, (1, "FAILED"): 1}
    bounds = (1.0, 60.0, 3600.0)
    assert store.latency_histogram(edges, bounds) == {(0, 0): 1, (0, 1): 1, (1, 3): 1}
    assert store.final_counts(edges[0], edges[2]) == {("rest-a", "ACCEPTED"): 2, ("rest-a", "REJECTED"): 1,
                                                      ("rest-a", "FAILED"): 1}


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_store_prefixes_are_byte_prefixes_not_patterns(kind, tmp_path, request, store_of_kind):
    # PostgreSQL compares text in the database's collation unless told otherwise: in en-US, "A.csv"
    # and "ä.csv" sort inside ["a", "a\U0010ffff"). LIKE would take % and _ for wildcards.
    if kind == "postgresql":
        from filex_agent.store.postgres import PostgresStore

        server = request.getfixturevalue("pg_server")
        store = PostgresStore(server.database("t_prefix_icu", icu_locale="en-US"), password=server.password)
    else:
        store = store_of_kind(kind, tmp_path / "journal.sqlite3")
    request.addfinalizer(store.close)
    names = ["a-b.csv", "ab.csv", "A.csv", "a%b.csv", "a_b.csv", "ä.csv", "b.csv"]
    ids = {name: add(store, name, created_at=NOW - timedelta(minutes=len(names) - i)).id
           for i, name in enumerate(names)}

    def found(text):
        return {s.file_name for s in store.search(SubmissionQuery(text=text), 50).rows}

    assert found("a") == {"a-b.csv", "ab.csv", "a%b.csv", "a_b.csv"}
    assert found("a-") == {"a-b.csv"} and found("a%") == {"a%b.csv"} and found("a_") == {"a_b.csv"}
    assert found("ä") == {"ä.csv"} and found("A") == {"A.csv"} and found("c") == set()
    assert [s.id for s in store.search(SubmissionQuery(text="a", states=("QUEUED",), route="rest-a"), 2).rows] == [
        ids["a_b.csv"], ids["a%b.csv"]]


@BOTH
def test_store_problems_open_counts_and_feedback_file(store, tmp_path):
    old = NOW - timedelta(hours=50)
    flagged = add(store, "flagged.csv", flag="no tracking match")
    finish(store, flagged.id, State.ACCEPTED, NOW)
    lost = add(store, "lost.csv", route="s3-b", state=State.UNCONFIRMED, uploaded_at=NOW)
    stuck = add(store, "stuck.csv", state=State.SUBMITTED, created_at=old, uploaded_at=old)
    add(store, "recent-upload.csv", state=State.SUBMITTED, created_at=old, uploaded_at=NOW)  # waits since NOW
    waiting = add(store, "waiting.csv", created_at=old)
    done = add(store, "done.csv", created_at=old, uploaded_at=old)
    finish(store, done.id, State.REJECTED, old)

    found = store.problems(("UNCONFIRMED",), NOW - timedelta(hours=24), 100)
    assert [s.id for s in found] == [waiting.id, stuck.id, lost.id, flagged.id]  # newest first
    assert found[-1].flag == "no tracking match" and found[-2].state is State.UNCONFIRMED
    assert [s.id for s in store.problems(("UNCONFIRMED",), NOW - timedelta(hours=24), 2)] == [waiting.id, stuck.id]
    assert [s.id for s in store.problems((), NOW - timedelta(hours=24), 100)] == [waiting.id, stuck.id, flagged.id]

    assert store.open_counts() == {("rest-a", "SUBMITTED"): 2, ("rest-a", "QUEUED"): 1, ("s3-b", "UNCONFIRMED"): 1}
    assert store.final_counts(NOW - timedelta(hours=1), NOW + timedelta(hours=1)) == {("rest-a", "ACCEPTED"): 1}

    fb = store.record_feedback("rest-a", "done.csv_fb.txt", 3, "2026-01-01T00:00:00Z", str(tmp_path / "fb"), done.id)
    store.begin_feedback("rest-a", "other_fb.txt", 1, None)  # begun, never filed
    got = store.feedback_file(done.id, fb.id)
    assert (got.id, got.remote_name, got.local_path) == (fb.id, "done.csv_fb.txt", str(tmp_path / "fb"))
    assert store.feedback_file(waiting.id, fb.id) is None and store.feedback_file(done.id, fb.id + 1) is None


def test_status_page_reads_a_postgresql_journal(tmp_path, pg_server, pg_url, monkeypatch):
    """The agent's own wiring (``Service``, which opens the configured journal): the overview and a
    search served from a PostgreSQL journal, and its charts warmed from it."""
    from filex_agent.config import parse_config
    from filex_agent.service import Service
    from filex_agent.store.postgres import PostgresStore

    monkeypatch.setenv("FILEX_TEST_WEB_PG_PASSWORD", pg_server.password)
    raw = web_config(tmp_path).model_dump(mode="json", exclude_none=True)
    cfg = parse_config({**raw, "journal": {"url": pg_url, "password": "env:FILEX_TEST_WEB_PG_PASSWORD"}})
    service = Service(cfg, None)
    try:
        assert isinstance(service.store, PostgresStore)
        for i in range(3):
            sub = add(service.store, f"PG{i}.csv", created_at=NOW - timedelta(seconds=40), uploaded_at=NOW,
                      tracking_id=f"pg-trk-{i}")
            finish(service.store, sub.id, State.ACCEPTED if i else State.REJECTED, NOW)
        add(service.store, "PGwaiting.csv")
        url = service.start_web()
        with httpx.Client(base_url=url.rstrip("/"), timeout=10) as client:
            html = client.get("/").text
            row = re.search(r'<tr data-route="rest-a">(.*?)</tr>', html, re.S).group(1)
            assert re.search(r'data-col="waiting">1<', row) and re.search(r'data-col="ACCEPTED">2<', row)
            assert f"{datetime.now().date().isoformat()} REJECTED: 1" in html
            assert re.search(r"median \d+ s, p95 \d+ s, 3 upload\(s\)", html)
            found = client.get("/submissions?q=PG").text
            assert re.findall(r'<tr data-id="(\d+)">', found) == ["4", "3", "2", "1"]
            assert re.findall(r'<tr data-id="(\d+)">', client.get("/submissions?q=pg-trk-1").text) == ["2"]
            assert client.get("/submissions/2").status_code == 200
    finally:
        if service.web is not None:
            service.web.stop()
        service.store.close()
        service.audit.close()
        service.notifier.stop(timeout=5)


def test_latency_quantiles_from_the_histogram():
    from filex_agent.web.views import LATENCY_BOUNDS, quantile

    counts = [0] * (len(LATENCY_BOUNDS) + 1)
    counts[LATENCY_BOUNDS.index(60.0)] = 100  # all between 30 s and 60 s
    assert quantile(counts, 0.5) == pytest.approx(45.0)
    assert quantile(counts, 0.95) == pytest.approx(58.5)
    assert quantile([0] * len(counts), 0.5) is None


def test_password_tool_makes_a_hash_the_page_accepts():
    p = subprocess.run([sys.executable, "-m", "filex_agent.web.password"], input="a long passphrase here\n",
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    value = p.stdout.strip()
    assert value.startswith("pbkdf2_sha256$") and "a long passphrase" not in value
    auth = Authenticator(password_hash=value)
    assert auth.check(_basic("compliance", "a long passphrase here"))
    assert not auth.check(_basic("compliance", "a long passphrase her"))
    short = subprocess.run([sys.executable, "-m", "filex_agent.web.password"], input="short\n",
                           capture_output=True, text=True, timeout=60)
    assert short.returncode == 1 and short.stdout == ""


# -- filing calendar ---------------------------------------------------------------------------

NY_TZ = "America/New_York"
DAILY = {"name": "daily-trades", "route": ROUTES[0], "pattern": "TRADES_*", "recurrence": "business_day",
         "due": "18:00", "timezone": NY_TZ}


def _ny(y: int, m: int, d: int, hh: int = 0, mm: int = 0) -> datetime:
    from zoneinfo import ZoneInfo

    return datetime(y, m, d, hh, mm, tzinfo=ZoneInfo(NY_TZ)).astimezone(timezone.utc)


def _occurrence(store, name: str, deadline: datetime, state: str, sub=None, label: str | None = None, **kw):
    from filex_agent.store import Occurrence

    store.save_occurrence(Occurrence(
        expectation=name, deadline=deadline, opens_at=deadline - timedelta(hours=18),
        closes_at=deadline + timedelta(hours=6), route=ROUTES[0], pattern="TRADES_*",
        label=label or deadline.astimezone().date().isoformat(), state=state,
        submission_id=sub.id if sub else None, verdict=sub.state.value if sub else None, closed=True, **kw))


def _day_cell(html: str, day: str) -> str:
    m = re.search(rf'data-day="{day}">(.*?)</td>', html, re.S)
    assert m, day
    return m.group(1)


@pytest.fixture
def calendar_site(tmp_path, store):
    cfg = web_config(tmp_path, expectations=[DAILY])
    with serve(cfg, store) as web:
        with httpx.Client(base_url=web.url.rstrip("/"), timeout=10) as client:
            yield client


def test_calendar_shows_an_occurrence_on_its_day_with_its_submission(calendar_site, store):
    # A past month: every row comes from the journal (March 2025, long before any test clock).
    sub = add(store, "TRADES_0312.csv", tracking_id="t-1")
    finish(store, sub.id, State.ACCEPTED, _ny(2025, 3, 12, 17))
    sub = store.get(sub.id)
    _occurrence(store, "daily-trades", _ny(2025, 3, 12, 18), "ACCEPTED", sub, label="2025-03-12", on_time=True)
    _occurrence(store, "daily-trades", _ny(2025, 3, 13, 18), "MISSED", label="2025-03-13", on_time=None)
    _occurrence(store, "daily-trades", _ny(2025, 4, 1, 18), "ACCEPTED", label="2025-04-01")  # another month
    r = calendar_site.get("/calendar", params={"month": "2025-03"})
    assert r.status_code == 200 and "content-security-policy" in r.headers
    html = r.text
    assert '<a href="/calendar" aria-current="page">Calendar</a>' in html
    cell = _day_cell(html, "2025-03-12")
    assert 'class="state ok" data-state="ACCEPTED">ACCEPTED (on time)<' in cell
    assert f'href="/submissions/{sub.id}"' in cell and "daily-trades" in cell and "18:00 EDT" in cell
    missed = _day_cell(html, "2025-03-13")
    assert 'class="state bad" data-state="MISSED">MISSED<' in missed and "/submissions/" not in missed
    assert "data-state" not in _day_cell(html, "2025-03-11")
    assert 'data-day="2025-04-01"' not in html  # only this month's days, only this month's occurrences
    # The plain table says the same: two rows, the submission linked with its verdict.
    table = html.split('id="occurrences"', 1)[1].split("<tbody>", 1)[1]
    assert table.count("<tr>") == 2
    assert f'<a href="/submissions/{sub.id}">{sub.id} TRADES_0312.csv</a>' in table
    assert "2025-03-12 18:00 EDT" in table and "MISSED" in table
    # The day of the deadline is the expectation's local day, even when UTC has moved on.
    _occurrence(store, "daily-trades", _ny(2025, 3, 31, 23, 30), "ACCEPTED", label="2025-03-31")
    assert "ACCEPTED" in _day_cell(calendar_site.get("/calendar?month=2025-03").text, "2025-03-31")


def test_calendar_month_navigation(calendar_site, store):
    html = calendar_site.get("/calendar?month=2025-03").text
    assert 'href="/calendar?month=2025-02"' in html and 'href="/calendar?month=2025-04"' in html
    assert "March 2025" in html
    nxt = calendar_site.get("/calendar?month=2025-12").text
    assert 'href="/calendar?month=2026-01"' in nxt and 'href="/calendar?month=2025-11"' in nxt
    prev = calendar_site.get("/calendar?month=2025-01").text
    assert 'href="/calendar?month=2024-12"' in prev
    # Without a month: this one, with its coming business days computed by the calendar itself.
    now = datetime.now().astimezone()
    this = calendar_site.get("/calendar").text
    assert now.strftime("%B %Y") in this
    ahead = now.replace(day=1) + timedelta(days=62)
    later = calendar_site.get(f"/calendar?month={ahead:%Y-%m}").text
    days = re.findall(r'data-day="([0-9-]+)">(.*?)</td>', later, re.S)
    assert len(days) >= 28
    for day, cell in days:
        if datetime.fromisoformat(day).weekday() >= 5:
            assert "data-state" not in cell, day
    assert sum('data-state="EXPECTED"' in cell for _, cell in days) >= 15  # business days less holidays


@pytest.mark.parametrize("month", ["2025-13", "2025-00", "2025-1", "25-01", "abcd-ef", "2025-03-01", "0000-01",
                                   "9999-12", "2025-03\x00", "２０２５-０３", "-2025-03",
                                   "2025-03\n"])
def test_calendar_bad_month_is_400(calendar_site, month):
    r = calendar_site.get("/calendar", params={"month": month})
    assert r.status_code == 400, month
    assert "month: expected YYYY-MM" in r.text
    assert "default-src 'none'" in r.headers["content-security-policy"]


def test_calendar_escapes_names_from_the_journal(calendar_site, store):
    # Config names are checked, but the journal keeps occurrences of an expectation since renamed.
    hostile = '<script>alert("x")</script>'
    sub = add(store, '<img src=x onerror=alert(1)>.csv')
    _occurrence(store, hostile, _ny(2025, 5, 6, 18), "SUBMITTED", sub, label='<b>"q2"</b>')
    html = calendar_site.get("/calendar?month=2025-05").text
    assert hostile not in html and "<img src=x" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in _day_cell(html, "2025-05-06")
    assert "&lt;img src=x onerror=alert(1)&gt;.csv" in html and "&lt;b&gt;&#34;q2&#34;&lt;/b&gt;" in html
    assert re.findall(r"<script(?![^>]*\bsrc=)", html) == []


def test_calendar_without_expectations_says_so(site, store):
    html = site.get("/calendar").text
    assert "no expectations configured" in html and 'class="calendar"' not in html
