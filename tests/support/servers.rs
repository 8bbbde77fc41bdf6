//! Real servers on loopback: mosquitto with three listeners, and an nginx
//! stream edge doing what Magistrala's does under `AUTH=x509`. Each is a guard
//! that stops its process when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::children;
use crate::pki::{Identity, Pki};

/// Names of the clients the broker knows, with their passwords and ACLs.
pub struct Account {
    pub username: String,
    pub password: String,
    /// Topic pattern this user may read and write.
    pub topics: String,
}

/// Broker settings a test may change.
#[derive(Debug, Default, Clone)]
pub struct BrokerOptions {
    /// Persist sessions and queued messages to disk after every change, so a
    /// SIGKILL loses as little as mosquitto allows.
    pub persistence: bool,
    /// The CA file that verifies client certificates (default: the PKI's CA).
    pub client_ca: Option<PathBuf>,
}

/// mosquitto with a plain, a TLS and an mTLS listener, all requiring a password.
pub struct Mosquitto {
    pub plain: u16,
    pub tls: u16,
    pub mtls: u16,
    child: Child,
    pub dir: tempfile::TempDir,
}

fn spawn_mosquitto(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("mosquitto.log"))
        .unwrap();
    let mut command = children::command("mosquitto");
    command
        .arg("-c")
        .arg(dir.join("mosquitto.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    children::spawn(command).expect("start mosquitto")
}

impl Mosquitto {
    /// A broker that knows `identities` as clients of the test channel.
    pub fn for_clients(pki: &Pki, identities: &[&Identity]) -> Mosquitto {
        Self::start(pki, &accounts(identities, crate::CHANNEL_TOPICS))
    }

    pub fn start(pki: &Pki, accounts: &[Account]) -> Mosquitto {
        Self::start_with(pki, accounts, BrokerOptions::default())
    }

    pub fn start_with(pki: &Pki, accounts: &[Account], options: BrokerOptions) -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir");
        let passwd = dir.path().join("passwd");
        std::fs::write(&passwd, "").unwrap();
        let mut acl = String::new();
        for account in accounts {
            let status = Command::new("mosquitto_passwd")
                .args(["-b"])
                .arg(&passwd)
                .args([&account.username, &account.password])
                .status()
                .expect("run mosquitto_passwd");
            assert!(status.success(), "mosquitto_passwd failed");
            acl.push_str(&format!(
                "user {}\ntopic readwrite {}\n\n",
                account.username, account.topics
            ));
        }
        std::fs::write(dir.path().join("acl"), acl).unwrap();
        // The ports were free when picked; a parallel test may take one
        // before mosquitto binds it. Then pick again (a bounded number of
        // times), rather than fail a test over a race of the test harness.
        let mut attempts = 0;
        let (child, [plain, tls, mtls]) = loop {
            attempts += 1;
            let ports = free_ports();
            let config = Self::config(pki, &dir, &options, ports);
            std::fs::write(dir.path().join("mosquitto.conf"), config).unwrap();
            let mut child = spawn_mosquitto(dir.path());
            let log = dir.path().join("mosquitto.log");
            match try_wait_ports(&mut child, &ports, &log, "mosquitto") {
                Ok(()) => break (child, ports),
                Err(why) if attempts < 5 && why.contains("Address already in use") => {
                    eprintln!("mosquitto lost a port race, picking new ports: {why}");
                }
                Err(why) => panic!("{why}"),
            }
        };
        Mosquitto {
            plain,
            tls,
            mtls,
            child,
            dir,
        }
    }

    /// mosquitto.conf for [`Mosquitto::start_with`] on `[plain, tls, mtls]`.
    fn config(
        pki: &Pki,
        dir: &tempfile::TempDir,
        options: &BrokerOptions,
        [plain, tls, mtls]: [u16; 3],
    ) -> String {
        let passwd = dir.path().join("passwd");
        let auth = format!(
            "allow_anonymous false\npassword_file {}\nacl_file {}\n",
            passwd.display(),
            dir.path().join("acl").display()
        );
        let client_ca = options
            .client_ca
            .clone()
            .unwrap_or_else(|| pki.path("ca.crt"));
        let certs = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n",
            client_ca.display(),
            pki.path("server.crt").display(),
            pki.path("server.key").display()
        );
        let persistence = match options.persistence {
            true => format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1\nautosave_on_changes true\n",
                dir.path().display()
            ),
            false => "persistence false\n".to_owned(),
        };
        // Unlimited queues: the default 1000 would drop messages for a
        // persistent subscriber that reconnects after the publisher.
        format!(
            "per_listener_settings true\n{persistence}max_queued_messages 0\nuser root\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n\
             listener {plain} 127.0.0.1\n{auth}\n\
             listener {tls} 127.0.0.1\n{certs}{auth}\n\
             listener {mtls} 127.0.0.1\n{certs}require_certificate true\n{auth}\n"
        )
    }

    /// mosquitto with one plain listener and the dynamic-security plugin, knowing
    /// one client that has no role: every subscription it makes is refused
    /// (SUBACK 0x80), the way a Magistrala ACL refuses a foreign channel.
    /// mosquitto's `acl_file` cannot do this: it grants every SUBSCRIBE.
    pub fn start_refusing_subscriptions(username: &str, password: &str) -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir");
        let dynsec = dir.path().join("dynsec.json");
        let status = Command::new("mosquitto_ctrl")
            .args(["dynsec", "init"])
            .arg(&dynsec)
            .args([username, password])
            .stdout(Stdio::null())
            .status()
            .expect("run mosquitto_ctrl");
        assert!(status.success(), "mosquitto_ctrl dynsec init failed");
        // `init` makes the client an admin; take its roles away.
        let json = std::fs::read_to_string(&dynsec).unwrap();
        let start = json.find("\"roles\"").expect("roles in dynsec.json");
        let end = start + json[start..].find(']').expect("end of roles") + 1;
        std::fs::write(
            &dynsec,
            format!("{}\"roles\": []{}", &json[..start], &json[end..]),
        )
        .unwrap();
        let [plain] = free_ports();
        let config = format!(
            "user root\nlog_dest stderr\nlistener {plain} 127.0.0.1\nallow_anonymous false\n\
             plugin {}\nplugin_opt_config_file {}\n",
            dynsec_plugin().display(),
            dynsec.display()
        );
        std::fs::write(dir.path().join("mosquitto.conf"), config).unwrap();
        let child = spawn_mosquitto(dir.path());
        let mut broker = Mosquitto {
            plain,
            tls: 0,
            mtls: 0,
            child,
            dir,
        };
        broker.wait_listening(&[plain]);
        broker
    }

    /// Kills the broker with SIGKILL and starts it again on the same ports.
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }

    /// Kills the broker with SIGKILL; [`Mosquitto::start_again`] revives it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the killed broker again, same config and ports.
    pub fn start_again(&mut self) {
        self.child = spawn_mosquitto(self.dir.path());
        let ports: Vec<u16> = [self.plain, self.tls, self.mtls]
            .into_iter()
            .filter(|p| *p != 0)
            .collect();
        self.wait_listening(&ports);
    }

    fn wait_listening(&mut self, ports: &[u16]) {
        let log = self.dir.path().join("mosquitto.log");
        wait_ports(&mut self.child, ports, &log, "mosquitto");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An nginx stream edge in front of mosquitto's plain listener, rendered by
/// `docker/nginx/render.sh` from the config that ships in `docker/nginx/`.
pub struct Edge {
    pub port: u16,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl Edge {
    /// `AUTH=x509`: a client certificate from `client_ca` is required, and the
    /// njs check wants the password to end with its CN. Presents `server_cert`.
    pub fn start(pki: &Pki, upstream: u16, server_cert: &str, client_ca: &str) -> Edge {
        Self::start_with(pki, upstream, server_cert, "x509", client_ca)
    }

    /// `AUTH=key`: TLS with a server certificate only.
    pub fn start_key(pki: &Pki, upstream: u16, server_cert: &str) -> Edge {
        Self::start_with(pki, upstream, server_cert, "key", "ca.crt")
    }

    fn start_with(
        pki: &Pki,
        upstream: u16,
        server_cert: &str,
        auth: &str,
        client_ca: &str,
    ) -> Edge {
        let dir = tempfile::tempdir().expect("temp dir");
        let [port] = free_ports();
        let render = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docker/nginx/render.sh");
        let config_path = dir.path().join("nginx.conf");
        let status = Command::new("sh")
            .arg(&render)
            .arg(&config_path)
            .env("AUTH", auth)
            .env("LISTEN", format!("127.0.0.1:{port}"))
            .env("UPSTREAM", format!("127.0.0.1:{upstream}"))
            .env("SERVER_CERT", pki.path(&format!("{server_cert}.crt")))
            .env("SERVER_KEY", pki.path(&format!("{server_cert}.key")))
            .env("CLIENT_CA", pki.path(client_ca))
            .env("MODULES", modules_dir())
            .env("RUN_DIR", dir.path())
            .env("SINGLE_PROCESS", "1")
            .status()
            .expect("run docker/nginx/render.sh");
        assert!(status.success(), "render.sh failed");
        let child = start_nginx(dir.path(), &config_path, port);
        Edge { port, child, dir }
    }

    /// Upstream's MQTT edge (`nginx-x509.conf` of
    /// `../shared/upstream/propeller-v0.5.0/docker/nginx`): one server with a
    /// plain and a TLS listener, `ssl_verify_client on`, and upstream's own
    /// `docker/ssl/authorization.js` as `js_preread`; its stream block with
    /// our paths and ports (the rest of that file routes Magistrala's HTTP
    /// services). Returns the edge (its TLS port) and the plain port, or
    /// `None` when upstream's sources are not there.
    pub fn upstream_x509(pki: &Pki, upstream: u16) -> Option<(Edge, u16)> {
        let sources = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/upstream/propeller-v0.5.0/docker");
        let js = sources.join("ssl/authorization.js").canonicalize().ok()?;
        let dir = tempfile::tempdir().expect("temp dir");
        let [port, plain] = free_ports();
        let modules = modules_dir();
        let load_stream = match modules.join("ngx_stream_module.so").exists() {
            true => format!("load_module {}/ngx_stream_module.so;", modules.display()),
            false => String::new(),
        };
        let config = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {run}/nginx.pid;\n\
             {load_stream}\nload_module {modules}/ngx_stream_js_module.so;\n\
             events {{ worker_connections 64; }}\n\
             stream {{\n\
               js_path \"{js_dir}/\";\n\
               js_import authorization from {js};\n\
               ssl_verify_client on;\n\
               ssl_client_certificate {ca};\n\
               ssl_verify_depth 2;\n\
               server {{\n\
                 listen 127.0.0.1:{plain};\n\
                 listen 127.0.0.1:{port} ssl;\n\
                 ssl_certificate {cert};\n\
                 ssl_certificate_key {key};\n\
                 js_preread authorization.authenticate;\n\
                 proxy_pass 127.0.0.1:{upstream};\n\
               }}\n\
             }}\n",
            run = dir.path().display(),
            modules = modules.display(),
            js_dir = js.parent()?.display(),
            js = js.display(),
            ca = pki.path("ca.crt").display(),
            cert = pki.path("server.crt").display(),
            key = pki.path("server.key").display(),
        );
        let config_path = dir.path().join("nginx.conf");
        std::fs::write(&config_path, config).expect("write nginx.conf");
        let mut child = start_nginx(dir.path(), &config_path, port);
        wait_ports(&mut child, &[plain], &dir.path().join("error.log"), "nginx");
        Some((Edge { port, child, dir }, plain))
    }

    /// nginx's error log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nginx with `config`, its logs in `dir`, once it listens on `port`.
pub(crate) fn start_nginx(dir: &Path, config: &Path, port: u16) -> Child {
    let error_log = dir.join("error.log");
    let mut command = children::command("nginx");
    command
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(&error_log)
        .arg("-c")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join("stderr.log")).unwrap(),
        ));
    let mut child = children::spawn(command).expect("start nginx");
    wait_ports(&mut child, &[port], &error_log, "nginx");
    child
}

/// Where Debian's mosquitto package puts the dynamic-security plugin.
fn dynsec_plugin() -> PathBuf {
    let multiarch = format!("/usr/lib/{}-linux-gnu", std::env::consts::ARCH);
    Path::new(&multiarch).join("mosquitto_dynamic_security.so")
}

/// Debian puts dynamic modules here; `NGINX_MODULES` overrides.
pub(crate) fn modules_dir() -> PathBuf {
    std::env::var_os("NGINX_MODULES")
        .map_or_else(|| PathBuf::from("/usr/lib/nginx/modules"), PathBuf::from)
}

/// Ports the kernel says are free right now. Held together, then released, so
/// that one call never returns the same port twice.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

/// Waits (at most 10 s) until every port accepts, and checks that the
/// server listens on each; or fails with the server's log.
pub(crate) fn wait_ports(child: &mut Child, ports: &[u16], log: &Path, what: &str) {
    if let Err(why) = try_wait_ports(child, ports, log, what) {
        panic!("{why}");
    }
}

/// [`wait_ports`], returning why it failed (the server killed) instead.
fn try_wait_ports(child: &mut Child, ports: &[u16], log: &Path, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let log_text = || std::fs::read_to_string(log).unwrap_or_default();
    for &port in ports {
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        loop {
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                break;
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{what} did not listen on {port} ({exited:?}); its log:\n{}",
                    log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if let Err(why) = listens_on(child.id(), ports) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "{what} (pid {}): {why}; its log:\n{}",
            child.id(),
            log_text()
        ));
    }
    Ok(())
}

