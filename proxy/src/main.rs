//! Propeller's proxy: answers proplets' module requests with the module, in
//! chunks small enough for the broker.
//!
//! Configured by `PROXY_*` variables; see the README.

mod fetches;
mod http;
mod store;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use base64::Engine as _;
use propeller_mqtt::env::value;
use propeller_mqtt::{Client, ConfigError};
use propeller_protocol::Untrusted;
use propeller_protocol::{payload, topic, ModuleChunk, ModuleError, ModuleRequest};
use propeller_protocol::{Service, ServiceConfig};
use propeller_service::{self as service, Context, ServiceError};
use tracing::{info, warn};

use fetches::Fetches;
use http::{BaseUrl, HttpSource};
use store::{file_name, FetchError, Store, MAX_APP_NAME};

/// Upstream's chunk size: about 683 KB once base64 in JSON.
const DEFAULT_CHUNK_SIZE: usize = 512_000;
/// Room in a chunk's packet for the topic, the JSON and MQTT's header.
const CHUNK_OVERHEAD: usize = 1024 + MAX_APP_NAME;

struct Settings {
    store: Store,
    chunk_size: usize,
}

impl Settings {
    /// Reads `PROXY_MODULES_DIR`, `PROXY_MODULES_URL`, `PROXY_MODULES_CA_CERT`
    /// and `PROXY_CHUNK_SIZE`.
    fn prepare(config: &mut ServiceConfig) -> Result<Self, ServiceError> {
        let settings = &config.settings;
        let dir = settings.parse("MODULES_DIR", None, |text| {
            let dir = PathBuf::from(text);
            match dir.is_dir() {
                true => Ok(Some(dir)),
                false => Err(
                    "it is not a directory: create it, or mount the modules volume there"
                        .to_owned(),
                ),
            }
        })?;
        let url = settings.parse("MODULES_URL", None, |text| BaseUrl::parse(text).map(Some))?;
        let ca = settings.get("MODULES_CA_CERT").map(PathBuf::from);
        let http = match url {
            Some(url) if url.is_https() => {
                let (tls, trust_warnings) = propeller_mqtt::tls::https_client_config(
                    settings.var("MODULES_CA_CERT"),
                    ca.as_deref(),
                )?;
                for warning in trust_warnings {
                    warn!("{warning}");
                }
                Some(HttpSource::new(url, Some(tls)))
            }
            Some(url) if ca.is_none() => Some(HttpSource::new(url, None)),
            Some(_) | None if ca.is_some() => {
                return Err(ConfigError::Invalid {
                    var: settings.var("MODULES_CA_CERT"),
                    value: settings
                        .get("MODULES_CA_CERT")
                        .unwrap_or_default()
                        .to_owned(),
                    problem: format!(
                        "it is only used with an https:// {}: unset it, or use https",
                        settings.var("MODULES_URL")
                    ),
                }
                .into())
            }
            _ => None,
        };
        let max_packet = config.mqtt.max_packet_size;
        let chunk_size = settings.parse("CHUNK_SIZE", DEFAULT_CHUNK_SIZE, |text| {
            let size = value::byte_size(text)?;
            let packet = size.div_ceil(3) * 4 + CHUNK_OVERHEAD;
            match size {
                0 => Err("it must be at least 1 byte".to_owned()),
                _ if packet > max_packet => Err(format!(
                    "a chunk of it is {packet} bytes once base64 in JSON, over the {max_packet}-byte packet limit ({}): lower it, or raise the limit",
                    config.mqtt.names.var("MQTT_MAX_PACKET_SIZE")
                )),
                _ => Ok(size),
            }
        })?;
        // The default directory may appear later (a volume mounted late).
        let dir = match (dir, &http) {
            (None, None) => {
                warn!("neither PROXY_MODULES_DIR nor PROXY_MODULES_URL is set: serving modules from ./modules");
                Some(PathBuf::from("modules"))
            }
            (dir, _) => dir,
        };
        Ok(Self {
            store: Store { dir, http },
            chunk_size,
        })
    }
}

fn main() -> ExitCode {
    service::run(Service::Proxy, Settings::prepare, serve)
}

async fn serve(settings: Settings, mut context: Context) -> Result<(), ServiceError> {
    let proxy = Arc::new(Proxy {
        store: settings.store,
        chunk_size: settings.chunk_size,
        client: context.client.clone(),
        chunk_topic: context.config.channel.topic(topic::REGISTRY_CHUNK),
        error_topic: context.config.channel.topic(topic::REGISTRY_ERROR),
        fetches: Fetches::default(),
    });
    loop {
        let message = tokio::select! {
            message = context.messages.recv() => match message {
                Some(message) => message,
                None => return Ok(()),
            },
            _ = context.stopping.changed() => return Ok(()),
        };
        match serde_json::from_slice::<ModuleRequest>(&message.payload) {
            Ok(request) if request.app_name.len() > MAX_APP_NAME => warn!(
                app_name = %Untrusted(&request.app_name),
                "ignoring a module request whose app_name is over {MAX_APP_NAME} bytes"
            ),
            Ok(request) => {
                let proxy = proxy.clone();
                tokio::spawn(async move { proxy.answer(request.app_name).await });
            }
            Err(error) => {
                warn!(%error, "ignoring a module request that is not {{\"app_name\": …}}")
            }
        }
    }
}

struct Proxy {
    store: Store,
    chunk_size: usize,
    client: Client,
    chunk_topic: String,
    error_topic: String,
    /// Reads and downloads under way, shared per file, and bounded.
    fetches: Fetches,
}

impl Proxy {
    async fn answer(&self, app_name: String) {
        info!(app_name = %Untrusted(&app_name), "module requested");
        // A name that is not a file is refused before any read or request.
        let file = file_name(&app_name).unwrap_or_else(|_| app_name.clone());
        let module = self
            .fetches
            .shared(&file, || self.store.fetch(&app_name))
            .await;
        let module = module.and_then(|module| match module.is_empty() {
            true => Err(FetchError::failed(
                &app_name,
                "the module file is empty".to_owned(),
            )),
            false => Ok(module),
        });
        match module {
            Ok(module) => self.send(app_name, &module).await,
            Err(error) => {
                warn!(app_name = %Untrusted(&app_name), error = %Untrusted(&error.detail), "cannot serve the module");
                // Not on the chunk topic: an upstream proplet would take any
                // message there for a chunk and wait for the rest.
                let message = payload(&ModuleError {
                    app_name: app_name.clone(),
                    error: error.public,
                });
                if let Err(error) = self.client.publish(self.error_topic.clone(), message).await {
                    warn!(app_name = %Untrusted(&app_name), "cannot publish the module error: {error}");
                }
            }
        }
    }

    async fn send(&self, app_name: String, module: &[u8]) {
        let total = module.len().div_ceil(self.chunk_size);
        for (index, data) in module.chunks(self.chunk_size).enumerate() {
            self.publish(ModuleChunk {
                app_name: app_name.clone(),
                chunk_idx: index as u32,
                total_chunks: total as u32,
                data: base64::engine::general_purpose::STANDARD.encode(data),
            })
            .await;
        }
        info!(
            app_name = %Untrusted(&app_name),
            bytes = module.len(),
            chunks = total,
            "module sent"
        );
    }

    async fn publish(&self, chunk: ModuleChunk) {
        if let Err(error) = self
            .client
            .publish(self.chunk_topic.clone(), payload(&chunk))
            .await
        {
            warn!(app_name = %Untrusted(&chunk.app_name), chunk = chunk.chunk_idx, "cannot publish a chunk: {error}");
        }
    }
}
