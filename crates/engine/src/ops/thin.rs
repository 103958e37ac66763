//! Thin provisioning in LVM2's metadata, as `lvcreate --type thin-pool` and
//! `lvcreate -V … -T` write it: hidden linear LVs `<pool>_tmeta` (dm-thin's
//! metadata) and `<pool>_tdata` (the data blocks), a visible `<pool>` LV
//! with one `thin-pool` segment naming them (`metadata`, `pool`,
//! `transaction_id`, `chunk_size`, `discards`, `zero_new_blocks`), and thin
//! LVs with one `thin` segment each (`thin_pool`, `transaction_id`,
//! `device_id`, `origin` for a thin snapshot). The pool's `transaction_id`
//! equals dm-thin's superblock `trans_id` whenever both are committed: each
//! change of the set of thin devices increments both.

use super::{NewLv, create_lvs};
use crate::error::{EngineError, Result};
use devpool_format::config::{Item, Value};
use devpool_format::metadata::{Segment, SegmentKind, VgMetadata};
use devpool_format::uuid::LvmUuid;

/// dm-thin's chunk size limits (sectors): 64 KiB to 1 GiB, multiples of 64 KiB.
pub const MIN_CHUNK_SECTORS: u32 = 128;
pub const MAX_CHUNK_SECTORS: u32 = 2 * 1024 * 1024;
/// dm-thin's largest device id (24 bits).
pub const MAX_DEVICE_ID: u64 = (1 << 24) - 1;

pub fn check_chunk_sectors(c: u32) -> std::result::Result<(), String> {
    if !(MIN_CHUNK_SECTORS..=MAX_CHUNK_SECTORS).contains(&c) || !c.is_multiple_of(MIN_CHUNK_SECTORS)
    {
        return Err(format!(
            "thin pool chunk size {} KiB: must be a multiple of 64 KiB from 64 KiB to 1 GiB",
            u64::from(c) / 2
        ));
    }
    Ok(())
}

/// The pool LV flag LVM2 writes for `lvchange --errorwhenfull y`.
pub const ERROR_WHEN_FULL: &str = "ERROR_WHEN_FULL";

/// A thin pool as the VG records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinPoolLink {
    pub pool: String,
    pub tmeta: String,
    pub tdata: String,
    pub transaction_id: u64,
    pub chunk_sectors: u32,
    pub zero_new_blocks: bool,
    /// LVM2's `ERROR_WHEN_FULL` flag on the pool LV (`lvchange
    /// --errorwhenfull y`): dm-thin fails writes at once when the data is
    /// full (`error_if_no_space`) instead of queueing them for a minute.
    pub error_when_full: bool,
    /// LVM2 queued `create`/`delete` messages for the kernel (an LVM2
    /// command was interrupted before activating the pool).
    pub pending_messages: usize,
}

/// A thin volume as the VG records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinLink {
    pub lv: String,
    pub pool: String,
    pub device_id: u64,
    /// For a thin snapshot: the thin LV it was taken of.
    pub origin: Option<String>,
}

fn int_field(seg: &Segment, key: &str) -> Option<i64> {
    seg.extra.iter().find_map(|i| match i {
        Item::Assign(k, Value::Int(v)) if k == key => Some(*v),
        _ => None,
    })
}

fn set_int(seg: &mut Segment, key: &str, v: i64) {
    for i in &mut seg.extra {
        if let Item::Assign(k, val) = i
            && k == key
        {
            *val = Value::Int(v);
            return;
        }
    }
    seg.extra.push(Item::Assign(key.into(), Value::Int(v)));
}

pub fn thin_pools(vg: &VgMetadata) -> Vec<ThinPoolLink> {
    vg.lvs
        .iter()
        .filter_map(|l| {
            let s = l.segments.first()?;
            if s.segtype() != "thin-pool" || l.segments.len() != 1 {
                return None;
            }
            Some(ThinPoolLink {
                pool: l.name.clone(),
                tmeta: s.str_field("metadata")?.to_string(),
                tdata: s.str_field("pool")?.to_string(),
                transaction_id: u64::try_from(int_field(s, "transaction_id")?).ok()?,
                chunk_sectors: u32::try_from(int_field(s, "chunk_size")?).ok()?,
                zero_new_blocks: int_field(s, "zero_new_blocks").unwrap_or(0) != 0,
                error_when_full: l.flags.iter().any(|f| f == ERROR_WHEN_FULL),
                pending_messages: s
                    .extra
                    .iter()
                    .filter(|i| matches!(i, Item::Section(k, _) if k.starts_with("message")))
                    .count(),
            })
        })
        .collect()
}

