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
 * sent after its last handshake message (raft's first message, possibly in the same TCP
 * segment) stays in the socket and is read by raft from its own uv_tcp_t stream.
 *
 * Our sockets are raw non-blocking fds driven by uv_poll_t and written with
 * send(MSG_NOSIGNAL). An authenticated raft stream becomes a uv_tcp_t (uv_tcp_open) owned
 * by raft from then on (raft uv_close()s it and raft_free()s its memory).
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
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "consensus_int.h"

#define FRAME_MAX (1u << 20)

enum {
    PH_CONNECTING = 1,
    PH_WAIT_MAGIC,      /* A: the first 8 bytes (strangers are dropped at once) */
    PH_WAIT_HELLO,      /* A: fixed part of HELLO */
    PH_WAIT_HELLO_ADDR, /* A: address part */
    PH_WAIT_CHALLENGE,  /* C */
    PH_WAIT_PROOF,      /* A */
    PH_UP,              /* FWD channel ready */
    PH_CLOSING,
};

struct aamm__psk {
    struct raft_uv_transport *t;
    uv_loop_t *loop;
    uint8_t key[32];
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
    struct handed {
        int fd;
        struct sockaddr_in local, peer;
    } * handed;
    size_t n_handed;
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
    bool handed; /* fd now belongs to a raft uv_tcp_t */
    uint8_t role;
    int phase;
    uint64_t peer_id;
    char peer_addr[AAMM_CONSENSUS_NAME_MAX + 1];
    uint8_t nonce_mine[AAMM__PSK_NONCE];
    uint8_t hello[AAMM__PSK_HELLO_FIXED + AAMM_CONSENSUS_NAME_MAX];
    size_t hello_len;
    uint8_t hs[AAMM__PSK_CHALLENGE];
    size_t hs_have, hs_need;
    uint8_t *in;
    size_t in_len, in_cap;
    uint8_t *out;
    size_t out_len, out_off;
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
static void conn_fail(struct aamm__cs_conn *c);
static void close_done(struct aamm__psk *p);

static void free_tcp(uv_handle_t *h)
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
    aamm__free(c->in);
    aamm__free(c->out);
    aamm__free(c);
    if (p->closing)
        close_done(p);
}

/* Stop our handles; the fd is closed unless raft owns it now. */
static void conn_shutdown(struct aamm__cs_conn *c)
{
    if (c->phase == PH_CLOSING)
        return;
    c->phase = PH_CLOSING;
    uv_poll_stop(&c->poll);
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->poll, conn_handle_closed);
    uv_close((uv_handle_t *)&c->timer, conn_handle_closed);
    if (!c->handed && c->fd >= 0)
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
    uv_poll_start(&c->poll, events, conn_poll_cb);
}

static struct aamm__cs_conn *conn_new(struct aamm__psk *p, int fd, bool outgoing)
{
    struct aamm__cs_conn *c = aamm__calloc(1, sizeof(*c));
    if (c == NULL)
        return NULL;
    c->p = p;
    c->fd = fd;
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

/* Remember which sockets raft owns, so the partition test hook can cut them. */
static void remember_handed(struct aamm__psk *p, int fd)
{
    struct handed h, *v;
    socklen_t len = sizeof(h.local);
    size_t i;
    h.fd = fd;
    if (getsockname(fd, (struct sockaddr *)&h.local, &len) != 0)
        return;
    len = sizeof(h.peer);
    if (getpeername(fd, (struct sockaddr *)&h.peer, &len) != 0)
        return;
    for (i = 0; i < p->n_handed; i++)
        if (p->handed[i].fd == fd) {
            p->handed[i] = h;
            return;
        }
    v = aamm__realloc(p->handed, (p->n_handed + 1) * sizeof(*v));
    if (v == NULL)
        return;
    p->handed = v;
    p->handed[p->n_handed++] = h;
}

/* Authenticated: give the socket to raft or open the forwarding channel. */
static void conn_established(struct aamm__cs_conn *c)
{
    struct aamm__psk *p = c->p;
    uv_timer_stop(&c->timer);
    if (c->role == AAMM__CS_ROLE_RAFT) {
        uv_tcp_t *tcp = raft_malloc(sizeof(*tcp));
        int fd = c->fd;
        raft_uv_connect_cb cb = c->connect_cb;
        struct raft_uv_connect *req = c->req;
        c->connect_cb = NULL;
        c->handed = true;
        conn_shutdown(c); /* closes the poll handle (epoll forgets the fd), keeps the fd */
        if (tcp == NULL || uv_tcp_init(p->loop, tcp) != 0) {
            raft_free(tcp);
            close(fd);
            if (cb != NULL)
                cb(req, NULL, RAFT_NOCONNECTION);
            return;
        }
        if (uv_tcp_open(tcp, fd) != 0) {
            close(fd);
            tcp->data = NULL;
            uv_close((uv_handle_t *)tcp, free_tcp);
            if (cb != NULL)
                cb(req, NULL, RAFT_NOCONNECTION);
            return;
        }
        uv_tcp_nodelay(tcp, 1);
        remember_handed(p, fd);
        if (c->outgoing)
            cb(req, (uv_stream_t *)tcp, 0);
        else
            p->accept_cb(p->t, c->peer_id, c->peer_addr, (uv_stream_t *)tcp);
        return;
    }
    c->phase = PH_UP;
    conn_want(c, UV_READABLE);
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
            conn_established(c);
            return;
        default:
            return;
        }
    }
}

