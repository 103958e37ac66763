//! A thin pool, live: dm-thin's metadata (on the pool's `_tmeta` LV, byte
//! rules in `devpool_format::thin`) loaded into a model, changed in memory
//! (devices created, snapshotted, deleted; blocks mapped and unmapped) and
//! committed as dm commits — every new node and bitmap into blocks the live
//! copy does not use, a sync, then the superblock, a sync. A crash at any
//! write leaves the old copy or the new one.
//!
//! Several processes share one pool (each serves its own thin volumes), so
//! every change happens under [`ThinStore::lock`]: take it, [`refresh`]
//! (another process may have committed), change, commit, release. Data
//! blocks a process provisions are written before the commit that maps
//! them, under the same lock, so no other process can take them meanwhile.
//!
//! [`refresh`]: ThinStore::refresh

use crate::cowstore::{DevIo, read_mapped, write_mapped};
use crate::ops::thin::ThinChanges;
use devpool_format::FormatError;
use devpool_format::map::VolumeMap;
use devpool_format::thin::model::{
    Reuse, ThinDevice, ThinMetadata, read_reusable, used_blocks, write,
};
use devpool_format::thin::{BLOCK, BlockTime, DeviceDetails};
use std::collections::HashMap;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum ThinError {
    #[error("thin pool {pool}: {err}")]
    Format { pool: String, err: FormatError },
    #[error("thin pool {pool}: {err}")]
    Io { pool: String, err: io::Error },
    #[error("thin pool {pool}: the metadata LV holds no thin metadata (all-zero superblock)")]
    Unformatted { pool: String },
    #[error("thin pool {pool} is full: all {blocks} data blocks are in use")]
    DataFull { pool: String, blocks: u64 },
    #[error("thin pool {pool}: {reason}")]
    Invalid { pool: String, reason: String },
}

impl ThinError {
    /// The errno a block request gets for it.
    pub fn errno(&self) -> i32 {
        match self {
            ThinError::DataFull { .. } => libc::ENOSPC,
            ThinError::Format { err, .. } if err.reason.contains("no free metadata") => {
                libc::ENOSPC
            }
            _ => libc::EIO,
        }
    }
}

/// Data and metadata use of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ThinUsage {
    pub chunk_bytes: u64,
    pub data_blocks: u64,
    pub data_used: u64,
    pub metadata_blocks: u64,
    pub metadata_used: u64,
    pub devices: u64,
    pub transaction_id: u64,
}

/// Where a virtual block of a thin device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    pub block: u64,
    /// Another device maps the same data block (a thin snapshot's): a write
    /// must go to a new block.
    pub shared: bool,
}

#[derive(Debug)]
pub struct ThinStore {
    pub pool: String,
    pub meta_map: VolumeMap,
    pub data_map: VolumeMap,
    pub m: ThinMetadata,
    superblock: Vec<u8>,
    /// The live copy's blocks (never written by the next commit).
    used: Vec<bool>,
    reuse: Reuse,
    refs: HashMap<u64, u32>,
    /// Where the search for a free data block continues.
    cursor: u64,
    /// Blocks no device maps since the last commit. The committed copy may
    /// still map them, so they are not handed out again before the next
    /// commit (after a crash, a device would read another one's new data).
    freed: std::collections::HashSet<u64>,
    /// Blocks fewer devices map since the last commit, but still some: the
    /// committed copy may share them yet, so they count as shared (never
    /// overwritten in place) until the next commit. dm-thin gets the same
    /// from its snapshot times.
    weakened: std::collections::HashSet<u64>,
    /// In-memory changes that a failed commit left: reload before use.
    stale: bool,
}

impl ThinStore {
    fn fmt_err(&self, source: FormatError) -> ThinError {
        ThinError::Format {
            pool: self.pool.clone(),
            err: source,
        }
    }
    fn io_err(&self, source: io::Error) -> ThinError {
        ThinError::Io {
            pool: self.pool.clone(),
            err: source,
        }
    }

    /// Load the pool's metadata.
    pub fn open(
        io: &dyn DevIo,
        pool: &str,
        meta_map: VolumeMap,
        data_map: VolumeMap,
    ) -> Result<ThinStore, ThinError> {
        let mut s = ThinStore::unloaded(pool, meta_map, data_map, ThinMetadata::default());
        s.load(io)?;
        Ok(s)
    }

