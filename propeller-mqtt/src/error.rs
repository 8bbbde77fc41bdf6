//! The crate's errors, by layer: [`ConfigError`] for settings and TLS files,
//! found before any network I/O, and [`ClientError`] for what a running
//! client refuses. Connection failures are neither: they are
//! [`Failure`](crate::Failure)s, retried with backoff.

use std::path::PathBuf;

/// A configuration problem, found before any network I/O.
///
/// Every message names the variable, the value or path at fault, and what to do.
/// Values of secret variables (client key, key password) are never included.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A required variable is unset or empty.
    #[error("{var} is not set: {fix}")]
    Missing {
        /// The full variable name, e.g. `PROPLET_CLIENT_ID`.
        var: String,
        /// What to set it to.
        fix: &'static str,
    },

    /// A variable has a value that cannot be used.
    #[error("{var}={value:?} is not valid: {problem}")]
    Invalid {
        /// The full variable name.
        var: String,
        /// The value as given (never a secret).
        value: String,
        /// What is wrong with it and what to write instead.
        problem: String,
    },

    /// A secret variable cannot be used; its value is not repeated.
    #[error("{var} is not valid: {problem}")]
    InvalidSecret {
        /// The full variable name.
        var: String,
        /// What is wrong and what to do.
        problem: String,
    },

    /// A file named by a variable cannot be read.
    #[error("{var}={path}: cannot read the file (check the path, the volume mount and the file's permissions)", path = path.display())]
    Read {
        /// The variable that names the file.
        var: String,
        /// The path as given.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// A PEM file was read but its content is not what the variable needs.
    #[error("{var}={path}: {problem}", path = path.display())]
    Material {
        /// The variable that names the file.
        var: String,
        /// The path as given.
        path: PathBuf,
        /// What is wrong with the content and what to do.
        problem: String,
    },

    /// Only one of the client certificate and key is set.
    #[error("{set} is set but {unset} is not: mTLS needs both, TLS with a server certificate only needs neither")]
    HalfClientIdentity {
        /// The variable that is set.
        set: String,
        /// The variable that is missing.
        unset: String,
    },

    /// The client key does not belong to the client certificate.
    #[error("{key_var}={key_path} does not match the certificate in {cert_var}={cert_path}: point both at the same key pair", key_path = key_path.display(), cert_path = cert_path.display())]
    KeyMismatch {
        /// The certificate variable.
        cert_var: String,
        /// The certificate file.
        cert_path: PathBuf,
        /// The key variable.
        key_var: String,
        /// The key file.
        key_path: PathBuf,
    },

    /// TLS variables are set but the address would connect in plaintext.
    #[error("{vars} set, but {address_var}={address:?} is plain MQTT: use an ssl:// (or wss://) address for TLS, or unset the TLS variables (we never fall back to plaintext)")]
    TlsWithPlainAddress {
        /// The TLS variables that are set, comma separated.
        vars: String,
        /// The address variable.
        address_var: String,
        /// The plain address.
        address: String,
    },

    /// No CA was configured and the OS trust store gave no usable certificate.
    #[error("{ca_var} is not set and the system trust store has no usable CA certificate: set {ca_var} to the CA that signed the broker's certificate")]
    NoTrustAnchors {
        /// The CA variable.
        ca_var: String,
    },

    /// The outbox directory cannot be used: not a directory, not writable.
    #[error("{var}={path}: {problem}", path = path.display())]
    OutboxDir {
        /// The outbox directory variable.
        var: String,
        /// The directory as given.
        path: PathBuf,
        /// What is wrong and what to do.
        problem: String,
        /// What the operating system said, if it said something.
        #[source]
        source: Option<std::io::Error>,
    },

    /// Another process holds the outbox directory's lock.
    #[error("another process uses {path} ({var}): give each process its own directory", path = path.display())]
    OutboxInUse {
        /// The outbox directory variable.
        var: String,
        /// The directory.
        path: PathBuf,
    },

    /// rustls refused the assembled configuration.
    #[error("{var}: cannot build the TLS configuration")]
    Tls {
        /// The variables of the TLS settings, e.g. `SENSOR_MQTT_TLS_*`.
        var: String,
        /// What rustls said.
        #[source]
        source: rustls::Error,
    },
}

impl ConfigError {
    /// The variable (or variables) at fault, e.g. `SENSOR_MQTT_TLS_CA_CERT`.
    pub fn var(&self) -> &str {
        match self {
            ConfigError::Missing { var, .. }
            | ConfigError::Invalid { var, .. }
            | ConfigError::InvalidSecret { var, .. }
            | ConfigError::Read { var, .. }
            | ConfigError::Material { var, .. }
            | ConfigError::OutboxDir { var, .. }
            | ConfigError::OutboxInUse { var, .. }
            | ConfigError::NoTrustAnchors { ca_var: var }
            | ConfigError::Tls { var, .. } => var,
            ConfigError::HalfClientIdentity { set, .. } => set,
            ConfigError::KeyMismatch { key_var, .. } => key_var,
            ConfigError::TlsWithPlainAddress { address_var, .. } => address_var,
        }
    }
}

/// What a running [`Client`](crate::Client) refuses.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The client was shut down; nothing more can be sent.
    #[error("the MQTT client has shut down")]
    Closed,

    /// Too many messages wait for the broker's acknowledgement.
    #[error("{limit} messages already wait for the broker's acknowledgement ({var}): wait for deliveries, or raise {var}")]
    OutboxFull {
        /// The outbox limit variable.
        var: String,
        /// Its value.
        limit: usize,
    },

    /// The outbox directory could not store a message (a full disk, lost
    /// permissions): it was not queued.
    #[error("cannot store the message in the outbox directory {path} ({var}), so it was not queued: free space on its file system or fix its permissions", path = path.display())]
    OutboxWrite {
        /// The outbox directory variable.
        var: String,
        /// The directory.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// A message that could never be sent: over the packet size limit.
    #[error("a message of {size} bytes on {topic} is over the {limit}-byte packet limit ({var}): it is refused, not queued; send less, or raise {var} and the broker's limit (mosquitto's message_size_limit)")]
    TooLarge {
        /// The packet size limit variable.
        var: String,
        /// The topic, cut to a readable length.
        topic: String,
        /// The PUBLISH packet's size.
        size: usize,
        /// Its value.
        limit: usize,
    },
}

/// Renders an error and all its causes on one line, `outer: inner: innermost`,
/// for a service's last words.
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        line.push_str(": ");
        line.push_str(&inner.to_string());
        cause = inner.source();
    }
    line
}
