/* seq_sql.c: the SQL side of the seq component: installing aamm.snowflake_nextval(),
 * aamm.uuid_v7() and aamm.galloc_nextval() on a node, supplying galloc ranges, and
 * finding/converting serial and identity columns of replicated tables. */
#include "config.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include <aamm/seq.h>

#include "internal.h"
#include "seq_int.h"

/*
 * Design of the SQL generators (see doc/sequences.md):
 *
 * The state of each generator lives in a native PostgreSQL sequence, not in a table row.
 * Sequences are non-transactional: a value taken is never given back on rollback and
 * taking one holds no lock until commit. A row updated with UPDATE ... RETURNING would
 * hold its row lock until the inserting transaction commits and so serialize every
 * inserting transaction on the node. The read-compute-write step (nextval, then setval
 * when the value must jump: a new millisecond, a full counter, the next galloc range) runs
 * under a session-level advisory lock taken and released inside the call, taken inside
 * an exception block that releases it on any error or cancel (a flag set by the very
 * statement that takes the lock says whether to release it), so no session ever
 * keeps it.
 *
 * Advisory lock keys: (1633774957 = 'aamm', 1) snowflake, (…, 2) UUIDv7,
 * (…, hashtext(seqname)) galloc values, (1633774958, hashtext(seqname)) galloc supply.
 *
 * aamm.seq_clock_ms() is the clock of every SQL generator (ms since the Unix epoch);
 * tests replace it with a function that stands still or steps back.
 *
 * Function bodies are the same on every node: the node id is read from aamm.seq_config
 * at each call. Compiling it into the function would save about a fifth of the per-call
 * cost, but a function body carried to another node (DDL replication of the aamm schema
 * by mistake) would then silently make that node issue this node's ids.
 */
