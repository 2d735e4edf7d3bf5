/* test_seq.c: the SQL generators on real PostgreSQL 15 nodes: install, clock steps,
 * C and SQL on the same node, concurrent inserts on three nodes merged without duplicate
 * keys, galloc ranges supplied by the host, and serial/identity detection and conversion. */
#include "config.h"

#include <inttypes.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include <aamm/seq.h>

#include "internal.h"
#include "pgfixture.h"
#include "testutil.h"

#define T0 (AAMM_SNOWFLAKE_EPOCH_MS + INT64_C(86400000) * 1000)

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static int64_t frozen_ms(void *arg)
{
    return *(int64_t *)arg;
}

static struct pgfx *start_installed(int nodes)
{
    struct pgfx *fx = pgfx_start(nodes, NULL);
    char err[AAMM_SEQ_ERRSIZE];
    ck_assert_ptr_nonnull(fx);
    for (int i = 0; i < nodes; i++) {
        PGconn *c = pgfx_connect(fx, i);
        ck_assert_ptr_nonnull(c);
        ck_assert_msg(aamm_seq_install(c, i + 1, err, sizeof err) == 0, "%s", err);
        PQfinish(c);
    }
    return fx;
}

/* Make the SQL generators' clock stand still at @ms on node @i (tests only). */
static void freeze_sql_clock(struct pgfx *fx, int i, int64_t ms)
{
    ck_assert_int_eq(pgfx_exec(fx, i,
                               "CREATE OR REPLACE FUNCTION aamm.seq_clock_ms() RETURNS bigint "
                               "LANGUAGE sql VOLATILE AS $$ SELECT %" PRId64 "::bigint $$",
                               ms),
                     0);
}

/* ---- asynchronous statements on several connections ------------------------------------ */

struct job {
    PGconn *c;
    const char *sql; /* sent @left more times */
    int left;
    bool busy;
    int64_t *ids; /* collect column 0 of every row (NULL: don't) */
    size_t nids, cap;
    char err[512];
};

static void job_send(struct job *j)
{
    if (j->left <= 0 || j->err[0] != '\0')
        return;
    if (!PQsendQuery(j->c, j->sql)) {
        snprintf(j->err, sizeof j->err, "send: %s", PQerrorMessage(j->c));
        return;
    }
    j->left--;
    j->busy = true;
}

static void job_collect(struct job *j, PGresult *res)
{
    int n = PQntuples(res);
    if (j->ids == NULL && j->cap == 0)
        return;
    if (j->nids + (size_t)n > j->cap) {
        j->cap = (j->nids + (size_t)n) * 2;
        j->ids = realloc(j->ids, j->cap * sizeof *j->ids);
        ck_assert_ptr_nonnull(j->ids);
    }
    for (int r = 0; r < n; r++)
        j->ids[j->nids++] = strtoll(PQgetvalue(res, r, 0), NULL, 10);
}

/* Advance every job; wait up to @timeout_ms for input. Returns how many are still busy. */
static int jobs_step(struct job *jobs, int n, int timeout_ms)
{
    struct pollfd pfd[16];
    int busy = 0;
    ck_assert_int_le(n, 16);
    for (int i = 0; i < n; i++) {
        pfd[i].fd = jobs[i].busy ? PQsocket(jobs[i].c) : -1;
        pfd[i].events = POLLIN;
        pfd[i].revents = 0;
    }
    if (timeout_ms > 0)
        (void)poll(pfd, (nfds_t)n, timeout_ms);
    for (int i = 0; i < n; i++) {
        struct job *j = &jobs[i];
        if (!j->busy)
            continue;
        if (!PQconsumeInput(j->c)) {
            snprintf(j->err, sizeof j->err, "consume: %s", PQerrorMessage(j->c));
            j->busy = false;
            continue;
        }
        while (j->busy && !PQisBusy(j->c)) {
            PGresult *res = PQgetResult(j->c);
            if (res == NULL) {
                j->busy = false;
                job_send(j);
                break;
            }
            if (PQresultStatus(res) == PGRES_TUPLES_OK)
                job_collect(j, res);
            else if (PQresultStatus(res) != PGRES_COMMAND_OK && j->err[0] == '\0')
                snprintf(j->err, sizeof j->err, "%s", PQresultErrorMessage(res));
            PQclear(res);
        }
        busy += j->busy;
    }
    return busy;
}

