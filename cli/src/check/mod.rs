//! `propeller-mqtt check`: reads exactly what a service would read, then walks
//! the connection one step at a time (config, CA, client certificate, then
//! for each broker address: DNS, TCP, the proxy's tunnel, TLS with its SNI
//! and ALPN, the WebSocket upgrade, MQTT) and explains the first thing that
//! breaks, at each address.

mod describe;
mod mqtt;
mod watch;

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use tokio::net::TcpStream;
use x509_parser::prelude::{FromDer, X509Certificate};

use propeller_mqtt::diagnose::{self as probe, Route};
use propeller_mqtt::env::BrokerAddress;
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
    /// The broker address this step is about, when `P_MQTT_ADDRESS` lists
    /// several (each gets its own section); `None` for the common steps.
    pub address: Option<String>,
}

/// The outcome of checking one service.
#[derive(Debug, Clone)]
pub struct Report {
    /// The service checked.
    pub service: Service,
    /// The steps, in order. A failure ends the walk, or, in the section of
    /// one address of a list, that section.
    pub steps: Vec<Step>,
    /// How many addresses were walked (a list has several sections).
    pub addresses: usize,
}

impl Report {
    /// No step failed.
    pub fn passed(&self) -> bool {
        self.steps.iter().all(|step| step.status != Status::Fail)
    }

    /// The addresses whose section has a failure.
    fn failed_addresses(&self) -> usize {
        let mut failed: Vec<&str> = self
            .steps
            .iter()
            .filter(|step| step.status == Status::Fail)
            .filter_map(|step| step.address.as_deref())
            .collect();
        failed.dedup();
        failed.len()
    }

    /// One line per step, `ok` / `warn` / `FAIL`, fixes indented below; a
    /// header before the steps of each address of a list.
    pub fn text(&self) -> String {
        let mut text = format!("propeller-mqtt check: {}\n", self.service);
        let mut section: Option<&str> = None;
        for step in &self.steps {
            if self.addresses > 1 && step.address.is_some() && step.address.as_deref() != section {
                section = step.address.as_deref();
                let _ = writeln!(text, "  -- {}", section.unwrap_or(""));
            }
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
        let verdict = match (self.passed(), self.addresses) {
            (true, 0 | 1) => "every check passed".to_owned(),
            (true, n) => format!("every check passed, at each of the {n} addresses"),
            (false, 0 | 1) => "stopped at the first failure".to_owned(),
            (false, n) => match self.failed_addresses() {
                0 => "stopped at the first failure".to_owned(),
                failed => format!(
                    "{failed} of the {n} addresses failed (each stops at its first failure)"
                ),
            },
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
                    "address": step.address,
                })
            })
            .collect();
        json!({
            "service": self.service.to_string(),
            "passed": self.passed(),
            "addresses": self.addresses,
            "steps": steps,
        })
    }
}

/// Stops the walk after a failure.
struct Stop;

