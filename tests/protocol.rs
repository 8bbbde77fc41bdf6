//! The three services together, as separate processes, speaking Propeller's
//! protocol end to end in each mode: plain MQTT to mosquitto, MQTTS through
//! the nginx edge (AUTH=key), and mTLS through the edge with its CN check
//! (AUTH=x509).
//!
//! Each run shows the manager discover the proplet, then see it alive; a task
//! whose module (1.6 MB, 4 chunks) crosses the proxy and returns "7" for
//! add(3, 4); a trapping module reported as an error; and the proplet's
//! SIGKILL reported by its last will within 2 seconds.
//!
//! The API is upstream's: tasks are created (state 0, Pending), then
//! started; they end Completed (3), Failed (4) or Interrupted (6).

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use propeller_tests::http::{
    api_port, finished_task, request, start_task, COMPLETED, FAILED, INTERRUPTED,
};
use propeller_tests::modules;
use propeller_tests::{
    servers_available, Edge, Env, FileServer, Identity, Mosquitto, Pki, ServiceProcess,
};
use serde_json::json;

/// Bytes of padding the served add module carries, so that it takes 4
/// chunks of 512000.
const PADDING: usize = 1_600_000;

#[derive(Clone, Copy, Debug)]
enum Mode {
    Plain,
    /// MQTTS through the edge with AUTH=key.
    Tls,
    /// mTLS through the edge with AUTH=x509.
    Mtls,
}

/// The three services and what they talk to.
struct Deployment {
    manager: ServiceProcess,
    proplet: ServiceProcess,
    proxy: ServiceProcess,
    api: u16,
    proplet_env: Env,
    _modules: tempfile::TempDir,
    _edge: Option<Edge>,
    _broker: Mosquitto,
}

fn deploy(mode: Mode) -> Deployment {
    deploy_with(mode, |_, _| {})
}

/// A deployment whose proxy env `proxy` may change; it reads the module
/// directory by default.
fn deploy_with(mode: Mode, proxy: impl FnOnce(&mut Env, &Path)) -> Deployment {
    let pki = Pki::shared();
    let ids: Vec<Identity> = ["manager", "proplet", "proxy"]
        .iter()
        .map(|name| pki.identity(name))
        .collect();
    let broker = Mosquitto::for_clients(pki, &ids.iter().collect::<Vec<_>>());
    let edge = match mode {
        Mode::Plain => None,
        Mode::Tls => Some(Edge::start_key(pki, broker.plain, "server")),
        Mode::Mtls => Some(Edge::start(pki, broker.plain, "server", "ca.crt")),
    };
    let modules = tempfile::tempdir().unwrap();
    std::fs::write(
        modules.path().join("add.wasm"),
        modules::padded(modules::add(), PADDING),
    )
    .unwrap();
    std::fs::write(modules.path().join("divide.wasm"), modules::divide()).unwrap();
    let env = |prefix: &str, identity: &Identity| {
        let mut env = Env::new(prefix, identity);
        match (mode, &edge) {
            (Mode::Plain, _) => env.plain(broker.plain),
            (Mode::Tls, Some(edge)) => env.tls(edge.port, pki),
            (Mode::Mtls, Some(edge)) => env.mtls(edge.port, pki, identity),
            _ => unreachable!(),
        };
        env
    };
    let mut proxy_env = env("PROXY", &ids[2]);
    proxy_env.path("MODULES_DIR", modules.path());
    proxy(&mut proxy_env, modules.path());
    let proxy = ServiceProcess::start("proxy", &proxy_env.vars);
    let mut manager_env = env("MANAGER", &ids[0]);
    manager_env.set("LIVELINESS_INTERVAL", "1s");
    let manager = ServiceProcess::start("manager", &manager_env.vars);
    let api = api_port(&manager.wait_for("HTTP API listening", Duration::from_secs(20)));
    manager.wait_for("MQTT connection established", Duration::from_secs(20));
    proxy.wait_for("MQTT connection established", Duration::from_secs(20));
    let mut proplet_env = env("PROPLET", &ids[1]);
    proplet_env.set("LIVELINESS_INTERVAL", "1s");
    let proplet = ServiceProcess::start("proplet", &proplet_env.vars);
    Deployment {
        manager,
        proplet,
        proxy,
        api,
        proplet_env,
        _modules: modules,
        _edge: edge,
        _broker: broker,
    }
}