static void jobs_finish(struct job *jobs, int n)
{
    for (int i = 0; i < n; i++) {
        PQfinish(jobs[i].c);
        free(jobs[i].ids);
    }
}

/* ---- install and the three functions ---------------------------------------------------- */

/* Install stores the node id (re-install changes it, out-of-range ids are refused and
 * change nothing); snowflake ids from SQL carry the node id and source bit 1; uuid_v7()
 * has version 7 and variant 10 and the current time. */
START_TEST(install_and_generators)
{
    struct pgfx *fx = start_installed(1);
    PGconn *c = pgfx_connect(fx, 0);
    char err[AAMM_SEQ_ERRSIZE];
    char *v;
    struct aamm_snowflake_parts p;
    uint8_t u[16];
    int64_t id;
    ck_assert_int_eq(aamm_seq_install(c, 1024, err, sizeof err), AAMM_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "1024"));
    ck_assert_int_eq(aamm_seq_install(c, 0, err, sizeof err), AAMM_EINVAL); /* no node id */
    ck_assert_str_eq(err, "seq: install: node id 0 outside 1..1023");
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1, "SELECT node_id FROM aamm.seq_config"), 1);
    ck_assert_msg(aamm_seq_install(c, 77, err, sizeof err) == 0, "%s", err); /* idempotent */
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1, "SELECT node_id FROM aamm.seq_config"), 77);

    v = pgfx_value(fx, 0, "SELECT aamm.snowflake_nextval('public.t')");
    ck_assert_ptr_nonnull(v);
    id = strtoll(v, NULL, 10);
    free(v);
    aamm_snowflake_decode(id, &p);
    ck_assert_int_eq(p.node_id, 77);
    ck_assert_int_eq(p.source, AAMM_SNOWFLAKE_SOURCE_SQL);
    ck_assert_int_lt(llabs((long long)(p.unix_ms - (aamm__wall_us() / 1000))), 5000);

    v = pgfx_value(fx, 0, "SELECT aamm.uuid_v7()");
    ck_assert_ptr_nonnull(v);
    ck_assert_int_eq(aamm_uuidv7_parse(v, u), 0);
    free(v);
    ck_assert_int_eq(u[6] >> 4, 7);
    ck_assert_int_eq(u[8] >> 6, 2);
    ck_assert_int_lt(llabs((long long)(aamm_uuidv7_unix_ms(u) - (aamm__wall_us() / 1000))), 5000);
    /* no NULL name; an unprivileged role may call the functions (SECURITY DEFINER) */
    ck_assert_int_ne(pgfx_exec_conn(c, "SELECT aamm.snowflake_nextval(NULL)"), 0);
    ck_assert_int_eq(pgfx_exec(fx, 0, "CREATE ROLE app LOGIN"), 0);
    ck_assert_int_eq(pgfx_exec(fx, 0,
                               "SET ROLE app; SELECT aamm.snowflake_nextval('x'), "
                               "aamm.uuid_v7()"),
                     0);
    PQfinish(c);
    pgfx_destroy(fx);
}
END_TEST

/* galloc from SQL: without ranges a clear error; values come from supplied ranges in
 * order, moving to the next range when one runs out; then a clear "no values left" error
 * (and nothing is lost: a range supplied afterwards starts at its first value);
 * supplying is idempotent and overlapping ranges are refused. */
