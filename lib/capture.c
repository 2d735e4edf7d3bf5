/* capture.c: one logical replication slot streamed with pgoutput, decoded into events. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include <aamm/capture.h>

#include "buf.h"
#include "internal.h"
#include "pgoutput.h"

/* Value formats pinned on the replication session (text values must read the same on
 * every node, whatever the server's defaults are). */
#define PINNED_OPTIONS                                                                 \
    "-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 "              \
    "-c bytea_output=hex -c TimeZone=UTC -c client_encoding=UTF8"

#define DEFAULT_STATUS_INTERVAL_MS 10000
#define DEFAULT_STEP_BUDGET 1000
/* After aamm_capture_confirm(), the new position goes out at most this late. */
#define CONFIRM_FEEDBACK_MS 100

enum state { ST_NEW, ST_STREAMING, ST_FAILED };

/* ====================================================================================
 * Type names: OID -> format_type(oid, NULL), open addressing
 * ==================================================================================== */

struct type_entry {
    uint32_t oid; /* 0 = empty */
    char *name;   /* heap */
};

struct type_cache {
    struct type_entry *slots;
    size_t cap; /* power of two */
    size_t count;
};

static size_t type_slot(const struct type_cache *tc, uint32_t oid)
{
    size_t mask = tc->cap - 1, i = (size_t)(oid * UINT32_C(2654435761)) & mask;
    while (tc->slots[i].oid != 0 && tc->slots[i].oid != oid)
        i = (i + 1) & mask;
    return i;
}

static const char *type_find(const struct type_cache *tc, uint32_t oid)
{
    if (tc->cap == 0 || oid == 0)
        return NULL;
    return tc->slots[type_slot(tc, oid)].name;
}

static int type_put(struct type_cache *tc, uint32_t oid, const char *name)
{
    size_t i;
    char *copy;
    if (oid == 0)
        return AAMM_OK;
    if ((tc->count + 1) * 2 > tc->cap) {
        struct type_cache grown;
        grown.cap = tc->cap ? tc->cap * 2 : 1024;
        grown.count = tc->count;
        grown.slots = aamm__calloc(grown.cap, sizeof *grown.slots);
        if (grown.slots == NULL)
            return AAMM_ENOMEM;
        for (size_t k = 0; k < tc->cap; k++)
            if (tc->slots[k].oid != 0)
                grown.slots[type_slot(&grown, tc->slots[k].oid)] = tc->slots[k];
        aamm__free(tc->slots);
        *tc = grown;
    }
    i = type_slot(tc, oid);
    copy = aamm__strdup(name);
    if (copy == NULL)
        return AAMM_ENOMEM;
    if (tc->slots[i].oid == 0)
        tc->count++;
    aamm__free(tc->slots[i].name);
    tc->slots[i].oid = oid;
    tc->slots[i].name = copy;
    return AAMM_OK;
}

static void type_cache_free(struct type_cache *tc)
{
    for (size_t k = 0; k < tc->cap; k++)
        aamm__free(tc->slots[k].name);
    aamm__free(tc->slots);
    memset(tc, 0, sizeof *tc);
}

/* ====================================================================================
 * The handle
 * ==================================================================================== */

struct aamm_capture {
    /* options (copied) */
    char *conninfo;
    char *slot;
    char **publications;
    uint32_t npublications;
    uint32_t node_id;
    uint64_t start_lsn;
    int status_interval_ms;
    int step_budget;

    enum state state;
    struct aamm__err err;
    PGconn *cat;  /* catalog connection (type names) */
    PGconn *repl; /* replication connection, COPY BOTH while streaming */
    struct aamm__pgo *pgo;
    struct type_cache types;
    int server_version;

    /* stream */
    char *copybuf;         /* the CopyData message being decoded (PQfreemem) */
    bool drained;          /* next() found libpq's buffer empty since the last read */
    bool budget_exhausted; /* next() stopped on its budget: work waits */
    bool flush_pending;    /* PQflush() left output queued */
    struct aamm__pgo_event out;  /* the event whose parts are handed out now */
    struct aamm__pgo_event held; /* a message parsed ahead (after a BEGIN), not yet used */
    bool have_held;
    struct aamm_transaction txn; /* the current transaction (origin_name heap) */
    bool in_txn;           /* between B and C */
    bool begin_pending;    /* B seen, waiting for the next message (an 'O' or not) */
    bool skipping;         /* inside a transaction with an aamm_ origin */

    /* positions */
    uint64_t start_position; /* where the stream started */
    uint64_t received_lsn;   /* highest WAL end seen (write position reported) */
    uint64_t confirmed;      /* flush position reported / to report */
    uint64_t sent_confirmed; /* flush position last sent */
    uint64_t handed;         /* highest end LSN / PROGRESS position handed out */
    uint64_t progress;       /* position up to which nothing needs delivering */
    int64_t last_status_ms;
    int64_t last_progress_ms;

    struct aamm_capture_stats stats;
};

static int fail(struct aamm_capture *c, int code, const char *fmt, ...) AAMM_PRINTF(3, 4);
static int fail(struct aamm_capture *c, int code, const char *fmt, ...)
{
    char msg[AAMM__ERRMSG_SIZE];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    aamm__errf(&c->err, code, "capture: slot \"%s\": %s", c->slot ? c->slot : "?", msg);
    if (c->state == ST_STREAMING)
        c->state = ST_FAILED;
    return code;
}

