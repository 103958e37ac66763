//! LVM2's own locks: `flock` on files in `/run/lock/lvm`: `V_<vg>` for a VG
//! and `P_global` for changes to the set of VGs and PVs. Taking them makes
//! devpool safe beside lvm2 commands working on the same devices.

use crate::error::{EngineError, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Held until dropped.
#[derive(Debug)]
pub struct LockGuard {
    _file: File,
    pub path: PathBuf,
}

fn take(dir: &Path, name: &str, exclusive: bool) -> Result<LockGuard> {
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, "create lock directory", e))?;
    let path = dir.join(name);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| EngineError::io(&path, "open lock file", e))?;
    let r = if exclusive {
        file.lock()
    } else {
        file.lock_shared()
    };
    r.map_err(|e| EngineError::io(&path, "flock", e))?;
    Ok(LockGuard { _file: file, path })
}

pub fn lock_vg(dir: &Path, vg: &str, exclusive: bool) -> Result<LockGuard> {
    take(dir, &format!("V_{vg}"), exclusive)
}

pub fn lock_global(dir: &Path, exclusive: bool) -> Result<LockGuard> {
    take(dir, "P_global", exclusive)
}
