/* seq.c: the C generators: snowflake ids, UUIDv7, the galloc client and its consensus glue.
 * The SQL side (installed functions, serial columns) is in seq_sql.c. */
#include "config.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <aamm/consensus.h>
#include <aamm/seq.h>

#include "internal.h"
#include "seq_int.h"

static int64_t realtime_ms(void *arg)
{
    struct timespec ts;
    AAMM__UNUSED(arg);
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ====================================================================================
 * Snowflake
 * ==================================================================================== */

#define SF_COUNTER_MASK ((INT64_C(1) << AAMM_SNOWFLAKE_COUNTER_BITS) - 1)
#define SF_TIME_SHIFT                                                                              \
    (AAMM_SNOWFLAKE_COUNTER_BITS + AAMM_SNOWFLAKE_SOURCE_BITS + AAMM_SNOWFLAKE_NODE_BITS)
#define SF_LOW_MASK ((INT64_C(1) << SF_TIME_SHIFT) - 1) /* node, source and counter */
#define SF_MAX_MS ((INT64_C(1) << AAMM_SNOWFLAKE_TIME_BITS) - 1)
#define SF_NODE_SHIFT (AAMM_SNOWFLAKE_COUNTER_BITS + AAMM_SNOWFLAKE_SOURCE_BITS)
#define SF_NODE_MASK ((UINT32_C(1) << AAMM_SNOWFLAKE_NODE_BITS) - 1)
_Static_assert(AAMM_NODE_ID_MAX <= SF_NODE_MASK, "every node id fits the snowflake node bits");
/* A blocking aamm_snowflake_next gives up after sleeping max_borrow_ms + this: the clock
 * does not advance (a host's injected clock standing still). */
#define SF_WAIT_SLACK_MS 1000

struct aamm_snowflake {
    struct aamm_snowflake_options opts; /* max_borrow_ms resolved (never 0) */
    int64_t base;                       /* node and source bits, counter 0 */
    int64_t last;                       /* last id issued, or resume_after, or -1 */
    int64_t floor;   /* no id below this one: the first id after the start wait (see new) */
    int64_t wait_ms; /* after AAMM_EAGAIN: ms until the clock allows the next id */
    struct aamm__err err;
};

/* The clock, relative to the snowflake epoch. */
static int64_t sf_now(const struct aamm_snowflake *g)
{
    return g->opts.clock(g->opts.clock_arg) - AAMM_SNOWFLAKE_EPOCH_MS;
}

int aamm_snowflake_new(struct aamm_snowflake **out, const struct aamm_snowflake_options *opts,
                       char *err, size_t errsize)
{
    struct aamm_snowflake *g;
    int64_t base, start;
    if (out == NULL)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "snowflake: no handle pointer");
    *out = NULL;
    if (opts == NULL)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "snowflake: no options");
    if (!aamm_node_id_valid(opts->node_id))
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "snowflake: node id %" PRIu32 " outside 1..%d", opts->node_id,
                             AAMM_NODE_ID_MAX);
    base = (int64_t)opts->node_id << SF_NODE_SHIFT;
    if (opts->resume_after < 0)
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "snowflake: resume_after %" PRId64 " is negative", opts->resume_after);
    if (opts->max_borrow_ms < 0 || opts->max_borrow_ms > AAMM_SNOWFLAKE_MAX_BORROW_LIMIT_MS)
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "snowflake: max_borrow_ms %" PRId64 " outside 0..%d",
                             opts->max_borrow_ms, AAMM_SNOWFLAKE_MAX_BORROW_LIMIT_MS);
    if (opts->resume_after > 0 && (opts->resume_after & SF_LOW_MASK & ~SF_COUNTER_MASK) != base)
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "snowflake: resume_after %" PRId64 " is not a C id of node %" PRIu32,
                             opts->resume_after, opts->node_id);
    g = aamm__calloc(1, sizeof *g);
    if (g == NULL)
        return aamm__newerrf(err, errsize, AAMM_ENOMEM, "snowflake: out of memory");
    g->opts = *opts;
    if (g->opts.clock == NULL)
        g->opts.clock = realtime_ms;
    if (g->opts.max_borrow_ms == 0)
        g->opts.max_borrow_ms = AAMM_SNOWFLAKE_DEFAULT_MAX_BORROW_MS;
    g->base = base;
    g->last = opts->resume_after > 0 ? opts->resume_after : -1;
    /* The start wait. Every id an earlier run of this node issued has a time part at most
     * max_borrow_ms ahead of the clock when it was issued, so (the clock not having stepped
     * back since) at most start + max_borrow_ms: this run begins one millisecond above. It
     * can issue that id, within its own bound, once the clock has passed start. */
    start = sf_now(g);
    if (start < 0)
        start = 0;
    g->floor = start + g->opts.max_borrow_ms + 1 <= SF_MAX_MS
                   ? ((start + g->opts.max_borrow_ms + 1) << SF_TIME_SHIFT) | base
                   : INT64_MAX;
    *out = g;
    return 0;
}

