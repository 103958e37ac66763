//! The block-I/O core: one io_uring per worker, many requests in flight.
//! A request on the volume is cut by the [`VolumeMap`](crate::map::VolumeMap)
//! into pieces, each one SQE on its device; the request completes when all
//! its pieces have. Frontends (NBD, vhost-user-blk, FUSE) only translate
//! their protocol into [`Request`]s and completions into replies; they may add
//! their own SQEs (socket receives, wake-ups) to the same ring so one
//! `io_uring_enter` waits for everything.

use crate::buffer::AlignedBuf;
use crate::copier::{self, Copier};
use crate::deferred::Wait;
use crate::device::Volume;
use crate::map::{MapError, Piece};
use io_uring::{IoUring, opcode, squeue, types};
use slab::Slab;
use std::collections::{HashMap, VecDeque};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use vmm_sys_util::eventfd::{EFD_CLOEXEC, EFD_NONBLOCK, EventFd};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write {
        fua: bool,
    },
    Flush,
    /// Give the range back (punch a hole / BLKDISCARD); reads after it return
    /// zeroes on image files and unspecified data on devices.
    Discard,
    /// Make the range read as zeroes; `may_trim` allows deallocating it.
    WriteZeroes {
        may_trim: bool,
        fua: bool,
    },
}

impl Op {
    /// Whether it changes the volume's contents.
    pub fn writes(self) -> bool {
        matches!(
            self,
            Op::Write { .. } | Op::WriteZeroes { .. } | Op::Discard
        )
    }
}

/// One request on the volume. For reads and writes `iov` describes `len`
/// bytes of memory that must stay valid until the request completes.
#[derive(Debug)]
pub struct Request {
    pub op: Op,
    pub offset: u64,
    pub len: u64,
    pub iov: Vec<libc::iovec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    /// 0 or a positive errno.
    pub errno: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Done(Completion),
    /// A frontend's own SQE completed: its user data (without the marker) and result.
    Foreign {
        data: u64,
        result: i32,
    },
}

const FOREIGN: u64 = 1 << 63;
/// The user data of the poll on the copier's wake descriptor.
const COPIED: u64 = 1 << 62;
/// The user data of the poll on the descriptor that says a deferred write
/// ended (see `deferred`).
const WOKEN: u64 = 1 << 61;
/// The tag of a write this queue answered early: `EARLY | its entry number`
/// (frontend tags are small).
const EARLY: u64 = 1 << 63;
/// How long [`Queue::wait`] spins for a completion while I/O is in flight:
/// [`SPIN_PER_REQUEST`] for each request in flight, at least [`SPIN`] and at
/// most [`SPIN_MAX`] (see [`spin_while_in_flight`]).
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);
const SPIN_PER_REQUEST: std::time::Duration = std::time::Duration::from_micros(20);
const SPIN_MAX: std::time::Duration = std::time::Duration::from_micros(600);
/// How long it spins for a frontend's next request with nothing in flight,
/// when the frontend asked for it ([`Queue::spin_for_requests`]).
const SPIN_FOR_REQUESTS: std::time::Duration = std::time::Duration::from_micros(200);

/// Queues spinning right now, process-wide.
static SPINNING: AtomicUsize = AtomicUsize::new(0);

/// How many queues may spin at once: half the CPUs (one of two here), so
/// that spinning never takes the CPU the clients and the other queues need.
fn spin_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)))
}

/// How long to spin for a completion with `in_flight` requests out. A deep
/// queue is worth a spin as long as the device takes to answer (a few hundred
/// microseconds here): the device answers in batches, and a thread asleep
/// when one lands is woken through a halted vCPU, which on a virtual machine
/// costs tens of microseconds while the device sits idle (measured: 4 KiB
/// reads at depth 32 over NBD, 54.6k IOPS with 50 us, 62.4k with this, in
/// six interleaved pairs). The spin grows only with the requests it serves:
/// a shallow queue spins no longer than [`SPIN`], and nothing in flight
/// means no spin at all unless the frontend asked for one.
fn spin_while_in_flight(in_flight: usize) -> std::time::Duration {
    let n = u32::try_from(in_flight).unwrap_or(u32::MAX);
    SPIN_PER_REQUEST.saturating_mul(n).clamp(SPIN, SPIN_MAX)
}

