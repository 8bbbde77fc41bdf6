//! Propeller's proplet: announces itself, keeps a heartbeat, and runs the
//! WebAssembly tasks the manager starts, fetching modules through the proxy.
//!
//! Configured by `PROPLET_*` variables; see the README.

mod host;
mod modules;
mod runtime;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use propeller_mqtt::env::value;
use propeller_mqtt::{Client, ConnectionState, LastWill, Message};
use propeller_protocol::{self as protocol, Channel, Untrusted};
use propeller_protocol::{
    addressed_to, payload, topic, PropletAlive, PropletCreate, StartTask, StopTask, TaskResult,
    DEFAULT_NAMESPACE,
};
use propeller_protocol::{Service, ServiceConfig};
use propeller_service::{self as service, Context, ServiceError};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use modules::Modules;

/// A module may use this much linear memory.
const MAX_MEMORY: usize = 256 << 20;
/// Elements a module's table may hold: far above what compilers emit, far
/// below what would exhaust memory.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// Bytes kept of a task's stdout, and of its stderr: a result must fit in
/// an MQTT packet.
const MAX_OUTPUT: usize = 64 << 10;

/// Heartbeats between two announcements: a manager that restarted, and so
/// forgot us, learns of us again within this many intervals.
const ANNOUNCE_EVERY: u32 = 30;

/// Why a running task must stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// It must not.
    No,
    /// The manager asked.
    Manager,
    /// The proplet is shutting down (SIGTERM).
    Shutdown,
}

/// The proplet's own settings.
struct Settings {
    liveliness: Duration,
    limits: runtime::Limits,
    max_tasks: usize,
}

impl Settings {
    /// Reads `PROPLET_LIVELINESS_INTERVAL`, `PROPLET_TASK_TIMEOUT`,
    /// `PROPLET_MAX_TASKS` and `PROPLET_DIRS`, and sets the last will that
    /// tells the manager we died.
    fn prepare(config: &mut ServiceConfig) -> Result<Self, ServiceError> {
        let settings = &config.settings;
        let liveliness = settings.parse(
            "LIVELINESS_INTERVAL",
            Duration::from_secs(10),
            value::positive_duration,
        )?;
        let timeout = settings.parse(
            "TASK_TIMEOUT",
            Duration::from_secs(300),
            value::positive_duration,
        )?;
        let max_tasks = settings.parse("MAX_TASKS", 8, |text| match text.parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err("write how many tasks may run at once, such as 8".to_owned()),
        })?;
        // Upstream's PROPLET_DIRS: host directories a task may open, at the
        // same path in the guest; none unless configured.
        let preopened = settings.parse("DIRS", Vec::new(), |text| {
            text.split(':')
                .filter(|dir| !dir.is_empty())
                .map(|dir| match std::path::Path::new(dir).is_dir() {
                    true => Ok(PathBuf::from(dir)),
                    false => Err(format!(
                        "{dir} is not a directory: create it, or remove it from the list"
                    )),
                })
                .collect()
        })?;
        config.mqtt.last_will = Some(LastWill {
            topic: config.channel.topic(topic::PROPLET_ALIVE),
            payload: payload(&PropletAlive {
                proplet_id: config.mqtt.client_id.clone(),
                status: protocol::OFFLINE.to_owned(),
                namespace: DEFAULT_NAMESPACE.to_owned(),
            }),
        });
        Ok(Self {
            liveliness,
            limits: runtime::Limits {
                timeout,
                max_memory: MAX_MEMORY,
                max_table_elements: MAX_TABLE_ELEMENTS,
                max_output: MAX_OUTPUT,
                preopened,
            },
            max_tasks,
        })
    }
}

fn main() -> ExitCode {
    service::run(Service::Proplet, Settings::prepare, serve)
}

