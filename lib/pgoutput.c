/* pgoutput.c: parser for pgoutput protocol version 1 messages, with its relation cache. */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "buf.h"
#include "pgoutput.h"

/*
 * Byte layouts (PostgreSQL 15, "Logical Replication Message Formats", proto_version 1;
 * all integers big-endian, String = bytes up to a NUL):
 *
 *   B  Int64 final LSN, Int64 commit time (µs since 2000-01-01), Int32 xid
 *   C  Int8 flags (0), Int64 commit LSN, Int64 end LSN, Int64 commit time
 *   O  Int64 origin commit LSN, String origin name
 *   R  Int32 oid, String namespace ("" = pg_catalog), String name, Int8 replica identity,
 *      Int16 ncolumns, then per column: Int8 flags (1 = key), String name, Int32 type
 *      oid, Int32 typmod
 *   Y  Int32 type oid, String namespace ("" = pg_catalog), String name
 *   I  Int32 rel oid, 'N', TupleData
 *   U  Int32 rel oid, optionally ('K' | 'O') TupleData, then 'N', TupleData
 *   D  Int32 rel oid, ('K' | 'O'), TupleData
 *   T  Int32 nrelations, Int8 flags (1 CASCADE, 2 RESTART IDENTITY), nrelations x Int32 oid
 *   M  Int8 flags (1 = transactional), Int64 LSN, String prefix, Int32 length, bytes
 *   TupleData: Int16 ncolumns, then per column a kind byte: 'n' (null), 'u' (unchanged
 *      TOAST), 't' (Int32 length + text bytes), 'b' (Int32 length + binary bytes)
 *
 * The xid fields that protocol version 2 adds to R/Y/I/U/D/T/M exist only inside streamed
 * transactions; streaming is never requested, so they never appear here.
 */

/* ====================================================================================
 * Relation cache: open addressing with linear probing, keyed by OID. Each relation is
 * its own allocation, so the address handed out for an OID never changes; a new 'R'
 * replaces the contents (names, columns) in place.
 * ==================================================================================== */

struct aamm__pgo {
    struct aamm_relation **slots; /* cap entries; NULL = empty */
    size_t cap;                   /* 0 or a power of two, kept at least twice count */
    size_t count;
};

static size_t slot_index(const struct aamm__pgo *p, uint32_t oid)
{
    size_t mask = p->cap - 1;
    size_t i = (size_t)(oid * UINT32_C(2654435761)) & mask;
    while (p->slots[i] != NULL && p->slots[i]->oid != oid)
        i = (i + 1) & mask;
    return i;
}

static struct aamm_relation *cache_find(const struct aamm__pgo *p, uint32_t oid)
{
    if (p == NULL || p->cap == 0)
        return NULL;
    return p->slots[slot_index(p, oid)];
}

/* Make room for one more entry. */
static int cache_reserve(struct aamm__pgo *p)
{
    struct aamm__pgo grown;
    if ((p->count + 1) * 2 <= p->cap)
        return AAMM_OK;
    grown.cap = p->cap ? p->cap * 2 : 16;
    if (grown.cap > SIZE_MAX / sizeof *grown.slots)
        return AAMM_ENOMEM;
    grown.slots = aamm__calloc(grown.cap, sizeof *grown.slots);
    if (grown.slots == NULL)
        return AAMM_ENOMEM;
    grown.count = p->count;
    for (size_t i = 0; i < p->cap; i++)
        if (p->slots[i] != NULL)
            grown.slots[slot_index(&grown, p->slots[i]->oid)] = p->slots[i];
    aamm__free(p->slots);
    *p = grown;
    return AAMM_OK;
}

int aamm__pgo_new(struct aamm__pgo **out)
{
    *out = aamm__calloc(1, sizeof **out);
    return *out ? AAMM_OK : AAMM_ENOMEM;
}

void aamm__pgo_free(struct aamm__pgo *p)
{
    if (p == NULL)
        return;
    for (size_t i = 0; i < p->cap; i++) {
        if (p->slots[i] != NULL) {
            aamm_relation_clear(p->slots[i]);
            aamm__free(p->slots[i]);
        }
    }
    aamm__free(p->slots);
    aamm__free(p);
}

const struct aamm_relation *aamm__pgo_relation(const struct aamm__pgo *p, uint32_t oid)
{
    return cache_find(p, oid);
}

