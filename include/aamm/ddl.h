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
 * Limits (doc/guide.md, "Schema changes"): the statement text is the whole query string
 * the client sent (send each DDL statement as its own query); a transaction that changes a
 * table and then writes rows of its new shape must be split (apply maps a relation before
 * the transaction that uses it starts); TRUNCATE is not replicated as DDL.
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

#ifdef __cplusplus
}
#endif
#endif /* AAMM_DDL_H */
