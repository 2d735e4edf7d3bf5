/* test_wire.c: the wire codec: CRC32C vectors, round trips, strictness, corruption. */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <aamm/wire.h>
#include <lz4.h>

#include "internal.h"
#include "testutil.h"
#include "wiregen.h"

uint32_t aamm__crc32c_sw(uint32_t crc, const void *data, size_t len);

/* ====================================================================================
 * Helpers
 * ==================================================================================== */

struct bytes {
    uint8_t *p;
    size_t len, cap;
};

static void bytes_add(struct bytes *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2 + 1024;
        b->p = realloc(b->p, b->cap);
        ck_assert_ptr_nonnull(b->p);
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

/* Move everything pending in @enc to @out. */
static void drain(struct aamm_wire_encoder *enc, struct bytes *out)
{
    size_t n;
    const uint8_t *p = aamm_wire_encoder_pending(enc, &n);
    if (n > 0) {
        bytes_add(out, p, n);
        aamm_wire_encoder_consume(enc, n);
    }
}

static void encode_txn(struct aamm_wire_encoder *enc, const struct wg_txn *t)
{
    ck_assert_int_eq(aamm_wire_encode_begin(enc, &t->txn), 0);
    for (uint32_t i = 0; i < t->nchanges; i++) {
        int rc = aamm_wire_encode_change(enc, &t->changes[i]);
        ck_assert_msg(rc == 0, "encode change %u: %s", i, aamm_wire_encoder_errmsg(enc));
    }
    ck_assert_int_eq(aamm_wire_encode_commit(enc, &t->txn), 0);
}

/* Checks decoded events against the expected transactions in order. */
struct checker {
    const struct wg_txn *txns;
    uint32_t ntxns;
    uint32_t txn, change;
    bool open;
};

static void check_event(struct checker *c, const struct aamm_wire_event *ev)
{
    const struct wg_txn *t;
    ck_assert_uint_lt(c->txn, c->ntxns);
    t = &c->txns[c->txn];
    switch (ev->kind) {
    case AAMM_WIRE_EV_BEGIN: {
        struct aamm_transaction want = t->txn;
        ck_assert(!c->open);
        want.end_lsn = 0;
        ck_assert_msg(wg_txn_header_equal(&ev->txn, &want), "BEGIN %u differs", c->txn);
        c->open = true;
        c->change = 0;
        break;
    }
    case AAMM_WIRE_EV_CHANGE:
        ck_assert(c->open);
        ck_assert_uint_lt(c->change, t->nchanges);
        ck_assert_msg(wg_change_equal(&ev->change, &t->changes[c->change]),
                      "txn %u change %u differs", c->txn, c->change);
        c->change++;
        break;
    case AAMM_WIRE_EV_COMMIT:
        ck_assert(c->open);
        ck_assert_uint_eq(c->change, t->nchanges);
        ck_assert(wg_txn_header_equal(&ev->txn, &t->txn));
        c->open = false;
        c->txn++;
        break;
    default:
        ck_abort_msg("unexpected event %d", (int)ev->kind);
    }
}

/* Feed @b to @dec in random chunks of 1..@maxchunk bytes, checking every event. */
static void decode_all(struct aamm_wire_decoder *dec, const struct bytes *b, uint64_t *seed,
                       size_t maxchunk, struct checker *c)
{
    size_t off = 0;
    for (;;) {
        struct aamm_wire_event ev;
        int rc;
        while ((rc = aamm_wire_decoder_next(dec, &ev)) == 0)
            check_event(c, &ev);
        ck_assert_msg(rc == AAMM_EAGAIN, "decode: %s", aamm_wire_decoder_errmsg(dec));
        if (off == b->len)
            break;
        {
            size_t chunk = 1 + aamm_test_rand(seed) % maxchunk, acc = 0;
            if (chunk > b->len - off)
                chunk = b->len - off;
            ck_assert_int_eq(aamm_wire_decoder_feed(dec, b->p + off, chunk, &acc), 0);
            ck_assert_uint_gt(acc, 0);
            off += acc;
        }
    }
    ck_assert_int_eq(aamm_wire_decoder_finish(dec), 0);
    ck_assert_uint_eq(c->txn, c->ntxns);
}

/* Decode @len bytes in one go; returns the final code (error, or 0 if all was clean) and the
 * number of events seen. */
static int decode_count(const uint8_t *p, size_t len, const struct aamm_wire_options *o,
                        aamm_wire_verify_cb vf, int *events)
{
    struct aamm_wire_decoder *dec;
    struct aamm_wire_event ev;
    size_t off = 0;
    int rc;
    *events = 0;
    ck_assert_int_eq(aamm_wire_decoder_new(&dec, o, NULL, 0), 0);
    if (vf)
        aamm_wire_decoder_set_mac(dec, vf, NULL);
    for (;;) {
        size_t acc = 0;
        while ((rc = aamm_wire_decoder_next(dec, &ev)) == 0)
            (*events)++;
        if (rc != AAMM_EAGAIN)
            break;
        if (off == len) {
            rc = aamm_wire_decoder_finish(dec);
            break;
        }
        ck_assert_int_eq(aamm_wire_decoder_feed(dec, p + off, len - off, &acc), 0);
        off += acc;
    }
    aamm_wire_decoder_free(dec);
    return rc;
}

static void one_txn_stream(struct bytes *out, uint64_t seed, struct wg_pool *pool, struct wg_txn *t,
                           const struct aamm_wire_options *o)
{
    struct aamm_wire_encoder *enc;
    struct wg_shape shape = {4, 40, 0, false};
    wg_pool_init(pool, &seed, 3);
    wg_txn_random(t, &seed, pool, &shape, 2, 0x1000);
    ck_assert_int_eq(aamm_wire_encoder_new(&enc, o, NULL, 0), 0);
    encode_txn(enc, t);
    ck_assert_int_eq(aamm_wire_encoder_flush(enc), 0);
    drain(enc, out);
    aamm_wire_encoder_free(enc);
}

/* A toy keyed MAC for the hook tests (the link uses HMAC-SHA256). */
static int toy_seal(struct aamm_wire_encoder *enc, const uint8_t *frame, size_t len, uint8_t *mac,
                    void *arg)
{
    uint32_t c = aamm_crc32c(0x5EC12E7u, frame, len);
    (void)enc;
    (void)arg;
    for (int i = 0; i < AAMM_WIRE_MAC_SIZE; i++)
        mac[i] = (uint8_t)(c >> ((i % 4) * 8)) ^ (uint8_t)i;
    return 0;
}

static int toy_verify(struct aamm_wire_decoder *dec, const uint8_t *frame, size_t len,
                      const uint8_t *mac, void *arg)
{
    uint8_t want[AAMM_WIRE_MAC_SIZE];
    (void)dec;
    toy_seal(NULL, frame, len, want, arg);
    return memcmp(want, mac, sizeof want) == 0 ? 0 : AAMM_EAUTH;
}

/* ====================================================================================
 * CRC32C
 * ==================================================================================== */

/* CRC32C matches RFC 3720 appendix B.4 and the standard check value, in both the hardware
 * and the software implementation, and continues across split buffers. */
START_TEST(crc32c_vectors)
{
    uint8_t buf[48];
    static const uint8_t pdu[48] = {0x01, 0xc0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                                    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00,
                                    0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00,
                                    0x00, 0x18, 0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                                    0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00};
    uint32_t (*fns[2])(uint32_t, const void *, size_t) = {aamm_crc32c, aamm__crc32c_sw};
    for (int f = 0; f < 2; f++) {
        memset(buf, 0, 32);
        ck_assert_uint_eq(fns[f](0, buf, 32), 0x8A9136AAu);
        memset(buf, 0xFF, 32);
        ck_assert_uint_eq(fns[f](0, buf, 32), 0x62A8AB43u);
        for (int i = 0; i < 32; i++)
            buf[i] = (uint8_t)i;
        ck_assert_uint_eq(fns[f](0, buf, 32), 0x46DD794Eu);
        for (int i = 0; i < 32; i++)
            buf[i] = (uint8_t)(31 - i);
        ck_assert_uint_eq(fns[f](0, buf, 32), 0x113FDB5Cu);
        ck_assert_uint_eq(fns[f](0, pdu, 48), 0xD9963A56u);
        ck_assert_uint_eq(fns[f](0, "123456789", 9), 0xE3069283u);
        ck_assert_uint_eq(fns[f](fns[f](0, "1234", 4), "56789", 5), 0xE3069283u);
    }
    {
        uint64_t seed = aamm_test_seed("crc32c_vectors");
        uint8_t big[1000];
        aamm_test_random_bytes(&seed, big, sizeof big);
        for (size_t off = 0; off < 9; off++)
            for (size_t len = 0; len < 300; len += 7)
                ck_assert_uint_eq(aamm_crc32c(0, big + off, len),
                                  aamm__crc32c_sw(0, big + off, len));
    }
}
END_TEST

/* ====================================================================================
 * Round trips
 * ==================================================================================== */

/* Every control message decodes to the fields it was encoded with. */
START_TEST(control_roundtrip)
{
    struct aamm_wire_encoder *enc;
    struct aamm_wire_decoder *dec;
    struct aamm_wire_event ev;
    struct bytes b = {0};
    struct aamm_wire_hello h = {1,        1,   AAMM_WIRE_ROLE_RECEIVER, AAMM_WIRE_HELLO_TLS, 42,
                                -1234567, {0}, "prod-cluster"};
    struct aamm_wire_position pos[3] = {{1, 10}, {2, UINT64_MAX}, {3, 0}};
    uint8_t proof[32];
    size_t acc;
    for (int i = 0; i < 32; i++)
        h.nonce[i] = (uint8_t)(i * 3), proof[i] = (uint8_t)(255 - i);
    ck_assert_int_eq(aamm_wire_encoder_new(&enc, NULL, NULL, 0), 0);
    ck_assert_int_eq(aamm_wire_encode_hello(enc, &h), 0);
    ck_assert_int_eq(aamm_wire_encode_auth(enc, proof), 0);
    ck_assert_int_eq(aamm_wire_encode_resume(enc, pos, 3), 0);
    ck_assert_int_eq(aamm_wire_encode_resume(enc, NULL, 0), 0);
    ck_assert_int_eq(aamm_wire_encode_ack(enc, 9, 0xABCDEF0123ull), 0);
    ck_assert_int_eq(aamm_wire_encode_heartbeat(enc, 1700000000123456), 0);
    ck_assert_int_eq(aamm_wire_encode_error(enc, AAMM_EAUTH, "wrong secret"), 0);
    ck_assert_int_eq(aamm_wire_encode_error(enc, 0, NULL), 0);
    drain(enc, &b);
    ck_assert_int_eq(aamm_wire_decoder_new(&dec, NULL, NULL, 0), 0);
    ck_assert_int_eq(aamm_wire_decoder_feed(dec, b.p, b.len, &acc), 0);
    ck_assert_uint_eq(acc, b.len);
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), 0);
    ck_assert_int_eq(ev.kind, AAMM_WIRE_EV_HELLO);
    ck_assert_uint_eq(ev.hello.node_id, 42);
    ck_assert_uint_eq(ev.hello.role, AAMM_WIRE_ROLE_RECEIVER);
    ck_assert_uint_eq(ev.hello.flags, AAMM_WIRE_HELLO_TLS);
    ck_assert_int_eq(ev.hello.wall_time_us, -1234567);
    ck_assert_str_eq(ev.hello.cluster, "prod-cluster");
    ck_assert_mem_eq(ev.hello.nonce, h.nonce, 32);
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), 0);
    ck_assert_int_eq(ev.kind, AAMM_WIRE_EV_AUTH);
    ck_assert_mem_eq(ev.proof, proof, 32);
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), 0);
    ck_assert_int_eq(ev.kind, AAMM_WIRE_EV_RESUME);
    ck_assert_uint_eq(ev.npositions, 3);
    ck_assert_uint_eq(ev.positions[1].origin_node, 2);
    ck_assert_uint_eq(ev.positions[1].lsn, UINT64_MAX);
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), 0);
    ck_assert_int_eq(ev.kind, AAMM_WIRE_EV_RESUME);
    ck_assert_uint_eq(ev.npositions, 0);
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), 0);
    ck_assert_int_eq(ev.kind, AAMM_WIRE_EV_ACK);
    ck_assert_uint_eq(ev.origin_node, 9);
    ck_assert_uint_eq(ev.lsn, 0xABCDEF0123ull);
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), 0);
    ck_assert_int_eq(ev.kind, AAMM_WIRE_EV_HEARTBEAT);
    ck_assert_int_eq(ev.wall_time_us, 1700000000123456);
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), 0);
    ck_assert_int_eq(ev.kind, AAMM_WIRE_EV_ERROR);
    ck_assert_int_eq(ev.code, AAMM_EAUTH);
    ck_assert_str_eq(ev.message, "wrong secret");
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), 0);
    ck_assert_int_eq(ev.kind, AAMM_WIRE_EV_GOODBYE);
    ck_assert_int_eq(ev.code, 0);
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), AAMM_EAGAIN);
    ck_assert_int_eq(aamm_wire_decoder_finish(dec), 0);
    aamm_wire_decoder_free(dec);
    aamm_wire_encoder_free(enc);
    free(b.p);
}
END_TEST

