/*
 * bench_consensus.c: three consensus nodes on 127.0.0.1 in one process (one poll loop,
 * real raft_uv disk I/O and our PSK transport), default raft timeouts unless told.
 * Prints BENCH lines:
 *   consensus_commit_p50_ms / _p99_ms        no-op commands submitted on the leader, one at a time
 *   consensus_galloc_leader_p50_ms / _p99_ms galloc ranges requested on the leader
 *   consensus_galloc_follower_p50_ms / _p99  galloc ranges requested on a follower (forwarded)
 *   consensus_failover_ms                    median time from the leader vanishing to a new one
 * Usage: bench_consensus [samples (2000)] [election_ms (1000)] [heartbeat_ms (100)]
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <aamm/consensus.h>

#define N 3

static struct aamm_consensus *cs[N];
static char addr[N][64], dir[N][300], name[N][16];
static struct aamm_consensus_member members[N];
static unsigned election = 1000, heartbeat = 100;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int free_port(void)
{
    struct sockaddr_in sa;
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM, 0), port;
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0)
        exit(1);
    getsockname(fd, (struct sockaddr *)&sa, &len);
    port = ntohs(sa.sin_port);
    close(fd);
    return port;
}

static void open_node(int i, int boot)
{
    struct aamm_consensus_options o;
    char err[512];
    memset(&o, 0, sizeof(o));
    o.node_id = (uint64_t)i + 1;
    o.raft_address = addr[i];
    o.data_dir = dir[i];
    o.cluster_name = "bench";
    o.secret = "bench-secret-0123456789";
    o.secret_len = 23;
    o.election_timeout_ms = election;
    o.heartbeat_timeout_ms = heartbeat;
    if (aamm_consensus_new(&cs[i], &o, err, sizeof(err)) != 0) {
        fprintf(stderr, "new: %s\n", err);
        exit(1);
    }
    if (boot && aamm_consensus_bootstrap(cs[i], members, N) != 0)
        exit(1);
    if (aamm_consensus_start(cs[i]) != 0) {
        fprintf(stderr, "start: %s\n", aamm_consensus_errmsg(cs[i]));
        exit(1);
    }
}

static void run(int (*done)(void *), void *arg, double ms)
{
    double end = now_ms() + ms;
    while (!(done && done(arg)) && now_ms() < end) {
        struct pollfd p[N];
        int i, n = 0, t = 50;
        for (i = 0; i < N; i++) {
            int ti;
            if (!cs[i])
                continue;
            p[n].fd = aamm_consensus_fd(cs[i]);
            p[n].events = POLLIN;
            p[n].revents = 0;
            n++;
            ti = aamm_consensus_timeout(cs[i]);
            if (ti >= 0 && ti < t)
                t = ti;
        }
        poll(p, (nfds_t)n, t);
        for (i = 0; i < N; i++)
            if (cs[i])
                aamm_consensus_step(cs[i]);
    }
}

static int leader(void)
{
    int i;
    for (i = 0; i < N; i++)
        if (cs[i] && aamm_consensus_state(cs[i]) == AAMM_CONSENSUS_LEADER)
            return i;
    return -1;
}

static int has_leader(void *arg)
{
    (void)arg;
    return leader() >= 0;
}

static int flag_set(void *arg)
{
    return *(int *)arg != 0;
}

static void done_cb(struct aamm_consensus *c, int status, void *arg)
{
    (void)c;
    *(int *)arg = status == 0 ? 1 : -1;
}

static void galloc_cb(struct aamm_consensus *c, int status, int64_t s, int64_t e, void *arg)
{
    (void)c;
    (void)s;
    (void)e;
    *(int *)arg = status == 0 ? 1 : -1;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void report(const char *what, double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_d);
    printf("BENCH %s_p50_ms %.3f ms\n", what, v[n / 2]);
    printf("BENCH %s_p99_ms %.3f ms\n", what, v[(n * 99) / 100]);
}

int main(int argc, char **argv)
{
    int samples = argc > 1 ? atoi(argv[1]) : 2000, i, k;
    double *lat = calloc((size_t)samples, sizeof(double)), fo[5];
    char base[] = "/tmp/aamm-bench-cs-XXXXXX", cmd[400];
    if (argc > 2)
        election = (unsigned)atoi(argv[2]);
    if (argc > 3)
        heartbeat = (unsigned)atoi(argv[3]);
    aamm_consensus_ignore_sigpipe();
    if (mkdtemp(base) == NULL)
        return 1;
    for (i = 0; i < N; i++) {
        snprintf(addr[i], sizeof(addr[i]), "127.0.0.1:%d", free_port());
        snprintf(dir[i], sizeof(dir[i]), "%s/n%d", base, i + 1);
        snprintf(name[i], sizeof(name[i]), "n%d", i + 1);
        members[i].node_id = (uint64_t)i + 1;
        members[i].name = name[i];
        members[i].link_address = "";
        members[i].raft_address = addr[i];
    }
    for (i = 0; i < N; i++)
        open_node(i, 1);
    run(has_leader, NULL, 20000);
    if (leader() < 0)
        return 1;
    /* 1. raw commit latency: no-ops on the leader, one in flight */
    for (k = 0; k < samples; k++) {
        int done = 0, l = leader();
        double t0 = now_ms();
        if (l < 0 || aamm_consensus_noop(cs[l], done_cb, &done) != 0)
            return 1;
        run(flag_set, &done, 10000);
        lat[k] = now_ms() - t0;
    }
    report("consensus_commit", lat, samples);
    /* 2. galloc ranges through consensus, on the leader and on a follower */
    for (k = 0; k < samples; k++) {
        int done = 0, l = leader();
        double t0 = now_ms();
        if (aamm_consensus_galloc(cs[l], "bench", 1000, 0, galloc_cb, &done) != 0)
            return 1;
        run(flag_set, &done, 10000);
        lat[k] = now_ms() - t0;
    }
    report("consensus_galloc_leader", lat, samples);
    for (k = 0; k < samples; k++) {
        int done = 0, f = (leader() + 1) % N;
        double t0 = now_ms();
        if (aamm_consensus_galloc(cs[f], "bench", 1000, 0, galloc_cb, &done) != 0)
            return 1;
        run(flag_set, &done, 10000);
        lat[k] = now_ms() - t0;
    }
    report("consensus_galloc_follower", lat, samples);
    /* 3. fail-over: the leader's process state vanishes (handle freed: sockets close), the
     * others need an election timeout to notice and elect */
    for (k = 0; k < 5; k++) {
        int l = leader();
        double t0;
        aamm_consensus_free(cs[l]);
        cs[l] = NULL;
        t0 = now_ms();
        run(has_leader, NULL, 30000);
        fo[k] = now_ms() - t0;
        open_node(l, 0);
        run(NULL, NULL, 500);
    }
    qsort(fo, 5, sizeof(double), cmp_d);
    printf("BENCH consensus_failover_ms %.0f ms\n", fo[2]);
    printf("BENCH consensus_failover_max_ms %.0f ms\n", fo[4]);
    for (i = 0; i < N; i++)
        aamm_consensus_free(cs[i]);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", base);
    if (system(cmd) != 0)
        return 1;
    free(lat);
    return 0;
}
