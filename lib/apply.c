/* apply.c: exactly-once, pipelined apply of one source node's transactions to the local
 * node, with conflict detection inside the write statements (see doc/conflicts.md). */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include <aamm/apply.h>

#include "internal.h"
#include "sqlbuf.h"

/* ====================================================================================
 * Types
 * ==================================================================================== */

enum op {
    OP_INSERT = 1,
    OP_UPDATE = 2,
    OP_DELETE = 3,
    OP_UPDATE_MISSING = 4,
    OP_INSERT_MANY = 5,  /* a run of inserts, ON CONFLICT (key) DO UPDATE WHERE decide */
    OP_INSERT_PLAIN = 6, /* a run of inserts, no ON CONFLICT: a present key fails it */
};

struct lcol {
    char *name;
    char *type;  /* format_type(atttypid, NULL): the cast target */
    int key_pos; /* position in the primary key (0-based) or -1 */
    bool generated;
};

struct stmt {
    int op;
    char *mask; /* per remote column: '1' written, '0' not; for UPDATE plus the old-key flag */
    char name[32];
    bool prepared;
};

/* apply's own copy of a source relation plus its mapping onto the local table */
struct lrel {
    struct aamm_relation rel; /* first: change->relation points here */
    struct lrel *next;
    int id;
    char *label; /* the relation's label (aamm__sb_label()), as the tombstone trigger spells it */
    char *qname; /* "schema"."name" */
    bool mapped;
    bool catalog_pending;
    bool runs_upsert; /* a run met a present key: runs go out as OP_INSERT_MANY */
    int clean_runs;   /* OP_INSERT_MANY runs committed in a row without a conflict */
    int map_code;     /* mapping error, or 0 */
    char *map_msg;    /* heap */
    int nlocal;
    struct lcol *lcols;
    int *r2l; /* per remote column: local index, or -1 (generated: not written) */
    int nkeys;
    int *key_r; /* per key column (key order): remote column index */
    int nstmts;
    struct stmt *stmts;
    unsigned gen; /* bumped at every (re)mapping: part of merged statement shapes */
};

/* A prepared statement applying a whole small transaction (send_merged()). */
struct mstmt {
    char *shape; /* per change: relation id, mapping generation, kind, mask */
    char name[32];
    bool prepared;
};

#define MERGED_MAX 128   /* cached shapes */
#define FOLD_OFF_MS 1000 /* no folded guards for this long after one met a busy key lock */
#define MERGE_CHANGES 16 /* at most this many changes per merged statement */

struct qconflict {
    struct qconflict *next;
    struct aamm_conflict c;
    char *rel, *key, *local, *remote;
};

struct qtxn {
    struct qtxn *next;
    struct aamm_transaction hdr;
    struct aamm_change *changes;
    size_t n, cap;
    bool closed; /* commit seen */
    bool sent;
    bool done; /* committed or skipped */
    bool skipped;
    bool failed;
    char sqlstate[6];
    char *errmsg;            /* first error of this transaction (heap) */
    long err_change;         /* index of the change that failed, -1 none */
    struct lrel *upsert_run; /* the relation of an OP_INSERT_MANY run it holds, or NULL */
    bool err_plain;          /* ... in an OP_INSERT_PLAIN run */
    bool nobatch;            /* send every change as its own statement (after a failure) */
    char *errdetail;         /* the first error's detail (heap), for AA004 */
    char **verdicts;         /* per change: the resolver's verdict (heap), or NULL */
    struct qconflict *conflicts;
};

enum exp_kind {
    E_GUARD = 1,
    E_STMT,
    E_PREPARE,
    E_SYNC,  /* a transaction's Sync: its commit */
    E_MSYNC, /* any other Sync */
    E_CATALOG,
    E_PROGRESS,
    E_MISC,
    E_REPROGRESS
};

struct expect {
    int kind;
    struct qtxn *t;
    struct lrel *rel;
    long idx;
    bool plain; /* an OP_INSERT_PLAIN run */
};

enum state { S_IDLE, S_CONNECTING, S_SETUP, S_WAIT, S_READY, S_HELD };

struct aamm_apply {
    struct aamm__err err;
    struct aamm_apply_options opt;
    char *conninfo;
    char origin[48];
    PGconn *conn;
    enum state state;
    int64_t wake_ms; /* S_WAIT: when to reconnect / retry */
    int backoff_ms;
    bool want_write;
    int held_code;

    uint64_t progress;  /* committed (in-memory) origin progress */
    uint64_t flushed;   /* pg_replication_origin_progress(origin, true) */
    uint64_t prev_sent; /* end LSN the next sent transaction's guard expects */
    char roident[16];
    bool progress_query_pending;
    bool need_progress;
    int64_t progress_sent_ms;  /* when the last flushed-progress query went out */
    int64_t fold_off_until_ms; /* no merged statements (folded guards) until then */
    bool recovering;           /* after a failure, until the origin progress is re-read */
    bool fixed_prepared;       /* the guard statement (aamm_guard) */

    struct lrel *rels;
    int nrels;
    struct lrel *last_rel;
    const struct aamm_relation *last_src;
    uint32_t last_gen;

    struct qtxn *head, *tail, *open;
    struct qtxn *cursor; /* every transaction before it is sent or done */
    size_t nqueued_changes;
    size_t ntxns;
    size_t ninflight;

    struct expect *exp;
    size_t exp_cap, exp_head, exp_n;

    struct qtxn *fail_txn; /* first failed transaction since the last success */
    int block_code;        /* a transaction that cannot be sent (mapping error) */
    char *block_msg;

    struct qmsg {
        struct qmsg *next;
        char *prefix;
        char *content;
        size_t len;
    } * msgs;

    struct policy {
        struct policy *next;
        char *schema, *name;
        int policy; /* AAMM_POLICY_CALLBACK: @fn decides */
        aamm_resolver_fn fn;
        void *arg;
    } * policies;
    aamm_resolver_fn resolver; /* global resolver, or NULL */
    void *resolver_arg;

    struct mstmt merged[MERGED_MAX];
    int nmerged;
    unsigned merged_seq;

    uint64_t counters[AAMM_CONFLICT_NKINDS];
    uint64_t committed, skipped;

    char *scratch_mask; /* per-change scratch, grown to the widest relation */
    const char **scratch_vals;
    size_t scratch_cap;
};

/* ====================================================================================
 * Small helpers
 * ==================================================================================== */

/* Queue what the next result answers; the entry (NULL: out of memory). */
static struct expect *exp_push(struct aamm_apply *ap, int kind, struct qtxn *t, struct lrel *rel,
                               long idx)
{
    if (ap->exp_n == ap->exp_cap) {
        size_t nc = ap->exp_cap ? ap->exp_cap * 2 : 256;
        struct expect *e = aamm__malloc(nc * sizeof *e);
        if (!e)
            return NULL;
        for (size_t i = 0; i < ap->exp_n; i++)
            e[i] = ap->exp[(ap->exp_head + i) % ap->exp_cap];
        aamm__free(ap->exp);
        ap->exp = e;
        ap->exp_cap = nc;
        ap->exp_head = 0;
    }
    struct expect *e = &ap->exp[(ap->exp_head + ap->exp_n) % ap->exp_cap];
    *e = (struct expect){kind, t, rel, idx, false};
    ap->exp_n++;
    return e;
}

static struct expect exp_pop(struct aamm_apply *ap)
{
    struct expect e = ap->exp[ap->exp_head];
    ap->exp_head = (ap->exp_head + 1) % ap->exp_cap;
    ap->exp_n--;
    return e;
}

