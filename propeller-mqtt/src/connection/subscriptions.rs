//! The topics to keep subscribed, and which SUBSCRIBE packets await a SUBACK,
//! so that a refusal can name its topic.

use std::collections::{HashMap, VecDeque};

use rumqttc::{AsyncClient, QoS, SubscribeFilter};

use crate::ClientError;

#[derive(Debug)]
pub(crate) struct Subscriptions {
    pub all: Vec<String>,
    qos: QoS,
    /// Topic lists of SUBSCRIBE requests queued to rumqttc, in order; rumqttc
    /// tells us their packet ids only as it sends them.
    queued: VecDeque<Vec<String>>,
    /// Topic lists of sent SUBSCRIBE packets, by packet id.
    sent: HashMap<u16, Vec<String>>,
}

impl Subscriptions {
    pub fn new(all: Vec<String>, qos: QoS) -> Self {
        Self {
            all,
            qos,
            queued: VecDeque::new(),
            sent: HashMap::new(),
        }
    }

    /// Queues one SUBSCRIBE for `topics`.
    pub fn subscribe(
        &mut self,
        mqtt: &AsyncClient,
        topics: Vec<String>,
    ) -> Result<(), ClientError> {
        let filters = topics
            .iter()
            .map(|t| SubscribeFilter::new(t.clone(), self.qos));
        mqtt.try_subscribe_many(filters)
            .map_err(|_| ClientError::Closed)?;
        self.queued.push_back(topics);
        Ok(())
    }

    /// Subscribes to every topic again: the broker kept no session.
    pub fn restore(&mut self, mqtt: &AsyncClient) -> Result<(), ClientError> {
        self.queued.clear();
        self.sent.clear();
        match self.all.is_empty() {
            true => Ok(()),
            false => self.subscribe(mqtt, self.all.clone()),
        }
    }

    /// rumqttc sent the next queued SUBSCRIBE with `pkid`.
    pub fn sent(&mut self, pkid: u16) {
        if let Some(topics) = self.queued.pop_front() {
            self.sent.insert(pkid, topics);
        }
    }

    /// The topics of the SUBSCRIBE that `pkid` acknowledges.
    pub fn acknowledged(&mut self, pkid: u16) -> Vec<String> {
        self.sent.remove(&pkid).unwrap_or_default()
    }
}