int aamm__pgo_set_type_name(struct aamm__pgo *p, uint32_t rel_oid, uint32_t column,
                            const char *type_name)
{
    struct aamm_relation *rel = cache_find(p, rel_oid);
    char *copy;
    if (rel == NULL || column >= rel->ncolumns)
        return AAMM_ENOTFOUND;
    copy = aamm__strdup(type_name);
    if (copy == NULL)
        return AAMM_ENOMEM;
    aamm__free(rel->columns[column].type_name);
    rel->columns[column].type_name = copy;
    return AAMM_OK;
}

void aamm__pgo_event_clear(struct aamm__pgo_event *ev)
{
    if (ev == NULL)
        return;
    aamm_transaction_clear(&ev->txn);
    aamm_change_clear(&ev->change);
    aamm__free(ev->type_schema);
    aamm__free(ev->type_name);
    memset(ev, 0, sizeof *ev);
}

/* ====================================================================================
 * Parsing helpers
 * ==================================================================================== */

/* One message being parsed. */
struct ctx {
    struct aamm__rd rd; /* over the bytes after the type byte */
    uint8_t type;
    size_t len; /* whole message, type byte included */
    struct aamm__err *err;
};

static int fail(struct ctx *c, int code, const char *fmt, ...) AAMM_PRINTF(3, 4);
static int fail(struct ctx *c, int code, const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return aamm__errf(c->err, code, "pgoutput: '%c' message: %s", (char)c->type, what);
}

#define MALFORMED(c, ...) fail((c), AAMM_EMALFORMED, __VA_ARGS__)

static int truncated(struct ctx *c)
{
    return MALFORMED(c, "truncated (%zu bytes)", c->len);
}

static int nomem(struct ctx *c)
{
    return fail(c, AAMM_ENOMEM, "out of memory");
}

/* The message must end exactly here. */
static int expect_end(struct ctx *c)
{
    if (!c->rd.ok)
        return truncated(c);
    if (c->rd.left != 0)
        return MALFORMED(c, "%zu bytes of trailing garbage after %zu bytes", c->rd.left,
                         c->len - c->rd.left);
    return AAMM_OK;
}

/* A String field: NUL-terminated text inside the message. */
static const char *read_str(struct ctx *c, size_t *len)
{
    *len = 0;
    return aamm__rd_cstr(&c->rd, len);
}

/* PostgreSQL timestamps count from 2000-01-01; ours from 1970-01-01. */
static int convert_time(struct ctx *c, uint64_t raw, int64_t *out)
{
    int64_t pg = (int64_t)raw;
    if (pg > INT64_MAX - AAMM_PG_EPOCH_OFFSET_US)
        return MALFORMED(c, "timestamp %lld out of range", (long long)pg);
    *out = pg + AAMM_PG_EPOCH_OFFSET_US;
    return AAMM_OK;
}

static char *dup_namespace(const char *s, size_t len)
{
    /* The protocol sends "" for pg_catalog. */
    return len == 0 ? aamm__strdup("pg_catalog") : aamm__strndup(s, len);
}

static int find_relation(struct ctx *c, const struct aamm__pgo *p, uint32_t oid,
                         const struct aamm_relation **out)
{
    *out = cache_find(p, oid);
    if (*out == NULL)
        return MALFORMED(c, "unknown relation OID %u (no 'R' message for it)", oid);
    return AAMM_OK;
}

