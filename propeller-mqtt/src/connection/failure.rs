//! Why a connection attempt failed, in words an operator can act on.
//!
//! rumqttc reports TLS alerts, resets and refusals nested inside several layers
//! of `io::Error`; [`Failure::classify`] digs the real cause out.

use std::error::Error as StdError;
use std::fmt;
use std::io;

use rumqttc::{ConnectReturnCode, ConnectionError, StateError};
use rustls::{AlertDescription, CertificateError};

use crate::{Mode, Names};

/// A classified connection failure. Not fatal: the client retries with backoff.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// The broker's certificate is unusable for another reason.
    BrokerCertificateInvalid(String),
    /// The broker wants a client certificate and we sent none.
    ClientCertificateRequired,
    /// The broker refused our client certificate.
    ClientCertificateRejected(String),
    /// The broker says our client certificate has expired.
    ClientCertificateExpired,
    /// The TLS handshake failed for another reason.
    Tls(String),
    /// The server closed the connection before answering CONNECT.
    ClosedBeforeConnAck,
    /// The broker refused our username and password.
    NotAuthorized,
    /// The broker refused the connection for another reason.
    Refused(String),
    /// Nothing answered at the address.
    Unreachable(String),
    /// The attempt took longer than the connect timeout.
    Timeout,
    /// An established connection was lost.
    ConnectionLost(String),
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
    /// The server closed the connection before answering CONNECT, and we had
    /// sent no client certificate (plain MQTT, or TLS without one): no CN
    /// rule is involved.
    ClosedBeforeConnAckWithoutCertificate {
        /// Whether TLS was in use (and accepted us).
        tls: bool,
    },
}

impl Failure {
    /// Classifies a rumqttc error. `connected` says whether a CONNACK had been
    /// received on this connection; `mode` helps read ambiguous TLS alerts.
    pub fn classify(error: &ConnectionError, connected: bool, mode: Mode) -> Self {
        match error {
            ConnectionError::ConnectionRefused(
                ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword,
            ) => return Failure::NotAuthorized,
            ConnectionError::ConnectionRefused(code) => {
                return Failure::Refused(format!("{code:?}"))
            }
            ConnectionError::NetworkTimeout => return Failure::Timeout,
            ConnectionError::FlushTimeout => {
                return Failure::ConnectionLost("a write to the broker timed out".to_owned())
            }
            ConnectionError::MqttState(StateError::AwaitPingResp) => {
                return Failure::ConnectionLost(
                    "no answer to the keep-alive ping: the link is dead or half-open".to_owned(),
                )
            }
            ConnectionError::NotConnAck(packet) => {
                return Failure::Refused(format!("the broker answered CONNECT with {packet:?}"))
            }
            _ => {}
        }
        if let Some(failure) = Self::transport(error, mode) {
            return failure;
        }
        if let Some(tls) = find::<rustls::Error>(error) {
            return Self::from_tls(tls, mode);
        }
        let closed = || match connected {
            false => Failure::ClosedBeforeConnAck,
            true => Failure::ConnectionLost("the broker closed the connection".to_owned()),
        };
        if matches!(
            error,
            ConnectionError::MqttState(StateError::ConnectionAborted)
        ) {
            return closed();
        }
        if let Some(io) = find::<io::Error>(error) {
            use io::ErrorKind::*;
            return match io.kind() {
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe => closed(),
                ConnectionRefused => Failure::Unreachable(
                    "connection refused: nothing listens at that address".to_owned(),
                ),
                TimedOut => Failure::Timeout,
                _ if connected => Failure::ConnectionLost(io.to_string()),
                _ => Failure::Unreachable(io.to_string()),
            };
        }
        match connected {
            true => Failure::ConnectionLost(error.to_string()),
            false => Failure::Refused(error.to_string()),
        }
    }

    /// The TLS failure inside an I/O error, if there is one.
    pub fn from_io(error: &io::Error, mode: Mode) -> Option<Self> {
        if let Some(failure) = Self::transport(error, mode) {
            return Some(failure);
        }
        find::<rustls::Error>(error).map(|tls| Self::from_tls(tls, mode))
    }

