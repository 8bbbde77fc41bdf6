//! The env contract: what a service reads, parsed and checked without touching
//! files or the network. TLS files are read later, by [`crate::tls`].

mod address;
pub mod value;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use rumqttc::QoS;
use serde::Deserialize;

pub use address::{redacted, BrokerAddress, Transport};

use crate::protocol::topic;
use crate::Error;

/// One of Propeller's services; it decides the prefix of every variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// Tracks proplets and dispatches tasks.
    Manager,
    /// Runs WebAssembly tasks.
    Proplet,
    /// Streams WebAssembly modules to proplets.
    Proxy,
}

impl Service {
    /// Every service, for tools that check them all.
    pub const ALL: [Service; 3] = [Service::Manager, Service::Proplet, Service::Proxy];

    /// The variable prefix, e.g. `PROPLET_`.
    pub fn prefix(self) -> &'static str {
        match self {
            Service::Manager => "MANAGER_",
            Service::Proplet => "PROPLET_",
            Service::Proxy => "PROXY_",
        }
    }

    /// The topics this service listens on, under the channel's base
    /// `m/<domain>/c/<channel>`.
    pub fn topics(self) -> &'static [&'static str] {
        match self {
            // Everything on the channel: proplets' announcements and results.
            Service::Manager => &["#"],
            // Tasks to start and stop, and the chunks of the modules they
            // need, or the proxy's word that it cannot serve them.
            Service::Proplet => &[
                topic::MANAGER_START,
                topic::MANAGER_STOP,
                topic::REGISTRY_CHUNK,
                topic::REGISTRY_ERROR,
            ],
            // Module requests from proplets.
            Service::Proxy => &[topic::REGISTRY_REQUEST],
        }
    }

    /// The variables only this service reads, after its prefix: what it does
    /// beyond connecting. The connection's own are in [`VARIABLES`]; both
    /// lists keep typos from passing silently.
    pub fn settings(self) -> &'static [&'static str] {
        match self {
            Service::Manager => &[
                "CONFIG_FILE",
                "LIVELINESS_INTERVAL",
                "HTTP_HOST",
                "HTTP_PORT",
                // The store, upstream's names (manager/src/store).
                "STORAGE_TYPE",
                "SQLITE_PATH",
                "POSTGRES_HOST",
                "POSTGRES_PORT",
                "POSTGRES_USER",
                "POSTGRES_PASS",
                "POSTGRES_DB",
                "POSTGRES_SSLMODE",
            ],
            Service::Proplet => &[
                "CONFIG_FILE",
                "CONFIG_SECTION",
                "LIVELINESS_INTERVAL",
                "TASK_TIMEOUT",
                "MAX_TASKS",
                "DIRS",
            ],
            Service::Proxy => &[
                "CONFIG_FILE",
                "MODULES_DIR",
                "MODULES_URL",
                "MODULES_CA_CERT",
                "CHUNK_SIZE",
            ],
        }
    }

    /// The full name of one of this service's variables, e.g. `var("CLIENT_ID")`.
    pub fn var(self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix())
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Service::Manager => "manager",
            Service::Proplet => "proplet",
            Service::Proxy => "proxy",
        })
    }
}

/// A string that must never reach a log line: the client key, a key password.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that must send it (CONNECT, key decryption).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How the connection is secured, decided once from the address and TLS variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plain MQTT over TCP.
    Plain,
    /// TLS, verifying the broker; username and password authenticate us.
    Tls,
    /// TLS with a client certificate as well.
    MutualTls,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Plain => "plain",
            Mode::Tls => "tls",
            Mode::MutualTls => "mtls",
        })
    }
}

/// The TLS variables, as paths: the files are read (and re-read) by [`crate::tls`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM bundle or directory of CA certificates; `None` means the OS trust store.
    pub ca: Option<PathBuf>,
    /// Our certificate and key, for mTLS.
    pub identity: Option<IdentityFiles>,
    /// The name to verify the broker's certificate against, instead of the address host.
    pub server_name: Option<String>,
    /// Accept any broker certificate. Upstream's escape hatch; warned about at every connect.
    pub insecure_skip_verify: bool,
}

/// The client certificate and key files of mTLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFiles {
    /// PEM certificate, optionally followed by its chain.
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, PKCS#1, SEC1 or encrypted PKCS#8.
    pub key: PathBuf,
    /// Password of an encrypted key.
    pub key_password: Option<Secret>,
}

/// Where a service's topics live: `m/<domain>/c/<channel>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    /// Magistrala domain id.
    pub domain_id: String,
    /// Magistrala channel id.
    pub channel_id: String,
}

