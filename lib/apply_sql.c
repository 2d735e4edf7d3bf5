/* apply_sql.c: apply's statement builder: the statement texts for every change shape, the
 * guard, parameter numbering and the key locks. Pure: no libpq, no I/O; the golden tests
 * (tests/unit/test_apply_sql.c) compare its output byte for byte. */
#include "config.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "apply_int.h"
#include "sql_contract.h"

/* ====================================================================================
 * Relation names
 * ==================================================================================== */

int aamm__apply_rel_names(const struct aamm_relation *src, char **qname, char **label)
{
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
        return AAMM_ENOMEM;
    }
    *qname = q.s;
    *label = l.s;
    return 0;
}

/* ====================================================================================
 * Statement text
 * ==================================================================================== */

const char aamm__apply_catalog_sql[] =
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
    aamm__sb_add(b, AAMM_SQL_FN_PUT_TOMBSTONE "($3, ");
    sb_keyjson(b, r, kparam);
    aamm__sb_add(b, ", $1::timestamptz, $2::int))");
}

/* Whether shape @mask carries the remote old row (an UPDATE or DELETE whose change has
 * REPLICA IDENTITY FULL's old tuple): after the marker mask[nc], one character per remote
 * column, '1' when its old value travels (text or NULL), '0' when not (unchanged TOAST, or
 * no local column). */
static bool has_old_row(const struct lrel *r, const char *mask)
{
    return mask[r->rel.ncolumns] && mask[r->rel.ncolumns + 1];
}

/* aamm__apply_number_params(), and per remote column its old value's number (0: none) in
 * *@oparam when @oparam is not NULL (numbered after the key values) */
static bool number_params(const struct lrel *r, int op, const char *mask, int **vparam,
                          int **kparam, int **oparam, int *next)
{
    uint32_t nc = r->rel.ncolumns;
    int *v = aamm__calloc(nc + 1, sizeof *v);
    int *k = aamm__calloc((size_t)r->nkeys + 1, sizeof *k);
    int *o = oparam ? aamm__calloc(nc + 1, sizeof *o) : NULL;
    if (!v || !k || (oparam && !o)) {
        aamm__free(v);
        aamm__free(k);
        aamm__free(o);
        return false;
    }
    int p = NFIXED_ALL + 1;
    for (uint32_t c = 0; c < nc; c++)
        if (mask[c] == '1')
            v[c] = p++;
    bool oldkey = mask[nc] == 'k' || mask[nc] == 'K';
    for (int i = 0; i < r->nkeys; i++)
        k[i] = (op == OP_DELETE || oldkey) ? p++ : v[r->key_r[i]];
    if (has_old_row(r, mask))
        for (uint32_t c = 0; c < nc; c++)
            if (mask[nc + 1 + c] == '1') {
                if (o)
                    o[c] = p;
                p++;
            }
    *vparam = v;
    *kparam = k;
    if (oparam)
        *oparam = o;
    *next = p;
    return true;
}

/* The parameter numbers of a change of shape @mask: per remote column its value's (0:
 * not written) in *@vparam, per key column its key value's in *@kparam (the old key for
 * a DELETE or a key change, else the new value's); *@next: the first number after them
 * and after the old row's values (has_old_row()). Returns false when out of memory. */
bool aamm__apply_number_params(const struct lrel *r, int op, const char *mask, int **vparam,
                               int **kparam, int *next)
{
    return number_params(r, op, mask, vparam, kparam, NULL, next);
}

/* The remote old row (has_old_row()) as jsonb, its columns that travel by name with their
 * values cast to the local types (so that they compare with pg_catalog.to_jsonb() of the
 * local row), in objects of at most 45 columns (jsonb_build_object()'s argument limit)
 * joined by ||; NULL::jsonb when the change has no old row. */
