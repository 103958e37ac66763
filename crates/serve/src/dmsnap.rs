//! An origin and its snapshots activated with device-mapper, the stack LVM2
//! makes (`lvchange -ay` of either activates the whole family):
//!
//! - `vg-origin-real`: the origin's extents (linear/striped);
//! - for each snapshot, `vg-snap-cow` (its COW store's extents) and
//!   `vg-snap` (`snapshot <real> <cow> P <chunk>`);
//! - `vg-origin` (`snapshot-origin <real>`): writes copy out to every
//!   snapshot first.
//!
//! The kernel then works on the COW stores in dm-snapshot's persistent
//! format, the one devpool writes and reads: when the stack goes, devpool's
//! own copy-on-write takes the stores over as the kernel left them.

use crate::device::Volume;
use devpool_engine::cowstore::PvIndex;
use devpool_engine::ops::snapshot::snapshot_links;
use devpool_format::cow::DEFAULT_CHUNK_SECTORS;
use devpool_pool::dmdev::{self, Activated, Layer, LvIdentity, Param, Table};
use devpool_pool::pool::Located;
use std::path::PathBuf;

/// Activate the family of `vol` (an origin with snapshots, or a snapshot);
/// the node of `vol`'s own device, and the stack.
pub fn activate(vol: &Volume, loc: &Located) -> Result<(PathBuf, Activated), String> {
    let meta = &loc.meta;
    let links = snapshot_links(meta);
    // `vol.name` is the origin's, or the snapshot's COW store's.
    let origin = links
        .iter()
        .find(|l| l.cow == vol.name)
        .map_or(vol.name.as_str(), |l| l.origin.as_str());
    let lv = |name: &str| {
        meta.lv(name)
            .ok_or_else(|| format!("LV {}/{name} is missing", meta.name))
    };
    let origin_lv = lv(origin)?;
    let mut index = PvIndex::default();
    let origin_map = index.map_lv(meta, origin_lv).map_err(|e| e.to_string())?;
    let family: Vec<_> = links.iter().filter(|l| l.origin == origin).collect();
    let mut cows = Vec::new();
    for l in &family {
        let c = lv(&l.cow)?;
        cows.push((l, c, index.map_lv(meta, c).map_err(|e| e.to_string())?));
    }
    let pvs = index
        .keys
        .iter()
        .map(|k| {
            loc.pvs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, p)| p.clone())
                .ok_or_else(|| format!("PV {k} of {} is missing", meta.name))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ident =
        |name: &'_ str, uuid: &'_ str| -> (String, String, (String, String), (String, String)) {
            let id = LvIdentity {
                vg: &meta.name,
                vg_uuid: meta.id.raw_str(),
                lv: name,
                lv_uuid: uuid,
            };
            (id.name(), id.uuid(), id.layer("real"), id.layer("cow"))
        };
    let sectors = origin_map.size() / 512;
    let (origin_name, origin_uuid, real, _) = ident(origin, origin_lv.id.raw_str());
    let mut layers = vec![Layer {
        name: real.0,
        uuid: real.1,
        table: Table::Map(&origin_map),
        read_only: false,
    }];
    let mut want = origin_name.clone();
    for (link, c, map) in &cows {
        let (name, uuid, _, cow) = ident(&link.cow, c.id.raw_str());
        let cow_at = layers.len();
        layers.push(Layer {
            name: cow.0,
            uuid: cow.1,
            table: Table::Map(map),
            read_only: false,
        });
        let chunk = link.chunk_sectors.unwrap_or(DEFAULT_CHUNK_SECTORS);
        if link.cow == vol.name {
            want = name.clone();
        }
        layers.push(Layer {
            read_only: link.cow == vol.name && vol.read_only,
            name,
            uuid,
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
        });
    }
    layers.push(Layer {
        read_only: origin == vol.name && vol.read_only,
        name: origin_name,
        uuid: origin_uuid,
        table: Table::Over {
            kind: "snapshot-origin",
            sectors,
            params: vec![Param::Layer(0)],
        },
    });
    let a =
        dmdev::activate_stack(&layers, &pvs, origin_lv.id.raw_str()).map_err(|e| e.to_string())?;
    let node = a
        .device(&want)
        .map(|d| d.node())
        .ok_or_else(|| format!("device-mapper made no device {want}"))?;
    Ok((node, a))
}
