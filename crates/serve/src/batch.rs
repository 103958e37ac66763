//! Many reads, writes or syncs in flight at once and waited for together,
//! on a small io_uring of its own: the copy-out work of a batch of origin
//! writes (origin chunks read in parallel, then COW chunks written, synced,
//! records written, synced as one ordered chain).

use io_uring::{IoUring, opcode, squeue, types};
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

/// One op of a [`Batch::run_steps`] step: a gathered write, or `fdatasync`.
#[derive(Debug, Clone)]
pub enum ChainOp {
    /// `iov` must describe memory valid for the whole run.
    Write {
        fd: RawFd,
        offset: u64,
        iov: Vec<libc::iovec>,
    },
    Sync {
        fd: RawFd,
    },
}

impl ChainOp {
    /// Writes of `ops` (all writes) that continue each other on the same
    /// descriptor merged into gathered writes, in device order.
    pub fn gather(ops: &[BatchOp]) -> Vec<ChainOp> {
        let mut sorted: Vec<&BatchOp> = ops.iter().collect();
        sorted.sort_by_key(|o| (o.fd, o.offset));
        let mut out: Vec<ChainOp> = Vec::new();
        for o in sorted {
            let piece = libc::iovec {
                iov_base: o.buf.cast(),
                iov_len: o.len,
            };
            if let Some(ChainOp::Write { fd, offset, iov }) = out.last_mut() {
                let end = *offset + iov.iter().map(|v| v.iov_len as u64).sum::<u64>();
                if *fd == o.fd && end == o.offset && iov.len() < IOV_MAX {
                    iov.push(piece);
                    continue;
                }
            }
            out.push(ChainOp::Write {
                fd: o.fd,
                offset: o.offset,
                iov: vec![piece],
            });
        }
        out
    }
}

