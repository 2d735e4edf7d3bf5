#!/bin/sh
# bench/capture.sh: capture throughput against pg_recvlogical on the same backlogs
# (1,000,000 rows in 1,000-row transactions; 100,000 pgbench transactions). bench_capture
# builds each backlog once and measures 3 runs of both on copies of the same slot; it
# prints the medians as BENCH lines. AAMM_BENCH_CAPTURE_SCALE shrinks the backlogs.
set -u
top_build=${AAMM_TOP_BUILDDIR:-.}
prog="$top_build/bench/bench_capture"
[ -x "$prog" ] || { echo "bench_capture not built (make bench)"; exit 1; }
"$prog" "${AAMM_BENCH_CAPTURE_SCALE:-1}"
