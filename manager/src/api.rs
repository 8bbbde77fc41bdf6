//! The manager's HTTP API, following upstream's `manager/api` so that
//! upstream's Go SDK and `propeller-cli` work against it unchanged: the same
//! routes, status codes, field names and types. This file only maps HTTP to
//! the domain in `domain.rs` and its answers back to HTTP.
//!
//! | request | answer |
//! |---|---|
//! | `POST /tasks` | 201, the task, Pending (state 0) |
//! | `GET /tasks?offset&limit` | `{offset, limit, total, tasks}` |
//! | `GET`, `PUT`, `DELETE /tasks/{id}` | the task; update; 204 |
//! | `PUT /tasks/{id}/upload` | multipart `file=@x.wasm`: the task's module |
//! | `POST /tasks/{id}/start`, `/stop` | `{"started": true}`, `{"stopped": true}` |
//! | `GET /tasks/{id}/results` | `{"results": …}` |
//! | `GET /proplets?offset&limit&status` | `{offset, limit, total, proplets}` |
//! | `GET`, `DELETE /proplets/{id}` | the proplet; 204 |
//! | `GET /proplets/{id}/metrics`, `/alive-history` | pages, as upstream's |
//! | `GET /health`, `GET /metrics` | health JSON; Prometheus text |
//! | `/jobs`, `/workflows`, `/fl` | 501: not supported here |
//!
//! Errors are `{"error": "…"}` with a 4xx or 5xx status.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, LOCATION};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use propeller_mqtt::ConnectionState;
use propeller_protocol::rfc3339;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::domain::{Manager, ManagerError, Summary, TaskRequest};
use crate::store::writer::Report;
use crate::store::StoreState;
use crate::tasks::Page;

/// The largest request body: a module that fits in a start of the default
/// 10 MiB packet, base64 in JSON, with room to spare. (Upstream takes 100 MiB,
/// but no start that large could ever be published.)
const MAX_BODY: usize = 16 << 20;
/// Request bodies read at once, so that memory stays bounded however many
/// clients send large bodies together.
const BODY_SLOTS: usize = 8;
/// Upstream's page defaults and largest task page.
const DEFAULT_LIMIT: u64 = 10;
const MAX_LIMIT: u64 = 100;
/// A client that has not sent its headers by then is dropped (slowloris).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 256;

/// Serves the API on `listener` until the process stops.
pub async fn serve(listener: TcpListener, manager: Arc<Manager>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let bodies = Arc::new(Semaphore::new(BODY_SLOTS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (manager, bodies) = (manager.clone(), bodies.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let (manager, bodies) = (manager.clone(), bodies.clone());
                async move { Ok::<_, Infallible>(route(&manager, &bodies, request).await) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, %error, "HTTP connection ended");
            }
            drop(slot);
        });
    }
}

/// An answer before it becomes a response.
enum Reply {
    Json(StatusCode, Value),
    Created(String, Value),
    Text(String),
    NoContent,
}

fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    Reply::Json(status, json!({ "error": message.into() }))
}

