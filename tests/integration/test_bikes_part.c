/*
 * test_bikes_part.c: bikes-agent's `part ID` command and `lost = ID` key against real
 * PostgreSQL nodes (the library calls behind them, aamm_node_part() and
 * aamm_replicator_peer_lost(), are tested in test_replicator and test_catchup; this checks
 * what the agent makes of them: exit codes, messages, what is left on the node), and the
 * removal of a lost peer from consensus by whichever survivor leads.
 */
#include <check.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <aamm/aamm.h>
#include <aamm/node.h>

#include "pgfixture.h"
#include "testutil.h"

#define MAXN 3

static struct pgfx *fx;
static int nn;                                   /* nodes of this test */
static pid_t agents[MAXN];                       /* node i's running agent, or 0 */
static char conf[MAXN][600], agent_log[MAXN][600]; /* node i's configuration and output */
static char secret[600];                         /* the cluster's secret file */

/* The agent binary, built with the library. */
static const char *agent_path(void)
{
    static char path[600];
    const char *b = getenv("AAMM_TOP_BUILDDIR");
    snprintf(path, sizeof path, "%s/examples/bikes/bikes-agent", b ? b : AAMM_TOP_BUILDDIR);
    return path;
}

/* Start node @i's bikes-agent CMD [ARG] with its configuration; its output goes to its log
 * (truncated). */
