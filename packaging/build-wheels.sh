#!/usr/bin/env bash
# Build the auris wheel (one pure-Python wheel: agent, collector, training and the auris.v1
# contract; the extras choose the dependencies) into dist/, and optionally the wheels of every
# dependency of some extras, for installing without an index:
#
#   packaging/build-wheels.sh                          # dist/auris-VERSION-py3-none-any.whl
#   packaging/build-wheels.sh --with-deps agent        # + the agent's dependency wheels
#   packaging/install.sh --agent --wheel-dir dist --offline
#
# The wheel is built from a copy of the working tree (tracked files and untracked files that git
# does not ignore), so a stale build/ folder or egg-info in the checkout never leaks into it.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: packaging/build-wheels.sh [--out DIR] [--with-deps EXTRAS] [--python PYTHON] [--no-isolation]

  --out DIR          where the wheels go (default: dist/ in the repository)
  --with-deps EXTRAS also put the wheels of every dependency of these extras (comma separated:
                     agent, collector, training) into DIR; needs the package index
  --python PYTHON    interpreter whose pip builds the wheels (default: $PYTHON, else the
                     repository's .venv/bin/python, else python3)
  --no-isolation     build with the interpreter's own setuptools instead of fetching it into an
                     isolated build environment (no network needed)
EOF
}

repo=$(cd "$(dirname "$0")/.." && pwd)
out="$repo/dist"
extras=""
isolation=()
python=${PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then python=$repo/.venv/bin/python; else python=python3; fi
fi

while (($#)); do
    case $1 in
        --out) out=${2:?--out needs a folder}; shift 2 ;;
        --with-deps) extras=${2:?--with-deps needs extras, e.g. agent,collector}; shift 2 ;;
        --python) python=${2:?--python needs an interpreter}; shift 2 ;;
        --no-isolation) isolation=(--no-build-isolation); shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "build-wheels: unknown argument $1" >&2; usage >&2; exit 2 ;;
    esac
done
if [[ -n $extras && ! $extras =~ ^[a-z]+(,[a-z]+)*$ ]]; then
    echo "build-wheels: --with-deps takes extras like agent,collector, not '$extras'" >&2
    exit 2
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A clean source tree: what git would commit now, minus deleted files.
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    while IFS= read -r -d '' f; do
        [[ -e $repo/$f ]] && printf '%s\0' "$f"
    done < <(git -C "$repo" ls-files -z --cached --others --exclude-standard) |
        tar -C "$repo" --null -T - -cf - | tar -C "$work" -xf -
else
    tar -C "$repo" --exclude=.venv --exclude=.git --exclude=build --exclude=dist --exclude='*.egg-info' \
        --exclude=__pycache__ -cf - . | tar -C "$work" -xf -
fi

"$python" -m pip wheel --quiet --no-deps "${isolation[@]}" --wheel-dir "$work/wheel" "$work" >&2
wheel=$(find "$work/wheel" -name 'auris-*.whl' -print -quit)
[[ -n $wheel ]] || { echo "build-wheels: pip built no auris wheel" >&2; exit 1; }
cp "$wheel" "$out/"
wheel="$out/$(basename "$wheel")"

if [[ -n $extras ]]; then
    # Resolve the extras against the wheel just built (a file, never a same-named index project).
    "$python" -m pip wheel --quiet --wheel-dir "$out" "auris[$extras] @ file://$wheel" >&2
fi
echo "$wheel"
