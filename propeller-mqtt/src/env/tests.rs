use std::time::Duration;

use super::*;
use crate::{Mode, QoS};

fn vars(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = [
        ("PROPLET_CLIENT_ID", "proplet-1"),
        ("PROPLET_CLIENT_KEY", "s3cret-key"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        vars.retain(|(name, _)| name != k);
        vars.push((k.to_string(), v.to_string()));
    }
    vars
}

/// The front end under `PROPLET_`, with one variable of the caller's own.
fn parse_env(extra: &[(&str, &str)]) -> Result<EnvConfig, ConfigError> {
    EnvConfig::from_vars("PROPLET_", &["LIVELINESS_INTERVAL"], vars(extra))
}

fn parse(extra: &[(&str, &str)]) -> Result<Options, ConfigError> {
    parse_env(extra).map(|config| config.options)
}

fn error(extra: &[(&str, &str)]) -> String {
    parse(extra).unwrap_err().to_string()
}

#[test]
fn defaults_follow_upstream() {
    let config = parse(&[]).unwrap();
    assert_eq!(config.brokers[0].to_string(), "tcp://localhost:1883");
    assert_eq!(config.brokers.len(), 1);
    assert_eq!(config.outbox_limit, 10_000);
    assert_eq!(config.mode(), Mode::Plain);
    assert_eq!(config.qos, QoS::ExactlyOnce);
    assert_eq!(config.connect_timeout, Duration::from_secs(30));
    assert_eq!(config.keep_alive, Duration::from_secs(30));
    assert_eq!(config.max_packet_size, 10 << 20);
    assert_eq!(config.names.var("MQTT_QOS"), "PROPLET_MQTT_QOS");
    assert!(!config.persistent_session);
    let persistent = parse(&[("PROPLET_MQTT_PERSISTENT_SESSION", "true")]).unwrap();
    assert!(persistent.persistent_session);
    assert_eq!(config.reconnect_min, Duration::from_secs(1));
    assert_eq!(config.reconnect_max, Duration::from_secs(60));
    assert_eq!(config.outbox_dir, None);
    let tuned = parse(&[
        ("PROPLET_MQTT_RECONNECT_MIN", "2s"),
        ("PROPLET_MQTT_RECONNECT_MAX", "5m"),
    ])
    .unwrap();
    assert_eq!(
        (tuned.reconnect_min, tuned.reconnect_max),
        (Duration::from_secs(2), Duration::from_secs(300))
    );
}

#[test]
fn modes_follow_scheme_and_identity() {
    let tls = parse(&[
        ("PROPLET_MQTT_ADDRESS", "ssl://nginx:8883"),
        ("PROPLET_MQTT_TLS_CA_CERT", "/ca.crt"),
    ])
    .unwrap();
    assert_eq!(tls.mode(), Mode::Tls);
    let mtls = parse(&[
        ("PROPLET_MQTT_ADDRESS", "mqtts://nginx"),
        ("PROPLET_MQTT_TLS_CLIENT_CERT", "/c.crt"),
        ("PROPLET_MQTT_TLS_CLIENT_KEY", "/c.key"),
    ])
    .unwrap();
    assert_eq!(mtls.mode(), Mode::MutualTls);
    assert_eq!(
        mtls.tls.unwrap().ca,
        None,
        "unset CA means the OS trust store"
    );
}

#[test]
fn empty_means_unset() {
    // What compose passes for commented-out lines of .env.
    let config = parse(&[
        ("PROPLET_MQTT_TLS_CA_CERT", ""),
        ("PROPLET_MQTT_TLS_CLIENT_CERT", ""),
        ("PROPLET_MQTT_TLS_CLIENT_KEY", "  "),
        ("PROPLET_MQTT_QOS", ""),
    ])
    .unwrap();
    assert_eq!(config.mode(), Mode::Plain);
    assert!(error(&[("PROPLET_CLIENT_ID", "")]).starts_with("PROPLET_CLIENT_ID is not set"));
}

#[test]
fn other_services_variables_are_ignored() {
    let config = parse(&[("MANAGER_MQTT_ADDRESS", "bogus"), ("MANAGER_MQTT_QOS", "9")]).unwrap();
    assert_eq!(config.brokers[0].port, 1883);
}

#[test]
fn newer_upstream_names_are_aliases() {
    let env = [("PROPLET_ENTITY_ID", "e"), ("PROPLET_API_KEY", "k")];
    let config = EnvConfig::from_vars("PROPLET_", &[], env).unwrap().options;
    assert_eq!(
        (config.client_id.as_str(), config.client_key.expose()),
        ("e", "k")
    );
    let conflict = error(&[("PROPLET_API_KEY", "other")]);
    assert!(
        conflict.contains("PROPLET_CLIENT_KEY") && conflict.contains("PROPLET_API_KEY"),
        "{conflict}"
    );
    assert!(
        !conflict.contains("s3cret-key") && !conflict.contains("other"),
        "{conflict}"
    );
}

#[test]
fn each_bad_value_names_its_variable_and_the_fix() {
    for (var, value, expect) in [
        ("PROPLET_MQTT_ADDRESS", "foo://x", "unknown scheme"),
        ("PROPLET_MQTT_QOS", "3", "0, 1 or 2"),
        ("PROPLET_MQTT_TIMEOUT", "soon", "30s"),
        ("PROPLET_MQTT_TIMEOUT", "0s", "more than zero"),
        ("PROPLET_MQTT_KEEP_ALIVE", "500ms", "whole seconds"),
        ("PROPLET_MQTT_KEEP_ALIVE", "100000", "65535s"),
        ("PROPLET_MQTT_MAX_PACKET_SIZE", "huge", "number of bytes"),
        ("PROPLET_MQTT_MAX_PACKET_SIZE", "1GiB", "unknown unit"),
        ("PROPLET_MQTT_MAX_PACKET_SIZE", "300MiB", "MQTT's limit"),
        ("PROPLET_CLIENT_ID", " x", "whitespace"),
        ("PROPLET_MQTT_OUTBOX_LIMIT", "0", "at least 1"),
        ("PROPLET_MQTT_PERSISTENT_SESSION", "yes", "true or false"),
        ("PROPLET_MQTT_RECONNECT_MIN", "0s", "more than zero"),
        ("PROPLET_MQTT_RECONNECT_MAX", "soon", "30s"),
        (
            "PROPLET_MQTT_RECONNECT_MAX",
            "500ms",
            "at least PROPLET_MQTT_RECONNECT_MIN",
        ),
        ("PROPLET_MQTT_ADDRESS", "tcp://a,ssl://b", "mixes plain"),
        ("PROPLET_MQTT_ADDRESS", "tcp://a,", "empty entry"),
    ] {
        let message = error(&[(var, value)]);
        assert!(
            message.starts_with(&format!("{var}={value:?} is not valid: ")),
            "{message}"
        );
        assert!(message.contains(expect), "{var}={value}: {message}");
    }
}

#[test]
fn missing_identity_says_what_to_set() {
    for var in ["PROPLET_CLIENT_ID", "PROPLET_CLIENT_KEY"] {
        let mut env = vars(&[]);
        env.retain(|(k, _)| k != var);
        let message = EnvConfig::from_vars("PROPLET_", &[], env)
            .unwrap_err()
            .to_string();
        assert!(
            message.starts_with(&format!("{var} is not set: set it to the Magistrala")),
            "{message}"
        );
    }
}

#[test]
fn tls_variables_never_fall_back_to_plaintext() {
    let message = error(&[
        ("PROPLET_MQTT_ADDRESS", "tcp://nginx:1883"),
        ("PROPLET_MQTT_TLS_CA_CERT", "/ca.crt"),
    ]);
    assert_eq!(
        message,
        "PROPLET_MQTT_TLS_CA_CERT is set, but PROPLET_MQTT_ADDRESS=\"tcp://nginx:1883\" is plain MQTT: \
         use an ssl:// (or wss://) address for TLS, or unset the TLS variables (we never fall back to plaintext)"
    );
    let both = error(&[
        ("PROPLET_MQTT_TLS_CLIENT_CERT", "/c"),
        ("PROPLET_MQTT_TLS_CLIENT_KEY", "/k"),
    ]);
    assert!(
        both.contains("PROPLET_MQTT_TLS_CLIENT_CERT, PROPLET_MQTT_TLS_CLIENT_KEY are set"),
        "{both}"
    );
}

#[test]
fn half_a_client_identity_is_refused() {
    let message = error(&[
        ("PROPLET_MQTT_ADDRESS", "ssl://x"),
        ("PROPLET_MQTT_TLS_CLIENT_CERT", "/c"),
    ]);
    assert!(
        message.starts_with(
            "PROPLET_MQTT_TLS_CLIENT_CERT is set but PROPLET_MQTT_TLS_CLIENT_KEY is not"
        ),
        "{message}"
    );
    let message = error(&[
        ("PROPLET_MQTT_ADDRESS", "ssl://x"),
        ("PROPLET_MQTT_TLS_CLIENT_KEY", "/k"),
    ]);
    assert!(
        message.starts_with(
            "PROPLET_MQTT_TLS_CLIENT_KEY is set but PROPLET_MQTT_TLS_CLIENT_CERT is not"
        ),
        "{message}"
    );
}

#[test]
fn server_name_and_skip_verify() {
    let config = parse(&[
        ("PROPLET_MQTT_ADDRESS", "ssl://127.0.0.1"),
        ("PROPLET_MQTT_TLS_SERVER_NAME", "localhost"),
        ("PROPLET_MQTT_TLS_INSECURE_SKIP_VERIFY", "true"),
    ])
    .unwrap();
    let tls = config.tls.unwrap();
    assert_eq!(tls.server_name.as_deref(), Some("localhost"));
    assert!(tls.insecure_skip_verify);
    assert!(error(&[
        ("PROPLET_MQTT_ADDRESS", "ssl://x"),
        ("PROPLET_MQTT_TLS_SERVER_NAME", "not a name")
    ])
    .contains("DNS name"));
    assert!(error(&[
        ("PROPLET_MQTT_ADDRESS", "ssl://x"),
        ("PROPLET_MQTT_TLS_INSECURE_SKIP_VERIFY", "yes")
    ])
    .contains("true or false"));
}

#[test]
fn secrets_stay_out_of_debug_output() {
    let config = parse(&[
        ("PROPLET_MQTT_ADDRESS", "ssl://x"),
        ("PROPLET_MQTT_TLS_CLIENT_CERT", "/c"),
        ("PROPLET_MQTT_TLS_CLIENT_KEY", "/k"),
        ("PROPLET_MQTT_TLS_CLIENT_KEY_PASSWORD", "pw-value"),
    ])
    .unwrap();
    let debug = format!("{config:?}");
    assert!(
        !debug.contains("s3cret-key") && !debug.contains("pw-value"),
        "{debug}"
    );
}

#[test]
fn a_list_of_brokers() {
    let config = parse(&[(
        "PROPLET_MQTT_ADDRESS",
        "ssl://a:8883, ssl://b,ssl://[::1]:9",
    )])
    .unwrap();
    let hosts: Vec<_> = config
        .brokers
        .iter()
        .map(|b| (b.host.as_str(), b.port))
        .collect();
    assert_eq!(hosts, [("a", 8883), ("b", 8883), ("::1", 9)]);
    assert_eq!(config.mode(), Mode::Tls);
}

#[test]
fn every_listed_variable_is_read_and_others_are_reported() {
    // RawEnv denies unknown fields: a listed name it lacks would fail here.
    let all: Vec<(String, String)> = VARIABLES
        .iter()
        .map(|suffix| (format!("PROPLET_{suffix}"), "1".to_owned()))
        .collect();
    let raw: Result<RawEnv, _> = envy::prefixed("PROPLET_").from_iter(all);
    assert!(raw.is_ok(), "{:?}", raw.err());
    let config = parse_env(&[
        ("PROPLET_MQTT_TLS_CA_CRT", "/ca.crt"),
        ("PROPLET_LIVELINESS_INTERVAL", "10s"),
    ])
    .unwrap();
    // The caller's own settings are neither unknown nor the connection's.
    assert_eq!(config.unknown, ["PROPLET_MQTT_TLS_CA_CRT"]);
    assert_eq!(config.settings.get("LIVELINESS_INTERVAL"), Some("10s"));
    assert_eq!(config.settings.var("TASK_TIMEOUT"), "PROPLET_TASK_TIMEOUT");
    assert!(config.settings.required("TASK_TIMEOUT", "set it").is_err());
    let error = config
        .settings
        .parse("LIVELINESS_INTERVAL", 0, |_| Err::<u8, _>("no".to_owned()))
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "PROPLET_LIVELINESS_INTERVAL=\"10s\" is not valid: no"
    );
}

