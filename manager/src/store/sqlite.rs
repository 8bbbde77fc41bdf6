//! The embedded store: one SQLite file, the default.
//!
//! The file is opened before the runtime starts, so that every problem with
//! it stops the manager with one line naming `MANAGER_SQLITE_PATH` and the
//! path. The connection holds an exclusive lock on the file for the life of
//! the process (`locking_mode=EXCLUSIVE`): a second manager on the same file
//! cannot open it, and the lock goes with the process, however it ends. The
//! journal is a write-ahead log with `synchronous=FULL`, so a committed
//! write survives a crash of the process or of the machine. Writes run on a
//! blocking thread.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use propeller_mqtt::ConfigError;
use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};

use super::records::{self, PropletRow, TaskRow, PROPLET_COLUMNS, TASK_COLUMNS};
use super::{schema, Batch, Opened, Repository, Snapshot, StoreError};
use crate::registry::StoredProplet;
use crate::tasks::Task;

/// How long to wait for a lock another process holds before calling the
/// file taken.
const BUSY_TIMEOUT: Duration = Duration::from_secs(1);

/// An open SQLite store.
pub struct Sqlite {
    path: PathBuf,
    connection: Arc<Mutex<Connection>>,
}

impl Sqlite {
    /// Opens the file at `path` (created when missing), locks it for this
    /// process, checks it, migrates it, and reads everything in it.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Material`] naming `var` and `path`, saying whether the file
    /// cannot be opened, is corrupt, is locked by another manager, or has a
    /// newer schema.
    pub fn open(var: &str, path: &Path) -> Result<(Self, Snapshot), ConfigError> {
        let fail = |problem: String| ConfigError::Material {
            var: var.to_owned(),
            path: path.to_owned(),
            problem,
        };
        let mut connection = connect(path).map_err(|e| fail(problem(&e)))?;
        migrate(&mut connection)
            .map_err(|e| fail(problem(&e)))?
            .map_err(fail)?;
        let snapshot = load(&connection)
            .map_err(|e| fail(problem(&e)))?
            .map_err(|e| {
                fail(format!(
                    "{e}: restore it from a backup, or move it away to start with an empty store"
                ))
            })?;
        Ok((
            Self {
                path: path.to_owned(),
                connection: Arc::new(Mutex::new(connection)),
            },
            snapshot,
        ))
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What an operator can do about `error`, in words.
fn problem(error: &rusqlite::Error) -> String {
    match error.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => format!(
            "is in use by another manager ({error}): stop that manager, or give this one its own file"
        ),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => format!(
            "is not a SQLite database, or is corrupt ({error}): restore it from a backup, or move it away to start with an empty store"
        ),
        Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied | ErrorCode::ReadOnly) => format!(
            "cannot be opened for writing ({error}): check the path, the volume mount, and the permissions of the file and its directory"
        ),
        _ => format!("cannot be used as the manager's store: {error}"),
    }
}

/// Opens, locks and checks the file.
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    // No URI flag: the path is a path, whatever it looks like.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let connection = Connection::open_with_flags(path, flags)?;
    connection.busy_timeout(BUSY_TIMEOUT)?;
    let pragma = |sql: &str| connection.query_row(sql, [], |row| row.get::<_, String>(0));
    pragma("PRAGMA locking_mode = EXCLUSIVE")?;
    pragma("PRAGMA journal_mode = WAL")?;
    connection.execute_batch("PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;")?;
    // Takes the exclusive lock now, and keeps it: a second manager on this
    // file fails here.
    connection.execute_batch("BEGIN EXCLUSIVE; COMMIT;")?;
    let check = pragma("PRAGMA quick_check")?;
    if check != "ok" {
        // One line, and short: the first problems are enough to go on.
        let mut found: String = check.split_whitespace().collect::<Vec<_>>().join(" ");
        if let Some((cut, _)) = found.char_indices().nth(200) {
            found.truncate(cut);
            found.push('…');
        }
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
            Some(format!("quick_check: {found}")),
        ));
    }
    Ok(connection)
}

