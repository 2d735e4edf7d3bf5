/*
 * test_link_kill.c: a sending agent and a receiving agent as separate processes, killed with
 * SIGKILL again and again while streaming. The receiver's durable state is an append-only
 * log of applied transactions (its "origin progress", written in the same write as the
 * data); the sender's is a confirmed position it persists from acks now and then (its
 * "slot"). After every restart, links resume from those files only. The applied log must be
 * exactly 0..N-1: in order, no gaps, no duplicates. (The same with capture from a real slot
 * needs the capture component.)
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <aamm/link.h>

#include "netfx.h"
#include "testutil.h"

#define SECRET "kill test secret, long enough"

static char dir[64], logpath[128], confpath[128];
static long ntx;
static const uint32_t peer_of_1[] = {2}, peer_of_2[] = {1};

static struct aamm_column cols[2] = {{"id", "integer", 23, -1, AAMM_COLUMN_KEY},
                                     {"v", "text", 25, -1, 0}};
static struct aamm_relation rel = {1, "public", "t", 'd', 2, cols, 1};

static struct aamm_link_options opts(int role)
{
    struct aamm_link_options o;
    memset(&o, 0, sizeof o);
    o.role = role;
    o.node_id = role == AAMM_LINK_SENDER ? 1 : 2;
    o.cluster = "kill";
    o.peer_ids = role == AAMM_LINK_SENDER ? peer_of_1 : peer_of_2;
    o.npeer_ids = 1;
    o.secret = (const uint8_t *)SECRET;
    o.secret_len = strlen(SECRET);
    o.handshake_timeout_ms = 2000;
    o.dead_after_ms = 2000;
    o.heartbeat_ms = 200;
    o.send_queue_bytes = 128 * 1024;
    return o;
}

static uint64_t lsn_of(long i)
{
    return 1000 + (uint64_t)i * 100;
}

/* The receiver's durable position: the number of transactions in the log. */
static long log_count(void)
{
    struct stat st;
    if (stat(logpath, &st) != 0)
        return 0;
    return (long)(st.st_size / 12); /* fixed-width records: "%011ld\n" */
}

static void pump(struct aamm_link *l, int ms)
{
    struct pollfd pfd = {aamm_link_fd(l), 0, 0};
    int ev = aamm_link_events(l), t = aamm_link_timeout(l);
    pfd.events =
        (short)(((ev & AAMM_READ) ? POLLIN : 0) | ((ev & AAMM_WRITE) ? POLLOUT : 0));
    if (t < 0 || t > ms)
        t = ms;
    if (pfd.fd >= 0)
        poll(&pfd, 1, t);
    else
        usleep((useconds_t)t * 1000);
    aamm_link_step(l);
}

static bool dead(struct aamm_link *l)
{
    enum aamm_link_state s = aamm_link_state(l);
    return s == AAMM_LINK_FAILED || s == AAMM_LINK_CLOSED;
}

/* ---- the receiving agent ------------------------------------------------------------ */

