//! Reads and downloads of modules under way, shared by the requests that
//! want the same file at once, and bounded in number: five aliases of one
//! 200 MB module cost one read, and a flood of requests costs at most
//! [`MAX_FETCHES`] modules in memory at a time.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{OnceCell, Semaphore};

use crate::store::FetchError;

/// Modules read or downloaded at once; more requests wait their turn.
pub const MAX_FETCHES: usize = 8;

type Fetch = Arc<OnceCell<Result<Bytes, FetchError>>>;

/// The fetches under way, by file.
pub struct Fetches {
    running: Mutex<HashMap<String, Fetch>>,
    slots: Semaphore,
}

impl Default for Fetches {
    fn default() -> Self {
        Self {
            running: Mutex::default(),
            slots: Semaphore::new(MAX_FETCHES),
        }
    }
}

impl Fetches {
    /// The outcome of `fetch` for `file`: run once for every caller that
    /// asks for `file` while it runs, and at most [`MAX_FETCHES`] at once.
    pub async fn shared<F, Fut>(&self, file: &str, fetch: F) -> Result<Bytes, FetchError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, FetchError>>,
    {
        let cell = self.lock().entry(file.to_owned()).or_default().clone();
        let outcome = cell
            .get_or_init(|| async {
                let _slot = self.slots.acquire().await;
                fetch().await
            })
            .await
            .clone();
        // Done: the next request reads the store again, and sees updates.
        let mut running = self.lock();
        if running.get(file).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            running.remove(file);
        }
        outcome
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Fetch>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn requests_for_one_file_share_one_fetch() {
        let fetches = Fetches::default();
        let reads = AtomicUsize::new(0);
        let fetch = || async {
            reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(Bytes::from_static(b"\0asm"))
        };
        let all = futures_join((0..5).map(|_| fetches.shared("add.wasm", fetch)).collect()).await;
        assert!(all.iter().all(|m| m.as_deref() == Ok(&b"\0asm"[..])));
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        // Once done, the next request reads again.
        fetches.shared("add.wasm", fetch).await.unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn at_most_eight_fetches_run_at_once() {
        let fetches = Fetches::default();
        let (now, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let files: Vec<String> = (0..20).map(|i| format!("m{i}.wasm")).collect();
        let fetch = || async {
            let running = now.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(running, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            Ok(Bytes::new())
        };
        futures_join(files.iter().map(|f| fetches.shared(f, fetch)).collect()).await;
        assert_eq!(most.load(Ordering::SeqCst), MAX_FETCHES);
    }

    /// Runs the futures concurrently on this task and collects their outputs.
    async fn futures_join<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
        let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
        let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut pending = false;
            for (future, output) in pinned.iter_mut().zip(outputs.iter_mut()) {
                if output.is_none() {
                    match future.as_mut().poll(cx) {
                        std::task::Poll::Ready(value) => *output = Some(value),
                        std::task::Poll::Pending => pending = true,
                    }
                }
            }
            match pending {
                true => std::task::Poll::Pending,
                false => std::task::Poll::Ready(()),
            }
        })
        .await;
        outputs.into_iter().flatten().collect()
    }
}
