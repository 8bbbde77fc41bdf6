//! Test support: a per-run PKI, real mosquitto and nginx servers, service
//! processes, and the env each mode needs.
//!
//! The end-to-end tests need `openssl`, `mosquitto`, `mosquitto_passwd`,
//! `nginx` and nginx's stream and njs modules. On Debian:
//!
//! ```sh
//! apt-get install -y openssl mosquitto nginx libnginx-mod-stream libnginx-mod-stream-js
//! ```
//!
//! Without them the tests print that they were skipped and how to install;
//! under CI (`CI` set) a missing tool is a failure. `tests/transport.rs`
//! also needs tinyproxy, websockify and nginx's http njs module
//! ([`bridges::INSTALL_TRANSPORT`]).

pub mod bridges;
pub mod children;
pub mod http;
pub mod lab;
pub mod managers;
pub mod modules;
pub mod outcomes;
pub mod pki;
pub mod postgres;
pub mod process;
pub mod relay;
pub mod servers;
pub mod skips;

use std::path::Path;

pub use pki::{Identity, Pki, KEY_PASSWORD};
pub use process::ServiceProcess;
pub use relay::Relay;
pub use servers::{accounts, free_ports, Account, BrokerOptions, Edge, FileServer, Mosquitto};

pub const INSTALL: &str =
    "apt-get install -y openssl mosquitto nginx libnginx-mod-stream libnginx-mod-stream-js";
pub const DOMAIN: &str = "dom";
pub const CHANNEL: &str = "chan";
/// Every topic of the test channel, what broker accounts may use.
pub const CHANNEL_TOPICS: &str = "m/dom/c/chan/#";
/// Where the manager sends tasks; every proplet subscribes to it.
pub const START: &str = "m/dom/c/chan/control/manager/start";
/// The line a service logs on every CONNACK.
pub const CONNECTED: &str = "MQTT connection established";

/// True when every server the end-to-end tests need is installed. Otherwise
/// prints why the test is skipped, or panics under CI.
pub fn servers_available(test: &str) -> bool {
    let missing: Vec<&str> = [
        "openssl",
        "mosquitto",
        "mosquitto_passwd",
        "mosquitto_ctrl",
        "nginx",
    ]
    .into_iter()
    .filter(|tool| !on_path(tool))
    .chain(
        ["ngx_stream_module.so", "ngx_stream_js_module.so"]
            .into_iter()
            .filter(|module| {
                !Path::new("/usr/lib/nginx/modules").join(module).exists()
                    && std::env::var_os("NGINX_MODULES").is_none()
            }),
    )
    .collect();
    if missing.is_empty() {
        return true;
    }
    skips::skip(
        test,
        &format!("missing {}; install with: {INSTALL}", missing.join(", ")),
    );
    false
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// Connects with `env` through the library, publishes one message at QoS 1,
/// and disconnects.
pub async fn publish_once(env: &Env, topic: &str, payload: &str) {
    use propeller_mqtt::{Client, ConnectionState};
    use propeller_protocol::{Service, ServiceConfig};
    let mut env = Env {
        prefix: env.prefix.clone(),
        vars: env.vars.clone(),
    };
    env.set("MQTT_QOS", "1");
    let service = match env.prefix.as_str() {
        "MANAGER" => Service::Manager,
        "PROXY" => Service::Proxy,
        _ => Service::Proplet,
    };
    let config = ServiceConfig::from_vars(service, env.vars).expect("publisher config");
    let (client, _) = Client::start(&config.mqtt, vec![]).expect("publisher starts");
    let mut state = client.state();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        state.wait_for(|s| *s == ConnectionState::Connected),
    )
    .await
    .expect("publisher connects within 10 s")
    .expect("publisher alive");
    let delivery = client
        .publish(topic, payload.to_owned())
        .await
        .expect("publish");
    tokio::time::timeout(std::time::Duration::from_secs(10), delivery.acknowledged())
        .await
        .expect("acknowledged within 10 s")
        .expect("acknowledged");
    client.shutdown().await;
}

/// The MQTT client id (= username) of an identity.
pub fn client_id(name: &str) -> String {
    format!("{name}-client")
}

/// The env of a service `prefix` (e.g. `PROPLET`) authenticating as `identity`.
pub struct Env {
    pub prefix: String,
    pub vars: Vec<(String, String)>,
}

impl Env {
    pub fn new(prefix: &str, identity: &Identity) -> Env {
        let mut env = Env {
            prefix: prefix.to_owned(),
            vars: Vec::new(),
        };
        env.set("CLIENT_ID", &client_id(identity.name))
            .set("CLIENT_KEY", &identity.secret)
            .set("DOMAIN_ID", DOMAIN)
            .set("CHANNEL_ID", CHANNEL)
            .set("MQTT_TIMEOUT", "5s");
        if prefix == "MANAGER" {
            // Tests run managers side by side: never the fixed default port,
            // nor the default store file (./propeller.db, locked by the first
            // manager). tests/store.rs sets the store it tests.
            env.set("HTTP_HOST", "127.0.0.1")
                .set("HTTP_PORT", "0")
                .set("STORAGE_TYPE", "memory");
        }
        env
    }

    /// Sets `<PREFIX>_<suffix>`, replacing an earlier value.
    pub fn set(&mut self, suffix: &str, value: &str) -> &mut Env {
        let name = format!("{}_{suffix}", self.prefix);
        self.vars.retain(|(k, _)| *k != name);
        self.vars.push((name, value.to_owned()));
        self
    }

    pub fn path(&mut self, suffix: &str, path: &Path) -> &mut Env {
        self.set(suffix, &path.display().to_string())
    }

    pub fn plain(&mut self, port: u16) -> &mut Env {
        self.set("MQTT_ADDRESS", &format!("tcp://127.0.0.1:{port}"))
    }

    pub fn tls(&mut self, port: u16, pki: &Pki) -> &mut Env {
        self.set("MQTT_ADDRESS", &format!("ssl://127.0.0.1:{port}"))
            .path("MQTT_TLS_CA_CERT", &pki.path("ca.crt"))
    }

    pub fn mtls(&mut self, port: u16, pki: &Pki, identity: &Identity) -> &mut Env {
        self.tls(port, pki)
            .path("MQTT_TLS_CLIENT_CERT", &identity.cert)
            .path("MQTT_TLS_CLIENT_KEY", &identity.key)
    }
}
