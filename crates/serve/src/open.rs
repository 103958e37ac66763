//! A volume of a pool, opened for serving: its map from the VG metadata, its
//! PVs opened for I/O, and — for an origin with snapshots or a snapshot —
//! the COW stores it works with.

use crate::device::{PvDevice, Volume};
use crate::snapshot::{Cow, DevsIo, Role};
use devpool_engine::cowstore::{CowStore, PvIndex, StoreError};
use devpool_engine::ops::snapshot::{SnapshotLink, snapshot_links};
use devpool_format::cow::DEFAULT_CHUNK_SECTORS;
use devpool_format::metadata::{LvMeta, VgMetadata};
use devpool_pool::pool::Located;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Map(#[from] crate::map::MapError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn lv<'a>(meta: &'a VgMetadata, name: &str) -> Result<&'a LvMeta, OpenError> {
    meta.lv(name)
        .ok_or_else(|| OpenError::Invalid(format!("LV {}/{name} is missing", meta.name)))
}

/// A thin volume or a volume of a snapshot family, activated with
/// device-mapper (a host with dm): dm-thin over the pool's devices (shared
/// with its other active thin volumes, or LVM2's when LVM2 has it active),
/// or the family's dm-snapshot stack (LVM2's, when LVM2 has it active).
/// devpool's data plane reads and writes the kernel's device, and neither
/// opens the PVs nor reads the pool's metadata or the COW stores (the
/// kernel owns them). `state_dir` holds the server registry; `held` is the
/// VG's thin lock, which the caller holds until it has registered.
pub fn open_in_kernel(
    loc: &Located,
    read_only: bool,
    state_dir: &std::path::Path,
    held: &devpool_engine::lock::LockGuard,
) -> Result<Volume, OpenError> {
    // A snapshot is as large as its origin, whatever its COW store's size.
    let sized_by = snapshot_links(&loc.meta)
        .into_iter()
        .find(|l| l.cow == loc.lv.name)
        .map_or(Ok(&loc.lv), |l| lv(&loc.meta, &l.origin))?;
    let size = sized_by.extent_count() * loc.meta.extent_size.bytes().0;
    let (node, stack) = devpool_pool::activate::activate_lv_locked(
        held,
        state_dir,
        &loc.meta,
        &loc.pvs,
        &loc.lv.name,
        read_only,
    )
    .map_err(|e| OpenError::Invalid(e.to_string()))?;
    let dev = match PvDevice::open(&node, !read_only) {
        Ok(d) => d,
        Err(e) => {
            let _ = stack.deactivate_locked(held);
            return Err(e.into());
        }
    };
    let kernel = crate::device::KernelStack::new(node.clone(), stack);
    Ok(Volume {
        name: loc.lv.name.clone(),
        uuid: loc.lv.id.raw_str().to_string(),
        map: crate::map::VolumeMap::linear(0, 0, size),
        devs: vec![dev],
        read_only,
        cow: None,
        thin: None,
        kernel: Some(kernel),
    })
}

/// Open a located volume: the PVs it (and its COW stores) use.
pub fn open_volume(loc: &Located, read_only: bool) -> Result<Volume, OpenError> {
    let meta = &loc.meta;
    if let Some(t) = devpool_engine::ops::thin::thin_volume(meta, &loc.lv.name) {
        return open_thin(loc, &t, read_only);
    }
    let links = snapshot_links(meta);
    let mut index = PvIndex::default();
    let as_snapshot = links
        .iter()
        .find(|l| l.cow == loc.lv.name || l.snapshot_lv == loc.lv.name);
    let (name, uuid, map, stores) = match as_snapshot {
        Some(link) => {
            let cow = lv(meta, &link.cow)?;
            let origin = index.map_lv(meta, lv(meta, &link.origin)?)?;
            let cow_map = index.map_lv(meta, cow)?;
            (
                link.cow.clone(),
                cow.id.raw_str().to_string(),
                origin,
                vec![(link.clone(), cow_map)],
            )
        }
        None => {
            let map = index.map_lv(meta, &loc.lv)?;
            let mut stores = Vec::new();
            for link in links.iter().filter(|l| l.origin == loc.lv.name) {
                stores.push((link.clone(), index.map_lv(meta, lv(meta, &link.cow)?)?));
            }
            (
                loc.lv.name.clone(),
                loc.lv.id.raw_str().to_string(),
                map,
                stores,
            )
        }
    };
    // COW stores are written even when the volume is served read-only.
    let devs = open_devs(loc, &index, !read_only || !stores.is_empty())?;
    let cow = if stores.is_empty() {
        None
    } else {
        let cow = open_cow(meta, &devs, as_snapshot.is_some(), &map, stores)?;
        refuse_if_dm_active(meta, &cow.family, "dm-snapshot")?;
        Some(cow)
    };
    Ok(Volume {
        name,
        uuid,
        map,
        devs,
        read_only,
        cow,
        thin: None,
        kernel: None,
    })
}

