/*
 * test_apply_sql.c: golden tests of apply's statement builder (lib/apply_sql.c), no server.
 *
 * Each test builds the statements for representative relations and change shapes (plain
 * lower-case names; names that need quoting, with a key in another order than the
 * columns; a relation too wide for a JSON row) and compares each text byte for byte with
 * a checked-in file under tests/golden/apply/. A statement apply sends is the file's
 * content without its final newline.
 *
 * When a builder changes on purpose, regenerate the files and review their diff:
 *     AAMM_GOLDEN_UPDATE=1 make check TESTS=tests/unit/test_apply_sql
 * (run from the build directory; the files are rewritten in the source tree, and the run
 * passes). The files were first produced from lib/apply.c before it was split into
 * apply.c, apply_pipe.c and apply_sql.c.
 */
#include <check.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "apply_int.h"
#include "internal.h"
#include "sql_contract.h"
#include "testutil.h"

/* ---- fixtures ------------------------------------------------------------------------ */

struct colspec {
    const char *name;
    const char *type;
    int key_pos;    /* position in the local primary key, or -1 */
    bool generated; /* a generated column on this node: never written */
    bool sent;      /* the source sends it (a remote column) */
};

/* An apply relation as the catalog mapping leaves it: the local columns @cols (in local
 * order), the remote ones those marked sent (in the same order). */
static struct lrel *mkrel(int id, const char *schema, const char *name,
                          const struct colspec *cols, int n)
{
    struct lrel *r = aamm__calloc(1, sizeof *r);
    ck_assert_ptr_nonnull(r);
    r->id = id;
    r->rel.schema = aamm__strdup(schema);
    r->rel.name = aamm__strdup(name);
    r->rel.columns = aamm__calloc((size_t)n, sizeof *r->rel.columns);
    r->lcols = aamm__calloc((size_t)n, sizeof *r->lcols);
    r->r2l = aamm__calloc((size_t)n + 1, sizeof *r->r2l);
    r->key_r = aamm__calloc((size_t)n, sizeof *r->key_r);
    ck_assert(r->rel.schema && r->rel.name && r->rel.columns && r->lcols && r->r2l && r->key_r);
    ck_assert_int_eq(aamm__apply_rel_names(&r->rel, &r->qname, &r->label), 0);
    r->nlocal = n;
    for (int i = 0; i < n; i++) {
        r->lcols[i].name = aamm__strdup(cols[i].name);
        r->lcols[i].type = aamm__strdup(cols[i].type);
        r->lcols[i].key_pos = cols[i].key_pos;
        r->lcols[i].generated = cols[i].generated;
        if (cols[i].key_pos >= 0)
            r->nkeys++;
        if (!cols[i].sent)
            continue;
        uint32_t c = r->rel.ncolumns++;
        r->rel.columns[c].name = aamm__strdup(cols[i].name);
        r->r2l[c] = cols[i].generated ? -1 : i;
        if (cols[i].key_pos >= 0)
            r->key_r[cols[i].key_pos] = (int)c;
    }
    r->mapped = true;
    return r;
}

static void freerel(struct lrel *r)
{
    for (int i = 0; i < r->nlocal; i++) {
        aamm__free(r->lcols[i].name);
        aamm__free(r->lcols[i].type);
    }
    for (uint32_t c = 0; c < r->rel.ncolumns; c++)
        aamm__free(r->rel.columns[c].name);
    aamm__free(r->rel.columns);
    aamm__free(r->rel.schema);
    aamm__free(r->rel.name);
    aamm__free(r->lcols);
    aamm__free(r->r2l);
    aamm__free(r->key_r);
    aamm__free(r->qname);
    aamm__free(r->label);
    aamm__free(r);
}

/* public.users: plain names; a column generated on this node; a local column the source
 * does not send. Remote columns: id, name, note, total. */
static const struct colspec users_cols[] = {
    {"id", "bigint", 0, false, true},       {"name", "text", -1, false, true},
    {"note", "text", -1, false, true},      {"total", "integer", -1, true, true},
    {"created", "timestamp with time zone", -1, false, false},
};

