/*
 * consensus.c: the agent's raft node: options, data dir, the private libuv loop driven by
 * the host, commands submitted from any member (executed on the leader, forwarded when we
 * follow), membership changes, accessors of the applied state.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/rand.h>

#include "consensus_int.h"

#define REQNO_BLOCK 1024
#define RETRY_DELAY_MS 30
#define FWD_RECONNECT_MS 100

/* How a request reaches the leader. */
enum { OP_APPLY = 1, OP_ADD = 2, OP_REMOVE = 3 };
/* Which callback the caller gave. */
enum { CB_DONE = 1, CB_GALLOC, CB_DDL, CB_NONE };
/* Request states on the origin. */
enum { R_IDLE = 1, R_LOCAL, R_SENT, R_WAIT_APPLY, R_DONE };

struct req {
    struct req *next;
    uint8_t op, kind;
    uint8_t *cmd;
    size_t cmd_len;
    uint64_t reqno;
    int64_t deadline_ms, not_before_ms;
    int state;
    uint64_t fwd_seq;
    int status;
    struct aamm__cs_result result;
    union {
        aamm_consensus_done_cb done;
        aamm_consensus_galloc_cb galloc;
        aamm_consensus_ddl_cb ddl;
    } cb;
    void *arg;
};

/* A request being executed here, on the leader (ours or forwarded to us). */
struct lexec {
    struct lexec *next, *prev;
    struct aamm_consensus *cs;
    uint8_t op;
    int stage;
    uint8_t *cmd;
    size_t cmd_len;
    struct aamm__cs_cmd c; /* decoded, strings point into cmd */
    char raft_addr[AAMM_CONSENSUS_NAME_MAX + 1];
    struct raft_apply apply;
    struct raft_change change;
    struct req *local;    /* our own request, or NULL */
    uint64_t conn_serial; /* forwarded: the channel it came on */
    uint64_t fwd_seq;
    int status;
    struct aamm__cs_result result;
};

struct pending_member {
    uint64_t id;
    char name[AAMM_CONSENSUS_NAME_MAX + 1];
    char link[AAMM_CONSENSUS_NAME_MAX + 1];
    char raft[AAMM_CONSENSUS_NAME_MAX + 1];
};

struct aamm_consensus {
    struct aamm__err err;
    uint64_t id;
    char address[64];
    char *dir, *raft_dir, *cluster;
    unsigned request_timeout_ms;
    int lock_fd;
    uv_loop_t loop;
    bool loop_open;
    struct raft_uv_transport transport;
    bool transport_open;
    struct raft_io io;
    bool io_open;
    /* io->close interposed (io_close_once()): raft's close callback runs at most once */
    void (*io_close)(struct raft_io *io, raft_io_close_cb cb);
    raft_io_close_cb io_close_cb;
    bool io_close_fired;
    struct raft raft;
    bool raft_open;
    struct aamm__cs_fsm fsm;
    bool started, closing, closed, raft_closed, failed;
    /* request numbers (incarnation: of the request counter file, survives restarts) */
    uint64_t incarnation, reqno_next, reqno_limit;
    /* this handle's own incarnation (new at every aamm_consensus_new): DDL leases bind to it */
    uint64_t handle_inc;
    /* requests submitted here, in reqno order */
    struct req *reqs, **reqs_tail;
    uint64_t fwd_seq;
    /* outgoing forwarding channel to the leader */
    struct aamm__cs_conn *fwd;
    uint64_t fwd_peer;
    int64_t fwd_retry_at;
    /* incoming forwarding channels (we lead) */
    struct aamm__cs_conn **srv;
    size_t n_srv;
    /* executions on the leader */
    struct lexec *lexecs;
    struct raft_transfer transfer;
    bool transferring;
    /* bootstrap membership still to enter the replicated state */
    struct pending_member *boot;
    size_t n_boot;
    bool boot_inflight;
};

/* ---- small helpers ---------------------------------------------------------------------- */

static char *path_join(const char *a, const char *b)
{
    return aamm__asprintf("%s/%s", a, b);
}

static int status_from_raft(int rv)
{
    switch (rv) {
    case 0:
        return 0;
    case RAFT_NOTLEADER:
    case RAFT_LEADERSHIPLOST:
        return AAMM_ENOTLEADER;
    case RAFT_CANTCHANGE:
        return AAMM_EAGAIN;
    case RAFT_NOMEM:
        return AAMM_ENOMEM;
    case RAFT_SHUTDOWN:
    case RAFT_CANCELED:
        return AAMM_ECLOSED;
    default:
        return AAMM_EIO;
    }
}

static bool retryable(int status)
{
    return status == AAMM_ENOTLEADER || status == AAMM_EAGAIN || status == AAMM_ECONN;
}

/* Resolve "host:port" to "a.b.c.d:port" (IPv4 only). */
static int resolve_addr(struct aamm__err *err, const char *what, const char *in, char *out,
                        size_t out_size)
{
    struct sockaddr_in sa;
    struct addrinfo hints, *res = NULL;
    char host[256];
    const char *colon;
    size_t hlen;
    int rc;
    if (in == NULL || *in == 0)
        return aamm__errf(err, AAMM_EINVAL, "%s is required", what);
    if (aamm__cs_parse_addr(in, &sa) == 0) {
        snprintf(out, out_size, "%s", in);
        return 0;
    }
    colon = strrchr(in, ':');
    if (colon == NULL || in[0] == '[' || strchr(in, ':') != colon)
        return aamm__errf(err, AAMM_EINVAL,
                          "%s \"%s\": expected IPv4 \"a.b.c.d:port\" or \"host:port\" "
                          "(IPv6 is not supported)",
                          what, in);
    hlen = (size_t)(colon - in);
    if (hlen == 0 || hlen >= sizeof(host))
        return aamm__errf(err, AAMM_EINVAL, "%s \"%s\": bad host", what, in);
    memcpy(host, in, hlen);
    host[hlen] = 0;
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(host, NULL, &hints, &res);
    if (rc != 0 || res == NULL)
        return aamm__errf(err, AAMM_EINVAL, "%s \"%s\": cannot resolve %s to IPv4: %s", what, in,
                          host, gai_strerror(rc));
    {
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &((struct sockaddr_in *)res->ai_addr)->sin_addr, ip, sizeof(ip));
        snprintf(out, out_size, "%s:%s", ip, colon + 1);
    }
    freeaddrinfo(res);
    if (aamm__cs_parse_addr(out, &sa) != 0)
        return aamm__errf(err, AAMM_EINVAL, "%s \"%s\": bad port", what, in);
    return 0;
}

static bool text_ok(const char *s)
{
    size_t i, n;
    if (s == NULL)
        return false;
    n = strlen(s);
    if (n > AAMM_CONSENSUS_NAME_MAX)
        return false;
    for (i = 0; i < n; i++)
        if (s[i] == '\t' || s[i] == '\n' || s[i] == '\r')
            return false;
    return true;
}

/* Write @data to @path durably (temporary file, fsync, rename, fsync dir). */
static int write_file_durably(const char *dir, const char *name, const char *data)
{
    char *tmp = aamm__asprintf("%s/%s.tmp", dir, name);
    char *path = path_join(dir, name);
    int fd = -1, rc = AAMM_EIO;
    size_t len = strlen(data);
    if (tmp == NULL || path == NULL) {
        rc = AAMM_ENOMEM;
        goto out;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || write(fd, data, len) != (ssize_t)len || fsync(fd) != 0)
        goto out;
    close(fd);
    fd = -1;
    if (rename(tmp, path) != 0)
        goto out;
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0)
        fsync(fd);
    rc = 0;
out:
    if (fd >= 0)
        close(fd);
    aamm__free(tmp);
    aamm__free(path);
    return rc;
}

/* ---- request numbers (survive restarts) ---------------------------------------------------- */

