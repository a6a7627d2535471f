"""A bad config names the key and exits 2; secrets are references, never values."""

import subprocess
import sys
from pathlib import Path

import pytest

from filex_agent.config import ConfigError, SecretRef, load_config, parse_config, valid_remote_name

BASE = {"agent": {"data_dir": "/tmp/filex-test"},
        "credentials": {"main": {"client_id": "acme", "client_secret": "env:FILEX_SECRET"}},
        "routes": [{"name": "r1", "outbox": "/tmp/out1", "org": "0001", "application": "app1",
                    "credential": "main"}]}


def _with(path: str, value):
    import copy

    data = copy.deepcopy(BASE)
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    last = keys[-1]
    if value is KeyError:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return data


@pytest.mark.parametrize("path,value,key,words", [
    ("routes.0.org", 1, "routes[0].org", "quoted string"),
    ("routes.0.org", "00A1", "routes[0].org", "digits"),
    ("routes.0.application", "app-1", "routes[0].application", "letters and digits"),
    ("routes.0.credential", "nope", "routes[0].credential", "no [credentials.nope]"),
    ("routes.0.transport", "ftp", "routes[0].transport", ""),
    ("credentials.main.client_secret", "hunter2", "credentials.main.client_secret", "reference"),
    ("agent.data_dir", KeyError, "agent.data_dir", "required"),
    ("agent.surprise", 1, "agent.surprise", "unknown key"),
    ("routes.0.stable_seconds", -1, "routes[0].stable_seconds", ""),
])
def test_bad_values_name_the_key(path, value, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config(_with(path, value))
    assert e.value.key == key
    assert words.lower() in str(e.value).lower()


def test_inline_secret_is_not_echoed():
    with pytest.raises(ConfigError) as e:
        parse_config(_with("credentials.main.client_secret", "s3cr3t-value"))
    assert "s3cr3t-value" not in str(e.value)


def test_custom_environment_needs_urls():
    with pytest.raises(ConfigError) as e:
        parse_config(_with("environment", {"name": "custom"}))
    assert e.value.key == "environment.fip_token_url"


def test_duplicate_outbox_and_route_names():
    data = _with("routes", BASE["routes"] * 2)
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert e.value.key == "routes[1].name"


def test_production_and_qa_defaults():
    cfg = parse_config(BASE)
    assert cfg.environment.api_base_url == "https://filex.finra.org"
    assert cfg.environment.sftp_host == "filex.finra.org"
    qa = parse_config(_with("environment", {"name": "qa"}))
    assert qa.environment.api_base_url == "https://filex-int.qa.finra.org"
    assert qa.environment.sftp_host == "filex.ct.finra.org"
    over = parse_config(_with("environment", {"name": "qa", "api_base_url": "https://proxy.example"}))
    assert over.environment.api_base_url == "https://proxy.example"


def test_secret_refs_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("FILEX_SECRET", "from-env")
    assert SecretRef("env:FILEX_SECRET").resolve() == "from-env"
    (tmp_path / "s").write_text("from-file\n")
    assert SecretRef(f"file:{tmp_path / 's'}").resolve() == "from-file"
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert SecretRef("systemd:s").resolve() == "from-file"
    monkeypatch.delenv("FILEX_SECRET")
    with pytest.raises(ConfigError, match="FILEX_SECRET is not set"):
        SecretRef("env:FILEX_SECRET").resolve()


def test_relative_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "c.toml").write_text(
        '[agent]\ndata_dir = "data"\n[credentials.m]\nclient_id = "a"\nclient_secret = "env:X"\n'
        '[[routes]]\nname = "r"\noutbox = "out"\norg = "0001"\napplication = "a"\ncredential = "m"\n')
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.agent.data_dir == tmp_path / "data"
    assert cfg.routes[0].outbox == tmp_path / "out"


def test_file_name_rules():
    assert valid_remote_name("FOCUS_0001-2026.csv") is None
    assert valid_remote_name("a!@,&-='_.:x") is None
    assert "#" in valid_remote_name("bad#name.txt")
    assert valid_remote_name("with space.txt")
    assert valid_remote_name("ünïcode.txt")


