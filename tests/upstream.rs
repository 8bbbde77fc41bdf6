//! Interoperation with upstream Propeller v0.5.0, in both directions, on a
//! real mosquitto (plain MQTT on loopback):
//!
//! - upstream's Go SDK (`pkg/sdk`, what `propeller-cli` uses) drives our
//!   manager, which runs the task on our proplet through our proxy;
//! - our proplet runs the starts upstream's Go manager publishes
//!   (`startPayload` as Go's encoding/json writes it: `cli_args: null`,
//!   inputs as strings) and answers with upstream's `ResultMessage`;
//! - our proxy answers an upstream proplet's module request with chunks an
//!   upstream proplet decodes, and nothing it would choke on;
//! - our manager drives a proplet that speaks as upstream's Rust proplet does,
//!   and publishes starts that decode as that proplet's `StartRequest`.
//!
//! The upstream side is played from the sources in
//! `../shared/upstream/propeller-v0.5.0/` (the SDK test builds upstream's
//! `pkg/sdk` with Debian's `golang-go` in GOPATH mode); the messages the other
//! tests publish are written here exactly as upstream serialises them.
//!
//! Needs the servers of the other end-to-end tests, and `go` for the SDK test
//! (`apt-get install -y golang-go`). Without them a test says it was skipped;
//! under CI (`CI` set) that is a failure.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use propeller_tests::http::request;
use propeller_tests::lab::{logs, Lab, Message, Mqtt};
use propeller_tests::{modules, servers_available};
use rumqttc::QoS;
use serde_json::{json, Value};

/// The channel base, `m/<domain>/c/<channel>`.
const BASE: &str = "m/dom/c/chan";
const START: &str = "m/dom/c/chan/control/manager/start";
const CREATE: &str = "m/dom/c/chan/control/proplet/create";
const ALIVE: &str = "m/dom/c/chan/control/proplet/alive";
const METRICS: &str = "m/dom/c/chan/control/proplet/metrics";
const RESULTS: &str = "m/dom/c/chan/control/proplet/results";
const REGISTRY_REQUEST: &str = "m/dom/c/chan/registry/proplet";
const REGISTRY_CHUNK: &str = "m/dom/c/chan/registry/server";
const REGISTRY_ERROR: &str = "m/dom/c/chan/registry/error";

/// Bytes of padding in the served `add.wasm`, so that it takes 3 chunks of
/// upstream's 512000.
const PADDING: usize = 1_200_000;

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The lab, with the modules these tests serve.
fn upstream_lab() -> Lab {
    let lab = Lab::start();
    std::fs::write(
        lab.modules.path().join("add.wasm"),
        modules::padded(modules::add(), PADDING),
    )
    .unwrap();
    std::fs::write(lab.modules.path().join("divide.wasm"), modules::divide()).unwrap();
    lab
}

/// `{"k":v,…}` with the keys in the given order, as Go's encoding/json and
/// serde write struct fields.
fn ordered(fields: &[(&str, Value)]) -> String {
    let body: Vec<String> = fields
        .iter()
        .map(|(key, value)| format!("{}:{}", json!(key), value))
        .collect();
    format!("{{{}}}", body.join(","))
}

// ---------------------------------------------------------------------------
// JSON checks

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not a JSON object: {value}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// What Go's `time.Parse(time.RFC3339Nano, …)` takes, roughly.
fn is_rfc3339(value: &Value) -> bool {
    let Some(text) = value.as_str() else {
        return false;
    };
    let b = text.as_bytes();
    b.len() >= 20
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && (text.ends_with('Z') || matches!(b[b.len() - 6], b'+' | b'-'))
}

/// A result message as upstream's `ResultMessage` (proplet/src/types.rs):
/// exactly `task_id`, `proplet_id`, `results` (a string) and `error`.
fn assert_upstream_result(result: &Value, task_id: &str, proplet_id: &str) {
    let mut got = keys(result);
    got.remove("error");
    assert_eq!(
        got,
        set(&["task_id", "proplet_id", "results"]),
        "result keys: {result}"
    );
    assert_eq!(result["task_id"], task_id, "{result}");
    assert_eq!(result["proplet_id"], proplet_id, "{result}");
    assert!(
        result["results"].is_string(),
        "results must be a string (upstream's ResultMessage.results: String): {result}"
    );
    assert!(
        result["error"].is_null() || result["error"].is_string(),
        "error must be null or a string: {result}"
    );
}

