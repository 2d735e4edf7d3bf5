/*
 * apply.h: apply one source node's transactions to the local PostgreSQL node exactly
 * once, with conflict detection and resolution. Host-driven I/O over libpq.
 *
 * One apply handle = one stream (one source node). It connects to the local node, sets
 * up the replication origin "aamm_from_<source node>" (created when missing) and applies
 * every remote transaction as one local transaction under that origin, committed with the
 * remote end LSN and commit timestamp (pg_replication_origin_xact_setup), so the rows
 * carry the origin's commit time and node and the origin's progress moves in the same
 * commit as the data.
 *
 * Feeding: aamm_apply_begin(), aamm_apply_change() for each change, aamm_apply_commit().
 * The handle keeps every transaction (but a streamed one, see "Huge transactions") until
 * its local commit is flushed (so it can retry transient failures, resume a held stream
 * without the source resending, and apply again what a crash of the local server took back
 * from an unflushed commit under synchronous_commit_off; the callbacks of such a
 * transaction then run again); at most
 * max_queued_changes changes may be queued (AAMM_EAGAIN beyond: step and try again).
 * Duplicates are dropped (at-least-once delivery becomes exactly-once): aamm_apply_commit()
 * drops a transaction at or below the last one it accepted or the origin's progress, and
 * one without changes (it would commit nothing); a transaction queued before the origin's
 * progress was read is skipped when sent if that progress covers it.
 *
 * Driving: poll aamm_apply_fd() for aamm_apply_events(), at most aamm_apply_timeout()
 * ms, then call aamm_apply_step(). Or use aamm_apply_flush(), a blocking helper.
 *
 * Huge transactions: once the OPEN transaction (begun, not yet committed by the host) has
 * more than max_txn_changes changes and every earlier transaction is committed, apply
 * STREAMS it: its guard and changes go down the pipeline while it is fed, and each change
 * is freed once its statement answered; aamm_apply_change() returns AAMM_EAGAIN while
 * more than 2 x max_txn_changes of its changes are unanswered (step, then call again), so
 * its memory stays bounded whatever its size. Its Sync (the local commit) goes out at
 * aamm_apply_commit(). Streaming needs the transaction's commit LSN and commit time at
 * aamm_apply_begin() (pgoutput's BEGIN carries both; the rows are written with that commit
 * time), and a commit LSN not below aamm_apply_received() (else it may be a duplicate and
 * is held whole, then dropped at commit). Key locks are taken as its changes go out, a
 * chunk at a time (not all before the first write): concurrent appliers may deadlock on
 * them, which fails it like any transient error. A streamed transaction cannot be retried
 * from memory: when it fails for any reason (a transient error, the connection lost, a
 * conflict for the resolver, a permanent error, a server crash taking back its unflushed
 * commit) apply discards it and everything fed after it (an open transaction too), resets
 * aamm_apply_received() to the progress, and aamm_apply_step() returns AAMM_EGAP once with
 * "apply: streamed transaction <commit LSN> failed (<why>): resend from <flushed LSN>".
 * The host then feeds again from aamm_apply_flushed() (a link: drop it, the peer resumes
 * from the acknowledged position); what apply still holds between the flushed position and
 * the progress is dropped as duplicates. When the failure was not transient, that
 * transaction is not streamed again (it is held whole, so a permanent error holds the
 * stream and a resolver runs as usual). While a streamed transaction is open,
 * aamm_apply_flush() cannot finish (nothing else is committed before it): commit it first.
 *
 * Pipelining: queued transactions are sent in libpq pipeline mode, each as
 * BEGIN; guard; changes; COMMIT; Sync. The guard raises unless the origin's progress
 * equals the previous transaction's end LSN, so once transaction N fails, no later one
 * can commit; it also takes the transaction's key locks. Runs of inserts into one relation
 * go out as one statement (doc/ARCHITECTURE.md, "Apply statements").
 *
 * Errors: transient ones (deadlock 40P01, lock timeout 55P03, serialization 40001,
 * connection loss) are retried from the first uncommitted transaction with backoff;
 * permanent ones (a missing table or column, a value that does not parse, a unique index
 * other than the key, a conflict under the "error" policy) HOLD the stream:
 * aamm_apply_step() returns the error, nothing later is applied, nothing is dropped;
 * after the cause is fixed, aamm_apply_resume() retries (re-reading the local catalog).
 *
 * The session runs with session_replication_role = replica, search_path = '' and the
 * same pinned formats as capture (DateStyle ISO, IntervalStyle postgres,
 * extra_float_digits 3, bytea_output hex, TimeZone UTC, client_encoding UTF8); columns are
 * mapped by name against the local catalog; every identifier is quoted and every value is
 * a bound parameter cast to the local column type. The node must have the library's SQL
 * objects installed (aamm_node_install(), node.h).
 */
