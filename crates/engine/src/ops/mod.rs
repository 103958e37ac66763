//! Volume operations as pure transformations of a VG model. They allocate,
//! validate names and refuse to touch LVs the engine does not understand; the
//! caller commits the result.

pub mod snapshot;
pub mod thin;

use crate::alloc::{self, Run};
use crate::error::{EngineError, Result};
use devpool_format::metadata::{LvMeta, PvMeta, Segment, SegmentKind, StripeArea, VgMetadata};
use devpool_format::names;
use devpool_format::units::{Amount, Bytes, Extents, PercentOf, Sectors, Sign, SizeArg};
use devpool_format::uuid::LvmUuid;

/// How a new LV lays out its extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Linear,
    /// Linear in one run on one PV (what one loop device can cover), like
    /// LVM2's `--alloc contiguous`.
    Contiguous,
    Striped {
        stripes: u32,
        stripe_size: Sectors,
    },
}

/// Everything about an LV that the caller decides (time, host, id randomness).
#[derive(Debug, Clone)]
pub struct NewLv {
    pub name: String,
    pub extents: Extents,
    pub layout: Layout,
    pub tags: Vec<String>,
    pub id: LvmUuid,
    pub creation_time: i64,
    pub creation_host: String,
}

pub fn vg_free_extents(vg: &VgMetadata) -> u64 {
    alloc::total_free(&alloc::free_areas(vg))
}

/// Resolve a size argument against the VG. `current` is the LV's size for
/// relative (`+`/`-`) sizes. Returns extents and a note when it rounded.
pub fn resolve_size(
    vg: &VgMetadata,
    arg: &SizeArg,
    current: Option<u64>,
    multiple: u64,
) -> Result<(u64, Option<String>)> {
    let es = vg.extent_size;
    let mut note = None;
    let amount = match arg.amount {
        Amount::Extents(e) => e.0,
        Amount::Bytes(b) => {
            let e = es.bytes_to_extents_ceil(b).0;
            if e.checked_mul(es.bytes().0) != Some(b.0) {
                note = Some(format!(
                    "rounding {} bytes up to {e} extents of {} bytes",
                    b.0,
                    es.bytes().0
                ));
            }
            e
        }
        Amount::Percent(p, PercentOf::Free) => vg_free_extents(vg) * p as u64 / 100,
        Amount::Percent(p, PercentOf::Vg) => vg.extent_count() * p as u64 / 100,
    };
    let target = match (arg.sign, current) {
        (None, _) => amount,
        (Some(Sign::Plus), Some(c)) => c
            .checked_add(amount)
            .ok_or_else(|| EngineError::Invalid("size overflows".into()))?,
        (Some(Sign::Minus), Some(c)) => {
            c.checked_sub(amount).filter(|&v| v > 0).ok_or_else(|| {
                EngineError::Invalid(format!(
                    "cannot shrink by {amount} extents: the LV has only {c}"
                ))
            })?
        }
        (Some(_), None) => {
            return Err(EngineError::Invalid(
                "a relative size (+/-) only applies to resize".into(),
            ));
        }
    };
    if target == 0 {
        return Err(EngineError::Invalid("size resolves to 0 extents".into()));
    }
    let rounded = target.div_ceil(multiple) * multiple;
    if rounded != target {
        note = Some(format!(
            "rounding {target} extents up to {rounded} (a multiple of {multiple} stripes)"
        ));
    }
    Ok((rounded, note))
}

fn no_space(vg: &VgMetadata, need: u64) -> EngineError {
    EngineError::NoSpace {
        vg: vg.name.clone(),
        need,
        free: vg_free_extents(vg),
        extent_bytes: vg.extent_size.bytes().0,
    }
}

