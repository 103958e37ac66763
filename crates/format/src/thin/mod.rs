//! dm-thin's metadata format, as the kernel's `dm-thin-metadata` and
//! persistent-data library read and write it (and thin-provisioning-tools'
//! `thin_check`/`thin_dump` check it). Pure: 4 KiB blocks in, blocks out.
//!
//! - Every block starts with a CRC-32C checksum of the rest of the block
//!   (seed `~0`, no final inversion) XOR a per-kind salt, and most record
//!   their own block number.
//! - Block 0 is the [`Superblock`]: the roots of everything else.
//! - B-trees ([`Node`]): 64-bit keys, fixed-size values; internal nodes hold
//!   child block numbers keyed by each child's first key.
//! - The mapping tree is two-level: thin device id → root of that device's
//!   tree of virtual block → `(data block << 24) | time`.
//! - The details tree: device id → [`DeviceDetails`].
//! - Space maps ([`SmRoot`]) count references per block, 2 bits each in
//!   [`bitmap`] blocks (3 means "look in the ref-count tree"); the data
//!   space map indexes its bitmaps with a B-tree of [`IndexEntry`], the
//!   metadata space map with one [`MetadataIndex`] block.
//!
//! [`model`] reads and writes a whole metadata device through these.

pub mod bitmap;
pub mod model;
pub mod node;

pub use bitmap::{Bitmap, IndexEntry, MetadataIndex};
pub use node::Node;

use crate::error::{FormatError, le_u32, le_u64};

pub const BLOCK: usize = 4096;
pub const MAGIC: u64 = 27_022_010;
pub const SUPERBLOCK_SALT: u32 = 160_774;
pub const BTREE_SALT: u32 = 121_107;
pub const BITMAP_SALT: u32 = 240_779;
pub const INDEX_SALT: u32 = 160_478;
/// Metadata blocks are 4 KiB: 8 sectors.
pub const METADATA_BLOCK_SECTORS: u32 = 8;
/// The superblock version this writes (dm-thin reads 1 and 2).
pub const VERSION: u32 = 2;
const SPACE_MAP_ROOT_SIZE: usize = 128;

/// A block's checksum: CRC-32C of everything after the checksum field.
pub fn checksum(block: &[u8], salt: u32) -> u32 {
    !crc32c::crc32c(block.get(4..).unwrap_or(&[])) ^ salt
}

/// Write the checksum into the block's first 4 bytes.
pub fn seal(block: &mut [u8], salt: u32) {
    let c = checksum(block, salt);
    block[0..4].copy_from_slice(&c.to_le_bytes());
}

/// Check a block: its size, checksum and (where it has one) block number.
pub(crate) fn verify(
    block: &[u8],
    salt: u32,
    what: &'static str,
    at: u64,
    blocknr: Option<u64>,
) -> Result<(), FormatError> {
    let err = |r: String| FormatError::new(what, at * BLOCK as u64, r);
    if block.len() != BLOCK {
        return Err(err(format!("{} bytes, a block is {BLOCK}", block.len())));
    }
    let want = checksum(block, salt);
    let got = le_u32(block, 0);
    if got != want {
        return Err(err(format!("checksum {got:#010x}, computed {want:#010x}")));
    }
    if let Some(n) = blocknr
        && n != at
    {
        return Err(err(format!("says it is block {n}, read from block {at}")));
    }
    Ok(())
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A space map's root as the superblock holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmRoot {
    pub nr_blocks: u64,
    pub nr_allocated: u64,
    /// Data: root of the index B-tree; metadata: the index block.
    pub bitmap_root: u64,
    pub ref_count_root: u64,
}

