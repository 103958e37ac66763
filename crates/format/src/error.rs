//! Errors of the byte-level structures: each names the byte offset (from the
//! start of the device) of the structure that failed and what was wrong.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{structure} at byte {offset}: {reason}")]
pub struct FormatError {
    pub structure: &'static str,
    pub offset: u64,
    pub reason: String,
}

impl FormatError {
    pub fn new(structure: &'static str, offset: u64, reason: impl Into<String>) -> FormatError {
        FormatError {
            structure,
            offset,
            reason: reason.into(),
        }
    }
}

/// Little-endian field readers over a buffer whose length the caller checked.
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
