/*
 * apply_int.h: internals shared by apply.c (the handle: options, feeding, catalog
 * mapping, connection, step), apply_pipe.c (sending transactions down the pipeline and
 * handling their results) and apply_sql.c (the pure statement builder: statement texts,
 * the guard, parameter numbering, key locks), and by apply's tests.
 *
 * apply's private types keep their short names (struct lrel, qtxn, expect, ...): only the
 * apply sources and their tests include this header. libpq's types appear by their struct
 * tags (PGconn is struct pg_conn, PGresult struct pg_result) so that apply_sql.c, which
 * talks to no server, does not include libpq-fe.h. Comments name the cross-file functions
 * by their short names too (build_sql() is aamm__apply_build_sql()).
 */
#ifndef AAMM_APPLY_INT_H
#define AAMM_APPLY_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <aamm/apply.h>

#include "internal.h"
#include "sqlbuf.h"

struct pg_conn;
struct pg_result;

/* ---- types ------------------------------------------------------------------------ */

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

/* The work one aamm_apply_step() does at most (doc/ARCHITECTURE.md, "Bounded steps"),
 * each a few milliseconds: sending costs one unit per row change (a run of inserts its rows),
 * guard, Sync or catalog query; results taken; changes of retired transactions freed. A
 * step that stops at a budget leaves aamm_apply_timeout() at 0. */
#define STEP_SEND 1000
#define STEP_RESULTS 4000
#define STEP_FREE 20000

#define MERGED_MAX 128   /* cached shapes */
#define FOLD_OFF_MS 1000 /* no folded guards for this long after one met a busy key lock */
#define MERGE_CHANGES 16 /* at most this many changes per merged statement */

struct qconflict {
    struct qconflict *next;
    struct aamm_conflict c;
    char *rel, *key, *local, *remote;
    bool logged; /* in aamm.conflict_log (reported to on_conflict), else only counted */
};

/* A transactional message of a streamed transaction, kept for on_message after its commit
 * once the change that carried it was freed. */
struct qkept {
    struct qkept *next;
    struct aamm_change c;
};

struct qtxn {
    struct qtxn *next;
    struct aamm_transaction hdr;
    struct aamm_change *changes;
    size_t n, cap;
    bool closed; /* commit seen */
    bool opened; /* its guard is sent: its changes from sent_to on, then its Sync, follow */
    size_t sent_to;
    size_t ncleared; /* retired: changes already freed (reap()) */
    bool sent;       /* everything up to its Sync is sent */
    bool done;       /* committed or skipped */
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
    /* Streaming (aamm_apply_options.max_txn_changes): the open transaction goes out while it
     * is fed, is queued before its commit, and keeps only the changes whose statements have
     * not answered yet. Indexes into changes[] are relative to base, the absolute index of
     * changes[0] (the answered prefix is moved away); expects carry absolute indexes. */
    bool streamed;
    size_t base;
    size_t confirmed;   /* absolute: every change below it answered OK */
    size_t locked_to;   /* relative: changes below it are mapped and hold their key locks */
    bool catalog_wait;  /* waits for a catalog answer before sending more */
    bool flush_due;     /* sent statements the server has not been asked to answer yet */
    struct qkept *kept; /* its transactional messages already freed from changes[] */
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
    struct pg_conn *conn; /* libpq's PGconn */
    enum state state;
    int64_t wake_ms; /* S_WAIT: when to reconnect / retry */
    int backoff_ms;
    bool want_write;   /* output is waiting in libpq: send nothing more until it is out */
    bool results_more; /* the last step left results it could take (STEP_RESULTS) */
    int held_code;

    uint64_t received;  /* end LSN of the last transaction accepted by commit(), at least the
                           progress read at setup (aamm_apply_received()) */
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
    bool gap_pending;          /* a streamed transaction failed: the next aamm_apply_step()
                                  returns AAMM_EGAP (aamm__apply_stream_fail()) */
    uint64_t nostream_lsn;     /* commit LSN of a transaction whose streaming failed for a
                                  reason a retry cannot fix: held whole when fed again */

    struct lrel *rels;
    int nrels;
    struct lrel *last_rel;
    const struct aamm_relation *last_src;
    uint32_t last_gen;

