/* test_capture.c: capture against real PostgreSQL 15 servers: every change kind and value
 * kind, origins, reconnects, gaps, unsuitable servers, a paused host, a huge transaction. */
#include "config.h"

#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <aamm/capture.h>

#include "pgfixture.h"
#include "testutil.h"

/* One cluster per TCase (unchecked fixture: it lives in the parent, forked tests share it;
 * each test uses its own tables, publication and slot). */
static struct pgfx *fx;

static void main_setup(void)
{
    fx = pgfx_start(1, "wal_sender_timeout = 2s\nlogical_decoding_work_mem = 64MB\n");
}

static void bad_setup(void)
{
    fx = pgfx_start(1, "wal_level = replica\ntrack_commit_timestamp = off\n");
}

static void cluster_teardown(void)
{
    pgfx_destroy(fx);
    fx = NULL;
}

#define SQL(...) ck_assert_int_eq(pgfx_exec(fx, 0, __VA_ARGS__), 0)

/* ---- helpers ---------------------------------------------------------------------- */

/* Open a capture; returns the code, *out set on success. */
static int cap_open(struct aamm_capture **out, const char *slot, const char *pub, uint64_t start)
{
    const char *pubs[1] = {pub};
    struct aamm_capture_options o = {.node_id = 7};
    struct aamm_capture *c;
    int rc;
    o.conninfo = pgfx_conninfo(fx, 0);
    o.slot = slot;
    o.publications = pubs;
    o.npublications = 1;
    o.node_id = 7;
    o.start_lsn = start;
    *out = NULL;
    rc = aamm_capture_new(&c, &o, NULL, 0);
    ck_assert_int_eq(rc, 0);
    /* Right after a walsender was terminated the slot may still be held for a moment. */
    for (int i = 0; i < 100; i++) {
        rc = aamm_capture_open(c);
        if (rc != AAMM_EBUSY)
            break;
        aamm_capture_free(c);
        usleep(100 * 1000);
        ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), 0);
    }
    if (rc != 0) {
        fprintf(stderr, "open: %s\n", aamm_capture_errmsg(c));
        aamm_capture_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

static struct aamm_capture *cap(const char *slot, const char *pub, uint64_t start)
{
    struct aamm_capture *c;
    int rc = cap_open(&c, slot, pub, start);
    ck_assert_msg(rc == 0, "open failed: %s", aamm_errname(rc));
    return c;
}

/* The next event of the given kinds (a bit mask of 1 << kind), others skipped. */
static int pull_kinds(struct aamm_capture *c, struct aamm_capture_event *ev, unsigned kinds,
                      int timeout_ms)
{
    int64_t deadline = aamm_test_now_ms() + timeout_ms;
    for (;;) {
        int64_t left = deadline - aamm_test_now_ms();
        int rc = aamm_capture_wait(c, ev, left > 0 ? (int)left : 0);
        if (rc != 0)
            return rc == AAMM_EAGAIN ? 0 : rc;
        if (kinds & (1u << ev->kind))
            return 1;
    }
}

#define K(kind) (1u << AAMM_CAPTURE_##kind)
#define TXN_KINDS (K(BEGIN) | K(CHANGE) | K(COMMIT))

static void render_value(char *buf, size_t size, const struct aamm_value *v)
{
    if (v->kind == AAMM_VALUE_NULL)
        snprintf(buf, size, "NULL");
    else if (v->kind == AAMM_VALUE_UNCHANGED)
        snprintf(buf, size, "<unchanged>");
    else if (v->len > 40)
        snprintf(buf, size, "<%u bytes>", v->len);
    else
        snprintf(buf, size, "'%s'", v->data);
}

static size_t render_tuple(char *out, size_t size, const struct aamm_relation *rel,
                           const struct aamm_tuple *t)
{
    size_t n = 0;
    for (uint32_t i = 0; i < t->nvalues && n < size; i++) {
        char v[64];
        render_value(v, sizeof v, &t->values[i]);
        n += (size_t)snprintf(out + n, size - n, "%s%s=%s", i ? " " : "",
                              i < rel->ncolumns ? rel->columns[i].name : "?", v);
    }
    return n;
}

/* One line per change: "INSERT public.t id='1' v='x'". */
static void render_change(char *out, size_t size, const struct aamm_change *ch)
{
    size_t n = 0;
    const struct aamm_relation *r = ch->relation;
    switch (ch->kind) {
    case AAMM_CHANGE_INSERT:
        n = (size_t)snprintf(out, size, "INSERT %s.%s ", r->schema, r->name);
        render_tuple(out + n, size - n, r, &ch->new_tuple);
        break;
    case AAMM_CHANGE_UPDATE:
        n = (size_t)snprintf(out, size, "UPDATE %s.%s ", r->schema, r->name);
        if (ch->old_kind != AAMM_OLD_NONE) {
            n += (size_t)snprintf(out + n, size - n, "%c(", ch->old_kind);
            n += render_tuple(out + n, size - n, r, &ch->old_tuple);
            n += (size_t)snprintf(out + n, size - n, ") ");
        }
        render_tuple(out + n, size - n, r, &ch->new_tuple);
        break;
    case AAMM_CHANGE_DELETE:
        n = (size_t)snprintf(out, size, "DELETE %s.%s %c(", r->schema, r->name, ch->old_kind);
        n += render_tuple(out + n, size - n, r, &ch->old_tuple);
        snprintf(out + n, size - n, ")");
        break;
    case AAMM_CHANGE_TRUNCATE:
        n = (size_t)snprintf(out, size, "TRUNCATE");
        for (uint32_t i = 0; i < ch->nrelations; i++)
            n += (size_t)snprintf(out + n, size - n, "%s%s", i ? "," : " ", ch->relations[i]->name);
        snprintf(out + n, size - n, " flags=%u", ch->truncate_flags);
        break;
    case AAMM_CHANGE_MESSAGE:
        snprintf(out, size, "MESSAGE %s %s '%.*s'", ch->transactional ? "tx" : "nontx", ch->prefix,
                 (int)ch->content_len, ch->content);
        break;
    }
}

/* Collect the rest of a transaction whose BEGIN was pulled (.. COMMIT) as lines; returns
 * the change count. @txn (may be NULL) gets a copy of the header (clear it). */
static int collect_rest(struct aamm_capture *c, char *out, size_t size,
                        struct aamm_transaction *txn)
{
    struct aamm_capture_event ev;
    size_t n = 0;
    int count = 0, rc;
    out[0] = '\0';
    for (;;) {
        rc = pull_kinds(c, &ev, TXN_KINDS, 30000);
        ck_assert_msg(rc == 1, "transaction cut: %d %s", rc, aamm_capture_errmsg(c));
        ck_assert_int_ne(ev.kind, AAMM_CAPTURE_BEGIN);
        if (ev.kind == AAMM_CAPTURE_COMMIT)
            break;
        ck_assert_ptr_nonnull(ev.txn);
        render_change(out + n, size - n, ev.change);
        n += strlen(out + n);
        n += (size_t)snprintf(out + n, size - n, "\n");
        count++;
    }
    ck_assert_uint_eq(ev.lsn, ev.txn->end_lsn);
    ck_assert_uint_gt(ev.txn->end_lsn, ev.txn->commit_lsn);
    if (txn)
        ck_assert_int_eq(aamm_transaction_copy(txn, ev.txn), 0);
    return count;
}

/* Collect one whole transaction (BEGIN .. COMMIT), as collect_rest(). */
static int collect_txn(struct aamm_capture *c, char *out, size_t size, struct aamm_transaction *txn)
{
    struct aamm_capture_event ev;
    int rc = pull_kinds(c, &ev, TXN_KINDS, 30000);
    ck_assert_msg(rc == 1, "no BEGIN: %d %s", rc, aamm_capture_errmsg(c));
    ck_assert_int_eq(ev.kind, AAMM_CAPTURE_BEGIN);
    return collect_rest(c, out, size, txn);
}

/* Drop a slot once its walsender (of a capture just freed) has gone. */
static void drop_slot(const char *slot)
{
    int64_t until = aamm_test_now_ms() + 15000;
    while (pgfx_value_long(fx, 0, 0,
                           "SELECT count(*) FROM pg_replication_slots "
                           "WHERE slot_name = '%s' AND active",
                           slot) > 0 &&
           aamm_test_now_ms() < until)
        usleep(50 * 1000);
    SQL("SELECT pg_drop_replication_slot('%s')", slot);
}

/* Slot's confirmed_flush_lsn. */
static uint64_t slot_confirmed(const char *slot)
{
    char *v = pgfx_value(fx, 0,
                         "SELECT confirmed_flush_lsn FROM pg_replication_slots "
                         "WHERE slot_name = '%s'",
                         slot);
    uint64_t lsn = 0;
    ck_assert_ptr_nonnull(v);
    ck_assert_int_eq(aamm_lsn_parse(v, &lsn), 0);
    free(v);
    return lsn;
}

static void kill_walsender(const char *slot)
{
    SQL("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
        "WHERE slot_name = '%s' AND active_pid IS NOT NULL",
        slot);
}

/* Until the capture reports ECONN (the walsender was killed). */
static void expect_econn(struct aamm_capture *c)
{
    struct aamm_capture_event ev;
    int rc;
    int64_t deadline = aamm_test_now_ms() + 20000;
    do {
        rc = aamm_capture_wait(c, &ev, 500);
    } while ((rc == 0 || rc == AAMM_EAGAIN) && aamm_test_now_ms() < deadline);
    ck_assert_msg(rc == AAMM_ECONN, "%d: %s", rc, aamm_capture_errmsg(c));
    ck_assert_str_ne(aamm_capture_errmsg(c), "");
}

/* ---- changes ---------------------------------------------------------------------- */

/* Inserts, updates (with and without a key change), deletes arrive value by value; the
 * transaction header carries the node id, xid, commit time and LSNs; REPLICA IDENTITY
 * FULL sends whole old rows; several publications (names needing quotes) stream. */
START_TEST(dml_insert_update_delete)
{
    char buf[4096];
    struct aamm_transaction txn;
    struct aamm_capture *c;
    int64_t now_us;
    /* Two publications, one with an odd name: both are streamed. */
    const char *pubs[2] = {"p_dml", "p \"Dml\" 'two'"};
    struct aamm_capture_options o = {.node_id = 7};
    SQL("CREATE TABLE d1 (id int PRIMARY KEY, v text, n int);"
        "CREATE TABLE dfull (a int, b text); ALTER TABLE dfull REPLICA IDENTITY FULL;"
        "CREATE PUBLICATION p_dml FOR TABLE d1;"
        "CREATE PUBLICATION \"p \"\"Dml\"\" 'two'\" FOR TABLE dfull");
    o.conninfo = pgfx_conninfo(fx, 0);
    o.slot = "s_dml";
    o.publications = pubs;
    o.npublications = 2;
    o.node_id = 7;
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), 0);
    ck_assert_msg(aamm_capture_open(c) == 0, "%s", aamm_capture_errmsg(c));
    now_us = (int64_t)time(NULL) * 1000000;
    SQL("INSERT INTO d1 VALUES (1, 'one', 10), (2, NULL, 20)");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, &txn), 2);
    ck_assert_str_eq(buf, "INSERT public.d1 id='1' v='one' n='10'\n"
                          "INSERT public.d1 id='2' v=NULL n='20'\n");
    ck_assert_uint_eq(txn.origin_node, 7);
    ck_assert_ptr_null(txn.origin_name);
    ck_assert_uint_gt(txn.xid, 0);
    ck_assert_int_lt(llabs(txn.commit_time - now_us), 60 * 1000000LL);
    aamm_transaction_clear(&txn);

    SQL("UPDATE d1 SET v = 'uno' WHERE id = 1");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 1);
    ck_assert_str_eq(buf, "UPDATE public.d1 id='1' v='uno' n='10'\n");
    SQL("UPDATE d1 SET id = 3 WHERE id = 2");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 1);
    ck_assert_str_eq(buf, "UPDATE public.d1 K(id='2' v=NULL n=NULL) id='3' v=NULL n='20'\n");
    SQL("DELETE FROM d1 WHERE id = 1");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 1);
    ck_assert_str_eq(buf, "DELETE public.d1 K(id='1' v=NULL n=NULL)\n");

    SQL("BEGIN; INSERT INTO dfull VALUES (1, 'x'); UPDATE dfull SET b = 'y';"
        "DELETE FROM dfull; COMMIT");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 3);
    ck_assert_str_eq(buf, "INSERT public.dfull a='1' b='x'\n"
                          "UPDATE public.dfull O(a='1' b='x') a='1' b='y'\n"
                          "DELETE public.dfull O(a='1' b='y')\n");
    aamm_capture_free(c);
    drop_slot("s_dml");
}
END_TEST