/// Checks that every socket listening on loopback at each of `ports`
/// belongs to the process `pid`. The ports were free when picked
/// ([`free_ports`] binds and releases them), but another process may have
/// taken one since, and then a test would talk to it, not to the server it
/// started. nginx's master process holds its listening sockets (the test
/// servers run nginx as one process anyway); so does PostgreSQL's
/// postmaster. Linux only (`/proc`); elsewhere nothing is checked.
pub fn listens_on(pid: u32, ports: &[u16]) -> Result<(), String> {
    if !cfg!(target_os = "linux") {
        return Ok(());
    }
    let owned = socket_inodes(pid);
    for &port in ports {
        let listening = listening_sockets(port);
        if listening.is_empty() {
            return Err(format!("nothing listens on 127.0.0.1:{port}"));
        }
        let foreign: Vec<String> = listening
            .iter()
            .filter(|inode| !owned.contains(inode))
            .map(|inode| holders(*inode))
            .collect();
        if !foreign.is_empty() {
            return Err(format!(
                "port {port} is held by another process ({}), not by this server: \
                 it was taken between the pick of a free port and the start",
                foreign.join("; ")
            ));
        }
    }
    Ok(())
}

/// The inodes of the TCP sockets listening on `port` at an address that
/// takes connections to 127.0.0.1 (or `::1`), from `/proc/net/tcp{,6}`.
fn listening_sockets(port: u16) -> Vec<u64> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl, local address, remote address, st, …, inode (10th).
            let (Some(local), Some(&"0A"), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let Some((address, local_port)) = local.split_once(':') else {
                continue;
            };
            if u16::from_str_radix(local_port, 16) == Ok(port) && reaches_loopback(address) {
                inodes.extend(inode.parse::<u64>().ok());
            }
        }
    }
    inodes
}

