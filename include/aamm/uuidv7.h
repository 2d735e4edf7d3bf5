/*
 * uuidv7.h: time-ordered 128-bit UUIDs (RFC 9562 version 7) with 74 random bits per
 * millisecond and node: unique across nodes without any coordination. aamm_seq_install()
 * (seq.h) installs the SQL function aamm.uuid_v7() of the same layout.
 *
 * ---- layout (RFC 9562, section 5.7, monotonicity by method 1) ------------------------
 *
 *   unix_ts_ms 48 bits | ver 4 bits = 0111 | rand_a 12 bits | var 2 bits = 10 | rand_b 62
 *
 * The C generator uses rand_a and the top 18 bits of rand_b as a 30-bit counter: at each
 * new millisecond it is seeded from the CSPRNG with its top bit 0 (at least 2^29
 * increments left), within the same millisecond — or when the clock has stepped back — it
 * is incremented on the last timestamp; on overflow the timestamp advances by one. The
 * other 44 bits of rand_b are fresh CSPRNG bytes (getrandom(2)) in every UUID.
 *
 * Thread safety: a generator is not synchronized; use one per thread or a mutex.
 */
#ifndef AAMM_UUIDV7_H
#define AAMM_UUIDV7_H

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


/** Feature macro: this header's API is in the library (like libpq's LIBPQ_HAS_...). */
#define AAMM_HAS_UUIDV7 1

/** Text size of a UUID including the NUL: "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx". */
#define AAMM_UUIDV7_STRLEN 37

/** An opaque UUIDv7 generator. */
struct aamm_uuidv7;

/** Options for aamm_uuidv7_new(). Zero-initialize. */
struct aamm_uuidv7_options {
    aamm_seq_clock_cb clock; /* NULL: CLOCK_REALTIME */
    void *clock_arg;         /* passed to clock (borrowed) */
};

/**
 * Create a UUIDv7 generator. @out receives the handle (caller owns it; free with
 * aamm_uuidv7_free); @opts is copied and may be NULL (defaults). On failure @err (may be
 * NULL; borrowed) receives the message, truncated to @errsize bytes, and *@out is NULL.
 * Returns 0, AAMM_EINVAL (@out NULL), AAMM_ENOMEM.
 */
AAMM_API int aamm_uuidv7_new(struct aamm_uuidv7 **out, const struct aamm_uuidv7_options *opts,
                             char *err, size_t errsize);

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
 * NUL into @buf (at least AAMM_UUIDV7_STRLEN bytes, borrowed). Returns @buf.
 */
AAMM_API char *aamm_uuidv7_format(const uint8_t uuid[16], char *buf);

/**
 * Parse the 8-4-4-4-12 hex text form (either case) in @text (borrowed, NUL-terminated)
 * into @out (16 bytes). Returns 0 or AAMM_EMALFORMED (nothing written).
 */
AAMM_API int aamm_uuidv7_parse(const char *text, uint8_t out[16]);

/** The 48-bit timestamp of a UUIDv7 (ms since the Unix epoch). */
AAMM_API int64_t aamm_uuidv7_unix_ms(const uint8_t uuid[16]);

#ifdef __cplusplus
}
#endif
#endif /* AAMM_UUIDV7_H */
