//! Device-mapper, as the kernel offers it: its devices listed from sysfs
//! (no ioctl, so nothing here needs the control node to find which LVs of
//! a VG the kernel has active, with LVM2's layers over them), and the ioctl
//! interface on `/dev/mapper/control` (version 4): create, load, suspend,
//! resume, status, remove, and target messages. The engine sends a thin
//! pool's changes as messages while dm-thin holds the pool; the pool
//! crate's `dmdev` builds device stacks on these calls.

use crate::error::{EngineError, Result};
use devpool_format::dm::Target;
use devpool_format::metadata::VgMetadata;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const CONTROL: &str = "/dev/mapper/control";

/// The ioctl interface version this code speaks (4.0.0 is enough for
/// create, load, resume, status and remove).
const VERSION: [u32; 3] = [4, 0, 0];
const NAME_LEN: usize = 128;
const UUID_LEN: usize = 129;
/// `struct dm_ioctl`: 312 bytes; the data follows it.
const HEADER: usize = 312;
/// `struct dm_target_spec` before its parameter string.
const SPEC: usize = 40;

const READONLY_FLAG: u32 = 1 << 0;
const SUSPEND_FLAG: u32 = 1 << 1;
const DEFERRED_REMOVE: u32 = 1 << 17;

/// `_IOWR(0xfd, nr, struct dm_ioctl)`.
const fn iowr(nr: u32) -> libc::c_ulong {
    ((3u32 << 30) | ((HEADER as u32) << 16) | (0xfd << 8) | nr) as libc::c_ulong
}
const DEV_CREATE: libc::c_ulong = iowr(3);
const DEV_REMOVE: libc::c_ulong = iowr(4);
const DEV_SUSPEND: libc::c_ulong = iowr(6);
const DEV_STATUS: libc::c_ulong = iowr(7);
const TABLE_LOAD: libc::c_ulong = iowr(9);
const TABLE_CLEAR: libc::c_ulong = iowr(10);
const TABLE_STATUS: libc::c_ulong = iowr(12);
const TARGET_MSG: libc::c_ulong = iowr(14);

/// A device-mapper device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmDevice {
    pub name: String,
    pub uuid: String,
    pub major: u32,
    pub minor: u32,
    pub open_count: i32,
}

impl DmDevice {
    /// The kernel's node for it (devtmpfs makes it, udev or not).
    pub fn node(&self) -> PathBuf {
        PathBuf::from(format!("/dev/dm-{}", self.minor))
    }
}

