"""``python -m tests.web_screenshot [PNG]``: the overview of a month of filings, as
docs/web-overview.png in the README (a synthetic journal from bench/web.py, served by the real
server, photographed by Debian's chromium)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from bench.web import bench_config, build_journal
from filex_agent.store.sqlite import SQLiteStore
from tests.web_helpers import chrome, serve

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else ROOT / "docs" / "web-overview.png"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_journal(tmp / "journal.sqlite3", 30_000, seed=7)
        cfg = bench_config(tmp)
        store = SQLiteStore(tmp / "journal.sqlite3")
        driver = chrome(tmp / "profile", size=(1400, 1620))
        try:
            with serve(cfg, store, last_poll=time.time, active=lambda: set()) as web:
                driver.get(web.url)
                time.sleep(1)
                out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(out))
        finally:
            driver.quit()
            store.close()
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
