/* bench_replicator.c: what replication costs a writer, and how far behind the peer is,
 * under a steady pgbench TPC-B-like load, in one run on this machine, side by side:
 *
 *   standalone  node A alone: pgbench, nothing replicating;
 *   native      node A publishes the pgbench tables, node B subscribes (PostgreSQL's own
 *               logical replication, asynchronous apply: the subscription default);
 *   replicator  two libaamm replicators (A and B, each in its own forked agent process,
 *               default options: apply commits asynchronously) replicate the same tables.
 *
 * Each mode gets fresh clusters and the same load: `pgbench -i -s SCALE*10` on every node,
 * then `pgbench -c 8 -j 2 -T SECONDS -n` on A (AAMM_BENCH_SECONDS, default 30;
 * AAMM_BENCH_SCALE, default 1). Lag is measured by the bench's own poll loop (not pgbench):
 * a probe connection on A sets hb.ts = clock_timestamp() every 100 ms, a probe on B reads
 * the row every 10 ms, and each heartbeat seen on B gives B's clock_timestamp() at the read
 * minus the ts written (both servers run on this machine: one clock). The 10 ms polling
 * adds 0..10 ms (5 on average) to every sample, for both modes alike. The backlog figure is
 * the lag of the last heartbeat written before pgbench ended: a backlog that grew through
 * the run shows there, however the percentiles look.
 *
 * Prints BENCH lines: writer TPS ratios against standalone, lag p50/p99 and the end
 * backlog for both modes, the share of the run's transactions B had applied when pgbench
 * ended (*_applied_by_end: pgbench_history rows on B / on A), and CPU per writer
 * transaction, counted until the last heartbeat reached B (both agents' utime+stime; the
 * servers' walsender and applier backends as a separate figure, for native too).
 * BENCH_DEBUG=1: a status line per second on stderr (replicator: B's
 * aamm.replication_status in_lag_ms / in_pending; native: pg_stat_subscription).
 * BENCH_AGENT_LOG=<path>: the agents' stderr (AAMM_DEBUG logs) goes there.
 * BENCH_MODES: a subset of "standalone,native,replicator" (default: all three).
 * For investigation only (the figures are not the issue's load then): BENCH_PGBENCH_RATE=<tps>
 * throttles pgbench (-R), BENCH_EXTRA_CONF adds postgresql.conf lines on every node.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include <aamm/aamm.h>
#include <aamm/node.h>
#include <aamm/replicator.h>

#include "pgfixture.h"

#define ROLE "aamm_apply"
#define HB_EVERY_MS 100
#define POLL_EVERY_MS 10
#define DRAIN_LIMIT_S 120 /* how long the end backlog may take to reach B */

enum mode { STANDALONE, NATIVE, REPLICATOR };
static const char *const mode_name[] = {"standalone", "native", "replicator"};

static struct pgfx *fx;
static pid_t agents[2];
static pid_t pgbench_pid; /* the forked runner: leader of a process group with pgbench */
static const char secret[] = "0123456789abcdef-bench-replicator";
static int link_ports[2];

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- processes: every one started here is ended here by its pid ---------------------- */

static void end_pid(pid_t *pid, bool group, int grace_ms)
{
    if (*pid <= 0)
        return;
    kill(group ? -*pid : *pid, SIGTERM);
    for (int waited = 0; waited < grace_ms; waited += 20) {
        if (waitpid(*pid, NULL, WNOHANG) == *pid) {
            if (group)
                kill(-*pid, SIGKILL); /* what is left of the group (runuser's child) */
            *pid = 0;
            return;
        }
        usleep(20000);
    }
    kill(group ? -*pid : *pid, SIGKILL);
    waitpid(*pid, NULL, 0);
    *pid = 0;
}

static void cleanup(void)
{
    end_pid(&pgbench_pid, true, 2000);
    for (int i = 0; i < 2; i++)
        end_pid(&agents[i], false, 3000);
    pgfx_destroy(fx);
    fx = NULL;
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "bench_replicator: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    cleanup();
    exit(1);
}

static void on_signal(int sig)
{
    /* interrupted: the same cleanup as a failure (pids, then the clusters) */
    signal(sig, SIG_DFL);
    cleanup();
    _exit(128 + sig);
}

static void exec(int node, const char *sql)
{
    if (pgfx_exec(fx, node, "%s", sql) != 0)
        die("node %c: %s", 'A' + node, sql);
}