static int reqno_reserve(struct aamm_consensus *cs)
{
    char text[64];
    int rc;
    snprintf(text, sizeof(text), "%016llx %llu\n", (unsigned long long)cs->incarnation,
             (unsigned long long)(cs->reqno_limit + REQNO_BLOCK));
    rc = write_file_durably(cs->dir, "aamm-reqno", text);
    if (rc != 0)
        return aamm__errf(&cs->err, rc, "consensus: cannot persist the request counter in %s",
                          cs->dir);
    cs->reqno_limit += REQNO_BLOCK;
    return 0;
}

static int reqno_load(struct aamm_consensus *cs)
{
    char *path = path_join(cs->dir, "aamm-reqno");
    FILE *f;
    unsigned long long inc = 0, limit = 0;
    if (path == NULL)
        return AAMM_ENOMEM;
    f = fopen(path, "re");
    aamm__free(path);
    if (f != NULL) {
        int n = fscanf(f, "%llx %llu", &inc, &limit);
        fclose(f);
        if (n != 2 || inc == 0)
            return aamm__errf(&cs->err, AAMM_EIO, "consensus: %s/aamm-reqno is corrupt", cs->dir);
    } else {
        while (inc == 0)
            if (RAND_bytes((unsigned char *)&inc, sizeof(inc)) != 1)
                return aamm__errf(&cs->err, AAMM_EIO, "consensus: no random bytes");
        limit = 1;
    }
    cs->incarnation = inc;
    cs->reqno_next = limit;
    cs->reqno_limit = limit;
    return reqno_reserve(cs);
}

static int reqno_take(struct aamm_consensus *cs, uint64_t *out)
{
    if (cs->reqno_next == cs->reqno_limit) {
        int rc = reqno_reserve(cs);
        if (rc != 0)
            return rc;
    }
    *out = cs->reqno_next++;
    return 0;
}

/* ---- bootstrap membership file ------------------------------------------------------------ */

static int boot_save(struct aamm_consensus *cs)
{
    struct aamm__wr w;
    size_t i;
    int rc;
    char line[4 * (AAMM_CONSENSUS_NAME_MAX + 1) + 32];
    aamm__wr_init(&w);
    for (i = 0; i < cs->n_boot; i++) {
        int n =
            snprintf(line, sizeof(line), "%llu\t%s\t%s\t%s\n", (unsigned long long)cs->boot[i].id,
                     cs->boot[i].name, cs->boot[i].link, cs->boot[i].raft);
        aamm__wr_bytes(&w, line, (size_t)n);
    }
    aamm__wr_u8(&w, 0);
    if (!w.ok) {
        aamm__wr_free(&w);
        return AAMM_ENOMEM;
    }
    rc = write_file_durably(cs->dir, "aamm-bootstrap", (const char *)w.data);
    aamm__wr_free(&w);
    return rc;
}

static void boot_load(struct aamm_consensus *cs)
{
    char *path = path_join(cs->dir, "aamm-bootstrap");
    char line[4 * (AAMM_CONSENSUS_NAME_MAX + 1) + 32];
    FILE *f;
    if (path == NULL)
        return;
    f = fopen(path, "re");
    aamm__free(path);
    if (f == NULL)
        return;
    while (fgets(line, sizeof(line), f) != NULL) {
        struct pending_member m, *b;
        char *save = NULL, *tok[4];
        int i;
        line[strcspn(line, "\n")] = 0;
        memset(&m, 0, sizeof(m));
        for (i = 0; i < 4; i++)
            tok[i] = strtok_r(i == 0 ? line : NULL, "\t", &save);
        if (tok[0] == NULL || tok[3] == NULL)
            continue;
        m.id = strtoull(tok[0], NULL, 10);
        snprintf(m.name, sizeof(m.name), "%s", tok[1]);
        snprintf(m.link, sizeof(m.link), "%s", tok[2]);
        snprintf(m.raft, sizeof(m.raft), "%s", tok[3]);
        b = aamm__realloc(cs->boot, (cs->n_boot + 1) * sizeof(*b));
        if (b == NULL)
            break;
        cs->boot = b;
        cs->boot[cs->n_boot++] = m;
    }
    fclose(f);
}

/* ---- life cycle ------------------------------------------------------------------------------ */

static void on_fwd_accept(struct aamm__cs_conn *c, void *arg);

/* raft 0.15's uv backend can call its close callback twice when two pending operations
 * finish after the close began (each completion re-checks "everything closed?" and fires
 * the callback again); raft's own callback then frees its address copy twice (seen under
 * ASan as a double free inside raft_close). The io's close method is interposed so that
 * raft's callback runs exactly once. */
static void io_close_fired_once(struct raft_io *io)
{
    struct aamm_consensus *cs =
        (struct aamm_consensus *)((char *)io - offsetof(struct aamm_consensus, io));
    if (cs->io_close_fired) {
        AAMM_INFO("consensus: raft's io close callback fired again; ignored");
        return;
    }
    cs->io_close_fired = true;
    if (cs->io_close_cb != NULL)
        cs->io_close_cb(io);
}

static void io_close_once(struct raft_io *io, raft_io_close_cb cb)
{
    struct aamm_consensus *cs =
        (struct aamm_consensus *)((char *)io - offsetof(struct aamm_consensus, io));
    cs->io_close_cb = cb;
    cs->io_close(io, io_close_fired_once);
}