void aamm_snowflake_free(struct aamm_snowflake *g)
{
    aamm__free(g);
}

/* One attempt at the next id (never waits). */
static int sf_next(struct aamm_snowflake *g, int64_t *id)
{
    int64_t now, cand, next, ahead;
    g->wait_ms = 0;
    now = sf_now(g);
    if (now < 0)
        now = 0; /* a clock before the epoch: count as the epoch (we borrow from last) */
    if (now > SF_MAX_MS)
        now = SF_MAX_MS + 1; /* caught below */
    /* 1. The smallest id after the last one: +1, or the next millisecond when the
     *    counter is full (never carry into the source bit). */
    if (g->last < 0)
        next = 0;
    else if ((g->last & SF_COUNTER_MASK) != SF_COUNTER_MASK)
        next = g->last + 1;
    else if ((g->last >> SF_TIME_SHIFT) >= SF_MAX_MS)
        return aamm__errf(&g->err, AAMM_EEXHAUSTED,
                          "snowflake: time part would pass 2^41 ms after the epoch");
    else
        next = (((g->last >> SF_TIME_SHIFT) + 1) << SF_TIME_SHIFT) | g->base;
    /* 2. Nothing an earlier run of this node may have issued (the start wait). */
    if (next < g->floor)
        next = g->floor;
    if (next == INT64_MAX)
        return aamm__errf(&g->err, AAMM_EEXHAUSTED,
                          "snowflake: time part would pass 2^41 ms after the epoch");
    /* 3. The first id of the current millisecond. */
    cand = now <= SF_MAX_MS ? ((now << SF_TIME_SHIFT) | g->base) : INT64_MAX;
    if (next < cand) {
        if (now > SF_MAX_MS)
            return aamm__errf(&g->err, AAMM_EEXHAUSTED,
                              "snowflake: the clock is past the 41-bit time range (2093)");
        next = cand;
    }
    if ((next >> SF_TIME_SHIFT) > SF_MAX_MS)
        return aamm__errf(&g->err, AAMM_EEXHAUSTED,
                          "snowflake: time part would pass 2^41 ms after the epoch");
    /* 4. Never more than max_borrow_ms ahead of the clock: what makes the start wait of
     *    the next run enough. */
    ahead = (next >> SF_TIME_SHIFT) - now;
    if (ahead > g->opts.max_borrow_ms) {
        g->wait_ms = ahead - g->opts.max_borrow_ms;
        return aamm__errf(&g->err, AAMM_EAGAIN,
                          "snowflake: node %" PRIu32 ": next id would run %" PRId64
                          " ms ahead of the clock (limit %" PRId64 " ms%s); retry in %" PRId64
                          " ms",
                          g->opts.node_id, ahead, g->opts.max_borrow_ms,
                          next == g->floor ? ", start wait of a new generator" : "", g->wait_ms);
    }
    g->last = next;
    *id = next;
    return 0;
}

