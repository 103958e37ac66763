//! LVs activated with device-mapper as LVM2 activates them (`lvchange
//! -ay`), through [`dmdev`](crate::dmdev):
//!
//! - a linear or striped LV: one `dm-linear`/`dm-stripe` device;
//! - an origin with snapshots, or a snapshot: the family's stack, whichever
//!   member is asked for: `vg-origin-real` (the origin's extents), each
//!   `vg-snap-cow` and `vg-snap` (`snapshot <real> <cow> P <chunk>`), then
//!   `vg-origin` (`snapshot-origin <real>`: writes copy out to every
//!   snapshot first). The kernel works on the COW stores in dm-snapshot's
//!   persistent format, the one devpool writes and reads.
//!
//! - a thin volume: its pool's devices, shared by every thin volume of the
//!   pool that is active (`vg-pool_tmeta`, `vg-pool_tdata`, then
//!   `vg-pool-tpool`: `thin-pool <meta> <data> <chunk> 0 …` over dm-thin's
//!   metadata as devpool writes it), then `vg-thin` (`thin <tpool> <id>`).
//!   The pool's devices go with the last thin volume over them. While they
//!   are active the kernel owns the pool's metadata: the engine sends the
//!   pool's changes to it as messages (`create_thin`, `create_snap`,
//!   `delete`), and devpool serves none of its thin volumes itself.

use crate::dmdev::{self, Activated, Layer, LvIdentity, Param, Table};
use crate::error::{PoolError, Result};
use devpool_engine::cowstore::PvIndex;
use devpool_engine::ops::snapshot::snapshot_links;
use devpool_engine::ops::thin::{
    ThinLink, ThinPoolLink, is_thin_internal, thin_pools, thin_volume,
};
use devpool_format::cow::DEFAULT_CHUNK_SECTORS;
use devpool_format::metadata::{LvMeta, VgMetadata};
use std::path::{Path, PathBuf};

fn lv<'a>(meta: &'a VgMetadata, name: &str) -> Result<&'a LvMeta> {
    meta.lv(name)
        .ok_or_else(|| PoolError::Invalid(format!("LV {}/{name} is missing", meta.name)))
}

fn identity<'a>(meta: &'a VgMetadata, l: &'a LvMeta) -> LvIdentity<'a> {
    LvIdentity {
        vg: &meta.name,
        vg_uuid: meta.id.raw_str(),
        lv: &l.name,
        lv_uuid: l.id.raw_str(),
    }
}

/// The origin of `name`'s snapshot family, if it is an origin or a snapshot
/// (named by its COW store, as the user named it).
fn family_origin(meta: &VgMetadata, name: &str) -> Option<String> {
    snapshot_links(meta)
        .into_iter()
        .find(|l| l.origin == name || l.cow == name)
        .map(|l| l.origin)
}

/// The LVs whose devices an activation of `name` makes: `name`, or its
/// whole snapshot family (the origin, then each COW store).
pub fn family(meta: &VgMetadata, name: &str) -> Vec<String> {
    match family_origin(meta, name) {
        None => vec![name.to_string()],
        Some(origin) => std::iter::once(origin.clone())
            .chain(
                snapshot_links(meta)
                    .into_iter()
                    .filter(|l| l.origin == origin)
                    .map(|l| l.cow),
            )
            .collect(),
    }
}

/// A device-mapper device of a pool's VG, and what of devpool's holds it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActiveDevice {
    pub name: String,
    pub device: PathBuf,
    /// The LV it belongs to (its own device or a layer of it: `-real`,
    /// `-cow`, `-tpool`…).
    pub lv: Option<String>,
    /// `lease SESSION` (a thin lease's dm-thin device, made at acquire),
    /// `thin pool` (under such a device), `server PID` (a server's stack
    /// for the volume or its snapshot family); none: nothing of devpool's
    /// (LVM2's activation, `lv activate`, or a killed server's leftovers).
    pub held_by: Option<String>,
}