AAMM_API int aamm_consensus_new(struct aamm_consensus **out, const struct aamm_consensus_options *o,
                                char *errbuf, size_t errsize)
{
    struct aamm_consensus *cs;
    struct aamm__err err;
    unsigned election, heartbeat;
    int rc;
    aamm__errclear(&err);
    if (out == NULL)
        return aamm__newerrf(errbuf, errsize, AAMM_EINVAL, "consensus: no handle pointer");
    *out = NULL;
    if (o == NULL)
        return aamm__newerrf(errbuf, errsize, AAMM_EINVAL, "consensus: no options");
    election = o->election_timeout_ms ? o->election_timeout_ms : 1000;
    heartbeat = o->heartbeat_timeout_ms ? o->heartbeat_timeout_ms : 100;
    /* Debian's raft has its asserts compiled out: check what raft_start would assert. */
    if (!aamm_node_id_valid(o->node_id))
        rc = aamm__errf(&err, AAMM_EINVAL, "consensus: node_id must be in 1..%d", AAMM_NODE_ID_MAX);
    else if (heartbeat >= election)
        rc = aamm__errf(&err, AAMM_EINVAL,
                        "consensus: heartbeat timeout (%u ms) must be below the election "
                        "timeout (%u ms)",
                        heartbeat, election);
    else if (o->cluster_name == NULL || !*o->cluster_name ||
             strlen(o->cluster_name) > AAMM_CONSENSUS_NAME_MAX)
        rc = aamm__errf(&err, AAMM_EINVAL, "consensus: cluster_name is required (1..255 bytes)");
    else if (o->secret == NULL || o->secret_len < 16)
        rc = aamm__errf(&err, AAMM_EINVAL, "consensus: the secret must be at least 16 bytes");
    else if (o->data_dir == NULL || !*o->data_dir)
        rc = aamm__errf(&err, AAMM_EINVAL, "consensus: data_dir is required");
    else
        rc = 0;
    if (rc != 0)
        return aamm__newerr_copy(errbuf, errsize, &err);
    cs = aamm__calloc(1, sizeof(*cs));
    if (cs == NULL)
        return aamm__newerrf(errbuf, errsize, AAMM_ENOMEM, "consensus: out of memory");
    cs->lock_fd = -1;
    cs->reqs_tail = &cs->reqs;
    cs->id = o->node_id;
    cs->request_timeout_ms = o->request_timeout_ms ? o->request_timeout_ms : 10000;
    rc = resolve_addr(&cs->err, "consensus: raft_address", o->raft_address, cs->address,
                      sizeof(cs->address));
    if (rc != 0)
        goto fail;
    {
        char bind[64];
        if (o->bind_address != NULL) {
            struct sockaddr_in a, b;
            rc = resolve_addr(&cs->err, "consensus: bind_address", o->bind_address, bind,
                              sizeof(bind));
            if (rc != 0)
                goto fail;
            aamm__cs_parse_addr(bind, &a);
            aamm__cs_parse_addr(cs->address, &b);
            if (a.sin_port != b.sin_port) {
                rc = aamm__errf(&cs->err, AAMM_EINVAL,
                                "consensus: bind_address must use raft_address's port");
                goto fail;
            }
        }
        cs->dir = aamm__strdup(o->data_dir);
        cs->cluster = aamm__strdup(o->cluster_name);
        cs->raft_dir = cs->dir ? path_join(cs->dir, "raft") : NULL;
        if (cs->dir == NULL || cs->cluster == NULL || cs->raft_dir == NULL) {
            rc = aamm__errf(&cs->err, AAMM_ENOMEM, "out of memory");
            goto fail;
        }
        /* The data dir: create, lock against a second process, raft/ inside. */
        if (mkdir(cs->dir, 0700) != 0 && errno != EEXIST) {
            rc =
                aamm__errf(&cs->err, AAMM_EIO, "consensus: mkdir %s: %s", cs->dir, strerror(errno));
            goto fail;
        }
        {
            char *lock = path_join(cs->dir, "aamm.lock");
            if (lock == NULL) {
                rc = aamm__errf(&cs->err, AAMM_ENOMEM, "out of memory");
                goto fail;
            }
            cs->lock_fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
            aamm__free(lock);
            if (cs->lock_fd < 0) {
                rc = aamm__errf(&cs->err, AAMM_EIO, "consensus: open %s/aamm.lock: %s", cs->dir,
                                strerror(errno));
                goto fail;
            }
            if (flock(cs->lock_fd, LOCK_EX | LOCK_NB) != 0) {
                rc = aamm__errf(&cs->err, errno == EWOULDBLOCK ? AAMM_EBUSY : AAMM_EIO,
                                "consensus: data dir %s is in use by another process (%s)", cs->dir,
                                strerror(errno));
                goto fail;
            }
        }
        if (mkdir(cs->raft_dir, 0700) != 0 && errno != EEXIST) {
            rc = aamm__errf(&cs->err, AAMM_EIO, "consensus: mkdir %s: %s", cs->raft_dir,
                            strerror(errno));
            goto fail;
        }
        rc = reqno_load(cs);
        if (rc != 0)
            goto fail;
        while (cs->handle_inc == 0)
            if (RAND_bytes((unsigned char *)&cs->handle_inc, sizeof(cs->handle_inc)) != 1) {
                rc = aamm__errf(&cs->err, AAMM_EIO, "consensus: no random bytes");
                goto fail;
            }
        boot_load(cs);
        if (uv_loop_init(&cs->loop) != 0) {
            rc = aamm__errf(&cs->err, AAMM_EIO, "consensus: uv_loop_init failed");
            goto fail;
        }
        cs->loop_open = true;
        rc = aamm__psk_new(&cs->transport, &cs->loop, o->cluster_name, o->secret, o->secret_len,
                           o->bind_address ? bind : NULL,
                           o->handshake_timeout_ms ? o->handshake_timeout_ms : 5000);
        if (rc != 0) {
            aamm__errf(&cs->err, rc, "out of memory");
            goto fail;
        }
        cs->transport_open = true;
        aamm__psk_on_fwd(&cs->transport, on_fwd_accept, cs);
    }
    rc = raft_uv_init(&cs->io, &cs->loop, cs->raft_dir, &cs->transport);
    if (rc != 0) {
        rc = aamm__errf(&cs->err, AAMM_EIO, "consensus: raft_uv_init(%s): %s", cs->raft_dir,
                        raft_strerror(rc));
        goto fail;
    }
    cs->io_open = true;
    cs->io_close = cs->io.close;
    cs->io.close = io_close_once;
    aamm__cs_fsm_init(&cs->fsm, &cs->raft);
    rc = raft_init(&cs->raft, &cs->io, &cs->fsm.fsm, cs->id, cs->address);
    if (rc != 0) {
        /* e.g. the filesystem probe: quote raft's io message verbatim */
        rc = aamm__errf(&cs->err, rc == RAFT_NOMEM ? AAMM_ENOMEM : AAMM_EIO,
                        "consensus: raft_init in %s: %s", cs->raft_dir, raft_errmsg(&cs->raft));
        goto fail;
    }
    cs->raft_open = true;
    raft_set_election_timeout(&cs->raft, election);
    raft_set_heartbeat_timeout(&cs->raft, heartbeat);
    raft_set_snapshot_threshold(&cs->raft, o->snapshot_threshold ? o->snapshot_threshold : 1024);
    raft_set_snapshot_trailing(&cs->raft, o->snapshot_trailing ? o->snapshot_trailing : 128);
    raft_set_pre_vote(&cs->raft, true);
    /* raft waits this long for an InstallSnapshot answer before sending the snapshot again
     * (default 30 s). Our snapshots are small; a lost one (peer restarted mid-send) should
     * not stall a member's catch-up for half a minute. */
    raft_set_install_snapshot_timeout(&cs->raft, election * 3 < 2000 ? 2000 : election * 3);
    raft_uv_set_connect_retry_delay(&cs->io, heartbeat < 100 ? 100 : heartbeat);
    *out = cs;
    return 0;
fail:
    aamm__newerr_copy(errbuf, errsize, &cs->err);
    aamm_consensus_free(cs);
    return rc;
}

AAMM_API int aamm_consensus_bootstrap(struct aamm_consensus *cs,
                                      const struct aamm_consensus_member *members, size_t n)
{
    struct raft_configuration conf;
    struct pending_member *boot;
    size_t i, j;
    int rc;
    bool self = false;
    if (cs == NULL || members == NULL || n == 0)
        return AAMM_EINVAL;
    if (cs->started || cs->closing)
        return aamm__errf(&cs->err, AAMM_ESTATE, "consensus: bootstrap before start");
    boot = aamm__calloc(n, sizeof(*boot));
    if (boot == NULL)
        return aamm__errf(&cs->err, AAMM_ENOMEM, "out of memory");
    raft_configuration_init(&conf);
    for (i = 0; i < n; i++) {
        const struct aamm_consensus_member *m = &members[i];
        rc = 0;
        if (!aamm_node_id_valid(m->node_id) || !text_ok(m->name) ||
            !text_ok(m->link_address ? m->link_address : ""))
            rc = aamm__errf(&cs->err, AAMM_EINVAL,
                            "consensus: member %zu: id outside 1..%d, or a name/link missing, "
                            "too long or with tabs/newlines",
                            i, AAMM_NODE_ID_MAX);
        else
            rc = resolve_addr(&cs->err, "consensus: member raft_address", m->raft_address,
                              boot[i].raft, sizeof(boot[i].raft));
        for (j = 0; rc == 0 && j < i; j++)
            if (boot[j].id == m->node_id || strcmp(boot[j].raft, boot[i].raft) == 0)
                rc = aamm__errf(&cs->err, AAMM_EINVAL,
                                "consensus: member %llu: duplicate id or raft address",
                                (unsigned long long)m->node_id);
        if (rc != 0) {
            raft_configuration_close(&conf);
            aamm__free(boot);
            return rc;
        }
        boot[i].id = m->node_id;
        snprintf(boot[i].name, sizeof(boot[i].name), "%s", m->name);
        snprintf(boot[i].link, sizeof(boot[i].link), "%s", m->link_address ? m->link_address : "");
        if (m->node_id == cs->id)
            self = true;
        if (raft_configuration_add(&conf, m->node_id, boot[i].raft, RAFT_VOTER) != 0) {
            raft_configuration_close(&conf);
            aamm__free(boot);
            return aamm__errf(&cs->err, AAMM_ENOMEM, "out of memory");
        }
    }
    if (!self) {
        raft_configuration_close(&conf);
        aamm__free(boot);
        return aamm__errf(&cs->err, AAMM_EINVAL,
                          "consensus: bootstrap list does not contain this node (%llu)",
                          (unsigned long long)cs->id);
    }
    rc = raft_bootstrap(&cs->raft, &conf);
    raft_configuration_close(&conf);
    if (rc != 0) {
        aamm__free(boot);
        if (rc == RAFT_CANTBOOTSTRAP)
            return aamm__errf(&cs->err, AAMM_ESTATE,
                              "consensus: %s already holds a cluster state: just start",
                              cs->raft_dir);
        return aamm__errf(&cs->err, AAMM_EIO, "consensus: raft_bootstrap: %s (%s)",
                          raft_strerror(rc), raft_errmsg(&cs->raft));
    }
    aamm__free(cs->boot);
    cs->boot = boot;
    cs->n_boot = n;
    rc = boot_save(cs);
    if (rc != 0)
        return aamm__errf(&cs->err, rc, "consensus: cannot write %s/aamm-bootstrap", cs->dir);
    return 0;
}

