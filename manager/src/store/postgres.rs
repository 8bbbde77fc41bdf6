//! The shared store: a PostgreSQL database, for deployments that run
//! several managers or keep their state off the manager's machine.
//!
//! Several managers may point at one database; one of them is active. The
//! active one holds a session-level advisory lock on its one connection,
//! and writes on that same connection, so no write can come from a manager
//! that does not hold the lock. The others stand by: they retry the lock
//! every second, answer 503 for everything that needs the store, and take
//! over (reading the store) as soon as the active one's session ends. Each
//! change of holder bumps `store_owner.epoch`, so a manager that gets the
//! lock back after losing its connection knows whether anyone wrote in the
//! meantime, and reads the store again if so.
//!
//! The connection is TCP, with TLS as `MANAGER_POSTGRES_SSLMODE` says
//! (`postgres_tls.rs`), or the server's Unix socket, which has no TLS (as
//! libpq, sslmode does not apply there).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use propeller_mqtt::ConfigError;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Connection, NoTls, Statement};
use tracing::debug;

use super::config::{SslConfig, SslMode};
use super::postgres_tls::MakeRustls;
use super::records::{self, PropletRow, TaskRow, PROPLET_COLUMNS, TASK_COLUMNS};
use super::{schema, Batch, Opened, PostgresConfig, Repository, Snapshot, StoreError};
use crate::tasks::Task;

/// The advisory lock that makes a manager the active one ("propellr").
const LOCK: i64 = 0x7072_6f70_656c_6c72;
/// How long to wait for the server to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A PostgreSQL store, connected or not.
pub struct Postgres {
    config: tokio_postgres::Config,
    /// TLS, unless `disable` (or a Unix socket).
    tls: Option<MakeRustls>,
    /// How TLS was asked for, to explain refusals.
    ssl: SslConfig,
    location: String,
    /// Who this manager is, as other managers see it in `store_owner`.
    holder: String,
    /// The epoch of this manager's last hold on the store.
    epoch: Option<i64>,
    session: Option<Session>,
}

/// One connection, holding the lock, with its prepared statements.
struct Session {
    client: Client,
    upsert_task: Statement,
    update_task: Statement,
    delete_task: Statement,
    upsert_proplet: Statement,
    delete_proplet: Statement,
}

