/* apply.c: exactly-once, pipelined apply of one source node's transactions to the local
 * node, with conflict detection inside the write statements (see doc/conflicts.md).
 * This file holds the handle: options, lifecycle, feeding, catalog mapping, the
 * connection and the step; apply_pipe.c sends and reads the pipeline, apply_sql.c builds
 * the statements (apply_int.h: what they share). */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "apply_int.h"
#include "sql_contract.h"

/* aamm_apply_options.max_txn_changes when 0 */
#define DEFAULT_MAX_TXN_CHANGES 50000

/* While transactions are in flight, the flushed position is re-read at most this often. */
#define PROGRESS_EVERY_MS 20

/* ====================================================================================
 * Options, lifecycle
 * ==================================================================================== */

void aamm_apply_options_init(struct aamm_apply_options *opts)
{
    memset(opts, 0, sizeof *opts);
    opts->max_queued_changes = 100000;
    opts->max_pipeline_txns = 1000;
    opts->max_txn_changes = DEFAULT_MAX_TXN_CHANGES;
    opts->lock_keys = true;
    opts->policy = AAMM_POLICY_LWW;
}

int aamm_apply_new(struct aamm_apply **out, const struct aamm_apply_options *opts, char *err,
                   size_t errsize)
{
    if (!out)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "apply: no handle pointer");
    *out = NULL;
    if (!opts)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "apply: no options");
    if (!opts->conninfo)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "apply: conninfo is required");
    if (!aamm_node_id_valid(opts->local_node) || !aamm_node_id_valid(opts->source_node))
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "apply: local_node %" PRIu32 " / source_node %" PRIu32
                             " outside 1..%d",
                             opts->local_node, opts->source_node, AAMM_NODE_ID_MAX);
    if (opts->local_node == opts->source_node)
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "apply: source_node %" PRIu32 " is the local node", opts->source_node);
    struct aamm_apply *ap = aamm__calloc(1, sizeof *ap);
    if (!ap)
        return aamm__newerrf(err, errsize, AAMM_ENOMEM, "apply: out of memory");
    ap->opt = *opts;
    if (!ap->opt.max_queued_changes)
        ap->opt.max_queued_changes = 100000;
    if (!ap->opt.max_pipeline_txns)
        ap->opt.max_pipeline_txns = 1000;
    if (!ap->opt.max_txn_changes)
        ap->opt.max_txn_changes = DEFAULT_MAX_TXN_CHANGES;
    ap->conninfo = aamm__strdup(opts->conninfo);
    if (!ap->conninfo) {
        aamm__free(ap);
        return aamm__newerrf(err, errsize, AAMM_ENOMEM, "apply: out of memory");
    }
    ap->opt.conninfo = ap->conninfo;
    snprintf(ap->origin, sizeof ap->origin, "aamm_from_%" PRIu32, opts->source_node);
    ap->step_send = STEP_SEND;
    ap->step_results = STEP_RESULTS;
    ap->step_free = STEP_FREE;
    ap->state = S_IDLE;
    ap->backoff_ms = 10;
    *out = ap;
    return 0;
}

static void merged_clear(struct aamm_apply *ap)
{
    for (int i = 0; i < ap->nmerged; i++)
        aamm__free(ap->merged[i].shape);
    ap->nmerged = 0;
}

static void drop_conn(struct aamm_apply *ap)
{
    if (ap->conn)
        PQfinish(ap->conn);
    ap->conn = NULL;
    ap->exp_n = 0;
    ap->exp_head = 0;
    ap->ninflight = 0;
    ap->progress_query_pending = false;
    ap->recovering = false;
    ap->want_write = false;
    ap->results_more = false;
    for (struct lrel *r = ap->rels; r; r = r->next)
        r->catalog_pending = false;
    aamm__apply_forget_prepared(ap);
    aamm__apply_unsend_all(ap);
}

int aamm__apply_conn_error(struct aamm_apply *ap, const char *what)
{
    AAMM_WARN("apply: %s: connection problem: %s", what, PQerrorMessage(ap->conn));
    aamm__errf(&ap->err, AAMM_ECONN, "apply: %s: %s", what, PQerrorMessage(ap->conn));
    struct qtxn *s = aamm__apply_streamed_pending(ap);
    char why[256];
    if (s) {
        snprintf(why, sizeof why, "connection lost: %s: %s", what, PQerrorMessage(ap->conn));
        size_t n = strlen(why);
        while (n && (why[n - 1] == '\n' || why[n - 1] == ' '))
            why[--n] = '\0';
    }
    drop_conn(ap);
    if (s) /* its implicit transaction died with the connection: fed again from flushed */
        aamm__apply_stream_fail(ap, s, why);
    ap->state = S_WAIT;
    ap->wake_ms = aamm__now_ms() + ap->backoff_ms;
    if (ap->backoff_ms < 2000)
        ap->backoff_ms *= 2;
    return 0;
}