impl Channel {
    /// The topic base, `m/<domain>/c/<channel>`.
    pub fn base(&self) -> String {
        format!("m/{}/c/{}", self.domain_id, self.channel_id)
    }

    /// A topic under the base, e.g. `topic("control/manager/start")`.
    pub fn topic(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.base())
    }

    /// The inverse of [`Channel::topic`]: the part of `topic` after the base,
    /// or `None` for a topic of another channel.
    pub fn suffix<'t>(&self, topic: &'t str) -> Option<&'t str> {
        topic
            .strip_prefix("m/")?
            .strip_prefix(self.domain_id.as_str())?
            .strip_prefix("/c/")?
            .strip_prefix(self.channel_id.as_str())?
            .strip_prefix('/')
    }
}

/// Everything a service reads from its environment, parsed and checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Whose variables these are.
    pub service: Service,
    /// The brokers (or edges), tried in turn; all use the same transport.
    pub brokers: Vec<BrokerAddress>,
    /// `None` for plain MQTT.
    pub tls: Option<TlsSettings>,
    /// MQTT client id and username.
    pub client_id: String,
    /// MQTT password: the Magistrala client secret.
    pub client_key: Secret,
    /// The topic base.
    pub channel: Channel,
    /// QoS of our publishes and subscriptions.
    pub qos: QoS,
    /// How long one connection attempt (TCP, TLS and CONNACK) may take.
    pub connect_timeout: Duration,
    /// MQTT keep-alive interval.
    pub keep_alive: Duration,
    /// Largest MQTT packet, both directions.
    pub max_packet_size: usize,
    /// How many messages may wait for the broker's acknowledgement.
    pub outbox_limit: usize,
    /// A `tracing` filter, e.g. `info` or `propeller_mqtt=debug`.
    pub log_level: String,
    /// `<P>_*` variables that were set but are not ones we read (typos, or
    /// settings of a newer version), to warn about.
    pub unknown: Vec<String>,
    /// The service's own variables ([`Service::settings`]), set and non-empty.
    pub settings: Settings,
    /// What the broker publishes for us if we vanish without DISCONNECT. Not
    /// read from the environment: the service sets it (the proplet's
    /// `offline` announcement).
    pub last_will: Option<LastWill>,
}

/// A message the broker publishes on our behalf when the connection dies
/// without a DISCONNECT; sent at the configured QoS, not retained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    /// The full topic.
    pub topic: String,
    /// The payload.
    pub payload: bytes::Bytes,
}

/// The variables of [`Service::settings`], for the service to parse; every
/// parse names the variable in its error.
#[derive(Debug, Clone)]
pub struct Settings {
    service: Service,
    values: HashMap<String, String>,
}

impl Settings {
    /// The value of `<P>_<suffix>`, if set and non-empty.
    pub fn get(&self, suffix: &str) -> Option<&str> {
        self.values.get(suffix).map(String::as_str)
    }

    /// Parses `<P>_<suffix>` with `parse`, or returns `default` when unset.
    ///
    /// # Errors
    ///
    /// [`Error::Invalid`] naming the variable, its value and `parse`'s problem.
    pub fn parse<T>(
        &self,
        suffix: &str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, Error> {
        match self.get(suffix) {
            None => Ok(default),
            Some(text) => parse(text).map_err(|problem| Error::Invalid {
                var: self.var(suffix),
                value: redacted(text),
                problem,
            }),
        }
    }

    /// The full name of `suffix`, e.g. `PROXY_CHUNK_SIZE`.
    pub fn var(&self, suffix: &str) -> String {
        self.service.var(suffix)
    }
}

/// Every variable a service reads, after its prefix. Only these reach envy
/// (which denies unknown fields, so this list and [`RawEnv`] cannot drift);
/// any other `<P>_*` variable is reported as unknown, which catches typos.
pub const VARIABLES: &[&str] = &[
    "MQTT_ADDRESS",
    "MQTT_TLS_CA_CERT",
    "MQTT_TLS_CLIENT_CERT",
    "MQTT_TLS_CLIENT_KEY",
    "MQTT_TLS_CLIENT_KEY_PASSWORD",
    "MQTT_TLS_SERVER_NAME",
    "MQTT_TLS_INSECURE_SKIP_VERIFY",
    "CLIENT_ID",
    "CLIENT_KEY",
    "DOMAIN_ID",
    "CHANNEL_ID",
    "ENTITY_ID",
    "API_KEY",
    "TENANT_ID",
    "MQTT_QOS",
    "MQTT_TIMEOUT",
    "MQTT_KEEP_ALIVE",
    "MQTT_MAX_PACKET_SIZE",
    "MQTT_OUTBOX_LIMIT",
    "LOG_LEVEL",
];

/// The variables as found, every one optional; envy maps `<P>_MQTT_ADDRESS` to
/// `mqtt_address`. Empty values were dropped before, so `None` means unset or empty.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEnv {
    mqtt_address: Option<String>,
    mqtt_tls_ca_cert: Option<PathBuf>,
    mqtt_tls_client_cert: Option<PathBuf>,
    mqtt_tls_client_key: Option<PathBuf>,
    mqtt_tls_client_key_password: Option<String>,
    mqtt_tls_server_name: Option<String>,
    mqtt_tls_insecure_skip_verify: Option<String>,
    client_id: Option<String>,
    client_key: Option<String>,
    domain_id: Option<String>,
    channel_id: Option<String>,
    // Newer upstream's names for the same identity values.
    entity_id: Option<String>,
    api_key: Option<String>,
    tenant_id: Option<String>,
    mqtt_qos: Option<String>,
    mqtt_timeout: Option<String>,
    mqtt_keep_alive: Option<String>,
    mqtt_max_packet_size: Option<String>,
    mqtt_outbox_limit: Option<String>,
    log_level: Option<String>,
}

