//! Every configuration error stops the service before any network I/O, with
//! exit status 78 and one line that names the variable, the value or path, and
//! the fix. The address points at a listener we own, to prove nothing connected.

use std::net::TcpListener;
use std::time::Duration;

use propeller_tests::{servers_available, Env, Pki, ServiceProcess};

/// Runs the proplet with `env` and returns its one line of stderr.
fn refused(env: &Env, listener: &TcpListener) -> String {
    let mut process = ServiceProcess::start("proplet", &env.vars);
    let status = process.wait(Duration::from_secs(10));
    let output = process.output();
    assert_eq!(
        status.code(),
        Some(78),
        "expected exit 78, got {status}:\n{output}"
    );
    assert_eq!(output.trim().lines().count(), 1, "not one line:\n{output}");
    listener.set_nonblocking(true).unwrap();
    assert!(
        listener.accept().is_err(),
        "the service connected despite a configuration error"
    );
    assert!(
        output.starts_with("proplet: configuration error: "),
        "{output}"
    );
    output
}

/// Fills in a case's env, given the PKI and the port of our listener.
type MakeEnv = Box<dyn Fn(&Pki, u16, &mut Env)>;

struct Case {
    name: &'static str,
    expect: &'static [&'static str],
    env: MakeEnv,
}

fn case(
    name: &'static str,
    expect: &'static [&'static str],
    env: impl Fn(&Pki, u16, &mut Env) + 'static,
) -> Case {
    Case {
        name,
        expect,
        env: Box::new(env),
    }
}

