/*
 * test_link.c: agent-to-agent links over loopback: handshake, every authentication failure,
 * tampering, dropped / repeated / reordered frames, garbage, half-open and dead peers,
 * back-pressure, resume after cuts, TLS.
 */
#include "config.h"

#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <aamm/link.h>
#include <aamm/wire.h>

#include "internal.h"
#include "netfx.h"
#include "testutil.h"

#define SECRET "correct horse battery staple"
#define CLUSTER "test-cluster"

static const uint32_t peer_of_1[] = {2};
static const uint32_t peer_of_2[] = {1};

static struct aamm_link_options base_opts(int role, uint32_t me, const char *secret,
                                          const char *cluster)
{
    struct aamm_link_options o;
    memset(&o, 0, sizeof o);
    o.role = role;
    o.node_id = me;
    o.cluster = cluster;
    o.peer_ids = me == 1 ? peer_of_1 : peer_of_2;
    o.npeer_ids = 1;
    o.secret = (const uint8_t *)secret;
    o.secret_len = strlen(secret);
    o.handshake_timeout_ms = 3000;
    o.heartbeat_ms = 200;
    o.dead_after_ms = 3000;
    return o;
}

/* A sender (node 1) and a receiver (node 2), one of which dials the other's listener,
 * optionally through a proxy. */
struct pair {
    struct aamm_link *s, *r;
    struct aamm_link *dialer, *listener;
    int lfd, port;
    struct netfx_proxy *px;
    bool step_s, step_r;
};

static void pair_open(struct pair *p, const struct aamm_link_options *so,
                      const struct aamm_link_options *ro, bool receiver_dials,
                      struct netfx_proxy *px)
{
    char port[16];
    memset(p, 0, sizeof *p);
    p->step_s = p->step_r = true;
    if (p->lfd == 0)
        p->lfd = -1;
    ck_assert_int_eq(aamm_link_new(&p->s, so, NULL, 0), 0);
    ck_assert_int_eq(aamm_link_new(&p->r, ro, NULL, 0), 0);
    p->dialer = receiver_dials ? p->r : p->s;
    p->listener = receiver_dials ? p->s : p->r;
    p->lfd = netfx_listen(&p->port);
    ck_assert_int_ge(p->lfd, 0);
    p->px = px;
    if (px != NULL) {
        netfx_proxy_init(px, p->port);
        snprintf(port, sizeof port, "%d", px->port);
    } else {
        snprintf(port, sizeof port, "%d", p->port);
    }
    ck_assert_int_eq(aamm_link_connect(p->dialer, "127.0.0.1", port), 0);
}

static void pair_close(struct pair *p)
{
    aamm_link_free(p->s);
    aamm_link_free(p->r);
    if (p->lfd >= 0)
        close(p->lfd);
    if (p->px)
        netfx_proxy_free(p->px);
}

static void link_pollfd(struct aamm_link *l, struct pollfd *fds, int *n, int *timeout)
{
    int ev = aamm_link_events(l), t = aamm_link_timeout(l);
    if (aamm_link_fd(l) >= 0) {
        fds[*n].fd = aamm_link_fd(l);
        fds[*n].events =
            (short)(((ev & AAMM_READ) ? POLLIN : 0) | ((ev & AAMM_WRITE) ? POLLOUT : 0));
        fds[*n].revents = 0;
        (*n)++;
    }
    if (t >= 0 && t < *timeout)
        *timeout = t;
}

/* One round: accept into the listener if it waits, poll briefly, step everything. */
static void pair_round(struct pair *p, int max_wait)
{
    struct pollfd fds[8];
    int n = 0, timeout = max_wait;
    if (aamm_link_state(p->listener) == AAMM_LINK_IDLE) {
        int fd = netfx_accept(p->lfd);
        if (fd >= 0)
            ck_assert_int_eq(aamm_link_adopt_fd(p->listener, fd), 0);
        else
            fds[n++] = (struct pollfd){p->lfd, POLLIN, 0};
    }
    if (p->step_s)
        link_pollfd(p->s, fds, &n, &timeout);
    if (p->step_r)
        link_pollfd(p->r, fds, &n, &timeout);
    if (p->px)
        n += netfx_proxy_pollfds(p->px, fds + n);
    poll(fds, (nfds_t)n, timeout);
    if (p->px)
        netfx_proxy_step(p->px);
    if (p->step_s)
        aamm_link_step(p->s);
    if (p->step_r)
        aamm_link_step(p->r);
}

static bool both_ready(struct pair *p)
{
    return aamm_link_state(p->s) == AAMM_LINK_READY && aamm_link_state(p->r) == AAMM_LINK_READY;
}

static bool done_state(struct aamm_link *l)
{
    enum aamm_link_state st = aamm_link_state(l);
    return st == AAMM_LINK_FAILED || st == AAMM_LINK_CLOSED;
}

/* Run rounds until @cond or @ms elapsed; returns whether @cond held. */
static bool pair_run(struct pair *p, int ms, bool (*cond)(struct pair *))
{
    int64_t end = aamm_test_now_ms() + ms;
    while (aamm_test_now_ms() < end) {
        if (cond && cond(p))
            return true;
        pair_round(p, 10);
    }
    return cond ? cond(p) : true;
}

static bool both_done(struct pair *p)
{
    return done_state(p->s) && done_state(p->r);
}

static bool r_done(struct pair *p)
{
    return done_state(p->r);
}

/* ---- transactions ---------------------------------------------------------------- */

static struct aamm_column tcols[2] = {{"id", "integer", 23, -1, AAMM_COLUMN_KEY},
                                      {"v", "text", 25, -1, 0}};
static struct aamm_relation trel = {1, "public", "t", 'd', 2, tcols, 1};

/* Queue transaction @i (origin 1, commit at 1000 + 100 i) with @nch inserts whose value is
 * "i:j" padded to @size bytes; returns 0 or the first error (EAGAIN included). */
struct gen {
    long i;     /* transaction */
    uint32_t j; /* next change; UINT32_MAX: BEGIN not yet sent */
    bool done_commit;
};

static uint32_t gen_nch(long i)
{
    return 1 + (uint32_t)(i % 5);
}

static uint32_t gen_size(long i, uint32_t j)
{
    if (j == 0 && i % 2003 == 1000)
        return 1500000; /* above a frame: split into pieces */
    if (j == 0 && i % 97 == 3)
        return 50000;
    return 10 + (uint32_t)((i * 7 + j) % 90);
}

static void gen_value(long i, uint32_t j, char *buf, uint32_t size)
{
    int n = snprintf(buf, size + 1, "%ld:%u:", i, j);
    for (uint32_t k = (uint32_t)n; k < size; k++)
        buf[k] = (char)('a' + (k * 31 + (uint32_t)i) % 26);
    buf[size] = '\0';
}

static struct aamm_transaction gen_txn(long i)
{
    struct aamm_transaction t = {1,
                                 (uint32_t)i,
                                 1000 + (uint64_t)i * 100,
                                 1000 + (uint64_t)i * 100 + 40,
                                 1700000000000000 + i,
                                 NULL,
                                 0};
    return t;
}

static char *valbuf;

/* Push as much of transaction g->i as the link takes. Returns 0 when the transaction was
 * fully queued, AAMM_EAGAIN when the queue is full, or an error. */
