//! Many reads, writes or syncs in flight at once and waited for together,
//! on a small io_uring of its own: the copy-out work of a batch of origin
//! writes (origin chunks read in parallel, COW chunks written in parallel).

use io_uring::{IoUring, opcode, types};
use std::io;
use std::os::fd::RawFd;

/// One transfer. `buf` must stay valid (and, for a read, writable) for the
/// whole [`Batch::run`].
#[derive(Debug, Clone, Copy)]
pub struct BatchOp {
    pub fd: RawFd,
    pub offset: u64,
    pub buf: *mut u8,
    pub len: usize,
    pub write: bool,
}

pub struct Batch {
    ring: IoUring,
}

// SAFETY: the ring only ever points at buffers a `run` call is given and
// waits for before it returns.
unsafe impl Send for Batch {}

impl Batch {
    pub fn new() -> io::Result<Batch> {
        Ok(Batch {
            ring: IoUring::new(64)?,
        })
    }

    /// Run every op, as many at once as the ring holds; the first error
    /// (a short transfer is EIO).
    ///
    /// # Safety
    /// Every op's buffer must be valid for `len` bytes (writable for reads).
    pub unsafe fn run(&mut self, ops: &[BatchOp]) -> io::Result<()> {
        let entries: Vec<_> = ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                let e = if op.write {
                    opcode::Write::new(types::Fd(op.fd), op.buf as *const u8, op.len as u32)
                        .offset(op.offset)
                        .build()
                } else {
                    opcode::Read::new(types::Fd(op.fd), op.buf, op.len as u32)
                        .offset(op.offset)
                        .build()
                };
                (e.user_data(i as u64), op.len as i32)
            })
            .collect();
        self.submit_all(entries)
    }

    /// `fdatasync` every descriptor, all at once.
    pub fn sync(&mut self, fds: &[RawFd]) -> io::Result<()> {
        let entries = fds
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                let e = opcode::Fsync::new(types::Fd(*fd))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()
                    .user_data(i as u64);
                (e, 0)
            })
            .collect();
        self.submit_all(entries)
    }

    fn submit_all(&mut self, entries: Vec<(io_uring::squeue::Entry, i32)>) -> io::Result<()> {
        let cap = self.ring.params().sq_entries() as usize;
        let mut first_err = None;
        for window in entries.chunks(cap) {
            for (e, _) in window {
                // SAFETY: the caller keeps every buffer valid until we
                // return, and we wait for every entry of the window below.
                if unsafe { self.ring.submission().push(e) }.is_err() {
                    return Err(io::Error::other("io_uring submission queue full"));
                }
            }
            let mut left = window.len();
            while left > 0 {
                match self.ring.submit_and_wait(left) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(e),
                }
                for c in self.ring.completion() {
                    left -= 1;
                    let want = entries.get(c.user_data() as usize).map_or(0, |(_, w)| *w);
                    let r = c.result();
                    if r < 0 {
                        first_err.get_or_insert(io::Error::from_raw_os_error(-r));
                    } else if want > 0 && r != want {
                        first_err.get_or_insert(io::Error::from_raw_os_error(libc::EIO));
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn more_ops_than_the_ring_holds_all_complete() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(300 * 512).unwrap();
        let mut bufs: Vec<Vec<u8>> = (0..300).map(|i| vec![i as u8; 512]).collect();
        let ops: Vec<BatchOp> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| BatchOp {
                fd: f.as_raw_fd(),
                offset: i as u64 * 512,
                buf: b.as_mut_ptr(),
                len: 512,
                write: true,
            })
            .collect();
        let mut batch = Batch::new().unwrap();
        // SAFETY: bufs outlive the call.
        unsafe { batch.run(&ops) }.unwrap();
        batch.sync(&[f.as_raw_fd()]).unwrap();
        let mut back = vec![0u8; 512];
        let read = [BatchOp {
            fd: f.as_raw_fd(),
            offset: 299 * 512,
            buf: back.as_mut_ptr(),
            len: 512,
            write: false,
        }];
        // SAFETY: back outlives the call.
        unsafe { batch.run(&read) }.unwrap();
        assert!(back.iter().all(|&b| b == 299u16 as u8));
        // Past the end of the file: a short read is an error.
        let past = [BatchOp {
            offset: 300 * 512,
            ..read[0]
        }];
        // SAFETY: as above.
        assert!(unsafe { batch.run(&past) }.is_err());
    }
}
