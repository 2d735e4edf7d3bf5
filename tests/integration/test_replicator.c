/*
 * test_replicator.c: three real PostgreSQL nodes, each with a replicator in its own forked
 * agent process (public API only, like a host): they converge under writes on every node,
 * lose nothing and apply nothing twice through kill -9 of agents and a stopped server, keep
 * the slots of a node that only applies moving, and show their status in
 * aamm.replication_status.
 */
#include <check.h>
#include <poll.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <aamm/aamm.h>
#include <aamm/consensus.h>
#include <aamm/node.h>
#include <aamm/replicator.h>

#include "netfx.h"
#include "pgfixture.h"
#include "testutil.h"

#define NNODES 3
static struct pgfx *fx;
static int ports[NNODES];
static pid_t agents[NNODES];
static int dial_port[NNODES][NNODES]; /* where agent i dials peer k (0: ports[k]) */
static bool with_consensus;            /* agents run consensus and supply galloc "rentals" */
static bool parted[NNODES];            /* nodes the agents no longer have as peers */
static int raft_ports[NNODES];
static const char secret[] = "0123456789abcdef-replicator-test";

/* ---- node setup ------------------------------------------------------------------ */

static void setup_node(int i)
{
    PGconn *c = pgfx_connect(fx, i);
    char err[512];
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(pgfx_exec_conn(c,
                                    "CREATE TABLE ledger (node int, seq bigint, note text, "
                                    "PRIMARY KEY (node, seq));"
                                    "CREATE TABLE users (id int PRIMARY KEY, name text);"
                                    "CREATE TABLE bikes (id int PRIMARY KEY, status text);"
                                    "CREATE TABLE rentals (id bigint PRIMARY KEY, "
                                    "bike_id int REFERENCES bikes, user_id int)"),
                     0);
    ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(aamm_node_create_apply_role(c, "aamm_apply", NULL, err, sizeof err) == 0, "%s",
                  err);
    const char *tables[] = {"ledger", "users", "bikes", "rentals"};
    for (size_t k = 0; k < 4; k++)
        ck_assert_msg(aamm_node_replicate_table(c, "public", tables[k], "aamm_apply", "aamm", err,
                                                sizeof err) == 0,
                      "%s", err);
    PQfinish(c);
}

/* ---- the agent: a forked process running one replicator ----------------------------- */

static volatile int agent_stop;
static void on_term(int sig)
{
    (void)sig;
    agent_stop = 1;
}

static void agent_main(int i)
{
    struct aamm_replicator_options o;
    struct aamm_replicator_peer peers[NNODES - 1];
    char portstr[NNODES][16], lport[16], err[512], apply_ci[512];
    struct aamm_replicator *r;
    int n = 0, rc;
    signal(SIGTERM, on_term);
    aamm_consensus_ignore_sigpipe();
    aamm_replicator_options_init(&o);
    o.node_id = (uint32_t)i + 1;
    o.conninfo = pgfx_conninfo(fx, i);
    snprintf(apply_ci, sizeof apply_ci, "%s", pgfx_conninfo_with(fx, i, "user=aamm_apply"));
    o.apply_conninfo = apply_ci;
    o.cluster = "test";
    o.secret = (const uint8_t *)secret;
    o.secret_len = sizeof secret - 1;
    snprintf(lport, sizeof lport, "%d", ports[i]);
    o.listen_host = "127.0.0.1";
    o.listen_port = lport;
    o.reconnect_min_ms = 50;
    o.reconnect_max_ms = 500;
    o.heartbeat_ms = 200;
    o.dead_after_ms = 3000;
    o.status_interval_ms = 200;
    for (int k = 0; k < NNODES; k++) {
        if (k == i || parted[k])
            continue;
        snprintf(portstr[k], sizeof portstr[k], "%d", dial_port[i][k] ? dial_port[i][k] : ports[k]);
        peers[n].node_id = (uint32_t)k + 1;
        peers[n].name = NULL;
        peers[n].host = "127.0.0.1";
        peers[n].port = portstr[k];
        peers[n].raft_address = NULL;
        n++;
    }
    o.peers = peers;
    o.npeers = (uint32_t)n;
    char raft[NNODES][32], rdir[512];
    const char *seqs[] = {"rentals"};
    if (with_consensus) {
        for (int k = 0; k < NNODES; k++)
            snprintf(raft[k], sizeof raft[k], "127.0.0.1:%d", raft_ports[k]);
        for (int k = 0, m = 0; k < NNODES; k++)
            if (k != i)
                peers[m++].raft_address = raft[k];
        snprintf(rdir, sizeof rdir, "%s/raft%d", pgfx_root(fx), i + 1);
        o.raft_address = raft[i];
        o.raft_data_dir = rdir;
        o.bootstrap_consensus = true;
        o.sequences = seqs;
        o.nsequences = 1;
        o.sequence_range_size = 100;
    }
    if (aamm_replicator_new(&r, &o, err, sizeof err) != 0) {
        fprintf(stderr, "agent %d: %s\n", i + 1, err);
        _exit(2);
    }
    if ((rc = aamm_replicator_start(r)) != 0) {
        fprintf(stderr, "agent %d: start: %s\n", i + 1, aamm_replicator_errmsg(r));
        _exit(3);
    }
    while (!agent_stop) {
        rc = aamm_replicator_run(r, 1000, &agent_stop);
        if (rc != 0) {
            fprintf(stderr, "agent %d: %s\n", i + 1, aamm_replicator_errmsg(r));
            _exit(4);
        }
    }
    aamm_replicator_stop(r, 2000);
    aamm_replicator_free(r);
    _exit(0);
}

