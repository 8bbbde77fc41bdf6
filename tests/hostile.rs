//! Hostile input: each attack of the adversarial review, replayed against the
//! real services on a real mosquitto, with the bound that now holds it.
//!
//! The attacker can publish on the channel (a raw MQTT client with a
//! channel account) or reach the manager's API. Checks that need no broker
//! (the chunk assembler, the sandbox's limits, module names, the health
//! file, file reads, redaction) are unit tests beside the code.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use propeller_tests::http::{finished_task, request, start_task, COMPLETED, FAILED};
use propeller_tests::lab::{logs, Lab};
use propeller_tests::{modules, servers_available};
use serde_json::json;

const CHUNK: &str = "m/dom/c/chan/registry/server";
const REQUEST: &str = "m/dom/c/chan/registry/proplet";
const ERROR: &str = "m/dom/c/chan/registry/error";
const ALIVE: &str = "m/dom/c/chan/control/proplet/alive";
const RESULTS: &str = "m/dom/c/chan/control/proplet/results";
const START: &str = "m/dom/c/chan/control/manager/start";

fn base64(module: Vec<u8>) -> String {
    base64::engine::general_purpose::STANDARD.encode(module)
}

fn add() -> String {
    base64(modules::add())
}

fn spin() -> String {
    base64(modules::spin())
}

/// An inline add(3, 4) still works: the services survived what came before.
fn still_serves(api: u16) {
    let id = start_task(
        api,
        json!({"name": "add", "inputs": ["3", "4"], "file": add()}),
    );
    let task = finished_task(api, &id, Duration::from_secs(30));
    assert_eq!(
        (&task["state"], &task["results"]),
        (&json!(COMPLETED), &json!("7")),
        "{task}"
    );
}

/// An 8 MiB module used to be accepted, then fail to publish on every
/// reconnect forever. Now the API refuses what could never be sent, and the
/// manager stays connected.
#[test]
fn oversized_tasks_are_refused_where_they_enter() {
    if !servers_available("oversized_tasks_are_refused_where_they_enter") {
        return;
    }
    let lab = Lab::start();
    let (manager, api) = lab.manager();
    let _proplet = lab.proplet();
    manager.wait_for("proplet alive", Duration::from_secs(20));
    let module = base64::engine::general_purpose::STANDARD.encode(vec![0u8; 8 << 20]);
    let (status, answer) = request(
        api,
        "POST",
        "/tasks",
        Some(&json!({"name": "f", "file": module})),
    );
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("MQTT_MAX_PACKET_SIZE"),
        "{answer}"
    );
    // Inputs of 1 MiB (the review stored 64 MiB whole).
    let inputs = vec!["9".repeat(1024); 1024];
    let (status, answer) = request(
        api,
        "POST",
        "/tasks",
        Some(&json!({"name": "f", "file": add(), "inputs": inputs})),
    );
    assert_eq!(status, 413, "{answer}");
    let (_, health) = request(api, "GET", "/health", None);
    assert_eq!(health["mqtt"]["state"], "connected", "{health}");
    assert!(
        !manager.output().contains("Cannot send packet"),
        "{}",
        manager.output()
    );
    still_serves(api);
}