impl From<ManagerError> for Reply {
    fn from(e: ManagerError) -> Self {
        let status = match &e {
            ManagerError::NotFound(_) => StatusCode::NOT_FOUND,
            ManagerError::Invalid(_) => StatusCode::BAD_REQUEST,
            ManagerError::Conflict(_) => StatusCode::CONFLICT,
            ManagerError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ManagerError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        error(status, e.to_string())
    }
}

fn ok(value: impl serde::Serialize) -> Reply {
    Reply::Json(StatusCode::OK, json!(value))
}

/// `bodies` limits how many request bodies are read at once.
async fn route(
    manager: &Arc<Manager>,
    bodies: &Semaphore,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().trim_end_matches('/').to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let reply = match (&method, segments.as_slice()) {
        (&Method::GET, ["health"]) => health(&manager.summary()),
        (&Method::GET, ["metrics"]) => Reply::Text(prometheus(&manager.summary())),
        (&Method::GET, ["proplets"]) => list_proplets(manager, &query),
        (&Method::GET, ["proplets", id]) => match manager.read().and_then(|s| s.proplet(id).map(|p| p.view())) {
            Ok(view) => ok(view),
            Err(e) => e.into(),
        },
        (&Method::DELETE, ["proplets", id]) => match manager.delete_proplet(id).await {
            Ok(()) => Reply::NoContent,
            Err(e) => e.into(),
        },
        (&Method::GET, ["proplets", id, "metrics"]) => match page(&query, u64::MAX) {
            Ok(page) => match manager.read().and_then(|s| s.proplet(id).map(|p| p.metrics.clone())) {
                Ok(metrics) => {
                    let latest: Vec<_> = metrics.iter().collect();
                    ok(json!({"offset": page.offset, "limit": page.limit, "total": latest.len(), "metrics": page.of(latest.into_iter())}))
                }
                Err(e) => e.into(),
            },
            Err(reply) => reply,
        },
        (&Method::GET, ["proplets", id, "alive-history"]) => match page(&query, u64::MAX) {
            Ok(page) => match manager.read().and_then(|s| s.proplet(id).cloned()) {
                Ok(proplet) => {
                    let history: Vec<String> =
                        proplet.alive_history.iter().map(|t| rfc3339(*t)).collect();
                    ok(json!({"offset": page.offset, "limit": page.limit, "total": history.len(), "history": page.of(history.into_iter())}))
                }
                Err(e) => e.into(),
            },
            Err(reply) => reply,
        },
        (&Method::POST, ["tasks"]) => match read_json::<TaskRequest>(bodies, request).await {
            Ok(new) => match manager.create(new).await {
                Ok(task) => Reply::Created(format!("/tasks/{}", task.id), json!(task)),
                Err(e) => e.into(),
            },
            Err(reply) => reply,
        },
        (&Method::GET, ["tasks"]) => match page(&query, MAX_LIMIT) {
            Ok(page) => match manager.read() {
                Ok(state) => {
                    let (tasks, total) = state.tasks.page(page);
                    ok(json!({"offset": page.offset, "limit": page.limit, "total": total, "tasks": tasks}))
                }
                Err(e) => e.into(),
            },
            Err(reply) => reply,
        },
        (&Method::GET, ["tasks", id]) => match manager.read().and_then(|s| s.task(id).map(|t| json!(t))) {
            Ok(task) => ok(task),
            Err(e) => e.into(),
        },
        (&Method::PUT, ["tasks", id]) => {
            let id = id.to_string();
            match read_json::<TaskRequest>(bodies, request).await {
                Ok(update) => match manager.update(&id, update).await {
                    Ok(task) => ok(task),
                    Err(e) => e.into(),
                },
                Err(reply) => reply,
            }
        }
        (&Method::PUT, ["tasks", id, "upload"]) => {
            let id = id.to_string();
            upload(manager, bodies, &id, request).await
        }
        (&Method::DELETE, ["tasks", id]) => match manager.delete(id).await {
            Ok(()) => Reply::NoContent,
            Err(e) => e.into(),
        },
        (&Method::POST, ["tasks", id, "start"]) => match manager.start(id).await {
            Ok(()) => ok(json!({ "started": true })),
            Err(e) => e.into(),
        },
        (&Method::POST, ["tasks", id, "stop"]) => match manager.stop(id).await {
            Ok(()) => ok(json!({ "stopped": true })),
            Err(e) => e.into(),
        },
        (&Method::GET, ["tasks", id, "results"]) => match manager.read().and_then(|s| s.task(id).map(|t| t.results.clone())) {
            Ok(results) => ok(json!({ "results": results })),
            Err(e) => e.into(),
        },
        (&Method::GET, ["tasks", id, "metrics"]) => match manager.read().and_then(|s| s.task(id).map(drop)) {
            // Per-task metrics need upstream's monitoring profile, which our
            // proplet does not implement: an honest empty page.
            Ok(_) => ok(json!({"offset": 0, "limit": DEFAULT_LIMIT, "total": 0, "metrics": []})),
            Err(e) => e.into(),
        },
        (_, ["jobs" | "workflows" | "fl", ..]) | (_, ["proplets", _, "sdf"]) => error(
            StatusCode::NOT_IMPLEMENTED,
            format!("{path} is not supported by this manager: it runs single tasks (/tasks); jobs, workflows, federated learning and SDF documents need upstream's manager"),
        ),
        (
            _,
            ["health" | "metrics" | "proplets" | "tasks"]
            | ["proplets" | "tasks", _]
            | ["proplets", _, "metrics" | "alive-history"]
            | ["tasks", _, "upload" | "start" | "stop" | "results" | "metrics"],
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no such resource {path}: try /health, /proplets or /tasks"),
        ),
    };
    respond(reply)
}

fn respond(reply: Reply) -> Response<Full<Bytes>> {
    let (status, body, content_type, location) = match reply {
        Reply::Json(status, value) => (status, json_body(&value), "application/json", None),
        Reply::Created(location, value) => (
            StatusCode::CREATED,
            json_body(&value),
            "application/json",
            Some(location),
        ),
        Reply::Text(text) => (
            StatusCode::OK,
            Bytes::from(text),
            "text/plain; version=0.0.4",
            None,
        ),
        Reply::NoContent => (
            StatusCode::NO_CONTENT,
            Bytes::new(),
            "application/json",
            None,
        ),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(location) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        headers.insert(LOCATION, location);
    }
    response
}

fn json_body(value: &Value) -> Bytes {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    Bytes::from(body)
}

fn list_proplets(manager: &Manager, query: &str) -> Reply {
    let page = match page(query, u64::MAX) {
        Ok(page) => page,
        Err(reply) => return reply,
    };
    let status = parameter(query, "status");
    let state = match manager.read() {
        Ok(state) => state,
        Err(e) => return e.into(),
    };
    match state.proplets(page, status.as_deref()) {
        Ok((proplets, total)) => {
            let views: Vec<Value> = proplets.iter().map(|p| p.view()).collect();
            ok(
                json!({"offset": page.offset, "limit": page.limit, "total": total, "proplets": views}),
            )
        }
        Err(e) => e.into(),
    }
}

async fn upload(
    manager: &Manager,
    bodies: &Semaphore,
    id: &str,
    request: Request<Incoming>,
) -> Reply {
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = match read_body(bodies, request).await {
        Ok(body) => body,
        Err(reply) => return reply,
    };
    let (filename, module) = match crate::multipart::file_field(&content_type, &body, "file") {
        Ok(file) => file,
        Err(problem) => return error(StatusCode::BAD_REQUEST, problem),
    };
    if !filename.ends_with(".wasm") {
        return error(
            StatusCode::BAD_REQUEST,
            format!("the file {filename:?} is not a .wasm: upload a WebAssembly module"),
        );
    }
    if !module.starts_with(b"\0asm") {
        return error(
            StatusCode::BAD_REQUEST,
            "the file does not start with WebAssembly's magic bytes \\0asm: upload a WebAssembly module",
        );
    }
    match manager.upload(id, module.to_vec()).await {
        Ok(task) => ok(task),
        Err(e) => e.into(),
    }
}

/// `offset` and `limit` from the query, with upstream's defaults; `limit`
/// must be 1 to `max`.
fn page(query: &str, max: u64) -> Result<Page, Reply> {
    let number = |name: &str, default: u64| match parameter(query, name) {
        None => Ok(default),
        Some(text) => text.parse::<u64>().map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                format!("{name} must be a whole number, not {text:?}"),
            )
        }),
    };
    let page = Page {
        offset: number("offset", 0)?,
        limit: number("limit", DEFAULT_LIMIT)?,
    };
    if page.limit == 0 || page.limit > max {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("limit must be from 1 to {max}, not {}", page.limit),
        ));
    }
    Ok(page)
}

