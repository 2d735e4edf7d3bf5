/* bench_apply.c: catch-up from a backlog, end to end libaamm capture -> wire (encoded
 * and decoded in process, as a link carries it) -> apply against PostgreSQL's native subscription,
 * between local clusters on this machine. Node 0 is the source; node 1 catches up through a native
 * subscription, node 2 through libaamm. Backlogs: bulk rows in 1,000-row transactions; pgbench
 * transactions; then bulk rows with 10% of the keys already present on the libaamm target
 * (conflicts, LWW, logged) against libaamm's own conflict-free bulk rate. Sizes scale with
 * AAMM_BENCH_SCALE (default 1: 1,000,000 rows, 100,000 pgbench txns); AAMM_BENCH_PGBENCH_ONLY=1
 * keeps the bulk backlog at its minimum and skips the conflict one. */
#include <inttypes.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/resource.h>
#include <unistd.h>

#include <libpq-fe.h>

#include <aamm/apply.h>
#include <aamm/capture.h>
#include <aamm/node.h>
#include <aamm/wire.h>

#include "pgfixture.h"

#define ROLE "aamm_apply"

/* The handle's counters (aamm_apply_stats), by value for assertions. */
static struct aamm_apply_stats apst(struct aamm_apply *ap)
{
    struct aamm_apply_stats st;
    aamm_apply_stats(ap, &st);
    return st;
}

static struct pgfx *fx;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    fprintf(stderr, "bench_apply: %s\n", what);
    pgfx_destroy(fx);
    exit(1);
}

static void exec(int node, const char *sql)
{
    if (pgfx_exec(fx, node, "%s", sql) != 0)
        die(sql);
}

static const char *tables[] = {"bulk",
                               "bulk2",
                               "pgbench_accounts",
                               "pgbench_branches",
                               "pgbench_tellers",
                               "pgbench_history",
                               "bench_marker"};

static void schema(int node)
{
    const char *argv[] = {
        "pgbench", "-i", "-q", "-s",       "1",        "-h", pgfx_sockdir(fx, node),
        "-p",      NULL, "-U", "postgres", "postgres", NULL};
    char port[16];
    snprintf(port, sizeof port, "%d", pgfx_port(fx, node));
    argv[8] = port;
    if (pgfx_run(argv, NULL) != 0)
        die("pgbench -i");
    exec(node, "ALTER TABLE pgbench_history ADD COLUMN hid bigserial PRIMARY KEY");
    exec(node, "CREATE TABLE bulk (id bigint PRIMARY KEY, v text, n int)");
    exec(node, "CREATE TABLE bulk2 (id bigint PRIMARY KEY, v text, n int)");
    exec(node, "CREATE TABLE bench_marker (id int PRIMARY KEY)");
}

/* one connection per node for polling: a new backend per poll would cost more CPU than
 * the query (and be charged to whichever side is catching up) */
static PGconn *pollconn[3];

static long marker_count(int node)
{
    if (!pollconn[node])
        pollconn[node] = pgfx_connect(fx, node);
    PGresult *res = PQexec(pollconn[node], "SELECT count(*) FROM bench_marker");
    long n = PQresultStatus(res) == PGRES_TUPLES_OK ? atol(PQgetvalue(res, 0, 0)) : -1;
    PQclear(res);
    return n;
}

