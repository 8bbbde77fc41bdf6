//! Where the proxy finds modules: a local directory, an HTTP(S) server, or
//! both, tried in that order.
//!
//! An `app_name` (the task's `image_url`) maps to one file name: its last
//! path segment without a `:tag` or `@digest`, with `.wasm` added when it has
//! no extension. `ghcr.io/acme/add:v1`, `add` and `add.wasm` all name
//! `add.wasm`; `https://host/mods/add.wasm` names `add.wasm` too.

use std::path::PathBuf;

use bytes::Bytes;

use crate::http::HttpSource;

pub use propeller_protocol::MAX_MODULE;

/// The longest `app_name` answered; longer ones are not echoed to the
/// channel, where every client would receive them.
pub const MAX_APP_NAME: usize = 1024;

/// The file `app_name` names: only `[A-Za-z0-9._-]`, not starting with a
/// dot, so that it can be neither a path, nor a URL's query or fragment, nor
/// a percent-encoded escape from `PROXY_MODULES_URL`.
///
/// # Errors
///
/// It names no file, or one that is not a plain file name.
pub fn file_name(app_name: &str) -> Result<String, String> {
    let last = app_name
        .trim()
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default();
    let last = last.split('@').next().unwrap_or_default();
    let last = last.split(':').next().unwrap_or_default();
    let plain = last
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if last.is_empty() || last.starts_with('.') || !plain {
        return Err(format!(
            "app_name {:?} names no module file: its last part may hold only letters, digits, '.', '_' and '-', such as add.wasm or registry/add:v1",
            propeller_protocol::truncated(app_name, 200)
        ));
    }
    Ok(match last.contains('.') {
        true => last.to_owned(),
        false => format!("{last}.wasm"),
    })
}

/// Why a module cannot be served: in full for the proxy's log, and in a
/// form for the channel, which every client on it reads, that names no
/// local path or URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchError {
    /// For the proxy's log.
    pub detail: String,
    /// For the proplet that asked.
    pub public: String,
}

impl FetchError {
    fn new(public: String, detail: String) -> Self {
        Self { detail, public }
    }

    /// A module that is there but cannot be served.
    pub fn failed(name: &str, detail: String) -> Self {
        Self::new(
            format!("the proxy cannot serve module {name}; its log says why"),
            detail,
        )
    }
}

/// The module sources, in the order they are tried.
pub struct Store {
    /// `PROXY_MODULES_DIR`.
    pub dir: Option<PathBuf>,
    /// `PROXY_MODULES_URL`.
    pub http: Option<HttpSource>,
}

impl Store {
    /// The module `app_name` names, from the first source that has it.
    ///
    /// # Errors
    ///
    /// No source has it, or one failed; the message names the sources.
    pub async fn fetch(&self, app_name: &str) -> Result<Bytes, FetchError> {
        let name = file_name(app_name).map_err(|e| FetchError::new(e.clone(), e))?;
        if let Some(dir) = &self.dir {
            let path = dir.join(&name);
            match inside(dir, &path).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(FetchError::failed(
                        &name,
                        format!(
                            "{} leads out of PROXY_MODULES_DIR (a symbolic link): refused",
                            path.display()
                        ),
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(FetchError::failed(
                        &name,
                        format!("cannot read {}: {e}", path.display()),
                    ))
                }
            }
            match tokio::fs::metadata(&path).await {
                Ok(meta) if meta.len() > MAX_MODULE as u64 => {
                    return Err(FetchError::new(
                        format!(
                            "module {name} is over {} MiB, the largest module the proxy serves",
                            MAX_MODULE >> 20
                        ),
                        format!("{} is over {} MiB", path.display(), MAX_MODULE >> 20),
                    ))
                }
                Ok(_) => {
                    return tokio::fs::read(&path).await.map(Bytes::from).map_err(|e| {
                        FetchError::failed(&name, format!("cannot read {}: {e}", path.display()))
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(FetchError::failed(
                        &name,
                        format!("cannot read {}: {e}", path.display()),
                    ))
                }
            }
        }
        if let Some(http) = &self.http {
            if let Some(module) = http
                .get(&name)
                .await
                .map_err(|e| FetchError::failed(&name, e))?
            {
                return Ok(module);
            }
        }
        let mut places = Vec::new();
        if let Some(dir) = &self.dir {
            places.push(format!("PROXY_MODULES_DIR={}", dir.display()));
        }
        if let Some(http) = &self.http {
            places.push(format!("PROXY_MODULES_URL={}", http.base()));
        }
        Err(FetchError::new(
            format!("the proxy has no module {name}: add the file to its store, or check the task's image_url"),
            format!(
                "no module {name} in {}: add the file, or check the task's image_url",
                places.join(" or at ")
            ),
        ))
    }
}

/// Whether `path`, links resolved, is inside `dir`, links resolved.
async fn inside(dir: &std::path::Path, path: &std::path::Path) -> std::io::Result<bool> {
    let dir = tokio::fs::canonicalize(dir).await?;
    let path = tokio::fs::canonicalize(path).await?;
    Ok(path.starts_with(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_map_to_file_names() {
        for (app_name, file) in [
            ("add.wasm", "add.wasm"),
            ("add", "add.wasm"),
            ("ghcr.io/acme/add:v1", "add.wasm"),
            ("localhost:5000/add", "add.wasm"),
            ("docker.io/acme/add@sha256:abc", "add.wasm"),
            ("https://host/mods/add.wasm", "add.wasm"),
            ("mods/add.wasm/", "add.wasm"),
        ] {
            assert_eq!(file_name(app_name).as_deref(), Ok(file), "{app_name}");
        }
        for bad in [
            "",
            "/",
            "x/..",
            "x/.",
            "a\\..\\b",
            ":tag",
            "..%2fsecret.txt",
            "%2e%2e%2fsecret",
            "#",
            "add.wasm?x",
            "add wasm",
            ".hidden",
            "a\nb",
        ] {
            assert!(file_name(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_missing_module_names_where_it_was_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("add.wasm"), b"\0asm").unwrap();
        let store = Store {
            dir: Some(dir.path().to_owned()),
            http: None,
        };
        assert_eq!(
            store.fetch("acme/add:v2").await.unwrap(),
            Bytes::from_static(b"\0asm")
        );
        let error = store.fetch("sub").await.unwrap_err();
        assert!(
            error
                .detail
                .starts_with("no module sub.wasm in PROXY_MODULES_DIR="),
            "{error:?}"
        );
        assert!(error.public.starts_with("the proxy has no module sub.wasm"));
        assert!(!error.public.contains(&dir.path().display().to_string()));
        // A link out of the directory is not followed.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.txt"), b"secret").unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("secret.txt"),
            dir.path().join("leak.wasm"),
        )
        .unwrap();
        let error = store.fetch("leak").await.unwrap_err();
        assert!(error.detail.contains("leads out of"), "{error:?}");
        // A link inside it is.
        std::os::unix::fs::symlink(dir.path().join("add.wasm"), dir.path().join("alias.wasm"))
            .unwrap();
        assert!(store.fetch("alias").await.is_ok());
    }
}
