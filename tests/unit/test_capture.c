/* test_capture.c (unit): capture's option checks and state rules, without a server. */
#include "config.h"

#include <string.h>

#include <aamm/capture.h>

#include "internal.h"
#include "testutil.h"

static const char *const pubs[2] = {"p1", "p2"};

static struct aamm_capture_options good(void)
{
    struct aamm_capture_options o;
    memset(&o, 0, sizeof o);
    o.conninfo = "dbname=x";
    o.slot = "aamm_to_2";
    o.publications = pubs;
    o.npublications = 2;
    o.node_id = 1;
    return o;
}

/* Missing or invalid options are refused with AAMM_EINVAL and no handle. */
START_TEST(options_validated)
{
    struct aamm_capture *c = (struct aamm_capture *)1;
    struct aamm_capture_options o = good();
    const char *empty[1] = {""};
    ck_assert_int_eq(aamm_capture_new(&c, NULL, NULL, 0), AAMM_EINVAL);
    ck_assert_ptr_null(c);
    o.conninfo = NULL;
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), AAMM_EINVAL);
    o = good();
    o.slot = "Has-Caps";
    {
        char err[128];
        ck_assert_int_eq(aamm_capture_new(&c, &o, err, sizeof err), AAMM_EINVAL);
        ck_assert_ptr_nonnull(strstr(err, "invalid slot name \"Has-Caps\""));
    }
    o.slot = "";
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), AAMM_EINVAL);
    o.slot = "a_very_long_slot_name_that_goes_past_the_sixty_three_byte_limit_x";
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), AAMM_EINVAL);
    o = good();
    o.npublications = 0;
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), AAMM_EINVAL);
    o = good();
    o.publications = empty;
    o.npublications = 1;
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), AAMM_EINVAL);
    o = good();
    o.node_id = 0;
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), AAMM_EINVAL);
    o.node_id = AAMM_NODE_ID_MAX + 1;
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), AAMM_EINVAL);
    o = good();
    o.status_interval_ms = -1;
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), AAMM_EINVAL);
    ck_assert_ptr_null(c);
}
END_TEST

/* Before open, nothing streams: no fd, no timeout, and the stream calls say ESTATE. */
START_TEST(not_open_is_estate)
{
    struct aamm_capture *c;
    struct aamm_capture_event ev;
    struct aamm_capture_options o = good();
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_capture_fd(c), -1);
    ck_assert_int_eq(aamm_capture_events(c), 0);
    ck_assert_int_eq(aamm_capture_timeout(c), -1);
    ck_assert_int_eq(aamm_capture_step(c), AAMM_ESTATE);
    ck_assert_int_eq(aamm_capture_next(c, &ev), AAMM_ESTATE);
    ck_assert_int_eq(aamm_capture_confirm(c, 100), AAMM_ESTATE);
    ck_assert_int_eq(aamm_capture_send_status(c), AAMM_ESTATE);
    ck_assert_ptr_nonnull(strstr(aamm_capture_errmsg(c), "not open"));
    aamm_capture_free(c);
    aamm_capture_free(NULL);
}
END_TEST

/* Options are copied: the caller's strings may go away after new(). */
START_TEST(options_copied)
{
    char conninfo[48] = "host=/nonexistent_aamm dbname=x", slot[16] = "s1", pub[8] = "p";
    const char *list[1] = {pub};
    struct aamm_capture *c;
    struct aamm_capture_options o = good();
    o.conninfo = conninfo;
    o.slot = slot;
    o.publications = list;
    o.npublications = 1;
    ck_assert_int_eq(aamm_capture_new(&c, &o, NULL, 0), 0);
    memset(conninfo, 'z', sizeof conninfo - 1);
    memset(slot, 'z', sizeof slot - 1);
    memset(pub, 'z', sizeof pub - 1);
    list[0] = NULL;
    /* open fails to connect (no such database server), naming the copied slot. */
    ck_assert_int_eq(aamm_capture_open(c), AAMM_ECONN);
    ck_assert_ptr_nonnull(strstr(aamm_capture_errmsg(c), "slot \"s1\""));
    ck_assert_int_eq(aamm_capture_open(c), AAMM_ESTATE);
    aamm_capture_free(c);
}
END_TEST

/* Every allocation failure in new() gives AAMM_ENOMEM and leaks nothing. */
START_TEST(allocation_failures)
{
    struct aamm_capture_options o = good();
    struct aamm_memory_stats before, after;
    int rc = AAMM_ENOMEM;
    aamm_memory_stats(&before);
    for (uint64_t n = 1; rc == AAMM_ENOMEM && n < 100; n++) {
        struct aamm_capture *c = NULL;
        aamm__alloc_fail_after(n);
        rc = aamm_capture_new(&c, &o, NULL, 0);
        aamm__alloc_fail_after(0);
        if (rc == AAMM_ENOMEM)
            ck_assert_ptr_null(c);
        else
            ck_assert_int_eq(rc, 0);
        aamm_capture_free(c);
    }
    ck_assert_int_eq(rc, 0);
    aamm_memory_stats(&after);
    ck_assert_uint_eq(after.in_use, before.in_use);
}
END_TEST

static Suite *capture_suite(void)
{
    Suite *s = suite_create("capture_unit");
    TCase *tc = aamm_test_tcase("options", 30);
    tcase_add_test(tc, options_validated);
    tcase_add_test(tc, not_open_is_estate);
    tcase_add_test(tc, options_copied);
    tcase_add_test(tc, allocation_failures);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return aamm_test_run(capture_suite());
}
