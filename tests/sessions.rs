//! Persistent MQTT sessions against a real mosquitto: what the broker queued
//! for a proplet while it was dead reaches it once it is back.

use std::time::{Duration, Instant};

use base64::Engine as _;
use propeller_tests::lab::{logs, Lab, PROPLET};
use propeller_tests::{modules, servers_available, ServiceProcess, CONNECTED, START};
use rumqttc::QoS;
use serde_json::json;

const RESULTS: &str = "m/dom/c/chan/control/proplet/results";

/// A start published at QoS 1 while a persistent-session proplet is dead
/// (SIGKILL) is queued by the broker, and runs once the proplet is back.
#[test]
fn a_start_sent_while_a_persistent_session_proplet_is_dead_runs_once_it_is_back() {
    if !servers_available(
        "a_start_sent_while_a_persistent_session_proplet_is_dead_runs_once_it_is_back",
    ) {
        return;
    }
    let lab = Lab::start();
    let mut env = lab.env("PROPLET", PROPLET);
    env.set("LIVELINESS_INTERVAL", "1s")
        .set("MQTT_PERSISTENT_SESSION", "true")
        .set("LOG_LEVEL", "debug");
    let mut first = ServiceProcess::start("proplet", &env.vars);
    first.wait_for(CONNECTED, Duration::from_secs(20));
    // The broker has confirmed the subscription: it is in the session.
    first.wait_for(
        &format!("subscribed topic={START}"),
        Duration::from_secs(10),
    );
    first.signal("KILL");
    first.wait(Duration::from_secs(10));

    // The test plays the manager; it hears its own start, so the broker has
    // queued it for the dead proplet's session before the proplet is back.
    let mut manager = lab.client("session-test-manager");
    manager.subscribe(START);
    manager.subscribe(RESULTS);
    let file = base64::engine::general_purpose::STANDARD.encode(modules::add());
    let start = json!({"id": "queued-task", "name": "add", "inputs": ["3", "4"], "file": file});
    manager.publish_at(START, &start.to_string(), QoS::AtLeastOnce);
    manager.wait_for("our own start", Duration::from_secs(10), String::new, |m| {
        m.topic == START
    });

    let began = Instant::now();
    let again = ServiceProcess::start("proplet", &env.vars);
    let connected = again.wait_for(CONNECTED, Duration::from_secs(20));
    assert!(connected.contains("session_present=true"), "{connected}");
    let result = manager.wait_for(
        "the queued task's result",
        Duration::from_secs(20),
        || logs(&[("proplet", &again)]),
        |m| m.topic == RESULTS && m.json()["task_id"] == "queued-task",
    );
    assert_eq!(result.json()["results"], "7", "{}", result.text());
    println!(
        "the queued start ran {:?} after the proplet was started again",
        began.elapsed()
    );
    let ran = again
        .output()
        .matches("task completed task_id=queued-task")
        .count();
    println!("the proplet ran the queued task {ran} time(s) so far");
    assert!(ran >= 1, "{}", again.output());
}

/// How long the two proplets with one id are watched.
const WATCH: Duration = Duration::from_secs(20);

/// Two proplets with one client id (a copied `.env`): mosquitto closes the
/// older connection whenever the other connects. Each CONNACK used to reset
/// the backoff, and the two connected 25 times in 20 s between them. Now a
/// connection closed that soon does not reset it, the delays grow, and the
/// cause names the likely reason and the id.
#[test]
fn two_proplets_with_one_client_id_back_off_and_say_why() {
    if !servers_available("two_proplets_with_one_client_id_back_off_and_say_why") {
        return;
    }
    let lab = Lab::start();
    let mut env = lab.env("PROPLET", PROPLET);
    env.set("LIVELINESS_INTERVAL", "1s");
    let a = ServiceProcess::start("proplet", &env.vars);
    a.wait_for(CONNECTED, Duration::from_secs(20));
    let b = ServiceProcess::start("proplet", &env.vars);
    b.wait_for(CONNECTED, Duration::from_secs(20));
    // The observation window of the measurement, not a wait for an event.
    std::thread::sleep(WATCH);
    let (a_out, b_out) = (a.output(), b.output());
    let connects = a_out.matches(CONNECTED).count() + b_out.matches(CONNECTED).count();
    let delays: Vec<Duration> = a_out
        .lines()
        .chain(b_out.lines())
        .filter_map(retry_in)
        .collect();
    let longest = delays.iter().max().copied().unwrap_or_default();
    println!(
        "two proplets with one id: {connects} connections in {WATCH:?} after both were up; \
         longest retry delay {longest:?}; delays {delays:?}"
    );
    let id = propeller_tests::client_id("proplet");
    let cause = format!("another client is probably connected with the same client id \"{id}\"");
    let both = format!("{a_out}{b_out}");
    assert!(
        both.contains(&cause) && both.contains("class=\"taken-over\""),
        "no takeover cause ({cause}):\n{}",
        logs(&[("a", &a), ("b", &b)])
    );
    assert!(
        connects <= 14,
        "{connects} connections, far below 25 expected:\n{}",
        logs(&[("a", &a), ("b", &b)])
    );
    assert!(
        longest >= Duration::from_secs(3),
        "the backoff did not grow: {delays:?}"
    );
}

/// The `retry_in=1.636s` of a log line, if it has one.
fn retry_in(line: &str) -> Option<Duration> {
    let value = line.split("retry_in=").nth(1)?.split_whitespace().next()?;
    if let Some(ms) = value.strip_suffix("ms") {
        return ms
            .parse::<f64>()
            .ok()
            .map(|ms| Duration::from_secs_f64(ms / 1000.0));
    }
    value
        .strip_suffix('s')?
        .parse::<f64>()
        .ok()
        .map(Duration::from_secs_f64)
}
