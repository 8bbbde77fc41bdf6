//! The MQTT client: one MQTT session driven by a background task that
//! reconnects with backoff, fails over between brokers, re-reads rotated TLS
//! files, restores subscriptions, and re-sends what the broker has not
//! acknowledged.
//!
//! rumqttc, the MQTT library underneath, is known to one file only: the
//! adapter, `session.rs`, which lists what it relies on.

mod backoff;
mod driver;
mod failure;
mod outbox;
#[cfg(test)]
mod peer;
mod probe;
mod proxy;
mod session;
mod socket;
#[cfg(test)]
mod tests;
mod transport;
mod websocket;

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use failure::{ConnectionLoss, Failure, IoCause};

/// The diagnosis steps the client takes itself, for tools that walk a
/// connection one step at a time (`propeller-mqtt check`).
pub mod diagnose {
    pub use super::probe::{verdict, VERDICT_WAIT};
    pub use super::proxy::{tunnel, Opened, Tunnel};
    pub use super::transport::{alpn_names, handshake, Route, TlsRoute, TransportError};
    pub use super::websocket::{upgrade, Upgraded, WebSocketRoute, WebSocketStream};
}

use crate::{ClientError, ConfigError, Options, QoS};
use outbox::{Outbox, Refused};
use session::{publish_size, Requests};

/// Inbound messages waiting for the service.
const INBOX: usize = 256;
/// Room in the request queue beyond the outbox, for SUBSCRIBE and
/// DISCONNECT, so that queueing never waits (see [`Shared`]).
const CONTROL_REQUESTS: usize = 1024;

/// An application message received from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic it was published on.
    pub topic: String,
    /// The payload, as sent.
    pub payload: Bytes,
}

/// Where the connection stands, observable through [`Client::state`].
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectionState {
    /// An attempt is under way (the first, or after a reload).
    Connecting,
    /// CONNACK received; the connection is up.
    Connected,
    /// The last attempt failed; the next comes after a backoff delay.
    Retrying {
        /// Why it failed.
        failure: Failure,
        /// How many attempts have failed in a row.
        attempts: u32,
    },
    /// [`Client::shutdown`] ran, or every handle was dropped.
    Closed,
}

/// Resolves when the broker has acknowledged a message (PUBACK at QoS 1,
/// PUBCOMP at QoS 2; at QoS 0, once it is sent).
#[derive(Debug)]
#[must_use = "a Delivery does nothing unless awaited; drop it to not wait"]
pub struct Delivery(oneshot::Receiver<()>);

impl Delivery {
    /// Waits for the acknowledgement, across reconnects if need be.
    ///
    /// # Errors
    ///
    /// [`ClientError::Closed`] if the client shut down first.
    pub async fn acknowledged(self) -> Result<(), ClientError> {
        self.0.await.map_err(|_| ClientError::Closed)
    }
}

/// Says what the outbox directory held at start.
fn log_loaded(
    directory: &outbox::dir::Directory,
    loaded: &outbox::dir::Loaded,
    names: &crate::Names,
) {
    let dir = directory.path().display();
    if !loaded.records.is_empty() {
        info!(
            count = loaded.records.len(),
            dir = %dir,
            "messages a previous process left unacknowledged: sending them after the first CONNACK"
        );
    }
    if loaded.left > 0 {
        warn!(
            left = loaded.left,
            loaded = loaded.records.len(),
            dir = %dir,
            limit_var = %names.var("MQTT_OUTBOX_LIMIT"),
            "more unacknowledged messages on disk than the outbox limit: the oldest are loaded, the rest stay on disk \
             (not deleted) until a start with room; raise the limit to send them now"
        );
    }
}

/// State shared by the client handles and the driver, under one lock so that
/// "connected", the outbox and the request queue always agree.
///
/// Requests enter the queue only while connected and only under this lock,
/// and the queue has room for every outbox entry plus [`CONTROL_REQUESTS`],
/// so sending under the lock never waits. The lock is a plain (not async)
/// mutex: it is never held across an `.await`, and it is taken for a few map
/// operations at a time, so a publisher and the driver never park each other
/// on it.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Whether the connection is up: CONNACK received and not lost since.
    /// The one record of it. The driver serves the connection exactly while
    /// it is set, and [`ConnectionState`] is published only together with it
    /// ([`Shared::set_up`], [`Shared::set_down`]).
    connected: bool,
    state: watch::Sender<ConnectionState>,
    pub outbox: Outbox,
    /// The topics to subscribe at every connection without a session.
    pub topics: Vec<String>,
    /// What [`Client::metrics`] reports, as the driver saw it.
    pub counters: Counters,
    /// Topics the broker granted to this process (SUBACK): with a session,
    /// they are not subscribed again.
    pub confirmed: Vec<String>,
    pub requests: Requests,
}

