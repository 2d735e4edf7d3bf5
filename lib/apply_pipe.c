/* apply_pipe.c: apply's pipeline: transactions go out as guard, statements and Sync
 * (sending), their results come back in order (results): commit, conflicts reported,
 * retry after a failure or hold the stream. */
#include "config.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "apply_int.h"
#include "sql_contract.h"

/* ====================================================================================
 * Queues
 * ==================================================================================== */

struct expect *aamm__apply_exp_push(struct aamm_apply *ap, int kind, struct qtxn *t,
                                    struct lrel *rel, long idx)
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
    if (t && t->streamed && idx >= 0) /* absolute: its answered prefix moves away */
        idx += (long)t->base;
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

void aamm__apply_qtxn_free(struct qtxn *t)
{
    if (!t)
        return;
    for (size_t i = t->ncleared; i < t->n; i++)
        aamm_change_clear(&t->changes[i]);
    aamm__free(t->changes);
    aamm_transaction_clear(&t->hdr);
    aamm__free(t->errmsg);
    aamm__free(t->errdetail);
    for (size_t i = 0; t->verdicts && i < t->n; i++)
        aamm__free(t->verdicts[i]);
    aamm__free(t->verdicts);
    qtxn_drop_conflicts(t);
    while (t->kept) {
        struct qkept *k = t->kept;
        t->kept = k->next;
        aamm_change_clear(&k->c);
        aamm__free(k);
    }
    aamm__free(t);
}

void aamm__apply_forget_prepared(struct aamm_apply *ap)
{
    ap->fixed_prepared = false;
    for (int i = 0; i < ap->nmerged; i++)
        ap->merged[i].prepared = false;
    for (struct lrel *r = ap->rels; r; r = r->next)
        for (int i = 0; i < r->nstmts; i++)
            r->stmts[i].prepared = false;
}

/* The origin's progress read after connecting (or after a failure) is behind
 * transactions apply committed: a server crash took back commits that were not flushed.
 * Those transactions are still queued (retire() keeps them until flushed): send them
 * again, in order, from the progress read. */
void aamm__apply_reclaim(struct aamm_apply *ap)
{
    bool any = false;
    /* a streamed transaction among them cannot be sent again: everything from the first
     * one taken back is fed again from the flushed position */
    struct qtxn *from = NULL;
    bool streamed = false;
    for (struct qtxn *q = ap->head; q; q = q->next) {
        bool back = !q->done || (!q->skipped && q->hdr.end_lsn > ap->progress);
        if (back && !from)
            from = q;
        if (back && q->streamed)
            streamed = true;
    }
    if (streamed) {
        if (ap->flushed > ap->progress)
            ap->flushed = ap->progress;
        aamm__apply_stream_fail(ap, from, "the server took back commits not yet flushed");
    }
    for (struct qtxn *q = ap->head; q; q = q->next) {
        if (!q->done || q->skipped || q->hdr.end_lsn <= ap->progress)
            continue;
        q->done = false;
        q->sent = false;
        ap->nunflushed--;
        ap->committed--;
        any = true;
    }
    if (any) {
        AAMM_WARN("apply: origin %s is back at %" PRIX64 " (a server crash took back commits "
                  "not yet flushed): applying them again",
                  ap->origin, ap->progress);
        if (ap->flushed > ap->progress)
            ap->flushed = ap->progress;
        aamm__apply_unsend_all(ap);
    }
}

