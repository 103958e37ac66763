//! The vhost-user-blk frontend, on rust-vmm's `vhost-user-backend`: QEMU
//! shares the guest's memory and hands us its virtqueues; each queue has its
//! own worker thread and io_uring, and the guest's buffers are handed to the
//! kernel directly (no copy). Only this module knows virtio; the I/O goes
//! through the same [`Queue`](crate::queue::Queue) as NBD.

use crate::device::Volume;
use crate::lifetime::Stopper;
use crate::queue::{Event, Op, Queue, Request};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vhost::vhost_user::Listener;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueOwnedT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

const QUEUE_SIZE: usize = 256;
/// Most queues a guest gets (one per vCPU up to this).
pub const MAX_QUEUES: usize = 16;
/// Largest discard / write-zeroes request, in sectors (1 GiB).
const MAX_ZERO_SECTORS: u32 = 1 << 21;
const SEG_MAX: u32 = 126;

/// virtio-blk request header: type, reserved, sector.
const HDR_LEN: u64 = 16;

pub struct BlkBackend {
    vol: Arc<Volume>,
    queues: usize,
    mem: Mutex<Option<Mem>>,
    event_idx: Mutex<bool>,
    /// One io_uring per worker thread (one thread per virtqueue).
    workers: Vec<Mutex<Option<Queue>>>,
    id: Vec<u8>,
}

impl BlkBackend {
    pub fn new(vol: Arc<Volume>, queues: usize) -> BlkBackend {
        let queues = queues.clamp(1, MAX_QUEUES);
        let mut id = vol.name.as_bytes().to_vec();
        // The serial (GET_ID) holds 20 bytes; keep the end, which is unique.
        if id.len() > VIRTIO_BLK_ID_BYTES as usize {
            id.drain(..id.len() - VIRTIO_BLK_ID_BYTES as usize);
        }
        BlkBackend {
            vol,
            queues,
            mem: Mutex::new(None),
            event_idx: Mutex::new(false),
            workers: (0..queues).map(|_| Mutex::new(None)).collect(),
            id,
        }
    }

