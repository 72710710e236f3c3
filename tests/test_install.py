"""packaging/*.sh: wheels, the staged install and uninstall, and shellcheck. No network, seconds.

The full install (a venv at /opt/auris with every dependency from an index) needs root and the
network; docs/install.md describes the run that verified it. Here install.sh lays out everything
else under --root with --skip-venv, twice (idempotent), and uninstall.sh takes it away again.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import time
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
        "--no-prune",
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
    assert "prune-venv: 0.0 MB removed" in out  # no numpy, no onnxruntime here: nothing to prune
    assert "making it anew without" in out
    assert "without pandas" in out
    assert _installed(venv) == slim

    # A plain update: pip comes back for the run (--keep-pip: and stays).
    out = make("--keep-pip", "--no-prune")
    assert "prune-venv" not in out
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


# Meters a capture and scores its flows with the shipped models; says which numpy and onnxruntime did it.
_SCORE = """
import json, sys
from pathlib import Path

import numpy
import onnxruntime

from auris.agent.meter import meter_source
from auris.agent.scoring import load_models

if __name__ == "__main__":
    models, refused = load_models(Path(sys.argv[2]))
    assert not refused, refused
    flows = list(meter_source(sys.argv[1], models.feature_sets))
    rows = models.score([f.features for f in flows])
    scores = [[(s.model_id, s.score, s.anomalous, s.label) for s in row] for row in rows]
    print(json.dumps({"numpy": numpy.__file__, "onnxruntime": onnxruntime.__file__, "scores": scores}))
"""


def _score_with(site: Path | None, tmp_path: Path) -> dict[str, object]:
    script = tmp_path / "score.py"
    script.write_text(_SCORE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if site is not None:
        env["PYTHONPATH"] = str(site)  # ahead of this venv's site-packages
    pcap = REPO / "tests" / "data" / "pcaps" / "nmap_nmap_80_w_service_detection.pcap"
    done = subprocess.run(
        [sys.executable, str(script), str(pcap), str(REPO / "models")],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def _prune(site: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PACKAGING / "prune-venv.py"), "--site", str(site), *options],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _copy_numpy_and_onnxruntime(site: Path) -> None:
    """Copies of this venv's numpy and onnxruntime (with numpy.libs and both dist-info folders)."""
    here = Path(sysconfig.get_paths()["platlib"])
    site.mkdir()
    for dist in ("numpy", "onnxruntime"):
        info = importlib.metadata.distribution(dist)
        folder = Path(str(info.locate_file(""))) / f"{dist}-{info.version}.dist-info"
        for entry in [here / dist, folder, *here.glob(f"{dist}.libs")]:
            shutil.copytree(entry, site / entry.name, symlinks=True)


def _records(site: Path) -> dict[str, Path]:
    return {
        d: site / f"{d}-{importlib.metadata.version(d)}.dist-info" / "RECORD"
        for d in ("numpy", "onnxruntime")
    }


def _consistent(site: Path) -> None:
    """Every file RECORD lists exists, and no moved-aside folder is left."""
    for dist, record in _records(site).items():
        listed = [line.split(",")[0] for line in record.read_text(encoding="utf-8").splitlines()]
        assert all((site / path).exists() or path.startswith("../") for path in listed), dist
    assert not list(site.glob(".pruning-*"))


