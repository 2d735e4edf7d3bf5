/* node_join.c: aamm_node_join(): bring a new node D into a running cluster — slots on
 * every existing node, a snapshot of the upstream U taken under the join freeze, a
 * parallel COPY from it into D, and D's origins set to U's progress. Blocking; one thread;
 * the COPY pairs are driven non-blockingly with poll(). doc/membership.md tells why each
 * step is there. */
#include "config.h"

#include <inttypes.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libpq-fe.h>

#include <aamm/node.h>

#include "internal.h"
#include "pgglue.h"
#include "sql_contract.h"

/* Copied rows older than the join carry this commit time (and an aamm_copy_<k> origin):
 * older than any real write, so any remote write wins over them; finite, so the conflict
 * log can print it. */
#define MIN_COMMIT_TS "1970-01-01 00:00:00+00"
#define MAX_PARALLEL 64
#define ROWS_PER_TURN 512 /* rows one COPY pair moves before the next pair's turn */

/* ====================================================================================
 * State
 * ==================================================================================== */

struct jtable {
    char *qname; /* "schema"."table", quoted */
    char *cols;  /* its columns on D, quoted, comma-separated (generated ones left out) */
    bool plain;  /* an ordinary table: COPY from ONLY it (a partitioned one has no rows) */
};

struct jnode {
    uint32_t id;
    const char *ci;
    PGconn *c;
    bool created;        /* this call created its slot aamm_to_<D> */
    uint64_t slot_lsn;   /* L_X, or U's consistent point */
    uint64_t origin_lsn; /* U's progress for this node at the snapshot */
};

enum wstate { W_IDLE, W_COPY, W_END, W_DONE };

struct worker {
    PGconn *u, *d;
    enum wstate st;
    size_t table;
    char *pend; /* a row U sent that D's connection did not take yet */
    int plen;
    bool want_read, want_write;
};

struct join {
    const struct aamm_node_join_options *o;
    char *err;
    size_t errsize;
    PGconn *d;   /* D, admin */
    PGconn *rep; /* U, replication connection: holds the exported snapshot while idle */
    char snap[128];
    char dslot[32]; /* aamm_to_<D> */
    struct jnode nodes[AAMM_NODE_JOIN_MAX_NODES]; /* [0] is U */
    uint32_t nn;
    bool frozen;
    struct jtable *t;
    size_t nt, next;
    bool has_horizon; /* there are other nodes: rows at or after the horizon keep versions */
    int64_t horizon_us;
    char horizon[64];
    struct worker w[MAX_PARALLEL];
    int nw;
    struct aamm_node_join_progress prog;
    int64_t prog_ms;
    struct aamm_node_join_stats st;
};

/* ====================================================================================
 * Small helpers
 * ==================================================================================== */

static int fail(struct join *j, PGconn *c, const char *fmt, const char *arg)
{
    char what[256];
    snprintf(what, sizeof what, fmt, arg);
    char full[300];
    snprintf(full, sizeof full, "node: join: %s", what);
    return aamm__pg_fail(c, full, j->err, j->errsize);
}

/* Run @sql with @n text parameters on @c; the result when it has status TUPLES_OK or
 * COMMAND_OK (PQclear it), else NULL with the error set (*@rc) naming @what. */
static PGresult *q(struct join *j, PGconn *c, const char *what, int *rc, const char *sql, int n,
                   const char *const *pv)
{
    PGresult *res = n ? PQexecParams(c, sql, n, NULL, pv, NULL, NULL, 0) : PQexec(c, sql);
    ExecStatusType s = PQresultStatus(res);
    if (s == PGRES_TUPLES_OK || s == PGRES_COMMAND_OK)
        return res;
    PQclear(res);
    *rc = fail(j, c, "%s", what);
    return NULL;
}

static int run(struct join *j, PGconn *c, const char *what, const char *sql, int n,
               const char *const *pv)
{
    int rc = 0;
    PQclear(q(j, c, what, &rc, sql, n, pv));
    return rc;
}

/* The library prints nothing: libpq's default notice processor writes to stderr. */
static void no_notice(void *arg, const char *msg)
{
    (void)arg;
    (void)msg;
}

static int connect_to(struct join *j, const char *ci, uint32_t id, bool replication, PGconn **out)
{
    const char *keys[] = {"dbname", replication ? "replication" : NULL, NULL};
    const char *vals[] = {ci, "database", NULL};
    *out = PQconnectdbParams(keys, vals, 1);
    if (!*out)
        return aamm__pg_seterr(j->err, j->errsize, AAMM_ENOMEM, "node: join: out of memory");
    if (PQstatus(*out) != CONNECTION_OK)
        return aamm__pg_seterr(j->err, j->errsize, AAMM_ECONN,
                               "node: join: connecting to node %" PRIu32 "%s: %s", id,
                               replication ? " (replication)" : "", PQerrorMessage(*out));
    PQsetNoticeProcessor(*out, no_notice, NULL);
    return 0;
}

static void progress(struct join *j, bool force)
{
    int64_t now = aamm__now_ms();
    if (!j->o->progress || (!force && now - j->prog_ms < 1000))
        return;
    j->prog_ms = now;
    j->o->progress(&j->prog, j->o->progress_arg);
}

