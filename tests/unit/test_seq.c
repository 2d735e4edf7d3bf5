/* test_seq.c: the C generators without a server: snowflake ids, UUIDv7, the galloc client. */
#include "config.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <aamm/seq.h>

#include "internal.h"
#include "seq_int.h"
#include "testutil.h"

/* A fake clock: returns now, then advances by @step every @every calls. */
struct fake_clock {
    int64_t now;
    int64_t every;
    int64_t step;
    int64_t calls;
};

static int64_t fake_ms(void *arg)
{
    struct fake_clock *c = arg;
    int64_t v = c->now;
    c->calls++;
    if (c->every > 0 && c->calls % c->every == 0)
        c->now += c->step;
    return v;
}

/* Check's ck_assert records every passing assertion through a file: too slow for loops of
 * a million; FAST_CHECK only costs on failure. */
#define FAST_CHECK(cond, ...)                                                                      \
    do {                                                                                           \
        if (!(cond))                                                                               \
            ck_abort_msg(__VA_ARGS__);                                                             \
    } while (0)

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static int cmp_uuid(const void *a, const void *b)
{
    return memcmp(a, b, 16);
}

#define T0 (AAMM_SNOWFLAKE_EPOCH_MS + INT64_C(86400000) * 1000) /* ~2026-09 */

/* Create a generator whose first id can fall in millisecond @t: created with the fake
 * clock at t - max_borrow_ms - 1 (the start wait, see seq.h), then the clock is set to @t. */
static int sf_new_at(struct aamm_snowflake **g, struct aamm_snowflake_options *o,
                     struct fake_clock *clk, int64_t t)
{
    int64_t b = o->max_borrow_ms ? o->max_borrow_ms : AAMM_SNOWFLAKE_DEFAULT_MAX_BORROW_MS;
    int rc;
    clk->now = t - b - 1;
    rc = aamm_snowflake_new(g, o, NULL, 0);
    clk->now = t;
    return rc;
}

/* ==== snowflake ======================================================================= */

/* The bit layout is the documented one: time, node, source bit 0 for C, counter. */
START_TEST(snowflake_layout)
{
    struct fake_clock clk = {.now = T0};
    struct aamm_snowflake_options o = {.node_id = 517, .clock = fake_ms, .clock_arg = &clk};
    struct aamm_snowflake *g;
    struct aamm_snowflake_parts p;
    int64_t id, id2;
    ck_assert_int_eq(sf_new_at(&g, &o, &clk, T0), 0);
    ck_assert_int_eq(aamm_snowflake_next(g, &id), 0);
    ck_assert_int_gt(id, 0);
    ck_assert_int_eq(id, ((T0 - AAMM_SNOWFLAKE_EPOCH_MS) << 22) | (INT64_C(517) << 12));
    aamm_snowflake_decode(id, &p);
    ck_assert_int_eq(p.unix_ms, T0);
    ck_assert_int_eq(p.node_id, 517);
    ck_assert_int_eq(p.source, AAMM_SNOWFLAKE_SOURCE_C);
    ck_assert_int_eq(p.counter, 0);
    ck_assert_int_eq(aamm_snowflake_next(g, &id2), 0);
    ck_assert_int_eq(id2, id + 1);
    ck_assert_int_eq(aamm_snowflake_last(g), id2);
    ck_assert_int_eq(AAMM_SNOWFLAKE_TIME_BITS + AAMM_SNOWFLAKE_NODE_BITS +
                         AAMM_SNOWFLAKE_SOURCE_BITS + AAMM_SNOWFLAKE_COUNTER_BITS,
                     63);
    aamm_snowflake_free(g);
}
END_TEST

/* Node ids outside 1..AAMM_NODE_ID_MAX (aamm_node_id_valid(): 0 is no node id), foreign
 * resume ids and borrow bounds out of range are refused, with the reason in err. */
START_TEST(snowflake_node_range)
{
    struct aamm_snowflake_options o = {0};
    struct aamm_snowflake *g = (void *)1;
    char err[128];
    o.node_id = 0;
    ck_assert_int_eq(aamm_snowflake_new(&g, &o, err, sizeof err), AAMM_EINVAL);
    ck_assert_ptr_null(g);
    ck_assert_str_eq(err, "snowflake: node id 0 outside 1..1023");
    o.node_id = AAMM_NODE_ID_MAX + 1;
    ck_assert_int_eq(aamm_snowflake_new(&g, &o, NULL, 0), AAMM_EINVAL);
    o.node_id = UINT32_MAX;
    ck_assert_int_eq(aamm_snowflake_new(&g, &o, err, 8), AAMM_EINVAL);
    ck_assert_str_eq(err, "snowfla"); /* truncated to errsize */
    ck_assert_int_eq(aamm_snowflake_new(&g, NULL, err, sizeof err), AAMM_EINVAL);
    ck_assert_str_eq(err, "snowflake: no options");
    o.node_id = 3;
    o.resume_after = (INT64_C(1000) << 22) | (INT64_C(4) << 12); /* node 4's id */
    ck_assert_int_eq(aamm_snowflake_new(&g, &o, err, sizeof err), AAMM_EINVAL);
    ck_assert_ptr_nonnull(strstr(err, "not a C id of node 3"));
    o.resume_after = (INT64_C(1000) << 22) | (INT64_C(3) << 12) | 2048; /* node 3, SQL */
    ck_assert_int_eq(aamm_snowflake_new(&g, &o, NULL, 0), AAMM_EINVAL);
    o.resume_after = 0;
    o.max_borrow_ms = -1;
    ck_assert_int_eq(aamm_snowflake_new(&g, &o, NULL, 0), AAMM_EINVAL);
    o.max_borrow_ms = AAMM_SNOWFLAKE_MAX_BORROW_LIMIT_MS + 1;
    ck_assert_int_eq(aamm_snowflake_new(&g, &o, NULL, 0), AAMM_EINVAL);
    o.max_borrow_ms = 0;
    o.node_id = AAMM_NODE_ID_MAX;
    ck_assert_int_eq(aamm_snowflake_new(&g, &o, NULL, 0), 0);
    aamm_snowflake_free(g);
    o.node_id = 1;
    ck_assert_int_eq(aamm_snowflake_new(&g, &o, NULL, 0), 0);
    aamm_snowflake_free(g);
    aamm_snowflake_free(NULL);
}
END_TEST