static void start_agent(int i)
{
    agents[i] = aamm_test_spawn(agent_main, i);
    ck_assert_int_gt(agents[i], 0);
}

static void stop_agent(int i)
{
    aamm_test_stop(&agents[i], 5000);
}

/* ---- checks ---------------------------------------------------------------------- */

static long count(int i, const char *sql)
{
    return pgfx_value_long(fx, i, -1, "%s", sql);
}

/* Start every agent and wait until each has made its slots (aamm_replicator_start()
 * creates them before anything else): writes from then on reach every peer. */
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

/* Wait until every node has @want ledger rows (bounded); returns true when they do. */
static bool wait_ledger(long want, int timeout_s)
{
    int64_t end = aamm_test_now_ms() + timeout_s * 1000;
    while (aamm_test_now_ms() < end) {
        bool all = true;
        for (int i = 0; i < NNODES; i++)
            if (count(i, "SELECT count(*) FROM ledger") != want)
                all = false;
        if (all)
            return true;
        usleep(100000);
    }
    for (int i = 0; i < NNODES; i++) {
        char *st = pgfx_value(fx, i, "SELECT string_agg(format('peer %%s out %%s sent %%s acked %%s "
                                     "conf %%s | in %%s recv %%s applied %%s pending %%s %%s', "
                                     "peer_id, out_state, out_sent_lsn, out_acked_lsn, "
                                     "out_confirmed_lsn, in_state, in_received_lsn, "
                                     "in_applied_lsn, in_pending, reason), E'\\n  ') "
                                     "FROM aamm.replication_status");
        fprintf(stderr, "node %d: %ld ledger rows (want %ld), by node: %s\n  %s\n", i + 1,
                count(i, "SELECT count(*) FROM ledger"), want,
                pgfx_value(fx, i, "SELECT string_agg(node || ':' || n, ' ') FROM (SELECT node, "
                                  "count(*) n FROM ledger GROUP BY 1 ORDER BY 1) x"),
                st ? st : "(no status)");
        free(st);
    }
    return false;
}

/* Every table identical on every node, row by row (an md5 over the ordered rows). */
static void assert_identical(void)
{
    const char *q[] = {"SELECT md5(string_agg(l::text, ',' ORDER BY node, seq)) FROM ledger l",
                       "SELECT md5(string_agg(u::text, ',' ORDER BY id)) FROM users u",
                       "SELECT md5(string_agg(b::text, ',' ORDER BY id)) FROM bikes b",
                       "SELECT md5(string_agg(r::text, ',' ORDER BY id)) FROM rentals r"};
    for (size_t k = 0; k < 4; k++) {
        char *v0 = pgfx_value(fx, 0, "%s", q[k]);
        for (int i = 1; i < NNODES; i++) {
            char *v = pgfx_value(fx, i, "%s", q[k]);
            ck_assert_msg((v0 == NULL && v == NULL) || (v0 && v && strcmp(v0, v) == 0),
                          "node %d differs from node 1: %s", i + 1, q[k]);
            free(v);
        }
        free(v0);
    }
    /* foreign keys: apply skips FK checks (session_replication_role = replica), so check
     * that no rental points at a bike that is missing on any node */
    for (int i = 0; i < NNODES; i++)
        ck_assert_int_eq(count(i, "SELECT count(*) FROM rentals r LEFT JOIN bikes b "
                                  "ON b.id = r.bike_id WHERE r.bike_id IS NOT NULL AND b.id IS NULL"),
                         0);
}