    /// A store holding `m` in memory only (nothing of the live copy known).
    fn unloaded(
        pool: &str,
        meta_map: VolumeMap,
        data_map: VolumeMap,
        m: ThinMetadata,
    ) -> ThinStore {
        ThinStore {
            pool: pool.to_string(),
            meta_map,
            data_map,
            used: vec![false; m.metadata_nr_blocks as usize],
            m,
            superblock: Vec::new(),
            reuse: Reuse::default(),
            refs: HashMap::new(),
            cursor: 0,
            freed: Default::default(),
            weakened: Default::default(),
            stale: true,
        }
    }

    /// Write an empty pool (no devices, transaction 0) on `meta_map` for
    /// data blocks of `chunk_sectors` over `data_map`.
    pub fn format(
        io: &dyn DevIo,
        pool: &str,
        meta_map: VolumeMap,
        data_map: VolumeMap,
        chunk_sectors: u32,
    ) -> Result<ThinStore, ThinError> {
        let chunk = u64::from(chunk_sectors) * 512;
        let m = ThinMetadata {
            uuid: [0; 16],
            time: 0,
            trans_id: 0,
            flags: 0,
            data_block_size: chunk_sectors,
            nr_data_blocks: data_map.size() / chunk,
            metadata_nr_blocks: (meta_map.size() / BLOCK as u64).min(
                devpool_format::thin::bitmap::MAX_METADATA_BITMAPS as u64
                    * devpool_format::thin::bitmap::ENTRIES_PER_BITMAP,
            ),
            devices: Default::default(),
        };
        let mut s = ThinStore::unloaded(pool, meta_map, data_map, m);
        // A stale superblock must not survive a crash before ours lands.
        write_mapped(io, &s.meta_map, 0, &[0u8; BLOCK]).map_err(|e| s.io_err(e))?;
        s.commit(io)?;
        Ok(s)
    }

    fn read_block(&self, io: &dyn DevIo, n: u64) -> Result<Vec<u8>, FormatError> {
        let mut b = vec![0u8; BLOCK];
        read_mapped(io, &self.meta_map, n * BLOCK as u64, &mut b)
            .map_err(|e| FormatError::new("thin metadata", n * BLOCK as u64, e.to_string()))?;
        Ok(b)
    }

    fn load(&mut self, io: &dyn DevIo) -> Result<(), ThinError> {
        let mut read = |n: u64| self.read_block(io, n);
        let got = read_reusable(&mut read).map_err(|e| self.fmt_err(e))?;
        let Some((sb, m, reuse)) = got else {
            return Err(ThinError::Unformatted {
                pool: self.pool.clone(),
            });
        };
        if sb.metadata_snap != 0 {
            return Err(ThinError::Invalid {
                pool: self.pool.clone(),
                reason: "a metadata snapshot is held (thin_ls/thin_dump -m?); release it first"
                    .into(),
            });
        }
        let mut read = |n: u64| self.read_block(io, n);
        let used = used_blocks(&mut read, &sb).map_err(|e| self.fmt_err(e))?;
        let data_capacity = self.data_map.size() / (u64::from(m.data_block_size.max(1)) * 512);
        if m.nr_data_blocks > data_capacity {
            return Err(ThinError::Invalid {
                pool: self.pool.clone(),
                reason: format!(
                    "metadata counts {} data blocks, the data LV holds {data_capacity}",
                    m.nr_data_blocks
                ),
            });
        }
        self.superblock = self.read_block(io, 0).map_err(|e| self.fmt_err(e))?;
        self.refs = m.data_ref_counts().into_iter().collect();
        self.freed.clear();
        self.weakened.clear();
        self.m = m;
        self.used = used;
        self.reuse = reuse;
        self.stale = false;
        Ok(())
    }

    /// Reload if another process committed since (or a commit failed);
    /// whether it did.
    pub fn refresh(&mut self, io: &dyn DevIo) -> Result<bool, ThinError> {
        if !self.stale {
            let now = self.read_block(io, 0).map_err(|e| self.fmt_err(e))?;
            if now == self.superblock {
                return Ok(false);
            }
        }
        self.load(io)?;
        Ok(true)
    }

    /// Take in data space the data LV gained since the metadata was
    /// written (as dm-thin does when a pool is loaded on a bigger data
    /// device); the new blocks are free. Whether it grew.
    pub fn grow_data(&mut self) -> bool {
        let capacity = self.data_map.size() / self.chunk_bytes().max(1);
        if capacity <= self.m.nr_data_blocks {
            return false;
        }
        self.m.nr_data_blocks = capacity;
        true
    }

