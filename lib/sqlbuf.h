/*
 * sqlbuf.h: a growable string for building SQL text, with the identifier and literal
 * quoting every statement builder uses. Pure: no libpq, no I/O; an allocation failure
 * sticks (oom) so a builder appends freely and checks once at the end.
 */
#ifndef AAMM_SQLBUF_H
#define AAMM_SQLBUF_H

#include <stdbool.h>
#include <stddef.h>

#include "internal.h"

/* Start zeroed ({0}); the text is s[0..len) and NUL-terminated once anything was appended
 * (s stays NULL until then). The caller frees s with aamm__free. */
struct aamm__sb {
    char *s;
    size_t len, cap;
    bool oom; /* an append failed: s holds a prefix of the text, the builder must give up */
    /* Free for the builder's own use; sqlbuf never reads it. apply: the statement text
     * takes its values from unnest() columns s.pN, not from $N. */
    bool batch;
};

/* Append printf output. */
void aamm__sb_add(struct aamm__sb *b, const char *fmt, ...) AAMM_PRINTF(2, 3);
/* Append @id as a quoted identifier, always quoted ("" doubles): the catalog spelling is
 * kept exactly, whatever its case or characters. */
void aamm__sb_ident(struct aamm__sb *b, const char *id);
/* Append one part of a relation's label (aamm.label_part() in lib/node.c builds the same
 * text): bare when a plain lower-case identifier ([a-z_][a-z0-9_]*), else quoted as by
 * aamm__sb_ident. */
void aamm__sb_label(struct aamm__sb *b, const char *id);
/* Append @s as a standard-conforming string literal ('' doubles; no E'' escapes). */
void aamm__sb_literal(struct aamm__sb *b, const char *s);

#endif /* AAMM_SQLBUF_H */
