/*
 * test_consensus_psk.c: our authenticated raft transport on its own (one libuv loop,
 * loopback sockets, no raft): the handshake, what raft receives after it, and refusals.
 */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "consensus_int.h"
#include "testutil.h"

#define SECRET "0123456789abcdef-secret"


/* What a transport handed to "raft". */
struct sink {
    uv_stream_t *stream;
    uint64_t id;
    char addr[64];
    int accepted, connected, failed;
    char data[256];
    size_t len;
};

static struct sink g_a, g_b;

static void accept_cb(struct raft_uv_transport *t, raft_id id, const char *address,
                      struct uv_stream_s *stream)
{
    struct sink *s = t->data;
    s->accepted++;
    s->id = id;
    snprintf(s->addr, sizeof(s->addr), "%s", address);
    s->stream = stream;
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct sink *s = h->data;
    (void)suggested;
    buf->base = s->data + s->len;
    buf->len = sizeof(s->data) - s->len;
}

static void read_cb(uv_stream_t *st, ssize_t n, const uv_buf_t *buf)
{
    struct sink *s = st->data;
    (void)buf;
    if (n > 0)
        s->len += (size_t)n;
    else if (n < 0)
        s->failed++; /* EOF: the transport cut raft's stream */
}

/* Errors the library logged (the record layer logs every refused record). */
static int g_mac_errors;

static void log_cb(int level, const char *file, int line, const char *msg, void *arg)
{
    (void)file;
    (void)line;
    (void)arg;
    if (level == AAMM_LOG_ERROR && strstr(msg, "record") != NULL)
        g_mac_errors++;
}

static void free_handle(uv_handle_t *h)
{
    raft_free(h);
}

static void closed_cb(struct raft_uv_transport *t)
{
    *(int *)t->data = 1;
}

struct node {
    uv_loop_t *loop;
    struct raft_uv_transport t;
    char addr[64];
};

static void node_open(struct node *n, uv_loop_t *loop, uint64_t id, const char *secret,
                      struct sink *sink)
{
    n->loop = loop;
    snprintf(n->addr, sizeof(n->addr), "127.0.0.1:%d", aamm_test_free_port());
    ck_assert_int_eq(aamm__psk_new(&n->t, loop, "c", secret, strlen(secret), NULL, 2000), 0);
    n->t.data = sink;
    ck_assert_int_eq(n->t.init(&n->t, id, n->addr), 0);
    ck_assert_int_eq(n->t.listen(&n->t, accept_cb), 0);
}

static void node_close(struct node *n)
{
    int done = 0;
    n->t.data = &done;
    n->t.close(&n->t, closed_cb);
    while (!done)
        uv_run(n->loop, UV_RUN_ONCE);
    aamm__psk_free(&n->t);
}

static void spin(uv_loop_t *loop, int ms, bool (*stop)(void), int *unused)
{
    int64_t end = aamm_test_now_ms() + ms;
    (void)unused;
    while (aamm_test_now_ms() < end && !(stop && stop()))
        uv_run(loop, UV_RUN_NOWAIT);
}

static bool a_accepted(void)
{
    return g_a.accepted > 0;
}

static int dial(const char *addr)
{
    struct sockaddr_in sa;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    ck_assert_int_eq(aamm__cs_parse_addr(addr, &sa), 0);
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    fcntl(fd, F_SETFL, O_NONBLOCK);
    return fd;
}

static size_t make_hello(uint8_t *h, uint64_t from, uint64_t to, const char *addr)
{
    size_t alen = strlen(addr);
    int i;
    memcpy(h, AAMM__PSK_MAGIC, 8);
    h[8] = AAMM__CS_ROLE_RAFT;
    h[9] = h[10] = h[11] = 0;
    for (i = 0; i < 8; i++) {
        h[12 + i] = (uint8_t)(from >> (8 * i));
        h[20 + i] = (uint8_t)(to >> (8 * i));
    }
    for (i = 0; i < 32; i++)
        h[28 + i] = (uint8_t)(i * 7 + 1);
    h[60] = (uint8_t)alen;
    h[61] = 0;
    memcpy(h + 62, addr, alen);
    return AAMM__PSK_HELLO_FIXED + alen;
}

