/* wiregen.c: random relations, changes and transactions for wire and link tests. */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"
#include "wiregen.h"

static void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (p == NULL)
        abort();
    return p;
}

static char *xstrdup(const char *s)
{
    char *d = strdup(s);
    if (d == NULL)
        abort();
    return d;
}

static uint32_t rnd(uint64_t *seed, uint32_t n)
{
    return n ? (uint32_t)(aamm_test_rand(seed) % n) : 0;
}

static char *rand_name(uint64_t *seed, const char *base)
{
    char buf[64];
    snprintf(buf, sizeof buf, "%s_%u", base, rnd(seed, 100000));
    return xstrdup(buf);
}

static const char *types[] = {
    "integer",       "text",          "bigint", "character varying(20)", "timestamp with time zone",
    "numeric(10,2)", "public.mytype", "bytea"};

void wg_pool_init(struct wg_pool *pool, uint64_t *seed, uint32_t n)
{
    static const char rid[] = {'d', 'n', 'f', 'i'};
    pool->n = n;
    pool->rels = xcalloc(n, sizeof *pool->rels);
    for (uint32_t i = 0; i < n; i++) {
        struct aamm_relation *r = &pool->rels[i];
        char nm[64];
        r->schema = rnd(seed, 3) ? xstrdup("public") : rand_name(seed, "s");
        snprintf(nm, sizeof nm, "t%u_%u", i, rnd(seed, 1000));
        r->name = xstrdup(nm);
        r->replica_identity = rid[rnd(seed, 4)];
        r->ncolumns = 1 + rnd(seed, rnd(seed, 8) == 0 ? 60 : 8);
        r->columns = xcalloc(r->ncolumns, sizeof *r->columns);
        for (uint32_t c = 0; c < r->ncolumns; c++) {
            struct aamm_column *col = &r->columns[c];
            snprintf(nm, sizeof nm, "c%u", c);
            col->name = xstrdup(nm);
            col->type_name = rnd(seed, 10) ? xstrdup(types[rnd(seed, 8)]) : NULL;
            col->type_mod = rnd(seed, 3) ? -1 : (int32_t)rnd(seed, 100000);
            col->flags = c == 0 || rnd(seed, 5) == 0 ? AAMM_COLUMN_KEY : 0;
        }
        r->generation = 1;
    }
}

void wg_pool_free(struct wg_pool *pool)
{
    for (uint32_t i = 0; i < pool->n; i++) {
        struct aamm_relation *r = &pool->rels[i];
        for (uint32_t c = 0; c < r->ncolumns; c++) {
            free(r->columns[c].name);
            free(r->columns[c].type_name);
        }
        free(r->columns);
        free(r->schema);
        free(r->name);
    }
    free(pool->rels);
    memset(pool, 0, sizeof *pool);
}

