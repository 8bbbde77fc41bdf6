//! Propeller's side of MQTT, on top of the [`propeller_mqtt`] connection:
//!
//! - [`Service`]: the manager, proplet and proxy, their variable prefixes,
//!   the variables each reads beyond the connection's, and the topics each
//!   subscribes to;
//! - [`Channel`]: the Magistrala channel all topics live under,
//!   `m/<domain>/c/<channel>`;
//! - [`ServiceConfig`]: a service's whole env contract, read once;
//! - the [`topic`]s and their JSON payloads, as upstream v0.5.0 sends and
//!   accepts them;
//! - [`config_toml`]: upstream's `config.toml`, for identity values the env
//!   leaves unset.
#![deny(missing_docs)]

pub mod config_toml;
#[cfg(test)]
mod fuzz;
mod messages;
mod service;

pub use messages::*;
pub use service::{Channel, Service, ServiceConfig};
