//! The client's state machine against a scripted broker ([`super::peer`]):
//! resending after a reconnect, acknowledgements read together with a
//! failure, stale packet ids, failover, and TLS reload. The broker decides
//! every acknowledgement and every close, so each run takes the same path;
//! the only waits are for events, bounded by [`guard`] against hangs.

use std::sync::Arc;

use rumqttc::{Packet, Publish, SubAck, Subscribe, SubscribeReasonCode};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{oneshot, watch};

use super::peer::{guard, text, Peer};
use super::{Client, ConnectionLoss, ConnectionState, Delivery, Failure, Message};
use crate::{Options, QoS, Secret, TlsSettings};

fn options(brokers: &[&Peer]) -> Options {
    let address: Vec<String> = brokers.iter().map(|peer| peer.url()).collect();
    Options::new(&address.join(","), "tester", Secret::new("key"))
        .expect("valid address")
        .with_qos(QoS::AtLeastOnce)
}

/// Waits for a state that `wanted` accepts, and returns it.
async fn state_where(
    state: &mut watch::Receiver<ConnectionState>,
    wanted: impl Fn(&ConnectionState) -> bool,
) -> ConnectionState {
    guard("a connection state", state.wait_for(|s| wanted(s)))
        .await
        .expect("the client is alive")
        .clone()
}

async fn connected(state: &mut watch::Receiver<ConnectionState>) {
    state_where(state, |s| *s == ConnectionState::Connected).await;
}

/// The failure of the next `Retrying` state.
async fn retrying(state: &mut watch::Receiver<ConnectionState>) -> Failure {
    match state_where(state, |s| matches!(s, ConnectionState::Retrying { .. })).await {
        ConnectionState::Retrying { failure, .. } => failure,
        _ => unreachable!(),
    }
}

async fn publish(client: &Client, payloads: &[&str]) -> Vec<Delivery> {
    let mut deliveries = Vec::new();
    for payload in payloads {
        let delivery = client.publish("out", payload.to_string()).await;
        deliveries.push(delivery.expect("room in the outbox"));
    }
    deliveries
}

/// Resolved already? Nothing but its own acknowledgement may resolve a
/// delivery, so "not yet" is a fact here, not a race.
fn resolved(delivery: &mut Delivery) -> bool {
    match delivery.0.try_recv() {
        Ok(()) => true,
        Err(oneshot::error::TryRecvError::Empty) => false,
        Err(oneshot::error::TryRecvError::Closed) => panic!("the client dropped a delivery"),
    }
}

async fn acknowledged(delivery: Delivery) {
    guard("an acknowledgement", delivery.acknowledged())
        .await
        .expect("acknowledged, not closed");
}

fn texts(publishes: &[Publish]) -> Vec<String> {
    publishes.iter().map(text).collect()
}

/// Shuts the client down while the broker listens: nothing but DISCONNECT
/// may come after the last expected packet, so nothing was sent twice.
async fn shut_down(client: Client, conn: &mut super::peer::Conn) {
    let (left, rest) = tokio::join!(client.shutdown(), conn.rest());
    assert_eq!(left, 0, "messages left unacknowledged");
    assert_eq!(rest, [Packet::Disconnect], "after the last expected packet");
}

/// What the broker had not acknowledged when the connection dropped is sent
/// again on the next one, and only that; every delivery resolves once, on
/// its own acknowledgement.
#[tokio::test]
async fn unacknowledged_messages_are_sent_again_after_a_reconnect() {
    let peer = Peer::plain().await;
    let (client, _messages) = Client::start(&options(&[&peer]), vec![]).unwrap();
    let mut state = client.state();
    let mut conn = peer.accept_session().await;
    connected(&mut state).await;

    let mut deliveries = publish(&client, &["0", "1", "2", "3", "4"]).await;
    let sent = conn.publishes(5).await;
    assert_eq!(texts(&sent), ["0", "1", "2", "3", "4"]);
    // The broker takes the first two, then the connection drops.
    conn.puback([sent[0].pkid, sent[1].pkid]).await;
    drop(conn);
    assert_eq!(
        retrying(&mut state).await,
        Failure::ConnectionLost(ConnectionLoss::Closed)
    );
    let mut rest = deliveries.split_off(2);
    for delivery in deliveries {
        acknowledged(delivery).await;
    }

    let mut conn = peer.accept_session().await;
    let again = conn.publishes(3).await;
    assert_eq!(texts(&again), ["2", "3", "4"]);
    assert!(
        !rest.iter_mut().any(resolved),
        "resolved before the new PUBACKs"
    );
    connected(&mut state).await;
    conn.puback(again.iter().map(|p| p.pkid)).await;
    for delivery in rest {
        acknowledged(delivery).await;
    }
    assert_eq!(client.unacknowledged().await, 0);
    shut_down(client, &mut conn).await;
}

