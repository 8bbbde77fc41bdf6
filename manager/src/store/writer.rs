//! The writer: one task that owns the repository, writes what changed, and
//! keeps the store's status for `/health`, `/metrics` and the API.
//!
//! It waits to be woken by a change, takes every change at once from the
//! state, and writes them in one transaction. A write that fails is not
//! lost: its records count as changed again, the store is reopened with
//! backoff, and they go out with the next write. Meanwhile the API answers
//! 503 for what needs the store. When it has had nothing to write for a
//! few seconds, it checks the store, so that `/health` shows a database
//! gone away before a write needs it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use super::{Opened, Repository, StoreError};
use crate::domain::Manager;

/// How long an API request waits for its change to be committed.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one write may take (the first after an outage holds every
/// change made during it).
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one attempt to open the store may take, reading it included.
const OPEN_TIMEOUT: Duration = Duration::from_secs(60);
/// Retries after a failure: from the first delay, doubling, to the last.
const FIRST_RETRY: Duration = Duration::from_millis(500);
const LAST_RETRY: Duration = Duration::from_secs(10);
/// A standby manager tries to become the active one this often.
const STANDBY_RETRY: Duration = Duration::from_secs(1);
/// An idle writer checks that the store is still there this often.
const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Where the store stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreState {
    /// Open, and this manager's: changes are written.
    Ready,
    /// Not opened yet.
    Connecting,
    /// Opening or writing failed; retried with backoff.
    Retrying {
        /// The last failure.
        failure: String,
        /// Failures in a row.
        attempts: u32,
    },
    /// Another manager is the active one; this one takes over when it
    /// goes.
    Standby {
        /// The active manager, as it named itself.
        holder: String,
    },
}

impl StoreState {
    /// As `/health` names it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Connecting => "connecting",
            Self::Retrying { .. } => "retrying",
            Self::Standby { .. } => "standby",
        }
    }
}

/// What the API and the writer share about the store.
pub struct Handle {
    kind: &'static str,
    location: String,
    state: watch::Sender<StoreState>,
    /// The last batch committed (see [`crate::domain::State::next_batch`]).
    durable: watch::Sender<u64>,
    wake: Notify,
    writes: AtomicU64,
    write_nanos: AtomicU64,
}

/// The store's figures for `/health` and `/metrics`.
#[derive(Debug, Clone)]
pub struct Report {
    /// `memory`, `sqlite` or `postgres`.
    pub kind: &'static str,
    /// The file, or `host:port/database`.
    pub location: String,
    /// Where it stands.
    pub state: StoreState,
    /// Transactions committed.
    pub writes: u64,
    /// Time spent in them.
    pub write_seconds: f64,
}

impl Handle {
    /// A handle for a store of `kind` at `location`, in `state`.
    pub fn new(kind: &'static str, location: String, state: StoreState) -> Self {
        Self {
            kind,
            location,
            state: watch::Sender::new(state),
            durable: watch::Sender::new(0),
            wake: Notify::new(),
            writes: AtomicU64::new(0),
            write_nanos: AtomicU64::new(0),
        }
    }

    /// Tells the writer that something changed.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// `Ok` when changes can be made now; otherwise why not, for a 503.
    pub fn writable(&self) -> Result<(), String> {
        match &*self.state.borrow() {
            StoreState::Ready => Ok(()),
            other => Err(self.unavailable(other)),
        }
    }

    /// Why the store cannot be used, in the API's words.
    pub fn unavailable(&self, state: &StoreState) -> String {
        let store = format!("the {} store at {}", self.kind, self.location);
        match state {
            StoreState::Ready => format!("{store} is ready"),
            StoreState::Connecting => format!("{store} is not open yet: try again shortly"),
            StoreState::Retrying { failure, .. } => {
                format!("{store} is unavailable ({failure}); the manager retries: try again later")
            }
            StoreState::Standby { holder } => format!(
                "this manager is on standby: another manager ({holder}) holds {store}; send requests to that one"
            ),
        }
    }

    /// Why reads cannot be served yet.
    pub fn not_loaded(&self) -> String {
        self.unavailable(&self.state.borrow())
    }

    /// Waits until batch `batch` is committed, for at most
    /// [`CONFIRM_TIMEOUT`].
    pub async fn confirmed(&self, batch: u64) -> Result<(), String> {
        let mut durable = self.durable.subscribe();
        let committed = tokio::time::timeout(CONFIRM_TIMEOUT, durable.wait_for(|d| *d >= batch))
            .await
            .is_ok_and(|waited| waited.is_ok());
        match committed {
            true => Ok(()),
            false => Err(format!(
                "{} did not confirm the change within {CONFIRM_TIMEOUT:?}; it is kept, and written when the store is back: check before retrying",
                self.unavailable(&self.state.borrow()).replace(": try again later", "")
            )),
        }
    }

