/*
 * consensus_int.h: internals shared by consensus.c (the node), consensus_fsm.c (the pure
 * replicated state machine) and consensus_psk.c (our authenticated raft transport), and
 * by their unit tests.
 */
#ifndef AAMM_CONSENSUS_INT_H
#define AAMM_CONSENSUS_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <raft.h>
#include <raft/uv.h>
#include <uv.h>

#include <aamm/consensus.h>

#include "buf.h"
#include "internal.h"

/* ---- commands (log entry payloads) --------------------------------------------------
 *
 * Every entry: u8 version (2; 1 is still read) | u8 type | u64 origin | u64 incarnation | u64 reqno |
 * i64 stamp_us | body (little endian; strings as u16 length + bytes). stamp_us is the
 * leader's wall clock written by the leader right before raft_apply (offset 26).
 * (origin, incarnation, reqno) identifies the request for deduplication; reqno 0 means
 * "no deduplication". */
#define AAMM__CS_CMD_VERSION 2
#define AAMM__CS_CMD_VERSION_1 1 /* DDL commands without the holder incarnation */
#define AAMM__CS_STAMP_OFFSET 26
#define AAMM__CS_HDR_SIZE 34

enum {
    AAMM__CS_NOOP = 1,
    AAMM__CS_MEMBER_PUT = 2,  /* u64 id | str name | str link | str raft */
    AAMM__CS_MEMBER_DEL = 3,  /* u64 id */
    AAMM__CS_GALLOC = 4,      /* str seq | u64 count | i64 min_start */
    AAMM__CS_DDL_ACQUIRE = 5, /* u32 lease_ms | u64 holder incarnation (v2) */
    AAMM__CS_DDL_RELEASE = 6, /* u64 token | u64 holder incarnation (v2) */
    AAMM__CS_WATERMARK = 7,   /* u64 stream origin | u64 value */
};

struct aamm__cs_cmd {
    uint8_t type;
    uint64_t origin;
    uint64_t incarnation;
    uint64_t reqno;
    int64_t stamp_us;
    uint64_t id;      /* MEMBER_PUT/DEL: member; WATERMARK: stream origin */
    const char *name; /* MEMBER_PUT name; GALLOC sequence (borrowed) */
    const char *link;
    const char *raft;
    size_t name_len, link_len, raft_len;
    uint64_t count; /* GALLOC count; DDL_RELEASE token; WATERMARK value */
    int64_t min_start;
    uint32_t lease_ms;
    uint64_t holder_inc; /* DDL: the requesting handle's incarnation (0 in version 1) */
};

/* Encode @c into @w (appends). */
void aamm__cs_cmd_encode(struct aamm__wr *w, const struct aamm__cs_cmd *c);
/* Decode; strings point into @data. Returns 0 or AAMM_EMALFORMED. */
int aamm__cs_cmd_decode(const void *data, size_t len, struct aamm__cs_cmd *c);
/* Overwrite the stamp of an encoded command. */
void aamm__cs_cmd_stamp(void *data, size_t len, int64_t stamp_us);

/* The outcome of one applied command (what the leader's raft_apply callback receives). */
struct aamm__cs_result {
    uint8_t type;
    int32_t status; /* 0 or AAMM_EEXHAUSTED / AAMM_EBUSY / AAMM_ESTATE / AAMM_EMALFORMED */
    uint64_t index; /* log index of the entry */
    int64_t start, end;
    struct aamm_consensus_ddl_lock lock;
};
/* A result as fixed-size little-endian fields (snapshots and the forwarding channel);
 * decode leaves @rd->ok false on truncation. */
void aamm__cs_result_encode(struct aamm__wr *w, const struct aamm__cs_result *r);
void aamm__cs_result_decode(struct aamm__rd *rd, struct aamm__cs_result *r);

/* ---- the state machine ---------------------------------------------------------------- */

struct aamm__cs_member {
    uint64_t id;
    char *name, *link, *raft;
};

