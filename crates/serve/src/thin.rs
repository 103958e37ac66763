//! A thin volume, served: its virtual blocks looked up in the pool's
//! dm-thin metadata ([`ThinStore`]) and read or written on the pool's data
//! LV. Reads of unmapped blocks return zeroes; writes to mapped blocks no
//! other device shares go straight to the data LV (the queue's fast path,
//! asynchronous). Everything else is provisioning, done synchronously under
//! the pool's thin lock, as dm-thin does it: a new data block gets the whole
//! chunk (the old shared one's contents or zeroes, with the write over
//! them), the data is made durable, then the metadata commit maps it. A
//! full pool fails the write with ENOSPC; nothing already written changes.
//! Discards unmap whole chunks (the data is punched once no device maps it).

use crate::device::PvDevice;
use crate::snapshot::DevsIo;
use devpool_engine::cowstore::{DevIo, read_mapped, write_mapped};
use devpool_engine::lock::{LockGuard, lock_thin};
use devpool_engine::thinstore::ThinStore;
use devpool_format::map::{Piece, VolumeMap};
use std::path::PathBuf;
use std::sync::Mutex;

#[derive(Debug)]
pub struct Thin {
    pub dev_id: u64,
    pub virtual_size: u64,
    chunk: u64,
    vg: String,
    lock_dir: PathBuf,
    store: Mutex<ThinStore>,
}

/// How a read or write of a range falls on the data LV.
#[derive(Debug, Default)]
pub struct Plan {
    /// Pieces on the devices, `at` relative to the request.
    pub pieces: Vec<Piece>,
    /// Request-relative ranges that read as zeroes (unmapped).
    pub zeroes: Vec<(u64, u64)>,
}

impl Thin {
    pub fn new(store: ThinStore, dev_id: u64, virtual_size: u64, vg: &str) -> Thin {
        Thin {
            dev_id,
            virtual_size,
            chunk: store.chunk_bytes(),
            vg: vg.to_string(),
            lock_dir: PathBuf::from(devpool_engine::lock::LVM_LOCK_DIR),
            store: Mutex::new(store),
        }
    }

