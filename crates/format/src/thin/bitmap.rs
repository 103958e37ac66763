//! Space-map blocks: bitmaps of 2-bit reference counts, and the index
//! entries that say where each bitmap is and how free it is.

use super::{BITMAP_SALT, BLOCK, INDEX_SALT, put32, put64, seal, verify};
use crate::error::{FormatError, le_u32, le_u64};

const BITMAP_HEADER: usize = 16;
/// Blocks one bitmap counts.
pub const ENTRIES_PER_BITMAP: u64 = ((BLOCK - BITMAP_HEADER) * 4) as u64;
/// Index entries in the metadata space map's single index block.
pub const MAX_METADATA_BITMAPS: usize = 255;

/// Where a bitmap is, how many of its blocks are free, and the first
/// block that may be (a search hint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexEntry {
    pub blocknr: u64,
    pub nr_free: u32,
    pub none_free_before: u32,
}

impl IndexEntry {
    pub const SIZE: usize = 16;
    pub fn parse(b: &[u8]) -> IndexEntry {
        IndexEntry {
            blocknr: le_u64(b, 0),
            nr_free: le_u32(b, 8),
            none_free_before: le_u32(b, 12),
        }
    }
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        put64(&mut b, 0, self.blocknr);
        put32(&mut b, 8, self.nr_free);
        put32(&mut b, 12, self.none_free_before);
        b
    }
}

/// One bitmap block: a 2-bit count per block (0, 1, 2, or 3 = "more, see
/// the ref-count tree"); the lower-numbered bit of each pair is the high bit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    pub counts: Vec<u8>,
}

impl Bitmap {
    pub fn parse(b: &[u8], at: u64) -> Result<Bitmap, FormatError> {
        verify(
            b,
            BITMAP_SALT,
            "thin space map bitmap",
            at,
            Some(le_u64(b, 8)),
        )?;
        let counts = (0..ENTRIES_PER_BITMAP as usize)
            .map(|i| {
                let byte = b[BITMAP_HEADER + i / 4];
                let shift = (i % 4) * 2;
                let hi = (byte >> shift) & 1;
                let lo = (byte >> (shift + 1)) & 1;
                (hi << 1) | lo
            })
            .collect();
        Ok(Bitmap { counts })
    }

    pub fn encode(&self, at: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        put64(&mut b, 8, at);
        for (i, &c) in self
            .counts
            .iter()
            .take(ENTRIES_PER_BITMAP as usize)
            .enumerate()
        {
            let c = c.min(3);
            let shift = (i % 4) * 2;
            b[BITMAP_HEADER + i / 4] |= ((c >> 1) << shift) | ((c & 1) << (shift + 1));
        }
        seal(&mut b, BITMAP_SALT);
        b
    }
}

/// The metadata space map's index: one block of up to 255 entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataIndex {
    pub entries: Vec<IndexEntry>,
}

impl MetadataIndex {
    /// The `count` entries a space map of that many bitmaps uses.
    pub fn parse(b: &[u8], at: u64, count: usize) -> Result<MetadataIndex, FormatError> {
        verify(
            b,
            INDEX_SALT,
            "thin metadata space map index",
            at,
            Some(le_u64(b, 8)),
        )?;
        if count > MAX_METADATA_BITMAPS {
            return Err(FormatError::new(
                "thin metadata space map index",
                at * BLOCK as u64,
                format!("{count} bitmaps, at most {MAX_METADATA_BITMAPS}"),
            ));
        }
        Ok(MetadataIndex {
            entries: (0..count)
                .map(|i| IndexEntry::parse(&b[16 + 16 * i..]))
                .collect(),
        })
    }

    pub fn encode(&self, at: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        put64(&mut b, 8, at);
        for (i, e) in self.entries.iter().take(MAX_METADATA_BITMAPS).enumerate() {
            b[16 + 16 * i..32 + 16 * i].copy_from_slice(&e.encode());
        }
        seal(&mut b, INDEX_SALT);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_restores_space_map_blocks_reencode_byte_for_byte() {
        let img = super::super::tests::sample();
        let blk = |n: usize| &img[n * BLOCK..(n + 1) * BLOCK];
        let idx = MetadataIndex::parse(blk(1), 1, 1).unwrap();
        assert_eq!(idx.entries[0].blocknr, 3);
        assert_eq!(idx.encode(1), blk(1));
        let m = Bitmap::parse(blk(3), 3).unwrap();
        assert_eq!(&m.counts[..4], &[1, 1, 1, 1]);
        assert_eq!(m.encode(3), blk(3));
        // Data blocks 10, 11 (two devices share 10) and 20.
        let d = Bitmap::parse(blk(9), 9).unwrap();
        assert_eq!((d.counts[10], d.counts[11], d.counts[20]), (2, 1, 1));
        assert_eq!(d.counts.iter().filter(|&&c| c > 0).count(), 3);
        assert_eq!(d.encode(9), blk(9));
    }
}