/* No ledger row was ever applied twice: a second insert of the same key would meet the
 * row and be logged as insert_exists. */
static void assert_no_duplicates(void)
{
    for (int i = 0; i < NNODES; i++)
        ck_assert_int_eq(count(i, "SELECT count(*) FROM aamm.conflict_log "
                                  "WHERE relation = 'public.ledger'"),
                         0);
}

/* No ack runs ahead of what is durable: what node i's replicator last saw acknowledged by
 * peer k (its status row, read first) is at or below k's flushed origin progress for i (read
 * after: it only grows). */
static void check_ack(int i, int k)
{
    char *ack = pgfx_value(fx, i,
                           "SELECT out_acked_lsn FROM aamm.replication_status WHERE peer_id = %d",
                           k + 1);
    if (!ack)
        return;
    long ok = pgfx_value_long(fx, k, -1,
                              "SELECT (coalesce(pg_replication_origin_progress("
                              "'aamm_from_%d', true), '0/0') >= '%s')::int",
                              i + 1, ack);
    ck_assert_msg(ok != 0, "node %d saw ack %s from node %d, beyond what is flushed there", i + 1,
                  ack, k + 1);
    free(ack);
}

static void check_acks(void)
{
    for (int i = 0; i < NNODES; i++)
        for (int k = 0; k < NNODES; k++)
            if (k != i)
                check_ack(i, k);
}

/* Node @i commits @n ledger rows from @first, one transaction each. */
static void write_ledger(int i, long first, long n)
{
    PGconn *c = pgfx_connect(fx, i);
    ck_assert_ptr_nonnull(c);
    for (long s = first; s < first + n; s++) {
        long b = (i + 1) * 1000000L + s;
        if (s % 10 == 0) /* a bike and its rental in one transaction with the ledger row */
            ck_assert_int_eq(pgfx_exec_conn(c,
                                            "INSERT INTO ledger VALUES (%d, %ld, 'x');"
                                            "INSERT INTO bikes VALUES (%ld, 'ok');"
                                            "INSERT INTO rentals VALUES (%ld, %ld, 1)",
                                            i + 1, s, b, b, b),
                             0);
        else
            ck_assert_int_eq(pgfx_exec_conn(c, "INSERT INTO ledger VALUES (%d, %ld, 'x')", i + 1,
                                            s),
                             0);
    }
    PQfinish(c);
}

/* ---- tests ----------------------------------------------------------------------- */

/* Writes on every node reach every other node; a conflicting insert of one key resolves
 * to the later writer everywhere; the status view shows both directions streaming. */
START_TEST(three_nodes_converge)
{
    long n = aamm_test_scaled(200, 40);
    start_all();
    for (int i = 0; i < NNODES; i++)
        write_ledger(i, 0, n);
    ck_assert(wait_ledger(NNODES * n, 60));
    /* the seed's conflict: An in one city, Wim a moment later in another */
    /* (both open before either commits, so neither sees the other's row) */
    PGconn *an = pgfx_connect(fx, 0), *wim = pgfx_connect(fx, 1);
    ck_assert(an && wim);
    ck_assert_int_eq(pgfx_exec_conn(an, "BEGIN; INSERT INTO users VALUES (2574, 'An')"), 0);
    ck_assert_int_eq(pgfx_exec_conn(wim, "BEGIN; INSERT INTO users VALUES (2574, 'Wim')"), 0);
    ck_assert_int_eq(pgfx_exec_conn(an, "COMMIT"), 0);
    usleep(20000);
    ck_assert_int_eq(pgfx_exec_conn(wim, "COMMIT"), 0);
    PQfinish(an);
    PQfinish(wim);
    int64_t end = aamm_test_now_ms() + 30000;
    bool ok = false;
    while (!ok && aamm_test_now_ms() < end) {
        ok = true;
        for (int i = 0; i < NNODES; i++) {
            char *v = pgfx_value(fx, i, "SELECT name FROM users WHERE id = 2574");
            if (!v || strcmp(v, "Wim") != 0)
                ok = false;
            free(v);
        }
        usleep(100000);
    }
    ck_assert_msg(ok, "users 2574 is not 'Wim' everywhere");
    ck_assert_int_ge(count(0, "SELECT count(*) FROM aamm.conflict_log WHERE kind = 'insert_exists'"),
                     1);
    usleep(500000);
    assert_identical();
    assert_no_duplicates();
    for (int i = 0; i < NNODES; i++) {
        ck_assert_int_eq(count(i, "SELECT count(*) FROM aamm.replication_status "
                                  "WHERE out_state = 'streaming' AND in_state = 'streaming'"),
                         NNODES - 1);
        ck_assert_int_eq(count(i, "SELECT count(*) FROM pg_replication_slots "
                                  "WHERE slot_name LIKE 'aamm_to_%'"),
                         NNODES - 1);
    }
    for (int i = 0; i < NNODES; i++)
        stop_agent(i);
}
END_TEST

