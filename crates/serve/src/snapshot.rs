//! Copy-on-write in the data plane, with dm-snapshot's semantics on
//! dm-snapshot's store.
//!
//! - An **origin** with snapshots: reads go straight to its extents; before a
//!   write (or discard, or zeroing) reaches a chunk that a valid snapshot has
//!   not kept yet ([`Cow::needs_copy_out`]), the write is held; the queue's
//!   copier (see `copier`) runs [`Cow::copy_out`] for all held writes at
//!   once: it reads every such chunk, writes it into the stores, and makes
//!   the records durable, as dm batches its commits; then the held writes
//!   go to the origin. Writes held while a copy-out runs form the next one.
//! - A **snapshot**: every request is answered here, synchronously, under
//!   the lock: reads come from the COW store where the chunk was kept, else
//!   from the origin; writes go to the store (a chunk not kept yet is copied
//!   from the origin first, then overlaid).
//! - A full store invalidates its snapshot on disk (header `valid = 0`) and
//!   says so; the origin keeps working, the snapshot then fails every
//!   request with EIO, as dm's does.
//!
//! An origin and its snapshots are never served by two processes at once
//! (see `export`): the exception tables live in this process.

use crate::batch::{Batch, BatchOp, ChainOp};
use crate::buffer::AlignedBuf;
use crate::device::PvDevice;
use crate::queue::Op;
use devpool_engine::cowstore::{
    CowStore, DevIo, PendingMetadata, StoreError, read_mapped, write_mapped,
};
use devpool_format::map::VolumeMap;
use std::collections::HashMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// Buffered byte I/O on a volume's devices.
pub struct DevsIo<'a>(pub &'a [PvDevice]);

impl DevIo for DevsIo<'_> {
    fn read_at(&self, dev: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.dev(dev)?.buffered().read_exact_at(buf, offset)
    }

    fn write_at(&self, dev: usize, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.dev(dev)?.buffered().write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.0.iter().try_for_each(|d| d.buffered().sync_data())
    }
}

impl DevsIo<'_> {
    fn dev(&self, dev: usize) -> io::Result<&PvDevice> {
        self.0
            .get(dev)
            .ok_or_else(|| io::Error::other(format!("no device {dev}")))
    }
}

#[derive(Debug)]
pub enum Role {
    Origin { stores: Vec<CowStore> },
    Snapshot { origin: VolumeMap, store: CowStore },
}

#[derive(Debug)]
struct State {
    role: Role,
    /// The origin byte ranges `(offset, len)` of the chunks a copy-out is
    /// copying now: writes to them wait until it is durable.
    copying: Vec<(u64, u64)>,
}

impl State {
    /// An origin's stores (`None` for a snapshot).
    fn stores(&mut self) -> Option<&mut Vec<CowStore>> {
        match &mut self.role {
            Role::Origin { stores } => Some(stores),
            Role::Snapshot { .. } => None,
        }
    }
}

#[derive(Debug)]
pub struct Cow {
    state: Mutex<State>,
    /// Held for a whole copy-out (and while a store leaves the set).
    commit: Mutex<()>,
    /// This volume is a snapshot (not an origin).
    pub snapshot: bool,
    /// The uuids of the origin and of every COW store of its snapshots: no
    /// other process may serve any of them while this one does.
    pub family: Vec<String>,
    /// An origin's writes answered before their copy-out (see `deferred`).
    pub deferred: crate::deferred::Deferred,
}

/// A COW failure as the client sees it.
fn errno_of(e: &StoreError) -> i32 {
    match e {
        StoreError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        _ => libc::EIO,
    }
}

