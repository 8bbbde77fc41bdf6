//! Quickstart: Propeller's whole job, end to end, on a machine with nothing
//! but Rust.
//!
//! ```sh
//! cargo run --example quickstart
//! ```
//!
//! 0. Builds the `manager`, `proplet` and `proxy` binaries with the same cargo
//!    and profile (a no-op when they are up to date): an example cannot make
//!    cargo build another package's binaries, so it asks cargo itself.
//! 1. Makes a throwaway PKI with `propeller_mqtt::certs` (no openssl), and
//!    three WebAssembly modules with `wat`.
//! 2. Starts an MQTT broker in-process (rumqttd, checking each client's
//!    username and password, as Magistrala does), and in front of it a TLS edge
//!    (tokio-rustls, the role nginx plays in production) with an MQTTS listener
//!    and an mTLS listener. The mTLS listener verifies client certificates and
//!    drops a CONNECT whose password does not end with the certificate's CN.
//! 3. In plain, MQTTS and mTLS mode in turn, starts the three binaries, each
//!    configured only by its environment, and through the manager's HTTP API:
//!    waits for the proplet to be discovered, runs a task whose module is
//!    inline, one whose module the proxy streams in several chunks, and a
//!    WASI command with arguments and environment. Then stops them.
//! 4. Starts a proplet with a certificate made for another client, to show
//!    how a refusal is explained.
//! 5. Prints a table, and exits 0 when every outcome was the expected one.
//!
//! Every service process is stopped and the temporary directory removed at
//! the end, on failure, and on Ctrl-C (SIGINT), SIGTERM or SIGHUP.

use std::collections::HashMap;
use std::error::Error;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use propeller_mqtt::Secret;
use propeller_mqtt_cli::certs::{self, KeyType, Output, Subject};
use propeller_protocol::Service;
use propeller_tests::modules;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use x509_parser::prelude::{FromDer, X509Certificate};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Long enough that no certificate draws an expiry warning.
const DAYS: i64 = 365;
/// The proxy's chunk size: small, so that the proxied module takes several.
const CHUNK_SIZE: usize = 64 * 1024;
/// The data segment that makes the proxied module span several chunks.
const PADDING: usize = 200_000;
/// How long one step may take before it counts as failed.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Upstream's task states.
const COMPLETED: u64 = 3;
const FAILED: u64 = 4;
const INTERRUPTED: u64 = 6;

