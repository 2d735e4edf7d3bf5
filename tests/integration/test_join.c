/*
 * test_join.c: aamm_node_join() on real PostgreSQL nodes with replicators in forked agents:
 * a third node joins a two-node cluster while both write (the bike schema), then writes
 * too; after quiesce every table is identical row by row on all three, the ledger holds
 * every row exactly once, and no slot is left behind.
 */
#include <check.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <aamm/aamm.h>
#include <aamm/node.h>

#include "agentfx.h"
#include "pgfixture.h"
#include "testutil.h"

#define NNODES 3 /* A (node 1), B (node 2), C (node 3, joins) */
static struct pgfx *fx;
static int ports[NNODES];
static pid_t agents[NNODES], writers[NNODES];
static long nrentals; /* rentals 1..nrentals exist before the join */
static const char secret[] = "0123456789abcdef-join-test";

/* ---- setup ----------------------------------------------------------------------- */

static void setup_node(int i)
{
    PGconn *c = pgfx_connect(fx, i);
    char err[512];
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(
        pgfx_exec_conn(c, "CREATE TABLE stations (id int PRIMARY KEY, name text, docks int);"
                          "CREATE TABLE bikes (id int PRIMARY KEY, station_id int REFERENCES "
                          "stations, status text);"
                          "CREATE TABLE users (id int PRIMARY KEY, name text, balance int);"
                          "CREATE TABLE rentals (id bigint PRIMARY KEY, bike_id int REFERENCES "
                          "bikes, user_id int REFERENCES users, note text);"
                          "CREATE TABLE ledger (node int, seq bigint, note text, "
                          "PRIMARY KEY (node, seq))"),
        0);
    ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(aamm_node_create_apply_role(c, "aamm_apply", NULL, err, sizeof err) == 0, "%s",
                  err);
    const char *tables[] = {"stations", "bikes", "users", "rentals", "ledger"};
    for (size_t k = 0; k < 5; k++)
        ck_assert_msg(aamm_node_replicate_table(c, "public", tables[k], "aamm_apply", "aamm", err,
                                                sizeof err) == 0,
                      "%s", err);
    PQfinish(c);
}

static void setup(void)
{
    fx = pgfx_start(NNODES, "max_replication_slots = 16\nmax_wal_senders = 16\n");
    ck_assert_ptr_nonnull(fx);
    for (int i = 0; i < NNODES; i++) {
        setup_node(i);
        ports[i] = aamm_test_free_port();
    }
}

static void teardown(void)
{
    for (int i = 0; i < NNODES; i++) {
        aamm_test_kill(&writers[i]);
        aamm_test_stop(&agents[i], 5000);
    }
    pgfx_destroy(fx);
    fx = NULL;
}

/* Agent @i with the nodes in @members (bit k: node k+1) as its peers. */
static void start_agent(int i, unsigned members)
{
    struct agentfx a = {.node_id = (uint32_t)i + 1, .port = ports[i], .secret = secret};
    snprintf(a.conninfo, sizeof a.conninfo, "%s", pgfx_conninfo(fx, i));
    snprintf(a.apply_conninfo, sizeof a.apply_conninfo, "%s",
             pgfx_conninfo_with(fx, i, "user=aamm_apply"));
    for (int k = 0; k < NNODES; k++)
        if (k != i && (members & (1u << k))) {
            a.peer_ids[a.npeers] = (uint32_t)k + 1;
            a.peer_ports[a.npeers++] = ports[k];
        }
    agents[i] = agentfx_start(&a);
    ck_assert_int_gt(agents[i], 0);
    ck_assert_msg(pgfx_wait_long(fx, i, a.npeers, 30000,
                                 "SELECT count(*) FROM pg_replication_slots "
                                 "WHERE slot_name LIKE 'aamm_to_%%'") == a.npeers,
                  "node %d: slots not made", i + 1);
}

/* ---- the workload: one forked writer per node -------------------------------------- */