/* 3 nodes x 1,000,000 ids: all unique, each node's ids strictly increasing, although each
 * node's clock steps back by 2 s half-way (and the clocks of the nodes differ); with a
 * borrow bound of 3 s the generators borrow across the step without waiting. */
START_TEST(snowflake_three_nodes_unique_monotonic)
{
    long per = aamm_test_scaled(1000000, 20000);
    int64_t *all = malloc(sizeof *all * (size_t)per * 3);
    ck_assert_ptr_nonnull(all);
    for (int n = 0; n < 3; n++) {
        struct fake_clock clk = {.every = 997, .step = 1};
        struct aamm_snowflake_options o = {.node_id = n + 1,
                                           .clock = fake_ms,
                                           .clock_arg = &clk,
                                           .max_borrow_ms = 3000,
                                           .nonblocking = true};
        struct aamm_snowflake *g;
        int64_t prev = -1, borrowed_max = 0;
        ck_assert_int_eq(sf_new_at(&g, &o, &clk, T0 + n * 7), 0);
        for (long i = 0; i < per; i++) {
            int64_t id;
            if (i == per / 2)
                clk.now -= 2000; /* the clock steps back by two seconds */
            FAST_CHECK(aamm_snowflake_next(g, &id) == 0, "next failed");
            FAST_CHECK(id > prev, "node %d: id %ld not above %ld", n, (long)id, (long)prev);
            if (i > per / 2) {
                struct aamm_snowflake_parts p;
                aamm_snowflake_decode(id, &p);
                if (p.unix_ms - clk.now > borrowed_max)
                    borrowed_max = p.unix_ms - clk.now;
            }
            prev = id;
            all[(long)n * per + i] = id;
        }
        /* after the step the ids ran ahead of the clock (borrowed), never repeated */
        ck_assert_int_gt(borrowed_max, 1000);
        aamm_snowflake_free(g);
    }
    qsort(all, (size_t)per * 3, sizeof *all, cmp_i64);
    for (long i = 1; i < per * 3; i++)
        FAST_CHECK(all[i] != all[i - 1], "duplicate id %ld", (long)all[i]);
    free(all);
}
END_TEST

/* More than 2,048 ids in one millisecond: the counter never carries into the source or
 * node bits; the generator borrows the next milliseconds instead. */
START_TEST(snowflake_counter_full_borrows)
{
    struct fake_clock clk = {.now = T0}; /* the clock stands still */
    struct aamm_snowflake_options o = {
        .node_id = 9, .clock = fake_ms, .clock_arg = &clk, .nonblocking = true};
    struct aamm_snowflake *g;
    int64_t id, prev = -1;
    struct aamm_snowflake_parts p;
    ck_assert_int_eq(sf_new_at(&g, &o, &clk, T0), 0);
    for (int i = 0; i < 10000; i++) {
        FAST_CHECK(aamm_snowflake_next(g, &id) == 0, "next failed");
        FAST_CHECK(id > prev, "not increasing at %d", i);
        aamm_snowflake_decode(id, &p);
        FAST_CHECK(p.node_id == 9 && p.source == 0, "node/source bits changed at %d", i);
        FAST_CHECK(p.counter == i % 2048, "counter %d at %d", p.counter, i);
        FAST_CHECK(p.unix_ms == T0 + i / 2048, "time %ld at %d", (long)p.unix_ms, i);
        prev = id;
    }
    aamm_snowflake_free(g);
}
END_TEST

/* Borrowing stops at max_borrow_ms: nonblocking, AAMM_EAGAIN with a message and the wait
 * in aamm_snowflake_wait_ms, and ids resume (still increasing) once the clock has caught
 * up. */
START_TEST(snowflake_max_borrow_waits)
{
    struct fake_clock clk = {.now = T0};
    struct aamm_snowflake_options o = {
        .node_id = 2, .clock = fake_ms, .clock_arg = &clk, .max_borrow_ms = 5, .nonblocking = true};
    struct aamm_snowflake *g;
    int64_t id = 0, last = 0;
    int rc = 0;
    long n = 0;
    ck_assert_int_eq(sf_new_at(&g, &o, &clk, T0), 0);
    while ((rc = aamm_snowflake_next(g, &id)) == 0) {
        last = id;
        n++;
    }
    ck_assert_int_eq(rc, AAMM_EAGAIN);
    ck_assert_int_eq(n, 6 * 2048); /* ms T0 .. T0+5 */
    ck_assert_ptr_nonnull(strstr(aamm_snowflake_errmsg(g), "ahead of the clock"));
    ck_assert_int_eq(aamm_snowflake_wait_ms(g), 1);
    clk.now = T0 + 3; /* ms T0+6 is 3 ahead: allowed */
    ck_assert_int_eq(aamm_snowflake_next(g, &id), 0);
    ck_assert_int_eq(aamm_snowflake_wait_ms(g), 0);
    ck_assert_int_eq(id, ((T0 + 6 - AAMM_SNOWFLAKE_EPOCH_MS) << 22) | (INT64_C(2) << 12));
    ck_assert_int_gt(id, last);
    last = id;
    clk.now = T0 + 100;
    ck_assert_int_eq(aamm_snowflake_next(g, &id), 0);
    ck_assert_int_gt(id, last);
    aamm_snowflake_free(g);
}
END_TEST

