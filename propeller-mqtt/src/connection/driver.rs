//! The task that keeps the connection up. It alternates between two phases:
//! connecting ([`Driver::connect`]: attempts with backoff and failover) and
//! serving an established connection ([`Driver::serve`]), and crosses
//! between them only through [`Driver::on_connected`] and
//! [`Driver::link_down`], which set the one record of "connected"
//! ([`Shared`]). rumqttc stays behind the adapter ([`Session`]).

use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::backoff::{Backoff, FAST_PHASE};
use super::failure::{ConnectionLoss, Failure, SHORT_LIVED};
use super::session::{Event, LinkError, Packet, Resolved, Session};
use super::{lock, probe, Command, ConnectionState, Message, Shared};
use crate::env::BrokerAddress;
use crate::tls::{self, TlsSetup, Trust};
use crate::{Options, QoS};

/// What [`Driver::new`] takes.
pub(crate) struct Parts {
    pub session: Session,
    pub config: Options,
    pub tls: Option<TlsSetup>,
    pub shared: Arc<Mutex<Shared>>,
    pub inbox: mpsc::Sender<Message>,
    pub stop: watch::Receiver<bool>,
    pub commands: mpsc::UnboundedReceiver<Command>,
}

/// Runs until stopped, or until every client handle is dropped.
pub(crate) struct Driver {
    session: Session,
    config: Options,
    material: Material,
    /// Which broker of the list we are on.
    current: usize,
    shared: Arc<Mutex<Shared>>,
    inbox: mpsc::Sender<Message>,
    stop: watch::Receiver<bool>,
    /// `None` once every client handle is gone.
    commands: Option<mpsc::UnboundedReceiver<Command>>,
    backoff: Backoff,
    outage_since: Option<Instant>,
    /// Failed attempts since the last CONNACK.
    attempts: u32,
    /// When the current connection's CONNACK came.
    connected_at: Option<Instant>,
    /// Connections in a row that the broker closed within [`SHORT_LIVED`].
    short_lived: u32,
    /// When the PINGREQ in flight went out.
    ping_sent: Option<Instant>,
}

/// How serving a connection ended.
enum Ended {
    /// DISCONNECT sent, or every handle gone while stopping.
    Stopped,
    /// New TLS material: reconnect with it, at once.
    Reload,
    /// The connection failed.
    Lost(LinkError),
}

/// What woke the driver while serving.
enum Serving {
    Command(Option<Command>),
    Polled(Result<Event, LinkError>),
    /// Time to look at the TLS files on disk.
    Watch,
}

/// How often the TLS files are read for a change while connected (their
/// content is hashed, through any symlinks: a Kubernetes `..data` swap
/// counts), and the client certificate's expiry is checked.
const TLS_WATCH: Duration = Duration::from_secs(5);

/// Days before the client certificate expires at which we warn (again).
const EXPIRY_WARNINGS: [i64; 3] = [1, 7, 30];

/// What woke the driver while connecting.
enum Connecting {
    Stop,
    Command(Option<Command>),
    Attempt(Result<bool, LinkError>),
}

impl Driver {
    pub fn new(parts: Parts) -> Self {
        let fingerprint = parts.config.tls.as_ref().map_or(0, tls::fingerprint);
        let backoff = Backoff::new(parts.config.reconnect_min, parts.config.reconnect_max);
        Self {
            session: parts.session,
            config: parts.config,
            material: Material {
                setup: parts.tls,
                fingerprint,
                rejected: None,
                expiry_warned: None,
            },
            current: 0,
            shared: parts.shared,
            inbox: parts.inbox,
            stop: parts.stop,
            commands: Some(parts.commands),
            backoff,
            outage_since: None,
            attempts: 0,
            connected_at: None,
            short_lived: 0,
            ping_sent: None,
        }
    }

    fn broker(&self) -> &BrokerAddress {
        &self.config.brokers[self.current]
    }

