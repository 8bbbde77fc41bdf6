//! The topics under the channel base and their JSON
//! payloads, as upstream v0.5.0 sends and accepts them, so that our services
//! and upstream's can share a channel in either direction.
//!
//! Two rules make that work:
//! - **Inbound, be exactly as lenient as upstream.** Go marshals a nil slice
//!   or map as `null`, so `null` means empty for every list, map and string;
//!   absent fields take defaults; unknown fields are ignored; `inputs` may be
//!   strings or numbers; `results` may be any JSON.
//! - **Outbound, send what upstream's strict side decodes.** Upstream's Rust
//!   proplet decodes `inputs` as `Vec<String>` and drops a start with numbers;
//!   its manager reads `results` as whatever JSON arrives, and its proplet
//!   sends a string. So we send strings.

use std::collections::BTreeMap;
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Topics, after `m/<domain>/c/<channel>/`.
pub mod topic {
    /// A proplet announces itself, once per connection.
    pub const PROPLET_CREATE: &str = "control/proplet/create";
    /// A proplet's heartbeat, and its last will.
    pub const PROPLET_ALIVE: &str = "control/proplet/alive";
    /// A task's outcome.
    pub const PROPLET_RESULTS: &str = "control/proplet/results";
    /// A proplet's CPU and memory, every liveliness interval.
    pub const PROPLET_METRICS: &str = "control/proplet/metrics";
    /// The manager starts a task.
    pub const MANAGER_START: &str = "control/manager/start";
    /// The manager stops a task.
    pub const MANAGER_STOP: &str = "control/manager/stop";
    /// A proplet asks the proxy for a module.
    pub const REGISTRY_REQUEST: &str = "registry/proplet";
    /// The proxy answers with chunks of the module.
    pub const REGISTRY_CHUNK: &str = "registry/server";
    /// Our extension: the proxy cannot serve a module. A topic of its own,
    /// because an upstream proplet reads anything on [`REGISTRY_CHUNK`] as a
    /// chunk and would wait for a module that never comes.
    pub const REGISTRY_ERROR: &str = "registry/error";
}

/// The JSON payload of `message`, as published.
pub fn payload(message: &impl Serialize) -> Bytes {
    // Our payload types are plain structs of strings, numbers and JSON
    // values: serialising them cannot fail.
    Bytes::from(serde_json::to_vec(message).unwrap_or_default())
}

/// The largest module the proxy serves and a proplet reassembles: 512 of
/// upstream's 512 KiB chunks.
pub const MAX_MODULE: usize = 256 << 20;

/// The most bytes of an error text a result or a module error carries: an
/// error that echoes a huge input must still fit in one packet.
pub const MAX_ERROR: usize = 4096;

/// `text` cut to at most `max` bytes (on a character boundary), saying how
/// much was dropped.
pub fn truncated(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [{} bytes dropped]", &text[..end], text.len() - end).into()
}

/// A value that came from outside (the channel, the API), for a log line:
/// control characters escaped, so that a CR or LF cannot forge a line, and
/// cut to [`Untrusted::MAX`] characters, so that a huge name cannot flood
/// the log.
pub struct Untrusted<'a>(pub &'a str);

impl Untrusted<'_> {
    /// Characters shown.
    pub const MAX: usize = 200;
}

impl std::fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (shown, c) in self.0.chars().enumerate() {
            if shown == Self::MAX {
                return write!(f, "… [{} bytes]", self.0.len());
            }
            match c.is_control() {
                true => write!(f, "{}", c.escape_default())?,
                false => write!(f, "{c}")?,
            }
        }
        Ok(())
    }
}

/// `status` of an alive message from a running proplet.
pub const ALIVE: &str = "alive";
/// `status` of the last will, published by the broker when a proplet vanishes.
pub const OFFLINE: &str = "offline";
/// The namespace upstream's proplets announce when none is configured.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Deserializers for upstream's lenient JSON, for other payloads that
/// follow the same rules (the manager's API takes upstream's task JSON).
pub mod de {
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    /// `null` (Go's nil slice, map or pointer) or absent: the type's default.
    pub fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Default + Deserialize<'de>,
    {
        Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
    }

