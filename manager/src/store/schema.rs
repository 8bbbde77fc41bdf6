//! Versioned schema migrations, the same steps for both databases, each in
//! its dialect. Every store records the versions it has in
//! `schema_migrations`; at startup the missing ones run in order, each in
//! its own transaction with its record. A store with a version this manager
//! does not know was written by a newer manager, and is refused.

/// One step of the schema.
#[derive(Debug)]
pub struct Migration {
    /// 1, 2, …: the order they run in.
    pub version: i64,
    /// What it does.
    pub name: &'static str,
    /// Its SQL for SQLite.
    pub sqlite: &'static str,
    /// Its SQL for PostgreSQL.
    pub postgres: &'static str,
}

/// Every migration, oldest first. Append; never change a released one.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "tasks and proplets",
    sqlite: include_str!("migrations/sqlite/0001_tasks_and_proplets.sql"),
    postgres: include_str!("migrations/postgres/0001_tasks_and_proplets.sql"),
}];

/// The bookkeeping table, created before any migration runs.
pub const BOOKKEEPING: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version BIGINT PRIMARY KEY,
    name TEXT NOT NULL,
    applied_ns BIGINT NOT NULL
)";

/// The newest version this manager knows.
pub fn latest() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// The migrations a store at `current` still needs, or why it cannot be
/// used.
pub fn pending(current: i64) -> Result<&'static [Migration], String> {
    if current > latest() {
        return Err(format!(
            "its schema is version {current}, written by a newer manager; this one knows versions up to {}: run the newer manager, or restore a backup",
            latest()
        ));
    }
    let done = MIGRATIONS
        .iter()
        .take_while(|m| m.version <= current)
        .count();
    Ok(&MIGRATIONS[done..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_run_in_order_once() {
        assert!(MIGRATIONS
            .windows(2)
            .all(|w| w[0].version + 1 == w[1].version));
        assert_eq!(MIGRATIONS[0].version, 1);
        assert_eq!(pending(0).unwrap().len(), MIGRATIONS.len());
        assert!(pending(latest()).unwrap().is_empty());
        assert!(pending(latest() + 1).unwrap_err().contains("newer manager"));
    }
}
