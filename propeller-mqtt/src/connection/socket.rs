//! The connection's TCP stream, opened by us rather than by rumqttc (through
//! the `set_socket_connector` hook of our patched rumqttc, see
//! `vendor/rumqttc/PATCH.md`), so that it can acknowledge at once what it
//! reads.
//!
//! Why: mosquitto does not set `TCP_NODELAY` by default. When it writes two
//! small segments in a row (the TLS 1.3 session ticket, then CONNACK; a
//! PUBACK, then the next PUBLISH), Nagle's algorithm holds the second until
//! the first is acknowledged, and Linux delays that acknowledgement by up to
//! 40 ms when we have nothing to send back. Every exchange with the broker
//! paid that stall. `TCP_QUICKACK` makes the kernel acknowledge at once, but
//! it is not sticky: the kernel leaves quick-ack mode again as soon as the
//! connection looks interactive. So [`QuickAck`] sets it again after every
//! read that returned data, which also sends an acknowledgement the kernel
//! was holding back for what was just read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{lookup_host, TcpSocket, TcpStream};

/// Opens a TCP connection to `address` (`host:port`, resolved like rumqttc
/// does), with `TCP_NODELAY` and quick acknowledgements.
///
/// # Errors
///
/// The last connect error when no resolved address accepted, or the
/// resolver's error.
pub(crate) async fn connect(address: String) -> io::Result<QuickAck> {
    let mut last_error = None;
    for peer in lookup_host(address.as_str()).await? {
        let socket = match peer {
            std::net::SocketAddr::V4(_) => TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        // MQTT's packets are small and latency-bound (CONNECT, acks, pings):
        // no Nagle on our side, as mosquitto's own clients do.
        socket.set_nodelay(true)?;
        match socket.connect(peer).await {
            Ok(stream) => return Ok(QuickAck::new(stream)),
            Err(error) => last_error = Some(error),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{address} resolves to no address"),
        )
    }))
}

/// A TCP stream that asks for quick acknowledgements before its first read
/// and again after every read that returned data. Elsewhere than Linux and
/// Android, where the option does not exist, it is the plain stream.
#[derive(Debug)]
pub(crate) struct QuickAck {
    stream: TcpStream,
}

impl QuickAck {
    pub(crate) fn new(stream: TcpStream) -> Self {
        rearm(&stream);
        Self { stream }
    }

    /// The stream underneath, for tests.
    #[cfg(test)]
    pub(crate) fn get_ref(&self) -> &TcpStream {
        &self.stream
    }
}

/// Sets `TCP_QUICKACK`. A failure is not worth failing the connection for:
/// the read that follows reports a broken socket anyway.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn rearm(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_tcp_quickack(true);
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn rearm(_: &TcpStream) {}

impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            rearm(&self.stream);
        }
        polled
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn options(stream: &TcpStream) -> (bool, bool) {
        let socket = socket2::SockRef::from(stream);
        (
            socket.tcp_nodelay().expect("TCP_NODELAY"),
            socket.tcp_quickack().expect("TCP_QUICKACK"),
        )
    }

    /// The stream has no Nagle and asks for quick acknowledgements from the
    /// start, and again after each read, even after writes that made the
    /// kernel leave quick-ack mode.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[tokio::test]
    async fn quick_acks_are_rearmed_after_every_read() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (client, server) = tokio::join!(connect(address), listener.accept());
        let (mut client, (mut server, _)) = (client.unwrap(), server.unwrap());
        assert_eq!(options(client.get_ref()), (true, true));
        let mut buf = [0u8; 4];
        for round in 0..5u8 {
            // An exchange, as in MQTT: we write, the broker answers.
            client.write_all(&[round; 4]).await.unwrap();
            server.read_exact(&mut buf).await.unwrap();
            // Clear it by hand too, as the kernel may after a write.
            socket2::SockRef::from(client.get_ref())
                .set_tcp_quickack(false)
                .unwrap();
            server.write_all(&[round; 4]).await.unwrap();
            client.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, [round; 4]);
            assert!(options(client.get_ref()).1, "re-armed after read {round}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_broker_reports_the_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let error = connect(address).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
    }
}
