/* test_conflict_rule.c: one decision table, two implementations. Every row (kind ×
 * policy × local version × remote timestamp order × node tiebreak × unknown timestamps ×
 * unchanged-TOAST flag) goes through aamm_conflict_decide() in C and through the SQL
 * function apply runs for that kind (aamm.decide, aamm.insert_ok, aamm.update_missing,
 * aamm.delete_missing) on a real server; both must give the same answer. A host resolver
 * that wants the default answer calls the C function, so it must be the rule that runs.
 * Each decision of aamm.decide also runs with the remote old row absent, equal to the local
 * row, equal in the columns both have, and different, and must be logged exactly as
 * doc/conflicts.md ("What is logged") says (logged_rule() below). */
#include "config.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include <aamm/conflict.h>
#include <aamm/node.h>

#include "pgfixture.h"
#include "sql_contract.h"
#include "testutil.h"

#define T0 INT64_C(1767225600000000) /* 2026-01-01 00:00:00 UTC, microseconds */
#define LOCAL_NODE 5                 /* aamm.node_id of the deciding session */
#define REL "rule.t"

/* A local row version (for the *_missing kinds and insert_exists over a deleted key: the
 * remembered delete's version), made for real: a tombstone row written by a transaction
 * with that commit timestamp and origin. */
struct lver {
    const char *what;
    bool known;       /* false: an xid without a commit timestamp (frozen) */
    int64_t ts;       /* microseconds since the epoch */
    int node;         /* 0: an origin that names no node (SQL NULL) */
    char xmin[16];    /* the writing transaction */
    int key;          /* its tombstone's key [key] in REL, 0: none */
};

static char last_res[32];
static int notices, logged_notices;

/* the conflict notices (sql_contract.h): the resolution is field 9 */
static void on_notice(void *arg, const PGresult *res)
{
    (void)arg;
    const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    const char *d = PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL);
    if (!msg || !d)
        return;
    bool logged = strcmp(msg, AAMM_SQL_NOTICE_CONFLICT) == 0;
    if (!logged && strcmp(msg, AAMM_SQL_NOTICE_CONFLICT_UNLOGGED) != 0)
        return;
    logged_notices += logged;
    int f = 0;
    const char *p = d;
    while (f < 8 && (p = strchr(p, AAMM_SQL_SEP)) != NULL) {
        p++;
        f++;
    }
    ck_assert_ptr_nonnull(p);
    size_t n = strcspn(p, "\x1f");
    snprintf(last_res, sizeof last_res, "%.*s", (int)n, p);
    notices++;
}

static void exec_ok(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    ck_assert_msg(PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK,
                  "%s: %s", sql, PQerrorMessage(c));
    PQclear(r);
}

/* Write the tombstone [key] in a transaction with commit timestamp @ts under origin
 * @origin (NULL: a local transaction, whose timestamp is read back). */
