/* netfx.c: loopback sockets and a steppable TCP proxy for link tests. */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <aamm/wire.h>

#include "netfx.h"

static void nonblock(int fd)
{
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

int netfx_listen(int *port)
{
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    int one = 1;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 64) != 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &len) != 0) {
        close(fd);
        return -1;
    }
    nonblock(fd);
    *port = ntohs(sa.sin_port);
    return fd;
}

int netfx_accept(int lfd)
{
    int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    return fd;
}

int netfx_connect(int port)
{
    struct sockaddr_in sa;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sa.sin_port = htons((uint16_t)port);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

size_t netfx_read_for(int fd, void *buf, size_t cap, int ms)
{
    size_t got = 0;
    struct pollfd pfd = {fd, POLLIN, 0};
    while (got < cap && poll(&pfd, 1, ms) > 0) {
        ssize_t r = recv(fd, (char *)buf + got, cap - got, MSG_DONTWAIT);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    return got;
}

/* ---- proxy ----------------------------------------------------------------------- */

static void gb_add(struct netfx_growbuf *g, const void *p, size_t n)
{
    if (g->len + n > g->cap) {
        g->cap = (g->len + n) * 2 + 4096;
        g->p = realloc(g->p, g->cap);
        if (g->p == NULL)
            abort();
    }
    memcpy(g->p + g->len, p, n);
    g->len += n;
}

static void gb_drop(struct netfx_growbuf *g, size_t n)
{
    if (n == 0)
        return; /* also for a buffer never allocated (memmove of NULL) */
    memmove(g->p, g->p + n, g->len - n);
    g->len -= n;
}

void netfx_proxy_init(struct netfx_proxy *p, int target_port)
{
    memset(p, 0, sizeof *p);
    p->lfd = netfx_listen(&p->port);
    p->target_port = target_port;
    p->a = p->b = -1;
    p->tamper_frame = -1;
}

void netfx_proxy_cut(struct netfx_proxy *p)
{
    if (p->a >= 0) {
        close(p->a);
        p->cuts++;
    }
    if (p->b >= 0)
        close(p->b);
    p->a = p->b = -1;
    p->ab.len = p->ba.len = p->abin.len = p->held.len = 0;
    p->frames_ab = 0; /* data_ab, lz4_ab stay for the test to read until the next connection */
}

void netfx_proxy_free(struct netfx_proxy *p)
{
    netfx_proxy_cut(p);
    if (p->lfd >= 0)
        close(p->lfd);
    free(p->ab.p);
    free(p->ba.p);
    free(p->recorded.p);
    free(p->abin.p);
    free(p->held.p);
    memset(p, 0, sizeof *p);
    p->lfd = p->a = p->b = -1;
}

int netfx_proxy_pollfds(struct netfx_proxy *p, struct pollfd *fds)
{
    int n = 0;
    if (p->a < 0) {
        fds[n++] = (struct pollfd){p->lfd, POLLIN, 0};
        return n;
    }
    fds[n++] = (struct pollfd){p->a, (short)(POLLIN | (p->ba.len ? POLLOUT : 0)), 0};
    fds[n++] = (struct pollfd){p->b, (short)(POLLIN | (p->ab.len ? POLLOUT : 0)), 0};
    return n;
}

static bool frame_mode(const struct netfx_proxy *p)
{
    return p->tamper_frame >= 0 || p->fault != NETFX_FAULT_NONE;
}

/* Frame mode: move the complete frames at the front of p->abin to @out, altering, dropping,
 * duplicating or holding back the one the test asked for. */
static void take_frames(struct netfx_proxy *p, struct netfx_growbuf *out)
{
    size_t off = 0;
    struct netfx_growbuf *in = &p->abin;
    while (in->len - off >= AAMM_WIRE_HEADER_SIZE) {
        uint8_t *h = in->p + off;
        uint32_t plen = (uint32_t)h[8] | ((uint32_t)h[9] << 8) | ((uint32_t)h[10] << 16) |
                        ((uint32_t)h[11] << 24);
        size_t total = AAMM_WIRE_HEADER_SIZE + plen + ((h[6] & AAMM_WIRE_F_MAC) ? 16 : 0);
        bool data = h[5] == AAMM_WIRE_DATA;
        if (in->len - off < total)
            break;
        if (p->frames_ab == p->tamper_frame && plen > 0) {
            uint32_t crc;
            h[AAMM_WIRE_HEADER_SIZE + plen / 2] ^= 0x01;
            crc = aamm_crc32c(aamm_crc32c(0, h, 12), h + AAMM_WIRE_HEADER_SIZE, plen);
            h[12] = (uint8_t)crc;
            h[13] = (uint8_t)(crc >> 8);
            h[14] = (uint8_t)(crc >> 16);
            h[15] = (uint8_t)(crc >> 24);
            p->tampered = true;
        }
        p->frames_ab++;
        if (p->held.len > 0) { /* SWAP: this frame first, then the one held back */
            gb_add(out, h, total);
            gb_add(out, p->held.p, p->held.len);
            p->held.len = 0;
            p->faulted = true;
        } else if (data && p->data_ab == p->fault_data && p->fault != NETFX_FAULT_NONE) {
            if (p->fault == NETFX_FAULT_DUP) {
                gb_add(out, h, total);
                gb_add(out, h, total);
            } else if (p->fault == NETFX_FAULT_SWAP) {
                gb_add(&p->held, h, total);
            }
            if (p->fault != NETFX_FAULT_SWAP)
                p->faulted = true;
        } else {
            gb_add(out, h, total);
        }
        if (data)
            p->data_ab++;
        if (data && (h[6] & AAMM_WIRE_F_LZ4))
            p->lz4_ab++;
        off += total;
    }
    gb_drop(in, off);
}

/* Relay @from -> @to through @g. Returns false when the connection ended. */
static bool relay(struct netfx_proxy *p, int from, int to, struct netfx_growbuf *g, bool ab)
{
    uint8_t buf[65536];
    bool frames = ab && frame_mode(p);
    for (int i = 0; i < 8 && g->len < (1u << 22); i++) {
        ssize_t r = recv(from, buf, sizeof buf, MSG_DONTWAIT);
        if (r == 0)
            return false;
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return false;
        }
        if (ab && p->record)
            gb_add(&p->recorded, buf, (size_t)r);
        gb_add(frames ? &p->abin : g, buf, (size_t)r);
    }
    if (frames)
        take_frames(p, g);
    while (g->len > 0) {
        ssize_t w = send(to, g->p, g->len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return false;
        }
        gb_drop(g, (size_t)w);
    }
    return true;
}

void netfx_proxy_step(struct netfx_proxy *p)
{
    if (p->a < 0) {
        int fd = netfx_accept(p->lfd);
        if (fd < 0)
            return;
        p->b = netfx_connect(p->target_port);
        if (p->b < 0) {
            close(fd);
            return;
        }
        p->a = fd;
        nonblock(p->a);
        nonblock(p->b);
        p->connections++;
        p->frames_ab = 0;
        p->data_ab = p->lz4_ab = 0;
    }
    if (!relay(p, p->a, p->b, &p->ab, true) || !relay(p, p->b, p->a, &p->ba, false)) {
        netfx_proxy_cut(p);
        p->cuts--; /* an end by either side, not a cut by the test */
    }
}
