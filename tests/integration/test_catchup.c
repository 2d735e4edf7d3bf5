/*
 * test_catchup.c: survivors' catch-up (doc/membership.md). Three real PostgreSQL nodes with
 * a replicator each in a forked agent; node 1's transactions reach node 2 but not node 3 (its
 * link to 3 goes through a proxy that is cut), then node 1 dies for good. Nodes 2 and 3 are
 * told it is lost (aamm_replicator_peer_lost(), on SIGUSR1 in the agent) and must end
 * identical: node 2 forwards what node 3 misses, every row once, no conflict. A fourth node
 * then makes two survivors forward to one node at once (two_forwarders).
 */
#include <check.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <aamm/aamm.h>
#include <aamm/consensus.h>
#include <aamm/node.h>
#include <aamm/replicator.h>

#include "agentfx.h"
#include "netfx.h"
#include "pgfixture.h"
#include "testutil.h"

#define MAXN 4
#define A 0 /* the node that dies (node id 1) */
#define B 1 /* has everything of A (node id 2) */
#define C 2 /* misses A's last run (node id 3) */
#define D 3 /* two_forwarders: misses A's last two runs (node id 4) */

static int nn; /* nodes in this test: 3, or 4 for two_forwarders */

static struct pgfx *fx;
static int ports[MAXN];
static pid_t agents[MAXN];
static int dial_port[MAXN][MAXN]; /* where agent i dials peer k (0: ports[k]) */
static const char secret[] = "0123456789abcdef-catchup-test";

static void setup_node(int i)
{
    PGconn *c = pgfx_connect(fx, i);
    char err[512];
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(pgfx_exec_conn(c, "CREATE TABLE ledger (node int, seq bigint, note text, "
                                       "PRIMARY KEY (node, seq))"),
                     0);
    ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "%s", err);
    ck_assert_msg(aamm_node_create_apply_role(c, "aamm_apply", NULL, err, sizeof err) == 0, "%s",
                  err);
    ck_assert_msg(aamm_node_replicate_table(c, "public", "ledger", "aamm_apply", "aamm", err,
                                            sizeof err) == 0,
                  "%s", err);
    PQfinish(c);
}

/* ---- the agent: one replicator in a forked process; SIGUSR1 declares node 1 lost --------- */

static volatile int agent_stop, agent_wake, lost_req;
static void on_term(int sig)
{
    (void)sig;
    agent_stop = agent_wake = 1;
}
static void on_lost(int sig)
{
    (void)sig;
    lost_req = agent_wake = 1;
}

/* "<forwarded> <holds now> <most holds seen> <lost>" into <root>/agent<i>.report (atomic
 * rename): forwarded transactions sent to every peer, hold entries pending. */
static void agent_report(struct aamm_replicator *r, int i, size_t *holds_max)
{
    char path[512], tmp[520];
    uint64_t fwd = 0;
    size_t holds = 0;
    int lost = 0;
    for (uint32_t k = 0; k < aamm_replicator_npeers(r); k++) {
        struct aamm_replicator_peer_status st;
        if (aamm_replicator_peer_status(r, k, &st) != 0)
            continue;
        fwd += st.out_forwarded;
        holds += st.out_holds;
        lost += st.lost;
    }
    if (holds > *holds_max)
        *holds_max = holds;
    snprintf(path, sizeof path, "%s/agent%d.report", pgfx_root(fx), i + 1);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return;
    fprintf(f, "%" PRIu64 " %zu %zu %d\n", fwd, holds, *holds_max, lost);
    if (fclose(f) == 0)
        (void)rename(tmp, path);
}

