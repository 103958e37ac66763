//! Device-mapper devices as the kernel lists them in sysfs (no ioctl, so
//! nothing here needs device-mapper's control node): which LVs of a VG the
//! kernel has active, with LVM2's layers over them. The engine asks before
//! it writes a thin pool's metadata, which dm-thin holds in memory while it
//! has the pool; the pool crate's `dmdev` makes and removes devices.

use devpool_format::metadata::VgMetadata;
use std::path::{Path, PathBuf};

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
}
