/*
 * seq.h: cluster-wide unique identifiers: snowflake ids, UUIDv7 and galloc (globally
 * allocated ranges), in C and — installed by aamm_seq_install() — as SQL functions that
 * tables on every node can use as column defaults.
 *
 * Why: a serial/identity column issues 1, 2, 3... on every node independently, so two
 * nodes of an active-active cluster insert the same key. Each generator here makes values
 * unique across nodes without a network round trip per value:
 *
 *  - snowflake: 64-bit ids built from time, node id and a per-millisecond counter. No
 *    coordination beyond a unique node id per node.
 *  - UUIDv7 (RFC 9562): 128-bit, time-ordered, 74 random bits per millisecond and node.
 *  - galloc: plain increasing numbers (fit an int or a bigint column) taken from ranges
 *    that the cluster agrees on through consensus; a node holds its current range and the
 *    next one, so an insert never waits on the network.
 *
 * ---- snowflake bit layout (signed 64-bit, always positive: fits PostgreSQL's bigint) ---
 *
 *   bit 63      0 (sign)
 *   bits 62..22 milliseconds since AAMM_SNOWFLAKE_EPOCH_MS (2024-01-01T00:00:00Z), 41 bits
 *   bits 21..12 node id, 10 bits: 0..1023
 *   bit  11     source: 0 = the C API (aamm_snowflake_next), 1 = the SQL function
 *               aamm.snowflake_nextval() of the same node
 *   bits 10..0  counter within the millisecond, 11 bits: 2,048 ids per ms per source
 *
 * Limits: 1,024 nodes; 2,048 ids per millisecond per node and source (2,048,000 ids/s;
 * beyond that the generator borrows the next millisecond, see below); timestamps until
 * 2^41 ms after the epoch = 2093-09-06 (about 69.7 years). Ids from different nodes differ
 * in the node bits; ids of the C API and of SQL on the same node differ in the source bit,
 * so they never collide, whatever the load and clocks.
 *
 * Monotonic per generator, even when the clock steps back: the next id is the larger of
 * (last id + 1, carrying a full counter into the next millisecond) and (now, node, source,
 * counter 0). So when the clock goes back or more than 2,048 ids are wanted in one
 * millisecond, ids "borrow" milliseconds from the future: they stay unique and increasing
 * and their time part runs ahead of the clock until the clock catches up.
 *
 * Borrowing is bounded: no id's time part is ever more than options.max_borrow_ms (default
 * AAMM_SNOWFLAKE_DEFAULT_MAX_BORROW_MS, 100 ms) ahead of the clock reading it is issued at.
 * That bound is what keeps ids unique across a crash without any persisted state: a new
 * generator (a restart, after kill -9 or anything else) issues no id whose time part is at
 * or below its creation time + max_borrow_ms, which is above every id an earlier run of the
 * node can have issued. Its first id therefore waits until the clock has passed the creation
 * millisecond (at most 1 ms), and the new run starts with its borrowing used up. Where the
 * next id would break the bound (sustained more than 2,048 ids/ms, a clock step back, the
 * start wait), aamm_snowflake_next() sleeps until the clock allows it (at most
 * max_borrow_ms + 1 ms with a running clock); with options.nonblocking it returns
 * AAMM_EAGAIN instead and aamm_snowflake_wait_ms() says how long to wait. A clock step
 * back by D ms thus holds the C generator for about D - max_borrow_ms ms.
 *
 * Assumptions of the crash guarantee: the clock does not step back across the restart
 * (if it may, persist aamm_snowflake_last() and pass it as options.resume_after), the
 * earlier run used the same or a smaller max_borrow_ms, a node id is unique in the cluster
 * (consensus membership refuses a node id used twice), and one C generator per node id runs
 * at a time (one process).
 *
 * ---- UUIDv7 layout (RFC 9562, section 5.7, monotonicity by method 1) -----------------
 *
 *   unix_ts_ms 48 bits | ver 4 bits = 0111 | rand_a 12 bits | var 2 bits = 10 | rand_b 62
 *
 * The C generator uses rand_a and the top 18 bits of rand_b as a 30-bit counter: at each
 * new millisecond it is seeded from the CSPRNG with its top bit 0 (at least 2^29
 * increments left), within the same millisecond — or when the clock has stepped back — it
 * is incremented on the last timestamp; on overflow the timestamp advances by one. The
 * other 44 bits of rand_b are fresh CSPRNG bytes (getrandom(2)) in every UUID.
 *
 * ---- galloc -----------------------------------------------------------------------
 *
 * A struct aamm_galloc is the node-local client of one cluster-wide sequence. It is pure
 * (no I/O): it issues values from ranges the host feeds it (aamm_galloc_add_range) and
 * tells the host when to ask consensus for more (aamm_galloc_wants_range /
 * aamm_galloc_begin_request). aamm_galloc_attach() connects it to a consensus handle so
 * that requests go through aamm_consensus_galloc() by themselves.
 *
 * Thread safety: handles are not synchronized; use one per thread or a mutex. The
 * functions taking a PGconn use only that connection.
 */