/* libpq's message without its trailing newline, in a static-size buffer. */
static const char *pqmsg(const PGconn *conn, char *buf, size_t size)
{
    size_t n;
    snprintf(buf, size, "%s", conn ? PQerrorMessage(conn) : "no connection");
    n = strlen(buf);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        buf[--n] = '\0';
    return buf;
}

static const char *resmsg(const PGresult *res, char *buf, size_t size)
{
    size_t n;
    snprintf(buf, size, "%s", res ? PQresultErrorMessage(res) : "no result");
    n = strlen(buf);
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
        buf[--n] = '\0';
    return buf;
}

static bool valid_slot_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 63)
        return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '_'))
            return false;
    return true;
}

int aamm_capture_new(struct aamm_capture **out, const struct aamm_capture_options *opts)
{
    struct aamm_capture *c;
    *out = NULL;
    if (opts == NULL || opts->conninfo == NULL || opts->slot == NULL ||
        opts->publications == NULL || opts->npublications == 0 || opts->npublications > 64 ||
        opts->status_interval_ms < 0 || opts->step_budget < 0) {
        AAMM_DEBUG("capture: missing or invalid option");
        return AAMM_EINVAL;
    }
    if (!valid_slot_name(opts->slot)) {
        AAMM_DEBUG("capture: invalid slot name \"%s\" (1..63 of a-z, 0-9, _)", opts->slot);
        return AAMM_EINVAL;
    }
    for (uint32_t i = 0; i < opts->npublications; i++) {
        if (opts->publications[i] == NULL || opts->publications[i][0] == '\0') {
            AAMM_DEBUG("capture: empty publication name");
            return AAMM_EINVAL;
        }
    }
    c = aamm__calloc(1, sizeof *c);
    if (c == NULL)
        return AAMM_ENOMEM;
    c->conninfo = aamm__strdup(opts->conninfo);
    c->slot = aamm__strdup(opts->slot);
    c->publications = aamm__calloc(opts->npublications, sizeof *c->publications);
    if (c->conninfo == NULL || c->slot == NULL || c->publications == NULL)
        goto oom;
    c->npublications = opts->npublications;
    for (uint32_t i = 0; i < opts->npublications; i++) {
        c->publications[i] = aamm__strdup(opts->publications[i]);
        if (c->publications[i] == NULL)
            goto oom;
    }
    c->node_id = opts->node_id;
    c->start_lsn = opts->start_lsn;
    c->status_interval_ms =
        opts->status_interval_ms > 0 ? opts->status_interval_ms : DEFAULT_STATUS_INTERVAL_MS;
    c->step_budget = opts->step_budget > 0 ? opts->step_budget : DEFAULT_STEP_BUDGET;
    c->drained = true;
    c->state = ST_NEW;
    *out = c;
    return AAMM_OK;
oom:
    aamm_capture_free(c);
    return AAMM_ENOMEM;
}

void aamm_capture_free(struct aamm_capture *c)
{
    if (c == NULL)
        return;
    if (c->copybuf)
        PQfreemem(c->copybuf);
    if (c->repl)
        PQfinish(c->repl);
    if (c->cat)
        PQfinish(c->cat);
    aamm__pgo_event_clear(&c->out);
    aamm__pgo_event_clear(&c->held);
    aamm_transaction_clear(&c->txn);
    aamm__pgo_free(c->pgo);
    type_cache_free(&c->types);
    if (c->publications)
        for (uint32_t i = 0; i < c->npublications; i++)
            aamm__free(c->publications[i]);
    aamm__free(c->publications);
    aamm__free(c->conninfo);
    aamm__free(c->slot);
    aamm__free(c);
}

const char *aamm_capture_errmsg(const struct aamm_capture *c)
{
    return c ? aamm__errmsg(&c->err) : "";
}

/* ====================================================================================
 * Setup (blocking)
 * ==================================================================================== */

/* Run a query with text parameters on the catalog connection; NULL on error (set). */
static PGresult *cat_query(struct aamm_capture *c, const char *what, const char *sql, int n,
                           const char *const *params)
{
    char buf[512];
    PGresult *res = PQexecParams(c->cat, sql, n, NULL, params, NULL, NULL, 0);
    if (res == NULL || PQresultStatus(res) != PGRES_TUPLES_OK) {
        int code = PQstatus(c->cat) == CONNECTION_BAD ? AAMM_ECONN : AAMM_ESERVER;
        fail(c, code, "%s: %s", what, res ? resmsg(res, buf, sizeof buf) : pqmsg(c->cat, buf, sizeof buf));
        PQclear(res);
        return NULL;
    }
    return res;
}

/* A setting's value, copied into @out. */
static int show_setting(struct aamm_capture *c, const char *name, char *out, size_t size)
{
    const char *params[1] = {name};
    PGresult *res = cat_query(c, "reading settings", "SELECT current_setting($1)", 1, params);
    if (res == NULL)
        return c->err.code;
    snprintf(out, size, "%s", PQntuples(res) == 1 ? PQgetvalue(res, 0, 0) : "");
    PQclear(res);
    return AAMM_OK;
}

