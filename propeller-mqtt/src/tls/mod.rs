//! Turns the TLS variables into a rustls `ClientConfig`, reading and checking
//! every file before the first connection.
//!
//! The config is built once and shared (`Arc`) across reconnects so that TLS
//! session resumption makes reconnects cheap.

mod identity;
mod pem;
mod verify;

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::ResolvesClientCert;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

pub(crate) use identity::unix_now;
pub use identity::CertificateFacts;
pub use identity::{client_certificate, days_until};
pub use pem::KeyForm;

/// Verifiers that weaken what TLS checks, for callers that must offer what
/// libpq or an operator's "skip verify" setting means.
pub mod danger {
    pub use super::verify::SkipVerify as AcceptAnyServerCertificate;
}

use crate::{ConfigError, Names, Secret, TlsSettings, Warning};
use identity::{ClientIdentity, PresentCertificate};
use pem::PemFile;
use verify::{SkipVerify, VerifyAs};

/// A checked TLS setup, ready to connect with.
#[derive(Debug, Clone)]
pub struct TlsSetup {
    /// The rustls configuration handed to rumqttc.
    pub client_config: Arc<ClientConfig>,
    /// Where trust comes from.
    pub trust: Trust,
    /// Our certificate under mTLS.
    pub identity: Option<CertificateFacts>,
    /// What the operator should know.
    pub warnings: Vec<Warning>,
}

/// The trust anchors for the broker's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The CA file or directory of `<P>_MQTT_TLS_CA_CERT`, with its number of certificates.
    Configured(usize),
    /// The OS trust store, with its number of certificates.
    System(usize),
    /// Nothing is verified (`<P>_MQTT_TLS_INSECURE_SKIP_VERIFY=true`).
    SkipVerify,
}

/// A hash of every TLS file's bytes (or of why it cannot be read), to tell
/// cheaply whether anything changed since the setup in use was built.
pub(crate) fn fingerprint(settings: &TlsSettings) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    let mut add = |path: &Path| match pem::read_file(path) {
        Ok(bytes) => bytes.hash(&mut hasher),
        Err(error) => error.kind().hash(&mut hasher),
    };
    if let Some(ca) = &settings.ca {
        match std::fs::read_dir(ca) {
            Ok(entries) => {
                let mut files: Vec<_> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
                files.sort();
                files.iter().for_each(|file| add(file));
            }
            Err(_) => add(ca),
        }
    }
    if let Some(identity) = &settings.identity {
        add(&identity.cert);
        add(&identity.key);
    }
    hasher.finish()
}

/// The one crypto provider we compile: aws-lc-rs.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(aws_lc_rs::default_provider())
}

