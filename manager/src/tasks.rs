//! Tasks the manager started, from `POST /tasks` to the proplet's result.

use std::collections::HashMap;

use propeller_mqtt::protocol::TaskResult;
use serde::Serialize;
use serde_json::Value;

use crate::registry::unix_now;

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Published; the broker has not acknowledged it yet.
    Pending,
    /// The broker has it; the proplet is fetching or running the module.
    Running,
    /// The proplet reported results.
    Completed,
    /// The proplet reported an error (or the start could not be published).
    Failed,
    /// Stopped on request.
    Stopped,
}

/// One task, as `GET /tasks/{id}` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Task {
    /// Its id, a UUID.
    pub id: String,
    /// The function to run.
    pub name: String,
    /// Where it stands.
    pub state: TaskState,
    /// The proplet it was sent to.
    pub proplet_id: String,
    /// Where the proxy finds the module, if not inline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    /// The function's arguments.
    pub inputs: Vec<Value>,
    /// What the function returned.
    pub results: Value,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// Seconds since the epoch, once finished.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    /// A stop was requested.
    #[serde(skip)]
    pub stop_requested: bool,
}

impl Task {
    /// Whether a result has arrived.
    pub fn finished(&self) -> bool {
        self.finished_at.is_some()
    }
}

/// Every task since the manager started.
#[derive(Debug, Default)]
pub struct Tasks {
    tasks: HashMap<String, Task>,
}

impl Tasks {
    /// Records a new task.
    pub fn insert(&mut self, task: Task) {
        self.tasks.insert(task.id.clone(), task);
    }

    /// One task.
    pub fn get(&self, id: &str) -> Option<&Task> {
        self.tasks.get(id)
    }

    /// One task, to change.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Task> {
        self.tasks.get_mut(id)
    }

    /// Every task, oldest first.
    pub fn all(&self) -> Vec<&Task> {
        let mut all: Vec<&Task> = self.tasks.values().collect();
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        all
    }

    /// Applies a proplet's result; returns the task if it is one of ours and
    /// this is its first result.
    pub fn finish(&mut self, result: TaskResult) -> Option<&Task> {
        let task = self.tasks.get_mut(&result.task_id)?;
        if task.finished() {
            return None;
        }
        task.state = match (result.failure(), task.stop_requested) {
            (None, _) => TaskState::Completed,
            (Some(_), true) => TaskState::Stopped,
            (Some(_), false) => TaskState::Failed,
        };
        task.error = result.failure().map(str::to_owned);
        task.results = result.results;
        task.finished_at = Some(unix_now());
        Some(task)
    }
}
