/*
 * bench_wire.c: wire codec throughput on synthetic streams shaped like pgbench (TPC-B-like:
 * 3 updates + 1 insert per transaction) and like a bulk insert (1000 rows per transaction).
 * Prints BENCH lines: encode+compress and decode+decompress MB/s (of uncompressed record
 * bytes) and txns/s, bytes per transaction on the wire, and the wire size relative to the
 * pgoutput (proto_version 1) bytes of the same stream, computed from pgoutput's message layout
 * (the "_synthetic" ratios; the real-slot ratio needs capture).
 *
 * usage: bench_wire [scale]   (scale multiplies the transaction counts; default 1)
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <aamm/wire.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t rng = 88172645463325252ull;
static uint32_t rnd(uint32_t n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)(rng % n);
}

/* ---- a stream: transactions as arrays of changes ------------------------------------ */

#define MAXCH 1000
struct txn {
    struct aamm_transaction t;
    uint32_t n;
    struct aamm_change ch[MAXCH];
    struct aamm_value vals[MAXCH][6];
    char buf[MAXCH][6][128];
};

static struct aamm_column acc_cols[] = {{"aid", "integer", 23, -1, 1},
                                        {"bid", "integer", 23, -1, 0},
                                        {"abalance", "integer", 23, -1, 0},
                                        {"filler", "character(84)", 1042, 88, 0}};
static struct aamm_column tel_cols[] = {{"tid", "integer", 23, -1, 1},
                                        {"bid", "integer", 23, -1, 0},
                                        {"tbalance", "integer", 23, -1, 0},
                                        {"filler", "character(84)", 1042, 88, 0}};
static struct aamm_column br_cols[] = {{"bid", "integer", 23, -1, 1},
                                       {"bbalance", "integer", 23, -1, 0},
                                       {"filler", "character(88)", 1042, 92, 0}};
static struct aamm_column his_cols[] = {{"tid", "integer", 23, -1, 0},
                                        {"bid", "integer", 23, -1, 0},
                                        {"aid", "integer", 23, -1, 0},
                                        {"delta", "integer", 23, -1, 0},
                                        {"mtime", "timestamp without time zone", 1114, -1, 0},
                                        {"filler", "character(22)", 1042, 26, 0}};
static struct aamm_column bulk_cols[] = {{"id", "bigint", 20, -1, 1},
                                         {"payload", "text", 25, -1, 0},
                                         {"created", "timestamp with time zone", 1184, -1, 0}};
static struct aamm_relation acc = {16400, "public", "pgbench_accounts", 'd', 4, acc_cols, 1};
static struct aamm_relation tel = {16401, "public", "pgbench_tellers", 'd', 4, tel_cols, 1};
static struct aamm_relation br = {16402, "public", "pgbench_branches", 'd', 3, br_cols, 1};
static struct aamm_relation his = {16403, "public", "pgbench_history", 'd', 6, his_cols, 1};
static struct aamm_relation bulk = {16500, "public", "bulk_items", 'd', 3, bulk_cols, 1};

static void setv(struct txn *x, uint32_t c, uint32_t i, const char *s)
{
    if (s == NULL) {
        x->vals[c][i].kind = AAMM_VALUE_NULL;
        x->vals[c][i].len = 0;
        x->vals[c][i].data = NULL;
        return;
    }
    snprintf(x->buf[c][i], sizeof x->buf[c][i], "%s", s);
    x->vals[c][i].kind = AAMM_VALUE_TEXT;
    x->vals[c][i].len = (uint32_t)strlen(x->buf[c][i]);
    x->vals[c][i].data = x->buf[c][i];
}

static void change(struct txn *x, uint32_t c, enum aamm_change_kind k,
                   const struct aamm_relation *rel)
{
    memset(&x->ch[c], 0, sizeof x->ch[c]);
    x->ch[c].kind = k;
    x->ch[c].relation = rel;
    x->ch[c].new_tuple.nvalues = rel->ncolumns;
    x->ch[c].new_tuple.values = x->vals[c];
}

