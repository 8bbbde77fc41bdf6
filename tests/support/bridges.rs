//! The parts between a client and the broker that `tests/transport.rs` puts
//! in the way, each real and on loopback, each a guard that stops its
//! processes when dropped:
//!
//! - [`Tinyproxy`]: Debian's tinyproxy, an HTTP proxy (CONNECT), with or
//!   without BasicAuth, with or without a `ConnectPort` rule;
//! - [`Websockify`]: Debian's websockify, a WebSocket-to-TCP bridge, in front
//!   of mosquitto's plain listener (mosquitto 2.0.11's own websockets
//!   listener fails to bind here);
//! - [`WsEdge`]: nginx serving upstream's `location /mqtt` (see
//!   `tests/support/nginx/README.md`) in front of a [`Websockify`];
//! - [`TlsRouter`]: an nginx stream router that picks its backend from the
//!   ClientHello (`ssl_preread`): by SNI on one port, by ALPN on another, and
//!   a TLS edge that insists on ALPN `mqtt` (`ssl_alpn`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::pki::Pki;
use crate::servers::{free_ports, modules_dir, start_nginx, wait_ports};

/// Debian packages beyond [`crate::INSTALL`] that these need.
pub const INSTALL_TRANSPORT: &str = "apt-get install -y tinyproxy websockify libnginx-mod-http-js";

/// True when everything the transport tests need is installed (the servers
/// of [`crate::servers_available`] too). Otherwise prints why the test is
/// skipped, or panics under CI.
pub fn transport_available(test: &str) -> bool {
    if !crate::servers_available(test) {
        return false;
    }
    let mut missing = Vec::new();
    if !crate::on_path("tinyproxy") {
        missing.push("tinyproxy");
    }
    let websockify = Command::new(websockify_python())
        .args(["-c", "import websockify.websocketproxy"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !websockify {
        missing.push("websockify (python3-websockify)");
    }
    if !modules_dir().join("ngx_http_js_module.so").exists() {
        missing.push("ngx_http_js_module.so (libnginx-mod-http-js)");
    }
    if missing.is_empty() {
        return true;
    }
    crate::skips::skip(
        test,
        &format!(
            "missing {}; install with: {INSTALL_TRANSPORT}",
            missing.join(", ")
        ),
    );
    false
}

/// The Python that runs Debian's `websockify` script (its `#!` line): the
/// `python3` first on PATH may be another one (pyenv) without the library.
fn websockify_python() -> PathBuf {
    let script = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("websockify"))
            .find(|candidate| candidate.is_file())
    });
    script
        .and_then(|script| std::fs::read_to_string(script).ok())
        .and_then(|text| {
            let first = text.lines().next()?.strip_prefix("#!")?.trim().to_owned();
            let interpreter = first.split_whitespace().next()?.to_owned();
            Path::new(&interpreter)
                .is_file()
                .then(|| PathBuf::from(interpreter))
        })
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// A child in a process group of its own, killed as a group when dropped:
/// websockify forks one process per connection.
struct Group(Child);

impl Group {
    fn spawn(mut command: Command) -> Group {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
        Group(crate::children::spawn(command).expect("spawn"))
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .stderr(Stdio::null())
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How a [`Tinyproxy`] is set up.
#[derive(Debug, Default, Clone)]
pub struct ProxyRules {
    /// `BasicAuth user password`.
    pub basic_auth: Option<(String, String)>,
    /// `ConnectPort` lines: CONNECT only to these ports (none: any port).
    pub connect_ports: Vec<u16>,
}

/// tinyproxy on a free loopback port.
pub struct Tinyproxy {
    pub port: u16,
    _child: Group,
    pub dir: tempfile::TempDir,
}

impl Tinyproxy {
    pub fn start(rules: &ProxyRules) -> Tinyproxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let [port] = free_ports();
        let log = dir.path().join("tinyproxy.log");
        let mut config = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 64\nAllow 127.0.0.1\n\
             LogFile \"{}\"\nLogLevel Info\n",
            log.display()
        );
        if let Some((user, password)) = &rules.basic_auth {
            config.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        for allowed in &rules.connect_ports {
            config.push_str(&format!("ConnectPort {allowed}\n"));
        }
        let path = dir.path().join("tinyproxy.conf");
        std::fs::write(&path, config).unwrap();
        let mut command = crate::children::command("tinyproxy");
        command
            .arg("-d")
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("stderr.log")).unwrap(),
            ));
        let mut child = Group::spawn(command);
        wait_ports(&mut child.0, &[port], &log, "tinyproxy");
        Tinyproxy {
            port,
            _child: child,
            dir,
        }
    }

    /// `http://[user:password@]127.0.0.1:port`.
    pub fn url(&self, credentials: Option<(&str, &str)>) -> String {
        match credentials {
            Some((user, password)) => format!("http://{user}:{password}@127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// tinyproxy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tinyproxy.log")).unwrap_or_default()
    }
}