static void sb_oldjson(struct aamm__sb *b, const struct lrel *r, const char *mask,
                       const int *oparam)
{
    uint32_t nc = r->rel.ncolumns;
    if (!has_old_row(r, mask)) {
        aamm__sb_add(b, "NULL::jsonb");
        return;
    }
    int i = 0;
    for (uint32_t c = 0; c < nc; c++) {
        if (mask[nc + 1 + c] != '1')
            continue;
        if (i % 45 == 0)
            aamm__sb_add(b, "%spg_catalog.jsonb_build_object(", i ? ") OPERATOR(pg_catalog.||) " : "");
        else
            aamm__sb_add(b, ", ");
        aamm__sb_literal(b, r->rel.columns[c].name);
        aamm__sb_add(b, ", ");
        sb_param(b, r, (int)c, oparam[c]);
        i++;
    }
    aamm__sb_add(b, "%s", i ? ")" : "'{}'::jsonb");
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
 * update_missing. The call (PL/pgSQL and a query under a snapshot of its own: most of the
 * cost of a small applied transaction that inserts) is made only when the relation's
 * tombstone flag is set (sql/aamm--2--3.sql, section 2): a tombstone is flagged before its
 * transaction commits, and the flag is read as it is now, so an unset flag means that no
 * tombstone the recheck could find exists. The expression must be evaluated after the
 * write: where it stands, the write has run (a CASE on its rows, a FROM reading them). The
 * label is a literal so that the flag's sequence is a constant of the plan. */
static void sb_recheck(struct aamm__sb *b, const struct lrel *r, const int *kparam,
                       const char *keys, bool upd)
{
    aamm__sb_add(b, "CASE WHEN pg_catalog.pg_sequence_last_value(" AAMM_SQL_FN_TOMB_FLAG "(");
    aamm__sb_literal(b, r->label);
    aamm__sb_add(b, ")) IS NULL THEN true ELSE " AAMM_SQL_FN_RECHECK_TOMBS "($3, ");
    if (kparam) {
        aamm__sb_add(b, "ARRAY[");
        sb_keyjson(b, r, kparam);
        aamm__sb_add(b, "]");
    } else {
        aamm__sb_add(b, "%s", keys);
    }
    aamm__sb_add(b, ", $1::timestamptz, $2::int, $4, %s) END", upd ? "true" : "false");
}

/*
 * The whole statement for the change kind @op, with every conflict check and decision
 * (doc/conflicts.md): what aamm.apply_slow() runs when the fast statement (build_sql())
 * wrote nothing, and the statements for runs of inserts (OP_INSERT_MANY, _PLAIN).
 */
char *aamm__apply_build_full(const struct lrel *r, int op, const char *mask, bool has_u)
{
    struct aamm__sb b = {0};
    uint32_t nc = r->rel.ncolumns;
    int *vparam, *kparam, *oparam, p;
    if (!number_params(r, op, mask, &vparam, &kparam, &oparam, &p))
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
        aamm__sb_add(&b, " OR " AAMM_SQL_FN_INSERT_OK "($3, ");
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
            aamm__sb_add(&b, " WHERE " AAMM_SQL_FN_DECIDE
                             "('insert_exists', $3, pg_catalog.jsonb_build_array(");
            for (int k = 0; k < r->nkeys; k++) {
                aamm__sb_add(&b, "%sEXCLUDED.", k ? ", " : "");
                aamm__sb_ident(&b, r->rel.columns[r->key_r[k]].name);
            }
            aamm__sb_add(&b, "), t.xmin, pg_catalog.to_jsonb(t), pg_catalog.to_jsonb(EXCLUDED), "
                             "$1::timestamptz, $2::int, $4, NULL::jsonb)");
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
            sb_recheck(&b, r, NULL, "a.k", false);
            aamm__sb_add(&b, " FROM (SELECT pg_catalog.array_agg(i.k) AS k FROM i) a");
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
        aamm__sb_add(&b, " AND (%s OR " AAMM_SQL_FN_DECIDE "('update_origin_differs', $3, ",
                     same_origin_sql);
        sb_keyjson(&b, r, kparam);
        aamm__sb_add(&b, ", t.xmin, pg_catalog.to_jsonb(t), ");
        sb_rowjson(&b, r, mask, vparam);
        aamm__sb_add(&b, ", $1::timestamptz, $2::int, $4, ");
        sb_oldjson(&b, r, mask, oparam);
        aamm__sb_add(&b, "))");
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
        aamm__sb_add(&b, " AND " AAMM_SQL_FN_UPDATE_MISSING "($3, ");
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
        aamm__sb_add(&b, " WHERE " AAMM_SQL_FN_WRITE_RACED "($3, ");
        sb_keyjson(&b, r, kparam);
        aamm__sb_add(&b, ") RETURNING 1) SELECT CASE WHEN EXISTS (SELECT 1 FROM i) THEN ");
        sb_recheck(&b, r, kparam, NULL, true);
        aamm__sb_add(&b, " END");
    } else {
        aamm__sb_add(&b, "WITH d AS (DELETE FROM %s AS t WHERE ", r->qname);
        sb_keywhere(&b, r, "t", kparam);
        aamm__sb_add(&b, " AND " AAMM_SQL_FN_DECIDE "('delete_origin_differs', $3, ");
        sb_keyjson(&b, r, kparam);
        aamm__sb_add(&b, ", t.xmin, pg_catalog.to_jsonb(t), NULL, $1::timestamptz, $2::int, $4, ");
        sb_oldjson(&b, r, mask, oparam);
        aamm__sb_add(&b, ") RETURNING 1) SELECT CASE WHEN EXISTS (SELECT 1 FROM d) THEN ");
        sb_tomb(&b, r, kparam, NULL);
        aamm__sb_add(&b, " WHEN NOT EXISTS (SELECT 1 FROM %s t2 WHERE ", r->qname);
        sb_keywhere(&b, r, "t2", kparam);
        aamm__sb_add(&b, ") THEN " AAMM_SQL_FN_DELETE_MISSING "($3, ");
        sb_keyjson(&b, r, kparam);
        aamm__sb_add(&b, ", $1::timestamptz, $2::int, NULL) END");
    }
    aamm__free(vparam);
    aamm__free(kparam);
    aamm__free(oparam);
    if (b.oom) {
        aamm__free(b.s);
        return NULL;
    }
    return b.s;
}

