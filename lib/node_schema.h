/* node_schema.h: libaamm's SQL schema as versioned scripts (sql/aamm--*.sql, embedded at
 * build time by sql/sql2c.awk into sql_scripts.c) and the one installer that runs them. */
#ifndef AAMM_NODE_SCHEMA_H
#define AAMM_NODE_SCHEMA_H

#include <stddef.h>

#include <libpq-fe.h>

/* One script: it takes the schema from version @from (0: no schema) to @to. */
struct aamm__sql_script {
    int from;
    int to;
    const char *name; /* its file name in sql/ */
    const char *text;
};

/* Every script, in the order the build listed them (generated). */
extern const struct aamm__sql_script aamm__sql_scripts[];
extern const size_t aamm__sql_nscripts;

/* The highest version the scripts reach. */
int aamm__schema_known(void);

/* The schema version installed on @conn's node (0: none) into *@version. 0, AAMM_ECONN or
 * AAMM_ESERVER (message into @err, prefixed with @what). */
int aamm__schema_version(PGconn *conn, int *version, const char *what, char *err,
                         size_t errsize);

/*
 * Install or upgrade the schema on @conn's node to version @upto (<= 0: the highest
 * known), in one transaction under the installer's lock (sql_contract.h):
 *   1. read the installed version (aamm.apply_meta; none: 0); refuse one newer than this
 *      library knows (AAMM_EUNSUPPORTED: "this node's schema is version N; this library
 *      knows up to M: upgrade the library");
 *   2. run the scripts from it to @upto in order (0 -> 1 is aamm--1.sql), recording the
 *      version reached; nothing when it is there already (or past @upto);
 *   3. run @then_sql (may be NULL: the caller's node-local setup, in the same
 *      transaction);
 *   4. commit. On any failure roll back: the node keeps the version it had.
 * @what prefixes messages ("node: install"). Returns 0, AAMM_EUNSUPPORTED, AAMM_EINVAL
 * (no script path to @upto), AAMM_ESERVER or AAMM_ECONN.
 */
int aamm__schema_install(PGconn *conn, int upto, const char *then_sql, const char *what,
                         char *err, size_t errsize);

#endif /* AAMM_NODE_SCHEMA_H */
