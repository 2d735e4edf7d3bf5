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
static bool joining[NNODES];           /* with consensus: starts unbootstrapped, to be added */
static int raft_ports[NNODES];
static const char secret[] = "0123456789abcdef-replicator-test";

/* huge_txn_while_small_flow's bounds. Peak RSS of an agent: two sender links of at most
 * AAMM_LINK_SEND_MEMORY(8 MiB default send queue) each (~17 MB), a streamed incoming
 * transaction's at most 2 x 50,000 (apply_max_txn_changes default) unanswered changes
 * (~20-30 MB for two bigints a row), and the fixed parts (libpq, raft: ~9 MB, the sending
 * agent's whole peak): 64 MiB; measured 9 / 40-43 / 30-44 MB at a million rows. The
 * library's own heap high water of the same (not libpq's or raft's): 48 MiB, measured
 * 6.5 / 39 / 39 MB. Lag of the small transactions of node 2, whose agent feeds the big one
 * to its apply in the same loop: 10 s, or a third of the big one's time from its commit to
 * node 3 when that is longer (a stream queued behind the big one would lag by all of it);
 * measured 3.4-4.9 s of 33 s on a quiet machine, 9-10 s of 73 s under a load of 11. */
#define HUGE_PEAK_KB (64 * 1024)
#define HUGE_HEAP_BYTES ((size_t)48 << 20)
#define SMALL_LAG_MS 10000

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_SANITIZER 1
#endif
#endif
#ifndef UNDER_SANITIZER
#define UNDER_SANITIZER 0
#endif

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
                                    "bike_id int REFERENCES bikes, user_id int REFERENCES users);"
                                    /* on every node before any slot exists: not replicated */
                                    "INSERT INTO users VALUES (1, 'seed')"),
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

/* The agent's figures for the test, rewritten (atomically) about once a second and at
 * exit into <fixture root>/agent<i>.report: "term <t> leader <id> reconnects <n> heap <b>"
 * (term and leader 0 without consensus; reconnects summed over the peers; heap: the
 * library allocator's high water in bytes). */
static void agent_report(struct aamm_replicator *r, int i)
{
    char path[512], tmp[520];
    uint64_t term = 0, reconnects = 0;
    uint32_t leader = 0;
    struct aamm_memory_stats ms;
    struct aamm_consensus *cs = aamm_replicator_consensus(r);
    if (cs) {
        term = aamm_consensus_term(cs);
        (void)aamm_consensus_leader(cs, &leader, NULL, 0);
    }
    for (uint32_t k = 0; k < aamm_replicator_npeers(r); k++) {
        struct aamm_replicator_peer_status st;
        if (aamm_replicator_peer_status(r, k, &st) == 0)
            reconnects += st.reconnects;
    }
    snprintf(path, sizeof path, "%s/agent%d.report", pgfx_root(fx), i + 1);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return;
    aamm_memory_stats(&ms);
    fprintf(f, "term %" PRIu64 " leader %" PRIu32 " reconnects %" PRIu64 " heap %zu\n", term,
            leader, reconnects, ms.high_water);
    if (fclose(f) == 0)
        (void)rename(tmp, path);
}

/* Stream state changes go to <fixture root>/agent<i>.log (appended; read on failures). */
static void agent_on_stream(struct aamm_replicator *r, uint32_t peer, const char *what, bool ok,
                            const char *reason, void *arg)
{
    char path[512];
    (void)r;
    snprintf(path, sizeof path, "%s/agent%d.log", pgfx_root(fx), (int)(intptr_t)arg + 1);
    FILE *f = fopen(path, "a");
    if (!f)
        return;
    fprintf(f, "%" PRId64 " peer %" PRIu32 " %s %s %s\n", aamm_test_now_ms(), peer, what,
            ok ? "up" : "down", reason);
    fclose(f);
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
            if (k != i && !parted[k])
                peers[m++].raft_address = raft[k];
        snprintf(rdir, sizeof rdir, "%s/raft%d", pgfx_root(fx), i + 1);
        o.raft_address = raft[i];
        o.raft_data_dir = rdir;
        o.bootstrap_consensus = !joining[i];
        o.sequences = seqs;
        o.nsequences = 1;
        o.sequence_range_size = 100;
    }
    if (aamm_replicator_new(&r, &o, err, sizeof err) != 0) {
        fprintf(stderr, "agent %d: %s\n", i + 1, err);
        _exit(2);
    }
    aamm_replicator_set_stream_cb(r, agent_on_stream, (void *)(intptr_t)i);
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
        agent_report(r, i);
    }
    agent_report(r, i);
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

