/* test_node_schema.c: the one installer of libaamm's SQL schema (lib/node_schema.c, the
 * scripts of sql/): version 1 upgraded to the current one, install twice, refuse a newer
 * schema, and the C<->SQL contract's names present in what it installs. */
#include "config.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include <aamm/ddl.h>
#include <aamm/node.h>
#include <aamm/seq.h>

#include "node_schema.h"
#include "pgfixture.h"
#include "sql_contract.h"
#include "testutil.h"

static char *value(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    ck_assert_msg(PQresultStatus(r) == PGRES_TUPLES_OK, "%s: %s", sql, PQerrorMessage(c));
    char *v = PQntuples(r) && !PQgetisnull(r, 0, 0) ? strdup(PQgetvalue(r, 0, 0)) : NULL;
    PQclear(r);
    return v;
}

static bool is(PGconn *c, const char *sql, const char *want)
{
    char *v = value(c, sql);
    bool ok = v && strcmp(v, want) == 0;
    if (!ok)
        fprintf(stderr, "%s: got %s, want %s\n", sql, v ? v : "NULL", want);
    free(v);
    return ok;
}

static int installed_version(PGconn *c)
{
    char err[256];
    int v = -1;
    ck_assert_msg(aamm__schema_version(c, &v, "test", err, sizeof err) == 0, "%s", err);
    return v;
}

/* The scripts reach the version node.h announces, through a path from nothing. */
START_TEST(scripts_reach_the_announced_version)
{
    ck_assert_int_eq(aamm__schema_known(), AAMM_NODE_SQL_VERSION);
    int v = 0;
    for (int guard = 0; v < AAMM_NODE_SQL_VERSION && guard < 100; guard++) {
        int next = v;
        for (size_t i = 0; i < aamm__sql_nscripts; i++)
            if (aamm__sql_scripts[i].from == v && aamm__sql_scripts[i].to > next)
                next = aamm__sql_scripts[i].to;
        ck_assert_int_gt(next, v);
        v = next;
    }
    ck_assert_int_eq(v, AAMM_NODE_SQL_VERSION);
}
END_TEST

/* A node at version 1 (the kept script sql/aamm--1.sql, what the library installed before
 * versioned scripts), with data in it, upgrades to the current version in one call: the
 * later objects appear, old tombstone labels are rewritten, data stays; and its functions
 * are then those of a fresh install. */