static bool recv_exact(uv_loop_t *loop, int fd, uint8_t *buf, size_t n)
{
    size_t have = 0;
    int64_t end = aamm_test_now_ms() + 3000;
    while (have < n && aamm_test_now_ms() < end) {
        ssize_t r = recv(fd, buf + have, n - have, 0);
        if (r > 0)
            have += (size_t)r;
        else if (r == 0)
            return false;
        uv_run(loop, UV_RUN_NOWAIT);
    }
    return have == n;
}

/* The connector's PROOF and its first record arrive in ONE write: the transport hands raft
 * the stream and the record's payload reaches it, none eaten; the id and address raft
 * learns are the authenticated ones. */
START_TEST(handshake_then_data_in_one_write)
{
    uv_loop_t loop;
    struct node a;
    uint8_t key[32], hello[128], ch[AAMM__PSK_CHALLENGE], mac[32], msg[256];
    static const char payload[] = "raft-message-right-after-the-proof";
    size_t hlen;
    int fd;
    memset(&g_a, 0, sizeof(g_a));
    uv_loop_init(&loop);
    node_open(&a, &loop, 1, SECRET, &g_a);
    aamm__psk_derive_key("c", SECRET, strlen(SECRET), key);
    fd = dial(a.addr);
    hlen = make_hello(hello, 2, 1, "127.0.0.1:4242");
    ck_assert_int_eq(send(fd, hello, hlen, 0), (ssize_t)hlen);
    ck_assert(recv_exact(&loop, fd, ch, sizeof(ch)));
    ck_assert(memcmp(ch, AAMM__PSK_MAGIC, 8) == 0);
    aamm__psk_mac(key, 'A', hello, hlen, ch + 8, mac);
    ck_assert(memcmp(mac, ch + 40, 32) == 0); /* the acceptor proved it knows the key */
    aamm__psk_mac(key, 'C', hello, hlen, ch + 8, msg);
    {
        uint8_t c2a[32];
        size_t rlen;
        aamm__psk_session_key(key, "c2a", hello, hlen, ch + 8, c2a);
        rlen = aamm__psk_seal(c2a, 0, payload, sizeof(payload), msg + 32);
        ck_assert_uint_eq(rlen, 4 + sizeof(payload) + 32);
        ck_assert_int_eq(send(fd, msg, 32 + rlen, 0), (ssize_t)(32 + rlen));
    }
    spin(&loop, 3000, a_accepted, NULL);
    ck_assert_int_eq(g_a.accepted, 1);
    ck_assert_uint_eq(g_a.id, 2);
    ck_assert_str_eq(g_a.addr, "127.0.0.1:4242");
    g_a.stream->data = &g_a;
    ck_assert_int_eq(uv_read_start(g_a.stream, alloc_cb, read_cb), 0);
    {
        int64_t end = aamm_test_now_ms() + 3000;
        while (g_a.len < sizeof(payload) && aamm_test_now_ms() < end)
            uv_run(&loop, UV_RUN_NOWAIT);
    }
    ck_assert_uint_eq(g_a.len, sizeof(payload));
    ck_assert(memcmp(g_a.data, payload, sizeof(payload)) == 0);
    uv_close((uv_handle_t *)g_a.stream, free_handle);
    close(fd);
    node_close(&a);
    uv_run(&loop, UV_RUN_NOWAIT);
    ck_assert_int_eq(uv_loop_close(&loop), 0);
}
END_TEST

/* A forged PROOF (no key), a HELLO addressed to another node id, and plain garbage are all
 * dropped; raft never gets a stream. */
