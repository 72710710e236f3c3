#!/usr/bin/env bash
# Remove what packaging/install.sh installed (docs/install.md). Idempotent.
#
#   sudo packaging/uninstall.sh                 # both components: units, venv, models
#   sudo packaging/uninstall.sh --agent --purge # also /etc/auris/agent.toml and /var/lib/auris-agent
#
# Without --purge the configuration in /etc/auris and the state in /var/lib/auris-* stay (a
# later install.sh picks them up again). --purge removes them too, and once no component is
# left the "auris" user and group. Files in /etc/auris that install.sh did not put there
# (certificates, keys) are never removed: the folder stays, and they are listed.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: packaging/uninstall.sh [--agent] [--collector] [options]    (neither: both)

  --prefix DIR     where install.sh put the venv and models (default: /opt/auris)
  --purge          also remove configuration, state (verdicts, spool, agent id), the
                   collector's /var/log/auris (SIEM and alert files) and, once no
                   component is left, the auris user and group
  --root DIR       act on a staged install under DIR (no user, no systemctl)
  --no-systemctl   do not run systemctl (stop, disable, daemon-reload)
EOF
}

die() {
    echo "uninstall: $*" >&2
    exit 2
}
say() { echo "uninstall: $*"; }

agent=0
collector=0
prefix=/opt/auris
purge=0
root=""
systemctl=1
while (($#)); do
    case $1 in
        --agent) agent=1; shift ;;
        --collector) collector=1; shift ;;
        --prefix) prefix=${2:?--prefix needs a folder}; shift 2 ;;
        --purge) purge=1; shift ;;
        --root) root=${2:?--root needs a folder}; shift 2 ;;
        --no-systemctl) systemctl=0; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument $1" ;;
    esac
done
if ((!agent && !collector)); then
    agent=1
    collector=1
fi
[[ $prefix =~ ^/[A-Za-z0-9._/-]*[A-Za-z0-9._-]$ && $prefix != *..* ]] ||
    die "--prefix must be an absolute path of plain characters"
if [[ -n $root ]]; then
    [[ -d $root ]] || die "--root $root is not a folder"
    root=$(cd "$root" && pwd)
    [[ $root != / ]] || root=""
fi
if [[ -n $root ]]; then
    systemctl=0
    manage_user=0
else
    ((EUID == 0)) || die "run as root (or act on a staged install with --root DIR)"
    manage_user=1
fi

etc=$root/etc/auris
units=$root/etc/systemd/system
running_systemd=0
[[ -d /run/systemd/system ]] && running_systemd=1

declare -A asked=([agent]=$agent [collector]=$collector)
declare -A configs=([agent]="agent.toml" [collector]="collector.toml aurisctl.toml")
for c in agent collector; do
    ((asked[$c])) || continue
    unit=auris-$c.service
    if [[ -e $units/$unit ]]; then
        if ((systemctl && running_systemd)); then
            systemctl disable --now --quiet "$unit"
        elif ((systemctl)); then
            systemctl disable --quiet "$unit"
        fi
        rm -f "$units/$unit"
        say "removed $units/$unit"
    fi
    if [[ $c == agent && -e $root$prefix/models ]]; then
        rm -rf "$root$prefix/models"
        say "removed $root$prefix/models"
    fi
    if ((purge)); then
        # Drop-ins (systemctl edit) are the operator's configuration too.
        if [[ -e $units/$unit.d ]]; then
            rm -rf "$units/$unit.d"
            say "removed $units/$unit.d"
        fi
        for name in ${configs[$c]}; do
            if [[ -e $etc/$name ]]; then
                rm -f "$etc/$name"
                say "removed $etc/$name"
            fi
        done
        if [[ -e $root/var/lib/auris-$c ]]; then
            rm -rf "$root/var/lib/auris-$c"
            say "removed $root/var/lib/auris-$c"
        fi
        # The collector's LogsDirectory: SIEM and alert files.
        if [[ $c == collector && -e $root/var/log/auris ]]; then
            rm -rf "$root/var/log/auris"
            say "removed $root/var/log/auris"
        fi
    fi
done

# The venv is shared: it goes with the last component.
left=0
for c in agent collector; do
    [[ -e $units/auris-$c.service ]] && left=1
done
if ((!left)); then
    if [[ -e $root$prefix/venv ]]; then
        rm -rf "$root$prefix/venv"
        say "removed $root$prefix/venv"
    fi
    rmdir "$root$prefix" 2>/dev/null || true
    if ((purge)) && [[ -d $etc ]]; then
        if rmdir "$etc" 2>/dev/null; then
            say "removed $etc"
        else
            say "kept $etc: it holds files install.sh did not put there:"
            ls -A "$etc"
        fi
    fi
    if ((purge && manage_user)); then
        if getent passwd auris >/dev/null; then
            userdel auris
            say "removed user auris"
        fi
        if getent group auris >/dev/null; then
            groupdel auris
            say "removed group auris"
        fi
    fi
fi
if ((systemctl && running_systemd)); then
    systemctl daemon-reload
fi