/// A start as upstream's Rust proplet decodes it (`StartRequest` in
/// proplet/src/types.rs): every field it declares has the type it declares.
fn assert_upstream_start_request(start: &Value, task_id: &str, proplet_id: &str) {
    let opt = |field: &str, ok: fn(&Value) -> bool| {
        let value = &start[field];
        assert!(
            value.is_null() || ok(value),
            "{field} has the wrong type for StartRequest: {start}"
        );
    };
    assert_eq!(start["id"], task_id, "id: {start}");
    assert!(start["name"].is_string(), "name must be a string: {start}");
    assert!(
        start["state"].as_u64().is_some_and(|s| s <= 255),
        "state must be a u8 number: {start}"
    );
    assert!(
        start["cli_args"]
            .as_array()
            .is_some_and(|args| args.iter().all(Value::is_string)),
        "cli_args must be an array of strings: {start}"
    );
    assert_eq!(
        start["inputs"],
        json!(["3", "4"]),
        "inputs must be strings (StartRequest.inputs: Vec<String>): {start}"
    );
    assert_eq!(start["proplet_id"], proplet_id, "proplet_id: {start}");
    opt("file", Value::is_string);
    opt("image_url", Value::is_string);
    let non_empty = |field: &str| start[field].as_str().is_some_and(|s| !s.is_empty());
    assert!(
        non_empty("file") || non_empty("image_url"),
        "StartRequest::validate wants file or image_url: {start}"
    );
    // `#[serde(default)] bool`: absent is fine, null is not.
    for field in ["daemon", "encrypted", "broadcast"] {
        assert!(
            start.get(field).is_none_or(Value::is_boolean),
            "{field} must be a bool when present: {start}"
        );
    }
    opt("env", |env| {
        env.as_object()
            .is_some_and(|map| map.values().all(Value::is_string))
    });
    for field in ["kbs_resource_path", "mode", "hal_storage_path"] {
        opt(field, Value::is_string);
    }
    opt("monitoring_profile", |profile| {
        let bools = [
            "enabled",
            "collect_cpu",
            "collect_memory",
            "collect_disk_io",
            "collect_threads",
            "collect_file_descriptors",
            "export_to_mqtt",
            "retain_history",
        ];
        bools.iter().all(|f| profile[*f].is_boolean())
            && profile["interval"].is_u64()
            && profile["history_size"].is_u64()
    });
}

/// The status, `Content-Type` and body text of a request without a body.
fn http(port: u16, method: &str, path: &str) -> (u16, String, String) {
    propeller_tests::http::raw(port, method, path, "application/json", b"")
}

/// Polls `GET /tasks/{id}` until `done` holds.
fn wait_task(
    api: u16,
    id: &str,
    timeout: Duration,
    logs: impl Fn() -> String,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, task) = request(api, "GET", &format!("/tasks/{id}"), None);
        assert_eq!(status, 200, "GET /tasks/{id}: {task}");
        if done(&task) {
            return task;
        }
        assert!(
            Instant::now() < deadline,
            "task {id} not as expected within {timeout:?}: {task}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// Upstream's Go SDK

/// Where the upstream reference sources are: `<repo root>/../shared/…`.
fn upstream_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/upstream/propeller-v0.5.0")
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// Prints that `test` is skipped for want of `missing`, or panics under CI.
fn skip(test: &str, missing: &str) {
    propeller_tests::skips::skip(test, &format!("missing {missing}"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `tests/go/sdkdriver` built against upstream's `pkg/sdk` in a scratch GOPATH.
struct SdkDriver {
    binary: PathBuf,
    _gopath: tempfile::TempDir,
}

impl SdkDriver {
    /// Builds the driver; `None` (after saying why) without `go` or the
    /// upstream sources.
    fn build(test: &str) -> Option<SdkDriver> {
        let upstream = upstream_dir();
        let mut missing = Vec::new();
        if !on_path("go") {
            missing.push("go (install with: apt-get install -y golang-go)".to_owned());
        }
        if !upstream.join("pkg/sdk/sdk.go").is_file() {
            missing.push(format!(
                "upstream Propeller v0.5.0 sources in {}",
                upstream.display()
            ));
        }
        if !missing.is_empty() {
            skip(test, &missing.join(", "));
            return None;
        }
        let gopath = tempfile::tempdir().unwrap();
        let pkg = gopath.path().join("src/github.com/absmach/propeller/pkg");
        for name in ["sdk", "task", "proplet", "sdf"] {
            copy_dir(&upstream.join("pkg").join(name), &pkg.join(name));
        }
        let driver = gopath.path().join("src/sdkdriver");
        std::fs::create_dir_all(&driver).unwrap();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("go/sdkdriver/main.go"),
            driver.join("main.go"),
        )
        .unwrap();
        // target/<profile>/deps/<test> -> target: the build cache survives runs.
        let exe = std::env::current_exe().unwrap();
        let cache = exe.ancestors().nth(3).unwrap().join("go-build-cache");
        let binary = gopath.path().join("bin/sdkdriver");
        let output = Command::new("go")
            .args(["build", "-o"])
            .arg(&binary)
            .arg("sdkdriver")
            .current_dir(gopath.path())
            .env("GO111MODULE", "off")
            .env("GOPATH", gopath.path())
            .env("GOCACHE", &cache)
            .env("GOFLAGS", "")
            // Pure Go: no C compiler needed, whatever the host has.
            .env("CGO_ENABLED", "0")
            .output()
            .expect("run go build");
        assert!(
            output.status.success(),
            "go build of tests/go/sdkdriver against upstream's pkg/sdk failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        Some(SdkDriver {
            binary,
            _gopath: gopath,
        })
    }

    /// Runs the driver (at most `timeout`): its exit success, stdout, stderr.
    fn run(&self, args: &[&str], timeout: Duration) -> (bool, String, String) {
        let mut command = propeller_tests::children::command(&self.binary);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = propeller_tests::children::spawn(command).expect("start the SDK driver");
        let read = |mut stream: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stream.read_to_string(&mut text);
                text
            })
        };
        let stdout = read(Box::new(child.stdout.take().unwrap()));
        let stderr = read(Box::new(child.stderr.take().unwrap()));
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let (stdout, mut stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
        if status.is_none() {
            stderr.push_str(&format!("\n(killed after {timeout:?})"));
        }
        (status.is_some_and(|s| s.success()), stdout, stderr)
    }
}

