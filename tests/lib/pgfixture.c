/* pgfixture.c: throwaway PostgreSQL clusters with a reaper that cleans up after crashes. */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pgfixture.h"

#define PG_USER "postgres"

struct pgfx_node {
    char dir[512];     /* node directory: socket, log */
    char datadir[600]; /* dir/data */
    char log[600];
    char conninfo[1024];
    int port;
    bool running;
};

struct pgfx {
    char root[256];
    int n;
    int reaper_fd; /* write end of the pipe the reaper reads */
    pid_t reaper;
    struct pgfx_node nodes[PGFX_MAX_NODES];
};

/* ====================================================================================
 * Running programs
 * ==================================================================================== */

static bool am_root(void)
{
    return geteuid() == 0;
}

const char *pgfx_bin(const char *name)
{
    static char path[512];
    const char *dir = getenv("AAMM_PG_BINDIR");
    if (dir == NULL || *dir == '\0')
        dir = AAMM_PG_BINDIR;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return path;
}

static void close_from(int lowfd, int keep)
{
    long max = sysconf(_SC_OPEN_MAX);
    if (max < 0 || max > 65536)
        max = 65536;
    for (int fd = lowfd; fd < max; fd++)
        if (fd != keep)
            close(fd);
}

int pgfx_run(const char *const argv[], const char *log)
{
    const char *args[64];
    int n = 0, status;
    pid_t pid;
    char prog[512];

    snprintf(prog, sizeof prog, "%s", strchr(argv[0], '/') ? argv[0] : pgfx_bin(argv[0]));
    if (am_root()) {
        args[n++] = "runuser";
        args[n++] = "-u";
        args[n++] = PG_USER;
        args[n++] = "--";
    }
    args[n++] = prog;
    for (int i = 1; argv[i] != NULL && n < 62; i++)
        args[n++] = argv[i];
    args[n] = NULL;

    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        int fd = open(log ? log : "/dev/null", O_WRONLY | O_CREAT | O_APPEND, 0644);
        int devnull = open("/dev/null", O_RDONLY);
        if (fd >= 0) {
            struct passwd *pw = am_root() ? getpwnam(PG_USER) : NULL;
            /* The server appends to the same log as postgres: let it. */
            if (pw != NULL && log != NULL && fchown(fd, pw->pw_uid, pw->pw_gid) != 0)
                _exit(126);
            dup2(fd, 1);
            dup2(fd, 2);
        }
        if (devnull >= 0)
            dup2(devnull, 0);
        close_from(3, -1);
        if (am_root())
            execv("/usr/sbin/runuser", (char *const *)args);
        else
            execv(prog, (char *const *)args);
        _exit(127);
    }
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

static void remove_tree(const char *path)
{
    const char *argv[] = {"rm", "-rf", path, NULL};
    pid_t pid = fork();
    int status;
    if (pid == 0) {
        close_from(3, -1);
        execvp("rm", (char *const *)argv);
        _exit(127);
    }
    if (pid > 0)
        waitpid(pid, &status, 0);
}

/* ====================================================================================
 * Process helpers
 * ==================================================================================== */

static pid_t read_pidfile(const char *datadir)
{
    char path[700];
    FILE *f;
    long pid = 0;
    snprintf(path, sizeof path, "%s/postmaster.pid", datadir);
    f = fopen(path, "r");
    if (f == NULL)
        return 0;
    if (fscanf(f, "%ld", &pid) != 1)
        pid = 0;
    fclose(f);
    return (pid_t)pid;
}

static bool alive(pid_t pid)
{
    return pid > 0 && (kill(pid, 0) == 0 || errno == EPERM);
}