/* Relations arrive with column names, key flags, replica identity and type names as
 * format_type() prints them. */
START_TEST(relation_metadata)
{
    struct aamm_capture_event ev;
    struct aamm_capture *c;
    const struct aamm_relation *r;
    SQL("CREATE TYPE mood AS ENUM ('ok', 'bad');"
        "CREATE TABLE rm (k1 int, k2 varchar(20), ts timestamptz, m mood, arr int[], "
        "PRIMARY KEY (k1, k2)); CREATE PUBLICATION p_rm FOR TABLE rm");
    c = cap("s_rm", "p_rm", 0);
    SQL("INSERT INTO rm VALUES (1, 'a', now(), 'ok', '{1}')");
    ck_assert_int_eq(pull_kinds(c, &ev, K(RELATION), 30000), 1);
    r = ev.relation;
    ck_assert_str_eq(r->schema, "public");
    ck_assert_str_eq(r->name, "rm");
    ck_assert_int_eq(r->replica_identity, AAMM_REPLIDENT_DEFAULT);
    ck_assert_uint_eq(r->ncolumns, 5);
    ck_assert_str_eq(r->columns[0].name, "k1");
    ck_assert_str_eq(r->columns[0].type_name, "integer");
    ck_assert_uint_eq(r->columns[0].flags, AAMM_COLUMN_KEY);
    ck_assert_str_eq(r->columns[1].type_name, "character varying");
    ck_assert_int_eq(r->columns[1].type_mod, 24);
    ck_assert_uint_eq(r->columns[1].flags, AAMM_COLUMN_KEY);
    ck_assert_str_eq(r->columns[2].type_name, "timestamp with time zone");
    ck_assert_uint_eq(r->columns[2].flags, 0);
    ck_assert_str_eq(r->columns[3].type_name, "mood"); /* user type: queried on the miss */
    ck_assert_str_eq(r->columns[4].type_name, "integer[]");
    ck_assert_int_eq(pull_kinds(c, &ev, K(CHANGE), 30000), 1);
    ck_assert_str_eq(ev.change->relation->columns[3].type_name, "mood");
    aamm_capture_free(c);
    drop_slot("s_rm");
}
END_TEST

