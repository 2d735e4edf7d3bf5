/*
 * consensus_fsm.c: the replicated state machine: membership, galloc sequences, the global
 * DDL lock, watermarks and the per-origin deduplication window. Pure: no clock, no I/O;
 * business outcomes go into the result, apply never fails except out of memory.
 */
#include <stdlib.h>
#include <string.h>

#include "consensus_int.h"

/* ---- command codec ------------------------------------------------------------------- */

/*
 * raft 0.15's libuv backend needs entry (and snapshot) buffers whose length is a multiple of
 * 8: it pads on one side of the wire/disk format and not on the other, so a batch of
 * several unaligned entries decodes shifted (verified: the second entry of a catch-up
 * AppendEntries arrived 3 bytes off, and a restarted node could not load its segment). Debian
 * compiles out the assert that would say so. We pad with zeros and accept them on decode.
 */
static void wr_pad8(struct aamm__wr *w)
{
    while (w->ok && w->len % 8 != 0)
        aamm__wr_u8(w, 0);
}

/* True when what is left is at most 7 zero bytes of padding. */
static bool rd_only_padding(const struct aamm__rd *r)
{
    size_t i;
    if (!r->ok || r->left > 7)
        return false;
    for (i = 0; i < r->left; i++)
        if (r->p[i] != 0)
            return false;
    return true;
}

static void wr_str(struct aamm__wr *w, const char *s, size_t len)
{
    aamm__wr_le16(w, (uint16_t)len);
    aamm__wr_bytes(w, s, len);
}

static const char *rd_str(struct aamm__rd *r, size_t *len)
{
    *len = aamm__rd_le16(r);
    return (const char *)aamm__rd_bytes(r, *len);
}

void aamm__cs_cmd_encode(struct aamm__wr *w, const struct aamm__cs_cmd *c)
{
    aamm__wr_u8(w, AAMM__CS_CMD_VERSION);
    aamm__wr_u8(w, c->type);
    aamm__wr_le64(w, c->origin);
    aamm__wr_le64(w, c->incarnation);
    aamm__wr_le64(w, c->reqno);
    aamm__wr_le64(w, (uint64_t)c->stamp_us);
    switch (c->type) {
    case AAMM__CS_MEMBER_PUT:
        aamm__wr_le64(w, c->id);
        wr_str(w, c->name, c->name_len);
        wr_str(w, c->link, c->link_len);
        wr_str(w, c->raft, c->raft_len);
        break;
    case AAMM__CS_MEMBER_DEL:
        aamm__wr_le64(w, c->id);
        break;
    case AAMM__CS_GALLOC:
        wr_str(w, c->name, c->name_len);
        aamm__wr_le64(w, c->count);
        aamm__wr_le64(w, (uint64_t)c->min_start);
        break;
    case AAMM__CS_DDL_ACQUIRE:
        aamm__wr_le32(w, c->lease_ms);
        aamm__wr_le64(w, c->holder_inc);
        break;
    case AAMM__CS_DDL_RELEASE:
        aamm__wr_le64(w, c->count);
        aamm__wr_le64(w, c->holder_inc);
        break;
    case AAMM__CS_WATERMARK:
        aamm__wr_le64(w, c->id);
        aamm__wr_le64(w, c->count);
        break;
    default:
        break;
    }
    wr_pad8(w);
}