/* Children of @ppid, found in /proc. Returns how many were written to @out. */
static int children_of(pid_t ppid, pid_t *out, int max)
{
    DIR *d = opendir("/proc");
    struct dirent *e;
    int n = 0;
    if (d == NULL)
        return 0;
    while ((e = readdir(d)) != NULL && n < max) {
        char path[300], buf[512];
        FILE *f;
        long pid = strtol(e->d_name, NULL, 10), pp = 0;
        if (pid <= 0)
            continue;
        snprintf(path, sizeof path, "/proc/%ld/stat", pid);
        f = fopen(path, "r");
        if (f == NULL)
            continue;
        if (fgets(buf, sizeof buf, f) != NULL) {
            char *rp = strrchr(buf, ')');
            if (rp != NULL && sscanf(rp + 1, " %*c %ld", &pp) == 1 && pp == ppid)
                out[n++] = (pid_t)pid;
        }
        fclose(f);
    }
    closedir(d);
    return n;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* Kill a postmaster and all its children hard, and wait until they are gone. */
static void kill_server(pid_t pm)
{
    pid_t kids[256];
    int nk;
    if (!alive(pm))
        return;
    nk = children_of(pm, kids, 256);
    kill(pm, SIGKILL);
    for (int i = 0; i < nk; i++)
        kill(kids[i], SIGKILL);
    for (int t = 0; t < 200; t++) {
        bool any = alive(pm);
        for (int i = 0; !any && i < nk; i++)
            any = alive(kids[i]);
        if (!any)
            break;
        sleep_ms(25);
    }
}

/* ====================================================================================
 * The reaper: an outside process that cleans up when the test process dies.
 * ==================================================================================== */

static void reap_root(const char *root)
{
    DIR *d = opendir(root);
    struct dirent *e;
    if (d != NULL) {
        while ((e = readdir(d)) != NULL) {
            char datadir[600];
            pid_t pm;
            if (e->d_name[0] == '.')
                continue;
            snprintf(datadir, sizeof datadir, "%s/%s/data", root, e->d_name);
            pm = read_pidfile(datadir);
            if (pm > 0)
                kill_server(pm);
        }
        closedir(d);
    }
    remove_tree(root);
}

static pid_t start_reaper(const char *root, int *wfd)
{
    int fds[2];
    pid_t pid;
    if (pipe2(fds, O_CLOEXEC) != 0)
        return -1;
    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid < 0) {
        close(fds[0]);
        close(fds[1]);
        return -1;
    }
    if (pid == 0) {
        char buf[16];
        int devnull = open("/dev/null", O_RDWR);
        /* Out of the test's process group and session: Check kills the group of a
         * timed-out test, and the reaper must outlive it. */
        setsid();
        signal(SIGINT, SIG_IGN);
        signal(SIGTERM, SIG_IGN);
        signal(SIGHUP, SIG_IGN);
        signal(SIGPIPE, SIG_IGN);
        if (devnull >= 0) {
            dup2(devnull, 0);
            dup2(devnull, 1);
            dup2(devnull, 2);
        }
        close(fds[1]);
        close_from(3, fds[0]);
        while (read(fds[0], buf, sizeof buf) != 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        reap_root(root);
        _exit(0);
    }
    close(fds[0]);
    *wfd = fds[1];
    return pid;
}

/* ====================================================================================
 * Clusters
 * ==================================================================================== */

static int chown_pg(const char *path)
{
    struct passwd *pw;
    if (!am_root())
        return 0;
    pw = getpwnam(PG_USER);
    if (pw == NULL) {
        fprintf(stderr, "pgfixture: running as root but there is no '%s' user\n", PG_USER);
        return -1;
    }
    return chown(path, pw->pw_uid, pw->pw_gid);
}

static int node_start(struct pgfx_node *nd)
{
    const char *argv[] = {"pg_ctl", "-D", nd->datadir, "-l", nd->log, "-w", "-t", "120",
                          "-s", "start", NULL};
    int rc = pgfx_run(argv, nd->log);
    if (rc != 0) {
        fprintf(stderr, "pgfixture: pg_ctl start failed for %s (exit %d); see %s\n",
                nd->datadir, rc, nd->log);
        return -1;
    }
    nd->running = true;
    return 0;
}

static int node_init(struct pgfx_node *nd, int i, const char *root, const char *extra)
{
    FILE *f;
    char conf[700];
    const char *argv[] = {"initdb", "-D", nd->datadir, "-U", PG_USER, "--auth=trust",
                          "--no-sync", "-E", "UTF8", "--locale=C", NULL};

    snprintf(nd->dir, sizeof nd->dir, "%s/n%d", root, i);
    snprintf(nd->datadir, sizeof nd->datadir, "%s/data", nd->dir);
    snprintf(nd->log, sizeof nd->log, "%s/server.log", nd->dir);
    nd->port = 5432 + i;
    if (mkdir(nd->dir, 0755) != 0 || chown_pg(nd->dir) != 0) {
        fprintf(stderr, "pgfixture: cannot create %s: %s\n", nd->dir, strerror(errno));
        return -1;
    }
    if (pgfx_run(argv, nd->log) != 0) {
        fprintf(stderr, "pgfixture: initdb failed; see %s\n", nd->log);
        return -1;
    }
    snprintf(conf, sizeof conf, "%s/postgresql.conf", nd->datadir);
    f = fopen(conf, "a");
    if (f == NULL) {
        fprintf(stderr, "pgfixture: cannot open %s: %s\n", conf, strerror(errno));
        return -1;
    }
    fprintf(f,
            "\n# libaamm test fixture\n"
            "listen_addresses = ''\n"
            "unix_socket_directories = '%s'\n"
            "port = %d\n"
            "wal_level = logical\n"
            "track_commit_timestamp = on\n"
            "max_replication_slots = 32\n"
            "max_wal_senders = 32\n"
            "max_worker_processes = 16\n"
            "max_logical_replication_workers = 8\n"
            "max_connections = 100\n"
            "shared_buffers = 64MB\n"
            "fsync = off\n"
            "full_page_writes = off\n"
            "log_min_messages = warning\n"
            "log_line_prefix = '%%m [%%p] %%q%%a '\n"
            "%s\n",
            nd->dir, nd->port, extra ? extra : "");
    fclose(f);
    snprintf(nd->conninfo, sizeof nd->conninfo,
             "host=%s port=%d dbname=postgres user=" PG_USER, nd->dir, nd->port);
    return node_start(nd);
}

struct pgfx *pgfx_start(int n, const char *extra_conf)
{
    struct pgfx *fx;
    const char *tmp = getenv("TMPDIR");
    if (n < 1 || n > PGFX_MAX_NODES)
        return NULL;
    fx = calloc(1, sizeof *fx);
    if (fx == NULL)
        return NULL;
    fx->reaper_fd = -1;
    /* Unix socket paths are limited to ~107 bytes: stay short. */
    snprintf(fx->root, sizeof fx->root, "%s/aamm-pgfx-XXXXXX",
             tmp && *tmp && strlen(tmp) < 60 ? tmp : "/tmp");
    if (mkdtemp(fx->root) == NULL) {
        fprintf(stderr, "pgfixture: mkdtemp: %s\n", strerror(errno));
        free(fx);
        return NULL;
    }
    chmod(fx->root, 0755);
    fx->reaper = start_reaper(fx->root, &fx->reaper_fd);
    if (fx->reaper < 0) {
        fprintf(stderr, "pgfixture: cannot start the reaper\n");
        remove_tree(fx->root);
        free(fx);
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        fx->n = i + 1;
        if (node_init(&fx->nodes[i], i, fx->root, extra_conf) != 0) {
            char cmd[800];
            snprintf(cmd, sizeof cmd, "tail -n 30 %s >&2", fx->nodes[i].log);
            if (system(cmd) != 0) {
                /* nothing more to show */
            }
            pgfx_destroy(fx);
            return NULL;
        }
    }
    return fx;
}

void pgfx_destroy(struct pgfx *fx)
{
    if (fx == NULL)
        return;
    for (int i = 0; i < fx->n; i++) {
        pid_t pm = read_pidfile(fx->nodes[i].datadir);
        if (pm > 0)
            kill_server(pm);
    }
    remove_tree(fx->root);
    if (fx->reaper_fd >= 0)
        close(fx->reaper_fd);
    if (fx->reaper > 0)
        waitpid(fx->reaper, NULL, 0);
    free(fx);
}

int pgfx_nodes(const struct pgfx *fx)
{
    return fx->n;
}

const char *pgfx_conninfo(const struct pgfx *fx, int i)
{
    return fx->nodes[i].conninfo;
}

const char *pgfx_conninfo_with(const struct pgfx *fx, int i, const char *extra)
{
    static char buf[1200];
    snprintf(buf, sizeof buf, "%s %s", fx->nodes[i].conninfo, extra);
    return buf;
}

const char *pgfx_datadir(const struct pgfx *fx, int i)
{
    return fx->nodes[i].datadir;
}

const char *pgfx_sockdir(const struct pgfx *fx, int i)
{
    return fx->nodes[i].dir;
}

const char *pgfx_logfile(const struct pgfx *fx, int i)
{
    return fx->nodes[i].log;
}

int pgfx_port(const struct pgfx *fx, int i)
{
    return fx->nodes[i].port;
}

const char *pgfx_root(const struct pgfx *fx)
{
    return fx->root;
}

PGconn *pgfx_connect(const struct pgfx *fx, int i)
{
    PGconn *c = PQconnectdb(fx->nodes[i].conninfo);
    if (PQstatus(c) != CONNECTION_OK) {
        fprintf(stderr, "pgfixture: connect to node %d: %s", i, PQerrorMessage(c));
        PQfinish(c);
        return NULL;
    }
    return c;
}

static int exec_v(PGconn *c, const char *fmt, va_list ap)
{
    char *sql;
    PGresult *r;
    int rc = 0;
    if (vasprintf(&sql, fmt, ap) < 0)
        return -1;
    r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK) {
        fprintf(stderr, "pgfixture: SQL failed: %s\n  %.300s\n", PQerrorMessage(c), sql);
        rc = -1;
    }
    PQclear(r);
    free(sql);
    return rc;
}