static void lrel_unmap(struct lrel *r)
{
    for (int i = 0; i < r->nlocal; i++) {
        aamm__free(r->lcols[i].name);
        aamm__free(r->lcols[i].type);
    }
    aamm__free(r->lcols);
    aamm__free(r->r2l);
    aamm__free(r->key_r);
    for (int i = 0; i < r->nstmts; i++)
        aamm__free(r->stmts[i].mask);
    aamm__free(r->stmts);
    aamm__free(r->map_msg);
    r->lcols = NULL;
    r->r2l = r->key_r = NULL;
    r->stmts = NULL;
    r->map_msg = NULL;
    r->nlocal = r->nkeys = r->nstmts = 0;
    r->mapped = false;
    r->catalog_pending = false;
    r->map_code = 0;
}

void aamm_apply_free(struct aamm_apply *ap)
{
    if (!ap)
        return;
    drop_conn(ap);
    while (ap->head) {
        struct qtxn *t = ap->head;
        ap->head = t->next;
        if (t == ap->open) /* streamed: queued while open */
            ap->open = NULL;
        aamm__apply_qtxn_free(t);
    }
    aamm__apply_qtxn_free(ap->open);
    while (ap->reap) {
        struct qtxn *t = ap->reap;
        ap->reap = t->next;
        aamm__apply_qtxn_free(t);
    }
    while (ap->rels) {
        struct lrel *r = ap->rels;
        ap->rels = r->next;
        lrel_unmap(r);
        aamm_relation_clear(&r->rel);
        aamm__free(r->label);
        aamm__free(r->qname);
        aamm__free(r);
    }
    while (ap->msgs) {
        struct qmsg *m = ap->msgs;
        ap->msgs = m->next;
        aamm__free(m->prefix);
        aamm__free(m->content);
        aamm__free(m);
    }
    while (ap->policies) {
        struct policy *p = ap->policies;
        ap->policies = p->next;
        aamm__free(p->schema);
        aamm__free(p->name);
        aamm__free(p);
    }
    merged_clear(ap);
    aamm__free(ap->exp);
    aamm__free(ap->scratch_mask);
    aamm__free(ap->scratch_vals);
    aamm__free(ap->block_msg);
    aamm__free(ap->conninfo);
    aamm__free(ap);
}

/* ====================================================================================
 * Conflict policy
 * ==================================================================================== */

static int add_policy(struct aamm_apply *ap, const char *schema, const char *name, int policy,
                      aamm_apply_resolver_cb fn, void *arg);

int aamm_apply_set_policy(struct aamm_apply *ap, const char *schema, const char *name,
                          enum aamm_conflict_policy policy)
{
    if (!schema || !name || (int)policy < 0 || policy > AAMM_POLICY_ERROR)
        return AAMM_EINVAL;
    return add_policy(ap, schema, name, (int)policy, NULL, NULL);
}

int aamm_apply_set_resolver(struct aamm_apply *ap, const char *schema, const char *name,
                            aamm_apply_resolver_cb fn, void *arg)
{
    if (!ap || (!schema) != (!name))
        return AAMM_EINVAL;
    if (!schema) {
        ap->resolver = fn;
        ap->resolver_arg = arg;
        return 0;
    }
    return add_policy(ap, schema, name, fn ? AAMM_POLICY_CALLBACK : -1, fn, arg);
}

static int add_policy(struct aamm_apply *ap, const char *schema, const char *name, int policy,
                      aamm_apply_resolver_cb fn, void *arg)
{
    struct policy *p = aamm__calloc(1, sizeof *p);
    if (!p)
        return AAMM_ENOMEM;
    p->schema = aamm__strdup(schema);
    p->name = aamm__strdup(name);
    if (!p->schema || !p->name) {
        aamm__free(p->schema);
        aamm__free(p->name);
        aamm__free(p);
        return AAMM_ENOMEM;
    }
    p->policy = policy;
    p->fn = fn;
    p->arg = arg;
    p->next = ap->policies;
    ap->policies = p;
    return 0;
}