static struct lrel *lrel_of(const struct aamm_relation *r)
{
    return (struct lrel *)(void *)((char *)(uintptr_t)r - offsetof(struct lrel, rel));
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

static void qtxn_drop_conflicts(struct qtxn *t);

static void qtxn_free(struct qtxn *t)
{
    if (!t)
        return;
    for (size_t i = 0; i < t->n; i++)
        aamm_change_clear(&t->changes[i]);
    aamm__free(t->changes);
    aamm_transaction_clear(&t->hdr);
    aamm__free(t->errmsg);
    aamm__free(t->errdetail);
    for (size_t i = 0; t->verdicts && i < t->n; i++)
        aamm__free(t->verdicts[i]);
    aamm__free(t->verdicts);
    qtxn_drop_conflicts(t);
    aamm__free(t);
}

static bool is_transient(const char *sqlstate)
{
    /* deadlock, lock timeout, serialization, the guard, a key lock another applier held
     * (AA005, a merged statement's guard), a write that raced a local writer (AA006,
     * aamm.recheck_tombs(), aamm.write_raced()), object in use, query canceled,
     * the backend terminated or the server shutting down (57P0x), connection exceptions */
    return strcmp(sqlstate, "40P01") == 0 || strcmp(sqlstate, "55P03") == 0 ||
           strcmp(sqlstate, "40001") == 0 || strcmp(sqlstate, "AA002") == 0 ||
           strcmp(sqlstate, "AA005") == 0 || strcmp(sqlstate, "AA006") == 0 ||
           strcmp(sqlstate, "55006") == 0 ||
           strcmp(sqlstate, "57014") == 0 || strncmp(sqlstate, "57P0", 4) == 0 ||
           strncmp(sqlstate, "08", 2) == 0;
}

/* ====================================================================================
 * Options, lifecycle
 * ==================================================================================== */

void aamm_apply_options_init(struct aamm_apply_options *opts)
{
    memset(opts, 0, sizeof *opts);
    opts->max_queued_changes = 100000;
    opts->max_pipeline_txns = 1000;
    opts->lock_keys = true;
    opts->policy = AAMM_POLICY_LWW;
}

int aamm_apply_new(struct aamm_apply **out, const struct aamm_apply_options *opts)
{
    if (!out || !opts || !opts->conninfo || !opts->local_node || !opts->source_node ||
        opts->local_node == opts->source_node)
        return AAMM_EINVAL;
    struct aamm_apply *ap = aamm__calloc(1, sizeof *ap);
    if (!ap)
        return AAMM_ENOMEM;
    ap->opt = *opts;
    if (!ap->opt.max_queued_changes)
        ap->opt.max_queued_changes = 100000;
    if (!ap->opt.max_pipeline_txns)
        ap->opt.max_pipeline_txns = 1000;
    ap->conninfo = aamm__strdup(opts->conninfo);
    if (!ap->conninfo) {
        aamm__free(ap);
        return AAMM_ENOMEM;
    }
    ap->opt.conninfo = ap->conninfo;
    snprintf(ap->origin, sizeof ap->origin, "aamm_from_%" PRIu32, opts->source_node);
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

/* The session lost its prepared statements (new connection, DEALLOCATE ALL). */
static void forget_prepared(struct aamm_apply *ap)
{
    ap->fixed_prepared = false;
    for (int i = 0; i < ap->nmerged; i++)
        ap->merged[i].prepared = false;
    for (struct lrel *r = ap->rels; r; r = r->next)
        for (int i = 0; i < r->nstmts; i++)
            r->stmts[i].prepared = false;
}

/* Every transaction not committed goes out again from the first one, as if never sent. */
static void unsend_all(struct aamm_apply *ap)
{
    ap->cursor = ap->head;
    for (struct qtxn *q = ap->head; q; q = q->next) {
        if (q->done)
            continue;
        q->sent = false;
        q->failed = false;
        qtxn_drop_conflicts(q);
        q->sqlstate[0] = '\0';
        q->err_change = -1;
        q->err_plain = false;
        aamm__free(q->errmsg);
        q->errmsg = NULL;
    }
    ap->ninflight = 0;
    ap->fail_txn = NULL;
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
    for (struct lrel *r = ap->rels; r; r = r->next)
        r->catalog_pending = false;
    forget_prepared(ap);
    unsend_all(ap);
}

void aamm_apply_free(struct aamm_apply *ap)
{
    if (!ap)
        return;
    drop_conn(ap);
    while (ap->head) {
        struct qtxn *t = ap->head;
        ap->head = t->next;
        qtxn_free(t);
    }
    qtxn_free(ap->open);
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

static int add_policy(struct aamm_apply *ap, const char *schema, const char *name, int policy,
                      aamm_resolver_fn fn, void *arg);

int aamm_apply_set_policy(struct aamm_apply *ap, const char *schema, const char *name,
                          enum aamm_conflict_policy policy)
{
    if (!schema || !name || (int)policy < 0 || policy > AAMM_POLICY_ERROR)
        return AAMM_EINVAL;
    return add_policy(ap, schema, name, (int)policy, NULL, NULL);
}

int aamm_apply_set_resolver(struct aamm_apply *ap, const char *schema, const char *name,
                            aamm_resolver_fn fn, void *arg)
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
                      aamm_resolver_fn fn, void *arg)
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

/* The relation's policy entry (the newest), or NULL. */
static const struct policy *policy_entry(const struct aamm_apply *ap, const struct lrel *r)
{
    for (const struct policy *p = ap->policies; p; p = p->next)
        if (strcmp(p->schema, r->rel.schema) == 0 && strcmp(p->name, r->rel.name) == 0)
            return p->policy >= 0 ? p : NULL; /* -1: resolver removed, global rules */
    return NULL;
}

static int policy_of(const struct aamm_apply *ap, const struct lrel *r)
{
    const struct policy *p = policy_entry(ap, r);
    if (p)
        return p->policy;
    return ap->resolver ? AAMM_POLICY_CALLBACK : (int)ap->opt.policy;
}

/* The resolver for @r (and its argument), or NULL. */
static aamm_resolver_fn resolver_of(const struct aamm_apply *ap, const struct lrel *r, void **arg)
{
    const struct policy *p = policy_entry(ap, r);
    if (p) {
        *arg = p->arg;
        return p->policy == AAMM_POLICY_CALLBACK ? p->fn : NULL;
    }
    *arg = ap->resolver_arg;
    return ap->resolver;
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
        struct aamm__sb q = {0}, l = {0};
        aamm__sb_ident(&q, src->schema);
        aamm__sb_add(&q, ".");
        aamm__sb_ident(&q, src->name);
        aamm__sb_label(&l, src->schema);
        aamm__sb_add(&l, ".");
        aamm__sb_label(&l, src->name);
        if (q.oom || l.oom) {
            aamm__free(q.s);
            aamm__free(l.s);
            aamm_relation_clear(&found->rel);
            aamm__free(found);
            return NULL;
        }
        found->qname = q.s;
        found->label = l.s;
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
    /* back-pressure, but never against the open transaction alone */
    if (ap->nqueued_changes >= ap->opt.max_queued_changes && ap->head)
        return AAMM_EBUSY;
    struct qtxn *t = ap->open;
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
    t->hdr.end_lsn = txn->end_lsn;
    t->hdr.commit_lsn = txn->commit_lsn;
    t->hdr.commit_time = txn->commit_time;
    t->closed = true;
    ap->open = NULL;
    if (!ap->cursor)
        ap->cursor = t;
    if (ap->tail)
        ap->tail->next = t;
    else
        ap->head = t;
    ap->tail = t;
    ap->ntxns++;
    return 0;
}

/* ====================================================================================
 * Catalog mapping
 * ==================================================================================== */

static const char catalog_sql[] =
    "SELECT a.attname, pg_catalog.format_type(a.atttypid, NULL),\n"
    "  COALESCE((SELECT k.ord FROM pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(n, ord)\n"
    "            WHERE k.n = a.attnum), 0),\n"
    "  a.attgenerated <> '',\n"
    "  a.atthasdef AND pg_catalog.pg_get_expr(d.adbin, d.adrelid) OPERATOR(pg_catalog.~*)\n"
    "   '(nextval|now|random|clock_timestamp|uuid|current_timestamp|timeofday|"
    "statement_timestamp|transaction_timestamp)'\n"
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace\n"
    "JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0\n"
    "  AND NOT a.attisdropped\n"
    "LEFT JOIN pg_catalog.pg_index i ON i.indrelid = c.oid AND i.indisprimary\n"
    "LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum\n"
    "WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')\n"
    "ORDER BY a.attnum";

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

static void map_result(struct lrel *r, PGresult *res)
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
 * Statement text
 * ==================================================================================== */

/* While transactions are in flight, the flushed position is re-read at most this often. */
#define PROGRESS_EVERY_MS 20

/* Parameters: $1 commit time, $2 source node, $3 relation label, $4 policy (or verdict),
 * $5 the session origin's roident, then values. */
#define NFIXED 4
#define NFIXED_ALL 5

static void sb_param(struct aamm__sb *b, const struct lrel *r, int rcol, int pno)
{
    aamm__sb_add(b, b->batch ? "s.p%d::%s" : "$%d::%s", pno,
                 r->lcols[r->r2l[rcol] >= 0 ? r->r2l[rcol] : 0].type);
}

/* the key columns' param numbers live in @kparam (per key position) */
static void sb_keyjson(struct aamm__sb *b, const struct lrel *r, const int *kparam)
{
    aamm__sb_add(b, "pg_catalog.jsonb_build_array(");
    for (int k = 0; k < r->nkeys; k++) {
        aamm__sb_add(b, "%s", k ? ", " : "");
        sb_param(b, r, r->key_r[k], kparam[k]);
    }
    aamm__sb_add(b, ")");
}

static void sb_keywhere(struct aamm__sb *b, const struct lrel *r, const char *alias,
                        const int *kparam)
{
    for (int k = 0; k < r->nkeys; k++) {
        int rc = r->key_r[k];
        aamm__sb_add(b, "%s%s.", k ? " AND " : "", alias);
        aamm__sb_ident(b, r->rel.columns[rc].name);
        aamm__sb_add(b, " = $%d::%s", kparam[k], r->lcols[r->r2l[rc] >= 0 ? r->r2l[rc] : 0].type);
    }
}

/* remote row as JSON (columns written), or NULL for very wide rows (argument limit) */
static void sb_rowjson(struct aamm__sb *b, const struct lrel *r, const char *mask,
                       const int *vparam)
{
    int n = 0;
    for (uint32_t c = 0; c < r->rel.ncolumns; c++)
        n += mask[c] == '1';
    if (n == 0 || n > 45) {
        aamm__sb_add(b, "NULL::jsonb");
        return;
    }
    aamm__sb_add(b, "pg_catalog.jsonb_build_object(");
    int i = 0;
    for (uint32_t c = 0; c < r->rel.ncolumns; c++) {
        if (mask[c] != '1')
            continue;
        aamm__sb_add(b, "%s", i++ ? ", " : "");
        aamm__sb_literal(b, r->rel.columns[c].name);
        aamm__sb_add(b, ", ");
        sb_param(b, r, (int)c, vparam[c]);
    }
    aamm__sb_add(b, ")");
}

/*
 * @sql with every parameter $N outside quotes rewritten: as ($1[N]) when @as_array (the text
 * a PL/pgSQL EXECUTE ... USING <text[] of the parameters> runs), else as $(N + @offset).
 * Text inside literals (update_missing_exec's statement) is left alone. NULL: no memory.
 */
static char *rewrite_params(const char *sql, bool as_array, int offset)
{
    struct aamm__sb b = {0};
    char q = 0;
    for (const char *c = sql; *c; c++) {
        if (q) {
            if (*c == q)
                q = 0;
            aamm__sb_add(&b, "%c", *c);
        } else if (*c == '"' || *c == '\'') {
            q = *c;
            aamm__sb_add(&b, "%c", *c);
        } else if (*c == '$' && c[1] >= '1' && c[1] <= '9') {
            char *end;
            long n = strtol(c + 1, &end, 10);
            if (as_array)
                aamm__sb_add(&b, "($1[%ld])", n);
            else
                aamm__sb_add(&b, "$%ld", n + offset);
            c = end - 1;
        } else {
            aamm__sb_add(&b, "%c", *c);
        }
    }
    if (b.oom) {
        aamm__free(b.s);
        return NULL;
    }
    return b.s;
}

/* The statement for one change (@cte 0), or its items c<cte> [, m<cte>] for the WITH list
 * of a transaction's merged statement. */
/* The fast-path test of the local row version: written by this source's origin, or of
 * unknown age (no commit timestamp). Either way no conflict and no decision. The record's
 * fields are NULL together, so one call answers both. */
static const char same_origin_sql[] =
    "COALESCE((pg_catalog.pg_xact_commit_timestamp_origin(t.xmin)).roident, $5::oid) "
    "OPERATOR(pg_catalog.=) $5::oid";

/* Whether an UPDATE of shape @mask moves its row to another key: the old key travels and
 * every key column is written (prep_row() sends the old key only when its text differs). */
static bool moves_key(const struct lrel *r, const char *mask)
{
    uint32_t nc = r->rel.ncolumns;
    if (mask[nc] != 'k' && mask[nc] != 'K')
        return false;
    for (int k = 0; k < r->nkeys; k++)
        if (mask[r->key_r[k]] != '1')
            return false;
    return true;
}

/* The tombstone apply leaves for the key in @kparam: a remote DELETE's, or (@vparam not
 * NULL) a key-changing UPDATE's old key unless the new key equals it. The tombstone
 * triggers fire for local writers only (session_replication_role = replica skips them). */
static void sb_tomb(struct aamm__sb *b, const struct lrel *r, const int *kparam, const int *vparam)
{
    aamm__sb_add(b, "(");
    if (vparam) {
        int *nk = aamm__calloc((size_t)r->nkeys + 1, sizeof *nk);
        if (!nk) {
            b->oom = true;
            return;
        }
        for (int k = 0; k < r->nkeys; k++)
            nk[k] = vparam[r->key_r[k]];
        sb_keyjson(b, r, kparam);
        aamm__sb_add(b, " IS NOT DISTINCT FROM ");
        sb_keyjson(b, r, nk);
        aamm__sb_add(b, " OR ");
        aamm__free(nk);
    }
    aamm__sb_add(b, "aamm.put_tombstone($3, ");
    sb_keyjson(b, r, kparam);
    aamm__sb_add(b, ", $1::timestamptz, $2::int))");
}

/* The parameter numbers of a change of shape @mask: per remote column its value's (0:
 * not written) in *@vparam, per key column its key value's in *@kparam (the old key for
 * a DELETE or a key change, else the new value's); *@next: the first number after them.
 * Returns false when out of memory. */
static bool number_params(const struct lrel *r, int op, const char *mask, int **vparam,
                          int **kparam, int *next)
{
    uint32_t nc = r->rel.ncolumns;
    int *v = aamm__calloc(nc + 1, sizeof *v);
    int *k = aamm__calloc((size_t)r->nkeys + 1, sizeof *k);
    if (!v || !k) {
        aamm__free(v);
        aamm__free(k);
        return false;
    }
    int p = NFIXED_ALL + 1;
    for (uint32_t c = 0; c < nc; c++)
        if (mask[c] == '1')
            v[c] = p++;
    bool oldkey = mask[nc] == 'k' || mask[nc] == 'K';
    for (int i = 0; i < r->nkeys; i++)
        k[i] = (op == OP_DELETE || oldkey) ? p++ : v[r->key_r[i]];
    *vparam = v;
    *kparam = k;
    *next = p;
    return true;
}

/* The written columns of shape @mask: their names (@names), their values (@vparam), or
 * both as "name = value" (@names and @vparam), comma-separated. */
static void sb_written(struct aamm__sb *b, const struct lrel *r, const char *mask, bool names,
                       const int *vparam)
{
    int i = 0;
    for (uint32_t c = 0; c < r->rel.ncolumns; c++) {
        if (mask[c] != '1')
            continue;
        aamm__sb_add(b, "%s", i++ ? ", " : "");
        if (names)
            aamm__sb_ident(b, r->rel.columns[c].name);
        if (names && vparam)
            aamm__sb_add(b, " = ");
        if (vparam)
            sb_param(b, r, (int)c, vparam[c]);
    }
}

/* "INSERT INTO <table> [AS t] (<written columns>) SELECT <their values>" */
static void sb_insert_head(struct aamm__sb *b, const struct lrel *r, const char *mask,
                           const int *vparam, bool alias)
{
    aamm__sb_add(b, "INSERT INTO %s%s (", r->qname, alias ? " AS t" : "");
    sb_written(b, r, mask, true, NULL);
    aamm__sb_add(b, ") SELECT ");
    sb_written(b, r, mask, false, vparam);
}

/* "UPDATE <table> AS t SET <written column> = <value>, ... WHERE <key>" */
static void sb_update_head(struct aamm__sb *b, const struct lrel *r, const char *mask,
                           const int *vparam, const int *kparam)
{
    aamm__sb_add(b, "UPDATE %s AS t SET ", r->qname);
    sb_written(b, r, mask, true, vparam);
    aamm__sb_add(b, " WHERE ");
    sb_keywhere(b, r, "t", kparam);
}

/* the key columns' names, comma-separated (an ON CONFLICT target) */
static void sb_keycols(struct aamm__sb *b, const struct lrel *r)
{
    for (int k = 0; k < r->nkeys; k++) {
        aamm__sb_add(b, "%s", k ? ", " : "");
        aamm__sb_ident(b, r->rel.columns[r->key_r[k]].name);
    }
}

/* " WHERE <the key is not remembered as deleted>": no tombstone in the relation at all
 * (one probe per statement), or none for the key */
static void sb_not_tombstoned(struct aamm__sb *b, const struct lrel *r, const int *kparam)
{
    aamm__sb_add(b, " WHERE NOT EXISTS (SELECT 1 FROM aamm.tombstone tb0 WHERE tb0.relation "
                    "OPERATOR(pg_catalog.=) $3) OR NOT EXISTS (SELECT 1 FROM aamm.tombstone tb "
                    "WHERE tb.relation OPERATOR(pg_catalog.=) $3 AND tb.key "
                    "OPERATOR(pg_catalog.=) ");
    sb_keyjson(b, r, kparam);
    aamm__sb_add(b, ")");
}

/* The recheck after a write that inserted a row with the key in @kparam (NULL: @keys, an
 * expression for the jsonb[] of the inserted keys): aamm.recheck_tombs() raises AA006 when
 * a delete of one of them committed while the insert waited for the deleting transaction
 * (the decision, made in the statement's snapshot, could not see it). @upd: the rule of
 * update_missing. */
static void sb_recheck(struct aamm__sb *b, const struct lrel *r, const int *kparam,
                       const char *keys, bool upd)
{
    aamm__sb_add(b, "aamm.recheck_tombs($3, ");
    if (kparam) {
        aamm__sb_add(b, "ARRAY[");
        sb_keyjson(b, r, kparam);
        aamm__sb_add(b, "]");
    } else {
        aamm__sb_add(b, "%s", keys);
    }
    aamm__sb_add(b, ", $1::timestamptz, $2::int, $4, %s)", upd ? "true" : "false");
}

/*
 * The whole statement for the change kind @op, with every conflict check and decision
 * (doc/conflicts.md): what aamm.apply_slow() runs when the fast statement (build_sql())
 * wrote nothing, and the statements for runs of inserts (OP_INSERT_MANY, _PLAIN).
 */
static char *build_full(const struct lrel *r, int op, const char *mask, bool has_u)
{
    struct aamm__sb b = {0};
    uint32_t nc = r->rel.ncolumns;
    int *vparam, *kparam, p;
    if (!number_params(r, op, mask, &vparam, &kparam, &p))
        return NULL;
    bool oldkey = mask[nc] == 'k' || mask[nc] == 'K';

    if (op == OP_INSERT || op == OP_INSERT_MANY || op == OP_INSERT_PLAIN) {
        /* OP_INSERT_MANY: a run of inserts with distinct keys, one text[] per written
         * column, unnested and cast. The tombstone probe runs only when the relation has
         * tombstones, the decision functions only for the rows that meet a tombstone or an
         * existing key. OP_INSERT_PLAIN: the same run without ON CONFLICT, which costs an
         * index probe per row before the insert's own: a present key fails the statement
         * (23505) and the relation's runs go out as OP_INSERT_MANY from then on. */
        bool many = op == OP_INSERT_MANY || op == OP_INSERT_PLAIN;
        b.batch = many;
        aamm__sb_add(&b, "WITH i AS (");
        sb_insert_head(&b, r, mask, vparam, true);
        int i;
        if (many) {
            aamm__sb_add(&b, " FROM ROWS FROM (");
            i = 0;
            for (uint32_t c = 0; c < nc; c++)
                if (mask[c] == '1')
                    aamm__sb_add(&b, "%spg_catalog.unnest($%d::text[])", i++ ? ", " : "",
                                 vparam[c]);
            aamm__sb_add(&b, ") AS s(");
            i = 0;
            for (uint32_t c = 0; c < nc; c++)
                if (mask[c] == '1')
                    aamm__sb_add(&b, "%sp%d", i++ ? ", " : "", vparam[c]);
            aamm__sb_add(&b, ")");
        }
        sb_not_tombstoned(&b, r, kparam);
        aamm__sb_add(&b, " OR aamm.insert_ok($3, ");
        sb_keyjson(&b, r, kparam);
        aamm__sb_add(&b, ", $1::timestamptz, $2::int, ");
        sb_rowjson(&b, r, mask, vparam);
        aamm__sb_add(&b, ", $4)");
        b.batch = false;
        if (op != OP_INSERT_PLAIN) {
            aamm__sb_add(&b, " ON CONFLICT (");
            sb_keycols(&b, r);
            aamm__sb_add(&b, ") DO UPDATE SET ");
            i = 0;
            for (uint32_t c = 0; c < nc; c++)
                if (mask[c] == '1') {
                    aamm__sb_add(&b, "%s", i++ ? ", " : "");
                    aamm__sb_ident(&b, r->rel.columns[c].name);
                    aamm__sb_add(&b, " = EXCLUDED.");
                    aamm__sb_ident(&b, r->rel.columns[c].name);
                }
            aamm__sb_add(&b,
                         " WHERE aamm.decide('insert_exists', $3, pg_catalog.jsonb_build_array(");
            for (int k = 0; k < r->nkeys; k++) {
                aamm__sb_add(&b, "%sEXCLUDED.", k ? ", " : "");
                aamm__sb_ident(&b, r->rel.columns[r->key_r[k]].name);
            }
            aamm__sb_add(&b, "), t.xmin, pg_catalog.to_jsonb(t), pg_catalog.to_jsonb(EXCLUDED), "
                             "$1::timestamptz, $2::int, $4)");
        }
        /* the keys written (a row the ON CONFLICT clause updated instead was decided on
         * against its latest version, and the check below cannot misjudge it: a remembered
         * delete the decision saw would have stopped the write) */
        if (many) {
            aamm__sb_add(&b, " RETURNING pg_catalog.jsonb_build_array(");
            for (int k = 0; k < r->nkeys; k++) {
                aamm__sb_add(&b, "%st.", k ? ", " : "");
                aamm__sb_ident(&b, r->rel.columns[r->key_r[k]].name);
            }
            aamm__sb_add(&b, ") AS k) SELECT ");
            sb_recheck(&b, r, NULL, "(SELECT pg_catalog.array_agg(i.k) FROM i)", false);
        } else {
            aamm__sb_add(&b, " RETURNING 1) SELECT CASE WHEN EXISTS (SELECT 1 FROM i) THEN ");
            sb_recheck(&b, r, kparam, NULL, false);
            aamm__sb_add(&b, " END");
        }
    } else if (op == OP_UPDATE) {
        /* the decision is evaluated on the row version being updated (a concurrent writer
         * makes the UPDATE re-check it on the newer version); a key change leaves a
         * tombstone on the old key, the statement then returning a row when it updated one
         * (apply_slow() counts it) */
        bool moves = moves_key(r, mask);
        aamm__sb_add(&b, "%s", moves ? "WITH u AS (" : "");
        sb_update_head(&b, r, mask, vparam, kparam);
        aamm__sb_add(&b, " AND (%s OR aamm.decide('update_origin_differs', $3, ", same_origin_sql);
        sb_keyjson(&b, r, kparam);
        aamm__sb_add(&b, ", t.xmin, pg_catalog.to_jsonb(t), ");
        sb_rowjson(&b, r, mask, vparam);
        aamm__sb_add(&b, ", $1::timestamptz, $2::int, $4))");
        if (moves) {
            aamm__sb_add(&b, " RETURNING 1) SELECT ");
            sb_tomb(&b, r, kparam, vparam);
            aamm__sb_add(&b, " FROM u");
        }
    } else if (op == OP_UPDATE_MISSING) {
        /* a statement of its own after the UPDATE, so its snapshot sees what the UPDATE
         * did and what concurrent writers committed meanwhile (a row deleted under it) */
        aamm__sb_add(&b, "WITH i AS (");
        sb_insert_head(&b, r, mask, vparam, false);
        aamm__sb_add(&b, " WHERE NOT EXISTS (SELECT 1 FROM %s t2 WHERE ", r->qname);
        sb_keywhere(&b, r, "t2", kparam);
        aamm__sb_add(&b, ")");
        if (oldkey) { /* nor the new key (the UPDATE moved the row there) */
            int *nk = aamm__calloc((size_t)r->nkeys + 1, sizeof *nk);
            if (!nk)
                b.oom = true;
            for (int k = 0; nk && k < r->nkeys; k++)
                nk[k] = vparam[r->key_r[k]];
            aamm__sb_add(&b, " AND NOT EXISTS (SELECT 1 FROM %s t3 WHERE ", r->qname);
            if (nk)
                sb_keywhere(&b, r, "t3", nk);
            aamm__sb_add(&b, ")");
            aamm__free(nk);
        }
        aamm__sb_add(&b, " AND aamm.update_missing($3, ");
        sb_keyjson(&b, r, kparam);
        aamm__sb_add(&b, ", $1::timestamptz, $2::int, ");
        sb_rowjson(&b, r, mask, vparam);
        /* a key present now was written after the snapshot the checks above read (a
         * concurrent insert the statement waited for): the update must be decided against
         * that row, so the transaction is retried (aamm.write_raced(), AA006); likewise a
         * delete committed meanwhile (sb_recheck()) */
        aamm__sb_add(&b, ", %s, $4) ON CONFLICT (", has_u ? "true" : "false");
        sb_keycols(&b, r);
        aamm__sb_add(&b, ") DO UPDATE SET ");
        aamm__sb_ident(&b, r->rel.columns[r->key_r[0]].name);
        aamm__sb_add(&b, " = EXCLUDED.");
        aamm__sb_ident(&b, r->rel.columns[r->key_r[0]].name);
        aamm__sb_add(&b, " WHERE aamm.write_raced($3, ");
        sb_keyjson(&b, r, kparam);
        aamm__sb_add(&b, ") RETURNING 1) SELECT CASE WHEN EXISTS (SELECT 1 FROM i) THEN ");
        sb_recheck(&b, r, kparam, NULL, true);
        aamm__sb_add(&b, " END");
    } else {
        aamm__sb_add(&b, "WITH d AS (DELETE FROM %s AS t WHERE ", r->qname);
        sb_keywhere(&b, r, "t", kparam);
        aamm__sb_add(&b, " AND aamm.decide('delete_origin_differs', $3, ");
        sb_keyjson(&b, r, kparam);
        aamm__sb_add(&b, ", t.xmin, pg_catalog.to_jsonb(t), NULL, $1::timestamptz, $2::int, $4) "
                         "RETURNING 1) SELECT CASE WHEN EXISTS (SELECT 1 FROM d) THEN ");
        sb_tomb(&b, r, kparam, NULL);
        aamm__sb_add(&b, " WHEN NOT EXISTS (SELECT 1 FROM %s t2 WHERE ", r->qname);
        sb_keywhere(&b, r, "t2", kparam);
        aamm__sb_add(&b, ") THEN aamm.delete_missing($3, ");
        sb_keyjson(&b, r, kparam);
        aamm__sb_add(&b, ", $1::timestamptz, $2::int, NULL) END");
    }
    aamm__free(vparam);
    aamm__free(kparam);
    if (b.oom) {
        aamm__free(b.s);
        return NULL;
    }
    return b.s;
}

/*
 * The statement for one row change (@cte 0), or its items c<cte>, m<cte> for the WITH list
 * of a transaction's merged statement; OP_INSERT_MANY: build_full().
 *
 * c is the fast statement: it writes only when there is nothing to decide (an insert of a
 * key that is neither present nor remembered as deleted; an update or delete of a row this
 * source wrote, or of unknown age). Its expressions stay small because a prepared
 * statement's executor start-up builds every one of them at every execution. When it wrote
 * nothing, m hands the whole statement (build_full()) and the parameters to
 * aamm.apply_slow(), which runs it as a statement of its own (a fresh snapshot: it sees
 * what concurrent writers committed meanwhile) and, for an UPDATE that changed no row, the
 * update_missing INSERT after it.
 */
static char *build_sql(const struct lrel *r, int op, const char *mask, bool has_u, int cte)
{
    if (op == OP_INSERT_MANY || op == OP_INSERT_PLAIN || op == OP_UPDATE_MISSING)
        return build_full(r, op, mask, has_u);
    struct aamm__sb b = {0};
    int *vparam = NULL, *kparam = NULL, p = 0;
    if (!number_params(r, op, mask, &vparam, &kparam, &p))
        b.oom = true;
    char *full = build_full(r, op, mask, has_u);
    char *miss = op == OP_UPDATE ? build_full(r, OP_UPDATE_MISSING, mask, has_u) : NULL;
    char *dfull = full ? rewrite_params(full, true, 0) : NULL;
    char *dmiss = miss ? rewrite_params(miss, true, 0) : NULL;
    if (!dfull || (op == OP_UPDATE && !dmiss))
        b.oom = true;
    aamm__free(full);
    aamm__free(miss);
    if (cte)
        aamm__sb_add(&b, "c%d AS (", cte);
    else
        aamm__sb_add(&b, "WITH c0 AS (");
    if (b.oom) {
        /* nothing more to build */
    } else if (op == OP_INSERT) {
        sb_insert_head(&b, r, mask, vparam, true);
        sb_not_tombstoned(&b, r, kparam);
        aamm__sb_add(&b, " ON CONFLICT (");
        sb_keycols(&b, r);
        aamm__sb_add(&b, ") DO NOTHING RETURNING 1)");
    } else if (op == OP_UPDATE) {
        sb_update_head(&b, r, mask, vparam, kparam);
        aamm__sb_add(&b, " AND %s RETURNING 1)", same_origin_sql);
    } else {
        aamm__sb_add(&b, "DELETE FROM %s AS t WHERE ", r->qname);
        sb_keywhere(&b, r, "t", kparam);
        aamm__sb_add(&b, " AND %s RETURNING 1)", same_origin_sql);
    }
    /* a DELETE or key-changing UPDATE that wrote leaves its tombstone; one that did not
     * takes the slow path */
    bool tomb = !b.oom && (op == OP_DELETE || (op == OP_UPDATE && moves_key(r, mask)));
    /* an INSERT that wrote checks that no delete committed while it waited (sb_recheck()) */
    bool then = tomb || (!b.oom && op == OP_INSERT);
    if (cte)
        aamm__sb_add(&b, ", m%d AS (", cte);
    if (then) {
        aamm__sb_add(&b, " SELECT CASE WHEN EXISTS (SELECT 1 FROM c%d) THEN ", cte);
        if (tomb)
            sb_tomb(&b, r, kparam, op == OP_UPDATE ? vparam : NULL);
        else
            sb_recheck(&b, r, kparam, NULL, false);
        aamm__sb_add(&b, " ELSE");
    }
    aamm__sb_add(&b, " %saamm.apply_slow(", then ? "" : "SELECT ");
    aamm__sb_literal(&b, dfull ? dfull : "");
    aamm__sb_add(&b, ", ");
    if (dmiss)
        aamm__sb_literal(&b, dmiss);
    else
        aamm__sb_add(&b, "NULL");
    aamm__sb_add(&b, ", ARRAY[");
    for (int pi = 1; pi < p; pi++)
        aamm__sb_add(&b, "%s$%d", pi > 1 ? ", " : "", pi);
    if (then)
        aamm__sb_add(&b, "]::text[]) END AS x%s", cte ? ")" : "");
    else
        aamm__sb_add(&b, "]::text[]) AS x WHERE NOT EXISTS (SELECT 1 FROM c%d)%s", cte,
                     cte ? ")" : "");
    aamm__free(dfull);
    aamm__free(dmiss);
    aamm__free(vparam);
    aamm__free(kparam);
    if (b.oom) {
        aamm__free(b.s);
        return NULL;
    }
    return b.s;
}

/* ====================================================================================
 * Sending
 * ==================================================================================== */

static int conn_error(struct aamm_apply *ap, const char *what)
{
    AAMM_WARN("apply: %s: connection problem: %s", what, PQerrorMessage(ap->conn));
    aamm__errf(&ap->err, AAMM_ECONN, "apply: %s: %s", what, PQerrorMessage(ap->conn));
    drop_conn(ap);
    ap->state = S_WAIT;
    ap->wake_ms = aamm__now_ms() + ap->backoff_ms;
    if (ap->backoff_ms < 2000)
        ap->backoff_ms *= 2;
    return 0;
}

/* The statement for one change: the mask says which remote columns are written. */
static struct stmt *stmt_for(struct aamm_apply *ap, struct qtxn *t, long idx, struct lrel *r,
                             int op, const char *mask, bool has_u, int *rc)
{
    for (int i = 0; i < r->nstmts; i++)
        if (r->stmts[i].op == op && strcmp(r->stmts[i].mask, mask) == 0) {
            if (r->stmts[i].prepared)
                return &r->stmts[i];
            break;
        }
    struct stmt *s = NULL;
    for (int i = 0; i < r->nstmts; i++)
        if (r->stmts[i].op == op && strcmp(r->stmts[i].mask, mask) == 0)
            s = &r->stmts[i];
    if (!s) {
        struct stmt *ns = aamm__realloc(r->stmts, (size_t)(r->nstmts + 1) * sizeof *ns);
        if (!ns) {
            *rc = AAMM_ENOMEM;
            return NULL;
        }
        r->stmts = ns;
        s = &r->stmts[r->nstmts];
        memset(s, 0, sizeof *s);
        s->op = op;
        s->mask = aamm__strdup(mask);
        if (!s->mask) {
            *rc = AAMM_ENOMEM;
            return NULL;
        }
        snprintf(s->name, sizeof s->name, "aamm_%d_%d_%d", r->id, op, r->nstmts);
        r->nstmts++;
    }
    char *sql = build_sql(r, op, mask, has_u, 0);
    if (!sql) {
        *rc = AAMM_ENOMEM;
        return NULL;
    }
    /* the fixed parameters are declared text (the statement casts each), so a statement
     * that does not use one still prepares */
    /* a single-change statement hands its parameters on as one text[] (build_sql()):
     * every one of them is text */
    int ntyped = NFIXED_ALL, *vparam, *kparam;
    if (op != OP_INSERT_MANY && op != OP_INSERT_PLAIN) {
        if (!number_params(r, op, mask, &vparam, &kparam, &ntyped)) {
            aamm__free(sql);
            *rc = AAMM_ENOMEM;
            return NULL;
        }
        ntyped--; /* the next number after them */
        aamm__free(vparam);
        aamm__free(kparam);
    }
    Oid *types = aamm__malloc((size_t)ntyped * sizeof *types);
    if (!types) {
        aamm__free(sql);
        *rc = AAMM_ENOMEM;
        return NULL;
    }
    for (int i = 0; i < ntyped; i++)
        types[i] = 25; /* text */
    int ok = PQsendPrepare(ap->conn, s->name, sql, ntyped, types);
    aamm__free(types);
    aamm__free(sql);
    if (!ok || !exp_push(ap, E_PREPARE, t, r, idx)) {
        *rc = ok ? AAMM_ENOMEM : AAMM_ECONN;
        return NULL;
    }
    s->prepared = true;
    return s;
}

/* the cached (or newly prepared) statement for @op and @mask */
static struct stmt *get_stmt(struct aamm_apply *ap, struct qtxn *t, long idx, struct lrel *r,
                             int op, const char *mask, bool has_u, int *rc)
{
    for (int i = 0; i < r->nstmts; i++)
        if (r->stmts[i].op == op && r->stmts[i].prepared && strcmp(r->stmts[i].mask, mask) == 0)
            return &r->stmts[i];
    return stmt_for(ap, t, idx, r, op, mask, has_u, rc);
}

/* FNV-1a, continued from @h */
static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *c = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ c[i]) * UINT64_C(1099511628211);
    return h;
}

