//! The thin-pool steps of a plan: formatting a new pool's dm-thin metadata
//! and changing its set of devices, each under the pool's thin lock and in
//! the order that makes a crash between the two commits (dm-thin's and the
//! VG's) repairable: creations are written to dm-thin's metadata first,
//! deletions after the VG (see [`ThinStore::reconcile`]).

use crate::cowstore::{DevIo, PvIndex};
use crate::device::{Device, WriteGate};
use crate::error::{EngineError, Result};
use crate::ops::thin::{ThinChanges, ThinPoolLink, thin_volumes};
use crate::thinstore::{ThinError, ThinStore};
use crate::vg::LoadedVg;
use devpool_format::map::VolumeMap;
use devpool_format::metadata::VgMetadata;
use std::cell::Cell;
use std::io;
use std::path::{Path, PathBuf};

/// An LV's physical runs `(device, byte offset, length)` in logical order.
pub fn lv_runs(vg: &LoadedVg, meta: &VgMetadata, lv: &str) -> Result<Vec<(PathBuf, u64, u64)>> {
    let l = meta
        .lv(lv)
        .ok_or_else(|| EngineError::Invalid(format!("LV {}/{lv} is missing", meta.name)))?;
    let mut index = PvIndex::default();
    let map = index
        .map_lv(meta, l)
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    let mut pieces = Vec::new();
    map.pieces(0, map.size(), &mut pieces)
        .map_err(|e| EngineError::Invalid(e.to_string()))?;
    pieces
        .into_iter()
        .map(|p| {
            let key = &index.keys[p.dev];
            let dev = vg
                .device_of(key)
                .ok_or_else(|| EngineError::Invalid(format!("PV {key} is missing")))?;
            Ok((dev.path.clone(), p.offset, p.len))
        })
        .collect()
}

/// The thin device ids and transaction id the VG records for `pool`.
pub fn vg_view(meta: &VgMetadata, pool: &ThinPoolLink) -> (Vec<u64>, u64) {
    let ids = thin_volumes(meta)
        .into_iter()
        .filter(|t| t.pool == pool.pool)
        .map(|t| t.device_id)
        .collect();
    (ids, pool.transaction_id)
}

/// Engine devices behind a [`DevIo`], every write through the plan's
/// fault-injection gate.
pub struct GatedIo<'a> {
    devs: Vec<Device>,
    gate: &'a WriteGate,
    crashed: Cell<Option<usize>>,
}

impl DevIo for GatedIo<'_> {
    fn read_at(&self, dev: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.dev(dev)?;
        let got = d
            .read_at(offset, buf.len())
            .map_err(|e| io::Error::other(e.to_string()))?;
        buf.copy_from_slice(&got);
        Ok(())
    }
    fn write_at(&self, dev: usize, offset: u64, buf: &[u8]) -> io::Result<()> {
        match self.dev(dev)?.write_at(self.gate, offset, buf) {
            Err(EngineError::InjectedCrash(n)) => {
                self.crashed.set(Some(n));
                Err(io::Error::other(format!("injected crash after {n} writes")))
            }
            r => r.map_err(|e| io::Error::other(e.to_string())),
        }
    }
    fn sync(&self) -> io::Result<()> {
        for d in &self.devs {
            d.sync().map_err(|e| io::Error::other(e.to_string()))?;
        }
        Ok(())
    }
}

impl GatedIo<'_> {
    fn dev(&self, i: usize) -> io::Result<&Device> {
        self.devs
            .get(i)
            .ok_or_else(|| io::Error::other(format!("no device {i}")))
    }
}

/// Open the devices of `runs` and the map over them.
fn open_runs<'a>(
    runs: &[(PathBuf, u64, u64)],
    gate: &'a WriteGate,
) -> Result<(GatedIo<'a>, VolumeMap)> {
    let mut paths: Vec<&Path> = Vec::new();
    let mut idx = Vec::new();
    for (p, off, len) in runs {
        let i = match paths.iter().position(|q| q == p) {
            Some(i) => i,
            None => {
                paths.push(p);
                paths.len() - 1
            }
        };
        idx.push((i, *off, *len));
    }
    let devs = paths
        .iter()
        .map(|p| Device::open(p, true))
        .collect::<Result<Vec<_>>>()?;
    Ok((
        GatedIo {
            devs,
            gate,
            crashed: Cell::new(None),
        },
        VolumeMap::from_runs(&idx),
    ))
}