#[tokio::main]
async fn main() -> ExitCode {
    // Installed before anything starts, so that no signal is missed.
    let signals = match Signals::new() {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("quickstart: cannot handle signals: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut run = Box::pin(run());
    let outcome = tokio::select! {
        outcome = &mut run => Ok(outcome),
        signal = signals.next() => Err(signal),
    };
    // Dropping the run stops every service still running and removes the
    // temporary directory, whichever way it ended.
    drop(run);
    match outcome {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => ExitCode::FAILURE,
        Ok(Err(error)) => {
            eprintln!("quickstart: {error}");
            ExitCode::FAILURE
        }
        Err(signal) => {
            eprintln!(
                "\nquickstart: interrupted by {signal}: the services were stopped and the temporary directory removed"
            );
            ExitCode::from(130)
        }
    }
}

/// One client of the broker: a service with its own Magistrala identity.
struct Identity {
    service: Service,
    client_id: String,
    secret: String,
}

/// A connection mode: how every service reaches the broker.
struct Mode {
    name: &'static str,
    address: String,
    tls: bool,
    mutual: bool,
}

/// The modules the tasks run, and the file the proxy serves.
struct Modules {
    add: Vec<u8>,
    proxied_name: &'static str,
    proxied_len: usize,
    echo: Vec<u8>,
}

/// One line of the summary.
struct Row {
    mode: &'static str,
    step: &'static str,
    /// `Ok` when the outcome is the expected one.
    outcome: std::result::Result<String, String>,
    took: Duration,
}

async fn run() -> Result<bool> {
    println!("propeller-mqtt quickstart: the manager, a proplet and the proxy, as their real binaries, in plain, MQTTS and mTLS mode\n");

    // 0. The binaries.
    let binaries = build_services().await?;
    let started = Instant::now();

    // 1. A directory for everything: the PKI, the modules, the services' cwd.
    let temp = tempfile::Builder::new()
        .prefix("propeller-quickstart-")
        .tempdir()?;
    let dir = temp.path();
    let identities: Vec<Identity> = Service::ALL
        .into_iter()
        .map(|service| Identity {
            service,
            client_id: match service {
                Service::Proplet => "proplet-1".to_owned(),
                other => other.to_string(),
            },
            secret: format!("{service}-secret-{:x}", std::process::id()),
        })
        .collect();
    make_pki(dir, &identities)?;
    println!(
        "\n1. PKI made in {} with propeller_mqtt::certs: CA, server, one client per service",
        dir.display()
    );
    let modules = make_modules(&dir.join("modules"))?;
    println!(
        "   modules made with wat: add.wasm ({} bytes, sent inline), {} ({} bytes, served by the proxy in {} KiB chunks), echo.wasm (a WASI command)",
        modules.add.len(),
        modules.proxied_name,
        modules.proxied_len,
        CHUNK_SIZE / 1024
    );

    // 2. The broker and the edge.
    let broker = start_broker(&identities)?;
    let mqtts = start_edge(dir, broker, false).await?;
    let mtls = start_edge(dir, broker, true).await?;
    println!(
        "\n2. broker tcp://{broker} (rumqttd, in-process), TLS edge: MQTTS ssl://{mqtts}, mTLS ssl://{mtls}"
    );

    // 3. The job, in every mode.
    let modes = [
        Mode {
            name: "plain",
            address: format!("tcp://{broker}"),
            tls: false,
            mutual: false,
        },
        Mode {
            name: "mqtts",
            address: format!("ssl://{mqtts}"),
            tls: true,
            mutual: false,
        },
        Mode {
            name: "mtls",
            address: format!("ssl://{mtls}"),
            tls: true,
            mutual: true,
        },
    ];
    println!("\n3. the services at work in each mode (their own logs, indented)");
    let mut rows = Vec::new();
    for mode in &modes {
        rows.extend(run_mode(mode, &binaries, dir, &identities, &modules).await);
    }

    // 4. The refusal.
    rows.push(refusal(&modes[2], &binaries, dir, &identities[1]).await);

    // 5. The summary.
    println!("\n5. summary\n");
    let as_expected = print_summary(&rows);
    println!(
        "\nfinished in {:.1} s after the build; services stopped, {} removed",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(as_expected)
}

/// Builds (or finds up to date) the three service binaries in this example's
/// own target directory and profile, and returns that directory.
async fn build_services() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/quickstart -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot tell the target directory from this example's path")?
        .to_owned();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace directory")?;
    let mut command = propeller_tests::process::nested_cargo();
    let cargo = command.get_program().to_owned();
    command
        .current_dir(workspace)
        .args([
            "build", "--bin", "manager", "--bin", "proplet", "--bin", "proxy",
        ])
        .stdin(Stdio::null());
    match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => {}
        Some("release") => {
            command.arg("--release");
        }
        Some(profile) => {
            command.args(["--profile", profile]);
        }
        None => {}
    }
    // The same target directory, unless this one is under a target triple.
    if let Some(target_dir) = profile_dir.parent() {
        if target_dir.join("CACHEDIR.TAG").exists() {
            command.arg("--target-dir").arg(target_dir);
        }
    }
    let names = ["manager", "proplet", "proxy"].map(|name| profile_dir.join(name));
    println!("0. the services: cargo build --bin manager --bin proplet --bin proxy (the same profile as this example)");
    let built = Instant::now();
    match command.spawn() {
        Ok(child) => {
            // Killed if the quickstart is interrupted meanwhile.
            let mut cargo = KillOnDrop(child);
            let status = loop {
                if let Some(status) = cargo.0.try_wait()? {
                    break status;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            if !status.success() {
                return Err(format!("cargo build of the services failed ({status})").into());
            }
        }
        Err(error) if names.iter().all(|name| name.exists()) => {
            println!(
                "   cannot run {} ({error}); using the binaries already in {}",
                Path::new(&cargo).display(),
                profile_dir.display()
            );
        }
        Err(error) => {
            return Err(format!(
                "cannot run {} to build the services: {error}; run `cargo build --bins` first",
                Path::new(&cargo).display()
            )
            .into())
        }
    }
    if let Some(missing) = names.iter().find(|name| !name.exists()) {
        return Err(format!(
            "{} is missing after the build; build the services with the options this example was built with",
            missing.display()
        )
        .into());
    }
    println!(
        "   ready in {} (took {:.1} s; the quickstart's own time starts now)",
        profile_dir.display(),
        built.elapsed().as_secs_f64()
    );
    Ok(profile_dir)
}

fn make_pki(dir: &Path, identities: &[Identity]) -> Result<()> {
    let out = Output {
        dir: dir.to_owned(),
        force: false,
        key_password: None,
    };
    let subject = Subject::default();
    certs::ca(&out, &subject, KeyType::EcdsaP256, DAYS)?;
    let sans = ["DNS:localhost".to_owned(), "IP:127.0.0.1".to_owned()];
    certs::server(
        &out,
        &subject,
        "server",
        "localhost",
        &sans,
        KeyType::EcdsaP256,
        DAYS,
    )?;
    for identity in identities {
        certs::client(
            &out,
            &subject,
            &identity.service.to_string(),
            &Secret::new(identity.secret.clone()),
            KeyType::EcdsaP256,
            DAYS,
        )?;
    }
    Ok(())
}

/// `add(i32, i32) -> i32`; the same padded past several chunks, written for
/// the proxy; a WASI command that prints its arguments and environment.
fn make_modules(dir: &Path) -> Result<Modules> {
    let add = modules::add();
    let proxied = modules::padded(modules::add(), PADDING);
    std::fs::create_dir(dir)?;
    let proxied_name = "add-large.wasm";
    std::fs::write(dir.join(proxied_name), &proxied)?;
    Ok(Modules {
        add,
        proxied_name,
        proxied_len: proxied.len(),
        echo: modules::wasi_echo(),
    })
}

/// The variables a deployment's `.env` would hold for this identity in
/// `mode`, presenting the certificate made for `certificate_of` under mTLS.
fn service_env(
    identity: &Identity,
    mode: &Mode,
    dir: &Path,
    certificate_of: Service,
) -> Vec<(String, String)> {
    let var = |suffix: &str| identity.service.var(suffix);
    let path = |name: String| dir.join(name).display().to_string();
    let mut env = vec![
        (var("MQTT_ADDRESS"), mode.address.clone()),
        (var("CLIENT_ID"), identity.client_id.clone()),
        (var("CLIENT_KEY"), identity.secret.clone()),
        (var("DOMAIN_ID"), "quickstart".to_owned()),
        // One channel per mode: nothing from one mode reaches the next.
        (var("CHANNEL_ID"), format!("quickstart-{}", mode.name)),
        (var("MQTT_TIMEOUT"), "5s".to_owned()),
        (var("LOG_LEVEL"), "info".to_owned()),
    ];
    if mode.tls {
        env.push((var("MQTT_TLS_CA_CERT"), path("ca.crt".to_owned())));
    }
    if mode.mutual {
        env.push((
            var("MQTT_TLS_CLIENT_CERT"),
            path(format!("{certificate_of}.crt")),
        ));
        env.push((
            var("MQTT_TLS_CLIENT_KEY"),
            path(format!("{certificate_of}.key")),
        ));
    }
    let own = |suffix: &str, value: String| (var(suffix), value);
    match identity.service {
        Service::Manager => env.extend([
            own("HTTP_HOST", "127.0.0.1".to_owned()),
            own("HTTP_PORT", "0".to_owned()),
            own("LIVELINESS_INTERVAL", "1s".to_owned()),
        ]),
        Service::Proplet => env.push(own("LIVELINESS_INTERVAL", "1s".to_owned())),
        Service::Proxy => env.extend([
            own("MODULES_DIR", path("modules".to_owned())),
            own("CHUNK_SIZE", format!("{}KiB", CHUNK_SIZE / 1024)),
        ]),
    }
    env
}

/// Starts the services in `mode`, has them do the job, and stops them.
async fn run_mode(
    mode: &Mode,
    binaries: &Path,
    dir: &Path,
    identities: &[Identity],
    modules: &Modules,
) -> Vec<Row> {
    println!(
        "\n── {} mode: every service connects to {}",
        mode.name, mode.address
    );
    let mut rows = Vec::new();
    let mut row = |step: &'static str, outcome, took| {
        rows.push(Row {
            mode: mode.name,
            step,
            outcome,
            took,
        })
    };
    let start = |identity: &Identity| {
        let env = service_env(identity, mode, dir, identity.service);
        Process::start(binaries, identity.service, &env, dir)
    };
    let mut services = Vec::new();
    let started = Instant::now();

    // The proxy and the manager first, so that the proplet's announcement
    // finds the manager listening.
    let ready = async {
        let proxy = start(&identities[2])?;
        let manager = start(&identities[0])?;
        println!(
            "   started proxy (pid {}) and manager (pid {})",
            proxy.pid(),
            manager.pid()
        );
        services.push(proxy);
        services.push(manager);
        let (proxy, manager) = (&services[0], &services[1]);
        let api = manager.wait_for("HTTP API listening").await?;
        let api = api_port(&api).ok_or("the manager logged no API address")?;
        manager.wait_for("MQTT connection established").await?;
        proxy.wait_for("MQTT connection established").await?;
        Ok::<_, String>(api)
    };
    let api = match ready.await {
        Ok(api) => api,
        Err(cause) => {
            row("discovered", Err(cause), started.elapsed());
            row("stopped", stop_all(services).await, Duration::ZERO);
            return rows;
        }
    };

    // Discovery: the proplet announces itself; the manager lists it alive.
    let started = Instant::now();
    match start(&identities[1]) {
        Ok(proplet) => {
            println!("   started proplet (pid {})", proplet.pid());
            services.push(proplet);
        }
        Err(cause) => {
            row("discovered", Err(cause), started.elapsed());
            row("stopped", stop_all(services).await, Duration::ZERO);
            return rows;
        }
    }
    let proplet_id = &identities[1].client_id;
    let discovered = discover(api, proplet_id).await;
    let alive = discovered.is_ok();
    row("discovered", discovered, started.elapsed());

    let tasks: [(&'static str, Value); 3] = [
        (
            "inline task",
            json!({"name": "add", "inputs": ["3", "4"], "file": base64(&modules.add)}),
        ),
        (
            "proxy task",
            json!({"name": "add", "inputs": ["3", "4"], "image_url": modules.proxied_name}),
        ),
        (
            "wasi command",
            json!({"name": "_start", "cli_args": ["hello", "world"], "env": {"GREETING": "hi"}, "file": base64(&modules.echo)}),
        ),
    ];
    for (step, task) in tasks {
        if !alive {
            row(step, Err("skipped: no proplet".to_owned()), Duration::ZERO);
            continue;
        }
        let started = Instant::now();
        let outcome = match run_task(api, &task).await {
            Ok(results) => match step {
                "inline task" => expect(&results, "7", "add(3,4) = 7".to_owned()),
                "proxy task" => {
                    // The proxy's own word for how it streamed the module.
                    let sent = services[0].wait_for("module sent").await.ok();
                    match sent.as_deref().and_then(|line| field(line, "chunks")) {
                        Some(chunks) if chunks.parse().is_ok_and(|n: u32| n > 1) => expect(
                            &results,
                            "7",
                            format!(
                                "add(3,4) = 7, module of {} bytes in {chunks} chunks",
                                modules.proxied_len
                            ),
                        ),
                        _ => Err(format!(
                            "results {results:?}, but the proxy logged no module sent in several chunks: {sent:?}"
                        )),
                    }
                }
                _ => {
                    let expected = format!("hello world GREETING=hi PROPLET_ID={proplet_id}\n");
                    expect(
                        &results,
                        &expected,
                        format!("printed {:?}", results.trim_end()),
                    )
                }
            },
            Err(cause) => Err(cause),
        };
        row(step, outcome, started.elapsed());
    }

    let started = Instant::now();
    let stopped = stop_all(services).await;
    row("stopped", stopped, started.elapsed());
    rows
}

fn expect(results: &str, expected: &str, outcome: String) -> std::result::Result<String, String> {
    match results == expected {
        true => Ok(outcome),
        false => Err(format!("results {results:?}, expected {expected:?}")),
    }
}

/// Waits until `GET /proplets` lists `id` alive.
async fn discover(api: u16, id: &str) -> std::result::Result<String, String> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let (status, proplets) = http(api, "GET", "/proplets", None).await?;
        let listed = proplets["proplets"]
            .as_array()
            .and_then(|all| all.iter().find(|p| p["id"] == id));
        if status == 200 && listed.is_some_and(|p| p["alive"] == true) {
            return Ok(format!("{id} alive"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not listed alive within {STEP_TIMEOUT:?}: {status} {proplets}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates the task, starts it as upstream's CLI does, and waits for its results.
async fn run_task(api: u16, task: &Value) -> std::result::Result<String, String> {
    let (status, created) = http(api, "POST", "/tasks", Some(task)).await?;
    let id = match (status, created["id"].as_str()) {
        (201, Some(id)) => id.to_owned(),
        _ => return Err(format!("POST /tasks answered {status} {created}")),
    };
    let (status, started) = http(api, "POST", &format!("/tasks/{id}/start"), None).await?;
    if status != 200 {
        return Err(format!(
            "POST /tasks/{id}/start answered {status} {started}"
        ));
    }
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let (status, task) = http(api, "GET", &format!("/tasks/{id}"), None).await?;
        match task["state"].as_u64() {
            Some(COMPLETED) => return Ok(task["results"].as_str().unwrap_or_default().to_owned()),
            Some(FAILED | INTERRUPTED) => {
                return Err(format!("the task failed: {}", task["error"]));
            }
            _ if status != 200 => return Err(format!("GET /tasks/{id} answered {status} {task}")),
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(format!("not finished within {STEP_TIMEOUT:?}: {task}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A proplet presenting the manager's certificate: the edge's CN check
/// refuses it, and the proplet says why.
async fn refusal(mode: &Mode, binaries: &Path, dir: &Path, proplet: &Identity) -> Row {
    println!(
        "\n4. a refusal, explained: a proplet presents the manager's certificate at the mTLS edge.\n   \
         The certificate is valid (same CA), but its CN is the manager's secret, while the proplet's\n   \
         password is its own: the edge drops the CONNECT unanswered, as Magistrala's does. The\n   \
         proplet warns before connecting, then names the cause and the fix (it first spends up to\n   \
         2 s on a second TLS handshake, which shows that TLS itself accepted the certificate)."
    );
    let env = service_env(proplet, mode, dir, Service::Manager);
    let started = Instant::now();
    let outcome = match Process::start(binaries, Service::Proplet, &env, dir) {
        Ok(process) => {
            println!("   started proplet (pid {})", process.pid());
            let outcome = match process
                .wait_for_either("MQTT connection failed", "MQTT connection established")
                .await
            {
                Ok(line) if line.contains("MQTT connection failed") => {
                    let cause = between(&line, "cause=", " class=").unwrap_or("?");
                    match cause.contains("closed before the broker answered CONNECT") {
                        true => Ok(format!("refused: {cause}")),
                        false => Err(format!("refused, but not for the CN: {cause}")),
                    }
                }
                Ok(_) => Err("connected: the edge should have refused it".to_owned()),
                Err(cause) => Err(cause),
            };
            let took = started.elapsed();
            // It keeps retrying: stopped here, as any service would be.
            match stop_all(vec![process]).await {
                Ok(_) => (outcome, took),
                Err(cause) => (outcome.and(Err(cause)), took),
            }
        }
        Err(cause) => (Err(cause), started.elapsed()),
    };
    Row {
        mode: mode.name,
        step: "wrong CN",
        outcome: outcome.0,
        took: outcome.1,
    }
}

/// Prints the table; true when every outcome was the expected one.
fn print_summary(rows: &[Row]) -> bool {
    let text = |row: &Row| match &row.outcome {
        Ok(text) => text.clone(),
        Err(cause) => format!("FAILED: {cause}"),
    };
    let width = rows.iter().map(|row| text(row).len()).max().unwrap_or(0);
    println!(
        "  {:<5}  {:<12}  {:<width$}  {:>7}",
        "mode", "step", "outcome", "time"
    );
    for row in rows {
        let note = match row.outcome {
            Ok(_) => "",
            Err(_) => "  <- unexpected",
        };
        println!(
            "  {:<5}  {:<12}  {:<width$}  {:>4} ms{note}",
            row.mode,
            row.step,
            text(row),
            row.took.as_millis()
        );
    }
    let failed: Vec<String> = rows
        .iter()
        .filter(|row| row.outcome.is_err())
        .map(|row| format!("{} {}", row.mode, row.step))
        .collect();
    if failed.is_empty() {
        println!("\nevery outcome as expected");
    } else {
        println!("\nUNEXPECTED OUTCOMES: {}", failed.join(", "));
    }
    failed.is_empty()
}

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The value of `name=` in a log line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
}

/// The text between `start` and `end` in `line`.
fn between<'a>(line: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = line.find(start)? + start.len();
    let to = line[from..].find(end).map_or(line.len(), |at| from + at);
    Some(&line[from..to])
}

/// The port of `HTTP API listening address=127.0.0.1:PORT`.
fn api_port(line: &str) -> Option<u16> {
    field(line, "address")?.rsplit(':').next()?.parse().ok()
}

/// One request to the manager's API over a fresh connection; status and JSON body.
async fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::result::Result<(u16, Value), String> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(STEP_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{method} {path}: no answer within {STEP_TIMEOUT:?}"))?
        .map_err(|error| format!("{method} {path}: {error}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{method} {path}: not an HTTP response: {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .ok_or_else(|| format!("{method} {path}: no status in {head:?}"))?;
    let json = match body.trim() {
        "" => Value::Null,
        body => serde_json::from_str(body)
            .map_err(|error| format!("{method} {path}: {error}: {body:?}"))?,
    };
    Ok((status, json))
}

/// A service binary running as a child process, its log echoed and kept.
/// Killed when dropped, if still running.
struct Process {
    service: Service,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts `service` from `binaries` with exactly `env` (plus PATH), in
    /// `cwd`, so that no `.env` or `config.toml` of the user's is read.
    fn start(
        binaries: &Path,
        service: Service,
        env: &[(String, String)],
        cwd: &Path,
    ) -> std::result::Result<Process, String> {
        let binary = binaries.join(service.to_string());
        let mut child = std::process::Command::new(&binary)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(name, value)| (name, value)))
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| format!("cannot start {}: {error}", binary.display()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let streams: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().expect("piped stdout")),
            Box::new(child.stderr.take().expect("piped stderr")),
        ];
        for stream in streams {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(|line| line.ok()) {
                    let line = without_timestamp(&line).to_owned();
                    if !QUIET.iter().any(|quiet| line.starts_with(quiet)) {
                        println!("     {:<7} {line}", service.to_string());
                    }
                    log.lock().expect("log lock").push(line);
                }
            });
        }
        Ok(Process {
            service,
            child,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the first line that contains `needle`.
    async fn wait_for(&self, needle: &str) -> std::result::Result<String, String> {
        self.wait_for_either(needle, needle).await
    }

    /// Waits for the first line that contains `one` or `other`.
    async fn wait_for_either(&self, one: &str, other: &str) -> std::result::Result<String, String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let found = {
                let log = self.log.lock().expect("log lock");
                log.iter()
                    .find(|line| line.contains(one) || line.contains(other))
                    .cloned()
            };
            if let Some(line) = found {
                return Ok(line);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the {} logged no {one:?} within {STEP_TIMEOUT:?}",
                    self.service
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A child process killed when dropped, if still running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill(&mut self.0);
    }
}

fn kill(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Asks every service to stop, as `docker stop` does (SIGTERM), and waits for
/// them; one that does not stop within 5 s is killed.
async fn stop_all(mut services: Vec<Process>) -> std::result::Result<String, String> {
    for service in &services {
        terminate(service.pid());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; services.len()];
    while statuses.iter().any(Option::is_none) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        for (service, status) in services.iter_mut().zip(&mut statuses) {
            if status.is_none() {
                *status = service.child.try_wait().ok().flatten();
            }
        }
    }
    let mut problems = Vec::new();
    for (service, status) in services.iter().zip(&statuses) {
        match status {
            Some(status) if status.success() => {}
            Some(status) => problems.push(format!("{} exited with {status}", service.service)),
            None => problems.push(format!(
                "{} did not stop within 5 s and was killed",
                service.service
            )),
        }
    }
    let names: Vec<String> = services.iter().map(|s| s.service.to_string()).collect();
    drop(services);
    match problems.is_empty() {
        true => Ok(format!("{} exited 0 on SIGTERM", names.join(", "))),
        false => Err(problems.join("; ")),
    }
}

/// Sends SIGTERM to `pid` (std has no call for it; the shell's `kill` is
/// everywhere). A service that misses it is killed after the grace period.
fn terminate(pid: u32) {
    let _ = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .stdin(Stdio::null())
        .status();
}

/// Log lines not echoed, to keep the job in view: every service logs them,
/// and the summary says how each one stopped.
const QUIET: [&str; 3] = [
    "INFO MQTT configuration loaded",
    "INFO stopping",
    "INFO MQTT client stopped",
];

/// A tracing line without its leading RFC 3339 timestamp.
fn without_timestamp(line: &str) -> &str {
    match line.split_once(' ') {
        Some((first, rest))
            if first.len() > 20 && first.starts_with(|c: char| c.is_ascii_digit()) =>
        {
            rest.trim_start()
        }
        _ => line,
    }
}

/// The signals that end the quickstart early: Ctrl-C, SIGTERM, SIGHUP.
#[cfg(unix)]
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// The name of the first signal that arrives.
    async fn next(mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "Ctrl-C (SIGINT)",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals)
    }

    async fn next(self) -> &'static str {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

/// rumqttd on a free loopback port, knowing each identity's password.
fn start_broker(identities: &[Identity]) -> Result<SocketAddr> {
    let address = StdListener::bind("127.0.0.1:0")?.local_addr()?;
    let passwords: HashMap<String, String> = identities
        .iter()
        .map(|i| (i.client_id.clone(), i.secret.clone()))
        .collect();
    let listener = rumqttd::ServerSettings {
        name: "plain".into(),
        listen: address,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 5_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 100,
            auth: Some(passwords),
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 200,
            max_segment_size: 1 << 20,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("plain".to_owned(), listener)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::spawn(move || {
        if let Err(error) = rumqttd::Broker::new(config).start() {
            eprintln!("quickstart: the broker stopped: {error}");
        }
    });
    for _ in 0..100 {
        if std::net::TcpStream::connect(address).is_ok() {
            return Ok(address);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err("the broker did not start".into())
}

/// A TLS edge in front of `broker`; with `mutual`, it requires a client
/// certificate from the CA and checks the CONNECT password against its CN.
async fn start_edge(dir: &Path, broker: SocketAddr, mutual: bool) -> Result<SocketAddr> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = CertificateDer::pem_file_iter(dir.join("server.crt"))?
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key"))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = if mutual {
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(dir.join("ca.crt"))? {
            roots.add(ca?)?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
        builder
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?
    } else {
        builder.with_no_client_auth().with_single_cert(chain, key)?
    };
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = relay(acceptor, tcp, broker, mutual).await;
            });
        }
    });
    Ok(address)
}

async fn relay(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    broker: SocketAddr,
    mutual: bool,
) -> Result<()> {
    // As nginx's stream proxy (tcp_nodelay on): MQTT's small packets go out at once.
    tcp.set_nodelay(true)?;
    let mut tls = acceptor.accept(tcp).await?;
    let mut first = vec![0u8; 16 * 1024];
    let read = tls.read(&mut first).await?;
    first.truncate(read);
    if mutual {
        let cn = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| common_name(leaf.as_ref()));
        let allowed = match (connect_password(&first), cn) {
            (Some(password), Some(cn)) => password.ends_with(&cn),
            _ => false,
        };
        if !allowed {
            // As Magistrala's edge does: no CONNACK, the stream just ends.
            return Ok(());
        }
    }
    let mut upstream = TcpStream::connect(broker).await?;
    upstream.set_nodelay(true)?;
    upstream.write_all(&first).await?;
    tokio::io::copy_bidirectional(&mut tls, &mut upstream).await?;
    Ok(())
}

fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some(cn)
}

/// The password of an MQTT 3.1.1 CONNECT that arrived whole, or `None`.
fn connect_password(packet: &[u8]) -> Option<String> {
    let mut bytes = bytes::BytesMut::from(packet);
    match rumqttc::mqttbytes::v4::Packet::read(&mut bytes, packet.len()).ok()? {
        rumqttc::mqttbytes::v4::Packet::Connect(connect) => Some(connect.login?.password),
        _ => None,
    }
}