/* ====================================================================================
 * Feeding
 * ==================================================================================== */

/* apply's cached copy of @src: reused while the definition is the same */
static struct lrel *rel_lookup(struct aamm_apply *ap, const struct aamm_relation *src)
{
    if (ap->last_rel && ap->last_src == src && ap->last_gen == src->generation &&
        strcmp(ap->last_rel->rel.name, src->name) == 0 &&
        strcmp(ap->last_rel->rel.schema, src->schema) == 0)
        return ap->last_rel;
    struct lrel *found = NULL;
    for (struct lrel *r = ap->rels; r; r = r->next) {
        if (aamm_relation_equal(&r->rel, src)) {
            found = r;
            break;
        }
    }
    if (!found) {
        found = aamm__calloc(1, sizeof *found);
        if (!found)
            return NULL;
        if (aamm_relation_copy(&found->rel, src) < 0) {
            aamm__free(found);
            return NULL;
        }
        if (aamm__apply_rel_names(src, &found->qname, &found->label) < 0) {
            aamm_relation_clear(&found->rel);
            aamm__free(found);
            return NULL;
        }
        found->id = ++ap->nrels;
        found->next = ap->rels; /* newest first: a redefinition is found before the old */
        ap->rels = found;
    }
    ap->last_rel = found;
    ap->last_src = src;
    ap->last_gen = src->generation;
    return found;
}

int aamm_apply_begin(struct aamm_apply *ap, const struct aamm_transaction *txn)
{
    if (ap->open)
        return aamm__errf(&ap->err, AAMM_ESTATE, "apply: begin: a transaction is open");
    if (!txn || txn->origin_node != ap->opt.source_node)
        return aamm__errf(&ap->err, AAMM_EINVAL,
                          "apply: begin: transaction from node %" PRIu32
                          ", stream is node %" PRIu32,
                          txn ? txn->origin_node : 0, ap->opt.source_node);
    struct qtxn *t = aamm__calloc(1, sizeof *t);
    if (!t)
        return AAMM_ENOMEM;
    if (aamm_transaction_copy(&t->hdr, txn) < 0) {
        aamm__free(t);
        return AAMM_ENOMEM;
    }
    t->err_change = -1;
    ap->open = t;
    return 0;
}

int aamm_apply_change(struct aamm_apply *ap, struct aamm_change *change)
{
    if (!change)
        return AAMM_EINVAL;
    if (!ap->open) {
        if (change->kind != AAMM_CHANGE_MESSAGE)
            return aamm__errf(&ap->err, AAMM_ESTATE, "apply: change outside a transaction");
        struct qmsg *m = aamm__calloc(1, sizeof *m), **pp = &ap->msgs;
        if (!m)
            return AAMM_ENOMEM;
        m->prefix = change->prefix;
        m->content = change->content;
        m->len = change->content_len;
        change->prefix = change->content = NULL;
        aamm_change_clear(change);
        while (*pp)
            pp = &(*pp)->next;
        *pp = m;
        return 0;
    }
    struct qtxn *t = ap->open;
    /* back-pressure, but never against the open transaction alone; a streamed one
     * (queued already) by its own bound: its changes not yet answered */
    if (t->streamed) {
        if (t->n - t->ncleared >= 2 * ap->opt.max_txn_changes)
            return AAMM_EAGAIN;
    } else if (ap->nqueued_changes >= ap->opt.max_queued_changes && ap->head) {
        return AAMM_EAGAIN;
    }
    if (t->n == t->cap) {
        size_t nc = t->cap ? t->cap * 2 : 16;
        struct aamm_change *c = aamm__realloc(t->changes, nc * sizeof *c);
        if (!c)
            return AAMM_ENOMEM;
        t->changes = c;
        t->cap = nc;
    }
    struct aamm_change *c = &t->changes[t->n];
    *c = *change;
    switch (change->kind) {
    case AAMM_CHANGE_INSERT:
    case AAMM_CHANGE_UPDATE:
    case AAMM_CHANGE_DELETE: {
        if (!change->relation)
            return AAMM_EINVAL;
        /* the unchanged-TOAST rule (doc/conflicts.md): with REPLICA IDENTITY FULL the old
         * tuple holds every value inline, so an unchanged one is the old one and the
         * update carries the origin's complete row */
        if (c->kind == AAMM_CHANGE_UPDATE && c->old_kind == AAMM_OLD_FULL &&
            c->old_tuple.nvalues == c->new_tuple.nvalues) {
            for (uint32_t i = 0; i < c->new_tuple.nvalues; i++) {
                struct aamm_value *nv = &c->new_tuple.values[i], *ov = &c->old_tuple.values[i];
                if (nv->kind == AAMM_VALUE_UNCHANGED && ov->kind == AAMM_VALUE_TEXT) {
                    char *d = aamm__strndup(ov->data, ov->len);
                    if (!d)
                        return AAMM_ENOMEM;
                    nv->kind = AAMM_VALUE_TEXT;
                    nv->data = d;
                    nv->len = ov->len;
                }
            }
        }
        struct lrel *r = rel_lookup(ap, change->relation);
        if (!r)
            return AAMM_ENOMEM;
        c->relation = &r->rel;
        break;
    }
    case AAMM_CHANGE_TRUNCATE:
        for (uint32_t i = 0; i < change->nrelations; i++) {
            struct lrel *r = rel_lookup(ap, change->relations[i]);
            if (!r)
                return AAMM_ENOMEM;
            c->relations[i] = &r->rel;
        }
        break;
    case AAMM_CHANGE_MESSAGE:
        break;
    default:
        return AAMM_EINVAL;
    }
    memset(change, 0, sizeof *change);
    t->n++;
    ap->nqueued_changes++;
    return 0;
}

