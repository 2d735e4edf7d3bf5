/*
 * consensus_psk.c: our raft_uv_transport: TCP with a mutual pre-shared-key handshake
 * before raft sees a byte, plus the framed forwarding channel on the same port.
 *
 * Handshake (C connects to A; key K = HMAC-SHA256(secret, "aamm-consensus-v1" | cluster)):
 *   1. C -> A  HELLO     magic "AAMMCS01" | role u8 | 3 zero bytes | C's id u64 LE |
 *                         A's id u64 LE | nonce_C [32] | addr_len u16 LE | C's raft address
 *   2. A -> C  CHALLENGE magic | nonce_A [32] | HMAC(K, 'A' | HELLO | nonce_A)
 *   3. C -> A  PROOF     HMAC(K, 'C' | HELLO | nonce_A)
 * A refuses a HELLO not addressed to its own id; C refuses a wrong CHALLENGE MAC; A refuses
 * a wrong PROOF. Fresh nonces from both sides stop replays, the labels stop reflection, and
 * the HELLO bytes bind both ids, the role and C's address. Until PROOF is verified no byte
 * reaches raft and no forwarded command is read.
 *
 * Handshake reads ask the kernel for exactly the bytes still missing, so whatever the peer
 * sent after its last handshake message (its first record, possibly in the same TCP
 * segment) stays in the socket for the record layer.
 *
 * After the handshake every byte travels in records (both channels, both directions):
 *   u32 LE length | payload [length] | HMAC-SHA256(K_dir, seq u64 LE | length u32 LE | payload)
 * K_dir = HMAC(K, "aamm-cs-session-v1" | "c2a" or "a2c" | HELLO | nonce_A): one key per
 * direction from both nonces, so a record cannot be reflected back or carried into another
 * connection. seq counts the records of one direction from 0; the receiver expects the next
 * one, so a tampered, dropped, replayed or reordered record fails its MAC and the connection
 * is closed (logged as an error through the log callback). The forwarding channel sends one
 * frame per record. Raft gets one end of a socketpair (a uv_pipe_t, owned by raft from
 * then on: raft uv_close()s it and raft_free()s its memory); we relay between that end and
 * the TCP socket, sealing what raft writes in records of at most RELAY_CHUNK bytes and
 * writing into the pair only payloads whose MAC checked out.
 *
 * Strangers: a connection that has not authenticated holds one of MAX_PENDING_HANDSHAKES
 * slots, at most MAX_PENDING_PER_SOURCE of them per source address. When a new connection
 * finds no slot, the oldest pending connection of the busiest source is closed instead of
 * refusing the newcomer (see admit()). A member finishes its handshake within a round trip
 * of being accepted, so a flood that keeps hundreds of connections open cannot keep a member
 * out; refusing newcomers (the old rule) let it do exactly that.
 *
 * Our sockets are raw non-blocking fds driven by uv_poll_t and written with
 * send(MSG_NOSIGNAL).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#include "consensus_int.h"

#define FRAME_MAX (1u << 20)
/* Raft's bytes are sealed in records of at most this many. */
#define RELAY_CHUNK (64u * 1024)
/* Stop reading one side while this much is waiting to be written to the other. */
#define RELAY_HIGH (1u << 20)
/* Pre-authentication slots (see admit()). */
#define MAX_PENDING_HANDSHAKES 64
#define MAX_PENDING_PER_SOURCE 16

enum {
    PH_CONNECTING = 1,
    PH_WAIT_MAGIC,      /* A: the first 8 bytes (strangers are dropped at once) */
    PH_WAIT_HELLO,      /* A: fixed part of HELLO */
    PH_WAIT_HELLO_ADDR, /* A: address part */
    PH_WAIT_CHALLENGE,  /* C */
    PH_WAIT_PROOF,      /* A */
    PH_UP,              /* authenticated: records flow (FWD frames, or raft's relay) */
    PH_CLOSING,
};

struct aamm__psk {
    struct raft_uv_transport *t;
    uv_loop_t *loop;
    uint8_t key[32];
    EVP_MAC *mac;
    EVP_MAC_CTX *mac_ctx;
    uint64_t id;
    char address[64];
    char bind[64];
    unsigned hs_timeout_ms;
    int lfd;
    uv_poll_t lpoll;
    bool lpoll_open;
    uv_timer_t defer; /* makes the close callback asynchronous */
    bool defer_open;
    raft_uv_accept_cb accept_cb;
    struct aamm__cs_conn *conns;
    void (*on_fwd)(struct aamm__cs_conn *c, void *arg);
    void *on_fwd_arg;
    bool closing;
    raft_uv_transport_close_cb close_cb;
    int open_handles;
    uint64_t serial;
    /* test hook: a simulated network partition (see aamm__psk_partition) */
    bool partitioned;
    uint64_t evicted; /* pending handshakes closed to make room (tests) */
};

struct aamm__cs_conn {
    struct aamm__psk *p;
    struct aamm__cs_conn *prev, *next;
    int fd;
    uv_poll_t poll;
    uv_timer_t timer;
    int open_handles;
    int events;
    bool outgoing;
    struct sockaddr_in src; /* incoming: the peer's address (per-source slot limit) */
    uint8_t role;
    int phase;
    uint64_t peer_id;
    char peer_addr[AAMM_CONSENSUS_NAME_MAX + 1];
    uint8_t nonce_mine[AAMM__PSK_NONCE];
    uint8_t hello[AAMM__PSK_HELLO_FIXED + AAMM_CONSENSUS_NAME_MAX];
    size_t hello_len;
    uint8_t hs[AAMM__PSK_CHALLENGE];
    size_t hs_have, hs_need;
    /* record layer (after the handshake) */
    uint8_t key_tx[32], key_rx[32];
    uint64_t seq_tx, seq_rx;
    uint8_t *in; /* records from the network, not yet verified */
    size_t in_len, in_cap;
    uint8_t *out; /* sealed records for the network */
    size_t out_len, out_off, out_cap;
    /* raft relay: our end of the socketpair whose other end raft owns */
    int lfd;
    uv_poll_t lpoll;
    int levents;
    uint8_t *lout; /* verified payloads for raft */
    size_t lout_len, lout_off, lout_cap;
    struct raft_uv_connect *req;
    raft_uv_connect_cb connect_cb;
    aamm__cs_conn_frame_fn frame_fn;
    aamm__cs_conn_state_fn state_fn;
    void *arg;
    uint64_t serial;
};

