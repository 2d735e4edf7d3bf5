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
#define PINNED_OPTIONS                                                                             \
    "-c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3 "                          \
    "-c bytea_output=hex -c TimeZone=UTC -c client_encoding=UTF8"

#define DEFAULT_STATUS_INTERVAL_MS 10000
#define DEFAULT_STEP_BUDGET 1000
/* After aamm_capture_confirm(), the new position goes out at most this late. */
#define CONFIRM_FEEDBACK_MS 100

enum state { ST_NEW, ST_SETUP, ST_STREAMING, ST_FAILED };

/* Setup phases, driven by aamm_capture_step() after aamm_capture_start(). */
enum phase { PH_NONE, PH_CAT_CONNECT, PH_CAT_QUERY, PH_REPL_CONNECT, PH_START, PH_STREAMING };

#define DEFAULT_SETUP_TIMEOUT_MS 60000

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
 * Relation definitions handed to the host: OID -> generation last delivered
 * ==================================================================================== */

struct rel_seen {
    uint32_t oid; /* 0 = empty */
    uint32_t generation;
};

struct seen_map {
    struct rel_seen *slots;
    size_t cap, count;
};

static size_t seen_slot(const struct seen_map *m, uint32_t oid)
{
    size_t mask = m->cap - 1, i = (size_t)(oid * UINT32_C(2654435761)) & mask;
    while (m->slots[i].oid != 0 && m->slots[i].oid != oid)
        i = (i + 1) & mask;
    return i;
}

static uint32_t seen_get(const struct seen_map *m, uint32_t oid)
{
    return m->cap == 0 ? 0 : m->slots[seen_slot(m, oid)].generation;
}

static int seen_put(struct seen_map *m, uint32_t oid, uint32_t generation)
{
    size_t i;
    if ((m->count + 1) * 2 > m->cap) {
        struct seen_map grown;
        grown.cap = m->cap ? m->cap * 2 : 64;
        grown.count = m->count;
        grown.slots = aamm__calloc(grown.cap, sizeof *grown.slots);
        if (grown.slots == NULL)
            return AAMM_ENOMEM;
        for (size_t k = 0; k < m->cap; k++)
            if (m->slots[k].oid != 0)
                grown.slots[seen_slot(&grown, m->slots[k].oid)] = m->slots[k];
        aamm__free(m->slots);
        *m = grown;
    }
    i = seen_slot(m, oid);
    if (m->slots[i].oid == 0)
        m->count++;
    m->slots[i].oid = oid;
    m->slots[i].generation = generation;
    return AAMM_OK;
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
    int setup_timeout_ms;
    uint32_t forward[AAMM_CAPTURE_MAX_FORWARD]; /* forward_origins */
    uint32_t nforward;
    bool report_skipped;

    enum state state;
    enum phase phase;
    int query;                             /* enum setup_query during PH_CAT_QUERY */
    PostgresPollingStatusType poll_status; /* of the connection being made */
    PGresult *setup_res;                   /* result of the setup query in flight */
    int64_t setup_deadline_ms;
    struct aamm__err err;
    PGconn *cat;  /* catalog connection (type names) */
    PGconn *repl; /* replication connection, COPY BOTH while streaming */
    struct aamm__pgo *pgo;
    struct type_cache types;
    struct seen_map seen; /* relation definitions delivered to the host */
    int server_version;

    /* stream */
    char *copybuf;               /* the CopyData message being decoded (PQfreemem) */
    bool drained;                /* next() found libpq's buffer empty since the last read */
    bool budget_exhausted;       /* next() stopped on its budget: work waits */
    bool flush_pending;          /* PQflush() left output queued */
    struct aamm__pgo_event out;  /* the event whose parts are handed out now */
    struct aamm__pgo_event held; /* a message parsed ahead (after a BEGIN), not yet used */
    bool have_held;
    struct aamm_transaction txn; /* the current transaction (origin_name heap) */
    bool in_txn;                 /* between B and C */
    bool begin_pending;          /* B seen, waiting for the next message (an 'O' or not) */
    bool skipping;               /* inside a transaction with an aamm_ origin */
    bool forwarding;             /* inside a transaction delivered for forward_origins */
    uint32_t skip_node;          /* the node of the skipped one's "aamm_from_<n>" (0: other) */

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
    if (c->state == ST_STREAMING || c->state == ST_SETUP)
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

int aamm_capture_new(struct aamm_capture **out, const struct aamm_capture_options *opts,
                     char *err, size_t errsize)
{
    struct aamm_capture *c;
    *out = NULL;
    if (opts == NULL)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "capture: no options");
    if (opts->conninfo == NULL)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "capture: conninfo is required");
    if (opts->slot == NULL)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "capture: slot is required");
    if (!aamm_node_id_valid(opts->node_id))
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "capture: node_id %" PRIu32 " outside 1..%d",
                             opts->node_id, AAMM_NODE_ID_MAX);
    if (opts->publications == NULL || opts->npublications == 0 || opts->npublications > 64)
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "capture: %" PRIu32 " publications (1..64 needed)",
                             opts->publications == NULL ? 0 : opts->npublications);
    if (opts->status_interval_ms < 0 || opts->step_budget < 0 || opts->setup_timeout_ms < 0)
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "capture: status_interval_ms, step_budget and setup_timeout_ms "
                             "must not be negative");
    if (!valid_slot_name(opts->slot))
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "capture: invalid slot name \"%s\" (1..63 of a-z, 0-9, _)",
                             opts->slot);
    for (uint32_t i = 0; i < opts->npublications; i++) {
        if (opts->publications[i] == NULL || opts->publications[i][0] == '\0')
            return aamm__newerrf(err, errsize, AAMM_EINVAL,
                                 "capture: publication %" PRIu32 " has no name", i);
    }
    if (opts->nforward_origins > AAMM_CAPTURE_MAX_FORWARD ||
        (opts->nforward_origins && !opts->forward_origins))
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "capture: %" PRIu32 " forward origins (at most %d)",
                             opts->nforward_origins, AAMM_CAPTURE_MAX_FORWARD);
    for (uint32_t i = 0; i < opts->nforward_origins; i++)
        if (!aamm_node_id_valid(opts->forward_origins[i]))
            return aamm__newerrf(err, errsize, AAMM_EINVAL,
                                 "capture: forward origin %" PRIu32 " outside 1..%d",
                                 opts->forward_origins[i], AAMM_NODE_ID_MAX);
    c = aamm__calloc(1, sizeof *c);
    if (c == NULL)
        return aamm__newerrf(err, errsize, AAMM_ENOMEM, "capture: out of memory");
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
    c->setup_timeout_ms =
        opts->setup_timeout_ms > 0 ? opts->setup_timeout_ms : DEFAULT_SETUP_TIMEOUT_MS;
    for (uint32_t i = 0; i < opts->nforward_origins; i++)
        c->forward[i] = opts->forward_origins[i];
    c->nforward = opts->nforward_origins;
    c->report_skipped = opts->report_skipped;
    c->drained = true;
    c->state = ST_NEW;
    *out = c;
    return AAMM_OK;