/* A generator restarted with a clock that went back continues above resume_after. */
START_TEST(snowflake_resume_after_restart)
{
    struct fake_clock clk = {.now = T0};
    struct aamm_snowflake_options o = {.node_id = 5, .clock = fake_ms, .clock_arg = &clk};
    struct aamm_snowflake *g;
    int64_t id, saved;
    ck_assert_int_eq(sf_new_at(&g, &o, &clk, T0), 0);
    for (int i = 0; i < 100; i++)
        ck_assert_int_eq(aamm_snowflake_next(g, &id), 0);
    saved = aamm_snowflake_last(g);
    aamm_snowflake_free(g);
    clk.now = T0 - 60000;
    o.resume_after = saved;
    o.nonblocking = true;
    ck_assert_int_eq(aamm_snowflake_new(&g, &o, NULL, 0), 0);
    /* saved + 1 is a minute ahead of this clock: it waits for the clock to catch up */
    ck_assert_int_eq(aamm_snowflake_next(g, &id), AAMM_EAGAIN);
    ck_assert_int_eq(aamm_snowflake_wait_ms(g), 60000 - AAMM_SNOWFLAKE_DEFAULT_MAX_BORROW_MS);
    clk.now = T0;
    ck_assert_int_eq(aamm_snowflake_next(g, &id), 0);
    ck_assert_int_eq(id, saved + 1);
    aamm_snowflake_free(g);
}
END_TEST

/* Past the 41-bit time range the generator refuses with AAMM_EEXHAUSTED. */
START_TEST(snowflake_time_range_end)
{
    struct fake_clock clk = {0};
    struct aamm_snowflake_options o = {
        .node_id = 5, .clock = fake_ms, .clock_arg = &clk, .nonblocking = true};
    struct aamm_snowflake *g;
    int64_t id = 42;
    ck_assert_int_eq(sf_new_at(&g, &o, &clk, AAMM_SNOWFLAKE_EPOCH_MS + (INT64_C(1) << 41) - 1), 0);
    clk.now += 1;
    ck_assert_int_eq(aamm_snowflake_next(g, &id), AAMM_EEXHAUSTED);
    ck_assert_int_eq(id, 42);
    clk.now -= 1; /* last millisecond: 2048 ids, then nothing */
    for (int i = 0; i < 2048; i++)
        ck_assert_int_eq(aamm_snowflake_next(g, &id), 0);
    ck_assert_int_gt(id, 0);
    ck_assert_int_eq(aamm_snowflake_next(g, &id), AAMM_EEXHAUSTED);
    ck_assert_ptr_nonnull(strstr(aamm_snowflake_errmsg(g), "2^41"));
    aamm_snowflake_free(g);
}
END_TEST

/* Issue ids from @g until it refuses (nonblocking: it has run max_borrow_ms ahead of a
 * standing clock) into @ids from *@n on; returns the refusal. */
static int sf_drain(struct aamm_snowflake *g, int64_t *ids, long *n, long cap)
{
    int rc;
    while (*n < cap && (rc = aamm_snowflake_next(g, &ids[*n])) == 0)
        (*n)++;
    ck_assert_int_lt(*n, cap);
    return rc;
}

/* The crash-restart case, deterministic: a generator issues as fast as it can (the clock
 * standing still, so it runs ahead to its bound), is abandoned without any shutdown, and a
 * new generator of the same node is created at the same clock reading, five times in a row,
 * then again one millisecond later. The new generator's first call in its creation
 * millisecond waits (AAMM_EAGAIN, 1 ms); then it continues above everything the earlier runs
 * issued. No id is issued twice, and no run holds any id more than max_borrow_ms ahead. */
START_TEST(snowflake_restart_after_borrowing)
{
    const int64_t b = AAMM_SNOWFLAKE_DEFAULT_MAX_BORROW_MS;
    long cap = 8 * (b + 2) * AAMM_SNOWFLAKE_PER_MS, n = 0, first_run;
    int64_t *ids = malloc(sizeof *ids * (size_t)cap);
    struct fake_clock clk = {.now = T0};
    struct aamm_snowflake_options o = {
        .node_id = 77, .clock = fake_ms, .clock_arg = &clk, .nonblocking = true};
    struct aamm_snowflake *g;
    ck_assert_ptr_nonnull(ids);
    ck_assert_int_eq(sf_new_at(&g, &o, &clk, T0), 0);
    ck_assert_int_eq(sf_drain(g, ids, &n, cap), AAMM_EAGAIN);
    first_run = n;
    ck_assert_int_eq(first_run, (b + 1) * AAMM_SNOWFLAKE_PER_MS); /* T0 .. T0 + b, full */
    /* killed: no free, no state saved (the handle is only freed at the end of the test) */
    for (int r = 0; r < 6; r++) {
        struct aamm_snowflake *g2;
        long before = n;
        struct aamm_snowflake_parts p;
        if (r == 5)
            clk.now += 1; /* the last restart one millisecond later */
        ck_assert_int_eq(aamm_snowflake_new(&g2, &o, NULL, 0), 0);
        ck_assert_int_eq(aamm_snowflake_next(g2, &ids[n]), AAMM_EAGAIN);
        ck_assert_int_eq(aamm_snowflake_wait_ms(g2), 1);
        ck_assert_ptr_nonnull(strstr(aamm_snowflake_errmsg(g2), "start wait"));
        clk.now += 1; /* the clock passes the creation millisecond */
        ck_assert_int_eq(sf_drain(g2, ids, &n, cap), AAMM_EAGAIN);
        ck_assert_int_gt(n, before);
        aamm_snowflake_decode(ids[before], &p);
        ck_assert_int_eq(p.unix_ms, clk.now - 1 + b + 1); /* creation + bound + 1 */
        ck_assert_int_eq(p.counter, 0);
        aamm_snowflake_decode(ids[n - 1], &p);
        ck_assert_int_le(p.unix_ms - clk.now, b);
        /* abandoned, like the first */
        aamm_snowflake_free(g2);
    }
    qsort(ids, (size_t)n, sizeof *ids, cmp_i64);
    for (long i = 1; i < n; i++)
        FAST_CHECK(ids[i] != ids[i - 1], "id %ld issued twice (%ld ids)", (long)ids[i], n);
    aamm_snowflake_free(g);
    free(ids);
}
END_TEST

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Without nonblocking, aamm_snowflake_next sleeps until the clock allows the next id: a new
 * generator's first call (the start wait) and calls beyond the bound return ids; with a
 * clock that stands still it gives up with AAMM_EAGAIN after max_borrow_ms + 1 s. */
