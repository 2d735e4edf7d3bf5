/*
 * pgoutput.h (internal): a pure parser for the messages of PostgreSQL's built-in pgoutput
 * plugin, protocol version 1 (PG15: B, C, O, R, Y, I, U, D, T, M). Capture feeds it the
 * payload of each XLogData ('w') message; pgoutput bytes never leave capture.
 *
 * The parser keeps a relation cache keyed by the node-local relation OID, filled by 'R'
 * messages. Changes point into that cache (borrowed) until the next call to
 * aamm__pgo_parse(); a new 'R' for a known OID replaces the entry and bumps its
 * generation.
 *
 * Details (implementation guarantees): a relation's first 'R' gives generation 1, every
 * later 'R' for that OID +1, even when the definition is identical (PG15 re-sends 'R'
 * after relcache invalidations, e.g. around TRUNCATE). Each cached struct aamm_relation
 * keeps its address for the parser's lifetime; a new 'R' replaces its contents (schema,
 * name, columns array, type names reset to NULL) in place, so only pointers *into* an
 * entry die at the next 'R' for it. A malformed or out-of-memory 'R' leaves the cache
 * unchanged.
 *
 * Every input is untrusted: a truncated message, a bad length, an unknown message type,
 * a tuple whose column count does not match its relation, an unknown relation OID or an
 * unknown value kind gives AAMM_EMALFORMED with a message, never a crash or a read past
 * the end.
 */
#ifndef AAMM_PGOUTPUT_H
#define AAMM_PGOUTPUT_H

#include <stddef.h>
#include <stdint.h>

#include <aamm/change.h>

#include "internal.h"

struct aamm__pgo;

/* What one message was. */
enum aamm__pgo_type {
    AAMM__PGO_BEGIN = 'B',    /* ev->txn: xid, commit_lsn (final LSN), commit_time */
    AAMM__PGO_COMMIT = 'C',   /* ev->txn: commit_lsn, end_lsn, commit_time; ev->flags */
    AAMM__PGO_ORIGIN = 'O',   /* ev->txn: origin_lsn, origin_name (heap) */
    AAMM__PGO_RELATION = 'R', /* ev->relation: the cached entry (borrowed) */
    AAMM__PGO_TYPE = 'Y',     /* ev->type_oid, ev->type_schema, ev->type_name: ignored
                                 by capture (type names come from the catalog) */
    AAMM__PGO_CHANGE = 'X',   /* ev->change: I, U, D, T or M (heap parts owned by ev) */
};

/* One parsed message. Clear it with aamm__pgo_event_clear() before reuse. */
struct aamm__pgo_event {
    enum aamm__pgo_type type;
    struct aamm_transaction txn;           /* B, C, O (only the fields the message has) */
    uint8_t flags;                         /* C: commit flags */
    const struct aamm_relation *relation;  /* R: borrowed from the cache */
    struct aamm_change change;             /* X */
    uint32_t type_oid;                     /* Y */
    char *type_schema, *type_name;         /* Y: heap */
};

/* Create a parser (relation cache empty). 0 or AAMM_ENOMEM. */
int aamm__pgo_new(struct aamm__pgo **out);
/* Free a parser and its relation cache. NULL accepted. */
void aamm__pgo_free(struct aamm__pgo *p);

/*
 * Parse one pgoutput message of @len bytes at @data (borrowed) into @ev (must be zeroed or
 * cleared). @wal_lsn is the XLogData start LSN of the message (MESSAGE's message_lsn is
 * the LSN the 'M' message carries; @wal_lsn only stands in when that is 0). Returns 0, AAMM_EMALFORMED or AAMM_ENOMEM; on error @err says
 * what was wrong ("pgoutput: 'U' message: tuple has 3 columns, relation public.t has 2")
 * and @ev is left cleared.
 */
int aamm__pgo_parse(struct aamm__pgo *p, const uint8_t *data, size_t len, uint64_t wal_lsn,
                    struct aamm__pgo_event *ev, struct aamm__err *err);

/* Free what @ev owns and zero it. */
void aamm__pgo_event_clear(struct aamm__pgo_event *ev);

/* Look up a cached relation by OID (borrowed), or NULL. */
const struct aamm_relation *aamm__pgo_relation(const struct aamm__pgo *p, uint32_t oid);

/*
 * Set the type name of a cached relation's column (capture resolves type names from the
 * catalog, since 'R' carries only OIDs). @type_name is copied. 0, AAMM_ENOTFOUND or
 * AAMM_ENOMEM.
 */
int aamm__pgo_set_type_name(struct aamm__pgo *p, uint32_t rel_oid, uint32_t column,
                            const char *type_name);

#endif /* AAMM_PGOUTPUT_H */