#[test]
fn every_configuration_error_is_one_clear_line() {
    if !servers_available("every_configuration_error_is_one_clear_line") {
        return;
    }
    let pki = Pki::shared();
    let cases = [
        case("unknown scheme", &["PROPLET_MQTT_ADDRESS=\"http://127.0.0.1", "unknown scheme \"http\"", "ssl://"], |_, port, env| {
            env.set("MQTT_ADDRESS", &format!("http://127.0.0.1:{port}"));
        }),
        case("missing CA file", &["PROPLET_MQTT_TLS_CA_CERT=/nonexistent/ca.crt: cannot read the file", "check the path", "No such file"], |pki, port, env| {
            env.tls(port, pki).set("MQTT_TLS_CA_CERT", "/nonexistent/ca.crt");
        }),
        case("unreadable client cert", &["PROPLET_MQTT_TLS_CLIENT_CERT=/: cannot read the file", "not a regular file"], |pki, port, env| {
            env.mtls(port, pki, &pki.identity("proplet")).set("MQTT_TLS_CLIENT_CERT", "/");
        }),
        case("CA file without a certificate", &["PROPLET_MQTT_TLS_CA_CERT=", "ca.key: holds a private key but no certificate"], |pki, port, env| {
            env.tls(port, pki).path("MQTT_TLS_CA_CERT", &pki.path("ca.key"));
        }),
        case("CA directory without certificates", &["PROPLET_MQTT_TLS_CA_CERT=/proc/self/fdinfo: is a directory with no PEM certificate"], |pki, port, env| {
            env.tls(port, pki).set("MQTT_TLS_CA_CERT", "/proc/self/fdinfo");
        }),
        case("key file without a key", &["PROPLET_MQTT_TLS_CLIENT_KEY=", "proplet.crt: holds a certificate but no private key"], |pki, port, env| {
            let id = pki.identity("proplet");
            env.mtls(port, pki, &id).path("MQTT_TLS_CLIENT_KEY", &id.cert);
        }),
        case("key of another certificate", &["PROPLET_MQTT_TLS_CLIENT_KEY=", "manager.key does not match the certificate in PROPLET_MQTT_TLS_CLIENT_CERT=", "same key pair"], |pki, port, env| {
            env.mtls(port, pki, &pki.identity("proplet")).path("MQTT_TLS_CLIENT_KEY", &pki.identity("manager").key);
        }),
        case("certificate without a key", &["PROPLET_MQTT_TLS_CLIENT_CERT is set but PROPLET_MQTT_TLS_CLIENT_KEY is not"], |pki, port, env| {
            env.tls(port, pki).path("MQTT_TLS_CLIENT_CERT", &pki.identity("proplet").cert);
        }),
        case("key without a certificate", &["PROPLET_MQTT_TLS_CLIENT_KEY is set but PROPLET_MQTT_TLS_CLIENT_CERT is not"], |pki, port, env| {
            env.tls(port, pki).path("MQTT_TLS_CLIENT_KEY", &pki.identity("proplet").key);
        }),
        case("encrypted key without password", &["encrypted.key: the key is encrypted: set PROPLET_MQTT_TLS_CLIENT_KEY_PASSWORD"], |pki, port, env| {
            env.mtls(port, pki, &pki.identity("encrypted"));
        }),
        case("encrypted key with a wrong password", &["encrypted.key: cannot decrypt the key with PROPLET_MQTT_TLS_CLIENT_KEY_PASSWORD: the password is wrong"], |pki, port, env| {
            env.mtls(port, pki, &pki.identity("encrypted")).set("MQTT_TLS_CLIENT_KEY_PASSWORD", "not the password");
        }),
        case("legacy encrypted key", &["legacy.key: the key uses legacy PEM encryption", "openssl pkcs8 -topk8"], |pki, port, env| {
            env.mtls(port, pki, &pki.identity("legacy")).set("MQTT_TLS_CLIENT_KEY_PASSWORD", propeller_tests::KEY_PASSWORD);
        }),
        case("TLS variables with a tcp:// address", &["PROPLET_MQTT_TLS_CA_CERT, PROPLET_MQTT_TLS_CLIENT_CERT, PROPLET_MQTT_TLS_CLIENT_KEY are set, but PROPLET_MQTT_ADDRESS=\"tcp://", "never fall back to plaintext"], |pki, port, env| {
            env.mtls(port, pki, &pki.identity("proplet")).plain(port);
        }),
        case("QoS out of range", &["PROPLET_MQTT_QOS=\"3\" is not valid: QoS must be 0, 1 or 2"], |_, port, env| {
            env.plain(port).set("MQTT_QOS", "3");
        }),
        case("unparsable duration", &["PROPLET_MQTT_TIMEOUT=\"30 seconds\" is not valid", "30s, 500ms, 1m"], |_, port, env| {
            env.plain(port).set("MQTT_TIMEOUT", "30 seconds");
        }),
        case("unparsable keep-alive", &["PROPLET_MQTT_KEEP_ALIVE=\"0.5s\" is not valid: keep-alive must be whole seconds"], |_, port, env| {
            env.plain(port).set("MQTT_KEEP_ALIVE", "0.5s");
        }),
        case("unparsable number", &["PROPLET_MQTT_MAX_PACKET_SIZE=\"lots\" is not valid", "number of bytes"], |_, port, env| {
            env.plain(port).set("MQTT_MAX_PACKET_SIZE", "lots");
        }),
        case("bad log filter", &["PROPLET_LOG_LEVEL=\"loud[\" is not a valid log filter"], |_, port, env| {
            env.plain(port).set("LOG_LEVEL", "loud[");
        }),
        case("missing client id", &["PROPLET_CLIENT_ID is not set: set it to the Magistrala client id"], |_, port, env| {
            env.plain(port).set("CLIENT_ID", "");
        }),
        case("outbox directory that is a file", &["PROPLET_MQTT_OUTBOX_DIR=", "ca.crt: is not a directory: point it at a directory"], |pki, port, env| {
            env.plain(port).path("MQTT_OUTBOX_DIR", &pki.path("ca.crt"));
        }),
        case("outbox directory that cannot be made", &["PROPLET_MQTT_OUTBOX_DIR=/proc/self/outbox: cannot create the directory"], |_, port, env| {
            env.plain(port).set("MQTT_OUTBOX_DIR", "/proc/self/outbox");
        }),
        case("bad server name", &["PROPLET_MQTT_TLS_SERVER_NAME=\"bad name!\" is not valid"], |pki, port, env| {
            env.tls(port, pki).set("MQTT_TLS_SERVER_NAME", "bad name!");
        }),
    ];
    for case in cases {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let identity = pki.identity("proplet");
        let mut env = Env::new("PROPLET", &identity);
        (case.env)(pki, port, &mut env);
        let line = refused(&env, &listener);
        for expect in case.expect {
            assert!(
                line.contains(expect),
                "{}: expected {expect:?} in:\n{line}",
                case.name
            );
        }
        for secret in [
            identity.secret.as_str(),
            propeller_tests::KEY_PASSWORD,
            "not the password",
        ] {
            assert!(
                !line.contains(secret),
                "{}: a secret in:\n{line}",
                case.name
            );
        }
    }
}
