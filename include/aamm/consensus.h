/*
 * consensus.h: the agent's Raft node. One node per agent keeps the cluster state every
 * agent agrees on: membership, galloc allocations, the global DDL lock and the
 * cluster-wide watermark.
 *
 * Implementation: Canonical raft 0.15 with its libuv backend (raft_uv) on a PRIVATE libuv
 * loop owned by the handle, and our own TCP transport that performs a mutual pre-shared-key
 * handshake (HMAC-SHA256 over nonces of both sides, bound to the cluster name, both node
 * ids and the channel role) before raft sees a byte of the stream. Everything after it
 * (raft's messages and forwarded commands) travels in records MAC'd under per-direction
 * session keys derived from both nonces, with a sequence number per direction: an altered,
 * dropped, replayed or reordered record closes the connection (logged as an error). The
 * traffic is not encrypted: membership, sequence names and DDL lock state are visible on
 * the path (run the raft port on a private network or a tunnel if that matters).
 *
 * Host-driven I/O: poll aamm_consensus_fd() for aamm_consensus_events() with
 * aamm_consensus_timeout() and call aamm_consensus_step() (every callback of this header
 * runs only inside aamm_consensus_step() or aamm_consensus_close(), on the host's thread).
 *
 * THREADS, the one documented exception: raft_uv hands blocking disk work (segment
 * preallocation/finalization, truncation, snapshot writes and reads, and log writes when
 * kernel AIO is unusable) to libuv's thread pool (4 threads by default, UV_THREADPOOL_SIZE
 * sets the count, read once per process). Those threads run only file syscalls and lz4;
 * their completion wakes the loop fd and is processed inside aamm_consensus_step(). No
 * callback of libaamm or of the host ever runs on them. Do not fork a process that runs a
 * consensus handle into workers that keep using it.
 *
 * SIGPIPE: our own sockets write with send(MSG_NOSIGNAL), but raft's libuv streams write
 * with write(2): a peer that goes away can raise SIGPIPE in the host. The host must ignore
 * SIGPIPE (PostgreSQL backends and bgworkers already do), or call
 * aamm_consensus_ignore_sigpipe() once at start-up.
 *
 * Commands and ambiguity: raft accepts entries only on the leader. A call made on any
 * member is executed on the leader (forwarded over an authenticated channel on the same
 * port when this node follows) and its result comes back to the caller. Every command
 * carries (origin node, incarnation, request number); the state machine deduplicates on
 * it, so the library retries through leader changes and lost connections without ever
 * applying a command twice. Request numbers survive restarts (a counter in the data dir).
 * A call whose deadline (options.request_timeout_ms) passes reports AAMM_ETIMEDOUT: the
 * command may still be applied later (a galloc range may then be lost, never handed out
 * twice).
 *
 * The state machine is pure: it never reads the local clock. Times it needs (DDL lease
 * expiry) come from the leader's wall clock stamped into each entry when the leader
 * appends it, made monotonic across leaders (max of all stamps seen).
 */
#ifndef AAMM_CONSENSUS_H
#define AAMM_CONSENSUS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <aamm/aamm.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Feature macro (see AAMM_HAS_CHANGE_MODEL): this header's API is in the library. */
#define AAMM_HAS_CONSENSUS 1

/** An opaque consensus node. */
struct aamm_consensus;

/** Longest name, address or sequence name accepted (bytes, without the NUL). */
#define AAMM_CONSENSUS_NAME_MAX 255

