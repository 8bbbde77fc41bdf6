//! The adapter against a scripted broker, one rumqttc event at a time: the
//! test plays the driver, so it decides exactly when requests enter the
//! queue and when the event loop runs. That makes rumqttc's packet-id
//! behaviour (points 1, 2 and 5 of the module documentation) reproducible.

use rumqttc::{Packet, PubComp, PubRec, PubRel};

use super::*;
use crate::connection::peer::{guard, text, Conn, Peer};
use crate::Secret;

/// A session driven by the test, with what it resolved as delivered.
struct Rig {
    session: Session,
    requests: Requests,
    qos: QoS,
    delivered: Vec<u64>,
}

async fn rig(peer: &Peer, qos: QoS) -> (Rig, Conn) {
    let config = Options::new(&peer.url(), "tester", Secret::new("key"))
        .unwrap()
        .with_qos(qos);
    let (session, requests) = open(&config, None, 1_000);
    let mut rig = Rig {
        session,
        requests,
        qos,
        delivered: Vec::new(),
    };
    let conn = rig.connect(peer).await;
    (rig, conn)
}

impl Rig {
    async fn connect(&mut self, peer: &Peer) -> Conn {
        let (session_present, conn) = tokio::join!(
            self.session.connect(Duration::from_secs(30)),
            peer.accept_session()
        );
        assert!(!session_present.expect("connected"));
        conn
    }

    /// Queues publishes of messages `ids`; each payload is its id.
    fn publish(&mut self, ids: impl IntoIterator<Item = u64>) {
        for id in ids {
            let payload = Bytes::from(id.to_string());
            self.requests
                .publish(id, "t", &payload, self.qos)
                .expect("room in the queue");
        }
    }

    /// One event of the connection; what it resolves is recorded.
    async fn poll(&mut self) -> Option<PacketKind> {
        match guard("an event", self.session.next()).await {
            Ok(Event::Packet(packet)) => {
                let kind = packet.0.clone();
                if let Some(Resolved::Delivered(id)) = self.requests.resolve(packet) {
                    self.delivered.push(id);
                }
                Some(kind)
            }
            Ok(_) => None,
            Err(error) => panic!("the connection failed: {error}"),
        }
    }

    /// Polls until `n` packet events have come, and returns them.
    async fn packets(&mut self, n: usize) -> Vec<PacketKind> {
        let mut packets = Vec::with_capacity(n);
        while packets.len() < n {
            if let Some(kind) = self.poll().await {
                packets.push(kind);
            }
        }
        packets
    }

    /// Polls until `n` publishes have gone out, and returns their packet ids.
    async fn sent(&mut self, n: usize) -> Vec<u16> {
        self.packets(n)
            .await
            .into_iter()
            .map(|kind| match kind {
                PacketKind::Sent(pkid) => pkid,
                other => panic!("expected a publish to go out, got {other:?}"),
            })
            .collect()
    }

    /// Polls until the connection fails, then forgets it as the driver does.
    async fn lose(&mut self) {
        while guard("the failure", self.session.next()).await.is_ok() {}
        for event in self.session.take_buffered() {
            if let Event::Packet(packet) = event {
                if let Some(Resolved::Delivered(id)) = self.requests.resolve(packet) {
                    self.delivered.push(id);
                }
            }
        }
        self.session.forget(&mut self.requests);
    }
}

/// rumqttc frees a QoS 2 packet id at PUBREC, not PUBCOMP, and ids come
/// from a cycle of 100 shared with SUBSCRIBE. With 90 in flight and one
/// SUBSCRIBE among them, a batch of ten gives its last publish the id of the
/// first message, whose PUBCOMP is still due, although the broker
/// acknowledges everything in order. That PUBCOMP is the first message's:
/// matched to the newer one, it would report a message the broker never
/// acknowledged as delivered, and the client would not send it again after a
/// reconnect.
#[tokio::test]
async fn a_qos2_packet_id_reused_before_pubcomp_is_acknowledged_in_order() {
    let peer = Peer::plain().await;
    let (mut rig, mut conn) = rig(&peer, QoS::ExactlyOnce).await;

    // Message 1 reaches the broker (PUBREC), we release it (PUBREL), and its
    // PUBCOMP is still due.
    rig.publish([1]);
    assert_eq!(rig.sent(1).await, [1]);
    assert_eq!(conn.publish().await.pkid, 1);
    conn.send(&[Packet::PubRec(PubRec::new(1))]).await;
    rig.poll().await;
    assert_eq!(conn.read().await, Some(Packet::PubRel(PubRel::new(1))));

    // 79 more, one SUBSCRIBE, ten more: 90 in flight, counting message 1.
    rig.publish(2..=80);
    assert_eq!(rig.sent(79).await, (2..=80).collect::<Vec<u16>>());
    conn.publishes(79).await;
    rig.requests
        .subscribe(vec!["x".into()], QoS::ExactlyOnce)
        .unwrap();
    assert_eq!(rig.packets(1).await, [PacketKind::SubscribeSent(81)]);
    assert!(matches!(conn.read().await, Some(Packet::Subscribe(_))));
    rig.publish(81..=90);
    assert_eq!(rig.sent(10).await, (82..=91).collect::<Vec<u16>>());
    conn.publishes(10).await;

    // One batch of ten: the last gets id 1 again.
    rig.publish(91..=100);
    let ids = rig.sent(10).await;
    assert_eq!(ids[..9], (92..=100).collect::<Vec<u16>>());
    assert_eq!(ids[9], 1, "rumqttc no longer reuses a QoS 2 id early");
    let last = conn.publishes(10).await.pop().unwrap();
    assert_eq!((last.pkid, text(&last).as_str()), (1, "100"));

    // Message 1's PUBCOMP completes message 1, not message 100.
    conn.send(&[Packet::PubComp(PubComp::new(1))]).await;
    assert_eq!(rig.packets(1).await, [PacketKind::Acknowledged(1)]);
    assert_eq!(rig.delivered, [1]);

    // Message 100 is delivered by its own exchange.
    conn.send(&[Packet::PubRec(PubRec::new(1))]).await;
    rig.poll().await;
    assert_eq!(conn.read().await, Some(Packet::PubRel(PubRel::new(1))));
    conn.send(&[Packet::PubComp(PubComp::new(1))]).await;
    while rig.delivered.len() < 2 {
        rig.poll().await;
    }
    assert_eq!(rig.delivered, [1, 100]);
}