static int gen_push(struct aamm_link *l, struct gen *g)
{
    struct aamm_transaction t = gen_txn(g->i);
    int rc;
    if (g->j == UINT32_MAX) {
        if ((rc = aamm_link_send_begin(l, &t)) != 0)
            return rc;
        g->j = 0;
    }
    while (g->j < gen_nch(g->i)) {
        char idbuf[24];
        uint32_t size = gen_size(g->i, g->j);
        struct aamm_value vals[2];
        struct aamm_change ch;
        snprintf(idbuf, sizeof idbuf, "%u", g->j);
        gen_value(g->i, g->j, valbuf, size);
        vals[0] = (struct aamm_value){AAMM_VALUE_TEXT, (uint32_t)strlen(idbuf), idbuf};
        vals[1] = (struct aamm_value){AAMM_VALUE_TEXT, size, valbuf};
        memset(&ch, 0, sizeof ch);
        ch.kind = AAMM_CHANGE_INSERT;
        ch.relation = &trel;
        ch.new_tuple.nvalues = 2;
        ch.new_tuple.values = vals;
        if ((rc = aamm_link_send_change(l, &ch)) != 0)
            return rc;
        g->j++;
    }
    if ((rc = aamm_link_send_commit(l, &t)) != 0)
        return rc;
    g->i++;
    g->j = UINT32_MAX;
    return 0;
}

/* The receiving host: checks every event against the generator; its "durable position" is
 * the end LSN of the last committed transaction. */
struct sink {
    long next;        /* index of the next transaction expected */
    uint64_t durable; /* end LSN of the last committed one */
    bool open;
    uint32_t nch;
    long committed;
    long since_ack;
};

static void sink_event(struct sink *k, const struct aamm_wire_event *ev)
{
    switch (ev->kind) {
    case AAMM_WIRE_EV_BEGIN:
        ck_assert(!k->open);
        ck_assert_msg(ev->txn.commit_lsn == 1000 + (uint64_t)k->next * 100,
                      "BEGIN at %llu, expected transaction %ld (gap or duplicate)",
                      (unsigned long long)ev->txn.commit_lsn, k->next);
        k->open = true;
        k->nch = 0;
        break;
    case AAMM_WIRE_EV_CHANGE: {
        uint32_t size = gen_size(k->next, k->nch);
        ck_assert(k->open);
        ck_assert_int_eq(ev->change.kind, AAMM_CHANGE_INSERT);
        ck_assert_uint_eq(ev->change.new_tuple.values[1].len, size);
        gen_value(k->next, k->nch, valbuf, size);
        ck_assert(memcmp(ev->change.new_tuple.values[1].data, valbuf, size) == 0);
        k->nch++;
        break;
    }
    case AAMM_WIRE_EV_COMMIT:
        ck_assert(k->open);
        ck_assert_uint_eq(k->nch, gen_nch(k->next));
        ck_assert_uint_eq(ev->txn.end_lsn, 1000 + (uint64_t)k->next * 100 + 40);
        k->durable = ev->txn.end_lsn;
        k->open = false;
        k->next++;
        k->committed++;
        k->since_ack++;
        break;
    default:
        ck_abort_msg("unexpected event %d", (int)ev->kind);
    }
}

/* Drain the receiver: returns the number of events handled. */
static long sink_drain(struct sink *k, struct aamm_link *r, long max)
{
    struct aamm_wire_event ev;
    long n = 0;
    while (n < max && aamm_link_recv(r, &ev) == 0) {
        sink_event(k, &ev);
        n++;
        if (k->since_ack >= 50) {
            aamm_link_ack(r, 1, k->durable);
            k->since_ack = 0;
        }
    }
    return n;
}

/* ====================================================================================
 * Handshake and data
 * ==================================================================================== */

/* A sender and a receiver with the same secret authenticate; the receiver's resume position
 * reaches the sender, which skips what is at or below it; data and acks flow; clocks agree. */
START_TEST(handshake_resume_data_ack)
{
    struct aamm_wire_position resume = {1, 1000 + 5 * 100 + 40}; /* txns 0..5 are durable */
    struct aamm_link_options so = base_opts(AAMM_LINK_SENDER, 1, SECRET, CLUSTER);
    struct aamm_link_options ro = base_opts(AAMM_LINK_RECEIVER, 2, SECRET, CLUSTER);
    struct aamm_link_stats ss, rs;
    struct pair p;
    struct sink k = {6, 0, false, 0, 0, 0};
    struct gen g = {0, UINT32_MAX, false};
    uint64_t lsn = 0;
    ro.resume = &resume;
    ro.nresume = 1;
    pair_open(&p, &so, &ro, false, NULL);
    ck_assert(pair_run(&p, 3000, both_ready));
    ck_assert_uint_eq(aamm_link_peer_id(p.s), 2);
    ck_assert_uint_eq(aamm_link_peer_id(p.r), 1);
    ck_assert_int_eq(aamm_link_resume_position(p.s, 1, &lsn), 0);
    ck_assert_uint_eq(lsn, resume.lsn);
    for (int i = 0; i < 10; i++)
        ck_assert_int_eq(gen_push(p.s, &g), 0);
    for (int i = 0; i < 100 && k.committed < 4; i++) {
        pair_round(&p, 10);
        sink_drain(&k, p.r, 1000);
    }
    ck_assert_int_eq(k.committed, 4); /* 6..9: 0..5 skipped */
    ck_assert_int_eq(aamm_link_ack(p.r, 1, k.durable), 0);
    for (int i = 0; i < 100 && aamm_link_acked(p.s, 1) != k.durable; i++)
        pair_round(&p, 10);
    ck_assert_uint_eq(aamm_link_acked(p.s, 1), 1000 + 9 * 100 + 40);
    aamm_link_stats(p.s, &ss);
    aamm_link_stats(p.r, &rs);
    ck_assert_uint_eq(ss.txns_skipped, 6);
    ck_assert_uint_eq(ss.txns_sent, 4);
    ck_assert_uint_eq(rs.txns_received, 4);
    ck_assert_uint_eq(ss.acks_received, 1);
    ck_assert_int_lt(rs.clock_skew_us < 0 ? -rs.clock_skew_us : rs.clock_skew_us, 1000000);
    ck_assert(!rs.clock_skew_exceeded);
    ck_assert_uint_eq(ss.auth_failures + rs.auth_failures, 0);
    /* goodbye: both sides end cleanly (the receiving host keeps consuming) */
    ck_assert_int_eq(aamm_link_close(p.s), 0);
    for (int i = 0; i < 200 && !both_done(&p); i++) {
        pair_round(&p, 10);
        sink_drain(&k, p.r, 1000);
    }
    ck_assert_int_eq(aamm_link_state(p.s), AAMM_LINK_CLOSED);
    ck_assert_int_eq(aamm_link_state(p.r), AAMM_LINK_CLOSED);
    pair_close(&p);
}
END_TEST

/* The receiver may dial the sender: roles do not depend on who dialed. Idle links stay up on
 * heartbeats. */
START_TEST(receiver_dials_and_heartbeats)
{
    struct aamm_link_options so = base_opts(AAMM_LINK_SENDER, 1, SECRET, CLUSTER);
    struct aamm_link_options ro = base_opts(AAMM_LINK_RECEIVER, 2, SECRET, CLUSTER);
    struct aamm_link_stats ss, rs;
    struct pair p;
    so.dead_after_ms = ro.dead_after_ms = 500;
    so.heartbeat_ms = ro.heartbeat_ms = 100;
    pair_open(&p, &so, &ro, true, NULL);
    ck_assert(pair_run(&p, 3000, both_ready));
    pair_run(&p, 1500, NULL); /* idle three times the dead interval */
    ck_assert(both_ready(&p));
    {
        struct aamm_wire_event ev;
        ck_assert_int_eq(aamm_link_recv(p.r, &ev), AAMM_EAGAIN); /* consumes heartbeats */
    }
    aamm_link_stats(p.s, &ss);
    aamm_link_stats(p.r, &rs);
    ck_assert_uint_gt(ss.heartbeats_sent, 3);
    ck_assert_uint_gt(rs.heartbeats_sent, 3);
    ck_assert_uint_gt(ss.heartbeats_received, 3);
    pair_close(&p);
}
END_TEST