impl Cow {
    pub fn new(role: Role, family: Vec<String>) -> Cow {
        Cow {
            snapshot: matches!(role, Role::Snapshot { .. }),
            state: Mutex::new(State {
                role,
                copying: Vec::new(),
            }),
            commit: Mutex::new(()),
            family,
            deferred: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock left the tables as they were
        // before the failed step (each step writes, then records).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Take an origin's store `name` out of its copy-on-write set (a merge
    /// reads from it and must not copy into it).
    pub fn take_store(&self, name: &str) -> Option<CowStore> {
        // Not in the middle of a copy-out (it indexes the stores).
        let _no_copy_out = self
            .commit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut st = self.lock();
        let stores = st.stores()?;
        let i = stores.iter().position(|s| s.name == name)?;
        Some(stores.remove(i))
    }

    /// Whether a write to `offset..offset+len` of the origin reaches a chunk
    /// some valid snapshot has not kept yet, or one a copy-out is copying
    /// now. A `false` is final: only a copy-out adds chunks, and it takes
    /// none away.
    pub fn needs_copy_out(&self, origin_size: u64, offset: u64, len: u64) -> bool {
        let st = self.lock();
        let Role::Origin { stores } = &st.role else {
            return false;
        };
        let end = offset.saturating_add(len).min(origin_size);
        if st
            .copying
            .iter()
            .any(|&(at, n)| offset < at + n && at < end)
        {
            return true;
        }
        stores.iter().filter(|s| s.is_valid()).any(|s| {
            let cb = s.chunk_bytes();
            end > offset && (offset / cb..end.div_ceil(cb)).any(|c| s.lookup(c).is_none())
        })
    }

    /// Copy every chunk the writes to `ranges` of the origin reach, and that
    /// a valid snapshot has not kept yet, into that snapshot's store, and make
    /// it durable, in dm's order: origin chunks read (each once, all at once),
    /// COW data chunks written, synced; header / zeroed next areas written,
    /// synced; exception areas written, synced. A store that fills up, or
    /// whose writes fail, invalidates its snapshot and the writes go on (as
    /// dm does); an origin that cannot be read fails them (an errno).
    ///
    /// One copy-out runs at a time (the records a commit writes are those of
    /// the chunks it copied), and the tables are locked only between its
    /// transfers: while it runs, [`Cow::needs_copy_out`] answers at once
    /// (`true` for the chunks in flight, so writes to them wait for the next
    /// copy-out, which finds them kept).
    pub fn copy_out(
        &self,
        devs: &[PvDevice],
        origin: &VolumeMap,
        ranges: &[(u64, u64)],
        batch: &mut Batch,
    ) -> Result<(), i32> {
        let _one_at_a_time = self
            .commit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Which chunks of which stores, each once; their origin bytes.
        let mut wants: Vec<(usize, u64)> = Vec::new();
        // Aligned, so that the copy goes around the page cache like the
        // client's own writes do (buffered io_uring transfers are punted to
        // worker threads, and a sync would have to write the pages back).
        let mut data: HashMap<(u64, u64), AlignedBuf> = HashMap::new();
        {
            let mut st = self.lock();
            let State { role, copying } = &mut *st;
            let Role::Origin { stores } = role else {
                return Ok(());
            };
            let mut seen = std::collections::HashSet::new();
            for &(offset, len) in ranges {
                let end = offset.saturating_add(len).min(origin.size());
                for (i, s) in stores.iter().enumerate().filter(|(_, s)| s.is_valid()) {
                    let cb = s.chunk_bytes();
                    for c in offset / cb..end.div_ceil(cb).max(offset / cb) {
                        if s.lookup(c).is_none() && seen.insert((i, c)) {
                            wants.push((i, c));
                            data.entry((c * cb, cb))
                                .or_insert_with(|| AlignedBuf::new(cb as usize));
                        }
                    }
                }
            }
            copying.extend(data.keys().copied());
        }
        if wants.is_empty() {
            return Ok(());
        }
        let result = self.copy_chunks(devs, origin, &wants, &mut data, batch);
        self.lock().copying.clear();
        result
    }

    /// [`Cow::copy_out`] of the chunks `wants` (store, origin chunk), whose
    /// origin bytes go through `data` (keyed by origin byte range).
    fn copy_chunks(
        &self,
        devs: &[PvDevice],
        origin: &VolumeMap,
        wants: &[(usize, u64)],
        data: &mut HashMap<(u64, u64), AlignedBuf>,
        batch: &mut Batch,
    ) -> Result<(), i32> {
        let io = DevsIo(devs);
        // The origin's chunks, each read once, all at once. Nothing else
        // writes them meanwhile: writes to chunks in `copying` are held.
        let mut ops = Vec::new();
        for (&(at, cb), buf) in data.iter_mut() {
            let n = cb.min(origin.size() - at);
            pieces_ops(
                devs,
                origin,
                at,
                &mut buf.as_mut_slice()[..n as usize],
                false,
                &mut ops,
            )
            .map_err(|_| libc::EIO)?;
        }
        // SAFETY: every buffer lives in `data` until the run returns.
        unsafe { batch.run(&ops) }.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        // Under the lock: allocate the store chunks, and take the metadata
        // that records them, `before` (header, zeroed next area) and the
        // areas. The transfers run after it.
        ops.clear();
        let mut pending: Vec<[Vec<(u64, AlignedBuf)>; 2]> = Vec::new();
        let mut steps: [Vec<BatchOp>; 2] = Default::default();
        let mut touched = Vec::new();
        {
            let mut st = self.lock();
            let Some(stores) = st.stores() else {
                return Ok(());
            };
            for &(i, c) in wants {
                let s = &mut stores[i];
                if !s.is_valid() {
                    continue;
                }
                let cb = s.chunk_bytes();
                match s.allocate(c) {
                    Ok(new) => {
                        if !touched.contains(&i) {
                            touched.push(i);
                        }
                        let Some(buf) = data.get_mut(&(c * cb, cb)) else {
                            continue;
                        };
                        let buf = buf.as_mut_slice();
                        if pieces_ops(devs, &s.map, new * cb, buf, true, &mut ops).is_err() {
                            let e = io::Error::other("COW chunk outside its store");
                            invalidate(s, &io, &store_io(s, e));
                        }
                    }
                    Err(e) => invalidate(s, &io, &e),
                }
            }
            for &i in &touched {
                let s = &mut stores[i];
                if !s.is_valid() {
                    continue;
                }
                let PendingMetadata { before, areas } = s.pending_metadata();
                let mut p = [aligned(before), aligned(areas)];
                for (step, list) in p.iter_mut().enumerate() {
                    for (at, b) in list.iter_mut() {
                        let b = b.as_mut_slice();
                        let _ = pieces_ops(devs, &s.map, *at, b, true, &mut steps[step]);
                    }
                }
                // The buffers' memory stays put when `p` moves.
                pending.push(p);
            }
        }
        // In order, each step durable before the next starts: data chunks,
        // sync; `before`, sync; areas, sync.
        let syncs: Vec<ChainOp> = devs
            .iter()
            .map(|d| ChainOp::Sync { fd: d.any_fd() })
            .collect();
        let mut run = vec![ChainOp::gather(&ops)];
        for step in steps.iter().filter(|s| !s.is_empty()) {
            run.push(syncs.clone());
            run.push(ChainOp::gather(step));
        }
        run.push(syncs);
        // SAFETY: the buffers live in `data` and `pending` until it returns.
        let result = unsafe { batch.run_steps(&run) };
        drop(pending);
        if let Err(e) = result {
            let mut st = self.lock();
            let Some(stores) = st.stores() else {
                return Ok(());
            };
            for &i in &touched {
                let s = &mut stores[i];
                if s.is_valid() {
                    let why = store_io(s, io::Error::new(e.kind(), e.to_string()));
                    invalidate(s, &io, &why);
                }
            }
        }
        Ok(())
    }

    /// Serve one request on a snapshot, synchronously: 0 or an errno. `buf`
    /// holds the data of a write and receives the data of a read.
    pub fn snapshot_io(
        &self,
        devs: &[PvDevice],
        op: Op,
        offset: u64,
        len: u64,
        buf: &mut [u8],
    ) -> i32 {
        let io = DevsIo(devs);
        let mut st = self.lock();
        let Role::Snapshot { origin, store } = &mut st.role else {
            return libc::EINVAL;
        };
        if !store.is_valid() {
            return libc::EIO;
        }
        if origin.check(offset, len).is_err() {
            return if op == Op::Read {
                libc::EINVAL
            } else {
                libc::ENOSPC
            };
        }
        let r = match op {
            Op::Read => snapshot_read(&io, origin, store, offset, buf),
            Op::Write { .. } | Op::WriteZeroes { .. } => {
                if let Op::WriteZeroes { .. } = op {
                    buf.fill(0);
                }
                snapshot_write(&io, origin, store, offset, buf)
            }
            // dm-snapshot takes no discards; a discard is advisory.
            Op::Discard | Op::Flush => Ok(()),
        };
        match r {
            Ok(()) => 0,
            Err(e @ StoreError::Full { .. }) => {
                invalidate(store, &io, &e);
                libc::EIO
            }
            Err(e) => errno_of(&e),
        }
    }
}

/// Metadata buffers copied into aligned memory (for direct I/O).
fn aligned(list: Vec<(u64, Vec<u8>)>) -> Vec<(u64, AlignedBuf)> {
    list.into_iter()
        .map(|(at, b)| {
            let mut a = AlignedBuf::new(b.len());
            a.as_mut_slice().copy_from_slice(&b);
            (at, a)
        })
        .collect()
}

/// A store's I/O failure as a [`StoreError`].
fn store_io(s: &CowStore, source: io::Error) -> StoreError {
    StoreError::Io {
        name: s.name.clone(),
        source,
    }
}

/// The transfers that move `buf` to or from logical `offset` of `map`.
fn pieces_ops(
    devs: &[PvDevice],
    map: &VolumeMap,
    offset: u64,
    buf: &mut [u8],
    write: bool,
    out: &mut Vec<BatchOp>,
) -> Result<(), crate::map::MapError> {
    let mut ps = Vec::new();
    map.pieces(offset, buf.len() as u64, &mut ps)?;
    for p in ps {
        // SAFETY: p.at + p.len lies inside buf.
        let ptr = unsafe { buf.as_mut_ptr().add(p.at as usize) };
        let fd = devs[p.dev].fd_for(|a| {
            p.offset.is_multiple_of(a) && p.len.is_multiple_of(a) && (ptr as u64).is_multiple_of(a)
        });
        out.push(BatchOp {
            fd,
            offset: p.offset,
            buf: ptr,
            len: p.len as usize,
            write,
        });
    }
    Ok(())
}

fn invalidate(store: &mut CowStore, io: &DevsIo, why: &StoreError) {
    eprintln!("devpool: {why}");
    if let Err(e) = store.invalidate(io) {
        eprintln!(
            "devpool: snapshot {}: marking it invalid failed: {e}",
            store.name
        );
    }
}

/// The chunks of `offset..offset+len`: `(chunk, offset in chunk, bytes, at in buf)`.
fn chunks(cb: u64, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64, u64)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let (c, within) = (pos / cb, pos % cb);
        let n = (cb - within).min(end - pos);
        let item = (c, within, n, pos - offset);
        pos += n;
        Some(item)
    })
}

