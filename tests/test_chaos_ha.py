"""HA chaos: three agents (separate processes, separate node names) share one PostgreSQL journal,
one set of outboxes and archive folders, and the sandbox fileX. Files arrive on every transport's
route while, at random, an agent is SIGKILLed (and restarted), an agent is SIGSTOPped for longer
than its lease (its uploads and singletons pass to the others; resumed, it is fenced off), and
PostgreSQL itself is killed and restarted. Then everything is let finish and the test counts
what fileX received: every file exactly once, none lost (the same checks as tests/test_chaos.py).

Seeded: ``FILEX_CHAOS_SEED=<n>`` replays a run; ``FILEX_HA_FILES`` / ``FILEX_HA_EVENTS`` size it.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from filex_agent.config import load_config
from filex_agent.sandbox import Sandbox
from tests.conftest import sftp_supported
from tests.pg_fixture import PgServer, skip_reason
from tests.test_chaos import _config, _Daemon, _out_objects, chaos_threads, check_outcome, end_chaos, make_plan

LEASE = 3  # seconds: pauses of 4-7 s outlive it


@pytest.mark.slow
@pytest.mark.timeout(480)
@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_ha_chaos_three_agents_one_journal(tmp_path):
    import psycopg
    from psycopg.rows import dict_row

    seed = int(os.environ.get("FILEX_CHAOS_SEED") or random.randrange(1, 2**31))
    n_files = int(os.environ.get("FILEX_HA_FILES", "90"))
    n_events = int(os.environ.get("FILEX_HA_EVENTS", "14"))
    print(f"\nha chaos: FILEX_CHAOS_SEED={seed} files={n_files} events={n_events}")
    rng = random.Random(seed)
    t0 = time.monotonic()

    pg = PgServer()
    pg.start()
    sb = Sandbox(tmp_path / "sandbox", processing_delay=0.3, sftp=sftp_supported())
    sb.start()
    nodes: dict[str, _Daemon] = {}
    try:
        url = pg.database("filex")
        os.environ["FILEX_HA_PG_PASSWORD"] = pg.password
        base = _config(sb, tmp_path / "shared", journal={"url": url, "password": "env:FILEX_HA_PG_PASSWORD",
                                                        "lease_seconds": LEASE})
        for name in ("n1", "n2", "n3"):
            text = base.read_text().replace("[journal]\n", f'[journal]\nnode_name = "{name}"\n', 1)
            path = base.with_name(f"{name}.toml")
            path.write_text(text)
            nodes[name] = _Daemon(path, tmp_path / f"{name}.log")
        cfg = load_config(base.with_name("n1.toml"))
        routes = cfg.routes
        assert {"rest", "s3"} <= {r.transport for r in routes}
        for r in routes:
            Path(r.outbox).mkdir(parents=True, exist_ok=True)

        plan, names = make_plan(rng, routes, n_files, seed)
        dropped: list[str] = []
        stop_threads = threading.Event()
        threads = chaos_threads(sb, plan, names, dropped, stop_threads, seed)
        for d in nodes.values():
            d.start()
        for d in nodes.values():
            assert d.wait_started(timeout=60), f"{d.cfg_path.stem} did not start; see its log"
        for t in threads:
            t.start()

        # ---- chaos phase
        done: Counter = Counter()
        paused: set[str] = set()
        for _ in range(n_events):
            time.sleep(rng.uniform(0.5, 2.0))
            event = rng.choice(["kill", "kill", "pause", "pause", "postgres"])
            name = rng.choice(sorted(nodes))
            d = nodes[name]
            if event == "kill" and name not in paused:
                d.kill()
                time.sleep(rng.uniform(0.0, 1.0))
                d.start()
            elif event == "pause" and name not in paused:
                d.proc.send_signal(signal.SIGSTOP)  # outlives its lease: the others take over
                paused.add(name)
                threading.Timer(rng.uniform(LEASE + 1, LEASE + 4), _resume, (d, paused, name)).start()
            elif event == "postgres" and done["postgres"] < 2:
                pg.kill()  # crash: every connection cut, in-flight transactions lost
                time.sleep(rng.uniform(0.2, 1.5))
                pg.start()
            else:
                continue
            done[event] += 1
        end_chaos(sb, plan, names, dropped, stop_threads, threads)
        time.sleep(LEASE + 4.5)  # every pause ends
        assert not paused
        chaos_end = time.monotonic()

        # ---- calm phase
        for d in nodes.values():
            if d.proc.poll() is not None:
                d.start()

        def rows() -> tuple[list[dict], list[dict]]:
            with psycopg.connect(url, password=pg.password, row_factory=dict_row) as db:
                return (db.execute("SELECT * FROM submissions ORDER BY id").fetchall(),
                        db.execute("SELECT * FROM feedback ORDER BY id").fetchall())

        def finished() -> bool:
            subs, fb = rows()
            out_total = sum(len(_out_objects(sb, r.org, r.application)) for r in routes)
            states = Counter(s["state"] for s in subs)
            final = sum(1 for s in subs if s["state"] in ("ACCEPTED", "REJECTED", "PARTIALLY_REJECTED", "FAILED")
                        and s["move_to"] is None)
            filed = sum(1 for f in fb if f["downloaded_at"] is not None)
            finished.last = f"states={dict(states)} feedback filed={filed}/{out_total}"  # type: ignore[attr-defined]
            return final >= n_files and out_total >= final - states.get("FAILED", 0) and filed >= out_total

        deadline = time.monotonic() + 180
        while not finished():
            for name, d in nodes.items():
                assert d.proc.poll() is None, f"{name} died in the calm phase; see {name}.log"
            if time.monotonic() > deadline:
                raise AssertionError(f"seed {seed}: not finished in time: {finished.last}")  # type: ignore[attr-defined]
            time.sleep(0.5)
        time.sleep(1.5)  # one more cycle everywhere: nothing may be filed twice afterwards
        for d in nodes.values():
            d.proc.send_signal(signal.SIGTERM)
        for name, d in nodes.items():
            assert d.proc.wait(timeout=30) == 0, f"{name}: SIGTERM must end it cleanly"

        subs, fb = rows()
        check_outcome(seed, sb, cfg, plan, subs, fb)
        print(f"ha chaos: seed {seed}: {n_files} files, 3 agents, events {dict(done)}, "
              f"chaos phase {chaos_end - t0:.1f} s, calm phase {time.monotonic() - chaos_end:.1f} s")
    except BaseException:
        print(f"ha chaos: FAILED with FILEX_CHAOS_SEED={seed}; logs: {tmp_path}/n*.log")
        raise
    finally:
        for d in nodes.values():
            if d.proc is not None and d.proc.poll() is None:
                d.proc.send_signal(signal.SIGCONT)
            d.close()
        sb.stop()
        pg.close()


def _resume(d: _Daemon, paused: set[str], name: str) -> None:
    if d.proc is not None and d.proc.poll() is None:
        d.proc.send_signal(signal.SIGCONT)
    paused.discard(name)