/// rumqttc reads in batches: a PUBACK can arrive in the same read as what
/// ends the connection. It still counts, and an acknowledgement for a packet
/// id of the old connection names no message on the new one.
#[tokio::test]
async fn an_acknowledgement_read_with_the_failure_counts_and_a_stale_one_does_not() {
    let peer = Peer::plain().await;
    let (client, _messages) = Client::start(&options(&[&peer]), vec![]).unwrap();
    let mut state = client.state();
    let mut conn = peer.accept_session().await;
    connected(&mut state).await;

    // The first connection drops with both messages unacknowledged.
    let [mut a, mut b]: [Delivery; 2] = publish(&client, &["a", "b"]).await.try_into().unwrap();
    let old = conn.publishes(2).await;
    drop(conn);
    retrying(&mut state).await;

    // On the second, one write: A's real PUBACK, then a PUBACK with B's
    // packet id of the first connection, which this one never used. rumqttc
    // refuses the latter (a protocol error), so the connection fails in the
    // same read that brought A's acknowledgement.
    let mut conn = peer.accept_session().await;
    let resent = conn.publishes(2).await;
    assert_eq!(texts(&resent), ["a", "b"]);
    assert!(
        resent.iter().all(|p| old.iter().all(|o| o.pkid != p.pkid)),
        "packet ids go on across connections: {old:?} then {resent:?}"
    );
    assert!(!resolved(&mut a) && !resolved(&mut b));
    conn.puback([resent[0].pkid, old[1].pkid]).await;
    let failure = retrying(&mut state).await;
    assert!(
        matches!(
            &failure,
            Failure::ConnectionLost(ConnectionLoss::Protocol(_))
        ),
        "{failure:?}"
    );
    acknowledged(a).await;

    // Only B is sent again, and only its own acknowledgement resolves it.
    let mut conn = peer.accept_session().await;
    let last = conn.publish().await;
    assert_eq!(text(&last), "b");
    assert!(!resolved(&mut b));
    conn.puback([last.pkid]).await;
    acknowledged(b).await;
    shut_down(client, &mut conn).await;
}

/// A broker that refuses us, then one that drops us: the client goes down
/// the list and round again, and each new connection gets the subscriptions
/// and the unacknowledged messages back.
#[tokio::test]
async fn failover_goes_down_the_list_restoring_subscriptions_and_messages() {
    let (first, second) = (Peer::plain().await, Peer::plain().await);
    let (client, mut messages) =
        Client::start(&options(&[&first, &second]), vec!["in/#".into()]).unwrap();
    let mut state = client.state();

    // The first refuses our credentials.
    let mut conn = first.accept().await;
    conn.send(&[Packet::ConnAck(rumqttc::ConnAck::new(
        rumqttc::ConnectReturnCode::NotAuthorized,
        false,
    ))])
    .await;
    assert_eq!(retrying(&mut state).await, Failure::NotAuthorized);

    // The second takes us, then goes away with A unacknowledged.
    let mut conn = second.accept_session().await;
    let topics = subscribed(&mut conn).await;
    assert_eq!(topics, ["in/#"]);
    connected(&mut state).await;
    let [a]: [Delivery; 1] = publish(&client, &["a"]).await.try_into().unwrap();
    assert_eq!(text(&conn.publish().await), "a");
    drop(conn);
    assert_eq!(
        retrying(&mut state).await,
        Failure::ConnectionLost(ConnectionLoss::Closed)
    );

    // Round to the first again, which now takes us: subscription first, then A.
    let mut conn = first.accept_session().await;
    assert_eq!(subscribed(&mut conn).await, ["in/#"]);
    let resent = conn.publish().await;
    assert_eq!(text(&resent), "a");
    conn.puback([resent.pkid]).await;
    acknowledged(a).await;

    // And what it publishes on our subscription reaches the service.
    let mut incoming = Publish::new("in/x", QoS::AtLeastOnce, "hello");
    incoming.pkid = 7;
    conn.send(&[Packet::Publish(incoming)]).await;
    let message = guard("a message", messages.recv()).await;
    assert_eq!(
        message,
        Some(Message {
            topic: "in/x".into(),
            payload: "hello".into()
        })
    );
    assert_eq!(
        conn.read().await,
        Some(Packet::PubAck(rumqttc::PubAck::new(7)))
    );
    shut_down(client, &mut conn).await;
}

