#!/bin/sh
# bench/wire.sh: wire codec throughput (bench_wire) and, once built, link throughput over
# loopback (bench_link). Each program runs 3 times; the median of each BENCH figure is printed.
set -u
top_build=${AAMM_TOP_BUILDDIR:-.}
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
for prog in bench_wire bench_link; do
    [ -x "$top_build/bench/$prog" ] || { echo "$prog not built (make bench)"; continue; }
    for i in 1 2 3; do
        "$top_build/bench/$prog" 2>/dev/null | grep '^BENCH ' >> "$tmp"
    done
done
# median per name
awk '{ v[$2] = v[$2] " " $3; u[$2] = $4 } END { for (k in v) print k, v[k], "|", u[k] }' "$tmp" |
while read -r name rest; do
    unit=${rest##*| }
    vals=${rest% |*}
    med=$(printf '%s\n' $vals | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    echo "BENCH $name $med $unit"
done | sort
echo "NOTE wire_pgbench_size_ratio / wire_bulk_size_ratio against a real slot's pgoutput bytes need capture; the _synthetic ratios compute pgoutput's byte count from its message layout"
