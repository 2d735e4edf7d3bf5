/*
 * conflict.h: conflict kinds, the last-writer-wins rule and the built-in resolution
 * policies. Pure decision code, no I/O.
 *
 * Apply (apply.h) detects conflicts while it writes, inside PostgreSQL, so that the
 * comparison and the write are one atomic step (the decision runs in the statement's WHERE
 * clause while the row is being locked). The server-side functions that node setup
 * installs (node.h) implement exactly the rules below; this header is the reference and
 * the host-side mirror of them, tested without a server. See doc/conflicts.md.
 */
#ifndef AAMM_CONFLICT_H
#define AAMM_CONFLICT_H

#include <stdbool.h>
#include <stdint.h>

#include <aamm/aamm.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Feature macro: this header's API is in the library (like libpq's LIBPQ_HAS_...). */
#define AAMM_HAS_CONFLICT 1

/** The kinds of conflict (DESIGN.md's table), plus TRUNCATE as a non-convergent op. */
enum aamm_conflict_kind {
    AAMM_CONFLICT_INSERT_EXISTS = 1,         /* remote INSERT, key already present (or a
                                                newer delete of that key is remembered) */
    AAMM_CONFLICT_UPDATE_ORIGIN_DIFFERS = 2, /* remote UPDATE, local row last written by
                                                another node (logged when the remote update
                                                lost, or won over a version its writer had
                                                not seen: doc/conflicts.md, "What is
                                                logged"; always counted) */
    AAMM_CONFLICT_UPDATE_MISSING = 3,        /* remote UPDATE, row not found */
    AAMM_CONFLICT_DELETE_ORIGIN_DIFFERS = 4, /* remote DELETE, local row from elsewhere
                                                (logged like UPDATE_ORIGIN_DIFFERS) */
    AAMM_CONFLICT_DELETE_MISSING = 5,        /* remote DELETE, row not found */
    AAMM_CONFLICT_UNIQUE_OTHER = 6,          /* a unique index other than the key rejects
                                                the row: the stream stops */
    AAMM_CONFLICT_TRUNCATE = 7,              /* a remote TRUNCATE was applied: it does not
                                                converge with racing inserts */
};

/** Number of slots a per-kind counter array needs (index = kind). */
#define AAMM_CONFLICT_NKINDS 8

/** How a conflict was (or is to be) resolved. */
enum aamm_resolution {
    AAMM_RESOLVE_APPLY_REMOTE = 1, /* the remote change is applied */
    AAMM_RESOLVE_KEEP_LOCAL = 2,   /* the local row stays as it is */
    AAMM_RESOLVE_SKIP = 3,         /* nothing to do (delete of a missing row, update of a
                                      row a newer delete removed) */
    AAMM_RESOLVE_ERROR = 4,        /* the stream stops with an error */
    AAMM_RESOLVE_MERGED = 5,       /* a row the host's resolver built is written (it
                                      carries the remote transaction's version) */
};

/** Resolution policies, global or per relation (aamm_apply_set_policy()). */
enum aamm_conflict_policy {
    AAMM_POLICY_LWW = 0,          /* last writer wins (default) */
    AAMM_POLICY_KEEP_LOCAL = 1,   /* the local row always stays */
    AAMM_POLICY_APPLY_REMOTE = 2, /* the remote change always wins */
    AAMM_POLICY_ERROR = 3,        /* every conflict stops the stream */
    AAMM_POLICY_CALLBACK = 4,     /* the host's resolver decides (aamm_apply_set_resolver();
                                     set by it, not by aamm_apply_set_policy()) */
};

/**
 * A row version: the commit timestamp and origin node of the transaction that wrote it
 * (pg_xact_commit_timestamp_origin(xmin) on the node, mapped to a node id).
 * @known false means the timestamp is unknown (frozen or pre-setting rows): oldest.
 */
struct aamm_conflict_version {
    bool known;
    int64_t commit_time;  /* microseconds since the Unix epoch */
    uint32_t origin_node; /* node id */
};

