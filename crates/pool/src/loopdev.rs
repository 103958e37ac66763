//! Loop devices over a volume's extents (`offset` + `sizelimit` on the PV,
//! direct I/O where the backing file allows it). Each device devpool attaches
//! carries `devpool:<LV uuid>` as its loop file name, so release and cleanup
//! find exactly the devices of a volume, whoever attached them.

use crate::{PoolError, Result};
use std::collections::{BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_ADD: libc::c_ulong = 0x4C80;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;
const MARK: &str = "devpool:";

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` (linux/loop.h, kernel 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

fn zero_info() -> LoopInfo64 {
    // All-zero is a valid loop_info64 (plain integers and byte arrays).
    LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: 0,
        lo_file_name: [0; LO_NAME_SIZE],
        lo_crypt_name: [0; LO_NAME_SIZE],
        lo_encrypt_key: [0; 32],
        lo_init: [0; 2],
    }
}

/// A loop device devpool attached, as read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Attached {
    pub device: PathBuf,
    /// The file or device it is attached to.
    pub backing: PathBuf,
    /// The LV uuid from the `devpool:` mark.
    pub lv_uuid: String,
    pub offset: u64,
    pub size: u64,
}

fn ioctl_err(path: &Path, what: &str) -> PoolError {
    PoolError::io(path, what, std::io::Error::last_os_error())
}

fn open_rw(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

/// Attach a loop device to `size` bytes of `backing` at `offset`.
pub fn attach(backing: &Path, offset: u64, size: u64, lv_uuid: &str) -> Result<PathBuf> {
    Attacher::default().attach(backing, offset, size, lv_uuid)
}

/// A loop device to make: `size` bytes of `backing` at `offset`, marked
/// with the volume's LV uuid.
#[derive(Debug, Clone)]
pub struct Window {
    pub backing: PathBuf,
    pub offset: u64,
    pub size: u64,
    pub lv_uuid: String,
}

/// How many threads attach one lease's loop devices. Each attach waits for
/// a flush of its backing file; attaches to different devices overlap
/// those waits (a lease of 7 acquired 0.2-0.8 ms sooner than on one thread).
pub const ATTACH_THREADS: usize = 4;

/// Attach a loop device for every window, on up to `threads` threads; each
/// one's result, in order. All are tried even when one fails, so the
/// caller knows everything that was attached.
pub fn attach_all(windows: &[Window], threads: usize) -> Vec<Result<Attached>> {
    let threads = threads.min(windows.len());
    if threads <= 1 {
        let mut a = Attacher::default();
        return windows.iter().map(|w| attach_one(&mut a, w)).collect();
    }
    let windows = std::sync::Arc::new(windows.to_vec());
    let shards: Vec<_> = (0..threads)
        .map(|t| {
            let windows = std::sync::Arc::clone(&windows);
            devpool_engine::workers::spawn(move || {
                let mut a = Attacher::default();
                windows
                    .iter()
                    .enumerate()
                    .skip(t)
                    .step_by(threads)
                    .map(|(i, w)| (i, attach_one(&mut a, w)))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut out: Vec<Option<Result<Attached>>> = windows.iter().map(|_| None).collect();
    for shard in shards {
        // A panicking attach loses its shard's results only.
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard.join()));
        for (i, r) in done.unwrap_or_default() {
            out[i] = Some(r);
        }
    }
    out.into_iter()
        .map(|r| {
            r.unwrap_or_else(|| Err(PoolError::Invalid("a loop attach thread panicked".into())))
        })
        .collect()
}

fn attach_one(a: &mut Attacher, w: &Window) -> Result<Attached> {
    a.attach(&w.backing, w.offset, w.size, &w.lv_uuid)
        .map(|device| Attached {
            device,
            backing: w.backing.clone(),
            lv_uuid: w.lv_uuid.clone(),
            offset: w.offset,
            size: w.size,
        })
}

/// Which loop devices this process's attaches should try. The kernel's
/// GET_FREE names the lowest free device; concurrent attaches (the daemon's
/// rounds, its releases freeing devices meanwhile) would all race for it,
/// queue on its mutex behind the winner's backing-file flush, and all but
/// one fail and ask again. So each attach claims a number no other attach
/// here is configuring, preferring the devices this process detached.
static CANDIDATES: Mutex<Candidates> = Mutex::new(Candidates {
    claimed: BTreeSet::new(),
    detached: VecDeque::new(),
});

/// How many detached device numbers are remembered.
const DETACHED_LIMIT: usize = 1024;

struct Candidates {
    /// Being configured by an attach of this process.
    claimed: BTreeSet<u32>,
    /// Detached here, so probably free (oldest first: a device just let go
    /// is slower to configure again).
    detached: VecDeque<u32>,
}

fn candidates() -> std::sync::MutexGuard<'static, Candidates> {
    CANDIDATES.lock().unwrap_or_else(|p| p.into_inner())
}

/// Remember that loop device `dev` was detached here.
fn freed(dev: &Path) {
    let nr = dev
        .to_str()
        .and_then(|d| d.strip_prefix("/dev/loop"))
        .and_then(|n| n.parse().ok());
    if let Some(nr) = nr {
        let mut c = candidates();
        if c.detached.len() >= DETACHED_LIMIT {
            c.detached.pop_front();
        }
        c.detached.push_back(nr);
    }
}

/// A claimed loop number, given back when dropped.
struct Claim(u32);

impl Claim {
    /// A device this process detached, else the kernel's first free one
    /// (`free`), else the next one up that is neither bound nor claimed;
    /// never one in `tried`.
    fn take(free: u32, tried: &[u32]) -> Claim {
        let mut c = candidates();
        while let Some(n) = c.detached.pop_front() {
            if !c.claimed.contains(&n) && !tried.contains(&n) {
                c.claimed.insert(n);
                return Claim(n);
            }
        }
        let mut n = free;
        while c.claimed.contains(&n) || tried.contains(&n) || (n != free && is_bound(n)) {
            n += 1;
        }
        c.claimed.insert(n);
        Claim(n)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        candidates().claimed.remove(&self.0);
    }
}

/// Whether loop device `nr` has a backing file (its sysfs `loop` directory).
fn is_bound(nr: u32) -> bool {
    Path::new(&format!("/sys/block/loop{nr}/loop")).exists()
}

/// Attaches several loop devices (a lease's) with one open descriptor per
/// backing file and one on `/dev/loop-control`, instead of two opens each.
#[derive(Default)]
pub struct Attacher {
    ctl: Option<File>,
    backing: Vec<(PathBuf, File)>,
}

impl Attacher {
    fn backing(&mut self, path: &Path) -> Result<&File> {
        let at = match self.backing.iter().position(|(p, _)| p == path) {
            Some(i) => i,
            None => {
                let f = open_rw(path).map_err(|e| PoolError::io(path, "open loop backing", e))?;
                self.backing.push((path.to_path_buf(), f));
                self.backing.len() - 1
            }
        };
        Ok(&self.backing[at].1)
    }

    fn control(&mut self) -> Result<RawFd> {
        let f = match self.ctl.take() {
            Some(f) => f,
            None => open_rw(Path::new("/dev/loop-control"))
                .map_err(|e| PoolError::io("/dev/loop-control", "open", e))?,
        };
        Ok(self.ctl.insert(f).as_raw_fd())
    }

    /// Attach a loop device to `size` bytes of `backing` at `offset`.
    pub fn attach(
        &mut self,
        backing: &Path,
        offset: u64,
        size: u64,
        lv_uuid: &str,
    ) -> Result<PathBuf> {
        let ctl = self.control()?;
        let file = self.backing(backing)?.as_raw_fd();
        let mut info = zero_info();
        info.lo_offset = offset;
        info.lo_sizelimit = size;
        let name = format!("{MARK}{lv_uuid}");
        let n = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..n].copy_from_slice(&name.as_bytes()[..n]);
        // Another process may take the free device between GET_FREE and
        // CONFIGURE (EBUSY): try another.
        let mut tried = Vec::new();
        for _ in 0..64 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
            let free = unsafe { libc::ioctl(ctl, LOOP_CTL_GET_FREE) };
            if free < 0 {
                return Err(ioctl_err(
                    Path::new("/dev/loop-control"),
                    "LOOP_CTL_GET_FREE",
                ));
            }
            let claim = Claim::take(free as u32, &tried);
            tried.push(claim.0);
            let dev = PathBuf::from(format!("/dev/loop{}", claim.0));
            let lo = match open_rw(&dev) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // Past the last device: make this one (EEXIST: someone did).
                    // SAFETY: LOOP_CTL_ADD takes the device number.
                    unsafe { libc::ioctl(ctl, LOOP_CTL_ADD, claim.0 as libc::c_ulong) };
                    match open_rw(&dev) {
                        Ok(f) => f,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => continue,
                        Err(e) => return Err(PoolError::io(&dev, "open", e)),
                    }
                }
                // Another process is detaching (or removing) this device: it
                // refuses opens until it is run down. Try another.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => continue,
                Err(e) => return Err(PoolError::io(&dev, "open", e)),
            };
            for flags in [LO_FLAGS_DIRECT_IO, 0] {
                let mut cfg = LoopConfig {
                    fd: file as u32,
                    block_size: 0,
                    info,
                    reserved: [0; 8],
                };
                cfg.info.lo_flags = flags;
                // SAFETY: cfg is a valid struct loop_config that outlives the call.
                let r = unsafe {
                    libc::ioctl(lo.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig)
                };
                if r == 0 {
                    return Ok(dev);
                }
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // Backing file system without O_DIRECT: retry buffered.
                    Some(libc::EINVAL) if flags != 0 => continue,
                    Some(libc::EBUSY) => break,
                    _ => return Err(PoolError::io(&dev, "LOOP_CONFIGURE", e)),
                }
            }
        }
        Err(PoolError::Refused(
            "could not find a free loop device after 64 attempts".into(),
        ))
    }
}

fn status(dev: &Path) -> Option<LoopInfo64> {
    status_of(&File::open(dev).ok()?)
}

fn status_of(f: &File) -> Option<LoopInfo64> {
    let mut info = zero_info();
    // SAFETY: info is a valid, writable struct loop_info64.
    let r = unsafe {
        libc::ioctl(
            f.as_raw_fd(),
            LOOP_GET_STATUS64,
            &mut info as *mut LoopInfo64,
        )
    };
    (r == 0).then_some(info)
}

/// Names of the loop devices that may be bound. `/proc/partitions` lists
/// only devices with a size, so a host with a hundred idle loop devices
/// costs one read, not a hundred sysfs lookups (a bound device of size 0
/// is never devpool's); `/sys/block` when it cannot be read.
fn bound_candidates() -> Vec<String> {
    if let Ok(text) = std::fs::read_to_string("/proc/partitions") {
        return text
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3))
            .filter(|n| n.starts_with("loop"))
            .map(str::to_string)
            .collect();
    }
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return vec![];
    };
    dir.flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("loop"))
        .collect()
}

/// Whether this process may attach loop devices: root, or a user allowed
/// to write `/dev/loop-control` (without it, devpool still leases volumes
/// and serves them over NBD or vhost-user-blk).
pub fn usable() -> bool {
    // SAFETY: geteuid has no preconditions; access gets a NUL-terminated path.
    unsafe { libc::geteuid() == 0 || libc::access(c"/dev/loop-control".as_ptr(), libc::W_OK) == 0 }
}

/// Why a lease has no loop devices, for a user who may not attach them.
pub const NOT_USABLE: &str = "this user may not attach loop devices (not root, no write access to /dev/loop-control): serve the volumes instead (`devpool serve LV --nbd unix:PATH`, or `devpool run --export nbd`)";

/// How long [`list`] waits for the status of a loop device whose backing
/// file is on FUSE or a network file system (see [`status_bounded`]).
const SERVED_STATUS_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// [`status`] of a loop device, waiting at most [`SERVED_STATUS_WAIT`] when
/// its backing file is on a file system that asks a server: the kernel
/// answers `LOOP_GET_STATUS64` only after asking the file system for the
/// file's attributes, and a stopped FUSE server would hold the caller (and
/// every release, cleanup and teardown) for as long as it is stopped (see
/// [`devpool_engine::hostfs::within`] for the helper left waiting).
fn status_bounded(
    dev: &Path,
    backing: &Path,
    mounts: &[crate::sysblk::Mount],
) -> Option<LoopInfo64> {
    if !crate::sysblk::mount_of(mounts, backing).is_some_and(crate::sysblk::Mount::asks_a_server) {
        return status(dev);
    }
    let owned = dev.to_path_buf();
    devpool_engine::hostfs::within(dev, SERVED_STATUS_WAIT, move || status(&owned)).flatten()
}

/// Every loop device devpool attached (found by its mark). One whose
/// backing file's server does not answer in time is left out.
pub fn list() -> Vec<Attached> {
    let mut out = Vec::new();
    let mut mounts = None;
    for name in bound_candidates() {
        // Bound devices have a loop/ directory with a backing_file.
        let Some(backing) =
            crate::sysblk::backing_file(Path::new(&format!("/sys/block/{name}/loop/backing_file")))
        else {
            continue;
        };
        let dev = PathBuf::from(format!("/dev/{name}"));
        let mounts = mounts.get_or_insert_with(crate::sysblk::mounts_cached);
        let Some(info) = status_bounded(&dev, &backing, mounts) else {
            continue;
        };
        let end = info
            .lo_file_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(LO_NAME_SIZE);
        let fname = String::from_utf8_lossy(&info.lo_file_name[..end]).to_string();
        if let Some(uuid) = fname.strip_prefix(MARK) {
            out.push(Attached {
                device: dev,
                backing,
                lv_uuid: uuid.to_string(),
                offset: info.lo_offset,
                size: info.lo_sizelimit,
            });
        }
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    out
}

/// Detach a loop device (the kernel defers it while someone holds it open).
pub fn detach(dev: &Path) -> Result<()> {
    let f = File::open(dev).map_err(|e| PoolError::io(dev, "open", e))?;
    // SAFETY: LOOP_CLR_FD takes no argument.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        // Already detached by someone else: done.
        if e.raw_os_error() != Some(libc::ENXIO) {
            return Err(PoolError::io(dev, "LOOP_CLR_FD", e));
        }
    }
    drop(f);
    freed(dev);
    Ok(())
}

/// `a.device`, opened, if it is still the loop device [`list`] saw. A loop
/// device listed a moment ago may have been detached by its owner and taken
/// by someone else since; while we hold it open its binding cannot change
/// (a detach is deferred to the last close), so checking on this fd is safe.
fn open_same(a: &Attached) -> Option<(File, LoopInfo64)> {
    let f = File::open(&a.device).ok()?;
    let info = status_of(&f)?;
    is_same(a, &info).then_some((f, info))
}

/// Whether `info` (a bound loop device's status) is still `a`'s binding.
fn is_same(a: &Attached, info: &LoopInfo64) -> bool {
    let end = info
        .lo_file_name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(LO_NAME_SIZE);
    info.lo_file_name[..end].strip_prefix(MARK.as_bytes()) == Some(a.lv_uuid.as_bytes())
        && info.lo_offset == a.offset
}

/// Detach a loop device [`list`] reported, unless it has changed hands
/// since (then `Ok(false)`: it is someone else's now).
pub fn detach_attached(a: &Attached) -> Result<bool> {
    let Some((f, _)) = open_same(a) else {
        return Ok(false);
    };
    // SAFETY: LOOP_CLR_FD takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ENXIO) {
            return Err(PoolError::io(&a.device, "LOOP_CLR_FD", e));
        }
    }
    // The device is let go at this last close (unless someone else holds it).
    drop(f);
    freed(&a.device);
    Ok(true)
}

/// Detach a device [`list`] reported (or devpool attached) unless it has
/// changed hands since, and give its node back to root; true when it was
/// detached here.
pub fn give_back(a: &Attached) -> bool {
    let done = detach_attached(a).is_ok_and(|d| d);
    if done {
        chown_back(&a.device);
    }
    done
}

/// What [`detach_unless_used`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detach {
    /// Detached (it was bound to this volume and nobody else had it open).
    Done,
    /// Left attached: these use it (a mount, a holder, open descriptors).
    InUse(Vec<String>),
    /// Not this volume's device any more (detached, or taken by someone else).
    Gone,
}

/// How long [`detach_unless_used`] waits, each time, for a device another
/// process has open to be closed before trying again: about a third of a
/// second in all. Most such openers are gone within a millisecond (another
/// thread or process listing loop devices reads each one's status); udev's
/// `blkid` after a change takes a few.
const PAUSES_FOR_OPENERS_MS: [u64; 8] = [1, 2, 5, 10, 20, 40, 80, 160];

/// Detach a device [`list`] reported unless anyone else uses it. The test
/// is the kernel's own, so nothing can open the device between the check
/// and the detach: held here exclusively (which fails when it is mounted or
/// claimed), LOOP_CLR_FD runs the device down at once when this is its
/// only opener, and otherwise only marks it to be cleared at the last
/// close, which is undone here. A device opened for a moment is tried
/// again for about a third of a second ([`PAUSES_FOR_OPENERS_MS`]). Only a
/// refusal scans /proc to name the users.
pub fn detach_unless_used(a: &Attached) -> Result<Detach> {
    let mut pauses = PAUSES_FOR_OPENERS_MS.iter();
    loop {
        match try_detach_unless_used(a)? {
            Detach::InUse(_) => match pauses.next() {
                Some(ms) => std::thread::sleep(std::time::Duration::from_millis(*ms)),
                None => return Ok(Detach::InUse(in_use_by(&a.device))),
            },
            other => return Ok(other),
        }
    }
}

/// One try of [`detach_unless_used`] (users not named yet).
fn try_detach_unless_used(a: &Attached) -> Result<Detach> {
    let f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL | libc::O_CLOEXEC)
        .open(&a.device)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Ok(Detach::InUse(Vec::new()));
        }
        Err(_) => return Ok(Detach::Gone),
    };
    if !status_of(&f).is_some_and(|info| is_same(a, &info)) {
        return Ok(Detach::Gone);
    }
    // SAFETY: LOOP_CLR_FD takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_CLR_FD) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(Detach::Gone);
        }
        return Err(PoolError::io(&a.device, "LOOP_CLR_FD", e));
    }
    // Run down (no status any more): ours alone, cleared when we close it.
    let Some(mut info) = status_of(&f) else {
        drop(f);
        freed(&a.device);
        // A leased node may belong to the sudo user: root's again before reuse.
        chown_back(&a.device);
        return Ok(Detach::Done);
    };
    // Still bound: someone else has it open. Keep it attached.
    info.lo_flags &= !LO_FLAGS_AUTOCLEAR;
    // SAFETY: info is a valid struct loop_info64 read from this device.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_SET_STATUS64, &info as *const LoopInfo64) } != 0 {
        return Err(ioctl_err(&a.device, "LOOP_SET_STATUS64 (keep attached)"));
    }
    drop(f);
    Ok(Detach::InUse(Vec::new()))
}

/// [`users`], or a generic answer when they are gone already.
fn in_use_by(dev: &Path) -> Vec<String> {
    let who = users(dev);
    if who.is_empty() {
        vec!["open by another process".into()]
    } else {
        who
    }
}

/// Who uses a block device besides this process: a mount or another
/// exclusive holder (O_EXCL fails), and every process with it open (see
/// [`crate::sysblk::openers`]). Empty when detaching it is safe.
pub fn users(dev: &Path) -> Vec<String> {
    let Some(d) = crate::sysblk::block_devnum(dev) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if crate::sysblk::held_exclusively(dev) {
        out.push("mounted or held exclusively (a file system, device-mapper, md…)".into());
    }
    out.extend(
        crate::sysblk::openers(&[d], &[])
            .iter()
            .map(|o| o.to_string()),
    );
    out
}

/// Change the window of a loop device [`list`] reported, after a resize.
pub fn set_window(a: &Attached, offset: u64, size: u64) -> Result<()> {
    let dev = a.device.as_path();
    let (f, mut info) = open_same(a).ok_or_else(|| {
        PoolError::Refused(format!("{} is no longer this volume's", dev.display()))
    })?;
    info.lo_offset = offset;
    info.lo_sizelimit = size;
    // SAFETY: info is a valid struct loop_info64.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_SET_STATUS64, &info as *const LoopInfo64) } != 0 {
        return Err(ioctl_err(dev, "LOOP_SET_STATUS64"));
    }
    // SAFETY: LOOP_SET_CAPACITY takes no argument.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_SET_CAPACITY, 0) } != 0 {
        return Err(ioctl_err(dev, "LOOP_SET_CAPACITY"));
    }
    Ok(())
}

/// Give a device node to the user who ran devpool through sudo.
pub fn chown_to_sudo_user(dev: &Path) {
    if let Some((uid, gid)) = sudo_user() {
        chown_to(dev, uid, gid);
    }
}

/// The user and group who ran devpool through sudo (`SUDO_UID`/`SUDO_GID`).
pub fn sudo_user() -> Option<(u32, u32)> {
    let id = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u32>().ok());
    Some((id("SUDO_UID")?, id("SUDO_GID")?))
}

/// Best effort: the device still works for root if this fails.
pub fn chown_to(dev: &Path, uid: u32, gid: u32) {
    let _ = std::os::unix::fs::chown(dev, Some(uid), Some(gid));
}

/// Give a device node back to root:disk before it is reused.
pub fn chown_back(dev: &Path) {
    let _ = std::os::unix::fs::chown(dev, Some(0), Some(6));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