/* The catalog connection (type-name lookups) reconnects once when it was dropped: after
 * its backend is terminated, a table using a new user-defined type still streams, with
 * the type's name on the relation and on the change. */
START_TEST(catalog_reconnect)
{
    struct aamm_capture_event ev;
    struct aamm_capture *c;
    const struct aamm_relation *r;
    /* The table and its type come after the start: a schema publication covers them. */
    SQL("CREATE SCHEMA cr; CREATE PUBLICATION p_cr FOR TABLES IN SCHEMA cr");
    c = cap("s_cr", "p_cr", 0);
    /* The catalog backend: the client backend whose last query loaded the type names;
     * pg_terminate_backend(pid, timeout) waits until it has gone. (>= 1: the catalog
     * backend of an earlier test's capture may still be exiting.) */
    ck_assert_int_ge(pgfx_value_long(fx, 0, -1,
                                     "SELECT count(*) FROM (SELECT pid FROM pg_stat_activity "
                                     "WHERE backend_type = 'client backend' "
                                     "AND pid <> pg_backend_pid() AND query LIKE '%%format_type%%' "
                                     "OFFSET 0) b " /* filter first, then terminate */
                                     "WHERE pg_terminate_backend(pid, 10000)"),
                     1);
    SQL("CREATE TYPE cr.color AS ENUM ('red', 'green');"
        "CREATE TABLE cr.t1 (id int PRIMARY KEY, col cr.color)");
    SQL("INSERT INTO cr.t1 VALUES (1, 'green')");
    ck_assert_int_eq(pull_kinds(c, &ev, K(RELATION), 30000), 1);
    r = ev.relation;
    ck_assert_str_eq(r->schema, "cr");
    ck_assert_str_eq(r->name, "t1");
    ck_assert_uint_eq(r->ncolumns, 2);
    ck_assert_str_eq(r->columns[1].type_name, "cr.color");
    ck_assert_int_eq(pull_kinds(c, &ev, K(CHANGE), 30000), 1);
    ck_assert_str_eq(ev.change->relation->columns[1].type_name, "cr.color");
    ck_assert_str_eq(ev.change->new_tuple.values[1].data, "green");
    /* The new catalog connection is there. */
    ck_assert_int_eq(
        pgfx_value_long(fx, 0, -1,
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE backend_type = 'client backend' "
                        "AND pid <> pg_backend_pid() AND query LIKE '%%format_type%%'"),
        1);
    aamm_capture_free(c);
    SQL("DROP PUBLICATION p_cr");
    drop_slot("s_cr");
}
END_TEST

/* An out-of-line TOAST value left alone by an update arrives as UNCHANGED, never as NULL
 * or a value. */
START_TEST(toast_unchanged)
{
    char buf[4096];
    struct aamm_capture *c;
    SQL("CREATE TABLE tt (id int PRIMARY KEY, big text, n int);"
        "ALTER TABLE tt ALTER COLUMN big SET STORAGE EXTERNAL;"
        "CREATE PUBLICATION p_tt FOR TABLE tt");
    c = cap("s_tt", "p_tt", 0);
    SQL("INSERT INTO tt VALUES (1, repeat('x', 5000), 1)");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 1);
    ck_assert_str_eq(buf, "INSERT public.tt id='1' big=<5000 bytes> n='1'\n");
    SQL("UPDATE tt SET n = 2 WHERE id = 1");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 1);
    ck_assert_str_eq(buf, "UPDATE public.tt id='1' big=<unchanged> n='2'\n");
    aamm_capture_free(c);
    drop_slot("s_tt");
}
END_TEST

/* TRUNCATE of several tables arrives as one change with every relation and its flags. */
START_TEST(truncate_several)
{
    char buf[4096];
    struct aamm_capture *c;
    SQL("CREATE TABLE ta (id serial PRIMARY KEY); CREATE TABLE tb (id int PRIMARY KEY);"
        "CREATE TABLE tc (id int PRIMARY KEY, a int REFERENCES ta(id));"
        "CREATE PUBLICATION p_tr FOR TABLE ta, tb, tc");
    c = cap("s_tr", "p_tr", 0);
    SQL("INSERT INTO ta DEFAULT VALUES; INSERT INTO tb VALUES (1); INSERT INTO tc VALUES (1, 1)");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 3);
    ck_assert_str_eq(buf, "INSERT public.ta id='1'\nINSERT public.tb id='1'\n"
                          "INSERT public.tc id='1' a='1'\n");
    SQL("TRUNCATE ta, tb RESTART IDENTITY CASCADE");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 1);
    ck_assert_str_eq(buf, "TRUNCATE ta,tb,tc flags=3\n");
    SQL("TRUNCATE tb");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 1);
    ck_assert_str_eq(buf, "TRUNCATE tb flags=0\n");
    aamm_capture_free(c);
    drop_slot("s_tr");
}
END_TEST

/* Logical messages: a transactional one inside its transaction, in order; a
 * non-transactional one on its own, outside any transaction. */
START_TEST(logical_messages)
{
    char buf[4096];
    struct aamm_capture_event ev;
    struct aamm_capture *c;
    SQL("CREATE TABLE lm (id int PRIMARY KEY); CREATE PUBLICATION p_lm FOR TABLE lm");
    c = cap("s_lm", "p_lm", 0);
    SQL("BEGIN; INSERT INTO lm VALUES (1);"
        "SELECT pg_logical_emit_message(true, 'aamm_ddl', 'CREATE TABLE x()');"
        "INSERT INTO lm VALUES (2); COMMIT");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 3);
    ck_assert_str_eq(buf, "INSERT public.lm id='1'\n"
                          "MESSAGE tx aamm_ddl 'CREATE TABLE x()'\n"
                          "INSERT public.lm id='2'\n");
    SQL("SELECT pg_logical_emit_message(false, 'hello', 'world')");
    ck_assert_int_eq(pull_kinds(c, &ev, TXN_KINDS, 30000), 1);
    ck_assert_int_eq(ev.kind, AAMM_CAPTURE_CHANGE);
    ck_assert_ptr_null(ev.txn);
    render_change(buf, sizeof buf, ev.change);
    ck_assert_str_eq(buf, "MESSAGE nontx hello 'world'");
    ck_assert_uint_gt(ev.change->message_lsn, 0);
    aamm_capture_free(c);
    drop_slot("s_lm");
}
END_TEST

/* Data types arrive in the pinned text formats (ISO dates in UTC, hex bytea, exact
 * floats, postgres intervals), even with other defaults on the server, value by value. */
