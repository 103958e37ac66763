//! Origin writes answered before they reach the volume, and what every
//! other request on that volume must wait for because of them.
//!
//! A first write to a snapshotted origin waits for a chain of device steps
//! (origin chunk read, COW write, sync, exception record, sync) before it may
//! touch the origin; a client with a bounded queue then spends its time
//! waiting. A write without FUA promises no durability until a flush (NBD and
//! virtio both say so), so an NBD connection may copy the data, answer at
//! once and let the chain run behind (a volatile write cache, as a disk has).
//! What that owes the client, on every queue serving the volume:
//!
//! - a read, write, discard or zeroing that overlaps an answered write waits
//!   until that write is on the origin (reads see it, later writes land
//!   after it);
//! - a flush waits until every write answered before it is on the origin,
//!   then syncs; a deferred write that failed fails the next flush (EIO), as
//!   a disk reports a lost cached write;
//! - memory is bounded ([`LIMIT_BYTES`]): past it, writes wait for their
//!   chain as before.
//!
//! The [`Queue`](crate::queue::Queue) that answered a write runs its chain;
//! this registry only records it, volume-wide, and wakes queues whose
//! requests wait for it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// Answered-but-unwritten bytes per volume at most.
pub const LIMIT_BYTES: u64 = 16 << 20;

#[derive(Debug, Default)]
struct State {
    /// Answered writes by offset, `(len, id)`: never overlapping each other.
    by_offset: BTreeMap<u64, (u64, u64)>,
    /// The same by number: the offset.
    by_id: BTreeMap<u64, u64>,
    next_id: u64,
    bytes: u64,
    /// A deferred write failed since the last flush reported it.
    failed: Option<i32>,
    /// Queues with requests waiting; each is woken (once) when an entry ends.
    waiters: Vec<Arc<EventFd>>,
}

/// Where a waiting request stands: it waits for the entries numbered below
/// `before` that overlap it (all of them for a flush).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    pub before: u64,
    pub offset: u64,
    pub len: u64,
    /// A flush: waits for every entry, whatever its range.
    pub all: bool,
}

#[derive(Debug, Default)]
pub struct Deferred {
    state: Mutex<State>,
}

impl Deferred {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is consistent between statements: a panic elsewhere
        // left nothing half-updated.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What a request on `offset..offset+len` (a flush if `all`) arriving now
    /// must wait for, or `None` if nothing: then it may go ahead at once.
    pub fn wait_for(&self, offset: u64, len: u64, all: bool) -> Option<Wait> {
        let st = self.lock();
        let w = Wait {
            before: st.next_id,
            offset,
            len,
            all,
        };
        blocks(&st, &w).then_some(w)
    }

    /// Whether `w` still waits; if so, `waker` is woken when an entry ends
    /// (checked and registered under one lock: no wake-up is lost).
    pub fn still_waits(&self, w: &Wait, waker: &Arc<EventFd>) -> bool {
        let mut st = self.lock();
        if !blocks(&st, w) {
            return false;
        }
        if !st.waiters.iter().any(|x| Arc::ptr_eq(x, waker)) {
            st.waiters.push(Arc::clone(waker));
        }
        true
    }

    /// Record a write about to be answered early, if the budget allows and
    /// nothing answered earlier overlaps it (that one must land first);
    /// its number.
    pub fn admit(&self, offset: u64, len: u64) -> Option<u64> {
        let mut st = self.lock();
        if st.bytes + len > LIMIT_BYTES || overlapping(&st, offset, len).next().is_some() {
            return None;
        }
        let id = st.next_id;
        st.next_id += 1;
        st.bytes += len;
        st.by_offset.insert(offset, (len, id));
        st.by_id.insert(id, offset);
        Some(id)
    }

    /// Entry `id` reached the origin (`errno` 0) or failed to.
    pub fn finish(&self, id: u64, errno: i32) {
        let mut st = self.lock();
        if let Some(offset) = st.by_id.remove(&id)
            && let Some((len, _)) = st.by_offset.remove(&offset)
        {
            st.bytes -= len;
        }
        if errno != 0 {
            st.failed = Some(errno);
        }
        for w in st.waiters.drain(..) {
            // Cannot fail short of a counter overflow.
            let _ = w.write(1);
        }
    }

    /// The failure a flush must report (once), if a deferred write failed.
    pub fn take_failure(&self) -> Option<i32> {
        self.lock().failed.take()
    }

    /// How many answered writes have not reached the origin yet.
    pub fn pending(&self) -> usize {
        self.lock().by_id.len()
    }
}

/// The numbers of the entries overlapping `offset..offset+len`.
fn overlapping(st: &State, offset: u64, len: u64) -> impl Iterator<Item = u64> + '_ {
    let end = offset.saturating_add(len);
    // Disjoint and sorted: walk down from the last one starting before the
    // end until one ends at or before the start.
    st.by_offset
        .range(..end)
        .rev()
        .take_while(move |(at, (n, _))| *at + *n > offset)
        .map(|(_, (_, id))| *id)
}

fn blocks(st: &State, w: &Wait) -> bool {
    if w.all {
        return st.by_id.keys().next().is_some_and(|&id| id < w.before);
    }
    overlapping(st, w.offset, w.len).any(|id| id < w.before)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK};

    #[test]
    fn requests_wait_only_for_overlapping_earlier_writes_and_are_woken() {
        let d = Deferred::default();
        let a = d.admit(4096, 4096).unwrap();
        // An overlapping write is not answered early: it must land after a.
        assert_eq!(d.admit(6000, 10), None);
        let b = d.admit(16384, 4096).unwrap();
        assert_eq!(
            d.wait_for(0, 4096, false),
            None,
            "adjacent, not overlapping"
        );
        let read = d.wait_for(8000, 200, false).unwrap();
        let flush = d.wait_for(0, 0, true).unwrap();
        let waker = Arc::new(EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK).unwrap());
        assert!(d.still_waits(&read, &waker));
        // A write answered after the read arrived does not hold the read.
        let c = d.admit(8192, 4096).unwrap();
        d.finish(a, 0);
        assert_eq!(waker.read().unwrap(), 1);
        assert!(!d.still_waits(&read, &waker));
        assert!(d.still_waits(&flush, &waker));
        d.finish(b, libc::EIO);
        assert!(!d.still_waits(&flush, &waker), "c came after the flush");
        assert_eq!(d.take_failure(), Some(libc::EIO));
        assert_eq!(d.take_failure(), None, "reported once");
        assert_eq!(d.pending(), 1);
        d.finish(c, 0);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn the_budget_bounds_answered_bytes() {
        let d = Deferred::default();
        let n = LIMIT_BYTES / 4096;
        let ids: Vec<u64> = (0..n).map(|i| d.admit(i * 4096, 4096).unwrap()).collect();
        assert_eq!(d.admit(n * 4096, 4096), None);
        d.finish(ids[0], 0);
        assert!(d.admit(n * 4096, 4096).is_some());
    }
}
