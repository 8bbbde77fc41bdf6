//! Tasks, in upstream's shape: created Pending, started, and finished by a
//! proplet's result or a stop. The JSON of [`Task`] is what upstream's
//! `task.Task` marshals, so that upstream's Go SDK reads our answers.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use base64::Engine as _;
use bytes::Bytes;
use propeller_protocol::{rfc3339, StartTask, TaskResult, ZERO_TIME};
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

/// Upstream's `task.State`, an integer on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TaskState {
    /// Created, not started.
    Pending = 0,
    /// Upstream's state for tasks waiting on a schedule; we never set it.
    #[allow(dead_code)]
    Scheduled = 1,
    /// Sent to a proplet.
    Running = 2,
    /// The proplet reported results.
    Completed = 3,
    /// The proplet reported an error, or the start could not be sent.
    Failed = 4,
    /// Upstream's state for skipped workflow steps; we never set it.
    #[allow(dead_code)]
    Skipped = 5,
    /// Stopped on request.
    Interrupted = 6,
}

impl TaskState {
    /// Upstream's name, for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Scheduled => "Scheduled",
            Self::Running => "Running",
            Self::Completed => "Completed",
            Self::Failed => "Failed",
            Self::Skipped => "Skipped",
            Self::Interrupted => "Interrupted",
        }
    }

    /// The state of upstream's integer, as the store keeps it.
    pub fn from_code(code: i64) -> Option<Self> {
        Self::ALL.into_iter().find(|state| *state as i64 == code)
    }

    /// Every state, for metrics.
    pub const ALL: [Self; 7] = [
        Self::Pending,
        Self::Scheduled,
        Self::Running,
        Self::Completed,
        Self::Failed,
        Self::Skipped,
        Self::Interrupted,
    ];
}

impl Serialize for TaskState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u8(*self as u8)
    }
}

/// One task, as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Task {
    /// A UUID.
    pub id: String,
    /// The function to run; `_start` or empty runs a WASI command.
    pub name: String,
    /// Upstream's kind; always `standard` here.
    pub kind: &'static str,
    /// Where it stands.
    pub state: TaskState,
    /// Where the proxy finds the module.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub image_url: String,
    /// The module itself; shown redacted, as upstream does. Shared, not
    /// copied, by the clones the store writes.
    #[serde(serialize_with = "redacted", skip_serializing_if = "Bytes::is_empty")]
    pub file: Bytes,
    /// The WASI command's arguments.
    pub cli_args: Vec<String>,
    /// The function's arguments.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<String>,
    /// The WASI environment.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Upstream's long-running flag, passed on.
    pub daemon: bool,
    /// Upstream's TEE flag, passed on.
    pub encrypted: bool,
    /// The proplet it runs on: chosen at start unless given.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub proplet_id: String,
    /// What the proplet reported.
    #[serde(skip_serializing_if = "Value::is_null")]
    pub results: Value,
    /// Why it failed.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// When it was last started.
    #[serde(serialize_with = "time")]
    pub start_time: Option<SystemTime>,
    /// When it finished.
    #[serde(serialize_with = "time")]
    pub finish_time: Option<SystemTime>,
    /// When it was created.
    #[serde(serialize_with = "time")]
    pub created_at: Option<SystemTime>,
    /// When it last changed.
    #[serde(serialize_with = "time")]
    pub updated_at: Option<SystemTime>,
    /// Every proplet runs it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub broadcast: bool,
    /// Upstream's scheduling priority, 0 to 100.
    #[serde(skip_serializing_if = "is_zero")]
    pub priority: i64,
    /// Free-form, for the operator.
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub metadata: Map<String, Value>,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// Go's zero time for a time not reached, as upstream shows it.
fn time<S: Serializer>(time: &Option<SystemTime>, serializer: S) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => serializer.serialize_str(&rfc3339(*time)),
        None => serializer.serialize_str(ZERO_TIME),
    }
}

/// Upstream's redaction: a module is never sent back whole.
fn redacted<S: Serializer>(file: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(file);
    match encoded.len() {
        0..=20 => serializer.serialize_str(&encoded),
        n => serializer.serialize_str(&format!(
            "{}<REDACTED>{}",
            &encoded[..10],
            &encoded[n - 10..]
        )),
    }
}

impl Task {
    /// Whether a proplet is working on it.
    pub fn running(&self) -> bool {
        self.state == TaskState::Running
    }

    /// The start message that sends it to `proplet_id` (empty to broadcast).
    pub fn start_message(&self) -> StartTask {
        StartTask {
            id: self.id.clone(),
            name: self.name.clone(),
            state: self.state as u8,
            image_url: self.image_url.clone(),
            file: match self.file.is_empty() {
                true => String::new(),
                false => base64::engine::general_purpose::STANDARD.encode(&self.file),
            },
            inputs: self.inputs.clone(),
            cli_args: self.cli_args.clone(),
            broadcast: self.broadcast,
            daemon: self.daemon,
            env: self.env.clone(),
            encrypted: self.encrypted,
            proplet_id: self.proplet_id.clone(),
        }
    }
}

