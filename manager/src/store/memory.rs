//! `MANAGER_STORAGE_TYPE=memory`: the manager's state in memory is the only
//! copy, so a restart forgets every task and proplet, as upstream's memory
//! store does. Writes succeed at once.

use std::sync::Arc;

use super::{Batch, Opened, Repository, StoreError};

/// A store that keeps nothing.
#[derive(Debug, Default)]
pub struct Memory;

impl Repository for Memory {
    async fn open(&mut self) -> Result<Opened, StoreError> {
        Ok(Opened::Continue)
    }

    async fn save(&mut self, _batch: Arc<Batch>) -> Result<(), StoreError> {
        Ok(())
    }

    async fn check(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}
