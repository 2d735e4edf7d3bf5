/*
 * bench_capture.c: capture throughput against pg_recvlogical on the same backlog.
 *
 * One throwaway PostgreSQL 15 node. Two backlogs, each decoded from a slot created before
 * its workload ran:
 *   bulk:    1,000,000 rows in 1,000-row transactions (INSERT ... generate_series)
 *   pgbench: 100,000 TPC-B-like pgbench transactions (3 updates + 1 insert each)
 * For each run, the base slot is copied (pg_copy_logical_replication_slot), so every run
 * reads exactly the same backlog: pg_recvlogical (pgoutput, proto_version 1, to /dev/null,
 * --endpos at the end of the backlog) on one copy, libaamm capture (decoding every message
 * into changes, confirming each commit) on another. 3 runs; medians are printed as
 *   BENCH capture_<backlog>_rows_per_s / _mb_per_s (libaamm), recvlogical_<backlog>_...,
 *   and the ratio capture_<backlog>_ratio (libaamm rate / pg_recvlogical rate).
 * MB/s counts the pgoutput CopyData bytes of the stream, the same for both.
 *
 * usage: bench_capture [scale]   (scale multiplies the backlog sizes; default 1)
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include <aamm/capture.h>

#include "pgfixture.h"

#define RUNS 3 /* median of 3 */

