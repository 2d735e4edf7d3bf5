#!/bin/sh
# bench/replicator.sh: writer TPS and lag A->B under pgbench, libaamm replicators against
# native logical replication and a standalone writer (bench_replicator). One run per
# invocation by default (each run is 3 x AAMM_BENCH_SECONDS of pgbench plus setup);
# AAMM_BENCH_RUNS=3 for medians. Each run's lines are shown as "run N: BENCH ..." (the
# medians are the only lines that start with BENCH); a failed run makes the exit status 1.
set -u
top_build=${AAMM_TOP_BUILDDIR:-.}
runs=${AAMM_BENCH_RUNS:-1}
[ -x "$top_build/bench/bench_replicator" ] || { echo "bench_replicator not built (make bench)"; exit 1; }
tmp=$(mktemp)
one=$(mktemp)
trap 'rm -f "$tmp" "$one"' EXIT
rc=0
i=0
while [ "$i" -lt "$runs" ]; do
    i=$((i + 1))
    "$top_build/bench/bench_replicator" > "$one" || { echo "run $i failed"; rc=1; }
    grep '^BENCH ' "$one" | sed "s/^/run $i: /"
    grep '^BENCH ' "$one" >> "$tmp"
done
awk -f "$(dirname "$0")/medians.awk" "$tmp"
exit $rc
