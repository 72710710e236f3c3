#!/usr/bin/env bash
# Installed size of an agent-only virtual environment: a fresh venv, `pip install auris[agent]`
# (from the wheel packaging/build-wheels.sh builds, as install.sh does), then `du`. Prints the
# total, the ten largest installed distributions, and whether it fits the target (150 MB).
#
#   packaging/measure-agent-venv.sh [--python python3] [--wheel-dir DIR] [--keep] [--target-mb 150]
#
# Needs the package index (or --wheel-dir with every dependency wheel, see build-wheels.sh).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: packaging/measure-agent-venv.sh [--python PYTHON] [--wheel-dir DIR] [--venv DIR] [--keep]
                                       [--target-mb MB]

  --python PYTHON  interpreter the venv is made from (default: python3)
  --wheel-dir DIR  install from these wheels only (auris-*.whl and its dependencies, no index)
  --venv DIR       make the venv here (must not exist; default: a temporary folder)
  --keep           keep the venv afterwards (a temporary one is removed otherwise)
  --target-mb MB   the size target (default: 150)
EOF
}

here=$(cd "$(dirname "$0")" && pwd)
python=python3
wheel_dir=""
venv=""
keep=0
target_mb=150
while (($#)); do
    case $1 in
        --python) python=${2:?--python needs an interpreter}; shift 2 ;;
        --wheel-dir) wheel_dir=${2:?--wheel-dir needs a folder}; shift 2 ;;
        --venv) venv=${2:?--venv needs a folder}; shift 2 ;;
        --keep) keep=1; shift ;;
        --target-mb) target_mb=${2:?--target-mb needs a number}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "measure-agent-venv: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
[[ $target_mb =~ ^[0-9]+$ ]] || { echo "measure-agent-venv: --target-mb takes a whole number" >&2; exit 2; }

work=$(mktemp -d)
cleanup() {
    rm -rf "$work"
    if ((!keep)) && [[ -n ${temp_venv:-} ]]; then rm -rf "$temp_venv"; fi
}
trap cleanup EXIT
if [[ -z $venv ]]; then
    temp_venv=$(mktemp -d /tmp/auris-agent-venv.XXXXXX)
    venv=$temp_venv/venv
elif [[ -e $venv ]]; then
    echo "measure-agent-venv: $venv exists; give a new folder" >&2
    exit 2
fi

if [[ -n $wheel_dir ]]; then
    wheel=$(find "$wheel_dir" -maxdepth 1 -name 'auris-*.whl' | sort -V | tail -n 1)
    [[ -n $wheel ]] || { echo "measure-agent-venv: no auris-*.whl in $wheel_dir" >&2; exit 2; }
    index=(--no-index --find-links "$wheel_dir")
else
    wheel=$("$here/build-wheels.sh" --out "$work/dist")
    index=()
fi

echo "== $("$python" --version) venv at $venv, installing auris[agent] from $(basename "$wheel")" >&2
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${index[@]}" "auris[agent] @ file://$wheel"

total_mb=$(du -sm "$venv" | cut -f1)
echo "agent venv: $(du -sh "$venv" | cut -f1) ($total_mb MB, du -sm) at $venv"
echo "largest installed distributions (files listed in each RECORD, bytecode included):"
"$venv/bin/python" - <<'EOF'
import importlib.metadata as md
import os
import sys

sizes = []
for dist in md.distributions():
    total = 0
    for f in dist.files or []:
        path = dist.locate_file(f)
        if os.path.isfile(path):
            total += os.path.getsize(path)
    sizes.append((total, f"{dist.metadata['Name']} {dist.version}"))
sizes.sort(reverse=True)
for size, name in sizes[:10]:
    print(f"  {size / 2**20:7.1f} MB  {name}")
rest = sum(size for size, _ in sizes[10:])
print(f"  {rest / 2**20:7.1f} MB  the other {max(len(sizes) - 10, 0)} distributions")

# What the total holds that the agent never runs, for a judgement on trimming.
site = next(p for p in sys.path if p.endswith("site-packages"))
bytecode = tests = 0
for top, dirs, files in os.walk(site):
    parts = os.path.relpath(top, site).split(os.sep)
    size = sum(os.path.getsize(os.path.join(top, f)) for f in files)
    if "tests" in parts:
        tests += size
    elif "__pycache__" in parts:
        bytecode += size
tooling = sum(size for size, name in sizes if name.split()[0] in ("pip", "setuptools"))
print("of the total (overlaps aside):")
print(f"  {bytecode / 2**20:7.1f} MB  bytecode (__pycache__) outside test suites")
print(f"  {tests / 2**20:7.1f} MB  test suites shipped inside packages (*/tests/)")
print(f"  {tooling / 2**20:7.1f} MB  pip and setuptools (the venv's own tooling)")
EOF
if ((total_mb <= target_mb)); then
    echo "target <= $target_mb MB: met"
else
    echo "target <= $target_mb MB: NOT MET ($total_mb MB)"
fi