#ifndef AAMM_SEQ_H
#define AAMM_SEQ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <aamm/aamm.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Feature macro (see AAMM_HAS_CHANGE_MODEL): this header's API is in the library. */
#define AAMM_HAS_SEQ 1

/* ---- common -------------------------------------------------------------------------- */

/**
 * A clock for the generators: the wall-clock time in milliseconds since the Unix epoch.
 * @arg is the options' clock_arg. NULL in options means CLOCK_REALTIME. Tests inject a
 * clock that stands still or steps back.
 */
typedef int64_t (*aamm_seq_clock_fn)(void *arg);

/* ---- snowflake ----------------------------------------------------------------------- */

/** The snowflake epoch: 2024-01-01T00:00:00Z in milliseconds since the Unix epoch. */
#define AAMM_SNOWFLAKE_EPOCH_MS INT64_C(1704067200000)
#define AAMM_SNOWFLAKE_TIME_BITS 41
#define AAMM_SNOWFLAKE_NODE_BITS 10
#define AAMM_SNOWFLAKE_SOURCE_BITS 1
#define AAMM_SNOWFLAKE_COUNTER_BITS 11
/** Largest node id (1023). */
#define AAMM_SNOWFLAKE_MAX_NODE ((1 << AAMM_SNOWFLAKE_NODE_BITS) - 1)
/** Ids per millisecond per node and source before borrowing (2048). */
#define AAMM_SNOWFLAKE_PER_MS (1 << AAMM_SNOWFLAKE_COUNTER_BITS)
/** Default of options.max_borrow_ms: how far ids may run ahead of the clock. */
#define AAMM_SNOWFLAKE_DEFAULT_MAX_BORROW_MS 100
/** Largest options.max_borrow_ms accepted (one hour). */
#define AAMM_SNOWFLAKE_MAX_BORROW_LIMIT_MS 3600000
/** Source bit values. */
#define AAMM_SNOWFLAKE_SOURCE_C 0
#define AAMM_SNOWFLAKE_SOURCE_SQL 1

/** An opaque snowflake generator. */
struct aamm_snowflake;

/** Options for aamm_snowflake_new(). Zero-initialize, then set what you need. */
struct aamm_snowflake_options {
    int node_id;             /* 0..AAMM_SNOWFLAKE_MAX_NODE, unique in the cluster */
    aamm_seq_clock_fn clock; /* NULL: CLOCK_REALTIME */
    void *clock_arg;         /* passed to clock (borrowed) */
    int64_t resume_after;    /* 0, or an id of this node issued before: ids start above */
    int64_t max_borrow_ms;   /* how far ids may run ahead of the clock, and the start wait
                                of a new generator (see above); 0: the default (100 ms);
                                at most AAMM_SNOWFLAKE_MAX_BORROW_LIMIT_MS */
    bool nonblocking;        /* aamm_snowflake_next returns AAMM_EAGAIN instead of sleeping
                                until the clock allows the next id */
};

/** The fields of a snowflake id, as aamm_snowflake_decode() returns them. */
struct aamm_snowflake_parts {
    int64_t unix_ms; /* time part converted to ms since the Unix epoch */
    int node_id;     /* 0..1023 */
    int source;      /* AAMM_SNOWFLAKE_SOURCE_C or _SQL */
    int counter;     /* 0..2047 */
};

