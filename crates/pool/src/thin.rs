//! Thin provisioning at pool level: a pool gets one thin pool (`pool thin
//! enable`, or `pool setup --thin`); from then on leases are thin volumes
//! (virtual sizes, blocks allocated as they are written), snapshots of a
//! thin volume are thin snapshots (blocks shared, instant), and `pool
//! status` reports data and metadata use.
//!
//! Thin volumes have no fixed extents, so they never get a plain loop
//! device: devpool's data plane (`devpool serve`, `run`, `vm`) serves them,
//! or the kernel's dm-thin where the host has device-mapper.

use crate::pool::{Pools, ThinSnapshotStatus};
use crate::{PoolError, Result, lease};
use devpool_engine::cowstore::PvIndex;
use devpool_engine::ops::thin::{ThinLink, ThinPoolLink, the_thin_pool, thin_volume, thin_volumes};
use devpool_engine::thinstore::{ThinStore, ThinUsage};
use devpool_engine::vg::LoadedVg;
use devpool_engine::{NewVolume, Operation};
use devpool_format::units::{Amount, Bytes, Extents, PercentOf, SizeArg};
use serde::Serialize;

/// `pool status` warns from this much data or metadata use on.
pub const THIN_FULL_PERCENT: u64 = 80;
pub const DEFAULT_THIN_CHUNK: Bytes = Bytes(64 * 1024);

