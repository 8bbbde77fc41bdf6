//! Benchmarks: connect latency, throughput, resources and a fleet of mTLS
//! proplets, all through one local mosquitto, with this crate and the clients
//! operators use today. Prints the markdown tables of BENCHMARKS.md; asserts
//! nothing.
//!
//! ```sh
//! apt-get install -y mosquitto mosquitto-clients openssl && pip install paho-mqtt
//! ulimit -n 8192
//! cargo run --release --example bench                 # everything, a few minutes
//! cargo run --release --example bench -- connect      # or: throughput, resources, fleet
//! ```

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use propeller_mqtt::certs::{self, KeyType, Output, Subject};
use propeller_mqtt::config::Secret;
use propeller_mqtt::tls::TlsSetup;
use propeller_mqtt::{Client, Config, ConnectionState, Service};
use propeller_tests::{
    accounts, Account, BrokerOptions, Env, Identity, Mosquitto, Pki, ServiceProcess, CONNECTED,
};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const MODES: [&str; 3] = ["plain", "MQTTS", "mTLS"];
const CONNECTS: usize = 20;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let part = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let pki = Pki::shared();
    let (proplet, manager) = (pki.identity("proplet"), pki.identity("manager"));
    let broker = Mosquitto::start(pki, &accounts(&[&proplet, &manager], "#"));
    let lab = Lab {
        pki,
        broker,
        proplet,
        manager,
    };
    println!(
        "machine: {} cores; mosquitto {}",
        std::thread::available_parallelism()?,
        version("mosquitto", &["-h"])
    );
    if part == "all" || part == "connect" {
        connect_latency(&lab).await?;
    }
    if part == "all" || part == "throughput" {
        throughput(&lab).await?;
    }
    if part == "all" || part == "resources" {
        resources(&lab).await?;
    }
    if part == "all" || part == "fleet" {
        for n in [100, 1000] {
            fleet(&lab, n).await?;
        }
    }
    Ok(())
}

struct Lab {
    pki: &'static Pki,
    broker: Mosquitto,
    proplet: Identity,
    manager: Identity,
}

impl Lab {
    fn port(&self, mode: &str) -> u16 {
        match mode {
            "plain" => self.broker.plain,
            "MQTTS" => self.broker.tls,
            _ => self.broker.mtls,
        }
    }

    /// The proplet's env in `mode`.
    fn env(&self, mode: &str, identity: &Identity) -> Env {
        let mut env = Env::new("PROPLET", identity);
        match mode {
            "plain" => env.plain(self.broker.plain),
            "MQTTS" => env.tls(self.broker.tls, self.pki),
            _ => env.mtls(self.broker.mtls, self.pki, identity),
        };
        env
    }