static void agent_main(int i)
{
    struct agentfx a = {.node_id = (uint32_t)i + 1, .port = ports[i], .secret = secret};
    struct aamm_replicator_options o;
    struct aamm_replicator_peer peers[AGENTFX_MAX_PEERS];
    struct agentfx_ports pstr;
    char err[512];
    struct aamm_replicator *r;
    size_t holds_max = 0;
    signal(SIGTERM, on_term);
    signal(SIGUSR1, on_lost);
    aamm_consensus_ignore_sigpipe();
    snprintf(a.conninfo, sizeof a.conninfo, "%s", pgfx_conninfo(fx, i));
    snprintf(a.apply_conninfo, sizeof a.apply_conninfo, "%s",
             pgfx_conninfo_with(fx, i, "user=aamm_apply"));
    for (int k = 0; k < nn; k++) {
        if (k == i)
            continue;
        a.peer_ids[a.npeers] = (uint32_t)k + 1;
        a.peer_ports[a.npeers++] = dial_port[i][k] ? dial_port[i][k] : ports[k];
    }
    agentfx_options(&a, &o, peers, &pstr);
    if (aamm_replicator_new(&r, &o, err, sizeof err) != 0) {
        fprintf(stderr, "agent %d: %s\n", i + 1, err);
        _exit(2);
    }
    if (aamm_replicator_start(r) != 0) {
        fprintf(stderr, "agent %d: start: %s\n", i + 1, aamm_replicator_errmsg(r));
        _exit(3);
    }
    while (!agent_stop) {
        agent_wake = 0;
        if (lost_req) {
            lost_req = 0;
            if (aamm_replicator_peer_lost(r, A + 1) != 0) {
                fprintf(stderr, "agent %d: %s\n", i + 1, aamm_replicator_errmsg(r));
                _exit(5);
            }
        }
        if (aamm_replicator_run(r, 200, &agent_wake) != 0) {
            fprintf(stderr, "agent %d: %s\n", i + 1, aamm_replicator_errmsg(r));
            _exit(4);
        }
        agent_report(r, i, &holds_max);
    }
    agent_report(r, i, &holds_max);
    aamm_replicator_stop(r, 2000);
    aamm_replicator_free(r);
    _exit(0);
}

/* ---- proxies: node 1's and node 2's senders dial node 3 through one each (two_forwarders:
 * node 1's dial nodes 3 and 4, node 2's node 4), in forked processes; SIGUSR1 cuts one (every
 * connection closed, new ones refused), SIGUSR2 heals */

#define NPROXY 3
static struct netfx_proxy prox[NPROXY];
static pid_t proxy_pid[NPROXY];
static volatile sig_atomic_t proxy_cutting;
static void on_cut(int sig)
{
    proxy_cutting = sig == SIGUSR1;
}

static void proxy_main(int k)
{
    signal(SIGUSR1, on_cut);
    signal(SIGUSR2, on_cut);
    for (;;) {
        struct pollfd fds[3];
        int n = netfx_proxy_pollfds(&prox[k], fds), fd;
        (void)poll(fds, (nfds_t)n, 20);
        if (proxy_cutting) {
            netfx_proxy_cut(&prox[k]);
            while ((fd = netfx_accept(prox[k].lfd)) >= 0)
                close(fd);
        } else {
            netfx_proxy_step(&prox[k]);
        }
    }
}

#define PROXY_AC 0 /* node 1 -> node 3 */
#define PROXY_BC 1 /* node 2 -> node 3 */
static void cut(int k)
{
    kill(proxy_pid[k], SIGUSR1);
    usleep(300000);
}
static void heal(int k)
{
    kill(proxy_pid[k], SIGUSR2);
}

/* ---- checks ---------------------------------------------------------------------- */

static long rows_from(int i, int origin)
{
    return pgfx_value_long(fx, i, -1, "SELECT count(*) FROM ledger WHERE node = %d", origin + 1);
}

/* Wait (bounded) until node @i has @want rows of node @origin; true when it does. */
static bool wait_rows(int i, int origin, long want, int timeout_ms)
{
    return pgfx_wait_long(fx, i, want, timeout_ms, "SELECT count(*) FROM ledger WHERE node = %d",
                          origin + 1) == want;
}