/**
 * One conflict as apply reports it (to the host callback) and logs it (aamm.conflict_log):
 * those that lost or kept a write against another; decisions that overwrote nothing
 * unseen are only counted (aamm_apply_stats(), apply.h). Every pointer is borrowed: valid
 * only during the callback.
 */
struct aamm_conflict {
    enum aamm_conflict_kind kind;
    const char *relation;    /* "schema.name" */
    const char *key_json;    /* the key as a JSON array, or NULL */
    const char *local_json;  /* local row as a JSON object, or NULL (no row) */
    const char *remote_json; /* remote row as a JSON object, or NULL */
    struct aamm_conflict_version local;
    struct aamm_conflict_version remote;
    enum aamm_resolution resolution;
};

/* Apply reports each conflict to the host through aamm_apply_conflict_cb (apply.h). */

/**
 * Compare two row versions by (commit timestamp, origin node id); an unknown version is
 * older than every known one. Returns <0, 0 or >0 as @a is older, equal or newer.
 * Both borrowed.
 */
AAMM_API int aamm_conflict_version_compare(const struct aamm_conflict_version *a,
                                           const struct aamm_conflict_version *b);

/**
 * Whether a remote write with version @remote beats the local row version @local under
 * last writer wins: true iff remote > local (aamm_conflict_version_compare()). Both
 * borrowed.
 */
AAMM_API bool aamm_conflict_lww_remote_wins(const struct aamm_conflict_version *local,
                                            const struct aamm_conflict_version *remote);

/**
 * Decide a conflict of @kind under @policy: the rule the server-side functions apply
 * (held to it row by row by tests/integration/test_conflict_rule.c), so a resolver that
 * wants the default answer can call this. INSERT_EXISTS / *_ORIGIN_DIFFERS follow the
 * policy (LWW compares the versions), except that *_ORIGIN_DIFFERS with an unknown local
 * version or one written by @remote's own node is no conflict: APPLY_REMOTE under every
 * policy;
 * UPDATE_MISSING (@local: the remembered delete of the key, if any) is SKIP when that
 * delete is newer, else ERROR under POLICY_ERROR, else SKIP when @remote_has_unchanged
 * (the update carries unchanged TOAST values, so no full row exists to insert) or under
 * POLICY_KEEP_LOCAL, else APPLY_REMOTE (inserted); DELETE_MISSING is SKIP;
 * UNIQUE_OTHER is ERROR; TRUNCATE is APPLY_REMOTE. POLICY_ERROR gives ERROR for every
 * kind except DELETE_MISSING and TRUNCATE. POLICY_CALLBACK is the host resolver's to
 * decide (apply.h); this function cannot call it and answers ERROR where a resolver would
 * be asked. @local (may be NULL: no local version) and
 * @remote are borrowed.
 */
AAMM_API enum aamm_resolution aamm_conflict_decide(enum aamm_conflict_kind kind,
                                                   enum aamm_conflict_policy policy,
                                                   const struct aamm_conflict_version *local,
                                                   const struct aamm_conflict_version *remote,
                                                   bool remote_has_unchanged);

/** Static name of a kind ("insert_exists", ...), the text used in aamm.conflict_log;
 *  "unknown" for other values. */
AAMM_API const char *aamm_conflict_kind_name(enum aamm_conflict_kind kind);

/** Parse a kind name; returns the kind or 0 when unknown. @name borrowed. */
AAMM_API int aamm_conflict_kind_parse(const char *name);

/** Static name of a resolution ("apply_remote", "keep_local", "skip", "error", "merged"). */
AAMM_API const char *aamm_conflict_resolution_name(enum aamm_resolution resolution);

/** Parse a resolution name; the resolution or 0 when unknown. @name borrowed. */
AAMM_API int aamm_conflict_resolution_parse(const char *name);

/** Static name of a policy ("lww", "keep_local", "apply_remote", "error", "callback"). */
AAMM_API const char *aamm_conflict_policy_name(enum aamm_conflict_policy policy);

#ifdef __cplusplus
}
#endif
#endif /* AAMM_CONFLICT_H */
