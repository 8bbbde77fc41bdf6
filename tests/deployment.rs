//! The deployment files (docker/) say what the binaries read and run what the
//! tests run. No Docker engine is needed: this reads the files, renders the
//! edge config the way compose would, and has nginx check it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use propeller_mqtt::env::VARIABLES;
use propeller_protocol::Service;
use propeller_service::HEALTH_FILE;
use propeller_tests::{servers_available, Pki, INSTALL};
use yaml_rust2::{Yaml, YamlLoader};

const SERVICES: [(&str, &str); 3] = [
    ("manager", "MANAGER_"),
    ("proplet", "PROPLET_"),
    ("proxy", "PROXY_"),
];

fn docker(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docker")
        .join(file)
}

fn read(file: &str) -> String {
    std::fs::read_to_string(docker(file)).unwrap_or_else(|e| panic!("read docker/{file}: {e}"))
}

/// Is `name` a variable the service with `prefix` reads?
fn known(prefix: &str, name: &str) -> bool {
    let service = Service::ALL
        .into_iter()
        .find(|s| s.prefix() == prefix)
        .expect("a service prefix");
    name == HEALTH_FILE
        || name.strip_prefix(prefix).is_some_and(|suffix| {
            VARIABLES.contains(&suffix) || service.own_variables().contains(&suffix)
        })
}

/// Every `MANAGER_X`, `PROPLET_X`, `PROXY_X` token in `text`, commented or not.
fn service_variables(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|token| SERVICES.iter().any(|(_, prefix)| token.starts_with(prefix)))
        .map(str::to_owned)
        .collect()
}

#[test]
fn compose_passes_only_variables_the_services_read() {
    let text = read("compose.yaml");
    let compose = &YamlLoader::load_from_str(&text).expect("compose.yaml is YAML")[0];
    for (name, prefix) in SERVICES {
        let service = &compose["services"][name];
        assert_eq!(
            service["command"][0].as_str(),
            Some(name),
            "{name} runs its own binary"
        );
        let environment = service["environment"]
            .as_hash()
            .unwrap_or_else(|| panic!("{name}: no environment"));
        for (key, value) in environment {
            let key = key.as_str().unwrap();
            assert!(
                known(prefix, key),
                "{name}: {key} is not a variable {name} reads"
            );
            assert_eq!(
                value.as_str(),
                Some(format!("${{{key}}}").as_str()),
                "{name}: {key} passes through"
            );
        }
        for required in [
            "MQTT_ADDRESS",
            "CLIENT_ID",
            "CLIENT_KEY",
            "DOMAIN_ID",
            "CHANNEL_ID",
        ] {
            assert!(
                environment.contains_key(&Yaml::String(format!("{prefix}{required}"))),
                "{name}: {prefix}{required}"
            );
        }
    }
    // Commented lines too: the TLS passthrough and the certificate mounts of
    // the guide's steps 2 and 3, for every service.
    for variable in service_variables(&text) {
        assert!(
            SERVICES.iter().any(|(_, p)| known(p, &variable)),
            "compose.yaml names {variable}, which nothing reads"
        );
    }
    for (name, prefix) in SERVICES {
        for suffix in [
            "MQTT_TLS_CA_CERT",
            "MQTT_TLS_CLIENT_CERT",
            "MQTT_TLS_CLIENT_KEY",
        ] {
            assert!(
                text.contains(&format!("# {prefix}{suffix}: ${{{prefix}{suffix}}}")),
                "{name}: commented {suffix}"
            );
        }
        for (source, target) in [
            ("ca.crt", "ca.crt"),
            (&format!("{name}.crt"), "client.crt"),
            (&format!("{name}.key"), "client.key"),
        ] {
            assert!(
                text.contains(&format!("#     source: ./ssl/certs/{source}")),
                "{name}: mount of {source}"
            );
            assert!(
                text.contains(&format!("#     target: /etc/propeller/tls/{target}")),
                "{name}: mount at {target}"
            );
        }
    }
    // The edge profile builds docker/nginx and passes what render.sh reads.
    let nginx = &compose["services"]["nginx"];
    assert_eq!(nginx["build"].as_str(), Some("./nginx"));
    let render = read("nginx/render.sh");
    for (key, _) in nginx["environment"].as_hash().unwrap() {
        let key = key.as_str().unwrap();
        assert!(
            render.contains(&format!("${{{key}")) || render.contains(&format!("${key}")),
            "render.sh does not read {key}"
        );
    }
}