#[test]
fn a_password_in_the_address_is_never_echoed() {
    let message = error(&[("PROPLET_MQTT_ADDRESS", "tcp://proplet:hunter2@nginx:1883")]);
    assert!(!message.contains("hunter2"), "{message}");
    assert!(message.contains("<redacted>@nginx:1883"), "{message}");
}

/// A 1 GiB file (sparse: no disk is used) is refused before it is read.
#[test]
fn a_huge_pem_file_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let huge = dir.path().join("huge.pem");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let config = parse(&[
        ("PROPLET_MQTT_ADDRESS", "ssl://localhost:8883"),
        ("PROPLET_MQTT_TLS_CA_CERT", huge.to_str().unwrap()),
    ])
    .unwrap();
    let Err(error) = config.load_tls() else {
        panic!("a 1 GiB CA was accepted");
    };
    let message = crate::one_line(&error);
    assert!(
        message.contains("PROPLET_MQTT_TLS_CA_CERT") && message.contains("over the"),
        "{message}"
    );
}

/// A FIFO or a device as a PEM path is refused at once, not read forever.
#[test]
fn a_ca_path_that_is_not_a_regular_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    for path in ["/dev/zero".into(), fifo] {
        if path.to_str() != Some("/dev/zero") && !made.as_ref().is_ok_and(|s| s.success()) {
            continue;
        }
        let config = parse(&[
            ("PROPLET_MQTT_ADDRESS", "ssl://localhost:8883"),
            ("PROPLET_MQTT_TLS_CA_CERT", path.to_str().unwrap()),
        ])
        .unwrap();
        let Err(error) = config.load_tls() else {
            panic!("{path:?} was accepted as a CA");
        };
        let message = crate::one_line(&error);
        assert!(message.contains("not a regular file"), "{message}");
    }
}

