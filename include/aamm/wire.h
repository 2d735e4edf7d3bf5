/*
 * wire.h: the agent-to-agent wire format: frames with a versioned header, length, CRC32C,
 * optional LZ4 and MAC trailer; transaction data as records with a per-connection relation
 * dictionary. Pure encode/decode, no I/O. The byte layout is specified in doc/protocol.md.
 *
 * Encoder: feed it events (control messages, BEGIN / changes / COMMIT) and take complete
 * frames from its output buffer. Decoder: feed it bytes in chunks of any size and take events
 * out one at a time; it never needs a whole transaction in memory, only one frame and one
 * record.
 */
#ifndef AAMM_WIRE_H
#define AAMM_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <aamm/aamm.h>
#include <aamm/change.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Feature macro (see AAMM_HAS_CHANGE_MODEL): this header's API is in the library. */
#define AAMM_HAS_WIRE 1

/* ---- constants ------------------------------------------------------------------- */

#define AAMM_WIRE_VERSION_MIN 1 /* oldest protocol version this build speaks */
#define AAMM_WIRE_VERSION_MAX 1 /* newest protocol version this build speaks */
#define AAMM_WIRE_HEADER_SIZE 16
#define AAMM_WIRE_MAC_SIZE 16
#define AAMM_WIRE_NONCE_SIZE 32
#define AAMM_WIRE_PROOF_SIZE 32
#define AAMM_WIRE_MAX_CLUSTER 255
#define AAMM_WIRE_MAX_RESUME 4096

/* Frame types (doc/protocol.md §2). */
enum aamm_wire_type {
    AAMM_WIRE_HELLO = 0x01,
    AAMM_WIRE_AUTH = 0x02,
    AAMM_WIRE_RESUME = 0x03,
    AAMM_WIRE_ACK = 0x04,
    AAMM_WIRE_HEARTBEAT = 0x05,
    AAMM_WIRE_ERROR = 0x06,
    AAMM_WIRE_GOODBYE = 0x07,
    AAMM_WIRE_DATA = 0x10,
};

/* Frame flags. */
#define AAMM_WIRE_F_LZ4 0x0001u
#define AAMM_WIRE_F_MAC 0x0002u

/* Roles in HELLO. */
#define AAMM_WIRE_ROLE_SENDER 1
#define AAMM_WIRE_ROLE_RECEIVER 2

/* HELLO flags. */
#define AAMM_WIRE_HELLO_TLS 0x01u

/* Defaults. */
#define AAMM_WIRE_DEFAULT_FRAME_PAYLOAD (1024u * 1024u)      /* encoder's max */
#define AAMM_WIRE_DEFAULT_MAX_PAYLOAD (1024u * 1024u + 64u)  /* decoder's max */
#define AAMM_WIRE_DEFAULT_MAX_RECORD (1024u * 1024u * 1024u) /* 1 GiB */
#define AAMM_WIRE_DEFAULT_COMPRESS_MIN 64u
#define AAMM_WIRE_DEFAULT_MAX_RELATIONS 4096u

/* ---- CRC32C ---------------------------------------------------------------------- */

/**
 * Continue a CRC32C (Castagnoli) over @len bytes of @data (borrowed). Start with @crc = 0;
 * the result of one call can be passed as @crc of the next to cover concatenated buffers.
 * Uses SSE4.2 when the CPU has it (checked at run time), else slicing-by-8. Thread-safe.
 */
AAMM_API uint32_t aamm_crc32c(uint32_t crc, const void *data, size_t len);

/* ---- control messages ------------------------------------------------------------ */

/** HELLO (doc/protocol.md §3.1). @cluster is borrowed (NUL-terminated, 1..255 bytes). */
struct aamm_wire_hello {
    uint16_t min_version;
    uint16_t max_version;
    uint8_t role;  /* AAMM_WIRE_ROLE_* */
    uint8_t flags; /* AAMM_WIRE_HELLO_* */
    uint32_t node_id;
    int64_t wall_time_us;
    uint8_t nonce[AAMM_WIRE_NONCE_SIZE];
    const char *cluster;
};

/** One RESUME entry: the receiver's last durably applied end LSN for an origin node. */
struct aamm_wire_position {
    uint32_t origin_node;
    uint64_t lsn;
};

struct aamm_wire_encoder;
struct aamm_wire_decoder;

/**
 * MAC hooks, installed by the link once a session key exists. A seal callback writes
 * AAMM_WIRE_MAC_SIZE bytes into @mac (borrowed, written) for the frame bytes @frame / @len
 * (header and payload, borrowed) that encoder @enc closes; a verify callback checks them
 * for decoder @dec. @arg is the pointer given to the set_mac call. Both return 0 or a
 * negative AAMM_E* code (verify: AAMM_EAUTH for a mismatch). They run inside encoder /
 * decoder calls and must not free or reconfigure their handle.
 */
