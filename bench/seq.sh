#!/bin/sh
# bench/seq.sh: id generator throughput (bench_seq): the C API (snowflake, UUIDv7, galloc)
# and the SQL functions on a throwaway PostgreSQL 15 node, as calls and as column defaults,
# next to PostgreSQL's own nextval()/bigserial and gen_random_uuid(), and pgbench with 4
# clients inserting one row per transaction through each default. bench_seq prints medians
# of 5 runs (pgbench: 3 runs of 4 s). galloc range latency through consensus is measured by
# bench/consensus.sh.
set -u
top_build=${AAMM_TOP_BUILDDIR:-.}
[ -x "$top_build/bench/bench_seq" ] || { echo "bench_seq not built (make bench)"; exit 1; }
"$top_build/bench/bench_seq" 5 | grep '^BENCH '
echo "NOTE seq_sql_call_*: ids/s of one session calling the function in one statement; seq_sql_insert_*: rows/s of one INSERT ... SELECT using the column default; *_pg: PostgreSQL's native generators for reference"
