//! The manager's store (issue 14), end to end: the real manager, proplet
//! and mosquitto, with SQLite in a temporary directory and a real
//! PostgreSQL started by the test (`tests/support/postgres.rs`).
//!
//! - every store: a task completed before a SIGKILL of the manager is
//!   still completed, with its results, after the restart, and its proplet
//!   is listed (memory: forgotten, as documented);
//! - SQLite: a file that cannot be opened, is corrupt, or is held by another
//!   manager stops the manager with exit 78 and one line naming
//!   `MANAGER_SQLITE_PATH` and the path;
//! - PostgreSQL down at startup and later: the manager retries, `/health`
//!   says so, the API answers 503 for what needs the store, nothing it
//!   acknowledged is lost, and the password appears in no log;
//! - two managers on one PostgreSQL: one active, one standby that takes
//!   over when the active one is killed;
//! - a result published while the manager is down: lost by the broker
//!   (clean session), unless a standby manager receives it;
//! - PostgreSQL over TLS: verify-full with the right CA keeps tasks across a
//!   SIGKILL (with a client certificate and channel binding); a CA that did
//!   not sign the server's certificate, `require` against a server without
//!   TLS, and `disable` against a hostssl-only server are retried with a
//!   cause that says what to fix.
//!
//! `cargo test -p propeller-tests --test store`; the throughput figures come
//! from a harness: `cargo run --release --example store-bench`.

use std::path::Path;
use std::time::{Duration, Instant};

use propeller_tests::http::{finished_task, request, start_task, COMPLETED};
use propeller_tests::lab::{logs, Lab, Mqtt, MANAGER, UPSTREAM};
use propeller_tests::managers::{
    add_task, is_listed, pairs, proplet_listed, request_text, start_manager,
};
use propeller_tests::postgres::{self, Postgres};
use propeller_tests::{client_id, servers_available, Pki, ServiceProcess, CONNECTED};
use serde_json::{json, Value};

const RUNNING: u64 = 2;
const PROPLET_ID: &str = "proplet-client";
const TOPIC: &str = "m/dom/c/chan/control";