    /// `[ca, cert, key]` arguments for the peers, empty for plain.
    fn tls_files(&self, mode: &str, identity: &Identity) -> Vec<String> {
        let ca = self.pki.path("ca.crt").display().to_string();
        match mode {
            "plain" => vec![],
            "MQTTS" => vec![ca, String::new(), String::new()],
            _ => vec![
                ca,
                identity.cert.display().to_string(),
                identity.key.display().to_string(),
            ],
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Median and 90th percentile, in milliseconds.
fn stats(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        ms(samples[((samples.len() as f64 * q).ceil() as usize)
            .saturating_sub(1)
            .min(samples.len() - 1)])
    };
    (at(0.5), at(0.9))
}

fn version(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().map(|o| {
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
    });
    output
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("?")
        .to_owned()
}

// ---------------------------------------------------------------- connect latency

async fn connect_latency(lab: &Lab) -> Result<()> {
    println!("\n## Connect latency (ms, median / p90)\n");
    println!("| client | {} |", MODES.join(" | "));
    println!("|---|---|---|---|");
    let mut table: Vec<(&str, Vec<(f64, f64)>)> = Vec::new();
    let mut ours = Vec::new();
    let mut fresh = Vec::new();
    let mut resumed = Vec::new();
    let mut bare = Vec::new();
    let mut binary = Vec::new();
    let mut mosquitto_pub = Vec::new();
    let mut paho = Vec::new();
    for mode in MODES {
        let env = lab.env(mode, &lab.proplet);
        let config = Config::from_vars(Service::Proplet, env.vars.clone())?;
        // Our client, as a service starts it: TLS files read, config built, CONNACK.
        let mut samples = Vec::new();
        for _ in 0..CONNECTS {
            let started = Instant::now();
            let (client, _) = Client::start(&config, vec![])?;
            client
                .state()
                .wait_for(|s| *s == ConnectionState::Connected)
                .await?;
            samples.push(started.elapsed());
            client.shutdown().await;
        }
        ours.push(stats(samples));
        // rumqttc alone over our TLS config: a fresh config every time (full
        // handshake), or one shared config (session resumption after the first).
        let shared = TlsSetup::load(&config)?.map(|t| t.client_config);
        let mut full_samples = Vec::new();
        let mut resumed_samples = Vec::new();
        for _ in 0..CONNECTS {
            let fresh_config = TlsSetup::load(&config)?.map(|t| t.client_config);
            full_samples.push(rumqttc_connect(&config, fresh_config).await?);
            resumed_samples.push(rumqttc_connect(&config, shared.clone()).await?);
        }
        fresh.push(stats(full_samples));
        resumed.push(stats(resumed_samples));
        // rumqttc with a hand-built rustls config: what our layer adds.
        let mut samples = Vec::new();
        for _ in 0..CONNECTS {
            let hand_built = hand_built_tls(lab, mode)?;
            samples.push(rumqttc_connect(&config, hand_built).await?);
        }
        bare.push(stats(samples));
        // Our proplet binary, process start to its CONNACK log line.
        let mut samples = Vec::new();
        for _ in 0..10 {
            let started = Instant::now();
            let service = ServiceProcess::start("proplet", &env.vars);
            service.wait_for(CONNECTED, Duration::from_secs(10));
            samples.push(started.elapsed());
        }
        binary.push(stats(samples));
        // mosquitto_pub -d, process start to "received CONNACK".
        let mut samples = Vec::new();
        for _ in 0..10 {
            samples.push(mosquitto_pub_connack(lab, mode)?);
        }
        mosquitto_pub.push(stats(samples));
        // paho-mqtt, in-process per connection.
        let mut args = vec![
            "connect".to_owned(),
            CONNECTS.to_string(),
            "127.0.0.1".into(),
            lab.port(mode).to_string(),
        ];
        args.extend([
            propeller_tests::client_id("proplet"),
            lab.proplet.secret.clone(),
        ]);
        args.extend(lab.tls_files(mode, &lab.proplet));
        let out = python(&args)?;
        let mut parts = out
            .split_whitespace()
            .map(|v| v.parse::<f64>().unwrap_or(f64::NAN));
        paho.push((
            parts.next().unwrap_or(f64::NAN),
            parts.next().unwrap_or(f64::NAN),
        ));
    }
    table.push((
        "propeller-mqtt `Client::start` (in-process, files read each time)",
        ours,
    ));
    table.push((
        "rumqttc + our TLS config, fresh each time (full handshake)",
        fresh,
    ));
    table.push((
        "rumqttc + our TLS config, shared (resumed handshake)",
        resumed,
    ));
    table.push((
        "bare rumqttc + hand-built rustls config (full handshake)",
        bare,
    ));
    table.push(("`proplet` binary: process start to CONNACK", binary));
    table.push((
        "`mosquitto_pub -d`: process start to CONNACK",
        mosquitto_pub,
    ));
    table.push(("Python paho-mqtt 2 (in-process)", paho));
    for (name, cells) in table {
        let cells: Vec<String> = cells
            .iter()
            .map(|(m, p)| format!("{m:.1} / {p:.1}"))
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    Ok(())
}

fn rumqttc_options(
    config: &Config,
    tls: Option<Arc<rustls::ClientConfig>>,
    id: &str,
) -> MqttOptions {
    let broker = &config.brokers[0];
    let mut options = MqttOptions::new(id, &broker.host, broker.port);
    options
        .set_credentials(&config.client_id, config.client_key.expose())
        .set_max_packet_size(1 << 20, 1 << 20);
    if let Some(tls) = tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    options
}

async fn rumqttc_connect(
    config: &Config,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Duration> {
    let started = Instant::now();
    let (client, mut events) =
        AsyncClient::new(rumqttc_options(config, tls, &config.client_id), 10);
    loop {
        if let Event::Incoming(Incoming::ConnAck(_)) = events.poll().await? {
            break;
        }
    }
    let took = started.elapsed();
    client.disconnect().await?;
    let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;
    Ok(took)
}

/// What a user of bare rumqttc writes: roots from the CA file, client auth
/// through rustls' own API.
fn hand_built_tls(lab: &Lab, mode: &str) -> Result<Option<Arc<rustls::ClientConfig>>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    if mode == "plain" {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(lab.pki.path("ca.crt"))? {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots);
    let config = match mode {
        "MQTTS" => builder.with_no_client_auth(),
        _ => {
            let chain = CertificateDer::pem_file_iter(&lab.proplet.cert)?
                .collect::<std::result::Result<Vec<_>, _>>()?;
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&lab.proplet.key)?)?
        }
    };
    Ok(Some(Arc::new(config)))
}

fn mosquitto_pub_connack(lab: &Lab, mode: &str) -> Result<Duration> {
    use std::io::{BufRead, BufReader};
    let mut args: Vec<String> = ["-d", "-t", "bench/connect", "-m", "x", "-q", "0"]
        .map(String::from)
        .to_vec();
    args.extend(mosquitto_pub_connection(lab, mode));
    let started = Instant::now();
    let mut child = Command::new("mosquitto_pub")
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    for line in BufReader::new(stdout).lines() {
        if line?.contains("received CONNACK") {
            let took = started.elapsed();
            let _ = child.wait();
            return Ok(took);
        }
    }
    let _ = child.wait();
    Err("mosquitto_pub printed no CONNACK".into())
}

/// mosquitto_pub's arguments to connect as the proplet in `mode`.
fn mosquitto_pub_connection(lab: &Lab, mode: &str) -> Vec<String> {
    let id = propeller_tests::client_id("proplet");
    let mut args: Vec<String> = vec![
        "-h".into(),
        "127.0.0.1".into(),
        "-p".into(),
        lab.port(mode).to_string(),
    ];
    args.extend([
        "-i".into(),
        id.clone(),
        "-u".into(),
        id,
        "-P".into(),
        lab.proplet.secret.clone(),
    ]);
    if let [ca, cert, key] = lab.tls_files(mode, &lab.proplet).as_slice() {
        args.extend(["--cafile".into(), ca.clone()]);
        if !cert.is_empty() {
            args.extend(["--cert".into(), cert.clone(), "--key".into(), key.clone()]);
        }
    }
    args
}

fn python(args: &[String]) -> Result<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/paho_bench.py");
    let output = Command::new("python3").arg(script).args(args).output()?;
    if !output.status.success() {
        return Err(format!("paho: {}", String::from_utf8_lossy(&output.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

// ---------------------------------------------------------------- throughput

async fn throughput(lab: &Lab) -> Result<()> {
    println!("\n## Throughput (messages/s and payload MB/s, publisher to subscriber, one connection each)\n");
    println!("| QoS | payload | client | {} |", MODES.join(" | "));
    println!("|---|---|---|---|---|---|");
    for qos in [0u8, 1] {
        for (size, count) in [(256usize, 20_000usize), (65_536, 500)] {
            for client in [
                "propeller-mqtt",
                "bare rumqttc",
                "paho-mqtt",
                "mosquitto_pub -l",
            ] {
                let mut cells = Vec::new();
                for mode in MODES {
                    let cell = match run_throughput(lab, mode, client, qos, size, count).await {
                        Ok((received, took)) => {
                            let rate = received as f64 / took.as_secs_f64();
                            let lost = if received < count {
                                format!(" ({} lost)", count - received)
                            } else {
                                String::new()
                            };
                            format!("{rate:.0}/s, {:.1} MB/s{lost}", rate * size as f64 / 1e6)
                        }
                        Err(e) => format!("error: {e}"),
                    };
                    cells.push(cell);
                }
                let size = if size == 256 {
                    "256 B".into()
                } else {
                    format!("{} KiB", size / 1024)
                };
                println!("| {qos} | {size} | {client} | {} |", cells.join(" | "));
            }
        }
    }
    Ok(())
}

/// Publishes `count` messages from `client` in `mode`; returns how many a
/// subscriber received and the time from the first publish to the last receipt.
async fn run_throughput(
    lab: &Lab,
    mode: &str,
    client: &str,
    qos: u8,
    size: usize,
    count: usize,
) -> Result<(usize, Duration)> {
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let topic = format!("bench/{}", RUN.fetch_add(1, Ordering::SeqCst));
    let rqos = if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    // The subscriber: rumqttc on the plain listener.
    let mut options = MqttOptions::new(format!("sub-{topic}"), "127.0.0.1", lab.broker.plain);
    options
        .set_credentials(
            propeller_tests::client_id("manager"),
            lab.manager.secret.clone(),
        )
        .set_max_packet_size(1 << 20, 1 << 20);
    let (subscriber, mut events) = AsyncClient::new(options, 10);
    subscriber.subscribe(&topic, rqos).await?;
    loop {
        if let Event::Incoming(Incoming::SubAck(_)) = events.poll().await? {
            break;
        }
    }
    let received = Arc::new(AtomicUsize::new(0));
    let (counter, expected) = (received.clone(), count);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut done = Some(done_tx);
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Incoming::Publish(_)) = event {
                if counter.fetch_add(1, Ordering::SeqCst) + 1 == expected {
                    if let Some(done) = done.take() {
                        let _ = done.send(Instant::now());
                    }
                }
            }
        }
    });

    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let started = Instant::now();
    match client {
        "propeller-mqtt" => {
            let mut env = lab.env(mode, &lab.proplet);
            env.set("MQTT_QOS", &qos.to_string())
                .set("MQTT_OUTBOX_LIMIT", &count.to_string());
            let config = Config::from_vars(Service::Proplet, env.vars.clone())?;
            let (client, _) = Client::start(&config, vec![])?;
            client
                .state()
                .wait_for(|s| *s == ConnectionState::Connected)
                .await?;
            let started = Instant::now();
            let mut deliveries = Vec::with_capacity(count);
            for _ in 0..count {
                deliveries.push(client.publish(topic.clone(), payload.clone()).await?);
            }
            for delivery in deliveries {
                delivery.acknowledged().await?;
            }
            let last = tokio::time::timeout(Duration::from_secs(60), done_rx)
                .await
                .ok()
                .and_then(|r| r.ok());
            client.shutdown().await;
            return Ok((
                received.load(Ordering::SeqCst),
                last.map_or(started.elapsed(), |t| t - started),
            ));
        }
        "bare rumqttc" => {
            let config =
                Config::from_vars(Service::Proplet, lab.env(mode, &lab.proplet).vars.clone())?;
            let tls = TlsSetup::load(&config)?.map(|t| t.client_config);
            let (publisher, mut events) =
                AsyncClient::new(rumqttc_options(&config, tls, &config.client_id), 1000);
            let acked = Arc::new(AtomicUsize::new(0));
            let acks = acked.clone();
            tokio::spawn(async move {
                while let Ok(event) = events.poll().await {
                    if matches!(
                        event,
                        Event::Incoming(Incoming::PubAck(_))
                            | Event::Outgoing(rumqttc::Outgoing::Publish(0))
                    ) {
                        acks.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
            let started = Instant::now();
            for _ in 0..count {
                publisher
                    .publish_bytes(topic.clone(), rqos, false, payload.clone())
                    .await?;
            }
            let last = tokio::time::timeout(Duration::from_secs(60), done_rx)
                .await
                .ok()
                .and_then(|r| r.ok());
            let _ = publisher.disconnect().await;
            return Ok((
                received.load(Ordering::SeqCst),
                last.map_or(started.elapsed(), |t| t - started),
            ));
        }
        "paho-mqtt" => {
            let mut args = vec![
                "publish".to_owned(),
                count.to_string(),
                size.to_string(),
                qos.to_string(),
                topic.clone(),
            ];
            args.extend([
                "127.0.0.1".into(),
                lab.port(mode).to_string(),
                propeller_tests::client_id("proplet"),
                lab.proplet.secret.clone(),
            ]);
            args.extend(lab.tls_files(mode, &lab.proplet));
            python(&args)?;
        }
        _ => {
            let mut args: Vec<String> = ["-l", "-t", &topic, "-q", &qos.to_string()]
                .map(String::from)
                .to_vec();
            args.extend(mosquitto_pub_connection(lab, mode));
            let mut child = Command::new("mosquitto_pub")
                .args(&args)
                .stdin(Stdio::piped())
                .spawn()?;
            let mut stdin = child.stdin.take().ok_or("no stdin")?;
            let line = [payload.as_ref(), b"\n"].concat();
            tokio::task::spawn_blocking(move || {
                use std::io::Write;
                for _ in 0..count {
                    if stdin.write_all(&line).is_err() {
                        break;
                    }
                }
            })
            .await?;
            let _ = tokio::task::spawn_blocking(move || child.wait()).await?;
        }
    }
    let last = tokio::time::timeout(Duration::from_secs(60), done_rx)
        .await
        .ok()
        .and_then(|r| r.ok());
    let _ = subscriber.disconnect().await;
    Ok((
        received.load(Ordering::SeqCst),
        last.map_or(started.elapsed(), |t| t - started),
    ))
}

// ---------------------------------------------------------------- resources

async fn resources(lab: &Lab) -> Result<()> {
    println!("\n## Resources\n");
    let release = std::env::current_exe()?
        .ancestors()
        .nth(2)
        .ok_or("target dir")?
        .to_owned();
    println!("| binary | size | stripped |");
    println!("|---|---|---|");
    for binary in ["manager", "proplet", "proxy", "propeller-mqtt"] {
        let path = release.join(binary);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let stripped = std::env::temp_dir().join(format!("bench-stripped-{binary}"));
        let _ = Command::new("strip")
            .arg("-o")
            .arg(&stripped)
            .arg(&path)
            .status();
        let stripped_size = std::fs::metadata(&stripped).map(|m| m.len()).unwrap_or(0);
        let _ = std::fs::remove_file(&stripped);
        println!(
            "| {binary} | {:.1} MiB | {:.1} MiB |",
            size as f64 / 1048576.0,
            stripped_size as f64 / 1048576.0
        );
    }
    println!("\n| idle process, connected, keep-alive 30 s | mode | RSS after 5 s | CPU over 60 s | CPU per hour (extrapolated) |");
    println!("|---|---|---|---|---|");
    for mode in ["plain", "mTLS"] {
        let env = lab.env(mode, &lab.proplet);
        let service = ServiceProcess::start("proplet", &env.vars);
        service.wait_for(CONNECTED, Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let pid = service.pid();
        let (rss, cpu0) = (rss_kib(pid), cpu_ticks(pid));
        tokio::time::sleep(Duration::from_secs(60)).await;
        let cpu = cpu_ticks(pid).saturating_sub(cpu0) * 10; // 100 ticks per second
        println!(
            "| `proplet` | {mode} | {:.1} MiB | {cpu} ms | {} ms |",
            rss as f64 / 1024.0,
            cpu * 60
        );
    }
    let mut sub = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &lab.broker.plain.to_string(),
            "-t",
            "idle",
            "-k",
            "30",
        ])
        .args([
            "-u",
            &propeller_tests::client_id("manager"),
            "-P",
            &lab.manager.secret,
        ])
        .stdout(Stdio::null())
        .spawn()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    println!(
        "| `mosquitto_sub` (C, for scale) | plain | {:.1} MiB | | |",
        rss_kib(sub.id()) as f64 / 1024.0
    );
    let _ = sub.kill();
    let _ = sub.wait();
    Ok(())
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may contain spaces: utime is 14th, stime 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0)
}

// ---------------------------------------------------------------- fleet

async fn fleet(lab: &Lab, n: usize) -> Result<()> {
    if n == 100 {
        println!(
            "\n## Fleet: one process, N proplets over mTLS, each with its own client certificate\n"
        );
        println!(
            "| N | all established after | failed | process RSS before / after | per connection |"
        );
        println!("|---|---|---|---|---|");
    }
    // A CA for the fleet, one client certificate per proplet, and a broker
    // that trusts that CA for client certificates.
    let dir = tempfile::tempdir()?;
    let out = Output {
        dir: dir.path().to_owned(),
        force: false,
        key_password: None,
    };
    certs::ca(&out, &Subject::default(), KeyType::EcdsaP256, 30)?;
    let mut members = Vec::with_capacity(n);
    for i in 0..n {
        let secret = format!("fleet-{n}-{i}-secret");
        let name = format!("p{i}");
        certs::client(
            &out,
            &Subject::default(),
            &name,
            &Secret::new(secret.clone()),
            KeyType::EcdsaP256,
            30,
        )?;
        members.push((
            format!("fleet-{i}"),
            secret,
            dir.path().join(format!("{name}.crt")),
            dir.path().join(format!("{name}.key")),
        ));
    }
    let accounts: Vec<Account> = members
        .iter()
        .map(|(id, secret, _, _)| Account {
            username: id.clone(),
            password: secret.clone(),
            topics: "#".into(),
        })
        .collect();
    let broker = Mosquitto::start_with(
        lab.pki,
        &accounts,
        BrokerOptions {
            client_ca: Some(dir.path().join("ca.crt")),
            ..Default::default()
        },
    );
    let before = rss_kib(std::process::id());
    let started = Instant::now();
    let mut clients = Vec::with_capacity(n);
    for (id, secret, cert, key) in &members {
        let vars = fleet_env(lab.pki, broker.mtls, id, secret, cert, key);
        let config = Config::from_vars(Service::Proplet, vars)?;
        clients
            .push(Client::start(&config, vec![config.channel.topic("control/manager/start")])?.0);
    }
    let mut failed = 0;
    for client in &clients {
        let mut state = client.state();
        let connected = tokio::time::timeout(
            Duration::from_secs(60),
            state.wait_for(|s| *s == ConnectionState::Connected),
        )
        .await;
        if !matches!(connected, Ok(Ok(_))) {
            failed += 1;
        }
    }
    let took = started.elapsed();
    let after = rss_kib(std::process::id());
    println!(
        "| {n} | {:.2} s | {failed} | {:.1} / {:.1} MiB | {:.0} KiB |",
        took.as_secs_f64(),
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        after.saturating_sub(before) as f64 / n as f64
    );
    for client in clients {
        client.shutdown().await;
    }
    drop(broker);
    Ok(())
}

fn fleet_env(
    pki: &Pki,
    port: u16,
    id: &str,
    secret: &str,
    cert: &Path,
    key: &Path,
) -> Vec<(String, String)> {
    [
        ("PROPLET_MQTT_ADDRESS", format!("ssl://127.0.0.1:{port}")),
        (
            "PROPLET_MQTT_TLS_CA_CERT",
            pki.path("ca.crt").display().to_string(),
        ),
        ("PROPLET_MQTT_TLS_CLIENT_CERT", cert.display().to_string()),
        ("PROPLET_MQTT_TLS_CLIENT_KEY", key.display().to_string()),
        ("PROPLET_CLIENT_ID", id.to_owned()),
        ("PROPLET_CLIENT_KEY", secret.to_owned()),
        ("PROPLET_DOMAIN_ID", "dom".to_owned()),
        ("PROPLET_CHANNEL_ID", "chan".to_owned()),
        ("PROPLET_MQTT_TIMEOUT", "30s".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}