    /// `struct virtio_blk_config`, little endian.
    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        let put32 =
            |c: &mut Vec<u8>, at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
        c[0..8].copy_from_slice(&(self.vol.size() / 512).to_le_bytes());
        put32(&mut c, 12, SEG_MAX);
        put32(&mut c, 20, self.vol.align() as u32); // blk_size
        c[34..36].copy_from_slice(&(self.queues as u16).to_le_bytes());
        put32(&mut c, 36, MAX_ZERO_SECTORS); // max_discard_sectors
        put32(&mut c, 40, 1); // max_discard_seg
        put32(&mut c, 44, (self.vol.align() / 512) as u32); // discard_sector_alignment
        put32(&mut c, 48, MAX_ZERO_SECTORS); // max_write_zeroes_sectors
        put32(&mut c, 52, 1); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    fn process(&self, vring: &VringRwLock, thread: usize) -> io::Result<()> {
        let mem = match self.mem.lock().ok().and_then(|m| m.clone()) {
            Some(m) => m.memory(),
            None => return Ok(()),
        };
        let chains: Vec<_> = match vring.get_mut().get_queue_mut().iter(mem.clone()) {
            Ok(it) => it.collect(),
            Err(e) => return Err(io::Error::other(format!("virtqueue: {e}"))),
        };
        if chains.is_empty() {
            return Ok(());
        }
        let mut guard = self
            .workers
            .get(thread)
            .ok_or_else(|| io::Error::other("no worker for this thread"))?
            .lock()
            .map_err(|_| io::Error::other("worker lock poisoned"))?;
        if guard.is_none() {
            *guard = Some(Queue::new(Arc::clone(&self.vol), QUEUE_SIZE as u32 * 2)?);
        }
        let Some(q) = guard.as_mut() else {
            return Ok(());
        };
        let mut done: Vec<(u16, u32, *mut u8, u8)> = Vec::with_capacity(chains.len());
        let mut waiting = 0usize;
        for chain in chains {
            let head = chain.head_index();
            let parsed = parse_chain(&mem, chain);
            let Some(p) = parsed else {
                // A chain we cannot even find a status byte in: return it empty.
                done.push((head, 0, std::ptr::null_mut(), 0));
                continue;
            };
            let idx = done.len();
            let status = p.status;
            let writable = iov_len(&p.writable) as u32;
            let parsed = p.request(&self.id);
            let written = match &parsed {
                Immediate(_) => writable.min(self.id.len() as u32),
                Submit(_) => parsed.written(),
            };
            done.push((head, 1 + written, status, VIRTIO_BLK_S_OK as u8));
            match parsed {
                Immediate(st) => done[idx].3 = st,
                Submit(req) => {
                    // SAFETY: the iovecs point into guest memory, which QEMU
                    // keeps mapped while the queue runs; we wait for every
                    // request below before returning the chains.
                    match unsafe { q.submit(idx as u64, req) } {
                        Ok(()) => waiting += 1,
                        Err(_) => done[idx].3 = VIRTIO_BLK_S_IOERR as u8,
                    }
                }
            }
        }
        let mut events = Vec::new();
        while waiting > 0 {
            events.clear();
            q.wait(1, &mut events)?;
            for ev in &events {
                if let Event::Done(c) = ev {
                    waiting -= 1;
                    if c.errno != 0
                        && let Some(d) = done.get_mut(c.tag as usize)
                    {
                        d.3 = if c.errno == libc::EOPNOTSUPP {
                            VIRTIO_BLK_S_UNSUPP as u8
                        } else {
                            VIRTIO_BLK_S_IOERR as u8
                        };
                        d.1 = 1;
                    }
                }
            }
        }
        for (head, len, status, s) in done {
            if !status.is_null() {
                // SAFETY: status points at the chain's last writable byte.
                unsafe { status.write_volatile(s) };
            }
            vring
                .add_used(head, len)
                .map_err(|e| io::Error::other(format!("virtqueue: {e}")))?;
        }
        if vring.needs_notification().unwrap_or(true) {
            vring.signal_used_queue()?;
        }
        Ok(())
    }
}

use Parsed::{Immediate, Submit};
enum Parsed {
    Immediate(u8),
    Submit(Request),
}

/// One request's pieces of guest memory, as host pointers.
struct Chain {
    header: [u8; 16],
    /// Device-readable bytes after the header, and device-writable bytes
    /// before the status byte.
    readable: Vec<libc::iovec>,
    writable: Vec<libc::iovec>,
    status: *mut u8,
}

fn parse_chain<M>(mem: &GuestMemoryMmap, chain: virtio_queue::DescriptorChain<M>) -> Option<Chain>
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    for d in chain {
        let mut addr = d.addr();
        let mut left = d.len() as usize;
        // A descriptor may cross guest memory regions: one iovec per region.
        while left > 0 {
            let host = mem.get_host_address(addr).ok()?;
            let region_left = mem
                .find_region(addr)
                .map(|r| {
                    use vm_memory::GuestMemoryRegion;
                    (r.start_addr().0 + r.len() - addr.0) as usize
                })
                .unwrap_or(left);
            let n = left.min(region_left);
            let v = libc::iovec {
                iov_base: host as *mut _,
                iov_len: n,
            };
            if d.is_write_only() {
                writable.push(v);
            } else {
                readable.push(v);
            }
            left -= n;
            addr = GuestAddress(addr.0 + n as u64);
        }
    }
    // Header: the first 16 readable bytes.
    let mut header = [0u8; 16];
    let total_r: u64 = readable.iter().map(|v| v.iov_len as u64).sum();
    if total_r < HDR_LEN {
        return None;
    }
    copy_from_iov(&readable, &mut header);
    let readable = crate::queue::slice_iov(&readable, HDR_LEN, total_r - HDR_LEN).into_vec();
    // Status: the last writable byte.
    let total_w: u64 = writable.iter().map(|v| v.iov_len as u64).sum();
    if total_w == 0 {
        return None;
    }
    let last = writable.last()?;
    // SAFETY: inside the last writable iovec.
    let status = unsafe { (last.iov_base as *mut u8).add(last.iov_len - 1) };
    let writable = crate::queue::slice_iov(&writable, 0, total_w - 1).into_vec();
    Some(Chain {
        header,
        readable,
        writable,
        status,
    })
}