/* CPU seconds a process has used so far (0 when it is gone or @pid is 0) */
static double proc_cpu(long pid)
{
    char path[64], buf[1024];
    if (pid <= 0)
        return 0;
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* fields 14, 15 (utime, stime) after the command name */
    unsigned long ut = 0, st = 0;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
        return 0;
    return (double)(ut + st) / (double)sysconf(_SC_CLK_TCK);
}

/* Seconds a process has waited on a run queue for a CPU so far (/proc/<pid>/schedstat:
 * on-CPU ns, run-queue wait ns, timeslices); 0 when unknown */
static double proc_wait(long pid)
{
    char path[64];
    unsigned long long on = 0, wait = 0;
    if (pid <= 0)
        return 0;
    snprintf(path, sizeof path, "/proc/%ld/schedstat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    if (fscanf(f, "%llu %llu", &on, &wait) != 2)
        wait = 0;
    fclose(f);
    return (double)wait / 1e9;
}

/* the WAL position of node @i in bytes */
static double wal_pos(int i)
{
    char *v = pgfx_value(fx, i, "SELECT pg_current_wal_lsn() - '0/0'");
    double d = v ? atof(v) : 0;
    free(v);
    return d;
}

/* ---- the agent: a forked process running one replicator (as a host would) ------------ */

static volatile int agent_stop;
static void on_term(int sig)
{
    (void)sig;
    agent_stop = 1;
}

/* BENCH_AGENT_LOG: the library's log lines with wall-clock microseconds and the agent */
static void agent_log(int level, const char *file, int line, const char *msg, void *arg)
{
    struct timespec w;
    (void)level;
    clock_gettime(CLOCK_REALTIME, &w);
    fprintf(stderr, "%lld.%06ld %c %s (%s:%d)\n", (long long)w.tv_sec, w.tv_nsec / 1000,
            *(const char *)arg, msg, file, line);
}

static void agent_main(int i)
{
    struct aamm_replicator_options o;
    struct aamm_replicator_peer peer;
    char lport[16], pport[16], err[512], apply_ci[512];
    struct aamm_replicator *r;
    int k = 1 - i;
    /* A session of its own, as a deployed agent has (a service: its own session and
     * cgroup): with the kernel's autogroup scheduling (sched_autogroup_enabled, on here) a
     * session shares one CPU share, and the agents would otherwise share one with the
     * bench and pgbench's client threads, while every PostgreSQL backend (native's
     * walsender and apply worker among them) is a session of its own. */
    setsid();
    signal(SIGTERM, on_term);
    signal(SIGINT, SIG_IGN);
    const char *log = getenv("BENCH_AGENT_LOG");
    if (log && *log) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
            dup2(fd, 2);
            close(fd);
        }
        static char who[2];
        who[0] = (char)('A' + i);
        const char *lv = getenv("AAMM_DEBUG");
        aamm_set_log_cb(agent_log, lv && *lv ? atoi(lv) : AAMM_LOG_INFO, who);
    }
    /* default options: only what a deployment must say (identity, addresses, secret) */
    aamm_replicator_options_init(&o);
    o.node_id = (uint32_t)i + 1;
    o.node_name = i == 0 ? "A" : "B";
    o.conninfo = pgfx_conninfo(fx, i);
    snprintf(apply_ci, sizeof apply_ci, "%s", pgfx_conninfo_with(fx, i, "user=" ROLE));
    o.apply_conninfo = apply_ci;
    o.cluster = "bench";
    o.secret = (const uint8_t *)secret;
    o.secret_len = sizeof secret - 1;
    snprintf(lport, sizeof lport, "%d", link_ports[i]);
    snprintf(pport, sizeof pport, "%d", link_ports[k]);
    o.listen_host = "127.0.0.1";
    o.listen_port = lport;
    peer = (struct aamm_replicator_peer){(uint32_t)k + 1, k == 0 ? "A" : "B", "127.0.0.1",
                                         pport, NULL};
    o.peers = &peer;
    o.npeers = 1;
    if (aamm_replicator_new(&r, &o, err, sizeof err) != 0) {
        fprintf(stderr, "agent %c: %s\n", 'A' + i, err);
        _exit(2);
    }
    if (aamm_replicator_start(r) != 0) {
        fprintf(stderr, "agent %c: start: %s\n", 'A' + i, aamm_replicator_errmsg(r));
        _exit(3);
    }
    while (!agent_stop) {
        if (aamm_replicator_run(r, 1000, &agent_stop) != 0) {
            fprintf(stderr, "agent %c: %s\n", 'A' + i, aamm_replicator_errmsg(r));
            _exit(4);
        }
    }
    aamm_replicator_stop(r, 2000);
    aamm_replicator_free(r);
    _exit(0);
}