fn no_contiguous_space(vg: &VgMetadata, free: &[alloc::FreeArea], need: u64) -> EngineError {
    let largest = free.iter().map(|a| a.len).max().unwrap_or(0);
    EngineError::NoContiguousSpace {
        vg: vg.name.clone(),
        need,
        largest,
        free: alloc::total_free(free),
        extent_bytes: vg.extent_size.bytes().0,
    }
}

fn striped_segment(
    vg: &VgMetadata,
    start_extent: u64,
    runs: &[Run],
    stripe_size: Option<Sectors>,
) -> Segment {
    Segment {
        start_extent,
        extent_count: runs.iter().map(|r| r.len).sum(),
        kind: SegmentKind::Striped {
            stripe_size,
            stripes: runs
                .iter()
                .map(|r| StripeArea {
                    pv: vg.pvs[r.pv].key.clone(),
                    start: r.start,
                })
                .collect(),
        },
        extra: vec![],
    }
}

pub fn create_lv(vg: &mut VgMetadata, new: NewLv) -> Result<()> {
    create_lvs(vg, vec![new])
}

/// Create several LVs; free space and names are tracked incrementally, so a
/// batch of N costs O(N), not O(N²).
pub fn create_lvs(vg: &mut VgMetadata, news: Vec<NewLv>) -> Result<()> {
    let mut free = alloc::free_areas(vg);
    let mut names: std::collections::HashSet<String> =
        vg.lvs.iter().map(|l| l.name.clone()).collect();
    for new in news {
        create_one(vg, &mut free, &mut names, new)?;
    }
    Ok(())
}

fn create_one(
    vg: &mut VgMetadata,
    free: &mut Vec<alloc::FreeArea>,
    names: &mut std::collections::HashSet<String>,
    new: NewLv,
) -> Result<()> {
    names::validate_lv_name(&new.name).map_err(|e| EngineError::Invalid(e.to_string()))?;
    for t in &new.tags {
        names::validate_tag(t).map_err(|e| EngineError::Invalid(e.to_string()))?;
    }
    if names.contains(&new.name) {
        return Err(EngineError::Invalid(format!(
            "LV {}/{} already exists",
            vg.name, new.name
        )));
    }
    if vg.max_lv != 0 && vg.lvs.len() as u64 >= vg.max_lv {
        return Err(EngineError::Refused(format!(
            "VG {} is limited to {} LVs (max_lv)",
            vg.name, vg.max_lv
        )));
    }
    let need = new.extents.0;
    if need == 0 {
        return Err(EngineError::Invalid(
            "an LV needs at least one extent".into(),
        ));
    }
    let segments = match new.layout {
        Layout::Contiguous => {
            let best = free
                .iter()
                .filter(|a| a.len >= need)
                .min_by_key(|a| (a.len, a.pv, a.start))
                .map(|a| alloc::Run {
                    pv: a.pv,
                    start: a.start,
                    len: need,
                })
                .ok_or_else(|| no_contiguous_space(vg, free, need))?;
            alloc::consume(free, std::slice::from_ref(&best));
            vec![striped_segment(vg, 0, std::slice::from_ref(&best), None)]
        }
        Layout::Linear => {
            let runs = alloc::pick_linear(free, need).ok_or_else(|| no_space(vg, need))?;
            alloc::consume(free, &runs);
            let mut segs = Vec::new();
            let mut at = 0;
            for r in runs {
                segs.push(striped_segment(vg, at, std::slice::from_ref(&r), None));
                at += r.len;
            }
            segs
        }
        Layout::Striped {
            stripes,
            stripe_size,
        } => {
            let n = stripes as u64;
            if n < 2 {
                return Err(EngineError::Invalid(
                    "a striped LV needs at least 2 stripes".into(),
                ));
            }
            if !need.is_multiple_of(n) {
                return Err(EngineError::Invalid(format!(
                    "{need} extents is not a multiple of {n} stripes"
                )));
            }
            if !stripe_size.0.is_power_of_two()
                || stripe_size.0 < 8
                || stripe_size > vg.extent_size.sectors()
            {
                return Err(EngineError::Invalid(format!(
                    "stripe size of {} bytes must be a power of two between 4 KiB and the extent size",
                    stripe_size.0 * 512
                )));
            }
            let plan = alloc::pick_striped(free, stripes as usize, need / n).ok_or_else(|| {
                let pvs_with_space = free.iter().map(|a| a.pv).collect::<std::collections::BTreeSet<_>>().len();
                if pvs_with_space < stripes as usize {
                    EngineError::Refused(format!(
                        "{stripes} stripes need {stripes} PVs with free space; VG {} has {pvs_with_space}",
                        vg.name
                    ))
                } else {
                    no_space(vg, need)
                }
            })?;
            for runs in &plan {
                alloc::consume(free, runs);
            }
            let mut segs = Vec::new();
            let mut at = 0;
            for runs in plan {
                let seg = striped_segment(vg, at, &runs, Some(stripe_size));
                at += seg.extent_count;
                segs.push(seg);
            }
            segs
        }
    };
    names.insert(new.name.clone());
    vg.lvs.push(visible_lv(
        new.name,
        new.id,
        new.tags,
        (new.creation_time, new.creation_host),
        segments,
    ));
    Ok(())
}

