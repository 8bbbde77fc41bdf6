//! The store's variables, upstream's names and defaults: which store
//! (`MANAGER_STORAGE_TYPE`), SQLite's file, PostgreSQL's server and how the
//! connection to it is protected (libpq's `sslmode` and file names).

use std::path::PathBuf;

use propeller_mqtt::env::Settings;
use propeller_mqtt::ConfigError;

/// The store chosen, with what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// Nothing kept across restarts.
    Memory,
    /// One SQLite file.
    Sqlite {
        /// `MANAGER_SQLITE_PATH`, for messages.
        var: String,
        /// The file, created when missing.
        path: PathBuf,
    },
    /// A PostgreSQL database.
    Postgres(Box<PostgresConfig>),
}

/// How to reach PostgreSQL.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// A host name, an IP address, or a directory holding the server's
    /// Unix socket (an absolute path).
    pub host: String,
    /// The TCP port, or the number in the socket's name.
    pub port: u16,
    /// The role.
    pub user: String,
    /// Its password; shown nowhere.
    pub password: String,
    /// The database.
    pub database: String,
    /// TLS to the server.
    pub ssl: SslConfig,
}

/// libpq's `sslmode`, as `MANAGER_POSTGRES_SSLMODE` writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS (upstream's default).
    Disable,
    /// TLS if the server offers it, plain otherwise; nothing verified.
    Prefer,
    /// TLS or no connection; the certificate is verified only when
    /// `MANAGER_POSTGRES_SSLROOTCERT` is set (as `verify-ca` then).
    Require,
    /// TLS, the server's certificate signed by a trusted CA; any name.
    VerifyCa,
    /// TLS, the certificate signed by a trusted CA and valid for
    /// `MANAGER_POSTGRES_HOST`.
    VerifyFull,
}

impl SslMode {
    /// As the variable writes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// A file a variable names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedFile {
    /// The full variable name, for messages.
    pub var: String,
    /// The path as given.
    pub path: PathBuf,
}

/// TLS to PostgreSQL: the mode and the files (read when the store is
/// opened, at startup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SslConfig {
    /// `MANAGER_POSTGRES_SSLMODE`.
    pub mode: SslMode,
    /// `MANAGER_POSTGRES_SSLROOTCERT`: the CA bundle the server's
    /// certificate is checked against; the system's trust store when unset.
    pub root_cert: Option<NamedFile>,
    /// `MANAGER_POSTGRES_SSLCERT` and `MANAGER_POSTGRES_SSLKEY`: a client
    /// certificate and its key, presented when the server asks.
    pub client: Option<(NamedFile, NamedFile)>,
    /// `MANAGER_POSTGRES_HOST`, as `var=value`, for messages.
    pub host: String,
    /// `MANAGER_POSTGRES_`, for naming the variables in messages.
    pub prefix: String,
}

#[cfg(test)]
impl SslConfig {
    /// `mode` with no files, for host `db`: the unit tests' starting point.
    pub fn for_tests(mode: SslMode) -> Self {
        SslConfig {
            mode,
            root_cert: None,
            client: None,
            host: "MANAGER_POSTGRES_HOST=db".to_owned(),
            prefix: "MANAGER_POSTGRES_".to_owned(),
        }
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("database", &self.database)
            .field("ssl", &self.ssl)
            .finish()
    }
}

impl StoreConfig {
    /// Reads `MANAGER_STORAGE_TYPE` and the variables of the store it names.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the variable at fault.
    pub fn from_settings(settings: &Settings) -> Result<Self, ConfigError> {
        let kind = settings.parse("STORAGE_TYPE", Kind::Sqlite, |text| {
            match text.trim().to_ascii_lowercase().as_str() {
                "sqlite" => Ok(Kind::Sqlite),
                "postgres" | "postgresql" => Ok(Kind::Postgres),
                "memory" => Ok(Kind::Memory),
                "badger" => Err("badger is upstream's embedded store, not built into this manager: write sqlite (the default, one file) instead".to_owned()),
                _ => Err("write sqlite (the default), postgres or memory".to_owned()),
            }
        })?;
        Ok(match kind {
            Kind::Memory => StoreConfig::Memory,
            Kind::Sqlite => StoreConfig::Sqlite {
                var: settings.var("SQLITE_PATH"),
                path: PathBuf::from(settings.get("SQLITE_PATH").unwrap_or("./propeller.db")),
            },
            Kind::Postgres => StoreConfig::Postgres(Box::new(postgres(settings)?)),
        })
    }
}

enum Kind {
    Memory,
    Sqlite,
    Postgres,
}

