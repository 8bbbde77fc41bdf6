//! The adapter to rumqttc: the only code in the crate that names rumqttc's
//! client, event loop, events and errors (`QoS`, a plain enum, is re-exported
//! as our own). The driver sees a small typed interface instead:
//!
//! - [`open`] builds the pair: a [`Session`], which the driver owns and
//!   polls, and [`Requests`], which lives under the client's lock;
//! - [`Session::configure`] picks the broker and TLS material of the next
//!   connection; [`Session::connect`] makes one attempt; [`Session::next`]
//!   yields the next [`Event`] of an established connection;
//!   [`Session::take_buffered`] and [`Session::forget`] end one;
//! - [`Requests`] queues PUBLISH, SUBSCRIBE and DISCONNECT without waiting,
//!   and turns the packet ids rumqttc reports back into our message ids
//!   ([`Requests::resolve`]);
//! - [`LinkError::into_failure`] classifies rumqttc's error into a [`Failure`].
//!
//! # What this relies on in rumqttc 0.25 (vendored, `vendor/rumqttc`)
//!
//! A rumqttc upgrade must be checked against each of these; they are all
//! here, and the tests of this module and `propeller-mqtt/tests/session.rs`
//! exercise them against a scripted broker.
//!
//! 1. **Packet ids are reported, not chosen.** rumqttc gives a publish its
//!    packet id only as it writes it, and tells us with
//!    `Outgoing::Publish(pkid)`, once per publish and in the order the
//!    requests were queued (also with our batching patch). A publish held
//!    back because its id is still in use is reported as
//!    `Outgoing::AwaitAck(pkid)`, then as `Outgoing::Publish(pkid)` with the
//!    same id when it goes out. SUBSCRIBE is reported the same way. There is
//!    no other way to learn a request's id ([`Requests`]).
//! 2. **Packet ids are reused early at QoS 2.** rumqttc frees a QoS 2 id when
//!    PUBREC arrives, not when PUBCOMP does, and ids come from a cycle of
//!    `inflight` (100) values shared with SUBSCRIBE: a new publish can get
//!    the id of one whose PUBCOMP is still due. Acknowledgements of one id
//!    are therefore matched first in, first out.
//! 3. **`EventLoop::state.events`** (a public field): rumqttc reads and
//!    writes in batches and buffers the events, and keeps them when the
//!    connection fails. After the next CONNACK their packet ids would name
//!    other messages, so [`Session::take_buffered`] hands them out before a
//!    connection is forgotten. [`Session::next_buffered_packet`] peeks at the
//!    same queue to take a batch of acknowledgements under one lock.
//! 4. **`EventLoop::clean()`** drops the network and moves unacknowledged
//!    and still-queued requests to `EventLoop::pending` (a public field),
//!    which rumqttc discards at the next CONNACK without a session and
//!    replays, before any new request, after a CONNACK with one. With a
//!    clean session (the default) nothing queued for one connection reaches
//!    the next: [`Session::forget`], and our outbox sends it again. With a
//!    persistent session, [`Session::suspend`] rewrites `pending` from our
//!    own records: PUBREL for every QoS 2 message whose PUBREC came, then
//!    every message on the wire with the packet id the broker knows and DUP
//!    set, nothing else. Only those are replayed if the broker kept the
//!    session; our outbox sends the rest (never on the wire) as new. A replay
//!    is reported as `Outgoing::Publish(pkid)` like any publish (point 1).
//! 5. **`EventLoop::state.collision`** (public): a publish held back for an
//!    id of the old connection would block every request of the new one
//!    until an acknowledgement that never comes. [`Session::forget`] clears it.
//! 6. **`EventLoop::mqtt_options`** (public): replaced between attempts to
//!    switch broker or TLS material. A new event loop would also mean a new
//!    request queue, and the client handles hold the old one.
//! 7. **`EventLoop::poll` without a network** connects and yields CONNACK or
//!    an error, nothing else ([`Session::connect`]).
//! 8. **The request queue** is a bounded channel whose send completes at the
//!    first poll when there is room, so a request can enter it under a
//!    plain mutex (`ready_now`). It is sized never to be full ([`open`]): a
//!    send that had to wait is withdrawn when dropped, which could race with
//!    the event loop taking it, and [`Requests`] would lose count. And
//!    rumqttc's own size check of an outgoing PUBLISH is [`publish_size`].
//! 9. **Our patch** `MqttOptions::set_socket_connector` (see
//!    `vendor/rumqttc/PATCH.md`) opens our socket ([`super::socket`]).
//! 10. **Errors**: the shapes of `ConnectionError` and `StateError`, and that
//!     the codec's `mqttbytes::Error::Io` hides its io::Error from `source()`
//!     ([`LinkError::into_failure`]).

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event as RawEvent, EventLoop, Incoming,
    MqttOptions, NetworkOptions, Outgoing, PubRel, Publish, Request, StateError, SubscribeFilter,
    SubscribeReasonCode,
};