/// The right to spin, held while a queue spins.
struct SpinTurn(&'static AtomicUsize);

impl SpinTurn {
    /// A turn, if fewer than `limit` of `spinning` are taken.
    fn take(spinning: &'static AtomicUsize, limit: usize) -> Option<SpinTurn> {
        spinning
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| SpinTurn(spinning))
    }
}

impl Drop for SpinTurn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Slot {
    tag: u64,
    remaining: u32,
    errno: i32,
    /// Each part's iovec array (the kernel reads it at submission; kept until
    /// completion to be safe with async punts) and expected byte count.
    parts: Vec<(Box<[libc::iovec]>, u32)>,
    /// Flush all devices once the parts are done (FUA for zeroing).
    then_flush: bool,
}

pub struct Queue {
    ring: IoUring,
    /// The ring defers completion work and flags it (see
    /// [`Queue::new_for_this_thread`]).
    taskrun_flag: bool,
    vol: Arc<Volume>,
    slots: Slab<Slot>,
    scratch: Vec<Piece>,
    ready: Vec<Completion>,
    /// SQEs pushed since the last submit.
    unsubmitted: usize,
    /// Origin writes waiting for their chunks to be copied out to the
    /// snapshots (all of them in the next copy-out).
    held: Vec<(u64, Request)>,
    /// Origin writes whose chunks the copier is copying out now, a group
    /// per job, oldest first (at most [`copier::DEPTH`] groups).
    copying: VecDeque<Vec<(u64, Request)>>,
    /// A poll on the copier's wake descriptor is in the ring.
    copier_polled: bool,
    /// The copy-out's helper thread, started on first use.
    copier: Option<Copier>,
    /// Requests waiting for writes answered early to reach the origin.
    waiting: Vec<(u64, Request, Wait)>,
    /// The data of this queue's writes answered early, by entry number.
    early: HashMap<u64, AlignedBuf>,
    /// Whether origin writes may be answered before their copy-out: only for
    /// a frontend that keeps calling [`Queue::wait`] while anything is in
    /// flight (an NBD connection), so their chains always move on.
    answer_early: bool,
    /// See [`Queue::spin_for_requests`].
    spin_for_requests: bool,
    /// Made readable when a deferred write ends while `waiting` is not empty.
    woken: Option<Arc<EventFd>>,
    woken_polled: bool,
}

// SAFETY: the raw pointers a Queue holds are iovecs into memory whose
// lifetime the caller of `submit` guarantees; which thread drives the ring
// does not change that.
unsafe impl Send for Queue {}

const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;
/// BLKDISCARD: `_IO(0x12, 119)`.
const BLKDISCARD: libc::c_ulong = 0x1277;

impl Queue {
    pub fn new(vol: Arc<Volume>, depth: u32) -> std::io::Result<Queue> {
        let ring = IoUring::new(depth.next_power_of_two().max(8))?;
        Ok(Queue::with_ring(vol, ring, false))
    }

