/* replicator.c: one node's share of active-active replication, composed from the public
 * headers (capture, link, apply, consensus, galloc): per peer an outgoing stream (capture
 * on slot aamm_to_<peer> -> sender link) and an incoming one (receiver link -> apply under
 * origin aamm_from_<peer>), acks both ways, slot confirmation, status. */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <unistd.h>

#include <libpq-fe.h>

#include <aamm/aamm.h>
#include <aamm/apply.h>
#include <aamm/capture.h>
#include <aamm/change.h>
#include <aamm/consensus.h>
#include <aamm/galloc.h>
#include <aamm/link.h>
#include <aamm/node.h>
#include <aamm/replicator.h>
#include <aamm/wire.h>

#include "internal.h"
#include "replicator_int.h"

/* ====================================================================================
 * State
 * ==================================================================================== */

#define DEFAULT_PUBLICATION "aamm"
#define MAX_PENDING_ACCEPTS 16
#define PUMP_BUDGET 4096  /* events moved per direction per peer per step */
#define LAG_RING 4096     /* received transactions remembered for the lag figure */
#define REASON_MAX 256
#define HOLD_MAX 65536    /* hold entries per outgoing stream (see struct hold) */
#define HOLD_FULL (-1000) /* out_pump: the hold is full (not an AAMM_E code) */

struct lag_sample {
    uint64_t end_lsn;
    int64_t commit_time_us;
};

/* The hold (doc/membership.md, "Survivors' catch-up"): a transaction of origin @origin
 * (another peer, not the receiving one) that this node has at local position past @pos and
 * that the receiving peer must have from somewhere before the slot may be confirmed past
 * @pos: a skipped one (it should reach the peer from its origin) or a forwarded one (it goes
 * to the peer on this link). Covered once the peer acks @origin at @olsn or beyond. */
struct hold {
    uint64_t pos;  /* the highest position handed out before it: the slot's cap */
    uint64_t olsn; /* its end LSN in @origin's LSN space */
    uint32_t origin;
};

struct rpeer {
    struct aamm_replicator *r;
    uint32_t id;
    char *name, *host, *port, *raft;
    char slot[32];

    /* ---- out: capture -> sender link ---- */
    struct aamm_capture *cap;
    struct aamm_link *ls;
    bool cap_streaming;
    bool have_ev; /* ev was taken from capture and not yet accepted by the link */
    struct aamm_capture_event ev;
    int64_t out_retry_at;
    int out_backoff;
    int64_t out_ready_since;
    uint64_t sent_end;  /* end LSN of the last COMMIT accepted by the link */
    uint64_t handed;    /* highest position capture handed out (COMMIT end, PROGRESS) */
    uint64_t prog_lsn;  /* latest PROGRESS position ... */
    uint64_t prog_need; /* ... confirmable once the peer acked this (sent_end then) */
    uint64_t out_txns, out_mark;
    double out_rate;
    int64_t held_status_ms;  /* last status update sent while the link refused an event */
    char marker_pending[48]; /* a marker message in the transaction being sent */
    char marker[48];         /* the last marker sent in a committed transaction ... */
    uint64_t marker_end;     /* ... and that transaction's end LSN */
    enum aamm_replicator_stream_state out_state;
    char out_reason[REASON_MAX];
    struct hold *holds; /* entries [hold_head, hold_head + hold_n), in stream order */
    size_t hold_head, hold_n, hold_cap;
    uint64_t fwd_txns;      /* forwarded transactions (of lost peers) sent to this peer */
    uint64_t hold_lsn;      /* the slot's cap the hold sets now (0: none) */

    /* ---- in: receiver link -> apply ---- */
    struct aamm_apply *ap;
    struct aamm_link *lr;
    bool have_pend;
    struct aamm_change pend;
    bool in_open; /* a BEGIN went to apply without its COMMIT yet */
    uint64_t last_ack;
    uint64_t received;
    int64_t held_retry_at;
    struct lag_sample lag[LAG_RING];
    size_t lag_head, lag_n;
    uint64_t in_base_committed, in_mark;
    double in_rate;
    enum aamm_replicator_stream_state in_state;
    char in_reason[REASON_MAX];
    uint32_t reconnects;
    struct rpeer *cur;       /* the peer whose apply the open transaction goes to */
    uint64_t acks[AAMM_REPLICATOR_MAX_PEERS]; /* last ack sent on lr per origin (peer index) */
    bool have_fbegin;        /* a forwarded BEGIN waits until its apply is free */
    struct aamm_transaction fbegin;

    /* ---- lost (aamm_replicator_peer_lost()): no links; its apply takes forwarded
     * transactions from the other peers' incoming streams, one at a time ---- */
    bool lost;
    struct rpeer *fwd_open; /* the in side with a forwarded transaction open on ap */
};

struct accepting {
    struct aamm_link *link;
};

enum ctl_state { CTL_DOWN, CTL_CONNECTING, CTL_IDLE, CTL_BUSY };

struct galloc_seq {
    char *name;
    struct aamm_galloc *g;
    int64_t next_check; /* when to look at the node's remaining values again */
};

struct aamm_replicator {
    struct aamm_replicator_options o; /* strings below are owned copies */
    char *node_name, *conninfo, *apply_conninfo, *cluster, *listen_host, *listen_port;
    char *tls_ca, *tls_cert, *tls_key, *raft_address, *raft_dir;
    char **pubs;
    uint32_t npubs;
    uint8_t *secret;
    struct rpeer *peers;
    uint32_t npeers;
    uint32_t *peer_ids;

    bool started, stopped;
    int listen_fd;
    struct accepting acc[MAX_PENDING_ACCEPTS];

    PGconn *ctl;
    enum ctl_state ctl_state;
    PostgresPollingStatusType ctl_poll;
    int64_t ctl_retry_at;
    int64_t status_due;
    int64_t rate_at;
    bool status_flush; /* output of the status query not yet flushed */

    struct aamm_consensus *cs;
    bool member_adding;      /* an aamm_consensus_add_member() of members_follow() runs */
    int64_t member_retry_at; /* members_follow() waits until then after a refusal */
    struct galloc_seq seqs[AAMM_REPLICATOR_MAX_SEQUENCES];
    uint32_t nseqs;

    bool more; /* a pump stopped on its budget: step again at once */

    aamm_replicator_conflict_cb conflict_cb;
    void *conflict_arg;
    aamm_replicator_stream_cb stream_cb;
    void *stream_arg;

    struct aamm__err err;
};

/* ====================================================================================
 * Options
 * ==================================================================================== */

void aamm_replicator_options_init(struct aamm_replicator_options *o)
{
    memset(o, 0, sizeof *o);
    o->reconnect_min_ms = 200;
    o->reconnect_max_ms = 5000;
    o->heartbeat_ms = 1000;
    o->dead_after_ms = 10000;
    o->held_retry_ms = 5000;
    o->status_interval_ms = 1000;
    o->start_timeout_ms = 60000;
    o->policy = AAMM_POLICY_LWW;
}

static int dflt(int v, int d)
{
    return v > 0 ? v : d;
}

static void free_all(struct aamm_replicator *r);

