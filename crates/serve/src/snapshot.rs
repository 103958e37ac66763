//! Copy-on-write in the data plane, with dm-snapshot's semantics on
//! dm-snapshot's store.
//!
//! - An **origin** with snapshots: reads go straight to its extents; before a
//!   write (or discard, or zeroing) reaches a chunk that a valid snapshot has
//!   not kept yet ([`Cow::needs_copy_out`]), the write is held; the queue's
//!   copier (see `copier`) copies out for all held writes at once: it
//!   reads every such chunk ([`Cow::copy_read`]), writes it into the stores
//!   and makes the records durable ([`Cow::copy_commit`]), as dm batches its
//!   commits; then the held writes go to the origin. Writes held meanwhile
//!   form the next group, whose read runs while this one commits.
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
use std::collections::{BTreeMap, HashMap};
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
    /// The origin chunks `(offset, len)` that copy-outs are copying now, with
    /// how many copy-outs have each (two in a row may both have read one):
    /// writes to them wait until the copy-outs are durable.
    copying: BTreeMap<(u64, u64), u32>,
    /// The longest `len` in `copying` (bounds an overlap search).
    copying_max: u64,
    /// Bumped when a store leaves an origin's set (copy-outs name stores by
    /// position between their read and their commit).
    stores_changed: u64,
}

impl State {
    /// Whether a chunk in `copying` overlaps `offset..end`.
    fn copying_overlaps(&self, offset: u64, end: u64) -> bool {
        // Only chunks starting less than the longest chunk before `offset`
        // can reach it.
        let from = (offset.saturating_sub(self.copying_max), 0);
        end > offset
            && self
                .copying
                .range(from..(end, 0))
                .any(|(&(at, n), _)| offset < at + n)
    }

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
    /// Held for a copy-out's commit (and while a store leaves the set).
    commit: Mutex<()>,
    /// This volume is a snapshot (not an origin).
    pub snapshot: bool,
    /// The uuids of the origin and of every COW store of its snapshots: no
    /// other process may serve any of them while this one does.
    pub family: Vec<String>,
    /// An origin's writes answered before their copy-out (see `deferred`).
    pub deferred: crate::deferred::Deferred,
}

/// Origin chunks read for a copy-out and not yet in the stores (see
/// [`Cow::copy_read`]).
#[derive(Default)]
pub struct CopyGroup {
    /// (store position at the read, origin chunk).
    wants: Vec<(usize, u64)>,
    /// The origin bytes of the chunks, by origin byte range.
    data: HashMap<(u64, u64), AlignedBuf>,
    /// The stores' names at the read, and `State::stores_changed` then.
    store_names: Vec<String>,
    stores_seen: u64,
}

/// A COW failure as the client sees it.
fn errno_of(e: &StoreError) -> i32 {
    match e {
        StoreError::Io { err, .. } => err.raw_os_error().unwrap_or(libc::EIO),
        _ => libc::EIO,
    }
}