const char aamm__seq_sql_install[] =
    "CREATE SCHEMA IF NOT EXISTS aamm;\n"
    "GRANT USAGE ON SCHEMA aamm TO PUBLIC;\n"
    "CREATE TABLE IF NOT EXISTS aamm.seq_config (\n"
    "  one boolean PRIMARY KEY DEFAULT true CHECK (one),\n"
    "  node_id integer NOT NULL CHECK (node_id BETWEEN 0 AND 1023),\n"
    "  epoch_ms bigint NOT NULL);\n"
    "COMMENT ON TABLE aamm.seq_config IS 'libaamm: this node''s snowflake node id (node-local, "
    "never replicated)';\n"
    "CREATE SEQUENCE IF NOT EXISTS aamm.snowflake_state MINVALUE -1 START -1;\n"
    "CREATE SEQUENCE IF NOT EXISTS aamm.uuid_v7_state MINVALUE -1 START -1;\n"
    "CREATE TABLE IF NOT EXISTS aamm.galloc_range (\n"
    "  seqname text NOT NULL,\n"
    "  range_start bigint NOT NULL,\n"
    "  range_end bigint NOT NULL,\n"
    "  supplied_at timestamptz NOT NULL DEFAULT now(),\n"
    "  PRIMARY KEY (seqname, range_start),\n"
    "  CHECK (range_start >= 0 AND range_end > range_start));\n"
    "COMMENT ON TABLE aamm.galloc_range IS 'libaamm: galloc ranges [start, end) reserved for this "
    "node through consensus (node-local)';\n"
    "\n"
    "CREATE OR REPLACE FUNCTION aamm.seq_clock_ms() RETURNS bigint\n"
    "LANGUAGE sql VOLATILE AS\n"
    "$f$ SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint $f$;\n"
    "\n"
    /* snowflake: bits 62..22 ms since epoch_ms, 21..12 node, 11 source (1 = SQL),
     * 10..0 counter; the sequence holds the last id issued. */
    "CREATE OR REPLACE FUNCTION aamm.snowflake_nextval(seqname text) RETURNS bigint\n"
    "LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS\n"
    "$f$\n"
    "DECLARE\n"
    "  node integer; ep bigint; base bigint; now_ms bigint; cand bigint;\n"
    "  n bigint; s bigint; nxt bigint;\n"
    "  locked boolean := false;\n"
    "BEGIN\n"
    "  IF seqname IS NULL THEN\n"
    "    RAISE EXCEPTION 'aamm.snowflake_nextval: sequence name is NULL';\n"
    "  END IF;\n"
    "  SELECT c.node_id, c.epoch_ms INTO node, ep FROM aamm.seq_config c;\n"
    "  IF NOT FOUND THEN\n"
    "    RAISE EXCEPTION 'aamm.snowflake_nextval: this node has no node id'\n"
    "      USING HINT = 'the host must run aamm_seq_install() on this node';\n"
    "  END IF;\n"
    "  base := (node::bigint << 12) | 2048;\n"
    "  BEGIN\n"
    "    locked := pg_advisory_lock(1633774957, 1)::text = '';\n"
    "    now_ms := greatest(aamm.seq_clock_ms() - ep, 0);\n"
    "    IF now_ms >= 2199023255552 THEN\n"
    "      RAISE EXCEPTION 'aamm.snowflake_nextval: the clock is past the 41-bit time range "
    "(2093)';\n"
    "    END IF;\n"
    "    cand := (now_ms << 22) | base;\n"
    "    n := nextval('aamm.snowflake_state');\n"
    "    s := n - 1;\n"
    "    IF s < 0 THEN\n"
    "      nxt := cand;\n"
    "    ELSIF (s & 2047) <> 2047 AND (s & 4192256) = base THEN\n"
    "      nxt := greatest(s + 1, cand);\n"
    "    ELSIF (s >> 22) + 1 >= 2199023255552 THEN\n"
    "      RAISE EXCEPTION 'aamm.snowflake_nextval: time part past 2^41 ms (year 2093)';\n"
    "    ELSE\n"
    "      nxt := greatest((((s >> 22) + 1) << 22) | base, cand);\n"
    "    END IF;\n"
    "    IF (nxt >> 22) >= 2199023255552 THEN\n"
    "      RAISE EXCEPTION 'aamm.snowflake_nextval: time part past 2^41 ms (year 2093)';\n"
    "    END IF;\n"
    "    IF nxt <> n THEN\n"
    "      PERFORM setval('aamm.snowflake_state', nxt);\n"
    "    END IF;\n"
    "    PERFORM pg_advisory_unlock(1633774957, 1);\n"
    "  EXCEPTION WHEN OTHERS OR query_canceled THEN\n"
    "    IF locked THEN\n"
    "      PERFORM pg_advisory_unlock(1633774957, 1);\n"
    "    END IF;\n"
    "    RAISE;\n"
    "  END;\n"
    "  RETURN nxt;\n"
    "END\n"
    "$f$;\n"
    "\n"
    /* UUIDv7: the sequence holds ms << 12 | 12-bit counter (rand_a) of the last UUID. */
    "CREATE OR REPLACE FUNCTION aamm.uuid_v7() RETURNS uuid\n"
    "LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS\n"
    "$f$\n"
    "DECLARE\n"
    "  r text; seed bigint; now_ms bigint; n bigint; s bigint; v bigint; t text;\n"
    "  locked boolean := false;\n"
    "BEGIN\n"
    "  r := gen_random_uuid()::text;\n"
    "  seed := ('x' || substr(r, 1, 3))::bit(12)::bigint & 2047;\n"
    "  BEGIN\n"
    "    locked := pg_advisory_lock(1633774957, 2)::text = '';\n"
    "    now_ms := greatest(aamm.seq_clock_ms(), 0);\n"
    "    n := nextval('aamm.uuid_v7_state');\n"
    "    s := n - 1;\n"
    "    IF s >= 0 AND (s >> 12) >= now_ms THEN\n"
    "      v := s + 1;\n"
    "    ELSE\n"
    "      v := (now_ms << 12) | seed;\n"
    "    END IF;\n"
    "    IF (v >> 12) >= 281474976710656 THEN\n"
    "      RAISE EXCEPTION 'aamm.uuid_v7: timestamp past 48 bits';\n"
    "    END IF;\n"
    "    IF v <> n THEN\n"
    "      PERFORM setval('aamm.uuid_v7_state', v);\n"
    "    END IF;\n"
    "    PERFORM pg_advisory_unlock(1633774957, 2);\n"
    "  EXCEPTION WHEN OTHERS OR query_canceled THEN\n"
    "    IF locked THEN\n"
    "      PERFORM pg_advisory_unlock(1633774957, 2);\n"
    "    END IF;\n"
    "    RAISE;\n"
    "  END;\n"
    "  t := lpad(to_hex(v >> 12), 12, '0');\n"
    "  RETURN (substr(t, 1, 8) || '-' || substr(t, 9, 4) || '-7' ||\n"
    "          lpad(to_hex(v & 4095), 3, '0') || '-' || substr(r, 20))::uuid;\n"
    "END\n"
    "$f$;\n"
    "\n"
    /* galloc: per sequence name a native sequence aamm.galloc_<md5(name)> holding the last
     * value issued; ranges in aamm.galloc_range. */
    "CREATE OR REPLACE FUNCTION aamm.galloc_nextval(seqname text) RETURNS bigint\n"
    "LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS\n"
    "$f$\n"
    "DECLARE\n"
    "  rel regclass; n bigint; v bigint; rs bigint; issued bigint;\n"
    "  locked boolean := false;\n"
    "BEGIN\n"
    "  IF seqname IS NULL THEN\n"
    "    RAISE EXCEPTION 'aamm.galloc_nextval: sequence name is NULL';\n"
    "  END IF;\n"
    "  rel := to_regclass('aamm.' || quote_ident('galloc_' || md5(seqname)));\n"
    "  IF rel IS NULL THEN\n"
    "    RAISE EXCEPTION 'aamm.galloc_nextval: galloc sequence \"%\" has no range on this node', "
    "seqname\n"
    "      USING ERRCODE = '2200H',\n"
    "            HINT = 'the host must supply ranges agreed through consensus "
    "(aamm_galloc_supply_node)';\n"
    "  END IF;\n"
    "  BEGIN\n"
    "    locked := pg_advisory_lock(1633774957, hashtext(seqname))::text = '';\n"
    "    n := nextval(rel);\n"
    "    SELECT g.range_start INTO rs FROM aamm.galloc_range g\n"
    "      WHERE g.seqname = galloc_nextval.seqname AND g.range_end > n\n"
    "      ORDER BY g.range_start LIMIT 1;\n"
    "    IF NOT FOUND THEN\n"
    "      PERFORM setval(rel, greatest(n - 1, -1), n - 1 >= 0);\n"
    "      SELECT count(*) INTO issued FROM aamm.galloc_range g WHERE g.seqname = "
    "galloc_nextval.seqname;\n"
    "      RAISE EXCEPTION 'aamm.galloc_nextval: galloc sequence \"%\" has no values left on this "
    "node (% supplied ranges used up)', seqname, issued\n"
    "        USING ERRCODE = '2200H',\n"
    "              HINT = 'the host must supply the next range agreed through consensus "
    "(aamm_galloc_supply_node); a node that cannot reach a majority gets none';\n"
    "    END IF;\n"
    "    IF rs <= n THEN\n"
    "      v := n;\n"
    "    ELSE\n"
    "      v := rs;\n"
    "      PERFORM setval(rel, v);\n"
    "    END IF;\n"
    "    PERFORM pg_advisory_unlock(1633774957, hashtext(seqname));\n"
    "  EXCEPTION WHEN OTHERS OR query_canceled THEN\n"
    "    IF locked THEN\n"
    "      PERFORM pg_advisory_unlock(1633774957, hashtext(seqname));\n"
    "    END IF;\n"
    "    RAISE;\n"
    "  END;\n"
    "  RETURN v;\n"
    "END\n"
    "$f$;\n"
    "\n"
    "CREATE OR REPLACE FUNCTION aamm.galloc_remaining(seqname text) RETURNS bigint\n"
    "LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS\n"
    "$f$\n"
    "DECLARE\n"
    "  rel regclass; s bigint;\n"
    "BEGIN\n"
    "  rel := to_regclass('aamm.' || quote_ident('galloc_' || md5(seqname)));\n"
    "  IF rel IS NULL THEN\n"
    "    RETURN 0;\n"
    "  END IF;\n"
    "  s := coalesce(pg_sequence_last_value(rel), -1);\n"
    "  RETURN coalesce((SELECT sum(g.range_end - greatest(g.range_start, s + 1))\n"
    "                   FROM aamm.galloc_range g\n"
    "                   WHERE g.seqname = galloc_remaining.seqname AND g.range_end > s + 1), 0);\n"
    "END\n"
    "$f$;\n"
    "\n"
    "CREATE OR REPLACE FUNCTION aamm.galloc_supply(seqname text, range_start bigint, range_end "
    "bigint)\n"
    "RETURNS void\n"
    "LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS\n"
    "$f$\n"
    "DECLARE\n"
    "  relname text := 'galloc_' || md5(seqname);\n"
    "BEGIN\n"
    "  IF seqname IS NULL OR range_start IS NULL OR range_end IS NULL\n"
    "     OR range_start < 0 OR range_end <= range_start THEN\n"
    "    RAISE EXCEPTION 'aamm.galloc_supply: invalid range [%, %) for \"%\"', range_start, "
    "range_end, seqname;\n"
    "  END IF;\n"
    "  PERFORM pg_advisory_xact_lock(1633774958, hashtext(seqname));\n"
    "  IF EXISTS (SELECT 1 FROM aamm.galloc_range g WHERE g.seqname = galloc_supply.seqname\n"
    "             AND g.range_start = galloc_supply.range_start AND g.range_end = "
    "galloc_supply.range_end) THEN\n"
    "    RETURN;\n"
    "  END IF;\n"
    "  IF EXISTS (SELECT 1 FROM aamm.galloc_range g WHERE g.seqname = galloc_supply.seqname\n"
    "             AND g.range_start < galloc_supply.range_end AND galloc_supply.range_start < "
    "g.range_end) THEN\n"
    "    RAISE EXCEPTION 'aamm.galloc_supply: range [%, %) of \"%\" overlaps a range already "
    "supplied', range_start, range_end, seqname;\n"
    "  END IF;\n"
    "  IF to_regclass('aamm.' || quote_ident(relname)) IS NULL THEN\n"
    "    EXECUTE format('CREATE SEQUENCE aamm.%I MINVALUE -1 START -1', relname);\n"
    "  END IF;\n"
    "  INSERT INTO aamm.galloc_range (seqname, range_start, range_end)\n"
    "    VALUES (galloc_supply.seqname, galloc_supply.range_start, galloc_supply.range_end);\n"
    "END\n"
    "$f$;\n"
    "REVOKE ALL ON FUNCTION aamm.galloc_supply(text, bigint, bigint) FROM PUBLIC;\n";