int aamm_replicator_new(struct aamm_replicator **out, const struct aamm_replicator_options *opts,
                        char *err, size_t errsize)
{
    struct aamm_replicator *r;
    bool ok = true;
    if (out)
        *out = NULL;
    if (!out || !opts)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "replicator: no options");
    if (!aamm_node_id_valid(opts->node_id))
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "replicator: node id %" PRIu32 " is outside 1..%d", opts->node_id,
                             AAMM_NODE_ID_MAX);
    if (!opts->conninfo || !*opts->conninfo)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "replicator: conninfo is required");
    if (!opts->cluster || !*opts->cluster)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "replicator: cluster is required");
    if (!opts->secret || opts->secret_len < 16)
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "replicator: the secret must have at least 16 bytes");
    if (opts->npeers < 1 || opts->npeers > AAMM_REPLICATOR_MAX_PEERS || !opts->peers)
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "replicator: %" PRIu32 " peers (1..%d)", opts->npeers,
                             AAMM_REPLICATOR_MAX_PEERS);
    for (uint32_t i = 0; i < opts->npeers; i++) {
        const struct aamm_replicator_peer *p = &opts->peers[i];
        if (!aamm_node_id_valid(p->node_id) || p->node_id == opts->node_id)
            return aamm__newerrf(err, errsize, AAMM_EINVAL,
                                 "replicator: peer %" PRIu32 ": node id %" PRIu32
                                 " is invalid or this node's",
                                 i + 1, p->node_id);
        for (uint32_t j = 0; j < i; j++)
            if (opts->peers[j].node_id == p->node_id)
                return aamm__newerrf(err, errsize, AAMM_EINVAL,
                                     "replicator: peer node id %" PRIu32 " listed twice",
                                     p->node_id);
        if (!p->host || !*p->host || !p->port || !*p->port)
            return aamm__newerrf(err, errsize, AAMM_EINVAL,
                                 "replicator: peer %" PRIu32 ": host and port are required",
                                 p->node_id);
    }
    if (opts->tls && (!opts->tls_ca_file || !opts->tls_cert_file || !opts->tls_key_file))
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "replicator: TLS needs a CA, a certificate and a key file");
    if (opts->raft_address && (!opts->raft_data_dir || !*opts->raft_data_dir))
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "replicator: consensus needs raft_data_dir");
    if (opts->nsequences > AAMM_REPLICATOR_MAX_SEQUENCES ||
        (opts->nsequences && !opts->raft_address))
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "replicator: galloc sequences need consensus (at most %d)",
                             AAMM_REPLICATOR_MAX_SEQUENCES);

    r = aamm__calloc(1, sizeof *r);
    if (!r)
        return AAMM_ENOMEM;
    r->o = *opts;
    r->listen_fd = -1;
    r->node_name = opts->node_name ? aamm__strdup(opts->node_name)
                                   : aamm__asprintf("node%" PRIu32, opts->node_id);
    ok = r->node_name != NULL;
    r->conninfo = aamm__strdup_opt(opts->conninfo, &ok);
    r->apply_conninfo = aamm__strdup_opt(opts->apply_conninfo ? opts->apply_conninfo
                                                               : opts->conninfo, &ok);
    r->cluster = aamm__strdup_opt(opts->cluster, &ok);
    r->listen_host = aamm__strdup_opt(opts->listen_host ? opts->listen_host : "127.0.0.1", &ok);
    r->listen_port = aamm__strdup_opt(opts->listen_port, &ok);
    r->tls_ca = aamm__strdup_opt(opts->tls_ca_file, &ok);
    r->tls_cert = aamm__strdup_opt(opts->tls_cert_file, &ok);
    r->tls_key = aamm__strdup_opt(opts->tls_key_file, &ok);
    r->raft_address = aamm__strdup_opt(opts->raft_address, &ok);
    r->raft_dir = aamm__strdup_opt(opts->raft_data_dir, &ok);
    r->secret = aamm__malloc(opts->secret_len);
    if (r->secret)
        memcpy(r->secret, opts->secret, opts->secret_len);
    else
        ok = false;
    r->npubs = opts->npublications ? opts->npublications : 1;
    r->pubs = aamm__calloc(r->npubs, sizeof *r->pubs);
    if (r->pubs) {
        for (uint32_t i = 0; i < r->npubs; i++)
            r->pubs[i] = aamm__strdup_opt(opts->npublications ? opts->publications[i]
                                                              : DEFAULT_PUBLICATION, &ok);
    } else {
        ok = false;
    }
    r->npeers = opts->npeers;
    r->peers = aamm__calloc(opts->npeers, sizeof *r->peers);
    r->peer_ids = aamm__calloc(opts->npeers, sizeof *r->peer_ids);
    if (!r->peers || !r->peer_ids) {
        ok = false;
    } else {
        for (uint32_t i = 0; i < opts->npeers; i++) {
            struct rpeer *p = &r->peers[i];
            const struct aamm_replicator_peer *src = &opts->peers[i];
            p->r = r;
            p->id = src->node_id;
            r->peer_ids[i] = src->node_id;
            p->name = src->name ? aamm__strdup(src->name)
                                : aamm__asprintf("node%" PRIu32, src->node_id);
            if (!p->name)
                ok = false;
            p->host = aamm__strdup_opt(src->host, &ok);
            p->port = aamm__strdup_opt(src->port, &ok);
            p->raft = aamm__strdup_opt(src->raft_address, &ok);
            snprintf(p->slot, sizeof p->slot, "aamm_to_%" PRIu32, p->id);
        }
    }
    for (uint32_t i = 0; ok && i < opts->nsequences; i++) {
        if (!opts->sequences[i] || !*opts->sequences[i]) {
            free_all(r);
            return aamm__newerrf(err, errsize, AAMM_EINVAL, "replicator: empty sequence name");
        }
        r->seqs[i].name = aamm__strdup_opt(opts->sequences[i], &ok);
        r->nseqs = i + 1;
    }
    if (!ok) {
        free_all(r);
        return aamm__newerrf(err, errsize, AAMM_ENOMEM, "replicator: out of memory");
    }
    /* the copy's pointers must never be the caller's */
    r->o.node_name = r->node_name;
    r->o.conninfo = r->conninfo;
    r->o.apply_conninfo = r->apply_conninfo;
    r->o.cluster = r->cluster;
    r->o.secret = r->secret;
    r->o.listen_host = r->listen_host;
    r->o.listen_port = r->listen_port;
    r->o.tls_ca_file = r->tls_ca;
    r->o.tls_cert_file = r->tls_cert;
    r->o.tls_key_file = r->tls_key;
    r->o.raft_address = r->raft_address;
    r->o.raft_data_dir = r->raft_dir;
    r->o.publications = (const char *const *)r->pubs;
    r->o.npublications = r->npubs;
    r->o.peers = NULL;
    r->o.sequences = NULL;
    r->o.reconnect_min_ms = dflt(opts->reconnect_min_ms, 200);
    r->o.reconnect_max_ms = dflt(opts->reconnect_max_ms, 5000);
    if (r->o.reconnect_max_ms < r->o.reconnect_min_ms)
        r->o.reconnect_max_ms = r->o.reconnect_min_ms;
    r->o.heartbeat_ms = dflt(opts->heartbeat_ms, 1000);
    r->o.dead_after_ms = dflt(opts->dead_after_ms, 10000);
    r->o.held_retry_ms = dflt(opts->held_retry_ms, 5000);
    r->o.status_interval_ms = opts->status_interval_ms < 0 ? -1 : dflt(opts->status_interval_ms, 1000);
    r->o.start_timeout_ms = dflt(opts->start_timeout_ms, 60000);
    for (uint32_t i = 0; i < r->npeers; i++)
        r->peers[i].out_backoff = r->o.reconnect_min_ms;
    *out = r;
    return 0;
}

void aamm_replicator_set_conflict_cb(struct aamm_replicator *r, aamm_replicator_conflict_cb cb,
                                     void *arg)
{
    r->conflict_cb = cb;
    r->conflict_arg = arg;
}

void aamm_replicator_set_stream_cb(struct aamm_replicator *r, aamm_replicator_stream_cb cb,
                                   void *arg)
{
    r->stream_cb = cb;
    r->stream_arg = arg;
}

const char *aamm_replicator_errmsg(const struct aamm_replicator *r)
{
    return aamm__errmsg(&r->err);
}

/* ====================================================================================
 * Stream states: one place that reports every change
 * ==================================================================================== */

const char *aamm_replicator_stream_state_name(enum aamm_replicator_stream_state s)
{
    switch (s) {
    case AAMM_STREAM_DOWN:
        return "down";
    case AAMM_STREAM_CONNECTING:
        return "connecting";
    case AAMM_STREAM_STREAMING:
        return "streaming";
    case AAMM_STREAM_HELD:
        return "held";
    }
    return "?";
}

static void set_state(struct rpeer *p, bool out, enum aamm_replicator_stream_state s,
                      const char *reason)
{
    enum aamm_replicator_stream_state *st = out ? &p->out_state : &p->in_state;
    char *rs = out ? p->out_reason : p->in_reason;
    enum aamm_replicator_stream_state was = *st;
    if (reason)
        snprintf(rs, REASON_MAX, "%s", reason);
    else if (s == AAMM_STREAM_STREAMING)
        rs[0] = '\0';
    if (was == s)
        return;
    *st = s;
    if (s == AAMM_STREAM_STREAMING) {
        AAMM_INFO("replicator: %s %s %s: streaming", p->name, out ? "out" : "in",
                  out ? "to" : "from");
    } else if (was == AAMM_STREAM_STREAMING || s == AAMM_STREAM_HELD) {
        AAMM_WARN("replicator: %s %s: %s%s%s", p->name, out ? "out" : "in",
                  aamm_replicator_stream_state_name(s), rs[0] ? ": " : "", rs);
    }
    if (p->r->stream_cb && (s == AAMM_STREAM_STREAMING || was == AAMM_STREAM_STREAMING ||
                            s == AAMM_STREAM_HELD))
        p->r->stream_cb(p->r, p->id, out ? "out" : "in", s == AAMM_STREAM_STREAMING,
                        s == AAMM_STREAM_STREAMING ? "" : rs, p->r->stream_arg);
}

/* ====================================================================================
 * Out: capture -> sender link
 * ==================================================================================== */

/* The next attempt (link or capture) after the current delay, which then doubles up to
 * reconnect_max_ms. */
static void retry_later(struct rpeer *p, int64_t now)
{
    int max = p->r->o.reconnect_max_ms;
    p->out_retry_at = now + p->out_backoff;
    p->out_backoff = p->out_backoff > max / 2 ? max : p->out_backoff * 2;
}

static void out_backoff(struct rpeer *p, int64_t now)
{
    /* a link that streamed for a while starts over at the shortest delay */
    if (p->out_ready_since && now - p->out_ready_since > 10000)
        p->out_backoff = p->r->o.reconnect_min_ms;
    retry_later(p, now);
    p->out_ready_since = 0;
}

/* Drop the capture (it restarts from the slot's confirmed position next time: everything
 * after it the new link's receiver has not made durable is sent again). */
static void out_drop_capture(struct rpeer *p)
{
    if (p->cap) {
        if (p->cap_streaming)
            (void)aamm_capture_send_status(p->cap);
        aamm_capture_free(p->cap);
    }
    p->cap = NULL;
    p->cap_streaming = false;
    p->have_ev = false;
    p->prog_lsn = p->prog_need = 0;
    p->hold_head = p->hold_n = 0; /* the new capture sees them again */
    p->hold_lsn = 0;
}

static void out_fail(struct rpeer *p, const char *what, const char *msg, int64_t now)
{
    char reason[REASON_MAX];
    if (!msg || !*msg)
        msg = "closed";
    /* component messages usually carry their own prefix ("capture: slot ...") */
    if (strncmp(msg, what, strlen(what)) == 0)
        snprintf(reason, sizeof reason, "%s", msg);
    else
        snprintf(reason, sizeof reason, "%s: %s", what, msg);
    out_drop_capture(p);
    if (p->ls) {
        aamm_link_free(p->ls);
        p->ls = NULL;
        p->reconnects++;
    }
    out_backoff(p, now);
    set_state(p, true, AAMM_STREAM_DOWN, reason);
}

static int out_new_link(struct rpeer *p)
{
    struct aamm_replicator *r = p->r;
    struct aamm_link_options lo;
    char err[256];
    int rc;
    memset(&lo, 0, sizeof lo);
    lo.role = AAMM_LINK_SENDER;
    lo.node_id = r->o.node_id;
    lo.cluster = r->cluster;
    lo.peer_ids = &p->id;
    lo.npeer_ids = 1;
    lo.secret = r->secret;
    lo.secret_len = r->o.secret_len;
    lo.heartbeat_ms = r->o.heartbeat_ms;
    lo.dead_after_ms = r->o.dead_after_ms;
    lo.send_queue_bytes = r->o.send_queue_bytes;
    lo.tls = r->o.tls;
    lo.tls_ca_file = r->tls_ca;
    lo.tls_cert_file = r->tls_cert;
    lo.tls_key_file = r->tls_key;
    rc = aamm_link_new(&p->ls, &lo, err, sizeof err);
    if (rc < 0) {
        /* options are validated at aamm_replicator_new(); this is memory or TLS files */
        out_fail(p, "link", err, aamm__now_ms());
        return rc == AAMM_ENOMEM ? rc : 0;
    }
    rc = aamm_link_connect(p->ls, p->host, p->port);
    if (rc < 0) {
        out_fail(p, "connect", aamm_link_errmsg(p->ls), aamm__now_ms());
        return 0;
    }
    set_state(p, true, AAMM_STREAM_CONNECTING, NULL);
    return 0;
}

static int out_new_capture(struct rpeer *p)
{
    struct aamm_replicator *r = p->r;
    struct aamm_capture_options co;
    char err[256];
    int rc;
    memset(&co, 0, sizeof co);
    co.conninfo = r->conninfo;
    co.slot = p->slot;
    co.publications = (const char *const *)r->pubs;
    co.npublications = r->npubs;
    co.node_id = r->o.node_id;
    co.start_lsn = 0; /* from the slot: the link skips what the peer already has */
    /* every skipped transaction of another peer is held (struct hold); lost peers' ones
     * are forwarded */
    co.report_skipped = true;
    uint32_t fwd[AAMM_REPLICATOR_MAX_PEERS];
    uint32_t nfwd = 0;
    for (uint32_t i = 0; i < r->npeers; i++)
        if (r->peers[i].lost && &r->peers[i] != p)
            fwd[nfwd++] = r->peers[i].id;
    co.forward_origins = nfwd ? fwd : NULL;
    co.nforward_origins = nfwd;
    rc = aamm_capture_new(&p->cap, &co, err, sizeof err);
    if (rc < 0)
        return rc;
    rc = aamm_capture_start(p->cap);
    if (rc < 0) {
        snprintf(err, sizeof err, "%s", aamm_capture_errmsg(p->cap));
        aamm_capture_free(p->cap);
        p->cap = NULL;
        retry_later(p, aamm__now_ms()); /* the link stays */
        snprintf(p->out_reason, REASON_MAX, "capture: %.200s", err);
        return rc == AAMM_ENOMEM ? rc : 0;
    }
    p->sent_end = 0;
    p->handed = 0;
    return 0;
}