/* Node @i commits @n ledger rows from @first, one transaction each. */
static void write_ledger(int i, long first, long n)
{
    PGconn *c = pgfx_connect(fx, i);
    ck_assert_ptr_nonnull(c);
    for (long s = first; s < first + n; s++)
        ck_assert_int_eq(pgfx_exec_conn(c, "INSERT INTO ledger VALUES (%d, %ld, 'x')", i + 1, s),
                         0);
    PQfinish(c);
}

/* WAL node 1 (B) keeps for its slot to node 3 (C) past the slot's confirmed position. */
static long held_bytes(void)
{
    return pgfx_value_long(fx, B, -1,
                           "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)"
                           "::bigint FROM pg_replication_slots WHERE slot_name = 'aamm_to_3'");
}

static bool read_report(int i, unsigned long long *fwd, unsigned long *holds,
                        unsigned long *holds_max)
{
    char path[512];
    int lost;
    snprintf(path, sizeof path, "%s/agent%d.report", pgfx_root(fx), i + 1);
    FILE *f = fopen(path, "r");
    if (!f)
        return false;
    bool ok = fscanf(f, "%llu %lu %lu %d", fwd, holds, holds_max, &lost) == 4;
    fclose(f);
    return ok;
}

static void dump_status(int i)
{
    char *st = pgfx_value(fx, i,
                          "SELECT string_agg(format('peer %%s out %%s sent %%s acked %%s "
                          "conf %%s | in %%s recv %%s applied %%s pending %%s %%s', "
                          "peer_id, out_state, out_sent_lsn, out_acked_lsn, "
                          "out_confirmed_lsn, in_state, in_received_lsn, "
                          "in_applied_lsn, in_pending, reason), E'\\n  ') "
                          "FROM aamm.replication_status");
    fprintf(stderr, "node %d: %s\n  %s\n", i + 1,
            pgfx_value(fx, i,
                       "SELECT string_agg(node || ':' || n, ' ') FROM (SELECT node, "
                       "count(*) n FROM ledger GROUP BY 1 ORDER BY 1) x"),
            st ? st : "(no status)");
    free(st);
}

/* Start the first @nproxy proxies (initialized) and every agent, and wait (bounded) until
 * each node has made its slots. */
static void start_all(int nproxy)
{
    for (int k = 0; k < nproxy; k++)
        proxy_pid[k] = aamm_test_spawn(proxy_main, k);
    for (int i = 0; i < nn; i++) {
        agents[i] = aamm_test_spawn(agent_main, i);
        ck_assert_int_gt(agents[i], 0);
    }
    for (int i = 0; i < nn; i++)
        ck_assert_msg(pgfx_wait_long(fx, i, nn - 1, 60000,
                                     "SELECT count(*) FROM pg_replication_slots "
                                     "WHERE slot_name LIKE 'aamm_to_%%'") == nn - 1,
                      "node %d: slots not made", i + 1);
}

/* ---- tests ----------------------------------------------------------------------- */

/* Node 1 commits run 1 while its link to node 3 is cut and its link to node 2 is not; node
 * 2's own later writes reach node 3 and are acknowledged (without the hold, node 2's slot
 * for node 3 would now be confirmed past run 1).
 *   _i == 0 (hold): node 1 dies for good; declared lost on nodes 2 and 3, node 2 forwards
 *   run 1 from its held slot.
 *   _i == 1 (dedup): node 2's link to node 3 is cut and node 1's healed: node 3 gets run 1
 *   from node 1, but node 2 does not learn it (its slot stays held before run 1). Node 1's
 *   link to 3 is cut again, it commits run 2 (to node 2 only) and dies for good. Declared
 *   lost on nodes 2 and 3 before node 2's link to 3 heals, node 2 forwards runs 1 and 2
 *   from its slot: node 3 must drop run 1 (it has it: the link's resume position for node
 *   1, and apply's origin progress behind it) and apply run 2.
 * (One scenario cannot do both: once node 2 hears from node 3 after run 1 reached it, the
 * hold for run 1 is gone and run 1 is not forwarded again.) Both survivors end identical,
 * node 1's rows once each, no conflict. Also measures the WAL node 2 retains for node 3
 * under load and during the hold. */
