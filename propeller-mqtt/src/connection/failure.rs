//! Why a connection attempt failed: the typed cause (rustls' and the
//! operating system's own errors, kept whole), a stable class for metrics,
//! and, apart from both, advice an operator can act on.
//!
//! TLS alerts, resets and refusals arrive nested inside several layers of
//! `io::Error`; [`find`] digs the real cause out. The layers that belong to
//! rumqttc are peeled by the adapter (`session.rs`), which builds a
//! [`Failure`] from rumqttc's error; everything here is independent of it.

use std::error::Error as StdError;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::{AlertDescription, CertificateError};

use crate::{Mode, Names};

/// A classified connection failure. Not fatal: the client retries with backoff.
///
/// The variant says what went wrong in the operator's terms; its payload, and
/// [`std::error::Error::source`], keep the cause as rustls or the operating
/// system reported it. [`Failure::fix`] says what to do about it, and
/// [`Failure::class`] names it for metrics.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Failure {
    /// The broker's certificate does not chain to our CA.
    BrokerUntrusted,
    /// The broker's certificate does not name the host we verify against.
    BrokerNameMismatch {
        /// The name we checked.
        expected: String,
        /// The names the certificate has (empty when rustls did not say).
        presented: Vec<String>,
    },
    /// The broker's certificate has expired.
    BrokerCertificateExpired,
    /// The broker's certificate is unusable for another reason, as rustls
    /// put it.
    BrokerCertificateInvalid(CertificateError),
    /// The broker wants a client certificate and we sent none.
    ClientCertificateRequired,
    /// The broker refused our client certificate: with the TLS alert it
    /// sent, or `None` when it closed right after the handshake without one
    /// (what nginx does).
    ClientCertificateRejected(Option<AlertDescription>),
    /// The broker says our client certificate has expired.
    ClientCertificateExpired,
    /// The TLS handshake failed for another reason.
    Tls(rustls::Error),
    /// The server closed the connection before answering CONNECT, after a
    /// TLS handshake in which we sent a client certificate.
    ClosedBeforeConnAck,
    /// The same over plain MQTT: what an `AUTH=x509` edge does to every
    /// plain connection.
    ClosedBeforeConnAckPlain,
    /// The same over TLS without a client certificate: the edge may require
    /// one, or a router sent us elsewhere.
    ClosedBeforeConnAckWithoutCertificate,
    /// The broker refused our username and password.
    NotAuthorized,
    /// The broker refused the connection for another reason.
    Refused(String),
    /// Nothing answered at the address, or it cannot be resolved.
    Unreachable(IoCause),
    /// The attempt took longer than the connect timeout.
    Timeout,
    /// An established connection was lost.
    ConnectionLost(ConnectionLoss),
    /// The HTTP proxy of `<P>_MQTT_PROXY` cannot be reached.
    ProxyUnreachable(String),
    /// The HTTP proxy wants credentials we did not send, or refused ours:
    /// 407, or 401 (tinyproxy 1.11's answer to wrong ones).
    ProxyAuthenticationRequired {
        /// The status code.
        status: u16,
        /// Whether we sent credentials.
        sent: bool,
    },
    /// The HTTP proxy refused the tunnel to the broker (403 by its rules,
    /// 5xx when it cannot reach the broker itself).
    ProxyRefused {
        /// The status code.
        status: u16,
        /// The proxy's reason phrase.
        reason: String,
        /// The broker's `host:port` we asked for.
        target: String,
    },
    /// The proxy's answer to CONNECT is not HTTP, too long, cut short or late.
    ProxyProtocol(String),
    /// The server answered the WebSocket upgrade with an HTTP error.
    WebSocketRefused {
        /// The status code, such as 403.
        status: u16,
        /// Its standard reason phrase.
        reason: String,
        /// The path we asked for.
        path: String,
        /// Whether we presented a client certificate (mTLS).
        client_certificate: bool,
    },
    /// The server does not speak MQTT over WebSocket at that address.
    WebSocketProtocol(String),
    /// The server accepts none of the application protocols we offered (ALPN).
    NoApplicationProtocol {
        /// What we offered (`<P>_MQTT_TLS_ALPN`).
        offered: Vec<String>,
    },
    /// The server closed the connection in the middle of the TLS handshake,
    /// without an alert: what a TLS router (SNI or ALPN) does when it routes
    /// us to a backend that closes, or a port that is not TLS.
    ClosedDuringTlsHandshake {
        /// The SNI we sent.
        server_name: String,
        /// The ALPN protocols we offered.
        alpn: Vec<String>,
        /// Whether we had a client certificate to present.
        client_certificate: bool,
    },
}