oom:
    aamm_capture_free(c);
    return aamm__newerrf(err, errsize, AAMM_ENOMEM, "capture: out of memory");
}

void aamm_capture_free(struct aamm_capture *c)
{
    if (c == NULL)
        return;
    if (c->copybuf)
        PQfreemem(c->copybuf);
    PQclear(c->setup_res);
    if (c->repl)
        PQfinish(c->repl);
    if (c->cat)
        PQfinish(c->cat);
    aamm__pgo_event_clear(&c->out);
    aamm__pgo_event_clear(&c->held);
    aamm_transaction_clear(&c->txn);
    aamm__pgo_free(c->pgo);
    type_cache_free(&c->types);
    aamm__free(c->seen.slots);
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
 * Setup: a non-blocking state machine (setup_step: catalog connection, settings,
 * publications, slot, type names, then the replication connection and START_REPLICATION),
 * driven by aamm_capture_step(); aamm_capture_open() is the blocking wrapper. Only
 * load_types() blocks, mid-stream and rarely.
 * ==================================================================================== */

/* Set the error from a failed query or connection: AAMM_ECONN when the connection is
 * gone, else AAMM_ESERVER. */
static int query_failed(struct aamm_capture *c, PGconn *conn, const PGresult *res, const char *what)
{
    char buf[512];
    int code = conn == NULL || PQstatus(conn) == CONNECTION_BAD ? AAMM_ECONN : AAMM_ESERVER;
    const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    if (code == AAMM_ESERVER && state != NULL && strcmp(state, "55006") == 0)
        code = AAMM_EBUSY; /* object in use: the slot is active in another process */
    return fail(c, code, "%s: %s", what,
                res && PQresultErrorMessage(res)[0] ? resmsg(res, buf, sizeof buf)
                                                    : pqmsg(conn, buf, sizeof buf));
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
                aamm__wr_u8(&w, '\'');
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

/* Type names from a result of (oid, format_type) rows into the cache. */
static int store_types(struct aamm_capture *c, const PGresult *res)
{
    for (int i = 0; i < PQntuples(res); i++) {
        uint32_t oid = (uint32_t)strtoul(PQgetvalue(res, i, 0), NULL, 10);
        if (type_put(&c->types, oid, PQgetvalue(res, i, 1)) != AAMM_OK)
            return fail(c, AAMM_ENOMEM, "out of memory");
    }
    return AAMM_OK;
}

/* BLOCKING (mid-stream only, rare): type names for the OIDs in @oids, an oid[] literal. */
static int load_types(struct aamm_capture *c, const char *oids)
{
    static const char sql[] = "SELECT oid, format_type(oid, NULL) FROM pg_type "
                              "WHERE oid = ANY($1::oid[])";
    const char *params[1] = {oids};
    int rc;
    PGresult *res = PQexecParams(c->cat, sql, 1, NULL, params, NULL, NULL, 0);
    if ((res == NULL || PQresultStatus(res) != PGRES_TUPLES_OK) &&
        PQstatus(c->cat) == CONNECTION_BAD) {
        /* The catalog connection sits idle between lookups and may have been dropped
         * (backend terminated, server restarted, network): reconnect once, blocking like
         * the lookup itself, and retry. PQreset leaves the connection in blocking mode,
         * which is all this connection needs after setup. */
        AAMM_WARN("capture: slot \"%s\": catalog connection lost, reconnecting", c->slot);
        PQclear(res);
        PQreset(c->cat);
        if (PQstatus(c->cat) != CONNECTION_OK)
            return query_failed(c, c->cat, NULL, "loading type names (reconnecting)");
        res = PQexecParams(c->cat, sql, 1, NULL, params, NULL, NULL, 0);
    }
    if (res == NULL || PQresultStatus(res) != PGRES_TUPLES_OK) {
        rc = query_failed(c, c->cat, res, "loading type names");
        PQclear(res);
        return rc;
    }
    rc = store_types(c, res);
    PQclear(res);
    return rc;
}

/* ---- setup queries, in order, on the catalog connection ---- */

enum setup_query { Q_SETTINGS, Q_PUBS, Q_NOKEY, Q_SLOT, Q_CREATE, Q_TYPES, Q_DONE };

static const char *const setup_what[] = {
    "reading settings",    "looking up publications", "checking published tables",
    "looking up the slot", "creating the slot",       "loading type names",
};

static const char *const setup_sql[] = {
    /* Q_SETTINGS */
    "SELECT current_setting('wal_level'), current_setting('track_commit_timestamp'), "
    "       current_setting('wal_sender_timeout')",
    /* Q_PUBS: the publications that do not exist */
    "SELECT p.n FROM unnest($1::text[]) AS p(n) "
    "WHERE NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = p.n) ORDER BY 1",
    /* Q_NOKEY: published tables (with updates or deletes) without a usable identity */
    "SELECT DISTINCT quote_ident(pt.schemaname) || '.' || quote_ident(pt.tablename) "
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
    "ORDER BY 1",
    /* Q_SLOT */
    "SELECT plugin, slot_type, database = current_database(), "
    "       COALESCE(confirmed_flush_lsn::text, '0/0') "
    "FROM pg_replication_slots WHERE slot_name = $1",
    /* Q_CREATE: waits for running transactions to end (a consistent starting point) */
    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
    /* Q_TYPES: the built-in types; others are looked up when a relation uses them */
    "SELECT oid, format_type(oid, NULL) FROM pg_type WHERE oid < 16384",
};

/* wal_sender_timeout as current_setting() prints it ("60s", "500ms", "1min", "0"). */
static long setting_ms(const char *val)
{
    char *end;
    long v = strtol(val, &end, 10);
    if (strcmp(end, "ms") == 0)
        return v;
    if (strcmp(end, "s") == 0)
        return v * 1000;
    if (strcmp(end, "min") == 0)
        return v * 60000;
    if (strcmp(end, "h") == 0)
        return v * 3600000;
    return 0;
}

static int flush_conn(struct aamm_capture *c, PGconn *conn)
{
    char buf[512];
    int r = PQflush(conn);
    if (r < 0)
        return fail(c, AAMM_ECONN, "connection lost (sending): %s", pqmsg(conn, buf, sizeof buf));
    c->flush_pending = r > 0;
    return AAMM_OK;
}

static int send_setup_query(struct aamm_capture *c)
{
    char buf[512], *arr = NULL;
    const char *params[1] = {NULL};
    int n = 0, ok;
    if (c->query == Q_PUBS || c->query == Q_NOKEY) {
        arr = pub_array(c);
        if (arr == NULL)
            return fail(c, AAMM_ENOMEM, "out of memory");
        params[0] = arr;
        n = 1;
    } else if (c->query == Q_SLOT || c->query == Q_CREATE) {
        params[0] = c->slot;
        n = 1;
    }
    /* PQsendQueryParams copies the parameters into its output buffer. */
    ok = PQsendQueryParams(c->cat, setup_sql[c->query], n, NULL, params, NULL, NULL, 0);
    aamm__free(arr);
    if (!ok)
        return fail(c, AAMM_ECONN, "%s: %s", setup_what[c->query], pqmsg(c->cat, buf, sizeof buf));
    return flush_conn(c, c->cat);
}

/* Check one setup query's result and choose the next query. */
static int handle_setup_result(struct aamm_capture *c, const PGresult *res)
{
    char a[AAMM_LSN_BUFSIZE], b[AAMM_LSN_BUFSIZE];
    uint64_t confirmed = 0;
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        return query_failed(c, c->cat, res, setup_what[c->query]);
    switch (c->query) {
    case Q_SETTINGS: {
        const char *wal_level = PQgetvalue(res, 0, 0), *track = PQgetvalue(res, 0, 1);
        long ms = setting_ms(PQgetvalue(res, 0, 2));
        if (strcmp(wal_level, "logical") != 0)
            return fail(c, AAMM_EUNSUITABLE,
                        "wal_level is '%s': set wal_level = logical in postgresql.conf and "
                        "restart the server",
                        wal_level);
        if (strcmp(track, "on") != 0)
            return fail(c, AAMM_EUNSUITABLE,
                        "track_commit_timestamp is '%s': set track_commit_timestamp = on in "
                        "postgresql.conf and restart the server (conflict resolution needs "
                        "commit timestamps)",
                        track);
        /* Status updates well within the server's timeout, even for a paused host. */
        if (ms > 0 && ms / 3 < c->status_interval_ms)
            c->status_interval_ms = ms / 3 > 50 ? (int)(ms / 3) : 50;
        c->query = Q_PUBS;
        return AAMM_OK;
    }
    case Q_PUBS:
        if (PQntuples(res) > 0)
            return fail(c, AAMM_ENOTFOUND,
                        "publication \"%s\" does not exist: create it (CREATE PUBLICATION) or "
                        "fix the name",
                        PQgetvalue(res, 0, 0));
        c->query = Q_NOKEY;
        return AAMM_OK;
    case Q_NOKEY:
        if (PQntuples(res) > 0) {
            char list[512] = "";
            size_t used = 0;
            for (int i = 0; i < PQntuples(res) && used < sizeof list - 80; i++)
                used += (size_t)snprintf(list + used, sizeof list - used, "%s%s", i ? ", " : "",
                                         PQgetvalue(res, i, 0));
            return fail(c, AAMM_EINVAL,
                        "table %s has no primary key or replica identity index: add a "
                        "primary key, set REPLICA IDENTITY USING INDEX, or (slow: every update "
                        "and delete then carries the whole row) REPLICA IDENTITY FULL",
                        list);
        }
        c->query = Q_SLOT;
        return AAMM_OK;
    case Q_SLOT:
        if (PQntuples(res) == 0) {
            if (c->start_lsn != AAMM_LSN_INVALID)
                return fail(c, AAMM_ENOTFOUND,
                            "replication slot does not exist, but the peer already has "
                            "progress up to %s from it: re-creating it would silently skip the "
                            "transactions in between; re-join the peer (initial copy) instead",
                            aamm_lsn_format(c->start_lsn, a));
            c->query = Q_CREATE;
            return AAMM_OK;
        }
        if (strcmp(PQgetvalue(res, 0, 1), "logical") != 0 ||
            strcmp(PQgetvalue(res, 0, 0), "pgoutput") != 0)
            return fail(c, AAMM_EINVAL,
                        "slot exists but is a %s slot with plugin '%s', not a logical pgoutput "
                        "slot",
                        PQgetvalue(res, 0, 1), PQgetvalue(res, 0, 0));
        if (strcmp(PQgetvalue(res, 0, 2), "t") != 0)
            return fail(c, AAMM_EINVAL, "slot belongs to another database");
        if (aamm_lsn_parse(PQgetvalue(res, 0, 3), &confirmed) != 0)
            return fail(c, AAMM_ESERVER, "slot has an unreadable confirmed_flush_lsn");
        if (c->start_lsn != AAMM_LSN_INVALID && confirmed > c->start_lsn)
            return fail(c, AAMM_EGAP,
                        "slot's confirmed position %s is past the requested start %s: the "
                        "server would silently skip the transactions in between; re-join the "
                        "peer (initial copy) or find where its progress went",
                        aamm_lsn_format(confirmed, a), aamm_lsn_format(c->start_lsn, b));
        break;
    case Q_CREATE:
        if (PQntuples(res) != 1 || aamm_lsn_parse(PQgetvalue(res, 0, 0), &confirmed) != 0)
            return fail(c, AAMM_ESERVER, "creating the slot: unexpected result");
        AAMM_INFO("capture: created slot \"%s\" at %s", c->slot, aamm_lsn_format(confirmed, a));
        break;
    case Q_TYPES: {
        int rc = store_types(c, res);
        if (rc != AAMM_OK)
            return rc;
        c->query = Q_DONE;
        return AAMM_OK;
    }
    case Q_DONE:
        break;
    }
    /* Q_SLOT (found) and Q_CREATE: the stream's starting point. */
    c->start_position = c->start_lsn > confirmed ? c->start_lsn : confirmed;
    c->confirmed = c->sent_confirmed = c->handed = c->progress = c->start_position;
    c->received_lsn = c->start_position;
    c->query = Q_TYPES;
    return AAMM_OK;
}

/* Start the replication connection (non-blocking). */
static int start_repl_connect(struct aamm_capture *c)
{
    const char *keys[] = {"dbname", "replication", "options", "fallback_application_name", NULL};
    const char *vals[] = {c->conninfo, "database", PINNED_OPTIONS, "libaamm capture", NULL};
    char buf[512];
    c->repl = PQconnectStartParams(keys, vals, 1);
    if (c->repl == NULL || PQstatus(c->repl) == CONNECTION_BAD)
        return fail(c, AAMM_ECONN, "replication connection: %s", pqmsg(c->repl, buf, sizeof buf));
    c->phase = PH_REPL_CONNECT;
    c->poll_status = PGRES_POLLING_WRITING;
    return AAMM_OK;
}

/* Send START_REPLICATION on the connected replication connection. */
static int send_start(struct aamm_capture *c)
{
    char buf[512], lsn[AAMM_LSN_BUFSIZE], *cmd, *pubs = publication_names(c);
    int ok;
    if (pubs == NULL)
        return fail(c, AAMM_ENOMEM, "out of memory");
    aamm_lsn_format(c->start_position, lsn);
    /* No `origin` option: PostgreSQL 15 rejects it, and 16's default (any) is what we
     * want; origins are filtered on the 'O' message. Slot names are [a-z0-9_]. */
    cmd = aamm__asprintf("START_REPLICATION SLOT %s LOGICAL %s (proto_version '1', "
                         "publication_names %s, messages 'true')",
                         c->slot, lsn, pubs);
    aamm__free(pubs);
    if (cmd == NULL)
        return fail(c, AAMM_ENOMEM, "out of memory");
    if (PQsetnonblocking(c->repl, 1) != 0) {
        aamm__free(cmd);
        return fail(c, AAMM_ECONN, "cannot make the connection non-blocking");
    }
    ok = PQsendQuery(c->repl, cmd);
    aamm__free(cmd);
    if (!ok)
        return fail(c, AAMM_ECONN, "START_REPLICATION: %s", pqmsg(c->repl, buf, sizeof buf));
    c->phase = PH_START;
    return flush_conn(c, c->repl);
}

/* Advance a connection in progress. Returns 1 when connected, 0 when waiting. */
static int poll_connect(struct aamm_capture *c, PGconn *conn, const char *what)
{
    char buf[512];
    c->poll_status = PQconnectPoll(conn);
    if (c->poll_status == PGRES_POLLING_FAILED)
        return fail(c, AAMM_ECONN, "%s: %s", what, pqmsg(conn, buf, sizeof buf));
    return c->poll_status == PGRES_POLLING_OK;
}

/* One setup step: bounded, non-blocking. */
static int setup_step(struct aamm_capture *c)
{
    char buf[512];
    int rc;
    if (aamm__now_ms() >= c->setup_deadline_ms) {
        /* Cancel a query in flight (slot creation may wait for a long transaction): the
         * server drops a half-created slot, instead of finishing it for nobody. */
        if (c->phase == PH_CAT_QUERY && PQtransactionStatus(c->cat) == PQTRANS_ACTIVE) {
            PGcancel *cancel = PQgetCancel(c->cat);
            if (cancel != NULL) {
                (void)PQcancel(cancel, buf, sizeof buf);
                PQfreeCancel(cancel);
            }
        }
        return fail(c, AAMM_ETIMEDOUT,
                    "setup did not finish within %d ms (while %s; creating a slot waits for "
                    "running transactions to end)",
                    c->setup_timeout_ms,
                    c->phase == PH_CAT_QUERY ? setup_what[c->query] : "connecting");
    }
    if (c->flush_pending &&
        (rc = flush_conn(c, c->phase == PH_CAT_QUERY ? c->cat : c->repl)) != AAMM_OK)
        return rc;
    switch (c->phase) {
    case PH_CAT_CONNECT:
        rc = poll_connect(c, c->cat, "cannot connect");
        if (rc <= 0)
            return rc;
        c->server_version = PQserverVersion(c->cat);
        if (c->server_version < 150000)
            return fail(c, AAMM_EUNSUITABLE,
                        "server version %d.%d is too old: libaamm needs PostgreSQL 15 or later",
                        c->server_version / 10000, c->server_version % 10000 / 100);
        if (PQsetnonblocking(c->cat, 1) != 0)
            return fail(c, AAMM_ECONN, "cannot make the connection non-blocking");
        c->phase = PH_CAT_QUERY;
        c->query = Q_SETTINGS;
        return send_setup_query(c);
    case PH_CAT_QUERY:
        if (PQconsumeInput(c->cat) != 1)
            return fail(c, AAMM_ECONN, "%s: %s", setup_what[c->query],
                        pqmsg(c->cat, buf, sizeof buf));
        while (!PQisBusy(c->cat)) {
            PGresult *res = PQgetResult(c->cat);
            if (res != NULL) {
                if (c->setup_res == NULL)
                    c->setup_res = res;
                else
                    PQclear(res);
                continue;
            }
            /* The query is complete. */
            if (c->setup_res == NULL)
                return fail(c, AAMM_ESERVER, "%s: no result", setup_what[c->query]);
            rc = handle_setup_result(c, c->setup_res);
            PQclear(c->setup_res);
            c->setup_res = NULL;
            if (rc != AAMM_OK)
                return rc;
            if (c->query != Q_DONE)
                return send_setup_query(c);
            if ((rc = aamm__pgo_new(&c->pgo)) != AAMM_OK)
                return fail(c, rc, "out of memory");
            return start_repl_connect(c);
        }
        return AAMM_OK;
    case PH_REPL_CONNECT:
        rc = poll_connect(c, c->repl, "replication connection");
        if (rc <= 0)
            return rc;
        return send_start(c);
    case PH_START: {
        PGresult *res;
        if (PQconsumeInput(c->repl) != 1)
            return fail(c, AAMM_ECONN, "START_REPLICATION: %s", pqmsg(c->repl, buf, sizeof buf));
        if (PQisBusy(c->repl))
            return AAMM_OK;
        res = PQgetResult(c->repl);
        if (res == NULL || PQresultStatus(res) != PGRES_COPY_BOTH) {
            rc = query_failed(c, c->repl, res, "START_REPLICATION");
            PQclear(res);
            return rc;
        }
        PQclear(res);
        c->phase = PH_STREAMING;
        c->state = ST_STREAMING;
        c->last_status_ms = c->last_progress_ms = aamm__now_ms();
        c->drained = true;
        aamm__errclear(&c->err);
        return AAMM_OK;
    }
    case PH_NONE:
    case PH_STREAMING:
        break;
    }
    return AAMM_OK;
}

int aamm_capture_start(struct aamm_capture *c)
{
    char buf[512];
    if (c->state != ST_NEW)
        return aamm__errf(&c->err, AAMM_ESTATE, "capture: already started");
    c->state = ST_SETUP;
    c->setup_deadline_ms = aamm__now_ms() + c->setup_timeout_ms;
    c->cat = PQconnectStart(c->conninfo);
    if (c->cat == NULL || PQstatus(c->cat) == CONNECTION_BAD)
        return fail(c, AAMM_ECONN, "cannot connect: %s", pqmsg(c->cat, buf, sizeof buf));
    c->phase = PH_CAT_CONNECT;
    c->poll_status = PGRES_POLLING_WRITING;
    return AAMM_OK;
}

/* Wait for the capture's fd (what it asks for) up to @timeout_ms, then step. */
static int poll_and_step(struct aamm_capture *c, int timeout_ms)
{
    struct pollfd pfd;
    int events = aamm_capture_events(c), t = aamm_capture_timeout(c);
    if (t < 0 || t > timeout_ms)
        t = timeout_ms;
    pfd.fd = aamm_capture_fd(c);
    pfd.events = (short)(((events & AAMM_READ) ? POLLIN : 0) |
                         ((events & AAMM_WRITE) ? POLLOUT : 0));
    pfd.revents = 0;
    if (pfd.fd >= 0 && poll(&pfd, 1, t) < 0 && errno != EINTR)
        return fail(c, AAMM_EIO, "poll: %s", strerror(errno));
    return aamm_capture_step(c);
}

int aamm_capture_open(struct aamm_capture *c)
{
    int rc = aamm_capture_start(c);
    while (rc == AAMM_OK && c->state == ST_SETUP)
        rc = poll_and_step(c, 1000);
    return rc;
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
        return fail(c, AAMM_ECONN, "connection lost (sending): %s",
                    pqmsg(c->repl, buf, sizeof buf));
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
        return fail(c, AAMM_ECONN, "connection lost (sending a status update): %s",
                    pqmsg(c->repl, buf, sizeof buf));
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
    if (c->state == ST_SETUP)
        return aamm__errf(&c->err, AAMM_ESTATE, "capture: still setting up");
    return c->err.code ? c->err.code : AAMM_EINTERNAL;
}

int aamm_capture_fd(const struct aamm_capture *c)
{
    if (c == NULL)
        return -1;
    if (c->state == ST_STREAMING)
        return PQsocket(c->repl);
    if (c->state != ST_SETUP)
        return -1;
    return PQsocket(c->phase == PH_CAT_CONNECT || c->phase == PH_CAT_QUERY ? c->cat : c->repl);
}

int aamm_capture_events(const struct aamm_capture *c)
{
    int ev = 0;
    if (c != NULL && c->state == ST_SETUP) {
        if (c->phase == PH_CAT_CONNECT || c->phase == PH_REPL_CONNECT)
            return c->poll_status == PGRES_POLLING_READING ? AAMM_READ : AAMM_WRITE;
        return AAMM_READ | (c->flush_pending ? AAMM_WRITE : 0);
    }
    if (c == NULL || c->state != ST_STREAMING)
        return 0;
    if (c->drained)
        ev |= AAMM_READ;
    if (c->flush_pending)
        ev |= AAMM_WRITE;
    return ev;
}

int aamm_capture_timeout(const struct aamm_capture *c)
{
    if (c != NULL && c->state == ST_SETUP) {
        int64_t left = c->setup_deadline_ms - aamm__now_ms();
        return left <= 0 ? 0 : left > INT32_MAX ? INT32_MAX : (int)left;
    }
    if (c == NULL || c->state != ST_STREAMING)
        return -1;
    if (c->budget_exhausted)
        return 0;
    return status_due_in(c, aamm__now_ms());
}

int aamm_capture_step(struct aamm_capture *c)
{
    char buf[512];
    int rc;
    if (c->state == ST_SETUP)
        return setup_step(c);
    rc = sticky(c);
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
    /* PQgetResult() would block while libpq still waits for the rest of a result. */
    while (!PQisBusy(c->repl) && (res = PQgetResult(c->repl)) != NULL) {
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
            int len =
                snprintf(num, sizeof num, "%s%u", missing ? "," : "", rel->columns[i].type_oid);
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

/* Before a change, a RELATION event for each relation it uses whose current definition
 * the host has not seen: the change is held and comes on the next call. 1 with the
 * event, 0 when the host knows them all, or an error. */
static int relation_first(struct aamm_capture *c, struct aamm__pgo_event *m,
                          struct aamm_capture_event *ev)
{
    const struct aamm_change *ch = &m->change;
    const struct aamm_relation *single[1] = {ch->relation};
    const struct aamm_relation *const *rels = single;
    uint32_t n = ch->relation ? 1 : 0;
    if (ch->kind == AAMM_CHANGE_TRUNCATE) {
        rels = ch->relations;
        n = ch->nrelations;
    }
    for (uint32_t i = 0; i < n; i++) {
        const struct aamm_relation *r = rels[i];
        if (seen_get(&c->seen, r->oid) == r->generation)
            continue;
        if (seen_put(&c->seen, r->oid, r->generation) != AAMM_OK)
            return fail(c, AAMM_ENOMEM, "out of memory");
        c->held = *m;
        memset(m, 0, sizeof *m);
        c->have_held = true;
        ev->kind = AAMM_CAPTURE_RELATION;
        ev->relation = r;
        ev->txn = c->in_txn ? &c->txn : NULL;
        return 1;
    }
    return 0;
}

static bool skip_origin(const char *name)
{
    return name != NULL && strncmp(name, AAMM_CAPTURE_SKIP_ORIGIN_PREFIX,
                                   sizeof AAMM_CAPTURE_SKIP_ORIGIN_PREFIX - 1) == 0;
}

/* The node n of an origin named "aamm_from_<n>" (what apply and the replicator use), or 0
 * for any other name. */
static uint32_t origin_node_of(const char *name)
{
    static const char pre[] = AAMM_CAPTURE_SKIP_ORIGIN_PREFIX "from_";
    uint64_t n = 0;
    const char *p;
    if (name == NULL || strncmp(name, pre, sizeof pre - 1) != 0)
        return 0;
    p = name + sizeof pre - 1;
    if (*p < '1' || *p > '9')
        return 0;
    for (; *p >= '0' && *p <= '9' && n <= AAMM_NODE_ID_MAX; p++)
        n = n * 10 + (uint64_t)(*p - '0');
    return *p == '\0' && aamm_node_id_valid((uint32_t)n) ? (uint32_t)n : 0;
}

static bool forwarded_node(const struct aamm_capture *c, uint32_t n)
{
    for (uint32_t i = 0; n && i < c->nforward; i++)
        if (c->forward[i] == n)
            return true;
    return false;
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
    c->forwarding = false;
    c->skip_node = 0;
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
static int process(struct aamm_capture *c, struct aamm__pgo_event *m, struct aamm_capture_event *ev)
{
    int rc;
    if (c->begin_pending) {
        /* The message after 'B' decides whether the transaction is delivered. */
        if (m->type == AAMM__PGO_ORIGIN) {
            c->txn.origin_name = m->txn.origin_name;
            m->txn.origin_name = NULL;
            c->txn.origin_lsn = m->txn.origin_lsn;
            if (skip_origin(c->txn.origin_name)) {
                uint32_t n = origin_node_of(c->txn.origin_name);
                if (forwarded_node(c, n) && c->txn.origin_lsn != 0) {
                    /* delivered as node n sent it: its LSN space, its commit time */
                    c->forwarding = true;
                    c->txn.origin_node = n;
                    c->txn.commit_lsn = c->txn.end_lsn = c->txn.origin_lsn;
                    c->txn.origin_lsn = 0;
                    aamm__free(c->txn.origin_name);
                    c->txn.origin_name = NULL;
                    return deliver_begin(c, ev);
                }
                c->begin_pending = false;
                c->skipping = true;
                c->skip_node = n;
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
        /* Delivered to the host before the first change that uses it (below), so a
         * definition that arrived inside a skipped transaction is not lost. */
        return fill_type_names(c, m->relation);
    case AAMM__PGO_CHANGE:
        if (c->skipping && (m->change.kind != AAMM_CHANGE_MESSAGE || m->change.transactional))
            return 0;
        rc = relation_first(c, m, ev);
        if (rc != 0)
            return rc;
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
            if (!c->report_skipped || c->skip_node == 0 || c->txn.origin_lsn == 0)
                return 0;
            /* a position like PROGRESS, with what the host needs to hold it */
            c->txn.origin_node = c->skip_node;
            c->txn.commit_lsn = m->txn.commit_lsn;
            c->txn.end_lsn = m->txn.end_lsn;
            c->txn.commit_time = m->txn.commit_time;
            if (m->txn.end_lsn > c->handed)
                c->handed = m->txn.end_lsn;
            c->last_progress_ms = aamm__now_ms();
            ev->kind = AAMM_CAPTURE_PROGRESS;
            ev->txn = &c->txn;
            ev->lsn = m->txn.end_lsn;
            return 1;
        }
        if (c->forwarding) {
            /* the origin's LSNs stay; the local end is the slot position (ev->lsn) */
            c->stats.txns_forwarded++;
        } else {
            c->txn.commit_lsn = m->txn.commit_lsn;
            c->txn.end_lsn = m->txn.end_lsn;
        }
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

/* The next event: 1 with @ev set, 0 when none is available now, or a negative error. */
static int next_event(struct aamm_capture *c, struct aamm_capture_event *ev)
{
    int rc;
    memset(ev, 0, sizeof *ev);
    if (c->state == ST_SETUP)
        return 0; /* nothing before the stream starts */
    rc = sticky(c);
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

int aamm_capture_next(struct aamm_capture *c, struct aamm_capture_event *ev)
{
    int rc = next_event(c, ev);
    return rc == 1 ? AAMM_OK : rc == 0 ? AAMM_EAGAIN : rc;
}

int aamm_capture_wait(struct aamm_capture *c, struct aamm_capture_event *ev, int timeout_ms)
{
    int64_t deadline = timeout_ms < 0 ? INT64_MAX : aamm__now_ms() + timeout_ms;
    for (;;) {
        int rc = next_event(c, ev);
        int64_t now;
        if (rc != 0)
            return rc == 1 ? AAMM_OK : rc;
        now = aamm__now_ms();
        if (now >= deadline)
            return AAMM_EAGAIN;
        rc = poll_and_step(c, deadline - now > 1000000 ? 1000000 : (int)(deadline - now));
        if (rc != AAMM_OK)
            return rc;
    }
}

int aamm_capture_confirm(struct aamm_capture *c, uint64_t lsn)
{
    char a[AAMM_LSN_BUFSIZE], b[AAMM_LSN_BUFSIZE];
    if (c->state == ST_NEW || c->state == ST_SETUP)
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

bool aamm_capture_streaming(const struct aamm_capture *c)
{
    return c != NULL && c->state == ST_STREAMING;
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
