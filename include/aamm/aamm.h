/*
 * aamm.h: libaamm's common definitions: version, error codes, log callback, memory
 * statistics and LSN helpers. Every other public header includes this one.
 *
 * libaamm is an embeddable library for active-active (multi-master) PostgreSQL
 * replication. It runs no thread and no event loop of its own: every component that does
 * I/O exposes a file descriptor, the events it waits for, a timeout and a step function,
 * and the host drives them from its own loop. See doc/ARCHITECTURE.md.
 */
#ifndef AAMM_AAMM_H
#define AAMM_AAMM_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) && __GNUC__ >= 4
#define AAMM_API __attribute__((visibility("default")))
#else
#define AAMM_API
#endif

#if defined(__GNUC__)
#define AAMM_PRINTF(fmt, args) __attribute__((format(printf, fmt, args)))
#else
#define AAMM_PRINTF(fmt, args)
#endif

/* ---- version --------------------------------------------------------------------- */

/** The version of these headers: major (incompatible API changes), minor, patch. */
#define AAMM_VERSION_MAJOR 0
#define AAMM_VERSION_MINOR 2
#define AAMM_VERSION_PATCH 0
/** The version as one number: major * 10000 + minor * 100 + patch. */
#define AAMM_VERSION_NUMBER \
    (AAMM_VERSION_MAJOR * 10000 + AAMM_VERSION_MINOR * 100 + AAMM_VERSION_PATCH)
/** The same version as text. */
#define AAMM_VERSION_STRING "0.2.0"

/*
 * Features: each component's header defines AAMM_HAS_<COMPONENT> (AAMM_HAS_CAPTURE,
 * AAMM_HAS_SNOWFLAKE, ...; change.h: AAMM_HAS_CHANGE_MODEL) once its API is part of the
 * library, like libpq's LIBPQ_HAS_...: test it after including the header.
 */

/**
 * The version of the library actually linked, as AAMM_VERSION_NUMBER encodes it.
 * May be called at any time from any thread.
 */
AAMM_API int aamm_version_number(void);

/** The linked library's version as a static string such as "0.2.0". */
AAMM_API const char *aamm_version_string(void);

/* ---- errors ---------------------------------------------------------------------- */

/*
 * Every call that can fail returns an int: 0 (AAMM_OK) or a negative code below. Handles
 * also keep a message with the details (aamm_<component>_errmsg()), which gains context
 * as the error travels up ("capture: slot \"aamm_to_2\": ...").
 */
#define AAMM_OK 0
#define AAMM_ENOMEM (-1)       /* out of memory */
#define AAMM_EINVAL (-2)       /* invalid argument or option */
#define AAMM_EMALFORMED (-3)   /* malformed input (protocol bytes, frame, LSN text) */
#define AAMM_EAGAIN (-4)       /* nothing available now, would block, queue full: retry */
#define AAMM_ECONN (-5)        /* connection failed or was lost */
#define AAMM_ESERVER (-6)      /* the PostgreSQL server reported an error */
#define AAMM_EUNSUITABLE (-7)  /* the server lacks a required setting or feature */
#define AAMM_ENOTFOUND (-8)    /* a named object (slot, publication, table...) is missing */
#define AAMM_EGAP (-9)         /* a stream would skip data it has not delivered */
#define AAMM_ESTATE (-10)      /* the call is not valid in the handle's current state */
#define AAMM_EPROTO (-11)      /* the peer violated the protocol */
#define AAMM_EAUTH (-12)       /* authentication failed */
#define AAMM_ETIMEDOUT (-13)   /* a deadline passed */
#define AAMM_ECLOSED (-14)     /* the peer closed the stream or the handle is closed */
#define AAMM_ETOOBIG (-15)     /* a size limit was exceeded */
#define AAMM_EBUSY (-16)       /* resource held elsewhere (lock, slot, origin, data dir) */
#define AAMM_ECONFLICT (-17)   /* a conflict stopped the stream */
#define AAMM_ENOTLEADER (-18)  /* consensus: this node cannot serve the request now */
#define AAMM_EEXHAUSTED (-19)  /* a range or sequence has no values left */
#define AAMM_EIO (-20)         /* a local I/O error (disk, socket setup) */
#define AAMM_EUNSUPPORTED (-21) /* a feature or version this build does not support */
#define AAMM_ECALLBACK (-22)   /* a host callback asked to stop */
#define AAMM_EINTERNAL (-23)   /* broken invariant: a bug in libaamm, please report */

/**
 * A static, human-readable description of an error code ("out of memory"). Unknown codes
 * give "unknown error". Thread-safe.
 */
AAMM_API const char *aamm_strerror(int code);

/**
 * The symbolic name of an error code ("AAMM_ENOMEM"), or "AAMM_E?" for unknown codes.
 */
AAMM_API const char *aamm_errname(int code);

/* ---- logging --------------------------------------------------------------------- */

/* Severity levels for the log callback, most severe first. */
#define AAMM_LOG_ERROR 1
#define AAMM_LOG_WARNING 2
#define AAMM_LOG_INFO 3
#define AAMM_LOG_DEBUG 4

