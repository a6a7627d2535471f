"""Copy an SQLite journal into an empty PostgreSQL journal, once (``filex-agent journal migrate``).

Every table, every row, ids kept (events, attempts and feedback point at submissions by id; the
audit trail names them), identity sequences moved past the copied ids. One PostgreSQL
transaction: a failure leaves the target empty. The SQLite journal is held write-locked while it
is read (a running agent would wait: stop it first) and is left as it was.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg

from filex_agent.errors import FilexError
from filex_agent.store.postgres import TABLES, PostgresStore
from filex_agent.store.sqlite import SQLiteStore

_SQLITE_INTERNAL = {"sqlite_sequence"}


class MigrationRefused(FilexError):
    """The copy would lose or mix rows: nothing was written."""


def sqlite_to_postgres(source: Path, target: PostgresStore) -> dict[str, int]:
    """Copy ``source`` into ``target``; the number of rows copied per table."""
    if not Path(source).is_file():
        raise MigrationRefused(f"no SQLite journal at {source}")
    SQLiteStore(source).close()  # bring the file to this build's schema first (same columns as PostgreSQL)
    src = sqlite3.connect(str(source), isolation_level=None, timeout=30)
    try:
        src.execute("BEGIN IMMEDIATE")  # a consistent snapshot: no agent writes while we read
        tables = [r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        unknown = sorted(set(tables) - set(TABLES) - _SQLITE_INTERNAL)
        if unknown:
            raise MigrationRefused(f"the SQLite journal has tables this copy does not know: {', '.join(unknown)}")

        def copy(cur: psycopg.Cursor) -> dict[str, int]:
            # A large journal takes longer than the store's per-statement timeout (1M rows: ~45 s).
            cur.execute("SET LOCAL statement_timeout = 0")
            # No other node may write while the target is checked and filled.
            cur.execute(f"LOCK TABLE {', '.join(TABLES)} IN EXCLUSIVE MODE")
            present = {t: cur.execute(f"SELECT COUNT(*) AS n FROM {t}").fetchone()["n"] for t in TABLES}
            if any(present.values()):
                held = ", ".join(f"{t}: {n}" for t, n in present.items() if n)
                raise MigrationRefused(f"the target journal {target.url} already has rows ({held}): refusing to mix "
                                       "two journals; migrate into an empty database")
            copied = {}
            for table in TABLES:
                cols = [r[1] for r in src.execute(f"PRAGMA table_info({table})")]
                if not cols:
                    copied[table] = 0
                    continue
                pg_cols = {r["column_name"] for r in cur.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_name = %s AND "
                    "table_schema = current_schema()", (table,)).fetchall()}
                missing = sorted(set(cols) - pg_cols)
                if missing:
                    raise MigrationRefused(f"PostgreSQL table {table} lacks columns {', '.join(missing)}")
                n = 0
                # COPY in text form: PostgreSQL parses the ISO times and JSON text SQLite stored.
                with cur.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as cp:
                    for row in src.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY rowid"):
                        cp.write_row(row)
                        n += 1
                copied[table] = n
                if "id" in cols:
                    cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                f"COALESCE(MAX(id), 0) + 1, false) FROM {table}")
            for table, n in copied.items():
                got = cur.execute(f"SELECT COUNT(*) AS n FROM {table}").fetchone()["n"]
                if got != n:
                    raise MigrationRefused(f"{table}: copied {n} rows, found {got}")
            return copied

        return target._run(copy)
    finally:
        if src.in_transaction:
            src.execute("ROLLBACK")
        src.close()