async fn serve(settings: Settings, mut context: Context) -> Result<(), ServiceError> {
    let config = &context.config;
    let proplet = Proplet {
        id: config.mqtt.client_id.clone(),
        client: context.client.clone(),
        modules: Modules::new(
            context.client.clone(),
            config.channel.topic(topic::REGISTRY_REQUEST),
        ),
        channel: config.channel.clone(),
        limits: Arc::new(settings.limits),
        max_tasks: settings.max_tasks,
    };
    // The announcement and the heartbeat never change: made once.
    let create_topic = config.channel.topic(topic::PROPLET_CREATE);
    let create = payload(&PropletCreate {
        proplet_id: proplet.id.clone(),
        namespace: DEFAULT_NAMESPACE.to_owned(),
        metadata: host::metadata(),
    });
    let alive_topic = config.channel.topic(topic::PROPLET_ALIVE);
    let alive = payload(&PropletAlive {
        proplet_id: proplet.id.clone(),
        status: protocol::ALIVE.to_owned(),
        namespace: DEFAULT_NAMESPACE.to_owned(),
    });
    let metrics_topic = config.channel.topic(topic::PROPLET_METRICS);
    let mut sampler = host::Sampler::new();
    let mut state = context.client.state();
    let mut heartbeat = tokio::time::interval(settings.liveliness);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(Duration::from_secs(30));
    let (finished_tx, mut finished) = mpsc::unbounded_channel();
    let mut tasks: HashMap<String, watch::Sender<Stop>> = HashMap::new();
    let mut announce = *state.borrow_and_update() == ConnectionState::Connected;
    let mut heartbeats = 0u32;
    loop {
        if announce {
            // On every connection: the manager may have restarted meanwhile.
            proplet.send(&create_topic, create.clone()).await;
            heartbeat.reset_immediately();
            announce = false;
        }
        tokio::select! {
            changed = state.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                announce = *state.borrow_and_update() == ConnectionState::Connected;
            }
            _ = heartbeat.tick() => {
                // Heartbeats queued while disconnected would arrive stale, together.
                if *state.borrow() == ConnectionState::Connected {
                    heartbeats = heartbeats.wrapping_add(1);
                    if heartbeats % ANNOUNCE_EVERY == 0 {
                        // A restarted manager sends tasks only to proplets
                        // that announced themselves.
                        proplet.send(&create_topic, create.clone()).await;
                    }
                    proplet.send(&alive_topic, alive.clone()).await;
                    let metrics = sampler.sample(&proplet.id, DEFAULT_NAMESPACE);
                    proplet.send(&metrics_topic, payload(&metrics)).await;
                }
            }
            _ = sweep.tick() => proplet.modules.sweep(),
            Some(id) = finished.recv() => { tasks.remove(&id); }
            Some(message) = context.messages.recv() => {
                proplet.receive(message, &mut tasks, &finished_tx);
            }
            _ = context.stopping.changed() => break,
        }
    }
    // SIGTERM: every running task stops and reports so, before we go.
    for cancel in tasks.values() {
        let _ = cancel.send(Stop::Shutdown);
    }
    while !tasks.is_empty() {
        match finished.recv().await {
            Some(id) => tasks.remove(&id),
            None => break,
        };
    }
    Ok(())
}

/// What every task of this proplet shares.
#[derive(Clone)]
struct Proplet {
    id: String,
    client: Client,
    modules: Modules,
    channel: Channel,
    limits: Arc<runtime::Limits>,
    max_tasks: usize,
}

impl Proplet {
    fn receive(
        &self,
        message: Message,
        tasks: &mut HashMap<String, watch::Sender<Stop>>,
        finished: &mpsc::UnboundedSender<String>,
    ) {
        match self.channel.suffix(&message.topic) {
            Some(topic::MANAGER_START) => {
                match serde_json::from_slice::<StartTask>(&message.payload) {
                    Ok(task) => self.start(task, tasks, finished),
                    Err(error) => warn!(%error, "ignoring a start message that is not a task"),
                }
            }
            Some(topic::MANAGER_STOP) => match serde_json::from_slice::<StopTask>(&message.payload)
            {
                Ok(stop) if addressed_to(stop.broadcast, &stop.proplet_id, &self.id) => {
                    if let Some(cancel) = tasks.get(&stop.id) {
                        info!(task_id = %Untrusted(&stop.id), "stopping task");
                        let _ = cancel.send(Stop::Manager);
                    }
                }
                Ok(_) => {}
                Err(error) => warn!(%error, "ignoring a stop message that is not a stop"),
            },
            Some(topic::REGISTRY_CHUNK) => match serde_json::from_slice(&message.payload) {
                Ok(chunk) => self.modules.chunk(chunk),
                Err(error) => warn!(%error, "ignoring a registry message that is not a chunk"),
            },
            Some(topic::REGISTRY_ERROR) => match serde_json::from_slice(&message.payload) {
                Ok(error) => self.modules.failed(error),
                Err(error) => {
                    warn!(%error, "ignoring a registry error that is not {{app_name, error}}")
                }
            },
            _ => {}
        }
    }

