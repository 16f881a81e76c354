#!/bin/sh
# Install rbeed's systemd integration on this host (run as root; safe to run again): the
#   system user rbee (sysusers.d), /etc/rbeed and /var/lib/rbeed (tmpfiles.d), the polkit rule
#   that lets rbee manage its worker units, the units in /etc/systemd/system with ExecStart=
#   pointing at $PREFIX/bin/rbeed, then `systemctl enable --now` of the two sockets.
# The rbeed package itself is installed separately, e.g. pip install --prefix "$PREFIX" .
#
# usage: contrib/install.sh [--dry-run] [--prefix DIR] [--root DIR]
#   --prefix DIR  where rbeed is installed (default: $PREFIX or /usr/local)
#   --root DIR    (or --destdir DIR) install into an image at DIR instead of this host: nothing
#                 is started, the units are enabled offline (systemctl --root), the user is
#                 created with systemd-sysusers --root. An empty DIR means this host.
#   --dry-run     print what would be done, change nothing
set -eu

PREFIX=${PREFIX:-/usr/local}
ROOT=/
DRY_RUN=0
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift ;;
        --prefix=*) PREFIX=${1#--prefix=} ;;
        --root|--destdir) [ $# -ge 2 ] || { echo "install.sh: $1 needs a directory" >&2; exit 2; }
            ROOT=$2; shift ;;
        --root=*|--destdir=*) ROOT=${1#*=} ;;
        -h|--help) sed -n '2,15s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done
case $PREFIX in
    /*) ;;
    *) echo "install.sh: --prefix must be an absolute path: $PREFIX" >&2; exit 2 ;;
esac
case $PREFIX in
    *[!A-Za-z0-9/._+-]*) echo "install.sh: unsupported characters in --prefix: $PREFIX" >&2; exit 2 ;;
esac
ROOT=${ROOT%/}
case $ROOT in
    ""|/*) ;;
    *) ROOT=$(pwd)/$ROOT ;;
esac
SRC=$(cd "$(dirname "$0")/.." && pwd)
UNITS="rbeed.service rbeed.socket rbeed-tcp.socket rbeed-worker@.service"
SOCKETS="rbeed.socket rbeed-tcp.socket"

say() { printf '%s\n' "$*"; }
# Run a command, or only show it with --dry-run.
run() {
    say "+ $*"
    [ "$DRY_RUN" = 1 ] || "$@"
}
# put MODE SRC DEST: copy SRC to $ROOT/DEST only when missing or different (reruns change nothing).
put() {
    if [ -f "$ROOT$3" ] && cmp -s "$2" "$ROOT$3"; then
        say "= $ROOT$3 is up to date"
    else
        run install -D -m "$1" "$2" "$ROOT$3"
    fi
}

if [ "$DRY_RUN" = 0 ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: must run as root (or use --dry-run)" >&2
    exit 1
fi
[ -x "$ROOT$PREFIX/bin/rbeed" ] || say "warning: $ROOT$PREFIX/bin/rbeed does not exist (yet); the units run it"

# 1. the system user
put 0644 "$SRC/contrib/rbeed.sysusers.conf" /etc/sysusers.d/rbeed.conf
if [ -z "$ROOT" ] && getent passwd rbee >/dev/null; then
    say "= user rbee exists"
elif command -v systemd-sysusers >/dev/null; then
    run systemd-sysusers --root="${ROOT:-/}" rbeed.conf  # found in $ROOT/etc/sysusers.d
elif [ -z "$ROOT" ]; then
    run useradd --system --user-group --home-dir /var/lib/rbeed --no-create-home \
        --shell /usr/sbin/nologin --comment "rbeed LLM daemon" rbee
else
    echo "install.sh: --root needs systemd-sysusers to create the user" >&2
    exit 1
fi

# 2. /etc/rbeed and /var/lib/rbeed (contrib/rbeed.tmpfiles.conf says why and how)
put 0644 "$SRC/contrib/rbeed.tmpfiles.conf" /etc/tmpfiles.d/rbeed.conf
run systemd-tmpfiles --create --root="${ROOT:-/}" rbeed.conf
if [ -f "$SRC/contrib/rbeed.toml" ] && [ ! -e "$ROOT/etc/rbeed/rbeed.toml" ]; then
    run install -m 0644 "$SRC/contrib/rbeed.toml" "$ROOT/etc/rbeed/rbeed.toml"
fi

# 3. polkit: rbee may start/stop/limit rbeed-worker@*.service
put 0644 "$SRC/contrib/rbeed.polkit.rules" /etc/polkit-1/rules.d/50-rbeed.rules

# 4. the units, ExecStart= and ExecReload= rewritten to $PREFIX/bin/rbeed
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for unit in $UNITS; do
    sed -E "/^Exec(Start|Reload)=/s|/usr/bin/rbeed|$PREFIX/bin/rbeed|" "$SRC/systemd/$unit" > "$tmp/$unit"
    grep -E '^Exec(Start|Reload)=' "$tmp/$unit" | sed "s|^|  $unit: |"
    put 0644 "$tmp/$unit" "/etc/systemd/system/$unit"
done

# 5. enable and start the sockets (rbeed.service starts on the first connection)
if [ -n "$ROOT" ]; then
    run systemctl --root="$ROOT" enable $SOCKETS
elif [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
    run systemctl enable --now $SOCKETS
else
    say "warning: systemd is not running here; enabling only"
    run systemctl enable $SOCKETS
fi
say "done"