/* aamm_replicator_start() makes the slots before any peer connects: writes made while
 * every peer is still down reach them when they come. */
START_TEST(slots_made_at_start)
{
    long n = aamm_test_scaled(50, 10);
    int64_t end = aamm_test_now_ms() + 60000;
    start_agent(0); /* alone: no link to anyone, so no capture has run */
    ck_assert_msg(pgfx_wait_long(fx, 0, NNODES - 1, (int)(end - aamm_test_now_ms()),
                                 "SELECT count(*) FROM pg_replication_slots "
                                 "WHERE slot_name LIKE 'aamm_to_%%'") == NNODES - 1,
                  "node 1 made no slots without its peers");
    write_ledger(0, 0, n);
    start_agent(1);
    start_agent(2);
    ck_assert(wait_ledger(n, 60));
    assert_no_duplicates();
    for (int i = 0; i < NNODES; i++)
        stop_agent(i);
}
END_TEST

/* kill -9 of the receiving agent, the sending one, and both, again and again while every
 * node writes: afterwards every row is everywhere exactly once. */
START_TEST(kill_agents_under_load)
{
    uint64_t seed = aamm_test_seed("kill_agents_under_load");
    int kills = (int)aamm_test_scaled(9, 3);
    long per = aamm_test_scaled(60, 20), next[NNODES] = {0};
    start_all();
    for (int k = 0; k < kills; k++) {
        int victim = (int)(aamm_test_rand(&seed) % NNODES);
        int second = (k % 3 == 2) ? (victim + 1) % NNODES : -1;
        for (int i = 0; i < NNODES; i++) {
            write_ledger(i, next[i], per / 2);
            next[i] += per / 2;
        }
        check_acks();
        aamm_test_kill(&agents[victim]);
        if (second >= 0)
            aamm_test_kill(&agents[second]);
        for (int i = 0; i < NNODES; i++) {
            write_ledger(i, next[i], per / 2);
            next[i] += per / 2;
        }
        usleep((useconds_t)(50000 + aamm_test_rand(&seed) % 400000));
        start_agent(victim);
        if (second >= 0)
            start_agent(second);
        usleep((useconds_t)(100000 + aamm_test_rand(&seed) % 500000));
    }
    fprintf(stderr, "kill_agents_under_load: %d kills, %ld rows per node\n", kills, next[0]);
    ck_assert(wait_ledger(NNODES * next[0], 90));
    usleep(300000);
    assert_identical();
    assert_no_duplicates();
    for (int i = 0; i < NNODES; i++)
        stop_agent(i);
}
END_TEST

/* The links between nodes 1 and 2 go through two proxies in a forked process; SIGUSR1
 * cuts them (every connection closed at once, new ones refused), SIGUSR2 heals. */
static struct netfx_proxy prox[2];
static pid_t proxy_pid;
static volatile sig_atomic_t proxy_cutting;
static void on_cut(int sig)
{
    proxy_cutting = sig == SIGUSR1;
}

static void proxy_main(int unused)
{
    (void)unused;
    signal(SIGUSR1, on_cut);
    signal(SIGUSR2, on_cut);
    for (;;) {
        struct pollfd fds[6];
        int n = 0;
        for (int k = 0; k < 2; k++)
            n += netfx_proxy_pollfds(&prox[k], fds + n);
        (void)poll(fds, (nfds_t)n, 20);
        for (int k = 0; k < 2; k++) {
            if (proxy_cutting) {
                int fd;
                netfx_proxy_cut(&prox[k]);
                while ((fd = netfx_accept(prox[k].lfd)) >= 0)
                    close(fd);
            } else {
                netfx_proxy_step(&prox[k]);
            }
        }
    }
}

static long rows_from(int i, int origin)
{
    return pgfx_value_long(fx, i, -1, "SELECT count(*) FROM ledger WHERE node = %d", origin + 1);
}

