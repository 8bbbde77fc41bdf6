//! Propeller's manager: tracks proplets and dispatches tasks, with an HTTP
//! API for operators.
//!
//! Configured by `MANAGER_*` variables; see the README.

mod api;
mod domain;
mod multipart;
mod registry;
mod store;
mod tasks;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use propeller_mqtt::env::value;
use propeller_mqtt::ConfigError;
use propeller_protocol::{Service, ServiceConfig};
use propeller_service::{self as service, Context, ServiceError};
use tracing::info;

use domain::{Manager, State};
use registry::Registry;
use store::{Handle, Snapshot, Store, StoreState};

struct Settings {
    liveliness: Duration,
    listener: std::net::TcpListener,
    store: Store,
    /// What the store held, when it was read before connecting.
    snapshot: Option<Snapshot>,
}

impl Settings {
    /// Reads `MANAGER_LIVELINESS_INTERVAL`, binds the API's address, so
    /// that a port in use is reported before connecting, and opens the
    /// store, so that a bad store file is too.
    fn prepare(config: &mut ServiceConfig) -> Result<Self, ServiceError> {
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
            .map_err(|_| {
                ServiceError::from(ConfigError::Invalid {
                    var: settings.var("HTTP_HOST"),
                    value: host.to_owned(),
                    problem: "write an IP address of this host, such as 0.0.0.0 or 127.0.0.1"
                        .to_owned(),
                })
            })
            .and_then(|socket| {
                std::net::TcpListener::bind(socket).map_err(|source| ServiceError::Listen {
                    var: vars.clone(),
                    address: address.clone(),
                    source,
                })
            })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ServiceError::Listen {
                var: vars,
                address,
                source,
            })?;
        let (store, snapshot) = Store::open(settings, &config.mqtt.client_id)?;
        Ok(Self {
            liveliness,
            listener,
            store,
            snapshot,
        })
    }
}

fn main() -> ExitCode {
    service::run(Service::Manager, Settings::prepare, serve)
}

async fn serve(settings: Settings, mut context: Context) -> Result<(), ServiceError> {
    let listener =
        tokio::net::TcpListener::from_std(settings.listener).map_err(ServiceError::Runtime)?;
    if let Ok(address) = listener.local_addr() {
        info!(%address, "HTTP API listening");
    }
    let (kind, location) = (settings.store.kind(), settings.store.location());
    let opened = settings.snapshot.is_some();
    if let Some(snapshot) = &settings.snapshot {
        info!(
            store = kind,
            location,
            tasks = snapshot.tasks.len(),
            proplets = snapshot.proplets.len(),
            "store loaded"
        );
    }
    let state = State::new(
        Registry::new(settings.liveliness),
        context.config.mqtt.max_packet_size,
        settings.snapshot,
    );
    let store = Handle::new(
        kind,
        location,
        match opened {
            true => StoreState::Ready,
            false => StoreState::Connecting,
        },
    );
    let manager = Arc::new(Manager::new(
        context.client.clone(),
        context.config.channel.clone(),
        state,
        store,
    ));
    let (stop_writer, writer_stopping) = tokio::sync::watch::channel(false);
    let writer = tokio::spawn(store::writer::run(
        manager.clone(),
        settings.store,
        opened,
        writer_stopping,
    ));
    tokio::spawn(api::serve(listener, manager.clone()));
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sweep.tick() => manager.sweep(),
            message = context.messages.recv() => match message {
                Some(message) => manager.receive(&message),
                None => break,
            },
            _ = context.stopping.changed() => break,
        }
    }
    // What changed since the last write (results, heartbeats) goes out now.
    let _ = stop_writer.send(true);
    let _ = tokio::time::timeout(WRITER_GRACE, writer).await;
    Ok(())
}

/// How long the last write may take at shutdown, within the service's grace.
const WRITER_GRACE: Duration = Duration::from_secs(3);
