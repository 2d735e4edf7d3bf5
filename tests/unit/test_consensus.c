/*
 * test_consensus.c: the replicated state machine on its own, and on raft's in-memory
 * fixture (simulated time and network, deterministic): elections, leader loss, partitions,
 * membership changes, disk faults, snapshots, and members with different clocks.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include <raft.h>
#include <raft/fixture.h>

#include "consensus_int.h"
#include "testutil.h"

/* ---- helpers: commands ------------------------------------------------------------------- */

static size_t enc(uint8_t *out, size_t cap, const struct aamm__cs_cmd *c)
{
    struct aamm__wr w;
    size_t len;
    aamm__wr_init(&w);
    aamm__cs_cmd_encode(&w, c);
    ck_assert(w.ok);
    ck_assert_uint_le(w.len, cap);
    memcpy(out, w.data, w.len);
    len = w.len;
    aamm__wr_free(&w);
    return len;
}

static struct aamm__cs_cmd cmd_galloc(uint64_t origin, uint64_t reqno, const char *seq,
                                      uint64_t count, int64_t min_start)
{
    struct aamm__cs_cmd c;
    memset(&c, 0, sizeof(c));
    c.type = AAMM__CS_GALLOC;
    c.origin = origin;
    c.incarnation = 7;
    c.reqno = reqno;
    c.name = seq;
    c.name_len = strlen(seq);
    c.count = count;
    c.min_start = min_start;
    return c;
}

static struct aamm__cs_cmd cmd_ddl(uint8_t type, uint64_t origin, uint64_t reqno, int64_t stamp,
                                   uint32_t lease_ms, uint64_t token)
{
    struct aamm__cs_cmd c;
    memset(&c, 0, sizeof(c));
    c.type = type;
    c.origin = origin;
    c.incarnation = 7;
    c.reqno = reqno;
    c.stamp_us = stamp;
    c.lease_ms = lease_ms;
    c.count = token;
    return c;
}

/* A DDL command from incarnation @inc of node @origin (a process of that node). */
static struct aamm__cs_cmd cmd_ddl_inc(uint8_t type, uint64_t origin, uint64_t inc,
                                       uint64_t reqno, int64_t stamp, uint32_t lease_ms,
                                       uint64_t token)
{
    struct aamm__cs_cmd c = cmd_ddl(type, origin, reqno, stamp, lease_ms, token);
    c.holder_inc = inc;
    return c;
}

static struct aamm__cs_cmd cmd_member(uint64_t id, const char *name)
{
    struct aamm__cs_cmd c;
    memset(&c, 0, sizeof(c));
    c.type = AAMM__CS_MEMBER_PUT;
    c.id = id;
    c.name = name;
    c.name_len = strlen(name);
    c.link = "link";
    c.link_len = 4;
    c.raft = "127.0.0.1:1";
    c.raft_len = 11;
    return c;
}

static struct aamm__cs_result st_apply(struct aamm__cs_state *st, uint64_t index,
                                       struct aamm__cs_cmd c)
{
    uint8_t buf[600];
    struct aamm__cs_result r;
    size_t len = enc(buf, sizeof(buf), &c);
    ck_assert_int_eq(aamm__cs_state_apply(st, index, buf, len, &r), 0);
    return r;
}

/* ---- pure state machine --------------------------------------------------------------------- */

/* Every command type survives encode/decode; truncated or unknown input is malformed and
 * applying it changes nothing (the state machine never fails on input). */
START_TEST(cmd_codec)
{
    uint8_t buf[600];
    struct aamm__cs_cmd c = cmd_member(5, "node-five"), d;
    struct aamm__cs_state st;
    struct aamm__cs_result r;
    size_t len = enc(buf, sizeof(buf), &c), i;
    uint64_t h;
    struct aamm__cs_cmd g = cmd_galloc(1, 1, "abc", 1, 0);
    /* raft 0.15's uv backend mis-decodes batches of entries whose length is not a multiple
     * of 8: every encoded command is padded */
    ck_assert_uint_eq(len % 8, 0);
    ck_assert_uint_eq(enc(buf, sizeof(buf), &g) % 8, 0);
    len = enc(buf, sizeof(buf), &c);
    ck_assert_int_eq(aamm__cs_cmd_decode(buf, len, &d), 0);
    ck_assert_uint_eq(d.id, 5);
    ck_assert_uint_eq(d.name_len, 9);
    ck_assert(memcmp(d.name, "node-five", 9) == 0);
    ck_assert(memcmp(d.raft, "127.0.0.1:1", 11) == 0);
    aamm__cs_cmd_stamp(buf, len, 123456);
    ck_assert_int_eq(aamm__cs_cmd_decode(buf, len, &d), 0);
    ck_assert_int_eq(d.stamp_us, 123456);
    memset(&st, 0, sizeof(st));
    h = aamm__cs_state_hash(&st);
    for (i = 0; i < len; i++) {
        ck_assert_int_eq(aamm__cs_cmd_decode(buf, i, &d), AAMM_EMALFORMED);
        ck_assert_int_eq(aamm__cs_state_apply(&st, 1, buf, i, &r), 0);
        ck_assert_int_eq(r.status, AAMM_EMALFORMED);
    }
    buf[1] = 99; /* unknown type */
    ck_assert_int_eq(aamm__cs_state_apply(&st, 1, buf, len, &r), 0);
    ck_assert_int_eq(r.status, AAMM_EMALFORMED);
    ck_assert_uint_eq(aamm__cs_state_hash(&st), h);
    aamm__cs_state_clear(&st);
}
END_TEST

