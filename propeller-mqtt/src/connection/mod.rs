//! The MQTT client: one rumqttc event loop driven by a background task that
//! reconnects with backoff, restores subscriptions, and reports its state.

mod backoff;
mod failure;
mod probe;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

pub use failure::Failure;

use crate::config::Config;
use crate::tls::TlsSetup;
use crate::Error;
use backoff::Backoff;

const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// rumqttc's request queue: publishes and subscribes waiting for the event loop.
const REQUEST_QUEUE: usize = 64;
/// Inbound messages waiting for the service.
const INBOX: usize = 256;

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
    /// The first attempt is under way.
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

/// A connection to the broker, kept alive in the background.
///
/// Dropping every `Client` stops the background task.
#[derive(Debug)]
pub struct Client {
    mqtt: AsyncClient,
    qos: QoS,
    topics: Arc<Mutex<Topics>>,
    state: watch::Receiver<ConnectionState>,
    stop: watch::Sender<bool>,
    driver: JoinHandle<()>,
    shutdown_timeout: Duration,
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
    /// Any problem with the TLS files, before any network I/O; see [`Error`].
    pub fn start(
        config: &Config,
        topics: Vec<String>,
    ) -> Result<(Self, mpsc::Receiver<Message>), Error> {
        let tls = TlsSetup::load(config)?;
        info!(
            mode = %config.mode(),
            broker = %config.broker,
            client_id = %config.client_id,
            trust = ?tls.as_ref().map(|t| &t.trust),
            "MQTT configuration loaded"
        );
        if let Some(tls) = &tls {
            for warning in &tls.warnings {
                warn!("{warning}");
            }
        }
        let options = mqtt_options(config, tls.as_ref());
        let (mqtt, eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
        let (inbox_tx, inbox_rx) = mpsc::channel(INBOX);
        let (state_tx, state_rx) = watch::channel(ConnectionState::Connecting);
        let (stop_tx, stop_rx) = watch::channel(false);
        let topics = Arc::new(Mutex::new(Topics::new(topics, config.qos)));
        let driver = Driver {
            eventloop,
            mqtt: mqtt.clone(),
            config: config.clone(),
            topics: topics.clone(),
            inbox: inbox_tx,
            state: state_tx,
            stop: stop_rx,
            backoff: Backoff::new(MIN_BACKOFF, MAX_BACKOFF),
            insecure: tls
                .as_ref()
                .is_some_and(|t| t.trust == crate::tls::Trust::SkipVerify),
            tls: tls.clone(),
        };
        let client = Client {
            mqtt,
            qos: config.qos,
            topics,
            state: state_rx,
            stop: stop_tx,
            driver: tokio::spawn(driver.run()),
            shutdown_timeout: config.connect_timeout,
        };
        Ok((client, inbox_rx))
    }

    /// Watches the connection state.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.state.clone()
    }

    /// Publishes `payload` on `topic` with the configured QoS. Waits only for
    /// room in the request queue, not for the broker.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the client has shut down.
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Result<(), Error> {
        self.mqtt
            .publish_bytes(topic, self.qos, false, payload.into())
            .await
            .map_err(|_| Error::Closed)
    }

    /// Subscribes to `topic` now if connected, and after every reconnect.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] once the client has shut down.
    pub fn subscribe(&self, topic: impl Into<String>) -> Result<(), Error> {
        let topic = topic.into();
        let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        if topics.all.contains(&topic) {
            return Ok(());
        }
        topics.all.push(topic.clone());
        if *self.state.borrow() == ConnectionState::Connected {
            topics.send(&self.mqtt, vec![topic])?;
        }
        Ok(())
    }

    /// Sends DISCONNECT if connected and stops the background task, waiting at
    /// most the connect timeout.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.mqtt.try_disconnect();
        let mut driver = self.driver;
        if tokio::time::timeout(self.shutdown_timeout, &mut driver)
            .await
            .is_err()
        {
            warn!("the broker did not take DISCONNECT in time; closing anyway");
            driver.abort();
        }
    }
}

fn mqtt_options(config: &Config, tls: Option<&TlsSetup>) -> MqttOptions {
    let mut options = MqttOptions::new(&config.client_id, &config.broker.host, config.broker.port);
    // Magistrala's edge needs both username and password in CONNECT.
    options
        .set_credentials(&config.client_id, config.client_key.expose())
        .set_keep_alive(config.keep_alive)
        .set_max_packet_size(config.max_packet_size, config.max_packet_size)
        .set_clean_session(true);
    if let Some(tls) = tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            tls.client_config.clone(),
        )));
    }
    options
}

/// The topics to keep subscribed, and which SUBSCRIBE packets await a SUBACK.
#[derive(Debug)]
struct Topics {
    all: Vec<String>,
    qos: QoS,
    /// Topic lists of SUBSCRIBE requests queued to rumqttc, in order; rumqttc
    /// tells us their packet ids only as it sends them.
    queued: VecDeque<Vec<String>>,
    /// Topic lists of sent SUBSCRIBE packets, by packet id.
    sent: HashMap<u16, Vec<String>>,
}

impl Topics {
    fn new(all: Vec<String>, qos: QoS) -> Self {
        Self {
            all,
            qos,
            queued: VecDeque::new(),
            sent: HashMap::new(),
        }
    }

