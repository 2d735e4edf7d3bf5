/*
 * bikes_config.h: bikes-agent's configuration file: `key = value` lines, `#` comments, one
 * `peer = ID NAME HOST:PORT [raft HOST:PORT]` line per peer. The keys and their meaning:
 * doc/man/bikes-agent.1 and examples/bikes/bikes.conf.sample.
 */
#ifndef BIKES_BIKES_CONFIG_H
#define BIKES_BIKES_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BIKES_MAX_PEERS 62
#define BIKES_MAX_LIST 64
#define BIKES_SECRET_MAX 4096

struct bikes_peer {
    uint32_t id;
    char *name;
    char *host;
    char *port;
    char *raft_address; /* "a.b.c.d:port" or NULL */
    char *conninfo;     /* peer_conninfo: an admin conninfo of its PostgreSQL node (join
                           only), or NULL */
    bool lost;          /* lost: gone for good; run declares it lost at every start
                           (aamm_replicator_peer_lost()) until it is parted */
    int line;           /* where the file names it, for messages */
};

/* Every string is heap memory owned by the config (bikes_config_free()). */
struct bikes_config {
    char *path; /* the file, as given */
    uint32_t node_id;
    char *node_name;
    char *conninfo;
    char *apply_conninfo;      /* NULL: conninfo */
    char *apply_password_file; /* NULL: none */
    char *listen_host;
    char *listen_port; /* NULL: accept no links */
    char *cluster;
    char *secret_file;
    int secret_line; /* line of secret_file, for messages */
    char *tls_ca, *tls_cert, *tls_key;
    char *raft_address, *raft_dir;
    bool bootstrap;
    char *schema_file; /* SQL run by setup before the tables are replicated, or NULL */
    bool ddl;          /* setup turns DDL replication (capture and apply) on; default off */
    char *table_owner; /* setup makes this role own the tables (ddl = on only), or NULL */
    char *sequences[BIKES_MAX_LIST];
    size_t nsequences;
    char *tables[BIKES_MAX_LIST];
    size_t ntables;
    int log_level;       /* AAMM_LOG_* */
    int status_interval; /* seconds, 0: no periodic status line */
    struct bikes_peer peers[BIKES_MAX_PEERS];
    size_t npeers;
};

/* What a command needs beyond the keys every command needs (node_id, conninfo). */
enum bikes_need { BIKES_NEED_SETUP, BIKES_NEED_RUN, BIKES_NEED_JOIN, BIKES_NEED_PART };

/*
 * Read @path into @cfg (zeroed first). A `peer_conninfo = ID CONNINFO` line and a
 * `lost = ID` line must follow the `peer` line of that ID. Relative paths in the file (secret_file,
 * schema_file, ...) are taken relative to the file's directory. Returns 0, or -1 with a
 * message "FILE:LINE: KEY: what is wrong" (or "FILE: ...") in @err.
 */
int bikes_config_load(struct bikes_config *cfg, const char *path, char *err, size_t errsize);

/* Check that the keys command @need requires are present and agree with each other (peer
 * ids, TLS files, consensus; for join, a peer_conninfo for every peer); -1 with a message
 * in @err. */
int bikes_config_check(const struct bikes_config *cfg, enum bikes_need need, char *err,
                       size_t errsize);

/*
 * Read a secret file (secret_file, apply_password_file): it must not be accessible by
 * group or others; one trailing newline is dropped. @buf gets at most @cap bytes, @len
 * their number. Returns 0, or -1 with a message in @err.
 */
int bikes_read_secret(const char *file, uint8_t *buf, size_t cap, size_t *len, char *err,
                      size_t errsize);

/* Free every string of @cfg and zero it. */
void bikes_config_free(struct bikes_config *cfg);

#endif /* BIKES_BIKES_CONFIG_H */