int aamm_apply_commit(struct aamm_apply *ap, const struct aamm_transaction *txn)
{
    if (!ap->open)
        return aamm__errf(&ap->err, AAMM_ESTATE, "apply: commit without begin");
    if (!txn || txn->end_lsn == AAMM_LSN_INVALID)
        return aamm__errf(&ap->err, AAMM_EINVAL, "apply: commit without an end LSN");
    struct qtxn *t = ap->open;
    ap->open = NULL;
    if (t->streamed) {
        /* queued (and partly sent) already; its rows carry the commit time of its begin
         * (the same in pgoutput); its Sync goes out now */
        if (txn->end_lsn > ap->received)
            ap->received = txn->end_lsn;
        t->hdr.end_lsn = txn->end_lsn;
        t->hdr.commit_lsn = txn->commit_lsn;
        t->closed = true;
        return 0;
    }
    /* dropped here, never queued:
     * - a transaction without changes: nothing to apply. Sent, it would cost a local
     *   transaction only to move the origin (and a commit that writes nothing does not
     *   even do that: the next transaction's guard would trip and retry). The origin stays
     *   at the last transaction with changes; the source confirms positions that need no
     *   data itself (link.h);
     * - a duplicate: at or below the last transaction accepted (queued, in flight or
     *   committed) or the origin's progress read at setup. A link that reconnects resumes
     *   from the flushed position, so it sends again what was accepted but not yet flushed */
    if (t->n == 0 || txn->end_lsn <= ap->received) {
        AAMM_DEBUG("apply: transaction %" PRIX64 " dropped at commit (%s)", txn->end_lsn,
                   t->n == 0 ? "no changes" : "duplicate");
        ap->nqueued_changes -= t->n;
        ap->skipped++;
        aamm__apply_qtxn_free(t);
        return 0;
    }
    ap->received = txn->end_lsn;
    t->hdr.end_lsn = txn->end_lsn;
    t->hdr.commit_lsn = txn->commit_lsn;
    t->hdr.commit_time = txn->commit_time;
    t->closed = true;
    aamm__apply_enqueue(ap, t);
    return 0;
}

void aamm__apply_enqueue(struct aamm_apply *ap, struct qtxn *t)
{
    if (ap->tail)
        ap->tail->next = t;
    else
        ap->head = t;
    ap->tail = t;
    ap->ntxns++;
    if (!ap->cursor)
        ap->cursor = t;
}

int aamm_apply_abort(struct aamm_apply *ap)
{
    struct qtxn *t = ap->open;
    if (!t)
        return 0;
    AAMM_DEBUG("apply: open transaction aborted with %zu changes", t->n);
    ap->open = NULL;
    ap->nqueued_changes -= t->n;
    if (t->streamed) {
        /* partly sent, in an implicit transaction only its Sync would end: close the
         * session (the server rolls it back); a new one is made at the next step. It is
         * the last queued (nothing is queued while a transaction is open) */
        struct qtxn **pp = &ap->head, *prev = NULL;
        while (*pp && *pp != t) {
            prev = *pp;
            pp = &(*pp)->next;
        }
        if (*pp)
            *pp = t->next;
        if (ap->tail == t)
            ap->tail = prev;
        if (ap->cursor == t)
            ap->cursor = NULL;
        if (ap->sending == t)
            ap->sending = NULL;
        if (ap->fail_txn == t)
            ap->fail_txn = NULL;
        ap->ntxns--;
        drop_conn(ap);
        ap->state = S_IDLE;
    }
    aamm__apply_qtxn_free(t);
    return 0;
}