    fn send(&mut self, mqtt: &AsyncClient, topics: Vec<String>) -> Result<(), Error> {
        let filters = topics
            .iter()
            .map(|t| SubscribeFilter::new(t.clone(), self.qos));
        mqtt.try_subscribe_many(filters)
            .map_err(|_| Error::Closed)?;
        self.queued.push_back(topics);
        Ok(())
    }
}

/// Owns the event loop; runs until stopped or every client handle is dropped.
struct Driver {
    eventloop: EventLoop,
    mqtt: AsyncClient,
    config: Config,
    topics: Arc<Mutex<Topics>>,
    inbox: mpsc::Sender<Message>,
    state: watch::Sender<ConnectionState>,
    stop: watch::Receiver<bool>,
    backoff: Backoff,
    insecure: bool,
    /// The TLS setup, to diagnose connections closed before CONNACK.
    tls: Option<TlsSetup>,
}

impl Driver {
    async fn run(mut self) {
        let mut connected = false;
        let mut attempts = 0u32;
        loop {
            let polled = if connected {
                // Keep polling while connected, even when stopping: that is what
                // sends the DISCONNECT.
                self.eventloop.poll().await
            } else {
                let mut stop = self.stop.clone();
                tokio::select! {
                    _ = stop.wait_for(|stop| *stop) => break,
                    // rumqttc's own timeout has whole-second resolution.
                    polled = tokio::time::timeout(self.config.connect_timeout, self.eventloop.poll()) => {
                        polled.unwrap_or(Err(ConnectionError::NetworkTimeout))
                    }
                }
            };
            match polled {
                Ok(Event::Incoming(Incoming::ConnAck(connack))) => {
                    connected = true;
                    attempts = 0;
                    self.backoff.reset();
                    self.on_connected(connack.session_present);
                }
                Ok(Event::Incoming(Incoming::Publish(publish))) => {
                    let message = Message {
                        topic: publish.topic,
                        payload: publish.payload,
                    };
                    debug!(topic = %message.topic, bytes = message.payload.len(), "message received");
                    // A service that ignores messages drops the receiver; that is fine.
                    let _ = self.inbox.send(message).await;
                }
                Ok(Event::Incoming(Incoming::SubAck(suback))) => {
                    self.on_suback(suback.pkid, &suback.return_codes)
                }
                Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                    let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(sent) = topics.queued.pop_front() {
                        topics.sent.insert(pkid, sent);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(_) => {}
                Err(ConnectionError::RequestsDone) => break,
                Err(_) if *self.stop.borrow() => break,
                Err(error) => {
                    let mut failure = Failure::classify(&error, connected, self.config.mode());
                    if let (Failure::ClosedBeforeConnAck, Some(tls)) = (&failure, &self.tls) {
                        if let Some(refusal) =
                            probe::tls_refusal(&self.config.broker, tls, self.config.mode()).await
                        {
                            failure = refusal;
                        }
                    }
                    connected = false;
                    attempts += 1;
                    let delay = self.backoff.next_delay();
                    warn!(
                        broker = %self.config.broker,
                        cause = %failure,
                        fix = %failure.fix(self.config.service),
                        retry_in = ?delay,
                        attempts,
                        "MQTT connection failed"
                    );
                    debug!(error = %crate::one_line(&error), "MQTT connection error detail");
                    let _ = self
                        .state
                        .send(ConnectionState::Retrying { failure, attempts });
                    let mut stop = self.stop.clone();
                    tokio::select! {
                        _ = stop.wait_for(|stop| *stop) => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        let _ = self.state.send(ConnectionState::Closed);
        info!("MQTT client stopped");
    }

    fn on_connected(&mut self, session_present: bool) {
        info!(
            mode = %self.config.mode(),
            broker = %self.config.broker,
            client_id = %self.config.client_id,
            session_present,
            "MQTT connection established"
        );
        if self.insecure {
            warn!(
                var = %self.config.service.var("MQTT_TLS_INSECURE_SKIP_VERIFY"),
                "connected WITHOUT verifying the broker's certificate"
            );
        }
        if !session_present {
            // The broker forgot our subscriptions, and rumqttc dropped its queue
            // of pending requests with them.
            let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
            topics.queued.clear();
            topics.sent.clear();
            let all = topics.all.clone();
            if !all.is_empty() {
                if let Err(e) = topics.send(&self.mqtt, all) {
                    error!(error = %e, "cannot queue the SUBSCRIBE");
                }
            }
        }
        let _ = self.state.send(ConnectionState::Connected);
    }

    fn on_suback(&mut self, pkid: u16, codes: &[SubscribeReasonCode]) {
        let mut topics = self.topics.lock().unwrap_or_else(PoisonError::into_inner);
        let sent = topics.sent.remove(&pkid).unwrap_or_default();
        for (index, code) in codes.iter().enumerate() {
            let topic = sent.get(index).map_or("?", String::as_str);
            // Display (%), not Debug: a topic in quotes is harder to grep.
            match code {
                SubscribeReasonCode::Success(qos) => debug!(topic = %topic, ?qos, "subscribed"),
                SubscribeReasonCode::Failure => error!(
                    topic = %topic,
                    client_id = %self.config.client_id,
                    "the broker refused the subscription: the client is likely not allowed on this topic \
                     (broker ACL, or the client is not connected to the channel)"
                ),
            }
        }
    }
}
