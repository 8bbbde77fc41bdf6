//! Propeller's manager: tracks proplets and dispatches tasks.
//!
//! Configured by `MANAGER_*` variables; see the README. Today it connects and
//! listens on the whole channel; the Propeller protocol lands separately.

use std::process::ExitCode;

use propeller_mqtt::{service, Service};
use tracing::debug;

fn main() -> ExitCode {
    service::run(Service::Manager, |_client, message| async move {
        debug!(topic = %message.topic, "manager received");
    })
}