static int parse_lsn(struct join *j, const char *text, uint64_t *out, const char *what)
{
    if (aamm_lsn_parse(text, out) != 0)
        return aamm__pg_seterr(j->err, j->errsize, AAMM_EMALFORMED,
                               "node: join: %s: bad LSN \"%s\"", what, text);
    return 0;
}

/* The replication origin @name on D's connection @c: created when missing; with @session,
 * also made this session's origin. */
static int origin_use(struct join *j, PGconn *c, const char *name, bool session)
{
    const char *pv[1] = {name};
    int rc = run(j, c, "the new node's origins",
                 "SELECT pg_catalog.pg_replication_origin_create($1) "
                 "WHERE pg_catalog.pg_replication_origin_oid($1) IS NULL",
                 1, pv);
    if (rc == 0 && session)
        rc = run(j, c, "the new node's origins",
                 "SELECT pg_catalog.pg_replication_origin_session_setup($1)", 1, pv);
    return rc;
}

/* ====================================================================================
 * 0. Options, connections, the tables
 * ==================================================================================== */

static int check_options(struct join *j)
{
    const struct aamm_node_join_options *o = j->o;
    if (!o->conninfo || !o->upstream_conninfo || !aamm_node_id_valid(o->node_id) ||
        !aamm_node_id_valid(o->upstream_id) || o->node_id == o->upstream_id ||
        (o->nothers && !o->others) || o->nothers + 1 > AAMM_NODE_JOIN_MAX_NODES ||
        (o->ntables && !o->tables) || o->parallel < 1 || o->parallel > MAX_PARALLEL ||
        o->timeout_ms <= 0)
        return aamm__pg_seterr(j->err, j->errsize, AAMM_EINVAL,
                               "node: join: invalid options (conninfos, node ids, parallel 1..%d, "
                               "at most %d existing nodes)",
                               MAX_PARALLEL, AAMM_NODE_JOIN_MAX_NODES);
    j->nodes[0] = (struct jnode){.id = o->upstream_id, .ci = o->upstream_conninfo};
    j->nn = 1;
    for (uint32_t i = 0; i < o->nothers; i++) {
        const struct aamm_node_join_peer *p = &o->others[i];
        if (!p->conninfo || !aamm_node_id_valid(p->node_id) || p->node_id == o->node_id)
            return aamm__pg_seterr(j->err, j->errsize, AAMM_EINVAL,
                                   "node: join: invalid existing node %" PRIu32, p->node_id);
        for (uint32_t k = 0; k < j->nn; k++)
            if (j->nodes[k].id == p->node_id)
                return aamm__pg_seterr(j->err, j->errsize, AAMM_EINVAL,
                                       "node: join: node %" PRIu32 " named twice", p->node_id);
        j->nodes[j->nn++] = (struct jnode){.id = p->node_id, .ci = p->conninfo};
    }
    snprintf(j->dslot, sizeof j->dslot, "aamm_to_%" PRIu32, o->node_id);
    return 0;
}

static int connect_all(struct join *j)
{
    int rc = connect_to(j, j->o->conninfo, j->o->node_id, false, &j->d);
    for (uint32_t i = 0; rc == 0 && i < j->nn; i++)
        rc = connect_to(j, j->nodes[i].ci, j->nodes[i].id, false, &j->nodes[i].c);
    if (rc < 0)
        return rc;
    char sql[96];
    snprintf(sql, sizeof sql, "SET statement_timeout = %d", j->o->timeout_ms);
    for (uint32_t i = 0; rc == 0 && i < j->nn; i++)
        rc = run(j, j->nodes[i].c, "statement_timeout", sql, 0, NULL);
    if (rc == 0)
        rc = run(j, j->d, "the new node: setup", "SET synchronous_commit = on", 0, NULL);
    int rc2 = 0;
    PGresult *res = rc ? NULL
                       : q(j, j->d, "the new node: checking its setup", &rc2,
                           "SELECT pg_catalog.to_regclass('" AAMM_SQL_TOMBSTONE_TABLE "') IS NULL",
                           0, NULL);
    if (rc2)
        return rc2;
    if (res && strcmp(PQgetvalue(res, 0, 0), "t") == 0)
        rc = aamm__pg_seterr(j->err, j->errsize, AAMM_ENOTFOUND,
                             "node: join: the new node has no libaamm schema (run "
                             "aamm_node_install() there first)");
    PQclear(res);
    return rc;
}