/// The device-mapper devices of `meta`'s VG, each with what holds it
/// (`state_dir` holds the server registry).
pub fn active_devices(state_dir: &Path, meta: &VgMetadata) -> Vec<ActiveDevice> {
    let prefix = devpool_format::dm::uuid(meta.id.raw_str(), "");
    let lv_of = |uuid: &str| {
        let id = uuid.get(prefix.len()..prefix.len() + 32)?;
        meta.lvs.iter().find(|l| l.id.raw_str() == id)
    };
    let holder = |l: &LvMeta| -> Option<String> {
        if thin_volume(meta, &l.name).is_some() {
            return crate::lease::session_of(l).map(|s| format!("lease {s}"));
        }
        family(meta, &l.name)
            .iter()
            .filter_map(|n| meta.lv(n))
            .find_map(|m| {
                crate::servers::serving(state_dir, m.id.raw_str())
                    .first()
                    .copied()
            })
            .map(|pid| format!("server {pid}"))
    };
    let mut out: Vec<ActiveDevice> = dmdev::of_vg(meta)
        .into_iter()
        .map(|d| {
            let lv = lv_of(&d.uuid);
            ActiveDevice {
                device: d.node(),
                lv: lv.map(|l| l.name.clone()),
                held_by: lv
                    .filter(|l| !is_thin_internal(meta, &l.name))
                    .and_then(holder),
                name: d.name,
            }
        })
        .collect();
    // A thin pool's devices are held with the held thin volumes over them.
    let pool_held = out.iter().any(|a| {
        a.held_by.is_some()
            && a.lv
                .as_ref()
                .is_some_and(|n| thin_volume(meta, n).is_some())
    });
    for a in out.iter_mut().filter(|a| {
        pool_held && a.held_by.is_none() && a.lv.as_ref().is_some_and(|n| is_thin_internal(meta, n))
    }) {
        a.held_by = Some("thin pool".into());
    }
    out
}

/// What activating LV `name` makes, before anything is made: its devices
/// in order, the PVs they map (by the index their tables use), the device
/// that is `name`'s own, and the uuid marking loop devices under them.
#[derive(Debug, Clone)]
pub struct StackPlan {
    pub layers: Vec<Layer>,
    pub pvs: Vec<PathBuf>,
    pub own: String,
    pub loop_mark: String,
}

/// The [`StackPlan`] of LV `name` (`pvs`: each PV's key and path).
pub fn plan_lv(
    meta: &VgMetadata,
    pvs: &[(String, PathBuf)],
    name: &str,
    read_only: bool,
) -> Result<StackPlan> {
    if let Some(t) = thin_volume(meta, name) {
        return plan_thin(meta, pvs, &t, read_only);
    }
    if is_thin_internal(meta, name) {
        return Err(PoolError::Refused(format!(
            "{}/{name} belongs to a thin pool: activate its thin volumes (the pool's devices come with them)",
            meta.name
        )));
    }
    let mut index = PvIndex::default();
    let mut map_of = |l: &LvMeta| {
        index
            .map_lv(meta, l)
            .map_err(|e| PoolError::Invalid(e.to_string()))
    };
    let Some(origin) = family_origin(meta, name) else {
        let l = lv(meta, name)?;
        let id = identity(meta, l);
        let layers = vec![Layer {
            name: id.name(),
            uuid: id.uuid(),
            table: Table::Map(map_of(l)?),
            read_only,
            shared: false,
        }];
        return finish(meta, pvs, index, layers, id.name(), l);
    };
    let origin_lv = lv(meta, &origin)?;
    let origin_map = map_of(origin_lv)?;
    let sectors = origin_map.size() / 512;
    let oid = identity(meta, origin_lv);
    let real = oid.layer("real");
    let mut layers = vec![Layer {
        name: real.0,
        uuid: real.1,
        table: Table::Map(origin_map),
        read_only: false,
        shared: false,
    }];
    let mut own = oid.name();
    for link in snapshot_links(meta)
        .into_iter()
        .filter(|l| l.origin == origin)
    {
        let c = lv(meta, &link.cow)?;
        let id = identity(meta, c);
        let cow = id.layer("cow");
        let cow_at = layers.len();
        layers.push(Layer {
            name: cow.0,
            uuid: cow.1,
            table: Table::Map(map_of(c)?),
            read_only: false,
            shared: false,
        });
        let asked = link.cow == name;
        if asked {
            own = id.name();
        }
        let chunk = link.chunk_sectors.unwrap_or(DEFAULT_CHUNK_SECTORS);
        layers.push(Layer {
            name: id.name(),
            uuid: id.uuid(),
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
            read_only: asked && read_only,
            shared: false,
        });
    }
    layers.push(Layer {
        name: oid.name(),
        uuid: oid.uuid(),
        table: Table::Over {
            kind: "snapshot-origin",
            sectors,
            params: vec![Param::Layer(0)],
        },
        read_only: origin == name && read_only,
        shared: false,
    });
    finish(meta, pvs, index, layers, own, origin_lv)
}