/// A connection the broker closes sooner than this after CONNACK does not
/// reset the backoff, and from the second in a row is reported as
/// [`ConnectionLoss::TakenOver`].
pub(crate) const SHORT_LIVED: Duration = Duration::from_secs(5);

/// Why an established connection ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ConnectionLoss {
    /// The broker closed it: end of stream, or a reset.
    Closed,
    /// No answer to the keep-alive ping: the link is dead or half-open.
    KeepAliveTimeout,
    /// A write to the broker did not finish within the connect timeout.
    WriteTimeout,
    /// Another I/O error.
    Io(IoCause),
    /// The broker broke the protocol (an acknowledgement for nothing, a
    /// packet that cannot be decoded, ...), in the MQTT library's words.
    Protocol(String),
    /// The broker closed the connection shortly after accepting it, `times`
    /// times in a row: what a broker does to the older of two clients with
    /// one client id (MQTT 3.1.1 gives no reason).
    TakenOver {
        /// Our client id (not secret).
        client_id: String,
        /// Connections in a row that ended this way.
        times: u32,
    },
}

/// An I/O error as the operating system reported it, shared so that a
/// [`Failure`] stays cheap to clone. Two are equal when their kinds are:
/// the text of an OS error is not part of its identity.
#[derive(Debug, Clone)]
pub struct IoCause(Arc<io::Error>);

impl IoCause {
    /// What kind of error it is.
    pub fn kind(&self) -> io::ErrorKind {
        self.0.kind()
    }

    /// The error itself.
    pub fn get(&self) -> &io::Error {
        &self.0
    }
}

impl From<io::Error> for IoCause {
    fn from(error: io::Error) -> Self {
        Self(Arc::new(error))
    }
}

impl PartialEq for IoCause {
    fn eq(&self, other: &Self) -> bool {
        self.kind() == other.kind()
    }
}

impl Eq for IoCause {}

impl fmt::Display for IoCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind() {
            // The OS says "Connection refused (os error 111)"; say what it means.
            io::ErrorKind::ConnectionRefused => {
                f.write_str("connection refused: nothing listens at that address")
            }
            _ => self.0.fmt(f),
        }
    }
}

impl Failure {
    /// The TLS failure inside an I/O error, if there is one.
    pub fn from_io(error: &io::Error, mode: Mode) -> Option<Self> {
        if let Some(failure) = Self::transport(error, mode) {
            return Some(failure);
        }
        find::<rustls::Error>(error, no_hidden_causes).map(|tls| Self::from_tls(tls, mode))
    }

    /// Classifies an I/O error met before the broker answered CONNECT (while
    /// connecting, in the TLS handshake, or waiting for CONNACK), as the
    /// client does.
    pub fn from_connect_error(error: io::Error, mode: Mode) -> Self {
        Self::from_io_error(error, false, mode)
    }

    /// Classifies an I/O error; `connected` says whether a CONNACK had been
    /// received on this connection, which is what tells a refusal from a loss.
    pub(crate) fn from_io_error(error: io::Error, connected: bool, mode: Mode) -> Self {
        if let Some(tls) = Self::from_io(&error, mode) {
            return tls;
        }
        use io::ErrorKind::*;
        match error.kind() {
            UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => {
                Self::closed(connected, mode)
            }
            TimedOut => Failure::Timeout,
            ConnectionRefused => Failure::Unreachable(error.into()),
            _ if connected => Failure::ConnectionLost(ConnectionLoss::Io(error.into())),
            _ => Failure::Unreachable(error.into()),
        }
    }

    /// The stream ended: before CONNACK, a refusal the server did not explain;
    /// after, a lost connection.
    pub(crate) fn closed(connected: bool, mode: Mode) -> Self {
        match connected {
            false => Self::closed_before_connack(mode),
            true => Failure::ConnectionLost(ConnectionLoss::Closed),
        }
    }

    /// The server closed the connection before answering CONNECT, explained
    /// by `mode`: whether TLS ran, and whether we sent a client certificate.
    pub fn closed_before_connack(mode: Mode) -> Self {
        match mode {
            Mode::Plain => Failure::ClosedBeforeConnAckPlain,
            Mode::Tls => Failure::ClosedBeforeConnAckWithoutCertificate,
            Mode::MutualTls => Failure::ClosedBeforeConnAck,
        }
    }

