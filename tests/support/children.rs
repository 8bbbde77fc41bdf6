//! Every long-running child of the tests (servers, services, drivers) is
//! started here, so that none outlives the test process: a run killed by
//! Ctrl-C, a CI timeout or SIGKILL leaves no mosquitto, nginx, PostgreSQL
//! or service behind. The guards that own the children still stop them
//! when dropped, on a panic too; this covers the deaths no `Drop` sees.
//!
//! The tie is Linux's parent-death signal, which util-linux's `setpriv
//! --pdeathsig` sets before it execs the real program (so the child's pid
//! is the server's, and no `unsafe` `pre_exec` is needed). The kernel sends
//! it when the *thread* that forked the child exits, not the process: a
//! child started from a short-lived thread, such as the broker restarted
//! by the kill test's killer thread, would die with that thread. So every
//! child is forked by one spawner thread that lives as long as the process.
//! Without a `setpriv` that knows `--pdeathsig` (not Linux, or an old
//! util-linux), children start untied and only the guards stop them.

use std::ffi::OsStr;
use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;

/// A command for `program`, killed (SIGKILL) if the test process dies.
/// Start it with [`spawn`].
pub fn command(program: impl AsRef<OsStr>) -> Command {
    command_with_signal(program, "KILL")
}

/// Like [`command`], with `signal` (`TERM`, …) at the test process's death:
/// for a child that must stop children of its own.
pub fn command_with_signal(program: impl AsRef<OsStr>, signal: &str) -> Command {
    match setpriv() {
        Some(setpriv) => {
            let mut command = Command::new(setpriv);
            command.args(["--pdeathsig", signal, "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Whether children are tied to the test process.
pub fn tied() -> bool {
    setpriv().is_some()
}

/// `setpriv`, by its full path (commands may clear `PATH`), if it has
/// `--pdeathsig`.
fn setpriv() -> Option<&'static PathBuf> {
    static SETPRIV: OnceLock<Option<PathBuf>> = OnceLock::new();
    SETPRIV
        .get_or_init(|| {
            let path = std::env::var_os("PATH")?;
            let setpriv = std::env::split_paths(&path)
                .map(|dir| dir.join("setpriv"))
                .find(|file| file.is_file())?;
            let help = Command::new(&setpriv)
                .arg("--help")
                .stdin(Stdio::null())
                .output()
                .ok()?;
            String::from_utf8_lossy(&help.stdout)
                .contains("--pdeathsig")
                .then_some(setpriv)
        })
        .as_ref()
}

type Job = (Command, mpsc::Sender<io::Result<Child>>);

/// Starts `command` from the spawner thread, which never exits: see the
/// module's comment.
pub fn spawn(command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (jobs, received) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("child-spawner".to_owned())
            .spawn(move || {
                // Ends only with the process: the sender is in a static.
                for (mut command, reply) in received {
                    let _ = reply.send(command.spawn());
                }
            })
            .expect("start the child-spawner thread");
        jobs
    });
    let (reply, answer) = mpsc::channel();
    spawner
        .send((command, reply))
        .expect("the child-spawner thread runs");
    answer.recv().expect("the child-spawner thread answers")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The reason for the spawner thread: a child tied to a thread that
    /// exits is killed with it; one from [`spawn`] is not.
    #[test]
    fn a_child_outlives_the_thread_that_asked_for_it() {
        if !tied() {
            crate::skips::skip(
                "a_child_outlives_the_thread_that_asked_for_it",
                "no setpriv with --pdeathsig (util-linux)",
            );
            return;
        }
        // Once setpriv has become `sleep`, the signal is set: a thread
        // that exits before that kills nothing.
        let exec = |child: &Child| {
            let deadline = Instant::now() + Duration::from_secs(10);
            let comm = format!("/proc/{}/comm", child.id());
            while std::fs::read_to_string(&comm).unwrap_or_default() != "sleep\n" {
                assert!(Instant::now() < deadline, "setpriv did not run sleep");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let (direct, spawned) = std::thread::spawn(move || {
            let direct = command("sleep").arg("60").spawn().unwrap();
            let mut sleep = command("sleep");
            sleep.arg("60");
            let spawned = spawn(sleep).unwrap();
            exec(&direct);
            exec(&spawned);
            (direct, spawned)
        })
        .join()
        .unwrap();
        let (mut direct, mut spawned) = (direct, spawned);
        // The kernel signals both children of the exiting thread in one
        // pass: once the direct one is dead, the other was signalled too if
        // it was that thread's.
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = direct.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "not killed with its thread");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        let pid = spawned.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_owned()
        };
        let pending = |name: &str| u64::from_str_radix(&field(name), 16).unwrap();
        assert!(
            matches!(field("State:").chars().next(), Some('S' | 'R')),
            "killed with the thread that asked for it:\n{status}"
        );
        assert_eq!(
            (pending("SigPnd:") | pending("ShdPnd:")) & (1 << 8),
            0,
            "SIGKILL pending:\n{status}"
        );
        assert!(spawned.try_wait().unwrap().is_none());
        let _ = spawned.kill();
        let _ = spawned.wait();
    }
}
