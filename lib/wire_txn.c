/*
 * wire_txn.c: the transaction-record layer of the wire codec (doc/protocol.md §5): BEGIN,
 * COMMIT, RELATION (the per-connection relation dictionary), INSERT/UPDATE/DELETE,
 * TRUNCATE, MESSAGE, and 'P' pieces for records larger than a frame. Records go into and
 * come out of DATA payloads of the frame layer (wire_frame.c). Pure: no I/O, no clocks.
 */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "wire_int.h"

#define MAX_COLUMNS 1664u
#define PIECE_OVERHEAD 31u /* 'P' + three varints of at most 10 bytes */

static bool has_nul(const char *s, size_t n)
{
    return n > 0 && memchr(s, 0, n) != NULL;
}

/* ====================================================================================
 * Encoder
 * ==================================================================================== */

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

void aamm__wire_encoder_txn_free(struct aamm_wire_encoder *enc)
{
    for (uint32_t i = 0; i < enc->o.max_relations; i++)
        aamm_relation_clear(&enc->dict[i].rel);
    aamm__free(enc->dict);
    aamm__wr_free(&enc->rec);
    aamm__free(enc->segs);
}

bool aamm_wire_encoder_in_transaction(const struct aamm_wire_encoder *enc)
{
    return enc->in_txn;
}

/* Reference @n bytes at @p as the next part of the record (after what rec holds now). */
/* ---- records into frames ---------------------------------------------------------- */

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
        return aamm__wire_enc_nomem(enc);
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
            rc = aamm__wire_close_data(enc);
            if (rc != 0)
                return rc;
        }
        if (!enc->frame_open)
            aamm__wire_open_frame(enc);
        rec_put(enc, &enc->out, 0, r);
        return enc->out.ok ? 0 : aamm__wire_enc_nomem(enc);
    }
    /* 'P' pieces, each alone in a frame. */
    rc = aamm__wire_close_data(enc);
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
        aamm__wire_open_frame(enc);
        aamm__wr_u8(&enc->out, 'P');
        wr_varint(&enc->out, r);
        wr_varint(&enc->out, off);
        wr_varint(&enc->out, n);
        rec_put(enc, &enc->out, off, n);
        rc = aamm__wire_close_data(enc);
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
        return aamm__wire_enc_nomem(enc);
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
            return aamm__wire_enc_nomem(enc);
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

void aamm__wire_decoder_txn_free(struct aamm_wire_decoder *dec)
{
    for (uint32_t i = 0; i < dec->o.max_relations; i++) {
        if (dec->dict[i] != NULL) {
            aamm_relation_clear(dec->dict[i]);
            aamm__free(dec->dict[i]);
        }
    }
    aamm__free(dec->dict);
    aamm__free(dec->ra);
    aamm_transaction_clear(&dec->txn);
    aamm_change_clear(&dec->change);
}

void aamm__wire_drop_change(struct aamm_wire_decoder *dec)
{
    if (dec->have == HAVE_CHANGE)
        aamm_change_clear(&dec->change);
    dec->have = HAVE_NONE;
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
        return aamm__wire_fail(dec, AAMM_EMALFORMED, "RELATION record: bad dictionary id");
    rel = aamm__calloc(1, sizeof *rel);
    if (rel == NULL)
        return aamm__wire_fail(dec, AAMM_ENOMEM, "out of memory reading a relation");
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
            return aamm__wire_fail(dec, AAMM_ENOMEM, "out of memory reading a relation");
        return aamm__wire_fail(dec, AAMM_EMALFORMED, "RELATION record malformed (id %" PRIu64 ")",
                               id);
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
        return aamm__wire_fail(dec, AAMM_ENOMEM, "out of memory decoding a '%c' record", type);
    return aamm__wire_fail(dec, AAMM_EMALFORMED, "'%c' record malformed", type);
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
            return aamm__wire_fail(dec, AAMM_EMALFORMED, "BEGIN inside a transaction");
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
            return aamm__wire_fail(dec, AAMM_EMALFORMED, "COMMIT outside a transaction");
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
            return aamm__wire_fail(dec, AAMM_EMALFORMED, "'%c' record outside a transaction", type);
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
            return aamm__wire_fail(dec, AAMM_EMALFORMED, "'T' record outside a transaction");
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
            return aamm__wire_fail(dec, AAMM_EMALFORMED,
                                   "transactional message outside a transaction");
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
        return aamm__wire_fail(dec, AAMM_EMALFORMED, "unknown record type 0x%02x", (uint8_t)type);
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
        return aamm__wire_fail(dec, AAMM_EMALFORMED,
                               "piece record malformed or out of order (total %" PRIu64
                               ", offset %" PRIu64 ", length %" PRIu64 ")",
                               total, off, n);
    bytes = aamm__rd_bytes(r, (size_t)n);
    if (r->left != 0)
        return aamm__wire_fail(dec, AAMM_EMALFORMED, "piece record not alone in its frame");
    if (dec->ra_cap < off + n) {
        size_t cap = dec->ra_cap ? dec->ra_cap : 65536;
        uint8_t *p;
        while (cap < off + n)
            cap *= 2;
        if (cap > total)
            cap = (size_t)total;
        p = aamm__realloc(dec->ra, cap);
        if (p == NULL)
            return aamm__wire_fail(dec, AAMM_ENOMEM, "out of memory reassembling a record");
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
        return aamm__wire_fail(dec, AAMM_EMALFORMED, "piece record inside a piece");
    rc = read_record(dec, dec->ra, dec->ra_len, ev, &used);
    if (rc >= 0 && used != dec->ra_len)
        rc = aamm__wire_fail(dec, AAMM_EMALFORMED, "split record has %zu trailing bytes",
                             dec->ra_len - used);
    dec->ra_len = 0;
    if (dec->ra_cap > 4 * (size_t)dec->o.max_payload) {
        aamm__free(dec->ra);
        dec->ra = NULL;
        dec->ra_cap = 0;
    }
    return rc;
}

/* The next record of the current DATA payload. */
int aamm__wire_next_record(struct aamm_wire_decoder *dec, struct aamm_wire_event *ev)
{
    const uint8_t *p = dec->pl + dec->pl_pos;
    size_t left = dec->pl_len - dec->pl_pos;
    size_t used = 0;
    int rc;
    if (p[0] == 'P') {
        struct aamm__rd r;
        if (dec->pl_pos != 0)
            return aamm__wire_fail(dec, AAMM_EMALFORMED, "piece record not alone in its frame");
        aamm__rd_init(&r, p + 1, left - 1);
        rc = read_piece(dec, &r, ev);
        dec->pl_pos = dec->pl_len;
        return rc;
    }
    if (dec->ra_active)
        return aamm__wire_fail(dec, AAMM_EMALFORMED,
                               "'%c' record while a split record is incomplete", p[0]);
    rc = read_record(dec, p, left, ev, &used);
    if (rc >= 0)
        dec->pl_pos += used;
    return rc;
}