/**
 * Create a snowflake generator. @out receives the handle (owned by the caller; free with
 * aamm_snowflake_free). @opts is copied. Reads the clock once: the generator issues no id
 * whose time part is at or below that reading + max_borrow_ms (the start wait, see above).
 * Returns 0, AAMM_EINVAL (NULL argument, node id outside 0..1023, resume_after negative or
 * of another node, max_borrow_ms negative or above AAMM_SNOWFLAKE_MAX_BORROW_LIMIT_MS),
 * AAMM_ENOMEM.
 */
AAMM_API int aamm_snowflake_new(struct aamm_snowflake **out,
                                const struct aamm_snowflake_options *opts);

/** Free a generator. NULL accepted. */
AAMM_API void aamm_snowflake_free(struct aamm_snowflake *g);

/**
 * The next id into *@id: unique in the cluster, also across crashes and restarts of this
 * node (assumptions above), and larger than every id this generator issued before.
 * When the id would run more than max_borrow_ms ahead of the clock (first call within the
 * creation millisecond, more than 2,048 ids/ms sustained, a clock step back), it sleeps
 * until the clock allows it: at most max_borrow_ms + 1 ms with a running clock. It sleeps
 * no more than max_borrow_ms + 1000 ms in one call: a longer wait (a clock stepped back
 * further, a clock that does not advance) returns AAMM_EAGAIN. With options.nonblocking it
 * never sleeps and returns AAMM_EAGAIN at once. After AAMM_EAGAIN, aamm_snowflake_wait_ms()
 * says how long to wait. Returns 0; AAMM_EAGAIN; AAMM_EEXHAUSTED when the time part would
 * pass 2^41 ms (year 2093). On error *@id is untouched and aamm_snowflake_errmsg() says why.
 */
AAMM_API int aamm_snowflake_next(struct aamm_snowflake *g, int64_t *id);

/**
 * After aamm_snowflake_next() returned AAMM_EAGAIN: the milliseconds (by the generator's
 * clock) until the next call can succeed; 0 after any other result.
 */
AAMM_API int64_t aamm_snowflake_wait_ms(const struct aamm_snowflake *g);

/** The last id issued (or options.resume_after when none yet). */
AAMM_API int64_t aamm_snowflake_last(const struct aamm_snowflake *g);

/** The message of the last failure ("" when none); borrowed, valid until the next call. */
AAMM_API const char *aamm_snowflake_errmsg(const struct aamm_snowflake *g);

/** Split @id into its fields (@out borrowed, written). */
AAMM_API void aamm_snowflake_decode(int64_t id, struct aamm_snowflake_parts *out);

/* ---- UUIDv7 -------------------------------------------------------------------------- */

/** Text size of a UUID including the NUL: "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx". */
#define AAMM_UUID_STRLEN 37

/** An opaque UUIDv7 generator. */
struct aamm_uuidv7;

/** Options for aamm_uuidv7_new(). Zero-initialize. */
struct aamm_uuidv7_options {
    aamm_seq_clock_fn clock; /* NULL: CLOCK_REALTIME */
    void *clock_arg;         /* passed to clock (borrowed) */
};

/**
 * Create a UUIDv7 generator. @out receives the handle (caller owns it; free with
 * aamm_uuidv7_free); @opts is copied and may be NULL. Returns 0, AAMM_EINVAL, AAMM_ENOMEM.
 */
AAMM_API int aamm_uuidv7_new(struct aamm_uuidv7 **out, const struct aamm_uuidv7_options *opts);

/** Free a generator. NULL accepted. */
AAMM_API void aamm_uuidv7_free(struct aamm_uuidv7 *g);

/**
 * The next UUIDv7 into @out (16 bytes, network byte order, borrowed): byte-wise larger
 * than every UUID this generator made before. Safe across fork(): the child refills its
 * random bytes. Returns 0; AAMM_EIO when the kernel CSPRNG fails (message says why);
 * AAMM_EEXHAUSTED past the 48-bit timestamp (year 10889).
 */
AAMM_API int aamm_uuidv7_next(struct aamm_uuidv7 *g, uint8_t out[16]);

/** The message of the last failure ("" when none); borrowed. */
AAMM_API const char *aamm_uuidv7_errmsg(const struct aamm_uuidv7 *g);

/**
 * Format @uuid (16 bytes, borrowed) as 36 lower-case hex characters with dashes plus a
 * NUL into @buf (at least AAMM_UUID_STRLEN bytes, borrowed). Returns @buf.
 */