#define FNV_INIT UINT64_C(14695981039346656037)

/* The advisory lock id of one key: FNV-1a of the relation label and the key texts, the
 * same on every applier of this node since values arrive in pinned formats. */
static int64_t key_lock_id(const struct lrel *r, const struct aamm_tuple *kt)
{
    uint64_t h = fnv(FNV_INIT, r->label, strlen(r->label));
    for (int k = 0; k < r->nkeys; k++) {
        const struct aamm_value *v = &kt->values[r->key_r[k]];
        h = fnv(h, "\x1f", 1);
        if (v->data)
            h = fnv(h, v->data, v->len);
    }
    return (int64_t)h;
}

int64_t aamm__apply_lock_id(const char *label, const char *const *keys, int nkeys)
{
    uint64_t h = fnv(FNV_INIT, label, strlen(label));
    for (int k = 0; k < nkeys; k++) {
        h = fnv(h, "\x1f", 1);
        if (keys[k])
            h = fnv(h, keys[k], strlen(keys[k]));
    }
    return (int64_t)h;
}

/* The advisory lock id of a whole relation (a prefix no key hash starts from). */
static int64_t rel_lock_id(const struct lrel *r)
{
    uint64_t h = fnv(FNV_INIT,
                     "\x1e"
                     "relation",
                     9);
    return (int64_t)fnv(h, r->label, strlen(r->label));
}

