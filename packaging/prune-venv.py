"""Remove what Auris never runs from installed dependencies: make-venv.sh runs this in the venv.

    python -I packaging/prune-venv.py [--site DIR] [--dry-run]

Each rule names a distribution, the installed files it removes (patterns over the paths its
RECORD lists, relative to site-packages) and why Auris runs without them. Pruned files leave the
distribution's RECORD too, so `pip show --files`, `pip uninstall` and a later upgrade see the venv
as it is. The files are first moved aside; only when numpy and onnxruntime still import and an
ONNX model still runs are they deleted, otherwise they are put back and the run fails.

Standard library only: it runs in the venv's own interpreter, which has nothing else.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata as md
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path


@dataclass(frozen=True)
class Rule:
    distribution: str
    patterns: tuple[str, ...]  # fnmatch over RECORD paths: `*` matches across folders too
    why: str


RULES = (
    Rule(
        "onnxruntime",
        ("onnxruntime/capi/libonnxruntime.so.*",),
        "ONNX Runtime's C API library, for native programs: the Python binding "
        "(onnxruntime_pybind11_state) holds the runtime itself and never loads it",
    ),
    Rule(
        "onnxruntime",
        ("onnxruntime/transformers/*", "onnxruntime/quantization/*", "onnxruntime/tools/*"),
        "offline model tooling (transformer optimisation, quantisation, model conversion scripts); "
        "`import onnxruntime` does not import it",
    ),
    Rule("numpy", ("numpy/tests/*", "numpy/*/tests/*"), "numpy's own test suite"),
)

# A one-node ONNX model, y = x + x (opset 13, IR version 8), as onnx.helper writes it: the check
# below runs it, so a pruned onnxruntime is known to load and run models, not only to import.
_MODEL = (
    "CAg6QwoOCgF4CgF4EgF5IgNBZGQSC3BydW5lLWNoZWNrWhEKAXgSDAoKCAESBgoACgIIAmIRCgF5EgwKCggBEgYKAAoCCAJCBAoAEA0="
)
_CHECK = """
import base64, sys
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(base64.b64decode(sys.argv[1]), providers=["CPUExecutionProvider"])
x = np.array([[1.5, -2.0]], dtype=np.float32)
(y,) = session.run(None, {"x": x})
assert (y == x + x).all(), y
"""


@dataclass
class Pruned:
    rule: Rule
    paths: list[str]  # as in RECORD
    size: int


def _record_rows(dist: md.Distribution) -> list[list[str]]:
    text = dist.read_text("RECORD") or ""
    return [row for row in csv.reader(io.StringIO(text)) if row]


def _record_path(site: Path, dist: md.Distribution) -> Path:
    """RECORD lists itself: ``NAME-VERSION.dist-info/RECORD,,``."""
    (path,) = [row[0] for row in _record_rows(dist) if row[0].endswith(".dist-info/RECORD")]
    return site / path


def plan(site: Path) -> tuple[list[Pruned], dict[str, md.Distribution]]:
    """What the rules remove from the distributions installed in ``site``."""
    installed = {d.metadata["Name"].lower(): d for d in md.distributions(path=[str(site)])}
    pruned = []
    for rule in RULES:
        dist = installed.get(rule.distribution)
        if dist is None:
            continue
        paths, size = [], 0
        for row in _record_rows(dist):
            path = row[0]
            if any(fnmatchcase(path, p) for p in rule.patterns):
                full = site / path
                if full.is_file():
                    paths.append(path)
                    size += full.stat().st_size
        if paths:
            pruned.append(Pruned(rule, paths, size))
    return pruned, installed


def _check(site: Path, python: str) -> str | None:
    """None when numpy and onnxruntime import and run a model from ``site``; else what failed."""
    env = dict(os.environ, PYTHONPATH=str(site))
    done = subprocess.run(
        [python, "-c", _CHECK, _MODEL], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]


def _rewrite_record(site: Path, dist: md.Distribution, gone: set[str]) -> None:
    record = _record_path(site, dist)
    rows = [row for row in _record_rows(dist) if row[0] not in gone]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    tmp = record.with_name("RECORD.pruning")
    tmp.write_text(out.getvalue())
    os.replace(tmp, record)


def _remove_empty_folders(site: Path, paths: list[str]) -> None:
    folders = {(site / p).parent for p in paths}
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        while folder != site and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent


def prune(site: Path, python: str, dry_run: bool = False) -> int:
    pruned, installed = plan(site)
    total = sum(p.size for p in pruned)
    for p in pruned:
        print(
            f"prune-venv: {p.rule.distribution}: {len(p.paths)} files, {p.size / 2**20:.1f} MB: {p.rule.why}"
        )
    if dry_run or not pruned:
        print(f"prune-venv: {total / 2**20:.1f} MB {'would be removed (dry run)' if dry_run else 'removed'}")
        return 0
    aside = Path(tempfile.mkdtemp(prefix=".pruning-", dir=site))
    moved: list[str] = []
    try:
        for p in pruned:
            for path in p.paths:
                target = aside / path
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(site / path, target)
                moved.append(path)
        failure = _check(site, python)
        if failure is not None:
            raise RuntimeError(f"numpy and onnxruntime no longer run a model without those files ({failure})")
    except BaseException:
        for path in moved:
            (site / path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(aside / path, site / path)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside)
    _remove_empty_folders(site, moved)
    for name in {p.rule.distribution for p in pruned}:
        gone = {path for p in pruned if p.rule.distribution == name for path in p.paths}
        _rewrite_record(site, installed[name], gone)
    print(f"prune-venv: {total / 2**20:.1f} MB removed; numpy and onnxruntime still run a model")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, help="site-packages to prune (default: this interpreter's)")
    parser.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    args = parser.parse_args(argv)
    site = args.site or Path(sysconfig.get_paths()["purelib"])
    if not site.is_dir():
        print(f"prune-venv: no folder at {site}", file=sys.stderr)
        return 2
    try:
        return prune(site.resolve(), sys.executable, args.dry_run)
    except (OSError, RuntimeError) as exc:
        print(f"prune-venv: nothing removed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
