#!/bin/sh
# test_bikes_config.sh: bikes-agent's configuration checks, without a server
# (`bikes-agent -c FILE check`): the sample configuration passes; each mistake exits 2 with
# the message naming the file, line and key; the secret file must be private (not group
# or world accessible) and at least 16 bytes; relative paths are relative to the file;
# ddl takes on or off, and table_owner needs ddl = on; lost names a peer above it, once;
# part refuses a node that is still a peer (or this node) before it connects.
agent="${AAMM_TOP_BUILDDIR:-.}/examples/bikes/bikes-agent"
sample="${AAMM_TOP_SRCDIR:-${srcdir:-.}}/examples/bikes/bikes.conf.sample"
if [ ! -x "$agent" ]; then
    echo "FAIL: $agent not built"
    echo "0 passed, 1 failed"
    exit 1
fi
tmp=$(mktemp -d "${TMPDIR:-/tmp}/aamm_bikes_config.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0

# expect NAME STATUS MESSAGE CONFIG-TEXT [COMMAND ARG...]: COMMAND (default: check) on
# CONFIG-TEXT (printf format) exits STATUS and its stderr (or stdout for 0) contains MESSAGE.
expect() {
    name=$1 want=$2 msg=$3
    # shellcheck disable=SC2059  # the config text is a printf format
    printf "$4" >"$tmp/t.conf"
    shift 4
    [ $# -gt 0 ] || set -- check
    (cd / && "$agent" -c "$tmp/t.conf" "$@") >"$tmp/out" 2>&1
    got=$?
    if [ "$got" = "$want" ] && grep -qF -- "$msg" "$tmp/out"; then
        pass=$((pass + 1))
    else
        fail=$((fail + 1))
        echo "FAIL: $name: exit $got (want $want), output:"
        sed 's/^/    /' "$tmp/out"
        echo "    (wanted: $msg)"
    fi
}

# a valid base: the secret file is found next to the configuration, wherever the cwd
(umask 077 && printf 'a-secret-of-more-than-16-bytes\n' >"$tmp/cluster.secret")
base='node_id = 1\nconninfo = dbname=x\ntables = a, b\ncluster = c\nsecret_file = cluster.secret\npeer = 2 berlin 127.0.0.1:7002\n'

expect "valid, relative secret path" 0 "t.conf: ok (node 1, 1 peers, 2 tables)" "$base"
expect "comments and blanks" 0 ": ok" "# comment\n\n   # indented comment\n$base"
expect "bad peer line" 2 "t.conf:7: peer: expected 'ID NAME HOST:PORT [raft HOST:PORT]'" \
    "${base}peer = 3 copenhagen\n"
expect "peer without port" 2 "t.conf:7: peer: expected" "${base}peer = 3 copenhagen localhost\n"
expect "unknown key" 2 "t.conf:7: colour: unknown key" "${base}colour = red\n"
expect "line without =" 2 "t.conf:1: expected 'key = value'" "node_id 1\n"
expect "empty value" 2 "t.conf:1: cluster: empty value" "cluster =\n"
expect "key twice" 2 "t.conf:7: cluster: given twice" "${base}cluster = d\n"
expect "node id range" 2 "t.conf:1: node_id: expected a number 1..1023" "node_id = 1024\n"
expect "duplicate peer id" 2 "t.conf:7: peer: id 2 is already on line 6" \
    "${base}peer = 2 berlin2 127.0.0.1:7003\n"
expect "peer id is ours" 2 "t.conf:7: peer: id 1 is this node's node_id" \
    "${base}peer = 1 me 127.0.0.1:7003\n"
expect "bad listen" 2 "t.conf:7: listen: expected 'HOST:PORT'" "${base}listen = 127.0.0.1\n"
expect "bad log level" 2 "t.conf:7: log_level: expected error, warn, info or debug" \
    "${base}log_level = loud\n"
expect "bad bootstrap" 2 "t.conf:7: bootstrap: expected yes or no" "${base}bootstrap = maybe\n"
expect "ddl on, table owner" 0 ": ok" "${base}ddl = on\ntable_owner = bikes_owner\n"
expect "ddl off" 0 ": ok" "${base}ddl = off\n"
expect "bad ddl value" 2 "t.conf:7: ddl: expected on or off" "${base}ddl = maybe\n"
expect "ddl twice" 2 "t.conf:8: ddl: given twice" "${base}ddl = on\nddl = off\n"
expect "table owner twice" 2 "t.conf:9: table_owner: given twice" \
    "${base}ddl = on\ntable_owner = a\ntable_owner = b\n"
expect "table owner without ddl" 2 "t.conf: table_owner needs ddl = on" \
    "${base}table_owner = bikes_owner\n"
expect "table owner with ddl off" 2 "t.conf: table_owner needs ddl = on" \
    "${base}ddl = off\ntable_owner = bikes_owner\n"
expect "missing cluster" 2 "t.conf: missing key 'cluster'" \
    'node_id = 1\nconninfo = x\ntables = a\nsecret_file = cluster.secret\npeer = 2 b h:1\n'
expect "tls needs all three" 2 "tls_ca, tls_cert and tls_key go together" "${base}tls_ca = ca.pem\n"
expect "raft needs a dir" 2 "raft_address needs raft_dir" "${base}raft_address = 127.0.0.1:9001\n"

chmod 640 "$tmp/cluster.secret"
expect "group-readable secret" 2 "t.conf:5: secret_file: $tmp/cluster.secret: mode 0640 lets group or others access it" "$base"
chmod 600 "$tmp/cluster.secret"
(umask 077 && printf 'short\n' >"$tmp/short.secret")
expect "short secret" 2 "t.conf:5: secret_file: $tmp/short.secret holds 5 bytes; at least 16 needed" \
    'node_id = 1\nconninfo = dbname=x\ntables = a\ncluster = c\nsecret_file = short.secret\npeer = 2 b h:1\n'
expect "peer_conninfo" 0 ": ok (node 1, 1 peers" "${base}peer_conninfo = 2 host=/tmp dbname=bikes\n"
expect "peer_conninfo before its peer" 2 "t.conf:7: peer_conninfo: no 'peer' line for id 3 above" \
    "${base}peer_conninfo = 3 host=/tmp\n"
expect "peer_conninfo twice" 2 "t.conf:8: peer_conninfo: given twice for peer 2" \
    "${base}peer_conninfo = 2 a=b\npeer_conninfo = 2 c=d\n"
expect "peer_conninfo without conninfo" 2 "t.conf:7: peer_conninfo: expected 'ID CONNINFO'" \
    "${base}peer_conninfo = 2\n"

# join: every peer needs a peer_conninfo, checked before anything connects; a bad id
expect "join needs peer_conninfo" 2 "t.conf:6: peer 2 has no peer_conninfo (join needs one" \
    "$base" join 2
expect "join of a bad id" 2 "join: 'x' is not a node id" "$base" join x
expect "join from a node that is no peer" 2 "join: 5 is not a peer" \
    "${base}peer_conninfo = 2 host=/nonexistent\n" join 5

# lost peers: after their peer line, once each
expect "lost" 0 ": ok (node 1, 1 peers" "${base}lost = 2\n"
expect "lost before its peer" 2 "t.conf:7: lost: no 'peer' line for id 3 above" \
    "${base}lost = 3\npeer = 3 c h:3\n"
expect "lost twice" 2 "t.conf:8: lost: given twice for peer 2" "${base}lost = 2\nlost = 2\n"
expect "lost not an id" 2 "t.conf:7: lost: expected a peer's node id" "${base}lost = berlin\n"

# part: the node must be no peer any more, nor this node, checked before anything connects;
# a node that cannot be reached is an error (exit 1) naming the connection
expect "part of a peer" 2 "part: 2 is still a peer in $tmp/t.conf (line 6): remove its peer line" \
    "$base" part 2
expect "part of this node" 2 "part: 1 is this node" "$base" part 1
expect "part of a bad id" 2 "part: '0' is not a node id" "$base" part 0
expect "part, no server" 1 "part: cannot connect (conninfo)" \
    'node_id = 1\nconninfo = host=/nonexistent-aamm-dir dbname=x\n' part 3

# the sample configuration is valid once its secret exists
cp "$sample" "$tmp/t.conf"
if "$agent" -c "$tmp/t.conf" check >"$tmp/out" 2>&1; then
    pass=$((pass + 1))
else
    fail=$((fail + 1))
    echo "FAIL: the sample configuration:"
    sed 's/^/    /' "$tmp/out"
fi
# usage errors exit 2
if "$agent" check >/dev/null 2>&1 || [ $? != 2 ]; then
    fail=$((fail + 1)); echo "FAIL: no -c: not exit 2"
else
    pass=$((pass + 1))
fi

echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