/* TupleData for @rel into @t (zeroed; partially filled on error, clear it). */
static int read_tuple(struct ctx *c, const struct aamm_relation *rel, const char *which,
                      struct aamm_tuple *t)
{
    uint16_t n = aamm__rd_be16(&c->rd);
    if (!c->rd.ok)
        return truncated(c);
    if (n != rel->ncolumns)
        return MALFORMED(c, "%s tuple has %u columns, relation %s.%s has %u", which, n, rel->schema,
                         rel->name, rel->ncolumns);
    /* Every column takes at least its kind byte: check before allocating. */
    if (n > c->rd.left)
        return truncated(c);
    if (n == 0)
        return AAMM_OK;
    t->values = aamm__calloc(n, sizeof *t->values);
    if (t->values == NULL)
        return nomem(c);
    t->nvalues = n;
    for (uint32_t i = 0; i < n; i++) {
        struct aamm_value *v = &t->values[i];
        uint8_t kind = aamm__rd_u8(&c->rd);
        uint32_t vlen;
        const uint8_t *bytes;
        if (!c->rd.ok)
            return truncated(c);
        switch (kind) {
        case 'n':
            v->kind = AAMM_VALUE_NULL;
            break;
        case 'u':
            v->kind = AAMM_VALUE_UNCHANGED;
            break;
        case 't':
            vlen = aamm__rd_be32(&c->rd);
            if (!c->rd.ok)
                return truncated(c);
            if (vlen > c->rd.left)
                return MALFORMED(c, "%s tuple: column %s claims %u bytes, only %zu left", which,
                                 rel->columns[i].name, vlen, c->rd.left);
            bytes = aamm__rd_bytes(&c->rd, vlen);
            if (vlen > 0 && memchr(bytes, 0, vlen) != NULL)
                return MALFORMED(c, "%s tuple: column %s: text value contains a NUL byte", which,
                                 rel->columns[i].name);
            v->data = aamm__malloc((size_t)vlen + 1);
            if (v->data == NULL)
                return nomem(c);
            if (vlen > 0)
                memcpy(v->data, bytes, vlen);
            v->data[vlen] = '\0';
            v->len = vlen;
            v->kind = AAMM_VALUE_TEXT;
            break;
        case 'b':
            return MALFORMED(c, "%s tuple: column %s: binary values not requested", which,
                             rel->columns[i].name);
        default:
            return MALFORMED(c, "%s tuple: column %s: unknown value kind 0x%02x", which,
                             rel->columns[i].name, kind);
        }
    }
    return AAMM_OK;
}

/* ====================================================================================
 * Messages
 * ==================================================================================== */

/* B: final LSN, commit time, xid. */
static int parse_begin(struct ctx *c, struct aamm__pgo_event *ev)
{
    uint64_t final_lsn = aamm__rd_be64(&c->rd);
    uint64_t ts = aamm__rd_be64(&c->rd);
    uint32_t xid = aamm__rd_be32(&c->rd);
    int rc = expect_end(c);
    if (rc == AAMM_OK)
        rc = convert_time(c, ts, &ev->txn.commit_time);
    if (rc != AAMM_OK)
        return rc;
    ev->type = AAMM__PGO_BEGIN;
    ev->txn.commit_lsn = final_lsn;
    ev->txn.end_lsn = AAMM_LSN_INVALID;
    ev->txn.xid = xid;
    return AAMM_OK;
}

/* C: flags, commit LSN, end LSN, commit time. */
static int parse_commit(struct ctx *c, struct aamm__pgo_event *ev)
{
    uint8_t flags = aamm__rd_u8(&c->rd);
    uint64_t commit_lsn = aamm__rd_be64(&c->rd);
    uint64_t end_lsn = aamm__rd_be64(&c->rd);
    uint64_t ts = aamm__rd_be64(&c->rd);
    int rc = expect_end(c);
    if (rc != AAMM_OK)
        return rc;
    /* PostgreSQL's own reader rejects any flag: none is defined. */
    if (flags != 0)
        return MALFORMED(c, "unknown flags 0x%02x", flags);
    rc = convert_time(c, ts, &ev->txn.commit_time);
    if (rc != AAMM_OK)
        return rc;
    ev->type = AAMM__PGO_COMMIT;
    ev->flags = flags;
    ev->txn.commit_lsn = commit_lsn;
    ev->txn.end_lsn = end_lsn;
    return AAMM_OK;
}

/* O: origin LSN, origin name. */
static int parse_origin(struct ctx *c, struct aamm__pgo_event *ev)
{
    uint64_t lsn = aamm__rd_be64(&c->rd);
    size_t nlen;
    const char *name = read_str(c, &nlen);
    int rc = expect_end(c);
    if (rc != AAMM_OK)
        return rc;
    ev->txn.origin_name = aamm__strndup(name, nlen);
    if (ev->txn.origin_name == NULL)
        return nomem(c);
    ev->type = AAMM__PGO_ORIGIN;
    ev->txn.origin_lsn = lsn;
    return AAMM_OK;
}

/* Y: type OID, namespace, name. */
static int parse_type(struct ctx *c, struct aamm__pgo_event *ev)
{
    uint32_t oid = aamm__rd_be32(&c->rd);
    size_t slen, nlen;
    const char *schema = read_str(c, &slen);
    const char *name = read_str(c, &nlen);
    int rc = expect_end(c);
    if (rc != AAMM_OK)
        return rc;
    ev->type_schema = dup_namespace(schema, slen);
    ev->type_name = aamm__strndup(name, nlen);
    if (ev->type_schema == NULL || ev->type_name == NULL)
        return nomem(c);
    ev->type = AAMM__PGO_TYPE;
    ev->type_oid = oid;
    return AAMM_OK;
}

