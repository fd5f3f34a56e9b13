//! A few shared connections for the API (replay, memberships, API keys, mutations), handed out
//! round-robin and reconnected when they drop. tokio-postgres pipelines concurrent queries on
//! one connection; several connections keep a long mutate batch from delaying other reads.

use crate::replication::sequencer;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Mutex;
use tokio_postgres::Client;

pub struct Db {
    url: String,
    slots: Vec<Mutex<Option<Arc<Client>>>>,
    next: AtomicUsize,
}

impl Db {
    pub fn new(url: String, connections: usize) -> Db {
        Db {
            url,
            slots: (0..connections.max(1)).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub async fn get(&self) -> Result<Arc<Client>, sequencer::SequencerError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(sequencer::connect(&self.url).await?);
        *slot = Some(c.clone());
        Ok(c)
    }
}