    pub async fn run(mut self) {
        while let Some(session_present) = self.connect().await {
            self.on_connected(session_present);
            match self.serve().await {
                Ended::Stopped => break,
                Ended::Reload => {
                    self.connection_ended(false);
                    info!("reconnecting with the new TLS material");
                    self.configure();
                    self.link_down(ConnectionState::Connecting).await;
                }
                Ended::Lost(error) => {
                    let detail = error.to_string();
                    let failure = error.into_failure(true, self.config.mode());
                    let closed = failure == Failure::ConnectionLost(ConnectionLoss::Closed);
                    let failure = match self.connection_ended(closed) {
                        times if times >= 2 => Failure::ConnectionLost(ConnectionLoss::TakenOver {
                            client_id: self.config.client_id.clone(),
                            times,
                        }),
                        _ => failure,
                    };
                    self.attempts += 1;
                    self.link_down(self.retrying(&failure)).await;
                    if !self.retry_later(&failure, &detail).await {
                        break;
                    }
                }
            }
        }
        lock(&self.shared).set_down(ConnectionState::Closed);
        info!("MQTT client stopped");
    }

    /// Attempts connections until one is up (CONNACK's session-present flag),
    /// or until stopped (`None`).
    async fn connect(&mut self) -> Option<bool> {
        loop {
            // Certificates rotate on disk; pick them up before every attempt.
            if self.material.refresh(&self.config, false) {
                self.configure();
            }
            let step = tokio::select! {
                biased;
                _ = wait_for_stop(self.stop.clone()) => Connecting::Stop,
                command = next_command(&mut self.commands) => Connecting::Command(command),
                attempt = self.session.connect(self.config.connect_timeout) => {
                    Connecting::Attempt(attempt)
                }
            };
            let error = match step {
                Connecting::Stop | Connecting::Command(None) => return None,
                Connecting::Command(Some(Command::ReloadTls)) => {
                    // Not connected: the next attempt uses what is new.
                    if self.material.reload(&self.config) {
                        self.configure();
                    }
                    continue;
                }
                Connecting::Attempt(Ok(session_present)) => return Some(session_present),
                Connecting::Attempt(Err(error)) => error,
            };
            if error.requests_done() || *self.stop.borrow() {
                return None;
            }
            let detail = error.to_string();
            let failure = error.into_failure(false, self.config.mode());
            // A closer look at a TLS connection closed before CONNACK.
            let failure = probe::diagnose(
                failure,
                &self.config,
                self.current,
                self.material.setup.as_ref(),
            )
            .await;
            self.attempts += 1;
            lock(&self.shared).set_down(self.retrying(&failure));
            if !self.retry_later(&failure, &detail).await {
                return None;
            }
        }
    }

    /// An established connection ended (`closed` by the broker, or not).
    /// One that lasted resets the backoff; one the broker closed soon after
    /// CONNACK does not, so that two clients with one id, which the broker
    /// plays off against each other, back off instead of reconnecting every
    /// second forever. Returns how many in a row were closed that soon.
    fn connection_ended(&mut self, closed: bool) -> u32 {
        let lived = self
            .connected_at
            .take()
            .map_or(Duration::MAX, |at| at.elapsed());
        if lived >= SHORT_LIVED {
            self.backoff.reset();
            self.outage_since = None;
            self.short_lived = 0;
        } else if closed {
            self.short_lived += 1;
        }
        self.short_lived
    }

    fn retrying(&self, failure: &Failure) -> ConnectionState {
        ConnectionState::Retrying {
            failure: failure.clone(),
            attempts: self.attempts,
        }
    }