/* ---- crypto ------------------------------------------------------------------------------ */

void aamm__psk_derive_key(const char *cluster, const void *secret, size_t secret_len,
                          uint8_t key[32])
{
    static const char label[] = "aamm-consensus-v1";
    uint8_t msg[sizeof(label) + AAMM_CONSENSUS_NAME_MAX];
    size_t clen = strlen(cluster);
    unsigned len = 32;
    if (clen > AAMM_CONSENSUS_NAME_MAX)
        clen = AAMM_CONSENSUS_NAME_MAX;
    memcpy(msg, label, sizeof(label)); /* with its NUL as a separator */
    memcpy(msg + sizeof(label), cluster, clen);
    HMAC(EVP_sha256(), secret, (int)secret_len, msg, sizeof(label) + clen, key, &len);
}

void aamm__psk_mac(const uint8_t key[32], char label, const uint8_t *hello, size_t hello_len,
                   const uint8_t nonce[AAMM__PSK_NONCE], uint8_t out[AAMM__PSK_MAC])
{
    uint8_t msg[1 + AAMM__PSK_HELLO_FIXED + AAMM_CONSENSUS_NAME_MAX + AAMM__PSK_NONCE];
    unsigned len = AAMM__PSK_MAC;
    if (hello_len > AAMM__PSK_HELLO_FIXED + AAMM_CONSENSUS_NAME_MAX)
        hello_len = AAMM__PSK_HELLO_FIXED + AAMM_CONSENSUS_NAME_MAX;
    msg[0] = (uint8_t)label;
    memcpy(msg + 1, hello, hello_len);
    memcpy(msg + 1 + hello_len, nonce, AAMM__PSK_NONCE);
    HMAC(EVP_sha256(), key, 32, msg, 1 + hello_len + AAMM__PSK_NONCE, out, &len);
}

void aamm__psk_session_key(const uint8_t key[32], const char dir[3], const uint8_t *hello,
                           size_t hello_len, const uint8_t nonce_a[AAMM__PSK_NONCE],
                           uint8_t out[32])
{
    static const char label[] = "aamm-cs-session-v1";
    uint8_t msg[sizeof(label) + 3 + AAMM__PSK_HELLO_FIXED + AAMM_CONSENSUS_NAME_MAX +
                AAMM__PSK_NONCE];
    unsigned len = 32;
    size_t n = 0;
    if (hello_len > AAMM__PSK_HELLO_FIXED + AAMM_CONSENSUS_NAME_MAX)
        hello_len = AAMM__PSK_HELLO_FIXED + AAMM_CONSENSUS_NAME_MAX;
    memcpy(msg, label, sizeof(label)); /* with its NUL as a separator */
    n = sizeof(label);
    memcpy(msg + n, dir, 3);
    n += 3;
    memcpy(msg + n, hello, hello_len);
    n += hello_len;
    memcpy(msg + n, nonce_a, AAMM__PSK_NONCE);
    n += AAMM__PSK_NONCE;
    HMAC(EVP_sha256(), key, 32, msg, n, out, &len);
    OPENSSL_cleanse(msg, sizeof(msg));
}

/* MAC of one record: HMAC-SHA256(key, seq u64 LE | length u32 LE | payload); @rec points at
 * the length field. Returns 0 or AAMM_EINTERNAL. */
static int record_mac(EVP_MAC_CTX *ctx, const uint8_t key[32], uint64_t seq, const uint8_t *rec,
                      size_t len, uint8_t out[AAMM__PSK_MAC])
{
    uint8_t s[8];
    size_t outl = 0;
    OSSL_PARAM params[2];
    int i;
    params[0] = OSSL_PARAM_construct_utf8_string("digest", (char *)"SHA256", 0);
    params[1] = OSSL_PARAM_construct_end();
    for (i = 0; i < 8; i++)
        s[i] = (uint8_t)(seq >> (8 * i));
    if (EVP_MAC_init(ctx, key, 32, params) != 1 || EVP_MAC_update(ctx, s, sizeof(s)) != 1 ||
        EVP_MAC_update(ctx, rec, 4 + len) != 1 ||
        EVP_MAC_final(ctx, out, &outl, AAMM__PSK_MAC) != 1 || outl != AAMM__PSK_MAC) {
        ERR_clear_error();
        return AAMM_EINTERNAL;
    }
    return 0;
}

size_t aamm__psk_seal(const uint8_t key[32], uint64_t seq, const void *data, size_t len,
                      uint8_t *out)
{
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    EVP_MAC_CTX *ctx = mac != NULL ? EVP_MAC_CTX_new(mac) : NULL;
    size_t n = 0;
    out[0] = (uint8_t)len;
    out[1] = (uint8_t)(len >> 8);
    out[2] = (uint8_t)(len >> 16);
    out[3] = (uint8_t)(len >> 24);
    memmove(out + 4, data, len);
    if (ctx != NULL && record_mac(ctx, key, seq, out, len, out + 4 + len) == 0)
        n = 4 + len + AAMM__PSK_MAC;
    EVP_MAC_CTX_free(ctx);
    EVP_MAC_free(mac);
    return n;
}

/* ---- addresses ---------------------------------------------------------------------------- */