/* The position the slot may be confirmed to: what the peer acked, and a PROGRESS position
 * once everything sent before it is acked; never past what capture handed out. */
static void out_confirm(struct rpeer *p)
{
    uint64_t acked, target;
    if (!p->cap_streaming || !p->ls)
        return;
    acked = aamm_link_acked(p->ls, p->r->o.node_id);
    target = acked;
    if (p->prog_lsn && acked >= p->prog_need && p->prog_lsn > target)
        target = p->prog_lsn;
    if (target > p->handed)
        target = p->handed;
    /* never past another origin's transaction the peer does not have yet */
    while (p->hold_n && aamm_link_acked(p->ls, p->holds[p->hold_head].origin) >=
                            p->holds[p->hold_head].olsn) {
        p->hold_head++;
        p->hold_n--;
    }
    if (!p->hold_n)
        p->hold_head = 0;
    p->hold_lsn = p->hold_n ? p->holds[p->hold_head].pos : 0;
    if (p->hold_n && target > p->hold_lsn)
        target = p->hold_lsn;
    if (target > aamm_capture_confirmed(p->cap))
        (void)aamm_capture_confirm(p->cap, target);
}

static struct rpeer *peer_by_id(struct aamm_replicator *r, uint32_t id)
{
    for (uint32_t k = 0; k < r->npeers; k++)
        if (r->peers[k].id == id)
            return &r->peers[k];
    return NULL;
}

/* Hold the slot at the position handed out before a transaction of @origin ending at @olsn
 * there (struct hold). Returns 0, AAMM_ENOMEM, or AAMM_EAGAIN when the hold is full with
 * an entry of another origin last (the caller restarts the capture from the slot). */
static int hold_add(struct rpeer *p, uint32_t origin, uint64_t olsn)
{
    struct hold *h;
    if (origin == p->id || !peer_by_id(p->r, origin))
        return 0; /* the peer's own, or no peer acks it */
    if (p->hold_n && p->hold_head + p->hold_n == p->hold_cap && p->hold_head > 0) {
        memmove(p->holds, p->holds + p->hold_head, p->hold_n * sizeof *p->holds);
        p->hold_head = 0;
    }
    if (p->hold_head + p->hold_n == p->hold_cap) {
        if (p->hold_cap >= HOLD_MAX) {
            /* full: a run of one origin merges into its last entry (held a little longer) */
            h = &p->holds[p->hold_head + p->hold_n - 1];
            if (h->origin != origin)
                return AAMM_EAGAIN;
            if (olsn > h->olsn)
                h->olsn = olsn;
            return 0;
        }
        size_t cap = p->hold_cap ? p->hold_cap * 2 : 64;
        h = aamm__realloc(p->holds, cap * sizeof *h);
        if (!h)
            return AAMM_ENOMEM;
        p->holds = h;
        p->hold_cap = cap;
    }
    p->holds[p->hold_head + p->hold_n++] = (struct hold){p->handed, olsn, origin};
    return 0;
}

static int out_pump(struct rpeer *p, int64_t now)
{
    int n = 0, rc;
    while (p->ls && aamm_link_state(p->ls) == AAMM_LINK_READY && p->cap_streaming) {
        if (n++ >= PUMP_BUDGET) {
            p->r->more = true;
            break;
        }
        if (!p->have_ev) {
            rc = aamm_capture_next(p->cap, &p->ev);
            if (rc == AAMM_EAGAIN)
                break;
            if (rc < 0) {
                out_fail(p, "capture", aamm_capture_errmsg(p->cap), now);
                return rc == AAMM_ENOMEM ? rc : 0;
            }
            p->have_ev = true;
        }
        rc = 0;
        switch (p->ev.kind) {
        case AAMM_CAPTURE_BEGIN:
            rc = aamm_link_send_begin(p->ls, p->ev.txn);
            p->marker_pending[0] = '\0';
            break;
        case AAMM_CAPTURE_CHANGE:
            rc = aamm_link_send_change(p->ls, p->ev.change);
            if (rc == 0 && p->ev.txn && p->ev.change->kind == AAMM_CHANGE_MESSAGE &&
                p->ev.change->prefix && strcmp(p->ev.change->prefix, AAMM__MARKER_PREFIX) == 0)
                snprintf(p->marker_pending, sizeof p->marker_pending, "%.*s",
                         (int)p->ev.change->content_len, p->ev.change->content);
            break;
        case AAMM_CAPTURE_COMMIT:
            if (p->ev.txn->origin_node != p->r->o.node_id) {
                /* forwarded (a lost peer's): held until the peer acks it for its origin */
                rc = aamm_link_send_commit(p->ls, p->ev.txn);
                if (rc == 0 && (rc = hold_add(p, p->ev.txn->origin_node,
                                              p->ev.txn->end_lsn)) == AAMM_EAGAIN)
                    rc = HOLD_FULL;
                if (rc == 0) {
                    if (p->ev.lsn > p->handed)
                        p->handed = p->ev.lsn;
                    p->fwd_txns++;
                }
                break;
            }
            rc = aamm_link_send_commit(p->ls, p->ev.txn);
            if (rc == 0) {
                p->sent_end = p->ev.txn->end_lsn;
                if (p->marker_pending[0]) {
                    memcpy(p->marker, p->marker_pending, sizeof p->marker);
                    p->marker_end = p->sent_end;
                    p->marker_pending[0] = '\0';
                }
                if (p->sent_end > p->handed)
                    p->handed = p->sent_end;
                p->out_txns++;
            }
            break;

        case AAMM_CAPTURE_PROGRESS:
            /* a skipped transaction of another origin: held until the peer has it */
            if (p->ev.txn && (rc = hold_add(p, p->ev.txn->origin_node,
                                            p->ev.txn->origin_lsn)) < 0) {
                if (rc == AAMM_EAGAIN)
                    rc = HOLD_FULL;
                break;
            }
            /* nothing to send: confirmable once everything sent so far is acked */
            if (p->ev.lsn > p->handed)
                p->handed = p->ev.lsn;
            if (p->ev.lsn > p->prog_lsn) {
                p->prog_lsn = p->ev.lsn;
                p->prog_need = p->sent_end;
            }
            break;
        case AAMM_CAPTURE_RELATION:
            break; /* the link sends relations with the first change that uses them */
        }
        if (rc == AAMM_EAGAIN)
            break; /* the link's queue is full: keep the event, do not step capture */
        if (rc == HOLD_FULL) {
            /* the hold is full: read again from the slot once the peer caught up */
            out_drop_capture(p);
            retry_later(p, now);
            set_state(p, true, AAMM_STREAM_CONNECTING, "hold: too many transactions of "
                                                      "other origins not yet at the peer");
            return 0;
        }
        if (rc < 0) {
            out_fail(p, "send", aamm_link_errmsg(p->ls), now);
            return rc == AAMM_ENOMEM ? rc : 0;
        }
        p->have_ev = false;
    }
    return 0;
}

/* Step the sender link; false (and the stream torn down for a retry) when it failed. */
static bool out_link_step(struct rpeer *p, int64_t now)
{
    int rc = aamm_link_step(p->ls);
    if (rc < 0 || aamm_link_state(p->ls) >= AAMM_LINK_CLOSED) {
        out_fail(p, "link", aamm_link_errmsg(p->ls), now);
        return false;
    }
    return true;
}

static int out_step(struct rpeer *p, int64_t now)
{
    int rc;
    if (p->lost)
        return 0; /* nothing goes to a node gone for good */
    if (!p->ls) {
        if (now < p->out_retry_at)
            return 0;
        if ((rc = out_new_link(p)) < 0)
            return rc;
        if (!p->ls)
            return 0;
    }
    if (!out_link_step(p, now) || aamm_link_state(p->ls) != AAMM_LINK_READY)
        return 0;
    if (!p->out_ready_since)
        p->out_ready_since = now;
    if (!p->cap) {
        if (now < p->out_retry_at)
            return 0;
        if ((rc = out_new_capture(p)) < 0)
            return rc;
        if (!p->cap)
            return 0;
    }
    if (p->have_ev) {
        /* the link refused the event: capture must not step (that would invalidate it), but
         * its status updates must go on, or the server ends the walsender after
         * wal_sender_timeout while a peer applies slowly or holds its stream */
        if (p->cap_streaming && now - p->held_status_ms >= 5000) {
            (void)aamm_capture_send_status(p->cap);
            p->held_status_ms = now;
        }
    } else {
        rc = aamm_capture_step(p->cap);
        if (rc < 0) {
            char reason[REASON_MAX];
            snprintf(reason, sizeof reason, "%s", aamm_capture_errmsg(p->cap));
            out_drop_capture(p);
            retry_later(p, now);
            set_state(p, true, AAMM_STREAM_CONNECTING, reason);
            return rc == AAMM_ENOMEM ? rc : 0;
        }
    }
    if (!p->cap_streaming && aamm_capture_streaming(p->cap)) {
        p->cap_streaming = true;
        p->out_backoff = p->r->o.reconnect_min_ms;
        set_state(p, true, AAMM_STREAM_STREAMING, NULL);
    }
    if ((rc = out_pump(p, now)) < 0)
        return rc;
    if (!p->ls)
        return 0;
    /* write what the pump queued now rather than at the next step */
    if (out_link_step(p, now))
        out_confirm(p);
    return 0;
}

/* ====================================================================================
 * In: receiver link -> apply
 * ==================================================================================== */

static void on_conflict(struct aamm_apply *ap, const struct aamm_conflict *c, void *arg)
{
    struct rpeer *p = arg;
    AAMM__UNUSED(ap);
    if (p->r->conflict_cb)
        p->r->conflict_cb(p->r, p->id, c, p->r->conflict_arg);
}