/* ====================================================================================
 * Helpers
 * ==================================================================================== */

static int seterr(char *err, size_t size, int code, const char *fmt, ...) AAMM_PRINTF(4, 5);
static int seterr(char *err, size_t size, int code, const char *fmt, ...)
{
    va_list ap;
    if (err != NULL && size > 0) {
        va_start(ap, fmt);
        vsnprintf(err, size, fmt, ap);
        va_end(ap);
    }
    return code;
}

/* The code for a failed result on @conn: the connection is gone or the server said no. */
static int pgfail(PGconn *conn, char *err, size_t size, const char *what)
{
    const char *msg = PQerrorMessage(conn);
    size_t len = strlen(msg);
    while (len > 0 && (msg[len - 1] == '\n' || msg[len - 1] == ' '))
        len--;
    return seterr(err, size, PQstatus(conn) == CONNECTION_OK ? AAMM_ESERVER : AAMM_ECONN,
                  "seq: %s: %.*s", what, (int)len, msg);
}

/* Run @sql (no result rows wanted). */
static int run(PGconn *conn, const char *sql, char *err, size_t size, const char *what)
{
    PGresult *res = PQexec(conn, sql);
    int ok = PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK;
    PQclear(res);
    return ok ? 0 : pgfail(conn, err, size, what);
}

