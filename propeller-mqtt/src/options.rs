//! What a connection needs, however it was configured: built in code with
//! [`Options::new`] and its setters, or read from `<PREFIX>_MQTT_*` variables
//! by [`crate::env`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use rumqttc::QoS;

use crate::env::{redacted, BrokerAddress, Transport};
use crate::tls::TlsSetup;
use crate::ConfigError;

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

/// How the connection is secured, decided once from the address and TLS settings.
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

/// Where the TLS material is, as paths: the files are read (and re-read at
/// every reload) by [`crate::tls`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM bundle or directory of CA certificates; `None` means the OS trust store.
    pub ca: Option<PathBuf>,
    /// Our certificate and key, for mTLS.
    pub identity: Option<IdentityFiles>,
    /// The name to verify the broker's certificate against, instead of the address host.
    pub server_name: Option<String>,
    /// Accept any broker certificate. Upstream's escape hatch; warned about at every connect.
    pub insecure_skip_verify: bool,
    /// The application protocols offered in the handshake (ALPN), in order
    /// of preference; empty offers none.
    pub alpn: Vec<String>,
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

/// A message the broker publishes on our behalf when the connection dies
/// without a DISCONNECT; sent at the configured QoS, not retained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWill {
    /// The full topic.
    pub topic: String,
    /// The payload.
    pub payload: bytes::Bytes,
}

/// An HTTP proxy that opens a tunnel to the broker (`CONNECT host:port`):
/// `http://[user:password@]host:port`. Every scheme goes through it; TLS and
/// WebSocket run inside the tunnel, end to end with the broker.
///
/// The user and password are secrets: `Debug` and `Display` never show them.
///
/// ```
/// use propeller_mqtt::HttpProxy;
///
/// let proxy = HttpProxy::parse("http://ops:s%40fe@proxy.lan:3128")?;
/// assert_eq!((proxy.host.as_str(), proxy.port), ("proxy.lan", 3128));
/// assert_eq!(proxy.to_string(), "http://<redacted>@proxy.lan:3128");
/// # Ok::<(), String>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct HttpProxy {
    /// Host name or IP address, IPv6 without brackets.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Sent as `Proxy-Authorization: Basic`.
    pub credentials: Option<ProxyCredentials>,
}

/// The user and password of an [`HttpProxy`], percent-decoded.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyCredentials {
    /// The user name.
    pub user: Secret,
    /// The password.
    pub password: Secret,
}

impl HttpProxy {
    /// A proxy without credentials.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Self {
            host: host.into(),
            port,
            credentials: None,
        }
    }

    /// Parses `http://[user[:password]@]host:port`, with `%`-escapes in the
    /// user and password.
    ///
    /// # Errors
    ///
    /// The problem in words, with the accepted form; never the credentials.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let Some((scheme, rest)) = text.split_once("://") else {
            return Err("missing scheme: write http://host:port".to_owned());
        };
        match scheme.to_ascii_lowercase().as_str() {
            "http" => {}
            "https" => {
                return Err("a TLS connection to the proxy itself is not supported: write http://host:port (TLS to the broker still runs end to end inside the tunnel)".to_owned())
            }
            _ => {
                return Err(format!(
                    "unknown scheme {:?}: only HTTP proxies (CONNECT) are supported, write http://host:port",
                    scheme.chars().take(16).collect::<String>()
                ))
            }
        }
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (userinfo, authority) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        if authority.contains(['/', '?', '#']) {
            return Err("write only http://[user:password@]host:port, without a path".to_owned());
        }
        let (host, port) = crate::env::split_host_port(authority)?;
        if host.is_empty() {
            return Err("the host is empty: write http://host:port".to_owned());
        }
        crate::env::check_host(host)?;
        let port = match port {
            None => {
                return Err(
                    "the port is missing: write http://host:port (proxies often listen on 3128 or 8080)"
                        .to_owned(),
                )
            }
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port != 0 => port,
                _ => return Err(format!("port {port:?} is not a number from 1 to 65535")),
            },
        };
        let credentials = match userinfo {
            None => None,
            Some(userinfo) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let user = percent_decode(user)?;
                if user.is_empty() {
                    return Err(
                        "the user before '@' is empty: write http://user:password@host:port"
                            .to_owned(),
                    );
                }
                Some(ProxyCredentials {
                    user: Secret::new(user),
                    password: Secret::new(percent_decode(password)?),
                })
            }
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            credentials,
        })
    }

    /// `host:port`, IPv6 in brackets: what a socket address or a `Host` header wants.
    pub fn authority(&self) -> String {
        authority(&self.host, self.port)
    }
}

