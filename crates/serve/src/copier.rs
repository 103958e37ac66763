//! Copy-out on helper threads. A [`Queue`](crate::queue::Queue) whose
//! origin writes must wait for their chunks to be copied to the snapshots
//! hands the byte ranges to its copier and goes on receiving and completing
//! requests. The copier is a two-stage pipeline: one thread reads a group's
//! origin chunks ([`Cow::copy_read`](crate::snapshot::Cow::copy_read)) while
//! the other writes and syncs the group before it
//! ([`Cow::copy_commit`](crate::snapshot::Cow::copy_commit)); the disk
//! reads for the next group instead of idling through the syncs. Results
//! come back in the order the jobs were sent, each making the eventfd
//! readable, which the queue's ring polls. Writes that arrive meanwhile
//! gather for the next job, so a busy origin copies in large groups without
//! waiting for a timer.

use crate::batch::Batch;
use crate::device::Volume;
use crate::snapshot::CopyGroup;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

type Ranges = Vec<(u64, u64)>;

/// Jobs the queue keeps in the pipeline at once: one reading, one
/// committing.
pub const DEPTH: usize = 2;

pub struct Copier {
    jobs: Option<Sender<Ranges>>,
    results: Receiver<Result<(), i32>>,
    /// Readable once a job is done.
    wake: Arc<EventFd>,
    threads: Vec<JoinHandle<()>>,
}

impl Copier {
    /// A copier for `vol` (an origin with snapshots).
    pub fn start(vol: Arc<Volume>) -> io::Result<Copier> {
        let wake = Arc::new(EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK)?);
        let (jobs, job_rx) = channel::<Ranges>();
        let (read_tx, read_rx) = channel::<Result<Option<CopyGroup>, i32>>();
        let (result_tx, results) = channel();
        let reader_vol = Arc::clone(&vol);
        let reader = stage(
            "devpool-copy-read",
            job_rx,
            read_tx,
            move |ranges, batch| {
                let v = &reader_vol;
                match (&v.cow, ring(batch)) {
                    (None, _) => Ok(None),
                    (Some(_), Err(errno)) => Err(errno),
                    (Some(cow), Ok(b)) => cow.copy_read(&v.devs, &v.map, &ranges, b),
                }
            },
            || {},
        )?;
        let woken = Arc::clone(&wake);
        // Ends when the reader does (its sender dropped).
        let committer = stage(
            "devpool-copy-commit",
            read_rx,
            result_tx,
            move |read, batch| match (read, &vol.cow) {
                (Ok(Some(group)), Some(cow)) => match ring(batch) {
                    Ok(b) => cow.copy_commit(&vol.devs, group, b),
                    Err(errno) => {
                        cow.copy_abandon(&group);
                        Err(errno)
                    }
                },
                (Ok(_), _) => Ok(()),
                (Err(errno), _) => Err(errno),
            },
            move || {
                // Cannot fail short of a counter overflow (2^64 jobs).
                let _ = woken.write(1);
            },
        );
        let committer = match committer {
            Ok(t) => t,
            Err(e) => {
                // The reader ends once its job channel is gone.
                drop(jobs);
                let _ = reader.join();
                return Err(e);
            }
        };
        Ok(Copier {
            jobs: Some(jobs),
            results,
            wake,
            threads: vec![reader, committer],
        })
    }

    /// The descriptor to poll for a finished job.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Start copying out the chunks `ranges` of the origin reach.
    pub fn send(&self, ranges: Ranges) -> Result<(), i32> {
        match &self.jobs {
            Some(j) => j.send(ranges).map_err(|_| libc::EIO),
            None => Err(libc::EIO),
        }
    }

    /// The results of the jobs done since the last call, oldest first (the
    /// wake descriptor is reset).
    pub fn take_results(&self) -> Vec<Result<(), i32>> {
        // Reset first: a job that ends after this makes it readable again.
        // EAGAIN (not readable yet) leaves nothing to reset.
        let _ = self.wake.read();
        self.results.try_iter().collect()
    }
}

/// One stage of the pipeline on a thread of its own: `work` on each item
/// from `input`, with the thread's batch ring, its outcome sent on, then
/// `sent`. Ends when either neighbour is gone.
fn stage<I: Send + 'static, O: Send + 'static>(
    name: &str,
    input: Receiver<I>,
    output: Sender<O>,
    mut work: impl FnMut(I, &mut Option<Batch>) -> O + Send + 'static,
    sent: impl Fn() + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let mut batch = None;
            while let Ok(item) = input.recv() {
                if output.send(work(item, &mut batch)).is_err() {
                    return;
                }
                sent();
            }
        })
}

/// This thread's batch ring, made on first use.
fn ring(batch: &mut Option<Batch>) -> Result<&mut Batch, i32> {
    match batch {
        Some(b) => Ok(b),
        None => Ok(batch.insert(Batch::new().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?)),
    }
}

impl Drop for Copier {
    /// The threads end after the jobs they run, if any.
    fn drop(&mut self) {
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
