//! A whole thin pool's metadata as a value: its devices, their details and
//! mappings. [`read`] walks a metadata device (through a block reader);
//! [`write`] lays out a complete new copy in blocks the caller says are
//! free and returns the superblock to write last — copy-on-write at the
//! scale of the whole metadata, so a crash before the superblock leaves the
//! old copy intact.

use super::bitmap::{ENTRIES_PER_BITMAP, MAX_METADATA_BITMAPS};
use super::node::max_entries;
use super::{
    BLOCK, Bitmap, BlockTime, DeviceDetails, IndexEntry, METADATA_BLOCK_SECTORS, MetadataIndex,
    Node, SmRoot, Superblock, VERSION,
};
use crate::error::{FormatError, le_u64};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ThinDevice {
    pub details: DeviceDetails,
    /// Virtual block → data block and write time.
    pub mappings: BTreeMap<u64, BlockTime>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ThinMetadata {
    pub uuid: [u8; 16],
    pub time: u32,
    pub trans_id: u64,
    pub flags: u32,
    /// In 512-byte sectors.
    pub data_block_size: u32,
    pub nr_data_blocks: u64,
    pub metadata_nr_blocks: u64,
    pub devices: BTreeMap<u64, ThinDevice>,
}

impl ThinMetadata {
    /// How many times each data block is mapped (by all devices).
    pub fn data_ref_counts(&self) -> BTreeMap<u64, u32> {
        let mut counts = BTreeMap::new();
        for d in self.devices.values() {
            for bt in d.mappings.values() {
                *counts.entry(bt.block).or_insert(0) += 1;
            }
        }
        counts
    }
}

/// Deeper than any real tree (a 2^64-key tree of 126-entry nodes is < 10).
const MAX_DEPTH: usize = 16;

/// Every `(key, value)` of the tree at `root`, in key order.
pub fn walk(
    read: &mut dyn FnMut(u64) -> Result<Vec<u8>, FormatError>,
    root: u64,
    value_size: usize,
    nr_blocks: u64,
    out: &mut Vec<(u64, Vec<u8>)>,
) -> Result<(), FormatError> {
    // A tree has fewer nodes than the device has blocks: a budget that
    // stops shared or cyclic children from multiplying the walk.
    walk_noting(
        read,
        root,
        value_size,
        nr_blocks,
        &mut Reuse::default(),
        out,
    )
}

fn walk_noting(
    read: &mut dyn FnMut(u64) -> Result<Vec<u8>, FormatError>,
    root: u64,
    value_size: usize,
    nr_blocks: u64,
    seen: &mut Reuse,
    out: &mut Vec<(u64, Vec<u8>)>,
) -> Result<(), FormatError> {
    let mut budget = nr_blocks;
    let mut w = Walk {
        read,
        value_size,
        nr_blocks,
        budget: &mut budget,
        seen,
    };
    w.at(root, 0, out)
}

struct Walk<'a> {
    read: &'a mut dyn FnMut(u64) -> Result<Vec<u8>, FormatError>,
    value_size: usize,
    nr_blocks: u64,
    budget: &'a mut u64,
    /// Every node visited, for the next copy to reuse.
    seen: &'a mut Reuse,
}

impl Walk<'_> {
    fn at(
        &mut self,
        at: u64,
        depth: usize,
        out: &mut Vec<(u64, Vec<u8>)>,
    ) -> Result<(), FormatError> {
        let (value_size, nr_blocks) = (self.value_size, self.nr_blocks);
        let err = |r: String| FormatError::new("thin btree", at.saturating_mul(BLOCK as u64), r);
        if *self.budget == 0 {
            return Err(err(
                "more nodes than metadata blocks (shared or cyclic children)".into(),
            ));
        }
        *self.budget -= 1;
        if at == 0 || at >= nr_blocks {
            return Err(err(format!("node block {at} is outside 1..{nr_blocks}")));
        }
        if depth > MAX_DEPTH {
            return Err(err(format!("deeper than {MAX_DEPTH} levels (a cycle?)")));
        }
        let n = Node::parse(&(self.read)(at)?, at)?;
        if n.leaf {
            if n.value_size != value_size {
                return Err(err(format!(
                    "values of {} bytes, this tree's are {value_size}",
                    n.value_size
                )));
            }
            for (i, k) in n.keys.iter().enumerate() {
                if out.last().is_some_and(|(last, _)| last >= k) {
                    return Err(err(format!("key {k} out of order across nodes")));
                }
                out.push((*k, n.value(i).to_vec()));
            }
        } else {
            for i in 0..n.keys.len() {
                self.at(le_u64(n.value(i), 0), depth + 1, out)?;
            }
        }
        self.seen.note_node(n, at);
        Ok(())
    }
}

