//! dm-snapshot's persistent exception store: the COW volume of an LVM2
//! snapshot, as the kernel's `dm-snap-persistent` reads and writes it.
//!
//! The store is a sequence of chunks (`chunk_sectors` × 512 bytes each):
//! - chunk 0: the header `{magic "SnAp" (0x70416e53), valid, version 1,
//!   chunk_size in sectors}`, little endian;
//! - then areas, one after another: one metadata chunk holding
//!   `exceptions_per_area = chunk_bytes / 16` records `{old_chunk, new_chunk}`
//!   (u64 LE each), followed by that many data chunks. Area `a`'s metadata
//!   chunk is chunk `1 + a × (exceptions_per_area + 1)`.
//! - A record whose `new_chunk` is 0 ends the table (chunk 0 is the header, so
//!   no exception points there); a full area continues in the next one, whose
//!   metadata chunk is zeroed before the full one is written.
//! - Data chunks are handed out in order from chunk 2, skipping metadata
//!   chunks. The snapshot is invalidated (header `valid = 0`) when the store
//!   is full.

use crate::error::{FormatError, le_u32};
use std::collections::BTreeMap;

pub const SNAP_MAGIC: u32 = 0x7041_6e53;
pub const DISK_VERSION: u32 = 1;
/// One `{old_chunk, new_chunk}` record.
pub const RECORD_BYTES: usize = 16;
/// LVM2's default snapshot chunk size (4 KiB) and dm's limits on it.
pub const DEFAULT_CHUNK_SECTORS: u32 = 8;
pub const MAX_CHUNK_SECTORS: u32 = 1024; // 512 KiB, LVM2's maximum

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CowHeader {
    pub valid: bool,
    pub version: u32,
    pub chunk_sectors: u32,
}

impl CowHeader {
    pub fn new(chunk_sectors: u32) -> CowHeader {
        CowHeader {
            valid: true,
            version: DISK_VERSION,
            chunk_sectors,
        }
    }

    /// `Ok(None)`: a zeroed header, i.e. a store the kernel would initialise.
    pub fn parse(b: &[u8]) -> Result<Option<CowHeader>, FormatError> {
        let err = |r: String| FormatError::new("snapshot COW header", 0, r);
        if b.len() < 16 {
            return Err(err(format!("{} bytes, need 16", b.len())));
        }
        let magic = le_u32(b, 0);
        if magic == 0 {
            return Ok(None);
        }
        if magic != SNAP_MAGIC {
            return Err(err(format!(
                "magic {magic:#010x} is not SnAp ({SNAP_MAGIC:#010x})"
            )));
        }
        let h = CowHeader {
            valid: le_u32(b, 4) != 0,
            version: le_u32(b, 8),
            chunk_sectors: le_u32(b, 12),
        };
        if h.version != DISK_VERSION {
            return Err(err(format!(
                "version {} (only {DISK_VERSION} exists)",
                h.version
            )));
        }
        check_chunk_sectors(h.chunk_sectors).map_err(err)?;
        Ok(Some(h))
    }

    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&SNAP_MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&u32::from(self.valid).to_le_bytes());
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.chunk_sectors.to_le_bytes());
        b
    }
}

/// A chunk size dm accepts: a power of two, at least one 4 KiB page here
/// (LVM2's minimum), at most LVM2's maximum.
pub fn check_chunk_sectors(s: u32) -> Result<(), String> {
    if !s.is_power_of_two() || !(DEFAULT_CHUNK_SECTORS..=MAX_CHUNK_SECTORS).contains(&s) {
        return Err(format!(
            "chunk size {s} sectors: a power of two from {DEFAULT_CHUNK_SECTORS} to {MAX_CHUNK_SECTORS}"
        ));
    }
    Ok(())
}

/// Where things are in a store of `chunks` chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CowLayout {
    pub chunk_sectors: u32,
    /// Chunks in the COW volume.
    pub chunks: u64,
}