/// One forged chunk with `total_chunks` 4294967295 used to abort the
/// proplet on a 137 GB allocation. Long or escaping module names used to
/// reach the proxy's file system and URL, and be echoed to the channel.
#[test]
fn forged_chunks_and_module_names_cost_nothing() {
    if !servers_available("forged_chunks_and_module_names_cost_nothing") {
        return;
    }
    let lab = Lab::start();
    let (manager, api) = lab.manager_with(&[("LOG_LEVEL", "debug")]);
    let proplet = lab.proplet();
    manager.wait_for("proplet alive", Duration::from_secs(20));
    let mut attacker = lab.client("attacker");
    attacker.subscribe(ERROR);
    // No proxy yet: the proplet waits for `wanted.wasm`.
    start_task(
        api,
        json!({"name": "add", "inputs": ["1", "2"], "image_url": "wanted.wasm"}),
    );
    proplet.wait_for("asking the proxy for the module", Duration::from_secs(20));
    for total in [u32::MAX, 1 << 20, 1 << 21] {
        attacker.publish(
            CHUNK,
            &json!({"app_name": "wanted.wasm", "chunk_idx": 0, "total_chunks": total, "data": "AA=="})
                .to_string(),
        );
    }
    still_serves(api);
    assert!(
        !proplet.output().contains("memory allocation"),
        "{}",
        proplet.output()
    );

    let proxy = lab.proxy();
    let long = "a".repeat(2 << 20);
    attacker.publish(REQUEST, &json!({ "app_name": long }).to_string());
    proxy.wait_for("whose app_name is over 1024 bytes", Duration::from_secs(20));
    for escape in ["..%2fsecret.txt", "%2e%2e%2fsecret", "#", "add.wasm?x"] {
        attacker.publish(REQUEST, &json!({ "app_name": escape }).to_string());
        let refused = attacker.wait_for(
            "a refusal",
            Duration::from_secs(20),
            || logs(&[("proxy", &proxy)]),
            |m| m.json()["app_name"] == escape,
        );
        let error = refused.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains("names no module file"), "{error}");
        assert!(
            !error.contains(&lab.modules.path().display().to_string()),
            "{error}"
        );
    }
    // Nothing was answered for the 2 MiB name; its log line is cut.
    assert!(attacker.on(ERROR).iter().all(|m| m.payload.len() < 4096));
    assert!(proxy.output().len() < 64 << 10, "the proxy's log grew");
}

