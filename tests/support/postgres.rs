//! A real PostgreSQL server for the store tests: Debian's `postgresql`
//! package, a cluster made with `initdb` in a temporary directory, on a free
//! loopback port, with its Unix socket in that directory. Passwords are
//! checked (SCRAM) on TCP; the role `propeller` owns the database
//! `propeller`. The guard stops the server when dropped.
//!
//! TLS: [`Postgres::enable_ssl`] gives the running server the test PKI's
//! `server.crt` (localhost, 127.0.0.1, signed by `ca.crt`) and turns `ssl`
//! on; [`Postgres::hostssl_only`] makes TCP connections without TLS
//! refused. Both reload the server's configuration, no restart.
//!
//! As root (CI), the server runs as the `postgres` user, which `initdb`
//! requires: std's `CommandExt::uid` sets it for the child alone.
//!
//! ```sh
//! apt-get install -y postgresql
//! ```

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::servers::listens_on;
use crate::{children, free_ports, Env, Pki};

pub const INSTALL: &str = "apt-get install -y postgresql";
pub const USER: &str = "propeller";
pub const DATABASE: &str = "propeller";

/// For a test that runs the services against PostgreSQL: the binaries'
/// directory when PostgreSQL and the servers of [`crate::servers_available`]
/// are installed, or `None` after saying why the test is skipped.
pub fn available_with_servers(test: &str) -> Option<PathBuf> {
    let bin = available(test)?;
    crate::servers_available(test).then_some(bin)
}

/// The directory of Debian's PostgreSQL binaries (the newest version
/// installed), or `None` after saying why the test is skipped; under CI a
/// missing server is a failure.
pub fn available(test: &str) -> Option<PathBuf> {
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("postgres").is_file() && bin.join("initdb").is_file())
        .max_by_key(|bin| {
            bin.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
        });
    if newest.is_none() {
        crate::skips::skip(
            test,
            &format!("PostgreSQL is not installed; install with: {INSTALL}"),
        );
    }
    newest
}

/// A running PostgreSQL server, stopped when dropped.
pub struct Postgres {
    pub port: u16,
    pub password: String,
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// `uid`, `gid` of `postgres` when running as root.
    owner: Option<(u32, u32)>,
    server: Option<Child>,
    starts: u32,
}

