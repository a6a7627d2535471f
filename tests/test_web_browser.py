"""The status page in a real browser (Debian's chromium driven by Selenium) against a real
`filex-agent run --sandbox`: live updates without a reload, feedback, hostile names, search, and
no request leaving the agent's own origin."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from filex_agent.store import State
from filex_agent.store.sqlite import SQLiteStore
from tests.conftest import wait_for
from tests.web_helpers import CHROMEDRIVER, CHROMIUM, chrome

REPO = Path(__file__).parents[1]

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); "
           ".ci/run installs them")

class Agent:
    def __init__(self, url: str, data: Path, outboxes: dict[str, Path]):
        self.url, self.data, self.outboxes = url, data, outboxes

    @property
    def journal(self) -> Path:
        return self.data / "agent" / "journal.sqlite3"

    def drop(self, name: str, route: str = "rest") -> None:
        outbox = next(p for k, p in self.outboxes.items() if route in k)
        tmp = outbox / (".tmp-" + str(time.monotonic_ns()))
        tmp.write_bytes(f"a,b\n1,{name}\n".encode())  # distinct bytes: the same bytes twice are HELD
        os.rename(tmp, outbox / name)

    def submission(self, name: str):
        store = SQLiteStore(self.journal)
        try:
            return next((s for s in store.list() if s.file_name == name), None)
        finally:
            store.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    data = tmp_path_factory.mktemp("web-agent")
    proc = subprocess.Popen([sys.executable, "-m", "filex_agent", "run", "--sandbox", "--data-dir", str(data)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    url = None
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("status web page:"):
                url = line.split(":", 1)[1].strip()
        assert url and url.startswith("http://127.0.0.1:"), "".join(lines)
        outboxes = {Path(l.split()[0]).name: Path(l.split()[0]) for l in lines if l.startswith("  /")}
        yield Agent(url, data, outboxes)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = chrome(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


# The page replaces its fragments every refresh: read the DOM in one script, never through
# element handles that a refresh makes stale.
def _row_state(driver, name: str) -> str | None:
    return driver.execute_script("""
        for (const row of document.querySelectorAll("table.subs tbody tr")) {
            const a = row.querySelector("td.name a");
            if (a && a.textContent === arguments[0]) { return row.querySelector("span.state").dataset.state; }
        }
        return null;""", name)


def _text(driver, css: str) -> str | None:
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                                 css)


def _attr(driver, css: str, attr: str) -> str | None:
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null;", css, attr)


def _no_alert(driver) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def test_a_dropped_file_appears_and_turns_accepted_without_a_reload(agent, browser):
    browser.get(agent.url)
    browser.execute_script("window.__sameDocument = 'yes';")
    assert _row_state(browser, "LIVE_one.csv") is None
    agent.drop("LIVE_one.csv")
    wait_for(lambda: _row_state(browser, "LIVE_one.csv") is not None, timeout=60, what="the row to appear")
    wait_for(lambda: _row_state(browser, "LIVE_one.csv") == "ACCEPTED", timeout=60, what="ACCEPTED on the page")
    assert browser.execute_script("return window.__sameDocument;") == "yes", "the page was reloaded"
    assert _text(browser, "#live") == "live"
    assert int(_text(browser, 'tr[data-route="rest-0001-app1"] td[data-col="ACCEPTED"]')) >= 1


def test_a_rejected_file_shows_its_feedback(agent, browser):
    agent.drop("LIVE_REJECT.csv")
    sub = wait_for(lambda: agent.submission("LIVE_REJECT.csv"), timeout=30, what="the journal row")
    browser.get(f"{agent.url}submissions/{sub.id}")
    browser.execute_script("window.__sameDocument = 'yes';")
    wait_for(lambda: _attr(browser, "#state", "data-state") == "REJECTED", timeout=60,
             what="REJECTED on the submission page")
    wait_for(lambda: _text(browser, "pre.feedback-text"), timeout=60, what="the feedback")
    text = _text(browser, "pre.feedback-text")
    assert "outcome: REJECTED" in text and "sandbox rejection" in text
    link = _attr(browser, "article.feedback a.download", "href")
    assert link.startswith(f"/submissions/{sub.id}/feedback/")
    assert browser.execute_script("return window.__sameDocument;") == "yes"
    assert _attr(browser, "#attempts tbody tr", "data-outcome") == "SENT"  # the upload attempt, journaled
    timeline = _text(browser, "#timeline")
    assert "QUEUED" in timeline and "SUBMITTED" in timeline and "REJECTED" in timeline


HOSTILE = "<script>window.__pwned=1</script>\x1b[31m../../etc/passwd<img src=x onerror=\"window.__pwned=2\">.csv"
HOSTILE_SHOWN = "<script>window.__pwned=1</script>\\x1b[31m../../etc/passwd<img src=x onerror=\"window.__pwned=2\">.csv"


def test_hostile_names_render_as_text(agent, browser, tmp_path):
    # One through the outbox (fileX refuses the name: FAILED), one written into the journal with
    # what no file system allows (a "/", a control character) and hostile feedback text.
    agent.drop("<img src=x onerror=alert(1)>.csv")
    store = SQLiteStore(agent.journal)
    try:
        fb = tmp_path / "fb.txt"
        fb.write_text("<script>window.__pwned=3</script>\n../../etc/shadow\n")
        sub = store.create(route="rest-0001-app1", org="0001", application="app1", transport="rest",
                           file_name=HOSTILE, source_path="/x", local_path="/x", state=State.REJECTED,
                           flag="<b onclick=x>flag</b>")
        store.record_feedback("rest-0001-app1", "<svg onload=alert(4)>.txt", 10, "m", str(fb), sub.id)
    finally:
        store.close()
    wait_for(lambda: agent.submission("<img src=x onerror=alert(1)>.csv") is not None
             and agent.submission("<img src=x onerror=alert(1)>.csv").state is State.FAILED, timeout=30,
             what="the bad name FAILED")
    browser.get(agent.url)
    wait_for(lambda: _row_state(browser, "<img src=x onerror=alert(1)>.csv") == "FAILED", timeout=30,
             what="the hostile row")
    assert _row_state(browser, HOSTILE_SHOWN) == "REJECTED"
    browser.get(f"{agent.url}submissions/{sub.id}")
    assert _text(browser, "h1 .name") == HOSTILE_SHOWN
    assert "<script>window.__pwned=3</script>" in _text(browser, "pre.feedback-text")
    assert _text(browser, "article.feedback h3 .name") == "<svg onload=alert(4)>.txt"
    assert "<b onclick=x>flag</b>" in _text(browser, "#flag")
    time.sleep(2.5)  # one refresh of the fragment: injected markup would run now
    for page in (agent.url, f"{agent.url}submissions", f"{agent.url}submissions/{sub.id}"):
        browser.get(page)
        assert _no_alert(browser), page
        assert browser.execute_script("return window.__pwned;") is None, page
        assert not browser.find_elements("css selector", "main script, main img, main svg b, h1 b"), page


def test_search_finds_a_tracking_id(agent, browser):
    agent.drop("SEARCH_me.csv")
    sub = wait_for(lambda: (s := agent.submission("SEARCH_me.csv")) and s.tracking_id and s, timeout=60,
                   what="a tracking id")
    browser.get(f"{agent.url}submissions")
    box = browser.find_element("id", "q")
    box.send_keys(sub.tracking_id)
    browser.find_element("id", "search").click()
    wait_for(lambda: "q=" in browser.current_url, timeout=10, what="the search page")
    rows = browser.find_elements("css selector", "table.subs tbody tr[data-id]")
    assert [r.get_attribute("data-id") for r in rows] == [str(sub.id)]
    assert _row_state(browser, "SEARCH_me.csv") in {"SUBMITTED", "ACCEPTED"}


def test_nothing_is_fetched_from_another_origin(agent, browser, tmp_path):
    origin = agent.url.rstrip("/")
    for page in (agent.url, f"{agent.url}submissions", f"{agent.url}submissions/1"):
        browser.get(page)
        time.sleep(2.5)  # let one refresh happen
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
        assert resources, page
        assert all(r.startswith(origin + "/") for r in resources), resources
        refs = browser.execute_script(
            "return Array.from(document.querySelectorAll('[src],[href]')).map(e => e.src || e.href);")
        assert all(r.startswith(origin + "/") for r in refs), refs
        # The stylesheet and the script came from the agent and worked.
        bg = browser.execute_script("return getComputedStyle(document.querySelector('header')).backgroundColor;")
        assert bg == "rgb(31, 78, 121)", bg
        assert browser.execute_script("return document.documentElement.dataset.script;") == "loaded"
    shot = Path(os.environ.get("FILEX_WEB_SCREENSHOT") or tmp_path / "overview.png")
    browser.get(agent.url)
    time.sleep(1)
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