impl Cow {
    pub fn new(role: Role, family: Vec<String>) -> Cow {
        Cow {
            snapshot: matches!(role, Role::Snapshot { .. }),
            state: Mutex::new(State {
                role,
                copying: BTreeMap::new(),
                copying_max: 0,
                stores_changed: 0,
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
        // Not in the middle of a commit (it indexes the stores; a read
        // finds its stores again by name, see `stores_changed`).
        let _no_copy_out = self
            .commit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut st = self.lock();
        let stores = st.stores()?;
        let i = stores.iter().position(|s| s.name == name)?;
        let store = stores.remove(i);
        st.stores_changed += 1;
        Some(store)
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
        if st.copying_overlaps(offset, end) {
            return true;
        }
        stores.iter().filter(|s| s.is_valid()).any(|s| {
            let cb = s.chunk_bytes();
            end > offset && (offset / cb..end.div_ceil(cb)).any(|c| s.lookup(c).is_none())
        })
    }

    /// Copy every chunk the writes to `ranges` of the origin reach, and that
    /// a valid snapshot has not kept yet, into that snapshot's store, and make
    /// it durable: [`Cow::copy_read`], then [`Cow::copy_commit`].
    pub fn copy_out(
        &self,
        devs: &[PvDevice],
        origin: &VolumeMap,
        ranges: &[(u64, u64)],
        batch: &mut Batch,
    ) -> Result<(), i32> {
        match self.copy_read(devs, origin, ranges, batch)? {
            Some(group) => self.copy_commit(devs, group, batch),
            None => Ok(()),
        }
    }

    /// The first half of a copy-out: which chunks the writes to `ranges` of
    /// the origin reach that a valid snapshot has not kept yet, each read
    /// from the origin once, all at once. From here until the group's
    /// [`Cow::copy_commit`] ends, writes to those chunks wait
    /// ([`Cow::needs_copy_out`]), so the origin cannot change under the
    /// read. `None`: nothing to copy.
    ///
    /// It may run while another copy-out commits (the copier's pipeline):
    /// a chunk that both read is recorded once, by the first commit, and
    /// stays held until both have ended. An origin that cannot be read
    /// fails the group (an errno).
    pub fn copy_read(
        &self,
        devs: &[PvDevice],
        origin: &VolumeMap,
        ranges: &[(u64, u64)],
        batch: &mut Batch,
    ) -> Result<Option<CopyGroup>, i32> {
        let mut group = CopyGroup::default();
        {
            let mut st = self.lock();
            group.stores_seen = st.stores_changed;
            let State {
                role,
                copying,
                copying_max,
                ..
            } = &mut *st;
            let Role::Origin { stores } = role else {
                return Ok(None);
            };
            group.store_names = stores.iter().map(|s| s.name.clone()).collect();
            let mut seen = std::collections::HashSet::new();
            for &(offset, len) in ranges {
                let end = offset.saturating_add(len).min(origin.size());
                for (i, s) in stores.iter().enumerate().filter(|(_, s)| s.is_valid()) {
                    let cb = s.chunk_bytes();
                    for c in offset / cb..end.div_ceil(cb).max(offset / cb) {
                        if s.lookup(c).is_none() && seen.insert((i, c)) {
                            group.wants.push((i, c));
                            // Aligned, so that the copy goes around the page
                            // cache like the client's own writes do (buffered
                            // io_uring transfers are punted to worker threads,
                            // and a sync would have to write the pages back).
                            group
                                .data
                                .entry((c * cb, cb))
                                .or_insert_with(|| AlignedBuf::new(cb as usize));
                        }
                    }
                }
            }
            for &(at, n) in group.data.keys() {
                *copying.entry((at, n)).or_default() += 1;
                *copying_max = (*copying_max).max(n);
            }
        }
        if group.wants.is_empty() {
            return Ok(None);
        }
        let mut ops = Vec::new();
        let mut read = Ok(());
        for (&(at, cb), buf) in group.data.iter_mut() {
            let n = cb.min(origin.size() - at);
            let buf = &mut buf.as_mut_slice()[..n as usize];
            if pieces_ops(devs, origin, at, buf, false, &mut ops).is_err() {
                read = Err(libc::EIO);
                break;
            }
        }
        if read.is_ok() {
            // SAFETY: every buffer lives in `group.data` until the run returns.
            read = unsafe { batch.run(&ops) }.map_err(|e| e.raw_os_error().unwrap_or(libc::EIO));
        }
        match read {
            Ok(()) => Ok(Some(group)),
            Err(errno) => {
                self.release(&group);
                Err(errno)
            }
        }
    }

    /// The second half of a copy-out: the chunks of `group` (read by
    /// [`Cow::copy_read`]) written into their stores and made durable, in
    /// dm's order: COW data chunks (and the header, and zeroed next areas)
    /// written, synced; then the exception areas that name them written,
    /// synced. A store
    /// that fills up, or whose writes fail, invalidates its snapshot and the
    /// writes go on (as dm does). Commits run one at a time, in the order
    /// their reads ended for one copier (the records a commit writes are
    /// those of the chunks it allocated).
    pub fn copy_commit(
        &self,
        devs: &[PvDevice],
        mut group: CopyGroup,
        batch: &mut Batch,
    ) -> Result<(), i32> {
        let one_at_a_time = self
            .commit
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = self.commit_chunks(devs, &mut group, batch);
        drop(one_at_a_time);
        self.release(&group);
        result
    }

    /// Give up a group read by [`Cow::copy_read`] without committing it
    /// (its writes fail): writes to its chunks need no longer wait for it.
    pub fn copy_abandon(&self, group: &CopyGroup) {
        self.release(group);
    }

    /// Writes to the chunks of `group` need no longer wait for it.
    fn release(&self, group: &CopyGroup) {
        let mut st = self.lock();
        for key in group.data.keys() {
            if let Some(n) = st.copying.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    st.copying.remove(key);
                }
            }
        }
        if st.copying.is_empty() {
            st.copying_max = 0;
        }
    }

    /// [`Cow::copy_commit`] under the commit lock.
    fn commit_chunks(
        &self,
        devs: &[PvDevice],
        group: &mut CopyGroup,
        batch: &mut Batch,
    ) -> Result<(), i32> {
        let io = DevsIo(devs);
        // Under the lock: allocate the store chunks, and take the metadata
        // that records them, `before` (header, zeroed next area) and the
        // areas. The transfers run after it.
        let mut ops = Vec::new();
        let mut pending: Vec<[Vec<(u64, AlignedBuf)>; 2]> = Vec::new();
        let mut records: Vec<BatchOp> = Vec::new();
        let mut touched = Vec::new();
        {
            let mut st = self.lock();
            // A store left the set since the read: find the others by name.
            let moved: Option<Vec<Option<usize>>> =
                (st.stores_changed != group.stores_seen).then(|| {
                    let stores = match &st.role {
                        Role::Origin { stores } => stores.as_slice(),
                        Role::Snapshot { .. } => &[],
                    };
                    group
                        .store_names
                        .iter()
                        .map(|n| stores.iter().position(|s| &s.name == n))
                        .collect()
                });
            let Some(stores) = st.stores() else {
                return Ok(());
            };
            for &(was, c) in &group.wants {
                let Some(i) = moved
                    .as_ref()
                    .map_or(Some(was), |m| m.get(was).copied().flatten())
                else {
                    continue;
                };
                let Some(s) = stores.get_mut(i) else {
                    continue;
                };
                // Kept meanwhile by the commit of a copy-out that read it too.
                if !s.is_valid() || s.lookup(c).is_some() {
                    continue;
                }
                let cb = s.chunk_bytes();
                match s.allocate(c) {
                    Ok(new) => {
                        if !touched.contains(&i) {
                            touched.push(i);
                        }
                        let Some(buf) = group.data.get_mut(&(c * cb, cb)) else {
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
                // The header and zeroed next areas need only be durable
                // before the records (a full area's successor must read as
                // empty), not after the data: they go with the data.
                for (step, list) in p.iter_mut().enumerate() {
                    let to = if step == 0 { &mut ops } else { &mut records };
                    for (at, b) in list.iter_mut() {
                        let _ = pieces_ops(devs, &s.map, *at, b.as_mut_slice(), true, to);
                    }
                }
                // The buffers' memory stays put when `p` moves.
                pending.push(p);
            }
        }
        if touched.is_empty() {
            return Ok(());
        }
        // In order, each step durable before the next starts: data chunks
        // (with the header and zeroed next areas), sync; areas, sync.
        let syncs: Vec<ChainOp> = devs
            .iter()
            .map(|d| ChainOp::Sync { fd: d.any_fd() })
            .collect();
        let mut run = vec![ChainOp::gather(&ops)];
        if !records.is_empty() {
            run.push(syncs.clone());
            run.push(ChainOp::gather(&records));
        }
        run.push(syncs);
        // SAFETY: the buffers live in `group.data` and `pending` until it returns.
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
        err: source,
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
        err: source,
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
        err: source,
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
    fn a_copy_in_flight_holds_exactly_the_bytes_of_its_chunks() {
        let mut st = State {
            role: Role::Origin { stores: Vec::new() },
            copying: BTreeMap::new(),
            copying_max: 0,
            stores_changed: 0,
        };
        assert!(!st.copying_overlaps(0, u64::MAX));
        // A 64 KiB chunk of one store and a 4 KiB chunk of another.
        st.copying.insert((65536, 65536), 1);
        st.copying.insert((4096, 4096), 2);
        st.copying_max = 65536;
        let at = |offset: u64, len: u64| st.copying_overlaps(offset, offset + len);
        assert!(at(131071, 1), "the last byte of the long chunk");
        assert!(!at(131072, 4096), "just past it");
        assert!(at(65535, 2), "straddling its start");
        assert!(!at(65532, 4), "just before it");
        assert!(at(8191, 1) && !at(8192, 1) && !at(0, 4096));
        assert!(at(0, 1 << 20), "a range covering both");
        assert!(!at(5000, 0), "an empty range");
    }

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