#ifndef AAMM_APPLY_H
#define AAMM_APPLY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <aamm/aamm.h>
#include <aamm/change.h>
#include <aamm/conflict.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AAMM_HAS_APPLY 1

struct aamm_apply;

/**
 * Logical message callback: a MESSAGE change reached the stream; transactional messages
 * are reported after their transaction committed locally, others at the next step.
 * @prefix and @content (@len bytes) are borrowed.
 */
typedef void (*aamm_apply_message_cb)(struct aamm_apply *ap, bool transactional, const char *prefix,
                                      const char *content, size_t len, void *arg);

/**
 * A host resolver (aamm_apply_set_resolver()): decides one conflict of kind
 * INSERT_EXISTS, UPDATE_ORIGIN_DIFFERS, DELETE_ORIGIN_DIFFERS or UPDATE_MISSING (the others
 * have nothing to decide). @conflict (borrowed) carries the relation, the key, the local row
 * as JSON with its version (commit timestamp, origin node; no local row for UPDATE_MISSING
 * and for an INSERT_EXISTS met by a remembered delete, whose version is then the delete's)
 * and the remote row as JSON with its version; its resolution field is 0. @relation
 * (borrowed) names the remote columns. @merged (owned by apply) holds the remote row (for a
 * delete: the remote old row) in @relation's column order.
 *
 * Return AAMM_RESOLVE_APPLY_REMOTE, AAMM_RESOLVE_KEEP_LOCAL, AAMM_RESOLVE_ERROR (the stream
 * is held with AAMM_ECONFLICT), or AAMM_RESOLVE_MERGED after editing @merged with
 * aamm_value_set(): that row is written instead of the remote one (for a delete conflict
 * the row stays, with these values). Anything else counts as ERROR.
 *
 * How it runs: the server-side decision stops the transaction that meets the conflict;
 * apply calls the resolver from aamm_apply_step(), then retries the transaction with the
 * verdict, which holds only while the local row is the version the resolver saw (a local
 * write in between asks again). So a resolver may run more than once for one conflict and
 * must not assume it ran in the transaction that commits; the conflict is logged and
 * reported (on_conflict) once, when the transaction commits. Each callback conflict costs
 * a retry of its transaction: use the built-in policies for hot paths.
 */
typedef enum aamm_resolution (*aamm_apply_resolver_cb)(struct aamm_apply *ap,
                                                       const struct aamm_conflict *conflict,
                                                       const struct aamm_relation *relation,
                                                       struct aamm_tuple *merged, void *arg);

/**
 * Conflict notification callback (aamm_apply_options.on_conflict): runs inside
 * aamm_apply_step() of @ap after the transaction that met the conflict committed
 * (UNIQUE_OTHER: when the stream stops), for each conflict written to aamm.conflict_log
 * (the decisions only counted, aamm_apply_stats()'s conflicts_unlogged, are not reported).
 * @conflict is borrowed: valid only during the call. @arg is conflict_arg. It must not free
 * @ap.
 */
typedef void (*aamm_apply_conflict_cb)(struct aamm_apply *ap, const struct aamm_conflict *conflict,
                                       void *arg);

/** Options for aamm_apply_new(). Zero-initialize, then set what you need. */
struct aamm_apply_options {
    const char *conninfo;             /* copied: libpq connection string of the local node;
                                         log in as the apply role made by
                                         aamm_node_create_apply_role() (node.h), never as a
                                         superuser: it has exactly the rights apply needs */
    uint32_t local_node;              /* this node's id (1..AAMM_NODE_ID_MAX) */
    uint32_t source_node;             /* the source node's id (likewise, != local_node) */
    size_t max_queued_changes;        /* queue bound in changes (0: 100000) */
    size_t max_pipeline_txns;         /* transactions in flight at once (0: 1000) */
    size_t max_txn_changes;           /* streaming threshold (0: 50000; SIZE_MAX: never
                                         stream): an open transaction with more changes is
                                         streamed (see "Huge transactions" above) */
    bool synchronous_commit_off;      /* apply with synchronous_commit = off (safe: acks use
                                         the flushed origin progress) */
    bool lock_keys;                   /* lock each transaction's keys (advisory locks, taken by the
                                         guard statement; a relation lock above 64 keys) so
                                         concurrent appliers of different sources cannot race a
                                         delete against an insert (aamm_apply_options_init: true) */
    enum aamm_conflict_policy policy; /* global default policy (LWW) */
    aamm_apply_conflict_cb on_conflict; /* may be NULL */
    void *conflict_arg;
    aamm_apply_message_cb on_message;   /* may be NULL: messages are dropped */
    void *message_arg;
};