use super::failure::{find, ConnectionLoss, Failure};
use super::outbox::Outbox;
use super::{transport, Message};
use crate::env::BrokerAddress;
use crate::tls::TlsSetup;
use crate::{ClientError, Mode, Options, QoS};

/// A session and its request side: see the module documentation.
/// `capacity` bounds the request queue; [`Requests`] never waits on it, so it
/// must hold every request that can be queued between two connections.
pub(crate) fn open(
    config: &Options,
    tls: Option<&TlsSetup>,
    capacity: usize,
) -> (Session, Requests) {
    let (client, mut eventloop) =
        AsyncClient::new(mqtt_options(config, &config.brokers[0], tls), capacity);
    eventloop.set_network_options(network_options(config));
    (Session { eventloop }, Requests::new(client))
}

/// rumqttc bounds each connection attempt, and each write, by its own
/// whole-second timeout (5 s unless told): it gets `P_MQTT_TIMEOUT`, rounded
/// up, so that neither cuts an attempt that ours ([`Session::connect`])
/// still allows, and a write gets what the configuration says.
fn network_options(config: &Options) -> NetworkOptions {
    let timeout = config.connect_timeout;
    let seconds = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    let mut options = NetworkOptions::new();
    options.set_connection_timeout(seconds.max(1));
    options
}

