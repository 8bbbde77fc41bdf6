//! Every class of connection failure is recognised and explained, against the
//! real mosquitto and nginx edge. In-process through the library, so we can
//! assert the classified [`Failure`] itself; `modes.rs` covers the processes.

use std::net::TcpListener;

use propeller_mqtt::{Failure, Names, Warning};
use propeller_tests::outcomes::{fails, outcome, proplet_options};
use propeller_tests::{servers_available, Edge, Env, Identity, Mosquitto, Pki};

const IDENTITIES: [&str; 10] = [
    "proplet",
    "manager",
    "pkcs1",
    "sec1",
    "encrypted",
    "v1",
    "soon",
    "expired",
    "stranger",
    "legacy",
];

struct Lab {
    pki: &'static Pki,
    broker: Mosquitto,
}

impl Lab {
    fn start() -> Lab {
        let pki = Pki::shared();
        let ids: Vec<Identity> = IDENTITIES.iter().map(|name| pki.identity(name)).collect();
        let broker = Mosquitto::for_clients(pki, &ids.iter().collect::<Vec<_>>());
        Lab { pki, broker }
    }

    fn edge(&self, server_cert: &str) -> Edge {
        Edge::start(self.pki, self.broker.plain, server_cert, "ca.crt")
    }

    fn env(&self, name: &'static str) -> (Env, Identity) {
        let identity = self.pki.identity(name);
        (Env::new("PROPLET", &identity), identity)
    }
}

#[tokio::test]
async fn broker_signed_by_another_ca_is_untrusted() {
    if !servers_available("broker_signed_by_another_ca_is_untrusted") {
        return;
    }
    let lab = Lab::start();
    let (mut env, _) = lab.env("proplet");
    env.tls(lab.broker.tls, lab.pki)
        .path("MQTT_TLS_CA_CERT", &lab.pki.path("other-ca.crt"));
    let failure = fails(&env).await;
    assert_eq!(failure, Failure::BrokerUntrusted);
    assert_eq!(
        failure.to_string(),
        "the broker's certificate is not trusted (unknown issuer)"
    );
    assert!(failure
        .fix(&Names::prefixed("PROPLET_"))
        .contains("PROPLET_MQTT_TLS_CA_CERT"));
}

#[tokio::test]
async fn name_mismatch_lists_the_certificate_names_and_the_override_works() {
    if !servers_available("name_mismatch_lists_the_certificate_names_and_the_override_works") {
        return;
    }
    let lab = Lab::start();
    // Upstream's server certificate: DNS names only, no IP SAN.
    let edge = lab.edge("server-dns");
    let (mut env, identity) = lab.env("proplet");
    env.mtls(edge.port, lab.pki, &identity);
    let failure = fails(&env).await;
    let Failure::BrokerNameMismatch {
        expected,
        presented,
    } = &failure
    else {
        panic!("expected a name mismatch, got {failure:?}");
    };
    assert_eq!(expected, "127.0.0.1");
    let text = failure.to_string();
    assert!(
        text.contains("localhost") && text.contains("nginx"),
        "{presented:?}: {text}"
    );
    assert!(failure
        .fix(&Names::prefixed("PROPLET_"))
        .contains("PROPLET_MQTT_TLS_SERVER_NAME"));

    env.set("MQTT_TLS_SERVER_NAME", "nginx");
    assert_eq!(outcome(&env).await, Ok(()), "verifying as nginx must work");
}

#[tokio::test]
async fn expired_broker_certificate() {
    if !servers_available("expired_broker_certificate") {
        return;
    }
    let lab = Lab::start();
    let edge = lab.edge("server-expired");
    let (mut env, identity) = lab.env("proplet");
    env.mtls(edge.port, lab.pki, &identity);
    assert_eq!(fails(&env).await, Failure::BrokerCertificateExpired);
}

