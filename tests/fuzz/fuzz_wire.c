/*
 * fuzz_wire.c: libFuzzer target for the wire decoder. The first input byte picks options
 * (chunk size, MAC mode, small limits); the rest is the byte stream. Every event is touched
 * so that ASan sees any bad pointer; the decoder must end in EAGAIN, an error, or a clean
 * finish, never crash or hang.
 */
#include "config.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include <aamm/wire.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int fz_verify(struct aamm_wire_decoder *dec, const uint8_t *frame, size_t len,
                     const uint8_t *mac, void *arg)
{
    uint32_t c = aamm_crc32c(0x5EC12E7u, frame, len);
    (void)dec;
    (void)arg;
    for (int i = 0; i < AAMM_WIRE_MAC_SIZE; i++)
        if (mac[i] != ((uint8_t)(c >> ((i % 4) * 8)) ^ (uint8_t)i))
            return AAMM_EAUTH;
    return 0;
}

static size_t touch_tuple(const struct aamm_tuple *t)
{
    size_t s = 0;
    for (uint32_t i = 0; i < t->nvalues; i++)
        if (t->values[i].kind == AAMM_VALUE_TEXT)
            s += strlen(t->values[i].data) + t->values[i].len;
    return s;
}

static size_t touch(const struct aamm_wire_event *ev)
{
    size_t s = 0;
    const struct aamm_change *c = &ev->change;
    switch (ev->kind) {
    case AAMM_WIRE_EV_HELLO:
        return strlen(ev->hello.cluster);
    case AAMM_WIRE_EV_RESUME:
        for (uint32_t i = 0; i < ev->npositions; i++)
            s += ev->positions[i].lsn;
        return s;
    case AAMM_WIRE_EV_ERROR:
    case AAMM_WIRE_EV_GOODBYE:
        return strlen(ev->message);
    case AAMM_WIRE_EV_BEGIN:
    case AAMM_WIRE_EV_COMMIT:
        return ev->txn.origin_name ? strlen(ev->txn.origin_name) : 0;
    case AAMM_WIRE_EV_CHANGE:
        if (c->relation != NULL) {
            s += strlen(c->relation->schema) + strlen(c->relation->name);
            for (uint32_t i = 0; i < c->relation->ncolumns; i++)
                s += strlen(c->relation->columns[i].name);
        }
        s += touch_tuple(&c->old_tuple) + touch_tuple(&c->new_tuple);
        for (uint32_t i = 0; i < c->nrelations; i++)
            s += c->relations[i]->ncolumns;
        if (c->kind == AAMM_CHANGE_MESSAGE)
            s += strlen(c->prefix) + c->content_len + (uint8_t)c->content[c->content_len];
        return s;
    default:
        return 0;
    }
}

/* Walk the frames of @buf and recompute every CRC (and MAC) so that mutations reach the
 * payload parsers instead of stopping at the checksum. */
static void fix_checksums(uint8_t *buf, size_t len, bool mac)
{
    size_t off = 0;
    while (len - off >= AAMM_WIRE_HEADER_SIZE) {
        uint8_t *h = buf + off;
        uint32_t plen = (uint32_t)h[8] | ((uint32_t)h[9] << 8) | ((uint32_t)h[10] << 16) |
                        ((uint32_t)h[11] << 24);
        uint32_t crc;
        size_t avail = len - off - AAMM_WIRE_HEADER_SIZE;
        if (plen > avail)
            return;
        crc = aamm_crc32c(aamm_crc32c(0, h, 12), h + AAMM_WIRE_HEADER_SIZE, plen);
        memcpy(h + 12, &crc, 4); /* little-endian host */
        off += AAMM_WIRE_HEADER_SIZE + plen;
        if (mac) {
            uint32_t c = aamm_crc32c(0x5EC12E7u, h, AAMM_WIRE_HEADER_SIZE + plen);
            if (len - off < AAMM_WIRE_MAC_SIZE)
                return;
            for (int i = 0; i < AAMM_WIRE_MAC_SIZE; i++)
                buf[off + (size_t)i] = (uint8_t)(c >> ((i % 4) * 8)) ^ (uint8_t)i;
            off += AAMM_WIRE_MAC_SIZE;
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct aamm_wire_decoder *dec;
    struct aamm_wire_options o = {0};
    struct aamm_wire_event ev;
    volatile size_t sink = 0;
    size_t off = 1, chunk;
    int rc;
    uint8_t *copy = NULL;
    if (size < 1)
        return 0;
    if (data[0] & 0x40) {
        copy = malloc(size);
        if (copy == NULL)
            return 0;
        memcpy(copy, data, size);
        fix_checksums(copy + 1, size - 1, (data[0] & 0x10) != 0);
        data = copy;
    }
    chunk = 1 + (data[0] & 0x0F) * 97;
    if (data[0] & 0x20) {
        o.max_payload = 4096;
        o.max_record = 65536;
        o.max_relations = 8;
    }
    if (aamm_wire_decoder_new(&dec, &o, NULL, 0) != 0) {
        free(copy);
        return 0;
    }
    if (data[0] & 0x10)
        aamm_wire_decoder_set_mac(dec, fz_verify, NULL);
    for (;;) {
        size_t acc = 0, n;
        while ((rc = aamm_wire_decoder_next(dec, &ev)) == 0)
            sink += touch(&ev);
        if (rc != AAMM_EAGAIN)
            break;
        if (off >= size) {
            aamm_wire_decoder_finish(dec);
            break;
        }
        n = size - off < chunk ? size - off : chunk;
        if (aamm_wire_decoder_feed(dec, data + off, n, &acc) != 0 || acc == 0)
            break;
        off += acc;
    }
    aamm_wire_decoder_free(dec);
    free(copy);
    (void)sink;
    return 0;
}