impl CowLayout {
    pub fn chunk_bytes(&self) -> u64 {
        u64::from(self.chunk_sectors) * 512
    }
    pub fn exceptions_per_area(&self) -> u64 {
        self.chunk_bytes() / RECORD_BYTES as u64
    }
    fn stride(&self) -> u64 {
        self.exceptions_per_area() + 1
    }
    /// The metadata chunk of area `area`.
    pub fn area_location(&self, area: u64) -> Option<u64> {
        area.checked_mul(self.stride())?.checked_add(1)
    }
    /// The header and every area's metadata chunk.
    pub fn is_metadata(&self, chunk: u64) -> bool {
        chunk == 0 || chunk % self.stride() == 1
    }
    /// The first data chunk at or after `chunk`.
    pub fn data_chunk_from(&self, chunk: u64) -> u64 {
        let mut c = chunk.max(2);
        while self.is_metadata(c) {
            c += 1;
        }
        c
    }
    /// Data chunks the store can hold (what dm can hand out before ENOSPC).
    pub fn data_capacity(&self) -> u64 {
        if self.chunks <= 2 {
            return 0;
        }
        // Chunks 1.. split into areas of one metadata + epa data chunks.
        let body = self.chunks - 1;
        let full = body / self.stride();
        let rest = body % self.stride();
        full * self.exceptions_per_area() + rest.saturating_sub(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    pub old_chunk: u64,
    pub new_chunk: u64,
}

/// Records of one area until the terminator; `true` when the area is full
/// (the table continues in the next area).
pub fn parse_area(
    b: &[u8],
    layout: &CowLayout,
    area: u64,
) -> Result<(Vec<Exception>, bool), FormatError> {
    let at = layout
        .area_location(area)
        .and_then(|c| c.checked_mul(layout.chunk_bytes()))
        .unwrap_or(u64::MAX);
    let err = |r: String| FormatError::new("snapshot exception area", at, r);
    let epa = layout.exceptions_per_area() as usize;
    if b.len() < epa * RECORD_BYTES {
        return Err(err(format!(
            "{} bytes, need {}",
            b.len(),
            epa * RECORD_BYTES
        )));
    }
    let mut out = Vec::new();
    for i in 0..epa {
        let r = &b[i * RECORD_BYTES..(i + 1) * RECORD_BYTES];
        let mut o = [0u8; 8];
        let mut n = [0u8; 8];
        o.copy_from_slice(&r[0..8]);
        n.copy_from_slice(&r[8..16]);
        let e = Exception {
            old_chunk: u64::from_le_bytes(o),
            new_chunk: u64::from_le_bytes(n),
        };
        if e.new_chunk == 0 {
            return Ok((out, false));
        }
        if e.new_chunk >= layout.chunks || layout.is_metadata(e.new_chunk) {
            return Err(err(format!(
                "record {i}: chunk {} is not a data chunk of a {}-chunk store",
                e.new_chunk, layout.chunks
            )));
        }
        out.push(e);
    }
    Ok((out, true))
}

/// One area's metadata chunk holding `records` (at most exceptions_per_area;
/// the rest zero, so a short list is terminated).
pub fn encode_area(records: &[Exception], layout: &CowLayout) -> Vec<u8> {
    let mut b = vec![0u8; layout.chunk_bytes() as usize];
    for (i, e) in records
        .iter()
        .take(layout.exceptions_per_area() as usize)
        .enumerate()
    {
        b[i * RECORD_BYTES..i * RECORD_BYTES + 8].copy_from_slice(&e.old_chunk.to_le_bytes());
        b[i * RECORD_BYTES + 8..(i + 1) * RECORD_BYTES].copy_from_slice(&e.new_chunk.to_le_bytes());
    }
    b
}

/// The exception table as dm rebuilds it when it loads the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExceptionTable {
    /// Origin chunk → COW chunk.
    pub map: BTreeMap<u64, u64>,
    /// Records in table order (what the areas hold).
    pub records: Vec<Exception>,
    /// The next data chunk dm would hand out.
    pub next_free: u64,
}

impl ExceptionTable {
    /// Read areas (through `read_area`) until one is not full.
    pub fn load(
        layout: &CowLayout,
        mut read_area: impl FnMut(u64) -> Result<Vec<u8>, FormatError>,
    ) -> Result<ExceptionTable, FormatError> {
        let mut t = ExceptionTable {
            next_free: 2,
            ..ExceptionTable::default()
        };
        let mut area = 0u64;
        loop {
            let loc = layout.area_location(area).unwrap_or(u64::MAX);
            if loc >= layout.chunks {
                // A store whose last area is full ends here.
                break;
            }
            let (recs, full) = parse_area(&read_area(area)?, layout, area)?;
            for e in recs {
                t.next_free = t.next_free.max(e.new_chunk + 1);
                t.map.insert(e.old_chunk, e.new_chunk);
                t.records.push(e);
            }
            if !full {
                break;
            }
            area += 1;
        }
        t.next_free = layout.data_chunk_from(t.next_free);
        Ok(t)
    }