/* Rentals on node @i whose bike or user is missing (the guide's integrity query). */
static long orphans(int i)
{
    return count(i, "SELECT count(*) FROM rentals r LEFT JOIN bikes b ON b.id = r.bike_id "
                    "LEFT JOIN users u ON u.id = r.user_id WHERE (r.bike_id IS NOT NULL AND "
                    "b.id IS NULL) OR (r.user_id IS NOT NULL AND u.id IS NULL)");
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
     * that no rental points at a bike or a user that is missing on any node */
    for (int i = 0; i < NNODES; i++)
        ck_assert_int_eq(orphans(i), 0);
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

/* After the seed's conflict (users 2574: An on node 1, Wim on node 2 a moment later):
 * each node's aamm.replication_status counts, per incoming stream, the conflicts that
 * stream met, as its conflict log records them. Node 1 met Wim's insert from node 2, node 2
 * An's from node 1, node 3 whichever of the two arrived second: one insert_exists per node,
 * on the stream its log names, and no other kind anywhere (the ledger never conflicts). */
static void assert_conflict_counters(void)
{
    for (int i = 0; i < NNODES; i++) {
        /* the view is written every status interval (200 ms here): wait until it has it */
        int64_t end = aamm_test_now_ms() + 10000;
        long total = -1;
        while (total != 1 && aamm_test_now_ms() < end) {
            total = count(i, "SELECT coalesce(sum((conflicts->>'insert_exists')::bigint), 0) "
                             "FROM aamm.replication_status");
            if (total != 1)
                usleep(100000);
        }
        ck_assert_msg(total == 1, "node %d: replication_status counts %ld insert_exists, not 1",
                      i + 1, total);
        /* on the stream from the node whose insert lost or won here */
        ck_assert_int_eq(count(i, "SELECT count(*) FROM aamm.replication_status s "
                                  "JOIN aamm.conflict_log l ON l.kind = 'insert_exists' "
                                  "AND l.relation = 'public.users' "
                                  "AND l.remote_node = s.peer_id "
                                  "WHERE (s.conflicts->>'insert_exists')::bigint = 1"),
                         1);
        ck_assert_int_eq(count(i, "SELECT count(*) FROM aamm.replication_status s, "
                                  "jsonb_each_text(s.conflicts) k "
                                  "WHERE k.key <> 'insert_exists' AND k.value::bigint <> 0"),
                         0);
    }
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
    assert_conflict_counters();
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

/* Node @i's share of a round of the foreign-key workload, which follows the guide's rule
 * (no referenced row is ever deleted): a new user, then @n transactions that each rent a
 * bike made on another node (so its parent row came on another stream than the one that
 * carries the rental to the third node) to a user made on another node, marking the bike
 * rented, and retire (soft-delete) another such bike, racing the other nodes' updates of
 * the same bikes (row-level LWW). Rental ids (i+1)*10^6 + 500000 + k never meet
 * write_ledger's. */
static void write_fk_mix(int i, long round, long n, long *next_rental)
{
    PGconn *c = pgfx_connect(fx, i);
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(pgfx_exec_conn(c, "INSERT INTO users VALUES (%ld, 'u%d.%ld')",
                                    (i + 1) * 1000000L + round, i + 1, round),
                     0);
    for (long k = 0; k < n; k++, (*next_rental)++) {
        long id = (i + 1) * 1000000L + 500000 + *next_rental;
        ck_assert_int_eq(
            pgfx_exec_conn(c,
                           "BEGIN;"
                           "INSERT INTO rentals SELECT %ld, "
                           " (SELECT id FROM bikes WHERE id / 1000000 <> %d ORDER BY random() LIMIT 1),"
                           " (SELECT id FROM users WHERE id / 1000000 <> %d ORDER BY random() LIMIT 1);"
                           "UPDATE bikes SET status = 'rented' WHERE id = "
                           " (SELECT bike_id FROM rentals WHERE id = %ld);"
                           "UPDATE bikes SET status = 'retired' WHERE id = "
                           " (SELECT id FROM bikes WHERE id / 1000000 <> %d ORDER BY random() LIMIT 1);"
                           "COMMIT",
                           id, i + 1, i + 1, id, i + 1),
            0);
    }
    PQfinish(c);
}

/* kill -9 of the receiving agent, the sending one, and both, again and again while every
 * node writes: afterwards every row is everywhere exactly once, and (the workload deleting
 * no referenced row) no rental lacks its bike or its user, though many refer to rows made
 * on another node and arriving on another stream. */
START_TEST(kill_agents_under_load)
{
    uint64_t seed = aamm_test_seed("kill_agents_under_load");
    int kills = (int)aamm_test_scaled(9, 3);
    long per = aamm_test_scaled(60, 20), next[NNODES] = {0}, rentals[NNODES] = {0};
    start_all();
    for (int i = 0; i < NNODES; i++) { /* a bike of every node on every node */
        write_ledger(i, 0, 10);
        next[i] = 10;
    }
    ck_assert(wait_ledger(NNODES * 10, 60));
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
        for (int i = 0; i < NNODES; i++)
            write_fk_mix(i, k, 3, &rentals[i]);
        usleep((useconds_t)(50000 + aamm_test_rand(&seed) % 400000));
        start_agent(victim);
        if (second >= 0)
            start_agent(second);
        usleep((useconds_t)(100000 + aamm_test_rand(&seed) % 500000));
    }
    fprintf(stderr, "kill_agents_under_load: %d kills, %ld rows per node, %ld cross-node "
                    "rentals per node\n", kills, next[0], rentals[0]);
    ck_assert(wait_ledger(NNODES * next[0], 90));
    /* every cross-node rental everywhere (the last round's came after its ledger rows) */
    for (int i = 0; i < NNODES; i++)
        ck_assert_int_eq(pgfx_wait_long(fx, i, NNODES * rentals[0], 60000,
                                        "SELECT count(*) FROM rentals WHERE id %% 1000000 >= "
                                        "500000 AND bike_id / 1000000 <> id / 1000000 AND "
                                        "user_id IS NOT NULL"),
                         NNODES * rentals[0]);
    usleep(300000);
    assert_identical();
    assert_no_duplicates();
    for (int i = 0; i < NNODES; i++)
        stop_agent(i);
}
END_TEST

/* The links between nodes 1 and 2 go through two proxies in a forked process; SIGURG
 * freezes them (nothing relayed: what the agents send stays in the proxy's socket buffers),
 * SIGUSR1 cuts them (every connection closed at once, what was frozen in flight lost, new
 * connections refused), SIGUSR2 heals. */
static struct netfx_proxy prox[2];
static pid_t proxy_pid;
static volatile sig_atomic_t proxy_cutting, proxy_frozen;
static void on_cut(int sig)
{
    proxy_frozen = sig == SIGURG;
    proxy_cutting = sig == SIGUSR1;
}

static void proxy_main(int unused)
{
    (void)unused;
    signal(SIGUSR1, on_cut);
    signal(SIGUSR2, on_cut);
    signal(SIGURG, on_cut);
    for (;;) {
        struct pollfd fds[6];
        int n = 0;
        if (proxy_frozen) {
            usleep(20000);
            continue;
        }
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
    /* in flight when the cut comes: nodes 1 and 2 write while the proxies relay nothing, so
     * their agents send these into the frozen connections, where the cut drops them; the
     * senders must send them again from the position the peer resumes from */
    kill(proxy_pid, SIGURG);
    usleep(100000);
    for (int i = 0; i < 2; i++) {
        write_ledger(i, next[i], 5);
        next[i] += 5;
    }
    usleep(800000);
    long frozen0 = rows_from(1, 0), frozen1 = rows_from(0, 1);
    kill(proxy_pid, SIGUSR1);
    ck_assert_int_lt(frozen0, next[0]); /* they were in flight, not delivered */
    ck_assert_int_lt(frozen1, next[1]);
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
    fprintf(stderr, "link_cut_between_two: cut %" PRId64 " ms, %ld/%ld/%ld rows; node 2 missed "
                    "%ld of node 1's at the cut, node 1 %ld of node 2's\n",
            cut_ms, next[0], next[1], next[2], per + 5 - frozen0, per + 5 - frozen1);
    ck_assert(wait_ledger(next[0] + next[1] + next[2], 90));
    usleep(300000);
    assert_identical();
    assert_no_duplicates();
    for (int i = 0; i < NNODES; i++)
        stop_agent(i);
    aamm_test_kill(&proxy_pid);
}
END_TEST

/* The hazard the guide's foreign-key rule exists for (doc/guide.md, section 7): node 1
 * deletes a bike while node 2, which has not seen the delete yet, rents it. Each node's own
 * check passed; apply checks no foreign keys, so every node converges to the same rental
 * without its bike. (The other fault tests follow the rule and find no orphan.) */
START_TEST(fk_delete_race_leaves_orphan)
{
    start_all();
    ck_assert_int_eq(pgfx_exec(fx, 0, "INSERT INTO bikes VALUES (17, 'ok')"), 0);
    int64_t end = aamm_test_now_ms() + 60000;
    for (int i = 1; i < NNODES; i++)
        ck_assert_int_eq(pgfx_wait_long(fx, i, 1, (int)(end - aamm_test_now_ms()),
                                        "SELECT count(*) FROM bikes WHERE id = 17"),
                         1);
    PGconn *del = pgfx_connect(fx, 0), *rent = pgfx_connect(fx, 1);
    ck_assert(del && rent);
    ck_assert_int_eq(pgfx_exec_conn(del, "BEGIN; DELETE FROM bikes WHERE id = 17"), 0);
    ck_assert_int_eq(pgfx_exec_conn(rent, "BEGIN; INSERT INTO rentals VALUES (42, 17, 1)"), 0);
    ck_assert_int_eq(pgfx_exec_conn(del, "COMMIT"), 0);
    ck_assert_int_eq(pgfx_exec_conn(rent, "COMMIT"), 0);
    PQfinish(del);
    PQfinish(rent);
    for (int i = 0; i < NNODES; i++) {
        ck_assert_int_eq(pgfx_wait_long(fx, i, 1, (int)(end - aamm_test_now_ms()),
                                        "SELECT count(*) FROM rentals WHERE id = 42"),
                         1);
        ck_assert_int_eq(pgfx_wait_long(fx, i, 0, (int)(end - aamm_test_now_ms()),
                                        "SELECT count(*) FROM bikes WHERE id = 17"),
                         0);
        ck_assert_int_eq(orphans(i), 1);
    }
    for (int i = 0; i < NNODES; i++)
        stop_agent(i);
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

/* One node's PostgreSQL stops for a while (scaled from 30 s) while the others keep
 * writing; halfway its agent is killed -9 (what it received and could not apply is gone
 * with it: it must not have been acknowledged) and can only come back with its server.
 * Restarted, node 2 catches up, writes itself, and every node converges with every row
 * once. */
START_TEST(pg_node_stopped_and_back)
{
    long n = aamm_test_scaled(100, 20), next[NNODES] = {0};
    int64_t down_ms = aamm_test_scaled(30000, 8000), t_down, end;
    start_all();
    write_ledger(0, 0, n);
    next[0] = n;
    ck_assert(wait_ledger(n, 60));
    ck_assert_int_eq(pgfx_stop_node(fx, 1, "fast"), 0);
    t_down = aamm_test_now_ms();
    end = t_down + down_ms;
    bool killed = false;
    while (aamm_test_now_ms() < end) {
        for (int i = 0; i < NNODES; i += 2) {
            write_ledger(i, next[i], 10);
            next[i] += 10;
        }
        if (!killed && aamm_test_now_ms() >= t_down + down_ms / 2) {
            aamm_test_kill(&agents[1]);
            killed = true;
        }
        usleep(200000);
    }
    check_ack(0, 2);
    check_ack(2, 0);
    ck_assert_int_eq(pgfx_start_node(fx, 1), 0);
    start_agent(1);
    write_ledger(1, 0, n);
    next[1] = n;
    fprintf(stderr, "pg_node_stopped_and_back: node 2 down %" PRId64 " ms (agent killed halfway), "
                    "%ld/%ld/%ld rows\n", aamm_test_now_ms() - t_down, next[0], next[1], next[2]);
    ck_assert(wait_ledger(next[0] + next[1] + next[2], 90));
    usleep(300000);
    check_acks();
    assert_identical();
    assert_no_duplicates();
    for (int i = 0; i < NNODES; i++)
        stop_agent(i);
}
END_TEST

/* How long apply_only_node_slots_advance writes: the five minutes, scaled (the
 * sanitizer pass's 0.25: 75 s), never under a minute. */
static int64_t apply_only_run_ms(void)
{
    return aamm_test_scaled(300000, 60000);
}

/* A node that only applies: its slots for its peers move past the WAL its own apply
 * writes (confirmed without a transaction on the peer), so they retain little WAL. Nodes 1
 * and 2 write for five minutes (scaled) while node 3's retained WAL (its current position
 * minus each slot's restart_lsn) is sampled every 3 s: it stays under a bound and does not
 * grow (the last third's mean is within twice the first third's plus 4 MB; a slot that
 * never moves retains all of node 3's WAL, which grows linearly: its last third's mean
 * is five times the first's). Afterwards a checkpoint lets the slots' restart_lsn move
 * past everything node 3 wrote, which only happens if their confirmed position did. */
START_TEST(apply_only_node_slots_advance)
{
    enum { MAX_SAMPLES = 4096 };
    const long bound = 32L * 1024 * 1024;
    int64_t run_ms = apply_only_run_ms(), end, next_sample;
    long next[2] = {0, 0}, max_retained = 0, *samples = calloc(MAX_SAMPLES, sizeof(long));
    int nsamples = 0;
    ck_assert_ptr_nonnull(samples);
    start_all();
    char *lsn0 = pgfx_value(fx, 2, "SELECT pg_current_wal_lsn()");
    end = aamm_test_now_ms() + run_ms;
    next_sample = 0;
    while (aamm_test_now_ms() < end) {
        for (int i = 0; i < 2; i++) {
            write_ledger(i, next[i], 20);
            next[i] += 20;
        }
        if (aamm_test_now_ms() >= next_sample && nsamples < MAX_SAMPLES) {
            long r = pgfx_value_long(fx, 2, -1,
                                     "SELECT max(pg_wal_lsn_diff(pg_current_wal_lsn(), "
                                     "restart_lsn))::bigint FROM pg_replication_slots "
                                     "WHERE slot_name LIKE 'aamm_to_%%'");
            ck_assert_int_ge(r, 0);
            samples[nsamples++] = r;
            if (r > max_retained)
                max_retained = r;
            next_sample = aamm_test_now_ms() + 3000;
        }
    }
    double first = 0, last = 0;
    int third = nsamples / 3;
    ck_assert_int_ge(third, 5);
    for (int k = 0; k < third; k++) {
        first += (double)samples[k] / third;
        last += (double)samples[nsamples - third + k] / third;
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
            "bytes of WAL written there; retained by its slots in %d samples: at most %ld, "
            "mean %.0f in the first third, %.0f in the last\n",
            run_ms, next[0] + next[1], total, nsamples, max_retained, first, last);
    free(samples);
    ck_assert_msg(max_retained < bound, "node 3's slots retained %ld bytes", max_retained);
    ck_assert_msg(last < 2 * first + 4.0 * 1024 * 1024,
                  "node 3's retained WAL grows: mean %.0f in the first third, %.0f in the last",
                  first, last);
    ck_assert_msg(behind == 0, "node 3's slots stay behind %s (its own apply's WAL)", lsn);
    free(lsn);
    free(lsn0);
    for (int i = 0; i < NNODES; i++)
        stop_agent(i);
}
END_TEST

/* ---- a huge transaction while small ones flow ---------------------------------------- */

struct agent_figures {
    uint64_t term, reconnects;
    uint32_t leader;
    size_t heap;
};

/* Read agent @i's last report (agent_report()); false when there is none. */
static bool read_report(int i, struct agent_figures *af)
{
    char path[512];
    snprintf(path, sizeof path, "%s/agent%d.report", pgfx_root(fx), i + 1);
    FILE *f = fopen(path, "r");
    if (!f)
        return false;
    bool ok = fscanf(f, "term %" SCNu64 " leader %" SCNu32 " reconnects %" SCNu64 " heap %zu",
                     &af->term, &af->leader, &af->reconnects, &af->heap) == 4;
    fclose(f);
    return ok;
}

/* Copy agent @i's stream log (agent_on_stream()) to stderr. */
static void dump_agent_log(int i)
{
    char path[512], line[512];
    snprintf(path, sizeof path, "%s/agent%d.log", pgfx_root(fx), i + 1);
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    while (fgets(line, sizeof line, f))
        fprintf(stderr, "agent %d: %s", i + 1, line);
    fclose(f);
}

/* Make table @name (columns @cols, borrowed) on every node and replicate it; before
 * start_all(), so the agents' captures stream it from the start. */
static void replicate_new_table(const char *name, const char *cols)
{
    char err[512];
    for (int i = 0; i < NNODES; i++) {
        PGconn *c = pgfx_connect(fx, i);
        ck_assert_ptr_nonnull(c);
        ck_assert_int_eq(pgfx_exec_conn(c, "CREATE TABLE %s (%s)", name, cols), 0);
        ck_assert_msg(aamm_node_replicate_table(c, "public", name, "aamm_apply", "aamm", err,
                                                sizeof err) == 0,
                      "%s", err);
        PQfinish(c);
    }
}

/* How long node 2's oldest ledger row not yet on node @i has been waiting (0: none
 * missing); rows of one origin arrive in commit order, so the first missing one is the
 * one after the highest present, which goes to *@have. */
static int64_t lag_from_2(int i, const int64_t *wtime, long written, long *have)
{
    *have = pgfx_value_long(fx, i, -2, "SELECT coalesce(max(seq), -1) FROM ledger WHERE node = 2");
    ck_assert_int_ge(*have, -1);
    if (*have + 1 >= written)
        return 0;
    return aamm_test_now_ms() - wtime[*have + 1];
}

/* Node 1 commits one INSERT of a million rows (scaled, never fewer than 200,000) while
 * every node keeps committing one-row ledger transactions. The big one arrives on nodes 2
 * and 3 exactly once (count and sum); node 2's small transactions keep reaching nodes 1 and
 * 3 while the big one is captured, sent and applied (separate streams: the lag stays
 * bounded, and rows node 2 wrote after node 1's commit are on node 3 before the big one
 * is); no link is made again (the agents' reconnect counters do not move); no leader
 * election (the consensus term does not move); each agent's peak RSS stays under a bound
 * that follows from the configured send queue and apply's streaming threshold. */
START_TEST(huge_txn_while_small_flow)
{
    long rows = aamm_test_scaled(1000000, 200000);
    const long max_small = 100000;
    int64_t *wtime = calloc((size_t)max_small, sizeof *wtime); /* node 2's writes, by seq */
    long next[NNODES] = {0};
    struct agent_figures before[NNODES], after[NNODES];
    ck_assert_ptr_nonnull(wtime);
    with_consensus = true;
    for (int i = 0; i < NNODES; i++)
        raft_ports[i] = aamm_test_free_port();
    replicate_new_table("bulk", "id bigint PRIMARY KEY, v bigint NOT NULL");
    start_all();
    /* settled: both streams of every peer streaming on every node, a leader known to all */
    int64_t t = aamm_test_now_ms() + 120000;
    for (;;) {
        bool ok = true;
        for (int i = 0; i < NNODES; i++)
            if (count(i, "SELECT count(*) FROM aamm.replication_status WHERE out_state = "
                         "'streaming' AND in_state = 'streaming'") != NNODES - 1 ||
                !read_report(i, &before[i]) || before[i].leader == 0)
                ok = false;
        if (ok)
            break;
        ck_assert_msg(aamm_test_now_ms() < t, "streams or leader not settled");
        usleep(200000);
    }
    for (int i = 0; i < NNODES; i++) {
        write_ledger(i, 0, 10);
        next[i] = 10;
    }
    ck_assert(wait_ledger(NNODES * 10, 60));
    usleep(1500000); /* the agents' reports are at most a second old */
    for (int i = 0; i < NNODES; i++)
        ck_assert(read_report(i, &before[i]));

    PGconn *c[NNODES], *big = pgfx_connect(fx, 0);
    ck_assert_ptr_nonnull(big);
    for (int i = 0; i < NNODES; i++)
        ck_assert_ptr_nonnull(c[i] = pgfx_connect(fx, i));
    int64_t t0 = aamm_test_now_ms(), t_commit = 0, t_on[NNODES] = {0, 0, 0}, next_poll = 0;
    int64_t max_lag[NNODES] = {0, 0, 0}, max_lag_at[NNODES] = {0, 0, 0}, deadline = t0 + 300000;
    long not_streaming = 0; /* status rows seen not streaming, summed over the polls */
    long have_before_big = -1; /* node 2's rows on node 3 while the big one was not */
    char sql[256];
    snprintf(sql, sizeof sql,
             "INSERT INTO bulk SELECT g, g %% 1000 FROM generate_series(1, %ld) g", rows);
    ck_assert_int_eq(PQsendQuery(big, sql), 1);
    while (t_on[1] == 0 || t_on[2] == 0) {
        int64_t now = aamm_test_now_ms();
        ck_assert_msg(now < deadline, "the big transaction did not arrive: node 2 %s, node 3 %s",
                      t_on[1] ? "yes" : "no", t_on[2] ? "yes" : "no");
        if (!t_commit) {
            ck_assert_int_eq(PQconsumeInput(big), 1);
            if (!PQisBusy(big)) {
                PGresult *res = PQgetResult(big);
                ck_assert_msg(PQresultStatus(res) == PGRES_COMMAND_OK, "%s",
                              PQresultErrorMessage(res));
                PQclear(res);
                ck_assert_ptr_null(PQgetResult(big));
                t_commit = aamm_test_now_ms();
            }
        }
        for (int i = 0; i < NNODES; i++) {
            ck_assert_int_lt(next[i], max_small);
            ck_assert_int_eq(
                pgfx_exec_conn(c[i], "INSERT INTO ledger VALUES (%d, %ld, 'small')", i + 1, next[i]),
                0);
            if (i == 1) /* committed */
                wtime[next[i]] = aamm_test_now_ms();
            next[i]++;
        }
        if (now >= next_poll) {
            long have[NNODES];
            for (int i = 0; i < NNODES; i += 2) {
                int64_t lag = lag_from_2(i, wtime, next[1], &have[i]);
                if (lag > max_lag[i]) {
                    max_lag[i] = lag;
                    max_lag_at[i] = aamm_test_now_ms() - t0;
                }
            }
            for (int i = 1; i < NNODES; i++)
                if (t_commit && !t_on[i] && count(i, "SELECT count(*) FROM bulk WHERE id = 1") == 1)
                    t_on[i] = aamm_test_now_ms();
            /* read before a look that did not find the big one: on 3 before it */
            if (!t_on[2])
                have_before_big = have[2];
            for (int i = 0; i < NNODES; i++)
                not_streaming += count(i, "SELECT count(*) FROM aamm.replication_status WHERE "
                                          "out_state <> 'streaming' OR in_state <> 'streaming'");
            next_poll = aamm_test_now_ms() + 250;
        }
        usleep(20000);
    }
    /* node 2's rows written after node 1's commit that were on node 3 before the big one */
    long after_commit_on_3 = 0;
    for (long s = 0; s <= have_before_big; s++)
        if (wtime[s] > t_commit)
            after_commit_on_3++;
    /* exactly once: every row, each once (the primary key), the same sum */
    long sum = 0;
    for (long g = 1; g <= rows; g++)
        sum += g % 1000;
    for (int i = 0; i < NNODES; i++) {
        ck_assert_int_eq(count(i, "SELECT count(*) FROM bulk"), rows);
        ck_assert_int_eq(count(i, "SELECT sum(v) FROM bulk"), sum);
    }
    ck_assert(wait_ledger(next[0] + next[1] + next[2], 60));
    usleep(1500000);
    long peak_kb[NNODES];
    for (int i = 0; i < NNODES; i++) {
        peak_kb[i] = aamm_test_peak_rss_kb(agents[i]);
        ck_assert_int_gt(peak_kb[i], 0);
    }
    for (int i = 0; i < NNODES; i++) /* before any agent stops: goodbyes are reconnects */
        ck_assert(read_report(i, &after[i]));
    for (int i = 0; i < NNODES; i++) {
        stop_agent(i);
        PQfinish(c[i]);
    }
    PQfinish(big);
    free(wtime);
    fprintf(stderr,
            "huge_txn_while_small_flow: %ld rows committed on node 1 in %.1f s, on node 2 after "
            "%.1f s, on node 3 after %.1f s; %ld+%ld+%ld small transactions meanwhile; node 2's "
            "small ones lagged at most %" PRId64 " ms to node 1 (at %.1f s) and %" PRId64
            " ms to node 3 (at %.1f s; %ld written after the commit were there before it); peak RSS "
            "%.1f / %.1f / %.1f MB, library heap high water %.1f / %.1f / %.1f MB; reconnects %" PRIu64 "->%" PRIu64 ", %" PRIu64 "->%" PRIu64
            ", %" PRIu64 "->%" PRIu64 "; term %" PRIu64 "->%" PRIu64 "; status rows not "
            "streaming %ld\n",
            rows, (t_commit - t0) / 1000.0, (t_on[1] - t0) / 1000.0, (t_on[2] - t0) / 1000.0,
            next[0], next[1], next[2], max_lag[0], max_lag_at[0] / 1000.0, max_lag[2],
            max_lag_at[2] / 1000.0, after_commit_on_3,
            peak_kb[0] / 1024.0, peak_kb[1] / 1024.0, peak_kb[2] / 1024.0,
            after[0].heap / 1048576.0, after[1].heap / 1048576.0, after[2].heap / 1048576.0,
            before[0].reconnects,
            after[0].reconnects, before[1].reconnects, after[1].reconnects, before[2].reconnects,
            after[2].reconnects, before[0].term, after[0].term, not_streaming);
    for (int i = 0; i < NNODES; i++)
        if (after[i].reconnects != before[i].reconnects)
            dump_agent_log(i);
    for (int i = 0; i < NNODES; i++) {
        ck_assert_msg(after[i].reconnects == before[i].reconnects,
                      "agent %d made links again: %" PRIu64 " -> %" PRIu64, i + 1,
                      before[i].reconnects, after[i].reconnects);
        ck_assert_msg(after[i].term == before[i].term && after[i].leader == before[i].leader,
                      "agent %d saw an election: term %" PRIu64 " -> %" PRIu64, i + 1,
                      before[i].term, after[i].term);
        ck_assert_msg(after[i].heap < HUGE_HEAP_BYTES, "agent %d's library heap peaked at %zu B",
                      i + 1, after[i].heap);
        /* a sanitizer's shadow memory and quarantine make RSS say nothing of the agent */
        ck_assert_msg(UNDER_SANITIZER || peak_kb[i] < HUGE_PEAK_KB, "agent %d peaked at %ld KiB",
                      i + 1, peak_kb[i]);
    }
    ck_assert_int_eq(not_streaming, 0);
    /* not queued behind the big one: bounded, and well under the big one's time from its
     * commit on node 1 to its arrival on node 3 (the machine's load stretches both) */
    int64_t lag_bound = (t_on[2] - t_commit) / 3;
    if (lag_bound < SMALL_LAG_MS)
        lag_bound = SMALL_LAG_MS;
    ck_assert_int_lt(max_lag[0], lag_bound);
    ck_assert_int_lt(max_lag[2], lag_bound);
    /* the big one took a while to reach node 3: small ones passed it meanwhile */
    if (t_on[2] - t_commit > 2000)
        ck_assert_int_gt(after_commit_on_3, 0);
    assert_identical();
    assert_no_duplicates();
}
END_TEST

/* With consensus: the replicators elect a leader and keep every node's
 * aamm.galloc_nextval('rentals') supplied; ids drawn on all three nodes never collide, and
 * an agent killed and restarted rejoins the same cluster from its data dir. */
/* Wait (bounded) until every node holds @want rentals, then require them there, with
 * distinct ids and no conflict on rentals (a galloc collision would have met an existing
 * key), and every table identical. */
static void rentals_everywhere(long want)
{
    int64_t end = aamm_test_now_ms() + 120000;
    bool all;
    do {
        all = true;
        for (int i = 0; i < NNODES; i++)
            all = all && count(i, "SELECT count(*) FROM rentals") == want;
    } while (!all && aamm_test_now_ms() < end && usleep(100000) == 0);
    for (int i = 0; i < NNODES; i++) {
        char *st = pgfx_value(fx, i, "SELECT string_agg(format('peer %%s out %%s in %%s pending %%s %%s', "
                                     "peer_id, out_state, in_state, in_pending, reason), '; ') "
                                     "FROM aamm.replication_status");
        ck_assert_msg(count(i, "SELECT count(*) FROM rentals") == want,
                      "node %d: %ld rentals (want %ld); %s", i + 1,
                      count(i, "SELECT count(*) FROM rentals"), want, st ? st : "");
        free(st);
        ck_assert_int_eq(count(i, "SELECT count(DISTINCT id) FROM rentals"), want);
        ck_assert_int_eq(count(i, "SELECT count(*) FROM aamm.conflict_log "
                                  "WHERE relation = 'public.rentals'"),
                         0);
    }
    assert_identical();
}

/* Insert @n rentals with ids from galloc on node @i (or, !@insert, only take @n values),
 * waiting (bounded) for the replicator to supply a range: only a consensus member gets one. */
static void galloc_take(int i, long n, int limit_s, bool insert)
{
    PGconn *c = pgfx_connect(fx, i);
    int64_t end = aamm_test_now_ms() + limit_s * 1000;
    ck_assert_ptr_nonnull(c);
    for (long k = 0; k < n;) {
        PGresult *res = PQexec(c, insert ? "INSERT INTO rentals (id, bike_id, user_id) "
                                           "VALUES (aamm.galloc_nextval('rentals'), NULL, 1)"
                                         : "SELECT aamm.galloc_nextval('rentals')");
        bool ok = PQresultStatus(res) == (insert ? PGRES_COMMAND_OK : PGRES_TUPLES_OK);
        PQclear(res);
        if (ok) {
            k++;
            continue;
        }
        ck_assert_msg(aamm_test_now_ms() < end, "node %d: no galloc range after %d s: %s", i + 1,
                      limit_s, PQerrorMessage(c));
        usleep(50000);
    }
    PQfinish(c);
}

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
        for (int i = 0; i < NNODES; i++)
            galloc_take(i, per, 120, true); /* waits through an election, the first grant */
        if (round == 0) { /* kill -9 one agent, restart it: it rejoins from its raft dir */
            aamm_test_kill(&agents[1]);
            start_agent(1);
        }
    }
    rentals_everywhere(2 * NNODES * per);
    for (int i = 0; i < NNODES; i++)
        stop_agent(i);
}
END_TEST

/* A node joins the consensus: nodes 1 and 2 bootstrap it without node 3 (and take galloc
 * values); node 3's agent starts on an empty raft dir without bootstrap, and once nodes 1
 * and 2 restart with it as a peer (raft address included), their leader adds it
 * (membership follows the configuration): node 3 gets galloc ranges, ids stay unique, all
 * three converge. */
START_TEST(consensus_member_joins)
{
    long per = aamm_test_scaled(100, 50);
    with_consensus = true;
    for (int i = 0; i < NNODES; i++)
        raft_ports[i] = aamm_test_free_port();
    parted[2] = true;
    start_agent(0);
    start_agent(1);
    /* (no rows yet: what is written before node 3 has its slots would need a join copy) */
    galloc_take(0, per, 60, false);
    galloc_take(1, per, 60, false);
    parted[2] = false;
    joining[2] = true;
    start_agent(2);
    for (int i = 0; i < 2; i++) {
        stop_agent(i);
        start_agent(i);
    }
    int64_t t0 = aamm_test_now_ms();
    galloc_take(2, 1, 60, true);
    printf("consensus_member_joins: node 3 had its first galloc value %.1f s after the "
           "restarts\n", (double)(aamm_test_now_ms() - t0) / 1000);
    galloc_take(2, per - 1, 60, true);
    for (int i = 0; i < NNODES; i++)
        galloc_take(i, per, 60, true);
    rentals_everywhere(4 * per);
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
    int total[2] = {0, 0}, rc;
    start_all();
    for (int i = 0; i < NNODES; i++)
        write_ledger(i, 0, n);
    ck_assert(wait_ledger(NNODES * n, 60));
    /* node 3 writes while node 2's agent is down: node 1 applies it, and its slot for node 2
     * cannot pass it. Parting node 3 on node 1 now must keep the origin aamm_from_3 (the
     * slot goes at once): decoded without it, those transactions would look like node 1's
     * own and be sent on */
    stop_agent(1);
    write_ledger(2, n, n);
    int64_t t1 = aamm_test_now_ms() + 60000;
    while (aamm_test_now_ms() < t1 && count(0, "SELECT count(*) FROM ledger") != 4 * n)
        usleep(100000);
    ck_assert_int_eq(count(0, "SELECT count(*) FROM ledger"), 4 * n);
    stop_agent(0);
    {
        PGconn *c = pgfx_connect(fx, 0);
        rc = aamm_node_part(c, 3, &dropped, err, sizeof err);
        ck_assert_msg(rc == AAMM_EAGAIN && dropped == 1,
                      "node 1 parted node 3 while its slot for node 2 was behind node 3's "
                      "transactions: rc %d, dropped %d (want AAMM_EAGAIN, 1): %s",
                      rc, dropped, err);
        total[0] += dropped;
        PQfinish(c);
    }
    /* node 2 gets node 3's rows from node 3, then node 3 is gone for good */
    start_agent(1);
    t1 = aamm_test_now_ms() + 60000;
    while (aamm_test_now_ms() < t1 && count(1, "SELECT count(*) FROM ledger") != 4 * n)
        usleep(100000);
    ck_assert_int_eq(count(1, "SELECT count(*) FROM ledger"), 4 * n);
    aamm_test_kill(&agents[2]);
    ck_assert_int_eq(pgfx_stop_node(fx, 2, "immediate"), 0);
    stop_agent(1);
    parted[2] = true;
    {
        PGconn *c = pgfx_connect(fx, 1);
        rc = aamm_node_part(c, 3, &dropped, err, sizeof err);
        ck_assert_msg(rc == 0 || rc == AAMM_EAGAIN, "%s", err);
        total[1] += dropped;
        PQfinish(c);
    }
    /* the origin goes once the other slot confirmed past node 3's last transaction applied
     * here (the restarted agents get it there) */
    start_agent(0);
    start_agent(1);
    write_ledger(0, n, 1);
    for (int i = 0; i < 2; i++) {
        PGconn *c = pgfx_connect(fx, i);
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
    while (aamm_test_now_ms() < end && (count(0, "SELECT count(*) FROM ledger") != 6 * n ||
                                        count(1, "SELECT count(*) FROM ledger") != 6 * n))
        usleep(100000);
    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(count(i, "SELECT count(*) FROM ledger"), 6 * n);
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
        joining[i] = false;
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
        {"consensus_member_joins", consensus_member_joins, 300},
        {"part_a_node", part_a_node, 150},
        {"apply_only_node_slots_advance", apply_only_node_slots_advance,
         150 + (double)apply_only_run_ms() / 1000},
        {"huge_txn_while_small_flow", huge_txn_while_small_flow, 400},
        {"fk_delete_race_leaves_orphan", fk_delete_race_leaves_orphan, 120},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        TCase *tc = aamm_test_tcase(cases[i].name, cases[i].timeout);
        tcase_add_checked_fixture(tc, setup, teardown);
        tcase_add_test(tc, cases[i].t);
        suite_add_tcase(s, tc);
    }
    return aamm_test_run(s);
}