/* A peer that stops responding after the handshake is detected within dead_after_ms. */
START_TEST(dead_peer_detected)
{
    struct aamm_link_options so = base_opts(AAMM_LINK_SENDER, 1, SECRET, CLUSTER);
    struct aamm_link_options ro = base_opts(AAMM_LINK_RECEIVER, 2, SECRET, CLUSTER);
    struct aamm_link_stats rs;
    struct pair p;
    int64_t t0;
    ro.dead_after_ms = 400;
    pair_open(&p, &so, &ro, false, NULL);
    ck_assert(pair_run(&p, 3000, both_ready));
    p.step_s = false; /* the sender's process hangs */
    t0 = aamm_test_now_ms();
    ck_assert(pair_run(&p, 3000, r_done));
    ck_assert_int_lt(aamm_test_now_ms() - t0, 1500);
    ck_assert_int_eq(aamm_link_step(p.r), AAMM_ETIMEDOUT);
    aamm_link_stats(p.r, &rs);
    ck_assert_uint_eq(rs.timeouts, 1);
    pair_close(&p);
}
END_TEST

/* ====================================================================================
 * Authentication failures
 * ==================================================================================== */

struct auth_case {
    const char *name;
    const char *s_secret, *r_secret;
    const char *s_cluster, *r_cluster;
    uint32_t r_expects;
    const char *r_msg; /* in the receiver's error message */
};

static const struct auth_case auth_cases[] = {
    {"wrong secret", SECRET, "another secret of some length", CLUSTER, CLUSTER, 1,
     "proof does not match"},
    {"wrong cluster", SECRET, SECRET, "other-cluster", CLUSTER, 1, "cluster"},
    {"unknown node", SECRET, SECRET, CLUSTER, CLUSTER, 9, "not an expected peer"},
};

/* Wrong secret, wrong cluster, unknown node id: both sides fail with AAMM_EAUTH and a clear
 * message, the failure is counted, and the receiver hands out nothing. */
START_TEST(auth_failures)
{
    const struct auth_case *c = &auth_cases[_i];
    struct aamm_link_options so = base_opts(AAMM_LINK_SENDER, 1, c->s_secret, c->s_cluster);
    struct aamm_link_options ro = base_opts(AAMM_LINK_RECEIVER, 2, c->r_secret, c->r_cluster);
    uint32_t expects = c->r_expects;
    struct aamm_link_stats ss, rs;
    struct aamm_wire_event ev;
    struct pair p;
    ro.peer_ids = &expects;
    pair_open(&p, &so, &ro, false, NULL);
    ck_assert(pair_run(&p, 3000, both_done));
    ck_assert_int_eq(aamm_link_state(p.s), AAMM_LINK_FAILED);
    ck_assert_int_eq(aamm_link_state(p.r), AAMM_LINK_FAILED);
    ck_assert_int_eq(aamm_link_step(p.r), AAMM_EAUTH);
    ck_assert_int_eq(aamm_link_step(p.s), AAMM_EAUTH);
    ck_assert_msg(strstr(aamm_link_errmsg(p.r), c->r_msg) != NULL, "%s: receiver says '%s'",
                  c->name, aamm_link_errmsg(p.r));
    ck_assert_int_eq(aamm_link_recv(p.r, &ev), AAMM_EAUTH);
    aamm_link_stats(p.s, &ss);
    aamm_link_stats(p.r, &rs);
    ck_assert_uint_ge(rs.auth_failures, 1);
    ck_assert_uint_ge(ss.auth_failures, 1);
    ck_assert_uint_eq(rs.txns_received, 0);
    pair_close(&p);
}
END_TEST

/* Raw client helpers: a fresh receiver link adopting one end of a loopback connection. */
struct raw {
    int lfd, port, fd;
    struct aamm_link *r;
};

static void raw_open(struct raw *w, const struct aamm_link_options *ro)
{
    int afd;
    w->lfd = netfx_listen(&w->port);
    w->fd = netfx_connect(w->port);
    ck_assert_int_ge(w->fd, 0);
    for (int i = 0; i < 100 && (afd = netfx_accept(w->lfd)) < 0; i++)
        usleep(1000);
    ck_assert_int_ge(afd, 0);
    ck_assert_int_eq(aamm_link_new(&w->r, ro, NULL, 0), 0);
    ck_assert_int_eq(aamm_link_adopt_fd(w->r, afd), 0);
}

static void raw_run(struct raw *w, int ms)
{
    int64_t end = aamm_test_now_ms() + ms;
    while (aamm_test_now_ms() < end && !done_state(w->r)) {
        struct pollfd pfd = {aamm_link_fd(w->r), POLLIN, 0};
        int ev = aamm_link_events(w->r);
        if (ev & AAMM_WRITE)
            pfd.events |= POLLOUT;
        poll(&pfd, 1, 5);
        aamm_link_step(w->r);
    }
}

static void raw_close(struct raw *w)
{
    aamm_link_free(w->r);
    close(w->fd);
    close(w->lfd);
}

/* Read frames from a raw socket with a decoder; returns events of the given kind. */
static int raw_expect(int fd, struct aamm_wire_decoder *dec, struct aamm_wire_event *ev, int ms)
{
    uint8_t buf[4096];
    int64_t end = aamm_test_now_ms() + ms;
    for (;;) {
        int rc = aamm_wire_decoder_next(dec, ev);
        size_t n, acc;
        if (rc != AAMM_EAGAIN)
            return rc;
        if (aamm_test_now_ms() > end)
            return AAMM_ETIMEDOUT;
        n = netfx_read_for(fd, buf, 1, 20);
        if (n > 0)
            aamm_wire_decoder_feed(dec, buf, n, &acc);
    }
}

static void raw_send_hello(int fd, uint32_t node, const uint8_t *nonce)
{
    struct aamm_wire_encoder *enc;
    struct aamm_wire_hello h = {1,   1,      AAMM_WIRE_ROLE_SENDER, 0, node, aamm__wall_us(),
                                {0}, CLUSTER};
    const uint8_t *p;
    size_t n;
    memcpy(h.nonce, nonce, 32);
    ck_assert_int_eq(aamm_wire_encoder_new(&enc, NULL, NULL, 0), 0);
    ck_assert_int_eq(aamm_wire_encode_hello(enc, &h), 0);
    p = aamm_wire_encoder_pending(enc, &n);
    ck_assert_int_eq(send(fd, p, n, MSG_NOSIGNAL), (ssize_t)n);
    aamm_wire_encoder_free(enc);
}

static void raw_send_auth(int fd, const uint8_t *proof)
{
    struct aamm_wire_encoder *enc;
    const uint8_t *p;
    size_t n;
    ck_assert_int_eq(aamm_wire_encoder_new(&enc, NULL, NULL, 0), 0);
    ck_assert_int_eq(aamm_wire_encode_auth(enc, proof), 0);
    p = aamm_wire_encoder_pending(enc, &n);
    ck_assert_int_eq(send(fd, p, n, MSG_NOSIGNAL), (ssize_t)n);
    aamm_wire_encoder_free(enc);
}

/* Reflection over two connections: an attacker without the secret gets the receiver's proof
 * on one connection and presents it on another; or echoes the receiver's own nonce. Both are
 * refused (AAMM_EAUTH) and counted. */