/* ====================================================================================
 * Catalog mapping
 * ==================================================================================== */

static void map_fail(struct lrel *r, int code, const char *fmt, ...) AAMM_PRINTF(3, 4);
static void map_fail(struct lrel *r, int code, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    aamm__free(r->map_msg);
    r->map_msg = aamm__strdup(buf);
    r->map_code = code;
    r->mapped = true;
}

void aamm__apply_map_result(struct lrel *r, PGresult *res)
{
    lrel_unmap(r);
    r->gen++;
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        map_fail(r, AAMM_ESERVER, "%s: reading the local catalog: %s", r->label,
                 PQresultErrorMessage(res));
        return;
    }
    int n = PQntuples(res);
    if (n == 0) {
        map_fail(r, AAMM_ENOTFOUND, "%s: table does not exist on this node", r->label);
        return;
    }
    r->lcols = aamm__calloc((size_t)n, sizeof *r->lcols);
    r->r2l = aamm__calloc(r->rel.ncolumns + 1, sizeof *r->r2l);
    if (!r->lcols || !r->r2l) {
        map_fail(r, AAMM_ENOMEM, "%s: out of memory", r->label);
        return;
    }
    r->nlocal = n;
    int nkeys = 0;
    for (int i = 0; i < n; i++) {
        r->lcols[i].name = aamm__strdup(PQgetvalue(res, i, 0));
        r->lcols[i].type = aamm__strdup(PQgetvalue(res, i, 1));
        if (!r->lcols[i].name || !r->lcols[i].type) {
            map_fail(r, AAMM_ENOMEM, "%s: out of memory", r->label);
            return;
        }
        r->lcols[i].key_pos = atoi(PQgetvalue(res, i, 2)) - 1;
        r->lcols[i].generated = PQgetvalue(res, i, 3)[0] == 't';
        if (r->lcols[i].key_pos >= 0)
            nkeys++;
    }
    if (nkeys == 0) {
        map_fail(r, AAMM_ENOTFOUND, "%s: the local table has no primary key", r->label);
        return;
    }
    r->key_r = aamm__calloc((size_t)nkeys, sizeof *r->key_r);
    if (!r->key_r) {
        map_fail(r, AAMM_ENOMEM, "%s: out of memory", r->label);
        return;
    }
    r->nkeys = nkeys;
    for (uint32_t c = 0; c < r->rel.ncolumns; c++) {
        int found = -1;
        for (int i = 0; i < n; i++)
            if (strcmp(r->lcols[i].name, r->rel.columns[c].name) == 0)
                found = i;
        if (found < 0) {
            map_fail(r, AAMM_ENOTFOUND, "%s: column \"%s\" of the source is missing on this node",
                     r->label, r->rel.columns[c].name);
            return;
        }
        r->r2l[c] = r->lcols[found].generated ? -1 : found;
    }
    for (int i = 0; i < n; i++) {
        int rc = aamm_relation_column(&r->rel, r->lcols[i].name);
        if (r->lcols[i].key_pos >= 0) {
            if (rc < 0) {
                map_fail(r, AAMM_ENOTFOUND, "%s: key column \"%s\" is not sent by the source",
                         r->label, r->lcols[i].name);
                return;
            }
            r->key_r[r->lcols[i].key_pos] = rc;
        } else if (rc < 0 && PQgetvalue(res, i, 4)[0] == 't') {
            AAMM_WARN("apply: %s: column \"%s\" is not sent by the source and has a volatile "
                      "default: its value will differ between nodes",
                      r->label, r->lcols[i].name);
        }
    }
    r->mapped = true;
    r->map_code = 0;
}

/* ====================================================================================
 * Connection and session setup
 * ==================================================================================== */

static int start_connect(struct aamm_apply *ap)
{
    ap->conn = PQconnectStart(ap->conninfo);
    if (!ap->conn)
        return aamm__errf(&ap->err, AAMM_ENOMEM, "apply: out of memory connecting");
    if (PQstatus(ap->conn) == CONNECTION_BAD)
        return aamm__apply_conn_error(ap, "connect");
    PQsetNoticeReceiver(ap->conn, aamm__apply_on_notice, ap);
    ap->state = S_CONNECTING;
    ap->want_write = true;
    return 0;
}

