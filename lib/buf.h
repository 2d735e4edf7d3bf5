/*
 * buf.h: bounds-checked byte cursors for decoders and a growable buffer for encoders.
 * Readers never read past the end: every get fails (returns false and marks the cursor
 * bad) instead, so a decoder checks `ok` once at the end of a message.
 */
#ifndef AAMM_BUF_H
#define AAMM_BUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"

/* ---- reading --------------------------------------------------------------------- */

struct aamm__rd {
    const uint8_t *p;
    size_t left;
    bool ok;
};

static inline void aamm__rd_init(struct aamm__rd *r, const void *data, size_t len)
{
    r->p = (const uint8_t *)data;
    r->left = len;
    r->ok = true;
}

static inline bool aamm__rd_need(struct aamm__rd *r, size_t n)
{
    if (!r->ok || r->left < n) {
        r->ok = false;
        return false;
    }
    return true;
}

static inline const uint8_t *aamm__rd_bytes(struct aamm__rd *r, size_t n)
{
    const uint8_t *p;
    if (!aamm__rd_need(r, n))
        return NULL;
    p = r->p;
    r->p += n;
    r->left -= n;
    return p;
}

static inline uint8_t aamm__rd_u8(struct aamm__rd *r)
{
    const uint8_t *p = aamm__rd_bytes(r, 1);
    return p ? p[0] : 0;
}

/* Big-endian (network order), as PostgreSQL's protocol uses. */
static inline uint16_t aamm__rd_be16(struct aamm__rd *r)
{
    const uint8_t *p = aamm__rd_bytes(r, 2);
    return p ? (uint16_t)((p[0] << 8) | p[1]) : 0;
}

static inline uint32_t aamm__rd_be32(struct aamm__rd *r)
{
    const uint8_t *p = aamm__rd_bytes(r, 4);
    return p ? ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3]
             : 0;
}

static inline uint64_t aamm__rd_be64(struct aamm__rd *r)
{
    uint64_t hi = aamm__rd_be32(r);
    uint64_t lo = aamm__rd_be32(r);
    return (hi << 32) | lo;
}

/* Little-endian, as libaamm's own wire format uses. */
static inline uint16_t aamm__rd_le16(struct aamm__rd *r)
{
    const uint8_t *p = aamm__rd_bytes(r, 2);
    return p ? (uint16_t)(p[0] | (p[1] << 8)) : 0;
}

static inline uint32_t aamm__rd_le32(struct aamm__rd *r)
{
    const uint8_t *p = aamm__rd_bytes(r, 4);
    return p ? (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
                   ((uint32_t)p[3] << 24)
             : 0;
}

static inline uint64_t aamm__rd_le64(struct aamm__rd *r)
{
    uint64_t lo = aamm__rd_le32(r);
    uint64_t hi = aamm__rd_le32(r);
    return (hi << 32) | lo;
}

/* A NUL-terminated string inside the message: returns its start and length (without the
 * NUL), or NULL when no NUL is found before the end. */
static inline const char *aamm__rd_cstr(struct aamm__rd *r, size_t *len)
{
    const uint8_t *nul;
    const char *s;
    if (!r->ok)
        return NULL;
    nul = (const uint8_t *)memchr(r->p, 0, r->left);
    if (nul == NULL) {
        r->ok = false;
        return NULL;
    }
    s = (const char *)r->p;
    *len = (size_t)(nul - r->p);
    r->left -= *len + 1;
    r->p = nul + 1;
    return s;
}

/* ---- writing --------------------------------------------------------------------- */

/* A growable buffer. `ok` turns false on allocation failure; later puts do nothing. */
struct aamm__wr {
    uint8_t *data; /* heap (aamm__malloc) */
    size_t len;
    size_t cap;
    bool ok;
};

static inline void aamm__wr_init(struct aamm__wr *w)
{
    w->data = NULL;
    w->len = 0;
    w->cap = 0;
    w->ok = true;
}

static inline void aamm__wr_free(struct aamm__wr *w)
{
    aamm__free(w->data);
    aamm__wr_init(w);
}

static inline bool aamm__wr_reserve(struct aamm__wr *w, size_t n)
{
    size_t cap;
    uint8_t *p;
    if (!w->ok)
        return false;
    if (w->cap - w->len >= n)
        return true;
    cap = w->cap ? w->cap : 256;
    while (cap - w->len < n) {
        if (cap > SIZE_MAX / 2) {
            w->ok = false;
            return false;
        }
        cap *= 2;
    }
    p = (uint8_t *)aamm__realloc(w->data, cap);
    if (p == NULL) {
        w->ok = false;
        return false;
    }
    w->data = p;
    w->cap = cap;
    return true;
}

static inline void aamm__wr_bytes(struct aamm__wr *w, const void *src, size_t n)
{
    if (n == 0 || !aamm__wr_reserve(w, n))
        return;
    memcpy(w->data + w->len, src, n);
    w->len += n;
}

static inline void aamm__wr_u8(struct aamm__wr *w, uint8_t v)
{
    aamm__wr_bytes(w, &v, 1);
}

static inline void aamm__wr_be16(struct aamm__wr *w, uint16_t v)
{
    uint8_t b[2] = {(uint8_t)(v >> 8), (uint8_t)v};
    aamm__wr_bytes(w, b, 2);
}

static inline void aamm__wr_be32(struct aamm__wr *w, uint32_t v)
{
    uint8_t b[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    aamm__wr_bytes(w, b, 4);
}

static inline void aamm__wr_be64(struct aamm__wr *w, uint64_t v)
{
    aamm__wr_be32(w, (uint32_t)(v >> 32));
    aamm__wr_be32(w, (uint32_t)v);
}

static inline void aamm__wr_le16(struct aamm__wr *w, uint16_t v)
{
    uint8_t b[2] = {(uint8_t)v, (uint8_t)(v >> 8)};
    aamm__wr_bytes(w, b, 2);
}

static inline void aamm__wr_le32(struct aamm__wr *w, uint32_t v)
{
    uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    aamm__wr_bytes(w, b, 4);
}

static inline void aamm__wr_le64(struct aamm__wr *w, uint64_t v)
{
    aamm__wr_le32(w, (uint32_t)v);
    aamm__wr_le32(w, (uint32_t)(v >> 32));
}

#endif /* AAMM_BUF_H */