/// Whether a listening address of `/proc/net/tcp{,6}` (each 32-bit word in
/// hex, in the host's byte order) takes loopback connections: a loopback
/// or unspecified address, or IPv4-mapped loopback.
fn reaches_loopback(hex: &str) -> bool {
    let bytes: Vec<u8> = (0..hex.len() / 8)
        .filter_map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok())
        .flat_map(u32::to_ne_bytes)
        .collect();
    match <[u8; 4]>::try_from(&bytes[..]) {
        Ok(v4) => {
            let ip = std::net::Ipv4Addr::from(v4);
            ip.is_loopback() || ip.is_unspecified()
        }
        Err(_) => <[u8; 16]>::try_from(&bytes[..]).is_ok_and(|v6| {
            let ip = std::net::Ipv6Addr::from(v6);
            ip.is_loopback()
                || ip.is_unspecified()
                || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }),
    }
}

/// The inodes of the sockets process `pid` has open.
fn socket_inodes(pid: u32) -> Vec<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Which processes hold the socket `inode`, for a failure message.
fn holders(inode: u64) -> String {
    let pids: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| socket_inodes(*pid).contains(&inode))
        .map(|pid| {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("pid {pid} {}", name.trim())
        })
        .collect();
    match pids.is_empty() {
        true => format!("socket {inode}, of a process not visible here"),
        false => format!("socket {inode} of {}", pids.join(", ")),
    }
}

