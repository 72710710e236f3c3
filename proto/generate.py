"""Generate the Python code for the auris.v1 contract.

Usage: ``python proto/generate.py`` rewrites the generated modules next to the
``.proto`` files; ``python proto/generate.py --check`` regenerates into a
temporary folder and exits 1 if the committed files are stale.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = Path("auris") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def _plugin(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        raise SystemExit(f"generate: {name} not found; install the 'dev' extra (mypy-protobuf)")
    return found


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc  # imported late: only needed for generation

    protos = sorted((HERE / PACKAGE).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--mypy_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p.relative_to(HERE)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("generate: protoc failed")
    return sorted(p for p in (out / PACKAGE).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def committed() -> list[Path]:
    return sorted(p for p in (HERE / PACKAGE).iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args()
    if not args.check:
        for old in committed():
            old.unlink()
        written = generate(HERE)
        print(f"generated {len(written)} files in {HERE / PACKAGE}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        fresh_names = {p.name for p in fresh}
        old_names = {p.name for p in committed()}
        stale = sorted(fresh_names ^ old_names)
        stale += [
            p.name
            for p in fresh
            if p.name in old_names and not filecmp.cmp(p, HERE / PACKAGE / p.name, shallow=False)
        ]
    if stale:
        print(f"generated code is stale: {', '.join(stale)}; run: python proto/generate.py", file=sys.stderr)
        return 1
    print("generated code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
