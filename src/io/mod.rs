//! Files in and out: JSONL event files (plain or gzip), Parquet event files, Parquet feature
//! snapshots written atomically.

pub mod jsonl;
pub mod parquet;