/// The metadata `read(block)` returns blocks of; `Ok(None)` for an
/// unformatted (all-zero) superblock.
pub fn read(
    read: &mut dyn FnMut(u64) -> Result<Vec<u8>, FormatError>,
) -> Result<Option<(Superblock, ThinMetadata)>, FormatError> {
    Ok(read_reusable(read)?.map(|(sb, m, _)| (sb, m)))
}

/// As [`read`], with the nodes seen, for the next [`write`] to reuse.
pub fn read_reusable(
    read: &mut dyn FnMut(u64) -> Result<Vec<u8>, FormatError>,
) -> Result<Option<(Superblock, ThinMetadata, Reuse)>, FormatError> {
    let Some(sb) = Superblock::parse(&read(0)?)? else {
        return Ok(None);
    };
    let nr = sb.metadata_nr_blocks;
    let mut seen = Reuse::default();
    let mut details = Vec::new();
    walk_noting(
        read,
        sb.device_details_root,
        DeviceDetails::SIZE,
        nr,
        &mut seen,
        &mut details,
    )?;
    let mut tops = Vec::new();
    walk_noting(read, sb.data_mapping_root, 8, nr, &mut seen, &mut tops)?;
    let mut m = ThinMetadata {
        uuid: sb.uuid,
        time: sb.time,
        trans_id: sb.trans_id,
        flags: sb.flags,
        data_block_size: sb.data_block_size,
        nr_data_blocks: sb.data_sm.nr_blocks,
        metadata_nr_blocks: nr,
        devices: BTreeMap::new(),
    };
    for (id, v) in details {
        m.devices.entry(id).or_default().details = DeviceDetails::parse(&v);
    }
    for (id, v) in tops {
        let mut leaves = Vec::new();
        walk_noting(read, le_u64(&v, 0), 8, nr, &mut seen, &mut leaves)?;
        let dev = m.devices.get_mut(&id).ok_or_else(|| {
            FormatError::new(
                "thin mapping tree",
                0,
                format!("device {id} has mappings but no details"),
            )
        })?;
        for (vblock, bt) in leaves {
            let bt = BlockTime::parse(le_u64(&bt, 0));
            if bt.block >= m.nr_data_blocks {
                return Err(FormatError::new(
                    "thin mapping tree",
                    0,
                    format!(
                        "device {id} block {vblock} maps to data block {} of {}",
                        bt.block, m.nr_data_blocks
                    ),
                ));
            }
            dev.mappings.insert(vblock, bt);
        }
    }
    Ok(Some((sb, m, seen)))
}

/// A new metadata copy: the blocks to write (in any order, all before the
/// superblock), then the superblock.
#[derive(Debug)]
pub struct Written {
    pub blocks: Vec<(u64, Vec<u8>)>,
    pub superblock: Vec<u8>,
    /// Metadata blocks the copy uses, the superblock included.
    pub used: Vec<u64>,
    /// Where this copy's nodes and bitmaps are, for the next copy to reuse.
    pub reuse: Reuse,
}

/// Blocks of the live copy by content: a node or bitmap the next copy needs
/// unchanged is referenced where it is instead of written again, so a
/// commit writes only what changed (plus the small trees and space maps
/// above it). Each live block is reused at most once per copy, so every
/// block keeps exactly one reference.
#[derive(Debug, Clone, Default)]
pub struct Reuse {
    nodes: HashMap<Node, Vec<u64>>,
    bitmaps: HashMap<Vec<u8>, Vec<u64>>,
}