START_TEST(refusals)
{
    uv_loop_t loop;
    struct node a;
    uint8_t hello[128], ch[AAMM__PSK_CHALLENGE], junk[64], b;
    size_t hlen;
    int fd;
    memset(&g_a, 0, sizeof(g_a));
    uv_loop_init(&loop);
    node_open(&a, &loop, 1, SECRET, &g_a);
    /* forged proof */
    fd = dial(a.addr);
    hlen = make_hello(hello, 2, 1, "127.0.0.1:4242");
    ck_assert_int_eq(send(fd, hello, hlen, 0), (ssize_t)hlen);
    ck_assert(recv_exact(&loop, fd, ch, sizeof(ch)));
    memset(junk, 0x42, sizeof(junk));
    ck_assert_int_eq(send(fd, junk, sizeof(junk), 0), (ssize_t)sizeof(junk));
    ck_assert(!recv_exact(&loop, fd, &b, 1)); /* closed */
    close(fd);
    /* addressed to node 7 */
    fd = dial(a.addr);
    hlen = make_hello(hello, 2, 7, "127.0.0.1:4242");
    ck_assert_int_eq(send(fd, hello, hlen, 0), (ssize_t)hlen);
    ck_assert(!recv_exact(&loop, fd, ch, sizeof(ch)));
    close(fd);
    /* garbage */
    fd = dial(a.addr);
    ck_assert_int_eq(send(fd, "hello there!", 12, 0), 12);
    ck_assert(!recv_exact(&loop, fd, &b, 1));
    close(fd);
    ck_assert_int_eq(g_a.accepted, 0);
    node_close(&a);
    uv_run(&loop, UV_RUN_NOWAIT);
    ck_assert_int_eq(uv_loop_close(&loop), 0);
}
END_TEST

struct conn_req {
    struct raft_uv_connect req;
    int status;
    uv_stream_t *stream;
    bool done;
};

static void connect_cb(struct raft_uv_connect *req, struct uv_stream_s *stream, int status)
{
    struct conn_req *c = req->data;
    c->done = true;
    c->status = status;
    c->stream = stream;
}

static struct conn_req *g_creq;

static bool creq_done(void)
{
    return g_creq->done && (g_creq->status != 0 || g_a.accepted > 0);
}

static void write_cb(uv_write_t *w, int status)
{
    (void)w;
    ck_assert_int_eq(status, 0);
}

/* Two transports with the same key: connect() yields a stream on both sides and bytes flow.
 * With different keys the connect fails (RAFT_NOCONNECTION) and nothing is accepted. */
START_TEST(transport_pair)
{
    uv_loop_t loop;
    struct node a, b, c;
    struct conn_req req;
    uv_write_t w;
    uv_buf_t buf = uv_buf_init((char *)"ping-from-b", 11);
    memset(&g_a, 0, sizeof(g_a));
    memset(&g_b, 0, sizeof(g_b));
    uv_loop_init(&loop);
    node_open(&a, &loop, 1, SECRET, &g_a);
    node_open(&b, &loop, 2, SECRET, &g_b);
    memset(&req, 0, sizeof(req));
    req.req.data = &req;
    g_creq = &req;
    ck_assert_int_eq(b.t.connect(&b.t, &req.req, 1, a.addr, connect_cb), 0);
    spin(&loop, 3000, creq_done, NULL);
    ck_assert_int_eq(req.status, 0);
    ck_assert_int_eq(g_a.accepted, 1);
    ck_assert_uint_eq(g_a.id, 2);
    ck_assert_str_eq(g_a.addr, b.addr);
    g_a.stream->data = &g_a;
    uv_read_start(g_a.stream, alloc_cb, read_cb);
    ck_assert_int_eq(uv_write(&w, req.stream, &buf, 1, write_cb), 0);
    {
        int64_t end = aamm_test_now_ms() + 3000;
        while (g_a.len < 11 && aamm_test_now_ms() < end)
            uv_run(&loop, UV_RUN_NOWAIT);
    }
    ck_assert_uint_eq(g_a.len, 11);
    ck_assert(memcmp(g_a.data, "ping-from-b", 11) == 0);
    uv_close((uv_handle_t *)g_a.stream, free_handle);
    uv_close((uv_handle_t *)req.stream, free_handle);
    /* a third node with another secret */
    g_a.accepted = 0;
    node_open(&c, &loop, 3, "a-different-secret!!", &g_b);
    memset(&req, 0, sizeof(req));
    req.req.data = &req;
    ck_assert_int_eq(c.t.connect(&c.t, &req.req, 1, a.addr, connect_cb), 0);
    spin(&loop, 3000, creq_done, NULL);
    ck_assert(req.done);
    ck_assert_int_eq(req.status, RAFT_NOCONNECTION);
    spin(&loop, 100, NULL, NULL);
    ck_assert_int_eq(g_a.accepted, 0);
    node_close(&c);
    node_close(&b);
    node_close(&a);
    uv_run(&loop, UV_RUN_NOWAIT);
    ck_assert_int_eq(uv_loop_close(&loop), 0);
}
END_TEST

