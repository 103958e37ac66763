//! Device-mapper devices over a volume's extents, through the kernel's
//! ioctl interface on `/dev/mapper/control` (version 4): create a device,
//! load its table, resume it; find, and remove, the devices of LVs.
//!
//! Devices are named as LVM2 names its activated LVs (`vg-lv`, uuid
//! `LVM-<vg uuid><lv uuid>`, see [`devpool_format::dm`]): LVM2 then sees
//! the LV as active, and refuses to remove it while it is open.

use crate::error::{PoolError, Result};
use devpool_format::dm::Target;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use devpool_engine::dmlist::{DmDevice, active_for_lvs, list};

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

/// Whether this host has device-mapper (loading `dm_mod` if it is a
/// module). `/dev/mapper/control` is no sign: distributions create the node
/// statically, driver or not (this machine has it without dm); the module's
/// sysfs directory is there when dm is loaded or built in.
pub fn available() -> bool {
    crate::sysblk::loaded_or_probed("dm_mod", Path::new("/sys/module/dm_mod"))
}

/// One ioctl buffer: the header, then `data`.
struct Ioctl {
    buf: Vec<u64>,
}

impl Ioctl {
    fn new(name: &str, uuid: &str, flags: u32, data: &[u8]) -> Result<Ioctl> {
        if name.is_empty() || name.len() >= NAME_LEN || name.contains('/') {
            return Err(PoolError::Invalid(format!(
                "device-mapper name '{name}' is empty, has a '/' or is longer than {} bytes",
                NAME_LEN - 1
            )));
        }
        if uuid.len() >= UUID_LEN {
            return Err(PoolError::Invalid(format!(
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
            return Err(PoolError::Invalid(format!(
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
        .map_err(|e| PoolError::io(CONTROL, "open", e))
}

/// Create `name` (uuid `uuid`) with `targets` as its table, resumed. A
/// device left half made by a failed step is removed again.
pub fn create(name: &str, uuid: &str, targets: &[Target], read_only: bool) -> Result<DmDevice> {
    let ctl = control()?;
    let fail = |op: &str, e| PoolError::io(format!("{CONTROL} ({name})"), op, e);
    let mut io = Ioctl::new(name, uuid, 0, &[])?;
    io.run(&ctl, DEV_CREATE)
        .map_err(|e| fail("DM_DEV_CREATE", e))?;
    let made = io.device(name, uuid);
    let rest = || -> Result<()> {
        let flags = if read_only { READONLY_FLAG } else { 0 };
        let mut load = Ioctl::new(name, "", flags, &specs(targets)?)?;
        load.set_target_count(targets.len() as u32);
        load.run(&ctl, TABLE_LOAD)
            .map_err(|e| fail("DM_TABLE_LOAD", e))?;
        // No suspend flag: resume, making the loaded table live.
        Ioctl::new(name, "", 0, &[])?
            .run(&ctl, DEV_SUSPEND)
            .map_err(|e| fail("DM_DEV_SUSPEND (resume)", e))
    };
    if let Err(e) = rest() {
        let _ = Ioctl::new(name, "", 0, &[]).map(|mut r| r.run(&ctl, DEV_REMOVE));
        return Err(e);
    }
    Ok(made)
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
        Err(e) => Err(PoolError::io(
            format!("{CONTROL} ({name})"),
            "DM_DEV_STATUS",
            e,
        )),
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
                return Err(PoolError::io(
                    format!("{CONTROL} ({name})"),
                    "DM_DEV_REMOVE",
                    e,
                ));
            }
        }
    }
    Ioctl::new(name, "", DEFERRED_REMOVE, &[])?
        .run(&ctl, DEV_REMOVE)
        .map_err(|e| PoolError::io(format!("{CONTROL} ({name})"), "DM_DEV_REMOVE (deferred)", e))?;
    Ok(false)
}

/// The LV a device maps, named as LVM2 names it.
#[derive(Debug, Clone)]
pub struct LvIdentity<'a> {
    pub vg: &'a str,
    /// Without dashes.
    pub vg_uuid: &'a str,
    pub lv: &'a str,
    /// Without dashes.
    pub lv_uuid: &'a str,
}

impl LvIdentity<'_> {
    pub fn name(&self) -> String {
        devpool_format::dm::name(self.vg, self.lv)
    }
    pub fn uuid(&self) -> String {
        devpool_format::dm::uuid(self.vg_uuid, self.lv_uuid)
    }
    /// A layer under the LV's device, as LVM2 names it (`-real`, `-cow`).
    pub fn layer(&self, layer: &str) -> (String, String) {
        (
            format!("{}-{layer}", self.name()),
            format!("{}-{layer}", self.uuid()),
        )
    }
}

/// What one device of a stack maps.
#[derive(Debug, Clone)]
pub enum Table {
    /// A linear or striped volume on the PVs.
    Map(devpool_format::map::VolumeMap),
    /// One target of `sectors` whose parameters name devices made before it
    /// in the same stack (by index).
    Over {
        kind: &'static str,
        sectors: u64,
        params: Vec<Param>,
    },
}

#[derive(Debug, Clone)]
pub enum Param {
    Text(String),
    /// `MAJ:MIN` of the stack's device at this index.
    Layer(usize),
}

/// One device of a stack, made after the ones before it.
#[derive(Debug, Clone)]
pub struct Layer {
    pub name: String,
    pub uuid: String,
    pub table: Table,
    pub read_only: bool,
    /// Shared with other stacks (a thin pool's devices under its thin
    /// volumes): used as it is when it exists with its uuid, and removed
    /// only when no device is stacked on it any more.
    pub shared: bool,
}

/// A volume activated with device-mapper: one device, or a stack (an
/// origin with its snapshots).
#[derive(Debug)]
pub struct Activated {
    /// The devices, in the order they were made.
    pub devices: Vec<DmDevice>,
    /// Per device: shared with other stacks ([`Layer::shared`]).
    shared: Vec<bool>,
    /// Loop devices made under them (one per image-file PV, over the span of
    /// the extents the stack maps there: the PV's label stays out of sight).
    loops: Vec<PathBuf>,
    /// Whether this activation made the volume's devices (else they were
    /// active already, with the volume's size, and are left as they are).
    pub made: bool,
}

impl Activated {
    /// The device called `name`.
    pub fn device(&self, name: &str) -> Option<&DmDevice> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// Remove the devices (if this activation made them), top first, and
    /// then the shared ones nothing is stacked on any more (whoever made
    /// them); then the loop devices devpool attached under what went.
    pub fn deactivate(self) -> Result<()> {
        if self.made {
            let (shared, own): (Vec<_>, Vec<_>) = self
                .devices
                .into_iter()
                .zip(self.shared)
                .partition(|(_, s)| *s);
            let own: Vec<DmDevice> = own.into_iter().rev().map(|(d, _)| d).collect();
            let shared: Vec<DmDevice> = shared.into_iter().rev().map(|(d, _)| d).collect();
            remove_stack(&own, &shared)?;
        }
        for l in &self.loops {
            if holders(l) == 0 {
                crate::loopdev::detach(l)?;
            }
        }
        Ok(())
    }
}

/// How many devices are stacked on block device `dev` (sysfs `holders`;
/// an unreadable one counts as held).
fn holders(dev: &Path) -> usize {
    let name = dev.file_name().map(|n| n.to_string_lossy().into_owned());
    name.and_then(|n| std::fs::read_dir(format!("/sys/block/{n}/holders")).ok())
        .map_or(1, |h| h.count())
}

/// The block devices stacked on `dm-<minor>` (sysfs `holders`).
pub fn holders_of(minor: u32) -> Vec<String> {
    std::fs::read_dir(format!("/sys/block/dm-{minor}/holders"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The block devices under `dm-<minor>` (sysfs `slaves`).
pub fn slaves(minor: u32) -> Vec<String> {
    std::fs::read_dir(format!("/sys/block/dm-{minor}/slaves"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Remove `own` (top first), then those of `shared` (top first) that
/// nothing is stacked on when their turn comes; then the loop devices
/// devpool attached under the removed ones (marked: a user's own loop
/// device stays), once nothing is stacked on them. The names removed.
pub fn remove_stack(own: &[DmDevice], shared: &[DmDevice]) -> Result<Vec<String>> {
    let mut gone = Vec::new();
    let mut under = Vec::new();
    let unheld = |d: &DmDevice| holders(&d.node()) == 0;
    for (d, is_shared) in own
        .iter()
        .map(|d| (d, false))
        .chain(shared.iter().map(|d| (d, true)))
    {
        if is_shared && !unheld(d) {
            continue;
        }
        under.extend(
            slaves(d.minor)
                .into_iter()
                .filter(|s| s.starts_with("loop")),
        );
        // One still open goes at its last close (deferred), as a detached
        // loop device does.
        remove(&d.name)?;
        gone.push(d.name.clone());
    }
    for a in crate::loopdev::list() {
        let name = a
            .device
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        if !a.lv_uuid.is_empty()
            && name.is_some_and(|n| under.contains(&n))
            && holders(&a.device) == 0
        {
            crate::loopdev::give_back(&a);
        }
    }
    Ok(gone)
}

/// `MAJ:MIN` of a block device.
fn major_minor(path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| PoolError::io(path, "stat", e))?;
    let rdev = m.rdev();
    Ok(format!("{}:{}", libc::major(rdev), libc::minor(rdev)))
}

/// Make the devices `layers`, in order, over the PVs `pvs` (by index). An
/// image-file PV gets a loop device first, marked `loop_mark` (an LV uuid,
/// so release finds it). A single linear/striped device that is active
/// already with its uuid and size (LVM2 activated it) is used as it is;
/// any other device of the stack that exists already refuses it. A failed
/// step removes what the stack made.
pub fn activate_stack(layers: &[Layer], pvs: &[PathBuf], loop_mark: &str) -> Result<Activated> {
    use devpool_format::dm::{KernelDev, Target};
    // Devices that exist already: shared ones are used as they are.
    let mut existing: Vec<Option<DmDevice>> = Vec::with_capacity(layers.len());
    for l in layers {
        let Some(d) = info(&l.name)? else {
            existing.push(None);
            continue;
        };
        if l.shared && d.uuid == l.uuid {
            existing.push(Some(d));
            continue;
        }
        if let [
            Layer {
                table: Table::Map(map),
                uuid,
                ..
            },
        ] = layers
        {
            let size = std::fs::read_to_string(format!("/sys/block/dm-{}/size", d.minor))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            if d.uuid == *uuid && size == Some(map.size() / 512) {
                return Ok(Activated {
                    devices: vec![d],
                    shared: vec![false],
                    loops: Vec::new(),
                    made: false,
                });
            }
        }
        return Err(PoolError::Refused(format!(
            "device-mapper device {} ({}) exists already, with uuid '{}': LVM2 has the volume active, or a devpool server was killed before it could remove it ('vgchange -an', a release or `dmsetup remove {}` removes it)",
            d.name,
            d.node().display(),
            d.uuid,
            d.name
        )));
    }
    // Each PV's span over every mapped layer.
    let mut spans: Vec<Option<(u64, u64)>> = vec![None; pvs.len()];
    for (l, _) in layers.iter().zip(&existing).filter(|(_, e)| e.is_none()) {
        if let Table::Map(map) = &l.table {
            for (d, off, len) in map.physical_ranges() {
                if let Some(s) = spans.get_mut(d) {
                    let (a, b) = s.unwrap_or((off, off + len));
                    *s = Some((a.min(off), b.max(off + len)));
                }
            }
        }
    }
    let mut done = Activated {
        devices: Vec::new(),
        shared: Vec::new(),
        loops: Vec::new(),
        made: true,
    };
    let mut places: Vec<Option<KernelDev>> = vec![None; pvs.len()];
    let result = (|| -> Result<()> {
        for (i, pv) in pvs.iter().enumerate() {
            let Some((start, end)) = spans[i] else {
                continue;
            };
            let is_block = std::fs::metadata(pv)
                .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
                .map_err(|e| PoolError::io(pv, "stat", e))?;
            places[i] = Some(if is_block {
                KernelDev {
                    major_minor: major_minor(pv)?,
                    base: 0,
                }
            } else {
                let l = crate::loopdev::attach(pv, start, end - start, loop_mark)?;
                done.loops.push(l.clone());
                KernelDev {
                    major_minor: major_minor(&l)?,
                    base: start,
                }
            });
        }
        for (l, found) in layers.iter().zip(existing) {
            if let Some(d) = found {
                done.devices.push(d);
                done.shared.push(true);
                continue;
            }
            let targets = match &l.table {
                Table::Map(map) => {
                    devpool_format::dm::table(map, |d| places.get(d).cloned().flatten())
                        .map_err(|e| PoolError::Invalid(format!("{}: {e}", l.name)))?
                }
                Table::Over {
                    kind,
                    sectors,
                    params,
                } => {
                    let mut p = Vec::new();
                    for part in params {
                        p.push(match part {
                            Param::Text(t) => t.clone(),
                            Param::Layer(i) => {
                                let d = done.devices.get(*i).ok_or_else(|| {
                                    PoolError::Invalid(format!(
                                        "{}: layer {i} is not made before it",
                                        l.name
                                    ))
                                })?;
                                format!("{}:{}", d.major, d.minor)
                            }
                        });
                    }
                    vec![Target {
                        start: 0,
                        sectors: *sectors,
                        kind,
                        params: p.join(" "),
                    }]
                }
            };
            done.devices
                .push(create(&l.name, &l.uuid, &targets, l.read_only)?);
            done.shared.push(l.shared);
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(done),
        Err(e) => {
            let _ = done.deactivate();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