typedef int (*aamm_wire_seal_cb)(struct aamm_wire_encoder *enc, const uint8_t *frame, size_t len,
                                 uint8_t *mac, void *arg);
typedef int (*aamm_wire_verify_cb)(struct aamm_wire_decoder *dec, const uint8_t *frame,
                                   size_t len, const uint8_t *mac, void *arg);

/* ---- options --------------------------------------------------------------------- */

/** Encoder / decoder limits. Zero fields mean "the default". */
struct aamm_wire_options {
    uint32_t frame_payload; /* encoder: max payload bytes per frame (256 .. 16 MiB) */
    uint32_t max_payload;   /* decoder: largest payload (stored or decompressed) accepted */
    uint32_t max_record;    /* both: largest record (a change with its values) */
    uint32_t compress_min;  /* encoder: send DATA payloads of at least this many bytes LZ4-
                               compressed when that is smaller (each frame may refer to the
                               last 64 KiB of earlier DATA payloads); UINT32_MAX: never */
    uint32_t max_relations; /* both: dictionary size (relation ids 0 .. max-1) */
};

/* ---- encoder --------------------------------------------------------------------- */

/** An opaque encoder: change model and control messages into frames. */
struct aamm_wire_encoder;

/**
 * Create an encoder (per connection and direction: it holds the relation dictionary) with
 * @opts (borrowed, may be NULL for defaults). Returns 0 with *@enc set (owned by the caller,
 * free with aamm_wire_encoder_free), AAMM_EINVAL for bad options, AAMM_ENOMEM. On failure
 * *@enc is NULL and the reason is written into @err (borrowed, @errsize bytes,
 * NUL-terminated; may be NULL).
 */
AAMM_API int aamm_wire_encoder_new(struct aamm_wire_encoder **enc,
                                   const struct aamm_wire_options *opts, char *err,
                                   size_t errsize);

/** Free @enc and everything it holds. NULL is accepted. */
AAMM_API void aamm_wire_encoder_free(struct aamm_wire_encoder *enc);

/** The last error message of @enc ("" if none); owned by the encoder. */
AAMM_API const char *aamm_wire_encoder_errmsg(const struct aamm_wire_encoder *enc);

/**
 * Set the protocol version written into frame headers (default AAMM_WIRE_VERSION_MAX).
 * Returns 0 or AAMM_EUNSUPPORTED.
 */
AAMM_API int aamm_wire_encoder_set_version(struct aamm_wire_encoder *enc, unsigned version);

/**
 * Seal every frame closed from now on with @fn (@arg borrowed until the encoder is freed or
 * the hook replaced; @fn NULL turns MAC off). An open DATA frame is closed first.
 * Returns 0 or an error from closing the frame.
 */
AAMM_API int aamm_wire_encoder_set_mac(struct aamm_wire_encoder *enc, aamm_wire_seal_cb fn,
                                       void *arg);

/* Control frames. Each closes an open DATA frame first, then appends one frame.
 * Returns 0, AAMM_EINVAL (field out of range, message in the error text), AAMM_ENOMEM or an
 * error of the MAC hook. All pointers borrowed. */
AAMM_API int aamm_wire_encode_hello(struct aamm_wire_encoder *enc,
                                    const struct aamm_wire_hello *hello);
AAMM_API int aamm_wire_encode_auth(struct aamm_wire_encoder *enc,
                                   const uint8_t proof[AAMM_WIRE_PROOF_SIZE]);
AAMM_API int aamm_wire_encode_resume(struct aamm_wire_encoder *enc,
                                     const struct aamm_wire_position *pos, uint32_t n);
AAMM_API int aamm_wire_encode_ack(struct aamm_wire_encoder *enc, uint32_t origin_node,
                                  uint64_t lsn);
AAMM_API int aamm_wire_encode_heartbeat(struct aamm_wire_encoder *enc, int64_t wall_time_us);
/** ERROR (@code a negative AAMM_E* code) or, with @code 0, GOODBYE. @msg (borrowed) may be
 *  NULL. Returns as the control frames above. */
AAMM_API int aamm_wire_encode_error(struct aamm_wire_encoder *enc, int code, const char *msg);

