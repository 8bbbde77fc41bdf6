-- Tasks, in upstream's fields; times are nanoseconds since the Unix epoch,
-- lists and maps JSON text.
CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    state INTEGER NOT NULL,
    image_url TEXT NOT NULL,
    file BLOB NOT NULL,
    cli_args TEXT NOT NULL,
    inputs TEXT NOT NULL,
    env TEXT NOT NULL,
    daemon INTEGER NOT NULL,
    encrypted INTEGER NOT NULL,
    broadcast INTEGER NOT NULL,
    proplet_id TEXT NOT NULL,
    results TEXT NOT NULL,
    error TEXT NOT NULL,
    priority INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    start_ns INTEGER,
    finish_ns INTEGER,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL
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
    offline INTEGER NOT NULL
);
