//! Messages the broker has not acknowledged yet, so that none is lost when a
//! connection drops.
//!
//! rumqttc forgets its unacknowledged publishes whenever the broker kept no
//! session (always, with a clean session), so we keep our own record and send
//! them again after every such CONNACK. rumqttc picks packet ids as it sends, in
//! request order, and reports each with `Outgoing::Publish(pkid)`; we match
//! that order to find which message an acknowledgement is for.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use rumqttc::QoS;
use tokio::sync::oneshot;

/// One message waiting to be acknowledged (or, at QoS 0, sent).
#[derive(Debug)]
pub(crate) struct Entry {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    done: Option<oneshot::Sender<()>>,
}

#[derive(Debug)]
pub(crate) struct Outbox {
    limit: usize,
    next_id: u64,
    /// Every message not yet acknowledged, in publishing order.
    entries: BTreeMap<u64, Entry>,
    /// Ids handed to rumqttc's request queue, not yet given a packet id.
    queued: VecDeque<u64>,
    /// Packet id to message id, for messages on the wire.
    on_wire: HashMap<u16, u64>,
    /// A publish rumqttc held back because its packet id was still in use; it
    /// reports the same packet id again when it finally sends it.
    collided: Option<(u16, u64)>,
}

/// The outbox is full: the caller must wait or drop the message.
#[derive(Debug)]
pub(crate) struct Full;

impl Outbox {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            next_id: 0,
            entries: BTreeMap::new(),
            queued: VecDeque::new(),
            on_wire: HashMap::new(),
            collided: None,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Records a new message; the receiver resolves when the broker has it.
    pub fn add(
        &mut self,
        topic: String,
        payload: Bytes,
        qos: QoS,
    ) -> Result<(u64, oneshot::Receiver<()>), Full> {
        if self.entries.len() >= self.limit {
            return Err(Full);
        }
        let (done, delivered) = oneshot::channel();
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(
            id,
            Entry {
                topic,
                payload,
                qos,
                done: Some(done),
            },
        );
        Ok((id, delivered))
    }

    pub fn get(&self, id: u64) -> Option<&Entry> {
        self.entries.get(&id)
    }

    /// Notes that `id` was put on rumqttc's request queue.
    pub fn queued(&mut self, id: u64) {
        self.queued.push_back(id);
    }

    /// rumqttc sent the next queued publish with `pkid` (0 for QoS 0).
    pub fn sent(&mut self, pkid: u16) {
        let id = match self.collided {
            Some((held, id)) if held == pkid && pkid != 0 => {
                self.collided = None;
                id
            }
            _ => match self.queued.pop_front() {
                Some(id) => id,
                None => return,
            },
        };
        if pkid == 0 {
            // QoS 0: sent is all it will ever be.
            self.complete(id);
        } else {
            self.on_wire.insert(pkid, id);
        }
    }

    /// rumqttc held back the next queued publish until `pkid` is acknowledged.
    pub fn held_back(&mut self, pkid: u16) {
        if let Some(id) = self.queued.pop_front() {
            self.collided = Some((pkid, id));
        }
    }

    /// The broker acknowledged `pkid` (PUBACK at QoS 1, PUBCOMP at QoS 2).
    pub fn acknowledged(&mut self, pkid: u16) {
        if let Some(id) = self.on_wire.remove(&pkid) {
            self.complete(id);
        }
    }

    /// The connection is gone, and with it every packet id and queued request;
    /// [`Outbox::pending`] lists what to send again.
    pub fn connection_lost(&mut self) {
        self.queued.clear();
        self.on_wire.clear();
        self.collided = None;
    }

    /// Every message still unacknowledged, in publishing order.
    pub fn pending(&self) -> Vec<u64> {
        self.entries.keys().copied().collect()
    }

    fn complete(&mut self, id: u64) {
        if let Some(mut entry) = self.entries.remove(&id) {
            if let Some(done) = entry.done.take() {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox_with(n: usize, qos: QoS) -> (Outbox, Vec<oneshot::Receiver<()>>) {
        let mut outbox = Outbox::new(10);
        let receivers = (0..n)
            .map(|i| {
                let (id, rx) = outbox.add(format!("t/{i}"), Bytes::new(), qos).unwrap();
                outbox.queued(id);
                rx
            })
            .collect();
        (outbox, receivers)
    }

    #[test]
    fn acknowledgements_complete_the_right_message() {
        let (mut outbox, mut rx) = outbox_with(3, QoS::AtLeastOnce);
        outbox.sent(1);
        outbox.sent(2);
        outbox.sent(3);
        outbox.acknowledged(2);
        assert!(rx[1].try_recv().is_ok());
        assert!(rx[0].try_recv().is_err() && rx[2].try_recv().is_err());
        assert_eq!(outbox.pending(), [0, 2]);
    }

    #[test]
    fn a_lost_connection_keeps_every_unacknowledged_message() {
        let (mut outbox, _rx) = outbox_with(3, QoS::ExactlyOnce);
        outbox.sent(1);
        outbox.acknowledged(1);
        outbox.sent(2);
        outbox.connection_lost();
        assert_eq!(outbox.pending(), [1, 2]);
        // Packet ids start over on the new connection.
        outbox.acknowledged(2);
        assert_eq!(outbox.len(), 2);
    }

    #[test]
    fn qos0_is_done_once_sent() {
        let (mut outbox, mut rx) = outbox_with(2, QoS::AtMostOnce);
        outbox.sent(0);
        assert!(rx[0].try_recv().is_ok());
        assert_eq!(outbox.len(), 1);
    }

    #[test]
    fn a_held_back_publish_keeps_its_identity() {
        let (mut outbox, mut rx) = outbox_with(2, QoS::AtLeastOnce);
        outbox.sent(1);
        outbox.held_back(1);
        outbox.acknowledged(1);
        assert!(rx[0].try_recv().is_ok());
        outbox.sent(1);
        outbox.acknowledged(1);
        assert!(rx[1].try_recv().is_ok());
    }

    #[test]
    fn the_limit_is_enforced() {
        let mut outbox = Outbox::new(1);
        outbox
            .add("a".into(), Bytes::new(), QoS::AtLeastOnce)
            .unwrap();
        assert!(outbox
            .add("b".into(), Bytes::new(), QoS::AtLeastOnce)
            .is_err());
    }
}
