"""The agent stays small: its import graph and its install never reach collector, training or ML trainers."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO

FORBIDDEN_MODULES = ("auris.collector", "auris.training", "torch", "sklearn", "skl2onnx", "sqlite_utils")
FORBIDDEN_DISTRIBUTIONS = {"torch", "scikit-learn", "skl2onnx", "sqlite-utils"}


def test_agent_import_graph_stays_in_its_lane() -> None:
    """Import every agent module in a fresh interpreter and list what got loaded."""
    code = (
        "import importlib, pkgutil, sys, auris.agent\n"
        "for m in pkgutil.walk_packages(auris.agent.__path__, 'auris.agent.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/"
    ).stdout
    loaded = set(out.split())
    assert {"auris.agent.cli", "auris.agent.uplink", "onnxruntime", "nfstream", "grpc"} <= loaded
    leaked = sorted(m for m in loaded if m.startswith(FORBIDDEN_MODULES))
    assert not leaked, leaked


def test_agent_sources_import_nothing_forbidden() -> None:
    """A static check too, so a lazy import inside a function cannot hide."""
    offenders = []
    for path in (REPO / "agent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(FORBIDDEN_MODULES)]
    assert not offenders


def _imported(node: ast.stmt) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return []


def test_agent_modules_import_lean_before_nfstream() -> None:
    """nfstream imports pandas, which the agent venv does not hold: every agent module that imports
    nfstream must import auris.agent.lean before it (tests/test_cli.py runs the agent without pandas)."""
    offenders = []
    importers = []
    for path in sorted((REPO / "agent").rglob("*.py")):
        if path.name == "lean.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        lean_at = nfstream_at = None
        for node in ast.walk(tree):
            names = _imported(node) if isinstance(node, ast.stmt) else []
            line = getattr(node, "lineno", 0)
            if "auris.agent.lean" in names and node in tree.body:
                lean_at = min(lean_at or line, line)
            if any(n.split(".")[0] in ("nfstream", "_lib_engine") for n in names):
                nfstream_at = min(nfstream_at or line, line)
        if nfstream_at is not None:
            importers.append(path.name)
            if lean_at is None or lean_at > nfstream_at:
                offenders.append(path.name)
    assert {"meter.py", "live.py", "cicflowmeter.py"} <= set(importers)
    assert not offenders


def _project_requirements() -> list[str]:
    """This checkout's requirements as metadata states them (an installed copy may be older)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    out = list(project["dependencies"])
    for extra, requirements in project["optional-dependencies"].items():
        for text in requirements:
            req = Requirement(text)
            marker = f'extra == "{extra}"' + (f" and ({req.marker})" if req.marker else "")
            req.marker = None
            out.append(f"{req}; {marker}")
    return out


_PROJECT = _project_requirements()


def _closure(name: str, extras: frozenset[str], without: frozenset[str] = frozenset()) -> set[str]:
    """Installed distributions that ``pip install name[extras]`` pulls in, transitively, leaving
    out those named in ``without`` (and what only they pull in)."""
    seen: set[str] = set()
    todo = [(name, extras)]
    while todo:
        dist_name, dist_extras = todo.pop()
        key = re.sub(r"[-_.]+", "-", dist_name).lower()
        if (key in seen and not dist_extras) or key in without:
            continue
        seen.add(key)
        try:
            requirements = _PROJECT if key == "auris" else distribution(dist_name).requires or []
        except PackageNotFoundError:
            continue  # an optional platform dependency not installed here
        for text in requirements:
            req = Requirement(text)
            environments = [{"extra": e} for e in dist_extras] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                todo.append((req.name, frozenset(req.extras)))
    return seen


def test_agent_extra_pulls_no_trainers() -> None:
    agent = _closure("auris", frozenset({"agent"}))
    assert {"onnxruntime", "numpy", "grpcio", "protobuf", "nfstream"} <= agent
    assert not agent & FORBIDDEN_DISTRIBUTIONS, agent & FORBIDDEN_DISTRIBUTIONS
    # The check can fail: the training extra does pull scikit-learn.
    assert "scikit-learn" in _closure("auris", frozenset({"training"}))


