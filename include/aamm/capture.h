/*
 * capture.h: logical change capture from one replication slot on one PostgreSQL node,
 * decoded from the built-in pgoutput plugin (protocol version 1) into the change model of
 * change.h. Host-driven: the host polls aamm_capture_fd() for aamm_capture_events() with
 * aamm_capture_timeout(), calls aamm_capture_step(), then pulls events with
 * aamm_capture_next() until it returns AAMM_EAGAIN. No threads, no hidden loop.
 *
 * Lifecycle:
 *   aamm_capture_new()    copy the options (no I/O)
 *   aamm_capture_start()  begin the non-blocking setup: connect, check the server, find or
 *                         create the slot, check for gaps, START_REPLICATION; the host's
 *                         loop drives it with fd / events / timeout / step like the
 *                         stream (the fd changes during setup: re-read it after each
 *                         step). aamm_capture_open() is the blocking equivalent.
 *   fd / events / timeout / step / next   streaming, non-blocking
 *   aamm_capture_confirm()  move the flush position reported to the server
 *   aamm_capture_free()
 *
 * Each capture holds two server connections: the replication connection (counts against
 * max_wal_senders) and a catalog connection (setup checks, type names). One slot serves one
 * capture at a time (AAMM_EBUSY otherwise) and no other consumer.
 *
 * Blocking exceptions: libpq resolves host names synchronously when a connection starts;
 * and when a relation uses a type capture has not seen (not built in), next() runs one
 * catalog query for its name (a local round trip, once per type per capture). If the
 * catalog connection was dropped meanwhile, that query first reconnects it once (blocking,
 * bounded by connect_timeout in the conninfo); only a failed reconnect is AAMM_ECONN.
 *
 * Server requirements (checked during setup, each refused with AAMM_EUNSUITABLE and a message
 * naming the setting): PostgreSQL 15 or later, wal_level = logical,
 * track_commit_timestamp = on. Every table in the publications needs a primary key or a
 * replica identity index (capture's own check; libaamm's apply side requires a primary key,
 * and aamm_node_replicate_table() sets REPLICA IDENTITY FULL on every replicated table, so
 * UPDATE and DELETE carry the whole old row). The check runs at open: tables added to the
 * publication later are not checked.
 *
 * Value formats are pinned on the replication session (DateStyle=ISO,
 * IntervalStyle=postgres, extra_float_digits=3, bytea_output=hex, TimeZone=UTC,
 * client_encoding=UTF8), so text values read the same from every node whatever the
 * server's defaults are.
 *
 * Positions. Every transaction is identified by its commit end LSN (struct
 * aamm_transaction.end_lsn). The slot's flush position moves only through
 * aamm_capture_confirm(): the host calls it with an end LSN once the peer has reported
 * that transaction durably applied. Positions where nothing needs delivering
 * (transactions skipped because they were replicated from another node, empty
 * transactions, a server keepalive while the stream is idle) are handed to the host as
 * AAMM_CAPTURE_PROGRESS events, in stream order, when the stream goes idle (and at most
 * once per status interval while it is busy); the host confirms them like a commit, once
 * everything sent before them is acknowledged by the peer (never by sending them as empty
 * transactions: one that writes nothing commits nothing on the peer, so its origin does not
 * move; the replicator, replicator.h, confirms them directly). This keeps WAL from piling
 * up on a node that mostly applies remote data. Capture does not advance the slot by
 * itself. A host that confirms PROGRESS positions cannot use the gap check below with the
 * peer's origin progress as start_lsn (the slot may be past it, legitimately): start with
 * start_lsn = 0 (from the slot's position) and let the link skip what the peer has, as the
 * replicator does.
 *
 * Delivery is at-least-once. After a reconnect the stream resumes at the host's start
 * position (transactions whose commit ends at or before it are not sent again). But on
 * PostgreSQL 15 a slot's confirmed position set only by feedback is not always saved to
 * disk (only when restart_lsn or catalog_xmin also move; saving at shutdown came in 17),
 * so after a server crash or restart a slot may re-send transactions already confirmed
 * when the host starts from 0. Receivers drop duplicates by their replication origin
 * progress.
 *
 * Gaps: the server silently starts from the slot's confirmed position when that is past
 * the requested one; open refuses that with AAMM_EGAP instead of skipping data. A slot
 * that disappeared while the host has progress from it is AAMM_ENOTFOUND, never silently
 * re-created.
 *
 * Origins: transactions that pgoutput marks with a replication origin whose name starts
 * with "aamm_" (applied by libaamm from another node) are skipped (unless forwarded, see
 * forward_origins, or reported, see report_skipped); other origins (a user's
 * own native subscriptions) are delivered with origin_name set. PostgreSQL 15 sends the
 * origin ('O') only while the origin still exists when the WAL is decoded: dropping an
 * aamm_ origin while WAL written under it is still undecoded by some slot makes those
 * transactions look local, so they are shipped again, even back to the node they came
 * from. Drop such an origin only after every slot on the node has confirmed past the
 * last transaction applied under it.
 *
 * Memory stays bounded whatever the transaction size: changes are handed over one at a
 * time and nothing accumulates per transaction. When the host stops pulling events, the
 * capture stops reading the socket (TCP pushes back on the server) but keeps sending
 * standby status updates on time, so the server does not time the connection out.
 *
 * Errors: a dropped connection or server restart gives AAMM_ECONN (sticky). The host frees
 * the capture and creates a new one with its durable start position; the stream resumes
 * from there with nothing lost.
 */