/* "Sales"."Order ""Lines"" 2": names that need quoting (a quote, an apostrophe, upper
 * case), the key (order_id, Region) in another order than the columns. Remote columns:
 * Region, order_id, qty's, payload. */
static const struct colspec lines_cols[] = {
    {"Region", "text", 1, false, true},
    {"order_id", "integer", 0, false, true},
    {"qty's", "numeric(10,2)", -1, false, true},
    {"payload", "jsonb", -1, false, true},
};

static struct lrel *users(void)
{
    return mkrel(1, "public", "users", users_cols, (int)AAMM__ARRAY_SIZE(users_cols));
}

static struct lrel *lines(void)
{
    return mkrel(2, "Sales", "Order \"Lines\" 2", lines_cols, (int)AAMM__ARRAY_SIZE(lines_cols));
}

/* public.wide: 47 integer columns c0..c46 (key c0): a written row too wide for
 * jsonb_build_object's argument limit goes as NULL::jsonb. */
static struct lrel *wide(void)
{
    static char names[47][8];
    struct colspec cols[47];
    for (int i = 0; i < 47; i++) {
        snprintf(names[i], sizeof names[i], "c%d", i);
        cols[i] = (struct colspec){names[i], "integer", i == 0 ? 0 : -1, false, true};
    }
    return mkrel(3, "public", "wide", cols, 47);
}

/* ---- golden files -------------------------------------------------------------------- */

static bool golden_update(void)
{
    const char *u = getenv("AAMM_GOLDEN_UPDATE");
    return u && *u && strcmp(u, "0") != 0;
}

/* Compare @text (owned: freed here) with tests/golden/apply/@name (its content minus the
 * final newline); with AAMM_GOLDEN_UPDATE set, write it instead. */
static void golden(const char *name, char *text)
{
    ck_assert_msg(text != NULL, "%s: the builder returned NULL", name);
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/golden/apply/%s", AAMM_TOP_SRCDIR, name);
    if (golden_update()) {
        FILE *f = fopen(path, "w");
        ck_assert_msg(f != NULL, "%s: %s", path, strerror(errno));
        fprintf(f, "%s\n", text);
        ck_assert_int_eq(fclose(f), 0);
        aamm__free(text);
        return;
    }
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "%s: %s (AAMM_GOLDEN_UPDATE=1 writes it)", path, strerror(errno));
    size_t cap = strlen(text) + 4096, len = 0;
    char *want = malloc(cap);
    ck_assert_ptr_nonnull(want);
    size_t got;
    while ((got = fread(want + len, 1, cap - 1 - len, f)) > 0) {
        len += got;
        if (len == cap - 1) {
            cap *= 2;
            want = realloc(want, cap);
            ck_assert_ptr_nonnull(want);
        }
    }
    fclose(f);
    want[len] = '\0';
    if (len > 0 && want[len - 1] == '\n')
        want[--len] = '\0';
    size_t i = 0;
    while (text[i] && text[i] == want[i])
        i++;
    if (text[i] != want[i]) {
        size_t from = i > 40 ? i - 40 : 0;
        fprintf(stderr, "%s: differs at byte %zu\n  golden: ...%.80s\n  built:  ...%.80s\n", name,
                i, want + from, text + from);
    }
    bool same = text[i] == want[i];
    free(want);
    aamm__free(text);
    ck_assert_msg(same, "%s: the built statement differs from the golden file at byte %zu", name,
                  i);
}

/* ---- tests --------------------------------------------------------------------------- */

/* A text value of @s (borrowed). */
static struct aamm_value V(const char *s)
{
    struct aamm_value v = {AAMM_VALUE_TEXT, (uint32_t)strlen(s), (char *)s};
    return v;
}

