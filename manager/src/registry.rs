//! The proplets the manager knows, and where each stands: discovered (it
//! announced itself), alive (heartbeats arrive), or offline (its last will
//! arrived, or three heartbeats did not).
//!
//! Anyone on the channel can send heartbeats under any id, so the registry
//! is bounded, forgets ids that never announced themselves once they fall
//! silent, and sends tasks only to proplets that announced themselves.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use propeller_protocol::Untrusted;
use propeller_protocol::{rfc3339, PropletMetadata, PropletMetrics};
use serde_json::{json, Value};
use tracing::{debug, info};

/// Heartbeats kept per proplet, as upstream keeps them.
pub const ALIVE_HISTORY: usize = 10;

/// How many heartbeat intervals may pass silently before a proplet is offline.
pub const MISSED_HEARTBEATS: u32 = 3;
/// The most proplets the registry holds; messages about more are ignored.
pub const MAX_PROPLETS: usize = 10_000;
/// The longest proplet id taken from the channel.
pub const MAX_ID: usize = 256;

/// Where a proplet stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Announced, no heartbeat yet.
    Discovered,
    /// Heartbeats arrive.
    Alive,
    /// Gone: its last will, or missed heartbeats.
    Offline,
}

impl Liveness {
    /// As logs, `/health` and `/metrics` name it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Discovered => "discovered",
            Self::Alive => "alive",
            Self::Offline => "offline",
        }
    }
}

/// One proplet.
#[derive(Debug, Clone)]
pub struct Proplet {
    /// Its id (its MQTT client id).
    pub id: String,
    /// Where it stands.
    pub state: Liveness,
    /// As announced.
    pub namespace: String,
    /// What it said about itself.
    pub metadata: PropletMetadata,
    /// Its last heartbeats, oldest first, at most [`ALIVE_HISTORY`].
    pub alive_history: VecDeque<SystemTime>,
    /// Its latest metrics, as received.
    pub metrics: Option<PropletMetrics>,
    /// Tasks dispatched to it and not yet finished.
    pub running_tasks: usize,
    /// It sent `create`: tasks may go to it.
    pub announced: bool,
    seen: Instant,
}

impl Proplet {
    /// Whether its heartbeats arrive.
    pub fn alive(&self) -> bool {
        self.state == Liveness::Alive
    }

    /// Whether tasks may go to it: alive, and announced with `create`.
    pub fn schedulable(&self) -> bool {
        self.alive() && self.announced
    }

    /// What the store keeps of it.
    pub fn stored(&self) -> StoredProplet {
        StoredProplet {
            id: self.id.clone(),
            namespace: self.namespace.clone(),
            metadata: self.metadata.clone(),
            alive_history: self.alive_history.iter().copied().collect(),
            metrics: self.metrics.clone(),
            offline: self.state == Liveness::Offline,
        }
    }

    /// Upstream's `PropletView`: what `GET /proplets` shows.
    pub fn view(&self) -> Value {
        let mut view = json!({
            "id": self.id,
            "name": self.id,
            "task_count": self.running_tasks,
            "alive": self.alive(),
            "metadata": self.metadata,
        });
        if let Some(last) = self.alive_history.back() {
            view["last_alive_at"] = rfc3339(*last).into();
        }
        view
    }
}

/// A proplet as the store keeps it: what it announced, its heartbeats and
/// its latest metrics. Only announced proplets are kept; ids that only ever
/// sent heartbeats are anyone's to invent.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredProplet {
    /// Its id.
    pub id: String,
    /// As announced.
    pub namespace: String,
    /// As announced.
    pub metadata: PropletMetadata,
    /// Its last heartbeats, oldest first, at most [`ALIVE_HISTORY`].
    pub alive_history: Vec<SystemTime>,
    /// Its latest metrics.
    pub metrics: Option<PropletMetrics>,
    /// Its last will arrived, or it missed its heartbeats.
    pub offline: bool,
}

/// Every proplet seen since the manager started, or kept by the store.
#[derive(Debug)]
pub struct Registry {
    proplets: BTreeMap<String, Proplet>,
    /// Silence after which an alive proplet is offline.
    silence: Duration,
    /// Announced proplets changed (or forgotten) since the store took the
    /// changes.
    changed: BTreeSet<String>,
}