#ifndef AAMM_CAPTURE_H
#define AAMM_CAPTURE_H

#include <stdbool.h>
#include <stdint.h>

#include <aamm/aamm.h>
#include <aamm/change.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Feature macro (see AAMM_HAS_CHANGE_MODEL): this header's API is in the library. */
#define AAMM_HAS_CAPTURE 1

/* Prefix of the replication origin names libaamm applies under; such transactions are
 * skipped by capture. */
#define AAMM_CAPTURE_SKIP_ORIGIN_PREFIX "aamm_"

/** Capture configuration; copied by aamm_capture_new() (strings and arrays too). */
struct aamm_capture_options {
    /* A libpq conninfo string or URI for the node (a normal connection: capture adds
     * replication=database and the pinned formats itself for its replication session,
     * and uses the conninfo as given for its catalog connection). Required. */
    const char *conninfo;
    /* The logical replication slot (pgoutput) to stream from. Required. */
    const char *slot;
    /* Publications to stream (at least one; each must exist). */
    const char *const *publications;
    uint32_t npublications;
    /* This node's id (1..AAMM_NODE_ID_MAX), copied into every aamm_transaction.origin_node. */
    uint32_t node_id;
    /* The host's durable position for this slot (the end LSN of the last transaction its
     * peer applied, or of the last PROGRESS it confirmed). 0 = none (first setup): the
     * slot is created if missing and the stream starts at the slot's position. */
    uint64_t start_lsn;
    /* Send a standby status update at least this often (ms); default 10000. Capped at a
     * third of the server's wal_sender_timeout. */
    int status_interval_ms;
    /* At most this many pgoutput messages are decoded by one aamm_capture_next() call
     * while it skips messages the host does not see (replicated transactions); it then
     * returns AAMM_EAGAIN and aamm_capture_timeout() says 0. Default 1000. */
    int step_budget;
    /* The whole setup (connections, checks, slot creation, START_REPLICATION) must finish
     * within this many ms, else AAMM_ETIMEDOUT. Default 60000. */
    int setup_timeout_ms;
    /* Forwarding (survivors' catch-up, doc/membership.md): transactions applied here under
     * the origin "aamm_from_<n>" for an n in this set are delivered instead of skipped, as
     * if node n had sent them: origin_node = n, commit_lsn = end_lsn = the origin LSN of
     * pgoutput's 'O' message (n's end LSN, which apply recorded), commit_time the commit
     * timestamp (n's), origin_name NULL and origin_lsn 0. The COMMIT event's lsn is then
     * the local WAL end (the slot position to confirm), not txn->end_lsn. Borrowed array,
     * copied; at most AAMM_CAPTURE_MAX_FORWARD entries, each a valid node id. NULL/0: none
     * (every aamm_ origin is skipped, as before). */
    const uint32_t *forward_origins;
    uint32_t nforward_origins;
    /* Hand out an AAMM_CAPTURE_PROGRESS event with @txn set for every transaction skipped
     * for an origin "aamm_from_<n>" (n parsed from the name), so a host can hold its slot
     * until the peer has that transaction from its origin. false: such transactions only
     * move the (coalesced) PROGRESS position, and PROGRESS never carries @txn. */
    bool report_skipped;
};

/** Most node ids in aamm_capture_options.forward_origins. */
#define AAMM_CAPTURE_MAX_FORWARD 64

/** The kinds of event aamm_capture_next() hands out. */
enum aamm_capture_event_kind {
    AAMM_CAPTURE_BEGIN = 1,    /* @txn: a transaction starts (end_lsn not known yet) */
    AAMM_CAPTURE_CHANGE = 2,   /* @change: one change of the current transaction, or a
                                  non-transactional MESSAGE (then possibly outside one) */
    AAMM_CAPTURE_COMMIT = 3,   /* @txn: the transaction ends; end_lsn and commit_lsn set */
    AAMM_CAPTURE_RELATION = 4, /* @relation: a relation's definition, right before the
                                  first change that uses it in this capture and again
                                  before the first change after it changed (its
                                  generation moved) */
    AAMM_CAPTURE_PROGRESS = 5, /* @lsn: nothing to deliver up to here; confirm it once
                                  everything delivered before it is confirmed. With
                                  report_skipped, @txn may be set: then a transaction applied
                                  here from node txn->origin_node (origin "aamm_from_<n>")
                                  was skipped and ends here; txn->origin_lsn is n's end LSN
                                  of it, txn->commit_lsn / end_lsn the local ones (a host that
                                  needs the peer to have it from n first holds @lsn) */
};