/* galloc hands out contiguous, disjoint ranges per sequence, honours min_start, and reports
 * exhaustion at the bigint limit without moving the sequence. */
START_TEST(fsm_galloc)
{
    struct aamm__cs_state st;
    struct aamm__cs_result r;
    int64_t next;
    memset(&st, 0, sizeof(st));
    r = st_apply(&st, 1, cmd_galloc(1, 1, "a", 1000, 0));
    ck_assert_int_eq(r.status, 0);
    ck_assert_int_eq(r.start, 1);
    ck_assert_int_eq(r.end, 1001);
    r = st_apply(&st, 2, cmd_galloc(2, 1, "a", 10, 0));
    ck_assert_int_eq(r.start, 1001);
    ck_assert_int_eq(r.end, 1011);
    r = st_apply(&st, 3, cmd_galloc(2, 2, "b", 10, 0));
    ck_assert_int_eq(r.start, 1); /* independent sequence */
    r = st_apply(&st, 4, cmd_galloc(2, 3, "a", 10, 5000));
    ck_assert_int_eq(r.start, 5000);
    ck_assert_int_eq(r.end, 5010);
    r = st_apply(&st, 5, cmd_galloc(2, 4, "a", 10, 100)); /* min_start below next */
    ck_assert_int_eq(r.start, 5010);
    r = st_apply(&st, 6, cmd_galloc(2, 5, "a", 10, INT64_MAX - 5));
    ck_assert_int_eq(r.status, AAMM_EEXHAUSTED);
    next = aamm__cs_state_seq(&st, "a", 1)->next;
    ck_assert_int_eq(next, 5020);
    r = st_apply(&st, 7, cmd_galloc(2, 6, "a", 0, 0));
    ck_assert_int_eq(r.status, AAMM_EMALFORMED);
    aamm__cs_state_clear(&st);
}
END_TEST

/* The DDL lock: granted with token = log index, refused to others while the lease runs by
 * the STAMPED time, free after expiry, renewal keeps the token, release needs the token. */
START_TEST(fsm_ddl_lock)
{
    struct aamm__cs_state st;
    struct aamm__cs_result r;
    const int64_t t0 = INT64_C(1700000000000000);
    memset(&st, 0, sizeof(st));
    r = st_apply(&st, 10, cmd_ddl(AAMM__CS_DDL_ACQUIRE, 1, 1, t0, 1000, 0));
    ck_assert_int_eq(r.status, 0);
    ck_assert_uint_eq(r.lock.holder, 1);
    ck_assert_uint_eq(r.lock.token, 10);
    ck_assert_int_eq(r.lock.expires_us, t0 + 1000000);
    r = st_apply(&st, 11, cmd_ddl(AAMM__CS_DDL_ACQUIRE, 2, 1, t0 + 500000, 1000, 0));
    ck_assert_int_eq(r.status, AAMM_EBUSY);
    ck_assert_uint_eq(r.lock.holder, 1);
    r = st_apply(&st, 12, cmd_ddl(AAMM__CS_DDL_ACQUIRE, 1, 2, t0 + 600000, 1000, 0));
    ck_assert_int_eq(r.status, 0); /* renewal */
    ck_assert_uint_eq(r.lock.token, 10);
    ck_assert_int_eq(r.lock.expires_us, t0 + 1600000);
    /* A leader with a clock behind: the state machine's time never goes back. */
    r = st_apply(&st, 13, cmd_ddl(AAMM__CS_DDL_ACQUIRE, 2, 2, t0 - 5000000, 1000, 0));
    ck_assert_int_eq(r.status, AAMM_EBUSY);
    r = st_apply(&st, 14, cmd_ddl(AAMM__CS_DDL_ACQUIRE, 2, 3, t0 + 1600000, 1000, 0));
    ck_assert_int_eq(r.status, 0); /* expired: free for node 2, new token */
    ck_assert_uint_eq(r.lock.holder, 2);
    ck_assert_uint_eq(r.lock.token, 14);
    r = st_apply(&st, 15, cmd_ddl(AAMM__CS_DDL_RELEASE, 2, 4, t0 + 1700000, 0, 10));
    ck_assert_int_eq(r.status, AAMM_ESTATE); /* stale token */
    r = st_apply(&st, 16, cmd_ddl(AAMM__CS_DDL_RELEASE, 1, 3, t0 + 1700000, 0, 14));
    ck_assert_int_eq(r.status, AAMM_ESTATE); /* not the holder */
    r = st_apply(&st, 17, cmd_ddl(AAMM__CS_DDL_RELEASE, 2, 5, t0 + 1700000, 0, 14));
    ck_assert_int_eq(r.status, 0);
    ck_assert_uint_eq(r.lock.holder, 0);
    r = st_apply(&st, 18, cmd_ddl(AAMM__CS_DDL_ACQUIRE, 1, 4, t0 + 1800000, 1000, 0));
    ck_assert_int_eq(r.status, 0);
    ck_assert_uint_eq(r.lock.token, 18);
    aamm__cs_state_clear(&st);
}
END_TEST

