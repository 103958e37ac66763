//! Keeping LVM2's devices file in step with the PVs devpool creates and
//! removes, where LVM2 uses one ([`crate::lvmconf::lvm_devices_file`]): a
//! new PV on a block device is listed under the device ID LVM2 itself would
//! choose (read from sysfs), a removed PV's entry loses its PVID (as
//! `pvremove` leaves it). The file is rewritten whole (a new file renamed
//! over it) under LVM2's own lock on it, `D_<file name>` in the lock
//! directory.
//!
//! Image files are not listed: LVM2 sees them only through a loop device,
//! and devpool's own loop devices over an image share its backing file.

use crate::error::{EngineError, Result};
use devpool_format::devices_file::{DeviceEntry, DevicesFile, sanitize_id};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// How LVM2 names a device in its devices file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceId {
    pub idtype: String,
    pub idname: String,
    /// The partition number, when the ID is the whole disk's.
    pub part: Option<u32>,
}

const LOOP_MAJOR: u32 = 7;
const MD_MAJOR: u32 = 9;

/// The ID LVM2 would give block device `dev`, in its order of preference:
/// a type of its own for loop (the backing file), md (the array uuid) and
/// device-mapper devices (multipath, crypt or LV uuid); else the disk's
/// WWID, else its serial number, else the device name. `None` for anything
/// that is not a block device.
pub fn device_id(dev: &Path) -> Option<DeviceId> {
    let md = std::fs::metadata(dev).ok()?;
    if !md.file_type().is_block_device() {
        return None;
    }
    let (major, minor) = (libc::major(md.rdev()), libc::minor(md.rdev()));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let part = read_sys(&sys, "partition").and_then(|p| p.parse().ok());
    // A partition has no IDs of its own: LVM2 reads its disk's.
    let disk = std::fs::canonicalize(&sys)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let read = |suffix: &str| {
        read_sys(&sys, suffix).or_else(|| part.and(disk.as_ref()).and_then(|d| read_sys(d, suffix)))
    };
    let id = |idtype: &str, idname: String| DeviceId {
        idtype: idtype.into(),
        idname: sanitize_id(&idname),
        part: part.filter(|_| idtype != "devname"),
    };
    if major == LOOP_MAJOR {
        if let Some(f) = read("loop/backing_file").filter(|f| !f.contains("(deleted)")) {
            return Some(id("loop_file", f));
        }
    } else if major == MD_MAJOR {
        if let Some(u) = read("md/uuid") {
            return Some(id("md_uuid", u));
        }
    } else if let Some(u) = read("dm/uuid") {
        let kind = u.split_once('-').map(|(k, rest)| {
            // kpartx partitions: "part1-mpath-…"
            if k.starts_with("part") {
                rest.split('-').next().unwrap_or("")
            } else {
                k
            }
        });
        match kind {
            Some("mpath") => return Some(id("mpath_uuid", u)),
            Some("CRYPT") => return Some(id("crypt_uuid", u)),
            Some("LVM") => return Some(id("lvmlv_uuid", u)),
            _ => {}
        }
    }
    if major != LOOP_MAJOR && major != MD_MAJOR {
        let wwid = read("device/wwid")
            .or_else(|| read("wwid"))
            // QEMU's emulated ATA disks all share one.
            .filter(|w| !w.contains("QEMU HARDDISK"));
        if let Some(w) = wwid {
            return Some(id("sys_wwid", w));
        }
        if let Some(s) = read("device/serial") {
            return Some(id("sys_serial", s));
        }
    }
    Some(id("devname", kernel_name(dev).display().to_string()))
}

/// The device's own node (`/dev/sdb`), not a symlink to it
/// (`/dev/disk/by-id/…`), as LVM2 names it.
pub fn kernel_name(dev: &Path) -> PathBuf {
    std::fs::canonicalize(dev).unwrap_or_else(|_| dev.to_path_buf())
}

/// Which of `pvs` (device, PV uuid without dashes) the devices `file`
/// does not list, so that LVM2 here does not see them: no entry carries the
/// PV's uuid or the device's ID. Image files are not asked about (LVM2
/// sees them only through loop devices). An unreadable file lists nothing.
pub fn unlisted<'a, 'b>(
    file: &Path,
    pvs: impl IntoIterator<Item = (&'a Path, &'b str)>,
) -> Vec<&'a Path> {
    let f = std::fs::read_to_string(file)
        .ok()
        .and_then(|t| DevicesFile::parse(&t).ok())
        .unwrap_or_default();
    pvs.into_iter()
        .filter_map(|(dev, pvid)| {
            let id = device_id(dev)?;
            let listed = f.entries.iter().any(|e| {
                e.pvid == pvid
                    || (e.idtype == id.idtype && e.idname == id.idname && e.part == id.part)
            });
            (!listed).then_some(dev)
        })
        .collect()
}