static pid_t spawn(void (*fn)(int), int arg)
{
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0)
        die("fork: %s", strerror(errno));
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive the bench */
        fn(arg);
        _exit(0);
    }
    return pid;
}

/* A TCP port on 127.0.0.1 that was free a moment ago, not the one handed out before
 * (testutil's helper asserts with Check, which needs a running test) */
static int free_port(void)
{
    static int last;
    for (int tries = 0; tries < 100; tries++) {
        struct sockaddr_in sa;
        socklen_t len = sizeof sa;
        int fd = socket(AF_INET, SOCK_STREAM, 0), port = 0;
        if (fd < 0)
            die("socket: %s", strerror(errno));
        memset(&sa, 0, sizeof sa);
        sa.sin_family = AF_INET;
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (bind(fd, (struct sockaddr *)&sa, sizeof sa) == 0 &&
            getsockname(fd, (struct sockaddr *)&sa, &len) == 0)
            port = ntohs(sa.sin_port);
        close(fd);
        if (port > 0 && port != last)
            return last = port;
    }
    die("no free port");
}

/* ---- pgbench ----------------------------------------------------------------------- */

static long bench_seconds(void)
{
    const char *v = getenv("AAMM_BENCH_SECONDS");
    long s = v && *v ? atol(v) : 30;
    return s > 0 ? s : 30;
}

static int bench_scale(void)
{
    const char *v = getenv("AAMM_BENCH_SCALE");
    double s = v && *v ? atof(v) : 1.0;
    int sc = (int)lround(10 * s);
    return sc > 0 ? sc : 1;
}

static char pgbench_log[600];

static void pgbench_argv(int node, const char **argv, char *port, size_t portsz, char *arg,
                         size_t argsz, bool init)
{
    int n = 0;
    snprintf(port, portsz, "%d", pgfx_port(fx, node));
    argv[n++] = "pgbench";
    if (init) {
        snprintf(arg, argsz, "%d", bench_scale());
        argv[n++] = "-i";
        argv[n++] = "-q";
        argv[n++] = "-s";
        argv[n++] = arg;
    } else {
        snprintf(arg, argsz, "%ld", bench_seconds());
        argv[n++] = "-n";
        argv[n++] = "-c";
        argv[n++] = "8";
        argv[n++] = "-j";
        argv[n++] = "2";
        argv[n++] = "-T";
        argv[n++] = arg;
        const char *rate = getenv("BENCH_PGBENCH_RATE");
        if (rate && *rate) {
            argv[n++] = "-R";
            argv[n++] = rate;
        }
    }
    argv[n++] = "-h";
    argv[n++] = pgfx_sockdir(fx, node);
    argv[n++] = "-p";
    argv[n++] = port;
    argv[n++] = "-U";
    argv[n++] = "postgres";
    argv[n++] = "postgres";
    argv[n] = NULL;
}

/* The pgbench tables on @node, and the heartbeat table. pgbench_history has no primary
 * key, and libaamm replicates only tables with one: every mode (native included, so the
 * comparison is fair: same tables, same indexes, same writer work) adds `hid bigserial
 * primary key` on every node. */
static void schema(int node)
{
    const char *argv[24];
    char port[16], arg[32];
    pgbench_argv(node, argv, port, sizeof port, arg, sizeof arg, true);
    if (pgfx_run(argv, NULL) != 0)
        die("pgbench -i on node %c", 'A' + node);
    exec(node, "ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY");
    exec(node, "CREATE TABLE hb (id int PRIMARY KEY, ts timestamptz)");
}

static void pgbench_child(int node)
{
    const char *argv[24];
    char port[16], arg[32];
    setpgid(0, 0); /* its own group: ended with runuser and pgbench by one kill */
    pgbench_argv(node, argv, port, sizeof port, arg, sizeof arg, false);
    _exit(pgfx_run(argv, pgbench_log) == 0 ? 0 : 1);
}

/* "tps = 1234.5 (without initial connection time)" and the transaction count */
static void pgbench_result(double *tps, long *txns)
{
    char line[512];
    FILE *f = fopen(pgbench_log, "r");
    *tps = 0;
    *txns = 0;
    if (!f)
        die("no pgbench log %s", pgbench_log);
    while (fgets(line, sizeof line, f)) {
        double v;
        long n;
        if (sscanf(line, "tps = %lf", &v) == 1)
            *tps = v;
        else if (sscanf(line, "number of transactions actually processed: %ld", &n) == 1)
            *txns = n;
    }
    fclose(f);
    if (*tps <= 0 || *txns <= 0)
        die("pgbench printed no result (see %s)", pgbench_log);
}