static void receiver_main(int lfd)
{
    int logfd = open(logpath, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (logfd < 0)
        _exit(2);
    for (;;) {
        long next = log_count();
        struct aamm_wire_position pos = {1, next > 0 ? lsn_of(next - 1) + 40 : 0};
        struct aamm_link_options o = opts(AAMM_LINK_RECEIVER);
        struct aamm_link *l;
        struct pollfd pfd = {lfd, POLLIN, 0};
        int fd;
        bool open_txn = false;
        uint32_t nch = 0;
        o.resume = &pos;
        o.nresume = 1;
        poll(&pfd, 1, 1000);
        fd = accept(lfd, NULL, NULL);
        if (fd < 0)
            continue;
        if (aamm_link_new(&l, &o, NULL, 0) != 0 || aamm_link_adopt_fd(l, fd) != 0)
            _exit(2);
        while (!dead(l)) {
            struct aamm_wire_event ev;
            pump(l, 50);
            while (aamm_link_recv(l, &ev) == 0) {
                char rec[32];
                switch (ev.kind) {
                case AAMM_WIRE_EV_BEGIN:
                    if (open_txn || ev.txn.commit_lsn != lsn_of(next)) {
                        snprintf(rec, sizeof rec, "%011ld\n", -1L); /* gap or duplicate */
                        if (write(logfd, rec, 12) != 12)
                            _exit(2);
                        _exit(3);
                    }
                    open_txn = true;
                    nch = 0;
                    break;
                case AAMM_WIRE_EV_CHANGE:
                    nch++;
                    break;
                case AAMM_WIRE_EV_COMMIT:
                    if (nch != 1 + (uint32_t)(next % 3))
                        _exit(4);
                    /* "apply": data and progress in one durable write */
                    snprintf(rec, sizeof rec, "%011ld\n", next);
                    if (write(logfd, rec, 12) != 12)
                        _exit(2);
                    next++;
                    open_txn = false;
                    if (next % 20 == 0)
                        aamm_link_ack(l, 1, ev.txn.end_lsn);
                    break;
                default:
                    break;
                }
            }
        }
        aamm_link_free(l);
    }
}

/* ---- the sending agent --------------------------------------------------------------- */

static long read_confirmed(void)
{
    char buf[32] = {0};
    int fd = open(confpath, O_RDONLY);
    long v = -1;
    if (fd >= 0) {
        if (read(fd, buf, sizeof buf - 1) > 0)
            v = strtol(buf, NULL, 10);
        close(fd);
    }
    return v;
}

static void write_confirmed(long v)
{
    char buf[32];
    char tmp[160];
    int fd;
    snprintf(tmp, sizeof tmp, "%s.tmp", confpath);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        _exit(2);
    snprintf(buf, sizeof buf, "%ld\n", v);
    if (write(fd, buf, strlen(buf)) < 0)
        _exit(2);
    close(fd);
    rename(tmp, confpath); /* atomic: a SIGKILL leaves the old or the new value */
}

static void sender_main(int port)
{
    char portstr[16], val[200];
    snprintf(portstr, sizeof portstr, "%d", port);
    memset(val, 'v', sizeof val - 1);
    val[sizeof val - 1] = '\0';
    for (;;) {
        struct aamm_link_options o = opts(AAMM_LINK_SENDER);
        struct aamm_link *l;
        long i = read_confirmed() + 1; /* the slot re-sends from its confirmed position */
        long j = -1;
        if (aamm_link_new(&l, &o, NULL, 0) != 0)
            _exit(2);
        if (aamm_link_connect(l, "127.0.0.1", portstr) != 0) {
            aamm_link_free(l);
            usleep(50000);
            continue;
        }
        while (!dead(l)) {
            pump(l, 20);
            if (aamm_link_state(l) != AAMM_LINK_READY)
                continue;
            for (int k = 0; k < 500 && i < ntx; k++) {
                struct aamm_transaction t = {1, (uint32_t)i, lsn_of(i), lsn_of(i) + 40, 1, NULL, 0};
                long n = 1 + i % 3;
                if (j < 0) {
                    if (aamm_link_send_begin(l, &t) != 0)
                        break;
                    j = 0;
                }
                while (j < n) {
                    char id[24];
                    struct aamm_value v[2] = {{AAMM_VALUE_TEXT, 0, id},
                                              {AAMM_VALUE_TEXT, 20 + (uint32_t)(i % 150), val}};
                    struct aamm_change ch = {
                        .kind = AAMM_CHANGE_INSERT, .relation = &rel, .new_tuple = {2, v}};
                    char save = val[v[1].len];
                    int rc;
                    v[0].len = (uint32_t)snprintf(id, sizeof id, "%ld", i);
                    val[v[1].len] = '\0';
                    rc = aamm_link_send_change(l, &ch);
                    val[v[1].len] = save;
                    if (rc != 0)
                        break;
                    j++;
                }
                if (j < n || aamm_link_send_commit(l, &t) != 0)
                    break;
                j = -1;
                i++;
            }
            {
                uint64_t a = aamm_link_acked(l, 1);
                if (a >= lsn_of(0) + 40 && (long)((a - 1040) / 100) > read_confirmed())
                    write_confirmed((long)((a - 1040) / 100));
            }
        }
        aamm_link_free(l);
        usleep(20000); /* the host's reconnect backoff */
    }
}

/* Both agents are SIGKILLed at random moments (each several times, sometimes together);
 * after each restart they resume from their durable files only. The receiver's applied log
 * is exactly 0..N-1. */
START_TEST(sigkill_both_ends)
{
    int port, lfd;
    pid_t s = 0, r = 0;
    uint64_t seed = aamm_test_seed("sigkill_both_ends");
    int kills_s = 0, kills_r = 0;
    int64_t t_end;
    FILE *f;
    char line[32];
    long expect = 0;
    ntx = aamm_test_scaled(30000, 3000);
    strcpy(dir, "/tmp/aamm-kill-XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(logpath, sizeof logpath, "%s/applied.log", dir);
    snprintf(confpath, sizeof confpath, "%s/confirmed", dir);
    lfd = netfx_listen(&port);
    ck_assert_int_ge(lfd, 0);
    r = aamm_test_spawn(receiver_main, lfd);
    s = aamm_test_spawn(sender_main, port);
    for (int round = 0; round < 10; round++) {
        long before = log_count();
        /* Who dies rotates (sender, receiver, both): the sender is killed in 7 of the 10
         * rounds and the receiver in 6, whatever the timing; how far they get is random. */
        unsigned what = (unsigned)(round % 3);
        long target = before + 200 + (long)(aamm_test_rand(&seed) % 800);
        /* let it make progress, then kill */
        for (int w = 0; w < 300 && log_count() < target; w++)
            usleep(10000);
        if (what != 1) {
            aamm_test_kill(&s);
            kills_s++;
        }
        if (what != 0) {
            aamm_test_kill(&r);
            kills_r++;
        }
        if (r == 0)
            r = aamm_test_spawn(receiver_main, lfd);
        if (s == 0)
            s = aamm_test_spawn(sender_main, port);
    }
    t_end = aamm_test_now_ms() + 60000;
    while (log_count() < ntx && aamm_test_now_ms() < t_end)
        usleep(20000);
    usleep(200000); /* anything beyond N would be a duplicate: give it a chance to appear */
    aamm_test_kill(&s);
    aamm_test_kill(&r);
    close(lfd);
    ck_assert_int_ge(kills_s, 3);
    ck_assert_int_ge(kills_r, 3);
    f = fopen(logpath, "r");
    ck_assert_ptr_nonnull(f);
    while (fgets(line, sizeof line, f) != NULL) {
        long v = strtol(line, NULL, 10);
        ck_assert_msg(v == expect, "applied log: %ld where %ld was expected", v, expect);
        expect++;
    }
    fclose(f);
    ck_assert_int_eq(expect, ntx);
    fprintf(stderr,
            "sigkill_both_ends: %ld transactions applied exactly once across %d sender "
            "and %d receiver kills\n",
            ntx, kills_s, kills_r);
    {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
        if (system(cmd) != 0)
            ck_abort_msg("cleanup failed");
    }
}
END_TEST

int main(void)
{
    Suite *s = suite_create("link_kill");
    TCase *tc = aamm_test_tcase("sigkill", 120);
    tcase_add_test(tc, sigkill_both_ends);
    suite_add_tcase(s, tc);
    return aamm_test_run(s);
}
