#!/bin/sh
# bench/wire.sh: wire codec throughput (bench_wire), link throughput over loopback
# (bench_link), each run 3 times (medians printed); wire size against the raw pgoutput
# bytes of a real slot (bench_wire_pg, one run: sizes are deterministic).
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
# sizes against a real slot (deterministic: one run)
if [ -x "$top_build/bench/bench_wire_pg" ]; then
    "$top_build/bench/bench_wire_pg" | grep '^BENCH ' >> "$tmp"
else
    echo "bench_wire_pg not built (make bench)"
fi
# median per name
awk -f "$(dirname "$0")/medians.awk" "$tmp"
echo "NOTE *_size_ratio: wire bytes / pgoutput bytes of the same real-slot stream (frames closed at 64 KiB); *_size_ratio_per_txn: one frame per transaction; *_synthetic: synthetic streams, pgoutput size computed from its message layout"