START_TEST(data_types)
{
    static const char *const expect[][2] = {
        {"i", "42"},
        {"bi", "9007199254740993"},
        {"num", "12345.678900"},
        {"t", "h\xc3\xa9llo 'q' \"d\""},
        {"ba", "\\x00ff10"},
        {"js", "{\"b\": [1, 2],  \"a\": null}"},
        {"jb", "{\"a\": null, \"b\": [1, 2]}"},
        {"ia", "{1,2,NULL}"},
        {"ta", "{a,\"b c\",\"\"}"},
        {"tz", "2026-01-02 01:04:05.123456+00"},
        {"d", "2026-01-02"},
        {"iv", "1 day 02:00:00"},
        {"u", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"},
        {"b", "t"},
        {"f8", "0.1"},
        {"f8b", "0.3333333333333333"},
        {"nul", NULL},
    };
    struct aamm_capture_event ev;
    struct aamm_capture *c;
    const struct aamm_tuple *t;
    SQL("ALTER DATABASE postgres SET DateStyle = 'SQL, DMY';"
        "ALTER DATABASE postgres SET TimeZone = 'America/New_York';"
        "ALTER DATABASE postgres SET bytea_output = 'escape';"
        "ALTER DATABASE postgres SET extra_float_digits = -3;"
        "ALTER DATABASE postgres SET IntervalStyle = 'sql_standard'");
    SQL("CREATE TABLE dt (i int PRIMARY KEY, bi bigint, num numeric(12,6), t text, ba bytea, "
        "js json, jb jsonb, ia int[], ta text[], tz timestamptz, d date, iv interval, u uuid, "
        "b bool, f8 float8, f8b float8, nul text); CREATE PUBLICATION p_dt FOR TABLE dt");
    c = cap("s_dt", "p_dt", 0);
    SQL("INSERT INTO dt VALUES (42, 9007199254740993, 12345.6789, 'h\xc3\xa9llo ''q'' \"d\"', "
        "'\\x00ff10', '{\"b\": [1, 2],  \"a\": null}', '{\"b\": [1, 2], \"a\": null}', "
        "'{1,2,NULL}', '{a,\"b c\",\"\"}', '2026-01-02 03:04:05.123456+02', '2026-01-02', "
        "'1 day 2 hours', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', true, 0.1, 1.0/3, NULL)");
    ck_assert_int_eq(pull_kinds(c, &ev, K(CHANGE), 30000), 1);
    t = &ev.change->new_tuple;
    ck_assert_uint_eq(t->nvalues, sizeof expect / sizeof expect[0]);
    for (size_t i = 0; i < sizeof expect / sizeof expect[0]; i++) {
        ck_assert_str_eq(ev.change->relation->columns[i].name, expect[i][0]);
        if (expect[i][1] == NULL) {
            ck_assert_int_eq(t->values[i].kind, AAMM_VALUE_NULL);
            ck_assert_ptr_null(t->values[i].data);
        } else {
            ck_assert_int_eq(t->values[i].kind, AAMM_VALUE_TEXT);
            ck_assert_str_eq(t->values[i].data, expect[i][1]);
            ck_assert_uint_eq(t->values[i].len, strlen(expect[i][1]));
        }
    }
    aamm_capture_free(c);
    SQL("ALTER DATABASE postgres RESET ALL");
    drop_slot("s_dt");
}
END_TEST

/* Transactions applied under an aamm_ origin are skipped (and passed as PROGRESS); those
 * under another origin (a native subscription) and local ones are delivered. */
START_TEST(origins_filtered)
{
    char buf[4096];
    struct aamm_transaction txn;
    struct aamm_capture_event ev;
    struct aamm_capture *c;
    uint64_t local_end;
    SQL("CREATE TABLE og (id int PRIMARY KEY); CREATE PUBLICATION p_og FOR TABLE og;"
        "SELECT pg_replication_origin_create('aamm_from_9');"
        "SELECT pg_replication_origin_create('sub_native')");
    c = cap("s_og", "p_og", 0);
    SQL("INSERT INTO og VALUES (1)");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, &txn), 1);
    local_end = txn.end_lsn;
    aamm_transaction_clear(&txn);
    SQL("SELECT pg_replication_origin_session_setup('aamm_from_9');"
        "BEGIN; SELECT pg_replication_origin_xact_setup('0/AB00', now());"
        "INSERT INTO og VALUES (2); COMMIT;"
        "SELECT pg_replication_origin_session_reset()");
    SQL("SELECT pg_replication_origin_session_setup('sub_native');"
        "BEGIN; SELECT pg_replication_origin_xact_setup('0/CD00', now());"
        "INSERT INTO og VALUES (3); COMMIT;"
        "SELECT pg_replication_origin_session_reset()");
    SQL("INSERT INTO og VALUES (4)");
    /* The replicated transaction becomes a position only. */
    ck_assert_int_eq(pull_kinds(c, &ev, TXN_KINDS | K(PROGRESS), 30000), 1);
    if (ev.kind == AAMM_CAPTURE_PROGRESS) {
        ck_assert_uint_gt(ev.lsn, local_end);
        ck_assert_int_eq(aamm_capture_confirm(c, ev.lsn), 0);
        ck_assert_int_eq(pull_kinds(c, &ev, TXN_KINDS, 30000), 1);
    }
    ck_assert_int_eq(ev.kind, AAMM_CAPTURE_BEGIN);
    ck_assert_int_eq(collect_rest(c, buf, sizeof buf, &txn), 1);
    ck_assert_str_eq(buf, "INSERT public.og id='3'\n");
    ck_assert_str_eq(txn.origin_name, "sub_native");
    ck_assert_uint_eq(txn.origin_lsn, 0xCD00);
    aamm_transaction_clear(&txn);
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, &txn), 1);
    ck_assert_str_eq(buf, "INSERT public.og id='4'\n");
    ck_assert_ptr_null(txn.origin_name);
    aamm_transaction_clear(&txn);
    {
        struct aamm_capture_stats st;
        aamm_capture_stats(c, &st);
        ck_assert_uint_eq(st.txns_skipped, 1);
        ck_assert_uint_eq(st.txns_delivered, 3);
    }
    /* A replicated transaction alone: a PROGRESS past it comes once the stream is idle. */
    SQL("SELECT pg_replication_origin_session_setup('aamm_from_9');"
        "BEGIN; SELECT pg_replication_origin_xact_setup('0/AC00', now());"
        "INSERT INTO og VALUES (5); COMMIT;"
        "SELECT pg_replication_origin_session_reset()");
    ck_assert_int_eq(pull_kinds(c, &ev, TXN_KINDS | K(PROGRESS), 30000), 1);
    ck_assert_int_eq(ev.kind, AAMM_CAPTURE_PROGRESS);
    ck_assert_int_eq(aamm_capture_confirm(c, ev.lsn), 0);
    ck_assert_int_eq(aamm_capture_confirm(c, ev.lsn + 1000), AAMM_EINVAL);
    /* A relation first described inside a skipped transaction is still handed to the
     * host, before the first delivered change that uses it. */
    SQL("CREATE TABLE og2 (k text PRIMARY KEY); ALTER PUBLICATION p_og ADD TABLE og2");
    SQL("SELECT pg_replication_origin_session_setup('aamm_from_9');"
        "BEGIN; SELECT pg_replication_origin_xact_setup('0/AD00', now());"
        "INSERT INTO og2 VALUES ('r'); COMMIT;"
        "SELECT pg_replication_origin_session_reset()");
    SQL("INSERT INTO og2 VALUES ('l')");
    ck_assert_int_eq(pull_kinds(c, &ev, K(BEGIN), 30000), 1);
    ck_assert_int_eq(pull_kinds(c, &ev, TXN_KINDS | K(RELATION), 30000), 1);
    ck_assert_int_eq(ev.kind, AAMM_CAPTURE_RELATION);
    ck_assert_str_eq(ev.relation->name, "og2");
    ck_assert_str_eq(ev.relation->columns[0].type_name, "text");
    ck_assert_int_eq(collect_rest(c, buf, sizeof buf, NULL), 1);
    ck_assert_str_eq(buf, "INSERT public.og2 k='l'\n");
    aamm_capture_free(c);
    drop_slot("s_og");
}
END_TEST

