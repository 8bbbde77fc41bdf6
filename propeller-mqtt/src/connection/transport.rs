//! The byte stream under MQTT, opened by us on every (re)connect through the
//! socket connector of our patched rumqttc (`vendor/rumqttc/PATCH.md`):
//!
//! 1. TCP with quick acknowledgements ([`super::socket`]), to the broker, or
//!    to the HTTP proxy of `<P>_MQTT_PROXY` and through its `CONNECT` tunnel
//!    ([`super::proxy`]);
//! 2. TLS, for `ssl://` and `wss://`: our rustls configuration, with the
//!    server name of `<P>_MQTT_TLS_SERVER_NAME` (or the address host) as SNI
//!    and as the name verified, and the protocols of `<P>_MQTT_TLS_ALPN`;
//! 3. the WebSocket upgrade, for `ws://` and `wss://` ([`super::websocket`]).
//!
//! rumqttc then speaks MQTT over the result as over plain TCP: its own TLS
//! and WebSocket code is not used. Doing every step here means each failure
//! is known by the step it happened in ([`TransportError`]), the SNI is ours
//! to choose, and `propeller-mqtt check` walks exactly the same steps.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_tungstenite::tungstenite;
use rumqttc::{AsyncReadWrite, MqttOptions};
use rustls::pki_types::ServerName;
use rustls::{AlertDescription, ClientConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::failure::Failure;
use super::proxy::{self, Tunnel};
use super::socket::{self, QuickAck};
use super::websocket::{self, WebSocketRoute};
use crate::env::{BrokerAddress, Transport};
use crate::options::authority;
use crate::tls::TlsSetup;
use crate::{HttpProxy, Mode, Options};

/// The stream rumqttc gets.
pub type Stream = Box<dyn AsyncReadWrite>;

/// Everything needed to open the stream to one broker of the list.
#[derive(Debug, Clone)]
pub struct Route {
    /// The broker's host, as the address has it: what we dial, or what the
    /// proxy is asked to reach.
    pub host: String,
    /// The broker's port.
    pub port: u16,
    /// The HTTP proxy to go through.
    pub proxy: Option<HttpProxy>,
    /// TLS, for `ssl://` and `wss://`.
    pub tls: Option<TlsRoute>,
    /// The WebSocket upgrade, for `ws://` and `wss://`.
    pub websocket: Option<WebSocketRoute>,
    /// How long the proxy may take to answer `CONNECT`.
    pub timeout: Duration,
    /// The largest MQTT packet: WebSocket frames and messages may be as large.
    pub max_packet_size: usize,
}

/// The TLS of a route.
#[derive(Clone)]
pub struct TlsRoute {
    /// Our rustls configuration (trust, client certificate, ALPN).
    pub config: Arc<ClientConfig>,
    /// Sent as SNI and verified in the broker's certificate.
    pub server_name: String,
}

impl fmt::Debug for TlsRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsRoute")
            .field("server_name", &self.server_name)
            .field("alpn", &alpn_names(&self.config))
            .finish_non_exhaustive()
    }
}

impl Route {
    /// The route to `broker` under `options`, with the TLS setup in use.
    pub fn new(options: &Options, broker: &BrokerAddress, tls: Option<&TlsSetup>) -> Self {
        let server_name = options.tls_server_name(broker);
        let secure = broker.transport == Transport::Tls;
        let websocket = broker.websocket.as_ref().map(|path| {
            // The Host header names what TLS names: the edge's virtual host.
            let name = match secure {
                true => server_name.as_str(),
                false => broker.host.as_str(),
            };
            let default_port = if secure { 443 } else { 80 };
            let authority = match broker.port == default_port {
                true if name.contains(':') => format!("[{name}]"),
                true => name.to_owned(),
                false => authority(name, broker.port),
            };
            WebSocketRoute {
                secure,
                authority,
                path: path.clone(),
            }
        });
        Self {
            host: broker.host.clone(),
            port: broker.port,
            proxy: options.proxy.clone(),
            tls: tls.map(|setup| TlsRoute {
                config: setup.client_config.clone(),
                server_name,
            }),
            websocket,
            timeout: options.connect_timeout,
            max_packet_size: options.max_packet_size,
        }
    }

