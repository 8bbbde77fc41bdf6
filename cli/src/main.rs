//! `propeller-mqtt`: operator tools for Propeller's MQTT connections.
//!
//! - `propeller-mqtt check` reads what a service would read and walks the
//!   connection step by step, explaining the first failure.
//! - `propeller-mqtt certs` makes the CA, server and client certificates of
//!   upstream's `docker/ssl` Makefile, without openssl.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use propeller_mqtt::{env_file, one_line, ConfigError, Secret};
use propeller_mqtt_cli::certs::{self, KeyType, Output, RsaBits, Subject};
use propeller_mqtt_cli::{check, CliError};
use propeller_protocol::Service;

#[derive(Parser)]
#[command(
    name = "propeller-mqtt",
    version,
    about = "Operator tools for Propeller's MQTT connections"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Diagnose a service's MQTT connection from its env, step by step.
    Check {
        /// The service to check; by default every service with variables set.
        #[arg(long, value_enum)]
        service: Vec<ServiceArg>,
        /// Read variables from this file (docker .env syntax); without it,
        /// ./.env is read when present. Non-empty process variables win.
        #[arg(long)]
        env_file: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make certificates like upstream's docker/ssl Makefile, without openssl.
    Certs {
        /// Directory for the files.
        #[arg(long, default_value = "certs", global = true)]
        dir: PathBuf,
        /// Replace existing files.
        #[arg(long, global = true)]
        force: bool,
        /// Encrypt the key (PKCS#8, PBES2) with the password in this env variable.
        #[arg(long, value_name = "ENV_VAR", global = true)]
        encrypt_key: Option<String>,
        /// Use an RSA key of this size instead of ECDSA P-256.
        #[arg(long, value_name = "BITS", global = true)]
        rsa: Option<u32>,
        /// Validity in days (default: ca 1095, server 1000, client 730).
        #[arg(long, global = true)]
        days: Option<i64>,
        #[command(subcommand)]
        kind: CertKind,
    },
}

#[derive(Subcommand)]
enum CertKind {
    /// The CA: ca.crt and ca.key.
    Ca,
    /// A server certificate for nginx or the broker, signed by the CA.
    Server {
        /// Subject CN.
        #[arg(long, default_value = "localhost")]
        cn: String,
        /// Extra subject alternative names: DNS:name or IP:address (repeatable).
        #[arg(long)]
        san: Vec<String>,
        /// File name stem: <dir>/<name>.crt and .key.
        #[arg(long, default_value = "server")]
        name: String,
    },
    /// A client certificate whose CN is the client secret, signed by the CA.
    Client {
        /// The Magistrala client secret (the service's <P>_CLIENT_KEY).
        #[arg(long, required_unless_present = "secret_env")]
        secret: Option<String>,
        /// Read the secret from this env variable instead (keeps it out of `ps`).
        #[arg(long, value_name = "ENV_VAR")]
        secret_env: Option<String>,
        /// File name stem: <dir>/<name>.crt and .key.
        #[arg(long, default_value = "proplet")]
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ServiceArg {
    Manager,
    Proplet,
    Proxy,
}

impl From<ServiceArg> for Service {
    fn from(arg: ServiceArg) -> Self {
        match arg {
            ServiceArg::Manager => Service::Manager,
            ServiceArg::Proplet => Service::Proplet,
            ServiceArg::Proxy => Service::Proxy,
        }
    }
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Check {
            service,
            env_file,
            json,
        } => run_check(service, env_file, json),
        Command::Certs {
            dir,
            force,
            encrypt_key,
            rsa,
            days,
            kind,
        } => run_certs(dir, force, encrypt_key, rsa, days, kind).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|error| {
        eprintln!("propeller-mqtt: {}", one_line(&error));
        ExitCode::FAILURE
    })
}

fn run_check(
    services: Vec<ServiceArg>,
    env_file: Option<PathBuf>,
    json: bool,
) -> Result<ExitCode, CliError> {
    let (vars, _) = env_file::service_vars(env_file.as_deref())?;
    let mut services: Vec<Service> = services.into_iter().map(Service::from).collect();
    if services.is_empty() {
        services = Service::ALL
            .into_iter()
            .filter(|service| {
                vars.iter()
                    .any(|(name, value)| name.starts_with(service.prefix()) && !value.is_empty())
            })
            .collect();
    }
    if services.is_empty() {
        return Err(ConfigError::Missing {
            var: "MANAGER_*, PROPLET_* or PROXY_*".into(),
            fix: "pass --env-file, or --service to check one with its defaults",
        }
        .into());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)?;
    let reports: Vec<check::Report> = services
        .into_iter()
        .map(|service| runtime.block_on(check::run(service, vars.clone())))
        .collect();
    if json {
        let value = serde_json::Value::Array(reports.iter().map(check::Report::json).collect());
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        for report in &reports {
            print!("{}", report.text());
        }
    }
    Ok(match reports.iter().all(check::Report::passed) {
        true => ExitCode::SUCCESS,
        false => ExitCode::FAILURE,
    })
}

fn run_certs(
    dir: PathBuf,
    force: bool,
    encrypt_key: Option<String>,
    rsa: Option<u32>,
    days: Option<i64>,
    kind: CertKind,
) -> Result<(), CliError> {
    let key_password = encrypt_key.map(|var| secret_from_env(&var)).transpose()?;
    let key_type = match rsa {
        None => KeyType::EcdsaP256,
        Some(2048) => KeyType::Rsa(RsaBits::B2048),
        Some(3072) => KeyType::Rsa(RsaBits::B3072),
        Some(4096) => KeyType::Rsa(RsaBits::B4096),
        Some(bits) => {
            return Err(CliError::Certificate(format!(
                "--rsa {bits}: use 2048, 3072 or 4096"
            )))
        }
    };
    let out = Output {
        dir,
        force,
        key_password,
    };
    let subject = Subject::default();
    let written = match kind {
        CertKind::Ca => certs::ca(&out, &subject, key_type, days.unwrap_or(1095))?,
        CertKind::Server { cn, san, name } => {
            let mut sans = vec!["DNS:localhost".to_owned(), "DNS:nginx".to_owned()];
            sans.extend(san);
            if !sans.iter().any(|s| s.trim_start_matches("DNS:") == cn) {
                sans.push(cn.clone());
            }
            certs::server(
                &out,
                &subject,
                &name,
                &cn,
                &sans,
                key_type,
                days.unwrap_or(1000),
            )?
        }
        CertKind::Client {
            secret,
            secret_env,
            name,
        } => {
            let secret = match (secret, secret_env) {
                (Some(secret), _) => Secret::new(secret),
                (None, Some(var)) => secret_from_env(&var)?,
                (None, None) => unreachable!("clap requires one"),
            };
            certs::client(
                &out,
                &subject,
                &name,
                &secret,
                key_type,
                days.unwrap_or(730),
            )?
        }
    };
    println!(
        "wrote {} and {} (key mode 600)",
        written.cert.display(),
        written.key.display()
    );
    Ok(())
}

fn secret_from_env(var: &str) -> Result<Secret, CliError> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Ok(Secret::new(value)),
        _ => Err(ConfigError::Missing {
            var: var.to_owned(),
            fix: "export it with the value to use",
        }
        .into()),
    }
}