AAMM_API char *aamm_uuid_format(const uint8_t uuid[16], char *buf);

/**
 * Parse the 8-4-4-4-12 hex text form (either case) in @text (borrowed, NUL-terminated)
 * into @out (16 bytes). Returns 0 or AAMM_EMALFORMED (nothing written).
 */
AAMM_API int aamm_uuid_parse(const char *text, uint8_t out[16]);

/** The 48-bit timestamp of a UUIDv7 (ms since the Unix epoch). */
AAMM_API int64_t aamm_uuidv7_unix_ms(const uint8_t uuid[16]);

/* ---- galloc client ------------------------------------------------------------------- */

/** The raft node (aamm/consensus.h); declared here so this header stands alone. */
struct aamm_consensus;

/** An opaque galloc client: one sequence on one node. */
struct aamm_galloc;

/** Options for aamm_galloc_new(). Zero-initialize, then set name. */
struct aamm_galloc_options {
    const char *name;     /* sequence name, 1..255 bytes (copied) */
    int64_t range_size;   /* values per requested range; 0: 1000 */
    int64_t low_water;    /* ask for a range when fewer than or exactly this many values
                             are left in held ranges; 0: range_size (always hold the
                             current range and the next one) */
    int max_ranges;       /* most ranges held at once; 0: 4 */
    int64_t min_start;    /* passed to consensus: first value of a new sequence (e.g. the
                             current max of a converted serial column + 1); 0: 1 */
    int64_t resume_after; /* values <= this are never issued (persisted last value of a
                             previous run whose ranges are fed again); 0: none */
};

/**
 * Create a galloc client. @out receives the handle (caller owns it; free with
 * aamm_galloc_free); @opts is copied. Returns 0, AAMM_EINVAL (no name, name too long,
 * negative sizes, low_water < 0), AAMM_ENOMEM.
 */
AAMM_API int aamm_galloc_new(struct aamm_galloc **out, const struct aamm_galloc_options *opts);

/**
 * Free a client. NULL accepted. If attached and a request is in flight, the consensus
 * callback will find the client gone and drop the range (values are lost, never reused).
 */
AAMM_API void aamm_galloc_free(struct aamm_galloc *g);

/** The message of the last failure ("" when none); borrowed. */
AAMM_API const char *aamm_galloc_errmsg(const struct aamm_galloc *g);

/** The sequence name (borrowed, owned by the handle). */
AAMM_API const char *aamm_galloc_name(const struct aamm_galloc *g);

/**
 * The next value into *@v, from the lowest range held; never waits on the network. When
 * attached, first runs aamm_galloc_pump(). Returns 0, or AAMM_EEXHAUSTED when every held
 * range is used up (message: how many values were issued, whether a request is in flight,
 * and the last consensus error, e.g. no majority) — the host should back off and retry.
 */
AAMM_API int aamm_galloc_next(struct aamm_galloc *g, int64_t *v);

/** Values left in the ranges held now. */
AAMM_API int64_t aamm_galloc_available(const struct aamm_galloc *g);

/**
 * Whether the client wants a new range now: returns true and sets *@count (may be NULL)
 * to the range size when available <= low_water, fewer than max_ranges are held and no
 * request is in flight. Changes nothing.
 */
AAMM_API bool aamm_galloc_wants_range(const struct aamm_galloc *g, uint64_t *count);

/**
 * Start a request: like wants_range, and if a range is wanted marks a request in flight
 * (so the host asks consensus once) and returns 0 with *@count set; otherwise
 * AAMM_EAGAIN. The host then calls aamm_consensus_galloc(name, count, min_start) and, when
 * the range is applied on its node, aamm_galloc_add_range(); on failure
 * aamm_galloc_cancel_request().
 */
AAMM_API int aamm_galloc_begin_request(struct aamm_galloc *g, uint64_t *count);

/**
 * Mark the request in flight as failed (e.g. no majority: AAMM_ETIMEDOUT); @status and
 * @msg (borrowed, may be NULL) are remembered for the exhaustion message.
 */
AAMM_API void aamm_galloc_cancel_request(struct aamm_galloc *g, int status, const char *msg);

/** Whether a request is in flight. */
AAMM_API bool aamm_galloc_request_pending(const struct aamm_galloc *g);

