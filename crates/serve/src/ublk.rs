//! ublk (the kernel's userspace block driver, `ublk_drv`, Linux 6.0+) as a
//! host block device: `/dev/ublkbN` whose requests devpool's block-I/O core
//! serves, with no socket between them. The kernel hands each request to a
//! queue thread through a uring command (`FETCH_REQ`), copies a write's
//! data into that request's buffer before and a read's data out of it after
//! the answer (`COMMIT_AND_FETCH_REQ`, which also waits for the next
//! request); the request's description (operation, sectors) is in a table
//! the driver shares by `mmap` of `/dev/ublkcN`.
//!
//! Control (`/dev/ublk-control`, 128-byte uring commands): `ADD_DEV` with
//! a queue per CPU (up to four, each a thread sharing the one descriptor of
//! `/dev/ublkcN` the driver allows), `SET_PARAMS` (size, block sizes, flush/FUA, discard and
//! write-zeroes limits), `START_DEV` once the queue threads have fetched
//! every tag; to close, `STOP_DEV` (the driver finishes the disk's I/O
//! through the queue, then aborts its fetches), then `DEL_DEV`. Commands
//! use the ioctl encoding (`UBLK_F_CMD_IOCTL_ENCODE`), as new kernels
//! require.

use crate::buffer::AlignedBuf;
use crate::device::Volume;
use crate::queue::{Event, Op, Queue, Request};
use io_uring::{IoUring, cqueue, opcode, squeue, types};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

const CONTROL: &str = "/dev/ublk-control";

/// `_IOWR('u', nr, size)`.
const fn iowr(nr: u32, size: u32) -> u32 {
    (3 << 30) | (size << 16) | ((b'u' as u32) << 8) | nr
}
/// `_IOR('u', nr, size)`.
const fn ior(nr: u32, size: u32) -> u32 {
    (2 << 30) | (size << 16) | ((b'u' as u32) << 8) | nr
}
const CTRL_CMD_LEN: u32 = 32;
const CMD_GET_DEV_INFO: u32 = ior(0x02, CTRL_CMD_LEN);
const IO_CMD_LEN: u32 = 16;
const CMD_ADD_DEV: u32 = iowr(0x04, CTRL_CMD_LEN);
const CMD_DEL_DEV: u32 = iowr(0x05, CTRL_CMD_LEN);
const CMD_START_DEV: u32 = iowr(0x06, CTRL_CMD_LEN);
const CMD_STOP_DEV: u32 = iowr(0x07, CTRL_CMD_LEN);
const CMD_SET_PARAMS: u32 = iowr(0x08, CTRL_CMD_LEN);
const IO_FETCH_REQ: u32 = iowr(0x20, IO_CMD_LEN);
const IO_COMMIT_AND_FETCH_REQ: u32 = iowr(0x21, IO_CMD_LEN);

const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;

const OP_READ: u32 = 0;
const OP_WRITE: u32 = 1;
const OP_FLUSH: u32 = 2;
const OP_DISCARD: u32 = 3;
const OP_WRITE_ZEROES: u32 = 5;
const IO_F_FUA: u32 = 1 << 13;
const IO_F_NOUNMAP: u32 = 1 << 15;

const ATTR_READ_ONLY: u32 = 1 << 0;
const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
const ATTR_FUA: u32 = 1 << 3;
const PARAM_BASIC: u32 = 1 << 0;
const PARAM_DISCARD: u32 = 1 << 1;

/// Requests in flight on each queue, and the largest request (bytes).
const DEPTH: u16 = 64;
/// Queues (one thread each): one per CPU, up to this many.
const MAX_QUEUES: u16 = 4;
/// The driver's stride between queues' descriptor tables in the mmap
/// offsets of `/dev/ublkcN`: a table for its largest depth (4,096), pages.
const TABLE_STRIDE: usize = 4096 * size_of::<IoDesc>();
const BUF_BYTES: u32 = 256 << 10;
/// What devpool puts in the high half of a device's `ublksrv_flags` (the
/// driver keeps them for the server and ignores them); the low half is the
/// serving process's pid. A device left behind by a killed server is
/// recognised by both and deleted by the next one.
const OURS: u64 = 0x6470_6f6f << 32; // "dpoo"
const DEV_DEAD: u16 = 0;
/// The queue thread's foreign user data for the stop signal (tags are < 2^16).
const STOP: u64 = 1 << 32;

