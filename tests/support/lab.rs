//! A lab for tests that play one side of Propeller themselves: mosquitto
//! with four identities (our three services and a fourth for the test), our
//! services on it, and a raw MQTT client that records every message.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};
use serde_json::Value;

use crate::http::api_port;
use crate::{client_id, Env, Identity, Mosquitto, Pki, ServiceProcess, CONNECTED};

pub const MANAGER: usize = 0;
pub const PROPLET: usize = 1;
pub const PROXY: usize = 2;
/// The broker account of whatever this test plays: upstream's manager,
/// proplet, or a proplet asking the proxy.
pub const UPSTREAM: usize = 3;

/// mosquitto, the identities it knows, and the proxy's module directory.
pub struct Lab {
    pub ids: Vec<Identity>,
    pub modules: tempfile::TempDir,
    pub broker: Mosquitto,
}

impl Lab {
    pub fn start() -> Lab {
        let pki = Pki::shared();
        let ids: Vec<Identity> = ["manager", "proplet", "proxy", "upstream"]
            .into_iter()
            .map(|name| pki.identity(name))
            .collect();
        let broker = Mosquitto::for_clients(pki, &ids.iter().collect::<Vec<_>>());
        let modules = tempfile::tempdir().unwrap();
        Lab {
            ids,
            modules,
            broker,
        }
    }

    pub fn env(&self, prefix: &str, who: usize) -> Env {
        let mut env = Env::new(prefix, &self.ids[who]);
        env.plain(self.broker.plain);
        env
    }

    /// Our manager, connected, and its API port.
    pub fn manager(&self) -> (ServiceProcess, u16) {
        self.manager_with(&[])
    }

    /// Our manager with more settings (`("LOG_LEVEL", "debug")`), connected.
    pub fn manager_with(&self, settings: &[(&str, &str)]) -> (ServiceProcess, u16) {
        let mut env = self.env("MANAGER", MANAGER);
        env.set("LIVELINESS_INTERVAL", "1s");
        for (suffix, value) in settings {
            env.set(suffix, value);
        }
        let manager = ServiceProcess::start("manager", &env.vars);
        let api = api_port(&manager.wait_for("HTTP API listening", Duration::from_secs(20)));
        manager.wait_for(CONNECTED, Duration::from_secs(20));
        (manager, api)
    }

    /// Our proxy serving the module directory, connected.
    pub fn proxy(&self) -> ServiceProcess {
        let mut env = self.env("PROXY", PROXY);
        env.path("MODULES_DIR", self.modules.path());
        let proxy = ServiceProcess::start("proxy", &env.vars);
        proxy.wait_for(CONNECTED, Duration::from_secs(20));
        proxy
    }

    /// Our proplet, heartbeat and metrics every second.
    pub fn proplet(&self) -> ServiceProcess {
        let mut env = self.env("PROPLET", PROPLET);
        env.set("LIVELINESS_INTERVAL", "1s");
        ServiceProcess::start("proplet", &env.vars)
    }

    /// A raw MQTT client on the test channel, as the upstream side.
    pub fn client(&self, id: &str) -> Mqtt {
        Mqtt::connect(self.broker.plain, &self.ids[UPSTREAM], id)
    }

    pub fn module(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.modules.path().join(name)).unwrap()
    }
}

/// The last lines of each service's output, for failure messages.
pub fn logs(services: &[(&str, &ServiceProcess)]) -> String {
    let mut text = String::new();
    for (name, service) in services {
        let output = service.output();
        let lines: Vec<&str> = output.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        text.push_str(&format!("--- {name} (last {} lines) ---\n", tail.len()));
        for line in tail {
            text.push_str(line);
            text.push('\n');
        }
    }
    text
}

/// One message received.
#[derive(Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
}

impl Message {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "not JSON on {}: {e}: {}",
                self.topic,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }

    pub fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.payload);
        match text.len() > 300 {
            true => format!(
                "{}… ({} bytes)",
                text.chars().take(300).collect::<String>(),
                self.payload.len()
            ),
            false => text.into_owned(),
        }
    }
}

enum Note {
    SubAck,
    Message(Message),
}