/* A lease belongs to one incarnation of its node: a restarted process (same node id, new
 * incarnation) is refused while the dead one's lease runs, cannot release it, and after the
 * expiry gets a NEW grant with a new token; then the old incarnation is a stranger. The same
 * incarnation still renews with the same token. */
START_TEST(fsm_ddl_lock_incarnation)
{
    struct aamm__cs_state st;
    struct aamm__cs_result r;
    const int64_t t0 = INT64_C(1700000000000000);
    const uint64_t A = UINT64_C(0xa11ce), B = UINT64_C(0xb0b);
    memset(&st, 0, sizeof(st));
    r = st_apply(&st, 10, cmd_ddl_inc(AAMM__CS_DDL_ACQUIRE, 1, A, 10, t0, 1000, 0));
    ck_assert_int_eq(r.status, 0);
    ck_assert_uint_eq(r.lock.token, 10);
    ck_assert_uint_eq(r.lock.holder_incarnation, A);
    /* the process died; its successor asks 300 ms later: not a renewal */
    r = st_apply(&st, 11, cmd_ddl_inc(AAMM__CS_DDL_ACQUIRE, 1, B, 11, t0 + 300000, 1000, 0));
    ck_assert_int_eq(r.status, AAMM_EBUSY);
    ck_assert_uint_eq(r.lock.holder, 1);
    ck_assert_uint_eq(r.lock.holder_incarnation, A);
    ck_assert_uint_eq(r.lock.token, 10);
    ck_assert_int_eq(r.lock.expires_us, t0 + 1000000); /* the old lease was not extended */
    r = st_apply(&st, 12, cmd_ddl_inc(AAMM__CS_DDL_RELEASE, 1, B, 12, t0 + 400000, 0, 10));
    ck_assert_int_eq(r.status, AAMM_ESTATE); /* nor can it release the old lease */
    ck_assert_uint_eq(st.ddl.holder, 1);
    /* the same incarnation renews: same token */
    r = st_apply(&st, 13, cmd_ddl_inc(AAMM__CS_DDL_ACQUIRE, 1, A, 13, t0 + 500000, 1000, 0));
    ck_assert_int_eq(r.status, 0);
    ck_assert_uint_eq(r.lock.token, 10);
    ck_assert_int_eq(r.lock.expires_us, t0 + 1500000);
    r = st_apply(&st, 14, cmd_ddl_inc(AAMM__CS_DDL_ACQUIRE, 1, B, 14, t0 + 1499999, 1000, 0));
    ck_assert_int_eq(r.status, AAMM_EBUSY);
    /* expired: the new incarnation gets a new grant and a new, larger token */
    r = st_apply(&st, 15, cmd_ddl_inc(AAMM__CS_DDL_ACQUIRE, 1, B, 15, t0 + 1500000, 1000, 0));
    ck_assert_int_eq(r.status, 0);
    ck_assert_uint_eq(r.lock.token, 15);
    ck_assert_uint_eq(r.lock.holder_incarnation, B);
    r = st_apply(&st, 16, cmd_ddl_inc(AAMM__CS_DDL_ACQUIRE, 1, A, 16, t0 + 1600000, 1000, 0));
    ck_assert_int_eq(r.status, AAMM_EBUSY); /* the old incarnation is now a stranger */
    r = st_apply(&st, 17, cmd_ddl_inc(AAMM__CS_DDL_RELEASE, 1, A, 17, t0 + 1600000, 0, 15));
    ck_assert_int_eq(r.status, AAMM_ESTATE);
    r = st_apply(&st, 18, cmd_ddl_inc(AAMM__CS_DDL_RELEASE, 1, B, 18, t0 + 1600000, 0, 15));
    ck_assert_int_eq(r.status, 0);
    ck_assert_uint_eq(r.lock.holder, 0);
    ck_assert_uint_eq(r.lock.holder_incarnation, 0);
    aamm__cs_state_clear(&st);
}
END_TEST

/* Version 1 entries (no holder incarnation) and "ACS1" snapshots still decode, as
 * incarnation 0; version 2 carries it. */