START_TEST(lost_node_catchup)
{
    long per = aamm_test_scaled(100, 20) / 10 * 10, run1 = aamm_test_scaled(100, 25);
    long run2 = aamm_test_scaled(200, 50), own = 20, all;
    long held_load = 0, held_hold;
    unsigned long long fwd = 0;
    unsigned long holds_max = 0;
    netfx_proxy_init(&prox[PROXY_AC], ports[C]);
    netfx_proxy_init(&prox[PROXY_BC], ports[C]);
    ck_assert(prox[0].lfd >= 0 && prox[1].lfd >= 0);
    dial_port[A][C] = prox[PROXY_AC].port;
    dial_port[B][C] = prox[PROXY_BC].port;
    start_all(2);

    /* 1. every node writes; node 2 holds its slot for node 3 past node 1's transactions only
     * until node 3 has them from node 1: sample what that retains under load */
    for (long s = 0; s < per; s += 10) {
        for (int i = 0; i < nn; i++)
            write_ledger(i, s, 10);
        long h = held_bytes();
        if (h > held_load)
            held_load = h;
    }
    for (int i = 0; i < nn; i++)
        for (int o = 0; o < nn; o++)
            ck_assert_msg(wait_rows(i, o, per, 60000), "node %d misses rows of node %d", i + 1,
                          o + 1);
    /* node 3 acks its progress for node 1 to node 2 too: node 2's holds for node 1's
     * transactions go (the slot is not held for ever) */
    int64_t hend = aamm_test_now_ms() + 10000;
    unsigned long holds = 1;
    while (aamm_test_now_ms() < hend && !(read_report(B, &fwd, &holds, &holds_max) && holds == 0))
        usleep(100000);
    ck_assert_msg(holds == 0, "node 2 still holds %lu transactions of other origins", holds);

    /* 2. run 1 reaches node 2 only; node 2's own writes after it reach node 3 and are
     * acknowledged */
    cut(PROXY_AC);
    write_ledger(A, per, run1);
    ck_assert(wait_rows(B, A, per + run1, 60000));
    write_ledger(B, per, own);
    ck_assert(wait_rows(C, B, per + own, 60000));
    usleep(1500000); /* acks, slot confirmations and status updates go round */
    ck_assert_int_eq(rows_from(C, A), per);
    held_hold = held_bytes();

    all = per + run1;
    if (_i == 1) {
        /* 3. node 3 gets run 1 from node 1 while node 2 cannot hear of it; run 2 reaches
         * node 2 only */
        cut(PROXY_BC);
        heal(PROXY_AC);
        ck_assert(wait_rows(C, A, per + run1, 60000));
        cut(PROXY_AC);
        write_ledger(A, per + run1, run2);
        all = per + run1 + run2;
        ck_assert(wait_rows(B, A, all, 60000));
    }

    /* 4. node 1 dies for good; the survivors are told, then node 2 reaches node 3 again */
    aamm_test_kill(&agents[A]);
    ck_assert_int_eq(pgfx_stop_node(fx, A, "immediate"), 0);
    long missing = all - rows_from(C, A);
    int64_t t0 = aamm_test_now_ms();
    kill(agents[B], SIGUSR1);
    kill(agents[C], SIGUSR1);
    usleep(500000);
    heal(PROXY_BC);
    bool done = wait_rows(C, A, all, 60000);
    int64_t took = aamm_test_now_ms() - t0;
    if (!done) {
        dump_status(B);
        dump_status(C);
    }
    ck_assert_msg(done, "node 3 has %ld of node 1's %ld rows", rows_from(C, A), all);
    /* the survivors go on replicating to each other */
    write_ledger(C, per, own);
    ck_assert(wait_rows(B, C, per + own, 60000));
    usleep(500000);
    ck_assert(read_report(B, &fwd, &holds, &holds_max));
    fprintf(
        stderr,
        "lost_node_catchup (%s): node 3 missed %ld of node 1's %ld transactions; node 2 forwarded "
        "%llu, caught up in %" PRId64
        " ms after peer_lost (with a 500 ms pause before node 2's link to node 3 heals); node 2 "
        "retained for node 3: %ld bytes at most under load (3 writers), %ld bytes during "
        "the hold (%lu hold entries at most)\n",
        _i ? "dedup" : "hold", missing, all, fwd, took, held_load, held_hold, holds_max);

    /* identical, every row once, no conflict */
    char *vb = pgfx_value(fx, B,
                          "SELECT md5(string_agg(l::text, ',' ORDER BY node, seq)) "
                          "FROM ledger l");
    char *vc = pgfx_value(fx, C,
                          "SELECT md5(string_agg(l::text, ',' ORDER BY node, seq)) "
                          "FROM ledger l");
    ck_assert(vb && vc);
    ck_assert_str_eq(vb, vc);
    free(vb);
    free(vc);
    for (int i = B; i <= C; i++) {
        ck_assert_int_eq(rows_from(i, A), all);
        ck_assert_int_eq(pgfx_value_long(fx, i, -1, "SELECT count(*) FROM aamm.conflict_log"), 0);
    }
    /* node 1's origin progress is the same on both: catch-up is done */
    char *pb = pgfx_value(fx, B, "SELECT pg_replication_origin_progress('aamm_from_1', true)");
    char *pc = pgfx_value(fx, C, "SELECT pg_replication_origin_progress('aamm_from_1', true)");
    ck_assert(pb && pc);
    ck_assert_str_eq(pb, pc);
    free(pb);
    free(pc);
    ck_assert_int_ge(fwd, (unsigned long long)(_i ? run1 + run2 : run1));
    for (int i = B; i <= C; i++)
        aamm_test_stop(&agents[i], 5000);
    for (int k = 0; k < 2; k++)
        aamm_test_kill(&proxy_pid[k]);
    ck_assert_int_eq(pgfx_start_node(fx, A), 0); /* for the fixture's teardown */
}
END_TEST