/* ADD / DROP / RENAME COLUMN between transactions re-send the relation; the cache follows.
 * A partitioned table published via its root arrives under the root's name. */
START_TEST(relation_changes_and_partitions)
{
    char buf[4096];
    struct aamm_capture_event ev;
    struct aamm_capture *c;
    uint32_t gen;
    SQL("CREATE TABLE rc (id int PRIMARY KEY, a text);"
        "CREATE TABLE pt (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST "
        "(region);"
        "CREATE TABLE pt_eu PARTITION OF pt FOR VALUES IN ('eu');"
        "CREATE TABLE pt_us PARTITION OF pt FOR VALUES IN ('us');"
        "CREATE PUBLICATION p_rc FOR TABLE rc, pt WITH (publish_via_partition_root = true)");
    c = cap("s_rc", "p_rc", 0);
    SQL("INSERT INTO rc VALUES (1, 'x')");
    ck_assert_int_eq(pull_kinds(c, &ev, K(RELATION), 30000), 1);
    gen = ev.relation->generation;
    ck_assert_int_eq(collect_rest(c, buf, sizeof buf, NULL), 1);
    ck_assert_str_eq(buf, "INSERT public.rc id='1' a='x'\n");
    SQL("ALTER TABLE rc ADD COLUMN b int DEFAULT 5");
    SQL("INSERT INTO rc VALUES (2, 'y', 6)");
    ck_assert_int_eq(pull_kinds(c, &ev, K(RELATION), 30000), 1);
    ck_assert_uint_gt(ev.relation->generation, gen);
    ck_assert_uint_eq(ev.relation->ncolumns, 3);
    ck_assert_str_eq(ev.relation->columns[2].type_name, "integer");
    ck_assert_int_eq(collect_rest(c, buf, sizeof buf, NULL), 1);
    ck_assert_str_eq(buf, "INSERT public.rc id='2' a='y' b='6'\n");
    SQL("ALTER TABLE rc RENAME COLUMN a TO aa; ALTER TABLE rc DROP COLUMN b");
    SQL("UPDATE rc SET aa = 'z' WHERE id = 2");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 1);
    ck_assert_str_eq(buf, "UPDATE public.rc id='2' aa='z'\n");

    SQL("INSERT INTO pt VALUES (1, 'eu'), (2, 'us')");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 2);
    ck_assert_str_eq(buf, "INSERT public.pt id='1' region='eu'\n"
                          "INSERT public.pt id='2' region='us'\n");
    SQL("UPDATE pt SET id = 3 WHERE id = 1");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 1);
    ck_assert_str_eq(buf, "UPDATE public.pt K(id='1' region='eu') id='3' region='eu'\n");
    aamm_capture_free(c);
    drop_slot("s_rc");
}
END_TEST

/* Setup is non-blocking: while slot creation waits for a running transaction, every step
 * returns at once and the host loop keeps turning; the setup deadline gives ETIMEDOUT;
 * once the transaction ends, setup finishes and the stream runs. */
START_TEST(nonblocking_setup)
{
    const char *pubs[1] = {"p_nb"};
    struct aamm_capture_options o = {.node_id = 7};
    struct aamm_capture_event ev;
    struct aamm_capture *c;
    PGconn *holder;
    char buf[4096];
    int steps = 0, fds_seen = 0, last_fd = -1;
    int64_t slowest = 0, until;
    SQL("CREATE TABLE nb (id int PRIMARY KEY); CREATE PUBLICATION p_nb FOR TABLE nb");
    holder = pgfx_connect(fx, 0);
    ck_assert_ptr_nonnull(holder);
    ck_assert_int_eq(pgfx_exec_conn(holder, "BEGIN; INSERT INTO nb VALUES (-1)"), 0);
    o.conninfo = pgfx_conninfo(fx, 0);
    o.slot = "s_nb";
    o.publications = pubs;
    o.npublications = 1;

    /* A short deadline: the slot cannot be created while the transaction runs. */
    o.setup_timeout_ms = 700;
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_capture_open(c), AAMM_ETIMEDOUT);
    ck_assert_ptr_nonnull(strstr(aamm_capture_errmsg(c), "creating the slot"));
    aamm_capture_free(c);
    /* The timed-out creation was cancelled: no slot is left behind. */
    until = aamm_test_now_ms() + 10000;
    while (pgfx_value_long(fx, 0, 1,
                           "SELECT count(*) FROM pg_stat_activity "
                           "WHERE query LIKE '%%pg_create_logical_replication_slot%%' "
                           "AND pid <> pg_backend_pid()") > 0 &&
           aamm_test_now_ms() < until)
        usleep(50 * 1000);
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1,
                                     "SELECT count(*) FROM pg_replication_slots "
                                     "WHERE slot_name = 's_nb'"),
                     0);

    o.setup_timeout_ms = 0;
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_capture_start(c), 0);
    until = aamm_test_now_ms() + 1500;
    while (aamm_test_now_ms() < until) {
        struct pollfd pfd = {aamm_capture_fd(c), 0, 0};
        int e = aamm_capture_events(c), t = aamm_capture_timeout(c);
        int64_t t0;
        ck_assert_int_ge(pfd.fd, 0);
        if (pfd.fd != last_fd) {
            fds_seen++;
            last_fd = pfd.fd;
        }
        ck_assert_int_gt(t, 0); /* the setup deadline, not "now" */
        pfd.events = (short)(((e & AAMM_READ) ? POLLIN : 0) |
                             ((e & AAMM_WRITE) ? POLLOUT : 0));
        poll(&pfd, 1, 100);
        t0 = aamm_test_now_ms();
        ck_assert_int_eq(aamm_capture_step(c), 0);
        if (aamm_test_now_ms() - t0 > slowest)
            slowest = aamm_test_now_ms() - t0;
        ck_assert_int_eq(aamm_capture_next(c, &ev), AAMM_EAGAIN);
        steps++;
    }
    ck_assert_int_lt(slowest, 300);
    ck_assert_int_ge(steps, 10);
    ck_assert_int_eq(aamm_capture_confirm(c, 1), AAMM_ESTATE);
    ck_assert_int_eq(pgfx_exec_conn(holder, "COMMIT"), 0);
    PQfinish(holder);
    SQL("INSERT INTO nb VALUES (1)");
    /* wait() drives the rest of the setup, then the stream. */
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 1);
    ck_assert_str_eq(buf, "INSERT public.nb id='1'\n");
    ck_assert_int_ne(aamm_capture_fd(c), -1);
    ck_assert_int_ge(fds_seen, 1);
    aamm_capture_free(c);
    drop_slot("s_nb");
}
END_TEST

/* ---- connection loss and positions ------------------------------------------------ */

/* The walsender is terminated mid-stream; the host reopens from what it confirmed: every
 * transaction arrives, and none at or below the confirmed position arrives twice. */
