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
//!
//! With `P_MQTT_OUTBOX_DIR` the QoS 1/2 messages are also kept on disk
//! ([`dir`], which states the fsync policy), written by one thread
//! ([`writer`]): a message enters the outbox only once its file is durable,
//! and its file is removed when the broker acknowledges it. The ids of the
//! outbox are then the files' sequence numbers, so that the messages found
//! at start and the new ones keep one order.

pub(crate) mod dir;
pub(crate) mod record;
pub(crate) mod writer;

use std::collections::BTreeMap;

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::QoS;
use dir::Loaded;
use writer::{Handle, Job, Write, Written};

/// One message waiting to be acknowledged (or, at QoS 0, sent).
#[derive(Debug)]
pub(crate) struct Entry {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// In the outbox directory: removed from there once delivered.
    stored: bool,
    done: oneshot::Sender<()>,
}

#[derive(Debug)]
pub(crate) struct Outbox {
    limit: usize,
    next_id: u64,
    /// Every message not yet acknowledged, in publishing order.
    entries: BTreeMap<u64, Entry>,
    /// Messages handed to the writer and not back yet: they count toward
    /// the limit.
    writing: usize,
    /// The outbox directory's writer, when there is one.
    disk: Option<Handle>,
}

/// Why a message was not taken.
#[derive(Debug)]
pub(crate) enum Refused {
    /// The outbox is full: the caller must wait or drop the message.
    Full,
    /// The outbox directory's writer is gone: the client has shut down.
    Closed,
}

impl Outbox {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            next_id: 0,
            entries: BTreeMap::new(),
            writing: 0,
            disk: None,
        }
    }

    /// An outbox kept in a directory by `disk`, holding what was found there.
    pub fn on_disk(limit: usize, disk: Handle, loaded: Loaded) -> Self {
        let entries = loaded
            .records
            .into_iter()
            .map(|record| {
                // Nobody waits for these: the process that did is gone.
                let (done, _) = oneshot::channel();
                let entry = Entry {
                    topic: record.topic,
                    payload: record.payload,
                    qos: record.qos,
                    stored: true,
                    done,
                };
                (record.seq, entry)
            })
            .collect();
        Self {
            limit,
            next_id: loaded.next_seq,
            entries,
            writing: 0,
            disk: Some(disk),
        }
    }

    /// Messages waiting for the broker, those being written included.
    pub fn len(&self) -> usize {
        self.entries.len() + self.writing
    }

    /// Whether a message at `qos` goes to the outbox directory ([`Outbox::store`])
    /// rather than straight in ([`Outbox::add`]).
    pub fn stores(&self, qos: QoS) -> bool {
        self.disk.is_some() && qos != QoS::AtMostOnce
    }

    /// Records a new message; the receiver resolves when the broker has it.
    pub fn add(
        &mut self,
        topic: String,
        payload: Bytes,
        qos: QoS,
    ) -> Result<(u64, oneshot::Receiver<()>), Refused> {
        if self.len() >= self.limit {
            return Err(Refused::Full);
        }
        let id = self.next_id;
        self.next_id += 1;
        Ok((id, self.insert(id, topic, payload, qos, false)))
    }

    fn insert(
        &mut self,
        id: u64,
        topic: String,
        payload: Bytes,
        qos: QoS,
        stored: bool,
    ) -> oneshot::Receiver<()> {
        let (done, delivered) = oneshot::channel();
        let entry = Entry {
            topic,
            payload,
            qos,
            stored,
            done,
        };
        self.entries.insert(id, entry);
        delivered
    }

    /// Hands a new message to the outbox directory's writer, which puts it
    /// in the outbox ([`Outbox::written`]) once it is durable. Resolves then,
    /// with the receiver [`Outbox::add`] would have returned, or with why
    /// it could not be stored.
    pub fn store(
        &mut self,
        topic: String,
        payload: Bytes,
        qos: QoS,
    ) -> Result<oneshot::Receiver<Written>, Refused> {
        let Some(disk) = &self.disk else {
            return Err(Refused::Closed);
        };
        if self.len() >= self.limit {
            return Err(Refused::Full);
        }
        let (reply, written) = oneshot::channel();
        let job = Job::Write(Write {
            id: self.next_id,
            topic,
            payload,
            qos,
            reply,
        });
        if !disk.send(job) {
            return Err(Refused::Closed);
        }
        self.next_id += 1;
        self.writing += 1;
        Ok(written)
    }

    /// The writer has made message `id` durable: it is in the outbox now.
    pub fn written(
        &mut self,
        id: u64,
        topic: String,
        payload: Bytes,
        qos: QoS,
    ) -> oneshot::Receiver<()> {
        self.writing = self.writing.saturating_sub(1);
        self.insert(id, topic, payload, qos, true)
    }

    /// The writer could not store a message: it is not in the outbox.
    pub fn not_written(&mut self) {
        self.writing = self.writing.saturating_sub(1);
    }

    pub fn get(&self, id: u64) -> Option<&Entry> {
        self.entries.get(&id)
    }

    /// The broker has message `id`: resolve its delivery, once, and forget
    /// its file.
    pub fn delivered(&mut self, id: u64) {
        if let Some(entry) = self.entries.remove(&id) {
            if entry.stored {
                if let Some(disk) = &self.disk {
                    // A writer already gone has left the file for the next
                    // start: sent again then, a duplicate, never a loss.
                    disk.send(Job::Remove(id));
                }
            }
            // The caller may have dropped its Delivery: fine.
            let _ = entry.done.send(());
        }
    }

    /// Every message still unacknowledged, in publishing order.
    pub fn pending(&self) -> Vec<u64> {
        self.entries.keys().copied().collect()
    }

    /// Stops the outbox directory's writer once it has done what it was
    /// given, releasing the directory's lock; resolves then. `None` without
    /// a directory, or when it was closed already.
    pub fn close(&self) -> Option<oneshot::Receiver<()>> {
        let disk = self.disk.as_ref()?;
        let (done, closed) = oneshot::channel();
        disk.send(Job::Close(done)).then_some(closed)
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
        assert!(matches!(
            outbox.add("b".into(), Bytes::new(), QoS::AtLeastOnce),
            Err(Refused::Full)
        ));
    }
}