AAMM_API int aamm_consensus_start(struct aamm_consensus *cs)
{
    int rc;
    if (cs == NULL)
        return AAMM_EINVAL;
    if (cs->started || cs->closing)
        return aamm__errf(&cs->err, AAMM_ESTATE, "consensus: already started or closed");
    rc = raft_start(&cs->raft);
    if (rc != 0)
        return aamm__errf(&cs->err, rc == RAFT_NOMEM ? AAMM_ENOMEM : AAMM_EIO,
                          "consensus: raft_start: %s%s%s", raft_errmsg(&cs->raft),
                          *raft_errmsg(&cs->raft) ? "; " : "", cs->transport.errmsg);
    cs->started = true;
    return 0;
}

AAMM_API bool aamm_consensus_ignore_sigpipe(void)
{
    struct sigaction sa;
    if (sigaction(SIGPIPE, NULL, &sa) != 0)
        return false;
    if (sa.sa_handler == SIG_DFL) {
        sa.sa_handler = SIG_IGN;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = 0;
        return sigaction(SIGPIPE, &sa, NULL) == 0;
    }
    return true;
}

AAMM_API const char *aamm_consensus_errmsg(const struct aamm_consensus *cs)
{
    return cs ? aamm__errmsg(&cs->err) : "";
}

/* ---- completion delivery (the only place user callbacks run) ----------------------------------
 */

static void req_done(struct req *r, int status)
{
    r->state = R_DONE;
    r->status = status;
}

static void deliver(struct aamm_consensus *cs)
{
    struct req **pp = &cs->reqs;
    while (*pp != NULL) {
        struct req *r = *pp;
        int status;
        if (r->state != R_DONE) {
            pp = &r->next;
            continue;
        }
        *pp = r->next;
        if (cs->reqs_tail == &r->next)
            cs->reqs_tail = pp;
        status = r->status;
        if (status == 0)
            status = r->result.status == AAMM_EMALFORMED ? AAMM_EINVAL : r->result.status;
        switch (r->kind) {
        case CB_GALLOC:
            if (r->cb.galloc != NULL)
                r->cb.galloc(cs, status, status == 0 ? r->result.start : 0,
                             status == 0 ? r->result.end : 0, r->arg);
            break;
        case CB_DDL:
            if (r->cb.ddl != NULL)
                r->cb.ddl(cs, status, r->status == 0 ? &r->result.lock : NULL, r->arg);
            break;
        case CB_DONE:
            if (r->cb.done != NULL)
                r->cb.done(cs, status, r->arg);
            break;
        default:
            cs->boot_inflight = false;
            break;
        }
        aamm__free(r->cmd);
        aamm__free(r);
    }
}

/* ---- leader side: executing a request
 * ------------------------------------------------------------ */

static void fwd_reply(struct aamm_consensus *cs, struct lexec *x);
static void lexec_step(struct lexec *x);

static void lexec_finish(struct lexec *x, int status)
{
    struct aamm_consensus *cs = x->cs;
    x->status = status;
    if (x->local != NULL) {
        struct req *r = x->local;
        r->result = x->result;
        if (status != 0 && retryable(status) && !cs->closing) {
            r->state = R_IDLE;
            r->not_before_ms = aamm__now_ms() + RETRY_DELAY_MS;
        } else {
            req_done(r, status != 0 && cs->closing ? AAMM_ECLOSED : status);
        }
    } else {
        fwd_reply(cs, x);
    }
    if (x->prev)
        x->prev->next = x->next;
    else
        cs->lexecs = x->next;
    if (x->next)
        x->next->prev = x->prev;
    aamm__free(x->cmd);
    aamm__free(x);
}

static void apply_cb(struct raft_apply *req, int status, void *result)
{
    struct lexec *x = req->data;
    if (status == 0 && result != NULL)
        x->result = *(const struct aamm__cs_result *)result;
    if (status == 0 && x->op == OP_REMOVE && x->stage == 1) {
        lexec_step(x); /* the metadata is gone; now raft's configuration */
        return;
    }
    lexec_finish(x, status_from_raft(status));
}

static void change_cb(struct raft_change *req, int status)
{
    struct lexec *x = req->data;
    if (status != 0) {
        lexec_finish(x, status_from_raft(status));
        return;
    }
    lexec_step(x); /* x->stage already names the next stage */
}

static const struct raft_server *config_find(struct raft *r, uint64_t id)
{
    unsigned i;
    for (i = 0; i < r->configuration.n; i++)
        if (r->configuration.servers[i].id == id)
            return &r->configuration.servers[i];
    return NULL;
}

/* raft_apply our (stamped) command. */
static int lexec_apply(struct lexec *x)
{
    struct raft_buffer buf;
    int rv;
    buf.len = x->cmd_len;
    /* raft's allocator, not aamm__malloc: raft owns the entry buffer once raft_apply()
     * accepts it and releases it with raft_free(). */
    buf.base = raft_malloc(buf.len);
    if (buf.base == NULL)
        return AAMM_ENOMEM;
    memcpy(buf.base, x->cmd, buf.len);
    x->apply.data = x;
    rv = raft_apply(&x->cs->raft, &x->apply, &buf, 1, apply_cb);
    if (rv != 0) {
        raft_free(buf.base);
        return status_from_raft(rv);
    }
    return 0;
}

static void transfer_cb(struct raft_transfer *req)
{
    struct aamm_consensus *cs = req->data;
    cs->transferring = false;
}