/* The publications as a text[] literal for queries: {"a","b"}. */
static char *pub_array(const struct aamm_capture *c)
{
    struct aamm__wr w;
    aamm__wr_init(&w);
    aamm__wr_u8(&w, '{');
    for (uint32_t i = 0; i < c->npublications; i++) {
        if (i > 0)
            aamm__wr_u8(&w, ',');
        aamm__wr_u8(&w, '"');
        for (const char *p = c->publications[i]; *p; p++) {
            if (*p == '"' || *p == '\\')
                aamm__wr_u8(&w, '\\');
            aamm__wr_u8(&w, (uint8_t)*p);
        }
        aamm__wr_u8(&w, '"');
    }
    aamm__wr_u8(&w, '}');
    aamm__wr_u8(&w, 0);
    if (!w.ok) {
        aamm__wr_free(&w);
        return NULL;
    }
    return (char *)w.data;
}

/* 1. Server version and settings. */
static int check_server(struct aamm_capture *c)
{
    char val[256];
    int rc;
    c->server_version = PQserverVersion(c->cat);
    if (c->server_version < 150000)
        return fail(c, AAMM_EUNSUITABLE,
                    "server version %d.%d is too old: libaamm needs PostgreSQL 15 or later",
                    c->server_version / 10000, c->server_version % 10000 / 100);
    if ((rc = show_setting(c, "wal_level", val, sizeof val)) != AAMM_OK)
        return rc;
    if (strcmp(val, "logical") != 0)
        return fail(c, AAMM_EUNSUITABLE,
                    "wal_level is '%s': set wal_level = logical in postgresql.conf and restart "
                    "the server",
                    val);
    if ((rc = show_setting(c, "track_commit_timestamp", val, sizeof val)) != AAMM_OK)
        return rc;
    if (strcmp(val, "on") != 0)
        return fail(c, AAMM_EUNSUITABLE,
                    "track_commit_timestamp is '%s': set track_commit_timestamp = on in "
                    "postgresql.conf and restart the server (conflict resolution needs commit "
                    "timestamps)",
                    val);
    if ((rc = show_setting(c, "wal_sender_timeout", val, sizeof val)) != AAMM_OK)
        return rc;
    {
        /* current_setting gives "60s", "2s", "500ms", "1min" or "0". */
        char *end;
        long v = strtol(val, &end, 10);
        long ms = 0;
        if (strcmp(end, "ms") == 0)
            ms = v;
        else if (strcmp(end, "s") == 0)
            ms = v * 1000;
        else if (strcmp(end, "min") == 0)
            ms = v * 60000;
        else if (strcmp(end, "h") == 0)
            ms = v * 3600000;
        if (ms > 0 && ms / 3 < c->status_interval_ms)
            c->status_interval_ms = ms / 3 > 50 ? (int)(ms / 3) : 50;
    }
    return AAMM_OK;
}

/* 2. Publications exist; every published table has a usable replica identity. */
static int check_publications(struct aamm_capture *c)
{
    static const char *const find_sql =
        "SELECT p.n FROM unnest($1::text[]) AS p(n) "
        "WHERE NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = p.n) ORDER BY 1";
    static const char *const nokey_sql =
        "SELECT DISTINCT quote_ident(pt.schemaname) || '.' || quote_ident(pt.tablename), "
        "       c.relreplident "
        "FROM pg_publication_tables pt "
        "JOIN pg_namespace n ON n.nspname = pt.schemaname "
        "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename "
        "JOIN pg_publication p ON p.pubname = pt.pubname "
        "WHERE pt.pubname = ANY($1::text[]) AND (p.pubupdate OR p.pubdelete) AND NOT ("
        "  c.relreplident = 'f' OR"
        "  (c.relreplident = 'd' AND EXISTS (SELECT 1 FROM pg_index i"
        "     WHERE i.indrelid = c.oid AND i.indisprimary)) OR"
        "  (c.relreplident = 'i' AND EXISTS (SELECT 1 FROM pg_index i"
        "     WHERE i.indrelid = c.oid AND i.indisreplident))) "
        "ORDER BY 1";
    char *arr = pub_array(c);
    const char *params[1] = {arr};
    PGresult *res;
    if (arr == NULL)
        return fail(c, AAMM_ENOMEM, "out of memory");
    res = cat_query(c, "looking up publications", find_sql, 1, params);
    if (res == NULL) {
        aamm__free(arr);
        return c->err.code;
    }
    if (PQntuples(res) > 0) {
        fail(c, AAMM_ENOTFOUND,
             "publication \"%s\" does not exist: create it (CREATE PUBLICATION) or fix the name",
             PQgetvalue(res, 0, 0));
        PQclear(res);
        aamm__free(arr);
        return AAMM_ENOTFOUND;
    }
    PQclear(res);
    res = cat_query(c, "checking published tables", nokey_sql, 1, params);
    aamm__free(arr);
    if (res == NULL)
        return c->err.code;
    if (PQntuples(res) > 0) {
        char list[512] = "";
        size_t used = 0;
        for (int i = 0; i < PQntuples(res) && used < sizeof list - 64; i++)
            used += (size_t)snprintf(list + used, sizeof list - used, "%s%s", i ? ", " : "",
                                     PQgetvalue(res, i, 0));
        fail(c, AAMM_EINVAL,
             "table %s has no primary key or replica identity index: add a primary key, set "
             "REPLICA IDENTITY USING INDEX, or (slow: every update and delete then carries "
             "the whole row) REPLICA IDENTITY FULL",
             list);
        PQclear(res);
        return AAMM_EINVAL;
    }
    PQclear(res);
    return AAMM_OK;
}