impl Postgres {
    /// A store on the server `config` names; nothing is connected yet,
    /// but the TLS files are read. `holder` names this manager to the
    /// others.
    ///
    /// # Errors
    ///
    /// A TLS file that cannot be read or used, naming its variable.
    pub fn new(config: PostgresConfig, holder: &str) -> Result<Self, ConfigError> {
        let mut ssl = config.ssl.clone();
        // As libpq: a Unix socket has no TLS, whatever sslmode says.
        if config.host.starts_with('/') {
            ssl.mode = SslMode::Disable;
        }
        let tls = MakeRustls::load(&ssl)?;
        let mut pg = tokio_postgres::Config::new();
        pg.host(&config.host)
            .port(config.port)
            .user(&config.user)
            .password(&config.password)
            .dbname(&config.database)
            .application_name("propeller-manager")
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .ssl_mode(match ssl.mode {
                SslMode::Disable => tokio_postgres::config::SslMode::Disable,
                SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                    tokio_postgres::config::SslMode::Require
                }
            });
        Ok(Self {
            config: pg,
            tls,
            ssl,
            location: format!("{}:{}/{}", config.host, config.port, config.database),
            holder: holder.to_owned(),
            epoch: None,
            session: None,
        })
    }

    /// `host:port/database`.
    pub fn location(&self) -> String {
        self.location.clone()
    }

    async fn connect(&self) -> Result<Client, StoreError> {
        let connected = match &self.tls {
            Some(tls) => self
                .config
                .connect(tls.clone())
                .await
                .map(|(client, connection)| (client, drive(connection))),
            None => self
                .config
                .connect(NoTls)
                .await
                .map(|(client, connection)| (client, drive(connection))),
        };
        connected
            .map(|(client, ())| client)
            .map_err(|error| refused(failed(error), &self.ssl))
    }

    /// Connects and takes the lock; then the schema, the epoch, and the
    /// store's content if another manager held it since.
    async fn take(&mut self) -> Result<Opened, StoreError> {
        let mut client = self.connect().await?;
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&LOCK])
            .await
            .map_err(failed)?
            .get(0);
        if !locked {
            let holder = client
                .query_opt("SELECT holder FROM store_owner WHERE id = 1", &[])
                .await
                .ok()
                .flatten()
                .map_or_else(|| "not named yet".to_owned(), |row| row.get(0));
            return Err(StoreError::Taken(holder));
        }
        migrate(&mut client).await?;
        let epoch: i64 = client
            .query_opt("SELECT epoch FROM store_owner WHERE id = 1", &[])
            .await
            .map_err(failed)?
            .map_or(0, |row| row.get(0));
        let opened = match self.epoch == Some(epoch) {
            true => Opened::Continue,
            false => {
                let epoch = epoch + 1;
                client
                    .execute(
                        "INSERT INTO store_owner (id, epoch, holder, since_ns) VALUES (1, $1, $2, $3) \
                         ON CONFLICT (id) DO UPDATE SET epoch = excluded.epoch, holder = excluded.holder, since_ns = excluded.since_ns",
                        &[&epoch, &self.holder, &now_ns()],
                    )
                    .await
                    .map_err(failed)?;
                let snapshot = load(&client).await?;
                self.epoch = Some(epoch);
                Opened::Loaded(snapshot)
            }
        };
        self.session = Some(Session::prepare(client).await?);
        Ok(opened)
    }
}

/// The cause of a failure, in the driver's words with the causes it
/// wraps (`error connecting to server: Connection refused`); they never
/// include the password.
fn failed(error: tokio_postgres::Error) -> StoreError {
    let mut line = error.to_string();
    let mut cause = std::error::Error::source(&error);
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = inner.source();
    }
    StoreError::Unavailable(line)
}

/// Runs a connection until it ends.
fn drive<S, T>(connection: Connection<S, T>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            debug!(%error, "PostgreSQL connection ended");
        }
    });
}

/// A connection refused for want of TLS on one side, with what to do.
fn refused(error: StoreError, ssl: &SslConfig) -> StoreError {
    let StoreError::Unavailable(line) = error else {
        return error;
    };
    let mode = format!("{}SSLMODE", ssl.prefix);
    let hint = if line.contains("server does not support TLS") {
        format!(
            "the server has TLS turned off (ssl = off), and {mode}={} requires it: turn ssl on in the server's postgresql.conf, or write {mode}=disable",
            ssl.mode.name()
        )
    } else if line.contains("no encryption") || line.contains("SSL off") {
        format!(
            "the server accepts this connection only over TLS (a hostssl line in pg_hba.conf), and {mode}={} does not use it: write {mode}=require or verify-full",
            ssl.mode.name()
        )
    } else {
        return StoreError::Unavailable(line);
    };
    StoreError::Unavailable(format!("{line}: {hint}"))
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    client
        .batch_execute(schema::BOOKKEEPING)
        .await
        .map_err(failed)?;
    let current: Option<i64> = client
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await
        .map_err(failed)?
        .get(0);
    let pending = schema::pending(current.unwrap_or(0)).map_err(StoreError::Unavailable)?;
    for migration in pending {
        let tx = client.transaction().await.map_err(failed)?;
        tx.batch_execute(migration.postgres).await.map_err(failed)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_ns) VALUES ($1, $2, $3)",
            &[&migration.version, &migration.name, &now_ns()],
        )
        .await
        .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
    }
    Ok(())
}

