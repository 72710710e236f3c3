#!/usr/bin/env bash
# Make (or update) the virtual environment that runs Auris: the one install.sh installs, and the
# one measure-agent-venv.sh measures (docs/install.md, "Agent install size").
#
#   packaging/make-venv.sh --venv /opt/auris/venv --wheel dist/auris-0.1.0-py3-none-any.whl --extras agent
#
# By default the venv holds no pandas and no pip:
#   - nfstream requires pandas for one exporter (to_pandas) that the agent never calls (90 MB with
#     its dependencies): nfstream is installed with --no-deps, then its other requirements, all
#     read from the installed metadata (nothing pinned here: pyproject.toml pins, the wheel says);
#     auris.agent.lean lets nfstream import without it. `pip check` must report nothing else.
#   - pip and setuptools (20 MB) only install things: they are removed at the end, and brought
#     back with `python -m ensurepip` (no index needed) when this script updates the venv again.
#   - files of numpy and onnxruntime that nothing in Auris runs (50 MB: onnxruntime's C API library,
#     its offline model tooling, numpy's test suite): prune-venv.py lists each with its reason, and
#     deletes them only once numpy and onnxruntime still run a model without them.
# --with-pandas, --keep-pip and --no-prune keep them: all three make it a plain
# `pip install 'auris[EXTRAS]'`.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: packaging/make-venv.sh --venv DIR --wheel WHEEL --extras EXTRAS [options]

  --venv DIR         the virtual environment: made when missing (or unusable), updated otherwise
  --wheel WHEEL      the auris wheel to install, by its path
  --extras EXTRAS    which components' dependencies: agent, collector or agent,collector
  --find-links DIR   take dependency wheels from DIR first
  --offline          no package index: every dependency wheel must be in --find-links
  --python PYTHON    interpreter for a new venv (default: python3, 3.11 or newer)
  --with-pandas      install pandas too (nfstream's to_pandas() needs it; about 90 MB)
  --keep-pip         leave pip and setuptools in the venv (about 20 MB)
  --no-prune         keep the files of numpy and onnxruntime that Auris never runs (about 50 MB)
EOF
}

die() {
    echo "make-venv: $*" >&2
    exit 2
}
say() { echo "make-venv: $*"; }

here=$(cd "$(dirname "$0")" && pwd)
venv=""
wheel=""
extras=""
index=()
offline=0
python=python3
with_pandas=0
keep_pip=0
prune=1
while (($#)); do
    case $1 in
        --venv) venv=${2:?--venv needs a folder}; shift 2 ;;
        --wheel) wheel=${2:?--wheel needs a file}; shift 2 ;;
        --extras) extras=${2:?--extras needs agent, collector or both}; shift 2 ;;
        --find-links) index+=(--find-links "${2:?--find-links needs a folder}"); shift 2 ;;
        --offline) offline=1; shift ;;
        --python) python=${2:?--python needs an interpreter}; shift 2 ;;
        --with-pandas) with_pandas=1; shift ;;
        --keep-pip) keep_pip=1; shift ;;
        --no-prune) prune=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument $1" ;;
    esac
done
[[ -n $venv && -n $wheel && -n $extras ]] || { usage >&2; die "--venv, --wheel and --extras are required"; }
[[ $extras =~ ^[a-z]+(,[a-z]+)*$ ]] || die "--extras takes names like agent,collector, not '$extras'"
[[ -f $wheel ]] || die "no wheel at $wheel"
wheel=$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")
if ((offline)); then
    ((${#index[@]})) || die "--offline needs --find-links with every dependency wheel"
    index+=(--no-index)
fi

py=$venv/bin/python
has() { "$py" -c 'import importlib.metadata as m, sys; m.distribution(sys.argv[1])' "$1" 2>/dev/null; }
requirements() { "$py" "$here/venv-requirements.py" "$@"; }

if [[ -x $py ]] && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "updating the venv at $venv"
    # Only nfstream may ask for pandas (then an earlier install put it there): otherwise it stays.
    if ((!with_pandas)) && has pandas && ! requirements needing pandas | grep -qv '^nfstream '; then
        say "the venv holds pandas from an earlier install: making it anew without (--with-pandas keeps it)"
        rm -rf "$venv"
    elif ! "$py" -m pip --version >/dev/null 2>&1; then
        "$py" -m ensurepip --default-pip >/dev/null ||
            die "the venv at $venv has no pip and ensurepip failed: remove the venv and run again"
        say "brought pip back with ensurepip (it is removed again at the end)"
    fi
fi
if [[ ! -x $py ]]; then
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$python is older than 3.11 (or missing); pass --python"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    say "created the venv at $venv"
fi

pip=("$py" -m pip --quiet --disable-pip-version-check)
if ((with_pandas)); then
    # The wheel by its path, never by name: an index may hold an unrelated project called auris.
    "${pip[@]}" install "${index[@]}" "auris[$extras] @ file://$wheel"
    # A rebuilt wheel keeps its version number; make sure the venv runs exactly this one.
    "${pip[@]}" install --no-deps --force-reinstall "$wheel"
else
    "${pip[@]}" install --no-deps --force-reinstall "$wheel"
    nfstream=$(requirements of auris "$extras" --only nfstream)
    needed=$(requirements of auris "$extras" --without nfstream)
    if [[ -n $nfstream ]]; then
        # It requires pandas, which it is meant to miss: pip check below says whether anything else is.
        "${pip[@]}" install "${index[@]}" --no-deps --no-warn-conflicts "$nfstream"
        needed+=$'\n'$(requirements of nfstream --without pandas)
    fi
    mapfile -t needed <<<"$needed"
    "${pip[@]}" install "${index[@]}" --no-warn-conflicts "${needed[@]}"
fi
if ! broken=$("$py" -m pip check 2>&1); then
    if ((!with_pandas)); then
        broken=$(grep -vx 'nfstream [^ ]* requires pandas, which is not installed\.' <<<"$broken" || true)
    fi
    [[ -z $broken ]] || die "unmet requirements in $venv: $(tr '\n' ' ' <<<"$broken")"
fi
if ((prune)); then
    # Also after an update: an upgraded numpy or onnxruntime brings its files back.
    "$py" -I "$here/prune-venv.py" ||
        die "pruning failed (nothing was removed); --no-prune skips it"
fi
version=$("$py" -c 'import importlib.metadata as m; print(m.version("auris"))')
if ((with_pandas)); then
    say "installed auris $version [$extras] from $(basename "$wheel")"
else
    say "installed auris $version [$extras] from $(basename "$wheel"), without pandas (--with-pandas adds it)"
fi

if ((!keep_pip)); then
    removed=()
    for name in pip setuptools; do
        has "$name" || continue
        needs=$(requirements needing "$name" | paste -sd ';' -)
        if [[ -n $needs ]]; then
            say "kept $name: $needs"
        else
            removed+=("$name")
        fi
    done
    if ((${#removed[@]})); then
        "${pip[@]}" uninstall --yes "${removed[@]}"
        say "removed ${removed[*]} from the venv (--keep-pip keeps them; ensurepip brings pip back)"
    fi
fi