    /// Says why the attempt failed, moves to the next broker of the list, and
    /// waits out the backoff. Returns `false` if stopped meanwhile.
    async fn retry_later(&mut self, failure: &Failure, detail: &str) -> bool {
        let mut outage = self.outage_since.get_or_insert_with(Instant::now).elapsed();
        if self.short_lived >= 2 {
            // Not a broker restart, which the quick retries are for.
            outage = outage.max(FAST_PHASE);
        }
        let delay = self.backoff.next_delay(outage);
        warn!(
            broker = %self.broker(),
            cause = %failure,
            class = failure.class(),
            fix = %failure.fix(&self.config.names),
            retry_in = ?delay,
            attempts = self.attempts,
            "MQTT connection failed"
        );
        debug!(error = %detail, "MQTT connection error detail");
        lock(&self.shared).counters.last_failure = Some(failure.class());
        if self.config.brokers.len() > 1 {
            self.current = (self.current + 1) % self.config.brokers.len();
            self.configure();
            info!(next = %self.broker(), "trying the next broker");
        }
        tokio::select! {
            _ = wait_for_stop(self.stop.clone()) => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// CONNACK: restore what a session without memory lost, then open the
    /// gate for requests.
    fn on_connected(&mut self, session_present: bool) {
        self.attempts = 0;
        // The backoff is reset once the connection has lasted, not here.
        self.connected_at = Some(Instant::now());
        info!(
            mode = %self.config.mode(),
            broker = %self.broker(),
            client_id = %self.config.client_id,
            session_present,
            "MQTT connection established"
        );
        if self
            .material
            .setup
            .as_ref()
            .is_some_and(|t| t.trust == Trust::SkipVerify)
        {
            warn!(
                var = %self.config.names.var("MQTT_TLS_INSECURE_SKIP_VERIFY"),
                "connected WITHOUT verifying the broker's certificate"
            );
        }
        let mut shared = lock(&self.shared);
        shared.counters.connections += 1;
        shared.counters.certificate_not_after = self
            .material
            .setup
            .as_ref()
            .and_then(|setup| setup.identity.as_ref())
            .map(|facts| facts.not_after);
        self.ping_sent = None;
        if !session_present {
            // The broker forgot our subscriptions, and rumqttc dropped what
            // it would have replayed: restore both from our own records.
            shared.requests.forget_all();
            shared.confirmed.clear();
        }
        // With a session the broker keeps what it confirmed, with its QoS;
        // a SUBSCRIBE it never confirmed to this process is sent (again).
        let topics: Vec<String> = shared
            .topics
            .iter()
            .filter(|topic| !shared.confirmed.contains(topic))
            .cloned()
            .collect();
        if !topics.is_empty() {
            if let Err(e) = shared.requests.subscribe(topics, self.config.qos) {
                error!(error = %e, "cannot queue the SUBSCRIBE");
            }
        }
        // rumqttc replays, with the packet ids the broker knows, what was on
        // the wire (a session) or nothing (none); the outbox sends the rest.
        let (replayed, pending): (Vec<u64>, Vec<u64>) = shared
            .outbox
            .pending()
            .into_iter()
            .partition(|id| shared.requests.knows(*id));
        if !replayed.is_empty() {
            info!(
                count = replayed.len(),
                "the broker kept our session: sending again, with the same packet ids, what it had not acknowledged"
            );
        }
        if !pending.is_empty() {
            info!(
                count = pending.len(),
                "sending again what the broker had not acknowledged"
            );
        }
        for id in pending {
            if let Err(e) = shared.send(id) {
                error!(error = %e, "cannot queue a publish");
            }
        }
        shared.set_up();
    }

    /// Serves the established connection until it ends. We keep polling
    /// even when asked to stop: that is what sends the DISCONNECT.
    async fn serve(&mut self) -> Ended {
        let start = tokio::time::Instant::now() + TLS_WATCH;
        let mut watch = tokio::time::interval_at(start, TLS_WATCH);
        let tls = self.config.tls.is_some();
        loop {
            let polled = {
                // Dropping this future mid-write could lose the packet being
                // written, so it lives across the commands that leave the
                // connection as it is.
                let mut next = pin!(self.session.next());
                loop {
                    let step = tokio::select! {
                        biased;
                        command = next_command(&mut self.commands) => Serving::Command(command),
                        polled = &mut next => Serving::Polled(polled),
                        _ = watch.tick(), if tls => Serving::Watch,
                    };
                    match step {
                        Serving::Watch => {
                            self.material.warn_expiry(&self.config);
                            // The same checked reload as SIGHUP, without one.
                            if self.material.refresh(&self.config, false) {
                                info!("the TLS files changed on disk: reconnecting with them");
                                return Ended::Reload;
                            }
                        }
                        Serving::Command(Some(Command::ReloadTls)) => {
                            if self.material.reload(&self.config) {
                                return Ended::Reload;
                            }
                        }
                        // Every client handle is gone: nobody can publish or stop us.
                        Serving::Command(None) => {
                            self.commands = None;
                            lock(&self.shared).requests.disconnect();
                        }
                        Serving::Polled(polled) => break polled,
                    }
                }
            };
            match polled {
                Ok(Event::Disconnected) => return Ended::Stopped,
                Ok(event) => self.on_event(event).await,
                Err(error) if error.requests_done() || *self.stop.borrow() => {
                    return Ended::Stopped
                }
                Err(error) => return Ended::Lost(error),
            }
        }
    }

    /// Messages go to the service; acknowledgements and packet ids to the
    /// bookkeeping.
    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Message(message) => {
                debug!(topic = %message.topic, bytes = message.payload.len(), "message received");
                // A service that ignores messages drops the receiver; that is fine.
                let _ = self.inbox.send(message).await;
            }
            Event::Packet(packet) => self.bookkeep(packet),
            Event::PingSent => self.ping_sent = Some(Instant::now()),
            Event::PingAnswered => {
                if let Some(sent) = self.ping_sent.take() {
                    lock(&self.shared).counters.ping_round_trip = Some(sent.elapsed());
                }
            }
            Event::Disconnected | Event::Other => {}
        }
    }