int pgfx_exec_conn(PGconn *conn, const char *fmt, ...)
{
    va_list ap;
    int rc;
    va_start(ap, fmt);
    rc = exec_v(conn, fmt, ap);
    va_end(ap);
    return rc;
}

int pgfx_exec(const struct pgfx *fx, int i, const char *fmt, ...)
{
    va_list ap;
    int rc;
    PGconn *c = pgfx_connect(fx, i);
    if (c == NULL)
        return -1;
    va_start(ap, fmt);
    rc = exec_v(c, fmt, ap);
    va_end(ap);
    PQfinish(c);
    return rc;
}

static char *value_v(const struct pgfx *fx, int i, const char *fmt, va_list ap)
{
    char *sql, *out = NULL;
    PGresult *r;
    PGconn *c = pgfx_connect(fx, i);
    if (c == NULL)
        return NULL;
    if (vasprintf(&sql, fmt, ap) < 0) {
        PQfinish(c);
        return NULL;
    }
    r = PQexec(c, sql);
    if (PQresultStatus(r) == PGRES_TUPLES_OK) {
        if (PQntuples(r) > 0 && !PQgetisnull(r, 0, 0))
            out = strdup(PQgetvalue(r, 0, 0));
    } else {
        fprintf(stderr, "pgfixture: query failed: %s\n  %.300s\n", PQerrorMessage(c), sql);
    }
    PQclear(r);
    PQfinish(c);
    free(sql);
    return out;
}

