//! A host block device for a volume of any layout, by the fastest path this
//! host offers, in order:
//! 1. a loop device straight over the PV (the volume is one contiguous range);
//! 2. ublk: `/dev/ublkbN` served by devpool's block-I/O core (no socket);
//! 3. the kernel's NBD client, connected to devpool's server over a socketpair;
//! 4. the volume as a file in a FUSE mount, with a loop device on that file.
//!
//! The loop device carries the volume's mark (`devpool:<LV uuid>`), so
//! release and cleanup detach it before they stop the server and free the
//! extents.

use crate::device::Volume;
use crate::fuse::{self, Mounted};
use devpool_pool::loopdev;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostPath {
    Loop,
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
    /// Attached by us (detached on drop) rather than the lease's own device.
    ours: bool,
    mount: Option<Mounted>,
    nbd: Option<crate::nbd::kernel::KernelNbd>,
    ublk: Option<crate::ublk::UblkDevice>,
}

impl HostDevice {
    /// Detach the loop device (if we attached it), then unmount FUSE.
    pub fn close(mut self) {
        self.teardown();
    }
    fn teardown(&mut self) {
        if let Some(u) = self.ublk.take() {
            u.close();
        }
        if let Some(n) = self.nbd.take() {
            n.close();
        }
        if self.ours {
            let _ = loopdev::detach(&self.device);
            self.ours = false;
        }
        if let Some(m) = self.mount.take() {
            let _ = m.unmount();
        }
    }
}

impl Drop for HostDevice {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Whether `marker` exists, after loading `module` if it did not (the
/// kernel NBD client and ublk are modules on most kernels).
pub(crate) fn loaded_or_probed(module: &str, marker: &Path) -> bool {
    if marker.exists() {
        return true;
    }
    let _ = std::process::Command::new("modprobe")
        .arg(module)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    marker.exists()
}

fn kernel_has(module: &str, dev: &str) -> bool {
    Path::new(&format!("/sys/module/{module}")).exists() || Path::new(dev).exists()
}

/// Which faster paths this host lacks, and why.
pub fn unavailable_fast_paths() -> Vec<String> {
    let mut v = Vec::new();
    if !kernel_has("ublk_drv", "/dev/ublk-control") {
        v.push("ublk: this kernel has no ublk driver (/dev/ublk-control)".into());
    }
    if !crate::nbd::kernel::available() {
        v.push("nbd: this kernel has no NBD client (no nbd module)".into());
    }
    v
}

/// A block device for `vol`. `existing` is a loop device the lease already
/// has over the whole volume (contiguous volumes get one at acquire).
pub fn attach(
    vol: &Arc<Volume>,
    existing: Option<PathBuf>,
    fuse_dir: &Path,
) -> std::io::Result<HostDevice> {
    let err = |e: devpool_pool::PoolError| std::io::Error::other(e.to_string());
    if let Some((dev, phys)) = vol.plain_range() {
        let choice = Choice {
            path: HostPath::Loop,
            skipped: Vec::new(),
        };
        if let Some(d) = existing {
            return Ok(HostDevice {
                device: d,
                choice,
                ours: false,
                mount: None,
                nbd: None,
                ublk: None,
            });
        }
        let d = loopdev::attach(&vol.devs[dev].path, phys, vol.size(), &vol.uuid).map_err(err)?;
        return Ok(HostDevice {
            device: d,
            choice,
            ours: true,
            mount: None,
            nbd: None,
            ublk: None,
        });
    }
    let mut skipped = Vec::new();
    if crate::ublk::available() {
        match crate::ublk::connect(vol) {
            Ok(u) => {
                return Ok(HostDevice {
                    device: u.device.clone(),
                    choice: Choice {
                        path: HostPath::Ublk,
                        skipped,
                    },
                    ours: false,
                    mount: None,
                    nbd: None,
                    ublk: Some(u),
                });
            }
            Err(e) => skipped.push(format!("ublk: {e}")),
        }
    }
    skipped.extend(unavailable_fast_paths());
    if crate::nbd::kernel::available() {
        let n = crate::nbd::kernel::connect(vol)?;
        return Ok(HostDevice {
            device: n.device.clone(),
            choice: Choice {
                path: HostPath::Nbd,
                skipped,
            },
            ours: false,
            mount: None,
            nbd: Some(n),
            ublk: None,
        });
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(std::io::Error::other(format!(
            "volume {} is not one contiguous range and this host offers no path for it: {}; no /dev/fuse",
            vol.name,
            skipped.join("; ")
        )));
    }
    let mountpoint = fuse_dir.join(format!("{}.{}", vol.uuid, std::process::id()));
    let m = fuse::mount(Arc::clone(vol), &mountpoint)?;
    let d = match loopdev::attach(&m.file, 0, vol.size(), &vol.uuid) {
        Ok(d) => d,
        Err(e) => {
            let _ = m.unmount();
            return Err(err(e));
        }
    };
    Ok(HostDevice {
        device: d,
        choice: Choice {
            path: HostPath::FuseLoop,
            skipped,
        },
        ours: true,
        mount: Some(m),
        nbd: None,
        ublk: None,
    })
}