/// `struct ublksrv_ctrl_dev_info`.
#[repr(C)]
#[derive(Default)]
struct DevInfo {
    nr_hw_queues: u16,
    queue_depth: u16,
    state: u16,
    pad0: u16,
    max_io_buf_bytes: u32,
    dev_id: u32,
    ublksrv_pid: i32,
    pad1: u32,
    flags: u64,
    ublksrv_flags: u64,
    owner_uid: u32,
    owner_gid: u32,
    reserved1: u64,
    reserved2: u64,
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Default)]
struct ParamBasic {
    attrs: u32,
    logical_bs_shift: u8,
    physical_bs_shift: u8,
    io_opt_shift: u8,
    io_min_shift: u8,
    max_sectors: u32,
    chunk_sectors: u32,
    dev_sectors: u64,
    virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Default)]
struct ParamDiscard {
    discard_alignment: u32,
    discard_granularity: u32,
    max_discard_sectors: u32,
    max_write_zeroes_sectors: u32,
    max_discard_segments: u16,
    reserved0: u16,
}

/// The head of `struct ublk_params`: the basic and discard parameters.
#[repr(C)]
#[derive(Default)]
struct Params {
    len: u32,
    types: u32,
    basic: ParamBasic,
    discard: ParamDiscard,
}

/// `struct ublksrv_io_desc`, as the driver writes it in the shared table.
#[repr(C)]
#[derive(Clone, Copy)]
struct IoDesc {
    op_flags: u32,
    nr_sectors: u32,
    start_sector: u64,
    addr: u64,
}

/// Whether this kernel has the ublk driver (loading the module if it can).
pub fn available() -> bool {
    devpool_pool::sysblk::loaded_or_probed("ublk_drv", Path::new(CONTROL))
}

/// `/dev/ublk-control` and a ring for its 128-byte commands.
struct Control {
    file: File,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
}