/* One table (@schema, @name) as D has it: its quoted name and columns; it must be empty. */
static int add_table(struct join *j, const char *schema, const char *name)
{
    static const char sql[] =
        "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname), "
        "(SELECT pg_catalog.string_agg(pg_catalog.quote_ident(a.attname), ',' ORDER BY a.attnum) "
        " FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 "
        " AND NOT a.attisdropped AND a.attgenerated = ''), c.relkind = 'r' "
        "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')";
    const char *pv[2] = {schema, name};
    int rc = 0;
    PGresult *res = q(j, j->d, "the new node: its tables", &rc, sql, 2, pv);
    if (!res)
        return rc;
    if (PQntuples(res) != 1 || PQgetisnull(res, 0, 1)) {
        PQclear(res);
        return aamm__pg_seterr(j->err, j->errsize, AAMM_ENOTFOUND,
                               "node: join: table %s.%s is missing on the new node (create it "
                               "there as on node %" PRIu32 " first)",
                               schema, name, j->o->upstream_id);
    }
    struct jtable *nt = aamm__realloc(j->t, (j->nt + 1) * sizeof *nt);
    if (!nt) {
        PQclear(res);
        return aamm__pg_seterr(j->err, j->errsize, AAMM_ENOMEM, "node: join: out of memory");
    }
    j->t = nt;
    struct jtable *t = &j->t[j->nt];
    t->qname = aamm__strdup(PQgetvalue(res, 0, 0));
    t->cols = aamm__strdup(PQgetvalue(res, 0, 1));
    t->plain = strcmp(PQgetvalue(res, 0, 2), "t") == 0;
    PQclear(res);
    if (!t->qname || !t->cols) {
        aamm__free(t->qname);
        aamm__free(t->cols);
        return aamm__pg_seterr(j->err, j->errsize, AAMM_ENOMEM, "node: join: out of memory");
    }
    j->nt++;
    char *sq = aamm__malloc(strlen(t->qname) + 64);
    if (!sq)
        return aamm__pg_seterr(j->err, j->errsize, AAMM_ENOMEM, "node: join: out of memory");
    sprintf(sq, "SELECT EXISTS (SELECT 1 FROM %s)", t->qname);
    res = q(j, j->d, "the new node: is the table empty", &rc, sq, 0, NULL);
    aamm__free(sq);
    if (!res)
        return rc;
    if (strcmp(PQgetvalue(res, 0, 0), "t") == 0)
        rc = aamm__pg_seterr(j->err, j->errsize, AAMM_EINVAL,
                             "node: join: table %s.%s on the new node is not empty", schema, name);
    PQclear(res);
    return rc;
}

static int list_tables(struct join *j)
{
    int rc = 0;
    if (j->o->ntables) {
        for (uint32_t i = 0; rc == 0 && i < j->o->ntables; i++) {
            const char *s = j->o->tables[i], *dot = s ? strchr(s, '.') : NULL;
            if (!s || !*s)
                return aamm__pg_seterr(j->err, j->errsize, AAMM_EINVAL, "node: join: empty table name");
            char schema[128];
            if (dot && (size_t)(dot - s) < sizeof schema) {
                memcpy(schema, s, (size_t)(dot - s));
                schema[dot - s] = '\0';
                rc = add_table(j, schema, dot + 1);
            } else
                rc = add_table(j, "public", s);
        }
    } else {
        const char *pub = j->o->publication ? j->o->publication : "aamm";
        const char *pv[1] = {pub};
        PGresult *res = q(j, j->nodes[0].c, "the upstream's publication", &rc,
                          "SELECT schemaname, tablename FROM pg_catalog.pg_publication_tables "
                          "WHERE pubname = $1 ORDER BY 1, 2",
                          1, pv);
        if (!res)
            return rc;
        if (PQntuples(res) == 0)
            rc = aamm__pg_seterr(j->err, j->errsize, AAMM_ENOTFOUND,
                                 "node: join: publication %s on node %" PRIu32 " lists no table",
                                 pub, j->o->upstream_id);
        for (int i = 0; rc == 0 && i < PQntuples(res); i++)
            rc = add_table(j, PQgetvalue(res, i, 0), PQgetvalue(res, i, 1));
        PQclear(res);
    }
    j->st.tables = (uint32_t)j->nt;
    /* the remembered deletes go with the rows they hide */
    return rc ? rc : add_table(j, "aamm", "tombstone");
}

/* ====================================================================================
 * 1.-2. Slots on the other nodes; U has everything they wrote before them
 * ==================================================================================== */

static int other_slots(struct join *j)
{
    int rc = 0;
    const char *pv[1] = {j->dslot};
    for (uint32_t i = 1; rc == 0 && i < j->nn; i++) {
        struct jnode *x = &j->nodes[i];
        /* the horizon: X's commits after its slot's start are after this time (a second of
         * slack for commit timestamps taken before a commit record that lands later) */
        PGresult *res = q(j, x->c, "reading the clock", &rc,
                          "SELECT (EXTRACT(epoch FROM pg_catalog.clock_timestamp()) "
                          "* 1000000)::int8 - 1000000",
                          0, NULL);
        if (!res)
            break;
        int64_t h = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
        PQclear(res);
        if (!j->has_horizon || h < j->horizon_us)
            j->horizon_us = h;
        j->has_horizon = true;
        res = q(j, x->c, "slot", &rc,
                "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots "
                "WHERE slot_name = $1",
                1, pv);
        if (!res)
            break;
        if (PQntuples(res) == 0) {
            PQclear(res);
            res = q(j, x->c, "creating the slot", &rc,
                    "SELECT lsn::text FROM pg_catalog.pg_create_logical_replication_slot($1, "
                    "'pgoutput')",
                    1, pv);
            if (!res)
                break;
            x->created = true;
        }
        rc = PQgetisnull(res, 0, 0)
                 ? aamm__pg_seterr(j->err, j->errsize, AAMM_ESERVER,
                                   "node: join: node %" PRIu32 ": slot %s has no position", x->id,
                                   j->dslot)
                 : parse_lsn(j, PQgetvalue(res, 0, 0), &x->slot_lsn, "slot position");
        PQclear(res);
    }
    if (j->has_horizon)
        aamm_time_format(j->horizon_us, j->horizon, sizeof j->horizon);
    return rc;
}

