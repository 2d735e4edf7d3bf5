/* seq_int.h: internal hooks of the seq component shared with its tests. */
#ifndef AAMM_SEQ_INT_H
#define AAMM_SEQ_INT_H

#include <stdint.h>

#include <aamm/seq.h>

/* Tests: set the 30-bit UUIDv7 counter (e.g. just below rollover). 0 or AAMM_EINVAL. */
int aamm__uuidv7_set_counter(struct aamm_uuidv7 *g, uint32_t counter);

#endif
