/*
 * wire.c: the frame codec (doc/protocol.md): encoder with relation dictionary, LZ4 and
 * record splitting; strict incremental decoder. Pure: no I/O, no clocks.
 */
#include "config.h"

#include <inttypes.h>
#include <lz4.h>
#include <stdio.h>
#include <string.h>

#include <aamm/wire.h>

#include "buf.h"
#include "internal.h"

#define MAGIC0 0x41
#define MAGIC1 0x41
#define MAGIC2 0x4D
#define MAGIC3 0x57
#define MAX_COLUMNS 1664u
#define MAX_ERRMSG 1024u
#define FLAGS_KNOWN (AAMM_WIRE_F_LZ4 | AAMM_WIRE_F_MAC)
#define PIECE_OVERHEAD 31u /* 'P' + three varints of at most 10 bytes */
#define LZ4_HISTORY 65536  /* LZ4's window: the dictionary carried from frame to frame */

/* ====================================================================================
 * Options
 * ==================================================================================== */

static int fill_options(struct aamm_wire_options *o, const struct aamm_wire_options *in,
                        struct aamm__err *err)
{
    memset(o, 0, sizeof *o);
    if (in != NULL)
        *o = *in;
    if (o->frame_payload == 0)
        o->frame_payload = AAMM_WIRE_DEFAULT_FRAME_PAYLOAD;
    if (o->max_payload == 0)
        o->max_payload = AAMM_WIRE_DEFAULT_MAX_PAYLOAD;
    if (o->max_record == 0)
        o->max_record = AAMM_WIRE_DEFAULT_MAX_RECORD;
    if (o->compress_min == 0)
        o->compress_min = AAMM_WIRE_DEFAULT_COMPRESS_MIN;
    if (o->max_relations == 0)
        o->max_relations = AAMM_WIRE_DEFAULT_MAX_RELATIONS;
    if (o->frame_payload < 256 || o->frame_payload > 16u * 1024 * 1024)
        return aamm__errf(err, AAMM_EINVAL, "wire: frame_payload %" PRIu32 " outside 256..16777216",
                          o->frame_payload);
    if (o->max_payload < 256 || o->max_payload > 64u * 1024 * 1024)
        return aamm__errf(err, AAMM_EINVAL, "wire: max_payload %" PRIu32 " outside 256..67108864",
                          o->max_payload);
    if (o->max_relations > 1u << 20)
        return aamm__errf(err, AAMM_EINVAL, "wire: max_relations %" PRIu32 " above 1048576",
                          o->max_relations);
    if (o->max_record > 0xFFFFFFF0u)
        o->max_record = 0xFFFFFFF0u;
    return 0;
}

/* ====================================================================================
 * Varints and strings
 * ==================================================================================== */

static void wr_varint(struct aamm__wr *w, uint64_t v)
{
    uint8_t b[10];
    size_t n = 0;
    do {
        b[n] = (uint8_t)(v & 0x7F);
        v >>= 7;
        if (v != 0)
            b[n] |= 0x80;
        n++;
    } while (v != 0);
    aamm__wr_bytes(w, b, n);
}

static void wr_zigzag(struct aamm__wr *w, int64_t v)
{
    /* (uint64_t)0 - sign: all ones for a negative @v, without shifting a signed value */
    wr_varint(w, ((uint64_t)v << 1) ^ ((uint64_t)0 - ((uint64_t)v >> 63)));
}

static void wr_str(struct aamm__wr *w, const char *s, size_t len)
{
    wr_varint(w, len);
    aamm__wr_bytes(w, s, len);
}

static uint64_t rd_varint(struct aamm__rd *r)
{
    uint64_t v = 0;
    for (int i = 0; i < 10; i++) {
        uint8_t b = aamm__rd_u8(r);
        if (!r->ok)
            return 0;
        if (i == 9 && b > 1) { /* more than 64 bits */
            r->ok = false;
            return 0;
        }
        v |= (uint64_t)(b & 0x7F) << (7 * i);
        if ((b & 0x80) == 0) {
            if (i > 0 && b == 0) { /* not minimal */
                r->ok = false;
                return 0;
            }
            return v;
        }
    }
    r->ok = false;
    return 0;
}

static int64_t rd_zigzag(struct aamm__rd *r)
{
    uint64_t u = rd_varint(r);
    return (int64_t)(u >> 1) ^ -(int64_t)(u & 1);
}

/* A str: length-prefixed bytes without NUL. Returns the bytes (not terminated) or NULL. */
static const char *rd_str(struct aamm__rd *r, size_t *len)
{
    uint64_t n = rd_varint(r);
    const uint8_t *p;
    if (!r->ok || n > r->left) {
        r->ok = false;
        return NULL;
    }
    p = aamm__rd_bytes(r, (size_t)n);
    if (p == NULL || memchr(p, 0, (size_t)n) != NULL) {
        r->ok = false;
        return NULL;
    }
    *len = (size_t)n;
    return (const char *)p;
}

static bool has_nul(const char *s, size_t n)
{
    return n > 0 && memchr(s, 0, n) != NULL;
}

/* ====================================================================================
 * Encoder
 * ==================================================================================== */

struct enc_rel {
    struct aamm_relation rel; /* copy of what was sent under this id */
    uint32_t hash;
    bool used;
    uint64_t pin; /* operation number that needs this entry: not evictable during it */
};

/* A value of the record being built that stays in the caller's memory: its bytes follow the
 * first @at bytes of the record scratch (and the segments before it). */
struct rec_seg {
    size_t at;
    const char *p;
    size_t n;
};
#define SEG_MIN 1024 /* text values and message contents of this size are referenced */

struct aamm_wire_encoder {
    struct aamm__err err;
    struct aamm_wire_options o;
    unsigned version;
    aamm_wire_seal_fn seal;
    void *seal_arg;

    struct aamm__wr out; /* complete frames [rd, fstart) + open frame [fstart, len) */
    size_t rd;
    bool frame_open;
    size_t fstart;
    struct aamm__wr rec;  /* scratch: the record being built (without its big values) */
    struct rec_seg *segs; /* big values of the record: referenced, not copied */
    uint32_t nsegs, segs_cap;
    bool streaming;    /* a split record is emitted one piece per call (set_streaming) */
    bool split_active; /* a split record is partly emitted (streaming) */
    size_t split_total, split_off;
    uint8_t *ztmp; /* LZ4 scratch */
    size_t ztmp_cap;
    LZ4_stream_t *lz; /* LZ4 stream over all DATA payloads (doc/protocol.md §1) */
    char *lzdict;     /* its dictionary: the last 64 KiB of those payloads */

    bool in_txn;
    uint64_t begin_commit_lsn;
    int64_t begin_commit_time;

    struct enc_rel *dict;
    uint32_t ndict;
    uint32_t evict_next;
    uint32_t last_id;
    uint64_t op;
};

static uint32_t name_hash(const char *schema, const char *name)
{
    uint32_t h = 2166136261u;
    for (const char *p = schema; *p; p++)
        h = (h ^ (uint8_t)*p) * 16777619u;
    h = (h ^ 0xFFu) * 16777619u;
    for (const char *p = name; *p; p++)
        h = (h ^ (uint8_t)*p) * 16777619u;
    return h;
}

int aamm_wire_encoder_new(struct aamm_wire_encoder **encp, const struct aamm_wire_options *opts)
{
    struct aamm_wire_encoder *enc;
    struct aamm__err tmp;
    int rc;
    *encp = NULL;
    rc = fill_options(&(struct aamm_wire_options){0}, opts, &tmp);
    if (rc != 0)
        return rc;
    enc = aamm__calloc(1, sizeof *enc);
    if (enc == NULL)
        return AAMM_ENOMEM;
    fill_options(&enc->o, opts, &enc->err);
    enc->dict = aamm__calloc(enc->o.max_relations, sizeof *enc->dict);
    if (enc->dict == NULL) {
        aamm__free(enc);
        return AAMM_ENOMEM;
    }
    if (enc->o.compress_min != UINT32_MAX) {
        enc->lz = aamm__malloc(sizeof *enc->lz);
        enc->lzdict = aamm__malloc(LZ4_HISTORY);
        if (enc->lz == NULL || enc->lzdict == NULL) {
            aamm__free(enc->lz);
            aamm__free(enc->lzdict);
            aamm__free(enc->dict);
            aamm__free(enc);
            return AAMM_ENOMEM;
        }
        LZ4_initStream(enc->lz, sizeof *enc->lz);
    }
    enc->version = AAMM_WIRE_VERSION_MAX;
    aamm__wr_init(&enc->out);
    aamm__wr_init(&enc->rec);
    *encp = enc;
    return 0;
}

void aamm_wire_encoder_free(struct aamm_wire_encoder *enc)
{
    if (enc == NULL)
        return;
    for (uint32_t i = 0; i < enc->o.max_relations; i++)
        aamm_relation_clear(&enc->dict[i].rel);
    aamm__free(enc->dict);
    aamm__wr_free(&enc->out);
    aamm__wr_free(&enc->rec);
    aamm__free(enc->segs);
    aamm__free(enc->ztmp);
    aamm__free(enc->lz);
    aamm__free(enc->lzdict);
    aamm__free(enc);
}

const char *aamm_wire_encoder_errmsg(const struct aamm_wire_encoder *enc)
{
    return aamm__errmsg(&enc->err);
}

int aamm_wire_encoder_set_version(struct aamm_wire_encoder *enc, unsigned version)
{
    if (version < AAMM_WIRE_VERSION_MIN || version > AAMM_WIRE_VERSION_MAX)
        return aamm__errf(&enc->err, AAMM_EUNSUPPORTED, "wire: protocol version %u not supported",
                          version);
    enc->version = version;
    return 0;
}