    /// Classifies a rustls error; `mode` helps read ambiguous alerts.
    pub(crate) fn from_tls(error: &rustls::Error, mode: Mode) -> Self {
        match error {
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer => Failure::BrokerUntrusted,
                CertificateError::NotValidForName => Failure::BrokerNameMismatch {
                    expected: String::new(),
                    presented: Vec::new(),
                },
                CertificateError::NotValidForNameContext {
                    expected,
                    presented,
                } => Failure::BrokerNameMismatch {
                    expected: expected.to_str().into_owned(),
                    presented: presented.iter().map(|name| plain_name(name)).collect(),
                },
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Failure::BrokerCertificateExpired
                }
                other => Failure::BrokerCertificateInvalid(other.clone()),
            },
            rustls::Error::AlertReceived(alert) => match alert {
                AlertDescription::CertificateRequired => Failure::ClientCertificateRequired,
                // TLS 1.2 servers say handshake_failure when a required certificate is missing.
                AlertDescription::HandshakeFailure if mode != Mode::MutualTls => {
                    Failure::ClientCertificateRequired
                }
                AlertDescription::CertificateExpired if mode == Mode::MutualTls => {
                    Failure::ClientCertificateExpired
                }
                AlertDescription::UnknownCA
                | AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateRevoked
                | AlertDescription::AccessDenied
                | AlertDescription::DecryptError
                | AlertDescription::HandshakeFailure => {
                    Failure::ClientCertificateRejected(Some(*alert))
                }
                _ => Failure::Tls(error.clone()),
            },
            other => Failure::Tls(other.clone()),
        }
    }

    /// A short name for the kind of failure that stays the same across
    /// releases, for metrics labels and log queries: `broker-untrusted`,
    /// `closed-before-connack`, `unreachable`, ...
    pub fn class(&self) -> &'static str {
        match self {
            Failure::BrokerUntrusted => "broker-untrusted",
            Failure::BrokerNameMismatch { .. } => "broker-name-mismatch",
            Failure::BrokerCertificateExpired => "broker-certificate-expired",
            Failure::BrokerCertificateInvalid(_) => "broker-certificate-invalid",
            Failure::ClientCertificateRequired => "client-certificate-required",
            Failure::ClientCertificateRejected(_) => "client-certificate-rejected",
            Failure::ClientCertificateExpired => "client-certificate-expired",
            Failure::Tls(_) => "tls",
            Failure::ClosedBeforeConnAck
            | Failure::ClosedBeforeConnAckPlain
            | Failure::ClosedBeforeConnAckWithoutCertificate => "closed-before-connack",
            Failure::NotAuthorized => "not-authorized",
            Failure::Refused(_) => "refused",
            Failure::Unreachable(_) => "unreachable",
            Failure::Timeout => "timeout",
            Failure::ConnectionLost(ConnectionLoss::TakenOver { .. }) => "taken-over",
            Failure::ConnectionLost(_) => "connection-lost",
            Failure::ProxyUnreachable(_) => "proxy-unreachable",
            Failure::ProxyAuthenticationRequired { .. } => "proxy-authentication-required",
            Failure::ProxyRefused { .. } => "proxy-refused",
            Failure::ProxyProtocol(_) => "proxy-protocol",
            Failure::WebSocketRefused { .. } => "websocket-refused",
            Failure::WebSocketProtocol(_) => "websocket-protocol",
            Failure::NoApplicationProtocol { .. } => "no-application-protocol",
            Failure::ClosedDuringTlsHandshake { .. } => "closed-during-tls-handshake",
        }
    }

    /// Whether TLS failed: a certificate on either side, or the handshake.
    pub fn is_tls(&self) -> bool {
        self.is_broker_certificate()
            || self.is_client_certificate()
            || matches!(
                self,
                Failure::Tls(_)
                    | Failure::NoApplicationProtocol { .. }
                    | Failure::ClosedDuringTlsHandshake { .. }
            )
    }

    /// Whether the HTTP proxy of `<P>_MQTT_PROXY` is the problem.
    pub fn is_proxy(&self) -> bool {
        matches!(
            self,
            Failure::ProxyUnreachable(_)
                | Failure::ProxyAuthenticationRequired { .. }
                | Failure::ProxyRefused { .. }
                | Failure::ProxyProtocol(_)
        )
    }

    /// Whether the WebSocket upgrade is the problem.
    pub fn is_websocket(&self) -> bool {
        matches!(
            self,
            Failure::WebSocketRefused { .. } | Failure::WebSocketProtocol(_)
        )
    }

    /// Whether the broker's certificate is the problem (trust, name, expiry).
    pub fn is_broker_certificate(&self) -> bool {
        matches!(
            self,
            Failure::BrokerUntrusted
                | Failure::BrokerNameMismatch { .. }
                | Failure::BrokerCertificateExpired
                | Failure::BrokerCertificateInvalid(_)
        )
    }

    /// Whether our client certificate is the problem: missing, refused or expired.
    pub fn is_client_certificate(&self) -> bool {
        matches!(
            self,
            Failure::ClientCertificateRequired
                | Failure::ClientCertificateRejected(_)
                | Failure::ClientCertificateExpired
        )
    }

    /// Whether the broker refused our username and password.
    pub fn is_credentials(&self) -> bool {
        matches!(self, Failure::NotAuthorized)
    }

    /// Whether the network or the broker's availability is the problem rather
    /// than our settings: nothing answered, no answer in time, or a
    /// connection that was up was lost.
    pub fn is_network(&self) -> bool {
        matches!(
            self,
            Failure::Unreachable(_) | Failure::Timeout | Failure::ConnectionLost(_)
        )
    }

    /// Whether something took too long: the connection attempt, a write, or
    /// the answer to a keep-alive ping.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Failure::Timeout
                | Failure::ConnectionLost(
                    ConnectionLoss::KeepAliveTimeout | ConnectionLoss::WriteTimeout
                )
        )
    }

    /// What the operator can do about it, naming the settings as `names` does.
    pub fn fix(&self, names: &Names) -> String {
        let var = |suffix| names.var(suffix);
        match self {
            Failure::BrokerUntrusted => format!(
                "make {} the CA that signed the broker's certificate; a missing intermediate certificate on the broker gives the same error",
                var("MQTT_TLS_CA_CERT")
            ),
            Failure::BrokerNameMismatch { .. } => format!(
                "connect to a name the certificate has, or set {} to one of them",
                var("MQTT_TLS_SERVER_NAME")
            ),
            Failure::BrokerCertificateExpired => {
                "renew the broker's (edge's) certificate, and check this machine's clock".to_owned()
            }
            Failure::BrokerCertificateInvalid(_) | Failure::Tls(_) => {
                "check the broker's TLS setup and its logs".to_owned()
            }
            Failure::ClientCertificateRequired => format!(
                "this broker wants mTLS: set {} and {}",
                var("MQTT_TLS_CLIENT_CERT"),
                var("MQTT_TLS_CLIENT_KEY")
            ),
            Failure::ClientCertificateRejected(_) => format!(
                "use a client certificate signed by the CA the broker trusts; {} must not be expired",
                var("MQTT_TLS_CLIENT_CERT")
            ),
            Failure::ClientCertificateExpired => {
                format!("issue a new client certificate for {}", var("MQTT_TLS_CLIENT_CERT"))
            }
            Failure::ClosedBeforeConnAck => format!(
                "an mTLS edge drops the connection when {} does not end with the client certificate's CN; \
                 otherwise check the edge's and the broker's logs",
                var("CLIENT_KEY")
            ),
            Failure::ClosedBeforeConnAckPlain => format!(
                "an AUTH=x509 edge (Magistrala's nginx with client certificates) refuses plain connections: \
                 use an ssl:// address in {} with a client certificate ({} and {}); \
                 otherwise check the edge's and the broker's logs",
                var("MQTT_ADDRESS"),
                var("MQTT_TLS_CLIENT_CERT"),
                var("MQTT_TLS_CLIENT_KEY")
            ),
            Failure::ClosedBeforeConnAckWithoutCertificate => format!(
                "the edge may require a client certificate (set {} and {}), or a router \
                 (such as Traefik HostSNI) sent the connection elsewhere; check the edge's and the broker's logs",
                var("MQTT_TLS_CLIENT_CERT"),
                var("MQTT_TLS_CLIENT_KEY")
            ),
            Failure::NotAuthorized => format!(
                "check {} and {} against the Magistrala client",
                var("CLIENT_ID"),
                var("CLIENT_KEY")
            ),
            Failure::Refused(_) => "check the broker's logs".to_owned(),
            Failure::Unreachable(_) => format!(
                "check {} (host and port) and that the broker or edge is running",
                var("MQTT_ADDRESS")
            ),
            Failure::Timeout => format!(
                "check that the port speaks MQTT{}, or raise {} on a slow link",
                " (TLS ports need an ssl:// address)",
                var("MQTT_TIMEOUT")
            ),
            Failure::ConnectionLost(ConnectionLoss::TakenOver { .. }) => format!(
                "give every process its own {} (a copied .env, or an old instance still running \
                 after a rolling update); stop the other client; retrying with a growing delay",
                var("CLIENT_ID")
            ),
            Failure::ConnectionLost(_) => "reconnecting; check the network and the broker's logs if it repeats".to_owned(),
            Failure::ProxyUnreachable(_) => format!(
                "check the host and port of {} and that the proxy runs; unset it to connect directly",
                var("MQTT_PROXY")
            ),
            Failure::ProxyAuthenticationRequired { sent: false, .. } => format!(
                "put the proxy's user and password in {}: http://user:password@host:port (percent-encode ':', '@' and '%' in them)",
                var("MQTT_PROXY")
            ),
            Failure::ProxyAuthenticationRequired { sent: true, .. } => format!(
                "check the user and password in {} (http://user:password@host:port, percent-encoded) with the proxy's operator",
                var("MQTT_PROXY")
            ),
            Failure::ProxyRefused { status: 403, target, .. } => format!(
                "the proxy's rules do not allow a tunnel to {target} (tinyproxy: ConnectPort and Allow; Squid: SSL_ports and http_access): have that port allowed, or use an address of {} on a port the proxy allows, such as wss://host:443/mqtt",
                var("MQTT_ADDRESS")
            ),
            Failure::ProxyRefused { status: 500..=599, .. } => format!(
                "the proxy could not reach the broker: check {} as the proxy sees it (its DNS, its network), and the proxy's logs",
                var("MQTT_ADDRESS")
            ),
            Failure::ProxyRefused { .. } => format!(
                "check {} and the proxy's logs",
                var("MQTT_PROXY")
            ),
            Failure::ProxyProtocol(_) => format!(
                "check that {} is an HTTP proxy that allows CONNECT (not a SOCKS proxy, not the broker)",
                var("MQTT_PROXY")
            ),
            Failure::WebSocketRefused { status: 403, client_certificate: false, .. } => format!(
                "the edge wants a client certificate for this location (Magistrala's /mqtt answers 403 without a verified one): set {} and {}",
                var("MQTT_TLS_CLIENT_CERT"),
                var("MQTT_TLS_CLIENT_KEY")
            ),
            Failure::WebSocketRefused { status: 400 | 403, client_certificate: true, .. } => format!(
                "the edge did not accept our client certificate for this location (nginx answers 400 when it fails verification, 403 when $ssl_client_verify is not SUCCESS): use a certificate from the CA the edge trusts in {}, and read the edge's error log",
                var("MQTT_TLS_CLIENT_CERT")
            ),
            Failure::WebSocketRefused { status: 404, .. } => format!(
                "nothing serves MQTT over WebSocket at that path: fix the path of {} (Magistrala: /mqtt)",
                var("MQTT_ADDRESS")
            ),
            Failure::WebSocketRefused { .. } => format!(
                "check that {} names the broker's MQTT-over-WebSocket endpoint, and the edge's logs",
                var("MQTT_ADDRESS")
            ),
            Failure::WebSocketProtocol(_) => format!(
                "point {} at the broker's MQTT-over-WebSocket endpoint (ws://host:port/path, wss:// for TLS); an MQTT port wants tcp:// or ssl://",
                var("MQTT_ADDRESS")
            ),
            Failure::NoApplicationProtocol { .. } => format!(
                "set {} to a protocol the server accepts (such as mqtt, x-amzn-mqtt-ca, or http/1.1 for a WebSocket edge), or unset it",
                var("MQTT_TLS_ALPN")
            ),
            Failure::ClosedDuringTlsHandshake { client_certificate, .. } => format!(
                "a TLS router (nginx ssl_preread, Traefik HostSNI) may have sent us to a backend that does not serve us: check {} (the SNI we send) and {} against its routes; or the port does not speak TLS (use tcp://){}",
                var("MQTT_TLS_SERVER_NAME"),
                var("MQTT_TLS_ALPN"),
                match client_certificate {
                    true => "; or the server refused our client certificate without an alert",
                    false => "",
                }
            ),
        }
    }

    /// A failure in one step of opening the stream (proxy, TLS, WebSocket),
    /// when it says more than what it holds.
    pub(crate) fn transport(error: &(dyn StdError + 'static), mode: Mode) -> Option<Self> {
        find::<super::transport::TransportError>(error, no_hidden_causes)?.failure(mode)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::BrokerUntrusted => {
                f.write_str("the broker's certificate is not trusted (unknown issuer)")
            }
            Failure::BrokerNameMismatch {
                expected,
                presented,
            } if presented.is_empty() => {
                write!(f, "the broker's certificate is not valid for {expected:?}")
            }
            Failure::BrokerNameMismatch {
                expected,
                presented,
            } => write!(
                f,
                "the broker's certificate is not valid for {expected:?}; it names {}",
                presented.join(", ")
            ),
            Failure::BrokerCertificateExpired => {
                f.write_str("the broker's certificate has expired")
            }
            Failure::BrokerCertificateInvalid(why) => {
                write!(f, "the broker's certificate is invalid: {why}")
            }
            Failure::ClientCertificateRequired => {
                f.write_str("the broker requires a client certificate and we sent none")
            }
            Failure::ClientCertificateRejected(Some(alert)) => {
                write!(f, "the broker rejected our client certificate ({alert:?})")
            }
            Failure::ClientCertificateRejected(None) => f.write_str(
                "the broker rejected our client certificate (closed right after the TLS handshake, \
                 as nginx does for a client certificate that is not signed by its \
                 ssl_client_certificate CA or has expired)",
            ),
            Failure::ClientCertificateExpired => {
                f.write_str("the broker says our client certificate has expired")
            }
            Failure::Tls(rustls::Error::AlertReceived(alert)) => write!(
                f,
                "the TLS handshake failed: the broker sent the TLS alert {alert:?}"
            ),
            Failure::Tls(why) => write!(f, "the TLS handshake failed: {why}"),
            Failure::ClosedBeforeConnAck => {
                f.write_str("the connection was closed before the broker answered CONNECT")
            }
            Failure::ClosedBeforeConnAckPlain => f.write_str(
                "the connection was closed before the broker answered CONNECT (plain MQTT)",
            ),
            Failure::ClosedBeforeConnAckWithoutCertificate => f.write_str(
                "the connection was closed before the broker answered CONNECT \
                 (TLS, no client certificate sent)",
            ),
            Failure::NotAuthorized => {
                f.write_str("the broker refused our credentials (not authorized)")
            }
            Failure::Refused(why) => write!(f, "the broker refused the connection: {why}"),
            Failure::Unreachable(why) => write!(f, "cannot reach the broker: {why}"),
            Failure::Timeout => f.write_str("no answer from the broker within the connect timeout"),
            Failure::ConnectionLost(why) => write!(f, "the connection was lost: {why}"),
            Failure::ProxyUnreachable(why) => write!(f, "cannot reach the HTTP proxy: {why}"),
            Failure::ProxyAuthenticationRequired { status, sent: false } => write!(
                f,
                "the HTTP proxy requires credentials and we sent none ({status})"
            ),
            Failure::ProxyAuthenticationRequired { status, sent: true } => {
                write!(f, "the HTTP proxy refused our credentials ({status})")
            }
            Failure::ProxyRefused { status, reason, target } => write!(
                f,
                "the HTTP proxy refused the tunnel to {target}: {status} {reason}"
            ),
            Failure::ProxyProtocol(why) => write!(f, "the HTTP proxy's answer is unusable: {why}"),
            Failure::WebSocketRefused { status, reason, path, .. } => write!(
                f,
                "the WebSocket upgrade at {path} was refused: {status} {reason}"
            ),
            Failure::WebSocketProtocol(why) => {
                write!(f, "the server does not speak MQTT over WebSocket there: {why}")
            }
            Failure::NoApplicationProtocol { offered } => write!(
                f,
                "no application protocol in common: the server accepts none of {} (ALPN)",
                offered.join(", ")
            ),
            Failure::ClosedDuringTlsHandshake { server_name, alpn, .. } => {
                match server_name.parse::<std::net::IpAddr>() {
                    Ok(_) => write!(
                        f,
                        "the server closed the connection during the TLS handshake (no SNI: {server_name} is an IP address"
                    )?,
                    Err(_) => write!(
                        f,
                        "the server closed the connection during the TLS handshake (SNI {server_name}"
                    )?,
                }
                match alpn.is_empty() {
                    true => f.write_str(", no ALPN)"),
                    false => write!(f, ", ALPN {})", alpn.join(",")),
                }
            }
        }
    }
}

