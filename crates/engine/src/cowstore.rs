//! A snapshot's COW store, live: dm-snapshot's persistent exception store
//! (the byte rules are in `devpool_format::cow`) loaded, looked up, appended
//! to and invalidated through a [`DevIo`]. The data plane drives it with its
//! own descriptors and reports read it with plain files: one implementation
//! of the store's rules for both.

use devpool_format::FormatError;
use devpool_format::cow::{CowHeader, CowLayout, Exception, ExceptionTable, encode_area};
use devpool_format::map::{MapError, PvPlace, VolumeMap};
use devpool_format::metadata::{LvMeta, VgMetadata};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Byte I/O on the devices a set of [`VolumeMap`]s index.
pub trait DevIo {
    fn read_at(&self, dev: usize, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    fn write_at(&self, dev: usize, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Make every write so far durable.
    fn sync(&self) -> io::Result<()>;
}

/// Plain files (or block devices), buffered.
pub struct FilesIo {
    pub files: Vec<File>,
}

impl FilesIo {
    pub fn open(paths: &[impl AsRef<Path>], writable: bool) -> io::Result<FilesIo> {
        let files = paths
            .iter()
            .map(|p| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(writable)
                    .open(p.as_ref())
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("cannot open {}: {e}", p.as_ref().display()),
                        )
                    })
            })
            .collect::<io::Result<_>>()?;
        Ok(FilesIo { files })
    }
}

impl DevIo for FilesIo {
    fn read_at(&self, dev: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file(dev)?.read_exact_at(buf, offset)
    }
    fn write_at(&self, dev: usize, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file(dev)?.write_all_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.files.iter().try_for_each(File::sync_data)
    }
}

impl FilesIo {
    fn file(&self, dev: usize) -> io::Result<&File> {
        self.files
            .get(dev)
            .ok_or_else(|| io::Error::other(format!("no device {dev}")))
    }
}

fn map_err(e: MapError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
}

/// Read `buf.len()` bytes at logical `offset` of the volume `map` describes.
pub fn read_mapped(io: &dyn DevIo, map: &VolumeMap, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut ps = Vec::new();
    map.pieces(offset, buf.len() as u64, &mut ps)
        .map_err(map_err)?;
    for p in ps {
        io.read_at(
            p.dev,
            p.offset,
            &mut buf[p.at as usize..(p.at + p.len) as usize],
        )?;
    }
    Ok(())
}

/// Write `buf` at logical `offset` of the volume `map` describes.
pub fn write_mapped(io: &dyn DevIo, map: &VolumeMap, offset: u64, buf: &[u8]) -> io::Result<()> {
    let mut ps = Vec::new();
    map.pieces(offset, buf.len() as u64, &mut ps)
        .map_err(map_err)?;
    for p in ps {
        io.write_at(
            p.dev,
            p.offset,
            &buf[p.at as usize..(p.at + p.len) as usize],
        )?;
    }
    Ok(())
}

/// Maps of several LVs of one VG over one shared device list: each PV key
/// gets an index the first time an LV uses it.
#[derive(Debug, Default)]
pub struct PvIndex {
    pub keys: Vec<String>,
}

impl PvIndex {
    /// The indexed PVs opened read-only, each found by `pv_path(key)`.
    pub fn open_files(
        &self,
        pv_path: &dyn Fn(&str) -> Option<std::path::PathBuf>,
    ) -> Result<FilesIo, String> {
        let paths = self
            .keys
            .iter()
            .map(|k| pv_path(k).ok_or_else(|| format!("PV {k} is missing")))
            .collect::<Result<Vec<_>, _>>()?;
        FilesIo::open(&paths, false).map_err(|e| e.to_string())
    }

