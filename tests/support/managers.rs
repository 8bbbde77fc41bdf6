//! Our manager as a process, as the store tests and the store harness run
//! it: started with a store's settings in a directory of the caller's, and
//! the few API calls they make.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::http::request;
use crate::lab::Lab;
use crate::{modules, ServiceProcess, CONNECTED};

/// `add(3, 4)` with its module inline.
pub fn add_task() -> Value {
    let file = base64::engine::general_purpose::STANDARD.encode(modules::add());
    json!({"name": "add", "inputs": [3, 4], "file": file})
}

/// Our manager as `who`, with `settings` over the lab's, started in `dir`
/// (where the default store file goes); waits until it is connected.
pub fn start_manager(
    lab: &Lab,
    who: usize,
    settings: &[(String, String)],
    dir: &Path,
) -> (ServiceProcess, u16) {
    let mut env = lab.env("MANAGER", who);
    env.set("LIVELINESS_INTERVAL", "1s");
    for (suffix, value) in settings {
        env.set(suffix, value);
    }
    let manager = ServiceProcess::start_in("manager", &env.vars, dir);
    let line = manager.wait_for("HTTP API listening", Duration::from_secs(20));
    let api = crate::http::api_port(&line);
    manager.wait_for(CONNECTED, Duration::from_secs(20));
    (manager, api)
}

/// `(name, value)` pairs, owned.
pub fn pairs(settings: &[(&str, &str)]) -> Vec<(String, String)> {
    settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Polls `/proplets` until `id` is listed, alive if `alive`.
pub fn proplet_listed(api: u16, id: &str, alive: bool, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, page) = request(api, "GET", "/proplets", None);
        if let Some(proplet) = listed(status, &page, id, alive) {
            return proplet;
        }
        assert!(
            Instant::now() < deadline,
            "proplet {id} not listed{} within {timeout:?}: {status} {page}",
            if alive { " alive" } else { "" }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `/proplets` lists `id` now (alive, if `alive`).
pub fn is_listed(api: u16, id: &str, alive: bool) -> bool {
    let (status, page) = request(api, "GET", "/proplets", None);
    listed(status, &page, id, alive).is_some()
}

fn listed(status: u16, page: &Value, id: &str, alive: bool) -> Option<Value> {
    let found = page["proplets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["id"] == id && (!alive || p["alive"] == true));
    found.filter(|_| status == 200).cloned()
}

/// `GET path`, the whole response as text (for `/metrics`).
pub fn request_text(api: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", api)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, response)
}
