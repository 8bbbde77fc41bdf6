//! TLS to PostgreSQL: a small rustls adapter for tokio-postgres, and the
//! rustls configuration that `MANAGER_POSTGRES_SSLMODE` and libpq's file
//! variables make.
//!
//! tokio-postgres asks for TLS through [`MakeTlsConnect`] (one connector per
//! connection, given the host name), [`TlsConnect`] (the handshake over the
//! socket, after the server has answered `S` to the SSLRequest) and
//! [`TlsStream`] (the stream, and the server's certificate hash for SCRAM
//! channel binding). This is that, over tokio-rustls, with the crypto
//! provider the workspace already builds (aws-lc-rs).
//!
//! The modes, as libpq's:
//! - `prefer`: TLS if the server offers it; its certificate is not checked;
//! - `require`: TLS or nothing; the certificate is checked as `verify-ca`
//!   only when `MANAGER_POSTGRES_SSLROOTCERT` is set;
//! - `verify-ca`: the certificate must be signed by a CA of
//!   `MANAGER_POSTGRES_SSLROOTCERT` (or of the system's trust store), for
//!   any name;
//! - `verify-full`: the same, and valid for `MANAGER_POSTGRES_HOST`.
//!
//! A handshake that fails says why in operator's terms (which certificate,
//! which variable), so that the store's retry log and `/health` name it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};
use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

use propeller_mqtt::tls::danger::AcceptAnyServerCertificate;
use propeller_mqtt::ConfigError;

use super::config::{SslConfig, SslMode};

/// What the connector knows for its messages.
#[derive(Debug)]
struct Facts {
    /// Where trust comes from, e.g. `the CA in MANAGER_POSTGRES_SSLROOTCERT=/ca.crt`.
    trust: Option<String>,
    /// `MANAGER_POSTGRES_HOST=…`.
    host: String,
    /// `MANAGER_POSTGRES_SSLCERT=…`, when a client certificate is set.
    client_cert: Option<String>,
    /// The mode, for messages.
    mode: SslMode,
    /// `MANAGER_POSTGRES_`.
    prefix: String,
}

/// Makes a rustls connector per connection: tokio-postgres's
/// [`MakeTlsConnect`].
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
    facts: Arc<Facts>,
}

impl MakeRustls {
    /// The connector `ssl` describes, its files read and checked now; `None`
    /// for `disable`.
    ///
    /// # Errors
    ///
    /// A file that cannot be read or holds no usable certificate or key, or
    /// an empty system trust store, naming the variable and the path.
    pub fn load(ssl: &SslConfig) -> Result<Option<Self>, ConfigError> {
        if ssl.mode == SslMode::Disable {
            return Ok(None);
        }
        let provider = propeller_mqtt::tls::provider();
        // `require` checks the chain only when a CA is given, as libpq does.
        let checks_chain = match ssl.mode {
            SslMode::Disable | SslMode::Prefer => false,
            SslMode::Require => ssl.root_cert.is_some(),
            SslMode::VerifyCa | SslMode::VerifyFull => true,
        };
        let (verifier, trust): (Arc<dyn ServerCertVerifier>, _) = match checks_chain {
            false => (Arc::new(AcceptAnyServerCertificate(provider.clone())), None),
            true => {
                let (roots, trust) = roots(ssl)?;
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| tls_error(ssl, rustls::Error::General(e.to_string())))?;
                let verifier: Arc<dyn ServerCertVerifier> = match ssl.mode {
                    SslMode::VerifyFull => webpki,
                    _ => Arc::new(ChainOnly(webpki)),
                };
                (verifier, Some(trust))
            }
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_error(ssl, e))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match &ssl.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                builder.with_client_cert_resolver(propeller_mqtt::tls::client_certificate(
                    cert.var.clone(),
                    &cert.path,
                    key.var.clone(),
                    &key.path,
                    &provider,
                )?)
            }
        };
        Ok(Some(Self {
            config: Arc::new(config),
            facts: Arc::new(Facts {
                trust,
                host: ssl.host.clone(),
                client_cert: ssl
                    .client
                    .as_ref()
                    .map(|(cert, _)| format!("{}={}", cert.var, cert.path.display())),
                mode: ssl.mode,
                prefix: ssl.prefix.clone(),
            }),
        }))
    }
}

fn tls_error(ssl: &SslConfig, source: rustls::Error) -> ConfigError {
    ConfigError::Tls {
        var: format!("{}SSL*", ssl.prefix),
        source,
    }
}

