//! The thread that owns the outbox directory: it writes new messages
//! (in batches, one directory `fsync` each: see [`super::dir`]), puts each in the
//! outbox once it is durable, and removes the acknowledged ones. A thread of
//! its own, so that the async runtime never waits on the disk; one thread,
//! so that jobs run in the order given: a message's removal is queued only
//! after its write completed, since the message is sent only then.

use std::io;
use std::sync::mpsc;
use std::sync::{Mutex, Weak};

use bytes::Bytes;
use tokio::sync::oneshot;
use tracing::warn;

use super::dir::{Directory, Partial, BATCH};

/// The most removals taken with one batch: they are quick, but unbounded
/// they would hold up the writes queued behind them.
const REMOVALS: usize = 1024;
use super::record;
use crate::connection::{lock, Shared};
use crate::{ClientError, QoS};

/// What `publish` hears back: the receiver of the delivery, or why the
/// message was not stored (it is then not in the outbox).
pub(crate) type Written = Result<oneshot::Receiver<()>, ClientError>;

/// What the writer is asked to do.
#[derive(Debug)]
pub(crate) enum Job {
    /// Store a new message, put it in the outbox, and reply.
    Write(Write),
    /// The broker acknowledged message `id`.
    Remove(u64),
    /// Finish what was queued before, release the directory, and say so.
    Close(oneshot::Sender<()>),
}

/// A new message for the outbox directory.
#[derive(Debug)]
pub(crate) struct Write {
    /// Its outbox id, and sequence number on disk.
    pub id: u64,
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Written>,
}

/// Where jobs go; kept by the outbox.
#[derive(Debug, Clone)]
pub(crate) struct Handle(mpsc::Sender<Job>);

impl Handle {
    /// Queues `job`, without waiting; `false` once the writer has stopped.
    pub fn send(&self, job: Job) -> bool {
        self.0.send(job).is_ok()
    }
}

/// A handle, and the queue [`spawn`] takes: the outbox needs the handle
/// before the shared state the writer needs exists.
pub(crate) fn channel() -> (Handle, mpsc::Receiver<Job>) {
    let (jobs, queue) = mpsc::channel();
    (Handle(jobs), queue)
}

/// Starts the writer. It holds the shared state weakly: it stops when the
/// client is gone (every handle dropped) or closed ([`Job::Close`]).
///
/// The queue needs no bound of its own: writes are bounded by the outbox
/// limit (they count toward it from the moment they are queued), removals
/// by the messages in the outbox.
pub(crate) fn spawn(
    directory: Directory,
    queue: mpsc::Receiver<Job>,
    shared: Weak<Mutex<Shared>>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("mqtt-outbox".to_owned())
        .spawn(move || run(directory, queue, shared))
        .map(drop)
}

fn run(directory: Directory, queue: mpsc::Receiver<Job>, shared: Weak<Mutex<Shared>>) {
    let mut removal_failed = false;
    while let Ok(first) = queue.recv() {
        // Everything queued meanwhile, for one directory fsync.
        let mut writes = Vec::new();
        let mut removals = Vec::new();
        let mut close = None;
        let mut next = Some(first);
        while let Some(job) = next {
            match job {
                Job::Write(write) => writes.push(write),
                Job::Remove(id) => removals.push(id),
                Job::Close(done) => {
                    close = Some(done);
                    break;
                }
            }
            next = match writes.len() < BATCH && removals.len() < REMOVALS {
                true => queue.try_recv().ok(),
                false => None,
            };
        }
        store(&directory, writes, &shared);
        // After the writes: a `publish` waits for those, nobody for these.
        for id in removals {
            if let Err(e) = directory.remove(id) {
                // Once: a broken disk would say it for every message.
                if !removal_failed {
                    warn!(
                        dir = %directory.path().display(),
                        error = %e,
                        "cannot remove an acknowledged message from the outbox directory: \
                         it will be sent again after a restart"
                    );
                    removal_failed = true;
                }
            }
        }
        if let Some(done) = close {
            // What raced with the shutdown is refused (its `publish` hears
            // that the client is closed), and the lock released (with
            // `directory`) before the shutdown returns.
            let refused = queue
                .try_iter()
                .filter(|job| matches!(job, Job::Write(_)))
                .count();
            drop(queue);
            if let Some(shared) = shared.upgrade() {
                let mut shared = lock(&shared);
                for _ in 0..refused {
                    shared.outbox.not_written();
                }
            }
            drop(directory);
            let _ = done.send(());
            return;
        }
    }
}

/// Writes `writes`, syncs the directory once, then puts the stored messages
/// in the outbox (sending them if connected) and replies to every one.
fn store(directory: &Directory, writes: Vec<Write>, shared: &Weak<Mutex<Shared>>) {
    if writes.is_empty() {
        return;
    }
    // Every file written, then each synced, then each named: the syncs
    // that follow the writes of the whole batch cost less.
    let written: Vec<(Write, io::Result<Partial>)> = writes
        .into_iter()
        .map(|write| {
            let bytes = record::encode(write.id, &write.topic, &write.payload, write.qos);
            let partial = directory.create(write.id, &bytes);
            (write, partial)
        })
        .collect();
    let synced: Vec<(Write, io::Result<Partial>)> = written
        .into_iter()
        .map(|(write, partial)| (write, partial.and_then(Partial::sync)))
        .collect();
    let mut outcomes: Vec<(Write, io::Result<()>)> = synced
        .into_iter()
        .map(|(write, partial)| {
            let named = partial.and_then(|partial| partial.name(directory));
            (write, named)
        })
        .collect();
    if outcomes.iter().any(|(_, named)| named.is_ok()) {
        if let Err(e) = directory.sync() {
            // Not durable: not stored, whatever the files say.
            for (write, named) in &mut outcomes {
                if named.is_ok() {
                    let _ = directory.remove(write.id);
                    *named = Err(io::Error::new(e.kind(), e.to_string()));
                }
            }
        }
    }
    let Some(shared) = shared.upgrade() else {
        // The client is gone; the files stay for the next start.
        return;
    };
    let mut shared = lock(&shared);
    for (write, written) in outcomes {
        let reply = match written {
            Ok(()) => {
                let id = write.id;
                let delivered = shared
                    .outbox
                    .written(id, write.topic, write.payload, write.qos);
                match shared.connected() {
                    true => shared.send(id).map(|()| delivered),
                    false => Ok(delivered),
                }
            }
            Err(source) => {
                shared.outbox.not_written();
                Err(ClientError::OutboxWrite {
                    var: directory.var().to_owned(),
                    path: directory.path().to_owned(),
                    source,
                })
            }
        };
        // A caller that stopped waiting still has its message sent.
        let _ = write.reply.send(reply);
    }
}
