//! The manager's store, measured: tasks created and completed per second
//! with memory, SQLite and PostgreSQL, and the store's share of a task's
//! round trip. The real manager, proplet and mosquitto, and a PostgreSQL
//! started for the run (Debian's `postgresql`), as `tests/store.rs` runs
//! them. Prints the table of BENCHMARKS.md ("The manager's store"); asserts
//! nothing.
//!
//! ```sh
//! cargo run --release --example store-bench
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use propeller_tests::http::{finished_task, request, start_task};
use propeller_tests::lab::{Lab, MANAGER};
use propeller_tests::managers::{add_task, pairs, proplet_listed, request_text, start_manager};
use propeller_tests::postgres::{self, Postgres};

const PROPLET_ID: &str = "proplet-client";

fn main() {
    let harness = "store-bench";
    let Some(bin) = postgres::available_with_servers(harness) else {
        std::process::exit(1);
    };
    let pg = Postgres::start(&bin);
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("bench.db").display().to_string();
    let stores: Vec<(&str, Vec<(String, String)>)> = vec![
        ("memory", pairs(&[("STORAGE_TYPE", "memory")])),
        (
            "sqlite",
            pairs(&[("STORAGE_TYPE", "sqlite"), ("SQLITE_PATH", &sqlite)]),
        ),
        ("postgres", pg.settings()),
    ];
    for (tasks, clients) in [(300usize, 1usize), (2000, 8)] {
        println!("\n{tasks} tasks (create, start, add(3,4) on one proplet, result), {clients} client(s) at once");
        println!(
            "store     tasks/s   round trip   commits   mean commit   commit time / round trip"
        );
        for (name, settings) in &stores {
            measure(name, settings, tasks, clients, dir.path());
        }
    }
}

/// One line of the table.
fn measure(name: &str, settings: &[(String, String)], tasks: usize, clients: usize, dir: &Path) {
    let lab = Lab::start();
    let (manager, api) = start_manager(&lab, MANAGER, settings, dir);
    let _proplet = lab.proplet();
    proplet_listed(api, PROPLET_ID, true, Duration::from_secs(20));
    // Warm up.
    finished_task(api, &start_task(api, add_task()), Duration::from_secs(10));
    let before = store_figures(api);
    let started = Instant::now();
    let round_trips: Vec<Duration> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(move || {
                    let mut times = Vec::new();
                    for _ in 0..tasks / clients {
                        let began = Instant::now();
                        let id = start_task(api, add_task());
                        loop {
                            let (_, task) =
                                request(api, "GET", &format!("/tasks/{id}/results"), None);
                            if task["results"] == "7" {
                                break;
                            }
                            assert!(
                                began.elapsed() < Duration::from_secs(30),
                                "task {id} not done"
                            );
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        times.push(began.elapsed());
                    }
                    times
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let elapsed = started.elapsed();
    let after = store_figures(api);
    let mean = round_trips.iter().sum::<Duration>() / round_trips.len() as u32;
    let commits = after.0 - before.0;
    let mean_commit = match commits {
        0 => 0.0,
        n => (after.1 - before.1) / n as f64 * 1e3,
    };
    // Each task waits for two commits (its creation, its start); its
    // result is committed off the API's path.
    let share = 2.0 * mean_commit / (mean.as_secs_f64() * 1e3);
    println!(
        "{name:<9} {:>7.0}   {:>7.2} ms   {commits:>7}   {mean_commit:>8.3} ms   {:>5.1} %",
        round_trips.len() as f64 / elapsed.as_secs_f64(),
        mean.as_secs_f64() * 1e3,
        share * 100.0
    );
    drop(manager);
}

/// `propeller_manager_store_writes_total` and `…_write_seconds_total`.
fn store_figures(api: u16) -> (u64, f64) {
    let (_, text) = request_text(api, "/metrics");
    let value = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (
        value("propeller_manager_store_writes_total") as u64,
        value("propeller_manager_store_write_seconds_total"),
    )
}