static void tuple(struct aamm_tuple *t, const struct lrel *r, const char *const *vals)
{
    t->nvalues = r->rel.ncolumns;
    t->values = aamm__calloc(t->nvalues, sizeof *t->values);
    ck_assert_ptr_nonnull(t->values);
    for (uint32_t i = 0; i < t->nvalues; i++)
        t->values[i] = vals[i] ? V(vals[i]) : (struct aamm_value){AAMM_VALUE_NULL, 0, NULL};
}

/* Single-row inserts: the fast statement with its slow path (build_sql) and the whole
 * statement (build_full), for plain, quoted and too-wide relations. */
START_TEST(test_insert)
{
    struct lrel *u = users(), *l = lines(), *w = wide();
    golden("users.insert.sql", aamm__apply_build_sql(u, OP_INSERT, "1110-", false, 0, NULL));
    golden("users.insert.full.sql", aamm__apply_build_full(u, OP_INSERT, "1110-", false));
    golden("lines.insert.sql", aamm__apply_build_sql(l, OP_INSERT, "1111-", false, 0, NULL));
    char wmask[49];
    memset(wmask, '1', 47);
    memcpy(wmask + 47, "-", 2);
    golden("wide.insert.sql", aamm__apply_build_sql(w, OP_INSERT, wmask, false, 0, NULL));
    freerel(u);
    freerel(l);
    freerel(w);
}
END_TEST

/* Updates: plain, unchanged-TOAST columns left out (U), key change (k: the old key travels,
 * a tombstone on it), both (K); the whole statement for each. */
START_TEST(test_update)
{
    struct lrel *u = users(), *l = lines(), *w = wide();
    golden("users.update.sql", aamm__apply_build_sql(u, OP_UPDATE, "1110-", false, 0, NULL));
    golden("users.update.full.sql", aamm__apply_build_full(u, OP_UPDATE, "1110-", false));
    golden("users.update_toast.sql", aamm__apply_build_sql(u, OP_UPDATE, "1010U", true, 0, NULL));
    golden("users.update_key.sql", aamm__apply_build_sql(u, OP_UPDATE, "1110k", false, 0, NULL));
    golden("users.update_key.full.sql", aamm__apply_build_full(u, OP_UPDATE, "1110k", false));
    golden("users.update_key_toast.sql",
           aamm__apply_build_sql(u, OP_UPDATE, "1010K", true, 0, NULL));
    golden("lines.update.sql", aamm__apply_build_sql(l, OP_UPDATE, "1111-", false, 0, NULL));
    golden("lines.update_key.sql", aamm__apply_build_sql(l, OP_UPDATE, "1111k", false, 0, NULL));
    /* only part of the key written: not a key change, whatever the old key */
    golden("lines.update_part_key.sql",
           aamm__apply_build_sql(l, OP_UPDATE, "0111k", true, 0, NULL));
    char wmask[49];
    memset(wmask, '1', 47);
    memcpy(wmask + 47, "-", 2);
    golden("wide.update.sql", aamm__apply_build_sql(w, OP_UPDATE, wmask, false, 0, NULL));
    /* the JSON row's limit: 45 written columns still go as an object, 46 not */
    wmask[46] = '0';
    golden("wide.update_46.sql", aamm__apply_build_sql(w, OP_UPDATE, wmask, true, 0, NULL));
    wmask[45] = '0';
    golden("wide.update_45.sql", aamm__apply_build_sql(w, OP_UPDATE, wmask, true, 0, NULL));
    freerel(u);
    freerel(l);
    freerel(w);
}
END_TEST

/* update_missing: the insert after an UPDATE that found no row, with and without a key
 * change and unchanged-TOAST columns. */
START_TEST(test_update_missing)
{
    struct lrel *u = users(), *l = lines();
    golden("users.update_missing.sql",
           aamm__apply_build_sql(u, OP_UPDATE_MISSING, "1110-", false, 0, NULL));
    golden("users.update_missing_toast.sql",
           aamm__apply_build_sql(u, OP_UPDATE_MISSING, "1010U", true, 0, NULL));
    golden("lines.update_missing_key.sql",
           aamm__apply_build_sql(l, OP_UPDATE_MISSING, "1111k", false, 0, NULL));
    freerel(u);
    freerel(l);
}
END_TEST

