/*
 * internal.h: helpers shared by the library's source files: the allocator every
 * allocation goes through, per-handle error messages, logging.
 * Cross-file internal symbols are named aamm__<component>_<verb>.
 */
#ifndef AAMM_INTERNAL_H
#define AAMM_INTERNAL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <aamm/aamm.h>

/* ---- allocator ------------------------------------------------------------------- */
/*
 * Every allocation in libaamm goes through these, so statistics (aamm_memory_stats) are
 * exact and tests can make the Nth allocation fail (aamm__alloc_fail_after). Sizes are
 * tracked in a small header in front of each block.
 */
void *aamm__malloc(size_t size);
void *aamm__calloc(size_t n, size_t size);
void *aamm__realloc(void *ptr, size_t size);
void aamm__free(void *ptr);
char *aamm__strdup(const char *s);
char *aamm__strndup(const char *s, size_t n);
/* A copy of @s, or NULL for NULL; clears *@ok when the copy fails (so a constructor copies
 * every optional string and checks once). */
char *aamm__strdup_opt(const char *s, bool *ok);
/* printf into a fresh heap string; NULL on failure. */
char *aamm__asprintf(const char *fmt, ...) AAMM_PRINTF(1, 2);

/*
 * Testing: make allocation number @n (1 = the next one) and every later one fail, until
 * called again; n = 0 turns failure injection off. Returns the count of allocations done
 * so far. Not thread-safe with concurrent allocations; tests only.
 */
uint64_t aamm__alloc_fail_after(uint64_t n);

/* ---- error messages -------------------------------------------------------------- */

#define AAMM__ERRMSG_SIZE 1024

/* A handle's last error: code plus message. Embed one in every handle. */
struct aamm__err {
    int code;
    char msg[AAMM__ERRMSG_SIZE];
};

/* Set @err to @code with a formatted message; returns @code (so: return aamm__errf(...)). */
int aamm__errf(struct aamm__err *err, int code, const char *fmt, ...) AAMM_PRINTF(3, 4);
/* Prepend context to the current message ("capture: " + msg); returns err->code. */
int aamm__errprefix(struct aamm__err *err, const char *fmt, ...) AAMM_PRINTF(2, 3);
/* Clear the error. */
void aamm__errclear(struct aamm__err *err);
/* The message to hand out: the text, or "" when no error is recorded. */
const char *aamm__errmsg(const struct aamm__err *err);
/*
 * Constructors (aamm_<c>_new(&h, opts, err, errsize)) have no handle to keep a message in
 * when they fail: they copy it into the caller's buffer @buf of @size bytes (@buf may be
 * NULL) with these. Both return @code / err->code, so: return aamm__newerrf(...).
 */
int aamm__newerrf(char *buf, size_t size, int code, const char *fmt, ...) AAMM_PRINTF(4, 5);
int aamm__newerr_copy(char *buf, size_t size, const struct aamm__err *err);

/* ---- logging --------------------------------------------------------------------- */

bool aamm__log_enabled(int level);
void aamm__log(int level, const char *file, int line, const char *fmt, ...) AAMM_PRINTF(4, 5);
#define AAMM_LOG(level, ...)                                                                       \
    do {                                                                                           \
        if (aamm__log_enabled(level))                                                              \
            aamm__log((level), __FILE__, __LINE__, __VA_ARGS__);                                   \
    } while (0)
#define AAMM_ERROR(...) AAMM_LOG(AAMM_LOG_ERROR, __VA_ARGS__)
#define AAMM_WARN(...) AAMM_LOG(AAMM_LOG_WARNING, __VA_ARGS__)
#define AAMM_INFO(...) AAMM_LOG(AAMM_LOG_INFO, __VA_ARGS__)
#define AAMM_DEBUG(...) AAMM_LOG(AAMM_LOG_DEBUG, __VA_ARGS__)

/* ---- time ------------------------------------------------------------------------ */

/* Monotonic clock in milliseconds (CLOCK_MONOTONIC). */
int64_t aamm__now_ms(void);
/* Wall clock in microseconds since the Unix epoch (CLOCK_REALTIME). */
int64_t aamm__wall_us(void);

#define AAMM__UNUSED(x) ((void)(x))
#define AAMM__ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

#endif /* AAMM_INTERNAL_H */
