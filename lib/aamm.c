/* aamm.c: version, error codes, the internal allocator, per-handle errors, logging, LSNs. */
#include "config.h"

#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <aamm/aamm.h>

#include "internal.h"

/* ====================================================================================
 * Version and error codes
 * ==================================================================================== */

int aamm_version_number(void)
{
    return AAMM_VERSION_NUMBER;
}

const char *aamm_version_string(void)
{
    return AAMM_VERSION_STRING;
}

static const struct {
    int code;
    const char *name;
    const char *text;
} errors[] = {
    {AAMM_OK, "AAMM_OK", "success"},
    {AAMM_ENOMEM, "AAMM_ENOMEM", "out of memory"},
    {AAMM_EINVAL, "AAMM_EINVAL", "invalid argument"},
    {AAMM_EMALFORMED, "AAMM_EMALFORMED", "malformed input"},
    {AAMM_EAGAIN, "AAMM_EAGAIN", "nothing available yet, try again"},
    {AAMM_ECONN, "AAMM_ECONN", "connection failed or lost"},
    {AAMM_ESERVER, "AAMM_ESERVER", "server reported an error"},
    {AAMM_EUNSUITABLE, "AAMM_EUNSUITABLE", "server lacks a required setting or feature"},
    {AAMM_ENOTFOUND, "AAMM_ENOTFOUND", "object not found"},
    {AAMM_EGAP, "AAMM_EGAP", "stream would skip undelivered data"},
    {AAMM_ESTATE, "AAMM_ESTATE", "operation not valid in the current state"},
    {AAMM_EPROTO, "AAMM_EPROTO", "protocol violation"},
    {AAMM_EAUTH, "AAMM_EAUTH", "authentication failed"},
    {AAMM_ETIMEDOUT, "AAMM_ETIMEDOUT", "timed out"},
    {AAMM_ECLOSED, "AAMM_ECLOSED", "closed"},
    {AAMM_ETOOBIG, "AAMM_ETOOBIG", "size limit exceeded"},
    {AAMM_EBUSY, "AAMM_EBUSY", "resource busy"},
    {AAMM_ECONFLICT, "AAMM_ECONFLICT", "conflict stopped the stream"},
    {AAMM_ENOTLEADER, "AAMM_ENOTLEADER", "not the leader / no leader reachable"},
    {AAMM_EEXHAUSTED, "AAMM_EEXHAUSTED", "no values left"},
    {AAMM_EIO, "AAMM_EIO", "local I/O error"},
    {AAMM_EUNSUPPORTED, "AAMM_EUNSUPPORTED", "not supported"},
    {AAMM_ECALLBACK, "AAMM_ECALLBACK", "a callback asked to stop"},
    {AAMM_EINTERNAL, "AAMM_EINTERNAL", "internal error (a bug in libaamm)"},
};

const char *aamm_strerror(int code)
{
    for (size_t i = 0; i < AAMM__ARRAY_SIZE(errors); i++)
        if (errors[i].code == code)
            return errors[i].text;
    return "unknown error";
}

const char *aamm_errname(int code)
{
    for (size_t i = 0; i < AAMM__ARRAY_SIZE(errors); i++)
        if (errors[i].code == code)
            return errors[i].name;
    return "AAMM_E?";
}

/* ====================================================================================
 * Allocator: a size header in front of every block keeps the statistics exact.
 * ==================================================================================== */

#define HDR_SIZE ((size_t)16) /* keeps max_align_t alignment for the caller's part */

static atomic_size_t mem_in_use;
static atomic_size_t mem_high_water;
static atomic_uint_fast64_t mem_allocations;
static atomic_uint_fast64_t mem_fail_at; /* 0: never fail */

static void account(size_t add, size_t sub)
{
    size_t now = atomic_fetch_add(&mem_in_use, add) + add;
    if (sub)
        now = atomic_fetch_sub(&mem_in_use, sub) - sub;
    size_t hw = atomic_load(&mem_high_water);
    while (now > hw && !atomic_compare_exchange_weak(&mem_high_water, &hw, now))
        ;
}