/* R: parse the whole definition first, then replace or add the cache entry. */
static int parse_relation(struct ctx *c, struct aamm__pgo *p, struct aamm__pgo_event *ev)
{
    struct aamm_relation rel, *slot;
    size_t slen, nlen;
    const char *schema, *name;
    uint8_t ident;
    uint16_t ncols;
    int rc;

    memset(&rel, 0, sizeof rel);
    rel.oid = aamm__rd_be32(&c->rd);
    schema = read_str(c, &slen);
    name = read_str(c, &nlen);
    ident = aamm__rd_u8(&c->rd);
    ncols = aamm__rd_be16(&c->rd);
    if (!c->rd.ok)
        return truncated(c);
    if (nlen == 0)
        return MALFORMED(c, "relation %u has an empty name", rel.oid);
    if (ident != AAMM_REPLIDENT_DEFAULT && ident != AAMM_REPLIDENT_NOTHING &&
        ident != AAMM_REPLIDENT_FULL && ident != AAMM_REPLIDENT_INDEX)
        return MALFORMED(c, "relation %u: unknown replica identity 0x%02x", rel.oid, ident);
    if (ncols > INT16_MAX)
        return MALFORMED(c, "relation %u: negative column count %d", rel.oid, (int)(int16_t)ncols);
    /* Each column takes at least 10 bytes (flags, "" name, type, typmod). */
    if ((size_t)ncols * 10 > c->rd.left)
        return truncated(c);
    rel.replica_identity = (char)ident;

    rel.schema = dup_namespace(schema, slen);
    rel.name = aamm__strndup(name, nlen);
    if (rel.schema == NULL || rel.name == NULL)
        goto oom;
    if (ncols > 0) {
        rel.columns = aamm__calloc(ncols, sizeof *rel.columns);
        if (rel.columns == NULL)
            goto oom;
    }
    rel.ncolumns = ncols;
    for (uint32_t i = 0; i < ncols; i++) {
        struct aamm_column *col = &rel.columns[i];
        uint8_t flags = aamm__rd_u8(&c->rd);
        const char *cname = read_str(c, &nlen);
        col->type_oid = aamm__rd_be32(&c->rd);
        col->type_mod = (int32_t)aamm__rd_be32(&c->rd);
        if (!c->rd.ok) {
            rc = truncated(c);
            goto out;
        }
        if (flags & ~1u) {
            rc = MALFORMED(c, "relation %u: column %u has unknown flags 0x%02x", rel.oid, i, flags);
            goto out;
        }
        if (nlen == 0) {
            rc = MALFORMED(c, "relation %u: column %u has an empty name", rel.oid, i);
            goto out;
        }
        col->flags = (flags & 1u) ? AAMM_COLUMN_KEY : 0;
        col->name = aamm__strndup(cname, nlen);
        if (col->name == NULL)
            goto oom;
    }
    rc = expect_end(c);
    if (rc != AAMM_OK)
        goto out;

    slot = cache_find(p, rel.oid);
    if (slot != NULL) {
        /* Same address, new contents: pointers into the old definition die here. */
        rel.generation = slot->generation + 1;
        aamm_relation_clear(slot);
        *slot = rel;
    } else {
        rc = cache_reserve(p);
        if (rc == AAMM_OK) {
            slot = aamm__malloc(sizeof *slot);
            if (slot == NULL)
                rc = AAMM_ENOMEM;
        }
        if (rc != AAMM_OK)
            goto oom;
        rel.generation = 1;
        *slot = rel;
        p->slots[slot_index(p, rel.oid)] = slot;
        p->count++;
    }
    ev->type = AAMM__PGO_RELATION;
    ev->relation = slot;
    return AAMM_OK;
oom:
    rc = nomem(c);
out:
    aamm_relation_clear(&rel);
    return rc;
}