/// `host:port`, with an IPv6 host in brackets.
pub(crate) fn authority(host: &str, port: u16) -> String {
    match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    }
}

/// Decodes `%XX` escapes (of the user and password in a proxy URL).
fn percent_decode(text: &str) -> Result<String, String> {
    let bad = || {
        "the user or password has a '%' that is not followed by two hex digits: write %25 for '%'"
            .to_owned()
    };
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).ok_or_else(bad)?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| "the user or password is not UTF-8 once %-decoded".to_owned())
}

impl fmt::Display for HttpProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let credentials = match self.credentials {
            Some(_) => "<redacted>@",
            None => "",
        };
        write!(f, "http://{credentials}{}", self.authority())
    }
}

impl fmt::Debug for HttpProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HttpProxy({self})")
    }
}

impl fmt::Debug for ProxyCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProxyCredentials(***)")
    }
}

/// The names that errors, warnings and advice give each setting: the
/// variables it was read from, such as `SENSOR_MQTT_TLS_CA_CERT`. Options
/// built in code use the bare names (`MQTT_TLS_CA_CERT`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Names {
    /// Names under `prefix`, such as `SENSOR_`.
    pub fn prefixed(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// The prefix, such as `SENSOR_`; empty for options built in code.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full name of a setting, e.g. `var("MQTT_TLS_CA_CERT")`.
    pub fn var(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }
}

/// Default QoS of publishes and subscriptions: each message exactly once.
pub const DEFAULT_QOS: QoS = QoS::ExactlyOnce;
/// Default limit of one connection attempt (TCP, TLS and CONNACK).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default MQTT keep-alive.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Default largest packet, both directions.
pub const DEFAULT_MAX_PACKET_SIZE: usize = 10 << 20;
/// Default number of messages that may wait for the broker's acknowledgement.
pub const DEFAULT_OUTBOX_LIMIT: usize = 10_000;
/// The default shortest delay between connection attempts.
pub const DEFAULT_RECONNECT_MIN: Duration = Duration::from_secs(1);
/// The default longest delay between connection attempts.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(60);
/// MQTT's remaining-length field cannot describe a larger packet.
pub const MQTT_MAX_PACKET_SIZE: usize = 268_435_455;

/// Everything a [`Client`](crate::Client) needs: the brokers, who we are, how
/// the link is secured, and the limits of the session.
///
/// ```
/// use propeller_mqtt::{Options, Secret, TlsSettings};
///
/// let options = Options::new("ssl://broker:8883", "sensor-7", Secret::new("key"))?
///     .with_tls(TlsSettings { ca: Some("ca.crt".into()), ..Default::default() })
///     .with_keep_alive(std::time::Duration::from_secs(10));
/// assert_eq!(options.mode(), propeller_mqtt::Mode::Tls);
/// # Ok::<(), propeller_mqtt::ConfigError>(())
/// ```
#[derive(Debug, Clone)]
pub struct Options {
    /// The brokers (or edges), tried in turn; all use the same transport.
    pub brokers: Vec<BrokerAddress>,
    /// `None` for plain MQTT.
    pub tls: Option<TlsSettings>,
    /// MQTT client id, also sent as the username.
    pub client_id: String,
    /// MQTT password (Magistrala's client secret).
    pub client_key: Secret,
    /// QoS of our publishes and subscriptions.
    pub qos: QoS,
    /// How long one connection attempt (TCP, TLS and CONNACK) may take.
    pub connect_timeout: Duration,
    /// MQTT keep-alive interval: whole seconds, 1 to 65535.
    pub keep_alive: Duration,
    /// Largest MQTT packet, both directions.
    pub max_packet_size: usize,
    /// How many messages may wait for the broker's acknowledgement.
    pub outbox_limit: usize,
    /// What the broker publishes for us if we vanish without DISCONNECT.
    pub last_will: Option<LastWill>,
    /// What messages call each setting.
    pub names: Names,
    /// Connect without a clean session: the broker keeps our subscriptions
    /// and queues QoS 1/2 messages for us while we are away.
    pub persistent_session: bool,
    /// The shortest and the longest delay between connection attempts.
    pub reconnect_min: Duration,
    /// See `reconnect_min`.
    pub reconnect_max: Duration,
    /// The HTTP proxy every connection goes through; `None` connects directly.
    pub proxy: Option<HttpProxy>,
    /// Where QoS 1/2 messages are kept until the broker acknowledges them,
    /// so that they survive the process; `None` keeps them in memory only.
    /// Created when missing, and locked: one process per directory.
    pub outbox_dir: Option<PathBuf>,
}