/* Deletes: the fast statement (a tombstone when it deleted) and the whole statement. */
START_TEST(test_delete)
{
    struct lrel *u = users(), *l = lines();
    golden("users.delete.sql", aamm__apply_build_sql(u, OP_DELETE, "0000-", false, 0, NULL));
    golden("users.delete.full.sql", aamm__apply_build_full(u, OP_DELETE, "0000-", false));
    golden("lines.delete.sql", aamm__apply_build_sql(l, OP_DELETE, "0000-", false, 0, NULL));
    freerel(u);
    freerel(l);
}
END_TEST

/* Updates and deletes that carry the remote old row (REPLICA IDENTITY FULL: one mask
 * character per remote column after the marker, '0' for unchanged TOAST or an unmapped
 * column): its values travel as parameters after the old key's and reach aamm.decide() as
 * JSON typed like the local row, in objects of at most 45 columns; none left: '{}'. */
START_TEST(test_old_row)
{
    struct lrel *u = users(), *l = lines(), *w = wide();
    golden("users.update.old.sql",
           aamm__apply_build_sql(u, OP_UPDATE, "1110-1110", false, 0, NULL));
    golden("users.update_old.full.sql", aamm__apply_build_full(u, OP_UPDATE, "1110-1110", false));
    golden("users.update_toast.old.sql",
           aamm__apply_build_sql(u, OP_UPDATE, "1010U1010", true, 0, NULL));
    golden("users.update.old_empty.sql",
           aamm__apply_build_sql(u, OP_UPDATE, "1110-0000", false, 0, NULL));
    golden("users.delete.old.sql",
           aamm__apply_build_sql(u, OP_DELETE, "0000-1110", false, 0, NULL));
    golden("users.delete_old.full.sql", aamm__apply_build_full(u, OP_DELETE, "0000-1110", false));
    golden("lines.update_key.old.sql",
           aamm__apply_build_sql(l, OP_UPDATE, "1111k1111", false, 0, NULL));
    char wmask[96];
    memset(wmask, '1', 47);
    wmask[47] = '-';
    memset(wmask + 48, '1', 47);
    wmask[95] = '\0';
    golden("wide.update.old.sql", aamm__apply_build_sql(w, OP_UPDATE, wmask, false, 0, NULL));
    /* the numbering: written values, the old key (a delete, a key change), the old row */
    static const struct {
        int op;
        const char *mask;
        int n;
    } cases[] = {
        {OP_UPDATE, "1110-1110", 11}, /* 5 fixed + 3 written + 3 old */
        {OP_UPDATE, "1010U1010", 9},  /* 5 fixed + 2 written + 2 old */
        {OP_DELETE, "0000-1110", 9},  /* 5 fixed + 1 old key + 3 old */
        {OP_UPDATE, "1110-0000", 8},  /* 5 fixed + 3 written */
    };
    for (size_t i = 0; i < AAMM__ARRAY_SIZE(cases); i++) {
        int *vp, *kp, next;
        ck_assert(aamm__apply_number_params(u, cases[i].op, cases[i].mask, &vp, &kp, &next));
        ck_assert_int_eq(next - 1, cases[i].n);
        aamm__free(vp);
        aamm__free(kp);
    }
    freerel(u);
    freerel(l);
    freerel(w);
}
END_TEST

/* Runs of inserts: one text[] per written column, with ON CONFLICT (MANY) and without
 * (PLAIN). */
START_TEST(test_insert_runs)
{
    struct lrel *u = users(), *l = lines();
    golden("users.insert_many.sql",
           aamm__apply_build_sql(u, OP_INSERT_MANY, "1110-", false, 0, NULL));
    golden("users.insert_plain.sql",
           aamm__apply_build_sql(u, OP_INSERT_PLAIN, "1110-", false, 0, NULL));
    golden("lines.insert_many.sql",
           aamm__apply_build_sql(l, OP_INSERT_MANY, "1111-", false, 0, NULL));
    freerel(u);
    freerel(l);
}
END_TEST