START_TEST(reflection_refused)
{
    struct aamm_link_options ro = base_opts(AAMM_LINK_RECEIVER, 2, SECRET, CLUSTER);
    struct raw w1, w2, w3;
    struct aamm_wire_decoder *d1, *d2, *d3;
    struct aamm_wire_event ev;
    struct aamm_link_stats rs;
    uint8_t nonce[32], stolen[32];
    memset(nonce, 0x42, sizeof nonce);
    ro.peer_ids = peer_of_2;
    /* connection 1: obtain the receiver's proof for our nonce */
    raw_open(&w1, &ro);
    ck_assert_int_eq(aamm_wire_decoder_new(&d1, NULL, NULL, 0), 0);
    raw_run(&w1, 50);
    ck_assert_int_eq(raw_expect(w1.fd, d1, &ev, 1000), 0);
    ck_assert_int_eq(ev.kind, AAMM_WIRE_EV_HELLO);
    raw_send_hello(w1.fd, 1, nonce);
    raw_run(&w1, 100);
    ck_assert_int_eq(raw_expect(w1.fd, d1, &ev, 1000), 0);
    ck_assert_int_eq(ev.kind, AAMM_WIRE_EV_AUTH);
    memcpy(stolen, ev.proof, 32);
    /* connection 2: present the stolen proof as ours */
    raw_open(&w2, &ro);
    ck_assert_int_eq(aamm_wire_decoder_new(&d2, NULL, NULL, 0), 0);
    raw_run(&w2, 50);
    ck_assert_int_eq(raw_expect(w2.fd, d2, &ev, 1000), 0);
    raw_send_hello(w2.fd, 1, nonce);
    raw_send_auth(w2.fd, stolen);
    raw_run(&w2, 1000);
    ck_assert_int_eq(aamm_link_state(w2.r), AAMM_LINK_FAILED);
    ck_assert_int_eq(aamm_link_step(w2.r), AAMM_EAUTH);
    aamm_link_stats(w2.r, &rs);
    ck_assert_uint_eq(rs.auth_failures, 1);
    /* connection 3: echo the receiver's own nonce back */
    raw_open(&w3, &ro);
    ck_assert_int_eq(aamm_wire_decoder_new(&d3, NULL, NULL, 0), 0);
    raw_run(&w3, 50);
    ck_assert_int_eq(raw_expect(w3.fd, d3, &ev, 1000), 0);
    ck_assert_int_eq(ev.kind, AAMM_WIRE_EV_HELLO);
    raw_send_hello(w3.fd, 1, ev.hello.nonce);
    raw_run(&w3, 1000);
    ck_assert_int_eq(aamm_link_step(w3.r), AAMM_EAUTH);
    ck_assert_msg(strstr(aamm_link_errmsg(w3.r), "reflection") != NULL, "%s",
                  aamm_link_errmsg(w3.r));
    aamm_link_stats(w3.r, &rs);
    ck_assert_uint_eq(rs.auth_failures, 1);
    /* and the receiver told the attacker why */
    ck_assert_int_eq(raw_expect(w3.fd, d3, &ev, 1000), 0);
    ck_assert_int_eq(ev.kind, AAMM_WIRE_EV_ERROR);
    ck_assert_int_eq(ev.code, AAMM_EAUTH);
    aamm_wire_decoder_free(d1);
    aamm_wire_decoder_free(d2);
    aamm_wire_decoder_free(d3);
    raw_close(&w1);
    raw_close(&w2);
    raw_close(&w3);
}
END_TEST

/* A recorded, successful handshake (and the data after it) replayed on a new connection is
 * refused: the receiver's fresh nonce makes the old proof invalid. Nothing is delivered. */
START_TEST(replayed_handshake_refused)
{
    struct aamm_link_options so = base_opts(AAMM_LINK_SENDER, 1, SECRET, CLUSTER);
    struct aamm_link_options ro = base_opts(AAMM_LINK_RECEIVER, 2, SECRET, CLUSTER);
    struct netfx_proxy px;
    struct pair p;
    struct sink k = {0, 0, false, 0, 0, 0};
    struct gen g = {0, UINT32_MAX, false};
    struct raw w;
    struct aamm_link_stats rs;
    struct aamm_wire_event ev;
    pair_open(&p, &so, &ro, false, &px);
    px.record = true;
    ck_assert(pair_run(&p, 3000, both_ready));
    for (int i = 0; i < 3; i++)
        ck_assert_int_eq(gen_push(p.s, &g), 0);
    for (int i = 0; i < 100 && k.committed < 3; i++) {
        pair_round(&p, 10);
        sink_drain(&k, p.r, 1000);
    }
    ck_assert_int_eq(k.committed, 3);
    raw_open(&w, &ro);
    ck_assert_int_eq(send(w.fd, px.recorded.p, px.recorded.len, MSG_NOSIGNAL),
                     (ssize_t)px.recorded.len);
    raw_run(&w, 1000);
    ck_assert_int_eq(aamm_link_state(w.r), AAMM_LINK_FAILED);
    ck_assert_int_eq(aamm_link_step(w.r), AAMM_EAUTH);
    ck_assert_int_eq(aamm_link_recv(w.r, &ev), AAMM_EAUTH);
    aamm_link_stats(w.r, &rs);
    ck_assert_uint_eq(rs.auth_failures, 1);
    ck_assert_uint_eq(rs.txns_received, 0);
    raw_close(&w);
    pair_close(&p);
}
END_TEST

/* Random bytes on the port (no handshake at all) are refused as malformed and counted. */
START_TEST(garbage_refused)
{
    struct aamm_link_options ro = base_opts(AAMM_LINK_RECEIVER, 2, SECRET, CLUSTER);
    struct raw w;
    struct aamm_link_stats rs;
    uint8_t junk[1000];
    uint64_t seed = aamm_test_seed("garbage_refused");
    aamm_test_random_bytes(&seed, junk, sizeof junk);
    raw_open(&w, &ro);
    ck_assert_int_eq(send(w.fd, junk, sizeof junk, MSG_NOSIGNAL), (ssize_t)sizeof junk);
    raw_run(&w, 1000);
    ck_assert_int_eq(aamm_link_step(w.r), AAMM_EMALFORMED);
    ck_assert_msg(strstr(aamm_link_errmsg(w.r), "magic") != NULL, "%s", aamm_link_errmsg(w.r));
    aamm_link_stats(w.r, &rs);
    ck_assert_uint_eq(rs.protocol_errors, 1);
    raw_close(&w);
}
END_TEST

/* Before authentication a peer may send only small frames: a header announcing a large
 * payload is refused at once (nothing is buffered for it) and counted. */
START_TEST(oversize_before_auth_refused)
{
    struct aamm_link_options ro = base_opts(AAMM_LINK_RECEIVER, 2, SECRET, CLUSTER);
    struct raw w;
    struct aamm_link_stats rs;
    uint8_t h[16] = {0x41, 0x41, 0x4D, 0x57, 1, AAMM_WIRE_HELLO, 0, 0, 0xA0, 0x86, 0x01, 0};
    raw_open(&w, &ro);
    ck_assert_int_eq(send(w.fd, h, sizeof h, MSG_NOSIGNAL), (ssize_t)sizeof h);
    raw_run(&w, 1000);
    ck_assert_int_eq(aamm_link_step(w.r), AAMM_ETOOBIG);
    ck_assert_msg(strstr(aamm_link_errmsg(w.r), "above the limit") != NULL, "%s",
                  aamm_link_errmsg(w.r));
    aamm_link_stats(w.r, &rs);
    ck_assert_uint_eq(rs.protocol_errors, 1);
    raw_close(&w);
}
END_TEST

/* A half-open connection (a client that connects and never speaks) times out during the
 * handshake and is counted. */
START_TEST(half_open_times_out)
{
    struct aamm_link_options ro = base_opts(AAMM_LINK_RECEIVER, 2, SECRET, CLUSTER);
    struct raw w;
    struct aamm_link_stats rs;
    ro.handshake_timeout_ms = 300;
    raw_open(&w, &ro);
    raw_run(&w, 2000);
    ck_assert_int_eq(aamm_link_step(w.r), AAMM_ETIMEDOUT);
    aamm_link_stats(w.r, &rs);
    ck_assert_uint_eq(rs.timeouts, 1);
    raw_close(&w);
}
END_TEST

/* A frame altered in flight after authentication (CRC recomputed, so only the MAC can tell)
 * is rejected: AAMM_EAUTH, counted, and nothing of it is delivered. */