/* A relation with more keys than this in one transaction is locked as a whole. */
#define KEYLOCKS_PER_REL 64

struct lockreq {
    int64_t id;
    const struct lrel *rel; /* key locks: their relation; relation locks: NULL */
    bool exclusive;
    bool dropped; /* a key lock covered by its relation's exclusive lock */
};

static int lockreq_cmp(const void *a, const void *b)
{
    const struct lockreq *x = a, *y = b;
    return x->id < y->id ? -1 : x->id > y->id;
}

static bool lockreq_push(struct lockreq **v, size_t *n, size_t *cap, struct lockreq lr)
{
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 64;
        struct lockreq *nv = aamm__realloc(*v, nc * sizeof *nv);
        if (!nv)
            return false;
        *v = nv;
        *cap = nc;
    }
    (*v)[(*n)++] = lr;
    return true;
}

/*
 * The locks transaction @t takes before its first change, in one statement: per key an
 * exclusive lock under a shared lock of its relation, or for a relation with more than
 * KEYLOCKS_PER_REL keys in @t one exclusive lock of the relation (so a big transaction
 * holds a bounded number of locks). Every applier takes its locks in ascending id order,
 * so appliers cannot deadlock on them. Appends the two array literals (ids, modes) to
 * @ids and @modes.
 */
static int build_locks(const struct qtxn *t, struct aamm__sb *ids, struct aamm__sb *modes)
{
    size_t cap = 0, n = 0;
    struct lockreq *v = NULL;
    bool ok = true;
    for (size_t i = 0; i < t->n && ok; i++) {
        const struct aamm_change *c = &t->changes[i];
        if (c->kind != AAMM_CHANGE_INSERT && c->kind != AAMM_CHANGE_UPDATE &&
            c->kind != AAMM_CHANGE_DELETE)
            continue;
        const struct lrel *r = lrel_of(c->relation);
        const struct aamm_tuple *ot = c->old_kind != AAMM_OLD_NONE ? &c->old_tuple : NULL;
        const struct aamm_tuple *kt[2] = {c->kind == AAMM_CHANGE_DELETE || ot ? ot : &c->new_tuple,
                                          c->kind == AAMM_CHANGE_UPDATE && ot ? &c->new_tuple
                                                                              : NULL};
        for (int j = 0; j < 2 && ok; j++)
            if (kt[j] && kt[j]->nvalues == r->rel.ncolumns)
                ok = lockreq_push(&v, &n, &cap,
                                  (struct lockreq){key_lock_id(r, kt[j]), r, true, false});
    }
    /* per relation: its key count decides between key locks and one relation lock
     * (a transaction touches few relations: a short list, not a table) */
    size_t nk = n;
    const struct lrel *rels[16];
    size_t cnt[16];
    int nr = 0;
    bool overflow = false;
    for (size_t i = 0; i < nk; i++) {
        int j = 0;
        while (j < nr && rels[j] != v[i].rel)
            j++;
        if (j == nr) {
            if (nr == 16) {
                overflow = true;
                continue;
            }
            rels[nr] = v[i].rel;
            cnt[nr++] = 0;
        }
        cnt[j]++;
    }
    if (overflow) { /* many relations: count them the slow way */
        nr = 0;
        for (size_t i = 0; i < nk && ok; i++) {
            bool first = true;
            size_t c = 0;
            for (size_t j = 0; j < nk; j++) {
                if (v[j].rel == v[i].rel && j < i)
                    first = false;
                c += v[j].rel == v[i].rel;
            }
            if (!first)
                continue;
            bool whole = c > KEYLOCKS_PER_REL;
            for (size_t j = 0; whole && j < nk; j++)
                if (v[j].rel == v[i].rel)
                    v[j].dropped = true;
            ok = lockreq_push(&v, &n, &cap,
                              (struct lockreq){rel_lock_id(v[i].rel), NULL, whole, false});
        }
    }
    for (int j = 0; j < nr && ok; j++) {
        bool whole = cnt[j] > KEYLOCKS_PER_REL;
        for (size_t i = 0; whole && i < nk; i++)
            if (v[i].rel == rels[j])
                v[i].dropped = true;
        ok = lockreq_push(&v, &n, &cap, (struct lockreq){rel_lock_id(rels[j]), NULL, whole, false});
    }
    if (ok) {
        if (n > 1)
            qsort(v, n, sizeof *v, lockreq_cmp);
        aamm__sb_add(ids, "{");
        aamm__sb_add(modes, "{");
        bool first = true;
        int64_t last = 0;
        for (size_t i = 0; i < n; i++) {
            if (v[i].dropped || (!first && v[i].id == last))
                continue;
            last = v[i].id;
            bool ex = v[i].exclusive; /* one id asked in both modes: exclusive */
            for (size_t j = i + 1; j < n && v[j].id == v[i].id; j++)
                ex = ex || (v[j].exclusive && !v[j].dropped);
            aamm__sb_add(ids, "%s%" PRId64, first ? "" : ",", v[i].id);
            aamm__sb_add(modes, "%s%c", first ? "" : ",", ex ? 't' : 'f');
            first = false;
        }
        aamm__sb_add(ids, "}");
        aamm__sb_add(modes, "}");
        ok = !ids->oom && !modes->oom;
    }
    aamm__free(v);
    return ok ? 0 : AAMM_ENOMEM;
}

static int ensure_scratch(struct aamm_apply *ap, uint32_t nc);
static int prep_row(struct aamm_apply *ap, struct qtxn *t, long idx, const char **fixed, char *mask,
                    const char **vals, int *np_out, int *op_out, bool *has_u_out);

/* Send one change of @t. */
static int send_change(struct aamm_apply *ap, struct qtxn *t, long idx, const char **fixed)
{
    struct aamm_change *c = &t->changes[idx];
    if (c->kind == AAMM_CHANGE_MESSAGE)
        return 0;
    if (c->kind == AAMM_CHANGE_TRUNCATE) {
        struct aamm__sb b = {0};
        aamm__sb_add(&b, "TRUNCATE ONLY ");
        for (uint32_t i = 0; i < c->nrelations; i++)
            aamm__sb_add(&b, "%s%s", i ? ", " : "", lrel_of(c->relations[i])->qname);
        if (c->truncate_flags & AAMM_TRUNCATE_RESTART_IDENTITY)
            aamm__sb_add(&b, " RESTART IDENTITY");
        if (c->truncate_flags & AAMM_TRUNCATE_CASCADE)
            aamm__sb_add(&b, " CASCADE");
        if (b.oom)
            return AAMM_ENOMEM;
        int ok = PQsendQueryParams(ap->conn, b.s, 0, NULL, NULL, NULL, NULL, 0);
        aamm__free(b.s);
        if (!ok)
            return AAMM_ECONN;
        if (!exp_push(ap, E_STMT, t, NULL, idx))
            return AAMM_ENOMEM;
        for (uint32_t i = 0; i < c->nrelations; i++) {
            const char *pv[3] = {fixed[0], fixed[1], lrel_of(c->relations[i])->label};
            if (!PQsendQueryParams(ap->conn,
                                   "SELECT aamm.log_truncate($3, $1::timestamptz, $2::int)", 3,
                                   NULL, pv, NULL, NULL, 0))
                return AAMM_ECONN;
            if (!exp_push(ap, E_STMT, t, NULL, idx))
                return AAMM_ENOMEM;
        }
        return 0;
    }
    struct lrel *r = lrel_of(c->relation);
    if (ensure_scratch(ap, r->rel.ncolumns) < 0)
        return AAMM_ENOMEM;
    int op = 0, np = 0;
    bool has_u = false;
    char *mask = ap->scratch_mask;
    const char **vals = ap->scratch_vals;
    int rc = prep_row(ap, t, idx, fixed, mask, vals, &np, &op, &has_u);
    if (rc < 0)
        return rc;
    struct stmt *s = get_stmt(ap, t, idx, r, op, mask, has_u, &rc);
    if (!s)
        return rc;
    if (!PQsendQueryPrepared(ap->conn, s->name, np, vals, NULL, NULL, 0))
        return AAMM_ECONN;
    if (!exp_push(ap, E_STMT, t, r, idx))
        return AAMM_ENOMEM;
    return 0;
}

