/*
 * link.c: authenticated agent-to-agent links (doc/protocol.md §4): non-blocking TCP or TLS,
 * HELLO / AUTH / RESUME handshake, per-frame HMAC, acks, heartbeats, back-pressure.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <aamm/link.h>

#include "buf.h"
#include "internal.h"

#define RBUF_SIZE 65536
#define MAX_ORIGINS 64
#define PREAUTH_MAX_PAYLOAD 2048 /* HELLO, AUTH, ERROR: a few hundred bytes at most */
#define QCHUNK_SIZE 65536        /* one allocation of the send queue (header included) */

/* The send queue: frames taken out of the encoder as soon as they are complete, in a list of
 * fixed-size chunks (no buffer that doubles as it grows, nothing moved when it drains). */
struct qchunk {
    struct qchunk *next;
    size_t off, len; /* unsent bytes: data[off, len) */
    uint8_t data[];
};
#define QCHUNK_DATA (QCHUNK_SIZE - offsetof(struct qchunk, data))

enum st {
    ST_IDLE,
    ST_CONNECTING,
    ST_TLS,
    ST_HELLO,  /* HELLO sent, waiting for the peer's */
    ST_AUTH,   /* AUTH sent, waiting for the peer's */
    ST_RESUME, /* sender: waiting for RESUME */
    ST_READY,
    ST_CLOSING, /* GOODBYE queued */
    ST_CLOSED,
    ST_FAILED,
};

struct origin_pos {
    uint32_t origin;
    uint64_t lsn;
};

struct aamm_link {
    struct aamm__err err;
    int fail_code;
    enum st st;
    struct aamm_link_options o;
    char *cluster;
    uint32_t *peer_ids;
    uint8_t *secret;
    struct aamm_link_stats stats;

    int fd;
    bool dialer;
    SSL_CTX *ssl_ctx;
    SSL *ssl;
    bool ssl_want_write; /* the last SSL call wants the fd writable */

    struct aamm_wire_encoder *enc;
    struct aamm_wire_decoder *dec;
    struct qchunk *qhead, *qtail; /* send queue */
    size_t qbytes;                /* unsent bytes in it */
    bool split;                   /* sender: a change larger than a frame is partly queued */
    uint8_t rbuf[RBUF_SIZE];
    size_t rb_off, rb_len;

    /* handshake */
    uint8_t my_nonce[AAMM_WIRE_NONCE_SIZE];
    uint8_t peer_nonce[AAMM_WIRE_NONCE_SIZE];
    uint32_t peer_id;
    unsigned version;
    uint8_t key_out[32], key_in[32];
    uint64_t seq_out, seq_in;
    char mac_note[160]; /* why the last incoming frame failed its MAC (sequence diagnosis) */
    EVP_MAC *mac;
    EVP_MAC_CTX *mac_ctx;

    /* positions: receiver's resume (sent or received), acked (sender) */
    struct origin_pos resume[MAX_ORIGINS];
    uint32_t nresume;
    struct origin_pos acked[MAX_ORIGINS];
    uint32_t nacked;

    /* sender transaction state */
    bool in_txn, skipping;
    bool peer_eof; /* receiver: the peer closed; the host drains what is buffered */

    /* timers (monotonic ms) */
    int64_t t_start, t_last_recv, t_last_send;
};

/* ====================================================================================
 * Errors
 * ==================================================================================== */

static void close_socket(struct aamm_link *l)
{
    if (l->ssl != NULL) {
        SSL_free(l->ssl);
        l->ssl = NULL;
    }
    if (l->fd >= 0) {
        close(l->fd);
        l->fd = -1;
    }
}

static ssize_t raw_send(struct aamm_link *l, const uint8_t *p, size_t n);

/* Move the encoder's complete frames into the send queue. 0 or AAMM_ENOMEM. */
static int drain_enc(struct aamm_link *l)
{
    size_t n;
    const uint8_t *p = aamm_wire_encoder_pending(l->enc, &n);
    while (n > 0) {
        struct qchunk *c = l->qtail;
        size_t k;
        if (c == NULL || c->len == QCHUNK_DATA) {
            c = aamm__malloc(QCHUNK_SIZE);
            if (c == NULL)
                return AAMM_ENOMEM;
            c->next = NULL;
            c->off = c->len = 0;
            if (l->qtail != NULL)
                l->qtail->next = c;
            else
                l->qhead = c;
            l->qtail = c;
        }
        k = QCHUNK_DATA - c->len;
        if (k > n)
            k = n;
        memcpy(c->data + c->len, p, k);
        c->len += k;
        l->qbytes += k;
        aamm_wire_encoder_consume(l->enc, k);
        p = aamm_wire_encoder_pending(l->enc, &n);
    }
    return 0;
}

/* Mark @n bytes at the head of the queue as sent, freeing chunks that are done. */
static void queue_consume(struct aamm_link *l, size_t n)
{
    struct qchunk *c = l->qhead;
    c->off += n;
    l->qbytes -= n;
    if (c->off == c->len) {
        l->qhead = c->next;
        if (l->qhead == NULL)
            l->qtail = NULL;
        aamm__free(c);
    }
}

/* Bytes the sender holds: the queue plus the encoder's open frame. */
static size_t held(const struct aamm_link *l)
{
    return l->qbytes + aamm_wire_encoder_buffered(l->enc);
}

/* Fail the link: record the error, tell the peer (best effort, one non-blocking write)
 * unless @tell is false, close the socket. Returns @code. */
static int link_fail(struct aamm_link *l, int code, bool tell, const char *fmt, ...)
    AAMM_PRINTF(4, 5);
static int link_fail(struct aamm_link *l, int code, bool tell, const char *fmt, ...)
{
    char buf[AAMM__ERRMSG_SIZE];
    va_list ap;
    if (l->st == ST_FAILED)
        return l->fail_code;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    aamm__errf(&l->err, code, "link to node %" PRIu32 ": %s", l->peer_id, buf);
    AAMM_INFO("%s", l->err.msg);
    if (tell && l->fd >= 0 && l->st >= ST_HELLO && l->enc != NULL) {
        /* What is already queued plus the error, as far as the socket takes it now: never
         * blocking, and never a frame cut short before the error. */
        if (aamm_wire_encode_error(l->enc, code, buf) == 0 && drain_enc(l) == 0) {
            while (l->qhead != NULL) {
                struct qchunk *c = l->qhead;
                ssize_t w = raw_send(l, c->data + c->off, c->len - c->off);
                if (w <= 0)
                    break;
                queue_consume(l, (size_t)w);
            }
        }
    }
    close_socket(l);
    l->st = ST_FAILED;
    l->fail_code = code;
    return code;
}

/* ====================================================================================
 * Creation
 * ==================================================================================== */

/* A socket BIO that sends with MSG_NOSIGNAL: OpenSSL's own socket BIO writes with plain
 * write(), which raises SIGPIPE on a closed connection, and a library must not rely on the
 * host ignoring SIGPIPE. */
static BIO_METHOD *nosig_method;