START_TEST(snowflake_blocking_waits_for_clock)
{
    struct aamm_snowflake_options o = {.node_id = 12, .max_borrow_ms = 5};
    struct aamm_snowflake *g;
    struct aamm_snowflake_parts p;
    struct fake_clock clk = {.now = T0};
    int64_t id = 0, t0, created;
    created = wall_ms();
    ck_assert_int_eq(aamm_snowflake_new(&g, &o, NULL, 0), 0);
    for (long i = 0; i < 20 * AAMM_SNOWFLAKE_PER_MS; i++) /* 20 ms of ids, as fast as it can */
        FAST_CHECK(aamm_snowflake_next(g, &id) == 0, "next: %s", aamm_snowflake_errmsg(g));
    aamm_snowflake_decode(id, &p);
    ck_assert_int_gt(p.unix_ms, created + 5); /* above the start wait */
    ck_assert_int_le(p.unix_ms, wall_ms() + 5);
    aamm_snowflake_free(g);
    o.clock = fake_ms;
    o.clock_arg = &clk;
    ck_assert_int_eq(aamm_snowflake_new(&g, &o, NULL, 0), 0);
    t0 = aamm_test_now_ms();
    ck_assert_int_eq(aamm_snowflake_next(g, &id), AAMM_EAGAIN);
    ck_assert_int_ge(aamm_test_now_ms() - t0, 1000);
    ck_assert_int_lt(aamm_test_now_ms() - t0, 3000);
    aamm_snowflake_free(g);
}
END_TEST

/* The crash-restart case for real: a child process issues ids as fast as it can with the
 * real clock and the default bound, writing them to a pipe; the parent kills it with
 * SIGKILL after 40 ms and starts the next child at once, four times. Every child ran ahead
 * of the clock (its ids' time parts passed the parent's clock at the kill), and among all
 * ids read no id appears twice. */
static void sf_child(int wfd)
{
    struct aamm_snowflake_options o = {.node_id = 345};
    struct aamm_snowflake *g;
    int64_t buf[512];
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (aamm_snowflake_new(&g, &o, NULL, 0) != 0)
        _exit(2);
    for (;;) {
        size_t off = 0;
        for (int i = 0; i < 512; i++)
            if (aamm_snowflake_next(g, &buf[i]) != 0)
                _exit(3);
        while (off < sizeof buf) {
            ssize_t w = write(wfd, (char *)buf + off, sizeof buf - off);
            if (w < 0 && errno != EINTR)
                _exit(4);
            if (w > 0)
                off += (size_t)w;
        }
    }
}

START_TEST(snowflake_crash_restart_fork)
{
    size_t cap = (size_t)1 << 22, n = 0; /* 32 MiB: 4 runs issue about 1 M ids */
    int64_t *ids = malloc(cap * sizeof *ids);
    long ahead_runs = 0;
    ck_assert_ptr_nonnull(ids);
    for (int r = 0; r < 4; r++) {
        int pfd[2], status = 0;
        pid_t pid;
        int64_t end, killed_at, max_ms = 0;
        size_t start = n, part = 0;
        ck_assert_int_eq(pipe(pfd), 0);
        pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
            close(pfd[0]);
            sf_child(pfd[1]);
        }
        close(pfd[1]);
        end = wall_ms() + 40;
        killed_at = 0;
        for (;;) {
            struct pollfd pf = {pfd[0], POLLIN, 0};
            ssize_t got;
            if (killed_at == 0 && wall_ms() >= end) {
                kill(pid, SIGKILL); /* no shutdown of any kind */
                killed_at = wall_ms();
            }
            if (poll(&pf, 1, 5) <= 0)
                continue;
            got = read(pfd[0], (char *)(ids + n) + part, (cap - n) * sizeof *ids - part);
            if (got <= 0)
                break; /* EOF: the child is gone and the pipe drained */
            part += (size_t)got;
            n += part / sizeof *ids;
            part %= sizeof *ids;
            ck_assert_uint_lt(n, cap);
        }
        close(pfd[0]);
        ck_assert_int_eq(waitpid(pid, &status, 0), pid);
        ck_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
        ck_assert_uint_gt(n, start);
        for (size_t i = start; i < n; i++) {
            struct aamm_snowflake_parts p;
            aamm_snowflake_decode(ids[i], &p);
            FAST_CHECK(p.node_id == 345, "not an id of node 345: %ld", (long)ids[i]);
            if (p.unix_ms > max_ms)
                max_ms = p.unix_ms;
        }
        if (max_ms > killed_at)
            ahead_runs++;
        /* the next child starts at once */
    }
    ck_assert_int_ge(ahead_runs, 1); /* the children did borrow */
    qsort(ids, n, sizeof *ids, cmp_i64);
    for (size_t i = 1; i < n; i++)
        FAST_CHECK(ids[i] != ids[i - 1], "id %ld issued twice (%zu ids)", (long)ids[i], n);
    free(ids);
}
END_TEST

/* ==== UUIDv7 ========================================================================== */