    /// A queue that only the calling thread ever submits to and waits on
    /// (an NBD connection's). Its ring defers completion work until that
    /// thread asks for events: no interrupt of the thread per completion,
    /// and a wait that spins reads a flag instead of entering the kernel.
    /// Kernels before 6.1 get an ordinary ring.
    pub fn new_for_this_thread(vol: Arc<Volume>, depth: u32) -> std::io::Result<Queue> {
        let entries = depth.next_power_of_two().max(8);
        let deferred = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(entries);
        match deferred {
            Ok(ring) => Ok(Queue::with_ring(vol, ring, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Queue::new(vol, depth),
            Err(e) => Err(e),
        }
    }

    fn with_ring(vol: Arc<Volume>, ring: IoUring, taskrun_flag: bool) -> Queue {
        Queue {
            ring,
            taskrun_flag,
            vol,
            slots: Slab::new(),
            scratch: Vec::new(),
            ready: Vec::new(),
            unsubmitted: 0,
            held: Vec::new(),
            copying: VecDeque::new(),
            copier_polled: false,
            copier: None,
            waiting: Vec::new(),
            early: HashMap::new(),
            answer_early: false,
            spin_for_requests: false,
            woken: None,
            woken_polled: false,
        }
    }

    /// Spin briefly for the frontend's next request after handling one, as
    /// for a completion (an NBD connection: its client answers within a
    /// few hundred microseconds while busy). A thread that sleeps there is
    /// woken by the client, and the scheduler then tends to run it on the
    /// client's CPU: the two take turns on one core while the other idles
    /// (on this 2-vCPU machine, 4k randread at depth 32 fell from about 40k
    /// to 30k IOPS whenever that happened).
    pub fn spin_for_requests(&mut self) {
        self.spin_for_requests = true;
    }

    /// Let this queue answer plain (non-FUA) first writes to a snapshotted
    /// origin once it holds their data, before their copy-out (see
    /// `deferred`). The frontend must keep calling [`Queue::wait`] while
    /// [`Queue::in_flight`] is not zero, answered writes included.
    pub fn answer_writes_early(&mut self) {
        self.answer_early = true;
    }

    /// Requests submitted and not yet reported, and writes answered early
    /// that have not reached the volume yet.
    pub fn in_flight(&self) -> usize {
        self.slots.len()
            + self.ready.len()
            + self.held.len()
            + self.copying.iter().map(Vec::len).sum::<usize>()
            + self.waiting.len()
    }

    fn push(&mut self, e: squeue::Entry) {
        loop {
            // SAFETY: every SQE built here points at memory owned by a slot
            // or guaranteed by the caller of submit() until completion.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                self.unsubmitted += 1;
                return;
            }
            // Queue full: hand what we have to the kernel and retry.
            if self.ring.submit().is_ok() {
                self.unsubmitted = 0;
            }
        }
    }

    /// Hand queued requests to the kernel now, without waiting.
    pub fn hand_over(&mut self) {
        if self.unsubmitted > 0 && self.ring.submit().is_ok() {
            self.unsubmitted = 0;
        }
    }

    /// Add a frontend's own SQE (its user data must be below 2^63).
    ///
    /// # Safety
    /// Whatever memory the entry points at must stay valid until its
    /// [`Event::Foreign`] is reported.
    pub unsafe fn push_foreign(&mut self, e: squeue::Entry, data: u64) {
        self.push(e.user_data(data | FOREIGN));
    }

    /// Start a request; its [`Completion`] carries `tag`. Requests outside the
    /// volume, or writes to a read-only one, fail at once with an errno.
    ///
    /// # Safety
    /// `req.iov` must describe memory valid (and, for reads, writable) until
    /// the request's completion is reported.
    pub unsafe fn submit(&mut self, tag: u64, req: Request) -> Result<(), i32> {
        let writes = req.op.writes();
        if writes && self.vol.read_only {
            return Err(libc::EPERM);
        }
        let vol = Arc::clone(&self.vol);
        if let Some(cow) = vol.cow.as_ref().filter(|c| !c.snapshot) {
            // Nothing may pass a write answered early that it overlaps (a
            // flush: any write answered before it).
            let all = req.op == Op::Flush;
            if let Some(w) = cow.deferred.wait_for(req.offset, req.len, all) {
                self.waiting.push((tag, req, w));
                return Ok(());
            }
        }
        // SAFETY: passed on from our caller.
        unsafe { self.submit_now(tag, req) }
    }

    /// [`Queue::submit`] of a request that waits for no deferred write.
    ///
    /// # Safety
    /// As [`Queue::submit`].
    unsafe fn submit_now(&mut self, tag: u64, req: Request) -> Result<(), i32> {
        let writes = req.op.writes();
        let vol = Arc::clone(&self.vol);
        if req.op == Op::Flush {
            // A write answered early that failed fails the flush after it.
            if let Some(errno) = vol.cow.as_ref().and_then(|c| c.deferred.take_failure()) {
                self.ready.push(Completion { tag, errno });
                return Ok(());
            }
            // A thin volume's provisioned mappings are part of its data.
            if let Some(Err(errno)) = vol.thin.as_ref().map(|t| t.flush(&vol.devs)) {
                self.ready.push(Completion { tag, errno });
                return Ok(());
            }
            let key = self.slots.insert(Slot {
                tag,
                remaining: 0,
                errno: 0,
                parts: Vec::new(),
                then_flush: false,
            });
            self.push_flush(key);
            return Ok(());
        }
        if let Some(sum) = iov_total(&req.iov)
            && matches!(req.op, Op::Read | Op::Write { .. })
            && sum != req.len
        {
            return Err(libc::EINVAL);
        }
        if let Some(thin) = &vol.thin {
            if vol.check(req.offset, req.len).is_err() {
                return Err(if writes { libc::ENOSPC } else { libc::EINVAL });
            }
            let write = matches!(req.op, Op::Write { .. });
            // A FUA write must not complete before uncommitted mappings do.
            let fua_commit = req.op == Op::Write { fua: true } && thin.dirty();
            if matches!(req.op, Op::Read | Op::Write { .. })
                && !fua_commit
                && let Some(plan) = thin.plan(req.offset, req.len, write)
            {
                for (at, n) in plan.zeroes {
                    for v in slice_iov(&req.iov, at, n).iter() {
                        // SAFETY: the caller keeps the read buffers valid and writable.
                        unsafe { std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) };
                    }
                }
                // SAFETY: passed on from our caller.
                return unsafe { self.submit_pieces(tag, req, plan.pieces) };
            }
            // SAFETY: the caller keeps the iovecs valid until completion,
            // and this completes before returning.
            let errno = unsafe { thin_request(thin, &vol, &req) };
            self.ready.push(Completion { tag, errno });
            return Ok(());
        }
        if let Some(cow) = &vol.cow {
            if vol.map.check(req.offset, req.len).is_err() {
                return Err(if writes { libc::ENOSPC } else { libc::EINVAL });
            }
            if cow.snapshot {
                // SAFETY: the caller keeps the iovecs valid until completion,
                // and this completes before returning.
                let errno = unsafe { snapshot_request(cow, &vol, &req) };
                self.ready.push(Completion { tag, errno });
                return Ok(());
            }
            if writes && cow.needs_copy_out(vol.size(), req.offset, req.len) {
                // Their completions must fit the completion queue (twice
                // the submission queue) beside the frontend's own requests.
                let room = self.early.len() < self.ring.params().sq_entries() as usize;
                let early = self.answer_early && room && req.op == (Op::Write { fua: false });
                if let Some(id) = early
                    .then(|| cow.deferred.admit(req.offset, req.len))
                    .flatten()
                {
                    // SAFETY: the caller's iovecs are valid now.
                    let buf = unsafe { gather(&req.iov) };
                    let iov = vec![libc::iovec {
                        iov_base: buf.as_ptr() as *mut _,
                        iov_len: req.len as usize,
                    }];
                    // The buffer's memory stays put while `early` owns it.
                    self.early.insert(id, buf);
                    self.held.push((EARLY | id, Request { iov, ..req }));
                    self.ready.push(Completion { tag, errno: 0 });
                    return Ok(());
                }
                self.held.push((tag, req));
                return Ok(());
            }
        }
        // SAFETY: passed on from our caller.
        unsafe { self.submit_mapped(tag, req) }
    }

