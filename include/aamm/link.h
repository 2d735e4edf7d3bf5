/*
 * link.h: an authenticated connection between two agents that carries one node's
 * transactions to a peer (one direction; acks flow back). Host-driven and non-blocking:
 * the host polls aamm_link_fd() for aamm_link_events() with aamm_link_timeout() and calls
 * aamm_link_step(); no threads, no hidden loop. Either side may dial; the roles (sender or
 * receiver of transactions) are configured, independent of who dialed.
 *
 * Protocol (doc/protocol.md §4): HELLO both ways (versions, cluster, node ids, clocks), mutual
 * HMAC-SHA256 proofs over both sides' fresh nonces bound to node ids and roles, then every
 * frame carries a MAC under per-direction session keys with implicit sequence numbers (unless
 * TLS protects the link). The receiver then sends its durable position per origin; the
 * sender skips everything at or below it. Reconnecting is the host's decision: a new link
 * resumes from what the receiver says is durable, never from an in-memory queue.
 */
#ifndef AAMM_LINK_H
#define AAMM_LINK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <aamm/aamm.h>
#include <aamm/change.h>
#include <aamm/wire.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AAMM_HAS_LINK 1

/* Roles. */
#define AAMM_LINK_SENDER AAMM_WIRE_ROLE_SENDER
#define AAMM_LINK_RECEIVER AAMM_WIRE_ROLE_RECEIVER

/* States (aamm_link_state). */
enum aamm_link_state {
    AAMM_LINK_IDLE = 0,   /* created, no socket yet */
    AAMM_LINK_CONNECTING, /* TCP connect (and TLS handshake) in progress */
    AAMM_LINK_HANDSHAKE,  /* HELLO / AUTH / RESUME in progress */
    AAMM_LINK_READY,      /* authenticated: transactions and acks flow */
    AAMM_LINK_CLOSED,     /* closed cleanly (GOODBYE either way) */
    AAMM_LINK_FAILED,     /* failed: see aamm_link_errmsg(); free it and reconnect */
};

/** Link configuration; copied by aamm_link_new (strings and arrays too). */
struct aamm_link_options {
    int role;                 /* AAMM_LINK_SENDER or AAMM_LINK_RECEIVER */
    uint32_t node_id;         /* this node (1..AAMM_NODE_ID_MAX) */
    const char *cluster;      /* cluster name, 1..255 bytes; both sides must agree */
    const uint32_t *peer_ids; /* node ids accepted as the peer (at least one) */
    uint32_t npeer_ids;
    const uint8_t *secret; /* pre-shared secret, at least 16 bytes */
    size_t secret_len;

    /* Receiver: the durable position per origin to resume from (host-supplied; typically
     * the replication origins' progress). Origins not listed resume from 0. */
    const struct aamm_wire_position *resume;
    uint32_t nresume;

    int handshake_timeout_ms;      /* default 5000 */
    int heartbeat_ms;              /* send a heartbeat after this much silence; default 1000 */
    int dead_after_ms;             /* peer silent this long: AAMM_ETIMEDOUT; default 5000 */
    int64_t max_clock_skew_us;     /* report skew above this; default 5 s */
    size_t send_queue_bytes;       /* back-pressure bound of the send queue; default 8 MiB.
                                      Sender memory: AAMM_LINK_SEND_MEMORY() below */
    struct aamm_wire_options wire; /* frame limits (zeros: defaults) */

    /* TLS (OpenSSL): both sides present a certificate signed by the CA in @tls_ca_file
     * and verify the peer's. @tls_server_name, if set, is checked against the peer's
     * certificate by the dialing side. With TLS, frames carry no extra MAC. */
    bool tls;
    const char *tls_ca_file;
    const char *tls_cert_file;
    const char *tls_key_file;
    const char *tls_server_name;
};

/**
 * The most memory (bytes as counted by aamm_memory_stats) the send side of a sender link
 * holds, for a send_queue_bytes of @q and a frame_payload of @fp (wire options; default
 * AAMM_WIRE_DEFAULT_FRAME_PAYLOAD), with F = AAMM_WIRE_HEADER_SIZE + @fp + AAMM_WIRE_MAC_SIZE
 * the largest frame:
 *   q + F                 frames queued: calls are admitted while fewer than q bytes are
 *                         held, and one admitted call adds at most one frame (a change
 *                         larger than a frame is queued piece by piece, see
 *                         aamm_link_send_change; COMMIT adds < 64 bytes)
 *   + (q + F) / 2048 + 128 KiB   the queue's 64 KiB chunks: headers, first and last partial
 *   + 2F + 4 KiB          the encoder's output buffer (open frame + one closed), allocated once
 *   + @fp + @fp/255 + 16 + 80 KiB   LZ4 scratch, stream state and 64 KiB history
 *   + 64 KiB              the rest: the wire record scratch (a change's values under 1 KiB;
 *                         bigger values are never copied whole), handshake leftovers
 * It does not cover the link's fixed parts present from aamm_link_new (the struct with its
 * 64 KiB read buffer, the relation dictionary and its copies of the relations sent) nor the
 * host's own data: a value passed to aamm_link_send_change stays the host's and is copied a
 * frame at a time. Exceptions (not bounded by this formula): a change whose values under
 * 1 KiB add up to more than 64 KiB (the record scratch holds them), and a call that must
 * first send relation records which, with the change, close more than one frame (the
 * encoder's buffer then grows beyond 2F, by doubling). The tests check the formula.
 */