/// A caller's own variable may be a password: Debug names it, never shows it.
#[test]
fn own_settings_are_not_shown_by_debug() {
    let config = EnvConfig::from_vars(
        "PROPLET_",
        &["DB_PASS"],
        vars(&[("PROPLET_DB_PASS", "hunter2-db")]),
    )
    .unwrap();
    let debug = format!("{config:?}");
    assert!(debug.contains("PROPLET_DB_PASS"), "{debug}");
    assert!(!debug.contains("hunter2-db"), "{debug}");
}

#[test]
fn websocket_addresses_count_as_their_security() {
    let config = parse(&[
        ("PROPLET_MQTT_ADDRESS", "wss://edge/mqtt, ssl://edge:8883"),
        ("PROPLET_MQTT_TLS_CLIENT_CERT", "/c.crt"),
        ("PROPLET_MQTT_TLS_CLIENT_KEY", "/c.key"),
    ])
    .unwrap();
    assert_eq!(config.mode(), Mode::MutualTls);
    assert_eq!(config.brokers[0].websocket.as_deref(), Some("/mqtt"));
    assert_eq!(config.brokers[1].websocket, None);
    let plain = parse(&[("PROPLET_MQTT_ADDRESS", "ws://edge:8080/mqtt,tcp://b")]).unwrap();
    assert_eq!(plain.mode(), Mode::Plain);
    let message = error(&[("PROPLET_MQTT_ADDRESS", "ws://a/mqtt,wss://b/mqtt")]);
    assert!(
        message.contains("PROPLET_MQTT_ADDRESS") && message.contains("mixes plain"),
        "{message}"
    );
    let message = error(&[
        ("PROPLET_MQTT_ADDRESS", "ws://a/mqtt"),
        ("PROPLET_MQTT_TLS_CA_CERT", "/ca.crt"),
    ]);
    assert!(message.contains("ssl:// (or wss://)"), "{message}");
}

