"""The three commands: --help, --version, --config, and one-line errors with documented exit codes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from auris.agent import __version__
from auris.agent.lean import PANDAS_MISSING
from auris.collector.client import CollectorClient, verdict_filter
from tests.conftest import MODELS, PCAPS, REPO, CollectorThread, bare_nfstream, run_cli

# (module, console script, arguments that make it load its configuration)
COMMANDS = [
    ("auris.agent", "auris-agent", ["--insecure", "--check-config"]),
    ("auris.collector", "auris-collector", ["--check-config", "serve", "--insecure"]),
    ("auris.collector.ctl", "aurisctl", ["--insecure", "verdicts"]),
]


@pytest.mark.parametrize(("module", "script", "args"), COMMANDS)
def test_help_and_version(module: str, script: str, args: list[str]) -> None:
    helped = run_cli(module, ["--help"])
    assert helped.returncode == 0
    assert "--config" in helped.stdout
    assert "Exit codes" in helped.stdout
    versioned = run_cli(module, ["--version"])
    assert versioned.returncode == 0
    assert versioned.stdout.strip() == f"{script} {__version__}"


@pytest.mark.parametrize(("module", "script", "args"), COMMANDS)
def test_console_scripts_installed(module: str, script: str, args: list[str]) -> None:
    assert (Path(sys.executable).parent / script).exists()


@pytest.mark.parametrize(("module", "script", "args"), COMMANDS)
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("this is = = not toml", "is not valid TOML"),
        ('no_such_option = "x"', "unknown key 'no_such_option'"),
        ("insecure = 3", "insecure: expected true or false"),
    ],
)
def test_bad_config_is_one_line(
    tmp_path: Path, module: str, script: str, args: list[str], content: str | None, message: str
) -> None:
    config = tmp_path / "missing.toml"
    if content is not None:
        config = tmp_path / "bad.toml"
        config.write_text(content + "\n")
    done = run_cli(module, ["--config", str(config), *args])
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{script}: ")
    assert message in lines[0]


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'insecure = true\npcaps = ["{PCAPS / "steam.pcap"}"]\nscore_batch = 32\n')
    done = run_cli("auris.agent", ["--config", str(config), "--check-config"])
    assert done.returncode == 0, done.stderr
    assert "configuration ok" in done.stdout


def test_environment_sits_between_file_and_flags(tmp_path: Path) -> None:
    from auris.agent.config import load_agent_config

    config = tmp_path / "agent.toml"
    config.write_text('insecure = true\ncollector = "127.0.0.1:1"\nscore_batch = 8\n')
    env = {"AURIS_AGENT_COLLECTOR": "127.0.0.1:2", "AURIS_AGENT_SCORE_BATCH": "16"}
    loaded = load_agent_config(config, {"collector": "127.0.0.1:3"}, environ=env)
    assert loaded.collector == "127.0.0.1:3"  # flag beats environment
    assert loaded.score_batch == 16  # environment beats file
    assert load_agent_config(config, environ={}).score_batch == 8


def test_tls_is_the_default() -> None:
    done = run_cli("auris.agent", ["--check-config"])
    assert done.returncode == 2
    assert "pass --insecure" in done.stderr


def test_insecure_refuses_non_loopback() -> None:
    served = run_cli("auris.collector", ["serve", "--insecure", "--listen", "0.0.0.0:0"])
    assert served.returncode == 2
    assert "non-loopback" in served.stderr
    queried = run_cli("auris.collector.ctl", ["--insecure", "--collector", "192.0.2.1:50051", "verdicts"])
    assert queried.returncode == 2
    assert "loopback" in queried.stderr


def test_agent_without_models_is_a_clear_error(tmp_path: Path) -> None:
    done = run_cli(
        "auris.agent",
        [
            "--insecure",
            "--models-dir",
            str(tmp_path),
            "--state-dir",
            str(tmp_path),
            "--pcap",
            str(PCAPS / "steam.pcap"),
        ],
    )
    assert done.returncode == 3
    assert "no usable model" in done.stderr


def test_aurisctl_unreachable_collector_exit_code() -> None:
    done = run_cli("auris.collector.ctl", ["--insecure", "--collector", "127.0.0.1:1", "verdicts"])
    assert done.returncode == 3
    assert done.stderr.startswith("aurisctl: UNAVAILABLE")
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("sample", "loader"),
    [
        ("agent.toml", "auris.agent.config:AgentConfig"),
        ("collector.toml", "auris.collector.config:CollectorConfig"),
        ("aurisctl.toml", "auris.collector.ctl:CtlConfig"),
    ],
)
def test_sample_configs_load_and_name_every_option(sample: str, loader: str) -> None:
    import dataclasses
    import importlib
    import tomllib
    import typing

    from auris.agent.config import build_config

    module, name = loader.split(":")
    cls = getattr(importlib.import_module(module), name)
    path = REPO / "packaging" / sample
    build_config(cls, path=path)
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    assert set(data) == {f.name for f in dataclasses.fields(cls)}
    # Lists of tables ([[alert_rules]]...): between them, their tables name every key.
    for field in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[field.name]
        element = typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else None
        if dataclasses.is_dataclass(element):
            named = {key for table in data[field.name] for key in table}
            assert named == {f.name for f in dataclasses.fields(element)}, field.name


def test_start_failures_are_one_line(tmp_path: Path) -> None:
    done = run_cli(
        "auris.collector", ["serve", "--insecure", "--listen", "127.0.0.1:0", "--db", str(tmp_path)]
    )
    assert done.returncode == 3
    assert "cannot start" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("since", ["99999999999d", "9999-12-31T23:59:59-01:00", "yesterday"])
def test_aurisctl_bad_times_are_usage_errors(since: str) -> None:
    done = run_cli("auris.collector.ctl", ["--insecure", "verdicts", "--since", since])
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "--since" in done.stderr


def test_two_agents_cannot_share_a_state_dir(tmp_path: Path) -> None:
    from auris.agent.state import lock_state_dir

    lock_state_dir(tmp_path)  # held by this process, as a running agent would
    done = run_cli(
        "auris.agent",
        [
            "--insecure",
            "--models-dir",
            str(REPO / "models"),
            "--state-dir",
            str(tmp_path),
            "--pcap",
            str(PCAPS / "steam.pcap"),
        ],
    )
    assert done.returncode == 2
    assert "another auris-agent is using this state directory" in done.stderr


def test_aurisctl_db_status_migrate_vacuum(tmp_path: Path) -> None:
    import json

    import sqlite_utils

    from auris.collector.store import MIGRATIONS, SCHEMA_VERSION, VerdictStore
    from tests.conftest import make_verdict

    path = tmp_path / "old.db"
    old = sqlite_utils.Database(path)
    MIGRATIONS[0](old)
    old.table("meta").insert({"key": "schema_version", "value": "1"}, pk="key")
    old.close()

    def ctl(*args: str) -> dict[str, object]:
        result = run_cli("auris.collector.ctl", ["db", *args, "--json"])
        assert result.returncode == 0, result.stderr
        report: dict[str, object] = json.loads(result.stdout)
        return report

    status = ctl("status", "--db", str(path))
    assert (status["schema_version"], status["latest_schema"], status["verdicts_rows"]) == (
        1,
        SCHEMA_VERSION,
        0,
    )
    config = tmp_path / "collector.toml"
    config.write_text(f'insecure = true\ndb = "{path}"\n')
    migrated = ctl("migrate", "--collector-config", str(config))
    assert (migrated["schema_version"], migrated["migrations_applied"]) == (
        SCHEMA_VERSION,
        SCHEMA_VERSION - 1,
    )

    store = VerdictStore(path)
    for first in range(1, 5001, 500):
        store.ingest("agent-1", [make_verdict(s) for s in range(first, first + 500)])
    store.retain(max_rows=10)
    store.close()
    vacuumed = ctl("vacuum", "--db", str(path))
    assert vacuumed["verdicts_rows"] == 10
    assert int(vacuumed["bytes_after"]) < int(vacuumed["bytes_before"]) / 2  # type: ignore[call-overload]

    missing = run_cli("auris.collector.ctl", ["db", "status", "--db", str(tmp_path / "none.db")])
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"aurisctl: no database at {tmp_path / 'none.db'}"
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    bad = run_cli("auris.collector.ctl", ["db", "status", "--db", str(garbage)])
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "not a usable SQLite database" in bad.stderr or "file is not a database" in bad.stderr


def test_collector_takes_config_before_or_after_serve(tmp_path: Path) -> None:
    for args in (["--config", "/nonexistent.toml", "serve"], ["serve", "--config", "/nonexistent.toml"]):
        done = run_cli("auris.collector", args)
        assert done.returncode == 2
        assert done.stderr.strip() == "auris-collector: config file /nonexistent.toml does not exist"


def test_an_unusable_ca_key_is_a_one_line_start_failure(tmp_path: Path) -> None:
    config = tmp_path / "collector.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\ndb = "{tmp_path / "c.db"}"\nca_file = "{tmp_path / "ca.pem"}"\n'
        f'cert_file = "{tmp_path / "c.pem"}"\nkey_file = "{tmp_path / "c.key"}"\n'
        f'ca_key_file = "{tmp_path / "ca.key"}"\n'
    )
    done = run_cli("auris.collector", ["--config", str(config), "serve"])
    assert done.returncode == 3
    assert "cannot start: cannot load the CA" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_agent_defers_pandas_and_nfstream_still_finds_it_when_asked() -> None:
    """auris.agent.lean keeps pandas out of the agent's processes (nfstream imports it for
    exporters the agent never calls); code that does use pandas gets the real module."""
    script = (
        "import sys\n"
        "import auris.agent.cli\n"
        "assert 'pandas.core' not in sys.modules, 'pandas was imported'\n"
        "from nfstream import NFStreamer\n"
        f"frame = NFStreamer(source={str(PCAPS / 'trickbot.pcap')!r}).to_pandas()\n"
        "import pandas\n"
        "assert isinstance(frame, pandas.DataFrame) and len(frame) > 0\n"
        "assert sys.modules['pandas'] is not None and 'pandas.core' in sys.modules\n"
        "print(len(frame))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) > 0


def _python_without(tmp_path: Path, *missing: str) -> tuple[list[str], dict[str, str]]:
    """A command line and environment for this interpreter as if ``missing`` were not installed.

    Its site-packages becomes a folder of links to everything else, on PYTHONPATH with this
    checkout; ``-S`` keeps the real one off sys.path (multiprocessing passes ``-S`` on to the
    forkserver it starts, and the environment too). Nothing else changes: same interpreter,
    same versions of every other package.
    """
    site = tmp_path / "site-packages"
    site.mkdir()
    pattern = re.compile(rf"({'|'.join(map(re.escape, missing))})([-.].*)?")
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not pattern.fullmatch(entry.name) and entry.suffix != ".pth":
            (site / entry.name).symlink_to(entry)
    path = [REPO / d for d in ("agent", "collector", "training", "proto")] + [REPO, site]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path))}
    env.pop("AURIS_AGENT_MODELS_DIR", None)
    return [sys.executable, "-S"], env


def test_the_agent_runs_without_pandas(
    collector: CollectorThread, client: CollectorClient, tmp_path: Path
) -> None:
    """The agent venv install.sh makes has no pandas: the agent, its forkserver and its meter
    processes import nfstream all the same, and verdicts come out. nfstream's to_pandas() says
    what is missing in one line; to_csv() needs no pandas."""
    python, env = _python_without(tmp_path, "pandas")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*python, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env, check=False
        )

    blocked = run("-c", "import pandas")
    assert blocked.returncode == 1
    assert "ModuleNotFoundError: No module named 'pandas'" in blocked.stderr

    pcap = PCAPS / "nmap_nmap_80_w_service_detection.pcap"
    agent = run(
        "-m", "auris.agent", "--collector", collector.address, "--insecure", "--models-dir", str(MODELS),
        "--state-dir", str(tmp_path / "agent"), "--pcap", str(pcap),
    )  # fmt: skip
    assert agent.returncode == 0, agent.stderr
    stored = list(client.query(verdict_filter()))
    assert len(stored) == sum(1 for _ in bare_nfstream(pcap)) > 0
    assert all(s.verdict.capture_source == pcap.name for s in stored)
    assert all(  # both default models
        sorted(m.model.model_id for m in s.verdict.scores) == ["nfstream-ae", "nfstream-rf"] for s in stored
    )
    assert any(s.verdict.anomalous for s in stored)  # an nmap service scan: the model flags most of it

    # The meter's forkserver preloads lean itself, for programs other than the agent's CLI too.
    metered = run(
        "-c",
        "from auris.agent.features import NFSTREAM\n"
        "from auris.agent.meter import meter_source\n"
        f"print(sum(1 for _ in meter_source({str(pcap)!r}, [NFSTREAM])))\n",
    )
    assert metered.returncode == 0, metered.stderr
    assert metered.stdout.split() == [str(len(stored))]

    exporters = run(
        "-c",
        "import auris.agent.lean\n"
        "from nfstream import NFStreamer\n"
        f"print(NFStreamer(source={str(pcap)!r}).to_csv(path='flows.csv'))\n"
        f"NFStreamer(source={str(pcap)!r}).to_pandas()\n",
    )
    assert exporters.returncode == 1
    assert exporters.stdout.split() == [str(len(stored))]
    assert exporters.stderr.strip().splitlines()[-1] == f"ModuleNotFoundError: {PANDAS_MISSING}"
    # It fails before metering anything: no half-written temporary CSV file left behind.
    assert sorted(p.name for p in tmp_path.glob("*.csv")) == ["flows.csv"]