/* I, U, D start alike: relation OID (a relation already sent), then a one-byte tag. */
static int change_head(struct ctx *c, struct aamm__pgo *p, struct aamm_change *ch, uint8_t *tag)
{
    uint32_t oid = aamm__rd_be32(&c->rd);
    int rc;
    if (!c->rd.ok)
        return truncated(c);
    rc = find_relation(c, p, oid, &ch->relation);
    if (rc != AAMM_OK)
        return rc;
    *tag = aamm__rd_u8(&c->rd);
    if (!c->rd.ok)
        return truncated(c);
    return AAMM_OK;
}

/* ... and end alike: after the last tuple (read with result @rc) the message is done. */
static int change_end(struct ctx *c, struct aamm__pgo_event *ev, int rc)
{
    if (rc == AAMM_OK)
        rc = expect_end(c);
    if (rc == AAMM_OK)
        ev->type = AAMM__PGO_CHANGE;
    return rc;
}
/* I: relation OID, 'N', new tuple. */
static int parse_insert(struct ctx *c, struct aamm__pgo *p, struct aamm__pgo_event *ev)
{
    struct aamm_change *ch = &ev->change;
    uint8_t tag;
    int rc = change_head(c, p, ch, &tag);
    if (rc != AAMM_OK)
        return rc;
    if (tag != 'N')
        return MALFORMED(c, "expected 'N' (new tuple), got 0x%02x", tag);
    ch->kind = AAMM_CHANGE_INSERT;
    rc = read_tuple(c, ch->relation, "new", &ch->new_tuple);
    return change_end(c, ev, rc);
}

/* U: relation OID, optional 'K'/'O' old tuple, 'N', new tuple. */
static int parse_update(struct ctx *c, struct aamm__pgo *p, struct aamm__pgo_event *ev)
{
    struct aamm_change *ch = &ev->change;
    uint8_t tag;
    int rc = change_head(c, p, ch, &tag);
    if (rc != AAMM_OK)
        return rc;
    ch->kind = AAMM_CHANGE_UPDATE;
    if (tag == 'K' || tag == 'O') {
        ch->old_kind = (char)tag;
        rc = read_tuple(c, ch->relation, tag == 'K' ? "old key" : "old", &ch->old_tuple);
        if (rc != AAMM_OK)
            return rc;
        tag = aamm__rd_u8(&c->rd);
        if (!c->rd.ok)
            return truncated(c);
    }
    if (tag != 'N')
        return MALFORMED(c, "expected 'N' (new tuple), got 0x%02x", tag);
    rc = read_tuple(c, ch->relation, "new", &ch->new_tuple);
    return change_end(c, ev, rc);
}

/* D: relation OID, 'K' or 'O', old tuple. */
static int parse_delete(struct ctx *c, struct aamm__pgo *p, struct aamm__pgo_event *ev)
{
    struct aamm_change *ch = &ev->change;
    uint8_t tag;
    int rc = change_head(c, p, ch, &tag);
    if (rc != AAMM_OK)
        return rc;
    if (tag != 'K' && tag != 'O')
        return MALFORMED(c, "expected 'K' or 'O' (old tuple), got 0x%02x", tag);
    ch->kind = AAMM_CHANGE_DELETE;
    ch->old_kind = (char)tag;
    rc = read_tuple(c, ch->relation, tag == 'K' ? "old key" : "old", &ch->old_tuple);
    return change_end(c, ev, rc);
}

/* T: number of relations, flags, relation OIDs. */
static int parse_truncate(struct ctx *c, struct aamm__pgo *p, struct aamm__pgo_event *ev)
{
    struct aamm_change *ch = &ev->change;
    const struct aamm_relation **rels;
    uint32_t n = aamm__rd_be32(&c->rd);
    uint8_t flags = aamm__rd_u8(&c->rd);
    int rc;
    if (!c->rd.ok)
        return truncated(c);
    if (flags & ~(AAMM_TRUNCATE_CASCADE | AAMM_TRUNCATE_RESTART_IDENTITY))
        return MALFORMED(c, "unknown flags 0x%02x", flags);
    if (n == 0)
        return MALFORMED(c, "no relations");
    /* Check the claimed count against the bytes before allocating for it. */
    if (n > c->rd.left / 4)
        return MALFORMED(c, "%u relations claimed, only %zu bytes left", n, c->rd.left);
    rels = aamm__calloc(n, sizeof *rels);
    if (rels == NULL)
        return nomem(c);
    ch->kind = AAMM_CHANGE_TRUNCATE;
    ch->relations = rels;
    ch->nrelations = n;
    ch->truncate_flags = flags;
    for (uint32_t i = 0; i < n; i++) {
        rc = find_relation(c, p, aamm__rd_be32(&c->rd), &rels[i]);
        if (rc != AAMM_OK)
            return rc;
    }
    rc = expect_end(c);
    if (rc == AAMM_OK)
        ev->type = AAMM__PGO_CHANGE;
    return rc;
}