/// Reads a SUBSCRIBE, grants it, and returns its topics.
async fn subscribed(conn: &mut super::peer::Conn) -> Vec<String> {
    let Some(Packet::Subscribe(Subscribe { pkid, filters })) = conn.read().await else {
        panic!("expected SUBSCRIBE");
    };
    let granted = filters
        .iter()
        .map(|f| SubscribeReasonCode::Success(f.qos))
        .collect();
    conn.send(&[Packet::SubAck(SubAck::new(pkid, granted))])
        .await;
    filters.into_iter().map(|f| f.path).collect()
}

/// A self-signed certificate for 127.0.0.1, its PEM in `dir`, and a server
/// configuration presenting it.
fn tls_material(dir: &std::path::Path) -> (std::path::PathBuf, Arc<rustls::ServerConfig>) {
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, certified.cert.pem()).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .unwrap();
    (ca, Arc::new(config))
}

/// SIGHUP with the same files keeps the connection; with changed files the
/// client reconnects with them (which shows the first check would see a
/// reconnect).
#[tokio::test]
async fn reloading_unchanged_tls_files_keeps_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, server) = tls_material(dir.path());
    let peer = Peer::tls(server).await;
    let options = options(&[&peer]).with_tls(TlsSettings {
        ca: Some(ca.clone()),
        ..Default::default()
    });
    let (client, _messages) = Client::start(&options, vec![]).unwrap();
    let mut state = client.state();
    let mut conn = peer.accept_session().await;
    connected(&mut state).await;
    state.borrow_and_update();

    // The driver takes commands before the connection's work, and the
    // reload is asked before the publish: by the time the PUBLISH arrives on
    // this same connection, the reload has been handled.
    client.reload_tls();
    let [a]: [Delivery; 1] = publish(&client, &["a"]).await.try_into().unwrap();
    let sent = conn.publish().await;
    conn.puback([sent.pkid]).await;
    acknowledged(a).await;
    assert!(
        !state.has_changed().unwrap(),
        "the state moved: {:?}",
        *state.borrow()
    );

    // Changed files (the same certificate, one more newline): a reconnect.
    let mut pem = std::fs::read_to_string(&ca).unwrap();
    pem.push('\n');
    std::fs::write(&ca, pem).unwrap();
    client.reload_tls();
    state_where(&mut state, |s| *s == ConnectionState::Connecting).await;
    assert_eq!(conn.rest().await, [], "the old connection just closes");
    let mut conn = peer.accept_session().await;
    connected(&mut state).await;
    shut_down(client, &mut conn).await;
}

/// With a persistent session, a client whose connection dropped.
async fn persistent(
    peer: &Peer,
    qos: QoS,
    topics: Vec<String>,
) -> (Client, watch::Receiver<ConnectionState>, super::peer::Conn) {
    let config = options(&[peer]).with_qos(qos).with_persistent_session(true);
    let (client, _messages) = Client::start(&config, topics).unwrap();
    let mut state = client.state();
    let conn = peer.accept_session().await;
    connected(&mut state).await;
    (client, state, conn)
}