/// rumqttc's options for one broker of the list.
fn mqtt_options(config: &Options, broker: &BrokerAddress, tls: Option<&TlsSetup>) -> MqttOptions {
    let mut options = MqttOptions::new(&config.client_id, &broker.host, broker.port);
    // Magistrala's edge needs both username and password in CONNECT.
    options
        .set_credentials(&config.client_id, config.client_key.expose())
        .set_keep_alive(config.keep_alive)
        .set_max_packet_size(config.max_packet_size, config.max_packet_size)
        // Point 4 of the module documentation depends on it.
        .set_clean_session(!config.persistent_session);
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

/// The size of a PUBLISH packet: fixed header, remaining length, topic,
/// packet id (QoS 1 and 2) and payload, as rumqttc checks it against the
/// maximum packet size.
pub(crate) fn publish_size(topic: usize, payload: usize, qos: QoS) -> usize {
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

/// The connection side: rumqttc's event loop, owned and polled by the driver.
pub(crate) struct Session {
    eventloop: EventLoop,
}

/// What an established connection yields.
#[derive(Debug)]
pub(crate) enum Event {
    /// An application message from the broker.
    Message(Message),
    /// Something about one of our requests, by packet id: give it to
    /// [`Requests::resolve`] under the lock that guards the requests.
    Packet(Packet),
    /// Our DISCONNECT went out: the session is over.
    Disconnected,
    /// Our keep-alive PINGREQ went out.
    PingSent,
    /// The broker's PINGRESP came.
    PingAnswered,
    /// Nothing for us: pings, the middle of the QoS 2 exchange, our own
    /// acknowledgements.
    Other,
}

/// A request's packet id as rumqttc reported it; only [`Requests`] can tell
/// which of our requests it is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Packet(PacketKind);

#[derive(Debug, Clone, PartialEq, Eq)]
enum PacketKind {
    /// The next queued publish went out with this id (0 at QoS 0).
    Sent(u16),
    /// The next queued publish is held back until this id is acknowledged.
    HeldBack(u16),
    /// PUBACK (QoS 1) or PUBCOMP (QoS 2).
    Acknowledged(u16),
    /// PUBREC (QoS 2): the broker has the message; PUBCOMP is due.
    Received(u16),
    /// The next queued SUBSCRIBE went out with this id.
    SubscribeSent(u16),
    /// SUBACK: the QoS granted to each topic, `None` where refused.
    SubAck(u16, Vec<Option<QoS>>),
}

impl From<RawEvent> for Event {
    fn from(event: RawEvent) -> Self {
        use PacketKind::*;
        let packet = |kind| Event::Packet(Packet(kind));
        match event {
            RawEvent::Incoming(Incoming::Publish(publish)) => Event::Message(Message {
                topic: publish.topic,
                payload: publish.payload,
            }),
            RawEvent::Incoming(Incoming::PubAck(ack)) => packet(Acknowledged(ack.pkid)),
            RawEvent::Incoming(Incoming::PubComp(comp)) => packet(Acknowledged(comp.pkid)),
            RawEvent::Incoming(Incoming::PubRec(rec)) => packet(Received(rec.pkid)),
            RawEvent::Incoming(Incoming::SubAck(suback)) => {
                let granted = suback
                    .return_codes
                    .iter()
                    .map(|code| match code {
                        SubscribeReasonCode::Success(qos) => Some(*qos),
                        SubscribeReasonCode::Failure => None,
                    })
                    .collect();
                packet(SubAck(suback.pkid, granted))
            }
            RawEvent::Outgoing(Outgoing::Publish(pkid)) => packet(Sent(pkid)),
            RawEvent::Outgoing(Outgoing::AwaitAck(pkid)) => packet(HeldBack(pkid)),
            RawEvent::Outgoing(Outgoing::Subscribe(pkid)) => packet(SubscribeSent(pkid)),
            RawEvent::Outgoing(Outgoing::Disconnect) => Event::Disconnected,
            RawEvent::Outgoing(Outgoing::PingReq) => Event::PingSent,
            RawEvent::Incoming(Incoming::PingResp) => Event::PingAnswered,
            _ => Event::Other,
        }
    }
}

/// Whether [`Event::from`] makes an [`Event::Packet`] of `event`.
fn is_packet(event: &RawEvent) -> bool {
    matches!(
        event,
        RawEvent::Incoming(
            Incoming::PubAck(_) | Incoming::PubComp(_) | Incoming::PubRec(_) | Incoming::SubAck(_)
        ) | RawEvent::Outgoing(
            Outgoing::Publish(_) | Outgoing::AwaitAck(_) | Outgoing::Subscribe(_)
        )
    )
}

impl Session {
    /// The broker and TLS material of the next connection.
    pub fn configure(&mut self, config: &Options, broker: &BrokerAddress, tls: Option<&TlsSetup>) {
        self.eventloop.mqtt_options = mqtt_options(config, broker, tls);
        self.eventloop.set_network_options(network_options(config));
    }

    /// One connection attempt (TCP, TLS, CONNECT, CONNACK) within `limit`
    /// (rumqttc's own timeout has whole-second resolution). Returns CONNACK's
    /// session-present flag.
    pub async fn connect(&mut self, limit: Duration) -> Result<bool, LinkError> {
        debug_assert!(self.eventloop.network.is_none(), "connect while connected");
        let attempt = async {
            // Without a network, poll connects and yields CONNACK or an
            // error (point 7); the loop only guards that assumption.
            loop {
                if let RawEvent::Incoming(Incoming::ConnAck(connack)) =
                    self.eventloop.poll().await?
                {
                    return Ok(connack.session_present);
                }
            }
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(outcome) => outcome.map_err(LinkError),
            Err(_) => Err(LinkError(ConnectionError::NetworkTimeout)),
        }
    }

    /// The next event of the established connection.
    ///
    /// Cancelling this future can lose the packet rumqttc was writing: the
    /// driver keeps it alive across what does not end the connection.
    pub async fn next(&mut self) -> Result<Event, LinkError> {
        self.eventloop
            .poll()
            .await
            .map(Event::from)
            .map_err(LinkError)
    }

    /// The next event rumqttc has already read, if it is about one of our
    /// requests: so that a batch of acknowledgements takes one lock, not one
    /// poll each (point 3).
    pub fn next_buffered_packet(&mut self) -> Option<Packet> {
        let buffered = &mut self.eventloop.state.events;
        if !buffered.front().is_some_and(is_packet) {
            return None;
        }
        match buffered.pop_front().map(Event::from) {
            Some(Event::Packet(packet)) => Some(packet),
            _ => None,
        }
    }

    /// Events rumqttc read but has not handed out: after the connection
    /// failed, or before one is dropped. They are real acknowledgements and
    /// messages, to be handled before [`Session::forget`], while their packet
    /// ids still mean what they meant (point 3).
    pub fn take_buffered(&mut self) -> Vec<Event> {
        self.eventloop
            .state
            .events
            .drain(..)
            .map(Event::from)
            .collect()
    }

    /// Ends the connection if it is still up, and forgets it: what rumqttc
    /// has queued or in flight is dropped with the session (point 4), and so
    /// are the packet ids in `requests`. Call it under the lock that guards
    /// `requests`, after handling [`Session::take_buffered`]: no request may
    /// slip into rumqttc's queue between the two.
    pub fn forget(&mut self, requests: &mut Requests) {
        debug_assert!(
            self.eventloop.state.events.is_empty(),
            "events left to take"
        );
        self.eventloop.clean();
        self.eventloop.state.collision = None;
        requests.forget();
    }

    /// [`Session::forget`] for a persistent session: ends the connection and
    /// leaves in rumqttc's `pending` exactly what the broker may know by
    /// packet id (point 4), rebuilt from `requests` and `outbox`: PUBREL for
    /// each QoS 2 message whose PUBREC came, then each message on the wire
    /// (oldest first) with its packet id and DUP set. rumqttc replays them
    /// after a CONNACK with a session, and drops them after one without
    /// (then call [`Requests::forget_all`]). Publishes never written, held
    /// back or queued, are dropped: they are not [`Requests::knows`], and
    /// the outbox sends them as new. Same preconditions as `forget`.
    pub fn suspend(&mut self, requests: &mut Requests, outbox: &Outbox) {
        debug_assert!(
            self.eventloop.state.events.is_empty(),
            "events left to take"
        );
        self.eventloop.clean();
        self.eventloop.state.collision = None;
        self.eventloop.pending.clear();
        let (releases, replays) = requests.suspend();
        for pkid in releases {
            self.eventloop
                .pending
                .push_back(Request::PubRel(PubRel::new(pkid)));
        }
        for (id, pkid) in replays {
            let Some(entry) = outbox.get(id) else {
                continue;
            };
            let mut publish =
                Publish::from_bytes(entry.topic.clone(), entry.qos, entry.payload.clone());
            publish.pkid = pkid;
            publish.dup = true;
            self.eventloop.pending.push_back(Request::Publish(publish));
            requests.publishes.push_back((id, Some(pkid)));
        }
    }
}

/// The request side: rumqttc's request queue, and a record, in the order
/// rumqttc takes requests, of what each one was (point 1), so that the packet
/// ids it reports can be traced back to our messages and topics.
#[derive(Debug)]
pub(crate) struct Requests {
    client: AsyncClient,
    /// Outbox ids of publishes queued to rumqttc and not reported sent yet:
    /// new ones (`None`), or replays of a persistent session with the packet
    /// id the broker knows.
    publishes: VecDeque<(u64, Option<u16>)>,
    /// A publish rumqttc held back because its packet id was still in use.
    held: Option<(u16, u64)>,
    /// Outbox ids of publishes on the wire, by packet id, oldest first: at
    /// QoS 2 one id can be on the wire twice (point 2).
    on_wire: HashMap<u16, VecDeque<Flight>>,
    /// Topic lists of SUBSCRIBE requests queued to rumqttc, in order.
    subscribes: VecDeque<Vec<String>>,
    /// Topic lists of SUBSCRIBE packets sent, by packet id.
    subscribed: HashMap<u16, Vec<String>>,
}

/// A publish on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flight {
    /// Its outbox id.
    id: u64,
    /// QoS 2: PUBREC came and PUBREL went out; only PUBCOMP is due.
    released: bool,
}

/// What a [`Packet`] turned out to be about.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Resolved {
    /// The broker has message `id` (PUBACK, PUBCOMP; at QoS 0, once written).
    Delivered(u64),
    /// SUBACK for `topics`: the QoS granted to each, `None` where refused.
    Subscribed {
        /// The topics of the SUBSCRIBE, in order; empty if it is unknown.
        topics: Vec<String>,
        /// One per topic.
        granted: Vec<Option<QoS>>,
    },
}

