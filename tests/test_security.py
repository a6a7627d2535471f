"""Security hardening (issue 16): one test (or a few) per item, against real parts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=120)


# -- item 9: the sandbox's dependencies are an extra -------------------------------------

_BLOCK_SANDBOX_DEPS = """
import sys
for name in ("moto", "werkzeug", "flask"):
    sys.modules[name] = None  # `import moto` now raises ModuleNotFoundError, as without the extra
"""


def test_run_sandbox_without_extra_exits_2_naming_the_extra(tmp_path):
    r = _python(_BLOCK_SANDBOX_DEPS + """
from filex_agent.cli import main
sys.exit(main(["run", "--sandbox", "--data-dir", sys.argv[1]]))
""", str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert "filex-agent[sandbox]" in r.stderr
    assert "Traceback" not in r.stderr


def test_production_modules_import_without_sandbox_deps():
    # Every module but the sandbox (and the CLI's lazy sandbox import) works without moto.
    r = _python(_BLOCK_SANDBOX_DEPS + """
import importlib, pkgutil, filex_agent
for m in pkgutil.walk_packages(filex_agent.__path__, "filex_agent."):
    if not m.name.startswith(("filex_agent.sandbox", "filex_agent.__main__")):
        importlib.import_module(m.name)
print("ok")
""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_moto_is_not_a_runtime_dependency():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any(d.startswith("moto") for d in meta["project"]["dependencies"])
    assert any(d.startswith("moto") for d in meta["project"]["optional-dependencies"]["sandbox"])
    assert meta["project"]["license"] == "Apache-2.0"  # item 13: SPDX string, no deprecation banner


# -- item 5: a hostile name cannot forge a log line --------------------------------------

FORGED = "report\n2026-01-01T00:00:00.000Z INFO filex_agent.submitter: forged\r\x1b[2K.csv"


@pytest.fixture
def text_log():
    import io
    import logging

    from filex_agent.logging_setup import configure_logging

    stream = io.StringIO()
    configure_logging("INFO", "text", stream=stream)
    yield stream
    logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers
                                       if not getattr(h, "_filex_handler", False)]


def test_text_log_escapes_control_characters_in_names(tmp_path, text_log):
    import logging

    path = tmp_path / FORGED
    path.write_bytes(b"x")  # a real file with that name exists in the outbox
    log = logging.getLogger("filex_agent.submitter")
    log.info("claimed %s", path, extra={"file": path.name})
    lines = text_log.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert "\x1b" not in lines[0] and "\r" not in lines[0]
    assert "report\\n2026-01-01T00:00:00.000Z INFO filex_agent.submitter: forged\\r\\x1b[2K.csv" in lines[0]


def test_traceback_lines_cannot_pass_for_records(text_log):
    import logging

    try:
        raise OSError(f"cannot read {FORGED}")
    except OSError:
        logging.getLogger("filex_agent.x").exception("upload of %s failed", FORGED)
    lines = text_log.getvalue().splitlines()
    assert lines[0].startswith(tuple("0123456789")) and "forged" in lines[0]
    # Every further line is the traceback, indented: none starts like a record.
    assert len(lines) > 1 and all(line.startswith(" ") for line in lines[1:])
    assert not any("\x1b" in line or "\r" in line for line in lines)