/// Runs the missing migrations; the inner error is a newer schema.
fn migrate(connection: &mut Connection) -> rusqlite::Result<Result<(), String>> {
    connection.execute_batch(schema::BOOKKEEPING)?;
    let current: i64 = connection
        .query_row("SELECT max(version) FROM schema_migrations", [], |row| {
            row.get::<_, Option<i64>>(0)
        })
        .optional()?
        .flatten()
        .unwrap_or(0);
    let pending = match schema::pending(current) {
        Ok(pending) => pending,
        Err(problem) => return Ok(Err(problem)),
    };
    for migration in pending {
        let tx = connection.transaction()?;
        tx.execute_batch(migration.sqlite)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_ns) VALUES (?1, ?2, ?3)",
            params![migration.version, migration.name, now_ns()],
        )?;
        tx.commit()?;
    }
    Ok(Ok(()))
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// Every task and proplet; the inner error is a row that does not read.
fn load(connection: &Connection) -> rusqlite::Result<Result<Snapshot, StoreError>> {
    let mut statement = connection.prepare(&records::select("tasks", &TASK_COLUMNS))?;
    let rows = statement.query_map([], |row| {
        Ok(TaskRow {
            id: row.get(0)?,
            name: row.get(1)?,
            state: row.get(2)?,
            image_url: row.get(3)?,
            file: row.get::<_, Vec<u8>>(4)?.into(),
            cli_args: row.get(5)?,
            inputs: row.get(6)?,
            env: row.get(7)?,
            daemon: row.get(8)?,
            encrypted: row.get(9)?,
            broadcast: row.get(10)?,
            proplet_id: row.get(11)?,
            results: row.get(12)?,
            error: row.get(13)?,
            priority: row.get(14)?,
            metadata: row.get(15)?,
            start_ns: row.get(16)?,
            finish_ns: row.get(17)?,
            created_ns: row.get(18)?,
            updated_ns: row.get(19)?,
        })
    })?;
    let task_rows = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    let mut statement = connection.prepare(&records::select("proplets", &PROPLET_COLUMNS))?;
    let rows = statement.query_map([], |row| {
        Ok(PropletRow {
            id: row.get(0)?,
            namespace: row.get(1)?,
            metadata: row.get(2)?,
            alive_history: row.get(3)?,
            metrics: row.get(4)?,
            offline: row.get(5)?,
        })
    })?;
    let proplet_rows = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(snapshot(task_rows, proplet_rows))
}

/// Rows to a [`Snapshot`]; shared with PostgreSQL.
pub(super) fn snapshot(
    tasks: Vec<TaskRow>,
    proplets: Vec<PropletRow>,
) -> Result<Snapshot, StoreError> {
    Ok(Snapshot {
        tasks: tasks
            .into_iter()
            .map(Task::try_from)
            .collect::<Result<_, _>>()?,
        proplets: proplets
            .into_iter()
            .map(StoredProplet::try_from)
            .collect::<Result<_, _>>()?,
    })
}

fn write(connection: &mut Connection, batch: &Batch) -> rusqlite::Result<()> {
    let placeholder = |n: usize| format!("?{n}");
    let tx = connection.transaction()?;
    for (id, module, task) in &batch.tasks {
        match task {
            Some(task) => {
                let keep: &[&str] = if *module { &[] } else { &["file"] };
                let sql = records::upsert("tasks", &TASK_COLUMNS, keep, placeholder);
                let row = TaskRow::from(task);
                tx.prepare_cached(&sql)?.execute(params![
                    row.id,
                    row.name,
                    row.state,
                    row.image_url,
                    &row.file[..],
                    row.cli_args,
                    row.inputs,
                    row.env,
                    row.daemon,
                    row.encrypted,
                    row.broadcast,
                    row.proplet_id,
                    row.results,
                    row.error,
                    row.priority,
                    row.metadata,
                    row.start_ns,
                    row.finish_ns,
                    row.created_ns,
                    row.updated_ns,
                ])?;
            }
            None => {
                tx.prepare_cached("DELETE FROM tasks WHERE id = ?1")?
                    .execute([id])?;
            }
        }
    }
    for (id, proplet) in &batch.proplets {
        match proplet {
            Some(proplet) => {
                let sql = records::upsert("proplets", &PROPLET_COLUMNS, &[], placeholder);
                let row = PropletRow::from(proplet);
                tx.prepare_cached(&sql)?.execute(params![
                    row.id,
                    row.namespace,
                    row.metadata,
                    row.alive_history,
                    row.metrics,
                    row.offline,
                ])?;
            }
            None => {
                tx.prepare_cached("DELETE FROM proplets WHERE id = ?1")?
                    .execute([id])?;
            }
        }
    }
    tx.commit()
}

impl Repository for Sqlite {
    /// Opened and read before the runtime started, and locked since.
    async fn open(&mut self) -> Result<Opened, StoreError> {
        Ok(Opened::Continue)
    }

