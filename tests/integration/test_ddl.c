/*
 * test_ddl.c: DDL in the change stream on three real nodes with replicators and consensus
 * in forked agents: aamm_ddl_execute() under the global lock while rows flow, refusal of
 * DDL outside the allow-list on the origin, node-local DDL, a peer that has not opted in,
 * the lock held by a peer that dies (released when its lease ends), the SQL form (CALL
 * aamm.ddl_execute(), served by the agent with aamm_ddl_serve()) and TRUNCATE only under the
 * lock.
 */
#include <check.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <aamm/aamm.h>
#include <aamm/consensus.h>
#include <aamm/ddl.h>
#include <aamm/node.h>
#include <aamm/replicator.h>

#include "pgfixture.h"
#include "testutil.h"

#define NNODES 3
static struct pgfx *fx;
static int ports[NNODES], raft_ports[NNODES];
static pid_t agents[NNODES];
static const char secret[] = "0123456789abcdef-ddl-test-secret";

/* what an agent does besides replicating (set before it is forked) */
static const char *agent_ddl[NNODES];   /* run this with aamm_ddl_execute() once streaming */
static int agent_hold_lock_ms[NNODES];  /* take the DDL lock with this lease and keep it */
static bool agent_serve[NNODES];        /* serve CALL aamm.ddl_execute() (aamm_ddl_serve) */

/* ---- node setup ------------------------------------------------------------------ */

static void setup_node(int i)
{
    PGconn *c = pgfx_connect(fx, i);
    char err[512];
    ck_assert_ptr_nonnull(c);
    ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(aamm_node_create_apply_role(c, "aamm_apply", NULL, err, sizeof err) == 0, "%s",
                  err);
    /* the application's tables belong to a role of their own; the apply role may act as
     * it (the per-node opt-in to run its DDL) */
    ck_assert_int_eq(pgfx_exec_conn(c, "CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app; "
                                       "GRANT app TO aamm_apply"),
                     0);
    ck_assert_int_eq(pgfx_exec_conn(c, "SET ROLE app; "
                                       "CREATE TABLE bikes (id int PRIMARY KEY, model text); "
                                       "CREATE TABLE rentals (id bigint PRIMARY KEY, bike int, "
                                       "note text); RESET ROLE"),
                     0);
    const char *tables[] = {"bikes", "rentals"};
    for (size_t k = 0; k < 2; k++)
        ck_assert_msg(aamm_node_replicate_table(c, "public", tables[k], "aamm_apply", "aamm", err,
                                                sizeof err) == 0,
                      "%s", err);
    ck_assert_msg(aamm_ddl_configure(c, true, true, err, sizeof err) == 0, "%s", err);
    PQfinish(c);
}

/* ---- the agent ------------------------------------------------------------------- */

static volatile int agent_stop;
static void on_term(int sig)
{
    (void)sig;
    agent_stop = 1;
}

static void out_file(int i, char *buf, size_t n)
{
    snprintf(buf, n, "%s/agent%d.out", pgfx_root(fx), i + 1);
}

