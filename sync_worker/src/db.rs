//! A few shared connections for the API (replay, memberships, API keys, mutations), handed out
//! round-robin and reconnected when they drop. tokio-postgres pipelines concurrent queries on
//! one connection; several connections keep a long mutate batch from delaying other reads.

use crate::replication::sequencer;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{Mutex, OnceCell};
use tokio_postgres::{Client, Statement};

/// One connection, with the statements prepared on it once.
pub struct Conn {
    client: Client,
    mutate: OnceCell<Statement>,
}

impl std::ops::Deref for Conn {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Conn {
    /// `pg_sync.mutate_as(user, client_id, client_tx_id, ops)`, prepared on first use.
    pub async fn mutate_statement(&self) -> Result<&Statement, tokio_postgres::Error> {
        self.mutate
            .get_or_try_init(|| {
                self.client.prepare(
                    "SELECT pg_sync.mutate_as($1, $2, $3::text::uuid, $4::text::jsonb)::text",
                )
            })
            .await
    }
}

/// `ident` as a quoted SQL identifier.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

pub struct Db {
    url: String,
    slots: Vec<Mutex<Option<Arc<Conn>>>>,
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

    pub async fn get(&self) -> Result<Arc<Conn>, sequencer::SequencerError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(Conn {
            client: sequencer::connect(&self.url).await?,
            mutate: OnceCell::new(),
        });
        *slot = Some(c.clone());
        Ok(c)
    }
}