static int nosig_write(BIO *b, const char *p, int n)
{
    ssize_t w = send((int)(intptr_t)BIO_get_data(b), p, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
    BIO_clear_retry_flags(b);
    if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        BIO_set_retry_write(b);
    return (int)w;
}

static int nosig_read(BIO *b, char *p, int n)
{
    ssize_t r = recv((int)(intptr_t)BIO_get_data(b), p, (size_t)n, MSG_DONTWAIT);
    BIO_clear_retry_flags(b);
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        BIO_set_retry_read(b);
    return (int)r;
}

static long nosig_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    (void)b;
    (void)num;
    (void)ptr;
    return cmd == BIO_CTRL_FLUSH ? 1 : 0;
}

static int nosig_create(BIO *b)
{
    BIO_set_init(b, 1);
    return 1;
}

static BIO *nosig_bio(int fd)
{
    BIO *b;
    if (nosig_method == NULL) {
        /* Benign race: two threads creating links at once may each build one; one leaks. */
        BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "aamm-sock");
        if (m == NULL || !BIO_meth_set_write(m, nosig_write) || !BIO_meth_set_read(m, nosig_read) ||
            !BIO_meth_set_ctrl(m, nosig_ctrl) || !BIO_meth_set_create(m, nosig_create)) {
            BIO_meth_free(m);
            return NULL;
        }
        nosig_method = m;
    }
    b = BIO_new(nosig_method);
    if (b != NULL)
        BIO_set_data(b, (void *)(intptr_t)fd);
    return b;
}

static int tls_setup(struct aamm_link *l)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_method());
    if (ctx == NULL)
        return aamm__errf(&l->err, AAMM_EIO, "link: TLS setup: no SSL context");
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    if (SSL_CTX_load_verify_locations(ctx, l->o.tls_ca_file, NULL) != 1 ||
        SSL_CTX_use_certificate_chain_file(ctx, l->o.tls_cert_file) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, l->o.tls_key_file, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        unsigned long e = ERR_get_error();
        char ebuf[256];
        ERR_error_string_n(e, ebuf, sizeof ebuf);
        aamm__errf(&l->err, AAMM_EIO, "link: TLS setup: %s", ebuf);
        ERR_clear_error();
        SSL_CTX_free(ctx);
        return AAMM_EIO;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    l->ssl_ctx = ctx;
    return 0;
}

int aamm_link_new(struct aamm_link **lp, const struct aamm_link_options *opts, char *err,
                  size_t errsize)
{
    struct aamm_link *l;
    bool ok = true;
    int rc;
    *lp = NULL;
    if (opts == NULL)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "link: no options");
    if (opts->role != AAMM_LINK_SENDER && opts->role != AAMM_LINK_RECEIVER)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "link: role %d is neither sender nor receiver",
                             opts->role);
    if (!aamm_node_id_valid(opts->node_id))
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "link: node_id %" PRIu32 " outside 1..%d",
                             opts->node_id, AAMM_NODE_ID_MAX);
    if (opts->cluster == NULL || strlen(opts->cluster) == 0 ||
        strlen(opts->cluster) > AAMM_WIRE_MAX_CLUSTER)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "link: cluster must be 1..%d bytes",
                             AAMM_WIRE_MAX_CLUSTER);
    if (opts->npeer_ids == 0 || opts->peer_ids == NULL)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "link: at least one peer id is required");
    for (uint32_t i = 0; i < opts->npeer_ids; i++)
        if (!aamm_node_id_valid(opts->peer_ids[i]))
            return aamm__newerrf(err, errsize, AAMM_EINVAL,
                                 "link: peer id %" PRIu32 " outside 1..%d", opts->peer_ids[i],
                                 AAMM_NODE_ID_MAX);
    if (opts->secret == NULL || opts->secret_len < 16)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "link: the secret must be at least 16 bytes");
    if (opts->nresume > MAX_ORIGINS)
        return aamm__newerrf(err, errsize, AAMM_EINVAL, "link: %" PRIu32 " resume entries (at most %d)",
                             opts->nresume, MAX_ORIGINS);
    if (opts->tls && (!opts->tls_ca_file || !opts->tls_cert_file || !opts->tls_key_file))
        return aamm__newerrf(err, errsize, AAMM_EINVAL,
                             "link: TLS needs tls_ca_file, tls_cert_file and tls_key_file");
    l = aamm__calloc(1, sizeof *l);
    if (l == NULL)
        return aamm__newerrf(err, errsize, AAMM_ENOMEM, "link: out of memory");
    l->fd = -1;
    l->o = *opts;
    l->cluster = aamm__strdup_opt(opts->cluster, &ok);
    l->o.tls_ca_file = aamm__strdup_opt(opts->tls_ca_file, &ok);
    l->o.tls_cert_file = aamm__strdup_opt(opts->tls_cert_file, &ok);
    l->o.tls_key_file = aamm__strdup_opt(opts->tls_key_file, &ok);
    l->o.tls_server_name = aamm__strdup_opt(opts->tls_server_name, &ok);
    l->peer_ids = aamm__calloc(opts->npeer_ids, sizeof *l->peer_ids);
    l->secret = aamm__malloc(opts->secret_len);
    if (!ok || l->peer_ids == NULL || l->secret == NULL) {
        aamm_link_free(l);
        return aamm__newerrf(err, errsize, AAMM_ENOMEM, "link: out of memory");
    }
    memcpy(l->peer_ids, opts->peer_ids, opts->npeer_ids * sizeof *l->peer_ids);
    memcpy(l->secret, opts->secret, opts->secret_len);
    l->o.cluster = l->cluster;
    l->o.peer_ids = l->peer_ids;
    l->o.secret = l->secret;
    l->o.resume = NULL;
    for (uint32_t i = 0; i < opts->nresume; i++) {
        l->resume[i].origin = opts->resume[i].origin_node;
        l->resume[i].lsn = opts->resume[i].lsn;
    }
    l->nresume = opts->nresume;
    if (l->o.handshake_timeout_ms <= 0)
        l->o.handshake_timeout_ms = 5000;
    if (l->o.heartbeat_ms <= 0)
        l->o.heartbeat_ms = 1000;
    if (l->o.dead_after_ms <= 0)
        l->o.dead_after_ms = 5000;
    if (l->o.max_clock_skew_us <= 0)
        l->o.max_clock_skew_us = 5000000;
    if (l->o.send_queue_bytes == 0)
        l->o.send_queue_bytes = 8u * 1024 * 1024;
    if ((rc = aamm_wire_encoder_new(&l->enc, &l->o.wire, err, errsize)) != 0 ||
        (rc = aamm_wire_decoder_new(&l->dec, &l->o.wire, err, errsize)) != 0) {
        aamm_link_free(l);
        return rc;
    }
    if (l->o.role == AAMM_LINK_SENDER)
        (void)aamm_wire_encoder_set_streaming(l->enc, true);
    /* Until the peer has proven who it is, it may send only small frames. */
    aamm_wire_decoder_set_max_payload(l->dec, PREAUTH_MAX_PAYLOAD);
    l->mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    l->mac_ctx = l->mac ? EVP_MAC_CTX_new(l->mac) : NULL;
    if (l->mac_ctx == NULL) {
        aamm_link_free(l);
        return aamm__newerrf(err, errsize, AAMM_ENOMEM, "link: out of memory (HMAC context)");
    }
    if (l->o.tls && (rc = tls_setup(l)) != 0) {
        aamm__newerr_copy(err, errsize, &l->err);
        aamm_link_free(l);
        return rc;
    }
    *lp = l;
    return 0;
}