/* 3. Find or create the slot; refuse gaps. */
static int check_slot(struct aamm_capture *c)
{
    static const char *const sql =
        "SELECT plugin, slot_type, database = current_database(), "
        "       COALESCE(confirmed_flush_lsn::text, '0/0') "
        "FROM pg_replication_slots WHERE slot_name = $1";
    const char *params[1] = {c->slot};
    char sbuf[AAMM_LSN_BUFSIZE], cbuf[AAMM_LSN_BUFSIZE];
    uint64_t confirmed = 0;
    PGresult *res = cat_query(c, "looking up the slot", sql, 1, params);
    if (res == NULL)
        return c->err.code;
    if (PQntuples(res) == 0) {
        PQclear(res);
        if (c->start_lsn != AAMM_LSN_INVALID)
            return fail(c, AAMM_ENOTFOUND,
                        "replication slot does not exist, but the peer already has progress up "
                        "to %s from it: re-creating it would silently skip the transactions in "
                        "between; re-join the peer (initial copy) instead",
                        aamm_lsn_format(c->start_lsn, sbuf));
        res = cat_query(c, "creating the slot",
                        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                        1, params);
        if (res == NULL)
            return c->err.code;
        if (PQntuples(res) != 1 || aamm_lsn_parse(PQgetvalue(res, 0, 0), &confirmed) != 0) {
            PQclear(res);
            return fail(c, AAMM_ESERVER, "creating the slot: unexpected result");
        }
        PQclear(res);
        AAMM_INFO("capture: created slot \"%s\" at %s", c->slot, aamm_lsn_format(confirmed, sbuf));
    } else {
        if (strcmp(PQgetvalue(res, 0, 1), "logical") != 0 ||
            strcmp(PQgetvalue(res, 0, 0), "pgoutput") != 0) {
            fail(c, AAMM_EINVAL, "slot exists but is a %s slot with plugin '%s', not a logical "
                                 "pgoutput slot",
                 PQgetvalue(res, 0, 1), PQgetvalue(res, 0, 0));
            PQclear(res);
            return AAMM_EINVAL;
        }
        if (strcmp(PQgetvalue(res, 0, 2), "t") != 0) {
            PQclear(res);
            return fail(c, AAMM_EINVAL, "slot belongs to another database");
        }
        if (aamm_lsn_parse(PQgetvalue(res, 0, 3), &confirmed) != 0) {
            PQclear(res);
            return fail(c, AAMM_ESERVER, "slot has an unreadable confirmed_flush_lsn");
        }
        PQclear(res);
        if (c->start_lsn != AAMM_LSN_INVALID && confirmed > c->start_lsn)
            return fail(c, AAMM_EGAP,
                        "slot's confirmed position %s is past the requested start %s: the "
                        "server would silently skip the transactions in between; re-join the "
                        "peer (initial copy) or find where its progress went",
                        aamm_lsn_format(confirmed, cbuf), aamm_lsn_format(c->start_lsn, sbuf));
    }
    c->start_position = c->start_lsn > confirmed ? c->start_lsn : confirmed;
    c->confirmed = c->sent_confirmed = c->handed = c->progress = c->start_position;
    c->received_lsn = c->start_position;
    return AAMM_OK;
}

/* Fill the type cache for the OIDs in @oids (text array literal), or all built-in types. */
static int load_types(struct aamm_capture *c, const char *oids)
{
    const char *params[1] = {oids};
    PGresult *res;
    if (oids == NULL)
        res = cat_query(c, "loading type names",
                        "SELECT oid, format_type(oid, NULL) FROM pg_type WHERE oid < 16384", 0,
                        NULL);
    else
        res = cat_query(c, "loading type names",
                        "SELECT oid, format_type(oid, NULL) FROM pg_type "
                        "WHERE oid = ANY($1::oid[])",
                        1, params);
    if (res == NULL)
        return c->err.code;
    for (int i = 0; i < PQntuples(res); i++) {
        uint32_t oid = (uint32_t)strtoul(PQgetvalue(res, i, 0), NULL, 10);
        if (type_put(&c->types, oid, PQgetvalue(res, i, 1)) != AAMM_OK) {
            PQclear(res);
            return fail(c, AAMM_ENOMEM, "out of memory");
        }
    }
    PQclear(res);
    return AAMM_OK;
}

