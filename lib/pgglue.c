/* pgglue.c: libpq glue for the blocking SQL-side calls (node, seq). */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "pgglue.h"

int aamm__pg_seterr(char *err, size_t errsize, int code, const char *fmt, ...)
{
    if (err && errsize) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errsize, fmt, ap);
        va_end(ap);
        size_t n = strlen(err);
        while (n && (err[n - 1] == '\n' || err[n - 1] == ' ')) /* libpq's trailing newline */
            err[--n] = '\0';
    }
    return code;
}

int aamm__pg_fail(PGconn *conn, const char *what, char *err, size_t errsize)
{
    bool up = conn && PQstatus(conn) == CONNECTION_OK;
    return aamm__pg_seterr(err, errsize, up ? AAMM_ESERVER : AAMM_ECONN, "%s: %s", what,
                           conn ? PQerrorMessage(conn) : "no connection");
}

int aamm__pg_run(PGconn *conn, const char *what, const char *sql, char *err, size_t errsize)
{
    if (!conn || PQstatus(conn) != CONNECTION_OK)
        return aamm__pg_seterr(err, errsize, AAMM_ECONN, "%s: not connected", what);
    PGresult *res = PQexec(conn, sql);
    int st = PQresultStatus(res);
    PQclear(res);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
        return aamm__pg_fail(conn, what, err, errsize);
    return 0;
}

void aamm__pg_rollback(PGconn *conn)
{
    if (conn && PQstatus(conn) == CONNECTION_OK && PQtransactionStatus(conn) != PQTRANS_IDLE)
        PQclear(PQexec(conn, "ROLLBACK"));
}

/* libpq's quoted text copied into our allocator's memory */
static char *own(char *q)
{
    if (!q)
        return NULL;
    char *s = aamm__strdup(q);
    PQfreemem(q);
    return s;
}

char *aamm__pg_ident(PGconn *conn, const char *s)
{
    return own(PQescapeIdentifier(conn, s, strlen(s)));
}

char *aamm__pg_literal(PGconn *conn, const char *s)
{
    return own(PQescapeLiteral(conn, s, strlen(s)));
}