/// A new read-write, visible LV.
pub(crate) fn visible_lv(
    name: String,
    id: LvmUuid,
    tags: Vec<String>,
    (time, host): (i64, String),
    segments: Vec<Segment>,
) -> LvMeta {
    LvMeta {
        name,
        id,
        status: vec!["READ".into(), "WRITE".into(), "VISIBLE".into()],
        flags: vec![],
        tags,
        creation_time: Some(time),
        creation_host: Some(host),
        extra: vec![],
        segments,
    }
}

fn modifiable<'a>(vg: &'a mut VgMetadata, name: &str) -> Result<&'a mut LvMeta> {
    if let Some(why) = vg.lv_modification_refusal(name) {
        return Err(EngineError::Refused(why));
    }
    let vgname = vg.name.clone();
    vg.lv_mut(name).ok_or(EngineError::LvNotFound {
        vg: vgname,
        lv: name.to_string(),
    })
}

/// Remove an LV; a snapshot (named by its COW store) goes with its
/// `snapshotN`, as with LVM2's lvremove.
pub fn remove_lv(vg: &mut VgMetadata, name: &str) -> Result<()> {
    if snapshot::snapshot_of_cow(vg, name).is_some() {
        return snapshot::remove_snapshot(vg, name);
    }
    if let Some(cow) = snapshot::cow_of_snapshot(vg, name) {
        return Err(EngineError::Refused(format!(
            "{}/{name} is the internal part of snapshot {}/{cow}; remove the snapshot by its name",
            vg.name, vg.name
        )));
    }
    modifiable(vg, name)?;
    vg.lvs.retain(|l| l.name != name);
    Ok(())
}

pub fn rename_lv(vg: &mut VgMetadata, old: &str, new: &str) -> Result<()> {
    names::validate_lv_name(new).map_err(|e| EngineError::Invalid(e.to_string()))?;
    if vg.lv(new).is_some() {
        return Err(EngineError::Invalid(format!(
            "LV {}/{new} already exists",
            vg.name
        )));
    }
    modifiable(vg, old)?.name = new.to_string();
    Ok(())
}

pub fn change_tags(
    vg: &mut VgMetadata,
    name: &str,
    add: &[String],
    remove: &[String],
) -> Result<()> {
    for t in add {
        names::validate_tag(t).map_err(|e| EngineError::Invalid(e.to_string()))?;
    }
    let lv = modifiable(vg, name)?;
    lv.tags.retain(|t| !remove.contains(t));
    for t in add {
        if !lv.tags.contains(t) {
            lv.tags.push(t.clone());
        }
    }
    Ok(())
}

