//! Deterministic extent allocation over a VG's free space (pure: no I/O).
//!
//! Linear: one contiguous run when one fits (best fit: the smallest free area
//! that holds the request, earliest PV and extent on ties); otherwise the
//! fewest runs (largest areas first). Striped: each stripe on a different PV.

use devpool_format::metadata::VgMetadata;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreeArea {
    /// Index of the PV in `vg.pvs`.
    pub pv: usize,
    pub start: u64,
    pub len: u64,
}

/// A run of extents on one PV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub pv: usize,
    pub start: u64,
    pub len: u64,
}

/// Free areas of allocatable PVs, ordered by PV then start extent.
pub fn free_areas(vg: &VgMetadata) -> Vec<FreeArea> {
    let used = vg.used_areas();
    let mut out = Vec::new();
    for (i, pv) in vg.pvs.iter().enumerate() {
        if !pv.is_allocatable() {
            continue;
        }
        let mut mine: Vec<(u64, u64)> = used
            .iter()
            .filter(|u| u.0 == pv.key)
            .map(|u| (u.1, u.2))
            .collect();
        mine.sort();
        let mut cursor = 0u64;
        for (s, l) in mine {
            if s > cursor {
                out.push(FreeArea {
                    pv: i,
                    start: cursor,
                    len: s.min(pv.pe_count) - cursor,
                });
            }
            cursor = cursor.max(s.saturating_add(l));
        }
        if cursor < pv.pe_count {
            out.push(FreeArea {
                pv: i,
                start: cursor,
                len: pv.pe_count - cursor,
            });
        }
    }
    out.retain(|a| a.len > 0);
    out
}

/// Remove allocated runs (which always start at a free area's start) from `free`.
pub fn consume(free: &mut Vec<FreeArea>, runs: &[Run]) {
    for r in runs {
        if let Some(a) = free.iter_mut().find(|a| a.pv == r.pv && a.start == r.start) {
            a.start += r.len;
            a.len -= r.len.min(a.len);
        }
    }
    free.retain(|a| a.len > 0);
}

/// Extents an LV used before a change and no LV uses after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freed {
    /// The PV, by its uuid (its key may differ between the two versions).
    pub pv: devpool_format::uuid::LvmUuid,
    pub start: u64,
    pub len: u64,
    /// The LV that used them before.
    pub lv: String,
}

/// What `new` frees of what `old` used: per PV, the extents some LV of
/// `old` used that no LV of `new` uses (extents that moved to another LV
/// are not freed).
pub fn freed(old: &VgMetadata, new: &VgMetadata) -> Vec<Freed> {
    use devpool_format::uuid::LvmUuid;
    // `new`'s used extents per PV, sorted (LVs never share extents, so the
    // ends are sorted too): each of `old`'s areas looks up its overlaps by
    // binary search. Every commit computes this; at 65,536 LVs a scan of
    // `new` per area of `old` took seconds.
    let mut still: std::collections::HashMap<LvmUuid, Vec<(u64, u64)>> = Default::default();
    for (key, start, len, _) in new.used_areas() {
        if let Some(pv) = new.pv(key) {
            still
                .entry(pv.id)
                .or_default()
                .push((start, start.saturating_add(len)));
        }
    }
    for list in still.values_mut() {
        list.sort_unstable();
    }
    let mut out = Vec::new();
    for (key, start, len, lv) in old.used_areas() {
        let Some(pv) = old.pv(key).map(|p| p.id) else {
            continue;
        };
        let end = start.saturating_add(len);
        let list = still.get(&pv).map_or(&[][..], Vec::as_slice);
        let first = list.partition_point(|&(_, e)| e <= start);
        let mut cursor = start;
        let mut free_until = |to: u64, cursor: u64| {
            if to > cursor {
                out.push(Freed {
                    pv,
                    start: cursor,
                    len: to - cursor,
                    lv: lv.to_string(),
                });
            }
        };
        for &(s, e) in list[first..].iter().take_while(|&&(s, _)| s < end) {
            free_until(s.min(end), cursor);
            cursor = cursor.max(e);
        }
        free_until(end, cursor);
    }
    out
}

pub fn total_free(free: &[FreeArea]) -> u64 {
    free.iter().map(|a| a.len).sum()
}

/// Runs for `need` extents of a linear LV, or `None` when they do not fit.
pub fn pick_linear(free: &[FreeArea], need: u64) -> Option<Vec<Run>> {
    if need == 0 {
        return Some(vec![]);
    }
    if let Some(best) = free
        .iter()
        .filter(|a| a.len >= need)
        .min_by_key(|a| (a.len, a.pv, a.start))
    {
        return Some(vec![Run {
            pv: best.pv,
            start: best.start,
            len: need,
        }]);
    }
    if total_free(free) < need {
        return None;
    }
    // Fewest runs: the largest areas first.
    let mut by_size: Vec<&FreeArea> = free.iter().collect();
    by_size.sort_by_key(|a| (std::cmp::Reverse(a.len), a.pv, a.start));
    let mut chosen = Vec::new();
    let mut got = 0;
    for a in by_size {
        if got >= need {
            break;
        }
        chosen.push(a);
        got += a.len;
    }
    chosen.sort_by_key(|a| (a.pv, a.start));
    let mut left = need;
    let mut runs = Vec::new();
    for a in chosen {
        let take = a.len.min(left);
        runs.push(Run {
            pv: a.pv,
            start: a.start,
            len: take,
        });
        left -= take;
    }
    Some(runs)
}

/// Striped allocation: segments of `stripes` runs of equal length, each run
/// on a different PV, totalling `per_stripe` extents per stripe.
pub fn pick_striped(free: &[FreeArea], stripes: usize, per_stripe: u64) -> Option<Vec<Vec<Run>>> {
    let mut free = free.to_vec();
    let mut left = per_stripe;
    let mut segs = Vec::new();
    while left > 0 {
        // The best area of each PV: the smallest holding `left`, else the largest.
        let mut best_per_pv: Vec<FreeArea> = Vec::new();
        let mut pvs: Vec<usize> = free.iter().map(|a| a.pv).collect();
        pvs.dedup();
        for pv in pvs {
            let mine = free.iter().filter(|a| a.pv == pv);
            let fit = mine
                .clone()
                .filter(|a| a.len >= left)
                .min_by_key(|a| (a.len, a.start));
            let pick = fit.or_else(|| mine.max_by_key(|a| (a.len, std::cmp::Reverse(a.start))));
            if let Some(a) = pick {
                best_per_pv.push(a.clone());
            }
        }
        if best_per_pv.len() < stripes {
            return None;
        }
        // Prefer PVs that hold the whole rest; among them the earliest PVs.
        best_per_pv.sort_by_key(|a| (a.len < left, std::cmp::Reverse(a.len.min(left)), a.pv));
        let mut pick: Vec<FreeArea> = best_per_pv.into_iter().take(stripes).collect();
        pick.sort_by_key(|a| a.pv);
        let len = pick.iter().map(|a| a.len).min().unwrap_or(0).min(left);
        if len == 0 {
            return None;
        }
        let runs: Vec<Run> = pick
            .iter()
            .map(|a| Run {
                pv: a.pv,
                start: a.start,
                len,
            })
            .collect();
        for r in &runs {
            if let Some(a) = free.iter_mut().find(|a| a.pv == r.pv && a.start == r.start) {
                a.start += len;
                a.len -= len;
            }
        }
        free.retain(|a| a.len > 0);
        segs.push(runs);
        left -= len;
    }
    Some(segs)
}