int aamm__cs_parse_addr(const char *text, void *out)
{
    struct sockaddr_in *sa = out;
    char host[32];
    const char *colon;
    char *end;
    unsigned long port;
    size_t hlen;
    if (text == NULL || (colon = strrchr(text, ':')) == NULL)
        return AAMM_EINVAL;
    hlen = (size_t)(colon - text);
    if (hlen == 0 || hlen >= sizeof(host))
        return AAMM_EINVAL;
    memcpy(host, text, hlen);
    host[hlen] = 0;
    errno = 0;
    port = strtoul(colon + 1, &end, 10);
    if (colon[1] == 0 || *end != 0 || errno != 0 || port > 65535)
        return AAMM_EINVAL;
    memset(sa, 0, sizeof(*sa));
    sa->sin_family = AF_INET;
    sa->sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &sa->sin_addr) != 1)
        return AAMM_EINVAL;
    return 0;
}

/* ---- connections ----------------------------------------------------------------------- */

static void conn_poll_cb(uv_poll_t *h, int status, int events);
static void relay_poll_cb(uv_poll_t *h, int status, int events);
static void conn_fail(struct aamm__cs_conn *c);
static void close_done(struct aamm__psk *p);

static void free_pipe(uv_handle_t *h)
{
    raft_free(h);
}

static void conn_handle_closed(uv_handle_t *h)
{
    struct aamm__cs_conn *c = h->data;
    struct aamm__psk *p = c->p;
    if (--c->open_handles > 0)
        return;
    if (c->prev)
        c->prev->next = c->next;
    else
        p->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    if (c->connect_cb != NULL) /* an outgoing raft connection that never came up */
        c->connect_cb(c->req, NULL, p->closing ? RAFT_CANCELED : RAFT_NOCONNECTION);
    if (c->state_fn != NULL && c->role == AAMM__CS_ROLE_FWD)
        c->state_fn(c, false, c->arg);
    OPENSSL_cleanse(c->key_tx, sizeof(c->key_tx));
    OPENSSL_cleanse(c->key_rx, sizeof(c->key_rx));
    aamm__free(c->in);
    aamm__free(c->out);
    aamm__free(c->lout);
    aamm__free(c);
    if (p->closing)
        close_done(p);
}

/* Stop our handles and close our fds (raft's end of a relay pair is raft's to close: it sees
 * EOF on its reads and EPIPE on its writes). */
static void conn_shutdown(struct aamm__cs_conn *c)
{
    if (c->phase == PH_CLOSING)
        return;
    c->phase = PH_CLOSING;
    uv_poll_stop(&c->poll);
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->poll, conn_handle_closed);
    uv_close((uv_handle_t *)&c->timer, conn_handle_closed);
    if (c->lfd >= 0) {
        uv_poll_stop(&c->lpoll);
        uv_close((uv_handle_t *)&c->lpoll, conn_handle_closed);
        close(c->lfd);
        c->lfd = -1;
    }
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
}

static void conn_fail(struct aamm__cs_conn *c)
{
    conn_shutdown(c);
}

static void conn_timeout_cb(uv_timer_t *t)
{
    struct aamm__cs_conn *c = t->data;
    AAMM_DEBUG("consensus: handshake with node %llu timed out", (unsigned long long)c->peer_id);
    conn_fail(c);
}

static void conn_want(struct aamm__cs_conn *c, int events)
{
    if (c->phase == PH_CLOSING || events == c->events)
        return;
    c->events = events;
    if (events == 0)
        uv_poll_stop(&c->poll);
    else
        uv_poll_start(&c->poll, events, conn_poll_cb);
}

/* Poll interest once authenticated: read the network unless raft's side is backed up,
 * write it while sealed records wait; the same, mirrored, on the relay pair. */
static void conn_interest(struct aamm__cs_conn *c)
{
    int net = 0, loc = 0;
    if (c->phase != PH_UP)
        return;
    if (c->out_len > c->out_off)
        net |= UV_WRITABLE;
    if (c->lfd < 0 || c->lout_len - c->lout_off < RELAY_HIGH)
        net |= UV_READABLE;
    conn_want(c, net);
    if (c->lfd < 0)
        return;
    if (c->lout_len > c->lout_off)
        loc |= UV_WRITABLE;
    if (c->out_len - c->out_off < RELAY_HIGH)
        loc |= UV_READABLE;
    if (loc != c->levents) {
        c->levents = loc;
        if (loc == 0)
            uv_poll_stop(&c->lpoll);
        else
            uv_poll_start(&c->lpoll, loc, relay_poll_cb);
    }
}

static struct aamm__cs_conn *conn_new(struct aamm__psk *p, int fd, bool outgoing)
{
    struct aamm__cs_conn *c = aamm__calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->p = p;
    c->fd = fd;
    c->lfd = -1;
    c->outgoing = outgoing;
    c->serial = ++p->serial;
    if (uv_poll_init_socket(p->loop, &c->poll, fd) != 0) {
        aamm__free(c);
        return NULL;
    }
    uv_timer_init(p->loop, &c->timer);
    c->poll.data = c;
    c->timer.data = c;
    c->open_handles = 2;
    c->next = p->conns;
    if (p->conns)
        p->conns->prev = c;
    p->conns = c;
    uv_timer_start(&c->timer, conn_timeout_cb, p->hs_timeout_ms, 0);
    return c;
}

