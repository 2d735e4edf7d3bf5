/* test_pgoutput.c: the pgoutput parser on hand-built byte vectors, valid and malformed. */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <aamm/change.h>

#include "internal.h"
#include "pgoutput.h"
#include "testutil.h"

/* ====================================================================================
 * Building messages
 * ==================================================================================== */

struct msg {
    uint8_t b[512];
    size_t n;
};

static void put8(struct msg *m, uint8_t v)
{
    if (m->n >= sizeof m->b) { /* a bug in a vector: also reached outside a test */
        fprintf(stderr, "test_pgoutput: message buffer overflow\n");
        abort();
    }
    m->b[m->n++] = v;
}

static void put16(struct msg *m, uint16_t v)
{
    put8(m, (uint8_t)(v >> 8));
    put8(m, (uint8_t)v);
}

static void put32(struct msg *m, uint32_t v)
{
    put16(m, (uint16_t)(v >> 16));
    put16(m, (uint16_t)v);
}

static void put64(struct msg *m, uint64_t v)
{
    put32(m, (uint32_t)(v >> 32));
    put32(m, (uint32_t)v);
}

static void putbytes(struct msg *m, const void *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        put8(m, ((const uint8_t *)p)[i]);
}

/* A String field: the text and its NUL. */
static void putstr(struct msg *m, const char *s)
{
    putbytes(m, s, strlen(s) + 1);
}

/* TupleData value 't' with @s as text. */
static void puttext(struct msg *m, const char *s)
{
    put8(m, 't');
    put32(m, (uint32_t)strlen(s));
    putbytes(m, s, strlen(s));
}

#define REL_USERS 16384u
#define REL_ITEMS 16390u
#define REL_CAT 1259u
#define TYPE_MOOD 16500u

/* Commit timestamps: PostgreSQL counts from 2000-01-01, we from 1970-01-01. */
#define PG_TS INT64_C(722304000123456)    /* 2022-11-21 00:00:00.123456 UTC, PG epoch */
#define UNIX_TS INT64_C(1668988800123456) /* the same instant, Unix epoch */

/* R: public.users (id integer key, name text, note varchar(20)), replica identity default. */
static struct msg rel_users(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'R');
    put32(&m, REL_USERS);
    putstr(&m, "public");
    putstr(&m, "users");
    put8(&m, 'd');
    put16(&m, 3);
    put8(&m, 1), putstr(&m, "id"), put32(&m, 23), put32(&m, 0xffffffffu);
    put8(&m, 0), putstr(&m, "name"), put32(&m, 25), put32(&m, 0xffffffffu);
    put8(&m, 0), putstr(&m, "note"), put32(&m, 1043), put32(&m, 24);
    return m;
}

/* R: public.users after ALTER TABLE ADD COLUMN extra bigint. */
static struct msg rel_users_v2(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'R');
    put32(&m, REL_USERS);
    putstr(&m, "public");
    putstr(&m, "users");
    put8(&m, 'd');
    put16(&m, 4);
    put8(&m, 1), putstr(&m, "id"), put32(&m, 23), put32(&m, 0xffffffffu);
    put8(&m, 0), putstr(&m, "name"), put32(&m, 25), put32(&m, 0xffffffffu);
    put8(&m, 0), putstr(&m, "note"), put32(&m, 1043), put32(&m, 24);
    put8(&m, 0), putstr(&m, "extra"), put32(&m, 20), put32(&m, 0xffffffffu);
    return m;
}

/* R: "Shop".items (sku text, qty int), REPLICA IDENTITY FULL (every column flagged key). */
static struct msg rel_items(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'R');
    put32(&m, REL_ITEMS);
    putstr(&m, "Shop");
    putstr(&m, "items");
    put8(&m, 'f');
    put16(&m, 2);
    put8(&m, 1), putstr(&m, "sku"), put32(&m, 25), put32(&m, 0xffffffffu);
    put8(&m, 1), putstr(&m, "qty"), put32(&m, 23), put32(&m, 0xffffffffu);
    return m;
}

/* R with an empty namespace (pg_catalog), no columns, replica identity nothing. */
static struct msg rel_catalog(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'R');
    put32(&m, REL_CAT);
    putstr(&m, "");
    putstr(&m, "pg_class_like");
    put8(&m, 'n');
    put16(&m, 0);
    return m;
}

static struct msg begin_msg(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'B');
    put64(&m, UINT64_C(0x16B374D848));
    put64(&m, (uint64_t)PG_TS);
    put32(&m, 777);
    return m;
}

static struct msg commit_msg(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'C');
    put8(&m, 0);
    put64(&m, UINT64_C(0x16B374D848));
    put64(&m, UINT64_C(0x16B374D878));
    put64(&m, (uint64_t)PG_TS);
    return m;
}

static struct msg origin_msg(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'O');
    put64(&m, UINT64_C(0x3000000AB));
    putstr(&m, "aamm_from_1");
    return m;
}

static struct msg type_msg(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'Y');
    put32(&m, TYPE_MOOD);
    putstr(&m, "public");
    putstr(&m, "mood");
    return m;
}

/* I into users: (42, NULL, ''). */
static struct msg insert_msg(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'I');
    put32(&m, REL_USERS);
    put8(&m, 'N');
    put16(&m, 3);
    puttext(&m, "42");
    put8(&m, 'n');
    puttext(&m, "");
    return m;
}

/* I into users with 4 columns (after rel_users_v2). */
static struct msg insert4_msg(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'I');
    put32(&m, REL_USERS);
    put8(&m, 'N');
    put16(&m, 4);
    puttext(&m, "7");
    puttext(&m, "Ann");
    put8(&m, 'n');
    puttext(&m, "9000000000");
    return m;
}

/* U of users that changed the key: 'K' (42, null, null), 'N' (43, unchanged, 'x y'). */
static struct msg update_key_msg(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'U');
    put32(&m, REL_USERS);
    put8(&m, 'K');
    put16(&m, 3);
    puttext(&m, "42");
    put8(&m, 'n');
    put8(&m, 'n');
    put8(&m, 'N');
    put16(&m, 3);
    puttext(&m, "43");
    put8(&m, 'u');
    puttext(&m, "x y");
    return m;
}

/* U of items (replica identity full): 'O' ('a', 1), 'N' ('a', 2). */
static struct msg update_full_msg(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'U');
    put32(&m, REL_ITEMS);
    put8(&m, 'O');
    put16(&m, 2);
    puttext(&m, "a");
    puttext(&m, "1");
    put8(&m, 'N');
    put16(&m, 2);
    puttext(&m, "a");
    puttext(&m, "2");
    return m;
}

/* U of users without old tuple: (42, 'Bob', NULL). */
static struct msg update_plain_msg(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'U');
    put32(&m, REL_USERS);
    put8(&m, 'N');
    put16(&m, 3);
    puttext(&m, "42");
    puttext(&m, "Bob");
    put8(&m, 'n');
    return m;
}

/* D of users by key 42. */
static struct msg delete_key_msg(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'D');
    put32(&m, REL_USERS);
    put8(&m, 'K');
    put16(&m, 3);
    puttext(&m, "42");
    put8(&m, 'n');
    put8(&m, 'n');
    return m;
}

/* D of items with the full old row ('a', '2'). */
static struct msg delete_full_msg(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'D');
    put32(&m, REL_ITEMS);
    put8(&m, 'O');
    put16(&m, 2);
    puttext(&m, "a");
    puttext(&m, "2");
    return m;
}

/* T of users and items, CASCADE | RESTART IDENTITY. */
static struct msg truncate_msg(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'T');
    put32(&m, 2);
    put8(&m, 3);
    put32(&m, REL_USERS);
    put32(&m, REL_ITEMS);
    return m;
}