    /// rumqttc usually has more bookkeeping read and buffered (it reads and
    /// writes in batches): take it all under one lock, in order, rather than
    /// one poll per event.
    fn bookkeep(&mut self, packet: Packet) {
        let mut subacks = Vec::new();
        {
            let mut shared = lock(&self.shared);
            let mut next = Some(packet);
            while let Some(packet) = next {
                match shared.requests.resolve(packet) {
                    Some(Resolved::Delivered(id)) => shared.outbox.delivered(id),
                    Some(Resolved::Subscribed { topics, granted }) => {
                        for (topic, qos) in topics.iter().zip(&granted) {
                            if qos.is_some() && !shared.confirmed.contains(topic) {
                                shared.confirmed.push(topic.clone());
                            }
                        }
                        subacks.push((topics, granted))
                    }
                    None => {}
                }
                next = self.session.next_buffered_packet();
            }
        }
        for (topics, granted) in subacks {
            self.on_suback(&topics, &granted);
        }
    }

    fn on_suback(&self, topics: &[String], granted: &[Option<QoS>]) {
        for (index, qos) in granted.iter().enumerate() {
            // Display (%), not Debug: a topic in quotes is harder to grep.
            let topic = topics.get(index).map_or("?", String::as_str);
            match qos {
                Some(qos) => debug!(topic = %topic, ?qos, "subscribed"),
                None => error!(
                    topic = %topic,
                    client_id = %self.config.client_id,
                    "the broker refused the subscription: the client is likely not allowed on this topic \
                     (broker ACL, or the client is not connected to the channel)"
                ),
            }
        }
    }

    /// Forgets the connection, and publishes `next` as the state.
    ///
    /// rumqttc keeps events it read but has not handed out, and would hand
    /// them out after the next CONNACK, where a PUBACK's packet id means
    /// another message. Handle them now, while the ids still mean what they
    /// meant: they are real acknowledgements and real messages. Then, under
    /// the lock, close the gate and drop what is queued with the session: the
    /// outbox sends it again after the next CONNACK.
    async fn link_down(&mut self, next: ConnectionState) {
        for event in self.session.take_buffered() {
            self.on_event(event).await;
        }
        let mut shared = lock(&self.shared);
        let shared = &mut *shared;
        if self.config.persistent_session {
            self.session.suspend(&mut shared.requests, &shared.outbox);
        } else {
            self.session.forget(&mut shared.requests);
        }
        shared.set_down(next);
    }

    /// The broker and TLS material of the next connection.
    fn configure(&mut self) {
        let broker = &self.config.brokers[self.current];
        self.session
            .configure(&self.config, broker, self.material.setup.as_ref());
    }
}