    pub fn chunk_bytes(&self) -> u64 {
        u64::from(self.m.data_block_size) * 512
    }

    pub fn lookup(&self, dev: u64, vblock: u64) -> Option<Lookup> {
        let bt = self.m.devices.get(&dev)?.mappings.get(&vblock)?;
        Some(Lookup {
            block: bt.block,
            shared: self.refs.get(&bt.block).copied().unwrap_or(0) > 1
                || self.weakened.contains(&bt.block),
        })
    }

    pub fn has_device(&self, dev: u64) -> bool {
        self.m.devices.contains_key(&dev)
    }

    pub fn usage(&self) -> ThinUsage {
        ThinUsage {
            chunk_bytes: self.chunk_bytes(),
            data_blocks: self.m.nr_data_blocks,
            data_used: self.refs.len() as u64,
            metadata_blocks: self.m.metadata_nr_blocks,
            metadata_used: self.used.iter().filter(|u| **u).count() as u64,
            devices: self.m.devices.len() as u64,
            transaction_id: self.m.trans_id,
        }
    }

    /// A free data block, counted as used from now on (map it, or
    /// [`ThinStore::release`] it).
    pub fn allocate(&mut self) -> Result<u64, ThinError> {
        let n = self.m.nr_data_blocks;
        for i in 0..n {
            let b = (self.cursor + i) % n;
            if self.freed.contains(&b) {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = self.refs.entry(b) {
                e.insert(0);
                self.cursor = b + 1;
                return Ok(b);
            }
        }
        Err(ThinError::DataFull {
            pool: self.pool.clone(),
            blocks: n,
        })
    }

    /// The data blocks no device maps any more since the last commit.
    pub fn freed_blocks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.freed.iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// Whether blocks freed since the last commit wait for it (a commit
    /// would make them available to [`ThinStore::allocate`]).
    pub fn frees_pending(&self) -> bool {
        !self.freed.is_empty()
    }

    /// Whether some device maps `block` (or it is allocated for one).
    pub fn in_use(&self, block: u64) -> bool {
        self.refs.contains_key(&block)
    }

    /// Give back an allocated block that was never mapped.
    pub fn release(&mut self, block: u64) {
        if self.refs.get(&block) == Some(&0) {
            self.refs.remove(&block);
        }
    }

    fn unref(&mut self, block: u64) {
        if let Some(c) = self.refs.get_mut(&block) {
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.refs.remove(&block);
                self.freed.insert(block);
            } else {
                self.weakened.insert(block);
            }
        }
    }

    /// Map `vblock` of `dev` to `block` (allocated), dropping an old mapping.
    pub fn map(&mut self, dev: u64, vblock: u64, block: u64) -> Result<(), ThinError> {
        let time = self.m.time;
        let d = self.device_mut(dev)?;
        let old = d.mappings.insert(vblock, BlockTime { block, time });
        *self.refs.entry(block).or_insert(0) += 1;
        if let Some(old) = old {
            self.unref(old.block);
        }
        Ok(())
    }

