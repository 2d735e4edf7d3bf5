# scripts/common.sh: shared by scripts/test and scripts/demo (sourced, not run).
# Installs missing build dependencies (apt-get when root), bootstraps and configures.

AAMM_DEB_PACKAGES="autoconf automake libtool pkg-config make gcc libc6-dev libpq-dev \
libraft-dev liblz4-dev libuv1-dev libssl-dev check postgresql-15 postgresql-client-15"

top=$(cd "$(dirname "$0")/.." && pwd)

log() { printf '%s\n' "== $*"; }

ensure_deps() {
    missing=""
    for p in $AAMM_DEB_PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" = 0 ]; then
        log "installing missing packages:$missing"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null || { echo "apt-get update failed" >&2; exit 1; }
        # shellcheck disable=SC2086
        apt-get install -y -qq --no-install-recommends $missing >/dev/null ||
            { echo "apt-get install failed for:$missing" >&2; exit 1; }
    else
        echo "missing Debian packages:$missing" >&2
        echo "install them as root: apt-get install -y$missing" >&2
        exit 1
    fi
}

bootstrap() {
    if [ ! -x "$top/configure" ] || [ "$top/configure.ac" -nt "$top/configure" ] ||
       [ "$top/Makefile.am" -nt "$top/Makefile.in" ]; then
        log "autoreconf -fi"
        (cd "$top" && autoreconf -fi >/dev/null 2>&1) || { (cd "$top" && autoreconf -fi); exit 1; }
    fi
}

# configure_in DIR [configure args...]: an out-of-tree build in $top/DIR.
configure_in() {
    dir=$1
    shift
    mkdir -p "$top/$dir"
    if [ ! -f "$top/$dir/Makefile" ] || [ "$top/configure" -nt "$top/$dir/config.status" ]; then
        log "configure ($dir) $*"
        (cd "$top/$dir" && "$top/configure" -q "$@") || exit 1
    fi
}

jobs() {
    n=$(nproc 2>/dev/null || echo 2)
    echo "$n"
}
