-- examples/bikes/schema.sql: the bike-rental service's tables, the same on every city's
-- node. `bikes-agent setup` loads it (schema_file) after installing libaamm, because the
-- rentals key comes from libaamm's SQL snowflake generator: aamm.snowflake_nextval()
-- makes ids unique across the cluster from the node id setup stores (aamm_seq_install()),
-- with no coordination (doc/sequences.md). Every table has a primary key: conflicts are
-- detected and resolved per key (doc/conflicts.md). Idempotent: setup may run again.

CREATE TABLE IF NOT EXISTS stations (
  id     int PRIMARY KEY,
  name   text NOT NULL,
  city   text NOT NULL,
  docks  int NOT NULL CHECK (docks > 0)
);

CREATE TABLE IF NOT EXISTS bikes (
  id          int PRIMARY KEY,
  station_id  int REFERENCES stations,
  model       text NOT NULL,
  status      text NOT NULL DEFAULT 'available'
);

CREATE TABLE IF NOT EXISTS users (
  id    int PRIMARY KEY,
  name  text NOT NULL
);

CREATE TABLE IF NOT EXISTS rentals (
  id            bigint PRIMARY KEY DEFAULT aamm.snowflake_nextval('public.rentals'),
  bike_id       int NOT NULL REFERENCES bikes,
  user_id       int NOT NULL REFERENCES users,
  from_station  int NOT NULL REFERENCES stations,
  to_station    int REFERENCES stations,
  started_at    timestamptz NOT NULL DEFAULT now(),
  ended_at      timestamptz
);