static void make_version(PGconn *c, struct lver *v, const char *origin, int64_t ts, int key)
{
    char sql[512];
    static int lsn = 1;
    v->key = key;
    if (origin) {
        snprintf(sql, sizeof sql, "SELECT pg_replication_origin_session_setup('%s')", origin);
        exec_ok(c, sql);
        exec_ok(c, "BEGIN");
        snprintf(sql, sizeof sql,
                 "SELECT pg_replication_origin_xact_setup('0/%X', '1970-01-01 00:00:00+00'::"
                 "timestamptz + %" PRId64 " * interval '1 microsecond')",
                 lsn++ * 16, ts);
        exec_ok(c, sql);
    } else {
        exec_ok(c, "BEGIN");
    }
    snprintf(sql, sizeof sql,
             "INSERT INTO aamm.tombstone VALUES ('" REL "', '[%d]') RETURNING xmin::text", key);
    PGresult *r = PQexec(c, sql);
    ck_assert_msg(PQresultStatus(r) == PGRES_TUPLES_OK, "%s", PQerrorMessage(c));
    snprintf(v->xmin, sizeof v->xmin, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    exec_ok(c, "COMMIT");
    if (origin) {
        exec_ok(c, "SELECT pg_replication_origin_session_reset()");
    } else {
        snprintf(sql, sizeof sql,
                 "SELECT ((extract(epoch FROM pg_xact_commit_timestamp('%s'::xid)) * 1000000)"
                 "::int8)::text",
                 v->xmin);
        r = PQexec(c, sql);
        ck_assert_msg(PQresultStatus(r) == PGRES_TUPLES_OK, "%s", PQerrorMessage(c));
        ts = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
        PQclear(r);
    }
    v->known = true;
    v->ts = ts;
}

/* What the SQL side answered: a resolution name, "error" (AA001), "resolver" (AA004) or
 * "apply_remote" for a remote write applied without a conflict (no notice). */
static void sql_answer(PGconn *c, const char *sql, char *out, size_t outsize, bool *logged)
{
    notices = 0;
    logged_notices = 0;
    last_res[0] = '\0';
    exec_ok(c, "BEGIN");
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) == PGRES_TUPLES_OK) {
        bool applied = strcmp(PQgetvalue(r, 0, 0), "t") == 0;
        ck_assert_int_le(notices, 1);
        if (notices) {
            snprintf(out, outsize, "%s", last_res);
            /* the boolean apply acts on agrees with the logged resolution */
            ck_assert_msg(applied == (strcmp(last_res, "apply_remote") == 0), "%s: %s vs %d",
                          sql, last_res, applied);
        } else {
            snprintf(out, outsize, "%s", applied ? "apply_remote" : "nothing");
        }
        *logged = logged_notices > 0;
    } else {
        const char *st = PQresultErrorField(r, PG_DIAG_SQLSTATE);
        ck_assert_ptr_nonnull(st);
        if (strcmp(st, AAMM_SQLSTATE_POLICY_ERROR) == 0)
            snprintf(out, outsize, "error");
        else if (strcmp(st, AAMM_SQLSTATE_RESOLVER) == 0)
            snprintf(out, outsize, "resolver");
        else
            ck_abort_msg("%s: %s", sql, PQerrorMessage(c));
        *logged = false;
    }
    PQclear(r);
    exec_ok(c, "ROLLBACK");
}

/* What the C rule answers, in the same words. */
static const char *c_answer(enum aamm_conflict_kind kind, enum aamm_conflict_policy policy,
                            const struct aamm_conflict_version *local,
                            const struct aamm_conflict_version *remote, bool has_u)
{
    enum aamm_resolution r = aamm_conflict_decide(kind, policy, local, remote, has_u);
    if (r == AAMM_RESOLVE_ERROR)
        return policy == AAMM_POLICY_CALLBACK ? "resolver" : "error";
    return aamm_conflict_resolution_name(r);
}

/* The remote old rows aamm.decide is asked with, against the local row DECIDE_LROW: none,
 * the same row, the same in the columns both have (the remote has one more, the local
 * row's other column is not in it), a different value. */
#define DECIDE_LROW "'{\"a\": 1, \"b\": \"x\"}'"
static const char *const old_rows[] = {"NULL", DECIDE_LROW, "'{\"a\": 1, \"z\": 7}'",
                                       "'{\"a\": 2, \"b\": \"x\"}'"};
static const bool old_row_seen[] = {false, true, true, false};

/* Whether a decision is logged (doc/conflicts.md, "What is logged"): every one except a
 * remote UPDATE/DELETE applied over another origin's row whose writer had seen the local
 * row (old row equal) or without an old row to tell. */
static bool logged_rule(enum aamm_conflict_kind kind, const char *res, int old_row)
{
    if (strcmp(res, "apply_remote") != 0 || kind == AAMM_CONFLICT_INSERT_EXISTS)
        return true;
    return strcmp(old_rows[old_row], "NULL") != 0 && !old_row_seen[old_row];
}

/* for messages: T0 + offset in microseconds, or unknown */
static void ts_text(char *buf, size_t n, bool known, int64_t ts)
{
    if (known)
        snprintf(buf, n, "T0%+" PRId64 "us", ts - T0);
    else
        snprintf(buf, n, "unknown");
}

static void ts_sql(char *buf, size_t n, bool known, int64_t ts)
{
    if (known)
        snprintf(buf, n,
                 "('1970-01-01 00:00:00+00'::timestamptz + %" PRId64 " * interval '1 microsecond')",
                 ts);
    else
        snprintf(buf, n, "NULL::timestamptz");
}