impl SmRoot {
    fn parse(b: &[u8]) -> SmRoot {
        SmRoot {
            nr_blocks: le_u64(b, 0),
            nr_allocated: le_u64(b, 8),
            bitmap_root: le_u64(b, 16),
            ref_count_root: le_u64(b, 24),
        }
    }
    fn encode(&self, b: &mut [u8]) {
        put64(b, 0, self.nr_blocks);
        put64(b, 8, self.nr_allocated);
        put64(b, 16, self.bitmap_root);
        put64(b, 24, self.ref_count_root);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Superblock {
    pub flags: u32,
    pub uuid: [u8; 16],
    pub version: u32,
    /// The pool's current time (bumped by each snapshot).
    pub time: u32,
    pub trans_id: u64,
    /// A metadata snapshot held for userspace (0: none).
    pub metadata_snap: u64,
    pub data_sm: SmRoot,
    pub metadata_sm: SmRoot,
    pub data_mapping_root: u64,
    pub device_details_root: u64,
    /// In 512-byte sectors.
    pub data_block_size: u32,
    pub metadata_block_size: u32,
    pub metadata_nr_blocks: u64,
    pub compat_flags: u32,
    pub compat_ro_flags: u32,
    pub incompat_flags: u32,
}

/// Offsets inside the superblock.
const SB_DATA_SM: usize = 64;
const SB_META_SM: usize = SB_DATA_SM + SPACE_MAP_ROOT_SIZE;
const SB_MAPPING_ROOT: usize = SB_META_SM + SPACE_MAP_ROOT_SIZE;

impl Superblock {
    /// `Ok(None)`: an all-zero block 0, a metadata device never formatted
    /// (dm-thin formats it on first activation).
    pub fn parse(b: &[u8]) -> Result<Option<Superblock>, FormatError> {
        if b.len() == BLOCK && b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        let err = |r: String| FormatError::new("thin superblock", 0, r);
        if b.len() != BLOCK {
            return Err(err(format!("{} bytes, a block is {BLOCK}", b.len())));
        }
        let magic = le_u64(b, 32);
        if magic != MAGIC {
            return Err(err(format!("magic {magic}, dm-thin's is {MAGIC}")));
        }
        verify(b, SUPERBLOCK_SALT, "thin superblock", 0, Some(le_u64(b, 8)))?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let s = Superblock {
            flags: le_u32(b, 4),
            uuid,
            version: le_u32(b, 40),
            time: le_u32(b, 44),
            trans_id: le_u64(b, 48),
            metadata_snap: le_u64(b, 56),
            data_sm: SmRoot::parse(&b[SB_DATA_SM..]),
            metadata_sm: SmRoot::parse(&b[SB_META_SM..]),
            data_mapping_root: le_u64(b, SB_MAPPING_ROOT),
            device_details_root: le_u64(b, SB_MAPPING_ROOT + 8),
            data_block_size: le_u32(b, SB_MAPPING_ROOT + 16),
            metadata_block_size: le_u32(b, SB_MAPPING_ROOT + 20),
            metadata_nr_blocks: le_u64(b, SB_MAPPING_ROOT + 24),
            compat_flags: le_u32(b, SB_MAPPING_ROOT + 32),
            compat_ro_flags: le_u32(b, SB_MAPPING_ROOT + 36),
            incompat_flags: le_u32(b, SB_MAPPING_ROOT + 40),
        };
        if !(1..=2).contains(&s.version) {
            return Err(err(format!(
                "version {} (dm-thin knows 1 and 2)",
                s.version
            )));
        }
        let max_blocks = bitmap::MAX_METADATA_BITMAPS as u64 * bitmap::ENTRIES_PER_BITMAP;
        if s.metadata_nr_blocks > max_blocks || s.metadata_sm.nr_blocks != s.metadata_nr_blocks {
            return Err(err(format!(
                "{} metadata blocks (space map: {}); dm-thin has at most {max_blocks}",
                s.metadata_nr_blocks, s.metadata_sm.nr_blocks
            )));
        }
        if s.metadata_block_size != METADATA_BLOCK_SECTORS {
            return Err(err(format!(
                "metadata block size {} sectors (only {METADATA_BLOCK_SECTORS})",
                s.metadata_block_size
            )));
        }
        if s.data_block_size == 0 || !s.data_block_size.is_multiple_of(128) {
            return Err(err(format!(
                "data block size {} sectors: a multiple of 64 KiB (128 sectors)",
                s.data_block_size
            )));
        }
        Ok(Some(s))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        put32(&mut b, 4, self.flags);
        put64(&mut b, 8, 0);
        b[16..32].copy_from_slice(&self.uuid);
        put64(&mut b, 32, MAGIC);
        put32(&mut b, 40, self.version);
        put32(&mut b, 44, self.time);
        put64(&mut b, 48, self.trans_id);
        put64(&mut b, 56, self.metadata_snap);
        self.data_sm.encode(&mut b[SB_DATA_SM..]);
        self.metadata_sm.encode(&mut b[SB_META_SM..]);
        put64(&mut b, SB_MAPPING_ROOT, self.data_mapping_root);
        put64(&mut b, SB_MAPPING_ROOT + 8, self.device_details_root);
        put32(&mut b, SB_MAPPING_ROOT + 16, self.data_block_size);
        put32(&mut b, SB_MAPPING_ROOT + 20, self.metadata_block_size);
        put64(&mut b, SB_MAPPING_ROOT + 24, self.metadata_nr_blocks);
        put32(&mut b, SB_MAPPING_ROOT + 32, self.compat_flags);
        put32(&mut b, SB_MAPPING_ROOT + 36, self.compat_ro_flags);
        put32(&mut b, SB_MAPPING_ROOT + 40, self.incompat_flags);
        seal(&mut b, SUPERBLOCK_SALT);
        b
    }
}

/// A thin device's details (the details tree's value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceDetails {
    pub mapped_blocks: u64,
    pub transaction_id: u64,
    pub creation_time: u32,
    pub snapshotted_time: u32,
}

impl DeviceDetails {
    pub const SIZE: usize = 24;
    pub fn parse(b: &[u8]) -> DeviceDetails {
        DeviceDetails {
            mapped_blocks: le_u64(b, 0),
            transaction_id: le_u64(b, 8),
            creation_time: le_u32(b, 16),
            snapshotted_time: le_u32(b, 20),
        }
    }
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        put64(&mut b, 0, self.mapped_blocks);
        put64(&mut b, 8, self.transaction_id);
        put32(&mut b, 16, self.creation_time);
        put32(&mut b, 20, self.snapshotted_time);
        b
    }
}

