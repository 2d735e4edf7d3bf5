/*
 * wiregen.h: random transactions for wire and link tests: a pool of random relations, random
 * changes of every kind and value kind, deep comparison of decoded results.
 */
#ifndef AAMM_WIREGEN_H
#define AAMM_WIREGEN_H

#include <stdbool.h>
#include <stdint.h>

#include <aamm/change.h>

/* A pool of relations the random changes refer to (heap, owned by the pool). */
struct wg_pool {
    uint32_t n;
    struct aamm_relation *rels;
};

/* A generated transaction: header plus changes (heap; relations borrowed from the pool). */
struct wg_txn {
    struct aamm_transaction txn;
    uint32_t nchanges;
    struct aamm_change *changes;
};

/* Shape of generated transactions. */
struct wg_shape {
    uint32_t max_changes; /* 1.. */
    uint32_t max_value;   /* largest text value in bytes */
    uint32_t big_value;   /* if non-zero: one value of this size in the transaction */
    bool compressible;    /* text from a small alphabet with repeats */
};

void wg_pool_init(struct wg_pool *pool, uint64_t *seed, uint32_t n);
void wg_pool_free(struct wg_pool *pool);

/* Fill @t with a random transaction of origin @origin, commit at @lsn (end_lsn = lsn + 40). */
void wg_txn_random(struct wg_txn *t, uint64_t *seed, const struct wg_pool *pool,
                   const struct wg_shape *shape, uint32_t origin, uint64_t lsn);
void wg_txn_free(struct wg_txn *t);

/* Deep comparison of two changes (relations by aamm_relation_equal). */
bool wg_change_equal(const struct aamm_change *a, const struct aamm_change *b);
/* Compare transaction headers field by field (origin name included). */
bool wg_txn_header_equal(const struct aamm_transaction *a, const struct aamm_transaction *b);

#endif
