/* conflict.c: conflict kinds, last-writer-wins and the built-in policies (pure). The rule
 * that runs is the SQL of sql/aamm--*.sql (aamm.decide, aamm.update_missing, aamm.newer);
 * tests/integration/test_conflict_rule.c holds both to one decision table. */
#include "config.h"

#include <string.h>

#include <aamm/conflict.h>

#include "internal.h"

static const char *const kind_names[AAMM_CONFLICT_NKINDS] = {
    [AAMM_CONFLICT_INSERT_EXISTS] = "insert_exists",
    [AAMM_CONFLICT_UPDATE_ORIGIN_DIFFERS] = "update_origin_differs",
    [AAMM_CONFLICT_UPDATE_MISSING] = "update_missing",
    [AAMM_CONFLICT_DELETE_ORIGIN_DIFFERS] = "delete_origin_differs",
    [AAMM_CONFLICT_DELETE_MISSING] = "delete_missing",
    [AAMM_CONFLICT_UNIQUE_OTHER] = "unique_other",
    [AAMM_CONFLICT_TRUNCATE] = "truncate",
};

static const char *const resolution_names[] = {
    [AAMM_RESOLVE_APPLY_REMOTE] = "apply_remote",
    [AAMM_RESOLVE_KEEP_LOCAL] = "keep_local",
    [AAMM_RESOLVE_SKIP] = "skip",
    [AAMM_RESOLVE_ERROR] = "error",
    [AAMM_RESOLVE_MERGED] = "merged",
};

static const char *const policy_names[] = {
    [AAMM_POLICY_LWW] = "lww",
    [AAMM_POLICY_KEEP_LOCAL] = "keep_local",
    [AAMM_POLICY_APPLY_REMOTE] = "apply_remote",
    [AAMM_POLICY_ERROR] = "error",
    [AAMM_POLICY_CALLBACK] = "callback",
};

int aamm_conflict_version_compare(const struct aamm_conflict_version *a,
                                  const struct aamm_conflict_version *b)
{
    if (!a->known || !b->known)
        return (int)a->known - (int)b->known;
    if (a->commit_time != b->commit_time)
        return a->commit_time < b->commit_time ? -1 : 1;
    if (a->origin_node != b->origin_node)
        return a->origin_node < b->origin_node ? -1 : 1;
    return 0;
}

bool aamm_conflict_lww_remote_wins(const struct aamm_conflict_version *local,
                                   const struct aamm_conflict_version *remote)
{
    return aamm_conflict_version_compare(remote, local) > 0;
}

enum aamm_resolution aamm_conflict_decide(enum aamm_conflict_kind kind,
                                          enum aamm_conflict_policy policy,
                                          const struct aamm_conflict_version *local,
                                          const struct aamm_conflict_version *remote,
                                          bool remote_has_unchanged)
{
    static const struct aamm_conflict_version unknown = {false, 0, 0};
    if (!local)
        local = &unknown;
    switch (kind) {
    case AAMM_CONFLICT_UPDATE_ORIGIN_DIFFERS:
    case AAMM_CONFLICT_DELETE_ORIGIN_DIFFERS:
        /* a local row of unknown version, or last written by the remote's own node, is
         * no conflict: the change applies whatever the policy (aamm.decide) */
        if (!local->known || local->origin_node == remote->origin_node)
            return AAMM_RESOLVE_APPLY_REMOTE;
        /* fall through */
    case AAMM_CONFLICT_INSERT_EXISTS:
        switch (policy) {
        case AAMM_POLICY_KEEP_LOCAL:
            return AAMM_RESOLVE_KEEP_LOCAL;
        case AAMM_POLICY_APPLY_REMOTE:
            return AAMM_RESOLVE_APPLY_REMOTE;
        case AAMM_POLICY_LWW:
            return aamm_conflict_lww_remote_wins(local, remote) ? AAMM_RESOLVE_APPLY_REMOTE
                                                                : AAMM_RESOLVE_KEEP_LOCAL;
        default:
            return AAMM_RESOLVE_ERROR;
        }
    case AAMM_CONFLICT_UPDATE_MISSING:
        /* @local is the remembered delete of the key, if any */
        if (aamm_conflict_version_compare(local, remote) > 0)
            return AAMM_RESOLVE_SKIP;
        if (policy == AAMM_POLICY_ERROR)
            return AAMM_RESOLVE_ERROR;
        if (remote_has_unchanged || policy == AAMM_POLICY_KEEP_LOCAL)
            return AAMM_RESOLVE_SKIP;
        if (policy == AAMM_POLICY_CALLBACK)
            return AAMM_RESOLVE_ERROR; /* the resolver's to decide */
        return AAMM_RESOLVE_APPLY_REMOTE;
    case AAMM_CONFLICT_DELETE_MISSING:
        return AAMM_RESOLVE_SKIP;
    case AAMM_CONFLICT_TRUNCATE:
        return AAMM_RESOLVE_APPLY_REMOTE;
    case AAMM_CONFLICT_UNIQUE_OTHER:
    default:
        return AAMM_RESOLVE_ERROR;
    }
}

const char *aamm_conflict_kind_name(enum aamm_conflict_kind kind)
{
    if ((int)kind <= 0 || (int)kind >= AAMM_CONFLICT_NKINDS)
        return "unknown";
    return kind_names[kind];
}

int aamm_conflict_kind_parse(const char *name)
{
    for (int k = 1; name && k < AAMM_CONFLICT_NKINDS; k++)
        if (strcmp(kind_names[k], name) == 0)
            return k;
    return 0;
}

const char *aamm_conflict_resolution_name(enum aamm_resolution resolution)
{
    if ((int)resolution <= 0 || (size_t)resolution >= AAMM__ARRAY_SIZE(resolution_names))
        return "unknown";
    return resolution_names[resolution];
}

int aamm_conflict_resolution_parse(const char *name)
{
    for (size_t r = 1; name && r < AAMM__ARRAY_SIZE(resolution_names); r++)
        if (strcmp(resolution_names[r], name) == 0)
            return (int)r;
    return 0;
}

const char *aamm_conflict_policy_name(enum aamm_conflict_policy policy)
{
    if ((int)policy < 0 || (size_t)policy >= AAMM__ARRAY_SIZE(policy_names))
        return "unknown";
    return policy_names[policy];
}