pub fn thin_volumes(vg: &VgMetadata) -> Vec<ThinLink> {
    vg.lvs
        .iter()
        .filter_map(|l| {
            let s = l.segments.first()?;
            if s.segtype() != "thin" || l.segments.len() != 1 {
                return None;
            }
            Some(ThinLink {
                lv: l.name.clone(),
                pool: s.str_field("thin_pool")?.to_string(),
                device_id: u64::try_from(int_field(s, "device_id")?).ok()?,
                origin: s.str_field("origin").map(str::to_string),
            })
        })
        .collect()
}

pub fn thin_volume(vg: &VgMetadata, name: &str) -> Option<ThinLink> {
    thin_volumes(vg).into_iter().find(|t| t.lv == name)
}

/// The VG's one thin pool (devpool makes at most one per pool).
pub fn the_thin_pool(vg: &VgMetadata) -> Option<ThinPoolLink> {
    thin_pools(vg).into_iter().next()
}

pub struct NewThinPool {
    pub name: String,
    pub data: NewLv,
    pub meta: NewLv,
    pub chunk_sectors: u32,
    pub id: LvmUuid,
}

/// Add a thin pool with no thin volumes (transaction 0).
pub fn create_thin_pool(vg: &mut VgMetadata, p: NewThinPool) -> Result<ThinPoolLink> {
    check_chunk_sectors(p.chunk_sectors).map_err(EngineError::Invalid)?;
    if let Some(old) = the_thin_pool(vg) {
        return Err(EngineError::Refused(format!(
            "{} already has thin pool {}",
            vg.name, old.pool
        )));
    }
    let data_extents = p.data.extents.0;
    let chunk_bytes = u64::from(p.chunk_sectors) * 512;
    if data_extents.saturating_mul(vg.extent_size.bytes().0) < chunk_bytes {
        return Err(EngineError::Invalid(format!(
            "thin pool data of {data_extents} extents is smaller than one {} KiB chunk",
            chunk_bytes / 1024
        )));
    }
    let (tmeta, tdata) = (p.meta.name.clone(), p.data.name.clone());
    let (time, host) = (p.data.creation_time, p.data.creation_host.clone());
    // `_tmeta`/`_tdata` are reserved for exactly this use: allocate under
    // ordinary names, then give the LVs theirs.
    let placeholder = |n: &str| format!("devpool-allocating-{}", n.replace('_', "-"));
    let (mut meta_lv, mut data_lv) = (p.meta, p.data);
    meta_lv.name = placeholder(&tmeta);
    data_lv.name = placeholder(&tdata);
    for n in [&tmeta, &tdata] {
        if vg.lv(n).is_some() {
            return Err(EngineError::Invalid(format!(
                "LV {}/{n} already exists",
                vg.name
            )));
        }
    }
    create_lvs(vg, vec![meta_lv, data_lv])?;
    for lv in vg.lvs.iter_mut() {
        for n in [&tmeta, &tdata] {
            if lv.name == placeholder(n) {
                lv.name = n.clone();
                lv.status.retain(|f| f != "VISIBLE");
            }
        }
    }
    let mut pool_lv = super::visible_lv(
        p.name.clone(),
        p.id,
        vec![],
        (time, host),
        vec![Segment {
            start_extent: 0,
            extent_count: data_extents,
            kind: SegmentKind::Other {
                segtype: "thin-pool".into(),
            },
            extra: vec![
                Item::Assign("metadata".into(), Value::Str(tmeta)),
                Item::Assign("pool".into(), Value::Str(tdata)),
                Item::Assign("transaction_id".into(), Value::Int(0)),
                Item::Assign("chunk_size".into(), Value::Int(i64::from(p.chunk_sectors))),
                Item::Assign("discards".into(), Value::Str("passdown".into())),
                Item::Assign("zero_new_blocks".into(), Value::Int(1)),
            ],
        }],
    );
    // A full pool fails writes at once (ENOSPC), in devpool's data plane
    // and in dm-thin alike, as `lvchange --errorwhenfull y` asks.
    pool_lv.flags.push(ERROR_WHEN_FULL.into());
    vg.lvs.push(pool_lv);
    the_thin_pool(vg).ok_or_else(|| EngineError::Invalid("thin pool vanished".into()))
}

/// One thin volume to create: a new empty one, or a thin snapshot of `origin`.
#[derive(Debug, Clone)]
pub struct NewThin {
    pub name: String,
    /// Virtual size.
    pub extents: u64,
    pub tags: Vec<String>,
    pub id: LvmUuid,
    pub creation_time: i64,
    pub creation_host: String,
    pub origin: Option<String>,
}

/// What a change of thin devices asks of dm-thin's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ThinChanges {
    /// New empty devices.
    pub create: Vec<u64>,
    /// New snapshots: (device, origin device).
    pub snapshot: Vec<(u64, u64)>,
    pub delete: Vec<u64>,
    /// The pool's transaction id after the change.
    pub trans_id: u64,
}