impl Control {
    fn open() -> io::Result<Control> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL)
            .map_err(|e| io::Error::new(e.kind(), format!("{CONTROL}: {e}")))?;
        Ok(Control {
            file,
            ring: Self::ring()?,
        })
    }

    /// A ring for 128-byte commands.
    fn ring() -> io::Result<IoUring<squeue::Entry128, cqueue::Entry>> {
        IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4)
    }

    /// One control command for device `dev_id`; its result (>= 0).
    fn command(
        &mut self,
        what: &str,
        op: u32,
        dev_id: u32,
        buf: Option<(u64, u16)>,
        data0: u64,
    ) -> io::Result<i32> {
        self.command_while(what, op, dev_id, buf, data0, || true)
    }

    /// [`Control::command`], given up (and cancelled, with a new ring for
    /// the commands after it) when `alive` turns false before it completes:
    /// START_DEV waits for the queue to fetch every tag, forever if the
    /// queue thread died.
    fn command_while(
        &mut self,
        what: &str,
        op: u32,
        dev_id: u32,
        buf: Option<(u64, u16)>,
        data0: u64,
        alive: impl Fn() -> bool,
    ) -> io::Result<i32> {
        let mut cmd = [0u8; 80];
        cmd[0..4].copy_from_slice(&dev_id.to_le_bytes());
        cmd[4..6].copy_from_slice(&u16::MAX.to_le_bytes());
        let (addr, len) = buf.unwrap_or((0, 0));
        cmd[6..8].copy_from_slice(&len.to_le_bytes());
        cmd[8..16].copy_from_slice(&addr.to_le_bytes());
        cmd[16..24].copy_from_slice(&data0.to_le_bytes());
        let e = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(cmd)
            .build()
            .user_data(1);
        // SAFETY: the command's buffer (if any) is the caller's and outlives
        // this call, which waits for the command's completion.
        unsafe { self.ring.submission().push(&e) }
            .map_err(|_| io::Error::other("ublk control ring full"))?;
        self.ring.submit()?;
        let res = loop {
            if let Some(c) = self.ring.completion().next() {
                break c.result();
            }
            if !alive() {
                // Closing the ring cancels the command (it waits in io-wq).
                self.ring = Self::ring()?;
                return Err(io::Error::other(format!(
                    "ublk {what}: the queue thread ended first"
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            return Err(io::Error::new(e.kind(), format!("ublk {what}: {e}")));
        }
        Ok(res)
    }
}

/// A volume's `/dev/ublkbN`, served until closed.
pub struct UblkDevice {
    pub device: PathBuf,
    dev_id: u32,
    ctrl: Control,
    queues: Vec<JoinHandle<io::Result<()>>>,
    stop: Arc<crate::lifetime::Stopper>,
    started: bool,
}

/// Add a ublk device for `vol` and start serving it.
pub fn connect(vol: &Arc<Volume>) -> io::Result<UblkDevice> {
    let mut ctrl = Control::open()?;
    let nr_queues = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, usize::from(MAX_QUEUES)) as u16;
    let mut info = DevInfo {
        nr_hw_queues: nr_queues,
        queue_depth: DEPTH,
        max_io_buf_bytes: BUF_BYTES,
        dev_id: u32::MAX,
        ublksrv_pid: -1,
        flags: F_CMD_IOCTL_ENCODE,
        ublksrv_flags: OURS | u64::from(std::process::id()),
        ..Default::default()
    };
    reap_left_behind(&mut ctrl);
    let info_buf = Some((
        &mut info as *mut DevInfo as u64,
        size_of::<DevInfo>() as u16,
    ));
    ctrl.command("ADD_DEV", CMD_ADD_DEV, u32::MAX, info_buf, 0)?;
    let dev_id = info.dev_id;
    let stop = crate::lifetime::Stopper::new()?;
    let mut dev = UblkDevice {
        device: PathBuf::from(format!("/dev/ublkb{dev_id}")),
        dev_id,
        ctrl,
        queues: Vec::new(),
        stop,
        started: false,
    };
    // From here on, dropping `dev` stops and deletes the device.
    let sectors = vol.size() / 512;
    let mut params = Params {
        len: (std::mem::offset_of!(Params, discard) + size_of::<ParamDiscard>()) as u32,
        types: PARAM_BASIC | PARAM_DISCARD,
        basic: ParamBasic {
            attrs: ATTR_VOLATILE_CACHE | ATTR_FUA | if vol.read_only { ATTR_READ_ONLY } else { 0 },
            logical_bs_shift: 9,
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: 12,
            max_sectors: BUF_BYTES >> 9,
            dev_sectors: sectors,
            ..Default::default()
        },
        discard: ParamDiscard {
            discard_granularity: 4096,
            max_discard_sectors: u32::MAX >> 9,
            max_write_zeroes_sectors: u32::MAX >> 9,
            max_discard_segments: 1,
            ..Default::default()
        },
    };
    let params_buf = Some((&mut params as *mut Params as u64, params.len as u16));
    dev.ctrl
        .command("SET_PARAMS", CMD_SET_PARAMS, dev_id, params_buf, 0)?;
    // The driver lets one process open the character device once: the
    // queues share that descriptor.
    let cdev = Arc::new(open_char_device(dev_id)?);
    let mut queues = Vec::new();
    for q_id in 0..nr_queues {
        let (v, c, stop_fd) = (Arc::clone(vol), Arc::clone(&cdev), dev.stop.fd());
        queues.push(
            std::thread::Builder::new()
                .name(format!("ublk-queue-{q_id}"))
                .spawn(move || serve_queue(v, &c, q_id, stop_fd))?,
        );
    }
    drop(cdev);
    // Completes once every queue has fetched every tag (the disk then appears).
    let pid = u64::from(std::process::id());
    let started = dev
        .ctrl
        .command_while("START_DEV", CMD_START_DEV, dev_id, None, pid, || {
            queues.iter().all(|q| !q.is_finished())
        });
    dev.queues = queues;
    if let Err(e) = started {
        // A queue thread that failed says why.
        dev.stop.stop("ublk START_DEV failed");
        // Join every queue, then report the first that failed.
        let failed: Vec<io::Error> = dev
            .queues
            .drain(..)
            .filter_map(|h| h.join().ok()?.err())
            .collect();
        let failed = failed.into_iter().next();
        if let Some(q) = failed {
            return Err(io::Error::new(q.kind(), format!("{e} (queue: {q})")));
        }
        return Err(e);
    }
    dev.started = true;
    let t = std::time::Instant::now();
    while !dev.device.exists() && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(dev)
}

/// Delete the devices a devpool server that was killed left behind: the
/// driver stops a device whose server died (its disk goes) but keeps it,
/// and its id, until someone deletes it. Only devices marked as devpool's,
/// dead, and whose serving process is gone.
fn reap_left_behind(ctrl: &mut Control) {
    let Ok(entries) = std::fs::read_dir("/sys/class/ublk-char") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name
            .strip_prefix("ublkc")
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let mut info = DevInfo::default();
        let buf = Some((
            &mut info as *mut DevInfo as u64,
            size_of::<DevInfo>() as u16,
        ));
        if ctrl
            .command("GET_DEV_INFO", CMD_GET_DEV_INFO, id, buf, 0)
            .is_err()
        {
            continue;
        }
        let owner = (info.ublksrv_flags & 0xffff_ffff) as i32;
        let gone = owner > 0 && !Path::new(&format!("/proc/{owner}")).exists();
        if info.ublksrv_flags & !0xffff_ffff == OURS && info.state == DEV_DEAD && gone {
            let _ = ctrl.command("DEL_DEV", CMD_DEL_DEV, id, None, 0);
        }
    }
}

impl UblkDevice {
    /// Stop the disk (its I/O finishes through the queue first), stop the
    /// queue, delete the device.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if self.started {
            let _ = self
                .ctrl
                .command("STOP_DEV", CMD_STOP_DEV, self.dev_id, None, 0);
            self.started = false;
        }
        self.stop.stop("the ublk device was stopped");
        for h in self.queues.drain(..) {
            let _ = h.join();
        }
        if self.dev_id != u32::MAX {
            let _ = self
                .ctrl
                .command("DEL_DEV", CMD_DEL_DEV, self.dev_id, None, 0);
            self.dev_id = u32::MAX;
        }
    }
}