START_TEST(resume_after_walsender_killed)
{
    const int ntx = 40;
    char buf[4096];
    int seen[41] = {0};
    struct aamm_transaction txn;
    struct aamm_capture *c;
    uint64_t confirmed = 0, start;
    SQL("CREATE TABLE rs (id int PRIMARY KEY); CREATE PUBLICATION p_rs FOR TABLE rs");
    c = cap("s_rs", "p_rs", 0);
    start = aamm_capture_start_position(c);
    for (int i = 1; i <= ntx; i++)
        SQL("INSERT INTO rs VALUES (%d)", i);
    for (int i = 1; i <= 15; i++) {
        int id;
        ck_assert_int_eq(collect_txn(c, buf, sizeof buf, &txn), 1);
        ck_assert_int_eq(sscanf(buf, "INSERT public.rs id='%d'", &id), 1);
        seen[id]++;
        if (i <= 10) {
            ck_assert_int_eq(aamm_capture_confirm(c, txn.end_lsn), 0);
            confirmed = txn.end_lsn;
        }
        aamm_transaction_clear(&txn);
    }
    ck_assert_uint_gt(confirmed, start);
    kill_walsender("s_rs");
    expect_econn(c);
    aamm_capture_free(c);

    /* Resume from the host's durable position: 11..15 again, then the rest, once. */
    c = cap("s_rs", "p_rs", confirmed);
    ck_assert_uint_eq(aamm_capture_start_position(c), confirmed);
    for (int i = 11; i <= ntx; i++) {
        int id;
        ck_assert_int_eq(collect_txn(c, buf, sizeof buf, &txn), 1);
        ck_assert_uint_gt(txn.end_lsn, confirmed);
        ck_assert_int_eq(sscanf(buf, "INSERT public.rs id='%d'", &id), 1);
        ck_assert_int_eq(id, i);
        seen[id]++;
        aamm_transaction_clear(&txn);
    }
    for (int i = 1; i <= ntx; i++)
        ck_assert_int_eq(seen[i], i <= 10 ? 1 : i <= 15 ? 2 : 1);
    aamm_capture_free(c);
    drop_slot("s_rs");
}
END_TEST

/* Transactions received but never confirmed: keepalives pass (the server's position moves
 * on) but the slot does not move past them; after the walsender is killed, every one is
 * delivered again. */
START_TEST(unconfirmed_redelivered)
{
    char buf[4096];
    struct aamm_capture_event ev;
    struct aamm_capture *c;
    struct aamm_capture_stats st;
    uint64_t created;
    SQL("CREATE TABLE un (id int PRIMARY KEY); CREATE PUBLICATION p_un FOR TABLE un");
    c = cap("s_un", "p_un", 0);
    created = slot_confirmed("s_un");
    for (int i = 1; i <= 5; i++)
        SQL("INSERT INTO un VALUES (%d)", i);
    for (int i = 1; i <= 5; i++)
        ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 1);
    /* Unrelated WAL, then 3 s (wal_sender_timeout is 2 s): keepalives arrive and are
     * answered, PROGRESS events are not confirmed. */
    SQL("CREATE TABLE other_un (a int); INSERT INTO other_un VALUES (1)");
    {
        int64_t until = aamm_test_now_ms() + 3000;
        while (aamm_test_now_ms() < until) {
            int rc = aamm_capture_wait(c, &ev, 200);
            ck_assert(rc == 0 || rc == AAMM_EAGAIN);
            if (rc == 0)
                ck_assert_int_eq(ev.kind, AAMM_CAPTURE_PROGRESS);
        }
    }
    aamm_capture_stats(c, &st);
    ck_assert_uint_gt(st.keepalives, 0);
    ck_assert_uint_gt(st.status_updates, 0);
    ck_assert_uint_eq(slot_confirmed("s_un"), created);
    kill_walsender("s_un");
    expect_econn(c);
    aamm_capture_free(c);
    c = cap("s_un", "p_un", 0);
    for (int i = 1; i <= 5; i++) {
        char want[64];
        ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 1);
        snprintf(want, sizeof want, "INSERT public.un id='%d'\n", i);
        ck_assert_str_eq(buf, want);
    }
    aamm_capture_free(c);
    drop_slot("s_un");
}
END_TEST

/* A server restart is reported as ECONN; reopened from the host's durable position the
 * stream goes on with nothing lost and nothing at or below that position again. */
START_TEST(resume_after_server_restart)
{
    char buf[4096];
    struct aamm_transaction txn;
    struct aamm_capture *c;
    uint64_t confirmed;
    SQL("CREATE TABLE rr (id int PRIMARY KEY); CREATE PUBLICATION p_rr FOR TABLE rr");
    c = cap("s_rr", "p_rr", 0);
    for (int i = 1; i <= 3; i++)
        SQL("INSERT INTO rr VALUES (%d)", i);
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, &txn), 1);
    ck_assert_int_eq(aamm_capture_confirm(c, txn.end_lsn), 0);
    ck_assert_int_eq(aamm_capture_send_status(c), 0);
    confirmed = txn.end_lsn;
    aamm_transaction_clear(&txn);
    /* Restart before asserting anything, so a failure here leaves the cluster up. */
    ck_assert_int_eq(pgfx_stop_node(fx, 0, "fast") | pgfx_start_node(fx, 0), 0);
    expect_econn(c);
    fprintf(stderr, "after restart: %s\n", aamm_capture_errmsg(c));
    aamm_capture_free(c);
    SQL("INSERT INTO rr VALUES (4)");
    c = cap("s_rr", "p_rr", confirmed);
    for (int i = 2; i <= 4; i++) {
        char want[64];
        ck_assert_int_eq(collect_txn(c, buf, sizeof buf, &txn), 1);
        ck_assert_uint_gt(txn.end_lsn, confirmed);
        snprintf(want, sizeof want, "INSERT public.rr id='%d'\n", i);
        ck_assert_str_eq(buf, want);
        aamm_transaction_clear(&txn);
    }
    aamm_capture_free(c);
    drop_slot("s_rr");
}
END_TEST

/* Skipping a big replicated transaction is bounded work per call: next() stops on its
 * budget (returning 0 with timeout 0) instead of decoding everything in one call. */
START_TEST(skipping_is_bounded)
{
    const char *pubs[1] = {"p_sb"};
    struct aamm_capture_options o = {.node_id = 7};
    struct aamm_capture_event ev;
    struct aamm_capture *c;
    char buf[4096];
    int budget_stops = 0;
    SQL("CREATE TABLE sb (id int PRIMARY KEY); CREATE PUBLICATION p_sb FOR TABLE sb;"
        "SELECT pg_replication_origin_create('aamm_from_3')");
    o.conninfo = pgfx_conninfo(fx, 0);
    o.slot = "s_sb";
    o.publications = pubs;
    o.npublications = 1;
    o.step_budget = 50;
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_capture_open(c), 0);
    SQL("SELECT pg_replication_origin_session_setup('aamm_from_3');"
        "BEGIN; SELECT pg_replication_origin_xact_setup('0/AB00', now());"
        "INSERT INTO sb SELECT generate_series(1, 20000); COMMIT;"
        "SELECT pg_replication_origin_session_reset()");
    SQL("INSERT INTO sb VALUES (0)");
    /* Let the walsender fill the socket while we do not read, so the first steps hand
     * next() far more buffered messages than its budget (on a loaded machine they would
     * otherwise trickle in a few at a time and the budget would never be reached). */
    usleep(1500 * 1000);
    for (;;) {
        int rc = aamm_capture_next(c, &ev);
        ck_assert(rc == 0 || rc == AAMM_EAGAIN);
        if (rc == 0 && ev.kind == AAMM_CAPTURE_BEGIN)
            break;
        if (rc == AAMM_EAGAIN) {
            struct pollfd pfd = {aamm_capture_fd(c), POLLIN, 0};
            if (aamm_capture_timeout(c) == 0)
                budget_stops++;
            else
                poll(&pfd, 1, 1000);
            ck_assert_int_eq(aamm_capture_step(c), 0);
        }
    }
    ck_assert_int_ge(budget_stops, 1);
    ck_assert_int_eq(collect_rest(c, buf, sizeof buf, NULL), 1);
    ck_assert_str_eq(buf, "INSERT public.sb id='0'\n");
    aamm_capture_free(c);
    drop_slot("s_sb");
}
END_TEST

