//! The manager's HTTP API:
//!
//! | request | answer |
//! |---|---|
//! | `GET /health` | the process and its MQTT connection |
//! | `GET /proplets` | every proplet seen, and where it stands |
//! | `POST /tasks` | start a task: `name`, `inputs`, `image_url` or base64 `file`, optional `proplet_id` |
//! | `GET /tasks`, `GET /tasks/{id}` | tasks and their results |
//! | `POST /tasks/{id}/stop` | stop a running task |
//!
//! Errors are `{"error": "…"}` with a 4xx or 5xx status.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::Manager;

/// The largest request body: a base64 module of about 48 MiB.
const MAX_BODY: usize = 64 << 20;

/// Serves the API on `listener` until the process stops.
pub async fn serve(listener: TcpListener, manager: Arc<Manager>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                warn!(%error, "cannot accept an HTTP connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let manager = manager.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let manager = manager.clone();
                async move { Ok::<_, Infallible>(route(&manager, request).await) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, %error, "HTTP connection ended");
            }
        });
    }
}

/// What `POST /tasks` takes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTask {
    /// The exported function to run.
    pub name: String,
    /// Its arguments.
    #[serde(default)]
    pub inputs: Vec<Value>,
    /// Where the proxy finds the module.
    #[serde(default)]
    pub image_url: Option<String>,
    /// The module, base64.
    #[serde(default)]
    pub file: Option<String>,
    /// The proplet to run it on; the least busy alive one when absent.
    #[serde(default)]
    pub proplet_id: Option<String>,
}

/// An answer: a status and a JSON body.
pub type Reply = (StatusCode, Value);

/// An error answer.
pub fn error(status: StatusCode, message: impl Into<String>) -> Reply {
    (status, json!({ "error": message.into() }))
}

async fn route(manager: &Arc<Manager>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().trim_end_matches('/').to_owned();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let (status, body) = match (&method, segments.as_slice()) {
        (&Method::GET, ["health"]) => manager.health(),
        (&Method::GET, ["proplets"]) => manager.proplets(),
        (&Method::GET, ["tasks"]) => manager.tasks(),
        (&Method::GET, ["tasks", id]) => manager.task(id),
        (&Method::POST, ["tasks"]) => match read_json::<NewTask>(request).await {
            Ok(new) => manager.start_task(new).await,
            Err(reply) => reply,
        },
        (&Method::POST, ["tasks", id, "stop"]) => manager.stop_task(id).await,
        (_, ["health" | "proplets" | "tasks"] | ["tasks", _] | ["tasks", _, "stop"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no such resource {path}: try /health, /proplets or /tasks"),
        ),
    };
    let mut body = serde_json::to_vec_pretty(&body).unwrap_or_default();
    body.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

async fn read_json<T: for<'de> Deserialize<'de>>(request: Request<Incoming>) -> Result<T, Reply> {
    let body = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("cannot read the body (at most {} MiB): {e}", MAX_BODY >> 20),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("the body is not a task: {e}"),
        )
    })
}
