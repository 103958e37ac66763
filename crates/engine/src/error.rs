//! Engine errors: each says what failed, on which device or VG, and where.

use devpool_format::FormatError;
use devpool_format::metadata::MetadataError;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("{path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("{path}: metadata text at byte {offset}: {source}")]
    Metadata {
        path: PathBuf,
        offset: u64,
        #[source]
        source: MetadataError,
    },
    #[error("volume group '{0}' not found on the scanned devices (use --devices to name them)")]
    VgNotFound(String),
    #[error("VG {vg} is missing PVs: {missing}; name every device with --devices")]
    MissingPvs { vg: String, missing: String },
    #[error("logical volume '{vg}/{lv}' not found")]
    LvNotFound { vg: String, lv: String },
    #[error("{0}")]
    Refused(String),
    #[error(
        "not enough free space in VG {vg}: {need} extents ({need_bytes} bytes) requested, {free} free"
    )]
    NoSpace {
        vg: String,
        need: u64,
        need_bytes: u64,
        free: u64,
    },
    #[error(
        "not enough contiguous free space in VG {vg}: {need} extents ({need_bytes} bytes) requested in one run, the largest free run is {largest} extents ({free} free in all)"
    )]
    NoContiguousSpace {
        vg: String,
        need: u64,
        need_bytes: u64,
        largest: u64,
        free: u64,
    },
    #[error(
        "volume group {vg} changed since the plan was built (seqno {planned} -> {now}); build the plan again"
    )]
    Changed { vg: String, planned: u64, now: u64 },
    #[error("injected crash after {0} writes (fault-injection hook)")]
    InjectedCrash(usize),
    #[error("{0}")]
    Invalid(String),
    #[error("{} needs confirmation: {} (answer YES, or pass --yes)", .0.operation, .0.confirm.join("; "))]
    NeedsConfirmation(Box<crate::plan::Plan>),
}

pub type Result<T> = std::result::Result<T, EngineError>;

impl EngineError {
    pub fn io(
        path: impl Into<PathBuf>,
        op: impl Into<String>,
        source: std::io::Error,
    ) -> EngineError {
        EngineError::Io {
            path: path.into(),
            op: op.into(),
            source,
        }
    }
}
