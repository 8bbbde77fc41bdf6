//! Propeller's manager: tracks proplets and dispatches tasks, with an HTTP
//! API for operators.
//!
//! Configured by `MANAGER_*` variables; see the README.

mod api;
mod registry;
mod tasks;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use hyper::StatusCode;
use propeller_mqtt::config::value;
use propeller_mqtt::config::Channel;
use propeller_mqtt::protocol::{
    self, payload, topic, PropletAlive, PropletCreate, StartTask, StopTask, TaskResult,
};
use propeller_mqtt::service::{self, Context};
use propeller_mqtt::{Client, Config, ConnectionState, Error, Message, Service};
use serde_json::json;
use tracing::{info, warn};

use api::{error, NewTask, Reply};
use registry::{unix_now, Liveness, Registry};
use tasks::{Task, TaskState, Tasks};

struct Settings {
    liveliness: Duration,
    listener: std::net::TcpListener,
}

impl Settings {
    /// Reads `MANAGER_LIVELINESS_INTERVAL` and binds the API's address, so
    /// that a port in use is reported before connecting.
    fn prepare(config: &mut Config) -> Result<Self, Error> {
        let settings = &config.settings;
        let liveliness = settings.parse(
            "LIVELINESS_INTERVAL",
            Duration::from_secs(10),
            value::positive_duration,
        )?;
        let host = settings.get("HTTP_HOST").unwrap_or("0.0.0.0");
        let port = settings.parse("HTTP_PORT", 7070, |text| {
            text.parse::<u16>()
                .map_err(|_| "write a port number from 0 to 65535, such as 7070".to_owned())
        })?;
        let address = match host.contains(':') {
            true => format!("[{host}]:{port}"),
            false => format!("{host}:{port}"),
        };
        let vars = format!(
            "{}:{}",
            settings.var("HTTP_HOST"),
            settings.var("HTTP_PORT")
        );
        let listener = address
            .parse::<SocketAddr>()
            .map_err(|_| Error::Invalid {
                var: settings.var("HTTP_HOST"),
                value: host.to_owned(),
                problem: "write an IP address of this host, such as 0.0.0.0 or 127.0.0.1"
                    .to_owned(),
            })
            .and_then(|socket| {
                std::net::TcpListener::bind(socket).map_err(|source| Error::Listen {
                    var: vars.clone(),
                    address: address.clone(),
                    source,
                })
            })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| Error::Listen {
                var: vars,
                address,
                source,
            })?;
        Ok(Self {
            liveliness,
            listener,
        })
    }
}

fn main() -> ExitCode {
    service::run(Service::Manager, Settings::prepare, serve)
}

async fn serve(settings: Settings, mut context: Context) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::from_std(settings.listener).map_err(Error::Runtime)?;
    if let Ok(address) = listener.local_addr() {
        info!(%address, "HTTP API listening");
    }
    let manager = Arc::new(Manager {
        client: context.client.clone(),
        channel: context.config.channel.clone(),
        state: Mutex::new(State {
            registry: Registry::new(settings.liveliness),
            tasks: Tasks::default(),
        }),
    });
    tokio::spawn(api::serve(listener, manager.clone()));
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sweep.tick() => manager.lock().registry.sweep(Instant::now()),
            message = context.messages.recv() => match message {
                Some(message) => manager.receive(message),
                None => return Ok(()),
            },
        }
    }
}

/// The manager's state, shared by the MQTT loop and the API.
pub struct Manager {
    client: Client,
    channel: Channel,
    state: Mutex<State>,
}

struct State {
    registry: Registry,
    tasks: Tasks,
}

impl State {
    /// A proplet's result: the task is done, and its proplet has one less.
    fn finish(&mut self, result: TaskResult) {
        let task_id = result.task_id.clone();
        let Some(task) = self.tasks.finish(result) else {
            info!(%task_id, "result for a task this manager did not start, or already finished");
            return;
        };
        if let Some(proplet) = self.registry.get_mut(&task.proplet_id) {
            proplet.running_tasks = proplet.running_tasks.saturating_sub(1);
        }
        match &task.error {
            None => info!(%task_id, results = %task.results, "task completed"),
            Some(error) => info!(%task_id, state = ?task.state, error, "task failed"),
        }
    }
}

