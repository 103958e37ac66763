//! LVs activated with device-mapper as LVM2 activates them (`lvchange
//! -ay`), through [`dmdev`](crate::dmdev):
//!
//! - a linear or striped LV: one `dm-linear`/`dm-stripe` device;
//! - an origin with snapshots, or a snapshot: the family's stack, whichever
//!   member is asked for: `vg-origin-real` (the origin's extents), each
//!   `vg-snap-cow` and `vg-snap` (`snapshot <real> <cow> P <chunk>`), then
//!   `vg-origin` (`snapshot-origin <real>`: writes copy out to every
//!   snapshot first). The kernel works on the COW stores in dm-snapshot's
//!   persistent format, the one devpool writes and reads.
//!
//! Thin volumes are refused: while dm-thin holds a pool, every change of
//! its metadata (thin leases, thin snapshots) would have to reach the
//! kernel as pool messages, and devpool writes the metadata itself.

use crate::dmdev::{self, Activated, Layer, LvIdentity, Param, Table};
use crate::error::{PoolError, Result};
use devpool_engine::cowstore::PvIndex;
use devpool_engine::ops::snapshot::snapshot_links;
use devpool_format::cow::DEFAULT_CHUNK_SECTORS;
use devpool_format::metadata::{LvMeta, VgMetadata};
use std::path::PathBuf;

fn lv<'a>(meta: &'a VgMetadata, name: &str) -> Result<&'a LvMeta> {
    meta.lv(name)
        .ok_or_else(|| PoolError::Invalid(format!("LV {}/{name} is missing", meta.name)))
}

fn identity<'a>(meta: &'a VgMetadata, l: &'a LvMeta) -> LvIdentity<'a> {
    LvIdentity {
        vg: &meta.name,
        vg_uuid: meta.id.raw_str(),
        lv: &l.name,
        lv_uuid: l.id.raw_str(),
    }
}

/// The origin of `name`'s snapshot family, if it is an origin or a snapshot
/// (named by its COW store, as the user named it).
fn family_origin(meta: &VgMetadata, name: &str) -> Option<String> {
    snapshot_links(meta)
        .into_iter()
        .find(|l| l.origin == name || l.cow == name)
        .map(|l| l.origin)
}

/// The LVs whose devices an activation of `name` makes: `name`, or its
/// whole snapshot family (the origin, then each COW store).
pub fn family(meta: &VgMetadata, name: &str) -> Vec<String> {
    match family_origin(meta, name) {
        None => vec![name.to_string()],
        Some(origin) => std::iter::once(origin.clone())
            .chain(
                snapshot_links(meta)
                    .into_iter()
                    .filter(|l| l.origin == origin)
                    .map(|l| l.cow),
            )
            .collect(),
    }
}