    /// Whatever arrives, as `T` if it can be read as one, else the default: for
    /// descriptive fields whose wrong type must not cost the whole message, as
    /// Go's map lookups in upstream's manager read them.
    pub fn lenient<'de, D, T>(deserializer: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Default + serde::de::DeserializeOwned,
    {
        let value = Value::deserialize(deserializer)?;
        Ok(serde_json::from_value(value).unwrap_or_default())
    }

    /// Task inputs: strings or numbers, as upstream's `task.FlexStrings` takes
    /// them; always strings afterwards.
    pub fn flex_strings<'de, D>(deserializer: D) -> Result<Vec<String>, D::Error>
    where
        D: Deserializer<'de>,
    {
        let values: Option<Vec<Value>> = Option::deserialize(deserializer)?;
        values
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, value)| match value {
                Value::String(text) => Ok(text),
                Value::Number(number) => Ok(number.to_string()),
                other => Err(serde::de::Error::custom(format!(
                    "inputs[{i}]: expected a string or a number, not {other}"
                ))),
            })
            .collect()
    }
}

/// What a proplet says about itself in [`PropletCreate`], with upstream's keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PropletMetadata {
    /// Free text.
    #[serde(
        deserialize_with = "de::lenient",
        skip_serializing_if = "String::is_empty"
    )]
    pub description: String,
    /// Free labels.
    #[serde(
        deserialize_with = "de::lenient",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tags: Vec<String>,
    /// Where it runs.
    #[serde(
        deserialize_with = "de::lenient",
        skip_serializing_if = "String::is_empty"
    )]
    pub location: String,
    /// Its address.
    #[serde(
        deserialize_with = "de::lenient",
        skip_serializing_if = "String::is_empty"
    )]
    pub ip: String,
    /// `docker` or `binary`, upstream's values.
    #[serde(
        deserialize_with = "de::lenient",
        skip_serializing_if = "String::is_empty"
    )]
    pub environment: String,
    /// `linux`, …
    #[serde(
        deserialize_with = "de::lenient",
        skip_serializing_if = "String::is_empty"
    )]
    pub os: String,
    /// The host's name.
    #[serde(
        deserialize_with = "de::lenient",
        skip_serializing_if = "String::is_empty"
    )]
    pub hostname: String,
    /// `x86_64`, `aarch64`, …
    #[serde(
        deserialize_with = "de::lenient",
        skip_serializing_if = "String::is_empty"
    )]
    pub cpu_arch: String,
    /// The host's memory.
    #[serde(deserialize_with = "de::lenient", skip_serializing_if = "is_zero")]
    pub total_memory_bytes: u64,
    /// The proplet's version.
    #[serde(
        deserialize_with = "de::lenient",
        skip_serializing_if = "String::is_empty"
    )]
    pub proplet_version: String,
    /// What runs its tasks.
    #[serde(
        deserialize_with = "de::lenient",
        skip_serializing_if = "String::is_empty"
    )]
    pub wasm_runtime: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// On [`topic::PROPLET_CREATE`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PropletCreate {
    /// The proplet's id: its MQTT client id.
    pub proplet_id: String,
    /// Upstream's grouping; [`DEFAULT_NAMESPACE`] when none is configured.
    #[serde(default, deserialize_with = "de::null_as_default")]
    pub namespace: String,
    /// What the proplet says about itself.
    #[serde(default, deserialize_with = "de::lenient")]
    pub metadata: PropletMetadata,
}

/// On [`topic::PROPLET_ALIVE`]: a heartbeat, or the last will.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PropletAlive {
    /// The proplet's id.
    pub proplet_id: String,
    /// [`ALIVE`] or [`OFFLINE`].
    #[serde(default, deserialize_with = "de::null_as_default")]
    pub status: String,
    /// As in [`PropletCreate`]; upstream's proplet requires it.
    #[serde(default, deserialize_with = "de::null_as_default")]
    pub namespace: String,
}