static int enc_nomem(struct aamm_wire_encoder *enc)
{
    return aamm__errf(&enc->err, AAMM_ENOMEM, "wire: out of memory while encoding");
}

/* ---- frames ---------------------------------------------------------------------- */

/* Streaming mode: the output buffer's fixed size, two frames (the one closed by a call and
 * the next open one) and some slack, allocated once instead of doubling. */
static size_t stream_out_size(const struct aamm_wire_encoder *enc)
{
    return 2 * ((size_t)enc->o.frame_payload + AAMM_WIRE_HEADER_SIZE + AAMM_WIRE_MAC_SIZE) + 4096;
}

static void open_frame(struct aamm_wire_encoder *enc)
{
    static const uint8_t zero[AAMM_WIRE_HEADER_SIZE];
    if (enc->streaming && enc->out.cap < stream_out_size(enc)) {
        uint8_t *p = aamm__realloc(enc->out.data, stream_out_size(enc));
        if (p != NULL) {
            enc->out.data = p;
            enc->out.cap = stream_out_size(enc);
        }
    }
    enc->fstart = enc->out.len;
    aamm__wr_bytes(&enc->out, zero, sizeof zero);
    enc->frame_open = true;
}

/* Fill in the header of the frame starting at fstart, CRC, and the MAC trailer. */
static int finish_frame(struct aamm_wire_encoder *enc, uint8_t type, uint16_t flags)
{
    uint8_t *h;
    size_t plen;
    uint32_t crc;
    enc->frame_open = false;
    if (!enc->out.ok)
        return enc_nomem(enc);
    plen = enc->out.len - enc->fstart - AAMM_WIRE_HEADER_SIZE;
    if (enc->seal != NULL)
        flags |= AAMM_WIRE_F_MAC;
    h = enc->out.data + enc->fstart;
    h[0] = MAGIC0;
    h[1] = MAGIC1;
    h[2] = MAGIC2;
    h[3] = MAGIC3;
    h[4] = (uint8_t)enc->version;
    h[5] = type;
    h[6] = (uint8_t)flags;
    h[7] = (uint8_t)(flags >> 8);
    h[8] = (uint8_t)plen;
    h[9] = (uint8_t)(plen >> 8);
    h[10] = (uint8_t)(plen >> 16);
    h[11] = (uint8_t)(plen >> 24);
    crc = aamm_crc32c(0, h, 12);
    crc = aamm_crc32c(crc, h + AAMM_WIRE_HEADER_SIZE, plen);
    h[12] = (uint8_t)crc;
    h[13] = (uint8_t)(crc >> 8);
    h[14] = (uint8_t)(crc >> 16);
    h[15] = (uint8_t)(crc >> 24);
    if (enc->seal != NULL) {
        uint8_t mac[AAMM_WIRE_MAC_SIZE];
        int rc = enc->seal(enc->seal_arg, enc->out.data + enc->fstart, AAMM_WIRE_HEADER_SIZE + plen,
                           mac);
        if (rc != 0) {
            enc->out.len = enc->fstart;
            return aamm__errf(&enc->err, rc, "wire: sealing a frame failed: %s", aamm_strerror(rc));
        }
        aamm__wr_bytes(&enc->out, mac, sizeof mac);
        if (!enc->out.ok)
            return enc_nomem(enc);
    }
    return 0;
}

/* Close the open DATA frame, compressing it when that makes it smaller. */
static int close_data_frame(struct aamm_wire_encoder *enc)
{
    size_t plen;
    uint16_t flags = 0;
    if (!enc->frame_open)
        return 0;
    if (!enc->out.ok) {
        enc->frame_open = false;
        return enc_nomem(enc);
    }
    plen = enc->out.len - enc->fstart - AAMM_WIRE_HEADER_SIZE;
    if (plen == 0) { /* nothing was added: drop the empty frame */
        enc->out.len = enc->fstart;
        enc->frame_open = false;
        return 0;
    }
    if (enc->lz != NULL && plen <= INT32_MAX) {
        /* Every DATA payload goes through the connection's LZ4 stream, so that the next
         * frame can refer to the last 64 KiB of them, whether this one is sent compressed
         * or not; the decoder keeps the same history. */
        size_t bound = (size_t)LZ4_compressBound((int)plen);
        int clen;
        if (enc->ztmp_cap < bound) {
            uint8_t *z = aamm__realloc(enc->ztmp, bound);
            if (z == NULL) {
                enc->frame_open = false;
                return enc_nomem(enc);
            }
            enc->ztmp = z;
            enc->ztmp_cap = bound;
        }
        clen = LZ4_compress_fast_continue(
            enc->lz, (const char *)enc->out.data + enc->fstart + AAMM_WIRE_HEADER_SIZE,
            (char *)enc->ztmp, (int)plen, (int)bound, 1);
        LZ4_saveDict(enc->lz, enc->lzdict, LZ4_HISTORY);
        if (clen > 0 && plen >= enc->o.compress_min && (size_t)clen + 4 < plen) {
            enc->out.len = enc->fstart + AAMM_WIRE_HEADER_SIZE;
            aamm__wr_le32(&enc->out, (uint32_t)plen);
            aamm__wr_bytes(&enc->out, enc->ztmp, (size_t)clen);
            flags |= AAMM_WIRE_F_LZ4;
        }
    }
    return finish_frame(enc, AAMM_WIRE_DATA, flags);
}

int aamm_wire_encoder_flush(struct aamm_wire_encoder *enc)
{
    return close_data_frame(enc);
}

int aamm_wire_encoder_set_mac(struct aamm_wire_encoder *enc, aamm_wire_seal_fn fn, void *arg)
{
    int rc = close_data_frame(enc);
    if (rc != 0)
        return rc;
    enc->seal = fn;
    enc->seal_arg = arg;
    return 0;
}

const uint8_t *aamm_wire_encoder_pending(const struct aamm_wire_encoder *enc, size_t *len)
{
    size_t end = enc->frame_open ? enc->fstart : enc->out.len;
    *len = end - enc->rd;
    return enc->out.data + enc->rd;
}

void aamm_wire_encoder_consume(struct aamm_wire_encoder *enc, size_t n)
{
    size_t end = enc->frame_open ? enc->fstart : enc->out.len;
    if (n > end - enc->rd)
        n = end - enc->rd;
    enc->rd += n;
    if (enc->rd == enc->out.len) {
        enc->rd = 0;
        enc->out.len = 0;
        /* Give back the memory of a burst (a huge record split into pieces). */
        if (enc->out.cap > 4 * (size_t)enc->o.frame_payload + 4096 &&
            enc->out.cap > stream_out_size(enc))
            aamm__wr_free(&enc->out);
    } else if (enc->rd >= 65536 && enc->rd >= enc->out.len / 2) {
        memmove(enc->out.data, enc->out.data + enc->rd, enc->out.len - enc->rd);
        enc->out.len -= enc->rd;
        if (enc->frame_open)
            enc->fstart -= enc->rd;
        enc->rd = 0;
    }
}

size_t aamm_wire_encoder_buffered(const struct aamm_wire_encoder *enc)
{
    return enc->out.len - enc->rd;
}

bool aamm_wire_encoder_in_transaction(const struct aamm_wire_encoder *enc)
{
    return enc->in_txn;
}

/* Reference @n bytes at @p as the next part of the record (after what rec holds now). */
static void rec_ref(struct aamm_wire_encoder *enc, const char *p, size_t n)
{
    if (n < SEG_MIN) {
        aamm__wr_bytes(&enc->rec, p, n);
        return;
    }
    if (enc->nsegs == enc->segs_cap) {
        uint32_t cap = enc->segs_cap ? 2 * enc->segs_cap : 8;
        struct rec_seg *g = aamm__realloc(enc->segs, cap * sizeof *g);
        if (g == NULL) {
            enc->rec.ok = false;
            return;
        }
        enc->segs = g;
        enc->segs_cap = cap;
    }
    enc->segs[enc->nsegs++] = (struct rec_seg){enc->rec.len, p, n};
}

static size_t rec_total(const struct aamm_wire_encoder *enc)
{
    size_t r = enc->rec.len;
    for (uint32_t i = 0; i < enc->nsegs; i++)
        r += enc->segs[i].n;
    return r;
}

/* Append bytes [@off, @off + @n) of the record (scratch and referenced values) to @w. */
static void rec_put(const struct aamm_wire_encoder *enc, struct aamm__wr *w, size_t off, size_t n)
{
    size_t pos = 0, rpos = 0, end = off + n;
    if (enc->nsegs == 0) { /* only small values: all in the scratch */
        aamm__wr_bytes(w, enc->rec.data + off, n);
        return;
    }
    for (uint32_t i = 0; i <= enc->nsegs && pos < end; i++) {
        /* the scratch bytes before segment i (or the tail), then segment i */
        size_t rend = i < enc->nsegs ? enc->segs[i].at : enc->rec.len;
        const char *parts[2] = {(const char *)enc->rec.data + rpos,
                                i < enc->nsegs ? enc->segs[i].p : NULL};
        size_t lens[2] = {rend - rpos, i < enc->nsegs ? enc->segs[i].n : 0};
        rpos = rend;
        for (int k = 0; k < 2; k++) {
            size_t a = pos > off ? pos : off, b = pos + lens[k] < end ? pos + lens[k] : end;
            if (a < b)
                aamm__wr_bytes(w, parts[k] + (a - pos), b - a);
            pos += lens[k];
        }
    }
}

