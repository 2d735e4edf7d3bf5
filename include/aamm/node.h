/*
 * node.h: set up a node for libaamm: install or upgrade the library's SQL objects in
 * schema aamm, create the non-superuser apply role with exactly the grants apply needs,
 * mark tables as replicated, manage the publication, collect old tombstones.
 *
 * These calls are blocking, run on a connection the host opened (as a role that may
 * create schemas, roles and triggers: normally a superuser, only at setup time), and each
 * runs in one transaction. On failure they return a negative AAMM_E* code and write the
 * reason into @err (may be NULL) of @errsize bytes.
 *
 * What install creates (all in schema aamm, which must never be published):
 *   aamm.conflict_log   every conflict apply met (time, kind, relation, key, local and
 *                       remote values as JSON, timestamps, origins, resolution)
 *   aamm.tombstone      remembered deletes: (relation, key); the deleting transaction's
 *                       commit timestamp and origin are those of the tombstone row's xmin
 *   functions           the guard apply runs at the start of each remote transaction, the
 *                       conflict decisions (doc/conflicts.md), the tombstone trigger,
 *                       the tombstone collector
 *   generators          snowflake, UUIDv7 and galloc SQL functions with their state
 *                       (aamm.seq_config, aamm.galloc_range; doc/sequences.md)
 *   aamm.replicator_peer, aamm.replication_status
 *                       the replicator's status per peer (unlogged table, node-local) and
 *                       the view over it with each slot's retained WAL (replicator.h)
 *   aamm.ddl_config, aamm.ddl_log, the event trigger aamm_ddl_capture, aamm.apply_ddl()
 *                       DDL in the change stream (ddl.h), off until aamm_ddl_configure()
 *
 * aamm_node_join() brings a new node's data in from a running cluster (an initial copy and
 * the positions its streams start from); aamm_node_part() takes a node out.
 */
#ifndef AAMM_NODE_H
#define AAMM_NODE_H

#include <stddef.h>
#include <stdint.h>

#include <aamm/aamm.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Feature macro: this header's API is in the library (like libpq's LIBPQ_HAS_...). */
#define AAMM_HAS_NODE 1

struct pg_conn;

/** Version of libaamm's SQL schema aamm_node_install() installs: the highest of the
 *  scripts sql/aamm--<n>.sql, aamm--<n>--<m>.sql; the node records it in aamm.apply_meta. */
#define AAMM_NODE_SQL_VERSION 6

/**
 * Install or upgrade libaamm's SQL schema (apply's objects and the SQL generators of
 * seq.h) on the node @conn (borrowed) is connected to: reads the version the node has,
 * runs the scripts from it to AAMM_NODE_SQL_VERSION in order, in one transaction under one
 * advisory lock (a concurrent install waits; a failed one leaves the node as it was).
 * Idempotent. aamm_seq_install() runs the same installer. Returns 0, AAMM_EUNSUPPORTED (the
 * node's schema is newer than this library knows: upgrade the library), AAMM_ESERVER or
 * AAMM_ECONN.
 */
AAMM_API int aamm_node_install(struct pg_conn *conn, char *err, size_t errsize);

/**
 * Create (or update) the apply role @role (copied; LOGIN NOSUPERUSER NOCREATEDB
 * NOCREATEROLE NOREPLICATION BYPASSRLS) and grant it exactly what apply needs, revoking
 * what earlier versions granted beyond that: SET on session_replication_role, EXECUTE on
 * pg_replication_origin_xact_setup, _xact_reset and _progress, the session's origin only
 * through aamm.origin_session() (names aamm_from_<n> only), USAGE on schema aamm, SELECT
 * on aamm.tombstone, EXECUTE on aamm's SECURITY DEFINER functions apply calls. Tables are
 * granted one by one by aamm_node_replicate_table(). What the role can do, and who must
 * therefore hold its credentials (only that node's agent): doc/security.md.
 *
 * @password (borrowed, may be NULL: the role's password is left as it is) is hashed here
 * into a SCRAM-SHA-256 verifier; only the verifier reaches the server, so no server log
 * or statement view can show the password. Call after aamm_node_install(), and again
 * after each upgrade of it (an upgraded install can need other grants). Returns 0,
 * AAMM_EINVAL (empty or unquotable name), AAMM_ENOMEM, AAMM_ESERVER (e.g. the connection's
 * role may not set these attributes: it must be a superuser) or AAMM_ECONN.
 */
AAMM_API int aamm_node_create_apply_role(struct pg_conn *conn, const char *role,
                                         const char *password, char *err, size_t errsize);

