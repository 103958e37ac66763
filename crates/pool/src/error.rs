//! Pool errors: what was refused and why, with the device or pool named.

use devpool_engine::EngineError;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PoolError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: String,
        #[source]
        source: std::io::Error,
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
            source,
        }
    }
}