    struct qtxn *head, *tail, *open;
    struct qtxn *cursor;  /* every transaction before it is sent or done */
    struct qtxn *sending; /* opened, not yet sent up to its Sync: nothing else may go out
                             before its Sync (it would join its implicit transaction) */
    struct qtxn *reap;    /* retired transactions whose changes are freed a budget a step */
    size_t nqueued_changes;
    size_t ntxns;
    size_t nunflushed; /* of them committed, kept until the flushed position passes them */
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
        aamm_apply_resolver_cb fn;
        void *arg;
    } * policies;
    aamm_apply_resolver_cb resolver; /* global resolver, or NULL */
    void *resolver_arg;

    struct mstmt merged[MERGED_MAX];
    int nmerged;
    unsigned merged_seq;

    uint64_t counters[AAMM_CONFLICT_NKINDS];
    uint64_t unlogged[AAMM_CONFLICT_NKINDS]; /* of counters[], those not logged */
    uint64_t committed, skipped;

    /* The per-step budgets (STEP_SEND, STEP_RESULTS, STEP_FREE; tests may lower them). */
    size_t step_send, step_results, step_free;

    /* Internal counters for apply's tests (not in the public stats): failures handled by
     * after_failure() (each one a retry or a hold) and, of them, guard trips (AA002); the
     * most work one step did: units sent, results taken, changes freed. */
    struct apply_debug {
        uint64_t failures;
        uint64_t guard_trips;
        size_t max_step_sent, max_step_results, max_step_freed;
    } dbg;

    char *scratch_mask; /* per-change scratch, grown to the widest relation */
    const char **scratch_vals;
    size_t scratch_cap;
};

/* Parameters: $1 commit time, $2 source node, $3 relation label, $4 policy (or verdict),
 * $5 the session origin's roident, then values. */
#define NFIXED 4
#define NFIXED_ALL 5

/* The apply relation whose aamm_relation (its first member) @r is. */
static inline struct lrel *lrel_of(const struct aamm_relation *r)
{
    return (struct lrel *)(void *)((char *)(uintptr_t)r - offsetof(struct lrel, rel));
}

/* FNV-1a, continued from @h */
static inline uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *c = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ c[i]) * UINT64_C(1099511628211);
    return h;
}

#define FNV_INIT UINT64_C(14695981039346656037)

/* The advisory lock id of one key: FNV-1a of the relation label and the key texts, the
 * same on every applier of this node since values arrive in pinned formats. Inline: the
 * sender hashes every insert of a run with it (insert_run_end()). */
static inline int64_t key_lock_id(const struct lrel *r, const struct aamm_tuple *kt)
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

/* ---- apply_sql.c: statement texts (pure: no libpq, no I/O) --------------------------- */

/* The catalog query mapping a source relation onto the local table ($1 schema, $2 name):
 * per local column its name, type, key position (0: not in the key), generated flag and
 * whether its default is volatile. */
extern const char aamm__apply_catalog_sql[];
/* The relation's quoted name ("schema"."name") and label (aamm__sb_label()), both heap.
 * Returns 0 or AAMM_ENOMEM (then neither is set). */
int aamm__apply_rel_names(const struct aamm_relation *src, char **qname, char **label);
/* The parameter numbers of a change of shape @mask: per remote column its value's (0:
 * not written) in *@vparam, per key column its key value's in *@kparam (both heap); *@next:
 * the first number after them. Returns false when out of memory. */
bool aamm__apply_number_params(const struct lrel *r, int op, const char *mask, int **vparam,
                               int **kparam, int *next);
/* The whole statement for @op and @mask with every conflict check and decision (heap;
 * NULL: no memory). */
char *aamm__apply_build_full(const struct lrel *r, int op, const char *mask, bool has_u);
/* The statement for one row change (@cte 0, @mexpr NULL), or its WITH item c<cte> of a
 * merged statement with in *@mexpr (heap) the expression that ends the change in the merged
 * statement's last row (heap; NULL: no memory). */
char *aamm__apply_build_sql(const struct lrel *r, int op, const char *mask, bool has_u, int cte,
                            char **mexpr);
