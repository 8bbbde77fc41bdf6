//! Propeller's three services and the env contract each reads: the
//! connection's `<P>_MQTT_*` and credentials (read by
//! [`propeller_mqtt::env`]), the channel, and the service's own settings.

use std::fmt;

use propeller_mqtt::env::{EnvConfig, Settings};
use propeller_mqtt::{ConfigError, Options};

use crate::topic;

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

/// Variables every service reads beyond the connection's: the channel
/// (`TENANT_ID` is newer upstream's name for `DOMAIN_ID`) and the log filter.
const COMMON: [&str; 4] = ["DOMAIN_ID", "TENANT_ID", "CHANNEL_ID", "LOG_LEVEL"];

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
    /// beyond connecting. Declared to the env front end, so that a typo of
    /// any other `<P>_*` variable is reported.
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
                "POSTGRES_SSLROOTCERT",
                "POSTGRES_SSLCERT",
                "POSTGRES_SSLKEY",
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

    /// Every variable this service reads beyond the connection's (which
    /// [`propeller_mqtt::env::VARIABLES`] lists): the channel, the log
    /// filter and its [`settings`](Service::settings), after the prefix.
    pub fn own_variables(self) -> Vec<&'static str> {
        COMMON.iter().chain(self.settings()).copied().collect()
    }

    /// The binary's name, e.g. `proplet`.
    pub fn name(self) -> &'static str {
        match self {
            Service::Manager => "manager",
            Service::Proplet => "proplet",
            Service::Proxy => "proxy",
        }
    }

    /// The full name of one of this service's variables, e.g. `var("CLIENT_ID")`.
    pub fn var(self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix())
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
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

    /// Reads `<P>_DOMAIN_ID` (or `<P>_TENANT_ID`) and `<P>_CHANNEL_ID`.
    fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let domain_id = match (settings.get("DOMAIN_ID"), settings.get("TENANT_ID")) {
            (Some(domain), Some(tenant)) if domain != tenant => {
                return Err(ConfigError::InvalidSecret {
                    var: settings.var("DOMAIN_ID"),
                    problem: format!(
                        "it differs from {}, its newer name: set only one",
                        settings.var("TENANT_ID")
                    ),
                })
            }
            (Some(id), _) | (None, Some(id)) => id.to_owned(),
            (None, None) => settings
                .required("DOMAIN_ID", "set it to the Magistrala domain id")?
                .to_owned(),
        };
        let channel_id = settings
            .required("CHANNEL_ID", "set it to the Magistrala channel id")?
            .to_owned();
        for (suffix, value) in [("DOMAIN_ID", &domain_id), ("CHANNEL_ID", &channel_id)] {
            if value.contains(['/', '+', '#']) {
                return Err(ConfigError::Invalid {
                    var: settings.var(suffix),
                    value: value.clone(),
                    problem: "topic ids cannot contain '/', '+' or '#'".to_owned(),
                });
            }
        }
        Ok(Channel {
            domain_id,
            channel_id,
        })
    }
}

/// Everything a service reads from its environment, parsed and checked.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Whose variables these are.
    pub service: Service,
    /// The connection.
    pub mqtt: Options,
    /// The topic base.
    pub channel: Channel,
    /// The service's own variables ([`Service::settings`]).
    pub settings: Settings,
    /// `<P>_*` variables that were set but that nothing reads: typos, or
    /// settings of a newer version, to warn about.
    pub unknown: Vec<String>,
    /// A `tracing` filter, e.g. `info` or `propeller_mqtt=debug`.
    pub log_level: String,
}

impl ServiceConfig {
    /// Reads `service`'s variables from any set of name/value pairs.
    ///
    /// # Errors
    ///
    /// The first variable that is missing or invalid, see [`ConfigError`].
    pub fn from_vars<I, K, V>(service: Service, vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let own = service.own_variables();
        let EnvConfig {
            options,
            settings,
            unknown,
        } = EnvConfig::from_vars(service.prefix(), &own, vars)?;
        let channel = Channel::from_settings(&settings)?;
        Ok(Self {
            service,
            mqtt: options,
            channel,
            log_level: settings.get("LOG_LEVEL").unwrap_or("info").to_owned(),
            settings,
            unknown,
        })
    }