/* Property: thousands of random transactions (random relations, column counts, every change
 * and value kind) encode and decode to identical transactions, with random frame sizes,
 * compression on or off and random chunking of the byte stream. */
START_TEST(random_roundtrip)
{
    uint64_t seed = aamm_test_seed("random_roundtrip");
    long rounds = aamm_test_scaled(40, 4);
    long total = 0;
    for (long round = 0; round < rounds; round++) {
        struct wg_pool pool;
        struct aamm_wire_options o = {0};
        struct aamm_wire_encoder *enc;
        struct aamm_wire_decoder *dec;
        struct wg_shape shape = {1 + (uint32_t)(aamm_test_rand(&seed) % 12),
                                 (uint32_t)(aamm_test_rand(&seed) % 300), 0,
                                 aamm_test_rand(&seed) % 2 == 0};
        struct bytes b = {0};
        struct checker c = {0};
        uint32_t n = 100;
        struct wg_txn *txns = calloc(n, sizeof *txns);
        o.frame_payload = aamm_test_rand(&seed) % 3 == 0 ? 256 + aamm_test_rand(&seed) % 4000 : 0;
        o.compress_min = aamm_test_rand(&seed) % 2 ? UINT32_MAX : 64;
        o.max_relations = aamm_test_rand(&seed) % 3 == 0 ? 4 : 0; /* forces evictions */
        wg_pool_init(&pool, &seed, 1 + (uint32_t)(aamm_test_rand(&seed) % 20));
        ck_assert_int_eq(aamm_wire_encoder_new(&enc, &o, NULL, 0), 0);
        for (uint32_t i = 0; i < n; i++) {
            wg_txn_random(&txns[i], &seed, &pool, &shape, 1 + round % 3, 0x100000 + i * 1000);
            encode_txn(enc, &txns[i]);
            if (aamm_test_rand(&seed) % 4 == 0)
                ck_assert_int_eq(aamm_wire_encoder_flush(enc), 0);
            if (aamm_test_rand(&seed) % 2 == 0)
                drain(enc, &b);
        }
        ck_assert_int_eq(aamm_wire_encoder_flush(enc), 0);
        drain(enc, &b);
        ck_assert_uint_eq(aamm_wire_encoder_buffered(enc), 0);
        c.txns = txns;
        c.ntxns = n;
        ck_assert_int_eq(aamm_wire_decoder_new(&dec, &o, NULL, 0), 0);
        decode_all(dec, &b, &seed, round % 2 ? 7 : 70000, &c);
        aamm_wire_decoder_free(dec);
        aamm_wire_encoder_free(enc);
        for (uint32_t i = 0; i < n; i++)
            wg_txn_free(&txns[i]);
        free(txns);
        wg_pool_free(&pool);
        free(b.p);
        total += n;
    }
    ck_assert_int_ge(total, 400);
}
END_TEST

/* Values of megabytes (larger than a frame) travel as pieces; the decoder never accepts a
 * frame above its payload limit and reproduces the values exactly. */
START_TEST(big_values_roundtrip)
{
    uint64_t seed = aamm_test_seed("big_values_roundtrip");
    struct wg_pool pool;
    struct aamm_wire_options o = {.frame_payload = 64 * 1024, .max_payload = 64 * 1024 + 64};
    struct aamm_wire_encoder *enc;
    struct aamm_wire_decoder *dec;
    struct bytes b = {0};
    struct checker c = {0};
    struct wg_txn txns[4];
    uint32_t sizes[4] = {3u << 20, 200 * 1024, 65536 - 10, 5u << 20};
    wg_pool_init(&pool, &seed, 3);
    ck_assert_int_eq(aamm_wire_encoder_new(&enc, &o, NULL, 0), 0);
    for (int i = 0; i < 4; i++) {
        struct wg_shape shape = {3, 100, sizes[i], i % 2 == 0};
        wg_txn_random(&txns[i], &seed, &pool, &shape, 5, 0x5000 + (uint64_t)i * 100);
        encode_txn(enc, &txns[i]);
        drain(enc, &b);
    }
    ck_assert_int_eq(aamm_wire_encoder_flush(enc), 0);
    drain(enc, &b);
    /* every frame within the limit */
    for (size_t off = 0; off < b.len;) {
        uint32_t plen = (uint32_t)b.p[off + 8] | ((uint32_t)b.p[off + 9] << 8) |
                        ((uint32_t)b.p[off + 10] << 16) | ((uint32_t)b.p[off + 11] << 24);
        ck_assert_uint_le(plen, o.max_payload);
        off += AAMM_WIRE_HEADER_SIZE + plen;
    }
    c.txns = txns;
    c.ntxns = 4;
    ck_assert_int_eq(aamm_wire_decoder_new(&dec, &o, NULL, 0), 0);
    decode_all(dec, &b, &seed, 100000, &c);
    aamm_wire_decoder_free(dec);
    aamm_wire_encoder_free(enc);
    for (int i = 0; i < 4; i++)
        wg_txn_free(&txns[i]);
    wg_pool_free(&pool);
    free(b.p);
}
END_TEST

/* A stream fed one byte at a time decodes to the same transactions, and the decoder says
 * "need more" (EAGAIN) until each frame is complete. */
START_TEST(one_byte_chunks)
{
    uint64_t seed = aamm_test_seed("one_byte_chunks");
    struct wg_pool pool;
    struct aamm_wire_encoder *enc;
    struct aamm_wire_decoder *dec;
    struct wg_txn txns[20];
    struct wg_shape shape = {6, 200, 0, true};
    struct bytes b = {0};
    struct checker c = {txns, 20, 0, 0, false};
    wg_pool_init(&pool, &seed, 4);
    ck_assert_int_eq(aamm_wire_encoder_new(&enc, NULL, NULL, 0), 0);
    for (int i = 0; i < 20; i++) {
        wg_txn_random(&txns[i], &seed, &pool, &shape, 1, 1000 + (uint64_t)i * 100);
        encode_txn(enc, &txns[i]);
        if (i % 3 == 0)
            aamm_wire_encoder_flush(enc);
    }
    aamm_wire_encoder_flush(enc);
    drain(enc, &b);
    ck_assert_int_eq(aamm_wire_decoder_new(&dec, NULL, NULL, 0), 0);
    decode_all(dec, &b, &seed, 1, &c);
    aamm_wire_decoder_free(dec);
    aamm_wire_encoder_free(enc);
    for (int i = 0; i < 20; i++)
        wg_txn_free(&txns[i]);
    wg_pool_free(&pool);
    free(b.p);
}
END_TEST