/** Options for aamm_consensus_new(). Zero-initialize, then set what you need. */
struct aamm_consensus_options {
    /* This node's id (1..AAMM_NODE_ID_MAX; also its raft id), unique in the cluster
     * forever (never reuse an id). */
    uint32_t node_id;
    /* "a.b.c.d:port" this node listens on for raft and forwarded commands (copied).
     * A host name is resolved once (IPv4 only) at aamm_consensus_new(); IPv6 is refused. */
    const char *raft_address;
    /* Optional "a.b.c.d:port" to bind instead of raft_address (e.g. "0.0.0.0:7000"),
     * same port (copied). NULL: bind raft_address. */
    const char *bind_address;
    /* Directory owned by this node (copied); created if missing (one level). Holds raft's
     * log and snapshots under raft/, the request counter and a lock file: a second
     * process opening the same directory gets AAMM_EBUSY. */
    const char *data_dir;
    /* Cluster name, bound into the authentication (copied). Required. */
    const char *cluster_name;
    /* Pre-shared secret of the cluster (copied), at least 16 bytes. Required. */
    const void *secret;
    size_t secret_len;
    /* Raft election timeout, ms (default 1000). Must be > heartbeat_timeout_ms. */
    unsigned election_timeout_ms;
    /* Raft heartbeat timeout, ms (default 100). */
    unsigned heartbeat_timeout_ms;
    /* Deadline of each command submitted through this handle, ms (default 10000). */
    unsigned request_timeout_ms;
    /* Take a snapshot every this many applied entries (default 1024); trailing entries
     * kept after a snapshot (default 128). */
    unsigned snapshot_threshold;
    unsigned snapshot_trailing;
    /* Handshake deadline of our transport, ms (default 5000): a peer that does not finish
     * the handshake in time is dropped. */
    unsigned handshake_timeout_ms;
};

/** A member as the replicated state knows it. */
struct aamm_consensus_member {
    uint32_t node_id;         /* node id (raft id), 1..AAMM_NODE_ID_MAX */
    const char *name;         /* agent name (at most AAMM_CONSENSUS_NAME_MAX bytes) */
    const char *link_address; /* where peers reach the agent's link (free-form text) */
    const char *raft_address; /* "a.b.c.d:port" of its consensus node */
};

/** Roles as raft_state() reports them. */
#define AAMM_CONSENSUS_UNAVAILABLE 0 /* not started, closing, or failed (see errmsg) */
#define AAMM_CONSENSUS_FOLLOWER 1
#define AAMM_CONSENSUS_CANDIDATE 2
#define AAMM_CONSENSUS_LEADER 3

/* ---- life cycle ------------------------------------------------------------------ */

/**
 * Create a node: validate @opts (borrowed; strings copied), lock and prepare the data dir,
 * create the private loop, our transport and raft (raft_init probes the filesystem).
 * Nothing is sent and no port is opened until aamm_consensus_start().
 * @out receives the handle (owned by the caller; free with aamm_consensus_free()).
 * Returns 0; AAMM_EINVAL (bad option: heartbeat >= election timeout, non-IPv4 address,
 * short secret, node id outside 1..AAMM_NODE_ID_MAX...); AAMM_EBUSY (data dir locked by
 * another process); AAMM_EIO (the data dir is unusable: raft's own message is quoted
 * verbatim in @err, e.g. an unsupported filesystem); AAMM_ENOMEM. On failure *@out is NULL
 * and the reason is written into @err (borrowed, @errsize bytes, NUL-terminated; may be
 * NULL).
 */
AAMM_API int aamm_consensus_new(struct aamm_consensus **out,
                                const struct aamm_consensus_options *opts, char *err,
                                size_t errsize);

/**
 * Bootstrap a brand-new cluster whose voters are @members (borrowed, @n >= 1, this node
 * among them). Call before aamm_consensus_start(), on a pristine data dir, with the same
 * list on every initial member. Their names and addresses enter the replicated membership
 * once a leader is elected. Returns 0; AAMM_ESTATE (the data dir already holds a cluster:
 * just start); AAMM_EINVAL; AAMM_EIO.
 */
AAMM_API int aamm_consensus_bootstrap(struct aamm_consensus *cs,
                                      const struct aamm_consensus_member *members, size_t n);

/**
 * Start the node: load the snapshot and log from disk and start listening. A node that
 * joins an existing cluster starts on an empty data dir without bootstrap and waits until
 * a member runs aamm_consensus_add_member() for it. Returns 0, AAMM_ESTATE (already
 * started), AAMM_EIO (listen or disk failure; see errmsg).
 */
AAMM_API int aamm_consensus_start(struct aamm_consensus *cs);

