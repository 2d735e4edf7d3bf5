#!/bin/sh
# make-golden.sh: regenerate pg15.bin, real pgoutput messages from a throwaway PostgreSQL 15
# cluster, read through the SQL interface (pg_logical_slot_get_binary_changes) with the
# options capture uses (proto_version 1, messages true).
#
# Output format (the fuzz target's): one mode byte (0), then per message a 2-byte
# big-endian length and the message bytes.
#
# Usage: tests/golden/pgoutput/make-golden.sh [OUT]   (as root or as a user who may run PG)
set -eu
BIN=${AAMM_PG_BINDIR:-/usr/lib/postgresql/15/bin}
OUT=${1:-$(cd "$(dirname "$0")" && pwd)/pg15.bin}
DIR=$(mktemp -d /tmp/aamm-golden.XXXXXX)
AS=""
if [ "$(id -u)" = 0 ]; then
    chown postgres "$DIR"
    AS="runuser -u postgres --"
fi
cleanup() {
    $AS "$BIN/pg_ctl" -D "$DIR/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap cleanup EXIT INT TERM

$AS "$BIN/initdb" -D "$DIR/data" -U postgres -A trust >/dev/null
$AS "$BIN/pg_ctl" -D "$DIR/data" -w -l "$DIR/log" -o "-c listen_addresses='' \
    -c unix_socket_directories=$DIR -c wal_level=logical -c track_commit_timestamp=on \
    -c TimeZone=UTC -c DateStyle=ISO" start >/dev/null
PSQL="$AS $BIN/psql -X -q -v ON_ERROR_STOP=1 -h $DIR -U postgres -d postgres"

$PSQL -o /dev/null <<'SQL'
CREATE TABLE users (id int PRIMARY KEY, name text, note varchar(20));
CREATE TABLE items (sku text, qty int);
ALTER TABLE items REPLICA IDENTITY FULL;
CREATE TYPE mood AS ENUM ('happy', 'sad');
CREATE TABLE moods (id int PRIMARY KEY, m mood, big text);
ALTER TABLE moods ALTER big SET STORAGE EXTERNAL;
CREATE PUBLICATION pub FOR ALL TABLES;
SELECT 1 FROM pg_create_logical_replication_slot('golden', 'pgoutput');
INSERT INTO users VALUES (1, 'Ann', NULL), (2, 'Bob', 'x');
UPDATE users SET id = 3 WHERE id = 1;
UPDATE users SET name = 'Bobby' WHERE id = 2;
DELETE FROM users WHERE id = 2;
INSERT INTO items VALUES ('a', 1);
UPDATE items SET qty = 2;
DELETE FROM items;
INSERT INTO moods VALUES (1, 'happy', repeat('x', 10000));
UPDATE moods SET m = 'sad';
SELECT 1 FROM pg_logical_emit_message(true, 'aamm_ddl', 'CREATE TABLE t()');
SELECT 1 FROM pg_logical_emit_message(false, 'aamm_nt', 'hello');
TRUNCATE users, items RESTART IDENTITY CASCADE;
ALTER TABLE users ADD COLUMN extra bigint;
INSERT INTO users VALUES (5, 'Eve', NULL, 9000000000);
SELECT 1 FROM pg_replication_origin_create('aamm_from_2');
SELECT 1 FROM pg_replication_origin_session_setup('aamm_from_2');
BEGIN;
SELECT 1 FROM pg_replication_origin_xact_setup('0/ABCDEF', '2022-11-21 00:00:00+00');
INSERT INTO users VALUES (6, 'Orig', NULL, 1);
COMMIT;
SQL

$PSQL -A -t -c "SELECT lpad(to_hex(length(data)), 4, '0') || encode(data, 'hex')
    FROM pg_logical_slot_get_binary_changes('golden', NULL, NULL, 'proto_version', '1',
         'publication_names', 'pub', 'messages', 'true')" > "$DIR/hex"
{ printf '00'; tr -d '\n' < "$DIR/hex"; } | xxd -r -p > "$OUT"
echo "wrote $OUT ($(wc -l < "$DIR/hex") messages)"