/**
 * Make @schema.@table (copied) a replicated table: it must have a primary key; installs
 * the tombstone triggers (they fire for local writers; apply, which runs with
 * session_replication_role = replica, writes the tombstones of what it applies itself),
 * sets REPLICA IDENTITY FULL (needed for unchanged-TOAST convergence, doc/conflicts.md),
 * grants SELECT, INSERT, UPDATE, DELETE, TRUNCATE to @apply_role (may be NULL: no grant),
 * installs the TRUNCATE guard (schema 6: a plain TRUNCATE is refused with AA007 where DDL
 * capture is on; it replicates only under aamm_ddl_execute(), ddl.h) and, when
 * @publication is not NULL, adds the table to that publication (created FOR TABLE when
 * missing: never FOR ALL TABLES, which would publish aamm's own tables), which publishes
 * insert, update and delete only (not truncate).
 * Refuses tables in schema aamm. Returns 0, AAMM_EINVAL, AAMM_ENOTFOUND (no such table
 * or no primary key), AAMM_ESERVER or AAMM_ECONN.
 */
AAMM_API int aamm_node_replicate_table(struct pg_conn *conn, const char *schema, const char *table,
                                       const char *apply_role, const char *publication, char *err,
                                       size_t errsize);

/**
 * Delete tombstones whose deleting transaction committed before @before_us (microseconds
 * since the Unix epoch): pass the cluster watermark, a time every peer has applied
 * everything before. Tombstones whose commit time is unknown are removed too. @removed
 * (may be NULL) gets the count. Returns 0, AAMM_ESERVER or AAMM_ECONN.
 */
AAMM_API int aamm_node_gc_tombstones(struct pg_conn *conn, int64_t before_us, uint64_t *removed,
                                     char *err, size_t errsize);

/**
 * Part node @node_id from the node @conn (borrowed) is connected to, for good: drop the slot
 * aamm_to_<node_id> (ending the walsender that streams it, if one runs: stop this node's
 * replicator first, or remove the peer from its configuration, or it makes the slot again),
 * drop the replication origin aamm_from_<node_id> and the replicator's status row. Run it on
 * every surviving node; remove the member from consensus with
 * aamm_consensus_remove_member(). What the parted node committed and a survivor had not
 * received is not recovered by this call. Idempotent. @dropped (may be NULL) gets the
 * number of objects dropped (slot and origin). The origin is dropped only once every other
 * slot aamm_to_* on this node has confirmed past the last transaction applied under it
 * (until then capture recognizes those transactions by their origin; one decoded after the
 * origin is gone would look local and be sent on): otherwise the slot and status row go,
 * the origin stays, and the call returns AAMM_EAGAIN with a message naming the slots: let
 * the remaining replicators run, then call again. Returns 0, AAMM_EAGAIN, AAMM_EINVAL (node
 * id), AAMM_ESERVER, AAMM_ECONN; the message goes to @err (may be NULL).
 */
AAMM_API int aamm_node_part(struct pg_conn *conn, uint32_t node_id, int *dropped, char *err,
                            size_t errsize);

/** Most existing nodes aamm_node_join() handles (the upstream and the others together). */
#define AAMM_NODE_JOIN_MAX_NODES 32

/** An existing node of the cluster: its node id and an admin conninfo (a role that may
 *  create replication slots and read pg_replication_slots: normally a superuser). */
struct aamm_node_join_peer {
    uint32_t node_id;
    const char *conninfo; /* borrowed */
};

/** Where a join stands, for the progress callback. */
struct aamm_node_join_progress {
    uint32_t tables_done;  /* tables copied completely (aamm.tombstone counts as one) */
    uint32_t tables_total;
    uint64_t rows;         /* rows copied so far */
    uint64_t bytes;        /* COPY text bytes copied so far */
};

/** Options of aamm_node_join(); set with aamm_node_join_options_init(), then fill in. Every
 *  string is borrowed for the call. */
struct aamm_node_join_options {
    const char *conninfo;          /* the new node D, an admin role (superuser) */
    uint32_t node_id;              /* D's node id (aamm_node_id_valid()) */
    uint32_t upstream_id;          /* U: the node whose data D copies */
    const char *upstream_conninfo; /* U, an admin role that may also open a replication
                                      connection (replication=database is added) */
    const struct aamm_node_join_peer *others; /* every other existing node (not U, not D) */
    uint32_t nothers;
    const char *const *tables;     /* "schema.table" (or "table": public) to copy; NULL or
                                      ntables 0: every table of @publication on U */
    uint32_t ntables;
    const char *publication;       /* default "aamm" */
    int parallel;                  /* COPY connections to U and to D; default 4 (1..64) */
    int timeout_ms;                /* bound of each wait (slots, catch-up of U, the
                                      freeze, a stalled copy); default 120000 */
    /* Called (inside aamm_node_join(), never re-entrantly) after each table and about once
     * a second while copying; may be NULL. @p is borrowed for the call. */
    void (*progress)(const struct aamm_node_join_progress *p, void *arg);
    void *progress_arg;
};

