//! What the proplet tells the manager about the machine it runs on: the
//! announcement's metadata and the periodic metrics, in upstream's shape.
//! Read from Linux's `/proc` and cgroup files; elsewhere the figures are 0.

use std::time::{Instant, SystemTime};

use propeller_protocol::{rfc3339, CpuMetrics, MemoryMetrics, PropletMetadata, PropletMetrics};

/// Linux's clock ticks per second for `/proc/<pid>/stat` (USER_HZ), 100 on
/// every architecture Linux runs on today.
const TICKS_PER_SECOND: f64 = 100.0;

/// The announcement's metadata, with upstream's keys and values.
pub fn metadata() -> PropletMetadata {
    let environment = match std::path::Path::new("/.dockerenv").exists() {
        true => "docker",
        false => "binary",
    };
    PropletMetadata {
        environment: environment.to_owned(),
        os: std::env::consts::OS.to_owned(),
        hostname: read("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default(),
        cpu_arch: std::env::consts::ARCH.to_owned(),
        total_memory_bytes: read("/proc/meminfo")
            .and_then(|m| kib_field(&m, "MemTotal:"))
            .unwrap_or_default(),
        proplet_version: env!("CARGO_PKG_VERSION").to_owned(),
        wasm_runtime: "wasmi".to_owned(),
        ..PropletMetadata::default()
    }
}

/// CPU and memory of this process, sampled every liveliness interval; CPU
/// percent is over the time since the last sample.
pub struct Sampler {
    last: Option<(Instant, f64)>,
}

impl Sampler {
    /// A sampler with no previous sample.
    pub fn new() -> Self {
        Self { last: None }
    }

    /// The metrics message for `proplet_id` now.
    pub fn sample(&mut self, proplet_id: &str, namespace: &str) -> PropletMetrics {
        let now = Instant::now();
        let (user_seconds, system_seconds) = cpu_seconds().unwrap_or_default();
        let used = user_seconds + system_seconds;
        let percent = match self.last {
            Some((then, before)) => {
                let wall = now.duration_since(then).as_secs_f64();
                if wall > 0.0 {
                    (used - before) / wall * 100.0
                } else {
                    0.0
                }
            }
            None => 0.0,
        };
        self.last = Some((now, used));
        let status = read("/proc/self/status").unwrap_or_default();
        let heap = kib_field(&status, "VmData:").unwrap_or_default();
        PropletMetrics {
            proplet_id: proplet_id.to_owned(),
            namespace: namespace.to_owned(),
            timestamp: rfc3339(SystemTime::now()).into(),
            cpu_metrics: CpuMetrics {
                user_seconds,
                system_seconds,
                percent,
            },
            memory_metrics: MemoryMetrics {
                rss_bytes: kib_field(&status, "VmRSS:").unwrap_or_default(),
                heap_alloc_bytes: heap,
                heap_sys_bytes: heap,
                heap_inuse_bytes: heap,
                container_usage_bytes: number("/sys/fs/cgroup/memory.current"),
                container_limit_bytes: number("/sys/fs/cgroup/memory.max"),
            },
        }
    }
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// A `Name:  123 kB` line of a `/proc` file, in bytes.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// A file holding one number; `max` (no limit) and absence are `None`.
fn number(path: &str) -> Option<u64> {
    read(path)?.trim().parse().ok()
}

/// User and system CPU seconds from `/proc/self/stat`, whose fields 14 and
/// 15 follow the parenthesised command name.
fn cpu_seconds() -> Option<(f64, f64)> {
    let stat = read("/proc/self/stat")?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name, field 3 (state) is index 0, so 14 and 15 are 11 and 12.
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    Some((ticks(11)? / TICKS_PER_SECOND, ticks(12)? / TICKS_PER_SECOND))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_parse() {
        assert_eq!(
            kib_field("VmPeak:\t 100 kB\nVmRSS:\t   2048 kB\n", "VmRSS:"),
            Some(2 << 20)
        );
        assert_eq!(kib_field("VmRSS: x kB", "VmRSS:"), None);
    }

    #[test]
    fn samples_have_upstreams_shape() {
        let mut sampler = Sampler::new();
        let first = sampler.sample("p1", "default");
        let json = serde_json::to_value(&first).unwrap();
        for key in [
            "proplet_id",
            "namespace",
            "timestamp",
            "cpu_metrics",
            "memory_metrics",
        ] {
            assert!(json.get(key).is_some(), "{key}");
        }
        if cfg!(target_os = "linux") {
            assert!(first.memory_metrics.rss_bytes > 0);
            assert!(metadata().total_memory_bytes > 0);
        }
        assert_eq!(metadata().wasm_runtime, "wasmi");
    }
}
