//! The MQTT connection layer of Propeller's manager, proplet and proxy.
//!
//! A service reads `<P>_MQTT_ADDRESS` and `<P>_MQTT_TLS_*` (P = `MANAGER`,
//! `PROPLET` or `PROXY`) and connects to Magistrala's broker, or the nginx edge
//! in front of it, in one of three modes:
//!
//! | mode | address | TLS variables |
//! |---|---|---|
//! | plain | `tcp://host:1883` | none |
//! | TLS (MQTTS) | `ssl://host:8883` | `CA_CERT` (or the OS trust store) |
//! | mutual TLS | `ssl://host:8883` | `CA_CERT`, `CLIENT_CERT`, `CLIENT_KEY` |
//!
//! Everything that can be checked before connecting is checked before
//! connecting ([`Error`]); connection failures are retried with backoff and
//! explained ([`Failure`]).
//!
//! ```no_run
//! use propeller_mqtt::{Client, Config, Service};
//!
//! # async fn demo() -> Result<(), propeller_mqtt::Error> {
//! let config = Config::from_env(Service::Proplet)?;
//! let topic = config.channel.topic("control/manager/start");
//! let (client, mut messages) = Client::start(&config, vec![topic])?;
//! while let Some(message) = messages.recv().await {
//!     println!("{} bytes on {}", message.payload.len(), message.topic);
//! }
//! client.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

#[cfg(feature = "cli")]
pub mod certs;
#[cfg(feature = "cli")]
pub mod check;
pub mod config;
pub mod config_toml;
mod connection;
pub mod env_file;
mod error;
#[cfg(test)]
mod fuzz;
pub mod protocol;
pub mod service;
pub mod tls;
mod warning;

pub use config::{Config, LastWill, Mode, Service, Settings};
pub use connection::{Client, ConnectionState, Failure, Message};
pub use error::{one_line, Error};
pub use rumqttc::QoS;
pub use warning::Warning;
