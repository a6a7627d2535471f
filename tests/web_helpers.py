"""Shared by the status page tests: a journal with rows, and the real server on loopback."""

from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from filex_agent.config import Config, parse_config
from filex_agent.store import State
from filex_agent.store.sqlite import SQLiteStore

ROUTES = ("rest-a", "s3-b")
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Without the background-networking flags Chromium dials out at start (and, on a closed network,
# its connections are refused).
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync")


def chrome(profile: Path, size: tuple[int, int] = (1400, 1100)):
    """Debian's chromium through its chromedriver (never a downloaded browser), headless."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--window-size={size[0]},{size[1]}")
    opts.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    return driver


def web_config(tmp_path: Path, expectations: list[dict] | None = None, **web) -> Config:
    web.setdefault("enabled", True)
    web.setdefault("listen", "127.0.0.1:0")
    return parse_config({
        "agent": {"data_dir": str(tmp_path / "data")},
        "credentials": {"c": {"client_id": "acct", "client_secret": "env:UNUSED_SECRET"}},
        "routes": [{"name": r, "outbox": str(tmp_path / "outbox" / r), "org": "0001", "application": "app1",
                    "credential": "c"} for r in ROUTES],
        "expectations": expectations or [],
        "web": web,
    })


def add(store: SQLiteStore, name: str = "a.csv", route: str = ROUTES[0], **fields):
    base = dict(route=route, org="0001", application="app1", transport="rest", file_name=name,
                source_path=f"/o/{name}", local_path=f"/o/{name}", state=State.QUEUED)
    base.update(fields)
    return store.create(**base)


def finish(store: SQLiteStore, sub_id: int, state: State, at: datetime, **fields):
    return store.transition(sub_id, state, "final", final_at=at, **fields)


@contextmanager
def serve(cfg: Config, store: SQLiteStore, *, auth=None, last_poll=None, active=None):
    from filex_agent.web.app import Sources
    from filex_agent.web.server import WebServer

    web = WebServer(cfg.web, Sources(store, lambda: cfg, last_poll=last_poll, active_problems=active), auth=auth)
    web.start()
    try:
        yield web
    finally:
        web.stop()
