//! The `propeller-mqtt` operator tool, as a library for tests and scripts:
//!
//! - [`check`] reads what a service would read and walks its connection one
//!   step at a time (config, CA, client certificate, DNS, TCP, TLS, MQTT),
//!   explaining the first thing that breaks;
//! - [`certs`] makes the CA, server and client certificates of upstream's
//!   `docker/ssl` Makefile, without openssl.
#![deny(missing_docs)]

pub mod certs;
pub mod check;
mod error;

pub use error::CliError;