START_TEST(fsm_ddl_old_formats)
{
    uint8_t buf[128];
    struct aamm__cs_cmd c = cmd_ddl_inc(AAMM__CS_DDL_ACQUIRE, 3, 0x77, 9, 5, 250, 0), d;
    struct aamm__cs_state st;
    size_t len = enc(buf, sizeof(buf), &c), i;
    ck_assert_uint_eq(buf[0], 2);
    ck_assert_int_eq(aamm__cs_cmd_decode(buf, len, &d), 0);
    ck_assert_uint_eq(d.holder_inc, 0x77);
    ck_assert_uint_eq(d.lease_ms, 250);
    /* version 1: header | u32 lease | zero padding to 40 bytes */
    buf[0] = 1;
    memset(buf + AAMM__CS_HDR_SIZE + 4, 0, 8);
    ck_assert_int_eq(aamm__cs_cmd_decode(buf, 40, &d), 0);
    ck_assert_uint_eq(d.holder_inc, 0);
    ck_assert_uint_eq(d.lease_ms, 250);
    ck_assert_uint_eq(d.origin, 3);
    /* an ACS1 snapshot: magic, clock, applied, no members, no sequences, the lock
     * (holder 2, token 4, granted 99, expires 10099), no watermarks, no dedup windows */
    {
        static const uint64_t lock[4] = {2, 4, 99, 10099};
        size_t n = 0;
        memcpy(buf, "1SCA", 4); /* 0x41435331 little endian */
        n = 4;
        memset(buf + n, 0, 16);
        buf[n] = 99; /* clock */
        n += 16;
        memset(buf + n, 0, 8); /* member and sequence counts */
        n += 8;
        for (i = 0; i < 4; i++) {
            memset(buf + n, 0, 8);
            buf[n] = (uint8_t)lock[i];
            buf[n + 1] = (uint8_t)(lock[i] >> 8);
            n += 8;
        }
        memset(buf + n, 0, 8); /* watermark and dedup counts */
        n += 8;
        while (n % 8 != 0)
            buf[n++] = 0;
        memset(&st, 0, sizeof(st));
        ck_assert_int_eq(aamm__cs_state_decode(&st, buf, n), 0);
        ck_assert_uint_eq(st.ddl.holder, 2);
        ck_assert_uint_eq(st.ddl.token, 4);
        ck_assert_int_eq(st.ddl.expires_us, 10099);
        ck_assert_uint_eq(st.ddl.holder_incarnation, 0);
        ck_assert_int_eq(st.clock_us, 99);
        aamm__cs_state_clear(&st);
    }
}
END_TEST

/* A retried request (same origin, incarnation, number) returns the first answer and is not
 * applied again; a new incarnation of the origin (wiped data dir) is never mistaken for it;
 * numbers far outside the window are applied. */
START_TEST(fsm_dedup)
{
    struct aamm__cs_state st;
    struct aamm__cs_result r;
    struct aamm__cs_cmd c;
    uint64_t i;
    memset(&st, 0, sizeof(st));
    r = st_apply(&st, 1, cmd_galloc(1, 5, "s", 100, 0));
    ck_assert_int_eq(r.start, 1);
    r = st_apply(&st, 2, cmd_galloc(1, 5, "s", 100, 0));
    ck_assert_int_eq(r.start, 1);
    ck_assert_uint_eq(r.index, 1);
    ck_assert_int_eq(aamm__cs_state_seq(&st, "s", 1)->next, 101);
    c = cmd_galloc(1, 5, "s", 100, 0);
    c.incarnation = 8;
    r = st_apply(&st, 3, c);
    ck_assert_int_eq(r.start, 101);
    /* Fill the window past its size; the newest stay deduplicated. */
    for (i = 100; i < 100 + 2 * AAMM__CS_DEDUP_WINDOW; i++) {
        c = cmd_galloc(1, i, "s", 1, 0);
        c.incarnation = 8;
        st_apply(&st, 4 + i, c);
    }
    c = cmd_galloc(1, 99 + 2 * AAMM__CS_DEDUP_WINDOW, "s", 1, 0);
    c.incarnation = 8;
    r = st_apply(&st, 1000, c);
    ck_assert_uint_eq(r.index, 4 + 99 + 2 * AAMM__CS_DEDUP_WINDOW);
    /* reqno 0 is never deduplicated */
    r = st_apply(&st, 1001, cmd_galloc(1, 0, "t", 1, 0));
    r = st_apply(&st, 1002, cmd_galloc(1, 0, "t", 1, 0));
    ck_assert_int_eq(r.start, 2);
    aamm__cs_state_clear(&st);
}
END_TEST

/* The cluster watermark of an origin is the minimum over the OTHER members' reports, 0 until
 * all reported, only grows, and a removed member stops counting. */
START_TEST(fsm_watermark)
{
    struct aamm__cs_state st;
    struct aamm__cs_cmd c;
    uint64_t id;
    memset(&st, 0, sizeof(st));
    for (id = 1; id <= 3; id++)
        st_apply(&st, id, cmd_member(id, "n"));
    memset(&c, 0, sizeof(c));
    c.type = AAMM__CS_WATERMARK;
    c.origin = 2;
    c.id = 1;
    c.count = 500;
    st_apply(&st, 10, c);
    ck_assert_uint_eq(aamm__cs_state_watermark(&st, 1), 0);
    c.origin = 3;
    c.count = 300;
    st_apply(&st, 11, c);
    ck_assert_uint_eq(aamm__cs_state_watermark(&st, 1), 300);
    c.count = 200; /* never backwards */
    st_apply(&st, 12, c);
    ck_assert_uint_eq(aamm__cs_state_watermark(&st, 1), 300);
    c.count = 900;
    st_apply(&st, 13, c);
    ck_assert_uint_eq(aamm__cs_state_watermark(&st, 1), 500);
    memset(&c, 0, sizeof(c));
    c.type = AAMM__CS_MEMBER_DEL;
    c.id = 2;
    st_apply(&st, 14, c);
    ck_assert_uint_eq(aamm__cs_state_watermark(&st, 1), 900);
    ck_assert_ptr_null(aamm__cs_state_member(&st, 2));
    aamm__cs_state_clear(&st);
}
END_TEST