/* ---- the probes: one poll loop, asynchronous queries on A and B ---------------------- */

struct probe {
    PGconn *c;
    bool busy;
    int64_t due; /* monotonic ms of the next query */
};

static PGconn *probe_connect(int node)
{
    PGconn *c = pgfx_connect(fx, node);
    if (!c)
        die("probe connection to node %c", 'A' + node);
    if (PQsetnonblocking(c, 1) != 0)
        die("PQsetnonblocking");
    return c;
}

static void probe_send(struct probe *p, const char *sql)
{
    if (!PQsendQuery(p->c, sql))
        die("probe: %s", PQerrorMessage(p->c));
    while (PQflush(p->c) == 1)
        usleep(100);
    p->busy = true;
}

/* Read what arrived; returns true and the first column pair of the answer (as int64) once
 * the query is complete. */
static bool probe_read(struct probe *p, int64_t *v0, int64_t *v1, bool *got)
{
    *got = false;
    if (!PQconsumeInput(p->c))
        die("probe: %s", PQerrorMessage(p->c));
    if (PQisBusy(p->c))
        return false;
    PGresult *res;
    while ((res = PQgetResult(p->c)) != NULL) {
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_TUPLES_OK && PQntuples(res) == 1) {
            *v0 = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
            *v1 = PQnfields(res) > 1 ? strtoll(PQgetvalue(res, 0, 1), NULL, 10) : 0;
            *got = true;
        } else if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
            die("probe: %s", PQresultErrorMessage(res));
        }
        PQclear(res);
        if (PQisBusy(p->c))
            return false; /* wait for the rest */
    }
    p->busy = false;
    return true;
}

struct run {
    double tps;
    long txns;
    double *lag; /* ms, one per heartbeat seen on B while pgbench ran */
    size_t nlag, caplag;
    long written, seen;
    double backlog_end_ms;
    double agent_cpu_s;  /* both agents (replicator mode) */
    double agent_a_cpu_s; /* of which A's (capture, sending) */
    double stale_end_ms; /* how old B's view of A was when pgbench ended */
    double server_cpu_s; /* A's walsender + B's applier backend */
    double walsender_cpu_s; /* of which A's walsender */
    double wait_s[4]; /* run-queue wait: agent A, agent B, A's walsender, B's applier */
    double wal_bytes; /* WAL node A wrote during the run */
    long hist_a, hist_b; /* pgbench_history rows on A and B when pgbench ended */
    double first_third_ms, last_third_ms; /* mean lag early and late in the run */
};