    /// The full topics this service subscribes to.
    pub fn topics(&self) -> Vec<String> {
        self.service
            .topics()
            .iter()
            .map(|suffix| self.channel.topic(suffix))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = [
            ("PROPLET_CLIENT_ID", "proplet-1"),
            ("PROPLET_CLIENT_KEY", "s3cret-key"),
            ("PROPLET_DOMAIN_ID", "dom"),
            ("PROPLET_CHANNEL_ID", "chan"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            vars.retain(|(name, _)| name != k);
            vars.push((k.to_string(), v.to_string()));
        }
        vars
    }

    fn error(extra: &[(&str, &str)]) -> String {
        ServiceConfig::from_vars(Service::Proplet, vars(extra))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn topics_live_under_the_channel() {
        let config = ServiceConfig::from_vars(Service::Proplet, vars(&[])).unwrap();
        assert_eq!(
            config.channel.topic("control/manager/start"),
            "m/dom/c/chan/control/manager/start"
        );
        assert_eq!(config.topics().len(), Service::Proplet.topics().len());
        assert_eq!(config.log_level, "info");
        assert_eq!(config.mqtt.names.var("MQTT_QOS"), "PROPLET_MQTT_QOS");
    }

    #[test]
    fn tenant_id_is_the_newer_name_of_domain_id() {
        let mut env = vars(&[]);
        env.retain(|(k, _)| k != "PROPLET_DOMAIN_ID");
        env.push(("PROPLET_TENANT_ID".into(), "t".into()));
        let config = ServiceConfig::from_vars(Service::Proplet, env).unwrap();
        assert_eq!(config.channel.domain_id, "t");
        let conflict = error(&[("PROPLET_TENANT_ID", "other")]);
        assert!(
            conflict.contains("PROPLET_DOMAIN_ID") && conflict.contains("PROPLET_TENANT_ID"),
            "{conflict}"
        );
    }

    #[test]
    fn the_channel_is_required_and_checked() {
        for var in ["PROPLET_DOMAIN_ID", "PROPLET_CHANNEL_ID"] {
            let mut env = vars(&[]);
            env.retain(|(k, _)| k != var);
            let message = ServiceConfig::from_vars(Service::Proplet, env)
                .unwrap_err()
                .to_string();
            assert!(
                message.starts_with(&format!("{var} is not set: set it to the Magistrala")),
                "{message}"
            );
        }
        let message = error(&[("PROPLET_DOMAIN_ID", "a/b")]);
        assert!(
            message.starts_with("PROPLET_DOMAIN_ID=\"a/b\" is not valid: ")
                && message.contains("cannot contain"),
            "{message}"
        );
    }

    #[test]
    fn channel_suffix_is_the_inverse_of_topic() {
        let channel = Channel {
            domain_id: "d".into(),
            channel_id: "c".into(),
        };
        let topic = channel.topic("control/proplet/alive");
        assert_eq!(channel.suffix(&topic), Some("control/proplet/alive"));
        assert_eq!(channel.suffix("m/d/c/other/control/proplet/alive"), None);
        assert_eq!(channel.suffix("m/d/c/c"), None);
    }

    #[test]
    fn each_service_reads_only_its_own_settings() {
        let config = ServiceConfig::from_vars(
            Service::Proplet,
            vars(&[
                ("PROPLET_LIVELINESS_INTERVAL", "10s"),
                ("PROPLET_LOG_LEVEL", "debug"),
            ]),
        )
        .unwrap();
        assert!(config.unknown.is_empty(), "{:?}", config.unknown);
        assert_eq!(config.log_level, "debug");
        let manager = ServiceConfig::from_vars(
            Service::Manager,
            [
                ("MANAGER_CLIENT_ID", "m"),
                ("MANAGER_CLIENT_KEY", "k"),
                ("MANAGER_DOMAIN_ID", "d"),
                ("MANAGER_CHANNEL_ID", "c"),
                ("MANAGER_CHUNK_SIZE", "1"),
            ],
        )
        .unwrap();
        assert_eq!(manager.unknown, ["MANAGER_CHUNK_SIZE"]);
    }
}
