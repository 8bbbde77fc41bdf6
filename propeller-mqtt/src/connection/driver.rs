//! The task that owns rumqttc's event loop.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing,
    SubscribeReasonCode,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::backoff::Backoff;
use super::failure::Failure;
use super::{lock, probe, transport, Command, ConnectionState, Message, Shared};
use crate::env::BrokerAddress;
use crate::tls::{self, TlsSetup, Trust};
use crate::Options;

const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// rumqttc's options for one broker of the list.
pub(crate) fn mqtt_options(
    config: &Options,
    broker: &BrokerAddress,
    tls: Option<&TlsSetup>,
) -> MqttOptions {
    let mut options = MqttOptions::new(&config.client_id, &broker.host, broker.port);
    // Magistrala's edge needs both username and password in CONNECT.
    options
        .set_credentials(&config.client_id, config.client_key.expose())
        .set_keep_alive(config.keep_alive)
        .set_max_packet_size(config.max_packet_size, config.max_packet_size)
        .set_clean_session(true);
    if let Some(will) = &config.last_will {
        options.set_last_will(rumqttc::LastWill::new(
            &will.topic,
            will.payload.to_vec(),
            config.qos,
            false,
        ));
    }
    // Our own stream, on every (re)connect: TCP with quick acknowledgements,
    // the proxy's tunnel, TLS with our SNI, WebSocket (see `transport`).
    transport::install(&mut options, config, broker, tls);
    options
}

/// What [`Driver::new`] takes.
pub(crate) struct Parts {
    pub eventloop: EventLoop,
    pub mqtt: AsyncClient,
    pub config: Options,
    pub tls: Option<TlsSetup>,
    pub shared: Arc<Mutex<Shared>>,
    pub inbox: mpsc::Sender<Message>,
    pub state: watch::Sender<ConnectionState>,
    pub stop: watch::Receiver<bool>,
    pub commands: mpsc::UnboundedReceiver<Command>,
}

/// Runs until stopped, or until every client handle is dropped.
pub(crate) struct Driver {
    eventloop: EventLoop,
    mqtt: AsyncClient,
    config: Options,
    tls: Option<TlsSetup>,
    /// The TLS files the current setup was built from.
    tls_fingerprint: u64,
    /// TLS files found broken, so that we say so once, not at every attempt.
    rejected_fingerprint: Option<u64>,
    /// Which broker of the list we are on.
    current: usize,
    shared: Arc<Mutex<Shared>>,
    inbox: mpsc::Sender<Message>,
    state: watch::Sender<ConnectionState>,
    stop: watch::Receiver<bool>,
    commands: Option<mpsc::UnboundedReceiver<Command>>,
    backoff: Backoff,
    outage_since: Option<Instant>,
}

impl Driver {
    pub fn new(parts: Parts) -> Self {
        let tls_fingerprint = parts.config.tls.as_ref().map_or(0, tls::fingerprint);
        Self {
            eventloop: parts.eventloop,
            mqtt: parts.mqtt,
            config: parts.config,
            tls: parts.tls,
            tls_fingerprint,
            rejected_fingerprint: None,
            current: 0,
            shared: parts.shared,
            inbox: parts.inbox,
            state: parts.state,
            stop: parts.stop,
            commands: Some(parts.commands),
            backoff: Backoff::new(MIN_BACKOFF, MAX_BACKOFF),
            outage_since: None,
        }
    }

    fn broker(&self) -> &BrokerAddress {
        &self.config.brokers[self.current]
    }

