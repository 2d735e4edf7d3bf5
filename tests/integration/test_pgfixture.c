/* test_pgfixture.c: the throwaway-cluster fixture itself: settings, crash and restart,
 * and cleanup by the reaper when the owning process is killed with SIGKILL. */
#include "config.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pgfixture.h"
#include "testutil.h"

/* Two nodes start with the settings libaamm needs, each on its own socket. */
START_TEST(nodes_have_required_settings)
{
    struct pgfx *fx = pgfx_start(2, NULL);
    ck_assert_ptr_nonnull(fx);
    for (int i = 0; i < 2; i++) {
        char *v = pgfx_value(fx, i, "SHOW wal_level");
        ck_assert_ptr_nonnull(v);
        ck_assert_str_eq(v, "logical");
        free(v);
        v = pgfx_value(fx, i, "SHOW track_commit_timestamp");
        ck_assert_str_eq(v, "on");
        free(v);
        ck_assert_int_ge(pgfx_value_long(fx, i, 0, "SHOW max_replication_slots"), 16);
        v = pgfx_value(fx, i, "SELECT current_setting('server_version_num')::int / 10000");
        ck_assert_str_eq(v, "15");
        free(v);
    }
    /* The nodes are distinct servers. */
    ck_assert_int_eq(pgfx_exec(fx, 0, "CREATE TABLE only_on_0(a int)"), 0);
    ck_assert_int_eq(pgfx_value_long(fx, 1, -1,
                     "SELECT count(*) FROM pg_class WHERE relname = 'only_on_0'"), 0);
    pgfx_destroy(fx);
}
END_TEST

/* A crashed node restarts with its committed data. */
START_TEST(crash_and_restart)
{
    struct pgfx *fx = pgfx_start(1, NULL);
    pid_t pm;
    ck_assert_ptr_nonnull(fx);
    ck_assert_int_eq(pgfx_exec(fx, 0, "CREATE TABLE t(a int); INSERT INTO t VALUES (1),(2)"), 0);
    pm = pgfx_postmaster_pid(fx, 0);
    ck_assert_int_gt(pm, 0);
    ck_assert_int_eq(pgfx_crash_node(fx, 0), 0);
    ck_assert_int_ne(kill(pm, 0), 0);
    ck_assert_int_eq(pgfx_start_node(fx, 0), 0);
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1, "SELECT sum(a) FROM t"), 3);
    ck_assert_int_eq(pgfx_stop_node(fx, 0, "fast"), 0);
    ck_assert_int_eq(pgfx_postmaster_pid(fx, 0), 0);
    ck_assert_int_eq(pgfx_start_node(fx, 0), 0);
    ck_assert_int_eq(pgfx_value_long(fx, 0, -1, "SELECT count(*) FROM t"), 2);
    pgfx_destroy(fx);
}
END_TEST

/* When the process owning a fixture is killed with SIGKILL, the reaper stops the server
 * and removes the directory. */
START_TEST(reaper_cleans_up_after_sigkill)
{
    int fds[2];
    pid_t child;
    char root[256] = {0};
    long pm = 0;
    struct stat st;
    ck_assert_int_eq(pipe(fds), 0);
    child = fork();
    ck_assert_int_ge(child, 0);
    if (child == 0) {
        struct pgfx *fx = pgfx_start(1, NULL);
        char msg[300];
        if (fx == NULL)
            _exit(1);
        snprintf(msg, sizeof msg, "%ld %s\n", (long)pgfx_postmaster_pid(fx, 0), pgfx_root(fx));
        if (write(fds[1], msg, strlen(msg)) < 0)
            _exit(1);
        pause();
        _exit(0);
    }
    close(fds[1]);
    {
        char buf[300] = {0};
        FILE *f = fdopen(fds[0], "r");
        ck_assert_ptr_nonnull(fgets(buf, sizeof buf, f));
        fclose(f);
        ck_assert_int_eq(sscanf(buf, "%ld %255s", &pm, root), 2);
    }
    ck_assert_int_gt(pm, 0);
    ck_assert_int_eq(stat(root, &st), 0);
    kill(child, SIGKILL);
    waitpid(child, NULL, 0);
    for (int i = 0; i < 400 && (kill((pid_t)pm, 0) == 0 || stat(root, &st) == 0); i++)
        usleep(50000);
    ck_assert_msg(kill((pid_t)pm, 0) != 0, "postmaster %ld still alive", pm);
    ck_assert_msg(stat(root, &st) != 0 && errno == ENOENT, "%s still exists", root);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("pgfixture");
    TCase *tc = aamm_test_tcase("clusters", 120);
    tcase_add_test(tc, nodes_have_required_settings);
    tcase_add_test(tc, crash_and_restart);
    tcase_add_test(tc, reaper_cleans_up_after_sigkill);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