/* A change's item c<@cte> of a merged statement and, on a line of its own, its expression
 * in the statement's last row (heap). */
static char *item(const struct lrel *r, int op, const char *mask, int cte)
{
    char *e = NULL, *c = aamm__apply_build_sql(r, op, mask, false, cte, &e);
    ck_assert_ptr_nonnull(c);
    ck_assert_ptr_nonnull(e);
    size_t n = strlen(c) + strlen(e) + 2;
    char *s = aamm__malloc(n);
    ck_assert_ptr_nonnull(s);
    snprintf(s, n, "%s\n%s", c, e);
    aamm__free(c);
    aamm__free(e);
    return s;
}

/* A change's item of a merged statement (c<n>, its expression) and a whole merged
 * statement: the folded guard first, items renumbered after each other, the guard's
 * parameters last, the expressions in one row after the guard's rows. */
START_TEST(test_merged)
{
    struct lrel *u = users(), *l = lines();
    golden("users.insert.item3.sql", item(u, OP_INSERT, "1110-", 3));
    golden("users.update.item1.sql", item(u, OP_UPDATE, "1110-", 1));
    golden("lines.delete.item2.sql", item(l, OP_DELETE, "0000-", 2));

    /* the rows behind the masks (a merged statement's shape comes from its changes) */
    const char *ui[] = {"1", "Ann", NULL, "7"}, *lo[] = {"EU", "42", NULL, NULL},
               *ln[] = {"US", "43", "2.00", "{}"}, *ud[] = {"3", NULL, NULL, NULL},
               *lt[] = {"EU", "44", "?", "{}"};
    struct aamm_change ch[4];
    memset(ch, 0, sizeof ch);
    ch[0].kind = AAMM_CHANGE_INSERT;
    tuple(&ch[0].new_tuple, u, ui);
    ch[1].kind = AAMM_CHANGE_UPDATE; /* a key change */
    ch[1].old_kind = AAMM_OLD_KEY;
    tuple(&ch[1].old_tuple, l, lo);
    tuple(&ch[1].new_tuple, l, ln);
    ch[2].kind = AAMM_CHANGE_DELETE;
    ch[2].old_kind = AAMM_OLD_KEY;
    tuple(&ch[2].old_tuple, u, ud);
    ch[3].kind = AAMM_CHANGE_UPDATE; /* qty's unchanged (TOAST) */
    tuple(&ch[3].new_tuple, l, lt);
    ch[3].new_tuple.values[2] = (struct aamm_value){AAMM_VALUE_UNCHANGED, 0, NULL};
    const struct lrel *rels[4] = {u, l, u, l};
    int ops[4] = {OP_INSERT, OP_UPDATE, OP_DELETE, OP_UPDATE};
    const char *m[4] = {"1110-", "1111k", "0000-", "1101U"};
    bool hasu[4] = {false, false, false, true};
    char masks[4 * 8];
    int nps[4];
    for (int i = 0; i < 4; i++) {
        ch[i].relation = &rels[i]->rel;
        snprintf(masks + i * 8, 8, "%s", m[i]);
        int *vp, *kp, next;
        ck_assert(aamm__apply_number_params(rels[i], ops[i], m[i], &vp, &kp, &next));
        nps[i] = next - 1;
        aamm__free(vp);
        aamm__free(kp);
    }
    ck_assert_int_eq(nps[0], 8);  /* 5 fixed + 3 written */
    ck_assert_int_eq(nps[1], 11); /* 5 fixed + 4 written + 2 old key */
    ck_assert_int_eq(nps[2], 6);  /* 5 fixed + 1 old key */
    golden("merged.sql", aamm__apply_merged_sql(ch, 4, ops, masks, 8, hasu, nps));
    golden("merged1.sql", aamm__apply_merged_sql(ch, 1, ops, masks, 8, hasu, nps));
    for (int i = 0; i < 4; i++) {
        aamm__free(ch[i].old_tuple.values);
        aamm__free(ch[i].new_tuple.values);
    }
    freerel(u);
    freerel(l);
}
END_TEST

