/*
 * bikes-agent: the bike-rental service's replication agent, one process beside each
 * city's PostgreSQL node. A thin host around libaamm's replicator (aamm/replicator.h),
 * built only on the public API:
 *
 *   bikes-agent -c FILE setup   install libaamm's schema on the node, store the snowflake
 *                               node id, load schema_file, create the apply role, replicate
 *                               the tables (publication "aamm"), DDL replication on or off
 *                               (ddl, table_owner); idempotent
 *   bikes-agent -c FILE run     replicate until SIGTERM/SIGINT; SIGUSR1 logs a status line
 *   bikes-agent -c FILE check   validate the configuration for setup and run
 *   bikes-agent -c FILE join ID a new node, after setup: copy peer ID's data while the
 *                               cluster writes, and set where its streams start
 *                               (aamm_node_join(); every peer needs a peer_conninfo)
 *
 * Exit status: 0 done, 1 a failure while working (setup, start, step), 2 bad usage or
 * configuration. The configuration keys: doc/man/bikes-agent.1.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include <aamm/aamm.h>
#include <aamm/conflict.h>
#include <aamm/consensus.h>
#include <aamm/ddl.h>
#include <aamm/node.h>
#include <aamm/replicator.h>
#include <aamm/seq.h>

#include "bikes_config.h"

/* ====================================================================================
 * Logging: one line each on stderr, "2026-12-03 13:05:01.123 amsterdam INFO text"
 * ==================================================================================== */

static const char *log_node = "bikes-agent";
static int log_max = AAMM_LOG_INFO;

static void log_line(int level, const char *file, int line, const char *msg)
{
    static const char *const names[] = {"?", "ERROR", "WARN", "INFO", "DEBUG"};
    struct timespec ts;
    struct tm tm;
    char when[32];
    if (level > log_max)
        return;
    clock_gettime(CLOCK_REALTIME, &ts);
    localtime_r(&ts.tv_sec, &tm);
    strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm);
    if (file != NULL && log_max >= AAMM_LOG_DEBUG)
        fprintf(stderr, "%s.%03ld %s %s %s (%s:%d)\n", when, ts.tv_nsec / 1000000, log_node,
                names[level >= 1 && level <= 4 ? level : 0], msg, file, line);
    else
        fprintf(stderr, "%s.%03ld %s %s %s\n", when, ts.tv_nsec / 1000000, log_node,
                names[level >= 1 && level <= 4 ? level : 0], msg);
}

static void logf_(int level, const char *fmt, ...) AAMM_PRINTF(2, 3);

static void logf_(int level, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    if (level > log_max)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    log_line(level, NULL, 0, msg);
}

/* libpq's multi-line messages on one log line: newlines and tabs become spaces. */
static const char *oneline(char *msg)
{
    char *p;
    size_t n;
    for (p = msg; *p; p++)
        if (*p == '\n' || *p == '\t')
            *p = ' ';
    n = strlen(msg);
    while (n > 0 && msg[n - 1] == ' ')
        msg[--n] = '\0';
    return msg;
}

static void on_library_log(int level, const char *file, int line, const char *msg, void *arg)
{
    char copy[2048];
    (void)arg;
    snprintf(copy, sizeof copy, "%s", msg);
    log_line(level, file, line, oneline(copy));
}

/* ====================================================================================
 * setup
 * ==================================================================================== */

/* Read a whole file into a new string; NULL with a message on failure. */
static char *slurp(const char *path, char *err, size_t errsize)
{
    FILE *f = fopen(path, "r");
    char *buf;
    long n;
    if (f == NULL || fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET)) {
        snprintf(err, errsize, "%s: %s", path, strerror(errno));
        if (f != NULL)
            fclose(f);
        return NULL;
    }
    buf = malloc((size_t)n + 1);
    if (buf == NULL || fread(buf, 1, (size_t)n, f) != (size_t)n) {
        snprintf(err, errsize, "%s: read error", path);
        free(buf);
        fclose(f);
        return NULL;
    }
    buf[n] = '\0';
    fclose(f);
    return buf;
}

/* The user named in a conninfo (copied into @out); "" when none. */
static int conninfo_user(const char *conninfo, char *out, size_t size, char *err, size_t errsize)
{
    char *perr = NULL;
    PQconninfoOption *o, *opts = PQconninfoParse(conninfo, &perr);
    if (opts == NULL) {
        snprintf(err, errsize, "apply_conninfo: %s", perr ? perr : "out of memory");
        PQfreemem(perr);
        return -1;
    }
    out[0] = '\0';
    for (o = opts; o->keyword != NULL; o++)
        if (!strcmp(o->keyword, "user") && o->val != NULL)
            snprintf(out, size, "%s", o->val);
    PQconninfoFree(opts);
    return 0;
}