// ---------------------------------------------------------------------------
// The tests

/// Upstream's Go SDK, as propeller-cli uses it, against our manager, with our
/// proplet running the task and our proxy serving its module.
#[test]
fn upstream_sdk_drives_our_manager() {
    const TEST: &str = "upstream_sdk_drives_our_manager";
    if !servers_available(TEST) {
        return;
    }
    let Some(driver) = SdkDriver::build(TEST) else {
        return;
    };
    let lab = upstream_lab();
    let proxy = lab.proxy();
    let (manager, api) = lab.manager();
    let proplet = lab.proplet();
    let manager_url = format!("http://127.0.0.1:{api}");
    let (success, stdout, stderr) = driver.run(
        &[
            "-manager",
            &manager_url,
            "-image",
            "add.wasm",
            "-inputs",
            "3,4",
            "-name",
            "add",
            "-proplet-wait",
            "30s",
            "-task-wait",
            "60s",
        ],
        Duration::from_secs(150),
    );
    let services = [
        ("manager", &manager),
        ("proplet", &proplet),
        ("proxy", &proxy),
    ];
    let context = || {
        format!(
            "driver stdout:\n{stdout}\ndriver stderr:\n{stderr}\n{}",
            logs(&services)
        )
    };
    let steps: Vec<Value> = stdout
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("driver line {line:?} is not JSON: {e}\n{}", context()))
        })
        .collect();
    for step in &steps {
        assert_eq!(step["ok"], true, "step failed: {step}\n{}", context());
    }
    assert!(success, "the driver failed\n{}", context());
    let names: Vec<&str> = steps.iter().filter_map(|s| s["step"].as_str()).collect();
    assert_eq!(
        names,
        [
            "proplets",
            "create",
            "create_inputs",
            "start",
            "wait",
            "list",
            "delete",
            "get_deleted"
        ],
        "{}",
        context()
    );
    let wait = &steps[4];
    assert_eq!(wait["state"], 3, "final state: {wait}");
    assert_eq!(wait["state_name"], "Completed", "{wait}");
    assert_eq!(wait["results"], "7", "results: {wait}");
    println!("{}", stdout.trim_end());
}