impl fmt::Display for ConnectionLoss {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionLoss::Closed => f.write_str("the broker closed the connection"),
            ConnectionLoss::KeepAliveTimeout => {
                f.write_str("no answer to the keep-alive ping: the link is dead or half-open")
            }
            ConnectionLoss::WriteTimeout => f.write_str("a write to the broker timed out"),
            ConnectionLoss::Io(why) => why.fmt(f),
            ConnectionLoss::Protocol(why) => f.write_str(why),
            ConnectionLoss::TakenOver { client_id, times } => write!(
                f,
                "the broker closed the connection within {}s of accepting it, {times} times in a row: \
                 another client is probably connected with the same client id {client_id:?}",
                SHORT_LIVED.as_secs()
            ),
        }
    }
}

/// The cause as its own error type, where it has one: rustls' error, or the
/// operating system's. A certificate error or an alert is in the variant
/// itself (rustls does not make those errors of their own).
impl StdError for Failure {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Failure::Tls(error) => Some(error),
            Failure::Unreachable(io) | Failure::ConnectionLost(ConnectionLoss::Io(io)) => {
                Some(io.get())
            }
            _ => None,
        }
    }
}

/// rustls reports presented names in Debug form, `DnsName("nginx")`: keep the name.
fn plain_name(presented: &str) -> String {
    match (presented.find('"'), presented.rfind('"')) {
        (Some(start), Some(end)) if end > start => presented[start + 1..end].to_owned(),
        _ => presented.to_owned(),
    }
}