/*
 * Transaction data. aamm_wire_encode_begin / _change / _commit append records to the open
 * DATA frame, closing it and starting a new one when the next record would not fit; a record
 * larger than a frame is split into PIECE frames. Frames are not closed at COMMIT: call
 * aamm_wire_encoder_flush() when the frames should go out (e.g. when the socket is idle).
 * Relations referenced by changes are sent once per connection and whenever they change
 * (compared with aamm_relation_equal). Pointers are borrowed for the call.
 * Returns 0, AAMM_ESTATE (BEGIN inside a transaction, change or COMMIT outside one),
 * AAMM_EINVAL (an invalid change: tuple size differing from the relation's column count,
 * unknown kinds or flags, NUL in text, strings missing), AAMM_ETOOBIG (record above
 * max_record), AAMM_ENOMEM. After an error other than AAMM_ESTATE/AAMM_EINVAL the encoder
 * state is undefined: free it.
 */
AAMM_API int aamm_wire_encode_begin(struct aamm_wire_encoder *enc,
                                    const struct aamm_transaction *txn);
AAMM_API int aamm_wire_encode_change(struct aamm_wire_encoder *enc,
                                     const struct aamm_change *change);
/** @txn: the same transaction as at BEGIN with end_lsn set (non-zero). Returns as above. */
AAMM_API int aamm_wire_encode_commit(struct aamm_wire_encoder *enc,
                                     const struct aamm_transaction *txn);

/**
 * Streaming mode (off by default): a change whose record is larger than a frame is emitted
 * one PIECE frame per aamm_wire_encode_change() call, which returns AAMM_EAGAIN until the
 * last piece is out; the caller consumes the pending bytes and calls again with the same
 * change (same content; the pointers may differ). Big text values and message contents are
 * never copied whole into the encoder in either mode, only frame by frame. Between the calls
 * only control frames may be encoded (BEGIN/COMMIT: AAMM_ESTATE; a change of another size:
 * AAMM_EINVAL). Returns 0, or AAMM_ESTATE while a split record is in progress.
 */
AAMM_API int aamm_wire_encoder_set_streaming(struct aamm_wire_encoder *enc, bool on);

/** Close the open DATA frame, if any, so that its bytes become pending. 0 or an error. */
AAMM_API int aamm_wire_encoder_flush(struct aamm_wire_encoder *enc);

/**
 * The bytes of complete frames not yet consumed: returns a pointer (owned by the encoder,
 * valid until the next call on @enc) and sets *@len; *@len == 0 when nothing is pending.
 */
AAMM_API const uint8_t *aamm_wire_encoder_pending(const struct aamm_wire_encoder *enc, size_t *len);

/** Mark the first @n pending bytes as taken (sent). @n must be ≤ the pending length. */
AAMM_API void aamm_wire_encoder_consume(struct aamm_wire_encoder *enc, size_t n);

/** Bytes held by the encoder: pending output plus the open frame (for back-pressure). */
AAMM_API size_t aamm_wire_encoder_buffered(const struct aamm_wire_encoder *enc);

/** Whether a transaction is open (between BEGIN and COMMIT). */
AAMM_API bool aamm_wire_encoder_in_transaction(const struct aamm_wire_encoder *enc);

/* ---- decoder --------------------------------------------------------------------- */

/** An opaque decoder: frames back into events. */
struct aamm_wire_decoder;

/** What a decoded event carries (struct aamm_wire_event's kind). */
enum aamm_wire_event_kind {
    AAMM_WIRE_EV_HELLO = 1,
    AAMM_WIRE_EV_AUTH,
    AAMM_WIRE_EV_RESUME,
    AAMM_WIRE_EV_ACK,
    AAMM_WIRE_EV_HEARTBEAT,
    AAMM_WIRE_EV_ERROR,   /* the peer sent ERROR */
    AAMM_WIRE_EV_GOODBYE, /* the peer sent GOODBYE */
    AAMM_WIRE_EV_BEGIN,   /* txn: the header (end_lsn still AAMM_LSN_INVALID) */
    AAMM_WIRE_EV_CHANGE,  /* change (in txn, or a non-transactional message outside) */
    AAMM_WIRE_EV_COMMIT,  /* txn: complete with end_lsn */
};

/**
 * One decoded event (a shallow view). Everything it points to is owned by the decoder and
 * valid until the next call on the decoder; relations in @change are borrowed from the
 * decoder's dictionary (same lifetime). To keep a change without copying its values, use
 * aamm_wire_decoder_take_change(); to keep the transaction, aamm_transaction_copy().
 */