/* Run @sql on @conn; AAMM_ESERVER with "WHAT: the server's message" in @err on failure. */
static int exec_sql(PGconn *conn, const char *what, const char *sql, char *err, size_t errsize)
{
    PGresult *res = PQexec(conn, sql);
    int ok = PQresultStatus(res) == PGRES_COMMAND_OK || PQresultStatus(res) == PGRES_TUPLES_OK;
    if (!ok)
        snprintf(err, errsize, "%s: %s", what, oneline(PQerrorMessage(conn)));
    PQclear(res);
    return ok ? 0 : PQstatus(conn) == CONNECTION_OK ? AAMM_ESERVER : AAMM_ECONN;
}

/* "schema.table" or "table" (public) into its two parts. */
static void split_table(const char *name, char *schema, size_t ssize, char *table, size_t tsize)
{
    const char *dot = strchr(name, '.');
    if (dot != NULL) {
        snprintf(schema, ssize, "%.*s", (int)(dot - name), name);
        snprintf(table, tsize, "%s", dot + 1);
    } else {
        snprintf(schema, ssize, "public");
        snprintf(table, tsize, "%s", name);
    }
}

/* table_owner: create the role when missing (NOLOGIN) and make it the owner of every
 * replicated table, so that DDL run as that role on any node can run as it on the peers. */
static int own_tables(PGconn *conn, const struct bikes_config *cfg, char *err, size_t errsize)
{
    const char *params[1] = {cfg->table_owner};
    char *qowner = PQescapeIdentifier(conn, cfg->table_owner, strlen(cfg->table_owner));
    char sql[1024];
    PGresult *res;
    bool exists;
    size_t i;
    int rc = 0;
    if (qowner == NULL) {
        snprintf(err, errsize, "table_owner: %s", oneline(PQerrorMessage(conn)));
        return AAMM_ESERVER;
    }
    res = PQexecParams(conn, "SELECT count(*) FROM pg_catalog.pg_roles WHERE rolname = $1", 1,
                       NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        snprintf(err, errsize, "table_owner: %s", oneline(PQerrorMessage(conn)));
        PQclear(res);
        PQfreemem(qowner);
        return AAMM_ESERVER;
    }
    exists = strcmp(PQgetvalue(res, 0, 0), "0") != 0;
    PQclear(res);
    if (!exists) {
        snprintf(sql, sizeof sql, "CREATE ROLE %s NOLOGIN", qowner);
        rc = exec_sql(conn, "table_owner", sql, err, errsize);
    }
    for (i = 0; rc == 0 && i < cfg->ntables; i++) {
        char schema[128], table[128];
        char *qs, *qt;
        split_table(cfg->tables[i], schema, sizeof schema, table, sizeof table);
        qs = PQescapeIdentifier(conn, schema, strlen(schema));
        qt = PQescapeIdentifier(conn, table, strlen(table));
        if (qs == NULL || qt == NULL) {
            snprintf(err, errsize, "table_owner: %s", oneline(PQerrorMessage(conn)));
            rc = AAMM_ESERVER;
        } else {
            snprintf(sql, sizeof sql, "ALTER TABLE %s.%s OWNER TO %s", qs, qt, qowner);
            rc = exec_sql(conn, "table_owner", sql, err, errsize);
        }
        PQfreemem(qs);
        PQfreemem(qt);
    }
    PQfreemem(qowner);
    if (rc == 0)
        logf_(AAMM_LOG_INFO, "setup: %zu tables owned by %s%s", cfg->ntables, cfg->table_owner,
              exists ? "" : " (role created, NOLOGIN)");
    return rc;
}

/* A connection to this node (conninfo), or NULL after logging why, as @what. */
static PGconn *connect_node(const struct bikes_config *cfg, const char *what)
{
    PGconn *conn = PQconnectdb(cfg->conninfo);
    if (PQstatus(conn) == CONNECTION_OK)
        return conn;
    logf_(AAMM_LOG_ERROR, "%s: cannot connect (conninfo): %s", what,
          oneline(PQerrorMessage(conn)));
    PQfinish(conn);
    return NULL;
}

/* The apply role may act as table_owner: it runs the DDL peers send as that role. */
static int grant_owner(PGconn *conn, const struct bikes_config *cfg, const char *role, char *err,
                       size_t errsize)
{
    char *qowner = PQescapeIdentifier(conn, cfg->table_owner, strlen(cfg->table_owner));
    char *qrole = PQescapeIdentifier(conn, role, strlen(role));
    char sql[512];
    int rc;
    if (qowner == NULL || qrole == NULL) {
        snprintf(err, errsize, "table_owner: %s", oneline(PQerrorMessage(conn)));
        rc = AAMM_ESERVER;
    } else {
        /* a repeated grant only gets a NOTICE */
        snprintf(sql, sizeof sql, "SET client_min_messages = warning; GRANT %s TO %s; "
                                  "RESET client_min_messages", qowner, qrole);
        rc = exec_sql(conn, "table_owner", sql, err, errsize);
    }
    PQfreemem(qowner);
    PQfreemem(qrole);
    return rc;
}

