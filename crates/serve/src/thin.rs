//! A thin volume, served: its virtual blocks looked up in the pool's
//! dm-thin metadata ([`ThinStore`]) and read or written on the pool's data
//! LV. Reads of unmapped blocks return zeroes; writes to mapped blocks no
//! other device shares go straight to the data LV (the queue's fast path,
//! asynchronous). Everything else is provisioning, as dm-thin does it: a
//! new data block gets the whole chunk (the old shared one's contents or
//! zeroes, with the write over them) and is mapped in memory; the write
//! completes then. The mappings become durable at the next commit — on a
//! flush, a FUA write, [`COMMIT_PERIOD`] after the first uncommitted
//! change, and when the volume is let go — which first syncs the data,
//! then writes the metadata. A crash before it loses only unflushed
//! writes, as on any disk. While changes are uncommitted this process holds
//! the pool's thin lock (other processes' changes wait for the commit).
//! A full pool fails the write with ENOSPC; nothing already written
//! changes. Discards unmap whole chunks (the data is punched once no device
//! maps it).

use crate::device::PvDevice;
use crate::snapshot::DevsIo;
use devpool_engine::cowstore::{DevIo, read_mapped, write_mapped};
use devpool_engine::lock::{LockGuard, lock_thin};
use devpool_engine::thinstore::ThinStore;
use devpool_format::map::{Piece, VolumeMap};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// How long provisioned mappings may stay uncommitted (dm-thin's default
/// commit period is 1 s; shorter here because other processes' changes to
/// the pool wait for it).
pub const COMMIT_PERIOD: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct Thin {
    pub dev_id: u64,
    pub virtual_size: u64,
    chunk: u64,
    pool: Arc<SharedPool>,
}

/// One pool's metadata, shared by every thin volume this process serves
/// from it: their uncommitted changes are one transaction, as in dm-thin
/// (two stores would hand out the same free block, and the second one's
/// thin lock would wait for the first one's forever).
#[derive(Debug)]
struct SharedPool {
    vg: String,
    lock_dir: PathBuf,
    state: Mutex<State>,
}

/// The pools this process has open, by VG and pool name.
static POOLS: LazyLock<Mutex<HashMap<String, Weak<SharedPool>>>> = LazyLock::new(Default::default);

#[derive(Debug)]
struct State {
    store: ThinStore,
    /// The pool's thin lock, held from the first uncommitted change until
    /// its commit.
    held: Option<LockGuard>,
    /// When the first uncommitted change was made.
    dirty_since: Option<Instant>,
    /// A background commit's failure, reported by the next flush.
    failed: Option<i32>,
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
    /// Thin device `dev_id` of the pool `store` holds (just loaded), in VG
    /// `vg`; it joins the pool's metadata this process already has open.
    pub fn new(store: ThinStore, dev_id: u64, virtual_size: u64, vg: &str) -> Thin {
        let chunk = store.chunk_bytes();
        let key = format!("{vg}\0{}", store.pool);
        let mut pools = POOLS.lock().unwrap_or_else(|p| p.into_inner());
        pools.retain(|_, w| w.strong_count() > 0);
        let pool = match pools.get(&key).and_then(Weak::upgrade) {
            Some(pool) => {
                let mut st = pool.state.lock().unwrap_or_else(|p| p.into_inner());
                // Uncommitted changes hold the thin lock: nobody else has
                // committed since. Otherwise the fresh copy is the newer.
                if st.held.is_none() {
                    st.store = store;
                }
                drop(st);
                pool
            }
            None => {
                let pool = Arc::new(SharedPool {
                    vg: vg.to_string(),
                    lock_dir: devpool_engine::lock::default_dir(),
                    state: Mutex::new(State {
                        store,
                        held: None,
                        dirty_since: None,
                        failed: None,
                    }),
                });
                pools.insert(key, Arc::downgrade(&pool));
                pool
            }
        };
        Thin {
            dev_id,
            virtual_size,
            chunk,
            pool,
        }
    }

