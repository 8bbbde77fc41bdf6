//! The manager's store: tasks, announced proplets (with their last
//! heartbeats) and their latest metrics, kept across restarts.
//!
//! The manager's [`State`](crate::domain::State) stays the working set: the
//! API reads it, and every change is made there first. Each change marks the
//! task or proplet it touched; the [writer](writer::run) takes every marked
//! record at once and writes them in one transaction (so changes made while
//! a write runs go together into the next one). An API request that changes
//! something waits until the write that holds its change is committed, so
//! whatever the API acknowledged is in the store. At startup the store is
//! read back into the state.
//!
//! [`Repository`] is the interface; [`Store`] picks one of its three
//! implementations from `MANAGER_STORAGE_TYPE`: [`Memory`] (nothing kept),
//! [`Sqlite`] (the default, one file), [`Postgres`] (one database, several
//! managers of which one is active).

mod config;
mod memory;
mod postgres;
mod postgres_tls;
mod records;
mod schema;
mod sqlite;
pub mod writer;

use std::future::Future;
use std::sync::Arc;

use propeller_mqtt::env::Settings;
use propeller_mqtt::ConfigError;

pub use config::{PostgresConfig, StoreConfig};
pub use memory::Memory;
pub use postgres::Postgres;
pub use sqlite::Sqlite;
pub use writer::{Handle, StoreState};

use crate::registry::StoredProplet;
use crate::tasks::Task;

/// Everything a store holds, as read at startup.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every task.
    pub tasks: Vec<Task>,
    /// Every announced proplet.
    pub proplets: Vec<StoredProplet>,
}

/// The records changed since the last write: the latest version of each,
/// or `None` for one deleted.
#[derive(Debug, Default)]
pub struct Batch {
    /// Task id, whether the module changed too, and the task.
    pub tasks: Vec<(String, bool, Option<Task>)>,
    /// Proplet id and the proplet.
    pub proplets: Vec<(String, Option<StoredProplet>)>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty() && self.proplets.is_empty()
    }
}

/// What [`Repository::open`] found.
#[derive(Debug)]
pub enum Opened {
    /// The store is this manager's again, as it left it: the state in
    /// memory is still right, and its pending changes can be written.
    Continue,
    /// The store is this manager's, and this is what it holds: the state
    /// in memory must be replaced by it.
    Loaded(Snapshot),
}

/// Why the store cannot be used now. Both are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// Unreachable, refused, or failed; the cause, never a password.
    Unavailable(String),
    /// Another manager holds the store; who, as far as known.
    Taken(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unavailable(cause) => f.write_str(cause),
            Self::Taken(holder) => write!(f, "another manager holds the store ({holder})"),
        }
    }
}

/// Where the manager keeps tasks and proplets.
pub trait Repository: Send + 'static {
    /// Makes the store usable by this manager: connects, takes it (one
    /// manager at a time), migrates its schema, and reads it unless it is
    /// still as this manager left it.
    fn open(&mut self) -> impl Future<Output = Result<Opened, StoreError>> + Send;

    /// Writes `batch` in one transaction: all of it, or none.
    fn save(&mut self, batch: Arc<Batch>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Whether the store is still there (run when idle).
    fn check(&mut self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The store `MANAGER_STORAGE_TYPE` names.
pub enum Store {
    /// `memory`.
    Memory(Memory),
    /// `sqlite`, the default.
    Sqlite(Sqlite),
    /// `postgres`.
    Postgres(Box<Postgres>),
}

impl Store {
    /// Reads the store's variables and opens the store, when that can be
    /// done before the network: SQLite is opened, locked, migrated and read
    /// here, so that a bad file stops the manager at startup. PostgreSQL is
    /// only configured: the writer connects, and retries.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for a bad variable; [`ConfigError::Material`] naming
    /// `MANAGER_SQLITE_PATH` and the path for a file that cannot be opened,
    /// is corrupt, is locked by another manager, or has a newer schema; the
    /// same for PostgreSQL's TLS files (`MANAGER_POSTGRES_SSLROOTCERT`,
    /// `_SSLCERT`, `_SSLKEY`), read here.
    pub fn open(
        settings: &Settings,
        holder: &str,
    ) -> Result<(Store, Option<Snapshot>), ConfigError> {
        Ok(match StoreConfig::from_settings(settings)? {
            StoreConfig::Memory => (Store::Memory(Memory), Some(Snapshot::default())),
            StoreConfig::Sqlite { var, path } => {
                let (store, snapshot) = Sqlite::open(&var, &path)?;
                (Store::Sqlite(store), Some(snapshot))
            }
            StoreConfig::Postgres(config) => (
                Store::Postgres(Box::new(Postgres::new(*config, holder)?)),
                None,
            ),
        })
    }

    /// `memory`, `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// Where it is, for logs and `/health`: a path, or `host:port/database`.
    pub fn location(&self) -> String {
        match self {
            Self::Memory(_) => String::new(),
            Self::Sqlite(sqlite) => sqlite.path().display().to_string(),
            Self::Postgres(postgres) => postgres.location(),
        }
    }
}

impl Repository for Store {
    async fn open(&mut self) -> Result<Opened, StoreError> {
        match self {
            Self::Memory(store) => store.open().await,
            Self::Sqlite(store) => store.open().await,
            Self::Postgres(store) => store.open().await,
        }
    }

    async fn save(&mut self, batch: Arc<Batch>) -> Result<(), StoreError> {
        match self {
            Self::Memory(store) => store.save(batch).await,
            Self::Sqlite(store) => store.save(batch).await,
            Self::Postgres(store) => store.save(batch).await,
        }
    }

    async fn check(&mut self) -> Result<(), StoreError> {
        match self {
            Self::Memory(store) => store.check().await,
            Self::Sqlite(store) => store.check().await,
            Self::Postgres(store) => store.check().await,
        }
    }
}