/* CPU seconds a process has used so far (0 when it is gone) */
static double proc_cpu(long pid)
{
    char path[64], buf[1024];
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

static double self_cpu(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* where the CPU of a catch-up went, per 1,000 units (stderr: the wall-clock ratio is what
 * the issue asks for, this is the figure that noise on a shared machine moves least) */
static void cpu_report(const char *what, long units, double decoder, double applier, double client,
                       double wal)
{
    fprintf(stderr,
            "cpu %s: per 1000: walsender %.4f s, applier %.4f s, client %.4f s; target WAL "
            "%.0f kB\n",
            what, decoder * 1000 / (double)units, applier * 1000 / (double)units,
            client * 1000 / (double)units, wal / (double)units);
}

/* the WAL position of node @i in bytes */
static double wal_pos(int i)
{
    char *v = pgfx_value(fx, i, "SELECT pg_current_wal_lsn() - '0/0'");
    double d = v ? atof(v) : 0;
    free(v);
    return d;
}

/* Profiling hook: when the environment variable @var names catch-up @phase, run $@var_CMD
 * (default: a system-wide 3 s perf record into /tmp/aamm-bench.perf) in the background,
 * with the applying node's socket directory and port in BENCH_NODE_SOCK, BENCH_NODE_PORT. */
static void perf_hook(const char *var, long phase, int node)
{
    const char *v = getenv(var);
    if (!v || atol(v) != phase)
        return;
    char cmdvar[64], port[16];
    snprintf(cmdvar, sizeof cmdvar, "%s_CMD", var);
    snprintf(port, sizeof port, "%d", pgfx_port(fx, node));
    setenv("BENCH_NODE_SOCK", pgfx_sockdir(fx, node), 1);
    setenv("BENCH_NODE_PORT", port, 1);
    const char *cmd = getenv(cmdvar);
    if (system(cmd ? cmd
                   : "perf record -q -a -g -o /tmp/aamm-bench.perf -- sleep 3 >/dev/null 2>&1 &") !=
        0)
        fprintf(stderr, "bench_apply: %s did not start\n", cmd ? cmdvar : "perf");
}

/* the pid of the libaamm applier's backend on node 2 (0: not connected yet) */
static long applier_pid(void)
{
    return pgfx_value_long(fx, 2, 0,
                           "SELECT pid FROM pg_stat_activity WHERE usename = '" ROLE
                           "' AND backend_type = 'client backend' LIMIT 1");
}

/* ---- libaamm: capture (node 0, slot aamm_to_3) -> apply (node 2) ------------------- */

static struct aamm_capture *cap;
static struct aamm_apply *ap;

static void open_capture(void)
{
    const char *pubs[1] = {"pub"};
    struct aamm_capture_options co = {0};
    char ci[512];
    snprintf(ci, sizeof ci, "%s", pgfx_conninfo(fx, 0));
    co.conninfo = ci;
    co.slot = "aamm_to_3";
    co.publications = pubs;
    co.npublications = 1;
    co.node_id = 1;
    if (aamm_capture_new(&cap, &co, NULL, 0) != 0 || aamm_capture_open(cap) != 0)
        die(cap ? aamm_capture_errmsg(cap) : "capture new");
}

static void dbg(const char *where)
{
    static double last_dbg;
    static long n;
    double t = now_s();
    n++;
    if (getenv("BENCH_DEBUG") && t - last_dbg > 1) {
        last_dbg = t;
        fprintf(stderr, "dbg %s: pending %zu committed %" PRIu64 " iterations %ld events %d\n",
                where, aamm_apply_pending(ap), apst(ap).committed, n, aamm_apply_events(ap));
        n = 0;
    }
}

/* run capture -> apply until the marker row count on node 2 reaches @want */
/* the wire between capture and apply: frames encoded as a link would send them (CRC,
 * LZ4 above the threshold, relation dictionary), decoded as the peer would */
static struct aamm_wire_encoder *enc;
static struct aamm_wire_decoder *dec;

static void apply_change_waiting(struct aamm_change *c)
{
    int arc;
    while ((arc = aamm_apply_change(ap, c)) == AAMM_EAGAIN) {
        if (aamm_apply_step(ap) != 0)
            die(aamm_apply_errmsg(ap));
        dbg("busy");
        struct pollfd p = {aamm_apply_fd(ap), POLLIN, 0};
        if (aamm_apply_events(ap) & AAMM_WRITE)
            p.events |= POLLOUT;
        poll(&p, 1, aamm_apply_timeout(ap) == 0 ? 0 : 1);
    }
    if (arc != 0)
        die(aamm_apply_errmsg(ap));
}

/* move every complete frame from the encoder through the decoder into apply */
static void pump_wire(void)
{
    for (;;) {
        size_t len = 0, acc = 0;
        const uint8_t *b = aamm_wire_encoder_pending(enc, &len);
        if (len == 0)
            return;
        if (aamm_wire_decoder_feed(dec, b, len, &acc) != 0)
            die(aamm_wire_decoder_errmsg(dec));
        aamm_wire_encoder_consume(enc, acc);
        struct aamm_wire_event ev;
        int rc;
        while ((rc = aamm_wire_decoder_next(dec, &ev)) == 0) {
            if (ev.kind == AAMM_WIRE_EV_BEGIN) {
                if (aamm_apply_begin(ap, &ev.txn) != 0)
                    die(aamm_apply_errmsg(ap));
            } else if (ev.kind == AAMM_WIRE_EV_CHANGE) {
                struct aamm_change c;
                if (aamm_wire_decoder_take_change(dec, &c) != 0)
                    die("take change");
                apply_change_waiting(&c);
                aamm_change_clear(&c);
            } else if (ev.kind == AAMM_WIRE_EV_COMMIT) {
                if (aamm_apply_commit(ap, &ev.txn) != 0)
                    die(aamm_apply_errmsg(ap));
            }
        }
        if (rc != AAMM_EAGAIN)
            die(aamm_wire_decoder_errmsg(dec));
    }
}

/* run capture -> wire -> apply until the marker row count on node 2 reaches @want */
static double libaamm_catch_up(long want, long units)
{
    double t0 = now_s(), last_check = 0;
    long wpid = applier_pid();
    long spid = pgfx_value_long(fx, 0, 0,
                                "SELECT active_pid FROM pg_replication_slots "
                                "WHERE slot_name = 'aamm_to_3'");
    double c0[4] = {proc_cpu(spid), proc_cpu(wpid), self_cpu(), wal_pos(2)};
    bool open_txn = false;
    perf_hook("BENCH_PERF", want, 2);
    for (;;) {
        if (aamm_capture_step(cap) != 0)
            die(aamm_capture_errmsg(cap));
        struct aamm_capture_event ev;
        int rc;
        int budget = 20000;
        while (budget-- > 0 && (rc = aamm_capture_next(cap, &ev)) == 0) {
            if (ev.kind == AAMM_CAPTURE_BEGIN) {
                if (aamm_wire_encode_begin(enc, ev.txn) != 0)
                    die(aamm_wire_encoder_errmsg(enc));
                open_txn = true;
            } else if (ev.kind == AAMM_CAPTURE_CHANGE && open_txn) {
                if (aamm_wire_encode_change(enc, ev.change) != 0)
                    die(aamm_wire_encoder_errmsg(enc));
            } else if (ev.kind == AAMM_CAPTURE_COMMIT && open_txn) {
                if (aamm_wire_encode_commit(enc, ev.txn) != 0)
                    die(aamm_wire_encoder_errmsg(enc));
                open_txn = false;
            }
            pump_wire(); /* full frames */
        }
        if (!open_txn && aamm_wire_encoder_flush(enc) != 0)
            die(aamm_wire_encoder_errmsg(enc));
        pump_wire();
        if (aamm_apply_step(ap) != 0)
            die(aamm_apply_errmsg(ap));
        if (aamm_apply_flushed(ap))
            aamm_capture_confirm(cap, aamm_apply_flushed(ap));
        double t = now_s();
        dbg("outer");
        if (t - last_check > 0.05) {
            last_check = t;
            if (marker_count(2) >= want) {
                if (!wpid) /* the apply session was opened during this catch-up */
                    c0[1] = 0;
                wpid = wpid ? wpid : applier_pid();
                cpu_report("libaamm", units, proc_cpu(spid) - c0[0], proc_cpu(wpid) - c0[1],
                           self_cpu() - c0[2], wal_pos(2) - c0[3]);
                return t - t0;
            }
        }
        struct pollfd p[2] = {{aamm_capture_fd(cap), POLLIN, 0}, {aamm_apply_fd(ap), POLLIN, 0}};
        if (aamm_apply_events(ap) & AAMM_WRITE)
            p[1].events |= POLLOUT;
        poll(p, 2, aamm_capture_timeout(cap) == 0 || aamm_apply_timeout(ap) == 0 ? 0 : 1);
    }
}

/* the bulk backlog: @rows rows into @table on the source, in 1,000-row transactions */
static void load_bulk(PGconn *a, const char *table, long rows)
{
    for (long b = 0; b < rows / 1000; b++)
        if (pgfx_exec_conn(a,
                           "INSERT INTO %s SELECT g, md5(g::text), g %% 1000 FROM "
                           "generate_series(%ld, %ld) g",
                           table, b * 1000 + 1, b * 1000 + 1000) != 0)
            die("bulk insert");
}

static double native_catch_up(long want, long units)
{
    double t0 = now_s(), w0 = wal_pos(1);
    exec(1, "ALTER SUBSCRIPTION sub ENABLE");
    perf_hook("BENCH_PERF_NATIVE", want, 1);
    while (marker_count(1) < want)
        usleep(20000);
    double d = now_s() - t0;
    /* the worker and its walsender started with this catch-up: their whole CPU is its */
    long wpid = pgfx_value_long(fx, 1, 0,
                                "SELECT pid FROM pg_stat_subscription WHERE "
                                "relid IS NULL AND pid IS NOT NULL LIMIT 1");
    long spid = pgfx_value_long(fx, 0, 0,
                                "SELECT active_pid FROM pg_replication_slots "
                                "WHERE slot_name = 'sub'");
    cpu_report("native", units, proc_cpu(spid), proc_cpu(wpid), 0, wal_pos(1) - w0);
    exec(1, "ALTER SUBSCRIPTION sub DISABLE");
    return d;
}

int main(void)
{
    double scale = getenv("AAMM_BENCH_SCALE") ? atof(getenv("AAMM_BENCH_SCALE")) : 1.0;
    long rows = (long)(1000000 * scale), txns = (long)(100000 * scale);
    if (rows < 10000)
        rows = 10000;
    /* AAMM_BENCH_PGBENCH_ONLY=1: the smallest bulk backlog and no conflict backlog, for
     * comparing the pgbench phase's CPU per transaction between builds */
    const char *only = getenv("AAMM_BENCH_PGBENCH_ONLY");
    bool pgbench_only = only && atoi(only);
    if (pgbench_only)
        rows = 10000;
    if (txns < 1000)
        txns = 1000;
    char conf[512];
    snprintf(conf, sizeof conf, "%s%s",
             "max_replication_slots = 10\nmax_wal_senders = 10\n"
             "max_locks_per_transaction = 256\nshared_buffers = 256MB\nmax_wal_size = 4GB\n"
             /* the bench does not read the capture stream while it loads the backlog: the
              * server must not end that walsender meanwhile (it did in 5 of 8 runs) */
             "wal_sender_timeout = 0\n",
             /* function counters only for BENCH_DEBUG: they cost time */
             getenv("BENCH_DEBUG") ? "track_functions = all\n" : "");
    fx = pgfx_start(3, conf);
    if (!fx)
        die("start clusters");
    for (int i = 0; i < 3; i++)
        schema(i);
    char err[1024];
    PGconn *c2 = pgfx_connect(fx, 2);
    if (aamm_node_install(c2, err, sizeof err) != 0 ||
        aamm_node_create_apply_role(c2, ROLE, NULL, err, sizeof err) != 0)
        die(err);
    for (size_t i = 0; i < sizeof tables / sizeof *tables; i++)
        if (aamm_node_replicate_table(c2, "public", tables[i], ROLE, NULL, err, sizeof err) != 0)
            die(err);
    PQfinish(c2);
    /* node 2 holds what an initial sync from node 1 would have written: the pgbench rows
     * it loaded itself are rewritten under node 1's origin, so the backlog's updates of
     * them are not update_origin_differs conflicts (conflicts are the third backlog's job) */
    exec(2, "SELECT pg_replication_origin_create('aamm_from_1')");
    {
        PGconn *o = pgfx_connect(fx, 2);
        if (pgfx_exec_conn(o, "SELECT pg_replication_origin_session_setup('aamm_from_1')") ||
            pgfx_exec_conn(o, "UPDATE pgbench_accounts SET abalance = abalance") ||
            pgfx_exec_conn(o, "UPDATE pgbench_tellers SET tbalance = tbalance") ||
            pgfx_exec_conn(o, "UPDATE pgbench_branches SET bbalance = bbalance"))
            die("rewrite under origin");
        PQfinish(o);
    }
    exec(2, "VACUUM ANALYZE");
    exec(0, "CREATE PUBLICATION pub FOR TABLE bulk, bulk2, pgbench_accounts, pgbench_branches, "
            "pgbench_tellers, pgbench_history, bench_marker");
    char sub[1024];
    snprintf(sub, sizeof sub,
             "CREATE SUBSCRIPTION sub CONNECTION '%s' PUBLICATION pub WITH (copy_data = false, "
             "enabled = false)",
             pgfx_conninfo(fx, 0));
    exec(1, sub);
    open_capture(); /* creates slot aamm_to_3 before the backlog */

    struct aamm_apply_options o;
    aamm_apply_options_init(&o);
    char ci[512];
    snprintf(ci, sizeof ci, "%s", pgfx_conninfo_with(fx, 2, "user=" ROLE));
    o.conninfo = ci;
    o.local_node = 3;
    o.source_node = 1;
    o.synchronous_commit_off = true;
    if (aamm_apply_new(&ap, &o, NULL, 0) != 0)
        die("apply new");
    if (aamm_wire_encoder_new(&enc, NULL, NULL, 0) != 0 || aamm_wire_decoder_new(&dec, NULL, NULL, 0) != 0)
        die("wire new");

    /* 1. bulk backlog */
    fprintf(stderr, "bench_apply: %ld bulk rows\n", rows);
    PGconn *a = pgfx_connect(fx, 0);
    load_bulk(a, "bulk", rows);
    exec(0, "INSERT INTO bench_marker VALUES (1)");
    double nat = native_catch_up(1, rows);
    double lib = libaamm_catch_up(1, rows);
    printf("BENCH apply_bulk_native_rows_per_s %.0f rows/s\n", rows / nat);
    printf("BENCH apply_bulk_libaamm_rows_per_s %.0f rows/s\n", rows / lib);
    printf("BENCH apply_bulk_ratio %.3f x\n", nat / lib);
    double bulk_rate = rows / lib;
    fflush(stdout);

    /* 2. pgbench backlog */
    fprintf(stderr, "bench_apply: %ld pgbench transactions\n", txns);
    {
        char port[16], t[32];
        snprintf(port, sizeof port, "%d", pgfx_port(fx, 0));
        snprintf(t, sizeof t, "%ld", txns / 2);
        const char *argv[] = {
            "pgbench",           "-n", "-c", "2",  "-j",       "2",        "-t", t, "-h",
            pgfx_sockdir(fx, 0), "-p", port, "-U", "postgres", "postgres", NULL};
        if (pgfx_run(argv, NULL) != 0)
            die("pgbench");
    }
    exec(0, "INSERT INTO bench_marker VALUES (2)");
    nat = native_catch_up(2, txns);
    lib = libaamm_catch_up(2, txns);
    printf("BENCH apply_pgbench_native_txn_per_s %.0f txn/s\n", txns / nat);
    printf("BENCH apply_pgbench_libaamm_txn_per_s %.0f txn/s\n", txns / lib);
    printf("BENCH apply_pgbench_ratio %.3f x\n", nat / lib);
    fflush(stdout);
    if (getenv("BENCH_DEBUG")) {
        static const char *const dbgq[][2] = {
            {"functions", "SELECT string_agg(funcname || '=' || calls || '/' || "
                          "round(total_time) || 'ms', ' ') FROM pg_stat_user_functions"},
            {"conflicts", "SELECT string_agg(kind || ':' || relation || '=' || n, ' ') FROM "
                          "(SELECT kind, relation, count(*) n FROM aamm.conflict_log GROUP BY "
                          "1, 2) x"},
            {"accounts with ts, tombstones",
             "SELECT (SELECT count(*) FROM pgbench_accounts a WHERE "
             "pg_xact_commit_timestamp(a.xmin) IS NOT NULL)::text || ' ' || "
             "(SELECT count(*) FROM aamm.tombstone)"}};
        for (size_t i = 0; i < sizeof dbgq / sizeof *dbgq; i++) {
            char *f = pgfx_value(fx, 2, "%s", dbgq[i][1]);
            fprintf(stderr, "dbg %s: %s\n", dbgq[i][0], f ? f : "?");
            free(f);
        }
    }

    /* 3. 10% conflicting rows on the libaamm target, against its conflict-free bulk rate */
    long rows2 = rows / 5;
    if (!pgbench_only) {
        char sql[256];
        snprintf(sql, sizeof sql,
                 "INSERT INTO bulk2 SELECT g, 'local', 0 FROM generate_series(1, %ld) g "
                 "WHERE g %% 10 = 0",
                 rows2);
        exec(2, sql);
        load_bulk(a, "bulk2", rows2);
        exec(0, "INSERT INTO bench_marker VALUES (3)");
        double lib2 = libaamm_catch_up(3, rows2);
        printf("BENCH apply_conflict10_libaamm_rows_per_s %.0f rows/s\n", rows2 / lib2);
        printf("BENCH apply_conflict10_slowdown %.3f x\n", bulk_rate / (rows2 / lib2));
        printf("BENCH apply_conflict10_logged %" PRIu64 " conflicts\n",
               apst(ap).conflicts[AAMM_CONFLICT_INSERT_EXISTS]);
    }
    PQfinish(a);
    for (int i = 0; i < 3; i++)
        PQfinish(pollconn[i]);
    aamm_apply_free(ap);
    aamm_wire_encoder_free(enc);
    aamm_wire_decoder_free(dec);
    aamm_capture_free(cap);
    pgfx_destroy(fx);
    return 0;
}