/* M, transactional, prefix aamm_ddl, content "a\0b;" (4 bytes with a NUL inside). */
static struct msg message_msg(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'M');
    put8(&m, 1);
    put64(&m, UINT64_C(0x16B374D000));
    putstr(&m, "aamm_ddl");
    put32(&m, 4);
    putbytes(&m, "a\0b;", 4);
    return m;
}

/* M, non-transactional, empty prefix and content, LSN 0 (falls back to the WAL LSN). */
static struct msg message_empty_msg(void)
{
    struct msg m = {.n = 0};
    put8(&m, 'M');
    put8(&m, 0);
    put64(&m, 0);
    putstr(&m, "");
    put32(&m, 0);
    return m;
}

/* Every valid message, in an order that parses on one parser (relations first). */
typedef struct msg (*msg_fn)(void);
static const msg_fn all_msgs[] = {
    rel_users,       rel_items,        rel_catalog,       begin_msg,
    origin_msg,      type_msg,         insert_msg,        update_key_msg,
    update_full_msg, update_plain_msg, delete_key_msg,    delete_full_msg,
    truncate_msg,    message_msg,      message_empty_msg, commit_msg,
};

/* ====================================================================================
 * Helpers
 * ==================================================================================== */

static size_t in_use(void)
{
    struct aamm_memory_stats s;
    aamm_memory_stats(&s);
    return s.in_use;
}

static struct aamm__pgo *new_parser(void)
{
    struct aamm__pgo *p = NULL;
    ck_assert_int_eq(aamm__pgo_new(&p), 0);
    ck_assert_ptr_nonnull(p);
    return p;
}

/* Parse @m, which must succeed; @ev is filled. */
static void parse_ok(struct aamm__pgo *p, struct msg m, struct aamm__pgo_event *ev)
{
    struct aamm__err err = {0};
    int rc = aamm__pgo_parse(p, m.b, m.n, 0x5000, ev, &err);
    ck_assert_msg(rc == 0, "parse '%c' failed: %d %s", m.b[0], rc, err.msg);
}

static void feed_ok(struct aamm__pgo *p, struct msg m)
{
    struct aamm__pgo_event ev = {0};
    parse_ok(p, m, &ev);
    aamm__pgo_event_clear(&ev);
}

/* A parser that knows users and items. */
static struct aamm__pgo *parser_with_rels(void)
{
    struct aamm__pgo *p = new_parser();
    feed_ok(p, rel_users());
    feed_ok(p, rel_items());
    return p;
}

/*
 * Parse @len bytes, which must be malformed: AAMM_EMALFORMED, a message containing
 * @needle (if any), the event left zeroed and nothing leaked.
 */
static void parse_bad(struct aamm__pgo *p, const uint8_t *data, size_t len, const char *needle)
{
    struct aamm__pgo_event ev, zero;
    struct aamm__err err = {0};
    size_t before = in_use();
    int rc;
    memset(&zero, 0, sizeof zero);
    memset(&ev, 0, sizeof ev);
    rc = aamm__pgo_parse(p, data, len, 0, &ev, &err);
    ck_assert_msg(rc == AAMM_EMALFORMED, "expected EMALFORMED, got %d (%zu bytes, '%c')", rc, len,
                  len ? data[0] : '-');
    ck_assert_int_eq(err.code, AAMM_EMALFORMED);
    ck_assert_msg(strncmp(err.msg, "pgoutput: ", 10) == 0 && strlen(err.msg) > 12,
                  "bad message '%s'", err.msg);
    if (needle != NULL)
        ck_assert_msg(strstr(err.msg, needle) != NULL, "'%s' lacks '%s'", err.msg, needle);
    ck_assert(memcmp(&ev, &zero, sizeof ev) == 0);
    ck_assert_uint_eq(in_use(), before);
}

static void assert_text(const struct aamm_value *v, const char *s)
{
    ck_assert_int_eq(v->kind, AAMM_VALUE_TEXT);
    ck_assert_uint_eq(v->len, strlen(s));
    ck_assert_ptr_nonnull(v->data);
    ck_assert_mem_eq(v->data, s, strlen(s) + 1);
}

static void assert_kind(const struct aamm_value *v, enum aamm_value_kind k)
{
    ck_assert_int_eq(v->kind, k);
    ck_assert_ptr_null(v->data);
    ck_assert_uint_eq(v->len, 0);
}

/* ====================================================================================
 * Valid messages, field by field
 * ==================================================================================== */

/* 'R' fills the cache: names, replica identity, columns with flags, type OIDs, typmods. */
START_TEST(relation_fields)
{
    size_t base = in_use();
    struct aamm__pgo *p = new_parser();
    struct aamm__pgo_event ev = {0};
    const struct aamm_relation *r;
    parse_ok(p, rel_users(), &ev);
    ck_assert_int_eq(ev.type, AAMM__PGO_RELATION);
    r = ev.relation;
    ck_assert_ptr_eq(r, aamm__pgo_relation(p, REL_USERS));
    ck_assert_uint_eq(r->oid, REL_USERS);
    ck_assert_str_eq(r->schema, "public");
    ck_assert_str_eq(r->name, "users");
    ck_assert_int_eq(r->replica_identity, AAMM_REPLIDENT_DEFAULT);
    ck_assert_uint_eq(r->generation, 1);
    ck_assert_uint_eq(r->ncolumns, 3);
    ck_assert_str_eq(r->columns[0].name, "id");
    ck_assert_uint_eq(r->columns[0].flags, AAMM_COLUMN_KEY);
    ck_assert_uint_eq(r->columns[0].type_oid, 23);
    ck_assert_int_eq(r->columns[0].type_mod, -1);
    ck_assert_ptr_null(r->columns[0].type_name);
    ck_assert_str_eq(r->columns[1].name, "name");
    ck_assert_uint_eq(r->columns[1].flags, 0);
    ck_assert_uint_eq(r->columns[1].type_oid, 25);
    ck_assert_str_eq(r->columns[2].name, "note");
    ck_assert_uint_eq(r->columns[2].type_oid, 1043);
    ck_assert_int_eq(r->columns[2].type_mod, 24);
    aamm__pgo_event_clear(&ev);
    ck_assert_ptr_null(ev.relation);

    parse_ok(p, rel_items(), &ev);
    r = ev.relation;
    ck_assert_str_eq(r->schema, "Shop");
    ck_assert_int_eq(r->replica_identity, AAMM_REPLIDENT_FULL);
    ck_assert_uint_eq(r->columns[1].flags, AAMM_COLUMN_KEY);
    aamm__pgo_event_clear(&ev);

    /* An empty namespace means pg_catalog; zero columns are allowed. */
    parse_ok(p, rel_catalog(), &ev);
    r = ev.relation;
    ck_assert_str_eq(r->schema, "pg_catalog");
    ck_assert_str_eq(r->name, "pg_class_like");
    ck_assert_int_eq(r->replica_identity, AAMM_REPLIDENT_NOTHING);
    ck_assert_uint_eq(r->ncolumns, 0);
    ck_assert_ptr_null(r->columns);
    aamm__pgo_event_clear(&ev);
    aamm__pgo_event_clear(NULL);

    /* A row of a relation without columns is an empty tuple. */
    {
        struct msg m = {.n = 0};
        put8(&m, 'I'), put32(&m, REL_CAT), put8(&m, 'N'), put16(&m, 0);
        parse_ok(p, m, &ev);
        ck_assert_int_eq(ev.change.kind, AAMM_CHANGE_INSERT);
        ck_assert_str_eq(ev.change.relation->name, "pg_class_like");
        ck_assert_uint_eq(ev.change.new_tuple.nvalues, 0);
        ck_assert_ptr_null(ev.change.new_tuple.values);
        aamm__pgo_event_clear(&ev);
    }

    ck_assert_ptr_null(aamm__pgo_relation(p, 1));
    aamm__pgo_free(p);
    aamm__pgo_free(NULL);
    ck_assert_uint_eq(in_use(), base);
}
END_TEST