    pub fn map_lv(&mut self, meta: &VgMetadata, lv: &LvMeta) -> Result<VolumeMap, MapError> {
        for seg in &lv.segments {
            if let devpool_format::metadata::SegmentKind::Striped { stripes, .. } = &seg.kind {
                for st in stripes {
                    if !self.keys.contains(&st.pv) {
                        self.keys.push(st.pv.clone());
                    }
                }
            }
        }
        VolumeMap::from_lv(meta, lv, |key| {
            let dev = self.keys.iter().position(|k| k == key)?;
            let pv = meta.pv(key)?;
            Some(PvPlace {
                dev,
                pe_start_bytes: pv.pe_start.0 * 512,
                pe_count: pv.pe_count,
            })
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "snapshot {name}: its COW store is full ({capacity} chunks of {chunk_bytes} bytes); the snapshot is now invalid"
    )]
    Full {
        name: String,
        capacity: u64,
        chunk_bytes: u64,
    },
    #[error("snapshot {name} is invalid (its COW store filled up or was invalidated)")]
    Invalid { name: String },
    #[error("snapshot {name}: {err}")]
    Format { name: String, err: FormatError },
    #[error("snapshot {name}: {err}")]
    Io { name: String, err: io::Error },
}

/// How full a store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CowUsage {
    pub chunk_bytes: u64,
    pub used_chunks: u64,
    pub capacity_chunks: u64,
    pub valid: bool,
}

#[derive(Debug)]
pub struct CowStore {
    /// The snapshot's name (its COW LV).
    pub name: String,
    pub map: VolumeMap,
    pub layout: CowLayout,
    table: ExceptionTable,
    valid: bool,
    /// False for a zeroed store (the kernel would initialise it): the
    /// header is written with the first exception.
    initialised: bool,
    /// Records from this index on are in memory only (see [`CowStore::allocate`]).
    unwritten_from: Option<usize>,
    /// Metadata chunks that must be durable before the areas are written:
    /// the header of a new store, the zeroed area after one that filled up.
    before_areas: Vec<u64>,
}

/// Metadata writes an allocation left, in the order they must become
/// durable: first `before` (each `(byte offset in the store, bytes)`), then
/// `areas`. The data chunks must be durable before `areas` too.
#[derive(Debug, Default)]
pub struct PendingMetadata {
    pub before: Vec<(u64, Vec<u8>)>,
    pub areas: Vec<(u64, Vec<u8>)>,
}

impl CowStore {
    /// Load the store on the COW LV `map` covers. The header's chunk size
    /// wins over `chunk_sectors` (the VG's), as dm's does.
    pub fn open(
        io: &dyn DevIo,
        name: &str,
        map: VolumeMap,
        chunk_sectors: u32,
    ) -> Result<CowStore, StoreError> {
        let fmt = |source| StoreError::Format {
            name: name.to_string(),
            err: source,
        };
        let ioe = |source| StoreError::Io {
            name: name.to_string(),
            err: source,
        };
        let mut first = [0u8; 512];
        read_mapped(io, &map, 0, &mut first).map_err(ioe)?;
        let header = CowHeader::parse(&first).map_err(fmt)?;
        let chunk_sectors = header.map_or(chunk_sectors, |h| h.chunk_sectors);
        devpool_format::cow::check_chunk_sectors(chunk_sectors)
            .map_err(|r| fmt(FormatError::new("snapshot chunk size", 0, r)))?;
        let layout = CowLayout {
            chunk_sectors,
            chunks: map.size() / (u64::from(chunk_sectors) * 512),
        };
        let mut store = CowStore {
            name: name.to_string(),
            map,
            layout,
            table: ExceptionTable {
                next_free: 2,
                ..ExceptionTable::default()
            },
            valid: header.is_none_or(|h| h.valid),
            initialised: header.is_some(),
            unwritten_from: None,
            before_areas: Vec::new(),
        };
        // dm does not read the exceptions of an invalid snapshot.
        if store.initialised && store.valid {
            let cb = layout.chunk_bytes();
            store.table = ExceptionTable::load(&layout, |area| {
                let at = layout.area_location(area).unwrap_or(u64::MAX);
                let mut b = vec![0u8; cb as usize];
                read_mapped(io, &store.map, at * cb, &mut b).map_err(|e| {
                    FormatError::new("snapshot exception area", at * cb, e.to_string())
                })?;
                Ok(b)
            })
            .map_err(fmt)?;
        }
        Ok(store)
    }