#define AAMM_LINK_SEND_MEMORY(q, fp)                                                               \
    ((size_t)(q) + ((size_t)(fp) + 32u) + ((size_t)(q) + (size_t)(fp) + 32u) / 2048u +             \
     128u * 1024u + 2u * ((size_t)(fp) + 32u) + 4096u + (size_t)(fp) + (size_t)(fp) / 255u + 16u + \
     80u * 1024u + 64u * 1024u)

/** Counters and figures of one link. */
struct aamm_link_stats {
    uint64_t bytes_sent, bytes_received;
    uint64_t txns_sent;     /* sender: transactions queued (not skipped) */
    uint64_t txns_skipped;  /* sender: at or below the receiver's resume position */
    uint64_t txns_received; /* receiver: COMMITs handed to the host */
    uint64_t acks_sent, acks_received, heartbeats_sent, heartbeats_received;
    uint32_t auth_failures;   /* peer's proof wrong, or identity refused (cluster, node) */
    uint32_t peer_refusals;   /* the peer sent ERROR */
    uint32_t mac_failures;    /* a frame failed its MAC after auth */
    uint32_t protocol_errors; /* malformed bytes or frames out of place */
    uint32_t timeouts;        /* handshake timeout or dead peer */
    int64_t clock_skew_us;    /* peer clock minus ours at HELLO (approximate) */
    bool clock_skew_exceeded; /* |skew| above max_clock_skew_us */
    size_t send_queue;        /* bytes queued now */
    size_t send_queue_high_water;
};

struct aamm_link;

/**
 * Create a link with @opts (borrowed; copied: strings, arrays and the secret). Returns 0
 * with *@link set (owned by the caller, free with aamm_link_free); AAMM_EINVAL when an
 * option is missing or out of range (role, node id or a peer id outside
 * 1..AAMM_NODE_ID_MAX, cluster, secret shorter than 16 bytes, more than 64 resume entries,
 * TLS without CA / certificate / key, wire limits); AAMM_EIO when the TLS files cannot be
 * loaded; AAMM_ENOMEM. On failure *@link is NULL and the reason is written into @err
 * (borrowed, @errsize bytes, NUL-terminated; may be NULL).
 */
AAMM_API int aamm_link_new(struct aamm_link **link, const struct aamm_link_options *opts,
                           char *err, size_t errsize);

/** Close the socket (without goodbye) and free @link. NULL is accepted. */
AAMM_API void aamm_link_free(struct aamm_link *link);

/**
 * Start dialing @host:@port (numeric or resolvable; name resolution blocks). Returns 0
 * (connect in progress: step when the fd is writable), AAMM_ECONN, AAMM_ESTATE (already has a
 * socket).
 */
AAMM_API int aamm_link_connect(struct aamm_link *link, const char *host, const char *port);

/**
 * Adopt an accepted socket @fd (ownership transferred on success and on failure: the link
 * closes it). Sets it non-blocking and starts the handshake. 0, AAMM_ESTATE, AAMM_EIO.
 */
AAMM_API int aamm_link_adopt_fd(struct aamm_link *link, int fd);

/** The socket to poll, or -1 when there is none. It may change after a step. */
AAMM_API int aamm_link_fd(const struct aamm_link *link);

/** AAMM_READ / AAMM_WRITE: what to poll the fd for. */
AAMM_API int aamm_link_events(const struct aamm_link *link);

/** Milliseconds until aamm_link_step() must run even without fd events (-1: none). */
AAMM_API int aamm_link_timeout(const struct aamm_link *link);

/**
 * Do the I/O that is possible now without blocking: connect, handshake, write queued frames,
 * read (as far as the host consumes, for a receiver), heartbeats, timeouts. Bounded work.
 * Returns 0; AAMM_ECLOSED once the peer said goodbye; on failure the error (sticky; the
 * link is FAILED): AAMM_ECONN (socket error or peer closed), AAMM_EAUTH (authentication
 * failed or identity refused, either side), AAMM_EPROTO (version/role mismatch, frame out of
 * place), AAMM_EMALFORMED (garbage), AAMM_ETIMEDOUT (handshake or dead peer), AAMM_ENOMEM.
 */
AAMM_API int aamm_link_step(struct aamm_link *link);

/** The current state. */
AAMM_API enum aamm_link_state aamm_link_state(const struct aamm_link *link);