static struct pgfx *fx;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* CPU seconds (user + system) of this process, or of its waited-for children. */
static double cpu_s(int who)
{
    struct rusage ru;
    getrusage(who, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static void die(const char *what)
{
    fprintf(stderr, "bench_capture: %s\n", what);
    pgfx_destroy(fx);
    exit(1);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return v[n / 2];
}

/* pg_recvlogical over a copy of @base until @endpos; returns seconds, sets its CPU
 * seconds. */
static double run_recvlogical(const char *base, const char *pub, const char *endpos, double *cpu)
{
    double c0;
    char slotarg[64], endarg[64], pubarg[128], dbarg[512];
    double t0, t1;
    int rc;
    if (pgfx_exec(fx, 0, "SELECT pg_copy_logical_replication_slot('%s', 'rl_copy')", base))
        die("copy slot");
    snprintf(slotarg, sizeof slotarg, "--slot=rl_copy");
    snprintf(endarg, sizeof endarg, "--endpos=%s", endpos);
    snprintf(pubarg, sizeof pubarg, "publication_names=%s", pub);
    snprintf(dbarg, sizeof dbarg, "--dbname=%s", pgfx_conninfo(fx, 0));
    {
        const char *argv[] = {
            "pg_recvlogical",  dbarg, slotarg, "--start", endarg,      "--no-loop", "-o",
            "proto_version=1", "-o",  pubarg,  "-f",      "/dev/null", NULL};
        c0 = cpu_s(RUSAGE_CHILDREN);
        t0 = now_s();
        rc = pgfx_run(argv, NULL);
        t1 = now_s();
        *cpu = cpu_s(RUSAGE_CHILDREN) - c0;
    }
    if (rc != 0)
        die("pg_recvlogical failed");
    pgfx_exec(fx, 0, "SELECT pg_drop_replication_slot('rl_copy')");
    return t1 - t0;
}

/* libaamm capture over a copy of @base until @ntxns commits; returns seconds, sets the
 * change count and the stream bytes. */
static double run_capture(const char *base, const char *pub, long ntxns, long *changes,
                          double *bytes, double *cpu)
{
    double c0;
    const char *pubs[1] = {pub};
    struct aamm_capture_options o;
    struct aamm_capture *c;
    struct aamm_capture_event ev;
    struct aamm_capture_stats st;
    long txns = 0;
    double t0, t1;
    if (pgfx_exec(fx, 0, "SELECT pg_copy_logical_replication_slot('%s', 'cap_copy')", base))
        die("copy slot");
    memset(&o, 0, sizeof o);
    o.conninfo = pgfx_conninfo(fx, 0);
    o.slot = "cap_copy";
    o.publications = pubs;
    o.npublications = 1;
    o.node_id = 1;
    *changes = 0;
    c0 = cpu_s(RUSAGE_SELF);
    t0 = now_s();
    if (aamm_capture_new(&c, &o, NULL, 0) != 0 || aamm_capture_open(c) != 0)
        die(aamm_capture_errmsg(c));
    while (txns < ntxns) {
        int rc = aamm_capture_wait(c, &ev, 60000);
        if (rc != 0)
            die(rc == AAMM_EAGAIN ? "capture: timeout" : aamm_capture_errmsg(c));
        if (ev.kind == AAMM_CAPTURE_CHANGE) {
            (*changes)++;
        } else if (ev.kind == AAMM_CAPTURE_COMMIT) {
            txns++;
            aamm_capture_confirm(c, ev.lsn);
        } else if (ev.kind == AAMM_CAPTURE_PROGRESS) {
            aamm_capture_confirm(c, ev.lsn);
        }
    }
    aamm_capture_send_status(c);
    t1 = now_s();
    *cpu = cpu_s(RUSAGE_SELF) - c0;
    aamm_capture_stats(c, &st);
    *bytes = (double)st.bytes_received;
    aamm_capture_free(c);
    /* The walsender may take a moment to release the slot. */
    for (int i = 0; i < 100; i++) {
        if (pgfx_value_long(fx, 0, 1,
                            "SELECT count(*) FROM pg_replication_slots "
                            "WHERE slot_name = 'cap_copy' AND active") == 0)
            break;
        struct timespec ts = {0, 50 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    pgfx_exec(fx, 0, "SELECT pg_drop_replication_slot('cap_copy')");
    return t1 - t0;
}

static void measure(const char *name, const char *base, const char *pub, long ntxns,
                    const char *endpos)
{
    double rl_rows[RUNS], rl_mb[RUNS], cap_rows[RUNS], cap_mb[RUNS], ratio[RUNS];
    double rl_cpu[RUNS], cap_cpu[RUNS];
    for (int r = 0; r < RUNS; r++) {
        long changes;
        double bytes, t_rl, t_cap;
        /* Alternate which goes first, so a trend in the machine's load hits both. */
        if (r % 2 == 0) {
            t_rl = run_recvlogical(base, pub, endpos, &rl_cpu[r]);
            t_cap = run_capture(base, pub, ntxns, &changes, &bytes, &cap_cpu[r]);
        } else {
            t_cap = run_capture(base, pub, ntxns, &changes, &bytes, &cap_cpu[r]);
            t_rl = run_recvlogical(base, pub, endpos, &rl_cpu[r]);
        }
        rl_cpu[r] = rl_cpu[r] * 1e6 / (double)changes;
        cap_cpu[r] = cap_cpu[r] * 1e6 / (double)changes;
        rl_rows[r] = (double)changes / t_rl;
        rl_mb[r] = bytes / 1e6 / t_rl;
        cap_rows[r] = (double)changes / t_cap;
        cap_mb[r] = bytes / 1e6 / t_cap;
        ratio[r] = t_rl / t_cap;
        fprintf(stderr,
                "run %d %s: %ld changes, %.1f MB; pg_recvlogical %.2f s (client CPU %.2f us/row), "
                "capture %.2f s (client CPU %.2f us/row)\n",
                r + 1, name, changes, bytes / 1e6, t_rl, rl_cpu[r], t_cap, cap_cpu[r]);
    }
    printf("BENCH recvlogical_%s_rows_per_s %.0f rows/s\n", name, median(rl_rows, RUNS));
    printf("BENCH recvlogical_%s_mb_per_s %.1f MB/s\n", name, median(rl_mb, RUNS));
    printf("BENCH capture_%s_rows_per_s %.0f rows/s\n", name, median(cap_rows, RUNS));
    printf("BENCH capture_%s_mb_per_s %.1f MB/s\n", name, median(cap_mb, RUNS));
    printf("BENCH capture_%s_ratio %.2f x\n", name, median(ratio, RUNS));
    /* Where the time goes: the walsender's decoding dominates both; this is the client's
     * own CPU per row (decoding into changes vs. copying bytes to /dev/null). */
    printf("BENCH recvlogical_%s_client_cpu %.2f us/row\n", name, median(rl_cpu, RUNS));
    printf("BENCH capture_%s_client_cpu %.2f us/row\n", name, median(cap_cpu, RUNS));
    fflush(stdout);
}

static char *current_lsn(void)
{
    char *v = pgfx_value(fx, 0, "SELECT pg_current_wal_lsn()");
    if (v == NULL)
        die("pg_current_wal_lsn");
    return v;
}

int main(int argc, char **argv)
{
    double scale = argc > 1 ? atof(argv[1]) : 1.0;
    long bulk_txns = (long)(1000 * scale), pgb_txns = (long)(100000 * scale);
    char *end;
    PGconn *conn;
    double t0;

    if (bulk_txns < 1 || pgb_txns < 2)
        die("scale too small");
    fx = pgfx_start(1, "wal_sender_timeout = 60s\nmax_wal_size = 8GB\n"
                       "checkpoint_timeout = 30min\nlogical_decoding_work_mem = 64MB\n");
    if (fx == NULL)
        die("cannot start PostgreSQL");

    /* ---- bulk backlog ---- */
    if (pgfx_exec(fx, 0,
                  "CREATE TABLE bulk (id int PRIMARY KEY, v text, n int);"
                  "CREATE PUBLICATION pub_bulk FOR TABLE bulk") ||
        pgfx_exec(fx, 0, "SELECT pg_create_logical_replication_slot('base_bulk', 'pgoutput')"))
        die("bulk setup");
    conn = pgfx_connect(fx, 0);
    if (conn == NULL)
        die("connect");
    t0 = now_s();
    for (long k = 0; k < bulk_txns; k++)
        if (pgfx_exec_conn(conn,
                           "INSERT INTO bulk SELECT g, md5(g::text), g "
                           "FROM generate_series(%ld, %ld) g",
                           k * 1000 + 1, k * 1000 + 1000))
            die("bulk insert");
    PQfinish(conn);
    end = current_lsn();
    fprintf(stderr, "bulk backlog: %ld transactions in %.1f s, ends at %s\n", bulk_txns,
            now_s() - t0, end);
    measure("bulk", "base_bulk", "pub_bulk", bulk_txns, end);
    free(end);
    pgfx_exec(fx, 0, "SELECT pg_drop_replication_slot('base_bulk')");

    /* ---- pgbench backlog ---- */
    {
        char dbarg[512], targ[32];
        const char *init[] = {"pgbench", "-i", "-q", "-s", "1", dbarg, NULL};
        const char *run[] = {"pgbench", "-n", "-c", "2", "-j", "2", "-t", targ, dbarg, NULL};
        snprintf(dbarg, sizeof dbarg, "%s", pgfx_conninfo(fx, 0));
        snprintf(targ, sizeof targ, "%ld", pgb_txns / 2);
        if (pgfx_run(init, NULL) != 0)
            die("pgbench -i");
        /* pgbench_history has no key: it only gets inserts, so FULL costs nothing. */
        if (pgfx_exec(fx, 0,
                      "ALTER TABLE pgbench_history REPLICA IDENTITY FULL;"
                      "CREATE PUBLICATION pub_pgb FOR TABLE pgbench_accounts, "
                      "pgbench_branches, pgbench_tellers, pgbench_history") ||
            pgfx_exec(fx, 0, "SELECT pg_create_logical_replication_slot('base_pgb', 'pgoutput')"))
            die("pgbench setup");
        t0 = now_s();
        if (pgfx_run(run, NULL) != 0)
            die("pgbench");
        end = current_lsn();
        fprintf(stderr, "pgbench backlog: %ld transactions in %.1f s, ends at %s\n", pgb_txns,
                now_s() - t0, end);
        measure("pgbench", "base_pgb", "pub_pgb", (pgb_txns / 2) * 2, end);
        free(end);
    }
    pgfx_destroy(fx);
    return 0;
}
