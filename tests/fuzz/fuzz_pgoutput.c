/*
 * fuzz_pgoutput.c: libFuzzer target for the pgoutput parser (make fuzz FUZZ=pgoutput).
 *
 * Input: one mode byte, then a sequence of messages, each a 2-byte big-endian length and
 * that many bytes (the last one may be short), all parsed on one parser so the relation
 * cache carries across messages. Mode bit 0x80 makes allocation number (mode & 0x7f) + 1
 * and every later one fail. After each successful parse the event is checked against the
 * parser's invariants; at the end every byte allocated must have been freed.
 */
#include "config.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "pgoutput.h"

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_pgoutput: invariant failed: %s (line %d)\n", #cond, __LINE__);   \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static size_t in_use(void)
{
    struct aamm_memory_stats s;
    aamm_memory_stats(&s);
    return s.in_use;
}

static void check_tuple(const struct aamm_tuple *t, const struct aamm_relation *rel)
{
    CHECK(t->nvalues == rel->ncolumns);
    CHECK((t->nvalues == 0) == (t->values == NULL));
    for (uint32_t i = 0; i < t->nvalues; i++) {
        const struct aamm_value *v = &t->values[i];
        if (v->kind == AAMM_VALUE_TEXT) {
            CHECK(v->data != NULL);
            CHECK(v->data[v->len] == '\0');
            CHECK(strlen(v->data) == v->len);
        } else {
            CHECK(v->kind == AAMM_VALUE_NULL || v->kind == AAMM_VALUE_UNCHANGED);
            CHECK(v->data == NULL && v->len == 0);
        }
    }
}

static void check_relation(const struct aamm__pgo *p, const struct aamm_relation *rel)
{
    CHECK(rel != NULL);
    CHECK(aamm__pgo_relation(p, rel->oid) == rel);
    CHECK(rel->schema != NULL && rel->name != NULL && rel->name[0] != '\0');
    CHECK(rel->generation >= 1);
    CHECK((rel->ncolumns == 0) == (rel->columns == NULL));
    for (uint32_t i = 0; i < rel->ncolumns; i++) {
        CHECK(rel->columns[i].name != NULL && rel->columns[i].name[0] != '\0');
        CHECK((rel->columns[i].flags & ~AAMM_COLUMN_KEY) == 0);
    }
}

static void check_event(const struct aamm__pgo *p, const struct aamm__pgo_event *ev)
{
    const struct aamm_change *ch = &ev->change;
    switch (ev->type) {
    case AAMM__PGO_BEGIN:
    case AAMM__PGO_COMMIT:
        break;
    case AAMM__PGO_ORIGIN:
        CHECK(ev->txn.origin_name != NULL);
        break;
    case AAMM__PGO_TYPE:
        CHECK(ev->type_schema != NULL && ev->type_name != NULL);
        break;
    case AAMM__PGO_RELATION:
        check_relation(p, ev->relation);
        break;
    case AAMM__PGO_CHANGE:
        switch (ch->kind) {
        case AAMM_CHANGE_INSERT:
            check_relation(p, ch->relation);
            CHECK(ch->old_kind == AAMM_OLD_NONE);
            check_tuple(&ch->new_tuple, ch->relation);
            break;
        case AAMM_CHANGE_UPDATE:
            check_relation(p, ch->relation);
            if (ch->old_kind != AAMM_OLD_NONE)
                check_tuple(&ch->old_tuple, ch->relation);
            check_tuple(&ch->new_tuple, ch->relation);
            break;
        case AAMM_CHANGE_DELETE:
            check_relation(p, ch->relation);
            CHECK(ch->old_kind == AAMM_OLD_KEY || ch->old_kind == AAMM_OLD_FULL);
            check_tuple(&ch->old_tuple, ch->relation);
            CHECK(ch->new_tuple.nvalues == 0);
            break;
        case AAMM_CHANGE_TRUNCATE:
            CHECK(ch->nrelations > 0 && ch->relations != NULL);
            for (uint32_t i = 0; i < ch->nrelations; i++)
                check_relation(p, ch->relations[i]);
            break;
        case AAMM_CHANGE_MESSAGE:
            CHECK(ch->prefix != NULL && ch->content != NULL);
            CHECK(ch->content[ch->content_len] == '\0');
            break;
        default:
            CHECK(!"unknown change kind");
        }
        break;
    default:
        CHECK(!"unknown event type");
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t base = in_use();
    struct aamm__pgo *p = NULL;
    uint8_t mode;

    if (size < 1)
        return 0;
    mode = data[0];
    data++, size--;
    if (mode & 0x80)
        aamm__alloc_fail_after((uint64_t)(mode & 0x7f) + 1);
    if (aamm__pgo_new(&p) != 0) {
        aamm__alloc_fail_after(0);
        CHECK(in_use() == base);
        return 0;
    }
    while (size >= 2) {
        size_t len = ((size_t)data[0] << 8) | data[1];
        struct aamm__pgo_event ev;
        struct aamm__err err;
        int rc;
        data += 2, size -= 2;
        if (len > size)
            len = size;
        memset(&ev, 0, sizeof ev);
        memset(&err, 0, sizeof err);
        rc = aamm__pgo_parse(p, data, len, 0x1000, &ev, &err);
        if (rc == 0) {
            check_event(p, &ev);
            /* Capture sets type names right after an 'R'. */
            if (ev.type == AAMM__PGO_RELATION && ev.relation->ncolumns > 0) {
                rc = aamm__pgo_set_type_name(p, ev.relation->oid, 0, "integer");
                CHECK(rc == 0 || rc == AAMM_ENOMEM);
            }
        } else {
            CHECK(rc == AAMM_EMALFORMED || rc == AAMM_ENOMEM);
            CHECK(err.code == rc && strncmp(err.msg, "pgoutput: ", 10) == 0);
        }
        aamm__pgo_event_clear(&ev);
        data += len, size -= len;
    }
    aamm__pgo_free(p);
    aamm__alloc_fail_after(0);
    CHECK(in_use() == base);
    return 0;
}