async fn load(client: &Client) -> Result<Snapshot, StoreError> {
    let tasks = client
        .query(&records::select("tasks", &TASK_COLUMNS), &[])
        .await
        .map_err(failed)?
        .into_iter()
        .map(|row| TaskRow {
            id: row.get(0),
            name: row.get(1),
            state: row.get(2),
            image_url: row.get(3),
            file: row.get::<_, Vec<u8>>(4).into(),
            cli_args: row.get(5),
            inputs: row.get(6),
            env: row.get(7),
            daemon: row.get(8),
            encrypted: row.get(9),
            broadcast: row.get(10),
            proplet_id: row.get(11),
            results: row.get(12),
            error: row.get(13),
            priority: row.get(14),
            metadata: row.get(15),
            start_ns: row.get(16),
            finish_ns: row.get(17),
            created_ns: row.get(18),
            updated_ns: row.get(19),
        })
        .collect();
    let proplets = client
        .query(&records::select("proplets", &PROPLET_COLUMNS), &[])
        .await
        .map_err(failed)?
        .into_iter()
        .map(|row| PropletRow {
            id: row.get(0),
            namespace: row.get(1),
            metadata: row.get(2),
            alive_history: row.get(3),
            metrics: row.get(4),
            offline: row.get(5),
        })
        .collect();
    super::sqlite::snapshot(tasks, proplets)
}

/// PostgreSQL's text cannot hold NUL, which a name or an error from the
/// channel may: it is stored as U+FFFD. (JSON columns escape it.)
fn text(s: &str) -> Cow<'_, str> {
    match s.contains('\0') {
        true => Cow::Owned(s.replace('\0', "\u{FFFD}")),
        false => Cow::Borrowed(s),
    }
}

impl Session {
    async fn prepare(client: Client) -> Result<Self, StoreError> {
        let placeholder = |n: usize| format!("${n}");
        let statement = |sql: String| {
            let client = &client;
            async move { client.prepare(&sql).await.map_err(failed) }
        };
        let upsert_task =
            statement(records::upsert("tasks", &TASK_COLUMNS, &[], placeholder)).await?;
        let update_task = statement(records::upsert(
            "tasks",
            &TASK_COLUMNS,
            &["file"],
            placeholder,
        ))
        .await?;
        let delete_task = statement("DELETE FROM tasks WHERE id = $1".to_owned()).await?;
        let upsert_proplet = statement(records::upsert(
            "proplets",
            &PROPLET_COLUMNS,
            &[],
            placeholder,
        ))
        .await?;
        let delete_proplet = statement("DELETE FROM proplets WHERE id = $1".to_owned()).await?;
        Ok(Self {
            client,
            upsert_task,
            update_task,
            delete_task,
            upsert_proplet,
            delete_proplet,
        })
    }

    /// Writes `batch` in one transaction, its statements pipelined: sent
    /// together, then their answers read in order.
    async fn write(&mut self, batch: &Batch) -> Result<(), tokio_postgres::Error> {
        let tasks: Vec<(bool, Option<PgTask>, Cow<'_, str>)> = batch
            .tasks
            .iter()
            .map(|(id, module, task)| (*module, task.as_ref().map(PgTask::from), text(id)))
            .collect();
        let proplets: Vec<(Option<PropletRow>, Cow<'_, str>)> = batch
            .proplets
            .iter()
            .map(|(id, proplet)| (proplet.as_ref().map(PropletRow::from), text(id)))
            .collect();
        let mut statements: Vec<(&Statement, Vec<&(dyn ToSql + Sync)>)> = Vec::new();
        for (module, task, id) in &tasks {
            statements.push(match task {
                Some(task) if *module => (&self.upsert_task, task.params()),
                Some(task) => (&self.update_task, task.params()),
                None => (&self.delete_task, vec![id]),
            });
        }
        for (proplet, id) in &proplets {
            statements.push(match proplet {
                Some(row) => (
                    &self.upsert_proplet,
                    vec![
                        id,
                        &row.namespace,
                        &row.metadata,
                        &row.alive_history,
                        &row.metrics,
                        &row.offline,
                    ],
                ),
                None => (&self.delete_proplet, vec![id]),
            });
        }
        let tx = self.client.transaction().await?;
        let sent = statements
            .iter()
            .map(|(statement, params)| tx.execute(*statement, params));
        futures_util::future::try_join_all(sent).await?;
        tx.commit().await
    }
}

/// A task's row with its text made storable; the module is not copied.
struct PgTask<'a> {
    row: TaskRow,
    name: String,
    image_url: String,
    proplet_id: String,
    error: String,
    file: &'a [u8],
}

impl<'a> From<&'a Task> for PgTask<'a> {
    fn from(task: &'a Task) -> Self {
        let row = TaskRow::from(task);
        Self {
            name: text(&row.name).into_owned(),
            image_url: text(&row.image_url).into_owned(),
            proplet_id: text(&row.proplet_id).into_owned(),
            error: text(&row.error).into_owned(),
            file: &task.file,
            row,
        }
    }
}

