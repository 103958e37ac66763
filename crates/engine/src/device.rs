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

/// Buffer alignment for direct I/O, and the I/O granularity when a device
/// does not report its logical block size (covers 512e and 4Kn devices).
const DIRECT_ALIGN: u64 = 4096;
/// Zeroes for batched direct-I/O writes (aligned, and never freed).
#[repr(align(4096))]
struct Zeros([u8; 64 << 10]);
static ZEROS: Zeros = Zeros([0; 64 << 10]);
/// `BLKSSZGET`: a block device's logical block size.
const BLKSSZGET: libc::c_ulong = 0x1268;
/// `BLKDISCARD`: `_IO(0x12, 119)`.
const BLKDISCARD: libc::c_ulong = 0x1277;

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

/// Punch a hole of `len` bytes at `off` in a regular file (it reads as
/// zeroes and gives its blocks back); the OS error where the filesystem
/// cannot (EOPNOTSUPP) or the descriptor is no regular file.
pub fn punch_hole(fd: std::os::fd::RawFd, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor with plain integer arguments.
    let r = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[derive(Debug)]
pub struct Device {
    pub path: PathBuf,
    file: File,
    pub size: u64,
    pub is_block: bool,
    /// Direct I/O granularity: the logical block size (512 on most
    /// devices, so a 512-byte area header is written without reading).
    align: u64,
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
        let align = if is_block {
            logical_block_size(&file).unwrap_or(DIRECT_ALIGN)
        } else {
            1
        };
        Ok(Device {
            path: path.to_path_buf(),
            file,
            size,
            is_block,
            align,
        })
    }

    /// Read `len` bytes at `off`; a short read past the device end is an error.
    pub fn read_at(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let end = self.check_range(off, len as u64, "read")?;
        if !self.is_block {
            let mut v = vec![0u8; len];
            self.file
                .read_exact_at(&mut v, off)
                .map_err(|e| EngineError::io(&self.path, format!("read at byte {off}"), e))?;
            return Ok(v);
        }
        let (a_off, a_end) = self.aligned(off, end);
        let mut buf = Aligned::new((a_end - a_off) as usize);
        self.file
            .read_exact_at(buf.as_mut(), a_off)
            .map_err(|e| EngineError::io(&self.path, format!("read at byte {a_off}"), e))?;
        let s = (off - a_off) as usize;
        Ok(buf.as_ref()[s..s + len].to_vec())
    }

    /// Write `data` at `off` (read-modify-write of the aligned blocks on block devices).
    pub fn write_at(&self, gate: &WriteGate, off: u64, data: &[u8]) -> Result<()> {
        let end = self.check_range(off, data.len() as u64, "write")?;
        gate.admit()?;
        let io = |e| EngineError::io(&self.path, format!("write at byte {off}"), e);
        if !self.is_block {
            return self.file.write_all_at(data, off).map_err(io);
        }
        let (a_off, a_end) = self.aligned(off, end);
        let mut buf = Aligned::new((a_end - a_off) as usize);
        // Only the partial blocks at either end need their old contents.
        let block = self.align as usize;
        let total = buf.as_ref().len();
        if a_off != off {
            self.file
                .read_exact_at(&mut buf.as_mut()[..block], a_off)
                .map_err(io)?;
        }
        if a_end != end && (a_end - a_off > self.align || a_off == off) {
            self.file
                .read_exact_at(&mut buf.as_mut()[total - block..], a_end - self.align)
                .map_err(io)?;
        }
        let s = (off - a_off) as usize;
        buf.as_mut()[s..s + data.len()].copy_from_slice(data);
        self.file.write_all_at(buf.as_ref(), a_off).map_err(io)
    }

    /// The smallest direct-I/O-aligned range around `off..end`.
    fn aligned(&self, off: u64, end: u64) -> (u64, u64) {
        (
            off / self.align * self.align,
            end.div_ceil(self.align) * self.align,
        )
    }

    /// Direct I/O granularity (1 for image files, which are not opened
    /// with `O_DIRECT`).
    pub fn io_align(&self) -> u64 {
        self.align
    }

    /// Write `len` zero bytes at each offset: on a block device, all at once
    /// (one io_uring submission, so the device sees them together instead
    /// of one round trip each); elsewhere, or when a range is not aligned,
    /// one after another.
    pub fn zero_ranges(&self, gate: &WriteGate, ranges: &[(u64, u64)]) -> Result<()> {
        let aligned = ranges.iter().all(|&(o, l)| {
            o % self.align == 0 && l % self.align == 0 && l as usize <= ZEROS.0.len()
        });
        if !self.is_block || ranges.len() < 2 || !aligned {
            return ranges.iter().try_for_each(|&(o, l)| self.zero(gate, o, l));
        }
        for &(o, l) in ranges {
            self.check_range(o, l, "write")?;
        }
        // Each write passes the gate first: an injected crash stops the
        // batch where a real one could (the writes admitted still happen).
        let mut admitted = Vec::with_capacity(ranges.len());
        let mut crash = None;
        for &r in ranges {
            match gate.admit() {
                Ok(()) => admitted.push(r),
                Err(e) => {
                    crash = Some(e);
                    break;
                }
            }
        }
        crate::uring::write_all(&self.file, &ZEROS.0, &admitted)
            .map_err(|e| EngineError::io(&self.path, "write zeroes", e))?;
        crash.map_or(Ok(()), Err)
    }

    /// Give `len` bytes at `off` back: punch a hole in an image file (it
    /// reads as zeroes, its blocks return to the filesystem), `BLKDISCARD`
    /// on a block device (what it reads afterwards is up to the device).
    /// A device or filesystem that cannot discard is left as it is: a
    /// discard only gives space back, nothing depends on it.
    pub fn discard(&self, gate: &WriteGate, off: u64, len: u64) -> Result<()> {
        use std::os::fd::AsRawFd;
        self.check_range(off, len, "discard")?;
        if len == 0 {
            return Ok(());
        }
        gate.admit()?;
        if self.is_hole(off, len) {
            return Ok(());
        }
        let fd = self.file.as_raw_fd();
        let r = if self.is_block {
            let range = [off, len];
            // SAFETY: BLKDISCARD reads a [start, length] pair of u64s.
            match unsafe { libc::ioctl(fd, BLKDISCARD, range.as_ptr()) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        } else {
            punch_hole(fd, off, len)
        };
        let Err(e) = r else {
            return Ok(());
        };
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL) => Ok(()),
            _ => Err(EngineError::io(
                &self.path,
                format!("discard of {len} bytes at byte {off}"),
                e,
            )),
        }
    }

    /// Punch a hole in an image file; false where the filesystem cannot.
    fn punch(&self, off: u64, len: u64) -> bool {
        use std::os::fd::AsRawFd;
        punch_hole(self.file.as_raw_fd(), off, len).is_ok()
    }

    /// The first byte of data at or after `off` and before `end` in an
    /// image file (`None`: only holes there). Block devices have no holes.
    pub fn next_data(&self, off: u64, end: u64) -> Option<u64> {
        use std::os::fd::AsRawFd;
        if self.is_block {
            return (off < end).then_some(off);
        }
        // SAFETY: lseek on our open descriptor.
        let d = unsafe { libc::lseek(self.file.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            // ENXIO: no data past `off`; anything else: assume data.
            let none = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
            return (!none && off < end).then_some(off);
        }
        ((d as u64) < end).then_some(d as u64)
    }

    /// Whether `len` bytes at `off` of an image file are all a hole (read
    /// as zeroes without occupying space): nothing to zero or discard there.
    fn is_hole(&self, off: u64, len: u64) -> bool {
        !self.is_block && self.next_data(off, off.saturating_add(len)).is_none()
    }

    fn zero(&self, gate: &WriteGate, off: u64, len: u64) -> Result<()> {
        // An image file: a hole already reads as zeroes, and punching one
        // zeroes a range without writing (or occupying) anything. Where
        // the filesystem cannot punch, the zeroes are written below.
        if !self.is_block {
            self.check_range(off, len, "write")?;
            if self.is_hole(off, len) {
                return gate.admit();
            }
            gate.admit()?;
            if self.punch(off, len) {
                return Ok(());
            }
        }
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64);
            self.write_at(gate, off + done, &chunk[..n as usize])?;
            done += n;
        }
        Ok(())
    }

    /// The end of `len` bytes at `off`, or an error naming the device when
    /// they run past its end.
    fn check_range(&self, off: u64, len: u64, what: &str) -> Result<u64> {
        off.checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                EngineError::Invalid(format!(
                    "{}: {what} of {len} bytes at byte {off} runs past the device end ({} bytes)",
                    self.path.display(),
                    self.size
                ))
            })
    }

    /// Make every completed write durable.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| EngineError::io(&self.path, "fdatasync", e))
    }
}

