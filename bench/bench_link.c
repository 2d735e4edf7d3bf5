/*
 * bench_link.c: link throughput over loopback: a sender and a receiver in one process (one
 * poll loop, so both share one core's worth of time), authenticated with per-frame HMAC,
 * streaming pgbench-shaped transactions (4 changes, ~300 bytes of values) and bulk
 * transactions (100 rows of ~120 bytes). Prints BENCH lines (txns/s, MB/s of value bytes).
 */
#include "config.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <aamm/link.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static struct aamm_column cols[4] = {{"aid", "integer", 23, -1, 1},
                                     {"bid", "integer", 23, -1, 0},
                                     {"abalance", "integer", 23, -1, 0},
                                     {"filler", "character(84)", 1042, 88, 0}};
static struct aamm_relation rel = {1, "public", "pgbench_accounts", 'd', 4, cols, 1};

static void add(struct pollfd *fds, int *n, struct aamm_link *l, int *t)
{
    int ev = aamm_link_events(l), to = aamm_link_timeout(l);
    if (aamm_link_fd(l) < 0)
        return;
    fds[*n].fd = aamm_link_fd(l);
    fds[*n].events =
        (short)(((ev & AAMM_READ) ? POLLIN : 0) | ((ev & AAMM_WRITE) ? POLLOUT : 0));
    (*n)++;
    if (to >= 0 && to < *t)
        *t = to;
}

static int run(const char *name, long ntx, int nch, int vlen)
{
    static const uint32_t p1[] = {2}, p2[] = {1};
    const char *secret = "benchmark secret 0123456789";
    struct aamm_link_options so = {0}, ro;
    struct aamm_link *s, *r;
    struct sockaddr_in sa;
    socklen_t sl = sizeof sa;
    int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    char port[16], *val = malloc((size_t)vlen + 1);
    long i = 0, got = 0;
    int j = -1;
    double t0, dt;
    uint64_t bytes = 0;
    memset(val, 'x', (size_t)vlen);
    for (int k = 0; k < vlen; k += 7)
        val[k] = (char)('a' + k % 26);
    val[vlen] = '\0';
    so.role = AAMM_LINK_SENDER;
    so.node_id = 1;
    so.cluster = "bench";
    so.peer_ids = p1;
    so.npeer_ids = 1;
    so.secret = (const uint8_t *)secret;
    so.secret_len = strlen(secret);
    ro = so;
    ro.role = AAMM_LINK_RECEIVER;
    ro.node_id = 2;
    ro.peer_ids = p2;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) || listen(lfd, 4) ||
        getsockname(lfd, (struct sockaddr *)&sa, &sl))
        return 1;
    snprintf(port, sizeof port, "%d", ntohs(sa.sin_port));
    if (aamm_link_new(&s, &so, NULL, 0) || aamm_link_new(&r, &ro, NULL, 0) || aamm_link_connect(s, "127.0.0.1", port))
        return 1;
    {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0 || aamm_link_adopt_fd(r, fd))
            return 1;
    }
    t0 = 0;
    while (got < ntx) {
        struct pollfd fds[2];
        int n = 0, t = 10;
        struct aamm_wire_event ev;
        if (aamm_link_state(s) == AAMM_LINK_READY) {
            if (t0 == 0)
                t0 = now_s();
            for (int k = 0; k < 10000 && i < ntx; k++) {
                struct aamm_transaction txn = {
                    1, (uint32_t)i, 1000 + (uint64_t)i * 100, 1040 + (uint64_t)i * 100, 1, NULL, 0};
                int rc;
                if (j < 0) {
                    if ((rc = aamm_link_send_begin(s, &txn)) != 0)
                        break;
                    j = 0;
                }
                while (j < nch) {
                    char a[16];
                    struct aamm_value v[4] = {{AAMM_VALUE_TEXT, 0, a},
                                              {AAMM_VALUE_TEXT, 1, "1"},
                                              {AAMM_VALUE_TEXT, 4, "-123"},
                                              {AAMM_VALUE_TEXT, (uint32_t)vlen, val}};
                    struct aamm_change ch = {
                        .kind = AAMM_CHANGE_UPDATE, .relation = &rel, .new_tuple = {4, v}};
                    v[0].len = (uint32_t)snprintf(a, sizeof a, "%ld", (i * 7 + j) % 100000);
                    if ((rc = aamm_link_send_change(s, &ch)) != 0)
                        break;
                    bytes += v[0].len + 5 + (uint32_t)vlen;
                    j++;
                }
                if (j < nch)
                    break;
                aamm_link_send_commit(s, &txn);
                j = -1;
                i++;
            }
        }
        add(fds, &n, s, &t);
        add(fds, &n, r, &t);
        poll(fds, (nfds_t)n, t);
        if (aamm_link_step(s) < 0 || aamm_link_step(r) < 0) {
            fprintf(stderr, "%s / %s\n", aamm_link_errmsg(s), aamm_link_errmsg(r));
            return 1;
        }
        while (aamm_link_recv(r, &ev) == 0)
            if (ev.kind == AAMM_WIRE_EV_COMMIT && ++got % 1000 == 0)
                aamm_link_ack(r, 1, ev.txn.end_lsn);
    }
    dt = now_s() - t0;
    printf("BENCH link_%s_txns %.0f txns/s\n", name, (double)ntx / dt);
    printf("BENCH link_%s_mbps %.1f MB/s\n", name, (double)bytes / dt / 1e6);
    aamm_link_free(s);
    aamm_link_free(r);
    close(lfd);
    free(val);
    return 0;
}

int main(int argc, char **argv)
{
    double scale = argc > 1 ? atof(argv[1]) : 1.0;
    int rc = run("pgbench", (long)(200000 * scale), 4, 84);
    rc |= run("bulk", (long)(5000 * scale), 100, 120);
    return rc;
}
