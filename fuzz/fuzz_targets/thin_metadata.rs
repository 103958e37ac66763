//! Any bytes as a dm-thin metadata device read as a model or give an error,
//! never a panic or a hang. Each 4 KiB block is re-sealed with a checksum
//! (superblock salt for block 0, a salt the block's second byte picks for the
//! others) so the fuzzer gets past the checksums to the structures.
#![no_main]
use devpool_format::thin::{
    BITMAP_SALT, BLOCK, BTREE_SALT, INDEX_SALT, SUPERBLOCK_SALT, model, seal,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut img = data.to_vec();
    img.resize(img.len().div_ceil(BLOCK).max(1) * BLOCK, 0);
    for (i, b) in img.chunks_mut(BLOCK).enumerate() {
        let salt = match (i, b[1] % 3) {
            (0, _) => SUPERBLOCK_SALT,
            (_, 0) => BTREE_SALT,
            (_, 1) => BITMAP_SALT,
            _ => INDEX_SALT,
        };
        seal(b, salt);
    }
    let mut read = |n: u64| {
        let at = (n as usize).saturating_mul(BLOCK);
        Ok(img
            .get(at..at.saturating_add(BLOCK))
            .map(<[u8]>::to_vec)
            .unwrap_or_else(|| vec![0u8; BLOCK]))
    };
    if let Ok(Some((sb, m))) = model::read(&mut read) {
        for d in m.devices.values() {
            assert!(d.mappings.values().all(|bt| bt.block < m.nr_data_blocks));
        }
        let _ = model::used_blocks(&mut read, &sb);
    }
});