    /// The figures.
    pub fn report(&self) -> Report {
        Report {
            kind: self.kind,
            location: self.location.clone(),
            state: self.state.borrow().clone(),
            writes: self.writes.load(Ordering::Relaxed),
            write_seconds: self.write_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    fn set(&self, state: StoreState) {
        self.state.send_replace(state);
    }
}

/// The delay before retry number `attempts` (from 1).
fn backoff(attempts: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1 << attempts.saturating_sub(1).min(8))
        .min(LAST_RETRY)
}

/// Writes `manager`'s changes to `repository` until `stopping`; then writes
/// what is left, once. `open` says whether the repository was opened and
/// read before (SQLite, memory) or must be opened here (PostgreSQL).
pub async fn run<R: Repository>(
    manager: Arc<Manager>,
    mut repository: R,
    mut open: bool,
    mut stopping: watch::Receiver<bool>,
) {
    let handle = manager.store();
    let mut attempts = 0u32;
    let mut standing_by = false;
    // The last time the store answered: an idle writer checks on it.
    let mut last_contact = Instant::now();
    loop {
        if *stopping.borrow() {
            if open {
                let _ = write(&manager, &mut repository).await;
            }
            return;
        }
        if !open {
            let wait = match opened(&mut repository).await {
                Ok(Opened::Loaded(snapshot)) => {
                    let (tasks, proplets) = (snapshot.tasks.len(), snapshot.proplets.len());
                    manager.load(snapshot);
                    info!(store = handle.kind, location = %handle.location, tasks, proplets, "store loaded");
                    None
                }
                Ok(Opened::Continue) => {
                    info!(store = handle.kind, location = %handle.location, "store available again");
                    None
                }
                Err(StoreError::Taken(holder)) => {
                    if !standing_by {
                        info!(store = handle.kind, location = %handle.location, %holder, "another manager holds the store: standing by");
                        standing_by = true;
                    }
                    manager.unload();
                    handle.set(StoreState::Standby { holder });
                    Some(STANDBY_RETRY)
                }
                Err(StoreError::Unavailable(failure)) => {
                    attempts += 1;
                    let retry_in = backoff(attempts);
                    warn!(store = handle.kind, location = %handle.location, cause = %failure, ?retry_in, attempts, "store unavailable");
                    handle.set(StoreState::Retrying { failure, attempts });
                    Some(retry_in)
                }
            };
            match wait {
                Some(wait) => {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stopping.changed() => {}
                    }
                    continue;
                }
                None => {
                    (open, attempts, standing_by) = (true, 0, false);
                    last_contact = Instant::now();
                    handle.set(StoreState::Ready);
                    handle.wake();
                }
            }
        }
        tokio::select! {
            _ = handle.wake.notified() => {}
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stopping.changed() => continue,
        }
        let outcome = match write(&manager, &mut repository).await {
            Ok(true) => {
                last_contact = Instant::now();
                Ok(())
            }
            Ok(false) if last_contact.elapsed() >= CHECK_EVERY => {
                last_contact = Instant::now();
                repository.check().await
            }
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(failure) = outcome {
            attempts += 1;
            let retry_in = backoff(attempts);
            warn!(store = handle.kind, location = %handle.location, cause = %failure, ?retry_in, attempts, "store unavailable");
            handle.set(StoreState::Retrying {
                failure: failure.to_string(),
                attempts,
            });
            open = false;
            tokio::select! {
                _ = tokio::time::sleep(retry_in) => {}
                _ = stopping.changed() => {}
            }
        }
    }
}

async fn opened<R: Repository>(repository: &mut R) -> Result<Opened, StoreError> {
    tokio::time::timeout(OPEN_TIMEOUT, repository.open())
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "no answer within {OPEN_TIMEOUT:?}"
            )))
        })
}

/// Takes every change from the state and writes it; `Ok(false)` when
/// there was nothing to write. On failure the changes count as changed
/// again.
async fn write<R: Repository>(manager: &Manager, repository: &mut R) -> Result<bool, StoreError> {
    let handle = manager.store();
    let (batch, changes) = manager.take_changes();
    if changes.is_empty() {
        handle.durable.send_replace(batch);
        return Ok(false);
    }
    let changes = Arc::new(changes);
    let started = Instant::now();
    let saved = tokio::time::timeout(WRITE_TIMEOUT, repository.save(changes.clone()))
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "a write got no answer within {WRITE_TIMEOUT:?}"
            )))
        });
    match saved {
        Ok(()) => {
            let took = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            handle.writes.fetch_add(1, Ordering::Relaxed);
            handle.write_nanos.fetch_add(took, Ordering::Relaxed);
            handle.durable.send_replace(batch);
            Ok(true)
        }
        Err(e) => {
            manager.changed_again(&changes);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(5), Duration::from_secs(8));
        assert_eq!(backoff(6), LAST_RETRY);
        assert_eq!(backoff(u32::MAX), LAST_RETRY);
    }
}
