/* pgglue.h: libpq glue for the blocking SQL-side calls (node, seq): error messages with
 * context, running a statement, quoting through libpq. */
#ifndef AAMM_PGGLUE_H
#define AAMM_PGGLUE_H

#include <stddef.h>

#include <libpq-fe.h>

#include "internal.h"

/* Write the message into @err (may be NULL) of @errsize bytes, without libpq's trailing
 * newline; returns @code. */
int aamm__pg_seterr(char *err, size_t errsize, int code, const char *fmt, ...)
    AAMM_PRINTF(4, 5);

/* A call on @conn failed: "@what: <libpq's message>" into @err; returns AAMM_ECONN when
 * the connection is gone, else AAMM_ESERVER. */
int aamm__pg_fail(PGconn *conn, const char *what, char *err, size_t errsize);

/* Run @sql (one or more statements) on @conn; 0, AAMM_ECONN (not connected or lost) or
 * AAMM_ESERVER, the message prefixed with @what. */
int aamm__pg_run(PGconn *conn, const char *what, const char *sql, char *err, size_t errsize);

/* ROLLBACK when @conn is inside a transaction (no WARNING from a needless one). */
void aamm__pg_rollback(PGconn *conn);

/* @s quoted as an identifier / a literal by libpq (it knows the connection's encoding and
 * standard_conforming_strings), in memory from aamm__malloc (aamm__free it); NULL when
 * out of memory or @s cannot be quoted. */
char *aamm__pg_ident(PGconn *conn, const char *s);
char *aamm__pg_literal(PGconn *conn, const char *s);

#endif /* AAMM_PGGLUE_H */
