//! Pool errors: what was refused and why, with the device or pool named.

use devpool_engine::EngineError;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PoolError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{path}: {op} failed: {err}")]
    Io {
        path: PathBuf,
        op: String,
        err: std::io::Error,
    },
    /// A safety check refused a device: every finding is listed.
    #[error("refusing to use {device} as a pool:\n  - {}", .findings.join("\n  - "))]
    Unsafe {
        device: PathBuf,
        findings: Vec<String>,
    },
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "pool '{0}' not found (see 'devpool pool list'; 'devpool pool setup DEVICE --name {0}' creates it)"
    )]
    NoPool(String),
    #[error("{what} needs confirmation:\n  - {}\n(answer YES, or pass --yes)", .reasons.join("\n  - "))]
    NeedsConfirmation { what: String, reasons: Vec<String> },
}

pub type Result<T> = std::result::Result<T, PoolError>;

impl PoolError {
    pub fn io(
        path: impl Into<PathBuf>,
        op: impl Into<String>,
        source: std::io::Error,
    ) -> PoolError {
        PoolError::Io {
            path: path.into(),
            op: op.into(),
            err: source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cause is in the message, so it is not the source too (a chain
    /// printer would say it twice).
    #[test]
    fn an_io_error_says_its_cause_once() {
        let e = PoolError::io("/dev/loop4", "open", std::io::Error::other("gone"));
        assert_eq!(e.to_string(), "/dev/loop4: open failed: gone");
        assert!(std::error::Error::source(&e).is_none());
    }
}