/* A snapshot restores to an identical state (same hash); any truncation of it is rejected
 * without touching the target. */
START_TEST(fsm_snapshot_roundtrip)
{
    struct aamm__cs_state st, copy;
    struct aamm__wr w;
    size_t i;
    uint64_t h;
    memset(&st, 0, sizeof(st));
    memset(&copy, 0, sizeof(copy));
    st_apply(&st, 1, cmd_member(1, "one"));
    st_apply(&st, 2, cmd_member(2, "two"));
    st_apply(&st, 3, cmd_galloc(1, 1, "seq", 10, 0));
    st_apply(&st, 4, cmd_ddl_inc(AAMM__CS_DDL_ACQUIRE, 2, 0xfeed, 1, 99, 10, 0));
    st_apply(&st, 5, cmd_ddl_inc(AAMM__CS_DDL_ACQUIRE, 1, 0xbeef, 2, 100, 10, 0));
    h = aamm__cs_state_hash(&st);
    aamm__wr_init(&w);
    aamm__cs_state_encode(&st, &w);
    ck_assert(w.ok);
    ck_assert_uint_eq(w.len % 8, 0); /* raft 0.15's uv backend needs 8-byte multiples */
    for (i = 0; i + 8 <= w.len; i++)
        ck_assert_int_eq(aamm__cs_state_decode(&copy, w.data, i), AAMM_EMALFORMED);
    ck_assert_int_eq(aamm__cs_state_decode(&copy, w.data, w.len), 0);
    ck_assert_uint_eq(aamm__cs_state_hash(&copy), h);
    ck_assert_str_eq(aamm__cs_state_member(&copy, 2)->name, "two");
    ck_assert_uint_eq(copy.ddl.holder, 2);
    ck_assert_uint_eq(copy.ddl.holder_incarnation, 0xfeed); /* the lease's incarnation */
    {
        /* and the remembered answer to node 1 (refused, showing node 2's lease) keeps it */
        struct aamm__cs_result r = st_apply(&copy, 6, cmd_ddl_inc(AAMM__CS_DDL_ACQUIRE, 1,
                                                                  0xbeef, 2, 100, 10, 0));
        ck_assert_int_eq(r.status, AAMM_EBUSY);
        ck_assert_uint_eq(r.index, 5);
        ck_assert_uint_eq(r.lock.holder_incarnation, 0xfeed);
    }
    aamm__wr_free(&w);
    aamm__cs_state_clear(&st);
    aamm__cs_state_clear(&copy);
}
END_TEST

/* ---- fixture shim (raft 0.15 spelling kept here) ------------------------------------------- */

#define FX_MAX 5

struct fx {
    struct raft_fixture f;
    struct aamm__cs_fsm fsm[FX_MAX];
    unsigned n;
    int64_t offset_us[FX_MAX]; /* each member's wall clock = simulated time + offset */
    uint64_t reqno;
    void *pending[64]; /* requests still inside raft when a test gave up waiting */
    unsigned n_pending;
};

static void fx_grow(struct fx *x)
{
    unsigned i = x->n;
    aamm__cs_fsm_init(&x->fsm[i], NULL);
    ck_assert_int_eq(raft_fixture_grow(&x->f, &x->fsm[i].fsm), 0);
    x->fsm[i].raft = raft_fixture_get(&x->f, i);
    raft_set_snapshot_threshold(x->fsm[i].raft, 64);
    raft_set_snapshot_trailing(x->fsm[i].raft, 16);
    x->n++;
}

static void fx_setup(struct fx *x, unsigned n)
{
    struct raft_configuration conf;
    unsigned i;
    memset(x, 0, sizeof(*x));
    ck_assert_int_eq(raft_fixture_initialize(&x->f), 0);
    for (i = 0; i < n; i++)
        fx_grow(x);
    ck_assert_int_eq(raft_fixture_configuration(&x->f, n, &conf), 0);
    ck_assert_int_eq(raft_fixture_bootstrap(&x->f, &conf), 0);
    raft_configuration_close(&conf);
    ck_assert_int_eq(raft_fixture_start(&x->f), 0);
}

static void fx_teardown(struct fx *x)
{
    unsigned i;
    raft_fixture_close(&x->f);
    for (i = 0; i < x->n_pending; i++)
        free(x->pending[i]);
    for (i = 0; i < x->n; i++)
        aamm__cs_fsm_close(&x->fsm[i]);
}

struct fx_req {
    struct raft_apply req;
    bool done;
    int status;
    struct aamm__cs_result res;
};

static void fx_apply_cb(struct raft_apply *req, int status, void *result)
{
    struct fx_req *r = req->data;
    r->done = true;
    r->status = status;
    if (status == 0)
        r->res = *(struct aamm__cs_result *)result;
}

static bool fx_req_done(struct raft_fixture *f, void *arg)
{
    (void)f;
    return ((struct fx_req *)arg)->done;
}