    pub fn chunk_bytes(&self) -> u64 {
        self.chunk
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.pool.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This volume's state with the pool's thin lock (across processes)
    /// held and the store up to date with commits other processes made.
    fn lock_for_change(&self, io: &DevsIo) -> Result<MutexGuard<'_, State>, i32> {
        let mut st = self.lock();
        self.lock_again(&mut st, io)?;
        Ok(st)
    }

    /// Let the thin lock go when nothing waits for a commit.
    fn settle(st: &mut State) {
        if st.dirty_since.is_none() {
            st.held = None;
        }
    }

    /// Commit what was provisioned (data synced first); what went wrong is
    /// also kept for the next flush to report.
    fn commit_locked(st: &mut State, io: &DevsIo) -> Result<(), i32> {
        if st.dirty_since.is_none() {
            return Ok(());
        }
        let r = io
            .sync()
            .map_err(io_errno)
            .and_then(|()| st.store.commit(io).map_err(|e| e.errno()));
        // A failed commit leaves the store to reload at its next use.
        st.dirty_since = None;
        st.held = None;
        if let Err(errno) = r {
            st.failed = Some(errno);
        }
        r
    }

    /// Make every completed write durable (a flush): commit, and report a
    /// background commit that failed since the last flush.
    pub fn flush(&self, devs: &[PvDevice]) -> Result<(), i32> {
        let mut st = self.lock();
        Self::commit_locked(&mut st, &DevsIo(devs))?;
        match st.failed.take() {
            Some(errno) => Err(errno),
            None => Ok(()),
        }
    }

    /// Commit if changes are older than [`COMMIT_PERIOD`] (errors wait for
    /// the next flush); how long until the next commit is due, if anything
    /// waits for one.
    pub fn commit_if_due(&self, devs: &[PvDevice]) -> Option<Duration> {
        let mut st = self.lock();
        let since = st.dirty_since?;
        let age = since.elapsed();
        if age < COMMIT_PERIOD {
            return Some(COMMIT_PERIOD - age);
        }
        let _ = Self::commit_locked(&mut st, &DevsIo(devs));
        None
    }

