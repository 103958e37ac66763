//! Snapshots of pool volumes: created, listed and deleted at pool level,
//! owned by the lease of their origin (released and reaped with it).
//!
//! A volume with snapshots is copy-on-write: every write must copy the old
//! chunk out first, which only devpool's data plane (or dm-snapshot) does.
//! So taking a snapshot detaches the origin's plain loop device (refusing
//! while it is mounted or open), and refuses while a server that does not
//! know the new snapshot serves the origin. The data-copying part of a merge
//! lives in the data plane (`devpool-serve`); it ends with
//! [`Pools::snapshot_delete`].

use crate::pool::{Pools, contiguous_extent};
use crate::{PoolError, Result, lease, loopdev, servers};
use devpool_engine::cowstore::{CowUsage, snapshot_usage};
use devpool_engine::ops::snapshot::{SnapshotLink, find_snapshot, snapshot_links};
use devpool_engine::{EngineError, Operation};
use devpool_format::metadata::VgMetadata;
use devpool_format::units::{Bytes, SizeArg};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotStatus {
    /// The snapshot's name (its COW store LV).
    pub name: String,
    pub origin: String,
    /// The `snapshotN` LV LVM2 shows for it.
    pub snapshot_lv: String,
    /// The lease that owns it (its origin's), if any.
    pub lease: Option<String>,
    /// The COW store's size.
    pub size_bytes: u64,
    /// How full the store is, when it could be read.
    pub usage: Option<CowUsage>,
    /// Why the usage could not be read.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotCreated {
    pub pool: String,
    pub name: String,
    pub origin: String,
    pub snapshot_lv: String,
    pub lease: Option<String>,
    pub size_bytes: u64,
    pub chunk_bytes: u64,
    /// Plain loop devices of the origin detached (they would bypass
    /// copy-on-write).
    pub detached: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SnapshotDeleted {
    pub pool: String,
    pub name: String,
    pub origin: String,
    /// The origin's loop device, attached again now that it has no
    /// snapshots left (leased, contiguous volumes only).
    pub reattached: Option<PathBuf>,
}

fn lease_of(meta: &VgMetadata, lv: &str) -> Option<String> {
    lease::leases(meta)
        .into_iter()
        .find(|l| l.volumes.iter().any(|v| v.lv == lv))
        .map(|l| l.session)
}

fn uuid_of(meta: &VgMetadata, lv: &str) -> Option<String> {
    meta.lv(lv).map(|l| l.id.raw_str().to_string())
}

/// Refuse while a process other than this one serves `origin` or one of its
/// snapshots (its copy-on-write state would be stale), or device-mapper
/// has them active.
pub(crate) fn refuse_if_served(
    pools: &Pools,
    meta: &VgMetadata,
    origin: &str,
    links: &[SnapshotLink],
    what: &str,
) -> Result<()> {
    let lv_uuids = refuse_if_served_by_devpool(pools, meta, origin, links, what)?;
    // The kernel's dm-snapshot stack (LVM2's activation, or one a killed
    // server left) knows only the snapshots it was made with.
    let active = crate::dmdev::active_for_lvs(meta, lv_uuids.iter().map(String::as_str));
    if let Some(d) = active.first() {
        return Err(PoolError::Refused(format!(
            "{what} refused: device-mapper has '{origin}' active ({} and {} more); 'vgchange -an {}' lets it go",
            d.name,
            active.len() - 1,
            meta.name
        )));
    }
    Ok(())
}

/// The devpool-server half of [`refuse_if_served`]; the family's LV uuids.
pub(crate) fn refuse_if_served_by_devpool(
    pools: &Pools,
    meta: &VgMetadata,
    origin: &str,
    links: &[SnapshotLink],
    what: &str,
) -> Result<Vec<String>> {
    let me = std::process::id();
    let family = std::iter::once(origin.to_string()).chain(
        links
            .iter()
            .filter(|l| l.origin == origin)
            .map(|l| l.cow.clone()),
    );
    let mut lv_uuids = Vec::new();
    for lv in family {
        let Some(uuid) = uuid_of(meta, &lv) else {
            continue;
        };
        lv_uuids.push(uuid.clone());
        if let Some(pid) = servers::serving(&pools.state_dir, &uuid)
            .into_iter()
            .find(|p| *p != me)
        {
            return Err(PoolError::Refused(format!(
                "{what} refused: '{lv}' is being served by process {pid} (devpool serve, run or vm); \
stop it first (a running server keeps its own copy-on-write state)"
            )));
        }
    }
    Ok(lv_uuids)
}

impl SnapshotStatus {
    /// What merging this snapshot does: a title and its steps.
    pub fn merge_plan(&self) -> (String, Vec<String>) {
        let first = match &self.usage {
            Some(u) => format!(
                "{} chunk(s) ({} bytes) are copied back over {}: it returns to the snapshot's contents",
                u.used_chunks,
                u.used_chunks * u.chunk_bytes,
                self.origin
            ),
            None => format!("{} returns to the snapshot's contents", self.origin),
        };
        (
            format!("merge snapshot {} into {}", self.name, self.origin),
            vec![first, "then the snapshot is deleted".into()],
        )
    }
}

/// The snapshots of a VG already read, with how full each store is.
pub(crate) fn statuses(v: &devpool_engine::vg::LoadedVg) -> Vec<SnapshotStatus> {
    let es = v.meta.extent_size.bytes().0;
    let path = |k: &str| v.device_of(k).map(|d| d.path.clone());
    snapshot_usage(&v.meta, path)
        .into_iter()
        .map(|(link, usage)| SnapshotStatus {
            lease: lease_of(&v.meta, &link.origin),
            size_bytes: v.meta.lv(&link.cow).map_or(0, |l| l.extent_count() * es),
            name: link.cow,
            origin: link.origin,
            snapshot_lv: link.snapshot_lv,
            error: usage.as_ref().err().cloned(),
            usage: usage.ok(),
        })
        .collect()
}

impl Pools {
    /// The pool's snapshots, with how full each store is.
    pub fn snapshots(&self, name: &str) -> Result<Vec<SnapshotStatus>> {
        Ok(statuses(&self.read_vg(name)?))
    }

    /// Snapshot `volume` as `snap`: detach its plain loop devices (refused
    /// while they are in use), then one commit creates the COW store and
    /// its `snapshotN` LV.
    pub fn snapshot_create(
        &self,
        name: &str,
        volume: &str,
        snap: &str,
        size: Option<SizeArg>,
        chunk_size: Bytes,
    ) -> Result<SnapshotCreated> {
        self.with_pool(name, |e, rec| {
            let (v, _) = e.read_vg(&rec.vg)?;
            let meta = &v.meta;
            let origin = meta.lv(volume).ok_or_else(|| {
                PoolError::Invalid(format!(
                    "no volume '{volume}' in pool '{name}' (see 'devpool pool status {name}')"
                ))
            })?;
            if let Some(l) = find_snapshot(meta, volume) {
                return Err(PoolError::Refused(format!(
                    "'{volume}' is itself a snapshot (of '{}'); snapshot the origin",
                    l.origin
                )));
            }
            let links = snapshot_links(meta);
            refuse_if_served(self, meta, volume, &links, "snapshot")?;
            let uuid = origin.id.raw_str().to_string();
            let loops: Vec<_> = loopdev::list()
                .into_iter()
                .filter(|a| a.lv_uuid == uuid)
                .collect();
            // Detached only when nobody else uses it: checked and done in
            // one step, so no one opens it in between.
            let mut detached = Vec::new();
            let reattach = |detached: &[loopdev::Attached]| {
                for d in detached {
                    let _ = loopdev::attach(&d.backing, d.offset, d.size, &d.lv_uuid);
                }
            };
            // A dry run stops at the plan: the devices stay.
            for a in loops.iter().filter(|_| !self.dry_run) {
                match loopdev::detach_unless_used(a) {
                    Ok(loopdev::Detach::Done) => detached.push(a.clone()),
                    Ok(loopdev::Detach::Gone) => {}
                    Err(e) => {
                        reattach(&detached);
                        return Err(e);
                    }
                    Ok(loopdev::Detach::InUse(users)) => {
                        reattach(&detached);
                        return Err(PoolError::Refused(format!(
                            "{} (the loop device of '{volume}') is in use: {}. A volume with snapshots \
is served by devpool (writes through a plain loop device would bypass copy-on-write), so the loop \
device must be detached: unmount or close it, then snapshot again",
                            a.device.display(),
                            users.join("; ")
                        )));
                    }
                }
            }
            let op = Operation::SnapshotCreate {
                vg: rec.vg.clone(),
                origin: volume.to_string(),
                name: snap.to_string(),
                size,
                chunk_size,
            };
            let plan = match e.apply(&op, true) {
                Ok((plan, _)) => plan,
                Err(err) => {
                    // Give the origin its devices back: nothing changed.
                    reattach(&detached);
                    return Err(err.into());
                }
            };
            let new = plan
                .new_metadata()
                .ok_or_else(|| PoolError::Invalid("snapshot: the plan has no metadata".into()))?;
            let link = find_snapshot(new, snap).ok_or_else(|| {
                PoolError::Invalid(format!("snapshot {snap} is missing after its commit"))
            })?;
            let es = new.extent_size.bytes().0;
            Ok(SnapshotCreated {
                pool: name.to_string(),
                name: snap.to_string(),
                origin: volume.to_string(),
                lease: lease_of(new, volume),
                size_bytes: new.lv(snap).map_or(0, |l| l.extent_count() * es),
                chunk_bytes: u64::from(link.chunk_sectors.unwrap_or(0)) * 512,
                snapshot_lv: link.snapshot_lv,
                detached: detached.into_iter().map(|a| a.device).collect(),
            })
        })
    }

    /// Delete snapshot `snap` (its COW store and `snapshotN`); the origin is
    /// untouched. A leased origin left without snapshots gets its loop
    /// device back.
    pub fn snapshot_delete(&self, name: &str, snap: &str) -> Result<SnapshotDeleted> {
        self.with_pool(name, |e, rec| {
            let (v, _) = e.read_vg(&rec.vg)?;
            let link = find_snapshot(&v.meta, snap).ok_or_else(|| {
                PoolError::Invalid(format!(
                    "no snapshot '{snap}' in pool '{name}' (see 'devpool snapshot list')"
                ))
            })?;
            let links = snapshot_links(&v.meta);
            refuse_if_served(self, &v.meta, &link.origin, &links, "snapshot delete")?;
            let op = Operation::LvRemove {
                vg: rec.vg.clone(),
                names: vec![link.cow.clone()],
            };
            let (plan, _) = e.apply(&op, true).map_err(|err| match err {
                EngineError::LvNotFound { .. } => {
                    PoolError::Invalid(format!("snapshot '{snap}' was removed meanwhile"))
                }
                other => other.into(),
            })?;
            let mut reattached = None;
            if let Some(meta) = plan.new_metadata()
                && lease_of(meta, &link.origin).is_some()
                && !snapshot_links(meta).iter().any(|l| l.origin == link.origin)
                && let Some(uuid) = uuid_of(meta, &link.origin)
                && !loopdev::list().iter().any(|a| a.lv_uuid == uuid)
                && let Ok((path, offset, size)) = contiguous_extent(meta, &link.origin, |k| {
                    plan.pv_path(k).map(std::path::Path::to_path_buf)
                })
            {
                let dev = loopdev::attach(&path, offset, size, &uuid)?;
                loopdev::chown_to_sudo_user(&dev);
                reattached = Some(dev);
            }
            Ok(SnapshotDeleted {
                pool: name.to_string(),
                name: link.cow,
                origin: link.origin,
                reattached,
            })
        })
    }
}
