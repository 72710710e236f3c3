#!/usr/bin/env bash
# Installed size of an agent-only virtual environment, made exactly as install.sh makes it
# (make-venv.sh --extras agent: no pandas, no pip or setuptools, pruned), from the wheel
# packaging/build-wheels.sh builds; beside it, for comparison, a plain
# `pip install 'auris[agent]'` into a fresh venv (make-venv.sh --with-pandas --keep-pip
# --no-prune). Prints each total (du -sm), every installed distribution of the first and the
# largest of the second, and whether the first fits the target (150 MB).
#
#   packaging/measure-agent-venv.sh [--python python3] [--wheel-dir DIR] [--dir DIR] [--no-plain]
#
# Needs the package index (or --wheel-dir with every dependency wheel, see build-wheels.sh).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: packaging/measure-agent-venv.sh [--python PYTHON] [--wheel-dir DIR] [--dir DIR] [--no-plain]
                                       [--target-mb MB]

  --python PYTHON  interpreter the venvs are made from (default: python3)
  --wheel-dir DIR  install from these wheels only (auris-*.whl and its dependencies, no index)
  --dir DIR        make the venvs in DIR/install-sh and DIR/pip-install and keep them (DIR must
                   not exist; default: a temporary folder, removed afterwards)
  --no-plain       measure install.sh's venv only, not the plain `pip install 'auris[agent]'`
  --target-mb MB   the size target (default: 150)
EOF
}

die() {
    echo "measure-agent-venv: $*" >&2
    exit 2
}

here=$(cd "$(dirname "$0")" && pwd)
python=python3
wheel_dir=""
dir=""
plain=1
target_mb=150
while (($#)); do
    case $1 in
        --python) python=${2:?--python needs an interpreter}; shift 2 ;;
        --wheel-dir) wheel_dir=${2:?--wheel-dir needs a folder}; shift 2 ;;
        --dir) dir=${2:?--dir needs a folder}; shift 2 ;;
        --no-plain) plain=0; shift ;;
        --target-mb) target_mb=${2:?--target-mb needs a number}; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument $1" ;;
    esac
done
[[ $target_mb =~ ^[0-9]+$ ]] || die "--target-mb takes a whole number"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [[ -z $dir ]]; then
    dir=$work/venvs
elif [[ -e $dir ]]; then
    die "$dir exists; give a new folder"
fi
mkdir -p "$dir"

options=(--python "$python" --extras agent)
if [[ -n $wheel_dir ]]; then
    wheel=$(find "$wheel_dir" -maxdepth 1 -name 'auris-*.whl' | sort -V | tail -n 1)
    [[ -n $wheel ]] || die "no auris-*.whl in $wheel_dir"
    options+=(--find-links "$wheel_dir" --offline)
else
    wheel=$("$here/build-wheels.sh" --out "$work/dist")
fi
options+=(--wheel "$wheel")

# A venv's distributions by installed size (the files each RECORD lists, bytecode included), then
# what the total holds that the agent never runs. Run by the venv's own interpreter.
report() {
    "$1/bin/python" -I - "$2" <<'EOF'
import importlib.metadata as md
import os
import sys

shown = int(sys.argv[1])
sizes = []
for dist in md.distributions():
    total = 0
    for f in dist.files or []:
        path = dist.locate_file(f)
        if os.path.isfile(path):
            total += os.path.getsize(path)
    sizes.append((total, f"{dist.metadata['Name']} {dist.version}"))
sizes.sort(reverse=True)
for size, name in sizes[:shown]:
    print(f"  {size / 2**20:7.1f} MB  {name}")
if len(sizes) > shown:
    rest = sum(size for size, _ in sizes[shown:])
    print(f"  {rest / 2**20:7.1f} MB  the other {len(sizes) - shown} distributions")

site = next(p for p in sys.path if p.endswith("site-packages"))
bytecode = tests = 0
for top, _dirs, files in os.walk(site):
    parts = os.path.relpath(top, site).split(os.sep)
    size = sum(os.path.getsize(os.path.join(top, f)) for f in files)
    if "tests" in parts:
        tests += size
    elif "__pycache__" in parts:
        bytecode += size
tooling = sum(size for size, name in sizes if name.split()[0] in ("pip", "setuptools"))
print("  of the total (overlaps aside):")
print(f"  {bytecode / 2**20:7.1f} MB  bytecode (__pycache__) outside test suites")
print(f"  {tests / 2**20:7.1f} MB  test suites shipped inside packages (*/tests/)")
print(f"  {tooling / 2**20:7.1f} MB  pip and setuptools")
EOF
}

echo "== $("$python" --version), $(basename "$wheel")" >&2
"$here/make-venv.sh" --venv "$dir/install-sh" "${options[@]}" >&2
agent_mb=$(du -sm "$dir/install-sh" | cut -f1)
echo "install.sh's agent venv (make-venv.sh --extras agent): $agent_mb MB (du -sm)"
report "$dir/install-sh" 100
if ((plain)); then
    "$here/make-venv.sh" --venv "$dir/pip-install" "${options[@]}" --with-pandas --keep-pip --no-prune >&2
    echo "plain pip install 'auris[agent]' into a fresh venv: $(du -sm "$dir/pip-install" | cut -f1) MB (du -sm)"
    report "$dir/pip-install" 10
fi
if [[ $dir != "$work/venvs" ]]; then
    echo "venvs kept in $dir"
fi
if ((agent_mb <= target_mb)); then
    echo "target <= $target_mb MB for install.sh's agent venv: met"
else
    echo "target <= $target_mb MB for install.sh's agent venv: NOT MET ($agent_mb MB)"
fi
