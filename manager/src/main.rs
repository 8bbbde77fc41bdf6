//! Propeller's manager: tracks proplets and dispatches tasks, with an HTTP
//! API for operators.
//!
//! Configured by `MANAGER_*` variables; see the README.

mod api;
mod domain;
mod multipart;
mod registry;
mod tasks;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use propeller_mqtt::config::value;
use propeller_mqtt::service::{self, Context};
use propeller_mqtt::{Config, Error, Service};
use tracing::info;

use domain::Manager;
use registry::Registry;

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
    let manager = Arc::new(Manager::new(
        context.client.clone(),
        context.config.channel.clone(),
        Registry::new(settings.liveliness),
        context.config.max_packet_size,
    ));
    tokio::spawn(api::serve(listener, manager.clone()));
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sweep.tick() => manager.lock().sweep(Instant::now()),
            message = context.messages.recv() => match message {
                Some(message) => manager.receive(&message),
                None => return Ok(()),
            },
            _ = context.stopping.changed() => return Ok(()),
        }
    }
}