int aamm_snowflake_next(struct aamm_snowflake *g, int64_t *id)
{
    int64_t slept = 0;
    int rc;
    if (g == NULL || id == NULL)
        return AAMM_EINVAL;
    while ((rc = sf_next(g, id)) == AAMM_EAGAIN && !g->opts.nonblocking &&
           slept + g->wait_ms <= g->opts.max_borrow_ms + SF_WAIT_SLACK_MS) {
        /* Wait for the clock (at most max_borrow_ms + 1 with a clock that runs). */
        struct timespec ts = {(time_t)(g->wait_ms / 1000), (long)(g->wait_ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
            ;
        slept += g->wait_ms;
    }
    return rc;
}

int64_t aamm_snowflake_wait_ms(const struct aamm_snowflake *g)
{
    return g == NULL ? 0 : g->wait_ms;
}

int64_t aamm_snowflake_last(const struct aamm_snowflake *g)
{
    return g == NULL || g->last < 0 ? 0 : g->last;
}

const char *aamm_snowflake_errmsg(const struct aamm_snowflake *g)
{
    return g == NULL ? "" : aamm__errmsg(&g->err);
}

void aamm_snowflake_decode(int64_t id, struct aamm_snowflake_parts *out)
{
    if (out == NULL)
        return;
    out->unix_ms = (id >> SF_TIME_SHIFT) + AAMM_SNOWFLAKE_EPOCH_MS;
    out->node_id = (uint32_t)(id >> SF_NODE_SHIFT) & SF_NODE_MASK;
    out->source = (int)((id >> AAMM_SNOWFLAKE_COUNTER_BITS) & 1);
    out->counter = (int)(id & SF_COUNTER_MASK);
}

/* ====================================================================================
 * UUIDv7: 48-bit ms | ver 7 | 30-bit counter (rand_a + top of rand_b) | 44 random bits
 * ==================================================================================== */

#define UUID_COUNTER_BITS 30
#define UUID_COUNTER_MAX ((UINT32_C(1) << UUID_COUNTER_BITS) - 1)
#define UUID_MAX_MS ((INT64_C(1) << 48) - 1)

struct aamm_uuidv7 {
    struct aamm_uuidv7_options opts;
    int64_t last_ms; /* -1: none yet */
    uint32_t counter;
    pid_t pid; /* process the random pool was filled in */
    size_t pool_pos;
    uint8_t pool[256];
    struct aamm__err err;
};

int aamm_uuidv7_new(struct aamm_uuidv7 **out, const struct aamm_uuidv7_options *opts, char *err,
                    size_t errsize)
{
    struct aamm_uuidv7 *g;
    if (out == NULL)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "uuidv7: no handle pointer");
    *out = NULL;
    g = aamm__calloc(1, sizeof *g);
    if (g == NULL)
        return aamm__newerrf(err, errsize, AAMM_ENOMEM, "uuidv7: out of memory");
    if (opts != NULL)
        g->opts = *opts;
    if (g->opts.clock == NULL)
        g->opts.clock = realtime_ms;
    g->last_ms = -1;
    g->pool_pos = sizeof g->pool; /* empty */
    *out = g;
    return 0;
}

void aamm_uuidv7_free(struct aamm_uuidv7 *g)
{
    if (g != NULL)
        memset(g->pool, 0, sizeof g->pool);
    aamm__free(g);
}

const char *aamm_uuidv7_errmsg(const struct aamm_uuidv7 *g)
{
    return g == NULL ? "" : aamm__errmsg(&g->err);
}

/* Take @n random bytes from the pool, refilling it from getrandom(2). A forked child has
 * a copy of the parent's pool: refill when the pid changed, so the two never share bytes. */
static int uuid_random(struct aamm_uuidv7 *g, uint8_t *dst, size_t n)
{
    pid_t pid = getpid();
    if (pid != g->pid) {
        g->pid = pid;
        g->pool_pos = sizeof g->pool;
    }
    if (g->pool_pos + n > sizeof g->pool) {
        size_t got = 0;
        while (got < sizeof g->pool) {
            ssize_t r = getrandom(g->pool + got, sizeof g->pool - got, 0);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                return aamm__errf(&g->err, AAMM_EIO, "uuidv7: getrandom: %s", strerror(errno));
            }
            got += (size_t)r;
        }
        g->pool_pos = 0;
    }
    memcpy(dst, g->pool + g->pool_pos, n);
    memset(g->pool + g->pool_pos, 0, n); /* never hand out the same bytes twice */
    g->pool_pos += n;
    return 0;
}