/**
 * A log callback: @level is an AAMM_LOG_* value, @file and @line locate the library code
 * that logged, @msg is the text (borrowed: valid only during the call), @arg is what was
 * passed to aamm_set_log_cb().
 */
typedef void (*aamm_log_cb)(int level, const char *file, int line, const char *msg,
                            void *arg);

/**
 * Install the process-wide log callback. The library never writes to stdout or stderr on
 * its own: without a callback, messages are dropped — unless the environment variable
 * AAMM_DEBUG is set (to 1..4, the most verbose level to print), which installs a stderr
 * logger for debugging. @cb may be NULL to turn logging off; @max_level filters (messages
 * with level > max_level are not formatted); @arg (borrowed until the callback is replaced)
 * is passed to every call of @cb. Call it before creating handles; it is not synchronized
 * against concurrent logging.
 */
AAMM_API void aamm_set_log_cb(aamm_log_cb cb, int max_level, void *arg);

/* ---- memory ---------------------------------------------------------------------- */

/** Allocation statistics of the library's internal allocator (all handles together). */
struct aamm_memory_stats {
    size_t in_use;     /* bytes allocated now */
    size_t high_water; /* largest in_use since start or since the last reset */
    uint64_t allocations; /* number of successful allocations */
};

/**
 * Read the library's allocation statistics into @stats (borrowed, written). Thread-safe.
 * The figures count what libaamm allocated itself, not libpq's, raft's or lz4's memory.
 */
AAMM_API void aamm_memory_stats(struct aamm_memory_stats *stats);

/** Reset the high-water mark to the current in_use. */
AAMM_API void aamm_memory_reset_high_water(void);

/**
 * Free memory that the library allocated and handed to the caller with the words
 * "free with aamm_free" in its documentation. NULL is accepted.
 */
AAMM_API void aamm_free(void *ptr);

/* ---- host-driven I/O ------------------------------------------------------------ */

/*
 * Bits of aamm_<component>_events() for every handle that does I/O (capture, link,
 * apply, consensus): poll the handle's fd for reading and/or writing. Each such handle
 * exposes aamm_<c>_fd(), aamm_<c>_events(), aamm_<c>_timeout() (ms, -1 none) and
 * aamm_<c>_step(); see doc/ARCHITECTURE.md, "Dialect".
 */
#define AAMM_READ 0x1
#define AAMM_WRITE 0x2

/* ---- node ids ------------------------------------------------------------------ */

/**
 * The largest node id. A node id names one node across the whole cluster and every
 * component: its consensus member id, the node bits of its snowflake ids, its origin
 * names (aamm_from_<id>), its link identity. Valid ids are 1..AAMM_NODE_ID_MAX; consensus
 * refuses any other at bootstrap and join, and refuses an id already in the cluster, so
 * a node id (and with it a snowflake id space) is never used twice.
 */
#define AAMM_NODE_ID_MAX 1023

/**
 * Whether @id is a valid node id: 1..AAMM_NODE_ID_MAX (0 is never a node id). Every
 * component that takes a node id (capture, link, apply, consensus, snowflake) checks it
 * with this function, so the range is defined in one place. Pure; thread-safe.
 */
AAMM_API bool aamm_node_id_valid(uint32_t id);

/* ---- LSNs and times -------------------------------------------------------------- */

/** Buffer size for aamm_lsn_format(): "FFFFFFFF/FFFFFFFF" plus NUL. */
#define AAMM_LSN_BUFSIZE 18

/** An invalid / unset LSN (PostgreSQL's InvalidXLogRecPtr). */
#define AAMM_LSN_INVALID ((uint64_t)0)

/**
 * Format @lsn as PostgreSQL does ("16/B374D848") into @buf (at least AAMM_LSN_BUFSIZE
 * bytes, borrowed). Returns @buf.
 */
AAMM_API char *aamm_lsn_format(uint64_t lsn, char *buf);

/**
 * Parse PostgreSQL's LSN text form "X/X" (hex, each half up to 8 digits) in @text
 * (borrowed, NUL-terminated) into @out.
 * Returns 0, or AAMM_EMALFORMED for anything else (nothing written).
 */
AAMM_API int aamm_lsn_parse(const char *text, uint64_t *out);

/**
 * Microseconds between the Unix epoch (1970-01-01 UTC) and PostgreSQL's epoch
 * (2000-01-01 UTC). libaamm stores every timestamp as microseconds since the Unix epoch.
 */
#define AAMM_PG_EPOCH_OFFSET_US INT64_C(946684800000000)

/**
 * Format a timestamp (microseconds since the Unix epoch, UTC) as an ISO 8601 text that
 * PostgreSQL's timestamptz input accepts exactly, e.g. "2026-11-23 09:31:30.123456+00",
 * into @buf of @size bytes (at least 40). Returns @buf.
 */
AAMM_API char *aamm_time_format(int64_t unix_us, char *buf, size_t size);

#ifdef __cplusplus
}
#endif
#endif /* AAMM_AAMM_H */