/*
 * The statement shape and parameters of the row change @idx of @t: @mask (room for the
 * relation's columns + 2) gets the written-columns mask, @vals (room for NFIXED_ALL + 2 x
 * columns) the parameters, *@np their count, *@op the statement kind, *@has_u whether
 * unchanged-TOAST values are left out. Returns 0 or AAMM_EMALFORMED.
 */
static int prep_row(struct aamm_apply *ap, struct qtxn *t, long idx, const char **fixed, char *mask,
                    const char **vals, int *np_out, int *op_out, bool *has_u_out)
{
    struct aamm_change *c = &t->changes[idx];
    struct lrel *r = lrel_of(c->relation);
    uint32_t nc = r->rel.ncolumns;
    const struct aamm_tuple *nt = c->kind == AAMM_CHANGE_DELETE ? NULL : &c->new_tuple;
    const struct aamm_tuple *ot = c->old_kind != AAMM_OLD_NONE ? &c->old_tuple : NULL;
    if ((nt && nt->nvalues != nc) || (ot && ot->nvalues != nc) ||
        (c->kind == AAMM_CHANGE_DELETE && !ot))
        return aamm__errf(&ap->err, AAMM_EMALFORMED,
                          "apply: %s: tuple does not match the relation (%u columns)", r->label,
                          nc);
    bool has_u = false;
    for (uint32_t i = 0; i < nc; i++) {
        bool w = nt && nt->values[i].kind != AAMM_VALUE_UNCHANGED && r->r2l[i] >= 0;
        if (nt && nt->values[i].kind == AAMM_VALUE_UNCHANGED)
            has_u = true;
        mask[i] = w ? '1' : '0';
    }
    /* key values come from the old tuple when the key changed (an old tuple whose key
     * texts equal the new ones, REPLICA IDENTITY FULL's, adds nothing) */
    bool keychg = false;
    for (int k = 0; c->kind == AAMM_CHANGE_UPDATE && ot && !keychg && k < r->nkeys; k++) {
        const struct aamm_value *o = &ot->values[r->key_r[k]], *n = &nt->values[r->key_r[k]];
        keychg = o->kind != n->kind || (o->kind == AAMM_VALUE_TEXT &&
                                        (o->len != n->len || memcmp(o->data, n->data, o->len)));
    }
    mask[nc] = keychg ? 'k' : '-';
    mask[nc + 1] = '\0';
    if (c->kind == AAMM_CHANGE_UPDATE && has_u)
        mask[nc] = mask[nc] == 'k' ? 'K' : 'U';
    for (int k = 0; k < r->nkeys; k++) {
        const struct aamm_tuple *kt = (c->kind == AAMM_CHANGE_DELETE || keychg) ? ot : nt;
        const struct aamm_value *v = &kt->values[r->key_r[k]];
        if (v->kind != AAMM_VALUE_TEXT)
            return aamm__errf(&ap->err, AAMM_EMALFORMED,
                              "apply: %s: key column \"%s\" has no value", r->label,
                              r->rel.columns[r->key_r[k]].name);
    }
    int op = c->kind == AAMM_CHANGE_INSERT   ? OP_INSERT
             : c->kind == AAMM_CHANGE_UPDATE ? OP_UPDATE
                                             : OP_DELETE;
    int np = 0;
    for (int i = 0; i < NFIXED; i++)
        vals[np++] = fixed[i];
    vals[np++] = ap->roident;
    vals[3] = t->verdicts && t->verdicts[idx]
                  ? t->verdicts[idx]
                  : aamm_conflict_policy_name((enum aamm_conflict_policy)policy_of(ap, r));
    if (op != OP_DELETE)
        for (uint32_t i = 0; i < nc; i++)
            if (mask[i] == '1')
                vals[np++] = nt->values[i].kind == AAMM_VALUE_TEXT ? nt->values[i].data : NULL;
    if (op == OP_DELETE || keychg)
        for (int k = 0; k < r->nkeys; k++)
            vals[np++] = ot->values[r->key_r[k]].data;
    /* appliers are serialized per key by the locks the guard statement took, before
     * this statement's snapshot (build_locks()) */
    *np_out = np;
    *op_out = op;
    *has_u_out = has_u;
    return 0;
}

static uint8_t *put_be32(uint8_t *o, uint32_t v)
{
    o[0] = (uint8_t)(v >> 24);
    o[1] = (uint8_t)(v >> 16);
    o[2] = (uint8_t)(v >> 8);
    o[3] = (uint8_t)v;
    return o + 4;
}

/* A relation's runs of inserts go out without ON CONFLICT (OP_INSERT_PLAIN) once this many
 * ON CONFLICT runs committed in a row without a conflict: a plain run that meets a present
 * key fails, and with it every transaction sent behind it, so it is kept for relations
 * that show none. */
#define PLAIN_AFTER 8

/* Runs of inserts go out as one statement of at most this many rows / value bytes. */
#define BATCH_MIN 4
#define BATCH_ROWS 1000
#define BATCH_BYTES (4u << 20)

/* The end of the run of inserts starting at change @i0 of @t that one OP_INSERT_MANY
 * statement can apply: same relation, full rows, key values present and distinct. */
static size_t insert_run_end(const struct qtxn *t, size_t i0)
{
    const struct aamm_change *c0 = &t->changes[i0];
    if (c0->kind != AAMM_CHANGE_INSERT || !c0->relation)
        return i0;
    const struct lrel *r = lrel_of(c0->relation);
    uint32_t nc = r->rel.ncolumns;
    uint64_t seen[2 * BATCH_ROWS]; /* open addressing on the key hash */
    size_t slots = 2 * BATCH_ROWS, left = t->n - i0;
    if (2 * left + 1 < slots)
        slots = 2 * left + 1;
    memset(seen, 0, slots * sizeof *seen);
    size_t bytes = 0, i;
    for (i = i0; i < t->n && i - i0 < BATCH_ROWS && bytes < BATCH_BYTES; i++) {
        const struct aamm_change *c = &t->changes[i];
        if (c->kind != AAMM_CHANGE_INSERT || c->relation != c0->relation ||
            c->new_tuple.nvalues != nc)
            break;
        bool ok = true;
        for (uint32_t k = 0; k < nc && ok; k++) {
            const struct aamm_value *v = &c->new_tuple.values[k];
            ok = v->kind != AAMM_VALUE_UNCHANGED;
            bytes += v->len + 3;
        }
        for (int k = 0; k < r->nkeys && ok; k++)
            ok = c->new_tuple.values[r->key_r[k]].kind == AAMM_VALUE_TEXT;
        if (!ok)
            break;
        uint64_t h = (uint64_t)key_lock_id(r, &c->new_tuple) | 1;
        size_t slot = (size_t)(h % slots);
        while (seen[slot] && seen[slot] != h)
            slot = (slot + 1) % slots;
        if (seen[slot] == h)
            break; /* the same key twice (or a hash twin): a new statement from here */
        seen[slot] = h;
    }
    return i;
}

static int ensure_scratch(struct aamm_apply *ap, uint32_t nc)
{
    size_t need = (size_t)nc + 2;
    if (ap->scratch_cap >= need)
        return 0;
    size_t ncap = need * 2 + 16;
    char *m = aamm__realloc(ap->scratch_mask, ncap);
    if (!m)
        return AAMM_ENOMEM;
    ap->scratch_mask = m;
    const char **v = aamm__realloc(ap->scratch_vals, (ncap * 2 + NFIXED_ALL) * sizeof *v);
    if (!v)
        return AAMM_ENOMEM;
    ap->scratch_vals = v;
    ap->scratch_cap = ncap;
    return 0;
}

/* Send the inserts @i0..@i1-1 of @t (a run from insert_run_end()) as one statement. */
static int send_many(struct aamm_apply *ap, struct qtxn *t, size_t i0, size_t i1,
                     const char **fixed)
{
    struct lrel *r = lrel_of(t->changes[i0].relation);
    uint32_t nc = r->rel.ncolumns;
    int rc = ensure_scratch(ap, nc);
    if (rc < 0)
        return rc;
    char *mask = ap->scratch_mask;
    for (uint32_t c = 0; c < nc; c++)
        mask[c] = r->r2l[c] >= 0 ? '1' : '0';
    mask[nc] = '-';
    mask[nc + 1] = '\0';
    int op = r->runs_upsert || r->clean_runs < PLAIN_AFTER ? OP_INSERT_MANY : OP_INSERT_PLAIN;
    if (op == OP_INSERT_MANY)
        t->upsert_run = r;
    struct stmt *st = get_stmt(ap, t, (long)i0, r, op, mask, false, &rc);
    if (!st)
        return rc;
    char name[32];
    memcpy(name, st->name, sizeof name);
    /* one text[] per written column, in the binary array format: no quoting here and no
     * array parsing on the server (array_recv takes length-prefixed elements) */
    char **arr = aamm__calloc(nc + 1, sizeof *arr);
    int *lens = aamm__calloc(NFIXED_ALL + nc + 1, sizeof *lens);
    int *fmts = aamm__calloc(NFIXED_ALL + nc + 1, sizeof *fmts);
    bool oom = !arr || !lens || !fmts;
    const char **vals = ap->scratch_vals;
    int np = 0;
    for (int i = 0; i < NFIXED; i++)
        vals[np++] = fixed[i];
    vals[np++] = ap->roident;
    vals[3] = aamm_conflict_policy_name((enum aamm_conflict_policy)policy_of(ap, r));
    for (uint32_t c = 0; c < nc && !oom; c++) {
        if (mask[c] != '1')
            continue;
        size_t n = i1 - i0, size = 20;
        bool nulls = false;
        for (size_t i = i0; i < i1; i++) {
            const struct aamm_value *v = &t->changes[i].new_tuple.values[c];
            size += 4 + (v->kind == AAMM_VALUE_TEXT ? v->len : 0);
            nulls = nulls || v->kind != AAMM_VALUE_TEXT;
        }
        uint8_t *b = aamm__malloc(size), *o = b;
        if (!b || size > INT32_MAX) {
            aamm__free(b);
            oom = true;
            break;
        }
        o = put_be32(o, 1);           /* dimensions */
        o = put_be32(o, nulls);       /* has nulls */
        o = put_be32(o, 25);          /* element type: text */
        o = put_be32(o, (uint32_t)n); /* length */
        o = put_be32(o, 1);           /* lower bound */
        for (size_t i = i0; i < i1; i++) {
            const struct aamm_value *v = &t->changes[i].new_tuple.values[c];
            if (v->kind != AAMM_VALUE_TEXT) {
                o = put_be32(o, UINT32_MAX); /* -1: NULL */
                continue;
            }
            o = put_be32(o, v->len);
            memcpy(o, v->data, v->len);
            o += v->len;
        }
        arr[c] = (char *)b;
        lens[np] = (int)size;
        fmts[np] = 1;
        vals[np++] = arr[c];
    }
    int ok = !oom && PQsendQueryPrepared(ap->conn, name, np, vals, lens, fmts, 0);
    for (uint32_t c = 0; arr && c < nc; c++)
        aamm__free(arr[c]);
    aamm__free(arr);
    aamm__free(lens);
    aamm__free(fmts);
    if (oom)
        return AAMM_ENOMEM;
    if (!ok)
        return AAMM_ECONN;
    struct expect *e = exp_push(ap, E_STMT, t, r, (long)i0);
    if (!e)
        return AAMM_ENOMEM;
    e->plain = op == OP_INSERT_PLAIN;
    return 0;
}

/*
 * Whether @t can go out as one merged statement: 1..MERGE_CHANGES row changes, no run of
 * inserts for send_many(), no verdicts, and every key (old and new) distinct, since the
 * items of one statement share its snapshot and cannot see each other's rows.
 */