static volatile int writer_stop;
static void on_term(int sig)
{
    (void)sig;
    writer_stop = 1;
}

/* Node @i's writer: one transaction after another until SIGTERM, each a ledger row (the
 * node's next seq) and one more change: a new rental, or an update of a shared bike, user,
 * station or pre-join rental, or a delete of a pre-join rental. */
static void writer_main(int i)
{
    signal(SIGTERM, on_term);
    PGconn *c = pgfx_connect(fx, i);
    if (!c)
        _exit(2);
    char *v = pgfx_value(fx, i, "SELECT COALESCE(max(seq), 0) FROM ledger WHERE node = %d",
                         i + 1);
    long seq = v ? atol(v) : 0;
    free(v);
    uint64_t rnd = (uint64_t)(i + 1) * 0x9e3779b97f4a7c15u ^ (uint64_t)getpid();
    char sql[512];
    while (!writer_stop) {
        seq++;
        uint64_t r = aamm_test_rand(&rnd);
        int bike = (int)(r % 200) + 1, user = (int)(r / 200 % 200) + 1;
        int station = (int)(r / 40000 % 20) + 1;
        long rental = (long)(r / 800000 % (uint64_t)nrentals) + 1;
        const char *more;
        char buf[256];
        switch (r >> 40 & 7) {
        case 0:
        case 1:
            snprintf(buf, sizeof buf,
                     "INSERT INTO rentals VALUES (%ld, %d, %d, 'new %d/%ld')",
                     (long)(i + 1) * 1000000000L + seq, bike, user, i + 1, seq);
            break;
        case 2:
            snprintf(buf, sizeof buf,
                     "UPDATE bikes SET status = 'b %d/%ld', station_id = %d WHERE id = %d", i + 1,
                     seq, station, bike);
            break;
        case 3:
            snprintf(buf, sizeof buf,
                     "UPDATE users SET balance = balance + 1, name = 'u %d/%ld' WHERE id = %d",
                     i + 1, seq, user);
            break;
        case 4:
            snprintf(buf, sizeof buf, "DELETE FROM rentals WHERE id = %ld", rental);
            break;
        case 5:
            snprintf(buf, sizeof buf, "UPDATE stations SET docks = docks + 1 WHERE id = %d",
                     station);
            break;
        default:
            snprintf(buf, sizeof buf, "UPDATE rentals SET note = 'n %d/%ld' WHERE id = %ld",
                     i + 1, seq, rental);
        }
        more = buf;
        snprintf(sql, sizeof sql, "BEGIN; INSERT INTO ledger VALUES (%d, %ld, 'w'); %s; COMMIT",
                 i + 1, seq, more);
        if (pgfx_exec_conn(c, "%s", sql) != 0)
            _exit(3);
        usleep(1500);
    }
    PQfinish(c);
    _exit(0);
}

/* ---- checks ---------------------------------------------------------------------- */

/* Wait until every node has every ledger row its origin has (each writer transaction holds
 * one: then every transaction is everywhere). */
static bool wait_quiesced(int timeout_s)
{
    int64_t end = aamm_test_now_ms() + timeout_s * 1000;
    long total = -1;
    while (aamm_test_now_ms() < end) {
        total = 0;
        for (int i = 0; i < NNODES; i++)
            total += pgfx_value_long(fx, i, -1, "SELECT count(*) FROM ledger WHERE node = %d",
                                     i + 1);
        bool all = true;
        for (int i = 0; i < NNODES; i++)
            if (pgfx_value_long(fx, i, -1, "SELECT count(*) FROM ledger") != total)
                all = false;
        if (all)
            return true;
        usleep(200000);
    }
    for (int i = 0; i < NNODES; i++) {
        char *st = pgfx_value(fx, i,
                              "SELECT string_agg(format('peer %%s out %%s conf %%s | in %%s "
                              "applied %%s %%s', peer_id, out_state, out_confirmed_lsn, in_state, "
                              "in_applied_lsn, reason), E'\\n  ') FROM aamm.replication_status");
        fprintf(stderr, "node %d: %ld ledger rows of %ld\n  %s\n", i + 1,
                pgfx_value_long(fx, i, -1, "SELECT count(*) FROM ledger"), total,
                st ? st : "(no status)");
        free(st);
    }
    return false;
}