/* A host that stops pulling events for 3.5 x wal_sender_timeout keeps its connection:
 * capture goes on sending status updates while it does not read. */
START_TEST(paused_host_keeps_connection)
{
    const long rows = 100000; /* ~10 MB of stream: the walsender blocks on the socket */
    char buf[4096];
    struct aamm_capture_event ev;
    struct aamm_capture *c;
    struct aamm_capture_stats before, after;
    long got = 0;
    SQL("CREATE TABLE pz (id int PRIMARY KEY, pad text); CREATE PUBLICATION p_pz FOR TABLE pz");
    c = cap("s_pz", "p_pz", 0);
    aamm_capture_free(c); /* the slot exists; write while no capture needs stepping */
    SQL("INSERT INTO pz SELECT g, repeat('p', 80) FROM generate_series(1, %ld) g", rows);
    c = cap("s_pz", "p_pz", 0);
    ck_assert_int_eq(pull_kinds(c, &ev, K(BEGIN), 30000), 1);
    ck_assert_int_eq(pull_kinds(c, &ev, K(CHANGE), 30000), 1);
    got = 1;
    aamm_capture_stats(c, &before);
    {
        /* Paused for 3.5 x wal_sender_timeout: the host polls and steps, never pulls. */
        int64_t until = aamm_test_now_ms() + 7000;
        while (aamm_test_now_ms() < until) {
            struct pollfd pfd = {aamm_capture_fd(c), 0, 0};
            int ev_bits = aamm_capture_events(c), t = aamm_capture_timeout(c);
            ck_assert_int_eq(ev_bits & AAMM_READ, 0); /* not reading */
            pfd.events = (ev_bits & AAMM_WRITE) ? POLLOUT : 0;
            ck_assert_int_ge(t, 0);
            poll(&pfd, 1, t > 500 ? 500 : t);
            ck_assert_int_eq(aamm_capture_step(c), 0);
        }
    }
    aamm_capture_stats(c, &after);
    ck_assert_uint_ge(after.status_updates - before.status_updates, 7);
    ck_assert_uint_eq(after.bytes_received, before.bytes_received); /* nothing read */
    for (;;) {
        int rc = pull_kinds(c, &ev, K(CHANGE) | K(COMMIT), 30000);
        ck_assert_msg(rc == 1, "%d %s", rc, aamm_capture_errmsg(c));
        if (ev.kind == AAMM_CAPTURE_COMMIT)
            break;
        got++;
    }
    ck_assert_int_eq(got, rows);
    SQL("INSERT INTO pz VALUES (0, 'x')");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, NULL), 1);
    ck_assert_str_eq(buf, "INSERT public.pz id='0' pad='x'\n");
    aamm_capture_free(c);
    drop_slot("s_pz");
}
END_TEST

/* A 1,000,000-row transaction streams through with the library's memory bounded: the
 * allocator's high-water mark stays below 1 MB. */
START_TEST(huge_transaction_bounded_memory)
{
    long rows = aamm_test_scaled(1000000, 20000), got = 0;
    struct aamm_capture_event ev;
    struct aamm_memory_stats ms;
    struct aamm_capture *c;
    size_t base;
    SQL("CREATE TABLE big (id int PRIMARY KEY, v text); CREATE PUBLICATION p_big FOR TABLE big");
    /* Create the slot, then write with no capture open: this test's host thread blocks
     * in the INSERT for longer than wal_sender_timeout (2 s) and could not step. */
    c = cap("s_big", "p_big", 0);
    aamm_capture_free(c);
    SQL("INSERT INTO big SELECT g, 'row number ' || g FROM generate_series(1, %ld) g", rows);
    c = cap("s_big", "p_big", 0);
    aamm_memory_stats(&ms);
    base = ms.in_use;
    aamm_memory_reset_high_water();
    ck_assert_int_eq(pull_kinds(c, &ev, K(BEGIN), 60000), 1);
    for (;;) {
        int rc = pull_kinds(c, &ev, K(CHANGE) | K(COMMIT), 60000);
        ck_assert_msg(rc == 1, "%d %s", rc, aamm_capture_errmsg(c));
        if (ev.kind == AAMM_CAPTURE_COMMIT)
            break;
        got++;
        if (got == 1 || got == rows) {
            char want[64];
            snprintf(want, sizeof want, "%ld", got);
            ck_assert_str_eq(ev.change->new_tuple.values[0].data, want);
        }
    }
    ck_assert_int_eq(got, rows);
    aamm_memory_stats(&ms);
    ck_assert_msg(ms.high_water - base < 1024 * 1024, "high water %zu over base %zu", ms.high_water,
                  base);
    aamm_capture_free(c);
    drop_slot("s_big");
}
END_TEST

/* The example program prints the stream one readable line per change and confirms what
 * it printed: a second run starts after it. */
START_TEST(example_recvlogical_prints_stream)
{
    char cmd[1024], out[4096] = "";
    size_t n = 0;
    FILE *p;
    struct aamm_capture *c;
    const char *top = getenv("AAMM_TOP_BUILDDIR");
    SQL("CREATE TABLE rentals (id int PRIMARY KEY, bike_id int, note text);"
        "CREATE PUBLICATION p_ex FOR TABLE rentals");
    c = cap("s_ex", "p_ex", 0); /* creates the slot */
    aamm_capture_free(c);
    SQL("INSERT INTO rentals VALUES (1, 7, 'first'), (2, 8, NULL)");
    SQL("UPDATE rentals SET id = 3 WHERE id = 2");
    SQL("DELETE FROM rentals WHERE id = 1");
    snprintf(cmd, sizeof cmd, "%s/examples/aamm_recvlogical -d '%s' -S s_ex -P p_ex -n 2 -t 20",
             top ? top : ".", pgfx_conninfo(fx, 0));
    p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    while (n < sizeof out - 1 && fgets(out + n, (int)(sizeof out - n), p) != NULL)
        n += strlen(out + n);
    ck_assert_int_eq(pclose(p), 0);
    ck_assert_msg(strncmp(out, "BEGIN ", 6) == 0, "%s", out);
    ck_assert_ptr_nonnull(strstr(out, "\nINSERT public.rentals (id=1, bike_id=7, note=first)\n"
                                      "INSERT public.rentals (id=2, bike_id=8, note=NULL)\n"
                                      "COMMIT "));
    ck_assert_ptr_nonnull(strstr(
        out, "\nUPDATE public.rentals (id=3, bike_id=8, note=NULL) key was (id=2)\nCOMMIT "));
    ck_assert_ptr_null(strstr(out, "DELETE"));
    /* The first two transactions were confirmed: the next run sees only the third. */
    snprintf(cmd, sizeof cmd, "%s/examples/aamm_recvlogical -d '%s' -S s_ex -P p_ex -n 1 -t 20",
             top ? top : ".", pgfx_conninfo(fx, 0));
    for (int i = 0; i < 100; i++) { /* the first run's walsender may linger a moment */
        if (pgfx_value_long(fx, 0, 1,
                            "SELECT count(*) FROM pg_replication_slots "
                            "WHERE slot_name = 's_ex' AND active") == 0)
            break;
        usleep(50 * 1000);
    }
    p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    n = 0;
    while (n < sizeof out - 1 && fgets(out + n, (int)(sizeof out - n), p) != NULL)
        n += strlen(out + n);
    ck_assert_int_eq(pclose(p), 0);
    ck_assert_ptr_nonnull(strstr(out, "\nDELETE public.rentals (id=1)\nCOMMIT "));
    ck_assert_ptr_null(strstr(out, "INSERT"));
    drop_slot("s_ex");
}
END_TEST

