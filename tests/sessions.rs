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