/* Advance a request through its stages; finishes it on error or at the end. */
static void lexec_step(struct lexec *x)
{
    struct aamm_consensus *cs = x->cs;
    struct raft *r = &cs->raft;
    const struct raft_server *s;
    int rc = 0;
    if (cs->closing) {
        lexec_finish(x, AAMM_ECLOSED);
        return;
    }
    if (raft_state(r) != RAFT_LEADER) {
        lexec_finish(x, AAMM_ENOTLEADER);
        return;
    }
    x->change.data = x;
    switch (x->op) {
    case OP_APPLY:
        rc = lexec_apply(x);
        break;
    case OP_ADD:
        s = config_find(r, x->c.id);
        if (x->stage == 0) { /* raft_add, unless it is there already */
            if (s != NULL && strcmp(s->address, x->raft_addr) != 0) {
                rc = AAMM_EINVAL;
                break;
            }
            x->stage = 1;
            if (s == NULL) {
                int rv = raft_add(r, &x->change, x->c.id, x->raft_addr, change_cb);
                rc = rv == RAFT_DUPLICATEADDRESS ? AAMM_EINVAL : status_from_raft(rv);
                break;
            }
        }
        if (x->stage == 1) { /* promote to voter (raft catches it up first) */
            x->stage = 2;
            if (s == NULL || s->role != RAFT_VOTER) {
                rc = status_from_raft(raft_assign(r, &x->change, x->c.id, RAFT_VOTER, change_cb));
                break;
            }
        }
        rc = lexec_apply(x); /* stage 2: the metadata */
        break;
    case OP_REMOVE:
        if (x->stage == 0) {
            if (x->c.id == cs->id) {
                /* A leader cannot remove itself cleanly: hand over, the origin retries. */
                if (!cs->transferring) {
                    cs->transfer.data = cs;
                    if (raft_transfer(r, &cs->transfer, 0, transfer_cb) == 0)
                        cs->transferring = true;
                }
                rc = AAMM_ENOTLEADER;
                break;
            }
            if (config_find(r, x->c.id) == NULL &&
                aamm__cs_state_member(&cs->fsm.st, x->c.id) == NULL) {
                rc = AAMM_ENOTFOUND;
                break;
            }
            x->stage = 1;
            rc = lexec_apply(x); /* the metadata leaves first */
            break;
        }
        if (x->stage == 1) {
            x->result.status = 0; /* already gone from the metadata is fine */
            x->stage = 2;
            if (config_find(r, x->c.id) != NULL) {
                rc = status_from_raft(raft_remove(r, &x->change, x->c.id, change_cb));
                break;
            }
        }
        lexec_finish(x, 0);
        return;
    default:
        rc = AAMM_EINVAL;
        break;
    }
    if (rc != 0)
        lexec_finish(x, rc);
}

/* Start executing @cmd here (we lead). @cmd is copied. */
static void lexec_start(struct aamm_consensus *cs, uint8_t op, const uint8_t *cmd, size_t len,
                        struct req *local, uint64_t conn_serial, uint64_t fwd_seq)
{
    struct lexec *x = aamm__calloc(1, sizeof(*x));
    int rc;
    if (x == NULL || (x->cmd = aamm__malloc(len ? len : 1)) == NULL) {
        aamm__free(x);
        if (local != NULL)
            req_done(local, AAMM_ENOMEM);
        return;
    }
    x->cs = cs;
    x->op = op;
    x->local = local;
    x->conn_serial = conn_serial;
    x->fwd_seq = fwd_seq;
    memcpy(x->cmd, cmd, len);
    x->cmd_len = len;
    x->next = cs->lexecs;
    if (cs->lexecs)
        cs->lexecs->prev = x;
    cs->lexecs = x;
    /* The leader's clock is the state machine's clock. */
    aamm__cs_cmd_stamp(x->cmd, x->cmd_len, aamm__wall_us());
    rc = aamm__cs_cmd_decode(x->cmd, x->cmd_len, &x->c);
    if (rc == 0 && op == OP_ADD) {
        if (x->c.type != AAMM__CS_MEMBER_PUT || x->c.raft_len >= sizeof(x->raft_addr))
            rc = AAMM_EMALFORMED;
        else
            memcpy(x->raft_addr, x->c.raft, x->c.raft_len);
    }
    if (rc == 0 && op == OP_REMOVE && x->c.type != AAMM__CS_MEMBER_DEL)
        rc = AAMM_EMALFORMED;
    if (rc == 0 && op != OP_APPLY && op != OP_ADD && op != OP_REMOVE)
        rc = AAMM_EMALFORMED;
    if (rc != 0) {
        lexec_finish(x, AAMM_EINVAL);
        return;
    }
    lexec_step(x);
}

/* ---- forwarding channel
 * ---------------------------------------------------------------------------- */

static void fwd_reply(struct aamm_consensus *cs, struct lexec *x)
{
    size_t i;
    for (i = 0; i < cs->n_srv; i++) {
        if (aamm__cs_conn_serial(cs->srv[i]) == x->conn_serial) {
            struct aamm__wr w;
            aamm__wr_init(&w);
            aamm__wr_u8(&w, 'R');
            aamm__wr_le64(&w, x->fwd_seq);
            aamm__wr_le32(&w, (uint32_t)x->status);
            aamm__cs_result_encode(&w, &x->result);
            if (w.ok)
                aamm__cs_conn_send(cs->srv[i], w.data, w.len);
            aamm__wr_free(&w);
            return;
        }
    }
}

/* Leader: a forwarded request arrives. */
static void srv_frame(struct aamm__cs_conn *c, const uint8_t *data, size_t len, void *arg)
{
    struct aamm_consensus *cs = arg;
    struct aamm__rd rd;
    uint64_t seq;
    uint8_t op;
    aamm__rd_init(&rd, data, len);
    if (aamm__rd_u8(&rd) != 'Q') {
        aamm__cs_conn_close(c);
        return;
    }
    seq = aamm__rd_le64(&rd);
    op = aamm__rd_u8(&rd);
    if (!rd.ok) {
        aamm__cs_conn_close(c);
        return;
    }
    lexec_start(cs, op, rd.p, rd.left, NULL, aamm__cs_conn_serial(c), seq);
}

static void srv_state(struct aamm__cs_conn *c, bool up, void *arg)
{
    struct aamm_consensus *cs = arg;
    size_t i;
    if (up)
        return;
    for (i = 0; i < cs->n_srv; i++) {
        if (cs->srv[i] == c) {
            cs->srv[i] = cs->srv[--cs->n_srv];
            return;
        }
    }
}

static void on_fwd_accept(struct aamm__cs_conn *c, void *arg)
{
    struct aamm_consensus *cs = arg;
    struct aamm__cs_conn **v;
    if (cs->closing) {
        aamm__cs_conn_close(c);
        return;
    }
    v = aamm__realloc(cs->srv, (cs->n_srv + 1) * sizeof(*v));
    if (v == NULL) {
        aamm__cs_conn_close(c);
        return;
    }
    cs->srv = v;
    cs->srv[cs->n_srv++] = c;
    aamm__cs_conn_set_cbs(c, srv_frame, srv_state, cs);
}

/* Origin: a reply from the leader. */
static void cli_frame(struct aamm__cs_conn *c, const uint8_t *data, size_t len, void *arg)
{
    struct aamm_consensus *cs = arg;
    struct aamm__rd rd;
    struct aamm__cs_result res;
    struct req *r;
    uint64_t seq;
    int status;
    aamm__rd_init(&rd, data, len);
    if (aamm__rd_u8(&rd) != 'R') {
        aamm__cs_conn_close(c);
        return;
    }
    seq = aamm__rd_le64(&rd);
    status = (int32_t)aamm__rd_le32(&rd);
    memset(&res, 0, sizeof(res));
    aamm__cs_result_decode(&rd, &res);
    if (!rd.ok) {
        aamm__cs_conn_close(c);
        return;
    }
    for (r = cs->reqs; r != NULL; r = r->next) {
        if (r->state == R_SENT && r->fwd_seq == seq) {
            r->result = res;
            if (retryable(status)) {
                r->state = R_IDLE;
                r->not_before_ms = aamm__now_ms() + RETRY_DELAY_MS;
            } else if (status == 0 && res.index > raft_last_applied(&cs->raft)) {
                /* Committed on the leader; answer once our own state has it too, so what
                 * the caller got is also what the local accessors show. */
                r->state = R_WAIT_APPLY;
            } else {
                req_done(r, status);
            }
            return;
        }
    }
}

static void cli_state(struct aamm__cs_conn *c, bool up, void *arg)
{
    struct aamm_consensus *cs = arg;
    struct req *r;
    if (up || cs->fwd != c)
        return;
    cs->fwd = NULL;
    cs->fwd_peer = 0;
    cs->fwd_retry_at = aamm__now_ms() + FWD_RECONNECT_MS;
    for (r = cs->reqs; r != NULL; r = r->next)
        if (r->state == R_SENT)
            r->state = R_IDLE; /* ambiguous: retried under the same request number */
}

