/* testutil.c: helpers shared by every test program. */
#include "config.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

int aamm_test_run(Suite *s)
{
    SRunner *sr = srunner_create(s);
    int failed;
    srunner_run_all(sr, CK_ENV);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}

double aamm_test_scale(void)
{
    const char *env = getenv("AAMM_TEST_SCALE");
    double v;
    if (env == NULL || *env == '\0')
        return 1.0;
    v = strtod(env, NULL);
    return v > 0 ? v : 1.0;
}

long aamm_test_scaled(long n, long min)
{
    long v = (long)((double)n * aamm_test_scale());
    return v < min ? min : v;
}

int64_t aamm_test_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

TCase *aamm_test_tcase(const char *name, double timeout_s)
{
    TCase *tc = tcase_create(name);
    tcase_set_timeout(tc, timeout_s);
    return tc;
}

uint64_t aamm_test_seed(const char *name)
{
    const char *env = getenv("AAMM_TEST_SEED");
    uint64_t seed;
    if (env != NULL && *env != '\0') {
        char *end;
        seed = strtoull(env, &end, 0);
        ck_assert_msg(*end == '\0', "AAMM_TEST_SEED=%s is not a number", env);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        seed =
            ((uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec) ^ ((uint64_t)getpid() << 32);
        seed %= 1000000000000ull; /* short enough to copy from a log */
    }
    fprintf(stderr, "%s: seed %" PRIu64 " (replay: AAMM_TEST_SEED=%" PRIu64 ")\n", name, seed,
            seed);
    return seed;
}

uint64_t aamm_test_rand(uint64_t *seed)
{
    uint64_t x = *seed ? *seed : 0x9E3779B97F4A7C15ull;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *seed = x;
    return x * 0x2545F4914F6CDD1Dull;
}

void aamm_test_random_bytes(uint64_t *seed, void *buf, size_t n)
{
    unsigned char *p = buf;
    while (n > 0) {
        uint64_t r = aamm_test_rand(seed);
        size_t k = n < 8 ? n : 8;
        memcpy(p, &r, k);
        p += k;
        n -= k;
    }
}

int aamm_test_free_port(void)
{
    /* The kernel may hand the same ephemeral port to two back-to-back binds once the
     * first socket is closed, and a test asking for three ports wants three different
     * ones: remember what this process handed out and never repeat it. */
    static int given[256];
    static size_t ngiven;
    int tries;
    for (tries = 0; tries < 1000; tries++) {
        struct sockaddr_in sa;
        socklen_t len = sizeof sa;
        int fd = socket(AF_INET, SOCK_STREAM, 0), port;
        size_t i;
        bool seen = false;
        ck_assert_int_ge(fd, 0);
        memset(&sa, 0, sizeof sa);
        sa.sin_family = AF_INET;
        sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        ck_assert_int_eq(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
        ck_assert_int_eq(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
        port = ntohs(sa.sin_port);
        close(fd);
        for (i = 0; i < ngiven && i < 256; i++)
            if (given[i] == port)
                seen = true;
        if (seen)
            continue;
        given[ngiven++ % 256] = port;
        return port;
    }
    ck_abort_msg("no fresh free port after 1000 tries");
    return -1;
}

pid_t aamm_test_spawn(void (*fn)(int), int arg)
{
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive the test */
        fn(arg);
        _exit(0);
    }
    return pid;
}

void aamm_test_stop(pid_t *pid, int timeout_ms)
{
    if (*pid <= 0)
        return;
    kill(*pid, SIGTERM);
    for (int waited = 0; waited < timeout_ms; waited += 50) {
        if (waitpid(*pid, NULL, WNOHANG) == *pid) {
            *pid = 0;
            return;
        }
        usleep(50000);
    }
    aamm_test_kill(pid);
}

void aamm_test_kill(pid_t *pid)
{
    if (*pid > 0) {
        kill(*pid, SIGKILL);
        waitpid(*pid, NULL, 0);
        *pid = 0;
    }
}

long aamm_test_peak_rss_kb(pid_t pid)
{
    char path[64], line[256];
    long kb = -1;
    snprintf(path, sizeof path, "/proc/%ld/status", (long)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %ld kB", &kb) == 1)
            break;
    fclose(f);
    return kb;
}