    /// Start a request already checked (and, for an origin, copied out).
    ///
    /// # Safety
    /// As [`Queue::submit`].
    unsafe fn submit_mapped(&mut self, tag: u64, req: Request) -> Result<(), i32> {
        let writes = req.op.writes();
        let vol = Arc::clone(&self.vol);
        let mut pieces = std::mem::take(&mut self.scratch);
        pieces.clear();
        if let Err(MapError::OutOfRange { .. }) = vol.map.pieces(req.offset, req.len, &mut pieces) {
            self.scratch = pieces;
            return Err(if writes { libc::ENOSPC } else { libc::EINVAL });
        }
        // SAFETY: passed on from our caller.
        unsafe { self.submit_pieces(tag, req, pieces) }
    }

    /// Start a request whose device pieces are known.
    ///
    /// # Safety
    /// As [`Queue::submit`].
    unsafe fn submit_pieces(
        &mut self,
        tag: u64,
        req: Request,
        pieces: Vec<Piece>,
    ) -> Result<(), i32> {
        let vol = Arc::clone(&self.vol);
        let key = self.slots.insert(Slot {
            tag,
            remaining: 0,
            errno: 0,
            parts: Vec::with_capacity(pieces.len()),
            then_flush: matches!(req.op, Op::WriteZeroes { fua: true, .. }),
        });
        for p in &pieces {
            let dev = &vol.devs[p.dev];
            let part = self.slots[key].parts.len() as u64;
            let data = key as u64 | part << 32;
            match req.op {
                Op::Read | Op::Write { .. } => {
                    let iov = slice_iov(&req.iov, p.at, p.len);
                    let fd = dev.fd_for(|a| {
                        p.offset % a == 0
                            && iov.iter().all(|v| {
                                (v.iov_base as u64).is_multiple_of(a)
                                    && (v.iov_len as u64).is_multiple_of(a)
                            })
                    });
                    let e = if req.op == Op::Read {
                        opcode::Readv::new(types::Fd(fd), iov.as_ptr(), iov.len() as u32)
                            .offset(p.offset)
                            .build()
                    } else {
                        let fua = matches!(req.op, Op::Write { fua: true });
                        opcode::Writev::new(types::Fd(fd), iov.as_ptr(), iov.len() as u32)
                            .offset(p.offset)
                            .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                            .build()
                    };
                    let slot = &mut self.slots[key];
                    slot.parts.push((iov, p.len as u32));
                    slot.remaining += 1;
                    self.push(e.user_data(data));
                }
                Op::Discard if dev.is_block => {
                    let range = [p.offset, p.len];
                    // SAFETY: BLKDISCARD reads two u64s.
                    let r = unsafe { libc::ioctl(dev.any_fd(), BLKDISCARD, range.as_ptr()) };
                    if r != 0 {
                        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(5);
                        self.slots[key].errno = errno;
                    }
                }
                Op::Discard | Op::WriteZeroes { .. } => {
                    let mode = match req.op {
                        Op::WriteZeroes { may_trim: true, .. } | Op::Discard if !dev.is_block => {
                            FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                        }
                        _ => FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                    };
                    let e = opcode::Fallocate::new(types::Fd(dev.any_fd()), p.len)
                        .offset(p.offset)
                        .mode(mode)
                        .build();
                    let slot = &mut self.slots[key];
                    slot.parts.push((Box::new([]), 0));
                    slot.remaining += 1;
                    self.push(e.user_data(data));
                }
                Op::Flush => {}
            }
        }
        self.scratch = pieces;
        let slot = &self.slots[key];
        if slot.remaining == 0 {
            self.part_done(key);
        }
        Ok(())
    }

