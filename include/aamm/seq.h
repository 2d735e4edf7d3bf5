/*
 * seq.h: cluster-wide unique identifiers. The three generators have a header each, which
 * this one includes, so that #include <aamm/seq.h> gives all of them:
 *
 *  - snowflake.h: 64-bit ids built from time, node id and a per-millisecond counter. No
 *    coordination beyond a unique node id per node.
 *  - uuidv7.h: RFC 9562 UUIDv7, 128-bit, time-ordered, 74 random bits per millisecond.
 *  - galloc.h: plain increasing numbers (fit an int or a bigint column) taken from ranges
 *    that the cluster agrees on through consensus; a node holds its current range and the
 *    next one, so an insert never waits on the network.
 *
 * Why: a serial/identity column issues 1, 2, 3... on every node independently, so two
 * nodes of an active-active cluster insert the same key. Each generator makes values
 * unique across nodes without a network round trip per value.
 *
 * This header holds the SQL side (aamm_seq_*): installing the generators as SQL functions
 * that tables on every node can use as column defaults, and finding and converting the
 * serial and identity columns of replicated tables. See doc/sequences.md.
 *
 * Thread safety: the functions taking a PGconn use only that connection.
 */
#ifndef AAMM_SEQ_H
#define AAMM_SEQ_H

#include <stddef.h>
#include <stdint.h>

#include <aamm/aamm.h>
#include <aamm/galloc.h>
#include <aamm/snowflake.h>
#include <aamm/uuidv7.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Feature macro: this header's API is in the library (like libpq's LIBPQ_HAS_...). */
#define AAMM_HAS_SEQ 1

/** libpq's connection (PGconn is a typedef of it): no libpq-fe.h needed here. The SQL
 *  functions below borrow the connection for the call and run blocking queries on it. */
struct pg_conn;

/** Size of the error buffers the functions below fill. */
#define AAMM_SEQ_ERRSIZE 1024

/**
 * Install (or upgrade, idempotently) the SQL generators on the node @conn is connected to
 * and store its node id @node_id (aamm_node_id_valid(): 1..AAMM_NODE_ID_MAX), the node
 * bits of aamm.snowflake_nextval(): schema aamm with
 *   aamm.snowflake_nextval(seqname text) bigint  (source bit 1: never collides with C)
 *   aamm.uuid_v7() uuid
 *   aamm.galloc_nextval(seqname text) bigint
 *   aamm.galloc_remaining(seqname text) bigint
 * and their node-local state (aamm.seq_config, aamm.galloc_range, sequences). These
 * tables must not be replicated. Needs a role that may create schemas. Runs in one
 * transaction. @conn borrowed; @err (may be NULL) gets the message on failure. Returns
 * 0, AAMM_EINVAL (node id not valid), AAMM_ESERVER, AAMM_ECONN.
 */
AAMM_API int aamm_seq_install(struct pg_conn *conn, uint32_t node_id, char *err,
                              size_t errsize);

/** One serial/identity/nextval column of a replicated table. Strings owned by the list. */
struct aamm_seq_serial {
    char *schema;
    char *table;
    char *column;
    char *type;     /* "integer", "bigint", "smallint", ... */
    char *kind;     /* "identity always", "identity by default", "serial" (a nextval
                       default of a sequence owned by the column) or "nextval" */
    char *sequence; /* the sequence behind it, qualified, or "" */
};

/** A list of serial columns; free with aamm_seq_serials_free. */
struct aamm_seq_serials {
    size_t n;
    struct aamm_seq_serial *items;
};

/**
 * Find the columns of replicated tables (tables in publication @publication, or in any
 * publication when NULL) whose values come from a node-local counter: identity columns and
 * nextval() defaults (serial, bigserial, hand-made). Those collide across nodes: warn or
 * convert them. *@out (transferred; free with aamm_seq_serials_free) is set on success,
 * possibly empty. Returns 0, AAMM_ESERVER, AAMM_ECONN, AAMM_ENOMEM.
 */
AAMM_API int aamm_seq_find_serials(struct pg_conn *conn, const char *publication,
                                   struct aamm_seq_serials **out, char *err, size_t errsize);

/** Free a list from aamm_seq_find_serials. NULL accepted. */
AAMM_API void aamm_seq_serials_free(struct aamm_seq_serials *list);

/** Generators a column can be converted to. */
enum aamm_seq_generator {
    AAMM_SEQ_SNOWFLAKE = 1, /* DEFAULT aamm.snowflake_nextval('<schema>.<table>') */
    AAMM_SEQ_GALLOC = 2     /* DEFAULT aamm.galloc_nextval('<schema>.<table>.<column>') */
};

/** Flags for aamm_seq_convert. */
#define AAMM_SEQ_CONVERT_WIDEN 1 /* snowflake on an int/smallint column: ALTER it to bigint */

/**
 * Convert the serial columns in @list (borrowed) to @gen, in one transaction on @conn:
 * drop identity (and the identity sequence) if any, then SET DEFAULT to the generator.
 * A serial's own sequence is left in place (still owned by the column). Snowflake needs
 * a bigint column: others are refused unless @flags has AAMM_SEQ_CONVERT_WIDEN. galloc
 * needs ranges supplied for "<schema>.<table>.<column>" before the next insert (start them
 * above the column's current maximum). Run it on every node (it is local DDL). Returns 0,
 * AAMM_EUNSUITABLE (narrow column for snowflake, nothing changed), AAMM_EINVAL,
 * AAMM_ESERVER (rolled back), AAMM_ECONN.
 */
AAMM_API int aamm_seq_convert(struct pg_conn *conn, const struct aamm_seq_serials *list,
                              enum aamm_seq_generator gen, int flags, char *err, size_t errsize);

#ifdef __cplusplus
}
#endif
#endif /* AAMM_SEQ_H */