    /// `host:port` of the broker, as the proxy is asked for it.
    pub fn target(&self) -> String {
        authority(&self.host, self.port)
    }

    /// TCP to the broker, or to the proxy and through its tunnel.
    ///
    /// # Errors
    ///
    /// The connect or resolver error of a direct connection, as is; through
    /// a proxy, a [`TransportError`] (unreachable, refused, not HTTP).
    pub(crate) async fn open(&self) -> io::Result<Tunnel<QuickAck>> {
        let Some(proxy) = &self.proxy else {
            return Ok(Tunnel::direct(socket::connect(self.target()).await?));
        };
        let tcp = socket::connect(proxy.authority()).await.map_err(|source| {
            io::Error::new(
                source.kind(),
                TransportError::ProxyUnreachable {
                    proxy: proxy.authority(),
                    source,
                },
            )
        })?;
        let (tunnel, _) = proxy::tunnel(tcp, proxy, &self.target(), self.timeout).await?;
        Ok(tunnel)
    }

    /// The whole stream: TCP (or the proxy's tunnel), then TLS, then
    /// WebSocket, as the route asks.
    ///
    /// # Errors
    ///
    /// The connect or resolver error of a direct connection, as is; an
    /// `io::Error` holding a [`TransportError`] for the proxy, TLS and
    /// WebSocket steps.
    pub async fn connect(&self) -> io::Result<Stream> {
        let tcp = self.open().await?;
        let max = self.max_packet_size;
        Ok(match (&self.tls, &self.websocket) {
            (None, None) => Box::new(tcp),
            (Some(tls), None) => Box::new(handshake(tls, tcp).await?),
            (None, Some(ws)) => Box::new(websocket::upgrade(tcp, ws, max).await?.0),
            (Some(tls), Some(ws)) => {
                let tls = handshake(tls, tcp).await?;
                Box::new(websocket::upgrade(tls, ws, max).await?.0)
            }
        })
    }
}

/// Makes rumqttc open every connection to `broker` with [`Route::connect`].
pub(crate) fn install(
    mqtt: &mut MqttOptions,
    options: &Options,
    broker: &BrokerAddress,
    tls: Option<&TlsSetup>,
) {
    let route = Arc::new(Route::new(options, broker, tls));
    mqtt.set_socket_connector(move |_, _| {
        let route = route.clone();
        async move { route.connect().await }
    });
}

/// The TLS handshake on `stream`, with the route's server name as SNI.
///
/// # Errors
///
/// An `io::Error` holding [`TransportError::Tls`], of the same kind as
/// tokio-rustls's error (which holds rustls's, if any).
pub async fn handshake<S>(tls: &TlsRoute, stream: S) -> io::Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(tls.server_name.clone()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} is not a valid TLS server name", tls.server_name),
        )
    })?;
    TlsConnector::from(tls.config.clone())
        .connect(name, stream)
        .await
        .map_err(|source| {
            io::Error::new(
                source.kind(),
                TransportError::Tls {
                    source,
                    server_name: tls.server_name.clone(),
                    alpn: alpn_names(&tls.config),
                },
            )
        })
}

/// The ALPN protocols a configuration offers, as text.
pub fn alpn_names(config: &ClientConfig) -> Vec<String> {
    config
        .alpn_protocols
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect()
}