/// A thin volume: the pool's data and metadata LVs, its device's mappings.
fn open_thin(
    loc: &Located,
    t: &devpool_engine::ops::thin::ThinLink,
    read_only: bool,
) -> Result<Volume, OpenError> {
    let meta = &loc.meta;
    let pool = devpool_engine::ops::thin::thin_pools(meta)
        .into_iter()
        .find(|p| p.pool == t.pool)
        .ok_or_else(|| OpenError::Invalid(format!("thin pool {} is missing", t.pool)))?;
    let pool_lvs = [&pool.pool, &pool.tdata, &pool.tmeta];
    let uuids: Vec<String> = pool_lvs
        .iter()
        .map(|n| Ok(lv(meta, n)?.id.raw_str().to_string()))
        .collect::<Result<_, OpenError>>()?;
    refuse_if_dm_active(meta, &uuids, "dm-thin")?;
    let mut index = PvIndex::default();
    let tdata = index.map_lv(meta, lv(meta, &pool.tdata)?)?;
    let tmeta = index.map_lv(meta, lv(meta, &pool.tmeta)?)?;
    let devs = open_devs(loc, &index, !read_only)?;
    let store = devpool_engine::thinstore::ThinStore::open(
        &DevsIo(&devs),
        &format!("{}/{}", meta.name, pool.pool),
        tmeta,
        tdata.clone(),
    )
    .map_err(|e| OpenError::Invalid(e.to_string()))?;
    if !store.has_device(t.device_id) {
        return Err(OpenError::Invalid(format!(
            "thin device {} of {} is not in the pool's metadata (an interrupted change: the next lease or release repairs it)",
            t.device_id, loc.lv.name
        )));
    }
    let virtual_size = loc.lv.extent_count() * meta.extent_size.bytes().0;
    Ok(Volume {
        name: loc.lv.name.clone(),
        uuid: loc.lv.id.raw_str().to_string(),
        map: tdata,
        devs,
        read_only,
        cow: None,
        thin: Some(crate::thin::Thin::new(
            store,
            t.device_id,
            virtual_size,
            &meta.name,
        )),
        kernel: None,
    })
}

/// Refuse when device-mapper has any of the LVs `lv_uuids` active (LVM2
/// activated them, `vgchange -ay`): the kernel's `target` then changes
/// their COW stores or thin metadata, and devpool's own mappings beside it
/// would corrupt them.
fn refuse_if_dm_active(
    meta: &VgMetadata,
    lv_uuids: &[String],
    target: &str,
) -> Result<(), OpenError> {
    let active = devpool_pool::dmdev::active_for_lvs(meta, lv_uuids.iter().map(String::as_str));
    if active.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = active
        .iter()
        .map(|d| format!("{} ({})", d.name, d.node().display()))
        .collect();
    Err(OpenError::Invalid(format!(
        "device-mapper has this volume's {target} devices active: {}; the kernel works on its copy-on-write or thin metadata, so devpool will not serve it beside the kernel (deactivate them first: 'vgchange -an {}')",
        names.join(", "),
        meta.name
    )))
}

fn open_devs(loc: &Located, index: &PvIndex, writable: bool) -> Result<Vec<PvDevice>, OpenError> {
    index
        .keys
        .iter()
        .map(|key| {
            let path = loc
                .pvs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, p)| p)
                .ok_or_else(|| {
                    OpenError::Invalid(format!("PV {key} of {} is missing", loc.meta.name))
                })?;
            Ok(PvDevice::open(path, writable)?)
        })
        .collect()
}

fn open_cow(
    meta: &VgMetadata,
    devs: &[PvDevice],
    snapshot: bool,
    origin: &crate::map::VolumeMap,
    stores: Vec<(SnapshotLink, crate::map::VolumeMap)>,
) -> Result<Cow, OpenError> {
    let io = DevsIo(devs);
    let mut family = Vec::new();
    let mut loaded = Vec::new();
    for (link, map) in stores {
        if family.is_empty() {
            family.push(lv(meta, &link.origin)?.id.raw_str().to_string());
        }
        family.push(lv(meta, &link.cow)?.id.raw_str().to_string());
        let chunk = link.chunk_sectors.unwrap_or(DEFAULT_CHUNK_SECTORS);
        loaded.push(CowStore::open(&io, &link.cow, map, chunk)?);
    }
    let role = match (snapshot, loaded.pop()) {
        (true, Some(store)) if loaded.is_empty() => Role::Snapshot {
            origin: origin.clone(),
            store,
        },
        (_, last) => {
            loaded.extend(last);
            Role::Origin { stores: loaded }
        }
    };
    Ok(Cow::new(role, family))
}