/* Every row of the decision table gives the same answer in C and in SQL. */
START_TEST(decision_table_c_equals_sql)
{
    struct pgfx *fx = pgfx_start(1, NULL);
    ck_assert_ptr_nonnull(fx);
    PGconn *c = pgfx_connect(fx, 0);
    ck_assert_ptr_nonnull(c);
    char err[512];
    ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "%s", err);
    PQsetNoticeReceiver(c, on_notice, NULL);
    exec_ok(c, "SET " AAMM_SQL_GUC_NODE_ID " = '5'"); /* LOCAL_NODE */
    exec_ok(c, "SELECT pg_replication_origin_create(n) FROM unnest(ARRAY['aamm_from_1', "
               "'aamm_from_2', 'aamm_from_3', 'other_origin']) n");

    /* 1. the local versions: each node's origin at T0 (tiebreaks below and above the
     *    remote's node, and the remote's own node), an origin that names no node, a local
     *    transaction (node LOCAL_NODE), and an unknown timestamp (a frozen xid) */
    struct lver lv[6];
    memset(lv, 0, sizeof lv);
    const char *origins[3] = {"aamm_from_1", "aamm_from_2", "aamm_from_3"};
    for (int i = 0; i < 3; i++) {
        lv[i].what = origins[i];
        lv[i].node = i + 1;
        make_version(c, &lv[i], origins[i], T0, i + 1);
    }
    lv[3].what = "other_origin";
    lv[3].node = 0;
    make_version(c, &lv[3], "other_origin", T0, 4);
    lv[4].what = "local";
    lv[4].node = LOCAL_NODE;
    make_version(c, &lv[4], NULL, 0, 5);
    lv[5].what = "unknown";
    lv[5].known = false;
    lv[5].ts = T0;
    snprintf(lv[5].xmin, sizeof lv[5].xmin, "2"); /* FrozenTransactionId: no timestamp */
    lv[5].key = 0;

    static const enum aamm_conflict_kind kinds[] = {
        AAMM_CONFLICT_INSERT_EXISTS, AAMM_CONFLICT_UPDATE_ORIGIN_DIFFERS,
        AAMM_CONFLICT_DELETE_ORIGIN_DIFFERS, AAMM_CONFLICT_UPDATE_MISSING,
        AAMM_CONFLICT_DELETE_MISSING};
    static const enum aamm_conflict_policy policies[] = {
        AAMM_POLICY_LWW, AAMM_POLICY_KEEP_LOCAL, AAMM_POLICY_APPLY_REMOTE, AAMM_POLICY_ERROR,
        AAMM_POLICY_CALLBACK};
    int rows = 0, conflicts = 0, unlogged = 0;
    char sql[1024], lts[128], rts[128], rtx[64], got[32];

    /* 2. the product: kind × policy × local version (or none) × remote timestamp (one
     *    microsecond older, equal, newer, unknown) × remote node × unchanged-TOAST flag.
     *    Missing-row kinds compare with the key's tombstone: "none" is a key without one;
     *    a tombstone always has a timestamp. insert_exists over a deleted key is a
     *    conflict only when the delete is not older (doc/conflicts.md): only those rows. */
    for (size_t ki = 0; ki < sizeof kinds / sizeof kinds[0]; ki++) {
        enum aamm_conflict_kind kind = kinds[ki];
        bool missing = kind == AAMM_CONFLICT_UPDATE_MISSING || kind == AAMM_CONFLICT_DELETE_MISSING;
        for (int li = -1; li < 6; li++) {
            if (li == -1 && !missing && kind != AAMM_CONFLICT_INSERT_EXISTS)
                continue;
            if (li == 5 && missing)
                continue;
            const struct lver *l = li >= 0 ? &lv[li] : NULL;
            int64_t base = l ? l->ts : T0;
            for (int dt = -1; dt <= 2; dt++) {
                bool rknown = dt != 2;
                int64_t rt = base + (rknown ? dt : 0);
                for (int rn = 1; rn <= 3; rn++) {
                    for (int hu = 0; hu <= (kind == AAMM_CONFLICT_UPDATE_MISSING); hu++) {
                        for (size_t pi = 0; pi < sizeof policies / sizeof policies[0]; pi++) {
                            enum aamm_conflict_policy pol = policies[pi];
                            const char *pname = aamm_conflict_policy_name(pol);
                            struct aamm_conflict_version cl = {l && l->known, l ? l->ts : 0,
                                                               l ? (uint32_t)l->node : 0};
                            struct aamm_conflict_version cr = {rknown, rknown ? rt : 0,
                                                               (uint32_t)rn};
                            ts_sql(rts, sizeof rts, rknown, rt);
                            ts_text(rtx, sizeof rtx, rknown, rt);
                            ts_text(lts, sizeof lts, l && l->known, l ? l->ts : 0);
                            bool tomb_insert = false;
                            if (kind == AAMM_CONFLICT_INSERT_EXISTS && li == -1)
                                continue; /* insert of a key never deleted: no conflict */
                            if (kind == AAMM_CONFLICT_INSERT_EXISTS && l && l->key) {
                                /* the same version as a row present (decide) and, when
                                 * the delete is not older, as a deleted key (insert_ok) */
                                tomb_insert = aamm_conflict_version_compare(&cl, &cr) >= 0;
                            }
                            int nold = !missing && kind != AAMM_CONFLICT_INSERT_EXISTS
                                           ? (int)(sizeof old_rows / sizeof old_rows[0])
                                           : 1;
                            for (int form = 0; form <= tomb_insert + nold - 1; form++) {
                                bool decide = !missing && (form < nold || !tomb_insert);
                                int orow = decide ? form : 0;
                                if (decide) {
                                    snprintf(sql, sizeof sql,
                                             "SELECT " AAMM_SQL_FN_DECIDE "('%s', '" REL
                                             "', '[99]', '%s'::xid, " DECIDE_LROW
                                             ", '{}', %s, %d, '%s', %s)",
                                             aamm_conflict_kind_name(kind), l->xmin, rts, rn,
                                             pname, kind == AAMM_CONFLICT_INSERT_EXISTS
                                                        ? "NULL"
                                                        : old_rows[orow]);
                                } else if (!missing) {
                                    snprintf(sql, sizeof sql,
                                             "SELECT " AAMM_SQL_FN_INSERT_OK "('" REL
                                             "', '[%d]', %s, %d, '{}', '%s')",
                                             l->key, rts, rn, pname);
                                } else if (kind == AAMM_CONFLICT_UPDATE_MISSING) {
                                    snprintf(sql, sizeof sql,
                                             "SELECT " AAMM_SQL_FN_UPDATE_MISSING "('" REL
                                             "', '[%d]', %s, %d, '{}', %s, '%s')",
                                             l ? l->key : 100, rts, rn, hu ? "true" : "false",
                                             pname);
                                } else {
                                    snprintf(sql, sizeof sql,
                                             "SELECT " AAMM_SQL_FN_DELETE_MISSING "('" REL
                                             "', '[%d]', %s, %d, '{}')",
                                             l ? l->key : 100, rts, rn);
                                }
                                bool logged;
                                sql_answer(c, sql, got, sizeof got, &logged);
                                const char *want = c_answer(kind, pol, l ? &cl : NULL, &cr, hu);
                                ck_assert_msg(strcmp(got, want) == 0,
                                              "%s, policy %s, local %s (ts %s), remote ts "
                                              "%s node %d%s: SQL says %s, C says %s",
                                              aamm_conflict_kind_name(kind), pname,
                                              l ? l->what : "none", lts, rtx, rn,
                                              hu ? ", unchanged TOAST" : "", got, want);
                                /* logging: only aamm.decide's rule depends on the old row;
                                 * every other conflict notice is a logged one */
                                bool notice = notices > 0; /* a decision was reported */
                                if (notice) {
                                    bool want_logged = decide ? logged_rule(kind, got, orow) : true;
                                    ck_assert_msg(logged == want_logged,
                                                  "%s, policy %s, local %s, remote ts %s node "
                                                  "%d, old row %s: %s %s, want %s",
                                                  aamm_conflict_kind_name(kind), pname,
                                                  l ? l->what : "none", rtx, rn,
                                                  decide ? old_rows[orow] : "-", got,
                                                  logged ? "logged" : "not logged",
                                                  want_logged ? "logged" : "not logged");
                                }
                                rows++;
                                conflicts += logged;
                                unlogged += notice && !logged;
                            }
                        }
                    }
                }
            }
        }
    }
    printf("conflict rule: %d rows agree (%d logged as conflicts, %d counted but not logged)\n",
           rows, conflicts, unlogged);
    ck_assert_int_gt(rows, 1000);
    ck_assert_int_gt(unlogged, 100);
    PQfinish(c);
    pgfx_destroy(fx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("conflict_rule");
    TCase *tc = aamm_test_tcase("rule", 120);
    tcase_add_test(tc, decision_table_c_equals_sql);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
