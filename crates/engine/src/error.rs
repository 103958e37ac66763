//! Engine errors: each says what failed, on which device or VG, and where.

use devpool_format::FormatError;
use devpool_format::metadata::MetadataError;
use std::path::PathBuf;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error("{path}: {op} failed: {err}")]
    Io {
        path: PathBuf,
        op: String,
        err: std::io::Error,
    },
    #[error("{path}: {err}")]
    Format { path: PathBuf, err: FormatError },
    #[error("{path}: metadata text at byte {offset}: {err}")]
    Metadata {
        path: PathBuf,
        offset: u64,
        err: MetadataError,
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
        "not enough free space in VG {vg}: {need} extents ({}) requested, {free} free ({})",
        size(*.need, *.extent_bytes),
        size(*.free, *.extent_bytes)
    )]
    NoSpace {
        vg: String,
        need: u64,
        free: u64,
        extent_bytes: u64,
    },
    #[error(
        "not enough contiguous free space in VG {vg}: {need} extents ({}) requested in one run, the largest free run is {largest} extents ({}), {free} free in all ({})",
        size(*.need, *.extent_bytes),
        size(*.largest, *.extent_bytes),
        size(*.free, *.extent_bytes)
    )]
    NoContiguousSpace {
        vg: String,
        need: u64,
        largest: u64,
        free: u64,
        extent_bytes: u64,
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
    /// A dry run reached its first change: this plan, nothing written.
    #[error("dry run: {} planned, nothing was changed", .0.operation)]
    DryRun(Box<crate::plan::Plan>),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// `extents` extents of `extent_bytes` each, for people: "1.50 GiB".
fn size(extents: u64, extent_bytes: u64) -> String {
    devpool_format::units::format_bytes(devpool_format::units::Bytes(
        extents.saturating_mul(extent_bytes),
    ))
}

impl EngineError {
    pub fn io(
        path: impl Into<PathBuf>,
        op: impl Into<String>,
        source: std::io::Error,
    ) -> EngineError {
        EngineError::Io {
            path: path.into(),
            op: op.into(),
            err: source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cowstore::StoreError;
    use crate::thinstore::ThinError;
    use std::error::Error;

    /// Each error says its cause in its own message, so it must not also
    /// hand the cause on as its source: whatever prints the whole chain
    /// (anyhow's `{:#}`, as the CLI and the MCP server do) would say it twice.
    #[test]
    fn an_error_says_its_cause_once() {
        let io = || std::io::Error::other("the disk said no");
        let fmt = || FormatError::new("label", 512, "bad magic");
        let errors: Vec<Box<dyn Error>> = vec![
            Box::new(EngineError::io("/dev/x", "read", io())),
            Box::new(EngineError::Format {
                path: "/dev/x".into(),
                err: fmt(),
            }),
            Box::new(EngineError::Metadata {
                path: "/dev/x".into(),
                offset: 4608,
                err: MetadataError {
                    path: "vg/id".into(),
                    reason: "missing".into(),
                },
            }),
            Box::new(StoreError::Io {
                name: "s".into(),
                err: io(),
            }),
            Box::new(StoreError::Format {
                name: "s".into(),
                err: fmt(),
            }),
            Box::new(ThinError::Io {
                pool: "p".into(),
                err: io(),
            }),
            Box::new(ThinError::Format {
                pool: "p".into(),
                err: fmt(),
            }),
        ];
        for e in errors {
            let text = e.to_string();
            assert!(
                text.contains("the disk said no")
                    || text.contains("bad magic")
                    || text.contains("missing"),
                "{text}"
            );
            assert!(e.source().is_none(), "{text}: its cause is also its source");
        }
    }
}
