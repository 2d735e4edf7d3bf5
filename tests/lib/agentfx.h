/*
 * agentfx.h: a replicator agent in a forked process, as a host runs one: one node's
 * replicator (public API only) with its peers on 127.0.0.1, stepped until SIGTERM. Test
 * settings: short reconnect backoff, heartbeats and status intervals.
 */
#ifndef AAMM_AGENTFX_H
#define AAMM_AGENTFX_H

#include <stdint.h>
#include <sys/types.h>

#define AGENTFX_MAX_PEERS 8

struct agentfx {
    uint32_t node_id;
    char conninfo[512];       /* the node, admin */
    char apply_conninfo[512]; /* the node, as the apply role */
    int port;                 /* where this agent listens (127.0.0.1) */
    const char *secret;       /* the cluster's shared secret (borrowed: a string literal) */
    int npeers;
    uint32_t peer_ids[AGENTFX_MAX_PEERS];
    int peer_ports[AGENTFX_MAX_PEERS];
};

/* Where agentfx_options() keeps the port strings it points the options at. */
struct agentfx_ports {
    char listen[16];
    char peer[AGENTFX_MAX_PEERS][16];
};

struct aamm_replicator_options;
struct aamm_replicator_peer;

/* Fill @o (initialized here) and @peers (AGENTFX_MAX_PEERS entries) with @a's replicator
 * settings, the test settings included, as the forked agent runs them; the strings stay
 * @a's and @ports' (borrowed: keep all three while @o is used). For a test that runs its
 * own agent loop. */
void agentfx_options(const struct agentfx *a, struct aamm_replicator_options *o,
                     struct aamm_replicator_peer *peers, struct agentfx_ports *ports);

/* Fork an agent running @a (copied); it exits 0 after SIGTERM (its replicator stopped),
 * 2..4 when the replicator fails (the reason on stderr). Dies with the test process.
 * Returns its pid (stop it with aamm_test_stop()). */
pid_t agentfx_start(const struct agentfx *a);

#endif
