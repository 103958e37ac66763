//! Copy-out on a helper thread. A [`Queue`](crate::queue::Queue) whose
//! origin writes must wait for their chunks to be copied to the snapshots
//! hands the byte ranges to its copier and goes on receiving and completing
//! requests; the copier runs [`Cow::copy_out`](crate::snapshot::Cow::copy_out)
//! and makes its eventfd readable, which the queue's ring polls. Writes that
//! arrive meanwhile gather for the next copy-out, so a busy origin copies
//! in large groups without waiting for a timer.

use crate::batch::Batch;
use crate::device::Volume;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

type Ranges = Vec<(u64, u64)>;

pub struct Copier {
    jobs: Option<Sender<Ranges>>,
    results: Receiver<Result<(), i32>>,
    /// Readable once a job is done.
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Copier {
    /// A copier for `vol` (an origin with snapshots).
    pub fn start(vol: Arc<Volume>) -> io::Result<Copier> {
        let wake = Arc::new(EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK)?);
        let (jobs, job_rx) = channel::<Ranges>();
        let (result_tx, results) = channel();
        let woken = Arc::clone(&wake);
        let thread = std::thread::Builder::new()
            .name("devpool-copy-out".into())
            .spawn(move || {
                let mut batch = None;
                while let Ok(ranges) = job_rx.recv() {
                    let r = copy_out(&vol, &ranges, &mut batch);
                    if result_tx.send(r).is_err() {
                        return;
                    }
                    // Cannot fail short of a counter overflow (2^64 jobs).
                    let _ = woken.write(1);
                }
            })?;
        Ok(Copier {
            jobs: Some(jobs),
            results,
            wake,
            thread: Some(thread),
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

    /// The result of the job that made the wake descriptor readable, if it
    /// is done (the descriptor is reset).
    pub fn take_result(&self) -> Option<Result<(), i32>> {
        // EAGAIN (not readable yet) leaves nothing to reset.
        let _ = self.wake.read();
        self.results.try_recv().ok()
    }
}

fn copy_out(vol: &Volume, ranges: &[(u64, u64)], batch: &mut Option<Batch>) -> Result<(), i32> {
    let Some(cow) = &vol.cow else {
        return Ok(());
    };
    let b = match batch {
        Some(b) => b,
        None => batch.insert(Batch::new().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?),
    };
    cow.copy_out(&vol.devs, &vol.map, ranges, b)
}

impl Drop for Copier {
    /// The thread ends after the job it runs, if any.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
