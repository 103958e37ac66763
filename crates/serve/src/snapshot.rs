//! Copy-on-write in the data plane, with dm-snapshot's semantics on
//! dm-snapshot's store.
//!
//! - An **origin** with snapshots: reads go straight to its extents; before a
//!   write (or discard, or zeroing) reaches a chunk that a valid snapshot has
//!   not kept yet, the chunk's current data is copied into that snapshot's
//!   COW store ([`Cow::before_origin_write`]). The write itself waits until
//!   those exceptions are durable ([`Gate::Hold`]), and one `fdatasync`
//!   ([`Cow::commit`]) makes every exception added meanwhile durable, as dm
//!   batches its commits.
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

use crate::device::PvDevice;
use crate::queue::Op;
use devpool_engine::cowstore::{CowStore, CowUsage, DevIo, StoreError, read_mapped, write_mapped};
use devpool_format::map::VolumeMap;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::sync::Mutex;

/// Buffered byte I/O on a volume's devices.
pub struct DevsIo<'a>(pub &'a [PvDevice]);

impl DevIo for DevsIo<'_> {
    fn read_at(&self, dev: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.dev(dev)?;
        let mut done = 0;
        while done < buf.len() {
            // SAFETY: the buffer's remaining bytes are writable.
            let n = unsafe {
                libc::pread(
                    d.any_fd(),
                    buf[done..].as_mut_ptr() as *mut _,
                    buf.len() - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn write_at(&self, dev: usize, offset: u64, buf: &[u8]) -> io::Result<()> {
        let d = self.dev(dev)?;
        let mut done = 0;
        while done < buf.len() {
            // SAFETY: the buffer's remaining bytes are readable.
            let n = unsafe {
                libc::pwrite(
                    d.any_fd(),
                    buf[done..].as_ptr() as *const _,
                    buf.len() - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(io::ErrorKind::WriteZero.into()),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
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
    /// Bumped for every batch of exceptions added; `committed` is the last
    /// generation made durable.
    generation: u64,
    committed: u64,
}

/// Whether an origin write may go to its devices now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Go,
    /// After [`Cow::commit`] has made generation `.0` durable.
    Hold(u64),
}

#[derive(Debug)]
pub struct Cow {
    state: Mutex<State>,
    /// This volume is a snapshot (not an origin).
    pub snapshot: bool,
    /// The uuids of the origin and of every COW store of its snapshots: no
    /// other process may serve any of them while this one does.
    pub family: Vec<String>,
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
                generation: 0,
                committed: 0,
            }),
            family,
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
        let mut st = self.lock();
        let Role::Origin { stores } = &mut st.role else {
            return None;
        };
        let i = stores.iter().position(|s| s.name == name)?;
        Some(stores.remove(i))
    }

    /// Each store's name and usage.
    pub fn usage(&self) -> Vec<(String, CowUsage)> {
        let st = self.lock();
        match &st.role {
            Role::Origin { stores } => stores.iter().map(|s| (s.name.clone(), s.usage())).collect(),
            Role::Snapshot { store, .. } => vec![(store.name.clone(), store.usage())],
        }
    }

    /// Copy every chunk of `offset..offset+len` that a valid snapshot has not
    /// kept yet into its store. A store that fills up invalidates its
    /// snapshot (the write goes on); an I/O error fails the write.
    pub fn before_origin_write(
        &self,
        devs: &[PvDevice],
        origin: &VolumeMap,
        offset: u64,
        len: u64,
    ) -> Result<Gate, i32> {
        let io = DevsIo(devs);
        let mut st = self.lock();
        let Role::Origin { stores } = &mut st.role else {
            return Ok(Gate::Go);
        };
        let mut added = false;
        let end = offset.saturating_add(len).min(origin.size());
        // Each origin chunk is read once however many snapshots need it
        // (snapshots with the same chunk size share the read).
        let mut read: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
        for s in stores.iter_mut().filter(|s| s.is_valid()) {
            let cb = s.chunk_bytes();
            if end <= offset {
                break;
            }
            for c in offset / cb..end.div_ceil(cb) {
                if s.lookup(c).is_some() {
                    continue;
                }
                let at = c * cb;
                let data = match read.entry((at, cb)) {
                    Entry::Occupied(e) => e.into_mut(),
                    Entry::Vacant(v) => {
                        let mut buf = vec![0u8; cb as usize];
                        let n = cb.min(origin.size() - at) as usize;
                        read_mapped(&io, origin, at, &mut buf[..n])
                            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
                        v.insert(buf)
                    }
                };
                match s.add(&io, c, data) {
                    Ok(_) => added = true,
                    Err(e @ StoreError::Full { .. }) => {
                        invalidate(s, &io, &e);
                        break;
                    }
                    Err(e) => return Err(errno_of(&e)),
                }
            }
        }
        if added {
            st.generation += 1;
        }
        Ok(if st.generation > st.committed {
            Gate::Hold(st.generation)
        } else {
            Gate::Go
        })
    }

    /// Make every exception added so far durable; returns the generation
    /// now committed.
    pub fn commit(&self, devs: &[PvDevice]) -> io::Result<u64> {
        let target = {
            let st = self.lock();
            if st.committed >= st.generation {
                return Ok(st.committed);
            }
            st.generation
        };
        for d in devs {
            // SAFETY: fdatasync on an open descriptor.
            if unsafe { libc::fdatasync(d.any_fd()) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let mut st = self.lock();
        st.committed = st.committed.max(target);
        Ok(st.committed)
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