static bool should_fail(void)
{
    uint64_t n = atomic_fetch_add(&mem_allocations, 1) + 1;
    uint64_t at = atomic_load(&mem_fail_at);
    if (at != 0 && n >= at) {
        atomic_fetch_sub(&mem_allocations, 1);
        return true;
    }
    return false;
}

uint64_t aamm__alloc_fail_after(uint64_t n)
{
    uint64_t done = atomic_load(&mem_allocations);
    atomic_store(&mem_fail_at, n == 0 ? 0 : done + n);
    return done;
}

void *aamm__malloc(size_t size)
{
    unsigned char *p;
    if (size > SIZE_MAX - HDR_SIZE || should_fail())
        return NULL;
    p = malloc(HDR_SIZE + size);
    if (p == NULL) {
        atomic_fetch_sub(&mem_allocations, 1);
        return NULL;
    }
    memcpy(p, &size, sizeof size);
    account(size, 0);
    return p + HDR_SIZE;
}

void *aamm__calloc(size_t n, size_t size)
{
    void *p;
    if (size != 0 && n > SIZE_MAX / size)
        return NULL;
    p = aamm__malloc(n * size);
    if (p != NULL)
        memset(p, 0, n * size);
    return p;
}

void *aamm__realloc(void *ptr, size_t size)
{
    unsigned char *base, *p;
    size_t old;
    if (ptr == NULL)
        return aamm__malloc(size);
    if (size > SIZE_MAX - HDR_SIZE || should_fail())
        return NULL;
    base = (unsigned char *)ptr - HDR_SIZE;
    memcpy(&old, base, sizeof old);
    p = realloc(base, HDR_SIZE + size);
    if (p == NULL) {
        atomic_fetch_sub(&mem_allocations, 1);
        return NULL;
    }
    memcpy(p, &size, sizeof size);
    account(size, old);
    return p + HDR_SIZE;
}

void aamm__free(void *ptr)
{
    unsigned char *base;
    size_t size;
    if (ptr == NULL)
        return;
    base = (unsigned char *)ptr - HDR_SIZE;
    memcpy(&size, base, sizeof size);
    atomic_fetch_sub(&mem_in_use, size);
    free(base);
}

void aamm_free(void *ptr)
{
    aamm__free(ptr);
}