static int wait_upstream(struct join *j)
{
    char uslot[32], want[AAMM_LSN_BUFSIZE];
    snprintf(uslot, sizeof uslot, "aamm_to_%" PRIu32, j->o->upstream_id);
    int64_t end = aamm__now_ms() + j->o->timeout_ms;
    for (uint32_t i = 1; i < j->nn; i++) {
        struct jnode *x = &j->nodes[i];
        aamm_lsn_format(x->slot_lsn, want);
        const char *pv[2] = {uslot, want};
        for (;;) {
            int rc = 0;
            PGresult *res = q(j, x->c, "waiting for the upstream", &rc,
                              "SELECT COALESCE(confirmed_flush_lsn >= $2::pg_lsn, false), "
                              "COALESCE(confirmed_flush_lsn::text, 'none') "
                              "FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                              2, pv);
            if (!res)
                return rc;
            if (PQntuples(res) == 0) {
                PQclear(res);
                return aamm__pg_seterr(j->err, j->errsize, AAMM_ENOTFOUND,
                                       "node: join: node %" PRIu32 " has no slot %s (is its "
                                       "replicator running with node %" PRIu32 " as peer?)",
                                       x->id, uslot, j->o->upstream_id);
            }
            bool ok = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
            if (!ok && aamm__now_ms() >= end) {
                rc = aamm__pg_seterr(j->err, j->errsize, AAMM_ETIMEDOUT,
                                     "node: join: node %" PRIu32 "'s slot %s confirmed %s, not "
                                     "yet %s, after %d ms (is the link from node %" PRIu32
                                     " to node %" PRIu32 " up?)",
                                     x->id, uslot, PQgetvalue(res, 0, 1), want, j->o->timeout_ms,
                                     x->id, j->o->upstream_id);
                PQclear(res);
                return rc;
            }
            PQclear(res);
            if (ok)
                break;
            usleep(20000);
        }
    }
    return 0;
}

/* ====================================================================================
 * 3. The freeze: U's origin progress and U's slot with its snapshot, with no apply commit
 *    between the two
 * ==================================================================================== */

static int unfreeze(struct join *j)
{
    if (!j->frozen)
        return 0;
    j->frozen = false;
    char sql[96];
    snprintf(sql, sizeof sql, "SELECT pg_catalog.pg_advisory_unlock(%" PRId64 ")",
             AAMM_JOIN_FREEZE_KEY);
    int rc = 0;
    PGresult *res = q(j, j->nodes[0].c, "the freeze: unlock", &rc, sql, 0, NULL);
    /* false: the session did not hold it, so nothing was frozen: the progress read may not
     * match the snapshot */
    if (res && strcmp(PQgetvalue(res, 0, 0), "t") != 0)
        rc = aamm__pg_seterr(j->err, j->errsize, AAMM_EINTERNAL,
                             "node: join: the freeze was not held on node %" PRIu32,
                             j->nodes[0].id);
    PQclear(res);
    return rc;
}

static int snapshot(struct join *j)
{
    struct jnode *u = &j->nodes[0];
    const char *pv[1] = {j->dslot};
    /* a slot left by an earlier join that failed half way: its snapshot is gone */
    int rc = run(j, u->c, "dropping an old slot",
                 "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM "
                 "pg_catalog.pg_replication_slots WHERE slot_name = $1",
                 1, pv);
    if (rc == 0)
        rc = connect_to(j, u->ci, u->id, true, &j->rep);
    char sql[160];
    snprintf(sql, sizeof sql,
             "SET lock_timeout = %d; SELECT pg_catalog.pg_advisory_lock(%" PRId64 ")",
             j->o->timeout_ms, AAMM_JOIN_FREEZE_KEY);
    if (rc == 0) {
        PGresult *res = PQexec(u->c, sql);
        if (PQresultStatus(res) == PGRES_TUPLES_OK)
            j->frozen = true;
        else {
            const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
            if (state && strcmp(state, "55P03") == 0)
                rc = aamm__pg_seterr(j->err, j->errsize, AAMM_ETIMEDOUT,
                                     "node: join: the freeze on node %" PRIu32 " was not granted "
                                     "within %d ms (an applied transaction held it)",
                                     u->id, j->o->timeout_ms);
            else
                rc = fail(j, u->c, "%s", "the freeze");
        }
        PQclear(res);
        PQclear(PQexec(u->c, "RESET lock_timeout"));
    }
    if (rc < 0)
        return rc;
    int64_t t0 = aamm__now_ms();
    /* frozen: no apply commits on U; its origin progress is exact */
    PGresult *res = q(j, u->c, "origin progress", &rc,
                      "SELECT pg_catalog.substr(external_id, 11), remote_lsn::text "
                      "FROM pg_catalog.pg_replication_origin_status "
                      "WHERE external_id OPERATOR(pg_catalog.~) '^aamm_from_[0-9]+$'",
                      0, NULL);
    for (int i = 0; res && rc == 0 && i < PQntuples(res); i++) {
        uint32_t id = (uint32_t)strtoul(PQgetvalue(res, i, 0), NULL, 10);
        for (uint32_t k = 1; k < j->nn && rc == 0; k++)
            if (j->nodes[k].id == id)
                rc = parse_lsn(j, PQgetvalue(res, i, 1), &j->nodes[k].origin_lsn,
                               "origin progress");
    }
    PQclear(res);
    if (rc == 0) {
        snprintf(sql, sizeof sql,
                 "CREATE_REPLICATION_SLOT \"%s\" LOGICAL pgoutput (SNAPSHOT 'export')", j->dslot);
        res = PQexec(j->rep, sql);
        if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1 || PQnfields(res) < 3)
            rc = fail(j, j->rep, "%s", "creating the upstream's slot");
        else {
            u->created = true;
            snprintf(j->snap, sizeof j->snap, "%s", PQgetvalue(res, 0, 2));
            rc = parse_lsn(j, PQgetvalue(res, 0, 1), &u->slot_lsn, "consistent point");
        }
        PQclear(res);
    }
    int urc = unfreeze(j);
    j->st.freeze_seconds = (double)(aamm__now_ms() - t0) / 1000.0;
    return rc ? rc : urc;
}

