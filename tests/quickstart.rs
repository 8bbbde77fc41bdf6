//! The README's first command, `cargo run --example quickstart`, starts the
//! real manager, proplet and proxy binaries in plain, MQTTS and mTLS mode, and
//! in each one the proplet is discovered, a task runs inline, one runs with a
//! module the proxy streams in several chunks, and a WASI command runs with
//! its arguments. It explains a refusal, prints a table, exits 0 within 30 s
//! after the build, and leaves no process or file behind, even on Ctrl-C.
//! It needs nothing installed: no mosquitto, no nginx.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The build of the services included, when they are not built yet.
const RUN_LIMIT: Duration = Duration::from_secs(600);

/// target/<profile>, where cargo put this test's profile.
fn profile_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .ancestors()
        .nth(2)
        .unwrap()
        .to_owned()
}

/// Builds the example (the quickstart builds the services itself) and starts
/// it, its stdout and stderr merged into lines sent on the channel.
fn start_quickstart() -> (Child, mpsc::Receiver<String>) {
    let profile_dir = profile_dir();
    let mut build = propeller_tests::process::nested_cargo();
    build.args([
        "build",
        "-q",
        "--example",
        "quickstart",
        "-p",
        "propeller-examples",
    ]);
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    let status = build.status().expect("run cargo build");
    assert!(status.success(), "cargo build --example quickstart");
    // SIGTERM if this process dies: the quickstart then stops its services.
    let mut command = propeller_tests::children::command_with_signal(
        profile_dir.join("examples/quickstart"),
        "TERM",
    );
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = propeller_tests::children::spawn(command).expect("start the quickstart");
    let (lines, received) = mpsc::channel();
    let streams: [Box<dyn Read + Send>; 2] = [
        Box::new(child.stdout.take().unwrap()),
        Box::new(child.stderr.take().unwrap()),
    ];
    for stream in streams {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
    }
    (child, received)
}

/// Collects lines until the quickstart exits (killed after `RUN_LIMIT`), or
/// until a line contains `until`.
fn read(
    child: &mut Child,
    lines: &mpsc::Receiver<String>,
    text: &mut String,
    until: Option<&str>,
) -> Option<ExitStatus> {
    let deadline = Instant::now() + RUN_LIMIT;
    loop {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let found = until.is_some_and(|needle| line.contains(needle));
                text.push_str(&line);
                text.push('\n');
                if found {
                    return None;
                }
                continue;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // Both pipes closed: the quickstart has ended.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Some(child.wait().unwrap());
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the quickstart did not finish within {RUN_LIMIT:?}:\n{text}");
        }
    }
}

/// The temporary directory the quickstart named.
fn temp_dir(text: &str) -> PathBuf {
    text.lines()
        .find_map(|line| {
            line.strip_prefix("1. PKI made in ")?
                .split(" with ")
                .next()
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| panic!("the temporary directory is not named:\n{text}"))
}

/// Checks that no service the quickstart started is still running, and that
/// no process works in its temporary directory.
fn assert_no_process_left(text: &str, dir: &Path) {
    let pids: Vec<u32> = text
        .split("(pid ")
        .skip(1)
        .filter_map(|rest| rest.split(')').next()?.parse().ok())
        .collect();
    assert!(pids.len() >= 3, "no service pids printed:\n{text}");
    if !cfg!(target_os = "linux") {
        return;
    }
    let binaries: Vec<PathBuf> = ["manager", "proplet", "proxy"]
        .iter()
        .map(|name| profile_dir().join(name))
        .collect();
    for pid in pids {
        // A pid may have been reused since, but not by one of our services.
        let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
            continue;
        };
        let exe = exe.to_string_lossy().replace(" (deleted)", "");
        assert!(
            !binaries.iter().any(|binary| Path::new(&exe) == binary),
            "service pid {pid} ({exe}) is still running"
        );
    }
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cwd) = std::fs::read_link(entry.path().join("cwd")) {
            assert!(
                !cwd.starts_with(dir),
                "process {} still works in {}",
                entry.file_name().to_string_lossy(),
                dir.display()
            );
        }
    }
}

