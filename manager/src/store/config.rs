//! The store's variables, upstream's names and defaults: which store
//! (`MANAGER_STORAGE_TYPE`), SQLite's file, PostgreSQL's server.

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
    Postgres(PostgresConfig),
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
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field("database", &self.database)
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
            Kind::Postgres => StoreConfig::Postgres(postgres(settings)?),
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
    settings.parse("POSTGRES_SSLMODE", (), |text| match text.trim() {
        "disable" => Ok(()),
        _ => Err("this manager speaks to PostgreSQL without TLS: write disable, and reach the server over a trusted network or its Unix socket (MANAGER_POSTGRES_HOST=/var/run/postgresql)".to_owned()),
    })?;
    let text = |suffix: &str, default: &str| settings.get(suffix).unwrap_or(default).to_owned();
    Ok(PostgresConfig {
        host: text("POSTGRES_HOST", "localhost"),
        port,
        user: text("POSTGRES_USER", "propeller"),
        password: text("POSTGRES_PASS", "propeller"),
        database: text("POSTGRES_DB", "propeller"),
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
            ("MANAGER_POSTGRES_SSLMODE", "require"),
        ]);
        assert!(
            tls.starts_with("MANAGER_POSTGRES_SSLMODE=\"require\""),
            "{tls}"
        );
    }
}
