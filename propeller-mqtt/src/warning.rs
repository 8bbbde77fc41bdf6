//! Problems worth an operator's attention that do not stop a service.

use std::path::PathBuf;

/// A configuration that works now but is likely to fail, or is unsafe.
///
/// Like [`ConfigError`](crate::ConfigError), messages name variables and paths, never secret
/// values or the client certificate's CN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Warning {
    /// The client certificate is past its end date.
    #[error("the certificate in {var} has expired: the broker will refuse it; issue a new one")]
    ClientCertificateExpired {
        /// The certificate variable.
        var: String,
    },
    /// The client certificate ends within 30 days.
    #[error("the certificate in {var} expires in {days_left} days: issue a new one before then")]
    ClientCertificateExpiresSoon {
        /// The certificate variable.
        var: String,
        /// Whole days until it expires.
        days_left: i64,
    },
    /// The client certificate's start date is in the future.
    #[error("the certificate in {var} is not valid yet: check this machine's clock")]
    ClientCertificateNotYetValid {
        /// The certificate variable.
        var: String,
    },
    /// The mTLS edge drops a connection whose password does not end with the CN.
    #[error("{key_var} does not end with the CN of the certificate in {cert_var}: an mTLS edge will close the connection; use the client secret the certificate was made for")]
    ClientKeyNotCertificateCn {
        /// The client key variable.
        key_var: String,
        /// The certificate variable.
        cert_var: String,
    },
    /// The private key file can be read by group or others.
    #[error("{var}={path}: the key file is readable by group or others (mode {mode:o}): chmod 600 it", path = path.display())]
    KeyFileReadableByOthers {
        /// The key variable.
        var: String,
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key password is set but the key is not encrypted.
    #[error("{var} is set but the key is not encrypted: the password is ignored")]
    KeyPasswordUnused {
        /// The password variable.
        var: String,
    },
    /// Some certificates of the OS trust store could not be loaded.
    #[error("{count} errors loading the system trust store (first: {first}); using the {loaded} certificates that loaded")]
    SystemTrustStore {
        /// How many errors.
        count: usize,
        /// The first error.
        first: String,
        /// How many certificates did load.
        loaded: usize,
    },
    /// Server verification is off.
    #[error("{var} is true: the broker's certificate is NOT verified, anyone on the path can impersonate it; set {var}=false and a CA instead")]
    InsecureSkipVerify {
        /// The skip-verify variable.
        var: String,
    },
}
