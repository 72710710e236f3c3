"""packaging/*.sh: wheels, the staged install and uninstall, and shellcheck. No network, seconds.

The full install (a venv at /opt/auris with every dependency from an index) needs root and the
network; docs/install.md describes the run that verified it. Here install.sh lays out everything
else under --root with --skip-venv, twice (idempotent), and uninstall.sh takes it away again.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from auris.agent.config import load_agent_config
from auris.collector.config import load_collector_config
from tests.conftest import REPO

PACKAGING = REPO / "packaging"
SCRIPTS = sorted(PACKAGING.glob("*.sh"))


def _run(script: str, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["bash", str(PACKAGING / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_build_wheels_builds_one_complete_wheel(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", reason="--no-isolation builds with this environment's setuptools")
    had_build_dir = (REPO / "build").exists()
    result = subprocess.run(
        ["bash", str(PACKAGING / "build-wheels.sh"), "--out", str(tmp_path), "--no-isolation"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr
    wheel = Path(result.stdout.strip())
    assert wheel.parent == tmp_path
    assert wheel.name.startswith("auris-")
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    for module in ("agent/cli.py", "collector/cli.py", "v1/agent_service_pb2.py", "agent/py.typed"):
        assert f"auris/{module}" in names, module
    for script in ("auris-agent", "auris-collector", "aurisctl"):
        assert f"{script} = " in entry_points
    # Built from a clean copy: no tests, no stray build output, nothing outside the auris package.
    assert all(n.startswith(("auris/", "auris-")) for n in names), sorted(names)
    assert (REPO / "build").exists() == had_build_dir, "the build must not leave build/ in the checkout"


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    _run("install.sh", "--root", root, "--agent", "--collector", "--skip-venv")
    return root


def test_staged_install_lays_out_units_config_models_and_state(staged: Path) -> None:
    root = staged
    etc = root / "etc" / "auris"
    assert _tree(root) >= {
        "etc/auris/agent.toml",
        "etc/auris/collector.toml",
        "etc/auris/aurisctl.toml",
        "etc/systemd/system/auris-agent.service",
        "etc/systemd/system/auris-collector.service",
        "opt/auris/models/nfstream-rf.manifest.json",
        "opt/auris/models/nfstream-rf.onnx",
        "var/lib/auris-agent",
        "var/lib/auris-collector",
    }
    assert not (root / "opt" / "auris" / "venv").exists()  # --skip-venv
    assert not (root / "opt" / "auris" / "models" / "candidates").exists()  # shipped models only
    for name in ("agent", "collector"):
        unit = root / "etc" / "systemd" / "system" / f"auris-{name}.service"
        assert unit.read_text() == (PACKAGING / "systemd" / f"auris-{name}.service").read_text()
        assert _mode(unit) == 0o644
        assert _mode(root / "var" / "lib" / f"auris-{name}") == 0o750
    assert _mode(etc) == 0o750
    assert {_mode(p) for p in etc.iterdir()} == {0o640}

    # The configuration is the sample, with the models where this install put them.
    agent = load_agent_config(etc / "agent.toml")
    assert agent.models_dir == "/opt/auris/models"
    assert agent.state_dir == "/var/lib/auris-agent"
    sample = (PACKAGING / "agent.toml").read_text().splitlines()
    installed = (etc / "agent.toml").read_text().splitlines()
    assert [a for a, b in zip(sample, installed, strict=True) if a != b] == [
        line for line in sample if line.startswith("models_dir =")
    ]
    assert (etc / "collector.toml").read_text() == (PACKAGING / "collector.toml").read_text()
    assert load_collector_config(etc / "collector.toml").db.startswith("/var/lib/auris-collector/")


def test_install_is_idempotent_and_never_overwrites_configuration(staged: Path) -> None:
    root = staged
    agent_toml = root / "etc" / "auris" / "agent.toml"
    unit = root / "etc" / "systemd" / "system" / "auris-agent.service"
    agent_toml.write_text(agent_toml.read_text().replace('log_level = "info"', 'log_level = "debug"'))
    operator_config = agent_toml.read_text()
    unit.write_text("stale\n")
    (root / "opt" / "auris" / "models" / "old.onnx").write_text("old")
    before = _tree(root)

    result = _run("install.sh", "--root", root, "--agent", "--collector", "--skip-venv")
    assert "kept" in result.stdout
    assert agent_toml.read_text() == operator_config
    assert unit.read_text() == (PACKAGING / "systemd" / "auris-agent.service").read_text()
    # The models folder is the package's: replaced as a whole.
    assert _tree(root) == before - {"opt/auris/models/old.onnx"}


def test_install_with_a_prefix_moves_venv_paths_and_models(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _run("install.sh", "--root", root, "--agent", "--skip-venv", "--prefix", "/srv/auris")
    unit = (root / "etc" / "systemd" / "system" / "auris-agent.service").read_text()
    assert "ExecStart=/srv/auris/venv/bin/auris-agent --config /etc/auris/agent.toml" in unit
    assert "/opt/auris" not in unit
    assert (root / "srv" / "auris" / "models" / "nfstream-rf.onnx").exists()
    assert load_agent_config(root / "etc" / "auris" / "agent.toml").models_dir == "/srv/auris/models"
    assert not (root / "etc" / "auris" / "collector.toml").exists()
    assert not (root / "var" / "lib" / "auris-collector").exists()


def test_uninstall_keeps_configuration_and_state_unless_purged(staged: Path) -> None:
    root = staged
    (root / "var" / "lib" / "auris-agent" / "agent-id").write_text("host-1234\n")
    (root / "etc" / "auris" / "ca.pem").write_text("operator's certificate\n")

    _run("uninstall.sh", "--root", root, "--agent")
    assert not (root / "etc" / "systemd" / "system" / "auris-agent.service").exists()
    assert not (root / "opt" / "auris" / "models").exists()
    assert (root / "etc" / "systemd" / "system" / "auris-collector.service").exists()
    assert (root / "etc" / "auris" / "agent.toml").exists()
    assert (root / "var" / "lib" / "auris-agent" / "agent-id").exists()

    _run("uninstall.sh", "--root", root, "--purge")
    _run("uninstall.sh", "--root", root, "--purge")  # idempotent
    assert {path for path in _tree(root) if "auris" in path} == {"etc/auris", "etc/auris/ca.pem"}
    # What install.sh did not put there stays, and so does its folder.
    assert (root / "etc" / "auris" / "ca.pem").read_text() == "operator's certificate\n"
    assert not (root / "opt" / "auris").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "say what to install"),
        (("--agent", "--root", "{tmp}"), "--root needs --skip-venv"),
        (("--agent", "--prefix", "relative/path", "--root", "{tmp}", "--skip-venv"), "absolute path"),
        (("--agent", "--offline"), "--offline needs --wheel-dir"),
        (("--agent", "--bogus"), "unknown argument --bogus"),
    ],
)
def test_install_refuses_bad_arguments(tmp_path: Path, args: Sequence[str], message: str) -> None:
    result = _run("install.sh", *(a.replace("{tmp}", str(tmp_path)) for a in args), check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert not any(tmp_path.iterdir())


def test_scripts_parse() -> None:
    for path in SCRIPTS:
        subprocess.run(["bash", "-n", str(path)], check=True, timeout=30)
    for name in ("build-wheels.sh", "install.sh", "uninstall.sh", "measure-agent-venv.sh"):
        assert os.access(PACKAGING / name, os.X_OK), f"{name} is not executable"
        assert "usage:" in _run(name, "--help").stdout


def test_scripts_are_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian/Ubuntu: apt-get install shellcheck)")
    result = subprocess.run(
        [shellcheck, *map(str, SCRIPTS)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