/// The CAs of `MANAGER_POSTGRES_SSLROOTCERT`, or of the system's trust
/// store when it is unset; and where they come from, for messages.
fn roots(ssl: &SslConfig) -> Result<(RootCertStore, String), ConfigError> {
    let mut roots = RootCertStore::empty();
    match &ssl.root_cert {
        Some(file) => {
            let certs = propeller_mqtt::tls::ca_certificates(file.var.clone(), &file.path)?;
            let total = certs.len();
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ConfigError::Material {
                    var: file.var.clone(),
                    path: file.path.clone(),
                    problem: format!("none of its {total} certificates can be used as a CA: point it at the CA that signed the server's certificate"),
                });
            }
            Ok((
                roots,
                format!("a CA in {}={}", file.var, file.path.display()),
            ))
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let var = format!("{}SSLROOTCERT", ssl.prefix);
                return Err(ConfigError::NoTrustAnchors { ca_var: var });
            }
            Ok((roots, "a CA in the system's trust store".to_owned()))
        }
    }
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = TlsFailure;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, TlsFailure> {
        // verify-full's host was checked at startup. A host that is no valid
        // name (only possible where the name is not checked) gets no SNI.
        let name = ServerName::try_from(domain.to_owned()).or_else(|_| match self.facts.mode {
            SslMode::VerifyFull => Err(TlsFailure(format!(
                "{} is not a name a certificate can be checked against",
                self.facts.host
            ))),
            _ => Ok(ServerName::IpAddress(
                std::net::Ipv4Addr::UNSPECIFIED.into(),
            )),
        })?;
        Ok(RustlsConnect {
            config: self.config.clone(),
            facts: self.facts.clone(),
            name,
        })
    }
}

/// One handshake: tokio-postgres's [`TlsConnect`].
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    facts: Arc<Facts>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = TlsFailure;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream<S>, TlsFailure>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        let facts = self.facts;
        let name = self.name;
        Box::pin(async move {
            connector
                .connect(name, stream)
                .await
                .map(|stream| RustlsStream(Box::new(stream)))
                .map_err(|error| explain(&error, &facts))
        })
    }
}

/// Why a handshake failed, in the operator's terms.
#[derive(Debug)]
pub struct TlsFailure(String);

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsFailure {}

/// Names what failed: the server's certificate (untrusted, for another
/// name, expired), the server's refusal (of our certificate, or for want of
/// one), or the connection.
fn explain(error: &io::Error, facts: &Facts) -> TlsFailure {
    let Some(rustls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return TlsFailure(format!("the TLS handshake failed: {error}"));
    };
    let trust = facts.trust.as_deref().unwrap_or("a trusted CA");
    let line = match rustls {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the server's certificate is not valid for {} ({rustls}): connect by a name the certificate lists, or use verify-ca",
            facts.host
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!(
            "the server's certificate is not signed by {trust} ({rustls}), with sslmode={}: point the root certificate at the CA that signed the server's certificate",
            facts.mode.name()
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => format!("the server's certificate has expired ({rustls}): renew it on the server"),
        rustls::Error::InvalidCertificate(_) => {
            format!("the server's certificate is refused ({rustls})")
        }
        rustls::Error::AlertReceived(alert) => match (alert, &facts.client_cert) {
            (AlertDescription::CertificateRequired | AlertDescription::HandshakeFailure, None) => {
                format!(
                    "the server refused the TLS handshake ({rustls}): it may require a client certificate: set {prefix}SSLCERT and {prefix}SSLKEY",
                    prefix = facts.prefix
                )
            }
            (
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateExpired
                | AlertDescription::AccessDenied
                | AlertDescription::DecryptError,
                Some(cert),
            ) => format!(
                "the server refused our client certificate {cert} ({rustls}): have it signed by a CA in the server's ssl_ca_file"
            ),
            _ => format!("the server refused the TLS handshake ({rustls})"),
        },
        other => format!("the TLS handshake failed ({other})"),
    };
    TlsFailure(line)
}

/// A TLS connection to the server: tokio-postgres's [`TlsStream`].
pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S> TlsStream for RustlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// `tls-server-end-point` (RFC 5929): the hash of the server's
    /// certificate, so that SCRAM-SHA-256-PLUS binds the password exchange
    /// to this TLS session.
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        session
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|cert| server_end_point(cert))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

