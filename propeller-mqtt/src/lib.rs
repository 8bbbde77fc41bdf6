//! An MQTT 3.1.1 client connection that stays up: plain MQTT, MQTTS and
//! mutual TLS, configured in code or from `<PREFIX>_MQTT_*` variables, with
//! reconnects, failover between brokers, an outbox that re-sends what the
//! broker has not acknowledged (in memory, or in a directory so that it
//! outlives the process: [`Options::with_outbox_dir`]), TLS files re-read on
//! request, and a cause and a fix for every failure to connect.
//!
//! | mode | address | TLS settings |
//! |---|---|---|
//! | plain | `tcp://host:1883` | none |
//! | TLS (MQTTS) | `ssl://host:8883` | a CA (or the OS trust store) |
//! | mutual TLS | `ssl://host:8883` | a CA, a client certificate and its key |
//!
//! `ws://host/path` and `wss://host/path` carry MQTT over WebSocket in the
//! same modes; any of them may go through an HTTP proxy (`CONNECT`), and
//! TLS sends the configured server name as SNI and the configured ALPN
//! protocols.
//!
//! Everything that can be checked before connecting is checked before
//! connecting ([`ConfigError`]); connection failures are retried with backoff
//! and explained ([`Failure`]); a running client refuses what it cannot
//! deliver ([`ClientError`]).
//!
//! The crate owns no process state: no logging subscriber, no runtime, no
//! signal handler. [`Client::start`] spawns its task on the caller's tokio
//! runtime, and [`Client::run_until`] stops it when the caller says so.
//!
//! ```no_run
//! use propeller_mqtt::env::EnvConfig;
//! use propeller_mqtt::Client;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // SENSOR_MQTT_ADDRESS, SENSOR_CLIENT_ID, SENSOR_CLIENT_KEY, SENSOR_MQTT_TLS_*,
//! // and SENSOR_TOPIC, which is ours.
//! let config = EnvConfig::from_env("SENSOR_", &["TOPIC"])?;
//! let topic = config.settings.required("TOPIC", "name the topic to read")?;
//! let (client, mut messages) = Client::start(&config.options, vec![topic.to_owned()])?;
//! while let Some(message) = messages.recv().await {
//!     println!("{} bytes on {}", message.payload.len(), message.topic);
//! }
//! client.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod connection;
pub mod env;
pub mod env_file;
mod error;
#[cfg(test)]
mod fuzz;
mod options;
pub mod tls;
mod warning;

pub use connection::{
    diagnose, Client, ConnectionLoss, ConnectionState, Delivery, Failure, IoCause, Message, Metrics,
};
pub use error::{one_line, ClientError, ConfigError};
pub use options::{
    HttpProxy, IdentityFiles, LastWill, Mode, Names, Options, ProxyCredentials, Secret,
    TlsSettings, DEFAULT_CONNECT_TIMEOUT, DEFAULT_KEEP_ALIVE, DEFAULT_MAX_PACKET_SIZE,
    DEFAULT_OUTBOX_LIMIT, DEFAULT_QOS, DEFAULT_RECONNECT_MAX, DEFAULT_RECONNECT_MIN,
};
pub use rumqttc::QoS;
pub use warning::Warning;