/* A raw connector: handshake as node 2 with node @a (raft role), leaving the session keys in
 * @c2a / @a2c. Returns the socket. */
static int raw_session(uv_loop_t *loop, const struct node *a, uint8_t c2a[32], uint8_t a2c[32])
{
    uint8_t key[32], hello[128], ch[AAMM__PSK_CHALLENGE], proof[32];
    size_t hlen;
    int fd = dial(a->addr);
    aamm__psk_derive_key("c", SECRET, strlen(SECRET), key);
    hlen = make_hello(hello, 2, 1, "127.0.0.1:4242");
    ck_assert_int_eq(send(fd, hello, hlen, 0), (ssize_t)hlen);
    ck_assert(recv_exact(loop, fd, ch, sizeof(ch)));
    aamm__psk_mac(key, 'C', hello, hlen, ch + 8, proof);
    ck_assert_int_eq(send(fd, proof, 32, 0), 32);
    aamm__psk_session_key(key, "c2a", hello, hlen, ch + 8, c2a);
    aamm__psk_session_key(key, "a2c", hello, hlen, ch + 8, a2c);
    return fd;
}

/* Run the loop until the peer closed @fd (recv gives 0 or an error) or 2 s pass. */
static bool closed_within(uv_loop_t *loop, int fd)
{
    int64_t end = aamm_test_now_ms() + 2000;
    while (aamm_test_now_ms() < end) {
        uint8_t b;
        ssize_t r = recv(fd, &b, 1, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK))
            return true;
        uv_run(loop, UV_RUN_NOWAIT);
    }
    return false;
}

enum fault { F_NONE, F_ALTER, F_DROP, F_REPLAY, F_REORDER, F_REFLECT, F_MAC };

/* One session that sends records "one", "two", "three" with @fault applied to the second,
 * and what raft received. */
