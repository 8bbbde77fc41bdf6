//! Quickstart: what propeller-mqtt does, on a machine with nothing but Rust.
//!
//! ```sh
//! cargo run --example quickstart
//! ```
//!
//! 1. Makes a throwaway PKI with `propeller_mqtt::certs` (no openssl).
//! 2. Starts an MQTT broker in-process (rumqttd, checking each client's
//!    username and password, as Magistrala does), and in front of it a TLS edge
//!    (tokio-rustls, the role nginx plays in production) with an MQTTS listener
//!    and an mTLS listener. The mTLS listener verifies client certificates and
//!    drops a CONNECT whose password does not end with the certificate's CN.
//! 3. Connects manager, proplet and proxy in plain, MQTTS and mTLS mode in
//!    turn, as their binaries do, and once more with a certificate made for
//!    another client, to show how a refusal is explained.
//! 4. Prints a table, and exits 0 when every outcome was the expected one.
//!    The PKI directory is removed; the broker and edge end with the process.

use std::collections::HashMap;
use std::error::Error;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use propeller_mqtt::certs::{self, KeyType, Output, Subject};
use propeller_mqtt::config::Secret;
use propeller_mqtt::{Client, Config, ConnectionState, Service};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use x509_parser::prelude::{FromDer, X509Certificate};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Long enough that no certificate draws an expiry warning.
const DAYS: i64 = 365;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter("propeller_mqtt=info,rumqttd=off")
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("quickstart: {error}");
            ExitCode::FAILURE
        }
    }
}

/// One client of the broker: a service with its own Magistrala identity.
struct Identity {
    service: Service,
    client_id: String,
    secret: String,
}

async fn run() -> Result<bool> {
    let pki = tempfile::tempdir()?;
    let dir = pki.path();
    let identities: Vec<Identity> = Service::ALL
        .into_iter()
        .map(|service| Identity {
            service,
            client_id: format!("{service}-client"),
            secret: format!("{service}-secret-{:x}", std::process::id()),
        })
        .collect();

    // 1. The PKI.
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
    for identity in &identities {
        let name = identity.service.to_string();
        certs::client(
            &out,
            &subject,
            &name,
            &Secret::new(identity.secret.clone()),
            KeyType::EcdsaP256,
            DAYS,
        )?;
    }
    println!(
        "\n1. PKI made in {} with propeller_mqtt::certs: CA, server, one client per service\n",
        dir.display()
    );

    // 2. The broker and the edge.
    let broker = start_broker(&identities)?;
    let mqtts = start_edge(dir, broker, false).await?;
    let mtls = start_edge(dir, broker, true).await?;
    println!("2. broker tcp://{broker}, edge MQTTS ssl://{mqtts}, edge mTLS ssl://{mtls}\n");

    // 3. Every service in every mode.
    println!("3. connecting manager, proplet and proxy in each mode\n");
    let mut rows = Vec::new();
    for (mode, address) in [
        ("plain", format!("tcp://{broker}")),
        ("mqtts", format!("ssl://{mqtts}")),
        ("mtls", format!("ssl://{mtls}")),
    ] {
        for identity in &identities {
            let env = env(
                identity,
                &address,
                dir,
                (mode != "plain").then_some(identity.service),
                mode == "mtls",
            );
            rows.push(Row {
                mode,
                service: identity.service,
                expect: true,
                outcome: connect(identity.service, env).await?,
            });
        }
    }
    // A proplet presenting the manager's certificate: the edge's CN check refuses it.
    let proplet = &identities[1];
    let env = env(
        proplet,
        &format!("ssl://{mtls}"),
        dir,
        Some(Service::Manager),
        true,
    );
    rows.push(Row {
        mode: "mtls, wrong CN",
        service: Service::Proplet,
        expect: false,
        outcome: connect(Service::Proplet, env).await?,
    });

    // 4. The summary.
    println!("\n4. summary\n");
    println!("  mode             service  established  connect time or cause");
    let mut as_expected = true;
    for row in &rows {
        let (established, detail) = match &row.outcome {
            Ok(took) => ("yes", format!("{:.1} ms", took.as_secs_f64() * 1000.0)),
            Err(cause) => ("no", cause.clone()),
        };
        let note = match row.outcome.is_ok() == row.expect {
            true => "",
            false => "   <- unexpected",
        };
        as_expected &= row.outcome.is_ok() == row.expect;
        println!(
            "  {:<16} {:<8} {established:<12} {detail}{note}",
            row.mode,
            row.service.to_string()
        );
    }
    println!(
        "\n{}",
        if as_expected {
            "every outcome as expected"
        } else {
            "SOME OUTCOMES WERE UNEXPECTED"
        }
    );
    Ok(as_expected)
}