/* TRUNCATE ONLY of the relations of @c (AAMM_CHANGE_TRUNCATE) (heap; NULL: no memory). */
char *aamm__apply_truncate_sql(const struct aamm_change *c);
/* The merged statement for the @n row changes @changes: per change its kind @ops[i], its
 * mask at @masks + i * @stride, @hasu[i] and its parameter count @nps[i]; the folded
 * guard's 6 parameters follow theirs (heap; NULL: no memory). */
char *aamm__apply_merged_sql(const struct aamm_change *changes, size_t n, const int *ops,
                             const char *masks, size_t stride, const bool *hasu, const int *nps);
/* Append @t (transferred) to @ap's queue of transactions; the send cursor starts at it
 * when nothing is waiting to be sent. */
void aamm__apply_enqueue(struct aamm_apply *ap, struct qtxn *t);

/* The key locks of the @n changes @changes as two array literals appended to @ids and
 * @modes, ascending ids; with @freeze, the join freeze key (AAMM_JOIN_FREEZE_KEY, shared)
 * first. Returns 0 or AAMM_ENOMEM. */
int aamm__apply_build_locks(const struct aamm_change *changes, size_t n, bool freeze,
                            struct aamm__sb *ids, struct aamm__sb *modes);

/* Test hooks. apply's advisory lock id of a key: the relation's label (plain names:
 * schema.name) and the key columns' texts in key order; for tests that hold a key's lock */
int64_t aamm__apply_lock_id(const char *label, const char *const *keys, int nkeys);
/* apply's guard statement (parameters: origin, previous end LSN, end LSN, commit time, key
 * lock ids, their modes); prepared once per session, and for the test of its own check */
const char *aamm__apply_guard_sql(void);

/* ---- apply_pipe.c: the pipeline ---------------------------------------------------- */

/* Queue what the next result answers; the entry (NULL: out of memory). */
struct expect *aamm__apply_exp_push(struct aamm_apply *ap, int kind, struct qtxn *t,
                                    struct lrel *rel, long idx);
void aamm__apply_qtxn_free(struct qtxn *t);
/* The session lost its prepared statements (new connection, DEALLOCATE ALL). */
void aamm__apply_forget_prepared(struct aamm_apply *ap);
/* Every transaction not committed goes out again from the first one, as if never sent. */
void aamm__apply_unsend_all(struct aamm_apply *ap);
void aamm__apply_reclaim(struct aamm_apply *ap);
/* A streamed transaction cannot be sent again: discard @from and everything queued (and
 * open) after it, reset received to the progress and report AAMM_EGAP at the end of the
 * step with @why. */
void aamm__apply_stream_fail(struct aamm_apply *ap, struct qtxn *from, const char *why);
/* The first queued transaction that is streamed and not committed, or NULL. */
struct qtxn *aamm__apply_streamed_pending(const struct aamm_apply *ap);
/* Whether @t is streamed and has everything fed so far sent (waits for the host). */
bool aamm__apply_stream_waits(const struct qtxn *t);
/* Send what the pipeline has room for, at most ap->step_send units (STEP_SEND). Returns 0
 * or an error (AAMM_ECONN: connection). */
int aamm__apply_send_pending(struct aamm_apply *ap);
/* Take the results that arrived, at most ap->step_results (more left: results_more), and
 * retire what is done. Returns 0 or an error. */
int aamm__apply_read_results(struct aamm_apply *ap);
/* Everything in flight has answered and ap->fail_txn failed: retry or hold. */
void aamm__apply_after_failure(struct aamm_apply *ap);
/* libpq's notice receiver (conflict notices), installed on every connection. */
void aamm__apply_on_notice(void *arg, const struct pg_result *res);

/* ---- apply.c: the handle ----------------------------------------------------------- */

/* Drop the connection after a problem and retry after a backoff. Returns 0. */
int aamm__apply_conn_error(struct aamm_apply *ap, const char *what);
/* Map @r onto the local table from the answer to aamm__apply_catalog_sql. */
void aamm__apply_map_result(struct lrel *r, struct pg_result *res);

#endif /* AAMM_APPLY_INT_H */