/// A persistent session at QoS 1 that the broker kept: rumqttc sends again
/// what was on the wire, with the same packet ids and DUP set, the outbox
/// sends only what never went out, and the confirmed subscription is not
/// sent again. Nothing is sent twice: after the last expected packet comes
/// only DISCONNECT.
#[tokio::test]
async fn a_kept_session_resends_with_the_same_packet_ids_once_at_qos1() {
    let peer = Peer::plain().await;
    let (client, mut state, mut conn) =
        persistent(&peer, QoS::AtLeastOnce, vec!["in".into()]).await;
    assert_eq!(subscribed(&mut conn).await, ["in"]);

    let mut deliveries = publish(&client, &["0", "1", "2"]).await;
    let sent = conn.publishes(3).await;
    conn.puback([sent[0].pkid]).await;
    drop(conn);
    retrying(&mut state).await;
    let first = deliveries.remove(0);
    acknowledged(first).await;
    // Published while the link is down: never on the wire.
    deliveries.extend(publish(&client, &["3"]).await);

    let mut conn = peer.accept_with(true).await;
    let again = conn.publishes(3).await;
    assert_eq!(
        again
            .iter()
            .map(|p| (text(p), p.pkid, p.dup))
            .collect::<Vec<_>>(),
        [
            ("1".to_owned(), sent[1].pkid, true),
            ("2".to_owned(), sent[2].pkid, true),
            ("3".to_owned(), again[2].pkid, false),
        ]
    );
    connected(&mut state).await;
    conn.puback(again.iter().map(|p| p.pkid)).await;
    for delivery in deliveries {
        acknowledged(delivery).await;
    }
    shut_down(client, &mut conn).await;
}

/// The same client, but the broker lost the session: everything
/// unacknowledged comes from the outbox, and the subscription is restored.
#[tokio::test]
async fn a_lost_session_resends_from_the_outbox_and_subscribes_again() {
    let peer = Peer::plain().await;
    let (client, mut state, mut conn) =
        persistent(&peer, QoS::AtLeastOnce, vec!["in".into()]).await;
    assert_eq!(subscribed(&mut conn).await, ["in"]);
    let deliveries = publish(&client, &["0", "1"]).await;
    conn.publishes(2).await;
    drop(conn);
    retrying(&mut state).await;

    let mut conn = peer.accept_with(false).await;
    assert_eq!(subscribed(&mut conn).await, ["in"]);
    let again = conn.publishes(2).await;
    assert_eq!(texts(&again), ["0", "1"]);
    assert!(again.iter().all(|p| !p.dup));
    conn.puback(again.iter().map(|p| p.pkid)).await;
    for delivery in deliveries {
        acknowledged(delivery).await;
    }
    shut_down(client, &mut conn).await;
}

/// QoS 2 exactly once across a kept session: a message whose PUBREC came
/// is released again (PUBREL, not PUBLISH); one whose PUBREC did not come
/// is published again with the packet id the broker knows, so the broker can
/// tell it is the same message. Each completes on its own PUBCOMP.
#[tokio::test]
async fn a_kept_session_releases_and_resends_qos2_with_the_same_packet_ids() {
    use rumqttc::{PubComp, PubRec, PubRel};
    let peer = Peer::plain().await;
    let (client, mut state, mut conn) = persistent(&peer, QoS::ExactlyOnce, vec![]).await;

    let deliveries = publish(&client, &["a", "b"]).await;
    let sent = conn.publishes(2).await;
    conn.send(&[Packet::PubRec(PubRec::new(sent[0].pkid))])
        .await;
    assert_eq!(
        conn.read().await,
        Some(Packet::PubRel(PubRel::new(sent[0].pkid)))
    );
    drop(conn);
    retrying(&mut state).await;

    let mut conn = peer.accept_with(true).await;
    assert_eq!(
        conn.read().await,
        Some(Packet::PubRel(PubRel::new(sent[0].pkid)))
    );
    let b = conn.publish().await;
    assert_eq!(
        (text(&b), b.pkid, b.dup),
        ("b".to_owned(), sent[1].pkid, true)
    );
    connected(&mut state).await;
    conn.send(&[
        Packet::PubComp(PubComp::new(sent[0].pkid)),
        Packet::PubRec(PubRec::new(b.pkid)),
    ])
    .await;
    assert_eq!(conn.read().await, Some(Packet::PubRel(PubRel::new(b.pkid))));
    conn.send(&[Packet::PubComp(PubComp::new(b.pkid))]).await;
    for delivery in deliveries {
        acknowledged(delivery).await;
    }
    shut_down(client, &mut conn).await;
}