/* ====================================================================================
 * 4. The copy: @parallel pairs (a connection to U in the snapshot, one to D under its own
 *    origin), each a table at a time, pumped from one thread
 * ==================================================================================== */

static int start_workers(struct join *j)
{
    int rc = 0;
    char *lit = aamm__pg_literal(j->nodes[0].c, j->snap);
    if (!lit)
        return aamm__pg_seterr(j->err, j->errsize, AAMM_ENOMEM, "node: join: out of memory");
    char sql[256];
    int n = j->o->parallel < (int)j->nt ? j->o->parallel : (int)j->nt;
    for (int k = 0; rc == 0 && k < n; k++) {
        struct worker *w = &j->w[k];
        j->nw = k + 1;
        rc = connect_to(j, j->nodes[0].ci, j->nodes[0].id, false, &w->u);
        if (rc == 0)
            rc = connect_to(j, j->o->conninfo, j->o->node_id, false, &w->d);
        snprintf(sql, sizeof sql,
                 "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT %s",
                 lit);
        if (rc == 0)
            rc = run(j, w->u, "importing the snapshot", sql, 0, NULL);
        char origin[32];
        snprintf(origin, sizeof origin, "aamm_copy_%d", k);
        /* replica: no triggers of the tables (no tombstones, no FK checks for rows that
         * arrive in any order); synchronous_commit off: step 5 commits with it on, which
         * flushes the copy's WAL too */
        if (rc == 0)
            rc = run(j, w->d, "the copy's session",
                     "SET session_replication_role = replica; SET synchronous_commit = off; "
                     "SET client_min_messages = warning",
                     0, NULL);
        if (rc == 0)
            rc = origin_use(j, w->d, origin, true);
    }
    aamm__free(lit);
    return rc;
}

/* Send the COPY @sql on @c and read its first result, which must be @want. */
static int copy_start(struct join *j, PGconn *c, const char *sql, ExecStatusType want,
                      const char *fmt, const char *table)
{
    PGresult *res = PQsendQuery(c, sql) ? PQgetResult(c) : NULL;
    int rc = res && PQresultStatus(res) == want ? 0 : fail(j, c, fmt, table);
    PQclear(res);
    return rc;
}

/* The COPY of the next table on @w: D in a transaction under the minimal commit time. */
static int worker_next(struct join *j, struct worker *w)
{
    if (j->next >= j->nt) {
        w->st = W_DONE;
        return 0;
    }
    w->table = j->next++;
    const struct jtable *t = &j->t[w->table];
    size_t len = strlen(t->qname) * 2 + strlen(t->cols) * 2 + strlen(j->horizon) + 512;
    char *sql = aamm__malloc(len);
    if (!sql)
        return aamm__pg_seterr(j->err, j->errsize, AAMM_ENOMEM, "node: join: out of memory");
    int rc = run(j, w->d, "the copy: begin",
                 "BEGIN; SELECT pg_catalog.pg_replication_origin_xact_setup('0/0', '" MIN_COMMIT_TS
                 "')",
                 0, NULL);
    snprintf(sql, len, "COPY %s (%s) FROM STDIN", t->qname, t->cols);
    if (rc == 0)
        rc = copy_start(j, w->d, sql, PGRES_COPY_IN, "the copy into %s", t->qname);
    /* rows written since the horizon keep their versions: step 4b copies them */
    if (j->has_horizon)
        snprintf(sql, len,
                 "COPY (SELECT %s FROM %s%s WHERE COALESCE(pg_catalog.pg_xact_commit_timestamp"
                 "(xmin) OPERATOR(pg_catalog.<) '%s'::timestamptz, true)) TO STDOUT",
                 t->cols, t->plain ? "ONLY " : "", t->qname, j->horizon);
    else
        snprintf(sql, len, "COPY (SELECT %s FROM %s%s) TO STDOUT", t->cols,
                 t->plain ? "ONLY " : "", t->qname);
    if (rc == 0)
        rc = copy_start(j, w->u, sql, PGRES_COPY_OUT, "the copy from %s", t->qname);
    aamm__free(sql);
    if (rc == 0 && PQsetnonblocking(w->d, 1) != 0)
        rc = fail(j, w->d, "%s", "nonblocking");
    w->st = W_COPY;
    return rc;
}

/* Finish @w's table: flush the end of the COPY, then (blocking: short) its result and the
 * commit. Returns 1 while the flush waits for the socket. */