fn services_work_together(test: &str, mode: Mode) {
    if !servers_available(test) {
        return;
    }
    let deployment = deploy(mode);
    let (manager, api) = (&deployment.manager, deployment.api);

    // Discovered, then alive: each logged once.
    let discovered = manager.wait_for("proplet discovered", Duration::from_secs(20));
    assert!(discovered.contains("proplet-client"), "{discovered}");
    manager.wait_for("proplet alive", Duration::from_secs(20));
    let log = manager.output();
    assert!(
        log.find("proplet discovered") < log.find("proplet alive"),
        "{log}"
    );
    let (_, proplets) = request(api, "GET", "/proplets", None);
    assert_eq!(
        proplets["proplets"][0]["id"], "proplet-client",
        "{proplets}"
    );
    assert_eq!(proplets["proplets"][0]["alive"], true, "{proplets}");
    assert_eq!(
        proplets["proplets"][0]["metadata"]["wasm_runtime"], "wasmi",
        "{proplets}"
    );
    let (status, health) = request(api, "GET", "/health", None);
    assert_eq!(
        (status, &health["mqtt"]["state"]),
        (200, &json!("connected")),
        "{health}"
    );

    // A module fetched through the proxy, in 4 chunks.
    let id = start_task(
        api,
        json!({"name": "add", "inputs": [3, 4], "image_url": "registry.example/acme/add:v1"}),
    );
    let task = finished_task(api, &id, Duration::from_secs(60));
    assert_eq!(task["state"], COMPLETED, "{task}");
    assert_eq!(task["results"], "7", "{task}");
    assert_eq!(task["proplet_id"], "proplet-client", "{task}");
    let sent = deployment
        .proxy
        .wait_for("module sent", Duration::from_secs(5));
    assert!(sent.contains("chunks=4"), "{sent}");
    let received = deployment
        .proplet
        .wait_for("module received", Duration::from_secs(5));
    let size = std::fs::metadata(deployment._modules.path().join("add.wasm"))
        .unwrap()
        .len();
    assert!(received.contains(&format!("bytes={size}")), "{received}");

    // A trap is the task's error, and the proplet carries on.
    let id = start_task(
        api,
        json!({"name": "divide", "inputs": [1, 0], "image_url": "divide.wasm"}),
    );
    let task = finished_task(api, &id, Duration::from_secs(30));
    assert_eq!(task["state"], FAILED, "{task}");
    let error = task["error"].as_str().unwrap();
    assert!(
        error.contains("trapped") && error.contains("divi"),
        "{error}"
    );

    // SIGKILL: no DISCONNECT, so the broker publishes the will.
    let mut deployment = deployment;
    deployment.proplet.signal("KILL");
    let killed = Instant::now();
    deployment
        .manager
        .wait_for("last will", Duration::from_secs(5));
    // The wait above only guards against a hang; the figure is printed.
    let took = killed.elapsed();
    let (_, proplets) = request(api, "GET", "/proplets", None);
    assert_eq!(proplets["proplets"][0]["alive"], false, "{proplets}");
    println!("{mode:?}: offline {took:?} after SIGKILL; module of {size} bytes in 4 chunks");

    // A restarted proplet announces itself again.
    deployment.proplet = ServiceProcess::start("proplet", &deployment.proplet_env.vars);
    deployment
        .manager
        .wait_for_count("proplet alive", 2, Duration::from_secs(20));
}

#[test]
fn services_work_together_over_plain_mqtt() {
    services_work_together("services_work_together_over_plain_mqtt", Mode::Plain);
}

#[test]
fn services_work_together_over_mqtts_through_the_edge() {
    services_work_together(
        "services_work_together_over_mqtts_through_the_edge",
        Mode::Tls,
    );
}