/// What upstream's Go manager publishes on control/manager/start, run by our
/// proplet, which answers as upstream's Rust proplet does; its create, alive
/// and metrics as upstream's manager reads them.
#[test]
fn our_proplet_runs_an_upstream_managers_start() {
    const TEST: &str = "our_proplet_runs_an_upstream_managers_start";
    if !servers_available(TEST) {
        return;
    }
    let lab = upstream_lab();
    let proxy = lab.proxy();
    let mut mqtt = lab.client("upstream-manager");
    mqtt.subscribe(&format!("{BASE}/control/proplet/#"));
    mqtt.subscribe(REGISTRY_REQUEST);
    let proplet = lab.proplet();
    let services = [("proplet", &proplet), ("proxy", &proxy)];
    let logs = || logs(&services);
    let wait = Duration::from_secs(30);

    // Create: upstream's DiscoveryMessage.
    let create = mqtt
        .wait_for("create", wait, logs, |m| m.topic == CREATE)
        .json();
    let id = create["proplet_id"]
        .as_str()
        .unwrap_or_else(|| panic!("create without a proplet_id string: {create}"))
        .to_owned();
    assert!(!id.is_empty(), "{create}");
    assert_eq!(create["namespace"], "default", "create: {create}");
    let metadata = &create["metadata"];
    for field in [
        "environment",
        "os",
        "cpu_arch",
        "proplet_version",
        "wasm_runtime",
    ] {
        assert!(
            metadata[field].is_string(),
            "metadata.{field} must be a string: {create}"
        );
    }
    assert!(
        metadata["total_memory_bytes"].is_u64(),
        "metadata.total_memory_bytes must be a u64: {create}"
    );

    // Alive: upstream's LivelinessMessage, nothing more.
    let alive = mqtt
        .wait_for("alive", wait, logs, |m| {
            m.topic == ALIVE && m.json()["status"] == "alive"
        })
        .json();
    assert_eq!(
        alive,
        json!({"proplet_id": id, "status": "alive", "namespace": "default"}),
        "alive"
    );

    // Metrics, as upstream's manager parses them (handlePropletMetrics).
    let metrics = mqtt
        .wait_for("metrics", wait, logs, |m| m.topic == METRICS)
        .json();
    assert_eq!(metrics["proplet_id"], id.as_str(), "metrics: {metrics}");
    assert_eq!(metrics["namespace"], "default", "metrics: {metrics}");
    assert!(
        is_rfc3339(&metrics["timestamp"]),
        "metrics timestamp must be an RFC 3339 string (Go parses it with time.RFC3339Nano): {metrics}"
    );
    for field in ["user_seconds", "system_seconds", "percent"] {
        assert!(
            metrics["cpu_metrics"][field].is_number(),
            "cpu_metrics.{field}: {metrics}"
        );
    }
    for field in [
        "rss_bytes",
        "heap_alloc_bytes",
        "heap_sys_bytes",
        "heap_inuse_bytes",
    ] {
        assert!(
            metrics["memory_metrics"][field].is_u64(),
            "memory_metrics.{field}: {metrics}"
        );
    }

    // What Go's encoding/json makes of startPayload (manager/service.go):
    // fields in declaration order, `cli_args` a nil slice, so `null`.
    let start = |task: &str, name: &str, module: (&str, Value), inputs: Value, target: &str| {
        ordered(&[
            ("id", json!(task)),
            ("name", json!(name)),
            ("state", json!(0)),
            (module.0, module.1),
            ("inputs", inputs),
            ("cli_args", Value::Null),
            ("broadcast", json!(false)),
            ("daemon", json!(false)),
            ("encrypted", json!(false)),
            ("proplet_id", json!(target)),
        ])
    };
    let result_for = |mqtt: &mut Mqtt, task: &str| {
        mqtt.wait_for(&format!("result of {task}"), wait, logs, |m| {
            m.topic == RESULTS && m.json()["task_id"] == task
        })
        .json()
    };

    // Addressed to another proplet: ours must leave it alone.
    let foreign = "0a4c3c4e-0000-4000-8000-00000000f0e1";
    mqtt.publish(
        START,
        &start(
            foreign,
            "add",
            ("file", json!(base64(&modules::add()))),
            json!(["1", "1"]),
            "another-proplet",
        ),
    );

    // 1. The module inline (`file`, base64).
    let task = "0a4c3c4e-0000-4000-8000-000000000001";
    mqtt.publish(
        START,
        &start(
            task,
            "add",
            ("file", json!(base64(&modules::add()))),
            json!(["3", "4"]),
            &id,
        ),
    );
    let result = result_for(&mut mqtt, task);
    assert_upstream_result(&result, task, &id);
    assert_eq!(result["results"], "7", "add(3, 4) by file: {result}");
    assert!(result["error"].is_null(), "{result}");

    // 2. The module by `image_url`, through our proxy: the request is what
    // upstream's proxy reads ({"app_name": <image_url>}).
    let task = "0a4c3c4e-0000-4000-8000-000000000002";
    let image = "docker.io/acme/add:v1";
    mqtt.publish(
        START,
        &start(
            task,
            "add",
            ("image_url", json!(image)),
            json!(["3", "4"]),
            &id,
        ),
    );
    let result = result_for(&mut mqtt, task);
    assert_upstream_result(&result, task, &id);
    assert_eq!(result["results"], "7", "add(3, 4) by image_url: {result}");
    assert!(result["error"].is_null(), "{result}");
    let asked = mqtt
        .wait_for("module request", wait, logs, |m| {
            m.topic == REGISTRY_REQUEST
        })
        .json();
    assert_eq!(asked, json!({ "app_name": image }), "registry request");

    // 3. A trap: results "" and the error.
    let task = "0a4c3c4e-0000-4000-8000-000000000003";
    mqtt.publish(
        START,
        &start(
            task,
            "divide",
            ("file", json!(base64(&modules::divide()))),
            json!(["1", "0"]),
            &id,
        ),
    );
    let result = result_for(&mut mqtt, task);
    assert_upstream_result(&result, task, &id);
    assert_eq!(result["results"], "", "a trap's results: {result}");
    assert!(
        result["error"].as_str().is_some_and(|e| !e.is_empty()),
        "a trap's error: {result}"
    );

    // 4. Numbers as inputs (FlexStrings takes them), an env, a state other
    // than 0 and a monitoring_profile as Go marshals it (interval in ns).
    let task = "0a4c3c4e-0000-4000-8000-000000000004";
    let payload = ordered(&[
        ("id", json!(task)),
        ("name", json!("add")),
        ("state", json!(1)),
        ("file", json!(base64(&modules::add()))),
        ("inputs", json!([40, 2])),
        ("cli_args", json!(["--verbose"])),
        ("broadcast", json!(false)),
        ("daemon", json!(false)),
        ("env", json!({"GREETING": "hello"})),
        ("encrypted", json!(false)),
        (
            "monitoring_profile",
            json!({"enabled": true, "interval": 10_000_000_000u64, "collect_cpu": true,
                "collect_memory": true, "collect_disk_io": false, "collect_threads": false,
                "collect_file_descriptors": false, "export_to_mqtt": false,
                "retain_history": false, "history_size": 0}),
        ),
        ("proplet_id", json!(id)),
    ]);
    mqtt.publish(START, &payload);
    let result = result_for(&mut mqtt, task);
    assert_upstream_result(&result, task, &id);
    assert_eq!(result["results"], "42", "add(40, 2): {result}");

    // Nothing ever came back for the foreign task.
    mqtt.pump(Duration::from_millis(100));
    let stray: Vec<String> = mqtt
        .on(RESULTS)
        .iter()
        .filter(|m| m.json()["task_id"] == foreign)
        .map(Message::text)
        .collect();
    assert!(
        stray.is_empty(),
        "ran a start for another proplet: {stray:?}"
    );
}