impl Reuse {
    fn note_node(&mut self, n: Node, at: u64) {
        let v = self.nodes.entry(n).or_default();
        if !v.contains(&at) {
            v.push(at);
        }
    }
}

struct Alloc<'a> {
    next: u64,
    nr: u64,
    is_free: &'a dyn Fn(u64) -> bool,
    used: Vec<u64>,
    old: Reuse,
    new: Reuse,
    out: Vec<(u64, Vec<u8>)>,
}

impl Alloc<'_> {
    fn take(&mut self) -> Result<u64, FormatError> {
        while self.next < self.nr {
            let b = self.next;
            self.next += 1;
            if (self.is_free)(b) {
                self.used.push(b);
                return Ok(b);
            }
        }
        Err(FormatError::new(
            "thin metadata",
            0,
            format!("no free metadata block left ({} blocks)", self.nr),
        ))
    }

    /// Place `node`: where the live copy has it, else in a fresh block.
    fn node(&mut self, node: Node) -> Result<u64, FormatError> {
        let at = match self.old.nodes.get_mut(&node).and_then(Vec::pop) {
            Some(at) => {
                self.used.push(at);
                at
            }
            None => {
                let at = self.take()?;
                self.out.push((at, node.encode(at)));
                at
            }
        };
        self.new.note_node(node, at);
        Ok(at)
    }

    fn bitmap(&mut self, counts: &[u8]) -> Result<u64, FormatError> {
        let at = match self.old.bitmaps.get_mut(counts).and_then(Vec::pop) {
            Some(at) => {
                self.used.push(at);
                at
            }
            None => {
                let at = self.take()?;
                self.out.push((
                    at,
                    Bitmap {
                        counts: counts.to_vec(),
                    }
                    .encode(at),
                ));
                at
            }
        };
        self.new
            .bitmaps
            .entry(counts.to_vec())
            .or_default()
            .push(at);
        Ok(at)
    }
}

/// Cut `keys` into leaf runs of at most `max` entries, every run but a lone
/// one at least `max / 3` (thin_check's minimum for non-root nodes). Runs
/// end where the key's hash says so once half full, so an insert or delete
/// changes the run it falls in and leaves the others — and their blocks —
/// as they were.
fn leaf_runs(keys: &[u64], max: usize) -> Vec<std::ops::Range<usize>> {
    let min = max / 3;
    let mut runs = Vec::new();
    let mut start = 0;
    for (i, k) in keys.iter().enumerate() {
        let len = i + 1 - start;
        let cut = k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60 == 0;
        if len >= max || (len >= max / 2 && cut) {
            runs.push(start..i + 1);
            start = i + 1;
        }
    }
    if start < keys.len() {
        let rest = keys.len() - start;
        match runs.pop() {
            Some(last) if rest < min => {
                let total = last.len() + rest;
                if total <= max {
                    runs.push(last.start..keys.len());
                } else {
                    let half = last.start + total / 2;
                    runs.push(last.start..half);
                    runs.push(half..keys.len());
                }
            }
            last => {
                runs.extend(last);
                runs.push(start..keys.len());
            }
        }
    }
    if runs.is_empty() {
        runs.push(0..0);
    }
    runs
}

/// Lay `entries` (sorted by key) out as a tree; returns the root.
fn build_tree(
    entries: &[(u64, Vec<u8>)],
    value_size: usize,
    alloc: &mut Alloc,
) -> Result<u64, FormatError> {
    let keys: Vec<u64> = entries.iter().map(|(k, _)| *k).collect();
    let mut level: Vec<(u64, u64)> = Vec::new();
    for run in leaf_runs(&keys, max_entries(value_size)) {
        let chunk = &entries[run];
        let at = alloc.node(Node {
            leaf: true,
            value_size,
            keys: chunk.iter().map(|(k, _)| *k).collect(),
            values: chunk.iter().flat_map(|(_, v)| v.iter().copied()).collect(),
        })?;
        level.push((chunk.first().map_or(0, |(k, _)| *k), at));
    }
    while level.len() > 1 {
        // Evenly filled internal nodes (each at least half full).
        let per = level.len().div_ceil(level.len().div_ceil(max_entries(8)));
        let mut up = Vec::new();
        for chunk in level.chunks(per) {
            let at = alloc.node(Node {
                leaf: false,
                value_size: 8,
                keys: chunk.iter().map(|(k, _)| *k).collect(),
                values: chunk.iter().flat_map(|(_, b)| b.to_le_bytes()).collect(),
            })?;
            up.push((chunk[0].0, at));
        }
        level = up;
    }
    Ok(level[0].1)
}