def test_prune_venv_removes_what_the_agent_never_runs_and_it_scores_the_same(tmp_path: Path) -> None:
    """Copies of this venv's numpy and onnxruntime, pruned as make-venv.sh prunes an install: a real
    capture's flows get exactly the scores the complete packages give them."""
    site = tmp_path / "site-packages"
    _copy_numpy_and_onnxruntime(site)
    library = next(site.glob("onnxruntime/capi/libonnxruntime.so.*"))
    records = _records(site)
    before = {d: r.read_text() for d, r in records.items()}

    dry = _prune(site, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would be removed (dry run)" in dry.stdout
    assert library.exists()
    assert {d: r.read_text() for d, r in records.items()} == before

    # As a run killed after moving files aside would have left it: the next run puts them back first.
    left = site / ".pruning-killed" / "numpy" / "tests" / "__init__.py"
    left.parent.mkdir(parents=True)
    os.replace(site / "numpy" / "tests" / "__init__.py", left)

    done = _prune(site)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "prune-venv: put back 1 files that an interrupted run had moved aside"
    assert lines[-1].endswith("MB removed; numpy and onnxruntime still run a model")
    assert float(lines[-1].split()[1]) > 40  # the C API library alone is 28 MB in onnxruntime 1.31
    assert not library.exists()
    assert not list(site.glob("numpy/**/tests"))
    for tooling in ("transformers", "quantization", "tools"):
        assert not (site / "onnxruntime" / tooling).exists()
    _consistent(site)
    for dist, record in records.items():
        assert len(record.read_text().splitlines()) < len(before[dist].splitlines()), dist

    pruned = _score_with(site, tmp_path)
    assert str(pruned["numpy"]).startswith(str(site))
    assert str(pruned["onnxruntime"]).startswith(str(site))
    complete = _score_with(None, tmp_path)
    assert not str(complete["onnxruntime"]).startswith(str(site))
    assert pruned["scores"] == complete["scores"]
    assert isinstance(complete["scores"], list)
    assert len(complete["scores"]) > 0

    # A run killed after rewriting RECORD, before deleting what it moved aside: those files stay gone.
    done_aside = site / ".pruning-late" / "numpy" / "tests" / "test_gone.py"
    done_aside.parent.mkdir(parents=True)
    done_aside.write_text("# pruned\n")
    again = _prune(site)
    assert again.returncode == 0
    assert again.stdout.splitlines() == ["prune-venv: 0.0 MB removed"]
    assert not (site / "numpy" / "tests").exists()
    _consistent(site)


def test_prune_venv_stopped_by_sigterm_leaves_a_venv_the_next_run_completes(tmp_path: Path) -> None:
    """SIGTERM while the pruned packages are being checked (an install cut off): the files go back;
    wherever it lands, the next run ends with a pruned venv whose RECORDs match its files."""
    site = tmp_path / "site-packages"
    _copy_numpy_and_onnxruntime(site)
    library = next(site.glob("onnxruntime/capi/libonnxruntime.so.*"))
    run = subprocess.Popen(
        [sys.executable, str(PACKAGING / "prune-venv.py"), "--site", str(site)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not list(site.glob(".pruning-*")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    run.send_signal(signal.SIGTERM)
    out, err = run.communicate(timeout=120)
    if run.returncode == 1:  # stopped: everything is back
        assert "prune-venv: nothing removed: stopped by signal 15" in err
        assert library.exists()
        _consistent(site)
    else:
        assert run.returncode in (0, -signal.SIGTERM), out + err

    done = _prune(site)
    assert done.returncode == 0, done.stderr
    assert not library.exists()
    assert not list(site.glob("numpy/**/tests"))
    _consistent(site)


def test_prune_venv_puts_everything_back_when_the_check_fails(tmp_path: Path) -> None:
    """Stand-ins named numpy and onnxruntime cannot run a model: nothing is removed."""
    site = tmp_path / "site-packages"
    files = {
        "numpy": ["numpy/__init__.py", "numpy/_core/tests/test_a.py", "numpy/tests/__init__.py"],
        "onnxruntime": ["onnxruntime/__init__.py", "onnxruntime/capi/libonnxruntime.so.1.0.0"],
    }
    for dist, paths in files.items():
        info = site / f"{dist}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        for path in paths:
            (site / path).parent.mkdir(parents=True, exist_ok=True)
            (site / path).write_text("# stand-in\n")
        listed = [*paths, f"{info.name}/METADATA", f"{info.name}/RECORD"]
        (info / "RECORD").write_text("".join(f"{p},,\n" for p in listed))
    before = {p: p.read_text() for p in site.rglob("*") if p.is_file()}

    done = _prune(site)
    assert done.returncode == 1
    assert (
        "prune-venv: nothing removed: numpy and onnxruntime no longer run without those files" in done.stderr
    )
    assert {p: p.read_text() for p in site.rglob("*") if p.is_file()} == before
    assert not list(site.glob(".pruning-*"))