START_TEST(galloc_sql_ranges)
{
    struct pgfx *fx = start_installed(1);
    PGconn *c = pgfx_connect(fx, 0);
    char err[AAMM_SEQ_ERRSIZE];
    int64_t rem = -1;
    PGresult *res;
    res = PQexec(c, "SELECT aamm.galloc_nextval('s')");
    ck_assert_int_eq(PQresultStatus(res), PGRES_FATAL_ERROR);
    ck_assert_ptr_nonnull(strstr(PQresultErrorMessage(res), "has no range on this node"));
    PQclear(res);
    ck_assert_int_eq(aamm_galloc_supply_node(c, "s", 100, 103, err, sizeof err), 0);
    ck_assert_int_eq(aamm_galloc_supply_node(c, "s", 200, 202, err, sizeof err), 0);
    ck_assert_int_eq(aamm_galloc_supply_node(c, "s", 200, 202, err, sizeof err), 0);
    ck_assert_int_eq(aamm_galloc_supply_node(c, "s", 201, 205, err, sizeof err), AAMM_ESERVER);
    ck_assert_ptr_nonnull(strstr(err, "overlaps"));
    ck_assert_int_eq(aamm_galloc_supply_node(c, "s", 5, 5, err, sizeof err), AAMM_EINVAL);
    ck_assert_int_eq(aamm_galloc_node_remaining(c, "s", &rem, err, sizeof err), 0);
    ck_assert_int_eq(rem, 5);
    {
        const long want[] = {100, 101, 102, 200, 201};
        for (int i = 0; i < 5; i++)
            ck_assert_int_eq(pgfx_value_long(fx, 0, -1, "SELECT aamm.galloc_nextval('s')"),
                             want[i]);
    }
    ck_assert_int_eq(aamm_galloc_node_remaining(c, "s", &rem, err, sizeof err), 0);
    ck_assert_int_eq(rem, 0);
    for (int i = 0; i < 3; i++) { /* failures do not eat values of later ranges */
        res = PQexec(c, "SELECT aamm.galloc_nextval('s')");
        ck_assert_int_eq(PQresultStatus(res), PGRES_FATAL_ERROR);
        ck_assert_ptr_nonnull(strstr(PQresultErrorMessage(res), "no values left"));
        PQclear(res);
    }
    ck_assert_int_eq(aamm_galloc_supply_node(c, "s", 300, 400, err, sizeof err), 0);
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1, "SELECT aamm.galloc_nextval('s')"), 300);
    ck_assert_int_eq(aamm_galloc_node_remaining(c, "s", &rem, err, sizeof err), 0);
    ck_assert_int_eq(rem, 99);
    /* another sequence has its own ranges */
    ck_assert_int_eq(aamm_galloc_supply_node(c, "other", 100, 110, err, sizeof err), 0);
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1, "SELECT aamm.galloc_nextval('other')"), 100);
    /* a failed statement does not leave the advisory lock held: another session works */
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1, "SELECT aamm.galloc_nextval('s')"), 301);
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1,
                                     "SELECT count(*) FROM pg_locks "
                                     "WHERE locktype = 'advisory'"),
                     0);
    PQfinish(c);
    pgfx_destroy(fx);
}
END_TEST

/* A call cancelled (statement_timeout) while it waits for the generator's advisory lock,
 * and a call failing inside it, leave no advisory lock behind: other sessions go on. */
START_TEST(cancel_leaves_no_lock)
{
    struct pgfx *fx = start_installed(1);
    PGconn *a = pgfx_connect(fx, 0), *b = pgfx_connect(fx, 0);
    PGresult *res;
    ck_assert_int_eq(pgfx_exec_conn(a, "SELECT pg_advisory_lock(1633774957, 1)"), 0);
    ck_assert_int_eq(pgfx_exec_conn(b, "SET statement_timeout = 300"), 0);
    res = PQexec(b, "SELECT aamm.snowflake_nextval('t')");
    ck_assert_int_eq(PQresultStatus(res), PGRES_FATAL_ERROR);
    ck_assert_str_eq(PQresultErrorField(res, PG_DIAG_SQLSTATE), "57014"); /* canceled */
    PQclear(res);
    ck_assert_int_eq(pgfx_exec_conn(a, "SELECT pg_advisory_unlock(1633774957, 1)"), 0);
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1,
                                     "SELECT count(*) FROM pg_locks "
                                     "WHERE locktype = 'advisory'"),
                     0);
    /* an error inside the locked part (clock past 2093) releases the lock too */
    ck_assert_int_eq(pgfx_exec_conn(b, "CREATE OR REPLACE FUNCTION aamm.seq_clock_ms() "
                                       "RETURNS bigint LANGUAGE sql AS $$ SELECT "
                                       "1704067200000 + (1::bigint << 41) $$"),
                     0);
    res = PQexec(b, "SELECT aamm.snowflake_nextval('t')");
    ck_assert_int_eq(PQresultStatus(res), PGRES_FATAL_ERROR);
    ck_assert_ptr_nonnull(strstr(PQresultErrorMessage(res), "41-bit"));
    PQclear(res);
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1,
                                     "SELECT count(*) FROM pg_locks "
                                     "WHERE locktype = 'advisory'"),
                     0);
    PQfinish(a);
    PQfinish(b);
    pgfx_destroy(fx);
}
END_TEST

