//! What each of Propeller's service binaries does around its own logic, in
//! one place: parse the flags, read the env (and an env file), install
//! logging, build the runtime, connect, run until SIGTERM or Ctrl-C, keep
//! the health file, disconnect. The binary calls [`run`] from `main`; the
//! connection library itself owns none of this.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser};
use propeller_mqtt::{one_line, Client, ClientError, ConfigError, ConnectionState, Message};
use propeller_protocol::{Service, ServiceConfig};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Why a service stopped other than cleanly, or could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// A variable, file or setting is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The client refused what the service asked of it.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A service cannot listen where its variables say (the manager's API).
    #[error("{var}: cannot listen on {address}: choose a free port, or an address of this host")]
    Listen {
        /// The variables that name the address.
        var: String,
        /// The address.
        address: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A log filter that tracing cannot parse.
    #[error("{var}={value:?} is not a valid log filter: write a level (error, warn, info, debug, trace) or directives such as info,propeller_mqtt=debug")]
    LogFilter {
        /// The log level variable.
        var: String,
        /// The value as given.
        value: String,
    },
    /// The operating system refused what the async runtime needs.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}

/// Exit status for a configuration error (`EX_CONFIG` of sysexits.h).
pub const EXIT_CONFIG: u8 = 78;

/// What a service's own logic gets once its configuration is read and the
/// connection is starting.
pub struct Context {
    /// The configuration, with the service's own settings.
    pub config: ServiceConfig,
    /// The connection, already subscribed to the service's [`Service::topics`].
    pub client: Client,
    /// Messages received on those topics.
    pub messages: mpsc::Receiver<Message>,
    /// Becomes `true` at SIGTERM or Ctrl-C: the service should finish what
    /// it is doing (a proplet reports its running tasks as stopped) and
    /// return, within [`STOP_GRACE`]; after that it is dropped.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// How long a service may take to stop after SIGTERM before it is dropped.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `service` until SIGTERM or Ctrl-C.
///
/// `prepare` reads the service's own settings from the configuration (and
/// may set a last will) before anything touches the network; its errors are
/// configuration errors. `main` is the service's logic; at SIGTERM it is
/// told through [`Context::stopping`], given [`STOP_GRACE`] to return, and
/// then dropped, before the client drains its outbox and disconnects.
///
/// Returns success after a clean shutdown, [`EXIT_CONFIG`] after printing a
/// configuration error on one line to stderr, or failure when `main` fails.
pub fn run<T, P, M, F>(service: Service, prepare: P, main: M) -> ExitCode
where
    P: FnOnce(&mut ServiceConfig) -> Result<T, ServiceError>,
    M: FnOnce(T, Context) -> F,
    F: Future<Output = Result<(), ServiceError>>,
{
    let flags = Flags::parse_for(service);
    let outcome = configure(service, flags.env_file, prepare)
        .map_err(Stopped::Config)
        .and_then(|(config, settings)| serve(config, settings, main));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Stopped::Config(error)) => {
            eprintln!("{service}: configuration error: {}", one_line(&error));
            ExitCode::from(EXIT_CONFIG)
        }
        Err(Stopped::Failed(error)) => {
            tracing::error!("{service} stopped: {}", one_line(&error));
            eprintln!("{service}: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// Why a service did not run to a clean shutdown.
enum Stopped {
    /// The variables, the env and config files, the service's own settings,
    /// or the TLS files the client reads as it starts.
    Config(ServiceError),
    /// The service's own logic gave up.
    Failed(ServiceError),
}

/// A service's command line.
#[derive(Debug, Parser)]
struct Flags {
    /// Read variables from this file (docker .env syntax); without it,
    /// ./.env is read when present. Non-empty environment values win.
    #[arg(long, value_name = "PATH")]
    env_file: Option<PathBuf>,
}

impl Flags {
    /// Parses the process's arguments, or exits with clap's message: 0 for
    /// `--help`, 2 for a bad argument.
    fn parse_for(service: Service) -> Self {
        let command = Flags::command()
            .name(service.name())
            .about(format!(
                "Propeller's {service}: reads {prefix}* variables from the environment",
                prefix = service.prefix()
            ))
            .after_help("SIGHUP re-reads the TLS files; SIGTERM or Ctrl-C stops.");
        let matches = command.get_matches();
        Flags::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
    }
}

/// Everything that can go wrong before the network: variables, the env and
/// config files, logging, and the service's own settings.
fn configure<T, P>(
    service: Service,
    env_file: Option<PathBuf>,
    prepare: P,
) -> Result<((ServiceConfig, Option<PathBuf>), T), ServiceError>
where
    P: FnOnce(&mut ServiceConfig) -> Result<T, ServiceError>,
{
    let (mut vars, file) = propeller_mqtt::env_file::service_vars(env_file.as_deref())?;
    let config_toml = propeller_protocol::config_toml::fill(service, &mut vars)?;
    let health_file = vars
        .iter()
        .find(|(name, value)| name == HEALTH_FILE && !value.is_empty())
        .map(|(_, v)| PathBuf::from(v));
    let mut config = ServiceConfig::from_vars(service, vars)?;
    // Logging first, so that what `prepare` finds worth a warning is logged.
    init_logging(&config)?;
    let settings = prepare(&mut config)?;
    if let Some(file) = file {
        info!(file = %file.display(), "read variables from the env file");
    }
    if let Some(file) = config_toml {
        info!(file = %file.display(), "read identity values missing from env from the config file");
    }
    for variable in &config.unknown {
        warn!(variable = %variable, "this variable is not one the service reads: a typo? (ignored)");
    }
    Ok(((config, health_file), settings))
}

fn serve<T, M, F>(
    (config, health_file): (ServiceConfig, Option<PathBuf>),
    settings: T,
    main: M,
) -> Result<(), Stopped>
where
    M: FnOnce(T, Context) -> F,
    F: Future<Output = Result<(), ServiceError>>,
{
    // One thread is plenty for an MQTT client and keeps the idle footprint
    // small; CPU-heavy work (the proplet's modules) goes to blocking threads.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Stopped::Failed(ServiceError::Runtime(e)))?;
    runtime.block_on(async {
        let (client, messages) = Client::start(&config.mqtt, config.topics())
            .map_err(|e| Stopped::Config(e.into()))?;
        if let Some(path) = health_file {
            tokio::spawn(write_health(client.clone(), path));
        }
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let context = Context {
            config,
            client: client.clone(),
            messages,
            stopping,
        };
        let main = main(settings, context);
        tokio::pin!(main);
        let mut signals = Signals::new();
        let outcome = loop {
            tokio::select! {
                signal = signals.next() => match signal {
                    Signal::Reload => {
                        info!(signal = "SIGHUP", "reloading TLS material");
                        client.reload_tls();
                    }
                    Signal::Stop(name) => {
                        info!(signal = name, "stopping");
                        let _ = stop.send(true);
                        break match tokio::time::timeout(STOP_GRACE, &mut main).await {
                            Ok(outcome) => outcome,
                            Err(_) => {
                                tracing::warn!("the service did not stop within {STOP_GRACE:?}: stopping it now");
                                Ok(())
                            }
                        };
                    }
                },
                outcome = &mut main => break outcome,
            }
        };
        client.shutdown().await;
        outcome.map_err(Stopped::Failed)
    })
}

/// The file a service keeps its connection state in, for a container
/// healthcheck (`grep -q ^connected "$PROPELLER_HEALTH_FILE"`). Not prefixed:
/// one image runs any of the three services.
pub const HEALTH_FILE: &str = "PROPELLER_HEALTH_FILE";

/// Replaces `path` with `bytes` by a write to a new file beside it and a
/// rename. The new file is created exclusively, after removing whatever has
/// its name: a symbolic link planted there is removed, never followed.
async fn replace_file(path: &std::path::Path, bytes: Vec<u8>) -> std::io::Result<()> {
    let partial = path.with_extension("partial");
    let (path, write_to) = (path.to_owned(), partial.clone());
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        match std::fs::remove_file(&write_to) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&write_to)?
            .write_all(&bytes)?;
        std::fs::rename(&write_to, &path)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

/// How often the health file's metrics line is refreshed between changes.
const HEALTH_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);

/// Writes `connected` or `disconnected: <why>` to `path` at every change,
/// then the connection's metrics as one line of JSON (refreshed every
/// [`HEALTH_REFRESH`]). The image's healthcheck reads the first line only
/// (`grep -q '^connected'`).
async fn write_health(client: Client, path: PathBuf) {
    let mut state = client.state();
    let mut refresh = tokio::time::interval(HEALTH_REFRESH);
    loop {
        let mut line = match &*state.borrow_and_update() {
            ConnectionState::Connected => "connected\n".to_owned(),
            ConnectionState::Connecting => "disconnected: connecting\n".to_owned(),
            ConnectionState::Retrying { failure, .. } => {
                format!("disconnected: {failure}\n")
            }
            ConnectionState::Closed => "disconnected: stopped\n".to_owned(),
        };
        line.push_str(&metrics_json(&client.metrics()));
        line.push('\n');
        // Write then rename, so a healthcheck never reads half a line.
        let written = replace_file(&path, line.into_bytes()).await;
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "cannot write the health file");
        }
        tokio::select! {
            changed = state.changed() => if changed.is_err() {
                return;
            },
            _ = refresh.tick() => {}
        }
    }
}

/// The connection's metrics as one line of JSON.
fn metrics_json(metrics: &propeller_mqtt::Metrics) -> String {
    let or_null = |value: Option<String>| value.unwrap_or_else(|| "null".to_owned());
    format!(
        "{{\"connected\":{},\"reconnects\":{},\"last_failure_class\":{},\"outbox_depth\":{},\"certificate_days_left\":{},\"ping_round_trip_ms\":{}}}",
        metrics.connected,
        metrics.reconnects,
        // Classes are fixed ASCII names: nothing to escape.
        or_null(metrics.last_failure_class.map(|class| format!("\"{class}\""))),
        metrics.outbox_depth,
        or_null(metrics.certificate_days_left.map(|days| days.to_string())),
        or_null(metrics.ping_round_trip.map(|rtt| format!("{:.3}", rtt.as_secs_f64() * 1000.0))),
    )
}

/// Installs a plain-text tracing subscriber filtered by `<P>_LOG_LEVEL`.
///
/// # Errors
///
/// [`ServiceError::LogFilter`] when the filter does not parse.
pub fn init_logging(config: &ServiceConfig) -> Result<(), ServiceError> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level).map_err(|_| {
        ServiceError::LogFilter {
            var: config.service.var("LOG_LEVEL"),
            value: config.log_level.clone(),
        }
    })?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_target(false)
        .try_init();
    Ok(())
}

/// What the operator asked for.
enum Signal {
    /// SIGHUP: re-read the TLS files.
    Reload,
    /// SIGTERM (docker stop) or SIGINT (Ctrl-C), by name.
    Stop(&'static str),
}

/// The signals a service reacts to.
struct Signals {
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self {
                hangup: signal(SignalKind::hangup()).ok(),
                terminate: signal(SignalKind::terminate()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            tokio::select! {
                Some(()) = recv(&mut self.hangup) => Signal::Reload,
                Some(()) = recv(&mut self.terminate) => Signal::Stop("SIGTERM"),
                _ = tokio::signal::ctrl_c() => Signal::Stop("SIGINT"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Stop("Ctrl-C")
        }
    }
}

/// The next delivery of `signal`; pends forever when it could not be installed.
#[cfg(unix)]
async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match signal {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link planted at the temporary name is removed, not written through.
    #[tokio::test]
    async fn the_health_file_follows_no_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let health = dir.path().join("health");
        std::os::unix::fs::symlink(&victim, health.with_extension("partial")).unwrap();
        replace_file(&health, b"connected\n".to_vec())
            .await
            .unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
        assert_eq!(std::fs::read_to_string(&health).unwrap(), "connected\n");
    }
}
