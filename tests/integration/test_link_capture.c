/*
 * test_link_capture.c: end to end without apply: capture from a real PostgreSQL 15 slot on
 * node A -> wire -> authenticated link over loopback -> a receiver that records
 * transactions. What the receiver records equals what capture produced on A (and what was
 * written there); acks from the receiver move the slot.
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

#include <aamm/capture.h>
#include <aamm/link.h>

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
    ck_assert_int_eq(aamm_capture_new(&cap, &co), 0);
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
    ck_assert_int_eq(aamm_link_new(&s, &so), 0);
    ck_assert_int_eq(aamm_link_new(&r, &ro), 0);
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
                ck_assert_msg(rc >= 0, "%s", aamm_capture_errmsg(cap));
                if (rc == 0)
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
        add_fd(fds, &n, aamm_capture_fd(cap), ev & AAMM_CAPTURE_READ, ev & AAMM_CAPTURE_WRITE);
        ev = aamm_link_events(s);
        add_fd(fds, &n, aamm_link_fd(s), ev & AAMM_LINK_READ, ev & AAMM_LINK_WRITE);
        ev = aamm_link_events(r);
        add_fd(fds, &n, aamm_link_fd(r), ev & AAMM_LINK_READ, ev & AAMM_LINK_WRITE);
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
        if (aamm_link_new(&l, &o) != 0 || aamm_link_adopt_fd(l, fd) != 0)
            _exit(2);
        while (aamm_link_state(l) != AAMM_LINK_FAILED && aamm_link_state(l) != AAMM_LINK_CLOSED) {
            struct aamm_wire_event ev;
            struct pollfd lp = {aamm_link_fd(l), POLLIN, 0};
            if (aamm_link_events(l) & AAMM_LINK_WRITE)
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
        if (aamm_capture_new(&cap, &co) != 0 || aamm_capture_open(cap) != 0 ||
            aamm_link_new(&l, &so) != 0 || aamm_link_connect(l, "127.0.0.1", portstr) != 0)
            goto retry; /* e.g. the killed walsender still holds the slot */
        for (;;) {
            struct pollfd fds[2];
            int n = 0, ev, rc = 0;
            if (aamm_link_state(l) == AAMM_LINK_FAILED || aamm_link_state(l) == AAMM_LINK_CLOSED)
                break;
            while (aamm_link_state(l) == AAMM_LINK_READY) {
                if (!have) {
                    rc = aamm_capture_next(cap, &cev);
                    if (rc <= 0)
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
            add_fd(fds, &n, aamm_capture_fd(cap), ev & AAMM_CAPTURE_READ, ev & AAMM_CAPTURE_WRITE);
            ev = aamm_link_events(l);
            add_fd(fds, &n, aamm_link_fd(l), ev & AAMM_LINK_READ, ev & AAMM_LINK_WRITE);
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
    uint64_t seed = 7, prev = 0;
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
    return aamm_test_run(s);
}
