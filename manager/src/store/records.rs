//! Tasks and proplets as rows: the columns both databases share, in plain
//! types. Times are nanoseconds since the Unix epoch, so that a task reads
//! back to the exact times it was shown with; lists and maps are JSON text.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::Value;

use super::StoreError;
use crate::registry::StoredProplet;
use crate::tasks::{Task, TaskState};

/// One row of `tasks`.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRow {
    pub id: String,
    pub name: String,
    pub state: i16,
    pub image_url: String,
    pub file: Bytes,
    pub cli_args: String,
    pub inputs: String,
    pub env: String,
    pub daemon: bool,
    pub encrypted: bool,
    pub broadcast: bool,
    pub proplet_id: String,
    pub results: String,
    pub error: String,
    pub priority: i64,
    pub metadata: String,
    pub start_ns: Option<i64>,
    pub finish_ns: Option<i64>,
    pub created_ns: i64,
    pub updated_ns: i64,
}

/// The columns of `tasks`, in [`TaskRow`]'s order.
pub const TASK_COLUMNS: [&str; 20] = [
    "id",
    "name",
    "state",
    "image_url",
    "file",
    "cli_args",
    "inputs",
    "env",
    "daemon",
    "encrypted",
    "broadcast",
    "proplet_id",
    "results",
    "error",
    "priority",
    "metadata",
    "start_ns",
    "finish_ns",
    "created_ns",
    "updated_ns",
];

/// One row of `proplets`.
#[derive(Debug, Clone, PartialEq)]
pub struct PropletRow {
    pub id: String,
    pub namespace: String,
    pub metadata: String,
    pub alive_history: String,
    pub metrics: Option<String>,
    pub offline: bool,
}

/// The columns of `proplets`, in [`PropletRow`]'s order.
pub const PROPLET_COLUMNS: [&str; 6] = [
    "id",
    "namespace",
    "metadata",
    "alive_history",
    "metrics",
    "offline",
];

/// `INSERT … ON CONFLICT (id) DO UPDATE` of every column but `id` and
/// those in `keep`, with `placeholder(n)` for the n-th parameter (from 1).
pub fn upsert(
    table: &str,
    columns: &[&str],
    keep: &[&str],
    placeholder: impl Fn(usize) -> String,
) -> String {
    let values: Vec<String> = (1..=columns.len()).map(placeholder).collect();
    let updates: Vec<String> = columns
        .iter()
        .filter(|c| **c != "id" && !keep.contains(c))
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    format!(
        "INSERT INTO {table} ({}) VALUES ({}) ON CONFLICT (id) DO UPDATE SET {}",
        columns.join(", "),
        values.join(", "),
        updates.join(", ")
    )
}

/// `SELECT` of every column, oldest task first.
pub fn select(table: &str, columns: &[&str]) -> String {
    let order = match table {
        "tasks" => "created_ns, id",
        _ => "id",
    };
    format!(
        "SELECT {} FROM {table} ORDER BY {order}",
        columns.join(", ")
    )
}

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn nanos(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        i64::try_from(since.as_nanos()).unwrap_or(i64::MAX)
    })
}

fn time(nanos: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(nanos).unwrap_or(0))
}

impl From<&Task> for TaskRow {
    fn from(task: &Task) -> Self {
        Self {
            id: task.id.clone(),
            name: task.name.clone(),
            state: task.state as i16,
            image_url: task.image_url.clone(),
            file: task.file.clone(),
            cli_args: json(&task.cli_args),
            inputs: json(&task.inputs),
            env: json(&task.env),
            daemon: task.daemon,
            encrypted: task.encrypted,
            broadcast: task.broadcast,
            proplet_id: task.proplet_id.clone(),
            results: json(&task.results),
            error: task.error.clone(),
            priority: task.priority,
            metadata: json(&task.metadata),
            start_ns: task.start_time.map(nanos),
            finish_ns: task.finish_time.map(nanos),
            created_ns: task.created_at.map_or(0, nanos),
            updated_ns: task.updated_at.map_or(0, nanos),
        }
    }
}

impl TryFrom<TaskRow> for Task {
    type Error = StoreError;

