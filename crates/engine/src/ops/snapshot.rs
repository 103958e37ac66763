//! Copy-on-write snapshots in LVM2's metadata: the COW store is an ordinary
//! linear LV with the snapshot's name but without the VISIBLE flag, and a
//! hidden-named `snapshotN` LV (VISIBLE) carries the `snapshot` segment that
//! ties origin and COW store together — exactly what LVM2 2.03 writes for
//! `lvcreate -s` (see devpool-format's tests/data/lvm2-snapshot-lvs.txt).

use super::{NewLv, create_lvs};
use crate::error::{EngineError, Result};
use devpool_format::config::{Item, Value};
use devpool_format::cow::check_chunk_sectors;
use devpool_format::metadata::{LvMeta, Segment, SegmentKind, VgMetadata};
use devpool_format::uuid::LvmUuid;

pub struct NewSnapshot {
    pub origin: String,
    /// The COW store (its name is the snapshot's name).
    pub cow: NewLv,
    pub chunk_sectors: u32,
    /// Identity of the `snapshotN` LV.
    pub id: LvmUuid,
}

/// Add a snapshot of `origin`; returns the name of its `snapshotN` LV.
pub fn create_snapshot(vg: &mut VgMetadata, s: NewSnapshot) -> Result<String> {
    check_chunk_sectors(s.chunk_sectors).map_err(EngineError::Invalid)?;
    let origin = vg
        .lv(&s.origin)
        .ok_or_else(|| EngineError::Invalid(format!("LV {}/{} not found", vg.name, s.origin)))?;
    if origin
        .segments
        .iter()
        .any(|g| !matches!(g.kind, SegmentKind::Striped { .. }))
    {
        return Err(EngineError::Refused(format!(
            "LV {}/{} is not a linear or striped volume; only those get snapshots here",
            vg.name, s.origin
        )));
    }
    let rel = vg.relations();
    if rel.cow_origin_visible.contains_key(&s.origin) || !vg.lv_is_visible_in(&rel, origin) {
        return Err(EngineError::Refused(format!(
            "LV {}/{} is a snapshot's COW store or hidden; snapshot a visible volume",
            vg.name, s.origin
        )));
    }
    let origin_extents = origin.extent_count();
    let (time, host) = (s.cow.creation_time, s.cow.creation_host.clone());
    let cow_name = s.cow.name.clone();
    create_lvs(vg, vec![s.cow])?;
    if let Some(cow) = vg.lvs.iter_mut().find(|l| l.name == cow_name) {
        cow.status.retain(|f| f != "VISIBLE");
    }
    let name = (0u64..)
        .map(|n| format!("snapshot{n}"))
        .find(|n| vg.lv(n).is_none())
        .unwrap_or_else(|| "snapshot".into());
    vg.lvs.push(super::visible_lv(
        name.clone(),
        s.id,
        vec![],
        (time, host),
        vec![Segment {
            start_extent: 0,
            extent_count: origin_extents,
            kind: SegmentKind::Other {
                segtype: "snapshot".into(),
            },
            extra: vec![
                Item::Assign("chunk_size".into(), Value::Int(i64::from(s.chunk_sectors))),
                Item::Assign("origin".into(), Value::Str(s.origin.clone())),
                Item::Assign("cow_store".into(), Value::Str(cow_name)),
            ],
        }],
    ));
    Ok(name)
}

/// One snapshot as the VG records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotLink {
    /// The hidden-named LV carrying the `snapshot` segment (`snapshot0`).
    pub snapshot_lv: String,
    pub origin: String,
    /// The COW store, named as the user named the snapshot.
    pub cow: String,
    /// `chunk_size` in sectors (None when the segment lacks a valid one).
    pub chunk_sectors: Option<u32>,
}

/// Every snapshot of the VG.
pub fn snapshot_links(vg: &VgMetadata) -> Vec<SnapshotLink> {
    vg.lvs
        .iter()
        .flat_map(|l| {
            l.segments.iter().filter_map(move |s| {
                let (origin, cow) = s.snapshot_link()?;
                let chunk_sectors = s.extra.iter().find_map(|i| match i {
                    Item::Assign(k, Value::Int(v)) if k == "chunk_size" => u32::try_from(*v).ok(),
                    _ => None,
                });
                Some(SnapshotLink {
                    snapshot_lv: l.name.clone(),
                    origin: origin.to_string(),
                    cow: cow.to_string(),
                    chunk_sectors,
                })
            })
        })
        .collect()
}

/// The snapshot `name` names: its COW store (the user's name) or its
/// `snapshotN` LV.
pub fn find_snapshot(vg: &VgMetadata, name: &str) -> Option<SnapshotLink> {
    snapshot_links(vg)
        .into_iter()
        .find(|l| l.cow == name || l.snapshot_lv == name)
}

/// The `snapshotN` LV whose COW store is `cow`, if `cow` is one.
pub fn snapshot_of_cow<'a>(vg: &'a VgMetadata, cow: &str) -> Option<&'a LvMeta> {
    let link = snapshot_links(vg).into_iter().find(|l| l.cow == cow)?;
    vg.lv(&link.snapshot_lv)
}

/// The COW store named by `snapshotN` LV `name`, if it is one.
pub fn cow_of_snapshot(vg: &VgMetadata, name: &str) -> Option<String> {
    snapshot_links(vg)
        .into_iter()
        .find(|l| l.snapshot_lv == name)
        .map(|l| l.cow)
}

/// Remove a snapshot: its COW LV (by the snapshot's name) and its
/// `snapshotN`, as `lvremove VG/SNAP` does. The origin is untouched.
pub fn remove_snapshot(vg: &mut VgMetadata, name: &str) -> Result<()> {
    let snap = snapshot_of_cow(vg, name)
        .map(|l| l.name.clone())
        .ok_or_else(|| EngineError::Invalid(format!("{}/{name} is not a snapshot", vg.name)))?;
    vg.lvs.retain(|l| l.name != name && l.name != snap);
    Ok(())
}

/// The snapshots (by their COW LV names) of each of `origins`, so that a
/// lease's snapshots go with it.
pub fn snapshots_of(vg: &VgMetadata, origins: &[String]) -> Vec<String> {
    snapshot_links(vg)
        .into_iter()
        .filter(|l| origins.contains(&l.origin))
        .map(|l| l.cow)
        .collect()
}