    fn push_flush(&mut self, key: usize) {
        let vol = Arc::clone(&self.vol);
        for dev in &vol.devs {
            let slot = &mut self.slots[key];
            let part = slot.parts.len() as u64;
            slot.parts.push((Box::new([]), 0));
            slot.remaining += 1;
            let e = opcode::Fsync::new(types::Fd(dev.any_fd()))
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(key as u64 | part << 32);
            self.push(e);
        }
        if vol.devs.is_empty() {
            self.part_done(key);
        }
    }

    /// A slot with no parts left: finish it (or start its trailing flush).
    fn part_done(&mut self, key: usize) {
        let slot = &mut self.slots[key];
        if slot.remaining > 0 {
            return;
        }
        if slot.then_flush && slot.errno == 0 {
            slot.then_flush = false;
            self.push_flush(key);
            return;
        }
        let slot = self.slots.remove(key);
        self.complete(slot.tag, slot.errno);
    }

    /// Report a request done; a write answered early is only recorded.
    fn complete(&mut self, tag: u64, errno: i32) {
        if tag & EARLY == 0 {
            self.ready.push(Completion { tag, errno });
            return;
        }
        let id = tag & !EARLY;
        self.early.remove(&id);
        if let Some(cow) = &self.vol.cow {
            if errno != 0 {
                eprintln!(
                    "devpool: {}: a write answered before its copy-out failed ({}); the next flush reports it",
                    self.vol.name,
                    std::io::Error::from_raw_os_error(errno)
                );
            }
            cow.deferred.finish(id, errno);
        }
    }

    /// Start the waiting requests whose deferred writes have landed; be
    /// woken when one of the others' does.
    fn release_waiting(&mut self) {
        if self.waiting.is_empty() {
            return;
        }
        let vol = Arc::clone(&self.vol);
        let Some(cow) = &vol.cow else {
            return;
        };
        let waker = match &self.woken {
            Some(w) => Arc::clone(w),
            None => match EventFd::new(EFD_CLOEXEC | EFD_NONBLOCK) {
                Ok(e) => Arc::clone(self.woken.insert(Arc::new(e))),
                Err(e) => {
                    let errno = e.raw_os_error().unwrap_or(libc::EIO);
                    for (tag, _, _) in std::mem::take(&mut self.waiting) {
                        self.complete(tag, errno);
                    }
                    return;
                }
            },
        };
        for (tag, req, w) in std::mem::take(&mut self.waiting) {
            if cow.deferred.still_waits(&w, &waker) {
                self.waiting.push((tag, req, w));
                continue;
            }
            // SAFETY: the frontend keeps the memory valid until completion.
            if let Err(errno) = unsafe { self.submit_now(tag, req) } {
                self.complete(tag, errno);
            }
        }
        if !self.waiting.is_empty() && !self.woken_polled {
            self.poll_readable(waker.as_raw_fd(), WOKEN);
            self.woken_polled = true;
        }
    }