fn logical_block_size(f: &File) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKSSZGET, &mut n as *mut libc::c_int) };
    (r == 0 && n > 0 && (n as u64).is_power_of_two() && n as u64 <= DIRECT_ALIGN)
        .then_some(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocated(p: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    }

    #[test]
    fn on_an_image_file_zeroing_and_discarding_punch_holes_and_skip_holes() {
        let dir = std::env::temp_dir().join(format!("devpool-dev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("pv.img");
        let f = File::create(&img).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[0x55u8; 4 << 20], 1 << 20).unwrap();
        f.sync_all().unwrap();
        let dev = Device::open(&img, true).unwrap();
        let gate = WriteGate::crash_after(3);
        // Zeroing 4 KiB of data punches it: it reads as zeroes, the rest stays.
        dev.zero_ranges(&gate, &[(1 << 20, 4096)]).unwrap();
        let mut b = vec![1u8; 8192];
        dev.file.read_exact_at(&mut b, 1 << 20).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0) && b[4096..].iter().all(|&x| x == 0x55));
        // A hole needs nothing, but still counts as a write for the gate.
        assert!(dev.is_hole(8 << 20, 4096));
        let before = allocated(&img);
        dev.zero_ranges(&gate, &[(8 << 20, 4096)]).unwrap();
        assert_eq!(allocated(&img), before, "nothing written into the hole");
        // Discarding gives the space back.
        dev.discard(&gate, 1 << 20, 4 << 20).unwrap();
        assert!(allocated(&img) + (4 << 20) - 8192 <= before, "punched");
        dev.file.read_exact_at(&mut b, 2 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        // The gate's limit holds: the fourth write is refused before it happens.
        assert!(matches!(
            dev.discard(&gate, 0, 4096),
            Err(EngineError::InjectedCrash(3))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