/* The SQL clock steps back five seconds: snowflake ids and UUIDv7s from SQL keep
 * increasing (borrowed time), across sessions of the node. */
START_TEST(sql_clock_steps_back)
{
    struct pgfx *fx = start_installed(1);
    int64_t prev = 0;
    char prevu[64] = "";
    for (int step = 0; step < 3; step++) {
        PGconn *c;
        PGresult *res;
        freeze_sql_clock(fx, 0, step == 1 ? T0 - 5000 : T0 + step);
        c = pgfx_connect(fx, 0); /* a new session each time */
        res = PQexec(c, "SELECT aamm.snowflake_nextval('t'), aamm.uuid_v7()::text "
                        "FROM generate_series(1, 3000)");
        ck_assert_int_eq(PQresultStatus(res), PGRES_TUPLES_OK);
        for (int r = 0; r < PQntuples(res); r++) {
            int64_t id = strtoll(PQgetvalue(res, r, 0), NULL, 10);
            const char *u = PQgetvalue(res, r, 1);
            if (id <= prev || strcmp(u, prevu) <= 0)
                ck_abort_msg("step %d row %d: not increasing (%s after %s)", step, r, u, prevu);
            prev = id;
            snprintf(prevu, sizeof prevu, "%s", u);
        }
        PQclear(res);
        PQfinish(c);
    }
    pgfx_destroy(fx);
}
END_TEST

/* C and SQL generators on the same node never collide: 8 concurrent SQL sessions plus
 * the C API, all with the clock frozen in one millisecond (so far more than 4,096 ids
 * fall in it and both sides borrow the same later milliseconds), then again with the real
 * clock. Only the source bit keeps C and SQL apart: some C id equals some SQL id with
 * that bit flipped. */