/* Append the record in enc->rec to the DATA stream, splitting it into pieces if needed.
 * Streaming: one piece per call, AAMM_EAGAIN until the last one is out. */
static int emit_record(struct aamm_wire_encoder *enc)
{
    size_t r;
    size_t cap = enc->o.frame_payload;
    int rc;
    if (!enc->rec.ok)
        return enc_nomem(enc);
    r = rec_total(enc);
    if (r > enc->o.max_record)
        return aamm__errf(&enc->err, AAMM_ETOOBIG,
                          "wire: record of %zu bytes above the limit of %" PRIu32, r,
                          enc->o.max_record);
    if (enc->split_active && r != enc->split_total)
        return aamm__errf(&enc->err, AAMM_EINVAL,
                          "wire: a split record continued with a different change (%zu bytes, "
                          "%zu expected)",
                          r, enc->split_total);
    if (r <= cap) {
        if (enc->frame_open && enc->out.len - enc->fstart - AAMM_WIRE_HEADER_SIZE + r > cap) {
            rc = close_data_frame(enc);
            if (rc != 0)
                return rc;
        }
        if (!enc->frame_open)
            open_frame(enc);
        rec_put(enc, &enc->out, 0, r);
        return enc->out.ok ? 0 : enc_nomem(enc);
    }
    /* 'P' pieces, each alone in a frame. */
    rc = close_data_frame(enc);
    if (rc != 0)
        return rc;
    if (!enc->split_active) {
        enc->split_off = 0;
        enc->split_total = r;
    }
    for (size_t off = enc->split_off; off < r;) {
        size_t n = r - off;
        if (n > cap - PIECE_OVERHEAD)
            n = cap - PIECE_OVERHEAD;
        open_frame(enc);
        aamm__wr_u8(&enc->out, 'P');
        wr_varint(&enc->out, r);
        wr_varint(&enc->out, off);
        wr_varint(&enc->out, n);
        rec_put(enc, &enc->out, off, n);
        rc = close_data_frame(enc);
        if (rc != 0)
            return rc;
        off += n;
        if (enc->streaming && off < r) {
            enc->split_active = true;
            enc->split_off = off;
            return AAMM_EAGAIN;
        }
    }
    enc->split_active = false;
    if (enc->rec.cap > 2 * cap)
        aamm__wr_free(&enc->rec);
    return 0;
}

int aamm_wire_encoder_set_streaming(struct aamm_wire_encoder *enc, bool on)
{
    if (enc->split_active)
        return aamm__errf(&enc->err, AAMM_ESTATE, "wire: a split record is in progress");
    enc->streaming = on;
    return 0;
}

/* ---- control frames (write_<msg>) ------------------------------------------------- */

static int control_frame_begin(struct aamm_wire_encoder *enc)
{
    int rc = close_data_frame(enc);
    if (rc != 0)
        return rc;
    open_frame(enc);
    return 0;
}

int aamm_wire_encode_hello(struct aamm_wire_encoder *enc, const struct aamm_wire_hello *h)
{
    size_t clen = h->cluster ? strlen(h->cluster) : 0;
    int rc;
    if (h->min_version < 1 || h->min_version > h->max_version ||
        (h->role != AAMM_WIRE_ROLE_SENDER && h->role != AAMM_WIRE_ROLE_RECEIVER) ||
        (h->flags & ~AAMM_WIRE_HELLO_TLS) != 0 || h->node_id == 0 || clen == 0 ||
        clen > AAMM_WIRE_MAX_CLUSTER)
        return aamm__errf(&enc->err, AAMM_EINVAL, "wire: invalid HELLO fields");
    if ((rc = control_frame_begin(enc)) != 0)
        return rc;
    aamm__wr_le16(&enc->out, h->min_version);
    aamm__wr_le16(&enc->out, h->max_version);
    aamm__wr_u8(&enc->out, h->role);
    aamm__wr_u8(&enc->out, h->flags);
    aamm__wr_le32(&enc->out, h->node_id);
    aamm__wr_le64(&enc->out, (uint64_t)h->wall_time_us);
    aamm__wr_bytes(&enc->out, h->nonce, AAMM_WIRE_NONCE_SIZE);
    wr_str(&enc->out, h->cluster, clen);
    return finish_frame(enc, AAMM_WIRE_HELLO, 0);
}

int aamm_wire_encode_auth(struct aamm_wire_encoder *enc, const uint8_t proof[AAMM_WIRE_PROOF_SIZE])
{
    int rc;
    if ((rc = control_frame_begin(enc)) != 0)
        return rc;
    aamm__wr_bytes(&enc->out, proof, AAMM_WIRE_PROOF_SIZE);
    return finish_frame(enc, AAMM_WIRE_AUTH, 0);
}

int aamm_wire_encode_resume(struct aamm_wire_encoder *enc, const struct aamm_wire_position *pos,
                            uint32_t n)
{
    int rc;
    if (n > AAMM_WIRE_MAX_RESUME)
        return aamm__errf(&enc->err, AAMM_EINVAL, "wire: %" PRIu32 " RESUME entries, max %d", n,
                          AAMM_WIRE_MAX_RESUME);
    if ((rc = control_frame_begin(enc)) != 0)
        return rc;
    wr_varint(&enc->out, n);
    for (uint32_t i = 0; i < n; i++) {
        aamm__wr_le32(&enc->out, pos[i].origin_node);
        aamm__wr_le64(&enc->out, pos[i].lsn);
    }
    return finish_frame(enc, AAMM_WIRE_RESUME, 0);
}

int aamm_wire_encode_ack(struct aamm_wire_encoder *enc, uint32_t origin_node, uint64_t lsn)
{
    int rc;
    if ((rc = control_frame_begin(enc)) != 0)
        return rc;
    aamm__wr_le32(&enc->out, origin_node);
    aamm__wr_le64(&enc->out, lsn);
    return finish_frame(enc, AAMM_WIRE_ACK, 0);
}

int aamm_wire_encode_heartbeat(struct aamm_wire_encoder *enc, int64_t wall_time_us)
{
    int rc;
    if ((rc = control_frame_begin(enc)) != 0)
        return rc;
    aamm__wr_le64(&enc->out, (uint64_t)wall_time_us);
    return finish_frame(enc, AAMM_WIRE_HEARTBEAT, 0);
}

int aamm_wire_encode_error(struct aamm_wire_encoder *enc, int code, const char *msg)
{
    size_t len = msg ? strlen(msg) : 0;
    int rc;
    if (code > 0 || code < -65535)
        return aamm__errf(&enc->err, AAMM_EINVAL, "wire: error code %d out of range", code);
    if (len > MAX_ERRMSG)
        len = MAX_ERRMSG;
    if ((rc = control_frame_begin(enc)) != 0)
        return rc;
    aamm__wr_le16(&enc->out, (uint16_t)-code);
    wr_str(&enc->out, msg ? msg : "", len);
    return finish_frame(enc, code == 0 ? AAMM_WIRE_GOODBYE : AAMM_WIRE_ERROR, 0);
}

/* ---- data records (write_<record>) ----------------------------------------------- */

static int write_begin(struct aamm__wr *w, const struct aamm_transaction *t)
{
    aamm__wr_u8(w, 'B');
    wr_varint(w, t->origin_node);
    wr_varint(w, t->xid);
    aamm__wr_le64(w, t->commit_lsn);
    aamm__wr_le64(w, (uint64_t)t->commit_time);
    aamm__wr_u8(w, t->origin_name != NULL ? 1 : 0);
    if (t->origin_name != NULL) {
        wr_str(w, t->origin_name, strlen(t->origin_name));
        aamm__wr_le64(w, t->origin_lsn);
    }
    return 0;
}

static void write_commit(struct aamm__wr *w, const struct aamm_transaction *t, bool override)
{
    aamm__wr_u8(w, 'C');
    aamm__wr_u8(w, override ? 1 : 0);
    if (override) {
        aamm__wr_le64(w, t->commit_lsn);
        aamm__wr_le64(w, (uint64_t)t->commit_time);
    }
    wr_zigzag(w, (int64_t)(t->end_lsn - t->commit_lsn));
}

static void write_relation(struct aamm__wr *w, uint32_t id, const struct aamm_relation *rel)
{
    aamm__wr_u8(w, 'R');
    wr_varint(w, id);
    wr_str(w, rel->schema, strlen(rel->schema));
    wr_str(w, rel->name, strlen(rel->name));
    aamm__wr_u8(w, (uint8_t)rel->replica_identity);
    wr_varint(w, rel->ncolumns);
    for (uint32_t i = 0; i < rel->ncolumns; i++) {
        const struct aamm_column *c = &rel->columns[i];
        wr_str(w, c->name, strlen(c->name));
        wr_varint(w, c->flags);
        aamm__wr_u8(w, c->type_name != NULL ? 1 : 0);
        if (c->type_name != NULL)
            wr_str(w, c->type_name, strlen(c->type_name));
        wr_zigzag(w, c->type_mod);
    }
}

/* A tuple into the record scratch (kind, then varint length and bytes of text values), big text
 * values referenced (rec_ref). */
static void rec_tuple(struct aamm_wire_encoder *enc, const struct aamm_tuple *t)
{
    wr_varint(&enc->rec, t->nvalues);
    for (uint32_t i = 0; i < t->nvalues; i++) {
        const struct aamm_value *v = &t->values[i];
        aamm__wr_u8(&enc->rec, (uint8_t)v->kind);
        if (v->kind == AAMM_VALUE_TEXT) {
            wr_varint(&enc->rec, v->len);
            rec_ref(enc, v->data, v->len);
        }
    }
}

