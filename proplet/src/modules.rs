//! Modules named by `image_url`, fetched from the proxy: the request on
//! `registry/proplet`, and the reassembly of the chunks that come back on
//! `registry/server`, which may arrive out of order, twice, or for modules
//! another proplet asked for; or the proxy's error on `registry/error`.
//!
//! Anyone on the channel can publish chunks, so the assembler trusts no
//! count: chunks are kept in a map, not a vector sized by `total_chunks`,
//! and the bytes held are capped.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use propeller_mqtt::{Client, ClientError};
use propeller_protocol::Untrusted;
use propeller_protocol::{payload, topic, ModuleChunk, ModuleError, ModuleRequest, MAX_MODULE};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

/// How long a task waits for its module.
pub const WAIT: Duration = Duration::from_secs(60);
/// How long a partial set of chunks is kept, in case a later task asks again.
pub const KEEP_PARTIAL: Duration = Duration::from_secs(300);
/// The most chunks a module may come in: a 256 MiB module in 256-byte chunks.
const MAX_CHUNKS: usize = 1 << 20;
/// The bytes all partial modules together may hold.
const MAX_PARTIAL_BYTES: usize = 2 * MAX_MODULE;

/// The chunks of one module, as they arrive.
#[derive(Debug)]
struct Partial {
    total: usize,
    chunks: BTreeMap<usize, Bytes>,
    bytes: usize,
    started: Instant,
}

impl Partial {
    fn new(total: usize, now: Instant) -> Self {
        Self {
            total,
            chunks: BTreeMap::new(),
            bytes: 0,
            started: now,
        }
    }
}

/// What a chunk did.
#[derive(Debug, PartialEq)]
pub enum Added {
    /// More are needed.
    Partial,
    /// It was the last one: the whole module.
    Complete(Bytes),
    /// The chunks cannot make a module.
    Failed(String),
    /// A duplicate or a chunk we cannot use; nothing changed.
    Ignored(String),
}

/// Chunk sets being reassembled, by `app_name`.
#[derive(Debug, Default)]
pub struct Assembler {
    partial: HashMap<String, Partial>,
}

impl Assembler {
    /// Adds one chunk.
    pub fn add(&mut self, chunk: ModuleChunk, now: Instant) -> Added {
        let total = chunk.total_chunks as usize;
        let index = chunk.chunk_idx as usize;
        if total == 0 || index >= total {
            return Added::Ignored(format!("chunk {index} of {total} is out of range"));
        }
        if total > MAX_CHUNKS {
            return Added::Ignored(format!(
                "{total} chunks is more than a module of at most {} MiB comes in",
                MAX_MODULE >> 20
            ));
        }
        let Ok(data) = base64::engine::general_purpose::STANDARD.decode(chunk.data.as_bytes())
        else {
            return Added::Ignored(format!("chunk {index} is not valid base64"));
        };
        let partial = self
            .partial
            .entry(chunk.app_name.clone())
            .or_insert_with(|| Partial::new(total, now));
        if partial.total != total {
            // The module changed at the proxy between two requests: start over.
            *partial = Partial::new(total, now);
        }
        if partial.chunks.contains_key(&index) {
            return Added::Ignored(format!("chunk {index} is a duplicate"));
        }
        partial.bytes += data.len();
        if partial.bytes > MAX_MODULE {
            self.partial.remove(&chunk.app_name);
            return Added::Failed(format!(
                "the module is over {} MiB, more than a proplet takes",
                MAX_MODULE >> 20
            ));
        }
        partial.chunks.insert(index, Bytes::from(data));
        if partial.chunks.len() < total {
            if self.held() > MAX_PARTIAL_BYTES {
                self.partial.remove(&chunk.app_name);
                return Added::Failed(format!(
                    "partial modules hold over {} MiB: too many at once",
                    MAX_PARTIAL_BYTES >> 20
                ));
            }
            return Added::Partial;
        }
        let Some(partial) = self.partial.remove(&chunk.app_name) else {
            return Added::Partial;
        };
        let mut module = Vec::with_capacity(partial.bytes);
        for chunk in partial.chunks.into_values() {
            module.extend_from_slice(&chunk);
        }
        Added::Complete(Bytes::from(module))
    }