/* The publication_names option value: a quoted literal of quoted identifiers. */
static char *publication_names(const struct aamm_capture *c)
{
    struct aamm__wr w;
    aamm__wr_init(&w);
    aamm__wr_u8(&w, '\'');
    for (uint32_t i = 0; i < c->npublications; i++) {
        if (i > 0)
            aamm__wr_u8(&w, ',');
        aamm__wr_u8(&w, '"');
        for (const char *p = c->publications[i]; *p; p++) {
            if (*p == '"')
                aamm__wr_u8(&w, '"');
            if (*p == '\'')
                aamm__wr_bytes(&w, "''", 1);
            aamm__wr_u8(&w, (uint8_t)*p);
        }
        aamm__wr_u8(&w, '"');
    }
    aamm__wr_u8(&w, '\'');
    aamm__wr_u8(&w, 0);
    if (!w.ok) {
        aamm__wr_free(&w);
        return NULL;
    }
    return (char *)w.data;
}

/* 5. Replication connection and START_REPLICATION. */
static int start_streaming(struct aamm_capture *c)
{
    const char *keys[] = {"dbname", "replication", "options", "fallback_application_name", NULL};
    const char *vals[] = {c->conninfo, "database", PINNED_OPTIONS, "libaamm capture", NULL};
    char buf[512], lsn[AAMM_LSN_BUFSIZE], *cmd, *pubs;
    PGresult *res;

    c->repl = PQconnectdbParams(keys, vals, 1);
    if (c->repl == NULL || PQstatus(c->repl) != CONNECTION_OK)
        return fail(c, AAMM_ECONN, "replication connection: %s", pqmsg(c->repl, buf, sizeof buf));
    pubs = publication_names(c);
    if (pubs == NULL)
        return fail(c, AAMM_ENOMEM, "out of memory");
    aamm_lsn_format(c->start_position, lsn);
    /* No `origin` option: PostgreSQL 15 rejects it, and 16's default (any) is what we
     * want; origins are filtered on the 'O' message. */
    cmd = aamm__asprintf("START_REPLICATION SLOT %s LOGICAL %s (proto_version '1', "
                         "publication_names %s, messages 'true')",
                         c->slot, lsn, pubs);
    aamm__free(pubs);
    if (cmd == NULL)
        return fail(c, AAMM_ENOMEM, "out of memory");
    res = PQexec(c->repl, cmd);
    aamm__free(cmd);
    if (res == NULL || PQresultStatus(res) != PGRES_COPY_BOTH) {
        const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
        int code = PQstatus(c->repl) == CONNECTION_BAD ? AAMM_ECONN
                   : state && strcmp(state, "55006") == 0 ? AAMM_EBUSY
                                                          : AAMM_ESERVER;
        fail(c, code, "START_REPLICATION: %s",
             res ? resmsg(res, buf, sizeof buf) : pqmsg(c->repl, buf, sizeof buf));
        PQclear(res);
        return code;
    }
    PQclear(res);
    if (PQsetnonblocking(c->repl, 1) != 0)
        return fail(c, AAMM_ECONN, "cannot make the connection non-blocking");
    return AAMM_OK;
}

int aamm_capture_open(struct aamm_capture *c)
{
    char buf[512];
    int rc;
    if (c->state != ST_NEW || c->cat != NULL)
        return aamm__errf(&c->err, AAMM_ESTATE, "capture: open called twice");
    c->cat = PQconnectdb(c->conninfo);
    if (c->cat == NULL || PQstatus(c->cat) != CONNECTION_OK)
        return fail(c, AAMM_ECONN, "cannot connect: %s", pqmsg(c->cat, buf, sizeof buf));
    if ((rc = check_server(c)) != AAMM_OK || (rc = check_publications(c)) != AAMM_OK ||
        (rc = check_slot(c)) != AAMM_OK || (rc = load_types(c, NULL)) != AAMM_OK)
        return rc;
    if ((rc = aamm__pgo_new(&c->pgo)) != AAMM_OK)
        return fail(c, rc, "out of memory");
    if ((rc = start_streaming(c)) != AAMM_OK)
        return rc;
    c->state = ST_STREAMING;
    c->last_status_ms = c->last_progress_ms = aamm__now_ms();
    c->drained = true;
    aamm__errclear(&c->err);
    return AAMM_OK;
}

/* ====================================================================================
 * Feedback
 * ==================================================================================== */

static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

static uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

/* Flush queued output without blocking. */
static int flush_out(struct aamm_capture *c)
{
    char buf[512];
    int r = PQflush(c->repl);
    if (r < 0)
        return fail(c, AAMM_ECONN, "sending: %s", pqmsg(c->repl, buf, sizeof buf));
    c->flush_pending = r > 0;
    return AAMM_OK;
}

/* Standby status update: 'r', write, flush, apply, clock, reply-requested. The write
 * position is what we received; flush and apply are what the host confirmed. */
static int send_status(struct aamm_capture *c)
{
    uint8_t msg[34];
    char buf[512];
    uint64_t write = c->received_lsn > c->confirmed ? c->received_lsn : c->confirmed;
    msg[0] = 'r';
    put_be64(msg + 1, write);
    put_be64(msg + 9, c->confirmed);
    put_be64(msg + 17, c->confirmed);
    put_be64(msg + 25, (uint64_t)(aamm__wall_us() - AAMM_PG_EPOCH_OFFSET_US));
    msg[33] = 0;
    if (PQputCopyData(c->repl, (const char *)msg, sizeof msg) != 1)
        return fail(c, AAMM_ECONN, "sending a status update: %s", pqmsg(c->repl, buf, sizeof buf));
    c->sent_confirmed = c->confirmed;
    c->last_status_ms = aamm__now_ms();
    c->stats.status_updates++;
    return flush_out(c);
}