/* A relation is described once per connection: the second change on the same relation
 * costs only its id, and a changed definition is sent again (the decoder then hands out the
 * new definition). */
START_TEST(relation_dictionary)
{
    struct aamm_column cols[2] = {{"id", "integer", 23, -1, AAMM_COLUMN_KEY},
                                  {"a_rather_long_column_name", "text", 25, -1, 0}};
    struct aamm_relation rel = {1, "public", "accounts_with_a_long_name", 'd', 2, cols, 1};
    struct aamm_value vals[2] = {{AAMM_VALUE_TEXT, 1, "1"}, {AAMM_VALUE_NULL, 0, NULL}};
    struct aamm_change ins = {.kind = AAMM_CHANGE_INSERT, .relation = &rel, .new_tuple = {2, vals}};
    struct aamm_transaction txn = {1, 2, 100, 140, 5, NULL, 0};
    struct aamm_wire_encoder *enc;
    struct aamm_wire_decoder *dec;
    struct aamm_wire_event ev;
    size_t l0, l1, l2, l3, acc;
    const uint8_t *p;
    ck_assert_int_eq(
        aamm_wire_encoder_new(&enc, &(struct aamm_wire_options){.compress_min = UINT32_MAX}, NULL, 0), 0);
    ck_assert_int_eq(aamm_wire_encode_begin(enc, &txn), 0);
    l0 = aamm_wire_encoder_buffered(enc);
    ck_assert_int_eq(aamm_wire_encode_change(enc, &ins), 0);
    l1 = aamm_wire_encoder_buffered(enc);
    ck_assert_int_eq(aamm_wire_encode_change(enc, &ins), 0);
    l2 = aamm_wire_encoder_buffered(enc);
    ck_assert_uint_gt(l1 - l0, 60);
    ck_assert_uint_le(l2 - l1, 8); /* 'I', id, count, 't', len, '1', 'n' = 7 bytes */
    cols[1].name = "renamed";
    ck_assert_int_eq(aamm_wire_encode_change(enc, &ins), 0);
    l3 = aamm_wire_encoder_buffered(enc);
    ck_assert_uint_gt(l3 - l2, 30);
    ck_assert_int_eq(aamm_wire_encode_commit(enc, &txn), 0);
    ck_assert_int_eq(aamm_wire_encoder_flush(enc), 0);
    p = aamm_wire_encoder_pending(enc, &acc);
    ck_assert_int_eq(aamm_wire_decoder_new(&dec, NULL, NULL, 0), 0);
    ck_assert_int_eq(aamm_wire_decoder_feed(dec, p, acc, &acc), 0);
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), 0);
    ck_assert_int_eq(ev.kind, AAMM_WIRE_EV_BEGIN);
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), 0);
    ck_assert_str_eq(ev.change.relation->columns[1].name, "a_rather_long_column_name");
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), 0);
    ck_assert_str_eq(ev.change.relation->columns[1].name, "a_rather_long_column_name");
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), 0);
    ck_assert_str_eq(ev.change.relation->columns[1].name, "renamed");
    ck_assert(aamm_relation_equal(ev.change.relation, &rel));
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), 0);
    ck_assert_int_eq(ev.kind, AAMM_WIRE_EV_COMMIT);
    ck_assert_uint_eq(ev.txn.end_lsn, 140);
    aamm_wire_decoder_free(dec);
    aamm_wire_encoder_free(enc);
}
END_TEST

/* A change taken out of the decoder belongs to the caller and survives later events. */
START_TEST(take_change)
{
    uint64_t seed = 11;
    struct wg_pool pool;
    struct wg_txn t;
    struct bytes b = {0};
    struct aamm_wire_decoder *dec;
    struct aamm_wire_event ev;
    struct aamm_change kept;
    size_t acc;
    one_txn_stream(&b, seed, &pool, &t, NULL);
    ck_assert_int_eq(aamm_wire_decoder_new(&dec, NULL, NULL, 0), 0);
    ck_assert_int_eq(aamm_wire_decoder_feed(dec, b.p, b.len, &acc), 0);
    ck_assert_int_eq(aamm_wire_decoder_take_change(dec, &kept), AAMM_ESTATE);
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), 0);
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), 0);
    ck_assert_int_eq(ev.kind, AAMM_WIRE_EV_CHANGE);
    ck_assert_int_eq(aamm_wire_decoder_take_change(dec, &kept), 0);
    while (aamm_wire_decoder_next(dec, &ev) == 0)
        ;
    ck_assert(wg_change_equal(&kept, &t.changes[0]));
    aamm_change_clear(&kept);
    aamm_wire_decoder_free(dec);
    wg_txn_free(&t);
    wg_pool_free(&pool);
    free(b.p);
}
END_TEST

/* LZ4 is used when it makes a payload smaller, and the flag says so. */
START_TEST(compression_flag)
{
    uint64_t seed = 3;
    struct wg_pool pool;
    struct wg_txn t;
    struct wg_shape shape = {20, 2000, 0, true};
    struct aamm_wire_encoder *enc, *raw;
    struct bytes b1 = {0}, b2 = {0};
    struct checker c = {&t, 1, 0, 0, false};
    struct aamm_wire_decoder *dec;
    wg_pool_init(&pool, &seed, 2);
    wg_txn_random(&t, &seed, &pool, &shape, 1, 500);
    ck_assert_int_eq(aamm_wire_encoder_new(&enc, NULL, NULL, 0), 0);
    ck_assert_int_eq(
        aamm_wire_encoder_new(&raw, &(struct aamm_wire_options){.compress_min = UINT32_MAX}, NULL, 0), 0);
    encode_txn(enc, &t);
    encode_txn(raw, &t);
    aamm_wire_encoder_flush(enc);
    aamm_wire_encoder_flush(raw);
    drain(enc, &b1);
    drain(raw, &b2);
    ck_assert_uint_eq(b1.p[6] & AAMM_WIRE_F_LZ4, AAMM_WIRE_F_LZ4);
    ck_assert_uint_eq(b2.p[6] & AAMM_WIRE_F_LZ4, 0);
    ck_assert_uint_lt(b1.len * 2, b2.len);
    ck_assert_int_eq(aamm_wire_decoder_new(&dec, NULL, NULL, 0), 0);
    decode_all(dec, &b1, &seed, 1000, &c);
    aamm_wire_decoder_free(dec);
    aamm_wire_encoder_free(enc);
    aamm_wire_encoder_free(raw);
    wg_txn_free(&t);
    wg_pool_free(&pool);
    free(b1.p);
    free(b2.p);
}
END_TEST

/* Small frames flushed one transaction at a time compress against the history of earlier
 * frames (LZ4 streaming): similar transactions shrink well below their raw size and decode
 * exactly; a decoder that missed the earlier frames cannot decode them and says so. */
START_TEST(compression_history)
{
    struct aamm_column cols[3] = {{"aid", "integer", 23, -1, AAMM_COLUMN_KEY},
                                  {"abalance", "integer", 23, -1, 0},
                                  {"filler", "character(84)", 1042, 88, 0}};
    struct aamm_relation rel = {1, "public", "pgbench_accounts", 'd', 3, cols, 1};
    struct aamm_wire_encoder *enc;
    struct bytes b = {0};
    size_t first_len = 0, last_start = 0;
    int compressed = 0, events, rc;
    char filler[85];
    memset(filler, ' ', 84);
    filler[84] = '\0';
    ck_assert_int_eq(aamm_wire_encoder_new(&enc, NULL, NULL, 0), 0);
    for (int i = 0; i < 200; i++) {
        char aid[16], bal[16];
        struct aamm_value v[3] = {
            {AAMM_VALUE_TEXT, 0, aid}, {AAMM_VALUE_TEXT, 0, bal}, {AAMM_VALUE_TEXT, 84, filler}};
        struct aamm_change ch = {.kind = AAMM_CHANGE_UPDATE, .relation = &rel, .new_tuple = {3, v}};
        struct aamm_transaction t = {1,
                                     (uint32_t)i,
                                     1000 + (uint64_t)i * 100,
                                     1040 + (uint64_t)i * 100,
                                     1700000000000000 + i,
                                     NULL,
                                     0};
        v[0].len = (uint32_t)snprintf(aid, sizeof aid, "%d", (i * 7919) % 100000);
        v[1].len = (uint32_t)snprintf(bal, sizeof bal, "%d", i * 13 - 500);
        last_start = b.len;
        encode_txn(enc, &(struct wg_txn){t, 1, &ch});
        ck_assert_int_eq(aamm_wire_encoder_flush(enc), 0);
        drain(enc, &b);
        if (i == 0)
            first_len = b.len;
        compressed += (b.p[last_start + 6] & AAMM_WIRE_F_LZ4) != 0;
    }
    ck_assert_int_gt(compressed, 150);
    ck_assert_uint_lt((b.len - last_start) * 2, first_len); /* later frames: far smaller */
    ck_assert_int_eq(decode_count(b.p, b.len, NULL, NULL, &events), 0);
    ck_assert_int_eq(events, 200 * 3);
    /* the last frame alone, without the history it refers to */
    rc = decode_count(b.p + last_start, b.len - last_start, NULL, NULL, &events);
    ck_assert(rc == AAMM_EMALFORMED);
    ck_assert_int_eq(events, 0);
    aamm_wire_encoder_free(enc);
    free(b.p);
}
END_TEST

/* ====================================================================================
 * Strictness and corruption
 * ==================================================================================== */

/* Flipping any bit, or xoring any byte with any value, anywhere in a valid DATA frame (and in
 * control frames, and in a MAC-protected frame) gives an error and never an event. */