/// One step into a cause that its error type does not expose as `source()`.
pub(crate) type Hidden =
    for<'e> fn(&'e (dyn StdError + 'static)) -> Option<&'e (dyn StdError + 'static)>;

/// For errors whose causes are all reachable through `source()`.
pub(crate) fn no_hidden_causes<'e>(
    _: &'e (dyn StdError + 'static),
) -> Option<&'e (dyn StdError + 'static)> {
    None
}

/// The first error of type `T` in `error`'s cause chain.
///
/// `io::Error::source` skips the error it wraps, so we step into `get_ref`
/// instead; `hidden` steps into other wrappers that hide their cause.
pub(crate) fn find<'a, T: StdError + 'static>(
    error: &'a (dyn StdError + 'static),
    hidden: Hidden,
) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<T>() {
            return Some(found);
        }
        current = if let Some(io) = error.downcast_ref::<io::Error>() {
            io.get_ref().map(|inner| inner as &(dyn StdError + 'static))
        } else {
            hidden(error).or_else(|| error.source())
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_wrapping(inner: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, inner)
    }

    #[test]
    fn tls_errors_nested_in_io_errors_are_found() {
        let error = io_wrapping(rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired,
        ));
        assert_eq!(
            Failure::from_connect_error(error, Mode::Tls),
            Failure::ClientCertificateRequired
        );
        let error = io::Error::other(io_wrapping(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        )));
        assert_eq!(
            Failure::from_connect_error(error, Mode::Tls),
            Failure::BrokerUntrusted
        );
    }

    #[test]
    fn a_closed_stream_depends_on_whether_connack_came() {
        let reset = || io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(
            Failure::from_io_error(reset(), false, Mode::Plain),
            Failure::ClosedBeforeConnAckPlain
        );
        assert_eq!(
            Failure::from_io_error(reset(), false, Mode::Tls),
            Failure::ClosedBeforeConnAckWithoutCertificate
        );
        assert_eq!(
            Failure::from_io_error(reset(), false, Mode::MutualTls),
            Failure::ClosedBeforeConnAck
        );
        assert_eq!(
            Failure::from_io_error(reset(), true, Mode::Plain),
            Failure::ConnectionLost(ConnectionLoss::Closed)
        );
    }

    /// The typed cause survives: the io error is the source, compared by kind.
    #[test]
    fn io_causes_are_kept_and_compared_by_kind() {
        let refused = Failure::from_connect_error(
            io::Error::new(io::ErrorKind::ConnectionRefused, "refused by the OS"),
            Mode::Plain,
        );
        let Failure::Unreachable(cause) = &refused else {
            panic!("{refused:?}");
        };
        assert_eq!(cause.kind(), io::ErrorKind::ConnectionRefused);
        assert!(
            refused.to_string().contains("connection refused"),
            "{refused}"
        );
        let source = refused.source().expect("a source");
        let io = source.downcast_ref::<io::Error>().expect("an io::Error");
        assert_eq!(io.to_string(), "refused by the OS");
        assert_eq!(
            refused,
            Failure::Unreachable(io::Error::from(io::ErrorKind::ConnectionRefused).into())
        );
        assert_ne!(
            refused,
            Failure::Unreachable(io::Error::from(io::ErrorKind::NotFound).into())
        );
        let lost = Failure::from_io_error(io::Error::other("no route"), true, Mode::Plain);
        assert!(lost.is_network() && !lost.is_timeout(), "{lost:?}");
        assert!(lost.source().is_some());
    }

    #[test]
    fn rustls_errors_stay_typed() {
        let alert = rustls::Error::AlertReceived(AlertDescription::ProtocolVersion);
        let failure = Failure::from_tls(&alert, Mode::Tls);
        assert_eq!(failure, Failure::Tls(alert.clone()));
        assert!(failure.is_tls() && !failure.is_client_certificate());
        assert_eq!(
            failure.to_string(),
            "the TLS handshake failed: the broker sent the TLS alert ProtocolVersion"
        );
        let source = failure
            .source()
            .and_then(|s| s.downcast_ref::<rustls::Error>());
        assert_eq!(source, Some(&alert));

        let rejected = Failure::from_tls(
            &rustls::Error::AlertReceived(AlertDescription::BadCertificate),
            Mode::MutualTls,
        );
        assert_eq!(
            rejected,
            Failure::ClientCertificateRejected(Some(AlertDescription::BadCertificate))
        );
        assert!(rejected.is_client_certificate() && rejected.is_tls());

        let invalid = Failure::from_tls(
            &rustls::Error::InvalidCertificate(CertificateError::BadSignature),
            Mode::Tls,
        );
        assert_eq!(
            invalid,
            Failure::BrokerCertificateInvalid(CertificateError::BadSignature)
        );
        assert!(invalid.is_broker_certificate() && invalid.is_tls());
        assert_eq!(invalid.class(), "broker-certificate-invalid");
    }

    #[test]
    fn predicates_and_classes() {
        let cases = [
            (Failure::BrokerUntrusted, "broker-untrusted"),
            (Failure::ClosedBeforeConnAck, "closed-before-connack"),
            (Failure::NotAuthorized, "not-authorized"),
            (Failure::Timeout, "timeout"),
            (
                Failure::ConnectionLost(ConnectionLoss::KeepAliveTimeout),
                "connection-lost",
            ),
        ];
        for (failure, class) in &cases {
            assert_eq!(failure.class(), *class);
        }
        assert!(Failure::NotAuthorized.is_credentials());
        assert!(!Failure::NotAuthorized.is_network());
        assert!(Failure::Timeout.is_timeout() && Failure::Timeout.is_network());
        assert!(Failure::ConnectionLost(ConnectionLoss::KeepAliveTimeout).is_timeout());
        assert!(!Failure::ClosedBeforeConnAck.is_tls());
    }

    #[test]
    fn fixes_name_the_service_variables() {
        let fix = Failure::BrokerNameMismatch {
            expected: "x".into(),
            presented: vec![],
        }
        .fix(&Names::prefixed("PROXY_"));
        assert!(fix.contains("PROXY_MQTT_TLS_SERVER_NAME"), "{fix}");
        assert!(Failure::ClosedBeforeConnAck
            .fix(&Names::prefixed("MANAGER_"))
            .contains("MANAGER_CLIENT_KEY"));
    }

    /// A close before CONNACK is explained by the mode; the CN rule is named
    /// only when a client certificate was sent.
    #[test]
    fn a_close_before_connack_is_explained_by_the_mode() {
        let names = Names::prefixed("PROPLET_");
        let plain = Failure::closed_before_connack(Mode::Plain).fix(&names);
        assert!(
            plain.contains("AUTH=x509 edge") && plain.contains("refuses plain connections"),
            "{plain}"
        );
        assert!(
            plain.contains("ssl://") && plain.contains("PROPLET_MQTT_TLS_CLIENT_CERT"),
            "{plain}"
        );
        let tls = Failure::closed_before_connack(Mode::Tls).fix(&names);
        assert!(
            tls.contains("may require a client certificate") && tls.contains("router"),
            "{tls}"
        );
        let mtls = Failure::closed_before_connack(Mode::MutualTls).fix(&names);
        assert!(mtls.contains("CN"), "{mtls}");
        for fix in [&plain, &tls] {
            assert!(!fix.contains("CN"), "{fix}");
        }
        for mode in [Mode::Plain, Mode::Tls, Mode::MutualTls] {
            assert_eq!(
                Failure::closed_before_connack(mode).class(),
                "closed-before-connack"
            );
        }
    }
}