static void lag_add(struct run *r, double ms)
{
    if (r->nlag == r->caplag) {
        r->caplag = r->caplag ? 2 * r->caplag : 512;
        r->lag = realloc(r->lag, r->caplag * sizeof *r->lag);
        if (!r->lag)
            die("out of memory");
    }
    r->lag[r->nlag++] = ms;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* nearest-rank percentile of the sorted samples */
static double pct(const double *v, size_t n, double q)
{
    if (n == 0)
        return NAN;
    size_t k = (size_t)ceil(q * (double)n);
    return v[k ? k - 1 : 0];
}

static void debug_status(enum mode m)
{
    char *s = NULL;
    if (m == REPLICATOR)
        s = pgfx_value(fx, 1,
                       "SELECT format('B in: %%s lag %%s ms pending %%s rate %%s/s recv %%s "
                       "applied %%s', in_state, in_lag_ms, in_pending, round(in_txn_rate), "
                       "in_received_lsn, in_applied_lsn) FROM aamm.replication_status");
    else if (m == NATIVE)
        s = pgfx_value(fx, 1,
                       "SELECT format('B sub: received %%s, latest end %%s, send->recv %%s', "
                       "received_lsn, latest_end_lsn, last_msg_receipt_time - "
                       "last_msg_send_time) FROM pg_stat_subscription WHERE relid IS NULL");
    char *a = pgfx_value(fx, 0, "SELECT pg_current_wal_lsn()::text");
    fprintf(stderr, "dbg %s: A wal %s; %s\n", mode_name[m], a ? a : "?", s ? s : "?");
    free(s);
    free(a);
}

/* The measured run: pgbench on A for AAMM_BENCH_SECONDS while the probes beat and poll,
 * then the drain of the last heartbeat (bounded). */
static void measure(enum mode m, struct run *r, long apid[2], long spid, long wpid)
{
    struct probe pa = {probe_connect(0), false, 0}, pb = {NULL, false, 0};
    bool replicating = m != STANDALONE;
    if (replicating)
        pb.c = probe_connect(1);
    double c0 = proc_cpu(apid[0]) + proc_cpu(apid[1]), ca0 = proc_cpu(apid[0]);
    double s0 = proc_cpu(spid) + proc_cpu(wpid), w0 = proc_cpu(spid);
    long wpids[4] = {apid[0], apid[1], spid, wpid};
    double wal0 = wal_pos(0);
    double q0[4];
    for (int k = 0; k < 4; k++)
        q0[k] = proc_wait(wpids[k]);
    int64_t last_written = 0, last_seen = 0;
    double last_seen_lag = 0;
    long seconds = bench_seconds();
    int64_t t0 = mono_ms(), hard_end = t0 + (seconds + 60) * 1000, drain_end = 0,
            next_dbg = t0 + 1000;
    bool running = true;
    if (replicating) /* the row as set up: not a heartbeat of the run */
        last_seen = pgfx_value_long(fx, 1, 0, "SELECT (extract(epoch FROM ts) * 1000000)::bigint "
                                              "FROM hb WHERE id = 1");
    snprintf(pgbench_log, sizeof pgbench_log, "%s/pgbench-%s.log", pgfx_root(fx), mode_name[m]);
    pgbench_pid = spawn(pgbench_child, 0);
    setpgid(pgbench_pid, pgbench_pid); /* as the child does: a kill right away finds the group */
    pa.due = pb.due = t0;
    for (;;) {
        int64_t now = mono_ms();
        if (running) {
            int st;
            if (waitpid(pgbench_pid, &st, WNOHANG) == pgbench_pid) {
                pgbench_pid = 0;
                if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
                    die("pgbench failed (see %s)", pgbench_log);
                running = false;
                drain_end = now + DRAIN_LIMIT_S * 1000;
                /* B shows heartbeat last_seen: A wrote it (wall clock) that long ago */
                {
                    struct timespec w;
                    clock_gettime(CLOCK_REALTIME, &w);
                    int64_t us = (int64_t)w.tv_sec * 1000000 + w.tv_nsec / 1000;
                    r->stale_end_ms = replicating ? (double)(us - last_seen) / 1000.0 : 0;
                }
                /* every pgbench transaction inserts one history row: how many B had */
                if (replicating) {
                    r->hist_b = pgfx_value_long(fx, 1, 0, "SELECT count(*) FROM pgbench_history");
                    r->hist_a = pgfx_value_long(fx, 0, 0, "SELECT count(*) FROM pgbench_history");
                }
                r->wal_bytes = wal_pos(0) - wal0;
                for (int k = 0; k < 4; k++)
                    r->wait_s[k] = proc_wait(wpids[k]) - q0[k];
            } else if (now > hard_end) {
                die("pgbench ran past %ld s", seconds + 60);
            }
        }
        if (!running) {
            /* the last heartbeat (written before pgbench ended) has reached B: its lag
             * when B first showed it is the backlog at the end of the run */
            if (!replicating || (!pa.busy && last_seen >= last_written)) {
                r->backlog_end_ms = last_seen_lag;
                break;
            }
            if (now > drain_end) {
                fprintf(stderr, "bench_replicator: %s: last heartbeat not on B after %d s\n",
                        mode_name[m], DRAIN_LIMIT_S);
                r->backlog_end_ms = DRAIN_LIMIT_S * 1000.0;
                break;
            }
        }
        if (getenv("BENCH_DEBUG") && now >= next_dbg) {
            debug_status(m);
            next_dbg = now + 1000;
        }
        /* heartbeat on A: beats only while pgbench runs */
        if (running && !pa.busy && now >= pa.due) {
            probe_send(&pa, "UPDATE hb SET ts = clock_timestamp() WHERE id = 1 RETURNING "
                            "(extract(epoch FROM ts) * 1000000)::bigint");
            pa.due = pa.due + HB_EVERY_MS > now ? pa.due + HB_EVERY_MS : now + HB_EVERY_MS;
        }
        if (replicating && !pb.busy && now >= pb.due) {
            probe_send(&pb, "SELECT (extract(epoch FROM ts) * 1000000)::bigint, "
                            "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint "
                            "FROM hb WHERE id = 1");
            pb.due = now + POLL_EVERY_MS;
        }
        struct pollfd fds[2];
        int nf = 0, ia = -1, ib = -1;
        if (pa.busy) {
            ia = nf;
            fds[nf++] = (struct pollfd){PQsocket(pa.c), POLLIN, 0};
        }
        if (pb.busy) {
            ib = nf;
            fds[nf++] = (struct pollfd){PQsocket(pb.c), POLLIN, 0};
        }
        int64_t wake = now + 50;
        if (running && !pa.busy && pa.due < wake)
            wake = pa.due;
        if (replicating && !pb.busy && pb.due < wake)
            wake = pb.due;
        int to = wake > now ? (int)(wake - now) : 0;
        if (poll(fds, (nfds_t)nf, to) < 0 && errno != EINTR)
            die("poll: %s", strerror(errno));
        int64_t v0, v1;
        bool got;
        if (ia >= 0 && (fds[ia].revents & (POLLIN | POLLERR | POLLHUP)) &&
            probe_read(&pa, &v0, &v1, &got) && got) {
            last_written = v0;
            if (running)
                r->written++;
        }
        if (ib >= 0 && (fds[ib].revents & (POLLIN | POLLERR | POLLHUP)) &&
            probe_read(&pb, &v0, &v1, &got) && got && v0 != last_seen) {
            last_seen = v0;
            last_seen_lag = (double)(v1 - v0) / 1000.0;
            if (getenv("BENCH_DEBUG") && last_seen_lag > 50)
                fprintf(stderr, "dbg hb: written %.6f seen %.6f lag %.1f ms\n", (double)v0 / 1e6,
                        (double)v1 / 1e6, last_seen_lag);
            if (running) {
                lag_add(r, last_seen_lag);
                r->seen++;
            }
        }
    }
    /* CPU until the last heartbeat reached B: every transaction of the run is replicated
     * then (what a lagging side has not done yet by the end of pgbench is counted too) */
    r->agent_cpu_s = proc_cpu(apid[0]) + proc_cpu(apid[1]) - c0;
    r->agent_a_cpu_s = proc_cpu(apid[0]) - ca0;
    r->server_cpu_s = proc_cpu(spid) + proc_cpu(wpid) - s0;
    r->walsender_cpu_s = proc_cpu(spid) - w0;
    /* the lag early and late in the run: equal when the backlog held steady */
    if (r->nlag >= 3) {
        size_t third = r->nlag / 3;
        double a = 0, b = 0;
        for (size_t i = 0; i < third; i++) {
            a += r->lag[i];
            b += r->lag[r->nlag - 1 - i];
        }
        r->first_third_ms = a / (double)third;
        r->last_third_ms = b / (double)third;
    }
    PQfinish(pa.c);
    if (pb.c)
        PQfinish(pb.c);
    pgbench_result(&r->tps, &r->txns);
}

/* ---- one mode, on fresh clusters ----------------------------------------------------- */

static const char *const tables[] = {"pgbench_accounts", "pgbench_branches", "pgbench_tellers",
                                     "pgbench_history", "hb"};

/* Node B loaded the same pgbench rows itself (pgbench -i is deterministic), as an initial
 * copy would have left them. Under libaamm they are rewritten under A's origin, so A's
 * updates of them are not update_origin_differs conflicts (a real initial sync writes them
 * that way); native gets the same rewrite without an origin, so B's tables have the same
 * shape and bloat in both modes. */
static void rewrite_b(bool with_origin)
{
    PGconn *o = pgfx_connect(fx, 1);
    if (!o)
        die("connect B");
    if ((with_origin &&
         (pgfx_exec_conn(o, "SELECT pg_replication_origin_create('aamm_from_1')") ||
          pgfx_exec_conn(o, "SELECT pg_replication_origin_session_setup('aamm_from_1')"))) ||
        pgfx_exec_conn(o, "UPDATE pgbench_accounts SET abalance = abalance") ||
        pgfx_exec_conn(o, "UPDATE pgbench_tellers SET tbalance = tbalance") ||
        pgfx_exec_conn(o, "UPDATE pgbench_branches SET bbalance = bbalance"))
        die("rewrite B");
    PQfinish(o);
}

static long wait_value(int node, long want, int timeout_s, const char *what, const char *sql)
{
    int64_t end = mono_ms() + timeout_s * 1000;
    long v;
    while ((v = pgfx_value_long(fx, node, -1, "%s", sql)) != want) {
        if (mono_ms() > end)
            die("%s: not within %d s (%ld, want %ld)", what, timeout_s, v, want);
        usleep(20000);
    }
    return v;
}

static void run_mode(enum mode m, struct run *r)
{
    char conf[1024], err[1024];
    long apid[2] = {0, 0}, spid = 0, wpid = 0;
    int nnodes = m == STANDALONE ? 1 : 2;
    /* the same server settings in every mode (the fixture adds fsync = off) */
    snprintf(conf, sizeof conf,
             "shared_buffers = 256MB\nmax_wal_size = 4GB\nmax_locks_per_transaction = 256\n%s\n",
             getenv("BENCH_EXTRA_CONF") ? getenv("BENCH_EXTRA_CONF") : "");
    fprintf(stderr, "bench_replicator: %s: clusters, pgbench -i -s %d\n", mode_name[m],
            bench_scale());
    fx = pgfx_start(nnodes, conf);
    if (!fx)
        die("start clusters");
    for (int i = 0; i < nnodes; i++)
        schema(i);
    if (m == NATIVE) {
        rewrite_b(false);
        exec(0, "CREATE PUBLICATION pub FOR TABLE pgbench_accounts, pgbench_branches, "
                "pgbench_tellers, pgbench_history, hb");
        char sub[1024];
        snprintf(sub, sizeof sub,
                 "CREATE SUBSCRIPTION sub CONNECTION '%s' PUBLICATION pub WITH (copy_data = "
                 "false)",
                 pgfx_conninfo(fx, 0));
        exec(1, sub);
    } else if (m == REPLICATOR) {
        for (int i = 0; i < 2; i++) {
            PGconn *c = pgfx_connect(fx, i);
            if (!c || aamm_node_install(c, err, sizeof err) != 0 ||
                aamm_node_create_apply_role(c, ROLE, NULL, err, sizeof err) != 0)
                die("node %c: %s", 'A' + i, c ? err : "connect");
            for (size_t k = 0; k < sizeof tables / sizeof *tables; k++)
                if (aamm_node_replicate_table(c, "public", tables[k], ROLE, "aamm", err,
                                              sizeof err) != 0)
                    die("node %c: %s", 'A' + i, err);
            PQfinish(c);
        }
        rewrite_b(true);
        link_ports[0] = free_port();
        link_ports[1] = free_port();
        for (int i = 0; i < 2; i++)
            agents[i] = spawn(agent_main, i);
        /* slots first: writes from then on reach the peer */
        wait_value(0, 1, 60, "slot aamm_to_2 on A",
                   "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'aamm_to_2'");
        wait_value(1, 1, 60, "slot aamm_to_1 on B",
                   "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'aamm_to_1'");
        apid[0] = agents[0];
        apid[1] = agents[1];
        fprintf(stderr, "bench_replicator: agent A pid %ld, agent B pid %ld\n", apid[0],
                apid[1]);
    }
    for (int i = 0; i < nnodes; i++)
        exec(i, "VACUUM ANALYZE");
    exec(0, "INSERT INTO hb VALUES (1, clock_timestamp())");
    if (m != STANDALONE) {
        /* replication is live end to end before the clock starts */
        wait_value(1, 1, 60, "heartbeat row on B", "SELECT count(*) FROM hb");
        if (m == NATIVE) {
            spid = pgfx_value_long(fx, 0, 0,
                                   "SELECT active_pid FROM pg_replication_slots WHERE "
                                   "slot_name = 'sub'");
            wpid = pgfx_value_long(fx, 1, 0,
                                   "SELECT pid FROM pg_stat_subscription WHERE relid IS NULL "
                                   "AND pid IS NOT NULL LIMIT 1");
        } else {
            spid = pgfx_value_long(fx, 0, 0,
                                   "SELECT active_pid FROM pg_replication_slots WHERE "
                                   "slot_name = 'aamm_to_2'");
            wpid = pgfx_value_long(fx, 1, 0,
                                   "SELECT pid FROM pg_stat_activity WHERE usename = '" ROLE
                                   "' AND backend_type = 'client backend' LIMIT 1");
        }
    }
    for (int i = 0; i < nnodes; i++)
        exec(i, "CHECKPOINT");
    fprintf(stderr, "bench_replicator: %s: pgbench -c 8 -j 2 -T %ld on A\n", mode_name[m],
            bench_seconds());
    measure(m, r, apid, spid, wpid);
    qsort(r->lag, r->nlag, sizeof *r->lag, cmp_double);
    if (m == REPLICATOR) {
        char *c = pgfx_value(fx, 1, "SELECT conflicts::text FROM aamm.replication_status");
        fprintf(stderr, "bench_replicator: replicator: conflicts on B: %s\n", c ? c : "?");
        free(c);
    }
    fprintf(stderr,
            "bench_replicator: %s: %.1f tps, %ld txns; heartbeats written %ld seen %ld; lag "
            "p50 %.1f p90 %.1f p99 %.1f max %.1f ms; mean first third %.1f last third %.1f "
            "ms; end backlog %.1f ms (B's view %.1f ms old when pgbench ended); agents %.2f s "
            "CPU (A %.2f), walsender+applier %.2f s CPU (walsender %.2f)\n",
            mode_name[m], r->tps, r->txns, r->written, r->seen, pct(r->lag, r->nlag, 0.5),
            pct(r->lag, r->nlag, 0.9), pct(r->lag, r->nlag, 0.99),
            r->nlag ? r->lag[r->nlag - 1] : NAN, r->first_third_ms, r->last_third_ms,
            r->backlog_end_ms, r->stale_end_ms, r->agent_cpu_s, r->agent_a_cpu_s,
            r->server_cpu_s, r->walsender_cpu_s);
    if (m != STANDALONE)
        fprintf(stderr, "bench_replicator: %s: when pgbench ended B had %ld of A's %ld history rows\n",
                mode_name[m], r->hist_b, r->hist_a);
    fprintf(stderr,
            "bench_replicator: %s: waited for a CPU during the run: agent A %.2f s, agent B "
            "%.2f s, walsender %.2f s, applier %.2f s; A wrote %.0f B of WAL per transaction\n",
            mode_name[m], r->wait_s[0], r->wait_s[1], r->wait_s[2], r->wait_s[3],
            r->wal_bytes / (double)r->txns);
    for (int i = 0; i < 2; i++)
        end_pid(&agents[i], false, 5000);
    pgfx_destroy(fx);
    fx = NULL;
}

static bool mode_wanted(enum mode m)
{
    const char *v = getenv("BENCH_MODES");
    return !v || !*v || strstr(v, mode_name[m]) != NULL;
}

int main(void)
{
    struct run res[3];
    memset(res, 0, sizeof res);
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    signal(SIGHUP, on_signal);
    for (int m = STANDALONE; m <= REPLICATOR; m++)
        if (mode_wanted((enum mode)m))
            run_mode((enum mode)m, &res[m]);
    const struct run *s = &res[STANDALONE], *n = &res[NATIVE], *l = &res[REPLICATOR];
    if (s->tps > 0)
        printf("BENCH standalone_writer_tps %.0f txn/s\n", s->tps);
    if (n->tps > 0) {
        printf("BENCH native_writer_tps %.0f txn/s\n", n->tps);
        if (s->tps > 0)
            printf("BENCH native_writer_ratio %.3f x\n", n->tps / s->tps);
        printf("BENCH native_lag_p50_ms %.1f ms\n", pct(n->lag, n->nlag, 0.5));
        printf("BENCH native_lag_p99_ms %.1f ms\n", pct(n->lag, n->nlag, 0.99));
        printf("BENCH native_backlog_end_ms %.1f ms\n", n->backlog_end_ms);
        if (n->hist_a > 0)
            printf("BENCH native_applied_by_end %.3f x\n", (double)n->hist_b / (double)n->hist_a);
        printf("BENCH native_server_cpu_ms_per_txn %.4f ms\n",
               n->server_cpu_s * 1000 / (double)n->txns);
    }
    if (l->tps > 0) {
        printf("BENCH replicator_writer_tps %.0f txn/s\n", l->tps);
        if (s->tps > 0)
            printf("BENCH replicator_writer_ratio %.3f x\n", l->tps / s->tps);
        printf("BENCH replicator_lag_p50_ms %.1f ms\n", pct(l->lag, l->nlag, 0.5));
        printf("BENCH replicator_lag_p99_ms %.1f ms\n", pct(l->lag, l->nlag, 0.99));
        printf("BENCH replicator_backlog_end_ms %.1f ms\n", l->backlog_end_ms);
        if (l->hist_a > 0)
            printf("BENCH replicator_applied_by_end %.3f x\n", (double)l->hist_b / (double)l->hist_a);
        printf("BENCH replicator_cpu_ms_per_txn %.4f ms\n",
               l->agent_cpu_s * 1000 / (double)l->txns);
        printf("BENCH replicator_server_cpu_ms_per_txn %.4f ms\n",
               l->server_cpu_s * 1000 / (double)l->txns);
    }
    for (int m = 0; m < 3; m++)
        free(res[m].lag);
    return 0;
}
