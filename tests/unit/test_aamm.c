/* test_aamm.c: version, error codes, allocator statistics and failure injection, LSNs. */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include <aamm/aamm.h>

#include "internal.h"
#include "testutil.h"

/* The library's version (aamm.h's macros and aamm_version_*()) is the package version that
 * configure.ac's AC_INIT declares independently (config.h's PACKAGE_VERSION, which is also
 * aamm.pc's Version), and the number encodes the string: bumping one without the other
 * fails here. (Comparing the functions with the header alone could not fail inside the
 * tree: both come from the same macros.) */
START_TEST(version_matches_package)
{
    unsigned major = 0, minor = 0, patch = 0;
    char tail;
    ck_assert_str_eq(AAMM_VERSION_STRING, PACKAGE_VERSION);
    ck_assert_str_eq(aamm_version_string(), PACKAGE_VERSION);
    ck_assert_int_eq(sscanf(PACKAGE_VERSION, "%u.%u.%u%c", &major, &minor, &patch, &tail), 3);
    ck_assert_int_eq(aamm_version_number(), (int)(major * 10000 + minor * 100 + patch));
    ck_assert_int_eq(AAMM_VERSION_NUMBER, aamm_version_number());
    ck_assert_uint_eq(AAMM_VERSION_MAJOR, major);
    ck_assert_uint_eq(AAMM_VERSION_MINOR, minor);
    ck_assert_uint_eq(AAMM_VERSION_PATCH, patch);
}
END_TEST

/* Node ids are 1..AAMM_NODE_ID_MAX (1023, the snowflake node bits): 0 and anything above
 * are refused by the one check every component uses. */
START_TEST(node_id_range)
{
    ck_assert_int_eq(AAMM_NODE_ID_MAX, 1023);
    ck_assert(!aamm_node_id_valid(0));
    ck_assert(aamm_node_id_valid(1));
    ck_assert(aamm_node_id_valid(AAMM_NODE_ID_MAX));
    ck_assert(!aamm_node_id_valid(AAMM_NODE_ID_MAX + 1));
    ck_assert(!aamm_node_id_valid(UINT32_MAX));
}
END_TEST

/* Every code has a distinct name and text; unknown codes are reported as unknown. */
START_TEST(error_codes_have_texts)
{
    for (int c = AAMM_EINTERNAL; c <= 0; c++) {
        ck_assert_str_ne(aamm_strerror(c), "unknown error");
        ck_assert_str_ne(aamm_errname(c), "AAMM_E?");
        for (int d = AAMM_EINTERNAL; d < c; d++)
            ck_assert_str_ne(aamm_errname(c), aamm_errname(d));
    }
    ck_assert_str_eq(aamm_strerror(-9999), "unknown error");
    ck_assert_str_eq(aamm_errname(AAMM_ENOMEM), "AAMM_ENOMEM");
}
END_TEST

/* in_use and high_water follow allocations exactly, through realloc and free. */
START_TEST(allocator_statistics)
{
    struct aamm_memory_stats s0, s1, s2;
    char *p;
    aamm_memory_stats(&s0);
    aamm_memory_reset_high_water();
    p = aamm__malloc(1000);
    ck_assert_ptr_nonnull(p);
    p = aamm__realloc(p, 5000);
    ck_assert_ptr_nonnull(p);
    aamm_memory_stats(&s1);
    ck_assert_uint_eq(s1.in_use, s0.in_use + 5000);
    ck_assert_uint_ge(s1.high_water, s0.in_use + 5000);
    aamm__free(p);
    aamm_memory_stats(&s2);
    ck_assert_uint_eq(s2.in_use, s0.in_use);
    ck_assert_uint_eq(s2.high_water, s1.high_water);
    ck_assert_uint_eq(s2.allocations, s0.allocations + 2);
}
END_TEST