/// A page of a list, as upstream pages them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    /// How many to skip.
    pub offset: u64,
    /// How many at most.
    pub limit: u64,
}

impl Page {
    /// The part of `items` this page covers.
    pub fn of<T>(self, items: impl Iterator<Item = T>) -> Vec<T> {
        items
            .skip(usize::try_from(self.offset).unwrap_or(usize::MAX))
            .take(usize::try_from(self.limit).unwrap_or(usize::MAX))
            .collect()
    }
}

/// Every task this manager knows, and which of them changed since the
/// store last took the changes.
#[derive(Debug, Default)]
pub struct Tasks {
    tasks: HashMap<String, Task>,
    /// Changed tasks; `true` when the module changed too, so that the store
    /// rewrites a large module only when it is new.
    changed: BTreeMap<String, bool>,
}

impl Tasks {
    /// Tasks read back from the store, unchanged.
    pub fn restored(tasks: impl IntoIterator<Item = Task>) -> Self {
        Self {
            tasks: tasks.into_iter().map(|t| (t.id.clone(), t)).collect(),
            changed: BTreeMap::new(),
        }
    }

    /// Records a new task.
    pub fn insert(&mut self, task: Task) {
        self.changed.insert(task.id.clone(), true);
        self.tasks.insert(task.id.clone(), task);
    }

    /// One task.
    pub fn get(&self, id: &str) -> Option<&Task> {
        self.tasks.get(id)
    }

    /// One task, to change (so it counts as changed).
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Task> {
        let task = self.tasks.get_mut(id)?;
        self.changed.entry(id.to_owned()).or_insert(false);
        Some(task)
    }

    /// A task's module changed.
    pub fn module_changed(&mut self, id: &str) {
        if self.tasks.contains_key(id) {
            self.changed.insert(id.to_owned(), true);
        }
    }

    /// Forgets a task.
    pub fn remove(&mut self, id: &str) -> Option<Task> {
        self.changed.insert(id.to_owned(), false);
        self.tasks.remove(id)
    }

    /// The tasks changed since the last call: each id, whether its module
    /// changed, and the task (`None` once deleted).
    pub fn take_changed(&mut self) -> Vec<(String, bool, Option<Task>)> {
        std::mem::take(&mut self.changed)
            .into_iter()
            .map(|(id, module)| {
                let task = self.tasks.get(&id).cloned();
                (id, module, task)
            })
            .collect()
    }

    /// Counts `id` as changed again, after the store failed to take it.
    pub fn changed_again(&mut self, id: &str, module: bool) {
        *self.changed.entry(id.to_owned()).or_insert(false) |= module;
    }

    /// A page of them, oldest first, and how many there are in all.
    pub fn page(&self, page: Page) -> (Vec<&Task>, usize) {
        let mut all: Vec<&Task> = self.tasks.values().collect();
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        (page.of(all.into_iter()), self.tasks.len())
    }

    /// The running ones.
    pub fn running(&self) -> impl Iterator<Item = &Task> {
        self.tasks.values().filter(|t| t.running())
    }

    /// How many are in each state.
    pub fn count(&self, state: TaskState) -> usize {
        self.tasks.values().filter(|t| t.state == state).count()
    }

    /// Applies a proplet's result; returns the task if this result finished
    /// it. A result for a task not running, or from another proplet than the
    /// one it was sent to, changes nothing.
    pub fn finish(&mut self, result: &TaskResult, now: SystemTime) -> Result<&Task, Ignored> {
        let task = self
            .tasks
            .get_mut(&result.task_id)
            .ok_or(Ignored::Unknown)?;
        if !task.running() {
            return Err(Ignored::NotRunning);
        }
        if !task.proplet_id.is_empty()
            && !result.proplet_id.is_empty()
            && task.proplet_id != result.proplet_id
        {
            return Err(Ignored::OtherProplet);
        }
        self.changed.entry(task.id.clone()).or_insert(false);
        task.state = match result.failure() {
            None => TaskState::Completed,
            Some(_) => TaskState::Failed,
        };
        task.error = result.failure().unwrap_or_default().to_owned();
        task.results = result.results.clone();
        task.finish_time = Some(now);
        task.updated_at = Some(now);
        Ok(task)
    }
}

/// Why a result changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Not a task of this manager (or one since deleted).
    Unknown,
    /// Finished or stopped already, or never started.
    NotRunning,
    /// Sent to one proplet, reported by another.
    OtherProplet,
}

impl Ignored {
    /// For the log line.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Unknown => "no such task",
            Self::NotRunning => "the task is not running",
            Self::OtherProplet => "it came from another proplet than the task's",
        }
    }
}