/// A failure in one step of opening the stream. Travels inside an
/// `io::Error` through rumqttc; [`TransportError::failure`] classifies it.
#[derive(Debug)]
#[non_exhaustive]
pub enum TransportError {
    /// No TCP connection to the proxy.
    ProxyUnreachable {
        /// The proxy's `host:port` (never its credentials).
        proxy: String,
        /// The connect or resolver error.
        source: io::Error,
    },
    /// The proxy answered `CONNECT` with something else than 2xx.
    ProxyStatus {
        /// The status code.
        status: u16,
        /// The reason phrase, escaped and cut.
        reason: String,
        /// Whether we sent `Proxy-Authorization`.
        credentials_sent: bool,
        /// The broker's `host:port` we asked for.
        target: String,
    },
    /// The proxy's answer is not HTTP, too long, cut short or late.
    ProxyAnswer(String),
    /// The TLS handshake failed.
    Tls {
        /// tokio-rustls's error, with rustls's inside when there is one.
        source: io::Error,
        /// The SNI we sent.
        server_name: String,
        /// The ALPN protocols we offered.
        alpn: Vec<String>,
    },
    /// The WebSocket upgrade failed.
    WebSocket {
        /// tungstenite's error.
        source: Box<tungstenite::Error>,
        /// The path we asked for.
        path: String,
    },
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransportError::ProxyUnreachable { proxy, source } => {
                write!(f, "cannot reach the HTTP proxy at {proxy}: {source}")
            }
            TransportError::ProxyStatus {
                status,
                reason,
                target,
                ..
            } => write!(
                f,
                "the HTTP proxy answered CONNECT {target} with {status} {reason}"
            ),
            TransportError::ProxyAnswer(problem) => f.write_str(problem),
            TransportError::Tls {
                source,
                server_name,
                ..
            } => write!(f, "the TLS handshake (SNI {server_name}) failed: {source}"),
            TransportError::WebSocket { source, path } => {
                write!(f, "the WebSocket upgrade at {path} failed: {source}")
            }
        }
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TransportError::ProxyUnreachable { source, .. }
            | TransportError::Tls { source, .. } => Some(source),
            TransportError::WebSocket { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}

impl TransportError {
    /// What the failure is, in the terms of [`Failure`]; `None` when the
    /// usual classification of what it holds says it better (a TLS alert, a
    /// certificate error, a reset of an established stream).
    pub fn failure(&self, mode: Mode) -> Option<Failure> {
        match self {
            TransportError::ProxyUnreachable { proxy, source } => {
                let why = match source.kind() {
                    io::ErrorKind::ConnectionRefused => {
                        "connection refused: nothing listens there".to_owned()
                    }
                    _ => source.to_string(),
                };
                Some(Failure::ProxyUnreachable(format!("{proxy}: {why}")))
            }
            TransportError::ProxyStatus {
                status: status @ (401 | 407),
                credentials_sent,
                ..
            } => Some(Failure::ProxyAuthenticationRequired {
                status: *status,
                sent: *credentials_sent,
            }),
            TransportError::ProxyStatus {
                status,
                reason,
                target,
                ..
            } => Some(Failure::ProxyRefused {
                status: *status,
                reason: reason.clone(),
                target: target.clone(),
            }),
            TransportError::ProxyAnswer(problem) => Some(Failure::ProxyProtocol(problem.clone())),
            TransportError::Tls {
                source,
                server_name,
                alpn,
            } => {
                let rustls = source
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>());
                match rustls {
                    Some(
                        rustls::Error::NoApplicationProtocol
                        | rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol),
                    ) => Some(Failure::NoApplicationProtocol {
                        offered: alpn.clone(),
                    }),
                    Some(_) => None,
                    None if closed(source.kind()) => Some(Failure::ClosedDuringTlsHandshake {
                        server_name: server_name.clone(),
                        alpn: alpn.clone(),
                        client_certificate: mode == Mode::MutualTls,
                    }),
                    None => None,
                }
            }
            TransportError::WebSocket { source, path } => {
                Some(websocket_failure(source, path, mode))
            }
        }
    }
}