struct aamm__cs_seq {
    char *name;
    int64_t next;
    uint64_t ranges; /* ranges handed out */
};

struct aamm__cs_wm {
    uint64_t reporter, origin, value;
};

#define AAMM__CS_DEDUP_WINDOW 64
struct aamm__cs_dedup {
    uint64_t origin, incarnation;
    unsigned n; /* entries used (sorted by reqno ascending) */
    uint64_t reqno[AAMM__CS_DEDUP_WINDOW];
    struct aamm__cs_result result[AAMM__CS_DEDUP_WINDOW];
};

struct aamm__cs_state {
    int64_t clock_us; /* max leader stamp seen: the state machine's only notion of time */
    uint64_t applied; /* commands applied (for tests) */
    struct aamm__cs_member *members;
    size_t n_members;
    struct aamm__cs_seq *seqs;
    size_t n_seqs;
    struct aamm_consensus_ddl_lock ddl;
    struct aamm__cs_wm *wms;
    size_t n_wms;
    struct aamm__cs_dedup *dedups;
    size_t n_dedups;
};

/* The raft_fsm glue: raft_fsm.data points to one of these. */
struct aamm__cs_fsm {
    struct raft_fsm fsm;
    struct raft *raft; /* to learn the index being applied (last_applied + 1) */
    struct aamm__cs_state st;
    struct aamm__cs_result last; /* the *result handed to raft */
};

/* Set up @f (raft_fsm version 1, data = f). @raft may be set later. Returns 0. */
int aamm__cs_fsm_init(struct aamm__cs_fsm *f, struct raft *raft);
void aamm__cs_fsm_close(struct aamm__cs_fsm *f);

/* Apply one encoded command at log index @index (pure; the result lands in @out). Returns
 * 0, or AAMM_ENOMEM (the only real failure: the state is unchanged). */
int aamm__cs_state_apply(struct aamm__cs_state *st, uint64_t index, const void *data, size_t len,
                         struct aamm__cs_result *out);
void aamm__cs_state_clear(struct aamm__cs_state *st);
/* Serialize the whole state deterministically. */
void aamm__cs_state_encode(const struct aamm__cs_state *st, struct aamm__wr *w);
/* Replace @st with the decoded state. Returns 0, AAMM_EMALFORMED, AAMM_ENOMEM. */
int aamm__cs_state_decode(struct aamm__cs_state *st, const void *data, size_t len);
/* FNV-1a 64 of the serialization. */
uint64_t aamm__cs_state_hash(const struct aamm__cs_state *st);

const struct aamm__cs_member *aamm__cs_state_member(const struct aamm__cs_state *st, uint64_t id);
const struct aamm__cs_seq *aamm__cs_state_seq(const struct aamm__cs_state *st, const char *name,
                                              size_t len);
uint64_t aamm__cs_state_watermark(const struct aamm__cs_state *st, uint64_t origin);

/* ---- the authenticated transport ------------------------------------------------------ */

/* Channel roles bound into the handshake. */
#define AAMM__CS_ROLE_RAFT 1
#define AAMM__CS_ROLE_FWD 2

struct aamm__psk;

/* Our side of a forwarding channel: framed messages (u32 LE length + payload). */
struct aamm__cs_conn;
typedef void (*aamm__cs_conn_frame_fn)(struct aamm__cs_conn *c, const uint8_t *data, size_t len,
                                       void *arg);
typedef void (*aamm__cs_conn_state_fn)(struct aamm__cs_conn *c, bool up, void *arg);

/* Build a transport object for raft_uv_init(): handshake key derived from @secret and
 * @cluster; @on_fwd is called with each authenticated incoming forwarding connection.
 * raft calls t->init() with the id and address. Returns 0 or AAMM_ENOMEM. */
int aamm__psk_new(struct raft_uv_transport *t, uv_loop_t *loop, const char *cluster,
                  const void *secret, size_t secret_len, const char *bind_address,
                  unsigned handshake_timeout_ms);