/* The links between two agents are cut for a while (scaled from 30 s) while all three
 * nodes take writes: during the cut nothing of one reaches the other, afterwards every row
 * is everywhere exactly once and the nodes are identical. */
START_TEST(link_cut_between_two)
{
    long per = aamm_test_scaled(40, 10), next[NNODES] = {0};
    int64_t cut_ms = aamm_test_scaled(30000, 6000), end;
    netfx_proxy_init(&prox[0], ports[1]); /* 1 dials 2 through prox[0] */
    netfx_proxy_init(&prox[1], ports[0]); /* 2 dials 1 through prox[1] */
    ck_assert(prox[0].lfd >= 0 && prox[1].lfd >= 0);
    dial_port[0][1] = prox[0].port;
    dial_port[1][0] = prox[1].port;
    proxy_pid = aamm_test_spawn(proxy_main, 0);
    start_all();
    for (int i = 0; i < NNODES; i++) {
        write_ledger(i, 0, per);
        next[i] = per;
    }
    ck_assert(wait_ledger(NNODES * per, 60));
    kill(proxy_pid, SIGUSR1);
    end = aamm_test_now_ms() + cut_ms;
    while (aamm_test_now_ms() < end) {
        for (int i = 0; i < NNODES; i++) {
            write_ledger(i, next[i], 5);
            next[i] += 5;
        }
        usleep(200000);
    }
    /* the cut held: node 2 misses node 1's recent rows and the other way round, while node 3
     * has everything of both */
    ck_assert_int_lt(rows_from(1, 0), next[0]);
    ck_assert_int_lt(rows_from(0, 1), next[1]);
    int64_t t3 = aamm_test_now_ms() + 30000;
    while ((rows_from(2, 0) != next[0] || rows_from(2, 1) != next[1]) && aamm_test_now_ms() < t3)
        usleep(100000);
    ck_assert_int_eq(rows_from(2, 0), next[0]);
    ck_assert_int_eq(rows_from(2, 1), next[1]);
    kill(proxy_pid, SIGUSR2);
    fprintf(stderr, "link_cut_between_two: cut %" PRId64 " ms, %ld rows per node\n", cut_ms,
            next[0]);
    ck_assert(wait_ledger(NNODES * next[0], 90));
    usleep(300000);
    assert_identical();
    assert_no_duplicates();
    for (int i = 0; i < NNODES; i++)
        stop_agent(i);
    aamm_test_kill(&proxy_pid);
}
END_TEST

/* Acks follow what is durable on the peer, not what reached its agent: while a local
 * session on node 2 holds a lock that blocks apply, node 1's transactions sit received but
 * uncommitted in node 2's agent; node 1 must not see them acknowledged (a kill -9 of that
 * agent would lose them after node 1 confirmed its slot past them). Released, they are
 * applied and acknowledged. */
START_TEST(acks_follow_durable)
{
    long n = aamm_test_scaled(40, 20);
    start_all();
    write_ledger(0, 0, 5);
    ck_assert(wait_ledger(5, 60));
    PGconn *blocker = pgfx_connect(fx, 1);
    ck_assert_ptr_nonnull(blocker);
    ck_assert_int_eq(pgfx_exec_conn(blocker, "BEGIN; LOCK TABLE ledger IN EXCLUSIVE MODE"), 0);
    write_ledger(0, 5, n);
    /* node 2's agent has them (its status row says received), node 1 sent them ... */
    int64_t t = aamm_test_now_ms() + 30000;
    while (pgfx_value_long(fx, 1, -1,
                           "SELECT (in_received_lsn > in_applied_lsn)::int FROM "
                           "aamm.replication_status WHERE peer_id = 1") != 1) {
        ck_assert_msg(aamm_test_now_ms() < t, "node 2 never received node 1's transactions");
        usleep(50000);
    }
    usleep(1000000); /* several status rounds on both agents */
    /* ... but node 1 sees no ack for them, and none beyond node 2's durable progress */
    check_ack(0, 1);
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1,
                                     "SELECT (out_acked_lsn < out_sent_lsn)::int FROM "
                                     "aamm.replication_status WHERE peer_id = 2"),
                     1);
    ck_assert_int_eq(pgfx_exec_conn(blocker, "COMMIT"), 0);
    PQfinish(blocker);
    t = aamm_test_now_ms() + 30000;
    long done = 0;
    while (aamm_test_now_ms() < t &&
           (done = pgfx_value_long(fx, 0, -1,
                                   "SELECT (out_acked_lsn >= out_sent_lsn)::int FROM "
                                   "aamm.replication_status WHERE peer_id = 2")) != 1) {
        check_ack(0, 1);
        usleep(100000);
    }
    ck_assert_msg(done == 1, "node 1 never saw node 2 acknowledge everything");
    ck_assert(wait_ledger(5 + n, 30));
    for (int i = 0; i < NNODES; i++)
        stop_agent(i);
}
END_TEST