/// The SQE for `op` (user data `i`) and the byte count it must transfer.
fn entry(op: &ChainOp, i: usize) -> (squeue::Entry, i32) {
    let (e, want) = match op {
        ChainOp::Write { fd, offset, iov } => (
            opcode::Writev::new(types::Fd(*fd), iov.as_ptr(), iov.len() as u32)
                .offset(*offset)
                .build(),
            iov.iter().map(|v| v.iov_len).sum::<usize>() as i32,
        ),
        ChainOp::Sync { fd } => (
            opcode::Fsync::new(types::Fd(*fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            0,
        ),
    };
    (e.user_data(i as u64), want)
}

/// Fewer iovecs per gathered write than any kernel's `UIO_MAXIOV`.
const IOV_MAX: usize = 1024;

/// Transfers in flight at once (the copy-out of a large group of first
/// writes reads hundreds of chunks).
const RING_ENTRIES: u32 = 256;

pub struct Batch {
    ring: IoUring,
}

// SAFETY: the ring only ever points at buffers a `run` call is given and
// waits for before it returns.
unsafe impl Send for Batch {}

impl Batch {
    pub fn new() -> io::Result<Batch> {
        Ok(Batch {
            ring: IoUring::new(RING_ENTRIES)?,
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

    /// Run `steps` in order, each only once the one before it has
    /// succeeded; the first error, and no step after it runs. A step's ops
    /// run at once; consecutive single-op steps (one store's data, sync,
    /// records, sync) go to the kernel as one io_uring link chain, so it
    /// moves along them without a round trip through this thread.
    ///
    /// # Safety
    /// Every write's iovecs must describe memory valid for the whole run.
    pub unsafe fn run_steps(&mut self, steps: &[Vec<ChainOp>]) -> io::Result<()> {
        let mut chain: Vec<&ChainOp> = Vec::new();
        for step in steps {
            if let [one] = step.as_slice() {
                chain.push(one);
                continue;
            }
            // SAFETY: passed on from our caller.
            unsafe { self.run_linked(&chain) }?;
            chain.clear();
            let entries = step
                .iter()
                .enumerate()
                .map(|(i, op)| entry(op, i))
                .collect();
            self.submit_all(entries)?;
        }
        // SAFETY: passed on from our caller.
        unsafe { self.run_linked(&chain) }
    }

    /// `chain` in order, each link once the one before it succeeded. A chain
    /// longer than the ring runs in ring-sized pieces, each waited for
    /// before the next starts.
    ///
    /// # Safety
    /// As [`Batch::run_steps`].
    unsafe fn run_linked(&mut self, chain: &[&ChainOp]) -> io::Result<()> {
        let cap = self.ring.params().sq_entries() as usize;
        for window in chain.chunks(cap) {
            let last = window.len() - 1;
            let entries = window
                .iter()
                .enumerate()
                .map(|(i, op)| {
                    let (e, want) = entry(op, i);
                    if i < last {
                        (e.flags(squeue::Flags::IO_LINK), want)
                    } else {
                        (e, want)
                    }
                })
                .collect();
            self.submit_all(entries)?;
        }
        Ok(())
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

    /// Run `entries`, keeping as many in flight as the ring holds (each
    /// one freed is refilled at once); the first error.
    fn submit_all(&mut self, entries: Vec<(io_uring::squeue::Entry, i32)>) -> io::Result<()> {
        let cap = self.ring.params().sq_entries() as usize;
        let mut first_err = None;
        let (mut next, mut in_flight) = (0, 0);
        while next < entries.len() || in_flight > 0 {
            while next < entries.len() && in_flight < cap {
                // SAFETY: the caller keeps every buffer valid until we
                // return, and we wait for every entry pushed.
                if unsafe { self.ring.submission().push(&entries[next].0) }.is_err() {
                    break;
                }
                next += 1;
                in_flight += 1;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            for c in self.ring.completion() {
                in_flight -= 1;
                let want = entries.get(c.user_data() as usize).map_or(0, |(_, w)| *w);
                let r = c.result();
                if r < 0 {
                    first_err.get_or_insert(io::Error::from_raw_os_error(-r));
                } else if want > 0 && r != want {
                    first_err.get_or_insert(io::Error::from_raw_os_error(libc::EIO));
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

    #[test]
    fn steps_run_in_order_and_stop_at_the_first_failure() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(8192).unwrap();
        let (mut a, mut b) = (vec![1u8; 512], vec![2u8; 512]);
        let op = |buf: &mut Vec<u8>, offset| BatchOp {
            fd: f.as_raw_fd(),
            offset,
            buf: buf.as_mut_ptr(),
            len: 512,
            write: true,
        };
        // Adjacent writes become one gathered write.
        let ops = [op(&mut b, 512), op(&mut a, 0)];
        let data = ChainOp::gather(&ops);
        assert_eq!(data.len(), 1);
        let steps = [data, vec![ChainOp::Sync { fd: f.as_raw_fd() }]];
        let mut batch = Batch::new().unwrap();
        // SAFETY: a and b outlive the call.
        unsafe { batch.run_steps(&steps) }.unwrap();
        let mut back = vec![0u8; 1024];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 0).unwrap();
        assert!(back[..512].iter().all(|&x| x == 1) && back[512..].iter().all(|&x| x == 2));

        // A write that fails (a read-only descriptor): nothing after it runs.
        let path = tempfile::NamedTempFile::new().unwrap();
        let ro = std::fs::File::open(path.path()).unwrap();
        let bad = |c: &mut Vec<u8>| ChainOp::Write {
            fd: ro.as_raw_fd(),
            offset: 0,
            iov: vec![libc::iovec {
                iov_base: c.as_mut_ptr().cast(),
                iov_len: 512,
            }],
        };
        let (mut c, mut d) = (vec![3u8; 512], vec![4u8; 512]);
        // Linked (single-op steps), and a parallel step after a failed one.
        let good = |c: &mut Vec<u8>, at| ChainOp::gather(&[op(c, at)]);
        let linked = [vec![bad(&mut c)], good(&mut c, 4096)];
        // SAFETY: c outlives the call.
        assert!(unsafe { batch.run_steps(&linked) }.is_err());
        let mut e = vec![5u8; 512];
        let parallel = [
            vec![bad(&mut e), ChainOp::Sync { fd: f.as_raw_fd() }],
            good(&mut d, 6144),
        ];
        // SAFETY: d and e outlive the call.
        assert!(unsafe { batch.run_steps(&parallel) }.is_err());
        for at in [4096, 6144] {
            let mut tail = vec![9u8; 512];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut tail, at).unwrap();
            assert!(
                tail.iter().all(|&x| x == 0),
                "a step after the failure ran ({at})"
            );
        }
    }
}