/// A persistent session that the broker kept from an earlier process: this
/// process has confirmed nothing, so it subscribes anyway.
#[tokio::test]
async fn a_session_kept_from_another_process_is_subscribed_again() {
    let peer = Peer::plain().await;
    let config = options(&[&peer]).with_persistent_session(true);
    let (client, _messages) = Client::start(&config, vec!["in".into()]).unwrap();
    let mut state = client.state();
    let mut conn = peer.accept_with(true).await;
    connected(&mut state).await;
    assert_eq!(subscribed(&mut conn).await, ["in"]);
    shut_down(client, &mut conn).await;
}

/// A kept session lost again before the broker acknowledged the replays:
/// the next kept session replays them once more, still with the packet ids
/// the broker knows.
#[tokio::test]
async fn replays_keep_their_packet_ids_across_two_kept_sessions() {
    let peer = Peer::plain().await;
    let (client, mut state, mut conn) = persistent(&peer, QoS::AtLeastOnce, vec![]).await;
    let deliveries = publish(&client, &["x", "y"]).await;
    let sent = conn.publishes(2).await;
    drop(conn);
    retrying(&mut state).await;
    for _ in 0..2 {
        let mut conn = peer.accept_with(true).await;
        let again = conn.publishes(2).await;
        assert_eq!(texts_and_ids(&again), texts_and_ids(&sent));
        drop(conn);
        retrying(&mut state).await;
    }
    let mut conn = peer.accept_with(true).await;
    let again = conn.publishes(2).await;
    assert_eq!(texts_and_ids(&again), texts_and_ids(&sent));
    conn.puback(again.iter().map(|p| p.pkid)).await;
    for delivery in deliveries {
        acknowledged(delivery).await;
    }
    shut_down(client, &mut conn).await;
}

fn texts_and_ids(publishes: &[Publish]) -> Vec<(String, u16)> {
    publishes.iter().map(|p| (text(p), p.pkid)).collect()
}

/// The snapshot counts connections, the last failure and the outbox.
#[tokio::test]
async fn metrics_count_connections_failures_and_the_outbox() {
    let peer = Peer::plain().await;
    let (client, _messages) = Client::start(&options(&[&peer]), vec![]).unwrap();
    let mut state = client.state();
    let conn = peer.accept_session().await;
    connected(&mut state).await;
    let _deliveries = publish(&client, &["a", "b"]).await;
    let metrics = client.metrics();
    assert!(metrics.connected);
    assert_eq!((metrics.connections, metrics.reconnects), (1, 0));
    assert_eq!(metrics.outbox_depth, 2);
    assert_eq!(metrics.last_failure_class, None);
    assert_eq!(metrics.certificate_days_left, None);
    drop(conn);
    retrying(&mut state).await;
    let mut conn = peer.accept_session().await;
    connected(&mut state).await;
    let again = conn.publishes(2).await;
    let metrics = client.metrics();
    assert_eq!((metrics.connections, metrics.reconnects), (2, 1));
    assert_eq!(metrics.last_failure_class, Some("connection-lost"));
    conn.puback(again.iter().map(|p| p.pkid)).await;
    shut_down(client, &mut conn).await;
}

/// Two clients with one id: the broker accepts each, then closes it when
/// the other connects. A connection closed that soon after CONNACK, again
/// and again, is explained as such, naming the id, and does not reset the
/// backoff.
#[tokio::test]
async fn connections_closed_right_after_connack_are_explained_as_a_takeover() {
    let peer = Peer::plain().await;
    let config = options(&[&peer]).with_reconnect_delays(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_millis(50),
    );
    let (client, _messages) = Client::start(&config, vec![]).unwrap();
    let mut state = client.state();
    let mut failures = Vec::new();
    for _ in 0..3 {
        let conn = peer.accept_session().await;
        connected(&mut state).await;
        drop(conn);
        failures.push(retrying(&mut state).await);
    }
    assert_eq!(
        failures[0],
        Failure::ConnectionLost(ConnectionLoss::Closed),
        "once is not yet a pattern"
    );
    let taken_over = Failure::ConnectionLost(ConnectionLoss::TakenOver {
        client_id: "tester".into(),
        times: 3,
    });
    assert_eq!(failures[2], taken_over);
    assert_eq!(failures[2].class(), "taken-over");
    let cause = failures[2].to_string();
    assert!(
        cause.contains("another client is probably connected with the same client id \"tester\""),
        "{cause}"
    );
    let fix = failures[2].fix(&crate::Names::prefixed("PROPLET_"));
    assert!(fix.contains("PROPLET_CLIENT_ID"), "{fix}");
    client.shutdown().await;
}