impl Manager {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything on the channel arrives here; what is not for us is ignored.
    fn receive(&self, message: Message) {
        let Some(suffix) = self.channel.suffix(&message.topic) else {
            return;
        };
        let now = Instant::now();
        let mut state = self.lock();
        match suffix {
            topic::PROPLET_CREATE => {
                match serde_json::from_slice::<PropletCreate>(&message.payload) {
                    Ok(create) => {
                        state
                            .registry
                            .created(&create.proplet_id, &create.namespace, now)
                    }
                    Err(error) => warn!(%error, "ignoring a malformed proplet announcement"),
                }
            }
            topic::PROPLET_ALIVE => {
                match serde_json::from_slice::<PropletAlive>(&message.payload) {
                    Ok(alive) if alive.status == protocol::OFFLINE => {
                        state.registry.offline(&alive.proplet_id, "last will")
                    }
                    Ok(alive) => state.registry.alive(&alive.proplet_id, now),
                    Err(error) => warn!(%error, "ignoring a malformed heartbeat"),
                }
            }
            topic::PROPLET_RESULTS => {
                match serde_json::from_slice::<TaskResult>(&message.payload) {
                    Ok(result) => state.finish(result),
                    Err(error) => warn!(%error, "ignoring a malformed task result"),
                }
            }
            _ => {}
        }
    }

    fn health(&self) -> Reply {
        let mqtt = match &*self.client.state().borrow() {
            ConnectionState::Connected => json!({ "state": "connected" }),
            ConnectionState::Connecting => json!({ "state": "connecting" }),
            ConnectionState::Retrying { failure, attempts } => {
                json!({ "state": "retrying", "failure": failure.to_string(), "attempts": attempts })
            }
            ConnectionState::Closed => json!({ "state": "closed" }),
        };
        let state = self.lock();
        let count = |liveness| state.registry.all().filter(|p| p.state == liveness).count();
        (
            StatusCode::OK,
            json!({
                "status": "ok",
                "mqtt": mqtt,
                "proplets": { "alive": count(Liveness::Alive), "discovered": count(Liveness::Discovered), "offline": count(Liveness::Offline) },
            }),
        )
    }

    fn proplets(&self) -> Reply {
        let state = self.lock();
        let proplets: Vec<_> = state.registry.all().collect();
        (
            StatusCode::OK,
            json!({ "total": proplets.len(), "proplets": proplets }),
        )
    }

    fn tasks(&self) -> Reply {
        let state = self.lock();
        let tasks = state.tasks.all();
        (
            StatusCode::OK,
            json!({ "total": tasks.len(), "tasks": tasks }),
        )
    }

    fn task(&self, id: &str) -> Reply {
        match self.lock().tasks.get(id) {
            Some(task) => (StatusCode::OK, json!(task)),
            None => error(
                StatusCode::NOT_FOUND,
                format!("no task {id}: GET /tasks lists them"),
            ),
        }
    }