impl Shared {
    fn new(
        state: watch::Sender<ConnectionState>,
        outbox: Outbox,
        topics: Vec<String>,
        requests: Requests,
    ) -> Self {
        Self {
            connected: false,
            state,
            outbox,
            topics,
            confirmed: Vec::new(),
            counters: Counters::default(),
            requests,
        }
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    /// The connection is up: requests may enter the queue.
    pub fn set_up(&mut self) {
        self.connected = true;
        self.state.send_replace(ConnectionState::Connected);
    }

    /// The connection is down (or was never up), for the reason `state` says.
    pub fn set_down(&mut self, state: ConnectionState) {
        debug_assert!(state != ConnectionState::Connected);
        self.connected = false;
        self.state.send_replace(state);
    }

    /// Puts outbox entry `id` on the request queue.
    pub fn send(&mut self, id: u64) -> Result<(), ClientError> {
        match self.outbox.get(id) {
            Some(entry) => self
                .requests
                .publish(id, &entry.topic, &entry.payload, entry.qos),
            None => Ok(()),
        }
    }
}

/// The shared state, even if a thread panicked while holding it: every
/// critical section leaves it consistent between statements.
pub(crate) fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a client handle asks of the driver.
/// The driver's running figures, kept with the shared state.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// CONNACKs received.
    pub connections: u64,
    /// The class of the last failure, if any.
    pub last_failure: Option<&'static str>,
    /// When the client certificate in use expires (seconds since the epoch).
    pub certificate_not_after: Option<i64>,
    /// The last PINGREQ to PINGRESP time.
    pub ping_round_trip: Option<Duration>,
}

/// A snapshot of a [`Client`]'s connection ([`Client::metrics`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// Connected now.
    pub connected: bool,
    /// CONNACKs received since the client started.
    pub connections: u64,
    /// Connections after the first: how often the link was restored.
    pub reconnects: u64,
    /// [`Failure::class`] of the last failure, if there was one.
    pub last_failure_class: Option<&'static str>,
    /// Messages waiting for the broker's acknowledgement.
    pub outbox_depth: usize,
    /// Whole days until the client certificate expires (negative once it
    /// has); `None` without one.
    pub certificate_days_left: Option<i64>,
    /// The last keep-alive round trip (PINGREQ to PINGRESP); `None` before
    /// the first.
    pub ping_round_trip: Option<Duration>,
}

#[derive(Debug)]
pub(crate) enum Command {
    /// Re-read the TLS files; reconnect if they changed.
    ReloadTls,
}

/// A connection to the broker, kept alive in the background. Cheap to clone;
/// the connection lives until [`Client::shutdown`] or the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    qos: QoS,
    shared: Arc<Mutex<Shared>>,
    state: watch::Receiver<ConnectionState>,
    commands: mpsc::UnboundedSender<Command>,
    stop: watch::Sender<bool>,
    driver: std::sync::Mutex<Option<JoinHandle<()>>>,
    shutdown_timeout: Duration,
    outbox_var: String,
    outbox_limit: usize,
    max_packet_var: String,
    max_packet: usize,
    outbox_dir: Option<std::path::PathBuf>,
}

