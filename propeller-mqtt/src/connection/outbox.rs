//! Messages the broker has not acknowledged yet, so that none is lost when a
//! connection drops.
//!
//! rumqttc forgets its unacknowledged publishes whenever the broker kept no
//! session (always, with a clean session), so we keep our own record and send
//! them again after every such CONNACK. After a CONNACK with a session
//! (`P_MQTT_PERSISTENT_SESSION`) rumqttc sends again what was on the wire,
//! with the packet ids the broker knows, and we send only the rest
//! (`session::Session::suspend`). Which message an acknowledgement is
//! for is the adapter's business (`session::Requests`): the outbox only
//! hears "message `id` is delivered".

use std::collections::BTreeMap;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::QoS;

/// One message waiting to be acknowledged (or, at QoS 0, sent).
#[derive(Debug)]
pub(crate) struct Entry {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    done: oneshot::Sender<()>,
}

#[derive(Debug)]
pub(crate) struct Outbox {
    limit: usize,
    next_id: u64,
    /// Every message not yet acknowledged, in publishing order.
    entries: BTreeMap<u64, Entry>,
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
                done,
            },
        );
        Ok((id, delivered))
    }

    pub fn get(&self, id: u64) -> Option<&Entry> {
        self.entries.get(&id)
    }

    /// The broker has message `id`: resolve its delivery, once.
    pub fn delivered(&mut self, id: u64) {
        if let Some(entry) = self.entries.remove(&id) {
            // The caller may have dropped its Delivery: fine.
            let _ = entry.done.send(());
        }
    }

    /// Every message still unacknowledged, in publishing order.
    pub fn pending(&self) -> Vec<u64> {
        self.entries.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deliveries_resolve_their_own_message_once() {
        let mut outbox = Outbox::new(10);
        let mut receivers: Vec<_> = (0..3)
            .map(|i| {
                outbox
                    .add(format!("t/{i}"), Bytes::new(), QoS::AtLeastOnce)
                    .unwrap()
                    .1
            })
            .collect();
        outbox.delivered(1);
        outbox.delivered(1);
        assert!(receivers[1].try_recv().is_ok());
        assert!(receivers[0].try_recv().is_err() && receivers[2].try_recv().is_err());
        assert_eq!(outbox.pending(), [0, 2]);
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