static void assert_identical(void)
{
    const char *q[] = {"SELECT md5(string_agg(s::text, ',' ORDER BY id)) FROM stations s",
                       "SELECT md5(string_agg(b::text, ',' ORDER BY id)) FROM bikes b",
                       "SELECT md5(string_agg(u::text, ',' ORDER BY id)) FROM users u",
                       "SELECT md5(string_agg(r::text, ',' ORDER BY id)) FROM rentals r",
                       "SELECT md5(string_agg(l::text, ',' ORDER BY node, seq)) FROM ledger l"};
    for (size_t k = 0; k < sizeof q / sizeof *q; k++) {
        char *v0 = pgfx_value(fx, 0, "%s", q[k]);
        ck_assert_ptr_nonnull(v0);
        for (int i = 1; i < NNODES; i++) {
            char *v = pgfx_value(fx, i, "%s", q[k]);
            ck_assert_msg(v && strcmp(v0, v) == 0, "node %d differs from node 1: %s", i + 1,
                          q[k]);
            free(v);
        }
        free(v0);
    }
}

/* ---- the test -------------------------------------------------------------------- */

/* The options of C's join: upstream B, A the other existing node. */
static char conninfo[NNODES][512];
static struct aamm_node_join_peer others[1];
static void join_options(struct aamm_node_join_options *o, int timeout_ms)
{
    for (int i = 0; i < NNODES; i++)
        snprintf(conninfo[i], sizeof conninfo[i], "%s", pgfx_conninfo(fx, i));
    others[0] = (struct aamm_node_join_peer){1, conninfo[0]};
    aamm_node_join_options_init(o);
    o->conninfo = conninfo[2];
    o->node_id = 3;
    o->upstream_id = 2;
    o->upstream_conninfo = conninfo[1];
    o->others = others;
    o->nothers = 1;
    o->timeout_ms = timeout_ms;
}


static struct aamm_node_join_progress last_progress;
static int progress_calls;
static void on_progress(const struct aamm_node_join_progress *p, void *arg)
{
    (void)arg;
    last_progress = *p;
    progress_calls++;
}

/* C joins with B as upstream while A and B write: shared rows updated on both, pre-join
 * rentals updated and deleted; then C's agent starts and A's and B's restart with C as
 * peer, all three write for a while; after quiesce every table is identical on A, B and C,
 * each ledger row is on C exactly once (its primary key plus the count against its
 * origin's), no ledger row met a conflict anywhere (one applied twice would), and every
 * slot left is one of the six the three replicators stream. */
