//! What the outbox on disk (`<P>_MQTT_OUTBOX_DIR`) costs: publish throughput
//! with and without it, and the price of the syncs behind it, on the file
//! system of the directory. Prints the tables of BENCHMARKS.md's "Disk
//! outbox"; asserts nothing.
//!
//! ```sh
//! apt-get install -y mosquitto openssl
//! cargo run --release -p propeller-examples --example outbox-bench
//! cargo run --release -p propeller-examples --example outbox-bench -- /var/lib/somewhere
//! ```
//!
//! The directory (default: a temporary one under the system's temp dir)
//! decides everything: on tmpfs an fsync costs nothing, on a disk it is the
//! whole cost. The client runs on a one-thread tokio runtime, as in the
//! services; 256-byte messages at QoS 1, to mosquitto's plain listener.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use propeller_mqtt::{Client, ConnectionState, Delivery, Options, QoS, Secret};
use propeller_tests::{accounts, client_id, Mosquitto, Pki, CHANNEL_TOPICS};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const PAYLOAD: usize = 256;
/// Messages per run.
const MESSAGES: usize = 2_000;
/// Runs per cell, interleaved across the cells and between memory and disk.
const RUNS: usize = 5;
/// Publishers at once in the concurrent rows.
const CONCURRENT: usize = 16;
/// Samples of the raw sync costs.
const SYNCS: usize = 200;
const TOPIC: &str = "m/dom/c/chan/bench";

fn main() -> Result<()> {
    let base = match std::env::args().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => std::env::temp_dir(),
    };
    fs::create_dir_all(&base)?;
    let scratch = tempfile::tempdir_in(&base)?;
    println!(
        "outbox directories under {} ({}); {PAYLOAD} B messages at QoS 1, {MESSAGES} per run, median (min–max) of {RUNS} runs\n",
        base.display(),
        file_system(&base)
    );
    sync_costs(scratch.path())?;

    let pki = Pki::shared();
    let publisher = pki.identity("proplet");
    let broker = Mosquitto::start(pki, &accounts(&[&publisher], CHANNEL_TOPICS));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let up = Options::new(
        &format!("tcp://127.0.0.1:{}", broker.plain),
        client_id("proplet"),
        Secret::new(publisher.secret.clone()),
    )?;
    let down = Options::new(&nowhere()?, "bench-offline", Secret::new("key"))?;

    let cells: Vec<(&str, &Options, bool, usize)> = [
        ("`publish` returns, broker down", &down, false),
        ("first publish to last PUBACK, mosquitto up", &up, true),
    ]
    .into_iter()
    .flat_map(|(what, options, acked)| {
        [1, CONCURRENT].map(|publishers| (what, options, acked, publishers))
    })
    .collect();
    // Every cell once per round, memory then disk: the machine is shared,
    // and what disturbs one run disturbs its neighbours alike.
    let mut samples = vec![(Vec::new(), Vec::new()); cells.len()];
    for run in 0..RUNS {
        for (cell, (_, options, acknowledged, publishers)) in cells.iter().enumerate() {
            let options = (*options)
                .clone()
                .with_qos(QoS::AtLeastOnce)
                .with_outbox_limit(MESSAGES * 2)
                // Also how long the shutdown waits for PUBACKs: not long
                // when none can come.
                .with_connect_timeout(match acknowledged {
                    true => Duration::from_secs(5),
                    false => Duration::from_millis(200),
                });
            let memory = runtime.block_on(rate(&options, *publishers, *acknowledged))?;
            let dir = scratch.path().join(format!("{cell}-{run}"));
            let stored = options.with_outbox_dir(&dir);
            let disk = runtime.block_on(rate(&stored, *publishers, *acknowledged))?;
            fs::remove_dir_all(&dir)?;
            samples[cell].0.push(memory);
            samples[cell].1.push(disk);
        }
    }
    println!("\n| what is measured | publishers | memory: msg/s | disk: msg/s | disk / memory | disk: µs per message |");
    println!("|---|---|---|---|---|---|");
    for ((what, _, _, publishers), (memory, disk)) in cells.iter().zip(samples) {
        let (memory, disk) = (Summary::of(memory), Summary::of(disk));
        println!(
            "| {what} | {publishers} | {memory} | {disk} | {:.3} | {:.0} |",
            disk.median / memory.median,
            1e6 / disk.median
        );
    }
    Ok(())
}