/* ---- refusals ---------------------------------------------------------------------- */

/* A slot that is gone while the host has progress from it is an error, never
 * re-created; the gap check refuses a start the slot has already passed; a missing
 * publication and a table without key are refused, naming them. */
START_TEST(refusals)
{
    char buf[4096];
    struct aamm_transaction txn;
    struct aamm_capture *c;
    uint64_t first;
    int rc;
    SQL("CREATE TABLE rf (id int PRIMARY KEY); CREATE PUBLICATION p_rf FOR TABLE rf;"
        "CREATE TABLE nokey (a int); CREATE PUBLICATION p_nokey FOR TABLE rf, nokey");
    rc = cap_open(&c, "s_missing", "p_rf", 0x1000000);
    ck_assert_int_eq(rc, AAMM_ENOTFOUND);
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1,
                                     "SELECT count(*) FROM pg_replication_slots "
                                     "WHERE slot_name = 's_missing'"),
                     0);

    rc = cap_open(&c, "s_rf", "p_nosuch", 0);
    ck_assert_int_eq(rc, AAMM_ENOTFOUND);
    rc = cap_open(&c, "s_rf", "p_nokey", 0);
    ck_assert_int_eq(rc, AAMM_EINVAL);

    /* Gap: confirm two transactions, then ask to start before them. */
    c = cap("s_rf", "p_rf", 0);
    SQL("INSERT INTO rf VALUES (1)");
    SQL("INSERT INTO rf VALUES (2)");
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, &txn), 1);
    first = txn.end_lsn;
    aamm_transaction_clear(&txn);
    ck_assert_int_eq(collect_txn(c, buf, sizeof buf, &txn), 1);
    ck_assert_int_eq(aamm_capture_confirm(c, txn.end_lsn), 0);
    aamm_transaction_clear(&txn);
    {
        struct aamm_capture_event ev;
        int64_t until = aamm_test_now_ms() + 2000;
        while (slot_confirmed("s_rf") < first + 1 && aamm_test_now_ms() < until) {
            int wrc = aamm_capture_wait(c, &ev, 100);
            ck_assert(wrc == 0 || wrc == AAMM_EAGAIN);
        }
    }
    aamm_capture_free(c);
    rc = cap_open(&c, "s_rf", "p_rf", first);
    ck_assert_int_eq(rc, AAMM_EGAP);
    drop_slot("s_rf");
}
END_TEST

/* The error messages name what to change. */
START_TEST(refusal_messages)
{
    const char *pubs[1] = {"p_nosuch"};
    struct aamm_capture_options o = {.node_id = 7};
    struct aamm_capture *c;
    o.conninfo = pgfx_conninfo(fx, 0);
    o.slot = "s_msg";
    o.publications = pubs;
    o.npublications = 1;
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_capture_open(c), AAMM_ENOTFOUND);
    ck_assert_ptr_nonnull(strstr(aamm_capture_errmsg(c), "publication \"p_nosuch\""));
    /* Sticky: the failed capture keeps saying why. */
    ck_assert_int_eq(aamm_capture_next(c, &(struct aamm_capture_event){0}), AAMM_ENOTFOUND);
    ck_assert_int_eq(aamm_capture_step(c), AAMM_ENOTFOUND);
    aamm_capture_free(c);
    SQL("CREATE TABLE nk2 (a int); CREATE PUBLICATION p_nk2 FOR TABLE nk2");
    pubs[0] = "p_nk2";
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_capture_open(c), AAMM_EINVAL);
    ck_assert_ptr_nonnull(strstr(aamm_capture_errmsg(c), "public.nk2"));
    ck_assert_ptr_nonnull(strstr(aamm_capture_errmsg(c), "REPLICA IDENTITY FULL"));
    aamm_capture_free(c);
    o.slot = "s_nk2";
    o.start_lsn = 0x2000;
    pubs[0] = "p_nosuch";
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_capture_open(c), AAMM_ENOTFOUND);
    aamm_capture_free(c);
    o.slot = "Bad-Name";
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), AAMM_EINVAL);
    ck_assert_ptr_null(c);
}
END_TEST

/* An unsuitable server is refused with a message naming the setting: wal_level first,
 * then (after fixing it) track_commit_timestamp. */
START_TEST(unsuitable_server)
{
    const char *pubs[1] = {"p"};
    struct aamm_capture_options o = {.node_id = 7};
    struct aamm_capture *c;
    ck_assert_ptr_nonnull(fx);
    o.conninfo = pgfx_conninfo(fx, 0);
    o.slot = "s";
    o.publications = pubs;
    o.npublications = 1;
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_capture_open(c), AAMM_EUNSUITABLE);
    ck_assert_ptr_nonnull(strstr(aamm_capture_errmsg(c), "wal_level = logical"));
    aamm_capture_free(c);
    SQL("ALTER SYSTEM SET wal_level = logical");
    ck_assert_int_eq(pgfx_stop_node(fx, 0, "fast"), 0);
    ck_assert_int_eq(pgfx_start_node(fx, 0), 0);
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_capture_open(c), AAMM_EUNSUITABLE);
    ck_assert_ptr_nonnull(strstr(aamm_capture_errmsg(c), "track_commit_timestamp = on"));
    aamm_capture_free(c);
    /* A server that cannot be reached at all. */
    o.conninfo = "host=/nonexistent port=1 dbname=x connect_timeout=2";
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_capture_open(c), AAMM_ECONN);
    aamm_capture_free(c);
}
END_TEST

static Suite *capture_suite(void)
{
    Suite *s = suite_create("capture");
    TCase *tc = aamm_test_tcase("stream", 240);
    tcase_add_unchecked_fixture(tc, main_setup, cluster_teardown);
    tcase_add_test(tc, dml_insert_update_delete);
    tcase_add_test(tc, relation_metadata);
    tcase_add_test(tc, catalog_reconnect);
    tcase_add_test(tc, toast_unchanged);
    tcase_add_test(tc, truncate_several);
    tcase_add_test(tc, logical_messages);
    tcase_add_test(tc, data_types);
    tcase_add_test(tc, origins_filtered);
    tcase_add_test(tc, relation_changes_and_partitions);
    tcase_add_test(tc, nonblocking_setup);
    tcase_add_test(tc, resume_after_walsender_killed);
    tcase_add_test(tc, unconfirmed_redelivered);
    tcase_add_test(tc, resume_after_server_restart);
    tcase_add_test(tc, skipping_is_bounded);
    tcase_add_test(tc, paused_host_keeps_connection);
    tcase_add_test(tc, huge_transaction_bounded_memory);
    tcase_add_test(tc, example_recvlogical_prints_stream);
    tcase_add_test(tc, refusals);
    tcase_add_test(tc, refusal_messages);
    suite_add_tcase(s, tc);
    tc = aamm_test_tcase("unsuitable", 120);
    tcase_add_unchecked_fixture(tc, bad_setup, cluster_teardown);
    tcase_add_test(tc, unsuitable_server);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return aamm_test_run(capture_suite());
}
