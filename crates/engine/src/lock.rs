//! LVM2's own locks: `flock` on files in `/run/lock/lvm`: `V_<vg>` for a VG
//! and `P_global` for changes to the set of VGs and PVs. Taking them makes
//! devpool safe beside lvm2 commands working on the same devices.

use crate::error::{EngineError, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where LVM2 keeps its lock files.
pub const LVM_LOCK_DIR: &str = "/run/lock/lvm";

/// Where this process takes its locks: LVM2's directory, shared with LVM2
/// itself; or, for a user who may not write there (devpool without root,
/// on image files that user owns), a directory of that user's own:
/// `$XDG_RUNTIME_DIR/devpool-locks`, else `/tmp/devpool-locks-<uid>`
/// (made mode 0700; refused unless it is a directory the user owns).
pub fn default_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let lvm = PathBuf::from(LVM_LOCK_DIR);
        if uid == 0 || writable(&lvm) {
            return lvm;
        }
        let own = std::env::var_os("XDG_RUNTIME_DIR")
            .map(|d| PathBuf::from(d).join("devpool-locks"))
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/devpool-locks-{uid}")));
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&own);
        match std::fs::symlink_metadata(&own) {
            Ok(m) if m.is_dir() && m.uid() == uid => own,
            // Someone else's, or not a directory: LVM2's, whose error
            // (permission denied) then names the problem.
            _ => lvm,
        }
    })
    .clone()
}

fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

/// Held until dropped.
#[derive(Debug)]
pub struct LockGuard {
    file: File,
    pub path: PathBuf,
}

/// On release, as LVM2 does: when no one else holds the lock (it converts
/// to exclusive without waiting) and the path still names the locked file,
/// unlink it, so `/run/lock/lvm` does not keep a file for every VG ever
/// locked. A waiter granted the lock on the unlinked file notices in
/// [`take`] and locks a fresh one.
impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.file.try_lock().is_err() {
            return;
        }
        let same = match (self.file.metadata(), std::fs::metadata(&self.path)) {
            (Ok(held), Ok(now)) => (held.dev(), held.ino()) == (now.dev(), now.ino()),
            _ => false,
        };
        if same {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// LVM2 unlinks a lock file when it releases it, so a waiter may be granted
/// the lock on a file that no longer has a name while a newcomer locks a
/// fresh file of the same name. Like LVM2, retry until the locked file is
/// still the one the path names.
fn take(dir: &Path, name: &str, exclusive: bool) -> Result<LockGuard> {
    let path = dir.join(name);
    let open = || {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
    };
    loop {
        let file = open_making_dir(dir, "lock", &path, open)?;
        let r = if exclusive {
            file.lock()
        } else {
            file.lock_shared()
        };
        r.map_err(|e| EngineError::io(&path, "flock", e))?;
        let held = file
            .metadata()
            .map_err(|e| EngineError::io(&path, "fstat lock file", e))?;
        match std::fs::metadata(&path) {
            Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => {
                return Ok(LockGuard { file, path });
            }
            _ => continue, // unlinked or replaced while we waited: lock the new file
        }
    }
}

/// `open()` a file (`path`) in `dir`; when that fails because `dir` is
/// missing, make it and open again. Checking the directory first would cost
/// every commit two more system calls (each commit takes a lock and appends
/// to the journal).
pub(crate) fn open_making_dir(
    dir: &Path,
    what: &str,
    path: &Path,
    open: impl Fn() -> std::io::Result<File>,
) -> Result<File> {
    match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)
                .map_err(|e| EngineError::io(dir, format!("create {what} directory"), e))?;
            open()
        }
        r => r,
    }
    .map_err(|e| EngineError::io(path, format!("open {what} file"), e))
}

pub fn lock_vg(dir: &Path, vg: &str, exclusive: bool) -> Result<LockGuard> {
    take(dir, &format!("V_{vg}"), exclusive)
}

pub fn lock_global(dir: &Path, exclusive: bool) -> Result<LockGuard> {
    take(dir, "P_global", exclusive)
}

/// LVM2's lock on its devices file `name` (`D_<name>`), held while the
/// file is read and rewritten.
pub fn lock_devices_file(dir: &Path, name: &str) -> Result<LockGuard> {
    take(dir, &format!("D_{name}"), true)
}

/// devpool's own lock on a VG's thin pool metadata: every process that
/// changes it (the engine, each data-plane server) holds it exclusively
/// from reading the live copy to committing the next. It also guards what
/// devpool hands to device-mapper: an activation of a thin volume or a
/// snapshot family, and a server opening such a volume with devpool's own
/// mappings until it has registered (each checks for the other under it).
/// LVM2 ignores it.
pub fn lock_thin(dir: &Path, vg: &str) -> Result<LockGuard> {
    take(dir, &format!("devpool_thin_{vg}"), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_holder_removes_the_lock_file_and_waiters_lock_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("V_vg");
        let a = lock_vg(dir.path(), "vg", false).unwrap();
        let b = lock_vg(dir.path(), "vg", false).unwrap();
        drop(a);
        assert!(file.exists(), "another shared holder keeps it");
        drop(b);
        assert!(!file.exists(), "the last holder removes it");

        // A waiter blocked on the file the holder unlinks ends up holding
        // the file the path names, exclusively against a newcomer.
        use std::sync::atomic::{AtomicBool, Ordering};
        let inside = std::sync::Arc::new(AtomicBool::new(false));
        let held = lock_vg(dir.path(), "vg", true).unwrap();
        let (d, flag) = (dir.path().to_path_buf(), inside.clone());
        let waiter = std::thread::spawn(move || {
            let g = lock_vg(&d, "vg", true).unwrap();
            let named = std::fs::metadata(&g.path).unwrap();
            let locked = g.file.metadata().unwrap();
            assert_eq!((named.dev(), named.ino()), (locked.dev(), locked.ino()));
            flag.store(true, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(100));
            flag.store(false, Ordering::SeqCst);
            drop(g);
        });
        // Let the waiter block on the file first.
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(held);
        while !inside.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let late = lock_vg(dir.path(), "vg", true).unwrap();
        assert!(
            !inside.load(Ordering::SeqCst),
            "the newcomer got the lock while the waiter held it"
        );
        drop(late);
        waiter.join().unwrap();
        assert!(!file.exists());
    }
}