/// A mapping tree leaf value: data block and the time it was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BlockTime {
    pub block: u64,
    pub time: u32,
}

impl BlockTime {
    pub fn parse(v: u64) -> BlockTime {
        BlockTime {
            block: v >> 24,
            time: (v & 0xff_ffff) as u32,
        }
    }
    pub fn encode(&self) -> u64 {
        (self.block << 24) | u64::from(self.time & 0xff_ffff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/thin-restore-sample.bin"
        ))
        .unwrap()
    }

    #[test]
    fn thin_restores_superblock_parses_and_reencodes_byte_for_byte() {
        let img = sample();
        let s = Superblock::parse(&img[..BLOCK]).unwrap().unwrap();
        assert_eq!(s.trans_id, 3);
        assert_eq!(s.time, 1);
        assert_eq!(s.data_block_size, 128);
        assert_eq!(s.metadata_nr_blocks, 1024);
        assert_eq!(s.data_sm.nr_blocks, 1000);
        assert_eq!(s.encode(), img[..BLOCK]);
        let mut bad = img[..BLOCK].to_vec();
        bad[100] ^= 1;
        assert!(
            Superblock::parse(&bad)
                .unwrap_err()
                .reason
                .contains("checksum")
        );
        assert_eq!(Superblock::parse(&[0u8; BLOCK]).unwrap(), None);
    }

    #[test]
    fn block_time_packs_24_bits_of_time() {
        let bt = BlockTime {
            block: 0x12_3456_789a,
            time: 7,
        };
        assert_eq!(BlockTime::parse(bt.encode()), bt);
    }
}