/* One node's PostgreSQL stops while the others write; restarted, it catches up. */
START_TEST(pg_node_stopped_and_back)
{
    long n = aamm_test_scaled(100, 20);
    start_all();
    write_ledger(0, 0, n);
    ck_assert(wait_ledger(n, 60));
    ck_assert_int_eq(pgfx_stop_node(fx, 1, "fast"), 0);
    write_ledger(0, n, n);
    write_ledger(2, 0, n);
    usleep(2000000);
    ck_assert_int_eq(pgfx_start_node(fx, 1), 0);
    write_ledger(1, 0, n);
    ck_assert(wait_ledger(4 * n, 90));
    usleep(300000);
    assert_identical();
    assert_no_duplicates();
    for (int i = 0; i < NNODES; i++)
        stop_agent(i);
}
END_TEST

/* A node that only applies: its slots for its peers move past the WAL its own apply
 * writes (confirmed without a transaction on the peer), so they retain little WAL. Nodes 1
 * and 2 write for a while (20 s, scaled: make check-long runs it for minutes) while node
 * 3's retained WAL is sampled; afterwards a checkpoint lets the slots' restart_lsn move
 * past everything node 3 wrote, which only happens if their confirmed position did. */
START_TEST(apply_only_node_slots_advance)
{
    int64_t run_ms = aamm_test_scaled(20000, 8000), end, next_sample;
    long next[2] = {0, 0}, max_retained = 0;
    start_all();
    char *lsn0 = pgfx_value(fx, 2, "SELECT pg_current_wal_lsn()");
    end = aamm_test_now_ms() + run_ms;
    next_sample = 0;
    while (aamm_test_now_ms() < end) {
        for (int i = 0; i < 2; i++) {
            write_ledger(i, next[i], 20);
            next[i] += 20;
        }
        if (aamm_test_now_ms() >= next_sample) {
            long r = pgfx_value_long(fx, 2, -1,
                                     "SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), "
                                     "restart_lsn))::bigint FROM pg_replication_slots "
                                     "WHERE slot_name LIKE 'aamm_to_%%'");
            if (r > max_retained)
                max_retained = r;
            next_sample = aamm_test_now_ms() + 1000;
        }
    }
    ck_assert(wait_ledger(next[0] + next[1], 60));
    /* node 3 wrote nothing itself; all its WAL came from applying 1's and 2's rows */
    char *lsn = pgfx_value(fx, 2, "SELECT pg_current_wal_lsn()");
    ck_assert_ptr_nonnull(lsn);
    long total = pgfx_value_long(fx, 2, -1, "SELECT pg_wal_lsn_diff('%s', '%s')::bigint", lsn, lsn0);
    int64_t t = aamm_test_now_ms() + 30000;
    long behind = -1;
    while (aamm_test_now_ms() < t) {
        behind = pgfx_value_long(fx, 2, -1,
                                 "SELECT count(*) FROM pg_replication_slots WHERE slot_name "
                                 "LIKE 'aamm_to_%%' AND (confirmed_flush_lsn IS NULL OR "
                                 "confirmed_flush_lsn < '%s' OR restart_lsn < '%s')",
                                 lsn, lsn);
        if (behind == 0)
            break;
        (void)pgfx_exec(fx, 2, "CHECKPOINT");
        usleep(300000);
    }
    fprintf(stderr,
            "apply_only_node_slots_advance: %" PRId64 " ms, %ld rows applied on node 3, %ld "
            "bytes of WAL written there, at most %ld retained by its slots\n",
            run_ms, next[0] + next[1], total, max_retained);
    ck_assert_msg(behind == 0, "node 3's slots stay behind %s (its own apply's WAL)", lsn);
    free(lsn);
    free(lsn0);
    for (int i = 0; i < NNODES; i++)
        stop_agent(i);
}
END_TEST

/* With consensus: the replicators elect a leader and keep every node's
 * aamm.galloc_nextval('rentals') supplied; ids drawn on all three nodes never collide, and
 * an agent killed and restarted rejoins the same cluster from its data dir. */