static int send_setup(struct aamm_apply *ap)
{
    char sql[1024];
    snprintf(sql, sizeof sql,
             "SET session_replication_role = replica; SET search_path = '';"
             "SET DateStyle = ISO; SET IntervalStyle = postgres; SET extra_float_digits = 3;"
             "SET bytea_output = hex; SET TimeZone = 'UTC'; SET client_encoding = 'UTF8';"
             "SET standard_conforming_strings = on; SET client_min_messages = notice;"
             /* every apply statement finds its rows by key: through the key's index even
              * on a table the statistics call tiny (a hot, bloated one, as often as not);
              * no JIT for statements this small */
             "SET enable_seqscan = off; SET jit = off;"
             "SET aamm.node_id = '%" PRIu32 "';"
             "SET application_name = 'aamm apply from %" PRIu32 "';%s"
             "SELECT progress, roident FROM " AAMM_SQL_FN_ORIGIN_SESSION "('%s')",
             ap->opt.local_node, ap->opt.source_node,
             ap->opt.synchronous_commit_off ? " SET synchronous_commit = off;" : "", ap->origin);
    if (!PQsendQuery(ap->conn, sql))
        return aamm__apply_conn_error(ap, "session setup");
    ap->state = S_SETUP;
    return 0;
}

static int step_setup(struct aamm_apply *ap)
{
    if (!PQconsumeInput(ap->conn))
        return aamm__apply_conn_error(ap, "session setup");
    while (!PQisBusy(ap->conn)) {
        PGresult *res = PQgetResult(ap->conn);
        if (!res) {
            /* all results in: enter pipeline mode */
            if (ap->state != S_SETUP)
                return 0;
            if (!PQenterPipelineMode(ap->conn) || PQsetnonblocking(ap->conn, 1) != 0)
                return aamm__apply_conn_error(ap, "pipeline mode");
            ap->state = S_READY;
            aamm__apply_reclaim(ap);
            ap->prev_sent = ap->progress;
            if (ap->received < ap->progress) /* never back: what is queued stays accepted */
                ap->received = ap->progress;
            AAMM_INFO("apply: origin %s ready at %" PRIX64, ap->origin, ap->progress);
            return 0;
        }
        int st = PQresultStatus(res);
        if (st == PGRES_FATAL_ERROR) {
            const char *ss = PQresultErrorField(res, PG_DIAG_SQLSTATE);
            bool busy = ss && strcmp(ss, "55000") == 0; /* origin still held by an old
                                                           backend */
            aamm__errf(&ap->err, busy ? AAMM_EBUSY : AAMM_ESERVER, "apply: session setup: %s",
                       PQresultErrorMessage(res));
            PQclear(res);
            /* drain, then retry after a backoff (the old backend goes away by itself) */
            while ((res = PQgetResult(ap->conn)) != NULL)
                PQclear(res);
            PQfinish(ap->conn);
            ap->conn = NULL;
            ap->state = S_WAIT;
            ap->wake_ms = aamm__now_ms() + (busy ? 20 : ap->backoff_ms);
            if (!busy && ap->backoff_ms < 2000)
                ap->backoff_ms *= 2;
            if (!busy)
                AAMM_WARN("%s", aamm__errmsg(&ap->err));
            return 0;
        }
        if (st == PGRES_TUPLES_OK && PQntuples(res) == 1) {
            aamm_lsn_parse(PQgetvalue(res, 0, 0), &ap->progress);
            snprintf(ap->roident, sizeof ap->roident, "%s", PQgetvalue(res, 0, 1));
            if (ap->flushed > ap->progress)
                ap->flushed = ap->progress;
        }
        PQclear(res);
    }
    return 0;
}

/* ====================================================================================
 * Driving
 * ==================================================================================== */

static int step(struct aamm_apply *ap);

int aamm_apply_step(struct aamm_apply *ap)
{
    int rc = step(ap);
    if (ap->gap_pending) { /* aamm__apply_stream_fail() wrote the message */
        ap->gap_pending = false;
        return AAMM_EGAP;
    }
    return rc;
}