impl Options {
    /// Options for `address` (one `scheme://host[:port]`, or a comma-separated
    /// list of them) with the defaults above and no TLS settings: an `ssl://`
    /// address verifies the broker against the OS trust store.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] for an address that does not parse, or a
    /// list that mixes plain and TLS.
    pub fn new(
        address: &str,
        client_id: impl Into<String>,
        client_key: Secret,
    ) -> Result<Self, ConfigError> {
        let names = Names::default();
        let brokers = brokers(address, &names)?;
        let tls = match brokers[0].transport {
            Transport::Tcp => None,
            Transport::Tls => Some(TlsSettings::default()),
        };
        Ok(Self {
            brokers,
            tls,
            client_id: client_id.into(),
            client_key,
            qos: DEFAULT_QOS,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            keep_alive: DEFAULT_KEEP_ALIVE,
            max_packet_size: DEFAULT_MAX_PACKET_SIZE,
            outbox_limit: DEFAULT_OUTBOX_LIMIT,
            last_will: None,
            names,
            persistent_session: false,
            reconnect_min: DEFAULT_RECONNECT_MIN,
            reconnect_max: DEFAULT_RECONNECT_MAX,
            proxy: None,
            outbox_dir: None,
        })
    }

    /// TLS settings for an `ssl://` address.
    pub fn with_tls(mut self, tls: TlsSettings) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The QoS of publishes and subscriptions.
    pub fn with_qos(mut self, qos: QoS) -> Self {
        self.qos = qos;
        self
    }

    /// The limit of one connection attempt.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The keep-alive interval.
    pub fn with_keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    /// The largest packet, both directions.
    pub fn with_max_packet_size(mut self, bytes: usize) -> Self {
        self.max_packet_size = bytes;
        self
    }

    /// How many messages may wait for the broker's acknowledgement.
    pub fn with_outbox_limit(mut self, messages: usize) -> Self {
        self.outbox_limit = messages;
        self
    }

    /// The last will.
    pub fn with_last_will(mut self, will: LastWill) -> Self {
        self.last_will = Some(will);
        self
    }

    /// What messages call each setting.
    pub fn with_names(mut self, names: Names) -> Self {
        self.names = names;
        self
    }

    /// Ask the broker to keep our session (MQTT clean session false).
    pub fn with_persistent_session(mut self, persistent: bool) -> Self {
        self.persistent_session = persistent;
        self
    }

    /// The shortest and the longest delay between connection attempts.
    pub fn with_reconnect_delays(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min = min;
        self.reconnect_max = max;
        self
    }

    /// Connect through an HTTP proxy (`CONNECT`), whatever the scheme.
    pub fn with_proxy(mut self, proxy: HttpProxy) -> Self {
        self.proxy = Some(proxy);
        self
    }