static bool mergeable(const struct qtxn *t)
{
    if (t->nobatch || t->verdicts || t->n < 1 || t->n > MERGE_CHANGES)
        return false;
    uint64_t keys[2 * MERGE_CHANGES];
    int nk = 0;
    for (size_t i = 0; i < t->n; i++) {
        const struct aamm_change *c = &t->changes[i];
        if ((c->kind != AAMM_CHANGE_INSERT && c->kind != AAMM_CHANGE_UPDATE &&
             c->kind != AAMM_CHANGE_DELETE) ||
            !c->relation)
            return false;
        if (insert_run_end(t, i) - i >= BATCH_MIN)
            return false;
        const struct lrel *r = lrel_of(c->relation);
        const struct aamm_tuple *ot = c->old_kind != AAMM_OLD_NONE ? &c->old_tuple : NULL;
        const struct aamm_tuple *kt[2] = {c->kind == AAMM_CHANGE_DELETE || ot ? ot : &c->new_tuple,
                                          c->kind == AAMM_CHANGE_UPDATE && ot ? &c->new_tuple
                                                                              : NULL};
        for (int j = 0; j < 2; j++) {
            if (!kt[j])
                continue;
            if (kt[j]->nvalues != r->rel.ncolumns)
                return false;
            uint64_t h = (uint64_t)key_lock_id(r, kt[j]);
            for (int x = 0; x < nk; x++)
                if (keys[x] == h && !(j == 1 && x == nk - 1))
                    return false;
            keys[nk++] = h;
        }
    }
    return true;
}

/* The guard (the origin's progress must be the previous transaction's end LSN, or an
 * earlier transaction failed: raise), the origin's commit LSN and timestamp, and the key
 * locks (build_locks()). Plain SQL: the PL/pgSQL function runs only when the guard trips.
 * GUARD_CHECK and GUARD_LOCKS (rows (x id, e exclusive) in ascending id order) are shared
 * by its two forms below. */
#define GUARD_CHECK                                                                                \
    "SELECT pg_catalog.pg_replication_origin_xact_setup($3::pg_lsn, $4::timestamptz)::text "       \
    "AS w FROM (SELECT COALESCE(pg_catalog.pg_replication_origin_progress($1, false), "            \
    "'0/0') AS cur) g WHERE CASE WHEN g.cur OPERATOR(pg_catalog.=) $2::pg_lsn THEN true ELSE "     \
    "aamm.guard_failed($1, g.cur, $2::pg_lsn) END UNION ALL "
#define GUARD_LOCKS                                                                                \
    " FROM ROWS FROM (pg_catalog.unnest($5::int8[]), pg_catalog.unnest($6::bool[])) AS u(x, e)"

/* the guard as a statement of its own: it waits for the locks */
static const char guard_sql[] =
    GUARD_CHECK "SELECT CASE WHEN u.e THEN pg_catalog.pg_advisory_xact_lock(u.x)::text "
                "ELSE pg_catalog.pg_advisory_xact_lock_shared(u.x)::text END" GUARD_LOCKS;

const char *aamm__apply_guard_sql(void)
{
    return guard_sql;
}

/* The guard folded into a merged statement (send_merged()), read before any change item.
 * The statement's snapshot was taken before its locks, so a key lock another applier holds
 * raises AA005 instead of waiting; the transaction is then retried with guard_sql, a
 * statement of its own (after_failure()). */
static const char guard_fold_sql[] =
    "g AS MATERIALIZED (" GUARD_CHECK
    "SELECT CASE WHEN CASE WHEN u.e THEN pg_catalog.pg_try_advisory_xact_lock(u.x) "
    "ELSE pg_catalog.pg_try_advisory_xact_lock_shared(u.x) END THEN NULL ELSE "
    "aamm.key_lock_busy(u.x) END" GUARD_LOCKS ")";

/*
 * Send @t (mergeable()) as one statement: WITH c1 AS (...), m1 AS (...), ... SELECT ...,
 * each change's items built as for its own statement (build_sql()) with its parameters
 * renumbered after the previous change's. Prepared once per shape. Returns 0, 1 when the
 * shape cache is full (send the changes one by one), or an error.
 */
static int send_merged(struct aamm_apply *ap, struct qtxn *t, const char **fixed_in,
                       const char *const *guard)
{
    size_t n = t->n;
    uint32_t widest = 0;
    for (size_t i = 0; i < n; i++)
        if (lrel_of(t->changes[i].relation)->rel.ncolumns > widest)
            widest = lrel_of(t->changes[i].relation)->rel.ncolumns;
    size_t per = NFIXED_ALL + 2 * (size_t)widest + 2;
    const char **vals = aamm__calloc(n * per + 6, sizeof *vals);
    char *masks = aamm__calloc(n, (size_t)widest + 2);
    int *ops = aamm__calloc(n, sizeof *ops), *nps = aamm__calloc(n, sizeof *nps);
    bool *hasu = aamm__calloc(n, sizeof *hasu);
    struct aamm__sb shape = {0};
    int rc = (vals && masks && ops && nps && hasu) ? 0 : AAMM_ENOMEM;
    int total = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        const char *fixed[NFIXED];
        memcpy(fixed, fixed_in, sizeof fixed);
        struct lrel *r = lrel_of(t->changes[i].relation);
        fixed[2] = r->label;
        char *mask = masks + i * (widest + 2);
        rc = prep_row(ap, t, (long)i, fixed, mask, vals + total, &nps[i], &ops[i], &hasu[i]);
        if (rc < 0)
            break;
        vals[total + 3] = aamm_conflict_policy_name((enum aamm_conflict_policy)policy_of(ap, r));
        total += nps[i];
        aamm__sb_add(&shape, "%d.%u.%d.%s;", r->id, r->gen, ops[i], mask);
    }
    if (rc == 0 && shape.oom)
        rc = AAMM_ENOMEM;
    for (int i = 0; rc == 0 && i < 6; i++) /* the guard's parameters come last */
        vals[total + i] = guard[i];
    struct mstmt *m = NULL;
    for (int i = 0; rc == 0 && i < ap->nmerged; i++)
        if (strcmp(ap->merged[i].shape, shape.s) == 0)
            m = &ap->merged[i];
    if (rc == 0 && !m && ap->nmerged == MERGED_MAX)
        rc = 1;
    if (rc == 0 && !m) {
        m = &ap->merged[ap->nmerged];
        memset(m, 0, sizeof *m);
        m->shape = shape.s;
        shape.s = NULL;
        snprintf(m->name, sizeof m->name, "aamm_m%u", ap->merged_seq++);
        ap->nmerged++;
        AAMM_DEBUG("apply: merged statement %s for %s", m->name, m->shape);
    }
    if (rc == 0 && !m->prepared) {
        struct aamm__sb sql = {0}, tail = {0};
        char *g = rewrite_params(guard_fold_sql, false, total);
        if (!g)
            sql.oom = true;
        aamm__sb_add(&sql, "WITH %s", g ? g : "");
        aamm__free(g);
        /* the guard first: the Append reads g (locks and all) before any m item runs
         * its c item */
        aamm__sb_add(&tail, " SELECT w FROM g");
        int off = 0;
        for (size_t i = 0; i < n; i++) {
            struct lrel *r = lrel_of(t->changes[i].relation);
            char *item = build_sql(r, ops[i], masks + i * (widest + 2), hasu[i], (int)i + 1);
            char *ren = item ? rewrite_params(item, false, off) : NULL;
            aamm__free(item);
            if (!ren) {
                sql.oom = true;
                break;
            }
            aamm__sb_add(&sql, ", %s", ren);
            aamm__free(ren);
            /* an m item runs only when read; reading it runs its c item first */
            aamm__sb_add(&tail, " UNION ALL SELECT x::text FROM m%zu", i + 1);
            off += nps[i];
        }
        aamm__sb_add(&sql, "%s", tail.s ? tail.s : "");
        Oid *types = aamm__malloc((size_t)(total + 6) * sizeof *types);
        if (sql.oom || tail.oom || !types) {
            rc = AAMM_ENOMEM;
        } else {
            for (int i = 0; i < total + 6; i++)
                types[i] = 25; /* text: every item casts its parameters */
            if (!PQsendPrepare(ap->conn, m->name, sql.s, total + 6, types))
                rc = AAMM_ECONN;
            else if (!exp_push(ap, E_PREPARE, t, NULL, 0))
                rc = AAMM_ENOMEM;
            else
                m->prepared = true;
        }
        aamm__free(types);
        aamm__free(sql.s);
        aamm__free(tail.s);
    }
    if (rc == 0) {
        if (!PQsendQueryPrepared(ap->conn, m->name, total + 6, vals, NULL, NULL, 0))
            rc = AAMM_ECONN;
        else if (!exp_push(ap, E_STMT, t, NULL, 0))
            rc = AAMM_ENOMEM;
    }
    aamm__free(shape.s);
    aamm__free(vals);
    aamm__free(masks);
    aamm__free(ops);
    aamm__free(nps);
    aamm__free(hasu);
    return rc;
}

/* Send @t as guard; changes; Sync: one implicit transaction, committed by the Sync (no
 * BEGIN and COMMIT statements: each costs the backend a statement). Returns 0, 1 when it has to
 * wait (catalog), or an error. */
static int send_txn(struct aamm_apply *ap, struct qtxn *t)
{
    /* 1. every relation mapped (a catalog round trip first if not) */
    for (size_t i = 0; i < t->n; i++) {
        struct aamm_change *c = &t->changes[i];
        uint32_t nr = c->kind == AAMM_CHANGE_TRUNCATE ? c->nrelations : (c->relation ? 1 : 0);
        for (uint32_t j = 0; j < nr; j++) {
            struct lrel *r =
                lrel_of(c->kind == AAMM_CHANGE_TRUNCATE ? c->relations[j] : c->relation);
            if (r->mapped && r->map_code) {
                ap->block_code = r->map_code;
                aamm__free(ap->block_msg);
                ap->block_msg = aamm__strdup(r->map_msg ? r->map_msg : "mapping failed");
                return 1;
            }
            if (r->mapped)
                continue;
            if (!r->catalog_pending) {
                const char *pv[2] = {r->rel.schema, r->rel.name};
                if (!PQsendQueryParams(ap->conn, catalog_sql, 2, NULL, pv, NULL, NULL, 0) ||
                    !PQpipelineSync(ap->conn))
                    return AAMM_ECONN;
                if (!exp_push(ap, E_CATALOG, NULL, r, 0) || !exp_push(ap, E_MSYNC, NULL, NULL, 0))
                    return AAMM_ENOMEM;
                r->catalog_pending = true;
            }
            return 1;
        }
    }
    /* 2. the transaction */
    t->upsert_run = NULL;
    char lsn_prev[AAMM_LSN_BUFSIZE], lsn_end[AAMM_LSN_BUFSIZE], ts[64], node[16];
    aamm_lsn_format(ap->prev_sent, lsn_prev);
    aamm_lsn_format(t->hdr.end_lsn, lsn_end);
    aamm_time_format(t->hdr.commit_time, ts, sizeof ts);
    snprintf(node, sizeof node, "%" PRIu32, ap->opt.source_node);
    if (!ap->fixed_prepared) {
        if (!PQsendPrepare(ap->conn, "aamm_guard", guard_sql, 6, NULL) ||
            !exp_push(ap, E_PREPARE, t, NULL, -1))
            return AAMM_ECONN;
        ap->fixed_prepared = true;
    }
    struct aamm__sb ids = {0}, modes = {0};
    int rc = 0;
    if (ap->opt.lock_keys)
        rc = build_locks(t, &ids, &modes);
    else {
        aamm__sb_add(&ids, "{}");
        aamm__sb_add(&modes, "{}");
    }
    if (rc == 0 && (ids.oom || modes.oom))
        rc = AAMM_ENOMEM;
    const char *gp[6] = {ap->origin, lsn_prev, lsn_end, ts, ids.s, modes.s};
    const char *fixed[NFIXED] = {ts, node, NULL, NULL};
    /* a small transaction: one statement with the guard folded in (1 when the shape cache
     * is full: nothing sent, the guard and the changes go one by one) */
    bool merged = false;
    if (rc == 0 && mergeable(t) && aamm__now_ms() >= ap->fold_off_until_ms) {
        rc = send_merged(ap, t, fixed, gp);
        merged = rc == 0;
        if (rc > 0)
            rc = 0;
    }
    if (rc == 0 && !merged &&
        (!PQsendQueryPrepared(ap->conn, "aamm_guard", 6, gp, NULL, NULL, 0) ||
         !exp_push(ap, E_GUARD, t, NULL, -1)))
        rc = AAMM_ECONN;
    aamm__free(ids.s);
    aamm__free(modes.s);
    if (rc < 0)
        return rc;
    for (size_t i = 0; !merged && i < t->n;) {
        if (t->changes[i].relation)
            fixed[2] = lrel_of(t->changes[i].relation)->label;
        size_t j = t->nobatch ? i : insert_run_end(t, i);
        if (j - i >= BATCH_MIN) {
            rc = send_many(ap, t, i, j, fixed);
            i = j;
        } else {
            rc = send_change(ap, t, (long)i, fixed);
            i++;
        }
        if (rc < 0)
            return rc;
    }
    /* the Sync commits the implicit transaction its statements ran in */
    if (!PQpipelineSync(ap->conn) || !exp_push(ap, E_SYNC, t, NULL, -1))
        return AAMM_ECONN;
    t->sent = true;
    ap->prev_sent = t->hdr.end_lsn;
    ap->ninflight++;
    return 0;
}