/// An address where nothing listens.
fn nowhere() -> Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(format!("tcp://{}", listener.local_addr()?))
}

/// Messages per second over one run: `MESSAGES` published by `publishers`
/// tasks, each awaiting its `publish` before the next; until the last
/// `publish` returns, or until the last PUBACK when `acknowledged`.
async fn rate(options: &Options, publishers: usize, acknowledged: bool) -> Result<f64> {
    let (client, _messages) = Client::start(options, Vec::new())?;
    if acknowledged {
        let mut state = client.state();
        tokio::time::timeout(
            Duration::from_secs(10),
            state.wait_for(|s| *s == ConnectionState::Connected),
        )
        .await??;
    }
    let payload = bytes::Bytes::from(vec![b'x'; PAYLOAD]);
    let began = Instant::now();
    let mut tasks = Vec::new();
    for publisher in 0..publishers {
        let (client, payload) = (client.clone(), payload.clone());
        let count = MESSAGES / publishers + usize::from(publisher < MESSAGES % publishers);
        tasks.push(tokio::spawn(async move {
            let mut deliveries: Vec<Delivery> = Vec::with_capacity(count);
            for _ in 0..count {
                deliveries.push(client.publish(TOPIC, payload.clone()).await?);
            }
            Ok::<_, propeller_mqtt::ClientError>(deliveries)
        }));
    }
    let mut deliveries = Vec::new();
    for task in tasks {
        deliveries.extend(task.await??);
    }
    if acknowledged {
        for delivery in deliveries {
            delivery.acknowledged().await?;
        }
    }
    let seconds = began.elapsed().as_secs_f64();
    client.shutdown().await;
    Ok(MESSAGES as f64 / seconds)
}

/// The raw costs behind the policy: a message file written and
/// `fdatasync`ed, renamed, and the directory `fsync`ed.
fn sync_costs(base: &Path) -> Result<()> {
    let dir = base.join("syncs");
    fs::create_dir_all(&dir)?;
    let handle = File::open(&dir)?;
    let payload = vec![b'x'; PAYLOAD + 40];
    let (mut write, mut data, mut rename, mut directory) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..SYNCS {
        let partial = dir.join(format!("{i:020}.tmp"));
        let at = Instant::now();
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)?;
        file.write_all(&payload)?;
        write.push(at.elapsed());
        let at = Instant::now();
        file.sync_data()?;
        data.push(at.elapsed());
        let at = Instant::now();
        fs::rename(&partial, dir.join(format!("{i:020}.msg")))?;
        rename.push(at.elapsed());
        let at = Instant::now();
        handle.sync_all()?;
        directory.push(at.elapsed());
    }
    let micros = |samples: Vec<Duration>| {
        Summary::of(samples.into_iter().map(|d| d.as_secs_f64() * 1e6).collect())
    };
    println!("| step, per message ({SYNCS} samples) | µs, median (p10–p90) |");
    println!("|---|---|");
    println!(
        "| create and write `<seq>.tmp` | {} |",
        micros(write).spread()
    );
    println!("| `fdatasync` of the file | {} |", micros(data).spread());
    println!("| rename to `<seq>.msg` | {} |", micros(rename).spread());
    println!(
        "| `fsync` of the directory | {} |",
        micros(directory).spread()
    );
    fs::remove_dir_all(&dir)?;
    Ok(())
}

/// The file system type of the mount holding `path`, from /proc/mounts.
fn file_system(path: &Path) -> String {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            path.starts_with(point)
                .then(|| (point.len(), kind.to_owned()))
        })
        .max()
        .map_or_else(|| "file system unknown".to_owned(), |(_, kind)| kind)
}

#[derive(Clone, Copy)]
struct Summary {
    median: f64,
    low: f64,
    high: f64,
    p10: f64,
    p90: f64,
}

impl Summary {
    fn of(mut samples: Vec<f64>) -> Summary {
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Summary {
            median: at(0.5),
            low: samples[0],
            high: samples[samples.len() - 1],
            p10: at(0.1),
            p90: at(0.9),
        }
    }

    fn spread(self) -> String {
        format!("{:.0} ({:.0}–{:.0})", self.median, self.p10, self.p90)
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.0} ({:.0}–{:.0})", self.median, self.low, self.high)
    }
}