/// Activate LV `name` (`pvs`: each PV's key and path); the node of its own
/// device, and everything made.
pub fn activate_lv(
    meta: &VgMetadata,
    pvs: &[(String, PathBuf)],
    name: &str,
    read_only: bool,
) -> Result<(PathBuf, Activated)> {
    if devpool_engine::ops::thin::thin_volume(meta, name).is_some()
        || devpool_engine::ops::thin::is_thin_internal(meta, name)
    {
        return Err(PoolError::Refused(format!(
            "{}/{name} is thin: devpool serves thin volumes itself (LVM2 activates them with dm-thin)",
            meta.name
        )));
    }
    let mut index = PvIndex::default();
    let map_of = |index: &mut PvIndex, l: &LvMeta| {
        index
            .map_lv(meta, l)
            .map_err(|e| PoolError::Invalid(e.to_string()))
    };
    let paths = |index: &PvIndex| {
        index
            .keys
            .iter()
            .map(|k| {
                pvs.iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, p)| p.clone())
                    .ok_or_else(|| {
                        PoolError::Invalid(format!("PV {k} of {} is missing", meta.name))
                    })
            })
            .collect::<Result<Vec<_>>>()
    };
    let Some(origin) = family_origin(meta, name) else {
        let l = lv(meta, name)?;
        let map = map_of(&mut index, l)?;
        let a = dmdev::activate(&identity(meta, l), &map, &paths(&index)?, read_only)?;
        let node = a
            .devices
            .last()
            .map(|d| d.node())
            .ok_or_else(|| PoolError::Invalid("device-mapper made no device".into()))?;
        return Ok((node, a));
    };
    let origin_lv = lv(meta, &origin)?;
    let origin_map = map_of(&mut index, origin_lv)?;
    let mut cows = Vec::new();
    for link in snapshot_links(meta)
        .into_iter()
        .filter(|l| l.origin == origin)
    {
        let c = lv(meta, &link.cow)?;
        let map = map_of(&mut index, c)?;
        cows.push((link, c, map));
    }
    let sectors = origin_map.size() / 512;
    let oid = identity(meta, origin_lv);
    let real = oid.layer("real");
    let mut layers = vec![Layer {
        name: real.0,
        uuid: real.1,
        table: Table::Map(&origin_map),
        read_only: false,
    }];
    let mut want = oid.name();
    for (link, c, map) in &cows {
        let id = identity(meta, c);
        let cow = id.layer("cow");
        let cow_at = layers.len();
        layers.push(Layer {
            name: cow.0,
            uuid: cow.1,
            table: Table::Map(map),
            read_only: false,
        });
        let asked = link.cow == name;
        if asked {
            want = id.name();
        }
        let chunk = link.chunk_sectors.unwrap_or(DEFAULT_CHUNK_SECTORS);
        layers.push(Layer {
            name: id.name(),
            uuid: id.uuid(),
            table: Table::Over {
                kind: "snapshot",
                sectors,
                params: vec![
                    Param::Layer(0),
                    Param::Layer(cow_at),
                    Param::Text("P".into()),
                    Param::Text(chunk.to_string()),
                ],
            },
            read_only: asked && read_only,
        });
    }
    layers.push(Layer {
        name: oid.name(),
        uuid: oid.uuid(),
        table: Table::Over {
            kind: "snapshot-origin",
            sectors,
            params: vec![Param::Layer(0)],
        },
        read_only: origin == name && read_only,
    });
    let a = dmdev::activate_stack(&layers, &paths(&index)?, origin_lv.id.raw_str())?;
    let node = a
        .device(&want)
        .map(|d| d.node())
        .ok_or_else(|| PoolError::Invalid(format!("device-mapper made no device {want}")))?;
    Ok((node, a))
}

/// Deactivate LV `name` (its whole snapshot family, if it has one): remove
/// its device-mapper devices, then the loop devices made under them. The
/// names of the devices removed.
pub fn deactivate_lv(meta: &VgMetadata, name: &str) -> Result<Vec<String>> {
    let lvs = family(meta, name);
    let uuids: Vec<String> = lvs
        .iter()
        .filter_map(|n| meta.lv(n))
        .map(|l| l.id.raw_str().to_string())
        .collect();
    let dm_uuids: Vec<String> = uuids
        .iter()
        .map(|u| devpool_format::dm::uuid(meta.id.raw_str(), u))
        .collect();
    // The loop devices under them (image-file PVs), read before they go:
    // a lease's own loop device over the same LV is not one of them.
    let under: Vec<String> = dmdev::active_for(&dm_uuids)
        .iter()
        .flat_map(|d| slaves(d.minor))
        .filter(|s| s.starts_with("loop"))
        .collect();
    let mut gone = Vec::new();
    for (dev, r) in dmdev::remove_for(&dm_uuids) {
        if !r? {
            return Err(PoolError::Refused(format!(
                "device-mapper device {dev} is open: the kernel removes it at its last close"
            )));
        }
        gone.push(dev);
    }
    for a in crate::loopdev::list() {
        let name = a
            .device
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        if uuids.contains(&a.lv_uuid) && name.is_some_and(|n| under.contains(&n)) {
            crate::loopdev::give_back(&a);
        }
    }
    Ok(gone)
}

/// The block devices under `dm-<minor>`.
fn slaves(minor: u32) -> Vec<String> {
    std::fs::read_dir(format!("/sys/block/dm-{minor}/slaves"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
