//! Every service binary connects in every mode: plain to mosquitto, MQTTS to
//! mosquitto's TLS listener, mTLS through the nginx edge and to mosquitto's
//! `require_certificate` listener. Each is a real process; we assert its log.

use std::time::Duration;

use propeller_tests::{servers_available, Edge, Env, Mosquitto, Pki, ServiceProcess, CONNECTED};

const SERVICES: [(&str, &str); 3] = [
    ("manager", "MANAGER"),
    ("proplet", "PROPLET"),
    ("proxy", "PROXY"),
];

struct Lab {
    pki: &'static Pki,
    broker: Mosquitto,
    /// AUTH=x509: client certificate and CN check.
    edge: Edge,
    /// AUTH=key: TLS with a server certificate only.
    key_edge: Edge,
}

fn lab() -> Lab {
    let pki = Pki::shared();
    let ids: Vec<_> = SERVICES
        .iter()
        .map(|(name, _)| pki.identity(name))
        .collect();
    let broker = Mosquitto::for_clients(pki, &ids.iter().collect::<Vec<_>>());
    let edge = Edge::start(pki, broker.plain, "server", "ca.crt");
    let key_edge = Edge::start_key(pki, broker.plain, "server");
    Lab {
        pki,
        broker,
        edge,
        key_edge,
    }
}

/// Starts every service with the env `mode` makes, and checks each logs the
/// connection with the mode's name, then stops cleanly on SIGTERM.
fn every_service_connects(
    test: &str,
    expected_mode: &str,
    mode: impl Fn(&Lab, &mut Env, &propeller_tests::Identity),
) {
    if !servers_available(test) {
        return;
    }
    let lab = lab();
    let mut services: Vec<_> = SERVICES
        .iter()
        .map(|(name, prefix)| {
            let identity = lab.pki.identity(name);
            let mut env = Env::new(prefix, &identity);
            mode(&lab, &mut env, &identity);
            (
                *name,
                identity.secret.clone(),
                ServiceProcess::start(name, &env.vars),
            )
        })
        .collect();
    for (name, secret, process) in &mut services {
        let line = process.wait_for(CONNECTED, Duration::from_secs(10));
        assert!(
            line.contains(&format!("mode={expected_mode}")),
            "{name}: {line}"
        );
        assert!(
            line.contains(&format!("client_id={name}-client")),
            "{name}: {line}"
        );
        let status = process.terminate(Duration::from_secs(5));
        assert!(
            status.success(),
            "{name} exited with {status} on SIGTERM:\n{}",
            process.output()
        );
        let output = process.output();
        assert!(
            output.contains("stopping signal=\"SIGTERM\""),
            "{name}:\n{output}"
        );
        assert!(
            !output.contains(secret.as_str()),
            "{name} printed its client key:\n{output}"
        );
    }
}

#[test]
fn plain_mqtt_every_service() {
    every_service_connects("plain_mqtt_every_service", "plain", |lab, env, _| {
        env.plain(lab.broker.plain);
    });
}

#[test]
fn mqtts_every_service() {
    every_service_connects("mqtts_every_service", "tls", |lab, env, _| {
        env.tls(lab.broker.tls, lab.pki);
    });
}

#[test]
fn mqtts_through_the_edge_every_service() {
    every_service_connects(
        "mqtts_through_the_edge_every_service",
        "tls",
        |lab, env, _| {
            env.tls(lab.key_edge.port, lab.pki);
        },
    );
}

#[test]
fn mtls_through_the_edge_every_service() {
    every_service_connects(
        "mtls_through_the_edge_every_service",
        "mtls",
        |lab, env, identity| {
            env.mtls(lab.edge.port, lab.pki, identity);
        },
    );
}

#[test]
fn mtls_to_mosquitto_every_service() {
    every_service_connects(
        "mtls_to_mosquitto_every_service",
        "mtls",
        |lab, env, identity| {
            env.mtls(lab.broker.mtls, lab.pki, identity);
        },
    );
}