/**
 * Close the node: pending commands complete with AAMM_ECLOSED (their callbacks run inside
 * this call), raft stops and the loop is drained: this blocks while raft's pending disk
 * work finishes (typically milliseconds; given up with a warning after 10 s). The handle stays
 * valid for accessors until aamm_consensus_free(). Idempotent.
 */
AAMM_API void aamm_consensus_close(struct aamm_consensus *cs);

/** Close if needed and release the handle and the data dir lock. NULL is accepted. */
AAMM_API void aamm_consensus_free(struct aamm_consensus *cs);

/** The handle's last error message ("" when none). Owned by the handle. */
AAMM_API const char *aamm_consensus_errmsg(const struct aamm_consensus *cs);

/**
 * Set SIGPIPE to SIG_IGN when it is SIG_DFL (leaves a host handler alone). Returns true
 * when SIGPIPE is ignored or handled afterwards. Process-wide: call once from the main
 * thread at start-up.
 */
AAMM_API bool aamm_consensus_ignore_sigpipe(void);

/* ---- host-driven loop ------------------------------------------------------------ */

/** The fd to poll (the private loop's epoll fd); constant for the handle's life. */
AAMM_API int aamm_consensus_fd(const struct aamm_consensus *cs);

/** What to poll the fd for: always AAMM_READ (the loop fd only becomes readable). */
AAMM_API int aamm_consensus_events(const struct aamm_consensus *cs);

/** Milliseconds until aamm_consensus_step() is due even without events; -1: none. */
AAMM_API int aamm_consensus_timeout(struct aamm_consensus *cs);

/**
 * Run what is ready (uv_run NOWAIT) and then our bookkeeping (forwarding, retries,
 * deadlines, pending bootstrap membership). Callbacks run here. Returns 0, or
 * AAMM_EIO once raft has failed for good (disk error: the node went UNAVAILABLE; close,
 * free and create a new handle). Never blocks.
 */
AAMM_API int aamm_consensus_step(struct aamm_consensus *cs);

/**
 * Convenience: poll and step until @done(@arg) returns true or @timeout_ms passes
 * (@done is checked before each step; @arg borrowed for the call). Returns 0 (done),
 * AAMM_ETIMEDOUT, or a step error.
 */
AAMM_API int aamm_consensus_run_until(struct aamm_consensus *cs, bool (*done)(void *arg), void *arg,
                                      int timeout_ms);

/* ---- queries (local, no network) ------------------------------------------------- */

/** This node's raft state (AAMM_CONSENSUS_*). */
AAMM_API int aamm_consensus_state(const struct aamm_consensus *cs);

/**
 * The leader as this node knows it: *id (0 when unknown) and, when @addr is not NULL, its
 * raft address copied into @addr (@addr_size bytes, "" when unknown). Returns 0 when a
 * leader is known, AAMM_ENOTLEADER otherwise.
 */
AAMM_API int aamm_consensus_leader(const struct aamm_consensus *cs, uint32_t *id, char *addr,
                                   size_t addr_size);

/** This node's id. */
AAMM_API uint32_t aamm_consensus_node_id(const struct aamm_consensus *cs);

/**
 * This handle's incarnation: a random non-zero 64-bit id chosen by aamm_consensus_new(),
 * different for every handle (every process start) of the same node id. DDL leases are
 * bound to it (see aamm_consensus_ddl_acquire()).
 */
AAMM_API uint64_t aamm_consensus_incarnation(const struct aamm_consensus *cs);

/** raft's current term and last applied log index (for tests and monitoring). */
AAMM_API uint64_t aamm_consensus_term(const struct aamm_consensus *cs);
AAMM_API uint64_t aamm_consensus_applied_index(const struct aamm_consensus *cs);

/**
 * A 64-bit hash of the whole applied state (membership, sequences, lock, watermarks,
 * dedup tables). Equal on members that applied the same prefix of the log.
 */
AAMM_API uint64_t aamm_consensus_state_hash(const struct aamm_consensus *cs);

/* ---- commands (any member; executed on the leader) ------------------------------- */