impl Requests {
    fn new(client: AsyncClient) -> Self {
        Self {
            client,
            publishes: VecDeque::new(),
            held: None,
            on_wire: HashMap::new(),
            subscribes: VecDeque::new(),
            subscribed: HashMap::new(),
        }
    }

    /// Queues a PUBLISH of outbox message `id`, without waiting.
    ///
    /// # Errors
    ///
    /// [`ClientError::Closed`] when the queue is closed, or (against its
    /// sizing, see [`open`]) full.
    pub fn publish(
        &mut self,
        id: u64,
        topic: &str,
        payload: &Bytes,
        qos: QoS,
    ) -> Result<(), ClientError> {
        let queued = self
            .client
            .publish_bytes(topic.to_owned(), qos, false, payload.clone());
        match ready_now(queued) {
            Some(Ok(())) => {}
            Some(Err(_)) | None => return Err(ClientError::Closed),
        }
        self.publishes.push_back((id, None));
        Ok(())
    }

    /// Queues one SUBSCRIBE for `topics`, without waiting.
    ///
    /// # Errors
    ///
    /// [`ClientError::Closed`] when the queue is closed or full.
    pub fn subscribe(&mut self, topics: Vec<String>, qos: QoS) -> Result<(), ClientError> {
        let filters = topics.iter().map(|t| SubscribeFilter::new(t.clone(), qos));
        self.client
            .try_subscribe_many(filters)
            .map_err(|_| ClientError::Closed)?;
        self.subscribes.push_back(topics);
        Ok(())
    }

