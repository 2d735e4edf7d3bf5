/*
 * aamm_recvlogical: like pg_recvlogical, but it understands pgoutput. Streams a logical
 * replication slot through libaamm's capture and prints one readable line per change:
 *
 *   BEGIN 0/1A2B3C8 xid 750 2026-11-23 09:31:30.123456+00
 *   INSERT public.rentals (id=1, bike_id=7, started_at=2026-11-23 09:31:30.1+00)
 *   COMMIT 0/1A2B4F0
 *
 * What it printed (and flushed) it confirms, so the slot moves on. Usage:
 *   aamm_recvlogical -d CONNINFO -S SLOT -P PUBLICATION [-P ...] [-n TXNS] [-t IDLE_S]
 *                    [-s START_LSN] [-q]
 * -n: exit after that many transactions; -t: exit after that many seconds without an
 * event; -s: the start position (default 0: the slot's, creating the slot if missing);
 * -q: print nothing, only count (for benchmarks).
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <aamm/capture.h>

static volatile sig_atomic_t stop;

static void on_signal(int sig)
{
    (void)sig;
    stop = 1;
}

static void usage(void)
{
    fprintf(stderr, "usage: aamm_recvlogical -d CONNINFO -S SLOT -P PUBLICATION [-P ...] "
                    "[-n TXNS] [-t IDLE_SECONDS] [-s START_LSN] [-q]\n");
    exit(2);
}

static void print_value(const struct aamm_value *v)
{
    switch (v->kind) {
    case AAMM_VALUE_NULL:
        fputs("NULL", stdout);
        break;
    case AAMM_VALUE_UNCHANGED:
        fputs("<unchanged toast>", stdout);
        break;
    case AAMM_VALUE_TEXT:
        if (v->len > 60)
            printf("%.57s... (%u bytes)", v->data, v->len);
        else
            fputs(v->data, stdout);
        break;
    }
}

/* "(a=1, b=x)"; with @key_only only the key columns. */
static void print_tuple(const struct aamm_relation *rel, const struct aamm_tuple *t, int key_only)
{
    int first = 1;
    putchar('(');
    for (uint32_t i = 0; i < t->nvalues && i < rel->ncolumns; i++) {
        if (key_only && !(rel->columns[i].flags & AAMM_COLUMN_KEY))
            continue;
        printf("%s%s=", first ? "" : ", ", rel->columns[i].name);
        print_value(&t->values[i]);
        first = 0;
    }
    putchar(')');
}

static void print_change(const struct aamm_change *ch)
{
    const struct aamm_relation *r = ch->relation;
    switch (ch->kind) {
    case AAMM_CHANGE_INSERT:
        printf("INSERT %s.%s ", r->schema, r->name);
        print_tuple(r, &ch->new_tuple, 0);
        break;
    case AAMM_CHANGE_UPDATE:
        printf("UPDATE %s.%s ", r->schema, r->name);
        print_tuple(r, &ch->new_tuple, 0);
        if (ch->old_kind != AAMM_OLD_NONE) {
            fputs(ch->old_kind == AAMM_OLD_KEY ? " key was " : " old row ", stdout);
            print_tuple(r, &ch->old_tuple, ch->old_kind == AAMM_OLD_KEY);
        }
        break;
    case AAMM_CHANGE_DELETE:
        printf("DELETE %s.%s ", r->schema, r->name);
        print_tuple(r, &ch->old_tuple, ch->old_kind == AAMM_OLD_KEY);
        break;
    case AAMM_CHANGE_TRUNCATE:
        fputs("TRUNCATE", stdout);
        for (uint32_t i = 0; i < ch->nrelations; i++)
            printf("%s%s.%s", i ? ", " : " ", ch->relations[i]->schema, ch->relations[i]->name);
        if (ch->truncate_flags & AAMM_TRUNCATE_CASCADE)
            fputs(" CASCADE", stdout);
        if (ch->truncate_flags & AAMM_TRUNCATE_RESTART_IDENTITY)
            fputs(" RESTART IDENTITY", stdout);
        break;
    case AAMM_CHANGE_MESSAGE:
        printf("MESSAGE %s %s '%.*s'", ch->transactional ? "transactional" : "non-transactional",
               ch->prefix, (int)(ch->content_len > 200 ? 200 : ch->content_len), ch->content);
        break;
    }
    putchar('\n');
}

