//! The HTTP CONNECT tunnel of `<P>_MQTT_PROXY`: we ask the proxy for a
//! tunnel to the broker ourselves, on the TCP stream we opened, so that every
//! answer is known exactly (407, 403, 502, or no HTTP at all) and nothing
//! beyond the proxy's headers is ever taken from the stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::transport::TransportError;
use crate::HttpProxy;

/// The most we read of the proxy's answer before giving up on it: its status
/// line and headers; a body comes only with refusals, and we stop at the headers.
pub const MAX_ANSWER: usize = 16 * 1024;

/// What the proxy answered to CONNECT, when it opened the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The status code, 2xx.
    pub status: u16,
    /// The reason phrase, escaped and cut.
    pub reason: String,
}

/// Asks `proxy` (at the other end of `stream`) for a tunnel to `target`
/// (`host:port`) and reads its answer, for at most `limit`. On success the
/// stream carries the broker's bytes from then on.
///
/// # Errors
///
/// An `io::Error` holding a [`TransportError`]: the status of a refusal, or
/// an answer that is not HTTP, too long, cut short, or late. The proxy's
/// credentials are in no error.
pub async fn tunnel<S>(
    mut stream: S,
    proxy: &HttpProxy,
    target: &str,
    limit: Duration,
) -> io::Result<(Tunnel<S>, Opened)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let exchange = async {
        let request = request(proxy, target);
        stream.write_all(request.as_bytes()).await?;
        stream.flush().await?;
        read_answer(&mut stream).await
    };
    let answer = match tokio::time::timeout(limit, exchange).await {
        Ok(answer) => answer,
        Err(_) => {
            return Err(answer_problem(format!(
                "the proxy did not answer CONNECT within {limit:?}"
            )))
        }
    };
    let (head, rest) = match answer {
        Ok(answer) => answer,
        Err(error) if error.get_ref().is_some_and(|e| e.is::<TransportError>()) => {
            return Err(error)
        }
        Err(error) => {
            return Err(answer_problem(format!(
                "the connection to the proxy failed during CONNECT: {error}"
            )))
        }
    };
    let (status, reason) = status_line(&head).map_err(answer_problem)?;
    if !(200..300).contains(&status) {
        return Err(io::Error::other(TransportError::ProxyStatus {
            status,
            reason,
            credentials_sent: proxy.credentials.is_some(),
            target: target.to_owned(),
        }));
    }
    Ok((
        Tunnel {
            early: rest,
            read: 0,
            inner: stream,
        },
        Opened { status, reason },
    ))
}

/// The CONNECT request, with `Proxy-Authorization: Basic` when the proxy has credentials.
fn request(proxy: &HttpProxy, target: &str) -> String {
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(credentials) = &proxy.credentials {
        let token = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            credentials.user.expose(),
            credentials.password.expose()
        ));
        request.push_str("Proxy-Authorization: Basic ");
        request.push_str(&token);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    request
}

fn answer_problem(problem: String) -> io::Error {
    io::Error::other(TransportError::ProxyAnswer(problem))
}

/// Reads up to the end of the headers: the head, and any bytes read past it.
async fn read_answer<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(String, Vec<u8>)> {
    let mut buffer = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(answer_problem(match buffer.is_empty() {
                true => "the proxy closed the connection without answering CONNECT".to_owned(),
                false => "the proxy closed the connection in the middle of its answer".to_owned(),
            }));
        }
        let searched_from = buffer.len().saturating_sub(3);
        buffer.extend_from_slice(&chunk[..n]);
        let start = &buffer[..buffer.len().min(5)];
        if !b"HTTP/".starts_with(start) {
            // Not HTTP: no point waiting for the end of headers that never come.
            let line = String::from_utf8_lossy(&buffer);
            return Err(answer_problem(status_line(&line).err().unwrap_or_default()));
        }
        if let Some(end) = find(&buffer[searched_from..], b"\r\n\r\n") {
            let end = searched_from + end + 4;
            let rest = buffer.split_off(end);
            return Ok((String::from_utf8_lossy(&buffer).into_owned(), rest));
        }
        if buffer.len() > MAX_ANSWER {
            return Err(answer_problem(format!(
                "the proxy's answer to CONNECT has no end of headers within {MAX_ANSWER} bytes"
            )));
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `HTTP/1.1 200 Connection established` -> (200, "Connection established").
fn status_line(head: &str) -> Result<(u16, String), String> {
    let line = head.lines().next().unwrap_or("");
    let not_http = || {
        format!(
            "the proxy's answer to CONNECT is not HTTP (it begins {:?}): is it an HTTP proxy?",
            printable(line, 40)
        )
    };
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(not_http());
    }
    let status = parts
        .next()
        .and_then(|code| code.parse::<u16>().ok())
        .filter(|code| (100..600).contains(code))
        .ok_or_else(not_http)?;
    Ok((status, printable(parts.next().unwrap_or("").trim(), 100)))
}

/// Text from outside, safe for one log line: control characters escaped,
/// at most `max` characters.
pub(crate) fn printable(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max)
        .flat_map(|c| match c.is_control() {
            true => c.escape_default().collect::<Vec<_>>(),
            false => vec![c],
        })
        .collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

/// The tunnel's stream: bytes the proxy sent after its headers (none, with
/// every proxy we know, since the broker never speaks first), then the stream.
#[derive(Debug)]
pub struct Tunnel<S> {
    early: Vec<u8>,
    read: usize,
    inner: S,
}

