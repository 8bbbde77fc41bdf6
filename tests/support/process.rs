//! A service binary run as a child process, its output captured line by line.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

/// `cargo`, as the running cargo (`$CARGO`) when there is one, without the
/// variables cargo sets for the build or run of a crate: build scripts such
/// as ring's rerun when those change, so passing them on would make this
/// build and a plain `cargo build` undo each other's work.
pub fn nested_cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = crate::children::command(cargo);
    for (name, _) in std::env::vars_os() {
        let set_by_cargo = name.to_str().is_some_and(|name| {
            name.starts_with("CARGO_PKG_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_MANIFEST_LINKS",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&name)
        });
        if set_by_cargo {
            command.env_remove(&name);
        }
    }
    command
}

/// Builds the binaries once per test process, and returns the path of one.
///
/// `cargo test` builds the test harness of a binary, not the binary itself, so
/// we ask cargo for it (a no-op when it is up to date).
pub fn binary(name: &str) -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    let profile_dir = exe
        .ancestors()
        .nth(2)
        .expect("profile directory")
        .to_owned();
    BUILD.call_once(|| {
        let mut build = nested_cargo();
        // The services, the `propeller-mqtt` tool, and the connection
        // crate's examples (`binary("examples/sensor")`).
        build.args([
            "build",
            "-q",
            "-p",
            "manager",
            "-p",
            "proplet",
            "-p",
            "proxy",
            "-p",
            "propeller-mqtt-cli",
            "-p",
            "propeller-mqtt",
            "--bins",
            "--examples",
        ]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build of the service binaries failed"
        );
    });
    profile_dir.join(name)
}

/// A running service. Killed when dropped.
pub struct ServiceProcess {
    child: Child,
    output: Arc<(Mutex<String>, Condvar)>,
}

impl ServiceProcess {
    /// Starts `binary` with exactly `env` (plus PATH), output captured.
    pub fn start(binary: &str, env: &[(String, String)]) -> ServiceProcess {
        Self::start_with_args(binary, &[], env)
    }

    /// Starts `binary` with `args` and exactly `env` (plus PATH), output captured.
    pub fn start_with_args(
        binary: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> ServiceProcess {
        Self::spawn(binary, args, env, None)
    }

    /// Starts `binary` with exactly `env` (plus PATH) in the directory
    /// `dir`, output captured: for what a service finds in its working
    /// directory, such as the manager's default store file.
    pub fn start_in(
        binary: &str,
        env: &[(String, String)],
        dir: &std::path::Path,
    ) -> ServiceProcess {
        Self::spawn(binary, &[], env, Some(dir))
    }

    fn spawn(
        binary: &str,
        args: &[&str],
        env: &[(String, String)],
        dir: Option<&std::path::Path>,
    ) -> ServiceProcess {
        let mut command = crate::children::command(self::binary(binary));
        if let Some(dir) = dir {
            command.current_dir(dir);
        }
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child =
            crate::children::spawn(command).unwrap_or_else(|e| panic!("start {binary}: {e}"));
        let output = Arc::new((Mutex::new(String::new()), Condvar::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let (text, changed) = &*output;
                    let mut text = text.lock().unwrap();
                    text.push_str(&line);
                    text.push('\n');
                    changed.notify_all();
                }
            });
        }
        ServiceProcess { child, output }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.output.0.lock().unwrap().clone()
    }

    /// Waits until a line contains `needle`; returns that line, or panics with
    /// the output after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let (text, changed) = &*self.output;
        let mut guard = text.lock().unwrap();
        loop {
            if let Some(line) = guard.lines().find(|line| line.contains(needle)) {
                return line.to_owned();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no line with {needle:?} within {timeout:?}; output:\n{guard}"
            );
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// Waits until `count` lines contain `needle`, or panics with the output.
    pub fn wait_for_count(&self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (text, changed) = &*self.output;
        let mut guard = text.lock().unwrap();
        while guard.lines().filter(|line| line.contains(needle)).count() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "fewer than {count} lines with {needle:?} within {timeout:?}; output:\n{guard}"
            );
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// Sends a signal by name, e.g. `"HUP"`.
    pub fn signal(&self, name: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status();
    }

    /// Sends SIGTERM and waits (at most `timeout`) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.wait(timeout)
    }

    /// Waits (at most `timeout`) for the process to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the service") {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {timeout:?}; output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        // `cargo test -- --nocapture` with PROPELLER_TEST_OUTPUT=1 shows every service's log.
        if std::env::var_os("PROPELLER_TEST_OUTPUT").is_some() {
            eprintln!("--- service output ---\n{}", self.output());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
