/*
 * consensus_agent.c: a minimal agent for the multi-process consensus tests: one consensus
 * node in its own process, optionally allocating galloc ranges nonstop and appending each
 * range it receives to a file, and publishing its status to a file.
 *
 *   consensus_agent --id N --dir DIR --peers "1=127.0.0.1:P1,2=...,3=..."
 *                   [--bootstrap] [--galloc FILE] [--range N] [--status FILE]
 *                   [--election MS] [--heartbeat MS] [--timeout MS]
 *
 * SIGTERM: close cleanly and exit 0. SIGUSR1: stop allocating. SIGUSR2: toggle a simulated
 * network partition of this agent (every connection in and out refused and cut). Ranges are written
 * with one write(2) per line ("start end\n") as soon as the callback runs. Failed allocations are
 * counted in the status file. Status: "state leader term applied next hash failures\n".
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <aamm/consensus.h>

#include "consensus_int.h" /* the partition test hook */

static volatile sig_atomic_t stop_flag, quiet_flag, partition_flag;
static int out_fd = -1;
static int inflight;
static unsigned long failures;

static void on_term(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static void on_usr1(int sig)
{
    (void)sig;
    quiet_flag = 1;
}

static void on_usr2(int sig)
{
    (void)sig;
    partition_flag = !partition_flag;
}

static void galloc_cb(struct aamm_consensus *cs, int status, int64_t start, int64_t end, void *arg)
{
    char line[64];
    (void)cs;
    (void)arg;
    inflight--;
    if (status == 0) {
        int n = snprintf(line, sizeof(line), "%lld %lld\n", (long long)start, (long long)end);
        if (write(out_fd, line, (size_t)n) != n)
            _exit(3);
    } else {
        failures++;
    }
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void write_status(struct aamm_consensus *cs, const char *path)
{
    char tmp[4096], text[256];
    uint32_t leader = 0;
    int64_t next = 0;
    int fd, n;
    aamm_consensus_leader(cs, &leader, NULL, 0);
    aamm_consensus_galloc_next(cs, "g", &next);
    n = snprintf(text, sizeof(text), "%d %llu %llu %llu %lld %016llx %lu\n",
                 aamm_consensus_state(cs), (unsigned long long)leader,
                 (unsigned long long)aamm_consensus_term(cs),
                 (unsigned long long)aamm_consensus_applied_index(cs), (long long)next,
                 (unsigned long long)aamm_consensus_state_hash(cs), failures);
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return;
    if (write(fd, text, (size_t)n) == n)
        rename(tmp, path);
    close(fd);
}

int main(int argc, char **argv)
{
    struct aamm_consensus_options o;
    struct aamm_consensus_member members[8];
    char names[8][16], addrs[8][64];
    size_t n_members = 0;
    const char *peers = NULL, *galloc_path = NULL, *status_path = NULL;
    bool bootstrap = false;
    uint64_t range = 1000;
    struct aamm_consensus *cs;
    char err[512];
    int i, rc;
    int64_t last_status = 0;
    bool partitioned = false;

    signal(SIGTERM, on_term);
    signal(SIGUSR1, on_usr1);
    signal(SIGUSR2, on_usr2);
    memset(&o, 0, sizeof(o));
    o.cluster_name = "test-cluster";
    o.secret = "0123456789abcdef-secret";
    o.secret_len = 23;
    for (i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : "";
        if (strcmp(a, "--bootstrap") == 0) {
            bootstrap = true;
            continue;
        }
        i++;
        if (strcmp(a, "--id") == 0)
            o.node_id = (uint32_t)strtoul(v, NULL, 10);
        else if (strcmp(a, "--dir") == 0)
            o.data_dir = v;
        else if (strcmp(a, "--peers") == 0)
            peers = v;
        else if (strcmp(a, "--galloc") == 0)
            galloc_path = v;
        else if (strcmp(a, "--status") == 0)
            status_path = v;
        else if (strcmp(a, "--range") == 0)
            range = strtoull(v, NULL, 10);
        else if (strcmp(a, "--election") == 0)
            o.election_timeout_ms = (unsigned)atoi(v);
        else if (strcmp(a, "--heartbeat") == 0)
            o.heartbeat_timeout_ms = (unsigned)atoi(v);
        else if (strcmp(a, "--timeout") == 0)
            o.request_timeout_ms = (unsigned)atoi(v);
        else if (strcmp(a, "--secret") == 0) {
            o.secret = v;
            o.secret_len = strlen(v);
        } else {
            fprintf(stderr, "agent: unknown option %s\n", a);
            return 2;
        }
    }
    if (peers != NULL) {
        char *list = strdup(peers), *save = NULL, *tok;
        for (tok = strtok_r(list, ",", &save); tok && n_members < 8;
             tok = strtok_r(NULL, ",", &save)) {
            char *eq = strchr(tok, '=');
            if (eq == NULL)
                return 2;
            *eq = 0;
            members[n_members].node_id = (uint32_t)strtoul(tok, NULL, 10);
            snprintf(names[n_members], sizeof(names[0]), "n%s", tok);
            snprintf(addrs[n_members], sizeof(addrs[0]), "%s", eq + 1);
            members[n_members].name = names[n_members];
            members[n_members].link_address = "";
            members[n_members].raft_address = addrs[n_members];
            if (members[n_members].node_id == o.node_id)
                o.raft_address = addrs[n_members];
            n_members++;
        }
        free(list);
    }
    /* The host's duty (documented): raft's libuv writes use write(2). */
    aamm_consensus_ignore_sigpipe();
    if (galloc_path != NULL) {
        out_fd = open(galloc_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (out_fd < 0)
            return 2;
    }
    rc = aamm_consensus_new(&cs, &o, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "agent %llu: new: %s\n", (unsigned long long)o.node_id, err);
        return 1;
    }
    if (bootstrap) {
        rc = aamm_consensus_bootstrap(cs, members, n_members);
        if (rc != 0 && rc != AAMM_ESTATE) {
            fprintf(stderr, "agent: bootstrap: %s\n", aamm_consensus_errmsg(cs));
            return 1;
        }
    }
    if (aamm_consensus_start(cs) != 0) {
        fprintf(stderr, "agent: start: %s\n", aamm_consensus_errmsg(cs));
        return 1;
    }
    while (!stop_flag) {
        struct pollfd pfd = {aamm_consensus_fd(cs), POLLIN, 0};
        int t = aamm_consensus_timeout(cs);
        if (t < 0 || t > 20)
            t = 20;
        poll(&pfd, 1, t);
        if (partition_flag != partitioned) {
            partitioned = partition_flag;
            aamm__consensus_partition(cs, partitioned);
        }
        if (aamm_consensus_step(cs) != 0) {
            fprintf(stderr, "agent: step: %s\n", aamm_consensus_errmsg(cs));
            return 1;
        }
        while (galloc_path != NULL && !quiet_flag && inflight < 2 &&
               aamm_consensus_galloc(cs, "g", range, 0, galloc_cb, NULL) == 0)
            inflight++;
        if (status_path != NULL && now_ms() - last_status >= 20) {
            write_status(cs, status_path);
            last_status = now_ms();
        }
    }
    aamm_consensus_free(cs);
    return 0;
}