/* ---- the forwarding channel (framed) ----------------------------------------------------- */

static void fwd_flush(struct aamm__cs_conn *c)
{
    while (c->out_off < c->out_len) {
        ssize_t n =
            send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            c->out_off += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            conn_want(c, UV_READABLE | UV_WRITABLE);
            return;
        } else {
            conn_fail(c);
            return;
        }
    }
    c->out_off = c->out_len = 0;
    conn_want(c, UV_READABLE);
}

static void fwd_read(struct aamm__cs_conn *c)
{
    size_t off = 0;
    uint64_t serial = c->serial;
    for (;;) {
        ssize_t n;
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
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        conn_fail(c); /* EOF or error */
        return;
    }
    /* Deliver whole frames; the callback may close this connection. */
    while (c->phase == PH_UP && c->in_len - off >= 4) {
        const uint8_t *h = c->in + off;
        size_t len =
            (size_t)h[0] | ((size_t)h[1] << 8) | ((size_t)h[2] << 16) | ((size_t)h[3] << 24);
        if (len > FRAME_MAX) {
            conn_fail(c);
            return;
        }
        if (c->in_len - off - 4 < len)
            break;
        off += 4 + len;
        if (c->frame_fn != NULL)
            c->frame_fn(c, h + 4, len, c->arg);
        if (c->serial != serial)
            return;
    }
    if (c->phase != PH_UP)
        return;
    memmove(c->in, c->in + off, c->in_len - off);
    c->in_len -= off;
}

int aamm__cs_conn_send(struct aamm__cs_conn *c, const void *data, size_t len)
{
    size_t need;
    if (c == NULL || c->phase != PH_UP)
        return AAMM_ECLOSED;
    if (len > FRAME_MAX)
        return AAMM_ETOOBIG;
    need = c->out_len + 4 + len;
    {
        uint8_t *b = aamm__realloc(c->out, need);
        if (b == NULL)
            return AAMM_ENOMEM;
        c->out = b;
    }
    c->out[c->out_len] = (uint8_t)len;
    c->out[c->out_len + 1] = (uint8_t)(len >> 8);
    c->out[c->out_len + 2] = (uint8_t)(len >> 16);
    c->out[c->out_len + 3] = (uint8_t)(len >> 24);
    memcpy(c->out + c->out_len + 4, data, len);
    c->out_len = need;
    fwd_flush(c);
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
            fwd_flush(c);
        if (c->phase == PH_UP && (events & (UV_READABLE | UV_DISCONNECT)))
            fwd_read(c);
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

#define MAX_PENDING_HANDSHAKES 64

static size_t pending_incoming(const struct aamm__psk *p)
{
    const struct aamm__cs_conn *c;
    size_t n = 0;
    for (c = p->conns; c != NULL; c = c->next)
        if (!c->outgoing && c->phase != PH_UP && c->phase != PH_CLOSING)
            n++;
    return n;
}

static void listen_cb(uv_poll_t *h, int status, int events)
{
    struct aamm__psk *p = h->data;
    AAMM__UNUSED(events);
    if (status < 0 || p->closing)
        return;
    for (;;) {
        struct aamm__cs_conn *c;
        int fd = accept4(p->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        int one = 1;
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return; /* EAGAIN, or out of fds: try again on the next event */
        }
        if (p->partitioned || pending_incoming(p) >= MAX_PENDING_HANDSHAKES) {
            close(fd); /* strangers cannot pile up half-open handshakes */
            continue;
        }
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        c = conn_new(p, fd, false);
        if (c == NULL) {
            close(fd);
            continue;
        }
        hs_expect(c, PH_WAIT_MAGIC, 8);
        conn_want(c, UV_READABLE);
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
    if (bind(p->lfd, (struct sockaddr *)&sa, sizeof(sa)) != 0 || listen(p->lfd, 64) != 0) {
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
    aamm__free(p->handed);
    aamm__free(p);
    t->impl = NULL;
}

/* Test hook: simulate a network partition of this node. While on, every connection in or
 * out is refused, and turning it on cuts every open one: ours, and raft's streams (only
 * sockets still connected between the same two addresses we handed over are shut down). */
void aamm__psk_partition(struct raft_uv_transport *t, bool on)
{
    struct aamm__psk *p = t->impl;
    struct aamm__cs_conn *c, *next;
    size_t i;
    if (p == NULL)
        return;
    p->partitioned = on;
    if (!on)
        return;
    for (c = p->conns; c != NULL; c = next) {
        next = c->next;
        conn_shutdown(c);
    }
    for (i = 0; i < p->n_handed; i++) {
        struct sockaddr_in l, r;
        socklen_t ll = sizeof(l), rl = sizeof(r);
        struct handed *h = &p->handed[i];
        if (getsockname(h->fd, (struct sockaddr *)&l, &ll) == 0 &&
            getpeername(h->fd, (struct sockaddr *)&r, &rl) == 0 &&
            l.sin_port == h->local.sin_port && l.sin_addr.s_addr == h->local.sin_addr.s_addr &&
            r.sin_port == h->peer.sin_port && r.sin_addr.s_addr == h->peer.sin_addr.s_addr)
            shutdown(h->fd, SHUT_RDWR);
    }
    p->n_handed = 0;
}