/// websockify 0.10 (Debian's python3-websockify) bridging WebSocket to
/// `target`. It answers only the subprotocols it knows (`binary`), and MQTT
/// over WebSocket requires the server to choose `mqtt`; so it runs through
/// its library with `select_subprotocol`, the hook websockify documents for
/// this, choosing `mqtt` when offered. Everything else is websockify's own.
pub struct Websockify {
    pub port: u16,
    _child: Group,
    pub dir: tempfile::TempDir,
}

const WEBSOCKIFY: &str = r#"
import sys
from websockify import websockifyserver, websocketproxy

def select_subprotocol(self, protocols):
    offered = [p.strip() for p in protocols]
    if 'mqtt' in offered:
        return protocols[offered.index('mqtt')]
    return 'binary' if 'binary' in protocols else ''

websockifyserver.CompatibleWebSocket.select_subprotocol = select_subprotocol
sys.argv = ['websockify'] + sys.argv[1:]
websocketproxy.websockify_init()
"#;

impl Websockify {
    pub fn start(target: u16) -> Websockify {
        let dir = tempfile::tempdir().expect("temp dir");
        let [port] = free_ports();
        let log = dir.path().join("websockify.log");
        // TERM at the test's death: websockify then stops the process it
        // forked for each connection.
        let mut command = crate::children::command_with_signal(websockify_python(), "TERM");
        command
            .args(["-c", WEBSOCKIFY])
            .arg(format!("127.0.0.1:{port}"))
            .arg(format!("127.0.0.1:{target}"))
            .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
            .stderr(Stdio::from(
                std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
            ));
        let mut child = Group::spawn(command);
        wait_ports(&mut child.0, &[port], &log, "websockify");
        Websockify {
            port,
            _child: child,
            dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("websockify.log")).unwrap_or_default()
    }
}

fn nginx_support() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("support/nginx")
}

/// The `/mqtt` location of upstream's `docker/nginx/nginx-x509.conf`, verbatim.
pub const MQTT_LOCATION: &str = "        location /mqtt {
            include snippets/verify-ssl-client.conf;
            include snippets/proxy-headers.conf;
            include snippets/ws-upgrade.conf;
            proxy_pass http://mqtt_ws_cluster;
        }
";

/// The files of `tests/support/nginx` copied from upstream, with their
/// upstream paths under `propeller-v0.5.0/docker/`.
pub const UPSTREAM_FILES: [(&str, &str); 4] = [
    (
        "snippets/verify-ssl-client.conf",
        "nginx/snippets/verify-ssl-client.conf",
    ),
    (
        "snippets/proxy-headers.conf",
        "nginx/snippets/proxy-headers.conf",
    ),
    ("snippets/ws-upgrade.conf", "nginx/snippets/ws-upgrade.conf"),
    ("authorization.js", "ssl/authorization.js"),
];

