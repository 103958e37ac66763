//! A persistent-data B-tree node: a 32-byte header `{csum, flags, blocknr,
//! nr_entries, max_entries, value_size, padding}`, then `max_entries` keys
//! (u64), then `max_entries` values of `value_size` bytes.

use super::{BLOCK, BTREE_SALT, put32, put64, seal, verify};
use crate::error::{FormatError, le_u32, le_u64};

const HEADER: usize = 32;
const INTERNAL: u32 = 1;
const LEAF: u32 = 2;

/// How many entries a node of `value_size` values holds: as many as fit,
/// rounded down to a multiple of 3 (the kernel splits nodes in thirds).
pub fn max_entries(value_size: usize) -> usize {
    ((BLOCK - HEADER) / (8 + value_size)) / 3 * 3
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Node {
    pub leaf: bool,
    pub value_size: usize,
    pub keys: Vec<u64>,
    /// `keys.len() * value_size` bytes; an internal node's values are child
    /// block numbers (u64).
    pub values: Vec<u8>,
}

impl Node {
    pub fn value(&self, i: usize) -> &[u8] {
        &self.values[i * self.value_size..(i + 1) * self.value_size]
    }

    /// Parse block `at`; checks checksum, block number, entry counts, and
    /// that the keys increase.
    pub fn parse(b: &[u8], at: u64) -> Result<Node, FormatError> {
        verify(b, BTREE_SALT, "thin btree node", at, Some(le_u64(b, 8)))?;
        let err = |r: String| FormatError::new("thin btree node", at * BLOCK as u64, r);
        let flags = le_u32(b, 4);
        let leaf = match flags {
            INTERNAL => false,
            LEAF => true,
            f => return Err(err(format!("flags {f} (neither internal nor leaf)"))),
        };
        let nr = le_u32(b, 16) as usize;
        let max = le_u32(b, 20) as usize;
        let value_size = le_u32(b, 24) as usize;
        if value_size == 0 || value_size > 1024 || (!leaf && value_size != 8) {
            return Err(err(format!("value size {value_size}")));
        }
        if max == 0 || HEADER + max * (8 + value_size) > BLOCK || nr > max {
            return Err(err(format!(
                "{nr} entries of at most {max} with {value_size}-byte values do not fit a block"
            )));
        }
        let keys: Vec<u64> = (0..nr).map(|i| le_u64(b, HEADER + 8 * i)).collect();
        if keys.windows(2).any(|w| w[0] >= w[1]) {
            return Err(err("keys are not in increasing order".into()));
        }
        let vstart = HEADER + 8 * max;
        Ok(Node {
            leaf,
            value_size,
            keys,
            values: b[vstart..vstart + nr * value_size].to_vec(),
        })
    }

    /// The block for this node at block number `at`.
    pub fn encode(&self, at: u64) -> Vec<u8> {
        let max = max_entries(self.value_size);
        let mut b = vec![0u8; BLOCK];
        put32(&mut b, 4, if self.leaf { LEAF } else { INTERNAL });
        put64(&mut b, 8, at);
        put32(&mut b, 16, self.keys.len() as u32);
        put32(&mut b, 20, max as u32);
        put32(&mut b, 24, self.value_size as u32);
        for (i, k) in self.keys.iter().take(max).enumerate() {
            put64(&mut b, HEADER + 8 * i, *k);
        }
        let vstart = HEADER + 8 * max;
        let n = self.values.len().min(max * self.value_size);
        b[vstart..vstart + n].copy_from_slice(&self.values[..n]);
        seal(&mut b, BTREE_SALT);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_match_the_kernels() {
        // Mapping leaves (u64 values), details (24 bytes), index (16), refcounts (4).
        assert_eq!(max_entries(8), 252);
        assert_eq!(max_entries(24), 126);
        assert_eq!(max_entries(16), 168);
        assert_eq!(max_entries(4), 336);
    }

    #[test]
    fn thin_restores_nodes_reencode_byte_for_byte() {
        let img = super::super::tests::sample();
        // Blocks 2, 4, 5, 6, 7, 10, 11 of the sample are nodes.
        for at in [2u64, 4, 5, 6, 7, 10, 11] {
            let b = &img[at as usize * BLOCK..(at as usize + 1) * BLOCK];
            let n = Node::parse(b, at).unwrap();
            assert_eq!(n.encode(at), b, "block {at}");
        }
        // A node read from the wrong place is refused.
        let b = &img[2 * BLOCK..3 * BLOCK];
        assert!(Node::parse(b, 3).unwrap_err().reason.contains("block 2"));
    }
}
