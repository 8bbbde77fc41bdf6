//! The manager's domain, apart from HTTP: proplets and their liveness, tasks
//! from creation to result, and the choice of a proplet. [`State`] is plain
//! data and unit-tested as such; [`Manager`] adds the MQTT side.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use propeller_mqtt::{Client, ConnectionState, Message};
use propeller_protocol::{self as protocol, Channel, Untrusted};
use propeller_protocol::{
    de, payload, topic, PropletAlive, PropletCreate, PropletMetrics, StopTask, TaskResult,
};
use serde::Deserialize;
use serde_json::{Map, Value};
use tracing::{info, warn};

use crate::registry::{Liveness, Proplet, Registry};
use crate::store::writer::Report;
use crate::store::{Batch, Handle, Snapshot};
use crate::tasks::{Page, Task, TaskState, Tasks};

/// Room in a start's packet for its topic and MQTT's header.
const PACKET_OVERHEAD: usize = 1024;
/// Upstream's limit on a task's metadata.
const MAX_METADATA: usize = 1 << 20;
/// The longest name, proplet id or image URL a task may have.
const MAX_NAME: usize = 256;
const MAX_IMAGE_URL: usize = 1024;
/// The most bytes a task's inputs, arguments and environment may hold
/// together (as JSON): they travel in every start.
const MAX_ARGUMENTS: usize = 64 << 10;
/// Results received before the store is loaded (PostgreSQL at startup, or
/// a standby manager) are kept, at most this many and for this long, and
/// applied once it is: they may finish tasks the store holds.
const EARLY_RESULTS: usize = 10_000;
const EARLY_RESULTS_AGE: Duration = Duration::from_secs(60);

/// Why a request cannot be done. Each maps to one HTTP status in `api.rs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManagerError {
    /// No such task or proplet.
    NotFound(String),
    /// The request is malformed or contradicts itself.
    Invalid(String),
    /// The request does not fit the current state (a running task).
    Conflict(String),
    /// The task would not fit in one MQTT packet.
    TooLarge(String),
    /// No proplet can take the task now, or the broker cannot be reached.
    Unavailable(String),
}

impl std::fmt::Display for ManagerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (Self::NotFound(m)
        | Self::Invalid(m)
        | Self::Conflict(m)
        | Self::TooLarge(m)
        | Self::Unavailable(m)) = self;
        f.write_str(m)
    }
}

fn no_task(id: &str) -> ManagerError {
    ManagerError::NotFound(format!("no task {id}: GET /tasks lists them"))
}

fn no_proplet(id: &str) -> ManagerError {
    ManagerError::NotFound(format!("no proplet {id}: GET /proplets lists them"))
}

/// A task as `POST /tasks` and `PUT /tasks/{id}` take it: upstream's
/// `task.Task`, read leniently (unknown fields, such as the zero times
/// upstream's SDK sends, are ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct TaskRequest {
    /// The function to run.
    #[serde(deserialize_with = "de::null_as_default")]
    pub name: String,
    /// Where the proxy finds the module.
    #[serde(deserialize_with = "de::null_as_default")]
    pub image_url: String,
    /// The module, base64 (Go's `[]byte`).
    #[serde(deserialize_with = "de::null_as_default")]
    pub file: String,
    /// Strings or numbers.
    #[serde(deserialize_with = "de::flex_strings")]
    pub inputs: Vec<String>,
    /// The WASI command's arguments.
    #[serde(deserialize_with = "de::null_as_default")]
    pub cli_args: Vec<String>,
    /// The WASI environment.
    #[serde(deserialize_with = "de::null_as_default")]
    pub env: BTreeMap<String, String>,
    /// Passed on to the proplet.
    #[serde(deserialize_with = "de::null_as_default")]
    pub daemon: bool,
    /// Passed on to the proplet.
    #[serde(deserialize_with = "de::null_as_default")]
    pub encrypted: bool,
    /// Every proplet runs it.
    #[serde(deserialize_with = "de::null_as_default")]
    pub broadcast: bool,
    /// The proplet to run it on; the least busy alive one when empty.
    #[serde(deserialize_with = "de::null_as_default")]
    pub proplet_id: String,
    /// 0 to 100.
    #[serde(deserialize_with = "de::null_as_default")]
    pub priority: i64,
    /// Free-form.
    #[serde(deserialize_with = "de::null_as_default")]
    pub metadata: Map<String, Value>,
}

impl TaskRequest {
    fn module(&self) -> Result<Vec<u8>, ManagerError> {
        base64::engine::general_purpose::STANDARD
            .decode(self.file.trim().as_bytes())
            .map_err(|e| ManagerError::Invalid(format!("file is not valid base64: {e}")))
    }