static void rollback(PGconn *conn)
{
    PQclear(PQexec(conn, "ROLLBACK"));
}

/* ====================================================================================
 * Install
 * ==================================================================================== */

int aamm_seq_install(struct pg_conn *conn, int node_id, char *err, size_t errsize)
{
    char sql[256];
    int rc;
    if (conn == NULL)
        return seterr(err, errsize, AAMM_EINVAL, "seq: install: no connection");
    if (node_id < 0 || node_id > AAMM_SNOWFLAKE_MAX_NODE)
        return seterr(err, errsize, AAMM_EINVAL, "seq: install: node id %d outside 0..%d", node_id,
                      AAMM_SNOWFLAKE_MAX_NODE);
    if ((rc = run(conn, "BEGIN", err, errsize, "install")) < 0)
        return rc;
    /* Two installs at once would race on CREATE ... IF NOT EXISTS: serialize them. */
    /* SET LOCAL: re-installing must not flood the host's notice processor ("already
     * exists, skipping"). */
    if ((rc = run(conn, "SET LOCAL client_min_messages = warning", err, errsize, "install")) < 0 ||
        (rc = run(conn, "SELECT pg_advisory_xact_lock(1633774957, 0)", err, errsize, "install")) <
            0 ||
        (rc = run(conn, aamm__seq_sql_install, err, errsize, "install")) < 0)
        goto fail;
    snprintf(sql, sizeof sql,
             "INSERT INTO aamm.seq_config (node_id, epoch_ms) VALUES (%d, %" PRId64 ") "
             "ON CONFLICT (one) DO UPDATE SET node_id = EXCLUDED.node_id, "
             "epoch_ms = EXCLUDED.epoch_ms",
             node_id, AAMM_SNOWFLAKE_EPOCH_MS);
    if ((rc = run(conn, sql, err, errsize, "install: node id")) < 0)
        goto fail;
    return run(conn, "COMMIT", err, errsize, "install: commit");
fail:
    rollback(conn);
    return rc;
}

