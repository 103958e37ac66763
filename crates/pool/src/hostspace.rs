//! The space under a pool on an image file: how much of the sparse image is
//! written, and how much the filesystem holding it has left. A sparse
//! image can be larger than its filesystem's free space (the embedded
//! default pool is 64 GiB); once the filesystem is full, every write to a
//! block of a volume not written before fails with ENOSPC, which a
//! filesystem under test reports as an I/O error. `pool status` shows
//! both numbers and warns before that happens; `pool setup` says so when
//! it creates an image larger than the free space.

use devpool_format::units::{Bytes, format_bytes};
use serde::Serialize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Below this much free space (and 5% of the filesystem) a filesystem that
/// an image could outgrow counts as nearly full.
const NEARLY_FULL_BYTES: u64 = 1 << 30;
const NEARLY_FULL_PERCENT: u64 = 5;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ImageSpace {
    pub path: PathBuf,
    /// The image's apparent size.
    pub size_bytes: u64,
    /// What it occupies on its filesystem (its written blocks).
    pub allocated_bytes: u64,
    /// Free space on that filesystem, for an unprivileged user as `df`
    /// shows it (root may have a little more).
    pub host_free_bytes: u64,
    pub host_size_bytes: u64,
}

impl ImageSpace {
    /// The space of `path` if it is an image file (not a block device).
    pub fn of(path: &Path) -> Option<ImageSpace> {
        let m = std::fs::metadata(path).ok()?;
        if !m.is_file() {
            return None;
        }
        let (free, size) = filesystem_space(path)?;
        Some(ImageSpace {
            path: path.to_path_buf(),
            size_bytes: m.len(),
            allocated_bytes: m.blocks().saturating_mul(512),
            host_free_bytes: free,
            host_size_bytes: size,
        })
    }

    /// How much more the image can take before it is fully written.
    pub fn can_grow_bytes(&self) -> u64 {
        self.size_bytes.saturating_sub(self.allocated_bytes)
    }

    /// A warning when the filesystem is nearly full and the image could
    /// still outgrow it.
    pub fn health(&self) -> Option<String> {
        let grow = self.can_grow_bytes();
        let free = self.host_free_bytes;
        let nearly_full = free < NEARLY_FULL_BYTES
            || free.saturating_mul(100) < self.host_size_bytes.saturating_mul(NEARLY_FULL_PERCENT);
        (free < grow && nearly_full).then(|| {
            format!(
                "the filesystem under {} has {} free, and the image can still grow by {}: \
writes to volumes fail with ENOSPC once it is full (release leases to give their space back, \
or free space there)",
                self.path.display(),
                format_bytes(Bytes(free)),
                format_bytes(Bytes(grow))
            )
        })
    }

    /// One line for `pool status`.
    pub fn describe(&self) -> String {
        format!(
            "{}: {} of {} written, {} free on its filesystem",
            self.path.display(),
            format_bytes(Bytes(self.allocated_bytes)),
            format_bytes(Bytes(self.size_bytes)),
            format_bytes(Bytes(self.host_free_bytes))
        )
    }
}

/// A note for `pool setup` when a new image of `size` bytes at `path` can
/// outgrow the free space of its filesystem.
pub fn overcommit_note(path: &Path, size: u64) -> Option<String> {
    let (free, _) = filesystem_space(path)?;
    (size > free).then(|| {
        format!(
            "{} may grow to {}, but its filesystem has {} free: writes to volumes fail with \
ENOSPC once that is used up (`pool status` shows both)",
            path.display(),
            format_bytes(Bytes(size)),
            format_bytes(Bytes(free))
        )
    })
}

/// (free for unprivileged users, total) bytes of the filesystem holding
/// `path` (or, for a path not made yet, its directory).
fn filesystem_space(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let at = if path.exists() {
        path
    } else {
        path.parent().filter(|p| !p.as_os_str().is_empty())?
    };
    let c = std::ffi::CString::new(at.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the struct we pass; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let unit = st.f_frsize;
    Some((
        (st.f_bavail as u64).saturating_mul(unit),
        (st.f_blocks as u64).saturating_mul(unit),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(size: u64, allocated: u64, free: u64, fs: u64) -> ImageSpace {
        ImageSpace {
            path: "/x/pool.img".into(),
            size_bytes: size,
            allocated_bytes: allocated,
            host_free_bytes: free,
            host_size_bytes: fs,
        }
    }

    #[test]
    fn only_a_nearly_full_filesystem_the_image_can_outgrow_is_a_warning() {
        const G: u64 = 1 << 30;
        // A 64 GiB default pool on a roomy disk: fine, though it could outgrow it.
        assert_eq!(space(64 * G, G, 30 * G, 100 * G).health(), None);
        // Nearly full, and the image can grow past it.
        let w = space(64 * G, 10 * G, G / 2, 100 * G).health().unwrap();
        assert!(
            w.contains("512.00 MiB free") && w.contains("grow by 54.00 GiB"),
            "{w}"
        );
        // Nearly full, but the image is written to its end: it needs no more.
        assert_eq!(space(8 * G, 8 * G, 0, 100 * G).health(), None);
        // Under 1 GiB but the image fits in what is left.
        assert_eq!(space(G, G / 2, G / 2 + 1, 2 * G).health(), None);
        // 4% of a large filesystem free, and the image could outgrow that.
        assert!(space(200 * G, 0, 40 * G, 1000 * G).health().is_some());
    }

    #[test]
    fn an_image_file_reports_its_written_blocks_and_a_device_reports_nothing() {
        let dir = std::env::temp_dir().join(format!("devpool-space-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("i.img");
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(64 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[7u8; 1 << 20], 8 << 20).unwrap();
        f.sync_all().unwrap();
        let s = ImageSpace::of(&img).unwrap();
        assert_eq!(s.size_bytes, 64 << 20);
        assert!(
            s.allocated_bytes >= 1 << 20 && s.allocated_bytes < 8 << 20,
            "{s:?}"
        );
        assert!(s.host_size_bytes > 0);
        assert_eq!(ImageSpace::of(Path::new("/dev/null")), None);
        assert!(overcommit_note(&dir.join("new.img"), u64::MAX / 2).is_some());
        assert_eq!(overcommit_note(&dir.join("new.img"), 4096), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