char *aamm__strndup(const char *s, size_t n)
{
    char *d = aamm__malloc(n + 1);
    if (d == NULL)
        return NULL;
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

char *aamm__strdup(const char *s)
{
    return aamm__strndup(s, strlen(s));
}

char *aamm__strdup_opt(const char *s, bool *ok)
{
    char *d;
    if (s == NULL)
        return NULL;
    d = aamm__strdup(s);
    if (d == NULL)
        *ok = false;
    return d;
}

char *aamm__asprintf(const char *fmt, ...)
{
    va_list ap;
    int n;
    char *s;
    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return NULL;
    s = aamm__malloc((size_t)n + 1);
    if (s == NULL)
        return NULL;
    va_start(ap, fmt);
    vsnprintf(s, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return s;
}

void aamm_memory_stats(struct aamm_memory_stats *stats)
{
    stats->in_use = atomic_load(&mem_in_use);
    stats->high_water = atomic_load(&mem_high_water);
    stats->allocations = atomic_load(&mem_allocations);
}

void aamm_memory_reset_high_water(void)
{
    atomic_store(&mem_high_water, atomic_load(&mem_in_use));
}

/* ====================================================================================
 * Per-handle error messages
 * ==================================================================================== */

int aamm__errf(struct aamm__err *err, int code, const char *fmt, ...)
{
    va_list ap;
    err->code = code;
    va_start(ap, fmt);
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
    va_end(ap);
    return code;
}

int aamm__errprefix(struct aamm__err *err, const char *fmt, ...)
{
    char prefix[256];
    char old[AAMM__ERRMSG_SIZE];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    size_t plen = strlen(prefix);
    memcpy(old, err->msg, sizeof old);
    /* Truncation is fine: the message keeps its beginning, the most specific context. */
    if (plen >= sizeof err->msg)
        plen = sizeof err->msg - 1;
    memcpy(err->msg, prefix, plen);
    size_t olen = strnlen(old, sizeof old - 1);
    if (olen > sizeof err->msg - 1 - plen)
        olen = sizeof err->msg - 1 - plen;
    memcpy(err->msg + plen, old, olen);
    err->msg[plen + olen] = '\0';
    return err->code;
}

void aamm__errclear(struct aamm__err *err)
{
    err->code = 0;
    err->msg[0] = '\0';
}

const char *aamm__errmsg(const struct aamm__err *err)
{
    return err->msg;
}

int aamm__newerrf(char *buf, size_t size, int code, const char *fmt, ...)
{
    va_list ap;
    if (buf == NULL || size == 0)
        return code;
    va_start(ap, fmt);
    vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return code;
}

int aamm__newerr_copy(char *buf, size_t size, const struct aamm__err *err)
{
    if (buf != NULL && size > 0)
        snprintf(buf, size, "%s", err->msg);
    return err->code;
}

/* ====================================================================================
 * Logging
 * ==================================================================================== */

static aamm_log_cb log_cb;
static void *log_arg;
static int log_max_level = -1; /* -1: not initialized yet (look at AAMM_DEBUG) */

static void stderr_logger(int level, const char *file, int line, const char *msg, void *arg)
{
    static const char *names[] = {"?", "error", "warning", "info", "debug"};
    (void)arg;
    fprintf(stderr, "aamm %s: %s (%s:%d)\n", names[level >= 1 && level <= 4 ? level : 0],
            msg, file, line);
}

void aamm_set_log_cb(aamm_log_cb cb, int max_level, void *arg)
{
    log_cb = cb;
    log_arg = arg;
    log_max_level = cb ? max_level : 0;
}

bool aamm__log_enabled(int level)
{
    if (log_max_level < 0) {
        const char *env = getenv("AAMM_DEBUG");
        if (env != NULL && *env != '\0') {
            int lvl = atoi(env);
            log_cb = stderr_logger;
            log_max_level = lvl >= 1 && lvl <= 4 ? lvl : AAMM_LOG_DEBUG;
        } else {
            log_max_level = 0;
        }
    }
    return log_cb != NULL && level <= log_max_level;
}

void aamm__log(int level, const char *file, int line, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    aamm_log_cb cb = log_cb;
    if (cb == NULL)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    cb(level, file, line, msg, log_arg);
}

/* ====================================================================================
 * Node ids
 * ==================================================================================== */

bool aamm_node_id_valid(uint32_t id)
{
    return id >= 1 && id <= AAMM_NODE_ID_MAX;
}

/* ====================================================================================
 * LSNs and time
 * ==================================================================================== */

char *aamm_lsn_format(uint64_t lsn, char *buf)
{
    snprintf(buf, AAMM_LSN_BUFSIZE, "%X/%X", (unsigned)(lsn >> 32), (unsigned)lsn);
    return buf;
}

static int parse_hex32(const char *s, size_t n, uint32_t *out)
{
    uint32_t v = 0;
    if (n == 0 || n > 8)
        return -1;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        uint32_t d;
        if (c >= '0' && c <= '9')
            d = (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f')
            d = (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            d = (uint32_t)(c - 'A' + 10);
        else
            return -1;
        v = (v << 4) | d;
    }
    *out = v;
    return 0;
}

int aamm_lsn_parse(const char *text, uint64_t *out)
{
    const char *slash;
    uint32_t hi, lo;
    if (text == NULL || (slash = strchr(text, '/')) == NULL)
        return AAMM_EMALFORMED;
    if (parse_hex32(text, (size_t)(slash - text), &hi) != 0 ||
        parse_hex32(slash + 1, strlen(slash + 1), &lo) != 0)
        return AAMM_EMALFORMED;
    *out = ((uint64_t)hi << 32) | lo;
    return AAMM_OK;
}

char *aamm_time_format(int64_t unix_us, char *buf, size_t size)
{
    int64_t secs = unix_us / 1000000;
    int64_t us = unix_us % 1000000;
    struct tm tm;
    time_t t;
    if (us < 0) {
        us += 1000000;
        secs -= 1;
    }
    t = (time_t)secs;
    gmtime_r(&t, &tm);
    snprintf(buf, size, "%04d-%02d-%02d %02d:%02d:%02d.%06" PRId64 "+00", tm.tm_year + 1900,
             tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, us);
    return buf;
}

int64_t aamm__now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t aamm__wall_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}