static bool fwd_send(struct aamm_consensus *cs, struct req *r)
{
    struct aamm__wr w;
    int rc;
    aamm__wr_init(&w);
    aamm__wr_u8(&w, 'Q');
    r->fwd_seq = ++cs->fwd_seq;
    aamm__wr_le64(&w, r->fwd_seq);
    aamm__wr_u8(&w, r->op);
    aamm__wr_bytes(&w, r->cmd, r->cmd_len);
    rc = w.ok ? aamm__cs_conn_send(cs->fwd, w.data, w.len) : AAMM_ENOMEM;
    aamm__wr_free(&w);
    return rc == 0;
}

/* ---- origin side: dispatching our requests
 * ----------------------------------------------------------- */

static void boot_pump(struct aamm_consensus *cs);

static void pump(struct aamm_consensus *cs)
{
    int64_t now = aamm__now_ms();
    raft_id lid = 0;
    const char *laddr = NULL;
    struct req *r;
    uint64_t lo = 0;
    if (!cs->started || cs->closing)
        return;
    boot_pump(cs);
    raft_leader(&cs->raft, &lid, &laddr);
    if (lid == cs->id && raft_state(&cs->raft) != RAFT_LEADER)
        lid = 0;
    /* Keep the forwarding channel pointed at the current leader. */
    if (cs->fwd != NULL && (lid == 0 || lid == cs->id || cs->fwd_peer != lid)) {
        struct aamm__cs_conn *old = cs->fwd;
        cli_state(old, false, cs);
        aamm__cs_conn_set_cbs(old, NULL, NULL, NULL);
        aamm__cs_conn_close(old);
        cs->fwd_retry_at = 0;
    }
    for (r = cs->reqs; r != NULL; r = r->next) {
        if (r->state == R_DONE)
            continue;
        if (lo == 0)
            lo = r->reqno; /* lowest unresolved request */
        if (r->state == R_WAIT_APPLY && raft_last_applied(&cs->raft) >= r->result.index) {
            req_done(r, 0);
            continue;
        }
        if ((r->state == R_IDLE || r->state == R_SENT || r->state == R_WAIT_APPLY) &&
            now >= r->deadline_ms) {
            req_done(r, AAMM_ETIMEDOUT);
            continue;
        }
        if (r->state != R_IDLE || now < r->not_before_ms)
            continue;
        /* At most a dedup window of unresolved requests in flight (see consensus_fsm.c). */
        if (r->reqno >= lo + AAMM__CS_DEDUP_WINDOW)
            break;
        if (lid == cs->id) {
            r->state = R_LOCAL;
            lexec_start(cs, r->op, r->cmd, r->cmd_len, r, 0, 0);
            continue;
        }
        if (lid == 0 || laddr == NULL)
            continue;
        if (cs->fwd == NULL) {
            if (now < cs->fwd_retry_at)
                continue;
            cs->fwd = aamm__psk_connect_fwd(&cs->transport, lid, laddr);
            if (cs->fwd == NULL)
                continue;
            cs->fwd_peer = lid;
            aamm__cs_conn_set_cbs(cs->fwd, cli_frame, cli_state, cs);
        }
        if (!aamm__cs_conn_up(cs->fwd))
            continue;
        if (fwd_send(cs, r))
            r->state = R_SENT;
    }
}

static int submit(struct aamm_consensus *cs, uint8_t op, uint8_t kind, struct aamm__cs_cmd *c,
                  void (*cb)(void), void *arg)
{
    struct req *r;
    struct aamm__wr w;
    int rc;
    if (!cs->started || cs->closing)
        return aamm__errf(&cs->err, AAMM_ESTATE, "consensus: not started or closed");
    r = aamm__calloc(1, sizeof(*r));
    if (r == NULL)
        return aamm__errf(&cs->err, AAMM_ENOMEM, "out of memory");
    rc = reqno_take(cs, &r->reqno);
    if (rc != 0) {
        aamm__free(r);
        return rc;
    }
    c->origin = cs->id;
    c->incarnation = cs->incarnation;
    c->reqno = r->reqno;
    c->stamp_us = 0;
    aamm__wr_init(&w);
    aamm__cs_cmd_encode(&w, c);
    if (!w.ok) {
        aamm__wr_free(&w);
        aamm__free(r);
        return aamm__errf(&cs->err, AAMM_ENOMEM, "out of memory");
    }
    r->cmd = w.data;
    r->cmd_len = w.len;
    r->op = op;
    r->kind = kind;
    r->arg = arg;
    switch (kind) {
    case CB_GALLOC:
        r->cb.galloc = (aamm_consensus_galloc_cb)cb;
        break;
    case CB_DDL:
        r->cb.ddl = (aamm_consensus_ddl_cb)cb;
        break;
    case CB_DONE:
        r->cb.done = (aamm_consensus_done_cb)cb;
        break;
    default:
        break;
    }
    r->state = R_IDLE;
    r->deadline_ms = aamm__now_ms() + cs->request_timeout_ms;
    *cs->reqs_tail = r;
    cs->reqs_tail = &r->next;
    pump(cs);
    return 0;
}

/* Bootstrap metadata: once a leader exists, the leader enters the members it was told. */
static void boot_pump(struct aamm_consensus *cs)
{
    size_t i = 0;
    if (cs->n_boot == 0)
        return;
    while (i < cs->n_boot) {
        const struct aamm__cs_member *m = aamm__cs_state_member(&cs->fsm.st, cs->boot[i].id);
        if (m != NULL && strcmp(m->name, cs->boot[i].name) == 0 &&
            strcmp(m->link, cs->boot[i].link) == 0 && strcmp(m->raft, cs->boot[i].raft) == 0)
            cs->boot[i] = cs->boot[--cs->n_boot];
        else
            i++;
    }
    if (cs->n_boot == 0) {
        char *path = path_join(cs->dir, "aamm-bootstrap");
        if (path != NULL)
            unlink(path);
        aamm__free(path);
        return;
    }
    if (!cs->boot_inflight && raft_state(&cs->raft) == RAFT_LEADER) {
        struct aamm__cs_cmd c;
        memset(&c, 0, sizeof(c));
        c.type = AAMM__CS_MEMBER_PUT;
        c.id = cs->boot[0].id;
        c.name = cs->boot[0].name;
        c.name_len = strlen(c.name);
        c.link = cs->boot[0].link;
        c.link_len = strlen(c.link);
        c.raft = cs->boot[0].raft;
        c.raft_len = strlen(c.raft);
        cs->boot_inflight = true;
        if (submit(cs, OP_APPLY, CB_NONE, &c, NULL, NULL) != 0)
            cs->boot_inflight = false;
    }
}

/* ---- host-driven loop
 * ------------------------------------------------------------------------------------ */

AAMM_API int aamm_consensus_fd(const struct aamm_consensus *cs)
{
    return cs && cs->loop_open ? uv_backend_fd(&cs->loop) : -1;
}

AAMM_API int aamm_consensus_events(const struct aamm_consensus *cs)
{
    AAMM__UNUSED(cs);
    return AAMM_READ;
}

AAMM_API int aamm_consensus_timeout(struct aamm_consensus *cs)
{
    int t;
    struct req *r;
    int64_t now;
    if (cs == NULL || !cs->loop_open || cs->closed)
        return -1;
    uv_update_time(&cs->loop);
    t = uv_backend_timeout(&cs->loop);
    now = aamm__now_ms();
    for (r = cs->reqs; r != NULL; r = r->next) {
        int64_t due;
        if (r->state == R_DONE)
            return 0;
        if (r->state == R_IDLE)
            due = r->not_before_ms > now ? r->not_before_ms - now : RETRY_DELAY_MS;
        else if (r->state == R_SENT || r->state == R_WAIT_APPLY)
            due = r->deadline_ms - now;
        else
            continue;
        if (due < 0)
            due = 0;
        if (t < 0 || due < t)
            t = (int)due;
    }
    if (cs->n_boot > 0 && (t < 0 || t > 100))
        t = 100;
    return t;
}