static int cmd_setup(const struct bikes_config *cfg)
{
    char err[1024], role[128] = "";
    char password[256];
    size_t plen = 0, i;
    int rc;
    PGconn *conn;

    if (cfg->apply_conninfo != NULL &&
        conninfo_user(cfg->apply_conninfo, role, sizeof role, err, sizeof err) != 0) {
        fprintf(stderr, "bikes-agent: %s: %s\n", cfg->path, err);
        return 2;
    }
    if (cfg->apply_password_file != NULL &&
        bikes_read_secret(cfg->apply_password_file, (uint8_t *)password, sizeof password - 1, &plen,
                          err, sizeof err) != 0) {
        fprintf(stderr, "bikes-agent: apply_password_file: %s\n", err);
        return 2;
    }
    password[plen] = '\0';

    if ((conn = connect_node(cfg, "setup")) == NULL)
        return 1;
    /* setup's own DDL (schema_file, ownership) is this node's: it never travels, also when
     * DDL capture is on from an earlier setup */
    if ((rc = exec_sql(conn, "setup", "SET aamm.replicate_ddl = off", err, sizeof err)) != 0)
        goto failed;
    /* 1. libaamm's SQL objects, 2. this node's snowflake node id */
    if ((rc = aamm_node_install(conn, err, sizeof err)) != 0 ||
        (rc = aamm_seq_install(conn, cfg->node_id, err, sizeof err)) != 0)
        goto failed;
    logf_(AAMM_LOG_INFO, "setup: libaamm schema version %d installed, snowflake node id %u",
          AAMM_NODE_SQL_VERSION, (unsigned)cfg->node_id);
    /* 3. the application's schema (it may use aamm.snowflake_nextval() in defaults) */
    if (cfg->schema_file != NULL) {
        char *sql = slurp(cfg->schema_file, err, sizeof err);
        if (sql == NULL) {
            rc = AAMM_EIO;
            goto failed;
        }
        rc = exec_sql(conn, cfg->schema_file, sql, err, sizeof err);
        free(sql);
        if (rc != 0)
            goto failed;
        logf_(AAMM_LOG_INFO, "setup: loaded %s", cfg->schema_file);
    }
    /* 4. the tables' owner (ddl = on), the role DDL on them runs as on every node */
    if (cfg->ddl && cfg->table_owner != NULL && (rc = own_tables(conn, cfg, err, sizeof err)) != 0)
        goto failed;
    /* 5. the apply role (only when apply logs in as a role of its own) */
    if (role[0] != '\0') {
        rc = aamm_node_create_apply_role(conn, role, plen ? password : NULL, err, sizeof err);
        if (rc != 0)
            goto failed;
        logf_(AAMM_LOG_INFO, "setup: apply role %s%s", role, plen ? " (password set)" : "");
    }
    /* 6. the replicated tables, "schema.table" or "table" (public) */
    for (i = 0; i < cfg->ntables; i++) {
        char schema[128], table[128];
        split_table(cfg->tables[i], schema, sizeof schema, table, sizeof table);
        rc = aamm_node_replicate_table(conn, schema, table, role[0] ? role : NULL, "aamm", err,
                                       sizeof err);
        if (rc != 0)
            goto failed;
    }
    logf_(AAMM_LOG_INFO, "setup: %zu tables replicated (publication aamm)", cfg->ntables);
    /* 7. DDL replication: this node sends its DDL and runs its peers' (as the role that ran
     * it there: the apply role acts as table_owner), or neither */
    if (cfg->ddl && cfg->table_owner != NULL && role[0] != '\0' &&
        (rc = grant_owner(conn, cfg, role, err, sizeof err)) != 0)
        goto failed;
    if ((rc = aamm_ddl_configure(conn, cfg->ddl, cfg->ddl, err, sizeof err)) != 0)
        goto failed;
    if (!cfg->ddl)
        logf_(AAMM_LOG_INFO, "setup: DDL replication off");
    else if (cfg->table_owner != NULL && role[0] != '\0')
        logf_(AAMM_LOG_INFO, "setup: DDL replication on (capture and apply; %s may act as %s)",
              role, cfg->table_owner);
    else
        logf_(AAMM_LOG_INFO, "setup: DDL replication on (capture and apply)");
    memset(password, 0, sizeof password);
    PQfinish(conn);
    return 0;
failed:
    memset(password, 0, sizeof password);
    logf_(AAMM_LOG_ERROR, "setup failed: %s (%s)", err, aamm_errname(rc));
    PQfinish(conn);
    return 1;
}

/* ====================================================================================
 * run
 * ==================================================================================== */

static int sig_pipe[2] = {-1, -1};
static volatile sig_atomic_t stop_requested, status_requested;

static void on_signal(int sig)
{
    int saved = errno;
    if (sig == SIGUSR1)
        status_requested = 1;
    else
        stop_requested = 1;
    if (write(sig_pipe[1], "x", 1) < 0) {
        /* full pipe: a wakeup is pending anyway */
    }
    errno = saved;
}