/// Bitmaps for `counts` (one per block, `nr` blocks); their index entries.
fn bitmaps(
    counts: &[u8],
    nr: u64,
    place: &mut dyn FnMut(&[u8]) -> Result<u64, FormatError>,
) -> Result<Vec<IndexEntry>, FormatError> {
    let mut index = Vec::new();
    for i in 0..nr.div_ceil(ENTRIES_PER_BITMAP) {
        let start = i * ENTRIES_PER_BITMAP;
        let end = (start + ENTRIES_PER_BITMAP).min(nr);
        let slice = &counts[start as usize..end as usize];
        // As the kernel counts: every free entry of the bitmap block, the
        // ones past the last block too. dm-thin grows a pool within a
        // bitmap block without touching its index entry, and skips blocks
        // whose count is 0: counted in range, a full pool stays full.
        let free = (slice.iter().filter(|&&c| c == 0).count() as u64
            + (ENTRIES_PER_BITMAP - slice.len() as u64)) as u32;
        let first_free = slice.iter().position(|&c| c == 0).unwrap_or(slice.len()) as u32;
        index.push(IndexEntry {
            blocknr: place(slice)?,
            nr_free: free,
            none_free_before: first_free,
        });
    }
    Ok(index)
}

/// A complete copy of `m` in the metadata blocks `is_free` allows (never
/// block 0), with space maps that count exactly what it uses. Nodes and
/// bitmaps `reuse` knows from the live copy are referenced, not rewritten
/// (pass `Reuse::default()` for a copy of its own).
pub fn write(
    m: &ThinMetadata,
    is_free: &dyn Fn(u64) -> bool,
    reuse: Reuse,
) -> Result<Written, FormatError> {
    let nr = m.metadata_nr_blocks;
    let meta_bitmaps = nr.div_ceil(ENTRIES_PER_BITMAP) as usize;
    if meta_bitmaps > MAX_METADATA_BITMAPS || nr < 16 {
        return Err(FormatError::new(
            "thin metadata",
            0,
            format!(
                "{nr} metadata blocks: from 16 to {}",
                MAX_METADATA_BITMAPS as u64 * ENTRIES_PER_BITMAP
            ),
        ));
    }
    let mut alloc = Alloc {
        next: 1,
        nr,
        is_free: &|b| b != 0 && is_free(b),
        used: vec![0],
        old: reuse,
        new: Reuse::default(),
        out: Vec::new(),
    };
    let meta_index_at = alloc.take()?;
    let meta_bitmap_at: Vec<u64> = (0..meta_bitmaps)
        .map(|_| alloc.take())
        .collect::<Result<_, _>>()?;
    // Data space map.
    let refs = m.data_ref_counts();
    let mut data_counts = vec![0u8; m.nr_data_blocks as usize];
    let mut data_overflow = Vec::new();
    for (&b, &c) in &refs {
        if let Some(slot) = data_counts.get_mut(b as usize) {
            *slot = c.min(3) as u8;
            if c >= 3 {
                data_overflow.push((b, c.to_le_bytes().to_vec()));
            }
        }
    }
    let data_index = bitmaps(&data_counts, m.nr_data_blocks, &mut |c| alloc.bitmap(c))?;
    let index_entries: Vec<(u64, Vec<u8>)> = data_index
        .iter()
        .enumerate()
        .map(|(i, e)| (i as u64, e.encode().to_vec()))
        .collect();
    let data_index_root = build_tree(&index_entries, IndexEntry::SIZE, &mut alloc)?;
    let data_ref_root = build_tree(&data_overflow, 4, &mut alloc)?;
    // Devices.
    let mut tops = Vec::new();
    let mut details = Vec::new();
    for (&id, d) in &m.devices {
        let leaves: Vec<(u64, Vec<u8>)> = d
            .mappings
            .iter()
            .map(|(v, bt)| (*v, bt.encode().to_le_bytes().to_vec()))
            .collect();
        let root = build_tree(&leaves, 8, &mut alloc)?;
        tops.push((id, root.to_le_bytes().to_vec()));
        let mut det = d.details;
        det.mapped_blocks = d.mappings.len() as u64;
        details.push((id, det.encode().to_vec()));
    }
    let mapping_root = build_tree(&tops, 8, &mut alloc)?;
    let details_root = build_tree(&details, DeviceDetails::SIZE, &mut alloc)?;
    let meta_ref_root = build_tree(&[], 4, &mut alloc)?;
    // The metadata space map counts every block this copy uses, itself too.
    let mut meta_counts = vec![0u8; nr as usize];
    for &b in &alloc.used {
        meta_counts[b as usize] = 1;
    }
    let mut places = meta_bitmap_at.iter();
    let mut out = std::mem::take(&mut alloc.out);
    let meta_index = bitmaps(&meta_counts, nr, &mut |c| {
        let at = places.next().copied().unwrap_or(0);
        out.push((at, Bitmap { counts: c.to_vec() }.encode(at)));
        Ok(at)
    })?;
    out.push((
        meta_index_at,
        MetadataIndex {
            entries: meta_index,
        }
        .encode(meta_index_at),
    ));
    let sb = Superblock {
        flags: m.flags,
        uuid: m.uuid,
        version: VERSION,
        time: m.time,
        trans_id: m.trans_id,
        metadata_snap: 0,
        data_sm: SmRoot {
            nr_blocks: m.nr_data_blocks,
            nr_allocated: refs.len() as u64,
            bitmap_root: data_index_root,
            ref_count_root: data_ref_root,
        },
        metadata_sm: SmRoot {
            nr_blocks: nr,
            nr_allocated: alloc.used.len() as u64,
            bitmap_root: meta_index_at,
            ref_count_root: meta_ref_root,
        },
        data_mapping_root: mapping_root,
        device_details_root: details_root,
        data_block_size: m.data_block_size,
        metadata_block_size: METADATA_BLOCK_SECTORS,
        metadata_nr_blocks: nr,
        compat_flags: 0,
        compat_ro_flags: 0,
        incompat_flags: 0,
    };
    Ok(Written {
        blocks: out,
        superblock: sb.encode(),
        used: alloc.used,
        reuse: alloc.new,
    })
}