/* ====================================================================================
 * galloc ranges for the SQL function
 * ==================================================================================== */

int aamm_galloc_supply_node(struct pg_conn *conn, const char *seqname, int64_t start, int64_t end,
                            char *err, size_t errsize)
{
    char a[32], b[32];
    const char *params[3];
    PGresult *res;
    int ok;
    if (conn == NULL || seqname == NULL || *seqname == '\0')
        return seterr(err, errsize, AAMM_EINVAL, "seq: galloc supply: missing argument");
    if (start < 0 || end <= start)
        return seterr(err, errsize, AAMM_EINVAL,
                      "seq: galloc supply: \"%s\": invalid range [%" PRId64 ", %" PRId64 ")",
                      seqname, start, end);
    snprintf(a, sizeof a, "%" PRId64, start);
    snprintf(b, sizeof b, "%" PRId64, end);
    params[0] = seqname;
    params[1] = a;
    params[2] = b;
    res = PQexecParams(conn, "SELECT aamm.galloc_supply($1, $2::bigint, $3::bigint)", 3, NULL,
                       params, NULL, NULL, 0);
    ok = PQresultStatus(res) == PGRES_TUPLES_OK;
    PQclear(res);
    return ok ? 0 : pgfail(conn, err, errsize, "galloc supply");
}

int aamm_galloc_node_remaining(struct pg_conn *conn, const char *seqname, int64_t *remaining,
                               char *err, size_t errsize)
{
    const char *params[1];
    PGresult *res;
    if (conn == NULL || seqname == NULL || remaining == NULL)
        return seterr(err, errsize, AAMM_EINVAL, "seq: galloc remaining: missing argument");
    params[0] = seqname;
    res = PQexecParams(conn, "SELECT aamm.galloc_remaining($1)", 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        PQclear(res);
        return pgfail(conn, err, errsize, "galloc remaining");
    }
    *remaining = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    return 0;
}

/* ====================================================================================
 * Serial / identity columns of replicated tables
 * ==================================================================================== */