/// One query parameter, undecoded: ours are numbers and plain words.
fn parameter(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value.to_owned())
}

async fn read_body(bodies: &Semaphore, request: Request<Incoming>) -> Result<Bytes, Reply> {
    let _slot = bodies.acquire().await;
    Ok(Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read the body (at most {} MiB): {e}", MAX_BODY >> 20),
            )
        })?
        .to_bytes())
}

async fn read_json<T: DeserializeOwned>(
    bodies: &Semaphore,
    request: Request<Incoming>,
) -> Result<T, Reply> {
    let json = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json"));
    if !json {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the task as JSON, with Content-Type: application/json",
        ));
    }
    let body = read_body(bodies, request).await?;
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the body is not a task: {e}"),
        )
    })
}

fn mqtt_state(state: &ConnectionState) -> Value {
    match state {
        ConnectionState::Connected => json!({ "state": "connected" }),
        ConnectionState::Connecting => json!({ "state": "connecting" }),
        ConnectionState::Retrying { failure, attempts } => {
            json!({ "state": "retrying", "failure": failure.to_string(), "attempts": attempts })
        }
        ConnectionState::Closed => json!({ "state": "closed" }),
    }
}

fn store_state(report: &Report) -> Value {
    let mut store = json!({ "type": report.kind, "state": report.state.name() });
    if !report.location.is_empty() {
        store["location"] = json!(report.location);
    }
    match &report.state {
        StoreState::Retrying { failure, attempts } => {
            store["failure"] = json!(failure);
            store["attempts"] = json!(attempts);
        }
        StoreState::Standby { holder } => store["holder"] = json!(holder),
        StoreState::Ready | StoreState::Connecting => {}
    }
    store
}