int main(int argc, char **argv)
{
    const char *pubs[16];
    struct aamm_capture_options o;
    struct aamm_capture *c;
    struct aamm_capture_event ev;
    struct aamm_capture_stats st;
    long max_txns = -1, txns = 0, changes = 0;
    int idle_s = -1, quiet = 0, opt, rc;
    char err[256];
    char lsn[AAMM_LSN_BUFSIZE], ts[64];

    memset(&o, 0, sizeof o);
    o.publications = pubs;
    while ((opt = getopt(argc, argv, "d:S:P:n:t:s:q")) != -1) {
        switch (opt) {
        case 'd':
            o.conninfo = optarg;
            break;
        case 'S':
            o.slot = optarg;
            break;
        case 'P':
            if (o.npublications == 16)
                usage();
            pubs[o.npublications++] = optarg;
            break;
        case 'n':
            max_txns = atol(optarg);
            break;
        case 't':
            idle_s = atoi(optarg);
            break;
        case 's':
            if (aamm_lsn_parse(optarg, &o.start_lsn) != 0)
                usage();
            break;
        case 'q':
            quiet = 1;
            break;
        default:
            usage();
        }
    }
    if (o.conninfo == NULL || o.slot == NULL || o.npublications == 0)
        usage();
    o.node_id = 1;
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);

    if (aamm_capture_new(&c, &o, err, sizeof err) != 0) {
        fprintf(stderr, "aamm_recvlogical: %s\n", err);
        return 2;
    }
    if ((rc = aamm_capture_open(c)) != 0) {
        fprintf(stderr, "aamm_recvlogical: %s (%s)\n", aamm_capture_errmsg(c), aamm_errname(rc));
        aamm_capture_free(c);
        return 1;
    }
    if (!quiet)
        fprintf(stderr, "aamm_recvlogical: streaming slot %s from %s\n", o.slot,
                aamm_lsn_format(aamm_capture_start_position(c), lsn));

    while (!stop && (max_txns < 0 || txns < max_txns)) {
        rc = aamm_capture_wait(c, &ev, idle_s < 0 ? 1000 : idle_s * 1000);
        if (rc < 0 && rc != AAMM_EAGAIN) {
            fprintf(stderr, "aamm_recvlogical: %s (%s)\n", aamm_capture_errmsg(c),
                    aamm_errname(rc));
            break;
        }
        if (rc == AAMM_EAGAIN) {
            if (idle_s >= 0)
                break;
            continue;
        }
        switch (ev.kind) {
        case AAMM_CAPTURE_BEGIN:
            if (!quiet)
                printf("BEGIN %s xid %u %s%s%s\n", aamm_lsn_format(ev.txn->commit_lsn, lsn),
                       ev.txn->xid, aamm_time_format(ev.txn->commit_time, ts, sizeof ts),
                       ev.txn->origin_name ? " origin " : "",
                       ev.txn->origin_name ? ev.txn->origin_name : "");
            break;
        case AAMM_CAPTURE_CHANGE:
            changes++;
            if (!quiet)
                print_change(ev.change);
            break;
        case AAMM_CAPTURE_COMMIT:
            txns++;
            if (!quiet) {
                printf("COMMIT %s\n", aamm_lsn_format(ev.lsn, lsn));
                fflush(stdout);
            }
            /* Printed and flushed: that is this program's "durably applied". */
            aamm_capture_confirm(c, ev.lsn);
            break;
        case AAMM_CAPTURE_PROGRESS:
            aamm_capture_confirm(c, ev.lsn);
            break;
        case AAMM_CAPTURE_RELATION:
            break;
        }
    }
    fflush(stdout);
    /* Let the last confirmation reach the server before closing. */
    aamm_capture_send_status(c);
    aamm_capture_stats(c, &st);
    fprintf(stderr, "aamm_recvlogical: %ld transactions, %ld changes, %llu bytes, confirmed %s\n",
            txns, changes, (unsigned long long)st.bytes_received,
            aamm_lsn_format(aamm_capture_confirmed(c), lsn));
    aamm_capture_free(c);
    return rc < 0 && rc != AAMM_EAGAIN ? 1 : 0;
}