/**
 * One event. Everything it points to is borrowed from the capture and valid until the
 * next call of aamm_capture_next(), aamm_capture_step() or aamm_capture_free(); copy what
 * you keep (aamm_transaction_copy, aamm_relation_copy, aamm_tuple_copy).
 */
struct aamm_capture_event {
    enum aamm_capture_event_kind kind;
    const struct aamm_transaction *txn;   /* BEGIN, COMMIT; also set during CHANGE
                                             inside a transaction, and for a skipped
                                             transaction's PROGRESS (report_skipped),
                                             else NULL */
    const struct aamm_change *change;     /* CHANGE */
    const struct aamm_relation *relation; /* RELATION */
    uint64_t lsn;                         /* PROGRESS: the position; COMMIT: the
                                             local end LSN (= txn->end_lsn unless the
                                             transaction is forwarded) */
};

/** Counters of one capture. */
struct aamm_capture_stats {
    uint64_t bytes_received; /* CopyData payload bytes read from the server */
    uint64_t messages;       /* pgoutput messages decoded */
    uint64_t txns_delivered; /* COMMIT events handed out */
    uint64_t txns_skipped;   /* transactions skipped for an aamm_ origin */
    uint64_t txns_forwarded; /* of the delivered: forwarded for forward_origins */
    uint64_t changes_delivered;
    uint64_t status_updates; /* standby status updates sent */
    uint64_t keepalives;     /* keepalives received */
    uint64_t confirmed_lsn;  /* flush position reported to the server */
    uint64_t received_lsn;   /* highest WAL end the server reported */
};

/** An opaque capture handle: one slot's stream on one server (aamm_capture_new()). */
struct aamm_capture;

/**
 * Create a capture with @opts (borrowed; copied, strings and arrays too). No I/O happens.
 * Returns 0 with *@out set (owned by the caller: free with aamm_capture_free());
 * AAMM_EINVAL when a required option is missing or a value is out of range; AAMM_ENOMEM.
 * On failure *@out is NULL and the reason is written into @err (borrowed, @errsize bytes,
 * NUL-terminated; may be NULL).
 */
AAMM_API int aamm_capture_new(struct aamm_capture **out, const struct aamm_capture_options *opts,
                              char *err, size_t errsize);

/** Close the connections and free @c and everything it handed out. NULL is accepted. */
AAMM_API void aamm_capture_free(struct aamm_capture *c);

/**
 * Begin the setup, non-blocking. The host then polls aamm_capture_fd() for
 * aamm_capture_events() with aamm_capture_timeout() and calls aamm_capture_step() (or
 * simply aamm_capture_wait()); next() returns AAMM_EAGAIN until the stream runs. Steps:
 *   1. catalog connection (the conninfo as given); server version >= 15, wal_level =
 *      logical, track_commit_timestamp = on; read wal_sender_timeout;
 *   2. every publication exists; every published table has a key (or REPLICA IDENTITY
 *      FULL);
 *   3. the slot: missing and start_lsn == 0: created with pgoutput (this waits for the
 *      transactions running on the server to end); missing and start_lsn != 0:
 *      AAMM_ENOTFOUND; present but past start_lsn (start_lsn != 0): AAMM_EGAP; present but
 *      not a pgoutput slot of this database: AAMM_EINVAL;
 *   4. the built-in type names are loaded (columns get format_type(oid, NULL));
 *   5. replication connection (replication=database, pinned formats), START_REPLICATION
 *      SLOT ... LOGICAL start (proto_version '1', publication_names, messages 'true').
 * Returns 0 (setup under way) or AAMM_ECONN / AAMM_ESTATE (called twice). Errors of the
 * later steps come from aamm_capture_step() (sticky; the capture is then unusable: free
 * it): AAMM_ECONN (cannot connect); AAMM_EUNSUITABLE (version or setting; the message
 * names it); AAMM_ENOTFOUND (publication or slot, named); AAMM_EINVAL (a table without
 * key, named; a slot of another plugin or database); AAMM_EGAP; AAMM_EBUSY (the slot is
 * in use by another process, e.g. a walsender that has not exited yet: retry with a new
 * capture); AAMM_ESERVER (the server refused a query); AAMM_ETIMEDOUT (setup_timeout_ms
 * passed; a setup query in flight, such as a waiting slot creation, is cancelled);
 * AAMM_ENOMEM.
 */
