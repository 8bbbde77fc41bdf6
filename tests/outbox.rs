//! The outbox on disk (`<P>_MQTT_OUTBOX_DIR`) against a real mosquitto: what
//! a publisher accepted while the broker was down outlives a SIGKILL of the
//! publisher, and a second process on the same directory is refused.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use propeller_tests::lab::{logs, Lab, Mqtt, PROPLET};
use propeller_tests::{
    accounts, client_id, servers_available, Mosquitto, Pki, ServiceProcess, CHANNEL_TOPICS,
    CONNECTED,
};

const TOPIC: &str = "m/dom/c/chan/durable";
const MESSAGES: usize = 1_000;
/// Only guards against a hang: nothing here is timed.
const HANG: Duration = Duration::from_secs(180);

/// The messages waiting in an outbox directory.
fn stored(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".msg"))
                .count()
        })
        .unwrap_or(0)
}

/// The numbers received on [`TOPIC`], each with how often it came.
fn numbers(subscriber: &Mqtt) -> BTreeMap<u32, u32> {
    let mut counts = BTreeMap::new();
    for message in subscriber.on(TOPIC) {
        let number = std::str::from_utf8(&message.payload)
            .ok()
            .and_then(|text| text.parse().ok())
            .unwrap_or_else(|| panic!("not a number: {}", message.text()));
        *counts.entry(number).or_insert(0) += 1;
    }
    counts
}

/// 1,000 QoS 1 messages published while the broker is down are on disk
/// when `publish` returns. The publisher is SIGKILLed, the broker started,
/// and a new publisher on the same directory sends all 1,000 after its
/// first CONNACK; the directory is empty once the broker has them.
///
/// Duplicates would be allowed only if the second publisher connected more
/// than once: a message whose PUBACK was lost with a connection is sent
/// again (at least once). On one connection there must be none.
#[test]
fn a_killed_publisher_sends_what_it_accepted_after_a_restart() {
    if !servers_available("a_killed_publisher_sends_what_it_accepted_after_a_restart") {
        return;
    }
    let pki = Pki::shared();
    let (publisher, reader) = (pki.identity("proplet"), pki.identity("manager"));
    let mut broker = Mosquitto::start(pki, &accounts(&[&publisher, &reader], CHANNEL_TOPICS));
    broker.kill();

    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox");
    let port = broker.plain;
    let env = |count: usize| -> Vec<(String, String)> {
        [
            ("MQTT_ADDRESS", format!("tcp://127.0.0.1:{port}")),
            ("CLIENT_ID", client_id("proplet")),
            ("CLIENT_KEY", publisher.secret.clone()),
            ("MQTT_QOS", "1".to_owned()),
            ("MQTT_TIMEOUT", "5s".to_owned()),
            ("MQTT_OUTBOX_DIR", outbox.display().to_string()),
            ("TOPIC", TOPIC.to_owned()),
            ("COUNT", count.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("DURABLE_{k}"), v))
        .collect()
    };

    // Built first (the first call runs cargo), so that the figure below is
    // the publisher's.
    propeller_tests::process::binary("examples/durable");
    let started = Instant::now();
    let mut first = ServiceProcess::start("examples/durable", &env(MESSAGES));
    first.wait_for(&format!("durable: published {MESSAGES}"), HANG);
    println!(
        "{MESSAGES} publish calls returned, durable, {:?} after the publisher started",
        started.elapsed()
    );
    assert_eq!(stored(&outbox), MESSAGES, "every publish returned durable");

    // Meanwhile a second process on the directory is refused, the first untouched.
    let mut second = ServiceProcess::start("examples/durable", &env(0));
    let status = second.wait(HANG);
    let output = second.output();
    assert_eq!(status.code(), Some(78), "{output}");
    assert_eq!(
        output.trim(),
        format!(
            "durable: configuration error: another process uses {} (DURABLE_MQTT_OUTBOX_DIR): give each process its own directory",
            outbox.display()
        )
    );

    first.signal("KILL");
    first.wait(HANG);
    assert!(
        !first.output().contains("durable: connected"),
        "the broker was down"
    );
    assert_eq!(stored(&outbox), MESSAGES, "a SIGKILL loses nothing");

    broker.start_again();
    let mut subscriber = Mqtt::connect(broker.plain, &reader, "outbox-subscriber");
    subscriber.subscribe(TOPIC);
    let began = Instant::now();
    let mut again = ServiceProcess::start("examples/durable", &env(0));
    again.wait_for(
        &format!("durable: started with {MESSAGES} messages from the outbox directory"),
        HANG,
    );
    again.wait_for("durable: all acknowledged", HANG);
    let deadline = Instant::now() + HANG;
    while numbers(&subscriber).len() < MESSAGES && Instant::now() < deadline {
        subscriber.pump(Duration::from_millis(200));
    }
    let received = numbers(&subscriber);
    println!(
        "{} of {MESSAGES} messages received {:?} after the publisher was started again",
        received.len(),
        began.elapsed()
    );
    let expected: Vec<u32> = (0..MESSAGES as u32).collect();
    assert_eq!(
        received.keys().copied().collect::<Vec<_>>(),
        expected,
        "received exactly the messages published\n{}",
        logs(&[("publisher", &again)])
    );
    let status = again.wait(HANG);
    assert!(status.success(), "{}", again.output());
    let connections = again.output().matches("durable: connected").count();
    let duplicates: Vec<(u32, u32)> = received.into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(
        duplicates.is_empty() || connections > 1,
        "duplicates on a single connection: {duplicates:?}"
    );
    assert_eq!(stored(&outbox), 0, "acknowledged messages leave the disk");
}

/// A service started on an outbox directory another one holds exits with
/// 78 and one line naming the directory and the variable; the first keeps
/// running.
#[test]
fn a_second_service_on_the_outbox_directory_exits_78() {
    if !servers_available("a_second_service_on_the_outbox_directory_exits_78") {
        return;
    }
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let mut env = lab.env("PROPLET", PROPLET);
    env.path("MQTT_OUTBOX_DIR", dir.path());
    let first = ServiceProcess::start("proplet", &env.vars);
    first.wait_for(CONNECTED, Duration::from_secs(20));

    let mut second = ServiceProcess::start("proplet", &env.vars);
    let status = second.wait(Duration::from_secs(20));
    let output = second.output();
    assert_eq!(status.code(), Some(78), "{output}");
    assert_eq!(
        output.trim(),
        format!(
            "proplet: configuration error: another process uses {} (PROPLET_MQTT_OUTBOX_DIR): give each process its own directory",
            dir.path().display()
        )
    );
    assert!(
        !first.output().contains("stopped"),
        "the first proplet stopped:\n{}",
        first.output()
    );
}