/*
 * The statement for one row change (@cte 0), or its item c<cte> for the WITH list of a
 * transaction's merged statement and in *@mexpr (heap) the expression that ends it in the
 * merged statement's last row (aamm__apply_merged_sql()); OP_INSERT_MANY: build_full().
 *
 * c is the fast statement: it writes only when there is nothing to decide (an insert of a
 * key that is neither present nor remembered as deleted; an update or delete of a row this
 * source wrote, or of unknown age). Its expressions stay small because a prepared
 * statement's executor start-up builds every one of them at every execution. When it wrote
 * nothing, the rest (the SELECT of the single statement, the expression of the merged
 * one) hands the whole statement (build_full()) and the parameters to aamm.apply_slow(),
 * which runs it as a statement of its own (a fresh snapshot: it sees what concurrent
 * writers committed meanwhile) and, for an UPDATE that changed no row, the update_missing
 * INSERT after it.
 */
char *aamm__apply_build_sql(const struct lrel *r, int op, const char *mask, bool has_u, int cte,
                            char **mexpr)
{
    if (mexpr)
        *mexpr = NULL;
    if (op == OP_INSERT_MANY || op == OP_INSERT_PLAIN || op == OP_UPDATE_MISSING)
        return aamm__apply_build_full(r, op, mask, has_u);
    struct aamm__sb b = {0}, e = {0};
    int *vparam = NULL, *kparam = NULL, p = 0;
    if (!aamm__apply_number_params(r, op, mask, &vparam, &kparam, &p))
        b.oom = true;
    char *full = aamm__apply_build_full(r, op, mask, has_u);
    char *miss = op == OP_UPDATE ? aamm__apply_build_full(r, OP_UPDATE_MISSING, mask, has_u) : NULL;
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
    /* the merged statement's expression is a CASE in every shape: its EXISTS runs c first
     * (an InitPlan, evaluated where the expression is), and an expression instead of an
     * item m<cte> AS (SELECT ...) read by a SELECT of its own spares the executor two plan
     * nodes per change at every execution */
    struct aamm__sb *m = cte ? &e : &b;
    if (then || cte) {
        aamm__sb_add(m, "%sCASE WHEN EXISTS (SELECT 1 FROM c%d) THEN ", cte ? "" : " SELECT ",
                     cte);
        if (tomb)
            sb_tomb(m, r, kparam, op == OP_UPDATE ? vparam : NULL);
        else if (then)
            sb_recheck(m, r, kparam, NULL, false);
        else
            aamm__sb_add(m, "NULL");
        aamm__sb_add(m, " ELSE ");
    } else {
        aamm__sb_add(m, " SELECT ");
    }
    aamm__sb_add(m, AAMM_SQL_FN_APPLY_SLOW "(");
    aamm__sb_literal(m, dfull ? dfull : "");
    aamm__sb_add(m, ", ");
    if (dmiss)
        aamm__sb_literal(m, dmiss);
    else
        aamm__sb_add(m, "NULL");
    aamm__sb_add(m, ", ARRAY[");
    for (int pi = 1; pi < p; pi++)
        aamm__sb_add(m, "%s$%d", pi > 1 ? ", " : "", pi);
    if (cte)
        aamm__sb_add(m, "]::text[]) END");
    else if (then)
        aamm__sb_add(m, "]::text[]) END AS x");
    else
        aamm__sb_add(m, "]::text[]) AS x WHERE NOT EXISTS (SELECT 1 FROM c0)");
    aamm__free(dfull);
    aamm__free(dmiss);
    aamm__free(vparam);
    aamm__free(kparam);
    if (b.oom || e.oom || (cte && !mexpr)) {
        aamm__free(b.s);
        aamm__free(e.s);
        return NULL;
    }
    if (cte)
        *mexpr = e.s;
    return b.s;
}

