/*
 * netfx.h: socket helpers for link tests: loopback listeners, raw clients, and an in-process
 * TCP proxy (single-threaded, stepped from the test's poll loop) that can cut the connection,
 * record the bytes one side sent, alter a frame in flight, and drop, duplicate or reorder a
 * whole frame (it parses frame boundaries: 16-byte header, length, MAC trailer).
 */
#ifndef AAMM_NETFX_H
#define AAMM_NETFX_H

#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A non-blocking listening socket on 127.0.0.1 with an ephemeral port (*port set). */
int netfx_listen(int *port);
/* Accept one pending connection (non-blocking); -1 if none. */
int netfx_accept(int lfd);
/* A blocking client socket connected to 127.0.0.1:@port, or -1. */
int netfx_connect(int port);
/* Read whatever arrives on @fd within @ms milliseconds into @buf (at most @cap bytes). */
size_t netfx_read_for(int fd, void *buf, size_t cap, int ms);

struct netfx_growbuf {
    uint8_t *p;
    size_t len, cap;
};

/* Whole-frame faults on the a->b direction (netfx_proxy.fault). */
enum netfx_fault {
    NETFX_FAULT_NONE = 0,
    NETFX_FAULT_DROP, /* DATA frame N never reaches b */
    NETFX_FAULT_DUP,  /* DATA frame N reaches b twice in a row */
    NETFX_FAULT_SWAP, /* DATA frame N reaches b after the frame that follows it */
};

struct netfx_proxy {
    int lfd, port, target_port;
    int a, b;                    /* a: the dialing side (accepted), b: upstream */
    struct netfx_growbuf ab, ba; /* bytes waiting to be written */
    uint64_t connections, cuts;
    bool record; /* keep a copy of what a sent in @recorded */
    struct netfx_growbuf recorded;
    long tamper_frame; /* >= 0: alter frame number N (0-based) a->b, CRC fixed */
    long frames_ab;    /* frames forwarded a->b on this connection (tamper mode) */
    bool tampered;
    enum netfx_fault fault; /* applied to DATA frame number fault_data (0-based) a->b */
    long fault_data;
    long data_ab; /* DATA frames seen a->b on the last connection (frame mode) */
    long lz4_ab;  /* of which LZ4-compressed */
    bool faulted; /* the fault was applied (SWAP: both frames went out swapped) */
    struct netfx_growbuf abin, held; /* frame mode: unparsed a->b bytes; a frame held back */
};

void netfx_proxy_init(struct netfx_proxy *p, int target_port);
void netfx_proxy_free(struct netfx_proxy *p);
/* Close both sides of the current connection (a cut). */
void netfx_proxy_cut(struct netfx_proxy *p);
/* Append the proxy's pollfds to @fds (at most 3); returns how many. */
int netfx_proxy_pollfds(struct netfx_proxy *p, struct pollfd *fds);
/* Accept, relay what can be relayed without blocking. */
void netfx_proxy_step(struct netfx_proxy *p);

#endif