void aamm_link_free(struct aamm_link *l)
{
    if (l == NULL)
        return;
    close_socket(l);
    if (l->ssl_ctx)
        SSL_CTX_free(l->ssl_ctx);
    EVP_MAC_CTX_free(l->mac_ctx);
    EVP_MAC_free(l->mac);
    aamm_wire_encoder_free(l->enc);
    aamm_wire_decoder_free(l->dec);
    while (l->qhead != NULL) {
        struct qchunk *c = l->qhead;
        l->qhead = c->next;
        aamm__free(c);
    }
    if (l->secret)
        OPENSSL_cleanse(l->secret, l->o.secret_len);
    OPENSSL_cleanse(l->key_in, sizeof l->key_in);
    OPENSSL_cleanse(l->key_out, sizeof l->key_out);
    aamm__free(l->secret);
    aamm__free(l->peer_ids);
    aamm__free(l->cluster);
    aamm__free((char *)l->o.tls_ca_file);
    aamm__free((char *)l->o.tls_cert_file);
    aamm__free((char *)l->o.tls_key_file);
    aamm__free((char *)l->o.tls_server_name);
    aamm__free(l);
}

/* ====================================================================================
 * Sockets
 * ==================================================================================== */

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    int one = 1;
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -1;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return 0;
}

static void start_session(struct aamm_link *l);

int aamm_link_connect(struct aamm_link *l, const char *host, const char *port)
{
    struct addrinfo hints, *res = NULL, *ai;
    int rc, fd = -1;
    if (l->st != ST_IDLE)
        return aamm__errf(&l->err, AAMM_ESTATE, "link: already connected or used");
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0)
        return aamm__errf(&l->err, AAMM_ECONN, "link: cannot resolve %s:%s: %s", host, port,
                          gai_strerror(rc));
    for (ai = res; ai != NULL; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0)
            continue;
        if (set_nonblock(fd) == 0 &&
            (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0 || errno == EINPROGRESS))
            break;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        return aamm__errf(&l->err, AAMM_ECONN, "link: cannot connect to %s:%s: %s", host, port,
                          strerror(errno));
    l->fd = fd;
    l->dialer = true;
    l->st = ST_CONNECTING;
    l->t_start = l->t_last_recv = l->t_last_send = aamm__now_ms();
    return 0;
}

int aamm_link_adopt_fd(struct aamm_link *l, int fd)
{
    if (l->st != ST_IDLE) {
        close(fd);
        return aamm__errf(&l->err, AAMM_ESTATE, "link: already connected or used");
    }
    if (set_nonblock(fd) != 0) {
        close(fd);
        return aamm__errf(&l->err, AAMM_EIO, "link: cannot make the socket non-blocking");
    }
    l->fd = fd;
    l->dialer = false;
    l->t_start = l->t_last_recv = l->t_last_send = aamm__now_ms();
    l->st = ST_CONNECTING;
    start_session(l);
    return l->st == ST_FAILED ? l->fail_code : 0;
}

/* Write up to @n bytes; returns bytes written, 0 if it would block, -1 on error. */
static ssize_t raw_send(struct aamm_link *l, const uint8_t *p, size_t n)
{
    if (n == 0)
        return 0;
    if (l->ssl != NULL) {
        int w = SSL_write(l->ssl, p, n > INT32_MAX ? INT32_MAX : (int)n);
        if (w > 0) {
            l->ssl_want_write = false;
            return w;
        }
        switch (SSL_get_error(l->ssl, w)) {
        case SSL_ERROR_WANT_WRITE:
            l->ssl_want_write = true;
            return 0;
        case SSL_ERROR_WANT_READ:
            return 0;
        default:
            ERR_clear_error();
            return -1;
        }
    }
    for (;;) {
        ssize_t w = send(l->fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w >= 0)
            return w;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        return -1;
    }
}

/* Read into rbuf; returns bytes read, 0 if it would block, -1 on error, -2 on EOF. */
static ssize_t raw_recv(struct aamm_link *l, uint8_t *p, size_t n)
{
    if (l->ssl != NULL) {
        int r = SSL_read(l->ssl, p, n > INT32_MAX ? INT32_MAX : (int)n);
        if (r > 0)
            return r;
        switch (SSL_get_error(l->ssl, r)) {
        case SSL_ERROR_WANT_READ:
            return 0;
        case SSL_ERROR_WANT_WRITE:
            l->ssl_want_write = true;
            return 0;
        case SSL_ERROR_ZERO_RETURN:
            return -2;
        default:
            ERR_clear_error();
            return -1;
        }
    }
    for (;;) {
        ssize_t r = recv(l->fd, p, n, MSG_DONTWAIT);
        if (r > 0)
            return r;
        if (r == 0)
            return -2;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        return -1;
    }
}

/* ====================================================================================
 * Crypto: proofs, session keys, frame MACs
 * ==================================================================================== */

static void put32(struct aamm__wr *w, uint32_t v)
{
    aamm__wr_le32(w, v);
}

/* The AUTH proof of @prover_role / @prover for @verifier (doc/protocol.md §4.2). */
static int make_proof(struct aamm_link *l, int prover_role, uint32_t prover, uint32_t verifier,
                      const uint8_t *verifier_nonce, const uint8_t *prover_nonce, uint8_t out[32])
{
    struct aamm__wr w;
    unsigned int outlen = 32;
    size_t clen = strlen(l->cluster);
    aamm__wr_init(&w);
    aamm__wr_bytes(&w, "aamm-auth-v1", 12);
    aamm__wr_u8(&w, (uint8_t)prover_role);
    put32(&w, prover);
    put32(&w, verifier);
    aamm__wr_le16(&w, (uint16_t)l->version);
    if (clen < 128) { /* str: varint length (clusters have at most 255 bytes) */
        aamm__wr_u8(&w, (uint8_t)clen);
    } else {
        aamm__wr_u8(&w, (uint8_t)(0x80 | (clen & 0x7F)));
        aamm__wr_u8(&w, (uint8_t)(clen >> 7));
    }
    aamm__wr_bytes(&w, l->cluster, clen);
    aamm__wr_bytes(&w, verifier_nonce, AAMM_WIRE_NONCE_SIZE);
    aamm__wr_bytes(&w, prover_nonce, AAMM_WIRE_NONCE_SIZE);
    if (!w.ok) {
        aamm__wr_free(&w);
        return AAMM_ENOMEM;
    }
    if (HMAC(EVP_sha256(), l->secret, (int)l->o.secret_len, w.data, w.len, out, &outlen) == NULL) {
        aamm__wr_free(&w);
        return AAMM_EINTERNAL;
    }
    aamm__wr_free(&w);
    return 0;
}