static int step(struct aamm_apply *ap)
{
    /* non-transactional messages first (they are not tied to any commit) */
    while (ap->msgs) {
        struct qmsg *m = ap->msgs;
        ap->msgs = m->next;
        if (ap->opt.on_message)
            ap->opt.on_message(ap, false, m->prefix ? m->prefix : "", m->content, m->len,
                               ap->opt.message_arg);
        aamm__free(m->prefix);
        aamm__free(m->content);
        aamm__free(m);
    }
    switch (ap->state) {
    case S_HELD:
        if (ap->conn && ap->exp_n)
            aamm__apply_read_results(ap);
        if (ap->conn && PQflush(ap->conn) < 0)
            aamm__apply_conn_error(ap, "flush");
        if (ap->state != S_HELD) /* lost the connection while held: stay held */
            ap->state = S_HELD;
        return ap->held_code;
    case S_WAIT:
        if (aamm__now_ms() < ap->wake_ms)
            return 0;
        if (ap->conn) { /* retry on the same connection */
            ap->state = S_READY;
            break;
        }
        /* fall through */
    case S_IDLE:
        return start_connect(ap);
    case S_CONNECTING: {
        PostgresPollingStatusType ps = PQconnectPoll(ap->conn);
        if (ps == PGRES_POLLING_FAILED)
            return aamm__apply_conn_error(ap, "connect");
        ap->want_write = ps == PGRES_POLLING_WRITING;
        if (ps == PGRES_POLLING_OK) {
            ap->want_write = false;
            return send_setup(ap);
        }
        return 0;
    }
    case S_SETUP:
        return step_setup(ap);
    case S_READY:
        break;
    }
    /* S_READY: results first (they free pipeline room), then send, then flush */
    int rc = aamm__apply_read_results(ap);
    if (rc < 0 || ap->state != S_READY)
        return rc;
    /* (a transaction partly sent (ap->sending) is still in flight whatever exp_n says: its
     * Sync goes out first) */
    if (ap->exp_n == 0 && ap->fail_txn && !ap->sending) {
        aamm__apply_after_failure(ap);
        if (ap->state == S_HELD)
            return ap->held_code;
        return 0;
    }
    if (ap->exp_n == 0 && ap->block_code && !ap->sending) {
        int code = ap->block_code;
        aamm__errf(&ap->err, code, "apply: %s; stream held", ap->block_msg ? ap->block_msg : "");
        ap->block_code = 0;
        ap->held_code = code;
        ap->state = S_HELD;
        return code;
    }
    rc = aamm__apply_send_pending(ap);
    if (rc < 0) {
        if (rc == AAMM_ECONN)
            return aamm__apply_conn_error(ap, "sending");
        return rc;
    }
    /* the flushed position (for acks) is read at most every PROGRESS_EVERY_MS while
     * transactions are in flight, at once when the pipeline is empty: a query per step
     * would cost the applier's backend a statement and a commit per round trip. Never
     * while a transaction is partly sent: the query would join its implicit transaction */
    int64_t now = aamm__now_ms();
    if (ap->need_progress && !ap->progress_query_pending && !ap->fail_txn && !ap->sending &&
        (ap->ninflight == 0 || now - ap->progress_sent_ms >= PROGRESS_EVERY_MS)) {
        const char *pv[1] = {ap->origin};
        if (!PQsendQueryParams(ap->conn,
                               "SELECT pg_catalog.pg_replication_origin_progress($1, true)", 1,
                               NULL, pv, NULL, NULL, 0) ||
            !PQpipelineSync(ap->conn))
            return aamm__apply_conn_error(ap, "sending");
        aamm__apply_exp_push(ap, E_PROGRESS, NULL, NULL, 0);
        aamm__apply_exp_push(ap, E_MSYNC, NULL, NULL, 0);
        ap->progress_query_pending = true;
        ap->need_progress = false;
        ap->progress_sent_ms = now;
    }
    int f = PQflush(ap->conn);
    if (f < 0)
        return aamm__apply_conn_error(ap, "sending");
    ap->want_write = f == 1;
    return 0;
}

int aamm_apply_fd(const struct aamm_apply *ap)
{
    return ap->conn ? PQsocket(ap->conn) : -1;
}

int aamm_apply_events(const struct aamm_apply *ap)
{
    if (!ap->conn)
        return 0;
    return AAMM_READ | (ap->want_write ? AAMM_WRITE : 0);
}