    /// Queues a DISCONNECT, without waiting: the driver stops once it is sent.
    pub fn disconnect(&self) {
        // Closed or full: the driver is stopping anyway.
        let _ = self.client.try_disconnect();
    }

    /// Which of our requests `packet` is about.
    pub fn resolve(&mut self, packet: Packet) -> Option<Resolved> {
        match packet.0 {
            PacketKind::Sent(pkid) => {
                let id = match self.held {
                    Some((held, id)) if held == pkid && pkid != 0 => {
                        self.held = None;
                        id
                    }
                    _ => self.publishes.pop_front()?.0,
                };
                if pkid == 0 {
                    // QoS 0: sent is all it will ever be.
                    return Some(Resolved::Delivered(id));
                }
                self.on_wire.entry(pkid).or_default().push_back(Flight {
                    id,
                    released: false,
                });
                None
            }
            PacketKind::HeldBack(pkid) => {
                if let Some((id, _)) = self.publishes.pop_front() {
                    self.held = Some((pkid, id));
                }
                None
            }
            PacketKind::Acknowledged(pkid) => {
                let waiting = self.on_wire.get_mut(&pkid)?;
                let id = waiting.pop_front();
                if waiting.is_empty() {
                    self.on_wire.remove(&pkid);
                }
                id.map(|flight| Resolved::Delivered(flight.id))
            }
            PacketKind::Received(pkid) => {
                // rumqttc reuses an id only after PUBREC (point 2): at most
                // one flight of an id is not released yet.
                let flight = self
                    .on_wire
                    .get_mut(&pkid)?
                    .iter_mut()
                    .find(|f| !f.released);
                if let Some(flight) = flight {
                    flight.released = true;
                }
                None
            }
            PacketKind::SubscribeSent(pkid) => {
                if let Some(topics) = self.subscribes.pop_front() {
                    self.subscribed.insert(pkid, topics);
                }
                None
            }
            PacketKind::SubAck(pkid, granted) => Some(Resolved::Subscribed {
                topics: self.subscribed.remove(&pkid).unwrap_or_default(),
                granted,
            }),
        }
    }

    /// Whether message `id` is queued to rumqttc or on the wire: with a
    /// persistent session, what rumqttc replays (see [`Session::suspend`]).
    pub fn knows(&self, id: u64) -> bool {
        self.publishes.iter().any(|(queued, _)| *queued == id)
            || self.held.is_some_and(|(_, held)| held == id)
            || self.on_wire.values().flatten().any(|f| f.id == id)
    }

    /// A persistent session's connection is gone: returns the packet ids to
    /// release again, and the messages to publish again with their packet
    /// ids, oldest first. Released flights stay on the wire (their PUBCOMP is
    /// due), the others go back to `publishes` as the caller replays them;
    /// what never had a packet id is forgotten, and so is every SUBSCRIBE.
    fn suspend(&mut self) -> (Vec<u16>, Vec<(u64, u16)>) {
        let mut replays: Vec<(u64, u16)> = self
            .publishes
            .drain(..)
            .filter_map(|(id, pkid)| pkid.map(|pkid| (id, pkid)))
            .collect();
        let mut releases = Vec::new();
        for (pkid, flights) in &mut self.on_wire {
            flights.retain(|flight| {
                if !flight.released {
                    replays.push((flight.id, *pkid));
                }
                flight.released
            });
            if !flights.is_empty() {
                releases.push(*pkid);
            }
        }
        self.on_wire.retain(|_, flights| !flights.is_empty());
        replays.sort_unstable();
        releases.sort_unstable();
        self.held = None;
        self.subscribes.clear();
        self.subscribed.clear();
        (releases, replays)
    }

    /// After a CONNACK without a session: rumqttc dropped what it would have
    /// replayed, so every packet id is forgotten.
    pub fn forget_all(&mut self) {
        self.forget();
    }

    /// The connection is gone, and with it every packet id and queued request.
    fn forget(&mut self) {
        self.publishes.clear();
        self.held = None;
        self.on_wire.clear();
        self.subscribes.clear();
        self.subscribed.clear();
    }
}