static bool valid_relation(const struct aamm_relation *rel)
{
    if (rel == NULL || rel->schema == NULL || rel->name == NULL || rel->ncolumns > MAX_COLUMNS ||
        (rel->ncolumns > 0 && rel->columns == NULL))
        return false;
    if (rel->replica_identity != AAMM_REPLIDENT_DEFAULT &&
        rel->replica_identity != AAMM_REPLIDENT_NOTHING &&
        rel->replica_identity != AAMM_REPLIDENT_FULL &&
        rel->replica_identity != AAMM_REPLIDENT_INDEX)
        return false;
    for (uint32_t i = 0; i < rel->ncolumns; i++)
        if (rel->columns[i].name == NULL || (rel->columns[i].flags & ~AAMM_COLUMN_KEY) != 0)
            return false;
    return true;
}

/* @scan: look for NUL in text values (not again when a split record continues: the first
 * call checked the same content). */
static bool valid_tuple(const struct aamm_tuple *t, const struct aamm_relation *rel, bool scan)
{
    if (t->nvalues != rel->ncolumns || (t->nvalues > 0 && t->values == NULL))
        return false;
    for (uint32_t i = 0; i < t->nvalues; i++) {
        const struct aamm_value *v = &t->values[i];
        if (v->kind == AAMM_VALUE_TEXT) {
            if ((v->data == NULL && v->len > 0) || (scan && v->data && has_nul(v->data, v->len)))
                return false;
        } else if (v->kind != AAMM_VALUE_NULL && v->kind != AAMM_VALUE_UNCHANGED) {
            return false;
        }
    }
    return true;
}

/* The dictionary id for @rel, sending an 'R' record first if the peer does not know it. */
static int relation_id(struct aamm_wire_encoder *enc, const struct aamm_relation *rel,
                       uint32_t *idp)
{
    uint32_t h = name_hash(rel->schema, rel->name);
    uint32_t id = UINT32_MAX;
    struct enc_rel *e;
    int rc;
    e = &enc->dict[enc->last_id];
    if (e->used && e->hash == h && aamm_relation_equal(&e->rel, rel)) {
        e->pin = enc->op;
        *idp = enc->last_id;
        return 0;
    }
    for (uint32_t i = 0; i < enc->ndict; i++) {
        e = &enc->dict[i];
        if (e->used && e->hash == h && strcmp(e->rel.schema, rel->schema) == 0 &&
            strcmp(e->rel.name, rel->name) == 0) {
            id = i;
            break;
        }
    }
    if (id != UINT32_MAX && aamm_relation_equal(&enc->dict[id].rel, rel)) {
        enc->dict[id].pin = enc->op;
        enc->last_id = id;
        *idp = id;
        return 0;
    }
    if (id == UINT32_MAX) {
        if (enc->ndict < enc->o.max_relations) {
            id = enc->ndict++;
        } else { /* full: reuse the next entry not needed by the current change */
            for (uint32_t k = 0; k < enc->o.max_relations; k++) {
                uint32_t c = (enc->evict_next + k) % enc->o.max_relations;
                if (enc->dict[c].pin != enc->op) {
                    id = c;
                    break;
                }
            }
            if (id == UINT32_MAX)
                return aamm__errf(&enc->err, AAMM_EINVAL,
                                  "wire: change references more relations than the "
                                  "dictionary holds (%" PRIu32 ")",
                                  enc->o.max_relations);
            enc->evict_next = (id + 1) % enc->o.max_relations;
        }
    }
    e = &enc->dict[id];
    aamm_relation_clear(&e->rel);
    e->used = false;
    if ((rc = aamm_relation_copy(&e->rel, rel)) != 0)
        return enc_nomem(enc);
    e->used = true;
    e->hash = h;
    e->pin = enc->op;
    enc->rec.len = 0;
    enc->nsegs = 0;
    write_relation(&enc->rec, id, rel);
    {
        /* a relation record goes out whole, even in streaming mode (it is not resumed) */
        bool streaming = enc->streaming;
        enc->streaming = false;
        rc = emit_record(enc);
        enc->streaming = streaming;
    }
    if (rc != 0)
        return rc;
    enc->last_id = id;
    *idp = id;
    return 0;
}

int aamm_wire_encode_begin(struct aamm_wire_encoder *enc, const struct aamm_transaction *txn)
{
    if (enc->in_txn)
        return aamm__errf(&enc->err, AAMM_ESTATE, "wire: BEGIN inside a transaction");
    if (txn->origin_name != NULL && (strlen(txn->origin_name) > enc->o.frame_payload / 2))
        return aamm__errf(&enc->err, AAMM_EINVAL, "wire: origin name too long");
    if (enc->split_active)
        return aamm__errf(&enc->err, AAMM_ESTATE,
                          "wire: BEGIN while a split record is in progress");
    enc->rec.len = 0;
    enc->nsegs = 0;
    write_begin(&enc->rec, txn);
    enc->in_txn = true;
    enc->begin_commit_lsn = txn->commit_lsn;
    enc->begin_commit_time = txn->commit_time;
    return emit_record(enc);
}

int aamm_wire_encode_commit(struct aamm_wire_encoder *enc, const struct aamm_transaction *txn)
{
    bool override;
    if (!enc->in_txn)
        return aamm__errf(&enc->err, AAMM_ESTATE, "wire: COMMIT outside a transaction");
    if (txn->end_lsn == AAMM_LSN_INVALID)
        return aamm__errf(&enc->err, AAMM_EINVAL, "wire: COMMIT without an end LSN");
    override =
        txn->commit_lsn != enc->begin_commit_lsn || txn->commit_time != enc->begin_commit_time;
    if (enc->split_active)
        return aamm__errf(&enc->err, AAMM_ESTATE,
                          "wire: COMMIT while a split record is in progress");
    enc->rec.len = 0;
    enc->nsegs = 0;
    write_commit(&enc->rec, txn, override);
    enc->in_txn = false;
    return emit_record(enc);
}

int aamm_wire_encode_change(struct aamm_wire_encoder *enc, const struct aamm_change *ch)
{
    uint32_t id = 0;
    int rc;
    enc->op++;
    switch (ch->kind) {
    case AAMM_CHANGE_INSERT:
    case AAMM_CHANGE_UPDATE:
    case AAMM_CHANGE_DELETE: {
        bool has_old = ch->kind != AAMM_CHANGE_INSERT;
        if (!enc->in_txn)
            return aamm__errf(&enc->err, AAMM_ESTATE, "wire: %s outside a transaction",
                              aamm_change_kind_name(ch->kind));
        if (!valid_relation(ch->relation))
            return aamm__errf(&enc->err, AAMM_EINVAL, "wire: %s with an invalid relation",
                              aamm_change_kind_name(ch->kind));
        if (has_old && ch->old_kind != AAMM_OLD_NONE && ch->old_kind != AAMM_OLD_KEY &&
            ch->old_kind != AAMM_OLD_FULL)
            return aamm__errf(&enc->err, AAMM_EINVAL, "wire: unknown old tuple kind %d",
                              ch->old_kind);
        if ((has_old && ch->old_kind != AAMM_OLD_NONE &&
             !valid_tuple(&ch->old_tuple, ch->relation, !enc->split_active)) ||
            (ch->kind != AAMM_CHANGE_DELETE &&
             !valid_tuple(&ch->new_tuple, ch->relation, !enc->split_active)))
            return aamm__errf(&enc->err, AAMM_EINVAL,
                              "wire: %s on %s.%s: tuple does not match the relation's %" PRIu32
                              " columns (or holds an invalid value)",
                              aamm_change_kind_name(ch->kind), ch->relation->schema,
                              ch->relation->name, ch->relation->ncolumns);
        if ((rc = relation_id(enc, ch->relation, &id)) != 0)
            return rc;
        enc->rec.len = 0;
        enc->nsegs = 0;
        aamm__wr_u8(&enc->rec, ch->kind == AAMM_CHANGE_INSERT   ? 'I'
                               : ch->kind == AAMM_CHANGE_UPDATE ? 'U'
                                                                : 'D');
        wr_varint(&enc->rec, id);
        if (has_old) {
            aamm__wr_u8(&enc->rec, (uint8_t)ch->old_kind);
            if (ch->old_kind != AAMM_OLD_NONE)
                rec_tuple(enc, &ch->old_tuple);
        }
        if (ch->kind != AAMM_CHANGE_DELETE)
            rec_tuple(enc, &ch->new_tuple);
        return emit_record(enc);
    }
    case AAMM_CHANGE_TRUNCATE: {
        uint32_t *ids;
        if (!enc->in_txn)
            return aamm__errf(&enc->err, AAMM_ESTATE, "wire: truncate outside a transaction");
        if (ch->nrelations == 0 || ch->nrelations > enc->o.max_relations || ch->relations == NULL ||
            (ch->truncate_flags & ~(AAMM_TRUNCATE_CASCADE | AAMM_TRUNCATE_RESTART_IDENTITY)))
            return aamm__errf(&enc->err, AAMM_EINVAL, "wire: invalid truncate");
        for (uint32_t i = 0; i < ch->nrelations; i++)
            if (!valid_relation(ch->relations[i]))
                return aamm__errf(&enc->err, AAMM_EINVAL,
                                  "wire: truncate with an invalid relation");
        ids = aamm__calloc(ch->nrelations, sizeof *ids);
        if (ids == NULL)
            return enc_nomem(enc);
        for (uint32_t i = 0; i < ch->nrelations; i++) {
            if ((rc = relation_id(enc, ch->relations[i], &ids[i])) != 0) {
                aamm__free(ids);
                return rc;
            }
        }
        enc->rec.len = 0;
        enc->nsegs = 0;
        aamm__wr_u8(&enc->rec, 'T');
        aamm__wr_u8(&enc->rec, (uint8_t)ch->truncate_flags);
        wr_varint(&enc->rec, ch->nrelations);
        for (uint32_t i = 0; i < ch->nrelations; i++)
            wr_varint(&enc->rec, ids[i]);
        aamm__free(ids);
        return emit_record(enc);
    }
    case AAMM_CHANGE_MESSAGE:
        if (ch->transactional && !enc->in_txn)
            return aamm__errf(&enc->err, AAMM_ESTATE,
                              "wire: transactional message outside a transaction");
        if (ch->prefix == NULL || (ch->content == NULL && ch->content_len > 0))
            return aamm__errf(&enc->err, AAMM_EINVAL, "wire: message without prefix");
        enc->rec.len = 0;
        enc->nsegs = 0;
        aamm__wr_u8(&enc->rec, 'M');
        aamm__wr_u8(&enc->rec, ch->transactional ? 1 : 0);
        wr_varint(&enc->rec, ch->message_lsn);
        wr_str(&enc->rec, ch->prefix, strlen(ch->prefix));
        wr_varint(&enc->rec, ch->content_len);
        rec_ref(enc, ch->content, ch->content_len);
        return emit_record(enc);
    }
    return aamm__errf(&enc->err, AAMM_EINVAL, "wire: unknown change kind %d", (int)ch->kind);
}