void aamm__apply_unsend_all(struct aamm_apply *ap)
{
    ap->cursor = ap->head;
    ap->sending = NULL; /* its implicit transaction died with the connection, or it never
                           began (callers: no transaction is partly sent) */
    for (struct qtxn *q = ap->head; q; q = q->next) {
        if (q->done)
            continue;
        q->sent = false;
        q->opened = false;
        q->sent_to = 0;
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

struct qtxn *aamm__apply_streamed_pending(const struct aamm_apply *ap)
{
    for (struct qtxn *q = ap->head; q; q = q->next)
        if (q->streamed && !q->done)
            return q;
    return NULL;
}

bool aamm__apply_stream_waits(const struct qtxn *t)
{
    return t->streamed && !t->closed && !t->failed && (t->sent_to == t->n || t->catalog_wait);
}

void aamm__apply_stream_fail(struct aamm_apply *ap, struct qtxn *from, const char *why)
{
    struct qtxn *s = from;
    while (s && !s->streamed)
        s = s->next;
    char lsn[AAMM_LSN_BUFSIZE], fl[AAMM_LSN_BUFSIZE];
    aamm_lsn_format(s ? s->hdr.commit_lsn : from->hdr.commit_lsn, lsn);
    /* unlink @from and everything after it */
    struct qtxn *prev = NULL;
    for (struct qtxn *q = ap->head; q && q != from; q = q->next)
        prev = q;
    if (prev)
        prev->next = NULL;
    else
        ap->head = NULL;
    ap->tail = prev;
    size_t ntx = 0;
    for (struct qtxn *q = from, *next; q; q = next) {
        next = q->next;
        if (q->done && !q->skipped) { /* a commit the server took back */
            ap->nunflushed--;
            ap->committed--;
        }
        ap->ntxns--;
        ap->nqueued_changes -= q->n;
        ntx++;
        if (q == ap->open)
            ap->open = NULL;
        aamm__apply_qtxn_free(q);
    }
    if (ap->open) { /* fed after it: fed again too */
        ap->nqueued_changes -= ap->open->n;
        aamm__apply_qtxn_free(ap->open);
        ap->open = NULL;
    }
    ap->sending = NULL;
    ap->fail_txn = NULL;
    aamm__apply_unsend_all(ap); /* what is left is committed */
    ap->received = ap->progress;
    ap->prev_sent = ap->progress;
    aamm_lsn_format(ap->flushed, fl);
    aamm__errf(&ap->err, AAMM_EGAP,
               "apply: streamed transaction %s failed (%s): resend from %s", lsn, why, fl);
    AAMM_WARN("%s (%zu transactions discarded)", aamm__errmsg(&ap->err), ntx);
    ap->gap_pending = true;
}

static bool is_transient(const char *sqlstate)
{
    /* deadlock, lock timeout, serialization, the guard, a key lock another applier held
     * (AA005, a merged statement's guard), a write that raced a local writer (AA006,
     * aamm.recheck_tombs(), aamm.write_raced()), object in use, query canceled,
     * the backend terminated or the server shutting down (57P0x), connection exceptions */
    return strcmp(sqlstate, "40P01") == 0 || strcmp(sqlstate, "55P03") == 0 ||
           strcmp(sqlstate, "40001") == 0 || strcmp(sqlstate, AAMM_SQLSTATE_GUARD) == 0 ||
           strcmp(sqlstate, AAMM_SQLSTATE_KEY_LOCK_BUSY) == 0 ||
           strcmp(sqlstate, AAMM_SQLSTATE_RACED) == 0 ||
           strcmp(sqlstate, "55006") == 0 ||
           strcmp(sqlstate, "57014") == 0 || strncmp(sqlstate, "57P0", 4) == 0 ||
           strncmp(sqlstate, "08", 2) == 0;
}

/* ====================================================================================
 * Conflict policy of a relation
 * ==================================================================================== */

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
static aamm_apply_resolver_cb resolver_of(const struct aamm_apply *ap, const struct lrel *r, void **arg)
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
 * Sending
 * ==================================================================================== */

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
    char *sql = aamm__apply_build_sql(r, op, mask, has_u, 0, NULL);
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
        if (!aamm__apply_number_params(r, op, mask, &vparam, &kparam, &ntyped)) {
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
    if (!ok || !aamm__apply_exp_push(ap, E_PREPARE, t, r, idx)) {
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

static int ensure_scratch(struct aamm_apply *ap, uint32_t nc);
static int prep_row(struct aamm_apply *ap, struct qtxn *t, long idx, const char **fixed, char *mask,
                    const char **vals, int *np_out, int *op_out, bool *has_u_out);

/* Send one change of @t. */
static int send_change(struct aamm_apply *ap, struct qtxn *t, long idx, const char **fixed)
{
    struct aamm_change *c = &t->changes[idx];
    if (c->kind == AAMM_CHANGE_MESSAGE) {
        /* DDL runs at its place in the transaction (ddl.h); other messages only reach the
         * host's on_message after the commit */
        if (!c->transactional || !c->prefix || strcmp(c->prefix, AAMM_SQL_DDL_PREFIX) != 0 ||
            !c->content)
            return 0;
        const char *pv[2] = {c->content, fixed[1]};
        if (!PQsendQueryParams(ap->conn, "SELECT " AAMM_SQL_FN_APPLY_DDL "($1, $2::int)", 2, NULL,
                               pv, NULL, NULL, 0))
            return AAMM_ECONN;
        if (!aamm__apply_exp_push(ap, E_STMT, t, NULL, idx))
            return AAMM_ENOMEM;
        return 0;
    }
    if (c->kind == AAMM_CHANGE_TRUNCATE) {
        char *sql = aamm__apply_truncate_sql(c);
        if (!sql)
            return AAMM_ENOMEM;
        int ok = PQsendQueryParams(ap->conn, sql, 0, NULL, NULL, NULL, NULL, 0);
        aamm__free(sql);
        if (!ok)
            return AAMM_ECONN;
        if (!aamm__apply_exp_push(ap, E_STMT, t, NULL, idx))
            return AAMM_ENOMEM;
        for (uint32_t i = 0; i < c->nrelations; i++) {
            const char *pv[3] = {fixed[0], fixed[1], lrel_of(c->relations[i])->label};
            if (!PQsendQueryParams(ap->conn,
                                   "SELECT " AAMM_SQL_FN_LOG_TRUNCATE
                                   "($3, $1::timestamptz, $2::int)",
                                   3, NULL, pv, NULL, NULL, 0))
                return AAMM_ECONN;
            if (!aamm__apply_exp_push(ap, E_STMT, t, NULL, idx))
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
    if (!aamm__apply_exp_push(ap, E_STMT, t, r, idx))
        return AAMM_ENOMEM;
    return 0;
}

/*
 * The statement shape and parameters of the row change @idx of @t: @mask (room for 2 x the
 * relation's columns + 2) gets the written-columns mask, and for an UPDATE or DELETE with
 * the whole old row (REPLICA IDENTITY FULL) the old row's columns after it, @vals (room for
 * NFIXED_ALL + 3 x columns) the parameters, *@np their count, *@op the statement kind,
 * *@has_u whether unchanged-TOAST values are left out. Returns 0 or AAMM_EMALFORMED.
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
    /* the remote old row, which aamm.decide() compares with the local row to tell whether
     * the remote writer had seen it (doc/conflicts.md, "What is logged"): its values that
     * travel, unchanged TOAST left out (it counts as equal) */
    bool oldrow = c->kind != AAMM_CHANGE_INSERT && ot && c->old_kind == AAMM_OLD_FULL;
    if (oldrow) {
        for (uint32_t i = 0; i < nc; i++)
            mask[nc + 1 + i] =
                r->r2l[i] >= 0 && ot->values[i].kind != AAMM_VALUE_UNCHANGED ? '1' : '0';
        mask[2 * nc + 1] = '\0';
    }
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
    if (oldrow)
        for (uint32_t i = 0; i < nc; i++)
            if (mask[nc + 1 + i] == '1')
                vals[np++] = ot->values[i].kind == AAMM_VALUE_TEXT ? ot->values[i].data : NULL;
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
    size_t need = 2 * (size_t)nc + 2; /* prep_row()'s mask; the values take 3 x nc + fixed */
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
    struct expect *e = aamm__apply_exp_push(ap, E_STMT, t, r, (long)i0);
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
    size_t per = NFIXED_ALL + 3 * (size_t)widest + 2, stride = 2 * (size_t)widest + 2;
    const char **vals = aamm__calloc(n * per + 6, sizeof *vals);
    char *masks = aamm__calloc(n, stride);
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
        char *mask = masks + i * stride;
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
        char *sql =
            aamm__apply_merged_sql(t->changes, n, ops, masks, stride, hasu, nps);
        Oid *types = aamm__malloc((size_t)(total + 6) * sizeof *types);
        if (!sql || !types) {
            rc = AAMM_ENOMEM;
        } else {
            for (int i = 0; i < total + 6; i++)
                types[i] = 25; /* text: every item casts its parameters */
            if (!PQsendPrepare(ap->conn, m->name, sql, total + 6, types))
                rc = AAMM_ECONN;
            else if (!aamm__apply_exp_push(ap, E_PREPARE, t, NULL, 0))
                rc = AAMM_ENOMEM;
            else
                m->prepared = true;
        }
        aamm__free(types);
        aamm__free(sql);
    }
    if (rc == 0) {
        if (!PQsendQueryPrepared(ap->conn, m->name, total + 6, vals, NULL, NULL, 0))
            rc = AAMM_ECONN;
        else if (!aamm__apply_exp_push(ap, E_STMT, t, NULL, 0))
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

/* Every FULL_CHECK units a step looks whether the socket took what libpq holds; when it
 * did not (the server reads slower than we send), the step stops sending: more would only
 * pile up in libpq's buffer (and cost a failed send() and a read per statement), and the
 * fd's AAMM_WRITE wakes the host when there is room. */
#define FULL_CHECK 256

/* Whether the socket is full (*@since: units sent since the last check, reset). Returns 1
 * (full: ap->want_write), 0, or AAMM_ECONN. */
static int socket_full(struct aamm_apply *ap, size_t *since)
{
    if (*since < FULL_CHECK)
        return 0;
    *since = 0;
    int f = PQflush(ap->conn);
    if (f < 0)
        return AAMM_ECONN;
    ap->want_write = f == 1;
    return f;
}

/* A streamed transaction (aamm_apply_options.max_txn_changes): map the relations of the
 * changes fed since the last round, [locked_to, n) (a catalog query inside its implicit
 * transaction, answered at once through a flush request), then take their key locks (one
 * statement, the guard's lock part). Returns 0, 1 when it waits for the catalog, or an
 * error; a mapping error fails the transaction (its Sync follows). */
static const char stream_locks_sql[] =
    "SELECT CASE WHEN u.e THEN pg_catalog.pg_advisory_xact_lock(u.x)::text "
    "ELSE pg_catalog.pg_advisory_xact_lock_shared(u.x)::text END "
    "FROM ROWS FROM (pg_catalog.unnest($1::int8[]), pg_catalog.unnest($2::bool[])) AS u(x, e)";

static int stream_prepare(struct aamm_apply *ap, struct qtxn *t, size_t *budget)
{
    t->catalog_wait = false;
    if (t->locked_to >= t->n || t->failed)
        return 0;
    for (size_t i = t->locked_to; i < t->n; i++) {
        struct aamm_change *c = &t->changes[i];
        uint32_t nr = c->kind == AAMM_CHANGE_TRUNCATE ? c->nrelations : (c->relation ? 1 : 0);
        for (uint32_t j = 0; j < nr; j++) {
            struct lrel *r =
                lrel_of(c->kind == AAMM_CHANGE_TRUNCATE ? c->relations[j] : c->relation);
            if (r->mapped && r->map_code) {
                if (!t->errmsg) {
                    t->errmsg = aamm__strdup(r->map_msg ? r->map_msg : "mapping failed");
                    snprintf(t->sqlstate, sizeof t->sqlstate, "%s",
                             r->map_code == AAMM_ENOTFOUND ? "42P01" : "XX000");
                }
                t->failed = true;
                return 0;
            }
            if (r->mapped)
                continue;
            if (!r->catalog_pending) {
                const char *pv[2] = {r->rel.schema, r->rel.name};
                if (!PQsendQueryParams(ap->conn, aamm__apply_catalog_sql, 2, NULL, pv, NULL, NULL,
                                       0) ||
                    !PQsendFlushRequest(ap->conn))
                    return AAMM_ECONN;
                if (!aamm__apply_exp_push(ap, E_CATALOG, NULL, r, 0))
                    return AAMM_ENOMEM;
                r->catalog_pending = true;
                *budget = *budget > 1 ? *budget - 1 : 0;
            }
            t->catalog_wait = true; /* its answer wakes the host (AAMM_READ) */
            return 1;
        }
    }
    if (ap->opt.lock_keys) {
        struct aamm__sb ids = {0}, modes = {0};
        int rc = aamm__apply_build_locks(t->changes + t->locked_to, t->n - t->locked_to, false,
                                         &ids, &modes);
        if (rc == 0 && (ids.oom || modes.oom))
            rc = AAMM_ENOMEM;
        const char *pv[2] = {ids.s, modes.s};
        if (rc == 0 && !PQsendQueryParams(ap->conn, stream_locks_sql, 2, NULL, pv, NULL, NULL, 0))
            rc = AAMM_ECONN;
        if (rc == 0 && !aamm__apply_exp_push(ap, E_STMT, t, NULL, (long)t->locked_to))
            rc = AAMM_ENOMEM;
        aamm__free(ids.s);
        aamm__free(modes.s);
        if (rc < 0)
            return rc;
        *budget = *budget > 1 ? *budget - 1 : 0;
        t->flush_due = true;
    }
    t->locked_to = t->n;
    return 0;
}

/* Send @t as guard; changes; Sync: one implicit transaction, committed by the Sync (no
 * BEGIN and COMMIT statements: each costs the backend a statement), spending at most
 * *@budget units (STEP_SEND). A transaction larger than what is left goes out over several
 * steps: it stays ap->sending, and nothing else is sent, until its Sync is out. Returns 0
 * (sent up to its Sync), 1 when it has to wait (catalog, budget), or an error. */
static int send_txn(struct aamm_apply *ap, struct qtxn *t, size_t *budget, size_t *since)
{
    char ts[64], node[16];
    aamm_time_format(t->hdr.commit_time, ts, sizeof ts);
    snprintf(node, sizeof node, "%" PRIu32, ap->opt.source_node);
    const char *fixed[NFIXED] = {ts, node, NULL, NULL};
    bool merged = false;
    if (!t->opened) {
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
                    if (!PQsendQueryParams(ap->conn, aamm__apply_catalog_sql, 2, NULL, pv, NULL,
                                           NULL, 0) ||
                        !PQpipelineSync(ap->conn))
                        return AAMM_ECONN;
                    if (!aamm__apply_exp_push(ap, E_CATALOG, NULL, r, 0) ||
                        !aamm__apply_exp_push(ap, E_MSYNC, NULL, NULL, 0))
                        return AAMM_ENOMEM;
                    r->catalog_pending = true;
                    *budget = *budget > 2 ? *budget - 2 : 0;
                }
                return 1;
            }
        }
        /* 2. the guard, or the whole transaction as one merged statement (its n changes
         *    with the guard folded in, and the Sync, must fit in what is left) */
        bool merge = !t->streamed && mergeable(t) && aamm__now_ms() >= ap->fold_off_until_ms;
        if (*budget < (merge ? t->n + 1 : 2))
            return 1;
        t->upsert_run = NULL;
        char lsn_prev[AAMM_LSN_BUFSIZE], lsn_end[AAMM_LSN_BUFSIZE];
        aamm_lsn_format(ap->prev_sent, lsn_prev);
        /* (streamed and still open: its end is not known yet; set before its Sync) */
        aamm_lsn_format(t->closed ? t->hdr.end_lsn : t->hdr.commit_lsn, lsn_end);
        if (!ap->fixed_prepared) {
            if (!PQsendPrepare(ap->conn, "aamm_guard", aamm__apply_guard_sql(), 6, NULL) ||
                !aamm__apply_exp_push(ap, E_PREPARE, t, NULL, -1))
                return AAMM_ECONN;
            ap->fixed_prepared = true;
        }
        struct aamm__sb ids = {0}, modes = {0};
        /* every applied transaction takes the join freeze key shared before it writes:
         * aamm_node_join() holds it exclusive on the upstream while it reads the origin
         * progress and creates its slot (whose creation waits for transactions that have
         * written, so none may wait for the freeze after writing) */
        int rc = aamm__apply_build_locks(t->changes, ap->opt.lock_keys ? t->n : 0, true, &ids,
                                         &modes);
        const char *gp[6] = {ap->origin, lsn_prev, lsn_end, ts, ids.s, modes.s};
        /* a small transaction: one statement with the guard folded in (1 when the shape
         * cache is full: nothing sent, the guard and the changes go one by one) */
        if (rc == 0 && merge) {
            rc = send_merged(ap, t, fixed, gp);
            merged = rc == 0;
            if (rc > 0)
                rc = 0;
        }
        if (rc == 0 && !merged &&
            (!PQsendQueryPrepared(ap->conn, "aamm_guard", 6, gp, NULL, NULL, 0) ||
             !aamm__apply_exp_push(ap, E_GUARD, t, NULL, -1)))
            rc = AAMM_ECONN;
        aamm__free(ids.s);
        aamm__free(modes.s);
        if (rc < 0)
            return rc;
        /* from here on nothing but this transaction may go out until its Sync */
        t->opened = true;
        t->sent_to = merged ? t->n : 0;
        t->locked_to = t->n; /* the guard mapped and locked what it has */
        t->flush_due = t->streamed;
        ap->sending = t;
        *budget -= merged ? t->n : 1;
        *since += merged ? t->n : 1;
    }
    /* 3. the changes, as far as the budget goes (one unit per row; a run of inserts is cut
     *    at the budget). Once a statement of the transaction failed, the server discards
     *    the rest until the Sync: the Sync follows at once. */
    if (t->streamed) {
        int rc = stream_prepare(ap, t, budget);
        if (rc != 0)
            return rc;
    }
    if (t->failed)
        t->sent_to = t->n;
    for (size_t i = t->sent_to; i < t->n && *budget > 0;) {
        if (t->changes[i].relation)
            fixed[2] = lrel_of(t->changes[i].relation)->label;
        size_t j = t->nobatch ? i : insert_run_end(t, i);
        if (j - i > *budget)
            j = i + *budget;
        int rc;
        size_t cost = j - i >= BATCH_MIN ? j - i : 1;
        if (j - i >= BATCH_MIN) {
            rc = send_many(ap, t, i, j, fixed);
            i = j;
        } else {
            rc = send_change(ap, t, (long)i, fixed);
            i++;
        }
        if (rc < 0)
            return rc;
        *budget -= cost;
        *since += cost;
        t->sent_to = i;
        t->flush_due = t->streamed;
        rc = socket_full(ap, since);
        if (rc != 0)
            return rc;
    }
    /* (streamed and still open: wait for more; send_pending() asks for the answers) */
    if (t->sent_to < t->n || *budget < 1 || (t->streamed && !t->closed && !t->failed))
        return 1;
    /* 4. a transaction without a row change (messages only) writes nothing, and a commit
     *    without a transaction id writes no WAL: the origin would stay behind its end LSN,
     *    the next transaction's guard would trip, and the transaction would never count as
     *    flushed. A transaction id makes the commit a record that carries the origin's
     *    position. */
    bool rows = t->streamed; /* (its row changes may be freed already) */
    for (size_t i = 0; i < t->n && !rows; i++)
        rows = t->changes[i].kind != AAMM_CHANGE_MESSAGE;
    if (!rows && (!PQsendQueryParams(ap->conn, "SELECT pg_catalog.pg_current_xact_id()", 0, NULL,
                                     NULL, NULL, NULL, 0) ||
                  !aamm__apply_exp_push(ap, E_STMT, t, NULL, -1)))
        return AAMM_ECONN;
    /* 5. a streamed transaction's guard set up the origin with its commit LSN as the end
     *    (not known then): the real one now */
    if (t->streamed && !t->failed) {
        char lsn_end[AAMM_LSN_BUFSIZE];
        aamm_lsn_format(t->hdr.end_lsn, lsn_end);
        const char *pv[2] = {lsn_end, ts};
        if (!PQsendQueryParams(ap->conn,
                               "SELECT pg_catalog.pg_replication_origin_xact_setup($1::pg_lsn, "
                               "$2::timestamptz)",
                               2, NULL, pv, NULL, NULL, 0) ||
            !aamm__apply_exp_push(ap, E_STMT, t, NULL, -1))
            return AAMM_ECONN;
    }
    /* 6. the Sync commits the implicit transaction its statements ran in */
    if (!PQpipelineSync(ap->conn) || !aamm__apply_exp_push(ap, E_SYNC, t, NULL, -1))
        return AAMM_ECONN;
    *budget -= 1;
    *since += 1;
    t->sent = true;
    ap->sending = NULL;
    ap->prev_sent = t->hdr.end_lsn;
    ap->ninflight++;
    return 0;
}

/* The open transaction has more than max_txn_changes changes and every earlier one is
 * committed: queue it now (still open) and stream it (apply.h, "Huge transactions"). Not
 * when its commit LSN or time is unknown, when it may be a duplicate (its commit record lies
 * before the last transaction accepted), or when its streaming failed for good before. */
static void stream_start(struct aamm_apply *ap)
{
    struct qtxn *t = ap->open;
    if (!t || t->streamed || t->n <= ap->opt.max_txn_changes || ap->sending || ap->fail_txn ||
        ap->block_code || ap->recovering || ap->state != S_READY)
        return;
    if (t->hdr.commit_lsn == AAMM_LSN_INVALID || t->hdr.commit_time == 0 ||
        t->hdr.commit_lsn < ap->received || t->hdr.commit_lsn == ap->nostream_lsn)
        return;
    for (struct qtxn *q = ap->head; q; q = q->next)
        if (!q->done)
            return;
    t->streamed = true;
    aamm__apply_enqueue(ap, t);
    char lsn[AAMM_LSN_BUFSIZE];
    aamm_lsn_format(t->hdr.commit_lsn, lsn);
    AAMM_INFO("apply: transaction %s streamed (more than %zu changes)", lsn,
              ap->opt.max_txn_changes);
}

int aamm__apply_send_pending(struct aamm_apply *ap)
{
    /* output still waiting in libpq (the server reads slower than we write): add nothing
     * until it is out, the host polls for writing */
    if (ap->want_write) {
        int f = PQflush(ap->conn);
        if (f < 0)
            return AAMM_ECONN;
        ap->want_write = f == 1;
        if (ap->want_write)
            return 0;
    }
    size_t budget = ap->step_send, since = 0;
    int rc = 0;
    stream_start(ap);
    /* a transaction partly sent goes on whatever happened meanwhile: its implicit
     * transaction stays open on the server until its Sync, and after a failure of an
     * earlier one its guard fails, so the Sync rolls it back */
    if (ap->sending)
        rc = send_txn(ap, ap->sending, &budget, &since);
    if (rc != 0 || ap->sending || ap->fail_txn || ap->block_code || ap->recovering)
        goto out;
    struct qtxn *t = ap->cursor;
    for (; t; t = t->next) {
        if (t->done || t->sent)
            continue;
        if (ap->ninflight >= ap->opt.max_pipeline_txns || budget < 2)
            break;
        /* exactly once: anything at or below what is (or will be) committed is a duplicate.
         * aamm_apply_commit() already dropped what was at or below the last transaction
         * it accepted or the progress read at setup; what remains are transactions queued
         * before the progress was read (fed before the session was ready, or sent on a
         * connection that was lost before their result came back, whose commit the
         * progress read on the new connection shows) */
        if (!t->streamed && t->hdr.end_lsn <= ap->prev_sent) {
            t->done = t->skipped = true;
            continue;
        }
        rc = send_txn(ap, t, &budget, &since);
        if (rc == 0)
            rc = socket_full(ap, &since);
        if (rc != 0)
            break;
    }
    ap->cursor = t;
    if (rc > 0)
        rc = 0;
out:
    /* a streamed transaction's statements are answered before its Sync only when asked:
     * its changes are freed (and the host's feed goes on) as they are */
    if (rc >= 0 && ap->sending && ap->sending->flush_due) {
        if (!PQsendFlushRequest(ap->conn))
            rc = AAMM_ECONN;
        ap->sending->flush_due = false;
    }
    if (ap->step_send - budget > ap->dbg.max_step_sent)
        ap->dbg.max_step_sent = ap->step_send - budget;
    return rc < 0 ? rc : 0;
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

/*
 * libpq's notice receiver: aamm.log_conflict() raises NOTICE "aamm_conflict" with the
 * conflict's fields in its detail, aamm.decide() "aamm_conflict_unlogged" with the same
 * fields for a decision it counts but does not log (sql/aamm--4--5.sql). libpq parses a
 * statement's messages only after the previous statement's result was taken, so the
 * statement that met the conflict is the head of the expect queue. Kept with its
 * transaction, counted (and, when logged, reported) when it commits.
 */
/* Split @s in place at chr(31) into @n fields (the last one takes the rest); false when
 * there are fewer. The server's messages put JSON (which never holds chr(31) raw) first and
 * free text last. */
static bool split_fields(char *s, char **f, int n)
{
    for (int i = 0; i < n - 1; i++) {
        f[i] = s;
        char *sep = strchr(s, AAMM_SQL_SEP);
        if (!sep)
            return false;
        *sep = '\0';
        s = sep + 1;
    }
    f[n - 1] = s;
    return true;
}

void aamm__apply_on_notice(void *arg, const PGresult *res)
{
    struct aamm_apply *ap = arg;
    const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    const char *d = PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL);
    if (!msg || !d || ap->exp_n == 0)
        return;
    bool logged = strcmp(msg, AAMM_SQL_NOTICE_CONFLICT) == 0;
    if (!logged && strcmp(msg, AAMM_SQL_NOTICE_CONFLICT_UNLOGGED) != 0)
        return;
    struct qtxn *t = ap->exp[ap->exp_head].t;
    if (!t)
        return;
    char *f[AAMM_SQL_NOTICE_CONFLICT_NFIELDS];
    char *copy = aamm__strdup(d);
    if (!copy)
        return;
    if (!split_fields(copy, f, AAMM_SQL_NOTICE_CONFLICT_NFIELDS)) { /* not ours after all */
        aamm__free(copy);
        return;
    }
    struct qconflict *q = aamm__calloc(1, sizeof *q);
    if (!q) {
        aamm__free(copy);
        return;
    }
    q->logged = logged;
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
    q->c.resolution = (enum aamm_resolution)aamm_conflict_resolution_parse(f[8]);
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
    ap->nunflushed++;
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
        if ((int)q->c.kind > 0 && (int)q->c.kind < AAMM_CONFLICT_NKINDS) {
            ap->counters[q->c.kind]++;
            ap->unlogged[q->c.kind] += !q->logged;
        }
        if (q->logged && ap->opt.on_conflict)
            ap->opt.on_conflict(ap, &q->c, ap->opt.conflict_arg);
    }
    for (struct qkept *k = t->kept; k && ap->opt.on_message; k = k->next)
        ap->opt.on_message(ap, true, k->c.prefix ? k->c.prefix : "", k->c.content,
                           k->c.content_len, ap->opt.message_arg);
    for (size_t i = 0; i < t->n; i++) {
        struct aamm_change *c = &t->changes[i];
        if (c->kind == AAMM_CHANGE_MESSAGE && ap->opt.on_message)
            ap->opt.on_message(ap, true, c->prefix ? c->prefix : "", c->content, c->content_len,
                               ap->opt.message_arg);
    }
}

/* Free the transactions at the head that are skipped, or committed and flushed. A
 * committed transaction stays until the flushed position passes it: a server crash takes
 * back commits not yet flushed (synchronous_commit = off), and aamm__apply_reclaim() then
 * sends them again. */
static void retire(struct aamm_apply *ap)
{
    while (ap->head && ap->head->done &&
           (ap->head->skipped || ap->head->hdr.end_lsn <= ap->flushed)) {
        struct qtxn *t = ap->head;
        if (!t->skipped)
            ap->nunflushed--;
        ap->head = t->next;
        if (!ap->head)
            ap->tail = NULL;
        if (ap->cursor == t)
            ap->cursor = t->next;
        if (t->skipped)
            ap->skipped++;
        ap->nqueued_changes -= t->n;
        ap->ntxns--;
        t->next = ap->reap; /* freed by reap(), a budget a step */
        ap->reap = t;
    }
}

/* Free the changes of the streamed transaction being sent whose statements answered OK
 * (its transactional messages are kept for on_message), and move the rest down once the
 * freed prefix is as long as what remains: its memory stays that of its unanswered
 * changes. */
static void stream_free(struct aamm_apply *ap)
{
    struct qtxn *t = ap->sending;
    if (!t || !t->streamed)
        return;
    size_t upto = t->confirmed > t->base ? t->confirmed - t->base : 0;
    if (upto > t->sent_to)
        upto = t->sent_to;
    struct qkept **kp = &t->kept;
    while (*kp)
        kp = &(*kp)->next;
    while (t->ncleared < upto) {
        struct aamm_change *c = &t->changes[t->ncleared++];
        if (c->kind == AAMM_CHANGE_MESSAGE && c->transactional) {
            struct qkept *k = aamm__calloc(1, sizeof *k);
            if (k) {
                k->c = *c;
                memset(c, 0, sizeof *c);
                *kp = k;
                kp = &k->next;
            } else {
                AAMM_WARN("apply: out of memory: a transactional message is not reported");
            }
        }
        aamm_change_clear(c);
    }
    if (t->ncleared < 256 || t->ncleared * 2 < t->n)
        return;
    size_t k = t->ncleared;
    memmove(t->changes, t->changes + k, (t->n - k) * sizeof *t->changes);
    t->n -= k;
    t->sent_to -= k;
    t->locked_to -= k;
    t->base += k;
    t->ncleared = 0;
    ap->nqueued_changes -= k;
    if (t->cap > 1024 && t->cap > 4 * t->n) { /* give back what a burst took */
        size_t nc = t->cap / 2;
        struct aamm_change *c = aamm__realloc(t->changes, nc * sizeof *c);
        if (c) {
            t->changes = c;
            t->cap = nc;
        }
    }
}

/* Free the changes of retired transactions, at most ap->step_free a step: freeing a
 * transaction of 400,000 changes at once would take tens of milliseconds. */
static void reap(struct aamm_apply *ap)
{
    size_t left = ap->step_free;
    while (ap->reap && left > 0) {
        struct qtxn *t = ap->reap;
        while (t->ncleared < t->n && left > 0) {
            aamm_change_clear(&t->changes[t->ncleared++]);
            left--;
        }
        if (t->ncleared < t->n)
            break;
        ap->reap = t->next;
        aamm__apply_qtxn_free(t);
    }
    if (ap->step_free - left > ap->dbg.max_step_freed)
        ap->dbg.max_step_freed = ap->step_free - left;
}

static int classify(const char *sqlstate)
{
    if (strcmp(sqlstate, "23505") == 0 || strcmp(sqlstate, AAMM_SQLSTATE_POLICY_ERROR) == 0)
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
    aamm_apply_resolver_cb fn = r ? resolver_of(ap, r, &arg) : NULL;
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
        rc = set_verdict(t, idx, aamm_conflict_resolution_name(res), f[1]);
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
            ap->opt.on_conflict(ap, &cf, ap->opt.conflict_arg);
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

void aamm__apply_after_failure(struct aamm_apply *ap)
{
    struct qtxn *t = ap->fail_txn, *orig = t;
    bool was_batched = !t->nobatch;
    if (PQstatus(ap->conn) == CONNECTION_BAD) { /* e.g. the backend was terminated */
        aamm__apply_conn_error(ap, "reading results");
        return;
    }
    /* 1. the failed transaction ended at its Sync (the rest of the pipeline failed its
     *    guards): forget statements that may not exist; re-read the progress the guard
     *    compares with */
    /* the failed transaction's xact setup outlives its abort: without this reset, the
     * next commit of this session would move the origin to the failed end LSN */
    PQsendQueryParams(ap->conn, "SELECT pg_catalog.pg_replication_origin_xact_reset()", 0, NULL,
                      NULL, NULL, NULL, 0);
    aamm__apply_exp_push(ap, E_MISC, NULL, NULL, 0);
    PQsendQueryParams(ap->conn, "DEALLOCATE ALL", 0, NULL, NULL, NULL, NULL, 0);
    aamm__apply_exp_push(ap, E_MISC, NULL, NULL, 0);
    const char *pv[1] = {ap->origin};
    PQsendQueryParams(ap->conn,
                      "SELECT COALESCE(pg_catalog.pg_replication_origin_progress("
                      "$1, false), '0/0')",
                      1, NULL, pv, NULL, NULL, 0);
    aamm__apply_exp_push(ap, E_REPROGRESS, NULL, NULL, 0);
    PQpipelineSync(ap->conn);
    aamm__apply_exp_push(ap, E_MSYNC, NULL, NULL, 0);
    aamm__apply_forget_prepared(ap);
    if (orig->streamed) {
        /* it cannot be sent again from memory: discard it and what follows, the host feeds
         * them again from the flushed position; not streamed again when a retry would not
         * help (held whole, the stream holds or the resolver runs as usual) */
        const char *ss = orig->sqlstate[0] ? orig->sqlstate : "XX000";
        if (!is_transient(ss))
            ap->nostream_lsn = orig->hdr.commit_lsn;
        char why[512];
        snprintf(why, sizeof why, "%s: %s", ss, orig->errmsg ? orig->errmsg : "failed");
        ap->dbg.failures++;
        aamm__apply_stream_fail(ap, orig, why);
        ap->prev_sent = ap->progress;
        ap->recovering = true;
        return;
    }
    t->nobatch = true;     /* its retry names the change that fails */
    struct qtxn keep = *t; /* the first failure's details, for the message below */
    t->errmsg = NULL;
    aamm__apply_unsend_all(ap);
    t = &keep;
    /* nothing is sent until the progress re-read answers */
    ap->prev_sent = ap->progress;
    ap->recovering = true;

    const char *sqlstate = t->sqlstate[0] ? t->sqlstate : "XX000";
    ap->dbg.failures++;
    if (strcmp(sqlstate, AAMM_SQLSTATE_GUARD) == 0)
        ap->dbg.guard_trips++;
    struct aamm_change *c = t->err_change >= 0 ? &t->changes[t->err_change] : NULL;
    const char *label = c && c->relation ? lrel_of(c->relation)->label : "";
    char lsn[AAMM_LSN_BUFSIZE];
    aamm_lsn_format(t->hdr.end_lsn, lsn);
    if (strcmp(sqlstate, AAMM_SQLSTATE_RESOLVER) == 0 && c) {
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
    if (strcmp(sqlstate, AAMM_SQLSTATE_KEY_LOCK_BUSY) == 0) {
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
            ap->opt.on_conflict(ap, &uc, ap->opt.conflict_arg);
        char ts[64], node[16];
        aamm_time_format(t->hdr.commit_time, ts, sizeof ts);
        snprintf(node, sizeof node, "%" PRIu32, t->hdr.origin_node);
        const char *lp[3] = {label, ts, node};
        PQsendQueryParams(ap->conn,
                          "SELECT " AAMM_SQL_FN_LOG_CONFLICT
                          "('unique_other', $1, NULL, NULL, NULL, NULL, "
                          "NULL, $2::timestamptz, $3::int, 'error')",
                          3, NULL, lp, NULL, NULL, 0);
        aamm__apply_exp_push(ap, E_MISC, NULL, NULL, 0);
        PQpipelineSync(ap->conn);
        aamm__apply_exp_push(ap, E_MSYNC, NULL, NULL, 0);
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
                snprintf(e.t->sqlstate, sizeof e.t->sqlstate, AAMM_SQLSTATE_NOT_COMMITTED);
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
        else if (e.t && e.t->streamed && e.idx > (long)e.t->confirmed)
            e.t->confirmed = (size_t)e.idx; /* every change before it answered OK */
        break;
    case E_PREPARE:
        if (err) {
            AAMM_WARN("apply: %s: preparing a statement failed: %s", e.rel ? e.rel->label : "",
                      PQresultErrorMessage(res));
            record_error(e.t, res, e.idx);
        } else if (st == PGRES_PIPELINE_ABORTED && e.t) {
            e.t->failed = true;
        } else if (e.t && e.t->streamed && e.idx > (long)e.t->confirmed) {
            e.t->confirmed = (size_t)e.idx;
        }
        break;
    case E_CATALOG: {
        e.rel->catalog_pending = false;
        const char *ss = err ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
        if (err && (PQstatus(ap->conn) == CONNECTION_BAD || (ss && is_transient(ss))))
            break; /* not a verdict on the mapping: read the catalog again later */
        aamm__apply_map_result(e.rel, res);
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
            ap->prev_sent = ap->progress; /* the same connection: no crash in between, so
                                             nothing to reclaim (only step_setup() does) */
        ap->recovering = false;
        break;
    default:
        break;
    }
    PQclear(res);
    return 0;
}

int aamm__apply_read_results(struct aamm_apply *ap)
{
    ap->results_more = false;
    if (!PQconsumeInput(ap->conn))
        return aamm__apply_conn_error(ap, "reading results");
    size_t taken = 0;
    while (ap->exp_n > 0 && !PQisBusy(ap->conn)) {
        if (taken == ap->step_results) { /* more next step (aamm_apply_timeout(): 0) */
            ap->results_more = true;
            break;
        }
        PGresult *res = PQgetResult(ap->conn);
        if (!res) {
            if (PQstatus(ap->conn) == CONNECTION_BAD)
                return aamm__apply_conn_error(ap, "reading results");
            continue; /* end of one query's results */
        }
        taken++;
        int rc = handle_result(ap, res);
        if (rc < 0)
            return rc;
    }
    if (taken > ap->dbg.max_step_results)
        ap->dbg.max_step_results = taken;
    if (PQstatus(ap->conn) == CONNECTION_BAD)
        return aamm__apply_conn_error(ap, "reading results");
    stream_free(ap);
    retire(ap);
    reap(ap);
    return 0;
}