    /// The area the next record goes to, and its index there.
    pub fn position_of_next(&self, layout: &CowLayout) -> (u64, u64) {
        let n = self.records.len() as u64;
        let epa = layout.exceptions_per_area();
        (n / epa, n % epa)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn layout(chunk_sectors: u32, chunks: u64) -> CowLayout {
        CowLayout {
            chunk_sectors,
            chunks,
        }
    }

    #[test]
    fn header_round_trips_and_bad_headers_are_errors() {
        let h = CowHeader::new(8);
        let b = h.to_bytes();
        assert_eq!(&b[0..4], b"SnAp");
        assert_eq!(CowHeader::parse(&b).unwrap(), Some(h));
        assert_eq!(CowHeader::parse(&[0u8; 512]).unwrap(), None);
        let mut bad = b;
        bad[0] = b'X';
        assert!(CowHeader::parse(&bad).unwrap_err().reason.contains("SnAp"));
        let mut bad = b;
        bad[8] = 2;
        assert!(CowHeader::parse(&bad).is_err());
        let mut bad = b;
        bad[12] = 3;
        assert!(CowHeader::parse(&bad).is_err());
        assert!(CowHeader::parse(&b[..10]).is_err());
    }

    #[test]
    fn areas_sit_every_epa_plus_one_chunks_after_the_header() {
        // 4 KiB chunks: 256 records per area.
        let l = layout(8, 1000);
        assert_eq!(l.exceptions_per_area(), 256);
        assert_eq!(l.area_location(0), Some(1));
        assert_eq!(l.area_location(1), Some(258));
        assert!(l.is_metadata(0) && l.is_metadata(1) && l.is_metadata(258));
        assert!(!l.is_metadata(2) && !l.is_metadata(257) && !l.is_metadata(259));
        assert_eq!(l.data_chunk_from(0), 2);
        assert_eq!(l.data_chunk_from(258), 259);
        // 1000 chunks: the header, three full areas (3 × 257 chunks), then
        // a metadata chunk and the 227 data chunks left.
        assert_eq!(l.data_capacity(), 3 * 256 + 227);
    }

    #[test]
    fn a_zero_new_chunk_ends_the_table_and_bad_chunks_are_errors() {
        let l = layout(8, 100);
        let recs = [
            Exception {
                old_chunk: 7,
                new_chunk: 2,
            },
            Exception {
                old_chunk: 3,
                new_chunk: 3,
            },
        ];
        let b = encode_area(&recs, &l);
        assert_eq!(parse_area(&b, &l, 0).unwrap(), (recs.to_vec(), false));
        let bad = encode_area(
            &[Exception {
                old_chunk: 1,
                new_chunk: 1,
            }],
            &l,
        );
        assert!(parse_area(&bad, &l, 0).is_err(), "metadata chunk as data");
        let bad = encode_area(
            &[Exception {
                old_chunk: 1,
                new_chunk: 100,
            }],
            &l,
        );
        assert!(parse_area(&bad, &l, 0).is_err(), "past the end");
        assert!(parse_area(&b[..100], &l, 0).is_err());
    }

    proptest! {
        /// Any sequence of exceptions, allocated as dm allocates, written
        /// area by area as dm writes them, loads back as the same table.
        #[test]
        fn tables_round_trip_through_areas(olds in proptest::collection::vec(0u64..1_000_000, 0..700)) {
            let l = layout(8, 2000);
            let epa = l.exceptions_per_area() as usize;
            let mut next = 2u64;
            let mut recs = Vec::new();
            for o in &olds {
                next = l.data_chunk_from(next);
                if next >= l.chunks { break; }
                recs.push(Exception { old_chunk: *o, new_chunk: next });
                next += 1;
            }
            let areas: Vec<Vec<u8>> = recs.chunks(epa).map(|c| encode_area(c, &l)).chain(
                // The area after a full one is zeroed.
                std::iter::once(vec![0u8; l.chunk_bytes() as usize])).collect();
            let t = ExceptionTable::load(&l, |a| Ok(areas.get(a as usize).cloned()
                .unwrap_or_else(|| vec![0u8; l.chunk_bytes() as usize]))).unwrap();
            prop_assert_eq!(&t.records, &recs);
            for e in &recs {
                prop_assert!(!l.is_metadata(e.new_chunk));
            }
            prop_assert_eq!(t.next_free, l.data_chunk_from(next));
            let (area, idx) = t.position_of_next(&l);
            prop_assert_eq!(area * epa as u64 + idx, recs.len() as u64);
        }

        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = CowHeader::parse(&bytes);
            let _ = parse_area(&bytes, &layout(8, 50), 0);
        }
    }
}
