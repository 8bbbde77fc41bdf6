//! The one error type of this crate: everything that stops a service before it
//! touches the network. Connection failures after that are not errors but
//! [`Failure`](crate::Failure)s, retried with backoff.

use std::path::PathBuf;

/// A configuration problem, found before any network I/O.
///
/// Every message names the variable, the value or path at fault, and what to do.
/// Values of secret variables (client key, key password) are never included.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
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
    #[error("{vars} set, but {address_var}={address:?} is plain MQTT: use an ssl:// address for TLS, or unset the TLS variables (we never fall back to plaintext)")]
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

    /// A log filter that tracing cannot parse.
    #[error("{var}={value:?} is not a valid log filter: write a level (error, warn, info, debug, trace) or directives such as info,propeller_mqtt=debug")]
    LogFilter {
        /// The log level variable.
        var: String,
        /// The value as given.
        value: String,
    },

    /// `certs` would replace an existing file.
    #[error("{path} exists: pass --force to replace it", path = path.display())]
    WouldOverwrite {
        /// The existing file.
        path: std::path::PathBuf,
    },

    /// `certs` cannot write a file.
    #[error("cannot write {path}", path = path.display())]
    Write {
        /// The file.
        path: std::path::PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// `certs` cannot make the certificate asked for.
    #[error("{0}")]
    Certificate(String),

    /// A service cannot listen where its variables say (the manager's API).
    #[error("{var}: cannot listen on {address}: choose a free port, or an address of this host")]
    Listen {
        /// The variables that name the address.
        var: String,
        /// The address.
        address: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },

    /// The operating system refused what the async runtime needs.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),

    /// rustls refused the assembled configuration.
    #[error("cannot build the TLS configuration")]
    Tls(#[source] rustls::Error),
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