static int in_new_apply(struct rpeer *p)
{
    struct aamm_replicator *r = p->r;
    struct aamm_apply_options ao;
    char err[256];
    int rc;
    aamm_apply_options_init(&ao);
    ao.conninfo = r->apply_conninfo;
    ao.local_node = r->o.node_id;
    ao.source_node = p->id;
    ao.synchronous_commit_off = !r->o.apply_synchronous_commit;
    if (r->o.apply_max_queued_changes)
        ao.max_queued_changes = r->o.apply_max_queued_changes;
    if (r->o.apply_max_txn_changes)
        ao.max_txn_changes = r->o.apply_max_txn_changes;
    ao.policy = r->o.policy;
    ao.on_conflict = on_conflict;
    ao.conflict_arg = p;
    rc = aamm_apply_new(&p->ap, &ao, err, sizeof err);
    if (rc < 0)
        return aamm__errf(&r->err, rc, "replicator: apply from %s: %s", p->name, err);
    if (r->o.resolver &&
        (rc = aamm_apply_set_resolver(p->ap, NULL, NULL, r->o.resolver, r->o.resolver_arg)) < 0)
        return aamm__errf(&r->err, rc, "replicator: apply from %s: %s", p->name,
                          aamm_apply_errmsg(p->ap));
    return 0;
}

static void in_drop_link(struct rpeer *p, const char *reason)
{
    if (p->lr) {
        aamm_link_free(p->lr);
        p->lr = NULL;
        p->reconnects++;
    }
    if (p->have_pend)
        aamm_change_clear(&p->pend);
    p->have_pend = false;
    aamm_transaction_clear(&p->fbegin);
    p->have_fbegin = false;
    if (p->in_open && p->cur)
        (void)aamm_apply_abort(p->cur->ap);
    p->in_open = false;
    if (p->cur && p->cur->fwd_open == p)
        p->cur->fwd_open = NULL;
    p->cur = NULL;
    if (p->lost)
        return;
    if (p->in_state != AAMM_STREAM_HELD)
        set_state(p, false, AAMM_STREAM_DOWN, reason);
    else
        snprintf(p->in_reason + strlen(p->in_reason),
                 REASON_MAX - strlen(p->in_reason), "; link: %s", reason);
}

static void lag_push(struct rpeer *p, uint64_t end, int64_t ts)
{
    if (p->lag_n == LAG_RING)
        return; /* the oldest stays: the figure can only err on the old side */
    p->lag[(p->lag_head + p->lag_n) % LAG_RING] = (struct lag_sample){end, ts};
    p->lag_n++;
}

static void lag_trim(struct rpeer *p, uint64_t applied)
{
    while (p->lag_n && p->lag[p->lag_head].end_lsn <= applied) {
        p->lag_head = (p->lag_head + 1) % LAG_RING;
        p->lag_n--;
    }
}

/* End the transaction open on the apply of p->cur (its COMMIT went there, or it was
 * aborted): a lost peer's apply is free for another in side's forwarded one. */
static void in_close(struct rpeer *p)
{
    p->in_open = false;
    if (p->cur && p->cur->fwd_open == p)
        p->cur->fwd_open = NULL;
}

static int in_pump(struct rpeer *p)
{
    struct aamm_wire_event ev;
    struct rpeer *q;
    int n = 0, rc;
    char reason[REASON_MAX];
    while (p->lr) {
        if (n++ >= PUMP_BUDGET) {
            p->r->more = true;
            break;
        }
        if (p->have_pend) {
            rc = aamm_apply_change(p->cur->ap, &p->pend);
            if (rc == AAMM_EAGAIN)
                break;
            if (rc < 0)
                goto apply_failed;
            p->have_pend = false;
        }
        if (p->have_fbegin) {
            /* a lost peer's transaction forwarded by this peer goes to the lost peer's apply
             * (its origin progress deduplicates), once no other in side has one open there:
             * each survivor's share of the lost peer's transactions is a prefix of them in
             * their order, so whole transactions from several interleave safely */
            q = peer_by_id(p->r, p->fbegin.origin_node);
            if (q->fwd_open && q->fwd_open != p)
                break;
            p->cur = q;
            rc = aamm_apply_begin(q->ap, &p->fbegin);
            aamm_transaction_clear(&p->fbegin);
            p->have_fbegin = false;
            if (rc < 0)
                goto apply_failed;
            q->fwd_open = p;
            p->in_open = true;
        }
        rc = aamm_link_recv(p->lr, &ev);
        if (rc == AAMM_EAGAIN)
            break;
        if (rc < 0) {
            snprintf(reason, sizeof reason, "link: %s",
                     rc == AAMM_ECLOSED ? "peer said goodbye" : aamm_link_errmsg(p->lr));
            in_drop_link(p, reason);
            return 0;
        }
        switch (ev.kind) {
        case AAMM_WIRE_EV_BEGIN:
            if (p->in_open) {
                (void)aamm_apply_abort(p->cur->ap);
                in_close(p);
            }
            if (ev.txn.origin_node != p->id) {
                q = peer_by_id(p->r, ev.txn.origin_node);
                if (!q || !q->lost || q == p) {
                    snprintf(reason, sizeof reason,
                             "link: a transaction of node %" PRIu32 " forwarded, which is not a "
                             "lost peer here",
                             ev.txn.origin_node);
                    in_drop_link(p, reason);
                    return 0;
                }
                if ((rc = aamm_transaction_copy(&p->fbegin, &ev.txn)) < 0)
                    return rc;
                p->have_fbegin = true;
                break;
            }
            p->cur = p;
            rc = aamm_apply_begin(p->ap, &ev.txn);
            if (rc < 0)
                goto apply_failed;
            p->in_open = true;
            break;
        case AAMM_WIRE_EV_CHANGE:
            rc = aamm_link_take_change(p->lr, &p->pend);
            if (rc < 0)
                return rc;
            p->have_pend = true;
            break;
        case AAMM_WIRE_EV_COMMIT:
            rc = aamm_apply_commit(p->cur->ap, &ev.txn);
            if (rc < 0)
                goto apply_failed;
            in_close(p);
            if (p->cur == p && ev.txn.end_lsn > p->received) {
                p->received = ev.txn.end_lsn;
                lag_push(p, ev.txn.end_lsn, ev.txn.commit_time);
            }
            break;
        default:
            break;
        }
    }
    return 0;
apply_failed:
    if (rc == AAMM_ENOMEM)
        return rc;
    /* a call refused by apply: a protocol problem of the stream, start it over */
    snprintf(reason, sizeof reason, "apply: %s", aamm_apply_errmsg(p->cur->ap));
    in_drop_link(p, reason);
    return 0;
}

static int in_step(struct rpeer *p, int64_t now)
{
    struct aamm_replicator *r = p->r;
    int rc;
    uint64_t f;
    if (p->lr) {
        rc = aamm_link_step(p->lr);
        if (rc < 0 && rc != AAMM_ECLOSED && rc != AAMM_ECONN) {
            char reason[REASON_MAX];
            snprintf(reason, sizeof reason, "link: %s", aamm_link_errmsg(p->lr));
            in_drop_link(p, reason);
        }
        /* on ECLOSED/ECONN, recv hands out what arrived before, then fails */
    }
    /* received transactions go to apply before it steps, so they are sent at once */
    if ((rc = in_pump(p)) < 0)
        return rc;
    rc = aamm_apply_step(p->ap);
    if (rc == AAMM_EGAP) {
        /* a streamed transaction failed and apply discarded it and what followed: the peer
         * must send again from the flushed position, which a new link resumes from */
        char reason[REASON_MAX];
        snprintf(reason, sizeof reason, "apply: %s", aamm_apply_errmsg(p->ap));
        in_drop_link(p, reason);
        rc = 0;
    }
    if (rc < 0 && rc != AAMM_ENOMEM) {
        if (p->in_state != AAMM_STREAM_HELD) {
            char reason[REASON_MAX];
            snprintf(reason, sizeof reason, "apply: %s", aamm_apply_errmsg(p->ap));
            set_state(p, false, AAMM_STREAM_HELD, reason);
            p->held_retry_at = now + r->o.held_retry_ms;
        } else if (now >= p->held_retry_at) {
            (void)aamm_apply_resume(p->ap);
            p->held_retry_at = now + r->o.held_retry_ms;
        }
    } else if (rc == AAMM_ENOMEM) {
        return rc;
    } else if (p->in_state == AAMM_STREAM_HELD) {
        set_state(p, false, p->lr && aamm_link_state(p->lr) == AAMM_LINK_READY
                                ? AAMM_STREAM_STREAMING
                                : AAMM_STREAM_DOWN,
                  NULL);
    }
    if ((rc = in_pump(p)) < 0) /* what apply's step made room for */
        return rc;
    lag_trim(p, aamm_apply_progress(p->ap));
    /* ack exactly what apply reports flushed */
    f = aamm_apply_flushed(p->ap);
    if (p->lr && aamm_link_state(p->lr) == AAMM_LINK_READY && f > p->last_ack &&
        f != AAMM_LSN_INVALID) {
        if (aamm_link_ack(p->lr, p->id, f) == 0)
            p->last_ack = f;
    }
    /* and this node's progress of every other origin: the peer holds its slot past the
     * transactions of those origins it has and we may not (struct hold), and forwards a
     * lost one's from there */
    for (uint32_t k = 0; p->lr && aamm_link_state(p->lr) == AAMM_LINK_READY && k < r->npeers;
         k++) {
        struct rpeer *q = &r->peers[k];
        if (q == p)
            continue;
        f = aamm_apply_flushed(q->ap);
        if (f != AAMM_LSN_INVALID && f > p->acks[k] && aamm_link_ack(p->lr, q->id, f) == 0)
            p->acks[k] = f;
    }
    return 0;
}

/* ====================================================================================
 * Accepting peers
 * ==================================================================================== */

static bool applies_ready(const struct aamm_replicator *r)
{
    for (uint32_t i = 0; i < r->npeers; i++)
        if (!aamm_apply_ready(r->peers[i].ap))
            return false;
    return true;
}

/* Whether a peer waits in the listen backlog. A failing accept() is not cheap: the kernel
 * makes the new socket's inode and file before it finds the queue empty, and frees them on
 * the way out; a zero-timeout poll() of the one fd only looks. */
static bool accept_pending(int fd)
{
    struct pollfd p = {fd, POLLIN, 0};
    return poll(&p, 1, 0) > 0 && (p.revents & POLLIN);
}

/* Take one peer off the listen backlog: 1 (taken, whatever became of it), 0 (none waits),
 * AAMM_ENOMEM. */
