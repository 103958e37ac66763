//! Which processes serve which volume. A server registers itself as
//! `state_dir/servers/<LV uuid>.<pid>` and holds an exclusive `flock` on that
//! file for as long as it serves. Release and cleanup call [`stop`] before
//! they free a volume's extents: a held lock proves the server is alive (no
//! PID-reuse guessing), it is asked to stop with SIGTERM, and its lock being
//! released proves it has finished its in-flight I/O and flushed.

use crate::{PoolError, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A server's registration; dropping it unregisters.
#[derive(Debug)]
pub struct Registration {
    path: PathBuf,
    _file: File,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("servers")
}

/// Where servers mount their FUSE file systems.
fn fuse_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("fuse")
}

/// Register this process as serving the LV with uuid `lv_uuid`.
pub fn register(state_dir: &Path, lv_uuid: &str) -> Result<Registration> {
    let d = dir(state_dir);
    let io = |op: &str, path: &Path| {
        let (op, path) = (op.to_string(), path.to_path_buf());
        move |source| PoolError::Io {
            path,
            op,
            err: source,
        }
    };
    std::fs::create_dir_all(&d).map_err(io("create", &d))?;
    let path = d.join(entry_name(lv_uuid, std::process::id()));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(io("open", &path))?;
    // SAFETY: flock on our own descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(PoolError::Refused(format!(
            "{} is locked by another server",
            path.display()
        )));
    }
    writeln!(file, "{}", std::process::id()).map_err(io("write", &path))?;
    Ok(Registration { path, _file: file })
}

/// PIDs of the processes serving `lv_uuid` now.
pub fn serving(state_dir: &Path, lv_uuid: &str) -> Vec<u32> {
    entries(state_dir, lv_uuid)
        .into_iter()
        .filter(|(path, _)| held(path))
        .map(|(_, pid)| pid)
        .collect()
}

fn entries(state_dir: &Path, lv_uuid: &str) -> Vec<(PathBuf, u32)> {
    entries_of(state_dir, &[lv_uuid])
}

/// The registrations of any of `lv_uuids`, from one read of the directory.
fn entries_of(state_dir: &Path, lv_uuids: &[&str]) -> Vec<(PathBuf, u32)> {
    let Ok(rd) = std::fs::read_dir(dir(state_dir)) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (uuid, pid) = name.rsplit_once('.')?;
            let pid = pid.parse().ok()?;
            lv_uuids.contains(&uuid).then(|| (e.path(), pid))
        })
        .collect()
}

/// Whether someone holds the lock on a registration file.
fn held(path: &Path) -> bool {
    let Ok(f) = File::open(path) else {
        return false;
    };
    // SAFETY: flock on our own descriptor; released when `f` closes.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

/// Stop every server of the volumes `lv_uuids` (other than this process)
/// and wait until each has let go of its volume. Stale registrations are
/// removed.
pub fn stop(state_dir: &Path, lv_uuids: &[&str], timeout: Duration) -> Result<Vec<u32>> {
    let me = std::process::id();
    let mut stopped = Vec::new();
    for (path, pid) in entries_of(state_dir, lv_uuids) {
        if pid == me {
            continue;
        }
        if !held(&path) {
            // A server killed before it could clean up: its FUSE mount
            // (`serve --block-device`) is left, cut off from its server.
            unmount_left_fuse(state_dir, &path);
            let _ = std::fs::remove_file(&path);
            continue;
        }
        // The lock is held, so `pid` is the live server (a PID cannot be
        // reused while its process holds a lock).
        // SAFETY: kill with a valid signal number.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while held(&path) {
            if Instant::now() > deadline {
                return Err(PoolError::Refused(format!(
                    "the server of this volume (PID {pid}) did not stop within {}s; stop it and try again",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(&path);
        stopped.push(pid);
    }
    Ok(stopped)
}

/// A registration's file name, and its server's FUSE mount point's.
fn entry_name(lv_uuid: &str, pid: u32) -> String {
    format!("{lv_uuid}.{pid}")
}

/// The FUSE mount point this process makes for `serve --block-device` of
/// the LV with uuid `lv_uuid`: named as its registration is, so whether its
/// server lives is known by the same lock.
pub fn fuse_mountpoint(state_dir: &Path, lv_uuid: &str) -> PathBuf {
    fuse_dir(state_dir).join(entry_name(lv_uuid, std::process::id()))
}

/// Unmount (lazily: whatever still holds a file in it keeps it) and remove
/// the FUSE mount point a dead server of registration `reg` left.
fn unmount_left_fuse(state_dir: &Path, reg: &Path) {
    let Some(name) = reg.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    // No existence test: a stat of a mount whose server died fails
    // (ENOTCONN). Without a mount, umount2 and rmdir fail harmlessly.
    let at = fuse_dir(state_dir).join(name);
    if let Ok(c) = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()) {
        // SAFETY: a NUL-terminated path; EINVAL when nothing is mounted there.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_dir(&at);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_is_visible_while_held_and_gone_when_dropped() {
        let d = std::env::temp_dir().join(format!("devpool-servers-{}", std::process::id()));
        let r = register(&d, "u1").unwrap();
        assert_eq!(serving(&d, "u1"), vec![std::process::id()]);
        assert!(serving(&d, "u2").is_empty());
        // Our own registration is never signalled.
        assert!(
            stop(&d, &["u1"], Duration::from_secs(1))
                .unwrap()
                .is_empty()
        );
        // A stale registration (nobody holds its lock) of one of the volumes
        // asked for goes; another volume's, or a longer uuid's, stays.
        let stale = d.join("servers").join("u2.4242");
        let other = d.join("servers").join("u22.4242");
        std::fs::write(&stale, "").unwrap();
        std::fs::write(&other, "").unwrap();
        assert!(
            stop(&d, &["u1", "u2"], Duration::from_secs(1))
                .unwrap()
                .is_empty()
        );
        assert!(!stale.exists());
        assert!(other.exists());
        assert_eq!(serving(&d, "u1"), vec![std::process::id()]);
        drop(r);
        assert!(serving(&d, "u1").is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }
}