    fn check(&self) -> Result<(), ManagerError> {
        let too_long = |field: &str, value: &str, max: usize| match value.len() > max {
            true => Err(ManagerError::Invalid(format!(
                "{field} is {} bytes, over the {max}-byte limit",
                value.len()
            ))),
            false => Ok(()),
        };
        too_long("name", &self.name, MAX_NAME)?;
        too_long("proplet_id", &self.proplet_id, MAX_NAME)?;
        too_long("image_url", &self.image_url, MAX_IMAGE_URL)?;
        let arguments =
            serde_json::to_vec(&(&self.inputs, &self.cli_args, &self.env)).map_or(0, |a| a.len());
        if arguments > MAX_ARGUMENTS {
            return Err(ManagerError::TooLarge(format!(
                "inputs, cli_args and env are {arguments} bytes together, over the {MAX_ARGUMENTS}-byte limit: pass large data in the module or through a preopened directory"
            )));
        }
        if !(0..=100).contains(&self.priority) {
            return Err(ManagerError::Invalid(format!(
                "priority must be between 0 and 100, not {}",
                self.priority
            )));
        }
        if serde_json::to_vec(&self.metadata).map_or(0, |m| m.len()) > MAX_METADATA {
            return Err(ManagerError::Invalid(
                "metadata is over 1 MiB: keep large data out of tasks".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Counts for `/health` and `/metrics`.
#[derive(Debug, Clone)]
pub struct Summary {
    /// The MQTT connection.
    pub mqtt: ConnectionState,
    /// Proplets by liveness.
    pub proplets: [(Liveness, usize); 3],
    /// Tasks by state.
    pub tasks: Vec<(TaskState, usize)>,
    /// The store.
    pub store: Report,
    /// The MQTT connection's figures.
    pub connection: propeller_mqtt::Metrics,
}

/// Everything the manager knows.
#[derive(Debug)]
pub struct State {
    /// The proplets.
    pub registry: Registry,
    /// The tasks.
    pub tasks: Tasks,
    /// The largest packet the broker takes from us.
    pub max_packet: usize,
    /// The store's content is here: until then (PostgreSQL not reached
    /// yet, or another manager holds it) tasks and proplets cannot be
    /// served.
    pub loaded: bool,
    /// Batches of changes taken by the store so far.
    batches: u64,
    /// Results received before the store was loaded, with when.
    early_results: VecDeque<(Instant, TaskResult)>,
}

impl State {
    /// A state with the store's `snapshot`, or, without one, waiting for
    /// it.
    pub fn new(registry: Registry, max_packet: usize, snapshot: Option<Snapshot>) -> Self {
        let mut state = Self {
            registry,
            tasks: Tasks::default(),
            max_packet,
            loaded: false,
            batches: 0,
            early_results: VecDeque::new(),
        };
        if let Some(snapshot) = snapshot {
            state.load(snapshot, Instant::now());
        }
        state
    }

    /// Replaces the tasks with the store's, adds the proplets it knows,
    /// and applies the results that arrived before it was loaded.
    pub fn load(&mut self, snapshot: Snapshot, now: Instant) {
        // Proplets heard from before the load are not in the store yet.
        self.registry.all_changed();
        self.registry.restore(snapshot.proplets, now);
        self.tasks = Tasks::restored(snapshot.tasks);
        let running: Vec<String> = self.tasks.running().map(|t| t.proplet_id.clone()).collect();
        self.registry.recount(running.iter().map(String::as_str));
        self.loaded = true;
        for (at, result) in std::mem::take(&mut self.early_results) {
            if now.saturating_duration_since(at) < EARLY_RESULTS_AGE {
                self.finish(&result, SystemTime::now());
            }
        }
    }

    /// Forgets the tasks: another manager holds the store now.
    pub fn unload(&mut self) {
        self.tasks = Tasks::default();
        self.registry.clear_changed();
        self.registry.recount(std::iter::empty());
        self.loaded = false;
    }

    /// The number of the batch that will hold the changes made so far: the
    /// API waits until it is committed.
    pub fn next_batch(&self) -> u64 {
        self.batches + 1
    }

    /// Takes every change made since the last call, as batch number
    /// [`Self::next_batch`].
    pub fn take_changes(&mut self) -> (u64, Batch) {
        self.batches += 1;
        let batch = Batch {
            tasks: self.tasks.take_changed(),
            proplets: self.registry.take_changed(),
        };
        (self.batches, batch)
    }

    /// Counts the records of a batch the store could not write as changed
    /// again, to go out with the next one.
    pub fn changed_again(&mut self, batch: &Batch) {
        for (id, module, _) in &batch.tasks {
            self.tasks.changed_again(id, *module);
        }
        for (id, _) in &batch.proplets {
            self.registry.changed_again(id);
        }
    }

    /// A new task, Pending.
    pub fn create(&mut self, request: TaskRequest, now: SystemTime) -> Result<Task, ManagerError> {
        if request.name.trim().is_empty() {
            return Err(ManagerError::Invalid(
                "name is empty: give the exported function to run, or _start for a WASI command"
                    .to_owned(),
            ));
        }
        if request.broadcast && !request.proplet_id.is_empty() {
            return Err(ManagerError::Invalid(
                "broadcast and proplet_id are mutually exclusive".to_owned(),
            ));
        }
        request.check()?;
        let file = request.module()?;
        self.fits(&file)?;
        let task = Task {
            id: uuid::Uuid::new_v4().to_string(),
            name: request.name,
            kind: "standard",
            state: TaskState::Pending,
            image_url: request.image_url.trim().to_owned(),
            file: file.into(),
            cli_args: request.cli_args,
            inputs: request.inputs,
            env: request.env,
            daemon: request.daemon,
            encrypted: request.encrypted,
            proplet_id: request.proplet_id,
            results: Value::Null,
            error: String::new(),
            start_time: None,
            finish_time: None,
            created_at: Some(now),
            updated_at: Some(now),
            broadcast: request.broadcast,
            priority: request.priority,
            metadata: request.metadata,
        };
        self.tasks.insert(task.clone());
        Ok(task)
    }

    /// Changes what upstream lets change: name, inputs, file, priority,
    /// metadata; empty fields keep their value.
    pub fn update(
        &mut self,
        id: &str,
        request: TaskRequest,
        now: SystemTime,
    ) -> Result<Task, ManagerError> {
        request.check()?;
        let file = request.module()?;
        self.fits(&file)?;
        let task = self.tasks.get_mut(id).ok_or_else(|| no_task(id))?;
        if task.running() {
            return Err(ManagerError::Conflict(format!(
                "task {id} is running: stop it before changing it"
            )));
        }
        if !request.name.trim().is_empty() {
            task.name = request.name;
        }
        if !request.inputs.is_empty() {
            task.inputs = request.inputs;
        }
        let module = !file.is_empty();
        if module {
            task.file = file.into();
        }
        if request.priority != 0 {
            task.priority = request.priority;
        }
        if !request.metadata.is_empty() {
            task.metadata = request.metadata;
        }
        task.updated_at = Some(now);
        let task = task.clone();
        if module {
            self.tasks.module_changed(id);
        }
        Ok(task)
    }

    /// Sets the module of a task, from `PUT /tasks/{id}/upload`.
    pub fn upload(
        &mut self,
        id: &str,
        module: Vec<u8>,
        now: SystemTime,
    ) -> Result<Task, ManagerError> {
        self.fits(&module)?;
        let task = self.tasks.get_mut(id).ok_or_else(|| no_task(id))?;
        if task.running() {
            return Err(ManagerError::Conflict(format!(
                "task {id} is running: stop it before changing its module"
            )));
        }
        task.file = module.into();
        task.updated_at = Some(now);
        let task = task.clone();
        self.tasks.module_changed(id);
        Ok(task)
    }

    /// Forgets a task that is not running.
    pub fn delete(&mut self, id: &str) -> Result<(), ManagerError> {
        match self.tasks.get(id) {
            None => Err(no_task(id)),
            Some(task) if task.running() => Err(ManagerError::Conflict(format!(
                "task {id} is running: stop it before deleting it"
            ))),
            Some(_) => {
                self.tasks.remove(id);
                Ok(())
            }
        }
    }

    /// Picks the task's proplet and marks it Running; returns the start
    /// message to publish. Undo with [`Self::unschedule`] if it cannot be sent.
    pub fn schedule(&mut self, id: &str, now: SystemTime) -> Result<bytes::Bytes, ManagerError> {
        let task = self.tasks.get(id).ok_or_else(|| no_task(id))?;
        if task.running() {
            return Err(ManagerError::Conflict(format!(
                "task {id} is already running"
            )));
        }
        if task.file.is_empty() && task.image_url.is_empty() {
            return Err(ManagerError::Invalid(format!(
                "task {id} has no module: set image_url, or PUT /tasks/{id}/upload a .wasm"
            )));
        }
        let proplet = match (task.broadcast, task.proplet_id.as_str()) {
            (true, _) => String::new(),
            (false, "") => self
                .registry
                .least_busy()
                .map(|p| p.id.clone())
                .ok_or_else(|| {
                    ManagerError::Unavailable(
                        "no proplet is alive: start one, or wait for its first heartbeat"
                            .to_owned(),
                    )
                })?,
            (false, wanted) => match self.registry.get(wanted) {
                None => return Err(no_proplet(wanted)),
                Some(p) if !p.alive() => {
                    return Err(ManagerError::Unavailable(format!(
                        "proplet {wanted} is not alive"
                    )))
                }
                Some(p) if !p.announced => {
                    return Err(ManagerError::Unavailable(format!(
                        "proplet {wanted} has sent heartbeats but never announced itself (control/proplet/create): restart it"
                    )))
                }
                Some(p) => p.id.clone(),
            },
        };
        let mut start = task.start_message();
        start.proplet_id = proplet.clone();
        // What upstream's manager sends: the state before the start.
        start.state = TaskState::Pending as u8;
        let message = payload(&start);
        if message.len() + PACKET_OVERHEAD > self.max_packet {
            return Err(ManagerError::TooLarge(format!(
                "the start message would be {} bytes, over the broker's {}-byte packet limit (MQTT_MAX_PACKET_SIZE): serve the module through the proxy with image_url",
                message.len(),
                self.max_packet
            )));
        }
        if let Some(p) = self.registry.get_mut(&proplet) {
            p.running_tasks += 1;
        }
        let task = self.tasks.get_mut(id).ok_or_else(|| no_task(id))?;
        task.proplet_id = proplet;
        task.state = TaskState::Running;
        task.results = Value::Null;
        task.error.clear();
        task.start_time = Some(now);
        task.finish_time = None;
        task.updated_at = Some(now);
        Ok(message)
    }

    /// A start that could not be published: the task failed, and its
    /// proplet is not busy with it.
    pub fn unschedule(&mut self, id: &str, error: String, now: SystemTime) {
        self.end(id, TaskState::Failed, error, now);
    }

    /// Ends a running task on request; returns the stop message.
    pub fn stop(&mut self, id: &str) -> Result<StopTask, ManagerError> {
        let task = self.tasks.get(id).ok_or_else(|| no_task(id))?;
        if !task.running() {
            return Err(ManagerError::Conflict(format!(
                "task {id} is not running (state {})",
                task.state.name()
            )));
        }
        Ok(StopTask {
            id: id.to_owned(),
            broadcast: task.broadcast,
            proplet_id: task.proplet_id.clone(),
        })
    }

    /// The stop was sent: the task is over, whatever its proplet reports
    /// later (upstream's proplets report nothing for a stopped task).
    pub fn stopped(&mut self, id: &str, now: SystemTime) {
        self.end(
            id,
            TaskState::Interrupted,
            "stopped on request".to_owned(),
            now,
        );
    }

    fn end(&mut self, id: &str, state: TaskState, error: String, now: SystemTime) {
        let Some(task) = self.tasks.get_mut(id) else {
            return;
        };
        if !task.running() {
            return;
        }
        task.state = state;
        task.error = error;
        task.finish_time = Some(now);
        task.updated_at = Some(now);
        let proplet = task.proplet_id.clone();
        self.release(&proplet);
    }

    fn release(&mut self, proplet_id: &str) {
        if let Some(proplet) = self.registry.get_mut(proplet_id) {
            proplet.running_tasks = proplet.running_tasks.saturating_sub(1);
        }
    }

    /// A proplet's result.
    pub fn finish(&mut self, result: &TaskResult, now: SystemTime) {
        let task = match self.tasks.finish(result, now) {
            Ok(task) => task,
            Err(ignored) => {
                info!(task_id = %Untrusted(&result.task_id), proplet_id = %Untrusted(&result.proplet_id), why = ignored.reason(), "result ignored");
                return;
            }
        };
        match task.state {
            TaskState::Completed => {
                info!(task_id = %task.id, results = %Untrusted(&task.results.to_string()), "task completed")
            }
            _ => info!(task_id = %task.id, error = %Untrusted(&task.error), "task failed"),
        }
        let proplet = task.proplet_id.clone();
        self.release(&proplet);
    }

    /// Whether a module of `file` bytes can travel inline in a start.
    fn fits(&self, file: &[u8]) -> Result<(), ManagerError> {
        let encoded = file.len().div_ceil(3) * 4;
        match encoded + PACKET_OVERHEAD > self.max_packet {
            true => Err(ManagerError::TooLarge(format!(
                "the module is {} bytes, {encoded} once base64, over the broker's {}-byte packet limit (MQTT_MAX_PACKET_SIZE): serve it through the proxy with image_url",
                file.len(),
                self.max_packet
            ))),
            false => Ok(()),
        }
    }

    /// One proplet, as upstream shows it.
    pub fn proplet(&self, id: &str) -> Result<&Proplet, ManagerError> {
        self.registry.get(id).ok_or_else(|| no_proplet(id))
    }

    /// Forgets a proplet that has no running task.
    pub fn delete_proplet(&mut self, id: &str) -> Result<(), ManagerError> {
        let proplet = self.proplet(id)?;
        if proplet.running_tasks > 0 {
            return Err(ManagerError::Conflict(format!(
                "proplet {id} has {} running tasks",
                proplet.running_tasks
            )));
        }
        self.registry.remove(id);
        Ok(())
    }

    /// A page of proplets, filtered by upstream's `status` (`active`,
    /// `inactive`), and how many match in all.
    pub fn proplets(
        &self,
        page: Page,
        status: Option<&str>,
    ) -> Result<(Vec<&Proplet>, usize), ManagerError> {
        let wanted = match status {
            None | Some("") => None,
            Some("active") => Some(true),
            Some("inactive") => Some(false),
            Some(other) => {
                return Err(ManagerError::Invalid(format!(
                    "status {other:?} is not one of active, inactive"
                )))
            }
        };
        let matching: Vec<&Proplet> = self
            .registry
            .all()
            .filter(|p| wanted.is_none_or(|alive| p.alive() == alive))
            .collect();
        let total = matching.len();
        Ok((page.of(matching.into_iter()), total))
    }

    /// One task.
    pub fn task(&self, id: &str) -> Result<&Task, ManagerError> {
        self.tasks.get(id).ok_or_else(|| no_task(id))
    }

    /// An MQTT message on the channel; what is not for the manager is
    /// ignored, and what does not parse is logged once and dropped.
    pub fn receive(&mut self, suffix: &str, payload: &[u8], now: Instant) {
        match suffix {
            topic::PROPLET_CREATE => match serde_json::from_slice::<PropletCreate>(payload) {
                Ok(create) if !create.proplet_id.is_empty() => self.registry.created(
                    &create.proplet_id,
                    &create.namespace,
                    create.metadata,
                    now,
                ),
                Ok(_) => warn!("ignoring a proplet announcement without proplet_id"),
                Err(error) => warn!(%error, "ignoring a malformed proplet announcement"),
            },
            topic::PROPLET_ALIVE => match serde_json::from_slice::<PropletAlive>(payload) {
                Ok(alive) if alive.proplet_id.is_empty() => {
                    warn!("ignoring a heartbeat without proplet_id")
                }
                Ok(alive) if alive.status == protocol::OFFLINE => {
                    self.registry.offline(&alive.proplet_id, "last will")
                }
                Ok(alive) => self.registry.alive(&alive.proplet_id, now),
                Err(error) => warn!(%error, "ignoring a malformed heartbeat"),
            },
            topic::PROPLET_RESULTS => match serde_json::from_slice::<TaskResult>(payload) {
                Ok(result) if !self.loaded => {
                    if self.early_results.len() == EARLY_RESULTS {
                        self.early_results.pop_front();
                    }
                    self.early_results.push_back((now, result));
                }
                Ok(result) => self.finish(&result, SystemTime::now()),
                Err(error) => warn!(%error, "ignoring a malformed task result"),
            },
            topic::PROPLET_METRICS => match serde_json::from_slice::<PropletMetrics>(payload) {
                Ok(mut metrics) => {
                    // Upstream's manager parses an RFC 3339 string and takes
                    // the time of arrival for anything else, such as the
                    // object serde makes of upstream's proplet's SystemTime.
                    if !metrics.timestamp.is_string() {
                        metrics.timestamp = protocol::rfc3339(SystemTime::now()).into();
                    }
                    let id = metrics.proplet_id.clone();
                    if !self.registry.metrics(metrics) {
                        info!(proplet_id = %Untrusted(&id), "metrics from an unknown proplet ignored");
                    }
                }
                Err(error) => warn!(%error, "ignoring malformed proplet metrics"),
            },
            _ => {}
        }
    }

    /// Once a second: proplets silent too long go offline, and the tasks
    /// of proplets gone offline fail, since no result will come for them.
    pub fn sweep(&mut self, now: Instant) {
        self.registry.sweep(now);
        let lost = self.registry.lost();
        if lost.is_empty() {
            return;
        }
        let running: Vec<(String, String)> = self
            .tasks
            .running()
            .filter(|t| lost.contains(&t.proplet_id))
            .map(|t| (t.id.clone(), t.proplet_id.clone()))
            .collect();
        for (task, proplet) in running {
            info!(task_id = %task, proplet_id = %Untrusted(&proplet), "task failed: its proplet went offline");
            self.end(
                &task,
                TaskState::Failed,
                format!("proplet {proplet} went offline while running the task"),
                SystemTime::now(),
            );
        }
        // Counts left over from broadcast tasks, which have no one proplet.
        for id in lost {
            if let Some(proplet) = self.registry.get_mut(&id) {
                proplet.running_tasks = 0;
            }
        }
    }

    /// Counts for `/health` and `/metrics`.
    pub fn summary(&self, mqtt: ConnectionState, store: Report) -> Summary {
        let count = |liveness| self.registry.all().filter(|p| p.state == liveness).count();
        Summary {
            mqtt,
            proplets: [
                (Liveness::Alive, count(Liveness::Alive)),
                (Liveness::Discovered, count(Liveness::Discovered)),
                (Liveness::Offline, count(Liveness::Offline)),
            ],
            tasks: TaskState::ALL
                .iter()
                .map(|state| (*state, self.tasks.count(*state)))
                .collect(),
            store,
            connection: propeller_mqtt::Metrics::default(),
        }
    }
}

/// The manager: its [`State`], the MQTT client that carries its decisions
/// to the proplets, and the store that keeps them.
///
/// A request that changes something is refused with 503 while the store is
/// not writable, is made in the state, and is answered once the store has
/// committed it: what the API acknowledged survives a crash.
pub struct Manager {
    client: Client,
    channel: Channel,
    state: Mutex<State>,
    store: Handle,
}

impl Manager {
    /// A manager with `state`, writing to the store behind `store`.
    pub fn new(client: Client, channel: Channel, state: State, store: Handle) -> Self {
        Self {
            client,
            channel,
            state: Mutex::new(state),
            store,
        }
    }

    /// The state, for a change that needs no MQTT and no confirmation.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state, for reading tasks and proplets: refused until the store
    /// is loaded.
    pub fn read(&self) -> Result<MutexGuard<'_, State>, ManagerError> {
        let state = self.lock();
        match state.loaded {
            true => Ok(state),
            false => Err(ManagerError::Unavailable(self.store.not_loaded())),
        }
    }

    /// The store's handle.
    pub fn store(&self) -> &Handle {
        &self.store
    }

    /// Makes a change in the state, if the store can take it; returns its
    /// outcome and the batch that will hold it.
    fn change<T>(
        &self,
        change: impl FnOnce(&mut State) -> Result<T, ManagerError>,
    ) -> Result<(T, u64), ManagerError> {
        self.store.writable().map_err(ManagerError::Unavailable)?;
        let mut state = self.read()?;
        let outcome = change(&mut state)?;
        let batch = state.next_batch();
        drop(state);
        self.store.wake();
        Ok((outcome, batch))
    }

    /// Waits until the store has committed `batch`.
    async fn confirmed(&self, batch: u64) -> Result<(), ManagerError> {
        self.store
            .confirmed(batch)
            .await
            .map_err(ManagerError::Unavailable)
    }

    /// A new task, Pending, once stored.
    pub async fn create(&self, request: TaskRequest) -> Result<Task, ManagerError> {
        let (task, batch) = self.change(|s| s.create(request, SystemTime::now()))?;
        self.confirmed(batch).await?;
        Ok(task)
    }

    /// A changed task, once stored.
    pub async fn update(&self, id: &str, request: TaskRequest) -> Result<Task, ManagerError> {
        let (task, batch) = self.change(|s| s.update(id, request, SystemTime::now()))?;
        self.confirmed(batch).await?;
        Ok(task)
    }

    /// A task with a new module, once stored.
    pub async fn upload(&self, id: &str, module: Vec<u8>) -> Result<Task, ManagerError> {
        let (task, batch) = self.change(|s| s.upload(id, module, SystemTime::now()))?;
        self.confirmed(batch).await?;
        Ok(task)
    }

    /// Deletes a task, once stored.
    pub async fn delete(&self, id: &str) -> Result<(), ManagerError> {
        let ((), batch) = self.change(|s| s.delete(id))?;
        self.confirmed(batch).await
    }

    /// Forgets a proplet, once stored.
    pub async fn delete_proplet(&self, id: &str) -> Result<(), ManagerError> {
        let ((), batch) = self.change(|s| s.delete_proplet(id))?;
        self.confirmed(batch).await
    }

    /// Everything on the channel arrives here.
    pub fn receive(&self, message: &Message) {
        if let Some(suffix) = self.channel.suffix(&message.topic) {
            self.lock()
                .receive(suffix, &message.payload, Instant::now());
            self.store.wake();
        }
    }

    /// Once a second: liveness, and the tasks of proplets gone.
    pub fn sweep(&self) {
        self.lock().sweep(Instant::now());
        self.store.wake();
    }

    /// Sends a task to its proplet. The task is stored as Running before
    /// the start goes out, so that a manager restarted at any point takes
    /// the proplet's result.
    pub async fn start(&self, id: &str) -> Result<(), ManagerError> {
        let (message, batch) = self.change(|s| s.schedule(id, SystemTime::now()))?;
        if let Err(e) = self.confirmed(batch).await {
            let error = format!("the task's start could not be stored: {e}");
            self.lock().unschedule(id, error, SystemTime::now());
            self.store.wake();
            return Err(e);
        }
        let topic = self.channel.topic(topic::MANAGER_START);
        match self.client.publish(topic, message).await {
            Ok(_) => {
                let state = self.lock();
                if let Ok(task) = state.task(id) {
                    info!(task_id = id, proplet_id = %Untrusted(&task.proplet_id), function = %Untrusted(&task.name), "task started");
                }
                Ok(())
            }
            Err(e) => {
                let error = format!("cannot publish the task: {e}");
                self.lock().unschedule(id, error.clone(), SystemTime::now());
                self.store.wake();
                Err(ManagerError::Unavailable(error))
            }
        }
    }

    /// Asks the task's proplet to stop it; the task is Interrupted once
    /// stored.
    pub async fn stop(&self, id: &str) -> Result<(), ManagerError> {
        let (stop, _) = self.change(|s| s.stop(id))?;
        let topic = self.channel.topic(topic::MANAGER_STOP);
        let _delivery = self
            .client
            .publish(topic, payload(&stop))
            .await
            .map_err(|e| ManagerError::Unavailable(format!("cannot publish the stop: {e}")))?;
        // Sent: the task is over, whatever the store says now.
        let batch = {
            let mut state = self.lock();
            state.stopped(id, SystemTime::now());
            state.next_batch()
        };
        self.store.wake();
        info!(task_id = id, "task stopped");
        self.confirmed(batch).await
    }

    /// Replaces the state's tasks with the store's `snapshot`.
    pub fn load(&self, snapshot: Snapshot) {
        self.lock().load(snapshot, Instant::now());
        self.store.wake();
    }

    /// Forgets the tasks: another manager holds the store.
    pub fn unload(&self) {
        self.lock().unload();
    }

    /// Every change since the last call, and its batch number.
    pub fn take_changes(&self) -> (u64, Batch) {
        self.lock().take_changes()
    }

    /// A batch the store could not write: its records go out with the next.
    pub fn changed_again(&self, batch: &Batch) {
        self.lock().changed_again(batch);
    }

    /// Counts for `/health` and `/metrics`.
    pub fn summary(&self) -> Summary {
        let mqtt = self.client.state().borrow().clone();
        let mut summary = self.lock().summary(mqtt, self.store.report());
        summary.connection = self.client.metrics();
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::new(
            Registry::new(Duration::from_secs(10)),
            64 << 10,
            Some(Snapshot::default()),
        )
    }

    fn request(json: &str) -> TaskRequest {
        serde_json::from_str(json).unwrap()
    }

    fn alive(state: &mut State, id: &str) {
        let now = Instant::now();
        state
            .registry
            .created(id, "default", Default::default(), now);
        state.registry.alive(id, now);
    }

    #[test]
    fn a_task_goes_from_pending_to_completed_on_the_least_busy_proplet() {
        let mut state = state();
        let now = SystemTime::now();
        // What upstream's SDK sends: zero times, state omitted, inputs as numbers.
        let task = state
            .create(
                request(r#"{"name":"add","image_url":"add.wasm","inputs":[3,"4"],"start_time":"0001-01-01T00:00:00Z","cli_args":null}"#),
                now,
            )
            .unwrap();
        assert_eq!(task.state, TaskState::Pending);
        assert_eq!(task.inputs, ["3", "4"]);
        assert!(matches!(
            state.schedule(&task.id, now),
            Err(ManagerError::Unavailable(_))
        ));
        alive(&mut state, "busy");
        alive(&mut state, "idle");
        state.registry.get_mut("busy").unwrap().running_tasks = 1;
        let start: Value = serde_json::from_slice(&state.schedule(&task.id, now).unwrap()).unwrap();
        assert_eq!(start["proplet_id"], "idle");
        assert_eq!(start["inputs"], serde_json::json!(["3", "4"]));
        assert_eq!(state.registry.get("idle").unwrap().running_tasks, 1);
        assert!(matches!(
            state.schedule(&task.id, now),
            Err(ManagerError::Conflict(_))
        ));
        // A result from another proplet does not count.
        let forged = TaskResult::new(&task.id, "busy", Ok("666".into()));
        state.finish(&forged, now);
        assert_eq!(state.task(&task.id).unwrap().state, TaskState::Running);
        state.finish(&TaskResult::new(&task.id, "idle", Ok("7".into())), now);
        let done = state.task(&task.id).unwrap();
        assert_eq!(done.state, TaskState::Completed);
        assert_eq!(done.results, "7");
        assert_eq!(state.registry.get("idle").unwrap().running_tasks, 0);
    }

    #[test]
    fn failures_stops_and_refusals() {
        let mut state = state();
        let now = SystemTime::now();
        alive(&mut state, "p1");
        assert!(matches!(
            state.create(request(r#"{"name":""}"#), now),
            Err(ManagerError::Invalid(_))
        ));
        assert!(matches!(
            state.create(
                request(r#"{"name":"f","broadcast":true,"proplet_id":"p1"}"#),
                now
            ),
            Err(ManagerError::Invalid(_))
        ));
        assert!(matches!(
            state.create(request(r#"{"name":"f","file":"%%%"}"#), now),
            Err(ManagerError::Invalid(_))
        ));
        let long_name = format!(r#"{{"name":"{}"}}"#, "n".repeat(MAX_NAME + 1));
        assert!(matches!(
            state.create(request(&long_name), now),
            Err(ManagerError::Invalid(_))
        ));
        let huge_inputs = format!(
            r#"{{"name":"f","inputs":["{}"]}}"#,
            "1".repeat(MAX_ARGUMENTS)
        );
        assert!(matches!(
            state.create(request(&huge_inputs), now),
            Err(ManagerError::TooLarge(_))
        ));
        let big = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 64 << 10]);
        assert!(matches!(
            state.create(request(&format!(r#"{{"name":"f","file":"{big}"}}"#)), now),
            Err(ManagerError::TooLarge(_))
        ));
        let bare = state.create(request(r#"{"name":"f"}"#), now).unwrap();
        assert!(matches!(
            state.schedule(&bare.id, now),
            Err(ManagerError::Invalid(_))
        ));
        let task = state
            .create(
                request(r#"{"name":"f","file":"AGFzbQEAAAA=","proplet_id":"p1"}"#),
                now,
            )
            .unwrap();
        state.schedule(&task.id, now).unwrap();
        assert!(matches!(
            state.delete(&task.id),
            Err(ManagerError::Conflict(_))
        ));
        assert!(matches!(
            state.delete_proplet("p1"),
            Err(ManagerError::Conflict(_))
        ));
        state.stop(&task.id).unwrap();
        state.stopped(&task.id, now);
        assert_eq!(state.task(&task.id).unwrap().state, TaskState::Interrupted);
        // The proplet's late report changes nothing.
        state.finish(&TaskResult::new(&task.id, "p1", Err("stopped".into())), now);
        assert_eq!(state.task(&task.id).unwrap().state, TaskState::Interrupted);
        assert!(matches!(
            state.stop(&task.id),
            Err(ManagerError::Conflict(_))
        ));
        state.delete_proplet("p1").unwrap();
        state.delete(&task.id).unwrap();
        assert!(matches!(
            state.task(&task.id),
            Err(ManagerError::NotFound(_))
        ));
        // A proplet that is not alive takes no task.
        state
            .registry
            .created("p2", "", Default::default(), Instant::now());
        let pinned = state
            .create(
                request(r#"{"name":"f","image_url":"x","proplet_id":"p2"}"#),
                now,
            )
            .unwrap();
        assert!(matches!(
            state.schedule(&pinned.id, now),
            Err(ManagerError::Unavailable(_))
        ));
        // A start that cannot be published frees the proplet.
        alive(&mut state, "p3");
        let task = state
            .create(
                request(r#"{"name":"f","image_url":"x","proplet_id":"p3"}"#),
                now,
            )
            .unwrap();
        state.schedule(&task.id, now).unwrap();
        state.unschedule(&task.id, "offline".into(), now);
        assert_eq!(state.task(&task.id).unwrap().state, TaskState::Failed);
        assert_eq!(state.registry.get("p3").unwrap().running_tasks, 0);
    }

    /// A fake heartbeat gets no task; a proplet gone offline fails its tasks.
    #[test]
    fn unannounced_and_lost_proplets() {
        let mut state = state();
        let now = SystemTime::now();
        state.registry.alive("fake", Instant::now());
        let task = state
            .create(request(r#"{"name":"f","image_url":"x"}"#), now)
            .unwrap();
        assert!(matches!(
            state.schedule(&task.id, now),
            Err(ManagerError::Unavailable(_))
        ));
        let pinned = state
            .create(
                request(r#"{"name":"f","image_url":"x","proplet_id":"fake"}"#),
                now,
            )
            .unwrap();
        assert!(matches!(
            state.schedule(&pinned.id, now),
            Err(ManagerError::Unavailable(m)) if m.contains("never announced")
        ));
        alive(&mut state, "real");
        state.schedule(&task.id, now).unwrap();
        state.registry.offline("real", "last will");
        state.sweep(Instant::now());
        let failed = state.task(&task.id).unwrap();
        assert_eq!(failed.state, TaskState::Failed);
        assert!(failed.error.contains("went offline"), "{}", failed.error);
        assert_eq!(state.registry.get("real").unwrap().running_tasks, 0);
    }

    #[test]
    fn pages_and_filters() {
        let mut state = state();
        let now = SystemTime::now();
        for _ in 0..5 {
            state.create(request(r#"{"name":"f"}"#), now).unwrap();
        }
        let (page, total) = state.tasks.page(Page {
            offset: 3,
            limit: 10,
        });
        assert_eq!((page.len(), total), (2, 5));
        alive(&mut state, "a");
        state
            .registry
            .created("b", "", Default::default(), Instant::now());
        let all = Page {
            offset: 0,
            limit: 10,
        };
        assert_eq!(state.proplets(all, Some("active")).unwrap().1, 1);
        assert_eq!(state.proplets(all, Some("inactive")).unwrap().1, 1);
        assert_eq!(state.proplets(all, None).unwrap().1, 2);
        assert!(state.proplets(all, Some("dead")).is_err());
    }

    /// What the store is given: every task and announced proplet changed,
    /// once, and again after a failed write.
    #[test]
    fn changes_are_taken_once_and_again_after_a_failure() {
        let mut state = state();
        let now = SystemTime::now();
        state.registry.alive("unannounced", Instant::now());
        alive(&mut state, "p1");
        let task = state
            .create(
                request(r#"{"name":"f","file":"AGFzbQEAAAA=","proplet_id":"p1"}"#),
                now,
            )
            .unwrap();
        let (first, batch) = state.take_changes();
        assert_eq!(first, 1);
        assert_eq!(batch.tasks.len(), 1);
        assert!(batch.tasks[0].1, "a new task is written with its module");
        let proplets: Vec<&str> = batch.proplets.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(proplets, ["p1"], "heartbeats alone are not kept");
        assert!(state.take_changes().1.is_empty());
        state.schedule(&task.id, now).unwrap();
        assert_eq!(state.next_batch(), 3);
        let (_, batch) = state.take_changes();
        assert_eq!(batch.tasks.len(), 1);
        assert!(!batch.tasks[0].1, "a start does not rewrite the module");
        state.changed_again(&batch);
        state.finish(&TaskResult::new(&task.id, "p1", Ok("7".into())), now);
        let (_, batch) = state.take_changes();
        let (_, _, written) = &batch.tasks[0];
        assert_eq!(written.as_ref().unwrap().state, TaskState::Completed);
        state.delete(&task.id).unwrap();
        state.delete_proplet("p1").unwrap();
        let (_, batch) = state.take_changes();
        assert!(batch.tasks[0].2.is_none() && batch.proplets[0].1.is_none());
    }

    /// After a restart: the tasks as stored, their proplets known again,
    /// and results that came before the load applied.
    #[test]
    fn a_load_restores_tasks_proplets_and_early_results() {
        let mut old = state();
        let now = SystemTime::now();
        alive(&mut old, "p1");
        let running = old
            .create(
                request(r#"{"name":"f","image_url":"x","proplet_id":"p1"}"#),
                now,
            )
            .unwrap();
        old.schedule(&running.id, now).unwrap();
        let snapshot = Snapshot {
            tasks: old
                .tasks
                .take_changed()
                .into_iter()
                .filter_map(|(_, _, t)| t)
                .collect(),
            proplets: old
                .registry
                .take_changed()
                .into_iter()
                .filter_map(|(_, p)| p)
                .collect(),
        };
        let mut state = State::new(Registry::new(Duration::from_secs(10)), 64 << 10, None);
        assert!(!state.loaded);
        let result =
            serde_json::to_vec(&TaskResult::new(&running.id, "p1", Ok("7".into()))).unwrap();
        state.receive(topic::PROPLET_RESULTS, &result, Instant::now());
        state.load(snapshot, Instant::now());
        assert!(state.loaded);
        let done = state.task(&running.id).unwrap();
        assert_eq!(
            (done.state, &done.results),
            (TaskState::Completed, &Value::from("7"))
        );
        let proplet = state.proplet("p1").unwrap();
        assert_eq!(
            proplet.state,
            Liveness::Discovered,
            "alive again at its next heartbeat"
        );
        assert_eq!(proplet.running_tasks, 0);
        // A task still running keeps its proplet busy after the load.
        let mut old = state;
        let again = old
            .create(
                request(r#"{"name":"f","image_url":"x","proplet_id":"p1"}"#),
                now,
            )
            .unwrap();
        alive(&mut old, "p1");
        old.schedule(&again.id, now).unwrap();
        let snapshot = Snapshot {
            tasks: vec![old.task(&again.id).unwrap().clone()],
            proplets: vec![old.proplet("p1").unwrap().stored()],
        };
        let mut state = State::new(
            Registry::new(Duration::from_secs(10)),
            64 << 10,
            Some(snapshot),
        );
        assert_eq!(state.proplet("p1").unwrap().running_tasks, 1);
        state.unload();
        assert!(!state.loaded && state.task(&again.id).is_err());
    }

    /// `Manager::start` with a start the client refuses (over its packet
    /// limit) or cannot send (shut down): the task fails with the reason,
    /// and its proplet is released, so the least-busy choice takes it
    /// again.
    #[tokio::test]
    async fn a_start_that_cannot_be_published_releases_its_proplet() {
        use crate::store::{Memory, StoreState};
        use propeller_mqtt::{Options, Secret};
        use std::sync::Arc;

        // A broker that is never there: publishes wait in the outbox.
        let config = Options::new("tcp://127.0.0.1:9", "m", Secret::new("k"))
            .unwrap()
            .with_connect_timeout(Duration::from_millis(100))
            // Under the state's limit (64 KiB in `state()`): a start can
            // pass the state's estimate and still be over the client's.
            .with_max_packet_size(4096)
            .with_names(propeller_mqtt::Names::prefixed("MANAGER_"));
        let (client, _) = Client::start(&config, vec![]).unwrap();
        let mut state = state();
        alive(&mut state, "idle");
        alive(&mut state, "busy");
        state.registry.get_mut("busy").unwrap().running_tasks = 1;
        let store = Handle::new("memory", String::new(), StoreState::Ready);
        let manager = Arc::new(Manager::new(
            client.clone(),
            propeller_protocol::Channel {
                domain_id: "d".into(),
                channel_id: "c".into(),
            },
            state,
            store,
        ));
        let (stop_writer, stopping) = tokio::sync::watch::channel(false);
        let writer = tokio::spawn(crate::store::writer::run(
            manager.clone(),
            Memory,
            true,
            stopping,
        ));
        let running = |id: &str| manager.lock().proplet(id).unwrap().running_tasks;

        let module = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 4096]);
        let big = manager
            .create(request(&format!(r#"{{"name":"f","file":"{module}"}}"#)))
            .await
            .unwrap();
        let refused = manager.start(&big.id).await.unwrap_err();
        let failed = manager.lock().task(&big.id).unwrap().clone();
        assert_eq!(failed.state, TaskState::Failed);
        assert_eq!(refused, ManagerError::Unavailable(failed.error.clone()));
        assert!(
            failed
                .error
                .starts_with("cannot publish the task: a message of ")
                && failed.error.contains("MANAGER_MQTT_MAX_PACKET_SIZE"),
            "{}",
            failed.error
        );
        assert_eq!((running("idle"), running("busy")), (0, 1));

        // Released: the next task goes to the same proplet, the least busy.
        let small = manager
            .create(request(r#"{"name":"f","image_url":"add.wasm"}"#))
            .await
            .unwrap();
        manager.start(&small.id).await.unwrap();
        let started = manager.lock().task(&small.id).unwrap().clone();
        assert_eq!(
            (started.state, started.proplet_id.as_str()),
            (TaskState::Running, "idle")
        );
        assert_eq!((running("idle"), running("busy")), (1, 1));

        // The client shut down: the same release.
        client.shutdown().await;
        let late = manager
            .create(request(r#"{"name":"f","image_url":"add.wasm"}"#))
            .await
            .unwrap();
        let refused = manager.start(&late.id).await.unwrap_err();
        let failed = manager.lock().task(&late.id).unwrap().clone();
        assert_eq!(failed.state, TaskState::Failed);
        assert_eq!(
            refused,
            ManagerError::Unavailable(
                "cannot publish the task: the MQTT client has shut down".to_owned()
            )
        );
        assert_eq!(
            failed.error,
            "cannot publish the task: the MQTT client has shut down"
        );
        assert_eq!((running("idle"), running("busy")), (1, 1));

        let _ = stop_writer.send(true);
        writer.await.unwrap();
    }
}