    /// The bytes all partial modules hold.
    fn held(&self) -> usize {
        self.partial.values().map(|p| p.bytes).sum()
    }

    /// Forgets what was collected of `app_name`.
    pub fn abandon(&mut self, app_name: &str) {
        self.partial.remove(app_name);
    }

    /// Whether chunks of `app_name` are being collected.
    pub fn collecting(&self, app_name: &str) -> bool {
        self.partial.contains_key(app_name)
    }

    /// Drops partial sets older than [`KEEP_PARTIAL`]; returns their names.
    pub fn sweep(&mut self, now: Instant) -> Vec<String> {
        let old: Vec<String> = self
            .partial
            .iter()
            .filter(|(_, p)| now.duration_since(p.started) >= KEEP_PARTIAL)
            .map(|(name, _)| name.clone())
            .collect();
        for name in &old {
            self.partial.remove(name);
        }
        old
    }
}

type Waiter = oneshot::Sender<Result<Bytes, String>>;

/// The proplet's side of the proxy protocol, shared by its tasks.
#[derive(Clone)]
pub struct Modules {
    client: Client,
    request_topic: String,
    wait: Duration,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    assembler: Assembler,
    waiters: HashMap<String, Vec<Waiter>>,
}

impl Modules {
    /// Modules fetched through `client`, with requests on `request_topic`.
    pub fn new(client: Client, request_topic: String) -> Self {
        Self {
            client,
            request_topic,
            wait: WAIT,
            state: Arc::default(),
        }
    }

