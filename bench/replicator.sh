#!/bin/sh
# bench/replicator.sh: writer TPS and lag A->B under pgbench, libaamm replicators against
# native logical replication and a standalone writer (bench_replicator). One run per
# invocation by default (each run is 3 x AAMM_BENCH_SECONDS of pgbench plus setup);
# AAMM_BENCH_RUNS=3 for medians. Each run's lines are shown as "run N: BENCH ..." (the
# medians are the only lines that start with BENCH); a failed run makes the exit status 1.
set -u
top_build=${AAMM_TOP_BUILDDIR:-.}
runs=${AAMM_BENCH_RUNS:-1}
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
[ -x "$top_build/bench/bench_replicator" ] || { echo "bench_replicator not built (make bench)"; exit 1; }
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
awk '{ v[$2] = v[$2] " " $3; u[$2] = $4 } END { for (k in v) print k, v[k], "|", u[k] }' "$tmp" |
while read -r name rest; do
    unit=${rest##*| }
    vals=${rest% |*}
    med=$(printf '%s\n' $vals | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    echo "BENCH $name $med $unit"
done | sort
exit $rc