static void run_fault(enum fault fault, const char *want, bool want_closed)
{
    uv_loop_t loop;
    struct node a;
    uint8_t c2a[32], a2c[32], r[3][64], wire[256];
    size_t rl[3], n = 0;
    static const char *parts[3] = {"one", "two", "three"};
    int fd, i, errors = g_mac_errors;
    memset(&g_a, 0, sizeof(g_a));
    uv_loop_init(&loop);
    node_open(&a, &loop, 1, SECRET, &g_a);
    fd = raw_session(&loop, &a, c2a, a2c);
    for (i = 0; i < 3; i++)
        rl[i] = aamm__psk_seal(fault == F_REFLECT && i == 1 ? a2c : c2a, (uint64_t)i, parts[i],
                               strlen(parts[i]), r[i]);
    if (fault == F_REORDER) {
        /* the second and third records swap places */
        memcpy(wire, r[0], rl[0]);
        memcpy(wire + rl[0], r[2], rl[2]);
        memcpy(wire + rl[0] + rl[2], r[1], rl[1]);
        n = rl[0] + rl[1] + rl[2];
    } else {
        memcpy(wire, r[0], rl[0]);
        n = rl[0];
        if (fault == F_ALTER)
            r[1][5] ^= 0x01; /* a payload bit */
        if (fault == F_MAC)
            r[1][rl[1] - 1] ^= 0x80; /* a MAC bit */
        if (fault == F_REPLAY) {
            memcpy(wire + n, r[0], rl[0]); /* the first record again, in place of the second */
            n += rl[0];
        } else if (fault != F_DROP) {
            memcpy(wire + n, r[1], rl[1]);
            n += rl[1];
        }
        memcpy(wire + n, r[2], rl[2]);
        n += rl[2];
    }
    ck_assert_int_eq(send(fd, wire, n, 0), (ssize_t)n);
    spin(&loop, 2000, a_accepted, NULL);
    ck_assert_int_eq(g_a.accepted, 1);
    g_a.stream->data = &g_a;
    ck_assert_int_eq(uv_read_start(g_a.stream, alloc_cb, read_cb), 0);
    ck_assert(closed_within(&loop, fd) == want_closed);
    {
        int64_t end = aamm_test_now_ms() + 2000;
        while ((want_closed ? g_a.failed == 0 : g_a.len < strlen(want)) &&
               aamm_test_now_ms() < end)
            uv_run(&loop, UV_RUN_NOWAIT);
    }
    g_a.data[g_a.len] = 0;
    ck_assert_str_eq(g_a.data, want); /* exactly what came before the fault */
    if (want_closed) {
        ck_assert_int_eq(g_a.failed, 1);                /* raft's stream sees the cut */
        ck_assert_int_eq(g_mac_errors, errors + 1); /* and it was logged as an error */
    } else {
        ck_assert_int_eq(g_a.failed, 0);
        ck_assert_int_eq(g_mac_errors, errors);
    }
    uv_close((uv_handle_t *)g_a.stream, free_handle);
    close(fd);
    node_close(&a);
    uv_run(&loop, UV_RUN_NOWAIT);
    ck_assert_int_eq(uv_loop_close(&loop), 0);
}

/* Records in order reach raft whole; a record with one payload bit altered, one with a MAC bit
 * altered, a dropped record (the next one arrives out of sequence), a replayed record, two
 * records swapped, and a record sealed with the other direction's key (reflected) each close
 * the connection at that record: raft has exactly what came before it and sees EOF, and an
 * error is logged. */
START_TEST(records_detect_tampering)
{
    aamm_set_log_cb(log_cb, AAMM_LOG_ERROR, NULL);
    run_fault(F_NONE, "onetwothree", false);
    run_fault(F_ALTER, "one", true);
    run_fault(F_MAC, "one", true);
    run_fault(F_DROP, "one", true);
    run_fault(F_REPLAY, "one", true);
    run_fault(F_REORDER, "one", true);
    run_fault(F_REFLECT, "one", true);
    aamm_set_log_cb(NULL, 0, NULL);
}
END_TEST

/* The forwarding channel, the other direction: a transport that connects to a raw acceptor
 * sends its frames as records under the connector's key with sequence numbers 0, 1, ...,
 * takes the acceptor's records in sequence, and drops the channel on a replayed one. */
static int g_frames, g_down;
static char g_frame[64];

static void fwd_frame(struct aamm__cs_conn *c, const uint8_t *data, size_t len, void *arg)
{
    (void)c;
    (void)arg;
    g_frames++;
    snprintf(g_frame, sizeof(g_frame), "%.*s", (int)len, (const char *)data);
}

static void fwd_state(struct aamm__cs_conn *c, bool up, void *arg)
{
    (void)arg;
    if (up) {
        ck_assert_int_eq(aamm__cs_conn_send(c, "q0", 2), 0);
        ck_assert_int_eq(aamm__cs_conn_send(c, "q1", 2), 0);
    } else {
        g_down++;
    }
}