/// Resize to `target` extents: grow by extending the last run in place where
/// the next extents are free, otherwise with new segments; shrink from the end.
pub fn resize_lv(vg: &mut VgMetadata, name: &str, target: u64) -> Result<()> {
    modifiable(vg, name)?;
    resize_any_lv(vg, name, target)
}

/// Resize without asking whether the LV is devpool's to change (for LVs a
/// structure owns, such as a thin pool's data LV).
pub(crate) fn resize_any_lv(vg: &mut VgMetadata, name: &str, target: u64) -> Result<()> {
    let current = vg
        .lv(name)
        .ok_or_else(|| EngineError::LvNotFound {
            vg: vg.name.clone(),
            lv: name.into(),
        })?
        .extent_count();
    if target == 0 {
        return Err(EngineError::Invalid(
            "an LV cannot be resized to 0 extents".into(),
        ));
    }
    if target < current {
        shrink(vg, name, target);
        return Ok(());
    }
    if target == current {
        return Ok(());
    }
    let grow = target - current;
    let free = alloc::free_areas(vg);
    let lv = vg.lv(name).ok_or_else(|| EngineError::LvNotFound {
        vg: vg.name.clone(),
        lv: name.into(),
    })?;
    let last = lv.segments.last().cloned();
    let Some(last) = last else {
        return Err(EngineError::Refused(format!(
            "LV {}/{name} has no segments",
            vg.name
        )));
    };
    let SegmentKind::Striped {
        stripes,
        stripe_size,
    } = &last.kind
    else {
        return Err(EngineError::Refused(format!(
            "LV {}/{name} ends in a non-striped segment",
            vg.name
        )));
    };
    let n = stripes.len() as u64;
    if !grow.is_multiple_of(n) {
        return Err(EngineError::Invalid(format!(
            "growth of {grow} extents is not a multiple of {n} stripes"
        )));
    }
    let per = grow / n;
    // In place: every stripe's next extents free.
    let adjacent: Option<Vec<&alloc::FreeArea>> = stripes
        .iter()
        .map(|st| {
            let pvi = vg.pvs.iter().position(|p| p.key == st.pv)?;
            free.iter()
                .find(|a| a.pv == pvi && a.start == st.start + last.area_len() && a.len >= per)
        })
        .collect();
    let lv_start = last.end_extent();
    let new_segments: Vec<Segment> = if adjacent.is_some() {
        let lvm = vg
            .lv_mut(name)
            .ok_or_else(|| EngineError::Invalid("LV vanished".into()))?;
        if let Some(s) = lvm.segments.last_mut() {
            s.extent_count += grow;
        }
        return Ok(());
    } else if n == 1 {
        let stripe_size = *stripe_size;
        let runs = alloc::pick_linear(&free, grow).ok_or_else(|| no_space(vg, grow))?;
        let mut at = lv_start;
        runs.iter()
            .map(|r| {
                let s = striped_segment(vg, at, std::slice::from_ref(r), stripe_size);
                at += r.len;
                s
            })
            .collect()
    } else {
        let segs = alloc::pick_striped(&free, n as usize, per).ok_or_else(|| no_space(vg, grow))?;
        let mut at = lv_start;
        segs.iter()
            .map(|runs| {
                let s = striped_segment(vg, at, runs, *stripe_size);
                at += s.extent_count;
                s
            })
            .collect()
    };
    let lvm = vg
        .lv_mut(name)
        .ok_or_else(|| EngineError::Invalid("LV vanished".into()))?;
    lvm.segments.extend(new_segments);
    merge_adjacent(lvm);
    Ok(())
}

/// Keep the first `target` extents (rounded up to the stripe count of the
/// segment the cut falls in).
fn shrink(vg: &mut VgMetadata, name: &str, target: u64) {
    let Some(lv) = vg.lv_mut(name) else { return };
    let mut kept = Vec::new();
    for mut seg in lv.segments.drain(..) {
        if seg.start_extent >= target {
            break;
        }
        if seg.end_extent() > target {
            let n = match &seg.kind {
                SegmentKind::Striped { stripes, .. } => stripes.len() as u64,
                SegmentKind::Other { .. } => 1,
            };
            seg.extent_count = (target - seg.start_extent).div_ceil(n) * n;
        }
        kept.push(seg);
    }
    lv.segments = kept;
}