/**
 * Hand the client the range [@start, @end) that consensus reserved for this node. Call it
 * only once the allocating entry is applied on this node. Clears the request in flight.
 * Ranges of one sequence only grow: a range that does not start at or above the end of
 * every range added before is refused. Returns 0, AAMM_EINVAL (empty, negative or
 * overlapping/out-of-order range), AAMM_ETOOBIG (max_ranges already held).
 */
AAMM_API int aamm_galloc_add_range(struct aamm_galloc *g, int64_t start, int64_t end);

/**
 * Take the lowest held range out of the client, unused values only, into [*@start, *@end)
 * — for a host that hands ranges on to the node's SQL function (aamm_galloc_supply_node):
 * a client attached to consensus dedicated to that, whose ranges the host moves to the
 * node when aamm_galloc_node_remaining() falls to its low-water mark. The client then
 * prefetches the next range as usual. Returns 0, or AAMM_EEXHAUSTED when none is held.
 */
AAMM_API int aamm_galloc_take_range(struct aamm_galloc *g, int64_t *start, int64_t *end);

/**
 * Connect the client to a consensus handle (borrowed: it must outlive the attachment;
 * detach with aamm_galloc_attach(g, NULL) or free the client first). From then on
 * aamm_galloc_pump() — called by aamm_galloc_next() and by the host after each
 * aamm_consensus_step() — asks consensus for ranges by itself (at most one in flight, a
 * failed request retried after a second) and adds a granted range only once the
 * consensus state applied on this node shows it (aamm_consensus_galloc_next() >= end).
 * Returns 0 or AAMM_EBUSY (a request of a previous attachment is still in flight).
 */
AAMM_API int aamm_galloc_attach(struct aamm_galloc *g, struct aamm_consensus *cs);

/**
 * Drive an attached client: add granted ranges that are now applied locally, start a
 * request when one is wanted. Never blocks. Returns 0, or the error of
 * aamm_consensus_galloc() (also kept in the message; retried later). Not attached: 0.
 */
AAMM_API int aamm_galloc_pump(struct aamm_galloc *g);

/* ---- SQL side: installed functions, serial columns ----------------------------------- */

/** libpq's connection (PGconn is a typedef of it): no libpq-fe.h needed here. The SQL
 *  functions below borrow the connection for the call and run blocking queries on it. */
struct pg_conn;

/** Size of the error buffers the functions below fill. */
#define AAMM_SEQ_ERRSIZE 1024

/**
 * Install (or upgrade, idempotently) the SQL generators on the node @conn is connected to
 * and store its node id (0..1023): schema aamm with
 *   aamm.snowflake_nextval(seqname text) bigint  (source bit 1: never collides with C)
 *   aamm.uuid_v7() uuid
 *   aamm.galloc_nextval(seqname text) bigint
 *   aamm.galloc_remaining(seqname text) bigint
 * and their node-local state (aamm.seq_config, aamm.galloc_range, sequences). These
 * tables must not be replicated. Needs a role that may create schemas. Runs in one
 * transaction. @conn borrowed; @err (may be NULL) gets the message on failure. Returns
 * 0, AAMM_EINVAL (node id out of range), AAMM_ESERVER, AAMM_ECONN.
 */
AAMM_API int aamm_seq_install(struct pg_conn *conn, int node_id, char *err, size_t errsize);

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

/**
 * Supply the node @conn is connected to with the galloc range [@start, @end) of sequence
 * @seqname (borrowed) for aamm.galloc_nextval(): only ranges this node's consensus member
 * has applied (the range is reserved for this node). Idempotent for a range already
 * supplied. Returns 0, AAMM_EINVAL (empty or negative range), AAMM_ESERVER (e.g. overlap
 * with another supplied range), AAMM_ECONN.
 */
AAMM_API int aamm_galloc_supply_node(struct pg_conn *conn, const char *seqname, int64_t start,
                                     int64_t end, char *err, size_t errsize);

/**
 * How many values of @seqname the node can still issue from supplied ranges into
 * *@remaining (the host supplies the next range when this falls to its low-water mark).
 * Returns 0, AAMM_ESERVER, AAMM_ECONN.
 */
AAMM_API int aamm_galloc_node_remaining(struct pg_conn *conn, const char *seqname,
                                        int64_t *remaining, char *err, size_t errsize);

#ifdef __cplusplus
}
#endif
#endif /* AAMM_SEQ_H */