START_TEST(tampered_frame_rejected)
{
    struct aamm_link_options so = base_opts(AAMM_LINK_SENDER, 1, SECRET, CLUSTER);
    struct aamm_link_options ro = base_opts(AAMM_LINK_RECEIVER, 2, SECRET, CLUSTER);
    struct netfx_proxy px;
    struct pair p;
    struct sink k = {0, 0, false, 0, 0, 0};
    struct gen g = {0, UINT32_MAX, false};
    struct aamm_link_stats rs;
    pair_open(&p, &so, &ro, false, &px);
    px.tamper_frame = 3; /* HELLO, AUTH, DATA(txn 0), DATA(txn 1) <- altered */
    ck_assert(pair_run(&p, 3000, both_ready));
    for (int t = 0; t < 4; t++) {
        if (gen_push(p.s, &g) != 0) { /* the receiver refused the link already */
            ck_assert_int_ge(t, 2);
            break;
        }
        for (int i = 0; i < 20; i++) { /* each transaction in its own frame */
            pair_round(&p, 5);
            sink_drain(&k, p.r, 1000);
        }
    }
    ck_assert(pair_run(&p, 2000, r_done));
    sink_drain(&k, p.r, 1000);
    ck_assert(px.tampered);
    ck_assert_int_eq(aamm_link_step(p.r), AAMM_EAUTH);
    ck_assert_msg(strstr(aamm_link_errmsg(p.r), "MAC") != NULL, "%s", aamm_link_errmsg(p.r));
    aamm_link_stats(p.r, &rs);
    ck_assert_uint_eq(rs.mac_failures, 1);
    ck_assert_int_eq(k.committed, 1); /* transaction 0 only */
    ck_assert(!k.open);
    pair_close(&p);
}
END_TEST

/* Whole-frame faults after authentication: the proxy drops, duplicates or swaps one DATA
 * frame (each transaction travels in a frame of its own), with LZ4 off and on. The frame
 * MAC covers the implicit sequence number, so the receiver refuses the first frame out of
 * place with AAMM_EAUTH and a message naming the expected and the found sequence number;
 * the sink sees every transaction before the fault exactly once and in order, and nothing
 * after it (no gap, no repeat: sink_event fails on either). */
struct frame_fault_case {
    enum netfx_fault fault;
    bool lz4;
    long committed;  /* transactions delivered before the failure */
    const char *msg; /* expected in the receiver's error message */
};
static const struct frame_fault_case frame_fault_cases[] = {
    {NETFX_FAULT_DROP, false, 2,
     "frame sequence number 2 expected, this is frame 3: 1 frame(s) before it missing"},
    {NETFX_FAULT_DROP, true, 2,
     "frame sequence number 2 expected, this is frame 3: 1 frame(s) before it missing"},
    {NETFX_FAULT_DUP, false, 3, "frame sequence number 3 expected, this is a repeat of frame 2"},
    {NETFX_FAULT_DUP, true, 3, "frame sequence number 3 expected, this is a repeat of frame 2"},
    {NETFX_FAULT_SWAP, false, 2,
     "frame sequence number 2 expected, this is frame 3: 1 frame(s) before it missing"},
    {NETFX_FAULT_SWAP, true, 2,
     "frame sequence number 2 expected, this is frame 3: 1 frame(s) before it missing"},
};

START_TEST(frame_faults_rejected)
{
    const struct frame_fault_case *fc = &frame_fault_cases[_i];
    struct aamm_link_options so = base_opts(AAMM_LINK_SENDER, 1, SECRET, CLUSTER);
    struct aamm_link_options ro = base_opts(AAMM_LINK_RECEIVER, 2, SECRET, CLUSTER);
    struct netfx_proxy px;
    struct pair p;
    struct sink k = {0, 0, false, 0, 0, 0};
    struct gen g = {0, UINT32_MAX, false};
    struct aamm_link_stats rs;
    /* no sender heartbeat between the DATA frames: frame sequence number = transaction */
    so.heartbeat_ms = 2500;
    so.wire.compress_min = fc->lz4 ? 16 : UINT32_MAX;
    pair_open(&p, &so, &ro, false, &px);
    px.fault = fc->fault;
    px.fault_data = 2; /* DATA frames 0, 1 pass; 2 is dropped, doubled or swapped with 3 */
    ck_assert(pair_run(&p, 3000, both_ready));
    for (int t = 0; t < 6; t++) {
        if (gen_push(p.s, &g) != 0) { /* the receiver refused the link already */
            ck_assert_int_ge(t, 3);
            break;
        }
        for (int i = 0; i < 20; i++) { /* each transaction in its own frame */
            pair_round(&p, 5);
            sink_drain(&k, p.r, 1000);
        }
    }
    ck_assert(pair_run(&p, 2000, r_done));
    sink_drain(&k, p.r, 1000);
    ck_assert(px.faulted);
    ck_assert_int_ge(px.data_ab, 3);
    if (fc->lz4)
        ck_assert_int_ge(px.lz4_ab, 2);
    else
        ck_assert_int_eq(px.lz4_ab, 0);
    ck_assert_int_eq(aamm_link_state(p.r), AAMM_LINK_FAILED);
    ck_assert_int_eq(aamm_link_step(p.r), AAMM_EAUTH);
    ck_assert_msg(strstr(aamm_link_errmsg(p.r), "MAC check failed") != NULL, "%s",
                  aamm_link_errmsg(p.r));
    ck_assert_msg(strstr(aamm_link_errmsg(p.r), fc->msg) != NULL, "%s", aamm_link_errmsg(p.r));
    aamm_link_stats(p.r, &rs);
    ck_assert_uint_eq(rs.mac_failures, 1);
    ck_assert_uint_eq(rs.txns_received, (uint64_t)fc->committed);
    ck_assert_int_eq(k.committed, fc->committed);
    ck_assert(!k.open);
    pair_close(&p);
}
END_TEST

/* ====================================================================================
 * Back-pressure
 * ==================================================================================== */

/* A receiver that stops reading does not make the sender's memory grow past its bound, also
 * for one transaction of 200 MB (scaled) streamed change by change; once the receiver reads
 * again, the whole transaction arrives intact. */
