/* replicator_int.h: what lib/ddl.c needs of the replicator beyond its public header. */
#ifndef AAMM_REPLICATOR_INT_H
#define AAMM_REPLICATOR_INT_H

#include <stdbool.h>
#include <stddef.h>

#include <aamm/replicator.h>

/* Prefix of the marker messages aamm_ddl_execute() commits to learn when every peer has
 * applied a transaction of this node (the message's content is a token). */
#define AAMM__MARKER_PREFIX "aamm_marker"

/* Whether every peer acknowledged the transaction that carried the marker @token (sent on
 * its outgoing stream). When not, the first peer still missing it is named in @who. */
bool aamm__replicator_marker_acked(const struct aamm_replicator *r, const char *token, char *who,
                                   size_t whosize);

#endif