const DEFAULT_ADDRESS: &str = "tcp://localhost:1883";
const DEFAULT_MAX_PACKET_SIZE: usize = 10 << 20;
const DEFAULT_OUTBOX_LIMIT: usize = 10_000;
/// MQTT's remaining-length field cannot describe a larger packet.
const MQTT_MAX_PACKET_SIZE: usize = 268_435_455;

impl Config {
    /// Reads `service`'s variables from the process environment.
    ///
    /// # Errors
    ///
    /// The first variable that is missing or invalid, see [`Error`].
    pub fn from_env(service: Service) -> Result<Self, Error> {
        // `std::env::vars` panics on a non-UTF-8 variable anywhere in the environment.
        let vars = std::env::vars_os().map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        });
        Self::from_vars(service, vars)
    }

    /// Reads `service`'s variables from any set of name/value pairs. Tests pass a
    /// map here instead of mutating the process environment.
    ///
    /// # Errors
    ///
    /// The first variable that is missing or invalid, see [`Error`].
    pub fn from_vars<I, K, V>(service: Service, vars: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        // Compose passes `${VAR}` through as empty when .env comments it out:
        // empty means unset.
        let (vars, others): (HashMap<String, String>, HashMap<String, String>) = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(k, v)| k.starts_with(service.prefix()) && !v.trim().is_empty())
            .partition(|(k, _)| VARIABLES.contains(&&k[service.prefix().len()..]));
        let (settings, unknown): (HashMap<String, String>, HashMap<String, String>) = others
            .into_iter()
            .map(|(k, v)| (k[service.prefix().len()..].to_owned(), v.trim().to_owned()))
            .partition(|(suffix, _)| service.settings().contains(&suffix.as_str()));
        let mut unknown: Vec<String> = unknown
            .into_keys()
            .map(|suffix| service.var(&suffix))
            .collect();
        unknown.sort();
        let raw: RawEnv = envy::prefixed(service.prefix())
            .from_iter(vars)
            .map_err(|e| Error::InvalidSecret {
                var: format!("{}*", service.prefix()),
                problem: e.to_string(),
            })?;
        let mut config = Parser { service }.parse(raw)?;
        config.unknown = unknown;
        config.settings.values = settings;
        Ok(config)
    }

    /// Plain, TLS or mutual TLS.
    pub fn mode(&self) -> Mode {
        match &self.tls {
            None => Mode::Plain,
            Some(TlsSettings { identity: None, .. }) => Mode::Tls,
            Some(TlsSettings {
                identity: Some(_), ..
            }) => Mode::MutualTls,
        }
    }
}

/// Turns the raw strings into a [`Config`], naming the variable in every error.
struct Parser {
    service: Service,
}