static int install_signals(void)
{
    struct sigaction sa;
    int i;
    if (pipe(sig_pipe) != 0)
        return -1;
    for (i = 0; i < 2; i++) {
        fcntl(sig_pipe[i], F_SETFL, fcntl(sig_pipe[i], F_GETFL) | O_NONBLOCK);
        fcntl(sig_pipe[i], F_SETFD, FD_CLOEXEC);
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGTERM, &sa, NULL) || sigaction(SIGINT, &sa, NULL) ||
        sigaction(SIGUSR1, &sa, NULL))
        return -1;
    signal(SIGPIPE, SIG_IGN);
    return 0;
}

static const char *peer_name(const struct bikes_config *cfg, uint32_t id)
{
    size_t i;
    for (i = 0; i < cfg->npeers; i++)
        if (cfg->peers[i].id == id)
            return cfg->peers[i].name;
    return "?";
}

static void on_conflict(struct aamm_replicator *r, uint32_t peer, const struct aamm_conflict *c,
                        void *arg)
{
    const struct bikes_config *cfg = arg;
    const char *winner;
    (void)r;
    switch (c->resolution) {
    case AAMM_RESOLVE_APPLY_REMOTE:
        winner = "remote";
        break;
    case AAMM_RESOLVE_KEEP_LOCAL:
        winner = "local";
        break;
    case AAMM_RESOLVE_MERGED:
        winner = "merged";
        break;
    case AAMM_RESOLVE_SKIP:
        winner = "none (skipped)";
        break;
    default:
        winner = "none (stream stopped)";
        break;
    }
    logf_(AAMM_LOG_INFO, "conflict %s %s key %s from %s: winner %s (%s)",
          aamm_conflict_kind_name(c->kind), c->relation, c->key_json ? c->key_json : "?",
          peer_name(cfg, peer), winner, aamm_conflict_resolution_name(c->resolution));
}

static void on_stream(struct aamm_replicator *r, uint32_t peer, const char *what, bool ok,
                      const char *reason, void *arg)
{
    const struct bikes_config *cfg = arg;
    (void)r;
    if (ok)
        logf_(AAMM_LOG_INFO, "peer %s: %s streaming", peer_name(cfg, peer), what);
    else
        logf_(AAMM_LOG_WARNING, "peer %s: %s stopped: %s", peer_name(cfg, peer), what, reason);
}

/* The replicator's last error on one line (a static buffer). */
static const char *replicator_error(const struct aamm_replicator *r)
{
    static char buf[2048];
    snprintf(buf, sizeof buf, "%s", aamm_replicator_errmsg(r));
    return oneline(buf);
}

