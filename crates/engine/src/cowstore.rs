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

    pub fn sync(&self) -> io::Result<()> {
        self.files.iter().try_for_each(File::sync_data)
    }
}

impl DevIo for FilesIo {
    fn read_at(&self, dev: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file(dev)?.read_exact_at(buf, offset)
    }
    fn write_at(&self, dev: usize, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file(dev)?.write_all_at(buf, offset)
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
    #[error("snapshot {name}: {source}")]
    Format { name: String, source: FormatError },
    #[error("snapshot {name}: {source}")]
    Io { name: String, source: io::Error },
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
            source,
        };
        let ioe = |source| StoreError::Io {
            name: name.to_string(),
            source,
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
            source,
        }
    }

    fn write_chunk(&self, io: &dyn DevIo, chunk: u64, data: &[u8]) -> Result<(), StoreError> {
        write_mapped(io, &self.map, chunk * self.chunk_bytes(), data).map_err(|e| self.io_err(e))
    }

    /// Keep `data` (one chunk) as the store's copy of origin chunk `old`:
    /// the data chunk, then the area's record (the next area zeroed first
    /// when this record fills the area). On [`StoreError::Full`] the caller
    /// invalidates the snapshot.
    pub fn add(&mut self, io: &dyn DevIo, old: u64, data: &[u8]) -> Result<u64, StoreError> {
        if !self.valid {
            return Err(StoreError::Invalid {
                name: self.name.clone(),
            });
        }
        let cb = self.chunk_bytes();
        if data.len() as u64 != cb {
            return Err(self.io_err(io::Error::other(format!(
                "{} bytes for a {cb}-byte chunk",
                data.len()
            ))));
        }
        let new = self.table.next_free;
        if new >= self.layout.chunks {
            return Err(StoreError::Full {
                name: self.name.clone(),
                capacity: self.layout.data_capacity(),
                chunk_bytes: cb,
            });
        }
        if !self.initialised {
            let mut head = vec![0u8; 2 * cb as usize];
            head[..16].copy_from_slice(&CowHeader::new(self.layout.chunk_sectors).to_bytes());
            self.write_chunk(io, 0, &head)?;
            self.initialised = true;
        }
        self.write_chunk(io, new, data)?;
        let (area, index) = self.table.position_of_next(&self.layout);
        let epa = self.layout.exceptions_per_area();
        if index + 1 == epa
            && let Some(next) = self.layout.area_location(area + 1)
            && next < self.layout.chunks
        {
            self.write_chunk(io, next, &vec![0u8; cb as usize])?;
        }
        let first = (area * epa) as usize;
        let mut records = self.table.records[first..].to_vec();
        let e = Exception {
            old_chunk: old,
            new_chunk: new,
        };
        records.push(e);
        let at = self.layout.area_location(area).unwrap_or(u64::MAX);
        self.write_chunk(io, at, &encode_area(&records, &self.layout))?;
        self.table.records.push(e);
        self.table.map.insert(old, new);
        self.table.next_free = self.layout.data_chunk_from(new + 1);
        Ok(new)
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
                let paths = index
                    .keys
                    .iter()
                    .map(|k| pv_path(k).ok_or_else(|| format!("PV {k} is missing")))
                    .collect::<Result<Vec<_>, _>>()?;
                let io = FilesIo::open(&paths, false).map_err(|e| e.to_string())?;
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
