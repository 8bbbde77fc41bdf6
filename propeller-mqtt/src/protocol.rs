//! Propeller's messages: the topics under the channel base and their JSON
//! payloads, as upstream v0.5 sends them, so our services and upstream's can
//! share a channel.
//!
//! Inbound payloads are parsed leniently (absent fields take defaults,
//! unknown fields are ignored), as upstream's Go services do.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Topics, after `m/<domain>/c/<channel>/`.
pub mod topic {
    /// A proplet announces itself, once per connection.
    pub const PROPLET_CREATE: &str = "control/proplet/create";
    /// A proplet's heartbeat, and its last will.
    pub const PROPLET_ALIVE: &str = "control/proplet/alive";
    /// A task's outcome.
    pub const PROPLET_RESULTS: &str = "control/proplet/results";
    /// The manager starts a task.
    pub const MANAGER_START: &str = "control/manager/start";
    /// The manager stops a task.
    pub const MANAGER_STOP: &str = "control/manager/stop";
    /// A proplet asks the proxy for a module.
    pub const REGISTRY_REQUEST: &str = "registry/proplet";
    /// The proxy answers with chunks of the module.
    pub const REGISTRY_CHUNK: &str = "registry/server";
}

/// The JSON payload of `message`, as published.
pub fn payload(message: &impl Serialize) -> Bytes {
    // Our payload types are plain structs of strings, numbers and JSON
    // values: serialising them cannot fail.
    Bytes::from(serde_json::to_vec(message).unwrap_or_default())
}

/// `status` of an alive message from a running proplet.
pub const ALIVE: &str = "alive";
/// `status` of the last will, published by the broker when a proplet vanishes.
pub const OFFLINE: &str = "offline";

/// On [`topic::PROPLET_CREATE`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PropletCreate {
    /// The proplet's id: its MQTT client id.
    pub proplet_id: String,
    /// Free-form grouping, empty by default.
    #[serde(default)]
    pub namespace: String,
    /// What the proplet says about itself (version, runtime).
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

/// On [`topic::PROPLET_ALIVE`]: a heartbeat, or the last will.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PropletAlive {
    /// The proplet's id.
    pub proplet_id: String,
    /// [`ALIVE`] or [`OFFLINE`].
    pub status: String,
    /// As in [`PropletCreate`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

/// On [`topic::MANAGER_START`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartTask {
    /// The task id.
    pub id: String,
    /// The exported function to run.
    pub name: String,
    /// Upstream's task state; carried, not interpreted.
    #[serde(default)]
    pub state: Value,
    /// Where the proxy finds the module, when `file` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_url: Option<String>,
    /// The module itself, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The function's arguments. Kept as JSON so that a bad one becomes an
    /// error result naming it, not a message dropped for failing to parse.
    #[serde(default)]
    pub inputs: Vec<Value>,
    /// Upstream's WASI arguments; we run without WASI.
    #[serde(default)]
    pub cli_args: Vec<String>,
    /// Every proplet should run it.
    #[serde(default)]
    pub broadcast: bool,
    /// Upstream's long-running flag.
    #[serde(default)]
    pub daemon: bool,
    /// Upstream's WASI environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Map<String, Value>>,
    /// The one proplet that should run it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proplet_id: Option<String>,
}

/// On [`topic::MANAGER_STOP`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopTask {
    /// The task id.
    pub id: String,
    /// Every proplet should stop it.
    #[serde(default)]
    pub broadcast: bool,
    /// The one proplet that should stop it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proplet_id: Option<String>,
}

/// Whether a start or stop aimed by `broadcast` and `proplet_id` is for `me`.
pub fn addressed_to(broadcast: bool, proplet_id: Option<&str>, me: &str) -> bool {
    broadcast || proplet_id.is_none_or(|id| id.is_empty() || id == me)
}

/// On [`topic::PROPLET_RESULTS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The task id.
    pub task_id: String,
    /// Who ran it.
    pub proplet_id: String,
    /// The function's return value: a number, an array for several, or null.
    #[serde(default)]
    pub results: Value,
    /// Why it failed; absent, null or empty on success.
    #[serde(default)]
    pub error: Option<String>,
}

impl TaskResult {
    /// The error, if there is one: upstream sends `""` for none.
    pub fn failure(&self) -> Option<&str> {
        self.error.as_deref().filter(|e| !e.is_empty())
    }
}

/// On [`topic::REGISTRY_REQUEST`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleRequest {
    /// The task's `image_url`.
    pub app_name: String,
}

/// On [`topic::REGISTRY_CHUNK`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleChunk {
    /// The `app_name` asked for.
    pub app_name: String,
    /// From 0.
    pub chunk_idx: u32,
    /// How many chunks make the module.
    pub total_chunks: u32,
    /// This chunk's bytes, base64.
    #[serde(default)]
    pub data: String,
    /// Our extension: the proxy has no such module, or could not fetch it.
    /// Sent with `total_chunks: 0`, so that the proplet's wait ends now
    /// rather than at its timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_payloads_parse() {
        let start: StartTask = serde_json::from_str(
            r#"{"id":"t1","name":"add","state":0,"image_url":"docker.io/x/add:v1","inputs":[3,4],"cli_args":[],"daemon":false,"extra":1}"#,
        )
        .unwrap();
        assert_eq!(start.inputs, vec![Value::from(3), Value::from(4)]);
        assert!(!start.broadcast && start.proplet_id.is_none());
        let will: PropletAlive =
            serde_json::from_str(r#"{"status":"offline","proplet_id":"p1"}"#).unwrap();
        assert_eq!(will.status, OFFLINE);
        let result: TaskResult =
            serde_json::from_str(r#"{"task_id":"t1","proplet_id":"p1","results":7,"error":""}"#)
                .unwrap();
        assert_eq!(result.failure(), None);
    }

    #[test]
    fn addressing() {
        assert!(addressed_to(true, Some("other"), "me"));
        assert!(addressed_to(false, None, "me"));
        assert!(addressed_to(false, Some(""), "me"));
        assert!(addressed_to(false, Some("me"), "me"));
        assert!(!addressed_to(false, Some("other"), "me"));
    }
}