static void log_status(const struct aamm_replicator *r)
{
    char line[2048];
    aamm_replicator_status_line(r, line, sizeof line);
    logf_(AAMM_LOG_INFO, "status: %s", line);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* apply_conninfo with the password of apply_password_file added (libpq has no other way
 * to take it but a password file); a new string, or NULL with a message in @err. */
static char *apply_conninfo_with_password(const char *conninfo, const char *password, char *err,
                                          size_t errsize)
{
    char *perr = NULL, *out;
    size_t cap = strlen(conninfo) * 2 + strlen(password) * 2 + 64, len = 0;
    PQconninfoOption *o, *opts = PQconninfoParse(conninfo, &perr);
    if (opts == NULL || (out = malloc(cap)) == NULL) {
        snprintf(err, errsize, "apply_conninfo: %s", perr ? perr : "out of memory");
        PQfreemem(perr);
        PQconninfoFree(opts);
        return NULL;
    }
    for (o = opts; o->keyword != NULL; o++) {
        const char *v = !strcmp(o->keyword, "password") ? password : o->val;
        if (v == NULL)
            continue;
        if (len + strlen(o->keyword) + 2 * strlen(v) + 8 >= cap) {
            cap = (cap + strlen(o->keyword) + 2 * strlen(v) + 8) * 2;
            char *bigger = realloc(out, cap);
            if (bigger == NULL) {
                free(out);
                PQconninfoFree(opts);
                snprintf(err, errsize, "apply_conninfo: out of memory");
                return NULL;
            }
            out = bigger;
        }
        len += (size_t)sprintf(out + len, "%s%s='", len ? " " : "", o->keyword);
        for (; *v; v++) {
            if (*v == '\'' || *v == '\\')
                out[len++] = '\\';
            out[len++] = *v;
        }
        out[len++] = '\'';
        out[len] = '\0';
    }
    PQconninfoFree(opts);
    return out;
}

/* The link secret (BIKES_SECRET_MAX bytes of @secret); 0, or -1 after saying why. */
static int load_secret(const struct bikes_config *cfg, uint8_t *secret, size_t *len)
{
    char err[1024];
    if (bikes_read_secret(cfg->secret_file, secret, BIKES_SECRET_MAX, len, err, sizeof err)) {
        fprintf(stderr, "bikes-agent: %s:%d: secret_file: %s\n", cfg->path, cfg->secret_line, err);
        return -1;
    }
    if (*len < 16) {
        fprintf(stderr, "bikes-agent: %s:%d: secret_file: %s holds %zu bytes; at least 16 needed\n",
                cfg->path, cfg->secret_line, cfg->secret_file, *len);
        return -1;
    }
    return 0;
}

/* Lost peers leave consensus: whichever survivor leads removes them, one at a time (a
 * dead voter only lowers how many more failures the cluster survives). A refused change
 * (another one running, leadership moving) is tried again a second later. */
static struct {
    bool busy;                  /* a removal runs */
    size_t peer;                /* its peer (index in the configuration) */
    int64_t retry_at;           /* wait until then before the next try */
    bool done[BIKES_MAX_PEERS]; /* removed, or found to be no member */
} lost_members;

static void on_member_removed(struct aamm_consensus *cs, int status, void *arg)
{
    const struct bikes_config *cfg = arg;
    unsigned node = (unsigned)cfg->peers[lost_members.peer].id;
    (void)cs;
    lost_members.busy = false;
    lost_members.done[lost_members.peer] = status == 0 || status == AAMM_ENOTFOUND;
    if (status == 0) {
        logf_(AAMM_LOG_INFO, "consensus: lost node %u removed from the members", node);
    } else if (status != AAMM_ENOTFOUND) {
        logf_(AAMM_LOG_WARNING, "consensus: removing lost node %u: %s; trying again", node,
              aamm_errname(status));
        lost_members.retry_at = now_ms() + 1000;
    }
}

static void remove_lost_members(struct aamm_replicator *r, const struct bikes_config *cfg,
                                int64_t now)
{
    struct aamm_consensus *cs = aamm_replicator_consensus(r);
    if (cs == NULL || lost_members.busy || now < lost_members.retry_at ||
        aamm_consensus_state(cs) != AAMM_CONSENSUS_LEADER)
        return;
    for (size_t i = 0; i < cfg->npeers; i++) {
        if (!cfg->peers[i].lost || lost_members.done[i])
            continue;
        lost_members.peer = i;
        if (aamm_consensus_remove_member(cs, cfg->peers[i].id, on_member_removed,
                                         (void *)cfg) == 0) {
            lost_members.busy = true;
            logf_(AAMM_LOG_INFO, "consensus: removing lost node %u from the members",
                  (unsigned)cfg->peers[i].id);
        } else {
            lost_members.retry_at = now + 1000;
        }
        return;
    }
}

static int cmd_run(const struct bikes_config *cfg)
{
    struct aamm_replicator_options o;
    struct aamm_replicator_peer peers[BIKES_MAX_PEERS];
    struct aamm_replicator_pollfd fds[AAMM_REPLICATOR_MAX_FDS];
    struct pollfd pfds[AAMM_REPLICATOR_MAX_FDS + 1];
    struct aamm_replicator *r = NULL;
    uint8_t secret[BIKES_SECRET_MAX];
    char password[256], err[1024];
    char *apply_conninfo = NULL;
    size_t secret_len = 0, plen = 0, i;
    int64_t next_status, next_ddl = 0;
    PGconn *ddl_conn = NULL; /* serves CALL aamm.ddl_execute() (with consensus) */
    int rc, status = 0;

    if (load_secret(cfg, secret, &secret_len) != 0)
        return 2;
    if (cfg->apply_password_file != NULL) {
        if (bikes_read_secret(cfg->apply_password_file, (uint8_t *)password, sizeof password - 1,
                              &plen, err, sizeof err) != 0) {
            fprintf(stderr, "bikes-agent: apply_password_file: %s\n", err);
            return 2;
        }
        password[plen] = '\0';
        apply_conninfo = apply_conninfo_with_password(
            cfg->apply_conninfo ? cfg->apply_conninfo : cfg->conninfo, password, err, sizeof err);
        memset(password, 0, sizeof password);
        if (apply_conninfo == NULL) {
            fprintf(stderr, "bikes-agent: %s: %s\n", cfg->path, err);
            return 2;
        }
    }

    aamm_replicator_options_init(&o);
    o.node_id = cfg->node_id;
    o.node_name = cfg->node_name;
    o.conninfo = cfg->conninfo;
    o.apply_conninfo = apply_conninfo ? apply_conninfo : cfg->apply_conninfo;
    o.cluster = cfg->cluster;
    o.secret = secret;
    o.secret_len = secret_len;
    o.listen_host = cfg->listen_host;
    o.listen_port = cfg->listen_port;
    o.tls = cfg->tls_ca != NULL;
    o.tls_ca_file = cfg->tls_ca;
    o.tls_cert_file = cfg->tls_cert;
    o.tls_key_file = cfg->tls_key;
    for (i = 0; i < cfg->npeers; i++) {
        peers[i].node_id = cfg->peers[i].id;
        peers[i].name = cfg->peers[i].name;
        peers[i].host = cfg->peers[i].host;
        peers[i].port = cfg->peers[i].port;
        peers[i].raft_address = cfg->peers[i].raft_address;
    }
    o.peers = peers;
    o.npeers = (uint32_t)cfg->npeers;
    o.raft_address = cfg->raft_address;
    o.raft_data_dir = cfg->raft_dir;
    o.bootstrap_consensus = cfg->bootstrap;
    o.sequences = (const char *const *)cfg->sequences;
    o.nsequences = (uint32_t)cfg->nsequences;

    rc = aamm_replicator_new(&r, &o, err, sizeof err);
    memset(secret, 0, sizeof secret);
    if (rc != 0) {
        fprintf(stderr, "bikes-agent: %s: %s (%s)\n", cfg->path, err, aamm_errname(rc));
        free(apply_conninfo);
        return 2;
    }
    aamm_replicator_set_conflict_cb(r, on_conflict, (void *)cfg);
    aamm_replicator_set_stream_cb(r, on_stream, (void *)cfg);
    if (install_signals() != 0) {
        logf_(AAMM_LOG_ERROR, "signals: %s", strerror(errno));
        status = 1;
        goto out;
    }
    logf_(AAMM_LOG_INFO, "starting: node %u, %zu peers, listening on %s:%s", (unsigned)cfg->node_id,
          cfg->npeers, cfg->listen_host ? cfg->listen_host : "-",
          cfg->listen_port ? cfg->listen_port : "-");
    rc = aamm_replicator_start(r);
    if (rc != 0) {
        logf_(AAMM_LOG_ERROR, "start failed: %s (%s)", replicator_error(r), aamm_errname(rc));
        status = 1;
        goto out;
    }
    logf_(AAMM_LOG_INFO, "started");
    /* peers gone for good: forward what this node has of them (doc/membership.md); again at
     * every start, until they are parted */
    for (i = 0; i < cfg->npeers; i++) {
        if (!cfg->peers[i].lost)
            continue;
        rc = aamm_replicator_peer_lost(r, cfg->peers[i].id);
        if (rc != 0) {
            logf_(AAMM_LOG_ERROR, "lost %u: %s (%s)", (unsigned)cfg->peers[i].id,
                  replicator_error(r), aamm_errname(rc));
            status = 1;
            goto out;
        }
        logf_(AAMM_LOG_INFO, "peer %s (node %u) is lost: forwarding what this node has of it",
              cfg->peers[i].name, (unsigned)cfg->peers[i].id);
    }

    next_status = cfg->status_interval ? now_ms() + cfg->status_interval * 1000 : -1;
    while (!stop_requested) {
        size_t n = aamm_replicator_fds(r, fds, AAMM_REPLICATOR_MAX_FDS);
        int timeout = aamm_replicator_timeout(r);
        int64_t now = now_ms();
        char drain[64];
        if (n > AAMM_REPLICATOR_MAX_FDS)
            n = AAMM_REPLICATOR_MAX_FDS;
        pfds[0].fd = sig_pipe[0];
        pfds[0].events = POLLIN;
        for (i = 0; i < n; i++) {
            pfds[i + 1].fd = fds[i].fd;
            pfds[i + 1].events = (short)(((fds[i].events & AAMM_READ) ? POLLIN : 0) |
                                         ((fds[i].events & AAMM_WRITE) ? POLLOUT : 0));
        }
        /* wake at least for the next status line, and at least once a second */
        if (timeout < 0 || timeout > 1000)
            timeout = 1000;
        if (next_status >= 0 && next_status - now < timeout)
            timeout = next_status <= now ? 0 : (int)(next_status - now);
        if (poll(pfds, (nfds_t)n + 1, timeout) < 0 && errno != EINTR) {
            logf_(AAMM_LOG_ERROR, "poll: %s", strerror(errno));
            status = 1;
            break;
        }
        while (read(sig_pipe[0], drain, sizeof drain) > 0) {
        }
        if (stop_requested)
            break;
        rc = aamm_replicator_step(r);
        if (rc != 0) {
            logf_(AAMM_LOG_ERROR, "step failed: %s (%s)", replicator_error(r), aamm_errname(rc));
            status = 1;
            break;
        }
        now = now_ms();
        remove_lost_members(r, cfg, now);
        if (cfg->raft_address != NULL && now >= next_ddl) { /* the SQL form's requests */
            int served = 0;
            next_ddl = now + 1000;
            if (ddl_conn == NULL || PQstatus(ddl_conn) != CONNECTION_OK) {
                PQfinish(ddl_conn);
                ddl_conn = PQconnectdb(cfg->conninfo);
            }
            if (PQstatus(ddl_conn) == CONNECTION_OK &&
                (rc = aamm_ddl_serve(r, ddl_conn, 60000, &served, err, sizeof err)) != 0)
                logf_(AAMM_LOG_WARNING, "ddl request: %s (%s)", err, aamm_errname(rc));
            else if (served)
                logf_(AAMM_LOG_INFO, "ddl request served");
        }
        if (status_requested || (next_status >= 0 && now >= next_status)) {
            status_requested = 0;
            log_status(r);
            if (next_status >= 0)
                next_status = now + cfg->status_interval * 1000;
        }
    }
    logf_(AAMM_LOG_INFO, "stopping");
    aamm_replicator_stop(r, 5000);
    log_status(r);
    logf_(AAMM_LOG_INFO, "stopped");
out:
    PQfinish(ddl_conn);
    aamm_replicator_free(r);
    free(apply_conninfo);
    return status;
}

/* ====================================================================================
 * join
 * ==================================================================================== */

static void on_join_progress(const struct aamm_node_join_progress *p, void *arg)
{
    (void)arg;
    logf_(AAMM_LOG_INFO, "join: %u of %u tables, %llu rows, %.1f MB copied", (unsigned)p->tables_done,
          (unsigned)p->tables_total, (unsigned long long)p->rows, (double)p->bytes / 1e6);
}

/* Copy the data of peer @upstream into this (set up, empty) node while the cluster keeps
 * writing, and set the positions this node's streams start from (aamm_node_join()). */
static int cmd_join(const struct bikes_config *cfg, uint32_t upstream)
{
    struct aamm_node_join_peer others[BIKES_MAX_PEERS];
    struct aamm_node_join_options o;
    struct aamm_node_join_stats st;
    char err[1024];
    size_t i;
    int rc;

    aamm_node_join_options_init(&o);
    o.conninfo = cfg->conninfo;
    o.node_id = cfg->node_id;
    o.upstream_id = upstream;
    for (i = 0; i < cfg->npeers; i++) {
        if (cfg->peers[i].id == upstream) {
            o.upstream_conninfo = cfg->peers[i].conninfo;
            continue;
        }
        others[o.nothers].node_id = cfg->peers[i].id;
        others[o.nothers].conninfo = cfg->peers[i].conninfo;
        o.nothers++;
    }
    if (o.upstream_conninfo == NULL) {
        fprintf(stderr, "bikes-agent: join: %u is not a peer in %s\n", (unsigned)upstream,
                cfg->path);
        return 2;
    }
    o.others = others;
    o.tables = (const char *const *)cfg->tables;
    o.ntables = (uint32_t)cfg->ntables;
    o.progress = on_join_progress;
    logf_(AAMM_LOG_INFO, "join: copying from %s (node %u), %u other nodes", peer_name(cfg, upstream),
          (unsigned)upstream, (unsigned)o.nothers);
    rc = aamm_node_join(&o, &st, err, sizeof err);
    if (rc != 0) {
        logf_(AAMM_LOG_ERROR, "join failed: %s (%s)", err, aamm_errname(rc));
        return 1;
    }
    logf_(AAMM_LOG_INFO,
          "join: done in %.1f s: %u tables, %llu rows, %.1f MB in %.1f s (%.0f rows/s); "
          "apply on %s held for %.0f ms",
          st.seconds, (unsigned)st.tables, (unsigned long long)st.rows, (double)st.bytes / 1e6,
          st.copy_seconds, st.copy_seconds > 0 ? (double)st.rows / st.copy_seconds : 0.0,
          peer_name(cfg, upstream), st.freeze_seconds * 1000);
    for (i = 0; i < st.npositions; i++) {
        char slot[AAMM_LSN_BUFSIZE], origin[AAMM_LSN_BUFSIZE];
        aamm_lsn_format(st.positions[i].slot_lsn, slot);
        aamm_lsn_format(st.positions[i].origin_lsn, origin);
        logf_(AAMM_LOG_INFO, "join: %s streams from slot aamm_to_%u at %s; origin aamm_from_%u at %s",
              peer_name(cfg, st.positions[i].node_id), (unsigned)cfg->node_id, slot,
              (unsigned)st.positions[i].node_id, origin);
    }
    logf_(AAMM_LOG_INFO, "join: now start this node's agent (run) and add this node as a peer "
                         "to every other node's agent");
    return 0;
}

/* part ID: aamm_node_part() on this node, once ID's peer line is gone (and the agent
 * restarted without it: a replicator that lists the peer makes its slot again). Exit 0
 * when parted, 75 (EX_TEMPFAIL) when the origin has to wait for this node's other slots
 * (run part again later), 1 on an error, 2 when ID is still a peer. */
static int cmd_part(const struct bikes_config *cfg, uint32_t id)
{
    char err[1024];
    int dropped = 0, rc;
    PGconn *conn;
    for (size_t i = 0; i < cfg->npeers; i++) {
        if (cfg->peers[i].id == id) {
            fprintf(stderr,
                    "bikes-agent: part: %u is still a peer in %s (line %d): remove its peer "
                    "line and restart the agent first, or the agent makes its slot again\n",
                    (unsigned)id, cfg->path, cfg->peers[i].line);
            return 2;
        }
    }
    if (id == cfg->node_id) {
        fprintf(stderr, "bikes-agent: part: %u is this node (part it on the other nodes)\n",
                (unsigned)id);
        return 2;
    }
    if ((conn = connect_node(cfg, "part")) == NULL)
        return 1;
    rc = aamm_node_part(conn, id, &dropped, err, sizeof err);
    PQfinish(conn);
    if (rc == AAMM_EAGAIN) {
        logf_(AAMM_LOG_WARNING,
              "part: node %u: slot and status row dropped; its origin stays for now: %s. Let "
              "the agents run, then run part again",
              (unsigned)id, err);
        return 75;
    }
    if (rc != 0) {
        logf_(AAMM_LOG_ERROR, "part: node %u: %s (%s)", (unsigned)id, err, aamm_errname(rc));
        return 1;
    }
    logf_(AAMM_LOG_INFO,
          "part: node %u parted from this node (%d objects dropped: slot aamm_to_%u, origin "
          "aamm_from_%u)",
          (unsigned)id, dropped, (unsigned)id, (unsigned)id);
    return 0;
}

/* ====================================================================================
 * main
 * ==================================================================================== */

static void usage(FILE *to)
{
    fprintf(to, "usage: bikes-agent -c FILE setup|run|check|join ID|part ID\n"
                "  setup    install libaamm on the node, load schema_file, replicate the tables\n"
                "  run      replicate with the peers until SIGTERM or SIGINT (SIGUSR1: status)\n"
                "  check    validate FILE for setup and run\n"
                "  join ID  (a new node, after setup) copy peer ID's data while the cluster\n"
                "           writes, and set where this node's streams start\n"
                "  part ID  take node ID (no longer a peer here) out of this node: its slot,\n"
                "           origin and status row\n"
                "see bikes-agent(1)\n");
}

int main(int argc, char **argv)
{
    struct bikes_config cfg;
    const char *file = NULL, *cmd;
    char err[1024];
    int opt, status;
    uint32_t cmd_id = 0; /* join's upstream, part's node */

    while ((opt = getopt(argc, argv, "c:h")) != -1) {
        switch (opt) {
        case 'c':
            file = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (file == NULL || optind >= argc) {
        usage(stderr);
        return 2;
    }
    cmd = argv[optind];
    bool with_id = !strcmp(cmd, "join") || !strcmp(cmd, "part");
    if (strcmp(cmd, "setup") && strcmp(cmd, "run") && strcmp(cmd, "check") && !with_id) {
        fprintf(stderr, "bikes-agent: unknown command '%s'\n", cmd);
        usage(stderr);
        return 2;
    }
    if (optind + (with_id ? 2 : 1) != argc) {
        usage(stderr);
        return 2;
    }
    if (with_id) {
        char *end;
        long v = strtol(argv[optind + 1], &end, 10);
        if (*end != '\0' || !aamm_node_id_valid(v > 0 && v <= AAMM_NODE_ID_MAX ? (uint32_t)v : 0)) {
            fprintf(stderr, "bikes-agent: %s: '%s' is not a node id\n", cmd, argv[optind + 1]);
            return 2;
        }
        cmd_id = (uint32_t)v;
    }
    if (bikes_config_load(&cfg, file, err, sizeof err) != 0 ||
        (strcmp(cmd, "run") && strcmp(cmd, "part") &&
         bikes_config_check(&cfg, BIKES_NEED_SETUP, err, sizeof err)) ||
        (!strcmp(cmd, "part") && bikes_config_check(&cfg, BIKES_NEED_PART, err, sizeof err)) ||
        (!strcmp(cmd, "join") && bikes_config_check(&cfg, BIKES_NEED_JOIN, err, sizeof err)) ||
        (strcmp(cmd, "setup") && strcmp(cmd, "join") && strcmp(cmd, "part") &&
         bikes_config_check(&cfg, BIKES_NEED_RUN, err, sizeof err))) {
        fprintf(stderr, "bikes-agent: %s\n", err);
        bikes_config_free(&cfg);
        return 2;
    }
    if (cfg.node_name != NULL)
        log_node = cfg.node_name;
    log_max = cfg.log_level;
    aamm_set_log_cb(on_library_log, cfg.log_level, NULL);

    if (!strcmp(cmd, "setup")) {
        status = cmd_setup(&cfg);
    } else if (!strcmp(cmd, "run")) {
        status = cmd_run(&cfg);
    } else if (!strcmp(cmd, "join")) {
        status = cmd_join(&cfg, cmd_id);
    } else if (!strcmp(cmd, "part")) {
        status = cmd_part(&cfg, cmd_id);
    } else {
        uint8_t secret[BIKES_SECRET_MAX];
        size_t len;
        if (load_secret(&cfg, secret, &len) != 0) {
            status = 2;
        } else {
            printf("%s: ok (node %u, %zu peers, %zu tables)\n", cfg.path, (unsigned)cfg.node_id,
                   cfg.npeers, cfg.ntables);
            status = 0;
        }
        memset(secret, 0, sizeof secret);
    }
    bikes_config_free(&cfg);
    return status;
}