/* Submit @c on server @i (stamped with its clock), step until done or @max_ms. Returns the
 * raft status (RAFT_NOTLEADER for a non-leader), or -1 when it did not finish in time. */
static int fx_submit(struct fx *x, unsigned i, struct aamm__cs_cmd c, unsigned max_ms,
                     struct aamm__cs_result *out)
{
    struct fx_req *r = calloc(1, sizeof(*r));
    uint8_t buf[600];
    struct raft_buffer b;
    int rv;
    c.stamp_us = (int64_t)raft_fixture_time(&x->f) * 1000 + x->offset_us[i];
    b.len = enc(buf, sizeof(buf), &c);
    b.base = raft_malloc(b.len);
    memcpy(b.base, buf, b.len);
    r->req.data = r;
    rv = raft_apply(raft_fixture_get(&x->f, i), &r->req, &b, 1, fx_apply_cb);
    if (rv != 0) {
        raft_free(b.base);
        free(r);
        return rv;
    }
    raft_fixture_step_until(&x->f, fx_req_done, r, max_ms);
    if (!r->done) {
        /* raft still holds it (and fails it at close at the latest): free after close */
        ck_assert_uint_lt(x->n_pending, 64);
        x->pending[x->n_pending++] = r;
        return -1;
    }
    rv = r->status;
    if (out)
        *out = r->res;
    free(r);
    return rv;
}

static unsigned fx_leader(struct fx *x)
{
    ck_assert(raft_fixture_step_until_has_leader(&x->f, 10000));
    return raft_fixture_leader_index(&x->f);
}

/* Allocate on the leader; record the range. */
static void fx_galloc(struct fx *x, int64_t (*ranges)[2], size_t *n)
{
    struct aamm__cs_result res;
    unsigned l = fx_leader(x);
    int rv = fx_submit(x, l, cmd_galloc(l + 1, ++x->reqno, "g", 100, 0), 2000, &res);
    if (rv == 0) {
        ck_assert_int_eq(res.status, 0);
        ranges[*n][0] = res.start;
        ranges[*n][1] = res.end;
        (*n)++;
    }
}

static void assert_disjoint(int64_t (*ranges)[2], size_t n)
{
    size_t i, j;
    for (i = 0; i < n; i++)
        for (j = i + 1; j < n; j++)
            ck_assert(ranges[i][1] <= ranges[j][0] || ranges[j][1] <= ranges[i][0]);
}

/* Step until every live member applied the leader's last index; then all hashes agree. */
static void fx_converge(struct fx *x)
{
    unsigned l = fx_leader(x), i;
    raft_index last = raft_last_index(raft_fixture_get(&x->f, l));
    uint64_t h;
    /* a barrier-like no-op so earlier terms' entries commit too */
    struct aamm__cs_cmd c;
    memset(&c, 0, sizeof(c));
    c.type = AAMM__CS_NOOP;
    ck_assert_int_eq(fx_submit(x, l, c, 5000, NULL), 0);
    last = raft_last_index(raft_fixture_get(&x->f, l));
    for (i = 0; i < x->n; i++)
        if (raft_fixture_alive(&x->f, i) &&
            raft_state(raft_fixture_get(&x->f, i)) != RAFT_UNAVAILABLE)
            ck_assert(raft_fixture_step_until_applied(&x->f, i, last, 20000));
    h = aamm__cs_state_hash(&x->fsm[l].st);
    for (i = 0; i < x->n; i++)
        if (raft_fixture_alive(&x->f, i) &&
            raft_state(raft_fixture_get(&x->f, i)) != RAFT_UNAVAILABLE)
            ck_assert_uint_eq(aamm__cs_state_hash(&x->fsm[i].st), h);
}

static int64_t g_ranges[4096][2];

/* Three members elect a leader; allocations on it are applied identically everywhere. */
START_TEST(fx_election_and_apply)
{
    struct fx x;
    size_t n = 0, i;
    fx_setup(&x, 3);
    for (i = 0; i < 50; i++)
        fx_galloc(&x, g_ranges, &n);
    ck_assert_uint_eq(n, 50);
    assert_disjoint(g_ranges, n);
    fx_converge(&x);
    ck_assert_int_eq(aamm__cs_state_seq(&x.fsm[1].st, "g", 1)->next, 5001);
    /* a follower refuses: raft only takes entries on the leader */
    {
        unsigned l = fx_leader(&x);
        ck_assert_int_eq(fx_submit(&x, (l + 1) % 3, cmd_galloc(9, 1, "g", 1, 0), 100, NULL),
                         RAFT_NOTLEADER);
    }
    fx_teardown(&x);
}
END_TEST

/* Killing the leader repeatedly: a new one is elected each time, allocations go on, no range
 * overlaps, and revived members catch up (by log or snapshot) to the same state. */