/* Free what aamm__psk_new allocated (after raft closed the transport, or if raft never
 * used it). */
void aamm__psk_free(struct raft_uv_transport *t);
/* Incoming authenticated FWD connections are handed to this callback (transferred). */
void aamm__psk_on_fwd(struct raft_uv_transport *t, void (*fn)(struct aamm__cs_conn *c, void *arg),
                      void *arg);
/* Open an outgoing FWD connection to (@id, @address). @state_fn(up=true) once
 * authenticated, (up=false) when it fails or closes (then it is freed after the call). */
struct aamm__cs_conn *aamm__psk_connect_fwd(struct raft_uv_transport *t, uint64_t id,
                                            const char *address);
void aamm__cs_conn_set_cbs(struct aamm__cs_conn *c, aamm__cs_conn_frame_fn frame,
                           aamm__cs_conn_state_fn state, void *arg);
/* Queue a frame (copied). Returns 0 or AAMM_ECLOSED / AAMM_ENOMEM / AAMM_ETOOBIG. */
int aamm__cs_conn_send(struct aamm__cs_conn *c, const void *data, size_t len);
/* Close (state callback with up=false runs later from the loop, then freed). */
void aamm__cs_conn_close(struct aamm__cs_conn *c);
uint64_t aamm__cs_conn_peer(const struct aamm__cs_conn *c);
uint64_t aamm__cs_conn_serial(const struct aamm__cs_conn *c);
bool aamm__cs_conn_up(const struct aamm__cs_conn *c);

/* Test hook: simulate a network partition of this node (refuse and cut every connection). */
void aamm__psk_partition(struct raft_uv_transport *t, bool on);

/* Test hook on a node: partition it from the network (see aamm__psk_partition). */
void aamm__consensus_partition(struct aamm_consensus *cs, bool on);

/* Handshake pieces, exported for the unit tests. */
#define AAMM__PSK_MAGIC "AAMMCS01"
#define AAMM__PSK_NONCE 32
#define AAMM__PSK_MAC 32
/* HELLO: magic 8 | role u8 | zero 3 | from u64 | to u64 | nonce 32 | addr_len u16 | addr */
#define AAMM__PSK_HELLO_FIXED 62
/* CHALLENGE: magic 8 | nonce 32 | mac 32 */
#define AAMM__PSK_CHALLENGE 72
void aamm__psk_derive_key(const char *cluster, const void *secret, size_t secret_len,
                          uint8_t key[32]);
/* mac = HMAC(key, label | hello | nonce) */
void aamm__psk_mac(const uint8_t key[32], char label, const uint8_t *hello, size_t hello_len,
                   const uint8_t nonce[AAMM__PSK_NONCE], uint8_t out[AAMM__PSK_MAC]);

/* Session key of one direction (@dir "c2a": the connector sends, "a2c": the acceptor sends):
 * HMAC(key, "aamm-cs-session-v1\0" | dir | hello | nonce_a). */
void aamm__psk_session_key(const uint8_t key[32], const char dir[3], const uint8_t *hello,
                           size_t hello_len, const uint8_t nonce_a[AAMM__PSK_NONCE],
                           uint8_t out[32]);
/* Write record number @seq (len u32 LE | data | MAC) of @len bytes of @data under @key into
 * @out (room for 4 + len + 32 bytes; @data may point at out + 4). Returns its size, 0 on a
 * crypto failure. For the tests; the transport seals in place. */
size_t aamm__psk_seal(const uint8_t key[32], uint64_t seq, const void *data, size_t len,
                      uint8_t *out);
/* Test hook: pending handshakes closed so far to make room for newcomers. */
uint64_t aamm__psk_evicted(struct raft_uv_transport *t);

/* Parse "a.b.c.d:port" strictly. Returns 0 or AAMM_EINVAL. */
int aamm__cs_parse_addr(const char *text, void *sockaddr_in_out);

#endif /* AAMM_CONSENSUS_INT_H */