static int worker_end(struct join *j, struct worker *w)
{
    if (w->st == W_COPY) {
        int r = PQputCopyEnd(w->d, NULL);
        if (r < 0)
            return fail(j, w->d, "the copy into %s", j->t[w->table].qname);
        if (r == 0) {
            w->want_write = true;
            return 1;
        }
        w->st = W_END;
    }
    int f = PQflush(w->d);
    if (f < 0)
        return fail(j, w->d, "the copy into %s", j->t[w->table].qname);
    if (f == 1) {
        w->want_write = true;
        return 1;
    }
    if (PQsetnonblocking(w->d, 0) != 0)
        return fail(j, w->d, "%s", "blocking");
    int rc = 0;
    PGresult *res = PQgetResult(w->d);
    if (PQresultStatus(res) != PGRES_COMMAND_OK)
        rc = fail(j, w->d, "the copy into %s", j->t[w->table].qname);
    PQclear(res);
    while ((res = PQgetResult(w->d)))
        PQclear(res);
    if (rc == 0)
        rc = run(j, w->d, "the copy: commit", "COMMIT", 0, NULL);
    if (rc < 0)
        return rc;
    j->prog.tables_done++;
    progress(j, true);
    w->st = W_IDLE;
    return 0;
}

/* Move rows from U to D on @w until a socket would block or its turn ends. */
static int worker_pump(struct join *j, struct worker *w)
{
    w->want_read = w->want_write = false;
    for (;;) {
        if (w->st == W_IDLE) {
            int rc = worker_next(j, w);
            if (rc < 0 || w->st == W_DONE)
                return rc;
        }
        if (w->st == W_END) {
            int rc = worker_end(j, w);
            if (rc != 0)
                return rc < 0 ? rc : 0;
            continue;
        }
        /* W_COPY: first what D's connection has not taken yet */
        int f = PQflush(w->d);
        if (f < 0)
            return fail(j, w->d, "the copy into %s", j->t[w->table].qname);
        if (f == 1) {
            w->want_write = true;
            return 0;
        }
        if (w->pend) {
            int r = PQputCopyData(w->d, w->pend, w->plen);
            if (r < 0)
                return fail(j, w->d, "the copy into %s", j->t[w->table].qname);
            if (r == 0) {
                w->want_write = true;
                return 0;
            }
            PQfreemem(w->pend);
            w->pend = NULL;
        }
        for (int n = 0; n < ROWS_PER_TURN; n++) {
            char *buf = NULL;
            int len = PQgetCopyData(w->u, &buf, 1);
            if (len > 0) {
                j->prog.rows++;
                j->prog.bytes += (uint64_t)len;
                int r = PQputCopyData(w->d, buf, len);
                if (r < 0) {
                    PQfreemem(buf);
                    return fail(j, w->d, "the copy into %s", j->t[w->table].qname);
                }
                if (r == 0) {
                    w->pend = buf;
                    w->plen = len;
                    w->want_write = true;
                    return 0;
                }
                PQfreemem(buf);
                continue;
            }
            if (len == 0) {
                if (!PQconsumeInput(w->u))
                    return fail(j, w->u, "the copy from %s", j->t[w->table].qname);
                if (PQisBusy(w->u)) {
                    w->want_read = true;
                    /* whatever D's connection still holds goes out while U is quiet */
                    if (PQflush(w->d) == 1)
                        w->want_write = true;
                    return 0;
                }
                continue;
            }
            if (len == -2)
                return fail(j, w->u, "the copy from %s", j->t[w->table].qname);
            /* -1: U's COPY is done; its result, then D's end */
            int rc = 0;
            PGresult *res = PQgetResult(w->u);
            if (PQresultStatus(res) != PGRES_COMMAND_OK)
                rc = fail(j, w->u, "the copy from %s", j->t[w->table].qname);
            PQclear(res);
            while ((res = PQgetResult(w->u)))
                PQclear(res);
            if (rc < 0)
                return rc;
            rc = worker_end(j, w);
            if (rc != 0)
                return rc < 0 ? rc : 0;
            break;
        }
        if (w->st == W_COPY) { /* its turn ended: let the others move */
            if (PQflush(w->d) == 1)
                w->want_write = true;
            else
                w->want_read = true;
            return 0;
        }
    }
}

static int copy_bulk(struct join *j)
{
    j->prog.tables_total = (uint32_t)j->nt;
    progress(j, true);
    int64_t last_move = aamm__now_ms();
    uint64_t last_bytes = 0;
    for (;;) {
        struct pollfd pf[2 * MAX_PARALLEL];
        int npf = 0, active = 0;
        for (int k = 0; k < j->nw; k++) {
            struct worker *w = &j->w[k];
            if (w->st == W_DONE)
                continue;
            int rc = worker_pump(j, w);
            if (rc < 0)
                return rc;
            if (w->st == W_DONE)
                continue;
            active++;
            if (w->want_read)
                pf[npf++] = (struct pollfd){.fd = PQsocket(w->u), .events = POLLIN};
            if (w->want_write)
                pf[npf++] = (struct pollfd){.fd = PQsocket(w->d), .events = POLLOUT};
        }
        if (!active)
            break;
        progress(j, false);
        if (j->prog.bytes != last_bytes) {
            last_bytes = j->prog.bytes;
            last_move = aamm__now_ms();
        } else if (aamm__now_ms() - last_move > j->o->timeout_ms)
            return aamm__pg_seterr(j->err, j->errsize, AAMM_ETIMEDOUT,
                                   "node: join: the copy moved nothing for %d ms",
                                   j->o->timeout_ms);
        if (npf && poll(pf, (nfds_t)npf, 100) < 0)
            return aamm__pg_seterr(j->err, j->errsize, AAMM_EIO, "node: join: poll failed");
    }
    return 0;
}