/* 'B' gives final LSN, xid and the commit time converted to the Unix epoch. */
START_TEST(begin_fields)
{
    struct aamm__pgo *p = new_parser();
    struct aamm__pgo_event ev = {0};
    parse_ok(p, begin_msg(), &ev);
    ck_assert_int_eq(ev.type, AAMM__PGO_BEGIN);
    ck_assert_uint_eq(ev.txn.commit_lsn, UINT64_C(0x16B374D848));
    ck_assert_uint_eq(ev.txn.end_lsn, AAMM_LSN_INVALID);
    ck_assert_int_eq(ev.txn.commit_time, UNIX_TS);
    ck_assert_uint_eq(ev.txn.xid, 777);
    ck_assert_ptr_null(ev.txn.origin_name);
    aamm__pgo_event_clear(&ev);
    aamm__pgo_free(p);
}
END_TEST

/* 'C' gives flags, commit LSN, end LSN and the converted commit time. */
START_TEST(commit_fields)
{
    struct aamm__pgo *p = new_parser();
    struct aamm__pgo_event ev = {0};
    parse_ok(p, commit_msg(), &ev);
    ck_assert_int_eq(ev.type, AAMM__PGO_COMMIT);
    ck_assert_uint_eq(ev.flags, 0);
    ck_assert_uint_eq(ev.txn.commit_lsn, UINT64_C(0x16B374D848));
    ck_assert_uint_eq(ev.txn.end_lsn, UINT64_C(0x16B374D878));
    ck_assert_int_eq(ev.txn.commit_time, UNIX_TS);
    aamm__pgo_event_clear(&ev);
    aamm__pgo_free(p);
}
END_TEST

/* A timestamp before 2000 converts to a smaller (still positive) Unix time. */
START_TEST(timestamp_before_pg_epoch)
{
    struct aamm__pgo *p = new_parser();
    struct aamm__pgo_event ev = {0};
    struct msg m = begin_msg();
    /* -1 second: 1999-12-31 23:59:59 UTC. */
    m.n = 9;
    put64(&m, (uint64_t)INT64_C(-1000000));
    put32(&m, 1);
    parse_ok(p, m, &ev);
    ck_assert_int_eq(ev.txn.commit_time, INT64_C(946684799000000));
    aamm__pgo_event_clear(&ev);
    aamm__pgo_free(p);
}
END_TEST

/* 'O' gives the origin LSN and name (heap). */
START_TEST(origin_fields)
{
    struct aamm__pgo *p = new_parser();
    struct aamm__pgo_event ev = {0};
    parse_ok(p, origin_msg(), &ev);
    ck_assert_int_eq(ev.type, AAMM__PGO_ORIGIN);
    ck_assert_uint_eq(ev.txn.origin_lsn, UINT64_C(0x3000000AB));
    ck_assert_str_eq(ev.txn.origin_name, "aamm_from_1");
    aamm__pgo_event_clear(&ev);
    ck_assert_ptr_null(ev.txn.origin_name);
    aamm__pgo_free(p);
}
END_TEST

/* 'Y' gives the type OID, schema and name; an empty schema means pg_catalog. */
START_TEST(type_fields)
{
    struct aamm__pgo *p = new_parser();
    struct aamm__pgo_event ev = {0};
    struct msg m = {.n = 0};
    parse_ok(p, type_msg(), &ev);
    ck_assert_int_eq(ev.type, AAMM__PGO_TYPE);
    ck_assert_uint_eq(ev.type_oid, TYPE_MOOD);
    ck_assert_str_eq(ev.type_schema, "public");
    ck_assert_str_eq(ev.type_name, "mood");
    aamm__pgo_event_clear(&ev);
    put8(&m, 'Y');
    put32(&m, 16);
    putstr(&m, "");
    putstr(&m, "bool");
    parse_ok(p, m, &ev);
    ck_assert_str_eq(ev.type_schema, "pg_catalog");
    ck_assert_str_eq(ev.type_name, "bool");
    aamm__pgo_event_clear(&ev);
    aamm__pgo_free(p);
}
END_TEST

/* 'I' gives an insert on the cached relation with text, null and empty-text values. */
START_TEST(insert_fields)
{
    struct aamm__pgo *p = parser_with_rels();
    struct aamm__pgo_event ev = {0};
    parse_ok(p, insert_msg(), &ev);
    ck_assert_int_eq(ev.type, AAMM__PGO_CHANGE);
    ck_assert_int_eq(ev.change.kind, AAMM_CHANGE_INSERT);
    ck_assert_ptr_eq(ev.change.relation, aamm__pgo_relation(p, REL_USERS));
    ck_assert_int_eq(ev.change.old_kind, AAMM_OLD_NONE);
    ck_assert_uint_eq(ev.change.old_tuple.nvalues, 0);
    ck_assert_uint_eq(ev.change.new_tuple.nvalues, 3);
    assert_text(&ev.change.new_tuple.values[0], "42");
    assert_kind(&ev.change.new_tuple.values[1], AAMM_VALUE_NULL);
    assert_text(&ev.change.new_tuple.values[2], "");
    aamm__pgo_event_clear(&ev);
    aamm__pgo_free(p);
}
END_TEST

/* 'U' with a 'K' old key, with an 'O' old row, and with no old tuple; 'u' values kept. */
START_TEST(update_fields)
{
    struct aamm__pgo *p = parser_with_rels();
    struct aamm__pgo_event ev = {0};
    struct aamm_change *ch = &ev.change;

    parse_ok(p, update_key_msg(), &ev);
    ck_assert_int_eq(ch->kind, AAMM_CHANGE_UPDATE);
    ck_assert_ptr_eq(ch->relation, aamm__pgo_relation(p, REL_USERS));
    ck_assert_int_eq(ch->old_kind, AAMM_OLD_KEY);
    ck_assert_uint_eq(ch->old_tuple.nvalues, 3);
    assert_text(&ch->old_tuple.values[0], "42");
    assert_kind(&ch->old_tuple.values[1], AAMM_VALUE_NULL);
    assert_kind(&ch->old_tuple.values[2], AAMM_VALUE_NULL);
    ck_assert_uint_eq(ch->new_tuple.nvalues, 3);
    assert_text(&ch->new_tuple.values[0], "43");
    assert_kind(&ch->new_tuple.values[1], AAMM_VALUE_UNCHANGED);
    assert_text(&ch->new_tuple.values[2], "x y");
    aamm__pgo_event_clear(&ev);

    parse_ok(p, update_full_msg(), &ev);
    ck_assert_ptr_eq(ch->relation, aamm__pgo_relation(p, REL_ITEMS));
    ck_assert_int_eq(ch->old_kind, AAMM_OLD_FULL);
    assert_text(&ch->old_tuple.values[0], "a");
    assert_text(&ch->old_tuple.values[1], "1");
    assert_text(&ch->new_tuple.values[0], "a");
    assert_text(&ch->new_tuple.values[1], "2");
    aamm__pgo_event_clear(&ev);

    parse_ok(p, update_plain_msg(), &ev);
    ck_assert_int_eq(ch->kind, AAMM_CHANGE_UPDATE);
    ck_assert_int_eq(ch->old_kind, AAMM_OLD_NONE);
    ck_assert_uint_eq(ch->old_tuple.nvalues, 0);
    ck_assert_ptr_null(ch->old_tuple.values);
    assert_text(&ch->new_tuple.values[0], "42");
    assert_text(&ch->new_tuple.values[1], "Bob");
    assert_kind(&ch->new_tuple.values[2], AAMM_VALUE_NULL);
    aamm__pgo_event_clear(&ev);
    aamm__pgo_free(p);
}
END_TEST