START_TEST(flip_every_byte)
{
    uint64_t seed = 21;
    struct wg_pool pool;
    struct wg_txn t;
    struct bytes frames[3] = {{0}, {0}, {0}};
    struct aamm_wire_options o = {.max_relations = 16};
    aamm_wire_verify_cb vfs[3] = {NULL, NULL, toy_verify};
    long checked = 0;
    one_txn_stream(&frames[0], seed, &pool, &t, &o);
    {
        struct aamm_wire_encoder *enc;
        struct aamm_wire_hello h = {1, 1, AAMM_WIRE_ROLE_SENDER, 0, 7, 1, {1, 2, 3}, "c"};
        ck_assert_int_eq(aamm_wire_encoder_new(&enc, &o, NULL, 0), 0);
        ck_assert_int_eq(aamm_wire_encode_hello(enc, &h), 0);
        drain(enc, &frames[1]);
        ck_assert_int_eq(aamm_wire_encoder_set_mac(enc, toy_seal, NULL), 0);
        encode_txn(enc, &t);
        aamm_wire_encoder_flush(enc);
        drain(enc, &frames[2]);
        aamm_wire_encoder_free(enc);
    }
    for (int f = 0; f < 3; f++) {
        struct bytes *b = &frames[f];
        uint8_t *copy = malloc(b->len);
        int events, rc;
        rc = decode_count(b->p, b->len, &o, vfs[f], &events);
        ck_assert_int_eq(rc, 0);
        ck_assert_int_gt(events, 0);
        for (size_t pos = 0; pos < b->len; pos++) {
            for (unsigned x = 1; x < 256; x++) {
                memcpy(copy, b->p, b->len);
                copy[pos] ^= (uint8_t)x;
                rc = decode_count(copy, b->len, &o, vfs[f], &events);
                ck_assert_msg(rc < 0 && rc != AAMM_EAGAIN,
                              "frame %d: xor 0x%02x at %zu accepted (rc %d)", f, x, pos, rc);
                ck_assert_msg(events == 0, "frame %d: xor 0x%02x at %zu gave %d events", f, x, pos,
                              events);
                checked++;
            }
        }
        free(copy);
        free(b->p);
    }
    ck_assert_int_gt(checked, 10000);
    wg_txn_free(&t);
    wg_pool_free(&pool);
}
END_TEST

/* A frame cut at any length is "need more" until end of input, then an error (truncated),
 * and never yields an event. */
START_TEST(truncation_every_length)
{
    uint64_t seed = 22;
    struct wg_pool pool;
    struct wg_txn t;
    struct bytes b = {0};
    one_txn_stream(&b, seed, &pool, &t, NULL);
    for (size_t len = 0; len < b.len; len++) {
        int events;
        int rc = decode_count(b.p, len, NULL, NULL, &events);
        ck_assert_int_eq(events, 0);
        if (len == 0)
            ck_assert_int_eq(rc, 0);
        else
            ck_assert_msg(rc == AAMM_EMALFORMED, "cut at %zu: rc %d", len, rc);
    }
    {
        struct aamm_wire_decoder *dec;
        size_t acc;
        ck_assert_int_eq(aamm_wire_decoder_new(&dec, NULL, NULL, 0), 0);
        aamm_wire_decoder_feed(dec, b.p, b.len - 1, &acc);
        ck_assert_int_eq(aamm_wire_decoder_finish(dec), AAMM_EMALFORMED);
        ck_assert_msg(strstr(aamm_wire_decoder_errmsg(dec), "truncated frame") != NULL, "%s",
                      aamm_wire_decoder_errmsg(dec));
        aamm_wire_decoder_free(dec);
    }
    wg_txn_free(&t);
    wg_pool_free(&pool);
    free(b.p);
}
END_TEST

static void patch_crc(uint8_t *f, uint32_t avail)
{
    uint32_t plen =
        (uint32_t)f[8] | ((uint32_t)f[9] << 8) | ((uint32_t)f[10] << 16) | ((uint32_t)f[11] << 24);
    if (plen > avail) /* an oversize length needs no valid CRC: it is rejected first */
        plen = avail;
    uint32_t crc = aamm_crc32c(aamm_crc32c(0, f, 12), f + 16, plen);
    f[12] = (uint8_t)crc;
    f[13] = (uint8_t)(crc >> 8);
    f[14] = (uint8_t)(crc >> 16);
    f[15] = (uint8_t)(crc >> 24);
}

static int decode_with_msg(const uint8_t *p, size_t len, const char *want_in_msg)
{
    struct aamm_wire_decoder *dec;
    struct aamm_wire_event ev;
    size_t acc;
    int rc;
    ck_assert_int_eq(aamm_wire_decoder_new(&dec, NULL, NULL, 0), 0);
    aamm_wire_decoder_feed(dec, p, len, &acc);
    rc = aamm_wire_decoder_next(dec, &ev);
    while (rc == 0)
        rc = aamm_wire_decoder_next(dec, &ev);
    if (rc == AAMM_EAGAIN)
        rc = aamm_wire_decoder_finish(dec);
    ck_assert_msg(strstr(aamm_wire_decoder_errmsg(dec), want_in_msg) != NULL,
                  "message '%s' lacks '%s'", aamm_wire_decoder_errmsg(dec), want_in_msg);
    aamm_wire_decoder_free(dec);
    return rc;
}

/* Unknown version, type or flag bits, an oversize length (rejected from the header alone,
 * without waiting for the payload), a MAC where none is expected, a payload with trailing
 * bytes: each a clear error even when the CRC is right. */
START_TEST(strict_header)
{
    uint8_t f[64];
    size_t n;
    struct aamm_wire_encoder *enc;
    const uint8_t *p;
    ck_assert_int_eq(aamm_wire_encoder_new(&enc, NULL, NULL, 0), 0);
    ck_assert_int_eq(aamm_wire_encode_ack(enc, 1, 2), 0);
    p = aamm_wire_encoder_pending(enc, &n);
    ck_assert_uint_eq(n, 28);
    memcpy(f, p, n);
    aamm_wire_encoder_free(enc);
    ck_assert_int_eq(decode_with_msg(f, n, ""), 0);

    f[4] = 2;
    patch_crc(f, 48);
    ck_assert_int_eq(decode_with_msg(f, n, "protocol version 2"), AAMM_EMALFORMED);
    f[4] = 1;
    f[5] = 0x42;
    patch_crc(f, 48);
    ck_assert_int_eq(decode_with_msg(f, n, "unknown frame type 0x42"), AAMM_EMALFORMED);
    f[5] = AAMM_WIRE_ACK;
    f[7] = 0x80;
    patch_crc(f, 48);
    ck_assert_int_eq(decode_with_msg(f, n, "reserved flag"), AAMM_EMALFORMED);
    f[7] = 0;
    f[6] = AAMM_WIRE_F_LZ4;
    patch_crc(f, 48);
    ck_assert_int_eq(decode_with_msg(f, n, "compressed ACK"), AAMM_EMALFORMED);
    f[6] = AAMM_WIRE_F_MAC;
    patch_crc(f, 48);
    ck_assert_int_eq(decode_with_msg(f, n, "unexpectedly carries a MAC"), AAMM_EMALFORMED);
    f[6] = 0;
    f[10] = 0x7F; /* ~8 MB: above the limit, rejected from the 16 header bytes alone */
    patch_crc(f, 48);
    ck_assert_int_eq(decode_with_msg(f, 16, "above the limit"), AAMM_ETOOBIG);
    f[10] = 0;
    f[8] = 13; /* one trailing byte in an ACK payload */
    f[28] = 0;
    patch_crc(f, 48);
    ck_assert_int_eq(decode_with_msg(f, 29, "ACK payload"), AAMM_EMALFORMED);
    f[8] = 12;
    f[0] = 'G'; /* garbage (an HTTP client, say) */
    ck_assert_int_eq(decode_with_msg(f, n, "bad magic"), AAMM_EMALFORMED);
}
END_TEST

/* Errors are sticky: after one, the decoder accepts nothing more. */
START_TEST(errors_are_sticky)
{
    struct aamm_wire_decoder *dec;
    struct aamm_wire_event ev;
    size_t acc;
    ck_assert_int_eq(aamm_wire_decoder_new(&dec, NULL, NULL, 0), 0);
    ck_assert_int_eq(aamm_wire_decoder_feed(dec, "GET / HTTP/1.1\r\n\r\n", 18, &acc), 0);
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), AAMM_EMALFORMED);
    ck_assert_int_eq(aamm_wire_decoder_next(dec, &ev), AAMM_EMALFORMED);
    ck_assert_int_eq(aamm_wire_decoder_feed(dec, "x", 1, &acc), AAMM_EMALFORMED);
    ck_assert_uint_eq(acc, 0);
    ck_assert_int_eq(aamm_wire_decoder_finish(dec), AAMM_EMALFORMED);
    aamm_wire_decoder_free(dec);
}
END_TEST