/* 4b. Rows (and tombstones) U has from at or after the horizon: a remote write in flight to
 * D may be older than them, so they keep their version — each writing transaction's commit
 * time and origin node (U's own writes: node U) — and go in one transaction per version
 * under D's origin aamm_from_<node> (0/0 as LSN: the origin's progress does not move). */
static int copy_recent(struct join *j)
{
    if (!j->has_horizon || j->nw == 0)
        return 0;
    struct worker *w = &j->w[0];
    int rc = run(j, w->d, "the copy: origin reset",
                 "SELECT pg_catalog.pg_replication_origin_session_reset()", 0, NULL);
    char cur[32] = "";
    char upstream[16];
    snprintf(upstream, sizeof upstream, "%" PRIu32, j->o->upstream_id);
    for (size_t i = 0; rc == 0 && i < j->nt; i++) {
        const struct jtable *t = &j->t[i];
        size_t len = strlen(t->qname) * 2 + strlen(t->cols) * 2 + 1024;
        char *sql = aamm__malloc(len);
        if (!sql)
            return aamm__pg_seterr(j->err, j->errsize, AAMM_ENOMEM, "node: join: out of memory");
        snprintf(sql, len,
                 "SELECT pg_catalog.to_jsonb(c.timestamp) OPERATOR(pg_catalog.#>>) '{}', CASE WHEN c.roident = 0 THEN %s::int "
                 "ELSE aamm.node_of(c.roident) END, pg_catalog.jsonb_agg(pg_catalog.to_jsonb(t)), "
                 "pg_catalog.count(*) FROM %s%s t, pg_catalog.pg_xact_commit_timestamp_origin(t.xmin) c "
                 "WHERE c.timestamp OPERATOR(pg_catalog.>=) '%s'::timestamptz GROUP BY 1, 2 "
                 "ORDER BY 2, 1",
                 upstream, t->plain ? "ONLY " : "", t->qname, j->horizon);
        PGresult *res = q(j, w->u, "the recent rows", &rc, sql, 0, NULL);
        snprintf(sql, len,
                 "INSERT INTO %s (%s) SELECT %s FROM pg_catalog.jsonb_populate_recordset(NULL::%s, ",
                 t->qname, t->cols, t->cols, t->qname);
        for (int r = 0; res && rc == 0 && r < PQntuples(res); r++) {
            char origin[32];
            if (PQgetisnull(res, r, 1))
                snprintf(origin, sizeof origin, "aamm_copy_0");
            else
                snprintf(origin, sizeof origin, "aamm_from_%s", PQgetvalue(res, r, 1));
            if (strcmp(cur, origin) != 0) {
                if (*cur)
                    rc = run(j, w->d, "the copy: origin reset",
                             "SELECT pg_catalog.pg_replication_origin_session_reset()", 0, NULL);
                if (rc == 0)
                    rc = origin_use(j, w->d, origin, true);
                snprintf(cur, sizeof cur, "%s", origin);
            }
            /* one round trip a version: BEGIN, its commit time, its rows, COMMIT */
            char *ts = aamm__pg_literal(w->d, PQgetvalue(res, r, 0));
            char *rows = aamm__pg_literal(w->d, PQgetvalue(res, r, 2));
            size_t tlen = ts && rows ? strlen(ts) + strlen(rows) + strlen(sql) + 160 : 0;
            char *txn = tlen ? aamm__malloc(tlen) : NULL;
            if (!txn)
                rc = aamm__pg_seterr(j->err, j->errsize, AAMM_ENOMEM, "node: join: out of memory");
            else {
                snprintf(txn, tlen,
                         "BEGIN; SELECT pg_catalog.pg_replication_origin_xact_setup('0/0', "
                         "%s::timestamptz); %s%s::jsonb); COMMIT",
                         ts, sql, rows);
                if (rc == 0)
                    rc = run(j, w->d, "the copy: recent rows", txn, 0, NULL);
            }
            aamm__free(txn);
            aamm__free(ts);
            aamm__free(rows);
            if (rc == 0) {
                uint64_t n = strtoull(PQgetvalue(res, r, 3), NULL, 10);
                j->prog.rows += n;
                j->prog.bytes += strlen(PQgetvalue(res, r, 2));
                j->st.recent_rows += n;
            }
        }
        PQclear(res);
        aamm__free(sql);
    }
    if (rc == 0 && *cur)
        rc = run(j, w->d, "the copy: origin reset",
                 "SELECT pg_catalog.pg_replication_origin_session_reset()", 0, NULL);
    return rc;
}

static void close_workers(struct join *j)
{
    for (int k = 0; k < j->nw; k++) {
        struct worker *w = &j->w[k];
        if (w->pend)
            PQfreemem(w->pend);
        PQfinish(w->u);
        PQfinish(w->d);
        *w = (struct worker){0};
    }
    j->nw = 0;
}

