/*
 * test_link_capture.c: end to end: capture from a real PostgreSQL 15 slot on node A -> wire
 * -> authenticated link over loopback -> a receiver that records transactions. What the
 * receiver records equals what capture produced on A (and what was written there); acks
 * from the receiver move the slot. The "ack" case puts apply behind the receiver and
 * crashes the applying PostgreSQL server: acks never run ahead of what is durable there.
 */
#include "config.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <aamm/apply.h>
#include <aamm/capture.h>
#include <aamm/link.h>
#include <aamm/node.h>

#include "internal.h"
#include "netfx.h"
#include "pgfixture.h"
#include "testutil.h"
#include "wiregen.h"

#define SECRET "end to end secret, long enough"

static struct pgfx *fx;
static const uint32_t peer_of_1[] = {2}, peer_of_2[] = {1};

#define SQL(...) ck_assert_int_eq(pgfx_exec(fx, 0, __VA_ARGS__), 0)

/* ---- recorded transactions (deep copies, relations included) --------------------------- */

struct rec_change {
    struct aamm_change ch;
    struct aamm_relation *rels; /* owned copies; ch.relation / ch.relations point here */
    uint32_t nrels;
};

struct rec_txn {
    struct aamm_transaction txn;
    struct rec_change *changes;
    uint32_t n, cap;
};

struct recording {
    struct rec_txn *txns;
    uint32_t n, cap;
    struct rec_txn cur;
    bool open;
    struct rec_change *loose; /* non-transactional messages */
    uint32_t nloose;
};

static void copy_change(struct rec_change *d, const struct aamm_change *s)
{
    memset(d, 0, sizeof *d);
    d->ch.kind = s->kind;
    d->ch.old_kind = s->old_kind;
    d->ch.truncate_flags = s->truncate_flags;
    d->ch.transactional = s->transactional;
    d->ch.message_lsn = s->message_lsn;
    ck_assert_int_eq(aamm_tuple_copy(&d->ch.old_tuple, &s->old_tuple), 0);
    ck_assert_int_eq(aamm_tuple_copy(&d->ch.new_tuple, &s->new_tuple), 0);
    if (s->relation != NULL) {
        d->rels = calloc(1, sizeof *d->rels);
        d->nrels = 1;
        ck_assert_int_eq(aamm_relation_copy(&d->rels[0], s->relation), 0);
        d->ch.relation = &d->rels[0];
    }
    if (s->nrelations > 0) {
        d->rels = calloc(s->nrelations, sizeof *d->rels);
        d->nrels = s->nrelations;
        d->ch.nrelations = s->nrelations;
        d->ch.relations = calloc(s->nrelations, sizeof *d->ch.relations);
        for (uint32_t i = 0; i < s->nrelations; i++) {
            ck_assert_int_eq(aamm_relation_copy(&d->rels[i], s->relations[i]), 0);
            ((const struct aamm_relation **)d->ch.relations)[i] = &d->rels[i];
        }
    }
    if (s->prefix != NULL) {
        d->ch.prefix = strdup(s->prefix);
        d->ch.content = malloc(s->content_len + 1);
        memcpy(d->ch.content, s->content, s->content_len);
        d->ch.content[s->content_len] = '\0';
        d->ch.content_len = s->content_len;
    }
}

static void free_change(struct rec_change *c)
{
    aamm_tuple_clear(&c->ch.old_tuple);
    aamm_tuple_clear(&c->ch.new_tuple);
    for (uint32_t i = 0; i < c->nrels; i++)
        aamm_relation_clear(&c->rels[i]);
    free(c->rels);
    free((void *)c->ch.relations);
    free(c->ch.prefix);
    free(c->ch.content);
}

static void rec_begin(struct recording *r, const struct aamm_transaction *t)
{
    ck_assert(!r->open);
    memset(&r->cur, 0, sizeof r->cur);
    ck_assert_int_eq(aamm_transaction_copy(&r->cur.txn, t), 0);
    r->open = true;
}

static void rec_change(struct recording *r, const struct aamm_change *c)
{
    if (!r->open) {
        ck_assert(c->kind == AAMM_CHANGE_MESSAGE && !c->transactional);
        r->loose = realloc(r->loose, (r->nloose + 1) * sizeof *r->loose);
        copy_change(&r->loose[r->nloose++], c);
        return;
    }
    if (r->cur.n == r->cur.cap) {
        r->cur.cap = r->cur.cap ? 2 * r->cur.cap : 16;
        r->cur.changes = realloc(r->cur.changes, r->cur.cap * sizeof *r->cur.changes);
    }
    copy_change(&r->cur.changes[r->cur.n++], c);
}

static void rec_commit(struct recording *r, const struct aamm_transaction *t)
{
    ck_assert(r->open);
    r->cur.txn.end_lsn = t->end_lsn;
    r->cur.txn.commit_lsn = t->commit_lsn;
    r->cur.txn.commit_time = t->commit_time;
    if (r->n == r->cap) {
        r->cap = r->cap ? 2 * r->cap : 16;
        r->txns = realloc(r->txns, r->cap * sizeof *r->txns);
    }
    r->txns[r->n++] = r->cur;
    r->open = false;
}

static void rec_free(struct recording *r)
{
    for (uint32_t i = 0; i < r->n; i++) {
        for (uint32_t j = 0; j < r->txns[i].n; j++)
            free_change(&r->txns[i].changes[j]);
        free(r->txns[i].changes);
        aamm_transaction_clear(&r->txns[i].txn);
    }
    for (uint32_t j = 0; j < r->nloose; j++)
        free_change(&r->loose[j]);
    free(r->loose);
    free(r->txns);
}

/* ---- the two hosts ------------------------------------------------------------------ */

static struct aamm_link_options lopts(int role)
{
    struct aamm_link_options o;
    memset(&o, 0, sizeof o);
    o.role = role;
    o.node_id = role == AAMM_LINK_SENDER ? 1 : 2;
    o.cluster = "e2e";
    o.peer_ids = role == AAMM_LINK_SENDER ? peer_of_1 : peer_of_2;
    o.npeer_ids = 1;
    o.secret = (const uint8_t *)SECRET;
    o.secret_len = strlen(SECRET);
    return o;
}

static void add_fd(struct pollfd *fds, int *n, int fd, bool rd, bool wr)
{
    if (fd < 0)
        return;
    fds[*n].fd = fd;
    fds[*n].events = (short)((rd ? POLLIN : 0) | (wr ? POLLOUT : 0));
    fds[*n].revents = 0;
    (*n)++;
}

static int min_t(int a, int b)
{
    if (a < 0)
        return b;
    if (b < 0)
        return a;
    return a < b ? a : b;
}

static bool has_value(const struct rec_txn *t, const char *v)
{
    for (uint32_t j = 0; j < t->n; j++) {
        const struct aamm_tuple *tu = &t->changes[j].ch.new_tuple;
        for (uint32_t k = 0; k < tu->nvalues; k++)
            if (tu->values[k].kind == AAMM_VALUE_TEXT && strcmp(tu->values[k].data, v) == 0)
                return true;
    }
    return false;
}

