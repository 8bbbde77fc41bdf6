//! Upstream's `config.toml`: identity values for whatever the environment
//! leaves unset, so a deployment that still ships one keeps working.
//!
//! ```toml
//! [proplet]
//! domain_id = "…"
//! client_id = "…"
//! client_key = "…"
//! channel_id = "…"
//! ```

use std::path::{Path, PathBuf};

use propeller_mqtt::env_file::Vars;
use propeller_mqtt::ConfigError;

use crate::Service;

/// The file read when `<P>_CONFIG_FILE` is unset; a missing default is not an error.
pub const DEFAULT_PATH: &str = "config.toml";

/// Each key of a section, with the variable it stands in for and that
/// variable's newer alias: a key is used only when neither is set.
const KEYS: [(&str, &str, &str); 4] = [
    ("domain_id", "DOMAIN_ID", "TENANT_ID"),
    ("client_id", "CLIENT_ID", "ENTITY_ID"),
    ("client_key", "CLIENT_KEY", "API_KEY"),
    ("channel_id", "CHANNEL_ID", "CHANNEL_ID"),
];

/// Adds `<P>_DOMAIN_ID` and the like from the service's section of the config
/// file to `vars`, for those the environment leaves unset or empty. Returns
/// the file if one was read.
///
/// # Errors
///
/// `<P>_CONFIG_FILE` names a file that cannot be read, the file is not TOML,
/// or a key of the section is not a string. Values are never repeated: one of
/// them is the client key.
pub fn fill(service: Service, vars: &mut Vars) -> Result<Option<PathBuf>, ConfigError> {
    let get = |vars: &Vars, name: &str| -> Option<String> {
        vars.iter()
            .rev()
            .find(|(n, v)| n == name && !v.trim().is_empty())
            .map(|(_, v)| v.trim().to_owned())
    };
    let file_var = service.var("CONFIG_FILE");
    let (path, named) = match get(vars, &file_var) {
        Some(path) => (PathBuf::from(path), true),
        None => (PathBuf::from(DEFAULT_PATH), false),
    };
    let missing: Vec<_> = KEYS
        .iter()
        .filter(|(_, var, alias)| {
            get(vars, &service.var(var)).is_none() && get(vars, &service.var(alias)).is_none()
        })
        .collect();
    if missing.is_empty() || (!named && !path.is_file()) {
        return Ok(None);
    }
    let section_name = match service {
        Service::Proplet => {
            get(vars, &service.var("CONFIG_SECTION")).unwrap_or_else(|| service.to_string())
        }
        _ => service.to_string(),
    };
    let table = read(&path, &file_var)?;
    let Some(section) = table.get(&section_name) else {
        return Ok(Some(path));
    };
    let material = |problem: String| ConfigError::Material {
        var: file_var.clone(),
        path: path.clone(),
        problem,
    };
    let section = section.as_table().ok_or_else(|| {
        material(format!(
            "[{section_name}] must be a table of domain_id, client_id, client_key and channel_id"
        ))
    })?;
    for (key, var, _) in missing {
        match section.get(*key) {
            None => {}
            Some(toml::Value::String(value)) => vars.push((service.var(var), value.clone())),
            Some(_) => {
                return Err(material(format!(
                    "key {key} in [{section_name}] must be a quoted string"
                )))
            }
        }
    }
    Ok(Some(path))
}

fn read(path: &Path, var: &str) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        var: var.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    text.parse::<toml::Table>().map_err(|error| {
        let line = error
            .span()
            .map(|span| text[..span.start].lines().count().max(1));
        ConfigError::Material {
            var: var.to_owned(),
            path: path.to_owned(),
            problem: match line {
                Some(line) => format!("line {line}: not valid TOML: {}", error.message()),
                None => format!("not valid TOML: {}", error.message()),
            },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn value<'a>(vars: &'a Vars, name: &str) -> Option<&'a str> {
        vars.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn fills_only_what_env_leaves_unset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(
            &path,
            "[manager]\nclient_id = \"m\"\n[edge]\ndomain_id = \"d\"\nclient_id = \"from-file\"\nclient_key = \"k\"\nchannel_id = \"c\"\n",
        )
        .unwrap();
        let mut env = vars(&[
            ("PROPLET_CONFIG_FILE", path.to_str().unwrap()),
            ("PROPLET_CONFIG_SECTION", "edge"),
            ("PROPLET_CLIENT_ID", "from-env"),
            ("PROPLET_API_KEY", "alias-wins"),
        ]);
        assert_eq!(fill(Service::Proplet, &mut env).unwrap(), Some(path));
        assert_eq!(value(&env, "PROPLET_CLIENT_ID"), Some("from-env"));
        assert_eq!(value(&env, "PROPLET_CLIENT_KEY"), None);
        assert_eq!(value(&env, "PROPLET_DOMAIN_ID"), Some("d"));
        assert_eq!(value(&env, "PROPLET_CHANNEL_ID"), Some("c"));
    }

    #[test]
    fn errors_name_the_variable_and_line_but_not_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[proxy]\nclient_key = 12345\n").unwrap();
        let mut env = vars(&[("PROXY_CONFIG_FILE", path.to_str().unwrap())]);
        let error = fill(Service::Proxy, &mut env).unwrap_err().to_string();
        assert!(error.starts_with("PROXY_CONFIG_FILE="), "{error}");
        assert!(error.contains("key client_key in [proxy]"), "{error}");
        assert!(!error.contains("12345"), "{error}");

        std::fs::write(&path, "[proxy\nclient_key = \"secret\"\n").unwrap();
        let error = fill(Service::Proxy, &mut env).unwrap_err().to_string();
        assert!(error.contains("line 1: not valid TOML"), "{error}");
        assert!(!error.contains("secret"), "{error}");

        let mut env = vars(&[("PROXY_CONFIG_FILE", "/nonexistent/config.toml")]);
        let error = fill(Service::Proxy, &mut env).unwrap_err().to_string();
        assert!(error.starts_with("PROXY_CONFIG_FILE=/nonexistent/config.toml: cannot read"));
    }
}