/**
 * Generic completion: @status is 0 or a negative AAMM_E* code (see each call); @arg is the
 * caller's. Runs once, inside aamm_consensus_step() or aamm_consensus_close(). A call that
 * returns an error never runs its callback. A successful completion runs only once the
 * command is applied in THIS node's state too, so the accessors already show its effect
 * (e.g. aamm_consensus_galloc_next() >= end of the range just received).
 */
typedef void (*aamm_consensus_done_cb)(struct aamm_consensus *cs, int status, void *arg);

/**
 * galloc completion: on status 0, [@start, @end) is the range reserved for the node the
 * request named: no other range of the same sequence ever overlaps it. Status
 * AAMM_EEXHAUSTED: the sequence cannot give @count more values (bigint limit);
 * AAMM_ETIMEDOUT: no majority reachable before the deadline; AAMM_ECLOSED: handle closed.
 */
typedef void (*aamm_consensus_galloc_cb)(struct aamm_consensus *cs, int status, int64_t start,
                                         int64_t end, void *arg);

/**
 * Reserve a range of @count (1..2^31) values of sequence @seq_name (copied; 1..255 bytes)
 * for this node. A sequence comes into being at its first allocation; its first value is
 * max(1, @min_start) and each range starts at max(next free value, @min_start), so a host
 * converting an existing serial column passes its current maximum + 1. Returns 0 (@cb will
 * run), AAMM_EINVAL, AAMM_ESTATE (not started / closed), AAMM_ENOMEM.
 */
AAMM_API int aamm_consensus_galloc(struct aamm_consensus *cs, const char *seq_name, uint64_t count,
                                   int64_t min_start, aamm_consensus_galloc_cb cb, void *arg);

/** The global DDL lock as the replicated state holds it. holder 0: never taken / free. */
struct aamm_consensus_ddl_lock {
    uint32_t holder;    /* node id of the holder, 0 when free */
    uint64_t token;     /* fencing token: the log index of the acquiring entry; grows */
    int64_t granted_us; /* leader-stamped time of the last grant/renewal (µs, Unix) */
    int64_t expires_us; /* leader-stamped lease expiry (µs, Unix) */
    /* The holder's incarnation (aamm_consensus_incarnation() of the handle that acquired
     * it), 0 when free. A lease belongs to one incarnation of its node: a restarted process
     * of the same node id does not inherit it. (Added in this version: the struct grew.) */
    uint64_t holder_incarnation;
};

/**
 * DDL lock completion. Acquire: status 0 = granted (or renewed: same token) and @lock the
 * new state; AAMM_EBUSY = another holder (another node, or another incarnation of this
 * node: a process that died and was restarted) holds an unexpired lease, @lock shows it.
 * Release: 0 = released; AAMM_ESTATE = not held by this handle's incarnation with that
 * token (@lock shows the current state). AAMM_ETIMEDOUT / AAMM_ECLOSED as for galloc (@lock NULL).
 * @lock is borrowed for the call.
 */
typedef void (*aamm_consensus_ddl_cb)(struct aamm_consensus *cs, int status,
                                      const struct aamm_consensus_ddl_lock *lock, void *arg);

/**
 * Acquire (or renew, when this handle holds it) the global DDL lock for @lease_ms
 * (1..3,600,000) measured from the leader-stamped time of the entry. A lease belongs to the
 * incarnation that acquired it (aamm_consensus_incarnation()), not just to the node id: a
 * new handle of the same node (a restarted process) gets AAMM_EBUSY while the old lease
 * runs, and once it has expired a NEW grant with a new, larger token, so the token tells
 * the dead process's in-flight DDL from the new one's. Only the same incarnation renews
 * (same token). A lock whose lease expired (by the stamped time of a later entry) is free
 * for anyone. The fencing token is the log index of the granting entry: a holder passes it
 * along with its DDL so receivers can refuse a stale holder. Returns 0, AAMM_EINVAL,
 * AAMM_ESTATE, AAMM_ENOMEM.
 */
AAMM_API int aamm_consensus_ddl_acquire(struct aamm_consensus *cs, uint32_t lease_ms,
                                        aamm_consensus_ddl_cb cb, void *arg);

/** Release the DDL lock held by this handle's incarnation under @token. Returns as for
 *  acquire. */