/// Magistrala's health shape (`status: pass`), with what an operator needs
/// to know besides: the broker connection, the store and the proplets.
fn health(summary: &Summary) -> Reply {
    let proplets: serde_json::Map<String, Value> = summary
        .proplets
        .iter()
        .map(|(liveness, n)| (liveness.name().to_owned(), json!(n)))
        .collect();
    ok(json!({
        "status": "pass",
        "version": env!("CARGO_PKG_VERSION"),
        "description": "manager service",
        "mqtt": mqtt_state(&summary.mqtt),
        "store": store_state(&summary.store),
        "proplets": proplets,
    }))
}

/// The Prometheus text exposition of the summary.
fn prometheus(summary: &Summary) -> String {
    let mut text = String::new();
    let connected = u8::from(summary.mqtt == ConnectionState::Connected);
    let _ = writeln!(
        text,
        "# HELP propeller_manager_mqtt_connected Whether the manager is connected to the broker.\n# TYPE propeller_manager_mqtt_connected gauge\npropeller_manager_mqtt_connected {connected}"
    );
    connection_metrics(&mut text, &summary.connection);
    let store = &summary.store;
    let _ = writeln!(
        text,
        "# HELP propeller_manager_store_ready Whether the store takes writes: 0 while connecting, retrying or on standby.\n# TYPE propeller_manager_store_ready gauge\npropeller_manager_store_ready{{type=\"{}\"}} {}",
        store.kind,
        u8::from(store.state == StoreState::Ready)
    );
    let _ = writeln!(
        text,
        "# HELP propeller_manager_store_writes_total Transactions committed to the store.\n# TYPE propeller_manager_store_writes_total counter\npropeller_manager_store_writes_total {}",
        store.writes
    );
    let _ = writeln!(
        text,
        "# HELP propeller_manager_store_write_seconds_total Time spent committing them.\n# TYPE propeller_manager_store_write_seconds_total counter\npropeller_manager_store_write_seconds_total {:.6}",
        store.write_seconds
    );
    let _ = writeln!(
        text,
        "# HELP propeller_manager_proplets Proplets known, by liveness.\n# TYPE propeller_manager_proplets gauge"
    );
    for (liveness, n) in &summary.proplets {
        let _ = writeln!(
            text,
            "propeller_manager_proplets{{state=\"{}\"}} {n}",
            liveness.name()
        );
    }
    let _ = writeln!(
        text,
        "# HELP propeller_manager_tasks Tasks known, by state.\n# TYPE propeller_manager_tasks gauge"
    );
    for (state, n) in &summary.tasks {
        let _ = writeln!(
            text,
            "propeller_manager_tasks{{state=\"{}\"}} {n}",
            state.name()
        );
    }
    text
}