/* Send a small handshake message whole, or fail (a fresh socket's buffer always has room). */
static bool hs_send(struct aamm__cs_conn *c, const void *data, size_t len)
{
    ssize_t n;
    do
        n = send(c->fd, data, len, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n == (ssize_t)len;
}

/* Read exactly what the current handshake step still lacks. Returns 1 complete, 0 more to
 * come, -1 failure. */
static int hs_read(struct aamm__cs_conn *c)
{
    while (c->hs_have < c->hs_need) {
        ssize_t n = recv(c->fd, c->hs + c->hs_have, c->hs_need - c->hs_have, 0);
        if (n > 0) {
            c->hs_have += (size_t)n;
        } else if (n == 0) {
            return -1;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return 0;
        } else {
            return -1;
        }
    }
    return 1;
}

static void hs_expect(struct aamm__cs_conn *c, int phase, size_t need)
{
    c->phase = phase;
    c->hs_have = 0;
    c->hs_need = need;
}

/* Derive the session keys: C sends under "c2a", A under "a2c". */
static void conn_keys(struct aamm__cs_conn *c, const uint8_t nonce_a[AAMM__PSK_NONCE])
{
    uint8_t *c2a = c->outgoing ? c->key_tx : c->key_rx;
    uint8_t *a2c = c->outgoing ? c->key_rx : c->key_tx;
    aamm__psk_session_key(c->p->key, "c2a", c->hello, c->hello_len, nonce_a, c2a);
    aamm__psk_session_key(c->p->key, "a2c", c->hello, c->hello_len, nonce_a, a2c);
    c->seq_tx = c->seq_rx = 0;
}

/* Authenticated: open the forwarding channel, or give raft its end of a relay pair. */
static void conn_established(struct aamm__cs_conn *c)
{
    struct aamm__psk *p = c->p;
    uv_timer_stop(&c->timer);
    if (c->role == AAMM__CS_ROLE_RAFT) {
        uv_pipe_t *pipe = raft_malloc(sizeof(*pipe));
        raft_uv_connect_cb cb = c->connect_cb;
        struct raft_uv_connect *req = c->req;
        int sv[2] = {-1, -1};
        c->connect_cb = NULL;
        if (pipe == NULL ||
            socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0 ||
            uv_poll_init_socket(p->loop, &c->lpoll, sv[0]) != 0) {
            raft_free(pipe);
            if (sv[0] >= 0) {
                close(sv[0]);
                close(sv[1]);
            }
            if (cb != NULL)
                cb(req, NULL, RAFT_NOCONNECTION);
            conn_fail(c);
            return;
        }
        c->lfd = sv[0];
        c->lpoll.data = c;
        c->open_handles++;
        if (uv_pipe_init(p->loop, pipe, 0) != 0) {
            raft_free(pipe);
            close(sv[1]);
            if (cb != NULL)
                cb(req, NULL, RAFT_NOCONNECTION);
            conn_fail(c);
            return;
        }
        if (uv_pipe_open(pipe, sv[1]) != 0) {
            close(sv[1]);
            uv_close((uv_handle_t *)pipe, free_pipe);
            if (cb != NULL)
                cb(req, NULL, RAFT_NOCONNECTION);
            conn_fail(c);
            return;
        }
        c->phase = PH_UP;
        conn_interest(c);
        if (c->outgoing)
            cb(req, (uv_stream_t *)pipe, 0);
        else
            p->accept_cb(p->t, c->peer_id, c->peer_addr, (uv_stream_t *)pipe);
        return;
    }
    c->phase = PH_UP;
    conn_interest(c);
    if (c->outgoing) {
        if (c->state_fn != NULL)
            c->state_fn(c, true, c->arg);
    } else if (p->on_fwd != NULL) {
        p->on_fwd(c, p->on_fwd_arg);
    } else {
        conn_fail(c);
    }
}

static void put_le64(uint8_t *p, uint64_t v)
{
    int i;
    for (i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le64(const uint8_t *p)
{
    uint64_t v = 0;
    int i;
    for (i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void send_hello(struct aamm__cs_conn *c)
{
    struct aamm__psk *p = c->p;
    size_t alen = strlen(p->address);
    uint8_t *h = c->hello;
    memcpy(h, AAMM__PSK_MAGIC, 8);
    h[8] = c->role;
    h[9] = h[10] = h[11] = 0;
    put_le64(h + 12, p->id);
    put_le64(h + 20, c->peer_id);
    if (RAND_bytes(c->nonce_mine, AAMM__PSK_NONCE) != 1) {
        conn_fail(c);
        return;
    }
    memcpy(h + 28, c->nonce_mine, AAMM__PSK_NONCE);
    h[60] = (uint8_t)alen;
    h[61] = (uint8_t)(alen >> 8);
    memcpy(h + 62, p->address, alen);
    c->hello_len = AAMM__PSK_HELLO_FIXED + alen;
    if (!hs_send(c, h, c->hello_len)) {
        conn_fail(c);
        return;
    }
    hs_expect(c, PH_WAIT_CHALLENGE, AAMM__PSK_CHALLENGE);
    conn_want(c, UV_READABLE);
}

/* Drive the handshake as far as the socket allows. */
static void hs_progress(struct aamm__cs_conn *c)
{
    struct aamm__psk *p = c->p;
    uint8_t mac[AAMM__PSK_MAC];
    int rc;
    for (;;) {
        if (c->phase == PH_CLOSING)
            return;
        rc = hs_read(c);
        if (rc < 0) {
            conn_fail(c);
            return;
        }
        if (rc == 0)
            return;
        switch (c->phase) {
        case PH_WAIT_MAGIC:
            if (memcmp(c->hs, AAMM__PSK_MAGIC, 8) != 0) {
                AAMM_DEBUG("consensus: dropped a stranger (no handshake magic)");
                conn_fail(c);
                return;
            }
            c->phase = PH_WAIT_HELLO;
            c->hs_need = AAMM__PSK_HELLO_FIXED; /* keep the 8 bytes read */
            break;
        case PH_WAIT_HELLO: {
            size_t alen = (size_t)c->hs[60] | ((size_t)c->hs[61] << 8);
            if (memcmp(c->hs, AAMM__PSK_MAGIC, 8) != 0 ||
                (c->hs[8] != AAMM__CS_ROLE_RAFT && c->hs[8] != AAMM__CS_ROLE_FWD) ||
                c->hs[9] != 0 || c->hs[10] != 0 || c->hs[11] != 0 ||
                get_le64(c->hs + 20) != p->id || get_le64(c->hs + 12) == 0 ||
                get_le64(c->hs + 12) == p->id || alen > AAMM_CONSENSUS_NAME_MAX) {
                AAMM_DEBUG("consensus: refused a malformed or misaddressed hello");
                conn_fail(c);
                return;
            }
            memcpy(c->hello, c->hs, AAMM__PSK_HELLO_FIXED);
            c->hello_len = AAMM__PSK_HELLO_FIXED;
            c->role = c->hs[8];
            c->peer_id = get_le64(c->hs + 12);
            hs_expect(c, PH_WAIT_HELLO_ADDR, alen);
            break;
        }
        case PH_WAIT_HELLO_ADDR: {
            uint8_t msg[AAMM__PSK_CHALLENGE];
            memcpy(c->hello + c->hello_len, c->hs, c->hs_need);
            c->hello_len += c->hs_need;
            memcpy(c->peer_addr, c->hs, c->hs_need);
            c->peer_addr[c->hs_need] = 0;
            if (RAND_bytes(c->nonce_mine, AAMM__PSK_NONCE) != 1) {
                conn_fail(c);
                return;
            }
            memcpy(msg, AAMM__PSK_MAGIC, 8);
            memcpy(msg + 8, c->nonce_mine, AAMM__PSK_NONCE);
            aamm__psk_mac(p->key, 'A', c->hello, c->hello_len, c->nonce_mine, msg + 40);
            if (!hs_send(c, msg, sizeof(msg))) {
                conn_fail(c);
                return;
            }
            hs_expect(c, PH_WAIT_PROOF, AAMM__PSK_MAC);
            break;
        }
        case PH_WAIT_CHALLENGE:
            aamm__psk_mac(p->key, 'A', c->hello, c->hello_len, c->hs + 8, mac);
            if (memcmp(c->hs, AAMM__PSK_MAGIC, 8) != 0 ||
                CRYPTO_memcmp(mac, c->hs + 40, AAMM__PSK_MAC) != 0) {
                AAMM_WARN("consensus: node %llu failed authentication (wrong secret or "
                          "cluster?)",
                          (unsigned long long)c->peer_id);
                conn_fail(c);
                return;
            }
            aamm__psk_mac(p->key, 'C', c->hello, c->hello_len, c->hs + 8, mac);
            if (!hs_send(c, mac, sizeof(mac))) {
                conn_fail(c);
                return;
            }
            conn_keys(c, c->hs + 8);
            conn_established(c);
            return;
        case PH_WAIT_PROOF:
            aamm__psk_mac(p->key, 'C', c->hello, c->hello_len, c->nonce_mine, mac);
            if (CRYPTO_memcmp(mac, c->hs, AAMM__PSK_MAC) != 0) {
                AAMM_WARN("consensus: a peer claiming node %llu failed authentication",
                          (unsigned long long)c->peer_id);
                conn_fail(c);
                return;
            }
            conn_keys(c, c->nonce_mine);
            conn_established(c);
            return;
        default:
            return;
        }
    }
}

/* ---- the record layer: forwarding frames and raft's relay ------------------------------- */

/* Room for @extra more bytes at the end of c->out (sent bytes are dropped first). */
static bool out_reserve(struct aamm__cs_conn *c, size_t extra)
{
    uint8_t *b;
    size_t cap;
    if (c->out_off > 0) {
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off;
        c->out_off = 0;
    }
    if (c->out_cap - c->out_len >= extra)
        return true;
    cap = c->out_cap ? c->out_cap : 8192;
    while (cap - c->out_len < extra)
        cap *= 2;
    b = aamm__realloc(c->out, cap);
    if (b == NULL)
        return false;
    c->out = b;
    c->out_cap = cap;
    return true;
}

/* Seal the @len payload bytes already at c->out + c->out_len + 4 into a record. */
static bool seal_in_place(struct aamm__cs_conn *c, size_t len)
{
    uint8_t *rec = c->out + c->out_len;
    rec[0] = (uint8_t)len;
    rec[1] = (uint8_t)(len >> 8);
    rec[2] = (uint8_t)(len >> 16);
    rec[3] = (uint8_t)(len >> 24);
    if (record_mac(c->p->mac_ctx, c->key_tx, c->seq_tx, rec, len, rec + 4 + len) != 0)
        return false;
    c->seq_tx++;
    c->out_len += 4 + len + AAMM__PSK_MAC;
    return true;
}

static void net_flush(struct aamm__cs_conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n =
            send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            c->out_off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            conn_fail(c);
            return;
        }
    }
    if (c->out_off == c->out_len)
        c->out_off = c->out_len = 0;
    conn_interest(c);
}

/* Write verified payloads into raft's end of the pair. */
static void relay_flush(struct aamm__cs_conn *c)
{
    while (c->lout_off < c->lout_len) {
        ssize_t n = send(c->lfd, c->lout + c->lout_off, c->lout_len - c->lout_off,
                         MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            c->lout_off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
        } else {
            conn_fail(c); /* raft closed its end */
            return;
        }
    }
    if (c->lout_off == c->lout_len)
        c->lout_off = c->lout_len = 0;
    conn_interest(c);
}

static bool relay_queue(struct aamm__cs_conn *c, const uint8_t *data, size_t len)
{
    if (c->lout_off > 0) {
        memmove(c->lout, c->lout + c->lout_off, c->lout_len - c->lout_off);
        c->lout_len -= c->lout_off;
        c->lout_off = 0;
    }
    if (c->lout_cap - c->lout_len < len) {
        size_t cap = c->lout_cap ? c->lout_cap : 8192;
        uint8_t *b;
        while (cap - c->lout_len < len)
            cap *= 2;
        b = aamm__realloc(c->lout, cap);
        if (b == NULL)
            return false;
        c->lout = b;
        c->lout_cap = cap;
    }
    memcpy(c->lout + c->lout_len, data, len);
    c->lout_len += len;
    return true;
}

/* Verify and deliver every whole record in c->in. Any record that fails its MAC (tampered,
 * or not the next one in sequence: dropped, replayed, reordered) closes the connection. */
static void net_records(struct aamm__cs_conn *c)
{
    size_t off = 0;
    uint8_t want[AAMM__PSK_MAC];
    while (c->phase == PH_UP && c->in_len - off >= 4) {
        const uint8_t *h = c->in + off;
        size_t len =
            (size_t)h[0] | ((size_t)h[1] << 8) | ((size_t)h[2] << 16) | ((size_t)h[3] << 24);
        if (len > FRAME_MAX) {
            AAMM_ERROR("consensus: record %llu from node %llu is too long (%zu bytes): "
                       "connection closed",
                       (unsigned long long)c->seq_rx, (unsigned long long)c->peer_id, len);
            conn_fail(c);
            return;
        }
        if (c->in_len - off < 4 + len + AAMM__PSK_MAC)
            break;
        if (record_mac(c->p->mac_ctx, c->key_rx, c->seq_rx, h, len, want) != 0 ||
            CRYPTO_memcmp(want, h + 4 + len, AAMM__PSK_MAC) != 0) {
            AAMM_ERROR("consensus: record %llu from node %llu failed its MAC (altered, dropped, "
                       "replayed or reordered): connection closed",
                       (unsigned long long)c->seq_rx, (unsigned long long)c->peer_id);
            if (c->lfd >= 0 && c->lout_len > c->lout_off) /* what was verified before it */
                (void)!send(c->lfd, c->lout + c->lout_off, c->lout_len - c->lout_off,
                            MSG_NOSIGNAL | MSG_DONTWAIT);
            conn_fail(c);
            return;
        }
        c->seq_rx++;
        off += 4 + len + AAMM__PSK_MAC;
        if (c->lfd >= 0) {
            if (!relay_queue(c, h + 4, len)) {
                conn_fail(c);
                return;
            }
        } else if (c->frame_fn != NULL) {
            c->frame_fn(c, h + 4, len, c->arg); /* may close this connection */
        }
    }
    if (c->phase != PH_UP)
        return;
    memmove(c->in, c->in + off, c->in_len - off);
    c->in_len -= off;
    if (c->lfd >= 0 && c->lout_len > c->lout_off)
        relay_flush(c);
}

static void net_read(struct aamm__cs_conn *c)
{
    while (c->phase == PH_UP) {
        ssize_t n;
        if (c->lfd >= 0 && c->lout_len - c->lout_off >= RELAY_HIGH)
            break; /* raft is behind: leave the rest in the kernel (conn_interest pauses) */
        if (c->in_cap - c->in_len < 4096) {
            size_t cap = c->in_cap ? c->in_cap * 2 : 8192;
            uint8_t *b;
            if (cap > FRAME_MAX * 2 + 8192) {
                conn_fail(c);
                return;
            }
            b = aamm__realloc(c->in, cap);
            if (b == NULL) {
                conn_fail(c);
                return;
            }
            c->in = b;
            c->in_cap = cap;
        }
        n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
        if (n > 0) {
            c->in_len += (size_t)n;
            net_records(c);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        conn_fail(c); /* EOF or error */
        return;
    }
    conn_interest(c);
}

/* Raft wrote: seal what it wrote into records for the network. */
static void relay_read(struct aamm__cs_conn *c)
{
    while (c->phase == PH_UP && c->out_len - c->out_off < RELAY_HIGH) {
        ssize_t n;
        if (!out_reserve(c, 4 + RELAY_CHUNK + AAMM__PSK_MAC)) {
            conn_fail(c);
            return;
        }
        n = recv(c->lfd, c->out + c->out_len + 4, RELAY_CHUNK, 0);
        if (n > 0) {
            if (!seal_in_place(c, (size_t)n)) {
                conn_fail(c);
                return;
            }
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        conn_fail(c); /* raft closed its end */
        return;
    }
    net_flush(c);
}

static void relay_poll_cb(uv_poll_t *h, int status, int events)
{
    struct aamm__cs_conn *c = h->data;
    if (c->phase != PH_UP)
        return;
    if (status < 0) {
        conn_fail(c);
        return;
    }
    if (events & UV_WRITABLE)
        relay_flush(c);
    if (c->phase == PH_UP && (events & (UV_READABLE | UV_DISCONNECT)))
        relay_read(c);
}

int aamm__cs_conn_send(struct aamm__cs_conn *c, const void *data, size_t len)
{
    if (c == NULL || c->phase != PH_UP)
        return AAMM_ECLOSED;
    if (len > FRAME_MAX)
        return AAMM_ETOOBIG;
    if (!out_reserve(c, 4 + len + AAMM__PSK_MAC))
        return AAMM_ENOMEM;
    memcpy(c->out + c->out_len + 4, data, len);
    if (!seal_in_place(c, len))
        return AAMM_EINTERNAL;
    net_flush(c);
    return 0;
}

static void conn_poll_cb(uv_poll_t *h, int status, int events)
{
    struct aamm__cs_conn *c = h->data;
    if (c->phase == PH_CLOSING)
        return;
    if (status < 0 && c->phase != PH_CONNECTING) {
        conn_fail(c);
        return;
    }
    if (c->phase == PH_CONNECTING) {
        int err = 0;
        socklen_t elen = sizeof(err);
        if (status < 0 || getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &elen) != 0 || err != 0) {
            conn_fail(c);
            return;
        }
        send_hello(c);
        return;
    }
    if (c->phase == PH_UP) {
        if (events & UV_WRITABLE)
            net_flush(c);
        if (c->phase == PH_UP && (events & (UV_READABLE | UV_DISCONNECT)))
            net_read(c);
        return;
    }
    hs_progress(c);
}

void aamm__cs_conn_set_cbs(struct aamm__cs_conn *c, aamm__cs_conn_frame_fn frame,
                           aamm__cs_conn_state_fn state, void *arg)
{
    c->frame_fn = frame;
    c->state_fn = state;
    c->arg = arg;
}

void aamm__cs_conn_close(struct aamm__cs_conn *c)
{
    if (c != NULL)
        conn_shutdown(c);
}

uint64_t aamm__cs_conn_peer(const struct aamm__cs_conn *c)
{
    return c->peer_id;
}

uint64_t aamm__cs_conn_serial(const struct aamm__cs_conn *c)
{
    return c->serial;
}

bool aamm__cs_conn_up(const struct aamm__cs_conn *c)
{
    return c != NULL && c->phase == PH_UP;
}

/* Start an outgoing connection; failures surface later through the close path. */
static struct aamm__cs_conn *conn_connect(struct aamm__psk *p, uint8_t role, uint64_t id,
                                          const char *address)
{
    struct sockaddr_in sa;
    struct aamm__cs_conn *c;
    int fd, rc, one = 1;
    fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return NULL;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    c = conn_new(p, fd, true);
    if (c == NULL) {
        close(fd);
        return NULL;
    }
    c->role = role;
    c->peer_id = id;
    c->phase = PH_CONNECTING;
    if (p->partitioned || aamm__cs_parse_addr(address, &sa) != 0) {
        conn_fail(c);
        return c;
    }
    do
        rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
    while (rc < 0 && errno == EINTR);
    if (rc < 0 && errno != EINPROGRESS) {
        conn_fail(c);
        return c;
    }
    conn_want(c, UV_WRITABLE);
    return c;
}

struct aamm__cs_conn *aamm__psk_connect_fwd(struct raft_uv_transport *t, uint64_t id,
                                            const char *address)
{
    struct aamm__psk *p = t->impl;
    if (p->closing)
        return NULL;
    return conn_connect(p, AAMM__CS_ROLE_FWD, id, address);
}

/* ---- raft_uv_transport methods ------------------------------------------------------------ */

static int t_init(struct raft_uv_transport *t, raft_id id, const char *address)
{
    struct aamm__psk *p = t->impl;
    if (strlen(address) >= sizeof(p->address))
        return RAFT_NAMETOOLONG;
    p->id = id;
    strcpy(p->address, address);
    return 0;
}

static bool is_pending(const struct aamm__cs_conn *c)
{
    return !c->outgoing && c->phase != PH_UP && c->phase != PH_CLOSING;
}

/*
 * Make room for a connection from @src before it is accepted into a pre-authentication slot.
 * A source holding MAX_PENDING_PER_SOURCE slots loses its oldest one; when all
 * MAX_PENDING_HANDSHAKES slots are taken, the source holding the most loses its oldest.
 * Why evict rather than refuse: a member finishes its handshake within one round trip of
 * being accepted (its HELLO is usually already in the socket, see listen_cb), while a stranger
 * without the key never finishes. Refusing newcomers once the slots are full lets a stranger
 * that just holds its connections open lock the members out (that stretched fail-overs from
 * about 2 s to 5-9 s). With eviction, pushing a member's handshake out needs a whole source's
 * share of new connections (16, or 64 from many sources) inside that one round trip, again
 * and again; and a stranger on another address cannot touch a member's slots at all while
 * it holds more than the member does. The handshake deadline still closes what stalls.
 */
static void admit(struct aamm__psk *p, const struct sockaddr_in *src)
{
    struct aamm__cs_conn *c, *oldest_same = NULL, *victim = NULL;
    size_t total = 0, same = 0, best = 0;
    for (c = p->conns; c != NULL; c = c->next) { /* newest first: the last seen is oldest */
        if (!is_pending(c))
            continue;
        total++;
        if (c->src.sin_addr.s_addr == src->sin_addr.s_addr) {
            same++;
            oldest_same = c;
        }
    }
    if (same >= MAX_PENDING_PER_SOURCE) {
        victim = oldest_same;
    } else if (total >= MAX_PENDING_HANDSHAKES) {
        /* the busiest source's oldest connection (at most 64 x 64 comparisons) */
        for (c = p->conns; c != NULL; c = c->next) {
            struct aamm__cs_conn *d;
            size_t n = 0;
            if (!is_pending(c))
                continue;
            for (d = p->conns; d != NULL; d = d->next)
                if (is_pending(d) && d->src.sin_addr.s_addr == c->src.sin_addr.s_addr)
                    n++;
            if (n >= best) { /* ">=": a later (older) connection of an equal source wins */
                best = n;
                victim = c;
            }
        }
        if (victim != NULL)
            for (c = victim->next; c != NULL; c = c->next)
                if (is_pending(c) && c->src.sin_addr.s_addr == victim->src.sin_addr.s_addr)
                    victim = c;
    }
    if (victim != NULL) {
        p->evicted++;
        AAMM_DEBUG("consensus: closed an unauthenticated connection to make room (%zu pending)",
                   total);
        conn_fail(victim);
    }
}

static void listen_cb(uv_poll_t *h, int status, int events)
{
    struct aamm__psk *p = h->data;
    AAMM__UNUSED(events);
    if (status < 0 || p->closing)
        return;
    for (;;) {
        struct aamm__cs_conn *c;
        struct sockaddr_in src;
        socklen_t slen = sizeof(src);
        int fd, one = 1;
        memset(&src, 0, sizeof(src));
        fd = accept4(p->lfd, (struct sockaddr *)&src, &slen, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return; /* EAGAIN, or out of fds: try again on the next event */
        }
        if (p->partitioned) {
            close(fd);
            continue;
        }
        admit(p, &src);
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        c = conn_new(p, fd, false);
        if (c == NULL) {
            close(fd);
            continue;
        }
        c->src = src;
        hs_expect(c, PH_WAIT_MAGIC, 8);
        conn_want(c, UV_READABLE);
        /* A member sends its HELLO right after connecting: answer it now, before accepting
         * more, so a burst of strangers queued behind it cannot push it out first. */
        hs_progress(c);
    }
}

static int t_listen(struct raft_uv_transport *t, raft_uv_accept_cb cb)
{
    struct aamm__psk *p = t->impl;
    struct sockaddr_in sa;
    int one = 1;
    const char *addr = p->bind[0] ? p->bind : p->address;
    if (aamm__cs_parse_addr(addr, &sa) != 0) {
        snprintf(t->errmsg, sizeof(t->errmsg), "invalid bind address \"%s\"", addr);
        return RAFT_NOCONNECTION;
    }
    p->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (p->lfd < 0)
        return RAFT_NOCONNECTION;
    setsockopt(p->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(p->lfd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(p->lfd, SOMAXCONN) != 0) {
        snprintf(t->errmsg, sizeof(t->errmsg), "listen on %s: %s", addr, strerror(errno));
        close(p->lfd);
        p->lfd = -1;
        return RAFT_NOCONNECTION;
    }
    if (uv_poll_init_socket(p->loop, &p->lpoll, p->lfd) != 0) {
        close(p->lfd);
        p->lfd = -1;
        return RAFT_NOCONNECTION;
    }
    p->lpoll.data = p;
    p->lpoll_open = true;
    p->open_handles++;
    p->accept_cb = cb;
    uv_poll_start(&p->lpoll, UV_READABLE, listen_cb);
    return 0;
}

static int t_connect(struct raft_uv_transport *t, struct raft_uv_connect *req, raft_id id,
                     const char *address, raft_uv_connect_cb cb)
{
    struct aamm__psk *p = t->impl;
    struct aamm__cs_conn *c;
    if (p->closing)
        return RAFT_CANCELED;
    c = conn_connect(p, AAMM__CS_ROLE_RAFT, id, address);
    if (c == NULL)
        return RAFT_NOMEM;
    c->req = req;
    c->connect_cb = cb;
    return 0;
}

static void close_done(struct aamm__psk *p)
{
    if (p->conns != NULL || p->lpoll_open || p->defer_open)
        return;
    if (p->close_cb != NULL) {
        raft_uv_transport_close_cb cb = p->close_cb;
        p->close_cb = NULL;
        cb(p->t);
    }
}

static void lpoll_closed(uv_handle_t *h)
{
    struct aamm__psk *p = h->data;
    p->open_handles--;
    p->lpoll_open = false;
    close(p->lfd);
    p->lfd = -1;
    close_done(p);
}

static void defer_closed(uv_handle_t *h)
{
    struct aamm__psk *p = h->data;
    p->open_handles--;
    p->defer_open = false;
    close_done(p);
}

static void t_close(struct raft_uv_transport *t, raft_uv_transport_close_cb cb)
{
    struct aamm__psk *p = t->impl;
    struct aamm__cs_conn *c, *next;
    p->closing = true;
    p->close_cb = cb;
    if (p->lpoll_open) {
        uv_poll_stop(&p->lpoll);
        uv_close((uv_handle_t *)&p->lpoll, lpoll_closed);
    }
    for (c = p->conns; c != NULL; c = next) {
        next = c->next;
        conn_shutdown(c);
    }
    if (p->defer_open) /* always there: makes the callback asynchronous */
        uv_close((uv_handle_t *)&p->defer, defer_closed);
}

/* ---- construction --------------------------------------------------------------------------- */

int aamm__psk_new(struct raft_uv_transport *t, uv_loop_t *loop, const char *cluster,
                  const void *secret, size_t secret_len, const char *bind_address,
                  unsigned handshake_timeout_ms)
{
    struct aamm__psk *p = aamm__calloc(1, sizeof(*p));
    if (p == NULL)
        return AAMM_ENOMEM;
    memset(t, 0, sizeof(*t));
    p->t = t;
    p->loop = loop;
    p->lfd = -1;
    p->hs_timeout_ms = handshake_timeout_ms;
    p->mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    p->mac_ctx = p->mac != NULL ? EVP_MAC_CTX_new(p->mac) : NULL;
    if (p->mac_ctx == NULL) {
        EVP_MAC_free(p->mac);
        aamm__free(p);
        ERR_clear_error();
        return AAMM_ENOMEM;
    }
    aamm__psk_derive_key(cluster, secret, secret_len, p->key);
    if (bind_address != NULL)
        snprintf(p->bind, sizeof(p->bind), "%s", bind_address);
    uv_timer_init(loop, &p->defer);
    p->defer.data = p;
    p->defer_open = true;
    p->open_handles = 1;
    t->impl = p;
    t->init = t_init;
    t->listen = t_listen;
    t->connect = t_connect;
    t->close = t_close;
    return 0;
}

void aamm__psk_on_fwd(struct raft_uv_transport *t, void (*fn)(struct aamm__cs_conn *c, void *arg),
                      void *arg)
{
    struct aamm__psk *p = t->impl;
    p->on_fwd = fn;
    p->on_fwd_arg = arg;
}

void aamm__psk_free(struct raft_uv_transport *t)
{
    struct aamm__psk *p = t->impl;
    if (p == NULL)
        return;
    if (p->open_handles > 0 || p->conns != NULL) {
        /* raft never closed us (it failed before start): close and drain our handles. */
        if (!p->closing)
            t_close(t, NULL);
        while (p->open_handles > 0 || p->conns != NULL)
            if (uv_run(p->loop, UV_RUN_ONCE) == 0 && (p->open_handles > 0 || p->conns))
                break;
    }
    OPENSSL_cleanse(p->key, sizeof(p->key));
    EVP_MAC_CTX_free(p->mac_ctx);
    EVP_MAC_free(p->mac);
    aamm__free(p);
    t->impl = NULL;
}

/* Test hook: simulate a network partition of this node. While on, every connection in or
 * out is refused, and turning it on cuts every open one (raft's streams all run through our
 * relays, so they are cut too). */
void aamm__psk_partition(struct raft_uv_transport *t, bool on)
{
    struct aamm__psk *p = t->impl;
    struct aamm__cs_conn *c, *next;
    if (p == NULL)
        return;
    p->partitioned = on;
    if (!on)
        return;
    for (c = p->conns; c != NULL; c = next) {
        next = c->next;
        conn_shutdown(c);
    }
}

uint64_t aamm__psk_evicted(struct raft_uv_transport *t)
{
    struct aamm__psk *p = t->impl;
    return p != NULL ? p->evicted : 0;
}