struct Row {
    mode: &'static str,
    service: Service,
    expect: bool,
    outcome: std::result::Result<Duration, String>,
}

/// The variables a deployment's `.env` would hold for this identity.
fn env(
    identity: &Identity,
    address: &str,
    dir: &Path,
    tls_as: Option<Service>,
    mutual: bool,
) -> Vec<(String, String)> {
    let var = |suffix: &str| identity.service.var(suffix);
    let mut env = vec![
        (var("MQTT_ADDRESS"), address.to_owned()),
        (var("CLIENT_ID"), identity.client_id.clone()),
        (var("CLIENT_KEY"), identity.secret.clone()),
        (var("DOMAIN_ID"), "quickstart-domain".to_owned()),
        (var("CHANNEL_ID"), "quickstart-channel".to_owned()),
        (var("MQTT_TIMEOUT"), "5s".to_owned()),
    ];
    if let Some(certificate_of) = tls_as {
        env.push((
            var("MQTT_TLS_CA_CERT"),
            dir.join("ca.crt").display().to_string(),
        ));
        if mutual {
            env.push((
                var("MQTT_TLS_CLIENT_CERT"),
                dir.join(format!("{certificate_of}.crt"))
                    .display()
                    .to_string(),
            ));
            env.push((
                var("MQTT_TLS_CLIENT_KEY"),
                dir.join(format!("{certificate_of}.key"))
                    .display()
                    .to_string(),
            ));
        }
    }
    env
}

/// Starts the service's client as its binary does, and waits for the first outcome.
async fn connect(
    service: Service,
    env: Vec<(String, String)>,
) -> Result<std::result::Result<Duration, String>> {
    let config = Config::from_vars(service, env)?;
    let topics = service
        .topics()
        .iter()
        .map(|suffix| config.channel.topic(suffix))
        .collect();
    let started = Instant::now();
    let (client, _messages) = Client::start(&config, topics)?;
    let mut state = client.state();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match &*state.borrow_and_update() {
                ConnectionState::Connected => return Ok(started.elapsed()),
                ConnectionState::Retrying { failure, .. } => return Err(failure.to_string()),
                _ => {}
            }
            if state.changed().await.is_err() {
                return Err("the client stopped".to_owned());
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no outcome within 10 s".to_owned()));
    client.shutdown().await;
    Ok(outcome)
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
            (Some(password), Some(cn)) => password.ends_with(cn.as_bytes()),
            _ => false,
        };
        if !allowed {
            // As Magistrala's edge does: no CONNACK, the stream just ends.
            return Ok(());
        }
    }
    let mut upstream = TcpStream::connect(broker).await?;
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
fn connect_password(packet: &[u8]) -> Option<&[u8]> {
    if packet.first()? & 0xf0 != 0x10 {
        return None;
    }
    let (mut at, mut remaining, mut shift) = (1usize, 0usize, 0u32);
    loop {
        let byte = *packet.get(at)?;
        at += 1;
        remaining += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
        if shift > 21 {
            return None;
        }
    }
    if packet.len() < at + remaining {
        return None;
    }
    let field = |at: &mut usize| -> Option<&[u8]> {
        let length = usize::from(u16::from_be_bytes([
            *packet.get(*at)?,
            *packet.get(*at + 1)?,
        ]));
        let value = packet.get(*at + 2..*at + 2 + length)?;
        *at += 2 + length;
        Some(value)
    };
    field(&mut at)?; // protocol name
    let flags = *packet.get(at + 1)?;
    at += 4; // level, flags, keep-alive
    if flags & 0xc0 != 0xc0 {
        return None;
    }
    field(&mut at)?; // client id
    if flags & 0x04 != 0 {
        field(&mut at)?; // will topic
        field(&mut at)?; // will message
    }
    field(&mut at)?; // username
    field(&mut at)
}
