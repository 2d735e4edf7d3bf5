/* test_conflict.c: the pure conflict rules (kinds, LWW order, policies). */
#include <check.h>
#include <string.h>

#include <aamm/conflict.h>

#include "testutil.h"

static struct aamm_conflict_version V(int64_t t, uint32_t n) {
    struct aamm_conflict_version v = {true, t, n};
    return v;
}

/* LWW orders by commit time first, node id second; unknown is oldest. */
START_TEST(test_lww_order)
{
    struct aamm_conflict_version a = V(100, 2), b = V(200, 1), c = V(200, 2), u = {false, 0, 0};
    ck_assert_int_lt(aamm_conflict_version_compare(&a, &b), 0);
    ck_assert_int_gt(aamm_conflict_version_compare(&c, &b), 0);
    ck_assert_int_eq(aamm_conflict_version_compare(&c, &c), 0);
    ck_assert_int_lt(aamm_conflict_version_compare(&u, &a), 0);
    ck_assert_int_eq(aamm_conflict_version_compare(&u, &u), 0);
    ck_assert(aamm_conflict_lww_remote_wins(&a, &b));
    ck_assert(!aamm_conflict_lww_remote_wins(&b, &a));
    ck_assert(aamm_conflict_lww_remote_wins(&u, &a));
    /* equal timestamps: the higher node id wins, on both sides the same way */
    ck_assert(aamm_conflict_lww_remote_wins(&b, &c));
    ck_assert(!aamm_conflict_lww_remote_wins(&c, &b));
}
END_TEST

/* The seed scenario: node 1 writes (2574,'An') at ts1, node 2 (2574,'Wim') at ts2 > ts1:
 * node 1 applies node 2's row, node 2 keeps its own: both end with 'Wim'. */
START_TEST(test_seed_scenario)
{
    struct aamm_conflict_version an = V(1000, 1), wim = V(2000, 2);
    ck_assert_int_eq(
        aamm_conflict_decide(AAMM_CONFLICT_INSERT_EXISTS, AAMM_POLICY_LWW, &an, &wim, false),
        AAMM_RESOLVE_APPLY_REMOTE);
    ck_assert_int_eq(
        aamm_conflict_decide(AAMM_CONFLICT_INSERT_EXISTS, AAMM_POLICY_LWW, &wim, &an, false),
        AAMM_RESOLVE_KEEP_LOCAL);
}
END_TEST

/* Policies: keep-local, apply-remote and error override LWW for row conflicts. */
START_TEST(test_policies)
{
    struct aamm_conflict_version old = V(1, 1), new = V(2, 2);
    enum aamm_conflict_kind kinds[] = {AAMM_CONFLICT_INSERT_EXISTS,
                                       AAMM_CONFLICT_UPDATE_ORIGIN_DIFFERS,
                                       AAMM_CONFLICT_DELETE_ORIGIN_DIFFERS};
    for (size_t i = 0; i < 3; i++) {
        ck_assert_int_eq(aamm_conflict_decide(kinds[i], AAMM_POLICY_KEEP_LOCAL, &old, &new, false),
                         AAMM_RESOLVE_KEEP_LOCAL);
        ck_assert_int_eq(
            aamm_conflict_decide(kinds[i], AAMM_POLICY_APPLY_REMOTE, &new, &old, false),
            AAMM_RESOLVE_APPLY_REMOTE);
        ck_assert_int_eq(aamm_conflict_decide(kinds[i], AAMM_POLICY_ERROR, &old, &new, false),
                         AAMM_RESOLVE_ERROR);
        ck_assert_int_eq(aamm_conflict_decide(kinds[i], AAMM_POLICY_LWW, &new, &old, false),
                         AAMM_RESOLVE_KEEP_LOCAL);
        ck_assert_int_eq(aamm_conflict_decide(kinds[i], AAMM_POLICY_CALLBACK, &old, &new, false),
                         AAMM_RESOLVE_ERROR); /* the host resolver's to decide */
    }
}
END_TEST

/* An update or delete that finds a local row of unknown version, or one its own node
 * wrote, is no conflict: it applies whatever the policy (as aamm.decide() does). */
START_TEST(test_origin_differs_not_a_conflict)
{
    struct aamm_conflict_version unknown = {false, 0, 0}, mine = V(900, 2), remote = V(800, 2);
    enum aamm_conflict_policy pols[] = {AAMM_POLICY_LWW, AAMM_POLICY_KEEP_LOCAL,
                                        AAMM_POLICY_ERROR, AAMM_POLICY_CALLBACK};
    for (size_t i = 0; i < 4; i++) {
        ck_assert_int_eq(aamm_conflict_decide(AAMM_CONFLICT_UPDATE_ORIGIN_DIFFERS, pols[i],
                                              &unknown, &remote, false),
                         AAMM_RESOLVE_APPLY_REMOTE);
        ck_assert_int_eq(aamm_conflict_decide(AAMM_CONFLICT_DELETE_ORIGIN_DIFFERS, pols[i], &mine,
                                              &remote, false),
                         AAMM_RESOLVE_APPLY_REMOTE);
    }
    /* an insert over a row is always a conflict: LWW keeps the newer local row */
    ck_assert_int_eq(aamm_conflict_decide(AAMM_CONFLICT_INSERT_EXISTS, AAMM_POLICY_LWW, &mine,
                                          &remote, false),
                     AAMM_RESOLVE_KEEP_LOCAL);
}
END_TEST

/* update_missing: a newer remembered delete wins; unchanged-TOAST updates cannot become
 * inserts; otherwise the row is inserted. delete_missing skips; unique_other errors. */