/* 'D' with a 'K' old key and with an 'O' old row; no new tuple. */
START_TEST(delete_fields)
{
    struct aamm__pgo *p = parser_with_rels();
    struct aamm__pgo_event ev = {0};
    struct aamm_change *ch = &ev.change;
    parse_ok(p, delete_key_msg(), &ev);
    ck_assert_int_eq(ch->kind, AAMM_CHANGE_DELETE);
    ck_assert_ptr_eq(ch->relation, aamm__pgo_relation(p, REL_USERS));
    ck_assert_int_eq(ch->old_kind, AAMM_OLD_KEY);
    assert_text(&ch->old_tuple.values[0], "42");
    assert_kind(&ch->old_tuple.values[1], AAMM_VALUE_NULL);
    ck_assert_uint_eq(ch->new_tuple.nvalues, 0);
    aamm__pgo_event_clear(&ev);
    parse_ok(p, delete_full_msg(), &ev);
    ck_assert_int_eq(ch->old_kind, AAMM_OLD_FULL);
    ck_assert_ptr_eq(ch->relation, aamm__pgo_relation(p, REL_ITEMS));
    assert_text(&ch->old_tuple.values[0], "a");
    assert_text(&ch->old_tuple.values[1], "2");
    aamm__pgo_event_clear(&ev);
    aamm__pgo_free(p);
}
END_TEST

/* 'T' gives the relations in order (borrowed from the cache) and both flags. */
START_TEST(truncate_fields)
{
    struct aamm__pgo *p = parser_with_rels();
    struct aamm__pgo_event ev = {0};
    struct aamm_change *ch = &ev.change;
    struct msg m = {.n = 0};
    parse_ok(p, truncate_msg(), &ev);
    ck_assert_int_eq(ch->kind, AAMM_CHANGE_TRUNCATE);
    ck_assert_uint_eq(ch->nrelations, 2);
    ck_assert_ptr_eq(ch->relations[0], aamm__pgo_relation(p, REL_USERS));
    ck_assert_ptr_eq(ch->relations[1], aamm__pgo_relation(p, REL_ITEMS));
    ck_assert_uint_eq(ch->truncate_flags, AAMM_TRUNCATE_CASCADE | AAMM_TRUNCATE_RESTART_IDENTITY);
    ck_assert_ptr_null(ch->relation);
    aamm__pgo_event_clear(&ev);
    /* One relation, RESTART IDENTITY only. */
    put8(&m, 'T');
    put32(&m, 1);
    put8(&m, 2);
    put32(&m, REL_ITEMS);
    parse_ok(p, m, &ev);
    ck_assert_uint_eq(ch->nrelations, 1);
    ck_assert_str_eq(ch->relations[0]->name, "items");
    ck_assert_uint_eq(ch->truncate_flags, AAMM_TRUNCATE_RESTART_IDENTITY);
    aamm__pgo_event_clear(&ev);
    aamm__pgo_free(p);
}
END_TEST

/* 'M' gives flags, LSN, prefix and content with an embedded NUL; LSN 0 falls back. */
START_TEST(message_fields)
{
    struct aamm__pgo *p = new_parser();
    struct aamm__pgo_event ev = {0};
    struct aamm_change *ch = &ev.change;
    parse_ok(p, message_msg(), &ev);
    ck_assert_int_eq(ev.type, AAMM__PGO_CHANGE);
    ck_assert_int_eq(ch->kind, AAMM_CHANGE_MESSAGE);
    ck_assert(ch->transactional);
    ck_assert_uint_eq(ch->message_lsn, UINT64_C(0x16B374D000));
    ck_assert_str_eq(ch->prefix, "aamm_ddl");
    ck_assert_uint_eq(ch->content_len, 4);
    ck_assert_mem_eq(ch->content, "a\0b;\0", 5);
    aamm__pgo_event_clear(&ev);

    parse_ok(p, message_empty_msg(), &ev);
    ck_assert(!ch->transactional);
    ck_assert_uint_eq(ch->message_lsn, 0x5000); /* parse_ok's wal_lsn */
    ck_assert_str_eq(ch->prefix, "");
    ck_assert_uint_eq(ch->content_len, 0);
    ck_assert_ptr_nonnull(ch->content);
    ck_assert_int_eq(ch->content[0], '\0');
    aamm__pgo_event_clear(&ev);
    aamm__pgo_free(p);
}
END_TEST

/* A whole stream on one parser: every message parses and nothing leaks. */
START_TEST(stream_no_leak)
{
    size_t base = in_use();
    struct aamm__pgo *p = new_parser();
    for (size_t i = 0; i < AAMM__ARRAY_SIZE(all_msgs); i++)
        feed_ok(p, all_msgs[i]());
    aamm__pgo_free(p);
    ck_assert_uint_eq(in_use(), base);
}
END_TEST

/* ====================================================================================
 * Relation cache
 * ==================================================================================== */

/* A new 'R' for a known OID replaces the definition in place and bumps the generation;
 * tuples are then checked against the new column count. */
START_TEST(relation_redefinition)
{
    size_t base = in_use();
    struct aamm__pgo *p = new_parser();
    struct aamm__pgo_event ev = {0};
    const struct aamm_relation *r1, *r2;
    struct msg m;

    parse_ok(p, rel_users(), &ev);
    r1 = ev.relation;
    aamm__pgo_event_clear(&ev);
    feed_ok(p, insert_msg());

    parse_ok(p, rel_users_v2(), &ev);
    r2 = ev.relation;
    aamm__pgo_event_clear(&ev);
    ck_assert_ptr_eq(r1, r2); /* stable address */
    ck_assert_uint_eq(r2->generation, 2);
    ck_assert_uint_eq(r2->ncolumns, 4);
    ck_assert_str_eq(r2->columns[3].name, "extra");
    ck_assert_uint_eq(r2->columns[3].type_oid, 20);

    /* The old 3-column tuple no longer fits. */
    m = insert_msg();
    parse_bad(p, m.b, m.n, "new tuple has 3 columns, relation public.users has 4");
    parse_ok(p, insert4_msg(), &ev);
    ck_assert_ptr_eq(ev.change.relation, r2);
    ck_assert_uint_eq(ev.change.new_tuple.nvalues, 4);
    assert_text(&ev.change.new_tuple.values[0], "7");
    assert_text(&ev.change.new_tuple.values[1], "Ann");
    assert_kind(&ev.change.new_tuple.values[2], AAMM_VALUE_NULL);
    assert_text(&ev.change.new_tuple.values[3], "9000000000");
    aamm__pgo_event_clear(&ev);

    /* And back (DROP COLUMN): generation 3. */
    feed_ok(p, rel_users());
    ck_assert_uint_eq(aamm__pgo_relation(p, REL_USERS)->generation, 3);
    ck_assert_uint_eq(aamm__pgo_relation(p, REL_USERS)->ncolumns, 3);
    feed_ok(p, insert_msg());
    aamm__pgo_free(p);
    ck_assert_uint_eq(in_use(), base);
}
END_TEST

/* A malformed 'R' for a known OID leaves the cached definition untouched. */
START_TEST(relation_bad_redefinition_keeps_old)
{
    struct aamm__pgo *p = parser_with_rels();
    struct msg m = rel_users_v2();
    parse_bad(p, m.b, m.n - 1, "truncated");
    ck_assert_uint_eq(aamm__pgo_relation(p, REL_USERS)->generation, 1);
    ck_assert_uint_eq(aamm__pgo_relation(p, REL_USERS)->ncolumns, 3);
    feed_ok(p, insert_msg());
    aamm__pgo_free(p);
}
END_TEST