/* Four nodes. Node 1 commits run 1 while its link to node 4 is cut (run 1 reaches nodes 2
 * and 3), then run 2 while its link to node 3 is cut too (run 2 reaches node 2 only), and
 * dies for good. Declared lost on nodes 2, 3 and 4, node 4 (missing runs 1 and 2) has two
 * forwarders: node 3 has run 1, node 2 runs 1 and 2. Node 3 gets run 2 from node 2.
 *   _i == 0 (staged): node 2's link to node 4 stays cut: node 4 gets run 1 from node 3,
 *   and run 2 too, as node 3 forwards what node 2 forwarded to it. Then the link heals and
 *   node 4 must drop everything node 2 forwards.
 *   _i == 1 (at once): both forward to node 4 at the same time; whole transactions of both
 *   interleave on node 4's apply for node 1 (one open at a time; its origin progress drops
 *   the second copy).
 * All three survivors end identical, node 1's rows once each, no conflict, the same origin
 * progress for node 1. */
START_TEST(two_forwarders)
{
    long per = aamm_test_scaled(50, 20) / 10 * 10, run1 = aamm_test_scaled(200, 50);
    long run2 = aamm_test_scaled(100, 25), own = 20, all = per + run1 + run2;
    unsigned long long fwd[MAXN] = {0};
    unsigned long holds = 0, holds_max = 0;
    netfx_proxy_init(&prox[0], ports[C]); /* node 1 -> node 3 */
    netfx_proxy_init(&prox[1], ports[D]); /* node 1 -> node 4 */
    netfx_proxy_init(&prox[2], ports[D]); /* node 2 -> node 4 */
    ck_assert(prox[0].lfd >= 0 && prox[1].lfd >= 0 && prox[2].lfd >= 0);
    dial_port[A][C] = prox[0].port;
    dial_port[A][D] = prox[1].port;
    dial_port[B][D] = prox[2].port;
    start_all(NPROXY);
    /* 1. every node writes and has every row */
    for (int i = 0; i < nn; i++)
        write_ledger(i, 0, per);
    for (int i = 0; i < nn; i++)
        for (int o = 0; o < nn; o++)
            ck_assert_msg(wait_rows(i, o, per, 60000), "node %d misses rows of node %d", i + 1,
                          o + 1);
    /* 2. run 1 reaches nodes 2 and 3, run 2 node 2 only; the survivors' own writes after
     *    them reach every survivor (and their acks go round) */
    cut(1);
    write_ledger(A, per, run1);
    ck_assert(wait_rows(B, A, per + run1, 60000) && wait_rows(C, A, per + run1, 60000));
    cut(0);
    write_ledger(A, per + run1, run2);
    ck_assert(wait_rows(B, A, all, 60000));
    for (int i = B; i <= D; i++)
        write_ledger(i, per, own);
    for (int i = B; i <= D; i++)
        for (int o = B; o <= D; o++)
            ck_assert(wait_rows(i, o, per + own, 60000));
    usleep(1500000); /* acks, slot confirmations and status updates go round */
    long had[MAXN];
    for (int i = B; i <= D; i++)
        had[i] = rows_from(i, A);
    ck_assert_int_eq(had[C], per + run1);
    ck_assert_int_eq(had[D], per);

    /* 3. node 1 dies for good; the survivors are told */
    aamm_test_kill(&agents[A]);
    ck_assert_int_eq(pgfx_stop_node(fx, A, "immediate"), 0);
    if (_i == 0)
        cut(2);
    int64_t t0 = aamm_test_now_ms();
    for (int i = B; i <= D; i++)
        kill(agents[i], SIGUSR1);
    if (_i == 0) {
        /* everything comes from node 3: run 1 from its own slot, run 2 as node 2 forwards it
         * to node 3 (node 3 forwards what it applied of node 1, whoever brought it) */
        bool got = wait_rows(D, A, all, 60000);
        if (!got)
            for (int i = B; i <= D; i++)
                dump_status(i);
        ck_assert_msg(got, "node 4 has %ld of node 1's %ld rows through node 3",
                      rows_from(D, A), all);
        /* then node 2's link to node 4 heals: what node 2 forwards is there already */
        heal(2);
        ck_assert_msg(pgfx_wait_long(fx, D, 1, 60000,
                                     "SELECT count(*) FROM aamm.replication_status "
                                     "WHERE peer_id = 2 AND in_state = 'streaming'") == 1,
                      "node 2's link to node 4 did not come back");
        usleep(1000000);
    }
    bool done = wait_rows(C, A, all, 60000) && wait_rows(D, A, all, 60000);
    int64_t took = aamm_test_now_ms() - t0;
    if (!done)
        for (int i = B; i <= D; i++)
            dump_status(i);
    ck_assert_msg(done, "node 3 has %ld, node 4 %ld of node 1's %ld rows", rows_from(C, A),
                  rows_from(D, A), all);
    /* the survivors go on replicating to each other */
    for (int i = B; i <= D; i++)
        write_ledger(i, per + own, own);
    for (int i = B; i <= D; i++)
        for (int o = B; o <= D; o++)
            ck_assert(wait_rows(i, o, per + 2 * own, 60000));
    usleep(500000);
    for (int i = B; i <= D; i++)
        ck_assert(read_report(i, &fwd[i], &holds, &holds_max));
    fprintf(stderr,
            "two_forwarders (%s): of node 1's %ld transactions node 3 missed %ld and node 4 %ld; "
            "forwarded: node 2 %llu, node 3 %llu, node 4 %llu; both caught up %" PRId64
            " ms after peer_lost\n",
            _i ? "at once" : "staged", all, all - had[C], all - had[D], fwd[B], fwd[C], fwd[D],
            took);

    /* identical, every row once, no conflict, the same progress for node 1 */
    char *v[MAXN] = {0}, *pr[MAXN] = {0};
    for (int i = B; i <= D; i++) {
        v[i] = pgfx_value(fx, i, "SELECT md5(string_agg(l::text, ',' ORDER BY node, seq)) "
                                 "FROM ledger l");
        pr[i] = pgfx_value(fx, i, "SELECT pg_replication_origin_progress('aamm_from_1', true)");
        ck_assert(v[i] && pr[i]);
        ck_assert_int_eq(rows_from(i, A), all);
        ck_assert_int_eq(pgfx_value_long(fx, i, -1, "SELECT count(*) FROM ledger"),
                         all + 3 * (per + 2 * own));
        ck_assert_int_eq(pgfx_value_long(fx, i, -1, "SELECT count(*) FROM aamm.conflict_log"), 0);
    }
    for (int i = C; i <= D; i++) {
        ck_assert_str_eq(v[i], v[B]);
        ck_assert_str_eq(pr[i], pr[B]);
    }
    for (int i = B; i <= D; i++) {
        free(v[i]);
        free(pr[i]);
    }
    /* node 2 sent run 2 to node 3; staged, node 3 sent node 4 runs 1 and 2 (at once, who
     * sent how much depends on the race) */
    ck_assert_int_ge(fwd[B], (unsigned long long)run2);
    if (_i == 0)
        ck_assert_int_ge(fwd[C], (unsigned long long)(run1 + run2));
    else
        ck_assert_int_ge(fwd[B] + fwd[C], (unsigned long long)(run1 + 2 * run2));
    for (int i = B; i <= D; i++)
        aamm_test_stop(&agents[i], 5000);
    for (int k = 0; k < NPROXY; k++)
        aamm_test_kill(&proxy_pid[k]);
    ck_assert_int_eq(pgfx_start_node(fx, A), 0); /* for the fixture's teardown */
}
END_TEST