/// The MQTT connection's figures ([`propeller_mqtt::Client::metrics`]).
fn connection_metrics(text: &mut String, metrics: &propeller_mqtt::Metrics) {
    let _ = writeln!(
        text,
        "# HELP propeller_manager_mqtt_reconnects_total Connections to the broker after the first.\n# TYPE propeller_manager_mqtt_reconnects_total counter\npropeller_manager_mqtt_reconnects_total {}",
        metrics.reconnects
    );
    let _ = writeln!(
        text,
        "# HELP propeller_manager_mqtt_last_failure The class of the last connection failure (1), none if there was none.\n# TYPE propeller_manager_mqtt_last_failure gauge\npropeller_manager_mqtt_last_failure{{class=\"{}\"}} 1",
        metrics.last_failure_class.unwrap_or("none")
    );
    let _ = writeln!(
        text,
        "# HELP propeller_manager_mqtt_outbox_messages Messages waiting for the broker's acknowledgement.\n# TYPE propeller_manager_mqtt_outbox_messages gauge\npropeller_manager_mqtt_outbox_messages {}",
        metrics.outbox_depth
    );
    if let Some(days) = metrics.certificate_days_left {
        let _ = writeln!(
            text,
            "# HELP propeller_manager_mqtt_certificate_days_left Whole days until the client certificate expires.\n# TYPE propeller_manager_mqtt_certificate_days_left gauge\npropeller_manager_mqtt_certificate_days_left {days}"
        );
    }
    if let Some(rtt) = metrics.ping_round_trip {
        let _ = writeln!(
            text,
            "# HELP propeller_manager_mqtt_ping_seconds The last keep-alive round trip (PINGREQ to PINGRESP).\n# TYPE propeller_manager_mqtt_ping_seconds gauge\npropeller_manager_mqtt_ping_seconds {:.6}",
            rtt.as_secs_f64()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Liveness;
    use crate::tasks::TaskState;

    #[test]
    fn pages_follow_upstreams_rules() {
        assert_eq!(
            page("", 100).ok(),
            Some(Page {
                offset: 0,
                limit: 10
            })
        );
        assert_eq!(
            page("offset=5&limit=100", 100).ok(),
            Some(Page {
                offset: 5,
                limit: 100
            })
        );
        assert!(page("limit=0", 100).is_err());
        assert!(page("limit=101", 100).is_err());
        assert!(page("offset=-1", 100).is_err());
    }

    #[test]
    fn prometheus_text_has_every_series() {
        let text = prometheus(&Summary {
            mqtt: ConnectionState::Connected,
            proplets: [
                (Liveness::Alive, 2),
                (Liveness::Discovered, 0),
                (Liveness::Offline, 1),
            ],
            tasks: vec![(TaskState::Completed, 3)],
            store: Report {
                kind: "sqlite",
                location: "/x.db".into(),
                state: StoreState::Ready,
                writes: 2,
                write_seconds: 0.5,
            },
            connection: propeller_mqtt::Metrics {
                connected: true,
                connections: 3,
                reconnects: 2,
                last_failure_class: Some("taken-over"),
                outbox_depth: 4,
                certificate_days_left: Some(29),
                ping_round_trip: Some(std::time::Duration::from_millis(3)),
            },
        });
        assert!(text.contains("propeller_manager_mqtt_reconnects_total 2\n"));
        assert!(text.contains("propeller_manager_mqtt_last_failure{class=\"taken-over\"} 1\n"));
        assert!(text.contains("propeller_manager_mqtt_outbox_messages 4\n"));
        assert!(text.contains("propeller_manager_mqtt_certificate_days_left 29\n"));
        assert!(text.contains("propeller_manager_mqtt_ping_seconds 0.003000\n"));
        assert!(text.contains("propeller_manager_mqtt_connected 1\n"));
        assert!(text.contains("propeller_manager_store_ready{type=\"sqlite\"} 1\n"));
        assert!(text.contains("propeller_manager_store_writes_total 2\n"));
        assert!(text.contains("propeller_manager_proplets{state=\"alive\"} 2\n"));
        assert!(text.contains("propeller_manager_tasks{state=\"Completed\"} 3\n"));
    }
}