START_TEST(backpressure_bounded)
{
    struct aamm_link_options so = base_opts(AAMM_LINK_SENDER, 1, SECRET, CLUSTER);
    struct aamm_link_options ro = base_opts(AAMM_LINK_RECEIVER, 2, SECRET, CLUSTER);
    struct aamm_memory_stats m0, m;
    struct pair p;
    const size_t bound = 2u << 20, vsize = 256u << 10;
    const long nch = aamm_test_scaled(800, 80); /* 800 x 256 KiB = 200 MiB */
    char *pool = malloc(4u << 20);
    uint64_t seed = 1;
    long sent = 0, got = 0, eagains = 0;
    uint64_t bytes_got = 0;
    struct aamm_transaction t = {1, 1, 5000, 5040, 1, NULL, 0};
    bool began = false, committed = false, got_commit = false;
    so.send_queue_bytes = bound;
    so.dead_after_ms = ro.dead_after_ms = 60000;
    for (size_t i = 0; i < (4u << 20); i++) /* incompressible text */
        pool[i] = (char)('!' + aamm_test_rand(&seed) % 90);
    pair_open(&p, &so, &ro, false, NULL);
    ck_assert(pair_run(&p, 3000, both_ready));
    aamm_memory_stats(&m0);
    aamm_memory_reset_high_water();
    /* phase 1: the receiver stops reading; the sender fills its queue and the socket */
    p.step_r = false;
    ck_assert_int_eq(aamm_link_send_begin(p.s, &t), 0);
    began = true;
    for (int64_t end = aamm_test_now_ms() + 1500; aamm_test_now_ms() < end;) {
        struct aamm_value vals[2] = {{AAMM_VALUE_TEXT, 1, "1"},
                                     {AAMM_VALUE_TEXT, (uint32_t)vsize,
                                      pool + ((size_t)sent * 4099) % ((4u << 20) - vsize)}};
        struct aamm_change ch = {
            .kind = AAMM_CHANGE_INSERT, .relation = &trel, .new_tuple = {2, vals}};
        char save = vals[1].data[vsize];
        int rc;
        vals[1].data[vsize] = '\0';
        rc = aamm_link_send_change(p.s, &ch);
        vals[1].data[vsize] = save;
        if (rc == AAMM_EAGAIN) {
            eagains++;
            pair_round(&p, 5);
            continue;
        }
        ck_assert_int_eq(rc, 0);
        sent++;
    }
    ck_assert_int_gt(eagains, 0);
    ck_assert_int_lt(sent, nch); /* it did stop */
    aamm_memory_stats(&m);
    /* the documented bound: queue, one frame, fixed per-link overhead (link.h) */
    fprintf(stderr, "backpressure: sender memory +%zu bytes (queue bound %zu, formula %zu)\n",
            m.high_water - m0.in_use, bound,
            (size_t)AAMM_LINK_SEND_MEMORY(bound, AAMM_WIRE_DEFAULT_FRAME_PAYLOAD));
    ck_assert_msg(
        m.high_water - m0.in_use <= AAMM_LINK_SEND_MEMORY(bound, AAMM_WIRE_DEFAULT_FRAME_PAYLOAD),
        "sender memory grew by %zu bytes (bound %zu, formula %zu)", m.high_water - m0.in_use, bound,
        (size_t)AAMM_LINK_SEND_MEMORY(bound, AAMM_WIRE_DEFAULT_FRAME_PAYLOAD));
    /* phase 2: the receiver reads again; everything arrives, memory stays bounded */
    p.step_r = true;
    while (!got_commit) {
        struct aamm_wire_event ev;
        if (sent < nch) {
            struct aamm_value vals[2] = {{AAMM_VALUE_TEXT, 1, "1"},
                                         {AAMM_VALUE_TEXT, (uint32_t)vsize,
                                          pool + ((size_t)sent * 4099) % ((4u << 20) - vsize)}};
            struct aamm_change ch = {
                .kind = AAMM_CHANGE_INSERT, .relation = &trel, .new_tuple = {2, vals}};
            char save = vals[1].data[vsize];
            int rc;
            vals[1].data[vsize] = '\0';
            rc = aamm_link_send_change(p.s, &ch);
            vals[1].data[vsize] = save;
            if (rc == 0)
                sent++;
            else
                ck_assert_int_eq(rc, AAMM_EAGAIN);
        } else if (!committed) {
            ck_assert_int_eq(aamm_link_send_commit(p.s, &t), 0);
            committed = true;
        }
        pair_round(&p, 1);
        while (aamm_link_recv(p.r, &ev) == 0) {
            if (ev.kind == AAMM_WIRE_EV_CHANGE) {
                const char *want = pool + ((size_t)got * 4099) % ((4u << 20) - vsize);
                ck_assert_uint_eq(ev.change.new_tuple.values[1].len, vsize);
                ck_assert(memcmp(ev.change.new_tuple.values[1].data, want, vsize) == 0);
                bytes_got += vsize;
                got++;
            } else if (ev.kind == AAMM_WIRE_EV_COMMIT) {
                got_commit = true;
            }
        }
        ck_assert_msg(aamm_link_state(p.s) == AAMM_LINK_READY, "%s", aamm_link_errmsg(p.s));
        ck_assert_msg(aamm_link_state(p.r) == AAMM_LINK_READY, "%s", aamm_link_errmsg(p.r));
    }
    (void)began;
    ck_assert_int_eq(got, nch);
    ck_assert_uint_eq(bytes_got, (uint64_t)nch * vsize);
    aamm_memory_stats(&m);
    /* sender's bound + receiver's input frame, payload and one change */
    fprintf(stderr, "backpressure: sender + receiver memory +%zu bytes while streaming\n",
            m.high_water - m0.in_use);
    ck_assert_msg(m.high_water - m0.in_use <
                      AAMM_LINK_SEND_MEMORY(bound, AAMM_WIRE_DEFAULT_FRAME_PAYLOAD) + (4u << 20),
                  "memory grew by %zu bytes while streaming %ld MiB", m.high_water - m0.in_use,
                  (long)(bytes_got >> 20));
    free(pool);
    pair_close(&p);
}
END_TEST

/* The receiver of single_value_streams: a child process (so that the parent's memory
 * statistics are the sender's alone) that dials @port, receives, and writes to @wfd the
 * length and CRC32C of the big value and the number of COMMITs; it dies with its parent. */
static void big_receiver(int port, int wfd)
{
    struct aamm_link_options ro = base_opts(AAMM_LINK_RECEIVER, 2, SECRET, CLUSTER);
    struct aamm_link *r;
    char ps[16];
    uint64_t res[3] = {0, 0, 0};
    (void)prctl(PR_SET_PDEATHSIG, SIGKILL);
    alarm(120);
    ro.dead_after_ms = 30000;
    snprintf(ps, sizeof ps, "%d", port);
    if (aamm_link_new(&r, &ro, NULL, 0) != 0 || aamm_link_connect(r, "127.0.0.1", ps) != 0)
        _exit(2);
    for (;;) {
        struct pollfd fd;
        struct aamm_wire_event ev;
        int n = 0, t = 100, rc;
        link_pollfd(r, &fd, &n, &t);
        if (n > 0)
            (void)poll(&fd, 1, t);
        if (aamm_link_step(r) != 0)
            break;
        while ((rc = aamm_link_recv(r, &ev)) == 0) {
            if (ev.kind == AAMM_WIRE_EV_CHANGE && ev.change.new_tuple.nvalues == 2) {
                res[0] = ev.change.new_tuple.values[1].len;
                res[1] = aamm_crc32c(0, ev.change.new_tuple.values[1].data, (size_t)res[0]);
            } else if (ev.kind == AAMM_WIRE_EV_COMMIT) {
                res[2]++;
                (void)aamm_link_ack(r, ev.txn.origin_node, ev.txn.end_lsn);
                if (write(wfd, res, sizeof res) != (ssize_t)sizeof res)
                    _exit(3);
            }
        }
        if (rc != AAMM_EAGAIN)
            break;
    }
    aamm_link_free(r);
    _exit(0);
}

/* One transaction with ONE text value of 200 MB (20 MB in the sanitizer pass) streams
 * through a sender whose memory stays within AAMM_LINK_SEND_MEMORY(): the value is queued a
 * frame at a time while the receiver (another process) reads, with back-pressure in the
 * middle of the value (AAMM_EAGAIN after part of it was queued); the receiver gets it
 * byte for byte (length and CRC32C) and acknowledges the transaction. */
