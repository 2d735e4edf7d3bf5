#!/bin/sh
# test_exports.sh: the shared library exports only aamm_* symbols (plus the linker's own).
lib="${AAMM_TOP_BUILDDIR:-.}/.libs/libaamm.so"
if [ ! -f "$lib" ]; then
    echo "SKIP: $lib not built (static-only build)"
    exit 77
fi
bad=$(nm -D --defined-only "$lib" | awk '{print $3}' |
      grep -v -E '^(aamm_[a-z0-9][a-z0-9_]*|_init|_fini|_edata|_end|__bss_start)$' || true)
n=$(nm -D --defined-only "$lib" | awk '{print $3}' | grep -c '^aamm_')
if [ -n "$bad" ]; then
    echo "FAIL: symbols exported that are not aamm_*:"
    echo "$bad"
    echo "0 passed, 1 failed"
    exit 1
fi
if [ "$n" -lt 10 ]; then
    echo "FAIL: only $n aamm_* symbols exported"
    exit 1
fi
echo "exports: $n aamm_* symbols, nothing else"
echo "1 passed, 0 failed"