static int accept_one(struct aamm_replicator *r)
{
    struct aamm_link_options lo;
    struct aamm_wire_position pos[AAMM_REPLICATOR_MAX_PEERS];
    char err[256];
    int fd, slot = -1, rc;
    fd = accept(r->listen_fd, NULL, NULL);
    if (fd < 0)
        return 0;
    for (int i = 0; i < MAX_PENDING_ACCEPTS; i++)
        if (!r->acc[i].link) {
            slot = i;
            break;
        }
    /* (called only once every apply is ready: resume positions must be known before the
     * link is made.) Too many handshakes at once: closed, the peer dials again. */
    if (slot < 0) {
        close(fd);
        return 1;
    }
    for (uint32_t i = 0; i < r->npeers; i++) {
        pos[i].origin_node = r->peers[i].id;
        pos[i].lsn = aamm_apply_flushed(r->peers[i].ap);
    }
    memset(&lo, 0, sizeof lo);
    lo.role = AAMM_LINK_RECEIVER;
    lo.node_id = r->o.node_id;
    lo.cluster = r->cluster;
    lo.peer_ids = r->peer_ids;
    lo.npeer_ids = r->npeers;
    lo.secret = r->secret;
    lo.secret_len = r->o.secret_len;
    lo.resume = pos;
    lo.nresume = r->npeers;
    lo.heartbeat_ms = r->o.heartbeat_ms;
    lo.dead_after_ms = r->o.dead_after_ms;
    lo.tls = r->o.tls;
    lo.tls_ca_file = r->tls_ca;
    lo.tls_cert_file = r->tls_cert;
    lo.tls_key_file = r->tls_key;
    rc = aamm_link_new(&r->acc[slot].link, &lo, err, sizeof err);
    if (rc < 0) {
        close(fd);
        AAMM_WARN("replicator: accepting a peer: %s", err);
        return rc == AAMM_ENOMEM ? rc : 1;
    }
    if (aamm_link_adopt_fd(r->acc[slot].link, fd) < 0) {
        AAMM_WARN("replicator: accepting a peer: %s", aamm_link_errmsg(r->acc[slot].link));
        aamm_link_free(r->acc[slot].link);
        r->acc[slot].link = NULL;
    }
    return 1;
}

/* Step the links still in their handshake; bind each authenticated one to its peer. */
static void step_accepting(struct aamm_replicator *r)
{
    for (int i = 0; i < MAX_PENDING_ACCEPTS; i++) {
        struct aamm_link *l = r->acc[i].link;
        int rc;
        if (!l)
            continue;
        rc = aamm_link_step(l);
        if (rc < 0 || aamm_link_state(l) >= AAMM_LINK_CLOSED) {
            AAMM_INFO("replicator: an incoming link failed before it was ready: %s",
                      aamm_link_errmsg(l));
            aamm_link_free(l);
            r->acc[i].link = NULL;
            continue;
        }
        if (aamm_link_state(l) != AAMM_LINK_READY)
            continue;
        uint32_t id = aamm_link_peer_id(l);
        struct rpeer *p = NULL;
        for (uint32_t k = 0; k < r->npeers; k++)
            if (r->peers[k].id == id)
                p = &r->peers[k];
        r->acc[i].link = NULL;
        if (!p) { /* the link checked the id against our list: cannot happen */
            aamm_link_free(l);
            continue;
        }
        if (p->lost) { /* gone for good: its apply takes forwarded transactions only */
            aamm_link_free(l);
            continue;
        }
        /* a newer connection of the same peer replaces the old one (the peer restarted
         * or the old one is half dead) */
        if (p->lr)
            in_drop_link(p, "replaced by a new connection");
        p->lr = l;
        /* the peer counts what this link told it as acknowledged */
        p->last_ack = 0;
        (void)aamm_link_resume_position(l, id, &p->last_ack);
        for (uint32_t k = 0; k < r->npeers; k++) {
            p->acks[k] = 0;
            (void)aamm_link_resume_position(l, r->peers[k].id, &p->acks[k]);
        }
        if (p->in_state != AAMM_STREAM_HELD)
            set_state(p, false, AAMM_STREAM_STREAMING, NULL);
    }
}

static int listen_open(struct aamm_replicator *r)
{
    struct addrinfo hints, *res = NULL, *ai;
    int fd = -1, on = 1, gai;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    gai = getaddrinfo(r->listen_host, r->listen_port, &hints, &res);
    if (gai != 0)
        return aamm__errf(&r->err, AAMM_EIO, "replicator: listen %s:%s: %s", r->listen_host,
                          r->listen_port, gai_strerror(gai));
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
            continue;
        (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 64) == 0)
            break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        return aamm__errf(&r->err, AAMM_EIO, "replicator: listen %s:%s: %s", r->listen_host,
                          r->listen_port, strerror(errno));
    r->listen_fd = fd;
    return 0;
}

/* ====================================================================================
 * Control connection: setup (blocking) and the status view (non-blocking)
 * ==================================================================================== */

static int ctl_query_ok(struct aamm_replicator *r, PGresult *res, const char *what)
{
    ExecStatusType st = PQresultStatus(res);
    if (st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK)
        return 0;
    int rc = aamm__errf(&r->err, PQstatus(r->ctl) == CONNECTION_OK ? AAMM_ESERVER : AAMM_ECONN,
                        "replicator: %s: %s", what, PQerrorMessage(r->ctl));
    return rc;
}

static int setup_node(struct aamm_replicator *r)
{
    char timeout[64];
    const char *keys[] = {"dbname", "connect_timeout", "application_name", NULL};
    const char *vals[] = {r->conninfo, "10", "aamm_replicator", NULL};
    PGresult *res;
    int rc;
    r->ctl = PQconnectdbParams(keys, vals, 1);
    if (!r->ctl)
        return AAMM_ENOMEM;
    if (PQstatus(r->ctl) != CONNECTION_OK)
        return aamm__errf(&r->err, AAMM_ECONN, "replicator: connecting to the node: %s",
                          PQerrorMessage(r->ctl));
    snprintf(timeout, sizeof timeout, "SET statement_timeout = %d", r->o.start_timeout_ms);
    res = PQexec(r->ctl, timeout);
    rc = ctl_query_ok(r, res, "statement_timeout");
    PQclear(res);
    if (rc < 0)
        return rc;
    res = PQexec(r->ctl, "SELECT pg_catalog.to_regclass('aamm.replicator_peer') IS NOT NULL");
    rc = ctl_query_ok(r, res, "checking the node's setup");
    if (rc == 0 && strcmp(PQgetvalue(res, 0, 0), "t") != 0)
        rc = aamm__errf(&r->err, AAMM_ENOTFOUND,
                        "replicator: the node has no libaamm schema of version %d or later "
                        "(run aamm_node_install(), e.g. the agent's setup)",
                        AAMM_NODE_SQL_VERSION);
    PQclear(res);
    if (rc < 0)
        return rc;
    /* Slots before any write: a write made from now on reaches every peer, even one that
     * has never connected. (Creation waits for the transactions running now to end.) */
    for (uint32_t i = 0; i < r->npeers; i++) {
        const char *params[1] = {r->peers[i].slot};
        res = PQexecParams(r->ctl,
                           "SELECT pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput') "
                           "WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots "
                           "WHERE slot_name = $1)",
                           1, NULL, params, NULL, NULL, 0);
        rc = ctl_query_ok(r, res, r->peers[i].slot);
        PQclear(res);
        if (rc == AAMM_ESERVER && strstr(aamm__errmsg(&r->err), "already exists"))
            rc = 0; /* created concurrently (a capture of an earlier run) */
        if (rc < 0)
            return aamm__errprefix(&r->err, "creating slot %s", r->peers[i].slot), rc;
    }
    res = PQexec(r->ctl, "RESET statement_timeout");
    PQclear(res);
    res = PQexec(r->ctl, "DELETE FROM aamm.replicator_peer");
    rc = ctl_query_ok(r, res, "aamm.replicator_peer");
    PQclear(res);
    if (rc < 0)
        return rc;
    if (PQsetnonblocking(r->ctl, 1) != 0)
        return aamm__errf(&r->err, AAMM_ECONN, "replicator: %s", PQerrorMessage(r->ctl));
    r->ctl_state = CTL_IDLE;
    return 0;
}

/* A small JSON writer for the status rows (names are the host's: escape them). */
static void galloc_supply(struct aamm_replicator *r, int64_t now);

struct jbuf {
    char *p;
    size_t len, cap;
    bool oom;
};

static void jb_put(struct jbuf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap * 2 : 1024;
        while (nc < b->len + n + 1)
            nc *= 2;
        char *np = aamm__realloc(b->p, nc);
        if (!np) {
            b->oom = true;
            return;
        }
        b->p = np;
        b->cap = nc;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void jb_printf(struct jbuf *b, const char *fmt, ...) AAMM_PRINTF(2, 3);
static void jb_printf(struct jbuf *b, const char *fmt, ...)
{
    char tmp[256];
    va_list ap;
    int n;
    va_start(ap, fmt);
    n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0)
        jb_put(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

static void jb_str(struct jbuf *b, const char *s)
{
    jb_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            jb_put(b, e, 2);
        } else if (c < 0x20) {
            jb_printf(b, "\\u%04x", c);
        } else {
            jb_put(b, (const char *)&c, 1);
        }
    }
    jb_put(b, "\"", 1);
}

static void jb_lsn(struct jbuf *b, const char *key, uint64_t lsn)
{
    char t[AAMM_LSN_BUFSIZE];
    if (lsn == AAMM_LSN_INVALID)
        jb_printf(b, ",\"%s\":null", key);
    else
        jb_printf(b, ",\"%s\":\"%s\"", key, aamm_lsn_format(lsn, t));
}