START_TEST(fx_leader_loss)
{
    struct fx x;
    size_t n = 0;
    int round, i;
    fx_setup(&x, 3);
    for (round = 0; round < 5; round++) {
        unsigned l;
        for (i = 0; i < 40; i++)
            fx_galloc(&x, g_ranges, &n);
        l = fx_leader(&x);
        raft_fixture_kill(&x.f, l);
        ck_assert(raft_fixture_step_until_has_no_leader(&x.f, 5000));
        ck_assert(raft_fixture_step_until_has_leader(&x.f, 10000));
        ck_assert_uint_ne(raft_fixture_leader_index(&x.f), l);
        for (i = 0; i < 40; i++)
            fx_galloc(&x, g_ranges, &n);
        raft_fixture_revive(&x.f, l);
    }
    ck_assert_uint_ge(n, 350);
    assert_disjoint(g_ranges, n);
    fx_converge(&x);
    fx_teardown(&x);
}
END_TEST

/* A leader cut off from the majority cannot commit (no range for the minority); the majority
 * elects another leader and keeps allocating; after healing all converge, ranges disjoint. */
START_TEST(fx_partition)
{
    struct fx x;
    size_t n = 0, i;
    unsigned l, j;
    int64_t next_before;
    struct aamm__cs_result res;
    fx_setup(&x, 3);
    for (i = 0; i < 10; i++)
        fx_galloc(&x, g_ranges, &n);
    l = fx_leader(&x);
    for (j = 0; j < 3; j++)
        if (j != l) {
            raft_fixture_disconnect(&x.f, l, j);
            raft_fixture_disconnect(&x.f, j, l);
        }
    next_before = aamm__cs_state_seq(&x.fsm[l].st, "g", 1)->next;
    /* the isolated leader: never committed (it steps down, or times out here) */
    ck_assert_int_ne(fx_submit(&x, l, cmd_galloc(l + 1, 1000, "g", 100, 0), 3000, &res), 0);
    ck_assert_int_eq(aamm__cs_state_seq(&x.fsm[l].st, "g", 1)->next, next_before);
    /* the majority side */
    for (i = 0; i < 10; i++) {
        unsigned k, nl = (unsigned)-1;
        raft_fixture_step_until_elapsed(&x.f, 100);
        for (k = 0; k < 3; k++)
            if (k != l && raft_state(raft_fixture_get(&x.f, k)) == RAFT_LEADER)
                nl = k;
        if (nl == (unsigned)-1) {
            raft_fixture_step_until_elapsed(&x.f, 1000);
            continue;
        }
        if (fx_submit(&x, nl, cmd_galloc(nl + 1, 2000 + i, "g", 100, 0), 2000, &res) == 0) {
            g_ranges[n][0] = res.start;
            g_ranges[n][1] = res.end;
            n++;
        }
    }
    ck_assert_uint_ge(n, 15);
    ck_assert_int_eq(aamm__cs_state_seq(&x.fsm[l].st, "g", 1)->next, next_before);
    for (j = 0; j < 3; j++)
        if (j != l) {
            raft_fixture_reconnect(&x.f, l, j);
            raft_fixture_reconnect(&x.f, j, l);
        }
    fx_converge(&x);
    assert_disjoint(g_ranges, n);
    fx_teardown(&x);
}
END_TEST

static void fx_change_cb(struct raft_change *req, int status)
{
    int *done = req->data;
    *done = status == 0 ? 1 : -1;
}

static bool int_set(struct raft_fixture *f, void *arg)
{
    (void)f;
    return *(int *)arg != 0;
}

/* A fourth member joins (add as spare, promote to voter; it catches up by snapshot), a
 * member leaves; the new one ends with the same state. */
START_TEST(fx_membership)
{
    struct fx x;
    struct raft_change ch;
    size_t n = 0, i;
    int done = 0;
    unsigned l;
    fx_setup(&x, 3);
    for (i = 0; i < 150; i++) /* beyond the snapshot threshold */
        fx_galloc(&x, g_ranges, &n);
    fx_grow(&x);
    ck_assert_int_eq(raft_start(raft_fixture_get(&x.f, 3)), 0); /* grown after start */
    l = fx_leader(&x);
    ch.data = &done;
    ck_assert_int_eq(raft_add(raft_fixture_get(&x.f, l), &ch, 4, "4", fx_change_cb), 0);
    ck_assert(raft_fixture_step_until(&x.f, int_set, &done, 5000));
    ck_assert_int_eq(done, 1);
    done = 0;
    ck_assert_int_eq(raft_assign(raft_fixture_get(&x.f, l), &ch, 4, RAFT_VOTER, fx_change_cb), 0);
    ck_assert(raft_fixture_step_until(&x.f, int_set, &done, 20000));
    ck_assert_int_eq(done, 1);
    fx_converge(&x);
    ck_assert_int_eq(aamm__cs_state_seq(&x.fsm[3].st, "g", 1)->next, 15001);
    /* remove a follower */
    l = fx_leader(&x);
    done = 0;
    ck_assert_int_eq(raft_remove(raft_fixture_get(&x.f, l), &ch, (l + 1) % 4 + 1, fx_change_cb), 0);
    ck_assert(raft_fixture_step_until(&x.f, int_set, &done, 5000));
    ck_assert_int_eq(done, 1);
    ck_assert_uint_eq(raft_fixture_get(&x.f, l)->configuration.n, 3);
    for (i = 0; i < 10; i++)
        fx_galloc(&x, g_ranges, &n);
    assert_disjoint(g_ranges, n);
    fx_teardown(&x);
}
END_TEST