fn read_sys(dir: &Path, suffix: &str) -> Option<String> {
    let s = std::fs::read_to_string(dir.join(suffix)).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// List the PV `pvid` on `device` in the devices `file`.
pub fn list_pv(
    lock_dir: &Path,
    file: &Path,
    device: &Path,
    id: &DeviceId,
    pvid: &str,
) -> Result<()> {
    rewrite(lock_dir, file, "pv create", |f| {
        f.add(DeviceEntry {
            idtype: id.idtype.clone(),
            idname: id.idname.clone(),
            devname: kernel_name(device).display().to_string(),
            pvid: pvid.to_string(),
            part: id.part,
        });
        true
    })
}

/// The PV `pvid` is gone: its entry in `file` keeps the device, without
/// the PVID (nothing is written when no entry has it).
pub fn unlist_pv(lock_dir: &Path, file: &Path, pvid: &str) -> Result<()> {
    rewrite(lock_dir, file, "pv remove", |f| f.forget_pvid(pvid))
}

/// Read, change (when `change` says it changed something) and write
/// `file` under LVM2's lock on it.
fn rewrite(
    lock_dir: &Path,
    file: &Path,
    command: &str,
    change: impl FnOnce(&mut DevicesFile) -> bool,
) -> Result<()> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let _lock = crate::lock::lock_devices_file(lock_dir, &name)?;
    let text =
        std::fs::read_to_string(file).map_err(|e| EngineError::io(file, "read devices file", e))?;
    let mut f = DevicesFile::parse(&text)
        .map_err(|e| EngineError::Invalid(format!("{}: {e}; not changing it", file.display())))?;
    if let Some(why) = f.refuse_rewrite() {
        return Err(EngineError::Refused(format!(
            "{}: {why}; not changing it",
            file.display()
        )));
    }
    if !change(&mut f) {
        return Ok(());
    }
    let creator = format!(
        "devpool {command} pid {} at {}",
        std::process::id(),
        crate::journal::now_rfc3339()
    );
    let mut new_name = file.as_os_str().to_owned();
    new_name.push("_new");
    let tmp = PathBuf::from(new_name);
    let write = || -> std::io::Result<()> {
        let mut out = std::fs::File::create(&tmp)?;
        out.write_all(f.render(&creator).as_bytes())?;
        out.sync_all()?;
        std::fs::rename(&tmp, file)?;
        if let Some(dir) = file.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        EngineError::io(file, "write devices file", e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_missing_paths_have_no_device_id() {
        let t = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(device_id(t.path()), None);
        assert_eq!(device_id(Path::new("/nonexistent/devpool")), None);
    }

    #[test]
    fn rewrites_keep_other_entries_and_count_versions() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("system.devices");
        std::fs::write(
            &file,
            "VERSION=1.1.4\nIDTYPE=sys_wwid IDNAME=naa.1 DEVNAME=/dev/sda PVID=AAA\n",
        )
        .unwrap();
        let id = DeviceId {
            idtype: "devname".into(),
            idname: "/dev/vdb".into(),
            part: None,
        };
        list_pv(dir.path(), &file, Path::new("/dev/vdb"), &id, "BBB").unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("VERSION=1.1.5\n"), "{text}");
        assert!(text.contains("IDTYPE=sys_wwid IDNAME=naa.1 DEVNAME=/dev/sda PVID=AAA\n"));
        assert!(text.contains("IDTYPE=devname IDNAME=/dev/vdb DEVNAME=/dev/vdb PVID=BBB\n"));
        unlist_pv(dir.path(), &file, "BBB").unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.contains("VERSION=1.1.6\n"), "{text}");
        assert!(text.contains("IDNAME=/dev/vdb DEVNAME=/dev/vdb PVID=.\n"));
        // Nothing to forget: not rewritten.
        unlist_pv(dir.path(), &file, "CCC").unwrap();
        assert!(
            std::fs::read_to_string(&file)
                .unwrap()
                .contains("VERSION=1.1.6\n")
        );
        std::fs::write(&file, "VERSION=2.0.1\n").unwrap();
        assert!(list_pv(dir.path(), &file, Path::new("/dev/vdb"), &id, "BBB").is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "VERSION=2.0.1\n");
    }
}
