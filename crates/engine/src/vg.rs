//! Assembling VGs from scanned PVs: the newest valid metadata copy wins; PVs
//! holding older copies, unreadable copies and missing PVs are reported.

use crate::scan::ScannedPv;
use devpool_format::metadata::VgMetadata;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A VG as found on disk.
#[derive(Debug, Clone)]
pub struct LoadedVg {
    pub meta: Arc<VgMetadata>,
    pub checksum: u32,
    /// For each PV of the metadata (same order): the scanned device, if found.
    pub devices: Vec<Option<ScannedPv>>,
    pub health: VgHealth,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct VgHealth {
    /// PVs named in the metadata that no scanned device carries.
    pub missing_pvs: Vec<String>,
    /// Metadata areas whose copy is older than the newest or unreadable.
    pub disagreeing: Vec<String>,
}

impl LoadedVg {
    pub fn device_of(&self, pv_key: &str) -> Option<&ScannedPv> {
        let i = self.meta.pvs.iter().position(|p| p.key == pv_key)?;
        self.devices.get(i)?.as_ref()
    }
    pub fn is_complete(&self) -> bool {
        self.health.missing_pvs.is_empty()
    }
}

/// Result of grouping scanned PVs.
#[derive(Debug, Default)]
pub struct Assembly {
    pub vgs: Vec<LoadedVg>,
    /// PVs that belong to no VG.
    pub orphans: Vec<ScannedPv>,
    pub problems: Vec<String>,
}

pub fn assemble(pvs: Vec<ScannedPv>) -> Assembly {
    let mut out = Assembly::default();
    // Newest copy per VG name, across every area of every PV.
    // Keyed by VG id, so that a rename cut half-way is still one VG.
    let mut best: BTreeMap<String, (Arc<VgMetadata>, u32)> = BTreeMap::new();
    for pv in &pvs {
        for m in pv.mdas.iter() {
            match m {
                Err(e) => out.problems.push(e.clone()),
                Ok(st) => {
                    if let Some(Ok(t)) = &st.text {
                        let entry = best
                            .entry(t.meta.id.dashed())
                            .or_insert((t.meta.clone(), t.checksum));
                        if t.meta.seqno > entry.0.seqno {
                            *entry = (t.meta.clone(), t.checksum);
                        } else if t.meta.seqno == entry.0.seqno && t.checksum != entry.1 {
                            out.problems.push(format!(
                                "{}: VG {} seqno {} differs from another copy with the same seqno (checksum 0x{:08x} vs 0x{:08x})",
                                pv.path.display(),
                                t.meta.name,
                                t.meta.seqno,
                                t.checksum,
                                entry.1
                            ));
                        }
                    } else if let Some(Err(e)) = &st.text {
                        out.problems.push(e.clone());
                    }
                }
            }
        }
    }
    let mut claimed = vec![false; pvs.len()];
    let mut names_seen: BTreeMap<String, String> = BTreeMap::new();
    for (id, (meta, _)) in &best {
        if let Some(other) = names_seen.insert(meta.name.clone(), id.clone()) {
            out.problems.push(format!(
                "two different VGs are named {} (ids {other} and {id})",
                meta.name
            ));
        }
    }
    for (_id, (meta, checksum)) in best {
        let name = meta.name.clone();
        let mut health = VgHealth::default();
        let mut devices = Vec::new();
        for pvm in &meta.pvs {
            match pvs.iter().position(|p| p.label.uuid == pvm.id) {
                Some(i) => {
                    claimed[i] = true;
                    let dev = &pvs[i];
                    for (ai, m) in dev.mdas.iter().enumerate() {
                        let why = match m {
                            Err(e) => Some(format!("unreadable metadata area: {e}")),
                            Ok(st) => match &st.text {
                                None => Some("metadata area holds no VG".to_string()),
                                Some(Err(e)) => Some(e.clone()),
                                Some(Ok(t)) if t.meta.id != meta.id => {
                                    Some(format!("holds VG {}", t.meta.name))
                                }
                                Some(Ok(t)) if t.meta.name != name => Some(format!(
                                    "holds the old name {} at seqno {}",
                                    t.meta.name, t.meta.seqno
                                )),
                                Some(Ok(t)) if t.meta.seqno != meta.seqno => Some(format!(
                                    "holds seqno {}, VG is at seqno {}",
                                    t.meta.seqno, meta.seqno
                                )),
                                Some(Ok(_)) => None,
                            },
                        };
                        if let Some(why) = why {
                            health.disagreeing.push(format!(
                                "{} metadata area {}: {why}",
                                dev.path.display(),
                                ai + 1
                            ));
                        }
                    }
                    devices.push(Some(dev.clone()));
                }
                None => {
                    health.missing_pvs.push(format!(
                        "{} (id {}, last seen as {})",
                        pvm.key,
                        pvm.id,
                        pvm.device.as_deref().unwrap_or("?")
                    ));
                    devices.push(None);
                }
            }
        }
        out.vgs.push(LoadedVg {
            meta,
            checksum,
            devices,
            health,
        });
    }
    for (i, pv) in pvs.into_iter().enumerate() {
        if !claimed[i] {
            if let Some(t) = pv.newest() {
                out.problems.push(format!(
                    "{}: holds metadata of VG {} (seqno {}) but the newest metadata of that VG does not list this PV",
                    pv.path.display(),
                    t.meta.name,
                    t.meta.seqno
                ));
            }
            out.orphans.push(pv);
        }
    }
    out
}