    /// Submit what is queued and wait until at least `min` events are
    /// available (0: do not wait); append them to `out`.
    pub fn wait(&mut self, min: usize, out: &mut Vec<Event>) -> std::io::Result<()> {
        self.release_waiting();
        if self.thin_commit_wait(min, out)? {
            return Ok(());
        }
        self.start_copy();
        let mut want = if self.ready.is_empty() { min } else { 0 };
        let spin = if !self.slots.is_empty() {
            Some(spin_while_in_flight(self.slots.len()))
        } else {
            self.spin_for_requests.then_some(SPIN_FOR_REQUESTS)
        };
        // Spin briefly before sleeping, while I/O is in flight or a
        // frontend's client is expected back. On a virtual machine, waking a
        // halted vCPU costs far more than a device completion. The spin is
        // bounded and needs a wake to start again: an idle queue sleeps.
        if let Some(spin) = spin.filter(|_| want > 0)
            && let Some(_turn) = SpinTurn::take(&SPINNING, spin_limit())
        {
            let t = std::time::Instant::now();
            while t.elapsed() < spin {
                // A submit with no wait also runs pending completion work;
                // a deferring ring says when there is some.
                let enter =
                    !self.taskrun_flag || self.unsubmitted > 0 || self.ring.submission().taskrun();
                if enter && self.ring.submit().is_ok() {
                    self.unsubmitted = 0;
                }
                if !self.ring.completion().is_empty() {
                    want = 0;
                    break;
                }
                std::hint::spin_loop();
            }
        }
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                    if want == 0 {
                        break;
                    }
                }
                // Completion queue full: reap first, then submit again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                Err(e) => return Err(e),
            }
        }
        self.unsubmitted = 0;
        self.reap(out);
        Ok(())
    }

    /// A thin volume's uncommitted mappings: commit them when due, and
    /// sleep no longer than that; whether events arrived meanwhile (they
    /// are in `out`).
    fn thin_commit_wait(&mut self, min: usize, out: &mut Vec<Event>) -> std::io::Result<bool> {
        let vol = Arc::clone(&self.vol);
        let Some(thin) = &vol.thin else {
            return Ok(false);
        };
        let Some(left) = thin.commit_if_due(&vol.devs) else {
            return Ok(false);
        };
        if min == 0 || !self.ready.is_empty() || !self.held.is_empty() {
            return Ok(false);
        }
        let ts = types::Timespec::from(left);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(min, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
        self.unsubmitted = 0;
        if self.reap(out) > 0 {
            return Ok(true);
        }
        thin.commit_if_due(&vol.devs);
        Ok(false)
    }

    /// Take the completions the ring has, finish the requests they complete,
    /// and report those with the frontend's own events; how many events.
    fn reap(&mut self, out: &mut Vec<Event>) -> usize {
        let before = out.len();
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (data, res) in cqes {
            if data == COPIED {
                self.copied();
                continue;
            }
            if data == WOKEN {
                self.woken_polled = false;
                if let Some(w) = &self.woken {
                    // Reset it (EAGAIN: already reset).
                    let _ = w.read();
                }
                continue;
            }
            if data & FOREIGN != 0 {
                out.push(Event::Foreign {
                    data: data & !FOREIGN,
                    result: res,
                });
                continue;
            }
            let key = (data & 0xffff_ffff) as usize;
            let part = (data >> 32) as usize;
            let Some(slot) = self.slots.get_mut(key) else {
                continue;
            };
            let expect = slot.parts.get(part).map(|p| p.1).unwrap_or(0);
            if res < 0 {
                slot.errno = -res;
            } else if expect > 0 && res as u32 != expect && slot.errno == 0 {
                // A short transfer: the device ended early.
                slot.errno = libc::EIO;
            }
            slot.remaining -= 1;
            if slot.remaining == 0 {
                self.part_done(key);
            }
        }
        out.extend(self.ready.drain(..).map(Event::Done));
        out.len() - before
    }
}

