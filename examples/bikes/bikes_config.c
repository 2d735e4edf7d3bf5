/* bikes_config.c: bikes-agent's config file parser (format: bikes_config.h, bikes-agent.1). */
#include "bikes_config.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <aamm/aamm.h>

/* ====================================================================================
 * Helpers
 * ==================================================================================== */

static int fail(char *err, size_t errsize, const char *fmt, ...) AAMM_PRINTF(3, 4);

static int fail(char *err, size_t errsize, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errsize, fmt, ap);
    va_end(ap);
    return -1;
}

static char *xstrdup(const char *s)
{
    char *d = strdup(s);
    if (d == NULL) {
        fprintf(stderr, "bikes-agent: out of memory\n");
        exit(1);
    }
    return d;
}

static char *trim(char *s)
{
    char *e;
    while (isspace((unsigned char)*s))
        s++;
    e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1]))
        *--e = '\0';
    return s;
}

/* A path from the file: relative ones are relative to the file's directory. */
static char *resolve_path(const char *cfgpath, const char *p)
{
    const char *slash = strrchr(cfgpath, '/');
    size_t dirlen;
    char *out;
    if (p[0] == '/' || slash == NULL)
        return xstrdup(p);
    dirlen = (size_t)(slash - cfgpath);
    out = malloc(dirlen + 1 + strlen(p) + 1);
    if (out == NULL)
        return xstrdup(""); /* not reached: xstrdup exits */
    memcpy(out, cfgpath, dirlen);
    out[dirlen] = '/';
    strcpy(out + dirlen + 1, p);
    return out;
}

