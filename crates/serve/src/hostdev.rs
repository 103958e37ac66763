//! A host block device for a volume of any layout, by the fastest path this
//! host offers, in order:
//! 1. a loop device straight over the PV (the volume is one contiguous range);
//! 2. device-mapper, as LVM2 activates volumes: `dm-linear`/`dm-stripe` for
//!    other linear and striped volumes; a thin volume or a volume of a
//!    snapshot family is the device its server opened (dm-thin or the
//!    family's dm-snapshot stack, see `open::open_in_kernel`) for every
//!    frontend; the kernel serves every request;
//! 3. ublk: `/dev/ublkbN` served by devpool's block-I/O core (no socket);
//! 4. the kernel's NBD client, connected to devpool's server over a socketpair;
//! 5. the volume as a file in a FUSE mount, with a loop device on that file.
//!
//! The loop device carries the volume's mark (`devpool:<LV uuid>`), so
//! release and cleanup detach it before they stop the server and free the
//! extents.

use crate::device::Volume;
use crate::fuse::{self, Mounted};
use devpool_pool::loopdev;
use devpool_pool::pool::Located;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostPath {
    Loop,
    Dm,
    Ublk,
    Nbd,
    FuseLoop,
}

#[derive(Debug, Clone, Serialize)]
pub struct Choice {
    pub path: HostPath,
    /// Why the faster paths were not taken.
    pub skipped: Vec<String>,
}

pub struct HostDevice {
    pub device: PathBuf,
    pub choice: Choice,
    held: Held,
}

/// What a [`HostDevice`] keeps alive, and undoes when it goes.
enum Held {
    /// The lease's own loop device: nothing of ours.
    Nothing,
    /// A loop device we attached over the PV.
    Loop,
    /// A device-mapper device (and the loop devices under it).
    Dm(devpool_pool::dmdev::Activated),
    Ublk(Box<crate::ublk::UblkDevice>),
    Nbd(crate::nbd::kernel::KernelNbd),
    /// A loop device we attached over the volume's file in a FUSE mount.
    FuseLoop(Mounted),
}

impl HostDevice {
    /// Stop serving the device: stop ublk or disconnect NBD, or detach the
    /// loop device we attached (then unmount FUSE).
    pub fn close(mut self) {
        self.teardown();
    }
    fn teardown(&mut self) {
        match std::mem::replace(&mut self.held, Held::Nothing) {
            Held::Nothing => {}
            Held::Loop => {
                let _ = loopdev::detach(&self.device);
            }
            Held::Dm(a) => {
                let _ = a.deactivate();
            }
            Held::Ublk(u) => u.close(),
            Held::Nbd(n) => n.close(),
            Held::FuseLoop(m) => {
                let _ = loopdev::detach(&self.device);
                let _ = m.unmount();
            }
        }
    }
}

impl Drop for HostDevice {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// `vol` activated with device-mapper, or why not: its node and what to
/// remove later. `loc` is where it was found.
fn dm_device(
    vol: &Volume,
    loc: &Located,
    state_dir: &Path,
) -> Result<(PathBuf, devpool_pool::dmdev::Activated), String> {
    use devpool_pool::dmdev;
    // Thin volumes and snapshot families were offered to the kernel when
    // they were opened (`open::open_in_kernel`); the reason it said no
    // replaces these.
    if vol.thin.is_some() {
        return Err("the thin volume goes through devpool's own thin mappings".into());
    }
    if vol.cow.is_some() {
        return Err("the snapshot family goes through devpool's own copy-on-write".into());
    }
    if !dmdev::available() {
        return Err("this kernel has no device-mapper (no dm_mod)".into());
    }
    devpool_pool::activate::activate_lv(state_dir, &loc.meta, &loc.pvs, &vol.name, vol.read_only)
        .map_err(|e| e.to_string())
}

/// The block device of a volume the kernel serves (dm-thin, dm-snapshot):
/// its own dm device.
pub fn kernel_device(node: PathBuf) -> HostDevice {
    HostDevice {
        device: node,
        choice: Choice {
            path: HostPath::Dm,
            skipped: Vec::new(),
        },
        // The volume's stack goes with the volume.
        held: Held::Nothing,
    }
}

/// A block device for `vol`, found at `loc`. `existing` is a loop device
/// the lease already has over the whole volume (contiguous volumes get one
/// at acquire); `state_dir` holds the server registry and FUSE mount
/// points.
pub fn attach(
    vol: &Arc<Volume>,
    loc: &Located,
    existing: Option<PathBuf>,
    state_dir: &Path,
) -> std::io::Result<HostDevice> {
    if let Some(k) = &vol.kernel {
        return Ok(kernel_device(k.node.clone()));
    }
    let err = |e: devpool_pool::PoolError| std::io::Error::other(e.to_string());
    let device = |device, path, skipped, held| HostDevice {
        device,
        choice: Choice { path, skipped },
        held,
    };
    if let Some((dev, phys)) = vol.plain_range() {
        if let Some(d) = existing {
            return Ok(device(d, HostPath::Loop, Vec::new(), Held::Nothing));
        }
        let d = loopdev::attach(&vol.devs[dev].path, phys, vol.size(), &vol.uuid).map_err(err)?;
        return Ok(device(d, HostPath::Loop, Vec::new(), Held::Loop));
    }
    // Why the faster paths were not taken, each probed once.
    let mut skipped = Vec::new();
    match dm_device(vol, loc, state_dir) {
        Ok((node, a)) => {
            return Ok(device(node, HostPath::Dm, skipped, Held::Dm(a)));
        }
        Err(why) => skipped.push(format!("dm: {why}")),
    }
    if crate::ublk::available() {
        match crate::ublk::connect(vol) {
            Ok(u) => {
                return Ok(device(
                    u.device.clone(),
                    HostPath::Ublk,
                    skipped,
                    Held::Ublk(Box::new(u)),
                ));
            }
            Err(e) => skipped.push(format!("ublk: {e}")),
        }
    } else {
        skipped.push("ublk: this kernel has no ublk driver (/dev/ublk-control)".into());
    }
    if crate::nbd::kernel::available() {
        let n = crate::nbd::kernel::connect(vol)?;
        return Ok(device(
            n.device.clone(),
            HostPath::Nbd,
            skipped,
            Held::Nbd(n),
        ));
    }
    skipped.push("nbd: this kernel has no NBD client (no nbd module)".into());
    if !Path::new("/dev/fuse").exists() {
        return Err(std::io::Error::other(format!(
            "volume {} is not one contiguous range and this host offers no path for it: {}; no /dev/fuse",
            vol.name,
            skipped.join("; ")
        )));
    }
    let mountpoint = devpool_pool::servers::fuse_mountpoint(state_dir, &vol.uuid);
    let m = fuse::mount(Arc::clone(vol), &mountpoint)?;
    let d = match loopdev::attach(&m.file, 0, vol.size(), &vol.uuid) {
        Ok(d) => d,
        Err(e) => {
            let _ = m.unmount();
            return Err(err(e));
        }
    };
    Ok(device(d, HostPath::FuseLoop, skipped, Held::FuseLoop(m)))
}
