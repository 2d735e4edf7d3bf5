/* agentfx.c: a replicator agent in a forked process (agentfx.h). */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <aamm/consensus.h>
#include <aamm/replicator.h>

#include "agentfx.h"
#include "testutil.h"

#define SLOTS 16
static struct agentfx cfg[SLOTS]; /* the configuration a child reads after the fork */
static int next_slot;
static volatile int agent_stop;

static void on_term(int sig)
{
    (void)sig;
    agent_stop = 1;
}

void agentfx_options(const struct agentfx *a, struct aamm_replicator_options *o,
                     struct aamm_replicator_peer *peers, struct agentfx_ports *ports)
{
    aamm_replicator_options_init(o);
    o->node_id = a->node_id;
    o->conninfo = a->conninfo;
    o->apply_conninfo = a->apply_conninfo;
    o->cluster = "test";
    o->secret = (const uint8_t *)a->secret;
    o->secret_len = strlen(a->secret);
    snprintf(ports->listen, sizeof ports->listen, "%d", a->port);
    o->listen_host = "127.0.0.1";
    o->listen_port = ports->listen;
    o->reconnect_min_ms = 50;
    o->reconnect_max_ms = 500;
    o->heartbeat_ms = 200;
    o->dead_after_ms = 3000;
    o->status_interval_ms = 200;
    for (int k = 0; k < a->npeers; k++) {
        snprintf(ports->peer[k], sizeof ports->peer[k], "%d", a->peer_ports[k]);
        peers[k] =
            (struct aamm_replicator_peer){a->peer_ids[k], NULL, "127.0.0.1", ports->peer[k], NULL};
    }
    o->peers = peers;
    o->npeers = (uint32_t)a->npeers;
}

static void agent_main(int slot)
{
    const struct agentfx *a = &cfg[slot];
    struct aamm_replicator_options o;
    struct aamm_replicator_peer peers[AGENTFX_MAX_PEERS];
    struct agentfx_ports ports;
    char err[512];
    struct aamm_replicator *r;
    signal(SIGTERM, on_term);
    aamm_consensus_ignore_sigpipe();
    agentfx_options(a, &o, peers, &ports);
    if (aamm_replicator_new(&r, &o, err, sizeof err) != 0) {
        fprintf(stderr, "agent %u: %s\n", a->node_id, err);
        _exit(2);
    }
    if (aamm_replicator_start(r) != 0) {
        fprintf(stderr, "agent %u: start: %s\n", a->node_id, aamm_replicator_errmsg(r));
        _exit(3);
    }
    while (!agent_stop) {
        if (aamm_replicator_run(r, 1000, &agent_stop) != 0) {
            fprintf(stderr, "agent %u: %s\n", a->node_id, aamm_replicator_errmsg(r));
            _exit(4);
        }
    }
    aamm_replicator_stop(r, 2000);
    aamm_replicator_free(r);
    _exit(0);
}

pid_t agentfx_start(const struct agentfx *a)
{
    int slot = next_slot++ % SLOTS;
    cfg[slot] = *a;
    return aamm_test_spawn(agent_main, slot);
}