/// The certificate's hash with its signature's hash function, SHA-256 for
/// MD5 and SHA-1 (RFC 5929 §4.1); `None` when the function is not one of
/// these (Ed25519, RSA-PSS), and the exchange goes without binding.
fn server_end_point(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let der: &[u8] = cert.as_ref();
    match parsed.signature_algorithm.algorithm.to_id_string().as_str() {
        // md5WithRSA, sha1WithRSA, sha256WithRSA, ecdsa-with-SHA1, ecdsa-with-SHA256
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2" => Some(sha2::Sha256::digest(der).to_vec()),
        // sha384WithRSA, ecdsa-with-SHA384
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => Some(sha2::Sha384::digest(der).to_vec()),
        // sha512WithRSA, ecdsa-with-SHA512
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => Some(sha2::Sha512::digest(der).to_vec()),
        _ => None,
    }
}

impl<S> AsyncRead for RustlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S> AsyncWrite for RustlsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// `verify-ca`: the chain is checked as webpki does, the name is not.
/// (webpki checks the chain before the name, so a name error means the
/// chain was good.)
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::config::NamedFile;
    use std::path::PathBuf;

    fn ssl(mode: SslMode) -> SslConfig {
        SslConfig::for_tests(mode)
    }

    fn file(var: &str, path: &str) -> NamedFile {
        NamedFile {
            var: format!("MANAGER_POSTGRES_{var}"),
            path: PathBuf::from(path),
        }
    }

    fn error(ssl: &SslConfig) -> String {
        match MakeRustls::load(ssl) {
            Ok(_) => panic!("loaded"),
            Err(e) => propeller_mqtt::one_line(&e),
        }
    }

    #[test]
    fn disable_makes_no_connector_and_reads_nothing() {
        let mut config = ssl(SslMode::Disable);
        config.root_cert = Some(file("SSLROOTCERT", "/nonexistent/ca.crt"));
        assert!(MakeRustls::load(&config).unwrap().is_none());
        assert!(MakeRustls::load(&ssl(SslMode::Prefer)).unwrap().is_some());
        assert!(MakeRustls::load(&ssl(SslMode::Require)).unwrap().is_some());
    }

    #[test]
    fn unreadable_files_name_their_variable_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ssl(SslMode::VerifyFull);
        config.root_cert = Some(file("SSLROOTCERT", "/nonexistent/ca.crt"));
        let line = error(&config);
        assert!(
            line.starts_with("MANAGER_POSTGRES_SSLROOTCERT=/nonexistent/ca.crt: cannot read"),
            "{line}"
        );
        let key = dir.path().join("not-a-ca.pem");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        config.root_cert = Some(file("SSLROOTCERT", key.to_str().unwrap()));
        let line = error(&config);
        assert!(
            line.starts_with(&format!(
                "MANAGER_POSTGRES_SSLROOTCERT={}: holds a private key",
                key.display()
            )),
            "{line}"
        );
        let mut config = ssl(SslMode::Require);
        config.client = Some((
            file("SSLCERT", "/nonexistent/client.crt"),
            file("SSLKEY", "/nonexistent/client.key"),
        ));
        let line = error(&config);
        assert!(
            line.starts_with("MANAGER_POSTGRES_SSLCERT=/nonexistent/client.crt: cannot read"),
            "{line}"
        );
    }

    fn failure(error: rustls::Error, facts: &Facts) -> String {
        explain(&io::Error::new(io::ErrorKind::InvalidData, error), facts).to_string()
    }

    #[test]
    fn handshake_failures_name_the_certificate_and_the_variable() {
        let facts = Facts {
            trust: Some("a CA in MANAGER_POSTGRES_SSLROOTCERT=/ca.crt".to_owned()),
            host: "MANAGER_POSTGRES_HOST=db".to_owned(),
            client_cert: None,
            mode: SslMode::VerifyFull,
            prefix: "MANAGER_POSTGRES_".to_owned(),
        };
        let untrusted = failure(
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            &facts,
        );
        assert!(
            untrusted.starts_with("the server's certificate is not signed by a CA in MANAGER_POSTGRES_SSLROOTCERT=/ca.crt"),
            "{untrusted}"
        );
        let name = failure(
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
            &facts,
        );
        assert!(
            name.starts_with("the server's certificate is not valid for MANAGER_POSTGRES_HOST=db"),
            "{name}"
        );
        let wants = failure(
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
            &facts,
        );
        assert!(wants.contains("set MANAGER_POSTGRES_SSLCERT"), "{wants}");
        let io = explain(&io::Error::from(io::ErrorKind::ConnectionReset), &facts).to_string();
        assert!(io.starts_with("the TLS handshake failed"), "{io}");
    }
}