static char *rand_text(uint64_t *seed, uint32_t len, bool compressible)
{
    char *s = malloc((size_t)len + 1);
    static const char alpha[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "
                                "-_.,;:!?'\"{}[]()\\/\n\t\xc3\xa9";
    if (s == NULL)
        abort();
    if (compressible) {
        for (uint32_t i = 0; i < len; i++)
            s[i] = (i / 16) % 3 == 0 ? ' ' : alpha[(i * 7 + len) % 26];
    } else {
        uint32_t i = 0;
        while (i < len) {
            uint64_t r = aamm_test_rand(seed);
            for (int k = 0; k < 8 && i < len; k++, i++)
                s[i] = alpha[((r >> (k * 8)) & 0xFF) % (sizeof alpha - 1)];
        }
    }
    s[len] = '\0';
    return s;
}

static void rand_tuple(struct aamm_tuple *t, uint64_t *seed, const struct aamm_relation *rel,
                       const struct wg_shape *shape, bool allow_unchanged, uint32_t *big)
{
    t->nvalues = rel->ncolumns;
    t->values = xcalloc(t->nvalues, sizeof *t->values);
    for (uint32_t i = 0; i < t->nvalues; i++) {
        struct aamm_value *v = &t->values[i];
        uint32_t k = rnd(seed, 10);
        if (k == 0) {
            v->kind = AAMM_VALUE_NULL;
        } else if (k == 1 && allow_unchanged) {
            v->kind = AAMM_VALUE_UNCHANGED;
        } else {
            uint32_t len = rnd(seed, 4) == 0 ? 0 : rnd(seed, shape->max_value + 1);
            if (*big) {
                len = *big;
                *big = 0;
            }
            v->kind = AAMM_VALUE_TEXT;
            v->len = len;
            v->data = rand_text(seed, len, shape->compressible);
        }
    }
}

void wg_txn_random(struct wg_txn *t, uint64_t *seed, const struct wg_pool *pool,
                   const struct wg_shape *shape, uint32_t origin, uint64_t lsn)
{
    uint32_t big = shape->big_value;
    memset(t, 0, sizeof *t);
    t->txn.origin_node = origin;
    t->txn.xid = (uint32_t)aamm_test_rand(seed);
    t->txn.commit_lsn = lsn;
    t->txn.end_lsn = lsn + 40;
    t->txn.commit_time = 1700000000000000 + (int64_t)rnd(seed, 1000000000);
    if (rnd(seed, 8) == 0) {
        t->txn.origin_name = xstrdup("aamm_from_7");
        t->txn.origin_lsn = aamm_test_rand(seed);
    }
    t->nchanges = 1 + rnd(seed, shape->max_changes);
    t->changes = xcalloc(t->nchanges, sizeof *t->changes);
    for (uint32_t i = 0; i < t->nchanges; i++) {
        struct aamm_change *c = &t->changes[i];
        const struct aamm_relation *rel = &pool->rels[rnd(seed, pool->n)];
        uint32_t k = rnd(seed, 20);
        if (big)
            k = 0;
        if (k < 8) {
            c->kind = AAMM_CHANGE_INSERT;
            c->relation = rel;
            rand_tuple(&c->new_tuple, seed, rel, shape, false, &big);
        } else if (k < 14) {
            static const char ok[] = {AAMM_OLD_NONE, AAMM_OLD_KEY, AAMM_OLD_FULL};
            c->kind = AAMM_CHANGE_UPDATE;
            c->relation = rel;
            c->old_kind = ok[rnd(seed, 3)];
            if (c->old_kind)
                rand_tuple(&c->old_tuple, seed, rel, shape, false, &big);
            rand_tuple(&c->new_tuple, seed, rel, shape, true, &big);
        } else if (k < 18) {
            c->kind = AAMM_CHANGE_DELETE;
            c->relation = rel;
            c->old_kind = rnd(seed, 2) ? AAMM_OLD_KEY : AAMM_OLD_FULL;
            rand_tuple(&c->old_tuple, seed, rel, shape, false, &big);
        } else if (k == 18) {
            uint32_t n = 1 + rnd(seed, pool->n < 4 ? pool->n : 4);
            c->kind = AAMM_CHANGE_TRUNCATE;
            c->nrelations = n;
            c->relations = xcalloc(n, sizeof *c->relations);
            for (uint32_t j = 0; j < n; j++)
                c->relations[j] = &pool->rels[rnd(seed, pool->n)];
            c->truncate_flags = rnd(seed, 4);
        } else {
            uint32_t len = rnd(seed, shape->max_value + 1);
            c->kind = AAMM_CHANGE_MESSAGE;
            c->transactional = true;
            c->message_lsn = lsn - 1 - rnd(seed, 1000);
            c->prefix = xstrdup(rnd(seed, 2) ? "aamm_ddl" : "");
            c->content = malloc((size_t)len + 1);
            if (c->content == NULL)
                abort();
            aamm_test_random_bytes(seed, c->content, len); /* may hold NULs */
            c->content[len] = '\0';
            c->content_len = len;
        }
    }
}

static void tuple_free(struct aamm_tuple *t)
{
    for (uint32_t i = 0; i < t->nvalues; i++)
        free(t->values[i].data);
    free(t->values);
}

void wg_txn_free(struct wg_txn *t)
{
    for (uint32_t i = 0; i < t->nchanges; i++) {
        struct aamm_change *c = &t->changes[i];
        tuple_free(&c->old_tuple);
        tuple_free(&c->new_tuple);
        free((void *)c->relations);
        free(c->prefix);
        free(c->content);
    }
    free(t->changes);
    free(t->txn.origin_name);
    memset(t, 0, sizeof *t);
}

bool wg_change_equal(const struct aamm_change *a, const struct aamm_change *b)
{
    if (a->kind != b->kind)
        return false;
    switch (a->kind) {
    case AAMM_CHANGE_INSERT:
    case AAMM_CHANGE_UPDATE:
    case AAMM_CHANGE_DELETE:
        if (!aamm_relation_equal(a->relation, b->relation))
            return false;
        if (a->kind != AAMM_CHANGE_INSERT) {
            if (a->old_kind != b->old_kind)
                return false;
            if (a->old_kind && !aamm_tuple_equal(&a->old_tuple, &b->old_tuple))
                return false;
        }
        if (a->kind != AAMM_CHANGE_DELETE && !aamm_tuple_equal(&a->new_tuple, &b->new_tuple))
            return false;
        return true;
    case AAMM_CHANGE_TRUNCATE:
        if (a->nrelations != b->nrelations || a->truncate_flags != b->truncate_flags)
            return false;
        for (uint32_t i = 0; i < a->nrelations; i++)
            if (!aamm_relation_equal(a->relations[i], b->relations[i]))
                return false;
        return true;
    case AAMM_CHANGE_MESSAGE:
        return a->transactional == b->transactional && a->message_lsn == b->message_lsn &&
               strcmp(a->prefix, b->prefix) == 0 && a->content_len == b->content_len &&
               memcmp(a->content, b->content, a->content_len) == 0;
    }
    return false;
}

bool wg_txn_header_equal(const struct aamm_transaction *a, const struct aamm_transaction *b)
{
    if (a->origin_node != b->origin_node || a->xid != b->xid || a->commit_lsn != b->commit_lsn ||
        a->end_lsn != b->end_lsn || a->commit_time != b->commit_time)
        return false;
    if ((a->origin_name == NULL) != (b->origin_name == NULL))
        return false;
    if (a->origin_name != NULL &&
        (strcmp(a->origin_name, b->origin_name) != 0 || a->origin_lsn != b->origin_lsn))
        return false;
    return true;
}