/* TRUNCATE ONLY of the relations of @c, with its flags */
char *aamm__apply_truncate_sql(const struct aamm_change *c)
{
    struct aamm__sb b = {0};
    aamm__sb_add(&b, "TRUNCATE ONLY ");
    for (uint32_t i = 0; i < c->nrelations; i++)
        aamm__sb_add(&b, "%s%s", i ? ", " : "", lrel_of(c->relations[i])->qname);
    if (c->truncate_flags & AAMM_TRUNCATE_RESTART_IDENTITY)
        aamm__sb_add(&b, " RESTART IDENTITY");
    if (c->truncate_flags & AAMM_TRUNCATE_CASCADE)
        aamm__sb_add(&b, " CASCADE");
    if (b.oom) {
        aamm__free(b.s);
        return NULL;
    }
    return b.s;
}

/* ====================================================================================
 * The guard and the merged statement
 * ==================================================================================== */

/* The guard (the origin's progress must be the previous transaction's end LSN, or an
 * earlier transaction failed: raise), the origin's commit LSN and timestamp, and the key
 * locks (build_locks()). Plain SQL: the PL/pgSQL function runs only when the guard trips.
 * GUARD_CHECK and GUARD_LOCKS (rows (x id, e exclusive) in ascending id order) are shared
 * by its two forms below. */
#define GUARD_CHECK                                                                                \
    "SELECT pg_catalog.pg_replication_origin_xact_setup($3::pg_lsn, $4::timestamptz)::text "       \
    "AS w FROM (SELECT COALESCE(pg_catalog.pg_replication_origin_progress($1, false), "            \
    "'0/0') AS cur) g WHERE CASE WHEN g.cur OPERATOR(pg_catalog.=) $2::pg_lsn THEN true ELSE "     \
    AAMM_SQL_FN_GUARD_FAILED "($1, g.cur, $2::pg_lsn) END UNION ALL "
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
    AAMM_SQL_FN_KEY_LOCK_BUSY "(u.x) END" GUARD_LOCKS ")";