/* ====================================================================================
 * Decoder
 * ==================================================================================== */

enum { HAVE_NONE, HAVE_CHANGE };

struct aamm_wire_decoder {
    struct aamm__err err;
    int sticky;
    struct aamm_wire_options o;
    unsigned vmin, vmax;
    aamm_wire_verify_fn verify;
    void *verify_arg;

    uint8_t *in; /* buffered input: [in_off, in_len) */
    size_t in_off, in_len, in_cap, in_max;
    uint32_t max_now;    /* largest payload accepted now (<= o.max_payload) */
    uint64_t stream_off; /* stream offset of in[in_off], for messages */

    char *hist; /* the last 64 KiB of DATA payloads: the LZ4 dictionary of the next frame */
    size_t hist_len;
    uint8_t *pl; /* the current DATA payload, decompressed: records [pl_pos, pl_len) */
    size_t pl_cap, pl_len, pl_pos;
    uint8_t pl_version;

    uint8_t *ra; /* record reassembly from 'P' pieces */
    size_t ra_len, ra_cap, ra_total;
    bool ra_active;

    struct aamm_relation **dict;
    uint32_t generation;

    bool in_txn;
    struct aamm_transaction txn;
    struct aamm_change change;
    int have;

    char cluster[AAMM_WIRE_MAX_CLUSTER + 1];
    char *message; /* heap */
    struct aamm_wire_position *positions;
};

int aamm_wire_decoder_new(struct aamm_wire_decoder **decp, const struct aamm_wire_options *opts)
{
    struct aamm_wire_decoder *dec;
    struct aamm__err tmp;
    int rc;
    *decp = NULL;
    rc = fill_options(&(struct aamm_wire_options){0}, opts, &tmp);
    if (rc != 0)
        return rc;
    dec = aamm__calloc(1, sizeof *dec);
    if (dec == NULL)
        return AAMM_ENOMEM;
    fill_options(&dec->o, opts, &dec->err);
    dec->dict = aamm__calloc(dec->o.max_relations, sizeof *dec->dict);
    if (dec->dict == NULL) {
        aamm__free(dec);
        return AAMM_ENOMEM;
    }
    dec->vmin = AAMM_WIRE_VERSION_MIN;
    dec->vmax = AAMM_WIRE_VERSION_MAX;
    dec->in_max = AAMM_WIRE_HEADER_SIZE + (size_t)dec->o.max_payload + AAMM_WIRE_MAC_SIZE;
    dec->max_now = dec->o.max_payload;
    *decp = dec;
    return 0;
}

void aamm_wire_decoder_free(struct aamm_wire_decoder *dec)
{
    if (dec == NULL)
        return;
    for (uint32_t i = 0; i < dec->o.max_relations; i++) {
        if (dec->dict[i] != NULL) {
            aamm_relation_clear(dec->dict[i]);
            aamm__free(dec->dict[i]);
        }
    }
    aamm__free(dec->dict);
    aamm__free(dec->in);
    aamm__free(dec->pl);
    aamm__free(dec->ra);
    aamm__free(dec->hist);
    aamm_transaction_clear(&dec->txn);
    aamm_change_clear(&dec->change);
    aamm__free(dec->message);
    aamm__free(dec->positions);
    aamm__free(dec);
}

const char *aamm_wire_decoder_errmsg(const struct aamm_wire_decoder *dec)
{
    return aamm__errmsg(&dec->err);
}

int aamm_wire_decoder_set_version(struct aamm_wire_decoder *dec, unsigned version)
{
    if (version < AAMM_WIRE_VERSION_MIN || version > AAMM_WIRE_VERSION_MAX)
        return aamm__errf(&dec->err, AAMM_EUNSUPPORTED, "wire: protocol version %u not supported",
                          version);
    dec->vmin = dec->vmax = version;
    return 0;
}

int aamm_wire_decoder_set_max_payload(struct aamm_wire_decoder *dec, uint32_t max)
{
    if (max < 64 || max > dec->o.max_payload)
        return aamm__errf(&dec->err, AAMM_EINVAL,
                          "wire: payload limit %" PRIu32 " outside 64..%" PRIu32, max,
                          dec->o.max_payload);
    dec->max_now = max;
    return 0;
}

void aamm_wire_decoder_set_mac(struct aamm_wire_decoder *dec, aamm_wire_verify_fn fn, void *arg)
{
    dec->verify = fn;
    dec->verify_arg = arg;
}

bool aamm_wire_decoder_in_transaction(const struct aamm_wire_decoder *dec)
{
    return dec->in_txn;
}

int aamm_wire_decoder_take_change(struct aamm_wire_decoder *dec, struct aamm_change *out)
{
    if (dec->have != HAVE_CHANGE)
        return aamm__errf(&dec->err, AAMM_ESTATE, "wire: no change to take");
    *out = dec->change;
    memset(&dec->change, 0, sizeof dec->change);
    dec->have = HAVE_NONE;
    return 0;
}

/* Record a fatal error: every later call returns it. */
static int fail(struct aamm_wire_decoder *dec, int code, const char *fmt, ...) AAMM_PRINTF(3, 4);
static int fail(struct aamm_wire_decoder *dec, int code, const char *fmt, ...)
{
    char buf[AAMM__ERRMSG_SIZE];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    aamm__errf(&dec->err, code, "wire: %s", buf);
    dec->sticky = code;
    return code;
}

int aamm_wire_decoder_feed(struct aamm_wire_decoder *dec, const void *data, size_t len,
                           size_t *accepted)
{
    size_t have, n;
    *accepted = 0;
    if (dec->sticky)
        return dec->sticky;
    have = dec->in_len - dec->in_off;
    if (dec->in_off > 0) { /* compact */
        memmove(dec->in, dec->in + dec->in_off, have);
        dec->in_off = 0;
        dec->in_len = have;
    }
    n = dec->in_max - have;
    if (n > len)
        n = len;
    if (n == 0)
        return 0;
    if (dec->in_cap < have + n) {
        size_t cap = dec->in_cap ? dec->in_cap : 4096;
        uint8_t *p;
        while (cap < have + n)
            cap *= 2;
        if (cap > dec->in_max)
            cap = dec->in_max;
        p = aamm__realloc(dec->in, cap);
        if (p == NULL)
            return fail(dec, AAMM_ENOMEM, "out of memory buffering input");
        dec->in = p;
        dec->in_cap = cap;
    }
    memcpy(dec->in + have, data, n);
    dec->in_len = have + n;
    *accepted = n;
    return 0;
}

int aamm_wire_decoder_finish(struct aamm_wire_decoder *dec)
{
    size_t have = dec->in_len - dec->in_off;
    if (dec->sticky)
        return dec->sticky;
    if (have > 0) {
        if (have >= AAMM_WIRE_HEADER_SIZE) {
            const uint8_t *h = dec->in + dec->in_off;
            uint32_t plen = (uint32_t)h[8] | ((uint32_t)h[9] << 8) | ((uint32_t)h[10] << 16) |
                            ((uint32_t)h[11] << 24);
            return fail(dec, AAMM_EMALFORMED,
                        "truncated frame at stream offset %" PRIu64
                        ": end of input after %zu bytes of a frame whose header announces "
                        "%" PRIu32 " payload bytes",
                        dec->stream_off, have, plen);
        }
        return fail(dec, AAMM_EMALFORMED,
                    "truncated frame at stream offset %" PRIu64
                    ": end of input after %zu of %d header bytes",
                    dec->stream_off, have, AAMM_WIRE_HEADER_SIZE);
    }
    if (dec->ra_active)
        return fail(dec, AAMM_EMALFORMED, "end of input inside a split record (%zu of %zu bytes)",
                    dec->ra_len, dec->ra_total);
    return 0;
}

/* ---- control payloads (read_<msg>) ---------------------------------------------- */

