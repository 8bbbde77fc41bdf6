//! Skipped end-to-end tests, counted over one `cargo test` run, so that a
//! green run without the servers cannot pass for a full one.
//!
//! Each skip prints one line on the process's stderr, which libtest does
//! not capture, saying how many were skipped so far in this run; and it
//! appends a line to a file in the target directory, shared by the test
//! binaries of the run. `tests/zz_skipped.rs` prints the total at the end
//! of this package's tests (see there for why it runs last) and fails
//! under CI if any test was skipped.
//!
//! A run is the process that started the test binaries (cargo), named by
//! its pid and start time: lines left by an interrupted run, or by a run
//! of a single test binary, are not counted in the next one.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

/// Skips `test` for want of what `why` says (and how to install it): under
/// CI, where every end-to-end test must run, panics instead; otherwise
/// [`record`]s it.
pub fn skip(test: &str, why: &str) {
    let message = format!("{test}: SKIPPED, {why}");
    if std::env::var_os("CI").is_some() {
        panic!("{message} (CI requires it)");
    }
    record(&message);
}

/// Prints `message` (a test's name and why it is skipped) on stderr with the
/// count so far, and records it for the summary. [`skip`] is the way in for
/// a test; this one never panics.
pub fn record(message: &str) {
    static LOCK: Mutex<()> = Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let run = run();
    let line = format!("{run}\t{}\n", message.replace(['\n', '\t'], " "));
    let recorded = OpenOptions::new()
        .create(true)
        .append(true)
        .open(file())
        .and_then(|mut file| file.write_all(line.as_bytes()));
    let count = match recorded {
        Ok(()) => this_run(&run).len().to_string(),
        Err(e) => format!("? (cannot record it in {}: {e})", file().display()),
    };
    let _ = writeln!(
        std::io::stderr(),
        "{message} [{count} end-to-end tests skipped so far in this run]"
    );
}

/// The skips of this run, and forgets them (and those of runs that have
/// ended) for the next one.
pub fn take() -> Vec<String> {
    let run = run();
    let skipped = this_run(&run);
    let text = std::fs::read_to_string(file()).unwrap_or_default();
    // What a run still going (another cargo on the same target directory)
    // recorded stays.
    let kept: String = text
        .lines()
        .filter(|line| {
            let id = line.split('\t').next().unwrap_or_default();
            id != run && alive(id)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    let _ = match kept.is_empty() {
        true => std::fs::remove_file(file()),
        false => std::fs::write(file(), kept),
    };
    skipped
}

fn this_run(run: &str) -> Vec<String> {
    std::fs::read_to_string(file())
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.strip_prefix(run)?.strip_prefix('\t'))
        .map(str::to_owned)
        .collect()
}

/// `target/<profile>/propeller-tests-skipped`, next to the test binaries
/// (`target/<profile>/deps/<test>`).
fn file() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors()
        .nth(2)
        .expect("profile directory")
        .join("propeller-tests-skipped")
}

/// `<pid>:<start time>` of the process that started this test binary.
fn run() -> String {
    let parent = std::os::unix::process::parent_id();
    format!("{parent}:{}", start_time(parent).unwrap_or_default())
}

/// Whether the run named `id` is still going.
fn alive(id: &str) -> bool {
    let Some((pid, started)) = id.split_once(':') else {
        return false;
    };
    pid.parse()
        .ok()
        .and_then(start_time)
        .is_some_and(|now| now == started)
}

/// Field 22 of `/proc/<pid>/stat`: when the process started, in clock
/// ticks since boot (with the pid, unique for as long as the machine runs).
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which may hold spaces and parentheses.
    let (_, fields) = stat.rsplit_once(')')?;
    fields.split_whitespace().nth(19).map(str::to_owned)
}