impl Drop for UblkDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The driver's table of request descriptions for one queue, mapped.
struct DescTable {
    ptr: *const IoDesc,
    len: usize,
}

impl DescTable {
    fn map(cdev: &File, q_id: u16) -> io::Result<DescTable> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = (usize::from(DEPTH) * size_of::<IoDesc>()).div_ceil(page) * page;
        let stride = TABLE_STRIDE.div_ceil(page) * page;
        // SAFETY: a read-only shared mapping of the driver's table for queue
        // `q_id`; checked for failure below and unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                cdev.as_raw_fd(),
                (usize::from(q_id) * stride) as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(DescTable {
            ptr: ptr.cast(),
            len,
        })
    }

    fn get(&self, tag: u16) -> IoDesc {
        // SAFETY: tag < DEPTH, inside the mapping; the driver writes an entry
        // before it completes that tag's fetch, which we have seen.
        unsafe { std::ptr::read_volatile(self.ptr.add(usize::from(tag))) }
    }
}

impl Drop for DescTable {
    fn drop(&mut self) {
        // SAFETY: unmapping what `map` mapped.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

fn io_cmd(q_id: u16, tag: u16, result: i32, addr: u64) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0..2].copy_from_slice(&q_id.to_le_bytes());
    c[2..4].copy_from_slice(&tag.to_le_bytes());
    c[4..8].copy_from_slice(&result.to_le_bytes());
    c[8..16].copy_from_slice(&addr.to_le_bytes());
    c
}