/* The encoder refuses invalid sequences and changes with a clear code. */
START_TEST(encoder_validation)
{
    struct aamm_column cols[1] = {{"id", "integer", 23, -1, AAMM_COLUMN_KEY}};
    struct aamm_relation rel = {1, "public", "t", 'd', 1, cols, 1};
    struct aamm_value vals[2] = {{AAMM_VALUE_TEXT, 3, "a\0b"}, {AAMM_VALUE_NULL, 0, NULL}};
    struct aamm_change ch = {.kind = AAMM_CHANGE_INSERT, .relation = &rel, .new_tuple = {1, vals}};
    struct aamm_transaction txn = {1, 2, 100, 0, 5, NULL, 0};
    struct aamm_wire_encoder *enc;
    ck_assert_int_eq(aamm_wire_encoder_new(&enc, NULL, NULL, 0), 0);
    ck_assert_int_eq(aamm_wire_encode_change(enc, &ch), AAMM_ESTATE);
    ck_assert_int_eq(aamm_wire_encode_commit(enc, &txn), AAMM_ESTATE);
    ck_assert_int_eq(aamm_wire_encode_begin(enc, &txn), 0);
    ck_assert_int_eq(aamm_wire_encode_begin(enc, &txn), AAMM_ESTATE);
    ck_assert_int_eq(aamm_wire_encode_change(enc, &ch), AAMM_EINVAL); /* NUL in text */
    ch.new_tuple.values = &vals[1];
    ch.new_tuple.nvalues = 2;
    ck_assert_int_eq(aamm_wire_encode_change(enc, &ch), AAMM_EINVAL); /* count mismatch */
    ch.new_tuple.nvalues = 1;
    ck_assert_int_eq(aamm_wire_encode_change(enc, &ch), 0);
    ch.kind = AAMM_CHANGE_UPDATE;
    ch.old_kind = 'X';
    ck_assert_int_eq(aamm_wire_encode_change(enc, &ch), AAMM_EINVAL);
    ck_assert_int_eq(aamm_wire_encode_commit(enc, &txn), AAMM_EINVAL); /* no end LSN */
    txn.end_lsn = 140;
    ck_assert_int_eq(aamm_wire_encode_commit(enc, &txn), 0);
    ck_assert_int_eq(aamm_wire_encoder_set_version(enc, 9), AAMM_EUNSUPPORTED);
    aamm_wire_encoder_free(enc);
}
END_TEST

/* A frame altered after sealing fails the MAC hook (AAMM_EAUTH); a frame without a MAC where
 * one is required is refused too. */
START_TEST(mac_hooks)
{
    uint64_t seed = 8;
    struct wg_pool pool;
    struct wg_txn t;
    struct bytes plain = {0}, sealed = {0};
    struct aamm_wire_encoder *enc;
    int events;
    one_txn_stream(&plain, seed, &pool, &t, NULL);
    ck_assert_int_eq(aamm_wire_encoder_new(&enc, NULL, NULL, 0), 0);
    ck_assert_int_eq(aamm_wire_encoder_set_mac(enc, toy_seal, NULL), 0);
    encode_txn(enc, &t);
    aamm_wire_encoder_flush(enc);
    drain(enc, &sealed);
    aamm_wire_encoder_free(enc);
    ck_assert_uint_eq(sealed.len, plain.len + AAMM_WIRE_MAC_SIZE);
    ck_assert_int_eq(decode_count(sealed.p, sealed.len, NULL, toy_verify, &events), 0);
    ck_assert_int_eq(events, 2 + (int)t.nchanges);
    ck_assert_int_eq(decode_count(plain.p, plain.len, NULL, toy_verify, &events), AAMM_EAUTH);
    /* alter a payload byte and fix the CRC: only the MAC catches it */
    sealed.p[AAMM_WIRE_HEADER_SIZE + 3] ^= 1;
    patch_crc(sealed.p, (uint32_t)sealed.len);
    ck_assert_int_eq(decode_count(sealed.p, sealed.len, NULL, toy_verify, &events), AAMM_EAUTH);
    ck_assert_int_eq(events, 0);
    wg_txn_free(&t);
    wg_pool_free(&pool);
    free(plain.p);
    free(sealed.p);
}
END_TEST

/* Allocation failure at any point of encoding or decoding returns AAMM_ENOMEM (or succeeds)
 * and leaks nothing. */
START_TEST(alloc_failures)
{
    uint64_t seed = 31;
    struct wg_pool pool;
    struct wg_txn t;
    struct bytes good = {0};
    struct wg_shape shape = {8, 3000, 0, false};
    struct aamm_wire_options o = {.frame_payload = 1024, .compress_min = 64};
    int enc_ok = 0, dec_ok = 0;
    wg_pool_init(&pool, &seed, 3);
    wg_txn_random(&t, &seed, &pool, &shape, 1, 777);
    for (uint64_t n = 1; n < 400 && (enc_ok < 3 || dec_ok < 3); n++) {
        struct aamm_memory_stats before, after;
        struct aamm_wire_encoder *enc = NULL;
        struct aamm_wire_decoder *dec = NULL;
        int rc = 0;
        aamm_memory_stats(&before);
        aamm__alloc_fail_after(n);
        rc = aamm_wire_encoder_new(&enc, &o, NULL, 0);
        if (rc == 0)
            rc = aamm_wire_encode_begin(enc, &t.txn);
        for (uint32_t i = 0; rc == 0 && i < t.nchanges; i++)
            rc = aamm_wire_encode_change(enc, &t.changes[i]);
        if (rc == 0)
            rc = aamm_wire_encode_commit(enc, &t.txn);
        if (rc == 0)
            rc = aamm_wire_encoder_flush(enc);
        aamm__alloc_fail_after(0);
        ck_assert_msg(rc == 0 || rc == AAMM_ENOMEM, "encode rc %d", rc);
        if (rc == 0) {
            enc_ok++;
            if (good.len == 0)
                drain(enc, &good);
        }
        aamm_wire_encoder_free(enc);
        if (good.len > 0) {
            struct aamm_wire_event ev;
            size_t off = 0, acc;
            aamm__alloc_fail_after(n);
            rc = aamm_wire_decoder_new(&dec, &o, NULL, 0);
            while (rc == 0 || rc == AAMM_EAGAIN) {
                while ((rc = aamm_wire_decoder_next(dec, &ev)) == 0)
                    ;
                if (rc != AAMM_EAGAIN || off == good.len)
                    break;
                rc = aamm_wire_decoder_feed(dec, good.p + off,
                                            good.len - off < 100 ? good.len - off : 100, &acc);
                off += acc;
            }
            aamm__alloc_fail_after(0);
            ck_assert_msg(rc == AAMM_EAGAIN || rc == AAMM_ENOMEM, "decode rc %d", rc);
            if (rc == AAMM_EAGAIN)
                dec_ok++;
            aamm_wire_decoder_free(dec);
        }
        aamm_memory_stats(&after);
        ck_assert_uint_eq(before.in_use, after.in_use);
    }
    ck_assert_int_ge(enc_ok, 1);
    ck_assert_int_ge(dec_ok, 1);
    wg_txn_free(&t);
    wg_pool_free(&pool);
    free(good.p);
}
END_TEST

/* ====================================================================================
 * Golden frames (tests/golden/wire/): bytes deployed peers send
 * ==================================================================================== */

/*
 * Each scenario below is a script of encoder calls whose arguments are literal values. The
 * same script runs twice: once driving an encoder (whose output must equal the checked-in
 * tests/golden/wire/<name>.bin byte for byte) and once checking, event by event, that a
 * decoder fed the checked-in file hands out exactly those literal values. So a codec change
 * that alters the bytes on the wire fails here even when it round-trips with itself: such a
 * change needs a new protocol version (doc/protocol.md §6) and new golden files, never an
 * edited old one. AAMM_GOLDEN_UPDATE=1 rewrites the files from the current encoder (only
 * for new scenarios; tests/golden/wire/README.md says when).
 */

#define GOLDEN_LZ4_VERSION 10904 /* liblz4 that wrote the LZ4 files (LZ4_versionNumber) */

struct gctx {
    bool encoding;
    bool streaming;                /* encode split records one piece per call */
    struct aamm_wire_encoder *enc; /* encoding */
    struct bytes out;
    struct aamm_wire_decoder *dec; /* checking */
    uint64_t seal_seq, verify_seq; /* toy MAC sequence numbers, as the link's HMAC has */
    int step;
};

/* A toy MAC over a per-direction sequence number and the frame (the link uses HMAC-SHA256
 * in lib/link.c; the wire layer only places the 16-byte trailer and sets the flag). */
static void golden_mac(uint64_t seq, const uint8_t *frame, size_t len, uint8_t *mac)
{
    uint8_t s[8];
    uint32_t c;
    for (int i = 0; i < 8; i++)
        s[i] = (uint8_t)(seq >> (8 * i));
    c = aamm_crc32c(aamm_crc32c(0, s, 8), frame, len);
    for (int i = 0; i < AAMM_WIRE_MAC_SIZE; i++)
        mac[i] = (uint8_t)((c >> ((i % 4) * 8)) ^ (uint8_t)(i * 17));
}

static int golden_seal(struct aamm_wire_encoder *enc, const uint8_t *frame, size_t len,
                       uint8_t *mac, void *arg)
{
    struct gctx *g = arg;
    (void)enc;
    golden_mac(g->seal_seq++, frame, len, mac);
    return 0;
}

static int golden_verify(struct aamm_wire_decoder *dec, const uint8_t *frame, size_t len,
                         const uint8_t *mac, void *arg)
{
    struct gctx *g = arg;
    (void)dec;
    uint8_t want[AAMM_WIRE_MAC_SIZE];
    golden_mac(g->verify_seq++, frame, len, want);
    return memcmp(want, mac, sizeof want) == 0 ? 0 : AAMM_EAUTH;
}

/* The next decoded event, which must be of @kind. */
static const struct aamm_wire_event *g_next(struct gctx *g, enum aamm_wire_event_kind kind)
{
    static struct aamm_wire_event ev;
    int rc = aamm_wire_decoder_next(g->dec, &ev);
    g->step++;
    ck_assert_msg(rc == 0, "step %d: decoding: %s (rc %d)", g->step,
                  aamm_wire_decoder_errmsg(g->dec), rc);
    ck_assert_msg(ev.kind == kind, "step %d: event %d, expected %d", g->step, (int)ev.kind,
                  (int)kind);
    ck_assert_uint_eq(ev.frame_version, 1);
    return &ev;
}

static void g_enc_ok(struct gctx *g, int rc)
{
    ck_assert_msg(rc == 0, "encoding: %s (rc %d)", aamm_wire_encoder_errmsg(g->enc), rc);
    drain(g->enc, &g->out);
}