/// The stack of thin volume `t`: the pool's devices (shared), then its own.
fn plan_thin(
    meta: &VgMetadata,
    pvs: &[(String, PathBuf)],
    t: &ThinLink,
    read_only: bool,
) -> Result<StackPlan> {
    let pool = pool_of(meta, t)?;
    if pool.pending_messages > 0 {
        return Err(PoolError::Refused(format!(
            "thin pool {}/{} has {} change(s) LVM2 queued for the kernel (an interrupted LVM2 command): let LVM2 activate it once ('lvchange -ay')",
            meta.name, pool.pool, pool.pending_messages
        )));
    }
    let (pool_lv, tmeta, tdata) = (
        lv(meta, &pool.pool)?,
        lv(meta, &pool.tmeta)?,
        lv(meta, &pool.tdata)?,
    );
    let mut index = PvIndex::default();
    // LVM2 marks the hidden LVs' uuids with their role (`-tmeta`, `-tdata`).
    let mut shared_map = |l: &LvMeta, role: &str| -> Result<Layer> {
        let map = index
            .map_lv(meta, l)
            .map_err(|e| PoolError::Invalid(e.to_string()))?;
        let id = identity(meta, l);
        Ok(Layer {
            name: id.name(),
            uuid: format!("{}-{role}", id.uuid()),
            table: Table::Map(map),
            read_only: false,
            shared: true,
        })
    };
    let meta_layer = shared_map(tmeta, "tmeta")?;
    let data_layer = shared_map(tdata, "tdata")?;
    let data_sectors = tdata.extent_count() * meta.extent_size.bytes().0 / 512;
    let tpool = identity(meta, pool_lv).layer("tpool");
    let mut params = vec![
        Param::Layer(0),
        Param::Layer(1),
        Param::Text(pool.chunk_sectors.to_string()),
        // Low water mark: no event (devpool does not autoextend).
        Param::Text("0".into()),
    ];
    let features = pool_features(&pool);
    params.push(Param::Text(features.len().to_string()));
    params.extend(features.into_iter().map(|f| Param::Text(f.into())));
    let pool_layer = Layer {
        name: tpool.0,
        uuid: tpool.1,
        table: Table::Over {
            kind: "thin-pool",
            sectors: data_sectors,
            params,
        },
        read_only: false,
        shared: true,
    };
    let thin = lv(meta, &t.lv)?;
    let id = identity(meta, thin);
    let thin_layer = Layer {
        name: id.name(),
        uuid: id.uuid(),
        table: Table::Over {
            kind: "thin",
            sectors: thin.extent_count() * meta.extent_size.bytes().0 / 512,
            params: vec![Param::Layer(2), Param::Text(t.device_id.to_string())],
        },
        read_only,
        shared: false,
    };
    let layers = vec![meta_layer, data_layer, pool_layer, thin_layer];
    finish(meta, pvs, index, layers, id.name(), pool_lv)
}

/// dm-thin takes over a pool's metadata: refuse while a devpool process
/// other than this one serves one of its thin volumes with devpool's own
/// thin mappings (they would go on beside the kernel's). A server of a
/// volume dm-thin has active serves the kernel's device (it activated it
/// before it registered).
fn refuse_if_pool_served(state_dir: &Path, meta: &VgMetadata, pool: &str) -> Result<()> {
    let me = std::process::id();
    for t in devpool_engine::ops::thin::thin_volumes(meta)
        .into_iter()
        .filter(|t| t.pool == pool)
    {
        let Some(l) = meta.lv(&t.lv) else { continue };
        let servers = crate::servers::serving(state_dir, l.id.raw_str());
        if servers.iter().all(|p| *p == me) || devpool_engine::dm::lv_device(meta, &t.lv).is_some()
        {
            continue;
        }
        if let Some(pid) = servers.into_iter().find(|p| *p != me) {
            return Err(PoolError::Refused(format!(
                "thin pool {}/{pool} cannot go to dm-thin: process {pid} serves its thin volume {} with devpool's own thin mappings; stop that server first",
                meta.name, t.lv
            )));
        }
    }
    Ok(())
}