/// Builds a [`Report`] step by step.
struct Checker {
    report: Report,
    /// The address whose section is being walked.
    section: Option<String>,
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
            address: self.section.clone(),
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
            addresses: 0,
        },
        section: None,
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
    let brokers = &config.mqtt.brokers;
    let address_var = service.var("MQTT_ADDRESS");
    let list: Vec<String> = brokers.iter().map(ToString::to_string).collect();
    let others = match brokers.len() {
        1 => String::new(),
        n => format!(" ({n} addresses, tried in turn; each is checked below)"),
    };
    let via = match &config.mqtt.proxy {
        Some(proxy) => format!(", through the HTTP proxy {proxy}"),
        None => String::new(),
    };
    c.ok("address", format!("{}{others}{via}", list.join(", ")));
    // "is ssl://", "is wss://", or "mixes ssl:// and wss://".
    let schemes = |tls: bool| {
        let websocket = brokers.iter().any(|b| b.websocket.is_some());
        let stream = brokers.iter().any(|b| b.websocket.is_none());
        let (stream_scheme, websocket_scheme) = match tls {
            false => ("tcp://", "ws://"),
            true => ("ssl://", "wss://"),
        };
        match (stream, websocket) {
            (true, true) => format!("mixes {stream_scheme} and {websocket_scheme}"),
            (false, true) => format!("is {websocket_scheme}"),
            _ => format!("is {stream_scheme}"),
        }
    };
    let why = match config.mqtt.mode() {
        Mode::Plain => format!(
            "{address_var} {} and no TLS variable is set",
            schemes(false)
        ),
        Mode::Tls => format!(
            "{address_var} {} without a client certificate",
            schemes(true)
        ),
        Mode::MutualTls => format!(
            "{address_var} {} with {} and {}",
            schemes(true),
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

    // 4 to 9, for each address: DNS, TCP, the proxy's tunnel, TLS, the
    // WebSocket upgrade, MQTT. A failure ends that address's section.
    c.report.addresses = brokers.len();
    for (index, broker) in brokers.iter().enumerate() {
        if brokers.len() > 1 {
            c.section = Some(format!(
                "address {} of {}: {broker}",
                index + 1,
                brokers.len()
            ));
        }
        let _ = walk_address(c, &config, broker, parts.as_ref()).await;
    }
    c.section = None;
    Ok(())
}

/// The stream as it is built, step by step.
type Stream = Box<dyn rumqttc::AsyncReadWrite>;

/// Steps 4 to 9 for one broker address.
async fn walk_address(
    c: &mut Checker,
    config: &ServiceConfig,
    broker: &BrokerAddress,
    parts: Option<&Parts>,
) -> Result<(), Stop> {
    let mode = config.mqtt.mode();
    let timeout = config.mqtt.connect_timeout;
    let route = Route::new(&config.mqtt, broker, None);
    let proxy = config.mqtt.proxy.as_ref();

    // 4. DNS: the broker's name, or the proxy's (the proxy resolves the broker's).
    let (host, port) = match proxy {
        Some(proxy) => (proxy.host.as_str(), proxy.port),
        None => (broker.host.as_str(), broker.port),
    };
    let unreachable = |kind: io::ErrorKind, why: String| match proxy {
        Some(_) => Failure::ProxyUnreachable(why),
        None => Failure::Unreachable(io::Error::new(kind, why).into()),
    };
    let started = Instant::now();
    let resolved: Vec<SocketAddr> =
        match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(addresses)) => addresses.collect(),
            Ok(Err(e)) => {
                return Err(c.failure(
                    "dns",
                    &unreachable(e.kind(), format!("cannot resolve {host}: {e}")),
                ))
            }
            Err(_) => return Err(c.failure("dns", &Failure::Timeout)),
        };
    let Some(first) = resolved.first() else {
        return Err(c.failure(
            "dns",
            &unreachable(
                io::ErrorKind::NotFound,
                format!("{host} resolves to no address"),
            ),
        ));
    };
    let list: Vec<String> = resolved.iter().map(|a| a.ip().to_string()).collect();
    let whose = match proxy {
        Some(_) => format!("proxy {host}"),
        None => host.to_owned(),
    };
    let resolved_by = match proxy {
        Some(_) if broker.host.parse::<std::net::IpAddr>().is_err() => {
            format!(" ({} is resolved by the proxy)", broker.host)
        }
        _ => String::new(),
    };
    c.ok(
        "dns",
        format!(
            "{whose} -> {} in {}{resolved_by}",
            list.join(", "),
            ms(started)
        ),
    );

    // 5. TCP.
    let started = Instant::now();
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(first)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) if proxy.is_some() => {
            let why = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    "connection refused: nothing listens there".to_owned()
                }
                _ => e.to_string(),
            };
            return Err(c.failure("tcp", &Failure::ProxyUnreachable(format!("{first}: {why}"))));
        }
        Ok(Err(e)) => {
            return Err(c.failure("tcp", &Failure::from_connect_error(e, config.mqtt.mode())))
        }
        Err(_) => return Err(c.failure("tcp", &Failure::Timeout)),
    };
    let _ = tcp.set_nodelay(true);
    let to = match proxy {
        Some(_) => "the proxy at ",
        None => "",
    };
    c.ok(
        "tcp",
        format!("connected to {to}{first} in {}", ms(started)),
    );

    // 6. The proxy's tunnel.
    let stream: Stream = match proxy {
        None => Box::new(tcp),
        Some(proxy) => {
            let started = Instant::now();
            let target = route.target();
            match probe::tunnel(tcp, proxy, &target, timeout).await {
                Ok((tunnel, opened)) => {
                    let credentials = match proxy.credentials {
                        Some(_) => ", with credentials",
                        None => "",
                    };
                    c.ok(
                        "proxy",
                        format!(
                            "CONNECT {target}: {} {}{credentials}, in {}",
                            opened.status,
                            opened.reason,
                            ms(started)
                        ),
                    );
                    Box::new(tunnel)
                }
                Err(error) => {
                    let failure = Failure::from_io(&error, mode)
                        .unwrap_or_else(|| Failure::ProxyProtocol(error.to_string()));
                    return Err(c.failure("proxy", &failure));
                }
            }
        }
    };

    // 7. TLS.
    let stream: Stream = match parts {
        None => stream,
        Some(parts) => {
            let name = config.mqtt.tls_server_name(broker);
            Box::new(handshake(c, config, parts, &name, stream).await?)
        }
    };

    // 8. The WebSocket upgrade.
    let stream: Stream = match &route.websocket {
        None => stream,
        Some(ws) => {
            let started = Instant::now();
            match probe::upgrade(stream, ws, config.mqtt.max_packet_size).await {
                Ok((upgraded, answer)) => {
                    let server = answer
                        .server
                        .map(|s| format!(" (server {s})"))
                        .unwrap_or_default();
                    c.ok(
                        "websocket",
                        format!(
                            "GET {} (Host {}): {} Switching Protocols, subprotocol mqtt{server}, in {}",
                            ws.path,
                            ws.authority,
                            answer.status,
                            ms(started)
                        ),
                    );
                    Box::new(upgraded)
                }
                Err(error) => {
                    let failure = Failure::from_io(&error, mode)
                        .unwrap_or_else(|| Failure::WebSocketProtocol(error.to_string()));
                    return Err(c.failure("websocket", &failure));
                }
            }
        }
    };

    // 9. MQTT.
    mqtt::connect(c, config, stream).await
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