START_TEST(single_value_streams)
{
    struct aamm_link_options so = base_opts(AAMM_LINK_SENDER, 1, SECRET, CLUSTER);
    const size_t bound = 4u << 20, vsize = (size_t)aamm_test_scaled(200l << 20, 20l << 20);
    const size_t block = 4u << 20;
    struct aamm_memory_stats m0, m;
    struct aamm_transaction t = {1, 1, 7000, 7040, 1, NULL, 0};
    struct aamm_link *s;
    uint64_t seed = 7, res[3] = {0, 0, 0};
    uint32_t crc;
    char *value = malloc(vsize + 1);
    int lfd, port, pfd[2], status = 0;
    long eagains = 0, calls = 0;
    size_t got = 0;
    pid_t pid;
    int64_t t0 = aamm_test_now_ms();
    ck_assert_ptr_nonnull(value);
    /* incompressible text: a random 4 MiB block (beyond LZ4's 64 KiB window) repeated */
    for (size_t i = 0; i < block; i++)
        value[i] = (char)('!' + aamm_test_rand(&seed) % 90);
    for (size_t off = block; off < vsize; off += block)
        memcpy(value + off, value, vsize - off < block ? vsize - off : block);
    value[vsize] = '\0';
    crc = aamm_crc32c(0, value, vsize);
    so.send_queue_bytes = bound;
    so.dead_after_ms = 30000;
    lfd = netfx_listen(&port);
    ck_assert_int_ge(lfd, 0);
    ck_assert_int_eq(pipe(pfd), 0);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        close(pfd[0]);
        big_receiver(port, pfd[1]);
    }
    close(pfd[1]);
    ck_assert_int_eq(fcntl(pfd[0], F_SETFL, O_NONBLOCK), 0);
    ck_assert_int_eq(aamm_link_new(&s, &so, NULL, 0), 0);
    for (int64_t end = aamm_test_now_ms() + 5000; aamm_link_state(s) != AAMM_LINK_READY;) {
        struct pollfd fd;
        int n = 0, tmo = 10;
        ck_assert_msg(aamm_test_now_ms() < end, "no handshake: %s", aamm_link_errmsg(s));
        if (aamm_link_state(s) == AAMM_LINK_IDLE) {
            int fd2 = netfx_accept(lfd);
            if (fd2 >= 0)
                ck_assert_int_eq(aamm_link_adopt_fd(s, fd2), 0);
            else
                usleep(2000);
            continue;
        }
        link_pollfd(s, &fd, &n, &tmo);
        if (n > 0)
            (void)poll(&fd, 1, tmo);
        ck_assert_msg(aamm_link_step(s) == 0, "%s", aamm_link_errmsg(s));
    }
    aamm_memory_stats(&m0);
    aamm_memory_reset_high_water();
    ck_assert_int_eq(aamm_link_send_begin(s, &t), 0);
    for (int phase = 0; phase < 3;) {
        struct pollfd fd;
        int n = 0, tmo = 20;
        ssize_t r;
        if (phase == 0) {
            struct aamm_value vals[2] = {{AAMM_VALUE_TEXT, 3, "big"},
                                         {AAMM_VALUE_TEXT, (uint32_t)vsize, value}};
            struct aamm_change ch = {
                .kind = AAMM_CHANGE_INSERT, .relation = &trel, .new_tuple = {2, vals}};
            int rc = aamm_link_send_change(s, &ch);
            calls++;
            if (rc == 0) {
                ck_assert_int_eq(aamm_link_send_commit(s, &t), 0);
                phase = 1;
            } else {
                ck_assert_msg(rc == AAMM_EAGAIN, "%s", aamm_link_errmsg(s));
                /* mid-value: the transaction cannot be committed yet */
                if (calls == 2)
                    ck_assert_int_eq(aamm_link_send_commit(s, &t), AAMM_ESTATE);
                eagains++;
            }
        }
        link_pollfd(s, &fd, &n, &tmo);
        if (n > 0)
            (void)poll(&fd, 1, phase == 0 ? tmo : 5);
        ck_assert_msg(aamm_link_step(s) == 0, "%s", aamm_link_errmsg(s));
        r = read(pfd[0], (char *)res + got, sizeof res - got);
        if (r > 0)
            got += (size_t)r;
        if (phase == 1 && got == sizeof res)
            phase = 2;
        if (phase == 2 && aamm_link_acked(s, 1) >= t.end_lsn)
            phase = 3;
        ck_assert_msg(aamm_test_now_ms() - t0 < 60000, "stuck in phase %d", phase);
    }
    aamm_memory_stats(&m);
    fprintf(stderr,
            "single value: %zu bytes in %" PRId64 " ms, %ld calls (%ld EAGAIN), sender "
            "memory +%zu bytes (queue bound %zu, formula %zu)\n",
            vsize, aamm_test_now_ms() - t0, calls, eagains, m.high_water - m0.in_use, bound,
            (size_t)AAMM_LINK_SEND_MEMORY(bound, AAMM_WIRE_DEFAULT_FRAME_PAYLOAD));
    ck_assert_uint_eq(res[0], vsize);
    ck_assert_uint_eq(res[1], crc);
    ck_assert_uint_eq(res[2], 1);
    ck_assert_int_gt(eagains, 0); /* back-pressure inside the value */
    ck_assert_msg(m.high_water - m0.in_use <=
                      AAMM_LINK_SEND_MEMORY(bound, AAMM_WIRE_DEFAULT_FRAME_PAYLOAD),
                  "sender memory grew by %zu bytes for a %zu-byte value (formula %zu)",
                  m.high_water - m0.in_use, vsize,
                  (size_t)AAMM_LINK_SEND_MEMORY(bound, AAMM_WIRE_DEFAULT_FRAME_PAYLOAD));
    aamm_link_free(s);
    kill(pid, SIGKILL);
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    close(pfd[0]);
    close(lfd);
    free(value);
}
END_TEST

/* ====================================================================================
 * Resume across cuts
 * ==================================================================================== */

/* 100,000 transactions of mixed size (a few above a frame) stream over loopback while the
 * test's proxy cuts the connection at random points (at least 20 cuts, some during the
 * handshake or inside a transaction). After every cut both hosts drop their links, the sender
 * restarts from an older confirmed position, and the new link skips what the receiver already
 * has: the receiver's applied sequence is exactly 0..N-1, in order, no gaps, no duplicates. */
START_TEST(stream_with_cuts)
{
    const long ntx = aamm_test_scaled(100000, 5000);
    const long want_cuts = 24;
    struct aamm_link_options so = base_opts(AAMM_LINK_SENDER, 1, SECRET, CLUSTER);
    struct aamm_link_options ro = base_opts(AAMM_LINK_RECEIVER, 2, SECRET, CLUSTER);
    struct netfx_proxy px;
    struct pair p;
    struct sink k = {0, 0, false, 0, 0, 0};
    struct gen g = {0, UINT32_MAX, false};
    long confirmed = -1; /* sender host's persisted confirmed transaction (lags acks) */
    long next_cut_at = ntx / (want_cuts + 1);
    long sessions = 1, discarded = 0;
    uint64_t skipped = 0;
    uint64_t seed = aamm_test_seed("stream_with_cuts");
    int64_t t_end = aamm_test_now_ms() + 150000;
    so.send_queue_bytes = 256 * 1024;
    so.handshake_timeout_ms = ro.handshake_timeout_ms = 2000;
    pair_open(&p, &so, &ro, false, &px);
    while (k.committed < ntx) {
        ck_assert_msg(aamm_test_now_ms() < t_end, "stuck at %ld of %ld (%ld cuts)", k.committed,
                      ntx, (long)px.cuts);
        /* sender host: push until the queue is full */
        if (aamm_link_state(p.s) == AAMM_LINK_READY) {
            int rc = 0;
            for (int i = 0; i < 2000 && g.i < ntx && rc == 0; i++)
                rc = gen_push(p.s, &g);
            if (g.i == ntx && aamm_link_state(p.s) == AAMM_LINK_READY)
                (void)0;
            {
                uint64_t a = aamm_link_acked(p.s, 1);
                if (a >= 1040 && aamm_test_rand(&seed) % 4 == 0)
                    confirmed = (long)((a - 1040) / 100); /* persisted only now and then */
            }
        }
        pair_round(&p, 2);
        sink_drain(&k, p.r, 100000);
        if (k.since_ack > 0 && aamm_link_state(p.r) == AAMM_LINK_READY) {
            aamm_link_ack(p.r, 1, k.durable);
            k.since_ack = 0;
        }
        /* the network: cut at random points */
        if ((long)px.cuts < want_cuts && px.a >= 0 &&
            (k.committed >= next_cut_at || aamm_test_rand(&seed) % 20000 == 0)) {
            netfx_proxy_cut(&px);
            /* at most ntx / (want_cuts + 1) apart: every seed gets its cuts in before
             * the stream ends (twice that let some seeds finish with 18) */
            next_cut_at = k.committed + 1 +
                          (long)(aamm_test_rand(&seed) % (uint64_t)(ntx / (want_cuts + 1)));
        }
        /* the hosts: any failed link is replaced; resume from the durable positions */
        if (done_state(p.s) || done_state(p.r)) {
            struct aamm_wire_position pos;
            char port[16];
            struct aamm_link_stats ss;
            aamm_link_stats(p.s, &ss);
            skipped += ss.txns_skipped;
            aamm_link_free(p.s);
            aamm_link_free(p.r);
            discarded += k.open;
            k.open = false; /* an incomplete transaction is discarded */
            pos.origin_node = 1;
            pos.lsn = k.durable;
            ro.resume = &pos;
            ro.nresume = k.committed > 0 ? 1 : 0;
            ck_assert_int_eq(aamm_link_new(&p.s, &so, NULL, 0), 0);
            ck_assert_int_eq(aamm_link_new(&p.r, &ro, NULL, 0), 0);
            p.dialer = p.s;
            p.listener = p.r;
            g.i = confirmed + 1; /* the slot re-sends from its confirmed position */
            g.j = UINT32_MAX;
            snprintf(port, sizeof port, "%d", px.port);
            if (px.a >= 0) { /* a leftover proxied connection: not a cut by the test */
                netfx_proxy_cut(&px);
                px.cuts--;
            }
            ck_assert_int_eq(aamm_link_connect(p.s, "127.0.0.1", port), 0);
            sessions++;
        }
    }
    ck_assert_int_eq(k.committed, ntx);
    ck_assert_int_eq(k.next, ntx);
    ck_assert_int_ge((long)px.cuts, 20);
    ck_assert_int_ge(sessions, 21);
    ck_assert_uint_gt(skipped, 0); /* restarts from behind the receiver were skipped */
    fprintf(stderr,
            "stream_with_cuts: %ld txns, %ld cuts, %ld sessions, %llu skipped on "
            "resume, %ld partial transactions discarded\n",
            ntx, (long)px.cuts, sessions, (unsigned long long)skipped, discarded);
    pair_close(&p);
}
END_TEST