def _site_of(folder: Path, dists: set[str]) -> Path:
    """A site-packages folder of links to the installed files of ``dists`` and nothing else."""
    folder.mkdir()
    for name in dists:
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # an optional platform dependency not installed here
        for top in {f.parts[0] for f in dist.files or []}:
            target = Path(str(dist.locate_file(top)))
            if top not in ("..", "__pycache__") and not top.endswith(".pth") and target.exists():
                link = folder / top
                if not link.exists():
                    link.symlink_to(target)
    return folder


@pytest.mark.parametrize(
    ("extra", "without", "modules"),
    [
        # As install.sh installs them: no pandas (auris.agent.lean).
        ("agent", {"pandas"}, ["auris.agent.cli"]),
        ("collector", {"pandas"}, ["auris.collector.cli", "auris.collector.server", "auris.collector.ctl"]),
    ],
)
def test_each_component_imports_with_only_its_extra_installed(
    tmp_path: Path, extra: str, without: set[str], modules: list[str]
) -> None:
    """An install of one component holds its extra's dependencies only: its programs must import
    with nothing else on the path (this interpreter with -S, a site-packages of links)."""
    site = _site_of(tmp_path / "site", _closure("auris", frozenset({extra}), frozenset(without)) - {"auris"})
    path = [REPO / d for d in ("agent", "collector", "training", "proto")] + [REPO, site]
    done = subprocess.run(
        [sys.executable, "-S", "-c", "".join(f"import {m}\n" for m in modules)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path))},
        check=False,
    )
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]
    blocked = subprocess.run(
        [sys.executable, "-S", "-c", "import torch"],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(map(str, path))},
        timeout=60,
        check=False,
    )
    assert blocked.returncode == 1  # the check can fail: what the extra lacks is not there


def test_no_generic_import_packages() -> None:
    """Generated code lives in auris.v1, never in a top-level 'proto' package."""
    assert not (REPO / "proto" / "__init__.py").exists()
    tops = {p.name for p in (REPO / "proto").iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    assert tops == {"auris"}


# -- systemd units (packaging/systemd) ------------------------------------------------------------

UNITS = REPO / "packaging" / "systemd"
INSTALLED_VENV_BIN = "/opt/auris/venv/bin/"


def _parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections of a unit file, each key with all its values in order (systemd allows repeats).

    The configparser idea with strict=False, but systemd's own syntax: '#' and ';' comments,
    a trailing backslash continues a line, and an empty assignment resets the list.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    for line in logical:
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {line!r} is not key=value"
        values = current.setdefault(key.strip(), [])
        if value.strip():
            values.append(value.strip())
        else:
            values.clear()
    return sections


def _one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}: expected one value, got {values}"
    return values[0]


def _words(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> set[str]:
    return {word for value in unit[section].get(key, []) for word in value.split()}


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min)?", value)
    assert match, f"not a plain time span: {value!r}"
    return float(match[1]) * (60 if match[2] == "min" else 1)


@pytest.fixture(scope="module")
def units() -> dict[str, dict[str, dict[str, list[str]]]]:
    return {name: _parse_unit(UNITS / f"auris-{name}.service") for name in ("agent", "collector")}


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectControlGroups": "yes",
    "SystemCallArchitectures": "native",
    "LockPersonality": "yes",
    "RestrictRealtime": "yes",
    "ConfigurationDirectory": "auris",
}


@pytest.mark.parametrize("name", ["agent", "collector"])
def test_unit_runs_unprivileged_hardened_in_the_foreground(
    units: dict[str, dict[str, dict[str, list[str]]]], name: str
) -> None:
    unit = units[name]
    assert set(unit) == {"Unit", "Service", "Install"}
    # The programs stay in the foreground and report readiness themselves (sd_notify.py): only
    # their main process speaks for them.
    assert _one(unit, "Service", "Type") == "notify"
    assert _one(unit, "Service", "NotifyAccess") == "main"
    assert '"READY=1"' in (REPO / name / "auris" / name / "cli.py").read_text()
    assert _one(unit, "Service", "User") == _one(unit, "Service", "Group") == "auris"
    for key, value in HARDENING.items():
        assert _one(unit, "Service", key) == value, key
    assert _one(unit, "Service", "StateDirectory") == f"auris-{name}"
    assert _one(unit, "Service", "Restart") == "on-failure"
    assert "multi-user.target" in _words(unit, "Install", "WantedBy")
    assert _one(unit, "Unit", "After") == "network-online.target"