START_TEST(join_under_load)
{
    nrentals = aamm_test_scaled(4000, 500);
    start_agent(0, 3);
    start_agent(1, 3);
    ck_assert_int_eq(
        pgfx_exec(fx, 0,
                  "INSERT INTO stations SELECT g, 'station ' || g, 10 FROM generate_series(1, 20) g;"
                  "INSERT INTO bikes SELECT g, g %% 20 + 1, 'ok' FROM generate_series(1, 200) g;"
                  "INSERT INTO users SELECT g, 'user ' || g, 0 FROM generate_series(1, 200) g;"
                  "INSERT INTO rentals SELECT g, g %% 200 + 1, g %% 199 + 1, repeat('r', 40) "
                  "FROM generate_series(1, %ld) g",
                  nrentals),
        0);
    ck_assert_int_eq(pgfx_wait_long(fx, 1, nrentals, 30000, "SELECT count(*) FROM rentals"),
                     nrentals);
    writers[0] = aamm_test_spawn(writer_main, 0);
    writers[1] = aamm_test_spawn(writer_main, 1);
    usleep(1000000);
    /* A's link to B is down for a second while A writes, and the join starts as it comes
     * back: B is behind on A, and the join must wait for it (step 2) */
    aamm_test_stop(&agents[0], 5000);
    usleep(1000000);
    start_agent(0, 3);

    struct aamm_node_join_options o;
    char err[512];
    join_options(&o, 30000);
    o.progress = on_progress;
    struct aamm_node_join_stats st;
    int64_t t0 = aamm_test_now_ms();
    int rc = aamm_node_join(&o, &st, err, sizeof err);
    int64_t ms = aamm_test_now_ms() - t0;
    ck_assert_msg(rc == 0, "join: %s (%s)", err, aamm_strerror(rc));
    fprintf(stderr,
            "join: %u tables, %" PRIu64 " rows (%" PRIu64 " recent, kept their versions), %" PRIu64
            " bytes in %.3f s (copy %.3f s, freeze %.3f s, %.0f rows/s of copy; %" PRId64
            " ms wall); positions:",
            st.tables, st.rows, st.recent_rows, st.bytes, st.seconds, st.copy_seconds,
            st.freeze_seconds, st.copy_seconds > 0 ? (double)st.rows / st.copy_seconds : 0.0, ms);
    for (uint32_t k = 0; k < st.npositions; k++) {
        char a[AAMM_LSN_BUFSIZE], b[AAMM_LSN_BUFSIZE];
        fprintf(stderr, " node %u slot %s origin %s;", st.positions[k].node_id,
                aamm_lsn_format(st.positions[k].slot_lsn, a),
                aamm_lsn_format(st.positions[k].origin_lsn, b));
    }
    fprintf(stderr, "\n");
    ck_assert_uint_eq(st.tables, 5);
    ck_assert_uint_ge(st.rows, (uint64_t)nrentals);
    ck_assert_int_gt(progress_calls, 0);
    ck_assert_uint_eq(last_progress.tables_done, 6); /* five tables and aamm.tombstone */
    ck_assert_uint_eq(st.npositions, 2);
    ck_assert_uint_eq(st.positions[0].node_id, 2);
    ck_assert_uint_eq(st.positions[0].origin_lsn, 0);

    /* C's agent; A's and B's again with C as peer (they keep their slots aamm_to_3) */
    start_agent(2, 7);
    aamm_test_stop(&agents[0], 5000);
    start_agent(0, 7);
    aamm_test_stop(&agents[1], 5000);
    start_agent(1, 7);
    writers[2] = aamm_test_spawn(writer_main, 2);
    usleep((useconds_t)aamm_test_scaled(3000, 1000) * 1000);
    for (int i = 0; i < NNODES; i++)
        aamm_test_stop(&writers[i], 5000);

    ck_assert_msg(wait_quiesced(90), "not quiesced");
    assert_identical();
    for (int i = 0; i < NNODES; i++) {
        /* every ledger row of every origin, once (the primary key forbids twice) */
        ck_assert_int_eq(pgfx_value_long(fx, i, -1,
                                         "SELECT count(*) FROM (SELECT node FROM ledger GROUP "
                                         "BY node HAVING count(*) <> max(seq)) x"),
                         0);
        ck_assert_int_eq(pgfx_value_long(fx, i, -1,
                                         "SELECT count(*) FROM aamm.conflict_log "
                                         "WHERE relation = 'public.ledger'"),
                         0);
        /* the slots: aamm_to_<each peer>, streamed; nothing else */
        ck_assert_int_eq(pgfx_wait_long(fx, i, 2, 20000,
                                        "SELECT count(*) FROM pg_replication_slots WHERE active "
                                        "AND slot_name LIKE 'aamm_to_%%' AND slot_name <> "
                                        "'aamm_to_%d'",
                                        i + 1),
                         2);
        ck_assert_int_eq(pgfx_value_long(fx, i, -1, "SELECT count(*) FROM pg_replication_slots"),
                         2);
    }
    long crow = pgfx_value_long(fx, 2, -1, "SELECT count(*) FROM rentals");
    fprintf(stderr, "join: after quiesce %ld rentals, %ld ledger rows on each node\n", crow,
            pgfx_value_long(fx, 2, -1, "SELECT count(*) FROM ledger"));
}
END_TEST