#[test]
fn env_file_has_three_modes_of_known_variables() {
    let text = read(".env");
    for variable in service_variables(&text) {
        assert!(
            SERVICES.iter().any(|(_, p)| known(p, &variable)),
            "docker/.env names {variable}, which nothing reads"
        );
    }
    // Only plain mode is active; MQTTS and mTLS are commented blocks.
    let vars = propeller_mqtt::env_file::read(&docker(".env")).expect("docker/.env parses");
    for (_, prefix) in SERVICES {
        let get = |suffix: &str| {
            vars.iter()
                .find(|(k, _)| *k == format!("{prefix}{suffix}"))
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("MQTT_ADDRESS"), Some("tcp://nginx:1883"));
        assert_eq!(get("MQTT_TLS_CA_CERT"), None);
        assert!(text.contains(&format!(
            "# {prefix}MQTT_TLS_CLIENT_KEY=/etc/propeller/tls/client.key"
        )));
        assert!(
            text.contains(&format!("# {prefix}MQTT_TLS_CLIENT_KEY=\n")),
            "MQTTS leaves the key empty"
        );
    }
    // What compose would hand the services parses in every service.
    for service in propeller_protocol::Service::ALL {
        let config = propeller_protocol::ServiceConfig::from_vars(service, vars.clone())
            .expect("docker/.env is a valid config");
        assert!(config.unknown.is_empty(), "{:?}", config.unknown);
    }
}

#[test]
fn the_image_builds_with_the_script_ci_runs() {
    let dockerfile = read("Dockerfile");
    assert!(
        dockerfile.contains("RUN sh docker/build.sh /out"),
        "the Dockerfile builds with docker/build.sh"
    );
    assert!(
        dockerfile.contains("USER propeller") && dockerfile.contains("HEALTHCHECK"),
        "{dockerfile}"
    );
    assert!(
        dockerfile.contains(&format!("ENV {HEALTH_FILE}=")),
        "the healthcheck reads the file the services write"
    );
    assert!(
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/run"))
            .unwrap()
            .contains("docker/build.sh")
    );
    // The edge image installs the packages the tests run against.
    let edge = read("nginx/Dockerfile");
    assert!(
        edge.contains("nginx libnginx-mod-stream libnginx-mod-stream-js"),
        "{edge}"
    );
    assert!(INSTALL.contains("nginx libnginx-mod-stream libnginx-mod-stream-js"));
}

#[test]
fn compose_renders_an_edge_config_nginx_accepts() {
    if !servers_available("compose_renders_an_edge_config_nginx_accepts") {
        return;
    }
    let pki = Pki::shared();
    let dir = tempfile::tempdir().unwrap();
    for auth in ["key", "x509"] {
        let out = dir.path().join(format!("nginx-{auth}.conf"));
        // compose's values, with this machine's paths for the mounted files.
        let status = Command::new("sh")
            .arg(docker("nginx/render.sh"))
            .arg(&out)
            .env("AUTH", auth)
            .env("LISTEN", "127.0.0.1:8883")
            .env("PLAIN_LISTEN", "127.0.0.1:1883")
            .env("UPSTREAM", "127.0.0.1:1884")
            .env("SERVER_CERT", pki.path("server.crt"))
            .env("SERVER_KEY", pki.path("server.key"))
            .env("CLIENT_CA", pki.path("ca.crt"))
            .env("RUN_DIR", dir.path())
            .status()
            .unwrap();
        assert!(status.success());
        let config = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            config.contains("ssl_verify_client on;"),
            auth == "x509",
            "{config}"
        );
        assert_eq!(
            config.contains("js_preread mqtt_auth.authenticate;"),
            auth == "x509",
            "{config}"
        );
        let test = Command::new("nginx")
            .arg("-t")
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(dir.path().join("e.log"))
            .arg("-c")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            test.status.success(),
            "nginx -t rejects the {auth} config: {}",
            String::from_utf8_lossy(&test.stderr)
        );
    }
    let bad = Command::new("sh")
        .arg(docker("nginx/render.sh"))
        .arg(dir.path().join("x"))
        .env("AUTH", "token")
        .env("LISTEN", "a")
        .env("UPSTREAM", "b")
        .env("SERVER_CERT", "c")
        .env("SERVER_KEY", "d")
        .output()
        .unwrap();
    assert!(
        !bad.status.success()
            && String::from_utf8_lossy(&bad.stderr).contains("AUTH=token: use key or x509")
    );
}
