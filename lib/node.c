/* node.c: node setup: apply's SQL objects in schema aamm (the versioned scripts of sql/,
 * installed by node_schema.c), the apply role, replicated tables, tombstone collection.
 * Blocking calls on a host-provided connection. */
#include "config.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>
#include <openssl/crypto.h>

#include <aamm/node.h>

#include "internal.h"
#include "node_schema.h"
#include "pgglue.h"
#include "sql_contract.h"

/* ====================================================================================
 * Public API
 * ==================================================================================== */

int aamm_node_install(struct pg_conn *conn, char *err, size_t errsize)
{
    return aamm__schema_install(conn, 0, NULL, "node: install", err, errsize);
}

/* Overwrite @s (libpq's or ours, NUL-terminated; NULL accepted): it held a password
 * verifier. */
static void wipe(char *s)
{
    if (s)
        OPENSSL_cleanse(s, strlen(s));
}

int aamm_node_create_apply_role(struct pg_conn *conn, const char *role, const char *password,
                                char *err, size_t errsize)
{
    if (!role || !*role)
        return aamm__pg_seterr(err, errsize, AAMM_EINVAL, "node: apply role: empty role name");
    if (!conn || PQstatus(conn) != CONNECTION_OK)
        return aamm__pg_seterr(err, errsize, AAMM_ECONN, "node: apply role: not connected");

    /* 1. the name quoted by libpq (it knows the connection's encoding); the password hashed
     *    here into a SCRAM verifier, as psql's \password does: the server never sees the
     *    password, so no statement it logs (log_min_error_statement, log_statement) holds
     *    it. The verifier is not the secret, but it is kept out of the log where it can
     *    be (a failing script is logged whole) and wiped after use. */
    char *qr = PQescapeIdentifier(conn, role, strlen(role));
    if (!qr)
        return aamm__pg_seterr(err, errsize, AAMM_EINVAL, "node: apply role: %s", PQerrorMessage(conn));
    char *verifier = NULL, *lv = NULL, *sql = NULL;
    int rc = 0;
    if (password) {
        verifier = PQencryptPasswordConn(conn, password, role, "scram-sha-256");
        if (verifier)
            lv = PQescapeLiteral(conn, verifier, strlen(verifier));
        if (!lv) {
            rc = aamm__pg_seterr(err, errsize, AAMM_ENOMEM, "node: apply role: password: %s",
                        PQerrorMessage(conn));
            goto out;
        }
    }

    /* 2. one transaction, serialized with install: does the role exist? (a bound
     *    parameter: no literal to quote) */
    rc = aamm__pg_run(conn, "node: apply role",
                      "BEGIN; SET LOCAL client_min_messages = warning; "
                      "SET LOCAL aamm.replicate_ddl = off; SELECT " AAMM_SQL_INSTALL_LOCK,
                      err, errsize);
    if (rc < 0)
        goto fail;
    const char *pv[1] = {role};
    PGresult *res = PQexecParams(conn, "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1", 1,
                                 NULL, pv, NULL, NULL, 0);
    bool exists = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
    if (PQresultStatus(res) != PGRES_TUPLES_OK)
        rc = aamm__pg_seterr(err, errsize, PQstatus(conn) == CONNECTION_OK ? AAMM_ESERVER : AAMM_ECONN,
                    "node: apply role: %s", PQerrorMessage(conn));
    PQclear(res);
    if (rc < 0)
        goto fail;

    /* 3. the attributes and exactly the grants apply needs (doc/security.md); what earlier
     *    versions granted beyond them is revoked, so that calling this again after an
     *    upgrade narrows an existing role */
    sql = aamm__asprintf(
        "%s%s%s"
        "ALTER ROLE %s LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION BYPASSRLS%s%s;\n"
        "GRANT SET ON PARAMETER session_replication_role TO %s;\n"
        "GRANT EXECUTE ON FUNCTION\n"
        "  pg_catalog.pg_replication_origin_xact_setup(pg_lsn, timestamptz),\n"
        "  pg_catalog.pg_replication_origin_xact_reset(),\n"
        "  pg_catalog.pg_replication_origin_progress(text, boolean) TO %s;\n"
        "REVOKE EXECUTE ON FUNCTION pg_catalog.pg_replication_origin_create(text),\n"
        "  pg_catalog.pg_replication_origin_oid(text),\n"
        "  pg_catalog.pg_replication_origin_session_setup(text),\n"
        "  pg_catalog.pg_replication_origin_session_reset() FROM %s;\n"
        "GRANT USAGE ON SCHEMA aamm TO %s;\n"
        "GRANT SELECT ON aamm.tombstone TO %s;\n"
        "REVOKE SELECT ON aamm.conflict_log FROM %s;\n"
        "GRANT EXECUTE ON FUNCTION aamm.origin_session(text),\n"
        "  aamm.log_conflict(text, text, jsonb, jsonb, jsonb, timestamptz, int, timestamptz,\n"
        "  int, text),\n"
        "  aamm.put_tombstone(text, jsonb, timestamptz, int),\n"
        "  aamm.ddl_log_entry(int, text, text[], text, text, text) TO %s;\n"
        "COMMIT;\n",
        exists ? "" : "CREATE ROLE ", exists ? "" : qr, exists ? "" : ";\n", qr,
        lv ? " PASSWORD " : "", lv ? lv : "", qr, qr, qr, qr, qr, qr, qr);
    if (!sql) {
        rc = aamm__pg_seterr(err, errsize, AAMM_ENOMEM, "node: apply role: out of memory");
        goto fail;
    }
    rc = aamm__pg_run(conn, "node: apply role", sql, err, errsize);
    if (rc == 0)
        goto out;
fail:
    aamm__pg_rollback(conn);
out:
    wipe(sql);
    aamm__free(sql);
    wipe(lv);
    PQfreemem(lv);
    wipe(verifier);
    PQfreemem(verifier);
    PQfreemem(qr);
    return rc;
}