static int uuid_seed(struct aamm_uuidv7 *g)
{
    uint8_t b[4];
    int rc = uuid_random(g, b, sizeof b);
    if (rc < 0)
        return rc;
    /* top counter bit 0: at least 2^29 increments before the counter rolls over */
    g->counter = (((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3]) &
                 (UUID_COUNTER_MAX >> 1);
    return 0;
}

int aamm__uuidv7_set_counter(struct aamm_uuidv7 *g, uint32_t counter)
{
    if (g == NULL || counter > UUID_COUNTER_MAX)
        return AAMM_EINVAL;
    g->counter = counter;
    return 0;
}

int aamm_uuidv7_next(struct aamm_uuidv7 *g, uint8_t out[16])
{
    int64_t now, ms;
    uint32_t counter;
    uint8_t rnd[6];
    int rc;
    if (g == NULL || out == NULL)
        return AAMM_EINVAL;
    now = g->opts.clock(g->opts.clock_arg);
    if (now < 0)
        now = 0;
    if (now > g->last_ms) {
        /* 1. A new millisecond: the clock's time, a freshly seeded counter. */
        if ((rc = uuid_seed(g)) < 0)
            return rc;
        ms = now;
    } else if (g->counter < UUID_COUNTER_MAX) {
        /* 2. Same millisecond, or the clock stepped back: keep the last time, count on. */
        ms = g->last_ms;
        g->counter++;
    } else {
        /* 3. Counter rolled over: borrow the next millisecond (RFC 9562, 6.2). */
        if ((rc = uuid_seed(g)) < 0)
            return rc;
        ms = g->last_ms + 1;
    }
    if (ms > UUID_MAX_MS)
        return aamm__errf(&g->err, AAMM_EEXHAUSTED, "uuidv7: timestamp past 48 bits");
    if ((rc = uuid_random(g, rnd, sizeof rnd)) < 0)
        return rc;
    g->last_ms = ms;
    counter = g->counter;
    for (int i = 0; i < 6; i++)
        out[i] = (uint8_t)(ms >> (40 - 8 * i));
    /* counter bits 29..18 -> rand_a, 17..0 -> rand_b bits 61..44 */
    out[6] = (uint8_t)(0x70 | ((counter >> 26) & 0x0F));
    out[7] = (uint8_t)(counter >> 18);
    out[8] = (uint8_t)(0x80 | ((counter >> 12) & 0x3F));
    out[9] = (uint8_t)(counter >> 4);
    out[10] = (uint8_t)(((counter & 0x0F) << 4) | (rnd[0] & 0x0F));
    memcpy(out + 11, rnd + 1, 5);
    return 0;
}

char *aamm_uuidv7_format(const uint8_t uuid[16], char *buf)
{
    static const char hex[] = "0123456789abcdef";
    char *p = buf;
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            *p++ = '-';
        *p++ = hex[uuid[i] >> 4];
        *p++ = hex[uuid[i] & 0x0F];
    }
    *p = '\0';
    return buf;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int aamm_uuidv7_parse(const char *text, uint8_t out[16])
{
    uint8_t tmp[16];
    size_t j = 0;
    if (text == NULL || out == NULL || strlen(text) != 36)
        return AAMM_EMALFORMED;
    for (size_t i = 0; i < 36;) {
        int hi, lo;
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (text[i] != '-')
                return AAMM_EMALFORMED;
            i++;
            continue;
        }
        hi = hexval(text[i]);
        lo = hexval(text[i + 1]);
        if (hi < 0 || lo < 0)
            return AAMM_EMALFORMED;
        tmp[j++] = (uint8_t)(hi << 4 | lo);
        i += 2;
    }
    memcpy(out, tmp, 16);
    return 0;
}

int64_t aamm_uuidv7_unix_ms(const uint8_t uuid[16])
{
    int64_t ms = 0;
    for (int i = 0; i < 6; i++)
        ms = (ms << 8) | uuid[i];
    return ms;
}

