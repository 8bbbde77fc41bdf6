//! Propeller's proplet: runs WebAssembly tasks the manager sends it.
//!
//! Configured by `PROPLET_*` variables; see the README. Today it connects and
//! listens for tasks and module chunks; running them lands separately.

use std::process::ExitCode;

use propeller_mqtt::{service, Service};
use tracing::debug;

fn main() -> ExitCode {
    service::run(Service::Proplet, |_client, message| async move {
        debug!(topic = %message.topic, "proplet received");
    })
}