/** Fill @opts (borrowed) with defaults. */
AAMM_API void aamm_apply_options_init(struct aamm_apply_options *opts);

/**
 * Create an apply handle; it starts connecting at the first aamm_apply_step().
 * @out receives the handle (owned by the caller, free with aamm_apply_free()); @opts is
 * borrowed (strings copied). Returns 0; AAMM_EINVAL (no conninfo, a node id outside
 * 1..AAMM_NODE_ID_MAX, source_node == local_node); AAMM_ENOMEM. On failure *@out is NULL
 * and the reason is written into @err (borrowed, @errsize bytes, NUL-terminated; may be
 * NULL).
 */
AAMM_API int aamm_apply_new(struct aamm_apply **out, const struct aamm_apply_options *opts,
                            char *err, size_t errsize);

/** Close the connection and free everything. NULL accepted. */
AAMM_API void aamm_apply_free(struct aamm_apply *ap);

/**
 * Set the policy for one relation (@schema, @name copied), overriding the global one.
 * Returns 0 or AAMM_ENOMEM.
 */
AAMM_API int aamm_apply_set_policy(struct aamm_apply *ap, const char *schema, const char *name,
                                   enum aamm_conflict_policy policy);

/**
 * Install @fn (with @arg) as the resolver for the relation @schema.@name (copied), or for
 * every relation without a relation-level policy or resolver when both are NULL; @fn NULL
 * removes it (the policy rules again). A relation-level resolver or policy set later
 * overrides an earlier one. Returns 0, AAMM_EINVAL or AAMM_ENOMEM.
 */
AAMM_API int aamm_apply_set_resolver(struct aamm_apply *ap, const char *schema, const char *name,
                                     aamm_apply_resolver_cb fn, void *arg);

/**
 * Start a remote transaction (@txn borrowed: origin node must be the source node; the
 * end LSN may still be unknown). Returns 0, AAMM_ESTATE (a transaction is open),
 * AAMM_EINVAL or AAMM_ENOMEM.
 */
AAMM_API int aamm_apply_begin(struct aamm_apply *ap, const struct aamm_transaction *txn);

/**
 * Add a change to the open transaction, or hand over a non-transactional message when
 * none is open. The change's contents are transferred on success (@change is zeroed; its
 * relations are borrowed and copied into the handle's relation cache).
 * Returns 0, AAMM_ESTATE, AAMM_EAGAIN (queue full, or a streamed transaction has
 * max_txn_changes x 2 changes unanswered: step, then call again), AAMM_EINVAL or
 * AAMM_ENOMEM.
 */
AAMM_API int aamm_apply_change(struct aamm_apply *ap, struct aamm_change *change);

/**
 * Close the open transaction; @txn (borrowed) must now carry end_lsn and commit_time.
 * The transaction is dropped here (freed, counted in the stats' skipped, never queued)
 * when it has no changes at all (a PostgreSQL commit that writes nothing does not move
 * the origin's progress, so the next transaction's guard would trip; message-only
 * transactions are kept) or when its end LSN is at or below the highest one already
 * accepted: the last transaction queued (committed or not) or the origin's progress
 * read at setup. So a sender that resumes from the flushed position after a reconnect
 * may send again what apply holds. Transactions queued before the progress was read are
 * skipped when sent if it covers them. Returns 0 (also when dropped), AAMM_ESTATE (none
 * open) or AAMM_EINVAL (no end LSN; the transaction stays open).
 */
AAMM_API int aamm_apply_commit(struct aamm_apply *ap, const struct aamm_transaction *txn);

/**
 * Discard the open transaction (begun with aamm_apply_begin(), not yet closed with
 * aamm_apply_commit()), freeing the changes queued in it; nothing of it was sent. For a
 * link that dropped in the middle of a transaction: the sender sends it again, whole,
 * after reconnecting, and aamm_apply_begin() may start it again. Transactions already
 * committed to the handle are not touched. A streamed open transaction (partly sent):
 * the connection is closed, so the server rolls it back, and a new one is made at the next
 * step. May be called at any time. Returns 0, also when no transaction is open.
 */
AAMM_API int aamm_apply_abort(struct aamm_apply *ap);

/** The socket to poll, or -1 (not connected: call aamm_apply_step() after the timeout). */
AAMM_API int aamm_apply_fd(const struct aamm_apply *ap);

/** What the fd waits for: AAMM_READ and/or AAMM_WRITE. */
AAMM_API int aamm_apply_events(const struct aamm_apply *ap);

/** Milliseconds until aamm_apply_step() must run even without events, -1 for none. */
AAMM_API int aamm_apply_timeout(const struct aamm_apply *ap);