START_TEST(install_v1_then_upgrade)
{
    struct pgfx *fx = pgfx_start(1, NULL);
    ck_assert_ptr_nonnull(fx);
    PGconn *c = pgfx_connect(fx, 0);
    ck_assert_ptr_nonnull(c);
    char err[512];
    ck_assert_int_eq(installed_version(c), 0);
    ck_assert_msg(aamm__schema_install(c, 1, NULL, "test: v1", err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(installed_version(c), 1);
    ck_assert(is(c, "SELECT to_regprocedure('aamm.recheck_tombs(text, jsonb[], timestamptz, "
                    "int, text, boolean)') IS NULL",
                 "t"));
    ck_assert(is(c, "SELECT to_regclass('aamm.seq_config') IS NULL", "t"));
    ck_assert(is(c, "SELECT prosecdef FROM pg_proc WHERE oid = "
                    "'aamm.origin_session(text)'::regprocedure",
                 "f"));
    /* data written at version 1: tombstones under the old, ambiguous labels */
    ck_assert_int_eq(pgfx_exec_conn(c, "INSERT INTO aamm.tombstone VALUES ('public.plain', "
                                       "'[1]'), ('Mixed.Case', '[2]'), ('s.a.b', '[3]')"),
                     0);

    ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(installed_version(c), AAMM_NODE_SQL_VERSION);
    ck_assert(is(c, "SELECT to_regprocedure('aamm.recheck_tombs(text, jsonb[], timestamptz, "
                    "int, text, boolean)') IS NOT NULL",
                 "t"));
    ck_assert(is(c, "SELECT to_regclass('aamm.seq_config') IS NOT NULL", "t"));
    ck_assert(is(c, "SELECT prosecdef FROM pg_proc WHERE oid = "
                    "'aamm.origin_session(text)'::regprocedure",
                 "t"));
    ck_assert(is(c, "SELECT string_agg(relation || ' ' || key::text, ', ' ORDER BY key::text) "
                    "FROM aamm.tombstone",
                 "public.plain [1], \"Mixed\".\"Case\" [2], s.\"a.b\" [3]"));

    /* the same functions, definitions and privileges as a fresh install */
    static const char fingerprint[] =
        "SELECT md5(string_agg(p.oid::regprocedure::text || ' ' || p.prosecdef || ' ' || "
        "coalesce(p.proacl::text, '-') || ' ' || coalesce(p.proconfig::text, '-') || ' ' || "
        "p.prosrc, E'\\n' ORDER BY p.oid::regprocedure::text)) FROM pg_proc p "
        "WHERE p.pronamespace = 'aamm'::regnamespace";
    char *upgraded = value(c, fingerprint);
    ck_assert_int_eq(pgfx_exec_conn(c, "CREATE DATABASE fresh"), 0);
    char ci[512];
    snprintf(ci, sizeof ci, "%s", pgfx_conninfo(fx, 0));
    char *db = strstr(ci, "dbname=postgres");
    ck_assert_ptr_nonnull(db);
    memcpy(db, "dbname=fresh   ", strlen("dbname=postgres"));
    PGconn *f = PQconnectdb(ci);
    ck_assert_msg(PQstatus(f) == CONNECTION_OK, "%s", PQerrorMessage(f));
    ck_assert_msg(aamm_node_install(f, err, sizeof err) == 0, "%s", err);
    char *fresh = value(f, fingerprint);
    ck_assert_ptr_nonnull(upgraded);
    ck_assert_ptr_nonnull(fresh);
    ck_assert_str_eq(upgraded, fresh);
    free(upgraded);
    free(fresh);
    PQfinish(f);
    PQfinish(c);
    pgfx_destroy(fx);
}
END_TEST

/* Version 5 to 6 on a node that already replicates a table: the table gets the TRUNCATE
 * guard, the publication "aamm" stops publishing truncate, the DDL allow-list holds
 * TRUNCATE TABLE, and a plain TRUNCATE is refused once capture is on. */
START_TEST(upgrade_5_to_6_guards_truncate)
{
    struct pgfx *fx = pgfx_start(1, NULL);
    ck_assert_ptr_nonnull(fx);
    PGconn *c = pgfx_connect(fx, 0);
    ck_assert_ptr_nonnull(c);
    char err[512];
    ck_assert_msg(aamm__schema_install(c, 5, NULL, "test: v5", err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(installed_version(c), 5);
    /* what aamm_node_replicate_table() made at version 5: tombstone triggers, a publication
     * with every action */
    ck_assert_int_eq(pgfx_exec_conn(c, "CREATE TABLE t (id int PRIMARY KEY); "
                                       "CREATE TRIGGER aamm_tombstone_del AFTER DELETE ON t FOR "
                                       "EACH ROW EXECUTE FUNCTION aamm.tombstone_trigger('id'); "
                                       "CREATE PUBLICATION aamm FOR TABLE t"),
                     0);
    ck_assert(is(c, "SELECT pubtruncate FROM pg_publication WHERE pubname = 'aamm'", "t"));
    ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(installed_version(c), AAMM_NODE_SQL_VERSION);
    ck_assert(is(c, "SELECT pubtruncate::text || pubinsert::text || pubupdate::text || "
                    "pubdelete::text FROM pg_publication WHERE pubname = 'aamm'",
                 "falsetruetruetrue"));
    ck_assert(is(c, "SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass AND tgname = '"
                    AAMM_SQL_TRUNCATE_GUARD "'",
                 "1"));
    ck_assert(is(c, "SELECT 'TRUNCATE TABLE' = ANY (allowed) FROM aamm.ddl_config", "t"));
    ck_assert_int_eq(pgfx_exec_conn(c, "INSERT INTO t VALUES (1); TRUNCATE t"), 0); /* capture off */
    ck_assert_msg(aamm_ddl_configure(c, true, true, err, sizeof err) == 0, "%s", err);
    PGresult *res = PQexec(c, "TRUNCATE t");
    ck_assert_int_eq(PQresultStatus(res), PGRES_FATAL_ERROR);
    ck_assert_str_eq(PQresultErrorField(res, PG_DIAG_SQLSTATE), AAMM_SQLSTATE_DDL_REFUSED);
    PQclear(res);
    PQfinish(c);
    pgfx_destroy(fx);
}
END_TEST

/* Installing again, through either entry point, changes nothing and fails nothing; the
 * host's session is left as it was (no lingering transaction or setting). */
START_TEST(install_twice)
{
    struct pgfx *fx = pgfx_start(1, NULL);
    ck_assert_ptr_nonnull(fx);
    PGconn *c = pgfx_connect(fx, 0);
    ck_assert_ptr_nonnull(c);
    char err[512];
    ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(pgfx_exec_conn(c, "INSERT INTO aamm.tombstone VALUES ('public.t', '[1]')"),
                     0);
    ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "again: %s", err);
    ck_assert_msg(aamm_seq_install(c, 7, err, sizeof err) == 0, "seq: %s", err);
    ck_assert_msg(aamm_seq_install(c, 8, err, sizeof err) == 0, "seq again: %s", err);
    ck_assert_int_eq(installed_version(c), AAMM_NODE_SQL_VERSION);
    ck_assert(is(c, "SELECT count(*) FROM aamm.apply_meta", "1"));
    ck_assert(is(c, "SELECT count(*) FROM aamm.tombstone", "1"));
    ck_assert(is(c, "SELECT node_id FROM aamm.seq_config", "8"));
    ck_assert_int_eq(PQtransactionStatus(c), PQTRANS_IDLE);
    ck_assert(is(c, "SHOW client_min_messages", "notice"));
    PQfinish(c);
    pgfx_destroy(fx);
}
END_TEST

/* A schema newer than this library knows is refused with a message that says what to do,
 * by both entry points, and nothing is changed. */
START_TEST(refuse_newer)
{
    struct pgfx *fx = pgfx_start(1, NULL);
    ck_assert_ptr_nonnull(fx);
    PGconn *c = pgfx_connect(fx, 0);
    ck_assert_ptr_nonnull(c);
    char err[512], want[256];
    ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(pgfx_exec_conn(c, "UPDATE aamm.apply_meta SET version = %d; "
                                       "DROP FUNCTION aamm.write_raced(text, jsonb)",
                                    AAMM_NODE_SQL_VERSION + 1),
                     0);
    snprintf(want, sizeof want,
             "node: install: this node's schema is version %d; this library knows up to %d: "
             "upgrade the library",
             AAMM_NODE_SQL_VERSION + 1, AAMM_NODE_SQL_VERSION);
    ck_assert_int_eq(aamm_node_install(c, err, sizeof err), AAMM_EUNSUPPORTED);
    ck_assert_str_eq(err, want);
    ck_assert_int_eq(aamm_seq_install(c, 1, err, sizeof err), AAMM_EUNSUPPORTED);
    ck_assert_ptr_nonnull(strstr(err, "upgrade the library"));
    ck_assert_int_eq(PQtransactionStatus(c), PQTRANS_IDLE);
    ck_assert(is(c, "SELECT to_regproc('aamm.write_raced') IS NULL", "t"));
    ck_assert(is(c, "SELECT count(*) FROM aamm.seq_config", "0"));
    PQfinish(c);
    pgfx_destroy(fx);
}
END_TEST

/* Every name of the C<->SQL contract (sql_contract.h) exists in the installed schema (by
 * name: aamm.decide has two argument lists since version 5), the decision function apply
 * calls has the argument list it builds, and every SQLSTATE and notice it names is raised
 * by some function there. */
START_TEST(contract_names_exist)
{
    struct pgfx *fx = pgfx_start(1, NULL);
    ck_assert_ptr_nonnull(fx);
    PGconn *c = pgfx_connect(fx, 0);
    ck_assert_ptr_nonnull(c);
    char err[512], sql[512];
    ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "%s", err);
    static const char *const fns[] = {
        AAMM_SQL_FN_ORIGIN_SESSION, AAMM_SQL_FN_GUARD_FAILED,    AAMM_SQL_FN_KEY_LOCK_BUSY,
        AAMM_SQL_FN_DECIDE,         AAMM_SQL_FN_INSERT_OK,       AAMM_SQL_FN_UPDATE_MISSING,
        AAMM_SQL_FN_DELETE_MISSING, AAMM_SQL_FN_PUT_TOMBSTONE,   AAMM_SQL_FN_RECHECK_TOMBS,
        AAMM_SQL_FN_WRITE_RACED,    AAMM_SQL_FN_APPLY_SLOW,      AAMM_SQL_FN_LOG_CONFLICT,
        AAMM_SQL_FN_LOG_TRUNCATE,   AAMM_SQL_FN_GC_TOMBSTONES,   AAMM_SQL_FN_APPLY_DDL,
        AAMM_SQL_TRUNCATE_GUARD_FN};
    for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
        snprintf(sql, sizeof sql,
                 "SELECT count(*) > 0 FROM pg_proc WHERE pronamespace = 'aamm'::regnamespace "
                 "AND 'aamm.' || proname = '%s'",
                 fns[i]);
        ck_assert_msg(is(c, sql, "t"), "%s", fns[i]);
    }
    ck_assert(is(c,
                 "SELECT to_regprocedure('" AAMM_SQL_FN_DECIDE "(text, text, jsonb, xid, jsonb, "
                 "jsonb, timestamptz, int, text, jsonb)') IS NOT NULL",
                 "t"));
    ck_assert(is(c, "SELECT to_regclass('" AAMM_SQL_TOMBSTONE_TABLE "') IS NOT NULL", "t"));
    ck_assert(is(c, "SELECT to_regclass('" AAMM_SQL_VERSION_TABLE "') IS NOT NULL", "t"));
    ck_assert(is(c, "SELECT to_regclass('" AAMM_SQL_DDL_REQUEST_TABLE "') IS NOT NULL", "t"));
    ck_assert(is(c, "SELECT to_regprocedure('aamm.ddl_execute(text, interval)') IS NOT NULL", "t"));
    static const char *const raised[] = {
        AAMM_SQLSTATE_POLICY_ERROR, AAMM_SQLSTATE_GUARD,  AAMM_SQLSTATE_RESOLVER,
        AAMM_SQLSTATE_KEY_LOCK_BUSY, AAMM_SQLSTATE_RACED, AAMM_SQLSTATE_DDL_REFUSED,
        AAMM_SQLSTATE_DDL_REQUEST, "''" AAMM_SQL_GUC_DDL_TOKEN "''",
        "''" AAMM_SQL_DDL_CHANNEL "''", "''" AAMM_SQL_NOTICE_CONFLICT "''",
        "''" AAMM_SQL_NOTICE_CONFLICT_UNLOGGED "''"};
    for (size_t i = 0; i < sizeof raised / sizeof raised[0]; i++) {
        snprintf(sql, sizeof sql,
                 "SELECT count(*) > 0 FROM pg_proc WHERE pronamespace = 'aamm'::regnamespace "
                 "AND strpos(prosrc, '%s') > 0",
                 raised[i]);
        ck_assert_msg(is(c, sql, "t"), "%s", raised[i]);
    }
    PQfinish(c);
    pgfx_destroy(fx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("node_schema");
    TCase *tc = aamm_test_tcase("schema", 120);
    tcase_add_test(tc, scripts_reach_the_announced_version);
    tcase_add_test(tc, install_v1_then_upgrade);
    tcase_add_test(tc, upgrade_5_to_6_guards_truncate);
    tcase_add_test(tc, install_twice);
    tcase_add_test(tc, refuse_newer);
    tcase_add_test(tc, contract_names_exist);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