struct aamm_wire_event {
    enum aamm_wire_event_kind kind;
    uint8_t frame_version;                      /* version field of the frame it came from */
    struct aamm_wire_hello hello;               /* HELLO (cluster valid as above) */
    uint8_t proof[AAMM_WIRE_PROOF_SIZE];        /* AUTH */
    const struct aamm_wire_position *positions; /* RESUME */
    uint32_t npositions;
    uint32_t origin_node;        /* ACK */
    uint64_t lsn;                /* ACK */
    int64_t wall_time_us;        /* HEARTBEAT */
    int code;                    /* ERROR: negative AAMM_E* code as sent (0 for GOODBYE) */
    const char *message;         /* ERROR / GOODBYE */
    struct aamm_transaction txn; /* BEGIN / COMMIT (owned by the decoder) */
    struct aamm_change change;   /* CHANGE */
};

/**
 * Create a decoder (per connection and direction) with @opts (borrowed, NULL for defaults).
 * It accepts frames of versions AAMM_WIRE_VERSION_MIN..MAX until aamm_wire_decoder_set_version.
 * Returns 0 with *@dec set (owned by the caller, free with aamm_wire_decoder_free),
 * AAMM_EINVAL for bad options, AAMM_ENOMEM. On failure *@dec is NULL and the reason is
 * written into @err (borrowed, @errsize bytes, NUL-terminated; may be NULL).
 */
AAMM_API int aamm_wire_decoder_new(struct aamm_wire_decoder **dec,
                                   const struct aamm_wire_options *opts, char *err,
                                   size_t errsize);

/** Free @dec and everything it holds. NULL is accepted. */
AAMM_API void aamm_wire_decoder_free(struct aamm_wire_decoder *dec);

/** The last error message of @dec ("" if none); owned by the decoder. */
AAMM_API const char *aamm_wire_decoder_errmsg(const struct aamm_wire_decoder *dec);

/** Accept only frames of protocol @version from now on. 0 or AAMM_EUNSUPPORTED. */
AAMM_API int aamm_wire_decoder_set_version(struct aamm_wire_decoder *dec, unsigned version);

/**
 * Accept payloads of at most @max bytes from now on (64 .. the max_payload option), e.g. a
 * small limit until the peer has authenticated. Returns 0 or AAMM_EINVAL.
 */
AAMM_API int aamm_wire_decoder_set_max_payload(struct aamm_wire_decoder *dec, uint32_t max);

/**
 * Require a MAC on every frame completed from now on and check it with @fn (@arg borrowed
 * while installed); @fn NULL: frames must carry no MAC.
 */
AAMM_API void aamm_wire_decoder_set_mac(struct aamm_wire_decoder *dec, aamm_wire_verify_cb fn,
                                        void *arg);

/**
 * Give the decoder up to @len bytes of @data (copied). It buffers at most one frame, so it
 * may take fewer: *@accepted says how many; feed the rest after aamm_wire_decoder_next()
 * returned AAMM_EAGAIN. Returns 0, or the decoder's sticky error.
 */
AAMM_API int aamm_wire_decoder_feed(struct aamm_wire_decoder *dec, const void *data, size_t len,
                                    size_t *accepted);

/**
 * Decode the next event into @ev (overwritten; see struct aamm_wire_event for lifetimes).
 * Returns 0 with an event; AAMM_EAGAIN when more bytes are needed; AAMM_EMALFORMED for
 * invalid bytes (bad magic, version, type, flags, length, CRC, record; the message says
 * which and where); AAMM_EAUTH when the MAC hook rejects a frame; AAMM_ETOOBIG for a frame
 * or record beyond the limits; AAMM_ENOMEM. Errors are sticky: every later call returns the
 * same code. No event of a frame is returned before the whole frame passed its CRC and MAC.
 */
AAMM_API int aamm_wire_decoder_next(struct aamm_wire_decoder *dec, struct aamm_wire_event *ev);

/**
 * End of input: returns 0 if the decoder stopped at a frame boundary with no record
 * half-reassembled, AAMM_EMALFORMED ("truncated frame ...") otherwise, or the sticky error.
 * A transaction left open is not an error here (see aamm_wire_decoder_in_transaction).
 */
AAMM_API int aamm_wire_decoder_finish(struct aamm_wire_decoder *dec);

/**
 * Move the change of the last AAMM_WIRE_EV_CHANGE event into @out (overwritten; owned by
 * the caller afterwards, free with aamm_change_clear). Its relation pointers stay borrowed
 * from the decoder: valid until the decoder's next event. Returns 0, or AAMM_ESTATE when
 * the last event was not a change (or was taken already).
 */
AAMM_API int aamm_wire_decoder_take_change(struct aamm_wire_decoder *dec, struct aamm_change *out);

/** Whether a transaction is open (BEGIN decoded, COMMIT not yet). */
AAMM_API bool aamm_wire_decoder_in_transaction(const struct aamm_wire_decoder *dec);

#ifdef __cplusplus
}
#endif
#endif /* AAMM_WIRE_H */