/** The last error message ("" if none), owned by the link. */
AAMM_API const char *aamm_link_errmsg(const struct aamm_link *link);

/** Copy the link's counters into @stats (borrowed, written). */
AAMM_API void aamm_link_stats(const struct aamm_link *link, struct aamm_link_stats *stats);

/** The peer's node id once its HELLO arrived, else 0. */
AAMM_API uint32_t aamm_link_peer_id(const struct aamm_link *link);

/**
 * Send GOODBYE after the queued frames and close once it is written (keep stepping until
 * the state is CLOSED). 0 or AAMM_ESTATE.
 */
AAMM_API int aamm_link_close(struct aamm_link *link);

/* ---- sender side ----------------------------------------------------------------- */

/**
 * The receiver's resume position for @origin (its durable end LSN), once READY. 0 with
 * *@lsn set, or AAMM_ESTATE before READY.
 */
AAMM_API int aamm_link_resume_position(const struct aamm_link *link, uint32_t origin,
                                       uint64_t *lsn);

/*
 * Queue a transaction: BEGIN, changes, COMMIT (all pointers borrowed for the call; the
 * data is encoded immediately, a change larger than a frame as far as the queue takes it).
 * A transaction whose commit LSN is below the receiver's resume position for its origin is
 * skipped whole (counted in txns_skipped); one whose end LSN is known only at COMMIT cannot
 * be skipped at BEGIN and is sent (the receiver deduplicates).
 *
 * Returns 0; AAMM_EAGAIN when the send queue holds send_queue_bytes or more (step and call
 * again with the same event); AAMM_ESTATE when not READY or out of order; AAMM_EINVAL for an
 * invalid change; the link's error once it failed.
 *
 * A change whose record is larger than a frame (e.g. one 200 MB text value) may get
 * AAMM_EAGAIN after part of it was queued: pieces are queued while the queue holds less than
 * send_queue_bytes, and the next call with the same change (same content; the host keeps it,
 * the link never copies it whole) continues where the last one stopped. Until that call
 * returns 0, only aamm_link_step may run on the link (BEGIN/COMMIT: AAMM_ESTATE; a different
 * change fails the link).
 *
 * Positions that need no data (a capture PROGRESS) are never sent as transactions (an
 * empty one commits nothing on the receiver, so its origin does not move; apply drops
 * it): the sender confirms its slot directly once everything sent before that position is
 * acknowledged (the replicator does this; see replicator.h).
 *
 * Memory: at most AAMM_LINK_SEND_MEMORY(send_queue_bytes, frame_payload) on the send side,
 * whatever the size of the transaction or of one value in it.
 */
AAMM_API int aamm_link_send_begin(struct aamm_link *link, const struct aamm_transaction *txn);
AAMM_API int aamm_link_send_change(struct aamm_link *link, const struct aamm_change *change);
AAMM_API int aamm_link_send_commit(struct aamm_link *link, const struct aamm_transaction *txn);

/**
 * The receiver's last acknowledged durable position for @origin (0 if none yet). The host
 * uses it to confirm its slot (aamm_capture_confirm).
 */
AAMM_API uint64_t aamm_link_acked(const struct aamm_link *link, uint32_t origin);

/* ---- receiver side --------------------------------------------------------------- */

/**
 * Take the next received event (AAMM_WIRE_EV_BEGIN, _CHANGE, _COMMIT) into @ev (a view owned
 * by the link, valid until the next call on the link; see struct aamm_wire_event). Only
 * bytes already read by aamm_link_step() are decoded; the link reads no more from the socket
 * than the host consumes (that is the back-pressure towards the sender).
 * Returns 0, AAMM_EAGAIN (nothing complete yet), AAMM_ECLOSED (peer said goodbye), or the
 * link's error (AAMM_EAUTH for a frame that fails its MAC, AAMM_EMALFORMED...; AAMM_ECONN
 * once the peer closed the connection and everything received before was handed out).
 * The MAC covers each frame's implicit sequence number, so a frame dropped, repeated or
 * reordered on the way fails the link with AAMM_EAUTH and a message naming the expected and
 * the found sequence number (doc/protocol.md §4.4); nothing of that frame or after it is
 * handed out, so the host never sees a transaction twice, out of order or with a gap.
 */
AAMM_API int aamm_link_recv(struct aamm_link *link, struct aamm_wire_event *ev);

/** Move the change of the last AAMM_WIRE_EV_CHANGE into @out (aamm_wire_decoder_take_change). */
AAMM_API int aamm_link_take_change(struct aamm_link *link, struct aamm_change *out);

/**
 * Tell the sender that everything of @origin up to end LSN @lsn is durably applied. Queued
 * immediately (acks are small and not subject to the send queue bound). 0, AAMM_ESTATE.
 */
AAMM_API int aamm_link_ack(struct aamm_link *link, uint32_t origin, uint64_t lsn);

#ifdef __cplusplus
}
#endif
#endif /* AAMM_LINK_H */
