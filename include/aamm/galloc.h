/*
 * galloc.h: globally allocated sequences: plain increasing numbers (they fit an int or a
 * bigint column) taken from ranges that the cluster agrees on through consensus; a node
 * holds its current range and the next one, so an insert never waits on the network.
 *
 * A struct aamm_galloc is the node-local client of one cluster-wide sequence. It is pure
 * (no I/O): it issues values from ranges the host feeds it (aamm_galloc_add_range) and
 * tells the host when to ask consensus for more (aamm_galloc_wants_range /
 * aamm_galloc_begin_request). aamm_galloc_attach() connects it to a consensus handle so
 * that requests go through aamm_consensus_galloc() by themselves.
 *
 * The values reach SQL through aamm.galloc_nextval() (installed by aamm_seq_install(),
 * seq.h): the host moves ranges to the node with aamm_galloc_supply_node().
 *
 * Thread safety: handles are not synchronized; use one per thread or a mutex. The
 * functions taking a PGconn use only that connection.
 */
#ifndef AAMM_GALLOC_H
#define AAMM_GALLOC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <aamm/aamm.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Feature macro: this header's API is in the library (like libpq's LIBPQ_HAS_...). */
#define AAMM_HAS_GALLOC 1

/** The raft node (aamm/consensus.h); declared here so this header stands alone. */
struct aamm_consensus;

/** libpq's connection (PGconn is a typedef of it): no libpq-fe.h needed here. The
 *  functions taking one borrow it for the call and run blocking queries on it. */
struct pg_conn;

/** An opaque galloc client: one sequence on one node. */
struct aamm_galloc;

/** Options for aamm_galloc_new(). Zero-initialize, then set name. */
struct aamm_galloc_options {
    const char *name;     /* sequence name, 1..255 bytes (copied) */
    int64_t range_size;   /* values per requested range; 0: 1000 */
    int64_t low_water;    /* ask for a range when fewer than or exactly this many values
                             are left in held ranges; 0: range_size (always hold the
                             current range and the next one) */
    int max_ranges;       /* most ranges held at once; 0: 4 */
    int64_t min_start;    /* passed to consensus: first value of a new sequence (e.g. the
                             current max of a converted serial column + 1); 0: 1 */
    int64_t resume_after; /* values <= this are never issued (persisted last value of a
                             previous run whose ranges are fed again); 0: none */
};

/**
 * Create a galloc client. @out receives the handle (caller owns it; free with
 * aamm_galloc_free); @opts is copied. On failure @err (may be NULL; borrowed) receives the
 * message, truncated to @errsize bytes, and *@out is NULL. Returns 0, AAMM_EINVAL (no
 * name, name too long, negative sizes, low_water < 0, range_size above 2^31), AAMM_ENOMEM.
 */
AAMM_API int aamm_galloc_new(struct aamm_galloc **out, const struct aamm_galloc_options *opts,
                             char *err, size_t errsize);

/**
 * Free a client. NULL accepted. If attached and a request is in flight, the consensus
 * callback will find the client gone and drop the range (values are lost, never reused).
 */
AAMM_API void aamm_galloc_free(struct aamm_galloc *g);

/** The message of the last failure ("" when none); borrowed. */
AAMM_API const char *aamm_galloc_errmsg(const struct aamm_galloc *g);

/** The sequence name (borrowed, owned by the handle). */
AAMM_API const char *aamm_galloc_name(const struct aamm_galloc *g);

/**
 * The next value into *@v, from the lowest range held; never waits on the network. When
 * attached, first runs aamm_galloc_pump(). Returns 0, or AAMM_EEXHAUSTED when every held
 * range is used up (message: how many values were issued, whether a request is in flight,
 * and the last consensus error, e.g. no majority) — the host should back off and retry.
 */
AAMM_API int aamm_galloc_next(struct aamm_galloc *g, int64_t *v);

/** Values left in the ranges held now. */
AAMM_API int64_t aamm_galloc_available(const struct aamm_galloc *g);

/**
 * Whether the client wants a new range now: returns true and sets *@count (may be NULL)
 * to the range size when available <= low_water, fewer than max_ranges are held and no
 * request is in flight. Changes nothing.
 */
AAMM_API bool aamm_galloc_wants_range(const struct aamm_galloc *g, uint64_t *count);