static const char find_sql[] =
    "SELECT DISTINCT n.nspname, c.relname, a.attname,\n"
    "  format_type(a.atttypid, a.atttypmod),\n"
    "  CASE a.attidentity WHEN 'a' THEN 'identity always'\n"
    "                     WHEN 'd' THEN 'identity by default'\n"
    "       ELSE CASE WHEN pg_get_serial_sequence(format('%I.%I', n.nspname, c.relname),\n"
    "                                             a.attname) IS NOT NULL\n"
    "                 THEN 'serial' ELSE 'nextval' END END,\n"
    "  coalesce(pg_get_serial_sequence(format('%I.%I', n.nspname, c.relname), a.attname),\n"
    "           (SELECT dep.refobjid::regclass::text FROM pg_depend dep\n"
    "             WHERE dep.classid = 'pg_attrdef'::regclass AND dep.objid = d.oid\n"
    "               AND dep.refclassid = 'pg_class'::regclass\n"
    "               AND (SELECT relkind FROM pg_class WHERE oid = dep.refobjid) = 'S'\n"
    "             LIMIT 1), ''),\n"
    "  a.attnum\n"
    "FROM pg_publication_tables pt\n"
    "JOIN pg_namespace n ON n.nspname = pt.schemaname\n"
    "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename\n"
    "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped\n"
    "LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum\n"
    "WHERE ($1::text IS NULL OR pt.pubname = $1)\n"
    "  AND n.nspname <> 'aamm'\n"
    "  AND (a.attidentity <> '' OR pg_get_expr(d.adbin, d.adrelid) ~ '^nextval\\(')\n"
    "ORDER BY 1, 2, 7";

void aamm_seq_serials_free(struct aamm_seq_serials *list)
{
    if (list == NULL)
        return;
    for (size_t i = 0; i < list->n; i++) {
        struct aamm_seq_serial *s = &list->items[i];
        aamm__free(s->schema);
        aamm__free(s->table);
        aamm__free(s->column);
        aamm__free(s->type);
        aamm__free(s->kind);
        aamm__free(s->sequence);
    }
    aamm__free(list->items);
    aamm__free(list);
}

int aamm_seq_find_serials(struct pg_conn *conn, const char *publication,
                          struct aamm_seq_serials **out, char *err, size_t errsize)
{
    const char *params[1];
    struct aamm_seq_serials *list;
    PGresult *res;
    int rows;
    if (conn == NULL || out == NULL)
        return seterr(err, errsize, AAMM_EINVAL, "seq: find serials: missing argument");
    *out = NULL;
    params[0] = publication;
    res = PQexecParams(conn, find_sql, 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        PQclear(res);
        return pgfail(conn, err, errsize, "find serials");
    }
    rows = PQntuples(res);
    list = aamm__calloc(1, sizeof *list);
    if (list == NULL ||
        (rows > 0 && (list->items = aamm__calloc((size_t)rows, sizeof *list->items)) == NULL)) {
        aamm__free(list);
        PQclear(res);
        return seterr(err, errsize, AAMM_ENOMEM, "seq: find serials: out of memory");
    }
    for (int i = 0; i < rows; i++) {
        struct aamm_seq_serial *s = &list->items[i];
        list->n++;
        s->schema = aamm__strdup(PQgetvalue(res, i, 0));
        s->table = aamm__strdup(PQgetvalue(res, i, 1));
        s->column = aamm__strdup(PQgetvalue(res, i, 2));
        s->type = aamm__strdup(PQgetvalue(res, i, 3));
        s->kind = aamm__strdup(PQgetvalue(res, i, 4));
        s->sequence = aamm__strdup(PQgetvalue(res, i, 5));
        if (s->schema == NULL || s->table == NULL || s->column == NULL || s->type == NULL ||
            s->kind == NULL || s->sequence == NULL) {
            aamm_seq_serials_free(list);
            PQclear(res);
            return seterr(err, errsize, AAMM_ENOMEM, "seq: find serials: out of memory");
        }
    }
    PQclear(res);
    *out = list;
    return 0;
}

