-- Tasks, in upstream's fields; times are nanoseconds since the Unix epoch,
-- lists and maps JSON text (text, not jsonb: jsonb refuses \u0000, which a
-- task's inputs may hold).
CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state SMALLINT NOT NULL,
    image_url TEXT NOT NULL,
    file BYTEA NOT NULL,
    cli_args TEXT NOT NULL,
    inputs TEXT NOT NULL,
    env TEXT NOT NULL,
    daemon BOOLEAN NOT NULL,
    encrypted BOOLEAN NOT NULL,
    broadcast BOOLEAN NOT NULL,
    proplet_id TEXT NOT NULL,
    results TEXT NOT NULL,
    error TEXT NOT NULL,
    priority BIGINT NOT NULL,
    metadata TEXT NOT NULL,
    start_ns BIGINT,
    finish_ns BIGINT,
    created_ns BIGINT NOT NULL,
    updated_ns BIGINT NOT NULL
);
CREATE INDEX tasks_state ON tasks (state);
CREATE INDEX tasks_created ON tasks (created_ns);

-- Announced proplets: their announcement, last heartbeats (a JSON array of
-- at most 10 times) and latest metrics.
CREATE TABLE proplets (
    id TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    metadata TEXT NOT NULL,
    alive_history TEXT NOT NULL,
    metrics TEXT,
    offline BOOLEAN NOT NULL
);

-- The manager that holds the store (the one holding the advisory lock),
-- and a counter bumped at every change of holder: a manager that finds it
-- changed since it last held the store reads the store again.
CREATE TABLE store_owner (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL,
    holder TEXT NOT NULL,
    since_ns BIGINT NOT NULL
);
