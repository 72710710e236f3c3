"""Remove what Auris never runs from installed dependencies: make-venv.sh runs this in the venv.

    python -I packaging/prune-venv.py [--site DIR] [--dry-run]

Each rule names a distribution, the installed files it removes (patterns over the paths its
RECORD lists, relative to site-packages) and why Auris runs without them. Pruned files leave the
distribution's RECORD too, so `pip show --files`, `pip uninstall` and a later upgrade see the venv
as it is. The files are first moved aside (into site-packages/.pruning-*); only when numpy, and
onnxruntime where it is installed, still import and run an ONNX model are RECORD rewritten and the
files deleted; otherwise they are put back and the run fails. SIGTERM and SIGHUP stop it at the
next file or after the check, with everything put back. A run killed harder leaves its .pruning-*
folder: the next run first puts back what a RECORD still lists (the rest was pruned for good).

Standard library only: it runs in the venv's own interpreter, which has nothing else.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata as md
import io
import os
import shutil
import signal
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
# Run with the site-packages folder as argv[1] and the model as argv[2]; the modules must come from it.
_CHECK = """
import base64, importlib.util, sys
import numpy as np
assert np.__file__.startswith(sys.argv[1]), np.__file__
assert int(np.arange(4, dtype=np.float64).sum()) == 6
if importlib.util.find_spec("onnxruntime") is not None:
    import onnxruntime as ort
    assert ort.__file__.startswith(sys.argv[1]), ort.__file__
    session = ort.InferenceSession(base64.b64decode(sys.argv[2]), providers=["CPUExecutionProvider"])
    x = np.array([[1.5, -2.0]], dtype=np.float32)
    (y,) = session.run(None, {"x": x})
    assert (y == x + x).all(), y