int aamm__cs_cmd_decode(const void *data, size_t len, struct aamm__cs_cmd *c)
{
    struct aamm__rd r;
    uint8_t version;
    memset(c, 0, sizeof(*c));
    aamm__rd_init(&r, data, len);
    version = aamm__rd_u8(&r);
    if (version != AAMM__CS_CMD_VERSION && version != AAMM__CS_CMD_VERSION_1)
        return AAMM_EMALFORMED;
    c->type = aamm__rd_u8(&r);
    c->origin = aamm__rd_le64(&r);
    c->incarnation = aamm__rd_le64(&r);
    c->reqno = aamm__rd_le64(&r);
    c->stamp_us = (int64_t)aamm__rd_le64(&r);
    switch (c->type) {
    case AAMM__CS_NOOP:
        break;
    case AAMM__CS_MEMBER_PUT:
        c->id = aamm__rd_le64(&r);
        c->name = rd_str(&r, &c->name_len);
        c->link = rd_str(&r, &c->link_len);
        c->raft = rd_str(&r, &c->raft_len);
        break;
    case AAMM__CS_MEMBER_DEL:
        c->id = aamm__rd_le64(&r);
        break;
    case AAMM__CS_GALLOC:
        c->name = rd_str(&r, &c->name_len);
        c->count = aamm__rd_le64(&r);
        c->min_start = (int64_t)aamm__rd_le64(&r);
        break;
    case AAMM__CS_DDL_ACQUIRE:
        c->lease_ms = aamm__rd_le32(&r);
        if (version >= 2)
            c->holder_inc = aamm__rd_le64(&r);
        break;
    case AAMM__CS_DDL_RELEASE:
        c->count = aamm__rd_le64(&r);
        if (version >= 2)
            c->holder_inc = aamm__rd_le64(&r);
        break;
    case AAMM__CS_WATERMARK:
        c->id = aamm__rd_le64(&r);
        c->count = aamm__rd_le64(&r);
        break;
    default:
        return AAMM_EMALFORMED;
    }
    if (!rd_only_padding(&r))
        return AAMM_EMALFORMED;
    return 0;
}

