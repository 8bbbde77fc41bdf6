//! Our client certificate for mTLS.
//!
//! rustls parses a client certificate with webpki, which refuses X.509 v1, yet
//! upstream's Makefile writes v1 client certificates and nginx and mosquitto
//! accept them. So we build the `CertifiedKey` ourselves, check that the key
//! matches with x509-parser, and present it through our own resolver.

use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::pem::{KeyForm, PemFile};
use crate::{ConfigError, IdentityFiles, Names, Secret, Warning};

/// What we learned about the client certificate, for warnings and reports.
/// The CN is kept as a [`Secret`]: under Magistrala mTLS it is the client key.
#[derive(Debug, Clone)]
pub struct CertificateFacts {
    /// X.509 version: 1 or 3.
    pub version: u32,
    /// Seconds since the epoch after which the certificate is invalid.
    pub not_after: i64,
    /// Seconds since the epoch before which the certificate is invalid.
    pub not_before: i64,
    /// The subject's common name.
    pub common_name: Option<Secret>,
    /// How the key was stored.
    pub key_form: KeyForm,
}

/// A loaded, checked client identity.
#[derive(Debug)]
pub(crate) struct ClientIdentity {
    pub certified: Arc<CertifiedKey>,
    pub facts: CertificateFacts,
}

impl ClientIdentity {
    pub fn load(
        names: &Names,
        files: &IdentityFiles,
        provider: &CryptoProvider,
    ) -> Result<Self, ConfigError> {
        let cert_file = PemFile::read(names.var("MQTT_TLS_CLIENT_CERT"), &files.cert)?;
        let key_file = PemFile::read(names.var("MQTT_TLS_CLIENT_KEY"), &files.key)?;
        let password_var = names.var("MQTT_TLS_CLIENT_KEY_PASSWORD");
        let password = files
            .key_password
            .as_ref()
            .map(|p| (p, password_var.as_str()));
        Self::from_files(&cert_file, &key_file, password, provider)
    }

    fn from_files(
        cert_file: &PemFile,
        key_file: &PemFile,
        password: Option<(&Secret, &str)>,
        provider: &CryptoProvider,
    ) -> Result<Self, ConfigError> {
        let chain = cert_file.certificates()?;
        let (key, key_form) = key_file.private_key(password)?;

        let signing_key = provider.key_provider.load_private_key(key).map_err(|e| {
            key_file.problem(format!(
                "the key is not usable for TLS ({e}): use an RSA (2048 bits or more) or ECDSA P-256/P-384/P-521 key"
            ))
        })?;
        let leaf = parse_certificate(cert_file, &chain[0])?;
        let key_matches = signing_key
            .public_key()
            .is_some_and(|public| public.as_ref() == leaf.tbs_certificate.subject_pki.raw);
        if !key_matches {
            return Err(ConfigError::KeyMismatch {
                cert_var: cert_file.var.clone(),
                cert_path: cert_file.path.clone(),
                key_var: key_file.var.clone(),
                key_path: key_file.path.clone(),
            });
        }

        let facts = CertificateFacts {
            version: leaf.version().0 + 1,
            not_before: leaf.validity().not_before.timestamp(),
            not_after: leaf.validity().not_after.timestamp(),
            common_name: leaf
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(Secret::new),
            key_form,
        };
        Ok(Self {
            certified: Arc::new(CertifiedKey::new(chain, signing_key)),
            facts,
        })
    }

    /// Warnings about an identity that loads but will likely be refused.
    pub fn warnings(
        &self,
        names: &Names,
        client_key: &Secret,
        files: &IdentityFiles,
    ) -> Vec<Warning> {
        let mut warnings = Vec::new();
        let cert_var = names.var("MQTT_TLS_CLIENT_CERT");
        let now = unix_now();
        let days_left = days_until(self.facts.not_after);
        if self.facts.not_after < now {
            warnings.push(Warning::ClientCertificateExpired {
                var: cert_var.clone(),
            });
        } else if days_left < 30 {
            warnings.push(Warning::ClientCertificateExpiresSoon {
                var: cert_var.clone(),
                days_left,
            });
        }
        if self.facts.not_before > now {
            warnings.push(Warning::ClientCertificateNotYetValid { var: cert_var });
        }
        let cn_matches = self
            .facts
            .common_name
            .as_ref()
            .is_some_and(|cn| client_key.expose().ends_with(cn.expose()));
        if !cn_matches {
            warnings.push(Warning::ClientKeyNotCertificateCn {
                key_var: names.var("CLIENT_KEY"),
                cert_var: names.var("MQTT_TLS_CLIENT_CERT"),
            });
        }
        if let Some(mode) = loose_permissions(&files.key) {
            warnings.push(Warning::KeyFileReadableByOthers {
                var: names.var("MQTT_TLS_CLIENT_KEY"),
                path: files.key.clone(),
                mode,
            });
        }
        if files.key_password.is_some() && self.facts.key_form != KeyForm::EncryptedPkcs8 {
            warnings.push(Warning::KeyPasswordUnused {
                var: names.var("MQTT_TLS_CLIENT_KEY_PASSWORD"),
            });
        }
        warnings
    }
}

fn parse_certificate<'a>(
    file: &PemFile,
    der: &'a CertificateDer<'_>,
) -> Result<X509Certificate<'a>, ConfigError> {
    X509Certificate::from_der(der.as_ref())
        .map(|(_, cert)| cert)
        .map_err(|e| file.problem(format!("the first certificate is not valid X.509 ({e})")))
}

/// A client certificate and its key for a TLS client other than MQTT's
/// (the manager's PostgreSQL store), read and checked as
/// `<P>_MQTT_TLS_CLIENT_CERT` and `_KEY` are: X.509 v1 accepted, the key
/// matched to the certificate; presented whenever the server asks. An
/// encrypted key is refused: there is no password variable for it.
///
/// # Errors
///
/// A file that cannot be read or holds no certificate or key, an encrypted
/// key, or a key that does not match the certificate, naming the variable
/// and the path.
pub fn client_certificate(
    cert_var: String,
    cert: &Path,
    key_var: String,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<dyn ResolvesClientCert>, ConfigError> {
    let cert_file = PemFile::read(cert_var, cert)?;
    let key_file = PemFile::read(key_var, key)?;
    if key_file.contains("ENCRYPTED") {
        return Err(key_file.problem(
            "the key is encrypted, and there is no password variable for it: write it decrypted \
             (openssl pkey -in ENCRYPTED.key -out PLAIN.key) and make it readable by this service alone (chmod 600)",
        ));
    }
    let identity = ClientIdentity::from_files(&cert_file, &key_file, None, provider)?;
    Ok(Arc::new(PresentCertificate(identity.certified)))
}

/// Seconds since the Unix epoch, as certificates count time.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Whole days from now until `timestamp`; negative once it has passed.
pub fn days_until(timestamp: i64) -> i64 {
    (timestamp - unix_now()).div_euclid(86_400)
}

/// The file's mode when group or others may read it.
#[cfg(unix)]
fn loose_permissions(path: &std::path::Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o044 != 0).then_some(mode)
}

#[cfg(not(unix))]
fn loose_permissions(_: &std::path::Path) -> Option<u32> {
    None
}

/// Presents our certificate whenever the server asks and our key can sign with
/// one of the schemes it offers.
#[derive(Debug)]
pub(crate) struct PresentCertificate(pub Arc<CertifiedKey>);

impl ResolvesClientCert for PresentCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        schemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0
            .key
            .choose_scheme(schemes)
            .is_some()
            .then(|| Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}
