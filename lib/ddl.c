/* ddl.c: DDL replication switches on a node, and aamm_ddl_execute(): one DDL statement
 * cluster-wide under the global DDL lock (consensus), ordered against this node's stream by
 * marker transactions whose acknowledgement by every peer the replicator reports. */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>
#include <openssl/rand.h>

#include <aamm/aamm.h>
#include <aamm/consensus.h>
#include <aamm/ddl.h>
#include <aamm/replicator.h>

#include "internal.h"
#include "pgglue.h"
#include "replicator_int.h"
#include "sql_contract.h"

int aamm_ddl_configure(PGconn *conn, bool capture, bool apply, char *err, size_t errsize)
{
    const char *params[2] = {capture ? "true" : "false", apply ? "true" : "false"};
    PGresult *res = PQexec(conn, "SELECT pg_catalog.to_regclass('aamm.ddl_config') IS NOT NULL");
    int rc = 0;
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        rc = aamm__pg_seterr(err, errsize,
                             PQstatus(conn) == CONNECTION_OK ? AAMM_ESERVER : AAMM_ECONN,
                             "ddl: %s", PQerrorMessage(conn));
    else if (strcmp(PQgetvalue(res, 0, 0), "t") != 0)
        rc = aamm__pg_seterr(err, errsize, AAMM_ENOTFOUND,
                             "ddl: the node's libaamm schema has no DDL replication (version 4): "
                             "run aamm_node_install()");
    PQclear(res);
    if (rc < 0)
        return rc;
    res = PQexecParams(conn, "UPDATE aamm.ddl_config SET capture = $1::boolean, apply = $2::boolean",
                       2, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_COMMAND_OK)
        rc = aamm__pg_seterr(err, errsize,
                             PQstatus(conn) == CONNECTION_OK ? AAMM_ESERVER : AAMM_ECONN,
                             "ddl: %s", PQerrorMessage(conn));
    PQclear(res);
    return rc;
}

/* ---- aamm_ddl_execute -------------------------------------------------------------- */

struct lock_wait {
    volatile int done;
    int status;
    struct aamm_consensus_ddl_lock lock;
};

static void on_lock(struct aamm_consensus *cs, int status, const struct aamm_consensus_ddl_lock *lock,
                    void *arg)
{
    struct lock_wait *w = arg;
    (void)cs;
    w->status = status;
    if (lock)
        w->lock = *lock;
    w->done = 1;
}