fn snapshot_read(
    io: &DevsIo,
    origin: &VolumeMap,
    store: &CowStore,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), StoreError> {
    let cb = store.chunk_bytes();
    let ioe = |source| StoreError::Io {
        name: store.name.clone(),
        source,
    };
    for (c, within, n, at) in chunks(cb, offset, buf.len() as u64) {
        let part = &mut buf[at as usize..(at + n) as usize];
        match store.lookup(c) {
            Some(new) => read_mapped(io, &store.map, new * cb + within, part),
            None => read_mapped(io, origin, c * cb + within, part),
        }
        .map_err(ioe)?;
    }
    Ok(())
}

fn snapshot_write(
    io: &DevsIo,
    origin: &VolumeMap,
    store: &mut CowStore,
    offset: u64,
    buf: &[u8],
) -> Result<(), StoreError> {
    let cb = store.chunk_bytes();
    let name = store.name.clone();
    let ioe = |source| StoreError::Io {
        name: name.clone(),
        source,
    };
    for (c, within, n, at) in chunks(cb, offset, buf.len() as u64) {
        let part = &buf[at as usize..(at + n) as usize];
        if let Some(new) = store.lookup(c) {
            write_mapped(io, &store.map, new * cb + within, part).map_err(ioe)?;
            continue;
        }
        // A chunk of its own: the origin's data with the write laid over it.
        let mut chunk = vec![0u8; cb as usize];
        if n < cb {
            let have = cb.min(origin.size() - c * cb) as usize;
            read_mapped(io, origin, c * cb, &mut chunk[..have]).map_err(ioe)?;
        }
        chunk[within as usize..(within + n) as usize].copy_from_slice(part);
        store.add(io, c, &chunk)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cut_a_range_at_chunk_boundaries() {
        let v: Vec<_> = chunks(4096, 4000, 5000).collect();
        assert_eq!(
            v,
            vec![(0, 4000, 96, 0), (1, 0, 4096, 96), (2, 0, 808, 4192)]
        );
        assert_eq!(chunks(4096, 0, 0).count(), 0);
    }
}
