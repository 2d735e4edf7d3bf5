/* sql_contract.h: the contract between libaamm's C code and the SQL it installs
 * (sql/aamm--*.sql): the functions apply calls, the SQLSTATEs the functions raise, the
 * notice apply listens for, the policy texts it passes, the installer's lock. The scripts
 * name this header where they define these; a change on one side is a change here.
 * Internal: no public header includes it. */
#ifndef AAMM_SQL_CONTRACT_H
#define AAMM_SQL_CONTRACT_H

/* ---- the installer ------------------------------------------------------------------ */

/* Advisory lock (two int4 keys: 'aamm' and 0) held by the schema installer and by
 * aamm_node_create_apply_role() for their transaction. The seq functions' own locks use
 * (AAMM_SQL_LOCK_SPACE, 1), (..., 2) and (..., hashtext(seqname)). */
#define AAMM_SQL_LOCK_SPACE "1633774957"
#define AAMM_SQL_INSTALL_LOCK "pg_catalog.pg_advisory_xact_lock(" AAMM_SQL_LOCK_SPACE ", 0)"

/* The table that records the installed schema version (one row, one int column). */
#define AAMM_SQL_VERSION_TABLE "aamm.apply_meta"

/* ---- the join freeze ------------------------------------------------------------------ */

/* Advisory lock (one int8 key: 'aamm' 'join' in ASCII) every applied transaction takes
 * SHARED first, in its guard, before it writes anything (lib/apply_pipe.c). aamm_node_join()
 * takes it EXCLUSIVE (session level) on the upstream node for the moment it reads the
 * origin progress and creates the slot whose snapshot the copy uses: no apply commit falls
 * between the two (doc/membership.md). */
#define AAMM_JOIN_FREEZE_KEY INT64_C(0x61616d6d6a6f696e)

/* ---- functions apply calls (argument lists in sql/aamm--*.sql) ---------------------- */

#define AAMM_SQL_FN_ORIGIN_SESSION "aamm.origin_session"   /* (origin) -> progress, roident */
#define AAMM_SQL_FN_GUARD_FAILED "aamm.guard_failed"       /* raises AA002 */
#define AAMM_SQL_FN_KEY_LOCK_BUSY "aamm.key_lock_busy"     /* raises AA005 */
#define AAMM_SQL_FN_DECIDE "aamm.decide"                   /* row present (v5: 10 args) */
#define AAMM_SQL_FN_INSERT_OK "aamm.insert_ok"             /* insert of an absent key */
#define AAMM_SQL_FN_UPDATE_MISSING "aamm.update_missing"   /* update of an absent key */
#define AAMM_SQL_FN_DELETE_MISSING "aamm.delete_missing"   /* delete of an absent key */
#define AAMM_SQL_FN_PUT_TOMBSTONE "aamm.put_tombstone"     /* remember a remote delete */
#define AAMM_SQL_FN_RECHECK_TOMBS "aamm.recheck_tombs"     /* raises AA006 */
#define AAMM_SQL_FN_WRITE_RACED "aamm.write_raced"         /* raises AA006 */
#define AAMM_SQL_FN_TOMB_FLAG "aamm.tomb_flag"             /* (label) -> its flag sequence */
#define AAMM_SQL_FN_APPLY_SLOW "aamm.apply_slow"           /* a change's slow statement */
#define AAMM_SQL_FN_LOG_CONFLICT "aamm.log_conflict"       /* logs, raises the notice */
#define AAMM_SQL_FN_LOG_TRUNCATE "aamm.log_truncate"
/* DDL in the stream (sql/aamm--3--4.sql, include/aamm/ddl.h): apply runs each transactional
 * message with this prefix through the function, at its place in the transaction */
#define AAMM_SQL_DDL_PREFIX "aamm_ddl"
#define AAMM_SQL_FN_APPLY_DDL "aamm.apply_ddl"
/* The SQL form of aamm_ddl_execute() (sql/aamm--5--6.sql): CALL aamm.ddl_execute() records
 * a request in this table and notifies the channel; aamm_ddl_serve() runs it. */
