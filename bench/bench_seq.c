/* bench_seq.c: throughput of the id generators: the C API (snowflake, UUIDv7, galloc) and
 * the SQL functions on a throwaway PostgreSQL 15 node, as plain calls and as column
 * defaults, next to PostgreSQL's own nextval()/bigserial and gen_random_uuid(); plus
 * pgbench with 4 clients inserting through each default. Prints BENCH lines (medians of
 * several runs). Usage: bench_seq [runs] */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

#include <aamm/seq.h>

#include "pgfixture.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static volatile int64_t sink;

/* ---- C API -------------------------------------------------------------------------- */

static double c_snowflake(long n)
{
    struct aamm_snowflake_options o = {.node_id = 1};
    struct aamm_snowflake *g;
    int64_t id = 0;
    double t;
    if (aamm_snowflake_new(&g, &o, NULL, 0) != 0)
        return 0;
    t = now_s();
    for (long i = 0; i < n; i++)
        if (aamm_snowflake_next(g, &id) != 0)
            abort();
    t = now_s() - t;
    sink = id;
    aamm_snowflake_free(g);
    return (double)n / t;
}

static double c_uuidv7(long n)
{
    struct aamm_uuidv7 *g;
    uint8_t u[16];
    double t;
    if (aamm_uuidv7_new(&g, NULL, NULL, 0) != 0)
        return 0;
    t = now_s();
    for (long i = 0; i < n; i++)
        if (aamm_uuidv7_next(g, u) != 0)
            abort();
    t = now_s() - t;
    sink = u[15];
    aamm_uuidv7_free(g);
    return (double)n / t;
}

/* galloc with ranges of 10,000 fed by the loop (stands in for consensus answering) */
static double c_galloc(long n)
{
    struct aamm_galloc_options o = {.name = "bench", .range_size = 10000};
    struct aamm_galloc *g;
    int64_t v = 0, next = 1;
    uint64_t count;
    double t;
    if (aamm_galloc_new(&g, &o, NULL, 0) != 0)
        return 0;
    t = now_s();
    for (long i = 0; i < n; i++) {
        if (aamm_galloc_begin_request(g, &count) == 0) {
            if (aamm_galloc_add_range(g, next, next + (int64_t)count) != 0)
                abort();
            next += (int64_t)count;
        }
        if (aamm_galloc_next(g, &v) != 0)
            abort();
    }
    t = now_s() - t;
    sink = v;
    aamm_galloc_free(g);
    return (double)n / t;
}

/* ---- SQL ---------------------------------------------------------------------------- */

static double sql_rate(PGconn *c, const char *fmt, long n)
{
    char sql[512];
    PGresult *res;
    double t;
    snprintf(sql, sizeof sql, fmt, n);
    t = now_s();
    res = PQexec(c, sql);
    t = now_s() - t;
    if (PQresultStatus(res) != PGRES_TUPLES_OK && PQresultStatus(res) != PGRES_COMMAND_OK) {
        fprintf(stderr, "bench_seq: %s: %s", sql, PQresultErrorMessage(res));
        PQclear(res);
        return 0;
    }
    PQclear(res);
    return (double)n / t;
}

static double pgbench_tps(struct pgfx *fx, const char *table, int seconds)
{
    char script[600], log[600], port[16], secs[16], line[512];
    const char *argv[20];
    FILE *f;
    double tps = 0;
    int k = 0;
    snprintf(script, sizeof script, "%s/bench_%s.sql", pgfx_root(fx), table);
    snprintf(log, sizeof log, "%s/bench_%s.log", pgfx_root(fx), table);
    f = fopen(script, "w");
    if (f == NULL)
        return 0;
    fprintf(f, "INSERT INTO %s (v) VALUES (1);\n", table);
    fclose(f);
    snprintf(port, sizeof port, "%d", pgfx_port(fx, 0));
    snprintf(secs, sizeof secs, "%d", seconds);
    argv[k++] = "pgbench";
    argv[k++] = "-n";
    argv[k++] = "-h";
    argv[k++] = pgfx_sockdir(fx, 0);
    argv[k++] = "-p";
    argv[k++] = port;
    argv[k++] = "-U";
    argv[k++] = "postgres";
    argv[k++] = "-c";
    argv[k++] = "4";
    argv[k++] = "-j";
    argv[k++] = "2";
    argv[k++] = "-T";
    argv[k++] = secs;
    argv[k++] = "-f";
    argv[k++] = script;
    argv[k++] = "postgres";
    argv[k] = NULL;
    if (pgfx_run(argv, log) != 0) {
        fprintf(stderr, "bench_seq: pgbench failed, see %s\n", log);
        return 0;
    }
    f = fopen(log, "r");
    if (f == NULL)
        return 0;
    while (fgets(line, sizeof line, f) != NULL)
        if (strncmp(line, "tps = ", 6) == 0)
            tps = strtod(line + 6, NULL);
    fclose(f);
    return tps;
}

#define MAXRUNS 9