START_TEST(test_missing_rules)
{
    struct aamm_conflict_version tomb = V(500, 3), rem_old = V(400, 1), rem_new = V(600, 1);
    ck_assert_int_eq(
        aamm_conflict_decide(AAMM_CONFLICT_UPDATE_MISSING, AAMM_POLICY_LWW, &tomb, &rem_old, false),
        AAMM_RESOLVE_SKIP);
    ck_assert_int_eq(
        aamm_conflict_decide(AAMM_CONFLICT_UPDATE_MISSING, AAMM_POLICY_LWW, &tomb, &rem_new, false),
        AAMM_RESOLVE_APPLY_REMOTE);
    ck_assert_int_eq(
        aamm_conflict_decide(AAMM_CONFLICT_UPDATE_MISSING, AAMM_POLICY_LWW, NULL, &rem_new, false),
        AAMM_RESOLVE_APPLY_REMOTE);
    ck_assert_int_eq(
        aamm_conflict_decide(AAMM_CONFLICT_UPDATE_MISSING, AAMM_POLICY_LWW, NULL, &rem_new, true),
        AAMM_RESOLVE_SKIP);
    ck_assert_int_eq(aamm_conflict_decide(AAMM_CONFLICT_UPDATE_MISSING, AAMM_POLICY_ERROR, NULL,
                                          &rem_new, false),
                     AAMM_RESOLVE_ERROR);
    ck_assert_int_eq(aamm_conflict_decide(AAMM_CONFLICT_UPDATE_MISSING, AAMM_POLICY_CALLBACK, NULL,
                                          &rem_new, false),
                     AAMM_RESOLVE_ERROR);
    ck_assert_int_eq(aamm_conflict_decide(AAMM_CONFLICT_UPDATE_MISSING, AAMM_POLICY_CALLBACK, NULL,
                                          &rem_new, true),
                     AAMM_RESOLVE_SKIP);
    ck_assert_int_eq(aamm_conflict_decide(AAMM_CONFLICT_DELETE_MISSING, AAMM_POLICY_ERROR, NULL,
                                          &rem_new, false),
                     AAMM_RESOLVE_SKIP);
    ck_assert_int_eq(
        aamm_conflict_decide(AAMM_CONFLICT_UNIQUE_OTHER, AAMM_POLICY_LWW, NULL, &rem_new, false),
        AAMM_RESOLVE_ERROR);
    ck_assert_int_eq(
        aamm_conflict_decide(AAMM_CONFLICT_TRUNCATE, AAMM_POLICY_LWW, NULL, &rem_new, false),
        AAMM_RESOLVE_APPLY_REMOTE);
}
END_TEST

/* Names round-trip and match the texts the SQL side writes into aamm.conflict_log. */
START_TEST(test_names)
{
    const char *names[] = {NULL,
                           "insert_exists",
                           "update_origin_differs",
                           "update_missing",
                           "delete_origin_differs",
                           "delete_missing",
                           "unique_other",
                           "truncate"};
    for (int k = 1; k < AAMM_CONFLICT_NKINDS; k++) {
        ck_assert_str_eq(aamm_conflict_kind_name((enum aamm_conflict_kind)k), names[k]);
        ck_assert_int_eq(aamm_conflict_kind_parse(names[k]), k);
    }
    ck_assert_str_eq(aamm_conflict_kind_name((enum aamm_conflict_kind)0), "unknown");
    ck_assert_str_eq(aamm_conflict_kind_name((enum aamm_conflict_kind)99), "unknown");
    ck_assert_int_eq(aamm_conflict_kind_parse("nope"), 0);
    ck_assert_int_eq(aamm_conflict_kind_parse(NULL), 0);
    for (int r = 1; r <= 5; r++)
        ck_assert_int_eq(
            aamm_conflict_resolution_parse(aamm_conflict_resolution_name((enum aamm_resolution)r)),
            r);
    ck_assert_str_eq(aamm_conflict_resolution_name((enum aamm_resolution)9), "unknown");
    ck_assert_str_eq(aamm_conflict_policy_name(AAMM_POLICY_LWW), "lww");
    ck_assert_str_eq(aamm_conflict_policy_name(AAMM_POLICY_ERROR), "error");
    ck_assert_str_eq(aamm_conflict_policy_name(AAMM_POLICY_CALLBACK), "callback");
    ck_assert_str_eq(aamm_conflict_resolution_name(AAMM_RESOLVE_MERGED), "merged");
}
END_TEST

/* Randomized: LWW is a total order, so every pair of nodes picks the same winner. */
START_TEST(test_lww_symmetric)
{
    uint64_t seed = aamm_test_seed("test_lww_symmetric");
    for (int i = 0; i < 10000; i++) {
        struct aamm_conflict_version a =
            V((int64_t)(aamm_test_rand(&seed) % 5), (uint32_t)(aamm_test_rand(&seed) % 3 + 1));
        struct aamm_conflict_version b =
            V((int64_t)(aamm_test_rand(&seed) % 5), (uint32_t)(aamm_test_rand(&seed) % 3 + 1));
        bool ab = aamm_conflict_lww_remote_wins(&a, &b), ba = aamm_conflict_lww_remote_wins(&b, &a);
        if (a.commit_time == b.commit_time && a.origin_node == b.origin_node)
            ck_assert(!ab && !ba);
        else
            ck_assert(ab != ba);
    }
}
END_TEST

int main(void)
{
    Suite *s = suite_create("conflict");
    TCase *tc = aamm_test_tcase("rules", 10);
    tcase_add_test(tc, test_lww_order);
    tcase_add_test(tc, test_seed_scenario);
    tcase_add_test(tc, test_policies);
    tcase_add_test(tc, test_origin_differs_not_a_conflict);
    tcase_add_test(tc, test_missing_rules);
    tcase_add_test(tc, test_names);
    tcase_add_test(tc, test_lww_symmetric);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