impl Drop for Queue {
    /// A client gone: what it wrote to a thin volume becomes durable now
    /// (and the pool's thin lock free), not at some later request.
    fn drop(&mut self) {
        if let Some(thin) = &self.vol.thin {
            let _ = thin.flush(&self.vol.devs);
        }
        // Writes answered early that never landed (the frontend gave up on
        // its ring): the next flush on the volume fails, and their buffers
        // are left alone, since the kernel may still be using them.
        for (id, buf) in std::mem::take(&mut self.early) {
            std::mem::forget(buf);
            if let Some(cow) = &self.vol.cow {
                cow.deferred.finish(id, libc::EIO);
            }
        }
    }
}

impl Queue {
    /// First writes to a snapshotted origin: hand the chunks the held
    /// writes reach to the copier (all at once) if its pipeline has room;
    /// else they gather for a later copy-out, so a busy origin copies in
    /// groups without waiting for a timer. [`Queue::copied`] starts the
    /// writes when they are durable.
    fn start_copy(&mut self) {
        if self.held.is_empty() || self.copying.len() >= copier::DEPTH {
            return;
        }
        let held = std::mem::take(&mut self.held);
        let ranges: Vec<(u64, u64)> = held.iter().map(|(_, r)| (r.offset, r.len)).collect();
        if self.copier.is_none() {
            match Copier::start(Arc::clone(&self.vol)) {
                Ok(c) => self.copier = Some(c),
                Err(e) => return self.fail(held, e.raw_os_error().unwrap_or(libc::EIO)),
            }
        }
        let Some(copier) = &self.copier else {
            return;
        };
        if let Err(errno) = copier.send(ranges) {
            return self.fail(held, errno);
        }
        self.copying.push_back(held);
        self.poll_copier();
    }

    /// Wake up when a copier job is done (its descriptor readable).
    fn poll_copier(&mut self) {
        if self.copier_polled {
            return;
        }
        if let Some(fd) = self.copier.as_ref().map(Copier::wake_fd) {
            self.poll_readable(fd, COPIED);
            self.copier_polled = true;
        }
    }

    /// One completion with user data `data` once `fd` (an eventfd) is
    /// readable.
    fn poll_readable(&mut self, fd: std::os::fd::RawFd, data: u64) {
        let poll = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(data);
        self.push(poll);
    }

    /// The copier's descriptor became readable: start the writes of each
    /// job it finished, oldest first, then hand it the writes held
    /// meanwhile.
    fn copied(&mut self) {
        self.copier_polled = false;
        let results = self.copier.as_ref().map(Copier::take_results);
        for result in results.unwrap_or_default() {
            let Some(group) = self.copying.pop_front() else {
                break;
            };
            for (tag, req) in group {
                let r = match result {
                    // SAFETY: the memory was promised valid until completion.
                    Ok(()) => unsafe { self.submit_mapped(tag, req) },
                    Err(errno) => Err(errno),
                };
                if let Err(errno) = r {
                    self.complete(tag, errno);
                }
            }
        }
        self.start_copy();
        if !self.copying.is_empty() {
            self.poll_copier();
        }
    }

    fn fail(&mut self, reqs: Vec<(u64, Request)>, errno: i32) {
        for (tag, _) in reqs {
            self.complete(tag, errno);
        }
    }
}

/// A thin request that provisions, discards or zeroes: synchronous.
///
/// # Safety
/// `req.iov` must describe valid memory (writable for reads).
unsafe fn thin_request(thin: &crate::thin::Thin, vol: &Volume, req: &Request) -> i32 {
    let r = match req.op {
        Op::Write { fua } => {
            // SAFETY: passed on from our caller.
            let mut data = unsafe { gather(&req.iov) };
            thin.write(&vol.devs, req.offset, data.as_mut_slice(), fua)
        }
        Op::Discard => thin.discard(&vol.devs, req.offset, req.len, false, false),
        Op::WriteZeroes { fua, .. } => thin.discard(&vol.devs, req.offset, req.len, true, fua),
        // A read the fast path could not place (a mapping outside the data
        // LV): the metadata is damaged.
        Op::Read => Err(libc::EIO),
        Op::Flush => Ok(()),
    };
    r.err().unwrap_or(0)
}