/* ====================================================================================
 * TLS
 * ==================================================================================== */

static char tlsdir[64];

static int sh(const char *cmd)
{
    char full[2048];
    snprintf(full, sizeof full, "cd %s && (%s) >/dev/null 2>&1", tlsdir, cmd);
    return system(full);
}

static void make_certs(void)
{
    strcpy(tlsdir, "/tmp/aamm-tls-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tlsdir));
    ck_assert_int_eq(sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
                        "-keyout ca.key -out ca.pem -days 2 -subj /CN=aamm-test-ca"),
                     0);
    ck_assert_int_eq(sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
                        "-keyout ca2.key -out ca2.pem -days 2 -subj /CN=other-ca"),
                     0);
    ck_assert_int_eq(sh("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes "
                        "-keyout node.key -out node.csr -subj /CN=localhost && "
                        "printf 'subjectAltName=DNS:localhost\\n' > ext.cnf && "
                        "openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key "
                        "-CAcreateserial -out node.pem -days 2 -extfile ext.cnf"),
                     0);
}

static void remove_certs(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tlsdir);
    if (system(cmd) != 0)
        return;
}

static struct aamm_link_options tls_opts(int role, uint32_t me, const char *ca, char *bufs)
{
    struct aamm_link_options o = base_opts(role, me, SECRET, CLUSTER);
    snprintf(bufs, 128, "%s/%s", tlsdir, ca);
    snprintf(bufs + 128, 128, "%s/node.pem", tlsdir);
    snprintf(bufs + 256, 128, "%s/node.key", tlsdir);
    o.tls = true;
    o.tls_ca_file = bufs;
    o.tls_cert_file = bufs + 128;
    o.tls_key_file = bufs + 256;
    o.tls_server_name = "localhost";
    return o;
}

/* With TLS and certificates from the configured CA both ways, the link authenticates and
 * carries transactions (frames without the extra MAC); a peer whose certificate comes from
 * another CA is refused (AAMM_EAUTH, counted). */
START_TEST(tls_link)
{
    char b1[384], b2[384];
    struct aamm_link_options so, ro;
    struct pair p;
    struct sink k = {0, 0, false, 0, 0, 0};
    struct gen g = {0, UINT32_MAX, false};
    struct aamm_link_stats ss, rs;
    make_certs();
    so = tls_opts(AAMM_LINK_SENDER, 1, "ca.pem", b1);
    ro = tls_opts(AAMM_LINK_RECEIVER, 2, "ca.pem", b2);
    pair_open(&p, &so, &ro, false, NULL);
    ck_assert_msg(pair_run(&p, 5000, both_ready), "s: %s / r: %s", aamm_link_errmsg(p.s),
                  aamm_link_errmsg(p.r));
    for (int i = 0; i < 200; i++)
        ck_assert_int_eq(gen_push(p.s, &g), 0);
    for (int i = 0; i < 500 && k.committed < 200; i++) {
        pair_round(&p, 5);
        sink_drain(&k, p.r, 100000);
    }
    ck_assert_int_eq(k.committed, 200);
    pair_close(&p);

    /* the receiver trusts another CA: the sender's certificate is refused */
    so = tls_opts(AAMM_LINK_SENDER, 1, "ca.pem", b1);
    ro = tls_opts(AAMM_LINK_RECEIVER, 2, "ca2.pem", b2);
    pair_open(&p, &so, &ro, false, NULL);
    ck_assert(pair_run(&p, 5000, both_done));
    aamm_link_stats(p.s, &ss);
    aamm_link_stats(p.r, &rs);
    ck_assert_int_eq(aamm_link_state(p.r), AAMM_LINK_FAILED);
    ck_assert_int_eq(aamm_link_state(p.s), AAMM_LINK_FAILED);
    ck_assert_msg(strstr(aamm_link_errmsg(p.r), "TLS") != NULL, "%s", aamm_link_errmsg(p.r));
    ck_assert_uint_ge(ss.auth_failures + rs.auth_failures, 1);
    pair_close(&p);
    remove_certs();
}
END_TEST

static Suite *link_suite(void)
{
    Suite *s = suite_create("link");
    TCase *tc = aamm_test_tcase("handshake", 30);
    tcase_add_test(tc, handshake_resume_data_ack);
    tcase_add_test(tc, receiver_dials_and_heartbeats);
    tcase_add_test(tc, dead_peer_detected);
    suite_add_tcase(s, tc);
    tc = aamm_test_tcase("refusals", 30);
    tcase_add_loop_test(tc, auth_failures, 0, (int)(sizeof auth_cases / sizeof auth_cases[0]));
    tcase_add_test(tc, reflection_refused);
    tcase_add_test(tc, replayed_handshake_refused);
    tcase_add_test(tc, garbage_refused);
    tcase_add_test(tc, half_open_times_out);
    tcase_add_test(tc, oversize_before_auth_refused);
    tcase_add_test(tc, tampered_frame_rejected);
    tcase_add_loop_test(tc, frame_faults_rejected, 0,
                        (int)(sizeof frame_fault_cases / sizeof frame_fault_cases[0]));
    suite_add_tcase(s, tc);
    tc = aamm_test_tcase("flow", 150);
    tcase_add_test(tc, backpressure_bounded);
    tcase_add_test(tc, stream_with_cuts);
    suite_add_tcase(s, tc);
    tc = aamm_test_tcase("bigvalue", 60);
    tcase_add_test(tc, single_value_streams);
    suite_add_tcase(s, tc);
    tc = aamm_test_tcase("tls", 30);
    tcase_add_test(tc, tls_link);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    int rc;
    valbuf = malloc(2u << 20);
    rc = aamm_test_run(link_suite());
    free(valbuf);
    return rc;
}