int main(int argc, char **argv)
{
    int runs = argc > 1 ? atoi(argv[1]) : 5;
    long cn = 5000000, sn = 200000;
    double r[MAXRUNS];
    struct pgfx *fx;
    PGconn *c;
    char err[AAMM_SEQ_ERRSIZE];
    if (runs < 1 || runs > MAXRUNS)
        runs = 5;

    for (int i = 0; i < runs; i++)
        r[i] = c_snowflake(cn);
    printf("BENCH seq_c_snowflake %.0f ids/s\n", median(r, runs));
    for (int i = 0; i < runs; i++)
        r[i] = c_uuidv7(cn);
    printf("BENCH seq_c_uuidv7 %.0f ids/s\n", median(r, runs));
    for (int i = 0; i < runs; i++)
        r[i] = c_galloc(cn);
    printf("BENCH seq_c_galloc %.0f ids/s\n", median(r, runs));
    fflush(stdout);

    fx = pgfx_start(1, NULL);
    if (fx == NULL)
        return 1;
    c = pgfx_connect(fx, 0);
    if (c == NULL || aamm_seq_install(c, 1, err, sizeof err) != 0 ||
        aamm_galloc_supply_node(c, "bench", 1, INT64_C(1) << 40, err, sizeof err) != 0 ||
        aamm_galloc_supply_node(c, "public.t_ga.v", 1, INT64_C(1) << 40, err, sizeof err) != 0) {
        fprintf(stderr, "bench_seq: setup: %s\n", err);
        pgfx_destroy(fx);
        return 1;
    }
    pgfx_exec_conn(c, "CREATE SEQUENCE plain_seq;"
                      "CREATE TABLE t_serial (id bigserial PRIMARY KEY, v int);"
                      "CREATE TABLE t_sf (id bigint PRIMARY KEY DEFAULT "
                      "aamm.snowflake_nextval('public.t_sf'), v int);"
                      "CREATE TABLE t_uuid_pg (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), "
                      "v int);"
                      "CREATE TABLE t_uuid (id uuid PRIMARY KEY DEFAULT aamm.uuid_v7(), v int);"
                      "CREATE TABLE t_ga (id bigint PRIMARY KEY DEFAULT "
                      "aamm.galloc_nextval('public.t_ga.v'), v int)");
    {
        static const struct {
            const char *name, *sql;
        } calls[] = {
            {"seq_sql_call_nextval_pg",
             "SELECT count(nextval('plain_seq')) FROM generate_series(1, %ld)"},
            {"seq_sql_call_snowflake",
             "SELECT count(aamm.snowflake_nextval('b')) FROM generate_series(1, %ld)"},
            {"seq_sql_call_gen_random_uuid_pg",
             "SELECT count(gen_random_uuid()) FROM generate_series(1, %ld)"},
            {"seq_sql_call_uuid_v7", "SELECT count(aamm.uuid_v7()) FROM generate_series(1, %ld)"},
            {"seq_sql_call_galloc",
             "SELECT count(aamm.galloc_nextval('bench')) FROM generate_series(1, %ld)"},
            {"seq_sql_insert_bigserial_pg",
             "INSERT INTO t_serial (v) SELECT 1 FROM generate_series(1, %ld)"},
            {"seq_sql_insert_snowflake",
             "INSERT INTO t_sf (v) SELECT 1 FROM generate_series(1, %ld)"},
            {"seq_sql_insert_gen_random_uuid_pg",
             "INSERT INTO t_uuid_pg (v) SELECT 1 FROM generate_series(1, %ld)"},
            {"seq_sql_insert_uuid_v7",
             "INSERT INTO t_uuid (v) SELECT 1 FROM generate_series(1, %ld)"},
            {"seq_sql_insert_galloc", "INSERT INTO t_ga (v) SELECT 1 FROM generate_series(1, %ld)"},
        };
        for (size_t k = 0; k < sizeof calls / sizeof calls[0]; k++) {
            for (int i = 0; i < runs; i++)
                r[i] = sql_rate(c, calls[k].sql, sn);
            printf("BENCH %s %.0f %s/s\n", calls[k].name, median(r, runs),
                   strstr(calls[k].name, "insert") ? "rows" : "ids");
            fflush(stdout);
        }
    }
    {
        static const struct {
            const char *name, *table;
        } pb[] = {
            {"seq_pgbench4_insert_bigserial_pg", "t_serial"},
            {"seq_pgbench4_insert_snowflake", "t_sf"},
            {"seq_pgbench4_insert_uuid_v7", "t_uuid"},
            {"seq_pgbench4_insert_galloc", "t_ga"},
        };
        for (size_t k = 0; k < sizeof pb / sizeof pb[0]; k++) {
            int n = runs < 3 ? runs : 3;
            for (int i = 0; i < n; i++)
                r[i] = pgbench_tps(fx, pb[k].table, 4);
            printf("BENCH %s %.0f tps\n", pb[k].name, median(r, n));
            fflush(stdout);
        }
    }
    PQfinish(c);
    pgfx_destroy(fx);
    return 0;
}
