//! Any bytes as a dm-snapshot COW store (header chunk, then areas) load as a
//! table or give an error, never a panic; a table that loads only points at
//! data chunks inside the store.
#![no_main]
use devpool_format::cow::{CowHeader, CowLayout, ExceptionTable};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = CowHeader::parse(data);
    // 4 KiB chunks; the store is as long as the input, at least 3 chunks.
    let layout = CowLayout {
        chunk_sectors: 8,
        chunks: (data.len() as u64 / 4096).max(3),
    };
    let loaded = ExceptionTable::load(&layout, |area| {
        let at = layout.area_location(area).unwrap_or(u64::MAX).saturating_mul(4096) as usize;
        Ok(data
            .get(at..at.saturating_add(4096))
            .map(<[u8]>::to_vec)
            .unwrap_or_else(|| vec![0u8; 4096]))
    });
    if let Ok(t) = loaded {
        for e in &t.records {
            assert!(e.new_chunk < layout.chunks && !layout.is_metadata(e.new_chunk));
        }
    }
});
