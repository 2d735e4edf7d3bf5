/*
 * pgfixture.h: throwaway PostgreSQL 15 clusters for integration tests and benchmarks.
 *
 * pgfx_start() creates a temporary directory, runs initdb for each node (as the
 * `postgres` user when the test runs as root: PostgreSQL refuses to run as root) and
 * starts each server listening only on a unix socket in its own directory, configured for
 * libaamm (wal_level=logical, track_commit_timestamp=on, slots and senders to spare).
 *
 * Cleanup is guaranteed three ways: pgfx_destroy() stops the servers and removes the
 * directory; if the test process dies first — a failed assertion in a forked Check test,
 * a Check timeout, even SIGKILL — an outside reaper process notices (the pipe it reads
 * from closes) and kills every postmaster whose pid file is under the directory, then
 * removes the directory.
 */
#ifndef AAMM_PGFIXTURE_H
#define AAMM_PGFIXTURE_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <sys/types.h>

#define PGFX_MAX_NODES 8

struct pgfx;

/* Start @n nodes (1..PGFX_MAX_NODES). @extra_conf (borrowed, may be NULL) is appended to
 * every node's postgresql.conf. Returns NULL and prints why to stderr on failure. */
struct pgfx *pgfx_start(int n, const char *extra_conf);

/* Stop every node, remove the directory, end the reaper. NULL accepted. */
void pgfx_destroy(struct pgfx *fx);

int pgfx_nodes(const struct pgfx *fx);

/* libpq conninfo of node @i (borrowed): "host=<socket dir> port=<port> dbname=postgres
 * user=postgres". */
const char *pgfx_conninfo(const struct pgfx *fx, int i);
/* The same with extra keywords appended, e.g. "replication=database" (static buffer per
 * call: copy it if you need two). */
const char *pgfx_conninfo_with(const struct pgfx *fx, int i, const char *extra);

const char *pgfx_datadir(const struct pgfx *fx, int i);
const char *pgfx_sockdir(const struct pgfx *fx, int i);
/* Node @i's server log (borrowed path): the server's stderr, collected by pg_ctl -l;
 * failing statements land there (log_min_error_statement = error). */
const char *pgfx_logfile(const struct pgfx *fx, int i);
int pgfx_port(const struct pgfx *fx, int i);
/* The fixture's temporary root directory (world-writable scratch space under it is fine). */
const char *pgfx_root(const struct pgfx *fx);

/* Connect to node @i as the superuser; NULL (and a message on stderr) on failure. */
PGconn *pgfx_connect(const struct pgfx *fx, int i);

/* Run SQL (printf-style) on node @i on a fresh connection. 0 ok, -1 on error (printed). */
int pgfx_exec(const struct pgfx *fx, int i, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Run SQL on @conn; 0 ok, -1 on error (printed to stderr). */
int pgfx_exec_conn(PGconn *conn, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* First column of the first row of a query on node @i, malloc'ed (free()), or NULL when
 * the query fails or returns no row or NULL. */
char *pgfx_value(const struct pgfx *fx, int i, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The same, as a long (or @dflt). */
long pgfx_value_long(const struct pgfx *fx, int i, long dflt, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Poll the long value of a query on node @i (printf-style) until it is @want or @timeout_ms
 * passed; returns the last value read (-1 when the query failed). */
long pgfx_wait_long(const struct pgfx *fx, int i, long want, int timeout_ms, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
/* Stop node @i with pg_ctl mode "fast" or "immediate". 0 ok. */
int pgfx_stop_node(struct pgfx *fx, int i, const char *mode);
/* Start a stopped node again. 0 ok. */
int pgfx_start_node(struct pgfx *fx, int i);
/* Crash node @i: SIGKILL its postmaster, then make sure every backend is gone. 0 ok. */
int pgfx_crash_node(struct pgfx *fx, int i);
/* The postmaster pid of a running node, or 0. */
pid_t pgfx_postmaster_pid(const struct pgfx *fx, int i);

/* Path of the PostgreSQL binary @name ("pgbench", "pg_recvlogical", ...) in a static
 * buffer. */
const char *pgfx_bin(const char *name);

/* Run a PostgreSQL client program with @argv (argv[0] = program name, resolved by
 * pgfx_bin; NULL-terminated) as the server's OS user when root; stdout/stderr to @log
 * (NULL: /dev/null). Returns the exit status, or -1. */
int pgfx_run(const char *const argv[], const char *log);

#endif
