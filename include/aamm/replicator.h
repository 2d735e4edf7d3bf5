/*
 * replicator.h: one node's whole share of active-active replication, as one host-driven
 * object. For every peer it owns the outgoing stream (a capture on slot aamm_to_<peer> and a
 * sender link dialed to the peer, reconnected with backoff) and the incoming stream (an
 * apply handle for origin aamm_from_<peer> and the receiver link the peer dials; accepted
 * sockets are bound to a peer by the authenticated handshake), turns the peer's acks into
 * slot confirmations and its own flushed origin progress into acks and resume positions,
 * confirms positions that need no ack (PROGRESS past filtered transactions) so the slots
 * of a node that only applies still advance, optionally runs the node's consensus member
 * and galloc supply, and keeps status (per peer: link states, lag, rates, conflicts, held
 * streams) that it also publishes into the view aamm.replication_status on the node.
 *
 * It is built only on the public headers (capture.h, link.h, apply.h, consensus.h,
 * galloc.h, node.h): a host that wants another composition uses those parts directly and
 * gets the same guarantees (exactly once: the slot only moves past what the peer reported
 * flushed; nothing lost across a kill -9 of anything).
 *
 * Driving it (like libcurl's multi interface; no threads, no hidden loop):
 *
 *     aamm_replicator_new(&r, &opts, err, sizeof err);
 *     aamm_replicator_start(r);                        // blocking setup, bounded
 *     for (;;) {
 *         struct aamm_replicator_pollfd fds[AAMM_REPLICATOR_MAX_FDS];
 *         size_t n = aamm_replicator_fds(r, fds, AAMM_REPLICATOR_MAX_FDS);
 *         ... poll / epoll / libuv on fds[i].fd for fds[i].events (AAMM_READ/AAMM_WRITE),
 *             at most aamm_replicator_timeout(r) ms ...
 *         aamm_replicator_step(r);                     // never blocks; bounded work
 *     }
 *     aamm_replicator_stop(r);                         // goodbye to peers, bounded
 *     aamm_replicator_free(r);
 *
 * The set of fds changes between steps (links come and go): re-read it after every step.
 * aamm_replicator_run() is a blocking helper that does exactly the loop above for a while.
 *
 * Topology: a full mesh. Each node dials one sender link to every peer and accepts
 * receiver links on its listen address; so for a pair A, B, A dials B with A's changes and
 * B dials A with B's. Every node therefore needs a listen address its peers can reach.
 */
#ifndef AAMM_REPLICATOR_H
#define AAMM_REPLICATOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <aamm/aamm.h>
#include <aamm/apply.h>
#include <aamm/conflict.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Feature macro: this header's API is in the library. */
#define AAMM_HAS_REPLICATOR 1

/** Most peers one replicator serves. */
#define AAMM_REPLICATOR_MAX_PEERS 62

/** Most fds aamm_replicator_fds() reports (enough for every peer, the listener, pending
 *  accepts, the status connection and consensus). */
#define AAMM_REPLICATOR_MAX_FDS (5 * AAMM_REPLICATOR_MAX_PEERS + 24)

/** Most galloc sequences one replicator supplies. */
#define AAMM_REPLICATOR_MAX_SEQUENCES 16

struct aamm_replicator;

/** One peer node. Strings are copied by aamm_replicator_new(). */
struct aamm_replicator_peer {
    uint32_t node_id;         /* 1..AAMM_NODE_ID_MAX, not this node's */
    const char *name;         /* label for logs and status (may be NULL: "node<id>") */
    const char *host;         /* where its replicator listens (required) */
    const char *port;         /* likewise (a number or a service name) */
    const char *raft_address; /* its consensus address "a.b.c.d:port" (with consensus only) */
};

/** Options for aamm_replicator_new(). Start from aamm_replicator_options_init(). */
struct aamm_replicator_options {
    uint32_t node_id;      /* this node, 1..AAMM_NODE_ID_MAX. Required */
    const char *node_name; /* label (NULL: "node<id>") */

    /* libpq conninfo of the local node for capture (replication connections) and the
     * replicator's own control connection (slot creation at start, status view, galloc
     * supply). A superuser, or a role with REPLICATION plus INSERT, UPDATE, DELETE on
     * aamm.replicator_peer and EXECUTE on aamm's galloc supply functions (doc/guide.md).
     * Required. */
    const char *conninfo;
    /* libpq conninfo for apply: log in as the apply role made by
     * aamm_node_create_apply_role() (never a superuser in production). NULL: conninfo. */
    const char *apply_conninfo;
    /* Publications capture streams (NULL/0: the one publication "aamm"). */
    const char *const *publications;
    uint32_t npublications;

