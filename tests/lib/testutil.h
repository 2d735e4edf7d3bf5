/*
 * testutil.h: small helpers shared by every test program: running a Check suite, the
 * test-size scale, wall-clock time, byte helpers.
 */
#ifndef AAMM_TESTUTIL_H
#define AAMM_TESTUTIL_H

#include <check.h>
#include <stdint.h>
#include <sys/types.h>

/* Run @s (ownership transferred) with the verbosity from CK_VERBOSITY and return an exit
 * status for main(): 0 when every test passed. */
int aamm_test_run(Suite *s);

/* The test-size multiplier AAMM_TEST_SCALE (default 1; `make check-long` sets 10;
 * sanitizer builds may set it below 1, e.g. 0.2). Loop counts are multiplied by it. */
double aamm_test_scale(void);

/* n scaled by aamm_test_scale(), at least @min. */
long aamm_test_scaled(long n, long min);

/* Monotonic milliseconds. */
int64_t aamm_test_now_ms(void);

/* A test case with a time bound in seconds (multiplied by CK_TIMEOUT_MULTIPLIER as Check
 * does). */
TCase *aamm_test_tcase(const char *name, double timeout_s);

/* The seed of a randomized test: AAMM_TEST_SEED when set (decimal or 0x hex), else a fresh
 * one from the clock and pid. Prints "<name>: seed N (replay: AAMM_TEST_SEED=N)" to stderr
 * (unbuffered: it is in the test log even if the test crashes), so a failure can be
 * replayed exactly. */
uint64_t aamm_test_seed(const char *name);

/* Fill @buf with @n bytes from a seeded xorshift generator (deterministic per seed). */
void aamm_test_random_bytes(uint64_t *seed, void *buf, size_t n);
uint64_t aamm_test_rand(uint64_t *seed);

/* A TCP port on 127.0.0.1 that was free a moment ago (bound, read back, released). */
int aamm_test_free_port(void);

/* Fork a child that runs fn(arg) and exits; the child is SIGKILLed if the test process
 * dies (PR_SET_PDEATHSIG), so it never outlives the test. Returns its pid. */
pid_t aamm_test_spawn(void (*fn)(int), int arg);

/* SIGTERM *pid (if > 0) and reap it; SIGKILL it if it has not ended after @timeout_ms.
 * Sets *pid to 0. */
void aamm_test_stop(pid_t *pid, int timeout_ms);

/* SIGKILL *pid (if > 0), reap it, and set *pid to 0. */
void aamm_test_kill(pid_t *pid);

/* The peak resident set of process @pid in KiB (VmHWM in /proc/<pid>/status), or -1 when
 * it cannot be read (the process is gone). */
long aamm_test_peak_rss_kb(pid_t pid);

#endif
