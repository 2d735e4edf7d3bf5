/* sqlbuf.c: the growable SQL text buffer and its quoting (see sqlbuf.h). */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>

#include "sqlbuf.h"

void aamm__sb_add(struct aamm__sb *b, const char *fmt, ...)
{
    if (b->oom)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->s ? b->s + b->len : NULL, b->s ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->oom = true;
            return;
        }
        if (b->s && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t nc = (b->cap ? b->cap * 2 : 256);
        while (nc < b->len + (size_t)n + 1)
            nc *= 2;
        char *p = aamm__realloc(b->s, nc);
        if (!p) {
            b->oom = true;
            return;
        }
        b->s = p;
        b->cap = nc;
    }
}

void aamm__sb_ident(struct aamm__sb *b, const char *id)
{
    aamm__sb_add(b, "\"");
    for (const char *c = id; *c; c++)
        aamm__sb_add(b, *c == '"' ? "\"\"" : "%c", *c);
    aamm__sb_add(b, "\"");
}

void aamm__sb_label(struct aamm__sb *b, const char *id)
{
    bool plain = (*id >= 'a' && *id <= 'z') || *id == '_';
    for (const char *c = id; *c && plain; c++)
        plain = (*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || *c == '_';
    if (plain)
        aamm__sb_add(b, "%s", id);
    else
        aamm__sb_ident(b, id);
}

void aamm__sb_literal(struct aamm__sb *b, const char *s)
{
    aamm__sb_add(b, "'");
    for (const char *c = s; *c; c++)
        aamm__sb_add(b, *c == '\'' ? "''" : "%c", *c);
    aamm__sb_add(b, "'");
}