static void status_send(struct aamm_replicator *r)
{
    struct jbuf b = {0};
    const char *params[1];
    jb_put(&b, "[", 1);
    for (uint32_t i = 0; i < r->npeers; i++) {
        struct aamm_replicator_peer_status st;
        (void)aamm_replicator_peer_status(r, i, &st);
        jb_printf(&b, "%s{\"peer_id\":%" PRIu32 ",\"node_id\":%" PRIu32 ",\"peer_name\":",
                  i ? "," : "", st.node_id, r->o.node_id);
        jb_str(&b, st.name);
        jb_printf(&b, ",\"out_state\":\"%s\"", aamm_replicator_stream_state_name(st.out_state));
        jb_lsn(&b, "out_sent_lsn", st.out_sent_lsn);
        jb_lsn(&b, "out_acked_lsn", st.out_acked_lsn);
        jb_lsn(&b, "out_confirmed_lsn", st.out_confirmed_lsn);
        jb_printf(&b, ",\"out_lag_bytes\":%" PRIu64 ",\"out_txns\":%" PRIu64
                      ",\"out_txn_rate\":%.3f,\"in_state\":\"%s\"",
                  st.out_lag_bytes, st.out_txns, st.out_txn_rate,
                  aamm_replicator_stream_state_name(st.in_state));
        jb_lsn(&b, "in_received_lsn", st.in_received_lsn);
        jb_lsn(&b, "in_applied_lsn", st.in_applied_lsn);
        jb_printf(&b, ",\"in_lag_ms\":%" PRId64 ",\"in_txns\":%" PRIu64
                      ",\"in_txn_rate\":%.3f,\"in_pending\":%zu,\"reconnects\":%" PRIu32
                      ",\"conflicts\":{",
                  st.in_lag_ms, st.in_txns, st.in_txn_rate, st.in_pending, st.reconnects);
        bool first = true;
        for (int k = 1; k < AAMM_CONFLICT_NKINDS; k++) {
            jb_printf(&b, "%s\"%s\":%" PRIu64, first ? "" : ",",
                      aamm_conflict_kind_name((enum aamm_conflict_kind)k), st.conflicts[k]);
            first = false;
        }
        jb_put(&b, "},\"reason\":", 11);
        jb_str(&b, st.reason);
        jb_put(&b, "}", 1);
    }
    jb_put(&b, "]", 1);
    if (b.oom) {
        aamm__free(b.p);
        return;
    }
    params[0] = b.p;
    if (PQsendQueryParams(
            r->ctl,
            "INSERT INTO aamm.replicator_peer AS t (peer_id, peer_name, node_id, out_state, "
            "out_sent_lsn, out_acked_lsn, out_confirmed_lsn, out_lag_bytes, out_txns, "
            "out_txn_rate, in_state, in_received_lsn, in_applied_lsn, in_lag_ms, in_txns, "
            "in_txn_rate, in_pending, conflicts, reconnects, reason, updated_at) "
            "SELECT peer_id, peer_name, node_id, out_state, out_sent_lsn, out_acked_lsn, "
            "out_confirmed_lsn, out_lag_bytes, out_txns, out_txn_rate, in_state, "
            "in_received_lsn, in_applied_lsn, in_lag_ms, in_txns, in_txn_rate, in_pending, "
            "conflicts, reconnects, reason, pg_catalog.now() "
            "FROM pg_catalog.jsonb_populate_recordset(NULL::aamm.replicator_peer, $1::jsonb) "
            "ON CONFLICT (peer_id) DO UPDATE SET peer_name = EXCLUDED.peer_name, "
            "node_id = EXCLUDED.node_id, out_state = EXCLUDED.out_state, "
            "out_sent_lsn = EXCLUDED.out_sent_lsn, out_acked_lsn = EXCLUDED.out_acked_lsn, "
            "out_confirmed_lsn = EXCLUDED.out_confirmed_lsn, "
            "out_lag_bytes = EXCLUDED.out_lag_bytes, out_txns = EXCLUDED.out_txns, "
            "out_txn_rate = EXCLUDED.out_txn_rate, in_state = EXCLUDED.in_state, "
            "in_received_lsn = EXCLUDED.in_received_lsn, "
            "in_applied_lsn = EXCLUDED.in_applied_lsn, in_lag_ms = EXCLUDED.in_lag_ms, "
            "in_txns = EXCLUDED.in_txns, in_txn_rate = EXCLUDED.in_txn_rate, "
            "in_pending = EXCLUDED.in_pending, conflicts = EXCLUDED.conflicts, "
            "reconnects = EXCLUDED.reconnects, reason = EXCLUDED.reason, "
            "updated_at = EXCLUDED.updated_at",
            1, NULL, params, NULL, NULL, 0)) {
        r->ctl_state = CTL_BUSY;
        r->status_flush = PQflush(r->ctl) == 1;
    } else {
        AAMM_WARN("replicator: status view: %s", PQerrorMessage(r->ctl));
        PQfinish(r->ctl);
        r->ctl = NULL;
        r->ctl_state = CTL_DOWN;
        r->ctl_retry_at = aamm__now_ms() + 1000;
    }
    aamm__free(b.p);
}

static void ctl_step(struct aamm_replicator *r, int64_t now)
{
    if (r->o.status_interval_ms < 0 && r->nseqs == 0)
        return;
    switch (r->ctl_state) {
    case CTL_DOWN:
        if (now < r->ctl_retry_at)
            return;
        {
            const char *keys[] = {"dbname", "application_name", NULL};
            const char *vals[] = {r->conninfo, "aamm_replicator", NULL};
            r->ctl = PQconnectStartParams(keys, vals, 1);
        }
        if (!r->ctl || PQstatus(r->ctl) == CONNECTION_BAD) {
            PQfinish(r->ctl);
            r->ctl = NULL;
            r->ctl_retry_at = now + 1000;
            return;
        }
        r->ctl_state = CTL_CONNECTING;
        r->ctl_poll = PGRES_POLLING_WRITING;
        return;
    case CTL_CONNECTING:
        r->ctl_poll = PQconnectPoll(r->ctl);
        if (r->ctl_poll == PGRES_POLLING_OK) {
            (void)PQsetnonblocking(r->ctl, 1);
            r->ctl_state = CTL_IDLE;
        } else if (r->ctl_poll == PGRES_POLLING_FAILED) {
            PQfinish(r->ctl);
            r->ctl = NULL;
            r->ctl_state = CTL_DOWN;
            r->ctl_retry_at = now + 1000;
        }
        return;
    case CTL_BUSY:
        if (r->status_flush)
            r->status_flush = PQflush(r->ctl) == 1;
        if (!PQconsumeInput(r->ctl)) {
            AAMM_WARN("replicator: status view: %s", PQerrorMessage(r->ctl));
            PQfinish(r->ctl);
            r->ctl = NULL;
            r->ctl_state = CTL_DOWN;
            r->ctl_retry_at = now + 1000;
            return;
        }
        while (!PQisBusy(r->ctl)) {
            PGresult *res = PQgetResult(r->ctl);
            if (!res) {
                r->ctl_state = CTL_IDLE;
                break;
            }
            if (PQresultStatus(res) != PGRES_COMMAND_OK)
                AAMM_WARN("replicator: status view: %s", PQresultErrorMessage(res));
            PQclear(res);
        }
        return;
    case CTL_IDLE:
        if (r->nseqs)
            galloc_supply(r, now);
        if (r->o.status_interval_ms >= 0 && now >= r->status_due) {
            r->status_due = now + r->o.status_interval_ms;
            status_send(r);
        }
        return;
    }
}

/* ====================================================================================
 * Consensus and galloc
 * ==================================================================================== */

static int consensus_open(struct aamm_replicator *r)
{
    struct aamm_consensus_options co;
    struct sigaction sa;
    char err[512];
    int rc;
    /* raft's transport writes to peers through libuv, which does not block SIGPIPE: a peer
     * that goes away would kill the process. The library leaves process-wide signals to
     * the host, so it only checks. */
    if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL)
        return aamm__errf(&r->err, AAMM_EINVAL,
                          "replicator: consensus needs SIGPIPE ignored or handled (call "
                          "aamm_consensus_ignore_sigpipe() at start-up): a peer that goes "
                          "away would otherwise kill this process");
    memset(&co, 0, sizeof co);
    co.node_id = r->o.node_id;
    co.raft_address = r->raft_address;
    co.data_dir = r->raft_dir;
    co.cluster_name = r->cluster;
    co.secret = r->secret;
    co.secret_len = r->o.secret_len;
    rc = aamm_consensus_new(&r->cs, &co, err, sizeof err);
    if (rc < 0)
        return aamm__errf(&r->err, rc, "replicator: consensus: %s", err);
    if (r->o.bootstrap_consensus) {
        struct aamm_consensus_member m[AAMM_REPLICATOR_MAX_PEERS + 1];
        size_t n = 0;
        m[n++] = (struct aamm_consensus_member){r->o.node_id, r->node_name,
                                                r->listen_port ? r->listen_port : "",
                                                r->raft_address};
        for (uint32_t i = 0; i < r->npeers; i++)
            if (r->peers[i].raft)
                m[n++] = (struct aamm_consensus_member){r->peers[i].id, r->peers[i].name,
                                                        r->peers[i].port ? r->peers[i].port : "",
                                                        r->peers[i].raft};
        rc = aamm_consensus_bootstrap(r->cs, m, n);
        if (rc < 0 && rc != AAMM_ESTATE)
            return aamm__errf(&r->err, rc, "replicator: consensus bootstrap: %s",
                              aamm_consensus_errmsg(r->cs));
    }
    rc = aamm_consensus_start(r->cs);
    if (rc < 0)
        return aamm__errf(&r->err, rc, "replicator: consensus: %s", aamm_consensus_errmsg(r->cs));
    for (uint32_t i = 0; i < r->nseqs; i++) {
        struct aamm_galloc_options go;
        memset(&go, 0, sizeof go);
        go.name = r->seqs[i].name;
        go.range_size = r->o.sequence_range_size;
        rc = aamm_galloc_new(&r->seqs[i].g, &go, err, sizeof err);
        if (rc < 0)
            return aamm__errf(&r->err, rc, "replicator: galloc %s: %s", r->seqs[i].name, err);
        rc = aamm_galloc_attach(r->seqs[i].g, r->cs);
        if (rc < 0)
            return aamm__errf(&r->err, rc, "replicator: galloc %s: %s", r->seqs[i].name,
                              aamm_galloc_errmsg(r->seqs[i].g));
    }
    return 0;
}

static void member_added(struct aamm_consensus *cs, int status, void *arg)
{
    struct aamm_replicator *r = arg;
    (void)cs;
    r->member_adding = false;
    if (status != 0) {
        AAMM_DEBUG("replicator: consensus: adding a member: %s", aamm_strerror(status));
        r->member_retry_at = aamm__now_ms() + 1000;
    }
}

/* Consensus membership follows the configuration, adding only: on the leader, every
 * configured peer with a raft address that is not a member yet is added (a node that
 * joins runs consensus on an empty data dir without bootstrap and waits for this; the
 * existing nodes learn of it when their hosts add it as a peer). Removal stays explicit
 * (aamm_consensus_remove_member(), after the peer left the configuration: parting is a
 * decision, not a missing line); a lost peer is never added. One change at a time; a
 * refused one (another change running, a bootstrap member whose metadata is not in yet)
 * is tried again a second later. */
static void members_follow(struct aamm_replicator *r, int64_t now)
{
    struct aamm_consensus_member m;
    if (r->member_adding || now < r->member_retry_at ||
        aamm_consensus_state(r->cs) != AAMM_CONSENSUS_LEADER)
        return;
    for (uint32_t i = 0; i < r->npeers; i++) {
        struct rpeer *p = &r->peers[i];
        if (!p->raft || p->lost || aamm_consensus_member_get(r->cs, p->id, &m) == 0)
            continue;
        m = (struct aamm_consensus_member){p->id, p->name, p->port ? p->port : "", p->raft};
        if (aamm_consensus_add_member(r->cs, &m, member_added, r) == 0) {
            r->member_adding = true;
            AAMM_INFO("replicator: consensus: adding node %" PRIu32 " (%s, %s) as a member",
                      p->id, p->name, p->raft);
        } else {
            r->member_retry_at = now + 1000;
        }
        return;
    }
}

static int consensus_step(struct aamm_replicator *r, int64_t now)
{
    int rc;
    if (!r->cs)
        return 0;
    rc = aamm_consensus_step(r->cs);
    if (rc == AAMM_ENOMEM)
        return rc;
    members_follow(r, now);
    for (uint32_t i = 0; i < r->nseqs; i++)
        (void)aamm_galloc_pump(r->seqs[i].g);
    return 0;
}

/* Keep the node's aamm.galloc_nextval() supplied: when a sequence has fewer values left on
 * the node than one range, move the lowest range the consensus client holds to the node.
 * Blocking queries on the (idle) control connection: short, local, at most one per
 * sequence every half second. */