/* With consensus, start() refuses a process where SIGPIPE would kill it (exit 0: refused
 * with AAMM_EINVAL; anything else is a failure). */
static void sigpipe_default_main(int i)
{
    struct aamm_replicator_options o;
    struct aamm_replicator_peer peer = {2, NULL, "127.0.0.1", "1", "127.0.0.1:1"};
    struct aamm_replicator *r;
    char err[256], rdir[512];
    signal(SIGPIPE, SIG_DFL);
    aamm_replicator_options_init(&o);
    o.node_id = 1;
    o.conninfo = pgfx_conninfo(fx, i);
    o.cluster = "test";
    o.secret = (const uint8_t *)secret;
    o.secret_len = sizeof secret - 1;
    o.peers = &peer;
    o.npeers = 1;
    snprintf(rdir, sizeof rdir, "%s/raft-sigpipe", pgfx_root(fx));
    o.raft_address = "127.0.0.1:1";
    o.raft_data_dir = rdir;
    if (aamm_replicator_new(&r, &o, err, sizeof err) != 0)
        _exit(2);
    int rc = aamm_replicator_start(r);
    bool ok = rc == AAMM_EINVAL && strstr(aamm_replicator_errmsg(r), "SIGPIPE");
    aamm_replicator_free(r);
    _exit(ok ? 0 : 3);
}

START_TEST(consensus_galloc_supply)
{
    long per = aamm_test_scaled(300, 150);
    int wst = -1;
    pid_t p = aamm_test_spawn(sigpipe_default_main, 0);
    ck_assert_int_eq(waitpid(p, &wst, 0), p);
    ck_assert_msg(WIFEXITED(wst) && WEXITSTATUS(wst) == 0,
                  "start() did not refuse SIGPIPE's default action (status %d)", wst);
    with_consensus = true;
    for (int i = 0; i < NNODES; i++)
        raft_ports[i] = aamm_test_free_port();
    start_all();
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < NNODES; i++) {
            PGconn *c = pgfx_connect(fx, i);
            int64_t end = aamm_test_now_ms() + 120000;
            ck_assert_ptr_nonnull(c);
            for (long k = 0; k < per;) {
                PGresult *res = PQexec(c, "INSERT INTO rentals (id, bike_id, user_id) "
                                          "VALUES (aamm.galloc_nextval('rentals'), NULL, 1)");
                bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
                PQclear(res);
                if (ok) {
                    k++;
                    continue;
                }
                /* no range supplied yet (election, first grant): wait for the replicator */
                ck_assert_msg(aamm_test_now_ms() < end, "node %d: no galloc range: %s", i + 1,
                              PQerrorMessage(c));
                usleep(50000);
            }
            PQfinish(c);
        }
        if (round == 0) { /* kill -9 one agent, restart it: it rejoins from its raft dir */
            aamm_test_kill(&agents[1]);
            start_agent(1);
        }
    }
    int64_t end = aamm_test_now_ms() + 120000;
    while (aamm_test_now_ms() < end &&
           (count(0, "SELECT count(*) FROM rentals") != 2 * NNODES * per ||
            count(1, "SELECT count(*) FROM rentals") != 2 * NNODES * per ||
            count(2, "SELECT count(*) FROM rentals") != 2 * NNODES * per))
        usleep(100000);
    for (int i = 0; i < NNODES; i++) {
        char *st = pgfx_value(fx, i, "SELECT string_agg(format('peer %%s out %%s in %%s pending %%s %%s', "
                                     "peer_id, out_state, in_state, in_pending, reason), '; ') "
                                     "FROM aamm.replication_status");
        ck_assert_msg(count(i, "SELECT count(*) FROM rentals") == 2 * NNODES * per,
                      "node %d: %ld rentals (want %ld); %s", i + 1,
                      count(i, "SELECT count(*) FROM rentals"), 2 * NNODES * per, st ? st : "");
        free(st);
    }
    /* unique across nodes: a collision would have met an existing key */
    for (int i = 0; i < NNODES; i++)
        ck_assert_int_eq(count(i, "SELECT count(*) FROM aamm.conflict_log "
                                  "WHERE relation = 'public.rentals'"),
                         0);
    assert_identical();
    for (int i = 0; i < NNODES; i++)
        stop_agent(i);
}
END_TEST

/* Node 3 is gone for good: the survivors' agents restart without it and aamm_node_part()
 * on each survivor drops its slot, its origin and its status row; the two go on
 * replicating, and no slot is left to hold WAL for the parted node. */