    pub fn chunk_bytes(&self) -> u64 {
        self.chunk
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ThinStore> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pool's thin lock (across processes), this volume's store, and the
    /// store brought up to date with commits other processes made.
    fn lock_for_change(
        &self,
        io: &DevsIo,
    ) -> Result<(LockGuard, std::sync::MutexGuard<'_, ThinStore>), i32> {
        let held = lock_thin(&self.lock_dir, &self.vg).map_err(|_| libc::EIO)?;
        let mut store = self.lock();
        store.refresh(io).map_err(|e| e.errno())?;
        Ok((held, store))
    }

    /// Chunks of `offset..offset+len`: (chunk, request-relative start,
    /// offset within the chunk, length).
    fn chunks(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64, u64)> + '_ {
        let end = offset + len;
        let mut at = offset;
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let c = at / self.chunk;
            let within = at % self.chunk;
            let n = (self.chunk - within).min(end - at);
            let item = (c, at - offset, within, n);
            at += n;
            Some(item)
        })
    }

    /// The fast path: where a read goes, or where a write goes when every
    /// chunk it touches is mapped and not shared (`None`: provisioning).
    pub fn plan(&self, offset: u64, len: u64, write: bool) -> Option<Plan> {
        let store = self.lock();
        let mut plan = Plan::default();
        let mut ps = Vec::new();
        for (c, rel, within, n) in self.chunks(offset, len) {
            match store.lookup(self.dev_id, c) {
                Some(l) if !(write && l.shared) => {
                    ps.clear();
                    store
                        .data_map
                        .pieces(store.data_offset(l.block) + within, n, &mut ps)
                        .ok()?;
                    for p in &ps {
                        plan.pieces.push(Piece {
                            at: p.at + rel,
                            ..*p
                        });
                    }
                }
                None if !write => plan.zeroes.push((rel, n)),
                _ => return None,
            }
        }
        Some(plan)
    }

    /// Write `buf` at `offset`, provisioning what it needs (see the module
    /// doc); an errno on failure.
    pub fn write(&self, devs: &[PvDevice], offset: u64, buf: &[u8]) -> Result<(), i32> {
        let io = DevsIo(devs);
        let (_held, mut store) = self.lock_for_change(&io)?;
        let chunk = self.chunk as usize;
        let mut fresh: Vec<(u64, u64)> = Vec::new();
        let result = (|| -> Result<(), i32> {
            for (c, rel, within, n) in self.chunks(offset, buf.len() as u64) {
                let part = &buf[rel as usize..(rel + n) as usize];
                let old = store.lookup(self.dev_id, c);
                if let Some(l) = old
                    && !l.shared
                {
                    let at = store.data_offset(l.block) + within;
                    write_mapped(&io, &store.data_map, at, part).map_err(io_errno)?;
                    continue;
                }
                let new = store.allocate().map_err(|e| e.errno())?;
                fresh.push((c, new));
                let mut whole = vec![0u8; chunk];
                if let Some(l) = old {
                    read_mapped(&io, &store.data_map, store.data_offset(l.block), &mut whole)
                        .map_err(io_errno)?;
                }
                whole[within as usize..(within + n) as usize].copy_from_slice(part);
                write_mapped(&io, &store.data_map, store.data_offset(new), &whole)
                    .map_err(io_errno)?;
            }
            if fresh.is_empty() {
                return Ok(());
            }
            // The data before the metadata that points at it.
            io.sync().map_err(io_errno)?;
            for &(c, new) in &fresh {
                store.map(self.dev_id, c, new).map_err(|e| e.errno())?;
            }
            store.commit(&io).map_err(|e| e.errno())
        })();
        if result.is_err() {
            for &(_, b) in &fresh {
                store.release(b);
            }
        }
        result
    }

    /// Unmap the whole chunks of a range; with `zero`, make the partial
    /// chunks at its ends read as zeroes too (write-zeroes), else leave them
    /// (discard).
    pub fn discard(&self, devs: &[PvDevice], offset: u64, len: u64, zero: bool) -> Result<(), i32> {
        let mut partial = Vec::new();
        {
            let io = DevsIo(devs);
            let (_held, mut store) = self.lock_for_change(&io)?;
            let mut dropped = Vec::new();
            for (c, _, within, n) in self.chunks(offset, len) {
                if within == 0 && n == self.chunk {
                    if let Some(l) = store.lookup(self.dev_id, c) {
                        store.unmap(self.dev_id, c).map_err(|e| e.errno())?;
                        dropped.push(l.block);
                    }
                } else if zero && store.lookup(self.dev_id, c).is_some() {
                    partial.push((c * self.chunk + within, n));
                }
            }
            if !dropped.is_empty() {
                store.commit(&io).map_err(|e| e.errno())?;
                // Blocks no device maps any more: give the space back to the
                // PV too (still under the lock: nobody can have them yet).
                for b in dropped {
                    if !store.in_use(b) {
                        punch(devs, &store.data_map, store.data_offset(b), self.chunk);
                    }
                }
            }
        }
        for (at, n) in partial {
            self.write(devs, at, &vec![0u8; n as usize])?;
        }
        Ok(())
    }
}

fn io_errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Best effort: deallocate a data block's range on its devices.
fn punch(devs: &[PvDevice], map: &VolumeMap, offset: u64, len: u64) {
    let mut ps = Vec::new();
    if map.pieces(offset, len, &mut ps).is_err() {
        return;
    }
    for p in ps {
        let Some(d) = devs.get(p.dev) else { continue };
        if d.is_block {
            continue;
        }
        // SAFETY: fallocate on an open descriptor with plain integer arguments.
        unsafe {
            libc::fallocate(
                d.any_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                p.offset as libc::off_t,
                p.len as libc::off_t,
            );
        }
    }
}