START_TEST(fwd_records_both_directions)
{
    uv_loop_t loop;
    struct node b;
    struct sockaddr_in sa;
    socklen_t slen = sizeof(sa);
    char addr[64];
    uint8_t key[32], hs[512], ch[AAMM__PSK_CHALLENGE], c2a[32], a2c[32], rec[2][64], want[64];
    size_t hlen, alen, rl, wl;
    int lfd, fd, one = 1;
    struct aamm__cs_conn *c;
    memset(&g_b, 0, sizeof(g_b));
    g_frames = g_down = 0;
    aamm_set_log_cb(log_cb, AAMM_LOG_ERROR, NULL);
    uv_loop_init(&loop);
    node_open(&b, &loop, 2, SECRET, &g_b);
    aamm__psk_derive_key("c", SECRET, strlen(SECRET), key);
    /* the raw acceptor, node 1 */
    lfd = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(bind(lfd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    ck_assert_int_eq(listen(lfd, 4), 0);
    ck_assert_int_eq(getsockname(lfd, (struct sockaddr *)&sa, &slen), 0);
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", ntohs(sa.sin_port));
    c = aamm__psk_connect_fwd(&b.t, 1, addr);
    ck_assert_ptr_nonnull(c);
    aamm__cs_conn_set_cbs(c, fwd_frame, fwd_state, NULL);
    spin(&loop, 200, NULL, NULL);
    fd = accept(lfd, NULL, NULL);
    ck_assert_int_ge(fd, 0);
    fcntl(fd, F_SETFL, O_NONBLOCK);
    ck_assert(recv_exact(&loop, fd, hs, AAMM__PSK_HELLO_FIXED));
    alen = (size_t)hs[60] | ((size_t)hs[61] << 8);
    ck_assert(recv_exact(&loop, fd, hs + AAMM__PSK_HELLO_FIXED, alen));
    hlen = AAMM__PSK_HELLO_FIXED + alen;
    memcpy(ch, AAMM__PSK_MAGIC, 8);
    memset(ch + 8, 0x5a, AAMM__PSK_NONCE);
    aamm__psk_mac(key, 'A', hs, hlen, ch + 8, ch + 40);
    ck_assert_int_eq(send(fd, ch, sizeof(ch), 0), (ssize_t)sizeof(ch));
    ck_assert(recv_exact(&loop, fd, want, 32)); /* PROOF */
    aamm__psk_session_key(key, "c2a", hs, hlen, ch + 8, c2a);
    aamm__psk_session_key(key, "a2c", hs, hlen, ch + 8, a2c);
    /* the connector's two frames: records 0 and 1 under c2a, byte for byte */
    rl = aamm__psk_seal(c2a, 0, "q0", 2, rec[0]);
    ck_assert(recv_exact(&loop, fd, want, rl));
    ck_assert(memcmp(want, rec[0], rl) == 0);
    rl = aamm__psk_seal(c2a, 1, "q1", 2, rec[0]);
    ck_assert(recv_exact(&loop, fd, want, rl));
    ck_assert(memcmp(want, rec[0], rl) == 0);
    /* the acceptor's record 0 is delivered; its replay closes the channel */
    wl = aamm__psk_seal(a2c, 0, "r0", 2, rec[1]);
    ck_assert_int_eq(send(fd, rec[1], wl, 0), (ssize_t)wl);
    {
        int64_t end = aamm_test_now_ms() + 2000;
        while (g_frames < 1 && aamm_test_now_ms() < end)
            uv_run(&loop, UV_RUN_NOWAIT);
    }
    ck_assert_int_eq(g_frames, 1);
    ck_assert_str_eq(g_frame, "r0");
    ck_assert_int_eq(send(fd, rec[1], wl, 0), (ssize_t)wl);
    ck_assert(closed_within(&loop, fd));
    spin(&loop, 50, NULL, NULL);
    ck_assert_int_eq(g_frames, 1);
    ck_assert_int_eq(g_down, 1);
    close(fd);
    close(lfd);
    node_close(&b);
    uv_run(&loop, UV_RUN_NOWAIT);
    ck_assert_int_eq(uv_loop_close(&loop), 0);
    aamm_set_log_cb(NULL, 0, NULL);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("consensus-psk");
    TCase *tc = aamm_test_tcase("psk", 20);
    tcase_add_test(tc, handshake_then_data_in_one_write);
    tcase_add_test(tc, refusals);
    tcase_add_test(tc, transport_pair);
    tcase_add_test(tc, records_detect_tampering);
    tcase_add_test(tc, fwd_records_both_directions);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