impl Parser {
    fn parse(&self, raw: RawEnv) -> Result<Config, Error> {
        let address_text = raw
            .mqtt_address
            .clone()
            .unwrap_or_else(|| DEFAULT_ADDRESS.to_owned());
        let brokers = self.brokers(&address_text)?;
        let tls = self.tls(&raw, &brokers[0], &address_text)?;

        let client_id = self.required_alias(
            raw.client_id,
            "CLIENT_ID",
            raw.entity_id,
            "ENTITY_ID",
            "set it to the Magistrala client id (it is also the MQTT username)",
        )?;
        if client_id.starts_with(char::is_whitespace) || client_id.contains(char::is_control) {
            return Err(self.invalid(
                "CLIENT_ID",
                &client_id,
                "remove the whitespace or control characters",
            ));
        }
        let client_key = self.required_alias(
            raw.client_key,
            "CLIENT_KEY",
            raw.api_key,
            "API_KEY",
            "set it to the Magistrala client secret (the MQTT password)",
        )?;
        let domain_id = self.required_alias(
            raw.domain_id,
            "DOMAIN_ID",
            raw.tenant_id,
            "TENANT_ID",
            "set it to the Magistrala domain id",
        )?;
        let channel_id = self.required(
            raw.channel_id,
            "CHANNEL_ID",
            "set it to the Magistrala channel id",
        )?;
        for (suffix, value) in [("DOMAIN_ID", &domain_id), ("CHANNEL_ID", &channel_id)] {
            if value.contains(['/', '+', '#']) {
                return Err(self.invalid(
                    suffix,
                    value,
                    "topic ids cannot contain '/', '+' or '#'",
                ));
            }
        }

        let qos = self
            .value("MQTT_QOS", raw.mqtt_qos.as_deref(), value::qos)?
            .unwrap_or(QoS::ExactlyOnce);
        let connect_timeout = self
            .value(
                "MQTT_TIMEOUT",
                raw.mqtt_timeout.as_deref(),
                value::positive_duration,
            )?
            .unwrap_or(Duration::from_secs(30));
        let keep_alive = self
            .value("MQTT_KEEP_ALIVE", raw.mqtt_keep_alive.as_deref(), |text| {
                let d = value::duration(text)?;
                // MQTT carries whole seconds in 16 bits, and rumqttc panics below one second.
                if d.subsec_nanos() != 0 || d.as_secs() == 0 || d.as_secs() > u64::from(u16::MAX) {
                    return Err("keep-alive must be whole seconds from 1s to 65535s".to_owned());
                }
                Ok(d)
            })?
            .unwrap_or(Duration::from_secs(30));
        let max_packet_size = self
            .value(
                "MQTT_MAX_PACKET_SIZE",
                raw.mqtt_max_packet_size.as_deref(),
                |text| match value::byte_size(text)? {
                    n if (128..=MQTT_MAX_PACKET_SIZE).contains(&n) => Ok(n),
                    _ => Err(format!(
                        "the size must be from 128 bytes to {MQTT_MAX_PACKET_SIZE} (MQTT's limit)"
                    )),
                },
            )?
            .unwrap_or(DEFAULT_MAX_PACKET_SIZE);
        let outbox_limit = self
            .value(
                "MQTT_OUTBOX_LIMIT",
                raw.mqtt_outbox_limit.as_deref(),
                |text| match text.trim().parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err("write a number of messages, at least 1, such as 10000".to_owned()),
                },
            )?
            .unwrap_or(DEFAULT_OUTBOX_LIMIT);