START_TEST(c_and_sql_same_node_never_collide)
{
    struct pgfx *fx = start_installed(1);
    long per_session = aamm_test_scaled(4000, 600);
    for (int round = 0; round < 2; round++) {
        bool frozen = round == 0;
        int64_t clock = T0;
        struct job jobs[8];
        char sql[160];
        struct aamm_snowflake_options o = {.node_id = 1};
        struct aamm_snowflake *g;
        size_t cap = 1 << 16, nc = 0, total, flipped = 0;
        int64_t *cids = malloc(cap * sizeof *cids), *all, *sqlids;
        size_t nsql = 0;
        ck_assert_ptr_nonnull(cids);
        if (frozen) {
            freeze_sql_clock(fx, 0, T0);
            o.clock = frozen_ms;
            o.clock_arg = &clock;
            /* the C generator may borrow as far as the SQL one does; created that long
             * before T0 so that its first id falls in T0 (its start wait, seq.h) */
            o.max_borrow_ms = 10000;
            clock = T0 - 10001;
        } else {
            ck_assert_int_eq(pgfx_exec(fx, 0,
                                       "CREATE OR REPLACE FUNCTION aamm.seq_clock_ms() "
                                       "RETURNS bigint LANGUAGE sql VOLATILE AS $$ "
                                       "SELECT floor(extract(epoch FROM "
                                       "clock_timestamp()) * 1000)::bigint $$"),
                             0);
        }
        ck_assert_int_eq(aamm_snowflake_new(&g, &o, NULL, 0), 0);
        clock = T0;
        snprintf(sql, sizeof sql, "SELECT aamm.snowflake_nextval('t') FROM generate_series(1, %ld)",
                 per_session / 4);
        memset(jobs, 0, sizeof jobs);
        for (int i = 0; i < 8; i++) {
            jobs[i].c = pgfx_connect(fx, 0);
            ck_assert_ptr_nonnull(jobs[i].c);
            jobs[i].sql = sql;
            jobs[i].left = 4;
            jobs[i].cap = 1; /* collect */
            jobs[i].ids = malloc(sizeof(int64_t));
        }
        for (int i = 0; i < 8; i++)
            job_send(&jobs[i]);
        /* the C API issues ids while the sessions run */
        while (jobs_step(jobs, 8, 1) > 0) {
            for (int k = 0; k < 64; k++) {
                if (nc == cap) {
                    cap *= 2;
                    cids = realloc(cids, cap * sizeof *cids);
                    ck_assert_ptr_nonnull(cids);
                }
                ck_assert_int_eq(aamm_snowflake_next(g, &cids[nc]), 0);
                nc++;
            }
        }
        for (int i = 0; i < 8; i++) {
            ck_assert_msg(jobs[i].err[0] == '\0', "session %d: %s", i, jobs[i].err);
            ck_assert_int_eq(jobs[i].nids, (size_t)(per_session / 4) * 4);
            nsql += jobs[i].nids;
        }
        total = nc + nsql;
        all = malloc(total * sizeof *all);
        sqlids = malloc(nsql * sizeof *sqlids);
        ck_assert_ptr_nonnull(all);
        memcpy(all, cids, nc * sizeof *all);
        nsql = 0;
        for (int i = 0; i < 8; i++) {
            memcpy(all + nc + nsql, jobs[i].ids, jobs[i].nids * sizeof *all);
            memcpy(sqlids + nsql, jobs[i].ids, jobs[i].nids * sizeof *all);
            nsql += jobs[i].nids;
        }
        qsort(all, total, sizeof *all, cmp_i64);
        for (size_t i = 1; i < total; i++)
            if (all[i] == all[i - 1])
                ck_abort_msg("round %d: id %" PRId64 " issued twice", round, all[i]);
        if (frozen) {
            ck_assert_int_gt(total, 4096); /* all of them with the clock in one ms */
            qsort(sqlids, nsql, sizeof *sqlids, cmp_i64);
            for (size_t i = 0; i < nc; i++) {
                int64_t twin = cids[i] | 2048; /* the SQL id with the same time and counter */
                if (bsearch(&twin, sqlids, nsql, sizeof *sqlids, cmp_i64) != NULL)
                    flipped++;
            }
            ck_assert_msg(flipped > 0, "C and SQL never borrowed the same milliseconds");
        }
        free(all);
        free(sqlids);
        free(cids);
        jobs_finish(jobs, 8);
        aamm_snowflake_free(g);
    }
    pgfx_destroy(fx);
}
END_TEST

/* Three nodes, each with several sessions inserting concurrently into tables whose keys
 * default to aamm.snowflake_nextval, aamm.uuid_v7 and aamm.galloc_nextval, while the host
 * keeps the galloc ranges supplied (aamm_galloc_take_range from a client per node fed by
 * one allocator standing in for consensus). The
 * rows of all nodes merged into tables with the same primary keys: no duplicate key. */
