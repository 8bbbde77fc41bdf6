//! The proplets the manager knows, and where each stands: discovered (it
//! announced itself), alive (heartbeats arrive), or offline (its last will
//! arrived, or three heartbeats did not).
//!
//! Anyone on the channel can send heartbeats under any id, so the registry
//! is bounded, forgets ids that never announced themselves once they fall
//! silent, and sends tasks only to proplets that announced themselves.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use propeller_mqtt::protocol::Untrusted;
use propeller_mqtt::protocol::{rfc3339, PropletMetadata, PropletMetrics};
use serde::Serialize;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
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

/// Every proplet seen since the manager started.
#[derive(Debug)]
pub struct Registry {
    proplets: BTreeMap<String, Proplet>,
    /// Silence after which an alive proplet is offline.
    silence: Duration,
}

impl Registry {
    /// A registry that expects a heartbeat every `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            proplets: BTreeMap::new(),
            silence: interval * MISSED_HEARTBEATS,
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
        }
        proplet.namespace = namespace.to_owned();
        proplet.metadata = metadata;
        proplet.seen = now;
        if proplet.state == Liveness::Offline {
            Self::transition(proplet, Liveness::Discovered, "announced itself again");
        }
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
    }

    /// The last will, or any other `offline` status.
    pub fn offline(&mut self, id: &str, why: &'static str) {
        if let Some(proplet) = self.proplets.get_mut(id) {
            Self::transition(proplet, Liveness::Offline, why);
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
                proplet.metrics = Some(metrics);
                true
            }
            None => false,
        }
    }

    /// Forgets a proplet.
    pub fn remove(&mut self, id: &str) -> Option<Proplet> {
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