/// Open `/dev/ublkcN` (devtmpfs makes it as ADD_DEV returns; give udev a
/// moment where it renames or chmods).
fn open_char_device(dev_id: u32) -> io::Result<File> {
    let path = format!("/dev/ublkc{dev_id}");
    let t = std::time::Instant::now();
    loop {
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => return Ok(f),
            Err(e) if t.elapsed() > std::time::Duration::from_secs(5) => {
                return Err(io::Error::new(e.kind(), format!("{path}: {e}")));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    }
}

/// The queue thread: fetch every tag, serve each request through the
/// block-I/O core, answer it (and fetch the next) until the driver aborts
/// the fetches after STOP_DEV, or the stop signal comes with nothing in
/// flight.
fn serve_queue(vol: Arc<Volume>, cdev: &File, q_id: u16, stop_fd: i32) -> io::Result<()> {
    let table = DescTable::map(cdev, q_id)?;
    let fd = types::Fd(cdev.as_raw_fd());
    let mut q = Queue::new_for_this_thread(vol, 1024)?;
    let mut bufs: Vec<AlignedBuf> = (0..DEPTH)
        .map(|_| AlignedBuf::new(BUF_BYTES as usize))
        .collect();
    let mut bytes = vec![0i32; usize::from(DEPTH)];
    let addr = |bufs: &mut Vec<AlignedBuf>, tag: u16| bufs[usize::from(tag)].as_mut_ptr() as u64;
    for tag in 0..DEPTH {
        let e = opcode::UringCmd16::new(fd, IO_FETCH_REQ)
            .cmd(io_cmd(q_id, tag, 0, addr(&mut bufs, tag)))
            .build();
        // SAFETY: the buffer lives in `bufs` until this function returns,
        // after every fetch has completed or the ring is gone.
        unsafe { q.push_foreign(e, u64::from(tag)) };
    }
    let poll = opcode::PollAdd::new(types::Fd(stop_fd), libc::POLLIN as u32).build();
    // SAFETY: a poll on an eventfd points at no memory.
    unsafe { q.push_foreign(poll, STOP) };
    let mut fetching = usize::from(DEPTH);
    let mut stopping = false;
    let mut events = Vec::new();
    while fetching > 0 && !(stopping && q.in_flight() == 0) {
        events.clear();
        q.wait(1, &mut events)?;
        let mut answers: Vec<(u16, i32)> = Vec::new();
        for ev in events.drain(..) {
            match ev {
                Event::Foreign { data: STOP, .. } => stopping = true,
                Event::Foreign { data, result } => {
                    let tag = data as u16;
                    if result != 0 {
                        // UBLK_IO_RES_ABORT: the device is stopping.
                        fetching -= 1;
                        continue;
                    }
                    let d = table.get(tag);
                    let buf = &mut bufs[usize::from(tag)];
                    match request(&d, buf) {
                        Ok((req, n)) => {
                            bytes[usize::from(tag)] = n;
                            // SAFETY: the buffer stays in `bufs` until the
                            // request completes (we wait for it below).
                            if let Err(errno) = unsafe { q.submit(u64::from(tag), req) } {
                                answers.push((tag, -errno));
                            }
                        }
                        Err(errno) => answers.push((tag, -errno)),
                    }
                }
                Event::Done(c) => {
                    let tag = c.tag as u16;
                    let res = if c.errno == 0 {
                        bytes[usize::from(tag)]
                    } else {
                        -c.errno
                    };
                    answers.push((tag, res));
                }
            }
        }
        for (tag, res) in answers {
            let e = opcode::UringCmd16::new(fd, IO_COMMIT_AND_FETCH_REQ)
                .cmd(io_cmd(q_id, tag, res, addr(&mut bufs, tag)))
                .build();
            // SAFETY: as for the first fetch.
            unsafe { q.push_foreign(e, u64::from(tag)) };
        }
    }
    // Anything still fetching is cancelled when the ring goes, before the
    // buffers and the table.
    drop(q);
    drop(table);
    Ok(())
}

/// The block-I/O request for descriptor `d` with its data in `buf`, and the
/// byte count its answer reports; or the errno to answer with.
fn request(d: &IoDesc, buf: &mut AlignedBuf) -> Result<(Request, i32), i32> {
    let op = d.op_flags & 0xff;
    let fua = d.op_flags & IO_F_FUA != 0;
    if op == OP_FLUSH {
        // A flush has no range (its start sector is all ones).
        let req = Request {
            op: Op::Flush,
            offset: 0,
            len: 0,
            iov: Vec::new(),
        };
        return Ok((req, 0));
    }
    let offset = d.start_sector.checked_mul(512).ok_or(libc::EIO)?;
    let len = u64::from(d.nr_sectors) * 512;
    let iov = |buf: &mut AlignedBuf| {
        vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len as usize,
        }]
    };
    let (op, iov, n) = match op {
        OP_READ | OP_WRITE => {
            if len > buf.capacity() as u64 {
                return Err(libc::EIO);
            }
            let o = if op == OP_READ {
                Op::Read
            } else {
                Op::Write { fua }
            };
            (o, iov(buf), len as i32)
        }
        OP_DISCARD => (Op::Discard, Vec::new(), 0),
        OP_WRITE_ZEROES => (
            Op::WriteZeroes {
                may_trim: d.op_flags & IO_F_NOUNMAP == 0,
                fua,
            },
            Vec::new(),
            0,
        ),
        _ => return Err(libc::EOPNOTSUPP),
    };
    Ok((
        Request {
            op,
            offset,
            len,
            iov,
        },
        n,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_structures_match_the_kernel_abi() {
        // Values from include/uapi/linux/ublk_cmd.h's _IOWR encodings.
        assert_eq!(CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(CMD_START_DEV, 0xc020_7506);
        assert_eq!(CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
        assert_eq!(size_of::<DevInfo>(), 64);
        assert_eq!(size_of::<ParamBasic>(), 32);
        assert_eq!(size_of::<ParamDiscard>(), 20);
        assert_eq!(std::mem::offset_of!(Params, discard), 40);
        assert_eq!(size_of::<IoDesc>(), 24);
    }

    #[test]
    fn requests_map_to_the_core_and_bad_ones_are_refused() {
        let mut buf = AlignedBuf::new(BUF_BYTES as usize);
        let d = |op_flags, nr_sectors, start_sector| IoDesc {
            op_flags,
            nr_sectors,
            start_sector,
            addr: 0,
        };
        let (r, n) = request(&d(OP_WRITE | IO_F_FUA, 8, 3), &mut buf).unwrap();
        assert_eq!(
            (r.op, r.offset, r.len, n),
            (Op::Write { fua: true }, 1536, 4096, 4096)
        );
        let (r, n) = request(&d(OP_WRITE_ZEROES | IO_F_NOUNMAP, 16, 0), &mut buf).unwrap();
        assert_eq!(
            (r.op, n),
            (
                Op::WriteZeroes {
                    may_trim: false,
                    fua: false
                },
                0
            )
        );
        assert_eq!(
            request(&d(OP_FLUSH, 0, 0), &mut buf).unwrap().0.op,
            Op::Flush
        );
        assert_eq!(
            request(&d(OP_READ, (BUF_BYTES >> 9) + 1, 0), &mut buf).err(),
            Some(libc::EIO)
        );
        assert_eq!(
            request(&d(OP_READ, 1, u64::MAX), &mut buf).err(),
            Some(libc::EIO)
        );
        assert_eq!(
            request(&d(13, 1, 0), &mut buf).err(),
            Some(libc::EOPNOTSUPP)
        );
    }
}