static int parse_uint(const char *s, long min, long max, long *out)
{
    char *end;
    long v;
    if (!isdigit((unsigned char)*s))
        return -1;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

/* "host:port" or "[v6]:port" into two new strings. */
static int parse_hostport(const char *s, char **host, char **port)
{
    const char *colon;
    size_t hl;
    long p;
    if (s[0] == '[') {
        const char *close = strchr(s, ']');
        if (close == NULL || close[1] != ':')
            return -1;
        colon = close + 1;
        s++;
        hl = (size_t)(close - s);
    } else {
        colon = strrchr(s, ':');
        if (colon == NULL)
            return -1;
        hl = (size_t)(colon - s);
    }
    if (hl == 0 || parse_uint(colon + 1, 1, 65535, &p) != 0)
        return -1;
    *host = xstrdup(s);
    (*host)[hl] = '\0';
    *port = xstrdup(colon + 1);
    return 0;
}

/* "a, b, c" into @items (new strings). */
static int parse_list(char *v, char **items, size_t *n)
{
    char *save = NULL, *tok;
    for (tok = strtok_r(v, ",", &save); tok != NULL; tok = strtok_r(NULL, ",", &save)) {
        tok = trim(tok);
        if (*tok == '\0' || *n == BIKES_MAX_LIST)
            return -1;
        items[(*n)++] = xstrdup(tok);
    }
    return *n == 0 ? -1 : 0;
}

/* "ID NAME HOST:PORT [raft HOST:PORT]" */
static int parse_peer(char *v, struct bikes_peer *p)
{
    char *tok[6];
    int n = 0;
    char *save = NULL, *t;
    long id;
    for (t = strtok_r(v, " \t", &save); t != NULL; t = strtok_r(NULL, " \t", &save)) {
        if (n == 5)
            return -1;
        tok[n++] = t;
    }
    if ((n != 3 && n != 5) || parse_uint(tok[0], 1, AAMM_NODE_ID_MAX, &id) != 0 ||
        strlen(tok[1]) >= 64)
        return -1;
    if (n == 5) {
        char *h, *pt;
        if (strcmp(tok[3], "raft") != 0 || parse_hostport(tok[4], &h, &pt) != 0)
            return -1;
        free(h);
        free(pt);
    }
    if (parse_hostport(tok[2], &p->host, &p->port) != 0)
        return -1;
    p->id = (uint32_t)id;
    p->name = xstrdup(tok[1]);
    p->raft_address = n == 5 ? xstrdup(tok[4]) : NULL;
    return 0;
}

static int parse_bool(const char *v, bool *out)
{
    if (!strcmp(v, "yes") || !strcmp(v, "true") || !strcmp(v, "on") || !strcmp(v, "1"))
        *out = true;
    else if (!strcmp(v, "no") || !strcmp(v, "false") || !strcmp(v, "off") || !strcmp(v, "0"))
        *out = false;
    else
        return -1;
    return 0;
}

/* ====================================================================================
 * One line
 * ==================================================================================== */

/* The keys holding one string, with whether the value is a path. */
struct string_key {
    const char *name;
    size_t offset;
    bool path;
};

/* clang-format off */
#define SK(field, path) {#field, offsetof(struct bikes_config, field), path}
static const struct string_key string_keys[] = {
    SK(node_name, false),   SK(conninfo, false), SK(apply_conninfo, false),
    SK(apply_password_file, true), SK(cluster, false), SK(secret_file, true),
    SK(tls_ca, true),       SK(tls_cert, true),  SK(tls_key, true),
    SK(raft_address, false), SK(raft_dir, true), SK(schema_file, true),
    SK(table_owner, false),
};
#undef SK
/* clang-format on */

/* Set @key to @v (both trimmed, non-empty); -1 with "what is wrong" in @err. */
static int set_key(struct bikes_config *cfg, const char *key, char *v, int line, char *err,
                   size_t errsize, int *seen_scalar)
{
    size_t i;
    long n;
    for (i = 0; i < sizeof string_keys / sizeof string_keys[0]; i++) {
        char **field = (char **)((char *)cfg + string_keys[i].offset);
        if (strcmp(key, string_keys[i].name) != 0)
            continue;
        if (*field != NULL)
            return fail(err, errsize, "given twice");
        if ((!strcmp(key, "node_name") || !strcmp(key, "table_owner")) && strlen(v) >= 64)
            return fail(err, errsize, "longer than 63 characters");
        if (!strcmp(key, "raft_address")) {
            char *h, *p;
            if (parse_hostport(v, &h, &p) != 0)
                return fail(err, errsize, "expected 'HOST:PORT'");
            free(h);
            free(p);
        }
        *field = string_keys[i].path ? resolve_path(cfg->path, v) : xstrdup(v);
        if (!strcmp(key, "secret_file"))
            cfg->secret_line = line;
        return 0;
    }
    if (!strcmp(key, "node_id")) {
        if (cfg->node_id != 0)
            return fail(err, errsize, "given twice");
        if (parse_uint(v, 1, AAMM_NODE_ID_MAX, &n) != 0)
            return fail(err, errsize, "expected a number 1..%d", AAMM_NODE_ID_MAX);
        cfg->node_id = (uint32_t)n;
    } else if (!strcmp(key, "listen")) {
        if (cfg->listen_port != NULL)
            return fail(err, errsize, "given twice");
        if (parse_hostport(v, &cfg->listen_host, &cfg->listen_port) != 0)
            return fail(err, errsize, "expected 'HOST:PORT'");
    } else if (!strcmp(key, "peer")) {
        struct bikes_peer *p = &cfg->peers[cfg->npeers];
        size_t j;
        if (cfg->npeers == BIKES_MAX_PEERS)
            return fail(err, errsize, "more than %d peers", BIKES_MAX_PEERS);
        if (parse_peer(v, p) != 0)
            return fail(err, errsize, "expected 'ID NAME HOST:PORT [raft HOST:PORT]'");
        p->line = line;
        cfg->npeers++;
        for (j = 0; j + 1 < cfg->npeers; j++)
            if (cfg->peers[j].id == p->id)
                return fail(err, errsize, "id %u is already on line %d", (unsigned)p->id,
                            cfg->peers[j].line);
    } else if (!strcmp(key, "peer_conninfo")) {
        char *rest = v;
        size_t j;
        while (*rest != '\0' && *rest != ' ' && *rest != '\t')
            rest++;
        if (*rest != '\0')
            *rest++ = '\0';
        rest = trim(rest);
        if (parse_uint(v, 1, AAMM_NODE_ID_MAX, &n) != 0 || *rest == '\0')
            return fail(err, errsize, "expected 'ID CONNINFO'");
        for (j = 0; j < cfg->npeers && cfg->peers[j].id != (uint32_t)n; j++)
            ;
        if (j == cfg->npeers)
            return fail(err, errsize, "no 'peer' line for id %ld above", n);
        if (cfg->peers[j].conninfo != NULL)
            return fail(err, errsize, "given twice for peer %ld", n);
        cfg->peers[j].conninfo = xstrdup(rest);
    } else if (!strcmp(key, "lost")) {
        size_t j;
        if (parse_uint(v, 1, AAMM_NODE_ID_MAX, &n) != 0)
            return fail(err, errsize, "expected a peer's node id");
        for (j = 0; j < cfg->npeers && cfg->peers[j].id != (uint32_t)n; j++)
            ;
        if (j == cfg->npeers)
            return fail(err, errsize, "no 'peer' line for id %ld above", n);
        if (cfg->peers[j].lost)
            return fail(err, errsize, "given twice for peer %ld", n);
        cfg->peers[j].lost = true;
    } else if (!strcmp(key, "tables") || !strcmp(key, "sequences")) {
        bool t = key[0] == 't';
        if (parse_list(v, t ? cfg->tables : cfg->sequences, t ? &cfg->ntables : &cfg->nsequences))
            return fail(err, errsize, "expected 'name, name, ...' (at most %d)", BIKES_MAX_LIST);
    } else if (!strcmp(key, "bootstrap")) {
        if (seen_scalar[0]++)
            return fail(err, errsize, "given twice");
        if (parse_bool(v, &cfg->bootstrap) != 0)
            return fail(err, errsize, "expected yes or no");
    } else if (!strcmp(key, "ddl")) {
        if (seen_scalar[3]++)
            return fail(err, errsize, "given twice");
        if (parse_bool(v, &cfg->ddl) != 0)
            return fail(err, errsize, "expected on or off");
    } else if (!strcmp(key, "log_level")) {
        if (seen_scalar[1]++)
            return fail(err, errsize, "given twice");
        if (!strcmp(v, "error"))
            cfg->log_level = AAMM_LOG_ERROR;
        else if (!strcmp(v, "warn"))
            cfg->log_level = AAMM_LOG_WARNING;
        else if (!strcmp(v, "info"))
            cfg->log_level = AAMM_LOG_INFO;
        else if (!strcmp(v, "debug"))
            cfg->log_level = AAMM_LOG_DEBUG;
        else
            return fail(err, errsize, "expected error, warn, info or debug");
    } else if (!strcmp(key, "status_interval")) {
        if (seen_scalar[2]++)
            return fail(err, errsize, "given twice");
        if (parse_uint(v, 0, 86400, &n) != 0)
            return fail(err, errsize, "expected seconds 0..86400 (0: no status lines)");
        cfg->status_interval = (int)n;
    } else {
        return fail(err, errsize, "unknown key");
    }
    return 0;
}

/* ====================================================================================
 * The file
 * ==================================================================================== */

int bikes_config_load(struct bikes_config *cfg, const char *path, char *err, size_t errsize)
{
    FILE *f;
    char *buf = NULL;
    size_t cap = 0;
    int line = 0, rc = 0;
    int seen_scalar[4] = {0, 0, 0, 0};
    char why[256];

    memset(cfg, 0, sizeof *cfg);
    cfg->path = xstrdup(path);
    cfg->log_level = AAMM_LOG_INFO;
    cfg->status_interval = 10;
    f = fopen(path, "r");
    if (f == NULL)
        return fail(err, errsize, "%s: %s", path, strerror(errno));
    while (rc == 0 && getline(&buf, &cap, f) >= 0) {
        char *s = trim(buf), *eq, *key, *v;
        line++;
        if (*s == '\0' || *s == '#')
            continue;
        eq = strchr(s, '=');
        if (eq == NULL) {
            rc = fail(err, errsize, "%s:%d: expected 'key = value'", path, line);
            break;
        }
        *eq = '\0';
        key = trim(s);
        v = trim(eq + 1);
        if (*key == '\0')
            rc = fail(err, errsize, "%s:%d: expected 'key = value'", path, line);
        else if (*v == '\0')
            rc = fail(err, errsize, "%s:%d: %s: empty value", path, line, key);
        else if (set_key(cfg, key, v, line, why, sizeof why, seen_scalar) != 0)
            rc = fail(err, errsize, "%s:%d: %s: %s", path, line, key, why);
    }
    if (rc == 0 && ferror(f))
        rc = fail(err, errsize, "%s: read error", path);
    free(buf);
    fclose(f);
    return rc;
}

int bikes_config_check(const struct bikes_config *cfg, enum bikes_need need, char *err,
                       size_t errsize)
{
    const char *cmd = need == BIKES_NEED_RUN    ? "run"
                      : need == BIKES_NEED_JOIN ? "join"
                      : need == BIKES_NEED_PART ? "part"
                                                : "setup";
    size_t i;
    int ntls;
    if (cfg->node_id == 0)
        return fail(err, errsize, "%s: missing key 'node_id'", cfg->path);
    if (cfg->conninfo == NULL)
        return fail(err, errsize, "%s: missing key 'conninfo'", cfg->path);
    for (i = 0; i < cfg->npeers; i++)
        if (cfg->peers[i].id == cfg->node_id)
            return fail(err, errsize, "%s:%d: peer: id %u is this node's node_id", cfg->path,
                        cfg->peers[i].line, (unsigned)cfg->node_id);
    if (cfg->table_owner != NULL && !cfg->ddl)
        return fail(err, errsize, "%s: table_owner needs ddl = on", cfg->path);
    if (need == BIKES_NEED_JOIN) {
        if (cfg->ntables == 0)
            return fail(err, errsize, "%s: missing key 'tables' (%s copies them)", cfg->path, cmd);
        if (cfg->npeers == 0)
            return fail(err, errsize, "%s: no 'peer' line (%s needs the existing nodes)",
                        cfg->path, cmd);
        for (i = 0; i < cfg->npeers; i++)
            if (cfg->peers[i].conninfo == NULL)
                return fail(err, errsize, "%s:%d: peer %u has no peer_conninfo (%s needs one "
                            "for every existing node)", cfg->path, cfg->peers[i].line,
                            (unsigned)cfg->peers[i].id, cmd);
        return 0;
    }
    if (need == BIKES_NEED_PART) /* node_id and conninfo are all it needs */
        return 0;
    if (need == BIKES_NEED_SETUP) {
        if (cfg->ntables == 0)
            return fail(err, errsize, "%s: missing key 'tables' (%s replicates them)", cfg->path,
                        cmd);
        return 0;
    }
    if (cfg->cluster == NULL)
        return fail(err, errsize, "%s: missing key 'cluster' (%s needs it)", cfg->path, cmd);
    if (cfg->secret_file == NULL)
        return fail(err, errsize, "%s: missing key 'secret_file' (%s needs it)", cfg->path, cmd);
    if (cfg->npeers == 0)
        return fail(err, errsize, "%s: no 'peer' line (%s needs at least one)", cfg->path, cmd);
    ntls = (cfg->tls_ca != NULL) + (cfg->tls_cert != NULL) + (cfg->tls_key != NULL);
    if (ntls != 0 && ntls != 3)
        return fail(err, errsize, "%s: tls_ca, tls_cert and tls_key go together (got %d of 3)",
                    cfg->path, ntls);
    if (cfg->raft_address != NULL && cfg->raft_dir == NULL)
        return fail(err, errsize, "%s: raft_address needs raft_dir", cfg->path);
    if (cfg->raft_address == NULL && (cfg->raft_dir != NULL || cfg->bootstrap))
        return fail(err, errsize, "%s: raft_dir and bootstrap need raft_address", cfg->path);
    if (cfg->nsequences > 0 && cfg->raft_address == NULL)
        return fail(err, errsize, "%s: sequences need consensus (raft_address)", cfg->path);
    return 0;
}

int bikes_read_secret(const char *file, uint8_t *buf, size_t cap, size_t *len, char *err,
                      size_t errsize)
{
    struct stat st;
    size_t n = 0;
    ssize_t got;
    int fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return fail(err, errsize, "%s: %s", file, strerror(errno));
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return fail(err, errsize, "%s: not a regular file", file);
    }
    if (st.st_mode & 077) {
        close(fd);
        return fail(err, errsize, "%s: mode %04o lets group or others access it; run: chmod 600 %s",
                    file, (unsigned)(st.st_mode & 07777), file);
    }
    while ((got = read(fd, buf + n, cap - n)) > 0) {
        n += (size_t)got;
        if (n == cap) {
            char extra;
            if (read(fd, &extra, 1) > 0) {
                close(fd);
                return fail(err, errsize, "%s: longer than %zu bytes", file, cap);
            }
            break;
        }
    }
    close(fd);
    if (got < 0)
        return fail(err, errsize, "%s: %s", file, strerror(errno));
    if (n > 0 && buf[n - 1] == '\n')
        n--;
    if (n > 0 && buf[n - 1] == '\r')
        n--;
    *len = n;
    return 0;
}

void bikes_config_free(struct bikes_config *cfg)
{
    size_t i;
    for (i = 0; i < sizeof string_keys / sizeof string_keys[0]; i++)
        free(*(char **)((char *)cfg + string_keys[i].offset));
    for (i = 0; i < cfg->npeers; i++) {
        free(cfg->peers[i].name);
        free(cfg->peers[i].host);
        free(cfg->peers[i].port);
        free(cfg->peers[i].raft_address);
        free(cfg->peers[i].conninfo);
    }
    for (i = 0; i < cfg->nsequences; i++)
        free(cfg->sequences[i]);
    for (i = 0; i < cfg->ntables; i++)
        free(cfg->tables[i]);
    free(cfg->path);
    free(cfg->listen_host);
    free(cfg->listen_port);
    memset(cfg, 0, sizeof *cfg);
}
