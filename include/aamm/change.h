/*
 * change.h: the change model every component speaks: transactions, relations, changes
 * and values. Pure data, no I/O.
 *
 * A change stream is a sequence of events: BEGIN (a transaction header), any number of
 * changes, COMMIT. Capture produces it from pgoutput, wire carries it between agents,
 * apply writes it into PostgreSQL. Changes are handed over one at a time, so a
 * transaction of a million rows never has to sit in memory as a whole.
 *
 * Identity: relations and columns are identified by schema, name and column names when
 * they leave a node. Node-local numbers (relation OIDs, type OIDs, xids) are kept only as
 * information for the node that produced them; receivers must not interpret them.
 *
 * Memory: structs marked "heap" below own their strings and arrays, allocated by the
 * library; free them with the matching *_clear() / *_free() function. A struct that the
 * library hands to a callback or returns as "borrowed" stays owned by the library.
 */
#ifndef AAMM_CHANGE_H
#define AAMM_CHANGE_H

#include <stdbool.h>
#include <stdint.h>

#include <aamm/aamm.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Feature macro: this header's API is in the library (like libpq's LIBPQ_HAS_...). */
#define AAMM_HAS_CHANGE_MODEL 1

/* ---- values ---------------------------------------------------------------------- */

/** The kinds of column value (pgoutput's TupleData kinds). */
enum aamm_value_kind {
    AAMM_VALUE_NULL = 'n',      /* SQL NULL */
    AAMM_VALUE_UNCHANGED = 'u', /* an unchanged out-of-line TOAST value: not sent; leave
                                   the stored value as it is, never write NULL */
    AAMM_VALUE_TEXT = 't',      /* the value in PostgreSQL's text output format */
};

/**
 * One column value. For AAMM_VALUE_TEXT, @data holds @len bytes followed by a NUL (heap;
 * text values never contain NUL bytes, PostgreSQL forbids them). For the other kinds
 * @data is NULL and @len 0.
 */
struct aamm_value {
    enum aamm_value_kind kind;
    uint32_t len;
    char *data;
};

/* ---- relations ------------------------------------------------------------------- */

/* Column flags. */
#define AAMM_COLUMN_KEY 0x01u /* part of the replica identity (primary key or index) */

/** One column of a relation. */
struct aamm_column {
    char *name;        /* heap: column name, as in the catalog (not quoted) */
    char *type_name;   /* heap: type as format_type() prints it ("integer",
                          "character varying(20)", "public.mytype"), or NULL if unknown */
    uint32_t type_oid; /* node-local type OID (information only) */
    int32_t type_mod;  /* atttypmod, -1 if none */
    uint32_t flags;    /* AAMM_COLUMN_* */
};

/* Replica identity settings (pg_class.relreplident). */
#define AAMM_REPLIDENT_DEFAULT 'd' /* primary key */
#define AAMM_REPLIDENT_NOTHING 'n'
#define AAMM_REPLIDENT_FULL 'f'
#define AAMM_REPLIDENT_INDEX 'i'

/**
 * A relation (table) as the stream describes it: the columns that are published, in
 * order, and which of them form the key.
 */
struct aamm_relation {
    uint32_t oid;          /* node-local relation OID (information only, never sent) */
    char *schema;          /* heap: schema name ("public") */
    char *name;            /* heap: relation name */
    char replica_identity; /* AAMM_REPLIDENT_* */
    uint32_t ncolumns;
    struct aamm_column *columns; /* heap: ncolumns entries */
    uint32_t generation;         /* bumped every time the producer replaces this relation's
                                    definition (columns added, dropped or renamed) */
};

/**
 * Free everything @rel owns and zero it; the struct itself is not freed (it may live on
 * the stack or in an array). NULL is accepted.
 */
AAMM_API void aamm_relation_clear(struct aamm_relation *rel);

/**
 * Deep-copy @src (borrowed) into @dst (overwritten; clear it later with
 * aamm_relation_clear()). Returns 0 or AAMM_ENOMEM (then @dst is zeroed).
 */
AAMM_API int aamm_relation_copy(struct aamm_relation *dst, const struct aamm_relation *src);

/** Whether two relations (both borrowed) have the same schema, name, replica identity and
 *  columns (names, type names, type modifiers and flags; node-local OIDs are not compared). */
AAMM_API bool aamm_relation_equal(const struct aamm_relation *a, const struct aamm_relation *b);

/** Index (>= 0) of the column called @name (exact, case-sensitive) in @rel, or -1 when
 *  there is none. Both borrowed. */
AAMM_API int aamm_relation_column(const struct aamm_relation *rel, const char *name);

/* ---- tuples ---------------------------------------------------------------------- */

/** A row: one value per column of its relation, in the relation's column order. */
struct aamm_tuple {
    uint32_t nvalues;
    struct aamm_value *values; /* heap: nvalues entries */
};

/** Free everything @tuple owns and zero it. NULL is accepted. */
AAMM_API void aamm_tuple_clear(struct aamm_tuple *tuple);

/** Deep-copy @src (borrowed) into @dst (overwritten; clear it later with
 *  aamm_tuple_clear()). Returns 0 or AAMM_ENOMEM (then @dst is zeroed). */
AAMM_API int aamm_tuple_copy(struct aamm_tuple *dst, const struct aamm_tuple *src);