static void g_hello(struct gctx *g, const struct aamm_wire_hello *h)
{
    const struct aamm_wire_event *ev;
    if (g->encoding)
        return g_enc_ok(g, aamm_wire_encode_hello(g->enc, h));
    ev = g_next(g, AAMM_WIRE_EV_HELLO);
    ck_assert_uint_eq(ev->hello.min_version, h->min_version);
    ck_assert_uint_eq(ev->hello.max_version, h->max_version);
    ck_assert_uint_eq(ev->hello.role, h->role);
    ck_assert_uint_eq(ev->hello.flags, h->flags);
    ck_assert_uint_eq(ev->hello.node_id, h->node_id);
    ck_assert_int_eq(ev->hello.wall_time_us, h->wall_time_us);
    ck_assert_mem_eq(ev->hello.nonce, h->nonce, AAMM_WIRE_NONCE_SIZE);
    ck_assert_str_eq(ev->hello.cluster, h->cluster);
}

static void g_auth(struct gctx *g, const uint8_t *proof)
{
    if (g->encoding)
        return g_enc_ok(g, aamm_wire_encode_auth(g->enc, proof));
    ck_assert_mem_eq(g_next(g, AAMM_WIRE_EV_AUTH)->proof, proof, AAMM_WIRE_PROOF_SIZE);
}

static void g_resume(struct gctx *g, const struct aamm_wire_position *pos, uint32_t n)
{
    const struct aamm_wire_event *ev;
    if (g->encoding)
        return g_enc_ok(g, aamm_wire_encode_resume(g->enc, pos, n));
    ev = g_next(g, AAMM_WIRE_EV_RESUME);
    ck_assert_uint_eq(ev->npositions, n);
    for (uint32_t i = 0; i < n; i++) {
        ck_assert_uint_eq(ev->positions[i].origin_node, pos[i].origin_node);
        ck_assert_uint_eq(ev->positions[i].lsn, pos[i].lsn);
    }
}

static void g_ack(struct gctx *g, uint32_t origin, uint64_t lsn)
{
    const struct aamm_wire_event *ev;
    if (g->encoding)
        return g_enc_ok(g, aamm_wire_encode_ack(g->enc, origin, lsn));
    ev = g_next(g, AAMM_WIRE_EV_ACK);
    ck_assert_uint_eq(ev->origin_node, origin);
    ck_assert_uint_eq(ev->lsn, lsn);
}

static void g_heartbeat(struct gctx *g, int64_t t)
{
    if (g->encoding)
        return g_enc_ok(g, aamm_wire_encode_heartbeat(g->enc, t));
    ck_assert_int_eq(g_next(g, AAMM_WIRE_EV_HEARTBEAT)->wall_time_us, t);
}

static void g_error(struct gctx *g, int code, const char *msg)
{
    const struct aamm_wire_event *ev;
    if (g->encoding)
        return g_enc_ok(g, aamm_wire_encode_error(g->enc, code, msg));
    ev = g_next(g, code == 0 ? AAMM_WIRE_EV_GOODBYE : AAMM_WIRE_EV_ERROR);
    ck_assert_int_eq(ev->code, code);
    ck_assert_str_eq(ev->message, msg ? msg : "");
}

static void g_begin(struct gctx *g, const struct aamm_transaction *t)
{
    struct aamm_transaction want = *t;
    if (g->encoding)
        return g_enc_ok(g, aamm_wire_encode_begin(g->enc, t));
    want.end_lsn = AAMM_LSN_INVALID;
    ck_assert_msg(wg_txn_header_equal(&g_next(g, AAMM_WIRE_EV_BEGIN)->txn, &want),
                  "step %d: BEGIN differs", g->step);
}

static void g_change(struct gctx *g, const struct aamm_change *ch)
{
    const struct aamm_wire_event *ev;
    if (g->encoding) {
        int rc;
        while ((rc = aamm_wire_encode_change(g->enc, ch)) == AAMM_EAGAIN) {
            ck_assert(g->streaming);
            drain(g->enc, &g->out);
        }
        return g_enc_ok(g, rc);
    }
    ev = g_next(g, AAMM_WIRE_EV_CHANGE);
    ck_assert_msg(wg_change_equal(&ev->change, ch), "step %d: %s differs", g->step,
                  aamm_change_kind_name(ch->kind));
}

static void g_commit(struct gctx *g, const struct aamm_transaction *t)
{
    if (g->encoding)
        return g_enc_ok(g, aamm_wire_encode_commit(g->enc, t));
    ck_assert_msg(wg_txn_header_equal(&g_next(g, AAMM_WIRE_EV_COMMIT)->txn, t),
                  "step %d: COMMIT differs", g->step);
}

static void g_txn(struct gctx *g, const struct aamm_transaction *t, const struct aamm_change *ch,
                  int n)
{
    g_begin(g, t);
    for (int i = 0; i < n; i++)
        g_change(g, &ch[i]);
    g_commit(g, t);
}

static void g_flush(struct gctx *g)
{
    if (g->encoding)
        g_enc_ok(g, aamm_wire_encoder_flush(g->enc));
}

/* Frames from here on carry the toy MAC (the link switches after AUTH, §4.1 step 3). */
static void g_mac_on(struct gctx *g)
{
    if (g->encoding)
        g_enc_ok(g, aamm_wire_encoder_set_mac(g->enc, golden_seal, g));
    else
        aamm_wire_decoder_set_mac(g->dec, golden_verify, g);
}

/* ---- the literal values ---------------------------------------------------------- */

static struct aamm_column gcols_acc[3] = {{"id", "bigint", 20, -1, AAMM_COLUMN_KEY},
                                          {"owner", "character varying(40)", 1043, 44, 0},
                                          {"balance", "numeric(12,2)", 1700, 786438, 0}};
static struct aamm_relation grel_acc = {16384, "public",  "accounts", AAMM_REPLIDENT_DEFAULT,
                                        3,     gcols_acc, 1};
static struct aamm_column gcols_log[2] = {{"at", "timestamp with time zone", 1184, -1, 0},
                                          {"what", NULL, 0, -1, 0}};
static struct aamm_relation grel_log = {16390, "Audit Schema", "log", AAMM_REPLIDENT_FULL,
                                        2,     gcols_log,      1};
static struct aamm_column gcols_kv[2] = {{"k", "text", 25, -1, AAMM_COLUMN_KEY},
                                         {"v", "bytea", 17, -1, 0}};
static struct aamm_relation grel_kv = {16400, "app", "kv", AAMM_REPLIDENT_INDEX, 2, gcols_kv, 1};
static struct aamm_relation grel_empty = {16410, "public", "no_columns", AAMM_REPLIDENT_NOTHING, 0,
                                          NULL,  1};

/* clang-format off */
#define TXT(s) {AAMM_VALUE_TEXT, sizeof(s) - 1, s}
#define VNULL {AAMM_VALUE_NULL, 0, NULL}
#define VUNCH {AAMM_VALUE_UNCHANGED, 0, NULL}
/* clang-format on */

static void golden_hello(struct gctx *g)
{
    struct aamm_wire_hello s = {1, 1, AAMM_WIRE_ROLE_SENDER, 0, 1, 1700000000123456, {0}, "prod"};
    struct aamm_wire_hello r = {
        1,  1,   AAMM_WIRE_ROLE_RECEIVER,     AAMM_WIRE_HELLO_TLS, 0xFEDCBA98u,
        -5, {0}, "a cluster name with spaces"};
    for (int i = 0; i < AAMM_WIRE_NONCE_SIZE; i++) {
        s.nonce[i] = (uint8_t)(0xA0 + i);
        r.nonce[i] = (uint8_t)(255 - 7 * i);
    }
    g_hello(g, &s);
    g_hello(g, &r);
}

static void golden_auth(struct gctx *g)
{
    uint8_t proof[AAMM_WIRE_PROOF_SIZE];
    for (int i = 0; i < AAMM_WIRE_PROOF_SIZE; i++)
        proof[i] = (uint8_t)(i * 37 + 1);
    g_auth(g, proof);
}

static void golden_resume(struct gctx *g)
{
    static const struct aamm_wire_position pos[3] = {{1, 0x16B3F28}, {2, UINT64_MAX}, {200, 0}};
    g_resume(g, pos, 3);
    g_resume(g, NULL, 0);
}

static void golden_ack(struct gctx *g)
{
    g_ack(g, 3, 0x1234ABCD5678ull);
}

static void golden_heartbeat(struct gctx *g)
{
    g_heartbeat(g, 1767225600000001);
    g_heartbeat(g, -1);
}

static void golden_error(struct gctx *g)
{
    g_error(g, AAMM_EAUTH, "proof does not verify");
    g_error(g, AAMM_EMALFORMED, NULL);
}

static void golden_goodbye(struct gctx *g)
{
    g_error(g, 0, "shutting down");
}

/* Every record type but 'P': BEGIN with and without origin, RELATION (every replica
 * identity but 'n', a column without type name, type modifiers), INSERT, UPDATE with each old
 * kind and an unchanged-TOAST value, DELETE by key and full row, TRUNCATE with both flags,
 * transactional and non-transactional MESSAGE (content with a NUL), COMMIT with and without
 * new commit LSN/time, a negative end-commit delta. */