#define AAMM_SQL_DDL_REQUEST_TABLE "aamm.ddl_request"
#define AAMM_SQL_DDL_CHANNEL "aamm_ddl"
/* Set (SET LOCAL) by aamm_ddl_execute() for the DDL's transaction: under it the TRUNCATE
 * guard trigger (aamm.truncate_guard, on every replicated table) emits a TRUNCATE as a DDL
 * message instead of refusing it (AA007) */
#define AAMM_SQL_GUC_DDL_TOKEN "aamm.ddl_token"
#define AAMM_SQL_TRUNCATE_GUARD_FN "aamm.truncate_guard"
#define AAMM_SQL_TRUNCATE_GUARD "aamm_truncate_guard"
#define AAMM_SQL_FN_GC_TOMBSTONES "aamm.gc_tombstones"
#define AAMM_SQL_TOMBSTONE_TABLE "aamm.tombstone"
/* the apply session's node id (a custom setting aamm.node_of() reads for roident 0) */
#define AAMM_SQL_GUC_NODE_ID "aamm.node_id"

/* ---- SQLSTATEs (class AA is libaamm's) --------------------------------------------- */

#define AAMM_SQLSTATE_POLICY_ERROR "AA001" /* policy 'error' met a conflict: the stream stops */
#define AAMM_SQLSTATE_GUARD "AA002"        /* origin progress is not the previous end LSN */
#define AAMM_SQLSTATE_NOT_COMMITTED "AA003" /* client side only: a transaction's sync came
                                               back without its commit */
#define AAMM_SQLSTATE_RESOLVER "AA004"     /* policy 'callback': the host's resolver decides;
                                              detail: AAMM_SQL_SEP-separated fields kind,
                                              local xmin, local ts (us), local node, key,
                                              local row, remote row */
#define AAMM_SQLSTATE_KEY_LOCK_BUSY "AA005" /* a merged statement met a held key lock */
#define AAMM_SQLSTATE_RACED "AA006"         /* a concurrent local write: retry */
#define AAMM_SQLSTATE_DDL_REFUSED "AA007"   /* DDL (or a plain TRUNCATE) that is not replicated
                                               with capture on: the hint says what to do */
#define AAMM_SQLSTATE_DDL_REQUEST "AA008"   /* CALL aamm.ddl_execute(): the request failed
                                               (the agent's message) or was abandoned */

/* ---- the conflict notice ------------------------------------------------------------ */

/* aamm.log_conflict() raises NOTICE with this message; its detail holds AAMM_SQL_SEP-
 * separated fields: kind, key, local row, remote row, local ts (us), local node, remote ts
 * (us), remote node, resolution, relation (the relation last: it may hold anything). */
#define AAMM_SQL_NOTICE_CONFLICT "aamm_conflict"
/* From schema version 5 (sql/aamm--4--5.sql), aamm.decide() raises NOTICE with this message
 * instead, and logs nothing, for a decision that is counted but not logged (a remote
 * UPDATE/DELETE applied over another origin's row whose version its writer had seen, or
 * without an old row to tell): the same fields, the local and remote rows empty. */
#define AAMM_SQL_NOTICE_CONFLICT_UNLOGGED "aamm_conflict_unlogged"
#define AAMM_SQL_SEP '\x1f' /* chr(31): JSON text never holds it raw */
#define AAMM_SQL_NOTICE_CONFLICT_NFIELDS 10

/* ---- policy texts passed to the decision functions ---------------------------------- */

/* aamm_conflict_policy_name() of each policy ("lww", "keep_local", "apply_remote",
 * "error", "callback"), or "verdict:<resolution>:<local xmin or *>" for a resolver's
 * answer on the retry. */
#define AAMM_SQL_POLICY_VERDICT "verdict:"

#endif /* AAMM_SQL_CONTRACT_H */