/// The rows of the summary table: mode, step, outcome, time. Columns are
/// apart by two spaces or more; no cell holds two spaces in a row.
fn table(text: &str) -> Vec<[String; 4]> {
    text.lines()
        .skip_while(|line| !line.starts_with("  mode "))
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .map(|line| {
            let cells: Vec<String> = line
                .split("  ")
                .map(str::trim)
                .filter(|cell| !cell.is_empty())
                .map(str::to_owned)
                .collect();
            cells
                .try_into()
                .unwrap_or_else(|cells| panic!("not 4 cells: {cells:?}"))
        })
        .collect()
}

#[test]
fn quickstart_runs_tasks_in_every_mode() {
    let (mut child, lines) = start_quickstart();
    let mut text = String::new();
    let status = read(&mut child, &lines, &mut text, None).unwrap();
    assert!(status.success(), "{status}:\n{text}");
    assert!(text.contains("\nevery outcome as expected\n"), "{text}");

    let rows = table(&text);
    let row = |mode: &str, step: &str| {
        rows.iter()
            .find(|row| row[0] == mode && row[1] == step)
            .unwrap_or_else(|| panic!("no row {mode} {step} in:\n{text}"))
    };
    for mode in ["plain", "mqtts", "mtls"] {
        let expected = [
            ("discovered", "proplet-1 alive"),
            ("inline task", "add(3,4) = 7"),
            ("proxy task", "add(3,4) = 7, module of "),
            (
                "wasi command",
                "printed \"hello world GREETING=hi PROPLET_ID=proplet-1\"",
            ),
            ("stopped", "proxy, manager, proplet exited 0 on SIGTERM"),
        ];
        for (step, outcome) in expected {
            let [_, _, shown, time] = row(mode, step);
            assert!(
                shown.starts_with(outcome),
                "{mode} {step}: {shown:?}, expected {outcome:?}:\n{text}"
            );
            let millis = time
                .strip_suffix(" ms")
                .and_then(|ms| ms.parse::<u64>().ok());
            assert!(millis.is_some(), "{mode} {step}: time {time:?}:\n{text}");
        }
        // The proxied module really took several chunks.
        let proxied = &row(mode, "proxy task")[2];
        let chunks: u32 = proxied
            .split(" in ")
            .nth(1)
            .and_then(|rest| rest.strip_suffix(" chunks"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no chunk count in {proxied:?}"));
        assert!(chunks > 1, "{proxied}");
    }
    assert_eq!(
        row("mtls", "wrong CN")[2],
        "refused: the connection was closed before the broker answered CONNECT",
        "{text}"
    );
    assert_eq!(rows.len(), 16, "{text}");

    // The services' own logs: every service connected in every mode, and the
    // proxy streamed the module.
    assert_eq!(
        text.matches("INFO MQTT connection established").count(),
        9,
        "{text}"
    );
    assert_eq!(
        text.matches("proxy   INFO module sent").count(),
        3,
        "{text}"
    );
    assert!(
        !text.contains("-secret-"),
        "a client key was printed:\n{text}"
    );

    let seconds: f64 = text
        .lines()
        .find_map(|line| {
            line.strip_prefix("finished in ")?
                .split(" s after the build")
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no duration:\n{text}"));
    // RUN_LIMIT guards against a hang; the time is a figure, not a verdict.
    println!("quickstart: {seconds} s after the build");

    let dir = temp_dir(&text);
    assert!(!dir.exists(), "{} was left behind", dir.display());
    assert_no_process_left(&text, &dir);
}

#[test]
fn quickstart_cleans_up_when_interrupted() {
    let (mut child, lines) = start_quickstart();
    let mut text = String::new();
    // Interrupted while the first task runs: the three services are up.
    let ended = read(&mut child, &lines, &mut text, Some("task started"));
    assert!(ended.is_none(), "the quickstart ended early:\n{text}");
    let status = Command::new("sh")
        .args(["-c", &format!("kill -INT {}", child.id())])
        .status()
        .unwrap();
    assert!(status.success());
    let status = read(&mut child, &lines, &mut text, None).unwrap();
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(
        text.contains("interrupted by Ctrl-C (SIGINT): the services were stopped"),
        "{text}"
    );
    let dir = temp_dir(&text);
    assert!(!dir.exists(), "{} was left behind", dir.display());
    assert_no_process_left(&text, &dir);
}