/// The TLS material in use, and what is known of the files on disk.
struct Material {
    setup: Option<TlsSetup>,
    /// The TLS files the current setup was built from.
    fingerprint: u64,
    /// TLS files found broken, so that we say so once, not at every attempt.
    rejected: Option<u64>,
    /// The last of [`EXPIRY_WARNINGS`] warned about for the certificate in use.
    expiry_warned: Option<i64>,
}

impl Material {
    /// SIGHUP: re-reads the TLS files. Returns whether new material is now
    /// in use; the caller reconnects with it.
    fn reload(&mut self, config: &Options) -> bool {
        if config.tls.is_none() {
            info!("TLS reload requested, but this service uses plain MQTT");
            return false;
        }
        self.refresh(config, true)
    }

    /// Warns, once per step of [`EXPIRY_WARNINGS`] (30, 7 and 1 days), that
    /// the client certificate in use expires soon.
    fn warn_expiry(&mut self, config: &Options) {
        let Some(facts) = self.setup.as_ref().and_then(|s| s.identity.as_ref()) else {
            return;
        };
        let days = (facts.not_after - tls::unix_now()).div_euclid(86_400);
        let Some(step) = expiry_warning_due(days, self.expiry_warned) else {
            return;
        };
        self.expiry_warned = Some(step);
        warn!(
            days_left = days,
            var = %config.names.var("MQTT_TLS_CLIENT_CERT"),
            "the client certificate expires soon: put a renewed one at that path; \
             it is picked up within seconds, without a restart or SIGHUP"
        );
    }

    /// Re-reads the TLS files if they changed on disk, checking them as at
    /// startup. Broken new files leave the material in use untouched. Returns
    /// whether new material is now in use.
    fn refresh(&mut self, config: &Options, asked: bool) -> bool {
        let Some(settings) = &config.tls else {
            return false;
        };
        let fingerprint = tls::fingerprint(settings);
        if fingerprint == self.fingerprint {
            if asked {
                info!("TLS files unchanged");
            }
            return false;
        }
        if self.rejected == Some(fingerprint) && !asked {
            return false;
        }
        match TlsSetup::load(settings, &config.names, &config.client_key) {
            Ok(setup) => {
                for warning in &setup.warnings {
                    warn!("{warning}");
                }
                self.setup = Some(setup);
                self.fingerprint = fingerprint;
                self.rejected = None;
                self.expiry_warned = None;
                info!("TLS files changed: using the new material");
                true
            }
            Err(error) => {
                error!(
                    cause = %crate::one_line(&error),
                    "the TLS files changed but cannot be used; keeping the material in use"
                );
                self.rejected = Some(fingerprint);
                false
            }
        }
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

/// The step of [`EXPIRY_WARNINGS`] to warn about with `days` whole days
/// left, unless `warned` (the last step warned about) already covers it.
fn expiry_warning_due(days: i64, warned: Option<i64>) -> Option<i64> {
    let step = EXPIRY_WARNINGS.into_iter().find(|step| days < *step)?;
    match warned {
        Some(warned) if warned <= step => None,
        _ => Some(step),
    }
}

#[cfg(test)]
mod tests {
    use super::expiry_warning_due;

    /// Once at 30 days, again at 7 and at 1, never twice for one step, and
    /// not at all with more than 30 days left.
    #[test]
    fn expiry_warnings_repeat_at_30_7_and_1_days() {
        let mut warned = None;
        let mut warnings = Vec::new();
        for days in (-2..=40).rev() {
            if let Some(step) = expiry_warning_due(days, warned) {
                warnings.push((days, step));
                warned = Some(step);
            }
        }
        assert_eq!(warnings, [(29, 30), (6, 7), (0, 1)]);
        // A service started 3 days before expiry warns at once, then at 1.
        assert_eq!(expiry_warning_due(3, None), Some(7));
        assert_eq!(expiry_warning_due(3, Some(7)), None);
        assert_eq!(expiry_warning_due(0, Some(7)), Some(1));
    }
}