/* ====================================================================================
 * 5. D's origins; the tombstone flags
 * ==================================================================================== */

static int set_origins(struct join *j)
{
    int rc = 0;
    for (uint32_t i = 0; rc == 0 && i < j->nn; i++) {
        char origin[32], lsn[AAMM_LSN_BUFSIZE];
        snprintf(origin, sizeof origin, "aamm_from_%" PRIu32, j->nodes[i].id);
        aamm_lsn_format(i == 0 ? 0 : j->nodes[i].origin_lsn, lsn);
        const char *pv[2] = {origin, lsn};
        rc = origin_use(j, j->d, origin, false);
        /* U: its stream starts at the slot's consistent point: skip nothing (0/0) */
        if (rc == 0 && i > 0)
            rc = run(j, j->d, "the new node's origins",
                     "SELECT pg_catalog.pg_replication_origin_advance($1, $2::pg_lsn)", 2, pv);
    }
    /* the tombstone flags say "this relation may have tombstones" (apply reads them); the
     * trigger that sets them fires in replica mode too, but a flag is cheap to be sure of */
    if (rc == 0)
        rc = run(j, j->d, "the tombstone flags",
                 "SELECT pg_catalog.nextval(aamm.tomb_flag(s.r)) FROM (SELECT DISTINCT relation "
                 "FROM aamm.tombstone) s(r) WHERE "
                 "pg_catalog.pg_sequence_last_value(aamm.tomb_flag(s.r)) IS NULL",
                 0, NULL);
    return rc;
}

/* ====================================================================================
 * Public API
 * ==================================================================================== */

void aamm_node_join_options_init(struct aamm_node_join_options *opts)
{
    if (!opts)
        return;
    memset(opts, 0, sizeof *opts);
    opts->publication = "aamm";
    opts->parallel = 4;
    opts->timeout_ms = 120000;
}

/* On failure: the slots this call made go again (a slot that is still active — its
 * snapshot's connection just closed — is retried for a moment). */
static void drop_created(struct join *j)
{
    const char *pv[1] = {j->dslot};
    for (uint32_t i = 0; i < j->nn; i++) {
        struct jnode *x = &j->nodes[i];
        if (!x->created || !x->c || PQstatus(x->c) != CONNECTION_OK)
            continue;
        aamm__pg_rollback(x->c);
        for (int tries = 0; tries < 50; tries++) {
            PGresult *res = PQexecParams(x->c,
                                         "SELECT pg_catalog.pg_drop_replication_slot(slot_name) "
                                         "FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                                         1, NULL, pv, NULL, NULL, 0);
            bool ok = PQresultStatus(res) == PGRES_TUPLES_OK;
            PQclear(res);
            if (ok)
                break;
            usleep(100000);
        }
    }
}

int aamm_node_join(const struct aamm_node_join_options *opts, struct aamm_node_join_stats *stats,
                   char *err, size_t errsize)
{
    if (!opts)
        return aamm__pg_seterr(err, errsize, AAMM_EINVAL, "node: join: no options");
    struct join *j = aamm__calloc(1, sizeof *j);
    if (!j)
        return aamm__pg_seterr(err, errsize, AAMM_ENOMEM, "node: join: out of memory");
    j->o = opts;
    j->err = err;
    j->errsize = errsize;
    int64_t t0 = aamm__now_ms();
    int rc = check_options(j);
    if (rc == 0)
        rc = connect_all(j);
    if (rc == 0)
        rc = list_tables(j);
    /* 1., 2. */
    if (rc == 0)
        rc = other_slots(j);
    if (rc == 0)
        rc = wait_upstream(j);
    /* 3. */
    if (rc == 0)
        rc = snapshot(j);
    /* 4. */
    int64_t c0 = aamm__now_ms();
    if (rc == 0)
        rc = start_workers(j);
    if (rc == 0)
        rc = copy_bulk(j);
    if (rc == 0)
        rc = copy_recent(j);
    j->st.copy_seconds = (double)(aamm__now_ms() - c0) / 1000.0;
    close_workers(j);
    PQfinish(j->rep); /* the snapshot is not needed any more */
    j->rep = NULL;
    /* 5. */
    if (rc == 0)
        rc = set_origins(j);
    if (rc < 0) {
        if (j->frozen && j->nodes[0].c)
            PQclear(PQexec(j->nodes[0].c, "SELECT pg_catalog.pg_advisory_unlock_all()"));
        drop_created(j);
    } else {
        progress(j, true);
        j->st.rows = j->prog.rows;
        j->st.bytes = j->prog.bytes;
        j->st.seconds = (double)(aamm__now_ms() - t0) / 1000.0;
        for (uint32_t i = 0; i < j->nn; i++)
            j->st.positions[i] = (struct aamm_node_join_position){
                j->nodes[i].id, j->nodes[i].slot_lsn, i ? j->nodes[i].origin_lsn : 0};
        j->st.npositions = j->nn;
        if (stats)
            *stats = j->st;
    }
    for (uint32_t i = 0; i < j->nn; i++)
        PQfinish(j->nodes[i].c);
    PQfinish(j->d);
    for (size_t i = 0; i < j->nt; i++) {
        aamm__free(j->t[i].qname);
        aamm__free(j->t[i].cols);
    }
    aamm__free(j->t);
    aamm__free(j);
    return rc;
}