/// dm-snapshot takes over a family's COW stores: refuse while a devpool
/// process other than this one serves a volume of `name`'s snapshot family
/// with devpool's own copy-on-write (it would go on beside the kernel's).
/// A family the kernel has active already is the kernel's: its servers
/// serve its devices (devpool's copy-on-write refuses to open beside them).
fn refuse_if_family_served(state_dir: &Path, meta: &VgMetadata, name: &str) -> Result<()> {
    let lvs: Vec<&LvMeta> = family(meta, name)
        .iter()
        .filter_map(|n| meta.lv(n))
        .collect();
    if !dmdev::active_for_lvs(meta, lvs.iter().map(|l| l.id.raw_str())).is_empty() {
        return Ok(());
    }
    let me = std::process::id();
    for l in lvs {
        if let Some(pid) = crate::servers::serving(state_dir, l.id.raw_str())
            .into_iter()
            .find(|p| *p != me)
        {
            return Err(PoolError::Refused(format!(
                "{}/{name}'s snapshot family cannot go to dm-snapshot: process {pid} serves {} with devpool's own copy-on-write; stop that server first",
                meta.name, l.name
            )));
        }
    }
    Ok(())
}

/// The `thin-pool` target's features for `pool`, as LVM2 sets them.
fn pool_features(pool: &ThinPoolLink) -> Vec<&'static str> {
    let mut features = Vec::new();
    if !pool.zero_new_blocks {
        features.push("skip_block_zeroing");
    }
    if pool.error_when_full {
        features.push("error_if_no_space");
    }
    features
}

/// After the VG grew a thin pool's data LV while dm-thin holds the pool:
/// load the data LV's new table and the pool's (its new length), then, as
/// LVM2 does, suspend the pool and its data device and resume them bottom
/// up; dm-thin grows its data space map as the pool resumes. The data LV's
/// extents on an image-file PV get a loop device of their own; one the
/// data LV no longer uses goes. `false`: the kernel does not hold the pool.
pub fn grow_held_pool(meta: &VgMetadata, pvs: &[(String, PathBuf)]) -> Result<bool> {
    use devpool_engine::dm;
    let Some(pool) = devpool_engine::ops::thin::the_thin_pool(meta) else {
        return Ok(false);
    };
    let _thin = devpool_engine::lock::lock_thin(&devpool_engine::lock::default_dir(), &meta.name)?;
    let Some(tpool) = dm::thin_pool_device(meta) else {
        return Ok(false);
    };
    let (pool_lv, tmeta, tdata) = (
        lv(meta, &pool.pool)?,
        lv(meta, &pool.tmeta)?,
        lv(meta, &pool.tdata)?,
    );
    let named = |l: &LvMeta| -> Result<dmdev::DmDevice> {
        let name = identity(meta, l).name();
        dm::info(&name)?.ok_or_else(|| {
            PoolError::Invalid(format!(
                "thin pool {}/{}: {} holds it but {name} is not active",
                meta.name, pool.pool, tpool.name
            ))
        })
    };
    let (meta_dev, data_dev) = (named(tmeta)?, named(tdata)?);
    let old_loops: Vec<String> = dmdev::slaves(data_dev.minor)
        .into_iter()
        .filter(|s| s.starts_with("loop"))
        .collect();
    let mut index = PvIndex::default();
    let map = index
        .map_lv(meta, tdata)
        .map_err(|e| PoolError::Invalid(e.to_string()))?;
    let plan = finish(meta, pvs, index, Vec::new(), String::new(), pool_lv)?;
    let mut loops = Vec::new();
    let places = dmdev::place_pvs(&[&map], &plan.pvs, &plan.loop_mark, &mut loops)?;
    let reload = || -> Result<()> {
        let data_targets = devpool_format::dm::table(&map, |d| places.get(d).cloned().flatten())
            .map_err(|e| PoolError::Invalid(format!("{}: {e}", data_dev.name)))?;
        let sectors = map.size() / 512;
        let features = pool_features(&pool);
        let mut params = format!(
            "{}:{} {}:{} {} 0 {}",
            meta_dev.major,
            meta_dev.minor,
            data_dev.major,
            data_dev.minor,
            pool.chunk_sectors,
            features.len()
        );
        for f in features {
            params.push(' ');
            params.push_str(f);
        }
        let pool_target = devpool_format::dm::Target {
            start: 0,
            sectors,
            kind: "thin-pool",
            params,
        };
        dm::load(&data_dev.name, &data_targets, false)?;
        if let Err(e) = dm::load(&tpool.name, &[pool_target], false) {
            let _ = dm::clear(&data_dev.name);
            return Err(e.into());
        }
        dm::suspend(&tpool.name)?;
        let moved = dm::suspend(&data_dev.name)
            .and_then(|()| dm::resume(&data_dev.name))
            .and_then(|()| dm::resume(&tpool.name));
        if moved.is_err() {
            // Whatever happened, the pool must not stay suspended.
            let _ = dm::resume(&data_dev.name);
            let _ = dm::resume(&tpool.name);
        }
        Ok(moved?)
    };
    if let Err(e) = reload() {
        for l in &loops {
            let _ = crate::loopdev::detach(l);
        }
        return Err(e);
    }
    // Loop devices only the old table of the data LV used.
    dmdev::give_back_unheld(&old_loops, Some(&plan.loop_mark));
    Ok(true)
}