    fn try_from(row: TaskRow) -> Result<Self, StoreError> {
        let bad = |column: &str, e: &dyn std::fmt::Display| {
            StoreError::Unavailable(format!(
                "task {} has an unreadable {column} in the store: {e}",
                row.id
            ))
        };
        let parse = |column: &str, text: &str| -> Result<Value, StoreError> {
            serde_json::from_str(text).map_err(|e| bad(column, &e))
        };
        let state =
            TaskState::from_code(row.state.into()).ok_or_else(|| bad("state", &row.state))?;
        let cli_args = serde_json::from_value(parse("cli_args", &row.cli_args)?)
            .map_err(|e| bad("cli_args", &e))?;
        let inputs =
            serde_json::from_value(parse("inputs", &row.inputs)?).map_err(|e| bad("inputs", &e))?;
        let env = serde_json::from_value(parse("env", &row.env)?).map_err(|e| bad("env", &e))?;
        let metadata = serde_json::from_value(parse("metadata", &row.metadata)?)
            .map_err(|e| bad("metadata", &e))?;
        let results = parse("results", &row.results)?;
        Ok(Task {
            id: row.id,
            name: row.name,
            kind: "standard",
            state,
            image_url: row.image_url,
            file: row.file,
            cli_args,
            inputs,
            env,
            daemon: row.daemon,
            encrypted: row.encrypted,
            proplet_id: row.proplet_id,
            results,
            error: row.error,
            start_time: row.start_ns.map(time),
            finish_time: row.finish_ns.map(time),
            created_at: Some(time(row.created_ns)),
            updated_at: Some(time(row.updated_ns)),
            broadcast: row.broadcast,
            priority: row.priority,
            metadata,
        })
    }
}

impl From<&StoredProplet> for PropletRow {
    fn from(proplet: &StoredProplet) -> Self {
        let history: Vec<i64> = proplet.alive_history.iter().copied().map(nanos).collect();
        Self {
            id: proplet.id.clone(),
            namespace: proplet.namespace.clone(),
            metadata: json(&proplet.metadata),
            alive_history: json(&history),
            metrics: proplet.metrics.as_ref().map(json),
            offline: proplet.offline,
        }
    }
}

impl TryFrom<PropletRow> for StoredProplet {
    type Error = StoreError;

    fn try_from(row: PropletRow) -> Result<Self, StoreError> {
        let bad = |column: &str, e: serde_json::Error| {
            StoreError::Unavailable(format!(
                "proplet {} has an unreadable {column} in the store: {e}",
                row.id
            ))
        };
        let history: Vec<i64> =
            serde_json::from_str(&row.alive_history).map_err(|e| bad("alive_history", e))?;
        let metrics = match &row.metrics {
            Some(text) => Some(serde_json::from_str(text).map_err(|e| bad("metrics", e))?),
            None => None,
        };
        Ok(StoredProplet {
            metadata: serde_json::from_str(&row.metadata).map_err(|e| bad("metadata", e))?,
            alive_history: history.into_iter().map(time).collect(),
            metrics,
            id: row.id,
            namespace: row.namespace,
            offline: row.offline,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upserts_keep_what_they_are_told_to() {
        let sql = upsert("t", &["id", "a", "file"], &["file"], |n| format!("${n}"));
        assert_eq!(
            sql,
            "INSERT INTO t (id, a, file) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET a = excluded.a"
        );
    }

    #[test]
    fn a_task_reads_back_as_it_was_written() {
        let now = SystemTime::now();
        let task = Task {
            id: "t".into(),
            name: "add".into(),
            kind: "standard",
            state: TaskState::Completed,
            image_url: "add.wasm".into(),
            file: Bytes::from_static(b"\0asm"),
            cli_args: vec!["-v".into()],
            inputs: vec!["3".into(), "\u{0}4".into()],
            env: [("A".to_owned(), "1".to_owned())].into(),
            daemon: true,
            encrypted: false,
            proplet_id: "p".into(),
            results: Value::from("7"),
            error: String::new(),
            start_time: Some(now),
            finish_time: None,
            created_at: Some(now),
            updated_at: Some(now),
            broadcast: false,
            priority: 5,
            metadata: serde_json::json!({"k": [1, 2]})
                .as_object()
                .cloned()
                .unwrap(),
        };
        let back = Task::try_from(TaskRow::from(&task)).unwrap();
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&task).unwrap()
        );
        assert_eq!(back.file, task.file);
        let mut row = TaskRow::from(&task);
        row.state = 99;
        assert!(Task::try_from(row).is_err());
    }
}