/* Type names set by capture are copied, reset by a redefinition; bad targets refused. */
START_TEST(relation_type_names)
{
    struct aamm__pgo *p = parser_with_rels();
    char name[] = "character varying(20)";
    ck_assert_int_eq(aamm__pgo_set_type_name(p, REL_USERS, 2, name), 0);
    ck_assert_int_eq(aamm__pgo_set_type_name(p, REL_USERS, 0, "text"), 0);
    ck_assert_int_eq(aamm__pgo_set_type_name(p, REL_USERS, 0, "integer"), 0);
    name[0] = 'X';
    ck_assert_str_eq(aamm__pgo_relation(p, REL_USERS)->columns[2].type_name,
                     "character varying(20)");
    ck_assert_str_eq(aamm__pgo_relation(p, REL_USERS)->columns[0].type_name, "integer");
    ck_assert_ptr_null(aamm__pgo_relation(p, REL_USERS)->columns[1].type_name);
    ck_assert_int_eq(aamm__pgo_set_type_name(p, REL_USERS, 3, "x"), AAMM_ENOTFOUND);
    ck_assert_int_eq(aamm__pgo_set_type_name(p, 99, 0, "x"), AAMM_ENOTFOUND);
    aamm__alloc_fail_after(1);
    ck_assert_int_eq(aamm__pgo_set_type_name(p, REL_USERS, 1, "text"), AAMM_ENOMEM);
    aamm__alloc_fail_after(0);
    ck_assert_ptr_null(aamm__pgo_relation(p, REL_USERS)->columns[1].type_name);
    feed_ok(p, rel_users_v2());
    ck_assert_ptr_null(aamm__pgo_relation(p, REL_USERS)->columns[2].type_name);
    aamm__pgo_free(p);
}
END_TEST

/* Thousands of relations stay findable while the cache grows; each keeps its address. */
START_TEST(relation_cache_many)
{
    size_t base = in_use();
    struct aamm__pgo *p = new_parser();
    uint32_t n = (uint32_t)aamm_test_scaled(5000, 100);
    const struct aamm_relation *first = NULL;
    for (uint32_t i = 0; i < n; i++) {
        struct msg m = {.n = 0};
        char name[32];
        snprintf(name, sizeof name, "t%u", i);
        put8(&m, 'R');
        put32(&m, 20000 + i * 7);
        putstr(&m, "public");
        putstr(&m, name);
        put8(&m, 'd');
        put16(&m, 1);
        put8(&m, 1), putstr(&m, "id"), put32(&m, 23), put32(&m, 0xffffffffu);
        feed_ok(p, m);
        if (i == 0)
            first = aamm__pgo_relation(p, 20000);
    }
    ck_assert_ptr_eq(aamm__pgo_relation(p, 20000), first);
    for (uint32_t i = 0; i < n; i++) {
        const struct aamm_relation *r = aamm__pgo_relation(p, 20000 + i * 7);
        char name[32];
        snprintf(name, sizeof name, "t%u", i);
        ck_assert_ptr_nonnull(r);
        ck_assert_str_eq(r->name, name);
        ck_assert_ptr_null(aamm__pgo_relation(p, 20001 + i * 7));
    }
    aamm__pgo_free(p);
    ck_assert_uint_eq(in_use(), base);
}
END_TEST

/* ====================================================================================
 * Malformed input
 * ==================================================================================== */

/* Every valid message cut at every shorter length is malformed, and an extra byte after
 * a complete message is trailing garbage. */
START_TEST(truncated_everywhere)
{
    size_t base = in_use();
    struct aamm__pgo *p = parser_with_rels();
    for (size_t i = 0; i < AAMM__ARRAY_SIZE(all_msgs); i++) {
        struct msg m = all_msgs[i]();
        for (size_t len = 0; len < m.n; len++)
            parse_bad(p, m.b, len, len == 0 ? "empty" : NULL);
        put8(&m, 0);
        parse_bad(p, m.b, m.n, "trailing garbage");
        /* The cache is intact: a change still parses. */
        feed_ok(p, insert_msg());
    }
    aamm__pgo_free(p);
    ck_assert_uint_eq(in_use(), base);
}
END_TEST

/* A cut inside a fixed-size field or a tuple says "truncated". */
START_TEST(truncated_says_so)
{
    struct aamm__pgo *p = parser_with_rels();
    struct msg m = begin_msg();
    parse_bad(p, m.b, 10, "'B' message: truncated");
    m = update_key_msg();
    parse_bad(p, m.b, 12, "'U' message: truncated");
    m = rel_users();
    parse_bad(p, m.b, m.n - 3, "'R' message: truncated");
    aamm__pgo_free(p);
}
END_TEST

/* Unknown type bytes, and the streaming and two-phase messages we never request. */
START_TEST(unknown_types)
{
    struct aamm__pgo *p = parser_with_rels();
    const char *known = "BCORYIUDTM";
    for (int t = 0; t < 256; t++) {
        uint8_t b[32];
        if (t != 0 && strchr(known, t) != NULL)
            continue;
        memset(b, 0, sizeof b);
        b[0] = (uint8_t)t;
        if (strchr("SEcA", t) != NULL && t != 0)
            parse_bad(p, b, sizeof b, "streaming");
        else if (strchr("bPKrp", t) != NULL && t != 0)
            parse_bad(p, b, sizeof b, "two-phase");
        else
            parse_bad(p, b, 1 + (size_t)t % 20, "unknown message type");
    }
    aamm__pgo_free(p);
}
END_TEST

/* Changes on a relation no 'R' described are refused, naming the OID. */
START_TEST(unknown_relation)
{
    struct aamm__pgo *p = new_parser();
    struct msg m;
    feed_ok(p, rel_items());
    m = insert_msg();
    parse_bad(p, m.b, m.n, "'I' message: unknown relation OID 16384");
    m = update_key_msg();
    parse_bad(p, m.b, m.n, "'U' message: unknown relation OID 16384");
    m = delete_key_msg();
    parse_bad(p, m.b, m.n, "'D' message: unknown relation OID 16384");
    m = truncate_msg(); /* users (unknown) first */
    parse_bad(p, m.b, m.n, "'T' message: unknown relation OID 16384");
    m.n = 6; /* items (known), then an unknown one */
    put32(&m, REL_ITEMS);
    put32(&m, 4242);
    parse_bad(p, m.b, m.n, "unknown relation OID 4242");
    aamm__pgo_free(p);
}
END_TEST

/* A tuple whose column count differs from its relation's is refused, in every slot. */
START_TEST(bad_tuple_count)
{
    struct aamm__pgo *p = parser_with_rels();
    struct msg m;
    m = insert_msg();
    m.b[7] = 2; /* ncolumns low byte: 3 -> 2 */
    parse_bad(p, m.b, m.n, "new tuple has 2 columns, relation public.users has 3");
    m.b[6] = 0xff; /* 0xff02 */
    parse_bad(p, m.b, m.n, "columns");
    m = update_key_msg();
    m.b[7] = 4;
    parse_bad(p, m.b, m.n, "old key tuple has 4 columns");
    m = update_full_msg();
    m.b[7] = 3;
    parse_bad(p, m.b, m.n, "old tuple has 3 columns, relation Shop.items has 2");
    m = delete_key_msg();
    m.b[7] = 0;
    parse_bad(p, m.b, m.n, "old key tuple has 0 columns");
    aamm__pgo_free(p);
}
END_TEST

