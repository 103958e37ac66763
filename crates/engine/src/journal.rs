//! The transaction journal: one JSON object per executed plan, appended to
//! `<state dir>/journal.jsonl`.

use crate::error::{EngineError, Result};
use serde::Serialize;
use std::io::Write;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct JournalEntry<'a> {
    pub transaction: &'a str,
    pub started: String,
    pub finished: String,
    pub operation: &'a str,
    pub vg: Option<&'a str>,
    pub seqno_before: Option<u64>,
    pub seqno_after: Option<u64>,
    pub steps: &'a [crate::plan::Step],
    pub outcome: String,
    pub pid: u32,
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

pub fn append(state_dir: &Path, entry: &JournalEntry<'_>) -> Result<()> {
    let path = state_dir.join("journal.jsonl");
    let mut line = serde_json::to_vec(entry)
        .map_err(|e| EngineError::Invalid(format!("journal entry: {e}")))?;
    line.push(b'\n');
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
    };
    let mut f = crate::lock::open_making_dir(state_dir, "journal", &path, open)?;
    // One write of the whole line: O_APPEND keeps concurrent lines whole.
    f.write_all(&line)
        .map_err(|e| EngineError::io(&path, "append to journal", e))
}
