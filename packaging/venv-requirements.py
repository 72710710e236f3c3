"""Requirements of installed distributions, for packaging/make-venv.sh.

Run by the venv's own interpreter, so that markers are evaluated for it; the marker logic is
``packaging``, or pip's vendored copy of it. ``needing`` also runs in a venv that has neither
(make-venv.sh asks it before bringing pip back): every marker then counts as true.

  python venv-requirements.py of auris agent,collector --without nfstream
      what auris needs, its extras agent and collector included, one requirement a line
  python venv-requirements.py of nfstream --without pandas
  python venv-requirements.py of auris agent --only nfstream      # nfstream's pinned requirement
  python venv-requirements.py needing pip setuptools
      installed distributions (others than those named) that require any of them
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

try:
    from packaging.requirements import Requirement
except ImportError:
    try:  # a fresh venv: pip's copy
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[assignment]
    except ImportError:  # neither: only ``needing`` works
        Requirement = None  # type: ignore[assignment,misc]


def canonicalize_name(name: str) -> str:
    """PEP 503's normalised name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(text: str) -> str:
    """A requirement's distribution name, without parsing the rest (PEP 508 names)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", text)
    return canonicalize_name(match[1]) if match else ""


def _applies(req: Any, extras: Iterable[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": extra}) for extra in ["", *extras])


def _text(req: Any) -> str:
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    if req.url:
        return f"{req.name}{extras} @ {req.url}"
    return f"{req.name}{extras}{req.specifier}"


def requirements_of(dist: str, extras: Sequence[str]) -> list[str]:
    """``dist[extras]``'s requirements whose markers hold here; an extra that names ``dist``
    itself (``auris[agent]`` in the training extra) is expanded in place."""
    out: list[str] = []
    todo, seen = [frozenset(extras)], set()
    while todo:
        wanted = todo.pop()
        if wanted in seen:
            continue
        seen.add(wanted)
        for text in md.requires(dist) or []:
            req = Requirement(text)
            if not _applies(req, wanted):
                continue
            if canonicalize_name(req.name) == canonicalize_name(dist):
                todo.append(frozenset(req.extras))
            elif _text(req) not in out:
                out.append(_text(req))
    return out


def needing(names: Sequence[str]) -> list[str]:
    """``"DIST requires REQ"`` for every installed distribution, not itself named, that requires
    one of ``names`` (its own markers evaluated, no extras)."""
    wanted = {canonicalize_name(n) for n in names}
    out = []
    for dist in md.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name in wanted:
            continue
        for text in dist.requires or []:
            if _name(text) in wanted and (Requirement is None or _applies(Requirement(text), ())):
                out.append(f"{dist.metadata['Name']} {dist.version} requires {text}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="venv-requirements.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    of = sub.add_parser("of", help="a distribution's requirements, markers evaluated")
    of.add_argument("dist")
    of.add_argument("extras", nargs="?", default="", help="comma-separated extras")
    pick = of.add_mutually_exclusive_group()
    pick.add_argument("--without", action="append", default=[], metavar="NAME", help="leave NAME out")
    pick.add_argument("--only", action="append", default=[], metavar="NAME", help="NAME alone")
    need = sub.add_parser("needing", help="installed distributions that require any of NAMES")
    need.add_argument("names", nargs="+")
    args = parser.parse_args(argv)

    if args.command == "needing":
        for line in needing(args.names):
            print(line)
        return 0
    if Requirement is None:
        print("venv-requirements.py: needs packaging or pip in this environment", file=sys.stderr)
        return 2
    try:
        found = requirements_of(args.dist, [e for e in args.extras.split(",") if e])
    except md.PackageNotFoundError:
        print(f"venv-requirements.py: {args.dist} is not installed", file=sys.stderr)
        return 2
    without = {canonicalize_name(n) for n in args.without}
    only = {canonicalize_name(n) for n in args.only}
    for text in found:
        name = canonicalize_name(Requirement(text).name)
        if name not in without and (not only or name in only):
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