/* ====================================================================================
 * galloc client: a sorted queue of half-open ranges [start, end), the first one current.
 * ==================================================================================== */

#define GALLOC_NAME_MAX 255
#define GALLOC_RETRY_MS 1000

struct galloc_range {
    int64_t next; /* next value to issue */
    int64_t end;  /* exclusive */
};

/* A request in flight through consensus; outlives the client if the client is freed
 * first (the callback then only frees it). */
struct galloc_req {
    struct aamm_galloc *g; /* NULL: orphaned */
};

struct aamm_galloc {
    char *name;
    struct aamm_galloc_options opts;
    struct galloc_range *ranges;
    int nranges;
    int64_t high;    /* end of the highest range ever added (0: none) */
    uint64_t issued; /* values issued */
    bool pending;    /* a request is in flight */
    int last_status; /* last failure of a range request (0: none) */
    char last_msg[256];
    /* consensus attachment */
    struct aamm_consensus *cs;
    struct galloc_req *req; /* in flight through cs */
    bool granted;           /* req finished with a range not yet applied locally */
    int64_t granted_start, granted_end;
    int64_t retry_at_ms; /* no new request before (monotonic ms) */
    struct aamm__err err;
};

int aamm_galloc_new(struct aamm_galloc **out, const struct aamm_galloc_options *opts, char *err,
                    size_t errsize)
{
    struct aamm_galloc *g;
    size_t len;
    if (out == NULL)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "galloc: no handle pointer");
    *out = NULL;
    if (opts == NULL || opts->name == NULL)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "galloc: no sequence name");
    len = strlen(opts->name);
    if (len == 0 || len > GALLOC_NAME_MAX)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "galloc: sequence name must be 1..%d bytes",
                             GALLOC_NAME_MAX);
    if (opts->range_size < 0 || opts->range_size > (INT64_C(1) << 31) || opts->low_water < 0 ||
        opts->max_ranges < 0 || opts->min_start < 0 || opts->resume_after < 0)
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "galloc: sequence \"%s\": range_size outside 0..2^31, or a negative "
                             "low_water, max_ranges, min_start or resume_after",
                             opts->name);
    g = aamm__calloc(1, sizeof *g);
    if (g == NULL)
        return aamm__newerrf(err, errsize, AAMM_ENOMEM, "galloc: out of memory");
    g->opts = *opts;
    if (g->opts.range_size == 0)
        g->opts.range_size = 1000;
    if (g->opts.low_water == 0)
        g->opts.low_water = g->opts.range_size;
    if (g->opts.max_ranges == 0)
        g->opts.max_ranges = 4;
    g->name = aamm__strdup(opts->name);
    g->ranges = aamm__calloc((size_t)g->opts.max_ranges, sizeof *g->ranges);
    if (g->name == NULL || g->ranges == NULL) {
        aamm__free(g->name);
        aamm__free(g->ranges);
        aamm__free(g);
        return aamm__newerrf(err, errsize, AAMM_ENOMEM, "galloc: out of memory");
    }
    g->opts.name = g->name;
    *out = g;
    return 0;
}

void aamm_galloc_free(struct aamm_galloc *g)
{
    if (g == NULL)
        return;
    if (g->req != NULL)
        g->req->g = NULL; /* the consensus callback frees it */
    aamm__free(g->ranges);
    aamm__free(g->name);
    aamm__free(g);
}

const char *aamm_galloc_errmsg(const struct aamm_galloc *g)
{
    return g == NULL ? "" : aamm__errmsg(&g->err);
}

const char *aamm_galloc_name(const struct aamm_galloc *g)
{
    return g == NULL ? NULL : g->name;
}

int64_t aamm_galloc_available(const struct aamm_galloc *g)
{
    int64_t n = 0;
    if (g == NULL)
        return 0;
    for (int i = 0; i < g->nranges; i++)
        n += g->ranges[i].end - g->ranges[i].next;
    return n;
}