    /* Link: cluster name and pre-shared secret (>= 16 bytes), shared by every node. */
    const char *cluster;
    const uint8_t *secret;
    size_t secret_len;
    /* Where to accept peers' links (NULL host: "127.0.0.1"; NULL port: accept nothing). */
    const char *listen_host;
    const char *listen_port;
    /* TLS for every link (link.h): CA, this node's certificate and key. */
    bool tls;
    const char *tls_ca_file;
    const char *tls_cert_file;
    const char *tls_key_file;

    const struct aamm_replicator_peer *peers; /* copied; 1..AAMM_REPLICATOR_MAX_PEERS */
    uint32_t npeers;

    /* Timing (ms; 0: default). */
    int reconnect_min_ms;   /* first retry of a failed link or capture (default 200) */
    int reconnect_max_ms;   /* backoff ceiling (default 5000) */
    int heartbeat_ms;       /* link heartbeat (default 1000) */
    int dead_after_ms;      /* link dead-peer limit (default 10000) */
    int held_retry_ms;      /* retry a held apply stream this often (default 5000) */
    int status_interval_ms; /* refresh aamm.replication_status this often (default 1000;
                               -1: never write it) */
    int start_timeout_ms;   /* aamm_replicator_start()'s bound (default 60000) */

    /* Apply: commit synchronously (default false: acks come from the flushed origin
     * progress, so nothing acked can be lost either way; asynchronous commit keeps the
     * lag, which is the conflict window, small). */
    bool apply_synchronous_commit;
    size_t apply_max_queued_changes; /* per incoming stream (0: apply's default) */
    size_t apply_max_txn_changes;    /* per incoming stream: a transaction with more changes
                                        is streamed into the local node while it arrives,
                                        its memory bounded (apply.h, "Huge transactions";
                                        0: apply's default, SIZE_MAX: never); when a
                                        streamed one fails, the link is dropped and the
                                        peer sends again from the flushed position */
    size_t send_queue_bytes;         /* per sender link (0: link's default) */
    enum aamm_conflict_policy policy; /* default policy of every incoming stream (LWW) */
    /* Resolver for every relation of every incoming stream (may be NULL). */
    aamm_apply_resolver_cb resolver;
    void *resolver_arg;

    /* Consensus (optional: raft_address NULL means none). The members are this node and
     * every peer with a raft_address; bootstrap_consensus makes a brand-new cluster of
     * them on a pristine data dir (the same list on every initial member). Membership then
     * follows the configuration, adding only: the leader adds every configured peer with a
     * raft_address that is not a member yet, so a node joins by starting its replicator
     * without bootstrap_consensus on an empty data dir while the existing nodes' hosts add
     * it as a peer. Removing a member stays explicit (aamm_consensus_remove_member() on
     * aamm_replicator_consensus(), once the peer is out of every node's configuration). */
    const char *raft_address;
    const char *raft_data_dir;
    bool bootstrap_consensus;
    /* galloc sequences (with consensus): the replicator keeps the node's
     * aamm.galloc_nextval(name) supplied with ranges granted through consensus (it moves a
     * range to the node whenever fewer than one range of values is left there). A host
     * that wants galloc values in C attaches its own aamm_galloc to
     * aamm_replicator_consensus(). */
    const char *const *sequences;
    uint32_t nsequences;
    int64_t sequence_range_size; /* 0: 1000 */
};

/** Fill @opts (borrowed) with zeros and the defaults. */
AAMM_API void aamm_replicator_options_init(struct aamm_replicator_options *opts);

/**
 * A conflict met by the incoming stream from @peer committed (apply.h's on_conflict, with
 * the peer's id): @conflict is borrowed for the call. Runs inside aamm_replicator_step().
 */
typedef void (*aamm_replicator_conflict_cb)(struct aamm_replicator *r, uint32_t peer,
                                            const struct aamm_conflict *conflict, void *arg);
/**
 * A peer's stream changed state: @peer, @what ("out" the sender link and capture, "in" the
 * receiver link and apply), @ok (true: streaming again; false: stopped), @reason (borrowed,
 * the error that stopped it, or "" when ok). Runs inside aamm_replicator_step().
 */
typedef void (*aamm_replicator_stream_cb)(struct aamm_replicator *r, uint32_t peer,
                                          const char *what, bool ok, const char *reason,
                                          void *arg);

/**
 * Create a replicator: validate @opts (borrowed; everything copied). Opens nothing yet.
 * Returns 0 with *@out set (free with aamm_replicator_free()); AAMM_EINVAL (missing or
 * out-of-range option: node ids, duplicate peer, short secret, TLS without files, consensus
 * without a data dir...); AAMM_ENOMEM. On failure *@out is NULL and the reason is written
 * into @err (borrowed, @errsize bytes; may be NULL).
 */