/* HKDF-SHA256 (extract + one expand block) for one direction (doc/protocol.md §4.3). */
static int derive_key(struct aamm_link *l, const uint8_t *s_nonce, const uint8_t *r_nonce,
                      const char *dir, uint32_t s_node, uint32_t r_node, uint8_t out[32])
{
    uint8_t salt[2 * AAMM_WIRE_NONCE_SIZE], prk[32], info[64];
    unsigned int len = 32;
    size_t n = 0;
    memcpy(salt, s_nonce, AAMM_WIRE_NONCE_SIZE);
    memcpy(salt + AAMM_WIRE_NONCE_SIZE, r_nonce, AAMM_WIRE_NONCE_SIZE);
    if (HMAC(EVP_sha256(), salt, sizeof salt, l->secret, l->o.secret_len, prk, &len) == NULL)
        return AAMM_EINTERNAL;
    memcpy(info, "aamm-session-v1 ", 16);
    n = 16;
    memcpy(info + n, dir, 3);
    n += 3;
    for (int i = 0; i < 4; i++)
        info[n++] = (uint8_t)(s_node >> (8 * i));
    for (int i = 0; i < 4; i++)
        info[n++] = (uint8_t)(r_node >> (8 * i));
    info[n++] = 0x01;
    len = 32;
    if (HMAC(EVP_sha256(), prk, sizeof prk, info, n, out, &len) == NULL)
        return AAMM_EINTERNAL;
    OPENSSL_cleanse(prk, sizeof prk);
    return 0;
}

static int frame_mac(struct aamm_link *l, const uint8_t *key, uint64_t seq, const uint8_t *frame,
                     size_t len, uint8_t mac[AAMM_WIRE_MAC_SIZE])
{
    uint8_t s[8], full[32];
    size_t outl = 0;
    OSSL_PARAM params[2];
    params[0] = OSSL_PARAM_construct_utf8_string("digest", (char *)"SHA256", 0);
    params[1] = OSSL_PARAM_construct_end();
    for (int i = 0; i < 8; i++)
        s[i] = (uint8_t)(seq >> (8 * i));
    if (EVP_MAC_init(l->mac_ctx, key, 32, params) != 1 ||
        EVP_MAC_update(l->mac_ctx, s, sizeof s) != 1 ||
        EVP_MAC_update(l->mac_ctx, frame, len) != 1 ||
        EVP_MAC_final(l->mac_ctx, full, &outl, sizeof full) != 1 || outl != 32) {
        ERR_clear_error();
        return AAMM_EINTERNAL;
    }
    memcpy(mac, full, AAMM_WIRE_MAC_SIZE);
    return 0;
}

static int seal_cb(struct aamm_wire_encoder *enc, const uint8_t *frame, size_t len, uint8_t *mac,
                   void *arg)
{
    struct aamm_link *l = arg;
    AAMM__UNUSED(enc);
    return frame_mac(l, l->key_out, l->seq_out++, frame, len, mac);
}

/* How far from the expected sequence number a frame that failed its MAC is looked for. */
#define MAC_DIAG_WINDOW 8

/*
 * A frame failed its MAC for sequence number seq_in. Find out whether it carries a nearby
 * sequence number instead (a frame dropped or held back before it, or a repeat of an earlier
 * frame) so that the error names the problem. Only on this failure path, which ends the link:
 * at most 2 * MAC_DIAG_WINDOW more MACs of the frame.
 */
static void mac_diagnose(struct aamm_link *l, const uint8_t *frame, size_t len, const uint8_t *mac)
{
    uint8_t m[AAMM_WIRE_MAC_SIZE];
    uint64_t want = l->seq_in;
    for (uint64_t d = 1; d <= MAC_DIAG_WINDOW; d++) {
        if (frame_mac(l, l->key_in, want + d, frame, len, m) == 0 &&
            CRYPTO_memcmp(m, mac, sizeof m) == 0) {
            snprintf(l->mac_note, sizeof l->mac_note,
                     "frame sequence number %" PRIu64 " expected, this is frame %" PRIu64
                     ": %" PRIu64 " frame(s) before it missing (dropped or reordered)",
                     want, want + d, d);
            return;
        }
        if (d <= want && frame_mac(l, l->key_in, want - d, frame, len, m) == 0 &&
            CRYPTO_memcmp(m, mac, sizeof m) == 0) {
            snprintf(l->mac_note, sizeof l->mac_note,
                     "frame sequence number %" PRIu64
                     " expected, this is a repeat of frame %" PRIu64
                     " (duplicated, replayed or reordered)",
                     want, want - d);
            return;
        }
    }
    snprintf(l->mac_note, sizeof l->mac_note,
             "frame sequence number %" PRIu64 " expected; the MAC fits no sequence number within "
             "%d of it (altered or forged frame)",
             want, MAC_DIAG_WINDOW);
}

static int verify_cb(struct aamm_wire_decoder *dec, const uint8_t *frame, size_t len,
                     const uint8_t *mac, void *arg)
{
    struct aamm_link *l = arg;
    AAMM__UNUSED(dec);
    uint8_t want[AAMM_WIRE_MAC_SIZE];
    int rc = frame_mac(l, l->key_in, l->seq_in, frame, len, want);
    if (rc != 0)
        return rc;
    if (CRYPTO_memcmp(want, mac, sizeof want) != 0) {
        mac_diagnose(l, frame, len, mac);
        return AAMM_EAUTH;
    }
    l->seq_in++;
    return 0;
}

/* ====================================================================================
 * Handshake
 * ==================================================================================== */

static void start_session(struct aamm_link *l)
{
    struct aamm_wire_hello h;
    if (l->o.tls && l->ssl == NULL) {
        BIO *bio;
        l->ssl = SSL_new(l->ssl_ctx);
        bio = l->ssl ? nosig_bio(l->fd) : NULL;
        if (bio == NULL) {
            link_fail(l, AAMM_EIO, false, "TLS: cannot create the session");
            return;
        }
        SSL_set_bio(l->ssl, bio, bio);
        if (l->dialer) {
            SSL_set_connect_state(l->ssl);
            if (l->o.tls_server_name != NULL) {
                SSL_set_tlsext_host_name(l->ssl, l->o.tls_server_name);
                SSL_set1_host(l->ssl, l->o.tls_server_name);
            }
        } else {
            SSL_set_accept_state(l->ssl);
        }
        l->st = ST_TLS;
        return;
    }
    if (RAND_bytes(l->my_nonce, sizeof l->my_nonce) != 1) {
        link_fail(l, AAMM_EINTERNAL, false, "RAND_bytes failed");
        return;
    }
    memset(&h, 0, sizeof h);
    h.min_version = AAMM_WIRE_VERSION_MIN;
    h.max_version = AAMM_WIRE_VERSION_MAX;
    h.role = (uint8_t)l->o.role;
    h.flags = l->o.tls ? AAMM_WIRE_HELLO_TLS : 0;
    h.node_id = l->o.node_id;
    h.wall_time_us = aamm__wall_us();
    memcpy(h.nonce, l->my_nonce, sizeof h.nonce);
    h.cluster = l->cluster;
    if (aamm_wire_encode_hello(l->enc, &h) != 0) {
        link_fail(l, AAMM_ENOMEM, false, "%s", aamm_wire_encoder_errmsg(l->enc));
        return;
    }
    l->st = ST_HELLO;
}

