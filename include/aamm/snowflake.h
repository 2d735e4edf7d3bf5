/*
 * snowflake.h: 64-bit cluster-wide unique ids built from time, node id and a
 * per-millisecond counter, in C; aamm_seq_install() (seq.h) installs the SQL function
 * aamm.snowflake_nextval() of the same layout. No coordination beyond a unique node id
 * per node, and no network round trip per id: ids fit PostgreSQL's bigint and sort
 * roughly by time.
 *
 * ---- bit layout (signed 64-bit, always positive: fits PostgreSQL's bigint) -----------
 *
 *   bit 63      0 (sign)
 *   bits 62..22 milliseconds since AAMM_SNOWFLAKE_EPOCH_MS (2024-01-01T00:00:00Z), 41 bits
 *   bits 21..12 node id, 10 bits: 1..AAMM_NODE_ID_MAX (1023, aamm_node_id_valid())
 *   bit  11     source: 0 = the C API (aamm_snowflake_next), 1 = the SQL function
 *               aamm.snowflake_nextval() of the same node
 *   bits 10..0  counter within the millisecond, 11 bits: 2,048 ids per ms per source
 *
 * Limits: 1,023 nodes; 2,048 ids per millisecond per node and source (2,048,000 ids/s;
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
 * Thread safety: a generator is not synchronized; use one per thread (each with its own
 * node id) or a mutex.
 */
#ifndef AAMM_SNOWFLAKE_H
#define AAMM_SNOWFLAKE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <aamm/aamm.h>

#ifdef __cplusplus
extern "C" {
#endif

/**
 * A clock for the generators (snowflake.h, uuidv7.h): the wall-clock time in milliseconds
 * since the Unix epoch. @arg is the options' clock_arg. NULL in options means
 * CLOCK_REALTIME. Tests inject a clock that stands still or steps back.
 */
#ifndef AAMM_SEQ_CLOCK_CB_DEFINED
#define AAMM_SEQ_CLOCK_CB_DEFINED
typedef int64_t (*aamm_seq_clock_cb)(void *arg);
#endif

/** The snowflake epoch: 2024-01-01T00:00:00Z in milliseconds since the Unix epoch. */
#define AAMM_SNOWFLAKE_EPOCH_MS INT64_C(1704067200000)
#define AAMM_SNOWFLAKE_TIME_BITS 41
#define AAMM_SNOWFLAKE_NODE_BITS 10
#define AAMM_SNOWFLAKE_SOURCE_BITS 1
#define AAMM_SNOWFLAKE_COUNTER_BITS 11
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

/** Feature macro: this header's API is in the library (like libpq's LIBPQ_HAS_...). */
#define AAMM_HAS_SNOWFLAKE 1

/** Options for aamm_snowflake_new(). Zero-initialize, then set what you need. */
struct aamm_snowflake_options {
    uint32_t node_id;        /* this node's id, unique in the cluster: 1..AAMM_NODE_ID_MAX
                                (aamm_node_id_valid()) */
    aamm_seq_clock_cb clock; /* NULL: CLOCK_REALTIME */
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
    uint32_t node_id; /* 0..1023: 0 only in ids no valid node issued (e.g. SQL ids of a
                         node that libaamm 0.1 installed with node id 0) */
    int source;      /* AAMM_SNOWFLAKE_SOURCE_C or _SQL */
    int counter;     /* 0..2047 */
};

/**
 * Create a snowflake generator. @out receives the handle (owned by the caller; free with
 * aamm_snowflake_free). @opts is copied. Reads the clock once: the generator issues no id
 * whose time part is at or below that reading + max_borrow_ms (the start wait, see above).
 * On failure @err (may be NULL; borrowed) receives the message, truncated to @errsize
 * bytes, and *@out is NULL. Returns 0, AAMM_EINVAL (NULL argument, node id not
 * aamm_node_id_valid(), resume_after negative or of another node, max_borrow_ms negative
 * or above AAMM_SNOWFLAKE_MAX_BORROW_LIMIT_MS), AAMM_ENOMEM.
 */
AAMM_API int aamm_snowflake_new(struct aamm_snowflake **out,
                                const struct aamm_snowflake_options *opts, char *err,
                                size_t errsize);

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

#ifdef __cplusplus
}
#endif
#endif /* AAMM_SNOWFLAKE_H */
