/*
 * ddl.h: schema changes in the change stream.
 *
 * On a node where DDL capture is on, an event trigger (installed by aamm_node_install(),
 * schema version 4: sql/aamm--3--4.sql) emits each DDL statement of the allow-list as a
 * transactional logical message with prefix AAMM_DDL_MESSAGE_PREFIX: the statement text as
 * the client sent it, its search_path, its role and command tags. The message travels in
 * commit order with the data around it, through capture, the links and apply, which runs
 * it on each peer where DDL apply is on, at its place in the stream, as the origin's role
 * (the apply role must be a member of that role: the per-node opt-in), never as a
 * superuser; a peer that has not opted in logs it as skipped in aamm.ddl_log. Apply maps
 * columns by name, so rows in the old and the new shape around a DDL both apply.
 *
 * With capture on, a DDL command outside the allow-list is refused on the origin with
 * SQLSTATE AA007 and a hint; node-local DDL (an index on one node only, REINDEX, VACUUM
 * FULL, maintenance) runs after `SET aamm.replicate_ddl = off` in that session.
 *
 * Ordering across nodes: aamm_ddl_execute() takes the global DDL lock through consensus
 * (its fencing token is reported), waits until every peer has applied everything this
 * node sent before, runs the DDL, waits until every peer has applied it, and releases.
 *
 * SQL form (schema version 6): `CALL aamm.ddl_execute('ALTER TABLE ...'[, timeout])` records
 * a request in aamm.ddl_request for the caller's role (a superuser role is refused: SET ROLE
 * to the tables' owner first), notifies channel "aamm_ddl" and waits until the node's agent,
 * which calls aamm_ddl_serve(), has run it with aamm_ddl_execute() (NOTICE with the token),
 * it failed (an error with the agent's message, SQLSTATE AA008) or the timeout passed (the
 * request is abandoned: it never runs later). It commits, so it must be CALLed outside a
 * transaction block.
 *
 * TRUNCATE (schema version 6): the publication does not publish truncate (row rules cannot
 * make it converge); a plain TRUNCATE of a replicated table is refused with AA007 where
 * capture is on, is node-local after `SET aamm.replicate_ddl = off`, and under
 * aamm_ddl_execute() travels as a DDL message (command tag TRUNCATE TABLE in the
 * allow-list) that the peers run at its place in the stream. Writes to the table on other
 * nodes while it runs can survive on some nodes: stop the table's writers first.
 *
 * Limits (doc/guide.md, "Schema changes"): the statement text is the whole query string
 * the client sent (send each DDL statement as its own query); a transaction that changes a
 * table and then writes rows of its new shape must be split (apply maps a relation before
 * the transaction that uses it starts).
 */
#ifndef AAMM_DDL_H
#define AAMM_DDL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <aamm/aamm.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Feature macro: this header's API is in the library. */
#define AAMM_HAS_DDL 1

/** Prefix of the logical messages that carry DDL (apply runs them; other hosts may read
 *  them as AAMM_CHANGE_MESSAGE changes). */
#define AAMM_DDL_MESSAGE_PREFIX "aamm_ddl"

struct pg_conn;
struct aamm_replicator;

/**
 * Turn DDL replication on or off on the node @conn (borrowed) is connected to, blocking:
 * @capture sends this node's DDL to its peers, @apply runs DDL received from them (the
 * apply role must also be a member of the roles whose DDL it runs: GRANT owner TO
 * apply_role). Returns 0, AAMM_ENOTFOUND (schema older than version 4: run
 * aamm_node_install()), AAMM_ESERVER, AAMM_ECONN; the message goes to @err (may be NULL).
 */
AAMM_API int aamm_ddl_configure(struct pg_conn *conn, bool capture, bool apply, char *err,
                                size_t errsize);

/** Figures of one aamm_ddl_execute(). */
struct aamm_ddl_stats {
    uint64_t token;      /* the lock's fencing token (consensus log index) */
    int64_t acquire_ms;  /* until the lock was granted */
    int64_t drain_ms;    /* until every peer had applied what this node sent before */
    int64_t run_ms;      /* the DDL itself, locally */
    int64_t propagate_ms; /* until every peer had applied the DDL */
    int64_t release_ms;  /* until the release was committed */
    uint64_t ddl_lsn;    /* WAL position just past the DDL's commit on this node */
};

/**
 * Run @sql (borrowed; one DDL statement) cluster-wide under the global DDL lock, blocking
 * for at most @timeout_ms while it steps @r (a started replicator with consensus) itself:
 *   1. acquire the lock (lease @timeout_ms; a second node asking meanwhile gets AAMM_EBUSY
 *      from its own call; a holder that dies loses it when the lease ends);
 *   2. wait until every peer has acknowledged everything this node sent up to now;
 *   3. run @sql on @conn (borrowed: the host's connection; the DDL runs as its role, which
 *      the peers' apply roles must be members of) with DDL replication on for it;
 *   4. wait until every peer has acknowledged the DDL's transaction;
 *   5. release the lock.
 * @st (may be NULL) receives the figures. Returns 0; AAMM_EBUSY (another holder: the
 * message names it); AAMM_EUNSUPPORTED (no consensus); AAMM_ESERVER (the DDL failed: nothing
 * was replicated; the lock is released); AAMM_ETIMEDOUT (the lock is released when it was
 * taken; if the DDL ran, it is replicated all the same); AAMM_ECONN. The message goes to
 * @err (may be NULL).
 */
AAMM_API int aamm_ddl_execute(struct aamm_replicator *r, struct pg_conn *conn, const char *sql,
                              int timeout_ms, struct aamm_ddl_stats *st, char *err,
                              size_t errsize);

/**
 * Serve one request of the SQL form (CALL aamm.ddl_execute(), schema version 6) on the node
 * @conn (borrowed: the host's connection, as a role that may SET ROLE to the requesting
 * roles, e.g. the agent's superuser connection) is connected to: claim the oldest pending
 * request of aamm.ddl_request (FOR UPDATE SKIP LOCKED; requests past their deadline are
 * marked abandoned instead, running ones a minute past it failed: their agent stopped, and
 * finished ones a week old are deleted), mark it running, run it through aamm_ddl_execute() on @r (a
 * started replicator with consensus) as the requesting role (SET ROLE on @conn, reset
 * afterwards, also on failure) with its search_path, for at most @timeout_ms or what is left
 * of the request's own timeout, and record done (with the lock's token) or failed (with the
 * message). It blocks while the request runs, as aamm_ddl_execute() does, stepping @r itself.
 * The host calls it from its loop: when a notification on channel "aamm_ddl" (LISTEN on a
 * connection of its own) wakes it, or once a second.
 * @served (may be NULL) is set to 1 when a request was claimed (its outcome is recorded in
 * aamm.ddl_request even when this returns an error of aamm_ddl_execute()), else 0.
 * Returns 0 (no request pending, or one served and done); an error of aamm_ddl_execute()
 * for a served request that failed (recorded as failed); AAMM_EINVAL; AAMM_EUNSUPPORTED (no
 * consensus: nothing is claimed); AAMM_ENOTFOUND (schema older than version 6);
 * AAMM_ESERVER or AAMM_ECONN (on @conn; a request claimed then may stay 'running'). The
 * message goes to @err (may be NULL).
 */
AAMM_API int aamm_ddl_serve(struct aamm_replicator *r, struct pg_conn *conn, int timeout_ms,
                            int *served, char *err, size_t errsize);

#ifdef __cplusplus
}
#endif
#endif /* AAMM_DDL_H */