/**
 * Start a request: like wants_range, and if a range is wanted marks a request in flight
 * (so the host asks consensus once) and returns 0 with *@count set; otherwise
 * AAMM_EAGAIN. The host then calls aamm_consensus_galloc(name, count, min_start) and, when
 * the range is applied on its node, aamm_galloc_add_range(); on failure
 * aamm_galloc_cancel_request().
 */
AAMM_API int aamm_galloc_begin_request(struct aamm_galloc *g, uint64_t *count);

/**
 * Mark the request in flight as failed (e.g. no majority: AAMM_ETIMEDOUT); @status and
 * @msg (borrowed, may be NULL) are remembered for the exhaustion message.
 */
AAMM_API void aamm_galloc_cancel_request(struct aamm_galloc *g, int status, const char *msg);

/** Whether a request is in flight. */
AAMM_API bool aamm_galloc_request_pending(const struct aamm_galloc *g);

/**
 * Hand the client the range [@start, @end) that consensus reserved for this node. Call it
 * only once the allocating entry is applied on this node. Clears the request in flight.
 * Ranges of one sequence only grow: a range that does not start at or above the end of
 * every range added before is refused. Returns 0, AAMM_EINVAL (empty, negative or
 * overlapping/out-of-order range), AAMM_ETOOBIG (max_ranges already held).
 */
AAMM_API int aamm_galloc_add_range(struct aamm_galloc *g, int64_t start, int64_t end);

/**
 * Take the lowest held range out of the client, unused values only, into [*@start, *@end)
 * — for a host that hands ranges on to the node's SQL function (aamm_galloc_supply_node):
 * a client attached to consensus dedicated to that, whose ranges the host moves to the
 * node when aamm_galloc_node_remaining() falls to its low-water mark. The client then
 * prefetches the next range as usual. Returns 0, or AAMM_EEXHAUSTED when none is held.
 */
AAMM_API int aamm_galloc_take_range(struct aamm_galloc *g, int64_t *start, int64_t *end);

/**
 * Connect the client to a consensus handle (borrowed: it must outlive the attachment;
 * detach with aamm_galloc_attach(g, NULL) or free the client first). From then on
 * aamm_galloc_pump() — called by aamm_galloc_next() and by the host after each
 * aamm_consensus_step() — asks consensus for ranges by itself (at most one in flight, a
 * failed request retried after a second) and adds a granted range only once the
 * consensus state applied on this node shows it (aamm_consensus_galloc_next() >= end).
 * Returns 0 or AAMM_EBUSY (a request of a previous attachment is still in flight).
 */
AAMM_API int aamm_galloc_attach(struct aamm_galloc *g, struct aamm_consensus *cs);

/**
 * Drive an attached client: add granted ranges that are now applied locally, start a
 * request when one is wanted. Never blocks. Returns 0, or the error of
 * aamm_consensus_galloc() (also kept in the message; retried later). Not attached: 0.
 */
AAMM_API int aamm_galloc_pump(struct aamm_galloc *g);

/* ---- the node's SQL function aamm.galloc_nextval() ------------------------------------ */

/**
 * Supply the node @conn is connected to with the galloc range [@start, @end) of sequence
 * @seqname (borrowed) for aamm.galloc_nextval(): only ranges this node's consensus member
 * has applied (the range is reserved for this node). Idempotent for a range already
 * supplied. @err (may be NULL; borrowed) receives the message on failure, truncated to
 * @errsize bytes. Returns 0, AAMM_EINVAL (empty or negative range), AAMM_ESERVER (e.g.
 * overlap with another supplied range), AAMM_ECONN.
 */
AAMM_API int aamm_galloc_supply_node(struct pg_conn *conn, const char *seqname, int64_t start,
                                     int64_t end, char *err, size_t errsize);

/**
 * How many values of @seqname the node can still issue from supplied ranges into
 * *@remaining (the host supplies the next range when this falls to its low-water mark).
 * Returns 0, AAMM_ESERVER, AAMM_ECONN; @err as for aamm_galloc_supply_node().
 */
AAMM_API int aamm_galloc_node_remaining(struct pg_conn *conn, const char *seqname,
                                        int64_t *remaining, char *err, size_t errsize);

#ifdef __cplusplus
}
#endif
#endif /* AAMM_GALLOC_H */