static int read_hello(struct aamm_wire_decoder *dec, struct aamm__rd *r, struct aamm_wire_event *ev)
{
    struct aamm_wire_hello *h = &ev->hello;
    const uint8_t *nonce;
    const char *cl;
    size_t clen = 0;
    h->min_version = aamm__rd_le16(r);
    h->max_version = aamm__rd_le16(r);
    h->role = aamm__rd_u8(r);
    h->flags = aamm__rd_u8(r);
    h->node_id = aamm__rd_le32(r);
    h->wall_time_us = (int64_t)aamm__rd_le64(r);
    nonce = aamm__rd_bytes(r, AAMM_WIRE_NONCE_SIZE);
    cl = rd_str(r, &clen);
    if (!r->ok || r->left != 0)
        return fail(dec, AAMM_EMALFORMED, "HELLO payload malformed");
    if (h->min_version < 1 || h->min_version > h->max_version ||
        (h->role != AAMM_WIRE_ROLE_SENDER && h->role != AAMM_WIRE_ROLE_RECEIVER) ||
        (h->flags & ~AAMM_WIRE_HELLO_TLS) != 0 || h->node_id == 0 || clen == 0 ||
        clen > AAMM_WIRE_MAX_CLUSTER)
        return fail(dec, AAMM_EMALFORMED,
                    "HELLO fields invalid (versions %u..%u, role %u, flags 0x%x, node %" PRIu32
                    ", cluster name of %zu bytes)",
                    h->min_version, h->max_version, h->role, h->flags, h->node_id, clen);
    memcpy(h->nonce, nonce, AAMM_WIRE_NONCE_SIZE);
    memcpy(dec->cluster, cl, clen);
    dec->cluster[clen] = '\0';
    h->cluster = dec->cluster;
    ev->kind = AAMM_WIRE_EV_HELLO;
    return 0;
}

static int read_control(struct aamm_wire_decoder *dec, uint8_t type, const uint8_t *p, size_t len,
                        struct aamm_wire_event *ev)
{
    struct aamm__rd r;
    aamm__rd_init(&r, p, len);
    switch (type) {
    case AAMM_WIRE_HELLO:
        return read_hello(dec, &r, ev);
    case AAMM_WIRE_AUTH:
        if (len != AAMM_WIRE_PROOF_SIZE)
            return fail(dec, AAMM_EMALFORMED, "AUTH payload of %zu bytes, expected %d", len,
                        AAMM_WIRE_PROOF_SIZE);
        memcpy(ev->proof, p, AAMM_WIRE_PROOF_SIZE);
        ev->kind = AAMM_WIRE_EV_AUTH;
        return 0;
    case AAMM_WIRE_RESUME: {
        uint64_t n = rd_varint(&r);
        if (!r.ok || n > AAMM_WIRE_MAX_RESUME || r.left != n * 12)
            return fail(dec, AAMM_EMALFORMED, "RESUME payload malformed");
        aamm__free(dec->positions);
        dec->positions = NULL;
        if (n > 0) {
            dec->positions = aamm__calloc((size_t)n, sizeof *dec->positions);
            if (dec->positions == NULL)
                return fail(dec, AAMM_ENOMEM, "out of memory reading RESUME");
        }
        for (uint64_t i = 0; i < n; i++) {
            dec->positions[i].origin_node = aamm__rd_le32(&r);
            dec->positions[i].lsn = aamm__rd_le64(&r);
        }
        ev->positions = dec->positions;
        ev->npositions = (uint32_t)n;
        ev->kind = AAMM_WIRE_EV_RESUME;
        return 0;
    }
    case AAMM_WIRE_ACK:
        ev->origin_node = aamm__rd_le32(&r);
        ev->lsn = aamm__rd_le64(&r);
        if (!r.ok || r.left != 0)
            return fail(dec, AAMM_EMALFORMED, "ACK payload of %zu bytes, expected 12", len);
        ev->kind = AAMM_WIRE_EV_ACK;
        return 0;
    case AAMM_WIRE_HEARTBEAT:
        ev->wall_time_us = (int64_t)aamm__rd_le64(&r);
        if (!r.ok || r.left != 0)
            return fail(dec, AAMM_EMALFORMED, "HEARTBEAT payload of %zu bytes, expected 8", len);
        ev->kind = AAMM_WIRE_EV_HEARTBEAT;
        return 0;
    case AAMM_WIRE_ERROR:
    case AAMM_WIRE_GOODBYE: {
        uint16_t code = aamm__rd_le16(&r);
        size_t mlen = 0;
        const char *m = rd_str(&r, &mlen);
        if (!r.ok || r.left != 0 || mlen > MAX_ERRMSG || (type == AAMM_WIRE_GOODBYE) != (code == 0))
            return fail(dec, AAMM_EMALFORMED, "%s payload malformed",
                        type == AAMM_WIRE_ERROR ? "ERROR" : "GOODBYE");
        aamm__free(dec->message);
        dec->message = aamm__strndup(m, mlen);
        if (dec->message == NULL)
            return fail(dec, AAMM_ENOMEM, "out of memory reading ERROR");
        ev->code = -(int)code;
        ev->message = dec->message;
        ev->kind = type == AAMM_WIRE_ERROR ? AAMM_WIRE_EV_ERROR : AAMM_WIRE_EV_GOODBYE;
        return 0;
    }
    }
    return fail(dec, AAMM_EINTERNAL, "unhandled frame type 0x%02x", type);
}

/* ---- data records (read_<record>) ------------------------------------------------ */

/* Duplicate a str field into a heap string; on failure sets *rc. */
static char *dup_field(struct aamm__rd *r, bool *nomem)
{
    size_t len = 0;
    const char *s = rd_str(r, &len);
    char *d;
    if (s == NULL)
        return NULL;
    d = aamm__strndup(s, len);
    if (d == NULL) {
        *nomem = true;
        r->ok = false;
    }
    return d;
}

static int read_relation(struct aamm_wire_decoder *dec, struct aamm__rd *r)
{
    struct aamm_relation *rel;
    bool nomem = false;
    uint64_t id = rd_varint(r), ncol;
    if (!r->ok || id >= dec->o.max_relations)
        return fail(dec, AAMM_EMALFORMED, "RELATION record: bad dictionary id");
    rel = aamm__calloc(1, sizeof *rel);
    if (rel == NULL)
        return fail(dec, AAMM_ENOMEM, "out of memory reading a relation");
    rel->schema = dup_field(r, &nomem);
    rel->name = dup_field(r, &nomem);
    rel->replica_identity = (char)aamm__rd_u8(r);
    ncol = rd_varint(r);
    if (r->ok && (ncol > MAX_COLUMNS || ncol > r->left))
        r->ok = false;
    if (r->ok && ncol > 0) {
        rel->columns = aamm__calloc((size_t)ncol, sizeof *rel->columns);
        if (rel->columns == NULL) {
            nomem = true;
            r->ok = false;
        } else {
            rel->ncolumns = (uint32_t)ncol;
        }
    }
    for (uint32_t i = 0; r->ok && i < rel->ncolumns; i++) {
        struct aamm_column *c = &rel->columns[i];
        uint64_t flags;
        uint8_t has_type;
        c->name = dup_field(r, &nomem);
        flags = rd_varint(r);
        if (flags & ~(uint64_t)AAMM_COLUMN_KEY)
            r->ok = false;
        c->flags = (uint32_t)flags;
        has_type = aamm__rd_u8(r);
        if (has_type > 1)
            r->ok = false;
        if (has_type == 1)
            c->type_name = dup_field(r, &nomem);
        {
            int64_t tm = rd_zigzag(r);
            if (tm < INT32_MIN || tm > INT32_MAX)
                r->ok = false;
            c->type_mod = (int32_t)tm;
        }
    }
    if (r->ok && rel->replica_identity != AAMM_REPLIDENT_DEFAULT &&
        rel->replica_identity != AAMM_REPLIDENT_NOTHING &&
        rel->replica_identity != AAMM_REPLIDENT_FULL &&
        rel->replica_identity != AAMM_REPLIDENT_INDEX)
        r->ok = false;
    if (!r->ok) {
        aamm_relation_clear(rel);
        aamm__free(rel);
        if (nomem)
            return fail(dec, AAMM_ENOMEM, "out of memory reading a relation");
        return fail(dec, AAMM_EMALFORMED, "RELATION record malformed (id %" PRIu64 ")", id);
    }
    rel->generation = ++dec->generation;
    if (dec->dict[id] != NULL) {
        aamm_relation_clear(dec->dict[id]);
        aamm__free(dec->dict[id]);
    }
    dec->dict[id] = rel;
    return 0;
}

static const struct aamm_relation *read_relid(struct aamm_wire_decoder *dec, struct aamm__rd *r)
{
    uint64_t id = rd_varint(r);
    if (!r->ok || id >= dec->o.max_relations || dec->dict[id] == NULL) {
        r->ok = false;
        return NULL;
    }
    return dec->dict[id];
}

/* Returns false on malformed input or (with *nomem) allocation failure. */
static bool read_tuple(struct aamm__rd *r, const struct aamm_relation *rel, struct aamm_tuple *t,
                       bool *nomem)
{
    uint64_t n = rd_varint(r);
    if (!r->ok || n != rel->ncolumns)
        return false;
    if (n == 0)
        return true;
    t->values = aamm__calloc((size_t)n, sizeof *t->values);
    if (t->values == NULL) {
        *nomem = true;
        return false;
    }
    t->nvalues = (uint32_t)n;
    for (uint32_t i = 0; i < t->nvalues; i++) {
        struct aamm_value *v = &t->values[i];
        uint8_t kind = aamm__rd_u8(r);
        if (!r->ok)
            return false;
        if (kind == AAMM_VALUE_NULL || kind == AAMM_VALUE_UNCHANGED) {
            v->kind = (enum aamm_value_kind)kind;
        } else if (kind == AAMM_VALUE_TEXT) {
            size_t len = 0;
            const char *s = rd_str(r, &len);
            if (s == NULL || len > UINT32_MAX)
                return false;
            v->kind = AAMM_VALUE_TEXT;
            v->data = aamm__strndup(s, len);
            if (v->data == NULL) {
                *nomem = true;
                return false;
            }
            v->len = (uint32_t)len;
        } else {
            return false;
        }
    }
    return true;
}