/// Polls `future` once: its output if it is ready at once. rumqttc's queue
/// takes a request without waiting when it has room (point 8); this lets the
/// request enter under a plain lock.
fn ready_now<F: Future>(future: F) -> Option<F::Output> {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

/// Why rumqttc's event loop stopped.
#[derive(Debug)]
pub(crate) struct LinkError(pub(super) ConnectionError);

impl LinkError {
    /// Every request handle is gone: nobody can publish or stop us.
    pub fn requests_done(&self) -> bool {
        matches!(self.0, ConnectionError::RequestsDone)
    }

    /// Classifies the error. `connected` says whether a CONNACK had been
    /// received on this connection; `mode` helps read ambiguous TLS alerts.
    pub fn into_failure(self, connected: bool, mode: Mode) -> Failure {
        let error = match self.0 {
            ConnectionError::ConnectionRefused(
                ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword,
            ) => return Failure::NotAuthorized,
            ConnectionError::ConnectionRefused(code) => {
                return Failure::Refused(format!("{code:?}"))
            }
            ConnectionError::NetworkTimeout => return Failure::Timeout,
            ConnectionError::FlushTimeout => {
                return Failure::ConnectionLost(ConnectionLoss::WriteTimeout)
            }
            ConnectionError::MqttState(StateError::AwaitPingResp) => {
                return Failure::ConnectionLost(ConnectionLoss::KeepAliveTimeout)
            }
            ConnectionError::NotConnAck(packet) => {
                return Failure::Refused(format!("the broker answered CONNECT with {packet:?}"))
            }
            ConnectionError::MqttState(StateError::ConnectionAborted) => {
                return Failure::closed(connected, mode)
            }
            error => error,
        };
        if let Some(failure) = Failure::transport(&error, mode) {
            return failure;
        }
        if let Some(tls) = find::<rustls::Error>(&error, hidden_cause) {
            return Failure::from_tls(tls, mode);
        }
        let error = match unwrap_io(error) {
            Unwrapped::Io(io) => return Failure::from_io_error(io, connected, mode),
            Unwrapped::Other(error) => error,
        };
        if let Some(io) = find::<io::Error>(&error, hidden_cause) {
            // Somewhere we cannot move it out of: keep its kind and words.
            let io = io::Error::new(io.kind(), io.to_string());
            return Failure::from_io_error(io, connected, mode);
        }
        match connected {
            true => Failure::ConnectionLost(ConnectionLoss::Protocol(error.to_string())),
            false => Failure::Refused(error.to_string()),
        }
    }
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::one_line(&self.0))
    }
}

/// rumqttc's error, or the io::Error inside it where it is owned and reachable.
enum Unwrapped {
    Io(io::Error),
    Other(ConnectionError),
}

fn unwrap_io(error: ConnectionError) -> Unwrapped {
    match error {
        ConnectionError::Io(io)
        | ConnectionError::MqttState(StateError::Io(io))
        | ConnectionError::MqttState(StateError::Deserialization(rumqttc::mqttbytes::Error::Io(
            io,
        )))
        | ConnectionError::Tls(rumqttc::TlsError::Io(io)) => Unwrapped::Io(io),
        other => Unwrapped::Other(other),
    }
}

/// rumqttc's codec error does not expose its io::Error as a source (point 10).
fn hidden_cause<'e>(
    error: &'e (dyn std::error::Error + 'static),
) -> Option<&'e (dyn std::error::Error + 'static)> {
    match error.downcast_ref() {
        Some(rumqttc::mqttbytes::Error::Io(io)) => Some(io),
        _ => None,
    }
}

#[cfg(test)]
mod scripted;

#[cfg(test)]
mod tests {
    use rustls::{AlertDescription, CertificateError};

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

    /// rumqttc's whole-second timeout never cuts an attempt ours allows:
    /// `P_MQTT_TIMEOUT` rounded up, at open and at every reconfiguration.
    #[tokio::test]
    async fn rumqttc_waits_as_long_as_the_connect_timeout() {
        let config = Options::new("tcp://a:1883,tcp://b:1883", "p", Secret::new("k"))
            .unwrap()
            .with_connect_timeout(Duration::from_millis(12_500));
        let (mut session, _requests) = open(&config, None, 8);
        assert_eq!(session.eventloop.network_options().connection_timeout(), 13);
        let longer = config.clone().with_connect_timeout(Duration::from_secs(30));
        session.configure(&longer, &longer.brokers[1], None);
        assert_eq!(session.eventloop.network_options().connection_timeout(), 30);
        let short = config.with_connect_timeout(Duration::from_millis(200));
        assert_eq!(network_options(&short).connection_timeout(), 1);
    }