static int on_hello(struct aamm_link *l, const struct aamm_wire_hello *h)
{
    uint8_t proof[32];
    bool known = false;
    int64_t skew;
    unsigned v;
    int rc;
    l->peer_id = h->node_id;
    if (strcmp(h->cluster, l->cluster) != 0) {
        l->stats.auth_failures++;
        return link_fail(l, AAMM_EAUTH, true, "peer belongs to cluster \"%s\", this node to \"%s\"",
                         h->cluster, l->cluster);
    }
    for (uint32_t i = 0; i < l->o.npeer_ids; i++)
        known |= l->peer_ids[i] == h->node_id;
    if (!known || h->node_id == l->o.node_id) {
        l->stats.auth_failures++;
        return link_fail(l, AAMM_EAUTH, true,
                         "peer claims node id %" PRIu32
                         ", which is not an expected peer of node %" PRIu32,
                         h->node_id, l->o.node_id);
    }
    if (h->role == l->o.role) {
        l->stats.protocol_errors++;
        return link_fail(l, AAMM_EPROTO, true, "both sides are %s",
                         l->o.role == AAMM_LINK_SENDER ? "senders" : "receivers");
    }
    if (((h->flags & AAMM_WIRE_HELLO_TLS) != 0) != l->o.tls) {
        l->stats.protocol_errors++;
        return link_fail(l, AAMM_EPROTO, true, "TLS configured on one side only");
    }
    if (CRYPTO_memcmp(h->nonce, l->my_nonce, AAMM_WIRE_NONCE_SIZE) == 0) {
        l->stats.auth_failures++;
        return link_fail(l, AAMM_EAUTH, true, "peer echoed our nonce (reflection attempt)");
    }
    v = h->max_version < AAMM_WIRE_VERSION_MAX ? h->max_version : AAMM_WIRE_VERSION_MAX;
    if (v < h->min_version || v < AAMM_WIRE_VERSION_MIN) {
        l->stats.protocol_errors++;
        return link_fail(l, AAMM_EPROTO, true,
                         "no common protocol version (peer %u..%u, ours %u..%u)", h->min_version,
                         h->max_version, AAMM_WIRE_VERSION_MIN, AAMM_WIRE_VERSION_MAX);
    }
    l->version = v;
    aamm_wire_encoder_set_version(l->enc, v);
    aamm_wire_decoder_set_version(l->dec, v);
    memcpy(l->peer_nonce, h->nonce, AAMM_WIRE_NONCE_SIZE);
    skew = h->wall_time_us - aamm__wall_us();
    l->stats.clock_skew_us = skew;
    if (skew > l->o.max_clock_skew_us || -skew > l->o.max_clock_skew_us) {
        l->stats.clock_skew_exceeded = true;
        AAMM_WARN("link to node %" PRIu32 ": clock skew %" PRId64
                  " us exceeds the bound of %" PRId64 " us (LWW, tombstones and ids depend "
                  "on clocks)",
                  l->peer_id, skew, l->o.max_clock_skew_us);
    }
    /* 3. our proof, then MAC mode for everything we send after it */
    rc = make_proof(l, l->o.role, l->o.node_id, l->peer_id, l->peer_nonce, l->my_nonce, proof);
    if (rc == 0) {
        const uint8_t *sn = l->o.role == AAMM_LINK_SENDER ? l->my_nonce : l->peer_nonce;
        const uint8_t *rn = l->o.role == AAMM_LINK_SENDER ? l->peer_nonce : l->my_nonce;
        uint32_t snode = l->o.role == AAMM_LINK_SENDER ? l->o.node_id : l->peer_id;
        uint32_t rnode = l->o.role == AAMM_LINK_SENDER ? l->peer_id : l->o.node_id;
        bool s = l->o.role == AAMM_LINK_SENDER;
        rc = derive_key(l, sn, rn, s ? "s2r" : "r2s", snode, rnode, l->key_out);
        if (rc == 0)
            rc = derive_key(l, sn, rn, s ? "r2s" : "s2r", snode, rnode, l->key_in);
    }
    if (rc == 0)
        rc = aamm_wire_encode_auth(l->enc, proof);
    if (rc == 0 && !l->o.tls)
        rc = aamm_wire_encoder_set_mac(l->enc, seal_cb, l);
    if (rc != 0)
        return link_fail(l, rc, false, "handshake: %s", aamm_strerror(rc));
    l->st = ST_AUTH;
    return 0;
}

static int on_auth(struct aamm_link *l, const uint8_t *proof)
{
    uint8_t want[32];
    int rc = make_proof(l, l->o.role == AAMM_LINK_SENDER ? AAMM_LINK_RECEIVER : AAMM_LINK_SENDER,
                        l->peer_id, l->o.node_id, l->my_nonce, l->peer_nonce, want);
    if (rc != 0)
        return link_fail(l, rc, false, "handshake: %s", aamm_strerror(rc));
    if (CRYPTO_memcmp(want, proof, sizeof want) != 0) {
        l->stats.auth_failures++;
        return link_fail(l, AAMM_EAUTH, true,
                         "authentication failed: the peer's proof does not match (wrong "
                         "secret, or a replayed or forged handshake)");
    }
    if (!l->o.tls)
        aamm_wire_decoder_set_mac(l->dec, verify_cb, l);
    aamm_wire_decoder_set_max_payload(
        l->dec, l->o.wire.max_payload ? l->o.wire.max_payload : AAMM_WIRE_DEFAULT_MAX_PAYLOAD);
    if (l->o.role == AAMM_LINK_RECEIVER) {
        struct aamm_wire_position pos[MAX_ORIGINS];
        for (uint32_t i = 0; i < l->nresume; i++) {
            pos[i].origin_node = l->resume[i].origin;
            pos[i].lsn = l->resume[i].lsn;
        }
        rc = aamm_wire_encode_resume(l->enc, pos, l->nresume);
        if (rc != 0)
            return link_fail(l, rc, false, "handshake: %s", aamm_strerror(rc));
        l->st = ST_READY;
        AAMM_INFO("link to node %" PRIu32 ": authenticated (receiver)", l->peer_id);
    } else {
        l->st = ST_RESUME;
    }
    return 0;
}

/* ====================================================================================
 * Control events
 * ==================================================================================== */

static void set_pos(struct origin_pos *arr, uint32_t *n, uint32_t origin, uint64_t lsn)
{
    for (uint32_t i = 0; i < *n; i++) {
        if (arr[i].origin == origin) {
            if (lsn > arr[i].lsn)
                arr[i].lsn = lsn;
            return;
        }
    }
    if (*n < MAX_ORIGINS) {
        arr[*n].origin = origin;
        arr[*n].lsn = lsn;
        (*n)++;
    }
}

static uint64_t get_pos(const struct origin_pos *arr, uint32_t n, uint32_t origin)
{
    for (uint32_t i = 0; i < n; i++)
        if (arr[i].origin == origin)
            return arr[i].lsn;
    return 0;
}