int aamm_apply_timeout(const struct aamm_apply *ap)
{
    switch (ap->state) {
    case S_IDLE:
        return 0;
    case S_WAIT: {
        int64_t d = ap->wake_ms - aamm__now_ms();
        return d < 0 ? 0 : (int)d;
    }
    case S_READY:
        /* results left by a step's budget, changes of retired transactions to free */
        if (ap->results_more || ap->reap)
            return 0;
        /* work queued that can be sent now (unless earlier output still waits for the
         * socket: then the fd's AAMM_WRITE wakes the host) */
        if (!ap->want_write &&
            (ap->sending ? !aamm__apply_stream_waits(ap->sending)
                         : (ap->cursor && ap->ninflight < ap->opt.max_pipeline_txns &&
                            !ap->fail_txn && !ap->block_code && !ap->recovering)))
            return 0;
        if ((ap->fail_txn || ap->block_code) && ap->exp_n == 0 && !ap->sending)
            return 0;
        if (ap->msgs)
            return 0;
        if (ap->need_progress && !ap->progress_query_pending && !ap->fail_txn && !ap->sending) {
            int64_t d = ap->progress_sent_ms + PROGRESS_EVERY_MS - aamm__now_ms();
            return ap->ninflight == 0 || d <= 0 ? 0 : (int)d;
        }
        return -1;
    default:
        return ap->msgs || ap->results_more ? 0 : -1;
    }
}

static bool idle(const struct aamm_apply *ap)
{
    return ap->state == S_READY && !ap->head && ap->exp_n == 0 && !ap->msgs;
}

int aamm_apply_flush(struct aamm_apply *ap, int timeout_ms)
{
    int64_t deadline = aamm__now_ms() + timeout_ms;
    for (;;) {
        int rc = aamm_apply_step(ap);
        if (rc < 0)
            return rc;
        if (idle(ap))
            return 0;
        int64_t now = aamm__now_ms();
        if (now >= deadline)
            return aamm__errf(&ap->err, AAMM_ETIMEDOUT, "apply: flush timed out");
        int to = aamm_apply_timeout(ap);
        int64_t left = deadline - now;
        if (to < 0 || to > left)
            to = (int)left;
        int fd = aamm_apply_fd(ap);
        if (fd >= 0 && to > 0) {
            struct pollfd p = {fd, 0, 0};
            int ev = aamm_apply_events(ap);
            if (ev & AAMM_READ)
                p.events |= POLLIN;
            if (ev & AAMM_WRITE)
                p.events |= POLLOUT;
            poll(&p, 1, to > 100 ? 100 : to);
        } else if (to > 0) {
            struct pollfd p = {-1, 0, 0};
            poll(&p, 0, to > 100 ? 100 : to);
        }
    }
}

int aamm_apply_resume(struct aamm_apply *ap)
{
    if (ap->state != S_HELD)
        return aamm__errf(&ap->err, AAMM_ESTATE, "apply: resume: the stream is not held");
    for (struct lrel *r = ap->rels; r; r = r->next)
        lrel_unmap(r);
    merged_clear(ap);
    ap->held_code = 0;
    aamm__errclear(&ap->err);
    if (ap->conn) {
        /* statements were dropped (DEALLOCATE ALL after the failure) */
        ap->state = S_READY;
    } else {
        ap->state = S_IDLE;
    }
    return 0;
}

bool aamm_apply_held(const struct aamm_apply *ap)
{
    return ap->state == S_HELD;
}

bool aamm_apply_ready(const struct aamm_apply *ap)
{
    return ap->state == S_READY || ap->state == S_HELD;
}

uint64_t aamm_apply_progress(const struct aamm_apply *ap)
{
    return ap->progress;
}

uint64_t aamm_apply_received(const struct aamm_apply *ap)
{
    return ap->received;
}

uint64_t aamm_apply_flushed(const struct aamm_apply *ap)
{
    return ap->flushed;
}

size_t aamm_apply_pending(const struct aamm_apply *ap)
{
    return ap->ntxns - ap->nunflushed;
}

void aamm_apply_stats(const struct aamm_apply *ap, struct aamm_apply_stats *stats)
{
    memset(stats, 0, sizeof *stats);
    stats->committed = ap->committed;
    stats->skipped = ap->skipped;
    stats->pending = aamm_apply_pending(ap);
    for (int k = 1; k < AAMM_CONFLICT_NKINDS; k++) {
        stats->conflicts[k] = ap->counters[k];
        stats->conflicts_unlogged[k] = ap->unlogged[k];
    }
}

const char *aamm_apply_errmsg(const struct aamm_apply *ap)
{
    return aamm__errmsg(&ap->err);
}
