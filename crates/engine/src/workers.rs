//! Threads kept for reuse: work that runs beside a commit (a lease's loop
//! devices attaching) starts many times a second in `devpool daemon`, and
//! starting and ending a thread each time cost as much as one attach. A
//! job runs on an idle thread when there is one, else on a new thread that
//! stays for the next job; a thread idle for a minute ends.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

/// Idle threads beyond this many end after their job.
const MAX_IDLE: usize = 16;
const IDLE_FOR: Duration = Duration::from_secs(60);

/// Idle threads, each waiting on its own channel.
static IDLE: Mutex<Vec<(u64, Sender<Job>)>> = Mutex::new(Vec::new());

fn idle() -> std::sync::MutexGuard<'static, Vec<(u64, Sender<Job>)>> {
    IDLE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A job's result, once it has run.
pub struct Handle<T>(Receiver<std::thread::Result<T>>);

impl<T> Handle<T> {
    /// Wait for the job (a panic in it goes on in the caller).
    pub fn join(self) -> T {
        match self.0.recv() {
            Ok(Ok(v)) => v,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            // The thread could not be started and the job was dropped.
            Err(_) => panic!("a worker thread could not be started"),
        }
    }
}

/// Run `f` on a spare thread.
pub fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Handle<T> {
    let (tx, rx) = channel();
    let job: Job = Box::new(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r);
    });
    let job = match idle().pop() {
        Some((_, worker)) => match worker.send(job) {
            Ok(()) => return Handle(rx),
            // That thread has gone (it cannot, short of a panic): start one.
            Err(std::sync::mpsc::SendError(job)) => job,
        },
        None => job,
    };
    start(job);
    Handle(rx)
}

/// Threads started so far (each one's id is its number).
static STARTED: AtomicU64 = AtomicU64::new(0);

fn start(first: Job) {
    let id = STARTED.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = channel::<Job>();
    let spawned = std::thread::Builder::new()
        .name("devpool-worker".into())
        .spawn(move || serve(id, first, tx, rx));
    // Could not start a thread: the job (inside the failed closure) was
    // dropped, and its Handle says so.
    drop(spawned);
}

fn serve(id: u64, first: Job, me: Sender<Job>, jobs: Receiver<Job>) {
    first();
    loop {
        {
            let mut idle = idle();
            if idle.len() >= MAX_IDLE {
                return;
            }
            idle.push((id, me.clone()));
        }
        let job = match jobs.recv_timeout(IDLE_FOR) {
            Ok(job) => job,
            Err(_) => {
                let mut idle = idle();
                match idle.iter().position(|(i, _)| *i == id) {
                    Some(at) => {
                        idle.remove(at);
                        return;
                    }
                    // Taken just now: its job is on the way.
                    None => {
                        drop(idle);
                        match jobs.recv() {
                            Ok(job) => job,
                            Err(_) => return,
                        }
                    }
                }
            }
        };
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: no other test in this binary uses the pool, so the idle
    // thread it sees is the one it left.
    #[test]
    fn jobs_answer_panics_reach_the_caller_and_idle_threads_are_reused() {
        let many: Vec<_> = (0..8).map(|i| spawn(move || i * 2)).collect();
        let got: Vec<i32> = many.into_iter().map(Handle::join).collect();
        assert_eq!(got, vec![0, 2, 4, 6, 8, 10, 12, 14]);

        let h = spawn(|| -> u32 { panic!("a job's panic") });
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.join()));
        assert!(r.is_err());

        // Wait until every thread started is idle again (none ends in a
        // test: fewer than MAX_IDLE, idle for less than IDLE_FOR).
        let wait_idle = || {
            let t = std::time::Instant::now();
            let all = || STARTED.load(Ordering::Relaxed) as usize;
            while idle().len() < all() && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(
                idle().len(),
                all(),
                "a thread is missing (the panicking job's?)"
            );
            idle().iter().map(|(id, _)| *id).collect::<Vec<_>>()
        };
        let before = wait_idle();
        assert!(!before.is_empty());
        let name = spawn(|| std::thread::current().name().map(String::from)).join();
        assert_eq!(name.as_deref(), Some("devpool-worker"));
        let after = wait_idle();
        let mut a = after.clone();
        let mut b = before.clone();
        a.sort();
        b.sort();
        assert_eq!(a, b, "the job ran on an idle thread, no new one");
    }
}