    /// Our patch (`vendor/rumqttc/no-panic-on-foreign-request.patch`): a
    /// request kind a client never queues is an error, not a panic.
    #[test]
    fn a_request_only_a_broker_sends_is_refused_not_a_panic() {
        let mut state = rumqttc::MqttState::new(10, false);
        let refused = state.handle_outgoing_packet(Request::PubComp(rumqttc::PubComp::new(1)));
        assert!(
            matches!(refused, Err(StateError::InvalidState)),
            "{refused:?}"
        );
        let mut state = rumqttc::v5::MqttState::new(10, false);
        let refused = state.handle_outgoing_packet(rumqttc::v5::Request::PubComp(
            rumqttc::v5::mqttbytes::v5::PubComp::new(1, None),
        ));
        assert!(
            matches!(refused, Err(rumqttc::v5::StateError::InvalidState)),
            "{refused:?}"
        );
    }

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

    fn failure(error: ConnectionError, connected: bool, mode: Mode) -> Failure {
        LinkError(error).into_failure(connected, mode)
    }

    #[test]
    fn tls_errors_nested_in_rumqttc_errors_are_found() {
        let error = ConnectionError::MqttState(StateError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
        )));
        assert_eq!(
            failure(error, false, Mode::Tls),
            Failure::ClientCertificateRequired
        );
        let error = ConnectionError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        ));
        assert_eq!(failure(error, false, Mode::Tls), Failure::BrokerUntrusted);
        // Behind the codec error, which hides its io::Error from `source()`.
        let error = ConnectionError::MqttState(StateError::Deserialization(
            rumqttc::mqttbytes::Error::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::AlertReceived(AlertDescription::BadCertificate),
            )),
        ));
        assert_eq!(
            failure(error, false, Mode::MutualTls),
            Failure::ClientCertificateRejected(Some(AlertDescription::BadCertificate))
        );
    }

    #[test]
    fn a_closed_stream_depends_on_whether_connack_came() {
        let aborted = || ConnectionError::MqttState(StateError::ConnectionAborted);
        assert_eq!(
            failure(aborted(), false, Mode::MutualTls),
            Failure::ClosedBeforeConnAck
        );
        assert_eq!(
            failure(aborted(), true, Mode::MutualTls),
            Failure::ConnectionLost(ConnectionLoss::Closed)
        );
        let reset = ConnectionError::Io(io::ErrorKind::ConnectionReset.into());
        assert_eq!(
            failure(reset, false, Mode::Plain),
            Failure::ClosedBeforeConnAckPlain
        );
    }

    /// The io::Error itself becomes the failure's source, moved, not copied.
    #[test]
    fn io_errors_are_kept_whole() {
        let error = ConnectionError::Io(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            "nobody home",
        ));
        let failure = failure(error, false, Mode::Plain);
        assert!(
            matches!(&failure, Failure::Unreachable(io) if io.kind() == io::ErrorKind::ConnectionRefused)
        );
        let source = std::error::Error::source(&failure).expect("a source");
        assert_eq!(source.to_string(), "nobody home");
    }

    #[test]
    fn timeouts_and_protocol_errors() {
        assert_eq!(
            failure(ConnectionError::FlushTimeout, true, Mode::Plain),
            Failure::ConnectionLost(ConnectionLoss::WriteTimeout)
        );
        let ping = failure(
            ConnectionError::MqttState(StateError::AwaitPingResp),
            true,
            Mode::Plain,
        );
        assert!(ping.is_timeout() && ping.is_network(), "{ping:?}");
        let unsolicited = failure(
            ConnectionError::MqttState(StateError::Unsolicited(7)),
            true,
            Mode::Plain,
        );
        assert!(
            matches!(&unsolicited, Failure::ConnectionLost(ConnectionLoss::Protocol(why)) if why.contains('7')),
            "{unsolicited:?}"
        );
        assert_eq!(
            failure(
                ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword),
                false,
                Mode::Plain
            ),
            Failure::NotAuthorized
        );
    }

    /// The peek that batches bookkeeping takes exactly what becomes a Packet.
    #[test]
    fn is_packet_agrees_with_the_conversion() {
        let events = [
            RawEvent::Incoming(Incoming::PubAck(rumqttc::PubAck::new(1))),
            RawEvent::Incoming(Incoming::PubComp(rumqttc::PubComp::new(1))),
            RawEvent::Incoming(Incoming::PubRec(rumqttc::PubRec::new(1))),
            RawEvent::Incoming(Incoming::SubAck(rumqttc::SubAck::new(1, vec![]))),
            RawEvent::Incoming(Incoming::PingResp),
            RawEvent::Incoming(Incoming::Publish(rumqttc::Publish::new(
                "t",
                QoS::AtLeastOnce,
                "x",
            ))),
            RawEvent::Outgoing(Outgoing::Publish(1)),
            RawEvent::Outgoing(Outgoing::AwaitAck(1)),
            RawEvent::Outgoing(Outgoing::Subscribe(1)),
            RawEvent::Outgoing(Outgoing::PubRel(1)),
            RawEvent::Outgoing(Outgoing::Disconnect),
        ];
        for event in events {
            assert_eq!(
                is_packet(&event),
                matches!(Event::from(event.clone()), Event::Packet(_)),
                "{event:?}"
            );
        }
    }

    /// Requests on a queue nobody drains: enough to test the bookkeeping.
    fn requests() -> (Requests, EventLoop) {
        let (client, eventloop) = AsyncClient::new(MqttOptions::new("t", "localhost", 1883), 64);
        (Requests::new(client), eventloop)
    }

    fn queue(requests: &mut Requests, ids: impl IntoIterator<Item = u64>, qos: QoS) {
        for id in ids {
            requests.publish(id, "t", &Bytes::new(), qos).unwrap();
        }
    }

    fn resolve(requests: &mut Requests, kind: PacketKind) -> Option<Resolved> {
        requests.resolve(Packet(kind))
    }

    #[test]
    fn acknowledgements_name_the_right_message() {
        use PacketKind::*;
        let (mut requests, _eventloop) = requests();
        queue(&mut requests, [10, 11, 12], QoS::AtLeastOnce);
        for pkid in [1, 2, 3] {
            assert_eq!(resolve(&mut requests, Sent(pkid)), None);
        }
        assert_eq!(
            resolve(&mut requests, Acknowledged(2)),
            Some(Resolved::Delivered(11))
        );
        // Once: a second PUBACK for the same id names nothing.
        assert_eq!(resolve(&mut requests, Acknowledged(2)), None);
        assert_eq!(
            resolve(&mut requests, Acknowledged(1)),
            Some(Resolved::Delivered(10))
        );
    }

    #[test]
    fn qos0_is_delivered_once_written() {
        let (mut requests, _eventloop) = requests();
        queue(&mut requests, [4, 5], QoS::AtMostOnce);
        assert_eq!(
            resolve(&mut requests, PacketKind::Sent(0)),
            Some(Resolved::Delivered(4))
        );
    }

    #[test]
    fn a_held_back_publish_keeps_its_identity() {
        use PacketKind::*;
        let (mut requests, _eventloop) = requests();
        queue(&mut requests, [0, 1], QoS::AtLeastOnce);
        resolve(&mut requests, Sent(1));
        resolve(&mut requests, HeldBack(1));
        assert_eq!(
            resolve(&mut requests, Acknowledged(1)),
            Some(Resolved::Delivered(0))
        );
        resolve(&mut requests, Sent(1));
        assert_eq!(
            resolve(&mut requests, Acknowledged(1)),
            Some(Resolved::Delivered(1))
        );
    }

    /// rumqttc reuses a QoS 2 id once PUBREC came, before PUBCOMP (point 2):
    /// the first PUBCOMP is the old message's.
    #[test]
    fn a_reused_qos2_id_is_matched_first_in_first_out() {
        use PacketKind::*;
        let (mut requests, _eventloop) = requests();
        queue(&mut requests, [0, 1], QoS::ExactlyOnce);
        resolve(&mut requests, Sent(7));
        resolve(&mut requests, Sent(7));
        assert_eq!(
            resolve(&mut requests, Acknowledged(7)),
            Some(Resolved::Delivered(0))
        );
        assert_eq!(
            resolve(&mut requests, Acknowledged(7)),
            Some(Resolved::Delivered(1))
        );
    }

    #[test]
    fn a_forgotten_connection_names_nothing() {
        use PacketKind::*;
        let (mut requests, _eventloop) = requests();
        queue(&mut requests, [0, 1], QoS::AtLeastOnce);
        resolve(&mut requests, Sent(1));
        requests.forget();
        assert_eq!(resolve(&mut requests, Acknowledged(1)), None);
        // Packet ids start over with what is queued next.
        queue(&mut requests, [1], QoS::AtLeastOnce);
        resolve(&mut requests, Sent(2));
        assert_eq!(
            resolve(&mut requests, Acknowledged(2)),
            Some(Resolved::Delivered(1))
        );
    }

    #[test]
    fn subacks_name_their_topics() {
        use PacketKind::*;
        let (mut requests, _eventloop) = requests();
        requests
            .subscribe(vec!["a".into(), "b".into()], QoS::AtLeastOnce)
            .unwrap();
        resolve(&mut requests, SubscribeSent(3));
        assert_eq!(
            resolve(&mut requests, SubAck(3, vec![Some(QoS::AtLeastOnce), None])),
            Some(Resolved::Subscribed {
                topics: vec!["a".into(), "b".into()],
                granted: vec![Some(QoS::AtLeastOnce), None],
            })
        );
    }
}