    async fn start_task(self: &Arc<Self>, new: NewTask) -> Reply {
        if new.name.trim().is_empty() {
            return error(
                StatusCode::BAD_REQUEST,
                "name is empty: give the exported function to run",
            );
        }
        let (image_url, file) = (
            new.image_url.filter(|u| !u.trim().is_empty()),
            new.file.filter(|f| !f.trim().is_empty()),
        );
        match (&image_url, &file) {
            (None, None) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "give image_url (the proxy fetches the module) or file (the module, base64)",
                )
            }
            (Some(_), Some(_)) => {
                return error(StatusCode::BAD_REQUEST, "give image_url or file, not both")
            }
            (None, Some(file)) => {
                if let Err(e) = base64::engine::general_purpose::STANDARD.decode(file.as_bytes()) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("file is not valid base64: {e}"),
                    );
                }
            }
            _ => {}
        }
        if let Some(bad) = new.inputs.iter().find(|i| !i.is_number()) {
            return error(
                StatusCode::BAD_REQUEST,
                format!("inputs must be numbers; {bad} is not"),
            );
        }
        let task = {
            let mut state = self.lock();
            let proplet = match &new.proplet_id {
                Some(id) => match state.registry.get_mut(id) {
                    None => {
                        return error(
                            StatusCode::NOT_FOUND,
                            format!("no proplet {id}: GET /proplets lists them"),
                        )
                    }
                    Some(p) if p.state == Liveness::Offline => {
                        return error(StatusCode::CONFLICT, format!("proplet {id} is offline"))
                    }
                    Some(p) => p.id.clone(),
                },
                None => match state.registry.least_busy() {
                    Some(p) => p.id.clone(),
                    None => {
                        return error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "no proplet is alive: start one, or wait for its first heartbeat",
                        )
                    }
                },
            };
            if let Some(p) = state.registry.get_mut(&proplet) {
                p.running_tasks += 1;
            }
            let task = Task {
                id: uuid::Uuid::new_v4().to_string(),
                name: new.name,
                state: TaskState::Pending,
                proplet_id: proplet,
                image_url: image_url.clone(),
                inputs: new.inputs,
                results: serde_json::Value::Null,
                error: None,
                created_at: unix_now(),
                finished_at: None,
                stop_requested: false,
            };
            state.tasks.insert(task.clone());
            task
        };
        let start = StartTask {
            id: task.id.clone(),
            name: task.name.clone(),
            state: json!(0),
            image_url,
            file,
            inputs: task.inputs.clone(),
            cli_args: Vec::new(),
            broadcast: false,
            daemon: false,
            env: None,
            proplet_id: Some(task.proplet_id.clone()),
        };
        match self
            .client
            .publish(self.channel.topic(topic::MANAGER_START), payload(&start))
            .await
        {
            Ok(delivery) => {
                info!(task_id = %task.id, proplet_id = %task.proplet_id, function = %task.name, "task started");
                let (manager, id) = (self.clone(), task.id.clone());
                tokio::spawn(async move {
                    if delivery.acknowledged().await.is_ok() {
                        if let Some(task) = manager.lock().tasks.get_mut(&id) {
                            if task.state == TaskState::Pending {
                                task.state = TaskState::Running;
                            }
                        }
                    }
                });
                (StatusCode::CREATED, json!(task))
            }
            Err(e) => {
                // Finished as if the proplet had reported the error, so that
                // its proplet does not stay counted as busy with it.
                self.lock().finish(TaskResult {
                    task_id: task.id.clone(),
                    proplet_id: task.proplet_id.clone(),
                    results: serde_json::Value::Null,
                    error: Some(format!("cannot publish the task: {e}")),
                });
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("cannot publish the task: {e}"),
                )
            }
        }
    }

    async fn stop_task(&self, id: &str) -> Reply {
        let proplet_id = {
            let mut state = self.lock();
            match state.tasks.get_mut(id) {
                None => {
                    return error(
                        StatusCode::NOT_FOUND,
                        format!("no task {id}: GET /tasks lists them"),
                    )
                }
                Some(task) if task.finished() => {
                    return error(
                        StatusCode::CONFLICT,
                        format!("task {id} has already finished"),
                    )
                }
                Some(task) => {
                    task.stop_requested = true;
                    task.proplet_id.clone()
                }
            }
        };
        let stop = StopTask {
            id: id.to_owned(),
            broadcast: false,
            proplet_id: Some(proplet_id),
        };
        match self
            .client
            .publish(self.channel.topic(topic::MANAGER_STOP), payload(&stop))
            .await
        {
            Ok(_) => {
                info!(task_id = id, "stop requested");
                (
                    StatusCode::ACCEPTED,
                    json!({ "id": id, "stop": "requested" }),
                )
            }
            Err(e) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot publish the stop: {e}"),
            ),
        }
    }
}
