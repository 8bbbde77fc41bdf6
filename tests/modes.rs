//! Every service binary connects in every mode: plain to mosquitto, MQTTS to
//! mosquitto's TLS listener, mTLS through the nginx edge and to mosquitto's
//! `require_certificate` listener. Each is a real process; we assert its log.
//! So does a service that is not Propeller's: the connection crate's
//! `sensor` example, configured by `SENSOR_*` variables.

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

/// Where a client connects, and the mode it must report there.
#[derive(Clone, Copy)]
enum Route {
    /// Plain MQTT to mosquitto.
    Plain,
    /// MQTTS to mosquitto's TLS listener.
    Mqtts,
    /// MQTTS through the `AUTH=key` edge.
    MqttsEdge,
    /// mTLS through the `AUTH=x509` edge (client certificate and CN check).
    MtlsEdge,
    /// mTLS to mosquitto's `require_certificate` listener.
    MtlsMosquitto,
}

impl Route {
    fn mode(self) -> &'static str {
        match self {
            Route::Plain => "plain",
            Route::Mqtts | Route::MqttsEdge => "tls",
            Route::MtlsEdge | Route::MtlsMosquitto => "mtls",
        }
    }

    fn apply(self, lab: &Lab, env: &mut Env, identity: &propeller_tests::Identity) {
        match self {
            Route::Plain => env.plain(lab.broker.plain),
            Route::Mqtts => env.tls(lab.broker.tls, lab.pki),
            Route::MqttsEdge => env.tls(lab.key_edge.port, lab.pki),
            Route::MtlsEdge => env.mtls(lab.edge.port, lab.pki, identity),
            Route::MtlsMosquitto => env.mtls(lab.broker.mtls, lab.pki, identity),
        };
    }
}

/// Starts every service with the env `route` makes, and checks each logs the
/// connection with the mode's name, then stops cleanly on SIGTERM.
fn every_service_connects(test: &str, route: Route) {
    let expected_mode = route.mode();
    if !servers_available(test) {
        return;
    }
    let lab = lab();
    let mut services: Vec<_> = SERVICES
        .iter()
        .map(|(name, prefix)| {
            let identity = lab.pki.identity(name);
            let mut env = Env::new(prefix, &identity);
            route.apply(&lab, &mut env, &identity);
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
    every_service_connects("plain_mqtt_every_service", Route::Plain);
}

#[test]
fn mqtts_every_service() {
    every_service_connects("mqtts_every_service", Route::Mqtts);
}

#[test]
fn mqtts_through_the_edge_every_service() {
    every_service_connects("mqtts_through_the_edge_every_service", Route::MqttsEdge);
}

#[test]
fn mtls_through_the_edge_every_service() {
    every_service_connects("mtls_through_the_edge_every_service", Route::MtlsEdge);
}

#[test]
fn mtls_to_mosquitto_every_service() {
    every_service_connects("mtls_to_mosquitto_every_service", Route::MtlsMosquitto);
}

/// The `sensor` example, a third party's service on the connection crate,
/// connects by `route` from its own `SENSOR_*` variables and has its
/// readings acknowledged by the broker.
fn the_sensor_example_connects(test: &str, route: Route) {
    let expected_mode = route.mode();
    if !servers_available(test) {
        return;
    }
    let lab = lab();
    let identity = lab.pki.identity("proplet");
    let mut env = Env::new("SENSOR", &identity);
    // Propeller's channel is not the sensor's business.
    env.vars
        .retain(|(name, _)| name != "SENSOR_DOMAIN_ID" && name != "SENSOR_CHANNEL_ID");
    env.set("TOPIC", "m/dom/c/chan/sensor/readings")
        .set("READINGS", "5");
    route.apply(&lab, &mut env, &identity);
    let mut sensor = ServiceProcess::start("examples/sensor", &env.vars);
    let status = sensor.wait(Duration::from_secs(30));
    let output = sensor.output();
    assert!(
        status.success(),
        "the sensor exited with {status}:\n{output}"
    );
    assert!(
        output.contains(&format!("sensor: connected, mode={expected_mode}")),
        "{output}"
    );
    assert!(
        output.contains("sensor: 5 readings acknowledged"),
        "{output}"
    );
    assert!(!output.contains("is not a variable"), "{output}");
    assert!(
        !output.contains(identity.secret.as_str()),
        "the sensor printed its client key:\n{output}"
    );
}

#[test]
fn the_sensor_example_over_plain_mqtt() {
    the_sensor_example_connects("the_sensor_example_over_plain_mqtt", Route::Plain);
}

#[test]
fn the_sensor_example_over_mqtts() {
    the_sensor_example_connects("the_sensor_example_over_mqtts", Route::MqttsEdge);
}

#[test]
fn the_sensor_example_over_mtls_through_the_edge() {
    the_sensor_example_connects(
        "the_sensor_example_over_mtls_through_the_edge",
        Route::MtlsEdge,
    );
}
