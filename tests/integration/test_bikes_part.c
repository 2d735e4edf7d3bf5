/*
 * test_bikes_part.c: bikes-agent's `part ID` command and `lost = ID` key against a real
 * PostgreSQL node (the library calls behind them, aamm_node_part() and
 * aamm_replicator_peer_lost(), are tested in test_replicator and test_catchup; this checks
 * what the agent makes of them: exit codes, messages, what is left on the node), and the
 * removal of a lost peer from consensus by whichever survivor leads.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <aamm/aamm.h>
#include <aamm/node.h>

#include "pgfixture.h"
#include "testutil.h"

static struct pgfx *fx;
static pid_t agent;
static char conf[600], agent_log[600];

static long value(const char *sql)
{
    return pgfx_value_long(fx, 0, -1, "%s", sql);
}

/* The agent binary, built with the library. */
static const char *agent_path(void)
{
    static char path[600];
    const char *b = getenv("AAMM_TOP_BUILDDIR");
    snprintf(path, sizeof path, "%s/examples/bikes/bikes-agent", b ? b : AAMM_TOP_BUILDDIR);
    return path;
}

/* Start bikes-agent -c @cfile CMD [ARG]; its output goes to @lfile (truncated). */
static pid_t start_agent_with(const char *cfile, const char *lfile, const char *cmd,
                              const char *arg)
{
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int fd = open(lfile, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd < 0)
            _exit(126);
        dup2(fd, 1);
        dup2(fd, 2);
        execl(agent_path(), "bikes-agent", "-c", cfile, cmd, arg, (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* Start bikes-agent -c conf CMD [ARG]; its output goes to agent_log (truncated). */
static pid_t start_agent(const char *cmd, const char *arg)
{
    return start_agent_with(conf, agent_log, cmd, arg);
}

/* Run bikes-agent -c conf CMD ARG to its end (bounded: 30 s); its exit status. */
static int run_agent(const char *cmd, const char *arg)
{
    pid_t pid = start_agent(cmd, arg);
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

/* The output so far (at most 64 kB) of the agent that logs to @lfile, in a static buffer. */
static const char *output_of(const char *lfile)
{
    static char buf[65536];
    buf[0] = '\0';
    FILE *f = fopen(lfile, "r");
    if (!f)
        return buf;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    return buf;
}

static const char *agent_output(void)
{
    return output_of(agent_log);
}

/* Whether the agent's output holds @text. */
static bool logged(const char *text)
{
    return strstr(agent_output(), text) != NULL;
}

static void dump_log(void)
{
    fprintf(stderr, "bikes-agent said:\n%s\n", agent_output());
}

static void write_conf(const char *extra)
{
    FILE *f = fopen(conf, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f, "node_id = 1\nnode_name = amsterdam\nconninfo = %s\n%s", pgfx_conninfo(fx, 0),
            extra);
    ck_assert_int_eq(fclose(f), 0);
}

/* The objects a peer leaves on this node: its slot, its origin, its status row. */
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
    write_conf("peer = 2 berlin 127.0.0.1:1\n");
    ck_assert_int_eq(run_agent("part", "2"), 2);
    ck_assert_msg(logged("is still a peer"), "no refusal");
    ck_assert_int_eq(value("SELECT count(*) FROM pg_replication_slots WHERE slot_name = "
                           "'aamm_to_2'"),
                     1);

    write_conf("");
    int rc = run_agent("part", "2");
    if (rc != 0)
        dump_log();
    ck_assert_int_eq(rc, 0);
    ck_assert(logged("part: node 2 parted from this node"));
    ck_assert_int_eq(value("SELECT count(*) FROM pg_replication_slots WHERE slot_name = "
                           "'aamm_to_2'"),
                     0);
    ck_assert_int_eq(value("SELECT count(*) FROM pg_replication_origin WHERE roname = "
                           "'aamm_from_2'"),
                     0);
    ck_assert_int_eq(value("SELECT count(*) FROM aamm.replicator_peer WHERE peer_id = 2"), 0);
    ck_assert_int_eq(run_agent("part", "2"), 0); /* idempotent */

    /* node 4's slot was made before a transaction applied under node 3's origin */
    make_peer_objects(3);
    ck_assert_int_eq(pgfx_exec(fx, 0,
                               "SELECT pg_create_logical_replication_slot('aamm_to_4', "
                               "'pgoutput'); CREATE TABLE t (id int PRIMARY KEY)"),
                     0);
    ck_assert_int_eq(pgfx_exec(fx, 0,
                               "SELECT pg_replication_origin_session_setup('aamm_from_3'); "
                               "BEGIN; SELECT pg_replication_origin_xact_setup('0/1234', now()); "
                               "INSERT INTO t VALUES (1); COMMIT; "
                               "SELECT pg_replication_origin_session_reset()"),
                     0);
    rc = run_agent("part", "3");
    if (rc != 75)
        dump_log();
    ck_assert_int_eq(rc, 75);
    ck_assert(logged("aamm_to_4"));
    ck_assert_int_eq(value("SELECT count(*) FROM pg_replication_slots WHERE slot_name = "
                           "'aamm_to_3'"),
                     0);
    ck_assert_int_eq(value("SELECT count(*) FROM pg_replication_origin WHERE roname = "
                           "'aamm_from_3'"),
                     1);
    ck_assert_int_eq(value("SELECT count(*) FROM aamm.replicator_peer WHERE peer_id = 3"), 0);
    /* node 4's slot passes it (as its replicator's confirmations would) */
    ck_assert_int_eq(pgfx_exec(fx, 0,
                               "SELECT pg_replication_slot_advance('aamm_to_4', "
                               "pg_current_wal_lsn())"),
                     0);
    ck_assert_int_eq(run_agent("part", "3"), 0);
    ck_assert_int_eq(value("SELECT count(*) FROM pg_replication_origin WHERE roname = "
                           "'aamm_from_3'"),
                     0);
}
END_TEST

/* `lost = 2` in the configuration: run declares peer 2 lost at start (a status row whose
 * reason says so, a log line), keeps running, and ends cleanly on SIGTERM. */
START_TEST(lost_key)
{
    char extra[1024], secret[640];
    snprintf(secret, sizeof secret, "%s/cluster.secret", pgfx_root(fx));
    int fd = open(secret, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, "a-secret-of-more-than-16-bytes\n", 31), 31);
    close(fd);
    ck_assert_int_eq(pgfx_exec(fx, 0, "CREATE TABLE t (id int PRIMARY KEY)"), 0);
    char err[512];
    PGconn *c = pgfx_connect(fx, 0);
    ck_assert_ptr_nonnull(c);
    ck_assert_msg(aamm_node_replicate_table(c, "public", "t", NULL, "aamm", err, sizeof err) == 0,
                  "%s", err);
    PQfinish(c);
    snprintf(extra, sizeof extra,
             "cluster = test\nsecret_file = %s\nlisten = 127.0.0.1:%d\nstatus_interval = 1\n"
             "peer = 2 berlin 127.0.0.1:%d\nlost = 2\npeer = 3 copenhagen 127.0.0.1:%d\n",
             secret, aamm_test_free_port(), aamm_test_free_port(), aamm_test_free_port());
    write_conf(extra);
    agent = start_agent("run", NULL);
    long n = pgfx_wait_long(fx, 0, 1, 30000,
                            "SELECT count(*) FROM aamm.replication_status WHERE peer_id = 2 "
                            "AND reason LIKE '%%lost%%'");
    if (n != 1)
        dump_log();
    ck_assert_int_eq(n, 1);
    ck_assert(logged("peer berlin (node 2) is lost: forwarding what this node has of it"));
    /* the other peer is not lost */
    ck_assert_int_eq(value("SELECT count(*) FROM aamm.replication_status WHERE peer_id = 3 AND "
                           "reason LIKE '%lost%'"),
                     0);
    ck_assert_int_eq(kill(agent, 0), 0); /* still running */
    aamm_test_stop(&agent, 10000);
}
END_TEST

/* Three nodes with consensus (bikes-agent's raft_address, raft_dir, bootstrap). Node 3's
 * agent dies for good; nodes 1 and 2 restart with `lost = 3`: whichever leads removes node 3
 * from the consensus members (its callback reports the committed change), and the other
 * does not (only the leader acts; node 3 is never added back). */
#define NCONS 3
static pid_t cons_agents[NCONS];
static char cons_conf[NCONS][600], cons_log[NCONS][600];

static void write_cons_conf(int i, const int *lport, const int *rport, const char *secret,
                            bool lost3)
{
    FILE *f = fopen(cons_conf[i], "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f,
            "node_id = %d\nnode_name = n%d\nconninfo = %s\ncluster = test\nsecret_file = %s\n"
            "listen = 127.0.0.1:%d\nraft_address = 127.0.0.1:%d\nraft_dir = %s/raft%d\n"
            "bootstrap = yes\nstatus_interval = 1\n",
            i + 1, i + 1, pgfx_conninfo(fx, i), secret, lport[i], rport[i], pgfx_root(fx), i + 1);
    for (int k = 0; k < NCONS; k++) {
        if (k == i)
            continue;
        fprintf(f, "peer = %d n%d 127.0.0.1:%d raft 127.0.0.1:%d\n", k + 1, k + 1, lport[k],
                rport[k]);
        if (k == 2 && lost3)
            fprintf(f, "lost = 3\n");
    }
    ck_assert_int_eq(fclose(f), 0);
}

START_TEST(lost_member_removed)
{
    int lport[NCONS], rport[NCONS];
    char secret[640];
    snprintf(secret, sizeof secret, "%s/cluster.secret", pgfx_root(fx));
    int fd = open(secret, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, "a-secret-of-more-than-16-bytes\n", 31), 31);
    close(fd);
    for (int i = 0; i < NCONS; i++) {
        char err[512];
        PGconn *c = pgfx_connect(fx, i);
        ck_assert_ptr_nonnull(c);
        ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "%s", err);
        ck_assert_int_eq(pgfx_exec_conn(c, "CREATE TABLE t (id int PRIMARY KEY)"), 0);
        ck_assert_msg(aamm_node_replicate_table(c, "public", "t", NULL, "aamm", err,
                                                sizeof err) == 0,
                      "%s", err);
        PQfinish(c);
        lport[i] = aamm_test_free_port();
        rport[i] = aamm_test_free_port();
        snprintf(cons_conf[i], sizeof cons_conf[i], "%s/n%d.conf", pgfx_root(fx), i + 1);
        snprintf(cons_log[i], sizeof cons_log[i], "%s/n%d.log", pgfx_root(fx), i + 1);
    }
    for (int i = 0; i < NCONS; i++) {
        write_cons_conf(i, lport, rport, secret, false);
        cons_agents[i] = start_agent_with(cons_conf[i], cons_log[i], "run", NULL);
    }
    /* every node streams both ways with both peers */
    for (int i = 0; i < NCONS; i++)
        ck_assert_msg(pgfx_wait_long(fx, i, NCONS - 1, 60000,
                                     "SELECT count(*) FROM aamm.replication_status WHERE "
                                     "out_state = 'streaming' AND in_state = 'streaming'") ==
                          NCONS - 1,
                      "node %d: streams not up", i + 1);
    /* node 3 is gone for good; the survivors restart declaring it lost */
    aamm_test_kill(&cons_agents[2]);
    for (int i = 0; i < 2; i++) {
        aamm_test_stop(&cons_agents[i], 10000);
        write_cons_conf(i, lport, rport, secret, true);
        cons_agents[i] = start_agent_with(cons_conf[i], cons_log[i], "run", NULL);
    }
    int64_t end = aamm_test_now_ms() + 60000;
    int removed = -1;
    while (removed < 0 && aamm_test_now_ms() < end) {
        for (int i = 0; i < 2 && removed < 0; i++)
            if (strstr(output_of(cons_log[i]), "consensus: lost node 3 removed from the members"))
                removed = i;
        usleep(200000);
    }
    if (removed < 0)
        for (int i = 0; i < 2; i++)
            fprintf(stderr, "node %d's agent said:\n%s\n", i + 1, output_of(cons_log[i]));
    ck_assert_msg(removed >= 0, "node 3 was not removed from consensus");
    /* the other survivor did not remove it too, and nobody added it back */
    usleep(2000000);
    ck_assert_ptr_null(strstr(output_of(cons_log[1 - removed]), "lost node 3 removed"));
    for (int i = 0; i < 2; i++) {
        const char *out = output_of(cons_log[i]);
        ck_assert_ptr_null(strstr(out, "adding node 3"));
        ck_assert_ptr_nonnull(strstr(out, "peer n3 (node 3) is lost"));
    }
    for (int i = 0; i < 2; i++)
        aamm_test_stop(&cons_agents[i], 10000);
}
END_TEST