static int status_due_in(const struct aamm_capture *c, int64_t now)
{
    int64_t due = c->last_status_ms + c->status_interval_ms;
    if (c->confirmed != c->sent_confirmed && c->last_status_ms + CONFIRM_FEEDBACK_MS < due)
        due = c->last_status_ms + CONFIRM_FEEDBACK_MS;
    return due <= now ? 0 : (int)(due - now);
}

/* ====================================================================================
 * Host-driven I/O
 * ==================================================================================== */

static int sticky(struct aamm_capture *c)
{
    if (c->state == ST_STREAMING)
        return AAMM_OK;
    if (c->state == ST_NEW)
        return aamm__errf(&c->err, AAMM_ESTATE, "capture: not open");
    return c->err.code ? c->err.code : AAMM_EINTERNAL;
}

int aamm_capture_fd(const struct aamm_capture *c)
{
    return c && c->state == ST_STREAMING ? PQsocket(c->repl) : -1;
}

int aamm_capture_events(const struct aamm_capture *c)
{
    int ev = 0;
    if (c == NULL || c->state != ST_STREAMING)
        return 0;
    if (c->drained)
        ev |= AAMM_CAPTURE_READ;
    if (c->flush_pending)
        ev |= AAMM_CAPTURE_WRITE;
    return ev;
}

int aamm_capture_timeout(const struct aamm_capture *c)
{
    if (c == NULL || c->state != ST_STREAMING)
        return -1;
    if (c->budget_exhausted)
        return 0;
    return status_due_in(c, aamm__now_ms());
}

int aamm_capture_step(struct aamm_capture *c)
{
    char buf[512];
    int rc = sticky(c);
    if (rc != AAMM_OK)
        return rc;
    aamm__pgo_event_clear(&c->out);
    if (c->flush_pending && (rc = flush_out(c)) != AAMM_OK)
        return rc;
    if (status_due_in(c, aamm__now_ms()) == 0 && (rc = send_status(c)) != AAMM_OK)
        return rc;
    /* Read only when the host has pulled everything: a paused host stops the reading
     * (the server then blocks on TCP), not the status updates above. */
    if (c->drained) {
        if (PQconsumeInput(c->repl) != 1)
            return fail(c, AAMM_ECONN, "connection lost: %s", pqmsg(c->repl, buf, sizeof buf));
        c->drained = false;
    }
    return AAMM_OK;
}

/* The end of the COPY stream: the server ended it or the connection broke. */
static int stream_ended(struct aamm_capture *c)
{
    char buf[512];
    PGresult *res;
    const char *why = NULL;
    while ((res = PQgetResult(c->repl)) != NULL) {
        if (why == NULL && PQresultStatus(res) == PGRES_FATAL_ERROR)
            why = resmsg(res, buf, sizeof buf);
        PQclear(res);
        if (PQstatus(c->repl) == CONNECTION_BAD || why != NULL)
            break;
    }
    if (why == NULL)
        why = pqmsg(c->repl, buf, sizeof buf);
    if (why[0] == '\0')
        why = "the server ended the stream";
    return fail(c, AAMM_ECONN, "connection lost: %s", why);
}

/* Pull the next CopyData message from libpq's buffer. Keepalives are handled here.
 * Returns 1 with a pgoutput message in @ev, 0 when the buffer holds no complete message,
 * or an error. */
static int pull(struct aamm_capture *c, struct aamm__pgo_event *ev)
{
    for (;;) {
        int n;
        const uint8_t *m;
        if (c->copybuf) {
            PQfreemem(c->copybuf);
            c->copybuf = NULL;
        }
        n = PQgetCopyData(c->repl, &c->copybuf, 1);
        if (n == 0) {
            c->drained = true;
            return 0;
        }
        if (n < 0)
            return stream_ended(c);
        m = (const uint8_t *)c->copybuf;
        c->stats.bytes_received += (uint64_t)n;
        if (m[0] == 'w' && n >= 25) {
            uint64_t start = get_be64(m + 1), wal_end = get_be64(m + 9);
            int rc;
            if (wal_end > c->received_lsn)
                c->received_lsn = wal_end;
            c->stats.messages++;
            rc = aamm__pgo_parse(c->pgo, m + 25, (size_t)n - 25, start, ev, &c->err);
            if (rc != AAMM_OK) {
                aamm__errprefix(&c->err, "capture: slot \"%s\": ", c->slot);
                c->state = ST_FAILED;
                return rc;
            }
            return 1;
        }
        if (m[0] == 'k' && n >= 18) {
            uint64_t wal_end = get_be64(m + 1);
            c->stats.keepalives++;
            if (wal_end > c->received_lsn)
                c->received_lsn = wal_end;
            /* Between transactions, everything before the keepalive's position has been
             * sent: nothing up to there needs delivering. */
            if (!c->in_txn && !c->have_held && wal_end > c->progress)
                c->progress = wal_end;
            if (m[17]) {
                int rc = send_status(c);
                if (rc != AAMM_OK)
                    return rc;
            }
            continue;
        }
        return fail(c, AAMM_EPROTO, "unexpected replication message '%c' (%d bytes)", m[0], n);
    }
}