static void agent_write(int i, const char *text)
{
    char path[512], tmp[520];
    out_file(i, path, sizeof path);
    snprintf(tmp, sizeof tmp, "%s.t", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return;
    fputs(text, f);
    fclose(f);
    rename(tmp, path);
}

static bool all_streaming(struct aamm_replicator *r)
{
    for (uint32_t k = 0; k < aamm_replicator_npeers(r); k++) {
        struct aamm_replicator_peer_status st;
        aamm_replicator_peer_status(r, k, &st);
        if (st.out_state != AAMM_STREAM_STREAMING || st.in_state != AAMM_STREAM_STREAMING)
            return false;
    }
    return true;
}

static void on_held(struct aamm_consensus *cs, int status,
                    const struct aamm_consensus_ddl_lock *lock, void *arg)
{
    char buf[128];
    (void)cs;
    snprintf(buf, sizeof buf, "held %d %" PRIu64 "\n", status, lock ? lock->token : 0);
    agent_write(*(int *)arg, buf);
}

static void agent_main(int i)
{
    struct aamm_replicator_options o;
    struct aamm_replicator_peer peers[NNODES - 1];
    char portstr[NNODES][16], lport[16], err[512], apply_ci[512], raft[NNODES][32], rdir[512];
    struct aamm_replicator *r;
    int n = 0, me = i;
    bool done = false;
    signal(SIGTERM, on_term);
    aamm_consensus_ignore_sigpipe();
    aamm_replicator_options_init(&o);
    o.node_id = (uint32_t)i + 1;
    o.conninfo = pgfx_conninfo(fx, i);
    snprintf(apply_ci, sizeof apply_ci, "%s", pgfx_conninfo_with(fx, i, "user=aamm_apply"));
    o.apply_conninfo = apply_ci;
    o.cluster = "ddl";
    o.secret = (const uint8_t *)secret;
    o.secret_len = sizeof secret - 1;
    snprintf(lport, sizeof lport, "%d", ports[i]);
    o.listen_port = lport;
    o.reconnect_min_ms = 50;
    o.reconnect_max_ms = 500;
    o.heartbeat_ms = 200;
    o.dead_after_ms = 3000;
    o.held_retry_ms = 500;
    o.status_interval_ms = 200;
    for (int k = 0; k < NNODES; k++)
        snprintf(raft[k], sizeof raft[k], "127.0.0.1:%d", raft_ports[k]);
    for (int k = 0; k < NNODES; k++) {
        if (k == i)
            continue;
        snprintf(portstr[k], sizeof portstr[k], "%d", ports[k]);
        peers[n] = (struct aamm_replicator_peer){(uint32_t)k + 1, NULL, "127.0.0.1", portstr[k],
                                                 raft[k]};
        n++;
    }
    o.peers = peers;
    o.npeers = (uint32_t)n;
    snprintf(rdir, sizeof rdir, "%s/raft%d", pgfx_root(fx), i + 1);
    o.raft_address = raft[i];
    o.raft_data_dir = rdir;
    o.bootstrap_consensus = true;
    if (aamm_replicator_new(&r, &o, err, sizeof err) != 0 || aamm_replicator_start(r) != 0) {
        fprintf(stderr, "agent %d: %s\n", i + 1, r ? aamm_replicator_errmsg(r) : err);
        _exit(3);
    }
    int64_t last_report = aamm_test_now_ms();
    PGconn *serve_conn = NULL; /* the agent's own (superuser) connection for requests */
    while (!agent_stop) {
        if (!done && aamm_test_now_ms() - last_report > 5000) { /* why it is still waiting */
            uint32_t ld = 0;
            char la[64], line[1024];
            (void)aamm_consensus_leader(aamm_replicator_consensus(r), &ld, la, sizeof la);
            aamm_replicator_status_line(r, line, sizeof line);
            fprintf(stderr, "agent %d waits: consensus state %d leader %u; %s\n", i + 1,
                    aamm_consensus_state(aamm_replicator_consensus(r)), ld, line);
            last_report = aamm_test_now_ms();
        }
        if (aamm_replicator_run(r, 100, &agent_stop) != 0) {
            fprintf(stderr, "agent %d: %s\n", i + 1, aamm_replicator_errmsg(r));
            _exit(4);
        }
        if ((done && !agent_serve[i]) || !all_streaming(r) ||
            aamm_consensus_state(aamm_replicator_consensus(r)) == AAMM_CONSENSUS_UNAVAILABLE)
            continue;
        uint32_t leader = 0;
        char addr[64];
        if (aamm_consensus_leader(aamm_replicator_consensus(r), &leader, addr, sizeof addr) != 0 ||
            leader == 0)
            continue;
        if (agent_serve[i]) { /* as a host does from its loop (here every 100 ms) */
            int served = 0, rc;
            if (!serve_conn)
                serve_conn = PQconnectdb(pgfx_conninfo(fx, i));
            rc = aamm_ddl_serve(r, serve_conn, 60000, &served, err, sizeof err);
            if (rc != 0)
                fprintf(stderr, "agent %d: serve: %s\n", i + 1, err);
            if (rc == AAMM_ECONN || rc == AAMM_EUNSUPPORTED)
                _exit(5);
            continue;
        }
        if (agent_hold_lock_ms[i]) {
            aamm_consensus_ddl_acquire(aamm_replicator_consensus(r),
                                       (uint32_t)agent_hold_lock_ms[i], on_held, &me);
            done = true;
        } else if (agent_ddl[i]) {
            struct aamm_ddl_stats st;
            char buf[1024];
            int64_t t0 = aamm_test_now_ms(), busy_ms = -1;
            int rc;
            PGconn *c = PQconnectdb(pgfx_conninfo_with(fx, i, "user=app"));
            char first_busy[512] = "";
            /* a lock held elsewhere: retry until it is free (the test measures when) */
            while ((rc = aamm_ddl_execute(r, c, agent_ddl[i], 20000, &st, err, sizeof err)) ==
                       AAMM_EBUSY &&
                   aamm_test_now_ms() - t0 < 60000) {
                if (!first_busy[0]) {
                    snprintf(first_busy, sizeof first_busy, "%s", err);
                    busy_ms = aamm_test_now_ms() - t0;
                }
                (void)aamm_replicator_run(r, 100, NULL);
            }
            PQfinish(c);
            snprintf(buf, sizeof buf,
                     "rc %d token %" PRIu64 " acquire %" PRId64 " drain %" PRId64 " run %" PRId64
                     " propagate %" PRId64 " release %" PRId64 " waited %" PRId64
                     " busy_at %" PRId64 "\nerr %s\nbusy %s\n",
                     rc, st.token, st.acquire_ms, st.drain_ms, st.run_ms, st.propagate_ms,
                     st.release_ms, aamm_test_now_ms() - t0, busy_ms, rc ? err : "", first_busy);
            agent_write(i, buf);
            done = true;
        }
    }
    PQfinish(serve_conn);
    aamm_replicator_stop(r, 2000);
    aamm_replicator_free(r);
    _exit(0);
}

static void start_agent(int i)
{
    agents[i] = aamm_test_spawn(agent_main, i);
    ck_assert_int_gt(agents[i], 0);
}

/* Every agent, then until each has made its slots (writes from then on reach every peer). */
static void start_all(void)
{
    int64_t end = aamm_test_now_ms() + 60000;
    for (int i = 0; i < NNODES; i++)
        start_agent(i);
    for (int i = 0; i < NNODES; i++)
        ck_assert_msg(pgfx_wait_long(fx, i, NNODES - 1, (int)(end - aamm_test_now_ms()),
                                     "SELECT count(*) FROM pg_replication_slots "
                                     "WHERE slot_name LIKE 'aamm_to_%%'") == NNODES - 1,
                      "node %d: slots not made", i + 1);
}

static void stop_all(void)
{
    for (int i = 0; i < NNODES; i++)
        aamm_test_stop(&agents[i], 5000);
}

/* The agent's report, once written (bounded wait), malloc'ed. */
static char *agent_report(int i, int timeout_s)
{
    char path[512];
    out_file(i, path, sizeof path);
    for (int64_t end = aamm_test_now_ms() + timeout_s * 1000; aamm_test_now_ms() < end;) {
        FILE *f = fopen(path, "r");
        if (f) {
            char *buf = calloc(1, 4096);
            size_t n = fread(buf, 1, 4095, f);
            fclose(f);
            buf[n] = '\0';
            return buf;
        }
        usleep(50000);
    }
    return NULL;
}

static long count(int i, const char *sql)
{
    return pgfx_value_long(fx, i, -1, "%s", sql);
}

static bool wait_all(const char *sql, long want, int timeout_s)
{
    for (int64_t end = aamm_test_now_ms() + timeout_s * 1000; aamm_test_now_ms() < end;) {
        bool ok = true;
        for (int i = 0; i < NNODES; i++)
            if (count(i, sql) != want)
                ok = false;
        if (ok)
            return true;
        usleep(100000);
    }
    for (int i = 0; i < NNODES; i++)
        fprintf(stderr, "node %d: %s -> %ld (want %ld)\n", i + 1, sql, count(i, sql), want);
    return false;
}

static void assert_identical(const char *table, const char *order)
{
    char q[256];
    snprintf(q, sizeof q, "SELECT md5(string_agg(t::text, ',' ORDER BY %s)) FROM %s t", order,
             table);
    char *v0 = pgfx_value(fx, 0, "%s", q);
    for (int i = 1; i < NNODES; i++) {
        char *v = pgfx_value(fx, i, "%s", q);
        ck_assert_msg(v0 && v && strcmp(v0, v) == 0, "%s differs between node 1 and node %d", table,
                      i + 1);
        free(v);
    }
    free(v0);
}

/* ---- tests ----------------------------------------------------------------------- */

/* The seed's example: ALTER TABLE bikes ADD COLUMN status in one city while rentals are
 * written in all three: every node ends with the column and identical data; rows written in
 * the new shape on any node reach the others. */
START_TEST(add_column_under_lock_while_writing)
{
    agent_ddl[0] = "ALTER TABLE bikes ADD COLUMN status text";
    start_all();
    long seq = 0;
    char *rep = NULL;
    for (int64_t end = aamm_test_now_ms() + 90000; !rep && aamm_test_now_ms() < end;) {
        for (int i = 0; i < NNODES; i++, seq++)
            ck_assert_int_eq(pgfx_exec(fx, i, "INSERT INTO rentals VALUES (%ld, %d, 'r')", seq, i),
                             0);
        char path[512];
        out_file(0, path, sizeof path);
        if (access(path, R_OK) == 0)
            rep = agent_report(0, 1);
        usleep(20000);
    }
    ck_assert_msg(rep != NULL, "the DDL never finished");
    fprintf(stderr, "add_column_under_lock_while_writing: %s", rep);
    ck_assert_msg(strncmp(rep, "rc 0 ", 5) == 0, "aamm_ddl_execute: %s", rep);
    free(rep);
    /* every node has the column now (the DDL was acknowledged by every peer) */
    for (int i = 0; i < NNODES; i++)
        ck_assert_int_eq(count(i, "SELECT count(*) FROM information_schema.columns WHERE "
                                  "table_name = 'bikes' AND column_name = 'status'"),
                         1);
    /* rows in the new shape, from every node */
    for (int i = 0; i < NNODES; i++)
        ck_assert_int_eq(pgfx_exec(fx, i, "INSERT INTO bikes VALUES (%d, 'city', 'ok-%d')", i, i),
                         0);
    ck_assert(wait_all("SELECT count(*) FROM bikes WHERE status LIKE 'ok-%'", NNODES, 60));
    ck_assert(wait_all("SELECT count(*) FROM rentals", seq, 60));
    assert_identical("bikes", "id");
    assert_identical("rentals", "id");
    /* it ran on the peers as the origin's role, and they logged it */
    for (int i = 1; i < NNODES; i++)
        ck_assert_int_eq(count(i, "SELECT count(*) FROM aamm.ddl_log WHERE status = 'applied' "
                                  "AND role = 'app' AND origin_node = 1"),
                         1);
    stop_all();
}
END_TEST

/* With DDL capture on, a command outside the allow-list is refused on the origin with a
 * hint; node-local DDL runs after SET aamm.replicate_ddl = off and stays local; an allowed
 * one outside aamm_ddl_execute() travels too. */
START_TEST(refused_local_and_plain)
{
    start_all();
    PGconn *c = pgfx_connect(fx, 0);
    ck_assert_ptr_nonnull(c);
    PGresult *res = PQexec(c, "CREATE SCHEMA elsewhere");
    ck_assert_int_eq(PQresultStatus(res), PGRES_FATAL_ERROR);
    ck_assert_str_eq(PQresultErrorField(res, PG_DIAG_SQLSTATE), "AA007");
    ck_assert_ptr_nonnull(strstr(PQresultErrorField(res, PG_DIAG_MESSAGE_HINT),
                                 "SET aamm.replicate_ddl = off"));
    PQclear(res);
    ck_assert_int_eq(pgfx_exec_conn(c, "SET aamm.replicate_ddl = off; "
                                       "CREATE INDEX rentals_note_local ON rentals (note); "
                                       "RESET aamm.replicate_ddl"),
                     0);
    ck_assert_int_eq(pgfx_exec_conn(c, "SET ROLE app; CREATE INDEX rentals_bike ON rentals (bike); "
                                       "RESET ROLE"),
                     0);
    /* libaamm's own setup calls run with capture on: their DDL stays here */
    char err[256];
    ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(aamm_node_create_apply_role(c, "aamm_apply", NULL, err, sizeof err) == 0, "%s",
                  err);
    ck_assert_int_eq(pgfx_exec_conn(c, "SET ROLE app; CREATE TABLE extra (id int PRIMARY KEY); "
                                       "RESET ROLE"),
                     0);
    ck_assert_msg(aamm_node_replicate_table(c, "public", "extra", "aamm_apply", "aamm", err,
                                            sizeof err) == 0,
                  "%s", err);
    PQfinish(c);
    ck_assert(wait_all("SELECT count(*) FROM pg_indexes WHERE indexname = 'rentals_bike'", 1, 60));
    ck_assert(wait_all("SELECT count(*) FROM pg_tables WHERE tablename = 'extra'", 1, 60));
    /* the peers ran exactly the two DDL statements made by hand */
    for (int i = 1; i < NNODES; i++)
        ck_assert_int_eq(count(i, "SELECT count(*) FROM aamm.ddl_log"), 2);
    for (int i = 1; i < NNODES; i++)
        ck_assert_int_eq(count(i, "SELECT count(*) FROM pg_indexes WHERE indexname = "
                                  "'rentals_note_local'"),
                         0);
    ck_assert_int_eq(count(0, "SELECT count(*) FROM pg_indexes WHERE indexname = "
                              "'rentals_note_local'"),
                     1);
    stop_all();
}
END_TEST

/* A node that has not opted in logs the DDL as skipped; the rows of the new shape then hold
 * its stream with a clear reason until the column exists there too (added by hand), after
 * which it catches up by itself. */
START_TEST(peer_not_opted_in)
{
    char err[256];
    PGconn *c3 = pgfx_connect(fx, 2);
    ck_assert_msg(aamm_ddl_configure(c3, true, false, err, sizeof err) == 0, "%s", err);
    start_all();
    ck_assert_int_eq(pgfx_exec(fx, 0, "SET ROLE app; ALTER TABLE bikes ADD COLUMN colour text"), 0);
    int64_t end = aamm_test_now_ms() + 60000;
    while (count(2, "SELECT count(*) FROM aamm.ddl_log WHERE status = 'skipped'") != 1 &&
           aamm_test_now_ms() < end)
        usleep(100000);
    ck_assert_int_eq(count(2, "SELECT count(*) FROM aamm.ddl_log WHERE status = 'skipped'"), 1);
    ck_assert_int_eq(pgfx_exec(fx, 0, "INSERT INTO bikes VALUES (1, 'cargo', 'red')"), 0);
    /* held on node 3: the view says why */
    end = aamm_test_now_ms() + 60000;
    while (count(2, "SELECT count(*) FROM aamm.replication_status WHERE peer_id = 1 AND "
                    "in_state = 'held' AND reason LIKE '%colour%'") != 1 &&
           aamm_test_now_ms() < end)
        usleep(100000);
    ck_assert_int_eq(count(2, "SELECT count(*) FROM aamm.replication_status WHERE peer_id = 1 AND "
                              "in_state = 'held' AND reason LIKE '%colour%'"),
                     1);
    ck_assert_int_eq(pgfx_exec_conn(c3, "SET aamm.replicate_ddl = off; "
                                        "ALTER TABLE bikes ADD COLUMN colour text"),
                     0);
    PQfinish(c3);
    ck_assert(wait_all("SELECT count(*) FROM bikes WHERE colour = 'red'", 1, 60));
    assert_identical("bikes", "id");
    stop_all();
}
END_TEST

/* The lock: node 2 takes it and dies; node 1's aamm_ddl_execute() gets AAMM_EBUSY naming
 * node 2 until the lease ends, then succeeds. The release time is printed. */
START_TEST(lock_of_a_dead_holder)
{
    int lease = 4000;
    agent_hold_lock_ms[1] = lease;
    start_all();
    char *held = agent_report(1, 90);
    ck_assert_msg(held && strncmp(held, "held 0 ", 7) == 0, "node 2 did not get the lock: %s",
                  held ? held : "(nothing)");
    free(held);
    int64_t killed = aamm_test_now_ms();
    aamm_test_kill(&agents[1]);
    /* node 1 now asks (its agent is told by a restart with a DDL to run) */
    aamm_test_kill(&agents[0]);
    agent_ddl[0] = "CREATE INDEX bikes_model ON bikes (model)";
    start_agent(0);
    agent_hold_lock_ms[1] = 0;
    start_agent(1);
    char *rep = agent_report(0, 120);
    ck_assert_msg(rep != NULL, "node 1 never finished its DDL");
    fprintf(stderr, "lock_of_a_dead_holder: lease %d ms, killed %" PRId64 " ms before node 1's "
                    "report: %s",
            lease, aamm_test_now_ms() - killed, rep);
    ck_assert_msg(strncmp(rep, "rc 0 ", 5) == 0, "aamm_ddl_execute: %s", rep);
    free(rep);
    ck_assert(wait_all("SELECT count(*) FROM pg_indexes WHERE indexname = 'bikes_model'", 1, 60));
    stop_all();
}
END_TEST

/* Send @sql on @c and, until its result is in, insert a rental on every node every 20 ms
 * (when @seq is not NULL: numbered from *seq). Returns the first result (bounded: 120 s). */
static PGresult *send_while_writing(PGconn *c, const char *sql, long *seq)
{
    PGresult *first = NULL, *res;
    ck_assert_int_eq(PQsendQuery(c, sql), 1);
    for (int64_t end = aamm_test_now_ms() + 120000; aamm_test_now_ms() < end;) {
        ck_assert_int_eq(PQconsumeInput(c), 1);
        if (!PQisBusy(c))
            break;
        if (seq)
            for (int i = 0; i < NNODES; i++, (*seq)++)
                ck_assert_int_eq(
                    pgfx_exec(fx, i, "INSERT INTO rentals VALUES (%ld, %d, 'r')", *seq, i), 0);
        usleep(20000);
    }
    ck_assert_msg(!PQisBusy(c), "no answer to %s in time", sql);
    while ((res = PQgetResult(c)) != NULL) {
        if (!first)
            first = res;
        else
            PQclear(res);
    }
    ck_assert_ptr_nonnull(first);
    return first;
}

/* @c's error for @sql: SQLSTATE @state and a message holding @text (NULL: not checked) */
static void expect_error(PGconn *c, const char *sql, const char *state, const char *text)
{
    PGresult *res = send_while_writing(c, sql, NULL);
    const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const char *msg = PQresultErrorMessage(res);
    ck_assert_msg(PQresultStatus(res) == PGRES_FATAL_ERROR, "%s: no error", sql);
    ck_assert_msg(st && strcmp(st, state) == 0, "%s: SQLSTATE %s, want %s: %s", sql,
                  st ? st : "-", state, msg);
    ck_assert_msg(!text || strstr(msg, text), "%s: error without \"%s\": %s", sql, text, msg);
    PQclear(res);
}

/* CALL @sql as app on node 1 while rentals are written on every node: it succeeds, and by
 * then (the peers applied it before the CALL returned) @check gives 1 on every node and each
 * peer logged one applied DDL of app from node 1 where @logged; the rentals converge. */
static void call_while_writing(const char *sql, const char *check, const char *logged)
{
    PGconn *app = PQconnectdb(pgfx_conninfo_with(fx, 0, "user=app"));
    long seq = 0;
    int64_t t0 = aamm_test_now_ms();
    ck_assert_int_eq(PQstatus(app), CONNECTION_OK);
    PGresult *res = send_while_writing(app, sql, &seq);
    ck_assert_msg(PQresultStatus(res) == PGRES_COMMAND_OK, "%s: %s", sql, PQresultErrorMessage(res));
    PQclear(res);
    PQfinish(app);
    fprintf(stderr, "%s: returned after %" PRId64 " ms\n", sql, aamm_test_now_ms() - t0);
    for (int i = 0; i < NNODES; i++)
        ck_assert_msg(count(i, check) == 1, "node %d: %s", i + 1, check);
    for (int i = 1; i < NNODES; i++)
        ck_assert_int_eq(pgfx_value_long(fx, i, -1,
                                         "SELECT count(*) FROM aamm.ddl_log WHERE status = "
                                         "'applied' AND role = 'app' AND origin_node = 1 AND %s",
                                         logged),
                         1);
    ck_assert(wait_all("SELECT count(*) FROM rentals", seq, 60));
    assert_identical("rentals", "id");
}

/* The SQL form: CALL aamm.ddl_execute() on node 1, served by its agent under the lock while
 * rentals flow on every node; a failing DDL; a CALL in a transaction block; a role that may
 * not alter the table, one that tries to record a request as the owner, a superuser. */
START_TEST(sql_form)
{
    agent_serve[0] = true;
    ck_assert_int_eq(pgfx_exec(fx, 0, "CREATE ROLE intruder LOGIN"), 0);
    start_all();

    /* 1. the DDL, while rentals are written on every node */
    call_while_writing("CALL aamm.ddl_execute('ALTER TABLE bikes ADD COLUMN status text', '90 s')",
                       "SELECT count(*) FROM information_schema.columns WHERE table_name = "
                       "'bikes' AND column_name = 'status'",
                       "command LIKE 'ALTER TABLE bikes%'");
    ck_assert_int_eq(count(0, "SELECT count(*) FROM aamm.ddl_request WHERE status = 'done' AND "
                              "token > 0 AND role = 'app' AND message IS NULL"),
                     1);
    PGconn *app = PQconnectdb(pgfx_conninfo_with(fx, 0, "user=app"));
    ck_assert_int_eq(PQstatus(app), CONNECTION_OK);

    /* 2. a DDL that fails: the server's error, nothing replicated */
    expect_error(app, "CALL aamm.ddl_execute('ALTER TABLE bikes ADD COLUMN status text', '60 s')",
                 "AA008", "already exists");
    ck_assert_int_eq(count(0, "SELECT count(*) FROM aamm.ddl_request WHERE status = 'failed' AND "
                              "message LIKE '%already exists%'"),
                     1);

    /* 3. in a transaction block: refused before a request is recorded */
    ck_assert_int_eq(pgfx_exec_conn(app, "BEGIN"), 0);
    expect_error(app, "CALL aamm.ddl_execute('ALTER TABLE bikes ADD COLUMN colour text')", "2D000",
                 "outside_a_transaction_block");
    ck_assert_int_eq(pgfx_exec_conn(app, "ROLLBACK"), 0);
    ck_assert_int_eq(count(0, "SELECT count(*) FROM aamm.ddl_request"), 2);

    /* 4. a role that may not alter the owner's table: the agent runs it as that role, the
     *    server refuses; recording a request as the owner is refused outright (nobody can
     *    run DDL as a role their login cannot act as); a superuser's request is refused */
    PGconn *in = PQconnectdb(pgfx_conninfo_with(fx, 0, "user=intruder"));
    ck_assert_int_eq(PQstatus(in), CONNECTION_OK);
    expect_error(in, "CALL aamm.ddl_execute('ALTER TABLE bikes ADD COLUMN evil text', '60 s')",
                 "AA008", "must be owner");
    expect_error(in,
                 "SELECT aamm.ddl_request_submit('app', 'ALTER TABLE bikes ADD COLUMN evil2 text', "
                 "'public', '60 s')",
                 "42501", "as role app");
    PQfinish(in);
    PGconn *admin = pgfx_connect(fx, 0);
    expect_error(admin, "CALL aamm.ddl_execute('ALTER TABLE bikes ADD COLUMN evil3 text')", "42501",
                 "superuser");
    PQfinish(admin);
    /* a request made as app by someone else would have run by now (the agent polls) */
    usleep(1500000);
    ck_assert_int_eq(count(0, "SELECT count(*) FROM aamm.ddl_request WHERE command LIKE "
                              "'%evil2%' OR command LIKE '%evil3%'"),
                     0);
    for (int i = 0; i < NNODES; i++)
        ck_assert_int_eq(count(i, "SELECT count(*) FROM information_schema.columns WHERE "
                                  "table_name = 'bikes' AND column_name LIKE 'evil%'"),
                         0);
    for (int i = 1; i < NNODES; i++)
        ck_assert_int_eq(count(i, "SELECT count(*) FROM aamm.ddl_log"), 1);

    /* 5. node 2's agent serves nothing: the CALL times out and its request never runs; on
     *    node 1 a request left pending past its deadline is abandoned, one left running a
     *    minute past it (its agent died) failed */
    PGconn *app2 = PQconnectdb(pgfx_conninfo_with(fx, 1, "user=app"));
    expect_error(app2, "CALL aamm.ddl_execute('ALTER TABLE bikes ADD COLUMN late2 text', '1 s')",
                 "57014", "no agent took it");
    PQfinish(app2);
    ck_assert_int_eq(count(1, "SELECT count(*) FROM aamm.ddl_request WHERE status = 'abandoned'"),
                     1);
    ck_assert_int_eq(pgfx_exec(fx, 0, "INSERT INTO aamm.ddl_request (command, role, search_path, "
                                      "deadline, status) VALUES ('ALTER TABLE bikes ADD COLUMN "
                                      "late text', 'app', 'public', now() - interval '1 s', "
                                      "'pending'), ('ALTER TABLE bikes ADD COLUMN lost text', "
                                      "'app', 'public', now() - interval '2 minutes', 'running')"),
                     0);
    ck_assert_int_eq(pgfx_wait_long(fx, 0, 2, 20000,
                                    "SELECT count(*) FROM aamm.ddl_request WHERE (status = "
                                    "'abandoned' AND command LIKE '%%late%%') OR (status = "
                                    "'failed' AND command LIKE '%%lost%%')"),
                     2);
    ck_assert_int_eq(count(0, "SELECT count(*) FROM information_schema.columns WHERE "
                              "table_name = 'bikes' AND column_name IN ('late', 'lost')"),
                     0);
    PQfinish(app);
    stop_all();
}
END_TEST

/* TRUNCATE: refused plain (AA007), node-local after SET aamm.replicate_ddl = off, and every
 * node's under the lock (CALL aamm.ddl_execute('TRUNCATE bikes'), its writers stopped, while
 * rentals flow); no truncate ever reaches apply through pgoutput. */
START_TEST(truncate_under_lock)
{
    agent_serve[0] = true;
    start_all();
    ck_assert_int_eq(pgfx_exec(fx, 0, "INSERT INTO bikes SELECT g, 'm' FROM generate_series(1, 30) g"),
                     0);
    ck_assert(wait_all("SELECT count(*) FROM bikes", 30, 60));

    /* plain: refused on every node, with the way out in the hint */
    for (int i = 0; i < NNODES; i++) {
        PGconn *c = PQconnectdb(pgfx_conninfo_with(fx, i, "user=app"));
        PGresult *res = PQexec(c, "TRUNCATE bikes");
        ck_assert_int_eq(PQresultStatus(res), PGRES_FATAL_ERROR);
        ck_assert_str_eq(PQresultErrorField(res, PG_DIAG_SQLSTATE), "AA007");
        const char *hint = PQresultErrorField(res, PG_DIAG_MESSAGE_HINT);
        ck_assert_ptr_nonnull(hint);
        ck_assert_ptr_nonnull(strstr(hint, "CALL aamm.ddl_execute"));
        ck_assert_ptr_nonnull(strstr(hint, "SET aamm.replicate_ddl = off"));
        PQclear(res);
        PQfinish(c);
    }
    ck_assert_int_eq(count(0, "SELECT count(*) FROM bikes"), 30);

    /* node-local on node 3: its rows go, the others keep theirs (a row written on node 3
     * afterwards shows its stream passed the TRUNCATE) */
    ck_assert_int_eq(pgfx_exec(fx, 2, "SET ROLE app; SET aamm.replicate_ddl = off; TRUNCATE bikes"),
                     0);
    ck_assert_int_eq(pgfx_exec(fx, 2, "INSERT INTO bikes VALUES (100, 'after')"), 0);
    ck_assert(wait_all("SELECT count(*) FROM bikes WHERE id = 100", 1, 60));
    ck_assert_int_eq(count(0, "SELECT count(*) FROM bikes"), 31);
    ck_assert_int_eq(count(1, "SELECT count(*) FROM bikes"), 31);
    ck_assert_int_eq(count(2, "SELECT count(*) FROM bikes"), 1);

    /* under the lock, from node 1, while rentals are written everywhere */
    call_while_writing("CALL aamm.ddl_execute('TRUNCATE bikes', '90 s')",
                       "SELECT (count(*) = 0)::int FROM bikes", "tags = ARRAY['TRUNCATE TABLE']");
    /* the table works on: a row from node 2 reaches every node */
    ck_assert_int_eq(pgfx_exec(fx, 1, "INSERT INTO bikes VALUES (7, 'new')"), 0);
    ck_assert(wait_all("SELECT count(*) FROM bikes", 1, 60));
    /* apply never saw a truncate change: not published, none logged */
    for (int i = 0; i < NNODES; i++) {
        ck_assert_int_eq(count(i, "SELECT count(*) FROM pg_publication WHERE pubname = 'aamm' "
                                  "AND NOT pubtruncate"),
                         1);
        ck_assert_int_eq(count(i, "SELECT count(*) FROM aamm.conflict_log WHERE kind = 'truncate'"),
                         0);
    }
    stop_all();
}
END_TEST

/* ---- fixture ------------------------------------------------------------------------ */

static void setup(void)
{
    fx = pgfx_start(NNODES, "max_replication_slots = 20\nmax_wal_senders = 20\n");
    ck_assert_ptr_nonnull(fx);
    for (int i = 0; i < NNODES; i++) {
        setup_node(i);
        ports[i] = aamm_test_free_port();
        raft_ports[i] = aamm_test_free_port();
        agents[i] = 0;
        agent_ddl[i] = NULL;
        agent_hold_lock_ms[i] = 0;
        agent_serve[i] = false;
    }
}

static void teardown(void)
{
    for (int i = 0; i < NNODES; i++)
        aamm_test_kill(&agents[i]);
    pgfx_destroy(fx);
    fx = NULL;
}

int main(void)
{
    Suite *s = suite_create("ddl");
    const struct {
        const char *name;
        const TTest *t;
        double timeout;
    } cases[] = {
        {"add_column_under_lock_while_writing", add_column_under_lock_while_writing, 180},
        {"refused_local_and_plain", refused_local_and_plain, 150},
        {"peer_not_opted_in", peer_not_opted_in, 150},
        {"lock_of_a_dead_holder", lock_of_a_dead_holder, 200},
        {"sql_form", sql_form, 240},
        {"truncate_under_lock", truncate_under_lock, 240},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        TCase *tc = aamm_test_tcase(cases[i].name, cases[i].timeout);
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, cases[i].t);
        suite_add_tcase(s, tc);
    }
    return aamm_test_run(s);
}