/// On [`topic::MANAGER_START`]: upstream's Go `startPayload`, and what
/// upstream's Rust proplet decodes as `StartRequest`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StartTask {
    /// The task id.
    pub id: String,
    /// The exported function to run; `_start` or empty runs a WASI command.
    #[serde(default, deserialize_with = "de::null_as_default")]
    pub name: String,
    /// Upstream's task state, an integer; carried, not interpreted.
    #[serde(default, deserialize_with = "de::lenient")]
    pub state: u8,
    /// Where the proxy finds the module, when `file` is absent.
    #[serde(
        default,
        deserialize_with = "de::null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub image_url: String,
    /// The module itself, base64 (Go's encoding of `[]byte`).
    #[serde(
        default,
        deserialize_with = "de::null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub file: String,
    /// The function's arguments, as strings.
    #[serde(
        default,
        deserialize_with = "de::flex_strings",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub inputs: Vec<String>,
    /// The WASI command's arguments after the program name.
    #[serde(default, deserialize_with = "de::null_as_default")]
    pub cli_args: Vec<String>,
    /// Every proplet should run it.
    #[serde(default, deserialize_with = "de::null_as_default")]
    pub broadcast: bool,
    /// Upstream's long-running flag.
    #[serde(default, deserialize_with = "de::null_as_default")]
    pub daemon: bool,
    /// The WASI environment.
    #[serde(
        default,
        deserialize_with = "de::null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub env: BTreeMap<String, String>,
    /// Upstream's confidential-computing flag: the module must be decrypted
    /// in a TEE, which our proplet does not have.
    #[serde(default, deserialize_with = "de::null_as_default")]
    pub encrypted: bool,
    /// The one proplet that should run it.
    #[serde(
        default,
        deserialize_with = "de::null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub proplet_id: String,
}

/// On [`topic::MANAGER_STOP`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StopTask {
    /// The task id.
    pub id: String,
    /// Every proplet should stop it.
    #[serde(default, deserialize_with = "de::null_as_default")]
    pub broadcast: bool,
    /// The one proplet that should stop it.
    #[serde(
        default,
        deserialize_with = "de::null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub proplet_id: String,
}

/// Whether a start or stop aimed by `broadcast` and `proplet_id` is for `me`.
pub fn addressed_to(broadcast: bool, proplet_id: &str, me: &str) -> bool {
    broadcast || proplet_id.is_empty() || proplet_id == me
}

/// On [`topic::PROPLET_RESULTS`]: upstream's `ResultMessage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// The task id.
    pub task_id: String,
    /// Who ran it.
    #[serde(default, deserialize_with = "de::null_as_default")]
    pub proplet_id: String,
    /// What the task produced. Upstream's proplet, and ours, send a string
    /// (`""` on error); upstream's manager keeps whatever JSON arrives.
    #[serde(default)]
    pub results: Value,
    /// Why it failed; absent, null or empty on success.
    #[serde(default)]
    pub error: Option<String>,
}

impl TaskResult {
    /// A proplet's report of a finished task, in upstream's shape.
    pub fn new(task_id: &str, proplet_id: &str, outcome: Result<String, String>) -> Self {
        let (results, error) = match outcome {
            Ok(results) => (results, None),
            Err(error) => (
                String::new(),
                Some(truncated(&error, MAX_ERROR).into_owned()),
            ),
        };
        Self {
            task_id: task_id.to_owned(),
            proplet_id: proplet_id.to_owned(),
            results: Value::String(results),
            error,
        }
    }

    /// The error, if there is one: upstream sends `""` or `null` for none.
    pub fn failure(&self) -> Option<&str> {
        self.error.as_deref().filter(|e| !e.is_empty())
    }
}

/// CPU use in [`PropletMetrics`], upstream's `CPUMetrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CpuMetrics {
    /// CPU time in user mode since the process started.
    #[serde(deserialize_with = "de::lenient")]
    pub user_seconds: f64,
    /// CPU time in the kernel since the process started.
    #[serde(deserialize_with = "de::lenient")]
    pub system_seconds: f64,
    /// Over the last interval; 100 is one full core.
    #[serde(deserialize_with = "de::lenient")]
    pub percent: f64,
}