START_TEST(three_nodes_merge_without_duplicates)
{
    struct pgfx *fx = start_installed(3);
    long rows = aamm_test_scaled(2000, 300);
    int batches = 5;
    struct job jobs[9];
    PGconn *ctl[3];
    struct aamm_galloc *ga[3];
    int64_t next_range = 1, range = 2000;
    char err[AAMM_SEQ_ERRSIZE];
    PGconn *m;
    const char *tables[3] = {"t_sf", "t_uuid", "t_ga"};
    for (int n = 0; n < 3; n++) {
        ck_assert_int_eq(pgfx_exec(fx, n,
                                   "CREATE TABLE t_sf (id bigint PRIMARY KEY DEFAULT "
                                   "aamm.snowflake_nextval('public.t_sf'), node int, k int);"
                                   "CREATE TABLE t_uuid (id uuid PRIMARY KEY DEFAULT "
                                   "aamm.uuid_v7(), node int, k int);"
                                   "CREATE TABLE t_ga (id bigint PRIMARY KEY DEFAULT "
                                   "aamm.galloc_nextval('public.t_ga.id'), node int, k int)"),
                         0);
        ctl[n] = pgfx_connect(fx, n);
        ck_assert_ptr_nonnull(ctl[n]);
    }
    memset(jobs, 0, sizeof jobs);
    for (int n = 0; n < 3; n++) {
        for (int t = 0; t < 3; t++) {
            struct job *j = &jobs[n * 3 + t];
            j->c = pgfx_connect(fx, n);
            ck_assert_ptr_nonnull(j->c);
            j->left = batches;
        }
    }
    /* per node, per table: the statement text differs only in the node number */
    {
        static char texts[9][200];
        for (int n = 0; n < 3; n++)
            for (int t = 0; t < 3; t++) {
                snprintf(texts[n * 3 + t], sizeof texts[0],
                         "INSERT INTO %s (node, k) SELECT %d, g FROM generate_series(1, %ld) g",
                         tables[t], n, rows);
                jobs[n * 3 + t].sql = texts[n * 3 + t];
            }
    }
    /* galloc: per node a client (fed by one allocator standing in for consensus) whose
     * ranges the host moves to the node whenever fewer than 2 ranges are left there */
    for (int n = 0; n < 3; n++) {
        struct aamm_galloc_options go = {.name = "public.t_ga.id", .range_size = range};
        ck_assert_int_eq(aamm_galloc_new(&ga[n], &go, NULL, 0), 0);
    }
    {
        int64_t deadline = aamm_test_now_ms() + 90000;
        bool started = false;
        do {
            ck_assert_msg(aamm_test_now_ms() < deadline, "inserts did not finish");
            for (int n = 0; n < 3; n++) {
                int64_t rem = 0, a, b;
                uint64_t count;
                ck_assert_msg(aamm_galloc_node_remaining(ctl[n], "public.t_ga.id", &rem, err,
                                                         sizeof err) == 0,
                              "%s", err);
                while (rem < 2 * range) {
                    while (aamm_galloc_begin_request(ga[n], &count) == 0) { /* "consensus" */
                        ck_assert_int_eq(
                            aamm_galloc_add_range(ga[n], next_range, next_range + (int64_t)count),
                            0);
                        next_range += (int64_t)count;
                    }
                    ck_assert_int_eq(aamm_galloc_take_range(ga[n], &a, &b), 0);
                    ck_assert_msg(aamm_galloc_supply_node(ctl[n], "public.t_ga.id", a, b, err,
                                                          sizeof err) == 0,
                                  "%s", err);
                    rem += b - a;
                }
            }
            if (!started) { /* the inserts start once every node has ranges */
                for (int i = 0; i < 9; i++)
                    job_send(&jobs[i]);
                started = true;
            }
        } while (jobs_step(jobs, 9, 5) > 0);
    }
    for (int i = 0; i < 9; i++)
        ck_assert_msg(jobs[i].err[0] == '\0', "job %d: %s", i, jobs[i].err);
    /* merge everything into node 0's merged_* tables (same primary keys) */
    m = pgfx_connect(fx, 0);
    ck_assert_int_eq(pgfx_exec_conn(m, "CREATE TABLE merged_t_sf (LIKE t_sf INCLUDING ALL);"
                                       "CREATE TABLE merged_t_uuid (LIKE t_uuid INCLUDING ALL);"
                                       "CREATE TABLE merged_t_ga (LIKE t_ga INCLUDING ALL)"),
                     0);
    for (int t = 0; t < 3; t++) {
        for (int n = 0; n < 3; n++) {
            PGconn *src = pgfx_connect(fx, n);
            char q[200];
            PGresult *res;
            snprintf(q, sizeof q, "COPY %s TO STDOUT", tables[t]);
            res = PQexec(src, q);
            ck_assert_int_eq(PQresultStatus(res), PGRES_COPY_OUT);
            PQclear(res);
            snprintf(q, sizeof q, "COPY merged_%s FROM STDIN", tables[t]);
            res = PQexec(m, q);
            ck_assert_int_eq(PQresultStatus(res), PGRES_COPY_IN);
            PQclear(res);
            for (;;) {
                char *line = NULL;
                int len = PQgetCopyData(src, &line, 0);
                if (len < 0)
                    break;
                ck_assert_int_eq(PQputCopyData(m, line, len), 1);
                PQfreemem(line);
            }
            PQclear(PQgetResult(src));
            ck_assert_int_eq(PQputCopyEnd(m, NULL), 1);
            res = PQgetResult(m);
            ck_assert_msg(PQresultStatus(res) == PGRES_COMMAND_OK, "merging %s of node %d: %s",
                          tables[t], n, PQresultErrorMessage(res));
            PQclear(res);
            PQclear(PQgetResult(m));
            PQfinish(src);
        }
        ck_assert_int_eq(pgfx_value_long(fx, 0, -1, "SELECT count(*) FROM merged_%s", tables[t]),
                         3 * rows * batches);
        ck_assert_int_eq(
            pgfx_value_long(fx, 0, -1, "SELECT count(DISTINCT node) FROM merged_%s", tables[t]), 3);
    }
    PQfinish(m);
    jobs_finish(jobs, 9);
    for (int n = 0; n < 3; n++) {
        PQfinish(ctl[n]);
        aamm_galloc_free(ga[n]);
    }
    pgfx_destroy(fx);
}
END_TEST