static pid_t start_agent(int i, const char *cmd, const char *arg)
{
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int fd = open(agent_log[i], O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd < 0)
            _exit(126);
        dup2(fd, 1);
        dup2(fd, 2);
        execl(agent_path(), "bikes-agent", "-c", conf[i], cmd, arg, (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* Run node 1's bikes-agent CMD ARG to its end (bounded: 30 s); its exit status. */
static int run_agent(const char *cmd, const char *arg)
{
    pid_t pid = start_agent(0, cmd, arg);
    int st = 0;
    for (int waited = 0; waitpid(pid, &st, WNOHANG) == 0; waited += 20) {
        if (waited > 30000) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            ck_abort_msg("bikes-agent %s %s ran past 30 s", cmd, arg ? arg : "");
        }
        usleep(20000);
    }
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* Node @i's agent output so far (at most 64 kB) in a static buffer. */
static const char *output_of(int i)
{
    static char buf[65536];
    buf[0] = '\0';
    FILE *f = fopen(agent_log[i], "r");
    if (!f)
        return buf;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    return buf;
}

/* Whether node @i's agent output holds @text. */
static bool logged(int i, const char *text)
{
    return strstr(output_of(i), text) != NULL;
}

static void dump_log(int i)
{
    fprintf(stderr, "node %d's bikes-agent said:\n%s\n", i + 1, output_of(i));
}

/* Node @i's configuration: node id, name and conninfo, then @extra. */
static void write_conf(int i, const char *extra)
{
    FILE *f = fopen(conf[i], "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f, "node_id = %d\nnode_name = n%d\nconninfo = %s\n%s", i + 1, i + 1,
            pgfx_conninfo(fx, i), extra);
    ck_assert_int_eq(fclose(f), 0);
}

/* How many objects named for @id exist on node 1: slot aamm_to_<id>, origin aamm_from_<id>,
 * the replicator's status row for peer @id. */
static long slots(int id)
{
    return pgfx_value_long(fx, 0, -1,
                           "SELECT count(*) FROM pg_replication_slots WHERE slot_name = "
                           "'aamm_to_%d'",
                           id);
}
static long origins(int id)
{
    return pgfx_value_long(fx, 0, -1,
                           "SELECT count(*) FROM pg_replication_origin WHERE roname = "
                           "'aamm_from_%d'",
                           id);
}
static long status_rows(int id)
{
    return pgfx_value_long(fx, 0, -1, "SELECT count(*) FROM aamm.replicator_peer WHERE peer_id = %d",
                           id);
}

/* The objects a peer leaves on node 1: its slot, its origin, its status row. */
static void make_peer_objects(int id)
{
    ck_assert_int_eq(pgfx_exec(fx, 0,
                               "SELECT pg_create_logical_replication_slot('aamm_to_%d', "
                               "'pgoutput'); SELECT pg_replication_origin_create('aamm_from_%d');"
                               "INSERT INTO aamm.replicator_peer (peer_id, peer_name, node_id, "
                               "out_state, in_state) VALUES (%d, 'p%d', 1, 'down', 'down')",
                               id, id, id, id),
                     0);
}

/* `part 2` drops node 2's slot, origin and status row and exits 0, again 0 when there is
 * nothing left; a node that is still a peer is refused (2) and nothing is dropped; when
 * another slot has not passed a transaction applied under node 3's origin, `part 3` drops
 * the slot and the row, keeps the origin, exits 75 naming the slot, and exits 0 once the
 * slot has passed. */
START_TEST(part_command)
{
    make_peer_objects(2);
    write_conf(0, "peer = 2 berlin 127.0.0.1:1\n");
    ck_assert_int_eq(run_agent("part", "2"), 2);
    ck_assert_msg(logged(0, "is still a peer"), "no refusal");
    ck_assert_int_eq(slots(2), 1);

    write_conf(0, "");
    int rc = run_agent("part", "2");
    if (rc != 0)
        dump_log(0);
    ck_assert_int_eq(rc, 0);
    ck_assert(logged(0, "part: node 2 parted from this node"));
    ck_assert_int_eq(slots(2), 0);
    ck_assert_int_eq(origins(2), 0);
    ck_assert_int_eq(status_rows(2), 0);
    ck_assert_int_eq(run_agent("part", "2"), 0); /* idempotent */

    /* node 4's slot was made before a transaction applied under node 3's origin */
    make_peer_objects(3);
    ck_assert_int_eq(pgfx_exec(fx, 0,
                               "SELECT pg_create_logical_replication_slot('aamm_to_4', "
                               "'pgoutput')"),
                     0);
    ck_assert_int_eq(pgfx_exec(fx, 0,
                               "SELECT pg_replication_origin_session_setup('aamm_from_3'); "
                               "BEGIN; SELECT pg_replication_origin_xact_setup('0/1234', now()); "
                               "INSERT INTO t VALUES (1); COMMIT; "
                               "SELECT pg_replication_origin_session_reset()"),
                     0);
    rc = run_agent("part", "3");
    if (rc != 75)
        dump_log(0);
    ck_assert_int_eq(rc, 75);
    ck_assert(logged(0, "aamm_to_4"));
    ck_assert_int_eq(slots(3), 0);
    ck_assert_int_eq(origins(3), 1);
    ck_assert_int_eq(status_rows(3), 0);
    /* node 4's slot passes it (as its replicator's confirmations would) */
    ck_assert_int_eq(pgfx_exec(fx, 0,
                               "SELECT pg_replication_slot_advance('aamm_to_4', "
                               "pg_current_wal_lsn())"),
                     0);
    ck_assert_int_eq(run_agent("part", "3"), 0);
    ck_assert_int_eq(origins(3), 0);
}
END_TEST

/* `lost = 2` in the configuration: run declares peer 2 lost at start (a status row whose
 * reason says so, a log line), keeps running, and ends cleanly on SIGTERM. */
START_TEST(lost_key)
{
    char extra[1024];
    snprintf(extra, sizeof extra,
             "cluster = test\nsecret_file = %s\nlisten = 127.0.0.1:%d\nstatus_interval = 1\n"
             "peer = 2 berlin 127.0.0.1:%d\nlost = 2\npeer = 3 copenhagen 127.0.0.1:%d\n",
             secret, aamm_test_free_port(), aamm_test_free_port(), aamm_test_free_port());
    write_conf(0, extra);
    agents[0] = start_agent(0, "run", NULL);
    long n = pgfx_wait_long(fx, 0, 1, 30000,
                            "SELECT count(*) FROM aamm.replication_status WHERE peer_id = 2 "
                            "AND reason LIKE '%%lost%%'");
    if (n != 1)
        dump_log(0);
    ck_assert_int_eq(n, 1);
    ck_assert(logged(0, "peer berlin (node 2) is lost: forwarding what this node has of it"));
    /* the other peer is not lost */
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1,
                                     "SELECT count(*) FROM aamm.replication_status WHERE "
                                     "peer_id = 3 AND reason LIKE '%%lost%%'"),
                     0);
    ck_assert_int_eq(kill(agents[0], 0), 0); /* still running */
    aamm_test_stop(&agents[0], 10000);
}
END_TEST

/* Node @i's configuration with consensus (raft_address, raft_dir, bootstrap) and the other
 * two nodes as peers; @lost3: node 3 declared lost. */
static void write_cons_conf(int i, const int *lport, const int *rport, bool lost3)
{
    char extra[2048];
    int len = snprintf(extra, sizeof extra,
                       "cluster = test\nsecret_file = %s\nlisten = 127.0.0.1:%d\n"
                       "raft_address = 127.0.0.1:%d\nraft_dir = %s/raft%d\nbootstrap = yes\n"
                       "status_interval = 1\n",
                       secret, lport[i], rport[i], pgfx_root(fx), i + 1);
    for (int k = 0; k < nn; k++)
        if (k != i)
            len += snprintf(extra + len, sizeof extra - (size_t)len,
                            "peer = %d n%d 127.0.0.1:%d raft 127.0.0.1:%d\n%s", k + 1, k + 1,
                            lport[k], rport[k], k == 2 && lost3 ? "lost = 3\n" : "");
    write_conf(i, extra);
}

/* Three nodes with consensus. Node 3's agent dies for good; nodes 1 and 2 restart with
 * `lost = 3`: whichever leads removes node 3 from the consensus members (its callback
 * reports the committed change), and the other does not (only the leader acts; node 3 is
 * never added back). */
START_TEST(lost_member_removed)
{
    int lport[MAXN], rport[MAXN];
    for (int i = 0; i < nn; i++) {
        lport[i] = aamm_test_free_port();
        rport[i] = aamm_test_free_port();
    }
    for (int i = 0; i < nn; i++) {
        write_cons_conf(i, lport, rport, false);
        agents[i] = start_agent(i, "run", NULL);
    }
    /* every node streams both ways with both peers */
    for (int i = 0; i < nn; i++)
        ck_assert_msg(pgfx_wait_long(fx, i, nn - 1, 60000,
                                     "SELECT count(*) FROM aamm.replication_status WHERE "
                                     "out_state = 'streaming' AND in_state = 'streaming'") ==
                          nn - 1,
                      "node %d: streams not up", i + 1);
    /* node 3 is gone for good; the survivors restart declaring it lost */
    aamm_test_kill(&agents[2]);
    for (int i = 0; i < 2; i++) {
        aamm_test_stop(&agents[i], 10000);
        write_cons_conf(i, lport, rport, true);
        agents[i] = start_agent(i, "run", NULL);
    }
    int64_t end = aamm_test_now_ms() + 60000;
    int removed = -1;
    while (removed < 0 && aamm_test_now_ms() < end) {
        for (int i = 0; i < 2 && removed < 0; i++)
            if (logged(i, "consensus: lost node 3 removed from the members"))
                removed = i;
        usleep(200000);
    }
    if (removed < 0)
        for (int i = 0; i < 2; i++)
            dump_log(i);
    ck_assert_msg(removed >= 0, "node 3 was not removed from consensus");
    /* the other survivor did not remove it too, and nobody added it back */
    usleep(2000000);
    ck_assert(!logged(1 - removed, "lost node 3 removed"));
    for (int i = 0; i < 2; i++) {
        ck_assert(!logged(i, "adding node 3"));
        ck_assert(logged(i, "peer n3 (node 3) is lost"));
    }
    for (int i = 0; i < 2; i++)
        aamm_test_stop(&agents[i], 10000);
}
END_TEST

/* @n nodes, each with libaamm's schema and a replicated table t; the cluster's secret. */
static void setup_nodes(int n)
{
    nn = n;
    fx = pgfx_start(nn, NULL);
    ck_assert_ptr_nonnull(fx);
    for (int i = 0; i < nn; i++) {
        char err[512];
        PGconn *c = pgfx_connect(fx, i);
        ck_assert_ptr_nonnull(c);
        ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "%s", err);
        ck_assert_int_eq(pgfx_exec_conn(c, "CREATE TABLE t (id int PRIMARY KEY)"), 0);
        ck_assert_msg(aamm_node_replicate_table(c, "public", "t", NULL, "aamm", err,
                                                sizeof err) == 0,
                      "%s", err);
        PQfinish(c);
        snprintf(conf[i], sizeof conf[i], "%s/n%d.conf", pgfx_root(fx), i + 1);
        snprintf(agent_log[i], sizeof agent_log[i], "%s/n%d.log", pgfx_root(fx), i + 1);
        agents[i] = 0;
    }
    snprintf(secret, sizeof secret, "%s/cluster.secret", pgfx_root(fx));
    int fd = open(secret, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, "a-secret-of-more-than-16-bytes\n", 31), 31);
    close(fd);
}

static void setup1(void)
{
    setup_nodes(1);
}

static void setup3(void)
{
    setup_nodes(3);
}

static void teardown(void)
{
    for (int i = 0; i < nn; i++)
        aamm_test_kill(&agents[i]);
    pgfx_destroy(fx);
    fx = NULL;
}

int main(void)
{
    const struct {
        const char *name;
        const TTest *t;
        void (*setup)(void);
        double timeout;
    } cases[] = {
        {"part_command", part_command, setup1, 120},
        {"lost_key", lost_key, setup1, 120},
        {"lost_member_removed", lost_member_removed, setup3, 180},
    };
    Suite *s = suite_create("bikes_part");
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        TCase *tc = aamm_test_tcase(cases[i].name, cases[i].timeout);
        tcase_add_checked_fixture(tc, cases[i].setup, teardown);
        tcase_add_test(tc, cases[i].t);
        suite_add_tcase(s, tc);
    }
    return aamm_test_run(s);
}