    pub fn chunk_bytes(&self) -> u64 {
        self.layout.chunk_bytes()
    }

    pub fn is_valid(&self) -> bool {
        self.valid
    }

    /// Where origin chunk `old` is kept in the store, if it is.
    pub fn lookup(&self, old: u64) -> Option<u64> {
        self.table.map.get(&old).copied()
    }

    pub fn exceptions(&self) -> &[Exception] {
        &self.table.records
    }

    pub fn usage(&self) -> CowUsage {
        CowUsage {
            chunk_bytes: self.chunk_bytes(),
            used_chunks: self.table.records.len() as u64,
            capacity_chunks: self.layout.data_capacity(),
            valid: self.valid,
        }
    }

    fn io_err(&self, source: io::Error) -> StoreError {
        StoreError::Io {
            name: self.name.clone(),
            err: source,
        }
    }

    fn write_chunk(&self, io: &dyn DevIo, chunk: u64, data: &[u8]) -> Result<(), StoreError> {
        write_mapped(io, &self.map, chunk * self.chunk_bytes(), data).map_err(|e| self.io_err(e))
    }

    /// Give origin chunk `old` a data chunk in the store, in memory: the
    /// caller writes the data there, then [`CowStore::pending_metadata`]. On
    /// [`StoreError::Full`] the caller invalidates the snapshot.
    pub fn allocate(&mut self, old: u64) -> Result<u64, StoreError> {
        if !self.valid {
            return Err(StoreError::Invalid {
                name: self.name.clone(),
            });
        }
        let new = self.table.next_free;
        if new >= self.layout.chunks {
            return Err(StoreError::Full {
                name: self.name.clone(),
                capacity: self.layout.data_capacity(),
                chunk_bytes: self.chunk_bytes(),
            });
        }
        if !self.initialised {
            // Header and area 0, as dm initialises a store.
            self.before_areas.extend([0, 1]);
            self.initialised = true;
        }
        let (area, index) = self.table.position_of_next(&self.layout);
        if index + 1 == self.layout.exceptions_per_area()
            && let Some(next) = self.layout.area_location(area + 1)
            && next < self.layout.chunks
        {
            self.before_areas.push(next);
        }
        self.unwritten_from.get_or_insert(self.table.records.len());
        self.table.records.push(Exception {
            old_chunk: old,
            new_chunk: new,
        });
        self.table.map.insert(old, new);
        self.table.next_free = self.layout.data_chunk_from(new + 1);
        Ok(new)
    }

    /// The metadata the allocations since the last call left to write.
    pub fn pending_metadata(&mut self) -> PendingMetadata {
        let cb = self.chunk_bytes();
        let mut out = PendingMetadata::default();
        for chunk in std::mem::take(&mut self.before_areas) {
            let mut b = vec![0u8; cb as usize];
            if chunk == 0 {
                b[..16].copy_from_slice(&CowHeader::new(self.layout.chunk_sectors).to_bytes());
            }
            out.before.push((chunk * cb, b));
        }
        let Some(from) = self.unwritten_from.take() else {
            return out;
        };
        let epa = self.layout.exceptions_per_area() as usize;
        let last = self.table.records.len().saturating_sub(1) / epa;
        for area in from / epa..=last {
            let records =
                &self.table.records[area * epa..((area + 1) * epa).min(self.table.records.len())];
            let at = self.layout.area_location(area as u64).unwrap_or(u64::MAX);
            out.areas
                .push((at * cb, encode_area(records, &self.layout)));
        }
        out
    }