AAMM_API int aamm_replicator_new(struct aamm_replicator **out,
                                 const struct aamm_replicator_options *opts, char *err,
                                 size_t errsize);

/** Install callbacks (NULL: none): conflicts that committed, stream state changes. Call
 *  before aamm_replicator_start(). */
AAMM_API void aamm_replicator_set_conflict_cb(struct aamm_replicator *r,
                                              aamm_replicator_conflict_cb cb, void *arg);
AAMM_API void aamm_replicator_set_stream_cb(struct aamm_replicator *r,
                                            aamm_replicator_stream_cb cb, void *arg);

/**
 * Blocking setup, bounded by start_timeout_ms: with consensus, check that SIGPIPE is ignored
 * or handled (aamm_consensus_ignore_sigpipe(): AAMM_EINVAL otherwise, since raft's
 * transport would let a vanished peer kill the process); connect the control connection, check that
 * the node is set up (aamm_node_install(): AAMM_ENOTFOUND otherwise), create the slot
 * aamm_to_<peer> for every peer that has none (so writes made from now on reach that peer,
 * even before it first connects), open the listen socket, start consensus. Returns 0;
 * AAMM_ECONN (the node is unreachable), AAMM_EIO (listen), AAMM_ESERVER, AAMM_ETIMEDOUT,
 * AAMM_ESTATE (started already); see aamm_replicator_errmsg().
 */
AAMM_API int aamm_replicator_start(struct aamm_replicator *r);

/** A descriptor to watch: @events is AAMM_READ and/or AAMM_WRITE. */
struct aamm_replicator_pollfd {
    int fd;
    int events;
};

/**
 * Write the descriptors to watch now into @fds (borrowed, @cap entries). Returns how many
 * there are (if more than @cap, only @cap were written; AAMM_REPLICATOR_MAX_FDS is always
 * enough). The set changes after each step.
 */
AAMM_API size_t aamm_replicator_fds(const struct aamm_replicator *r,
                                    struct aamm_replicator_pollfd *fds, size_t cap);

/** Milliseconds until aamm_replicator_step() must run even without events (-1: none). */
AAMM_API int aamm_replicator_timeout(struct aamm_replicator *r);

/**
 * Do the work that is possible now without blocking, bounded per component: accept and
 * bind peers, (re)connect links and captures after their backoff, move captured
 * transactions to the sender links, received ones to apply, acks both ways, slot
 * confirmations, consensus and galloc, the status view. A failed link, capture or apply
 * connection is reported (stream callback, status, log) and retried with backoff; it is not
 * an error of the step. Returns 0, or AAMM_ESTATE when not started, AAMM_ENOMEM.
 */
AAMM_API int aamm_replicator_step(struct aamm_replicator *r);

/**
 * Blocking helper: poll the replicator's fds and step for @timeout_ms (or until @stop,
 * when not NULL, reads true; checked after every step). Returns 0 or a step's error.
 */
AAMM_API int aamm_replicator_run(struct aamm_replicator *r, int timeout_ms,
                                 const volatile int *stop);

/**
 * Stop: send goodbye on every link after what is queued (bounded by @timeout_ms), stop
 * consensus, close every connection. Nothing is lost: what was not acknowledged is sent
 * again by the next run. The handle stays readable (status) until freed. Idempotent.
 */
AAMM_API void aamm_replicator_stop(struct aamm_replicator *r, int timeout_ms);

/** Stop (if needed, without waiting) and free everything. NULL is accepted. */
AAMM_API void aamm_replicator_free(struct aamm_replicator *r);

/** The last error message ("" if none), owned by the replicator. */
AAMM_API const char *aamm_replicator_errmsg(const struct aamm_replicator *r);

/** States of one direction of a peer's stream. */
enum aamm_replicator_stream_state {
    AAMM_STREAM_DOWN = 0,   /* no link (waiting for the peer, or backing off) */
    AAMM_STREAM_CONNECTING, /* link or capture connecting / handshaking */
    AAMM_STREAM_STREAMING,  /* link ready and capture (out) or apply (in) running */
    AAMM_STREAM_HELD,       /* in: apply holds the stream on a permanent error (reason) */
};

/** The name of a stream state ("down", "connecting", "streaming", "held"). */
AAMM_API const char *aamm_replicator_stream_state_name(enum aamm_replicator_stream_state s);