void aamm__cs_cmd_stamp(void *data, size_t len, int64_t stamp_us)
{
    uint8_t *p = (uint8_t *)data + AAMM__CS_STAMP_OFFSET;
    uint64_t v = (uint64_t)stamp_us;
    int i;
    if (len < AAMM__CS_HDR_SIZE)
        return;
    for (i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* ---- state lookups --------------------------------------------------------------------- */

static size_t member_pos(const struct aamm__cs_state *st, uint64_t id, bool *found)
{
    size_t lo = 0, hi = st->n_members;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (st->members[mid].id < id)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = lo < st->n_members && st->members[lo].id == id;
    return lo;
}

static int name_cmp(const char *a, const char *b, size_t blen)
{
    size_t alen = strlen(a);
    int c = memcmp(a, b, alen < blen ? alen : blen);
    if (c != 0)
        return c;
    return alen < blen ? -1 : alen > blen ? 1 : 0;
}

static size_t seq_pos(const struct aamm__cs_state *st, const char *name, size_t len, bool *found)
{
    size_t lo = 0, hi = st->n_seqs;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (name_cmp(st->seqs[mid].name, name, len) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = lo < st->n_seqs && name_cmp(st->seqs[lo].name, name, len) == 0;
    return lo;
}

static size_t wm_pos(const struct aamm__cs_state *st, uint64_t reporter, uint64_t origin,
                     bool *found)
{
    size_t lo = 0, hi = st->n_wms;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        const struct aamm__cs_wm *w = &st->wms[mid];
        if (w->reporter < reporter || (w->reporter == reporter && w->origin < origin))
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = lo < st->n_wms && st->wms[lo].reporter == reporter && st->wms[lo].origin == origin;
    return lo;
}

static size_t dedup_pos(const struct aamm__cs_state *st, uint64_t origin, bool *found)
{
    size_t lo = 0, hi = st->n_dedups;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (st->dedups[mid].origin < origin)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = lo < st->n_dedups && st->dedups[lo].origin == origin;
    return lo;
}

/* Make room for one element at @pos of a sorted array. */
static bool array_insert(void **arr, size_t *n, size_t elem, size_t pos)
{
    uint8_t *p = aamm__realloc(*arr, (*n + 1) * elem);
    if (p == NULL)
        return false;
    memmove(p + (pos + 1) * elem, p + pos * elem, (*n - pos) * elem);
    memset(p + pos * elem, 0, elem);
    *arr = p;
    (*n)++;
    return true;
}

static void array_remove(void *arr, size_t *n, size_t elem, size_t pos)
{
    uint8_t *p = arr;
    memmove(p + pos * elem, p + (pos + 1) * elem, (*n - pos - 1) * elem);
    (*n)--;
}

const struct aamm__cs_member *aamm__cs_state_member(const struct aamm__cs_state *st, uint64_t id)
{
    bool found;
    size_t pos = member_pos(st, id, &found);
    return found ? &st->members[pos] : NULL;
}

const struct aamm__cs_seq *aamm__cs_state_seq(const struct aamm__cs_state *st, const char *name,
                                              size_t len)
{
    bool found;
    size_t pos = seq_pos(st, name, len, &found);
    return found ? &st->seqs[pos] : NULL;
}

uint64_t aamm__cs_state_watermark(const struct aamm__cs_state *st, uint64_t origin)
{
    uint64_t min = UINT64_MAX;
    size_t i;
    bool any = false;
    for (i = 0; i < st->n_members; i++) {
        bool found;
        size_t pos;
        if (st->members[i].id == origin)
            continue;
        pos = wm_pos(st, st->members[i].id, origin, &found);
        if (!found)
            return 0;
        any = true;
        if (st->wms[pos].value < min)
            min = st->wms[pos].value;
    }
    return any ? min : 0;
}

/* ---- apply ----------------------------------------------------------------------------- */

static void member_free(struct aamm__cs_member *m)
{
    aamm__free(m->name);
    aamm__free(m->link);
    aamm__free(m->raft);
}

static int apply_member_put(struct aamm__cs_state *st, const struct aamm__cs_cmd *c,
                            struct aamm__cs_result *res)
{
    bool found;
    size_t pos;
    char *name, *link, *raft;
    struct aamm__cs_member *m;
    if (c->id == 0 || c->name_len > AAMM_CONSENSUS_NAME_MAX ||
        c->link_len > AAMM_CONSENSUS_NAME_MAX || c->raft_len > AAMM_CONSENSUS_NAME_MAX) {
        res->status = AAMM_EMALFORMED;
        return 0;
    }
    name = aamm__strndup(c->name, c->name_len);
    link = aamm__strndup(c->link, c->link_len);
    raft = aamm__strndup(c->raft, c->raft_len);
    pos = member_pos(st, c->id, &found);
    if (name == NULL || link == NULL || raft == NULL ||
        (!found && !array_insert((void **)&st->members, &st->n_members, sizeof(*m), pos))) {
        aamm__free(name);
        aamm__free(link);
        aamm__free(raft);
        return AAMM_ENOMEM;
    }
    m = &st->members[pos];
    member_free(m);
    m->id = c->id;
    m->name = name;
    m->link = link;
    m->raft = raft;
    return 0;
}

static int apply_member_del(struct aamm__cs_state *st, const struct aamm__cs_cmd *c,
                            struct aamm__cs_result *res)
{
    bool found;
    size_t pos = member_pos(st, c->id, &found), i;
    if (!found) {
        res->status = AAMM_ENOTFOUND;
        return 0;
    }
    member_free(&st->members[pos]);
    array_remove(st->members, &st->n_members, sizeof(st->members[0]), pos);
    /* Its reports and the reports about it no longer count. */
    for (i = 0; i < st->n_wms;) {
        if (st->wms[i].reporter == c->id || st->wms[i].origin == c->id)
            array_remove(st->wms, &st->n_wms, sizeof(st->wms[0]), i);
        else
            i++;
    }
    return 0;
}

static int apply_galloc(struct aamm__cs_state *st, const struct aamm__cs_cmd *c,
                        struct aamm__cs_result *res)
{
    bool found;
    size_t pos;
    int64_t start;
    struct aamm__cs_seq *s;
    if (c->name_len == 0 || c->name_len > AAMM_CONSENSUS_NAME_MAX || c->count == 0 ||
        c->count > (UINT64_C(1) << 31)) {
        res->status = AAMM_EMALFORMED;
        return 0;
    }
    pos = seq_pos(st, c->name, c->name_len, &found);
    start = found ? st->seqs[pos].next : 1;
    if (c->min_start > start)
        start = c->min_start;
    if (start > INT64_MAX - (int64_t)c->count) {
        res->status = AAMM_EEXHAUSTED;
        return 0;
    }
    if (!found) {
        char *name = aamm__strndup(c->name, c->name_len);
        if (name == NULL ||
            !array_insert((void **)&st->seqs, &st->n_seqs, sizeof(st->seqs[0]), pos)) {
            aamm__free(name);
            return AAMM_ENOMEM;
        }
        st->seqs[pos].name = name;
    }
    s = &st->seqs[pos];
    s->next = start + (int64_t)c->count;
    s->ranges++;
    res->start = start;
    res->end = s->next;
    return 0;
}

static int apply_ddl(struct aamm__cs_state *st, const struct aamm__cs_cmd *c, uint64_t index,
                     struct aamm__cs_result *res)
{
    struct aamm_consensus_ddl_lock *l = &st->ddl;
    int64_t now = st->clock_us;
    /* A lease belongs to one incarnation of its node (a process), not to the node id: a
     * restarted process must not renew the dead one's lease and inherit its token. */
    bool mine = l->holder != 0 && l->holder == c->origin && l->holder_incarnation == c->holder_inc;
    bool live = l->holder != 0 && now < l->expires_us;
    if (c->type == AAMM__CS_DDL_ACQUIRE) {
        if (c->lease_ms == 0 || c->lease_ms > 3600000) {
            res->status = AAMM_EMALFORMED;
        } else if (live && !mine) {
            res->status = AAMM_EBUSY;
        } else {
            if (!(live && mine))
                l->token = index > l->token ? index : l->token + 1; /* a new grant */
            l->holder = c->origin;
            l->holder_incarnation = c->holder_inc;
            l->granted_us = now;
            l->expires_us = now + (int64_t)c->lease_ms * 1000;
        }
    } else {
        if (!mine || l->token != c->count) {
            res->status = AAMM_ESTATE;
        } else {
            l->holder = 0;
            l->holder_incarnation = 0;
            l->expires_us = now;
        }
    }
    res->lock = *l;
    return 0;
}

static int apply_watermark(struct aamm__cs_state *st, const struct aamm__cs_cmd *c)
{
    bool found;
    size_t pos = wm_pos(st, c->origin, c->id, &found);
    if (!found) {
        if (!array_insert((void **)&st->wms, &st->n_wms, sizeof(st->wms[0]), pos))
            return AAMM_ENOMEM;
        st->wms[pos].reporter = c->origin;
        st->wms[pos].origin = c->id;
    }
    if (c->count > st->wms[pos].value)
        st->wms[pos].value = c->count;
    return 0;
}

/* Find (origin, incarnation, reqno) in the window: the stored result, or NULL. */
static const struct aamm__cs_result *dedup_find(const struct aamm__cs_state *st,
                                                const struct aamm__cs_cmd *c)
{
    bool found;
    size_t pos = dedup_pos(st, c->origin, &found);
    const struct aamm__cs_dedup *d;
    unsigned i;
    if (!found)
        return NULL;
    d = &st->dedups[pos];
    if (d->incarnation != c->incarnation)
        return NULL;
    for (i = 0; i < d->n; i++)
        if (d->reqno[i] == c->reqno)
            return &d->result[i];
    return NULL;
}

/* Remember the result; evicts the lowest request number when the window is full (an origin
 * never has more than AAMM__CS_DEDUP_WINDOW requests unresolved, so a retry always finds
 * its entry). A new incarnation of the origin replaces the old window. */
static int dedup_store(struct aamm__cs_state *st, const struct aamm__cs_cmd *c,
                       const struct aamm__cs_result *res)
{
    bool found;
    size_t pos = dedup_pos(st, c->origin, &found);
    struct aamm__cs_dedup *d;
    unsigned i, at;
    if (!found) {
        if (!array_insert((void **)&st->dedups, &st->n_dedups, sizeof(st->dedups[0]), pos))
            return AAMM_ENOMEM;
        st->dedups[pos].origin = c->origin;
        st->dedups[pos].incarnation = c->incarnation;
    }
    d = &st->dedups[pos];
    if (d->incarnation != c->incarnation) {
        d->incarnation = c->incarnation;
        d->n = 0;
    }
    if (d->n == AAMM__CS_DEDUP_WINDOW) {
        if (c->reqno < d->reqno[0])
            return 0; /* older than everything remembered: nothing to keep */
        memmove(&d->reqno[0], &d->reqno[1], (d->n - 1) * sizeof(d->reqno[0]));
        memmove(&d->result[0], &d->result[1], (d->n - 1) * sizeof(d->result[0]));
        d->n--;
    }
    for (at = d->n; at > 0 && d->reqno[at - 1] > c->reqno; at--)
        ;
    for (i = d->n; i > at; i--) {
        d->reqno[i] = d->reqno[i - 1];
        d->result[i] = d->result[i - 1];
    }
    d->reqno[at] = c->reqno;
    d->result[at] = *res;
    d->n++;
    return 0;
}

int aamm__cs_state_apply(struct aamm__cs_state *st, uint64_t index, const void *data, size_t len,
                         struct aamm__cs_result *out)
{
    struct aamm__cs_cmd c;
    const struct aamm__cs_result *seen;
    int rc = 0;
    memset(out, 0, sizeof(*out));
    out->index = index;
    if (aamm__cs_cmd_decode(data, len, &c) != 0) {
        out->status = AAMM_EMALFORMED;
        return 0;
    }
    out->type = c.type;
    if (c.reqno != 0 && (seen = dedup_find(st, &c)) != NULL) {
        *out = *seen; /* a retry of a request already applied: same answer */
        return 0;
    }
    /* Time only moves forward, whatever the leaders' clocks say. */
    if (c.stamp_us > st->clock_us)
        st->clock_us = c.stamp_us;
    switch (c.type) {
    case AAMM__CS_NOOP:
        break;
    case AAMM__CS_MEMBER_PUT:
        rc = apply_member_put(st, &c, out);
        break;
    case AAMM__CS_MEMBER_DEL:
        rc = apply_member_del(st, &c, out);
        break;
    case AAMM__CS_GALLOC:
        rc = apply_galloc(st, &c, out);
        break;
    case AAMM__CS_DDL_ACQUIRE:
    case AAMM__CS_DDL_RELEASE:
        rc = apply_ddl(st, &c, index, out);
        break;
    case AAMM__CS_WATERMARK:
        rc = apply_watermark(st, &c);
        break;
    default:
        out->status = AAMM_EMALFORMED;
        break;
    }
    if (rc != 0)
        return rc;
    st->applied++;
    if (c.reqno != 0)
        return dedup_store(st, &c, out);
    return 0;
}

void aamm__cs_state_clear(struct aamm__cs_state *st)
{
    size_t i;
    for (i = 0; i < st->n_members; i++)
        member_free(&st->members[i]);
    for (i = 0; i < st->n_seqs; i++)
        aamm__free(st->seqs[i].name);
    aamm__free(st->members);
    aamm__free(st->seqs);
    aamm__free(st->wms);
    aamm__free(st->dedups);
    memset(st, 0, sizeof(*st));
}

/* ---- snapshot encoding ------------------------------------------------------------------ */

/* Snapshot versions: "ACS1" had no holder incarnation (in the lock and in remembered
 * results); "ACS2" adds it after each lock's expires_us. We write ACS2 and read both. */
#define STATE_MAGIC_1 UINT32_C(0x41435331) /* "ACS1" */
#define STATE_MAGIC UINT32_C(0x41435332)   /* "ACS2" */

void aamm__cs_result_encode(struct aamm__wr *w, const struct aamm__cs_result *r)
{
    aamm__wr_u8(w, r->type);
    aamm__wr_le32(w, (uint32_t)r->status);
    aamm__wr_le64(w, r->index);
    aamm__wr_le64(w, (uint64_t)r->start);
    aamm__wr_le64(w, (uint64_t)r->end);
    aamm__wr_le64(w, r->lock.holder);
    aamm__wr_le64(w, r->lock.token);
    aamm__wr_le64(w, (uint64_t)r->lock.granted_us);
    aamm__wr_le64(w, (uint64_t)r->lock.expires_us);
    aamm__wr_le64(w, r->lock.holder_incarnation);
}

static void result_decode(struct aamm__rd *r, struct aamm__cs_result *o, bool v1)
{
    o->type = aamm__rd_u8(r);
    o->status = (int32_t)aamm__rd_le32(r);
    o->index = aamm__rd_le64(r);
    o->start = (int64_t)aamm__rd_le64(r);
    o->end = (int64_t)aamm__rd_le64(r);
    o->lock.holder = aamm__rd_le64(r);
    o->lock.token = aamm__rd_le64(r);
    o->lock.granted_us = (int64_t)aamm__rd_le64(r);
    o->lock.expires_us = (int64_t)aamm__rd_le64(r);
    o->lock.holder_incarnation = v1 ? 0 : aamm__rd_le64(r);
}

void aamm__cs_result_decode(struct aamm__rd *r, struct aamm__cs_result *o)
{
    result_decode(r, o, false);
}

void aamm__cs_state_encode(const struct aamm__cs_state *st, struct aamm__wr *w)
{
    size_t i;
    unsigned j;
    aamm__wr_le32(w, STATE_MAGIC);
    aamm__wr_le64(w, (uint64_t)st->clock_us);
    aamm__wr_le64(w, st->applied);
    aamm__wr_le32(w, (uint32_t)st->n_members);
    for (i = 0; i < st->n_members; i++) {
        const struct aamm__cs_member *m = &st->members[i];
        aamm__wr_le64(w, m->id);
        wr_str(w, m->name, strlen(m->name));
        wr_str(w, m->link, strlen(m->link));
        wr_str(w, m->raft, strlen(m->raft));
    }
    aamm__wr_le32(w, (uint32_t)st->n_seqs);
    for (i = 0; i < st->n_seqs; i++) {
        wr_str(w, st->seqs[i].name, strlen(st->seqs[i].name));
        aamm__wr_le64(w, (uint64_t)st->seqs[i].next);
        aamm__wr_le64(w, st->seqs[i].ranges);
    }
    aamm__wr_le64(w, st->ddl.holder);
    aamm__wr_le64(w, st->ddl.token);
    aamm__wr_le64(w, (uint64_t)st->ddl.granted_us);
    aamm__wr_le64(w, (uint64_t)st->ddl.expires_us);
    aamm__wr_le64(w, st->ddl.holder_incarnation);
    aamm__wr_le32(w, (uint32_t)st->n_wms);
    for (i = 0; i < st->n_wms; i++) {
        aamm__wr_le64(w, st->wms[i].reporter);
        aamm__wr_le64(w, st->wms[i].origin);
        aamm__wr_le64(w, st->wms[i].value);
    }
    aamm__wr_le32(w, (uint32_t)st->n_dedups);
    for (i = 0; i < st->n_dedups; i++) {
        const struct aamm__cs_dedup *d = &st->dedups[i];
        aamm__wr_le64(w, d->origin);
        aamm__wr_le64(w, d->incarnation);
        aamm__wr_le32(w, d->n);
        for (j = 0; j < d->n; j++) {
            aamm__wr_le64(w, d->reqno[j]);
            aamm__cs_result_encode(w, &d->result[j]);
        }
    }
    wr_pad8(w);
}

static char *rd_dup(struct aamm__rd *r, bool *nomem)
{
    size_t len;
    const char *s = rd_str(r, &len);
    char *d;
    if (s == NULL)
        return NULL;
    d = aamm__strndup(s, len);
    if (d == NULL)
        *nomem = true;
    return d;
}

int aamm__cs_state_decode(struct aamm__cs_state *out, const void *data, size_t len)
{
    struct aamm__cs_state st;
    struct aamm__rd r;
    bool nomem = false, v1;
    uint32_t n, i, j, magic;
    memset(&st, 0, sizeof(st));
    aamm__rd_init(&r, data, len);
    magic = aamm__rd_le32(&r);
    if (magic != STATE_MAGIC && magic != STATE_MAGIC_1)
        return AAMM_EMALFORMED;
    v1 = magic == STATE_MAGIC_1;
    st.clock_us = (int64_t)aamm__rd_le64(&r);
    st.applied = aamm__rd_le64(&r);
    n = aamm__rd_le32(&r);
    if (r.ok && n > r.left / 14)
        goto malformed;
    if (n > 0 && (st.members = aamm__calloc(n, sizeof(*st.members))) == NULL)
        goto nomem;
    for (i = 0; i < n && r.ok && !nomem; i++) {
        struct aamm__cs_member *m = &st.members[i];
        st.n_members++;
        m->id = aamm__rd_le64(&r);
        m->name = rd_dup(&r, &nomem);
        m->link = rd_dup(&r, &nomem);
        m->raft = rd_dup(&r, &nomem);
    }
    if (nomem)
        goto nomem;
    n = aamm__rd_le32(&r);
    if (r.ok && n > r.left / 18)
        goto malformed;
    if (n > 0 && (st.seqs = aamm__calloc(n, sizeof(*st.seqs))) == NULL)
        goto nomem;
    for (i = 0; i < n && r.ok && !nomem; i++) {
        st.n_seqs++;
        st.seqs[i].name = rd_dup(&r, &nomem);
        st.seqs[i].next = (int64_t)aamm__rd_le64(&r);
        st.seqs[i].ranges = aamm__rd_le64(&r);
    }
    if (nomem)
        goto nomem;
    st.ddl.holder = aamm__rd_le64(&r);
    st.ddl.token = aamm__rd_le64(&r);
    st.ddl.granted_us = (int64_t)aamm__rd_le64(&r);
    st.ddl.expires_us = (int64_t)aamm__rd_le64(&r);
    st.ddl.holder_incarnation = v1 ? 0 : aamm__rd_le64(&r);
    n = aamm__rd_le32(&r);
    if (r.ok && n > r.left / 24)
        goto malformed;
    if (n > 0 && (st.wms = aamm__calloc(n, sizeof(*st.wms))) == NULL)
        goto nomem;
    for (i = 0; i < n && r.ok; i++) {
        st.n_wms++;
        st.wms[i].reporter = aamm__rd_le64(&r);
        st.wms[i].origin = aamm__rd_le64(&r);
        st.wms[i].value = aamm__rd_le64(&r);
    }
    n = aamm__rd_le32(&r);
    if (r.ok && n > r.left / 20)
        goto malformed;
    if (n > 0 && (st.dedups = aamm__calloc(n, sizeof(*st.dedups))) == NULL)
        goto nomem;
    for (i = 0; i < n && r.ok; i++) {
        struct aamm__cs_dedup *d = &st.dedups[i];
        st.n_dedups++;
        d->origin = aamm__rd_le64(&r);
        d->incarnation = aamm__rd_le64(&r);
        d->n = aamm__rd_le32(&r);
        if (d->n > AAMM__CS_DEDUP_WINDOW)
            goto malformed;
        for (j = 0; j < d->n && r.ok; j++) {
            d->reqno[j] = aamm__rd_le64(&r);
            result_decode(&r, &d->result[j], v1);
        }
    }
    if (!rd_only_padding(&r))
        goto malformed;
    for (i = 0; i < st.n_members; i++)
        if (st.members[i].name == NULL || st.members[i].link == NULL || st.members[i].raft == NULL)
            goto malformed;
    for (i = 0; i < st.n_seqs; i++)
        if (st.seqs[i].name == NULL)
            goto malformed;
    aamm__cs_state_clear(out);
    *out = st;
    return 0;
malformed:
    aamm__cs_state_clear(&st);
    return AAMM_EMALFORMED;
nomem:
    aamm__cs_state_clear(&st);
    return AAMM_ENOMEM;
}

uint64_t aamm__cs_state_hash(const struct aamm__cs_state *st)
{
    struct aamm__wr w;
    uint64_t h = UINT64_C(14695981039346656037);
    size_t i;
    aamm__wr_init(&w);
    aamm__cs_state_encode(st, &w);
    if (!w.ok) {
        aamm__wr_free(&w);
        return 0;
    }
    for (i = 0; i < w.len; i++) {
        h ^= w.data[i];
        h *= UINT64_C(1099511628211);
    }
    aamm__wr_free(&w);
    return h;
}

/* ---- raft_fsm glue ------------------------------------------------------------------------ */

static int fsm_apply(struct raft_fsm *fsm, const struct raft_buffer *buf, void **result)
{
    struct aamm__cs_fsm *f = fsm->data;
    /* raft advances last_applied after apply returns: this entry is the next one. */
    uint64_t index = f->raft != NULL ? raft_last_applied(f->raft) + 1 : 0;
    int rc = aamm__cs_state_apply(&f->st, index, buf->base, buf->len, &f->last);
    if (rc != 0)
        return RAFT_NOMEM; /* not applied; raft retries on the next commit */
    *result = &f->last;
    return 0;
}

static int fsm_snapshot(struct raft_fsm *fsm, struct raft_buffer *bufs[], unsigned *n_bufs)
{
    struct aamm__cs_fsm *f = fsm->data;
    struct aamm__wr w;
    struct raft_buffer *b;
    aamm__wr_init(&w);
    aamm__cs_state_encode(&f->st, &w);
    if (!w.ok) {
        aamm__wr_free(&w);
        return RAFT_NOMEM;
    }
    /* raft frees both the array and the base with raft_free. */
    b = raft_malloc(sizeof(*b));
    if (b == NULL) {
        aamm__wr_free(&w);
        return RAFT_NOMEM;
    }
    b->base = raft_malloc(w.len);
    if (b->base == NULL) {
        raft_free(b);
        aamm__wr_free(&w);
        return RAFT_NOMEM;
    }
    memcpy(b->base, w.data, w.len);
    b->len = w.len;
    aamm__wr_free(&w);
    *bufs = b;
    *n_bufs = 1;
    return 0;
}

static int fsm_restore(struct raft_fsm *fsm, struct raft_buffer *buf)
{
    struct aamm__cs_fsm *f = fsm->data;
    int rc = aamm__cs_state_decode(&f->st, buf->base, buf->len);
    if (rc == AAMM_ENOMEM)
        return RAFT_NOMEM;
    if (rc != 0)
        return RAFT_CORRUPT;
    raft_free(buf->base); /* restore owns it on success */
    return 0;
}

int aamm__cs_fsm_init(struct aamm__cs_fsm *f, struct raft *raft)
{
    memset(f, 0, sizeof(*f));
    f->fsm.version = 1;
    f->fsm.data = f;
    f->fsm.apply = fsm_apply;
    f->fsm.snapshot = fsm_snapshot;
    f->fsm.restore = fsm_restore;
    f->raft = raft;
    return 0;
}

void aamm__cs_fsm_close(struct aamm__cs_fsm *f)
{
    aamm__cs_state_clear(&f->st);
}