/*
 * The merged statement (send_merged()): WITH g (guard_fold_sql), c1 AS (...), c2 AS (...),
 * ... SELECT w FROM g UNION ALL SELECT ARRAY[<change 1's expression>, ...]::text, each
 * change's item and expression built as for its own statement with its parameters
 * renumbered after the previous change's, the guard's after all of them. The Append reads
 * g (locks and all) before its second branch evaluates the expressions, in change order
 * (an array's elements are evaluated in order); each expression runs its c item first.
 * All in one row: per change the executor starts one InitPlan and its CTE scan, no node
 * of its own.
 */
char *aamm__apply_merged_sql(const struct aamm_change *changes, size_t n, const int *ops,
                             const char *masks, size_t stride, const bool *hasu, const int *nps)
{
    int total = 0;
    for (size_t i = 0; i < n; i++)
        total += nps[i];
    struct aamm__sb sql = {0}, tail = {0};
    char *g = rewrite_params(guard_fold_sql, false, total);
    if (!g)
        sql.oom = true;
    aamm__sb_add(&sql, "WITH %s", g ? g : "");
    aamm__free(g);
    aamm__sb_add(&tail, " SELECT w FROM g UNION ALL SELECT ARRAY[");
    int off = 0;
    for (size_t i = 0; i < n; i++) {
        struct lrel *r = lrel_of(changes[i].relation);
        char *expr = NULL;
        char *item =
            aamm__apply_build_sql(r, ops[i], masks + i * stride, hasu[i], (int)i + 1, &expr);
        char *ren = item ? rewrite_params(item, false, off) : NULL;
        char *rexpr = expr ? rewrite_params(expr, false, off) : NULL;
        aamm__free(item);
        aamm__free(expr);
        if (!ren || !rexpr) {
            aamm__free(ren);
            aamm__free(rexpr);
            sql.oom = true;
            break;
        }
        aamm__sb_add(&sql, ", %s", ren);
        aamm__sb_add(&tail, "%s%s", i ? ", " : "", rexpr);
        aamm__free(ren);
        aamm__free(rexpr);
        off += nps[i];
    }
    aamm__sb_add(&tail, "]::text");
    aamm__sb_add(&sql, "%s", tail.s ? tail.s : "");
    aamm__free(tail.s);
    if (sql.oom || tail.oom) {
        aamm__free(sql.s);
        return NULL;
    }
    return sql.s;
}

/* ====================================================================================
 * Key locks
 * ==================================================================================== */

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

/* The key tuples of change @c whose locks it takes (old and/or new key), in @kt[2]. */
static void lock_tuples(const struct aamm_change *c, const struct aamm_tuple *kt[2])
{
    const struct lrel *r = lrel_of(c->relation);
    const struct aamm_tuple *ot = c->old_kind != AAMM_OLD_NONE ? &c->old_tuple : NULL;
    kt[0] = c->kind == AAMM_CHANGE_DELETE || ot ? ot : &c->new_tuple;
    kt[1] = c->kind == AAMM_CHANGE_UPDATE && ot ? &c->new_tuple : NULL;
    for (int j = 0; j < 2; j++)
        if (kt[j] && kt[j]->nvalues != r->rel.ncolumns)
            kt[j] = NULL;
}

static bool is_row_change(const struct aamm_change *c)
{
    return c->kind == AAMM_CHANGE_INSERT || c->kind == AAMM_CHANGE_UPDATE ||
           c->kind == AAMM_CHANGE_DELETE;
}

/*
 * The locks a transaction (its @n changes @changes) takes before its first change, in one
 * statement: per key an exclusive lock under a shared lock of its relation, or for a
 * relation with more than KEYLOCKS_PER_REL keys in the transaction one exclusive lock of
 * the relation (so a big transaction holds a bounded number of locks). Every applier
 * takes its locks in ascending id order, so appliers cannot deadlock on them. Appends the
 * two array literals (ids, modes) to @ids and @modes.
 */
