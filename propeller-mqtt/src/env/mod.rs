//! The env front end: `<PREFIX>_MQTT_*` and the credentials, for any
//! prefix, parsed and checked without touching files or the network, plus
//! the variables the caller declares as its own. TLS files are read later,
//! by [`crate::tls`].

mod address;
pub mod value;

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;

pub(crate) use address::{check_host, split_host_port};
pub use address::{redacted, BrokerAddress, Transport, DEFAULT_WEBSOCKET_PATH};

use crate::options::{
    brokers, check_alpn, max_packet_range, HttpProxy, IdentityFiles, Names, Options, Secret,
    TlsSettings, DEFAULT_CONNECT_TIMEOUT, DEFAULT_KEEP_ALIVE, DEFAULT_MAX_PACKET_SIZE,
    DEFAULT_OUTBOX_LIMIT, DEFAULT_QOS, DEFAULT_RECONNECT_MAX, DEFAULT_RECONNECT_MIN,
    KEEP_ALIVE_RANGE, MQTT_MAX_PACKET_SIZE, OUTBOX_RANGE,
};
use crate::ConfigError;

/// What a process reads from its environment under one prefix: the
/// connection's [`Options`], the caller's own variables, and the rest.
///
/// ```
/// use propeller_mqtt::env::EnvConfig;
///
/// let vars = [
///     ("SENSOR_MQTT_ADDRESS", "tcp://localhost:1883"),
///     ("SENSOR_CLIENT_ID", "sensor-7"),
///     ("SENSOR_CLIENT_KEY", "secret"),
///     ("SENSOR_INTERVAL", "5s"),
/// ];
/// let config = EnvConfig::from_vars("SENSOR_", &["INTERVAL"], vars)?;
/// assert_eq!(config.settings.get("INTERVAL"), Some("5s"));
/// assert!(config.unknown.is_empty());
/// # Ok::<(), propeller_mqtt::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct EnvConfig {
    /// The connection, ready for [`Client::start`](crate::Client::start).
    pub options: Options,
    /// The caller's own variables, set and non-empty.
    pub settings: Settings,
    /// `<PREFIX>*` variables that were set but that neither we nor the
    /// caller read (typos, or settings of a newer version), to warn about.
    pub unknown: Vec<String>,
}

/// The caller's own variables, for it to parse; every parse names the
/// variable in its error. Its `Debug` shows which are set, never their
/// values: one of them may be a password (the manager's `POSTGRES_PASS`).
#[derive(Clone, Default)]
pub struct Settings {
    names: Names,
    values: HashMap<String, String>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut set: Vec<String> = self.values.keys().map(|k| self.names.var(k)).collect();
        set.sort();
        f.debug_struct("Settings").field("set", &set).finish()
    }
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
    /// [`ConfigError::Invalid`] naming the variable, its value and `parse`'s problem.
    pub fn parse<T>(
        &self,
        suffix: &str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        match self.get(suffix) {
            None => Ok(default),
            Some(text) => parse(text).map_err(|problem| ConfigError::Invalid {
                var: self.var(suffix),
                value: redacted(text),
                problem,
            }),
        }
    }

    /// The full name of `suffix`, e.g. `SENSOR_INTERVAL`.
    pub fn var(&self, suffix: &str) -> String {
        self.names.var(suffix)
    }

    /// The value of `<P>_<suffix>`, which must be set.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Missing`], with `fix`.
    pub fn required(&self, suffix: &str, fix: &'static str) -> Result<&str, ConfigError> {
        self.get(suffix).ok_or_else(|| ConfigError::Missing {
            var: self.var(suffix),
            fix,
        })
    }
}