/// TLS files mounted the Kubernetes way (`ca.crt -> ..data/ca.crt`,
/// `..data -> ..2026_a`): swapping `..data` to a new directory is picked
/// up without SIGHUP, checked as at startup, and the client reconnects
/// with the new material.
#[cfg(unix)]
#[tokio::test]
async fn a_kubernetes_data_swap_is_picked_up_without_a_signal() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let (ca, server) = tls_material(dir.path());
    let mount = dir.path().join("mount");
    let first = mount.join("..2026_a");
    std::fs::create_dir_all(&first).unwrap();
    std::fs::copy(&ca, first.join("ca.crt")).unwrap();
    symlink("..2026_a", mount.join("..data")).unwrap();
    symlink("..data/ca.crt", mount.join("ca.crt")).unwrap();

    let peer = Peer::tls(server).await;
    let options = options(&[&peer]).with_tls(TlsSettings {
        ca: Some(mount.join("ca.crt")),
        ..Default::default()
    });
    let (client, _messages) = Client::start(&options, vec![]).unwrap();
    let mut state = client.state();
    let mut conn = peer.accept_session().await;
    connected(&mut state).await;

    // The renewed secret: a new directory, then an atomic swap of `..data`.
    let second = mount.join("..2026_b");
    std::fs::create_dir_all(&second).unwrap();
    let mut pem = std::fs::read_to_string(&ca).unwrap();
    pem.push('\n');
    std::fs::write(second.join("ca.crt"), pem).unwrap();
    symlink("..2026_b", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    let swapped = std::time::Instant::now();

    state_where(&mut state, |s| *s == ConnectionState::Connecting).await;
    assert_eq!(conn.rest().await, [], "the old connection just closes");
    let mut conn = peer.accept_session().await;
    connected(&mut state).await;
    println!(
        "..data swap picked up {:?} after it happened",
        swapped.elapsed()
    );
    shut_down(client, &mut conn).await;
}

/// An address where nothing listens: a client there never connects.
fn nowhere() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("tcp://{}", listener.local_addr().expect("address"))
}

/// Options for a client that stays offline, with its outbox in `dir`. It
/// waits for acknowledgements at shutdown only as long as its short connect
/// timeout.
fn offline(dir: &std::path::Path) -> Options {
    Options::new(&nowhere(), "tester", Secret::new("key"))
        .expect("valid address")
        .with_qos(QoS::AtLeastOnce)
        .with_connect_timeout(std::time::Duration::from_millis(200))
        .with_outbox_dir(dir)
}

/// The messages in the outbox directory.
fn stored(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("the outbox directory")
        .map(|entry| entry.expect("an entry").file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".msg"))
        .collect();
    names.sort();
    names
}