static int bad_record(struct aamm_wire_decoder *dec, bool nomem, char type)
{
    aamm_change_clear(&dec->change);
    if (nomem)
        return fail(dec, AAMM_ENOMEM, "out of memory decoding a '%c' record", type);
    return fail(dec, AAMM_EMALFORMED, "'%c' record malformed", type);
}

/* Parse one record at @p (within @len bytes); *@used gets its length. Returns 1 with an
 * event, 0 without, or an error. */
static int read_record(struct aamm_wire_decoder *dec, const uint8_t *p, size_t len,
                       struct aamm_wire_event *ev, size_t *used)
{
    struct aamm__rd r;
    char type;
    bool nomem = false;
    struct aamm_change *ch = &dec->change;
    aamm__rd_init(&r, p, len);
    type = (char)aamm__rd_u8(&r);
    switch (type) {
    case 'B': {
        struct aamm_transaction *t = &dec->txn;
        uint64_t origin, xid;
        uint8_t flags;
        if (dec->in_txn)
            return fail(dec, AAMM_EMALFORMED, "BEGIN inside a transaction");
        aamm_transaction_clear(t);
        origin = rd_varint(&r);
        xid = rd_varint(&r);
        t->commit_lsn = aamm__rd_le64(&r);
        t->commit_time = (int64_t)aamm__rd_le64(&r);
        flags = aamm__rd_u8(&r);
        if (origin > UINT32_MAX || xid > UINT32_MAX || flags > 1)
            r.ok = false;
        t->origin_node = (uint32_t)origin;
        t->xid = (uint32_t)xid;
        if (r.ok && flags == 1) {
            t->origin_name = dup_field(&r, &nomem);
            t->origin_lsn = aamm__rd_le64(&r);
        }
        if (!r.ok) {
            aamm_transaction_clear(t);
            return bad_record(dec, nomem, type);
        }
        dec->in_txn = true;
        *used = len - r.left;
        ev->kind = AAMM_WIRE_EV_BEGIN;
        ev->txn = *t;
        return 1;
    }
    case 'C': {
        struct aamm_transaction *t = &dec->txn;
        uint8_t flags;
        int64_t delta;
        if (!dec->in_txn)
            return fail(dec, AAMM_EMALFORMED, "COMMIT outside a transaction");
        flags = aamm__rd_u8(&r);
        if (flags > 1)
            r.ok = false;
        if (flags == 1) {
            t->commit_lsn = aamm__rd_le64(&r);
            t->commit_time = (int64_t)aamm__rd_le64(&r);
        }
        delta = rd_zigzag(&r);
        t->end_lsn = t->commit_lsn + (uint64_t)delta;
        if (!r.ok || t->end_lsn == 0)
            return bad_record(dec, false, type);
        dec->in_txn = false;
        *used = len - r.left;
        ev->kind = AAMM_WIRE_EV_COMMIT;
        ev->txn = *t;
        return 1;
    }
    case 'R': {
        int rc = read_relation(dec, &r);
        if (rc != 0)
            return rc;
        *used = len - r.left;
        return 0;
    }
    case 'I':
    case 'U':
    case 'D':
        if (!dec->in_txn)
            return fail(dec, AAMM_EMALFORMED, "'%c' record outside a transaction", type);
        ch->kind = type == 'I'   ? AAMM_CHANGE_INSERT
                   : type == 'U' ? AAMM_CHANGE_UPDATE
                                 : AAMM_CHANGE_DELETE;
        ch->relation = read_relid(dec, &r);
        if (r.ok && type != 'I') {
            uint8_t ok = aamm__rd_u8(&r);
            if (ok != AAMM_OLD_NONE && ok != AAMM_OLD_KEY && ok != AAMM_OLD_FULL)
                r.ok = false;
            ch->old_kind = (char)ok;
            if (r.ok && ok != AAMM_OLD_NONE &&
                !read_tuple(&r, ch->relation, &ch->old_tuple, &nomem))
                r.ok = false;
        }
        if (r.ok && type != 'D' && !read_tuple(&r, ch->relation, &ch->new_tuple, &nomem))
            r.ok = false;
        if (!r.ok)
            return bad_record(dec, nomem, type);
        break;
    case 'T': {
        uint8_t flags;
        uint64_t n;
        if (!dec->in_txn)
            return fail(dec, AAMM_EMALFORMED, "'T' record outside a transaction");
        ch->kind = AAMM_CHANGE_TRUNCATE;
        flags = aamm__rd_u8(&r);
        if (flags & ~(AAMM_TRUNCATE_CASCADE | AAMM_TRUNCATE_RESTART_IDENTITY))
            r.ok = false;
        ch->truncate_flags = flags;
        n = rd_varint(&r);
        if (r.ok && (n == 0 || n > dec->o.max_relations || n > r.left))
            r.ok = false;
        if (r.ok) {
            ch->relations = aamm__calloc((size_t)n, sizeof *ch->relations);
            if (ch->relations == NULL)
                nomem = true, r.ok = false;
            else
                ch->nrelations = (uint32_t)n;
        }
        for (uint32_t i = 0; r.ok && i < ch->nrelations; i++)
            ch->relations[i] = read_relid(dec, &r);
        if (!r.ok)
            return bad_record(dec, nomem, type);
        break;
    }
    case 'M': {
        uint8_t flags = aamm__rd_u8(&r);
        uint64_t clen;
        const uint8_t *content;
        ch->kind = AAMM_CHANGE_MESSAGE;
        if (flags > 1)
            r.ok = false;
        ch->transactional = flags == 1;
        if (r.ok && ch->transactional && !dec->in_txn)
            return fail(dec, AAMM_EMALFORMED, "transactional message outside a transaction");
        ch->message_lsn = rd_varint(&r);
        ch->prefix = dup_field(&r, &nomem);
        clen = rd_varint(&r);
        if (r.ok && (clen > r.left || clen > UINT32_MAX))
            r.ok = false;
        content = aamm__rd_bytes(&r, (size_t)clen);
        if (r.ok) {
            ch->content = aamm__malloc((size_t)clen + 1);
            if (ch->content == NULL) {
                nomem = true;
                r.ok = false;
            } else {
                if (clen > 0)
                    memcpy(ch->content, content, (size_t)clen);
                ch->content[clen] = '\0';
                ch->content_len = (uint32_t)clen;
            }
        }
        if (!r.ok)
            return bad_record(dec, nomem, type);
        break;
    }
    default:
        return fail(dec, AAMM_EMALFORMED, "unknown record type 0x%02x", (uint8_t)type);
    }
    *used = len - r.left;
    dec->have = HAVE_CHANGE;
    ev->kind = AAMM_WIRE_EV_CHANGE;
    ev->change = *ch;
    return 1;
}

/* A 'P' piece: append to the reassembly buffer; parse the record once it is complete. */
static int read_piece(struct aamm_wire_decoder *dec, struct aamm__rd *r, struct aamm_wire_event *ev)
{
    uint64_t total = rd_varint(r), off = rd_varint(r), n = rd_varint(r);
    const uint8_t *bytes;
    size_t used = 0;
    int rc;
    if (!r->ok || n == 0 || n > r->left || total == 0 || total > dec->o.max_record ||
        off != (dec->ra_active ? dec->ra_len : 0) || (dec->ra_active && total != dec->ra_total) ||
        off + n > total)
        return fail(dec, AAMM_EMALFORMED,
                    "piece record malformed or out of order (total %" PRIu64 ", offset %" PRIu64
                    ", length %" PRIu64 ")",
                    total, off, n);
    bytes = aamm__rd_bytes(r, (size_t)n);
    if (r->left != 0)
        return fail(dec, AAMM_EMALFORMED, "piece record not alone in its frame");
    if (dec->ra_cap < off + n) {
        size_t cap = dec->ra_cap ? dec->ra_cap : 65536;
        uint8_t *p;
        while (cap < off + n)
            cap *= 2;
        if (cap > total)
            cap = (size_t)total;
        p = aamm__realloc(dec->ra, cap);
        if (p == NULL)
            return fail(dec, AAMM_ENOMEM, "out of memory reassembling a record");
        dec->ra = p;
        dec->ra_cap = cap;
    }
    memcpy(dec->ra + off, bytes, (size_t)n);
    dec->ra_len = (size_t)(off + n);
    dec->ra_total = (size_t)total;
    dec->ra_active = dec->ra_len < dec->ra_total;
    if (dec->ra_active)
        return 0;
    if (dec->ra[0] == 'P')
        return fail(dec, AAMM_EMALFORMED, "piece record inside a piece");
    rc = read_record(dec, dec->ra, dec->ra_len, ev, &used);
    if (rc >= 0 && used != dec->ra_len)
        rc = fail(dec, AAMM_EMALFORMED, "split record has %zu trailing bytes", dec->ra_len - used);
    dec->ra_len = 0;
    if (dec->ra_cap > 4 * (size_t)dec->o.max_payload) {
        aamm__free(dec->ra);
        dec->ra = NULL;
        dec->ra_cap = 0;
    }
    return rc;
}