static void md5_hex(const char *data, size_t len, char out[33])
{
    unsigned char d[16];
    unsigned int n = 16;
    EVP_Digest(data, len, d, &n, EVP_md5(), NULL);
    for (int i = 0; i < 16; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
}

/* Everything written on A — inserts, updates (unchanged TOAST, key change, REPLICA IDENTITY
 * FULL), deletes, truncate, transactional and non-transactional messages, a 3 MB value and
 * a 2,000-row transaction — arrives at the receiver exactly as capture produced it, in
 * order; acks confirm the slot up to the last transaction. */
START_TEST(capture_to_receiver)
{
    const char *pubs[] = {"p"};
    struct aamm_capture_options co;
    struct aamm_capture *cap;
    struct aamm_link_options so = lopts(AAMM_LINK_SENDER), ro = lopts(AAMM_LINK_RECEIVER);
    struct aamm_link *s, *r;
    struct recording sent = {0}, got = {0};
    int lfd, port, fd;
    char portstr[16], md5_big[33], *want_md5;
    bool have_ev = false, finished = false;
    struct aamm_capture_event cev;
    int64_t t_end;
    uint64_t last_end = 0;

    SQL("CREATE TABLE t (id int PRIMARY KEY, v text, n numeric, b bytea)");
    SQL("ALTER TABLE t ALTER v SET STORAGE EXTERNAL");
    SQL("CREATE TABLE f (id int PRIMARY KEY, x text)");
    SQL("ALTER TABLE f REPLICA IDENTITY FULL");
    SQL("CREATE PUBLICATION p FOR TABLE t, f");
    memset(&co, 0, sizeof co);
    co.conninfo = pgfx_conninfo(fx, 0);
    co.slot = "aamm_to_2";
    co.publications = pubs;
    co.npublications = 1;
    co.node_id = 1;
    ck_assert_int_eq(aamm_capture_new(&cap, &co, NULL, 0), 0);
    ck_assert_msg(aamm_capture_open(cap) == 0, "%s", aamm_capture_errmsg(cap));

    SQL("INSERT INTO t VALUES (1, 'a', 1.5, '\\x00ff'), (2, NULL, NULL, NULL)");
    SQL("UPDATE t SET n = 2 WHERE id = 1");
    SQL("INSERT INTO t SELECT 3, string_agg(md5(i::text), ''), 0, NULL "
        "FROM generate_series(1, 100000) i");
    SQL("UPDATE t SET n = 3 WHERE id = 3");   /* v stays: unchanged TOAST */
    SQL("UPDATE t SET id = 10 WHERE id = 2"); /* key change: old key */
    SQL("DELETE FROM t WHERE id = 1");
    SQL("INSERT INTO f VALUES (1, 'x'), (2, 'y')");
    SQL("UPDATE f SET x = 'z' WHERE id = 1"); /* full old row */
    SQL("DELETE FROM f WHERE id = 2");
    SQL("BEGIN; SELECT pg_logical_emit_message(true, 'aamm_ddl', 'hello'); "
        "INSERT INTO f VALUES (3, 'm'); COMMIT");
    SQL("SELECT pg_logical_emit_message(false, 'nontx', 'outside')");
    SQL("TRUNCATE t, f");
    SQL("INSERT INTO t SELECT g, 'row' || g, g, NULL FROM generate_series(100, 2099) g");
    SQL("INSERT INTO t VALUES (999999, 'the end', 0, NULL)");
    want_md5 = pgfx_value(fx, 0,
                          "SELECT md5(string_agg(md5(i::text), '')) "
                          "FROM generate_series(1, 100000) i");
    ck_assert_ptr_nonnull(want_md5);

    lfd = netfx_listen(&port);
    snprintf(portstr, sizeof portstr, "%d", port);
    ck_assert_int_eq(aamm_link_new(&s, &so, NULL, 0), 0);
    ck_assert_int_eq(aamm_link_new(&r, &ro, NULL, 0), 0);
    ck_assert_int_eq(aamm_link_connect(s, "127.0.0.1", portstr), 0);
    for (int i = 0; i < 1000 && (fd = netfx_accept(lfd)) < 0; i++)
        usleep(1000);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(aamm_link_adopt_fd(r, fd), 0);

    t_end = aamm_test_now_ms() + 60000;
    while (!finished) {
        struct pollfd fds[4];
        int n = 0, t = 20, ev;
        struct aamm_wire_event wev;
        ck_assert_msg(aamm_test_now_ms() < t_end, "timed out: %u transactions received", got.n);
        /* sender host: capture -> link, holding an event the link cannot take yet */
        while (aamm_link_state(s) == AAMM_LINK_READY) {
            int rc = 0;
            if (!have_ev) {
                rc = aamm_capture_next(cap, &cev);
                ck_assert_msg(rc == 0 || rc == AAMM_EAGAIN, "%s", aamm_capture_errmsg(cap));
                if (rc == AAMM_EAGAIN)
                    break;
                have_ev = true;
                rc = 0;
            }
            switch (cev.kind) {
            case AAMM_CAPTURE_BEGIN:
                rc = aamm_link_send_begin(s, cev.txn);
                if (rc == 0)
                    rec_begin(&sent, cev.txn);
                break;
            case AAMM_CAPTURE_CHANGE:
                rc = aamm_link_send_change(s, cev.change);
                if (rc == 0)
                    rec_change(&sent, cev.change);
                break;
            case AAMM_CAPTURE_COMMIT:
                rc = aamm_link_send_commit(s, cev.txn);
                if (rc == 0)
                    rec_commit(&sent, cev.txn);
                break;
            default: /* RELATION: the wire sends relations itself; PROGRESS: nothing to do */
                break;
            }
            if (rc == AAMM_EAGAIN)
                break;
            ck_assert_msg(rc == 0, "link: %s (%s, event %d)", aamm_link_errmsg(s), aamm_errname(rc),
                          (int)cev.kind);
            have_ev = false;
        }
        /* the acks confirm the slot */
        if (aamm_link_acked(s, 1) > aamm_capture_confirmed(cap))
            ck_assert_int_eq(aamm_capture_confirm(cap, aamm_link_acked(s, 1)), 0);
        ev = aamm_capture_events(cap);
        add_fd(fds, &n, aamm_capture_fd(cap), ev & AAMM_READ, ev & AAMM_WRITE);
        ev = aamm_link_events(s);
        add_fd(fds, &n, aamm_link_fd(s), ev & AAMM_READ, ev & AAMM_WRITE);
        ev = aamm_link_events(r);
        add_fd(fds, &n, aamm_link_fd(r), ev & AAMM_READ, ev & AAMM_WRITE);
        t = min_t(t, aamm_capture_timeout(cap));
        t = min_t(t, aamm_link_timeout(s));
        t = min_t(t, aamm_link_timeout(r));
        poll(fds, (nfds_t)n, t);
        if (!have_ev)
            ck_assert_msg(aamm_capture_step(cap) == 0, "%s", aamm_capture_errmsg(cap));
        ck_assert_msg(aamm_link_step(s) == 0, "%s", aamm_link_errmsg(s));
        ck_assert_msg(aamm_link_step(r) == 0, "%s", aamm_link_errmsg(r));
        /* receiver host: record, ack */
        while (aamm_link_recv(r, &wev) == 0) {
            if (wev.kind == AAMM_WIRE_EV_BEGIN) {
                rec_begin(&got, &wev.txn);
            } else if (wev.kind == AAMM_WIRE_EV_CHANGE) {
                struct aamm_change ch;
                ck_assert_int_eq(aamm_link_take_change(r, &ch), 0);
                rec_change(&got, &ch);
                aamm_change_clear(&ch);
            } else if (wev.kind == AAMM_WIRE_EV_COMMIT) {
                rec_commit(&got, &wev.txn);
                last_end = wev.txn.end_lsn;
                aamm_link_ack(r, 1, last_end);
                if (has_value(&got.txns[got.n - 1], "the end"))
                    finished = true;
            }
        }
    }
    /* let the ack reach the slot */
    for (int i = 0; i < 200 && aamm_capture_confirmed(cap) < last_end; i++) {
        aamm_link_step(r);
        aamm_link_step(s);
        if (aamm_link_acked(s, 1) > aamm_capture_confirmed(cap))
            aamm_capture_confirm(cap, aamm_link_acked(s, 1));
        aamm_capture_step(cap);
        usleep(5000);
    }
    ck_assert_uint_eq(aamm_capture_confirmed(cap), last_end);

    /* the receiver's record equals the sender's, transaction by transaction */
    ck_assert_uint_eq(got.n, sent.n);
    ck_assert_uint_ge(got.n, 13);
    for (uint32_t i = 0; i < got.n; i++) {
        ck_assert_msg(wg_txn_header_equal(&got.txns[i].txn, &sent.txns[i].txn), "txn %u", i);
        ck_assert_uint_eq(got.txns[i].txn.origin_node, 1);
        ck_assert_uint_eq(got.txns[i].n, sent.txns[i].n);
        for (uint32_t j = 0; j < got.txns[i].n; j++)
            ck_assert_msg(wg_change_equal(&got.txns[i].changes[j].ch, &sent.txns[i].changes[j].ch),
                          "txn %u change %u differs", i, j);
    }
    ck_assert_uint_eq(got.nloose, 1);
    ck_assert_str_eq(got.loose[0].ch.prefix, "nontx");
    ck_assert_str_eq(got.loose[0].ch.content, "outside");
    /* and what was written on A: spot checks of every kind */
    {
        bool big = false, unchanged = false, key = false, full = false, trunc = false, msg = false;
        uint32_t bulk = 0;
        for (uint32_t i = 0; i < got.n; i++) {
            for (uint32_t j = 0; j < got.txns[i].n; j++) {
                const struct aamm_change *c = &got.txns[i].changes[j].ch;
                if (c->kind == AAMM_CHANGE_INSERT &&
                    c->new_tuple.values[1].kind == AAMM_VALUE_TEXT &&
                    c->new_tuple.values[1].len == 3200000) {
                    md5_hex(c->new_tuple.values[1].data, 3200000, md5_big);
                    big = strcmp(md5_big, want_md5) == 0;
                }
                if (c->kind == AAMM_CHANGE_UPDATE && c->new_tuple.nvalues == 4 &&
                    c->new_tuple.values[1].kind == AAMM_VALUE_UNCHANGED)
                    unchanged = true;
                if (c->kind == AAMM_CHANGE_UPDATE && c->old_kind == AAMM_OLD_KEY &&
                    strcmp(c->old_tuple.values[0].data, "2") == 0 &&
                    strcmp(c->new_tuple.values[0].data, "10") == 0)
                    key = true;
                if (c->kind == AAMM_CHANGE_UPDATE && c->old_kind == AAMM_OLD_FULL &&
                    strcmp(c->old_tuple.values[1].data, "x") == 0)
                    full = true;
                if (c->kind == AAMM_CHANGE_TRUNCATE && c->nrelations == 2)
                    trunc = true;
                if (c->kind == AAMM_CHANGE_MESSAGE && c->transactional &&
                    strcmp(c->content, "hello") == 0)
                    msg = true;
            }
            if (got.txns[i].n == 2000)
                bulk++;
        }
        ck_assert(big);
        ck_assert(unchanged);
        ck_assert(key);
        ck_assert(full);
        ck_assert(trunc);
        ck_assert(msg);
        ck_assert_uint_eq(bulk, 1);
    }
    free(want_md5);
    rec_free(&sent);
    rec_free(&got);
    aamm_link_free(s);
    aamm_link_free(r);
    aamm_capture_free(cap);
    close(lfd);
}
END_TEST

/* ====================================================================================
 * SIGKILL of both agents, streaming from a real slot
 * ==================================================================================== */

static char kdir[64], klog[128], kconf[128];

static uint64_t read_u64(const char *path)
{
    char buf[64] = {0};
    FILE *f = fopen(path, "r");
    unsigned long long v = 0;
    if (f != NULL) {
        if (fgets(buf, sizeof buf, f) != NULL)
            v = strtoull(buf, NULL, 16);
        fclose(f);
    }
    return (uint64_t)v;
}

static void write_u64(const char *path, uint64_t v)
{
    char tmp[160];
    FILE *f;
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    f = fopen(tmp, "w");
    if (f == NULL)
        _exit(2);
    fprintf(f, "%016llx\n", (unsigned long long)v);
    fclose(f);
    rename(tmp, path); /* a SIGKILL leaves the old or the new value */
}

#define KREC 29 /* "%016llx %011ld\n" */

/* The receiving agent: its durable state is the applied log (data and position in one
 * write, like apply's origin progress in the same commit). */
static void kill_receiver(int lfd)
{
    int logfd = open(klog, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (logfd < 0)
        _exit(2);
    for (;;) {
        uint64_t durable = 0;
        struct aamm_link_options o = lopts(AAMM_LINK_RECEIVER);
        struct aamm_wire_position pos;
        struct aamm_link *l;
        struct pollfd pfd = {lfd, POLLIN, 0};
        long id = -1;
        int fd;
        {
            char rec[KREC + 1];
            int rfd = open(klog, O_RDONLY);
            off_t end = rfd >= 0 ? lseek(rfd, 0, SEEK_END) : 0;
            if (end >= KREC && pread(rfd, rec, KREC, end - KREC) == KREC)
                durable = strtoull(rec, NULL, 16);
            if (rfd >= 0)
                close(rfd);
        }
        pos.origin_node = 1;
        pos.lsn = durable;
        o.resume = &pos;
        o.nresume = 1;
        o.dead_after_ms = 2000;
        poll(&pfd, 1, 1000);
        fd = accept(lfd, NULL, NULL);
        if (fd < 0)
            continue;
        if (aamm_link_new(&l, &o, NULL, 0) != 0 || aamm_link_adopt_fd(l, fd) != 0)
            _exit(2);
        while (aamm_link_state(l) != AAMM_LINK_FAILED && aamm_link_state(l) != AAMM_LINK_CLOSED) {
            struct aamm_wire_event ev;
            struct pollfd lp = {aamm_link_fd(l), POLLIN, 0};
            if (aamm_link_events(l) & AAMM_WRITE)
                lp.events |= POLLOUT;
            poll(&lp, 1, 20);
            aamm_link_step(l);
            while (aamm_link_recv(l, &ev) == 0) {
                if (ev.kind == AAMM_WIRE_EV_BEGIN) {
                    id = -1;
                } else if (ev.kind == AAMM_WIRE_EV_CHANGE && ev.change.kind == AAMM_CHANGE_INSERT) {
                    id = strtol(ev.change.new_tuple.values[0].data, NULL, 10);
                } else if (ev.kind == AAMM_WIRE_EV_COMMIT) {
                    char rec[KREC + 8];
                    if (ev.txn.end_lsn <= durable)
                        continue; /* a duplicate: dropped by the durable position */
                    snprintf(rec, sizeof rec, "%016llx %011ld\n",
                             (unsigned long long)ev.txn.end_lsn, id);
                    if (write(logfd, rec, KREC) != KREC)
                        _exit(2);
                    durable = ev.txn.end_lsn;
                    aamm_link_ack(l, 1, durable);
                }
            }
        }
        aamm_link_free(l);
    }
}

/* The sending agent: capture from the slot at its persisted confirmed position, link to the
 * receiver; acks are persisted before the slot is confirmed. */
static void kill_sender(int port)
{
    const char *pubs[] = {"pk"};
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port);
    for (;;) {
        struct aamm_capture_options co;
        struct aamm_capture *cap = NULL;
        struct aamm_link_options so = lopts(AAMM_LINK_SENDER);
        struct aamm_link *l = NULL;
        struct aamm_capture_event cev;
        bool have = false;
        uint64_t confirmed = read_u64(kconf);
        memset(&co, 0, sizeof co);
        co.conninfo = pgfx_conninfo(fx, 0);
        co.slot = "aamm_to_2";
        co.publications = pubs;
        co.npublications = 1;
        co.node_id = 1;
        co.start_lsn = confirmed;
        so.dead_after_ms = 2000;
        if (aamm_capture_new(&cap, &co, NULL, 0) != 0 || aamm_capture_open(cap) != 0 ||
            aamm_link_new(&l, &so, NULL, 0) != 0 || aamm_link_connect(l, "127.0.0.1", portstr) != 0)
            goto retry; /* e.g. the killed walsender still holds the slot */
        for (;;) {
            struct pollfd fds[2];
            int n = 0, ev, rc = 0;
            if (aamm_link_state(l) == AAMM_LINK_FAILED || aamm_link_state(l) == AAMM_LINK_CLOSED)
                break;
            while (aamm_link_state(l) == AAMM_LINK_READY) {
                if (!have) {
                    rc = aamm_capture_next(cap, &cev);
                    if (rc != 0)
                        break;
                    have = true;
                }
                rc = 0;
                if (cev.kind == AAMM_CAPTURE_BEGIN)
                    rc = aamm_link_send_begin(l, cev.txn);
                else if (cev.kind == AAMM_CAPTURE_CHANGE)
                    rc = aamm_link_send_change(l, cev.change);
                else if (cev.kind == AAMM_CAPTURE_COMMIT)
                    rc = aamm_link_send_commit(l, cev.txn);
                if (rc != 0)
                    break;
                have = false;
            }
            if (rc < 0 && rc != AAMM_EAGAIN)
                break;
            if (aamm_link_acked(l, 1) > confirmed) {
                confirmed = aamm_link_acked(l, 1);
                write_u64(kconf, confirmed);
                aamm_capture_confirm(cap, confirmed);
            }
            ev = aamm_capture_events(cap);
            add_fd(fds, &n, aamm_capture_fd(cap), ev & AAMM_READ, ev & AAMM_WRITE);
            ev = aamm_link_events(l);
            add_fd(fds, &n, aamm_link_fd(l), ev & AAMM_READ, ev & AAMM_WRITE);
            poll(fds, (nfds_t)n, min_t(min_t(20, aamm_capture_timeout(cap)), aamm_link_timeout(l)));
            if (!have && aamm_capture_step(cap) != 0)
                break;
            aamm_link_step(l);
        }
    retry:
        aamm_link_free(l);
        aamm_capture_free(cap);
        usleep(100000); /* the host's reconnect backoff */
    }
}

static long klog_count(void)
{
    struct stat st;
    return stat(klog, &st) == 0 ? (long)(st.st_size / KREC) : 0;
}

/* Rows inserted on A (one per transaction) while both agents are SIGKILLed again and again;
 * they restart from their files (the receiver's applied log, the sender's persisted ack
 * position) and the real slot. The applied log holds every row exactly once, in commit
 * order. */
START_TEST(sigkill_agents_real_slot)
{
    const long rows = aamm_test_scaled(3000, 600);
    int lfd, port, kills_s = 0, kills_r = 0;
    pid_t sp = 0, rp = 0;
    uint64_t seed = aamm_test_seed("sigkill_agents_real_slot"), prev = 0;
    long inserted = 0, expect = 1;
    PGconn *c;
    FILE *f;
    char line[64];
    int64_t t_end;
    SQL("CREATE TABLE k (id int PRIMARY KEY)");
    SQL("CREATE PUBLICATION pk FOR TABLE k");
    SQL("SELECT pg_create_logical_replication_slot('aamm_to_2', 'pgoutput')");
    strcpy(kdir, "/tmp/aamm-e2ekill-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(kdir));
    snprintf(klog, sizeof klog, "%s/applied.log", kdir);
    snprintf(kconf, sizeof kconf, "%s/confirmed", kdir);
    lfd = netfx_listen(&port);
    c = pgfx_connect(fx, 0);
    ck_assert_ptr_nonnull(c);
    rp = aamm_test_spawn(kill_receiver, lfd);
    sp = aamm_test_spawn(kill_sender, port);
    for (int round = 0; round < 8; round++) {
        long batch = rows / 8;
        unsigned what = (unsigned)(aamm_test_rand(&seed) % 3);
        for (long i = 0; i < batch; i++) {
            ++inserted;
            ck_assert_int_eq(pgfx_exec_conn(c, "INSERT INTO k VALUES (%ld)", inserted), 0);
        }
        usleep((useconds_t)(50000 + aamm_test_rand(&seed) % 300000));
        if (what != 1) {
            aamm_test_kill(&sp);
            kills_s++;
        }
        if (what != 0) {
            aamm_test_kill(&rp);
            kills_r++;
        }
        if (rp == 0)
            rp = aamm_test_spawn(kill_receiver, lfd);
        if (sp == 0)
            sp = aamm_test_spawn(kill_sender, port);
    }
    while (inserted < rows) {
        ++inserted;
        ck_assert_int_eq(pgfx_exec_conn(c, "INSERT INTO k VALUES (%ld)", inserted), 0);
    }
    t_end = aamm_test_now_ms() + 60000;
    while (klog_count() < rows && aamm_test_now_ms() < t_end)
        usleep(50000);
    usleep(300000); /* a duplicate would show up as an extra line */
    aamm_test_kill(&sp);
    aamm_test_kill(&rp);
    PQfinish(c);
    close(lfd);
    ck_assert_int_ge(kills_s, 2);
    ck_assert_int_ge(kills_r, 2);
    f = fopen(klog, "r");
    ck_assert_ptr_nonnull(f);
    while (fgets(line, sizeof line, f) != NULL) {
        unsigned long long lsn = strtoull(line, NULL, 16);
        long id = strtol(line + 17, NULL, 10);
        ck_assert_msg(id == expect, "applied log: row %ld where %ld was expected", id, expect);
        ck_assert_uint_gt(lsn, prev);
        prev = lsn;
        expect++;
    }
    fclose(f);
    ck_assert_int_eq(expect - 1, rows);
    fprintf(stderr,
            "sigkill_agents_real_slot: %ld rows applied exactly once across %d sender "
            "and %d receiver kills\n",
            rows, kills_s, kills_r);
    {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf %s", kdir);
        if (system(cmd) != 0)
            ck_abort_msg("cleanup failed");
    }
}
END_TEST

/* ====================================================================================
 * Acks never run ahead of what is durable: capture -> link -> apply, PostgreSQL crashes
 * ==================================================================================== */

/* Node A (fixture node 0, id 1) is the source, node B (fixture node 1, id 2) applies with
 * synchronous_commit = off. B runs with wal_writer_delay = 10 s: an asynchronous commit
 * stays unflushed until apply itself asks for the flushed progress (or 10 s pass), long
 * enough for an ack taken from anything but the flushed position to be caught. */
#define ACK_CONF "wal_writer_delay = 10000ms\nautovacuum = off\n"

/* On B, read-only (no transaction id, so no commit flushes WAL behind apply's back): the
 * highest origin LSN among the COMMIT records of WAL flushed from @start on, and how far the
 * scan got. A COMMIT applied under an origin reads "...; origin: node N, lsn X/Y, at ...".
 * A record cut by the flush point ends the scan early (the next call goes on from @upto);
 * a scan that finds no complete record yet raises, which means "nothing new". */
static const char ack_fn_sql[] =
    "CREATE FUNCTION ack_flushed_origin(start pg_lsn, OUT upto pg_lsn, OUT remote pg_lsn, "
    "OUT flushed pg_lsn) LANGUAGE plpgsql AS $$ "
    "BEGIN "
    "  flushed := pg_current_wal_flush_lsn(); upto := start; "
    "  IF flushed > start THEN "
    "    SELECT coalesce(max(w.end_lsn), start), "
    "           max(substring(w.description FROM "
    "               'origin: node [0-9]+, lsn ([0-9A-F]+/[0-9A-F]+)')::pg_lsn) "
    "             FILTER (WHERE w.resource_manager = 'Transaction' AND w.record_type = 'COMMIT') "
    "      INTO upto, remote FROM pg_get_wal_records_info(start, flushed) w; "
    "  END IF; "
    "EXCEPTION WHEN others THEN upto := start; remote := NULL; "
    "END $$";

struct ack_host {
    int lfd, port;
    /* sending agent (A): capture -> sender link; the slot moves with the acks it gets */
    struct aamm_capture *cap;
    struct aamm_link *s;
    struct aamm_capture_event cev;
    bool have;
    uint64_t confirmed;  /* the sender's durable state: slot confirmed this far */
    uint64_t s_seen;     /* aamm_link_acked() last seen on this sender link */
    uint64_t acked_max;  /* the highest ack the sender ever received */
    long cur_max;        /* highest id in the transaction being captured */
    uint64_t *ends;      /* captured transactions in commit order: end LSN ... */
    long *maxids;        /* ... and the highest id written by it (and before it) */
    size_t ntx, captx;
    /* receiving agent (B): receiver link -> apply; acks only what apply reports flushed */
    struct aamm_apply *ap;
    struct aamm_link *r;
    struct aamm_change pend;
    bool have_pend;
    uint64_t last_ack; /* last ack sent on this receiver link */
    uint64_t max_ack;  /* highest ack ever sent */
    long nacks;
    /* the direct check: origin progress flushed on B, read from B's flushed WAL */
    PGconn *chk;
    uint64_t wal_scanned, flushed_remote, wal_flushed;
    long nchecks, nqueries;
};

static struct ack_host ah;

/* The writer on A: transactions of 1, 2, 3, 1, ... rows with ids 1, 2, 3, ... in commit
 * order, about one per millisecond, until it is killed. */
static void ack_writer(int unused)
{
    PGconn *c = PQconnectdb(pgfx_conninfo(fx, 0));
    long n = 0;
    (void)unused;
    if (PQstatus(c) != CONNECTION_OK)
        _exit(2);
    for (long j = 0;; j++) {
        long k = j % 3 + 1;
        char sql[128];
        PGresult *res;
        snprintf(sql, sizeof sql, "INSERT INTO k SELECT g FROM generate_series(%ld, %ld) g", n + 1,
                 n + k);
        res = PQexec(c, sql);
        if (PQresultStatus(res) != PGRES_COMMAND_OK)
            _exit(3);
        PQclear(res);
        n += k;
        usleep(1000);
    }
}

static uint64_t lsn_of(const char *text)
{
    uint64_t v = 0;
    if (text != NULL && *text != '\0')
        ck_assert_int_eq(aamm_lsn_parse(text, &v), 0);
    return v;
}

/* Read more of B's flushed WAL: ah.flushed_remote only grows. */
static void ack_scan_wal(void)
{
    char start[AAMM_LSN_BUFSIZE];
    const char *pv[1] = {aamm_lsn_format(ah.wal_scanned, start)};
    PGresult *res = PQexecParams(ah.chk, "SELECT upto, remote, flushed FROM ack_flushed_origin($1)",
                                 1, NULL, pv, NULL, NULL, 0);
    ck_assert_msg(PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1,
                  "reading B's flushed WAL: %s", PQerrorMessage(ah.chk));
    ah.nqueries++;
    if (lsn_of(PQgetvalue(res, 0, 0)) > ah.wal_scanned)
        ah.wal_scanned = lsn_of(PQgetvalue(res, 0, 0));
    if (!PQgetisnull(res, 0, 1) && lsn_of(PQgetvalue(res, 0, 1)) > ah.flushed_remote)
        ah.flushed_remote = lsn_of(PQgetvalue(res, 0, 1));
    ah.wal_flushed = lsn_of(PQgetvalue(res, 0, 2));
    PQclear(res);
}

/* An ack position @lsn (@what: who holds it) is at or below the origin progress flushed on
 * B. The ack was taken before this reads B and the flushed progress only grows, so an ack
 * above it is a definite bug, not a race. */
static void ack_check(uint64_t lsn, const char *what)
{
    char a[AAMM_LSN_BUFSIZE], f[AAMM_LSN_BUFSIZE], w[AAMM_LSN_BUFSIZE];
    ah.nchecks++;
    if (lsn <= ah.flushed_remote)
        return;
    ack_scan_wal();
    ck_assert_msg(lsn <= ah.flushed_remote,
                  "%s %s runs ahead of the origin progress flushed on B (%s; B's WAL flushed to "
                  "%s)",
                  what, aamm_lsn_format(lsn, a), aamm_lsn_format(ah.flushed_remote, f),
                  aamm_lsn_format(ah.wal_flushed, w));
}

/* The sending agent takes the receiver's acks: checked, then confirmed to the slot. */
static void ack_sender_acks(void)
{
    uint64_t a = aamm_link_acked(ah.s, 1);
    if (a == ah.s_seen)
        return;
    ah.s_seen = a;
    ack_check(a, "an ack received by the sender");
    if (a > ah.acked_max)
        ah.acked_max = a;
    if (a > ah.confirmed) {
        ck_assert_msg(aamm_capture_confirm(ah.cap, a) == 0, "%s", aamm_capture_errmsg(ah.cap));
        ah.confirmed = a;
    }
}

static struct aamm_link_options ack_lopts(int role)
{
    struct aamm_link_options o = lopts(role);
    o.dead_after_ms = 30000; /* the loop stands still while B restarts */
    o.heartbeat_ms = 500;
    return o;
}

/* (Re)connect the agents: the sender's capture starts at its confirmed position (the slot
 * may still be held by the walsender of a capture just freed: retry), the receiver resumes
 * from what apply reports flushed. */
static void ack_connect(void)
{
    const char *pubs[] = {"pk"};
    struct aamm_link_options so = ack_lopts(AAMM_LINK_SENDER), ro = ack_lopts(AAMM_LINK_RECEIVER);
    struct aamm_wire_position pos;
    char portstr[16];
    int fd = -1;
    int64_t t_end = aamm_test_now_ms() + 30000;
    for (;;) {
        struct aamm_capture_options co;
        int rc;
        memset(&co, 0, sizeof co);
        co.conninfo = pgfx_conninfo(fx, 0);
        co.slot = "aamm_to_2";
        co.publications = pubs;
        co.npublications = 1;
        co.node_id = 1;
        co.start_lsn = ah.confirmed;
        ck_assert_int_eq(aamm_capture_new(&ah.cap, &co, NULL, 0), 0);
        rc = aamm_capture_open(ah.cap);
        if (rc == 0)
            break;
        ck_assert_msg(rc == AAMM_EBUSY && aamm_test_now_ms() < t_end, "capture: %s",
                      aamm_capture_errmsg(ah.cap));
        aamm_capture_free(ah.cap);
        ah.cap = NULL;
        usleep(50000);
    }
    ah.have = false;
    snprintf(portstr, sizeof portstr, "%d", ah.port);
    ck_assert_int_eq(aamm_link_new(&ah.s, &so, NULL, 0), 0);
    ck_assert_int_eq(aamm_link_connect(ah.s, "127.0.0.1", portstr), 0);
    for (int i = 0; i < 2000 && (fd = netfx_accept(ah.lfd)) < 0; i++)
        usleep(1000);
    ck_assert_int_ge(fd, 0);
    pos.origin_node = 1;
    pos.lsn = aamm_apply_flushed(ah.ap);
    ro.resume = &pos;
    ro.nresume = 1;
    ck_assert_int_eq(aamm_link_new(&ah.r, &ro, NULL, 0), 0);
    ck_assert_int_eq(aamm_link_adopt_fd(ah.r, fd), 0);
    ah.last_ack = pos.lsn;
    ah.s_seen = 0;
}

static void ack_new_apply(void)
{
    struct aamm_apply_options o;
    aamm_apply_options_init(&o);
    o.conninfo = pgfx_conninfo(fx, 1);
    o.local_node = 2;
    o.source_node = 1;
    o.synchronous_commit_off = true;
    ck_assert_int_eq(aamm_apply_new(&ah.ap, &o, NULL, 0), 0);
    ah.have_pend = false;
}

/* The receiving agent gives up its links and apply handle (it restarts with its node). */
static void ack_drop_agents(void)
{
    if (ah.have_pend)
        aamm_change_clear(&ah.pend);
    ah.have_pend = false;
    aamm_link_free(ah.r);
    aamm_link_free(ah.s);
    aamm_capture_free(ah.cap);
    aamm_apply_free(ah.ap);
    ah.r = ah.s = NULL;
    ah.cap = NULL;
    ah.ap = NULL;
}

/* One round of both hosts' loops. Returns true when the receiver sent an ack. */
static bool ack_iter(void)
{
    struct pollfd fds[4];
    int n = 0, t = 20, ev, rc;
    struct aamm_wire_event wev;
    bool acked = false;
    uint64_t f;

    /* sending agent: capture -> link, recording each transaction's end LSN and ids */
    while (aamm_link_state(ah.s) == AAMM_LINK_READY) {
        if (!ah.have) {
            rc = aamm_capture_next(ah.cap, &ah.cev);
            ck_assert_msg(rc == 0 || rc == AAMM_EAGAIN, "%s", aamm_capture_errmsg(ah.cap));
            if (rc == AAMM_EAGAIN)
                break;
            ah.have = true;
        }
        rc = 0;
        if (ah.cev.kind == AAMM_CAPTURE_BEGIN) {
            rc = aamm_link_send_begin(ah.s, ah.cev.txn);
            if (rc == 0)
                ah.cur_max = 0;
        } else if (ah.cev.kind == AAMM_CAPTURE_CHANGE) {
            rc = aamm_link_send_change(ah.s, ah.cev.change);
            if (rc == 0 && ah.cev.change->kind == AAMM_CHANGE_INSERT) {
                long id = strtol(ah.cev.change->new_tuple.values[0].data, NULL, 10);
                if (id > ah.cur_max)
                    ah.cur_max = id;
            }
        } else if (ah.cev.kind == AAMM_CAPTURE_COMMIT) {
            rc = aamm_link_send_commit(ah.s, ah.cev.txn);
            if (rc == 0 && (ah.ntx == 0 || ah.cev.txn->end_lsn > ah.ends[ah.ntx - 1])) {
                if (ah.ntx == ah.captx) {
                    ah.captx = ah.captx ? 2 * ah.captx : 1024;
                    ah.ends = realloc(ah.ends, ah.captx * sizeof *ah.ends);
                    ah.maxids = realloc(ah.maxids, ah.captx * sizeof *ah.maxids);
                    ck_assert(ah.ends != NULL && ah.maxids != NULL);
                }
                ck_assert_int_eq(ah.cur_max, (ah.ntx ? ah.maxids[ah.ntx - 1] : 0) + 1 +
                                                 (long)(ah.ntx % 3));
                ah.ends[ah.ntx] = ah.cev.txn->end_lsn;
                ah.maxids[ah.ntx++] = ah.cur_max;
            }
        }
        if (rc == AAMM_EAGAIN)
            break;
        ck_assert_msg(rc == 0, "sender: %s (%s)", aamm_link_errmsg(ah.s), aamm_errname(rc));
        ah.have = false;
    }
    ack_sender_acks();

    ev = aamm_capture_events(ah.cap);
    add_fd(fds, &n, aamm_capture_fd(ah.cap), ev & AAMM_READ, ev & AAMM_WRITE);
    ev = aamm_link_events(ah.s);
    add_fd(fds, &n, aamm_link_fd(ah.s), ev & AAMM_READ, ev & AAMM_WRITE);
    ev = aamm_link_events(ah.r);
    add_fd(fds, &n, aamm_link_fd(ah.r), ev & AAMM_READ, ev & AAMM_WRITE);
    ev = aamm_apply_events(ah.ap);
    add_fd(fds, &n, aamm_apply_fd(ah.ap), ev & AAMM_READ, ev & AAMM_WRITE);
    t = min_t(t, aamm_capture_timeout(ah.cap));
    t = min_t(t, aamm_link_timeout(ah.s));
    t = min_t(t, aamm_link_timeout(ah.r));
    t = min_t(t, aamm_apply_timeout(ah.ap));
    poll(fds, (nfds_t)n, t);
    if (!ah.have)
        ck_assert_msg(aamm_capture_step(ah.cap) == 0, "%s", aamm_capture_errmsg(ah.cap));
    ck_assert_msg(aamm_link_step(ah.s) == 0, "sender: %s", aamm_link_errmsg(ah.s));
    ck_assert_msg(aamm_link_step(ah.r) == 0, "receiver: %s", aamm_link_errmsg(ah.r));
    ck_assert_msg(aamm_apply_step(ah.ap) == 0, "%s", aamm_apply_errmsg(ah.ap));

    /* receiving agent: link -> apply (a change apply cannot queue yet waits) */
    for (;;) {
        if (ah.have_pend) {
            rc = aamm_apply_change(ah.ap, &ah.pend);
            if (rc == AAMM_EAGAIN)
                break;
            ck_assert_msg(rc == 0, "%s", aamm_apply_errmsg(ah.ap));
            ah.have_pend = false;
        }
        rc = aamm_link_recv(ah.r, &wev);
        if (rc == AAMM_EAGAIN)
            break;
        ck_assert_msg(rc == 0, "receiver: %s", aamm_link_errmsg(ah.r));
        if (wev.kind == AAMM_WIRE_EV_BEGIN) {
            ck_assert_msg(aamm_apply_begin(ah.ap, &wev.txn) == 0, "%s", aamm_apply_errmsg(ah.ap));
        } else if (wev.kind == AAMM_WIRE_EV_CHANGE) {
            ck_assert_int_eq(aamm_link_take_change(ah.r, &ah.pend), 0);
            ah.have_pend = true;
        } else if (wev.kind == AAMM_WIRE_EV_COMMIT) {
            ck_assert_msg(aamm_apply_commit(ah.ap, &wev.txn) == 0, "%s", aamm_apply_errmsg(ah.ap));
        }
    }
    /* ... and acks exactly what apply reports flushed, nothing else */
    f = aamm_apply_flushed(ah.ap);
    if (aamm_link_state(ah.r) == AAMM_LINK_READY && f > ah.last_ack) {
        ck_assert_int_eq(aamm_link_ack(ah.r, 1, f), 0);
        ah.last_ack = f;
        if (f > ah.max_ack)
            ah.max_ack = f;
        ah.nacks++;
        ack_check(f, "an ack sent by the receiver");
        acked = true;
    }
    return acked;
}

/* After B came back: its origin progress covers every ack sent or received, and every row
 * of every transaction at or below those acks is there. */
/* The lowest id in 1..@m missing on B (0: none). */
static long ack_first_missing(long m)
{
    return pgfx_value_long(fx, 1, 0,
                           "SELECT min(g) FROM generate_series(1, %ld) g "
                           "WHERE NOT EXISTS (SELECT 1 FROM k WHERE id = g)",
                           m);
}

static void ack_check_recovered(int crash)
{
    uint64_t must = ah.max_ack, prog;
    char *v, a[AAMM_LSN_BUFSIZE], p[AAMM_LSN_BUFSIZE], r[AAMM_LSN_BUFSIZE], sg[AAMM_LSN_BUFSIZE];
    long m = 0, have;
    if (ah.acked_max > must)
        must = ah.acked_max;
    if (ah.confirmed > must)
        must = ah.confirmed;
    v = pgfx_value(fx, 1, "SELECT pg_replication_origin_progress('aamm_from_1', false)");
    prog = lsn_of(v);
    free(v);
    ck_assert_msg(prog >= must,
                  "crash %d: B recovered its origin progress to %s, but %s was acked "
                  "(receiver sent %s, sender got %s)",
                  crash, aamm_lsn_format(prog, p), aamm_lsn_format(must, a),
                  aamm_lsn_format(ah.max_ack, r), aamm_lsn_format(ah.acked_max, sg));
    for (size_t i = 0; i < ah.ntx && ah.ends[i] <= must; i++)
        m = ah.maxids[i];
    have = pgfx_value_long(fx, 1, -1, "SELECT count(*) FROM k WHERE id <= %ld", m);
    ck_assert_msg(have == m,
                  "crash %d: %ld of the %ld rows acked are on B after the restart (first missing: "
                  "%ld)",
                  crash, have, m, ack_first_missing(m));
}

/* Crash B's PostgreSQL (SIGKILL of the postmaster) right after an ack went out, restart it
 * and check what it recovered. With @agents_restart the receiving agent restarts too (new
 * apply handle and links, the sender resumes from the receiver's position and its slot);
 * otherwise the agents live on and apply reconnects by itself. */
static void ack_crash(int crash, bool agents_restart)
{
    /* the ack reaches the sender, which confirms the slot (only the links step: apply
     * must not get the chance to flush anything more) */
    for (int i = 0; i < 500 && aamm_link_acked(ah.s, 1) < ah.last_ack; i++) {
        struct pollfd p = {aamm_link_fd(ah.s), POLLIN, 0};
        aamm_link_step(ah.r);
        poll(&p, 1, 2);
        aamm_link_step(ah.s);
    }
    ack_sender_acks();
    ck_assert_int_eq(pgfx_crash_node(fx, 1), 0);
    PQfinish(ah.chk);
    ah.chk = NULL;
    if (agents_restart)
        ack_drop_agents();
    ck_assert_int_eq(pgfx_start_node(fx, 1), 0);
    ack_check_recovered(crash);
    ah.chk = pgfx_connect(fx, 1);
    ck_assert_ptr_nonnull(ah.chk);
    if (agents_restart) {
        ack_new_apply();
        ack_connect();
    }
}

/* The body of both crash tests. Crashes come 0.7-1.5 s apart, right after an ack reached
 * the sender, preferably while apply has committed transactions it does not yet know to be
 * flushed (aamm_apply_progress() > aamm_apply_flushed()) or transactions in flight (it then
 * puts off reading the flushed progress): the moments a wrong ack or a lost commit shows. @agents_restart: the receiving agent restarts with its node each time
 * (new apply handle and links); otherwise the agents live on and apply reconnects. */
static void ack_run(const char *name, bool agents_restart)
{
    const int crashes = (int)aamm_test_scaled(5, 3);
    uint64_t seed = aamm_test_seed(name), last_end;
    pid_t wp;
    long rows, nrows;
    int64_t t0 = aamm_test_now_ms(), t_end, next_crash;
    int crash = 0, unflushed = 0;
    char err[1024], e[AAMM_LSN_BUFSIZE], g[AAMM_LSN_BUFSIZE];
    PGconn *c;

    memset(&ah, 0, sizeof ah);
    SQL("CREATE TABLE k (id int PRIMARY KEY)");
    SQL("CREATE PUBLICATION pk FOR TABLE k");
    SQL("SELECT pg_create_logical_replication_slot('aamm_to_2', 'pgoutput')");
    c = pgfx_connect(fx, 1);
    ck_assert_ptr_nonnull(c);
    ck_assert_msg(aamm_node_install(c, err, sizeof err) == 0, "%s", err);
    ck_assert_int_eq(pgfx_exec_conn(c, "CREATE TABLE k (id int PRIMARY KEY)"), 0);
    ck_assert_msg(aamm_node_replicate_table(c, "public", "k", NULL, NULL, err, sizeof err) == 0,
                  "%s", err);
    ck_assert_int_eq(pgfx_exec_conn(c, "CREATE EXTENSION pg_walinspect"), 0);
    ck_assert_int_eq(pgfx_exec_conn(c, "%s", ack_fn_sql), 0);
    PQfinish(c);
    ah.chk = pgfx_connect(fx, 1);
    ck_assert_ptr_nonnull(ah.chk);
    {
        char *v = pgfx_value(fx, 1, "SELECT pg_current_wal_flush_lsn()");
        ah.wal_scanned = lsn_of(v);
        free(v);
    }
    ah.lfd = netfx_listen(&ah.port);
    ack_new_apply();
    ack_connect();
    wp = aamm_test_spawn(ack_writer, 0);

    /* crash after 0.7-1.5 s of streaming each time, right after an ack went out */
    next_crash = aamm_test_now_ms() + 700 + (int64_t)(aamm_test_rand(&seed) % 800);
    while (crash < crashes) {
        ck_assert_msg(aamm_test_now_ms() < t0 + 90000, "timed out before crash %d", crash);
        int64_t now;
        if (!ack_iter() || (now = aamm_test_now_ms()) < next_crash)
            continue;
        if (aamm_apply_progress(ah.ap) > aamm_apply_flushed(ah.ap) ||
            aamm_apply_pending(ah.ap) > 0 || now >= next_crash + 500) {
            ck_assert_msg(waitpid(wp, NULL, WNOHANG) == 0, "the writer on A stopped");
            if (aamm_apply_progress(ah.ap) > aamm_apply_flushed(ah.ap))
                unflushed++;
            ack_crash(crash, agents_restart);
            crash++;
            next_crash = aamm_test_now_ms() + 700 + (int64_t)(aamm_test_rand(&seed) % 800);
        }
    }
    /* stream a little more, then stop the writer and let everything arrive and be acked */
    while (aamm_test_now_ms() < next_crash)
        ack_iter();
    aamm_test_kill(&wp);
    rows = pgfx_value_long(fx, 0, -1, "SELECT count(*) FROM k");
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1, "SELECT max(id) FROM k"), rows);
    t_end = aamm_test_now_ms() + 60000;
    while (ah.ntx == 0 || ah.maxids[ah.ntx - 1] < rows || ah.confirmed < ah.ends[ah.ntx - 1]) {
        ck_assert_msg(aamm_test_now_ms() < t_end,
                      "timed out: %ld of %ld rows captured, slot confirmed to %s of %s",
                      ah.ntx ? ah.maxids[ah.ntx - 1] : 0, rows, aamm_lsn_format(ah.confirmed, e),
                      aamm_lsn_format(ah.ntx ? ah.ends[ah.ntx - 1] : 0, g));
        ack_iter();
    }
    last_end = ah.ends[ah.ntx - 1];
    ck_assert_uint_eq(ah.maxids[ah.ntx - 1], (uint64_t)rows);
    ck_assert_uint_eq(ah.confirmed, last_end);
    ck_assert_uint_eq(ah.max_ack, last_end);
    ck_assert_uint_eq(aamm_apply_flushed(ah.ap), last_end);
    /* the direct check saw the last transaction in B's flushed WAL (it reads it right) */
    ack_scan_wal();
    ck_assert_uint_eq(ah.flushed_remote, last_end);

    nrows = rows;
    ck_assert_int_ge(nrows, 1000);
    {
        char want[96], *got;
        snprintf(want, sizeof want, "%ld:%ld:1:%ld", nrows, nrows, nrows);
        got = pgfx_value(fx, 1,
                         "SELECT count(*) || ':' || count(DISTINCT id) || ':' || min(id) || ':' || "
                         "max(id) FROM k");
        ck_assert_ptr_nonnull(got);
        ck_assert_str_eq(got, want);
        free(got);
    }
    ck_assert_int_eq(pgfx_value_long(fx, 1, -1, "SELECT count(*) FROM aamm.conflict_log"), 0);
    {
        char *v = pgfx_value(fx, 1, "SELECT pg_replication_origin_progress('aamm_from_1', false)");
        ck_assert_uint_eq(lsn_of(v), last_end);
        free(v);
    }
    ck_assert_int_gt(ah.nacks, 20);
    fprintf(stderr,
            "%s: %ld rows in %zu transactions, %d crashes of B (%d with commits not yet "
            "known flushed), %ld acks, %ld ack checks (%ld WAL reads), %.1f s\n",
            name, nrows, ah.ntx, crashes, unflushed, ah.nacks, ah.nchecks, ah.nqueries,
            (double)(aamm_test_now_ms() - t0) / 1000.0);
    ack_drop_agents();
    PQfinish(ah.chk);
    close(ah.lfd);
    free(ah.ends);
    free(ah.maxids);
}