impl Registry {
    /// A registry that expects a heartbeat every `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            proplets: BTreeMap::new(),
            silence: interval * MISSED_HEARTBEATS,
            changed: BTreeSet::new(),
        }
    }

    /// Adds proplets read back from the store, unless heard from already.
    /// Their liveness is not known until they are heard from: one the store
    /// left offline stays offline; any other is discovered, and offline
    /// after [`MISSED_HEARTBEATS`] silent intervals from `now` (failing the
    /// tasks still running on it then, as for any proplet gone silent).
    pub fn restore(&mut self, stored: Vec<StoredProplet>, now: Instant) {
        for proplet in stored {
            if self.proplets.contains_key(&proplet.id) || self.proplets.len() >= MAX_PROPLETS {
                continue;
            }
            let state = match proplet.offline {
                true => Liveness::Offline,
                false => Liveness::Discovered,
            };
            let id = proplet.id.clone();
            self.proplets.insert(
                id.clone(),
                Proplet {
                    id,
                    state,
                    namespace: proplet.namespace,
                    metadata: proplet.metadata,
                    alive_history: proplet.alive_history.into_iter().collect(),
                    metrics: proplet.metrics,
                    running_tasks: 0,
                    announced: true,
                    seen: now,
                },
            );
        }
    }

    /// The announced proplets changed since the last call: each id, and the
    /// proplet as the store keeps it (`None` once forgotten).
    pub fn take_changed(&mut self) -> Vec<(String, Option<StoredProplet>)> {
        std::mem::take(&mut self.changed)
            .into_iter()
            .map(|id| {
                let stored = self
                    .proplets
                    .get(&id)
                    .filter(|p| p.announced)
                    .map(Proplet::stored);
                (id, stored)
            })
            .collect()
    }

    /// Counts `id` as changed again, after the store failed to take it.
    pub fn changed_again(&mut self, id: &str) {
        self.changed.insert(id.to_owned());
    }

    /// Counts every announced proplet as changed: after a load, those heard
    /// from before it are not in the store yet.
    pub fn all_changed(&mut self) {
        let announced = self.proplets.values().filter(|p| p.announced);
        self.changed.extend(announced.map(|p| p.id.clone()));
    }

    /// Forgets what changed: another manager has the store now.
    pub fn clear_changed(&mut self) {
        self.changed.clear();
    }

    /// Sets each proplet's count of running tasks from the proplet ids of
    /// the tasks running now.
    pub fn recount<'a>(&mut self, running: impl Iterator<Item = &'a str>) {
        for proplet in self.proplets.values_mut() {
            proplet.running_tasks = 0;
        }
        for id in running {
            if let Some(proplet) = self.proplets.get_mut(id) {
                proplet.running_tasks += 1;
            }
        }
    }

    /// A proplet announced itself (on every connection it makes).
    pub fn created(&mut self, id: &str, namespace: &str, metadata: PropletMetadata, now: Instant) {
        let Some(proplet) = self.entry(id, now) else {
            return;
        };
        if !proplet.announced {
            proplet.announced = true;
            info!(proplet_id = %Untrusted(id), "proplet discovered");
            // Its heartbeats may have come first (they were logged at debug
            // level then): the change to alive is news now.
            if proplet.state == Liveness::Alive {
                info!(proplet_id = %Untrusted(id), "proplet alive");
            }
        }
        proplet.namespace = namespace.to_owned();
        proplet.metadata = metadata;
        proplet.seen = now;
        if proplet.state == Liveness::Offline {
            Self::transition(proplet, Liveness::Discovered, "announced itself again");
        }
        self.changed.insert(id.to_owned());
    }

    /// A heartbeat.
    pub fn alive(&mut self, id: &str, now: Instant) {
        let Some(proplet) = self.entry(id, now) else {
            return;
        };
        proplet.seen = now;
        if proplet.alive_history.len() == ALIVE_HISTORY {
            proplet.alive_history.pop_front();
        }
        proplet.alive_history.push_back(SystemTime::now());
        Self::transition(proplet, Liveness::Alive, "heartbeat");
        if proplet.announced {
            self.changed.insert(id.to_owned());
        }
    }

    /// The last will, or any other `offline` status.
    pub fn offline(&mut self, id: &str, why: &'static str) {
        if let Some(proplet) = self.proplets.get_mut(id) {
            Self::transition(proplet, Liveness::Offline, why);
            if proplet.announced {
                self.changed.insert(id.to_owned());
            }
        }
    }

    /// Marks offline every proplet silent for [`MISSED_HEARTBEATS`]
    /// intervals, and forgets those among them that never announced
    /// themselves.
    pub fn sweep(&mut self, now: Instant) {
        for proplet in self.proplets.values_mut() {
            if proplet.state != Liveness::Offline
                && now.duration_since(proplet.seen) >= self.silence
            {
                Self::transition(proplet, Liveness::Offline, "missed 3 heartbeats");
                if proplet.announced {
                    self.changed.insert(proplet.id.clone());
                }
            }
        }
        self.proplets
            .retain(|_, p| p.announced || p.state != Liveness::Offline || p.running_tasks > 0);
    }

    /// The ids of offline proplets that still count running tasks: those
    /// tasks will never report.
    pub fn lost(&self) -> Vec<String> {
        self.proplets
            .values()
            .filter(|p| p.state == Liveness::Offline && p.running_tasks > 0)
            .map(|p| p.id.clone())
            .collect()
    }

    /// A proplet's latest metrics; they count as a sign of life only for
    /// proplets already known, as metrics carry no announcement.
    pub fn metrics(&mut self, metrics: PropletMetrics) -> bool {
        match self.proplets.get_mut(&metrics.proplet_id) {
            Some(proplet) => {
                if proplet.announced {
                    self.changed.insert(proplet.id.clone());
                }
                proplet.metrics = Some(metrics);
                true
            }
            None => false,
        }
    }

    /// Forgets a proplet.
    pub fn remove(&mut self, id: &str) -> Option<Proplet> {
        self.changed.insert(id.to_owned());
        self.proplets.remove(id)
    }

    /// One proplet.
    pub fn get(&self, id: &str) -> Option<&Proplet> {
        self.proplets.get(id)
    }

    /// Every proplet, by id.
    pub fn all(&self) -> impl Iterator<Item = &Proplet> {
        self.proplets.values()
    }

    /// One proplet.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Proplet> {
        self.proplets.get_mut(id)
    }

    /// The schedulable proplet with the fewest running tasks: the one a
    /// task without a `proplet_id` goes to.
    pub fn least_busy(&self) -> Option<&Proplet> {
        self.proplets
            .values()
            .filter(|p| p.schedulable())
            .min_by_key(|p| p.running_tasks)
    }

    /// The proplet `id`, added if there is room and the id is sane.
    fn entry(&mut self, id: &str, now: Instant) -> Option<&mut Proplet> {
        if id.len() > MAX_ID {
            debug!(proplet_id = %Untrusted(id), "ignoring a proplet id over {MAX_ID} bytes");
            return None;
        }
        if !self.proplets.contains_key(id) && self.proplets.len() >= MAX_PROPLETS {
            debug!(proplet_id = %Untrusted(id), "ignoring a new proplet: {MAX_PROPLETS} are known");
            return None;
        }
        Some(
            self.proplets
                .entry(id.to_owned())
                .or_insert_with(|| Proplet {
                    id: id.to_owned(),
                    state: Liveness::Discovered,
                    namespace: String::new(),
                    metadata: PropletMetadata::default(),
                    alive_history: VecDeque::new(),
                    metrics: None,
                    running_tasks: 0,
                    announced: false,
                    seen: now,
                }),
        )
    }

    /// Logs each change once; a repeated state is no news.
    fn transition(proplet: &mut Proplet, to: Liveness, why: &str) {
        if proplet.state == to {
            return;
        }
        proplet.state = to;
        match to {
            // A heartbeat alone is not worth a line each: anyone can send
            // them under any id. The announcement is logged in `created`.
            _ if !proplet.announced => {
                debug!(proplet_id = %Untrusted(&proplet.id), state = to.name(), why, "unannounced proplet")
            }
            Liveness::Discovered => {
                info!(proplet_id = %Untrusted(&proplet.id), why, "proplet discovered")
            }
            Liveness::Alive => info!(proplet_id = %Untrusted(&proplet.id), "proplet alive"),
            Liveness::Offline => {
                info!(proplet_id = %Untrusted(&proplet.id), why, "proplet offline")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_follows_announcements_heartbeats_and_silence() {
        let start = Instant::now();
        let mut registry = Registry::new(Duration::from_secs(10));
        registry.created("p1", "", PropletMetadata::default(), start);
        assert_eq!(registry.all().next().unwrap().state, Liveness::Discovered);
        registry.alive("p1", start);
        assert_eq!(registry.least_busy().unwrap().id, "p1");
        registry.sweep(start + Duration::from_secs(29));
        assert_eq!(registry.all().next().unwrap().state, Liveness::Alive);
        registry.sweep(start + Duration::from_secs(30));
        assert_eq!(registry.all().next().unwrap().state, Liveness::Offline);
        assert!(registry.least_busy().is_none());
        // A heartbeat from a proplet never announced: alive, but no task
        // goes to it, and it is forgotten once silent.
        registry.alive("p2", start);
        assert!(registry.get("p2").unwrap().alive());
        assert!(registry.least_busy().is_none());
        registry.offline("p2", "last will");
        assert_eq!(registry.get("p2").unwrap().state, Liveness::Offline);
        registry.created("p2", "ns", PropletMetadata::default(), start);
        assert_eq!(registry.get("p2").unwrap().state, Liveness::Discovered);
        registry.alive("fake", start);
        registry.sweep(start + Duration::from_secs(30));
        assert!(registry.get("fake").is_none());
        assert!(registry.get("p2").is_some(), "announced proplets stay");
    }

    /// A flood of fake heartbeats costs a bounded registry.
    #[test]
    fn fake_ids_are_bounded() {
        let now = Instant::now();
        let mut registry = Registry::new(Duration::from_secs(10));
        for i in 0..MAX_PROPLETS + 100 {
            registry.alive(&format!("fake-{i}"), now);
        }
        assert_eq!(registry.all().count(), MAX_PROPLETS);
        registry.alive(&"x".repeat(MAX_ID + 1), now);
        assert!(registry.get(&"x".repeat(MAX_ID + 1)).is_none());
        registry.sweep(now + Duration::from_secs(30));
        assert_eq!(registry.all().count(), 0);
    }
}