/* A disk fault on a follower takes it out (RAFT_UNAVAILABLE) and the others keep committing. */
START_TEST(fx_disk_fault)
{
    struct fx x;
    size_t n = 0, i;
    unsigned l, f;
    fx_setup(&x, 3);
    for (i = 0; i < 5; i++)
        fx_galloc(&x, g_ranges, &n);
    l = fx_leader(&x);
    f = (l + 1) % 3;
    raft_fixture_io_fault(&x.f, f, 0, 1);
    for (i = 0; i < 20; i++) {
        struct aamm__cs_result res;
        ck_assert_int_eq(fx_submit(&x, l, cmd_galloc(l + 1, ++x.reqno, "g", 100, 0), 2000, &res),
                         0);
    }
    ck_assert_int_eq(raft_state(raft_fixture_get(&x.f, f)), RAFT_UNAVAILABLE);
    ck_assert_int_lt(aamm__cs_state_seq(&x.fsm[f].st, "g", 1)->next, 2501);
    /* the host notices and closes the failed member; the rest go on */
    raft_fixture_kill(&x.f, f);
    fx_converge(&x);
    ck_assert_int_eq(aamm__cs_state_seq(&x.fsm[l].st, "g", 1)->next, 2501);
    fx_teardown(&x);
}
END_TEST

/* Members whose wall clocks differ by up to an hour lead in turn and stamp DDL lock entries:
 * every member ends with the same state hash, because the state machine only uses stamps. */
START_TEST(fx_clock_offsets)
{
    struct fx x;
    struct aamm__cs_result res;
    int round;
    uint64_t reqno = 1;
    fx_setup(&x, 3);
    x.offset_us[0] = 0;
    x.offset_us[1] = INT64_C(3600) * 1000000;
    x.offset_us[2] = -INT64_C(1800) * 1000000;
    for (round = 0; round < 6; round++) {
        unsigned l = fx_leader(&x), k;
        for (k = 1; k <= 3; k++) {
            fx_submit(&x, l, cmd_ddl(AAMM__CS_DDL_ACQUIRE, k, reqno++, 0, 500, 0), 2000, &res);
            fx_submit(&x, l, cmd_galloc(k, reqno++, "c", 7, 0), 2000, &res);
        }
        raft_fixture_kill(&x.f, l);
        ck_assert(raft_fixture_step_until_has_no_leader(&x.f, 5000));
        ck_assert(raft_fixture_step_until_has_leader(&x.f, 10000));
        raft_fixture_revive(&x.f, l);
    }
    fx_converge(&x);
    ck_assert_uint_ne(x.fsm[0].st.ddl.token, 0);
    ck_assert_uint_eq(x.fsm[0].st.ddl.token, x.fsm[1].st.ddl.token);
    ck_assert_int_eq(x.fsm[0].st.clock_us, x.fsm[2].st.clock_us);
    fx_teardown(&x);
}
END_TEST

/* A member killed while many entries (and snapshots) go by is revived and catches up by
 * InstallSnapshot: its state machine is restored from the snapshot and equals the others. */
START_TEST(fx_snapshot_restore)
{
    struct fx x;
    size_t n = 0, i;
    unsigned l, f;
    fx_setup(&x, 3);
    l = fx_leader(&x);
    f = (l + 1) % 3;
    raft_fixture_kill(&x.f, f);
    for (i = 0; i < 300; i++)
        fx_galloc(&x, g_ranges, &n);
    ck_assert_uint_eq(aamm__cs_state_seq(&x.fsm[f].st, "g", 1) == NULL, 1);
    raft_fixture_revive(&x.f, f);
    fx_converge(&x);
    ck_assert_int_eq(aamm__cs_state_seq(&x.fsm[f].st, "g", 1)->next, 30001);
    ck_assert_uint_gt(raft_fixture_get(&x.f, f)->log.snapshot.last_index, 0);
    fx_teardown(&x);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("consensus");
    TCase *tc = aamm_test_tcase("fsm", 10);
    TCase *tf = aamm_test_tcase("fixture", 30);
    tcase_add_test(tc, cmd_codec);
    tcase_add_test(tc, fsm_galloc);
    tcase_add_test(tc, fsm_ddl_lock);
    tcase_add_test(tc, fsm_ddl_lock_incarnation);
    tcase_add_test(tc, fsm_ddl_old_formats);
    tcase_add_test(tc, fsm_dedup);
    tcase_add_test(tc, fsm_watermark);
    tcase_add_test(tc, fsm_snapshot_roundtrip);
    suite_add_tcase(s, tc);
    tcase_add_test(tf, fx_election_and_apply);
    tcase_add_test(tf, fx_leader_loss);
    tcase_add_test(tf, fx_partition);
    tcase_add_test(tf, fx_membership);
    tcase_add_test(tf, fx_disk_fault);
    tcase_add_test(tf, fx_clock_offsets);
    tcase_add_test(tf, fx_snapshot_restore);
    suite_add_tcase(s, tf);
    return aamm_test_run(s);
}