/* Type names for a relation's columns from the cache, querying unknown OIDs once. */
static int fill_type_names(struct aamm_capture *c, const struct aamm_relation *rel)
{
    struct aamm__wr w;
    int rc, missing = 0;
    aamm__wr_init(&w);
    aamm__wr_u8(&w, '{');
    for (uint32_t i = 0; i < rel->ncolumns; i++) {
        if (type_find(&c->types, rel->columns[i].type_oid) == NULL) {
            char num[16];
            int len = snprintf(num, sizeof num, "%s%u", missing ? "," : "",
                               rel->columns[i].type_oid);
            aamm__wr_bytes(&w, num, (size_t)len);
            missing++;
        }
    }
    aamm__wr_bytes(&w, "}", 2);
    if (!w.ok) {
        aamm__wr_free(&w);
        return fail(c, AAMM_ENOMEM, "out of memory");
    }
    if (missing > 0) {
        rc = load_types(c, (const char *)w.data);
        if (rc != AAMM_OK) {
            aamm__wr_free(&w);
            return rc;
        }
    }
    aamm__wr_free(&w);
    for (uint32_t i = 0; i < rel->ncolumns; i++) {
        const char *name = type_find(&c->types, rel->columns[i].type_oid);
        if (name == NULL)
            continue; /* a type dropped since: leave NULL ("unknown") */
        rc = aamm__pgo_set_type_name(c->pgo, rel->oid, i, name);
        if (rc != AAMM_OK)
            return fail(c, rc, "out of memory");
    }
    return AAMM_OK;
}

static bool skip_origin(const char *name)
{
    return name != NULL && strncmp(name, AAMM_CAPTURE_SKIP_ORIGIN_PREFIX,
                                   sizeof AAMM_CAPTURE_SKIP_ORIGIN_PREFIX - 1) == 0;
}

/* Start the transaction of a 'B' message. */
static void begin_txn(struct aamm_capture *c, struct aamm__pgo_event *ev)
{
    aamm_transaction_clear(&c->txn);
    c->txn = ev->txn;
    memset(&ev->txn, 0, sizeof ev->txn);
    c->txn.origin_node = c->node_id;
    c->in_txn = true;
    c->begin_pending = true;
    c->skipping = false;
}

static int deliver_begin(struct aamm_capture *c, struct aamm_capture_event *ev)
{
    c->begin_pending = false;
    ev->kind = AAMM_CAPTURE_BEGIN;
    ev->txn = &c->txn;
    return 1;
}

/* Decide what one parsed message means. Returns 1 with an event for the host, 0 to go on
 * reading, or an error. @m is c->out (its parts may be handed out). */
static int process(struct aamm_capture *c, struct aamm__pgo_event *m,
                   struct aamm_capture_event *ev)
{
    int rc;
    if (c->begin_pending) {
        /* The message after 'B' decides whether the transaction is delivered. */
        if (m->type == AAMM__PGO_ORIGIN) {
            c->txn.origin_name = m->txn.origin_name;
            m->txn.origin_name = NULL;
            c->txn.origin_lsn = m->txn.origin_lsn;
            if (skip_origin(c->txn.origin_name)) {
                c->begin_pending = false;
                c->skipping = true;
                return 0;
            }
            return deliver_begin(c, ev);
        }
        if (m->type == AAMM__PGO_COMMIT) {
            /* An empty transaction: nothing to deliver, only a position. */
            c->begin_pending = false;
            c->in_txn = false;
            if (m->txn.end_lsn > c->progress)
                c->progress = m->txn.end_lsn;
            return 0;
        }
        /* Anything else: deliver BEGIN now, this message on the next call. */
        c->held = *m;
        memset(m, 0, sizeof *m);
        c->have_held = true;
        return deliver_begin(c, ev);
    }

    switch (m->type) {
    case AAMM__PGO_BEGIN:
        if (c->in_txn)
            return fail(c, AAMM_EPROTO, "BEGIN inside a transaction");
        begin_txn(c, m);
        return 0;
    case AAMM__PGO_ORIGIN:
        return 0; /* only meaningful right after 'B' */
    case AAMM__PGO_TYPE:
        return 0;
    case AAMM__PGO_RELATION:
        rc = fill_type_names(c, m->relation);
        if (rc != AAMM_OK)
            return rc;
        if (c->skipping)
            return 0;
        ev->kind = AAMM_CAPTURE_RELATION;
        ev->relation = m->relation;
        ev->txn = c->in_txn ? &c->txn : NULL;
        return 1;
    case AAMM__PGO_CHANGE:
        if (c->skipping && (m->change.kind != AAMM_CHANGE_MESSAGE || m->change.transactional))
            return 0;
        ev->kind = AAMM_CAPTURE_CHANGE;
        ev->change = &m->change;
        ev->txn = c->in_txn ? &c->txn : NULL;
        c->stats.changes_delivered++;
        return 1;
    case AAMM__PGO_COMMIT:
        if (!c->in_txn)
            return fail(c, AAMM_EPROTO, "COMMIT outside a transaction");
        c->in_txn = false;
        if (c->skipping) {
            c->skipping = false;
            c->stats.txns_skipped++;
            if (m->txn.end_lsn > c->progress)
                c->progress = m->txn.end_lsn;
            return 0;
        }
        c->txn.commit_lsn = m->txn.commit_lsn;
        c->txn.end_lsn = m->txn.end_lsn;
        c->txn.commit_time = m->txn.commit_time;
        if (m->txn.end_lsn > c->handed)
            c->handed = m->txn.end_lsn;
        if (c->handed > c->progress)
            c->progress = c->handed;
        c->stats.txns_delivered++;
        ev->kind = AAMM_CAPTURE_COMMIT;
        ev->txn = &c->txn;
        ev->lsn = m->txn.end_lsn;
        return 1;
    }
    return fail(c, AAMM_EINTERNAL, "unknown parser event %d", (int)m->type);
}