impl Postgres {
    /// Makes a cluster and starts it; `bin` is from [`available`].
    pub fn start(bin: &Path) -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("pg-")
            .tempdir()
            .expect("temp dir");
        let owner = running_as_root().then(postgres_user);
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("chown the cluster dir");
        }
        let password = format!("pg-secret-{:x}", std::process::id());
        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n")).unwrap();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).unwrap();
        }
        let mut pg = Postgres {
            port: free_ports::<1>()[0],
            password,
            bin: bin.to_owned(),
            dir,
            owner,
            server: None,
            starts: 0,
        };
        let output = pg
            .command("initdb")
            .args([
                "-D",
                "data",
                "-U",
                USER,
                "--no-sync",
                "--no-locale",
                "-E",
                "UTF8",
            ])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        pg.resume();
        pg.sql(
            "postgres",
            &format!("CREATE DATABASE {DATABASE} OWNER {USER}"),
        );
        pg
    }

    /// `bin/<tool>` in the cluster's directory, as `postgres` under root.
    fn command(&self, tool: &str) -> Command {
        self.in_cluster(Command::new(self.bin.join(tool)))
    }

    /// `command` in the cluster's directory, as `postgres` under root.
    fn in_cluster(&self, mut command: Command) -> Command {
        command.current_dir(self.dir.path()).env("LC_ALL", "C");
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid);
        }
        command
    }

    /// Starts the server (again, after [`Self::stop`]) on the same port and
    /// data, and waits until it accepts connections.
    pub fn resume(&mut self) {
        assert!(self.server.is_none(), "the server is running");
        self.starts += 1;
        let log = self.log_path();
        let file = std::fs::File::create(&log).unwrap();
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&log, Some(uid), Some(gid)).unwrap();
        }
        let socket_dir = self.dir.path().display().to_string();
        let mut command = self.in_cluster(children::command(self.bin.join("postgres")));
        command
            .args(["-D", "data", "-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", &format!("unix_socket_directories={socket_dir}")])
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = children::spawn(command).expect("start postgres");
        let pid = child.id();
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("ready to accept connections") {
                if let Err(why) = listens_on(pid, &[self.port]) {
                    panic!("postgres (pid {pid}): {why}; its log:\n{text}");
                }
                return;
            }
            let exited = self
                .server
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "postgres did not start ({exited:?}); its log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server at once (SIGQUIT: immediate shutdown, as a crash
    /// would), and waits for it to go.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Turns TLS on: the PKI's server certificate and key, copied into
    /// the cluster's directory (the key mode 0600 and the server's, as
    /// PostgreSQL demands), set in `postgresql.conf` with `ca.crt` as
    /// `ssl_ca_file` (so the server asks for, and checks, a client
    /// certificate, which it does not require); then reloads.
    pub fn enable_ssl(&self, pki: &Pki) {
        use std::os::unix::fs::PermissionsExt;
        let mut files = Vec::new();
        for (name, mode) in [
            ("server.crt", 0o644),
            ("server.key", 0o600),
            ("ca.crt", 0o644),
        ] {
            let copy = self.dir.path().join(format!("pg-{name}"));
            std::fs::copy(pki.path(name), &copy).expect("copy the server's TLS file");
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(mode)).unwrap();
            if let Some((uid, gid)) = self.owner {
                std::os::unix::fs::chown(&copy, Some(uid), Some(gid)).unwrap();
            }
            files.push(copy);
        }
        let conf = self.dir.path().join("data/postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str(&format!(
            "\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\nssl_ca_file = '{}'\n",
            files[0].display(),
            files[1].display(),
            files[2].display()
        ));
        std::fs::write(&conf, text).unwrap();
        self.reload();
        assert_eq!(self.sql("postgres", "SHOW ssl"), "on", "{}", self.log());
    }

    /// Replaces `pg_hba.conf`: Unix socket trusted, TCP only with TLS
    /// (`hostssl`, SCRAM), no `host` line; then reloads.
    pub fn hostssl_only(&self) {
        std::fs::write(
            self.dir.path().join("data/pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        self.reload();
    }

    /// Reloads the configuration and waits until new sessions have it.
    fn reload(&self) {
        let before = self.sql("postgres", "SELECT pg_conf_load_time()");
        self.sql("postgres", "SELECT pg_reload_conf()");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.sql("postgres", "SELECT pg_conf_load_time()") == before {
            assert!(
                Instant::now() < deadline,
                "postgres did not reload its configuration; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("postgres-{}.log", self.starts))
    }

    /// The server's log since its last start.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Runs `sql` in `database` through the Unix socket and returns psql's
    /// unaligned output.
    pub fn sql(&self, database: &str, sql: &str) -> String {
        let output = self
            .command("psql")
            .args(["-h", &self.dir.path().display().to_string()])
            .args(["-p", &self.port.to_string(), "-U", USER, "-d", database])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            output.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Points a manager's `env` at this server, over TCP with the password.
    pub fn configure(&self, env: &mut Env) {
        env.set("STORAGE_TYPE", "postgres")
            .set("POSTGRES_HOST", "127.0.0.1")
            .set("POSTGRES_PORT", &self.port.to_string())
            .set("POSTGRES_USER", USER)
            .set("POSTGRES_PASS", &self.password)
            .set("POSTGRES_DB", DATABASE)
            .set("POSTGRES_SSLMODE", "disable");
    }

    /// The same settings as `(suffix, value)` pairs, for `Lab::manager_with`.
    pub fn settings(&self) -> Vec<(String, String)> {
        let mut env = Env {
            prefix: "MANAGER".to_owned(),
            vars: Vec::new(),
        };
        self.configure(&mut env);
        env.vars
            .into_iter()
            .map(|(name, value)| (name.trim_start_matches("MANAGER_").to_owned(), value))
            .collect()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The `postgres` user's uid and gid, from /etc/passwd.
fn postgres_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&"postgres") && fields.len() > 3)
        .and_then(|fields| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
        .unwrap_or_else(|| panic!("no postgres user in /etc/passwd: {INSTALL}"))
}