int aamm_node_replicate_table(struct pg_conn *conn, const char *schema, const char *table,
                              const char *apply_role, const char *publication, char *err,
                              size_t errsize)
{
    if (!schema || !table || !*schema || !*table)
        return aamm__pg_seterr(err, errsize, AAMM_EINVAL, "node: replicate table: empty name");
    if (strcmp(schema, "aamm") == 0)
        return aamm__pg_seterr(err, errsize, AAMM_EINVAL,
                      "node: replicate table: schema aamm holds libaamm's own tables and is "
                      "never replicated");
    if (!conn || PQstatus(conn) != CONNECTION_OK)
        return aamm__pg_seterr(err, errsize, AAMM_ECONN, "node: replicate table: not connected");

    /* 1. the primary key columns, from the catalog */
    const char *params[2] = {schema, table};
    PGresult *res = PQexecParams(
        conn,
        "SELECT a.attname FROM pg_catalog.pg_class c\n"
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace\n"
        "JOIN pg_catalog.pg_index i ON i.indrelid = c.oid AND i.indisprimary\n"
        "JOIN LATERAL pg_catalog.unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true\n"
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum\n"
        "WHERE n.nspname = $1 AND c.relname = $2 ORDER BY k.ord",
        2, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        int rc = aamm__pg_seterr(err, errsize, AAMM_ESERVER, "node: replicate table %s.%s: %s", schema,
                        table, PQerrorMessage(conn));
        PQclear(res);
        return rc;
    }
    int nkeys = PQntuples(res);
    if (nkeys == 0) {
        PQclear(res);
        return aamm__pg_seterr(err, errsize, AAMM_ENOTFOUND,
                      "node: replicate table %s.%s: no such table or it has no primary key", schema,
                      table);
    }

    /* 2. build the statements */
    char *qs = aamm__pg_ident(conn, schema), *qt = aamm__pg_ident(conn, table);
    char *tname = aamm__asprintf("aamm_tombstone");
    size_t cap = 256;
    for (int i = 0; i < nkeys; i++)
        cap += 8 * strlen(PQgetvalue(res, i, 0)) + 64;
    char *args = aamm__calloc(1, cap), *when = aamm__calloc(1, cap);
    char *sql = NULL;
    int rc = AAMM_ENOMEM;
    if (qs && qt && tname && args && when) {
        for (int i = 0; i < nkeys; i++) {
            char *lit = aamm__pg_literal(conn, PQgetvalue(res, i, 0));
            char *id = aamm__pg_ident(conn, PQgetvalue(res, i, 0));
            if (!lit || !id) {
                aamm__free(lit);
                aamm__free(id);
                goto out;
            }
            size_t al = strlen(args), wl = strlen(when);
            snprintf(args + al, cap - al, "%s%s", i ? ", " : "", lit);
            snprintf(when + wl, cap - wl, "%sOLD.%s IS DISTINCT FROM NEW.%s", i ? " OR " : "", id,
                     id);
            aamm__free(lit);
            aamm__free(id);
        }
        char *qrole = apply_role ? aamm__pg_ident(conn, apply_role) : NULL;
        char *qpub = publication ? aamm__pg_ident(conn, publication) : NULL;
        char *lpub = publication ? aamm__pg_literal(conn, publication) : NULL;
        if ((apply_role && !qrole) || (publication && (!qpub || !lpub))) {
            aamm__free(qrole);
            aamm__free(qpub);
            aamm__free(lpub);
            goto out;
        }
        char *grant = qrole ? aamm__asprintf("GRANT SELECT, INSERT, UPDATE, DELETE, TRUNCATE ON "
                                             "%s.%s TO %s;\n",
                                             qs, qt, qrole)
                            : aamm__strdup("");
        char *pub = NULL;
        char *ls = aamm__pg_literal(conn, schema), *lt = aamm__pg_literal(conn, table);
        if (qpub && ls && lt)
            pub = aamm__asprintf(
                "DO $d$ BEGIN\n"
                "  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = %s)\n"
                "  THEN EXECUTE pg_catalog.format('CREATE PUBLICATION %%I', %s); END IF;\n"
                /* TRUNCATE travels only as DDL under the lock (ddl.h) */
                "  EXECUTE pg_catalog.format('ALTER PUBLICATION %%I SET (publish = "
                "''insert, update, delete'')', %s);\n"
                "  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables WHERE\n"
                "    pubname = %s AND schemaname = %s AND tablename = %s) THEN\n"
                "    EXECUTE pg_catalog.format('ALTER PUBLICATION %%I ADD TABLE %%I.%%I', %s, %s, "
                "%s);\n"
                "  END IF;\n"
                "END $d$;\n",
                lpub, lpub, lpub, lpub, ls, lt, lpub, ls, lt);
        else if (!qpub)
            pub = aamm__strdup("");
        aamm__free(ls);
        aamm__free(lt);
        aamm__free(qrole);
        aamm__free(qpub);
        aamm__free(lpub);
        if (!grant || !pub) {
            aamm__free(grant);
            aamm__free(pub);
            goto out;
        }
        sql =
            aamm__asprintf("BEGIN;\n"
                           "SET LOCAL client_min_messages = warning;\n"
                           "SET LOCAL aamm.replicate_ddl = off;\n"
                           "DROP TRIGGER IF EXISTS aamm_tombstone_del ON %s.%s;\n"
                           "DROP TRIGGER IF EXISTS aamm_tombstone_upd ON %s.%s;\n"
                           "DROP TRIGGER IF EXISTS " AAMM_SQL_TRUNCATE_GUARD " ON %s.%s;\n"
                           "CREATE TRIGGER aamm_tombstone_del AFTER DELETE ON %s.%s FOR EACH ROW\n"
                           "  EXECUTE FUNCTION aamm.tombstone_trigger(%s);\n"
                           "CREATE TRIGGER aamm_tombstone_upd AFTER UPDATE ON %s.%s FOR EACH ROW\n"
                           "  WHEN (%s) EXECUTE FUNCTION aamm.tombstone_trigger(%s);\n"
                           "CREATE TRIGGER " AAMM_SQL_TRUNCATE_GUARD " BEFORE TRUNCATE ON %s.%s\n"
                           "  FOR EACH STATEMENT EXECUTE FUNCTION " AAMM_SQL_TRUNCATE_GUARD_FN "();\n"
                           "ALTER TABLE %s.%s REPLICA IDENTITY FULL;\n"
                           "%s%s"
                           "COMMIT;\n",
                           qs, qt, qs, qt, qs, qt, qs, qt, args, qs, qt, when, args, qs, qt, qs,
                           qt, grant, pub);
        aamm__free(grant);
        aamm__free(pub);
        if (sql) {
            rc = aamm__pg_run(conn, "node: replicate table", sql, err, errsize);
            if (rc < 0)
                aamm__pg_rollback(conn);
        }
    }
out:
    if (rc == AAMM_ENOMEM)
        aamm__pg_seterr(err, errsize, rc, "node: replicate table: out of memory");
    PQclear(res);
    aamm__free(sql);
    aamm__free(qs);
    aamm__free(qt);
    aamm__free(tname);
    aamm__free(args);
    aamm__free(when);
    return rc;
}

