//! What every service binary does around its own logic: read the config,
//! install logging, connect, run until SIGTERM or Ctrl-C, disconnect.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use tracing::info;

use crate::{one_line, Client, Config, Error, Message, Service};

/// Exit status for a configuration error (`EX_CONFIG` of sysexits.h).
pub const EXIT_CONFIG: u8 = 78;

/// Runs `service` subscribed to its [`Service::topics`], handing each received
/// message to `handle`, until SIGTERM or Ctrl-C.
///
/// Returns success after a clean shutdown, or [`EXIT_CONFIG`] after printing a
/// configuration error on one line to stderr.
pub fn run<H, F>(service: Service, handle: H) -> ExitCode
where
    H: FnMut(&Client, Message) -> F,
    F: Future<Output = ()>,
{
    let env_file = match env_file_argument(std::env::args().skip(1)) {
        Ok(Arguments::Run(env_file)) => env_file,
        Ok(Arguments::Help) => {
            println!("{}", usage(service));
            return ExitCode::SUCCESS;
        }
        Err(problem) => {
            eprintln!("{service}: {problem}\n{}", usage(service));
            return ExitCode::from(2);
        }
    };
    match start(service, env_file, handle) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{service}: configuration error: {}", one_line(&error));
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

enum Arguments {
    Run(Option<PathBuf>),
    Help,
}

/// A service takes one option: `--env-file PATH`.
fn env_file_argument(mut args: impl Iterator<Item = String>) -> Result<Arguments, String> {
    let mut env_file = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Arguments::Help),
            "--env-file" => {
                env_file = Some(PathBuf::from(args.next().ok_or("--env-file needs a path")?))
            }
            _ => match arg.strip_prefix("--env-file=") {
                Some(path) => env_file = Some(PathBuf::from(path)),
                None => return Err(format!("unknown argument {arg:?}")),
            },
        }
    }
    Ok(Arguments::Run(env_file))
}

fn usage(service: Service) -> String {
    format!(
        "usage: {service} [--env-file PATH]\n\n\
         Reads {prefix}* variables from the environment, over PATH (docker .env syntax)\n\
         or over ./.env when no file is named. Non-empty environment values win.\n\
         SIGHUP re-reads the TLS files; SIGTERM or Ctrl-C stops.",
        prefix = service.prefix()
    )
}

fn start<H, F>(service: Service, env_file: Option<PathBuf>, mut handle: H) -> Result<(), Error>
where
    H: FnMut(&Client, Message) -> F,
    F: Future<Output = ()>,
{
    let (vars, file) = crate::env_file::service_vars(env_file.as_deref())?;
    let health_file = vars
        .iter()
        .find(|(name, value)| name == HEALTH_FILE && !value.is_empty())
        .map(|(_, v)| PathBuf::from(v));
    let config = Config::from_vars(service, vars)?;
    init_logging(&config)?;
    if let Some(file) = file {
        info!(file = %file.display(), "read variables from the env file");
    }
    // One thread is plenty for an MQTT client and keeps the idle footprint small.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    runtime.block_on(async {
        let topics = service
            .topics()
            .iter()
            .map(|suffix| config.channel.topic(suffix))
            .collect();
        let (client, mut messages) = Client::start(&config, topics)?;
        if let Some(path) = health_file {
            tokio::spawn(write_health(client.state(), path));
        }
        let mut signals = Signals::new();
        loop {
            tokio::select! {
                signal = signals.next() => match signal {
                    Signal::Reload => {
                        info!(signal = "SIGHUP", "reloading TLS material");
                        client.reload_tls();
                    }
                    Signal::Stop(name) => {
                        info!(signal = name, "stopping");
                        break;
                    }
                },
                Some(message) = messages.recv() => handle(&client, message).await,
            }
        }
        client.shutdown().await;
        Ok(())
    })
}

/// The file a service keeps its connection state in, for a container
/// healthcheck (`grep -q ^connected "$PROPELLER_HEALTH_FILE"`). Not prefixed:
/// one image runs any of the three services.
pub const HEALTH_FILE: &str = "PROPELLER_HEALTH_FILE";

/// Writes `connected` or `disconnected: <why>` to `path` at every change.
async fn write_health(
    mut state: tokio::sync::watch::Receiver<crate::ConnectionState>,
    path: PathBuf,
) {
    loop {
        let line = match &*state.borrow_and_update() {
            crate::ConnectionState::Connected => "connected\n".to_owned(),
            crate::ConnectionState::Connecting => "disconnected: connecting\n".to_owned(),
            crate::ConnectionState::Retrying { failure, .. } => {
                format!("disconnected: {failure}\n")
            }
            crate::ConnectionState::Closed => "disconnected: stopped\n".to_owned(),
        };
        // Write then rename, so a healthcheck never reads half a line.
        let partial = path.with_extension("partial");
        let written = tokio::fs::write(&partial, line)
            .await
            .and(tokio::fs::rename(&partial, &path).await);
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "cannot write the health file");
        }
        if state.changed().await.is_err() {
            return;
        }
    }
}

/// Installs a plain-text tracing subscriber filtered by `<P>_LOG_LEVEL`.
///
/// # Errors
///
/// [`Error::LogFilter`] when the filter does not parse.
pub fn init_logging(config: &Config) -> Result<(), Error> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level).map_err(|_| {
        Error::LogFilter {
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