static int decoder_error(struct aamm_link *l, int rc)
{
    if (rc == AAMM_EAUTH)
        l->stats.mac_failures++;
    else if (rc != AAMM_ENOMEM)
        l->stats.protocol_errors++;
    if (rc == AAMM_EAUTH && l->mac_note[0] != '\0')
        return link_fail(l, rc, true, "%s: %s", aamm_wire_decoder_errmsg(l->dec), l->mac_note);
    return link_fail(l, rc, rc != AAMM_ENOMEM, "%s", aamm_wire_decoder_errmsg(l->dec));
}

/* Handle a non-data event. Returns 0, AAMM_ECLOSED, or an error. */
static int on_control(struct aamm_link *l, const struct aamm_wire_event *ev)
{
    switch (ev->kind) {
    case AAMM_WIRE_EV_HELLO:
        if (l->st == ST_HELLO)
            return on_hello(l, &ev->hello);
        break;
    case AAMM_WIRE_EV_AUTH:
        if (l->st == ST_AUTH)
            return on_auth(l, ev->proof);
        break;
    case AAMM_WIRE_EV_RESUME:
        if (l->st == ST_RESUME) {
            l->nresume = 0;
            for (uint32_t i = 0; i < ev->npositions; i++)
                set_pos(l->resume, &l->nresume, ev->positions[i].origin_node, ev->positions[i].lsn);
            for (uint32_t i = 0; i < l->nresume; i++)
                set_pos(l->acked, &l->nacked, l->resume[i].origin, l->resume[i].lsn);
            l->st = ST_READY;
            AAMM_INFO("link to node %" PRIu32 ": authenticated (sender)", l->peer_id);
            return 0;
        }
        break;
    case AAMM_WIRE_EV_ACK:
        if (l->st >= ST_READY && l->o.role == AAMM_LINK_SENDER) {
            set_pos(l->acked, &l->nacked, ev->origin_node, ev->lsn);
            l->stats.acks_received++;
            return 0;
        }
        break;
    case AAMM_WIRE_EV_HEARTBEAT:
        if (l->st >= ST_READY) {
            l->stats.heartbeats_received++;
            return 0;
        }
        break;
    case AAMM_WIRE_EV_GOODBYE:
        close_socket(l);
        l->st = ST_CLOSED;
        aamm__errf(&l->err, AAMM_ECLOSED, "link to node %" PRIu32 ": peer said goodbye",
                   l->peer_id);
        return AAMM_ECLOSED;
    case AAMM_WIRE_EV_ERROR:
        l->stats.peer_refusals++;
        if (ev->code == AAMM_EAUTH && l->st < ST_READY)
            l->stats.auth_failures++;
        return link_fail(l, ev->code < 0 ? ev->code : AAMM_EPROTO, false, "the peer refused: %s",
                         ev->message);
    default:
        break;
    }
    l->stats.protocol_errors++;
    return link_fail(l, AAMM_EPROTO, true, "unexpected frame (event %d) in state %d", (int)ev->kind,
                     (int)l->st);
}

/* Feed buffered socket bytes to the decoder. Returns true if any were accepted. */
static bool feed(struct aamm_link *l)
{
    size_t acc = 0;
    if (l->rb_off == l->rb_len)
        return false;
    if (aamm_wire_decoder_feed(l->dec, l->rbuf + l->rb_off, l->rb_len - l->rb_off, &acc) != 0)
        return false;
    l->rb_off += acc;
    if (l->rb_off == l->rb_len)
        l->rb_off = l->rb_len = 0;
    return acc > 0;
}

/* Process control frames from the decoder until it needs more bytes or a data event is
 * next (a receiver's data is left for aamm_link_recv). */
static int pump_control(struct aamm_link *l)
{
    for (;;) {
        struct aamm_wire_event ev;
        int rc;
        if (l->st == ST_READY && l->o.role == AAMM_LINK_RECEIVER)
            return 0; /* aamm_link_recv decodes from here on */
        if (l->st >= ST_CLOSED)
            return 0;
        rc = aamm_wire_decoder_next(l->dec, &ev);
        if (rc == AAMM_EAGAIN) {
            if (feed(l))
                continue;
            return 0;
        }
        if (rc != 0)
            return decoder_error(l, rc);
        if (ev.kind == AAMM_WIRE_EV_BEGIN || ev.kind == AAMM_WIRE_EV_CHANGE ||
            ev.kind == AAMM_WIRE_EV_COMMIT) {
            l->stats.protocol_errors++;
            return link_fail(l, AAMM_EPROTO, true, "transaction data %s",
                             l->st < ST_READY ? "before authentication"
                                              : "sent to the sending side");
        }
        rc = on_control(l, &ev);
        if (rc != 0)
            return rc;
    }
}

/* ====================================================================================
 * Step
 * ==================================================================================== */