/* Unknown, binary, and misplaced value kinds and tags are refused. */
START_TEST(bad_value_kinds)
{
    struct aamm__pgo *p = parser_with_rels();
    struct msg m = {.n = 0};
    put8(&m, 'I'), put32(&m, REL_ITEMS), put8(&m, 'N'), put16(&m, 2);
    puttext(&m, "a");
    put8(&m, 'x');
    parse_bad(p, m.b, m.n, "column qty: unknown value kind 0x78");
    m.b[m.n - 1] = 'b';
    put32(&m, 4), put32(&m, 1);
    parse_bad(p, m.b, m.n, "binary values not requested");
    m.b[m.n - 9] = 'N'; /* the tag, not a kind */
    parse_bad(p, m.b, m.n, "unknown value kind 0x4e");
    /* Wrong tags. */
    m = insert_msg();
    m.b[5] = 'K';
    parse_bad(p, m.b, m.n, "expected 'N'");
    m = update_key_msg();
    m.b[5] = 'X';
    parse_bad(p, m.b, m.n, "expected 'N'");
    m = delete_key_msg();
    m.b[5] = 'N';
    parse_bad(p, m.b, m.n, "expected 'K' or 'O'");
    aamm__pgo_free(p);
}
END_TEST

/* Text values containing a NUL byte are refused (PostgreSQL never sends them). */
START_TEST(nul_in_text)
{
    struct aamm__pgo *p = parser_with_rels();
    struct msg m = {.n = 0};
    put8(&m, 'I'), put32(&m, REL_ITEMS), put8(&m, 'N'), put16(&m, 2);
    put8(&m, 't'), put32(&m, 3), putbytes(&m, "a\0b", 3);
    puttext(&m, "1");
    parse_bad(p, m.b, m.n, "column sku: text value contains a NUL byte");
    aamm__pgo_free(p);
}
END_TEST

/* Lengths larger than the message are refused before anything is allocated for them. */
START_TEST(bad_lengths)
{
    struct aamm__pgo *p = parser_with_rels();
    struct msg m = {.n = 0};
    struct aamm_memory_stats s;

    aamm_memory_reset_high_water();
    aamm_memory_stats(&s);
    size_t hw0 = s.high_water;

    /* A 2 GB value in a 20-byte message. */
    put8(&m, 'I'), put32(&m, REL_ITEMS), put8(&m, 'N'), put16(&m, 2);
    put8(&m, 't'), put32(&m, 0x7fffffffu), putbytes(&m, "abcdef", 6);
    parse_bad(p, m.b, m.n, "column sku claims 2147483647 bytes, only 6 left");
    /* A "negative" one. */
    m.n = 8;
    put8(&m, 't'), put32(&m, 0xffffffffu), putbytes(&m, "abcdef", 6);
    parse_bad(p, m.b, m.n, "claims 4294967295 bytes");
    /* One byte too long. */
    m.n = 8;
    put8(&m, 't'), put32(&m, 2), put8(&m, 'a');
    parse_bad(p, m.b, m.n, "claims 2 bytes, only 1 left");

    /* A 4 GB message content. */
    m.n = 0;
    put8(&m, 'M'), put8(&m, 1), put64(&m, 1), putstr(&m, "p"), put32(&m, 0xfffffff0u);
    putbytes(&m, "xy", 2);
    parse_bad(p, m.b, m.n, "content length 4294967280, only 2 bytes left");

    /* A truncate of a billion relations, and counts that disagree with the bytes. */
    m.n = 0;
    put8(&m, 'T'), put32(&m, 1000000000u), put8(&m, 0), put32(&m, REL_USERS);
    parse_bad(p, m.b, m.n, "1000000000 relations claimed, only 4 bytes left");
    m.b[1] = m.b[2] = m.b[3] = m.b[4] = 0;
    parse_bad(p, m.b, m.n, "no relations");
    m.b[4] = 1;
    put32(&m, REL_ITEMS);
    parse_bad(p, m.b, m.n, "4 bytes of trailing garbage");

    /* A relation with 32767 columns in a few bytes, and a negative column count. */
    m = rel_users();
    m.b[19] = 0x7f, m.b[20] = 0xff;
    ck_assert_uint_eq(m.b[18], 'd');
    parse_bad(p, m.b, m.n, "truncated");
    m.b[19] = 0xff;
    parse_bad(p, m.b, m.n, "negative column count -1");

    /* A tuple claiming 65535 columns. */
    m = insert_msg();
    m.b[6] = 0xff, m.b[7] = 0xff;
    parse_bad(p, m.b, m.n, "65535 columns");

    aamm_memory_stats(&s);
    ck_assert_uint_lt(s.high_water - hw0, 4096);
    aamm__pgo_free(p);
}
END_TEST

/* Bad flags, replica identities, names and timestamps are refused. */
START_TEST(bad_fields)
{
    struct aamm__pgo *p = parser_with_rels();
    struct msg m;

    m = commit_msg();
    m.b[1] = 1;
    parse_bad(p, m.b, m.n, "'C' message: unknown flags 0x01");
    m = truncate_msg();
    m.b[5] = 4;
    parse_bad(p, m.b, m.n, "'T' message: unknown flags 0x04");
    m = message_msg();
    m.b[1] = 2;
    parse_bad(p, m.b, m.n, "'M' message: unknown flags 0x02");
    m = rel_users();
    m.b[18] = 'z';
    parse_bad(p, m.b, m.n, "unknown replica identity 0x7a");
    m = rel_users();
    m.b[21] = 2; /* first column's flags */
    parse_bad(p, m.b, m.n, "column 0 has unknown flags 0x02");
    m = rel_catalog();
    m.b[6] = '\0'; /* name "" */
    parse_bad(p, m.b, m.n, "relation 1259 has an empty name");
    m = rel_users();
    m.b[22] = '\0'; /* column name "" */
    parse_bad(p, m.b, m.n, "column 0 has an empty name");
    /* A BEGIN timestamp that would overflow the Unix conversion. */
    m = begin_msg();
    m.n = 9;
    put64(&m, UINT64_C(0x7fffffffffffffff));
    put32(&m, 1);
    parse_bad(p, m.b, m.n, "out of range");
    m = commit_msg();
    m.n = 18;
    put64(&m, UINT64_C(0x7ffffffffffffff0));
    parse_bad(p, m.b, m.n, "out of range");
    /* Strings without their NUL. */
    m = origin_msg();
    parse_bad(p, m.b, m.n - 1, "truncated");
    aamm__pgo_free(p);
}
END_TEST

/* ====================================================================================
 * Allocation failures
 * ==================================================================================== */

/*
 * Failing the Nth allocation, for every N until the whole stream succeeds: each step
 * either succeeds or returns AAMM_ENOMEM with a message, the event is left zeroed, and
 * freeing the parser returns memory to the baseline.
 */
START_TEST(out_of_memory_everywhere)
{
    size_t base = in_use();
    bool done = false;
    for (uint64_t n = 1; !done && n < 10000; n++) {
        struct aamm__pgo *p = NULL;
        int rc;
        aamm__alloc_fail_after(n);
        rc = aamm__pgo_new(&p);
        if (rc != 0) {
            ck_assert_int_eq(rc, AAMM_ENOMEM);
            ck_assert_ptr_null(p);
            aamm__alloc_fail_after(0);
            ck_assert_uint_eq(in_use(), base);
            continue;
        }
        done = true;
        for (size_t i = 0; i < AAMM__ARRAY_SIZE(all_msgs); i++) {
            struct msg m = all_msgs[i]();
            struct aamm__pgo_event ev, zero;
            struct aamm__err err = {0};
            memset(&ev, 0, sizeof ev);
            memset(&zero, 0, sizeof zero);
            rc = aamm__pgo_parse(p, m.b, m.n, 0, &ev, &err);
            if (rc != 0) {
                ck_assert_int_eq(rc, AAMM_ENOMEM);
                ck_assert_int_eq(err.code, AAMM_ENOMEM);
                ck_assert_msg(strstr(err.msg, "out of memory") != NULL, "%s", err.msg);
                ck_assert(memcmp(&ev, &zero, sizeof ev) == 0);
                done = false;
                break;
            }
            aamm__pgo_event_clear(&ev);
        }
        aamm__alloc_fail_after(0);
        /* After the failure the parser still works: the rest of the stream parses. */
        if (!done)
            for (size_t i = 0; i < 3; i++)
                feed_ok(p, all_msgs[i]());
        aamm__pgo_free(p);
        ck_assert_uint_eq(in_use(), base);
    }
    ck_assert(done);
}
END_TEST

