//! When serving ends: a [`Stopper`] every worker waits on (an eventfd their
//! rings poll, plus listening sockets to shut down), set by SIGINT/SIGTERM/
//! SIGHUP or by the lease watch when the lease is released or its owner dies.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EventFd};

pub struct Stopper {
    efd: EventFd,
    stopped: AtomicBool,
    wake: Mutex<Vec<RawFd>>,
    reason: Mutex<Option<String>>,
}

impl Stopper {
    pub fn new() -> io::Result<Arc<Stopper>> {
        Ok(Arc::new(Stopper {
            efd: EventFd::new(EFD_CLOEXEC)?,
            stopped: AtomicBool::new(false),
            wake: Mutex::new(Vec::new()),
            reason: Mutex::new(None),
        }))
    }

    /// The eventfd that becomes readable on stop (rings poll it).
    pub fn fd(&self) -> RawFd {
        self.efd.as_raw_fd()
    }

    /// Shut this socket down on stop (wakes a blocked `accept`).
    pub fn shutdown_on_stop(&self, fd: RawFd) {
        if let Ok(mut w) = self.wake.lock() {
            w.push(fd);
        }
        if self.is_stopped() {
            // SAFETY: shutdown on a descriptor the caller owns.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    pub fn stop(&self, reason: &str) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Ok(mut r) = self.reason.lock() {
            *r = Some(reason.to_string());
        }
        // Cannot fail short of a counter overflow.
        let _ = self.efd.write(1);
        if let Ok(w) = self.wake.lock() {
            for fd in w.iter() {
                // SAFETY: as above.
                unsafe { libc::shutdown(*fd, libc::SHUT_RDWR) };
            }
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<String> {
        self.reason.lock().ok().and_then(|r| r.clone())
    }

    /// Sleep until stopped, or `d` passes; true when stopped.
    pub fn wait_timeout(&self, d: Duration) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd.
        unsafe { libc::poll(&mut p, 1, d.as_millis().min(i32::MAX as u128) as i32) };
        self.is_stopped()
    }
}

/// Block SIGINT, SIGTERM and SIGHUP in this thread (and the threads it starts
/// later) and stop `stopper` when one arrives. Call before starting workers.
pub fn stop_on_signals(stopper: Arc<Stopper>) -> io::Result<()> {
    // SAFETY: plain signal-mask manipulation on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        set
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let mut sig = 0;
                // SAFETY: sigwait on the set blocked above.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    let name = match sig {
                        libc::SIGINT => "SIGINT",
                        libc::SIGTERM => "SIGTERM",
                        _ => "SIGHUP",
                    };
                    stopper.stop(&format!("received {name}"));
                }
            }
        })?;
    Ok(())
}

/// Check `still_valid` every `interval` until it returns a reason to stop
/// (lease released, owner gone) or the stopper is set otherwise.
pub fn watch(
    stopper: Arc<Stopper>,
    interval: Duration,
    still_valid: impl Fn() -> Option<String> + Send + 'static,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("lease-watch".into())
        .spawn(move || {
            while !stopper.wait_timeout(interval) {
                if let Some(why) = still_valid() {
                    stopper.stop(&why);
                    return;
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_stops_serving_when_the_check_says_so() {
        let s = Stopper::new().unwrap();
        let n = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let n2 = Arc::clone(&n);
        let h = watch(Arc::clone(&s), Duration::from_millis(5), move || {
            (n2.fetch_add(1, Ordering::SeqCst) >= 2).then(|| "lease released".to_string())
        })
        .unwrap();
        h.join().unwrap();
        assert!(s.is_stopped());
        assert_eq!(s.reason().as_deref(), Some("lease released"));
        assert!(s.wait_timeout(Duration::from_millis(1)));
    }
}