/// A rustls configuration for HTTPS (the proxy's module source), trusting
/// what `var` names (a PEM bundle or directory) or, when `ca` is `None`, the
/// OS trust store: the same rules as `<P>_MQTT_TLS_CA_CERT`.
///
/// # Errors
///
/// The CA file cannot be read or holds no usable certificate, naming `var`.
pub fn https_client_config(
    var: String,
    ca: Option<&Path>,
) -> Result<(ClientConfig, Vec<Warning>), ConfigError> {
    let mut warnings = Vec::new();
    let (_, roots) = trust_anchors(var.clone(), ca, &mut warnings)?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| ConfigError::Tls {
            var: var.clone(),
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok((config, warnings))
}

/// The pieces of a TLS setup before they become a `ClientConfig`, so that
/// `check` can wrap the verifier and the certificate resolver to watch them.
pub struct Parts {
    /// The crypto provider.
    pub provider: Arc<CryptoProvider>,
    /// How the broker's certificate is checked.
    pub verifier: Arc<dyn ServerCertVerifier>,
    /// What presents our certificate, for mTLS.
    pub resolver: Option<Arc<dyn ResolvesClientCert>>,
    /// Where trust comes from.
    pub trust: Trust,
    /// Our certificate, as read.
    pub identity: Option<CertificateFacts>,
    /// What is worth an operator's attention.
    pub warnings: Vec<Warning>,
    /// What errors call the TLS settings, e.g. `SENSOR_MQTT_TLS_*`.
    pub tls_var: String,
    /// The application protocols offered (ALPN), in order.
    pub alpn: Vec<Vec<u8>>,
}

/// rustls refused what the settings make.
fn tls_error(names: &Names, source: rustls::Error) -> ConfigError {
    ConfigError::Tls {
        var: names.var("MQTT_TLS_*"),
        source,
    }
}

impl Parts {
    /// Reads and checks the TLS files of `config`; `None` for plain MQTT.
    pub fn load(
        settings: &TlsSettings,
        names: &Names,
        client_key: &Secret,
    ) -> Result<Self, ConfigError> {
        let provider = provider();
        let mut warnings = Vec::new();

        let (trust, verifier): (Trust, Arc<dyn ServerCertVerifier>) =
            if settings.insecure_skip_verify {
                if let Some(ca) = &settings.ca {
                    // Still read it: a broken path should not go unnoticed until the day
                    // someone turns verification back on.
                    ca_certificates(names.var("MQTT_TLS_CA_CERT"), ca)?;
                }
                warnings.push(Warning::InsecureSkipVerify {
                    var: names.var("MQTT_TLS_INSECURE_SKIP_VERIFY"),
                });
                (Trust::SkipVerify, Arc::new(SkipVerify(provider.clone())))
            } else {
                let (trust, roots) = trust_anchors(
                    names.var("MQTT_TLS_CA_CERT"),
                    settings.ca.as_deref(),
                    &mut warnings,
                )?;
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| tls_error(names, rustls::Error::General(e.to_string())))?;
                let verifier: Arc<dyn ServerCertVerifier> = match &settings.server_name {
                    Some(name) => Arc::new(VerifyAs {
                        inner: webpki,
                        // Checked when the config was parsed; this cannot fail.
                        name: ServerName::try_from(name.clone())
                            .map_err(|e| tls_error(names, rustls::Error::General(e.to_string())))?,
                    }),
                    None => webpki,
                };
                (trust, verifier)
            };

        let identity = settings
            .identity
            .as_ref()
            .map(|files| {
                let identity = ClientIdentity::load(names, files, &provider)?;
                warnings.extend(identity.warnings(names, client_key, files));
                Ok::<_, ConfigError>(identity)
            })
            .transpose()?;
        Ok(Self {
            provider,
            verifier,
            resolver: identity.as_ref().map(|i| {
                Arc::new(PresentCertificate(i.certified.clone())) as Arc<dyn ResolvesClientCert>
            }),
            trust,
            identity: identity.map(|i| i.facts),
            warnings,
            tls_var: names.var("MQTT_TLS_*"),
            alpn: settings
                .alpn
                .iter()
                .map(|p| p.as_bytes().to_vec())
                .collect(),
        })
    }

    /// The rustls configuration these parts make.
    pub fn client_config(&self) -> Result<ClientConfig, ConfigError> {
        self.assemble(self.verifier.clone(), self.resolver.clone())
    }

    /// The same configuration around another verifier and resolver.
    pub fn assemble(
        &self,
        verifier: Arc<dyn ServerCertVerifier>,
        resolver: Option<Arc<dyn ResolvesClientCert>>,
    ) -> Result<ClientConfig, ConfigError> {
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| ConfigError::Tls {
                var: self.tls_var.clone(),
                source,
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match resolver {
            Some(resolver) => builder.with_client_cert_resolver(resolver),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        Ok(config)
    }
}

impl TlsSetup {
    /// Reads and checks the TLS files of `config`; `None` for plain MQTT.
    ///
    /// # Errors
    ///
    /// A missing or unreadable file, PEM without the expected content, an
    /// encrypted key without (or with a wrong) password, a key that does not
    /// match its certificate, or no usable trust anchor.
    pub fn load(
        settings: &TlsSettings,
        names: &Names,
        client_key: &Secret,
    ) -> Result<Self, ConfigError> {
        let parts = Parts::load(settings, names, client_key)?;
        Ok(Self {
            client_config: Arc::new(parts.client_config()?),
            trust: parts.trust,
            identity: parts.identity,
            warnings: parts.warnings,
        })
    }
}

/// The CA certificates that `var` names, or the OS trust store when it is unset.
fn trust_anchors(
    var: String,
    ca: Option<&Path>,
    warnings: &mut Vec<Warning>,
) -> Result<(Trust, RootCertStore), ConfigError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(ca) => {
            let certs = ca_certificates(var.clone(), ca)?;
            let total = certs.len();
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ConfigError::Material {
                    var,
                    path: ca.to_owned(),
                    problem: format!(
                        "none of its {total} certificates can be used as a CA: point it at the CA certificate (ca.crt)"
                    ),
                });
            }
            Ok((Trust::Configured(added), roots))
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if let Some(first) = found.errors.first() {
                warnings.push(Warning::SystemTrustStore {
                    count: found.errors.len(),
                    first: first.to_string(),
                    loaded: added,
                });
            }
            if added == 0 {
                return Err(ConfigError::NoTrustAnchors { ca_var: var });
            }
            Ok((Trust::System(added), roots))
        }
    }
}

/// The certificates of a CA bundle file, or of every PEM file in a directory.
pub fn ca_certificates(
    var: String,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    if !path.is_dir() {
        return PemFile::read(var, path)?.certificates();
    }
    let entries = std::fs::read_dir(path).map_err(|source| ConfigError::Read {
        var: var.clone(),
        path: path.to_owned(),
        source,
    })?;
    let mut files: Vec<_> = entries
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    // A CA directory (like /etc/ssl/certs) also holds other files: skip what is
    // not a certificate, and fail only when nothing is.
    let certs: Vec<_> = files
        .iter()
        .filter_map(|p| PemFile::read(var.clone(), p).ok()?.certificates().ok())
        .flatten()
        .collect();
    if certs.is_empty() {
        return Err(ConfigError::Material {
            var,
            path: path.to_owned(),
            problem:
                "is a directory with no PEM certificate file in it: point it at the CA certificate"
                    .to_owned(),
        });
    }
    Ok(certs)
}