"""
_ASIDE = ".pruning-"


class Interrupted(Exception):
    """SIGTERM or SIGHUP arrived (an install cut off): put the files back before exiting."""


@dataclass
class Pruned:
    rule: Rule
    paths: list[str]  # as in RECORD, files that exist
    size: int


@dataclass
class Installed:
    record: Path  # its RECORD file
    rows: list[list[str]]


def _installed(site: Path) -> dict[str, Installed]:
    """The distributions in ``site`` that a rule names, with their RECORD files and rows."""
    named = {rule.distribution for rule in RULES}
    found: dict[str, Installed] = {}
    for dist in md.distributions(path=[str(site)]):
        name = (dist.metadata["Name"] or "").lower()
        if name not in named:
            continue
        if name in found:
            raise RuntimeError(f"{name} is installed twice in {site}: clean up the venv first")
        text = dist.read_text("RECORD")
        # RECORD lists itself; found by its METADATA's folder too, in case it does not.
        folders = {
            str(f.parent)
            for f in dist.files or []
            if f.name == "METADATA" and f.parent.suffix == ".dist-info"
        }
        if text is None or len(folders) != 1:
            raise RuntimeError(f"{name} in {site} has no usable RECORD: reinstall it, or pass --no-prune")
        rows = [row for row in csv.reader(io.StringIO(text)) if row]
        found[name] = Installed(site / folders.pop() / "RECORD", rows)
    return found


def plan(site: Path, installed: dict[str, Installed]) -> tuple[list[Pruned], dict[str, set[str]]]:
    """What the rules remove (existing files) and, per distribution, every RECORD path they match
    (files already gone too: a run killed after deleting them, before RECORD was rewritten)."""
    pruned: list[Pruned] = []
    listed: dict[str, set[str]] = {}
    for rule in RULES:
        found = installed.get(rule.distribution)
        if found is None:
            continue
        paths, size = [], 0
        for row in found.rows:
            path = row[0]
            if path.startswith("../") or not any(fnmatchcase(path, p) for p in rule.patterns):
                continue
            listed.setdefault(rule.distribution, set()).add(path)
            full = site / path
            if full.is_file() or full.is_symlink():
                paths.append(path)
                size += full.lstat().st_size
        if paths:
            pruned.append(Pruned(rule, paths, size))
    return pruned, listed


def _put_back(aside: Path, site: Path, listed: set[str] | None = None) -> int:
    """Move the files under ``aside`` back to their places in ``site`` (where nothing is there
    now; only those a RECORD still lists when ``listed`` is given: the others' pruning was
    complete), then remove ``aside``; how many were moved."""
    restored = 0
    for path in sorted(p for p in aside.rglob("*") if p.is_file() or p.is_symlink()):
        relative = path.relative_to(aside)
        target = site / relative
        if listed is not None and relative.as_posix() not in listed:
            continue
        if not target.exists() and not target.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            restored += 1
    shutil.rmtree(aside)
    return restored


def _restore_interrupted(site: Path) -> int:
    """Put back the files a run killed half-way left moved aside (those its RECORDs still list);
    how many."""
    asides = sorted(site.glob(_ASIDE + "*"))
    if not asides:
        return 0
    listed = {row[0] for found in _installed(site).values() for row in found.rows}
    return sum(_put_back(aside, site, listed) for aside in asides)


def _check(site: Path, python: str) -> str | None:
    """None when numpy (and onnxruntime, if installed) import from ``site`` and run a model."""
    env = dict(os.environ, PYTHONPATH=str(site))
    try:
        done = subprocess.run(
            [python, "-P", "-c", _CHECK, str(site), _MODEL],
            capture_output=True, text=True, env=env, timeout=300, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "the check took longer than 300 s"
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]


def _rewrite_record(found: Installed, gone: set[str]) -> None:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(row for row in found.rows if row[0] not in gone)
    tmp = found.record.with_name("RECORD.pruning")
    tmp.write_text(out.getvalue(), encoding="utf-8")
    os.replace(tmp, found.record)


def _remove_empty_folders(site: Path, paths: list[str]) -> None:
    folders = {(site / p).parent for p in paths}
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        while folder != site and site in folder.parents and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent


# Signals that asked to stop. The handler only notes them; the work stops at the next checkpoint
# (after a file is moved, after the check): an exception raised from the handler could land
# between moving a file and noting that it moved.
_STOP: list[int] = []


def _interrupt(signum: int, frame: object) -> None:
    _STOP.append(signum)


def _checkpoint() -> None:
    if _STOP:
        raise Interrupted(f"stopped by signal {_STOP[0]}")


def prune(site: Path, python: str, dry_run: bool = False) -> int:
    restored = 0 if dry_run else _restore_interrupted(site)
    if restored:
        print(f"prune-venv: put back {restored} files that an interrupted run had moved aside")
    installed = _installed(site)
    pruned, listed = plan(site, installed)
    total = sum(p.size for p in pruned)
    for p in pruned:
        mb = p.size / 2**20
        print(f"prune-venv: {p.rule.distribution}: {len(p.paths)} files, {mb:.1f} MB: {p.rule.why}")
    if dry_run:
        print(f"prune-venv: {total / 2**20:.1f} MB would be removed (dry run)")
        return 0
    if not listed:
        print("prune-venv: 0.0 MB removed")
        return 0
    aside = Path(tempfile.mkdtemp(prefix=_ASIDE, dir=site))
    moved: list[str] = []
    rewritten: list[Installed] = []
    try:
        for p in pruned:
            for path in p.paths:
                target = aside / path
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(site / path, target)
                moved.append(path)
                _checkpoint()
        failure = _check(site, python) if moved else None
        _checkpoint()
        if failure is not None:
            names = " and ".join(sorted({p.rule.distribution for p in pruned}))
            raise RuntimeError(f"{names} no longer run without those files ({failure})")
        # RECORD first: once it is rewritten, the moved files are only leftovers.
        for name, gone in listed.items():
            rewritten.append(installed[name])
            _rewrite_record(installed[name], gone)
    except BaseException:
        for found in rewritten:
            _rewrite_record(found, set())
        _put_back(aside, site)  # whatever is there, not only what ``moved`` lists
        raise
    shutil.rmtree(aside)
    _remove_empty_folders(site, moved)
    if moved:
        checked = sorted({p.rule.distribution for p in pruned})
        verb = "run" if len(checked) > 1 else "runs"
        print(f"prune-venv: {total / 2**20:.1f} MB removed; {' and '.join(checked)} still {verb} a model")
    else:
        print(
            f"prune-venv: 0.0 MB removed; RECORD no longer lists {sum(map(len, listed.values()))} files gone"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, help="site-packages to prune (default: this interpreter's)")
    parser.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    args = parser.parse_args(argv)
    site = args.site or Path(sysconfig.get_paths()["platlib"])
    if not site.is_dir():
        print(f"prune-venv: no folder at {site}", file=sys.stderr)
        return 2
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    try:
        return prune(site.resolve(), sys.executable, args.dry_run)
    except (OSError, RuntimeError, Interrupted) as exc:
        print(f"prune-venv: nothing removed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
