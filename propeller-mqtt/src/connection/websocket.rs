//! MQTT over WebSocket (`ws://`, `wss://`): the HTTP upgrade with the `mqtt`
//! subprotocol (MQTT 3.1.1, section 6), over the stream we already have
//! (TCP, maybe the proxy's tunnel, maybe TLS), then the binary frames as one
//! byte stream for rumqttc.

use std::io;

use async_tungstenite::tokio::TokioAdapter;
use async_tungstenite::tungstenite::client::IntoClientRequest;
use async_tungstenite::tungstenite::http::HeaderValue;
use async_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use ws_stream_tungstenite::WsStream;

use super::transport::TransportError;

/// The subprotocol of MQTT over WebSocket.
pub const SUBPROTOCOL: &str = "mqtt";

/// Where and how the upgrade is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSocketRoute {
    /// `ws` or `wss`: what the request URL says (TLS, if any, is already done).
    pub secure: bool,
    /// The `Host` header: the name the edge knows (the TLS server name
    /// under `wss://`), with the port unless it is the scheme's default.
    pub authority: String,
    /// The request path, with its query if any, such as `/mqtt`.
    pub path: String,
}

/// What the server answered, when it upgraded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgraded {
    /// The status, 101.
    pub status: u16,
    /// The `Server` header, when there is one (escaped and cut).
    pub server: Option<String>,
}

/// The upgraded connection.
pub type WebSocketStream<S> = WsStream<TokioAdapter<S>>;

/// Asks for the upgrade at `route` on `stream`, offering only the `mqtt`
/// subprotocol, and requires the server to choose it. Frames and messages
/// may be as large as `max_packet_size` (at least tungstenite's defaults).
///
/// # Errors
///
/// An `io::Error` holding a [`TransportError::WebSocket`]: the status of a
/// refusal, an answer that is not an upgrade, a close before any answer.
pub async fn upgrade<S>(
    stream: S,
    route: &WebSocketRoute,
    max_packet_size: usize,
) -> io::Result<(WebSocketStream<S>, Upgraded)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let failed = |source| {
        io::Error::other(TransportError::WebSocket {
            source: Box::new(source),
            path: route.path.clone(),
        })
    };
    let scheme = match route.secure {
        true => "wss",
        false => "ws",
    };
    let mut request = format!("{scheme}://{}{}", route.authority, route.path)
        .into_client_request()
        .map_err(failed)?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let defaults = WebSocketConfig::default();
    let limit = |default: Option<usize>| default.map(|d| d.max(max_packet_size));
    let (message, frame) = (
        limit(defaults.max_message_size),
        limit(defaults.max_frame_size),
    );
    let config = defaults.max_message_size(message).max_frame_size(frame);
    let (socket, response) =
        async_tungstenite::tokio::client_async_with_config(request, stream, Some(config))
            .await
            .map_err(failed)?;
    let server = response
        .headers()
        .get("server")
        .map(|value| super::proxy::printable(&String::from_utf8_lossy(value.as_bytes()), 60));
    Ok((
        WsStream::new(socket),
        Upgraded {
            status: response.status().as_u16(),
            server,
        },
    ))
}
