"""The agent stays small: its import graph and its install never reach collector, training or ML trainers."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution

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


def _closure(name: str, extras: frozenset[str]) -> set[str]:
    """Installed distributions that ``pip install name[extras]`` pulls in, transitively."""
    seen: set[str] = set()
    todo = [(name, extras)]
    while todo:
        dist_name, dist_extras = todo.pop()
        key = re.sub(r"[-_.]+", "-", dist_name).lower()
        if key in seen and not dist_extras:
            continue
        seen.add(key)
        try:
            requirements = distribution(dist_name).requires or []
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


def test_no_generic_import_packages() -> None:
    """Generated code lives in auris.v1, never in a top-level 'proto' package."""
    assert not (REPO / "proto" / "__init__.py").exists()
    tops = {p.name for p in (REPO / "proto").iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    assert tops == {"auris"}