async fn no_message_stored(dir: &std::path::Path) {
    guard("the acknowledged messages' files removed", async {
        while !stored(dir).is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// What a client published while the broker was away is on disk when
/// `publish` returns, and stays there when the client stops. A client
/// started later on the directory sends it after its first CONNACK, in
/// order and before anything new, and removes each file on its PUBACK.
#[tokio::test]
async fn the_outbox_directory_outlives_the_client_that_wrote_it() {
    let dir = tempfile::tempdir().unwrap();
    let (client, _messages) = Client::start(&offline(dir.path()), vec![]).unwrap();
    let deliveries = publish(&client, &["0", "1", "2"]).await;
    assert_eq!(stored(dir.path()).len(), 3, "durable when publish returns");
    assert_eq!(client.shutdown().await, 3);
    drop(deliveries);
    assert_eq!(stored(dir.path()).len(), 3);

    let peer = Peer::plain().await;
    let options = options(&[&peer]).with_outbox_dir(dir.path());
    let (client, _messages) = Client::start(&options, vec![]).unwrap();
    assert_eq!(client.unacknowledged().await, 3);
    let mut state = client.state();
    let mut conn = peer.accept_session().await;
    let sent = conn.publishes(3).await;
    assert_eq!(texts(&sent), ["0", "1", "2"]);
    connected(&mut state).await;
    let [new]: [Delivery; 1] = publish(&client, &["3"]).await.try_into().unwrap();
    let next = conn.publish().await;
    assert_eq!(text(&next), "3");
    assert_eq!(stored(dir.path()).len(), 4);
    conn.puback(sent.iter().chain([&next]).map(|p| p.pkid))
        .await;
    acknowledged(new).await;
    no_message_stored(dir.path()).await;
    shut_down(client, &mut conn).await;
}

/// QoS 0 promises nothing across a restart: such messages never touch the disk.
#[tokio::test]
async fn qos_0_messages_are_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let peer = Peer::plain().await;
    let options = options(&[&peer])
        .with_qos(QoS::AtMostOnce)
        .with_outbox_dir(dir.path());
    let (client, _messages) = Client::start(&options, vec![]).unwrap();
    let mut state = client.state();
    let mut conn = peer.accept_session().await;
    connected(&mut state).await;
    let [delivery]: [Delivery; 1] = publish(&client, &["x"]).await.try_into().unwrap();
    assert_eq!(stored(dir.path()), Vec::<String>::new());
    let sent = conn.publish().await;
    assert_eq!((text(&sent).as_str(), sent.qos), ("x", QoS::AtMostOnce));
    acknowledged(delivery).await;
    shut_down(client, &mut conn).await;
}

/// Two clients on one directory would send each other's messages and delete
/// each other's files: the second is refused at start, naming the setting
/// and the directory, until the first has shut down.
#[tokio::test]
async fn a_second_client_on_the_directory_is_refused_until_the_first_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _messages) = Client::start(&offline(dir.path()), vec![]).unwrap();
    let refused = Client::start(&offline(dir.path()), vec![]).unwrap_err();
    assert_eq!(
        refused.to_string(),
        format!(
            "another process uses {} (MQTT_OUTBOX_DIR): give each process its own directory",
            dir.path().display()
        )
    );
    first.shutdown().await;
    let (third, _messages) =
        Client::start(&offline(dir.path()), vec![]).expect("the directory is free again");
    third.shutdown().await;
}

/// Messages found on disk count toward the outbox limit: beyond it the
/// oldest are loaded and the rest stay on disk, untouched.
#[tokio::test]
async fn messages_on_disk_count_toward_the_outbox_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (client, _messages) = Client::start(&offline(dir.path()), vec![]).unwrap();
    drop(publish(&client, &["0", "1", "2", "3", "4"]).await);
    client.shutdown().await;

    let options = offline(dir.path()).with_outbox_limit(3);
    let (client, _messages) = Client::start(&options, vec![]).unwrap();
    assert_eq!(client.unacknowledged().await, 3);
    let full = client.publish("out", "5").await.unwrap_err();
    assert!(
        matches!(full, crate::ClientError::OutboxFull { limit: 3, .. }),
        "{full}"
    );
    client.shutdown().await;
    assert_eq!(
        stored(dir.path()).len(),
        5,
        "nothing deleted, nothing added"
    );
}

/// A directory that stops taking files (here: removed under the client)
/// makes `publish` fail with the setting and the directory named; the
/// message is not queued, and takes no room in the outbox.
#[tokio::test]
async fn a_message_the_disk_refuses_is_an_error_not_a_silent_loss() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox");
    let (client, _messages) = Client::start(&offline(&outbox), vec![]).unwrap();
    std::fs::remove_dir_all(&outbox).unwrap();
    let refused = client.publish("out", "lost?").await.unwrap_err();
    assert!(
        crate::one_line(&refused).starts_with(&format!(
            "cannot store the message in the outbox directory {} (MQTT_OUTBOX_DIR), so it was not queued",
            outbox.display()
        )),
        "{refused}"
    );
    assert_eq!(client.unacknowledged().await, 0);
    client.shutdown().await;
}
