//! Access to one PV: a block device (opened `O_DIRECT`, like LVM2, so that no
//! stale page cache hides another writer's metadata) or a regular image file.
//! Every write goes through the [`WriteGate`] so that tests can cut a commit
//! after any write.

use crate::error::{EngineError, Result};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Direct I/O granularity; covers 512e and 4Kn devices.
const DIRECT_ALIGN: u64 = 4096;

/// Counts writes and refuses every write past a limit (the fault-injection hook).
#[derive(Debug, Clone, Default)]
pub struct WriteGate {
    limit: Option<usize>,
    done: Arc<AtomicUsize>,
}

impl WriteGate {
    pub fn unlimited() -> WriteGate {
        WriteGate::default()
    }
    /// Allow `n` writes, then fail every later one with `InjectedCrash`.
    pub fn crash_after(n: usize) -> WriteGate {
        WriteGate {
            limit: Some(n),
            done: Arc::default(),
        }
    }
    /// From `DEVPOOL_FAULT_CRASH_AFTER_WRITES`, if set.
    pub fn from_env() -> WriteGate {
        match std::env::var("DEVPOOL_FAULT_CRASH_AFTER_WRITES")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            Some(n) => WriteGate::crash_after(n),
            None => WriteGate::unlimited(),
        }
    }
    fn admit(&self) -> Result<()> {
        let n = self.done.load(Ordering::SeqCst);
        if let Some(limit) = self.limit
            && n >= limit
        {
            return Err(EngineError::InjectedCrash(limit));
        }
        self.done.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[derive(Debug)]
pub struct Device {
    pub path: PathBuf,
    file: File,
    pub size: u64,
    pub is_block: bool,
}

/// A heap buffer aligned for direct I/O.
struct Aligned {
    buf: Vec<u8>,
    shift: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let buf = vec![0u8; len + DIRECT_ALIGN as usize];
        let shift = buf.as_ptr().align_offset(DIRECT_ALIGN as usize);
        Aligned { buf, shift, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.shift..self.shift + self.len]
    }
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.shift..self.shift + self.len]
    }
}

impl Device {
    pub fn open(path: &Path, write: bool) -> Result<Device> {
        let meta = std::fs::metadata(path).map_err(|e| EngineError::io(path, "stat", e))?;
        let is_block = meta.file_type().is_block_device();
        if !is_block && !meta.is_file() {
            return Err(EngineError::Invalid(format!(
                "{}: not a block device or a regular image file",
                path.display()
            )));
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(write);
        if is_block {
            oo.custom_flags(libc::O_DIRECT);
        }
        let mut file = oo.open(path).map_err(|e| {
            EngineError::io(path, if write { "open for writing" } else { "open" }, e)
        })?;
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|e| EngineError::io(path, "size", e))?;
        Ok(Device {
            path: path.to_path_buf(),
            file,
            size,
            is_block,
        })
    }

    /// Read `len` bytes at `off`; a short read past the device end is an error.
    pub fn read_at(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let end = off
            .checked_add(len as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                EngineError::Invalid(format!(
                    "{}: read of {len} bytes at byte {off} runs past the device end ({} bytes)",
                    self.path.display(),
                    self.size
                ))
            })?;
        if !self.is_block {
            let mut v = vec![0u8; len];
            self.file
                .read_exact_at(&mut v, off)
                .map_err(|e| EngineError::io(&self.path, format!("read at byte {off}"), e))?;
            return Ok(v);
        }
        let a_off = off / DIRECT_ALIGN * DIRECT_ALIGN;
        let a_end = end.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let mut buf = Aligned::new((a_end - a_off) as usize);
        self.file
            .read_exact_at(buf.as_mut(), a_off)
            .map_err(|e| EngineError::io(&self.path, format!("read at byte {a_off}"), e))?;
        let s = (off - a_off) as usize;
        Ok(buf.as_ref()[s..s + len].to_vec())
    }

    /// Write `data` at `off` (read-modify-write of the aligned blocks on block devices).
    pub fn write_at(&self, gate: &WriteGate, off: u64, data: &[u8]) -> Result<()> {
        let end = off
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                EngineError::Invalid(format!(
                    "{}: write of {} bytes at byte {off} runs past the device end ({} bytes)",
                    self.path.display(),
                    data.len(),
                    self.size
                ))
            })?;
        gate.admit()?;
        let io = |e| EngineError::io(&self.path, format!("write at byte {off}"), e);
        if !self.is_block {
            return self.file.write_all_at(data, off).map_err(io);
        }
        let a_off = off / DIRECT_ALIGN * DIRECT_ALIGN;
        let a_end = end.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let mut buf = Aligned::new((a_end - a_off) as usize);
        // Only the partial blocks at either end need their old contents.
        let block = DIRECT_ALIGN as usize;
        let total = buf.as_ref().len();
        if a_off != off {
            self.file
                .read_exact_at(&mut buf.as_mut()[..block], a_off)
                .map_err(io)?;
        }
        if a_end != end && (a_end - a_off > DIRECT_ALIGN || a_off == off) {
            self.file
                .read_exact_at(&mut buf.as_mut()[total - block..], a_end - DIRECT_ALIGN)
                .map_err(io)?;
        }
        let s = (off - a_off) as usize;
        buf.as_mut()[s..s + data.len()].copy_from_slice(data);
        self.file.write_all_at(buf.as_ref(), a_off).map_err(io)
    }

    /// Make every completed write durable.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| EngineError::io(&self.path, "fdatasync", e))
    }
}