def test_units_do_not_restart_on_configuration_errors(
    units: dict[str, dict[str, dict[str, list[str]]]],
) -> None:
    from auris.agent import cli as agent_cli
    from auris.collector import cli as collector_cli

    assert _words(units["agent"], "Service", "RestartPreventExitStatus") == {str(agent_cli.EXIT_CONFIG)}
    assert _words(units["collector"], "Service", "RestartPreventExitStatus") == {
        str(collector_cli.EXIT_CONFIG)
    }
    # The documented codes the units rely on.
    assert "2 bad configuration" in (agent_cli.__doc__ or "")
    assert "2 bad configuration" in (collector_cli.__doc__ or "")


def test_unit_exec_lines_match_the_programs_and_the_install_layout(
    units: dict[str, dict[str, dict[str, list[str]]]],
) -> None:
    agent, collector = units["agent"], units["collector"]
    assert _one(agent, "Service", "ExecStart") == (
        f"{INSTALLED_VENV_BIN}auris-agent --config /etc/auris/agent.toml"
    )
    # --config belongs to auris-collector itself, so it must come before the subcommand.
    assert _one(collector, "Service", "ExecStart") == (
        f"{INSTALLED_VENV_BIN}auris-collector --config /etc/auris/collector.toml serve"
    )
    # ExecReload only where the program handles SIGHUP (both do): without a handler it would die.
    sources = {name: (REPO / name / "auris" / name / "cli.py").read_text() for name in ("agent", "collector")}
    for name, unit in units.items():
        assert "signal.SIGHUP" in sources[name], name
        assert _one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID", name
    # SIGTERM must reach the agent alone: it asks its meter process to flush cached flows first.
    assert _one(agent, "Service", "KillMode") == "mixed"


def test_unit_state_directories_match_the_configured_paths(
    units: dict[str, dict[str, dict[str, list[str]]]],
) -> None:
    from auris.agent.config import AgentConfig, load_agent_config
    from auris.collector.config import CollectorConfig, load_collector_config

    agent_state = "/var/lib/" + _one(units["agent"], "Service", "StateDirectory")
    collector_state = "/var/lib/" + _one(units["collector"], "Service", "StateDirectory")
    sample_agent = load_agent_config(REPO / "packaging" / "agent.toml")
    sample_collector = load_collector_config(REPO / "packaging" / "collector.toml")
    assert AgentConfig().state_dir == sample_agent.state_dir == agent_state
    assert Path(CollectorConfig().db).parent == Path(sample_collector.db).parent == Path(collector_state)


def test_unit_stop_timeouts_cover_the_sigterm_drain(
    units: dict[str, dict[str, dict[str, list[str]]]],
) -> None:
    from auris.agent.config import AgentConfig, load_agent_config
    from auris.collector.config import CollectorConfig, load_collector_config

    drain = max(
        AgentConfig().drain_timeout_s, load_agent_config(REPO / "packaging" / "agent.toml").drain_timeout_s
    )
    grace = max(
        CollectorConfig().shutdown_grace_s,
        load_collector_config(REPO / "packaging" / "collector.toml").shutdown_grace_s,
    )
    # Room for the meter flush and final heartbeat (agent), the database close (collector).
    assert _seconds(_one(units["agent"], "Service", "TimeoutStopSec")) >= 2 * drain
    assert _seconds(_one(units["collector"], "Service", "TimeoutStopSec")) >= 2 * grace


def test_unit_capabilities_and_address_families(
    units: dict[str, dict[str, dict[str, list[str]]]],
) -> None:
    agent, collector = units["agent"], units["collector"]
    capture = {"CAP_NET_RAW", "CAP_NET_ADMIN"}
    assert _words(agent, "Service", "AmbientCapabilities") == capture
    assert _words(agent, "Service", "CapabilityBoundingSet") == capture
    assert _words(agent, "Service", "RestrictAddressFamilies") == {
        "AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET",
    }  # fmt: skip
    # The collector gets no capability at all: an empty assignment clears the set.
    assert "CapabilityBoundingSet" in collector["Service"]
    assert _words(collector, "Service", "CapabilityBoundingSet") == set()
    assert _words(collector, "Service", "AmbientCapabilities") == set()
    assert "AF_PACKET" not in _words(collector, "Service", "RestrictAddressFamilies")