fn copy_from_iov(iov: &[libc::iovec], out: &mut [u8]) {
    let mut at = 0;
    for v in iov {
        if at >= out.len() {
            break;
        }
        let n = v.iov_len.min(out.len() - at);
        // SAFETY: n bytes readable at iov_base (guest memory).
        unsafe {
            std::ptr::copy_nonoverlapping(v.iov_base as *const u8, out[at..].as_mut_ptr(), n)
        };
        at += n;
    }
}

fn iov_len(iov: &[libc::iovec]) -> u64 {
    iov.iter().map(|v| v.iov_len as u64).sum()
}

impl Chain {
    fn request(self, id: &[u8]) -> Parsed {
        let typ = u32::from_le_bytes(self.header[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(self.header[8..16].try_into().unwrap_or_default());
        let Some(offset) = sector.checked_mul(512) else {
            return Immediate(VIRTIO_BLK_S_IOERR as u8);
        };
        match typ {
            VIRTIO_BLK_T_IN => {
                let len = iov_len(&self.writable);
                Submit(Request {
                    op: Op::Read,
                    offset,
                    len,
                    iov: self.writable,
                })
            }
            VIRTIO_BLK_T_OUT => {
                let len = iov_len(&self.readable);
                Submit(Request {
                    op: Op::Write { fua: false },
                    offset,
                    len,
                    iov: self.readable,
                })
            }
            VIRTIO_BLK_T_FLUSH => Submit(Request {
                op: Op::Flush,
                offset: 0,
                len: 0,
                iov: Vec::new(),
            }),
            VIRTIO_BLK_T_GET_ID => {
                let mut left = id;
                for v in &self.writable {
                    let n = v.iov_len.min(left.len());
                    // SAFETY: n bytes writable at iov_base (guest memory).
                    unsafe {
                        std::ptr::copy_nonoverlapping(left.as_ptr(), v.iov_base as *mut u8, n)
                    };
                    left = &left[n..];
                }
                Immediate(VIRTIO_BLK_S_OK as u8)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                // One segment: sector u64, num_sectors u32, flags u32.
                let mut seg = [0u8; 16];
                if iov_len(&self.readable) < 16 {
                    return Immediate(VIRTIO_BLK_S_IOERR as u8);
                }
                copy_from_iov(&self.readable, &mut seg);
                let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
                let n = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
                if n > MAX_ZERO_SECTORS {
                    return Immediate(VIRTIO_BLK_S_IOERR as u8);
                }
                let Some(offset) = sector.checked_mul(512) else {
                    return Immediate(VIRTIO_BLK_S_IOERR as u8);
                };
                let op = if typ == VIRTIO_BLK_T_DISCARD {
                    Op::Discard
                } else {
                    Op::WriteZeroes {
                        may_trim: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                        fua: false,
                    }
                };
                Submit(Request {
                    op,
                    offset,
                    len: n as u64 * 512,
                    iov: Vec::new(),
                })
            }
            _ => Immediate(VIRTIO_BLK_S_UNSUPP as u8),
        }
    }
}

impl Parsed {
    fn written(&self) -> u32 {
        match self {
            Submit(Request {
                op: Op::Read, len, ..
            }) => *len as u32,
            _ => 0,
        }
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues
    }
    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }
    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.vol.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }
    fn set_event_idx(&self, enabled: bool) {
        if let Ok(mut e) = self.event_idx.lock() {
            *e = enabled;
        }
    }
    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config();
        let start = (offset as usize).min(c.len());
        let end = (offset as usize + size as usize).min(c.len());
        let mut out = c[start..end].to_vec();
        out.resize(size as usize, 0);
        out
    }
    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        if let Ok(mut m) = self.mem.lock() {
            *m = Some(mem);
        }
        Ok(())
    }
    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue.
        (0..self.queues).map(|i| 1u64 << i).collect()
    }
    /// Without an exit event a worker never leaves its epoll loop, and
    /// dropping the daemon (joining the workers) would hang once QEMU is gone.
    fn exit_event(
        &self,
        _thread_index: usize,
    ) -> Option<(
        vmm_sys_util::event::EventConsumer,
        vmm_sys_util::event::EventNotifier,
    )> {
        vmm_sys_util::event::new_event_consumer_and_notifier(
            vmm_sys_util::event::EventFlag::NONBLOCK,
        )
        .ok()
    }
    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            return Ok(());
        };
        let event_idx = self.event_idx.lock().map(|e| *e).unwrap_or(false);
        if event_idx {
            loop {
                let _ = vring.disable_notification();
                self.process(vring, thread_id)?;
                match vring.enable_notification() {
                    Ok(true) => continue,
                    _ => break,
                }
            }
            Ok(())
        } else {
            self.process(vring, thread_id)
        }
    }
}

