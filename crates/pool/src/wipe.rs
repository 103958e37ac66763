//! Wiping a torn-down pool's device: discard it (`BLKDISCARD`, or punching
//! a hole in an image file), or write zeroes where discard is not supported,
//! reporting progress as (done, total) bytes.

use crate::{PoolError, Result};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

const BLKDISCARD: libc::c_ulong = 0x1277;
const CHUNK: u64 = 8 << 20;

pub fn wipe(path: &Path, progress: &dyn Fn(u64, u64)) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| PoolError::io(path, "open for wiping", e))?;
    let meta = f.metadata().map_err(|e| PoolError::io(path, "stat", e))?;
    let size = if meta.is_file() {
        meta.len()
    } else {
        use std::io::{Seek, SeekFrom};
        (&f).seek(SeekFrom::End(0))
            .map_err(|e| PoolError::io(path, "size", e))?
    };
    progress(0, size);
    if meta.is_file() {
        if devpool_engine::device::punch_hole(f.as_raw_fd(), 0, size).is_ok() {
            progress(size, size);
            return Ok(());
        }
    } else {
        let range: [u64; 2] = [0, size];
        // SAFETY: BLKDISCARD reads a [start, length] pair.
        if unsafe { libc::ioctl(f.as_raw_fd(), BLKDISCARD, &range as *const [u64; 2]) } == 0 {
            progress(size, size);
            return Ok(());
        }
    }
    let zeros = vec![0u8; CHUNK as usize];
    let mut at = 0;
    while at < size {
        let n = CHUNK.min(size - at) as usize;
        f.write_all_at(&zeros[..n], at)
            .map_err(|e| PoolError::io(path, format!("zero at byte {at}"), e))?;
        at += n as u64;
        progress(at, size);
    }
    f.sync_all().map_err(|e| PoolError::io(path, "fsync", e))
}