/* Version 7 and variant 10 bits, and the timestamp is the clock's millisecond. */
START_TEST(uuidv7_bits)
{
    struct fake_clock clk = {.now = INT64_C(1645557742000)};
    struct aamm_uuidv7_options o = {.clock = fake_ms, .clock_arg = &clk};
    struct aamm_uuidv7 *g;
    uint8_t u[16];
    char text[AAMM_UUIDV7_STRLEN];
    ck_assert_int_eq(aamm_uuidv7_new(&g, &o, NULL, 0), 0);
    for (int i = 0; i < 1000; i++) {
        ck_assert_int_eq(aamm_uuidv7_next(g, u), 0);
        ck_assert_int_eq(u[6] >> 4, 7);
        ck_assert_int_eq(u[8] >> 6, 2);
        ck_assert_int_eq(aamm_uuidv7_unix_ms(u), INT64_C(1645557742000));
    }
    aamm_uuidv7_format(u, text);
    ck_assert_int_eq(strlen(text), 36);
    ck_assert_int_eq(strncmp(text, "017f22e2-79b0-7", 15), 0);
    ck_assert(text[19] == '8' || text[19] == '9' || text[19] == 'a' || text[19] == 'b');
    aamm_uuidv7_free(g);
}
END_TEST

/* Formatting and parsing round trip; the RFC 9562 appendix A.6 example parses to its
 * timestamp; malformed texts are refused without writing. */
START_TEST(uuid_text)
{
    uint8_t u[16], v[16];
    char text[AAMM_UUIDV7_STRLEN];
    memset(v, 0xEE, sizeof v);
    ck_assert_int_eq(aamm_uuidv7_parse("017F22E2-79B0-7CC3-98C4-DC0C0C07398F", u), 0);
    ck_assert_int_eq(aamm_uuidv7_unix_ms(u), INT64_C(0x017F22E279B0));
    ck_assert_str_eq(aamm_uuidv7_format(u, text), "017f22e2-79b0-7cc3-98c4-dc0c0c07398f");
    ck_assert_int_eq(aamm_uuidv7_parse(text, v), 0);
    ck_assert_mem_eq(u, v, 16);
    memset(v, 0xEE, sizeof v);
    ck_assert_int_eq(aamm_uuidv7_parse("017f22e2-79b0-7cc3-98c4-dc0c0c07398", v), AAMM_EMALFORMED);
    ck_assert_int_eq(aamm_uuidv7_parse("017f22e2x79b0-7cc3-98c4-dc0c0c07398f", v), AAMM_EMALFORMED);
    ck_assert_int_eq(aamm_uuidv7_parse("017f22e2-79b0-7cc3-98c4-dc0c0c07398g", v), AAMM_EMALFORMED);
    ck_assert_int_eq(aamm_uuidv7_parse(NULL, v), AAMM_EMALFORMED);
    ck_assert_int_eq(v[0], 0xEE);
}
END_TEST

/* 1,000,000 UUIDs from the real clock: strictly increasing byte-wise (so also in time
 * order) and all unique; the timestamps follow the wall clock. */
START_TEST(uuidv7_million_unique_ordered)
{
    long n = aamm_test_scaled(1000000, 20000);
    uint8_t(*u)[16] = malloc((size_t)n * 16);
    struct aamm_uuidv7 *g;
    int64_t before = aamm__wall_us() / 1000, after;
    ck_assert_ptr_nonnull(u);
    ck_assert_int_eq(aamm_uuidv7_new(&g, NULL, NULL, 0), 0);
    for (long i = 0; i < n; i++) {
        FAST_CHECK(aamm_uuidv7_next(g, u[i]) == 0, "next failed");
        FAST_CHECK(i == 0 || memcmp(u[i - 1], u[i], 16) < 0, "uuid %ld not above the previous", i);
        FAST_CHECK((u[i][6] >> 4) == 7 && (u[i][8] >> 6) == 2, "version/variant bits");
    }
    after = aamm__wall_us() / 1000;
    ck_assert_int_ge(aamm_uuidv7_unix_ms(u[0]), before);
    ck_assert_int_le(aamm_uuidv7_unix_ms(u[n - 1]), after + 1);
    qsort(u, (size_t)n, 16, cmp_uuid);
    for (long i = 1; i < n; i++)
        FAST_CHECK(memcmp(u[i - 1], u[i], 16) != 0, "duplicate uuid");
    aamm_uuidv7_free(g);
    free(u);
}
END_TEST

/* Within one millisecond and across a backward clock step, the counter keeps UUIDs
 * increasing (RFC 9562 method 1): the timestamp stays at the latest time seen. */