/// Join consecutive linear segments that are physically contiguous.
fn merge_adjacent(lv: &mut LvMeta) {
    let mut out: Vec<Segment> = Vec::new();
    for seg in lv.segments.drain(..) {
        if let Some(prev) = out.last_mut()
            && let (
                SegmentKind::Striped {
                    stripes: a,
                    stripe_size: sa,
                },
                SegmentKind::Striped {
                    stripes: b,
                    stripe_size: sb,
                },
            ) = (&prev.kind, &seg.kind)
            && a.len() == b.len()
            && sa == sb
            && a.iter()
                .zip(b)
                .all(|(x, y)| x.pv == y.pv && x.start + prev.area_len() == y.start)
            && seg.extra.is_empty()
            && prev.extra.is_empty()
        {
            prev.extent_count += seg.extent_count;
            continue;
        }
        out.push(seg);
    }
    lv.segments = out;
}

/// Extents a PV of `dev_size` offers with data starting at `pe_start` and
/// `tail` bytes reserved at the end (a second metadata area).
pub fn pe_count_for(dev_size: Bytes, pe_start: Bytes, tail: Bytes, extent: Bytes) -> u64 {
    dev_size.0.saturating_sub(pe_start.0).saturating_sub(tail.0) / extent.0
}

/// Add a PV (already labelled) to the VG's metadata.
pub fn add_pv(
    vg: &mut VgMetadata,
    id: LvmUuid,
    device: &str,
    dev_size: Bytes,
    pe_start: Bytes,
    tail: Bytes,
) -> Result<()> {
    if vg.pvs.iter().any(|p| p.id == id) {
        return Err(EngineError::Invalid(format!(
            "PV {device} is already in VG {}",
            vg.name
        )));
    }
    let mut n = vg.pvs.len();
    while vg.pv(&format!("pv{n}")).is_some() {
        n += 1;
    }
    let pe_count = pe_count_for(dev_size, pe_start, tail, vg.extent_size.bytes());
    if pe_count == 0 {
        return Err(EngineError::Refused(format!(
            "{device} is too small for one extent of {} bytes after its metadata",
            vg.extent_size.bytes().0
        )));
    }
    vg.pvs.push(PvMeta {
        key: format!("pv{n}"),
        id,
        device: Some(device.to_string()),
        status: vec!["ALLOCATABLE".into()],
        flags: vec![],
        tags: vec![],
        dev_size: dev_size.to_sectors_floor(),
        pe_start: pe_start.to_sectors_floor(),
        pe_count,
        extra: vec![],
    });
    Ok(())
}

/// Remove an unused PV from the VG's metadata.
pub fn remove_pv(vg: &mut VgMetadata, id: LvmUuid, device: &str) -> Result<()> {
    let Some(pv) = vg.pvs.iter().find(|p| p.id == id) else {
        return Err(EngineError::Invalid(format!(
            "{device} is not a PV of VG {}",
            vg.name
        )));
    };
    let key = pv.key.clone();
    if let Some(u) = vg.used_areas().iter().find(|u| u.0 == key) {
        return Err(EngineError::Refused(format!(
            "{device} is still used by LV {}/{} (extents {}..{}); move or remove it first",
            vg.name,
            u.3,
            u.1,
            u.1 + u.2
        )));
    }
    if vg.pvs.len() == 1 {
        return Err(EngineError::Refused(format!(
            "{device} is the last PV of VG {}; remove the VG instead",
            vg.name
        )));
    }
    vg.pvs.retain(|p| p.id != id);
    Ok(())
}

#[cfg(test)]
mod tests;
