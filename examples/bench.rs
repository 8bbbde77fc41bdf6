//! Benchmarks: connect latency per path, throughput with CPU per message,
//! the task round trip through the three services, resources and a fleet of
//! mTLS proplets; with this crate and the peers operators compare it with
//! (Eclipse paho.mqtt.golang, mosquitto_pub). Every peer comparison is a ratio
//! of figures taken in the same run. Prints the markdown tables of
//! BENCHMARKS.md; asserts nothing.
//!
//! ```sh
//! apt-get install -y mosquitto mosquitto-clients openssl nginx libnginx-mod-stream \
//!     libnginx-mod-stream-js golang-go golang-github-eclipse-paho.mqtt.golang-dev
//! ulimit -n 8192
//! cargo run --release --example bench                 # everything, about 6 minutes
//! cargo run --release --example bench -- connect      # or: inprocess, throughput,
//!                                                     # roundtrip, resources, fleet
//! ```
//!
//! The harness runs our client in child processes of itself (`__connect`,
//! `__publish`), so that it is measured the way the peers are: a fresh
//! process per connection, and the publisher's CPU time on its own.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use propeller_mqtt::Secret;
use propeller_mqtt::{Client, ConnectionState, Options};
use propeller_mqtt_cli::certs::{self, KeyType, Output, Subject};
use propeller_protocol::{Service, ServiceConfig};
use propeller_tests::{
    accounts, Account, BrokerOptions, Env, Identity, Mosquitto, Pki, ServiceProcess, CONNECTED,
};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const MODES: [&str; 3] = ["plain", "MQTTS", "mTLS"];
/// Connections per cell, taken interleaved across the peers.
const CONNECTS: usize = 25;
/// Runs per throughput cell, interleaved across the peers.
const RUNS: usize = 5;
/// Messages per throughput run, of [`PAYLOAD`] bytes.
const MESSAGES: usize = 20_000;
const PAYLOAD: usize = 256;
/// Task round trips per cell, after [`WARM_UP`] unmeasured ones.
const TASKS: usize = 15;
const WARM_UP: usize = 2;
/// The 41-byte WebAssembly module exporting `add(i32, i32) -> i32` (README).
const ADD_WASM: [u8; 41] = [
    0, 97, 115, 109, 1, 0, 0, 0, 1, 7, 1, 96, 2, 127, 127, 1, 127, 3, 2, 1, 0, 7, 7, 1, 3, 97, 100,
    100, 0, 0, 10, 9, 1, 7, 0, 32, 0, 32, 1, 106, 11,
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Our client in a child runs on the runtime the services give it
    // (`propeller_mqtt::service`): one thread.
    let child = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match args.first().map(String::as_str) {
        Some("__connect") => return child?.block_on(child_connect(&args[1])),
        Some("__publish") => return child?.block_on(child_publish(&args[1..])),
        _ => {}
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(harness(args))
}

async fn harness(args: Vec<String>) -> Result<()> {
    let part = args.first().cloned().unwrap_or_else(|| "all".into());
    let wants = |name: &str| part == "all" || part == name;
    let pki = Pki::shared();
    let (proplet, manager, proxy) = (
        pki.identity("proplet"),
        pki.identity("manager"),
        pki.identity("proxy"),
    );
    let broker = Mosquitto::start(pki, &accounts(&[&proplet, &manager, &proxy], "#"));
    let edge_key = NginxEdge::start(pki, broker.plain, "key")?;
    let edge_x509 = NginxEdge::start(pki, broker.plain, "x509")?;
    let paho = build_paho();
    let lab = Lab {
        pki,
        broker,
        edge_key,
        edge_x509,
        proplet,
        manager,
        proxy,
        paho,
    };
    println!(
        "machine: {} cores; {}; {}; {}",
        std::thread::available_parallelism()?,
        version("mosquitto", &["-h"]),
        version("nginx", &["-v"]),
        version("go", &["version"]),
    );
    if lab.paho.is_none() {
        println!("paho Go peer: not built (needs golang-go and golang-github-eclipse-paho.mqtt.golang-dev); its cells are empty");
    }
    if wants("connect") {
        connect_latency(&lab).await?;
    }
    if wants("inprocess") {
        in_process_connects(&lab).await?;
    }
    if wants("throughput") {
        throughput(&lab).await?;
    }
    if wants("roundtrip") {
        round_trips(&lab).await?;
    }
    if wants("resources") {
        resources(&lab).await?;
    }
    if wants("fleet") {
        for n in [100, 1000] {
            fleet(&lab, n).await?;
        }
    }
    Ok(())
}

struct Lab {
    pki: &'static Pki,
    broker: Mosquitto,
    /// nginx `AUTH=key`: TLS, plus a plain listener.
    edge_key: NginxEdge,
    /// nginx `AUTH=x509`: mTLS.
    edge_x509: NginxEdge,
    proplet: Identity,
    manager: Identity,
    proxy: Identity,
    paho: Option<PathBuf>,
}

/// Where a client connects: to mosquitto's own listener or through nginx,
/// in one of [`MODES`].
#[derive(Clone, Copy)]
struct Route {
    nginx: bool,
    mode: &'static str,
}

impl Route {
    fn all() -> Vec<Route> {
        [false, true]
            .into_iter()
            .flat_map(|nginx| MODES.map(|mode| Route { nginx, mode }))
            .collect()
    }

    fn name(&self) -> String {
        let via = if self.nginx { "nginx" } else { "mosquitto" };
        format!("{} via {via}", self.mode)
    }
}

impl Lab {
    fn port(&self, path: Route) -> u16 {
        match (path.nginx, path.mode) {
            (false, "plain") => self.broker.plain,
            (false, "MQTTS") => self.broker.tls,
            (false, _) => self.broker.mtls,
            (true, "plain") => self.edge_key.plain,
            (true, "MQTTS") => self.edge_key.tls,
            (true, _) => self.edge_x509.tls,
        }
    }

    /// The env of service `prefix` as `identity`, on `path`.
    fn env_on(&self, prefix: &str, path: Route, identity: &Identity) -> Env {
        let mut env = Env::new(prefix, identity);
        let port = self.port(path);
        match path.mode {
            "plain" => env.plain(port),
            "MQTTS" => env.tls(port, self.pki),
            _ => env.mtls(port, self.pki, identity),
        };
        env
    }

    /// The proplet's env in `mode`, straight to mosquitto.
    fn env(&self, mode: &'static str, identity: &Identity) -> Env {
        self.env_on("PROPLET", Route { nginx: false, mode }, identity)
    }

    /// `[host, port, id, user, password, ca, cert, key]` for paho Go, as the proplet.
    fn paho_args(&self, path: Route) -> Vec<String> {
        let id = propeller_tests::client_id("proplet");
        let mut args = vec![
            "127.0.0.1".to_owned(),
            self.port(path).to_string(),
            id.clone(),
            id,
            self.proplet.secret.clone(),
        ];
        args.extend(self.tls_files(path.mode, &self.proplet));
        args
    }

    /// `[ca, cert, key]`, empty strings where the mode has none.
    fn tls_files(&self, mode: &str, identity: &Identity) -> [String; 3] {
        let ca = self.pki.path("ca.crt").display().to_string();
        match mode {
            "plain" => Default::default(),
            "MQTTS" => [ca, String::new(), String::new()],
            _ => [
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

/// Median and spread of a set of samples.
#[derive(Clone, Copy, Default)]
struct Summary {
    median: f64,
    low: f64,
    high: f64,
}

impl Summary {
    /// Median, with the 10th and 90th percentiles as the spread.
    fn percentiles(samples: &[f64]) -> Summary {
        Self::of(samples, 0.1, 0.9)
    }

    /// Median, with the minimum and maximum as the spread.
    fn range(samples: &[f64]) -> Summary {
        Self::of(samples, 0.0, 1.0)
    }

    fn of(samples: &[f64], low: f64, high: f64) -> Summary {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        if sorted.is_empty() {
            return Summary {
                median: f64::NAN,
                low: f64::NAN,
                high: f64::NAN,
            };
        }
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Summary {
            median,
            low: at(low),
            high: at(high),
        }
    }

    fn show(&self, decimals: usize) -> String {
        if self.median.is_nan() {
            return "–".into();
        }
        format!(
            "{:.d$} ({:.d$}–{:.d$})",
            self.median,
            self.low,
            self.high,
            d = decimals
        )
    }
}

/// `ours / theirs`, as "0.12x".
fn ratio(ours: Summary, theirs: Summary) -> String {
    let r = ours.median / theirs.median;
    if r.is_finite() {
        format!("{r:.2}x")
    } else {
        "–".into()
    }
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
        .trim()
        .to_owned()
}

// ---------------------------------------------------------------- peers and children

/// Builds the paho Go peer (GOPATH mode, Debian's packages) into the target
/// directory; `None` when Go or paho is missing.
fn build_paho() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::current_exe().ok()?.ancestors().nth(3)?.to_owned();
    let out = target.join("paho-bench");
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(root.join("peers/paho_go/main.go"))
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", target.join("go-build-cache"))
        .env("GOFLAGS", "")
        .status()
        .ok()?;
    status.success().then_some(out)
}

/// Runs `program` to completion and returns its stdout, trimmed; fails with
/// its stderr.
fn run(program: &mut Command) -> Result<String> {
    let output = program.stdin(Stdio::null()).output()?;
    if !output.status.success() {
        return Err(format!(
            "{:?}: {}",
            program.get_program(),
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// This harness again, as a child: our client in a fresh process.
fn ourselves(args: &[&str], env: &[(String, String)]) -> Command {
    let mut command = Command::new(std::env::current_exe().expect("own path"));
    command
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)));
    command
}

/// The proplet's config from this process's environment.
fn config_from_env() -> Result<Options> {
    let vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("PROPLET_"))
        .collect();
    Ok(ServiceConfig::from_vars(Service::Proplet, vars)?.mqtt)
}

/// Child: one connection in a fresh process, from `Client::start` (which
/// reads the TLS files) to CONNACK; prints microseconds. `rumqttc` is
/// rumqttc 0.25 alone (its own socket), from loading our TLS config to
/// CONNACK. The env is parsed before the clock starts, as a service does
/// before it starts the client.
async fn child_connect(kind: &str) -> Result<()> {
    let config = config_from_env()?;
    let started = Instant::now();
    match kind {
        "ours" => {
            let (client, _) = Client::start(&config, vec![])?;
            client
                .state()
                .wait_for(|s| *s == ConnectionState::Connected)
                .await?;
            println!("{}", started.elapsed().as_micros());
            client.shutdown().await;
        }
        _ => {
            let tls = config.load_tls()?.map(|t| t.client_config);
            let (client, mut events) =
                AsyncClient::new(rumqttc_options(&config, tls, &config.client_id), 10);
            loop {
                if let Event::Incoming(Incoming::ConnAck(_)) = events.poll().await? {
                    break;
                }
            }
            println!("{}", started.elapsed().as_micros());
            client.disconnect().await?;
            let _ = tokio::time::timeout(Duration::from_millis(200), events.poll()).await;
        }
    }
    Ok(())
}

/// CPU time of this process so far (every live thread), in nanoseconds.
fn cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// Child: `__publish TOPIC COUNT SIZE` with our client, QoS from the env.
/// Prints "START_UNIX_NS ELAPSED_NS CPU_NS" as paho-bench does.
async fn child_publish(args: &[String]) -> Result<()> {
    let [topic, count, size] = args else {
        return Err("__publish TOPIC COUNT SIZE".into());
    };
    let (count, size): (usize, usize) = (count.parse()?, size.parse()?);
    let config = config_from_env()?;
    let (client, _) = Client::start(&config, vec![])?;
    client
        .state()
        .wait_for(|s| *s == ConnectionState::Connected)
        .await?;
    let payload = bytes::Bytes::from(vec![b'x'; size]);
    let wall = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
    let (started, cpu) = (Instant::now(), cpu_ns());
    let mut deliveries = Vec::with_capacity(count);
    for _ in 0..count {
        deliveries.push(client.publish(topic.as_str(), payload.clone()).await?);
    }
    for delivery in deliveries {
        delivery.acknowledged().await?;
    }
    let (elapsed, cpu) = (started.elapsed(), cpu_ns() - cpu);
    println!("{wall} {} {cpu}", elapsed.as_nanos());
    client.shutdown().await;
    Ok(())
}

/// An nginx stream edge in front of mosquitto's plain listener, rendered by
/// `docker/nginx/render.sh` as in the tests (`tests/support` `Edge`), with a
/// plain listener as well for `AUTH=key`.
struct NginxEdge {
    tls: u16,
    plain: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl NginxEdge {
    fn start(pki: &Pki, upstream: u16, auth: &str) -> Result<NginxEdge> {
        let dir = tempfile::tempdir()?;
        let [tls, plain] = propeller_tests::free_ports();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/nginx/render.sh");
        let config = dir.path().join("nginx.conf");
        let mut render = Command::new("sh");
        render
            .arg(&script)
            .arg(&config)
            .env("AUTH", auth)
            .env("LISTEN", format!("127.0.0.1:{tls}"))
            .env("UPSTREAM", format!("127.0.0.1:{upstream}"))
            .env("SERVER_CERT", pki.path("server.crt"))
            .env("SERVER_KEY", pki.path("server.key"))
            .env("CLIENT_CA", pki.path("ca.crt"))
            .env("RUN_DIR", dir.path())
            .env("SINGLE_PROCESS", "1");
        if auth == "key" {
            render.env("PLAIN_LISTEN", format!("127.0.0.1:{plain}"));
        }
        if let Some(modules) = std::env::var_os("NGINX_MODULES") {
            render.env("MODULES", modules);
        }
        run(&mut render)?;
        let mut child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let ports: &[u16] = if auth == "key" { &[tls, plain] } else { &[tls] };
        for &port in ports {
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if Instant::now() > deadline || child.try_wait()?.is_some() {
                    let _ = child.kill();
                    return Err(format!("nginx did not listen on {port}").into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(NginxEdge {
            tls,
            plain,
            child,
            _dir: dir,
        })
    }
}

impl Drop for NginxEdge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- connect latency

/// Fresh processes, one connection each, on every path: our client against
/// paho Go and rumqttc alone (in-process times, from reading the TLS files to
/// CONNACK), and the `proplet` binary against `mosquitto_pub` (process start
/// to CONNACK). Samples interleaved across peers.
async fn connect_latency(lab: &Lab) -> Result<()> {
    println!("\n## Connect latency, a fresh process per connection (ms, median (p10–p90) of {CONNECTS})\n");
    println!("| path | ours: `Client::start` to CONNACK | paho Go: client built to CONNACK | ours / paho Go | rumqttc alone (its own socket), our TLS config | `proplet`: process start to CONNACK | `mosquitto_pub -d`: process start to CONNACK | `proplet` / `mosquitto_pub` |");
    println!("|---|---|---|---|---|---|---|---|");
    for path in Route::all() {
        let env = lab.env_on("PROPLET", path, &lab.proplet);
        let paho_args = lab.paho_args(path);
        let mut samples: [Vec<f64>; 5] = Default::default();
        for _ in 0..CONNECTS {
            let ours = run(&mut ourselves(&["__connect", "ours"], &env.vars))?;
            samples[0].push(ours.parse::<f64>()? / 1000.0);
            if let Some(paho) = &lab.paho {
                let out = run(Command::new(paho).arg("connect").args(&paho_args))?;
                samples[1].push(out.parse::<f64>()? / 1000.0);
            }
            let bare = run(&mut ourselves(&["__connect", "rumqttc"], &env.vars))?;
            samples[2].push(bare.parse::<f64>()? / 1000.0);
            let started = Instant::now();
            let service = ServiceProcess::start("proplet", &env.vars);
            service.wait_for(CONNECTED, Duration::from_secs(10));
            samples[3].push(ms(started.elapsed()));
            drop(service);
            samples[4].push(ms(mosquitto_pub_connack(lab, path)?));
        }
        let s = samples.each_ref().map(|v| Summary::percentiles(v));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            path.name(),
            s[0].show(2),
            s[1].show(2),
            ratio(s[0], s[1]),
            s[2].show(2),
            s[3].show(2),
            s[4].show(2),
            ratio(s[3], s[4]),
        );
    }
    Ok(())
}

/// In one process, straight to mosquitto: our client after the process's
/// first connection, and rumqttc with a fresh or a shared TLS config (full or
/// resumed handshake).
async fn in_process_connects(lab: &Lab) -> Result<()> {
    println!("\n## Connect latency in a running process, to mosquitto (ms, median (p10–p90) of {CONNECTS})\n");
    println!("| client | {} |", MODES.join(" | "));
    println!("|---|---|---|---|");
    let mut rows: [Vec<Summary>; 4] = Default::default();
    for mode in MODES {
        let env = lab.env(mode, &lab.proplet);
        let config = ServiceConfig::from_vars(Service::Proplet, env.vars.clone())?.mqtt;
        let shared = config.load_tls()?.map(|t| t.client_config);
        // The first connection of the process, unmeasured.
        rumqttc_connect(&config, shared.clone()).await?;
        let mut samples: [Vec<f64>; 4] = Default::default();
        for _ in 0..CONNECTS {
            let started = Instant::now();
            let (client, _) = Client::start(&config, vec![])?;
            client
                .state()
                .wait_for(|s| *s == ConnectionState::Connected)
                .await?;
            samples[0].push(ms(started.elapsed()));
            client.shutdown().await;
            let fresh = config.load_tls()?.map(|t| t.client_config);
            samples[1].push(ms(rumqttc_connect(&config, fresh).await?));
            samples[2].push(ms(rumqttc_connect(&config, shared.clone()).await?));
            let hand_built = hand_built_tls(lab, mode)?;
            samples[3].push(ms(rumqttc_connect(&config, hand_built).await?));
        }
        for (row, samples) in rows.iter_mut().zip(&samples) {
            row.push(Summary::percentiles(samples));
        }
    }
    let names = [
        "propeller-mqtt `Client::start` (TLS files read, full handshake, each time)",
        "rumqttc alone + our TLS config, fresh each time (full handshake)",
        "rumqttc alone + our TLS config, shared (resumed handshake)",
        "rumqttc alone + hand-built rustls config (full handshake)",
    ];
    for (name, row) in names.iter().zip(&rows) {
        let cells: Vec<String> = row.iter().map(|s| s.show(2)).collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    Ok(())
}

fn rumqttc_options(
    config: &Options,
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
    config: &Options,
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

fn mosquitto_pub_connack(lab: &Lab, path: Route) -> Result<Duration> {
    let mut args: Vec<String> = ["-d", "-t", "bench/connect", "-m", "x", "-q", "0"]
        .map(String::from)
        .to_vec();
    args.extend(mosquitto_pub_connection(lab, path));
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

/// mosquitto_pub's arguments to connect as the proplet on `path`.
fn mosquitto_pub_connection(lab: &Lab, path: Route) -> Vec<String> {
    let id = propeller_tests::client_id("proplet");
    let mut args: Vec<String> = vec![
        "-h".into(),
        "127.0.0.1".into(),
        "-p".into(),
        lab.port(path).to_string(),
    ];
    args.extend([
        "-i".into(),
        id.clone(),
        "-u".into(),
        id,
        "-P".into(),
        lab.proplet.secret.clone(),
    ]);
    let [ca, cert, key] = lab.tls_files(path.mode, &lab.proplet);
    if !ca.is_empty() {
        args.extend(["--cafile".into(), ca]);
        if !cert.is_empty() {
            args.extend(["--cert".into(), cert, "--key".into(), key]);
        }
    }
    args
}

// ---------------------------------------------------------------- throughput

/// One publisher run: messages per second, and the publisher's CPU time per
/// message in microseconds.
struct Run {
    rate: f64,
    cpu_us: f64,
    /// mosquitto's CPU time per message over the run (10 ms resolution).
    broker_us: f64,
    lost: usize,
}

/// QoS 0 and 1, 256 B, our client against paho Go, each in its own process,
/// straight to mosquitto. QoS 1: from the first publish until every PUBACK,
/// at the publisher. QoS 0: from the first publish until the last message
/// reaches a subscriber on the same broker.
async fn throughput(lab: &Lab) -> Result<()> {
    println!("\n## Throughput, {PAYLOAD} B messages, {MESSAGES} per run, publisher in its own process (median (min–max) of {RUNS} runs, interleaved)\n");
    println!("| QoS | mode | ours: msg/s | paho Go: msg/s | ours / paho Go | ours: CPU µs/msg | paho Go: CPU µs/msg | ours / paho Go | mosquitto's CPU µs/msg, ours / paho Go's run |");
    println!("|---|---|---|---|---|---|---|---|---|");
    // BENCH_CELLS="1/plain 0/mTLS" runs only those cells.
    let cells = std::env::var("BENCH_CELLS").ok();
    for qos in [1u8, 0] {
        for mode in MODES {
            if cells.as_ref().is_some_and(|cells| {
                !cells
                    .split_whitespace()
                    .any(|c| c == format!("{qos}/{mode}"))
            }) {
                continue;
            }
            let path = Route { nginx: false, mode };
            let mut ours = Vec::new();
            let mut paho = Vec::new();
            for _ in 0..RUNS {
                ours.push(publish_run(lab, path, qos, false).await?);
                if lab.paho.is_some() {
                    paho.push(publish_run(lab, path, qos, true).await?);
                }
            }
            let rate =
                |runs: &[Run]| Summary::range(&runs.iter().map(|r| r.rate).collect::<Vec<_>>());
            let cpu =
                |runs: &[Run]| Summary::range(&runs.iter().map(|r| r.cpu_us).collect::<Vec<_>>());
            let broker = |runs: &[Run]| {
                Summary::range(&runs.iter().map(|r| r.broker_us).collect::<Vec<_>>())
            };
            let lost: usize = ours.iter().chain(&paho).map(|r| r.lost).sum();
            let lost = if lost > 0 {
                format!(" ({lost} lost)")
            } else {
                String::new()
            };
            println!(
                "| {qos} | {mode}{lost} | {} | {} | {} | {} | {} | {} | {:.1} / {:.1} |",
                rate(&ours).show(0),
                rate(&paho).show(0),
                ratio(rate(&ours), rate(&paho)),
                cpu(&ours).show(2),
                cpu(&paho).show(2),
                ratio(cpu(&ours), cpu(&paho)),
                broker(&ours).median,
                broker(&paho).median,
            );
        }
    }
    Ok(())
}

async fn publish_run(lab: &Lab, path: Route, qos: u8, paho: bool) -> Result<Run> {
    static RUN: AtomicUsize = AtomicUsize::new(0);
    let topic = format!("bench/{}", RUN.fetch_add(1, Ordering::SeqCst));
    // QoS 0: a subscriber tells when the last message arrived.
    let subscriber = if qos == 0 {
        Some(Subscriber::start(lab, &topic, MESSAGES).await?)
    } else {
        None
    };
    let broker = broker_pid(lab.broker.dir.path());
    let broker_ticks = broker.map_or(0, cpu_ticks);
    let out = if paho {
        let mut args = vec!["publish".to_owned()];
        args.extend(lab.paho_args(path));
        args.extend([
            topic.clone(),
            MESSAGES.to_string(),
            PAYLOAD.to_string(),
            qos.to_string(),
        ]);
        let program = lab.paho.clone().ok_or("no paho")?;
        tokio::task::spawn_blocking(move || {
            run(Command::new(program).args(args)).map_err(|e| e.to_string())
        })
        .await??
    } else {
        let mut env = lab.env_on("PROPLET", path, &lab.proplet);
        env.set("MQTT_QOS", &qos.to_string())
            .set("MQTT_OUTBOX_LIMIT", &MESSAGES.to_string());
        let args = [
            "__publish".to_owned(),
            topic.clone(),
            MESSAGES.to_string(),
            PAYLOAD.to_string(),
        ];
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut child = ourselves(&args, &env.vars);
            // BENCH_WRAP="perf record -g -o /tmp/ours.data --" runs each of
            // our publishers under that command, to see where its CPU goes.
            if let Ok(wrap) = std::env::var("BENCH_WRAP") {
                let mut words = wrap.split_whitespace();
                let mut wrapped = Command::new(words.next().unwrap_or("env"));
                wrapped
                    .args(words)
                    .arg(child.get_program())
                    .args(child.get_args())
                    .env_clear()
                    .envs(env.vars.iter().map(|(k, v)| (k, v)));
                child = wrapped;
            }
            run(&mut child).map_err(|e| e.to_string())
        })
        .await??
    };
    let fields: Vec<f64> = out
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(f64::NAN))
        .collect();
    let [start_unix_ns, elapsed_ns, cpu_ns] = fields[..] else {
        return Err(format!("publisher printed {out:?}").into());
    };
    let cpu_us = cpu_ns / 1000.0 / MESSAGES as f64;
    let broker_us = broker.map_or(f64::NAN, |pid| {
        (cpu_ticks(pid).saturating_sub(broker_ticks) * 10_000) as f64 / MESSAGES as f64
    });
    let (elapsed, lost) = match subscriber {
        None => (elapsed_ns / 1e9, 0),
        Some(subscriber) => {
            let (received, last_unix_ns) = subscriber.finish().await;
            (
                (last_unix_ns - start_unix_ns) / 1e9,
                MESSAGES.saturating_sub(received),
            )
        }
    };
    Ok(Run {
        rate: (MESSAGES - lost) as f64 / elapsed,
        cpu_us,
        broker_us,
        lost,
    })
}

/// The pid of the mosquitto running with the config in `dir`.
fn broker_pid(dir: &Path) -> Option<u32> {
    let config = dir.join("mosquitto.conf").display().to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&config))
        })
}

/// rumqttc on mosquitto's plain listener, counting messages on a topic.
struct Subscriber {
    client: AsyncClient,
    received: Arc<AtomicUsize>,
    last: Arc<Mutex<f64>>,
    done: tokio::sync::oneshot::Receiver<()>,
}

impl Subscriber {
    async fn start(lab: &Lab, topic: &str, expected: usize) -> Result<Subscriber> {
        let mut options = MqttOptions::new(format!("sub-{topic}"), "127.0.0.1", lab.broker.plain);
        options
            .set_credentials(
                propeller_tests::client_id("manager"),
                lab.manager.secret.clone(),
            )
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(options, 10);
        client.subscribe(topic, QoS::AtMostOnce).await?;
        loop {
            if let Event::Incoming(Incoming::SubAck(_)) = events.poll().await? {
                break;
            }
        }
        let received = Arc::new(AtomicUsize::new(0));
        let last = Arc::new(Mutex::new(f64::NAN));
        let (counter, at) = (received.clone(), last.clone());
        let (done_tx, done) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut done_tx = Some(done_tx);
            while let Ok(event) = events.poll().await {
                if let Event::Incoming(Incoming::Publish(_)) = event {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(f64::NAN, |d| d.as_nanos() as f64);
                    *at.lock().unwrap() = now;
                    if counter.fetch_add(1, Ordering::SeqCst) + 1 == expected {
                        if let Some(done) = done_tx.take() {
                            let _ = done.send(());
                        }
                    }
                }
            }
        });
        Ok(Subscriber {
            client,
            received,
            last,
            done,
        })
    }

    /// How many arrived and when the last did (Unix ns), waiting at most 10 s
    /// for stragglers.
    async fn finish(self) -> (usize, f64) {
        let _ = tokio::time::timeout(Duration::from_secs(10), self.done).await;
        let _ = self.client.disconnect().await;
        let last = *self.last.lock().unwrap();
        (self.received.load(Ordering::SeqCst), last)
    }
}

// ---------------------------------------------------------------- task round trip

/// The three service binaries on one path; a task runs inline (module in
/// the request) or through the proxy (`image_url`). Timed from sending
/// `POST /tasks` to the manager logging "task completed" for it; `GET
/// /tasks/{id}` then confirms state 3 and the result (untimed).
async fn round_trips(lab: &Lab) -> Result<()> {
    println!("\n## Task round trip: `POST /tasks`, `POST /tasks/{{id}}/start`, until the manager logs the result (ms, median (p10–p90) of {TASKS})\n");
    println!(
        "| broker | path | inline (module in the request) | through the proxy (`image_url`) |"
    );
    println!("|---|---|---|---|");
    for route in Route::all() {
        round_trip_row(lab, "mosquitto (default: Nagle on)", route)?;
    }
    // The same through nginx, with a broker that sets TCP_NODELAY on its
    // sockets: the nginx-to-broker hop is a TCP connection of the broker's
    // and nginx's, which no client setting reaches.
    let mut broker = Mosquitto::start(
        lab.pki,
        &accounts(&[&lab.proplet, &lab.manager, &lab.proxy], "#"),
    );
    let conf = broker.dir.path().join("mosquitto.conf");
    let text = std::fs::read_to_string(&conf)?;
    std::fs::write(&conf, format!("set_tcp_nodelay true\n{text}"))?;
    broker.restart();
    let nodelay = Lab {
        pki: lab.pki,
        edge_key: NginxEdge::start(lab.pki, broker.plain, "key")?,
        edge_x509: NginxEdge::start(lab.pki, broker.plain, "x509")?,
        broker,
        proplet: lab.proplet.clone(),
        manager: lab.manager.clone(),
        proxy: lab.proxy.clone(),
        paho: None,
    };
    for route in Route::all().into_iter().filter(|r| r.nginx) {
        round_trip_row(&nodelay, "mosquitto, `set_tcp_nodelay true`", route)?;
    }
    Ok(())
}

fn round_trip_row(lab: &Lab, broker: &str, path: Route) -> Result<()> {
    let modules = tempfile::tempdir()?;
    std::fs::write(modules.path().join("add.wasm"), ADD_WASM)?;
    let inline = format!(
        r#"{{"name":"add","inputs":["3","4"],"file":"{}"}}"#,
        base64(&ADD_WASM)
    );
    let proxied = r#"{"name":"add","inputs":["3","4"],"image_url":"add.wasm"}"#.to_owned();
    let mut proxy_env = lab.env_on("PROXY", path, &lab.proxy);
    proxy_env.path("MODULES_DIR", modules.path());
    let proxy = ServiceProcess::start("proxy", &proxy_env.vars);
    // Heartbeats every second, as the tests run them: a task starts only on
    // a proplet the manager has seen alive.
    let mut manager_env = lab.env_on("MANAGER", path, &lab.manager);
    manager_env.set("LIVELINESS_INTERVAL", "1s");
    let manager = ServiceProcess::start("manager", &manager_env.vars);
    let api = propeller_tests::http::api_port(
        &manager.wait_for("HTTP API listening", Duration::from_secs(20)),
    );
    manager.wait_for(CONNECTED, Duration::from_secs(20));
    proxy.wait_for(CONNECTED, Duration::from_secs(20));
    let mut proplet_env = lab.env_on("PROPLET", path, &lab.proplet);
    proplet_env.set("LIVELINESS_INTERVAL", "1s");
    let proplet = ServiceProcess::start("proplet", &proplet_env.vars);
    manager.wait_for("proplet alive", Duration::from_secs(20));
    let mut done = 0;
    let mut samples: [Vec<f64>; 2] = Default::default();
    for i in 0..WARM_UP + TASKS {
        for (kind, task) in [&inline, &proxied].into_iter().enumerate() {
            let started = Instant::now();
            let id = create_and_start(api, task)?;
            done += 1;
            manager.wait_for_count("task completed", done, Duration::from_secs(20));
            let took = ms(started.elapsed());
            let (status, body) = http(api, "GET", &format!("/tasks/{id}"), "")?;
            let compact: String = body.split_whitespace().collect();
            if status != 200
                || !compact.contains(r#""state":3"#)
                || !compact.contains(r#""results":"7""#)
            {
                return Err(format!("task {id} did not complete with 7: {body}").into());
            }
            if i >= WARM_UP {
                samples[kind].push(took);
            }
        }
    }
    println!(
        "| {broker} | {} | {} | {} |",
        path.name(),
        Summary::percentiles(&samples[0]).show(2),
        Summary::percentiles(&samples[1]).show(2),
    );
    drop((proplet, manager, proxy));
    Ok(())
}

/// `POST /tasks` then `POST /tasks/{id}/start`; returns the id.
fn create_and_start(api: u16, task: &str) -> Result<String> {
    let (status, created) = http(api, "POST", "/tasks", task)?;
    if status != 201 {
        return Err(format!("POST /tasks: {status} {created}").into());
    }
    let id = json_string(&created, "id").ok_or("no id in the created task")?;
    let (status, started) = http(api, "POST", &format!("/tasks/{id}/start"), "")?;
    if status != 200 {
        return Err(format!("POST /tasks/{id}/start: {status} {started}").into());
    }
    Ok(id)
}

/// One HTTP/1.1 request on its own connection, written in one segment with
/// Nagle off, as curl does: status and body.
fn http(port: u16, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or("not HTTP")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no status")?;
    Ok((status, body.to_owned()))
}

/// The string value of `"key"` in flat JSON text.
fn json_string(json: &str, key: &str) -> Option<String> {
    let at = json.find(&format!("\"{key}\""))? + key.len() + 2;
    let rest = json[at..].trim_start().strip_prefix(':')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    Some(rest[..rest.find('"')?].to_owned())
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
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
        let config = ServiceConfig::from_vars(Service::Proplet, vars)?;
        clients.push(
            Client::start(
                &config.mqtt,
                vec![config.channel.topic("control/manager/start")],
            )?
            .0,
        );
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