        Ok(Config {
            service: self.service,
            brokers,
            tls,
            client_id,
            client_key: Secret::new(client_key),
            channel: Channel {
                domain_id,
                channel_id,
            },
            qos,
            connect_timeout,
            keep_alive,
            max_packet_size,
            outbox_limit,
            unknown: Vec::new(),
            settings: Settings {
                service: self.service,
                values: HashMap::new(),
            },
            last_will: None,
            log_level: raw.log_level.unwrap_or_else(|| "info".to_owned()),
        })
    }

    /// One address, or a comma-separated list for a cluster without a load
    /// balancer. Mixing plain and TLS would make the mode depend on which
    /// broker is up, so every address must use the same transport.
    fn brokers(&self, text: &str) -> Result<Vec<BrokerAddress>, Error> {
        let brokers = text
            .split(',')
            .map(|one| match one.trim() {
                "" => Err(self.invalid(
                    "MQTT_ADDRESS",
                    &redacted(text),
                    "the list has an empty entry: separate addresses with single commas",
                )),
                one => BrokerAddress::parse(one)
                    .map_err(|problem| self.invalid("MQTT_ADDRESS", &redacted(text), &problem)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if brokers.iter().any(|b| b.transport != brokers[0].transport) {
            return Err(self.invalid(
                "MQTT_ADDRESS",
                &redacted(text),
                "the list mixes plain (tcp://) and TLS (ssl://) addresses: use one mode for every broker",
            ));
        }
        Ok(brokers)
    }

    fn tls(
        &self,
        raw: &RawEnv,
        broker: &BrokerAddress,
        address_text: &str,
    ) -> Result<Option<TlsSettings>, Error> {
        let identity = match (&raw.mqtt_tls_client_cert, &raw.mqtt_tls_client_key) {
            (Some(cert), Some(key)) => Some(IdentityFiles {
                cert: cert.clone(),
                key: key.clone(),
                key_password: raw.mqtt_tls_client_key_password.clone().map(Secret::new),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(self.half_identity("MQTT_TLS_CLIENT_CERT", "MQTT_TLS_CLIENT_KEY"))
            }
            (None, Some(_)) => {
                return Err(self.half_identity("MQTT_TLS_CLIENT_KEY", "MQTT_TLS_CLIENT_CERT"))
            }
        };
        let insecure_skip_verify = self
            .value(
                "MQTT_TLS_INSECURE_SKIP_VERIFY",
                raw.mqtt_tls_insecure_skip_verify.as_deref(),
                value::boolean,
            )?
            .unwrap_or(false);
        let server_name = match &raw.mqtt_tls_server_name {
            Some(name) => {
                rustls::pki_types::ServerName::try_from(name.as_str()).map_err(|_| {
                    self.invalid(
                        "MQTT_TLS_SERVER_NAME",
                        name,
                        "write a DNS name or an IP address, as in the broker certificate's SANs",
                    )
                })?;
                Some(name.clone())
            }
            None => None,
        };

        if broker.transport == Transport::Tcp {
            let set: Vec<String> = [
                ("MQTT_TLS_CA_CERT", raw.mqtt_tls_ca_cert.is_some()),
                ("MQTT_TLS_CLIENT_CERT", raw.mqtt_tls_client_cert.is_some()),
                ("MQTT_TLS_CLIENT_KEY", raw.mqtt_tls_client_key.is_some()),
                ("MQTT_TLS_SERVER_NAME", server_name.is_some()),
                ("MQTT_TLS_INSECURE_SKIP_VERIFY", insecure_skip_verify),
            ]
            .into_iter()
            .filter(|(_, set)| *set)
            .map(|(suffix, _)| self.service.var(suffix))
            .collect();
            if set.is_empty() {
                return Ok(None);
            }
            let vars = match set.len() {
                1 => format!("{} is", set[0]),
                _ => format!("{} are", set.join(", ")),
            };
            return Err(Error::TlsWithPlainAddress {
                vars,
                address_var: self.service.var("MQTT_ADDRESS"),
                address: redacted(address_text.trim()),
            });
        }
        Ok(Some(TlsSettings {
            ca: raw.mqtt_tls_ca_cert.clone(),
            identity,
            server_name,
            insecure_skip_verify,
        }))
    }

    /// Parses an optional value, naming the variable in the error.
    fn value<T>(
        &self,
        suffix: &str,
        text: Option<&str>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, Error> {
        text.map(|text| parse(text).map_err(|problem| self.invalid(suffix, text, &problem)))
            .transpose()
    }

    fn required(
        &self,
        value: Option<String>,
        suffix: &str,
        fix: &'static str,
    ) -> Result<String, Error> {
        value.ok_or_else(|| Error::Missing {
            var: self.service.var(suffix),
            fix,
        })
    }

    /// A required value that newer upstream spells differently. Both may be set
    /// only when they agree.
    fn required_alias(
        &self,
        value: Option<String>,
        suffix: &str,
        alias: Option<String>,
        alias_suffix: &str,
        fix: &'static str,
    ) -> Result<String, Error> {
        match (value, alias) {
            (Some(value), Some(alias)) if value != alias => Err(Error::InvalidSecret {
                var: self.service.var(suffix),
                problem: format!(
                    "it differs from {}, its newer name: set only one",
                    self.service.var(alias_suffix)
                ),
            }),
            (Some(value), _) | (None, Some(value)) => Ok(value),
            (None, None) => self.required(None, suffix, fix),
        }
    }

    fn invalid(&self, suffix: &str, value: &str, problem: &str) -> Error {
        Error::Invalid {
            var: self.service.var(suffix),
            value: value.to_owned(),
            problem: problem.to_owned(),
        }
    }

    fn half_identity(&self, set: &str, unset: &str) -> Error {
        Error::HalfClientIdentity {
            set: self.service.var(set),
            unset: self.service.var(unset),
        }
    }
}

#[cfg(test)]
mod tests;