AAMM_API int aamm_consensus_step(struct aamm_consensus *cs)
{
    if (cs == NULL)
        return AAMM_EINVAL;
    if (!cs->started || cs->closing)
        return 0;
    uv_run(&cs->loop, UV_RUN_NOWAIT);
    pump(cs);
    deliver(cs);
    if (raft_state(&cs->raft) == RAFT_UNAVAILABLE && !cs->closing) {
        if (!cs->failed)
            aamm__errf(&cs->err, AAMM_EIO, "consensus: raft failed: %s", raft_errmsg(&cs->raft));
        cs->failed = true;
        return AAMM_EIO;
    }
    return 0;
}

AAMM_API int aamm_consensus_run_until(struct aamm_consensus *cs, bool (*done)(void *arg), void *arg,
                                      int timeout_ms)
{
    int64_t end = aamm__now_ms() + timeout_ms;
    for (;;) {
        struct pollfd pfd;
        int64_t left;
        int t, rc;
        if (done != NULL && done(arg))
            return 0;
        left = end - aamm__now_ms();
        if (left <= 0)
            return AAMM_ETIMEDOUT;
        t = aamm_consensus_timeout(cs);
        if (t < 0 || t > left)
            t = (int)left;
        pfd.fd = aamm_consensus_fd(cs);
        pfd.events = POLLIN;
        pfd.revents = 0;
        poll(&pfd, 1, t);
        rc = aamm_consensus_step(cs);
        if (rc != 0)
            return rc;
    }
}

/* ---- close
 * ----------------------------------------------------------------------------------------------------
 */

static void raft_closed_cb(struct raft *r)
{
    struct aamm_consensus *cs =
        (struct aamm_consensus *)((char *)r - offsetof(struct aamm_consensus, raft));
    cs->raft_closed = true;
}

AAMM_API void aamm_consensus_close(struct aamm_consensus *cs)
{
    struct req *r;
    size_t i;
    int64_t end;
    if (cs == NULL || cs->closed)
        return;
    cs->closing = true;
    if (cs->fwd != NULL) {
        aamm__cs_conn_set_cbs(cs->fwd, NULL, NULL, NULL);
        aamm__cs_conn_close(cs->fwd);
        cs->fwd = NULL;
    }
    for (i = 0; i < cs->n_srv; i++) {
        aamm__cs_conn_set_cbs(cs->srv[i], NULL, NULL, NULL);
        aamm__cs_conn_close(cs->srv[i]);
    }
    cs->n_srv = 0;
    if (cs->raft_open) {
        /* First let the log writes in flight finish. raft 0.15 crashes when it is closed
         * as leader with two or more appends still being written: raft_uv cancels each
         * one, and raft's leader append callback, on any failure, truncates its in-memory
         * log from that append's first index. The first cancelled append truncates the
         * entries of the later ones too; the next callback then truncates from an index
         * past the end of the log and walks its entry-reference table into a NULL (the
         * bounds assert is compiled out in Debian's build): SEGV inside raft_close.
         * Several raft_apply (or membership) calls in one step, e.g. galloc requests
         * forwarded by the other members at once, followed by a close before the disk
         * write completes, hit it. Nothing submits new entries once cs->closing is set
         * (lexec_step refuses, the forwarding channels are closed above), so the writes
         * complete within a disk latency; the deadline only bounds odd cases. */
        end = aamm__now_ms() + 2000;
        while (cs->raft.last_stored < raft_last_index(&cs->raft) && aamm__now_ms() < end)
            uv_run(&cs->loop, UV_RUN_ONCE);
        /* Pending raft requests fail (their callbacks finish our executions). raft closes
         * the io and our transport. */
        raft_close(&cs->raft, raft_closed_cb);
        end = aamm__now_ms() + 10000;
        while ((!cs->raft_closed || uv_loop_alive(&cs->loop)) && aamm__now_ms() < end)
            uv_run(&cs->loop, UV_RUN_ONCE);
        if (!cs->raft_closed || uv_loop_alive(&cs->loop))
            AAMM_WARN("consensus: close did not drain the loop in 10 s");
        cs->raft_open = false;
        cs->transport_open = false; /* raft closed it */
    }
    while (cs->lexecs != NULL)
        lexec_finish(cs->lexecs, AAMM_ECLOSED);
    for (r = cs->reqs; r != NULL; r = r->next)
        if (r->state != R_DONE)
            req_done(r, AAMM_ECLOSED);
    deliver(cs);
    if (cs->io_open) {
        raft_uv_close(&cs->io);
        cs->io_open = false;
    }
    if (cs->transport.impl != NULL)
        aamm__psk_free(&cs->transport);
    if (cs->loop_open) {
        uv_run(&cs->loop, UV_RUN_NOWAIT);
        if (uv_loop_close(&cs->loop) == 0)
            cs->loop_open = false;
        else
            AAMM_WARN("consensus: libuv loop still busy at close");
    }
    cs->closed = true;
}

AAMM_API void aamm_consensus_free(struct aamm_consensus *cs)
{
    if (cs == NULL)
        return;
    aamm_consensus_close(cs);
    aamm__cs_fsm_close(&cs->fsm);
    if (cs->lock_fd >= 0)
        close(cs->lock_fd);
    aamm__free(cs->srv);
    aamm__free(cs->boot);
    aamm__free(cs->dir);
    aamm__free(cs->raft_dir);
    aamm__free(cs->cluster);
    aamm__free(cs);
}

/* ---- queries
 * ----------------------------------------------------------------------------------------------------
 */

AAMM_API int aamm_consensus_state(const struct aamm_consensus *cs)
{
    if (cs == NULL || !cs->started || cs->closing)
        return AAMM_CONSENSUS_UNAVAILABLE;
    return raft_state((struct raft *)&cs->raft);
}

AAMM_API int aamm_consensus_leader(const struct aamm_consensus *cs, uint32_t *id, char *addr,
                                   size_t addr_size)
{
    raft_id lid = 0;
    const char *laddr = NULL;
    if (cs != NULL && cs->started && !cs->closing)
        raft_leader((struct raft *)&cs->raft, &lid, &laddr);
    if (id != NULL)
        *id = (uint32_t)lid;
    if (addr != NULL && addr_size > 0)
        snprintf(addr, addr_size, "%s", laddr ? laddr : "");
    return lid != 0 ? 0 : AAMM_ENOTLEADER;
}

AAMM_API uint32_t aamm_consensus_node_id(const struct aamm_consensus *cs)
{
    return cs ? cs->id : 0;
}

AAMM_API uint64_t aamm_consensus_incarnation(const struct aamm_consensus *cs)
{
    return cs != NULL ? cs->handle_inc : 0;
}

AAMM_API uint64_t aamm_consensus_term(const struct aamm_consensus *cs)
{
    return cs && cs->raft_open ? cs->raft.current_term : 0;
}

AAMM_API uint64_t aamm_consensus_applied_index(const struct aamm_consensus *cs)
{
    return cs && cs->raft_open ? raft_last_applied((struct raft *)&cs->raft) : 0;
}

AAMM_API uint64_t aamm_consensus_state_hash(const struct aamm_consensus *cs)
{
    return cs ? aamm__cs_state_hash(&cs->fsm.st) : 0;
}

/* ---- commands
 * --------------------------------------------------------------------------------------------------
 */