    fn from_tls(error: &rustls::Error, mode: Mode) -> Self {
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
                other => Failure::BrokerCertificateInvalid(format!("{other:?}")),
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
                    Failure::ClientCertificateRejected(format!("{alert:?}"))
                }
                other => Failure::Tls(format!("the broker sent the TLS alert {other:?}")),
            },
            other => Failure::Tls(other.to_string()),
        }
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
            Failure::ClosedBeforeConnAckWithoutCertificate { tls: false } => format!(
                "check that {} is a plain MQTT port (a TLS port closes a plain CONNECT: use ssl://), and the broker's and edge's logs (a duplicate client id, a refused client)",
                var("MQTT_ADDRESS")
            ),
            Failure::ClosedBeforeConnAckWithoutCertificate { tls: true } => format!(
                "TLS accepted us without a client certificate, then the connection was closed: check the edge's and the broker's logs; an edge that requires mTLS only after the handshake closes this way (then set {} and {})",
                var("MQTT_TLS_CLIENT_CERT"),
                var("MQTT_TLS_CLIENT_KEY")
            ),
        }
    }

    /// A failure in one step of opening the stream (proxy, TLS, WebSocket),
    /// when it says more than what it holds.
    fn transport(error: &(dyn StdError + 'static), mode: Mode) -> Option<Self> {
        find::<super::transport::TransportError>(error)?.failure(mode)
    }

    /// "Closed before CONNACK", in the terms of `mode`: only under mTLS can
    /// it be the edge's CN rule.
    pub fn closed_before_connack(mode: Mode) -> Self {
        match mode {
            Mode::MutualTls => Failure::ClosedBeforeConnAck,
            Mode::Tls => Failure::ClosedBeforeConnAckWithoutCertificate { tls: true },
            Mode::Plain => Failure::ClosedBeforeConnAckWithoutCertificate { tls: false },
        }
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
            Failure::ClientCertificateRejected(alert) => {
                write!(f, "the broker rejected our client certificate ({alert})")
            }
            Failure::ClientCertificateExpired => {
                f.write_str("the broker says our client certificate has expired")
            }
            Failure::Tls(why) => write!(f, "the TLS handshake failed: {why}"),
            Failure::ClosedBeforeConnAck => {
                f.write_str("the connection was closed before the broker answered CONNECT")
            }
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
            Failure::ClosedBeforeConnAckWithoutCertificate { tls } => write!(
                f,
                "the connection was closed before the broker answered CONNECT ({}, no client certificate sent)",
                match tls {
                    true => "TLS",
                    false => "plain MQTT",
                }
            ),
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

/// The first error of type `T` in `error`'s cause chain.
///
/// `io::Error::source` skips the error it wraps, so we step into `get_ref` instead.
/// rumqttc's codec error hides its io::Error entirely; we step into that too.
fn find<'a, T: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<T>() {
            return Some(found);
        }
        current = if let Some(io) = error.downcast_ref::<io::Error>() {
            io.get_ref().map(|inner| inner as &(dyn StdError + 'static))
        } else if let Some(rumqttc::mqttbytes::Error::Io(io)) = error.downcast_ref() {
            // rumqttc's codec error does not expose its io::Error as a source.
            Some(io as &(dyn StdError + 'static))
        } else {
            error.source()
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_wrapping(inner: rustls::Error) -> ConnectionError {
        ConnectionError::Io(io::Error::new(io::ErrorKind::InvalidData, inner))
    }

    #[test]
    fn tls_errors_nested_in_io_errors_are_found() {
        let error = ConnectionError::MqttState(StateError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
        )));
        assert_eq!(
            Failure::classify(&error, false, Mode::Tls),
            Failure::ClientCertificateRequired
        );
        let error = io_wrapping(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        assert_eq!(
            Failure::classify(&error, false, Mode::Tls),
            Failure::BrokerUntrusted
        );
    }

    #[test]
    fn a_closed_stream_depends_on_whether_connack_came() {
        let error = ConnectionError::MqttState(StateError::ConnectionAborted);
        assert_eq!(
            Failure::classify(&error, false, Mode::MutualTls),
            Failure::ClosedBeforeConnAck
        );
        assert!(matches!(
            Failure::classify(&error, true, Mode::MutualTls),
            Failure::ConnectionLost(_)
        ));
        let reset = ConnectionError::Io(io::ErrorKind::ConnectionReset.into());
        assert_eq!(
            Failure::classify(&reset, false, Mode::Plain),
            Failure::ClosedBeforeConnAck
        );
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
}