    async fn save(&mut self, batch: Arc<Batch>) -> Result<(), StoreError> {
        let connection = self.connection.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = connection.lock().unwrap_or_else(|e| e.into_inner());
            write(&mut connection, &batch).map_err(|e| {
                StoreError::Unavailable(format!("cannot write to {}: {e}", path.display()))
            })
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Unavailable(format!("the write stopped: {e}"))))
    }

    /// The file is held open and locked: nothing to check.
    async fn check(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::TaskState;
    use bytes::Bytes;

    fn task(id: &str, state: TaskState) -> Task {
        Task {
            id: id.into(),
            name: "add".into(),
            kind: "standard",
            state,
            image_url: String::new(),
            file: Bytes::from_static(b"\0asm\x01\0\0\0"),
            cli_args: vec![],
            inputs: vec!["3".into(), "4".into()],
            env: Default::default(),
            daemon: false,
            encrypted: false,
            proplet_id: "p".into(),
            results: serde_json::Value::Null,
            error: String::new(),
            start_time: None,
            finish_time: None,
            created_at: Some(SystemTime::now()),
            updated_at: Some(SystemTime::now()),
            broadcast: false,
            priority: 0,
            metadata: Default::default(),
        }
    }

    fn open(path: &Path) -> Result<(Sqlite, Snapshot), String> {
        Sqlite::open("MANAGER_SQLITE_PATH", path).map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn what_is_saved_is_read_back_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let (mut store, snapshot) = open(&path).unwrap();
        assert!(snapshot.tasks.is_empty());
        let mut done = task("t1", TaskState::Completed);
        done.results = "7".into();
        let proplet = StoredProplet {
            id: "p".into(),
            namespace: "default".into(),
            metadata: Default::default(),
            alive_history: vec![SystemTime::now()],
            metrics: None,
            offline: false,
        };
        let batch = Batch {
            tasks: vec![
                ("t1".into(), true, Some(done.clone())),
                ("t2".into(), true, Some(task("t2", TaskState::Pending))),
            ],
            proplets: vec![("p".into(), Some(proplet.clone()))],
        };
        store.save(Arc::new(batch)).await.unwrap();
        // A change without the module keeps the module; a delete deletes.
        let mut moved = done.clone();
        moved.file = Bytes::new();
        moved.error = "changed".into();
        let batch = Batch {
            tasks: vec![
                ("t1".into(), false, Some(moved)),
                ("t2".into(), false, None),
            ],
            proplets: vec![],
        };
        store.save(Arc::new(batch)).await.unwrap();
        drop(store);
        let (_store, snapshot) = open(&path).unwrap();
        assert_eq!(snapshot.tasks.len(), 1);
        let back = &snapshot.tasks[0];
        assert_eq!(
            (back.state, &back.results, back.error.as_str()),
            (TaskState::Completed, &"7".into(), "changed")
        );
        assert_eq!(back.file, done.file);
        assert_eq!(snapshot.proplets, vec![proplet]);
    }

    #[test]
    fn a_bad_file_is_refused_with_the_variable_and_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let garbage = dir.path().join("garbage.db");
        std::fs::write(&garbage, vec![b'x'; 8192]).unwrap();
        let message = open(&garbage).err().unwrap();
        assert!(
            message.starts_with(&format!(
                "MANAGER_SQLITE_PATH={}: is not a SQLite database",
                garbage.display()
            )),
            "{message}"
        );
        let nowhere = dir.path().join("missing/store.db");
        let message = open(&nowhere).err().unwrap();
        assert!(
            message.contains("cannot be opened for writing"),
            "{message}"
        );
        let held = dir.path().join("held.db");
        let _first = open(&held).unwrap();
        let message = open(&held).err().unwrap();
        assert!(message.contains("in use by another manager"), "{message}");
    }

    #[test]
    fn a_newer_schema_is_refused_and_migrations_run_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        drop(open(&path).unwrap());
        drop(open(&path).unwrap());
        let connection = Connection::open(&path).unwrap();
        let versions: i64 = connection
            .query_row("SELECT count(*) FROM schema_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(versions, schema::latest());
        connection
            .execute("INSERT INTO schema_migrations VALUES (99, 'future', 0)", [])
            .unwrap();
        drop(connection);
        let message = open(&path).err().unwrap();
        assert!(message.contains("schema is version 99"), "{message}");
    }
}