/* The guard as a statement of its own, the catalog query, TRUNCATE, relation names. */
START_TEST(test_fixed)
{
    golden("guard.sql", aamm__strdup(aamm__apply_guard_sql()));
    golden("catalog.sql", aamm__strdup(aamm__apply_catalog_sql));
    struct lrel *u = users(), *l = lines();
    const struct aamm_relation *tr[2] = {&u->rel, &l->rel};
    struct aamm_change c = {0};
    c.kind = AAMM_CHANGE_TRUNCATE;
    c.nrelations = 2;
    c.relations = tr;
    c.truncate_flags = AAMM_TRUNCATE_RESTART_IDENTITY | AAMM_TRUNCATE_CASCADE;
    golden("truncate.sql", aamm__apply_truncate_sql(&c));
    c.nrelations = 1;
    c.truncate_flags = 0;
    golden("truncate1.sql", aamm__apply_truncate_sql(&c));

    /* quoted name and label of each: bare only when a plain lower-case identifier */
    static const char *const names[][2] = {
        {"public", "users"}, {"Sales", "Order \"Lines\" 2"}, {"_s1", "t_2"},
        {"s", "1t"},         {"s", "Tab"},                    {"s", "a-b"},
        {"s", "x\"y"},       {"s", "ü"},
    };
    struct aamm__sb b = {0};
    for (size_t i = 0; i < AAMM__ARRAY_SIZE(names); i++) {
        struct aamm_relation r = {0};
        r.schema = (char *)names[i][0];
        r.name = (char *)names[i][1];
        char *q, *lb;
        ck_assert_int_eq(aamm__apply_rel_names(&r, &q, &lb), 0);
        aamm__sb_add(&b, "%s\t%s\n", q, lb);
        aamm__free(q);
        aamm__free(lb);
    }
    ck_assert(!b.oom);
    b.s[--b.len] = '\0';
    golden("names.txt", b.s);
    freerel(u);
    freerel(l);
}
END_TEST

static char *locks_of(const struct aamm_change *ch, size_t n)
{
    struct aamm__sb ids = {0}, modes = {0};
    ck_assert_int_eq(aamm__apply_build_locks(ch, n, false, &ids, &modes), 0);
    aamm__sb_add(&ids, "\n%s", modes.s);
    aamm__free(modes.s);
    ck_assert(!ids.oom);
    return ids.s;
}

/* The key locks a transaction takes: per key exclusive under its relation's shared lock,
 * the old and new key of a key change, a relation with more than 64 keys locked whole
 * (its key locks dropped), ascending ids without duplicates; more than 16 relations (the
 * slow count); the lock id of a key as tests compute it. */
