//! The README's first command, `cargo run --example quickstart`, shows every
//! service connecting in every mode and a refusal explained, exits 0, and
//! leaves no file behind. It needs nothing installed: no mosquitto, no nginx.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn quickstart_connects_every_service_in_every_mode() {
    let profile_dir = std::env::current_exe()
        .unwrap()
        .ancestors()
        .nth(2)
        .unwrap()
        .to_owned();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args([
            "build",
            "-q",
            "--example",
            "quickstart",
            "-p",
            "propeller-examples",
        ])
        .status()
        .unwrap();
    assert!(status.success(), "cargo build --example quickstart");
    let output = Command::new(profile_dir.join("examples/quickstart"))
        .output()
        .expect("run the quickstart");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("every outcome as expected"), "{text}");
    for mode in ["plain", "mqtts", "mtls"] {
        for service in ["manager", "proplet", "proxy"] {
            let row = format!("  {mode:<16} {service:<8} yes ");
            assert!(text.contains(&row), "no {row:?} in:\n{text}");
        }
    }
    assert!(text.contains("mtls, wrong CN   proplet  no           the connection was closed before the broker answered CONNECT"), "{text}");
    assert_eq!(
        text.matches("MQTT connection established").count(),
        9,
        "{text}"
    );
    assert!(
        !text.contains("-secret-"),
        "a client key was printed:\n{text}"
    );
    let pki: PathBuf = text
        .lines()
        .find_map(|line| {
            line.strip_prefix("1. PKI made in ")?
                .split(" with ")
                .next()
                .map(PathBuf::from)
        })
        .expect("the PKI directory is named");
    assert!(!pki.exists(), "{} was left behind", pki.display());
}