/* ALTER TABLE "schema"."table" ALTER COLUMN "column" + @what, heap string or NULL. */
static char *alter_sql(PGconn *conn, const struct aamm_seq_serial *s, const char *what)
{
    char *sch = PQescapeIdentifier(conn, s->schema, strlen(s->schema));
    char *tab = PQescapeIdentifier(conn, s->table, strlen(s->table));
    char *col = PQescapeIdentifier(conn, s->column, strlen(s->column));
    char *sql = NULL;
    if (sch != NULL && tab != NULL && col != NULL)
        sql = aamm__asprintf("ALTER TABLE %s.%s ALTER COLUMN %s %s", sch, tab, col, what);
    PQfreemem(sch);
    PQfreemem(tab);
    PQfreemem(col);
    return sql;
}

static bool is_bigint(const char *type)
{
    return strcmp(type, "bigint") == 0;
}

int aamm_seq_convert(struct pg_conn *conn, const struct aamm_seq_serials *list,
                     enum aamm_seq_generator gen, int flags, char *err, size_t errsize)
{
    int rc;
    if (conn == NULL || list == NULL || (gen != AAMM_SEQ_SNOWFLAKE && gen != AAMM_SEQ_GALLOC) ||
        (flags & ~AAMM_SEQ_CONVERT_WIDEN) != 0)
        return seterr(err, errsize, AAMM_EINVAL, "seq: convert: invalid argument");
    /* 1. Refuse before changing anything: snowflake ids need 63 bits. */
    if (gen == AAMM_SEQ_SNOWFLAKE && !(flags & AAMM_SEQ_CONVERT_WIDEN)) {
        for (size_t i = 0; i < list->n; i++)
            if (!is_bigint(list->items[i].type))
                return seterr(err, errsize, AAMM_EUNSUITABLE,
                              "seq: convert: %s.%s.%s is %s: snowflake ids need bigint "
                              "(widen it with AAMM_SEQ_CONVERT_WIDEN or use galloc)",
                              list->items[i].schema, list->items[i].table, list->items[i].column,
                              list->items[i].type);
    }
    if ((rc = run(conn, "BEGIN", err, errsize, "convert")) < 0)
        return rc;
    /* 2. Per column: drop identity, widen if asked, set the generator as default. */
    for (size_t i = 0; i < list->n; i++) {
        const struct aamm_seq_serial *s = &list->items[i];
        char *name, *lit, *what, *sql;
        if (strncmp(s->kind, "identity", 8) == 0) {
            sql = alter_sql(conn, s, "DROP IDENTITY IF EXISTS");
            if (sql == NULL) {
                rc = seterr(err, errsize, AAMM_ENOMEM, "seq: convert: out of memory");
                goto fail;
            }
            rc = run(conn, sql, err, errsize, "convert: drop identity");
            aamm__free(sql);
            if (rc < 0)
                goto fail;
        }
        if (gen == AAMM_SEQ_SNOWFLAKE && !is_bigint(s->type)) {
            sql = alter_sql(conn, s, "TYPE bigint");
            if (sql == NULL) {
                rc = seterr(err, errsize, AAMM_ENOMEM, "seq: convert: out of memory");
                goto fail;
            }
            rc = run(conn, sql, err, errsize, "convert: widen to bigint");
            aamm__free(sql);
            if (rc < 0)
                goto fail;
        }
        name = gen == AAMM_SEQ_SNOWFLAKE
                   ? aamm__asprintf("%s.%s", s->schema, s->table)
                   : aamm__asprintf("%s.%s.%s", s->schema, s->table, s->column);
        lit = name != NULL ? PQescapeLiteral(conn, name, strlen(name)) : NULL;
        what = lit != NULL
                   ? aamm__asprintf(
                         "SET DEFAULT aamm.%s(%s)",
                         gen == AAMM_SEQ_SNOWFLAKE ? "snowflake_nextval" : "galloc_nextval", lit)
                   : NULL;
        sql = what != NULL ? alter_sql(conn, s, what) : NULL;
        aamm__free(name);
        PQfreemem(lit);
        aamm__free(what);
        if (sql == NULL) {
            rc = seterr(err, errsize, AAMM_ENOMEM, "seq: convert: out of memory");
            goto fail;
        }
        rc = run(conn, sql, err, errsize, "convert: set default");
        aamm__free(sql);
        if (rc < 0)
            goto fail;
    }
    return run(conn, "COMMIT", err, errsize, "convert: commit");
fail:
    rollback(conn);
    return rc;
}