fn postgres(settings: &Settings) -> Result<PostgresConfig, ConfigError> {
    let port = settings.parse("POSTGRES_PORT", 5432, |text| {
        text.trim()
            .parse::<u16>()
            .ok()
            .filter(|port| *port > 0)
            .ok_or_else(|| "write a port number from 1 to 65535, such as 5432".to_owned())
    })?;
    let text = |suffix: &str, default: &str| settings.get(suffix).unwrap_or(default).to_owned();
    let host = text("POSTGRES_HOST", "localhost");
    let ssl = ssl(settings, &host)?;
    Ok(PostgresConfig {
        host,
        port,
        user: text("POSTGRES_USER", "propeller"),
        password: text("POSTGRES_PASS", "propeller"),
        database: text("POSTGRES_DB", "propeller"),
        ssl,
    })
}

fn ssl(settings: &Settings, host: &str) -> Result<SslConfig, ConfigError> {
    let mode = settings.parse("POSTGRES_SSLMODE", SslMode::Disable, |text| {
        match text.trim().to_ascii_lowercase().as_str() {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            "allow" => Err("allow (plain first, TLS if the server insists) is not supported: write prefer, or disable".to_owned()),
            _ => Err("write disable (the default), prefer, require, verify-ca or verify-full, as libpq's sslmode".to_owned()),
        }
    })?;
    let file = |suffix: &str| {
        settings.get(suffix).map(|path| NamedFile {
            var: settings.var(suffix),
            path: PathBuf::from(path),
        })
    };
    let client = match (file("POSTGRES_SSLCERT"), file("POSTGRES_SSLKEY")) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(set), None) | (None, Some(set)) => {
            let unset = match set.var.ends_with("SSLCERT") {
                true => settings.var("POSTGRES_SSLKEY"),
                false => settings.var("POSTGRES_SSLCERT"),
            };
            return Err(ConfigError::HalfClientIdentity {
                set: set.var,
                unset,
            });
        }
    };
    // verify-full checks the certificate against the host: it must be a
    // name or an address a certificate can hold. (A Unix socket has no TLS.)
    if mode == SslMode::VerifyFull
        && !host.starts_with('/')
        && rustls::pki_types::ServerName::try_from(host).is_err()
    {
        return Err(ConfigError::Invalid {
            var: settings.var("POSTGRES_HOST"),
            value: host.to_owned(),
            problem: "verify-full checks the server's certificate against this name, and it is neither a DNS name nor an IP address: write the name the certificate lists".to_owned(),
        });
    }
    Ok(SslConfig {
        mode,
        root_cert: file("POSTGRES_SSLROOTCERT"),
        client,
        host: format!("{}={host}", settings.var("POSTGRES_HOST")),
        prefix: settings.var("POSTGRES_"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use propeller_protocol::{Service, ServiceConfig};

    fn config(vars: &[(&str, &str)]) -> Result<StoreConfig, ConfigError> {
        let mut all = vec![
            ("MANAGER_CLIENT_ID", "m"),
            ("MANAGER_CLIENT_KEY", "k"),
            ("MANAGER_DOMAIN_ID", "d"),
            ("MANAGER_CHANNEL_ID", "c"),
        ];
        all.extend_from_slice(vars);
        let vars: Vec<(String, String)> = all
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let config = ServiceConfig::from_vars(Service::Manager, vars).expect("a valid config");
        StoreConfig::from_settings(&config.settings)
    }

    #[test]
    fn sqlite_at_upstreams_path_is_the_default() {
        assert_eq!(
            config(&[]).unwrap(),
            StoreConfig::Sqlite {
                var: "MANAGER_SQLITE_PATH".to_owned(),
                path: PathBuf::from("./propeller.db")
            }
        );
        assert_eq!(
            config(&[("MANAGER_STORAGE_TYPE", "memory")]).unwrap(),
            StoreConfig::Memory
        );
    }

    #[test]
    fn postgres_takes_upstreams_variables_and_defaults() {
        let StoreConfig::Postgres(pg) = config(&[("MANAGER_STORAGE_TYPE", "postgres")]).unwrap()
        else {
            panic!("not postgres")
        };
        assert_eq!(
            (
                pg.host.as_str(),
                pg.port,
                pg.user.as_str(),
                pg.database.as_str()
            ),
            ("localhost", 5432, "propeller", "propeller")
        );
        let StoreConfig::Postgres(pg) = config(&[
            ("MANAGER_STORAGE_TYPE", "postgres"),
            ("MANAGER_POSTGRES_HOST", "db"),
            ("MANAGER_POSTGRES_PORT", "6543"),
            ("MANAGER_POSTGRES_USER", "u"),
            ("MANAGER_POSTGRES_PASS", "hunter2"),
            ("MANAGER_POSTGRES_DB", "p"),
            ("MANAGER_POSTGRES_SSLMODE", "disable"),
        ])
        .unwrap() else {
            panic!("not postgres")
        };
        assert_eq!((pg.port, pg.password.as_str()), (6543, "hunter2"));
        assert!(!format!("{pg:?}").contains("hunter2"));
    }

    #[test]
    fn bad_values_name_their_variable() {
        let message = |vars: &[(&str, &str)]| config(vars).unwrap_err().to_string();
        assert!(message(&[("MANAGER_STORAGE_TYPE", "badger")])
            .starts_with("MANAGER_STORAGE_TYPE=\"badger\""));
        assert!(message(&[("MANAGER_STORAGE_TYPE", "redis")]).contains("sqlite"));
        let port = message(&[
            ("MANAGER_STORAGE_TYPE", "postgres"),
            ("MANAGER_POSTGRES_PORT", "0"),
        ]);
        assert!(port.starts_with("MANAGER_POSTGRES_PORT=\"0\""), "{port}");
        let tls = message(&[
            ("MANAGER_STORAGE_TYPE", "postgres"),
            ("MANAGER_POSTGRES_SSLMODE", "verify_full"),
        ]);
        assert!(
            tls.starts_with("MANAGER_POSTGRES_SSLMODE=\"verify_full\" is not valid")
                && tls.contains("verify-full"),
            "{tls}"
        );
        let allow = message(&[
            ("MANAGER_STORAGE_TYPE", "postgres"),
            ("MANAGER_POSTGRES_SSLMODE", "allow"),
        ]);
        assert!(allow.contains("prefer"), "{allow}");
    }

    fn ssl(vars: &[(&str, &str)]) -> Result<SslConfig, ConfigError> {
        let mut all = vec![("MANAGER_STORAGE_TYPE", "postgres")];
        all.extend_from_slice(vars);
        match config(&all)? {
            StoreConfig::Postgres(pg) => Ok(pg.ssl),
            other => panic!("not postgres: {other:?}"),
        }
    }

    #[test]
    fn sslmode_takes_libpqs_modes_and_defaults_to_disable() {
        assert_eq!(ssl(&[]).unwrap().mode, SslMode::Disable);
        for (text, mode) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
            (" Verify-Full ", SslMode::VerifyFull),
        ] {
            let ssl = ssl(&[("MANAGER_POSTGRES_SSLMODE", text)]).unwrap();
            assert_eq!(ssl.mode, mode, "{text}");
            assert_eq!(mode.name(), text.trim().to_ascii_lowercase());
        }
        let ssl = ssl(&[
            ("MANAGER_POSTGRES_SSLMODE", "verify-ca"),
            ("MANAGER_POSTGRES_SSLROOTCERT", "/etc/pg/ca.crt"),
            ("MANAGER_POSTGRES_SSLCERT", "/etc/pg/client.crt"),
            ("MANAGER_POSTGRES_SSLKEY", "/etc/pg/client.key"),
        ])
        .unwrap();
        let root = ssl.root_cert.unwrap();
        assert_eq!(
            (root.var.as_str(), root.path),
            (
                "MANAGER_POSTGRES_SSLROOTCERT",
                PathBuf::from("/etc/pg/ca.crt")
            )
        );
        let (cert, key) = ssl.client.unwrap();
        assert_eq!(cert.var, "MANAGER_POSTGRES_SSLCERT");
        assert_eq!(key.path, PathBuf::from("/etc/pg/client.key"));
    }

    #[test]
    fn a_half_client_identity_names_both_variables() {
        let half = ssl(&[
            ("MANAGER_POSTGRES_SSLMODE", "require"),
            ("MANAGER_POSTGRES_SSLCERT", "/etc/pg/client.crt"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            half.starts_with("MANAGER_POSTGRES_SSLCERT is set but MANAGER_POSTGRES_SSLKEY is not"),
            "{half}"
        );
        let half = ssl(&[("MANAGER_POSTGRES_SSLKEY", "/etc/pg/client.key")])
            .unwrap_err()
            .to_string();
        assert!(
            half.starts_with("MANAGER_POSTGRES_SSLKEY is set but MANAGER_POSTGRES_SSLCERT is not"),
            "{half}"
        );
    }

    #[test]
    fn verify_full_needs_a_host_a_certificate_can_name() {
        for host in ["db.example.com", "127.0.0.1", "::1", "/var/run/postgresql"] {
            ssl(&[
                ("MANAGER_POSTGRES_SSLMODE", "verify-full"),
                ("MANAGER_POSTGRES_HOST", host),
            ])
            .unwrap_or_else(|e| panic!("{host}: {e}"));
        }
        let bad = ssl(&[
            ("MANAGER_POSTGRES_SSLMODE", "verify-full"),
            ("MANAGER_POSTGRES_HOST", "db host"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            bad.starts_with("MANAGER_POSTGRES_HOST=\"db host\" is not valid: verify-full"),
            "{bad}"
        );
        // Other modes do not check the name.
        ssl(&[
            ("MANAGER_POSTGRES_SSLMODE", "verify-ca"),
            ("MANAGER_POSTGRES_HOST", "db host"),
        ])
        .unwrap();
    }
}