/// Every variable the front end reads, after the prefix. Only these reach envy
/// (which denies unknown fields, so this list and `RawEnv` cannot drift);
/// any other `<P>_*` variable that the caller does not declare is reported
/// as unknown, which catches typos.
pub const VARIABLES: &[&str] = &[
    "MQTT_ADDRESS",
    "MQTT_TLS_CA_CERT",
    "MQTT_TLS_CLIENT_CERT",
    "MQTT_TLS_CLIENT_KEY",
    "MQTT_TLS_CLIENT_KEY_PASSWORD",
    "MQTT_TLS_SERVER_NAME",
    "MQTT_TLS_INSECURE_SKIP_VERIFY",
    "MQTT_TLS_ALPN",
    "MQTT_PROXY",
    "CLIENT_ID",
    "CLIENT_KEY",
    "ENTITY_ID",
    "API_KEY",
    "MQTT_QOS",
    "MQTT_TIMEOUT",
    "MQTT_KEEP_ALIVE",
    "MQTT_MAX_PACKET_SIZE",
    "MQTT_OUTBOX_LIMIT",
    "MQTT_OUTBOX_DIR",
    "MQTT_PERSISTENT_SESSION",
    "MQTT_RECONNECT_MIN",
    "MQTT_RECONNECT_MAX",
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
    mqtt_tls_alpn: Option<String>,
    mqtt_proxy: Option<String>,
    client_id: Option<String>,
    client_key: Option<String>,
    // Newer upstream's names for the same identity values.
    entity_id: Option<String>,
    api_key: Option<String>,
    mqtt_qos: Option<String>,
    mqtt_timeout: Option<String>,
    mqtt_keep_alive: Option<String>,
    mqtt_max_packet_size: Option<String>,
    mqtt_outbox_limit: Option<String>,
    mqtt_outbox_dir: Option<PathBuf>,
    mqtt_persistent_session: Option<String>,
    mqtt_reconnect_min: Option<String>,
    mqtt_reconnect_max: Option<String>,
}

const DEFAULT_ADDRESS: &str = "tcp://localhost:1883";

impl EnvConfig {
    /// Reads the variables under `prefix` (such as `SENSOR_`) from the
    /// process environment; `own` are the caller's variables, after the prefix.
    ///
    /// # Errors
    ///
    /// The first variable that is missing or invalid, see [`ConfigError`].
    pub fn from_env(prefix: &str, own: &[&str]) -> Result<Self, ConfigError> {
        // `std::env::vars` panics on a non-UTF-8 variable anywhere in the environment.
        let vars = std::env::vars_os().map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        });
        Self::from_vars(prefix, own, vars)
    }

    /// Reads the variables under `prefix` from any set of name/value pairs.
    /// Tests pass a map here instead of mutating the process environment.
    ///
    /// # Errors
    ///
    /// The first variable that is missing or invalid, see [`ConfigError`].
    pub fn from_vars<I, K, V>(prefix: &str, own: &[&str], vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let names = Names::prefixed(prefix);
        // Compose passes `${VAR}` through as empty when .env comments it out:
        // empty means unset.
        let (vars, others): (HashMap<String, String>, HashMap<String, String>) = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(k, v)| k.starts_with(prefix) && !v.trim().is_empty())
            .partition(|(k, _)| VARIABLES.contains(&&k[prefix.len()..]));
        let (settings, unknown): (HashMap<String, String>, HashMap<String, String>) = others
            .into_iter()
            .map(|(k, v)| (k[prefix.len()..].to_owned(), v.trim().to_owned()))
            .partition(|(suffix, _)| own.contains(&suffix.as_str()));
        let mut unknown: Vec<String> = unknown.into_keys().map(|s| names.var(&s)).collect();
        unknown.sort();
        let raw: RawEnv =
            envy::prefixed(prefix)
                .from_iter(vars)
                .map_err(|e| ConfigError::InvalidSecret {
                    var: format!("{prefix}*"),
                    problem: e.to_string(),
                })?;
        let options = Parser {
            names: names.clone(),
        }
        .parse(raw)?;
        Ok(EnvConfig {
            options,
            settings: Settings {
                names,
                values: settings,
            },
            unknown,
        })
    }
}

/// Turns the raw strings into [`Options`], naming the variable in every error.
struct Parser {
    names: Names,
}