fn pool_of(meta: &VgMetadata, t: &ThinLink) -> Result<ThinPoolLink> {
    thin_pools(meta)
        .into_iter()
        .find(|p| p.pool == t.pool)
        .ok_or_else(|| PoolError::Invalid(format!("thin pool {}/{} is missing", meta.name, t.pool)))
}

/// The thin pool's devices device-mapper has active, in the order they go
/// (`-tpool`, then its data and metadata), without the pool LV's own
/// device (uuid suffix `-pool`): LVM2 makes that one when it activates the
/// pool itself, and it keeps the rest (it is stacked on `-tpool`).
pub fn pool_devices(meta: &VgMetadata, pool: &ThinPoolLink) -> Vec<dmdev::DmDevice> {
    let uuid_of = |n: &str| meta.lv(n).map(|l| l.id.raw_str().to_string());
    let Some(pool_uuid) = uuid_of(&pool.pool) else {
        return Vec::new();
    };
    let own = devpool_format::dm::uuid(meta.id.raw_str(), &pool_uuid);
    let uuids: Vec<String> = [&pool.pool, &pool.tdata, &pool.tmeta]
        .into_iter()
        .filter_map(|n| uuid_of(n))
        .collect();
    let mut found: Vec<dmdev::DmDevice> =
        dmdev::active_for_lvs(meta, uuids.iter().map(String::as_str))
            .into_iter()
            .filter(|d| d.uuid != own && d.uuid != format!("{own}-pool"))
            .collect();
    found.sort_by_key(|d| !d.uuid.ends_with("-tpool"));
    found
}

