//! Modules from an HTTP(S) server: `GET <PROXY_MODULES_URL>/<file>`, over
//! HTTP/1.1, with TLS from the same rules as the MQTT connection's.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::store::MAX_MODULE;

/// How long one download may take, connection included.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// A base URL, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    tls: bool,
    host: String,
    port: u16,
    /// Ends with `/`.
    path: String,
}

impl BaseUrl {
    /// Parses `http://host[:port][/path]` or `https://…`.
    ///
    /// # Errors
    ///
    /// What is wrong, for the error that names the variable.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (tls, rest) =
            match text.split_once("://") {
                Some(("http", rest)) => (false, rest),
                Some(("https", rest)) => (true, rest),
                _ => return Err(
                    "write an http:// or https:// URL, such as https://modules.example.com/wasm"
                        .into(),
                ),
            };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.contains('@') || path.contains(['?', '#']) {
            return Err("credentials, queries and fragments are not supported: write scheme://host[:port]/path".into());
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') => (
                host,
                port.parse::<u16>()
                    .map_err(|_| format!("{port:?} is not a port"))?,
            ),
            _ => (authority, default_port),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("the URL has no host".into());
        }
        let path = format!("{}/", path.trim_end_matches('/'));
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
            path,
        })
    }
}

impl BaseUrl {
    /// Whether downloads need TLS.
    pub fn is_https(&self) -> bool {
        self.tls
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        match self.host.contains(':') {
            true => write!(f, "{scheme}://[{}]:{}{}", self.host, self.port, self.path),
            false => write!(f, "{scheme}://{}:{}{}", self.host, self.port, self.path),
        }
    }
}

/// Downloads modules from one base URL.
pub struct HttpSource {
    base: BaseUrl,
    tls: Option<TlsConnector>,
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl HttpSource {
    /// A source at `base`; `tls` must be set for an https:// base.
    pub fn new(base: BaseUrl, tls: Option<tokio_rustls::rustls::ClientConfig>) -> Self {
        Self {
            base,
            tls: tls.map(|config| TlsConnector::from(Arc::new(config))),
        }
    }

    /// The base URL, for messages.
    pub fn base(&self) -> &BaseUrl {
        &self.base
    }

    /// `file` under the base: `None` on 404.
    ///
    /// # Errors
    ///
    /// Anything else that keeps the module from arriving, with the URL.
    pub async fn get(&self, file: &str) -> Result<Option<Bytes>, String> {
        let url = format!("{}{file}", self.base);
        tokio::time::timeout(DOWNLOAD_TIMEOUT, self.download(file))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {}s", DOWNLOAD_TIMEOUT.as_secs())))
            .map_err(|problem| format!("GET {url}: {problem}"))
    }

    async fn download(&self, file: &str) -> Result<Option<Bytes>, String> {
        let base = &self.base;
        let tcp = TcpStream::connect((base.host.as_str(), base.port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let stream: Box<dyn Stream> = match (&self.tls, base.tls) {
            (Some(connector), true) => {
                let name = ServerName::try_from(base.host.clone())
                    .map_err(|_| format!("{:?} is not a valid TLS server name", base.host))?;
                Box::new(
                    connector
                        .connect(name, tcp)
                        .await
                        .map_err(|e| format!("TLS handshake failed: {e}"))?,
                )
            }
            _ => Box::new(tcp),
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = Request::get(format!("{}{file}", base.path))
            .header(hyper::header::HOST, &base.host)
            .header(
                hyper::header::USER_AGENT,
                concat!("propeller-proxy/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            status if status.is_redirection() => {
                return Err(format!(
                    "answered {status}: redirects are not followed, set PROXY_MODULES_URL to the final address"
                ))
            }
            status => return Err(format!("answered {status}")),
        }
        let body = Limited::new(response.into_body(), MAX_MODULE)
            .collect()
            .await
            .map_err(|e| format!("the download failed: {e}"))?;
        Ok(Some(body.to_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let url = BaseUrl::parse("https://modules.example.com/wasm/").unwrap();
        assert_eq!(url.to_string(), "https://modules.example.com:443/wasm/");
        let url = BaseUrl::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(url.to_string(), "http://127.0.0.1:8080/");
        let url = BaseUrl::parse("http://[::1]:81/m").unwrap();
        assert_eq!(url.to_string(), "http://[::1]:81/m/");
        for bad in [
            "ftp://x",
            "x",
            "http://",
            "http://u:p@h/",
            "http://h:99999/",
            "http://h/?q",
        ] {
            assert!(BaseUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