/* The Nth allocation fails when asked to, and allocation works again afterwards. */
START_TEST(allocator_failure_injection)
{
    void *a, *b, *c;
    aamm__alloc_fail_after(2);
    a = aamm__malloc(10);
    b = aamm__malloc(10);
    c = aamm__strdup("x");
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_null(b);
    ck_assert_ptr_null(c);
    aamm__alloc_fail_after(0);
    b = aamm__calloc(3, 4);
    ck_assert_ptr_nonnull(b);
    ck_assert_int_eq(((int *)b)[2], 0);
    aamm__free(a);
    aamm__free(b);
    /* Overflowing sizes fail cleanly. */
    ck_assert_ptr_null(aamm__calloc(SIZE_MAX / 2, 4));
    ck_assert_ptr_null(aamm__malloc(SIZE_MAX - 4));
}
END_TEST

/* LSN text round-trips and malformed texts are refused. */
START_TEST(lsn_format_and_parse)
{
    char buf[AAMM_LSN_BUFSIZE];
    uint64_t v = 0;
    ck_assert_str_eq(aamm_lsn_format(UINT64_C(0x16B374D848), buf), "16/B374D848");
    ck_assert_str_eq(aamm_lsn_format(UINT64_MAX, buf), "FFFFFFFF/FFFFFFFF");
    ck_assert_int_eq(aamm_lsn_parse("16/B374D848", &v), 0);
    ck_assert_uint_eq(v, UINT64_C(0x16B374D848));
    ck_assert_int_eq(aamm_lsn_parse("0/0", &v), 0);
    ck_assert_uint_eq(v, 0);
    const char *bad[] = {"", "/", "1/", "/1", "x/1", "1/1g", "123456789/0", "1-2", "1/2/3"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        v = 42;
        ck_assert_int_eq(aamm_lsn_parse(bad[i], &v), AAMM_EMALFORMED);
        ck_assert_uint_eq(v, 42);
    }
}
END_TEST

/* Timestamps print in a form PostgreSQL parses back exactly, also before 1970. */
START_TEST(time_format)
{
    char buf[64];
    ck_assert_str_eq(aamm_time_format(0, buf, sizeof buf), "1970-01-01 00:00:00.000000+00");
    ck_assert_str_eq(aamm_time_format(AAMM_PG_EPOCH_OFFSET_US + 1, buf, sizeof buf),
                     "2000-01-01 00:00:00.000001+00");
    ck_assert_str_eq(aamm_time_format(-1, buf, sizeof buf), "1969-12-31 23:59:59.999999+00");
}
END_TEST

/* Errors keep their code and gain context as they travel up. */
START_TEST(error_messages_gain_context)
{
    struct aamm__err e;
    aamm__errclear(&e);
    ck_assert_str_eq(aamm__errmsg(&e), "");
    ck_assert_int_eq(aamm__errf(&e, AAMM_ENOTFOUND, "slot \"%s\" does not exist", "s1"),
                     AAMM_ENOTFOUND);
    ck_assert_int_eq(aamm__errprefix(&e, "capture: "), AAMM_ENOTFOUND);
    ck_assert_str_eq(aamm__errmsg(&e), "capture: slot \"s1\" does not exist");
}
END_TEST

static int logged;
static void count_log(int level, const char *file, int line, const char *msg, void *arg)
{
    (void)file;
    (void)line;
    (void)arg;
    if (level == AAMM_LOG_WARNING && strcmp(msg, "w 7") == 0)
        logged++;
}

/* The log callback receives messages up to its level and nothing above. */
START_TEST(log_callback_levels)
{
    aamm_set_log_cb(count_log, AAMM_LOG_WARNING, NULL);
    AAMM_WARN("w %d", 7);
    AAMM_DEBUG("d %d", 7);
    ck_assert_int_eq(logged, 1);
    ck_assert(!aamm__log_enabled(AAMM_LOG_DEBUG));
    aamm_set_log_cb(NULL, 0, NULL);
    AAMM_WARN("w %d", 7);
    ck_assert_int_eq(logged, 1);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("aamm");
    TCase *tc = aamm_test_tcase("core", 10);
    tcase_add_test(tc, version_matches_package);
    tcase_add_test(tc, node_id_range);
    tcase_add_test(tc, error_codes_have_texts);
    tcase_add_test(tc, allocator_statistics);
    tcase_add_test(tc, allocator_failure_injection);
    tcase_add_test(tc, lsn_format_and_parse);
    tcase_add_test(tc, time_format);
    tcase_add_test(tc, error_messages_gain_context);
    tcase_add_test(tc, log_callback_levels);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
