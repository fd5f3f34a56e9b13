//! The replication side: pgoutput decoding and the session that turns the stream into
//! sequenced, persisted, acknowledged transactions.

pub mod pgoutput;
pub mod sequencer;