/// The listening socket (mode 0600), bound before QEMU is started.
pub struct Bound {
    listener: Listener,
    path: PathBuf,
}

impl Drop for Bound {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn bind(path: &Path) -> io::Result<Bound> {
    crate::nbd::server::remove_stale_socket(path)?;
    let l = crate::nbd::server::bind_private(path)?;
    Ok(Bound {
        listener: Listener::from(l),
        path: path.to_path_buf(),
    })
}

/// Serve QEMU until `stopper` is set: one connection at a time (vhost-user
/// has one frontend), and a new one after each disconnect, so a restarted or
/// reconnecting QEMU finds the device again.
pub fn serve(
    mut bound: Bound,
    vol: Arc<Volume>,
    queues: usize,
    stopper: Arc<Stopper>,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    stopper.shutdown_on_stop(bound.listener.as_raw_fd());
    while !stopper.is_stopped() {
        serve_connection(&mut bound, Arc::clone(&vol), queues, &stopper)?;
    }
    Ok(())
}

/// Accept one QEMU connection and serve it until it disconnects or `stopper`
/// is set. Each connection gets a fresh backend: no virtqueue, memory table
/// or feature state outlives the frontend that set it up.
fn serve_connection(
    bound: &mut Bound,
    vol: Arc<Volume>,
    queues: usize,
    stopper: &Arc<Stopper>,
) -> io::Result<()> {
    let backend = Arc::new(BlkBackend::new(vol, queues));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("devpool-vhost-user-blk".into(), backend, mem)
        .map_err(|e| io::Error::other(format!("vhost-user daemon: {e}")))?;
    if let Err(e) = daemon.start(&mut bound.listener) {
        if stopper.is_stopped() {
            return Ok(());
        }
        return Err(io::Error::other(format!("vhost-user accept: {e}")));
    }
    let Some(h) = daemon.shutdown_handle() else {
        return Ok(());
    };
    // Stop the connection when asked to; the daemon's own thread exits then.
    let s = Arc::clone(stopper);
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f2 = Arc::clone(&finished);
    let watcher = std::thread::spawn(move || {
        while !s.wait_timeout(Duration::from_millis(200)) {
            if f2.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
        }
        h.shutdown();
    });
    let r = daemon.wait();
    finished.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = watcher.join();
    match r {
        Ok(()) => Ok(()),
        Err(_) if stopper.is_stopped() => Ok(()),
        Err(e) => {
            // QEMU going away mid-message is the normal end of a guest.
            let msg = e.to_string();
            if msg.contains("isconnect") || msg.contains("artial") || msg.contains("broken") {
                Ok(())
            } else {
                Err(io::Error::other(format!("vhost-user: {e}")))
            }
        }
    }
}
