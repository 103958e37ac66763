//! The label / PV header and metadata area header readers: never panic; what
//! parses is written back to bytes that parse to the same structure.
#![no_main]
use devpool_format::label::{PvLabel, find_label};
use devpool_format::mda::{MdaHeader, place_next_copy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(label)) = find_label(data)
        && let Ok(sector) = label.to_sector()
    {
        assert_eq!(PvLabel::parse(&sector, label.sector).expect("re-parse"), label);
    }
    let start = 4096;
    if let Ok(h) = MdaHeader::parse(data, start) {
        assert_eq!(MdaHeader::parse(&h.to_bytes(), start).expect("re-parse"), h);
        for size in [1u64, 512, 4096, h.size / 3] {
            let _ = place_next_copy(&h, size);
        }
    }
});
