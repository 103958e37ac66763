//! Report rows for PVs, VGs, LVs and segments. Sizes are bytes; the fields
//! carry LVM2's report names so they can be compared with `pvs/vgs/lvs
//! --reportformat json`.

use crate::alloc;
use crate::engine::Scan;
use crate::vg::LoadedVg;
use devpool_format::metadata::{SegmentKind, VgMetadata};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct PvRow {
    pub pv_name: String,
    pub pv_uuid: String,
    pub vg_name: String,
    pub pv_size: u64,
    pub pv_free: u64,
    pub pe_start: u64,
    pub pv_pe_count: u64,
    pub pv_pe_alloc_count: u64,
    pub pv_mda_count: u64,
    pub pv_mda_size: u64,
    pub dev_size: u64,
    pub missing: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct VgRow {
    pub vg_name: String,
    pub vg_uuid: String,
    pub vg_size: u64,
    pub vg_free: u64,
    pub vg_extent_size: u64,
    pub vg_extent_count: u64,
    pub vg_free_count: u64,
    pub lv_count: u64,
    pub pv_count: u64,
    pub vg_seqno: u64,
    pub vg_tags: Vec<String>,
    pub metadata_bytes: u64,
    pub missing_pvs: Vec<String>,
    pub disagreeing: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AreaRow {
    pub pv_name: String,
    pub pv_start_pe: u64,
    pub pv_pe_count: u64,
    /// Byte offset of the area on the PV.
    pub offset: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SegRow {
    pub segtype: String,
    pub seg_start_pe: u64,
    pub seg_size_pe: u64,
    pub seg_size: u64,
    pub stripes: u64,
    pub stripe_size: u64,
    pub areas: Vec<AreaRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LvRow {
    pub vg_name: String,
    pub lv_name: String,
    pub lv_uuid: String,
    pub lv_size: u64,
    pub lv_tags: Vec<String>,
    pub hidden: bool,
    /// Why devpool will not modify it (unknown segment type, in use by another LV…).
    pub managed_by_lvm2_only: Option<String>,
    /// `active` when device-mapper has it active, as LVM2 reports it (the
    /// caller fills it in: the engine does not look at the kernel).
    pub lv_active: String,
    pub segments: Vec<SegRow>,
}

/// Tags as LVM2 reports them: sorted.
fn sorted(tags: &[String]) -> Vec<String> {
    let mut t = tags.to_vec();
    t.sort();
    t
}

fn pv_name(vg: &LoadedVg, key: &str) -> String {
    match vg.device_of(key) {
        Some(d) => d.path.display().to_string(),
        None => format!("[missing {key}]"),
    }
}

pub fn pv_rows(scan: &Scan) -> Vec<PvRow> {
    let mut rows = Vec::new();
    for vg in &scan.assembly.vgs {
        let m = &vg.meta;
        let es = m.extent_size.bytes().0;
        let used = m.used_areas();
        for (i, pv) in m.pvs.iter().enumerate() {
            let dev = vg.devices.get(i).and_then(|d| d.as_ref());
            let alloc_count: u64 = used.iter().filter(|u| u.0 == pv.key).map(|u| u.2).sum();
            rows.push(PvRow {
                pv_name: pv_name(vg, &pv.key),
                pv_uuid: pv.id.dashed(),
                vg_name: m.name.clone(),
                pv_size: pv.pe_count * es,
                pv_free: pv.pe_count.saturating_sub(alloc_count) * es,
                pe_start: pv.pe_start.0 * 512,
                pv_pe_count: pv.pe_count,
                pv_pe_alloc_count: alloc_count,
                pv_mda_count: dev
                    .map(|d| d.label.metadata_areas.len() as u64)
                    .unwrap_or(0),
                pv_mda_size: dev
                    .and_then(|d| d.label.metadata_areas.iter().map(|a| a.size).min())
                    .unwrap_or(0),
                dev_size: dev.map(|d| d.size).unwrap_or(pv.dev_size.0 * 512),
                missing: dev.is_none(),
            });
        }
    }
    for o in &scan.assembly.orphans {
        let pe_start = o.label.pe_start().unwrap_or(0);
        rows.push(PvRow {
            pv_name: o.path.display().to_string(),
            pv_uuid: o.label.uuid.dashed(),
            vg_name: String::new(),
            pv_size: o.size.saturating_sub(pe_start),
            pv_free: o.size.saturating_sub(pe_start),
            pe_start,
            pv_pe_count: 0,
            pv_pe_alloc_count: 0,
            pv_mda_count: o.label.metadata_areas.len() as u64,
            pv_mda_size: o
                .label
                .metadata_areas
                .iter()
                .map(|a| a.size)
                .min()
                .unwrap_or(0),
            dev_size: o.size,
            missing: false,
        });
    }
    rows
}

pub fn vg_row(vg: &LoadedVg) -> VgRow {
    let m = &vg.meta;
    let es = m.extent_size.bytes().0;
    let free = alloc::total_free(&alloc::free_areas(m));
    VgRow {
        vg_name: m.name.clone(),
        vg_uuid: m.id.dashed(),
        vg_size: m.extent_count() * es,
        vg_free: free * es,
        vg_extent_size: es,
        vg_extent_count: m.extent_count(),
        vg_free_count: free,
        lv_count: {
            let rel = m.relations();
            m.lvs.iter().filter(|l| m.lv_is_visible_in(&rel, l)).count() as u64
        },
        pv_count: m.pvs.len() as u64,
        vg_seqno: m.seqno,
        vg_tags: sorted(&m.tags),
        metadata_bytes: vg
            .devices
            .iter()
            .flatten()
            .find_map(|d| d.newest().map(|t| t.size))
            .unwrap_or(0),
        missing_pvs: vg.health.missing_pvs.clone(),
        disagreeing: vg.health.disagreeing.clone(),
    }
}

pub fn lv_rows(vg: &LoadedVg) -> Vec<LvRow> {
    let m: &VgMetadata = &vg.meta;
    let es = m.extent_size.bytes().0;
    let rel = m.relations();
    m.lvs
        .iter()
        .map(|lv| LvRow {
            vg_name: m.name.clone(),
            lv_name: lv.name.clone(),
            lv_uuid: lv.id.dashed(),
            lv_size: lv.extent_count() * es,
            lv_tags: sorted(&lv.tags),
            hidden: !m.lv_is_visible_in(&rel, lv),
            managed_by_lvm2_only: m.lv_refusal_in(&rel, lv),
            lv_active: String::new(),
            segments: lv
                .segments
                .iter()
                .map(|s| {
                    let (segtype, stripes, stripe_size, areas) = match &s.kind {
                        SegmentKind::Striped {
                            stripes,
                            stripe_size,
                        } => (
                            if stripes.len() == 1 {
                                "linear".to_string()
                            } else {
                                "striped".to_string()
                            },
                            stripes.len() as u64,
                            stripe_size.map(|x| x.0 * 512).unwrap_or(0),
                            stripes
                                .iter()
                                .map(|st| AreaRow {
                                    pv_name: pv_name(vg, &st.pv),
                                    pv_start_pe: st.start,
                                    pv_pe_count: s.area_len(),
                                    offset: m.pv(&st.pv).map(|p| p.pe_start.0 * 512).unwrap_or(0)
                                        + st.start * es,
                                })
                                .collect(),
                        ),
                        SegmentKind::Other { segtype } => (segtype.clone(), 0, 0, vec![]),
                    };
                    SegRow {
                        segtype,
                        seg_start_pe: s.start_extent,
                        seg_size_pe: s.extent_count,
                        seg_size: s.extent_count * es,
                        stripes,
                        stripe_size,
                        areas,
                    }
                })
                .collect(),
        })
        .collect()
}
