//! `propeller-mqtt check`: reads exactly what a service would read, then walks
//! the connection one step at a time (config, CA, client certificate, DNS,
//! TCP, TLS, MQTT) and explains the first thing that breaks.

mod describe;
mod mqtt;
mod watch;

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::ServerName;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use x509_parser::prelude::{FromDer, X509Certificate};

use propeller_mqtt::diagnose as probe;
use propeller_mqtt::tls::{self, Parts, Trust};
use propeller_mqtt::{one_line, Failure, Mode, Names};
use propeller_protocol::{Service, ServiceConfig};

/// How a step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but worth fixing.
    Warn,
    /// Stops the connection; the check ends here.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Step {
    /// Short name, e.g. `tls`.
    pub name: &'static str,
    /// How it went.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do, for warnings and failures.
    pub fix: Option<String>,
}

/// The outcome of checking one service.
#[derive(Debug, Clone)]
pub struct Report {
    /// The service checked.
    pub service: Service,
    /// The steps, in order; the last is the failure if there is one.
    pub steps: Vec<Step>,
}

impl Report {
    /// No step failed.
    pub fn passed(&self) -> bool {
        self.steps.iter().all(|step| step.status != Status::Fail)
    }

    /// One line per step, `ok` / `warn` / `FAIL`, fixes indented below.
    pub fn text(&self) -> String {
        let mut text = format!("propeller-mqtt check: {}\n", self.service);
        for step in &self.steps {
            let status = match step.status {
                Status::Ok => "ok",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            let _ = writeln!(text, "  {status:<4}  {:<12} {}", step.name, step.detail);
            if let Some(fix) = &step.fix {
                let _ = writeln!(text, "  {:<4}  {:<12} fix: {fix}", "", "");
            }
        }
        let verdict = match self.passed() {
            true => "every check passed",
            false => "stopped at the first failure",
        };
        let _ = writeln!(text, "{}: {verdict}", self.service);
        text
    }

    /// The same as JSON.
    pub fn json(&self) -> serde_json::Value {
        let steps: Vec<_> = self
            .steps
            .iter()
            .map(|step| {
                json!({
                    "step": step.name,
                    "status": match step.status { Status::Ok => "ok", Status::Warn => "warn", Status::Fail => "fail" },
                    "detail": step.detail,
                    "fix": step.fix,
                })
            })
            .collect();
        json!({ "service": self.service.to_string(), "passed": self.passed(), "steps": steps })
    }
}

/// Stops the walk after a failure.
struct Stop;

/// Builds a [`Report`] step by step.
struct Checker {
    report: Report,
}

impl Checker {
    fn ok(&mut self, name: &'static str, detail: impl Into<String>) {
        self.push(name, Status::Ok, detail.into(), None);
    }

    fn warn(&mut self, name: &'static str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Status::Warn, detail.into(), Some(fix.into()));
    }

    fn fail(&mut self, name: &'static str, detail: impl Into<String>, fix: Option<String>) -> Stop {
        self.push(name, Status::Fail, detail.into(), fix);
        Stop
    }

    fn failure(&mut self, name: &'static str, failure: &Failure) -> Stop {
        let fix = failure.fix(&Names::prefixed(self.report.service.prefix()));
        self.fail(name, failure.to_string(), Some(fix))
    }