    /// Unmap `vblock` of `dev`; whether it was mapped.
    pub fn unmap(&mut self, dev: u64, vblock: u64) -> Result<bool, ThinError> {
        let d = self.device_mut(dev)?;
        match d.mappings.remove(&vblock) {
            Some(old) => {
                self.unref(old.block);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn device_mut(&mut self, dev: u64) -> Result<&mut ThinDevice, ThinError> {
        let pool = self.pool.clone();
        self.m.devices.get_mut(&dev).ok_or(ThinError::Invalid {
            pool,
            reason: format!("thin device {dev} does not exist"),
        })
    }

    /// Apply a change of devices the VG records (dm's `create_thin`,
    /// `create_snap`, `delete`, `set_transaction_id` messages).
    pub fn apply(&mut self, c: &ThinChanges) -> Result<(), ThinError> {
        let pool = self.pool.clone();
        let invalid = |reason: String| ThinError::Invalid {
            pool: pool.clone(),
            reason,
        };
        for &id in c.create.iter().chain(c.snapshot.iter().map(|(id, _)| id)) {
            if self.m.devices.contains_key(&id) {
                return Err(invalid(format!("thin device {id} already exists")));
            }
        }
        for &id in &c.delete {
            if let Some(d) = self.m.devices.remove(&id) {
                for bt in d.mappings.values() {
                    self.unref(bt.block);
                }
            }
        }
        let details = DeviceDetails {
            mapped_blocks: 0,
            transaction_id: c.trans_id,
            creation_time: self.m.time,
            snapshotted_time: self.m.time,
        };
        for &id in &c.create {
            self.m.devices.insert(
                id,
                ThinDevice {
                    details,
                    mappings: Default::default(),
                },
            );
        }
        if !c.snapshot.is_empty() {
            // As dm: the pool's time moves on; blocks mapped before it are
            // shared by origin and snapshot, and both record the time.
            self.m.time += 1;
            let time = self.m.time;
            for &(id, origin) in &c.snapshot {
                let o = self.m.devices.get_mut(&origin).ok_or_else(|| {
                    invalid(format!("thin snapshot origin {origin} does not exist"))
                })?;
                o.details.snapshotted_time = time;
                let mappings = o.mappings.clone();
                for bt in mappings.values() {
                    *self.refs.entry(bt.block).or_insert(0) += 1;
                }
                self.m.devices.insert(
                    id,
                    ThinDevice {
                        details: DeviceDetails {
                            transaction_id: c.trans_id,
                            creation_time: time,
                            snapshotted_time: time,
                            mapped_blocks: 0,
                        },
                        mappings,
                    },
                );
            }
        }
        self.m.trans_id = c.trans_id;
        Ok(())
    }

    /// Bring the metadata in line with the VG after a crash between the
    /// two commits of a change (dm-thin's first for creations, the VG's
    /// first for deletions): devices the VG does not know are deleted,
    /// devices it knows and the metadata lacks are created empty, and the
    /// transaction id becomes the VG's. What it did, for the log (empty
    /// when they agreed).
    pub fn reconcile(
        &mut self,
        vg_devices: &std::collections::BTreeSet<u64>,
        vg_trans_id: u64,
    ) -> Vec<String> {
        let mut notes = Vec::new();
        let extra: Vec<u64> = self
            .m
            .devices
            .keys()
            .filter(|id| !vg_devices.contains(id))
            .copied()
            .collect();
        let missing: Vec<u64> = vg_devices
            .iter()
            .filter(|id| !self.m.devices.contains_key(id))
            .copied()
            .collect();
        if !extra.is_empty() {
            notes.push(format!(
                "deleted thin devices {extra:?} that the VG does not record (an interrupted change)"
            ));
        }
        if !missing.is_empty() {
            notes.push(format!(
                "created thin devices {missing:?} that the VG records but the metadata lacked (empty)"
            ));
        }
        if self.m.trans_id != vg_trans_id {
            notes.push(format!(
                "transaction id {} set to the VG's {vg_trans_id}",
                self.m.trans_id
            ));
        }
        if !notes.is_empty() {
            // apply() cannot fail here: the created ids are absent.
            let _ = self.apply(&ThinChanges {
                create: missing,
                snapshot: vec![],
                delete: extra,
                trans_id: vg_trans_id,
            });
        }
        notes
    }

    /// Make the in-memory metadata the pool's: new blocks, sync,
    /// superblock, sync. On error the store reloads before its next use.
    pub fn commit(&mut self, io: &dyn DevIo) -> Result<(), ThinError> {
        self.stale = true;
        let used = std::mem::take(&mut self.used);
        let reuse = std::mem::take(&mut self.reuse);
        let w = write(
            &self.m,
            &|b| !used.get(b as usize).copied().unwrap_or(true),
            reuse,
        )
        .map_err(|e| self.fmt_err(e))?;
        for (at, b) in &w.blocks {
            write_mapped(io, &self.meta_map, at * BLOCK as u64, b).map_err(|e| self.io_err(e))?;
        }
        io.sync().map_err(|e| self.io_err(e))?;
        write_mapped(io, &self.meta_map, 0, &w.superblock).map_err(|e| self.io_err(e))?;
        io.sync().map_err(|e| self.io_err(e))?;
        let mut now = vec![false; self.m.metadata_nr_blocks as usize];
        for b in &w.used {
            if let Some(u) = now.get_mut(*b as usize) {
                *u = true;
            }
        }
        self.used = now;
        self.reuse = w.reuse;
        self.superblock = w.superblock;
        self.freed.clear();
        self.weakened.clear();
        self.stale = false;
        Ok(())
    }

    /// Byte offset of data block `block` in the data LV.
    pub fn data_offset(&self, block: u64) -> u64 {
        block * self.chunk_bytes()
    }
}