static void make_pgbench(struct txn *x, uint64_t lsn)
{
    char a[32], b[32], t[32], d[32], f[100];
    uint32_t aid = 1 + rnd(100000), bid = 1 + rnd(1), tid = 1 + rnd(10);
    int delta = (int)rnd(10001) - 5000;
    x->t = (struct aamm_transaction){
        1, 1000 + (uint32_t)lsn, lsn, lsn + 56, 1700000000000000 + (int64_t)lsn, NULL, 0};
    snprintf(a, sizeof a, "%u", aid);
    snprintf(b, sizeof b, "%u", bid);
    snprintf(t, sizeof t, "%u", tid);
    snprintf(d, sizeof d, "%d", delta);
    memset(f, ' ', 84);
    f[84] = '\0';
    x->n = 4;
    change(x, 0, AAMM_CHANGE_UPDATE, &acc);
    setv(x, 0, 0, a), setv(x, 0, 1, b), setv(x, 0, 2, d), setv(x, 0, 3, f);
    change(x, 1, AAMM_CHANGE_UPDATE, &tel);
    setv(x, 1, 0, t), setv(x, 1, 1, b), setv(x, 1, 2, d), setv(x, 1, 3, NULL);
    change(x, 2, AAMM_CHANGE_UPDATE, &br);
    setv(x, 2, 0, b), setv(x, 2, 1, d), setv(x, 2, 2, NULL);
    change(x, 3, AAMM_CHANGE_INSERT, &his);
    setv(x, 3, 0, t), setv(x, 3, 1, b), setv(x, 3, 2, a), setv(x, 3, 3, d);
    setv(x, 3, 4, "2026-11-23 10:11:12.345678"), setv(x, 3, 5, NULL);
}

static void make_bulk(struct txn *x, uint64_t lsn, uint64_t *id)
{
    static const char *words[] = {"alpha", "beta", "gamma", "delta", "epsilon",
                                  "zeta",  "eta",  "theta", "iota",  "kappa"};
    x->t = (struct aamm_transaction){
        1, 2000 + (uint32_t)lsn, lsn, lsn + 56, 1700000000000000 + (int64_t)lsn, NULL, 0};
    x->n = MAXCH;
    for (uint32_t c = 0; c < MAXCH; c++) {
        char n[32], p[128];
        size_t o = 0;
        change(x, c, AAMM_CHANGE_INSERT, &bulk);
        snprintf(n, sizeof n, "%llu", (unsigned long long)++*id);
        while (o < 90) {
            o += (size_t)snprintf(p + o, sizeof p - o, "%s-%u ", words[rnd(10)], rnd(1000));
        }
        setv(x, c, 0, n), setv(x, c, 1, p), setv(x, c, 2, "2026-11-23 10:11:12.345678+00");
    }
}

/* pgoutput proto_version 1 bytes of the same stream (message layouts of PostgreSQL 15). */
static size_t pgo_tuple(const struct aamm_tuple *t)
{
    size_t s = 2;
    for (uint32_t i = 0; i < t->nvalues; i++)
        s += 1 + (t->values[i].kind == AAMM_VALUE_TEXT ? 4 + t->values[i].len : 0);
    return s;
}
static size_t pgo_relation(const struct aamm_relation *r)
{
    size_t s = 1 + 4 + strlen(r->schema) + 1 + strlen(r->name) + 1 + 1 + 2;
    for (uint32_t i = 0; i < r->ncolumns; i++)
        s += 1 + strlen(r->columns[i].name) + 1 + 4 + 4;
    return s;
}
static size_t pgo_txn(const struct txn *x, const struct aamm_relation **seen, int *nseen)
{
    size_t s = 21 + 26;
    for (uint32_t c = 0; c < x->n; c++) {
        const struct aamm_change *ch = &x->ch[c];
        int k;
        for (k = 0; k < *nseen; k++)
            if (seen[k] == ch->relation)
                break;
        if (k == *nseen) {
            seen[(*nseen)++] = ch->relation;
            s += pgo_relation(ch->relation);
        }
        s += 1 + 4 + 1 + pgo_tuple(&ch->new_tuple);
    }
    return s;
}

struct result {
    double enc_s, dec_s;
    size_t raw, wire, pgo;
    long txns;
};

