//! `propeller-mqtt check` and `propeller-mqtt certs` against the real
//! mosquitto and nginx edge.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use propeller_tests::pki::Identity;
use propeller_tests::{
    accounts, client_id, servers_available, Edge, Env, Mosquitto, Pki, ServiceProcess,
    CHANNEL_TOPICS, CONNECTED,
};

/// Runs `propeller-mqtt` with exactly `env` (plus PATH); returns (success, stdout + stderr).
fn tool(args: &[&str], env: &[(String, String)]) -> (bool, String) {
    let output = Command::new(propeller_tests::process::binary("propeller-mqtt"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run propeller-mqtt");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

fn check(env: &Env) -> (bool, String) {
    tool(&["check", "--service", "proplet"], &env.vars)
}

const STEPS_MTLS: [&str; 15] = [
    "address",
    "mode",
    "ca",
    "ca cert",
    "client cert",
    "client key",
    "chain",
    "cn rule",
    "key file",
    "dns",
    "tcp",
    "broker cert",
    "tls",
    "name",
    "mqtt",
];

#[test]
fn check_passes_a_healthy_setup_in_every_mode() {
    if !servers_available("check_passes_a_healthy_setup_in_every_mode") {
        return;
    }
    let pki = Pki::shared();
    let proplet = pki.identity("proplet");
    let broker = Mosquitto::for_clients(pki, &[&proplet]);
    let edge = Edge::start(pki, broker.plain, "server", "ca.crt");
    let mut plain = Env::new("PROPLET", &proplet);
    plain.plain(broker.plain);
    let mut tls = Env::new("PROPLET", &proplet);
    tls.tls(broker.tls, pki);
    let mut mtls = Env::new("PROPLET", &proplet);
    mtls.mtls(edge.port, pki, &proplet);
    for (mode, env) in [("plain", &plain), ("tls", &tls), ("mtls", &mtls)] {
        let (passed, report) = check(env);
        assert!(passed, "{mode}:\n{report}");
        assert!(
            report.contains(&format!("ok    mode         {mode}:")),
            "{mode}:\n{report}"
        );
        assert!(
            report.contains("CONNACK: connection accepted"),
            "{mode}:\n{report}"
        );
        assert!(report.contains("proplet: every check passed"), "{report}");
        assert!(
            !report.contains(&proplet.secret),
            "the report shows the client key:\n{report}"
        );
    }
    let (_, report) = check(&mtls);
    for step in STEPS_MTLS {
        assert!(
            report.contains(&format!("  {step:<12} ")),
            "no {step} line:\n{report}"
        );
    }
    assert!(report.contains("CN=<secret, "), "{report}");
    assert!(
        report.contains("the broker asked for a client certificate; ours was sent"),
        "{report}"
    );
    println!("{report}");

    let (passed, json) = tool(&["check", "--service", "proplet", "--json"], &mtls.vars);
    assert!(passed, "{json}");
    let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    assert_eq!(value[0]["passed"], true);
    assert_eq!(
        value[0]["steps"].as_array().unwrap().last().unwrap()["step"],
        "mqtt"
    );
}

#[test]
fn check_names_every_failure_class() {
    if !servers_available("check_names_every_failure_class") {
        return;
    }
    let pki = Pki::shared();
    let ids: Vec<Identity> = ["proplet", "manager", "stranger", "expired"]
        .iter()
        .map(|n| pki.identity(n))
        .collect();
    let broker = Mosquitto::start(
        pki,
        &accounts(&ids.iter().collect::<Vec<_>>(), CHANNEL_TOPICS),
    );
    let edge = Edge::start(pki, broker.plain, "server", "ca.crt");
    let dns_only = Edge::start(pki, broker.plain, "server-dns", "ca.crt");
    let expired_edge = Edge::start(pki, broker.plain, "server-expired", "ca.crt");
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let proplet = pki.identity("proplet");

    type Setup<'a> = Box<dyn Fn(&mut Env) + 'a>;
    let cases: Vec<(&str, &str, &str, Setup)> = vec![
        (
            "configuration error",
            "config",
            "unknown scheme",
            Box::new(|env| {
                env.set("MQTT_ADDRESS", "http://127.0.0.1");
            }),
        ),
        (
            "untrusted broker",
            "tls",
            "not trusted (unknown issuer)",
            Box::new(|env| {
                env.tls(broker.tls, pki)
                    .path("MQTT_TLS_CA_CERT", &pki.path("other-ca.crt"));
            }),
        ),
        (
            "name mismatch",
            "tls",
            "is not valid for \"127.0.0.1\"",
            Box::new(|env| {
                env.mtls(dns_only.port, pki, &proplet);
            }),
        ),
        (
            "expired broker certificate",
            "tls",
            "the broker's certificate has expired",
            Box::new(|env| {
                env.mtls(expired_edge.port, pki, &proplet);
            }),
        ),
        (
            "client certificate required (mosquitto)",
            "tls verdict",
            "requires a client certificate",
            Box::new(|env| {
                env.tls(broker.mtls, pki);
            }),
        ),
        (
            "client certificate required (nginx)",
            "tls verdict",
            "requires a client certificate",
            Box::new(|env| {
                env.tls(edge.port, pki);
            }),
        ),
        (
            "client certificate rejected",
            "tls verdict",
            "rejected our client certificate",
            Box::new(|env| {
                env.mtls(edge.port, pki, &pki.identity("stranger"));
            }),
        ),
        (
            "client certificate expired",
            "tls verdict",
            "our client certificate has expired",
            Box::new(|env| {
                env.mtls(edge.port, pki, &pki.identity("expired"));
            }),
        ),
        (
            "CN does not match the key",
            "mqtt",
            "closed before the broker answered CONNECT",
            Box::new(|env| {
                env.mtls(edge.port, pki, &pki.identity("manager"));
            }),
        ),
        (
            "not authorized",
            "mqtt",
            "not authorized",
            Box::new(|env| {
                env.plain(broker.plain).set("CLIENT_KEY", "wrong");
            }),
        ),
        (
            "unreachable",
            "tcp",
            "connection refused",
            Box::new(move |env| {
                env.plain(closed);
            }),
        ),
        (
            "timeout",
            "mqtt",
            "no answer from the broker",
            Box::new(|env| {
                env.plain(silent.local_addr().unwrap().port())
                    .set("MQTT_TIMEOUT", "1s");
            }),
        ),
        (
            "unknown host",
            "dns",
            "cannot resolve",
            Box::new(|env| {
                env.set("MQTT_ADDRESS", "tcp://no-such-host.invalid:1883");
            }),
        ),
    ];
    for (name, step, text, setup) in &cases {
        let mut env = Env::new("PROPLET", &proplet);
        setup(&mut env);
        let (passed, report) = check(&env);
        println!("--- {name}\n{report}");
        assert!(!passed, "{name}: check passed:\n{report}");
        let fail = report
            .lines()
            .find(|l| l.trim_start().starts_with("FAIL"))
            .unwrap_or_else(|| panic!("{name}: no FAIL line:\n{report}"));
        assert!(
            fail.contains(&format!("FAIL  {step:<12} ")),
            "{name}: failed at another step:\n{report}"
        );
        assert!(fail.contains(text), "{name}: expected {text:?}:\n{report}");
        assert!(
            !report.contains(&proplet.secret),
            "{name}: the report shows a secret:\n{report}"
        );
    }
    // The CN mismatch is also flagged before connecting.
    let mut env = Env::new("PROPLET", &proplet);
    env.mtls(edge.port, pki, &pki.identity("manager"));
    let (_, report) = check(&env);
    assert!(
        report.contains(
            "warn  cn rule      PROPLET_CLIENT_KEY does not end with the certificate's CN"
        ),
        "{report}"
    );
}

#[test]
fn certs_makes_what_openssl_mosquitto_and_nginx_accept() {
    if !servers_available("certs_makes_what_openssl_mosquitto_and_nginx_accept") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let secret = "4c871ca5-b365-4f6e-a705-bb1f695bc37a";
    let password = [("CLIENT_KEY_PASSWORD".to_owned(), "pw of the key".to_owned())];
    for args in [
        vec!["certs", "--dir", d, "ca"],
        vec!["certs", "--dir", d, "server", "--san", "IP:127.0.0.1"],
        vec![
            "certs", "--dir", d, "client", "--secret", secret, "--name", "proplet",
        ],
        vec![
            "certs",
            "--dir",
            d,
            "--rsa",
            "2048",
            "--encrypt-key",
            "CLIENT_KEY_PASSWORD",
            "client",
            "--secret",
            secret,
            "--name",
            "encrypted",
        ],
    ] {
        let (ok, output) = tool(&args, &password);
        assert!(ok, "{args:?}: {output}");
        assert!(!output.contains(secret), "{output}");
    }
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    openssl(&[
        "verify",
        "-CAfile",
        "ca.crt",
        "server.crt",
        "proplet.crt",
        "encrypted.crt",
    ]);
    let client = openssl(&["x509", "-in", "proplet.crt", "-noout", "-text"]);
    assert!(
        client.contains("Version: 3") && client.contains("TLS Web Client Authentication"),
        "{client}"
    );
    assert!(
        client.contains(&format!("CN = {secret}")) && client.contains("O = Propeller"),
        "{client}"
    );
    let server = openssl(&[
        "x509",
        "-in",
        "server.crt",
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    assert!(
        server.contains("DNS:localhost")
            && server.contains("DNS:nginx")
            && server.contains("IP Address:127.0.0.1"),
        "{server}"
    );
    openssl(&[
        "pkey",
        "-in",
        "encrypted.key",
        "-passin",
        "pass:pw of the key",
        "-noout",
    ]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(Path::new(d).join("proplet.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    // Never overwrite without --force; refuse a CN longer than X.509 allows.
    let (ok, output) = tool(&["certs", "--dir", d, "ca"], &[]);
    assert!(
        !ok && output.contains("ca.crt exists: pass --force"),
        "{output}"
    );
    let long = "x".repeat(65);
    let (ok, output) = tool(
        &[
            "certs", "--dir", d, "client", "--secret", &long, "--name", "long",
        ],
        &[],
    );
    assert!(
        !ok && output.contains("65 characters, but a certificate CN holds at most 64"),
        "{output}"
    );
    assert!(!output.contains(&long), "{output}");

    // mosquitto and nginx take them: a proplet connects through the edge and
    // straight to mosquitto's mTLS listener, with the plain and the encrypted key.
    let pki = Pki {
        dir: dir.path().to_owned(),
    };
    let identity = |name: &'static str| Identity {
        name,
        cert: pki.path(&format!("{name}.crt")),
        key: pki.path(&format!("{name}.key")),
        secret: secret.to_owned(),
    };
    let (plain_key, encrypted_key) = (identity("proplet"), identity("encrypted"));
    let broker = Mosquitto::start(
        &pki,
        &[propeller_tests::Account {
            username: client_id("proplet"),
            password: secret.to_owned(),
            topics: CHANNEL_TOPICS.to_owned(),
        }],
    );
    let edge = Edge::start(&pki, broker.plain, "server", "ca.crt");
    for port in [edge.port, broker.mtls] {
        for id in [&plain_key, &encrypted_key] {
            let mut env = Env::new("PROPLET", &plain_key);
            env.mtls(port, &pki, id).set(
                "MQTT_TLS_CLIENT_KEY_PASSWORD",
                if id.name == "encrypted" {
                    "pw of the key"
                } else {
                    ""
                },
            );
            let service = ServiceProcess::start("proplet", &env.vars);
            service.wait_for(CONNECTED, Duration::from_secs(10));
        }
    }
}

#[test]
fn services_read_an_env_file_under_the_environment() {
    if !servers_available("services_read_an_env_file_under_the_environment") {
        return;
    }
    let pki = Pki::shared();
    let proplet = pki.identity("proplet");
    let broker = Mosquitto::for_clients(pki, &[&proplet]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proplet.env");
    let mut env = Env::new("PROPLET", &proplet);
    env.plain(broker.plain);
    // Everything in the file; the environment overrides the address with a
    // working one and leaves an empty value that must not erase the file's.
    let mut text: String = env
        .vars
        .iter()
        .map(|(k, v)| format!("{k}=\"{v}\"\n"))
        .collect();
    text = text.replace(
        &format!("tcp://127.0.0.1:{}", broker.plain),
        "tcp://127.0.0.1:1",
    );
    std::fs::write(&file, text).unwrap();
    let overrides = vec![
        (
            "PROPLET_MQTT_ADDRESS".to_owned(),
            format!("tcp://127.0.0.1:{}", broker.plain),
        ),
        ("PROPLET_CLIENT_ID".to_owned(), String::new()),
    ];
    let mut service = ServiceProcess::start_with_args(
        "proplet",
        &["--env-file", file.to_str().unwrap()],
        &overrides,
    );
    service.wait_for("read variables from the env file", Duration::from_secs(10));
    service.wait_for(CONNECTED, Duration::from_secs(10));
    assert!(service.terminate(Duration::from_secs(5)).success());
    let (passed, report) = tool(&["check", "--env-file", file.to_str().unwrap()], &overrides);
    assert!(
        passed && report.contains("proplet: every check passed"),
        "{report}"
    );
}