static void setup3(void)
{
    fx = pgfx_start(NCONS, NULL);
    ck_assert_ptr_nonnull(fx);
    for (int i = 0; i < NCONS; i++)
        cons_agents[i] = 0;
}

static void teardown3(void)
{
    for (int i = 0; i < NCONS; i++)
        aamm_test_kill(&cons_agents[i]);
    pgfx_destroy(fx);
    fx = NULL;
}

static void setup(void)
{
    fx = pgfx_start(1, NULL);
    ck_assert_ptr_nonnull(fx);
    char err[512];
    PGconn *c = pgfx_connect(fx, 0);
    ck_assert_ptr_nonnull(c);
    ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "%s", err);
    PQfinish(c);
    snprintf(conf, sizeof conf, "%s/bikes.conf", pgfx_root(fx));
    snprintf(agent_log, sizeof agent_log, "%s/bikes-agent.log", pgfx_root(fx));
    agent = 0;
}

static void teardown(void)
{
    aamm_test_kill(&agent);
    pgfx_destroy(fx);
    fx = NULL;
}

int main(void)
{
    Suite *s = suite_create("bikes_part");
    TCase *tc = aamm_test_tcase("part_command", 120);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, part_command);
    suite_add_tcase(s, tc);
    tc = aamm_test_tcase("lost_key", 120);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, lost_key);
    suite_add_tcase(s, tc);
    tc = aamm_test_tcase("lost_member_removed", 180);
    tcase_add_checked_fixture(tc, setup3, teardown3);
    tcase_add_test(tc, lost_member_removed);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