    /// Keep `data` (one chunk) as the store's copy of origin chunk `old`,
    /// synchronously and in dm's order: data chunk, header or zeroed next
    /// area, then the area's record. A failed write leaves the store as it
    /// was in memory.
    pub fn add(&mut self, io: &dyn DevIo, old: u64, data: &[u8]) -> Result<u64, StoreError> {
        let cb = self.chunk_bytes();
        if data.len() as u64 != cb {
            return Err(self.io_err(io::Error::other(format!(
                "{} bytes for a {cb}-byte chunk",
                data.len()
            ))));
        }
        let saved = (
            self.table.next_free,
            self.initialised,
            self.before_areas.clone(),
            self.unwritten_from,
        );
        let new = self.allocate(old)?;
        let written = (|| {
            self.write_chunk(io, new, data)?;
            let pending = self.pending_metadata();
            for (at, b) in pending.before.iter().chain(&pending.areas) {
                write_mapped(io, &self.map, *at, b).map_err(|e| self.io_err(e))?;
            }
            Ok(new)
        })();
        if written.is_err() {
            self.table.records.pop();
            self.table.map.remove(&old);
            (self.table.next_free, self.initialised) = (saved.0, saved.1);
            self.before_areas = saved.2;
            self.unwritten_from = saved.3;
        }
        written
    }

    /// Mark the snapshot invalid on disk (header `valid = 0`), as dm does
    /// when the store fills up.
    pub fn invalidate(&mut self, io: &dyn DevIo) -> Result<(), StoreError> {
        let mut first = [0u8; 512];
        read_mapped(io, &self.map, 0, &mut first).map_err(|e| self.io_err(e))?;
        let mut h = CowHeader::new(self.layout.chunk_sectors);
        h.valid = false;
        first[..16].copy_from_slice(&h.to_bytes());
        write_mapped(io, &self.map, 0, &first).map_err(|e| self.io_err(e))?;
        self.valid = false;
        self.initialised = true;
        self.table = ExceptionTable::default();
        self.unwritten_from = None;
        self.before_areas.clear();
        Ok(())
    }
}