fn pool_segment_mut<'a>(vg: &'a mut VgMetadata, pool: &str) -> Result<&'a mut Segment> {
    let vgname = vg.name.clone();
    vg.lv_mut(pool)
        .and_then(|l| l.segments.first_mut())
        .filter(|s| s.segtype() == "thin-pool")
        .ok_or_else(|| EngineError::Invalid(format!("{vgname}/{pool} is not a thin pool")))
}

fn usable_pool(vg: &VgMetadata, pool: &str) -> Result<ThinPoolLink> {
    let link = thin_pools(vg)
        .into_iter()
        .find(|p| p.pool == pool)
        .ok_or_else(|| EngineError::Invalid(format!("{}/{pool} is not a thin pool", vg.name)))?;
    if link.pending_messages > 0 {
        return Err(EngineError::Refused(format!(
            "thin pool {}/{pool} has {} LVM2 messages queued for the kernel; activate it once with LVM2 (lvchange -ay) to apply them",
            vg.name, link.pending_messages
        )));
    }
    Ok(link)
}

/// Add thin volumes to `pool` (one transaction); returns what dm-thin's
/// metadata must do.
pub fn create_thins(vg: &mut VgMetadata, pool: &str, news: Vec<NewThin>) -> Result<ThinChanges> {
    let link = usable_pool(vg, pool)?;
    let existing = thin_volumes(vg);
    let first_id = existing.iter().map(|t| t.device_id + 1).max().unwrap_or(1);
    let trans_id = link.transaction_id + 1;
    let mut changes = ThinChanges {
        trans_id,
        ..ThinChanges::default()
    };
    let mut names: std::collections::HashSet<String> =
        vg.lvs.iter().map(|l| l.name.clone()).collect();
    for (next_id, n) in (first_id..).zip(news) {
        devpool_format::names::validate_lv_name(&n.name)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        if !names.insert(n.name.clone()) {
            return Err(EngineError::Invalid(format!(
                "LV {}/{} already exists",
                vg.name, n.name
            )));
        }
        if n.extents == 0 {
            return Err(EngineError::Invalid(format!(
                "thin volume {}/{} needs a size",
                vg.name, n.name
            )));
        }
        if next_id > MAX_DEVICE_ID {
            return Err(EngineError::Refused(format!(
                "thin pool {}/{pool} has no device id left",
                vg.name
            )));
        }
        let mut extra = vec![
            Item::Assign("thin_pool".into(), Value::Str(pool.into())),
            Item::Assign("transaction_id".into(), Value::Int(trans_id as i64)),
        ];
        match &n.origin {
            Some(o) => {
                let origin = thin_volume(vg, o).ok_or_else(|| {
                    EngineError::Refused(format!(
                        "{}/{o} is not a thin volume of {pool}; thin snapshots are taken of thin volumes",
                        vg.name
                    ))
                })?;
                extra.push(Item::Assign("origin".into(), Value::Str(o.clone())));
                changes.snapshot.push((next_id, origin.device_id));
            }
            None => changes.create.push(next_id),
        }
        extra.push(Item::Assign("device_id".into(), Value::Int(next_id as i64)));
        vg.lvs.push(super::visible_lv(
            n.name,
            n.id,
            n.tags,
            (n.creation_time, n.creation_host),
            vec![Segment {
                start_extent: 0,
                extent_count: n.extents,
                kind: SegmentKind::Other {
                    segtype: "thin".into(),
                },
                extra,
            }],
        ));
    }
    set_int(
        pool_segment_mut(vg, pool)?,
        "transaction_id",
        trans_id as i64,
    );
    Ok(changes)
}

/// Remove thin volumes (one transaction). A thin snapshot's `origin` link
/// is dropped from snapshots whose origin goes (dm keeps their blocks).
pub fn remove_thins(vg: &mut VgMetadata, names: &[String]) -> Result<ThinChanges> {
    let mut by_pool: Option<String> = None;
    let mut changes = ThinChanges::default();
    for n in names {
        let t = thin_volume(vg, n)
            .ok_or_else(|| EngineError::Invalid(format!("{}/{n} is not a thin volume", vg.name)))?;
        if by_pool.get_or_insert_with(|| t.pool.clone()) != &t.pool {
            return Err(EngineError::Invalid(
                "thin volumes of different pools in one removal".into(),
            ));
        }
        changes.delete.push(t.device_id);
    }
    let Some(pool) = by_pool else {
        return Ok(changes);
    };
    let link = usable_pool(vg, &pool)?;
    changes.trans_id = link.transaction_id + 1;
    vg.lvs.retain(|l| !names.contains(&l.name));
    for lv in vg.lvs.iter_mut() {
        if let Some(s) = lv.segments.first_mut()
            && s.segtype() == "thin"
            && s.str_field("origin")
                .is_some_and(|o| names.iter().any(|n| n == o))
        {
            s.extra
                .retain(|i| !matches!(i, Item::Assign(k, _) if k == "origin"));
        }
    }
    set_int(
        pool_segment_mut(vg, &pool)?,
        "transaction_id",
        changes.trans_id as i64,
    );
    Ok(changes)
}