impl Parser {
    fn parse(&self, raw: RawEnv) -> Result<Options, ConfigError> {
        let address_text = raw
            .mqtt_address
            .clone()
            .unwrap_or_else(|| DEFAULT_ADDRESS.to_owned());
        let brokers = brokers(&address_text, &self.names)?;
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

        let qos = self
            .value("MQTT_QOS", raw.mqtt_qos.as_deref(), value::qos)?
            .unwrap_or(DEFAULT_QOS);
        let connect_timeout = self
            .value(
                "MQTT_TIMEOUT",
                raw.mqtt_timeout.as_deref(),
                value::positive_duration,
            )?
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let keep_alive = self
            .value("MQTT_KEEP_ALIVE", raw.mqtt_keep_alive.as_deref(), |text| {
                let d = value::duration(text)?;
                // MQTT carries whole seconds in 16 bits, and rumqttc panics below one second.
                if d.subsec_nanos() != 0 || d.as_secs() == 0 || d.as_secs() > u64::from(u16::MAX) {
                    return Err(KEEP_ALIVE_RANGE.to_owned());
                }
                Ok(d)
            })?
            .unwrap_or(DEFAULT_KEEP_ALIVE);
        let max_packet_size = self
            .value(
                "MQTT_MAX_PACKET_SIZE",
                raw.mqtt_max_packet_size.as_deref(),
                |text| match value::byte_size(text)? {
                    n if (128..=MQTT_MAX_PACKET_SIZE).contains(&n) => Ok(n),
                    _ => Err(max_packet_range()),
                },
            )?
            .unwrap_or(DEFAULT_MAX_PACKET_SIZE);
        let outbox_limit = self
            .value(
                "MQTT_OUTBOX_LIMIT",
                raw.mqtt_outbox_limit.as_deref(),
                |text| match text.trim().parse::<usize>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(OUTBOX_RANGE.to_owned()),
                },
            )?
            .unwrap_or(DEFAULT_OUTBOX_LIMIT);
        let persistent_session = self
            .value(
                "MQTT_PERSISTENT_SESSION",
                raw.mqtt_persistent_session.as_deref(),
                value::boolean,
            )?
            .unwrap_or(false);
        let reconnect_min = self
            .value(
                "MQTT_RECONNECT_MIN",
                raw.mqtt_reconnect_min.as_deref(),
                value::positive_duration,
            )?
            .unwrap_or(DEFAULT_RECONNECT_MIN);
        let reconnect_max = self
            .value(
                "MQTT_RECONNECT_MAX",
                raw.mqtt_reconnect_max.as_deref(),
                value::positive_duration,
            )?
            .unwrap_or(DEFAULT_RECONNECT_MAX);
        let proxy = self.proxy(raw.mqtt_proxy.as_deref())?;