/// A plan's PV paths, in the order its tables index them.
fn finish(
    meta: &VgMetadata,
    pvs: &[(String, PathBuf)],
    index: PvIndex,
    layers: Vec<Layer>,
    own: String,
    marked_by: &LvMeta,
) -> Result<StackPlan> {
    let pvs = index
        .keys
        .iter()
        .map(|k| {
            pvs.iter()
                .find(|(key, _)| key == k)
                .map(|(_, p)| p.clone())
                .ok_or_else(|| PoolError::Invalid(format!("PV {k} of {} is missing", meta.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StackPlan {
        layers,
        pvs,
        own,
        loop_mark: marked_by.id.raw_str().to_string(),
    })
}

/// Activate LV `name` (`pvs`: each PV's key and path); the node of its own
/// device, and everything made. A plain LV that is active already with its
/// uuid and size is used as it is.
pub fn activate_lv(
    state_dir: &Path,
    meta: &VgMetadata,
    pvs: &[(String, PathBuf)],
    name: &str,
    read_only: bool,
) -> Result<(PathBuf, Activated)> {
    let lock = devpool_engine::lock::lock_thin(&devpool_engine::lock::default_dir(), &meta.name)?;
    activate_lv_locked(&lock, state_dir, meta, pvs, name, read_only)
}

/// [`activate_lv`] for a caller that holds the VG's thin lock (`_held`;
/// a server holds it while it opens, registers and claims its volume's
/// family, so that two servers of a family starting at once cannot both
/// pass their checks). A thin pool or a snapshot family goes to the kernel
/// under it: no devpool process writes the pool's metadata meanwhile (they
/// look for the kernel's pool device under the same lock), and no server
/// opens a volume of either with devpool's own mappings (servers open and
/// register under it).
pub fn activate_lv_locked(
    _held: &devpool_engine::lock::LockGuard,
    state_dir: &Path,
    meta: &VgMetadata,
    pvs: &[(String, PathBuf)],
    name: &str,
    read_only: bool,
) -> Result<(PathBuf, Activated)> {
    let plan = plan_lv(meta, pvs, name, read_only)?;
    let thin = thin_volume(meta, name);
    match &thin {
        Some(t) => refuse_if_pool_served(state_dir, meta, &t.pool)?,
        None if family_origin(meta, name).is_some() => {
            refuse_if_family_served(state_dir, meta, name)?
        }
        None => {}
    }
    let mut a = dmdev::activate_stack(&plan.layers, &plan.pvs, &plan.loop_mark)?;
    if thin.is_some() {
        a.lock_vg = Some(meta.name.clone());
    }
    let node = a
        .device(&plan.own)
        .map(|d| d.node())
        .ok_or_else(|| PoolError::Invalid(format!("device-mapper made no device {}", plan.own)))?;
    Ok((node, a))
}

/// A snapshot family goes whole or not at all: while one of its volumes'
/// devices is open (a server's, a mount's), removing the rest would take a
/// snapshot's device from under an origin still being written, whose
/// writes would then no longer copy out to it. Refused, as LVM2 refuses to
/// deactivate an origin in use.
fn refuse_if_family_open(meta: &VgMetadata, name: &str, lvs: &[String]) -> Result<()> {
    for l in lvs.iter().filter_map(|n| meta.lv(n)) {
        let dm_name = identity(meta, l).name();
        if let Some(d) = devpool_engine::dm::info(&dm_name)?
            && d.open_count > 0
        {
            return Err(PoolError::Refused(format!(
                "{}/{name}'s snapshot family is in use: {} ({}) is open (a server, a mount or another program has it); the family is deactivated whole, once nothing has any of it open",
                meta.name,
                d.name,
                d.node().display()
            )));
        }
    }
    Ok(())
}

/// Deactivate LV `name` (its whole snapshot family, if it has one; a thin
/// volume's pool devices when no other thin volume is over them): remove
/// its device-mapper devices, then the loop devices made under them. The
/// names of the devices removed.
pub fn deactivate_lv(meta: &VgMetadata, name: &str) -> Result<Vec<String>> {
    let lvs = family(meta, name);
    if lvs.len() > 1 {
        refuse_if_family_open(meta, name, &lvs)?;
    }
    let uuids: Vec<String> = lvs
        .iter()
        .filter_map(|n| meta.lv(n))
        .map(|l| l.id.raw_str().to_string())
        .collect();
    // A thin pool's shared devices change under its thin lock (see
    // `activate_lv`).
    let _thin = match thin_volume(meta, name) {
        Some(_) => Some(devpool_engine::lock::lock_thin(
            &devpool_engine::lock::default_dir(),
            &meta.name,
        )?),
        None => None,
    };
    let own = dmdev::active_for_lvs(meta, uuids.iter().map(String::as_str));
    let shared = match thin_volume(meta, name) {
        Some(t) if !own.is_empty() => pool_devices(meta, &pool_of(meta, &t)?),
        _ => Vec::new(),
    };
    dmdev::remove_stack(&own, &shared)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devpool_engine::engine::{DeviceSource, Engine, Operation, PvOptions};
    use devpool_format::units::{Bytes, SizeArg};

    /// A VG on an image file with LVs `plain` (8M), `o` (8M) and `o`'s
    /// snapshot `s` (12M, 8 KiB chunks), a thin pool (16M data, 64 KiB
    /// chunks) with thin volume `t` (32M): its metadata and PVs.
    fn vg() -> (tempfile::TempDir, VgMetadata, Vec<(String, PathBuf)>) {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("pv.img");
        let e = Engine::new(DeviceSource::List(vec![img.clone()]), dir.path().join("st"));
        let create = |name: &str| Operation::LvCreate {
            vg: "vg".into(),
            name: name.into(),
            size: SizeArg::parse("8M").unwrap(),
            stripes: 1,
            stripe_size: Bytes(64 << 10),
            tags: vec![],
            wipe: false,
            count: None,
        };
        let ops = [
            Operation::VgCreate {
                name: "vg".into(),
                pvs: vec![img.clone()],
                extent_size: Bytes(4 << 20),
                pv_options: PvOptions {
                    metadata_size: None,
                    metadata_copies: 1,
                    image_size: Some(Bytes(128 << 20)),
                },
                autoactivation: false,
            },
            create("plain"),
            create("o"),
            Operation::SnapshotCreate {
                vg: "vg".into(),
                origin: "o".into(),
                name: "s".into(),
                size: Some(SizeArg::parse("12M").unwrap()),
                chunk_size: Bytes(8 << 10),
            },
            Operation::ThinPoolCreate {
                vg: "vg".into(),
                data_size: SizeArg::parse("16M").unwrap(),
                metadata_size: None,
                chunk_size: Bytes(64 << 10),
            },
            Operation::ThinCreate {
                vg: "vg".into(),
                volumes: vec![devpool_engine::NewVolume {
                    name: "t".into(),
                    size: SizeArg::parse("32M").unwrap(),
                    tags: vec![],
                }],
                origin: None,
            },
        ];
        for op in &ops {
            e.apply(op, true).unwrap();
        }
        let (v, _) = e.read_vg("vg").unwrap();
        let meta = (*v.meta).clone();
        let pvs = meta
            .pvs
            .iter()
            .map(|p| (p.key.clone(), img.clone()))
            .collect();
        (dir, meta, pvs)
    }

    fn uuid(meta: &VgMetadata, lv: &str) -> String {
        format!(
            "LVM-{}{}",
            meta.id.raw_str(),
            meta.lv(lv).unwrap().id.raw_str()
        )
    }

    #[test]
    fn a_plain_lv_is_one_device_under_lvm2s_name() {
        let (_d, meta, pvs) = vg();
        let p = plan_lv(&meta, &pvs, "plain", false).unwrap();
        assert_eq!(p.layers.len(), 1);
        assert_eq!(p.layers[0].name, "vg-plain");
        assert_eq!(p.layers[0].uuid, uuid(&meta, "plain"));
        assert!(matches!(&p.layers[0].table, Table::Map(m) if m.size() == 8 << 20));
        assert_eq!(p.own, "vg-plain");
        assert_eq!(p.pvs.len(), 1);
    }

    #[test]
    fn a_snapshot_brings_its_family_stacked_as_lvm2_stacks_it() {
        let (_d, meta, pvs) = vg();
        for asked in ["o", "s"] {
            let p = plan_lv(&meta, &pvs, asked, asked == "s").unwrap();
            let names: Vec<&str> = p.layers.iter().map(|l| l.name.as_str()).collect();
            assert_eq!(names, ["vg-o-real", "vg-s-cow", "vg-s", "vg-o"]);
            assert_eq!(p.layers[0].uuid, format!("{}-real", uuid(&meta, "o")));
            assert_eq!(p.layers[1].uuid, format!("{}-cow", uuid(&meta, "s")));
            assert_eq!(p.layers[2].uuid, uuid(&meta, "s"));
            assert_eq!(p.layers[3].uuid, uuid(&meta, "o"));
            let (kind, sectors, params) = over(&p.layers[2].table);
            assert_eq!((kind, sectors), ("snapshot", (8 << 20) / 512));
            assert_eq!(
                params,
                ["#0", "#1", "P", "16"],
                "8 KiB chunks are 16 sectors"
            );
            assert!(matches!(
                &p.layers[3].table,
                Table::Over { kind: "snapshot-origin", params, .. } if matches!(params[..], [Param::Layer(0)])
            ));
            assert_eq!(p.own, format!("vg-{asked}"));
            // Only the asked device is read-only.
            let ro: Vec<bool> = p.layers.iter().map(|l| l.read_only).collect();
            assert_eq!(ro, [false, false, asked == "s", false]);
            assert_eq!(p.loop_mark, meta.lv("o").unwrap().id.raw_str());
        }
        assert_eq!(family(&meta, "s"), ["o", "s"]);
        assert_eq!(family(&meta, "plain"), ["plain"]);
    }

    /// A stacked layer's target, sectors and parameters (`#i` for layer i).
    fn over(t: &Table) -> (&'static str, u64, Vec<String>) {
        let Table::Over {
            kind,
            sectors,
            params,
        } = t
        else {
            panic!("{t:?} maps extents, not layers");
        };
        let params = params
            .iter()
            .map(|x| match x {
                Param::Layer(i) => format!("#{i}"),
                Param::Text(t) => t.clone(),
            })
            .collect();
        (kind, *sectors, params)
    }

    #[test]
    fn a_thin_volume_stacks_on_its_pools_shared_devices_as_lvm2_names_them() {
        let (_d, meta, pvs) = vg();
        let pool = devpool_engine::ops::thin::the_thin_pool(&meta).unwrap();
        let t = thin_volume(&meta, "t").unwrap();
        let p = plan_lv(&meta, &pvs, "t", true).unwrap();
        let names: Vec<&str> = p.layers.iter().map(|l| l.name.as_str()).collect();
        let (tmeta, tdata) = (format!("vg-{}", pool.tmeta), format!("vg-{}", pool.tdata));
        let tpool = format!("vg-{}-tpool", pool.pool);
        assert_eq!(names, [tmeta.as_str(), &tdata, &tpool, "vg-t"]);
        assert_eq!(
            p.layers[2].uuid,
            format!("{}-tpool", uuid(&meta, &pool.pool))
        );
        assert_eq!(p.layers[3].uuid, uuid(&meta, "t"));
        let shared: Vec<bool> = p.layers.iter().map(|l| l.shared).collect();
        assert_eq!(shared, [true, true, true, false]);
        let ro: Vec<bool> = p.layers.iter().map(|l| l.read_only).collect();
        assert_eq!(ro, [false, false, false, true]);
        assert!(matches!(&p.layers[1].table, Table::Map(m) if m.size() == 16 << 20));
        let (kind, sectors, params) = over(&p.layers[2].table);
        assert_eq!((kind, sectors), ("thin-pool", (16 << 20) / 512));
        // 64 KiB blocks are 128 sectors; devpool's pools zero new blocks,
        // and fail writes at once when full.
        assert!(pool.zero_new_blocks && pool.error_when_full);
        let want = ["#0", "#1", "128", "0", "1", "error_if_no_space"];
        assert_eq!(params, want);
        let (kind, sectors, params) = over(&p.layers[3].table);
        assert_eq!((kind, sectors), ("thin", (32 << 20) / 512));
        assert_eq!(params, ["#2".to_string(), t.device_id.to_string()]);
        assert_eq!(p.own, "vg-t");
        assert_eq!(p.loop_mark, meta.lv(&pool.pool).unwrap().id.raw_str());
        // The pool's own LVs are not activated on their own.
        for internal in [&pool.pool, &pool.tmeta, &pool.tdata] {
            let e = plan_lv(&meta, &pvs, internal, false)
                .unwrap_err()
                .to_string();
            assert!(e.contains("belongs to a thin pool"), "{e}");
        }
    }

    /// Another process's server registration for `lv`: a process holding
    /// its file's lock, as a server holds it while it serves; killed when
    /// dropped.
    struct OtherServer(std::process::Child);
    impl OtherServer {
        fn of(state: &Path, meta: &VgMetadata, lv: &str) -> OtherServer {
            let dir = state.join("servers");
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join(format!(
                "{}.{}",
                meta.lv(lv).unwrap().id.raw_str(),
                4_000_001
            ));
            // One process (a shell that becomes `sleep`) holds the lock.
            let child = std::process::Command::new("sh")
                .arg("-c")
                .arg("exec 9>\"$1\" && flock -x 9 && exec sleep 60")
                .arg("sh")
                .arg(&file)
                .spawn()
                .expect("sh");
            let t = std::time::Instant::now();
            while !crate::servers::serving(state, meta.lv(lv).unwrap().id.raw_str())
                .contains(&4_000_001)
            {
                assert!(
                    t.elapsed().as_secs() < 10,
                    "flock never took {}",
                    file.display()
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            OtherServer(child)
        }
    }
    impl Drop for OtherServer {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_family_or_pool_another_process_serves_with_devpools_own_mappings_is_not_activated() {
        let (d, meta, pvs) = vg();
        let state = d.path().join("state");
        let refusal = |lv: &str| match activate_lv(&state, &meta, &pvs, lv, false) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{lv} was activated"),
        };
        // The origin is served: neither it nor its snapshot goes to the kernel.
        let origin = OtherServer::of(&state, &meta, "o");
        for lv in ["s", "o"] {
            let e = refusal(lv);
            assert!(
                e.contains("process 4000001 serves o with devpool's own copy-on-write"),
                "{e}"
            );
        }
        // A plain volume beside it is not held back by it.
        assert!(!refusal("plain").contains("4000001"));
        drop(origin);
        assert!(!refusal("s").contains("4000001"), "the server is gone");
        // A thin volume served with devpool's own thin mappings holds its pool.
        let _thin = OtherServer::of(&state, &meta, "t");
        let e = refusal("t");
        assert!(
            e.contains("process 4000001 serves its thin volume t"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_pv_or_lv_is_named() {
        let (_d, meta, _) = vg();
        let e = plan_lv(&meta, &[], "plain", false).unwrap_err().to_string();
        assert!(e.contains("PV") && e.contains("missing"), "{e}");
        let e = plan_lv(&meta, &[], "nope", false).unwrap_err().to_string();
        assert!(e.contains("vg/nope"), "{e}");
    }
}
