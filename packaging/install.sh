#!/usr/bin/env bash
# Install the Auris agent and/or collector on this host as systemd services (docs/install.md).
#
#   sudo packaging/install.sh --agent                      # build the wheel here, install from PyPI
#   sudo packaging/install.sh --collector --wheel-dir dist --offline
#   packaging/install.sh --agent --root /tmp/stage --skip-venv   # staged layout, no root needed
#
# What it does, idempotently (run it again to upgrade):
#   - the system user and group "auris" (not with --root: a staged install creates no user);
#   - a virtual environment at PREFIX/venv with auris[agent], auris[collector] or both, made by
#     make-venv.sh: without pandas (nfstream's to_pandas() needs it, the agent does not),
#     without pip and setuptools, and without the files of numpy and onnxruntime that Auris never
#     runs (prune-venv.py), unless --with-pandas / --keep-pip / --no-prune;
#   - the shipped models in PREFIX/models (agent; replaced on every run: keep your own elsewhere);
#   - /etc/auris (root:auris 0750) with agent.toml / collector.toml / aurisctl.toml copied from
#     packaging/ only when absent: an operator's configuration is never overwritten;
#   - /var/lib/auris-agent and /var/lib/auris-collector (auris:auris 0750);
#   - the units in /etc/systemd/system, then `systemctl daemon-reload` and `enable` (never start).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: packaging/install.sh (--agent | --collector)... [options]

  --agent            install the agent (auris-agent.service, auris[agent], the models)
  --collector        install the collector (auris-collector.service, auris[collector])
  --prefix DIR       where the venv and models go (default: /opt/auris)
  --wheel-dir DIR    install the newest auris-*.whl from DIR, dependencies from DIR first
                     (default: build the wheel from this checkout with build-wheels.sh)
  --offline          no package index: every dependency wheel must be in --wheel-dir
                     (packaging/build-wheels.sh --with-deps agent,collector makes them)
  --python PYTHON    interpreter for the venv (default: python3, 3.11 or newer)
  --with-pandas      also install pandas (about 90 MB), for nfstream's to_pandas(); the agent
                     does not need it, and without this flag an update removes it
  --keep-pip         leave pip and setuptools in the venv (about 20 MB; removed by default,
                     an update brings pip back with ensurepip while it runs)
  --no-prune         keep the files of numpy and onnxruntime that Auris never runs (about 50
                     MB: onnxruntime's C API library and model tooling, numpy's test suite)
  --root DIR         staged install under DIR: no user, no chown, no systemctl; needs
                     --skip-venv (a venv only works at the path it was made at)
  --skip-venv        lay out users, folders, configuration, models and units only
  --no-systemctl     do not run systemctl (daemon-reload, enable)
EOF
}

die() {
    echo "install: $*" >&2
    exit 2
}
say() { echo "install: $*"; }

here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/.." && pwd)
agent=0
collector=0
prefix=/opt/auris
wheel_dir=""
offline=0
python=python3
root=""
skip_venv=0
systemctl=1
venv_options=()
while (($#)); do
    case $1 in
        --agent) agent=1; shift ;;
        --collector) collector=1; shift ;;
        --prefix) prefix=${2:?--prefix needs a folder}; shift 2 ;;
        --wheel-dir) wheel_dir=${2:?--wheel-dir needs a folder}; shift 2 ;;
        --offline) offline=1; shift ;;
        --python) python=${2:?--python needs an interpreter}; shift 2 ;;
        --with-pandas | --keep-pip | --no-prune) venv_options+=("$1"); shift ;;
        --root) root=${2:?--root needs a folder}; shift 2 ;;
        --skip-venv) skip_venv=1; shift ;;
        --no-systemctl) systemctl=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument $1" ;;
    esac
done

((agent || collector)) || { usage >&2; die "say what to install: --agent, --collector or both"; }
# The prefix lands in unit files and TOML through sed: keep it to plain path characters.
[[ $prefix =~ ^/[A-Za-z0-9._/-]*[A-Za-z0-9._-]$ ]] || die "--prefix must be an absolute path of plain characters"
[[ $prefix != *..* ]] || die "--prefix must not contain .."
if ((offline)) && [[ -z $wheel_dir ]]; then
    die "--offline needs --wheel-dir with every dependency wheel"
fi
if [[ -n $root ]]; then
    mkdir -p "$root"
    root=$(cd "$root" && pwd)
    [[ $root != / ]] || root=""
fi
if [[ -n $root ]]; then
    ((skip_venv)) || die "--root needs --skip-venv: a venv only works at the path it was made at"
    systemctl=0
    manage_user=0
else
    ((EUID == 0)) || die "run as root (or stage the layout with --root DIR --skip-venv)"
    manage_user=1
