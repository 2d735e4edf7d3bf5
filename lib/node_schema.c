/* node_schema.c: the one installer of libaamm's SQL schema: the versioned scripts of sql/
 * (embedded by sql/sql2c.awk), run in order in one transaction under one lock. */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "node_schema.h"
#include "pgglue.h"
#include "sql_contract.h"

int aamm__schema_known(void)
{
    int known = 0;
    for (size_t i = 0; i < aamm__sql_nscripts; i++)
        if (aamm__sql_scripts[i].to > known)
            known = aamm__sql_scripts[i].to;
    return known;
}

/* The script that starts at version @from and goes furthest without passing @upto (a
 * direct script, aamm--1--3.sql, beats two steps), or NULL. */
static const struct aamm__sql_script *next_script(int from, int upto)
{
    const struct aamm__sql_script *best = NULL;
    for (size_t i = 0; i < aamm__sql_nscripts; i++) {
        const struct aamm__sql_script *s = &aamm__sql_scripts[i];
        if (s->from == from && s->to > from && s->to <= upto && (!best || s->to > best->to))
            best = s;
    }
    return best;
}

int aamm__schema_version(PGconn *conn, int *version, const char *what, char *err,
                         size_t errsize)
{
    *version = 0;
    if (!conn || PQstatus(conn) != CONNECTION_OK)
        return aamm__pg_seterr(err, errsize, AAMM_ECONN, "%s: not connected", what);
    /* two statements: the second names a table that may not exist */
    PGresult *res = PQexec(conn, "SELECT pg_catalog.to_regclass('" AAMM_SQL_VERSION_TABLE
                                 "') IS NOT NULL");
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        PQclear(res);
        return aamm__pg_fail(conn, what, err, errsize);
    }
    bool exists = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    PQclear(res);
    if (!exists)
        return 0;
    res = PQexec(conn, "SELECT COALESCE(pg_catalog.max(version), 0) FROM "
                       AAMM_SQL_VERSION_TABLE);
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        PQclear(res);
        return aamm__pg_fail(conn, what, err, errsize);
    }
    *version = atoi(PQgetvalue(res, 0, 0));
    PQclear(res);
    return 0;
}

int aamm__schema_install(PGconn *conn, int upto, const char *then_sql, const char *what,
                         char *err, size_t errsize)
{
    int known = aamm__schema_known();
    if (upto <= 0 || upto > known)
        upto = known;

    /* 1. one transaction, one lock: a concurrent install waits, then finds the version
     *    this one reached; notices ("already exists, skipping") stay out of the host's
     *    notice processor */
    int rc = aamm__pg_run(conn, what,
                          "BEGIN; SET LOCAL client_min_messages = warning;"
                          " SET LOCAL aamm.replicate_ddl = off;" /* ddl.h: setup never travels */
                          " SELECT " AAMM_SQL_INSTALL_LOCK,
                          err, errsize);
    if (rc < 0)
        goto fail;
    int cur;
    if ((rc = aamm__schema_version(conn, &cur, what, err, errsize)) < 0)
        goto fail;
    if (cur > known) {
        rc = aamm__pg_seterr(err, errsize, AAMM_EUNSUPPORTED,
                             "%s: this node's schema is version %d; this library knows up to "
                             "%d: upgrade the library",
                             what, cur, known);
        goto fail;
    }

    /* 2. the scripts, in order */
    int v = cur;
    while (v < upto) {
        const struct aamm__sql_script *s = next_script(v, upto);
        if (!s) {
            rc = aamm__pg_seterr(err, errsize, AAMM_EINVAL,
                                 "%s: no script takes the schema from version %d towards %d",
                                 what, v, upto);
            goto fail;
        }
        char ctx[128];
        snprintf(ctx, sizeof ctx, "%s: %s", what, s->name);
        if ((rc = aamm__pg_run(conn, ctx, s->text, err, errsize)) < 0)
            goto fail;
        v = s->to;
    }
    if (v != cur) {
        char sql[128];
        snprintf(sql, sizeof sql,
                 "DELETE FROM " AAMM_SQL_VERSION_TABLE "; INSERT INTO " AAMM_SQL_VERSION_TABLE
                 " VALUES (%d)",
                 v);
        if ((rc = aamm__pg_run(conn, what, sql, err, errsize)) < 0)
            goto fail;
    }

    /* 3. the caller's node-local part, 4. commit */
    if (then_sql && (rc = aamm__pg_run(conn, what, then_sql, err, errsize)) < 0)
        goto fail;
    if ((rc = aamm__pg_run(conn, what, "COMMIT", err, errsize)) < 0)
        goto fail;
    return 0;
fail:
    aamm__pg_rollback(conn);
    return rc;
}