/** A replication position aamm_node_join() used for one existing node. */
struct aamm_node_join_position {
    uint32_t node_id;
    uint64_t slot_lsn;   /* where that node's new slot aamm_to_<D> starts (for U: the
                            consistent point of the snapshot D copied) */
    uint64_t origin_lsn; /* D's origin aamm_from_<node> was advanced to this (U's progress
                            for that node at the snapshot; 0 for U itself) */
};

/** What aamm_node_join() did. */
struct aamm_node_join_stats {
    uint32_t tables;     /* tables copied (aamm.tombstone not counted) */
    uint64_t rows;       /* rows copied, tombstones included */
    uint64_t bytes;      /* COPY text bytes */
    uint64_t recent_rows; /* of @rows, those copied with their own commit time and origin
                             (written around the join; the others carry the minimal one) */
    double seconds;      /* wall time of the whole call */
    double copy_seconds; /* of it, the copy (step 4) */
    double freeze_seconds; /* of it, how long apply on U was held (step 3) */
    uint32_t npositions;
    struct aamm_node_join_position positions[AAMM_NODE_JOIN_MAX_NODES]; /* U first */
};

/** Fill @opts with defaults (no nodes, no tables: the publication "aamm", parallel 4,
 *  timeout_ms 120000). */
AAMM_API void aamm_node_join_options_init(struct aamm_node_join_options *opts);

/**
 * Bring a new node D into a running cluster: copy the data of one existing node U while
 * writes go on everywhere, and set up the slots and origins D's replicator and the
 * existing nodes' replicators then stream from, so that D loses no transaction and
 * applies none twice. Blocking; one thread; no output. D must have libaamm's schema
 * (aamm_node_install()) and every table to copy, created and empty. The replicators of the
 * existing nodes must be running (U must receive what the others write).
 *
 * The steps (doc/membership.md, "Join with an initial copy"):
 * 1. on every other node X: the slot aamm_to_<D> (kept when it exists), at L_X;
 * 2. wait until X's slot aamm_to_<U> has confirmed L_X: every X transaction before L_X is on U;
 * 3. on U, under the join freeze (an advisory lock every applied transaction takes shared,
 *    AAMM_JOIN_FREEZE_KEY, held exclusive here for the moment): read U's origin progress
 *    for every aamm_from_<n>, create U's slot aamm_to_<D> exporting a snapshot (an old one
 *    is dropped first), release;
 * 4. copy every table and aamm.tombstone from that snapshot over @parallel COPY pairs into
 *    D, under origins aamm_copy_<k> with the minimal commit time 1970-01-01 UTC (capture
 *    on D skips them; any remote write wins over them); rows whose commit time is not
 *    older than the start of step 1 minus a second keep their own commit time and origin
 *    instead (aamm_from_<n>), so a remote write still in flight compares with the version
 *    U compares with;
 * 5. on D: origins aamm_from_<X> advanced to U's progress for X; aamm_from_<U> at 0/0.
 * Afterwards start D's replicator with every existing node as peer and restart each
 * existing node's replicator with D added (it reuses its slot aamm_to_<D>).
 *
 * @opts (borrowed) the nodes, tables and bounds; @stats (may be NULL) gets what was done.
 * On failure the slots this call created are dropped; D's tables may hold part of the
 * copy (empty them before calling again). Returns 0, AAMM_EINVAL (options, a node id
 * twice, a table on D not empty), AAMM_ENOTFOUND (a table missing on D, named in the
 * message; no aamm schema on D; X has no slot aamm_to_<U>), AAMM_ECONN (a node
 * unreachable or lost), AAMM_ESERVER, AAMM_ETIMEDOUT (a wait passed timeout_ms),
 * AAMM_ENOMEM; the message goes to
 * @err (may be NULL) of @errsize bytes.
 */
AAMM_API int aamm_node_join(const struct aamm_node_join_options *opts,
                            struct aamm_node_join_stats *stats, char *err, size_t errsize);

#ifdef __cplusplus
}
#endif
#endif /* AAMM_NODE_H */