/// The metadata blocks a metadata copy uses, from its space map (to give
/// the next copy the others).
pub fn used_blocks(
    read: &mut dyn FnMut(u64) -> Result<Vec<u8>, FormatError>,
    sb: &Superblock,
) -> Result<Vec<bool>, FormatError> {
    let nr = sb.metadata_nr_blocks;
    let count = nr.div_ceil(ENTRIES_PER_BITMAP) as usize;
    let at = sb.metadata_sm.bitmap_root;
    let index = MetadataIndex::parse(&read(at)?, at, count)?;
    let mut used = vec![false; nr as usize];
    for (i, e) in index.entries.iter().enumerate() {
        let bm = Bitmap::parse(&read(e.blocknr)?, e.blocknr)?;
        let start = i as u64 * ENTRIES_PER_BITMAP;
        for (j, &c) in bm.counts.iter().enumerate() {
            let b = start + j as u64;
            if b < nr && c > 0 {
                used[b as usize] = true;
            }
        }
    }
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(img: &[u8]) -> impl FnMut(u64) -> Result<Vec<u8>, FormatError> + '_ {
        move |n| {
            let at = n as usize * BLOCK;
            img.get(at..at + BLOCK).map(<[u8]>::to_vec).ok_or_else(|| {
                FormatError::new("thin metadata", at as u64, String::from("past the end"))
            })
        }
    }

    #[test]
    fn a_bitmaps_free_count_takes_in_the_entries_past_the_last_block_as_the_kernels() {
        // 512 blocks, all used: the kernel would skip a count of 0, and a
        // pool it grows within this bitmap block would stay full.
        let counts = vec![1u8; 512];
        let index = bitmaps(&counts, 512, &mut |_| Ok(7)).unwrap();
        assert_eq!(index.len(), 1);
        assert_eq!(u64::from(index[0].nr_free), ENTRIES_PER_BITMAP - 512);
        assert_eq!(index[0].none_free_before, 512);
        // A whole bitmap block and 10 more, 3 of those free.
        let mut counts = vec![1u8; ENTRIES_PER_BITMAP as usize + 10];
        counts[ENTRIES_PER_BITMAP as usize + 4..][..3].fill(0);
        let index = bitmaps(&counts, counts.len() as u64, &mut |_| Ok(7)).unwrap();
        assert_eq!(index[0].nr_free, 0);
        assert_eq!(u64::from(index[1].nr_free), 3 + ENTRIES_PER_BITMAP - 10);
        assert_eq!(index[1].none_free_before, 4);
    }

    /// The sample's XML: device 1 maps 0→10, 1→11, 100→20 (time 1);
    /// device 2 maps 0→10.
    #[test]
    fn reads_what_thin_restore_wrote() {
        let img = super::super::tests::sample();
        let mut img4m = img.clone();
        img4m.resize(1024 * BLOCK, 0);
        let (_, m) = read(&mut reader(&img4m)).unwrap().unwrap();
        assert_eq!(m.devices.len(), 2);
        let d1 = &m.devices[&1];
        let got: Vec<(u64, u64, u32)> = d1
            .mappings
            .iter()
            .map(|(v, bt)| (*v, bt.block, bt.time))
            .collect();
        assert_eq!(got, vec![(0, 10, 0), (1, 11, 0), (100, 20, 1)]);
        assert_eq!(d1.details.snapshotted_time, 1);
        assert_eq!(m.devices[&2].mappings[&0].block, 10);
        assert_eq!(m.data_ref_counts()[&10], 2);
    }

    #[test]
    fn a_written_copy_reads_back_and_the_next_copy_avoids_its_blocks() {
        let mut m = ThinMetadata {
            data_block_size: 128,
            nr_data_blocks: 40_000,
            metadata_nr_blocks: 20_000,
            trans_id: 4,
            time: 2,
            ..ThinMetadata::default()
        };
        for dev in 0..300u64 {
            let d = m.devices.entry(dev).or_default();
            // Enough mappings for internal nodes on device 0.
            let n = if dev == 0 { 1000 } else { 3 };
            for v in 0..n {
                d.mappings.insert(
                    v * 7,
                    BlockTime {
                        block: (v + dev) % 40_000,
                        time: 1,
                    },
                );
            }
        }
        let w = write(&m, &|_| true, Reuse::default()).unwrap();
        let mut img = vec![0u8; 20_000 * BLOCK];
        for (at, b) in w.blocks.iter().chain([(0u64, w.superblock.clone())].iter()) {
            img[*at as usize * BLOCK..(*at as usize + 1) * BLOCK].copy_from_slice(b);
        }
        let (sb, back) = read(&mut reader(&img)).unwrap().unwrap();
        let mut want = m.clone();
        for d in want.devices.values_mut() {
            d.details.mapped_blocks = d.mappings.len() as u64;
        }
        assert_eq!(back, want);
        let used = used_blocks(&mut reader(&img), &sb).unwrap();
        assert_eq!(used.iter().filter(|u| **u).count(), w.used.len());
        let w2 = write(&m, &|b| !used[b as usize], w.reuse).unwrap();
        // Nothing changed: every node and bitmap stays where it is.
        assert!(w2.blocks.len() <= 1 + 2, "{}", w2.blocks.len());
        assert!(w2.blocks.iter().all(|(at, _)| !used[*at as usize]));
    }
}
