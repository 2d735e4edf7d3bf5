#!/bin/sh
# check.sh LIBDIR INCLUDEDIR SRCDIR: compile tests/install/app.c against the installed
# tree with pkg-config only, run it, and report.
set -e
libdir=$1 includedir=$2 srcdir=$3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The installed .pc names the configured prefix; with DESTDIR, point it at the staged tree.
sed -e "s|^libdir=.*|libdir=$libdir|" -e "s|^includedir=.*|includedir=$includedir|" \
    "$libdir/pkgconfig/aamm.pc" > "$tmp/aamm.pc"
export PKG_CONFIG_PATH="$tmp"
${CC:-cc} -std=c11 -Wall -Werror -o "$tmp/app" "$srcdir/tests/install/app.c" \
    $(pkg-config --cflags --libs aamm) -Wl,-rpath,"$libdir"
"$tmp/app"
# libpq is a public dependency (node.h takes a PGconn): a program that uses libpq itself
# gets its flags from aamm alone.
pkg-config --print-requires aamm | grep -q '^libpq' ||
    { echo "installcheck: aamm.pc does not require libpq"; exit 1; }
# The static archive links too, against the (shared) libraries named in Requires and
# Requires.private (Debian ships no static libpq dependencies, so those stay shared).
if [ -f "$libdir/libaamm.a" ]; then
    priv=$(sed -n 's/^Requires\(.private\)\{0,1\}: *//p' "$tmp/aamm.pc" | tr ',' ' ')
    ${CC:-cc} -std=c11 -Wall -Werror -o "$tmp/app-static" "$srcdir/tests/install/app.c" \
        $(pkg-config --cflags aamm) "$libdir/libaamm.a" $(pkg-config --libs $priv) -lm
    "$tmp/app-static"
fi
echo "installcheck: 1 passed, 0 failed"
