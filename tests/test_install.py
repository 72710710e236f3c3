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
import tomllib
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
    _run(
        "install.sh",
        "--root",
        root,
        "--agent",
        "--skip-venv",
        "--prefix",
        "/srv/auris",
        "--with-pandas",
        "--keep-pip",
    )
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
    for name in ("build-wheels.sh", "install.sh", "uninstall.sh", "make-venv.sh", "measure-agent-venv.sh"):
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


# -- the venv (make-venv.sh, venv-requirements.py) ----------------------------------------------


def _requirements(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(PACKAGING / "venv-requirements.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.splitlines()


def test_requirements_come_from_the_installed_metadata() -> None:
    """The agent venv's requirement list is pyproject's, read back from the installed metadata."""
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    agent = project["dependencies"] + project["optional-dependencies"]["agent"]
    pinned = {str(Requirement(r)) for r in agent}
    assert set(_requirements("of", "auris", "agent")) == pinned
    nfstream = [r for r in pinned if r.startswith("nfstream")]
    assert _requirements("of", "auris", "agent", "--only", "nfstream") == nfstream
    assert set(_requirements("of", "auris", "agent", "--without", "nfstream")) == pinned - set(nfstream)
    # Through the training extra's auris[agent], as pip would.
    assert set(_requirements("of", "auris", "training")) >= pinned

    theirs = _requirements("of", "nfstream", "--without", "pandas")
    assert {Requirement(r).name for r in theirs} == {"cffi", "psutil", "dpkt", "numpy"}
    assert any(line.startswith("nfstream ") for line in _requirements("needing", "pandas"))
    missing = subprocess.run(
        [sys.executable, str(PACKAGING / "venv-requirements.py"), "of", "no-such-dist"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2
    assert missing.stderr == "venv-requirements.py: no-such-dist is not installed\n"


def _wheel(folder: Path, name: str, version: str, *requires: str) -> Path:
    """A minimal wheel holding one module named after the distribution."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Provides-Extra: {e}\n" for e in ("agent", "collector") if name == "auris")
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{name}.py": "",
        f"{info}/METADATA": metadata,
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as zf:
        for member, text in files.items():
            zf.writestr(member, text)
    return path


def _installed(venv: Path) -> set[str]:
    code = "import importlib.metadata as m; print(*sorted(d.metadata['Name'] for d in m.distributions()))"
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return set(out.stdout.split())


def test_make_venv_leaves_out_pandas_and_pip_and_updates_in_place(tmp_path: Path) -> None:
    """make-venv.sh against a wheel folder of stand-ins for auris, nfstream, pandas and the rest
    (no package index): the real pip, venv and ensurepip do the work."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    auris = _wheel(
        wheels, "auris", "0.1.0", "contract==1.0",
        'nfstream==6.6.0; extra == "agent"', 'numeric>=2.0; extra == "agent"',
        'storage==1.0; extra == "collector"',
    )  # fmt: skip
    _wheel(
        wheels, "nfstream", "6.6.0", "numeric>=1.19", "packets>=1.0",
        'pandas>=1.1.5; implementation_name != "pypy"', 'pandas<3; implementation_name == "pypy"',
    )  # fmt: skip
    _wheel(wheels, "pandas", "3.1.1", "numeric>=1.0", "zones")
    for name in ("contract", "numeric", "packets", "storage", "zones"):
        _wheel(wheels, name, "2.1" if name == "numeric" else "1.0")
    # Only that folder: neither a pip configuration nor PIP_* variables of this machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    venv = tmp_path / "venv"

    def make(*options: str) -> str:
        done = subprocess.run(
            ["bash", str(PACKAGING / "make-venv.sh"), "--venv", str(venv), "--wheel", str(auris),
             "--extras", "agent", "--find-links", str(wheels), "--offline", "--python", sys.executable,
             *options],
            capture_output=True, text=True, timeout=120, env=env, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    slim = {"auris", "nfstream", "contract", "numeric", "packets"}
    out = make("--with-pandas")
    assert "created the venv" in out
    assert _installed(venv) == slim | {"pandas", "zones"}
    assert not list((venv / "bin").glob("pip*"))  # removed after installing

    # An update without --with-pandas makes the venv anew without it (no stale dependency of
    # it left behind; no pip needed to decide).
    out = make()
    assert "making it anew without" in out
    assert "without pandas" in out
    assert _installed(venv) == slim

    # A plain update: pip comes back for the run (--keep-pip: and stays).
    out = make("--keep-pip")
    assert "brought pip back with ensurepip" in out
    assert "removed pip" not in out
    assert _installed(venv) - {"pip", "setuptools"} == slim
    assert "pip" in _installed(venv)


def test_make_venv_refuses_bad_arguments(tmp_path: Path) -> None:
    wheel = tmp_path / "auris-0.1.0-py3-none-any.whl"
    for args, message in [
        ((), "--venv, --wheel and --extras are required"),
        (("--venv", tmp_path / "v", "--wheel", wheel, "--extras", "agent"), "no wheel at"),
        (("--venv", tmp_path / "v", "--wheel", wheel, "--extras", "Agent;rm"), "--extras takes names"),
        (("--bogus",), "unknown argument --bogus"),
    ]:
        result = _run("make-venv.sh", *args, check=False)
        assert result.returncode == 2, args
        assert message in result.stderr, result.stderr
    assert not (tmp_path / "v").exists()