static int do_write(struct aamm_link *l)
{
    for (;;) {
        struct qchunk *c;
        ssize_t w;
        if (drain_enc(l) != 0)
            return link_fail(l, AAMM_ENOMEM, false, "out of memory (send queue)");
        c = l->qhead;
        if (c == NULL) {
            /* Socket idle: close the open DATA frame so it goes out now. */
            if (aamm_wire_encoder_buffered(l->enc) == 0)
                return 0;
            if (aamm_wire_encoder_flush(l->enc) != 0)
                return link_fail(l, AAMM_ENOMEM, false, "%s", aamm_wire_encoder_errmsg(l->enc));
            continue;
        }
        if (l->ssl == NULL && c->next != NULL) {
            /* several chunks in one system call, as a flat buffer would allow */
            struct iovec iov[16];
            struct msghdr mh;
            int k = 0;
            for (struct qchunk *q = c; q != NULL && k < 16; q = q->next, k++) {
                iov[k].iov_base = q->data + q->off;
                iov[k].iov_len = q->len - q->off;
            }
            memset(&mh, 0, sizeof mh);
            mh.msg_iov = iov;
            mh.msg_iovlen = (size_t)k;
            do
                w = sendmsg(l->fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
            while (w < 0 && errno == EINTR);
            if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                w = 0;
        } else {
            w = raw_send(l, c->data + c->off, c->len - c->off);
        }
        if (w < 0)
            return link_fail(l, AAMM_ECONN, false, "send failed: %s",
                             l->ssl ? "TLS error" : strerror(errno));
        if (w == 0)
            return 0;
        l->stats.bytes_sent += (uint64_t)w;
        while (w > 0) {
            size_t k = l->qhead->len - l->qhead->off;
            if (k > (size_t)w)
                k = (size_t)w;
            queue_consume(l, k);
            w -= (ssize_t)k;
        }
        l->t_last_send = aamm__now_ms();
    }
}

static int do_read(struct aamm_link *l)
{
    int rounds = 0;
    while (l->rb_len == 0 && !l->peer_eof && rounds++ < 16) {
        ssize_t r = raw_recv(l, l->rbuf, sizeof l->rbuf);
        if (r == 0)
            return 0;
        if (r == -2 && l->st == ST_READY && l->o.role == AAMM_LINK_RECEIVER) {
            l->peer_eof = true; /* frames may still wait for aamm_link_recv (a GOODBYE) */
            return 0;
        }
        if (r == -2) {
            if (aamm_wire_decoder_finish(l->dec) != 0 && l->st >= ST_HELLO)
                return link_fail(l, AAMM_ECONN, false, "peer closed the connection (%s)",
                                 aamm_wire_decoder_errmsg(l->dec));
            return link_fail(l, AAMM_ECONN, false, "peer closed the connection%s",
                             l->st < ST_READY ? " during the handshake" : "");
        }
        if (r < 0)
            return link_fail(l, AAMM_ECONN, false, "receive failed: %s",
                             l->ssl ? "TLS error" : strerror(errno));
        l->rb_off = 0;
        l->rb_len = (size_t)r;
        l->stats.bytes_received += (uint64_t)r;
        l->t_last_recv = aamm__now_ms();
        feed(l);
        if (l->st != ST_READY || l->o.role != AAMM_LINK_RECEIVER) {
            int rc = pump_control(l);
            if (rc != 0)
                return rc;
        }
    }
    return 0;
}

static int check_timers(struct aamm_link *l)
{
    int64_t now = aamm__now_ms();
    if (l->st < ST_READY && now - l->t_start >= l->o.handshake_timeout_ms) {
        l->stats.timeouts++;
        return link_fail(l, AAMM_ETIMEDOUT, true,
                         "handshake not completed within %d ms (half-open connection or a "
                         "silent peer)",
                         l->o.handshake_timeout_ms);
    }
    if (l->st == ST_READY) {
        /* A receiver that is not consuming is the bottleneck itself: not a dead peer. */
        if (l->rb_len > 0 || l->peer_eof)
            l->t_last_recv = now;
        if (now - l->t_last_recv >= l->o.dead_after_ms) {
            l->stats.timeouts++;
            return link_fail(l, AAMM_ETIMEDOUT, true, "peer silent for %" PRId64 " ms",
                             now - l->t_last_recv);
        }
        if (now - l->t_last_send >= l->o.heartbeat_ms && held(l) == 0) {
            if (aamm_wire_encode_heartbeat(l->enc, aamm__wall_us()) != 0)
                return link_fail(l, AAMM_ENOMEM, false, "out of memory");
            l->stats.heartbeats_sent++;
            l->t_last_send = now;
        }
    }
    return 0;
}

int aamm_link_step(struct aamm_link *l)
{
    int rc;
    if (l->st == ST_FAILED)
        return l->fail_code;
    if (l->st == ST_CLOSED)
        return AAMM_ECLOSED;
    if (l->st == ST_IDLE)
        return 0;
    if (l->st == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        if (getpeername(l->fd, (struct sockaddr *)&ss, &sl) != 0) {
            if (getsockopt(l->fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err != 0)
                return link_fail(l, AAMM_ECONN, false, "connect failed: %s", strerror(err));
            if (aamm__now_ms() - l->t_start >= l->o.handshake_timeout_ms) {
                l->stats.timeouts++;
                return link_fail(l, AAMM_ETIMEDOUT, false, "connect timed out");
            }
            return 0; /* still connecting */
        }
        start_session(l);
        if (l->st == ST_FAILED)
            return l->fail_code;
    }
    if (l->st == ST_TLS) {
        int r = SSL_do_handshake(l->ssl);
        if (r != 1) {
            int e = SSL_get_error(l->ssl, r);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                l->ssl_want_write = e == SSL_ERROR_WANT_WRITE;
                return check_timers(l);
            }
            {
                char ebuf[256];
                long vr = SSL_get_verify_result(l->ssl);
                ERR_error_string_n(ERR_get_error(), ebuf, sizeof ebuf);
                ERR_clear_error();
                l->stats.auth_failures++;
                return link_fail(l, AAMM_EAUTH, false, "TLS handshake failed: %s%s%s", ebuf,
                                 vr != X509_V_OK ? ": " : "",
                                 vr != X509_V_OK ? X509_verify_cert_error_string(vr) : "");
            }
        }
        l->ssl_want_write = false;
        start_session(l);
        if (l->st == ST_FAILED)
            return l->fail_code;
    }
    if ((rc = do_write(l)) != 0)
        return rc;
    if ((rc = do_read(l)) != 0)
        return rc;
    if (l->st == ST_CLOSED)
        return AAMM_ECLOSED;
    if ((rc = pump_control(l)) != 0)
        return rc;
    if ((rc = check_timers(l)) != 0)
        return rc;
    if ((rc = do_write(l)) != 0)
        return rc;
    if (l->st == ST_CLOSING) {
        if (held(l) == 0) {
            close_socket(l);
            l->st = ST_CLOSED;
            return AAMM_ECLOSED;
        }
    }
    l->stats.send_queue = held(l);
    return 0;
}

int aamm_link_fd(const struct aamm_link *l)
{
    return l->fd;
}

int aamm_link_events(const struct aamm_link *l)
{
    int ev = 0;
    if (l->fd < 0 || l->st >= ST_CLOSED)
        return 0;
    if (l->st == ST_CONNECTING)
        return AAMM_WRITE;
    if (l->st == ST_TLS)
        return l->ssl_want_write ? AAMM_WRITE : AAMM_READ;
    if (l->rb_len == 0 && !l->peer_eof)
        ev |= AAMM_READ;
    if (held(l) > 0 || l->ssl_want_write)
        ev |= AAMM_WRITE;
    return ev;
}

int aamm_link_timeout(const struct aamm_link *l)
{
    int64_t now = aamm__now_ms(), t;
    if (l->fd < 0 || l->st >= ST_CLOSED)
        return -1;
    if (l->ssl != NULL && l->rb_len == 0 && SSL_pending(l->ssl) > 0)
        return 0;
    if (l->st < ST_READY) {
        t = l->t_start + l->o.handshake_timeout_ms - now;
    } else {
        int64_t hb = l->t_last_send + l->o.heartbeat_ms - now;
        int64_t dead = l->t_last_recv + l->o.dead_after_ms - now;
        t = hb < dead ? hb : dead;
    }
    if (t < 0)
        t = 0;
    return t > INT32_MAX ? INT32_MAX : (int)t;
}

enum aamm_link_state aamm_link_state(const struct aamm_link *l)
{
    switch (l->st) {
    case ST_IDLE:
        return AAMM_LINK_IDLE;
    case ST_CONNECTING:
    case ST_TLS:
        return AAMM_LINK_CONNECTING;
    case ST_HELLO:
    case ST_AUTH:
    case ST_RESUME:
        return AAMM_LINK_HANDSHAKE;
    case ST_READY:
    case ST_CLOSING:
        return AAMM_LINK_READY;
    case ST_CLOSED:
        return AAMM_LINK_CLOSED;
    case ST_FAILED:
        break;
    }
    return AAMM_LINK_FAILED;
}

const char *aamm_link_errmsg(const struct aamm_link *l)
{
    return aamm__errmsg(&l->err);
}

void aamm_link_stats(const struct aamm_link *l, struct aamm_link_stats *stats)
{
    *stats = l->stats;
    stats->send_queue = held(l);
}

uint32_t aamm_link_peer_id(const struct aamm_link *l)
{
    return l->peer_id;
}

int aamm_link_close(struct aamm_link *l)
{
    if (l->st != ST_READY)
        return aamm__errf(&l->err, AAMM_ESTATE, "link: not ready");
    if (l->o.role == AAMM_LINK_SENDER && (l->in_txn || l->split))
        return aamm__errf(&l->err, AAMM_ESTATE, "link: close inside a transaction");
    if (aamm_wire_encode_error(l->enc, 0, "goodbye") != 0)
        return link_fail(l, AAMM_ENOMEM, false, "out of memory");
    l->st = ST_CLOSING;
    return 0;
}

/* ====================================================================================
 * Sender
 * ==================================================================================== */

int aamm_link_resume_position(const struct aamm_link *l, uint32_t origin, uint64_t *lsn)
{
    if (l->st != ST_READY)
        return AAMM_ESTATE;
    *lsn = get_pos(l->resume, l->nresume, origin);
    return 0;
}

uint64_t aamm_link_acked(const struct aamm_link *l, uint32_t origin)
{
    return get_pos(l->acked, l->nacked, origin);
}

static int sender_check(struct aamm_link *l)
{
    size_t q;
    if (l->st == ST_FAILED)
        return l->fail_code;
    if (l->st != ST_READY || l->o.role != AAMM_LINK_SENDER)
        return aamm__errf(&l->err, AAMM_ESTATE, "link: not a ready sender");
    q = held(l);
    if (q > l->stats.send_queue_high_water)
        l->stats.send_queue_high_water = q;
    if (q >= l->o.send_queue_bytes)
        return AAMM_EAGAIN;
    return 0;
}

/* After an encoder call: move complete frames into the queue, note the high-water mark. */
static int queued(struct aamm_link *l)
{
    size_t q;
    if (drain_enc(l) != 0)
        return link_fail(l, AAMM_ENOMEM, false, "out of memory (send queue)");
    q = held(l);
    if (q > l->stats.send_queue_high_water)
        l->stats.send_queue_high_water = q;
    return 0;
}

static int enc_error(struct aamm_link *l, int rc)
{
    if (rc == AAMM_EINVAL || rc == AAMM_ESTATE)
        return aamm__errf(&l->err, rc, "link: %s", aamm_wire_encoder_errmsg(l->enc));
    return link_fail(l, rc, false, "%s", aamm_wire_encoder_errmsg(l->enc));
}

int aamm_link_send_begin(struct aamm_link *l, const struct aamm_transaction *txn)
{
    int rc = sender_check(l);
    uint64_t resume;
    if (rc != 0)
        return rc;
    if (l->in_txn || l->split)
        return aamm__errf(&l->err, AAMM_ESTATE, "link: BEGIN inside a transaction");
    resume = get_pos(l->resume, l->nresume, txn->origin_node);
    /* The transaction after the one that ended at `resume` commits at or after it; one whose
     * commit record lies before it ended at or before it: already durable on the receiver. */
    l->skipping = txn->commit_lsn != AAMM_LSN_INVALID && txn->commit_lsn < resume;
    if (!l->skipping && (rc = aamm_wire_encode_begin(l->enc, txn)) != 0)
        return enc_error(l, rc);
    l->in_txn = true;
    return queued(l);
}

int aamm_link_send_change(struct aamm_link *l, const struct aamm_change *change)
{
    int rc;
    if (change->kind == AAMM_CHANGE_MESSAGE && !change->transactional && !l->in_txn) {
        if ((rc = sender_check(l)) != 0)
            return rc;
    } else {
        if (!l->in_txn)
            return aamm__errf(&l->err, AAMM_ESTATE, "link: change outside a transaction");
        if (l->skipping)
            return 0;
        if ((rc = sender_check(l)) != 0)
            return rc;
    }
    /* A change larger than a frame goes out piece by piece: as many pieces as the queue
     * takes now, the rest when the host calls again with the same change. */
    for (;;) {
        rc = aamm_wire_encode_change(l->enc, change);
        if (rc != 0 && rc != AAMM_EAGAIN) {
            if (l->split)
                return link_fail(l, rc, false, "%s", aamm_wire_encoder_errmsg(l->enc));
            return enc_error(l, rc);
        }
        l->split = rc == AAMM_EAGAIN;
        if ((rc = queued(l)) != 0)
            return rc;
        if (!l->split)
            return 0;
        if (held(l) >= l->o.send_queue_bytes)
            return AAMM_EAGAIN;
    }
}

int aamm_link_send_commit(struct aamm_link *l, const struct aamm_transaction *txn)
{
    int rc;
    if (!l->in_txn)
        return aamm__errf(&l->err, AAMM_ESTATE, "link: COMMIT outside a transaction");
    if (l->skipping) {
        l->in_txn = l->skipping = false;
        l->stats.txns_skipped++;
        return 0;
    }
    if (l->st == ST_FAILED)
        return l->fail_code;
    if (l->split)
        return aamm__errf(&l->err, AAMM_ESTATE,
                          "link: COMMIT while a change is partly queued (send it again first)");
    /* COMMIT is never refused for space: it is small, and ending the transaction lets the
     * queue drain at a transaction boundary. */
    if ((rc = aamm_wire_encode_commit(l->enc, txn)) != 0)
        return enc_error(l, rc);
    l->in_txn = false;
    l->stats.txns_sent++;
    return queued(l);
}

/* ====================================================================================
 * Receiver
 * ==================================================================================== */

int aamm_link_recv(struct aamm_link *l, struct aamm_wire_event *ev)
{
    if (l->st == ST_FAILED)
        return l->fail_code;
    if (l->st == ST_CLOSED)
        return AAMM_ECLOSED;
    if (l->st != ST_READY || l->o.role != AAMM_LINK_RECEIVER)
        return AAMM_EAGAIN;
    for (;;) {
        int rc = aamm_wire_decoder_next(l->dec, ev);
        if (rc == AAMM_EAGAIN) {
            if (feed(l))
                continue;
            if (l->peer_eof && l->rb_len == 0) {
                if (aamm_wire_decoder_finish(l->dec) != 0)
                    return link_fail(l, AAMM_ECONN, false, "peer closed the connection (%s)",
                                     aamm_wire_decoder_errmsg(l->dec));
                return link_fail(l, AAMM_ECONN, false, "peer closed the connection");
            }
            return AAMM_EAGAIN;
        }
        if (rc != 0)
            return decoder_error(l, rc);
        switch (ev->kind) {
        case AAMM_WIRE_EV_BEGIN:
        case AAMM_WIRE_EV_CHANGE:
            return 0;
        case AAMM_WIRE_EV_COMMIT:
            l->stats.txns_received++;
            return 0;
        default:
            rc = on_control(l, ev);
            if (rc != 0)
                return rc;
        }
    }
}

int aamm_link_take_change(struct aamm_link *l, struct aamm_change *out)
{
    return aamm_wire_decoder_take_change(l->dec, out);
}

int aamm_link_ack(struct aamm_link *l, uint32_t origin, uint64_t lsn)
{
    if (l->st == ST_FAILED)
        return l->fail_code;
    if (l->st != ST_READY || l->o.role != AAMM_LINK_RECEIVER)
        return aamm__errf(&l->err, AAMM_ESTATE, "link: not a ready receiver");
    if (aamm_wire_encode_ack(l->enc, origin, lsn) != 0)
        return link_fail(l, AAMM_ENOMEM, false, "out of memory");
    l->stats.acks_sent++;
    return 0;
}