/* A PROGRESS event when there is a position past everything handed out, and the stream
 * is idle (@idle) or the last one is a status interval old. */
static int maybe_progress(struct aamm_capture *c, bool idle, struct aamm_capture_event *ev)
{
    int64_t now;
    if (c->in_txn || c->have_held || c->progress <= c->handed)
        return 0;
    now = aamm__now_ms();
    if (!idle && now - c->last_progress_ms < c->status_interval_ms)
        return 0;
    c->handed = c->progress;
    c->last_progress_ms = now;
    ev->kind = AAMM_CAPTURE_PROGRESS;
    ev->lsn = c->progress;
    return 1;
}

int aamm_capture_next(struct aamm_capture *c, struct aamm_capture_event *ev)
{
    int rc = sticky(c);
    memset(ev, 0, sizeof *ev);
    if (rc != AAMM_OK)
        return rc;
    aamm__pgo_event_clear(&c->out);
    c->budget_exhausted = false;
    /* A host busy pulling a long stream may not step for a while: status updates must
     * still go out on time. */
    if (status_due_in(c, aamm__now_ms()) == 0 && (rc = send_status(c)) != AAMM_OK)
        return rc;
    for (int n = 0; n < c->step_budget; n++) {
        if (c->have_held) {
            c->out = c->held;
            memset(&c->held, 0, sizeof c->held);
            c->have_held = false;
        } else {
            if ((rc = maybe_progress(c, false, ev)) != 0)
                return rc;
            rc = pull(c, &c->out);
            if (rc < 0)
                return rc;
            if (rc == 0)
                return maybe_progress(c, true, ev);
        }
        rc = process(c, &c->out, ev);
        if (rc != 0) {
            if (rc < 0)
                aamm__pgo_event_clear(&c->out);
            return rc;
        }
        aamm__pgo_event_clear(&c->out);
    }
    c->budget_exhausted = true;
    return 0;
}

int aamm_capture_wait(struct aamm_capture *c, struct aamm_capture_event *ev, int timeout_ms)
{
    int64_t deadline = timeout_ms < 0 ? INT64_MAX : aamm__now_ms() + timeout_ms;
    for (;;) {
        struct pollfd pfd;
        int rc = aamm_capture_next(c, ev), t, events;
        int64_t now;
        if (rc != 0)
            return rc;
        now = aamm__now_ms();
        if (now >= deadline)
            return 0;
        t = aamm_capture_timeout(c);
        if (t < 0 || (int64_t)t > deadline - now)
            t = deadline - now > 1000000 ? 1000000 : (int)(deadline - now);
        events = aamm_capture_events(c);
        pfd.fd = aamm_capture_fd(c);
        pfd.events = (short)(((events & AAMM_CAPTURE_READ) ? POLLIN : 0) |
                             ((events & AAMM_CAPTURE_WRITE) ? POLLOUT : 0));
        pfd.revents = 0;
        if (poll(&pfd, 1, t) < 0 && errno != EINTR)
            return fail(c, AAMM_EIO, "poll: %s", strerror(errno));
        rc = aamm_capture_step(c);
        if (rc != AAMM_OK)
            return rc;
    }
}

int aamm_capture_confirm(struct aamm_capture *c, uint64_t lsn)
{
    char a[AAMM_LSN_BUFSIZE], b[AAMM_LSN_BUFSIZE];
    if (c->state == ST_NEW)
        return aamm__errf(&c->err, AAMM_ESTATE, "capture: not open");
    if (lsn > c->handed)
        return aamm__errf(&c->err, AAMM_EINVAL,
                          "capture: slot \"%s\": confirm %s is past everything handed out (%s)",
                          c->slot, aamm_lsn_format(lsn, a), aamm_lsn_format(c->handed, b));
    if (lsn > c->confirmed)
        c->confirmed = lsn;
    return AAMM_OK;
}

int aamm_capture_send_status(struct aamm_capture *c)
{
    int rc = sticky(c);
    return rc != AAMM_OK ? rc : send_status(c);
}

uint64_t aamm_capture_confirmed(const struct aamm_capture *c)
{
    return c->confirmed;
}

uint64_t aamm_capture_start_position(const struct aamm_capture *c)
{
    return c->start_position;
}

void aamm_capture_stats(const struct aamm_capture *c, struct aamm_capture_stats *stats)
{
    *stats = c->stats;
    stats->confirmed_lsn = c->sent_confirmed;
    stats->received_lsn = c->received_lsn;
}