/// Step 7: the handshake, watched: the broker's chain is recorded even when
/// it fails verification, and so is whether the broker asked for our
/// certificate. `name` is sent as SNI and verified.
async fn handshake(
    c: &mut Checker,
    config: &ServiceConfig,
    parts: &Parts,
    name: &str,
    stream: Stream,
) -> Result<tokio_rustls::client::TlsStream<Stream>, Stop> {
    let watched = watch::Watched::new(parts);
    let client_config = watched
        .client_config(parts)
        .map_err(|e| c.fail("tls", one_line(&e), None))?;
    let offered = probe::alpn_names(&client_config);
    let route = probe::TlsRoute {
        config: Arc::new(client_config),
        server_name: name.to_owned(),
    };
    let started = Instant::now();
    let result = tokio::time::timeout(
        config.mqtt.connect_timeout,
        probe::handshake(&route, stream),
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
                Some(failure @ Failure::NoApplicationProtocol { .. }) => {
                    c.failure("alpn", &failure)
                }
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
    let chosen = session
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let sni = match name.parse::<std::net::IpAddr>() {
        Ok(_) => format!("no SNI ({name} is an IP address)"),
        Err(_) => format!("SNI {name}"),
    };
    c.ok(
        "tls",
        format!("{version}, {suite}, {sni}, in {}", ms(started)),
    );
    if !offered.is_empty() {
        let detail = match chosen {
            Some(chosen) => format!("offered {}; the server chose {chosen}", offered.join(", ")),
            None => format!(
                "offered {}; the server chose none (it does not use ALPN)",
                offered.join(", ")
            ),
        };
        c.ok("alpn", detail);
    }
    match parts.trust {
        Trust::SkipVerify => c.warn(
            "name",
            format!("not checked: verification is off ({name:?} was not verified)"),
            "turn verification back on",
        ),
        _ => c.ok(
            "name",
            format!("the broker's certificate is valid for {name:?}"),
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