#[tokio::test]
async fn missing_client_certificate_is_named() {
    if !servers_available("missing_client_certificate_is_named") {
        return;
    }
    let lab = Lab::start();
    let edge = lab.edge("server");
    for port in [lab.broker.mtls, edge.port] {
        let (mut env, _) = lab.env("proplet");
        env.tls(port, lab.pki);
        let failure = fails(&env).await;
        assert_eq!(failure, Failure::ClientCertificateRequired, "port {port}");
        assert!(failure
            .fix(&Names::prefixed("PROPLET_"))
            .contains("PROPLET_MQTT_TLS_CLIENT_CERT"));
    }
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_rejected() {
    if !servers_available("client_certificate_from_another_ca_is_rejected") {
        return;
    }
    let lab = Lab::start();
    let edge = lab.edge("server");
    for port in [lab.broker.mtls, edge.port] {
        let (mut env, identity) = lab.env("stranger");
        env.mtls(port, lab.pki, &identity);
        let failure = fails(&env).await;
        assert!(
            matches!(failure, Failure::ClientCertificateRejected(_)),
            "port {port}: {failure:?}"
        );
    }
}

#[tokio::test]
async fn expired_client_certificate_warns_then_is_refused() {
    if !servers_available("expired_client_certificate_warns_then_is_refused") {
        return;
    }
    let lab = Lab::start();
    let edge = lab.edge("server");
    let (mut env, identity) = lab.env("expired");
    env.mtls(edge.port, lab.pki, &identity);
    let setup = proplet_options(&env).load_tls().unwrap().unwrap();
    assert!(
        setup
            .warnings
            .iter()
            .any(|w| matches!(w, Warning::ClientCertificateExpired { .. })),
        "{:?}",
        setup.warnings
    );
    assert_eq!(fails(&env).await, Failure::ClientCertificateExpired);
}

#[tokio::test]
async fn cn_mismatch_at_the_edge_closes_before_connack() {
    if !servers_available("cn_mismatch_at_the_edge_closes_before_connack") {
        return;
    }
    let lab = Lab::start();
    let edge = lab.edge("server");
    // The manager's certificate with the proplet's key: a valid certificate
    // whose CN is not the end of the password.
    let (mut env, _) = lab.env("proplet");
    env.mtls(edge.port, lab.pki, &lab.pki.identity("manager"));
    let setup = proplet_options(&env).load_tls().unwrap().unwrap();
    assert!(
        setup
            .warnings
            .iter()
            .any(|w| matches!(w, Warning::ClientKeyNotCertificateCn { .. })),
        "{:?}",
        setup.warnings
    );
    let failure = fails(&env).await;
    assert_eq!(failure, Failure::ClosedBeforeConnAck);
    assert!(failure
        .fix(&Names::prefixed("PROPLET_"))
        .contains("PROPLET_CLIENT_KEY does not end with the client certificate's CN"));
    assert!(
        edge.log().contains("mqtt_auth: denied"),
        "the edge did not deny:\n{}",
        edge.log()
    );
}

#[tokio::test]
async fn wrong_password_is_not_authorized() {
    if !servers_available("wrong_password_is_not_authorized") {
        return;
    }
    let lab = Lab::start();
    let (mut env, _) = lab.env("proplet");
    env.plain(lab.broker.plain).set("CLIENT_KEY", "wrong-key");
    let failure = fails(&env).await;
    assert_eq!(failure, Failure::NotAuthorized);
    assert!(failure
        .fix(&Names::prefixed("PROPLET_"))
        .contains("PROPLET_CLIENT_ID and PROPLET_CLIENT_KEY"));
}

#[tokio::test]
async fn closed_port_is_unreachable() {
    if !servers_available("closed_port_is_unreachable") {
        return;
    }
    let pki = Pki::shared();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut env = Env::new("PROPLET", &pki.identity("proplet"));
    env.plain(port);
    let failure = fails(&env).await;
    assert!(
        matches!(&failure, Failure::Unreachable(cause) if cause.kind() == std::io::ErrorKind::ConnectionRefused),
        "{failure:?}"
    );
    assert!(
        failure.to_string().contains("connection refused"),
        "{failure}"
    );
    assert!(failure.is_network() && failure.class() == "unreachable");
}

#[tokio::test]
async fn silent_server_times_out() {
    if !servers_available("silent_server_times_out") {
        return;
    }
    let pki = Pki::shared();
    // The kernel completes the TCP handshake; nobody ever answers CONNECT.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut env = Env::new("PROPLET", &pki.identity("proplet"));
    env.plain(listener.local_addr().unwrap().port())
        .set("MQTT_TIMEOUT", "500ms");
    let started = std::time::Instant::now();
    assert_eq!(fails(&env).await, Failure::Timeout);
    println!(
        "the 500ms connect timeout ended the attempt after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn every_key_form_and_v1_certificates_connect() {
    if !servers_available("every_key_form_and_v1_certificates_connect") {
        return;
    }
    let lab = Lab::start();
    let edge = lab.edge("server");
    for name in ["pkcs1", "sec1", "encrypted", "v1"] {
        for (port, via) in [(edge.port, "nginx edge"), (lab.broker.mtls, "mosquitto")] {
            let (mut env, identity) = lab.env(name);
            env.mtls(port, lab.pki, &identity);
            if name == "encrypted" {
                env.set(
                    "MQTT_TLS_CLIENT_KEY_PASSWORD",
                    propeller_tests::KEY_PASSWORD,
                );
            }
            assert_eq!(outcome(&env).await, Ok(()), "{name} via {via}");
        }
    }
}

#[tokio::test]
async fn ca_directory_and_warnings() {
    if !servers_available("ca_directory_and_warnings") {
        return;
    }
    let lab = Lab::start();
    let (mut env, identity) = lab.env("soon");
    // The PKI directory holds keys, CSRs and certificates: only the certificates count.
    env.mtls(lab.broker.mtls, lab.pki, &identity)
        .path("MQTT_TLS_CA_CERT", &lab.pki.dir);
    let setup = proplet_options(&env).load_tls().unwrap().unwrap();
    let soon = setup
        .warnings
        .iter()
        .find_map(|w| match w {
            Warning::ClientCertificateExpiresSoon { days_left, .. } => Some(*days_left),
            _ => None,
        })
        .expect("an expires-soon warning");
    assert!((8..=10).contains(&soon), "{soon} days");
    assert_eq!(outcome(&env).await, Ok(()));
}

#[tokio::test]
async fn key_readable_by_others_and_unused_password_warn() {
    if !servers_available("key_readable_by_others_and_unused_password_warn") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::shared();
    let dir = tempfile::tempdir().unwrap();
    let identity = pki.identity("proplet");
    let key = dir.path().join("proplet.key");
    std::fs::copy(&identity.key, &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut env = Env::new("PROPLET", &identity);
    env.mtls(8883, pki, &identity)
        .path("MQTT_TLS_CLIENT_KEY", &key)
        .set("MQTT_TLS_CLIENT_KEY_PASSWORD", "unused");
    let warnings = proplet_options(&env).load_tls().unwrap().unwrap().warnings;
    assert!(
        warnings
            .iter()
            .any(|w| matches!(w, Warning::KeyFileReadableByOthers { mode: 0o644, .. })),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| matches!(w, Warning::KeyPasswordUnused { .. })),
        "{warnings:?}"
    );
    let text: String = warnings.iter().map(|w| w.to_string()).collect();
    assert!(
        !text.contains(&identity.secret) && !text.contains("unused\""),
        "{text}"
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    env.set("MQTT_TLS_CLIENT_KEY_PASSWORD", "");
    let warnings = proplet_options(&env).load_tls().unwrap().unwrap().warnings;
    assert!(
        warnings.is_empty(),
        "a healthy identity warns: {warnings:?}"
    );
}

/// Plain MQTT to upstream's `AUTH=x509` edge: its authorization.js denies
/// every connection without a client certificate, before CONNACK. The cause
/// says plain MQTT, and the fix says to use ssl:// with a client
/// certificate; the CN rule is not named.
#[tokio::test]
async fn plain_mqtt_to_upstreams_x509_edge_is_explained() {
    if !servers_available("plain_mqtt_to_upstreams_x509_edge_is_explained") {
        return;
    }
    let lab = Lab::start();
    let Some((_edge, plain)) = Edge::upstream_x509(lab.pki, lab.broker.plain) else {
        propeller_tests::skips::skip(
            "plain_mqtt_to_upstreams_x509_edge_is_explained",
            "no upstream tree at ../shared/upstream/propeller-v0.5.0",
        );
        return;
    };
    let (mut env, _) = lab.env("proplet");
    env.plain(plain);
    let failure = fails(&env).await;
    assert_eq!(failure, Failure::ClosedBeforeConnAckPlain);
    assert!(failure.to_string().contains("(plain MQTT)"), "{failure}");
    let fix = failure.fix(&Names::prefixed("PROPLET_"));
    assert!(
        fix.contains("an AUTH=x509 edge") && fix.contains("refuses plain connections"),
        "{fix}"
    );
    assert!(fix.contains("ssl://") && !fix.contains("CN"), "{fix}");
    println!("plain MQTT to upstream's x509 edge: cause={failure} fix={fix}");
}