/// Read every snapshot of a VG with plain files: `(link, usage or why not)`.
pub fn snapshot_usage(
    meta: &VgMetadata,
    pv_path: impl Fn(&str) -> Option<std::path::PathBuf>,
) -> Vec<(crate::ops::snapshot::SnapshotLink, Result<CowUsage, String>)> {
    crate::ops::snapshot::snapshot_links(meta)
        .into_iter()
        .map(|link| {
            let usage = (|| {
                let lv = meta
                    .lv(&link.cow)
                    .ok_or_else(|| format!("COW store {} is missing", link.cow))?;
                let mut index = PvIndex::default();
                let map = index.map_lv(meta, lv).map_err(|e| e.to_string())?;
                let io = index.open_files(&pv_path)?;
                let chunk = link
                    .chunk_sectors
                    .unwrap_or(devpool_format::cow::DEFAULT_CHUNK_SECTORS);
                CowStore::open(&io, &link.cow, map, chunk)
                    .map(|s| s.usage())
                    .map_err(|e| e.to_string())
            })();
            (link, usage)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// One in-memory device.
    struct Mem(RefCell<Vec<u8>>);
    impl DevIo for Mem {
        fn read_at(&self, _: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let m = self.0.borrow();
            let o = offset as usize;
            buf.copy_from_slice(
                m.get(o..o + buf.len())
                    .ok_or(io::ErrorKind::UnexpectedEof)?,
            );
            Ok(())
        }
        fn write_at(&self, _: usize, offset: u64, buf: &[u8]) -> io::Result<()> {
            let mut m = self.0.borrow_mut();
            let o = offset as usize;
            m.get_mut(o..o + buf.len())
                .ok_or(io::ErrorKind::UnexpectedEof)?
                .copy_from_slice(buf);
            Ok(())
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
    }

    const CB: u64 = 4096;

    fn store(chunks: u64) -> (Mem, CowStore) {
        let mem = Mem(RefCell::new(vec![0xee; (chunks * CB) as usize]));
        // A zeroed header: a store the kernel would initialise.
        mem.write_at(0, 0, &[0u8; 512]).unwrap();
        let s = CowStore::open(&mem, "snap", VolumeMap::linear(0, 0, chunks * CB), 8).unwrap();
        (mem, s)
    }

    #[test]
    fn exceptions_survive_a_reload_across_areas_and_fill_the_store_exactly() {
        // 256 records per area: 600 chunks hold 1 header + 2 full areas + a partial.
        let (mem, mut s) = store(600);
        let cap = s.layout.data_capacity();
        for i in 0..cap {
            let data = vec![(i % 251) as u8; CB as usize];
            s.add(&mem, 1000 + i, &data).unwrap();
        }
        assert!(matches!(
            s.add(&mem, 1, &vec![0; CB as usize]),
            Err(StoreError::Full { .. })
        ));
        let again = CowStore::open(&mem, "snap", s.map.clone(), 8).unwrap();
        assert_eq!(again.exceptions(), s.exceptions());
        assert_eq!(again.usage().used_chunks, cap);
        for i in [0, 255, 256, cap - 1] {
            let new = again.lookup(1000 + i).unwrap();
            assert!(!again.layout.is_metadata(new));
            let mut b = vec![0u8; CB as usize];
            read_mapped(&mem, &again.map, new * CB, &mut b).unwrap();
            assert!(b.iter().all(|&x| x == (i % 251) as u8), "chunk {i}");
        }
    }

    #[test]
    fn batched_allocations_write_the_same_store_as_one_by_one() {
        let (mem, mut s) = store(1000);
        let (mem1, mut one) = store(1000);
        // 300 records: area 0 fills (area 1 zeroed first), area 1 gets 44.
        let mut pending = Vec::new();
        for i in 0..300u64 {
            let data = vec![(i % 200) as u8; CB as usize];
            let new = s.allocate(5000 - i).unwrap();
            write_mapped(&mem, &s.map, new * CB, &data).unwrap();
            one.add(&mem1, 5000 - i, &data).unwrap();
            if i % 97 == 0 {
                pending.push(s.pending_metadata());
            }
        }
        pending.push(s.pending_metadata());
        let before: Vec<u64> = pending
            .iter()
            .flat_map(|p| p.before.iter().map(|b| b.0 / CB))
            .collect();
        assert_eq!(
            before,
            vec![0, 1, 258],
            "header, area 0, then area 1 zeroed"
        );
        for p in &pending {
            for (at, b) in p.before.iter().chain(&p.areas) {
                write_mapped(&mem, &s.map, *at, b).unwrap();
            }
        }
        assert!(s.pending_metadata().areas.is_empty());
        assert_eq!(*mem.0.borrow(), *mem1.0.borrow());
        let again = CowStore::open(&mem, "snap", s.map.clone(), 8).unwrap();
        assert_eq!(again.exceptions(), one.exceptions());
    }

    #[test]
    fn a_full_area_leaves_the_next_one_terminated() {
        let (mem, mut s) = store(1000);
        for i in 0..256 {
            s.add(&mem, i, &vec![1; CB as usize]).unwrap();
        }
        // Area 1's metadata chunk (258) held 0xee garbage; it must read empty.
        let again = CowStore::open(&mem, "snap", s.map.clone(), 8).unwrap();
        assert_eq!(again.usage().used_chunks, 256);
    }

    #[test]
    fn invalidation_is_on_disk_and_refuses_further_exceptions() {
        let (mem, mut s) = store(50);
        s.add(&mem, 3, &vec![1; CB as usize]).unwrap();
        s.invalidate(&mem).unwrap();
        let mut again = CowStore::open(&mem, "snap", s.map.clone(), 8).unwrap();
        assert!(!again.is_valid());
        assert_eq!(again.lookup(3), None);
        assert!(matches!(
            again.add(&mem, 4, &vec![1; CB as usize]),
            Err(StoreError::Invalid { .. })
        ));
    }
}
