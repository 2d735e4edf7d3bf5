/*
 * wire_int.h: internals shared by the two layers of the wire codec (doc/protocol.md):
 * wire_frame.c, the frame layer (§1-3: header, length, CRC32C, LZ4 block with history, MAC
 * trailer, control payloads), and wire_txn.c, the transaction-record layer inside DATA
 * payloads (§5: BEGIN/COMMIT/RELATION/changes/MESSAGE, the relation dictionary, 'P' pieces).
 * As lz4frame.c sits on lz4.c: the record layer hands whole records to the frame layer and
 * takes decoded payloads from it; neither parses the other's bytes.
 */
#ifndef AAMM_WIRE_INT_H
#define AAMM_WIRE_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <lz4.h>

#include <aamm/wire.h>

#include "buf.h"
#include "internal.h"

/* ====================================================================================
 * Handles (fields grouped by the layer that owns them)
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
    aamm_wire_seal_cb seal;
    void *seal_arg;

    /* frame layer (wire_frame.c) */
    struct aamm__wr out; /* complete frames [rd, fstart) + open frame [fstart, len) */
    size_t rd;
    bool frame_open;
    size_t fstart;
    uint8_t *ztmp; /* LZ4 scratch */
    size_t ztmp_cap;
    LZ4_stream_t *lz; /* LZ4 stream over all DATA payloads (doc/protocol.md §1) */
    char *lzdict;     /* its dictionary: the last 64 KiB of those payloads */

    /* record layer (wire_txn.c) */
    struct aamm__wr rec;  /* scratch: the record being built (without its big values) */
    struct rec_seg *segs; /* big values of the record: referenced, not copied */
    uint32_t nsegs, segs_cap;
    bool streaming;    /* a split record is emitted one piece per call (set_streaming) */
    bool split_active; /* a split record is partly emitted (streaming) */
    size_t split_total, split_off;

    bool in_txn;
    uint64_t begin_commit_lsn;
    int64_t begin_commit_time;

    struct enc_rel *dict;
    uint32_t ndict;
    uint32_t evict_next;
    uint32_t last_id;
    uint64_t op;
};

enum { HAVE_NONE, HAVE_CHANGE };

struct aamm_wire_decoder {
    struct aamm__err err;
    int sticky;
    struct aamm_wire_options o;
    unsigned vmin, vmax;
    aamm_wire_verify_cb verify;
    void *verify_arg;

    /* frame layer (wire_frame.c) */
    uint8_t *in; /* buffered input: [in_off, in_len) */
    size_t in_off, in_len, in_cap, in_max;
    uint32_t max_now;    /* largest payload accepted now (<= o.max_payload) */
    uint64_t stream_off; /* stream offset of in[in_off], for messages */

    char *hist; /* the last 64 KiB of DATA payloads: the LZ4 dictionary of the next frame */
    size_t hist_len;
    uint8_t *pl; /* the current DATA payload, decompressed: records [pl_pos, pl_len) */
    size_t pl_cap, pl_len, pl_pos;
    uint8_t pl_version;

    /* record layer (wire_txn.c) */
    uint8_t *ra; /* record reassembly from 'P' pieces */
    size_t ra_len, ra_cap, ra_total;
    bool ra_active;

    struct aamm_relation **dict;
    uint32_t generation;

    bool in_txn;
    struct aamm_transaction txn;
    struct aamm_change change;
    int have;

    /* control payloads (wire_frame.c) */
    char cluster[AAMM_WIRE_MAX_CLUSTER + 1];
    char *message; /* heap */
    struct aamm_wire_position *positions;
};

/* ====================================================================================
 * Varints and strings (both layers)
 * ==================================================================================== */

static inline void wr_varint(struct aamm__wr *w, uint64_t v)
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

static inline void wr_zigzag(struct aamm__wr *w, int64_t v)
{
    /* (uint64_t)0 - sign: all ones for a negative @v, without shifting a signed value */
    wr_varint(w, ((uint64_t)v << 1) ^ ((uint64_t)0 - ((uint64_t)v >> 63)));
}

static inline void wr_str(struct aamm__wr *w, const char *s, size_t len)
{
    wr_varint(w, len);
    aamm__wr_bytes(w, s, len);
}

static inline uint64_t rd_varint(struct aamm__rd *r)
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

static inline int64_t rd_zigzag(struct aamm__rd *r)
{
    uint64_t u = rd_varint(r);
    return (int64_t)(u >> 1) ^ -(int64_t)(u & 1);
}

/* A str: length-prefixed bytes without NUL. Returns the bytes (not terminated) or NULL. */
static inline const char *rd_str(struct aamm__rd *r, size_t *len)
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

/* ====================================================================================
 * Between the layers
 * ==================================================================================== */

/* Frame layer, for the record layer. */
int aamm__wire_enc_nomem(struct aamm_wire_encoder *enc);
/* Start a frame at the end of the output (header filled in when it is closed). */
void aamm__wire_open_frame(struct aamm_wire_encoder *enc);
/* Close the open DATA frame, if any (LZ4, CRC, MAC): its bytes become pending. */
int aamm__wire_close_data(struct aamm_wire_encoder *enc);
/* Record a fatal decoder error (sticky) and return @code. */
int aamm__wire_fail(struct aamm_wire_decoder *dec, int code, const char *fmt, ...)
    AAMM_PRINTF(3, 4);

/* Record layer, for the frame layer. */
/* Free what the record layer holds in @enc / @dec (not the handles). */
void aamm__wire_encoder_txn_free(struct aamm_wire_encoder *enc);
void aamm__wire_decoder_txn_free(struct aamm_wire_decoder *dec);
/* Release the change of the previous event (a new event is about to be decoded). */
void aamm__wire_drop_change(struct aamm_wire_decoder *dec);
/* Decode the next record of the current DATA payload: 1 with an event, 0 without, or a
 * negative error. */
int aamm__wire_next_record(struct aamm_wire_decoder *dec, struct aamm_wire_event *ev);

#endif /* AAMM_WIRE_INT_H */