def test_route_patterns():
    r = parse_config(_with("routes.0.include", ["*.csv"])).routes[0]
    assert r.wants("a.csv") and not r.wants("a.txt") and not r.wants(".a.csv") and not r.wants("a.csv.tmp")


def test_cli_bad_config_exits_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[agent]\ndata_dir = "d"\n[[routes]]\nname = "r"\noutbox = "o"\norg = 7\napplication = "a"\ncredential = "m"\n')
    proc = subprocess.run([sys.executable, "-m", "filex_agent", "routes", "--config", str(bad)],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2
    assert "routes[0].org" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "filex_agent", "routes", "--config", str(tmp_path / "missing.toml")],
                          capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 2 and "cannot read" in proc.stderr


def test_example_config_is_valid(monkeypatch):
    cfg = load_config(Path(__file__).parents[1] / "config" / "filex-agent.example.toml")
    assert cfg.routes, "the example documents at least one route"
    assert [e.recurrence for e in cfg.expectations] == ["business_day", "quarter_end", "days_of_month"]
    assert cfg.routes[0].submission_window is not None


@pytest.mark.parametrize("journal,key,words", [
    ({"url": "postgresql://filex:hunter2@db.example.com/filex"}, "journal.url", "contains a password"),
    ({"url": "postgresql://filex@db.example.com/filex?password=hunter2"}, "journal.url", "contains a password"),
    ({"url": "mysql://filex@db/filex"}, "journal.url", "postgresql://"),
    ({"url": "postgresql://filex@db.example.com"}, "journal.url", "database name"),
    ({"url": "sqlite:/j.db"}, "journal.url", "sqlite:///PATH"),
    ({"url": "postgresql://filex@db/filex", "password": "hunter2"}, "journal.password", "reference"),
    ({"password": "env:X"}, "journal.password", "only for a postgresql"),
    ({"url": "postgresql://filex@db/filex", "sslrootcert": "/ca.pem"}, "journal.sslmode", "verify-full"),
    ({"node_name": "a:b"}, "journal.node_name", "letters"),
    ({"lease_seconds": 0}, "journal.lease_seconds", ""),
])
def test_bad_journal_settings_name_the_key_and_never_echo_a_password(journal, key, words):
    with pytest.raises(ConfigError) as e:
        parse_config(_with("journal", journal))
    assert e.value.key == key
    assert words.lower() in str(e.value).lower()
    assert "hunter2" not in str(e.value)


def test_journal_defaults_and_choices(tmp_path):
    import socket

    cfg = parse_config(BASE)
    assert not cfg.journal.is_postgres and cfg.journal_path == Path("/tmp/filex-test/journal.sqlite3")
    assert cfg.journal.lease_seconds == 30 and cfg.journal.node_name == socket.gethostname().split(".")[0]
    cfg = parse_config(_with("journal", {"url": "sqlite:///j/journal.db"}), base_dir=tmp_path)
    assert cfg.journal_path == tmp_path / "j" / "journal.db"
    cfg = parse_config(_with("journal", {"url": "postgresql://filex@db.example.com:5433/filex",
                                         "password": "systemd:journal-password", "sslmode": "verify-full",
                                         "sslrootcert": "ca.pem", "node_name": "node-b", "lease_seconds": 12}),
                       base_dir=tmp_path)
    assert cfg.journal.is_postgres and cfg.journal.sslrootcert == tmp_path / "ca.pem"
    assert cfg.journal.node_name == "node-b" and cfg.journal.lease_seconds == 12


def test_open_store_chooses_the_configured_journal(tmp_path, pg_server, pg_url, monkeypatch):
    from filex_agent.store import open_store
    from filex_agent.store.postgres import PostgresStore
    from filex_agent.store.sqlite import SQLiteStore

    st = open_store(tmp_path / "x.db", journal=parse_config(BASE).journal)
    assert isinstance(st, SQLiteStore) and st.path == tmp_path / "x.db"
    st.close()
    monkeypatch.setenv("FILEX_JOURNAL_PW", pg_server.password)
    cfg = parse_config(_with("journal", {"url": pg_url, "password": "env:FILEX_JOURNAL_PW", "sslmode": "disable"}))
    st = open_store(cfg.journal_path, journal=cfg.journal)
    try:
        assert isinstance(st, PostgresStore) and st.schema_version() >= 3
    finally:
        st.close()