/// Every device-mapper device, from sysfs (empty at once on hosts without
/// device-mapper: release and cleanup ask on every call).
pub fn list() -> Vec<DmDevice> {
    if !Path::new("/sys/module/dm_mod").exists() {
        return Vec::new();
    }
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out: Vec<DmDevice> = dir
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("dm-"))
        .filter_map(|e| {
            let base = e.path();
            let read = |f: &str| std::fs::read_to_string(base.join(f)).ok();
            let name = read("dm/name")?.trim_end().to_string();
            let uuid = read("dm/uuid").unwrap_or_default().trim_end().to_string();
            let dev = read("dev")?;
            let (major, minor) = dev.trim().split_once(':')?;
            let holders = std::fs::read_dir(base.join("holders")).map_or(0, |d| d.count());
            Some(DmDevice {
                name,
                uuid,
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                // sysfs has no open count; holders (devices stacked on it)
                // are the part of it that can be read without the ioctl.
                open_count: holders as i32,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Whether dm uuid `u` is one of `uuids`, or one of them followed by `-`
/// and a layer (LVM2's `-real`, `-cow`, `-tpool`…).
fn is_of(uuids: &[String], u: &str) -> bool {
    uuids.iter().any(|w| {
        u.strip_prefix(w.as_str())
            .is_some_and(|r| r.is_empty() || r.starts_with('-'))
    })
}

/// The devices device-mapper has active for LVs of `meta` (by their raw
/// uuids): each LV's own device and LVM2's layers over it (see [`is_of`]),
/// visible ones first (LVM2 stacks an LV's visible device over its layers,
/// so that is the order to remove them in).
pub fn active_for_lvs<'a>(
    meta: &VgMetadata,
    lv_uuids: impl IntoIterator<Item = &'a str>,
) -> Vec<DmDevice> {
    let uuids: Vec<String> = lv_uuids
        .into_iter()
        .map(|u| devpool_format::dm::uuid(meta.id.raw_str(), u))
        .collect();
    if uuids.is_empty() {
        return Vec::new();
    }
    let mut found: Vec<DmDevice> = list()
        .into_iter()
        .filter(|d| is_of(&uuids, &d.uuid))
        .collect();
    found.sort_by_key(|d| d.uuid.len());
    found
}

/// The device through which dm-thin holds the VG's thin pool (LVM2's
/// `-tpool` layer, the pool itself or its hidden data and metadata LVs),
/// when the kernel has it active: its metadata is then the kernel's, and
/// changed only by messages to it.
pub fn thin_pool_held(meta: &VgMetadata) -> Option<DmDevice> {
    let pool = crate::ops::thin::the_thin_pool(meta)?;
    let uuids: Vec<&str> = [&pool.pool, &pool.tmeta, &pool.tdata]
        .into_iter()
        .filter_map(|n| meta.lv(n))
        .map(|l| l.id.raw_str())
        .collect();
    active_for_lvs(meta, uuids).into_iter().next()
}

/// One ioctl buffer: the header, then `data`.
struct Ioctl {
    buf: Vec<u64>,
}

impl Ioctl {
    fn new(name: &str, uuid: &str, flags: u32, data: &[u8]) -> Result<Ioctl> {
        if name.is_empty() || name.len() >= NAME_LEN || name.contains('/') {
            return Err(EngineError::Invalid(format!(
                "device-mapper name '{name}' is empty, has a '/' or is longer than {} bytes",
                NAME_LEN - 1
            )));
        }
        if uuid.len() >= UUID_LEN {
            return Err(EngineError::Invalid(format!(
                "device-mapper uuid '{uuid}' is longer than {} bytes",
                UUID_LEN - 1
            )));
        }
        let size = HEADER + data.len();
        let mut io = Ioctl {
            buf: vec![0u64; size.div_ceil(8)],
        };
        let total = (io.buf.len() * 8) as u32;
        let b = io.bytes_mut();
        for (i, v) in VERSION.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
        }
        b[12..16].copy_from_slice(&total.to_ne_bytes());
        b[16..20].copy_from_slice(&(HEADER as u32).to_ne_bytes());
        b[28..32].copy_from_slice(&flags.to_ne_bytes());
        b[48..48 + name.len()].copy_from_slice(name.as_bytes());
        b[176..176 + uuid.len()].copy_from_slice(uuid.as_bytes());
        b[HEADER..HEADER + data.len()].copy_from_slice(data);
        Ok(io)
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: a u64 buffer viewed as bytes (u8 has no alignment needs).
        unsafe { std::slice::from_raw_parts_mut(self.buf.as_mut_ptr().cast(), self.buf.len() * 8) }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: as above, shared.
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast(), self.buf.len() * 8) }
    }

    fn set_target_count(&mut self, n: u32) {
        self.bytes_mut()[20..24].copy_from_slice(&n.to_ne_bytes());
    }

    fn u32_at(&self, at: usize) -> u32 {
        let mut v = [0u8; 4];
        v.copy_from_slice(&self.bytes()[at..at + 4]);
        u32::from_ne_bytes(v)
    }

    fn dev(&self) -> u64 {
        let mut v = [0u8; 8];
        v.copy_from_slice(&self.bytes()[40..48]);
        u64::from_ne_bytes(v)
    }

    fn run(&mut self, control: &File, cmd: libc::c_ulong) -> std::io::Result<()> {
        // SAFETY: the buffer is as long as its data_size says, and starts
        // with a dm_ioctl header.
        let r = unsafe { libc::ioctl(control.as_raw_fd(), cmd, self.buf.as_mut_ptr()) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn device(&self, name: &str, uuid: &str) -> DmDevice {
        let dev = self.dev();
        // The kernel encodes dev_t as new_encode_dev: minor's low byte, the
        // major, then the minor's high bits.
        DmDevice {
            name: name.to_string(),
            uuid: uuid.to_string(),
            major: ((dev >> 8) & 0xfff) as u32,
            minor: ((dev & 0xff) | ((dev >> 12) & 0xfff_ff00)) as u32,
            open_count: self.u32_at(24) as i32,
        }
    }
}

/// The target specs of a table load, each 8-byte aligned.
fn specs(targets: &[Target]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for t in targets {
        if t.kind.len() >= 16 {
            return Err(EngineError::Invalid(format!(
                "target type {} is too long",
                t.kind
            )));
        }
        let len = (SPEC + t.params.len() + 1).next_multiple_of(8);
        let at = out.len();
        out.resize(at + len, 0);
        let s = &mut out[at..];
        s[0..8].copy_from_slice(&t.start.to_ne_bytes());
        s[8..16].copy_from_slice(&t.sectors.to_ne_bytes());
        s[20..24].copy_from_slice(&(len as u32).to_ne_bytes());
        s[24..24 + t.kind.len()].copy_from_slice(t.kind.as_bytes());
        s[SPEC..SPEC + t.params.len()].copy_from_slice(t.params.as_bytes());
    }
    Ok(out)
}

fn control() -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(CONTROL)
        .map_err(|e| io_err(CONTROL, "open", e))
}

/// Create `name` (uuid `uuid`) with `targets` as its table, resumed. A
/// device left half made by a failed step is removed again.
pub fn create(name: &str, uuid: &str, targets: &[Target], read_only: bool) -> Result<DmDevice> {
    let ctl = control()?;
    let fail = |op: &str, e| io_err(format!("{CONTROL} ({name})"), op, e);
    let mut io = Ioctl::new(name, uuid, 0, &[])?;
    io.run(&ctl, DEV_CREATE)
        .map_err(|e| fail("DM_DEV_CREATE", e))?;
    let made = io.device(name, uuid);
    let rest = || -> Result<()> {
        load(name, targets, read_only)?;
        resume(name)
    };
    if let Err(e) = rest() {
        let _ = Ioctl::new(name, "", 0, &[]).map(|mut r| r.run(&ctl, DEV_REMOVE));
        return Err(e);
    }
    Ok(made)
}

/// Load `targets` as `name`'s next table (live at its next resume).
pub fn load(name: &str, targets: &[Target], read_only: bool) -> Result<()> {
    let ctl = control()?;
    let flags = if read_only { READONLY_FLAG } else { 0 };
    let mut load = Ioctl::new(name, "", flags, &specs(targets)?)?;
    load.set_target_count(targets.len() as u32);
    load.run(&ctl, TABLE_LOAD)
        .map_err(|e| io_err(format!("{CONTROL} ({name})"), "DM_TABLE_LOAD", e))
}

/// An ioctl on `name` that carries nothing but its flags.
fn bare(name: &str, flags: u32, cmd: libc::c_ulong, op: &str) -> Result<()> {
    let ctl = control()?;
    Ioctl::new(name, "", flags, &[])?
        .run(&ctl, cmd)
        .map_err(|e| io_err(format!("{CONTROL} ({name})"), op, e))
}

/// Drop the table loaded for `name`'s next resume (a change given up).
pub fn clear(name: &str) -> Result<()> {
    bare(name, 0, TABLE_CLEAR, "DM_TABLE_CLEAR")
}

/// The device called `name`, if there is one.
pub fn info(name: &str) -> Result<Option<DmDevice>> {
    let ctl = control()?;
    let mut io = Ioctl::new(name, "", 0, &[])?;
    match io.run(&ctl, DEV_STATUS) {
        Ok(()) => {
            let end = io.bytes()[176..176 + UUID_LEN]
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(UUID_LEN);
            let uuid = String::from_utf8_lossy(&io.bytes()[176..176 + end]).into_owned();
            Ok(Some(io.device(name, &uuid)))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        Err(e) => Err(io_err(format!("{CONTROL} ({name})"), "DM_DEV_STATUS", e)),
    }
}

/// Remove `name`. A device that is briefly open (udev probing it after a
/// change) is tried again for up to two seconds; one still open then is
/// left to the kernel to remove at its last close, and `Ok(false)` says so.
pub fn remove(name: &str) -> Result<bool> {
    let ctl = control()?;
    for _ in 0..40 {
        match Ioctl::new(name, "", 0, &[])?.run(&ctl, DEV_REMOVE) {
            Ok(()) => return Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => {
                return Err(io_err(format!("{CONTROL} ({name})"), "DM_DEV_REMOVE", e));
            }
        }
    }
    Ioctl::new(name, "", DEFERRED_REMOVE, &[])?
        .run(&ctl, DEV_REMOVE)
        .map_err(|e| io_err(format!("{CONTROL} ({name})"), "DM_DEV_REMOVE (deferred)", e))?;
    Ok(false)
}

fn io_err(path: impl Into<PathBuf>, op: &str, err: std::io::Error) -> EngineError {
    EngineError::Io {
        path: path.into(),
        op: op.into(),
        err,
    }
}

/// Suspend `name` (its I/O drains; new I/O waits until it resumes).
pub fn suspend(name: &str) -> Result<()> {
    bare(name, SUSPEND_FLAG, DEV_SUSPEND, "DM_DEV_SUSPEND")
}

/// Resume `name` (after [`suspend`], or a table load).
pub fn resume(name: &str) -> Result<()> {
    // No suspend flag: resume, making a loaded table live.
    bare(name, 0, DEV_SUSPEND, "DM_DEV_SUSPEND (resume)")
}

/// The status line of each target of `name`'s live table (dm-thin's pool:
/// `<transaction id> <used meta>/<total meta> <used data>/<total data> …`).
pub fn status(name: &str) -> Result<Vec<String>> {
    let ctl = control()?;
    let mut io = Ioctl::new(name, "", 0, &vec![0u8; 16 << 10])?;
    io.run(&ctl, TABLE_STATUS)
        .map_err(|e| io_err(format!("{CONTROL} ({name})"), "DM_TABLE_STATUS", e))?;
    let b = io.bytes();
    let (start, count) = (io.u32_at(16) as usize, io.u32_at(20) as usize);
    let mut out = Vec::with_capacity(count);
    let mut at = start;
    for _ in 0..count {
        let spec = b.get(at..at + SPEC).ok_or_else(|| {
            EngineError::Invalid(format!("{name}: the kernel's status runs past its buffer"))
        })?;
        let next = u32::from_ne_bytes([spec[20], spec[21], spec[22], spec[23]]) as usize;
        let text = &b[(at + SPEC).min(b.len())..];
        let end = text.iter().position(|&c| c == 0).unwrap_or(text.len());
        out.push(String::from_utf8_lossy(&text[..end]).into_owned());
        // In results, `next` counts from the start of the data (in table
        // loads, from the spec's own start).
        if start + next <= at {
            break;
        }
        at = start + next;
    }
    Ok(out)
}

/// A dm-thin pool's status: its transaction, and metadata blocks (4 KiB)
/// and data blocks used of all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinPoolStatus {
    pub transaction_id: u64,
    pub metadata_used: u64,
    pub metadata_blocks: u64,
    pub data_used: u64,
    pub data_blocks: u64,
}

impl ThinPoolStatus {
    /// `<transaction id> <used>/<total metadata> <used>/<total data> …`
    /// (a failed pool says `Fail`, one out of metadata space more after).
    pub fn parse(line: &str) -> Option<ThinPoolStatus> {
        let mut f = line.split_whitespace();
        let pair = |s: Option<&str>| -> Option<(u64, u64)> {
            let (a, b) = s?.split_once('/')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        };
        let transaction_id = f.next()?.parse().ok()?;
        let (metadata_used, metadata_blocks) = pair(f.next())?;
        let (data_used, data_blocks) = pair(f.next())?;
        Some(ThinPoolStatus {
            transaction_id,
            metadata_used,
            metadata_blocks,
            data_used,
            data_blocks,
        })
    }
}

/// The status of the dm-thin pool device `name`.
pub fn thin_pool_status(name: &str) -> Result<ThinPoolStatus> {
    let st = status(name)?;
    st.first()
        .and_then(|l| ThinPoolStatus::parse(l))
        .ok_or_else(|| {
            EngineError::Invalid(format!(
                "{name}: no thin-pool status from the kernel ({st:?}; a failed pool reports 'Fail')"
            ))
        })
}

/// The `-tpool` device through which dm-thin holds the VG's thin pool.
pub fn thin_pool_device(meta: &VgMetadata) -> Option<DmDevice> {
    let pool = crate::ops::thin::the_thin_pool(meta)?;
    let uuid = meta.lv(&pool.pool)?.id.raw_str().to_string();
    let want = format!(
        "{}-tpool",
        devpool_format::dm::uuid(meta.id.raw_str(), &uuid)
    );
    list().into_iter().find(|d| d.uuid == want)
}

/// The device of LV `lv` itself (no layer), if the kernel has it active.
pub fn lv_device(meta: &VgMetadata, lv: &str) -> Option<DmDevice> {
    let l = meta.lv(lv)?;
    let want = devpool_format::dm::uuid(meta.id.raw_str(), l.id.raw_str());
    list().into_iter().find(|d| d.uuid == want)
}

/// Send `text` to the target at sector 0 of `name` (dm-thin's pool takes
/// `create_thin`, `create_snap`, `delete`, `set_transaction_id`, and
/// commits its metadata after each).
pub fn message(name: &str, text: &str) -> Result<()> {
    let ctl = control()?;
    // struct dm_target_msg: the sector, then the message, NUL-terminated.
    let mut data = vec![0u8; 8 + text.len() + 1];
    data[8..8 + text.len()].copy_from_slice(text.as_bytes());
    Ioctl::new(name, "", 0, &data)?
        .run(&ctl, TARGET_MSG)
        .map_err(|e| {
            io_err(
                format!("{CONTROL} ({name})"),
                &format!("DM_TARGET_MSG '{text}'"),
                e,
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_lvs_devices_are_its_uuid_and_its_layers_not_a_longer_uuid() {
        let mine = vec!["LVM-vgAlvB".to_string()];
        assert!(is_of(&mine, "LVM-vgAlvB"));
        assert!(is_of(&mine, "LVM-vgAlvB-real"));
        assert!(is_of(&mine, "LVM-vgAlvB-tpool"));
        assert!(!is_of(&mine, "LVM-vgAlvBx"));
        assert!(!is_of(&mine, "LVM-vgAlv"));
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // _IOWR(0xfd, 3, struct dm_ioctl) as glibc computes it: 0xc138fd03.
        assert_eq!(DEV_CREATE, 0xc138_fd03);
        assert_eq!(TABLE_LOAD, 0xc138_fd09);
        assert_eq!(DEV_REMOVE, 0xc138_fd04);
    }

    #[test]
    fn the_header_carries_version_sizes_flags_name_and_uuid_where_the_kernel_reads_them() {
        let io = Ioctl::new("vg-lv", "LVM-x", READONLY_FLAG, b"abc").unwrap();
        let b = io.bytes();
        assert_eq!(io.u32_at(0), 4);
        assert_eq!(io.u32_at(12) as usize, b.len());
        assert_eq!(io.u32_at(16) as usize, HEADER);
        assert_eq!(io.u32_at(28), READONLY_FLAG);
        assert_eq!(&b[48..53], b"vg-lv");
        assert_eq!(b[53], 0);
        assert_eq!(&b[176..181], b"LVM-x");
        assert_eq!(&b[HEADER..HEADER + 3], b"abc");
    }

    #[test]
    fn names_the_kernel_would_refuse_are_refused_here() {
        assert!(Ioctl::new("", "", 0, &[]).is_err());
        assert!(Ioctl::new("a/b", "", 0, &[]).is_err());
        assert!(Ioctl::new(&"n".repeat(128), "", 0, &[]).is_err());
        assert!(Ioctl::new("ok", &"u".repeat(129), 0, &[]).is_err());
    }

    #[test]
    fn target_specs_are_aligned_and_chained_by_their_length() {
        let t = |start, params: &str| Target {
            start,
            sectors: 8,
            kind: "linear",
            params: params.into(),
        };
        let s = specs(&[t(0, "7:0 0"), t(8, "7:1 2048")]).unwrap();
        assert_eq!(s.len(), 48 + 56);
        assert_eq!(u32::from_ne_bytes(s[20..24].try_into().unwrap()), 48);
        assert_eq!(&s[24..30], b"linear");
        assert_eq!(&s[40..45], b"7:0 0");
        assert_eq!(s[45], 0);
        assert_eq!(u64::from_ne_bytes(s[48..56].try_into().unwrap()), 8);
        assert_eq!(&s[88..96], b"7:1 2048");
    }

    #[test]
    fn the_kernels_dev_encoding_decodes_to_major_and_minor() {
        let mut io = Ioctl::new("x", "", 0, &[]).unwrap();
        // major 254, minor 300: (300 & 0xff) | (254 << 8) | ((300 & !0xff) << 12)
        let dev: u64 = (300 & 0xff) | (254 << 8) | ((300 & !0xff) << 12);
        io.bytes_mut()[40..48].copy_from_slice(&dev.to_ne_bytes());
        let d = io.device("x", "");
        assert_eq!((d.major, d.minor), (254, 300));
        assert_eq!(d.node(), PathBuf::from("/dev/dm-300"));
    }

    #[test]
    fn a_thin_pool_status_line_gives_its_transaction_and_usage() {
        let line = "7 18/4096 1024/8192 - rw discard_passdown queue_if_no_space - 1024";
        assert_eq!(
            ThinPoolStatus::parse(line),
            Some(ThinPoolStatus {
                transaction_id: 7,
                metadata_used: 18,
                metadata_blocks: 4096,
                data_used: 1024,
                data_blocks: 8192,
            })
        );
        assert_eq!(ThinPoolStatus::parse("Fail"), None);
        assert_eq!(ThinPoolStatus::parse("3 18/4096"), None);
        assert_eq!(ThinPoolStatus::parse(""), None);
    }

    #[test]
    fn a_target_message_is_its_sector_then_the_text() {
        assert_eq!(TARGET_MSG, 0xc138_fd0e);
        assert_eq!(DEV_SUSPEND, 0xc138_fd06);
    }
}
