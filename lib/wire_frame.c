/*
 * wire_frame.c: the frame layer of the wire codec (doc/protocol.md §1-3): encoder and
 * decoder handles, frame header, length, CRC32C, the LZ4 block with its 64 KiB history, the
 * MAC trailer, control payloads (HELLO .. GOODBYE). DATA payloads carry records, which
 * wire_txn.c builds and parses. Pure: no I/O, no clocks.
 */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "wire_int.h"

#define MAGIC0 0x41
#define MAGIC1 0x41
#define MAGIC2 0x4D
#define MAGIC3 0x57
#define MAX_ERRMSG 1024u
#define FLAGS_KNOWN (AAMM_WIRE_F_LZ4 | AAMM_WIRE_F_MAC)
#define LZ4_HISTORY 65536 /* LZ4's window: the dictionary carried from frame to frame */

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
 * Encoder
 * ==================================================================================== */

int aamm_wire_encoder_new(struct aamm_wire_encoder **encp, const struct aamm_wire_options *opts,
                          char *err, size_t errsize)
{
    struct aamm_wire_encoder *enc;
    struct aamm__err tmp;
    int rc;
    *encp = NULL;
    rc = fill_options(&(struct aamm_wire_options){0}, opts, &tmp);
    if (rc != 0)
        return aamm__newerr_copy(err, errsize, &tmp);
    enc = aamm__calloc(1, sizeof *enc);
    if (enc == NULL)
        return aamm__newerrf(err, errsize, AAMM_ENOMEM, "wire: out of memory");
    fill_options(&enc->o, opts, &enc->err);
    enc->dict = aamm__calloc(enc->o.max_relations, sizeof *enc->dict);
    if (enc->dict == NULL) {
        aamm__free(enc);
        return aamm__newerrf(err, errsize, AAMM_ENOMEM, "wire: out of memory");
    }
    if (enc->o.compress_min != UINT32_MAX) {
        enc->lz = aamm__malloc(sizeof *enc->lz);
        enc->lzdict = aamm__malloc(LZ4_HISTORY);
        if (enc->lz == NULL || enc->lzdict == NULL) {
            aamm__free(enc->lz);
            aamm__free(enc->lzdict);
            aamm__free(enc->dict);
            aamm__free(enc);
            return aamm__newerrf(err, errsize, AAMM_ENOMEM, "wire: out of memory");
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
    aamm__wire_encoder_txn_free(enc);
    aamm__wr_free(&enc->out);
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

int aamm__wire_enc_nomem(struct aamm_wire_encoder *enc)
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

void aamm__wire_open_frame(struct aamm_wire_encoder *enc)
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
        return aamm__wire_enc_nomem(enc);
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
        int rc = enc->seal(enc, enc->out.data + enc->fstart, AAMM_WIRE_HEADER_SIZE + plen, mac,
                           enc->seal_arg);
        if (rc != 0) {
            enc->out.len = enc->fstart;
            return aamm__errf(&enc->err, rc, "wire: sealing a frame failed: %s", aamm_strerror(rc));
        }
        aamm__wr_bytes(&enc->out, mac, sizeof mac);
        if (!enc->out.ok)
            return aamm__wire_enc_nomem(enc);
    }
    return 0;
}

/* Close the open DATA frame, compressing it when that makes it smaller. */
int aamm__wire_close_data(struct aamm_wire_encoder *enc)
{
    size_t plen;
    uint16_t flags = 0;
    if (!enc->frame_open)
        return 0;
    if (!enc->out.ok) {
        enc->frame_open = false;
        return aamm__wire_enc_nomem(enc);
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
                return aamm__wire_enc_nomem(enc);
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
    return aamm__wire_close_data(enc);
}

int aamm_wire_encoder_set_mac(struct aamm_wire_encoder *enc, aamm_wire_seal_cb fn, void *arg)
{
    int rc = aamm__wire_close_data(enc);
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

/* ---- control frames (write_<msg>) ------------------------------------------------- */

static int control_frame_begin(struct aamm_wire_encoder *enc)
{
    int rc = aamm__wire_close_data(enc);
    if (rc != 0)
        return rc;
    aamm__wire_open_frame(enc);
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

/* ====================================================================================
 * Decoder
 * ==================================================================================== */

int aamm_wire_decoder_new(struct aamm_wire_decoder **decp, const struct aamm_wire_options *opts,
                          char *err, size_t errsize)
{
    struct aamm_wire_decoder *dec;
    struct aamm__err tmp;
    int rc;
    *decp = NULL;
    rc = fill_options(&(struct aamm_wire_options){0}, opts, &tmp);
    if (rc != 0)
        return aamm__newerr_copy(err, errsize, &tmp);
    dec = aamm__calloc(1, sizeof *dec);
    if (dec == NULL)
        return aamm__newerrf(err, errsize, AAMM_ENOMEM, "wire: out of memory");
    fill_options(&dec->o, opts, &dec->err);
    dec->dict = aamm__calloc(dec->o.max_relations, sizeof *dec->dict);
    if (dec->dict == NULL) {
        aamm__free(dec);
        return aamm__newerrf(err, errsize, AAMM_ENOMEM, "wire: out of memory");
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
    aamm__wire_decoder_txn_free(dec);
    aamm__free(dec->in);
    aamm__free(dec->pl);
    aamm__free(dec->hist);
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

void aamm_wire_decoder_set_mac(struct aamm_wire_decoder *dec, aamm_wire_verify_cb fn, void *arg)
{
    dec->verify = fn;
    dec->verify_arg = arg;
}

/* Record a fatal error: every later call returns it. */
int aamm__wire_fail(struct aamm_wire_decoder *dec, int code, const char *fmt, ...)
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
            return aamm__wire_fail(dec, AAMM_ENOMEM, "out of memory buffering input");
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
            return aamm__wire_fail(
                dec, AAMM_EMALFORMED,
                "truncated frame at stream offset %" PRIu64
                ": end of input after %zu bytes of a frame whose header announces "
                "%" PRIu32 " payload bytes",
                dec->stream_off, have, plen);
        }
        return aamm__wire_fail(dec, AAMM_EMALFORMED,
                               "truncated frame at stream offset %" PRIu64
                               ": end of input after %zu of %d header bytes",
                               dec->stream_off, have, AAMM_WIRE_HEADER_SIZE);
    }
    if (dec->ra_active)
        return aamm__wire_fail(dec, AAMM_EMALFORMED,
                               "end of input inside a split record (%zu of %zu bytes)", dec->ra_len,
                               dec->ra_total);
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
        return aamm__wire_fail(dec, AAMM_EMALFORMED, "HELLO payload malformed");
    if (h->min_version < 1 || h->min_version > h->max_version ||
        (h->role != AAMM_WIRE_ROLE_SENDER && h->role != AAMM_WIRE_ROLE_RECEIVER) ||
        (h->flags & ~AAMM_WIRE_HELLO_TLS) != 0 || h->node_id == 0 || clen == 0 ||
        clen > AAMM_WIRE_MAX_CLUSTER)
        return aamm__wire_fail(
            dec, AAMM_EMALFORMED,
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
            return aamm__wire_fail(dec, AAMM_EMALFORMED, "AUTH payload of %zu bytes, expected %d",
                                   len, AAMM_WIRE_PROOF_SIZE);
        memcpy(ev->proof, p, AAMM_WIRE_PROOF_SIZE);
        ev->kind = AAMM_WIRE_EV_AUTH;
        return 0;
    case AAMM_WIRE_RESUME: {
        uint64_t n = rd_varint(&r);
        if (!r.ok || n > AAMM_WIRE_MAX_RESUME || r.left != n * 12)
            return aamm__wire_fail(dec, AAMM_EMALFORMED, "RESUME payload malformed");
        aamm__free(dec->positions);
        dec->positions = NULL;
        if (n > 0) {
            dec->positions = aamm__calloc((size_t)n, sizeof *dec->positions);
            if (dec->positions == NULL)
                return aamm__wire_fail(dec, AAMM_ENOMEM, "out of memory reading RESUME");
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
            return aamm__wire_fail(dec, AAMM_EMALFORMED, "ACK payload of %zu bytes, expected 12",
                                   len);
        ev->kind = AAMM_WIRE_EV_ACK;
        return 0;
    case AAMM_WIRE_HEARTBEAT:
        ev->wall_time_us = (int64_t)aamm__rd_le64(&r);
        if (!r.ok || r.left != 0)
            return aamm__wire_fail(dec, AAMM_EMALFORMED,
                                   "HEARTBEAT payload of %zu bytes, expected 8", len);
        ev->kind = AAMM_WIRE_EV_HEARTBEAT;
        return 0;
    case AAMM_WIRE_ERROR:
    case AAMM_WIRE_GOODBYE: {
        uint16_t code = aamm__rd_le16(&r);
        size_t mlen = 0;
        const char *m = rd_str(&r, &mlen);
        if (!r.ok || r.left != 0 || mlen > MAX_ERRMSG || (type == AAMM_WIRE_GOODBYE) != (code == 0))
            return aamm__wire_fail(dec, AAMM_EMALFORMED, "%s payload malformed",
                                   type == AAMM_WIRE_ERROR ? "ERROR" : "GOODBYE");
        aamm__free(dec->message);
        dec->message = aamm__strndup(m, mlen);
        if (dec->message == NULL)
            return aamm__wire_fail(dec, AAMM_ENOMEM, "out of memory reading ERROR");
        ev->code = -(int)code;
        ev->message = dec->message;
        ev->kind = type == AAMM_WIRE_ERROR ? AAMM_WIRE_EV_ERROR : AAMM_WIRE_EV_GOODBYE;
        return 0;
    }
    }
    return aamm__wire_fail(dec, AAMM_EINTERNAL, "unhandled frame type 0x%02x", type);
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
        return aamm__wire_fail(dec, AAMM_EMALFORMED,
                               "bad magic %02x %02x %02x %02x at stream offset %" PRIu64
                               " (not an aamm peer, or the stream is out of sync)",
                               h[0], h[1], h[2], h[3], at);
    if (h[4] < dec->vmin || h[4] > dec->vmax)
        return aamm__wire_fail(dec, AAMM_EMALFORMED,
                               "frame at stream offset %" PRIu64
                               " has protocol version %u, expected %u..%u",
                               at, h[4], dec->vmin, dec->vmax);
    if (type_name(h[5]) == NULL)
        return aamm__wire_fail(dec, AAMM_EMALFORMED,
                               "unknown frame type 0x%02x at stream offset %" PRIu64, h[5], at);
    if (flags & ~FLAGS_KNOWN)
        return aamm__wire_fail(dec, AAMM_EMALFORMED,
                               "%s frame at stream offset %" PRIu64
                               " has reserved flag bits 0x%04x set",
                               type_name(h[5]), at, (unsigned)(flags & ~FLAGS_KNOWN));
    if ((flags & AAMM_WIRE_F_LZ4) && h[5] != AAMM_WIRE_DATA)
        return aamm__wire_fail(dec, AAMM_EMALFORMED,
                               "compressed %s frame at stream offset %" PRIu64, type_name(h[5]),
                               at);
    if (((flags & AAMM_WIRE_F_MAC) != 0) != (dec->verify != NULL))
        return aamm__wire_fail(dec, dec->verify ? AAMM_EAUTH : AAMM_EMALFORMED,
                               "%s frame at stream offset %" PRIu64 " %s a MAC", type_name(h[5]),
                               at, dec->verify ? "lacks" : "unexpectedly carries");
    if (plen > dec->max_now)
        return aamm__wire_fail(dec, AAMM_ETOOBIG,
                               "%s frame at stream offset %" PRIu64 " announces %" PRIu32
                               " payload bytes, above the limit of %" PRIu32,
                               type_name(h[5]), at, plen, dec->max_now);
    if (h[5] == AAMM_WIRE_DATA && plen == 0)
        return aamm__wire_fail(dec, AAMM_EMALFORMED, "empty DATA frame at stream offset %" PRIu64,
                               at);
    *flagsp = flags;
    *plenp = plen;
    return 0;
}

int aamm_wire_decoder_next(struct aamm_wire_decoder *dec, struct aamm_wire_event *ev)
{
    memset(ev, 0, sizeof *ev);
    if (dec->sticky)
        return dec->sticky;
    aamm__wire_drop_change(dec);
    for (;;) {
        const uint8_t *h;
        size_t have, total;
        uint16_t flags = 0;
        uint32_t plen = 0, crc, want;
        int rc;
        if (dec->pl_pos < dec->pl_len) {
            ev->frame_version = dec->pl_version;
            rc = aamm__wire_next_record(dec, ev);
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
            return aamm__wire_fail(dec, AAMM_EMALFORMED,
                                   "%s frame at stream offset %" PRIu64
                                   ": CRC32C mismatch (computed %08x, frame says %08x)",
                                   type_name(h[5]), dec->stream_off, crc, want);
        if (dec->verify != NULL) {
            rc = dec->verify(dec, h, AAMM_WIRE_HEADER_SIZE + plen,
                             h + AAMM_WIRE_HEADER_SIZE + plen, dec->verify_arg);
            if (rc != 0)
                return aamm__wire_fail(
                    dec, rc == AAMM_ENOMEM ? rc : AAMM_EAUTH,
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
                    return aamm__wire_fail(dec, AAMM_EMALFORMED, "compressed DATA frame too short");
                raw = (size_t)src[0] | ((size_t)src[1] << 8) | ((size_t)src[2] << 16) |
                      ((size_t)src[3] << 24);
                if (raw == 0 || raw > dec->max_now)
                    return aamm__wire_fail(
                        dec, raw ? AAMM_ETOOBIG : AAMM_EMALFORMED,
                        "compressed DATA frame announces %zu raw bytes (limit %" PRIu32 ")", raw,
                        dec->max_now);
            }
            if (dec->hist == NULL) { /* first DATA frame: the LZ4 history */
                dec->hist = aamm__malloc(LZ4_HISTORY);
                if (dec->hist == NULL)
                    return aamm__wire_fail(dec, AAMM_ENOMEM, "out of memory for the LZ4 history");
            }
            if (dec->pl_cap < raw) {
                uint8_t *p = aamm__realloc(dec->pl, raw);
                if (p == NULL)
                    return aamm__wire_fail(dec, AAMM_ENOMEM, "out of memory for a frame payload");
                dec->pl = p;
                dec->pl_cap = raw;
            }
            if (flags & AAMM_WIRE_F_LZ4) {
                int got = LZ4_decompress_safe_usingDict((const char *)src + 4, (char *)dec->pl,
                                                        (int)(plen - 4), (int)raw, dec->hist,
                                                        (int)dec->hist_len);
                if (got < 0 || (size_t)got != raw)
                    return aamm__wire_fail(dec, AAMM_EMALFORMED,
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
