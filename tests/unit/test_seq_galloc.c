/* test_seq_galloc.c: the galloc client attached to real consensus nodes (three members in
 * this process, on loopback, driven by one poll loop): ranges only from the locally
 * applied state, no value twice across members, prefetch so that issuing never waits,
 * and a member cut off from the majority issuing what it holds, then AAMM_EEXHAUSTED. */
#include "config.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <aamm/consensus.h>
#include <aamm/seq.h>

#include "testutil.h"

#define N 3
#define SECRET "seq-galloc-test-secret-0123456789"

struct cluster {
    char base[128];
    char dir[N][160];
    char addr[N][32];
    char name[N][16];
    struct aamm_consensus_member m[N];
    struct aamm_consensus *cs[N];
    struct aamm_galloc *g[N];
};


static void cluster_start(struct cluster *c, int64_t range_size)
{
    memset(c, 0, sizeof *c);
    aamm_consensus_ignore_sigpipe(); /* raft writes with write(2): see consensus.h */
    snprintf(c->base, sizeof c->base, "/tmp/aamm-seqga-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(c->base));
    for (int i = 0; i < N; i++) {
        snprintf(c->dir[i], sizeof c->dir[i], "%s/n%d", c->base, i + 1);
        snprintf(c->addr[i], sizeof c->addr[i], "127.0.0.1:%d", aamm_test_free_port());
        snprintf(c->name[i], sizeof c->name[i], "node%d", i + 1);
        c->m[i].node_id = (uint64_t)i + 1;
        c->m[i].name = c->name[i];
        c->m[i].link_address = "-";
        c->m[i].raft_address = c->addr[i];
    }
    for (int i = 0; i < N; i++) {
        struct aamm_consensus_options o;
        struct aamm_galloc_options go = {.name = "public.orders.id", .range_size = range_size};
        char err[512];
        memset(&o, 0, sizeof o);
        o.node_id = (uint64_t)i + 1;
        o.raft_address = c->addr[i];
        o.data_dir = c->dir[i];
        o.cluster_name = "seq";
        o.secret = SECRET;
        o.secret_len = strlen(SECRET);
        o.election_timeout_ms = 300;
        o.heartbeat_timeout_ms = 30;
        o.request_timeout_ms = 1500;
        ck_assert_msg(aamm_consensus_new(&c->cs[i], &o, err, sizeof err) == 0, "%s", err);
        ck_assert_int_eq(aamm_consensus_bootstrap(c->cs[i], c->m, N), 0);
        ck_assert_int_eq(aamm_consensus_start(c->cs[i]), 0);
        ck_assert_int_eq(aamm_galloc_new(&c->g[i], &go, NULL, 0), 0);
        ck_assert_int_eq(aamm_galloc_attach(c->g[i], c->cs[i]), 0);
    }
}

static void cluster_stop(struct cluster *c)
{
    char cmd[200];
    for (int i = 0; i < N; i++) {
        aamm_galloc_free(c->g[i]); /* before its consensus: orphans a request in flight */
        aamm_consensus_free(c->cs[i]);
    }
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", c->base);
    if (system(cmd) != 0)
        fprintf(stderr, "cleanup of %s failed\n", c->base);
}

/* One round of the host loop: wait for any consensus fd (at most 5 ms), step each. */
static void cluster_step(struct cluster *c)
{
    struct pollfd pfd[N];
    int n = 0, t = 5;
    for (int i = 0; i < N; i++) {
        int ti;
        if (c->cs[i] == NULL)
            continue;
        pfd[n].fd = aamm_consensus_fd(c->cs[i]);
        pfd[n].events = POLLIN;
        pfd[n].revents = 0;
        n++;
        ti = aamm_consensus_timeout(c->cs[i]);
        if (ti >= 0 && ti < t)
            t = ti;
    }
    (void)poll(pfd, (nfds_t)n, t);
    for (int i = 0; i < N; i++)
        if (c->cs[i] != NULL) {
            ck_assert_int_eq(aamm_consensus_step(c->cs[i]), 0);
            (void)aamm_galloc_pump(c->g[i]);
        }
}

struct issued {
    int64_t *v;
    size_t n, cap;
};

static void push(struct issued *s, int64_t v)
{
    if (s->n == s->cap) {
        s->cap = s->cap ? s->cap * 2 : 4096;
        s->v = realloc(s->v, s->cap * sizeof *s->v);
        ck_assert_ptr_nonnull(s->v);
    }
    s->v[s->n++] = v;
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* Take one value on member @i: it must come from the state applied on that member. */
static int take(struct cluster *c, int i, struct issued *s, int64_t *prev)
{
    int64_t v, applied = 0;
    int rc = aamm_galloc_next(c->g[i], &v);
    if (rc != 0)
        return rc;
    ck_assert_int_eq(aamm_consensus_galloc_next(c->cs[i], "public.orders.id", &applied), 0);
    if (v >= applied)
        ck_abort_msg("member %d issued %ld, beyond its applied state (next %ld)", i, (long)v,
                     (long)applied);
    if (v <= *prev)
        ck_abort_msg("member %d: %ld after %ld", i, (long)v, (long)*prev);
    *prev = v;
    push(s, v);
    return 0;
}

/* Every member attached to consensus issues values from ranges applied locally; after its
 * first range arrives issuing never waits (the next range is prefetched in time); no value
 * is issued twice across members. Then two members go away: the remaining one, without a
 * majority, keeps issuing exactly what it holds, then reports AAMM_EEXHAUSTED with a
 * message naming the timed-out request; it never issues a value twice either. */
START_TEST(attached_members_unique_prefetch_partition)
{
    struct cluster c;
    struct issued all = {0};
    int64_t prev[N] = {0, 0, 0};
    long per = aamm_test_scaled(6000, 1500);
    long got[N] = {0, 0, 0}, waits_after_first[N] = {0, 0, 0};
    int64_t deadline = aamm_test_now_ms() + 60000;
    bool done = false;
    int64_t held;
    long after_cut = 0;
    int rc;
    int64_t last_round = 0;
    cluster_start(&c, 1000);
    /* phase 1: all members, 4 values per member and millisecond (paced, so a prefetched
     * range of 1,000 lasts at least 250 ms: several raft heartbeats) */
    while (!done) {
        ck_assert_msg(aamm_test_now_ms() < deadline, "phase 1 too slow: %ld %ld %ld", got[0],
                      got[1], got[2]);
        cluster_step(&c);
        if (aamm_test_now_ms() == last_round)
            continue;
        last_round = aamm_test_now_ms();
        done = true;
        for (int i = 0; i < N; i++) {
            for (int k = 0; k < 4 && got[i] < per; k++) {
                rc = take(&c, i, &all, &prev[i]);
                if (rc == 0)
                    got[i]++;
                else {
                    ck_assert_int_eq(rc, AAMM_EEXHAUSTED);
                    if (got[i] > 0)
                        waits_after_first[i]++;
                    break;
                }
            }
            if (got[i] < per)
                done = false;
        }
    }
    for (int i = 0; i < N; i++)
        ck_assert_msg(waits_after_first[i] == 0, "member %d waited %ld times", i,
                      waits_after_first[i]);
    /* quiesce: let member 3 finish its prefetch so what it holds is known exactly */
    while (aamm_galloc_request_pending(c.g[2])) {
        ck_assert_msg(aamm_test_now_ms() < deadline, "prefetch did not finish");
        cluster_step(&c);
    }
    /* phase 2: members 1 and 2 vanish; member 3 is alone (1 of 3: no majority) */
    for (int i = 0; i < 2; i++) {
        aamm_galloc_free(c.g[i]);
        c.g[i] = NULL;
        aamm_consensus_free(c.cs[i]);
        c.cs[i] = NULL;
    }
    held = aamm_galloc_available(c.g[2]);
    ck_assert_int_gt(held, 0);
    deadline = aamm_test_now_ms() + 20000;
    for (;;) {
        ck_assert_msg(aamm_test_now_ms() < deadline, "no timeout reported");
        cluster_step(&c);
        rc = take(&c, 2, &all, &prev[2]);
        if (rc == 0) {
            after_cut++;
            continue;
        }
        ck_assert_int_eq(rc, AAMM_EEXHAUSTED);
        if (strstr(aamm_galloc_errmsg(c.g[2]), "AAMM_ETIMEDOUT") != NULL)
            break;
    }
    ck_assert_int_eq(after_cut, held); /* exactly what it held, nothing more */
    ck_assert_ptr_nonnull(strstr(aamm_galloc_errmsg(c.g[2]), "no values left"));
    ck_assert_ptr_nonnull(strstr(aamm_galloc_errmsg(c.g[2]), "public.orders.id"));
    qsort(all.v, all.n, sizeof *all.v, cmp_i64);
    for (size_t i = 1; i < all.n; i++)
        if (all.v[i] == all.v[i - 1])
            ck_abort_msg("value %ld issued twice", (long)all.v[i]);
    ck_assert_int_eq(all.n, (size_t)(per * N + after_cut));
    free(all.v);
    cluster_stop(&c);
}
END_TEST

/* attach refuses a second attachment while a request is in flight; detaching drops it. */
START_TEST(attach_busy_and_detach)
{
    struct cluster c;
    int64_t deadline = aamm_test_now_ms() + 20000;
    cluster_start(&c, 100);
    ck_assert_int_eq(aamm_galloc_pump(c.g[0]), 0);
    ck_assert(aamm_galloc_request_pending(c.g[0]));
    ck_assert_int_eq(aamm_galloc_attach(c.g[0], c.cs[1]), AAMM_EBUSY);
    ck_assert_int_eq(aamm_galloc_attach(c.g[0], NULL), 0);
    ck_assert(!aamm_galloc_request_pending(c.g[0]));
    ck_assert_int_eq(aamm_galloc_attach(c.g[0], c.cs[0]), 0);
    while (aamm_galloc_available(c.g[0]) == 0) {
        ck_assert(aamm_test_now_ms() < deadline);
        cluster_step(&c);
    }
    /* the orphaned request's range (if it was granted) is dropped, not added: the client
     * holds only the ranges of the new attachment */
    ck_assert_int_ge(aamm_galloc_available(c.g[0]), 100);
    ck_assert_int_le(aamm_galloc_available(c.g[0]), 200);
    cluster_stop(&c);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("seq_galloc");
    TCase *tc = aamm_test_tcase("consensus", 100);
    tcase_add_test(tc, attached_members_unique_prefetch_partition);
    tcase_add_test(tc, attach_busy_and_detach);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