/* The next record of the current DATA payload. */
static int next_record(struct aamm_wire_decoder *dec, struct aamm_wire_event *ev)
{
    const uint8_t *p = dec->pl + dec->pl_pos;
    size_t left = dec->pl_len - dec->pl_pos;
    size_t used = 0;
    int rc;
    if (p[0] == 'P') {
        struct aamm__rd r;
        if (dec->pl_pos != 0)
            return fail(dec, AAMM_EMALFORMED, "piece record not alone in its frame");
        aamm__rd_init(&r, p + 1, left - 1);
        rc = read_piece(dec, &r, ev);
        dec->pl_pos = dec->pl_len;
        return rc;
    }
    if (dec->ra_active)
        return fail(dec, AAMM_EMALFORMED, "'%c' record while a split record is incomplete", p[0]);
    rc = read_record(dec, p, left, ev, &used);
    if (rc >= 0)
        dec->pl_pos += used;
    return rc;
}

/* ---- frames ---------------------------------------------------------------------- */

static const char *type_name(uint8_t t)
{
    switch (t) {
    case AAMM_WIRE_HELLO:
        return "HELLO";
    case AAMM_WIRE_AUTH:
        return "AUTH";
    case AAMM_WIRE_RESUME:
        return "RESUME";
    case AAMM_WIRE_ACK:
        return "ACK";
    case AAMM_WIRE_HEARTBEAT:
        return "HEARTBEAT";
    case AAMM_WIRE_ERROR:
        return "ERROR";
    case AAMM_WIRE_GOODBYE:
        return "GOODBYE";
    case AAMM_WIRE_DATA:
        return "DATA";
    }
    return NULL;
}

/* Check the header at the front of the input as soon as it is there. */
static int check_header(struct aamm_wire_decoder *dec, const uint8_t *h, uint16_t *flagsp,
                        uint32_t *plenp)
{
    uint16_t flags = (uint16_t)(h[6] | (h[7] << 8));
    uint32_t plen =
        (uint32_t)h[8] | ((uint32_t)h[9] << 8) | ((uint32_t)h[10] << 16) | ((uint32_t)h[11] << 24);
    uint64_t at = dec->stream_off;
    if (h[0] != MAGIC0 || h[1] != MAGIC1 || h[2] != MAGIC2 || h[3] != MAGIC3)
        return fail(dec, AAMM_EMALFORMED,
                    "bad magic %02x %02x %02x %02x at stream offset %" PRIu64
                    " (not an aamm peer, or the stream is out of sync)",
                    h[0], h[1], h[2], h[3], at);
    if (h[4] < dec->vmin || h[4] > dec->vmax)
        return fail(dec, AAMM_EMALFORMED,
                    "frame at stream offset %" PRIu64 " has protocol version %u, expected %u..%u",
                    at, h[4], dec->vmin, dec->vmax);
    if (type_name(h[5]) == NULL)
        return fail(dec, AAMM_EMALFORMED, "unknown frame type 0x%02x at stream offset %" PRIu64,
                    h[5], at);
    if (flags & ~FLAGS_KNOWN)
        return fail(dec, AAMM_EMALFORMED,
                    "%s frame at stream offset %" PRIu64 " has reserved flag bits 0x%04x set",
                    type_name(h[5]), at, (unsigned)(flags & ~FLAGS_KNOWN));
    if ((flags & AAMM_WIRE_F_LZ4) && h[5] != AAMM_WIRE_DATA)
        return fail(dec, AAMM_EMALFORMED, "compressed %s frame at stream offset %" PRIu64,
                    type_name(h[5]), at);
    if (((flags & AAMM_WIRE_F_MAC) != 0) != (dec->verify != NULL))
        return fail(dec, dec->verify ? AAMM_EAUTH : AAMM_EMALFORMED,
                    "%s frame at stream offset %" PRIu64 " %s a MAC", type_name(h[5]), at,
                    dec->verify ? "lacks" : "unexpectedly carries");
    if (plen > dec->max_now)
        return fail(dec, AAMM_ETOOBIG,
                    "%s frame at stream offset %" PRIu64 " announces %" PRIu32
                    " payload bytes, above the limit of %" PRIu32,
                    type_name(h[5]), at, plen, dec->max_now);
    if (h[5] == AAMM_WIRE_DATA && plen == 0)
        return fail(dec, AAMM_EMALFORMED, "empty DATA frame at stream offset %" PRIu64, at);
    *flagsp = flags;
    *plenp = plen;
    return 0;
}

int aamm_wire_decoder_next(struct aamm_wire_decoder *dec, struct aamm_wire_event *ev)
{
    memset(ev, 0, sizeof *ev);
    if (dec->sticky)
        return dec->sticky;
    if (dec->have == HAVE_CHANGE)
        aamm_change_clear(&dec->change);
    dec->have = HAVE_NONE;
    for (;;) {
        const uint8_t *h;
        size_t have, total;
        uint16_t flags = 0;
        uint32_t plen = 0, crc, want;
        int rc;
        if (dec->pl_pos < dec->pl_len) {
            ev->frame_version = dec->pl_version;
            rc = next_record(dec, ev);
            if (rc != 0)
                return rc < 0 ? rc : 0;
            continue;
        }
        have = dec->in_len - dec->in_off;
        if (have < AAMM_WIRE_HEADER_SIZE)
            return AAMM_EAGAIN;
        h = dec->in + dec->in_off;
        if ((rc = check_header(dec, h, &flags, &plen)) != 0)
            return rc;
        total = AAMM_WIRE_HEADER_SIZE + (size_t)plen +
                ((flags & AAMM_WIRE_F_MAC) ? AAMM_WIRE_MAC_SIZE : 0);
        if (have < total)
            return AAMM_EAGAIN;
        crc = aamm_crc32c(0, h, 12);
        crc = aamm_crc32c(crc, h + AAMM_WIRE_HEADER_SIZE, plen);
        want = (uint32_t)h[12] | ((uint32_t)h[13] << 8) | ((uint32_t)h[14] << 16) |
               ((uint32_t)h[15] << 24);
        if (crc != want)
            return fail(dec, AAMM_EMALFORMED,
                        "%s frame at stream offset %" PRIu64
                        ": CRC32C mismatch (computed %08x, frame says %08x)",
                        type_name(h[5]), dec->stream_off, crc, want);
        if (dec->verify != NULL) {
            rc = dec->verify(dec->verify_arg, h, AAMM_WIRE_HEADER_SIZE + plen,
                             h + AAMM_WIRE_HEADER_SIZE + plen);
            if (rc != 0)
                return fail(dec, rc == AAMM_ENOMEM ? rc : AAMM_EAUTH,
                            "%s frame at stream offset %" PRIu64
                            ": MAC check failed (altered, replayed, reordered or dropped frame)",
                            type_name(h[5]), dec->stream_off);
        }
        ev->frame_version = h[4];
        if (h[5] != AAMM_WIRE_DATA) {
            rc = read_control(dec, h[5], h + AAMM_WIRE_HEADER_SIZE, plen, ev);
            if (rc != 0)
                return rc;
            dec->in_off += total;
            dec->stream_off += total;
            return 0;
        }
        /* DATA: decompress or copy the payload, then hand out its records. */
        {
            const uint8_t *src = h + AAMM_WIRE_HEADER_SIZE;
            size_t raw = plen;
            if (flags & AAMM_WIRE_F_LZ4) {
                if (plen < 5)
                    return fail(dec, AAMM_EMALFORMED, "compressed DATA frame too short");
                raw = (size_t)src[0] | ((size_t)src[1] << 8) | ((size_t)src[2] << 16) |
                      ((size_t)src[3] << 24);
                if (raw == 0 || raw > dec->max_now)
                    return fail(dec, raw ? AAMM_ETOOBIG : AAMM_EMALFORMED,
                                "compressed DATA frame announces %zu raw bytes (limit %" PRIu32 ")",
                                raw, dec->max_now);
            }
            if (dec->hist == NULL) { /* first DATA frame: the LZ4 history */
                dec->hist = aamm__malloc(LZ4_HISTORY);
                if (dec->hist == NULL)
                    return fail(dec, AAMM_ENOMEM, "out of memory for the LZ4 history");
            }
            if (dec->pl_cap < raw) {
                uint8_t *p = aamm__realloc(dec->pl, raw);
                if (p == NULL)
                    return fail(dec, AAMM_ENOMEM, "out of memory for a frame payload");
                dec->pl = p;
                dec->pl_cap = raw;
            }
            if (flags & AAMM_WIRE_F_LZ4) {
                int got = LZ4_decompress_safe_usingDict((const char *)src + 4, (char *)dec->pl,
                                                        (int)(plen - 4), (int)raw, dec->hist,
                                                        (int)dec->hist_len);
                if (got < 0 || (size_t)got != raw)
                    return fail(dec, AAMM_EMALFORMED,
                                "DATA frame at stream offset %" PRIu64
                                ": LZ4 payload does not decompress to %zu bytes",
                                dec->stream_off, raw);
            } else {
                memcpy(dec->pl, src, raw);
            }
            /* the history for the next frame: the last 64 KiB of all DATA payloads */
            if (raw >= LZ4_HISTORY) {
                memcpy(dec->hist, dec->pl + raw - LZ4_HISTORY, LZ4_HISTORY);
                dec->hist_len = LZ4_HISTORY;
            } else {
                size_t keep = dec->hist_len + raw > LZ4_HISTORY ? LZ4_HISTORY - raw : dec->hist_len;
                memmove(dec->hist, dec->hist + dec->hist_len - keep, keep);
                memcpy(dec->hist + keep, dec->pl, raw);
                dec->hist_len = keep + raw;
            }
            dec->pl_len = raw;
            dec->pl_pos = 0;
            dec->pl_version = h[4];
            dec->in_off += total;
            dec->stream_off += total;
        }
    }
}