char *pgfx_value(const struct pgfx *fx, int i, const char *fmt, ...)
{
    va_list ap;
    char *v;
    va_start(ap, fmt);
    v = value_v(fx, i, fmt, ap);
    va_end(ap);
    return v;
}

long pgfx_value_long(const struct pgfx *fx, int i, long dflt, const char *fmt, ...)
{
    va_list ap;
    char *v;
    long out = dflt;
    va_start(ap, fmt);
    v = value_v(fx, i, fmt, ap);
    va_end(ap);
    if (v != NULL)
        out = strtol(v, NULL, 10);
    free(v);
    return out;
}

int pgfx_stop_node(struct pgfx *fx, int i, const char *mode)
{
    struct pgfx_node *nd = &fx->nodes[i];
    const char *argv[] = {"pg_ctl", "-D", nd->datadir, "-m", mode, "-w", "-t", "60", "-s",
                          "stop", NULL};
    if (pgfx_run(argv, nd->log) != 0)
        return -1;
    nd->running = false;
    return 0;
}

int pgfx_start_node(struct pgfx *fx, int i)
{
    return node_start(&fx->nodes[i]);
}

int pgfx_crash_node(struct pgfx *fx, int i)
{
    struct pgfx_node *nd = &fx->nodes[i];
    pid_t pm = read_pidfile(nd->datadir);
    if (pm <= 0)
        return -1;
    kill_server(pm);
    nd->running = false;
    return alive(pm) ? -1 : 0;
}

pid_t pgfx_postmaster_pid(const struct pgfx *fx, int i)
{
    pid_t pm = read_pidfile(fx->nodes[i].datadir);
    return alive(pm) ? pm : 0;
}

long pgfx_wait_long(const struct pgfx *fx, int i, long want, int timeout_ms, const char *fmt, ...)
{
    char sql[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        long v = pgfx_value_long(fx, i, -1, "%s", sql);
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (v == want || (t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 >= timeout_ms)
            return v;
        sleep_ms(20);
    }
}