/* Serial, bigserial, identity (always / by default) and hand-made nextval columns of
 * published tables are found (unpublished tables and other columns are not); snowflake
 * conversion refuses an int column unless asked to widen it; after conversion inserts take
 * their keys from the generators and identity is gone. */
START_TEST(serial_detection_and_conversion)
{
    struct pgfx *fx = start_installed(1);
    PGconn *c = pgfx_connect(fx, 0);
    char err[AAMM_SEQ_ERRSIZE];
    struct aamm_seq_serials *list = NULL, *again = NULL;
    ck_assert_int_eq(
        pgfx_exec_conn(c, "CREATE SCHEMA app;"
                          "CREATE TABLE app.a (id serial PRIMARY KEY, v text);"
                          "CREATE TABLE app.b (id bigserial PRIMARY KEY, n int);"
                          "CREATE TABLE app.c (id bigint GENERATED ALWAYS AS IDENTITY "
                          "PRIMARY KEY, v text);"
                          "CREATE TABLE app.d (id bigint GENERATED BY DEFAULT AS IDENTITY "
                          "PRIMARY KEY);"
                          "CREATE SEQUENCE app.hand;"
                          "CREATE TABLE app.e (id bigint PRIMARY KEY DEFAULT "
                          "nextval('app.hand'), v text DEFAULT 'x');"
                          "CREATE TABLE app.local_only (id serial PRIMARY KEY);"
                          "CREATE TABLE app.plain (id bigint PRIMARY KEY);"
                          "INSERT INTO app.a (v) VALUES ('old');"
                          "CREATE PUBLICATION pub FOR TABLE app.a, app.b, app.c, app.d, "
                          "app.e, app.plain"),
        0);
    ck_assert_msg(aamm_seq_find_serials(c, "pub", &list, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(list->n, 5);
    ck_assert_str_eq(list->items[0].table, "a");
    ck_assert_str_eq(list->items[0].kind, "serial");
    ck_assert_str_eq(list->items[0].type, "integer");
    ck_assert_str_eq(list->items[0].sequence, "app.a_id_seq");
    ck_assert_str_eq(list->items[1].table, "b");
    ck_assert_str_eq(list->items[1].type, "bigint");
    ck_assert_str_eq(list->items[2].kind, "identity always");
    ck_assert_str_eq(list->items[3].kind, "identity by default");
    ck_assert_str_eq(list->items[4].table, "e");
    ck_assert_str_eq(list->items[4].kind, "nextval");
    ck_assert_str_eq(list->items[4].sequence, "app.hand");
    ck_assert_str_eq(list->items[4].column, "id");
    /* any publication: the same; an unknown publication: none */
    ck_assert_int_eq(aamm_seq_find_serials(c, NULL, &again, err, sizeof err), 0);
    ck_assert_int_eq(again->n, 5);
    aamm_seq_serials_free(again);
    ck_assert_int_eq(aamm_seq_find_serials(c, "nope", &again, err, sizeof err), 0);
    ck_assert_int_eq(again->n, 0);
    aamm_seq_serials_free(again);

    /* snowflake on app.a (integer): refused, nothing changed */
    ck_assert_int_eq(aamm_seq_convert(c, list, AAMM_SEQ_SNOWFLAKE, 0, err, sizeof err),
                     AAMM_EUNSUITABLE);
    ck_assert_ptr_nonnull(strstr(err, "app.a.id is integer"));
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1,
                                     "SELECT count(*) FROM pg_attribute WHERE "
                                     "attrelid = 'app.c'::regclass AND attidentity = 'a'"),
                     1);
    /* widen and convert everything */
    ck_assert_msg(
        aamm_seq_convert(c, list, AAMM_SEQ_SNOWFLAKE, AAMM_SEQ_CONVERT_WIDEN, err, sizeof err) == 0,
        "%s", err);
    ck_assert_int_eq(pgfx_exec_conn(c, "INSERT INTO app.a (v) VALUES ('new');"
                                       "INSERT INTO app.b (n) VALUES (1);"
                                       "INSERT INTO app.c (v) VALUES ('c');"
                                       "INSERT INTO app.d DEFAULT VALUES;"
                                       "INSERT INTO app.e DEFAULT VALUES"),
                     0);
    {
        const char *t[] = {"a", "b", "c", "d", "e"};
        for (int i = 0; i < 5; i++) {
            char *def = pgfx_value(fx, 0,
                                   "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef "
                                   "WHERE adrelid = 'app.%s'::regclass AND adnum = 1",
                                   t[i]);
            ck_assert_ptr_nonnull(def);
            ck_assert_msg(strstr(def, "aamm.snowflake_nextval('app.") != NULL, "%s", def);
            free(def);
            ck_assert_int_eq(
                pgfx_value_long(fx, 0, -1, "SELECT (max(id) >> 11) & 1 FROM app.%s", t[i]),
                AAMM_SNOWFLAKE_SOURCE_SQL);
            ck_assert_int_eq(
                pgfx_value_long(fx, 0, -1, "SELECT ((max(id) >> 12) & 1023) FROM app.%s", t[i]), 1);
        }
    }
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1, "SELECT count(*) FROM app.a"), 2);
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1,
                                     "SELECT count(*) FROM pg_attribute WHERE "
                                     "attrelid IN ('app.c'::regclass, 'app.d'::regclass) "
                                     "AND attidentity <> ''"),
                     0);
    /* converted columns are no longer reported */
    ck_assert_int_eq(aamm_seq_find_serials(c, "pub", &again, err, sizeof err), 0);
    ck_assert_int_eq(again->n, 0);
    aamm_seq_serials_free(again);
    aamm_seq_serials_free(list);

    /* galloc conversion of a fresh serial column */
    ck_assert_int_eq(pgfx_exec_conn(c, "CREATE TABLE app.f (id serial PRIMARY KEY);"
                                       "ALTER PUBLICATION pub ADD TABLE app.f"),
                     0);
    ck_assert_int_eq(aamm_seq_find_serials(c, "pub", &list, err, sizeof err), 0);
    ck_assert_int_eq(list->n, 1);
    ck_assert_msg(aamm_seq_convert(c, list, AAMM_SEQ_GALLOC, 0, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(aamm_galloc_supply_node(c, "app.f.id", 1000, 2000, err, sizeof err), 0);
    ck_assert_int_eq(pgfx_exec_conn(c, "INSERT INTO app.f DEFAULT VALUES"), 0);
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1, "SELECT id FROM app.f"), 1000);
    aamm_seq_serials_free(list);
    PQfinish(c);
    pgfx_destroy(fx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("seq_sql");
    TCase *tc = aamm_test_tcase("sql", 90);
    tcase_add_test(tc, install_and_generators);
    tcase_add_test(tc, galloc_sql_ranges);
    tcase_add_test(tc, cancel_leaves_no_lock);
    tcase_add_test(tc, sql_clock_steps_back);
    tcase_add_test(tc, c_and_sql_same_node_never_collide);
    tcase_add_test(tc, three_nodes_merge_without_duplicates);
    tcase_add_test(tc, serial_detection_and_conversion);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
