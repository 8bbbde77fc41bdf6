//! What stops the operator tool.

use propeller_mqtt::ConfigError;

/// A `check` or `certs` that could not run.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A variable, flag value or input file is wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),

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

    /// The operating system refused what the async runtime needs.
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
}
