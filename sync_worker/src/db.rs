//! A shared control connection for reads (replay, memberships), reconnected when it drops.

use crate::replication::sequencer;
use std::sync::Arc;
use tokio::sync::Mutex;
use tokio_postgres::Client;

pub struct Db {
    url: String,
    client: Mutex<Option<Arc<Client>>>,
}

impl Db {
    pub fn new(url: String) -> Db {
        Db {
            url,
            client: Mutex::new(None),
        }
    }

    pub async fn get(&self) -> Result<Arc<Client>, sequencer::SequencerError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let c = Arc::new(sequencer::connect(&self.url).await?);
        *slot = Some(c.clone());
        Ok(c)
    }
}
