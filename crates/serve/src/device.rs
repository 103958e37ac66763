//! The devices under a served volume: each PV opened twice, with `O_DIRECT`
//! where the device or file system allows it (aligned requests) and buffered
//! (requests the client did not align). Linux keeps the two coherent: direct
//! I/O writes back and invalidates the page cache over its range first.

use crate::map::VolumeMap;
use crate::snapshot::Cow;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct PvDevice {
    pub path: PathBuf,
    direct: Option<File>,
    buffered: File,
    pub is_block: bool,
    /// Alignment `direct` needs for offsets, lengths and buffer addresses.
    pub align: u64,
}

/// BLKSSZGET: the logical block size of a block device.
const BLKSSZGET: libc::c_ulong = 0x1268;

impl PvDevice {
    pub fn open(path: &Path, writable: bool) -> std::io::Result<PvDevice> {
        let ctx = |e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
        };
        let buffered = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(ctx)?;
        let is_block = buffered
            .metadata()
            .map_err(ctx)?
            .file_type()
            .is_block_device();
        let direct = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        let mut align = 512u64;
        if is_block {
            let mut ssz: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int.
            if unsafe { libc::ioctl(buffered.as_raw_fd(), BLKSSZGET, &mut ssz) } == 0 && ssz > 0 {
                align = ssz as u64;
            }
        }
        let direct = direct.and_then(|f| probe_direct(f, &mut align));
        Ok(PvDevice {
            path: path.to_path_buf(),
            direct,
            buffered,
            is_block,
            align,
        })
    }

    /// The descriptor for an I/O: direct when everything is aligned.
    pub fn fd_for(&self, aligned: impl FnOnce(u64) -> bool) -> RawFd {
        match &self.direct {
            Some(f) if aligned(self.align) => f.as_raw_fd(),
            _ => self.buffered.as_raw_fd(),
        }
    }

    pub fn direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The descriptor for flush, discard and zeroing.
    pub fn any_fd(&self) -> RawFd {
        self.buffered.as_raw_fd()
    }

    /// The device opened buffered (any offset, any length).
    pub fn buffered(&self) -> &File {
        &self.buffered
    }
}

/// Some file systems (tmpfs before 6.6, some FUSE) refuse O_DIRECT reads, and
/// some need 4 KiB alignment: try a read at the current alignment, then 4 KiB.
fn probe_direct(f: File, align: &mut u64) -> Option<File> {
    let buf = crate::buffer::AlignedBuf::new(4096);
    for a in [*align, 4096] {
        // SAFETY: buf holds 4096 writable bytes, aligned to 4096.
        let n = unsafe { libc::pread(f.as_raw_fd(), buf.as_ptr() as *mut _, a as usize, 0) };
        if n >= 0 {
            *align = a;
            return Some(f);
        }
    }
    None
}

/// A volume ready to serve: its map and its devices.
#[derive(Debug)]
pub struct Volume {
    pub name: String,
    pub uuid: String,
    pub map: VolumeMap,
    pub devs: Vec<PvDevice>,
    pub read_only: bool,
    /// Set for an origin with snapshots and for a snapshot: requests go
    /// through copy-on-write.
    pub cow: Option<Cow>,
    /// Set for a thin volume: `map` is the pool's data LV, and requests go
    /// through the thin mappings.
    pub thin: Option<crate::thin::Thin>,
    /// Set for a volume the kernel serves (dm-thin or dm-snapshot, a host
    /// with device-mapper): `devs` is its dm device, the stack goes when
    /// the volume does (after `devs` is closed: fields drop in order).
    pub kernel: Option<KernelStack>,
}

/// The device-mapper stack of a thin volume (its pool's devices shared) or
/// of a snapshot family, removed when dropped (unless someone else made it).
#[derive(Debug)]
pub struct KernelStack {
    pub node: std::path::PathBuf,
    stack: Option<devpool_pool::dmdev::Activated>,
}

impl KernelStack {
    pub fn new(node: std::path::PathBuf, stack: devpool_pool::dmdev::Activated) -> KernelStack {
        KernelStack {
            node,
            stack: Some(stack),
        }
    }
}

impl Drop for KernelStack {
    fn drop(&mut self) {
        if let Some(s) = self.stack.take() {
            let _ = s.deactivate();
        }
    }
}

impl Drop for Volume {
    /// Nothing provisioned stays uncommitted once the volume is let go.
    fn drop(&mut self) {
        if let Some(thin) = &self.thin {
            let _ = thin.flush(&self.devs);
        }
    }
}

impl Volume {
    pub fn size(&self) -> u64 {
        match &self.thin {
            Some(t) => t.virtual_size,
            None => self.map.size(),
        }
    }
    /// Refuse a range outside the volume.
    pub fn check(&self, offset: u64, len: u64) -> Result<(), crate::map::MapError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(crate::map::MapError::OutOfRange { offset, len, size }),
        }
    }
    /// The alignment every device accepts for direct I/O.
    pub fn align(&self) -> u64 {
        self.devs.iter().map(|d| d.align).max().unwrap_or(512)
    }
    /// The one device range a loop device or QEMU's raw driver may cover
    /// directly: never for an origin or a snapshot (that would bypass
    /// copy-on-write), nor for a thin volume (its blocks move).
    pub fn plain_range(&self) -> Option<(usize, u64)> {
        if self.cow.is_some() || self.thin.is_some() || self.kernel.is_some() {
            return None;
        }
        self.map.single_range()
    }
    /// Whether any device accepts direct I/O.
    pub fn direct(&self) -> bool {
        self.devs.iter().any(|d| d.direct())
    }
}