/// Memory use in [`PropletMetrics`], upstream's `MemoryMetrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MemoryMetrics {
    /// Resident set size.
    #[serde(deserialize_with = "de::lenient")]
    pub rss_bytes: u64,
    /// Heap figures, as upstream names them; for us the data segment.
    #[serde(deserialize_with = "de::lenient")]
    pub heap_alloc_bytes: u64,
    /// See [`Self::heap_alloc_bytes`].
    #[serde(deserialize_with = "de::lenient")]
    pub heap_sys_bytes: u64,
    /// See [`Self::heap_alloc_bytes`].
    #[serde(deserialize_with = "de::lenient")]
    pub heap_inuse_bytes: u64,
    /// The cgroup's usage, when in one.
    #[serde(
        deserialize_with = "de::lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub container_usage_bytes: Option<u64>,
    /// The cgroup's limit, when it has one.
    #[serde(
        deserialize_with = "de::lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub container_limit_bytes: Option<u64>,
}

/// On [`topic::PROPLET_METRICS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PropletMetrics {
    /// The proplet's id.
    pub proplet_id: String,
    /// As in [`PropletCreate`].
    #[serde(default, deserialize_with = "de::null_as_default")]
    pub namespace: String,
    /// When it was measured. We send RFC 3339, which upstream's manager
    /// parses; upstream's proplet sends serde's `SystemTime` object, kept as
    /// it came.
    #[serde(default)]
    pub timestamp: Value,
    /// CPU.
    #[serde(default, deserialize_with = "de::lenient")]
    pub cpu_metrics: CpuMetrics,
    /// Memory.
    #[serde(default, deserialize_with = "de::lenient")]
    pub memory_metrics: MemoryMetrics,
}

/// On [`topic::REGISTRY_REQUEST`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleRequest {
    /// The task's `image_url`.
    pub app_name: String,
}

/// On [`topic::REGISTRY_CHUNK`]: exactly upstream's `Chunk`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleChunk {
    /// The `app_name` asked for.
    pub app_name: String,
    /// From 0.
    pub chunk_idx: u32,
    /// How many chunks make the module.
    pub total_chunks: u32,
    /// This chunk's bytes, base64.
    #[serde(default, deserialize_with = "de::null_as_default")]
    pub data: String,
}

/// On [`topic::REGISTRY_ERROR`]: the proxy cannot serve `app_name`, so that
/// our proplets fail the task now rather than at their timeout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleError {
    /// The `app_name` asked for.
    pub app_name: String,
    /// Why, without local paths.
    pub error: String,
}

/// `time` as RFC 3339 in UTC with nanoseconds, what Go's `time.Time`
/// marshals and parses.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since.as_secs();
    let (days, second_of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
        since.subsec_nanos()
    )
}

