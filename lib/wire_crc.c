/* wire_crc.c: CRC32C (Castagnoli), SSE4.2 when the CPU has it, else slicing-by-8. */
#include "config.h"

#include <stdatomic.h>
#include <string.h>

#include <aamm/wire.h>

#include "internal.h"

#define POLY 0x82F63B78u /* reflected 0x1EDC6F41 */

static uint32_t table[8][256];
static atomic_int state; /* 0 unknown, 1 software, 2 hardware */

/* ====================================================================================
 * Software: slicing-by-8
 * ==================================================================================== */

static void make_tables(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xFF];
}

static uint32_t crc_sw(uint32_t crc, const uint8_t *p, size_t len)
{
    while (len > 0 && ((uintptr_t)p & 7) != 0) {
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xFF];
        len--;
    }
    while (len >= 8) {
        /* Read as two little-endian words regardless of host order. */
        uint32_t lo = (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
                      ((uint32_t)p[3] << 24);
        uint32_t hi = (uint32_t)p[4] | ((uint32_t)p[5] << 8) | ((uint32_t)p[6] << 16) |
                      ((uint32_t)p[7] << 24);
        lo ^= crc;
        crc = table[7][lo & 0xFF] ^ table[6][(lo >> 8) & 0xFF] ^ table[5][(lo >> 16) & 0xFF] ^
              table[4][lo >> 24] ^ table[3][hi & 0xFF] ^ table[2][(hi >> 8) & 0xFF] ^
              table[1][(hi >> 16) & 0xFF] ^ table[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len-- > 0)
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xFF];
    return crc;
}

/* ====================================================================================
 * Hardware: SSE4.2 crc32 instruction (x86-64 only)
 * ==================================================================================== */

#if defined(__x86_64__) && defined(__GNUC__)
#define HAVE_HW 1
__attribute__((target("sse4.2"))) static uint32_t crc_hw(uint32_t crc, const uint8_t *p, size_t len)
{
    uint64_t c = crc;
    while (len > 0 && ((uintptr_t)p & 7) != 0) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        len--;
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8); /* x86 is little-endian */
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        len -= 8;
    }
    while (len-- > 0)
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return (uint32_t)c;
}
#else
#define HAVE_HW 0
#endif

static int detect(void)
{
    int s = atomic_load(&state);
    if (s != 0)
        return s;
    make_tables(); /* idempotent: racing threads write the same values */
    s = 1;
#if HAVE_HW
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2"))
        s = 2;
#endif
    atomic_store(&state, s);
    return s;
}

uint32_t aamm_crc32c(uint32_t crc, const void *data, size_t len)
{
    int s = detect();
    crc = ~crc;
#if HAVE_HW
    if (s == 2)
        return ~crc_hw(crc, data, len);
#endif
    (void)s;
    return ~crc_sw(crc, data, len);
}

/* Testing: force the software path (hw = false) or the detected path. */
uint32_t aamm__crc32c_sw(uint32_t crc, const void *data, size_t len);
uint32_t aamm__crc32c_sw(uint32_t crc, const void *data, size_t len)
{
    detect();
    return ~crc_sw(~crc, data, len);
}