        let options = Options {
            brokers,
            tls,
            client_id,
            client_key: Secret::new(client_key),
            qos,
            connect_timeout,
            keep_alive,
            max_packet_size,
            outbox_limit,
            last_will: None,
            names: self.names.clone(),
            persistent_session,
            proxy,
            reconnect_min,
            reconnect_max,
            // Created, checked and locked by `Client::start`: this front end
            // does no I/O.
            outbox_dir: raw.mqtt_outbox_dir.clone(),
        };
        if reconnect_min > reconnect_max {
            let text = raw.mqtt_reconnect_max.as_deref().unwrap_or("60s");
            return Err(self.invalid(
                "MQTT_RECONNECT_MAX",
                text,
                &format!(
                    "it must be at least {} ({reconnect_min:?}): raise it, or lower that",
                    self.names.var("MQTT_RECONNECT_MIN")
                ),
            ));
        }
        Ok(options)
    }

    /// `<P>_MQTT_PROXY`. Its value is shown only with the credentials
    /// redacted, and not at all when it does not look like a URL.
    fn proxy(&self, text: Option<&str>) -> Result<Option<HttpProxy>, ConfigError> {
        let Some(text) = text else {
            return Ok(None);
        };
        HttpProxy::parse(text).map(Some).map_err(|problem| {
            let var = self.names.var("MQTT_PROXY");
            let text = text.trim();
            // Everything up to the last '@' may be credentials, '/' and all.
            match (text.split_once("://"), text.rfind('@')) {
                (Some((scheme, _)), Some(at)) => ConfigError::Invalid {
                    var,
                    value: format!("{scheme}://<redacted>{}", &text[at..]),
                    problem,
                },
                (Some(_), None) => ConfigError::Invalid {
                    var,
                    value: text.to_owned(),
                    problem,
                },
                (None, _) => ConfigError::InvalidSecret { var, problem },
            }
        })
    }

    fn tls(
        &self,
        raw: &RawEnv,
        broker: &BrokerAddress,
        address_text: &str,
    ) -> Result<Option<TlsSettings>, ConfigError> {
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

        let alpn: Vec<String> = match &raw.mqtt_tls_alpn {
            None => Vec::new(),
            Some(text) => {
                let alpn: Vec<String> = text.split(',').map(|p| p.trim().to_owned()).collect();
                check_alpn(&alpn)
                    .map_err(|problem| self.invalid("MQTT_TLS_ALPN", text, &problem))?;
                alpn
            }
        };

        if broker.transport == Transport::Tcp {
            let set: Vec<String> = [
                ("MQTT_TLS_CA_CERT", raw.mqtt_tls_ca_cert.is_some()),
                ("MQTT_TLS_CLIENT_CERT", raw.mqtt_tls_client_cert.is_some()),
                ("MQTT_TLS_CLIENT_KEY", raw.mqtt_tls_client_key.is_some()),
                ("MQTT_TLS_SERVER_NAME", server_name.is_some()),
                ("MQTT_TLS_INSECURE_SKIP_VERIFY", insecure_skip_verify),
                ("MQTT_TLS_ALPN", !alpn.is_empty()),
            ]
            .into_iter()
            .filter(|(_, set)| *set)
            .map(|(suffix, _)| self.names.var(suffix))
            .collect();
            if set.is_empty() {
                return Ok(None);
            }
            let vars = match set.len() {
                1 => format!("{} is", set[0]),
                _ => format!("{} are", set.join(", ")),
            };
            return Err(ConfigError::TlsWithPlainAddress {
                vars,
                address_var: self.names.var("MQTT_ADDRESS"),
                address: redacted(address_text.trim()),
            });
        }
        Ok(Some(TlsSettings {
            ca: raw.mqtt_tls_ca_cert.clone(),
            identity,
            server_name,
            insecure_skip_verify,
            alpn,
        }))
    }

    /// Parses an optional value, naming the variable in the error.
    fn value<T>(
        &self,
        suffix: &str,
        text: Option<&str>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        text.map(|text| parse(text).map_err(|problem| self.invalid(suffix, text, &problem)))
            .transpose()
    }

    fn required(
        &self,
        value: Option<String>,
        suffix: &str,
        fix: &'static str,
    ) -> Result<String, ConfigError> {
        value.ok_or_else(|| ConfigError::Missing {
            var: self.names.var(suffix),
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
    ) -> Result<String, ConfigError> {
        match (value, alias) {
            (Some(value), Some(alias)) if value != alias => Err(ConfigError::InvalidSecret {
                var: self.names.var(suffix),
                problem: format!(
                    "it differs from {}, its newer name: set only one",
                    self.names.var(alias_suffix)
                ),
            }),
            (Some(value), _) | (None, Some(value)) => Ok(value),
            (None, None) => self.required(None, suffix, fix),
        }
    }

    fn invalid(&self, suffix: &str, value: &str, problem: &str) -> ConfigError {
        ConfigError::Invalid {
            var: self.names.var(suffix),
            value: value.to_owned(),
            problem: problem.to_owned(),
        }
    }

    fn half_identity(&self, set: &str, unset: &str) -> ConfigError {
        ConfigError::HalfClientIdentity {
            set: self.names.var(set),
            unset: self.names.var(unset),
        }
    }
}

#[cfg(test)]
mod tests;