/// Go's zero `time.Time`, which upstream shows for times not yet reached.
pub const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard
/// Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    /// What upstream's Go manager publishes: `cli_args` null, string inputs,
    /// `file` as Go's base64 of `[]byte`, fields we do not know.
    #[test]
    fn upstream_managers_start_parses() {
        let start: StartTask = serde_json::from_str(
            r#"{"id":"t1","name":"add","state":0,"file":"AGFzbQ==","inputs":["3","4"],"cli_args":null,"broadcast":false,"daemon":false,"encrypted":false,"proplet_id":"p1","monitoring_profile":{"enabled":true}}"#,
        )
        .unwrap();
        assert_eq!(start.inputs, ["3", "4"]);
        assert!(start.cli_args.is_empty());
        assert_eq!(start.file, "AGFzbQ==");
        assert!(addressed_to(start.broadcast, &start.proplet_id, "p1"));
        // Null for every list, map and string; numbers as inputs.
        let start: StartTask = serde_json::from_str(
            r#"{"id":"t2","name":null,"image_url":null,"file":null,"inputs":[3,4.5,-1],"cli_args":null,"env":null,"proplet_id":null}"#,
        )
        .unwrap();
        assert_eq!(start.inputs, ["3", "4.5", "-1"]);
        assert!(start.env.is_empty() && start.name.is_empty() && start.proplet_id.is_empty());
        let error = serde_json::from_str::<StartTask>(r#"{"id":"t3","inputs":[[1]]}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("inputs[0]"), "{error}");
    }

    /// What we send decodes as upstream's Rust proplet's `StartRequest`:
    /// `inputs` strings, `cli_args` a list, `state` a u8.
    #[test]
    fn our_start_has_upstreams_types() {
        let start = StartTask {
            id: "t1".into(),
            name: "add".into(),
            image_url: "add.wasm".into(),
            inputs: vec!["3".into(), "4".into()],
            proplet_id: "p1".into(),
            ..StartTask::default()
        };
        let json: Value = serde_json::from_slice(&payload(&start)).unwrap();
        assert_eq!(json["inputs"], json!(["3", "4"]));
        assert_eq!(json["cli_args"], json!([]));
        assert_eq!(json["state"], json!(0));
        assert_eq!(json["proplet_id"], json!("p1"));
        assert!(json.get("file").is_none());
    }

    #[test]
    fn results_in_every_form() {
        let upstream: TaskResult = serde_json::from_str(
            r#"{"task_id":"t1","proplet_id":"p1","results":"7","error":null}"#,
        )
        .unwrap();
        assert_eq!(upstream.results, json!("7"));
        assert_eq!(upstream.failure(), None);
        let failed: TaskResult =
            serde_json::from_str(r#"{"task_id":"t1","results":"","error":"boom"}"#).unwrap();
        assert_eq!(failed.failure(), Some("boom"));
        let any: TaskResult =
            serde_json::from_str(r#"{"task_id":"t1","results":{"a":[1,2]},"error":""}"#).unwrap();
        assert_eq!(any.results, json!({"a": [1, 2]}));
        let ours: Value =
            serde_json::from_slice(&payload(&TaskResult::new("t1", "p1", Err("trap".into()))))
                .unwrap();
        assert_eq!(
            ours,
            json!({"task_id":"t1","proplet_id":"p1","results":"","error":"trap"})
        );
    }

    #[test]
    fn announcements_and_metrics_tolerate_wrong_types() {
        let create: PropletCreate = serde_json::from_str(
            r#"{"proplet_id":"p1","namespace":"default","metadata":{"os":"linux","total_memory_bytes":"lots","tags":null,"extra":1}}"#,
        )
        .unwrap();
        assert_eq!(create.metadata.os, "linux");
        assert_eq!(create.metadata.total_memory_bytes, 0);
        let metrics: PropletMetrics = serde_json::from_str(
            r#"{"proplet_id":"p1","namespace":"default","timestamp":{"secs_since_epoch":1,"nanos_since_epoch":0},"cpu_metrics":{"percent":12.5},"memory_metrics":{"rss_bytes":1024,"container_limit_bytes":null}}"#,
        )
        .unwrap();
        assert_eq!(metrics.cpu_metrics.percent, 12.5);
        assert_eq!(metrics.memory_metrics.rss_bytes, 1024);
        let will: PropletAlive =
            serde_json::from_str(r#"{"status":"offline","proplet_id":"p1"}"#).unwrap();
        assert_eq!(will.status, OFFLINE);
    }

    #[test]
    fn chunks_carry_only_upstreams_fields() {
        let chunk = ModuleChunk {
            app_name: "a".into(),
            chunk_idx: 0,
            total_chunks: 1,
            data: "AA==".into(),
        };
        let json: Value = serde_json::from_slice(&payload(&chunk)).unwrap();
        let mut keys: Vec<&str> = json.as_object().unwrap().keys().map(|k| &**k).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["app_name", "chunk_idx", "data", "total_chunks"]);
    }

    #[test]
    fn outside_text_is_bounded_and_escaped() {
        let huge = "x".repeat(3 << 20);
        let result = TaskResult::new("t", "p", Err(format!("input 0: {huge:?}")));
        assert!(payload(&result).len() < MAX_ERROR + 200);
        assert_eq!(truncated("héllo", 2), "h… [5 bytes dropped]");
        assert_eq!(truncated("short", 10), "short");
        assert_eq!(
            Untrusted("a\r\nINFO forged").to_string(),
            "a\\r\\nINFO forged"
        );
        let shown = Untrusted(&huge).to_string();
        assert!(shown.len() < 250 && shown.ends_with(&format!("[{} bytes]", huge.len())));
    }

    #[test]
    fn addressing() {
        assert!(addressed_to(true, "other", "me"));
        assert!(addressed_to(false, "", "me"));
        assert!(addressed_to(false, "me", "me"));
        assert!(!addressed_to(false, "other", "me"));
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::new(951_782_400 + 86_399, 5);
        assert_eq!(rfc3339(leap), "2000-02-29T23:59:59.000000005Z");
        let later = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_608_800);
        assert_eq!(rfc3339(later), "2026-12-07T02:00:00.000000000Z");
    }
}
