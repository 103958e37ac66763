//! dm-snapshot's own bytes: a COW store the 6.12 kernel wrote (see
//! tests/data/README.md) reads back as the exceptions dm reported.

use devpool_format::cow::{CowHeader, CowLayout, Exception, ExceptionTable};

#[test]
fn a_cow_store_written_by_the_kernel_parses_as_dm_left_it() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/dm-snapshot-cow-6.12.bin"
    ))
    .unwrap();
    let h = CowHeader::parse(&bytes)
        .unwrap()
        .expect("an initialised store");
    assert!(h.valid);
    assert_eq!(h.chunk_sectors, 8);
    // Our header encoding is byte-identical to the kernel's.
    assert_eq!(&h.to_bytes()[..], &bytes[..16]);
    // The COW LV is 8 MiB: 2048 chunks of 4 KiB.
    let layout = CowLayout {
        chunk_sectors: 8,
        chunks: 2048,
    };
    let t = ExceptionTable::load(&layout, |area| {
        let at = (layout.area_location(area).unwrap() * 4096) as usize;
        Ok(bytes
            .get(at..at + 4096)
            .map(<[u8]>::to_vec)
            .unwrap_or_else(|| vec![0u8; 4096]))
    })
    .unwrap();
    assert_eq!(
        t.records,
        [5u64, 6, 7]
            .iter()
            .zip(2u64..)
            .map(|(&old_chunk, new_chunk)| Exception {
                old_chunk,
                new_chunk
            })
            .collect::<Vec<_>>()
    );
    // dm reported 40 sectors used: 5 chunks, so the next free one is 5.
    assert_eq!(t.next_free, 5);
}