static void golden_data_records(struct gctx *g)
{
    struct aamm_value a1[3] = {TXT("1"), TXT("Zoë O'Brien"), TXT("-12.50")};
    struct aamm_value a2[3] = {TXT("1"), VUNCH, TXT("100.00")};
    struct aamm_value k1[3] = {TXT("1"), VNULL, VNULL};
    struct aamm_value a3[3] = {TXT("2"), TXT(""), VNULL};
    struct aamm_value l1[2] = {TXT("2026-01-01 00:00:00+00"), TXT("a\tb\nc \"quoted\" \\")};
    struct aamm_value kv1[2] = {TXT("key"), TXT("\\x00ff")};
    struct aamm_value kv2[2] = {TXT("key2"), VNULL};
    const struct aamm_relation *trunc[2] = {&grel_acc, &grel_log};
    struct aamm_change ch[] = {
        {.kind = AAMM_CHANGE_INSERT, .relation = &grel_acc, .new_tuple = {3, a1}},
        {.kind = AAMM_CHANGE_UPDATE, .relation = &grel_acc, .new_tuple = {3, a2}},
        {.kind = AAMM_CHANGE_UPDATE,
         .relation = &grel_acc,
         .old_kind = AAMM_OLD_KEY,
         .old_tuple = {3, k1},
         .new_tuple = {3, a3}},
        {.kind = AAMM_CHANGE_INSERT, .relation = &grel_log, .new_tuple = {2, l1}},
        {.kind = AAMM_CHANGE_UPDATE,
         .relation = &grel_log,
         .old_kind = AAMM_OLD_FULL,
         .old_tuple = {2, l1},
         .new_tuple = {2, l1}},
        {.kind = AAMM_CHANGE_DELETE,
         .relation = &grel_acc,
         .old_kind = AAMM_OLD_KEY,
         .old_tuple = {3, k1}},
        {.kind = AAMM_CHANGE_DELETE,
         .relation = &grel_log,
         .old_kind = AAMM_OLD_FULL,
         .old_tuple = {2, l1}},
        {.kind = AAMM_CHANGE_TRUNCATE,
         .nrelations = 2,
         .relations = trunc,
         .truncate_flags = AAMM_TRUNCATE_CASCADE | AAMM_TRUNCATE_RESTART_IDENTITY},
        {.kind = AAMM_CHANGE_MESSAGE,
         .transactional = true,
         .message_lsn = 0x16B3F00,
         .prefix = "aamm_ddl",
         .content_len = 9,
         .content = "ALTER\0TAB"},
    };
    struct aamm_change ch2[] = {
        {.kind = AAMM_CHANGE_INSERT, .relation = &grel_kv, .new_tuple = {2, kv1}},
        {.kind = AAMM_CHANGE_INSERT, .relation = &grel_kv, .new_tuple = {2, kv2}},
        {.kind = AAMM_CHANGE_INSERT, .relation = &grel_empty, .new_tuple = {0, NULL}},
        {.kind = AAMM_CHANGE_TRUNCATE, .nrelations = 1, .relations = trunc, .truncate_flags = 0},
        {.kind = AAMM_CHANGE_MESSAGE,
         .transactional = true,
         .message_lsn = 7,
         .prefix = "",
         .content_len = 0,
         .content = ""},
    };
    struct aamm_change nontx = {.kind = AAMM_CHANGE_MESSAGE,
                                .transactional = false,
                                .message_lsn = 0x16B4000,
                                .prefix = "app/notice",
                                .content_len = 5,
                                .content = "hello"};
    struct aamm_transaction t1 = {1, 731, 0x16B3F28, 0x16B3F58, 1767225600000000, NULL, 0};
    struct aamm_transaction t2 = {2,
                                  4000000000u,
                                  0x1000000000ull,
                                  0x1000000040ull,
                                  -86400000000,
                                  "aamm_from_2",
                                  0xFFFFFFFF00000001ull};
    g_txn(g, &t1, ch, (int)(sizeof ch / sizeof ch[0]));
    g_change(g, &nontx);
    g_flush(g);
    /* the second transaction's commit moved (streamed transaction): 'C' carries it */
    g_begin(g, &t2);
    for (size_t i = 0; i < sizeof ch2 / sizeof ch2[0]; i++)
        g_change(g, &ch2[i]);
    t2.commit_lsn = 0x1000000100ull; /* end - commit < 0: the zigzag delta is negative */
    t2.commit_time = -86399999999;
    g_commit(g, &t2);
    g_flush(g);
}

/* Small similar transactions flushed one by one: the first frames plain or compressed on
 * their own, later ones compressed against the history of earlier frames; one payload below
 * compress_min stays plain. */
static void golden_data_lz4(struct gctx *g)
{
    for (int i = 0; i < 5; i++) {
        char id[8], owner[64];
        struct aamm_value v[3] = {
            {AAMM_VALUE_TEXT, 0, id}, {AAMM_VALUE_TEXT, 0, owner}, TXT("0.00")};
        struct aamm_change ch = {
            .kind = AAMM_CHANGE_INSERT, .relation = &grel_acc, .new_tuple = {3, v}};
        struct aamm_transaction t = {1,
                                     100u + (uint32_t)i,
                                     0x2000000 + (uint64_t)i * 0x100,
                                     0x2000030 + (uint64_t)i * 0x100,
                                     1767225600000000 + i * 1000,
                                     NULL,
                                     0};
        v[0].len = (uint32_t)snprintf(id, sizeof id, "%d", 1000 + i);
        v[1].len = (uint32_t)snprintf(owner, sizeof owner,
                                      "owner number %d of the accounts table, a longish name", i);
        g_txn(g, &t, &ch, 1);
        g_flush(g);
    }
    {
        struct aamm_change m = {.kind = AAMM_CHANGE_MESSAGE,
                                .message_lsn = 1,
                                .prefix = "p",
                                .content_len = 1,
                                .content = "x"};
        g_change(g, &m); /* 15 bytes: below compress_min */
        g_flush(g);
    }
}

/* Records larger than a frame (frame_payload 1024): a text value and a message content
 * split into 'P' pieces, each alone in a DATA frame. */
static void golden_pieces(struct gctx *g, bool compressible)
{
    static char big[3000], content[2500];
    struct aamm_value v[2] = {TXT("big"), {AAMM_VALUE_TEXT, sizeof big, big}};
    struct aamm_change ch[3] = {
        {.kind = AAMM_CHANGE_INSERT, .relation = &grel_kv, .new_tuple = {2, v}},
        {.kind = AAMM_CHANGE_MESSAGE,
         .transactional = true,
         .message_lsn = 0x3000000,
         .prefix = "aamm_ddl",
         .content_len = sizeof content,
         .content = content},
        {.kind = AAMM_CHANGE_DELETE,
         .relation = &grel_kv,
         .old_kind = AAMM_OLD_FULL,
         .old_tuple = {2, v}},
    };
    struct aamm_transaction t = {5, 9, 0x3000100, 0x3000130, 1767225600000000, NULL, 0};
    uint64_t seed = 0x601DE4;
    for (size_t i = 0; i < sizeof big; i++)
        big[i] = compressible ? "abcabcabd"[i % 9] : (char)('!' + aamm_test_rand(&seed) % 90);
    for (size_t i = 0; i < sizeof content; i++)
        content[i] = compressible ? (char)('a' + i % 7) : (char)(aamm_test_rand(&seed) & 0xFF);
    g_txn(g, &t, ch, 3);
    g_flush(g);
}

static void golden_pieces_plain(struct gctx *g)
{
    golden_pieces(g, false);
}

static void golden_pieces_lz4(struct gctx *g)
{
    golden_pieces(g, true);
}

/* The relation dictionary with room for 2: a third relation evicts the oldest entry not
 * needed by the current change, a changed definition is sent again under its id. */
static void golden_dictionary(struct gctx *g)
{
    struct aamm_column cols2[3] = {{"id", "bigint", 20, -1, AAMM_COLUMN_KEY},
                                   {"owner_name", "character varying(40)", 1043, 44, 0},
                                   {"balance", "numeric(12,2)", 1700, 786438, 0}};
    struct aamm_relation acc2 = {16384, "public", "accounts", AAMM_REPLIDENT_DEFAULT, 3, cols2, 2};
    struct aamm_value a[3] = {TXT("7"), TXT("x"), VNULL};
    struct aamm_value k[2] = {TXT("k"), VNULL};
    struct aamm_value l[2] = {VNULL, TXT("l")};
    const struct aamm_relation *both[2] = {&grel_kv, &grel_log};
    struct aamm_change ch[] = {
        {.kind = AAMM_CHANGE_INSERT, .relation = &grel_acc, .new_tuple = {3, a}},
        {.kind = AAMM_CHANGE_INSERT, .relation = &grel_kv, .new_tuple = {2, k}},
        {.kind = AAMM_CHANGE_INSERT, .relation = &grel_log, .new_tuple = {2, l}},
        {.kind = AAMM_CHANGE_INSERT, .relation = &grel_acc, .new_tuple = {3, a}},
        {.kind = AAMM_CHANGE_TRUNCATE, .nrelations = 2, .relations = both},
        {.kind = AAMM_CHANGE_INSERT, .relation = &acc2, .new_tuple = {3, a}},
        {.kind = AAMM_CHANGE_INSERT, .relation = &acc2, .new_tuple = {3, a}},
    };
    struct aamm_transaction t = {3, 77, 0x4000000, 0x4000030, 1, NULL, 0};
    g_txn(g, &t, ch, (int)(sizeof ch / sizeof ch[0]));
    g_flush(g);
}

/* A link's first frames: HELLO and AUTH plain, then MAC mode for control and (compressed)
 * DATA frames alike. */
static void golden_mac_session(struct gctx *g)
{
    struct aamm_wire_hello h = {1, 1, AAMM_WIRE_ROLE_SENDER, 0, 4, 1767225600000000, {0}, "prod"};
    uint8_t proof[AAMM_WIRE_PROOF_SIZE];
    struct aamm_wire_position pos = {4, 0x5000000};
    struct aamm_value v[3] = {TXT("42"),
                              TXT("a value that repeats, a value that repeats, "
                                  "a value that repeats"),
                              TXT("1.00")};
    struct aamm_change ch = {
        .kind = AAMM_CHANGE_INSERT, .relation = &grel_acc, .new_tuple = {3, v}};
    struct aamm_transaction t = {4, 5, 0x5000100, 0x5000130, 1767225600000001, NULL, 0};
    for (int i = 0; i < AAMM_WIRE_NONCE_SIZE; i++)
        h.nonce[i] = (uint8_t)i;
    memset(proof, 0x5A, sizeof proof);
    g_hello(g, &h);
    g_auth(g, proof);
    g_mac_on(g);
    g_resume(g, &pos, 1);
    g_txn(g, &t, &ch, 1);
    g_flush(g);
    g_ack(g, 4, 0x5000130);
    g_heartbeat(g, 1767225600500000);
    g_error(g, 0, "bye");
}