/* ---- fixture ------------------------------------------------------------------------ */

static void setup(void)
{
    fx = pgfx_start(nn, "max_replication_slots = 20\nmax_wal_senders = 20\n");
    ck_assert_ptr_nonnull(fx);
    for (int i = 0; i < nn; i++) {
        setup_node(i);
        ports[i] = aamm_test_free_port();
        agents[i] = 0;
        for (int k = 0; k < nn; k++)
            dial_port[i][k] = 0;
    }
}

static void setup3(void)
{
    nn = 3;
    setup();
}

static void setup4(void)
{
    nn = 4;
    setup();
}

static void teardown(void)
{
    for (int i = 0; i < nn; i++)
        aamm_test_kill(&agents[i]);
    for (int k = 0; k < NPROXY; k++)
        aamm_test_kill(&proxy_pid[k]);
    pgfx_destroy(fx);
    fx = NULL;
}

int main(void)
{
    Suite *s = suite_create("catchup");
    TCase *tc = aamm_test_tcase("lost_node_catchup", 300);
    tcase_add_checked_fixture(tc, setup3, teardown);
    tcase_add_loop_test(tc, lost_node_catchup, 0, 2);
    suite_add_tcase(s, tc);
    tc = aamm_test_tcase("two_forwarders", 300);
    tcase_add_checked_fixture(tc, setup4, teardown);
    tcase_add_loop_test(tc, two_forwarders, 0, 2);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