/// Sends messages `ids` (as many as go out in one go), has the broker
/// acknowledge all but the ones in `keep`, and returns the packet ids used.
async fn send_and_acknowledge(
    rig: &mut Rig,
    conn: &mut Conn,
    ids: std::ops::RangeInclusive<u64>,
    keep: &[u64],
) -> Vec<u16> {
    let n = ids.clone().count();
    rig.publish(ids.clone());
    let pkids = rig.sent(n).await;
    let publishes = conn.publishes(n).await;
    let acked: Vec<u16> = publishes
        .iter()
        .filter(|p| !keep.contains(&text(p).parse().unwrap()))
        .map(|p| p.pkid)
        .collect();
    let before = rig.delivered.len();
    conn.puback(acked.iter().copied()).await;
    while rig.delivered.len() < before + acked.len() {
        rig.poll().await;
    }
    pkids
}

/// At QoS 1, rumqttc holds a publish back when its packet id is still in
/// use, and sends it with that id once the old message is acknowledged.
/// The acknowledgement is the old message's; the next one with that id is
/// the held one's. When the connection drops while a publish is held back,
/// the held publish must not block the next connection.
#[tokio::test]
async fn a_publish_held_back_for_a_busy_id_keeps_its_identity_across_a_reconnect() {
    let peer = Peer::plain().await;
    let (mut rig, mut conn) = rig(&peer, QoS::AtLeastOnce).await;

    // 100 in flight (ids 1 to 100); all but message 1 acknowledged.
    let pkids = send_and_acknowledge(&mut rig, &mut conn, 1..=100, &[1]).await;
    assert_eq!(pkids, (1..=100).collect::<Vec<u16>>());
    // Message 101 would take id 1 again: held back.
    rig.publish([101]);
    assert_eq!(rig.packets(1).await, [PacketKind::HeldBack(1)]);
    rig.publish([102]);

    // Message 1's PUBACK completes message 1, and lets 101 go out with id 1.
    conn.puback([1]).await;
    let packets = rig.packets(3).await;
    assert_eq!(
        packets,
        [
            PacketKind::Acknowledged(1),
            PacketKind::Sent(1),
            PacketKind::Sent(2)
        ]
    );
    assert_eq!(rig.delivered.last(), Some(&1));
    let out = conn.publishes(2).await;
    assert_eq!(
        out.iter().map(|p| (p.pkid, text(p))).collect::<Vec<_>>(),
        [(1, "101".to_owned()), (2, "102".to_owned())]
    );

    // Now hold 201 back behind 101 (still unacknowledged, id 1), and drop
    // the connection.
    conn.puback([2]).await;
    rig.packets(1).await;
    // Ids 3 to 100 (in two goes: the window refills only below 91 in flight).
    send_and_acknowledge(&mut rig, &mut conn, 103..=192, &[]).await;
    send_and_acknowledge(&mut rig, &mut conn, 193..=200, &[]).await;
    rig.publish([201]);
    assert_eq!(rig.packets(1).await, [PacketKind::HeldBack(1)]);
    drop(conn);
    rig.lose().await;
    assert!(rig.session.eventloop.state.collision.is_none());
    assert!(!rig.delivered.contains(&101) && !rig.delivered.contains(&201));

    // The next connection sends both again (as the driver does from the
    // outbox): nothing of the old connection blocks or names them.
    let mut conn = rig.connect(&peer).await;
    rig.publish([101, 201]);
    let pkids = rig.sent(2).await;
    let out = conn.publishes(2).await;
    assert_eq!(
        texts_and_ids(&out),
        [("101".into(), pkids[0]), ("201".into(), pkids[1])]
    );
    conn.puback(pkids.iter().copied()).await;
    rig.packets(2).await;
    assert_eq!(rig.delivered[rig.delivered.len() - 2..], [101, 201]);
}

fn texts_and_ids(publishes: &[rumqttc::Publish]) -> Vec<(String, u16)> {
    publishes.iter().map(|p| (text(p), p.pkid)).collect()
}