static const struct golden {
    const char *name;
    void (*script)(struct gctx *g);
    struct aamm_wire_options opts;
    bool lz4;           /* holds LZ4 frames: bytes depend on liblz4's compressor */
    bool streaming;     /* encode it a second time in streaming mode: same bytes */
    const char *frames; /* each frame's type and flags, in order */
} goldens[] = {
    {"hello", golden_hello, {0}, false, false, "HELLO HELLO"},
    {"auth", golden_auth, {0}, false, false, "AUTH"},
    {"resume", golden_resume, {0}, false, false, "RESUME RESUME"},
    {"ack", golden_ack, {0}, false, false, "ACK"},
    {"heartbeat", golden_heartbeat, {0}, false, false, "HEARTBEAT HEARTBEAT"},
    {"error", golden_error, {0}, false, false, "ERROR ERROR"},
    {"goodbye", golden_goodbye, {0}, false, false, "GOODBYE"},
    {"data_records", golden_data_records, {.compress_min = UINT32_MAX}, false, false, "DATA DATA"},
    {"data_lz4",
     golden_data_lz4,
     {0},
     true,
     false,
     "DATA DATA+LZ4 DATA+LZ4 DATA+LZ4 DATA+LZ4 DATA"},
    {"pieces",
     golden_pieces_plain,
     {.frame_payload = 1024, .compress_min = UINT32_MAX},
     false,
     true,
     "DATA DATA DATA DATA DATA DATA DATA DATA DATA DATA DATA DATA DATA"},
    {"pieces_lz4",
     golden_pieces_lz4,
     {.frame_payload = 1024},
     true,
     true,
     "DATA DATA+LZ4 DATA+LZ4 DATA+LZ4 DATA DATA+LZ4 DATA+LZ4 DATA+LZ4 DATA+LZ4 DATA+LZ4 "
     "DATA+LZ4 DATA DATA"},
    {"dictionary",
     golden_dictionary,
     {.max_relations = 2, .compress_min = UINT32_MAX},
     false,
     false,
     "DATA"},
    {"mac_session",
     golden_mac_session,
     {0},
     true,
     false,
     "HELLO AUTH RESUME+MAC DATA+LZ4+MAC ACK+MAC HEARTBEAT+MAC GOODBYE+MAC"},
};

/* The frames of @b as "TYPE[+LZ4][+MAC] ..." (walking headers only). */
static void frame_list(const struct bytes *b, char *out, size_t cap)
{
    static const char *names[17] = {NULL,        "HELLO", "AUTH",    "RESUME",     "ACK",
                                    "HEARTBEAT", "ERROR", "GOODBYE", [16] = "DATA"};
    size_t off = 0, n = 0;
    out[0] = '\0';
    while (off + AAMM_WIRE_HEADER_SIZE <= b->len) {
        const uint8_t *h = b->p + off;
        uint16_t flags = (uint16_t)(h[6] | h[7] << 8);
        uint32_t plen =
            (uint32_t)h[8] | (uint32_t)h[9] << 8 | (uint32_t)h[10] << 16 | (uint32_t)h[11] << 24;
        n += (size_t)snprintf(out + n, cap - n, "%s%s%s%s", n ? " " : "",
                              h[5] < 17 && names[h[5]] ? names[h[5]] : "?",
                              flags & AAMM_WIRE_F_LZ4 ? "+LZ4" : "",
                              flags & AAMM_WIRE_F_MAC ? "+MAC" : "");
        ck_assert_uint_lt(n, cap);
        off += AAMM_WIRE_HEADER_SIZE + plen + (flags & AAMM_WIRE_F_MAC ? AAMM_WIRE_MAC_SIZE : 0);
    }
    ck_assert_uint_eq(off, b->len);
}

static void golden_encode(const struct golden *gd, bool streaming, struct bytes *out)
{
    struct gctx g = {.encoding = true, .streaming = streaming};
    ck_assert_int_eq(aamm_wire_encoder_new(&g.enc, &gd->opts, NULL, 0), 0);
    ck_assert_int_eq(aamm_wire_encoder_set_streaming(g.enc, streaming), 0);
    gd->script(&g);
    ck_assert_int_eq(aamm_wire_encoder_flush(g.enc), 0);
    drain(g.enc, &g.out);
    ck_assert_uint_eq(aamm_wire_encoder_buffered(g.enc), 0);
    aamm_wire_encoder_free(g.enc);
    *out = g.out;
}

static void golden_path(const struct golden *gd, char *path, size_t cap)
{
    snprintf(path, cap, "%s/tests/golden/wire/%s.bin", AAMM_TOP_SRCDIR, gd->name);
}

static bool golden_read(const char *path, struct bytes *b)
{
    FILE *f = fopen(path, "rb");
    uint8_t buf[4096];
    size_t n;
    if (f == NULL)
        return false;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0)
        bytes_add(b, buf, n);
    fclose(f);
    return true;
}

/* Each checked-in golden stream decodes, event by event, to the literal values of its
 * scenario, and today's encoder reproduces it byte for byte from those values (in streaming
 * mode too where records are split). */
START_TEST(golden_frames)
{
    const struct golden *gd = &goldens[_i];
    const char *update = getenv("AAMM_GOLDEN_UPDATE");
    char path[4096], frames[4096];
    struct bytes file = {0}, mine = {0};
    golden_path(gd, path, sizeof path);
    golden_encode(gd, false, &mine);
    if (update != NULL && strcmp(update, "1") == 0) {
        FILE *f = fopen(path, "wb");
        ck_assert_msg(f != NULL, "cannot write %s", path);
        ck_assert_uint_eq(fwrite(mine.p, 1, mine.len, f), mine.len);
        ck_assert_int_eq(fclose(f), 0);
        frame_list(&mine, frames, sizeof frames);
        printf("golden: wrote %s (%zu bytes: %s)\n", path, mine.len, frames);
    }
    ck_assert_msg(golden_read(path, &file), "cannot read %s", path);

    /* 1. the frames it holds */
    frame_list(&file, frames, sizeof frames);
    ck_assert_msg(strcmp(frames, gd->frames) == 0, "%s holds %s, expected %s", path, frames,
                  gd->frames);

    /* 2. today's decoder: exactly the scenario's values, nothing more */
    {
        struct gctx g = {.encoding = false};
        struct aamm_wire_event ev;
        size_t acc = 0;
        ck_assert_int_eq(aamm_wire_decoder_new(&g.dec, &gd->opts, NULL, 0), 0);
        ck_assert_int_eq(aamm_wire_decoder_feed(g.dec, file.p, file.len, &acc), 0);
        ck_assert_uint_eq(acc, file.len);
        gd->script(&g);
        ck_assert_int_eq(aamm_wire_decoder_next(g.dec, &ev), AAMM_EAGAIN);
        ck_assert_int_eq(aamm_wire_decoder_finish(g.dec), 0);
        aamm_wire_decoder_free(g.dec);
    }

    /* 3. today's encoder: the same bytes */
    if (gd->lz4 && LZ4_versionNumber() != GOLDEN_LZ4_VERSION) {
        printf("golden %s: liblz4 %d, files written with %d: byte comparison skipped\n", gd->name,
               LZ4_versionNumber(), GOLDEN_LZ4_VERSION);
    } else {
        for (int streaming = 0; streaming <= (gd->streaming ? 1 : 0); streaming++) {
            struct bytes b = {0};
            size_t at = 0;
            if (streaming)
                golden_encode(gd, true, &b);
            else
                b = mine;
            while (at < b.len && at < file.len && b.p[at] == file.p[at])
                at++;
            ck_assert_msg(b.len == file.len && at == file.len,
                          "%s%s: encoder output (%zu bytes) differs from the golden file (%zu "
                          "bytes) at offset %zu",
                          path, streaming ? " (streaming)" : "", b.len, file.len, at);
            if (streaming)
                free(b.p);
        }
    }
    free(mine.p);
    free(file.p);
}
END_TEST

static Suite *wire_suite(void)
{
    Suite *s = suite_create("wire");
    TCase *tc = aamm_test_tcase("codec", 60);
    tcase_add_test(tc, crc32c_vectors);
    tcase_add_test(tc, control_roundtrip);
    tcase_add_test(tc, random_roundtrip);
    tcase_add_test(tc, big_values_roundtrip);
    tcase_add_test(tc, one_byte_chunks);
    tcase_add_test(tc, relation_dictionary);
    tcase_add_test(tc, take_change);
    tcase_add_test(tc, compression_flag);
    tcase_add_test(tc, compression_history);
    suite_add_tcase(s, tc);
    tc = aamm_test_tcase("strict", 60);
    tcase_add_test(tc, flip_every_byte);
    tcase_add_test(tc, truncation_every_length);
    tcase_add_test(tc, strict_header);
    tcase_add_test(tc, errors_are_sticky);
    tcase_add_test(tc, encoder_validation);
    tcase_add_test(tc, mac_hooks);
    tcase_add_test(tc, alloc_failures);
    suite_add_tcase(s, tc);
    tc = aamm_test_tcase("golden", 60);
    tcase_add_loop_test(tc, golden_frames, 0, (int)(sizeof goldens / sizeof goldens[0]));
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return aamm_test_run(wire_suite());
}
