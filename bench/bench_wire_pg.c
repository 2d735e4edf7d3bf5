/*
 * bench_wire_pg.c: wire size versus the raw pgoutput bytes of the same stream, from a real
 * PostgreSQL 15 slot. A throwaway node gets a publication FOR ALL TABLES and a pgoutput slot;
 * then `pgbench -i -s 1` (the bulk-insert stream: 100,000 rows by COPY) and `pgbench -t N`
 * (the pgbench stream) run. The slot's messages are read with
 * pg_logical_slot_get_binary_changes(proto_version 1) — the same bytes pg_recvlogical -o
 * proto_version=1 writes, without its newline after each message — parsed with libaamm's
 * pgoutput parser (type names from the catalog, as capture does) and encoded with the wire
 * encoder. Prints BENCH <stream>_size_ratio (frames closed at 64 KiB, as a busy link sends
 * them) and <stream>_size_ratio_per_txn (one flush per transaction, as an idle link does).
 */
#include "config.h"

#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <aamm/wire.h>

#include "internal.h"
#include "pgfixture.h"
#include "pgoutput.h"

struct tally {
    size_t raw, msgs, txns;
    size_t wire_batched, wire_per_txn;
};

static int set_type_names(PGconn *c, struct aamm__pgo *pgo, const struct aamm_relation *rel)
{
    for (uint32_t i = 0; i < rel->ncolumns; i++) {
        char q[128];
        PGresult *r;
        snprintf(q, sizeof q, "SELECT format_type(%u, NULL)", rel->columns[i].type_oid);
        r = PQexec(c, q);
        if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1)
            aamm__pgo_set_type_name(pgo, rel->oid, i, PQgetvalue(r, 0, 0));
        PQclear(r);
    }
    return 0;
}

static size_t take(struct aamm_wire_encoder *enc)
{
    size_t n;
    aamm_wire_encoder_pending(enc, &n);
    aamm_wire_encoder_consume(enc, n);
    return n;
}

static int consume(PGconn *c, struct tally *t)
{
    struct aamm__pgo *pgo;
    struct aamm_wire_encoder *batched, *per_txn;
    struct aamm_transaction cur;
    struct aamm__err err;
    PGresult *r;
    memset(&cur, 0, sizeof cur);
    memset(&err, 0, sizeof err);
    r = PQexecParams(c,
                     "SELECT lsn::text, data FROM pg_logical_slot_get_binary_changes('s', NULL, "
                     "NULL, 'proto_version', '1', 'publication_names', 'p')",
                     0, NULL, NULL, NULL, NULL, 1);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        fprintf(stderr, "%s", PQerrorMessage(c));
        return -1;
    }
    aamm__pgo_new(&pgo);
    aamm_wire_encoder_new(&batched, NULL, NULL, 0);
    aamm_wire_encoder_new(&per_txn, NULL, NULL, 0);
    for (int i = 0; i < PQntuples(r); i++) {
        const uint8_t *data = (const uint8_t *)PQgetvalue(r, i, 1);
        size_t len = (size_t)PQgetlength(r, i, 1);
        struct aamm__pgo_event ev;
        int rc;
        memset(&ev, 0, sizeof ev);
        t->raw += len;
        t->msgs++;
        rc = aamm__pgo_parse(pgo, data, len, 0, &ev, &err);
        if (rc != 0) {
            fprintf(stderr, "pgoutput: %s\n", err.msg);
            return -1;
        }
        switch (ev.type) {
        case AAMM__PGO_BEGIN:
            cur = ev.txn;
            cur.origin_node = 1;
            cur.origin_name = NULL;
            aamm_wire_encode_begin(batched, &cur);
            aamm_wire_encode_begin(per_txn, &cur);
            break;
        case AAMM__PGO_RELATION:
            set_type_names(c, pgo, ev.relation);
            break;
        case AAMM__PGO_CHANGE:
            if (aamm_wire_encode_change(batched, &ev.change) != 0 ||
                aamm_wire_encode_change(per_txn, &ev.change) != 0) {
                fprintf(stderr, "wire: %s\n", aamm_wire_encoder_errmsg(batched));
                return -1;
            }
            break;
        case AAMM__PGO_COMMIT:
            cur.end_lsn = ev.txn.end_lsn;
            cur.commit_lsn = ev.txn.commit_lsn;
            cur.commit_time = ev.txn.commit_time;
            aamm_wire_encode_commit(batched, &cur);
            aamm_wire_encode_commit(per_txn, &cur);
            aamm_wire_encoder_flush(per_txn);
            t->wire_per_txn += take(per_txn);
            if (aamm_wire_encoder_buffered(batched) >= 64 * 1024)
                aamm_wire_encoder_flush(batched);
            t->wire_batched += take(batched);
            t->txns++;
            break;
        default:
            break;
        }
        aamm__pgo_event_clear(&ev);
    }
    aamm_wire_encoder_flush(batched);
    t->wire_batched += take(batched);
    PQclear(r);
    aamm_wire_encoder_free(batched);
    aamm_wire_encoder_free(per_txn);
    aamm__pgo_free(pgo);
    return 0;
}

static void report(const char *name, const struct tally *t)
{
    printf("BENCH wire_%s_size_ratio %.3f ratio\n", name, (double)t->wire_batched / (double)t->raw);
    printf("BENCH wire_%s_size_ratio_per_txn %.3f ratio\n", name,
           (double)t->wire_per_txn / (double)t->raw);
    fprintf(stderr,
            "%s: %zu transactions, %zu pgoutput messages, %zu pgoutput bytes (pg_recvlogical "
            "adds %zu newlines), wire %zu bytes batched, %zu bytes flushed per transaction\n",
            name, t->txns, t->msgs, t->raw, t->msgs, t->wire_batched, t->wire_per_txn);
}

int main(int argc, char **argv)
{
    const char *ntx = argc > 1 ? argv[1] : "5000";
    struct pgfx *fx = pgfx_start(1, NULL);
    struct tally bulk = {0}, bench = {0};
    char port[16];
    PGconn *c;
    int rc = 1;
    if (fx == NULL)
        return 1;
    snprintf(port, sizeof port, "%d", pgfx_port(fx, 0));
    c = pgfx_connect(fx, 0);
    if (c == NULL || pgfx_exec_conn(c, "CREATE PUBLICATION p FOR ALL TABLES") != 0 ||
        pgfx_exec_conn(c, "SELECT pg_create_logical_replication_slot('s', 'pgoutput')") != 0)
        goto out;
    {
        const char *init[] = {"pgbench",           "-i", "-s", "1",        "-q", "-h",
                              pgfx_sockdir(fx, 0), "-p", port, "postgres", NULL};
        if (pgfx_run(init, NULL) != 0 || consume(c, &bulk) != 0)
            goto out;
    }
    {
        const char *run[] = {"pgbench",           "-n", "-c", "1",        "-t", ntx, "-h",
                             pgfx_sockdir(fx, 0), "-p", port, "postgres", NULL};
        if (pgfx_run(run, NULL) != 0 || consume(c, &bench) != 0)
            goto out;
    }
    report("bulk", &bulk);
    report("pgbench", &bench);
    rc = 0;
out:
    if (c)
        PQfinish(c);
    pgfx_destroy(fx);
    return rc;
}