    fn push(&mut self, name: &'static str, status: Status, detail: String, fix: Option<String>) {
        self.report.steps.push(Step {
            name,
            status,
            detail,
            fix,
        });
    }
}

/// Checks `service` as configured by `vars` (the process environment, maybe
/// merged with an env file).
pub async fn run(service: Service, vars: Vec<(String, String)>) -> Report {
    let mut checker = Checker {
        report: Report {
            service,
            steps: Vec::new(),
        },
    };
    let _ = walk(&mut checker, service, vars).await;
    checker.report
}

async fn walk(
    c: &mut Checker,
    service: Service,
    mut vars: Vec<(String, String)>,
) -> Result<(), Stop> {
    // 1. The address and the mode.
    propeller_protocol::config_toml::fill(service, &mut vars)
        .map_err(|e| c.fail("config", one_line(&e), None))?;
    let config = ServiceConfig::from_vars(service, vars)
        .map_err(|e| c.fail("config", one_line(&e), None))?;
    let broker = &config.mqtt.brokers[0];
    let address_var = service.var("MQTT_ADDRESS");
    let others = match config.mqtt.brokers.len() {
        1 => String::new(),
        n => format!(" (first of {n}; the others are tried when it fails)"),
    };
    c.ok("address", format!("{broker}{others}"));
    let why = match config.mqtt.mode() {
        Mode::Plain => format!("{address_var} is tcp:// and no TLS variable is set"),
        Mode::Tls => format!("{address_var} is ssl:// without a client certificate"),
        Mode::MutualTls => format!(
            "{address_var} is ssl:// with {} and {}",
            service.var("MQTT_TLS_CLIENT_CERT"),
            service.var("MQTT_TLS_CLIENT_KEY")
        ),
    };
    c.ok("mode", format!("{}: {why}", config.mqtt.mode()));

    // 2 and 3. The CA and the client certificate.
    let parts = match config.mqtt.tls {
        Some(_) => Some(check_tls_files(c, &config)?),
        None => None,
    };

    // 4. DNS and TCP.
    let timeout = config.mqtt.connect_timeout;
    let started = Instant::now();
    let resolved: Vec<SocketAddr> = match tokio::time::timeout(
        timeout,
        tokio::net::lookup_host((broker.host.as_str(), broker.port)),
    )
    .await
    {
        Ok(Ok(addresses)) => addresses.collect(),
        Ok(Err(e)) => {
            return Err(c.failure(
                "dns",
                &Failure::Unreachable(
                    io::Error::new(e.kind(), format!("cannot resolve {}: {e}", broker.host)).into(),
                ),
            ))
        }
        Err(_) => return Err(c.failure("dns", &Failure::Timeout)),
    };
    let Some(first) = resolved.first() else {
        return Err(c.failure(
            "dns",
            &Failure::Unreachable(
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{} resolves to no address", broker.host),
                )
                .into(),
            ),
        ));
    };
    let list: Vec<String> = resolved.iter().map(|a| a.ip().to_string()).collect();
    c.ok(
        "dns",
        format!("{} -> {} in {}", broker.host, list.join(", "), ms(started)),
    );
    let started = Instant::now();
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(first)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            return Err(c.failure("tcp", &Failure::from_connect_error(e, config.mqtt.mode())))
        }
        Err(_) => return Err(c.failure("tcp", &Failure::Timeout)),
    };
    let _ = tcp.set_nodelay(true);
    c.ok("tcp", format!("connected to {first} in {}", ms(started)));

    // 5 and 6. TLS, then MQTT.
    match parts {
        None => mqtt::connect(c, &config, tcp).await,
        Some(parts) => {
            let stream = handshake(c, &config, &parts, tcp).await?;
            mqtt::connect(c, &config, stream).await
        }
    }
}

/// Steps 2 and 3: reads the TLS files the way the service does, then
/// describes them.
fn check_tls_files(c: &mut Checker, config: &ServiceConfig) -> Result<Parts, Stop> {
    let service = config.service;
    let Some(settings) = &config.mqtt.tls else {
        unreachable!("called for TLS modes only")
    };
    let ca_var = service.var("MQTT_TLS_CA_CERT");
    let ca_certs = match &settings.ca {
        Some(path) => {
            let certs = tls::ca_certificates(service.var("MQTT_TLS_CA_CERT"), path)
                .map_err(|e| c.fail("ca", one_line(&e), None))?;
            c.ok(
                "ca",
                format!(
                    "{ca_var}={}: {} certificate(s)",
                    path.display(),
                    certs.len()
                ),
            );
            for der in &certs {
                if let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) {
                    let (detail, expired) = describe::ca(&cert);
                    match expired {
                        false => c.ok("ca cert", detail),
                        true => c.warn(
                            "ca cert",
                            detail,
                            "renew the CA, and every certificate it signed",
                        ),
                    }
                }
            }
            certs
        }
        None => Vec::new(),
    };
    let parts = Parts::load(settings, &config.mqtt.names, &config.mqtt.client_key)
        .map_err(|e| c.fail("tls files", one_line(&e), None))?;
    match &parts.trust {
        Trust::System(n) => c.ok(
            "ca",
            format!("{ca_var} is not set: the system trust store, {n} certificates"),
        ),
        Trust::SkipVerify => c.warn(
            "ca",
            "the broker's certificate is NOT verified",
            format!(
                "set {}=false and {ca_var}",
                service.var("MQTT_TLS_INSECURE_SKIP_VERIFY")
            ),
        ),
        Trust::Configured(_) => {}
    }
    if let Some(files) = &settings.identity {
        describe::client(c, config, files, &ca_certs);
    }
    Ok(parts)
}

