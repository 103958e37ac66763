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

/// What activating LV `name` makes, before anything is made: its devices
/// in order, the PVs they map (by the index their tables use), the device
/// that is `name`'s own, and the uuid marking loop devices under them.
#[derive(Debug, Clone)]
pub struct StackPlan {
    pub layers: Vec<Layer>,
    pub pvs: Vec<PathBuf>,
    pub own: String,
    pub loop_mark: String,
}

/// The [`StackPlan`] of LV `name` (`pvs`: each PV's key and path).
pub fn plan_lv(
    meta: &VgMetadata,
    pvs: &[(String, PathBuf)],
    name: &str,
    read_only: bool,
) -> Result<StackPlan> {
    if devpool_engine::ops::thin::thin_volume(meta, name).is_some()
        || devpool_engine::ops::thin::is_thin_internal(meta, name)
    {
        return Err(PoolError::Refused(format!(
            "{}/{name} is thin: devpool serves thin volumes itself (LVM2 activates them with dm-thin)",
            meta.name
        )));
    }
    let mut index = PvIndex::default();
    let mut map_of = |l: &LvMeta| {
        index
            .map_lv(meta, l)
            .map_err(|e| PoolError::Invalid(e.to_string()))
    };
    let Some(origin) = family_origin(meta, name) else {
        let l = lv(meta, name)?;
        let id = identity(meta, l);
        let layers = vec![Layer {
            name: id.name(),
            uuid: id.uuid(),
            table: Table::Map(map_of(l)?),
            read_only,
        }];
        return finish(meta, pvs, index, layers, id.name(), l);
    };
    let origin_lv = lv(meta, &origin)?;
    let origin_map = map_of(origin_lv)?;
    let sectors = origin_map.size() / 512;
    let oid = identity(meta, origin_lv);
    let real = oid.layer("real");
    let mut layers = vec![Layer {
        name: real.0,
        uuid: real.1,
        table: Table::Map(origin_map),
        read_only: false,
    }];
    let mut own = oid.name();
    for link in snapshot_links(meta)
        .into_iter()
        .filter(|l| l.origin == origin)
    {
        let c = lv(meta, &link.cow)?;
        let id = identity(meta, c);
        let cow = id.layer("cow");
        let cow_at = layers.len();
        layers.push(Layer {
            name: cow.0,
            uuid: cow.1,
            table: Table::Map(map_of(c)?),
            read_only: false,
        });
        let asked = link.cow == name;
        if asked {
            own = id.name();
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
    finish(meta, pvs, index, layers, own, origin_lv)
}

/// A plan's PV paths, in the order its tables index them.
fn finish(
    meta: &VgMetadata,
    pvs: &[(String, PathBuf)],
    index: PvIndex,
    layers: Vec<Layer>,
    own: String,
    marked_by: &LvMeta,
) -> Result<StackPlan> {
    let pvs = index
        .keys
        .iter()
        .map(|k| {
            pvs.iter()
                .find(|(key, _)| key == k)
                .map(|(_, p)| p.clone())
                .ok_or_else(|| PoolError::Invalid(format!("PV {k} of {} is missing", meta.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StackPlan {
        layers,
        pvs,
        own,
        loop_mark: marked_by.id.raw_str().to_string(),
    })
}

/// Activate LV `name` (`pvs`: each PV's key and path); the node of its own
/// device, and everything made. A plain LV that is active already with its
/// uuid and size is used as it is.
pub fn activate_lv(
    meta: &VgMetadata,
    pvs: &[(String, PathBuf)],
    name: &str,
    read_only: bool,
) -> Result<(PathBuf, Activated)> {
    let plan = plan_lv(meta, pvs, name, read_only)?;
    let a = dmdev::activate_stack(&plan.layers, &plan.pvs, &plan.loop_mark)?;
    let node = a
        .device(&plan.own)
        .map(|d| d.node())
        .ok_or_else(|| PoolError::Invalid(format!("device-mapper made no device {}", plan.own)))?;
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
    let active = dmdev::active_for_lvs(meta, uuids.iter().map(String::as_str));
    // The loop devices under them (image-file PVs), read before they go:
    // a lease's own loop device over the same LV is not one of them.
    let under: Vec<String> = active
        .iter()
        .flat_map(|d| slaves(d.minor))
        .filter(|s| s.starts_with("loop"))
        .collect();
    let mut gone = Vec::new();
    for d in active {
        if !dmdev::remove(&d.name)? {
            return Err(PoolError::Refused(format!(
                "device-mapper device {} is open: the kernel removes it at its last close",
                d.name
            )));
        }
        gone.push(d.name);
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

#[cfg(test)]
mod tests {
    use super::*;
    use devpool_engine::engine::{DeviceSource, Engine, Operation, PvOptions};
    use devpool_format::units::{Bytes, SizeArg};

    /// A VG on an image file with LVs `plain` (8M), `o` (8M) and `o`'s
    /// snapshot `s` (12M, 8 KiB chunks): its metadata and PVs.
    fn vg() -> (tempfile::TempDir, VgMetadata, Vec<(String, PathBuf)>) {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("pv.img");
        let e = Engine::new(DeviceSource::List(vec![img.clone()]), dir.path().join("st"));
        let create = |name: &str| Operation::LvCreate {
            vg: "vg".into(),
            name: name.into(),
            size: SizeArg::parse("8M").unwrap(),
            stripes: 1,
            stripe_size: Bytes(64 << 10),
            tags: vec![],
            wipe: false,
            count: None,
        };
        let ops = [
            Operation::VgCreate {
                name: "vg".into(),
                pvs: vec![img.clone()],
                extent_size: Bytes(4 << 20),
                pv_options: PvOptions {
                    metadata_size: None,
                    metadata_copies: 1,
                    image_size: Some(Bytes(128 << 20)),
                },
                autoactivation: false,
            },
            create("plain"),
            create("o"),
            Operation::SnapshotCreate {
                vg: "vg".into(),
                origin: "o".into(),
                name: "s".into(),
                size: Some(SizeArg::parse("12M").unwrap()),
                chunk_size: Bytes(8 << 10),
            },
        ];
        for op in &ops {
            e.apply(op, true).unwrap();
        }
        let (v, _) = e.read_vg("vg").unwrap();
        let meta = (*v.meta).clone();
        let pvs = meta
            .pvs
            .iter()
            .map(|p| (p.key.clone(), img.clone()))
            .collect();
        (dir, meta, pvs)
    }

    fn uuid(meta: &VgMetadata, lv: &str) -> String {
        format!(
            "LVM-{}{}",
            meta.id.raw_str(),
            meta.lv(lv).unwrap().id.raw_str()
        )
    }

    #[test]
    fn a_plain_lv_is_one_device_under_lvm2s_name() {
        let (_d, meta, pvs) = vg();
        let p = plan_lv(&meta, &pvs, "plain", false).unwrap();
        assert_eq!(p.layers.len(), 1);
        assert_eq!(p.layers[0].name, "vg-plain");
        assert_eq!(p.layers[0].uuid, uuid(&meta, "plain"));
        assert!(matches!(&p.layers[0].table, Table::Map(m) if m.size() == 8 << 20));
        assert_eq!(p.own, "vg-plain");
        assert_eq!(p.pvs.len(), 1);
    }

    #[test]
    fn a_snapshot_brings_its_family_stacked_as_lvm2_stacks_it() {
        let (_d, meta, pvs) = vg();
        for asked in ["o", "s"] {
            let p = plan_lv(&meta, &pvs, asked, asked == "s").unwrap();
            let names: Vec<&str> = p.layers.iter().map(|l| l.name.as_str()).collect();
            assert_eq!(names, ["vg-o-real", "vg-s-cow", "vg-s", "vg-o"]);
            assert_eq!(p.layers[0].uuid, format!("{}-real", uuid(&meta, "o")));
            assert_eq!(p.layers[1].uuid, format!("{}-cow", uuid(&meta, "s")));
            assert_eq!(p.layers[2].uuid, uuid(&meta, "s"));
            assert_eq!(p.layers[3].uuid, uuid(&meta, "o"));
            let Table::Over {
                kind,
                sectors,
                params,
            } = &p.layers[2].table
            else {
                panic!("the snapshot maps its layers");
            };
            assert_eq!((*kind, *sectors), ("snapshot", (8 << 20) / 512));
            let text: Vec<String> = params
                .iter()
                .map(|x| match x {
                    Param::Layer(i) => format!("#{i}"),
                    Param::Text(t) => t.clone(),
                })
                .collect();
            assert_eq!(text, ["#0", "#1", "P", "16"], "8 KiB chunks are 16 sectors");
            assert!(matches!(
                &p.layers[3].table,
                Table::Over { kind: "snapshot-origin", params, .. } if matches!(params[..], [Param::Layer(0)])
            ));
            assert_eq!(p.own, format!("vg-{asked}"));
            // Only the asked device is read-only.
            let ro: Vec<bool> = p.layers.iter().map(|l| l.read_only).collect();
            assert_eq!(ro, [false, false, asked == "s", false]);
            assert_eq!(p.loop_mark, meta.lv("o").unwrap().id.raw_str());
        }
        assert_eq!(family(&meta, "s"), ["o", "s"]);
        assert_eq!(family(&meta, "plain"), ["plain"]);
    }

    #[test]
    fn a_missing_pv_or_lv_is_named() {
        let (_d, meta, _) = vg();
        let e = plan_lv(&meta, &[], "plain", false).unwrap_err().to_string();
        assert!(e.contains("PV") && e.contains("missing"), "{e}");
        let e = plan_lv(&meta, &[], "nope", false).unwrap_err().to_string();
        assert!(e.contains("vg/nope"), "{e}");
    }
}