/// Polls `/health` until `store.state` is `state`; returns the health.
fn store_state(api: u16, state: &str, timeout: Duration, logs: impl Fn() -> String) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, health) = request(api, "GET", "/health", None);
        assert_eq!(status, 200, "{health}");
        if health["store"]["state"] == state {
            return health;
        }
        assert!(
            Instant::now() < deadline,
            "store not {state} within {timeout:?}: {health}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What a manager restarted after a SIGKILL shows.
struct Restarted {
    /// `GET` of the task completed before the kill: status and body.
    completed: (u16, Value),
    /// `GET` of a task left Pending.
    pending: (u16, Value),
    /// The proplet, as `GET /proplets` lists it right after the restart.
    listed: Option<Value>,
    /// The restarted manager and its API port.
    manager: ServiceProcess,
    api: u16,
}

/// Runs add(3, 4) on our proplet, SIGKILLs the manager, and starts it
/// again with the same settings; when the store `keeps` state, the
/// restarted manager runs the next task on the same proplet.
fn kill_and_restart(
    lab: &Lab,
    settings: &[(String, String)],
    dir: &Path,
    keeps: bool,
) -> Restarted {
    let (mut first, api) = start_manager(lab, MANAGER, settings, dir);
    let proplet = lab.proplet();
    proplet_listed(api, PROPLET_ID, true, Duration::from_secs(20));
    let id = start_task(api, add_task());
    let done = finished_task(api, &id, Duration::from_secs(20));
    let both = logs(&[("manager", &first), ("proplet", &proplet)]);
    assert_eq!(
        (done["state"].as_u64(), &done["results"]),
        (Some(COMPLETED), &json!("7")),
        "{both}"
    );
    let (status, pending) = request(
        api,
        "POST",
        "/tasks",
        Some(&json!({"name": "later", "image_url": "later.wasm"})),
    );
    assert_eq!(status, 201, "{pending}");
    let pending = pending["id"].as_str().unwrap().to_owned();
    first.signal("KILL");
    let status = first.wait(Duration::from_secs(10));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let (second, api) = start_manager(lab, MANAGER, settings, dir);
    store_state(api, "ready", Duration::from_secs(10), || second.output());
    let completed = request(api, "GET", &format!("/tasks/{id}"), None);
    let pending = request(api, "GET", &format!("/tasks/{pending}"), None);
    let (_, page) = request(api, "GET", "/proplets", None);
    let listed = page["proplets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["id"] == PROPLET_ID)
        .cloned();
    // The restarted manager works as before: the proplet is alive again at
    // its next heartbeat and takes the next task. (A manager that forgot
    // the proplet's announcement sends it nothing until it reconnects.)
    if keeps {
        let next = start_task_when_alive(api);
        let next = finished_task(api, &next, Duration::from_secs(20));
        assert_eq!(
            next["results"],
            "7",
            "{}",
            logs(&[("manager", &second), ("proplet", &proplet)])
        );
    }
    Restarted {
        completed,
        pending,
        listed,
        manager: second,
        api,
    }
}

fn start_task_when_alive(api: u16) -> String {
    proplet_listed(api, PROPLET_ID, true, Duration::from_secs(20));
    start_task(api, add_task())
}

fn assert_kept(restarted: &Restarted) {
    let (status, task) = &restarted.completed;
    assert_eq!(*status, 200, "{task}");
    assert_eq!(task["state"], COMPLETED, "{task}");
    assert_eq!(task["results"], "7", "{task}");
    assert_eq!(task["proplet_id"], PROPLET_ID, "{task}");
    assert_ne!(task["finish_time"], "0001-01-01T00:00:00Z", "{task}");
    let (status, task) = &restarted.pending;
    assert_eq!((*status, &task["state"]), (200, &json!(0)), "{task}");
    let proplet = restarted
        .listed
        .as_ref()
        .expect("the proplet is listed after the restart");
    assert_eq!(proplet["metadata"]["wasm_runtime"], "wasmi", "{proplet}");
    assert!(proplet["last_alive_at"].is_string(), "{proplet}");
}

#[test]
fn sqlite_by_default_keeps_tasks_and_proplets_across_a_sigkill() {
    if !servers_available("sqlite_by_default_keeps_tasks_and_proplets_across_a_sigkill") {
        return;
    }
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    // No store settings at all: SQLite at ./propeller.db.
    let settings = pairs(&[("STORAGE_TYPE", "")]);
    let restarted = kill_and_restart(&lab, &settings, dir.path(), true);
    assert_kept(&restarted);
    let api = restarted.api;
    assert!(dir.path().join("propeller.db").is_file());
    let (_, health) = request(api, "GET", "/health", None);
    assert_eq!(health["store"]["type"], "sqlite", "{health}");
    assert_eq!(health["store"]["location"], "./propeller.db", "{health}");
}

#[test]
fn postgres_keeps_tasks_and_proplets_across_a_sigkill() {
    let test = "postgres_keeps_tasks_and_proplets_across_a_sigkill";
    let Some(bin) = postgres::available_with_servers(test) else {
        return;
    };
    let pg = Postgres::start(&bin);
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let restarted = kill_and_restart(&lab, &pg.settings(), dir.path(), true);
    assert_kept(&restarted);
    let manager = &restarted.manager;
    let id = restarted.completed.1["id"].as_str().unwrap();
    assert_eq!(
        pg.sql(
            postgres::DATABASE,
            &format!("SELECT state, results FROM tasks WHERE id = '{id}'")
        ),
        "3|\"7\""
    );
    assert_eq!(
        pg.sql(
            postgres::DATABASE,
            "SELECT max(version) FROM schema_migrations"
        ),
        "1"
    );
    assert!(
        !manager.output().contains(&pg.password),
        "the password is logged"
    );
}

#[test]
fn memory_forgets_on_request() {
    if !servers_available("memory_forgets_on_request") {
        return;
    }
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let settings = pairs(&[("STORAGE_TYPE", "memory")]);
    let Restarted {
        completed, pending, ..
    } = kill_and_restart(&lab, &settings, dir.path(), false);
    assert_eq!(completed.0, 404, "{}", completed.1);
    assert_eq!(pending.0, 404, "{}", pending.1);
    assert!(!dir.path().join("propeller.db").exists());
}

/// Starts a manager that must stop at once; returns its exit code and output.
fn refused(lab: &Lab, settings: &[(&str, &str)], dir: &Path) -> (Option<i32>, String) {
    let mut env = lab.env("MANAGER", MANAGER);
    for (suffix, value) in settings {
        env.set(suffix, value);
    }
    let mut manager = ServiceProcess::start_in("manager", &env.vars, dir);
    let status = manager.wait(Duration::from_secs(20));
    (status.code(), manager.output())
}

#[test]
fn a_bad_store_file_stops_the_manager_with_one_line() {
    if !servers_available("a_bad_store_file_stops_the_manager_with_one_line") {
        return;
    }
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let expect = |path: &Path, problem: &str| {
        let path = path.display().to_string();
        let (code, output) = refused(
            &lab,
            &[("STORAGE_TYPE", "sqlite"), ("SQLITE_PATH", &path)],
            dir.path(),
        );
        assert_eq!(code, Some(78), "{output}");
        assert_eq!(output.trim().lines().count(), 1, "one line: {output}");
        let start = format!("manager: configuration error: MANAGER_SQLITE_PATH={path}: {problem}");
        assert!(output.starts_with(&start), "{output}");
    };
    // Not a database.
    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, b"not a database, ".repeat(512)).unwrap();
    expect(&garbage, "is not a SQLite database, or is corrupt");
    // A database with a page overwritten.
    let damaged = dir.path().join("damaged.db");
    {
        let settings = pairs(&[
            ("STORAGE_TYPE", "sqlite"),
            ("SQLITE_PATH", &damaged.display().to_string()),
        ]);
        let (mut manager, api) = start_manager(&lab, MANAGER, &settings, dir.path());
        for _ in 0..20 {
            let (status, body) = request(api, "POST", "/tasks", Some(&add_task()));
            assert_eq!(status, 201, "{body}");
        }
        manager.terminate(Duration::from_secs(10));
    }
    let mut bytes = std::fs::read(&damaged).unwrap();
    assert!(bytes.len() > 3 * 4096, "{} bytes", bytes.len());
    bytes[4096..3 * 4096].fill(0xA5);
    std::fs::write(&damaged, bytes).unwrap();
    expect(&damaged, "is not a SQLite database, or is corrupt");
    // Cannot be opened: a directory that does not exist, and a directory.
    expect(
        &dir.path().join("missing/propeller.db"),
        "cannot be opened for writing",
    );
    expect(dir.path(), "cannot be opened for writing");
    // Held by a running manager.
    let held = dir.path().join("held.db");
    let settings = pairs(&[
        ("STORAGE_TYPE", "sqlite"),
        ("SQLITE_PATH", &held.display().to_string()),
    ]);
    let (first, api) = start_manager(&lab, MANAGER, &settings, dir.path());
    expect(&held, "is in use by another manager");
    let (status, _) = request(api, "POST", "/tasks", Some(&add_task()));
    assert_eq!(
        status,
        201,
        "the first manager carries on: {}",
        first.output()
    );
    // Upstream's badger is named, not guessed at.
    let (code, output) = refused(&lab, &[("STORAGE_TYPE", "badger")], dir.path());
    assert_eq!(code, Some(78), "{output}");
    assert!(
        output.starts_with(
            "manager: configuration error: MANAGER_STORAGE_TYPE=\"badger\" is not valid"
        ),
        "{output}"
    );
}

#[test]
fn postgres_down_at_startup_and_later() {
    let test = "postgres_down_at_startup_and_later";
    let Some(bin) = postgres::available_with_servers(test) else {
        return;
    };
    let mut pg = Postgres::start(&bin);
    pg.stop();
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = pg.settings();
    settings.push(("LOG_LEVEL".into(), "debug".into()));
    // Down at startup: the manager runs, says why, and refuses what needs
    // the store.
    let (mut manager, api) = start_manager(&lab, MANAGER, &settings, dir.path());
    let output = || logs(&[("manager", &manager)]);
    let health = store_state(api, "retrying", Duration::from_secs(10), output);
    let failure = health["store"]["failure"].as_str().unwrap_or_default();
    assert!(failure.contains("connect"), "{health}");
    assert_eq!(
        health["store"]["location"],
        format!("127.0.0.1:{}/propeller", pg.port)
    );
    for (method, path, body) in [
        ("GET", "/tasks", None),
        ("GET", "/proplets", None),
        ("POST", "/tasks", Some(add_task())),
    ] {
        let (status, answer) = request(api, method, path, body.as_ref());
        assert_eq!(status, 503, "{method} {path}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("store"),
            "{answer}"
        );
    }
    // Up: the manager gets there by itself.
    pg.resume();
    store_state(api, "ready", Duration::from_secs(20), output);
    let (status, first) = request(api, "POST", "/tasks", Some(&add_task()));
    assert_eq!(status, 201, "{first}");
    // Down again: noticed while idle; changes refused, reads still served.
    pg.stop();
    let health = store_state(api, "retrying", Duration::from_secs(15), output);
    assert!(health["store"]["attempts"].as_u64() >= Some(1), "{health}");
    let (status, answer) = request(api, "POST", "/tasks", Some(&add_task()));
    assert_eq!(status, 503, "{answer}");
    let (status, page) = request(api, "GET", "/tasks", None);
    assert_eq!((status, &page["total"]), (200, &json!(1)), "{page}");
    let (status, metrics) = request_text(api, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("propeller_manager_store_ready{type=\"postgres\"} 0"),
        "{metrics}"
    );
    // Back: the manager resumes, and every task it acknowledged is stored.
    pg.resume();
    store_state(api, "ready", Duration::from_secs(20), output);
    let (status, second) = request(api, "POST", "/tasks", Some(&add_task()));
    assert_eq!(status, 201, "{second}");
    manager.signal("KILL");
    manager.wait(Duration::from_secs(10));
    let log = manager.output();
    assert!(log.contains("store unavailable"), "{log}");
    assert!(
        !log.contains(&pg.password),
        "the password is logged:\n{log}"
    );
    let (again, api) = start_manager(&lab, MANAGER, &settings, dir.path());
    store_state(api, "ready", Duration::from_secs(10), || again.output());
    for task in [&first, &second] {
        let (status, back) = request(
            api,
            "GET",
            &format!("/tasks/{}", task["id"].as_str().unwrap()),
            None,
        );
        assert_eq!(status, 200, "{back}");
    }
    // A wrong password is retried like an outage, and named without the
    // password.
    let mut wrong = settings.clone();
    wrong.push(("POSTGRES_PASS".into(), "not-the-password".into()));
    let (turned_away, api) = start_manager(&lab, UPSTREAM, &wrong, dir.path());
    let health = store_state(api, "retrying", Duration::from_secs(10), || {
        turned_away.output()
    });
    assert!(
        health["store"]["failure"]
            .as_str()
            .unwrap()
            .contains("password authentication failed"),
        "{health}"
    );
    assert!(!turned_away.output().contains("not-the-password"));
}

/// A proplet played by the test: it announces itself, heartbeats when told,
/// and reports results when told, at QoS 2 as upstream's does.
struct FakeProplet {
    mqtt: Mqtt,
}

impl FakeProplet {
    const ID: &str = "fake-proplet";

    /// Connects, and announces itself until the manager on `api` lists it
    /// alive: the manager may not have subscribed yet when it first does.
    fn start(lab: &Lab, api: u16) -> FakeProplet {
        let mut mqtt = lab.client(Self::ID);
        mqtt.subscribe(&format!("{TOPIC}/manager/start"));
        let proplet = FakeProplet { mqtt };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            proplet.mqtt.publish(
                &format!("{TOPIC}/proplet/create"),
                &json!({"proplet_id": Self::ID, "namespace": "default"}).to_string(),
            );
            proplet.heartbeat();
            let listed = Instant::now() + Duration::from_secs(1);
            while Instant::now() < listed {
                if is_listed(api, Self::ID, true) {
                    return proplet;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(
                Instant::now() < deadline,
                "the manager did not list {} alive within 20 s",
                Self::ID
            );
        }
    }

    fn heartbeat(&self) {
        self.mqtt.publish(
            &format!("{TOPIC}/proplet/alive"),
            &json!({"proplet_id": Self::ID, "status": "alive", "namespace": "default"}).to_string(),
        );
    }

    /// Waits for the start of task `id`.
    fn started(&mut self, id: &str, logs: impl Fn() -> String) {
        self.mqtt
            .wait_for("the start", Duration::from_secs(10), logs, |m| {
                m.json()["id"] == id
            });
    }

    fn result(&self, id: &str) {
        self.mqtt.publish(
            &format!("{TOPIC}/proplet/results"),
            &json!({"task_id": id, "proplet_id": Self::ID, "results": "7"}).to_string(),
        );
    }
}

#[test]
fn a_result_sent_while_the_manager_is_down_is_lost_by_the_broker() {
    if !servers_available("a_result_sent_while_the_manager_is_down_is_lost_by_the_broker") {
        return;
    }
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    // Ten-second heartbeats: the fake proplet stays alive through the test.
    let settings = pairs(&[("STORAGE_TYPE", "sqlite"), ("LIVELINESS_INTERVAL", "10s")]);
    let (mut first, api) = start_manager(&lab, MANAGER, &settings, dir.path());
    let mut proplet = FakeProplet::start(&lab, api);
    let task = json!({"name": "add", "inputs": [3, 4], "image_url": "add.wasm", "proplet_id": FakeProplet::ID});
    let id = start_task(api, task);
    proplet.started(&id, || first.output());
    first.signal("KILL");
    first.wait(Duration::from_secs(10));
    // The result goes to the broker while no manager is subscribed: the
    // manager's session is clean, so the broker keeps nothing for it.
    proplet.result(&id);
    proplet.mqtt.listen(Duration::from_millis(500));
    let (again, api) = start_manager(&lab, MANAGER, &settings, dir.path());
    std::thread::sleep(Duration::from_secs(1));
    let (_, task) = request(api, "GET", &format!("/tasks/{id}"), None);
    assert_eq!(
        task["state"],
        RUNNING,
        "the result was lost: {task}\n{}",
        again.output()
    );
    // Still Running, and still the proplet's: a result sent now counts.
    proplet.heartbeat();
    proplet.result(&id);
    let task = finished_task(api, &id, Duration::from_secs(10));
    assert_eq!(
        (task["state"].as_u64(), &task["results"]),
        (Some(COMPLETED), &json!("7"))
    );
}

/// The counterpart with `MANAGER_MQTT_PERSISTENT_SESSION=true`: the broker
/// keeps the manager's session while it is down and queues the result, which
/// completes the task once the manager is back.
#[test]
fn a_result_sent_while_a_persistent_session_manager_is_down_completes_its_task() {
    if !servers_available(
        "a_result_sent_while_a_persistent_session_manager_is_down_completes_its_task",
    ) {
        return;
    }
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let settings = pairs(&[
        ("STORAGE_TYPE", "sqlite"),
        ("LIVELINESS_INTERVAL", "10s"),
        ("MQTT_PERSISTENT_SESSION", "true"),
        ("LOG_LEVEL", "debug"),
    ]);
    let (mut first, api) = start_manager(&lab, MANAGER, &settings, dir.path());
    let mut proplet = FakeProplet::start(&lab, api);
    // The fake proplet hears its own results: once it has, the broker has
    // queued them for every subscriber, the absent manager included.
    proplet.mqtt.subscribe(&format!("{TOPIC}/proplet/results"));
    proplet_listed(api, FakeProplet::ID, true, Duration::from_secs(10));
    let task = json!({"name": "add", "inputs": [3, 4], "image_url": "add.wasm", "proplet_id": FakeProplet::ID});
    let id = start_task(api, task);
    proplet.started(&id, || first.output());
    first.signal("KILL");
    first.wait(Duration::from_secs(10));
    proplet.result(&id);
    proplet.mqtt.wait_for(
        "our own result",
        Duration::from_secs(10),
        String::new,
        |m| m.topic.ends_with("/results") && m.json()["task_id"] == id,
    );
    let began = Instant::now();
    let (again, api) = start_manager(&lab, MANAGER, &settings, dir.path());
    let connected = again.wait_for(CONNECTED, Duration::from_secs(10));
    assert!(connected.contains("session_present=true"), "{connected}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let task = loop {
        let (_, task) = request(api, "GET", &format!("/tasks/{id}"), None);
        if task["state"].as_u64() != Some(RUNNING) {
            break task;
        }
        assert!(
            Instant::now() < deadline,
            "the queued result did not come within 10 s: {task}\n{}",
            logs(&[("first", &first), ("again", &again)])
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        (task["state"].as_u64(), &task["results"]),
        (Some(COMPLETED), &json!("7")),
        "{}",
        again.output()
    );
    println!(
        "the queued result completed its task {:?} after the manager was started again",
        began.elapsed()
    );
    // The connection's figures are served next to the store's.
    let (status, metrics) = request_text(api, "/metrics");
    assert_eq!(status, 200);
    for series in [
        "propeller_manager_mqtt_reconnects_total 0\n",
        "propeller_manager_mqtt_last_failure{class=\"none\"} 1\n",
        "propeller_manager_mqtt_outbox_messages ",
    ] {
        assert!(metrics.contains(series), "{series}: {metrics}");
    }
}

#[test]
fn two_managers_on_one_postgres_one_active_one_standby() {
    let test = "two_managers_on_one_postgres_one_active_one_standby";
    let Some(bin) = postgres::available_with_servers(test) else {
        return;
    };
    let pg = Postgres::start(&bin);
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = pg.settings();
    settings.push(("LIVELINESS_INTERVAL".into(), "10s".into()));
    let (mut active, api_a) = start_manager(&lab, MANAGER, &settings, dir.path());
    store_state(api_a, "ready", Duration::from_secs(10), || active.output());
    let (standby, api_b) = start_manager(&lab, UPSTREAM, &settings, dir.path());
    let health = store_state(api_b, "standby", Duration::from_secs(10), || {
        logs(&[("active", &active), ("standby", &standby)])
    });
    assert_eq!(health["store"]["holder"], client_id("manager"), "{health}");
    let (status, answer) = request(api_b, "POST", "/tasks", Some(&add_task()));
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("standby"),
        "{answer}"
    );
    let (status, _) = request(api_b, "GET", "/tasks", None);
    assert_eq!(status, 503);
    // The active one works; the standby writes nothing.
    let mut proplet = FakeProplet::start(&lab, api_a);
    let task = json!({"name": "add", "inputs": [3, 4], "image_url": "add.wasm", "proplet_id": FakeProplet::ID});
    let done = start_task(api_a, task.clone());
    proplet.started(&done, || active.output());
    proplet.result(&done);
    finished_task(api_a, &done, Duration::from_secs(10));
    let running = start_task(api_a, task);
    proplet.started(&running, || active.output());
    // The active one dies; its result arrives before the standby takes
    // over, and is not lost: the standby heard it.
    active.signal("KILL");
    active.wait(Duration::from_secs(10));
    proplet.result(&running);
    store_state(api_b, "ready", Duration::from_secs(10), || standby.output());
    for id in [&done, &running] {
        let task = finished_task(api_b, id, Duration::from_secs(10));
        assert_eq!(
            (task["state"].as_u64(), &task["results"]),
            (Some(COMPLETED), &json!("7")),
            "{task}"
        );
    }
    proplet_listed(api_b, FakeProplet::ID, false, Duration::from_secs(5));
    assert_eq!(
        pg.sql(postgres::DATABASE, "SELECT epoch, holder FROM store_owner"),
        format!("2|{}", client_id("upstream"))
    );
    // The first manager comes back as the standby.
    let (back, api_a) = start_manager(&lab, MANAGER, &settings, dir.path());
    let health = store_state(api_a, "standby", Duration::from_secs(10), || back.output());
    assert_eq!(health["store"]["holder"], client_id("upstream"), "{health}");
}

/// `settings` and then `tls` (names after `MANAGER_`).
fn with_tls(settings: &[(String, String)], tls: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut all = settings.to_vec();
    all.extend(pairs(tls));
    all
}

/// Waits until the store is retrying with a failure that contains every
/// one of `words`; returns the failure.
fn retrying_with(api: u16, words: &[&str], timeout: Duration, logs: impl Fn() -> String) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, health) = request(api, "GET", "/health", None);
        assert_eq!(status, 200, "{health}");
        let failure = health["store"]["failure"].as_str().unwrap_or_default();
        if health["store"]["state"] == "retrying" && words.iter().all(|w| failure.contains(w)) {
            return failure.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "store not retrying for {words:?} within {timeout:?}: {health}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn postgres_over_tls_verify_full_keeps_tasks_and_names_an_untrusted_ca() {
    let test = "postgres_over_tls_verify_full_keeps_tasks_and_names_an_untrusted_ca";
    let Some(bin) = postgres::available_with_servers(test) else {
        return;
    };
    let pki = Pki::shared();
    let pg = Postgres::start(&bin);
    pg.enable_ssl(pki);
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    let ca = pki.path("ca.crt").display().to_string();
    let manager_id = pki.identity("manager");
    let (cert, key) = (
        manager_id.cert.display().to_string(),
        manager_id.key.display().to_string(),
    );
    // verify-full against 127.0.0.1 (an IP SAN of server.crt), with a client
    // certificate the server checks against the same CA.
    let settings = with_tls(
        &pg.settings(),
        &[
            ("POSTGRES_SSLMODE", "verify-full"),
            ("POSTGRES_SSLROOTCERT", &ca),
            ("POSTGRES_SSLCERT", &cert),
            ("POSTGRES_SSLKEY", &key),
        ],
    );
    let restarted = kill_and_restart(&lab, &settings, dir.path(), true);
    assert_kept(&restarted);
    // The manager's session is TLS, with our client certificate, and
    // authenticated with channel binding (SCRAM-SHA-256-PLUS needs it).
    let session = pg.sql(
        "postgres",
        "SELECT s.ssl, s.client_dn IS NOT NULL FROM pg_stat_ssl s \
         JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'propeller-manager'",
    );
    assert_eq!(session, "t|t", "{}", restarted.manager.output());
    assert!(
        !restarted.manager.output().contains(&pg.password),
        "the password is logged"
    );
    // A CA that did not sign the server's certificate: retried, named.
    let other = pki.path("other-ca.crt").display().to_string();
    let wrong = with_tls(
        &pg.settings(),
        &[
            ("POSTGRES_SSLMODE", "verify-full"),
            ("POSTGRES_SSLROOTCERT", &other),
        ],
    );
    let (untrusting, api) = start_manager(&lab, UPSTREAM, &wrong, dir.path());
    let failure = retrying_with(
        api,
        &["certificate", "not signed by", &other],
        Duration::from_secs(20),
        || untrusting.output(),
    );
    println!("untrusted CA: {failure}");
    assert!(failure.contains("UnknownIssuer"), "{failure}");
    let (status, answer) = request(api, "POST", "/tasks", Some(&add_task()));
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("certificate"),
        "{answer}"
    );
    let log = untrusting.output();
    assert!(
        log.contains("store unavailable") && log.contains("not signed by"),
        "{log}"
    );
}