AAMM_API int aamm_consensus_galloc(struct aamm_consensus *cs, const char *seq_name, uint64_t count,
                                   int64_t min_start, aamm_consensus_galloc_cb cb, void *arg)
{
    struct aamm__cs_cmd c;
    size_t len;
    if (cs == NULL || seq_name == NULL || cb == NULL)
        return AAMM_EINVAL;
    len = strlen(seq_name);
    if (len == 0 || len > AAMM_CONSENSUS_NAME_MAX || count == 0 || count > (UINT64_C(1) << 31))
        return aamm__errf(&cs->err, AAMM_EINVAL,
                          "consensus: galloc needs a name of 1..255 bytes and a count of "
                          "1..2^31");
    memset(&c, 0, sizeof(c));
    c.type = AAMM__CS_GALLOC;
    c.name = seq_name;
    c.name_len = len;
    c.count = count;
    c.min_start = min_start;
    return submit(cs, OP_APPLY, CB_GALLOC, &c, (void (*)(void))cb, arg);
}

AAMM_API int aamm_consensus_ddl_acquire(struct aamm_consensus *cs, uint32_t lease_ms,
                                        aamm_consensus_ddl_cb cb, void *arg)
{
    struct aamm__cs_cmd c;
    if (cs == NULL || cb == NULL)
        return AAMM_EINVAL;
    if (lease_ms == 0 || lease_ms > 3600000)
        return aamm__errf(&cs->err, AAMM_EINVAL, "consensus: lease must be 1..3600000 ms");
    memset(&c, 0, sizeof(c));
    c.type = AAMM__CS_DDL_ACQUIRE;
    c.lease_ms = lease_ms;
    c.holder_inc = cs->handle_inc;
    return submit(cs, OP_APPLY, CB_DDL, &c, (void (*)(void))cb, arg);
}

AAMM_API int aamm_consensus_ddl_release(struct aamm_consensus *cs, uint64_t token,
                                        aamm_consensus_ddl_cb cb, void *arg)
{
    struct aamm__cs_cmd c;
    if (cs == NULL || cb == NULL)
        return AAMM_EINVAL;
    memset(&c, 0, sizeof(c));
    c.type = AAMM__CS_DDL_RELEASE;
    c.count = token;
    c.holder_inc = cs->handle_inc;
    return submit(cs, OP_APPLY, CB_DDL, &c, (void (*)(void))cb, arg);
}

AAMM_API void aamm_consensus_ddl_get(const struct aamm_consensus *cs,
                                     struct aamm_consensus_ddl_lock *out)
{
    if (out == NULL)
        return;
    memset(out, 0, sizeof(*out));
    if (cs != NULL)
        *out = cs->fsm.st.ddl;
}

AAMM_API int aamm_consensus_watermark_set(struct aamm_consensus *cs, uint32_t origin,
                                          uint64_t value, aamm_consensus_done_cb cb, void *arg)
{
    struct aamm__cs_cmd c;
    if (cs == NULL || !aamm_node_id_valid(origin))
        return AAMM_EINVAL;
    memset(&c, 0, sizeof(c));
    c.type = AAMM__CS_WATERMARK;
    c.id = origin;
    c.count = value;
    return submit(cs, OP_APPLY, CB_DONE, &c, (void (*)(void))cb, arg);
}

AAMM_API uint64_t aamm_consensus_watermark_get(const struct aamm_consensus *cs, uint32_t origin)
{
    return cs ? aamm__cs_state_watermark(&cs->fsm.st, origin) : 0;
}

AAMM_API int aamm_consensus_add_member(struct aamm_consensus *cs,
                                       const struct aamm_consensus_member *m,
                                       aamm_consensus_done_cb cb, void *arg)
{
    struct aamm__cs_cmd c;
    char raft[64];
    int rc;
    if (cs == NULL || m == NULL)
        return AAMM_EINVAL;
    if (!aamm_node_id_valid(m->node_id) || !text_ok(m->name) ||
        !text_ok(m->link_address ? m->link_address : ""))
        return aamm__errf(&cs->err, AAMM_EINVAL,
                          "consensus: member needs an id in 1..%d and a name/link of at most "
                          "255 bytes without tabs or newlines",
                          AAMM_NODE_ID_MAX);
    rc = resolve_addr(&cs->err, "consensus: member raft_address", m->raft_address, raft,
                      sizeof(raft));
    if (rc != 0)
        return rc;
    memset(&c, 0, sizeof(c));
    c.type = AAMM__CS_MEMBER_PUT;
    c.id = m->node_id;
    c.name = m->name;
    c.name_len = strlen(m->name);
    c.link = m->link_address ? m->link_address : "";
    c.link_len = strlen(c.link);
    c.raft = raft;
    c.raft_len = strlen(raft);
    return submit(cs, OP_ADD, CB_DONE, &c, (void (*)(void))cb, arg);
}

AAMM_API int aamm_consensus_remove_member(struct aamm_consensus *cs, uint32_t node_id,
                                          aamm_consensus_done_cb cb, void *arg)
{
    struct aamm__cs_cmd c;
    if (cs == NULL || !aamm_node_id_valid(node_id))
        return AAMM_EINVAL;
    memset(&c, 0, sizeof(c));
    c.type = AAMM__CS_MEMBER_DEL;
    c.id = node_id;
    return submit(cs, OP_REMOVE, CB_DONE, &c, (void (*)(void))cb, arg);
}

AAMM_API int aamm_consensus_noop(struct aamm_consensus *cs, aamm_consensus_done_cb cb, void *arg)
{
    struct aamm__cs_cmd c;
    if (cs == NULL)
        return AAMM_EINVAL;
    memset(&c, 0, sizeof(c));
    c.type = AAMM__CS_NOOP;
    return submit(cs, OP_APPLY, CB_DONE, &c, (void (*)(void))cb, arg);
}

/* ---- test hooks ---------------------------------------------------------------------- */

void aamm__consensus_partition(struct aamm_consensus *cs, bool on)
{
    if (cs == NULL || cs->transport.impl == NULL)
        return;
    aamm__psk_partition(&cs->transport, on);
    if (on && cs->fwd != NULL) {
        struct aamm__cs_conn *old = cs->fwd;
        cli_state(old, false, cs);
        aamm__cs_conn_set_cbs(old, NULL, NULL, NULL);
    }
    if (on) {
        size_t i;
        for (i = 0; i < cs->n_srv; i++)
            aamm__cs_conn_set_cbs(cs->srv[i], NULL, NULL, NULL);
        cs->n_srv = 0;
    }
}

/* ---- accessors
 * -----------------------------------------------------------------------------------------------
 */

AAMM_API size_t aamm_consensus_member_count(const struct aamm_consensus *cs)
{
    return cs ? cs->fsm.st.n_members : 0;
}

static void member_out(const struct aamm__cs_member *m, struct aamm_consensus_member *out)
{
    out->node_id = m->id;
    out->name = m->name;
    out->link_address = m->link;
    out->raft_address = m->raft;
}

AAMM_API int aamm_consensus_member_at(const struct aamm_consensus *cs, size_t i,
                                      struct aamm_consensus_member *out)
{
    if (cs == NULL || out == NULL || i >= cs->fsm.st.n_members)
        return AAMM_ENOTFOUND;
    member_out(&cs->fsm.st.members[i], out);
    return 0;
}

AAMM_API int aamm_consensus_member_get(const struct aamm_consensus *cs, uint32_t node_id,
                                       struct aamm_consensus_member *out)
{
    const struct aamm__cs_member *m;
    if (cs == NULL || out == NULL)
        return AAMM_ENOTFOUND;
    m = aamm__cs_state_member(&cs->fsm.st, node_id);
    if (m == NULL)
        return AAMM_ENOTFOUND;
    member_out(m, out);
    return 0;
}

AAMM_API int aamm_consensus_galloc_next(const struct aamm_consensus *cs, const char *seq_name,
                                        int64_t *next)
{
    const struct aamm__cs_seq *s;
    if (cs == NULL || seq_name == NULL)
        return AAMM_ENOTFOUND;
    s = aamm__cs_state_seq(&cs->fsm.st, seq_name, strlen(seq_name));
    if (s == NULL)
        return AAMM_ENOTFOUND;
    if (next != NULL)
        *next = s->next;
    return 0;
}