/// An upstream proplet's module request, answered by our proxy with chunks
/// that decode as upstream's `Chunk` and nothing else; a module it lacks is
/// answered only on registry/error.
#[test]
fn our_proxy_serves_upstream_proplets() {
    const TEST: &str = "our_proxy_serves_upstream_proplets";
    if !servers_available(TEST) {
        return;
    }
    let lab = upstream_lab();
    let proxy = lab.proxy();
    let services = [("proxy", &proxy)];
    let logs = || logs(&services);
    let mut mqtt = lab.client("upstream-proplet");
    mqtt.subscribe(REGISTRY_CHUNK);
    mqtt.subscribe(REGISTRY_ERROR);
    let module = lab.module("add.wasm");

    for app in ["add.wasm", "ghcr.io/acme/add:v1"] {
        // What upstream's proplet publishes (request_binary_from_registry).
        mqtt.publish(REGISTRY_REQUEST, &ordered(&[("app_name", json!(app))]));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let chunks: Vec<Value> = mqtt
                .on(REGISTRY_CHUNK)
                .iter()
                .map(Message::json)
                .filter(|c| c["app_name"] == app)
                .collect();
            let total = chunks.first().and_then(|c| c["total_chunks"].as_u64());
            let indexes: BTreeSet<u64> = chunks
                .iter()
                .filter_map(|c| c["chunk_idx"].as_u64())
                .collect();
            if total.is_some_and(|total| total > 0 && indexes.len() as u64 >= total) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chunks of {app} incomplete within 30 s: total {total:?}, indexes {indexes:?}; on registry/server: {:?}\n{}",
                mqtt.on(REGISTRY_CHUNK).iter().map(Message::text).collect::<Vec<_>>(),
                logs()
            );
            mqtt.pump(Duration::from_millis(200));
        }
        // Late duplicates would show here.
        mqtt.listen(Duration::from_millis(300));

        let chunks: Vec<(Message, Value)> = mqtt
            .on(REGISTRY_CHUNK)
            .into_iter()
            .map(|m| {
                let json = m.json();
                (m, json)
            })
            .filter(|(_, c)| c["app_name"] == app)
            .collect();
        let total = chunks[0].1["total_chunks"].as_u64().unwrap();
        assert!(total >= 2, "{} bytes in {total} chunk(s)", module.len());
        let mut parts = vec![None; total as usize];
        for (message, chunk) in &chunks {
            assert_eq!(
                keys(chunk),
                set(&["app_name", "chunk_idx", "total_chunks", "data"]),
                "an upstream Chunk has exactly these fields: {}",
                message.text()
            );
            assert!(
                message.payload.len() <= 1 << 20,
                "a chunk message of {} bytes is over the 1 MiB broker limit upstream",
                message.payload.len()
            );
            assert_eq!(chunk["total_chunks"], total, "{}", message.text());
            let index = chunk["chunk_idx"]
                .as_u64()
                .unwrap_or_else(|| panic!("chunk_idx must be a usize: {}", message.text()));
            assert!(index < total, "{}", message.text());
            assert!(
                parts[index as usize].is_none(),
                "chunk {index} of {app} sent twice"
            );
            let data = chunk["data"]
                .as_str()
                .unwrap_or_else(|| panic!("data must be a base64 string: {}", message.text()));
            parts[index as usize] = Some(
                base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .unwrap_or_else(|e| panic!("data is not standard base64: {e}")),
            );
        }
        let assembled: Vec<u8> = parts
            .into_iter()
            .enumerate()
            .flat_map(|(i, part)| part.unwrap_or_else(|| panic!("chunk {i} of {app} missing")))
            .collect();
        assert!(
            assembled == module,
            "{app}: reassembled {} bytes, the module has {}",
            assembled.len(),
            module.len()
        );
    }

    // A module the proxy lacks: an error on registry/error, nothing on
    // registry/server (a chunk with total_chunks 0 would start an assembly
    // an upstream proplet never completes).
    let before = mqtt.on(REGISTRY_CHUNK).len();
    mqtt.publish(
        REGISTRY_REQUEST,
        &ordered(&[("app_name", json!("missing.wasm"))]),
    );
    let error = mqtt
        .wait_for("registry error", Duration::from_secs(10), logs, |m| {
            m.topic == REGISTRY_ERROR
        })
        .json();
    assert_eq!(error["app_name"], "missing.wasm", "{error}");
    assert!(
        error["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{error}"
    );
    mqtt.listen(Duration::from_secs(2));
    let after: Vec<String> = mqtt.on(REGISTRY_CHUNK)[before..]
        .iter()
        .map(Message::text)
        .collect();
    assert!(
        after.is_empty(),
        "registry/server got messages for a missing module: {after:?}"
    );
}