/* Step the replicator until @w's callback ran or @deadline passed. */
static int wait_lock(struct aamm_replicator *r, struct lock_wait *w, int64_t deadline)
{
    while (!w->done) {
        int64_t now = aamm__now_ms();
        int rc;
        if (now >= deadline)
            return AAMM_ETIMEDOUT;
        rc = aamm_replicator_run(r, (int)(deadline - now < 50 ? deadline - now : 50), &w->done);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* @sql on @conn (with @n text parameters; none: PQexec, which takes several statements);
 * AAMM_ESERVER/AAMM_ECONN with "@what: " and the server's message */
static int exec_params(PGconn *conn, const char *what, const char *sql, int n,
                       const char *const *p, char *err, size_t errsize)
{
    PGresult *res = n ? PQexecParams(conn, sql, n, NULL, p, NULL, NULL, 0) : PQexec(conn, sql);
    int rc = 0;
    if (PQresultStatus(res) != PGRES_COMMAND_OK && PQresultStatus(res) != PGRES_TUPLES_OK)
        rc = aamm__pg_seterr(err, errsize,
                             PQstatus(conn) == CONNECTION_OK ? AAMM_ESERVER : AAMM_ECONN,
                             "%s: %s", what, PQerrorMessage(conn));
    PQclear(res);
    return rc;
}

/* Commit a marker transaction (with @sql first, when not NULL, and DDL replication on for
 * it) on @conn. */
static int run_marked(PGconn *conn, const char *sql, const char *token, char *err, size_t errsize)
{
    const char *p[1] = {token};
    int rc = aamm__pg_run(conn, "ddl", "BEGIN; SET LOCAL aamm.replicate_ddl = on", err, errsize);
    if (rc < 0)
        return rc;
    /* under the lock: the TRUNCATE guard emits a TRUNCATE as DDL (sql/aamm--5--6.sql) */
    if (sql && (rc = exec_params(conn, "ddl",
                                 "SELECT pg_catalog.set_config('" AAMM_SQL_GUC_DDL_TOKEN
                                 "', $1, true)",
                                 1, p, err, errsize)) == 0)
        rc = exec_params(conn, "ddl", sql, 0, NULL, err, errsize);
    if (rc == 0)
        rc = exec_params(conn, "ddl: marker", "SELECT aamm.emit_marker($1)", 1, p, err, errsize);
    if (rc < 0) {
        aamm__pg_rollback(conn);
        return rc;
    }
    return aamm__pg_run(conn, "ddl", "COMMIT", err, errsize);
}

/* Step the replicator until every peer acknowledged the marker @token. */
static int wait_marker(struct aamm_replicator *r, const char *token, int64_t deadline, char *err,
                       size_t errsize)
{
    char who[64] = "";
    while (!aamm__replicator_marker_acked(r, token, who, sizeof who)) {
        int64_t now = aamm__now_ms();
        int rc;
        if (now >= deadline)
            return aamm__newerrf(err, errsize, AAMM_ETIMEDOUT,
                                 "ddl: %s has not applied this node's transactions yet", who);
        rc = aamm_replicator_run(r, (int)(deadline - now < 20 ? deadline - now : 20), NULL);
        if (rc < 0)
            return aamm__newerrf(err, errsize, rc, "ddl: %s", aamm_replicator_errmsg(r));
    }
    return 0;
}

int aamm_ddl_execute(struct aamm_replicator *r, PGconn *conn, const char *sql, int timeout_ms,
                     struct aamm_ddl_stats *st, char *err, size_t errsize)
{
    struct aamm_consensus *cs = aamm_replicator_consensus(r);
    struct aamm_ddl_stats s;
    struct lock_wait w;
    unsigned char rnd[8];
    char token[2][40];
    int64_t t0 = aamm__now_ms(), deadline, t;
    int rc, rrc;
    memset(&s, 0, sizeof s);
    if (!cs)
        return aamm__newerrf(err, errsize, AAMM_EUNSUPPORTED,
                             "ddl: the replicator runs no consensus (raft_address)");
    if (!sql || !*sql || timeout_ms <= 0)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "ddl: no statement or no time");
    deadline = t0 + timeout_ms;
    if (RAND_bytes(rnd, sizeof rnd) != 1)
        return aamm__newerrf(err, errsize, AAMM_EIO, "ddl: no random bytes");
    for (int i = 0; i < 2; i++)
        snprintf(token[i], sizeof token[i], "%02x%02x%02x%02x%02x%02x%02x%02x-%d", rnd[0], rnd[1],
                 rnd[2], rnd[3], rnd[4], rnd[5], rnd[6], rnd[7], i);

    /* 1. the lock */
    memset(&w, 0, sizeof w);
    if ((rc = aamm_consensus_ddl_acquire(cs, (uint32_t)timeout_ms, on_lock, &w)) < 0)
        return aamm__newerrf(err, errsize, rc, "ddl: lock: %s", aamm_consensus_errmsg(cs));
    if ((rc = wait_lock(r, &w, deadline)) < 0)
        return aamm__newerrf(err, errsize, rc, "ddl: lock: no answer from consensus in time");
    if (w.status == AAMM_EBUSY)
        return aamm__newerrf(err, errsize, AAMM_EBUSY,
                             "ddl: the DDL lock is held by node %" PRIu32 " (token %" PRIu64 ")",
                             w.lock.holder, w.lock.token);
    if (w.status < 0)
        return aamm__newerrf(err, errsize, w.status, "ddl: lock: %s", aamm_strerror(w.status));
    s.token = w.lock.token;
    t = aamm__now_ms();
    s.acquire_ms = t - t0;

    /* 2. every peer has what this node sent before */
    rc = run_marked(conn, NULL, token[0], err, errsize);
    if (rc == 0)
        rc = wait_marker(r, token[0], deadline, err, errsize);
    s.drain_ms = aamm__now_ms() - t;
    t = aamm__now_ms();

    /* 3. the DDL, and 4. every peer has applied it */
    if (rc == 0) {
        rc = run_marked(conn, sql, token[1], err, errsize);
        s.run_ms = aamm__now_ms() - t;
        t = aamm__now_ms();
        if (rc == 0) {
            PGresult *res = PQexec(conn, "SELECT pg_catalog.pg_current_wal_lsn()");
            if (PQresultStatus(res) == PGRES_TUPLES_OK)
                (void)aamm_lsn_parse(PQgetvalue(res, 0, 0), &s.ddl_lsn);
            PQclear(res);
            rc = wait_marker(r, token[1], deadline, err, errsize);
            s.propagate_ms = aamm__now_ms() - t;
        }
    }

    /* 5. release (also after a failure: the lease would end anyway) */
    t = aamm__now_ms();
    memset(&w, 0, sizeof w);
    rrc = aamm_consensus_ddl_release(cs, s.token, on_lock, &w);
    if (rrc == 0)
        rrc = wait_lock(r, &w, aamm__now_ms() + 10000);
    if (rrc == 0)
        rrc = w.status;
    s.release_ms = aamm__now_ms() - t;
    if (st)
        *st = s;
    if (rc == 0 && rrc < 0)
        return aamm__newerrf(err, errsize, rrc, "ddl: release: %s", aamm_strerror(rrc));
    return rc;
}

/* ---- aamm_ddl_serve: the SQL form's requests ---------------------------------------- */

int aamm_ddl_serve(struct aamm_replicator *r, PGconn *conn, int timeout_ms, int *served,
                   char *err, size_t errsize)
{
    struct aamm_ddl_stats st;
    char id[32], token[32] = "", path[1024], msg[1024] = "";
    char *command = NULL, *role = NULL, *own_path = NULL;
    long long left_ms;
    int rc, rrc;
    PGresult *res;
    if (served)
        *served = 0;
    if (!r || !conn || timeout_ms <= 0)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "ddl: serve: no replicator, connection or time");
    if (!aamm_replicator_consensus(r))
        return aamm__newerrf(err, errsize, AAMM_EUNSUPPORTED,
                             "ddl: serve: the replicator runs no consensus (raft_address)");

    /* 1. claim the oldest pending request; requests past their deadline are abandoned,
     *    running ones a minute past it failed (their agent stopped: aamm_ddl_execute() ends
     *    by the deadline), finished ones a week old deleted */
    res = PQexec(conn,
                 "WITH gone AS (UPDATE " AAMM_SQL_DDL_REQUEST_TABLE " SET status = 'abandoned',"
                 "   finished_at = pg_catalog.now(), message = 'no agent took it before its deadline'"
                 "   WHERE status = 'pending' AND deadline OPERATOR(pg_catalog.<=) pg_catalog.now()),"
                 " lost AS (UPDATE " AAMM_SQL_DDL_REQUEST_TABLE " SET status = 'failed',"
                 "   finished_at = pg_catalog.now(), message = 'the agent stopped while it ran it"
                 " (it may have run: check the schema on every node)'"
                 "   WHERE status = 'running' AND deadline OPERATOR(pg_catalog.<)"
                 "   (pg_catalog.now() OPERATOR(pg_catalog.-) interval '1 minute')),"
                 " old AS (DELETE FROM " AAMM_SQL_DDL_REQUEST_TABLE " WHERE status IN ('done',"
                 "   'failed', 'abandoned') AND finished_at OPERATOR(pg_catalog.<)"
                 "   (pg_catalog.now() OPERATOR(pg_catalog.-) interval '7 days')),"
                 " q AS (SELECT id FROM " AAMM_SQL_DDL_REQUEST_TABLE " WHERE status = 'pending'"
                 "   AND deadline OPERATOR(pg_catalog.>) pg_catalog.now() ORDER BY id LIMIT 1"
                 "   FOR UPDATE SKIP LOCKED)"
                 " UPDATE " AAMM_SQL_DDL_REQUEST_TABLE " d SET status = 'running' FROM q"
                 " WHERE d.id OPERATOR(pg_catalog.=) q.id"
                 " RETURNING d.id, d.command, d.role, d.search_path,"
                 " pg_catalog.ceil(pg_catalog.date_part('epoch', d.deadline"
                 "   OPERATOR(pg_catalog.-) pg_catalog.now()) OPERATOR(pg_catalog.*) 1000)::int8");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        rc = aamm__pg_seterr(err, errsize,
                             PQstatus(conn) != CONNECTION_OK     ? AAMM_ECONN
                             : state && !strcmp(state, "42P01") ? AAMM_ENOTFOUND
                                                                 : AAMM_ESERVER,
                             "ddl: serve: %s%s", PQerrorMessage(conn),
                             state && !strcmp(state, "42P01")
                                 ? " (schema older than version 6: run aamm_node_install())"
                                 : "");
        PQclear(res);
        return rc;
    }
    if (PQntuples(res) == 0) {
        PQclear(res);
        return 0;
    }
    snprintf(id, sizeof id, "%s", PQgetvalue(res, 0, 0));
    command = aamm__strdup(PQgetvalue(res, 0, 1));
    role = aamm__strdup(PQgetvalue(res, 0, 2));
    snprintf(path, sizeof path, "%s", PQgetvalue(res, 0, 3));
    left_ms = strtoll(PQgetvalue(res, 0, 4), NULL, 10);
    PQclear(res);
    if (served)
        *served = 1;
    if (!command || !role) {
        rc = aamm__newerrf(err, errsize, AAMM_ENOMEM, "ddl: serve: out of memory");
        snprintf(msg, sizeof msg, "out of memory in the agent");
        goto record;
    }
    if (left_ms > timeout_ms)
        left_ms = timeout_ms;
    if (left_ms < 1)
        left_ms = 1;

    /* 2. as the requesting role, with its search_path, under the lock */
    res = PQexec(conn, "SELECT pg_catalog.current_setting('search_path')");
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1) {
        own_path = aamm__strdup(PQgetvalue(res, 0, 0));
        rc = own_path ? 0 : aamm__newerrf(msg, sizeof msg, AAMM_ENOMEM, "out of memory");
    } else {
        rc = aamm__pg_seterr(msg, sizeof msg,
                             PQstatus(conn) == CONNECTION_OK ? AAMM_ESERVER : AAMM_ECONN,
                             "%s", PQerrorMessage(conn));
    }
    PQclear(res);
    if (rc == 0) {
        const char *p[2] = {role, path};
        rc = exec_params(conn, "ddl: serve",
                         "SELECT pg_catalog.set_config('role', $1, false),"
                         " pg_catalog.set_config('search_path', $2, false)",
                         2, p, msg, sizeof msg);
    }
    if (rc == 0) {
        memset(&st, 0, sizeof st);
        rc = aamm_ddl_execute(r, conn, command, (int)left_ms, &st, msg, sizeof msg);
        if (st.token)
            snprintf(token, sizeof token, "%" PRIu64, st.token);
    }
    /* back to the agent's own role and search_path, also after a failure */
    if (PQstatus(conn) == CONNECTION_OK && PQtransactionStatus(conn) != PQTRANS_IDLE)
        aamm__pg_rollback(conn);
    rrc = aamm__pg_run(conn, "ddl: serve", "RESET ROLE", err, errsize);
    if (rrc == 0 && own_path) {
        const char *p[1] = {own_path};
        rrc = exec_params(conn, "ddl: serve",
                          "SELECT pg_catalog.set_config('search_path', $1, false)", 1, p, err,
                          errsize);
    }
    aamm__free(own_path);
    if (rrc < 0) {
        aamm__free(command);
        aamm__free(role);
        return rrc; /* the request stays 'running': the connection is not usable */
    }
    if (rc < 0 && !msg[0])
        snprintf(msg, sizeof msg, "%s", aamm_strerror(rc));

record:
    /* 3. the outcome */
    {
        const char *p[4] = {id, rc == 0 ? "done" : "failed", token[0] ? token : NULL,
                            rc == 0 ? NULL : msg};
        rrc = exec_params(conn, "ddl: serve",
                          "UPDATE " AAMM_SQL_DDL_REQUEST_TABLE " SET status = $2, token = $3::int8,"
                          " message = $4, finished_at = pg_catalog.now()"
                          " WHERE id OPERATOR(pg_catalog.=) $1::int8",
                          4, p, err, errsize);
    }
    if (rrc == 0 && rc < 0)
        rrc = aamm__newerrf(err, errsize, rc, "ddl: serve: request %s as role %s failed: %s", id,
                            role ? role : "?", msg);
    aamm__free(command);
    aamm__free(role);
    return rrc;
}