/// Step 5: the handshake, watched: the broker's chain is recorded even when
/// it fails verification, and so is whether the broker asked for our certificate.
async fn handshake(
    c: &mut Checker,
    config: &ServiceConfig,
    parts: &Parts,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, Stop> {
    let broker = &config.mqtt.brokers[0];
    let watched = watch::Watched::new(parts);
    let client_config = watched
        .client_config(parts)
        .map_err(|e| c.fail("tls", one_line(&e), None))?;
    let name = ServerName::try_from(broker.host.clone()).map_err(|_| {
        c.fail(
            "tls",
            format!("{:?} is not a valid TLS server name", broker.host),
            None,
        )
    })?;
    let expected = config
        .mqtt
        .tls
        .as_ref()
        .and_then(|t| t.server_name.clone())
        .unwrap_or_else(|| broker.host.clone());
    let started = Instant::now();
    let result = tokio::time::timeout(
        config.mqtt.connect_timeout,
        TlsConnector::from(Arc::new(client_config)).connect(name, tcp),
    )
    .await;
    for (index, der) in watched.chain().iter().enumerate() {
        if let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) {
            c.ok(
                if index == 0 {
                    "broker cert"
                } else {
                    "broker chain"
                },
                describe::broker(&cert),
            );
        }
    }
    let mut stream = match result {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            return Err(match Failure::from_io(&error, config.mqtt.mode()) {
                Some(failure) => c.failure("tls", &failure),
                // Cut short without a TLS error of its own (a reset, or a
                // plain MQTT port that hung up on our ClientHello).
                None => c.fail(
                    "tls",
                    format!("the TLS handshake failed: {error}"),
                    Some("check the broker's TLS setup and its logs".to_owned()),
                ),
            });
        }
        Err(_) => return Err(c.failure("tls", &Failure::Timeout)),
    };
    let (_, session) = stream.get_ref();
    let version = session
        .protocol_version()
        .map_or("?".to_owned(), |v| format!("{v:?}"));
    let suite = session
        .negotiated_cipher_suite()
        .map_or("?".to_owned(), |s| format!("{:?}", s.suite()));
    c.ok("tls", format!("{version}, {suite}, in {}", ms(started)));
    match parts.trust {
        Trust::SkipVerify => c.warn(
            "name",
            format!("not checked: verification is off ({expected:?} was not verified)"),
            "turn verification back on",
        ),
        _ => c.ok(
            "name",
            format!("the broker's certificate is valid for {expected:?}"),
        ),
    }
    let asked = watched.certificate_requested();
    match (config.mqtt.mode(), asked) {
        (Mode::MutualTls, true) => c.ok(
            "client auth",
            "the broker asked for a client certificate; ours was sent",
        ),
        (Mode::MutualTls, false) => c.warn(
            "client auth",
            "the broker did not ask for a client certificate: ours is not checked",
            "nothing to do, unless this listener should require mTLS",
        ),
        (_, true) => c.warn(
            "client auth",
            "the broker asked for a client certificate and we have none",
            format!(
                "for mTLS set {} and {}",
                config.service.var("MQTT_TLS_CLIENT_CERT"),
                config.service.var("MQTT_TLS_CLIENT_KEY")
            ),
        ),
        (_, false) => c.ok(
            "client auth",
            "the broker did not ask for a client certificate",
        ),
    }
    // Before sending CONNECT, hear the broker out: under TLS 1.3 it judges our
    // certificate only now, and nginx says so by closing without an alert.
    let wait = probe::VERDICT_WAIT.min(config.mqtt.connect_timeout) / 2;
    if let Some(failure) = probe::verdict(
        &mut stream,
        config.mqtt.mode(),
        parts.identity.as_ref(),
        wait,
    )
    .await
    {
        return Err(c.failure("tls verdict", &failure));
    }
    Ok(stream)
}

fn ms(since: Instant) -> String {
    format!("{:.1} ms", since.elapsed().as_secs_f64() * 1000.0)
}