/// A proplet that speaks as upstream's Rust proplet does, driven by our
/// manager: its create, alive and metrics (timestamp a serialised
/// SystemTime) taken, a start it can decode, its results stored.
#[test]
fn our_manager_drives_an_upstream_proplet() {
    const TEST: &str = "our_manager_drives_an_upstream_proplet";
    if !servers_available(TEST) {
        return;
    }
    let lab = upstream_lab();
    let (manager, api) = lab.manager();
    let services = [("manager", &manager)];
    let logs = || logs(&services);
    let wait = Duration::from_secs(20);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    // Upstream proplet ids are Magistrala client ids: UUIDs.
    let id = format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (nanos >> 32) as u32,
        (nanos >> 16) as u16,
        std::process::id() & 0xfff,
        nanos as u16 & 0xfff,
        nanos as u64 & 0xffff_ffff_ffff
    );
    let mut mqtt = lab.client("upstream-proplet");
    mqtt.subscribe(START);

    // DiscoveryMessage as serde writes it: PropletMetadata's None options and
    // empty tags skipped.
    let metadata = json!({
        "ip": "10.0.0.7",
        "environment": "binary",
        "os": "linux",
        "hostname": "edge-7",
        "cpu_arch": "x86_64",
        "total_memory_bytes": 16_742_825_984u64,
        "proplet_version": "0.5.0",
        "wasm_runtime": "wasmtime-internal",
    });
    mqtt.publish(
        CREATE,
        &ordered(&[
            ("proplet_id", json!(id)),
            ("namespace", json!("default")),
            (
                "metadata",
                Value::Object(
                    [
                        "ip",
                        "environment",
                        "os",
                        "hostname",
                        "cpu_arch",
                        "total_memory_bytes",
                        "proplet_version",
                        "wasm_runtime",
                    ]
                    .into_iter()
                    .map(|k| (k.to_owned(), metadata[k].clone()))
                    .collect(),
                ),
            ),
        ]),
    );
    // LivelinessMessage, every second from now on.
    let alive = ordered(&[
        ("proplet_id", json!(id)),
        ("status", json!("alive")),
        ("namespace", json!("default")),
    ]);
    let beating = Arc::new(AtomicBool::new(true));
    let heart = {
        let (client, beating, alive) = (mqtt.client.clone(), beating.clone(), alive.clone());
        std::thread::spawn(move || {
            while beating.load(Ordering::SeqCst) {
                let _ = client.publish(ALIVE, QoS::ExactlyOnce, false, alive.as_bytes().to_vec());
                for _ in 0..10 {
                    if !beating.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    };
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(false, Ordering::SeqCst);
        }
    }
    let _stop_heart = Stop(beating.clone());

    // The proplet is listed, alive.
    let deadline = Instant::now() + wait;
    loop {
        let (status, page) = request(api, "GET", "/proplets", None);
        assert_eq!(status, 200, "GET /proplets: {page}");
        let listed = page["proplets"]
            .as_array()
            .and_then(|all| all.iter().find(|p| p["id"] == id.as_str()));
        if let Some(proplet) = listed.filter(|p| p["alive"] == true) {
            for field in ["offset", "limit", "total"] {
                assert!(page[field].is_u64(), "GET /proplets {field}: {page}");
            }
            for field in ["name", "task_count", "alive", "metadata"] {
                assert!(proplet.get(field).is_some(), "proplet {field}: {proplet}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "proplet {id} not listed alive within {wait:?}: {page}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Metrics as upstream's Rust proplet sends them: `timestamp` is a
    // SystemTime, which serde writes as an object. The latest one is sent
    // last, with the container fields as serde writes None.
    let metrics = |secs: u64, user: f64, rss: u64, container: Value| {
        ordered(&[
            ("proplet_id", json!(id)),
            ("namespace", json!("default")),
            (
                "timestamp",
                json!({"secs_since_epoch": secs, "nanos_since_epoch": 123_456_789}),
            ),
            (
                "cpu_metrics",
                json!({"user_seconds": user, "system_seconds": 0.5, "percent": 3.25}),
            ),
            (
                "memory_metrics",
                json!({"rss_bytes": rss, "heap_alloc_bytes": 0, "heap_sys_bytes": 0,
                    "heap_inuse_bytes": 0, "container_usage_bytes": container,
                    "container_limit_bytes": container}),
            ),
        ])
    };
    let now = (nanos / 1_000_000_000) as u64;
    mqtt.publish(
        METRICS,
        &metrics(now - 1, 1.25, 12_345_678, json!(1_000_000)),
    );
    mqtt.publish(METRICS, &metrics(now, 2.5, 23_456_789, Value::Null));

    // A task pinned to it, inputs as numbers.
    let (status, created) = request(
        api,
        "POST",
        "/tasks",
        Some(
            &json!({"name": "add", "inputs": [3, 4], "image_url": "docker.io/acme/add:v1",
            "proplet_id": id}),
        ),
    );
    assert_eq!(status, 201, "POST /tasks: {created}\n{}", logs());
    let task = created["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no task id: {created}"))
        .to_owned();
    assert_eq!(created["state"], 0, "a new task is Pending (0): {created}");
    assert!(is_rfc3339(&created["created_at"]), "created_at: {created}");
    let (status, _, body) = http(api, "POST", &format!("/tasks/{task}/start"));
    assert_eq!(status, 200, "POST /tasks/{task}/start: {body}\n{}", logs());

    // The start, as upstream's proplet decodes it.
    let start = mqtt
        .wait_for("start", wait, logs, |m| {
            m.topic == START && m.json()["id"] == task.as_str()
        })
        .json();
    assert_upstream_start_request(&start, &task, &id);
    assert_eq!(start["name"], "add", "{start}");
    assert_eq!(start["image_url"], "docker.io/acme/add:v1", "{start}");

    // Upstream's ResultMessage.
    mqtt.publish(
        RESULTS,
        &ordered(&[
            ("task_id", json!(task)),
            ("proplet_id", json!(id)),
            ("results", json!("7")),
            ("error", Value::Null),
        ]),
    );
    let done = wait_task(api, &task, wait, logs, |t| t["state"] == 3);
    assert_eq!(done["results"], "7", "results as stored: {done}");
    assert_eq!(done["proplet_id"], id.as_str(), "{done}");
    assert!(
        done.get("error").is_none_or(|e| e.is_null() || e == ""),
        "{done}"
    );

    // A second task, the proplet chosen by the manager; it fails.
    let (status, created) = request(
        api,
        "POST",
        "/tasks",
        Some(&json!({"name": "add", "inputs": ["3", "4"], "file": base64(&modules::add())})),
    );
    assert_eq!(status, 201, "POST /tasks: {created}");
    let failing = created["id"].as_str().unwrap().to_owned();
    let (status, _, body) = http(api, "POST", &format!("/tasks/{failing}/start"));
    assert_eq!(status, 200, "POST /tasks/{failing}/start: {body}");
    let start = mqtt
        .wait_for("second start", wait, logs, |m| {
            m.topic == START && m.json()["id"] == failing.as_str()
        })
        .json();
    assert_upstream_start_request(&start, &failing, &id);
    assert_eq!(start["file"], base64(&modules::add()), "{start}");
    mqtt.publish(
        RESULTS,
        &ordered(&[
            ("task_id", json!(failing)),
            ("proplet_id", json!(id)),
            ("results", json!("")),
            ("error", json!("wasm trap: integer divide by zero")),
        ]),
    );
    let failed = wait_task(api, &failing, wait, logs, |t| t["state"] == 4);
    assert_eq!(
        failed["error"], "wasm trap: integer divide by zero",
        "{failed}"
    );

    // The proplet, with the metadata it announced.
    let (status, proplet) = request(api, "GET", &format!("/proplets/{id}"), None);
    assert_eq!(status, 200, "GET /proplets/{id}: {proplet}");
    assert_eq!(proplet["id"], id.as_str(), "{proplet}");
    assert_eq!(proplet["alive"], true, "{proplet}");
    assert!(
        is_rfc3339(&proplet["last_alive_at"]),
        "last_alive_at: {proplet}"
    );
    for (field, value) in metadata.as_object().unwrap() {
        assert_eq!(
            &proplet["metadata"][field], value,
            "metadata.{field}: {proplet}"
        );
    }

    // Its latest metrics.
    let (status, page) = request(api, "GET", &format!("/proplets/{id}/metrics"), None);
    assert_eq!(status, 200, "GET /proplets/{id}/metrics: {page}");
    fn entries(value: &Value, out: &mut Vec<Value>) {
        match value {
            Value::Object(map) if map.contains_key("cpu_metrics") => out.push(value.clone()),
            Value::Object(map) => map.values().for_each(|v| entries(v, out)),
            Value::Array(items) => items.iter().for_each(|v| entries(v, out)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    entries(&page, &mut found);
    let latest = found
        .iter()
        .find(|m| m["cpu_metrics"]["user_seconds"] == 2.5)
        .unwrap_or_else(|| panic!("the latest metrics are not served: {page}\n{}", logs()));
    assert_eq!(
        latest["memory_metrics"]["rss_bytes"], 23_456_789,
        "{latest}"
    );
    assert!(
        is_rfc3339(&latest["timestamp"]),
        "metrics are served with an RFC 3339 timestamp, as upstream does (its manager keeps \
         a time.Time, time.Now() when the proplet's is not a string: manager/service.go:1680-1687, \
         pkg/storage/sqlite/init.go:40), so that Go clients decode them: {latest}"
    );

    // Listing, health, Prometheus metrics, deletion.
    let (status, page) = request(api, "GET", "/tasks?offset=0&limit=10", None);
    assert_eq!(status, 200, "GET /tasks: {page}");
    assert_eq!(
        (&page["offset"], &page["limit"]),
        (&json!(0), &json!(10)),
        "{page}"
    );
    assert!(page["total"].as_u64().is_some_and(|t| t >= 2), "{page}");
    let ids: Vec<&str> = page["tasks"]
        .as_array()
        .unwrap_or_else(|| panic!("no tasks array: {page}"))
        .iter()
        .filter_map(|t| t["id"].as_str())
        .collect();
    assert!(
        ids.contains(&task.as_str()) && ids.contains(&failing.as_str()),
        "{page}"
    );
    let (status, _, body) = http(api, "GET", "/health");
    assert_eq!(status, 200, "GET /health: {body}");
    let (status, content_type, body) = http(api, "GET", "/metrics");
    assert_eq!(status, 200, "GET /metrics: {body}");
    assert!(
        content_type.starts_with("text/plain") && body.contains("# TYPE"),
        "GET /metrics is Prometheus text: {content_type} {body}"
    );
    let (status, _, body) = http(api, "DELETE", &format!("/tasks/{task}"));
    assert_eq!(status, 204, "DELETE /tasks/{task}: {body}");
    let (status, _, body) = http(api, "GET", &format!("/tasks/{task}"));
    assert_eq!(status, 404, "GET of a deleted task: {body}");

    // A proplet that announced itself before the manager started is known by
    // its heartbeat alone: upstream's manager creates it from the alive
    // message (manager/service.go:1292-1295).
    let late = format!("{}00000000beef", &id[..24]);
    let deadline = Instant::now() + wait;
    loop {
        mqtt.publish(
            ALIVE,
            &ordered(&[
                ("proplet_id", json!(late)),
                ("status", json!("alive")),
                ("namespace", json!("default")),
            ]),
        );
        std::thread::sleep(Duration::from_millis(500));
        let (status, proplet) = request(api, "GET", &format!("/proplets/{late}"), None);
        if status == 200 && proplet["alive"] == true {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a proplet known only by its alive messages is not served alive within {wait:?}: \
             {status} {proplet}\n{}",
            logs()
        );
    }

    drop(_stop_heart);
    heart.join().unwrap();
}
