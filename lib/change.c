/* change.c: constructors, copies, comparisons and destructors of the change model. */
#include "config.h"

#include <string.h>

#include <aamm/change.h>

#include "internal.h"

/* ====================================================================================
 * Relations
 * ==================================================================================== */

void aamm_relation_clear(struct aamm_relation *rel)
{
    if (rel == NULL)
        return;
    for (uint32_t i = 0; rel->columns != NULL && i < rel->ncolumns; i++) {
        aamm__free(rel->columns[i].name);
        aamm__free(rel->columns[i].type_name);
    }
    aamm__free(rel->columns);
    aamm__free(rel->schema);
    aamm__free(rel->name);
    memset(rel, 0, sizeof *rel);
}

int aamm_relation_copy(struct aamm_relation *dst, const struct aamm_relation *src)
{
    bool ok = true;
    memset(dst, 0, sizeof *dst);
    dst->oid = src->oid;
    dst->replica_identity = src->replica_identity;
    dst->generation = src->generation;
    dst->schema = aamm__strdup_opt(src->schema, &ok);
    dst->name = aamm__strdup_opt(src->name, &ok);
    if (src->ncolumns > 0) {
        dst->columns = aamm__calloc(src->ncolumns, sizeof *dst->columns);
        if (dst->columns == NULL)
            ok = false;
        else
            dst->ncolumns = src->ncolumns;
    }
    for (uint32_t i = 0; ok && i < dst->ncolumns; i++) {
        const struct aamm_column *s = &src->columns[i];
        struct aamm_column *d = &dst->columns[i];
        d->name = aamm__strdup_opt(s->name, &ok);
        d->type_name = aamm__strdup_opt(s->type_name, &ok);
        d->type_oid = s->type_oid;
        d->type_mod = s->type_mod;
        d->flags = s->flags;
    }
    if (!ok) {
        aamm_relation_clear(dst);
        return AAMM_ENOMEM;
    }
    return AAMM_OK;
}

static bool str_eq(const char *a, const char *b)
{
    if (a == NULL || b == NULL)
        return a == b;
    return strcmp(a, b) == 0;
}

bool aamm_relation_equal(const struct aamm_relation *a, const struct aamm_relation *b)
{
    if (!str_eq(a->schema, b->schema) || !str_eq(a->name, b->name) ||
        a->replica_identity != b->replica_identity || a->ncolumns != b->ncolumns)
        return false;
    for (uint32_t i = 0; i < a->ncolumns; i++) {
        const struct aamm_column *x = &a->columns[i], *y = &b->columns[i];
        if (!str_eq(x->name, y->name) || !str_eq(x->type_name, y->type_name) ||
            x->type_mod != y->type_mod || x->flags != y->flags)
            return false;
    }
    return true;
}

int aamm_relation_column(const struct aamm_relation *rel, const char *name)
{
    for (uint32_t i = 0; i < rel->ncolumns; i++)
        if (rel->columns[i].name != NULL && strcmp(rel->columns[i].name, name) == 0)
            return (int)i;
    return -1;
}

/* ====================================================================================
 * Tuples
 * ==================================================================================== */

void aamm_tuple_clear(struct aamm_tuple *tuple)
{
    if (tuple == NULL)
        return;
    for (uint32_t i = 0; tuple->values != NULL && i < tuple->nvalues; i++)
        aamm__free(tuple->values[i].data);
    aamm__free(tuple->values);
    tuple->values = NULL;
    tuple->nvalues = 0;
}

int aamm_value_set(struct aamm_value *value, const char *data, size_t len)
{
    char *d = NULL;
    if (data) {
        d = aamm__malloc(len + 1);
        if (!d)
            return AAMM_ENOMEM;
        memcpy(d, data, len);
        d[len] = '\0';
    }
    aamm__free(value->data);
    value->data = d;
    value->len = data ? len : 0;
    value->kind = data ? AAMM_VALUE_TEXT : AAMM_VALUE_NULL;
    return 0;
}

int aamm_tuple_copy(struct aamm_tuple *dst, const struct aamm_tuple *src)
{
    memset(dst, 0, sizeof *dst);
    if (src->nvalues == 0)
        return AAMM_OK;
    dst->values = aamm__calloc(src->nvalues, sizeof *dst->values);
    if (dst->values == NULL)
        return AAMM_ENOMEM;
    dst->nvalues = src->nvalues;
    for (uint32_t i = 0; i < src->nvalues; i++) {
        const struct aamm_value *s = &src->values[i];
        struct aamm_value *d = &dst->values[i];
        d->kind = s->kind;
        d->len = s->len;
        if (s->data != NULL) {
            d->data = aamm__strndup(s->data, s->len);
            if (d->data == NULL) {
                aamm_tuple_clear(dst);
                return AAMM_ENOMEM;
            }
        }
    }
    return AAMM_OK;
}

bool aamm_tuple_equal(const struct aamm_tuple *a, const struct aamm_tuple *b)
{
    if (a->nvalues != b->nvalues)
        return false;
    for (uint32_t i = 0; i < a->nvalues; i++) {
        const struct aamm_value *x = &a->values[i], *y = &b->values[i];
        if (x->kind != y->kind)
            return false;
        if (x->kind == AAMM_VALUE_TEXT &&
            (x->len != y->len || memcmp(x->data, y->data, x->len) != 0))
            return false;
    }
    return true;
}

/* ====================================================================================
 * Changes and transactions
 * ==================================================================================== */

void aamm_change_clear(struct aamm_change *change)
{
    if (change == NULL)
        return;
    aamm_tuple_clear(&change->old_tuple);
    aamm_tuple_clear(&change->new_tuple);
    aamm__free((void *)change->relations);
    aamm__free(change->prefix);
    aamm__free(change->content);
    memset(change, 0, sizeof *change);
}

const char *aamm_change_kind_name(enum aamm_change_kind kind)
{
    switch (kind) {
    case AAMM_CHANGE_INSERT:
        return "insert";
    case AAMM_CHANGE_UPDATE:
        return "update";
    case AAMM_CHANGE_DELETE:
        return "delete";
    case AAMM_CHANGE_TRUNCATE:
        return "truncate";
    case AAMM_CHANGE_MESSAGE:
        return "message";
    }
    return "unknown";
}

void aamm_transaction_clear(struct aamm_transaction *txn)
{
    if (txn == NULL)
        return;
    aamm__free(txn->origin_name);
    memset(txn, 0, sizeof *txn);
}

int aamm_transaction_copy(struct aamm_transaction *dst, const struct aamm_transaction *src)
{
    *dst = *src;
    dst->origin_name = NULL;
    if (src->origin_name != NULL) {
        dst->origin_name = aamm__strdup(src->origin_name);
        if (dst->origin_name == NULL) {
            memset(dst, 0, sizeof *dst);
            return AAMM_ENOMEM;
        }
    }
    return AAMM_OK;
}