AAMM_API int aamm_capture_start(struct aamm_capture *c);

/**
 * BLOCKING: aamm_capture_start() and step until the stream runs or setup fails. Returns
 * 0 or any error that start() or the setup steps give.
 */
AAMM_API int aamm_capture_open(struct aamm_capture *c);

/** The socket to poll, or -1 before start / after failure. During setup it changes
 *  (catalog connection, then replication connection): re-read it after each step. */
AAMM_API int aamm_capture_fd(const struct aamm_capture *c);

/** AAMM_READ / AAMM_WRITE: what to poll the fd for now. READ is wanted
 *  only while the host has pulled everything (a paused host stops the reading). */
AAMM_API int aamm_capture_events(const struct aamm_capture *c);

/** Milliseconds until aamm_capture_step() must run even without fd events (a status
 *  update is due, decoded work is waiting, or the setup deadline): 0 = now, -1 = none
 *  (not started or failed). */
AAMM_API int aamm_capture_timeout(const struct aamm_capture *c);

/**
 * Do the I/O possible now without blocking. During setup: advance it (see
 * aamm_capture_start()). While streaming: send a status update when one is due (or
 * shortly after aamm_capture_confirm() moved the position), flush pending output, and
 * read what the socket holds if the host has pulled every event. Bounded work.
 * Invalidates the last event. Returns 0, or the sticky error: a setup error, AAMM_ECONN
 * (connection lost, server restarted or the walsender was terminated; the message says
 * why), AAMM_ESTATE (not started).
 */
AAMM_API int aamm_capture_step(struct aamm_capture *c);

/**
 * Hand out the next event into @ev (written; its pointers are borrowed until the next
 * call). Decodes only what step() has read; never reads the socket (it may send a due
 * status update, and may run one catalog query for an unknown type name, see above).
 * Returns 0 with an event, AAMM_EAGAIN when nothing is available now (also during setup:
 * call step() after the fd is ready or the timeout passed), or a negative error (sticky):
 * AAMM_EMALFORMED (the server sent bytes the parser rejects), AAMM_EPROTO, AAMM_ECONN,
 * AAMM_ESTATE (not started), AAMM_ENOMEM.
 */
AAMM_API int aamm_capture_next(struct aamm_capture *c, struct aamm_capture_event *ev);

/**
 * Blocking helper: wait up to @timeout_ms (-1: forever) for the next event, polling and
 * stepping as needed. Returns 0 with @ev set (as aamm_capture_next(): its pointers are
 * borrowed until the next call), AAMM_EAGAIN when @timeout_ms passed without an event, or
 * an error as for aamm_capture_next() and aamm_capture_step().
 */
AAMM_API int aamm_capture_wait(struct aamm_capture *c, struct aamm_capture_event *ev,
                               int timeout_ms);

/**
 * Confirm @lsn: the end LSN of a transaction (or a PROGRESS position) that the peer has
 * durably applied, together with everything before it. Only this moves the flush
 * position reported to the server (sent at the next step). Confirming a position at or
 * below the current one is a no-op. Returns 0; AAMM_EINVAL when @lsn is past everything
 * handed out so far (that would let the server drop undelivered data); AAMM_ESTATE before
 * the stream runs.
 */
AAMM_API int aamm_capture_confirm(struct aamm_capture *c, uint64_t lsn);

/**
 * Send a standby status update now, without waiting for the status interval (e.g. before
 * freeing the capture, so the last confirmation reaches the server). Non-blocking: output
 * that does not fit goes out at later steps. Returns 0 or the sticky error (AAMM_ECONN,
 * AAMM_ESTATE).
 */
AAMM_API int aamm_capture_send_status(struct aamm_capture *c);

/** The flush position reported (or about to be reported) to the server. */
AAMM_API uint64_t aamm_capture_confirmed(const struct aamm_capture *c);

/** Whether the setup finished and the stream runs (START_REPLICATION accepted); false
 *  before, during setup and after a failure. */
AAMM_API bool aamm_capture_streaming(const struct aamm_capture *c);

/** The slot's position the stream started from (max of start_lsn and the slot's
 *  confirmed position), valid once streaming. */
AAMM_API uint64_t aamm_capture_start_position(const struct aamm_capture *c);

/** Copy the counters into @stats (borrowed, written). */
AAMM_API void aamm_capture_stats(const struct aamm_capture *c, struct aamm_capture_stats *stats);

/** The last error message ("" if none), owned by the capture ("capture: slot
 *  \"aamm_to_2\": ..."). */
AAMM_API const char *aamm_capture_errmsg(const struct aamm_capture *c);

#ifdef __cplusplus
}
#endif
#endif /* AAMM_CAPTURE_H */