/// Magistrala's HTTPS edge, reduced to its MQTT-over-WebSocket location:
/// nginx with upstream's `location /mqtt` in front of a [`Websockify`] in
/// front of mosquitto's plain listener. Like upstream's server it verifies
/// a client certificate if one is sent (`ssl_verify_client optional`), and
/// the location answers 403 unless one was verified.
pub struct WsEdge {
    /// The HTTPS port (upstream: 443).
    pub port: u16,
    /// The same server over plain HTTP (upstream: 80).
    pub plain_port: u16,
    pub bridge: Websockify,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl WsEdge {
    /// Serves `server_cert` (a PKI name such as `server`), trusts client
    /// certificates from the PKI's CA, and bridges to mosquitto's `broker_plain`.
    pub fn start(pki: &Pki, server_cert: &str, broker_plain: u16) -> WsEdge {
        let bridge = Websockify::start(broker_plain);
        let dir = tempfile::tempdir().expect("temp dir");
        let [port, plain_port] = free_ports();
        let support = nginx_support();
        std::fs::create_dir(dir.path().join("snippets")).unwrap();
        for (file, _) in UPSTREAM_FILES {
            std::fs::copy(support.join(file), dir.path().join(file)).unwrap();
        }
        let run = dir.path().display();
        let config = format!(
            "# Rendered by tests/support/bridges.rs (WsEdge): upstream's docker/nginx/nginx-x509.conf,\n\
             # its HTTPS server reduced to `location /mqtt`.\n\
             daemon off;\nmaster_process off;\nworker_processes 1;\npid {run}/nginx.pid;\n\
             load_module {modules}/ngx_http_js_module.so;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             access_log {run}/access.log;\n\
             client_body_temp_path {run}/body;\nproxy_temp_path {run}/proxy;\n\
             fastcgi_temp_path {run}/fastcgi;\nuwsgi_temp_path {run}/uwsgi;\nscgi_temp_path {run}/scgi;\n\
             js_import authorization from {run}/authorization.js;\n\
             js_set $auth_key authorization.setKey;\n\
             upstream mqtt_ws_cluster {{\n    server 127.0.0.1:{bridge};\n}}\n\
             server {{\n\
             \x20       listen 127.0.0.1:{plain_port};\n\
             \x20       listen 127.0.0.1:{port} ssl;\n\
             \x20       ssl_verify_client optional;\n\
             \x20       ssl_certificate {cert};\n\
             \x20       ssl_certificate_key {key};\n\
             \x20       ssl_protocols TLSv1.2 TLSv1.3;\n\
             \x20       ssl_client_certificate {ca};\n\
             \x20       ssl_verify_depth 2;\n\
             {MQTT_LOCATION}\
             }}\n}}\n",
            modules = modules_dir().display(),
            bridge = bridge.port,
            cert = pki.path(&format!("{server_cert}.crt")).display(),
            key = pki.path(&format!("{server_cert}.key")).display(),
            ca = pki.path("ca.crt").display(),
        );
        let config_path = dir.path().join("nginx.conf");
        std::fs::write(&config_path, config).unwrap();
        let child = start_nginx(dir.path(), &config_path, port);
        WsEdge {
            port,
            plain_port,
            bridge,
            child,
            dir,
        }
    }

    /// nginx's error log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

impl Drop for WsEdge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An nginx stream router in front of TLS backends, reading the ClientHello
/// (`ssl_preread`) without terminating TLS:
///
/// - `sni_port`: each SNI of `routes` goes to its backend; any other SNI, or
///   none (an IP address), goes to a server that closes at once;
/// - `alpn_port`: ALPN `mqtt` goes to `alpn_edge`; anything else, or no
///   ALPN, to the server that closes;
/// - `alpn_edge`: a TLS edge (`server-dns` certificate) that requires ALPN
///   `mqtt` (`ssl_alpn`), in front of `broker_plain`.
pub struct TlsRouter {
    pub sni_port: u16,
    pub alpn_port: u16,
    pub alpn_edge: u16,
    child: Child,
    pub dir: tempfile::TempDir,
}

impl TlsRouter {
    /// Routes each SNI of `routes` to its port (a TLS port whose certificate
    /// has that name, such as an [`crate::Edge`] with `server-dns`, which
    /// names `localhost` and `nginx`).
    pub fn start(pki: &Pki, routes: &[(&str, u16)], broker_plain: u16) -> TlsRouter {
        let dir = tempfile::tempdir().expect("temp dir");
        let [sni_port, alpn_port, alpn_edge, closer] = free_ports();
        let run = dir.path().display();
        let load_stream = match modules_dir().join("ngx_stream_module.so") {
            path if path.exists() => format!("load_module {};\n", path.display()),
            _ => String::new(),
        };
        let config = format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {run}/nginx.pid;\n{load_stream}\
             events {{ worker_connections 1024; }}\n\
             stream {{\n\
             \x20   map $ssl_preread_server_name $by_sni {{\n\
             {sni_routes}\
             \x20       default 127.0.0.1:{closer};\n\
             \x20   }}\n\
             \x20   map $ssl_preread_alpn_protocols $by_alpn {{\n\
             \x20       \"~(^|,)mqtt(,|$)\" 127.0.0.1:{alpn_edge};\n\
             \x20       default 127.0.0.1:{closer};\n\
             \x20   }}\n\
             \x20   server {{ listen 127.0.0.1:{sni_port}; ssl_preread on; proxy_pass $by_sni; }}\n\
             \x20   server {{ listen 127.0.0.1:{alpn_port}; ssl_preread on; proxy_pass $by_alpn; }}\n\
             \x20   # Another service behind the router: it closes whatever comes.\n\
             \x20   server {{ listen 127.0.0.1:{closer}; return \"\"; }}\n\
             \x20   server {{\n\
             \x20       listen 127.0.0.1:{alpn_edge} ssl;\n\
             \x20       ssl_certificate {cert};\n\
             \x20       ssl_certificate_key {key};\n\
             \x20       ssl_alpn mqtt;\n\
             \x20       proxy_pass 127.0.0.1:{broker_plain};\n\
             \x20   }}\n\
             }}\n",
            cert = pki.path("server-dns.crt").display(),
            key = pki.path("server-dns.key").display(),
            sni_routes = routes
                .iter()
                .map(|(name, port)| format!("        {name} 127.0.0.1:{port};\n"))
                .collect::<String>(),
        );
        let config_path = dir.path().join("nginx.conf");
        std::fs::write(&config_path, config).unwrap();
        let child = start_nginx(dir.path(), &config_path, sni_port);
        let mut router = TlsRouter {
            sni_port,
            alpn_port,
            alpn_edge,
            child,
            dir,
        };
        let log = router.dir.path().join("error.log");
        wait_ports(&mut router.child, &[alpn_port, alpn_edge], &log, "nginx");
        router
    }
}

impl Drop for TlsRouter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