START_TEST(test_locks)
{
    struct lrel *u = users(), *l = lines(), *w = wide();
    enum { NW = 70 };
    struct aamm_change ch[4 + NW];
    memset(ch, 0, sizeof ch);
    const char *u1[] = {"1", "Ann", NULL, "7"}, *u2[] = {"2", "Ann", NULL, "7"};
    ch[0].kind = AAMM_CHANGE_INSERT;
    ch[0].relation = &u->rel;
    tuple(&ch[0].new_tuple, u, u1);
    ch[1].kind = AAMM_CHANGE_UPDATE; /* key 1 -> 2 */
    ch[1].relation = &u->rel;
    ch[1].old_kind = AAMM_OLD_KEY;
    tuple(&ch[1].old_tuple, u, u1);
    tuple(&ch[1].new_tuple, u, u2);
    const char *l1[] = {"EU", "42", "1.50", "{}"};
    ch[2].kind = AAMM_CHANGE_DELETE;
    ch[2].relation = &l->rel;
    ch[2].old_kind = AAMM_OLD_KEY;
    tuple(&ch[2].old_tuple, l, l1);
    ch[3].kind = AAMM_CHANGE_INSERT; /* the same key again: one lock */
    ch[3].relation = &u->rel;
    tuple(&ch[3].new_tuple, u, u1);
    golden("locks.txt", locks_of(ch, 4));
    {
        /* the join freeze key, shared, goes first, also with no changes (lock_keys off) */
        struct aamm__sb ids = {0}, modes = {0};
        char want[64];
        snprintf(want, sizeof want, "{%" PRId64 "}", (int64_t)AAMM_JOIN_FREEZE_KEY);
        ck_assert_int_eq(aamm__apply_build_locks(ch, 0, true, &ids, &modes), 0);
        ck_assert_str_eq(ids.s, want);
        ck_assert_str_eq(modes.s, "{f}");
        aamm__free(ids.s);
        aamm__free(modes.s);
        ids = (struct aamm__sb){0};
        modes = (struct aamm__sb){0};
        ck_assert_int_eq(aamm__apply_build_locks(ch, 4, true, &ids, &modes), 0);
        snprintf(want, sizeof want, "{%" PRId64 ",", (int64_t)AAMM_JOIN_FREEZE_KEY);
        ck_assert(strncmp(ids.s, want, strlen(want)) == 0);
        ck_assert(strncmp(modes.s, "{f,", 3) == 0);
        aamm__free(ids.s);
        aamm__free(modes.s);
    }

    static char keys[NW][8];
    const char *wv[47];
    for (int i = 0; i < 47; i++)
        wv[i] = "0";
    for (int i = 0; i < NW; i++) {
        snprintf(keys[i], sizeof keys[i], "%d", i);
        wv[0] = keys[i];
        ch[4 + i].kind = AAMM_CHANGE_INSERT;
        ch[4 + i].relation = &w->rel;
        tuple(&ch[4 + i].new_tuple, w, wv);
    }
    golden("locks_whole_relation.txt", locks_of(ch, 4 + NW));

    /* 17 relations, one key each */
    struct lrel *many[17];
    struct aamm_change mc[17];
    memset(mc, 0, sizeof mc);
    static const struct colspec kc[] = {{"k", "integer", 0, false, true}};
    const char *one[] = {"1"};
    for (int i = 0; i < 17; i++) {
        char nm[16];
        snprintf(nm, sizeof nm, "t%d", i);
        many[i] = mkrel(10 + i, "public", nm, kc, 1);
        mc[i].kind = AAMM_CHANGE_INSERT;
        mc[i].relation = &many[i]->rel;
        tuple(&mc[i].new_tuple, many[i], one);
    }
    golden("locks_many_relations.txt", locks_of(mc, 17));

    const char *k1[] = {"1"}, *k2[] = {"42", "EU"};
    char *ids = aamm__asprintf("%" PRId64 "\n%" PRId64 "\n%" PRId64,
                               aamm__apply_lock_id("public.users", k1, 1),
                               aamm__apply_lock_id(l->label, k2, 2),
                               aamm__apply_lock_id("public.busy", k1, 1));
    golden("lock_ids.txt", ids);
    /* the key lock of a change is the test hook's id of its key texts */
    ck_assert_int_eq(key_lock_id(u, &ch[0].new_tuple), aamm__apply_lock_id("public.users", k1, 1));

    for (int i = 0; i < 17; i++) {
        aamm__free(mc[i].new_tuple.values);
        freerel(many[i]);
    }
    for (int i = 0; i < 4 + NW; i++) {
        /* values borrow static texts: free only the arrays */
        aamm__free(ch[i].old_tuple.values);
        aamm__free(ch[i].new_tuple.values);
    }
    freerel(u);
    freerel(l);
    freerel(w);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("apply_sql");
    TCase *tc = aamm_test_tcase("golden", 10);
    tcase_add_test(tc, test_insert);
    tcase_add_test(tc, test_update);
    tcase_add_test(tc, test_update_missing);
    tcase_add_test(tc, test_delete);
    tcase_add_test(tc, test_old_row);
    tcase_add_test(tc, test_insert_runs);
    tcase_add_test(tc, test_merged);
    tcase_add_test(tc, test_fixed);
    tcase_add_test(tc, test_locks);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