int aamm_node_gc_tombstones(struct pg_conn *conn, int64_t before_us, uint64_t *removed, char *err,
                            size_t errsize)
{
    if (!conn || PQstatus(conn) != CONNECTION_OK)
        return aamm__pg_seterr(err, errsize, AAMM_ECONN, "node: gc tombstones: not connected");
    char ts[64];
    aamm_time_format(before_us, ts, sizeof ts);
    const char *params[1] = {ts};
    PGresult *res = PQexecParams(conn, "SELECT " AAMM_SQL_FN_GC_TOMBSTONES "($1::timestamptz)", 1, NULL,
                                 params, NULL, NULL, 0);
    int rc = 0;
    if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
        rc = aamm__pg_seterr(err, errsize, AAMM_ESERVER, "node: gc tombstones: %s", PQerrorMessage(conn));
    } else if (removed) {
        *removed = strtoull(PQgetvalue(res, 0, 0), NULL, 10);
    }
    PQclear(res);
    return rc;
}

int aamm_node_part(struct pg_conn *conn, uint32_t node_id, int *dropped, char *err, size_t errsize)
{
    char slot[32], origin[32], id[16];
    if (dropped)
        *dropped = 0;
    if (!aamm_node_id_valid(node_id))
        return aamm__pg_seterr(err, errsize, AAMM_EINVAL, "node: part: node id %" PRIu32
                               " is outside 1..%d", node_id, AAMM_NODE_ID_MAX);
    if (!conn || PQstatus(conn) != CONNECTION_OK)
        return aamm__pg_seterr(err, errsize, AAMM_ECONN, "node: part: not connected");
    snprintf(slot, sizeof slot, "aamm_to_%" PRIu32, node_id);
    snprintf(origin, sizeof origin, "aamm_from_%" PRIu32, node_id);
    snprintf(id, sizeof id, "%" PRIu32, node_id);
    int nsteps = 4;
    /* 1. the slot: end the walsender streaming it (a replicator still configured with the
     *    peer would make it again), wait for it to let go, drop it; 2. the status row; 3.
     *    the origin, when safe (above). One statement each, so a failure names its step. */
    const char *steps[][2] = {
        {"slot", "SELECT count(pg_catalog.pg_terminate_backend(active_pid, 5000)) FROM "
                 "pg_catalog.pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL"},
        {"slot", "SELECT count(pg_catalog.pg_drop_replication_slot(slot_name)) FROM "
                 "pg_catalog.pg_replication_slots WHERE slot_name = $1"},
        {"status", "DELETE FROM aamm.replicator_peer WHERE peer_id = $1::int"},
        {"origin", "SELECT count(pg_catalog.pg_replication_origin_drop(roname)) FROM "
                   "pg_catalog.pg_replication_origin WHERE roname = $1"},
    };
    /* the origin goes only once every other slot has confirmed past the last transaction
     * applied under it: until then capture recognizes those transactions by the origin
     * (an undecoded one under a dropped origin would look local and be sent on) */
    {
        const char *p[2] = {origin, slot};
        PGresult *res = PQexecParams(
            conn,
            "SELECT pg_catalog.string_agg(s.slot_name, ', ' ORDER BY s.slot_name) "
            "FROM pg_catalog.pg_replication_origin_status o, pg_catalog.pg_replication_slots s "
            "WHERE o.external_id = $1 AND s.slot_name LIKE 'aamm\\_to\\_%' AND s.slot_name <> $2 "
            "AND (s.confirmed_flush_lsn IS NULL OR s.confirmed_flush_lsn < o.local_lsn)",
            2, NULL, p, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_TUPLES_OK) {
            int rc = aamm__pg_seterr(err, errsize,
                                     PQstatus(conn) == CONNECTION_OK ? AAMM_ESERVER : AAMM_ECONN,
                                     "node: part %" PRIu32 ": %s", node_id, PQerrorMessage(conn));
            PQclear(res);
            return rc;
        }
        if (!PQgetisnull(res, 0, 0)) {
            /* the message now, AAMM_EAGAIN after the slot and the status row went */
            (void)aamm__pg_seterr(err, errsize, AAMM_EAGAIN,
                                  "node: part %" PRIu32 ": origin %s kept until slot(s) %s "
                                  "confirm past its last transaction (run the agents, then "
                                  "call again)",
                                  node_id, origin, PQgetvalue(res, 0, 0));
            nsteps = 3;
        }
        PQclear(res);
    }
    const char *params[4] = {slot, slot, id, origin};
    for (int i = 0; i < nsteps; i++) {
        const char *p[1] = {params[i]};
        PGresult *res = PQexecParams(conn, steps[i][1], 1, NULL, p, NULL, NULL, 0);
        ExecStatusType st = PQresultStatus(res);
        if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
            int rc = aamm__pg_seterr(err, errsize,
                                     PQstatus(conn) == CONNECTION_OK ? AAMM_ESERVER : AAMM_ECONN,
                                     "node: part %" PRIu32 ": %s: %s", node_id, steps[i][0],
                                     PQerrorMessage(conn));
            PQclear(res);
            return rc;
        }
        if (dropped && (i == 1 || i == 3))
            *dropped += atoi(PQgetvalue(res, 0, 0));
        PQclear(res);
    }
    return nsteps < 4 ? AAMM_EAGAIN : 0;
}
