/* test_change.c: copies, comparisons and destructors of the change model. */
#include "config.h"

#include <string.h>

#include <aamm/change.h>

#include "internal.h"
#include "testutil.h"

static struct aamm_column cols[] = {
    {"id", "integer", 23, -1, AAMM_COLUMN_KEY},
    {"name", "text", 25, -1, 0},
    {"note", "character varying(20)", 1043, 24, 0},
};

static struct aamm_relation make_rel(void)
{
    struct aamm_relation r = {16384, "public", "users", AAMM_REPLIDENT_DEFAULT, 3, cols, 1};
    return r;
}

/* A copied relation equals its source and owns its own memory. */
START_TEST(relation_copy_equal)
{
    struct aamm_relation src = make_rel(), dst;
    struct aamm_memory_stats before, after;
    aamm_memory_stats(&before);
    ck_assert_int_eq(aamm_relation_copy(&dst, &src), 0);
    ck_assert(aamm_relation_equal(&src, &dst));
    ck_assert_ptr_ne(dst.columns, src.columns);
    ck_assert_int_eq(aamm_relation_column(&dst, "note"), 2);
    ck_assert_int_eq(aamm_relation_column(&dst, "nope"), -1);
    dst.columns[1].flags = AAMM_COLUMN_KEY;
    ck_assert(!aamm_relation_equal(&src, &dst));
    aamm_relation_clear(&dst);
    aamm_memory_stats(&after);
    ck_assert_uint_eq(before.in_use, after.in_use);
}
END_TEST

/* Node-local OIDs do not make two relations different. */
START_TEST(relation_equal_ignores_oids)
{
    struct aamm_relation a = make_rel(), b;
    ck_assert_int_eq(aamm_relation_copy(&b, &a), 0);
    b.oid = 99999;
    b.columns[0].type_oid = 1;
    ck_assert(aamm_relation_equal(&a, &b));
    aamm_relation_clear(&b);
}
END_TEST

/* A failing allocation at any point of a copy leaves nothing allocated. */
START_TEST(relation_copy_out_of_memory)
{
    struct aamm_relation src = make_rel(), dst;
    for (uint64_t n = 1; n < 20; n++) {
        struct aamm_memory_stats before, after;
        int rc;
        aamm_memory_stats(&before);
        aamm__alloc_fail_after(n);
        rc = aamm_relation_copy(&dst, &src);
        aamm__alloc_fail_after(0);
        if (rc == 0) {
            aamm_relation_clear(&dst);
            ck_assert_uint_ge(n, 8);
            break;
        }
        ck_assert_int_eq(rc, AAMM_ENOMEM);
        ck_assert_ptr_null(dst.columns);
        aamm_memory_stats(&after);
        ck_assert_uint_eq(before.in_use, after.in_use);
    }
}
END_TEST

/* Tuples copy and compare value by value, kinds included. */
START_TEST(tuple_copy_equal)
{
    struct aamm_value v[] = {
        {AAMM_VALUE_TEXT, 4, "2574"}, {AAMM_VALUE_NULL, 0, NULL}, {AAMM_VALUE_UNCHANGED, 0, NULL}};
    struct aamm_tuple t = {3, v}, c;
    ck_assert_int_eq(aamm_tuple_copy(&c, &t), 0);
    ck_assert(aamm_tuple_equal(&t, &c));
    c.values[0].data[0] = '3';
    ck_assert(!aamm_tuple_equal(&t, &c));
    c.values[0].data[0] = '2';
    c.values[1].kind = AAMM_VALUE_UNCHANGED;
    ck_assert(!aamm_tuple_equal(&t, &c));
    aamm_tuple_clear(&c);
    ck_assert_ptr_null(c.values);
    ck_assert_uint_eq(c.nvalues, 0);
}
END_TEST

/* Clearing a change frees what it owns; kind names are stable. */
/* aamm_value_set: text copies (with a NUL, embedded bytes kept), NULL, old data freed
 * (ASan would see a leak), and out of memory leaves the value as it was. */
START_TEST(value_set)
{
    struct aamm_value v = {0};
    ck_assert_int_eq(aamm_value_set(&v, "ab\0c", 4), 0);
    ck_assert_int_eq(v.kind, AAMM_VALUE_TEXT);
    ck_assert_uint_eq(v.len, 4);
    ck_assert_int_eq(memcmp(v.data, "ab\0c", 5), 0);
    ck_assert_int_eq(aamm_value_set(&v, "xyz", 2), 0);
    ck_assert_str_eq(v.data, "xy");
    aamm__alloc_fail_after(1);
    ck_assert_int_eq(aamm_value_set(&v, "zz", 2), AAMM_ENOMEM);
    aamm__alloc_fail_after(0);
    ck_assert_str_eq(v.data, "xy");
    ck_assert_int_eq(aamm_value_set(&v, NULL, 7), 0);
    ck_assert_int_eq(v.kind, AAMM_VALUE_NULL);
    ck_assert_ptr_null(v.data);
    ck_assert_uint_eq(v.len, 0);
}
END_TEST

START_TEST(change_clear_and_names)
{
    struct aamm_change ch;
    struct aamm_memory_stats before, after;
    aamm_memory_stats(&before);
    memset(&ch, 0, sizeof ch);
    ch.kind = AAMM_CHANGE_MESSAGE;
    ch.prefix = aamm__strdup("aamm_ddl");
    ch.content = aamm__strdup("CREATE TABLE t()");
    ch.content_len = 16;
    aamm_change_clear(&ch);
    aamm_change_clear(NULL);
    aamm_memory_stats(&after);
    ck_assert_uint_eq(before.in_use, after.in_use);
    ck_assert_str_eq(aamm_change_kind_name(AAMM_CHANGE_INSERT), "insert");
    ck_assert_str_eq(aamm_change_kind_name(AAMM_CHANGE_TRUNCATE), "truncate");
}
END_TEST

/* Transactions copy their origin name. */
START_TEST(transaction_copy)
{
    struct aamm_transaction t = {2, 777, 100, 200, 1234567, "aamm_from_1", 50}, c;
    ck_assert_int_eq(aamm_transaction_copy(&c, &t), 0);
    ck_assert_ptr_ne(c.origin_name, t.origin_name);
    ck_assert_str_eq(c.origin_name, "aamm_from_1");
    ck_assert_uint_eq(c.end_lsn, 200);
    aamm_transaction_clear(&c);
    ck_assert_ptr_null(c.origin_name);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("change");
    TCase *tc = aamm_test_tcase("model", 10);
    tcase_add_test(tc, relation_copy_equal);
    tcase_add_test(tc, relation_equal_ignores_oids);
    tcase_add_test(tc, relation_copy_out_of_memory);
    tcase_add_test(tc, tuple_copy_equal);
    tcase_add_test(tc, value_set);
    tcase_add_test(tc, change_clear_and_names);
    tcase_add_test(tc, transaction_copy);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
