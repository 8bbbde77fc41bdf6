//! Reading certificates and keys from PEM files, with errors that say which
//! variable, which file, and what to do.

use std::path::{Path, PathBuf};

use pkcs8::der::{Decode, SecretDocument};
use rustls::pki_types::pem::{self, PemObject, SectionKind};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::{ConfigError, Secret};

/// A PEM file named by a variable, read once.
pub(crate) struct PemFile {
    pub var: String,
    pub path: PathBuf,
    bytes: Vec<u8>,
}

/// The largest PEM file read: a CA bundle of a few hundred certificates.
pub(crate) const MAX_FILE: u64 = 4 << 20;

/// The bytes of a regular file of at most [`MAX_FILE`] bytes. A FIFO, a
/// device such as `/dev/zero` or a huge file is refused before it is read,
/// so that a wrong path cannot hang the service or exhaust its memory.
pub(crate) fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > MAX_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} bytes, over the {MAX_FILE}-byte limit for a PEM file",
                meta.len()
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)?
        .take(MAX_FILE + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("it grew over the {MAX_FILE}-byte limit for a PEM file while read"),
        ));
    }
    Ok(bytes)
}

impl PemFile {
    pub fn read(var: String, path: &Path) -> Result<Self, ConfigError> {
        match read_file(path) {
            Ok(bytes) => Ok(Self {
                var,
                path: path.to_owned(),
                bytes,
            }),
            Err(source) => Err(ConfigError::Read {
                var,
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub fn problem(&self, problem: impl Into<String>) -> ConfigError {
        ConfigError::Material {
            var: self.var.clone(),
            path: self.path.clone(),
            problem: problem.into(),
        }
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.bytes
            .windows(needle.len())
            .any(|window| window == needle.as_bytes())
    }

    /// Every certificate in the file, in order; at least one.
    pub fn certificates(&self) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
        let certs = CertificateDer::pem_slice_iter(&self.bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.pem_error(e))?;
        if certs.is_empty() {
            return Err(self.problem(if self.contains("PRIVATE KEY-----") {
                "holds a private key but no certificate: is this the key file?"
            } else {
                "holds no PEM certificate (-----BEGIN CERTIFICATE-----): point it at a PEM certificate file"
            }));
        }
        Ok(certs)
    }

    /// The private key, decrypting it with `password` when it is encrypted PKCS#8.
    ///
    /// `password` is the value and the name of its variable, for errors.
    pub fn private_key(
        &self,
        password: Option<(&Secret, &str)>,
    ) -> Result<(PrivateKeyDer<'static>, KeyForm), ConfigError> {
        if self.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
            let Some((password, password_var)) = password else {
                let password_var = format!("{}_PASSWORD", self.var);
                return Err(self.problem(format!(
                    "the key is encrypted: set {password_var} to its password"
                )));
            };
            return self.decrypt(password, password_var);
        }
        if self.contains("Proc-Type: 4,ENCRYPTED") {
            return Err(self.problem(
                "the key uses legacy PEM encryption (Proc-Type: 4,ENCRYPTED), which we do not read: \
                 convert it with `openssl pkcs8 -topk8 -in OLD.key -out NEW.key` and set the password variable",
            ));
        }
        for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(&self.bytes) {
            let (kind, der) = section.map_err(|e| self.pem_error(e))?;
            let form = match kind {
                SectionKind::PrivateKey => KeyForm::Pkcs8,
                SectionKind::RsaPrivateKey => KeyForm::Pkcs1,
                SectionKind::EcPrivateKey => KeyForm::Sec1,
                _ => continue,
            };
            let key =
                PrivateKeyDer::from_pem(kind, der).ok_or_else(|| self.problem("unreadable key"))?;
            return Ok((key, form));
        }
        Err(
            self.problem(if self.contains("-----BEGIN CERTIFICATE-----") {
                "holds a certificate but no private key: is this the certificate file?"
            } else {
                "holds no PEM private key (BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)"
            }),
        )
    }

    fn decrypt(
        &self,
        password: &Secret,
        password_var: &str,
    ) -> Result<(PrivateKeyDer<'static>, KeyForm), ConfigError> {
        let text =
            std::str::from_utf8(&self.bytes).map_err(|_| self.problem("is not a text PEM file"))?;
        let begin = text
            .find("-----BEGIN ENCRYPTED PRIVATE KEY-----")
            .unwrap_or_default();
        let (_, document) = SecretDocument::from_pem(&text[begin..])
            .map_err(|e| self.problem(format!("the encrypted key is not valid PEM ({e})")))?;
        let encrypted = pkcs8::EncryptedPrivateKeyInfo::from_der(document.as_bytes())
            .map_err(|e| self.problem(format!("the encrypted key is malformed ({e})")))?;
        let wrong = || {
            self.problem(format!(
                "cannot decrypt the key with {password_var}: the password is wrong, \
                 or the key is not PBES2 (AES-CBC with PBKDF2 or scrypt, what OpenSSL 3 writes)"
            ))
        };
        let decrypted = encrypted.decrypt(password.expose()).map_err(|_| wrong())?;
        // A wrong password passes the padding check about once in 256 tries; the
        // DER that comes out then does not parse.
        pkcs8::PrivateKeyInfo::from_der(decrypted.as_bytes()).map_err(|_| wrong())?;
        let der = PrivatePkcs8KeyDer::from(decrypted.as_bytes().to_vec());
        Ok((PrivateKeyDer::Pkcs8(der), KeyForm::EncryptedPkcs8))
    }

    fn pem_error(&self, error: pem::Error) -> ConfigError {
        self.problem(format!(
            "is not valid PEM ({error}): check that the file is complete"
        ))
    }
}

/// How a private key was stored, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyForm {
    /// `BEGIN PRIVATE KEY`.
    Pkcs8,
    /// `BEGIN RSA PRIVATE KEY`.
    Pkcs1,
    /// `BEGIN EC PRIVATE KEY`.
    Sec1,
    /// `BEGIN ENCRYPTED PRIVATE KEY`.
    EncryptedPkcs8,
}