/// 600 connections that never finish their headers used to keep `/health`
/// from answering for as long as they stayed open.
#[test]
fn slow_clients_cannot_take_the_api_down() {
    if !servers_available("slow_clients_cannot_take_the_api_down") {
        return;
    }
    let lab = Lab::start();
    let (_manager, api) = lab.manager();
    let mut slow: Vec<TcpStream> = (0..300)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", api)).ok())
        .collect();
    for stream in &mut slow {
        let _ = stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n");
    }
    // The server drops a client that has not finished its headers.
    let mut first = slow.remove(0);
    first
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buffer = [0u8; 256];
    let closed = match first.read(&mut buffer) {
        Ok(0) => true,
        Ok(n) => buffer[..n].starts_with(b"HTTP/1.1 408"),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(closed, "a client that never finished its headers was kept");
    // And an honest client is answered while the slow ones are still open.
    let started = Instant::now();
    let (status, health) = request(api, "GET", "/health", None);
    assert_eq!(status, 200, "{health}");
    println!(
        "/health answered {:?} after 300 slow clients",
        started.elapsed()
    );
    drop(slow);
}

/// A proplet used to run any number of tasks at once (16 reached 4 GB), and
/// SIGTERM waited for them, up to 5 minutes, and reported nothing.
#[test]
fn the_proplet_caps_its_tasks_and_reports_them_at_sigterm() {
    if !servers_available("the_proplet_caps_its_tasks_and_reports_them_at_sigterm") {
        return;
    }
    let lab = Lab::start();
    let (manager, api) = lab.manager();
    let mut env = lab.env("PROPLET", propeller_tests::lab::PROPLET);
    env.set("LIVELINESS_INTERVAL", "1s").set("MAX_TASKS", "2");
    let mut proplet = propeller_tests::ServiceProcess::start("proplet", &env.vars);
    manager.wait_for("proplet alive", Duration::from_secs(20));
    let running: Vec<String> = (0..2)
        .map(|_| start_task(api, json!({"name": "spin", "file": spin()})))
        .collect();
    proplet.wait_for_count("starting task", 2, Duration::from_secs(20));
    let refused = start_task(api, json!({"name": "spin", "file": spin()}));
    let task = finished_task(api, &refused, Duration::from_secs(20));
    assert_eq!(task["state"], FAILED, "{task}");
    assert!(
        task["error"]
            .as_str()
            .unwrap()
            .contains("PROPLET_MAX_TASKS"),
        "{task}"
    );
    let status = proplet.terminate(Duration::from_secs(20));
    assert!(status.success(), "{status}: {}", proplet.output());
    for id in running {
        let task = finished_task(api, &id, Duration::from_secs(20));
        assert_eq!(task["state"], FAILED, "{task}");
        assert_eq!(
            task["error"], "stopped: the proplet is shutting down",
            "{task}"
        );
    }
}

/// The manager used to trust the channel: a fake heartbeat received the
/// next task, a result from any proplet completed a task, a proplet that
/// died kept its tasks running forever, and a CR/LF in a name forged a log
/// line.
#[test]
fn the_manager_checks_what_it_is_told() {
    if !servers_available("the_manager_checks_what_it_is_told") {
        return;
    }
    let lab = Lab::start();
    let (manager, api) = lab.manager_with(&[("LOG_LEVEL", "debug")]);
    let proplet = lab.proplet();
    manager.wait_for("proplet alive", Duration::from_secs(20));
    let mut attacker = lab.client("attacker");
    // Connected once the SUBACK is in.
    attacker.subscribe(RESULTS);
    for i in 0..50 {
        attacker.publish(
            ALIVE,
            &json!({"proplet_id": format!("fake-{i}"), "status": "alive", "namespace": "default"})
                .to_string(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while request(api, "GET", "/proplets/fake-49", None).0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the fake heartbeats never arrived:\n{}",
            logs(&[("manager", &manager)])
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Pinned to a fake id: refused; unpinned: the real proplet gets it.
    let (_, created) = request(
        api,
        "POST",
        "/tasks",
        Some(&json!({"name": "spin", "file": spin(), "proplet_id": "fake-0"})),
    );
    let pinned = created["id"].as_str().unwrap();
    let (status, answer) = request(api, "POST", &format!("/tasks/{pinned}/start"), None);
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("never announced"),
        "{answer}"
    );
    let id = start_task(api, json!({"name": "spin", "file": spin()}));
    let (_, task) = request(api, "GET", &format!("/tasks/{id}"), None);
    assert_eq!(task["proplet_id"], "proplet-client", "{task}");
    proplet.wait_for("starting task", Duration::from_secs(20));
    // A result from another proplet changes nothing.
    attacker.publish(
        RESULTS,
        &json!({"task_id": id, "proplet_id": "fake-1", "results": "666", "error": null})
            .to_string(),
    );
    manager.wait_for("result ignored", Duration::from_secs(20));
    let (_, task) = request(api, "GET", &format!("/tasks/{id}"), None);
    assert_eq!(task["state"], 2, "{task}");
    // A CR/LF in an id forges no log line: it is shown escaped.
    let forged = "t\r\nINFO forged line";
    attacker.publish(
        START,
        &json!({"id": forged, "name": "add", "inputs": ["1", "2"], "file": add(), "proplet_id": "proplet-client"})
            .to_string(),
    );
    manager.wait_for("forged line", Duration::from_secs(20));
    for output in [manager.output(), proplet.output()] {
        assert!(!output.contains("\nINFO forged line"), "{output}");
        assert!(output.contains("t\\r\\nINFO forged line"), "{output}");
    }
    // The proplet dies: its task fails, and it is not busy any more.
    let mut proplet = proplet;
    proplet.signal("KILL");
    let task = finished_task(api, &id, Duration::from_secs(20));
    assert_eq!(task["state"], FAILED, "{task}");
    assert!(
        task["error"].as_str().unwrap().contains("went offline"),
        "{task}"
    );
    let (_, proplets) = request(api, "GET", "/proplets?limit=100", None);
    let ours = proplets["proplets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "proplet-client")
        .unwrap();
    assert_eq!(ours["task_count"], 0, "{proplets}");
    let _ = proplet.wait(Duration::from_secs(5));
}