impl Client {
    /// Reads and checks the TLS files, logs the mode, and starts connecting in
    /// the background (on the current tokio runtime). Returns at once: failures
    /// to connect are retried, logged, and visible through [`Client::state`].
    ///
    /// `topics` are subscribed at every connection on which the broker kept no
    /// session. Received messages arrive on the returned channel.
    ///
    /// # Errors
    ///
    /// A setting out of range ([`Options::validate`]) or any problem with
    /// the TLS files, before any network I/O; see [`ConfigError`].
    pub fn start(
        config: &Options,
        topics: Vec<String>,
    ) -> Result<(Self, mpsc::Receiver<Message>), ConfigError> {
        config.validate()?;
        let tls = config.load_tls()?;
        // Before anything is logged: a directory locked by another process
        // is a configuration error, one line and exit 78 in the services.
        let (outbox, directory) = match &config.outbox_dir {
            None => (Outbox::new(config.outbox_limit), None),
            Some(path) => {
                let var = config.names.var("MQTT_OUTBOX_DIR");
                let (directory, loaded) = outbox::dir::Directory::open(
                    path,
                    &var,
                    config.outbox_limit,
                    config.max_packet_size,
                )?;
                log_loaded(&directory, &loaded, &config.names);
                let (handle, queue) = outbox::writer::channel();
                let outbox = Outbox::on_disk(config.outbox_limit, handle, loaded);
                (outbox, Some((directory, queue)))
            }
        };
        info!(
            mode = %config.mode(),
            broker = %config.brokers[0],
            brokers = config.brokers.len(),
            client_id = %config.client_id,
            trust = ?tls.as_ref().map(|t| &t.trust),
            "MQTT configuration loaded"
        );
        if let Some(tls) = &tls {
            for warning in &tls.warnings {
                warn!("{warning}");
            }
        }
        // The socket (TCP_NODELAY, TCP_QUICKACK) is ours: see `socket`.
        let (session, requests) =
            session::open(config, tls.as_ref(), config.outbox_limit + CONTROL_REQUESTS);
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX);
        let (state_tx, state_rx) = watch::channel(ConnectionState::Connecting);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Mutex::new(Shared::new(state_tx, outbox, topics, requests)));
        if let Some((directory, queue)) = directory {
            let (var, path) = (directory.var().to_owned(), directory.path().to_owned());
            outbox::writer::spawn(directory, queue, Arc::downgrade(&shared)).map_err(|e| {
                ConfigError::OutboxDir {
                    var,
                    path,
                    problem: "cannot start the thread that writes it".to_owned(),
                    source: Some(e),
                }
            })?;
        }
        let driver = driver::Driver::new(driver::Parts {
            session,
            config: config.clone(),
            tls,
            shared: shared.clone(),
            inbox: inbox_tx,
            stop: stop_rx,
            commands: commands_rx,
        });
        let inner = Inner {
            qos: config.qos,
            shared,
            state: state_rx,
            commands: commands_tx,
            stop: stop_tx,
            driver: std::sync::Mutex::new(Some(tokio::spawn(driver.run()))),
            shutdown_timeout: config.connect_timeout,
            outbox_var: config.names.var("MQTT_OUTBOX_LIMIT"),
            outbox_limit: config.outbox_limit,
            max_packet_var: config.names.var("MQTT_MAX_PACKET_SIZE"),
            max_packet: config.max_packet_size,
            outbox_dir: config.outbox_dir.clone(),
        };
        Ok((
            Client {
                inner: Arc::new(inner),
            },
            inbox_rx,
        ))
    }

    /// Watches the connection state.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.state.clone()
    }

    /// Publishes `payload` on `topic` with the configured QoS. Returns as soon
    /// as the message is recorded: sent now if connected, after the reconnect
    /// otherwise, and sent again after every reconnect until acknowledged.
    /// With an outbox directory ([`Options::outbox_dir`]) and QoS 1 or 2,
    /// recorded means durably written there, so that it is sent even if this
    /// process dies first; a `publish` cancelled while it waits for the disk
    /// still stores and sends its message.
    ///
    /// # Errors
    ///
    /// [`ClientError::TooLarge`] for a message over `<P>_MQTT_MAX_PACKET_SIZE`,
    /// which the broker would refuse on every attempt, so it is never queued;
    /// [`ClientError::OutboxFull`] when `<P>_MQTT_OUTBOX_LIMIT` messages already wait
    /// for the broker; [`ClientError::OutboxWrite`] when the outbox directory
    /// cannot store it (not queued either); [`ClientError::Closed`] once the
    /// client has shut down.
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Result<Delivery, ClientError> {
        if *self.inner.stop.borrow() {
            return Err(ClientError::Closed);
        }
        let (topic, payload) = (topic.into(), payload.into());
        let size = publish_size(topic.len(), payload.len(), self.inner.qos);
        if size > self.inner.max_packet {
            return Err(ClientError::TooLarge {
                var: self.inner.max_packet_var.clone(),
                topic: topic.chars().take(200).collect(),
                size,
                limit: self.inner.max_packet,
            });
        }
        let qos = self.inner.qos;
        let full = |refused| match refused {
            Refused::Full => ClientError::OutboxFull {
                var: self.inner.outbox_var.clone(),
                limit: self.inner.outbox_limit,
            },
            Refused::Closed => ClientError::Closed,
        };
        let written = {
            let mut shared = lock(&self.inner.shared);
            if !shared.outbox.stores(qos) {
                let (id, delivered) = shared.outbox.add(topic, payload, qos).map_err(full)?;
                if shared.connected() {
                    shared.send(id)?;
                }
                return Ok(Delivery(delivered));
            }
            // Queued to the outbox directory's writer under the lock, so
            // that messages reach it, and the broker, in publishing order.
            shared.outbox.store(topic, payload, qos).map_err(full)?
        };
        // Cancelling this wait does not cancel the write: the message is
        // then stored and sent all the same.
        match written.await {
            Ok(written) => written.map(Delivery),
            Err(_) => Err(ClientError::Closed),
        }
    }

    /// Subscribes to `topic` now if connected, and after every reconnect.
    ///
    /// # Errors
    ///
    /// [`ClientError::Closed`] once the client has shut down.
    pub async fn subscribe(&self, topic: impl Into<String>) -> Result<(), ClientError> {
        let topic = topic.into();
        let mut shared = lock(&self.inner.shared);
        if shared.topics.contains(&topic) {
            return Ok(());
        }
        shared.topics.push(topic.clone());
        if shared.connected() {
            shared.requests.subscribe(vec![topic], self.inner.qos)?;
        }
        Ok(())
    }

    /// Re-reads the TLS files (the service calls this on SIGHUP). If they
    /// changed and are valid, the client reconnects with them; if they are
    /// broken, it keeps the connection and the material it has, and logs why.
    pub fn reload_tls(&self) {
        let _ = self.inner.commands.send(Command::ReloadTls);
    }

    /// A snapshot of the connection's figures, for `/metrics` and health
    /// files.
    pub fn metrics(&self) -> Metrics {
        let shared = lock(&self.inner.shared);
        let counters = &shared.counters;
        Metrics {
            connected: shared.connected(),
            connections: counters.connections,
            reconnects: counters.connections.saturating_sub(1),
            last_failure_class: counters.last_failure,
            outbox_depth: shared.outbox.len(),
            certificate_days_left: counters
                .certificate_not_after
                .map(|not_after| (not_after - crate::tls::unix_now()).div_euclid(86_400)),
            ping_round_trip: counters.ping_round_trip,
        }
    }

    /// How many messages wait for the broker's acknowledgement.
    pub async fn unacknowledged(&self) -> usize {
        lock(&self.inner.shared).outbox.len()
    }

    /// Runs until `shutdown` resolves (a signal, a cancellation token, the
    /// end of the caller's work), then shuts down as [`Client::shutdown`]
    /// does. Returns how many messages were left unacknowledged.
    ///
    /// ```no_run
    /// # async fn demo(client: propeller_mqtt::Client) {
    /// let left = client.run_until(tokio::signal::ctrl_c()).await;
    /// # }
    /// ```
    pub async fn run_until<F: Future>(&self, shutdown: F) -> usize {
        shutdown.await;
        self.shutdown().await
    }

    /// Waits up to the connect timeout for unacknowledged messages, then sends
    /// DISCONNECT if connected and stops the background task. Returns how many
    /// messages were left unacknowledged.
    /// With an outbox directory, those at QoS 1 and 2 stay there for the next
    /// start, and the directory is released before this returns.
    pub async fn shutdown(&self) -> usize {
        let deadline = Instant::now() + self.inner.shutdown_timeout;
        let mut left = self.unacknowledged().await;
        while left > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            left = self.unacknowledged().await;
        }
        if left > 0 {
            match &self.inner.outbox_dir {
                Some(dir) => warn!(
                    left,
                    dir = %dir.display(),
                    "shutting down with messages the broker has not acknowledged: \
                     those at QoS 1 and 2 stay in the outbox directory and are sent after the next start"
                ),
                None => warn!(
                    left,
                    "shutting down with messages the broker has not acknowledged"
                ),
            }
        }
        let _ = self.inner.stop.send(true);
        lock(&self.inner.shared).requests.disconnect();
        let driver = self
            .inner
            .driver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut driver) = driver {
            let grace = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_secs(1));
            if tokio::time::timeout(grace, &mut driver).await.is_err() {
                warn!("the broker did not take DISCONNECT in time; closing anyway");
                driver.abort();
            }
        }
        // The outbox directory's lock is released before this returns, so
        // that a client started next on the directory finds it free.
        let closed = lock(&self.inner.shared).outbox.close();
        if let Some(closed) = closed {
            let _ = closed.await;
        }
        left
    }
}