/// rumqttc's blocking client with its event loop on a thread; every message
/// received is kept, in order.
pub struct Mqtt {
    pub client: Client,
    notes: mpsc::Receiver<Note>,
    received: Vec<Message>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Mqtt {
    pub fn connect(port: u16, identity: &Identity, id: &str) -> Mqtt {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options
            .set_credentials(client_id(identity.name), identity.secret.clone())
            .set_keep_alive(Duration::from_secs(10))
            // mosquitto's max_inflight_messages: a burst beyond it is dropped.
            .set_inflight(20)
            // Chunks are about 683 KB of JSON; rumqttc's default is 10 KiB.
            .set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut connection) = Client::new(options, 100);
        let (tx, notes) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        // `iter`, not `recv_timeout`: a timeout cancels rumqttc's poll
        // mid-way and can drop a publish it had taken from its queue.
        let thread = std::thread::spawn(move || {
            for event in connection.iter() {
                if thread_stop.load(Ordering::SeqCst) {
                    break;
                }
                let note = match event {
                    Ok(Event::Incoming(Incoming::Publish(publish))) => Note::Message(Message {
                        topic: publish.topic.clone(),
                        payload: publish.payload.to_vec(),
                    }),
                    Ok(Event::Incoming(Incoming::SubAck(_))) => Note::SubAck,
                    Ok(_) => continue,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                if tx.send(note).is_err() {
                    break;
                }
            }
        });
        Mqtt {
            client,
            notes,
            received: Vec::new(),
            stop,
            thread: Some(thread),
        }
    }

    /// Subscribes at QoS 1 and waits for the SUBACK.
    pub fn subscribe(&mut self, topic: &str) {
        self.client.subscribe(topic, QoS::AtLeastOnce).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no SUBACK for {topic} within 10 s");
            match self.notes.recv_timeout(left) {
                Ok(Note::SubAck) => return,
                Ok(Note::Message(message)) => self.received.push(message),
                Err(_) => {}
            }
        }
    }

    /// Publishes at QoS 2, upstream's default `MQTT_QOS`.
    pub fn publish(&self, topic: &str, payload: &str) {
        self.client
            .publish(topic, QoS::ExactlyOnce, false, payload.as_bytes().to_vec())
            .unwrap();
    }

    /// Publishes at `qos`.
    pub fn publish_at(&self, topic: &str, payload: &str, qos: QoS) {
        self.client
            .publish(topic, qos, false, payload.as_bytes().to_vec())
            .unwrap();
    }

    /// Takes in whatever arrived, waiting at most `wait` for the first.
    pub fn pump(&mut self, wait: Duration) {
        if let Ok(Note::Message(message)) = self.notes.recv_timeout(wait) {
            self.received.push(message);
        }
        while let Ok(note) = self.notes.try_recv() {
            if let Note::Message(message) = note {
                self.received.push(message);
            }
        }
    }

    /// Keeps receiving for `duration`.
    pub fn listen(&mut self, duration: Duration) {
        let deadline = Instant::now() + duration;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            self.pump(left);
        }
    }

    /// The first message received (ever) that `matches`, waiting at most
    /// `timeout`; panics with what was received and `logs()` otherwise.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        logs: impl Fn() -> String,
        matches: impl Fn(&Message) -> bool,
    ) -> Message {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(message) = self.received.iter().find(|m| matches(m)) {
                return message.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "no {what} within {timeout:?}; received:\n{}\n{}",
                    self.summary(),
                    logs()
                );
            }
            self.pump(left.min(Duration::from_millis(200)));
        }
    }

    /// How many messages came on each topic, and the last few.
    pub fn summary(&self) -> String {
        let mut counts = std::collections::BTreeMap::new();
        for message in &self.received {
            *counts.entry(message.topic.as_str()).or_insert(0) += 1;
        }
        let mut text: Vec<String> = counts
            .iter()
            .map(|(topic, count)| format!("  {count} on {topic}"))
            .collect();
        let last = &self.received[self.received.len().saturating_sub(15)..];
        text.push(format!("  the last {}:", last.len()));
        text.extend(
            last.iter()
                .map(|m| format!("    {}: {}", m.topic, m.text())),
        );
        text.join("\n")
    }

    /// Every message received so far on `topic`.
    pub fn on(&self, topic: &str) -> Vec<Message> {
        self.received
            .iter()
            .filter(|m| m.topic == topic)
            .cloned()
            .collect()
    }
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        // The DISCONNECT going out is the event that lets the thread see
        // the flag.
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.client.disconnect();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