/// The broker accounts for a set of identities: username = client id, password = secret.
pub fn accounts(identities: &[&Identity], topics: &str) -> Vec<Account> {
    identities
        .iter()
        .map(|id| Account {
            username: crate::client_id(id.name),
            password: id.secret.clone(),
            topics: topics.to_owned(),
        })
        .collect()
}

/// nginx serving the files of `root` over HTTPS with `server.crt`: the
/// proxy's module source in `PROXY_MODULES_URL` tests.
pub struct FileServer {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl FileServer {
    pub fn start_https(pki: &Pki, root: &Path) -> FileServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let [port] = free_ports();
        let run = dir.path().display();
        let config = format!(
            "daemon off;\nmaster_process off;\npid {run}/nginx.pid;\nerror_log {run}/error.log;\nevents {{}}\n\
             http {{\n access_log off;\n client_body_temp_path {run}/body;\n proxy_temp_path {run}/proxy;\n\
             fastcgi_temp_path {run}/fastcgi;\n uwsgi_temp_path {run}/uwsgi;\n scgi_temp_path {run}/scgi;\n\
             types {{ application/wasm wasm; }}\n\
             server {{\n  listen 127.0.0.1:{port} ssl;\n  ssl_certificate {};\n  ssl_certificate_key {};\n  location /mods/ {{ alias {}/; }}\n }}\n}}\n",
            pki.path("server.crt").display(),
            pki.path("server.key").display(),
            root.display(),
        );
        let config_path = dir.path().join("nginx.conf");
        std::fs::write(&config_path, config).unwrap();
        let child = start_nginx(dir.path(), &config_path, port);
        FileServer {
            port,
            child,
            _dir: dir,
        }
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port is the server's only if the server's process holds the
    /// listening socket.
    #[test]
    fn a_port_belongs_to_the_process_that_listens_on_it() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listens_on(std::process::id(), &[port]), Ok(()));
        let mut other = Command::new("sleep").arg("60").spawn().unwrap();
        let refused = listens_on(other.id(), &[port]);
        let _ = other.kill();
        let _ = other.wait();
        let why = refused.unwrap_err();
        assert!(
            why.contains(&format!("port {port} is held by another process"))
                && why.contains(&format!("pid {}", std::process::id())),
            "{why}"
        );
        drop(listener);
        // A freed port can be taken by another process at once (the race
        // `free_ports` lives with): then free another one, a bounded number
        // of times, so that the check below is about our code.
        let (mut port, mut after) = (port, listens_on(std::process::id(), &[port]));
        for _ in 0..5 {
            if !matches!(&after, Err(why) if why.contains("held by another process")) {
                break;
            }
            let [fresh] = free_ports();
            (port, after) = (fresh, listens_on(std::process::id(), &[fresh]));
        }
        assert_eq!(after, Err(format!("nothing listens on 127.0.0.1:{port}")));
    }

    #[test]
    fn listening_addresses_that_take_loopback_connections() {
        let v4 = |bytes: [u8; 4]| format!("{:08X}", u32::from_ne_bytes(bytes));
        assert!(reaches_loopback(&v4([127, 0, 0, 1])));
        assert!(reaches_loopback(&v4([0, 0, 0, 0])));
        assert!(!reaches_loopback(&v4([10, 0, 0, 1])));
        let v6 = |ip: std::net::Ipv6Addr| {
            ip.octets()
                .chunks(4)
                .map(|word| format!("{:08X}", u32::from_ne_bytes(word.try_into().unwrap())))
                .collect::<String>()
        };
        assert!(reaches_loopback(&v6("::".parse().unwrap())));
        assert!(reaches_loopback(&v6("::ffff:127.0.0.1".parse().unwrap())));
        assert!(!reaches_loopback(&v6("fe80::1".parse().unwrap())));
    }
}