AAMM_API int aamm_consensus_ddl_release(struct aamm_consensus *cs, uint64_t token,
                                        aamm_consensus_ddl_cb cb, void *arg);

/**
 * The DDL lock as applied locally (may lag the leader) into @out (borrowed, written).
 * Whether the lease is still running is for the caller to judge with its own clock.
 */
AAMM_API void aamm_consensus_ddl_get(const struct aamm_consensus *cs,
                                     struct aamm_consensus_ddl_lock *out);

/**
 * Report that this node has passed position @value (an LSN or a commit time: the host's
 * choice, used consistently) of origin node @origin's change stream. Positions only grow
 * (a smaller value is ignored). Returns 0, AAMM_EINVAL, AAMM_ESTATE, AAMM_ENOMEM; @cb (may
 * be NULL) gets 0, AAMM_ETIMEDOUT or AAMM_ECLOSED.
 */
AAMM_API int aamm_consensus_watermark_set(struct aamm_consensus *cs, uint32_t origin,
                                          uint64_t value, aamm_consensus_done_cb cb, void *arg);

/**
 * The cluster-wide watermark of @origin's stream as applied locally: the smallest position
 * reported by every member other than @origin (0 when one has not reported yet or when
 * @origin has no peers). Everything from @origin at or before it has been passed by every
 * peer: tombstones up to there can go.
 */
AAMM_API uint64_t aamm_consensus_watermark_get(const struct aamm_consensus *cs, uint32_t origin);

/**
 * Add @member (borrowed, strings copied) to the cluster as a voter: raft_add, catch-up and
 * raft_assign(VOTER) on the leader, then its metadata into the replicated membership.
 * The new node must already run aamm_consensus_start() on an empty data dir. @cb gets 0,
 * AAMM_EINVAL (the id is already used by another address), AAMM_EBUSY (another
 * membership change is in progress: retry), AAMM_ETIMEDOUT, AAMM_ECLOSED.
 * Returns 0, AAMM_EINVAL, AAMM_ESTATE, AAMM_ENOMEM.
 */
AAMM_API int aamm_consensus_add_member(struct aamm_consensus *cs,
                                       const struct aamm_consensus_member *member,
                                       aamm_consensus_done_cb cb, void *arg);

/**
 * Remove member @node_id: its metadata and watermark reports leave the replicated state,
 * then raft removes it. Removing the leader first hands leadership to another voter.
 * @cb as for add (AAMM_ENOTFOUND when not a member). Returns as for add.
 */
AAMM_API int aamm_consensus_remove_member(struct aamm_consensus *cs, uint32_t node_id,
                                          aamm_consensus_done_cb cb, void *arg);

/** Commit an empty command (benchmarks, liveness probes). @cb and the return codes as for
 *  aamm_consensus_watermark_set(). */
AAMM_API int aamm_consensus_noop(struct aamm_consensus *cs, aamm_consensus_done_cb cb, void *arg);

/* ---- membership and sequence accessors (applied state, local) -------------------- */

/** Number of members in the replicated membership. */
AAMM_API size_t aamm_consensus_member_count(const struct aamm_consensus *cs);

/**
 * Member number @i (0 .. count-1, ordered by node id) into @out; its strings are owned by
 * the handle and valid until the next aamm_consensus_step(). Returns 0 or AAMM_ENOTFOUND.
 */
AAMM_API int aamm_consensus_member_at(const struct aamm_consensus *cs, size_t i,
                                      struct aamm_consensus_member *out);

/** Find member @node_id (as member_at). Returns 0 or AAMM_ENOTFOUND. */
AAMM_API int aamm_consensus_member_get(const struct aamm_consensus *cs, uint32_t node_id,
                                       struct aamm_consensus_member *out);

/**
 * The next free value of sequence @seq_name (borrowed) as applied locally into *next.
 * Returns 0, or AAMM_ENOTFOUND when no range was ever allocated.
 */
AAMM_API int aamm_consensus_galloc_next(const struct aamm_consensus *cs, const char *seq_name,
                                        int64_t *next);

#ifdef __cplusplus
}
#endif
#endif /* AAMM_CONSENSUS_H */