/* Errors come back, nothing is left behind: a table missing on the new node is named, and
 * the join fails before it made any slot; an unreachable upstream is AAMM_ECONN; a join
 * that fails after it made its slots drops them; called again with the tables emptied, it
 * succeeds. */
START_TEST(join_errors)
{
    start_agent(0, 3);
    start_agent(1, 3);
    ck_assert_int_eq(pgfx_exec(fx, 2, "DROP TABLE rentals"), 0);
    struct aamm_node_join_options o;
    char err[512];
    join_options(&o, 5000);
    int rc = aamm_node_join(&o, NULL, err, sizeof err);
    ck_assert_int_eq(rc, AAMM_ENOTFOUND);
    ck_assert_msg(strstr(err, "public.rentals is missing on the new node"), "%s", err);
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(pgfx_value_long(fx, i, -1, "SELECT count(*) FROM pg_replication_slots "
                                                    "WHERE slot_name = 'aamm_to_3'"),
                         0);
    o.upstream_conninfo = "host=/nonexistent port=1 dbname=postgres connect_timeout=2";
    rc = aamm_node_join(&o, NULL, err, sizeof err);
    ck_assert_int_eq(rc, AAMM_ECONN);
    ck_assert_msg(strstr(err, "node 2"), "%s", err);

    /* a failure after the slots were made (a table the new node has and the upstream
     * lacks: the upstream's COPY fails) drops them again, on A and on B */
    ck_assert_int_eq(pgfx_exec(fx, 2, "CREATE TABLE extra (id int PRIMARY KEY)"), 0);
    const char *tables[] = {"public.bikes", "public.extra"};
    join_options(&o, 5000);
    o.tables = tables;
    o.ntables = 2;
    o.parallel = 1;
    ck_assert_int_eq(pgfx_exec(fx, 0, "INSERT INTO stations VALUES (1, 's', 1);"
                                      "INSERT INTO bikes VALUES (1, 1, 'ok')"),
                     0);
    ck_assert_int_eq(pgfx_wait_long(fx, 1, 1, 20000, "SELECT count(*) FROM bikes"), 1);
    rc = aamm_node_join(&o, NULL, err, sizeof err);
    ck_assert_int_eq(rc, AAMM_ESERVER);
    ck_assert_msg(strstr(err, "extra"), "%s", err);
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(pgfx_value_long(fx, i, -1, "SELECT count(*) FROM pg_replication_slots "
                                                    "WHERE slot_name = 'aamm_to_3'"),
                         0);
    /* called again once the new node's tables are empty, it succeeds */
    ck_assert_int_eq(pgfx_exec(fx, 2, "TRUNCATE bikes, aamm.tombstone"), 0);
    o.ntables = 1;
    struct aamm_node_join_stats st;
    rc = aamm_node_join(&o, &st, err, sizeof err);
    ck_assert_msg(rc == 0, "%s", err);
    ck_assert_uint_eq(st.tables, 1);
    ck_assert_uint_eq(st.rows, 1);
    char *status = pgfx_value(fx, 2, "SELECT status FROM bikes WHERE id = 1");
    ck_assert_str_eq(status ? status : "(none)", "ok");
    free(status);
    for (int i = 0; i < 2; i++)
        ck_assert_int_eq(pgfx_value_long(fx, i, -1, "SELECT count(*) FROM pg_replication_slots "
                                                    "WHERE slot_name = 'aamm_to_3'"),
                         1);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("join");
    TCase *tc = aamm_test_tcase("join_under_load", 240);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, join_under_load);
    suite_add_tcase(s, tc);
    tc = aamm_test_tcase("join_errors", 90);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, join_errors);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