static void galloc_supply(struct aamm_replicator *r, int64_t now)
{
    for (uint32_t i = 0; i < r->nseqs; i++) {
        struct galloc_seq *q = &r->seqs[i];
        int64_t rem = 0, start, end, want;
        char err[256];
        if (now < q->next_check)
            continue;
        q->next_check = now + 500;
        want = r->o.sequence_range_size > 0 ? r->o.sequence_range_size : 1000;
        if (aamm_galloc_node_remaining(r->ctl, q->name, &rem, err, sizeof err) < 0) {
            AAMM_WARN("replicator: galloc %s: %s", q->name, err);
            continue;
        }
        if (rem >= want || aamm_galloc_take_range(q->g, &start, &end) < 0)
            continue;
        if (aamm_galloc_supply_node(r->ctl, q->name, start, end, err, sizeof err) < 0)
            AAMM_WARN("replicator: galloc %s: supplying [%" PRId64 ", %" PRId64 "): %s", q->name,
                      start, end, err);
        else
            AAMM_DEBUG("replicator: galloc %s: supplied [%" PRId64 ", %" PRId64 ")", q->name,
                       start, end);
    }
}

struct aamm_consensus *aamm_replicator_consensus(struct aamm_replicator *r)
{
    return r->cs;
}

/* ====================================================================================
 * Life cycle and the host loop
 * ==================================================================================== */

int aamm_replicator_start(struct aamm_replicator *r)
{
    int rc;
    if (r->started)
        return aamm__errf(&r->err, AAMM_ESTATE, "replicator: started already");
    r->started = true;
    if ((rc = setup_node(r)) < 0)
        return rc;
    for (uint32_t i = 0; i < r->npeers; i++)
        if ((rc = in_new_apply(&r->peers[i])) < 0)
            return rc;
    if (r->listen_port && (rc = listen_open(r)) < 0)
        return rc;
    if (r->raft_address && (rc = consensus_open(r)) < 0)
        return rc;
    r->rate_at = aamm__now_ms();
    r->status_due = r->rate_at;
    AAMM_INFO("replicator: node %" PRIu32 " (%s) started with %" PRIu32 " peers", r->o.node_id,
              r->node_name, r->npeers);
    return 0;
}

static void update_rates(struct aamm_replicator *r, int64_t now)
{
    double dt = (double)(now - r->rate_at) / 1000.0;
    if (dt < 1.0)
        return;
    for (uint32_t i = 0; i < r->npeers; i++) {
        struct rpeer *p = &r->peers[i];
        struct aamm_apply_stats as;
        aamm_apply_stats(p->ap, &as);
        p->out_rate = (double)(p->out_txns - p->out_mark) / dt;
        p->out_mark = p->out_txns;
        p->in_rate = (double)(as.committed - p->in_mark) / dt;
        p->in_mark = as.committed;
    }
    r->rate_at = now;
}

int aamm_replicator_step(struct aamm_replicator *r)
{
    int64_t now = aamm__now_ms();
    int rc;
    if (!r->started || r->stopped)
        return aamm__errf(&r->err, AAMM_ESTATE, "replicator: not running");
    r->more = false;
    /* Peers that dial before every apply is ready wait in the listen backlog. */
    if (r->listen_fd >= 0 && applies_ready(r) && accept_pending(r->listen_fd))
        for (int i = 0; i < MAX_PENDING_ACCEPTS; i++)
            if ((rc = accept_one(r)) <= 0) {
                if (rc < 0)
                    return rc;
                break; /* the backlog is empty */
            }
    step_accepting(r);
    for (uint32_t i = 0; i < r->npeers; i++) {
        if ((rc = in_step(&r->peers[i], now)) < 0)
            return aamm__errf(&r->err, rc, "replicator: %s", aamm_strerror(rc));
        if ((rc = out_step(&r->peers[i], now)) < 0)
            return aamm__errf(&r->err, rc, "replicator: %s", aamm_strerror(rc));
    }
    if ((rc = consensus_step(r, now)) < 0)
        return rc;
    update_rates(r, now);
    ctl_step(r, now);
    return 0;
}

static void add_fd(struct aamm_replicator_pollfd *fds, size_t cap, size_t *n, int fd, int ev)
{
    if (fd < 0 || !ev)
        return;
    if (*n < cap)
        fds[*n] = (struct aamm_replicator_pollfd){fd, ev};
    (*n)++;
}

size_t aamm_replicator_fds(const struct aamm_replicator *r, struct aamm_replicator_pollfd *fds,
                           size_t cap)
{
    size_t n = 0;
    if (!r->started || r->stopped)
        return 0;
    if (applies_ready(r))
        add_fd(fds, cap, &n, r->listen_fd, AAMM_READ);
    for (int i = 0; i < MAX_PENDING_ACCEPTS; i++)
        if (r->acc[i].link)
            add_fd(fds, cap, &n, aamm_link_fd(r->acc[i].link), aamm_link_events(r->acc[i].link));
    for (uint32_t i = 0; i < r->npeers; i++) {
        const struct rpeer *p = &r->peers[i];
        if (p->ls)
            add_fd(fds, cap, &n, aamm_link_fd(p->ls), aamm_link_events(p->ls));
        if (p->cap && !p->have_ev)
            add_fd(fds, cap, &n, aamm_capture_fd(p->cap), aamm_capture_events(p->cap));
        if (p->lr)
            add_fd(fds, cap, &n, aamm_link_fd(p->lr), aamm_link_events(p->lr));
        if (p->ap)
            add_fd(fds, cap, &n, aamm_apply_fd(p->ap), aamm_apply_events(p->ap));
    }
    if (r->ctl && r->ctl_state == CTL_CONNECTING)
        add_fd(fds, cap, &n, PQsocket(r->ctl),
               r->ctl_poll == PGRES_POLLING_READING ? AAMM_READ : AAMM_WRITE);
    else if (r->ctl && r->ctl_state == CTL_BUSY)
        add_fd(fds, cap, &n, PQsocket(r->ctl), AAMM_READ | (r->status_flush ? AAMM_WRITE : 0));
    if (r->cs)
        add_fd(fds, cap, &n, aamm_consensus_fd(r->cs), aamm_consensus_events(r->cs));
    return n;
}

static int tmin(int a, int b)
{
    if (a < 0)
        return b;
    if (b < 0)
        return a;
    return a < b ? a : b;
}

static int until(int64_t at, int64_t now)
{
    if (at <= now)
        return 0;
    return at - now > 3600000 ? 3600000 : (int)(at - now);
}

int aamm_replicator_timeout(struct aamm_replicator *r)
{
    int64_t now = aamm__now_ms();
    int t = 1000; /* rates, held retries and reconnects are checked at least this often */
    if (!r->started || r->stopped)
        return -1;
    if (r->more)
        return 0;
    for (int i = 0; i < MAX_PENDING_ACCEPTS; i++)
        if (r->acc[i].link)
            t = tmin(t, aamm_link_timeout(r->acc[i].link));
    for (uint32_t i = 0; i < r->npeers; i++) {
        struct rpeer *p = &r->peers[i];
        if (p->ls)
            t = tmin(t, aamm_link_timeout(p->ls));
        else
            t = tmin(t, until(p->out_retry_at, now));
        if (p->ls && !p->cap && aamm_link_state(p->ls) == AAMM_LINK_READY)
            t = tmin(t, until(p->out_retry_at, now));
        if (p->cap && !p->have_ev)
            t = tmin(t, aamm_capture_timeout(p->cap));
        if (p->lr)
            t = tmin(t, aamm_link_timeout(p->lr));
        if (p->ap)
            t = tmin(t, aamm_apply_timeout(p->ap));
        if (p->in_state == AAMM_STREAM_HELD)
            t = tmin(t, until(p->held_retry_at, now));
    }
    if (r->o.status_interval_ms >= 0) {
        if (r->ctl_state == CTL_IDLE)
            t = tmin(t, until(r->status_due, now));
        else if (r->ctl_state == CTL_DOWN)
            t = tmin(t, until(r->ctl_retry_at, now));
    }
    if (r->cs)
        t = tmin(t, aamm_consensus_timeout(r->cs));
    return t < 0 ? 0 : t;
}

int aamm_replicator_run(struct aamm_replicator *r, int timeout_ms, const volatile int *stop)
{
    int64_t end = aamm__now_ms() + timeout_ms;
    struct aamm_replicator_pollfd fds[AAMM_REPLICATOR_MAX_FDS];
    struct pollfd pfd[AAMM_REPLICATOR_MAX_FDS];
    for (;;) {
        int64_t now = aamm__now_ms();
        size_t n;
        int t, rc;
        if (now >= end || (stop && *stop))
            return 0;
        n = aamm_replicator_fds(r, fds, AAMM_REPLICATOR_MAX_FDS);
        if (n > AAMM_REPLICATOR_MAX_FDS)
            n = AAMM_REPLICATOR_MAX_FDS;
        for (size_t i = 0; i < n; i++) {
            pfd[i].fd = fds[i].fd;
            pfd[i].events = (short)(((fds[i].events & AAMM_READ) ? POLLIN : 0) |
                                    ((fds[i].events & AAMM_WRITE) ? POLLOUT : 0));
            pfd[i].revents = 0;
        }
        t = tmin(aamm_replicator_timeout(r), until(end, now));
        if (poll(pfd, (nfds_t)n, t) < 0 && errno != EINTR)
            return aamm__errf(&r->err, AAMM_EIO, "replicator: poll: %s", strerror(errno));
        if ((rc = aamm_replicator_step(r)) < 0)
            return rc;
    }
}