int aamm_galloc_next(struct aamm_galloc *g, int64_t *v)
{
    if (g == NULL || v == NULL)
        return AAMM_EINVAL;
    if (g->cs != NULL)
        (void)aamm_galloc_pump(g); /* a failure is kept for the message below */
    while (g->nranges > 0 && g->ranges[0].next >= g->ranges[0].end) {
        memmove(g->ranges, g->ranges + 1, (size_t)(g->nranges - 1) * sizeof *g->ranges);
        g->nranges--;
    }
    if (g->nranges == 0) {
        return aamm__errf(&g->err, AAMM_EEXHAUSTED,
                          "galloc: sequence \"%s\": no values left on this node (%" PRIu64
                          " issued, all held ranges used up; %s%s%s)",
                          g->name, g->issued,
                          g->pending ? "a range request is in flight"
                                     : "no range request in flight",
                          g->last_status != 0 ? "; last request failed: " : "",
                          g->last_status != 0 ? g->last_msg : "");
    }
    *v = g->ranges[0].next++;
    g->issued++;
    if (g->ranges[0].next >= g->ranges[0].end) {
        memmove(g->ranges, g->ranges + 1, (size_t)(g->nranges - 1) * sizeof *g->ranges);
        g->nranges--;
    }
    return 0;
}

bool aamm_galloc_wants_range(const struct aamm_galloc *g, uint64_t *count)
{
    if (g == NULL || g->pending || g->nranges >= g->opts.max_ranges ||
        aamm_galloc_available(g) > g->opts.low_water)
        return false;
    if (count != NULL)
        *count = (uint64_t)g->opts.range_size;
    return true;
}

int aamm_galloc_begin_request(struct aamm_galloc *g, uint64_t *count)
{
    if (!aamm_galloc_wants_range(g, count))
        return AAMM_EAGAIN;
    g->pending = true;
    return 0;
}

void aamm_galloc_cancel_request(struct aamm_galloc *g, int status, const char *msg)
{
    if (g == NULL)
        return;
    g->pending = false;
    g->last_status = status != 0 ? status : AAMM_EAGAIN;
    snprintf(g->last_msg, sizeof g->last_msg, "%s%s%s", aamm_errname(g->last_status),
             msg != NULL && *msg != '\0' ? ": " : "", msg != NULL ? msg : "");
}

bool aamm_galloc_request_pending(const struct aamm_galloc *g)
{
    return g != NULL && g->pending;
}

int aamm_galloc_add_range(struct aamm_galloc *g, int64_t start, int64_t end)
{
    if (g == NULL)
        return AAMM_EINVAL;
    if (start < 0 || end <= start)
        return aamm__errf(&g->err, AAMM_EINVAL,
                          "galloc: sequence \"%s\": invalid range [%" PRId64 ", %" PRId64 ")",
                          g->name, start, end);
    if (start < g->high)
        return aamm__errf(&g->err, AAMM_EINVAL,
                          "galloc: sequence \"%s\": range [%" PRId64 ", %" PRId64
                          ") is not above the ranges added before (up to %" PRId64 ")",
                          g->name, start, end, g->high);
    while (g->nranges > 0 && g->ranges[0].next >= g->ranges[0].end) {
        memmove(g->ranges, g->ranges + 1, (size_t)(g->nranges - 1) * sizeof *g->ranges);
        g->nranges--;
    }
    if (g->nranges >= g->opts.max_ranges)
        return aamm__errf(&g->err, AAMM_ETOOBIG,
                          "galloc: sequence \"%s\": already holding %d ranges", g->name,
                          g->nranges);
    g->high = end;
    g->pending = false;
    g->last_status = 0;
    g->last_msg[0] = '\0';
    if (g->opts.resume_after >= start)
        start = g->opts.resume_after + 1;
    if (start < end) {
        g->ranges[g->nranges].next = start;
        g->ranges[g->nranges].end = end;
        g->nranges++;
    }
    return 0;
}