/* An ack never runs ahead of what is durable, and acked data survives a crash of the
 * applying PostgreSQL server. A writer inserts numbered rows on A; capture -> link -> apply
 * (synchronous_commit = off) carries them to B; the receiving host acks only what
 * aamm_apply_flushed() reports, the sender confirms its slot with what it receives. Every ack
 * sent and every ack received is checked against the origin progress flushed on B, read
 * from B's flushed WAL. B's postmaster is SIGKILLed 5 times (scaled, at least 3) right
 * after an ack reached the sender; each time B's origin progress covers every ack and every
 * row they cover is there; the receiving agent then restarts (new apply handle, new links:
 * the sender resumes from the receiver's position and its slot). At the end every row
 * written on A is on B exactly once and no conflict was logged. */
START_TEST(ack_durable_pg_crash)
{
    ack_run("ack_durable_pg_crash", true);
}
END_TEST

/* The same with the agents living on: the apply handle reconnects to the restarted server
 * by itself (connection loss is transient, apply.h) and must neither lose nor skip what
 * the crash took back. Under synchronous_commit = off a server crash can take back commits
 * not yet flushed; apply keeps a committed transaction until the flushed position passes
 * it and, finding the origin behind after reconnecting, applies those again. (Before,
 * apply retired a transaction once it committed, and the next one committed past the gap:
 * "crash 3: 8021 of the 8059 rows acked are on B after the restart (first missing:
 * 6638)".) */
START_TEST(apply_kept_across_pg_crash)
{
    ack_run("apply_kept_across_pg_crash", false);
}
END_TEST

static void setup_ack(void)
{
    fx = pgfx_start(2, ACK_CONF);
    ck_assert_ptr_nonnull(fx);
}

static void setup(void)
{
    fx = pgfx_start(1, "logical_decoding_work_mem = 64MB\n");
    ck_assert_ptr_nonnull(fx);
}

static void teardown(void)
{
    pgfx_destroy(fx);
}

int main(void)
{
    Suite *s = suite_create("link_capture");
    TCase *tc = aamm_test_tcase("e2e", 90);
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, capture_to_receiver);
    tcase_add_test(tc, sigkill_agents_real_slot);
    suite_add_tcase(s, tc);
    tc = aamm_test_tcase("ack", 120);
    tcase_add_checked_fixture(tc, setup_ack, teardown);
    tcase_add_test(tc, ack_durable_pg_crash);
    tcase_add_test(tc, apply_kept_across_pg_crash);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