/**
 * Do bounded work: connect, send queued transactions, read results, retry transient
 * failures, run callbacks. One step sends at most a fixed budget of statements (a huge
 * transaction goes out over many steps), takes at most a budget of results and frees at
 * most a budget of changes (a few milliseconds each, doc/ARCHITECTURE.md "Bounded
 * steps"); when it stopped at one, aamm_apply_timeout() is 0: step again at once. Returns 0, or a permanent error (the stream is held; see
 * aamm_apply_errmsg(); AAMM_ENOTFOUND missing table/column, AAMM_ESERVER, AAMM_ECONFLICT
 * for UNIQUE_OTHER or the error policy). Calling it again while held returns the same
 * error without doing anything. AAMM_EGAP (not held, returned once): a streamed
 * transaction failed and was discarded with everything fed after it; feed again from
 * aamm_apply_flushed() ("Huge transactions" above).
 */
AAMM_API int aamm_apply_step(struct aamm_apply *ap);

/**
 * Blocking helper: step (polling the fd) until every queued transaction is committed,
 * the stream is held, or @timeout_ms passes. Returns 0, the held error, or
 * AAMM_ETIMEDOUT.
 */
AAMM_API int aamm_apply_flush(struct aamm_apply *ap, int timeout_ms);

/**
 * Release a held stream: forget the local catalog cache and prepared statements, then
 * retry from the first uncommitted transaction at the next step. Returns 0 or
 * AAMM_ESTATE when not held.
 */
AAMM_API int aamm_apply_resume(struct aamm_apply *ap);

/** Whether the stream is held by a permanent error. */
AAMM_API bool aamm_apply_held(const struct aamm_apply *ap);

/** Whether the session is set up and the origin's progress is known. */
AAMM_API bool aamm_apply_ready(const struct aamm_apply *ap);

/** End LSN of the last remote transaction committed locally (origin progress, not yet
 *  necessarily flushed); AAMM_LSN_INVALID before the first. */
AAMM_API uint64_t aamm_apply_progress(const struct aamm_apply *ap);

/**
 * The end LSN of the last transaction aamm_apply_commit() accepted (queued, in flight or
 * committed; dropped ones do not count), and at least the origin's progress once the
 * session is ready (aamm_apply_ready()); AAMM_LSN_INVALID (0) before either. Anything the
 * source sends at or below it is dropped as a duplicate. For status and lag (what the
 * source sent and apply holds); acknowledge aamm_apply_flushed(), never this.
 */
AAMM_API uint64_t aamm_apply_received(const struct aamm_apply *ap);

/**
 * The durable position to acknowledge to the source: the last value read of
 * pg_replication_origin_progress(origin, true) (flushed). Apply re-reads it after every
 * batch of commits.
 */
AAMM_API uint64_t aamm_apply_flushed(const struct aamm_apply *ap);

/**
 * Number of transactions queued or in flight (not yet committed or skipped): the host's
 * event-loop signal (0: everything handed over is committed). Also in the stats.
 */
AAMM_API size_t aamm_apply_pending(const struct aamm_apply *ap);

/** Counters of one apply handle, since it was made. */
struct aamm_apply_stats {
    uint64_t committed; /* remote transactions committed locally */
    uint64_t skipped;   /* transactions dropped: duplicates (at or below what was accepted
                           or the progress) and transactions without changes */
    size_t pending;     /* queued or in flight now (aamm_apply_pending()) */
    /* Conflict decisions per kind (index: enum aamm_conflict_kind; 0 unused): every one in
     * committed transactions, logged or not, plus stream-stopping UNIQUE_OTHER ones. */
    uint64_t conflicts[AAMM_CONFLICT_NKINDS];
    /* Of conflicts[], those not written to aamm.conflict_log nor reported to on_conflict:
     * a remote UPDATE or DELETE applied over a row another node wrote last, when the change
     * carried no old row (default replica identity: a concurrent write cannot be told
     * apart) or its old row equals the local row (its writer had seen our version: no
     * concurrency). Only UPDATE_ORIGIN_DIFFERS and DELETE_ORIGIN_DIFFERS; doc/conflicts.md,
     * "What is logged". */
    uint64_t conflicts_unlogged[AAMM_CONFLICT_NKINDS];
};

/** Copy the counters of @ap into @stats (borrowed, written). May be called at any time. */
AAMM_API void aamm_apply_stats(const struct aamm_apply *ap, struct aamm_apply_stats *stats);

/** The last error message (borrowed, valid until the next call), "" if none. */
AAMM_API const char *aamm_apply_errmsg(const struct aamm_apply *ap);

#ifdef __cplusplus
}
#endif
#endif /* AAMM_APPLY_H */