int aamm_galloc_take_range(struct aamm_galloc *g, int64_t *start, int64_t *end)
{
    if (g == NULL || start == NULL || end == NULL)
        return AAMM_EINVAL;
    while (g->nranges > 0 && g->ranges[0].next >= g->ranges[0].end) {
        memmove(g->ranges, g->ranges + 1, (size_t)(g->nranges - 1) * sizeof *g->ranges);
        g->nranges--;
    }
    if (g->nranges == 0)
        return aamm__errf(&g->err, AAMM_EEXHAUSTED, "galloc: sequence \"%s\": no range held",
                          g->name);
    *start = g->ranges[0].next;
    *end = g->ranges[0].end;
    memmove(g->ranges, g->ranges + 1, (size_t)(g->nranges - 1) * sizeof *g->ranges);
    g->nranges--;
    return 0;
}

/* ---- consensus glue --------------------------------------------------------------- */

static void galloc_granted(struct aamm_consensus *cs, int status, int64_t start, int64_t end,
                           void *arg)
{
    struct galloc_req *req = arg;
    struct aamm_galloc *g = req->g;
    AAMM__UNUSED(cs);
    if (g == NULL) { /* client freed or detached meanwhile: the range is lost, never reused */
        aamm__free(req);
        return;
    }
    g->req = NULL;
    aamm__free(req);
    if (status != 0) {
        aamm_galloc_cancel_request(g, status, "consensus could not reserve a range");
        g->retry_at_ms = aamm__now_ms() + GALLOC_RETRY_MS;
        AAMM_WARN("galloc: sequence \"%s\": range request failed: %s", g->name,
                  aamm_errname(status));
        return;
    }
    /* Keep it until the entry is applied on this node (checked in pump). */
    g->granted = true;
    g->granted_start = start;
    g->granted_end = end;
}

int aamm_galloc_attach(struct aamm_galloc *g, struct aamm_consensus *cs)
{
    if (g == NULL)
        return AAMM_EINVAL;
    if (g->req != NULL) {
        if (cs == NULL) { /* detach: orphan the request; its range is dropped */
            g->req->g = NULL;
            g->req = NULL;
            g->pending = false;
        } else {
            return aamm__errf(&g->err, AAMM_EBUSY,
                              "galloc: sequence \"%s\": a request is still in flight", g->name);
        }
    }
    g->cs = cs;
    g->granted = false;
    return 0;
}

int aamm_galloc_pump(struct aamm_galloc *g)
{
    uint64_t count;
    int rc;
    if (g == NULL)
        return AAMM_EINVAL;
    if (g->cs == NULL)
        return 0;
    /* 1. A granted range becomes usable once the state applied locally has passed it: a
     *    value is issued only from a range this node's state machine already holds. */
    if (g->granted) {
        int64_t next = 0;
        if (aamm_consensus_galloc_next(g->cs, g->name, &next) == 0 && next >= g->granted_end) {
            g->granted = false;
            rc = aamm_galloc_add_range(g, g->granted_start, g->granted_end);
            if (rc < 0) {
                aamm_galloc_cancel_request(g, rc, aamm__errmsg(&g->err));
                return rc;
            }
        }
    }
    /* 2. Ask for the next range below the low-water mark. */
    if (g->granted || g->req != NULL || aamm__now_ms() < g->retry_at_ms)
        return 0;
    if (aamm_galloc_begin_request(g, &count) != 0)
        return 0;
    g->req = aamm__calloc(1, sizeof *g->req);
    if (g->req == NULL) {
        aamm_galloc_cancel_request(g, AAMM_ENOMEM, "out of memory");
        return aamm__errf(&g->err, AAMM_ENOMEM, "galloc: out of memory");
    }
    g->req->g = g;
    rc = aamm_consensus_galloc(g->cs, g->name, count, g->opts.min_start > 0 ? g->opts.min_start : 1,
                               galloc_granted, g->req);
    if (rc < 0) {
        aamm__free(g->req);
        g->req = NULL;
        aamm_galloc_cancel_request(g, rc, aamm_consensus_errmsg(g->cs));
        g->retry_at_ms = aamm__now_ms() + GALLOC_RETRY_MS;
        return aamm__errf(&g->err, rc, "galloc: sequence \"%s\": %s", g->name,
                          aamm_consensus_errmsg(g->cs));
    }
    return 0;
}