fi
if [[ -n $wheel_dir ]]; then
    [[ -d $wheel_dir ]] || die "--wheel-dir $wheel_dir is not a folder"
    wheel_dir=$(cd "$wheel_dir" && pwd)
fi

etc=$root/etc/auris
units=$root/etc/systemd/system
venv=$root$prefix/venv

# Components: the ones asked for (wanted), plus any installed before: the venv keeps their
# dependencies.
declare -A asked=([agent]=$agent [collector]=$collector)
wanted=()
components=()
for c in agent collector; do
    if ((asked[$c])); then
        wanted+=("$c")
        components+=("$c")
    elif [[ -e $units/auris-$c.service ]]; then
        components+=("$c")
    fi
done
extras=$(IFS=,; echo "${components[*]}")

# -- user and group ----------------------------------------------------------------------------
if ((manage_user)); then
    if ! getent group auris >/dev/null; then
        groupadd --system auris
        say "created group auris"
    fi
    if ! getent passwd auris >/dev/null; then
        useradd --system --gid auris --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "Auris network sensor" auris
        say "created system user auris"
    fi
    owner=(-o root -g auris)
    service_owner=(-o auris -g auris)
else
    owner=()
    service_owner=()
fi

# -- folders -----------------------------------------------------------------------------------
install -d -m 0755 "$root$prefix" "$units"
install -d -m 0750 "${owner[@]}" "$etc"
for c in "${wanted[@]}"; do
    install -d -m 0750 "${service_owner[@]}" "$root/var/lib/auris-$c"
done

# -- virtual environment -----------------------------------------------------------------------
if ((!skip_venv)); then
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$python is older than 3.11 (or missing); pass --python"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    if [[ -n $wheel_dir ]]; then
        wheel=$(find "$wheel_dir" -maxdepth 1 -name 'auris-*.whl' | sort -V | tail -n 1)
        [[ -n $wheel ]] || die "no auris-*.whl in $wheel_dir (packaging/build-wheels.sh makes one)"
        venv_options+=(--find-links "$wheel_dir")
        if ((offline)); then venv_options+=(--offline); fi
    else
        [[ -f $src/pyproject.toml ]] || die "no source tree at $src: pass --wheel-dir"
        wheel=$("$here/build-wheels.sh" --python "$python" --out "$work/dist")
    fi
    "$here/make-venv.sh" --venv "$venv" --wheel "$wheel" --extras "$extras" --python "$python" \
        "${venv_options[@]}"
fi

# -- models (agent) ----------------------------------------------------------------------------
if ((agent)); then
    models=$root$prefix/models
    shopt -s nullglob
    shipped=("$src"/models/*.manifest.json "$src"/models/*.onnx)
    shopt -u nullglob
    if ((${#shipped[@]})); then
        rm -rf "$models.new"
        install -d -m 0755 "$models.new"
        install -m 0644 "${shipped[@]}" "$models.new/"
        rm -rf "$models"
        mv "$models.new" "$models"
        say "installed ${#shipped[@]} model files in $prefix/models"
    else
        say "WARNING: no models in $src/models; point models_dir in $etc/agent.toml at yours"
    fi
fi

# -- configuration: copied only when absent ----------------------------------------------------
install_config() { # NAME: packaging/NAME -> /etc/auris/NAME, root:auris 0640
    local target=$etc/$1
    if [[ -e $target ]]; then
        say "kept $target (an existing configuration is never overwritten)"
        return 1
    fi
    install -m 0640 "${owner[@]}" "$here/$1" "$target"
    say "installed $target: edit it before starting the service"
}
if ((agent)) && install_config agent.toml; then
    # The sample names a distribution's models folder; this install keeps them under the prefix.
    sed -i "s#^models_dir = .*#models_dir = \"$prefix/models\"#" "$etc/agent.toml"
fi
if ((collector)); then
    install_config collector.toml || true
    install_config aurisctl.toml || true
fi

# -- systemd units -----------------------------------------------------------------------------
installed_units=()
for c in "${wanted[@]}"; do
    install -m 0644 "$here/systemd/auris-$c.service" "$units/auris-$c.service"
    if [[ $prefix != /opt/auris ]]; then
        sed -i "s#/opt/auris/venv/#$prefix/venv/#g" "$units/auris-$c.service"
    fi
    installed_units+=("auris-$c.service")
    say "installed $units/auris-$c.service"
done
if ((systemctl)); then
    if [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
    else
        say "systemd is not running here: units enabled, no daemon-reload"
    fi
    systemctl enable --quiet "${installed_units[@]}"
    say "enabled ${installed_units[*]} (never started here)"
    for unit in "${installed_units[@]}"; do
        if [[ -d /run/systemd/system ]] && systemctl is-active --quiet "$unit"; then
            say "$unit is running the previous version: systemctl restart $unit"
        else
            say "start it with: systemctl start $unit"
        fi
    done
fi