#[test]
fn postgres_tls_refusals_say_what_to_fix() {
    let test = "postgres_tls_refusals_say_what_to_fix";
    let Some(bin) = postgres::available_with_servers(test) else {
        return;
    };
    let pg = Postgres::start(&bin);
    let lab = Lab::start();
    let dir = tempfile::tempdir().unwrap();
    // require against a server with ssl = off.
    let require = with_tls(&pg.settings(), &[("POSTGRES_SSLMODE", "require")]);
    let (requiring, api_r) = start_manager(&lab, MANAGER, &require, dir.path());
    let failure = retrying_with(
        api_r,
        &[
            "server does not support TLS",
            "ssl = off",
            "SSLMODE=require",
        ],
        Duration::from_secs(20),
        || requiring.output(),
    );
    println!("require, ssl = off: {failure}");
    // The server gets TLS and takes TCP only over it: plain is refused...
    pg.enable_ssl(Pki::shared());
    pg.hostssl_only();
    let (plain, api_p) = start_manager(&lab, UPSTREAM, &pg.settings(), dir.path());
    let failure = retrying_with(
        api_p,
        &["no pg_hba.conf entry", "only over TLS", "SSLMODE=disable"],
        Duration::from_secs(20),
        || plain.output(),
    );
    println!("disable, hostssl only: {failure}");
    assert_eq!(failure.lines().count(), 1, "{failure}");
    let (status, answer) = request(api_p, "GET", "/tasks", None);
    assert_eq!(status, 503, "{answer}");
    // ...and require, which checks no certificate without a CA, gets in.
    store_state(api_r, "ready", Duration::from_secs(30), || {
        requiring.output()
    });
    let (status, task) = request(api_r, "POST", "/tasks", Some(&add_task()));
    assert_eq!(status, 201, "{task}");
}
