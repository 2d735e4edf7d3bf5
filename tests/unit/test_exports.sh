#!/bin/sh
# test_exports.sh: the shared library exports exactly the symbols listed in
# tests/unit/exports.txt (sorted, one a line) plus the linker's own, and nothing else: a
# missing, extra or renamed aamm_* symbol fails with a diff. Every listed name is
# aamm_<component>_<verb> (doc/ARCHITECTURE.md, "Dialect"). After an intended change of the
# public API, regenerate the list from a build and commit it with the change:
#   nm -D --defined-only .libs/libaamm.so | awk '{print $3}' | grep '^aamm_' | LC_ALL=C sort \
#       > $(top_srcdir)/tests/unit/exports.txt
lib="${AAMM_TOP_BUILDDIR:-.}/.libs/libaamm.so"
list="${AAMM_TOP_SRCDIR:-${srcdir:-.}}/tests/unit/exports.txt"
if [ ! -f "$lib" ]; then
    echo "SKIP: $lib not built (static-only build)"
    exit 77
fi
if [ ! -f "$list" ]; then
    echo "FAIL: $list missing"
    echo "0 passed, 1 failed"
    exit 1
fi
bad=$(grep -v -E '^aamm_[a-z0-9][a-z0-9_]*$' "$list" || true)
if [ -n "$bad" ]; then
    echo "FAIL: $list lists names that are not aamm_*:"
    echo "$bad"
    echo "0 passed, 1 failed"
    exit 1
fi
tmp="${TMPDIR:-/tmp}/aamm_exports.$$"
trap 'rm -f "$tmp.got" "$tmp.want"' EXIT
nm -D --defined-only "$lib" | awk '{print $3}' |
    grep -v -E '^(_init|_fini|_edata|_end|__bss_start)$' | LC_ALL=C sort > "$tmp.got"
LC_ALL=C sort "$list" > "$tmp.want"
if ! cmp -s "$list" "$tmp.want"; then
    echo "FAIL: $list is not sorted (LC_ALL=C sort)"
    echo "0 passed, 1 failed"
    exit 1
fi
if ! diff -u "$tmp.want" "$tmp.got"; then
    echo "FAIL: exported symbols differ from $list (- listed only, + exported only)"
    echo "0 passed, 1 failed"
    exit 1
fi
echo "exports: $(wc -l < "$tmp.got") symbols, exactly those in tests/unit/exports.txt"
echo "1 passed, 0 failed"