fn thin_err(io: &GatedIo, e: ThinError) -> EngineError {
    match io.crashed.get() {
        Some(n) => EngineError::InjectedCrash(n),
        None => EngineError::Refused(e.to_string()),
    }
}

/// Write an empty pool's metadata.
pub fn run_format(
    pool: &str,
    meta: &[(PathBuf, u64, u64)],
    chunk_sectors: u32,
    data_bytes: u64,
    gate: &WriteGate,
) -> Result<()> {
    let (io, map) = open_runs(meta, gate)?;
    ThinStore::format(
        &io,
        pool,
        map,
        VolumeMap::linear(0, 0, data_bytes),
        chunk_sectors,
    )
    .map(|_| ())
    .map_err(|e| thin_err(&io, e))
}

pub struct Update<'a> {
    pub lock_dir: &'a Path,
    pub vg: &'a str,
    pub pool: &'a str,
    pub meta: &'a [(PathBuf, u64, u64)],
    pub data: &'a [(PathBuf, u64, u64)],
    pub data_bytes: u64,
    pub known: &'a [u64],
    pub known_trans: u64,
    pub changes: &'a ThinChanges,
}

/// Bring the metadata in line with the VG as the plan found it, apply the
/// change, commit — all under the thin lock.
pub fn run_update(u: Update, gate: &WriteGate) -> Result<()> {
    let _thin = crate::lock::lock_thin(u.lock_dir, u.vg)?;
    refuse_if_pool_device(u.vg, u.pool)?;
    let (io, map) = open_runs(u.meta, gate)?;
    let mut store = ThinStore::open(&io, u.pool, map, VolumeMap::linear(0, 0, u.data_bytes))
        .map_err(|e| thin_err(&io, e))?;
    let known = u.known.iter().copied().collect();
    store.reconcile(&known, u.known_trans);
    store.grow_data();
    store.apply(u.changes).map_err(|e| thin_err(&io, e))?;
    let freed = store.freed_blocks();
    store.commit(&io).map_err(|e| thin_err(&io, e))?;
    // Still under the thin lock: no process can have been given these
    // blocks since the commit freed them.
    punch_blocks(u.data, &store, freed.into_iter());
    Ok(())
}

/// dm-thin may have taken the pool since the plan was made: its metadata
/// is then the kernel's, and written here it would be lost or corrupt.
fn refuse_if_pool_device(vg: &str, pool: &str) -> Result<()> {
    let lv = pool.rsplit('/').next().unwrap_or(pool);
    let name = format!("{}-tpool", devpool_format::dm::name(vg, lv));
    if crate::dm::list().iter().any(|d| d.name == name) {
        return Err(EngineError::Refused(format!(
            "thin pool {pool}: device-mapper took it ({name}) while this change was planned; nothing was written, try again"
        )));
    }
    Ok(())
}