START_TEST(part_a_node)
{
    long n = aamm_test_scaled(50, 10);
    char err[256];
    int dropped = -1;
    start_all();
    for (int i = 0; i < NNODES; i++)
        write_ledger(i, 0, n);
    ck_assert(wait_ledger(NNODES * n, 60));
    aamm_test_kill(&agents[2]);
    ck_assert_int_eq(pgfx_stop_node(fx, 2, "immediate"), 0);
    stop_agent(0);
    stop_agent(1);
    parted[2] = true;
    /* the slot goes at once; the origin once the other slot confirmed past node 3's last
     * transaction applied here (the restarted agents get it there) */
    int total[2] = {0, 0};
    for (int i = 0; i < 2; i++) {
        PGconn *c = pgfx_connect(fx, i);
        int rc = aamm_node_part(c, 3, &dropped, err, sizeof err);
        ck_assert_msg(rc == 0 || rc == AAMM_EAGAIN, "%s", err);
        total[i] += dropped;
        PQfinish(c);
    }
    start_agent(0);
    start_agent(1);
    write_ledger(0, n, 1);
    for (int i = 0; i < 2; i++) {
        PGconn *c = pgfx_connect(fx, i);
        int rc;
        int64_t t = aamm_test_now_ms() + 30000;
        while ((rc = aamm_node_part(c, 3, &dropped, err, sizeof err)) == AAMM_EAGAIN &&
               aamm_test_now_ms() < t) {
            total[i] += dropped;
            usleep(200000);
        }
        ck_assert_msg(rc == 0, "%s", err);
        total[i] += dropped;
        ck_assert_int_eq(total[i], 2); /* the slot and the origin, each once */
        /* idempotent */
        ck_assert_msg(aamm_node_part(c, 3, &dropped, err, sizeof err) == 0, "%s", err);
        ck_assert_int_eq(dropped, 0);
        PQfinish(c);
    }
    write_ledger(0, n + 1, n - 1);
    write_ledger(1, n, n);
    int64_t end = aamm_test_now_ms() + 60000;
    while (aamm_test_now_ms() < end && (count(0, "SELECT count(*) FROM ledger") != 5 * n ||
                                        count(1, "SELECT count(*) FROM ledger") != 5 * n))
        usleep(100000);
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(count(i, "SELECT count(*) FROM ledger"), 5 * n);
        ck_assert_int_eq(count(i, "SELECT count(*) FROM pg_replication_slots"), 1);
        ck_assert_int_eq(count(i, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = "
                                  "'aamm_to_3'"),
                         0);
        ck_assert_int_eq(count(i, "SELECT count(*) FROM pg_replication_origin WHERE roname = "
                                  "'aamm_from_3'"),
                         0);
        ck_assert_int_eq(count(i, "SELECT count(*) FROM aamm.replication_status WHERE peer_id = 3"),
                         0);
    }
    stop_agent(0);
    stop_agent(1);
    ck_assert_int_eq(pgfx_start_node(fx, 2), 0); /* for the fixture's teardown */
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
        agents[i] = 0;
        for (int k = 0; k < NNODES; k++)
            dial_port[i][k] = 0;
        with_consensus = false;
        parted[i] = false;
    }
}

static void teardown(void)
{
    for (int i = 0; i < NNODES; i++)
        aamm_test_kill(&agents[i]);
    aamm_test_kill(&proxy_pid);
    pgfx_destroy(fx);
    fx = NULL;
}

int main(void)
{
    Suite *s = suite_create("replicator");
    const struct {
        const char *name;
        const TTest *t;
        double timeout;
    } cases[] = {
        {"three_nodes_converge", three_nodes_converge, 150},
        {"slots_made_at_start", slots_made_at_start, 150},
        {"kill_agents_under_load", kill_agents_under_load, 240},
        {"pg_node_stopped_and_back", pg_node_stopped_and_back, 180},
        {"link_cut_between_two", link_cut_between_two, 240},
        {"acks_follow_durable", acks_follow_durable, 150},
        {"consensus_galloc_supply", consensus_galloc_supply, 400},
        {"part_a_node", part_a_node, 150},
        {"apply_only_node_slots_advance", apply_only_node_slots_advance, 150},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        TCase *tc = aamm_test_tcase(cases[i].name, cases[i].timeout);
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, cases[i].t);
        suite_add_tcase(s, tc);
    }
    return aamm_test_run(s);
}
