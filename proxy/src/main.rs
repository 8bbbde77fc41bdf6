//! Propeller's proxy: streams WebAssembly modules to proplets in chunks.
//!
//! Configured by `PROXY_*` variables; see the README. Today it connects and
//! listens for module requests; serving them lands separately.

use std::process::ExitCode;

use propeller_mqtt::{service, Service};
use tracing::debug;

fn main() -> ExitCode {
    service::run(Service::Proxy, |_client, message| async move {
        debug!(topic = %message.topic, "proxy received");
    })
}
