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

/* The connector's PROOF and raft's first bytes arrive in ONE write: the transport hands raft
 * the stream with every byte after the handshake still readable, none eaten; the id and
 * address raft learns are the authenticated ones. */
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
    memcpy(msg + 32, payload, sizeof(payload));
    ck_assert_int_eq(send(fd, msg, 32 + sizeof(payload), 0), (ssize_t)(32 + sizeof(payload)));
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

int main(void)
{
    Suite *s = suite_create("consensus-psk");
    TCase *tc = aamm_test_tcase("psk", 20);
    tcase_add_test(tc, handshake_then_data_in_one_write);
    tcase_add_test(tc, refusals);
    tcase_add_test(tc, transport_pair);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