#[test]
fn the_server_name_is_also_the_sni() {
    let config = parse(&[
        ("PROPLET_MQTT_ADDRESS", "ssl://10.0.0.5:8883"),
        ("PROPLET_MQTT_TLS_SERVER_NAME", "mqtt.example.com"),
    ])
    .unwrap();
    assert_eq!(
        config.tls_server_name(&config.brokers[0]),
        "mqtt.example.com"
    );
    let config = parse(&[("PROPLET_MQTT_ADDRESS", "ssl://10.0.0.5:8883")]).unwrap();
    assert_eq!(config.tls_server_name(&config.brokers[0]), "10.0.0.5");
}

#[test]
fn alpn_is_a_comma_separated_list() {
    let config = parse(&[
        ("PROPLET_MQTT_ADDRESS", "ssl://edge:443"),
        ("PROPLET_MQTT_TLS_ALPN", "x-amzn-mqtt-ca, mqtt"),
    ])
    .unwrap();
    assert_eq!(
        config.tls.as_ref().unwrap().alpn,
        ["x-amzn-mqtt-ca", "mqtt"]
    );
    for (bad, hint) in [("mqtt,,x", "1 to 255"), ("mq tt", "visible ASCII")] {
        let message = error(&[
            ("PROPLET_MQTT_ADDRESS", "ssl://edge:443"),
            ("PROPLET_MQTT_TLS_ALPN", bad),
        ]);
        assert!(
            message.starts_with("PROPLET_MQTT_TLS_ALPN=") && message.contains(hint),
            "{message}"
        );
    }
    let message = error(&[("PROPLET_MQTT_TLS_ALPN", "mqtt")]);
    assert!(
        message.contains("PROPLET_MQTT_TLS_ALPN is set, but PROPLET_MQTT_ADDRESS"),
        "{message}"
    );
    // Options built in code are checked the same way.
    let mut options = parse(&[("PROPLET_MQTT_ADDRESS", "ssl://edge:443")]).unwrap();
    options.tls.as_mut().unwrap().alpn = vec![String::new()];
    let message = options.validate().unwrap_err().to_string();
    assert!(message.starts_with("PROPLET_MQTT_TLS_ALPN"), "{message}");
}