    /// Keep QoS 1/2 messages in `dir` until the broker acknowledges them,
    /// and send those a previous process left there after the first CONNACK
    /// (see the README's "The outbox on disk").
    pub fn with_outbox_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.outbox_dir = Some(dir.into());
        self
    }

    /// The name sent as SNI and verified in the broker's certificate for
    /// `broker`: `TlsSettings::server_name` when set, else the address host.
    pub fn tls_server_name(&self, broker: &BrokerAddress) -> String {
        self.tls
            .as_ref()
            .and_then(|tls| tls.server_name.clone())
            .unwrap_or_else(|| broker.host.clone())
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

    /// Reads and checks the TLS files, as [`Client::start`](crate::Client::start)
    /// does; `None` for plain MQTT.
    ///
    /// # Errors
    ///
    /// See [`TlsSetup::load`].
    pub fn load_tls(&self) -> Result<Option<TlsSetup>, ConfigError> {
        self.tls
            .as_ref()
            .map(|tls| TlsSetup::load(tls, &self.names, &self.client_key))
            .transpose()
    }

    /// Checks what the setters cannot: limits, and TLS settings that would
    /// be ignored on a plain address. [`Client::start`](crate::Client::start)
    /// calls it.
    ///
    /// # Errors
    ///
    /// The first setting out of range, named by [`Options::names`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |suffix: &str, value: String, problem: &str| ConfigError::Invalid {
            var: self.names.var(suffix),
            value,
            problem: problem.to_owned(),
        };
        let keep_alive = self.keep_alive;
        // MQTT carries whole seconds in 16 bits, and rumqttc panics below one second.
        if keep_alive.subsec_nanos() != 0
            || keep_alive.as_secs() == 0
            || keep_alive.as_secs() > u64::from(u16::MAX)
        {
            return Err(invalid(
                "MQTT_KEEP_ALIVE",
                format!("{keep_alive:?}"),
                KEEP_ALIVE_RANGE,
            ));
        }
        if !(128..=MQTT_MAX_PACKET_SIZE).contains(&self.max_packet_size) {
            return Err(invalid(
                "MQTT_MAX_PACKET_SIZE",
                self.max_packet_size.to_string(),
                &max_packet_range(),
            ));
        }
        if self.outbox_limit == 0 {
            return Err(invalid("MQTT_OUTBOX_LIMIT", "0".to_owned(), OUTBOX_RANGE));
        }
        if self
            .outbox_dir
            .as_ref()
            .is_some_and(|dir| dir.as_os_str().is_empty())
        {
            return Err(invalid(
                "MQTT_OUTBOX_DIR",
                String::new(),
                "write the path of a directory, such as /var/lib/sensor/outbox",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(invalid(
                "MQTT_TIMEOUT",
                "0s".to_owned(),
                "it must be more than zero, such as 10s or 500ms",
            ));
        }
        if self.reconnect_min.is_zero() {
            return Err(invalid(
                "MQTT_RECONNECT_MIN",
                "0s".to_owned(),
                "it must be more than zero, such as 1s or 500ms",
            ));
        }
        if self.reconnect_min > self.reconnect_max {
            return Err(invalid(
                "MQTT_RECONNECT_MAX",
                format!("{:?}", self.reconnect_max),
                &format!(
                    "it must be at least {} ({:?}): raise it, or lower that",
                    self.names.var("MQTT_RECONNECT_MIN"),
                    self.reconnect_min
                ),
            ));
        }
        if self.brokers.is_empty() {
            return Err(ConfigError::Missing {
                var: self.names.var("MQTT_ADDRESS"),
                fix: "name at least one broker",
            });
        }
        if let Some(proxy) = &self.proxy {
            if proxy.host.is_empty() || proxy.port == 0 {
                return Err(invalid(
                    "MQTT_PROXY",
                    proxy.to_string(),
                    "write http://[user:password@]host:port",
                ));
            }
        }
        if let Some(tls) = &self.tls {
            if let Err(problem) = check_alpn(&tls.alpn) {
                return Err(invalid("MQTT_TLS_ALPN", tls.alpn.join(","), &problem));
            }
        }
        if self.tls.is_some() && self.brokers[0].transport == Transport::Tcp {
            return Err(ConfigError::TlsWithPlainAddress {
                vars: "TLS settings are".to_owned(),
                address_var: self.names.var("MQTT_ADDRESS"),
                address: self.brokers[0].to_string(),
            });
        }
        Ok(())
    }
}

pub(crate) const KEEP_ALIVE_RANGE: &str = "keep-alive must be whole seconds from 1s to 65535s";
pub(crate) const OUTBOX_RANGE: &str = "write a number of messages, at least 1, such as 10000";

/// ALPN protocol ids: 1 to 255 bytes each (RFC 7301), visible ASCII without
/// commas (the list separator).
pub(crate) fn check_alpn(protocols: &[String]) -> Result<(), String> {
    for protocol in protocols {
        if protocol.is_empty() || protocol.len() > 255 {
            return Err("each protocol must be 1 to 255 characters: write a comma-separated list such as mqtt or x-amzn-mqtt-ca,mqtt".to_owned());
        }
        if !protocol.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
            return Err("protocols are visible ASCII without spaces: write a comma-separated list such as mqtt or x-amzn-mqtt-ca,mqtt".to_owned());
        }
    }
    Ok(())
}

pub(crate) fn max_packet_range() -> String {
    format!("the size must be from 128 bytes to {MQTT_MAX_PACKET_SIZE} (MQTT's limit)")
}

/// One address, or a comma-separated list for a cluster without a load
/// balancer. Mixing plain and TLS would make the mode depend on which
/// broker is up, so every address must use the same transport.
pub(crate) fn brokers(text: &str, names: &Names) -> Result<Vec<BrokerAddress>, ConfigError> {
    let invalid = |problem: &str| ConfigError::Invalid {
        var: names.var("MQTT_ADDRESS"),
        value: redacted(text),
        problem: problem.to_owned(),
    };
    let brokers = text
        .split(',')
        .map(|one| match one.trim() {
            "" => Err(invalid(
                "the list has an empty entry: separate addresses with single commas",
            )),
            one => BrokerAddress::parse(one).map_err(|problem| invalid(&problem)),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if brokers.iter().any(|b| b.transport != brokers[0].transport) {
        return Err(invalid(
            "the list mixes plain (tcp://, ws://) and TLS (ssl://, wss://) addresses: use one mode for every broker",
        ));
    }
    Ok(brokers)
}
