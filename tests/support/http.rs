//! A minimal HTTP/1.1 client for the manager's API: one request per
//! connection, JSON in and out. Enough to test the API as curl uses it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The status and JSON body of `method path` with `body`, from 127.0.0.1:`port`.
pub fn request(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let body = body.map(Value::to_string).unwrap_or_default();
    exchange(port, method, path, "application/json", body.as_bytes())
}

/// `PUT path` with `file` as the form field `file`, as `curl -F file=@name`
/// sends it.
pub fn upload(port: u16, path: &str, name: &str, file: &[u8]) -> (u16, Value) {
    let boundary = "propeller-test-boundary";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    exchange(port, "PUT", path, &content_type, &body)
}

fn exchange(port: u16, method: &str, path: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
    let (status, _, body) = raw(port, method, path, content_type, body);
    // 204 has no body.
    let json = match body.trim() {
        "" => Value::Null,
        body => serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}")),
    };
    (status, json)
}

/// The status, `Content-Type` and body text of `method path` with `body`:
/// for answers that are not JSON (`/metrics`) or must be seen as sent.
pub fn raw(
    port: u16,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the manager API");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("read the response");
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let header = |name: &str| {
        head.lines()
            .filter_map(|line| line.split_once(':'))
            .find(|(key, _)| key.trim().eq_ignore_ascii_case(name))
            .map(|(_, value)| value.trim().to_owned())
            .unwrap_or_default()
    };
    let body = match header("transfer-encoding").eq_ignore_ascii_case("chunked") {
        true => unchunk(body),
        false => body.to_owned(),
    };
    (status, header("content-type"), body)
}

fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size =
            usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// The port the manager logged in `HTTP API listening address=…`.
pub fn api_port(log_line: &str) -> u16 {
    log_line
        .split("address=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|address| address.rsplit(':').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("no address in {log_line:?}"))
}

/// Upstream's task states.
pub const COMPLETED: u64 = 3;
pub const FAILED: u64 = 4;
pub const INTERRUPTED: u64 = 6;

/// Polls `GET /tasks/{id}` until the task has finished.
pub fn finished_task(api: u16, id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, task) = request(api, "GET", &format!("/tasks/{id}"), None);
        assert_eq!(status, 200, "{task}");
        if [COMPLETED, FAILED, INTERRUPTED].contains(&task["state"].as_u64().unwrap_or_default()) {
            return task;
        }
        assert!(
            Instant::now() < deadline,
            "task not finished within {timeout:?}: {task}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Creates the task, then starts it, as upstream's CLI does.
pub fn start_task(api: u16, task: Value) -> String {
    let (status, created) = request(api, "POST", "/tasks", Some(&task));
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["state"], 0, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let (status, started) = request(api, "POST", &format!("/tasks/{id}/start"), None);
    assert_eq!((status, &started), (200, &json!({"started": true})));
    id
}