/// A snapshot request, served synchronously through a bounce buffer.
///
/// # Safety
/// `req.iov` must describe valid memory (writable for reads).
unsafe fn snapshot_request(cow: &crate::snapshot::Cow, vol: &Volume, req: &Request) -> i32 {
    let mut buf = match req.op {
        // SAFETY: passed on from our caller.
        Op::Write { .. } => unsafe { gather(&req.iov) },
        Op::Flush => AlignedBuf::new(0),
        _ => AlignedBuf::new(req.len as usize),
    };
    let buf = buf.as_mut_slice();
    let errno = cow.snapshot_io(&vol.devs, req.op, req.offset, req.len, buf);
    if errno == 0 && req.op == Op::Read {
        let mut at = 0;
        for v in &req.iov {
            // SAFETY: the iovec describes v.iov_len writable bytes.
            let dst = unsafe { std::slice::from_raw_parts_mut(v.iov_base as *mut u8, v.iov_len) };
            dst.copy_from_slice(&buf[at..at + v.iov_len]);
            at += v.iov_len;
        }
    }
    errno
}

/// The bytes a write's iovecs describe, in one aligned buffer of their own
/// (direct I/O can take it).
///
/// # Safety
/// Each iovec must describe `iov_len` readable bytes.
unsafe fn gather(iov: &[libc::iovec]) -> AlignedBuf {
    let mut buf = AlignedBuf::new(iov.iter().map(|v| v.iov_len).sum());
    let out = buf.as_mut_slice();
    let mut at = 0;
    for v in iov {
        // SAFETY: the caller promises v.iov_len readable bytes, and the
        // buffer holds them all from `at`.
        out[at..at + v.iov_len].copy_from_slice(unsafe {
            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
        });
        at += v.iov_len;
    }
    buf
}

fn iov_total(iov: &[libc::iovec]) -> Option<u64> {
    if iov.is_empty() {
        return None;
    }
    Some(iov.iter().map(|v| v.iov_len as u64).sum())
}

/// The part of an iovec list covering bytes `at..at+len`.
pub fn slice_iov(iov: &[libc::iovec], at: u64, len: u64) -> Box<[libc::iovec]> {
    let mut out = Vec::new();
    let mut pos = 0u64;
    let end = at + len;
    for v in iov {
        let vend = pos + v.iov_len as u64;
        if vend > at && pos < end {
            let from = at.max(pos);
            let to = end.min(vend);
            out.push(libc::iovec {
                // SAFETY: from-pos lies inside this iovec.
                iov_base: unsafe { (v.iov_base as *mut u8).add((from - pos) as usize) } as *mut _,
                iov_len: (to - from) as usize,
            });
        }
        pos = vend;
        if pos >= end {
            break;
        }
    }
    out.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slicing_an_iovec_list_keeps_exactly_the_requested_bytes() {
        let mut a = [0u8; 10];
        let mut b = [0u8; 6];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr() as *mut _,
                iov_len: 10,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr() as *mut _,
                iov_len: 6,
            },
        ];
        let s = slice_iov(&iov, 8, 5);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].iov_base as usize, a.as_ptr() as usize + 8);
        assert_eq!(s[0].iov_len, 2);
        assert_eq!(s[1].iov_base as usize, b.as_ptr() as usize);
        assert_eq!(s[1].iov_len, 3);
        assert_eq!(
            slice_iov(&iov, 10, 6)[0].iov_base as usize,
            b.as_ptr() as usize
        );
    }

    #[test]
    fn no_more_queues_spin_at_once_than_the_limit() {
        static SPINNING: AtomicUsize = AtomicUsize::new(0);
        let a = SpinTurn::take(&SPINNING, 2).expect("first turn");
        let b = SpinTurn::take(&SPINNING, 2).expect("second turn");
        assert!(SpinTurn::take(&SPINNING, 2).is_none(), "a third spinner");
        drop(a);
        let c = SpinTurn::take(&SPINNING, 2).expect("a turn given back is free again");
        drop((b, c));
        assert_eq!(SPINNING.load(Ordering::Acquire), 0);
        assert!(spin_limit() >= 1);
    }

    #[test]
    fn the_spin_grows_with_the_requests_in_flight_within_its_bounds() {
        use std::time::Duration;
        assert_eq!(spin_while_in_flight(1), SPIN, "one request: the short spin");
        assert_eq!(spin_while_in_flight(8), Duration::from_micros(160));
        assert_eq!(spin_while_in_flight(32), SPIN_MAX);
        assert_eq!(spin_while_in_flight(usize::MAX), SPIN_MAX);
    }
}