/// Send a change of thin devices to dm-thin, which holds the pool, under
/// the thin lock: first check that the kernel's transaction is the one
/// the VG records (else the two are out of step, and only deactivating
/// the pool lets devpool repair its metadata), then `delete`,
/// `create_thin` and `create_snap` (an active origin suspended around it,
/// so its writes in flight land first), and `set_transaction_id` last. A
/// device id the kernel has and the VG does not (an interrupted change) is
/// deleted and created again. A failed message undoes the creations before
/// it.
pub fn run_messages(
    lock_dir: &Path,
    vg: &str,
    pool: &str,
    device: &str,
    known_trans: u64,
    changes: &ThinChanges,
    suspend: &[(u64, String)],
) -> Result<()> {
    use crate::dm;
    let _thin = crate::lock::lock_thin(lock_dir, vg)?;
    let now = dm::thin_pool_status(device)?.transaction_id;
    if now != known_trans {
        return Err(EngineError::Refused(format!(
            "thin pool {pool}: dm-thin ({device}) is at transaction {now}, the VG records {known_trans}; deactivate the pool ('vgchange -an {vg}', or devpool lv deactivate of its thin volumes) and devpool repairs its metadata at the next change"
        )));
    }
    for id in &changes.delete {
        match dm::message(device, &format!("delete {id}")) {
            // Not in the kernel's metadata: nothing to delete.
            Err(EngineError::Io { err, .. }) if err.raw_os_error() == Some(libc::ENODATA) => {}
            r => r?,
        }
    }
    let mut made = Vec::new();
    // A device the VG does not know is left from an interrupted change
    // (created, and the VG's commit never came): it goes, as devpool's
    // own reconcile deletes such devices, and the creation is sent again.
    let create = |text: String, id: u64| -> Result<()> {
        match dm::message(device, &text) {
            Err(EngineError::Io { err, .. }) if err.raw_os_error() == Some(libc::EEXIST) => {
                dm::message(device, &format!("delete {id}"))?;
                dm::message(device, &text)
            }
            r => r,
        }
    };
    let result = (|| -> Result<()> {
        for id in &changes.create {
            create(format!("create_thin {id}"), *id)?;
            made.push(*id);
        }
        for (id, origin) in &changes.snapshot {
            let held = match suspend.iter().find(|(o, _)| o == origin) {
                Some((_, name)) if dm::info(name)?.is_some() => Some(name),
                _ => None,
            };
            if let Some(name) = held {
                dm::suspend(name)?;
            }
            let sent = create(format!("create_snap {id} {origin}"), *id);
            if let Some(name) = held {
                dm::resume(name)?;
            }
            sent?;
            made.push(*id);
        }
        dm::message(
            device,
            &format!("set_transaction_id {known_trans} {}", changes.trans_id),
        )
    })();
    if result.is_err() {
        for id in made {
            let _ = dm::message(device, &format!("delete {id}"));
        }
    }
    result
}

/// The thin part of `vg trim`: under the thin lock, punch every data block
/// no thin device maps out of the image files under the data LV (runs of
/// such blocks at once).
pub fn run_trim(
    lock_dir: &Path,
    vg: &str,
    pool: &str,
    meta: &[(PathBuf, u64, u64)],
    data: &[(PathBuf, u64, u64)],
    data_bytes: u64,
    gate: &WriteGate,
) -> Result<()> {
    let _thin = crate::lock::lock_thin(lock_dir, vg)?;
    let (io, map) = open_runs(meta, gate)?;
    let store = ThinStore::open(&io, pool, map, VolumeMap::linear(0, 0, data_bytes))
        .map_err(|e| thin_err(&io, e))?;
    let blocks = data_bytes / store.chunk_bytes().max(1);
    punch_blocks(data, &store, (0..blocks).filter(|&b| !store.in_use(b)));
    Ok(())
}

/// Best effort: punch data `blocks` (ascending) of the data LV, laid out as
/// `runs`, out of the image files under it, consecutive blocks at once and
/// each file opened once; block devices are left as they are (their
/// blocks are simply reused).
fn punch_blocks(
    runs: &[(PathBuf, u64, u64)],
    store: &ThinStore,
    blocks: impl Iterator<Item = u64>,
) {
    use std::os::fd::AsRawFd;
    let files: Vec<Option<std::fs::File>> = runs
        .iter()
        .map(|(path, _, _)| {
            let f = std::fs::OpenOptions::new().write(true).open(path).ok()?;
            f.metadata().is_ok_and(|m| m.is_file()).then_some(f)
        })
        .collect();
    let punch = |first: u64, n: u64| {
        let (at, end) = (store.data_offset(first), store.data_offset(first + n));
        let mut lv_at = 0u64;
        for ((_, offset, len), f) in runs.iter().zip(&files) {
            let (from, to) = (at.max(lv_at), end.min(lv_at.saturating_add(*len)));
            if let Some(f) = f
                && from < to
            {
                let _ =
                    crate::device::punch_hole(f.as_raw_fd(), offset + (from - lv_at), to - from);
            }
            lv_at = lv_at.saturating_add(*len);
        }
    };
    let mut run: Option<(u64, u64)> = None;
    for b in blocks {
        run = match run {
            Some((first, n)) if first + n == b => Some((first, n + 1)),
            Some((first, n)) => {
                punch(first, n);
                Some((b, 1))
            }
            None => Some((b, 1)),
        };
    }
    if let Some((first, n)) = run {
        punch(first, n);
    }
}