impl PgTask<'_> {
    /// The parameters of an upsert, in [`TASK_COLUMNS`]' order.
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let row = &self.row;
        vec![
            &row.id,
            &self.name,
            &row.state,
            &self.image_url,
            &self.file,
            &row.cli_args,
            &row.inputs,
            &row.env,
            &row.daemon,
            &row.encrypted,
            &row.broadcast,
            &self.proplet_id,
            &row.results,
            &self.error,
            &row.priority,
            &row.metadata,
            &row.start_ns,
            &row.finish_ns,
            &row.created_ns,
            &row.updated_ns,
        ]
    }
}

impl Repository for Postgres {
    async fn open(&mut self) -> Result<Opened, StoreError> {
        // A new session: the old one, if any, is dropped with its lock.
        self.session = None;
        self.take().await
    }

    async fn save(&mut self, batch: Arc<Batch>) -> Result<(), StoreError> {
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("not connected".to_owned()))?;
        let written = session.write(&batch).await;
        written.map_err(|error| {
            self.session = None;
            failed(error)
        })
    }

    async fn check(&mut self) -> Result<(), StoreError> {
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("not connected".to_owned()))?;
        if session.client.is_closed() {
            self.session = None;
            return Err(StoreError::Unavailable(
                "the connection was closed".to_owned(),
            ));
        }
        let checked = session.client.simple_query("SELECT 1").await;
        checked.map(drop).map_err(|error| {
            self.session = None;
            failed(error)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ssl(mode: SslMode) -> SslConfig {
        SslConfig::for_tests(mode)
    }

    #[test]
    fn refusals_for_want_of_tls_say_what_to_do() {
        let line = |cause: &str, mode| match refused(
            StoreError::Unavailable(cause.to_owned()),
            &ssl(mode),
        ) {
            StoreError::Unavailable(line) => line,
            other => panic!("{other:?}"),
        };
        let off = line(
            "error performing TLS handshake: server does not support TLS",
            SslMode::Require,
        );
        assert!(
            off.ends_with("MANAGER_POSTGRES_SSLMODE=require requires it: turn ssl on in the server's postgresql.conf, or write MANAGER_POSTGRES_SSLMODE=disable"),
            "{off}"
        );
        let only_tls = line(
            "db error: FATAL: no pg_hba.conf entry for host \"127.0.0.1\", user \"propeller\", database \"propeller\", no encryption",
            SslMode::Disable,
        );
        assert!(
            only_tls.contains("only over TLS")
                && only_tls.contains("MANAGER_POSTGRES_SSLMODE=disable does not use it"),
            "{only_tls}"
        );
        let other = line(
            "error connecting to server: Connection refused",
            SslMode::Disable,
        );
        assert_eq!(other, "error connecting to server: Connection refused");
        assert_eq!(
            refused(StoreError::Taken("m".into()), &ssl(SslMode::Disable)),
            StoreError::Taken("m".into())
        );
    }
}
