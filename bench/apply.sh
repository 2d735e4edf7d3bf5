#!/bin/sh
# bench/apply.sh: catch-up from a backlog, libaamm capture -> apply against PostgreSQL's
# native subscription between local clusters (bench_apply). One run per invocation by
# default (each run builds 3 clusters and a large backlog); AAMM_BENCH_RUNS=3 for medians.
set -u
top_build=${AAMM_TOP_BUILDDIR:-.}
runs=${AAMM_BENCH_RUNS:-1}
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
[ -x "$top_build/bench/bench_apply" ] || { echo "bench_apply not built (make bench)"; exit 1; }
i=0
while [ "$i" -lt "$runs" ]; do
    "$top_build/bench/bench_apply" | grep '^BENCH ' >> "$tmp"
    i=$((i + 1))
done
awk -f "$(dirname "$0")/medians.awk" "$tmp"
