#!/bin/sh
# bench/consensus.sh: raft commit latency, galloc range latency through consensus (on the
# leader and forwarded from a follower) and leader fail-over time, 3 nodes on 127.0.0.1
# (bench_consensus: real raft_uv disk I/O + our PSK transport). Default raft timeouts
# (election 1000 ms, heartbeat 100 ms) and a faster setting (300/30). Each run 3 times; the
# median of each figure is printed.
set -u
top_build=${AAMM_TOP_BUILDDIR:-.}
prog="$top_build/bench/bench_consensus"
[ -x "$prog" ] || { echo "bench_consensus not built (make bench)"; exit 1; }
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
for i in 1 2 3; do
    "$prog" 2000 1000 100 2>/dev/null | grep '^BENCH ' >> "$tmp"
    "$prog" 500 300 30 2>/dev/null | grep '^BENCH consensus_failover' |
        sed 's/consensus_failover/consensus_failover_e300/' >> "$tmp"
done
awk -f "$(dirname "$0")/medians.awk" "$tmp"