    fn start(
        &self,
        task: StartTask,
        tasks: &mut HashMap<String, watch::Sender<Stop>>,
        finished: &mpsc::UnboundedSender<String>,
    ) {
        if !addressed_to(task.broadcast, &task.proplet_id, &self.id) {
            return;
        }
        if tasks.contains_key(&task.id) {
            warn!(task_id = %Untrusted(&task.id), "task already running; ignoring the second start");
            return;
        }
        if tasks.len() >= self.max_tasks {
            warn!(task_id = %Untrusted(&task.id), running = tasks.len(), "task refused: too many running");
            let refusal = TaskResult::new(
                &task.id,
                &self.id,
                Err(format!(
                    "the proplet runs {} tasks already, its limit (PROPLET_MAX_TASKS): start it later, or on another proplet",
                    tasks.len()
                )),
            );
            let (proplet, topic) = (self.clone(), self.channel.topic(topic::PROPLET_RESULTS));
            tokio::spawn(async move { proplet.send(&topic, payload(&refusal)).await });
            return;
        }
        info!(task_id = %Untrusted(&task.id), function = %Untrusted(&task.name), "starting task");
        let (cancel, stopped) = watch::channel(Stop::No);
        tasks.insert(task.id.clone(), cancel);
        let (proplet, finished) = (self.clone(), finished.clone());
        tokio::spawn(async move {
            let reason = stopped.clone();
            let mut outcome = proplet.execute(&task, stopped).await;
            if outcome.is_err() && *reason.borrow() == Stop::Shutdown {
                outcome = Err("stopped: the proplet is shutting down".to_owned());
            }
            match &outcome {
                Ok(results) => {
                    info!(task_id = %Untrusted(&task.id), results = %Untrusted(results), "task completed")
                }
                Err(error) => {
                    warn!(task_id = %Untrusted(&task.id), error = %Untrusted(error), "task failed")
                }
            }
            let result = TaskResult::new(&task.id, &proplet.id, outcome);
            let results_topic = proplet.channel.topic(topic::PROPLET_RESULTS);
            proplet.send(&results_topic, payload(&result)).await;
            let _ = finished.send(task.id);
        });
    }

    /// Gets the module and runs it; every failure is the task's error.
    async fn execute(
        &self,
        task: &StartTask,
        mut stopped: watch::Receiver<Stop>,
    ) -> Result<String, String> {
        if task.encrypted {
            return Err("the task is encrypted, and this proplet has no TEE runtime to decrypt it: run it on an upstream proplet with a TEE".to_owned());
        }
        let module = match (task.file.as_str(), task.image_url.as_str()) {
            (file, _) if !file.is_empty() => base64::engine::general_purpose::STANDARD
                .decode(file.as_bytes())
                .map(Bytes::from)
                .map_err(|e| format!("file is not valid base64: {e}"))?,
            (_, url) if !url.is_empty() => tokio::select! {
                module = self.modules.fetch(url) => module?,
                _ = stopped.wait_for(|stop| *stop != Stop::No) => return Err("stopped by the manager".to_owned()),
            },
            _ => return Err("the task has neither file nor image_url".to_owned()),
        };
        // argv[0] is the program's name, as a shell would give it.
        let program = task
            .image_url
            .rsplit('/')
            .next()
            .filter(|name| !name.is_empty())
            .unwrap_or("module.wasm");
        let args: Vec<String> = std::iter::once(program.to_owned())
            .chain(task.cli_args.iter().cloned())
            .collect();
        // Upstream gives every task its proplet's id.
        let mut env: Vec<(String, String)> = task
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !task.env.contains_key("PROPLET_ID") {
            env.push(("PROPLET_ID".to_owned(), self.id.clone()));
        }
        let (function, inputs, limits) =
            (task.name.clone(), task.inputs.clone(), self.limits.clone());
        tokio::task::spawn_blocking(move || {
            let invocation = runtime::Invocation {
                function: &function,
                inputs: &inputs,
                args: &args,
                env: &env,
            };
            runtime::run(&module, &invocation, &limits, || {
                *stopped.borrow() != Stop::No
            })
        })
        .await
        .unwrap_or_else(|panic| Err(format!("the runtime failed: {panic}")))
    }

    async fn send(&self, topic: &str, payload: Bytes) {
        if let Err(error) = self.client.publish(topic.to_owned(), payload).await {
            warn!(topic, "cannot publish: {error}");
        }
    }
}