/* Growing the cache under allocation failure loses no relation. */
START_TEST(out_of_memory_cache_growth)
{
    size_t base = in_use();
    struct aamm__pgo *p = new_parser();
    int failures = 0;
    for (uint32_t i = 0; i < 40; i++) {
        struct msg m = rel_catalog();
        struct aamm__pgo_event ev = {0};
        struct aamm__err err = {0};
        m.b[1] = 0, m.b[2] = 1, m.b[3] = 0, m.b[4] = (uint8_t)i; /* oid 65536 + i */
        /* First attempt fails at the 3rd allocation: schema, name, then cache/entry. */
        aamm__alloc_fail_after(3);
        if (aamm__pgo_parse(p, m.b, m.n, 0, &ev, &err) == AAMM_ENOMEM)
            failures++;
        aamm__alloc_fail_after(0);
        aamm__pgo_event_clear(&ev);
        feed_ok(p, m);
    }
    ck_assert_int_gt(failures, 0);
    for (uint32_t i = 0; i < 40; i++) {
        const struct aamm_relation *r = aamm__pgo_relation(p, 65536 + i);
        ck_assert_ptr_nonnull(r);
        ck_assert_uint_eq(r->generation, 1);
    }
    aamm__pgo_free(p);
    ck_assert_uint_eq(in_use(), base);
}
END_TEST

/* ====================================================================================
 * Golden sample: real PostgreSQL 15 output (tests/golden/pgoutput/make-golden.sh)
 * ==================================================================================== */

/* Append a readable token for @ev to @trace. */
static void trace_event(char *trace, size_t size, const struct aamm__pgo_event *ev)
{
    const struct aamm_change *ch = &ev->change;
    size_t n = strlen(trace);
    char *o = trace + n;
    size = size - n;
    switch (ev->type) {
    case AAMM__PGO_BEGIN:
        snprintf(o, size, "B ");
        break;
    case AAMM__PGO_COMMIT:
        snprintf(o, size, "C ");
        break;
    case AAMM__PGO_ORIGIN:
        snprintf(o, size, "O:%s ", ev->txn.origin_name);
        break;
    case AAMM__PGO_TYPE:
        snprintf(o, size, "Y:%s.%s ", ev->type_schema, ev->type_name);
        break;
    case AAMM__PGO_RELATION:
        snprintf(o, size, "R:%s.%s/%u/%u ", ev->relation->schema, ev->relation->name,
                 ev->relation->ncolumns, ev->relation->generation);
        break;
    case AAMM__PGO_CHANGE:
        switch (ch->kind) {
        case AAMM_CHANGE_INSERT:
            snprintf(o, size, "I:%s ", ch->relation->name);
            break;
        case AAMM_CHANGE_UPDATE:
            snprintf(o, size, "U:%s:%c ", ch->relation->name, ch->old_kind ? ch->old_kind : '-');
            break;
        case AAMM_CHANGE_DELETE:
            snprintf(o, size, "D:%s:%c ", ch->relation->name, ch->old_kind);
            break;
        case AAMM_CHANGE_TRUNCATE:
            snprintf(o, size, "T:%u:%u ", ch->truncate_flags, ch->nrelations);
            break;
        case AAMM_CHANGE_MESSAGE:
            snprintf(o, size, "M:%d:%s ", ch->transactional, ch->prefix);
            break;
        }
        break;
    }
}

static const char golden_trace[] =
    "B R:public.users/3/1 I:users I:users C "
    "B U:users:K C "
    "B U:users:- C "
    "B D:users:K C "
    "B R:public.items/2/1 I:items C "
    "B U:items:O C "
    "B D:items:O C "
    "B Y:public.mood R:public.moods/3/1 I:moods C "
    "B U:moods:- C "
    "B M:1:aamm_ddl C "
    "M:0:aamm_nt "
    "B R:public.users/3/2 R:public.items/2/2 T:3:2 C " /* TRUNCATE re-sends 'R' */
    "B R:public.users/4/3 I:users C "
    "B O:aamm_from_2 I:users C ";

/* Messages a real PG15 server sent (inserts, key-changing and plain updates, REPLICA
 * IDENTITY FULL, an enum type, an unchanged TOAST value, messages, truncate, ADD COLUMN,
 * a replication origin) parse into the expected events and values. */
