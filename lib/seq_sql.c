/* seq_sql.c: the SQL side of the seq component: installing aamm.snowflake_nextval(),
 * aamm.uuid_v7() and aamm.galloc_nextval() on a node (through the one schema installer),
 * supplying galloc ranges, and finding/converting serial and identity columns of
 * replicated tables. */
#include "config.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include <aamm/seq.h>

#include "internal.h"
#include "node_schema.h"
#include "pgglue.h"
#include "seq_int.h"

/* The SQL generators themselves (aamm.snowflake_nextval(), aamm.uuid_v7(),
 * aamm.galloc_nextval(), ...) are part of libaamm's one versioned schema
 * (sql/aamm--1--2.sql, which says how they work; doc/sequences.md): aamm_seq_install()
 * runs the one installer and stores this node's id in the same transaction. */

/* ====================================================================================
 * Install
 * ==================================================================================== */

int aamm_seq_install(struct pg_conn *conn, uint32_t node_id, char *err, size_t errsize)
{
    char sql[256];
    if (conn == NULL)
        return aamm__pg_seterr(err, errsize, AAMM_EINVAL, "seq: install: no connection");
    /* aamm.seq_config's CHECK still allows 0 (schema 1--2 is released); C gives 1..1023 */
    if (!aamm_node_id_valid(node_id))
        return aamm__pg_seterr(err, errsize, AAMM_EINVAL,
                               "seq: install: node id %" PRIu32 " outside 1..%d", node_id,
                               AAMM_NODE_ID_MAX);
    /* node-local: never part of the schema scripts */
    snprintf(sql, sizeof sql,
             "INSERT INTO aamm.seq_config (node_id, epoch_ms) VALUES (%" PRIu32 ", %" PRId64 ") "
             "ON CONFLICT (one) DO UPDATE SET node_id = EXCLUDED.node_id, "
             "epoch_ms = EXCLUDED.epoch_ms",
             node_id, AAMM_SNOWFLAKE_EPOCH_MS);
    return aamm__schema_install(conn, 0, sql, "seq: install", err, errsize);
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
        return aamm__pg_seterr(err, errsize, AAMM_EINVAL, "seq: galloc supply: missing argument");
    if (start < 0 || end <= start)
        return aamm__pg_seterr(err, errsize, AAMM_EINVAL,
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
    return ok ? 0 : aamm__pg_fail(conn, "seq: galloc supply", err, errsize);
}

int aamm_galloc_node_remaining(struct pg_conn *conn, const char *seqname, int64_t *remaining,
                               char *err, size_t errsize)
{
    const char *params[1];
    PGresult *res;
    if (conn == NULL || seqname == NULL || remaining == NULL)
        return aamm__pg_seterr(err, errsize, AAMM_EINVAL, "seq: galloc remaining: missing argument");
    params[0] = seqname;
    res = PQexecParams(conn, "SELECT aamm.galloc_remaining($1)", 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        PQclear(res);
        return aamm__pg_fail(conn, "seq: galloc remaining", err, errsize);
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
        return aamm__pg_seterr(err, errsize, AAMM_EINVAL, "seq: find serials: missing argument");
    *out = NULL;
    params[0] = publication;
    res = PQexecParams(conn, find_sql, 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        PQclear(res);
        return aamm__pg_fail(conn, "seq: find serials", err, errsize);
    }
    rows = PQntuples(res);
    list = aamm__calloc(1, sizeof *list);
    if (list == NULL ||
        (rows > 0 && (list->items = aamm__calloc((size_t)rows, sizeof *list->items)) == NULL)) {
        aamm__free(list);
        PQclear(res);
        return aamm__pg_seterr(err, errsize, AAMM_ENOMEM, "seq: find serials: out of memory");
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
            return aamm__pg_seterr(err, errsize, AAMM_ENOMEM, "seq: find serials: out of memory");
        }
    }
    PQclear(res);
    *out = list;
    return 0;
}

/* ALTER TABLE "schema"."table" ALTER COLUMN "column" + @what, heap string or NULL. */
static char *alter_sql(PGconn *conn, const struct aamm_seq_serial *s, const char *what)
{
    char *sch = aamm__pg_ident(conn, s->schema);
    char *tab = aamm__pg_ident(conn, s->table);
    char *col = aamm__pg_ident(conn, s->column);
    char *sql = NULL;
    if (sch != NULL && tab != NULL && col != NULL)
        sql = aamm__asprintf("ALTER TABLE %s.%s ALTER COLUMN %s %s", sch, tab, col, what);
    aamm__free(sch);
    aamm__free(tab);
    aamm__free(col);
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
        return aamm__pg_seterr(err, errsize, AAMM_EINVAL, "seq: convert: invalid argument");
    /* 1. Refuse before changing anything: snowflake ids need 63 bits. */
    if (gen == AAMM_SEQ_SNOWFLAKE && !(flags & AAMM_SEQ_CONVERT_WIDEN)) {
        for (size_t i = 0; i < list->n; i++)
            if (!is_bigint(list->items[i].type))
                return aamm__pg_seterr(err, errsize, AAMM_EUNSUITABLE,
                              "seq: convert: %s.%s.%s is %s: snowflake ids need bigint "
                              "(widen it with AAMM_SEQ_CONVERT_WIDEN or use galloc)",
                              list->items[i].schema, list->items[i].table, list->items[i].column,
                              list->items[i].type);
    }
    /* (each node converts its own columns: the ALTERs never travel, ddl.h) */
    if ((rc = aamm__pg_run(conn, "seq: convert", "BEGIN; SET LOCAL aamm.replicate_ddl = off", err,
                           errsize)) < 0)
        return rc;
    /* 2. Per column: drop identity, widen if asked, set the generator as default. */
    for (size_t i = 0; i < list->n; i++) {
        const struct aamm_seq_serial *s = &list->items[i];
        char *name, *lit, *what, *sql;
        if (strncmp(s->kind, "identity", 8) == 0) {
            sql = alter_sql(conn, s, "DROP IDENTITY IF EXISTS");
            if (sql == NULL) {
                rc = aamm__pg_seterr(err, errsize, AAMM_ENOMEM, "seq: convert: out of memory");
                goto fail;
            }
            rc = aamm__pg_run(conn, "seq: convert: drop identity", sql, err, errsize);
            aamm__free(sql);
            if (rc < 0)
                goto fail;
        }
        if (gen == AAMM_SEQ_SNOWFLAKE && !is_bigint(s->type)) {
            sql = alter_sql(conn, s, "TYPE bigint");
            if (sql == NULL) {
                rc = aamm__pg_seterr(err, errsize, AAMM_ENOMEM, "seq: convert: out of memory");
                goto fail;
            }
            rc = aamm__pg_run(conn, "seq: convert: widen to bigint", sql, err, errsize);
            aamm__free(sql);
            if (rc < 0)
                goto fail;
        }
        name = gen == AAMM_SEQ_SNOWFLAKE
                   ? aamm__asprintf("%s.%s", s->schema, s->table)
                   : aamm__asprintf("%s.%s.%s", s->schema, s->table, s->column);
        lit = name != NULL ? aamm__pg_literal(conn, name) : NULL;
        what = lit != NULL
                   ? aamm__asprintf(
                         "SET DEFAULT aamm.%s(%s)",
                         gen == AAMM_SEQ_SNOWFLAKE ? "snowflake_nextval" : "galloc_nextval", lit)
                   : NULL;
        sql = what != NULL ? alter_sql(conn, s, what) : NULL;
        aamm__free(name);
        aamm__free(lit);
        aamm__free(what);
        if (sql == NULL) {
            rc = aamm__pg_seterr(err, errsize, AAMM_ENOMEM, "seq: convert: out of memory");
            goto fail;
        }
        rc = aamm__pg_run(conn, "seq: convert: set default", sql, err, errsize);
        aamm__free(sql);
        if (rc < 0)
            goto fail;
    }
    return aamm__pg_run(conn, "seq: convert: commit", "COMMIT", err, errsize);
fail:
    aamm__pg_rollback(conn);
    return rc;
}