#[derive(Debug, Clone, Serialize)]
pub struct ThinStatus {
    pub pool_lv: String,
    pub data_bytes: u64,
    pub metadata_bytes: u64,
    pub chunk_bytes: u64,
    pub thin_volumes: usize,
    /// What dm-thin's metadata says, when it could be read.
    pub usage: Option<ThinUsage>,
    pub vg_transaction_id: u64,
    pub error: Option<String>,
    /// The pool device through which dm-thin holds the pool, when it does:
    /// `usage` is then the kernel's status (its metadata is the kernel's).
    pub held_by_kernel: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThinEnabled {
    pub pool: String,
    pub pool_lv: String,
    pub data_bytes: u64,
    pub metadata_bytes: u64,
    pub chunk_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThinSnapshotCreated {
    pub pool: String,
    pub name: String,
    pub origin: String,
    pub lease: Option<String>,
    pub virtual_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThinSnapshotMerged {
    pub pool: String,
    /// The snapshot merged (gone now).
    pub name: String,
    /// The volume rolled back to it.
    pub origin: String,
    pub lease: Option<String>,
    /// dm-thin device ids: the origin's old one (deleted) and the one it
    /// has now (the snapshot's).
    pub old_device_id: u64,
    pub device_id: u64,
    /// Data blocks in use in the thin pool before and after.
    pub data_used_before: Option<u64>,
    pub data_used_after: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThinExtended {
    pub pool: String,
    pub pool_lv: String,
    pub data_bytes_before: u64,
    pub data_bytes: u64,
    /// dm-thin's data blocks now (what its space map counts).
    pub data_blocks: Option<u64>,
}

/// Open the pool's metadata read-only, with plain files.
pub fn open_store(v: &LoadedVg, link: &ThinPoolLink) -> std::result::Result<ThinStore, String> {
    let meta = &v.meta;
    let mut index = PvIndex::default();
    let lv = |n: &str| {
        meta.lv(n)
            .ok_or_else(|| format!("thin pool LV {n} is missing"))
    };
    let tmeta = index
        .map_lv(meta, lv(&link.tmeta)?)
        .map_err(|e| e.to_string())?;
    let tdata = index
        .map_lv(meta, lv(&link.tdata)?)
        .map_err(|e| e.to_string())?;
    let io = index.open_files(&|k| v.device_of(k).map(|d| d.path.clone()))?;
    ThinStore::open(&io, &format!("{}/{}", meta.name, link.pool), tmeta, tdata)
        .map_err(|e| e.to_string())
}

pub(crate) fn status(v: &LoadedVg) -> Option<ThinStatus> {
    let link = the_thin_pool(&v.meta)?;
    let es = v.meta.extent_size.bytes().0;
    let size = |n: &str| v.meta.lv(n).map_or(0, |l| l.extent_count() * es);
    let chunk_bytes = u64::from(link.chunk_sectors) * 512;
    let thin_count = thin_volumes(&v.meta).len();
    let held = devpool_engine::dm::thin_pool_device(&v.meta);
    let usage = match &held {
        Some(d) => kernel_usage(&d.name, chunk_bytes, thin_count as u64),
        None => open_store(v, &link).map(|s| s.usage()),
    };
    Some(ThinStatus {
        pool_lv: link.pool.clone(),
        data_bytes: size(&link.tdata),
        metadata_bytes: size(&link.tmeta),
        chunk_bytes,
        thin_volumes: thin_count,
        usage: usage.as_ref().ok().copied(),
        vg_transaction_id: link.transaction_id,
        error: usage.err(),
        held_by_kernel: held.map(|d| d.name),
    })
}

/// A pool's usage from dm-thin's status.
fn kernel_usage(
    device: &str,
    chunk_bytes: u64,
    devices: u64,
) -> std::result::Result<ThinUsage, String> {
    let st = devpool_engine::dm::thin_pool_status(device).map_err(|e| e.to_string())?;
    Ok(ThinUsage {
        chunk_bytes,
        data_blocks: st.data_blocks,
        data_used: st.data_used,
        metadata_blocks: st.metadata_blocks,
        metadata_used: st.metadata_used,
        devices,
        transaction_id: st.transaction_id,
    })
}

/// Health lines for a thin pool.
pub(crate) fn health(t: &ThinStatus, out: &mut Vec<String>) {
    if let Some(e) = &t.error {
        out.push(format!("thin pool {}: {e}", t.pool_lv));
    }
    let Some(u) = &t.usage else {
        return;
    };
    if u.data_blocks > 0 && u.data_used >= u.data_blocks {
        out.push(format!(
            "thin pool {} is full: all {} data blocks are used; writes to blocks not yet written fail with ENOSPC (release leases, discard, or grow it: devpool pool thin extend --data-size +SIZE)",
            t.pool_lv, u.data_blocks
        ));
    } else if u.data_blocks > 0 && u.data_used * 100 / u.data_blocks >= THIN_FULL_PERCENT {
        out.push(format!(
            "thin pool {} data is {}% used ({} of {} blocks)",
            t.pool_lv,
            u.data_used * 100 / u.data_blocks,
            u.data_used,
            u.data_blocks
        ));
    }
    if u.metadata_blocks > 0 && u.metadata_used * 100 / u.metadata_blocks >= THIN_FULL_PERCENT {
        out.push(format!(
            "thin pool {} metadata is {}% used ({} of {} blocks)",
            t.pool_lv,
            u.metadata_used * 100 / u.metadata_blocks,
            u.metadata_used,
            u.metadata_blocks
        ));
    }
    if u.transaction_id != t.vg_transaction_id {
        out.push(format!(
            "thin pool {}: dm-thin's transaction {} differs from the VG's {} (an interrupted change; the next change or server repairs it)",
            t.pool_lv, u.transaction_id, t.vg_transaction_id
        ));
    }
}

impl Pools {
    /// Give pool `name` a thin pool of `data_size` (default 90% of the free
    /// space) with dm-thin metadata of `metadata_size` (default: 64 bytes
    /// per data block, at least 16 MiB).
    pub fn thin_enable(
        &self,
        name: &str,
        data_size: Option<SizeArg>,
        metadata_size: Option<SizeArg>,
        chunk_size: Bytes,
    ) -> Result<ThinEnabled> {
        self.with_pool(name, |e, rec| {
            let op = Operation::ThinPoolCreate {
                vg: rec.vg.clone(),
                data_size: data_size.unwrap_or(SizeArg {
                    sign: None,
                    amount: Amount::Percent(90, PercentOf::Free),
                }),
                metadata_size,
                chunk_size,
            };
            let (plan, _) = e.apply(&op, true)?;
            let meta = plan
                .new_metadata()
                .ok_or_else(|| PoolError::Invalid("thin enable: no metadata".into()))?;
            let link = the_thin_pool(meta)
                .ok_or_else(|| PoolError::Invalid("thin pool missing after commit".into()))?;
            let es = meta.extent_size.bytes().0;
            let size = |n: &str| meta.lv(n).map_or(0, |l| l.extent_count() * es);
            Ok(ThinEnabled {
                pool: name.to_string(),
                pool_lv: link.pool.clone(),
                data_bytes: size(&link.tdata),
                metadata_bytes: size(&link.tmeta),
                chunk_bytes: u64::from(link.chunk_sectors) * 512,
            })
        })
    }

    /// Delete thin snapshot `snap` (and thin snapshots taken of it).
    pub fn thin_snapshot_delete(&self, name: &str, snap: &str) -> Result<ThinSnapshotCreated> {
        self.with_pool(name, |e, rec| {
            let (v, _) = e.read_vg(&rec.vg)?;
            let t = thin_volume(&v.meta, snap)
                .filter(|t| {
                    t.origin.is_some() && v.meta.lv(snap).and_then(lease::session_of).is_none()
                })
                .ok_or_else(|| {
                    PoolError::Invalid(format!("'{snap}' is not a thin snapshot in pool '{name}'"))
                })?;
            let mut names = vec![snap.to_string()];
            names.extend(thin_snapshots_of(&v.meta, &names));
            self.stop_servers(&v.meta, &names)?;
            let es = v.meta.extent_size.bytes().0;
            e.apply(
                &Operation::LvRemove {
                    vg: rec.vg.clone(),
                    names,
                },
                true,
            )?;
            Ok(ThinSnapshotCreated {
                pool: name.to_string(),
                name: snap.to_string(),
                origin: t.origin.clone().unwrap_or_default(),
                lease: lease_of_thin(&v.meta, snap),
                virtual_bytes: v.meta.lv(snap).map_or(0, |l| l.extent_count() * es),
            })
        })
    }

    /// Roll a thin volume back to its thin snapshot `snap`: one
    /// transaction, no data copied (the volume takes the snapshot's thin
    /// device and the snapshot goes). Refused while either is served;
    /// without `confirmed`, [`PoolError::NeedsConfirmation`] with the plan.
    pub fn thin_snapshot_merge(
        &self,
        name: &str,
        snap: &str,
        confirmed: bool,
    ) -> Result<ThinSnapshotMerged> {
        self.with_pool(name, |e, rec| {
            let (v, _) = e.read_vg(&rec.vg)?;
            let (t, o) = merge_pair(&v.meta, name, snap)?;
            for lv in [&o.lv, &t.lv] {
                crate::snapshots::refuse_if_served(self, &v.meta, lv, &[], "thin snapshot merge")?;
            }
            if !confirmed {
                return Err(PoolError::NeedsConfirmation {
                    what: format!("merge thin snapshot {} into {}", t.lv, o.lv),
                    reasons: vec![
                        format!(
                            "{} returns to the snapshot's contents: it takes the snapshot's thin device ({}); no data is copied",
                            o.lv, t.device_id
                        ),
                        format!(
                            "{}'s own device ({}) is deleted: what was written to it since the snapshot is lost",
                            o.lv, o.device_id
                        ),
                        format!("the snapshot {} is gone afterwards", t.lv),
                    ],
                });
            }
            let before = status(&v).and_then(|s| s.usage).map(|u| u.data_used);
            e.apply(
                &Operation::ThinMerge {
                    vg: rec.vg.clone(),
                    snapshot: snap.to_string(),
                },
                true,
            )?;
            let after = self.thin_usage(name).map(|u| u.data_used);
            Ok(ThinSnapshotMerged {
                pool: name.to_string(),
                name: snap.to_string(),
                origin: o.lv.clone(),
                lease: lease_of_thin(&v.meta, &o.lv),
                old_device_id: o.device_id,
                device_id: t.device_id,
                data_used_before: before,
                data_used_after: after,
            })
        })
    }

    /// Grow the thin pool's data space to `data_size` (absolute, `+N`, or a
    /// percentage of the free space). Refused while any of its thin volumes
    /// is served: a server holds the pool's size.
    pub fn thin_extend(&self, name: &str, data_size: SizeArg) -> Result<ThinExtended> {
        self.with_pool(name, |e, rec| {
            let (v, _) = e.read_vg(&rec.vg)?;
            let link = the_thin_pool(&v.meta).ok_or_else(|| {
                PoolError::Invalid(format!(
                    "pool '{name}' has no thin pool (devpool pool thin enable {name})"
                ))
            })?;
            // While dm-thin holds the pool, its devices are reloaded after
            // the commit; a server of devpool's own thin mappings (a volume
            // without a dm device) keeps the old size in memory.
            let held = devpool_engine::dm::thin_pool_device(&v.meta).is_some();
            for t in thin_volumes(&v.meta) {
                if !held {
                    crate::snapshots::refuse_if_served(self, &v.meta, &t.lv, &[], "thin pool extend")?;
                } else if devpool_engine::dm::lv_device(&v.meta, &t.lv).is_none() {
                    crate::snapshots::refuse_if_served_by_devpool(
                        self,
                        &v.meta,
                        &t.lv,
                        &[],
                        "thin pool extend",
                    )?;
                }
            }
            let es = v.meta.extent_size.bytes().0;
            let before = v.meta.lv(&link.tdata).map_or(0, |l| l.extent_count() * es);
            let (plan, _) = e.apply(
                &Operation::ThinPoolExtend {
                    vg: rec.vg.clone(),
                    data_size,
                },
                true,
            )?;
            let meta = plan
                .new_metadata()
                .ok_or_else(|| PoolError::Invalid("thin extend: no metadata".into()))?;
            let after = meta.lv(&link.tdata).map_or(0, |l| l.extent_count() * es);
            if held {
                let pvs: Vec<(String, std::path::PathBuf)> = meta
                    .pvs
                    .iter()
                    .filter_map(|p| v.device_of(&p.key).map(|d| (p.key.clone(), d.path.clone())))
                    .collect();
                crate::activate::grow_held_pool(meta, &pvs).map_err(|e| {
                    PoolError::Refused(format!(
                        "the VG gave thin pool {} its new data space, but dm-thin, which holds it, still has the old size: {e}; the pool takes the new size when it is next activated",
                        link.pool
                    ))
                })?;
            }
            let blocks = self.thin_usage(name).map(|u| u.data_blocks);
            Ok(ThinExtended {
                pool: name.to_string(),
                pool_lv: link.pool.clone(),
                data_bytes_before: before,
                data_bytes: after,
                data_blocks: blocks,
            })
        })
    }

    /// Every thin snapshot in the pool, with its origin and lease (from the
    /// VG alone: dm-thin's metadata is not read).
    pub fn thin_snapshots(&self, name: &str) -> Result<Vec<ThinSnapshotStatus>> {
        let meta = self.read_vg(name)?.meta;
        let all: Vec<String> = meta.lvs.iter().map(|l| l.name.clone()).collect();
        Ok(thin_snapshot_statuses(
            &meta,
            &thin_snapshots_of(&meta, &all),
        ))
    }

    /// The thin pool's LV name, if the pool has one (from the VG alone).
    pub fn thin_pool_lv(&self, name: &str) -> Result<Option<String>> {
        Ok(the_thin_pool(&self.read_vg(name)?.meta).map(|t| t.pool))
    }

    pub fn is_thin_volume(&self, name: &str, lv: &str) -> Result<bool> {
        Ok(thin_volume(&self.read_vg(name)?.meta, lv).is_some())
    }

    /// The thin pool's usage as it is on disk now (`None` when it cannot
    /// be read).
    fn thin_usage(&self, name: &str) -> Option<ThinUsage> {
        self.read_vg(name)
            .ok()
            .and_then(|v| status(&v))
            .and_then(|s| s.usage)
    }

    pub fn thin_status(&self, name: &str) -> Result<Option<ThinStatus>> {
        Ok(status(&self.read_vg(name)?))
    }

    /// A thin snapshot of thin volume `volume`: one transaction, no data
    /// copied; it belongs to the origin's lease.
    pub fn thin_snapshot_create(
        &self,
        name: &str,
        volume: &str,
        snap: &str,
    ) -> Result<ThinSnapshotCreated> {
        self.with_pool(name, |e, rec| {
            let (v, _) = e.read_vg(&rec.vg)?;
            if thin_volume(&v.meta, volume).is_none() {
                return Err(PoolError::Invalid(format!(
                    "'{volume}' is not a thin volume of pool '{name}'"
                )));
            }
            // A volume dm-thin has active (a server of it serves the
            // kernel's device) is fine: the snapshot goes to the kernel as
            // a message, the volume suspended meanwhile. A server of
            // devpool's own thin mappings keeps them in memory.
            if devpool_engine::dm::lv_device(&v.meta, volume).is_none() {
                crate::snapshots::refuse_if_served_by_devpool(
                    self,
                    &v.meta,
                    volume,
                    &[],
                    "thin snapshot",
                )?;
            }
            let op = Operation::ThinCreate {
                vg: rec.vg.clone(),
                volumes: vec![NewVolume {
                    name: snap.to_string(),
                    size: SizeArg {
                        sign: None,
                        amount: Amount::Extents(Extents(0)),
                    },
                    tags: vec![],
                }],
                origin: Some(volume.to_string()),
            };
            let (plan, _) = e.apply(&op, true)?;
            let meta = plan
                .new_metadata()
                .ok_or_else(|| PoolError::Invalid("thin snapshot: no metadata".into()))?;
            let es = meta.extent_size.bytes().0;
            Ok(ThinSnapshotCreated {
                pool: name.to_string(),
                name: snap.to_string(),
                origin: volume.to_string(),
                lease: lease_of_thin(meta, snap),
                virtual_bytes: meta.lv(snap).map_or(0, |l| l.extent_count() * es),
            })
        })
    }
}

fn merge_pair(
    meta: &devpool_format::metadata::VgMetadata,
    name: &str,
    snap: &str,
) -> Result<(ThinLink, ThinLink)> {
    let t = thin_volume(meta, snap)
        .filter(|_| meta.lv(snap).and_then(lease::session_of).is_none())
        .ok_or_else(|| {
            PoolError::Invalid(format!("'{snap}' is not a thin snapshot in pool '{name}'"))
        })?;
    let origin = t.origin.clone().ok_or_else(|| {
        PoolError::Invalid(format!(
            "'{snap}' has no origin any more (it was deleted): there is nothing to merge it into; use it as it is, or delete it"
        ))
    })?;
    let o = thin_volume(meta, &origin).ok_or_else(|| {
        PoolError::Invalid(format!(
            "'{snap}': its origin '{origin}' is not a thin volume"
        ))
    })?;
    Ok((t, o))
}

/// The lease a thin volume belongs to: its own, or (for a thin snapshot)
/// its origin's, up the chain.
pub fn lease_of_thin(meta: &devpool_format::metadata::VgMetadata, lv: &str) -> Option<String> {
    let mut at = lv.to_string();
    for _ in 0..64 {
        if let Some(s) = meta.lv(&at).and_then(lease::session_of) {
            return Some(s.to_string());
        }
        at = thin_volume(meta, &at)?.origin?;
    }
    None
}

/// The status rows of thin snapshots `names`.
pub(crate) fn thin_snapshot_statuses(
    meta: &devpool_format::metadata::VgMetadata,
    names: &[String],
) -> Vec<ThinSnapshotStatus> {
    names
        .iter()
        .filter_map(|n| {
            let t = thin_volume(meta, n)?;
            Some(ThinSnapshotStatus {
                name: n.clone(),
                origin: t.origin.clone().unwrap_or_default(),
                lease: lease_of_thin(meta, n),
            })
        })
        .collect()
}

/// Every thin snapshot (transitively) of `origins`, so a lease's go with it.
pub fn thin_snapshots_of(
    meta: &devpool_format::metadata::VgMetadata,
    origins: &[String],
) -> Vec<String> {
    let all = thin_volumes(meta);
    let mut out: Vec<String> = Vec::new();
    let mut frontier: Vec<String> = origins.to_vec();
    while let Some(o) = frontier.pop() {
        for t in all
            .iter()
            .filter(|t| t.origin.as_deref() == Some(o.as_str()))
        {
            if meta.lv(&t.lv).and_then(lease::session_of).is_none() && !out.contains(&t.lv) {
                out.push(t.lv.clone());
                frontier.push(t.lv.clone());
            }
        }
    }
    out
}
