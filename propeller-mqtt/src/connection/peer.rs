//! A scripted MQTT 3.1.1 broker for the state machine's tests: it listens on
//! loopback, and the test says, packet by packet, what it reads and what it
//! answers. So a test can hold back an acknowledgement, choose the packet id
//! it acknowledges, or close the connection at an exact point, and every run
//! goes the same way.
//!
//! Packets are encoded and decoded with rumqttc's `mqttbytes`, the codec the
//! client itself uses. Every wait is bounded by [`guard`], which only turns a
//! hang into a failure: no test decides anything by time.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::{ConnAck, ConnectReturnCode, Packet, PubAck, Publish};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// The longest any single step may take before the test is declared hung.
/// Generous: a reconnect waits out a backoff of about a second.
const HANG: Duration = Duration::from_secs(30);

/// Awaits `future`, failing the test if it hangs.
pub(crate) async fn guard<F: Future>(what: &str, future: F) -> F::Output {
    match tokio::time::timeout(HANG, future).await {
        Ok(output) => output,
        Err(_) => panic!("hung: {what}"),
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A listening broker.
pub(crate) struct Peer {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
}

impl Peer {
    /// A plain MQTT broker on a fresh loopback port.
    pub async fn plain() -> Self {
        Self::bind(None).await
    }

    /// An MQTTS broker presenting `config`'s certificate.
    pub async fn tls(config: Arc<rustls::ServerConfig>) -> Self {
        Self::bind(Some(TlsAcceptor::from(config))).await
    }

    async fn bind(tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self { listener, tls }
    }

    /// The address a client connects to.
    pub fn url(&self) -> String {
        let port = self.listener.local_addr().expect("address").port();
        match self.tls {
            Some(_) => format!("ssl://127.0.0.1:{port}"),
            None => format!("tcp://127.0.0.1:{port}"),
        }
    }

    /// The next connection, once its CONNECT has arrived (not answered yet).
    pub async fn accept(&self) -> Conn {
        guard("a connection", async {
            let (tcp, _) = self.listener.accept().await.expect("accept");
            let stream: Box<dyn Stream> = match &self.tls {
                Some(acceptor) => Box::new(acceptor.accept(tcp).await.expect("TLS handshake")),
                None => Box::new(tcp),
            };
            let mut conn = Conn {
                stream,
                buffer: BytesMut::new(),
            };
            match conn.read().await {
                Some(Packet::Connect(_)) => conn,
                other => panic!("expected CONNECT, got {other:?}"),
            }
        })
        .await
    }

    /// The next connection, accepted: CONNACK without a session.
    pub async fn accept_session(&self) -> Conn {
        self.accept_with(false).await
    }

    /// The next connection, accepted: CONNACK with `session_present`.
    pub async fn accept_with(&self, session_present: bool) -> Conn {
        let mut conn = self.accept().await;
        conn.send(&[Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            session_present,
        ))])
        .await;
        conn
    }
}

/// One connection, seen from the broker's side.
pub(crate) struct Conn {
    stream: Box<dyn Stream>,
    buffer: BytesMut,
}

impl Conn {
    /// Writes `packets` in one write, so that the client reads them together.
    pub async fn send(&mut self, packets: &[Packet]) {
        let mut bytes = BytesMut::new();
        for packet in packets {
            packet.write(&mut bytes, usize::MAX).expect("encode");
        }
        guard("a write", async {
            self.stream.write_all(&bytes).await.expect("write");
            self.stream.flush().await.expect("flush");
        })
        .await;
    }

    /// PUBACKs for `ids`, in one write.
    pub async fn puback(&mut self, ids: impl IntoIterator<Item = u16>) {
        let packets: Vec<Packet> = ids
            .into_iter()
            .map(|id| Packet::PubAck(PubAck::new(id)))
            .collect();
        self.send(&packets).await;
    }

    /// The next packet from the client, answering keep-alive pings on the
    /// way; `None` when the client closed the connection.
    pub async fn read(&mut self) -> Option<Packet> {
        guard("a packet from the client", async {
            loop {
                match Packet::read(&mut self.buffer, usize::MAX) {
                    Ok(Packet::PingReq) => {
                        let mut pong = BytesMut::new();
                        Packet::PingResp.write(&mut pong, 2).expect("encode");
                        self.stream.write_all(&pong).await.expect("write");
                    }
                    Ok(packet) => return Some(packet),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                        match self.stream.read_buf(&mut self.buffer).await {
                            Ok(0) | Err(_) => return None,
                            Ok(_) => {}
                        }
                    }
                    Err(error) => panic!("undecodable packet from the client: {error:?}"),
                }
            }
        })
        .await
    }

    /// The next packet, which must be a PUBLISH.
    pub async fn publish(&mut self) -> Publish {
        match self.read().await {
            Some(Packet::Publish(publish)) => publish,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// The next `n` packets, which must be PUBLISH packets.
    pub async fn publishes(&mut self, n: usize) -> Vec<Publish> {
        let mut publishes = Vec::with_capacity(n);
        for _ in 0..n {
            publishes.push(self.publish().await);
        }
        publishes
    }

    /// Everything the client sends until it closes the connection.
    pub async fn rest(&mut self) -> Vec<Packet> {
        let mut rest = Vec::new();
        while let Some(packet) = self.read().await {
            rest.push(packet);
        }
        rest
    }
}

/// The payload of `publish`, as text.
pub(crate) fn text(publish: &Publish) -> String {
    String::from_utf8(publish.payload.to_vec()).expect("UTF-8 payload")
}
