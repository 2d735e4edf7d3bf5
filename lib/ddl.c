/* ddl.c: DDL replication switches on a node, and aamm_ddl_execute(): one DDL statement
 * cluster-wide under the global DDL lock (consensus), ordered against this node's stream by
 * marker transactions whose acknowledgement by every peer the replicator reports. */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
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

/* Commit a marker transaction (with @sql first, when not NULL, and DDL replication on for
 * it) on @conn. */
static int run_marked(PGconn *conn, const char *sql, const char *token, char *err, size_t errsize)
{
    const char *p[1] = {token};
    PGresult *res;
    int rc = aamm__pg_run(conn, "ddl", "BEGIN; SET LOCAL aamm.replicate_ddl = on", err, errsize);
    if (rc < 0)
        return rc;
    if (sql) {
        res = PQexec(conn, sql);
        if (PQresultStatus(res) != PGRES_COMMAND_OK && PQresultStatus(res) != PGRES_TUPLES_OK) {
            rc = aamm__pg_seterr(err, errsize,
                                 PQstatus(conn) == CONNECTION_OK ? AAMM_ESERVER : AAMM_ECONN,
                                 "ddl: %s", PQerrorMessage(conn));
            PQclear(res);
            aamm__pg_rollback(conn);
            return rc;
        }
        PQclear(res);
    }
    res = PQexecParams(conn,
                       "SELECT aamm.emit_marker($1)",
                       1, NULL, p, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        rc = aamm__pg_seterr(err, errsize, PQstatus(conn) == CONNECTION_OK ? AAMM_ESERVER : AAMM_ECONN,
                             "ddl: marker: %s", PQerrorMessage(conn));
        PQclear(res);
        aamm__pg_rollback(conn);
        return rc;
    }
    PQclear(res);
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