static int send_pending(struct aamm_apply *ap)
{
    if (ap->fail_txn || ap->block_code || ap->recovering)
        return 0;
    struct qtxn *t = ap->cursor;
    for (; t; t = t->next) {
        if (t->done || t->sent)
            continue;
        if (ap->ninflight >= ap->opt.max_pipeline_txns)
            break;
        /* exactly once: anything at or below what is (or will be) committed is a duplicate */
        if (t->hdr.end_lsn <= ap->prev_sent) {
            t->done = t->skipped = true;
            continue;
        }
        int rc = send_txn(ap, t);
        if (rc < 0) {
            ap->cursor = t;
            return rc;
        }
        if (rc > 0)
            break;
    }
    ap->cursor = t;
    return 0;
}

/* ====================================================================================
 * Results
 * ==================================================================================== */

static void record_error(struct qtxn *t, PGresult *res, long idx)
{
    if (!t || t->errmsg)
        return;
    const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    snprintf(t->sqlstate, sizeof t->sqlstate, "%s", st ? st : "XX000");
    const char *m = PQresultErrorMessage(res);
    t->errmsg = aamm__strdup(m && *m ? m : "unknown error");
    if (t->errmsg) {
        size_t n = strlen(t->errmsg);
        while (n && (t->errmsg[n - 1] == '\n' || t->errmsg[n - 1] == ' '))
            t->errmsg[--n] = '\0';
    }
    const char *d = PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL);
    aamm__free(t->errdetail);
    t->errdetail = d ? aamm__strdup(d) : NULL;
    t->err_change = idx;
    t->failed = true;
}

static int64_t parse_i64(const char *s)
{
    return s && *s ? strtoll(s, NULL, 10) : 0;
}

static void qtxn_drop_conflicts(struct qtxn *t)
{
    while (t->conflicts) {
        struct qconflict *c = t->conflicts;
        t->conflicts = c->next;
        aamm__free(c->rel);
        aamm__free(c->key);
        aamm__free(c->local);
        aamm__free(c->remote);
        aamm__free(c);
    }
}

/*
 * libpq's notice receiver: aamm.log_conflict() raises NOTICE "aamm_conflict" with the
 * conflict's fields in its detail (lib/node.c). libpq parses a statement's messages only
 * after the previous statement's result was taken, so the statement that met the conflict
 * is the head of the expect queue. Kept with its transaction, reported when it commits.
 */
/* Split @s in place at chr(31) into @n fields (the last one takes the rest); false when
 * there are fewer. The server's messages put JSON (which never holds chr(31) raw) first and
 * free text last. */
static bool split_fields(char *s, char **f, int n)
{
    for (int i = 0; i < n - 1; i++) {
        f[i] = s;
        char *sep = strchr(s, '\x1f');
        if (!sep)
            return false;
        *sep = '\0';
        s = sep + 1;
    }
    f[n - 1] = s;
    return true;
}

static void on_notice(void *arg, const PGresult *res)
{
    struct aamm_apply *ap = arg;
    const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    const char *d = PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL);
    if (!msg || strcmp(msg, "aamm_conflict") != 0 || !d || ap->exp_n == 0)
        return;
    struct qtxn *t = ap->exp[ap->exp_head].t;
    if (!t)
        return;
    char *f[10];
    char *copy = aamm__strdup(d);
    if (!copy)
        return;
    if (!split_fields(copy, f, 10)) { /* not ours after all */
        aamm__free(copy);
        return;
    }
    struct qconflict *q = aamm__calloc(1, sizeof *q);
    if (!q) {
        aamm__free(copy);
        return;
    }
    q->c.kind = (enum aamm_conflict_kind)aamm_conflict_kind_parse(f[0]);
    q->key = *f[1] ? aamm__strdup(f[1]) : NULL;
    q->local = *f[2] ? aamm__strdup(f[2]) : NULL;
    q->remote = *f[3] ? aamm__strdup(f[3]) : NULL;
    q->c.local.known = *f[4] != '\0';
    q->c.local.commit_time = parse_i64(f[4]);
    q->c.local.origin_node = (uint32_t)parse_i64(f[5]);
    q->c.remote.known = *f[6] != '\0';
    q->c.remote.commit_time = parse_i64(f[6]);
    q->c.remote.origin_node = (uint32_t)parse_i64(f[7]);
    q->c.resolution = (enum aamm_resolution)aamm_resolution_parse(f[8]);
    q->rel = aamm__strdup(f[9]);
    aamm__free(copy);
    q->c.relation = q->rel;
    q->c.key_json = q->key;
    q->c.local_json = q->local;
    q->c.remote_json = q->remote;
    struct qconflict **tailp = &t->conflicts;
    while (*tailp)
        tailp = &(*tailp)->next;
    *tailp = q;
}

/* a transaction committed: report it and let it go when it reaches the head */
static void txn_committed(struct aamm_apply *ap, struct qtxn *t)
{
    t->done = true;
    ap->progress = t->hdr.end_lsn;
    ap->committed++;
    ap->need_progress = true;
    ap->backoff_ms = 10;
    if (t->upsert_run) { /* was the relation's run clean? */
        struct lrel *r = t->upsert_run;
        bool clean = true;
        for (struct qconflict *q = t->conflicts; q && clean; q = q->next)
            clean = !q->rel || strcmp(q->rel, r->label) != 0;
        r->clean_runs = clean ? r->clean_runs + 1 : 0;
    }
    for (struct qconflict *q = t->conflicts; q; q = q->next) {
        if ((int)q->c.kind > 0 && (int)q->c.kind < AAMM_CONFLICT_NKINDS)
            ap->counters[q->c.kind]++;
        if (ap->opt.on_conflict)
            ap->opt.on_conflict(&q->c, ap->opt.conflict_arg);
    }
    for (size_t i = 0; i < t->n; i++) {
        struct aamm_change *c = &t->changes[i];
        if (c->kind == AAMM_CHANGE_MESSAGE && ap->opt.on_message)
            ap->opt.on_message(ap, true, c->prefix ? c->prefix : "", c->content, c->content_len,
                               ap->opt.message_arg);
    }
}

static void retire(struct aamm_apply *ap)
{
    while (ap->head && ap->head->done) {
        struct qtxn *t = ap->head;
        ap->head = t->next;
        if (!ap->head)
            ap->tail = NULL;
        if (ap->cursor == t)
            ap->cursor = t->next;
        if (t->skipped)
            ap->skipped++;
        ap->nqueued_changes -= t->n;
        ap->ntxns--;
        qtxn_free(t);
    }
}

static int classify(const char *sqlstate)
{
    if (strcmp(sqlstate, "23505") == 0 || strcmp(sqlstate, "AA001") == 0)
        return AAMM_ECONFLICT;
    if (strcmp(sqlstate, "42P01") == 0 || strcmp(sqlstate, "42703") == 0)
        return AAMM_ENOTFOUND;
    return AAMM_ESERVER;
}

/* Set change @idx's verdict to "verdict:<res>:<xmin>". */
static int set_verdict(struct qtxn *t, long idx, const char *res, const char *xmin)
{
    if (!t->verdicts) {
        t->verdicts = aamm__calloc(t->n ? t->n : 1, sizeof *t->verdicts);
        if (!t->verdicts)
            return AAMM_ENOMEM;
    }
    char *v = aamm__asprintf("verdict:%s:%s", res, *xmin ? xmin : "*");
    if (!v)
        return AAMM_ENOMEM;
    aamm__free(t->verdicts[idx]);
    t->verdicts[idx] = v;
    return 0;
}

/*
 * The host's resolver for the conflict change @idx of @t met (@detail: the AA004 detail
 * of aamm.resolve_cb()): call it and record its verdict (a merged row replaces the
 * change's row; a delete with a merged row becomes an update). Returns 0, or the error
 * that holds the stream.
 */
static int resolve(struct aamm_apply *ap, struct qtxn *t, long idx, const char *detail)
{
    struct aamm_change *c = &t->changes[idx];
    struct lrel *r = c->relation ? lrel_of(c->relation) : NULL;
    void *arg = NULL;
    aamm_resolver_fn fn = r ? resolver_of(ap, r, &arg) : NULL;
    if (!fn)
        return aamm__errf(&ap->err, AAMM_ECONFLICT,
                          "apply: %s: a conflict asked for a resolver and none is installed; "
                          "stream held",
                          r ? r->label : "?");
    char *copy = aamm__strdup(detail ? detail : "");
    if (!copy)
        return aamm__errf(&ap->err, AAMM_ENOMEM, "apply: out of memory");
    char *f[7];
    if (!split_fields(copy, f, 7)) {
        aamm__free(copy);
        return aamm__errf(&ap->err, AAMM_EPROTO,
                          "apply: %s: malformed resolver request from "
                          "the server; stream held",
                          r->label);
    }
    struct aamm_conflict cf = {0};
    cf.kind = (enum aamm_conflict_kind)aamm_conflict_kind_parse(f[0]);
    cf.relation = r->label;
    cf.key_json = *f[4] ? f[4] : NULL;
    cf.local_json = *f[5] ? f[5] : NULL;
    cf.remote_json = *f[6] ? f[6] : NULL;
    cf.local.known = *f[2] != '\0';
    cf.local.commit_time = parse_i64(f[2]);
    cf.local.origin_node = (uint32_t)parse_i64(f[3]);
    cf.remote.known = true;
    cf.remote.commit_time = t->hdr.commit_time;
    cf.remote.origin_node = t->hdr.origin_node;
    struct aamm_tuple merged;
    const struct aamm_tuple *src = c->kind == AAMM_CHANGE_DELETE ? &c->old_tuple : &c->new_tuple;
    if (aamm_tuple_copy(&merged, src) < 0) {
        aamm__free(copy);
        return aamm__errf(&ap->err, AAMM_ENOMEM, "apply: out of memory");
    }
    enum aamm_resolution res = fn(ap, &cf, &r->rel, &merged, arg);
    int rc = 0;
    switch (res) {
    case AAMM_RESOLVE_APPLY_REMOTE:
    case AAMM_RESOLVE_KEEP_LOCAL:
        rc = set_verdict(t, idx, aamm_resolution_name(res), f[1]);
        break;
    case AAMM_RESOLVE_MERGED:
        if (merged.nvalues != r->rel.ncolumns) {
            rc = aamm__errf(&ap->err, AAMM_EINVAL,
                            "apply: %s: the resolver's merged row has %u values, the relation "
                            "%u columns; stream held",
                            r->label, merged.nvalues, r->rel.ncolumns);
            break;
        }
        rc = set_verdict(t, idx, "merged", f[1]);
        if (rc == 0) {
            if (c->kind == AAMM_CHANGE_DELETE) /* the row stays, with the merged values */
                c->kind = AAMM_CHANGE_UPDATE;
            aamm_tuple_clear(&c->new_tuple);
            c->new_tuple = merged;
            memset(&merged, 0, sizeof merged);
        }
        break;
    default:
        rc =
            aamm__errf(&ap->err, AAMM_ECONFLICT,
                       "apply: %s: %s conflict on key %s: the resolver returned an error; "
                       "stream held",
                       r->label, aamm_conflict_kind_name(cf.kind), cf.key_json ? cf.key_json : "?");
        if (ap->opt.on_conflict) {
            cf.resolution = AAMM_RESOLVE_ERROR;
            ap->opt.on_conflict(&cf, ap->opt.conflict_arg);
        }
        if ((int)cf.kind > 0 && (int)cf.kind < AAMM_CONFLICT_NKINDS)
            ap->counters[cf.kind]++;
        break;
    }
    if (rc == AAMM_ENOMEM)
        aamm__errf(&ap->err, AAMM_ENOMEM, "apply: out of memory");
    aamm_tuple_clear(&merged);
    aamm__free(copy);
    return rc;
}

/* Everything in flight has answered and @fail_txn failed: retry or hold. */
/* Resend from the failed transaction in @ms (after_failure() has reset the pipeline). */
static void retry_in(struct aamm_apply *ap, int64_t ms)
{
    ap->state = S_WAIT;
    ap->wake_ms = aamm__now_ms() + ms;
}