/** Figures of one peer (aamm_replicator_peer_status()). */
struct aamm_replicator_peer_status {
    uint32_t node_id;
    char name[64];
    /* out: this node's changes to the peer */
    enum aamm_replicator_stream_state out_state;
    uint64_t out_sent_lsn;      /* end LSN of the last transaction queued on the link */
    uint64_t out_acked_lsn;     /* the peer's last ack (flushed there) */
    uint64_t out_confirmed_lsn; /* the slot's confirmed position we reported */
    uint64_t out_lag_bytes;     /* local WAL the server reported past the confirmed position */
    uint64_t out_txns;          /* transactions sent (this run) */
    double out_txn_rate;        /* transactions sent per second (last interval) */
    /* in: the peer's changes applied here */
    enum aamm_replicator_stream_state in_state;
    uint64_t in_received_lsn; /* end LSN of the last transaction received */
    uint64_t in_applied_lsn;  /* origin progress flushed here (what we ack) */
    int64_t in_lag_ms;        /* age (origin commit time) of the oldest received transaction
                                 not yet applied here; 0 when caught up */
    uint64_t in_txns;         /* transactions applied (this run) */
    double in_txn_rate;       /* applied per second (last interval) */
    size_t in_pending;        /* transactions queued in apply */
    uint64_t conflicts[AAMM_CONFLICT_NKINDS]; /* per kind (enum aamm_conflict_kind) */
    uint32_t reconnects;      /* links made again after a failure (both directions) */
    char reason[256];         /* why a direction is down or held ("" if none) */
    /* survivors' catch-up (aamm_replicator_peer_lost()) */
    bool lost;              /* the peer is lost: no links; "in" is what others forward */
    uint64_t out_forwarded; /* lost peers' transactions forwarded to this peer (this run) */
    uint64_t out_hold_lsn;  /* the slot is held here for another origin's transaction the
                               peer has not acked yet (0: no hold) */
    size_t out_holds;       /* such transactions pending */
};

/** Number of peers (as configured). */
AAMM_API uint32_t aamm_replicator_npeers(const struct aamm_replicator *r);

/** Fill @st (borrowed) with the figures of the peer at index @i (0..npeers-1). Returns 0 or
 *  AAMM_EINVAL. */
AAMM_API int aamm_replicator_peer_status(const struct aamm_replicator *r, uint32_t i,
                                         struct aamm_replicator_peer_status *st);

/**
 * Write a one-line human summary of every peer into @buf (@size bytes, NUL-terminated),
 * e.g. "node 1 (amsterdam): berlin: out streaming 12/s lag 0 B, in streaming 9/s lag 3 ms
 * pending 0, 2 conflicts; copenhagen: ...". Returns
 * the length it needed (like snprintf).
 */
AAMM_API size_t aamm_replicator_status_line(const struct aamm_replicator *r, char *buf,
                                            size_t size);

/**
 * Declare peer @node_id lost for good (survivors' catch-up, doc/membership.md). The host
 * calls it on every surviving node once the peer is gone for good (for example after
 * consensus removed it: aamm_consensus_remove_member()), and again after each restart of
 * the replicator until the peer is parted (aamm_node_part()); the replicator keeps no
 * record of it. Effects, at once and for the rest of the run:
 *   - the peer's links stop (an incoming one is refused from now on); its slot
 *     aamm_to_<id> stays until the part;
 *   - every out side to another peer starts over (new capture from its slot's confirmed
 *     position, new link) forwarding the lost peer's transactions that this node applied:
 *     they travel as the lost peer's own (its node id, LSNs and commit times), and the
 *     receiver's resume position for the lost peer skips what it has;
 *   - forwarded transactions received from other peers go to the apply for the lost peer
 *     (origin aamm_from_<id>), whose origin progress drops what it has already: exactly once.
 * A node receiving forwarded transactions of a peer that it has not declared lost drops
 * that link (the sender retries): declare the peer lost on every survivor.
 * Catch-up is done when every survivor's progress for the lost peer (its status'
 * in_applied_lsn, or pg_replication_origin_progress('aamm_from_<id>', true)) is the same;
 * the survivors then part it. Call from the host's thread, not inside a callback, after
 * aamm_replicator_new(). Returns 0 (also when already lost) or AAMM_EINVAL (not a peer).
 */
AAMM_API int aamm_replicator_peer_lost(struct aamm_replicator *r, uint32_t node_id);

/** The consensus member (NULL without consensus), borrowed: for DDL locks, membership. */
AAMM_API struct aamm_consensus *aamm_replicator_consensus(struct aamm_replicator *r);

#ifdef __cplusplus
}
#endif
#endif /* AAMM_REPLICATOR_H */