START_TEST(uuidv7_monotonic_same_ms_and_backward)
{
    struct fake_clock clk = {.now = T0};
    struct aamm_uuidv7_options o = {.clock = fake_ms, .clock_arg = &clk};
    struct aamm_uuidv7 *g;
    uint8_t prev[16], u[16];
    ck_assert_int_eq(aamm_uuidv7_new(&g, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_uuidv7_next(g, prev), 0);
    for (int i = 0; i < 30000; i++) {
        if (i == 10000)
            clk.now = T0 - 5000; /* back five seconds */
        if (i == 20000)
            clk.now = T0 + 3;
        FAST_CHECK(aamm_uuidv7_next(g, u) == 0, "next failed");
        FAST_CHECK(memcmp(prev, u, 16) < 0, "uuid %d not above the previous", i);
        FAST_CHECK(aamm_uuidv7_unix_ms(u) == (i < 20000 ? T0 : T0 + 3), "timestamp at %d", i);
        memcpy(prev, u, 16);
    }
    aamm_uuidv7_free(g);
}
END_TEST

/* When the 30-bit counter would roll over, the timestamp advances by one millisecond. */
START_TEST(uuidv7_counter_rollover)
{
    struct fake_clock clk = {.now = T0};
    struct aamm_uuidv7_options o = {.clock = fake_ms, .clock_arg = &clk};
    struct aamm_uuidv7 *g;
    uint8_t a[16], b[16], c[16];
    ck_assert_int_eq(aamm_uuidv7_new(&g, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_uuidv7_next(g, a), 0);
    ck_assert_int_eq(aamm__uuidv7_set_counter(g, (1u << 30) - 2), 0);
    ck_assert_int_eq(aamm_uuidv7_next(g, b), 0);
    ck_assert_int_eq(aamm_uuidv7_unix_ms(b), T0);
    ck_assert_int_eq(b[6], 0x7F); /* counter all ones in rand_a */
    ck_assert_int_eq(aamm_uuidv7_next(g, c), 0);
    ck_assert_int_eq(aamm_uuidv7_unix_ms(c), T0 + 1);
    ck_assert(memcmp(a, b, 16) < 0 && memcmp(b, c, 16) < 0);
    aamm_uuidv7_free(g);
}
END_TEST

/* A forked child draws different random bits than its parent from the same state. */
START_TEST(uuidv7_fork_refills_random)
{
    struct fake_clock clk = {.now = T0};
    struct aamm_uuidv7_options o = {.clock = fake_ms, .clock_arg = &clk};
    struct aamm_uuidv7 *g;
    uint8_t u[16], mine[16], theirs[16];
    int fds[2], status;
    pid_t pid;
    ck_assert_int_eq(aamm_uuidv7_new(&g, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_uuidv7_next(g, u), 0); /* pool filled before fork */
    ck_assert_int_eq(pipe(fds), 0);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        if (aamm_uuidv7_next(g, u) != 0 || write(fds[1], u, 16) != 16)
            _exit(1);
        _exit(0);
    }
    close(fds[1]);
    ck_assert_int_eq(read(fds[0], theirs, 16), 16);
    close(fds[0]);
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert_int_eq(aamm_uuidv7_next(g, mine), 0);
    ck_assert(memcmp(mine + 10, theirs + 10, 6) != 0 || memcmp(mine, theirs, 10) != 0);
    aamm_uuidv7_free(g);
}
END_TEST

/* ==== galloc ========================================================================== */

/* A fake consensus: hands out consecutive ranges of one sequence to whoever asks. */
struct fake_cs {
    int64_t next;
};

static void serve(struct fake_cs *cs, struct aamm_galloc *g)
{
    uint64_t count;
    if (aamm_galloc_begin_request(g, &count) == 0) {
        FAST_CHECK(aamm_galloc_add_range(g, cs->next, cs->next + (int64_t)count) == 0, "add_range");
        cs->next += (int64_t)count;
    }
}

/* Three nodes fed disjoint ranges by one allocator, taking values in an interleaved
 * order, never issue the same value; each node's values increase. */
START_TEST(galloc_no_overlap_across_nodes)
{
    struct fake_cs cs = {.next = 1};
    struct aamm_galloc *g[3];
    long per = aamm_test_scaled(200000, 10000);
    int64_t *all = malloc(sizeof *all * (size_t)per * 3);
    int64_t prev[3] = {0, 0, 0};
    long k = 0;
    uint64_t seed = aamm_test_seed("galloc_no_overlap_across_nodes");
    ck_assert_ptr_nonnull(all);
    for (int i = 0; i < 3; i++) {
        struct aamm_galloc_options o = {.name = "public.t.id", .range_size = 100 + 37 * i};
        ck_assert_int_eq(aamm_galloc_new(&g[i], &o, NULL, 0), 0);
    }
    for (long i = 0; i < per * 3; i++) {
        int n = (int)(aamm_test_rand(&seed) % 3);
        int64_t v;
        if (k >= per * 3)
            break;
        serve(&cs, g[n]); /* consensus answers whenever a node is below its mark */
        FAST_CHECK(aamm_galloc_next(g[n], &v) == 0, "next: %s", aamm_galloc_errmsg(g[n]));
        FAST_CHECK(v > prev[n], "node %d not increasing", n);
        prev[n] = v;
        all[k++] = v;
    }
    qsort(all, (size_t)k, sizeof *all, cmp_i64);
    for (long i = 1; i < k; i++)
        FAST_CHECK(all[i] != all[i - 1], "value %ld issued twice", (long)all[i]);
    for (int i = 0; i < 3; i++)
        aamm_galloc_free(g[i]);
    free(all);
}
END_TEST

/* Prefetch: with the first range the client already wants the next one (holds current +
 * next); once it holds both it asks nothing until the values left fall to the low-water
 * mark; one request at a time. */
START_TEST(galloc_prefetch_low_water)
{
    struct aamm_galloc_options o = {.name = "s", .range_size = 100, .low_water = 30};
    struct aamm_galloc *g;
    uint64_t count = 0;
    int64_t v;
    ck_assert_int_eq(aamm_galloc_new(&g, &o, NULL, 0), 0);
    ck_assert(aamm_galloc_wants_range(g, &count));
    ck_assert_int_eq(count, 100);
    ck_assert_int_eq(aamm_galloc_begin_request(g, &count), 0);
    ck_assert(aamm_galloc_request_pending(g));
    ck_assert(!aamm_galloc_wants_range(g, NULL));
    ck_assert_int_eq(aamm_galloc_begin_request(g, &count), AAMM_EAGAIN); /* one in flight */
    ck_assert_int_eq(aamm_galloc_add_range(g, 1000, 1100), 0);
    ck_assert(!aamm_galloc_request_pending(g));
    ck_assert_int_eq(aamm_galloc_available(g), 100);
    ck_assert(!aamm_galloc_wants_range(g, NULL)); /* 100 left > 30 */
    for (int i = 0; i < 69; i++) {
        ck_assert_int_eq(aamm_galloc_next(g, &v), 0);
        ck_assert_int_eq(v, 1000 + i);
    }
    ck_assert(!aamm_galloc_wants_range(g, NULL)); /* 31 left */
    ck_assert_int_eq(aamm_galloc_next(g, &v), 0);
    ck_assert(aamm_galloc_wants_range(g, NULL)); /* 30 left: at the mark */
    ck_assert_int_eq(aamm_galloc_begin_request(g, &count), 0);
    ck_assert_int_eq(aamm_galloc_add_range(g, 5000, 5100), 0);
    ck_assert_int_eq(aamm_galloc_available(g), 130);
    for (int i = 0; i < 30; i++) /* the rest of the first range, then the second */
        ck_assert_int_eq(aamm_galloc_next(g, &v), 0);
    ck_assert_int_eq(v, 1099);
    ck_assert_int_eq(aamm_galloc_next(g, &v), 0);
    ck_assert_int_eq(v, 5000);
    aamm_galloc_free(g);

    /* default low water = range size: current and next range held */
    o.low_water = 0;
    ck_assert_int_eq(aamm_galloc_new(&g, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_galloc_begin_request(g, &count), 0);
    ck_assert_int_eq(aamm_galloc_add_range(g, 1, 101), 0);
    ck_assert(aamm_galloc_wants_range(g, NULL));
    ck_assert_int_eq(aamm_galloc_begin_request(g, &count), 0);
    ck_assert_int_eq(aamm_galloc_add_range(g, 201, 301), 0);
    ck_assert(!aamm_galloc_wants_range(g, NULL));
    ck_assert_int_eq(aamm_galloc_next(g, &v), 0);
    ck_assert(!aamm_galloc_wants_range(g, NULL));
    aamm_galloc_free(g);
}
END_TEST

/* Partitioned (requests fail, no new ranges): the node keeps issuing exactly the values
 * it holds, then reports AAMM_EEXHAUSTED with a message naming the failure; a range that
 * arrives later makes it issue again. */
START_TEST(galloc_partition_then_exhausted)
{
    struct aamm_galloc_options o = {.name = "app.orders.id", .range_size = 50};
    struct aamm_galloc *g;
    uint64_t count;
    int64_t v = -7;
    int issued = 0;
    ck_assert_int_eq(aamm_galloc_new(&g, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_galloc_next(g, &v), AAMM_EEXHAUSTED); /* nothing held yet */
    ck_assert_int_eq(v, -7);
    ck_assert_int_eq(aamm_galloc_begin_request(g, &count), 0);
    ck_assert_int_eq(aamm_galloc_add_range(g, 1, 51), 0);
    ck_assert_int_eq(aamm_galloc_begin_request(g, &count), 0);
    ck_assert_int_eq(aamm_galloc_add_range(g, 101, 151), 0);
    /* partition: every later request times out */
    for (;;) {
        if (aamm_galloc_begin_request(g, &count) == 0)
            aamm_galloc_cancel_request(g, AAMM_ETIMEDOUT, "no majority");
        if (aamm_galloc_next(g, &v) != 0)
            break;
        issued++;
    }
    ck_assert_int_eq(issued, 100);
    ck_assert_int_eq(v, 150);
    ck_assert_int_eq(aamm_galloc_next(g, &v), AAMM_EEXHAUSTED);
    ck_assert_ptr_nonnull(strstr(aamm_galloc_errmsg(g), "app.orders.id"));
    ck_assert_ptr_nonnull(strstr(aamm_galloc_errmsg(g), "no values left"));
    ck_assert_ptr_nonnull(strstr(aamm_galloc_errmsg(g), "AAMM_ETIMEDOUT: no majority"));
    /* healed */
    ck_assert_int_eq(aamm_galloc_begin_request(g, &count), 0);
    ck_assert_int_eq(aamm_galloc_add_range(g, 301, 351), 0);
    ck_assert_int_eq(aamm_galloc_next(g, &v), 0);
    ck_assert_int_eq(v, 301);
    aamm_galloc_free(g);
}
END_TEST

/* Ranges that are empty, negative, overlapping or below earlier ones are refused and
 * change nothing; too many held ranges give AAMM_ETOOBIG. */
START_TEST(galloc_add_range_checks)
{
    struct aamm_galloc_options o = {.name = "s", .range_size = 10, .max_ranges = 2};
    struct aamm_galloc *g;
    int64_t v;
    ck_assert_int_eq(aamm_galloc_new(&g, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_galloc_add_range(g, 10, 10), AAMM_EINVAL);
    ck_assert_int_eq(aamm_galloc_add_range(g, -5, 10), AAMM_EINVAL);
    ck_assert_int_eq(aamm_galloc_add_range(g, 100, 110), 0);
    ck_assert_int_eq(aamm_galloc_add_range(g, 105, 120), AAMM_EINVAL);
    ck_assert_int_eq(aamm_galloc_add_range(g, 50, 60), AAMM_EINVAL);
    ck_assert_ptr_nonnull(strstr(aamm_galloc_errmsg(g), "not above"));
    ck_assert_int_eq(aamm_galloc_add_range(g, 110, 120), 0);
    ck_assert_int_eq(aamm_galloc_add_range(g, 200, 210), AAMM_ETOOBIG);
    ck_assert_int_eq(aamm_galloc_available(g), 20);
    for (int i = 0; i < 10; i++)
        ck_assert_int_eq(aamm_galloc_next(g, &v), 0);
    ck_assert_int_eq(aamm_galloc_add_range(g, 200, 210), 0); /* first range used up */
    ck_assert_int_eq(aamm_galloc_available(g), 20);
    aamm_galloc_free(g);
}
END_TEST

/* Bad options are refused; resume_after skips values already issued by a previous run
 * that are fed again. */
START_TEST(galloc_options_and_resume)
{
    struct aamm_galloc_options o = {0};
    struct aamm_galloc *g = (void *)1;
    char longname[300];
    char err[128];
    int64_t v;
    ck_assert_int_eq(aamm_galloc_new(&g, &o, err, sizeof err), AAMM_EINVAL);
    ck_assert_ptr_null(g);
    ck_assert_str_eq(err, "galloc: no sequence name");
    o.name = "";
    ck_assert_int_eq(aamm_galloc_new(&g, &o, err, sizeof err), AAMM_EINVAL);
    ck_assert_str_eq(err, "galloc: sequence name must be 1..255 bytes");
    memset(longname, 'x', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    o.name = longname;
    ck_assert_int_eq(aamm_galloc_new(&g, &o, NULL, 0), AAMM_EINVAL);
    o.name = "s";
    o.range_size = -1;
    ck_assert_int_eq(aamm_galloc_new(&g, &o, NULL, 0), AAMM_EINVAL);
    o.range_size = 0;
    o.resume_after = 1005;
    ck_assert_int_eq(aamm_galloc_new(&g, &o, NULL, 0), 0);
    ck_assert_str_eq(aamm_galloc_name(g), "s");
    ck_assert_int_eq(aamm_galloc_add_range(g, 1000, 2000), 0);
    ck_assert_int_eq(aamm_galloc_next(g, &v), 0);
    ck_assert_int_eq(v, 1006);
    ck_assert_int_eq(aamm_galloc_available(g), 993);
    ck_assert_int_eq(aamm_galloc_pump(g), 0); /* not attached: nothing to do */
    aamm_galloc_free(g);
}
END_TEST

/* take_range hands the lowest held range (its unused part) to the host and the client
 * then wants the next one; nothing held: AAMM_EEXHAUSTED. */
START_TEST(galloc_take_range)
{
    struct aamm_galloc_options o = {.name = "s", .range_size = 100};
    struct aamm_galloc *g;
    int64_t a = 0, b = 0, v;
    ck_assert_int_eq(aamm_galloc_new(&g, &o, NULL, 0), 0);
    ck_assert_int_eq(aamm_galloc_take_range(g, &a, &b), AAMM_EEXHAUSTED);
    ck_assert_int_eq(aamm_galloc_add_range(g, 1, 101), 0);
    ck_assert_int_eq(aamm_galloc_add_range(g, 301, 401), 0);
    ck_assert_int_eq(aamm_galloc_next(g, &v), 0);
    ck_assert(!aamm_galloc_wants_range(g, NULL));
    ck_assert_int_eq(aamm_galloc_take_range(g, &a, &b), 0);
    ck_assert_int_eq(a, 2);
    ck_assert_int_eq(b, 101);
    ck_assert(aamm_galloc_wants_range(g, NULL));
    ck_assert_int_eq(aamm_galloc_take_range(g, &a, &b), 0);
    ck_assert_int_eq(a, 301);
    ck_assert_int_eq(b, 401);
    ck_assert_int_eq(aamm_galloc_available(g), 0);
    ck_assert_int_eq(aamm_galloc_next(g, &v), AAMM_EEXHAUSTED);
    aamm_galloc_free(g);
}
END_TEST

/* Every allocation failure during construction gives AAMM_ENOMEM and leaks nothing. */
START_TEST(alloc_failures)
{
    struct aamm_memory_stats before, after;
    int ok = 0;
    aamm_memory_stats(&before);
    for (uint64_t n = 1; n < 10 && !ok; n++) {
        struct aamm_galloc_options go = {.name = "s"};
        struct aamm_snowflake_options so = {.node_id = 1};
        struct aamm_galloc *g = NULL;
        struct aamm_snowflake *s = NULL;
        struct aamm_uuidv7 *u = NULL;
        int r1, r2, r3;
        aamm__alloc_fail_after(n);
        r1 = aamm_galloc_new(&g, &go, NULL, 0);
        r2 = aamm_snowflake_new(&s, &so, NULL, 0);
        r3 = aamm_uuidv7_new(&u, NULL, NULL, 0);
        aamm__alloc_fail_after(0);
        ck_assert(r1 == 0 || r1 == AAMM_ENOMEM);
        ck_assert(r2 == 0 || r2 == AAMM_ENOMEM);
        ck_assert(r3 == 0 || r3 == AAMM_ENOMEM);
        ok = r1 == 0 && r2 == 0 && r3 == 0;
        aamm_galloc_free(g);
        aamm_snowflake_free(s);
        aamm_uuidv7_free(u);
    }
    ck_assert(ok);
    aamm_memory_stats(&after);
    ck_assert_int_eq(after.in_use, before.in_use);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("seq");
    TCase *tc = aamm_test_tcase("snowflake", 20);
    tcase_add_test(tc, snowflake_layout);
    tcase_add_test(tc, snowflake_node_range);
    tcase_add_test(tc, snowflake_three_nodes_unique_monotonic);
    tcase_add_test(tc, snowflake_counter_full_borrows);
    tcase_add_test(tc, snowflake_max_borrow_waits);
    tcase_add_test(tc, snowflake_resume_after_restart);
    tcase_add_test(tc, snowflake_time_range_end);
    tcase_add_test(tc, snowflake_restart_after_borrowing);
    tcase_add_test(tc, snowflake_blocking_waits_for_clock);
    tcase_add_test(tc, snowflake_crash_restart_fork);
    suite_add_tcase(s, tc);
    tc = aamm_test_tcase("uuidv7", 20);
    tcase_add_test(tc, uuidv7_bits);
    tcase_add_test(tc, uuid_text);
    tcase_add_test(tc, uuidv7_million_unique_ordered);
    tcase_add_test(tc, uuidv7_monotonic_same_ms_and_backward);
    tcase_add_test(tc, uuidv7_counter_rollover);
    tcase_add_test(tc, uuidv7_fork_refills_random);
    suite_add_tcase(s, tc);
    tc = aamm_test_tcase("galloc", 20);
    tcase_add_test(tc, galloc_no_overlap_across_nodes);
    tcase_add_test(tc, galloc_prefetch_low_water);
    tcase_add_test(tc, galloc_partition_then_exhausted);
    tcase_add_test(tc, galloc_add_range_checks);
    tcase_add_test(tc, galloc_options_and_resume);
    tcase_add_test(tc, galloc_take_range);
    tcase_add_test(tc, alloc_failures);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