/// The kinds of error a peer's close gives.
fn closed(kind: io::ErrorKind) -> bool {
    use io::ErrorKind::*;
    matches!(
        kind,
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

fn websocket_failure(error: &tungstenite::Error, path: &str, mode: Mode) -> Failure {
    use tungstenite::error::ProtocolError;
    use tungstenite::Error;
    let closed_early = || {
        Failure::WebSocketProtocol(
            "the server closed the connection without answering the WebSocket upgrade".to_owned(),
        )
    };
    match error {
        Error::Http(response) => Failure::WebSocketRefused {
            status: response.status().as_u16(),
            reason: response
                .status()
                .canonical_reason()
                .unwrap_or("")
                .to_owned(),
            path: path.to_owned(),
            client_certificate: mode == Mode::MutualTls,
        },
        Error::Protocol(ProtocolError::SecWebSocketSubProtocolError(_)) => {
            Failure::WebSocketProtocol(
                "the server upgraded without agreeing to the mqtt subprotocol".to_owned(),
            )
        }
        Error::Protocol(ProtocolError::HandshakeIncomplete) => closed_early(),
        Error::Io(io) if closed(io.kind()) => closed_early(),
        Error::Io(io) => Failure::WebSocketProtocol(format!("during the upgrade: {io}")),
        Error::HttpFormat(e) => {
            Failure::WebSocketProtocol(format!("the answer to the upgrade is not HTTP ({e})"))
        }
        other => Failure::WebSocketProtocol(proxy::printable(&other.to_string(), 200)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Secret, TlsSettings};

    fn options(address: &str, server_name: Option<&str>) -> Options {
        let options = Options::new(address, "proplet-1", Secret::new("k")).unwrap();
        match options.tls {
            Some(_) => options.with_tls(TlsSettings {
                server_name: server_name.map(str::to_owned),
                ..TlsSettings::default()
            }),
            None => options,
        }
    }

    /// The TCP connection goes to the address; the SNI and the upgrade's
    /// Host name what the edge knows, with the port only when it is not the
    /// scheme's default.
    #[test]
    fn the_route_dials_the_address_and_names_the_server_name() {
        for (address, server_name, host_header) in [
            (
                "wss://10.0.0.5/mqtt",
                Some("edge.example.com"),
                "edge.example.com",
            ),
            (
                "wss://10.0.0.5:8443/mqtt",
                Some("edge.example.com"),
                "edge.example.com:8443",
            ),
            ("wss://10.0.0.5/mqtt", None, "10.0.0.5"),
            ("ws://[::1]:8080/ws", None, "[::1]:8080"),
            ("ws://[::1]/mqtt", None, "[::1]"),
        ] {
            let options = options(address, server_name);
            let route = Route::new(&options, &options.brokers[0], None);
            let ws = route.websocket.as_ref().unwrap();
            assert_eq!(ws.authority, host_header, "{address}");
            assert_eq!(ws.secure, address.starts_with("wss"), "{address}");
            let broker = &options.brokers[0];
            assert_eq!(route.target(), authority(&broker.host, broker.port));
            assert_eq!(
                options.tls_server_name(&options.brokers[0]),
                server_name.unwrap_or(&options.brokers[0].host)
            );
        }
        let options = options("ssl://10.0.0.5:8883", Some("edge"));
        let route = Route::new(&options, &options.brokers[0], None);
        assert_eq!(
            (route.target().as_str(), route.websocket),
            ("10.0.0.5:8883", None)
        );
    }

    /// What each step's error is called, without a server.
    #[test]
    fn step_errors_are_classified() {
        let tls = |source: io::Error| TransportError::Tls {
            source,
            server_name: "edge".into(),
            alpn: vec!["mqtt".into()],
        };
        let eof = tls(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "tls handshake eof",
        ));
        assert_eq!(
            eof.failure(Mode::Tls),
            Some(Failure::ClosedDuringTlsHandshake {
                server_name: "edge".into(),
                alpn: vec!["mqtt".into()],
                client_certificate: false,
            })
        );
        let alert = tls(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol),
        ));
        assert_eq!(
            alert.failure(Mode::MutualTls),
            Some(Failure::NoApplicationProtocol {
                offered: vec!["mqtt".into()]
            })
        );
        // Certificate errors are left to the usual classification.
        let untrusted = tls(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        assert_eq!(untrusted.failure(Mode::Tls), None);
        let wrapped =
            rumqttc::ConnectionError::Io(io::Error::new(io::ErrorKind::InvalidData, untrusted));
        assert_eq!(
            super::super::session::LinkError(wrapped).into_failure(false, Mode::Tls),
            Failure::BrokerUntrusted
        );

        let response = tungstenite::http::Response::builder()
            .status(403)
            .body(None)
            .unwrap();
        let refused = TransportError::WebSocket {
            source: Box::new(tungstenite::Error::Http(response)),
            path: "/mqtt".into(),
        };
        let wrapped = rumqttc::ConnectionError::Io(io::Error::other(refused));
        let failure = super::super::session::LinkError(wrapped).into_failure(false, Mode::Tls);
        assert_eq!(
            failure,
            Failure::WebSocketRefused {
                status: 403,
                reason: "Forbidden".into(),
                path: "/mqtt".into(),
                client_certificate: false,
            }
        );
        assert_eq!(
            failure.to_string(),
            "the WebSocket upgrade at /mqtt was refused: 403 Forbidden"
        );
    }
}
