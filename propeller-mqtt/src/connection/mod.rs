//! The MQTT client: one rumqttc event loop driven by a background task that
//! reconnects with backoff, fails over between brokers, re-reads rotated TLS
//! files, restores subscriptions, and re-sends what the broker has not
//! acknowledged.

mod backoff;
mod driver;
mod failure;
mod outbox;
mod probe;
mod proxy;
mod socket;
mod subscriptions;
mod transport;
mod websocket;

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::{AsyncClient, QoS};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use failure::Failure;

/// The diagnosis steps the client takes itself, for tools that walk a
/// connection one step at a time (`propeller-mqtt check`).
pub mod diagnose {
    pub use super::probe::{verdict, VERDICT_WAIT};
    pub use super::proxy::{tunnel, Opened, Tunnel};
    pub use super::transport::{alpn_names, handshake, Route, TlsRoute, TransportError};
    pub use super::websocket::{upgrade, Upgraded, WebSocketRoute, WebSocketStream};
}

use crate::{ClientError, ConfigError, Options};
use outbox::Outbox;
use subscriptions::Subscriptions;

/// Inbound messages waiting for the service.
const INBOX: usize = 256;
/// Room in rumqttc's request queue beyond the outbox, for SUBSCRIBE and
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// State shared by the client handles and the driver, under one lock so that
/// "connected", the outbox and rumqttc's request queue always agree.
///
/// Requests enter rumqttc's queue only while connected and only under this
/// lock, and the queue has room for every outbox entry plus
/// [`CONTROL_REQUESTS`], so sending under the lock never waits. The lock is
/// a plain (not async) mutex: it is never held across an `.await`, and it is
/// taken for a few map operations at a time, so a publisher and the driver
/// never park each other on it.
#[derive(Debug)]
pub(crate) struct Shared {
    pub connected: bool,
    pub outbox: Outbox,
    pub subscriptions: Subscriptions,
}

impl Shared {
    /// Puts outbox entry `id` on rumqttc's request queue.
    pub fn send(&mut self, mqtt: &AsyncClient, id: u64) -> Result<(), ClientError> {
        let Some(entry) = self.outbox.get(id) else {
            return Ok(());
        };
        let queued =
            mqtt.publish_bytes(entry.topic.clone(), entry.qos, false, entry.payload.clone());
        match ready_now(queued) {
            Some(Ok(())) => {}
            // Closed, or (against the sizing above) full.
            Some(Err(_)) | None => return Err(ClientError::Closed),
        }
        self.outbox.queued(id);
        Ok(())
    }
}

/// The shared state, even if a thread panicked while holding it: every
/// critical section leaves it consistent between statements.
pub(crate) fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `future` once: its output if it is ready at once. rumqttc's queue
/// takes a request without waiting when it has room, which [`Shared`]
/// guarantees; this lets the request enter under the plain lock.
fn ready_now<F: Future>(future: F) -> Option<F::Output> {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

/// The size of a PUBLISH packet: fixed header, remaining length, topic,
/// packet id (QoS 1 and 2) and payload, as rumqttc checks it against the
/// maximum packet size.
fn publish_size(topic: usize, payload: usize, qos: QoS) -> usize {
    let id = match qos {
        QoS::AtMostOnce => 0,
        _ => 2,
    };
    let remaining = 2 + topic + id + payload;
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    1 + length_bytes + remaining
}

/// What a client handle asks of the driver.
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
    mqtt: AsyncClient,
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
        let options = driver::mqtt_options(config, &config.brokers[0], tls.as_ref());
        let (mqtt, eventloop) = AsyncClient::new(options, config.outbox_limit + CONTROL_REQUESTS);
        // The socket (TCP_NODELAY, TCP_QUICKACK) is ours: see `socket`.
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX);
        let (state_tx, state_rx) = watch::channel(ConnectionState::Connecting);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Mutex::new(Shared {
            connected: false,
            outbox: Outbox::new(config.outbox_limit),
            subscriptions: Subscriptions::new(topics, config.qos),
        }));
        let driver = driver::Driver::new(driver::Parts {
            eventloop,
            mqtt: mqtt.clone(),
            config: config.clone(),
            tls,
            shared: shared.clone(),
            inbox: inbox_tx,
            state: state_tx,
            stop: stop_rx,
            commands: commands_rx,
        });
        let inner = Inner {
            mqtt,
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
    ///
    /// # Errors
    ///
    /// [`ClientError::TooLarge`] for a message over `<P>_MQTT_MAX_PACKET_SIZE`,
    /// which the broker would refuse on every attempt, so it is never queued;
    /// [`ClientError::OutboxFull`] when `<P>_MQTT_OUTBOX_LIMIT` messages already wait
    /// for the broker; [`ClientError::Closed`] once the client has shut down.
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
        let mut shared = lock(&self.inner.shared);
        let (id, delivered) = shared
            .outbox
            .add(topic, payload, self.inner.qos)
            .map_err(|_| ClientError::OutboxFull {
                var: self.inner.outbox_var.clone(),
                limit: self.inner.outbox_limit,
            })?;
        if shared.connected {
            shared.send(&self.inner.mqtt, id)?;
        }
        Ok(Delivery(delivered))
    }

    /// Subscribes to `topic` now if connected, and after every reconnect.
    ///
    /// # Errors
    ///
    /// [`ClientError::Closed`] once the client has shut down.
    pub async fn subscribe(&self, topic: impl Into<String>) -> Result<(), ClientError> {
        let topic = topic.into();
        let mut shared = lock(&self.inner.shared);
        if shared.subscriptions.all.contains(&topic) {
            return Ok(());
        }
        shared.subscriptions.all.push(topic.clone());
        if shared.connected {
            shared
                .subscriptions
                .subscribe(&self.inner.mqtt, vec![topic])?;
        }
        Ok(())
    }

    /// Re-reads the TLS files (the service calls this on SIGHUP). If they
    /// changed and are valid, the client reconnects with them; if they are
    /// broken, it keeps the connection and the material it has, and logs why.
    pub fn reload_tls(&self) {
        let _ = self.inner.commands.send(Command::ReloadTls);
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
    pub async fn shutdown(&self) -> usize {
        let deadline = Instant::now() + self.inner.shutdown_timeout;
        let mut left = self.unacknowledged().await;
        while left > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            left = self.unacknowledged().await;
        }
        if left > 0 {
            warn!(
                left,
                "shutting down with messages the broker has not acknowledged"
            );
        }
        let _ = self.inner.stop.send(true);
        let _ = self.inner.mqtt.try_disconnect();
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
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our size check agrees with the one rumqttc applies when writing, at
    /// every boundary of the remaining-length encoding.
    #[test]
    fn publish_size_is_rumqttcs() {
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            for payload in [0, 100, 122, 123, 124, 16_370, 16_380, 2_097_140, 2_097_150] {
                let topic = "m/d/c/ch/control/proplet/results";
                let mut packet = rumqttc::Publish::new(topic, qos, vec![0u8; payload]);
                // As sent: rumqttc gives QoS 1 and 2 a packet id.
                packet.pkid = 1;
                assert_eq!(
                    publish_size(topic.len(), payload, qos),
                    rumqttc::Packet::Publish(packet).size(),
                    "{qos:?} {payload}"
                );
            }
        }
    }
}
