//! Device-mapper device stacks over a volume's extents, on the engine's
//! [`devpool_engine::dm`] (the ioctls and the sysfs listing): layers made
//! in order over loop devices for image-file PVs, shared layers (a thin
//! pool's) used as they are, and stacks removed top first with the loop
//! devices under them.
//!
//! Devices are named as LVM2 names its activated LVs (`vg-lv`, uuid
//! `LVM-<vg uuid><lv uuid>`, see [`devpool_format::dm`]): LVM2 then sees
//! the LV as active, and refuses to remove it while it is open.

use crate::error::{PoolError, Result};
use std::path::{Path, PathBuf};

pub use devpool_engine::dm::{DmDevice, active_for_lvs, list, remove};
use devpool_engine::dm::{create, info};

/// Whether this host has device-mapper (loading `dm_mod` if it is a
/// module). `/dev/mapper/control` is no sign: distributions create the node
/// statically, driver or not (this machine has it without dm); the module's
/// sysfs directory is there when dm is loaded or built in.
pub fn available() -> bool {
    crate::sysblk::loaded_or_probed("dm_mod", Path::new("/sys/module/dm_mod"))
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
    /// The VG whose thin lock shared layers change under (a thin pool's:
    /// an activation beside this deactivation must not find them half gone).
    pub lock_vg: Option<String>,
}

impl Activated {
    /// The device called `name`.
    pub fn device(&self, name: &str) -> Option<&DmDevice> {
        self.devices.iter().find(|d| d.name == name)
    }

    /// [`deactivate`](Self::deactivate) by a caller that holds the VG's
    /// thin lock already (`_held`; taking it again would wait on itself).
    pub fn deactivate_locked(mut self, _held: &devpool_engine::lock::LockGuard) -> Result<()> {
        self.lock_vg = None;
        self.deactivate()
    }

    /// Remove the devices (if this activation made them), top first, and
    /// then the shared ones nothing is stacked on any more (whoever made
    /// them); then the loop devices devpool attached under what went.
    pub fn deactivate(self) -> Result<()> {
        let _lock = match &self.lock_vg {
            Some(vg) => Some(devpool_engine::lock::lock_thin(
                &devpool_engine::lock::default_dir(),
                vg,
            )?),
            None => None,
        };
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

/// Give back devpool's loop devices among `names` (kernel names: `loop3`)
/// that nothing is stacked on any more; with `mark`, only those marked
/// with that LV uuid (a user's own loop device stays either way).
pub(crate) fn give_back_unheld(names: &[String], mark: Option<&str>) {
    for a in crate::loopdev::list() {
        let name = a
            .device
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        if !a.lv_uuid.is_empty()
            && mark.is_none_or(|m| a.lv_uuid == m)
            && name.is_some_and(|n| names.contains(&n))
            && holders(&a.device) == 0
        {
            crate::loopdev::give_back(&a);
        }
    }
}

/// The block devices under `dm-<minor>` (sysfs `slaves`).
pub(crate) fn slaves(minor: u32) -> Vec<String> {
    std::fs::read_dir(format!("/sys/block/dm-{minor}/slaves"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Every device-mapper device of `meta`'s VG (LVM2's uuid prefix: its
/// LVs and their layers, whoever made them).
pub fn of_vg(meta: &devpool_format::metadata::VgMetadata) -> Vec<DmDevice> {
    let prefix = devpool_format::dm::uuid(meta.id.raw_str(), "");
    list()
        .into_iter()
        .filter(|d| d.uuid.starts_with(&prefix))
        .collect()
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
    give_back_unheld(&under, None);
    Ok(gone)
}

/// `MAJ:MIN` of a block device.
fn major_minor(path: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| PoolError::io(path, "stat", e))?;
    let rdev = m.rdev();
    Ok(format!("{}:{}", libc::major(rdev), libc::minor(rdev)))
}

/// Where the kernel finds each PV of `maps` (by index into `pvs`): a block
/// device as it is; an image file through a loop device over the span of
/// the extents `maps` use there (marked `loop_mark`, pushed on `loops`).
pub(crate) fn place_pvs(
    maps: &[&devpool_format::map::VolumeMap],
    pvs: &[PathBuf],
    loop_mark: &str,
    loops: &mut Vec<PathBuf>,
) -> Result<Vec<Option<devpool_format::dm::KernelDev>>> {
    use devpool_format::dm::KernelDev;
    let mut spans: Vec<Option<(u64, u64)>> = vec![None; pvs.len()];
    for map in maps {
        for (d, off, len) in map.physical_ranges() {
            if let Some(s) = spans.get_mut(d) {
                let (a, b) = s.unwrap_or((off, off + len));
                *s = Some((a.min(off), b.max(off + len)));
            }
        }
    }
    let mut places = vec![None; pvs.len()];
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
            loops.push(l.clone());
            KernelDev {
                major_minor: major_minor(&l)?,
                base: start,
            }
        });
    }
    Ok(places)
}

/// Make the devices `layers`, in order, over the PVs `pvs` (by index). An
/// image-file PV gets a loop device first, marked `loop_mark` (an LV uuid,
/// so release finds it). A single linear/striped device that is active
/// already with its uuid and size (LVM2 activated it) is used as it is;
/// any other device of the stack that exists already refuses it. A failed
/// step removes what the stack made.
pub fn activate_stack(layers: &[Layer], pvs: &[PathBuf], loop_mark: &str) -> Result<Activated> {
    use devpool_format::dm::Target;
    let found = layers
        .iter()
        .map(|l| info(&l.name).map_err(PoolError::from))
        .collect::<Result<Vec<_>>>()?;
    // A stack that exists whole, each device with its layer's uuid (LVM2
    // has the thin volume or the snapshot family active, or `lv activate`
    // made it): used as it is, and left to whoever made it.
    if layers.len() > 1
        && found
            .iter()
            .zip(layers)
            .all(|(d, l)| d.as_ref().is_some_and(|d| d.uuid == l.uuid))
    {
        return Ok(Activated {
            devices: found.into_iter().flatten().collect(),
            shared: layers.iter().map(|l| l.shared).collect(),
            loops: Vec::new(),
            made: false,
            lock_vg: None,
        });
    }
    // Devices that exist already: shared ones are used as they are.
    let mut existing: Vec<Option<DmDevice>> = Vec::with_capacity(layers.len());
    for (l, d) in layers.iter().zip(found) {
        let Some(d) = d else {
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
                    lock_vg: None,
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
    let maps: Vec<&devpool_format::map::VolumeMap> = layers
        .iter()
        .zip(&existing)
        .filter(|(_, e)| e.is_none())
        .filter_map(|(l, _)| match &l.table {
            Table::Map(map) => Some(map),
            Table::Over { .. } => None,
        })
        .collect();
    let mut done = Activated {
        devices: Vec::new(),
        shared: Vec::new(),
        loops: Vec::new(),
        made: true,
        lock_vg: None,
    };
    let result = (|| -> Result<()> {
        let places = place_pvs(&maps, pvs, loop_mark, &mut done.loops)?;
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