#[test]
fn services_work_together_over_mtls_through_the_edge() {
    services_work_together(
        "services_work_together_over_mtls_through_the_edge",
        Mode::Mtls,
    );
}

/// Inline modules, a module the proxy lacks, a stop, and the API's refusals.
#[test]
fn tasks_fail_and_stop_cleanly() {
    if !servers_available("tasks_fail_and_stop_cleanly") {
        return;
    }
    let deployment = deploy(Mode::Plain);
    let api = deployment.api;
    deployment
        .manager
        .wait_for("proplet alive", Duration::from_secs(20));
    let encode = |module: &[u8]| base64::engine::general_purpose::STANDARD.encode(module);

    // An unknown module ends the proplet's wait at once, not after 60 s.
    let started = Instant::now();
    let id = start_task(
        api,
        json!({"name": "add", "inputs": [1, 2], "image_url": "missing:v1"}),
    );
    let task = finished_task(api, &id, Duration::from_secs(20));
    assert_eq!(task["state"], FAILED, "{task}");
    let error = task["error"].as_str().unwrap();
    assert!(error.contains("has no module missing.wasm"), "{task}");
    // The channel is told no local path.
    let dir = deployment._modules.path().display().to_string();
    assert!(!error.contains(&dir), "{error}");
    // That error comes from the proxy's answer, not from the proplet's 60 s
    // wait running out (whose error says "did not arrive").
    println!("the unknown module failed after {:?}", started.elapsed());
    deployment
        .proxy
        .wait_for("cannot serve the module", Duration::from_secs(5));

    // An inline module that never returns, stopped through the API.
    let id = start_task(
        api,
        json!({"name": "spin", "file": encode(&modules::spin())}),
    );
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = request(api, "POST", &format!("/tasks/{id}/stop"), None);
    assert_eq!((status, &body), (200, &json!({"stopped": true})));
    let task = finished_task(api, &id, Duration::from_secs(10));
    assert_eq!(task["state"], INTERRUPTED, "{task}");
    assert_eq!(task["error"], "stopped on request", "{task}");
    deployment
        .proplet
        .wait_for("stopped by the manager", Duration::from_secs(10));

    // Inline and fine.
    let add = wat::parse_str(r#"(module (func (export "add") (param i64 i64) (result i64) local.get 0 local.get 1 i64.add))"#).unwrap();
    let id = start_task(
        api,
        json!({"name": "add", "inputs": [40, 2], "file": encode(&add)}),
    );
    assert_eq!(
        finished_task(api, &id, Duration::from_secs(10))["results"],
        "42"
    );

    // Refusals name the problem, at creation or at start.
    for (body, status, needle) in [
        (
            json!({"name": "add", "file": "%%%"}),
            400,
            "not valid base64",
        ),
        (json!({"name": "add", "inputs": [[1]]}), 400, "inputs[0]"),
        (json!({"nam": "add"}), 400, "name is empty"),
    ] {
        let (got, answer) = request(api, "POST", "/tasks", Some(&body));
        assert_eq!(got, status, "{body} -> {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(needle),
            "{answer}"
        );
    }
    for (body, status, needle) in [
        (json!({"name": "add"}), 400, "has no module"),
        (
            json!({"name": "add", "image_url": "a", "proplet_id": "nobody"}),
            404,
            "no proplet nobody",
        ),
    ] {
        let (_, created) = request(api, "POST", "/tasks", Some(&body));
        let id = created["id"].as_str().unwrap();
        let (got, answer) = request(api, "POST", &format!("/tasks/{id}/start"), None);
        assert_eq!(got, status, "{body} -> {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(needle),
            "{answer}"
        );
        let (got, _) = request(api, "DELETE", &format!("/tasks/{id}"), None);
        assert_eq!(got, 204);
    }
    let (status, _) = request(api, "GET", "/tasks/none", None);
    assert_eq!(status, 404);
    let (status, _) = request(api, "DELETE", "/proplets", None);
    assert_eq!(status, 405);
}

/// `PROXY_MODULES_URL` over HTTPS, verified with `PROXY_MODULES_CA_CERT`;
/// with the wrong CA the download fails, and the task says why.
#[test]
fn the_proxy_downloads_modules_over_https() {
    if !servers_available("the_proxy_downloads_modules_over_https") {
        return;
    }
    let pki = Pki::shared();
    let files = tempfile::tempdir().unwrap();
    std::fs::write(
        files.path().join("add.wasm"),
        modules::padded(modules::add(), PADDING),
    )
    .unwrap();
    let server = FileServer::start_https(pki, files.path());
    for (ca, expect_results) in [("ca.crt", true), ("other-ca.crt", false)] {
        let deployment = deploy_with(Mode::Plain, |env, _| {
            env.vars.retain(|(name, _)| name != "PROXY_MODULES_DIR");
            env.set(
                "MODULES_URL",
                &format!("https://127.0.0.1:{}/mods", server.port),
            )
            .path("MODULES_CA_CERT", &pki.path(ca));
        });
        deployment
            .manager
            .wait_for("proplet alive", Duration::from_secs(20));
        let id = start_task(
            deployment.api,
            json!({"name": "add", "inputs": [3, 4], "image_url": "ghcr.io/acme/add:v1"}),
        );
        let task = finished_task(deployment.api, &id, Duration::from_secs(60));
        if expect_results {
            assert_eq!(task["results"], "7", "{task}");
            let sent = deployment
                .proxy
                .wait_for("module sent", Duration::from_secs(5));
            assert!(sent.contains("chunks=4"), "{sent}");
        } else {
            assert_eq!(task["state"], FAILED, "{task}");
            let error = task["error"].as_str().unwrap();
            assert!(error.contains("cannot serve module add.wasm"), "{error}");
            // The why, with the URL, stays in the proxy's log.
            let why = deployment
                .proxy
                .wait_for("TLS handshake failed", Duration::from_secs(5));
            assert!(why.contains("GET https://127.0.0.1:"), "{why}");
        }
    }
}

/// Upstream's workloads are WASI commands: one runs with its `cli_args` and
/// `env`, and its stdout is the result. The module arrives by upstream's
/// upload route, as multipart form data.
#[test]
fn a_wasi_command_runs_with_its_arguments_and_environment() {
    if !servers_available("a_wasi_command_runs_with_its_arguments_and_environment") {
        return;
    }
    let deployment = deploy(Mode::Plain);
    let api = deployment.api;
    deployment
        .manager
        .wait_for("proplet alive", Duration::from_secs(20));
    let (status, created) = request(
        api,
        "POST",
        "/tasks",
        Some(&json!({"name": "_start", "cli_args": ["hello", "world"], "env": {"GREETING": "hi"}})),
    );
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let (status, uploaded) = propeller_tests::http::upload(
        api,
        &format!("/tasks/{id}/upload"),
        "echo.wasm",
        &modules::wasi_echo(),
    );
    assert_eq!(status, 200, "{uploaded}");
    assert!(
        uploaded["file"].as_str().unwrap().contains("<REDACTED>"),
        "{uploaded}"
    );
    let (status, started) = request(api, "POST", &format!("/tasks/{id}/start"), None);
    assert_eq!(status, 200, "{started}");
    let task = finished_task(api, id, Duration::from_secs(30));
    assert_eq!(task["state"], COMPLETED, "{task}");
    let output = task["results"].as_str().unwrap();
    let words: Vec<&str> = output.split_whitespace().collect();
    // The task's cli_args after the program's name, then its environment.
    assert_eq!(words[..2], ["hello", "world"], "{output}");
    assert!(words.contains(&"GREETING=hi"), "{output}");
    assert!(words.contains(&"PROPLET_ID=proplet-client"), "{output}");
    let (status, results) = request(api, "GET", &format!("/tasks/{id}/results"), None);
    assert_eq!((status, &results["results"]), (200, &json!(output)));

    // A non-module upload is refused, naming why.
    let (status, refused) =
        propeller_tests::http::upload(api, &format!("/tasks/{id}/upload"), "echo.txt", b"hi");
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains(".wasm"),
        "{refused}"
    );
}
