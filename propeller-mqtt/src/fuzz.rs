//! Property tests: every parser fed by an operator's env or files returns a
//! value or an error on any input, and never panics.
//!
//! Case counts are fixed so the run is bounded; `PROPTEST_CASES` raises them
//! for a longer hunt.

use std::io::Write;

use proptest::prelude::*;

use crate::env::{value, BrokerAddress, EnvConfig};
use crate::tls::TlsSetup;

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Strings that look like what operators write, and some that do not.
fn env_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".*",
        "[a-z]{0,6}://[a-z0-9.:\\[\\],]{0,30}",
        "[0-9.]{0,8}(ns|us|µs|ms|s|m|h|KiB|MiB|MB|x)?",
        "(tcp|ssl|mqtt|tls|mqtts)://\\[?[0-9a-f:.]{0,20}\\]?(:[0-9]{0,6})?(,.*)?",
    ]
}

const BASE64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            out.push(match i <= chunk.len() {
                true => BASE64[(n >> (18 - 6 * i)) as usize & 63] as char,
                false => '=',
            });
        }
    }
    out
}

/// A PEM block with one of the labels we read around arbitrary DER bytes, so
/// that the bytes reach the certificate and key parsers.
fn pem_block() -> impl Strategy<Value = Vec<u8>> {
    let label = prop_oneof![
        Just("CERTIFICATE"),
        Just("PRIVATE KEY"),
        Just("RSA PRIVATE KEY"),
        Just("EC PRIVATE KEY"),
        Just("ENCRYPTED PRIVATE KEY"),
    ];
    // DER that starts like a SEQUENCE, to get past the first byte.
    let der = proptest::collection::vec(any::<u8>(), 0..400).prop_map(|mut body| {
        body.insert(0, 0x30);
        body
    });
    (label, der).prop_map(|(label, der)| {
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            base64(&der)
        )
        .into_bytes()
    })
}

fn file_content() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![proptest::collection::vec(any::<u8>(), 0..600), pem_block()]
}

proptest! {
    #![proptest_config(cases(3000))]

    #[test]
    fn address_parser_never_panics(text in env_text()) {
        let _ = BrokerAddress::parse(&text);
    }

    #[test]
    fn value_parsers_never_panic(text in env_text()) {
        let _ = value::duration(&text);
        let _ = value::byte_size(&text);
        let _ = value::qos(&text);
        let _ = value::boolean(&text);
    }
}

proptest! {
    #![proptest_config(cases(1000))]

    #[test]
    fn config_parsing_never_panics(values in proptest::collection::vec(env_text(), 12)) {
        let names = [
            "MQTT_ADDRESS", "MQTT_TLS_SERVER_NAME", "MQTT_TLS_INSECURE_SKIP_VERIFY", "CLIENT_ID",
            "CLIENT_KEY", "ENTITY_ID", "API_KEY", "MQTT_QOS", "MQTT_TIMEOUT", "MQTT_KEEP_ALIVE",
            "MQTT_MAX_PACKET_SIZE", "MQTT_OUTBOX_LIMIT",
        ];
        let vars = names.iter().zip(values).map(|(name, value)| (format!("PROXY_{name}"), value));
        let _ = EnvConfig::from_vars("PROXY_", &[], vars);
    }
}

/// Writes `files` to a temporary directory and loads a TLS setup from them.
fn load_tls(
    files: &[(&str, &str, &[u8])],
    extra: &[(&str, &str)],
) -> Result<Option<TlsSetup>, crate::ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let mut vars: Vec<(String, String)> = [
        ("MQTT_ADDRESS", "ssl://127.0.0.1:8883"),
        ("CLIENT_ID", "c"),
        ("CLIENT_KEY", "k"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| (format!("PROPLET_{k}"), v.to_string()))
    .collect();
    for (var, name, bytes) in files {
        let path = dir.path().join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        vars.push((format!("PROPLET_{var}"), path.display().to_string()));
    }
    let options = EnvConfig::from_vars("PROPLET_", &[], vars).unwrap().options;
    options.load_tls()
}

proptest! {
    #![proptest_config(cases(500))]

    #[test]
    fn ca_loading_never_panics(ca in file_content()) {
        // Random bytes are never a usable CA certificate: an error, not a panic.
        prop_assert!(load_tls(&[("MQTT_TLS_CA_CERT", "ca.pem", &ca)], &[]).is_err());
    }

    #[test]
    fn identity_loading_never_panics(cert in file_content(), key in file_content(), password in proptest::option::of(".{0,12}")) {
        // Skipping server verification lets the identity files be read first.
        let mut extra = vec![("MQTT_TLS_INSECURE_SKIP_VERIFY", "true")];
        if let Some(password) = &password {
            extra.push(("MQTT_TLS_CLIENT_KEY_PASSWORD", password));
        }
        let files: [(&str, &str, &[u8]); 2] = [
            ("MQTT_TLS_CLIENT_CERT", "client.crt", &cert),
            ("MQTT_TLS_CLIENT_KEY", "client.key", &key),
        ];
        prop_assert!(load_tls(&files, &extra).is_err());
    }
}

#[test]
fn base64_matches_the_standard() {
    assert_eq!(base64(b"Man"), "TWFu");
    assert_eq!(base64(b"Ma"), "TWE=");
    assert_eq!(base64(b"M"), "TQ==");
}