/// Merge thin snapshot `snap` into the thin volume it was taken of (one
/// transaction), as `lvconvert --merge` does for an inactive origin: the
/// origin LV keeps its name, uuid, tags and size and takes the snapshot's
/// thin device; the origin's old device is deleted (its blocks that nothing
/// else maps go back to the pool) and the snapshot LV goes. Snapshots taken
/// of the snapshot become snapshots of the origin; snapshots of the origin
/// keep their own devices, so they still show what they showed.
pub fn merge_thin(vg: &mut VgMetadata, snap: &str) -> Result<ThinChanges> {
    let t = thin_volume(vg, snap)
        .ok_or_else(|| EngineError::Invalid(format!("{}/{snap} is not a thin volume", vg.name)))?;
    let origin = t.origin.clone().ok_or_else(|| {
        EngineError::Invalid(format!(
            "{}/{snap} is not a thin snapshot (it has no origin)",
            vg.name
        ))
    })?;
    let o = thin_volume(vg, &origin).ok_or_else(|| {
        EngineError::Refused(format!(
            "{}/{snap}: its origin {origin} is no longer a thin volume; nothing to merge into",
            vg.name
        ))
    })?;
    if o.pool != t.pool {
        return Err(EngineError::Invalid(format!(
            "{}/{snap} and {origin} are in different thin pools",
            vg.name
        )));
    }
    let link = usable_pool(vg, &t.pool)?;
    let changes = ThinChanges {
        delete: vec![o.device_id],
        trans_id: link.transaction_id + 1,
        ..ThinChanges::default()
    };
    let vgname = vg.name.clone();
    let seg = vg
        .lv_mut(&origin)
        .and_then(|l| l.segments.first_mut())
        .ok_or_else(|| EngineError::Invalid(format!("{vgname}/{origin} has no segment")))?;
    set_int(seg, "device_id", t.device_id as i64);
    vg.lvs.retain(|l| l.name != snap);
    for lv in vg.lvs.iter_mut() {
        if let Some(s) = lv.segments.first_mut()
            && s.segtype() == "thin"
            && s.str_field("origin") == Some(snap)
        {
            for i in &mut s.extra {
                if let Item::Assign(k, v) = i
                    && k == "origin"
                {
                    *v = Value::Str(origin.clone());
                }
            }
        }
    }
    set_int(
        pool_segment_mut(vg, &t.pool)?,
        "transaction_id",
        changes.trans_id as i64,
    );
    Ok(changes)
}

/// Grow thin pool `pool`'s data LV to `extents` (the pool LV's segment
/// follows, as LVM2 records it); dm-thin's data space map grows to match at
/// its next commit. Returns the data extents before. Shrinking is refused,
/// as by LVM2 (dm-thin cannot give back data blocks).
pub fn extend_thin_pool(vg: &mut VgMetadata, pool: &str, extents: u64) -> Result<u64> {
    let link = usable_pool(vg, pool)?;
    let before = vg.lv(&link.tdata).map_or(0, |l| l.extent_count());
    if extents <= before {
        return Err(EngineError::Refused(format!(
            "thin pool {}/{pool} has {before} data extents; it can only grow (asked for {extents})",
            vg.name
        )));
    }
    super::resize_any_lv(vg, &link.tdata, extents)?;
    pool_segment_mut(vg, pool)?.extent_count = extents;
    Ok(before)
}

/// Resize a thin volume's virtual size (no allocation: blocks come on write).
pub fn resize_thin(vg: &mut VgMetadata, name: &str, extents: u64) -> Result<()> {
    if extents == 0 {
        return Err(EngineError::Invalid(format!(
            "{}/{name}: a thin volume needs a size",
            vg.name
        )));
    }
    let vgname = vg.name.clone();
    let seg = vg
        .lv_mut(name)
        .and_then(|l| l.segments.first_mut())
        .filter(|s| s.segtype() == "thin")
        .ok_or_else(|| EngineError::Invalid(format!("{vgname}/{name} is not a thin volume")))?;
    seg.extent_count = extents;
    Ok(())
}

/// Names of a thin pool's internal LVs and its thin volumes: what pool
/// listings treat specially.
pub fn is_thin_internal(vg: &VgMetadata, name: &str) -> bool {
    thin_pools(vg)
        .iter()
        .any(|p| p.pool == name || p.tmeta == name || p.tdata == name)
}