impl<S> Tunnel<S> {
    /// The stream with nothing read ahead: a direct connection.
    pub fn direct(inner: S) -> Self {
        Self {
            early: Vec::new(),
            read: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tunnel<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read < self.early.len() {
            let n = buf.remaining().min(self.early.len() - self.read);
            let start = self.read;
            buf.put_slice(&self.early[start..start + n]);
            self.read += n;
            if self.read == self.early.len() {
                self.early = Vec::new();
                self.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tunnel<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ProxyCredentials, Secret};

    fn proxy(credentials: bool) -> HttpProxy {
        HttpProxy {
            host: "proxy".into(),
            port: 3128,
            credentials: credentials.then(|| ProxyCredentials {
                user: Secret::new("alice"),
                password: Secret::new("s3:cr@t"),
            }),
        }
    }

    /// Plays the proxy: reads the request, answers `answer`, returns the request.
    async fn exchange(
        credentials: bool,
        answer: &'static [u8],
    ) -> (
        String,
        io::Result<(Tunnel<tokio::io::DuplexStream>, Opened)>,
    ) {
        let (ours, mut theirs) = tokio::io::duplex(4096);
        let proxy_side = tokio::spawn(async move {
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                head.push(theirs.read_u8().await.unwrap());
            }
            let head = String::from_utf8(head).unwrap();
            theirs.write_all(answer).await.unwrap();
            (head, theirs)
        });
        let result = tunnel(
            ours,
            &proxy(credentials),
            "broker:8883",
            Duration::from_secs(5),
        )
        .await;
        let (head, _theirs) = proxy_side.await.unwrap();
        (head, result)
    }

    fn transport_error(error: &io::Error) -> &TransportError {
        error.get_ref().unwrap().downcast_ref().unwrap()
    }

    #[tokio::test]
    async fn a_tunnel_keeps_what_came_after_the_headers() {
        let (head, result) = exchange(
            true,
            b"HTTP/1.0 200 Connection established\r\nProxy-Agent: x\r\n\r\nearly",
        )
        .await;
        assert!(
            head.starts_with("CONNECT broker:8883 HTTP/1.1\r\nHost: broker:8883\r\n"),
            "{head}"
        );
        // base64("alice:s3:cr@t")
        assert!(
            head.contains("Proxy-Authorization: Basic YWxpY2U6czM6Y3JAdA==\r\n"),
            "{head}"
        );
        let (mut tunnel, opened) = result.unwrap();
        assert_eq!(opened.status, 200);
        let mut early = [0u8; 5];
        tunnel.read_exact(&mut early).await.unwrap();
        assert_eq!(&early, b"early");
    }

    #[tokio::test]
    async fn refusals_keep_their_status_and_never_the_credentials() {
        for (answer, status) in [
            (
                &b"HTTP/1.0 407 Proxy Authentication Required\r\n\r\n"[..],
                407,
            ),
            (
                &b"HTTP/1.1 403 Access violation\r\nX: y\r\n\r\n<html>"[..],
                403,
            ),
            (&b"HTTP/1.1 502 Bad Gateway\r\n\r\n"[..], 502),
        ] {
            let (head, result) = exchange(true, answer).await;
            assert!(head.contains("Proxy-Authorization"));
            let error = result.unwrap_err();
            let TransportError::ProxyStatus {
                status: got,
                credentials_sent,
                ..
            } = transport_error(&error)
            else {
                panic!("{error:?}");
            };
            assert_eq!((*got, *credentials_sent), (status, true));
            let text = format!("{error} {error:?}");
            assert!(
                !text.contains("s3:cr@t") && !text.contains("YWxpY2U6"),
                "{text}"
            );
        }
        let (head, _) = exchange(false, b"HTTP/1.0 407 No\r\n\r\n").await;
        assert!(!head.contains("Proxy-Authorization"), "{head}");
    }

    #[tokio::test]
    async fn answers_that_are_not_http_are_named() {
        for (answer, problem) in [
            (&b"\x20\x02\x00\x00"[..], "not HTTP"),
            (&b"SSH-2.0-OpenSSH\r\n\r\n"[..], "not HTTP"),
            (&b"HTTP/1.1 abc\r\n\r\n"[..], "not HTTP"),
        ] {
            let (_, result) = exchange(false, answer).await;
            let error = result.unwrap_err();
            assert!(
                matches!(transport_error(&error), TransportError::ProxyAnswer(p) if p.contains(problem)),
                "{error:?}"
            );
        }
    }

    #[tokio::test]
    async fn endless_headers_and_silence_are_bounded() {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        theirs.write_all(b"HTTP/1.1 200 OK\r\nX: ").await.unwrap();
        theirs
            .write_all(&vec![b'x'; MAX_ANSWER + 2048])
            .await
            .unwrap();
        let error = tunnel(ours, &proxy(false), "b:1", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("no end of headers"), "{error}");

        let (ours, _theirs) = tokio::io::duplex(64);
        let error = tunnel(ours, &proxy(false), "b:1", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("did not answer"), "{error}");

        let (ours, theirs) = tokio::io::duplex(64);
        drop(theirs);
        let error = tunnel(ours, &proxy(false), "b:1", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("failed during CONNECT")
                || error.to_string().contains("without answering"),
            "{error}"
        );
    }

    #[test]
    fn reason_phrases_are_made_safe() {
        assert_eq!(
            status_line("HTTP/1.1 403 Bad\x1b[31m\r\n").unwrap(),
            (403, "Bad\\u{1b}[31m".to_owned())
        );
    }
}