static int run(const char *name, struct txn *x, long ntxn, int bulkmode)
{
    struct aamm_wire_encoder *enc, *raw;
    struct aamm_wire_decoder *dec;
    struct aamm_wire_options nocomp = {.compress_min = UINT32_MAX};
    const struct aamm_relation *seen[8];
    int nseen = 0;
    unsigned char *stream = NULL;
    size_t slen = 0, scap = 0, rawlen = 0, pgo = 0;
    uint64_t id = 0;
    double t0, enc_s = 0, dec_s;
    long events = 0;
    aamm_wire_encoder_new(&enc, NULL, NULL, 0);
    aamm_wire_encoder_new(&raw, &nocomp, NULL, 0);
    for (long i = 0; i < ntxn; i++) {
        size_t n;
        const uint8_t *p;
        if (bulkmode)
            make_bulk(x, 0x1000000 + (uint64_t)i * 100000, &id);
        else
            make_pgbench(x, 0x1000000 + (uint64_t)i * 1000);
        pgo += pgo_txn(x, seen, &nseen);
        t0 = now_s();
        aamm_wire_encode_begin(enc, &x->t);
        for (uint32_t c = 0; c < x->n; c++)
            if (aamm_wire_encode_change(enc, &x->ch[c]) != 0) {
                fprintf(stderr, "%s\n", aamm_wire_encoder_errmsg(enc));
                return 1;
            }
        aamm_wire_encode_commit(enc, &x->t);
        /* frames close as they fill (64 KiB batches would be what a busy link sends) */
        if (aamm_wire_encoder_buffered(enc) >= 64 * 1024 || i == ntxn - 1)
            aamm_wire_encoder_flush(enc);
        p = aamm_wire_encoder_pending(enc, &n);
        enc_s += now_s() - t0;
        if (slen + n > scap) {
            scap = (slen + n) * 2;
            stream = realloc(stream, scap);
        }
        memcpy(stream + slen, p, n);
        slen += n;
        aamm_wire_encoder_consume(enc, n);
        /* uncompressed size, for MB/s and the compression figure */
        aamm_wire_encode_begin(raw, &x->t);
        for (uint32_t c = 0; c < x->n; c++)
            aamm_wire_encode_change(raw, &x->ch[c]);
        aamm_wire_encode_commit(raw, &x->t);
        aamm_wire_encoder_flush(raw);
        p = aamm_wire_encoder_pending(raw, &n);
        rawlen += n;
        aamm_wire_encoder_consume(raw, n);
    }
    aamm_wire_decoder_new(&dec, NULL, NULL, 0);
    t0 = now_s();
    for (size_t off = 0;;) {
        struct aamm_wire_event ev;
        size_t took;
        int rc;
        while ((rc = aamm_wire_decoder_next(dec, &ev)) == 0)
            events++;
        if (rc != AAMM_EAGAIN) {
            fprintf(stderr, "decode: %s\n", aamm_wire_decoder_errmsg(dec));
            return 1;
        }
        if (off == slen)
            break;
        aamm_wire_decoder_feed(dec, stream + off, slen - off < 65536 ? slen - off : 65536, &took);
        off += took;
    }
    dec_s = now_s() - t0;
    printf("BENCH wire_%s_encode_mbps %.1f MB/s\n", name, (double)rawlen / enc_s / 1e6);
    printf("BENCH wire_%s_encode_txns %.0f txns/s\n", name, (double)ntxn / enc_s);
    printf("BENCH wire_%s_decode_mbps %.1f MB/s\n", name, (double)rawlen / dec_s / 1e6);
    printf("BENCH wire_%s_decode_txns %.0f txns/s\n", name, (double)ntxn / dec_s);
    printf("BENCH wire_%s_bytes_per_txn %.1f bytes\n", name, (double)slen / (double)ntxn);
    printf("BENCH wire_%s_compression %.3f ratio\n", name, (double)slen / (double)rawlen);
    printf("BENCH wire_%s_size_ratio_synthetic %.3f ratio\n", name, (double)slen / (double)pgo);
    fprintf(stderr, "%s: %ld txns, %ld events, wire %zu bytes, uncompressed %zu, pgoutput %zu\n",
            name, ntxn, events, slen, rawlen, pgo);
    aamm_wire_encoder_free(enc);
    aamm_wire_encoder_free(raw);
    aamm_wire_decoder_free(dec);
    free(stream);
    return 0;
}

int main(int argc, char **argv)
{
    double scale = argc > 1 ? atof(argv[1]) : 1.0;
    struct txn *x = calloc(1, sizeof *x);
    int rc;
    if (x == NULL)
        return 1;
    rc = run("pgbench", x, (long)(200000 * scale), 0);
    rc |= run("bulk", x, (long)(300 * scale), 1);
    free(x);
    return rc;
}