static void after_failure(struct aamm_apply *ap)
{
    struct qtxn *t = ap->fail_txn, *orig = t;
    bool was_batched = !t->nobatch;
    if (PQstatus(ap->conn) == CONNECTION_BAD) { /* e.g. the backend was terminated */
        conn_error(ap, "reading results");
        return;
    }
    /* 1. the failed transaction ended at its Sync (the rest of the pipeline failed its
     *    guards): forget statements that may not exist; re-read the progress the guard
     *    compares with */
    /* the failed transaction's xact setup outlives its abort: without this reset, the
     * next commit of this session would move the origin to the failed end LSN */
    PQsendQueryParams(ap->conn, "SELECT pg_catalog.pg_replication_origin_xact_reset()", 0, NULL,
                      NULL, NULL, NULL, 0);
    exp_push(ap, E_MISC, NULL, NULL, 0);
    PQsendQueryParams(ap->conn, "DEALLOCATE ALL", 0, NULL, NULL, NULL, NULL, 0);
    exp_push(ap, E_MISC, NULL, NULL, 0);
    const char *pv[1] = {ap->origin};
    PQsendQueryParams(ap->conn,
                      "SELECT COALESCE(pg_catalog.pg_replication_origin_progress("
                      "$1, false), '0/0')",
                      1, NULL, pv, NULL, NULL, 0);
    exp_push(ap, E_REPROGRESS, NULL, NULL, 0);
    PQpipelineSync(ap->conn);
    exp_push(ap, E_MSYNC, NULL, NULL, 0);
    forget_prepared(ap);
    t->nobatch = true;     /* its retry names the change that fails */
    struct qtxn keep = *t; /* the first failure's details, for the message below */
    t->errmsg = NULL;
    unsend_all(ap);
    t = &keep;
    /* nothing is sent until the progress re-read answers */
    ap->prev_sent = ap->progress;
    ap->recovering = true;

    const char *sqlstate = t->sqlstate[0] ? t->sqlstate : "XX000";
    struct aamm_change *c = t->err_change >= 0 ? &t->changes[t->err_change] : NULL;
    const char *label = c && c->relation ? lrel_of(c->relation)->label : "";
    char lsn[AAMM_LSN_BUFSIZE];
    aamm_lsn_format(t->hdr.end_lsn, lsn);
    if (strcmp(sqlstate, "AA004") == 0 && c) {
        /* a conflict for the host's resolver: ask it (unless the failing statement held
         * several changes: the retry, one statement per change, names the one), then
         * retry at once with its verdict */
        int rc = was_batched ? 0 : resolve(ap, orig, t->err_change, t->errdetail);
        aamm__free(orig->errdetail);
        orig->errdetail = NULL;
        if (rc == 0) {
            aamm__free(t->errmsg);
            retry_in(ap, 0);
            return;
        }
        aamm__free(t->errmsg);
        ap->held_code = rc;
        ap->state = S_HELD;
        return;
    }
    if (strcmp(sqlstate, "23505") == 0 && t->err_plain && c && c->relation &&
        !lrel_of(c->relation)->runs_upsert) {
        /* a run of inserts without ON CONFLICT met a present key (or another unique
         * index: the retry says which): the relation's runs take the ON CONFLICT path
         * from now on; retry at once, batched as before */
        AAMM_DEBUG("apply: transaction %s: %s: a run met a present key, retrying", lsn, label);
        lrel_of(c->relation)->runs_upsert = true;
        orig->nobatch = !was_batched;
        aamm__free(t->errmsg);
        retry_in(ap, 0);
        return;
    }
    if (strcmp(sqlstate, "AA005") == 0) {
        /* another applier held one of its keys while a merged statement's guard ran:
         * retry at once, the guard a statement of its own that waits for the lock (it
         * is retried unbatched), and fold no guard for a while (the keys are contended) */
        AAMM_DEBUG("apply: transaction %s: key lock busy, retrying", lsn);
        aamm__free(t->errmsg);
        ap->fold_off_until_ms = aamm__now_ms() + FOLD_OFF_MS;
        retry_in(ap, 0);
        return;
    }
    if (is_transient(sqlstate)) {
        AAMM_INFO("apply: transaction %s: transient error, retrying: %s", lsn,
                  t->errmsg ? t->errmsg : "");
        aamm__free(t->errmsg);
        retry_in(ap, ap->backoff_ms);
        if (ap->backoff_ms < 2000)
            ap->backoff_ms *= 2;
        return;
    }
    int code = classify(sqlstate);
    if (strcmp(sqlstate, "23505") == 0 && c) {
        /* a unique index other than the key (or a key change onto an existing key) */
        ap->counters[AAMM_CONFLICT_UNIQUE_OTHER]++;
        struct aamm_conflict uc = {0};
        uc.kind = AAMM_CONFLICT_UNIQUE_OTHER;
        uc.relation = label;
        uc.remote.known = true;
        uc.remote.commit_time = t->hdr.commit_time;
        uc.remote.origin_node = t->hdr.origin_node;
        uc.resolution = AAMM_RESOLVE_ERROR;
        if (ap->opt.on_conflict)
            ap->opt.on_conflict(&uc, ap->opt.conflict_arg);
        char ts[64], node[16];
        aamm_time_format(t->hdr.commit_time, ts, sizeof ts);
        snprintf(node, sizeof node, "%" PRIu32, t->hdr.origin_node);
        const char *lp[3] = {label, ts, node};
        PQsendQueryParams(ap->conn,
                          "SELECT aamm.log_conflict('unique_other', $1, NULL, NULL, NULL, NULL, "
                          "NULL, $2::timestamptz, $3::int, 'error')",
                          3, NULL, lp, NULL, NULL, 0);
        exp_push(ap, E_MISC, NULL, NULL, 0);
        PQpipelineSync(ap->conn);
        exp_push(ap, E_MSYNC, NULL, NULL, 0);
    }
    aamm__errf(&ap->err, code, "apply: transaction %s%s%s: %s (%s); stream held", lsn,
               *label ? ": " : "", label, t->errmsg ? t->errmsg : "failed", sqlstate);
    aamm__free(t->errmsg);
    ap->held_code = code;
    ap->state = S_HELD;
}

static int handle_result(struct aamm_apply *ap, PGresult *res)
{
    int st = PQresultStatus(res);
    if (ap->exp_n == 0) {
        PQclear(res);
        return aamm__errf(&ap->err, AAMM_EINTERNAL, "apply: unexpected result from the server");
    }
    /* an error before a Sync's result is the implicit transaction's commit failing
     * (a deferred constraint, say): the Sync's own result still follows */
    struct expect *head = &ap->exp[ap->exp_head];
    if ((head->kind == E_SYNC || head->kind == E_MSYNC) && st != PGRES_PIPELINE_SYNC) {
        if (head->kind == E_SYNC)
            record_error(head->t, res, -1);
        PQclear(res);
        return 0;
    }
    struct expect e = exp_pop(ap);
    bool err = st == PGRES_FATAL_ERROR;
    AAMM_DEBUG("apply: result for %d: %s %s %s", e.kind, PQresStatus((ExecStatusType)st),
               PQcmdStatus(res), err ? PQresultErrorMessage(res) : "");
    switch (e.kind) {
    case E_SYNC:
        ap->ninflight--;
        if (st == PGRES_PIPELINE_SYNC && !e.t->failed && !e.t->errmsg) {
            txn_committed(ap, e.t);
        } else {
            e.t->failed = true;
            if (!e.t->errmsg) {
                e.t->errmsg = aamm__strdup("the transaction did not commit");
                snprintf(e.t->sqlstate, sizeof e.t->sqlstate, "AA003");
            }
            if (!ap->fail_txn)
                ap->fail_txn = e.t;
        }
        break;
    case E_GUARD:
    case E_STMT:
        if (err && e.t && !e.t->errmsg)
            e.t->err_plain = e.plain;
        if (err)
            record_error(e.t, res, e.idx);
        else if (st == PGRES_PIPELINE_ABORTED && e.t)
            e.t->failed = true;
        break;
    case E_PREPARE:
        if (err) {
            AAMM_WARN("apply: %s: preparing a statement failed: %s", e.rel ? e.rel->label : "",
                      PQresultErrorMessage(res));
            record_error(e.t, res, e.idx);
        } else if (st == PGRES_PIPELINE_ABORTED && e.t) {
            e.t->failed = true;
        }
        break;
    case E_CATALOG: {
        e.rel->catalog_pending = false;
        const char *ss = err ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
        if (err && (PQstatus(ap->conn) == CONNECTION_BAD || (ss && is_transient(ss))))
            break; /* not a verdict on the mapping: read the catalog again later */
        map_result(e.rel, res);
        break;
    }
    case E_PROGRESS:
        ap->progress_query_pending = false;
        if (st == PGRES_TUPLES_OK && PQntuples(res) == 1 && !PQgetisnull(res, 0, 0))
            aamm_lsn_parse(PQgetvalue(res, 0, 0), &ap->flushed);
        break;
    case E_REPROGRESS:
        if (st == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
            aamm_lsn_parse(PQgetvalue(res, 0, 0), &ap->progress) == 0)
            ap->prev_sent = ap->progress;
        ap->recovering = false;
        break;
    default:
        break;
    }
    PQclear(res);
    return 0;
}

static int read_results(struct aamm_apply *ap)
{
    if (!PQconsumeInput(ap->conn))
        return conn_error(ap, "reading results");
    while (ap->exp_n > 0 && !PQisBusy(ap->conn)) {
        PGresult *res = PQgetResult(ap->conn);
        if (!res) {
            if (PQstatus(ap->conn) == CONNECTION_BAD)
                return conn_error(ap, "reading results");
            continue; /* end of one query's results */
        }
        int rc = handle_result(ap, res);
        if (rc < 0)
            return rc;
    }
    if (PQstatus(ap->conn) == CONNECTION_BAD)
        return conn_error(ap, "reading results");
    retire(ap);
    return 0;
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
        return conn_error(ap, "connect");
    PQsetNoticeReceiver(ap->conn, on_notice, ap);
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
             "SELECT progress, roident FROM aamm.origin_session('%s')",
             ap->opt.local_node, ap->opt.source_node,
             ap->opt.synchronous_commit_off ? " SET synchronous_commit = off;" : "", ap->origin);
    if (!PQsendQuery(ap->conn, sql))
        return conn_error(ap, "session setup");
    ap->state = S_SETUP;
    return 0;
}

static int step_setup(struct aamm_apply *ap)
{
    if (!PQconsumeInput(ap->conn))
        return conn_error(ap, "session setup");
    while (!PQisBusy(ap->conn)) {
        PGresult *res = PQgetResult(ap->conn);
        if (!res) {
            /* all results in: enter pipeline mode */
            if (ap->state != S_SETUP)
                return 0;
            if (!PQenterPipelineMode(ap->conn) || PQsetnonblocking(ap->conn, 1) != 0)
                return conn_error(ap, "pipeline mode");
            ap->state = S_READY;
            ap->prev_sent = ap->progress;
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

int aamm_apply_step(struct aamm_apply *ap)
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
            read_results(ap);
        if (ap->conn && PQflush(ap->conn) < 0)
            conn_error(ap, "flush");
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
            return conn_error(ap, "connect");
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
    int rc = read_results(ap);
    if (rc < 0 || ap->state != S_READY)
        return rc;
    if (ap->exp_n == 0 && ap->fail_txn) {
        after_failure(ap);
        if (ap->state == S_HELD)
            return ap->held_code;
        return 0;
    }
    if (ap->exp_n == 0 && ap->block_code) {
        int code = ap->block_code;
        aamm__errf(&ap->err, code, "apply: %s; stream held", ap->block_msg ? ap->block_msg : "");
        ap->block_code = 0;
        ap->held_code = code;
        ap->state = S_HELD;
        return code;
    }
    rc = send_pending(ap);
    if (rc < 0) {
        if (rc == AAMM_ECONN)
            return conn_error(ap, "sending");
        return rc;
    }
    /* the flushed position (for acks) is read at most every PROGRESS_EVERY_MS while
     * transactions are in flight, at once when the pipeline is empty: a query per step
     * would cost the applier's backend a statement and a commit per round trip */
    int64_t now = aamm__now_ms();
    if (ap->need_progress && !ap->progress_query_pending && !ap->fail_txn &&
        (ap->ninflight == 0 || now - ap->progress_sent_ms >= PROGRESS_EVERY_MS)) {
        const char *pv[1] = {ap->origin};
        if (!PQsendQueryParams(ap->conn,
                               "SELECT pg_catalog.pg_replication_origin_progress($1, true)", 1,
                               NULL, pv, NULL, NULL, 0) ||
            !PQpipelineSync(ap->conn))
            return conn_error(ap, "sending");
        exp_push(ap, E_PROGRESS, NULL, NULL, 0);
        exp_push(ap, E_MSYNC, NULL, NULL, 0);
        ap->progress_query_pending = true;
        ap->need_progress = false;
        ap->progress_sent_ms = now;
    }
    int f = PQflush(ap->conn);
    if (f < 0)
        return conn_error(ap, "sending");
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
    return AAMM_APPLY_READ | (ap->want_write ? AAMM_APPLY_WRITE : 0);
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
        /* work queued that can be sent now */
        if (ap->cursor && ap->ninflight < ap->opt.max_pipeline_txns && !ap->fail_txn &&
            !ap->block_code && !ap->recovering)
            return 0;
        if ((ap->fail_txn || ap->block_code) && ap->exp_n == 0)
            return 0;
        if (ap->msgs)
            return 0;
        if (ap->need_progress && !ap->progress_query_pending && !ap->fail_txn) {
            int64_t d = ap->progress_sent_ms + PROGRESS_EVERY_MS - aamm__now_ms();
            return ap->ninflight == 0 || d <= 0 ? 0 : (int)d;
        }
        return -1;
    default:
        return ap->msgs ? 0 : -1;
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
            if (ev & AAMM_APPLY_READ)
                p.events |= POLLIN;
            if (ev & AAMM_APPLY_WRITE)
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

uint64_t aamm_apply_flushed(const struct aamm_apply *ap)
{
    return ap->flushed;
}

size_t aamm_apply_pending(const struct aamm_apply *ap)
{
    return ap->ntxns;
}

uint64_t aamm_apply_conflicts(const struct aamm_apply *ap, enum aamm_conflict_kind kind)
{
    if ((int)kind <= 0 || (int)kind >= AAMM_CONFLICT_NKINDS)
        return 0;
    return ap->counters[kind];
}

uint64_t aamm_apply_committed(const struct aamm_apply *ap)
{
    return ap->committed;
}

uint64_t aamm_apply_skipped(const struct aamm_apply *ap)
{
    return ap->skipped;
}

const char *aamm_apply_errmsg(const struct aamm_apply *ap)
{
    return aamm__errmsg(&ap->err);
}