int aamm__apply_build_locks(const struct aamm_change *changes, size_t n, bool freeze,
                            struct aamm__sb *ids, struct aamm__sb *modes)
{
    size_t cap = 0, nv = 0;
    struct lockreq *v = NULL;
    bool ok = true;
    /* 1. per relation (in order of first appearance) its key count, which decides between
     *    key locks and one relation lock. Counted before any key is hashed: a transaction of
     *    400,000 rows of one relation hashes none (one step does bounded work) */
    struct relcnt {
        const struct lrel *rel;
        size_t n;
    } *rc = NULL;
    size_t nr = 0, rcap = 0, hit = 0;
    for (size_t i = 0; i < n && ok; i++) {
        const struct aamm_change *c = &changes[i];
        if (!is_row_change(c))
            continue;
        const struct lrel *r = lrel_of(c->relation);
        const struct aamm_tuple *kt[2];
        lock_tuples(c, kt);
        size_t k = (kt[0] != NULL) + (kt[1] != NULL);
        if (!k)
            continue;
        if (hit >= nr || rc[hit].rel != r) { /* mostly the relation of the change before */
            for (hit = 0; hit < nr && rc[hit].rel != r; hit++)
                ;
            if (hit == nr) {
                if (nr == rcap) {
                    size_t ncap = rcap ? rcap * 2 : 16;
                    struct relcnt *nrc = aamm__realloc(rc, ncap * sizeof *nrc);
                    if (!nrc) {
                        ok = false;
                        break;
                    }
                    rc = nrc;
                    rcap = ncap;
                }
                rc[nr++] = (struct relcnt){r, 0};
            }
        }
        rc[hit].n += k;
    }
    /* 2. the key locks of relations with few keys: exclusive, under a shared lock of the
     *    relation; a relation with more: one exclusive lock of it */
    for (size_t i = 0; i < n && ok; i++) {
        const struct aamm_change *c = &changes[i];
        if (!is_row_change(c))
            continue;
        const struct lrel *r = lrel_of(c->relation);
        if (hit >= nr || rc[hit].rel != r)
            for (hit = 0; hit < nr && rc[hit].rel != r; hit++)
                ;
        if (hit == nr || rc[hit].n > KEYLOCKS_PER_REL)
            continue;
        const struct aamm_tuple *kt[2];
        lock_tuples(c, kt);
        for (int j = 0; j < 2 && ok; j++)
            if (kt[j])
                ok = lockreq_push(&v, &nv, &cap, (struct lockreq){key_lock_id(r, kt[j]), r, true});
    }
    for (size_t j = 0; j < nr && ok; j++)
        ok = lockreq_push(
            &v, &nv, &cap,
            (struct lockreq){rel_lock_id(rc[j].rel), NULL, rc[j].n > KEYLOCKS_PER_REL});
    aamm__free(rc);
    if (ok) {
        if (nv > 1)
            qsort(v, nv, sizeof *v, lockreq_cmp);
        aamm__sb_add(ids, "{");
        aamm__sb_add(modes, "{");
        const char *sep = "";
        if (freeze) { /* first: an applier waiting for the freeze holds no key lock yet */
            aamm__sb_add(ids, "%" PRId64, (int64_t)AAMM_JOIN_FREEZE_KEY);
            aamm__sb_add(modes, "f");
            sep = ",";
        }
        bool first = true;
        int64_t last = 0;
        for (size_t i = 0; i < nv; i++) {
            if (!first && v[i].id == last)
                continue;
            last = v[i].id;
            bool ex = v[i].exclusive; /* one id asked in both modes: exclusive */
            for (size_t j = i + 1; j < nv && v[j].id == v[i].id; j++)
                ex = ex || v[j].exclusive;
            aamm__sb_add(ids, "%s%" PRId64, sep, v[i].id);
            aamm__sb_add(modes, "%s%c", sep, ex ? 't' : 'f');
            first = false;
            sep = ",";
        }
        aamm__sb_add(ids, "}");
        aamm__sb_add(modes, "}");
        ok = !ids->oom && !modes->oom;
    }
    aamm__free(v);
    return ok ? 0 : AAMM_ENOMEM;
}