    pub async fn run(mut self) {
        let mut connected = false;
        let mut attempts = 0u32;
        loop {
            if !connected {
                // Certificates rotate on disk; pick them up before every attempt.
                self.refresh_tls(false);
            }
            // While connected we keep polling even when stopping: that is what
            // sends the DISCONNECT.
            let attempt_timeout = (!connected).then_some(self.config.connect_timeout);
            let step = tokio::select! {
                biased;
                _ = wait_for_stop(self.stop.clone()), if !connected => Step::Stop,
                command = next_command(&mut self.commands) => Step::Command(command),
                polled = poll(&mut self.eventloop, attempt_timeout) => Step::Polled(polled),
            };
            let polled = match step {
                Step::Stop => break,
                Step::Command(Some(Command::ReloadTls)) => {
                    self.reload(&mut connected).await;
                    continue;
                }
                // Every client handle is gone: nobody can publish or stop us.
                Step::Command(None) if connected => {
                    self.commands = None;
                    let _ = self.mqtt.try_disconnect();
                    continue;
                }
                Step::Command(None) => break,
                Step::Polled(polled) => polled,
            };
            match polled {
                Ok(Event::Incoming(Incoming::ConnAck(connack))) => {
                    connected = true;
                    attempts = 0;
                    self.backoff.reset();
                    self.outage_since = None;
                    self.on_connected(connack.session_present).await;
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                Ok(event) => self.on_event(event).await,
                Err(ConnectionError::RequestsDone) => break,
                Err(_) if *self.stop.borrow() => break,
                Err(error) => {
                    let was_connected = std::mem::replace(&mut connected, false);
                    self.connection_lost().await;
                    attempts += 1;
                    let failure = Failure::classify(&error, was_connected, self.config.mode());
                    let failure =
                        diagnose(failure, &self.config, self.current, self.tls.as_ref()).await;
                    let outage = self.outage_since.get_or_insert_with(Instant::now).elapsed();
                    let delay = self.backoff.next_delay(outage);
                    warn!(
                        broker = %self.broker(),
                        cause = %failure,
                        fix = %failure.fix(&self.config.names),
                        retry_in = ?delay,
                        attempts,
                        "MQTT connection failed"
                    );
                    debug!(error = %crate::one_line(&error), "MQTT connection error detail");
                    let _ = self
                        .state
                        .send(ConnectionState::Retrying { failure, attempts });
                    if self.config.brokers.len() > 1 {
                        self.current = (self.current + 1) % self.config.brokers.len();
                        self.apply_options();
                        info!(next = %self.broker(), "trying the next broker");
                    }
                    tokio::select! {
                        _ = wait_for_stop(self.stop.clone()) => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        let _ = self.state.send(ConnectionState::Closed);
        info!("MQTT client stopped");
    }

    async fn on_connected(&mut self, session_present: bool) {
        info!(
            mode = %self.config.mode(),
            broker = %self.broker(),
            client_id = %self.config.client_id,
            session_present,
            "MQTT connection established"
        );
        if self
            .tls
            .as_ref()
            .is_some_and(|t| t.trust == Trust::SkipVerify)
        {
            warn!(
                var = %self.config.names.var("MQTT_TLS_INSECURE_SKIP_VERIFY"),
                "connected WITHOUT verifying the broker's certificate"
            );
        }
        let mut shared = lock(&self.shared);
        if !session_present {
            // The broker forgot our subscriptions and rumqttc dropped its
            // unacknowledged publishes: restore both from our own records.
            if let Err(e) = shared.subscriptions.restore(&self.mqtt) {
                error!(error = %e, "cannot queue the SUBSCRIBE");
            }
            shared.outbox.connection_lost();
            let pending = shared.outbox.pending();
            if !pending.is_empty() {
                info!(
                    count = pending.len(),
                    "sending again what the broker had not acknowledged"
                );
            }
            for id in pending {
                if let Err(e) = shared.send(&self.mqtt, id) {
                    error!(error = %e, "cannot queue a publish");
                }
            }
        }
        shared.connected = true;
        drop(shared);
        let _ = self.state.send(ConnectionState::Connected);
    }

    /// Everything but CONNACK and DISCONNECT: messages, acknowledgements, and
    /// the packet ids rumqttc gives our requests.
    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Incoming(Incoming::Publish(publish)) => {
                let message = Message {
                    topic: publish.topic,
                    payload: publish.payload,
                };
                debug!(topic = %message.topic, bytes = message.payload.len(), "message received");
                // A service that ignores messages drops the receiver; that is fine.
                let _ = self.inbox.send(message).await;
            }
            Event::Incoming(Incoming::SubAck(suback)) => {
                self.on_suback(suback.pkid, &suback.return_codes)
            }
            event => {
                // Bookkeeping, and rumqttc usually has more of it read and
                // buffered (it reads and writes in batches): take it all
                // under one lock, in order, rather than one poll per event.
                let mut shared = lock(&self.shared);
                let mut next = Some(event);
                while let Some(event) = next {
                    bookkeep(&mut shared, event);
                    let buffered = &mut self.eventloop.state.events;
                    next = match buffered.front().is_some_and(is_bookkeeping) {
                        true => buffered.pop_front(),
                        false => None,
                    };
                }
            }
        }
    }

    /// Forgets the connection: no request may enter rumqttc's queue until the
    /// next CONNACK, and what is queued now is dropped with the session, to be
    /// sent again from the outbox.
    async fn connection_lost(&mut self) {
        // rumqttc keeps events it read but has not handed out yet, and would
        // hand them out after the next CONNACK, where a PUBACK's packet id
        // means another message. Handle them now, while the ids still mean
        // what they meant: they are real acknowledgements and real messages.
        let buffered: Vec<Event> = self.eventloop.state.events.drain(..).collect();
        for event in buffered {
            self.on_event(event).await;
        }
        let mut shared = lock(&self.shared);
        shared.connected = false;
        self.eventloop.clean();
        // A publish held back for a packet id of the old session would block
        // the new one; the outbox sends it again anyway.
        self.eventloop.state.collision = None;
        shared.outbox.connection_lost();
    }

    fn on_suback(&mut self, pkid: u16, codes: &[SubscribeReasonCode]) {
        let topics = lock(&self.shared).subscriptions.acknowledged(pkid);
        for (index, code) in codes.iter().enumerate() {
            // Display (%), not Debug: a topic in quotes is harder to grep.
            let topic = topics.get(index).map_or("?", String::as_str);
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

    /// SIGHUP: use new TLS files now, reconnecting if they changed.
    async fn reload(&mut self, connected: &mut bool) {
        if self.config.tls.is_none() {
            info!("TLS reload requested, but this service uses plain MQTT");
            return;
        }
        if self.refresh_tls(true) && *connected {
            info!("reconnecting with the new TLS material");
            *connected = false;
            self.connection_lost().await;
            self.eventloop.network = None;
            let _ = self.state.send(ConnectionState::Connecting);
        }
    }

    /// Re-reads the TLS files if they changed on disk, checking them as at
    /// startup. Broken new files leave the material in use untouched. Returns
    /// whether new material is now in use.
    fn refresh_tls(&mut self, asked: bool) -> bool {
        let Some(settings) = &self.config.tls else {
            return false;
        };
        let fingerprint = tls::fingerprint(settings);
        if fingerprint == self.tls_fingerprint {
            if asked {
                info!("TLS files unchanged");
            }
            return false;
        }
        if self.rejected_fingerprint == Some(fingerprint) && !asked {
            return false;
        }
        match TlsSetup::load(settings, &self.config.names, &self.config.client_key) {
            Ok(setup) => {
                for warning in &setup.warnings {
                    warn!("{warning}");
                }
                self.tls = Some(setup);
                self.tls_fingerprint = fingerprint;
                self.rejected_fingerprint = None;
                self.apply_options();
                info!("TLS files changed: using the new material");
                true
            }
            Err(error) => {
                error!(
                    cause = %crate::one_line(&error),
                    "the TLS files changed but cannot be used; keeping the material in use"
                );
                self.rejected_fingerprint = Some(fingerprint);
                false
            }
        }
    }

    fn apply_options(&mut self) {
        self.eventloop.mqtt_options = mqtt_options(&self.config, self.broker(), self.tls.as_ref());
    }
}

/// Acknowledgements and the packet ids rumqttc gives our requests: what
/// [`bookkeep`] handles.
fn is_bookkeeping(event: &Event) -> bool {
    matches!(
        event,
        Event::Incoming(Incoming::PubAck(_) | Incoming::PubComp(_))
            | Event::Outgoing(
                Outgoing::Publish(_) | Outgoing::AwaitAck(_) | Outgoing::Subscribe(_)
            )
    )
}

fn bookkeep(shared: &mut Shared, event: Event) {
    match event {
        Event::Incoming(Incoming::PubAck(ack)) => shared.outbox.acknowledged(ack.pkid),
        Event::Incoming(Incoming::PubComp(comp)) => shared.outbox.acknowledged(comp.pkid),
        Event::Outgoing(Outgoing::Publish(pkid)) => shared.outbox.sent(pkid),
        Event::Outgoing(Outgoing::AwaitAck(pkid)) => shared.outbox.held_back(pkid),
        Event::Outgoing(Outgoing::Subscribe(pkid)) => shared.subscriptions.sent(pkid),
        _ => {}
    }
}

/// Looks closer at a TLS connection closed before CONNACK (see [`probe`]).
/// Takes fields, not the driver: the driver is not `Sync`.
async fn diagnose(
    failure: Failure,
    config: &Options,
    broker: usize,
    tls: Option<&TlsSetup>,
) -> Failure {
    probe::diagnose(failure, config, broker, tls).await
}

/// What woke the driver.
enum Step {
    Stop,
    Command(Option<Command>),
    Polled(Result<Event, ConnectionError>),
}

/// One step of the event loop. A connection attempt gets our own timeout:
/// rumqttc's has whole-second resolution.
async fn poll(
    eventloop: &mut EventLoop,
    attempt_timeout: Option<Duration>,
) -> Result<Event, ConnectionError> {
    match attempt_timeout {
        None => eventloop.poll().await,
        Some(limit) => tokio::time::timeout(limit, eventloop.poll())
            .await
            .unwrap_or(Err(ConnectionError::NetworkTimeout)),
    }
}

async fn wait_for_stop(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// The next command, or `None` once every client handle is gone; pends forever
/// after that, so the branch stays quiet.
async fn next_command(commands: &mut Option<mpsc::UnboundedReceiver<Command>>) -> Option<Command> {
    match commands {
        Some(commands) => commands.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Secret;

    /// Every broker of the list, every mode: rumqttc connects through our
    /// socket (TCP_NODELAY, TCP_QUICKACK re-armed after reads), not its own.
    #[test]
    fn every_connection_opens_our_socket() {
        let config =
            Options::new("tcp://a:1883,tcp://b:1883", "proplet-1", Secret::new("k")).unwrap();
        for broker in &config.brokers {
            let options = mqtt_options(&config, broker, None);
            assert!(options.socket_connector().is_some(), "{broker}");
        }
    }
}