def test_systemd_analyze_verifies_both_units(tmp_path: Path) -> None:
    """`systemd-analyze verify` on the real unit text; only the venv path in Exec lines differs.

    verify insists that ExecStart's program exists, so the copies point at this environment's
    entry points instead of /opt/auris/venv/bin, and nothing else changes.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian/Ubuntu: the systemd package)")
    if not any(
        Path(d, "sysinit.target").exists() for d in ("/usr/lib/systemd/system", "/lib/systemd/system")
    ):
        pytest.skip("no systemd unit tree on this machine (sysinit.target): verify cannot resolve units")
    bin_dir = Path(sys.executable).parent
    for program in ("auris-agent", "auris-collector"):
        if not (bin_dir / program).exists():
            pytest.skip(f"{program} is not installed next to {sys.executable}")
    copies = []
    for name in ("agent", "collector"):
        original = (UNITS / f"auris-{name}.service").read_text()
        copy = original.replace(INSTALLED_VENV_BIN, f"{bin_dir}/")
        changed = [
            line for line, new in zip(original.splitlines(), copy.splitlines(), strict=True) if line != new
        ]
        assert changed
        assert all(line.startswith("ExecStart=") for line in changed), changed
        path = tmp_path / f"auris-{name}.service"
        path.write_text(copy)
        copies.append(str(path))
    result = subprocess.run(
        [analyze, "verify", *copies], capture_output=True, text=True, timeout=60, check=False
    )
    output = result.stdout + result.stderr
    # verify exits 0 on unknown keys and bad values, and only says so: any line naming a unit fails.
    complaints = [line for line in output.splitlines() if "auris-" in line]
    assert result.returncode == 0, output
    assert not complaints, output


# -- container image (packaging/Containerfile) ---------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def test_containerfile_is_a_multi_stage_non_root_collector_image() -> None:
    instructions = _instructions(REPO / "packaging" / "Containerfile")
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    stages: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
    assert len(stages) >= 2, "multi-stage: a builder and a final stage"
    builder, final = stages[0], stages[-1]

    def base(stage: list[tuple[str, str]]) -> str:
        image = stage[0][1].split()[0]
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)

    assert base(final) == "python:3.11-slim"
    assert stages[0][0][1].split()[-1] == "builder"
    assert any(k == "RUN" and "pip wheel" in a for k, a in builder)
    # The final stage installs wheels only: no index, nothing built, no source tree copied in.
    runs = " ".join(a for k, a in final if k == "RUN")
    assert "pip install" in runs
    assert "--no-index" in runs
    assert "pip wheel" not in runs
    copies = [a for k, a in final if k in ("COPY", "ADD")]
    assert all("packaging/collector.toml" in a for a in copies), copies

    users = [a for k, a in final if k == "USER"]
    assert users, "the final stage must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert ("EXPOSE", "50051") in final
    volumes = " ".join(a for k, a in final if k == "VOLUME")
    assert "/var/lib/auris-collector" in volumes
    entrypoint = json.loads(next(a for k, a in final if k == "ENTRYPOINT"))
    assert entrypoint[0] == "auris-collector"
    assert entrypoint[-1] == "serve"
    # The config path is an option of auris-collector, before the subcommand, and the image has it.
    config = entrypoint[entrypoint.index("--config") + 1]
    assert any(a.split()[-1] == config for a in copies)


def test_containerfile_build_context_admits_what_it_copies() -> None:
    """The .dockerignore allow-list next to the Containerfile must let every COPY source through."""
    ignore = (REPO / "packaging" / "Containerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore
    for keyword, rest in _instructions(REPO / "packaging" / "Containerfile"):
        if keyword != "COPY" or "--from" in rest:
            continue
        sources = [w for w in rest.split() if not w.startswith("--")][:-1]
        for source in sources:
            assert source.rstrip("/") in allowed, source
            assert (REPO / source).exists(), source