    /// Whether some change waits for a commit.
    pub fn dirty(&self) -> bool {
        self.lock().dirty_since.is_some()
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
        let st = self.lock();
        let store = &st.store;
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
    /// doc), committed before returning with `fua`; an errno on failure.
    pub fn write(&self, devs: &[PvDevice], offset: u64, buf: &[u8], fua: bool) -> Result<(), i32> {
        let io = DevsIo(devs);
        let mut st = self.lock_for_change(&io)?;
        let r = self.provision(&mut st, &io, offset, buf);
        let r = match r {
            Err(libc::ENOSPC) if st.store.frees_pending() => {
                // Blocks freed in this transaction become free at its commit.
                Self::commit_locked(&mut st, &io)
                    .and_then(|()| self.lock_again(&mut st, &io))
                    .and_then(|()| self.provision(&mut st, &io, offset, buf))
            }
            r => r,
        };
        let r = r.and_then(|()| match fua {
            true => Self::commit_locked(&mut st, &io),
            false => Ok(()),
        });
        Self::settle(&mut st);
        r
    }

    /// Take the thin lock unless held (a commit lets it go) and bring the
    /// store up to date with what others committed.
    fn lock_again(&self, st: &mut State, io: &DevsIo) -> Result<(), i32> {
        if st.held.is_none() {
            st.held = Some(lock_thin(&self.pool.lock_dir, &self.pool.vg).map_err(|_| libc::EIO)?);
            st.store.refresh(io).map_err(|e| e.errno())?;
        }
        Ok(())
    }

    /// The write itself: new blocks for what is unmapped or shared (all
    /// allocated first, so a full pool refuses the write whole), the data,
    /// then the mappings, in memory.
    fn provision(&self, st: &mut State, io: &DevsIo, offset: u64, buf: &[u8]) -> Result<(), i32> {
        let store = &mut st.store;
        let chunk = self.chunk as usize;
        let mut fresh: Vec<(u64, u64)> = Vec::new();
        let result = (|| -> Result<(), i32> {
            for (c, ..) in self.chunks(offset, buf.len() as u64) {
                match store.lookup(self.dev_id, c) {
                    Some(l) if !l.shared => {}
                    _ => fresh.push((c, store.allocate().map_err(|e| e.errno())?)),
                }
            }
            let mut whole = vec![0u8; chunk];
            for (c, rel, within, n) in self.chunks(offset, buf.len() as u64) {
                let part = &buf[rel as usize..(rel + n) as usize];
                let old = store.lookup(self.dev_id, c);
                let Some(&(_, new)) = fresh.iter().find(|f| f.0 == c) else {
                    let at = old.map(|l| store.data_offset(l.block)).unwrap_or(0) + within;
                    write_mapped(io, &store.data_map, at, part).map_err(io_errno)?;
                    continue;
                };
                whole.fill(0);
                if let Some(l) = old {
                    read_mapped(io, &store.data_map, store.data_offset(l.block), &mut whole)
                        .map_err(io_errno)?;
                }
                whole[within as usize..(within + n) as usize].copy_from_slice(part);
                write_mapped(io, &store.data_map, store.data_offset(new), &whole)
                    .map_err(io_errno)?;
            }
            Ok(())
        })();
        if let Err(errno) = result {
            for &(_, b) in &fresh {
                store.release(b);
            }
            return Err(errno);
        }
        for &(c, new) in &fresh {
            store.map(self.dev_id, c, new).map_err(|e| e.errno())?;
        }
        if !fresh.is_empty() {
            st.dirty_since.get_or_insert_with(Instant::now);
        }
        Ok(())
    }

    /// Unmap the whole chunks of a range; with `zero`, make the partial
    /// chunks at its ends read as zeroes too (write-zeroes), else leave them
    /// (discard). Committed before returning with `fua`.
    pub fn discard(
        &self,
        devs: &[PvDevice],
        offset: u64,
        len: u64,
        zero: bool,
        fua: bool,
    ) -> Result<(), i32> {
        let io = DevsIo(devs);
        let mut partial = Vec::new();
        {
            let mut st = self.lock_for_change(&io)?;
            let r = self.unmap_chunks(&mut st, devs, (offset, len), zero, &mut partial);
            if r.is_ok() && partial.is_empty() && fua {
                Self::commit_locked(&mut st, &io)?;
            }
            Self::settle(&mut st);
            r?;
        }
        let n = partial.len();
        for (i, (at, len)) in partial.into_iter().enumerate() {
            self.write(devs, at, &vec![0u8; len as usize], fua && i + 1 == n)?;
        }
        Ok(())
    }

    /// The whole chunks of a range unmapped (in memory) and their blocks
    /// punched once nothing maps them (a block freed in this transaction is
    /// not handed out again before the commit, so nobody can have it yet);
    /// the partial chunks to zero, with `zero`.
    fn unmap_chunks(
        &self,
        st: &mut State,
        devs: &[PvDevice],
        (offset, len): (u64, u64),
        zero: bool,
        partial: &mut Vec<(u64, u64)>,
    ) -> Result<(), i32> {
        let store = &mut st.store;
        for (c, _, within, n) in self.chunks(offset, len) {
            let Some(l) = store.lookup(self.dev_id, c) else {
                continue;
            };
            if within == 0 && n == self.chunk {
                store.unmap(self.dev_id, c).map_err(|e| e.errno())?;
                st.dirty_since.get_or_insert_with(Instant::now);
                if !store.in_use(l.block) {
                    punch(
                        devs,
                        &store.data_map,
                        store.data_offset(l.block),
                        self.chunk,
                    );
                }
            } else if zero {
                partial.push((c * self.chunk + within, n));
            }
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
        let _ = devpool_engine::device::punch_hole(d.any_fd(), p.offset, p.len);
    }
}