#[test]
fn the_proxy_is_parsed_and_its_credentials_never_shown() {
    let config = parse(&[(
        "PROPLET_MQTT_PROXY",
        "http://ops%40site:p%3Ass@proxy.lan:3128/",
    )])
    .unwrap();
    let proxy = config.proxy.as_ref().unwrap();
    assert_eq!((proxy.host.as_str(), proxy.port), ("proxy.lan", 3128));
    let credentials = proxy.credentials.as_ref().unwrap();
    assert_eq!(
        (credentials.user.expose(), credentials.password.expose()),
        ("ops@site", "p:ss")
    );
    let shown = format!("{config:?} {proxy}");
    assert!(
        !shown.contains("p%3Ass") && !shown.contains("p:ss"),
        "{shown}"
    );
    assert!(!shown.contains("ops"), "{shown}");
    assert!(
        shown.contains("http://<redacted>@proxy.lan:3128"),
        "{shown}"
    );

    let ipv6 = parse(&[("PROPLET_MQTT_PROXY", "http://[::1]:8080")]).unwrap();
    assert_eq!(ipv6.proxy.as_ref().unwrap().authority(), "[::1]:8080");
    assert!(ipv6.proxy.as_ref().unwrap().credentials.is_none());

    for (bad, hint) in [
        ("socks5://u:hunter2@p:1080", "only HTTP proxies"),
        ("https://u:hunter2@p:3128", "not supported"),
        ("http://u:hunter2@p", "port is missing"),
        ("http://u:hunter2@p:0", "1 to 65535"),
        ("http://u:hunter2@p:3128/path", "without a path"),
        ("http://:hunter2@p:3128", "user before '@' is empty"),
        ("http://u:hunter2%zz@p:3128", "two hex digits"),
        ("u:hunter2@p:3128", "missing scheme"),
        ("http://u:hunter2/x@p", "port is missing"),
    ] {
        let message = error(&[("PROPLET_MQTT_PROXY", bad)]);
        assert!(
            message.starts_with("PROPLET_MQTT_PROXY") && message.contains(hint),
            "{bad}: {message}"
        );
        assert!(!message.contains("hunter2"), "{message}");
    }
}

#[test]
fn the_outbox_directory_is_read_not_touched() {
    let config = parse_env(&[("PROPLET_MQTT_OUTBOX_DIR", "/var/lib/proplet/outbox")]).unwrap();
    assert_eq!(
        config.options.outbox_dir.as_deref(),
        Some(std::path::Path::new("/var/lib/proplet/outbox"))
    );
    assert!(config.unknown.is_empty(), "{:?}", config.unknown);
    // Empty means unset, as for every variable.
    let unset = parse(&[("PROPLET_MQTT_OUTBOX_DIR", " ")]).unwrap();
    assert_eq!(unset.outbox_dir, None);
}