void aamm_replicator_stop(struct aamm_replicator *r, int timeout_ms)
{
    int64_t end;
    if (!r || !r->started || r->stopped)
        return;
    /* goodbye after what is queued, then wait (bounded) for the links to close */
    for (uint32_t i = 0; i < r->npeers; i++) {
        struct rpeer *p = &r->peers[i];
        if (p->ls && aamm_link_state(p->ls) == AAMM_LINK_READY)
            (void)aamm_link_close(p->ls);
        if (p->lr && aamm_link_state(p->lr) == AAMM_LINK_READY) {
            uint64_t f = aamm_apply_flushed(p->ap);
            if (f > p->last_ack)
                (void)aamm_link_ack(p->lr, p->id, f);
            (void)aamm_link_close(p->lr);
        }
        if (p->cap_streaming) {
            out_confirm(p);
            (void)aamm_capture_send_status(p->cap);
        }
    }
    end = aamm__now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    while (aamm__now_ms() < end) {
        struct pollfd pfd[2 * AAMM_REPLICATOR_MAX_PEERS];
        nfds_t n = 0;
        for (uint32_t i = 0; i < r->npeers; i++) {
            struct aamm_link *ls[2] = {r->peers[i].ls, r->peers[i].lr};
            for (int k = 0; k < 2; k++) {
                if (!ls[k] || aamm_link_state(ls[k]) >= AAMM_LINK_CLOSED)
                    continue;
                (void)aamm_link_step(ls[k]);
                if (aamm_link_state(ls[k]) >= AAMM_LINK_CLOSED || aamm_link_fd(ls[k]) < 0)
                    continue;
                int ev = aamm_link_events(ls[k]);
                pfd[n].fd = aamm_link_fd(ls[k]);
                pfd[n].events = (short)(((ev & AAMM_READ) ? POLLIN : 0) | ((ev & AAMM_WRITE) ? POLLOUT : 0));
                pfd[n].revents = 0;
                n++;
            }
            if (r->peers[i].cap)
                (void)aamm_capture_step(r->peers[i].cap);
        }
        if (n == 0)
            break;
        (void)poll(pfd, n, 20);
    }
    r->stopped = true;
    for (uint32_t i = 0; i < r->npeers; i++) {
        struct rpeer *p = &r->peers[i];
        out_drop_capture(p);
        aamm_link_free(p->ls);
        p->ls = NULL;
        if (p->have_pend)
            aamm_change_clear(&p->pend);
        p->have_pend = false;
        aamm_link_free(p->lr);
        p->lr = NULL;
        p->out_state = AAMM_STREAM_DOWN;
        p->out_rate = p->in_rate = 0;
        if (p->in_state != AAMM_STREAM_HELD)
            p->in_state = AAMM_STREAM_DOWN;
    }
    for (int i = 0; i < MAX_PENDING_ACCEPTS; i++) {
        aamm_link_free(r->acc[i].link);
        r->acc[i].link = NULL;
    }
    if (r->listen_fd >= 0)
        close(r->listen_fd);
    r->listen_fd = -1;
    if (r->cs)
        aamm_consensus_close(r->cs);
    if (r->ctl)
        PQfinish(r->ctl);
    r->ctl = NULL;
    r->ctl_state = CTL_DOWN;
}

static void free_all(struct aamm_replicator *r)
{
    for (uint32_t i = 0; r->peers && i < r->npeers; i++) {
        struct rpeer *p = &r->peers[i];
        out_drop_capture(p);
        aamm_link_free(p->ls);
        aamm_link_free(p->lr);
        if (p->have_pend)
            aamm_change_clear(&p->pend);
        aamm_transaction_clear(&p->fbegin);
        aamm__free(p->holds);
        aamm_apply_free(p->ap);
        aamm__free(p->name);
        aamm__free(p->host);
        aamm__free(p->port);
        aamm__free(p->raft);
    }
    for (int i = 0; i < MAX_PENDING_ACCEPTS; i++)
        aamm_link_free(r->acc[i].link);
    if (r->listen_fd >= 0)
        close(r->listen_fd);
    for (uint32_t i = 0; i < r->nseqs; i++) {
        aamm_galloc_free(r->seqs[i].g);
        aamm__free(r->seqs[i].name);
    }
    if (r->cs) {
        aamm_consensus_close(r->cs);
        aamm_consensus_free(r->cs);
    }
    if (r->ctl)
        PQfinish(r->ctl);
    for (uint32_t i = 0; r->pubs && i < r->npubs; i++)
        aamm__free(r->pubs[i]);
    aamm__free(r->pubs);
    aamm__free(r->peers);
    aamm__free(r->peer_ids);
    aamm__free(r->node_name);
    aamm__free(r->conninfo);
    aamm__free(r->apply_conninfo);
    aamm__free(r->cluster);
    aamm__free(r->listen_host);
    aamm__free(r->listen_port);
    aamm__free(r->tls_ca);
    aamm__free(r->tls_cert);
    aamm__free(r->tls_key);
    aamm__free(r->raft_address);
    aamm__free(r->raft_dir);
    aamm__free(r->secret);
    aamm__free(r);
}

void aamm_replicator_free(struct aamm_replicator *r)
{
    if (!r)
        return;
    aamm_replicator_stop(r, 0);
    free_all(r);
}

/* ====================================================================================
 * Lost peers: survivors forward what they have of them (doc/membership.md)
 * ==================================================================================== */

int aamm_replicator_peer_lost(struct aamm_replicator *r, uint32_t node_id)
{
    struct rpeer *q = peer_by_id(r, node_id);
    char reason[REASON_MAX];
    if (!q)
        return aamm__errf(&r->err, AAMM_EINVAL, "replicator: node %" PRIu32 " is not a peer",
                          node_id);
    if (q->lost)
        return 0;
    snprintf(reason, sizeof reason, "lost: node %" PRIu32 " is gone for good", node_id);
    /* its streams stop for good; its apply stays, fed by the forwarded transactions */
    out_drop_capture(q);
    aamm_link_free(q->ls);
    q->ls = NULL;
    set_state(q, true, AAMM_STREAM_DOWN, reason);
    if (q->lr)
        in_drop_link(q, reason);
    if (q->in_state != AAMM_STREAM_HELD)
        set_state(q, false, AAMM_STREAM_DOWN, reason);
    q->lost = true;
    AAMM_INFO("replicator: %s is lost: forwarding what this node has of it", q->name);
    /* every other out side starts over from its slot, forwarding q's transactions: a new
     * capture (forward_origins) and a new link, whose receiver's resume position for q
     * skips what it has */
    snprintf(reason, sizeof reason, "restarting to forward node %" PRIu32, node_id);
    for (uint32_t k = 0; k < r->npeers; k++) {
        struct rpeer *p = &r->peers[k];
        if (p->lost)
            continue;
        out_drop_capture(p);
        if (p->ls) {
            aamm_link_free(p->ls);
            p->ls = NULL;
        }
        p->out_retry_at = 0;
        p->out_backoff = r->o.reconnect_min_ms;
        set_state(p, true, AAMM_STREAM_DOWN, reason);
    }
    return 0;
}

/* ====================================================================================
 * Status
 * ==================================================================================== */

uint32_t aamm_replicator_npeers(const struct aamm_replicator *r)
{
    return r->npeers;
}

int aamm_replicator_peer_status(const struct aamm_replicator *r, uint32_t i,
                                struct aamm_replicator_peer_status *st)
{
    const struct rpeer *p;
    if (i >= r->npeers)
        return AAMM_EINVAL;
    p = &r->peers[i];
    memset(st, 0, sizeof *st);
    st->node_id = p->id;
    snprintf(st->name, sizeof st->name, "%s", p->name);
    st->out_state = p->out_state;
    st->out_sent_lsn = p->sent_end;
    if (p->ls)
        st->out_acked_lsn = aamm_link_acked(p->ls, r->o.node_id);
    if (p->cap) {
        struct aamm_capture_stats cs;
        aamm_capture_stats(p->cap, &cs);
        st->out_confirmed_lsn = aamm_capture_confirmed(p->cap);
        if (cs.received_lsn > st->out_confirmed_lsn && st->out_confirmed_lsn)
            st->out_lag_bytes = cs.received_lsn - st->out_confirmed_lsn;
    }
    st->out_txns = p->out_txns;
    st->out_txn_rate = p->out_rate;
    st->in_state = p->in_state;
    st->in_received_lsn = p->received;
    if (p->ap) {
        struct aamm_apply_stats as;
        aamm_apply_stats(p->ap, &as);
        st->in_applied_lsn = aamm_apply_flushed(p->ap);
        st->in_txns = as.committed;
        st->in_pending = as.pending;
        memcpy(st->conflicts, as.conflicts, sizeof st->conflicts);
    }
    st->in_txn_rate = p->in_rate;
    if (p->lag_n) {
        int64_t age = (aamm__wall_us() - p->lag[p->lag_head].commit_time_us) / 1000;
        st->in_lag_ms = age > 0 ? age : 0;
    }
    st->reconnects = p->reconnects;
    st->lost = p->lost;
    st->out_forwarded = p->fwd_txns;
    st->out_hold_lsn = p->hold_lsn;
    st->out_holds = p->hold_n;
    if (p->in_state == AAMM_STREAM_HELD)
        snprintf(st->reason, sizeof st->reason, "in: %.240s", p->in_reason);
    else if (p->out_state != AAMM_STREAM_STREAMING && p->out_reason[0])
        snprintf(st->reason, sizeof st->reason, "out: %.240s", p->out_reason);
    else if (p->in_state != AAMM_STREAM_STREAMING && p->in_reason[0])
        snprintf(st->reason, sizeof st->reason, "in: %.240s", p->in_reason);
    return 0;
}

static void fmt_bytes(uint64_t b, char *buf, size_t n)
{
    if (b >= 10u * 1024 * 1024)
        snprintf(buf, n, "%" PRIu64 " MB", b / (1024 * 1024));
    else if (b >= 10u * 1024)
        snprintf(buf, n, "%" PRIu64 " kB", b / 1024);
    else
        snprintf(buf, n, "%" PRIu64 " B", b);
}

size_t aamm_replicator_status_line(const struct aamm_replicator *r, char *buf, size_t size)
{
    size_t len = 0;
    int n;
    n = snprintf(buf, size, "node %" PRIu32 " (%s):", r->o.node_id, r->node_name);
    len += n > 0 ? (size_t)n : 0;
    for (uint32_t i = 0; i < r->npeers; i++) {
        struct aamm_replicator_peer_status st;
        char lag[32];
        uint64_t nconf = 0;
        (void)aamm_replicator_peer_status(r, i, &st);
        for (int k = 1; k < AAMM_CONFLICT_NKINDS; k++)
            nconf += st.conflicts[k];
        fmt_bytes(st.out_lag_bytes, lag, sizeof lag);
        if (st.lost) /* its apply takes what the others forward of it */
            n = snprintf(len < size ? buf + len : NULL, len < size ? size - len : 0,
                         "%s %s: lost, forwarded in: pending %zu, %" PRIu64 " conflicts",
                         i ? ";" : "", st.name, st.in_pending, nconf);
        else
            n = snprintf(len < size ? buf + len : NULL, len < size ? size - len : 0,
                         "%s %s: out %s %.0f/s lag %s, in %s %.0f/s lag %" PRId64
                         " ms pending %zu, %" PRIu64 " conflicts%s%s",
                         i ? ";" : "", st.name, aamm_replicator_stream_state_name(st.out_state),
                         st.out_txn_rate, lag, aamm_replicator_stream_state_name(st.in_state),
                         st.in_txn_rate, st.in_lag_ms, st.in_pending, nconf,
                         st.reason[0] ? " - " : "", st.reason);
        len += n > 0 ? (size_t)n : 0;
    }
    return len;
}

bool aamm__replicator_marker_acked(const struct aamm_replicator *r, const char *token, char *who,
                                   size_t whosize)
{
    for (uint32_t i = 0; i < r->npeers; i++) {
        const struct rpeer *p = &r->peers[i];
        if (strcmp(p->marker, token) != 0 || !p->ls ||
            aamm_link_acked(p->ls, r->o.node_id) < p->marker_end) {
            snprintf(who, whosize, "%s", p->name);
            return false;
        }
    }
    return true;
}