/* M: flags, LSN, prefix, content length, content. */
static int parse_message(struct ctx *c, uint64_t wal_lsn, struct aamm__pgo_event *ev)
{
    struct aamm_change *ch = &ev->change;
    uint8_t flags = aamm__rd_u8(&c->rd);
    uint64_t lsn = aamm__rd_be64(&c->rd);
    size_t plen;
    const char *prefix = read_str(c, &plen);
    uint32_t clen = aamm__rd_be32(&c->rd);
    const uint8_t *content;
    int rc;
    if (!c->rd.ok)
        return truncated(c);
    if (flags & ~1u)
        return MALFORMED(c, "unknown flags 0x%02x", flags);
    if (clen > c->rd.left)
        return MALFORMED(c, "content length %u, only %zu bytes left", clen, c->rd.left);
    content = aamm__rd_bytes(&c->rd, clen);
    rc = expect_end(c);
    if (rc != AAMM_OK)
        return rc;
    ch->kind = AAMM_CHANGE_MESSAGE;
    ch->transactional = (flags & 1u) != 0;
    /* The record's own LSN; the XLogData position only if the server left it unset. */
    ch->message_lsn = lsn != AAMM_LSN_INVALID ? lsn : wal_lsn;
    ch->prefix = aamm__strndup(prefix, plen);
    ch->content = aamm__malloc((size_t)clen + 1);
    if (ch->prefix == NULL || ch->content == NULL)
        return nomem(c);
    if (clen > 0)
        memcpy(ch->content, content, clen);
    ch->content[clen] = '\0';
    ch->content_len = clen;
    ev->type = AAMM__PGO_CHANGE;
    return AAMM_OK;
}

/* ====================================================================================
 * Entry point
 * ==================================================================================== */

int aamm__pgo_parse(struct aamm__pgo *p, const uint8_t *data, size_t len, uint64_t wal_lsn,
                    struct aamm__pgo_event *ev, struct aamm__err *err)
{
    struct ctx c;
    int rc;

    memset(ev, 0, sizeof *ev);
    if (len == 0)
        return aamm__errf(err, AAMM_EMALFORMED, "pgoutput: empty message");
    c.type = data[0];
    c.len = len;
    c.err = err;
    aamm__rd_init(&c.rd, data + 1, len - 1);

    switch (c.type) {
    case 'B':
        rc = parse_begin(&c, ev);
        break;
    case 'C':
        rc = parse_commit(&c, ev);
        break;
    case 'O':
        rc = parse_origin(&c, ev);
        break;
    case 'R':
        rc = parse_relation(&c, p, ev);
        break;
    case 'Y':
        rc = parse_type(&c, ev);
        break;
    case 'I':
        rc = parse_insert(&c, p, ev);
        break;
    case 'U':
        rc = parse_update(&c, p, ev);
        break;
    case 'D':
        rc = parse_delete(&c, p, ev);
        break;
    case 'T':
        rc = parse_truncate(&c, p, ev);
        break;
    case 'M':
        rc = parse_message(&c, wal_lsn, ev);
        break;
    case 'S': /* stream start, stop, commit, abort: proto_version >= 2 with streaming */
    case 'E':
    case 'c':
    case 'A':
        rc = aamm__errf(err, AAMM_EMALFORMED,
                        "pgoutput: streaming message '%c' is unsupported (streaming was not "
                        "requested)",
                        (char)c.type);
        break;
    case 'b': /* two-phase: begin prepare, prepare, commit/rollback prepared, stream prepare */
    case 'P':
    case 'K':
    case 'r':
    case 'p':
        rc = aamm__errf(err, AAMM_EMALFORMED,
                        "pgoutput: two-phase message '%c' is unsupported (two_phase was not "
                        "requested)",
                        (char)c.type);
        break;
    default:
        rc = aamm__errf(err, AAMM_EMALFORMED, "pgoutput: unknown message type 0x%02x", c.type);
        break;
    }
    if (rc != AAMM_OK)
        aamm__pgo_event_clear(ev);
    return rc;
}