/**
 * Set @value to a copy of the text @data (@len bytes; a NUL is added), or to SQL NULL when
 * @data is NULL, freeing what it held. Returns 0 or AAMM_ENOMEM (@value unchanged).
 */
AAMM_API int aamm_value_set(struct aamm_value *value, const char *data, size_t len);

/** Whether two tuples (both borrowed) hold the same kinds and bytes, value by value. */
AAMM_API bool aamm_tuple_equal(const struct aamm_tuple *a, const struct aamm_tuple *b);

/* ---- changes --------------------------------------------------------------------- */

/** What a change does (struct aamm_change's kind). */
enum aamm_change_kind {
    AAMM_CHANGE_INSERT = 1,
    AAMM_CHANGE_UPDATE = 2,
    AAMM_CHANGE_DELETE = 3,
    AAMM_CHANGE_TRUNCATE = 4,
    AAMM_CHANGE_MESSAGE = 5,
};

/* What an UPDATE or DELETE carries of the old row (pgoutput's 'K' / 'O'). */
#define AAMM_OLD_NONE 0   /* UPDATE that did not change the key: no old tuple */
#define AAMM_OLD_KEY 'K'  /* old tuple holds the key columns only (others are NULL) */
#define AAMM_OLD_FULL 'O' /* old tuple is the whole old row (REPLICA IDENTITY FULL) */

/* TRUNCATE options (pgoutput's flags). */
#define AAMM_TRUNCATE_CASCADE 0x01u
#define AAMM_TRUNCATE_RESTART_IDENTITY 0x02u

/**
 * One change inside a transaction (or, for a non-transactional message, outside one).
 *
 * - INSERT: @relation, @new_tuple.
 * - UPDATE: @relation, @new_tuple (may hold AAMM_VALUE_UNCHANGED values), and @old_kind /
 *   @old_tuple when the key changed or the relation has REPLICA IDENTITY FULL.
 * - DELETE: @relation, @old_kind (AAMM_OLD_KEY or AAMM_OLD_FULL) and @old_tuple.
 * - TRUNCATE: @nrelations / @relations, @truncate_flags.
 * - MESSAGE: @transactional, @prefix, @content / @content_len.
 *
 * Relation pointers are borrowed from the producer (capture's relation cache, a wire
 * decoder's dictionary): valid until the producer's next event. Use aamm_relation_copy()
 * to keep one. Everything else is owned by the change; aamm_change_clear() frees it.
 */
struct aamm_change {
    enum aamm_change_kind kind;
    const struct aamm_relation *relation; /* borrowed; INSERT/UPDATE/DELETE */
    char old_kind;                        /* AAMM_OLD_* */
    struct aamm_tuple old_tuple;          /* heap; valid when old_kind != AAMM_OLD_NONE */
    struct aamm_tuple new_tuple;          /* heap; INSERT/UPDATE */

    uint32_t nrelations;                    /* TRUNCATE */
    const struct aamm_relation **relations; /* heap array of borrowed pointers */
    uint32_t truncate_flags;                /* AAMM_TRUNCATE_* */

    bool transactional;   /* MESSAGE: part of the transaction, or emitted on its own */
    uint64_t message_lsn; /* MESSAGE: LSN of the message record */
    char *prefix;         /* MESSAGE: heap, NUL-terminated */
    uint32_t content_len; /* MESSAGE */
    char *content;        /* MESSAGE: heap, content_len bytes plus a NUL (may hold NULs) */
};

/** Free everything @change owns (not the borrowed relations) and zero it. NULL ok. */
AAMM_API void aamm_change_clear(struct aamm_change *change);

/** A static name for a change kind ("insert", "update", ...). */
AAMM_API const char *aamm_change_kind_name(enum aamm_change_kind kind);

/* ---- transactions ---------------------------------------------------------------- */

/**
 * A transaction header, as BEGIN and COMMIT describe it. Positions are WAL positions on
 * the node where the transaction was originally committed (its origin node).
 *
 * @end_lsn, the end of the commit record, is the position used everywhere else (apply's
 * origin progress, acks, slot confirmation, skipping): it is known only at COMMIT, so a
 * transaction delivered at BEGIN has end_lsn == AAMM_LSN_INVALID until then.
 */
struct aamm_transaction {
    uint32_t origin_node; /* node id of the node that committed it (the capturing host's
                             configured node id) */
    uint32_t xid;         /* node-local transaction id (information only) */
    uint64_t commit_lsn;  /* LSN of the commit record (pgoutput's final LSN) */
    uint64_t end_lsn;     /* end LSN of the commit record */
    int64_t commit_time;  /* commit timestamp, microseconds since the Unix epoch, UTC */
    char *origin_name;    /* heap: replication origin it was applied under on its node
                             (pgoutput 'O'), or NULL for a locally written transaction */
    uint64_t origin_lsn;  /* that origin's LSN, when origin_name is set */
};

/** Free what @txn owns and zero it. NULL accepted. */
AAMM_API void aamm_transaction_clear(struct aamm_transaction *txn);

/** Deep-copy @src (borrowed) into @dst (overwritten; clear it later with
 *  aamm_transaction_clear()). Returns 0 or AAMM_ENOMEM (then @dst is zeroed). */
AAMM_API int aamm_transaction_copy(struct aamm_transaction *dst,
                                   const struct aamm_transaction *src);

#ifdef __cplusplus
}
#endif
#endif /* AAMM_CHANGE_H */