    /// Asks the proxy for `app_name` and waits up to [`WAIT`] for all of it.
    /// Tasks that need the same module at once share one request.
    ///
    /// # Errors
    ///
    /// The proxy cannot serve it, or it did not arrive in time.
    pub async fn fetch(&self, app_name: &str) -> Result<Bytes, String> {
        let (sender, receiver) = oneshot::channel();
        let first = {
            let mut state = self.lock();
            let waiters = state.waiters.entry(app_name.to_owned()).or_default();
            waiters.retain(|w| !w.is_closed());
            waiters.push(sender);
            waiters.len() == 1
        };
        if first {
            self.request(app_name).await.map_err(|e| e.to_string())?;
        }
        let outcome = tokio::time::timeout(self.wait, receiver).await;
        if outcome.is_err() {
            // Nobody waits for it any more: forget it, so that late chunks
            // for it are ignored rather than collected.
            let mut state = self.lock();
            if let Some(waiters) = state.waiters.get_mut(app_name) {
                waiters.retain(|w| !w.is_closed());
                if waiters.is_empty() {
                    state.waiters.remove(app_name);
                    state.assembler.abandon(app_name);
                }
            }
        }
        match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the proplet is stopping".to_owned()),
            Err(_) => Err(format!(
                "module {app_name:?} did not arrive from the proxy within {}s: is the proxy running and connected?",
                self.wait.as_secs()
            )),
        }
    }

    async fn request(&self, app_name: &str) -> Result<(), ClientError> {
        let payload = payload(&ModuleRequest {
            app_name: app_name.to_owned(),
        });
        info!(
            app_name = %Untrusted(app_name),
            topic = topic::REGISTRY_REQUEST,
            "asking the proxy for the module"
        );
        // Not awaiting the delivery: chunks answer faster than PUBCOMP at QoS 2.
        let _ = self
            .client
            .publish(self.request_topic.clone(), payload)
            .await?;
        Ok(())
    }

    /// Takes a chunk from the proxy.
    pub fn chunk(&self, chunk: ModuleChunk) {
        let app_name = chunk.app_name.clone();
        let mut state = self.lock();
        let wanted = state.waiters.get(&app_name).is_some_and(|w| !w.is_empty());
        if !wanted && !state.assembler.collecting(&app_name) {
            // Another proplet's module.
            return;
        }
        let outcome = match state.assembler.add(chunk, Instant::now()) {
            Added::Partial => return,
            Added::Ignored(why) => {
                debug!(app_name = %Untrusted(&app_name), why, "chunk ignored");
                return;
            }
            Added::Complete(module) => {
                info!(app_name = %Untrusted(&app_name), bytes = module.len(), "module received");
                Ok(module)
            }
            Added::Failed(why) => {
                warn!(app_name = %Untrusted(&app_name), why, "module fetch failed");
                Err(why)
            }
        };
        for waiter in state.waiters.remove(&app_name).unwrap_or_default() {
            let _ = waiter.send(outcome.clone());
        }
    }

    /// The proxy's word that it cannot serve a module: its waiters fail now.
    pub fn failed(&self, error: ModuleError) {
        let mut state = self.lock();
        let Some(waiters) = state.waiters.remove(&error.app_name) else {
            // Another proplet's module.
            return;
        };
        state.assembler.abandon(&error.app_name);
        warn!(app_name = %Untrusted(&error.app_name), why = %Untrusted(&error.error), "module fetch failed");
        let why = format!("the proxy cannot serve it: {}", error.error);
        for waiter in waiters {
            let _ = waiter.send(Err(why.clone()));
        }
    }

    /// Drops stale partial chunk sets.
    pub fn sweep(&self) {
        for app_name in self.lock().assembler.sweep(Instant::now()) {
            info!(app_name = %Untrusted(&app_name), "dropped an incomplete module after 5 minutes");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use propeller_mqtt::{Options, Secret};
    use proptest::prelude::*;

    fn chunks(module: &[u8], size: usize) -> Vec<ModuleChunk> {
        let total = module.len().div_ceil(size) as u32;
        module
            .chunks(size)
            .enumerate()
            .map(|(i, data)| ModuleChunk {
                app_name: "app".into(),
                chunk_idx: i as u32,
                total_chunks: total,
                data: base64::engine::general_purpose::STANDARD.encode(data),
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Any order, any duplicates: the module comes out, and whole every
        /// time. (A complete set that arrives again starts a new assembly:
        /// the proplet ignores it, because nobody waits for it any more.)
        #[test]
        fn reassembles_in_any_order(
            module in proptest::collection::vec(any::<u8>(), 1..4000),
            size in 1usize..700,
            order in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let all = chunks(&module, size);
            let mut sequence: Vec<ModuleChunk> = order.iter().map(|i| all[i.index(all.len())].clone()).collect();
            sequence.extend(all.iter().rev().cloned());
            let mut assembler = Assembler::default();
            let now = Instant::now();
            let completed: Vec<Bytes> = sequence
                .into_iter()
                .filter_map(|c| match assembler.add(c, now) {
                    Added::Complete(m) => Some(m),
                    _ => None,
                })
                .collect();
            prop_assert!(!completed.is_empty());
            for whole in &completed {
                prop_assert_eq!(&whole[..], &module[..]);
            }
        }
    }

    #[test]
    fn bad_chunks_are_ignored_and_errors_end_the_wait() {
        let mut assembler = Assembler::default();
        let now = Instant::now();
        let mut chunk = chunks(b"abcdef", 2).remove(0);
        chunk.chunk_idx = 7;
        assert!(matches!(
            assembler.add(chunk.clone(), now),
            Added::Ignored(_)
        ));
        chunk.chunk_idx = 0;
        chunk.data = "!!".into();
        assert!(matches!(
            assembler.add(chunk.clone(), now),
            Added::Ignored(_)
        ));
        chunk.data = "YWI=".into();
        assert_eq!(assembler.add(chunk.clone(), now), Added::Partial);
        assert!(matches!(assembler.add(chunk, now), Added::Ignored(_)));
        assert_eq!(
            assembler.sweep(now + Duration::from_secs(299)),
            Vec::<String>::new()
        );
        assert_eq!(assembler.sweep(now + KEEP_PARTIAL), vec!["app".to_owned()]);
    }

    /// A forged count costs nothing: no vector is sized by it.
    #[test]
    fn forged_counts_allocate_nothing() {
        let mut assembler = Assembler::default();
        let now = Instant::now();
        let chunk = |total| ModuleChunk {
            app_name: "x".into(),
            chunk_idx: 0,
            total_chunks: total,
            data: "AA==".into(),
        };
        assert!(matches!(
            assembler.add(chunk(u32::MAX), now),
            Added::Ignored(_)
        ));
        assert_eq!(assembler.add(chunk(1 << 20), now), Added::Partial);
        assert_eq!(assembler.held(), 1);
    }

    /// A fetch that timed out is forgotten: its waiter is removed, and late
    /// chunks for it are not collected.
    #[tokio::test]
    async fn a_timed_out_fetch_is_forgotten() {
        // A client whose broker is never there: publishes wait in its outbox.
        let options = Options::new("tcp://127.0.0.1:9", "p", Secret::new("k"))
            .unwrap()
            // Shutdown waits this long for the outbox.
            .with_connect_timeout(Duration::from_millis(100));
        let (client, _) = Client::start(&options, vec![]).unwrap();
        let mut modules = Modules::new(client.clone(), "registry/proplet".into());
        modules.wait = Duration::from_millis(50);
        let error = modules.fetch("late.wasm").await.unwrap_err();
        assert!(error.contains("did not arrive"), "{error}");
        assert!(modules.lock().waiters.is_empty());
        let mut late = chunks(b"abcdef", 2).remove(0);
        late.app_name = "late.wasm".into();
        modules.chunk(late);
        assert!(!modules.lock().assembler.collecting("late.wasm"));
        client.shutdown().await;
    }

    /// Exactly once: every task waiting for a module gets it, once, from
    /// one assembly; chunks of that set that arrive again, or the proxy's
    /// error for it, fire nothing; and a later fetch waits for a whole new
    /// set, not for a stale one.
    #[tokio::test]
    async fn a_module_completes_each_waiter_exactly_once() {
        // A client whose broker is never there: requests wait in its outbox.
        let options = Options::new("tcp://127.0.0.1:9", "p", Secret::new("k"))
            .unwrap()
            .with_connect_timeout(Duration::from_millis(100));
        let (client, _) = Client::start(&options, vec![]).unwrap();
        let modules = Modules::new(client.clone(), "registry/proplet".into());
        let waiters = |modules: &Modules| modules.lock().waiters.get("app").map_or(0, Vec::len);
        // Waits (a guard against a hang, not a measure) until `count` tasks
        // wait for the module.
        async fn until_waiting(modules: &Modules, count: usize) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while modules.lock().waiters.get("app").map_or(0, Vec::len) < count {
                assert!(Instant::now() < deadline, "no {count} waiters");
                tokio::task::yield_now().await;
            }
        }
        let module = b"exactly once".to_vec();
        let set = chunks(&module, 5);
        assert_eq!(set.len(), 3);

        let fetch = |modules: &Modules| {
            let modules = modules.clone();
            tokio::spawn(async move { modules.fetch("app").await })
        };
        let (first, second) = (fetch(&modules), fetch(&modules));
        until_waiting(&modules, 2).await;
        // Out of order, with a duplicate before the set is whole.
        modules.chunk(set[2].clone());
        modules.chunk(set[0].clone());
        modules.chunk(set[2].clone());
        assert_eq!(waiters(&modules), 2, "completed before the last chunk");
        modules.chunk(set[1].clone());
        for task in [first, second] {
            assert_eq!(&task.await.unwrap().unwrap()[..], &module[..]);
        }
        // Completed and forgotten: chunks of the set again (all but one,
        // which would otherwise complete it a second time), and a late
        // error, start nothing and reach nobody.
        assert_eq!(waiters(&modules), 0);
        modules.chunk(set[2].clone());
        modules.chunk(set[0].clone());
        modules.failed(ModuleError {
            app_name: "app".into(),
            error: "late".into(),
        });
        assert!(!modules.lock().assembler.collecting("app"));
        assert!(modules.lock().waiters.is_empty());

        // A new fetch: one chunk that completed the old set does not
        // complete it, and the proxy's error now reaches it, once.
        let third = fetch(&modules);
        until_waiting(&modules, 1).await;
        modules.chunk(set[1].clone());
        assert_eq!(waiters(&modules), 1, "completed from a stale set");
        modules.failed(ModuleError {
            app_name: "app".into(),
            error: "gone".into(),
        });
        let error = third.await.unwrap().unwrap_err();
        assert_eq!(error, "the proxy cannot serve it: gone");
        assert!(!modules.lock().assembler.collecting("app"));
        client.shutdown().await;
    }
}