START_TEST(golden_pg15)
{
    char path[1024], trace[2048] = "";
    static uint8_t buf[65536];
    size_t len, off = 1;
    FILE *f;
    size_t base = in_use();
    struct aamm__pgo *p = new_parser();
    int64_t first_time = 0, begin_time = 0;
    uint64_t begin_lsn = 0;
    int nbegins = 0;

    snprintf(path, sizeof path, "%s/tests/golden/pgoutput/pg15.bin", AAMM_TOP_SRCDIR);
    f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    len = fread(buf, 1, sizeof buf, f);
    fclose(f);
    ck_assert_uint_gt(len, 1);
    ck_assert_uint_lt(len, sizeof buf);
    ck_assert_uint_eq(buf[0], 0);
    while (off < len) {
        struct aamm__pgo_event ev = {0};
        struct aamm__err err = {0};
        const struct aamm_change *ch = &ev.change;
        size_t mlen;
        int rc;
        ck_assert_uint_le(off + 2, len);
        mlen = ((size_t)buf[off] << 8) | buf[off + 1];
        off += 2;
        ck_assert_uint_le(off + mlen, len);
        rc = aamm__pgo_parse(p, buf + off, mlen, 0, &ev, &err);
        ck_assert_msg(rc == 0, "%s", err.msg);
        off += mlen;
        trace_event(trace, sizeof trace, &ev);

        /* Spot checks, value by value. */
        if (ev.type == AAMM__PGO_BEGIN) {
            ck_assert_uint_ne(ev.txn.commit_lsn, 0);
            ck_assert_uint_ne(ev.txn.xid, 0);
            begin_time = ev.txn.commit_time;
            begin_lsn = ev.txn.commit_lsn;
            nbegins++;
        }
        if (ev.type == AAMM__PGO_COMMIT) {
            /* BEGIN's final LSN is COMMIT's commit LSN; both carry the same time. */
            ck_assert_uint_eq(ev.txn.commit_lsn, begin_lsn);
            ck_assert_uint_gt(ev.txn.end_lsn, ev.txn.commit_lsn);
            ck_assert_int_eq(ev.txn.commit_time, begin_time);
            if (nbegins < 13) {
                /* Local commit times are real: after 2026-01-01, within a minute. */
                ck_assert_int_gt(ev.txn.commit_time, INT64_C(1767225600000000));
                if (first_time == 0)
                    first_time = ev.txn.commit_time;
                ck_assert_int_lt(ev.txn.commit_time - first_time, INT64_C(60000000));
            } else {
                /* The one under an origin has the origin's: 2022-11-21 00:00:00 UTC. */
                ck_assert_int_eq(ev.txn.commit_time, INT64_C(1668988800000000));
            }
        }
        if (ev.type == AAMM__PGO_ORIGIN)
            ck_assert_uint_eq(ev.txn.origin_lsn, UINT64_C(0xABCDEF));
        if (ev.type == AAMM__PGO_RELATION && strcmp(ev.relation->name, "items") == 0) {
            ck_assert_int_eq(ev.relation->replica_identity, AAMM_REPLIDENT_FULL);
            ck_assert_uint_eq(ev.relation->columns[0].flags, AAMM_COLUMN_KEY);
            ck_assert_uint_eq(ev.relation->columns[1].flags, AAMM_COLUMN_KEY);
        }
        if (ev.type == AAMM__PGO_RELATION && strcmp(ev.relation->name, "users") == 0) {
            const struct aamm_relation *r = ev.relation;
            ck_assert_int_eq(r->replica_identity, AAMM_REPLIDENT_DEFAULT);
            ck_assert_str_eq(r->columns[0].name, "id");
            ck_assert_uint_eq(r->columns[0].flags, AAMM_COLUMN_KEY);
            ck_assert_uint_eq(r->columns[0].type_oid, 23);
            ck_assert_uint_eq(r->columns[1].flags, 0);
            ck_assert_uint_eq(r->columns[2].type_oid, 1043);
            ck_assert_int_eq(r->columns[2].type_mod, 24); /* varchar(20): 20 + 4 */
            if (r->ncolumns == 4) {
                ck_assert_str_eq(r->columns[3].name, "extra");
                ck_assert_uint_eq(r->columns[3].type_oid, 20);
            }
        }
        if (ev.type == AAMM__PGO_CHANGE && ch->kind == AAMM_CHANGE_UPDATE &&
            strcmp(ch->relation->name, "users") == 0 && ch->old_kind == AAMM_OLD_KEY) {
            assert_text(&ch->old_tuple.values[0], "1");
            assert_kind(&ch->old_tuple.values[1], AAMM_VALUE_NULL);
            assert_text(&ch->new_tuple.values[0], "3");
            assert_text(&ch->new_tuple.values[1], "Ann");
            assert_kind(&ch->new_tuple.values[2], AAMM_VALUE_NULL);
        }
        if (ev.type == AAMM__PGO_CHANGE && ch->kind == AAMM_CHANGE_INSERT &&
            strcmp(ch->relation->name, "moods") == 0) {
            assert_text(&ch->new_tuple.values[1], "happy");
            ck_assert_uint_eq(ch->new_tuple.values[2].len, 10000);
        }
        if (ev.type == AAMM__PGO_CHANGE && ch->kind == AAMM_CHANGE_UPDATE &&
            strcmp(ch->relation->name, "moods") == 0) {
            assert_text(&ch->new_tuple.values[0], "1");
            assert_text(&ch->new_tuple.values[1], "sad");
            assert_kind(&ch->new_tuple.values[2], AAMM_VALUE_UNCHANGED);
        }
        if (ev.type == AAMM__PGO_CHANGE && ch->kind == AAMM_CHANGE_TRUNCATE) {
            ck_assert_str_eq(ch->relations[0]->name, "users");
            ck_assert_str_eq(ch->relations[1]->name, "items");
        }
        if (ev.type == AAMM__PGO_CHANGE && ch->kind == AAMM_CHANGE_MESSAGE) {
            if (ch->transactional) {
                ck_assert_uint_eq(ch->content_len, 16);
                ck_assert_str_eq(ch->content, "CREATE TABLE t()");
            } else {
                ck_assert_uint_eq(ch->content_len, 5);
                ck_assert_str_eq(ch->content, "hello");
            }
            ck_assert_uint_ne(ch->message_lsn, 0);
        }
        if (ev.type == AAMM__PGO_CHANGE && ch->kind == AAMM_CHANGE_INSERT &&
            ch->relation->ncolumns == 4) {
            assert_text(&ch->new_tuple.values[3],
                        strcmp(ch->new_tuple.values[1].data, "Eve") == 0 ? "9000000000" : "1");
        }
        aamm__pgo_event_clear(&ev);
    }
    ck_assert_str_eq(trace, golden_trace);
    ck_assert_int_eq(nbegins, 13);
    aamm__pgo_free(p);
    ck_assert_uint_eq(in_use(), base);
}
END_TEST

/* ====================================================================================
 * Fuzz corpus: AAMM_PGO_WRITE_CORPUS=DIR tests/unit/test_pgoutput writes the seeds of
 * tests/fuzz/corpus/pgoutput from the vectors above (format: see fuzz_pgoutput.c).
 * ==================================================================================== */

static int write_seed(const char *dir, const char *name, uint8_t mode, const msg_fn *msgs, size_t n)
{
    char path[1024];
    FILE *f;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "wb");
    if (f == NULL)
        return 1;
    fputc(mode, f);
    for (size_t i = 0; i < n; i++) {
        struct msg m = msgs[i]();
        fputc((int)(m.n >> 8), f);
        fputc((int)(m.n & 0xff), f);
        fwrite(m.b, 1, m.n, f);
    }
    return fclose(f) == 0 ? 0 : 1;
}

static int write_corpus(const char *dir)
{
    static const msg_fn changes[] = {
        rel_users,       rel_items,        begin_msg,      insert_msg,      update_key_msg,
        update_full_msg, update_plain_msg, delete_key_msg, delete_full_msg, commit_msg};
    static const msg_fn redefine[] = {rel_users,   insert_msg, rel_users_v2,
                                      insert4_msg, rel_users,  insert_msg};
    static const msg_fn misc[] = {rel_users,   rel_items,        begin_msg,   origin_msg,
                                  type_msg,    truncate_msg,     message_msg, commit_msg,
                                  rel_catalog, message_empty_msg};
    int bad = 0;
    bad |= write_seed(dir, "all", 0, all_msgs, AAMM__ARRAY_SIZE(all_msgs));
    bad |= write_seed(dir, "changes", 0, changes, AAMM__ARRAY_SIZE(changes));
    bad |= write_seed(dir, "redefine", 0, redefine, AAMM__ARRAY_SIZE(redefine));
    bad |= write_seed(dir, "misc", 0, misc, AAMM__ARRAY_SIZE(misc));
    bad |= write_seed(dir, "all-oom", 0x80 | 12, all_msgs, AAMM__ARRAY_SIZE(all_msgs));
    return bad;
}

int main(void)
{
    Suite *s = suite_create("pgoutput");
    const char *corpus = getenv("AAMM_PGO_WRITE_CORPUS");
    if (corpus != NULL && *corpus != '\0')
        return write_corpus(corpus);
    TCase *tc = aamm_test_tcase("valid", 10);
    tcase_add_test(tc, relation_fields);
    tcase_add_test(tc, begin_fields);
    tcase_add_test(tc, commit_fields);
    tcase_add_test(tc, timestamp_before_pg_epoch);
    tcase_add_test(tc, origin_fields);
    tcase_add_test(tc, type_fields);
    tcase_add_test(tc, insert_fields);
    tcase_add_test(tc, update_fields);
    tcase_add_test(tc, delete_fields);
    tcase_add_test(tc, truncate_fields);
    tcase_add_test(tc, message_fields);
    tcase_add_test(tc, stream_no_leak);
    tcase_add_test(tc, golden_pg15);
    suite_add_tcase(s, tc);

    tc = aamm_test_tcase("cache", 20);
    tcase_add_test(tc, relation_redefinition);
    tcase_add_test(tc, relation_bad_redefinition_keeps_old);
    tcase_add_test(tc, relation_type_names);
    tcase_add_test(tc, relation_cache_many);
    suite_add_tcase(s, tc);

    tc = aamm_test_tcase("malformed", 20);
    tcase_add_test(tc, truncated_everywhere);
    tcase_add_test(tc, truncated_says_so);
    tcase_add_test(tc, unknown_types);
    tcase_add_test(tc, unknown_relation);
    tcase_add_test(tc, bad_tuple_count);
    tcase_add_test(tc, bad_value_kinds);
    tcase_add_test(tc, nul_in_text);
    tcase_add_test(tc, bad_lengths);
    tcase_add_test(tc, bad_fields);
    suite_add_tcase(s, tc);

    tc = aamm_test_tcase("out_of_memory", 30);
    tcase_add_test(tc, out_of_memory_everywhere);
    tcase_add_test(tc, out_of_memory_cache_growth);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
